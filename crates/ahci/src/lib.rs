//! rhyve's AHCI SATA controller: an AHCI 1.3.1 HBA with 1–32 ports, each with an ATA disk
//! (ACS-4, NCQ, TRIM, SMART, logs) or an ATAPI CD/DVD-ROM (MMC-6), behind a PCI function with a
//! memory ABAR in BAR5, MSI (one vector per port when granted) and INTx where the frontend has it.
//!
//! Lineage: FreeBSD bhyve's `pci_ahci.c` (configuration syntax, overall shape) and QEMU's AHCI;
//! the behaviour follows the specifications. Module map, lowest layer first: a module uses only
//! modules listed before it, except that `slot` and this root use each other.
//!
//! * [`regs`], [`fis`], `spec`: register map, in-memory structures (typed and size-checked) and
//!   the ATA/ATAPI opcode, status and sense tables; none imports anything else from the crate.
//! * [`drive`]: the device, with all the state the command sets keep in it.
//! * `plan`, `reply`: what a decoded command does, and the outputs commands complete with.
//! * `identify`, `logpage`, `atapi`, `ncq`, `ata`: the device command sets; `ata` decodes every
//!   command and hands queued and PACKET commands to `ncq` and `atapi`.
//! * `prdt`: scatter/gather over guest memory; `config`: bhyve option parsing.
//! * `hba`, `port`: register semantics, resets, interrupts.
//! * `slot`: command fetch, the I/O job per command, completion FISes.
//! * [`state`]: pause, save and restore for snapshots and migration.
//!
//! Threads and locks: register accesses run on the caller's thread and never wait for the disk.
//! Each port has its own lock (two ports never contend); the HBA's global registers have one
//! more, taken after a port's lock has been dropped (never the other way round), then the PCI
//! function. Data moves between guest memory and the disk through a [`block::Engine`]
//! (io_uring, or worker threads) on the port's I/O thread, with no bounce buffer.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod ata;
mod atapi;
mod config;
pub mod drive;
pub mod fis;
mod hba;
mod identify;
mod logpage;
mod ncq;
mod plan;
mod port;
mod prdt;
pub mod regs;
mod reply;
mod slot;
mod spec;
pub mod state;

#[cfg(test)]
mod testdrv;
#[cfg(test)]
mod tests;

use std::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64,
    Ordering::{Relaxed, SeqCst},
};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Instant;

use block::{Engine, Executor, IoDone, IoHandler, IoThread, Tick};
use pci::config::BarKind;
use pci::{
    caps, BarInfo, ConfigError, ConfigSpace, DataMatch, DeviceContext, GuestMem, Interrupts,
    IoEvent, PciDevice, PciFunction, SlotSpec,
};
use vm_memory::GuestAddressSpace;

pub use config::HbaOptions;
pub use drive::{DriveInfo, DriveKind};

use hba::{lock, Hba};
use port::Port;
use regs::hba as hreg;
use regs::port as preg;
use slot::PortState;

/// Emulation name on the command line.
pub const NAME: &str = "ahci";
/// One-port shorthands: `ahci-hd,disk.img` and `ahci-cd,image.iso`.
pub const ALIASES: &[&str] = &["ahci-hd", "ahci-cd"];

/// PCI vendor ID (Intel).
pub const VENDOR_ID: u16 = 0x8086;
/// PCI device ID: ICH8 AHCI. Linux's `ahci` binds AHCI controllers by class code; this ID carries
/// no quirks there.
pub const DEVICE_ID: u16 = 0x2821;
/// Class code: mass storage, SATA, AHCI 1.0 programming interface.
pub const CLASS: (u8, u8, u8) = (0x01, 0x06, 0x01);
/// Revision ID.
pub const REVISION: u8 = 0x02;
/// The ABAR is BAR5.
pub const ABAR: u8 = 5;
/// Worker threads per controller for blocking work (pool engine, verify, TRIM).
const POOL_THREADS: usize = 4;

/// Per-controller counters.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) commands: AtomicU64,
    pub(crate) read_bytes: AtomicU64,
    pub(crate) written_bytes: AtomicU64,
    pub(crate) errors: AtomicU64,
}

/// State shared by the register path, the I/O threads and the worker pool.
pub(crate) struct Shared {
    /// The HBA's global registers (taken with no port lock held).
    pub(crate) hba: Mutex<Hba>,
    /// The ports, each with its own lock.
    pub(crate) ports: Vec<Mutex<PortState>>,
    /// Bit per port: it has an enabled interrupt condition (PxIS & PxIE), kept current by
    /// [`PortGuard`] whenever a port's lock is released.
    pub(crate) pending: AtomicU32,
    /// A reset (HBA or link) waits for running commands to finish: requests to settle (an HBA
    /// reset to finish, links to bring up) are numbered, and `settled` is the highest request
    /// a finished settle had seen when it began. Both only grow, so a settle that began before
    /// a reset can never mark the reset's request done. (A flag, and then a counter reset to
    /// zero, both lost a reset that way: the counter when it came back to the value an older
    /// settle had read; GHC.HR then read 1 for ever.)
    pub(crate) settle_requested: AtomicU64,
    /// See [`Shared::settle_requested`].
    pub(crate) settled: AtomicU64,
    /// Paused for a snapshot: no command is fetched.
    pub(crate) paused: AtomicBool,
    /// Config space and interrupt delivery.
    pub(crate) func: Mutex<PciFunction>,
    /// Lock-free interrupt delivery.
    pub(crate) irq: Arc<Interrupts>,
    pub(crate) mem: GuestMem,
    pub(crate) pool: Arc<Executor>,
    pub(crate) threads: OnceLock<Vec<IoThread>>,
    pub(crate) stats: Stats,
    /// Command latencies.
    pub(crate) latency: pci::LatencyHistogram,
    /// Port index → drive description (also held by each port).
    pub(crate) drives: Vec<Arc<DriveInfo>>,
    pub(crate) me: Weak<Shared>,
}

/// A locked port; releasing it publishes the port's interrupt condition to the HBA.
pub(crate) struct PortGuard<'a> {
    g: MutexGuard<'a, PortState>,
    pending: &'a AtomicU32,
    bit: u32,
}

impl std::ops::Deref for PortGuard<'_> {
    type Target = PortState;
    fn deref(&self) -> &PortState {
        &self.g
    }
}

impl std::ops::DerefMut for PortGuard<'_> {
    fn deref_mut(&mut self) -> &mut PortState {
        &mut self.g
    }
}

impl Drop for PortGuard<'_> {
    fn drop(&mut self) {
        if self.g.port.pending_irq() != 0 {
            self.pending.fetch_or(self.bit, Relaxed);
        } else {
            self.pending.fetch_and(!self.bit, Relaxed);
        }
    }
}

impl Shared {
    /// Lock port `i`.
    pub(crate) fn port(&self, i: usize) -> PortGuard<'_> {
        PortGuard {
            g: lock(&self.ports[i]),
            pending: &self.pending,
            bit: 1 << i,
        }
    }

    /// The I/O thread serving port `pidx`.
    pub(crate) fn thread_of(&self, pidx: usize) -> usize {
        pidx % self.threads.get().map_or(1, |t| t.len().max(1))
    }

    /// The engine serving port `pidx`.
    pub(crate) fn engine(&self, pidx: usize) -> &Engine {
        self.threads.get().expect("threads start with the HBA")[self.thread_of(pidx)].engine()
    }

    /// Fold the ports' interrupt conditions into IS and signal.
    pub(crate) fn update_irq(&self) {
        let pending = self.pending.load(Relaxed);
        lock(&self.hba).update_irq(pending, &self.irq, &self.func);
    }

    /// Submit queued requests, complete what is already done on this thread, then interrupts.
    pub(crate) fn run_work(&self, mut work: slot::Work) {
        let mut done = Vec::new();
        for _ in 0..64 {
            let engines = std::mem::take(&mut work.engines);
            if engines == 0 {
                break;
            }
            for (i, t) in self.threads.get().into_iter().flatten().enumerate() {
                if engines & (1 << (i % 64)) != 0 {
                    t.engine().commit_and_reap(&mut done);
                }
            }
            if done.is_empty() {
                break;
            }
            self.complete_batch(&mut done, &mut work);
        }
        if work.engines != 0 {
            // Still going after a bounded number of passes (a transfer of many chunks): the
            // I/O threads take over, or what their engines finished would sit unreaped.
            for (i, t) in self.threads.get().into_iter().flatten().enumerate() {
                if work.engines & (1 << (i % 64)) != 0 {
                    t.wake();
                }
            }
        }
        if self.settle_wanted() {
            self.settle();
        }
        self.update_irq();
    }

    /// Ask for a settle (an HBA reset, a COMRESET released).
    pub(crate) fn request_settle(&self) {
        self.settle_requested.fetch_add(1, SeqCst);
    }

    /// A settle request is not done yet.
    pub(crate) fn settle_wanted(&self) -> bool {
        self.settle_requested.load(SeqCst) > self.settled.load(SeqCst)
    }

    /// GHC.HR: every port resets; GHC.HR reads 1 until running commands finish.
    pub(crate) fn hba_reset(&self) {
        {
            let mut hba = lock(&self.hba);
            hba.ghc = 0;
            hba.is = 0;
            hba.reset_pending = true;
        }
        for i in 0..self.ports.len() {
            let mut ps = self.port(i);
            ps.port.hba_reset();
            ps.port.info.flush_failed.store(false, Relaxed);
        }
        self.request_settle();
    }

    /// Complete reaped requests, one port lock per run of requests on the same port.
    fn complete_batch(&self, done: &mut Vec<IoDone>, work: &mut slot::Work) {
        let mut i = 0;
        while i < done.len() {
            let pidx = slot::port_of(done[i].req.tag);
            if pidx >= self.ports.len() {
                i += 1;
                continue;
            }
            let mut ps = self.port(pidx);
            while i < done.len() && slot::port_of(done[i].req.tag) == pidx {
                let d = &mut done[i];
                let mut r = slot::io_result(d, &ps);
                let durable =
                    d.req.op == block::Op::Flush || (d.req.op == block::Op::Write && d.req.fua);
                let info = Arc::clone(&ps.port.info);
                if durable {
                    if d.result.is_err() {
                        info.flush_failed.store(true, Relaxed);
                    } else if info.flush_failed.load(Relaxed) && r == plan::IoResult::Ok {
                        // A failed flush may have lost data: keep saying so until reset.
                        r = plan::IoResult::WriteError { lba: 0 };
                    }
                }
                let iov = std::mem::take(&mut d.req.iov);
                slot::complete(self, &mut ps, d.req.tag, r, Some(iov), work);
                i += 1;
            }
        }
        done.clear();
    }

    /// A blocking job of command `t` finished with `r`.
    pub(crate) fn complete_result(&self, t: u64, r: plan::IoResult, iov: Option<block::GuestIov>) {
        let pidx = slot::port_of(t);
        if pidx >= self.ports.len() {
            return;
        }
        let mut work = slot::Work::default();
        {
            let mut ps = self.port(pidx);
            slot::complete(self, &mut ps, t, r, iov, &mut work);
        }
        self.run_work(work);
    }

    /// Finish an HBA reset once no port has a command running, and bring up links whose
    /// reset waits for their port to drain.
    pub(crate) fn settle(&self) {
        let requests = self.settle_requested.load(SeqCst);
        let mut all_idle = true;
        let mut any_waiting = false;
        for i in 0..self.ports.len() {
            let ps = self.port(i);
            all_idle &= ps.port.in_flight == 0;
            any_waiting |= ps.port.link_pending;
        }
        {
            let mut hba = lock(&self.hba);
            if hba.reset_pending {
                if !all_idle {
                    return;
                }
                hba.reset_pending = false;
            }
        }
        let iss = lock(&self.hba).iss();
        let mem = self.mem.memory();
        let mut work = slot::Work::default();
        let mut still = false;
        for i in 0..self.ports.len() {
            let mut ps = self.port(i);
            if ps.port.link_pending {
                if ps.port.in_flight == 0 {
                    ps.port.finish_link_reset(&mem, iss);
                    slot::kick(self, &mut ps, i, &mut work);
                } else {
                    still = true;
                }
            }
        }
        let _ = any_waiting;
        #[cfg(test)]
        if let Some(hook) = tests::BEFORE_SETTLED.with(|h| h.borrow_mut().take()) {
            hook(self);
        }
        if !still {
            // Done only up to what this settle saw: a request made meanwhile stays for the next.
            self.settled.fetch_max(requests, SeqCst);
        }
        if work.engines != 0 {
            self.run_work(work);
        }
    }

    /// Kick every port (Bus Master Enable came back, or a pause ended).
    pub(crate) fn kick_all(&self) {
        let mut work = slot::Work::default();
        for i in 0..self.ports.len() {
            let mut ps = self.port(i);
            slot::kick(self, &mut ps, i, &mut work);
        }
        self.run_work(work);
    }
}

impl IoHandler for Shared {
    fn completions(&self, _thread: usize, done: &mut Vec<IoDone>) {
        let mut work = slot::Work::default();
        self.complete_batch(done, &mut work);
        self.run_work(work);
    }

    fn tick(&self, _thread: usize, _now: Instant) -> Tick {
        Tick::Idle
    }
}

/// An AHCI controller.
pub struct Ahci {
    shared: Arc<Shared>,
    bar_size: u64,
}

impl std::fmt::Debug for Ahci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ahci")
            .field("ports", &self.shared.drives)
            .finish()
    }
}

/// Build an AHCI controller from a `-s` slot specification (`ahci`, `ahci-hd` or `ahci-cd`).
pub fn create(spec: &SlotSpec, ctx: &DeviceContext) -> Result<Box<dyn PciDevice>, ConfigError> {
    let (ports, hopts) = config::parse(spec)?;
    let drives = ports
        .iter()
        .enumerate()
        .map(|(i, p)| config::open(&spec.emul, i, p))
        .collect::<Result<Vec<_>, _>>()?;
    let dev = Ahci::with_options(drives, ctx, hopts).map_err(|e| ConfigError::Device {
        device: spec.emul.clone(),
        msg: format!("cannot start I/O thread: {e}"),
    })?;
    Ok(Box::new(dev))
}

impl Ahci {
    /// A controller with one port per drive (1–32 drives), default engine and one I/O thread.
    ///
    /// # Panics
    /// If `drives` is empty or has more than 32 entries (a caller bug; [`create`] checks), or an
    /// I/O thread cannot start.
    pub fn new(drives: Vec<DriveInfo>, ctx: &DeviceContext) -> Ahci {
        Self::with_options(drives, ctx, config::HbaOptions::default())
            .unwrap_or_else(|e| panic!("AHCI: cannot start I/O thread: {e}"))
    }

    /// A controller with one port per drive, with engine and thread options.
    pub fn with_options(
        drives: Vec<DriveInfo>,
        ctx: &DeviceContext,
        opts: config::HbaOptions,
    ) -> std::io::Result<Ahci> {
        assert!(
            (1..=hreg::MAX_PORTS).contains(&drives.len()),
            "AHCI needs 1 to 32 ports"
        );
        let n = drives.len();
        let drives: Vec<Arc<DriveInfo>> = drives.into_iter().map(Arc::new).collect();
        let ports = drives
            .iter()
            .map(|d| Mutex::new(PortState::new(Port::new(Arc::clone(d)))))
            .collect();

        let (class, subclass, prog_if) = CLASS;
        let mut cfg = ConfigSpace::new(VENDOR_ID, DEVICE_ID, class, subclass, prog_if, REVISION);
        if ctx.intx_supported {
            cfg.set_interrupt_pin(1);
        }
        let bar_size = (hreg::PORT_BASE + n as u64 * hreg::PORT_STRIDE)
            .next_power_of_two()
            .max(0x1000);
        cfg.add_bar(
            usize::from(ABAR),
            BarKind::Mem32 {
                prefetchable: false,
            },
            bar_size,
        );
        let log2_vectors = n.next_power_of_two().trailing_zeros() as u8;
        let msi = caps::add_msi(&mut cfg, log2_vectors);
        caps::add_pm(&mut cfg);
        let func = PciFunction::new(cfg, Some(msi), None, Arc::clone(&ctx.irq));
        let irq = func.interrupts();
        let pool = Arc::new(Executor::try_new(POOL_THREADS, "ahci-pool")?);
        let shared = Arc::new_cyclic(|me| Shared {
            hba: Mutex::new(Hba::new(n)),
            ports,
            pending: AtomicU32::new(0),
            settle_requested: AtomicU64::new(1),
            settled: AtomicU64::new(0),
            paused: AtomicBool::new(false),
            func: Mutex::new(func),
            irq,
            mem: ctx.mem.clone(),
            pool: pool.clone(),
            threads: OnceLock::new(),
            stats: Stats::default(),
            latency: Default::default(),
            drives,
            me: me.clone(),
        });
        let mut threads = Vec::new();
        for i in 0..opts.iothreads.clamp(1, n) {
            let engine = Engine::new(opts.aio, 64, pool.clone())?;
            let handler: Weak<dyn IoHandler> = Arc::downgrade(&shared) as _;
            threads.push(IoThread::spawn(format!("ahci-io{i}"), i, engine, handler)?);
        }
        let _ = shared.threads.set(threads);
        // Power-on: the HBA comes out of reset with every link trained (no staggered spin-up).
        shared.settle();
        Ok(Ahci { shared, bar_size })
    }

    fn read32(&self, off: u64) -> u32 {
        let sh = &self.shared;
        if off < hreg::PORT_BASE {
            return lock(&sh.hba).read_global(off, &sh.irq);
        }
        let p = ((off - hreg::PORT_BASE) / hreg::PORT_STRIDE) as usize;
        if p >= sh.ports.len() {
            return 0;
        }
        sh.port(p)
            .port
            .read((off - hreg::PORT_BASE) % hreg::PORT_STRIDE)
    }

    /// Offset of port `p`'s PxCI in the ABAR.
    fn ci_offset(p: u32) -> u64 {
        hreg::PORT_BASE + u64::from(p) * hreg::PORT_STRIDE + preg::CI
    }

    fn write32(&self, off: u64, val: u32, mask: u32, work: &mut slot::Work) {
        let sh = &self.shared;
        if off < hreg::PORT_BASE {
            let pending = sh.pending.load(Relaxed);
            let fx = lock(&sh.hba).write_global(off, val, mask, pending, &sh.irq, &sh.func);
            if fx.reset {
                sh.hba_reset();
            }
            return;
        }
        let p = ((off - hreg::PORT_BASE) / hreg::PORT_STRIDE) as usize;
        if p >= sh.ports.len() {
            return;
        }
        let cap = lock(&sh.hba).cap;
        let mut ps = sh.port(p);
        let fx = ps
            .port
            .write((off - hreg::PORT_BASE) % hreg::PORT_STRIDE, val, mask, cap);
        if fx.kick {
            slot::kick(sh, &mut ps, p, work);
        }
        drop(ps);
        if fx.settle {
            sh.request_settle();
        }
    }
}

impl PciDevice for Ahci {
    fn name(&self) -> &str {
        NAME
    }

    fn config_read(&self, offset: u16, data: &mut [u8]) {
        lock(&self.shared.func).config_read(usize::from(offset), data);
    }

    fn config_write(&self, offset: u16, data: &[u8]) {
        let was = self.shared.irq.bus_master();
        lock(&self.shared.func).config_write(usize::from(offset), data);
        if !was && self.shared.irq.bus_master() {
            self.shared.kick_all(); // Bus Master Enable is back: fetching resumes
        }
    }

    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) {
        if bar != ABAR || !pci::bar_access_ok(offset, data.len(), self.bar_size) {
            data.fill(0xff);
            return;
        }
        let mut cached: Option<(u64, u32)> = None;
        for (i, b) in data.iter_mut().enumerate() {
            let off = offset + i as u64;
            let dw = off & !3;
            let v = match cached {
                Some((d, v)) if d == dw => v,
                _ => {
                    let v = self.read32(dw);
                    cached = Some((dw, v));
                    v
                }
            };
            *b = (v >> ((off & 3) * 8)) as u8;
        }
    }

    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) {
        if bar != ABAR || !pci::bar_access_ok(offset, data.len(), self.bar_size) {
            return;
        }
        // Gather the bytes into (dword, value, byte-mask) writes, applied in address order.
        let mut writes: Vec<(u64, u32, u32)> = Vec::new();
        for (i, &b) in data.iter().enumerate() {
            let off = offset + i as u64;
            let (dw, shift) = (off & !3, (off & 3) * 8);
            match writes.last_mut() {
                Some((d, v, m)) if *d == dw => {
                    *v |= u32::from(b) << shift;
                    *m |= 0xff << shift;
                }
                _ => writes.push((dw, u32::from(b) << shift, 0xff << shift)),
            }
        }
        let mut work = slot::Work::default();
        for (dw, v, m) in writes {
            self.write32(dw, v, m, &mut work);
        }
        self.shared.run_work(work);
    }

    fn bars(&self) -> Vec<BarInfo> {
        vec![BarInfo {
            index: ABAR,
            size: self.bar_size,
            kind: BarKind::Mem32 {
                prefetchable: false,
            },
        }]
    }

    fn shutdown(&self) {
        let sh = &self.shared;
        while (0..sh.ports.len()).any(|i| sh.port(i).port.in_flight > 0) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        for be in sh
            .drives
            .iter()
            .filter(|d| !d.read_only)
            .filter_map(|d| d.backend.as_ref())
        {
            if let Err(e) = be.flush() {
                ::log::warn!("ahci: flush at shutdown failed: {e}");
            }
        }
    }

    fn stats(&self) -> Vec<(String, u64)> {
        let s = &self.shared.stats;
        let interrupts = lock(&self.shared.hba).interrupts;
        let in_flight: u32 = (0..self.shared.ports.len())
            .map(|i| self.shared.port(i).port.in_flight)
            .sum();
        vec![
            ("commands".into(), s.commands.load(Relaxed)),
            ("in_flight".into(), u64::from(in_flight)),
            ("read_bytes".into(), s.read_bytes.load(Relaxed)),
            ("written_bytes".into(), s.written_bytes.load(Relaxed)),
            ("errors".into(), s.errors.load(Relaxed)),
            ("interrupts".into(), interrupts),
        ]
        .into_iter()
        .chain(self.shared.latency.stats())
        .collect()
    }

    /// PxCI is write-1-to-set and drivers issue one command per write (`1 << slot`), so every
    /// port gets one datamatch registration per command slot: token = `port << 8 | slot`. Writes
    /// of other values (several slots at once) still arrive as `bar_write`. PxSACT is not
    /// absorbed: an NCQ command's PxSACT write must reach the HBA before its PxCI write, and the
    /// synchronous access guarantees that (kicks are delivered before later accesses).
    fn ioevents(&self) -> Vec<IoEvent> {
        let ports = self.shared.drives.len() as u32;
        (0..ports)
            .flat_map(|port| {
                (0..hba::SLOTS).map(move |slot| IoEvent {
                    bar: ABAR,
                    offset: Self::ci_offset(port),
                    datamatch: Some(DataMatch::U32(1 << slot)),
                    token: (port << 8) | slot,
                })
            })
            .collect()
    }

    /// An absorbed PxCI write of `1 << slot`: replay it.
    fn kick(&self, token: u32) {
        let (port, slot) = (token >> 8, token & 0xff);
        self.bar_write(ABAR, Self::ci_offset(port), &(1u32 << slot).to_le_bytes());
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
        let s: state::AhciState = pci::state_from_json("ahci", v)?;
        self.shared.restore(&s)
    }
}
