//! rhyve's virtio-blk: a block device over the virtio 1.x (modern) PCI transport, the
//! paravirtual baseline beside NVMe and AHCI.
//!
//! Files, from the bottom up: [`spec`] (virtio facts with size asserts), [`config`] (the
//! `-s slot,virtio-blk,…` options), `transport` (the PCI capabilities, common configuration,
//! feature negotiation, device status, ISR and notifications) and `blk` (requests: descriptor
//! chains validated into zero-copy I/O on the shared block engine).
//!
//! Split virtqueues come from rust-vmm's `virtio-queue` (with EVENT_IDX and indirect
//! descriptors); every chain is checked before data moves: a loop, an address outside guest RAM
//! or a chain too long or too short is answered with an error status, or, when no status byte
//! can be written, by DEVICE_NEEDS_RESET. Never a panic.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod blk;
pub mod config;
pub mod spec;
pub mod state;
mod transport;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};

use block::{BlockBackend, Engine, Executor, IoThread};
use pci::{
    caps, BarInfo, BarKind, ConfigError, ConfigSpace, DeviceContext, GuestMem, Interrupts, IoEvent,
    PciDevice, PciFunction, SlotSpec,
};

pub use config::BlkOptions;
use transport::{Transport, Vq};

/// Emulation name for `-s slot,virtio-blk,…`.
pub const NAME: &str = "virtio-blk";
/// Other names accepted for `-s`.
pub const ALIASES: &[&str] = &["virtio-block"];

/// BAR0 layout: where each virtio structure lives.
pub mod layout {
    /// Common configuration.
    pub const COMMON: u64 = 0x0000;
    /// ISR status.
    pub const ISR: u64 = 0x1000;
    /// Device configuration ([`crate::spec::BlkConfig`]).
    pub const DEVICE: u64 = 0x2000;
    /// Device configuration length.
    pub const DEVICE_LEN: u64 = 0x40;
    /// Notifications: queue `q` at `NOTIFY + q * NOTIFY_MULTIPLIER`.
    pub const NOTIFY: u64 = 0x3000;
    /// Bytes between two queues' notification addresses.
    pub const NOTIFY_MULTIPLIER: u32 = 4;
    /// BAR0 size.
    pub const BAR0_SIZE: u64 = 0x4000;
    /// BAR holding the MSI-X table (at 0) and PBA (at [`PBA_OFFSET`]).
    pub const MSIX_BAR: u8 = 4;
    /// PBA offset in [`MSIX_BAR`].
    pub const PBA_OFFSET: u64 = 0x1000;
    /// [`MSIX_BAR`] size.
    pub const MSIX_BAR_SIZE: u64 = 0x2000;
}

/// Worker threads per device for what may block (the `aio=threads` engine).
const POOL_THREADS: usize = 4;

/// Counters for `--stats`.
#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    read_bytes: AtomicU64,
    written_bytes: AtomicU64,
    errors: AtomicU64,
    notifies: AtomicU64,
    interrupts: AtomicU64,
}

/// Everything the device's threads share.
pub(crate) struct Shared {
    opts: BlkOptions,
    backend: Arc<dyn BlockBackend>,
    mem: GuestMem,
    pci: Mutex<PciFunction>,
    irq: Arc<Interrupts>,
    /// Feature negotiation, status and the selected-queue window.
    tr: Mutex<Transport>,
    /// Device status, readable without the transport lock.
    status: AtomicU8,
    /// Write-back cache on (`writeback` in the configuration space).
    writeback: AtomicBool,
    /// Pending ISR bits (read-to-clear).
    isr: AtomicU8,
    queues: Box<[Mutex<Vq>]>,
    /// Backend requests in flight, and a condition to wait for none.
    inflight: AtomicUsize,
    idle: (Mutex<()>, Condvar),
    threads: OnceLock<Vec<IoThread>>,
    counters: Counters,
    /// Paused for a snapshot: the available rings are not drained.
    paused: AtomicBool,
    /// Request latencies.
    latency: pci::LatencyHistogram,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock means a bug already panicked; the state stays usable, keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A virtio-blk device on a PCI function.
pub struct VirtioBlk {
    shared: Arc<Shared>,
    /// Offset of the VIRTIO_PCI_CAP_PCI_CFG capability in config space.
    pci_cfg_cap: usize,
}

impl VirtioBlk {
    /// Build the device and start its I/O threads.
    pub fn try_new(
        opts: BlkOptions,
        ctx: &DeviceContext,
        backend: Arc<dyn BlockBackend>,
    ) -> std::io::Result<Self> {
        let vectors = opts.queues + 1;
        let mut cs = ConfigSpace::new(
            spec::PCI_VENDOR_ID,
            spec::PCI_DEVICE_ID_BLOCK,
            0x01, // mass storage
            0x00, // SCSI, as other virtio-blk devices report
            0x00,
            0x01, // revision 1: a modern device
        );
        cs.set_subsystem(spec::PCI_VENDOR_ID, spec::PCI_SUBSYSTEM_ID);
        cs.add_bar(
            0,
            BarKind::Mem64 {
                prefetchable: false,
            },
            layout::BAR0_SIZE,
        );
        cs.add_bar(
            usize::from(layout::MSIX_BAR),
            BarKind::Mem32 {
                prefetchable: false,
            },
            layout::MSIX_BAR_SIZE,
        );
        if ctx.intx_supported {
            cs.set_interrupt_pin(1);
        }
        let pci_cfg_cap = transport::add_caps(&mut cs, opts.queues);
        let msix = caps::add_msix(
            &mut cs,
            vectors,
            layout::MSIX_BAR,
            0,
            layout::MSIX_BAR,
            layout::PBA_OFFSET as u32,
        );
        caps::add_pm(&mut cs);
        let pci = PciFunction::new(cs, None, Some(msix), ctx.irq.clone());
        let irq = pci.interrupts();
        let name = format!("vblk-{}", opts.serial);
        let pool = Arc::new(Executor::try_new(POOL_THREADS, &name)?);
        let (aio, iothreads, qsz) = (opts.aio, opts.iothreads, opts.qsz);
        let shared = Arc::new(Shared {
            queues: (0..opts.queues)
                .map(|i| Mutex::new(Vq::new(i, opts.qsz)))
                .collect(),
            tr: Mutex::new(Transport::default()),
            status: AtomicU8::new(0),
            writeback: AtomicBool::new(true),
            isr: AtomicU8::new(0),
            opts,
            backend,
            mem: ctx.mem.clone(),
            pci: Mutex::new(pci),
            irq,
            inflight: AtomicUsize::new(0),
            idle: (Mutex::new(()), Condvar::new()),
            threads: OnceLock::new(),
            counters: Counters::default(),
            paused: AtomicBool::new(false),
            latency: Default::default(),
        });
        let mut threads = Vec::new();
        for i in 0..usize::from(iothreads) {
            let engine = Engine::new(aio, u32::from(qsz), pool.clone())?;
            let handler: Weak<dyn block::IoHandler> = Arc::downgrade(&shared) as _;
            threads.push(IoThread::spawn(
                format!("{name}-io{i}"),
                i,
                engine,
                handler,
            )?);
        }
        let _ = shared.threads.set(threads);
        Ok(VirtioBlk {
            shared,
            pci_cfg_cap,
        })
    }

    /// The device's options.
    pub fn options(&self) -> &BlkOptions {
        &self.shared.opts
    }
}

impl VirtioBlk {
    /// An access to `pci_cfg_data` of the config-space window: the (BAR, offset, length) the
    /// driver selected, if it is one the window serves (length 1, 2 or 4, aligned to it).
    fn pci_cfg_access(&self, offset: u16, len: usize) -> Option<(u8, u64, usize)> {
        let at = self.pci_cfg_cap + 16;
        let (start, end) = (usize::from(offset), usize::from(offset) + len);
        if end <= at || start >= at + 4 {
            return None;
        }
        let pci = lock(&self.shared.pci);
        let mut b = [0u8; 12];
        pci.config_read(self.pci_cfg_cap + 4, &mut b);
        drop(pci);
        let bar = b[0];
        let off = u64::from(u32::from_le_bytes(b[4..8].try_into().expect("4")));
        let n = u32::from_le_bytes(b[8..12].try_into().expect("4")) as usize;
        (matches!(n, 1 | 2 | 4) && off.is_multiple_of(n as u64)).then_some((bar, off, n))
    }
}

/// Constructor for the device registry: parse options, open the image, build the device.
pub fn create(spec: &SlotSpec, ctx: &DeviceContext) -> Result<Box<dyn PciDevice>, ConfigError> {
    let opts = BlkOptions::from_spec(spec)?;
    let err = |msg: String| ConfigError::Device {
        device: spec.emul.clone(),
        msg,
    };
    let backend = block::open(&opts.backend).map_err(|e| err(e.to_string()))?;
    let dev = VirtioBlk::try_new(opts, ctx, backend)
        .map_err(|e| err(format!("cannot start I/O thread: {e}")))?;
    Ok(Box::new(dev))
}

impl PciDevice for VirtioBlk {
    fn name(&self) -> &str {
        NAME
    }

    fn config_read(&self, offset: u16, data: &mut [u8]) {
        lock(&self.shared.pci).config_read(usize::from(offset), data);
        if let Some(window) = self.pci_cfg_access(offset, data.len()) {
            let mut v = [0u8; 4];
            let (bar, off, len) = window;
            self.bar_read(bar, off, &mut v[..len]);
            let at = self.pci_cfg_cap + 16;
            for (i, b) in data.iter_mut().enumerate() {
                if let Some(k) = (usize::from(offset) + i)
                    .checked_sub(at)
                    .filter(|k| *k < len)
                {
                    *b = v[k];
                }
            }
        }
    }

    fn config_write(&self, offset: u16, data: &[u8]) {
        let was = self.shared.irq.bus_master();
        lock(&self.shared.pci).config_write(usize::from(offset), data);
        if let Some((bar, off, len)) = self.pci_cfg_access(offset, data.len()) {
            let mut v = [0u8; 4];
            lock(&self.shared.pci).config_read(self.pci_cfg_cap + 16, &mut v);
            self.bar_write(bar, off, &v[..len]);
        }
        if !was && self.shared.irq.bus_master() {
            // Bus mastering is back: serve what the driver queued meanwhile.
            for q in 0..self.shared.queues.len() {
                self.shared.notify(q as u16);
            }
        }
    }

    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) {
        match bar {
            0 if pci::bar_access_ok(offset, data.len(), layout::BAR0_SIZE) => {
                self.shared.read_bar0(offset, data)
            }
            layout::MSIX_BAR if pci::bar_access_ok(offset, data.len(), layout::MSIX_BAR_SIZE) => {
                lock(&self.shared.pci).msix_bar_read(offset, data, layout::PBA_OFFSET);
            }
            _ => data.fill(0xff),
        }
    }

    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) {
        match bar {
            0 if pci::bar_access_ok(offset, data.len(), layout::BAR0_SIZE) => {
                self.shared.write_bar0(offset, data)
            }
            layout::MSIX_BAR if pci::bar_access_ok(offset, data.len(), layout::MSIX_BAR_SIZE) => {
                lock(&self.shared.pci).msix_bar_write(offset, data, layout::PBA_OFFSET);
            }
            _ => {}
        }
    }

    fn bars(&self) -> Vec<BarInfo> {
        vec![
            BarInfo {
                index: 0,
                size: layout::BAR0_SIZE,
                kind: BarKind::Mem64 {
                    prefetchable: false,
                },
            },
            BarInfo {
                index: layout::MSIX_BAR,
                size: layout::MSIX_BAR_SIZE,
                kind: BarKind::Mem32 {
                    prefetchable: false,
                },
            },
        ]
    }

    fn shutdown(&self) {
        self.shared.wait_idle();
        if let Err(e) = self.shared.backend.flush() {
            log::error!(
                "virtio-blk {}: flush at shutdown failed: {e}",
                self.shared.opts.serial
            );
        }
    }

    fn stats(&self) -> Vec<(String, u64)> {
        let c = &self.shared.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("requests".into(), g(&c.requests)),
            ("bytes_read".into(), g(&c.read_bytes)),
            ("bytes_written".into(), g(&c.written_bytes)),
            ("errors".into(), g(&c.errors)),
            ("notifies".into(), g(&c.notifies)),
            ("interrupts".into(), g(&c.interrupts)),
        ]
        .into_iter()
        .chain(self.shared.latency.stats())
        .collect()
    }

    /// Each queue's notification address can be absorbed (token = queue index): the kick
    /// carries nothing the device needs beyond "look at queue q".
    fn ioevents(&self) -> Vec<IoEvent> {
        (0..self.shared.opts.queues)
            .map(|q| IoEvent {
                bar: 0,
                offset: layout::NOTIFY + u64::from(q) * u64::from(layout::NOTIFY_MULTIPLIER),
                datamatch: None,
                token: u32::from(q),
            })
            .collect()
    }

    fn kick(&self, token: u32) {
        if let Ok(q) = u16::try_from(token) {
            self.shared
                .counters
                .notifies
                .fetch_add(1, Ordering::Relaxed);
            self.shared.notify(q);
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
        let s: state::VirtioState = pci::state_from_json("virtio-blk", v)?;
        self.shared.restore(&s)
    }
}

/// Points where a test can run code inside the device (feature `test-support`).
#[cfg(feature = "test-support")]
#[doc(hidden)]
pub mod test_hooks {
    use std::cell::RefCell;

    /// A hook run once, on the thread that reaches its point.
    pub type Hook = Box<dyn FnOnce()>;

    thread_local! {
        /// Run when a queue was found broken, before it is reported (its lock released).
        pub static QUEUE_BROKEN: RefCell<Option<Hook>> = RefCell::new(None);
    }

    pub(crate) fn queue_broken() {
        if let Some(h) = QUEUE_BROKEN.with(|c| c.borrow_mut().take()) {
            h();
        }
    }
}
