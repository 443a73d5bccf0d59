//! rhyve's NVMe controller: NVMe Base 2.0 with the NVM command set over the PCIe transport.
//!
//! The model is frontend-agnostic: it is a [`pci::PciDevice`] whose BAR0 holds the controller
//! registers and doorbells and whose BAR4 holds the MSI-X table and PBA. Files, bhyve-style,
//! from the bottom up: [`spec`] (wire layouts, constants, typed registers and command dwords),
//! [`error`] (a failed command's status and reason), [`config`] (the `-s slot,nvme,…` options),
//! [`commands`] (the one table of supported commands), [`namespace`], `queue`, `prp` (PRP/SGL
//! walking), `identify`, `features`, `logpage`, `smart`, `ctrl` (registers, doorbells,
//! interrupts, reset), `admin` and `io` (the two command sets), and [`state`] (pause, save and
//! restore for snapshots and migration).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod admin;
pub mod commands;
pub mod config;
mod ctrl;
pub mod error;
mod features;
mod identify;
mod io;
mod logpage;
pub mod namespace;
mod prp;
mod queue;
mod smart;
pub mod spec;
pub mod state;

pub use error::{NvmeError, Reason};
pub use io::MAX_SEGMENTS;

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::time::Instant;

use block::{Engine, Executor, IoThread};
use pci::caps::{self, LinkSpeed};
use pci::{
    BarInfo, BarKind, ConfigError, ConfigSpace, DeviceContext, IoEvent, PciDevice, PciFunction,
    SlotSpec,
};

use crate::config::CtrlConfig;
use crate::ctrl::{flag, Ctrl, Shared};
use crate::features::Features;
use crate::identify::{PCI_DEVICE_ID, PCI_VENDOR_ID};
use crate::logpage::Logs;
use crate::namespace::Namespace;
use crate::queue::Group;

/// Emulation name for `-s slot,nvme,…`.
pub const NAME: &str = "nvme";
/// NVMe version implemented: 2.0.0.
pub const NVME_VERSION: u32 = 0x0002_0000;
/// BAR holding the MSI-X table (at 0) and PBA (at [`PBA_OFFSET`]).
pub const MSIX_BAR: u8 = 4;
/// Offset of the PBA in [`MSIX_BAR`].
pub const PBA_OFFSET: u64 = 0x1000;
/// Size of [`MSIX_BAR`].
const MSIX_BAR_SIZE: u64 = 0x2000;
/// Worker threads per controller for blocking work.
const POOL_THREADS: usize = 4;

/// Why a controller cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// The SMART state file (`smart=PATH`) cannot be read or written.
    #[error(transparent)]
    Smart(#[from] smart::SmartError),
    /// An I/O thread or its engine could not be set up.
    #[error("cannot start I/O thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// An NVMe controller on a PCI function.
pub struct NvmeController {
    shared: Arc<Shared>,
    bar0_size: u64,
}

impl NvmeController {
    /// Build a controller from parsed configuration and opened namespaces.
    ///
    /// # Panics
    /// If `cfg.smart` names a state file that cannot be used, or threads cannot start;
    /// [`NvmeController::try_new`] reports that as an error instead.
    pub fn new(cfg: CtrlConfig, ctx: &DeviceContext, namespaces: Vec<Namespace>) -> Self {
        Self::try_new(cfg, ctx, namespaces).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Build a controller and start its I/O threads.
    pub fn try_new(
        cfg: CtrlConfig,
        ctx: &DeviceContext,
        namespaces: Vec<Namespace>,
    ) -> Result<Self, CreateError> {
        let smart = smart::SmartStore::open(cfg.smart.as_deref())?;
        let vectors = cfg.maxq + 1;
        let bar0_size = (reg_space(cfg.maxq)).next_power_of_two().max(0x4000);
        let mut cs = ConfigSpace::new(PCI_VENDOR_ID, PCI_DEVICE_ID, 0x01, 0x08, 0x02, 0);
        cs.set_subsystem(PCI_VENDOR_ID, PCI_DEVICE_ID);
        cs.add_bar(
            0,
            BarKind::Mem64 {
                prefetchable: false,
            },
            bar0_size,
        );
        cs.add_bar(
            usize::from(MSIX_BAR),
            BarKind::Mem32 {
                prefetchable: false,
            },
            MSIX_BAR_SIZE,
        );
        if ctx.intx_supported {
            cs.set_interrupt_pin(1);
        }
        caps::add_pm(&mut cs);
        let log2 = (u32::from(vectors).next_power_of_two().trailing_zeros()).min(5) as u8;
        let msi = caps::add_msi(&mut cs, log2);
        let msix = caps::add_msix(&mut cs, vectors, MSIX_BAR, 0, MSIX_BAR, PBA_OFFSET as u32);
        caps::add_pcie_endpoint(&mut cs, LinkSpeed::Gen3, 4);
        let pci = PciFunction::new(cs, Some(msi), Some(msix), ctx.irq.clone());
        let irq = pci.interrupts();
        let maxq = usize::from(cfg.maxq);
        let features = Features::new(cfg.maxq, usize::from(vectors));
        let ctrl = Ctrl {
            cc: 0,
            csts: 0,
            aqa: 0,
            asq: 0,
            acq: 0,
            admin: Group::default(),
            features: features.clone(),
            logs: Logs::default(),
            aer_cids: Vec::new(),
            aer_pending: Vec::new(),
            aer_masked: [false; 8],
            held_aborts: Vec::new(),
            timestamp: None,
            dbbuf: None,
            resetting: false,
            shutdown_seq: 0,
        };
        let name = format!("nvme-{}", cfg.serial);
        let pool = Arc::new(Executor::try_new(POOL_THREADS, &name)?);
        let (aio, iothreads, qsz) = (cfg.aio, cfg.iothreads, cfg.qsz);
        let shared = Arc::new_cyclic(|me| Shared {
            cfg,
            mem: ctx.mem.clone(),
            pci: Mutex::new(pci),
            irq,
            ctrl: Mutex::new(ctrl),
            ns: RwLock::new(namespaces),
            groups: (0..=maxq).map(|_| Mutex::new(Group::default())).collect(),
            sq_cq: (0..=maxq).map(|_| AtomicU16::new(0)).collect(),
            cq_assert: (0..=maxq).map(|_| AtomicBool::new(false)).collect(),
            cq_held: (0..=maxq).map(|_| AtomicBool::new(false)).collect(),
            flags: AtomicU32::new(0),
            shadow: (AtomicU64::new(0), AtomicU64::new(0)),
            volatile_wc: AtomicBool::new(features.volatile_wc),
            coalescing: AtomicU32::new(features.coalescing),
            vector_cd: (0..vectors).map(|_| AtomicBool::new(false)).collect(),
            intms: AtomicU32::new(0),
            inflight: AtomicUsize::new(0),
            idle: (Mutex::new(0), Condvar::new()),
            epoch: AtomicU16::new(1),
            threads: OnceLock::new(),
            pool: pool.clone(),
            shutdown_running: AtomicBool::new(false),
            counters: Default::default(),
            latency: Default::default(),
            started: Instant::now(),
            me: me.clone(),
            smart,
            smart_clean: Default::default(),
        });
        let mut threads = Vec::new();
        for i in 0..usize::from(iothreads) {
            let depth = qsz.min(4096);
            let engine = Engine::new(aio, depth, pool.clone())?;
            let handler: std::sync::Weak<dyn block::IoHandler> = Arc::downgrade(&shared) as _;
            threads.push(IoThread::spawn(
                format!("{name}-io{i}"),
                i,
                engine,
                handler,
            )?);
        }
        let _ = shared.threads.set(threads);
        Ok(NvmeController { shared, bar0_size })
    }

    /// The controller configuration.
    pub fn config(&self) -> &CtrlConfig {
        &self.shared.cfg
    }
}

fn reg_space(maxq: u16) -> u64 {
    spec::reg::DOORBELL_BASE + 8 * (u64::from(maxq) + 1)
}

/// Constructor for the device registry: parse options, open images, build the controller.
pub fn create(spec: &SlotSpec, ctx: &DeviceContext) -> Result<Box<dyn PciDevice>, ConfigError> {
    let cfg = CtrlConfig::from_spec(spec)?;
    let mut namespaces = Vec::new();
    for (i, ns) in cfg.namespaces.iter().enumerate() {
        let backend = block::open(ns).map_err(|e| ConfigError::Device {
            device: spec.emul.clone(),
            msg: e.to_string(),
        })?;
        namespaces.push(Namespace::new(i as u32 + 1, backend));
    }
    let dev = NvmeController::try_new(cfg, ctx, namespaces).map_err(|e| ConfigError::Device {
        device: spec.emul.clone(),
        msg: e.to_string(),
    })?;
    Ok(Box::new(dev))
}

impl PciDevice for NvmeController {
    fn name(&self) -> &str {
        NAME
    }

    fn config_read(&self, offset: u16, data: &mut [u8]) {
        self.shared
            .lock_pci()
            .config_read(usize::from(offset), data);
    }

    fn config_write(&self, offset: u16, data: &[u8]) {
        let was = self.shared.irq.bus_master();
        self.shared
            .lock_pci()
            .config_write(usize::from(offset), data);
        if !was && self.shared.irq.bus_master() {
            // Bus Master Enable is back: held completions go out, fetching resumes.
            self.shared.resume();
        }
    }

    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) {
        match bar {
            0 if pci::bar_access_ok(offset, data.len(), self.bar0_size) => {
                self.shared.read_bar0(offset, data)
            }
            MSIX_BAR if pci::bar_access_ok(offset, data.len(), MSIX_BAR_SIZE) => {
                self.shared
                    .lock_pci()
                    .msix_bar_read(offset, data, PBA_OFFSET);
            }
            _ => data.fill(0xff),
        }
    }

    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) {
        match bar {
            0 if pci::bar_access_ok(offset, data.len(), self.bar0_size) => {
                self.shared.write_bar0(offset, data)
            }
            MSIX_BAR if pci::bar_access_ok(offset, data.len(), MSIX_BAR_SIZE) => {
                self.shared
                    .lock_pci()
                    .msix_bar_write(offset, data, PBA_OFFSET);
            }
            _ => {}
        }
    }

    fn bars(&self) -> Vec<BarInfo> {
        vec![
            BarInfo {
                index: 0,
                size: self.bar0_size,
                kind: BarKind::Mem64 {
                    prefetchable: false,
                },
            },
            BarInfo {
                index: MSIX_BAR,
                size: MSIX_BAR_SIZE,
                kind: BarKind::Mem32 {
                    prefetchable: false,
                },
            },
        ]
    }

    fn shutdown(&self) {
        self.shared.wait_idle();
        self.shared.flush_all();
        // Clean only if the host had shut the controller down (CC.SHN) and not re-enabled it.
        let clean = self.shared.smart_clean.load(Ordering::Relaxed);
        self.shared.save_smart(clean);
    }

    fn stats(&self) -> Vec<(String, u64)> {
        let c = &self.shared.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("admin_commands".into(), g(&c.admin_cmds)),
            ("read_commands".into(), g(&c.read_cmds)),
            ("write_commands".into(), g(&c.write_cmds)),
            ("bytes_read".into(), g(&c.bytes_read)),
            ("bytes_written".into(), g(&c.bytes_written)),
            ("interrupts".into(), g(&c.interrupts)),
            ("doorbell_writes".into(), g(&c.doorbells)),
            ("shadow_polls".into(), g(&c.polled)),
            ("inflight_peak".into(), g(&c.inflight_peak)),
        ]
        .into_iter()
        .chain(self.shared.latency.stats())
        .collect()
    }

    /// Once the host has configured shadow doorbells (Doorbell Buffer Config, an admin command, so
    /// the set changes during a BAR0 write), an I/O submission queue's tail is in guest memory and
    /// its SQ tail doorbell can be absorbed: token = qid. CQ head doorbells stay synchronous: the
    /// host rings them only when the controller asks through the EventIdx (fetching waits for
    /// room, INTx), and then the controller must act on the new head, which a kick does not do.
    /// Shadow doorbells do not cover the admin queue.
    fn ioevents(&self) -> Vec<IoEvent> {
        if !self.shared.flag(flag::SHADOW) {
            return Vec::new();
        }
        (1..=self.shared.cfg.maxq)
            .map(|qid| IoEvent {
                bar: 0,
                offset: spec::reg::DOORBELL_BASE + 8 * u64::from(qid),
                datamatch: None,
                token: u32::from(qid),
            })
            .collect()
    }

    /// An absorbed SQ tail doorbell of queue `token`: re-read the shadow doorbells and process.
    fn kick(&self, token: u32) {
        if let Ok(qid) = u16::try_from(token) {
            self.shared.kick(qid);
        }
    }

    fn pause(&self) -> Result<(), pci::StateError> {
        self.shared.pause()
    }

    fn resume(&self) {
        self.shared.unpause();
    }

    fn save_state(&self) -> Result<serde_json::Value, pci::StateError> {
        pci::state_to_json(&self.shared.save()?)
    }

    fn restore_state(&self, v: &serde_json::Value) -> Result<(), pci::StateError> {
        let s: state::NvmeState = pci::state_from_json("nvme", v)?;
        self.shared.restore(&s)
    }
}
