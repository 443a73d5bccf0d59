//! rhyve's NVMe controller: NVMe Base 2.0 with the NVM command set over the PCIe transport.
//!
//! The model is frontend-agnostic: it is a [`pci::PciDevice`] whose BAR0 holds the controller
//! registers and doorbells and whose BAR4 holds the MSI-X table and PBA. Files, bhyve-style:
//! [`spec`] (wire layouts and constants), [`ctrl`] (registers, queues, interrupts, reset),
//! [`admin`], [`io`], [`prp`] (PRP/SGL walking), [`identify`], [`features`], [`log`],
//! [`namespace`], [`config`] (the `-s slot,nvme,…` options).
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod ctrl;
pub mod features;
pub mod identify;
pub mod io;
pub mod log;
pub mod namespace;
pub mod prp;
pub mod queue;
pub mod smart;
pub mod spec;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use block::Executor;
use pci::caps::{self, LinkSpeed};
use pci::{
    BarInfo, BarKind, ConfigError, ConfigSpace, DeviceContext, IoEvent, PciDevice, PciFunction,
    SlotSpec,
};

use crate::config::CtrlConfig;
use crate::ctrl::{Shared, State};
use crate::features::Features;
use crate::identify::{PCI_DEVICE_ID, PCI_VENDOR_ID};
use crate::log::Logs;
use crate::namespace::Namespace;

/// Emulation name for `-s slot,nvme,…`.
pub const NAME: &str = "nvme";
/// NVMe version implemented: 2.0.0.
pub const NVME_VERSION: u32 = 0x0002_0000;
/// BAR holding the MSI-X table (at 0) and PBA (at [`PBA_OFFSET`]).
pub const MSIX_BAR: u8 = 4;
/// Offset of the PBA in [`MSIX_BAR`].
pub const PBA_OFFSET: u64 = 0x1000;
/// Executor threads per controller.
const IO_THREADS: usize = 4;

/// An NVMe controller on a PCI function.
pub struct NvmeController {
    shared: Arc<Shared>,
    bar0_size: u64,
}

impl NvmeController {
    /// Build a controller from parsed configuration and opened namespaces.
    ///
    /// # Panics
    /// If `cfg.smart` names a state file that cannot be used; [`NvmeController::try_new`]
    /// reports that as an error instead.
    pub fn new(cfg: CtrlConfig, ctx: &DeviceContext, namespaces: Vec<Namespace>) -> Self {
        Self::try_new(cfg, ctx, namespaces).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Build a controller; fails only if the SMART state file cannot be read or written.
    pub fn try_new(
        cfg: CtrlConfig,
        ctx: &DeviceContext,
        namespaces: Vec<Namespace>,
    ) -> Result<Self, String> {
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
            0x2000,
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
        let maxq = cfg.maxq;
        let state = State {
            cc: 0,
            csts: 0,
            aqa: 0,
            asq: 0,
            acq: 0,
            intms: 0,
            sqs: (0..=maxq).map(|_| None).collect(),
            cqs: (0..=maxq).map(|_| None).collect(),
            generation: 0,
            features: Features::new(maxq, usize::from(vectors)),
            namespaces,
            logs: Logs::default(),
            aer_cids: Vec::new(),
            aer_pending: Vec::new(),
            aer_masked: [false; 8],
            inflight_cmds: Vec::new(),
            held_aborts: Vec::new(),
            timestamp: None,
            dbbuf: None,
        };
        let name = format!("nvme-{}", cfg.serial);
        let shared = Arc::new_cyclic(|me| Shared {
            exec: Executor::new(IO_THREADS, &name),
            cfg,
            mem: ctx.mem.clone(),
            pci: Mutex::new(pci),
            state: Mutex::new(state),
            counters: Default::default(),
            started: Instant::now(),
            me: me.clone(),
            smart,
            smart_clean: Default::default(),
        });
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
    let dev = NvmeController::try_new(cfg, ctx, namespaces).map_err(|msg| ConfigError::Device {
        device: spec.emul.clone(),
        msg,
    })?;
    Ok(Box::new(dev))
}

impl PciDevice for NvmeController {
    fn name(&self) -> &str {
        NAME
    }

    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.shared
            .pci
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .config_read(usize::from(offset), data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.shared
            .pci
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .config_write(usize::from(offset), data);
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        match bar {
            0 if offset < self.bar0_size => self.shared.read_bar0(offset, data),
            MSIX_BAR => {
                let pci = self.shared.pci.lock().unwrap_or_else(|e| e.into_inner());
                if offset >= PBA_OFFSET {
                    pci.msix_pba_read(offset - PBA_OFFSET, data);
                } else {
                    pci.msix_table_read(offset, data);
                }
            }
            _ => data.fill(0xff),
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        match bar {
            0 if offset < self.bar0_size => self.shared.write_bar0(offset, data),
            MSIX_BAR if offset < PBA_OFFSET => {
                self.shared
                    .pci
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .msix_table_write(offset, data);
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
                size: 0x2000,
                kind: BarKind::Mem32 {
                    prefetchable: false,
                },
            },
        ]
    }

    fn shutdown(&mut self) {
        self.shared.exec.wait_idle();
        self.shared.flush_all();
        // Clean only if the host had shut the controller down (CC.SHN) and not re-enabled it.
        let clean = self.shared.smart_clean.load(Ordering::Relaxed);
        self.shared.save_smart(clean);
    }

    fn stats(&self) -> Vec<(String, u64)> {
        let c = &self.shared.counters;
        vec![
            (
                "admin_commands".into(),
                c.admin_cmds.load(Ordering::Relaxed),
            ),
            ("read_commands".into(), c.read_cmds.load(Ordering::Relaxed)),
            (
                "write_commands".into(),
                c.write_cmds.load(Ordering::Relaxed),
            ),
            ("bytes_read".into(), c.bytes_read.load(Ordering::Relaxed)),
            (
                "bytes_written".into(),
                c.bytes_written.load(Ordering::Relaxed),
            ),
            ("interrupts".into(), c.interrupts.load(Ordering::Relaxed)),
        ]
    }

    /// Once the host has configured shadow doorbells (Doorbell Buffer Config, an admin command, so
    /// the set changes during a BAR0 write), an I/O submission queue's tail is in guest memory and
    /// its SQ tail doorbell can be absorbed: token = qid. CQ head doorbells stay synchronous: the
    /// host rings them only when the controller asks through the EventIdx (completions waiting for
    /// space, INTx), and then the controller must act on the new head, which a kick does not do.
    /// Shadow doorbells do not cover the admin queue.
    fn ioevents(&self) -> Vec<IoEvent> {
        if self.shared.lock().dbbuf.is_none() {
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
    fn kick(&mut self, token: u32) {
        if let Ok(qid) = u16::try_from(token) {
            self.shared.kick(qid);
        }
    }
}
