//! The controller: its state, the register file, enable/reset/shutdown, the admin queue,
//! asynchronous events and interrupt delivery.
//!
//! **Locking.** There is no controller-wide lock on the I/O path.
//! * `ctrl` guards the register file and everything admin: the admin queues, features, logs,
//!   AER state. Register accesses and admin commands take it; I/O never does, except to report an
//!   error (error log, asynchronous event) after it has dropped its own lock.
//! * Each I/O completion queue and the SQs bound to it form a [`Group`] with its own lock; a
//!   doorbell, a fetch, a backend completion or a coalescing timer of one queue pair takes only
//!   that lock. Lock order: `ctrl`, then a group, then the PCI function.
//! * Hot-path facts that admin commands change (ready, fatal, shadow doorbells, the write cache,
//!   coalescing) are atomics, and interrupts go out through the lock-free [`Interrupts`].
//!
//! **Reset and shutdown never block the caller.** CC.EN 1→0 tears the queues down at once (later
//! completions of their commands are recognised as stale and dropped) and reports CSTS.RDY=0
//! only when the last backend request of the old queues has finished, so no DMA or CQE reaches
//! memory the host has reclaimed. CC.SHN queues one flush on the worker pool; a newer request
//! supersedes an older one, so SHST always reports the latest.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock, Weak};
use std::time::Instant;

use block::{Engine, Executor, IoThread};
use pci::{GuestMem, InterruptMode, Interrupts, PciFunction};
use vm_memory::GuestAddressSpace;

use crate::config::CtrlConfig;
use crate::error::RateLimit;
use crate::features::Features;
use crate::logpage::Logs;
use crate::namespace::Namespace;
use crate::queue::{make_cqe, CompQueue, Group, SubQueue};
use crate::spec::dw::{AerDw0, Aqa, Cap, Cc, Csts};
use crate::spec::{aer, cc, csts, reg, Sqe, Status};

/// Per-controller counters for `--stats` and the SMART log.
#[derive(Debug, Default)]
pub struct Counters {
    /// Read and Compare/Verify commands completed.
    pub read_cmds: AtomicU64,
    /// Write commands completed.
    pub write_cmds: AtomicU64,
    /// Bytes read by the host.
    pub bytes_read: AtomicU64,
    /// Bytes written by the host.
    pub bytes_written: AtomicU64,
    /// Interrupt messages sent.
    pub interrupts: AtomicU64,
    /// Media and data-integrity errors reported.
    pub media_errors: AtomicU64,
    /// Admin commands fetched.
    pub admin_cmds: AtomicU64,
    /// MMIO doorbell writes received.
    pub doorbells: AtomicU64,
    /// Shadow-doorbell polls that found new submissions.
    pub polled: AtomicU64,
    /// Most commands ever in flight at once (bounded by `io::MAX_INFLIGHT`).
    pub inflight_peak: AtomicU64,
}

/// A command whose completion is held back: Abort waiting on its target.
#[derive(Debug, Clone, Copy)]
pub struct HeldAbort {
    /// CID of the Abort command.
    pub abort_cid: u16,
    /// SQ of the command to abort.
    pub target_sqid: u16,
    /// CID of the command to abort.
    pub target_cid: u16,
}

/// An asynchronous event (Base 2.0 Figure 150): type, information, associated log page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsyncEvent {
    /// Asynchronous Event Type.
    pub typ: u8,
    /// Asynchronous Event Information.
    pub info: u8,
    /// Log page the host reads to clear it.
    pub lid: u8,
}

impl AsyncEvent {
    /// Completion DW0 of the AER that reports it.
    pub fn dw0(&self) -> u32 {
        AerDw0::new()
            .with_typ(self.typ)
            .with_info(self.info)
            .with_lid(self.lid)
            .into_bits()
    }
}

/// Register file and admin state, under the `ctrl` lock.
pub struct Ctrl {
    /// Controller Configuration.
    pub cc: u32,
    /// CSTS.RDY and SHST (CFS lives in [`Shared::flags`]).
    pub csts: u32,
    /// Admin Queue Attributes.
    pub aqa: u32,
    /// Admin SQ base.
    pub asq: u64,
    /// Admin CQ base.
    pub acq: u64,
    /// The admin SQ and CQ.
    pub admin: Group,
    /// Feature values.
    pub features: Features,
    /// Error and changed-namespace logs.
    pub logs: Logs,
    /// Outstanding Asynchronous Event Request CIDs.
    pub aer_cids: Vec<u16>,
    /// Events waiting for an AER.
    pub aer_pending: Vec<AsyncEvent>,
    /// Event types masked until the host reads their log page.
    pub aer_masked: [bool; 8],
    /// Aborts waiting for their target command to finish.
    pub held_aborts: Vec<HeldAbort>,
    /// Host-set timestamp (ms) and when it was set.
    pub timestamp: Option<(u64, Instant)>,
    /// Doorbell Buffer Config: (shadow doorbell base, EventIdx base), I/O queues only.
    pub dbbuf: Option<(u64, u64)>,
    /// CC.EN went 0: waiting for the old queues' requests before CSTS.RDY clears.
    pub resetting: bool,
    /// Bumped by every shutdown notification; SHST reports the latest only.
    pub shutdown_seq: u64,
}

/// Hot-path flags ([`Shared::flags`]).
pub mod flag {
    /// Enabled and not resetting: doorbells are processed.
    pub const ACCEPTING: u32 = 1 << 0;
    /// Controller Fatal Status: nothing is fetched until reset.
    pub const FATAL: u32 = 1 << 1;
    /// Shadow doorbells are configured.
    pub const SHADOW: u32 = 1 << 2;
    /// Fetching stopped at `io::MAX_INFLIGHT`; the next completion resumes it.
    pub const STARVED: u32 = 1 << 3;
    /// Paused for a snapshot: nothing is fetched; doorbells only record their tails.
    pub const PAUSED: u32 = 1 << 4;
}

/// Everything the controller shares between the register path, the I/O path and its threads.
pub struct Shared {
    /// Configuration.
    pub cfg: CtrlConfig,
    /// Guest memory.
    pub mem: GuestMem,
    /// Config space and the MSI-X table (accessed only by config/table writes).
    pub pci: Mutex<PciFunction>,
    /// Lock-free interrupt delivery.
    pub irq: Arc<Interrupts>,
    /// Register file and admin state.
    pub ctrl: Mutex<Ctrl>,
    /// Namespaces (read on the I/O path; Format changes them).
    pub ns: RwLock<Vec<Namespace>>,
    /// I/O queue groups, indexed by CQ ID (index 0 is unused: the admin queues live in `ctrl`).
    pub groups: Box<[Mutex<Group>]>,
    /// SQ ID → the CQ ID it posts to (0 = no such SQ).
    pub sq_cq: Box<[AtomicU16]>,
    /// CQ ID → it has entries the host has not consumed and interrupts enabled (INTx level).
    pub cq_assert: Box<[AtomicBool]>,
    /// CQ ID → its interrupt is held (a coalescing deadline is set).
    pub cq_held: Box<[AtomicBool]>,
    /// [`flag`] bits.
    pub flags: AtomicU32,
    /// Shadow doorbell and EventIdx buffer addresses.
    pub shadow: (AtomicU64, AtomicU64),
    /// Volatile Write Cache enabled (writes are flushed before completing when it is off).
    pub volatile_wc: AtomicBool,
    /// Interrupt Coalescing feature value (08h).
    pub coalescing: AtomicU32,
    /// Interrupt Vector Configuration: Coalescing Disable, per vector.
    pub vector_cd: Box<[AtomicBool]>,
    /// INTMS (MSI/INTx vector mask).
    pub intms: AtomicU32,
    /// Commands (and blocking jobs) in flight on backends.
    pub inflight: AtomicUsize,
    /// Signalled when `inflight` drops to zero and somebody waits.
    pub idle: (Mutex<usize>, Condvar),
    /// Source of queue epochs.
    pub epoch: AtomicU16,
    /// I/O threads (one engine each).
    pub threads: OnceLock<Vec<IoThread>>,
    /// Worker pool for blocking work (pool engines, Compare/Verify, Format, shutdown).
    pub pool: Arc<Executor>,
    /// A shutdown flush is queued or running.
    pub shutdown_running: AtomicBool,
    /// Counters.
    pub counters: Counters,
    /// I/O command latencies.
    pub latency: pci::LatencyHistogram,
    /// When the controller was created (power-on time, timestamps).
    pub started: Instant,
    /// A handle to ourselves, for work that outlives a call.
    pub me: Weak<Shared>,
    /// Lifetime SMART counters.
    pub smart: crate::smart::SmartStore,
    /// The store last recorded a clean shutdown.
    pub smart_clean: AtomicBool,
}

/// Outcome of executing an admin command.
pub enum Outcome {
    /// Post this completion now.
    Done(Status, u32),
    /// The completion is posted later (AER, held Abort, Delete SQ draining, Format erase).
    Deferred,
}

impl Outcome {
    /// A status without command-specific DW0.
    pub fn status(s: Status) -> Self {
        Outcome::Done(s, 0)
    }
}

thread_local! {
    /// The I/O thread index of this thread, if it is one.
    pub(crate) static CURRENT: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
    /// This I/O thread's own work asked for a wake-up (a deadline or polling window set while
    /// it was already past deciding when to run next).
    pub(crate) static AGAIN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Ask the current I/O thread to run its tick again at once.
pub(crate) fn again() {
    AGAIN.with(|a| a.set(true));
}

/// The I/O thread index the current thread is, if it is one.
pub(crate) fn current_thread() -> Option<usize> {
    CURRENT.with(std::cell::Cell::get)
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock means a bug already panicked; the state stays usable, keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Deferred work collected while a group lock is held and carried out after it is dropped.
#[derive(Default)]
pub struct Work {
    /// I/O threads whose engines got submissions (bit per thread).
    pub engines: u64,
    /// I/O threads to wake (new deadline or polling window).
    pub wake: u64,
    /// CQs whose I/O thread must learn of a (new or earlier) coalescing deadline, if the
    /// interrupt is still held once the lock is dropped. A window opened and closed within one
    /// doorbell (a host that takes a full batch) costs no wake-up.
    pub held: Vec<u16>,
    /// Vectors to interrupt.
    pub irqs: Vec<u16>,
    /// Asynchronous events to report.
    pub events: Vec<AsyncEvent>,
    /// Failed commands for the error log.
    pub errors: Vec<(u16, Sqe, Status)>,
    /// Admin completions decided off the admin path (Delete SQ after draining, Format erase):
    /// (admin queue epoch, cid, status, dw0). Posted only if the admin queue is still the one
    /// the command came from.
    pub admin_done: Vec<(u16, u16, Status, u32)>,
    /// Commands that finished while an Abort waited for them: (sqid, cid).
    pub aborts_done: Vec<(u16, u16)>,
    /// The controller must fail (CFS).
    pub fatal: Option<&'static str>,
    /// `inflight` reached zero.
    pub idle: bool,
    /// Room under the in-flight limit again: fetch from every queue.
    pub refetch: bool,
    /// Some CQ's INTx condition may have changed.
    pub intx: bool,
}

impl Shared {
    /// Lock the register file and admin state.
    pub fn lock(&self) -> MutexGuard<'_, Ctrl> {
        lock(&self.ctrl)
    }

    pub(crate) fn lock_pci(&self) -> MutexGuard<'_, PciFunction> {
        lock(&self.pci)
    }

    /// The I/O group of CQ `cqid`.
    pub fn group(&self, cqid: u16) -> MutexGuard<'_, Group> {
        lock(&self.groups[usize::from(cqid)])
    }

    /// Current hot-path flags.
    pub fn flag(&self, f: u32) -> bool {
        self.flags.load(Ordering::Acquire) & f != 0
    }

    /// Memory page size from CC.MPS.
    pub fn page_size(c: &Ctrl) -> u64 {
        1 << (12 + Cc::from_bits(c.cc).mps())
    }

    /// The CAP register.
    pub fn cap(&self) -> u64 {
        Cap::new()
            .with_mqes((self.cfg.qsz - 1) as u16)
            .with_cqr(true) // queues must be physically contiguous
            .with_to(0x0f) // 7.5 s
            .with_css(1) // the NVM command set
            .with_mpsmax(4) // 64 KiB (MPSMIN is 4 KiB)
            .into_bits()
    }

    /// The I/O thread serving completion queue `cqid`.
    pub fn thread_of(&self, cqid: u16) -> usize {
        usize::from(cqid) % usize::from(self.cfg.iothreads)
    }

    /// The engine serving completion queue `cqid` (admin: thread 0's).
    pub fn engine(&self, cqid: u16) -> &Engine {
        self.threads
            .get()
            .expect("threads start with the controller")[self.thread_of(cqid)]
        .engine()
    }

    /// The admin queue's epoch (0 while disabled).
    pub fn admin_epoch(c: &Ctrl) -> u16 {
        c.admin.sqs.first().map_or(0, |s| s.epoch)
    }

    /// A fresh queue epoch.
    pub fn next_epoch(&self) -> u16 {
        self.epoch.fetch_add(1, Ordering::Relaxed)
    }

    // ---- register file ----

    /// Guest read of BAR0.
    pub fn read_bar0(&self, offset: u64, data: &mut [u8]) {
        if offset >= reg::DOORBELL_BASE {
            data.fill(0); // doorbells read as zero
            return;
        }
        let c = self.lock();
        for (i, b) in data.iter_mut().enumerate() {
            let off = offset + i as u64;
            let dword = self.read_dword(&c, off & !3);
            *b = dword.to_le_bytes()[(off & 3) as usize];
        }
    }

    fn read_dword(&self, c: &Ctrl, off: u64) -> u32 {
        let cap = self.cap();
        match off {
            reg::CAP => cap as u32,
            0x04 => (cap >> 32) as u32,
            reg::VS => crate::NVME_VERSION,
            reg::INTMS | reg::INTMC => self.intms.load(Ordering::Relaxed),
            reg::CC => c.cc,
            reg::CSTS => {
                let cfs = if self.flag(flag::FATAL) { csts::CFS } else { 0 };
                c.csts | cfs
            }
            reg::AQA => c.aqa,
            reg::ASQ => c.asq as u32,
            0x2c => (c.asq >> 32) as u32,
            reg::ACQ => c.acq as u32,
            0x34 => (c.acq >> 32) as u32,
            _ => 0,
        }
    }

    /// Guest write to BAR0: any width, any alignment. Each touched dword is merged and applied.
    pub fn write_bar0(&self, offset: u64, data: &[u8]) {
        let mut i = 0;
        while i < data.len() {
            let off = offset + i as u64;
            let base = off & !3;
            let start = (off - base) as usize;
            let n = (4 - start).min(data.len() - i);
            let cur = if base >= reg::DOORBELL_BASE {
                0
            } else {
                self.read_dword(&self.lock(), base)
            };
            let mut bytes = cur.to_le_bytes();
            bytes[start..start + n].copy_from_slice(&data[i..i + n]);
            let mask = if n == 4 {
                u32::MAX
            } else {
                (((1u64 << (8 * n)) - 1) << (8 * start)) as u32
            };
            self.write_dword(base, u32::from_le_bytes(bytes), mask);
            i += n;
        }
    }

    fn write_dword(&self, off: u64, val: u32, mask: u32) {
        if off >= reg::DOORBELL_BASE {
            self.doorbell(off, val);
            return;
        }
        match off {
            reg::INTMS | reg::INTMC => {
                if self.irq.mode() == InterruptMode::MsiX {
                    return; // INTMS/INTMC are not used with MSI-X (§3.1.3.3)
                }
                let bits = val & mask;
                if off == reg::INTMS {
                    self.intms.fetch_or(bits, Ordering::AcqRel);
                } else {
                    self.intms.fetch_and(!bits, Ordering::AcqRel);
                    self.raise_unmasked(bits);
                }
                self.update_intx();
            }
            reg::CC => {
                let c = self.lock();
                self.write_cc(c, val & cc::WRITABLE);
            }
            reg::CSTS | reg::NSSR => {} // NSSR not supported (CAP.NSSRS=0)
            _ => {
                let mut c = self.lock();
                match off {
                    reg::AQA => c.aqa = val & 0x0fff_0fff,
                    reg::ASQ => c.asq = (c.asq & !0xffff_ffff) | u64::from(val & !0xfff),
                    0x2c => c.asq = (c.asq & 0xffff_ffff) | (u64::from(val) << 32),
                    reg::ACQ => c.acq = (c.acq & !0xffff_ffff) | u64::from(val & !0xfff),
                    0x34 => c.acq = (c.acq & 0xffff_ffff) | (u64::from(val) << 32),
                    _ => log::debug!("nvme: write to reserved register {off:#x} ignored"),
                }
            }
        }
    }

    fn write_cc(&self, mut c: MutexGuard<'_, Ctrl>, new: u32) {
        let (old, new_cc) = (Cc::from_bits(c.cc), Cc::from_bits(new));
        // CC fields other than EN and SHN may only change while disabled.
        c.cc = if old.en() {
            old.with_en(new_cc.en()).with_shn(new_cc.shn()).into_bits()
        } else {
            new
        };
        if new_cc.shn() == 0 && old.shn() != 0 {
            c.csts &= !csts::SHST_MASK; // the host withdrew the shutdown notification
        }
        if old.en() && !new_cc.en() {
            self.reset(&mut c, new);
            return;
        }
        if !old.en() && new_cc.en() && !c.resetting {
            self.enable(&mut c);
        }
        // A notification is a write of SHN: a change from 00b, or one in the write that enables
        // the controller (SHN may already have held a value written while it was disabled,
        // which notified nothing then; a host waiting for SHST would otherwise wait for ever).
        let enabling = !old.en() && new_cc.en();
        if new_cc.shn() != 0 && (old.shn() == 0 || enabling) && Csts::from_bits(c.csts).rdy() {
            c.csts = Csts::from_bits(c.csts)
                .with_shst(csts::SHST_OCCURRING as u8)
                .into_bits();
            c.shutdown_seq += 1;
            drop(c);
            self.start_shutdown();
        }
    }

    fn enable(&self, c: &mut Ctrl) {
        let (cc, aqa) = (Cc::from_bits(c.cc), Aqa::from_bits(c.aqa));
        let (mps, css) = (cc.mps(), cc.css());
        let asqs = u32::from(aqa.asqs()) + 1;
        let acqs = u32::from(aqa.acqs()) + 1;
        let bad = if mps > 4 {
            Some(format!("CC.MPS={mps} beyond MPSMAX=4"))
        } else if css != 0 && css != 7 {
            Some(format!("CC.CSS={css} not supported"))
        } else if asqs < 2 || acqs < 2 {
            Some(format!("AQA sizes {asqs}/{acqs} below 2 entries"))
        } else {
            None
        };
        if let Some(why) = bad {
            static LIMIT: RateLimit = RateLimit::new();
            crate::warn_limited!(
                LIMIT,
                "nvme {}: enable refused: {why}; controller fatal status set",
                self.cfg.serial
            );
            self.flags.fetch_or(flag::FATAL, Ordering::AcqRel);
            return;
        }
        let page = Self::page_size(c);
        c.admin = Group {
            cq: Some(CompQueue::new(0, c.acq, acqs, true, 0)),
            sqs: vec![SubQueue::new(0, c.asq, asqs, page, self.next_epoch())],
            poll_until: None,
        };
        if self.smart_clean.load(Ordering::Relaxed) {
            self.save_smart(false);
        }
        // A shutdown notified while this enable waited for a reset to drain is still under
        // way (or done): its status stays, or the host would wait for it for ever.
        let shst = if Cc::from_bits(c.cc).shn() != 0 {
            c.csts & csts::SHST_MASK
        } else {
            0
        };
        c.csts = csts::RDY | shst;
        self.flags.fetch_or(flag::ACCEPTING, Ordering::AcqRel);
    }

    /// Controller reset (CC.EN 1→0): abandon every queue now; CSTS.RDY clears once the old
    /// queues' backend requests have finished. `new_cc` (EN clear) stays in CC.
    pub fn reset(&self, c: &mut Ctrl, new_cc: u32) {
        c.cc = new_cc & !cc::EN;
        self.flags
            .fetch_and(!(flag::ACCEPTING | flag::SHADOW), Ordering::AcqRel);
        c.resetting = true;
        for (i, g) in self.groups.iter().enumerate() {
            *lock(g) = Group::default();
            self.cq_assert[i].store(false, Ordering::Relaxed);
            self.cq_held[i].store(false, Ordering::Relaxed);
        }
        self.cq_assert[0].store(false, Ordering::Relaxed);
        for q in self.sq_cq.iter() {
            q.store(0, Ordering::Release);
        }
        c.admin = Group::default();
        self.intms.store(0, Ordering::Relaxed);
        c.aer_cids.clear();
        // A controller reset aborts outstanding AERs; events not yet reported go with them.
        c.aer_pending.clear();
        c.aer_masked = [false; 8];
        c.held_aborts.clear();
        // A Controller Level Reset aborts a short device self-test; an extended one goes on.
        c.logs.settle_self_test(Instant::now());
        if c.logs
            .self_test_running
            .is_some_and(|t| t.stc == crate::spec::self_test::SHORT)
        {
            c.logs
                .abort_self_test(crate::spec::self_test::ABORTED_BY_RESET);
        }
        c.dbbuf = None;
        c.features.reset_volatile(self.cfg.io_queues());
        self.sync_features(&c.features);
        for ns in self.ns.read().unwrap_or_else(|e| e.into_inner()).iter() {
            ns.flush_failed.store(false, Ordering::Relaxed);
        }
        self.lock_pci().set_intx(false);
        self.try_finish_reset(c);
    }

    /// Report the reset done if nothing of the old queues is still running.
    pub(crate) fn try_finish_reset(&self, c: &mut Ctrl) {
        if !c.resetting || self.inflight.load(Ordering::Acquire) != 0 {
            return;
        }
        c.resetting = false;
        c.csts &= csts::SHST_MASK; // keep the shutdown status across a reset (§3.6.2)
        self.flags.fetch_and(!flag::FATAL, Ordering::AcqRel);
        if c.cc & cc::EN != 0 {
            // The host set EN again before RDY cleared; honour it now.
            self.enable(c);
        }
    }

    /// Mirror the hot-path features into their atomics.
    pub fn sync_features(&self, f: &Features) {
        self.volatile_wc.store(f.volatile_wc, Ordering::Release);
        self.coalescing.store(f.coalescing, Ordering::Release);
        for (a, v) in self.vector_cd.iter().zip(&f.vector_cd) {
            a.store(*v, Ordering::Release);
        }
    }

    /// Queue the shutdown flush (at most one runs; it reports SHST for the latest request).
    pub(crate) fn start_shutdown(&self) {
        if self.shutdown_running.swap(true, Ordering::AcqRel) {
            return; // the running one re-checks the sequence number when it finishes
        }
        let Some(me) = self.me.upgrade() else { return };
        self.pool.submit(Box::new(move || loop {
            let seq = me.lock().shutdown_seq;
            me.wait_idle();
            me.flush_all();
            me.save_smart(true);
            let mut c = me.lock();
            if c.shutdown_seq == seq {
                let csts_now = Csts::from_bits(c.csts);
                if Cc::from_bits(c.cc).shn() != 0 && csts_now.shst() != 0 {
                    c.csts = csts_now.with_shst(csts::SHST_COMPLETE as u8).into_bits();
                }
                me.shutdown_running.store(false, Ordering::Release);
                return;
            }
            // A newer notification arrived during the flush: flush again for it.
        }));
    }

    /// Block until no command is in flight on a backend (shutdown and process exit only).
    pub fn wait_idle(&self) {
        self.wait_idle_until(None);
    }

    /// [`Shared::wait_idle`], giving up at `deadline`.
    pub fn wait_idle_until(&self, deadline: impl Into<Option<Instant>>) {
        let deadline = deadline.into();
        let (m, cv) = &self.idle;
        let mut waiters = lock(m);
        *waiters += 1;
        while self.inflight.load(Ordering::Acquire) != 0
            && deadline.is_none_or(|d| Instant::now() < d)
        {
            waiters = cv
                .wait_timeout(waiters, std::time::Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *waiters -= 1;
    }

    /// A command (or blocking job) started on a backend.
    pub fn begin(&self) {
        let n = self.inflight.fetch_add(1, Ordering::SeqCst) + 1;
        self.counters
            .inflight_peak
            .fetch_max(n as u64, Ordering::Relaxed);
    }

    /// A command (or blocking job) finished on a backend; `work.idle` when it was the last,
    /// `work.refetch` when fetching had stopped at the in-flight limit.
    pub fn end(&self, work: &mut Work) {
        if self.inflight.fetch_sub(1, Ordering::SeqCst) == 1 {
            work.idle = true;
        }
        // Pairs with the fetcher's flag-then-recheck: one of the two sees the other.
        if self.flags.load(Ordering::SeqCst) & flag::STARVED != 0
            && self.flags.fetch_and(!flag::STARVED, Ordering::SeqCst) & flag::STARVED != 0
        {
            work.refetch = true;
        }
    }

    /// Lifetime totals now: the stored base plus this run's counters.
    pub fn smart_totals(&self, clean: bool) -> crate::smart::Totals {
        let c = &self.counters;
        let b = &self.smart.base;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        // Saturating: the stored base comes from a file (or a snapshot) and may be anything.
        crate::smart::Totals {
            power_cycles: b.power_cycles,
            power_on_secs: b
                .power_on_secs
                .saturating_add(self.started.elapsed().as_secs()),
            unsafe_shutdowns: b.unsafe_shutdowns,
            bytes_read: b.bytes_read.saturating_add(g(&c.bytes_read)),
            bytes_written: b.bytes_written.saturating_add(g(&c.bytes_written)),
            read_cmds: b.read_cmds.saturating_add(g(&c.read_cmds)),
            write_cmds: b.write_cmds.saturating_add(g(&c.write_cmds)),
            media_errors: b.media_errors.saturating_add(g(&c.media_errors)),
            clean,
        }
    }

    /// Persist the SMART totals; `clean` records whether the host shut the controller down.
    pub fn save_smart(&self, clean: bool) {
        self.smart_clean.store(clean, Ordering::Relaxed);
        if let Err(e) = self.smart.save(&self.smart_totals(clean)) {
            log::error!("nvme {}: {e}", self.cfg.serial);
        }
    }

    /// Flush every namespace's backend (shutdown, process exit).
    pub fn flush_all(&self) {
        let backends: Vec<_> = self
            .ns
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|n| (n.backend.clone(), n.flush_failed.clone()))
            .collect();
        for (b, failed) in &backends {
            if let Err(e) = b.flush() {
                log::error!("nvme {}: flush failed: {e}", self.cfg.serial);
                failed.store(true, Ordering::Release);
            }
        }
    }

    // ---- doorbells ----

    fn doorbell(&self, off: u64, val: u32) {
        self.counters.doorbells.fetch_add(1, Ordering::Relaxed);
        let idx = (off - reg::DOORBELL_BASE) / 4;
        let (qid, is_cq) = (idx / 2, idx % 2 == 1);
        if !self.flag(flag::ACCEPTING) || self.flag(flag::FATAL) {
            return; // writes before the controller is ready are ignored
        }
        let qid = u16::try_from(qid).unwrap_or(u16::MAX);
        if qid == 0 {
            self.admin_doorbell(is_cq, val);
        } else if usize::from(qid) >= self.sq_cq.len() {
            self.report(AsyncEvent {
                typ: aer::TYPE_ERROR,
                info: aer::ERR_INVALID_DOORBELL,
                lid: crate::spec::lid::ERROR_INFORMATION,
            });
        } else if is_cq {
            self.cq_doorbell(qid, val);
        } else {
            self.sq_doorbell(qid, Some(val));
        }
    }

    /// A bad doorbell write is reported as an Error status asynchronous event (§5.2.1).
    /// An invalid doorbell write's error event, logged at debug level with `what` was wrong.
    pub fn doorbell_error(&self, info: u8, what: std::fmt::Arguments<'_>) -> AsyncEvent {
        log::debug!("nvme {}: doorbell refused: {what}", self.cfg.serial);
        AsyncEvent {
            typ: aer::TYPE_ERROR,
            info,
            lid: crate::spec::lid::ERROR_INFORMATION,
        }
    }

    /// Report one asynchronous event (takes the ctrl lock).
    pub fn report(&self, ev: AsyncEvent) {
        let mut c = self.lock();
        self.async_event(&mut c, ev);
        drop(c);
        self.update_intx();
    }

    fn admin_doorbell(&self, is_cq: bool, val: u32) {
        let mut c = self.lock();
        if is_cq {
            let Some(cq) = c.admin.cq.as_mut() else {
                return;
            };
            if val >= cq.size || (val + cq.size - cq.head) % cq.size > cq.outstanding() {
                let ev = self.doorbell_error(
                    aer::ERR_INVALID_DOORBELL_VALUE,
                    format_args!("admin CQ head {val}: not within the entries posted"),
                );
                self.async_event(&mut c, ev);
                return;
            }
            cq.head = val;
            let starved = std::mem::take(&mut cq.starved);
            self.cq_assert[0].store(cq.ien && cq.has_unconsumed(), Ordering::Relaxed);
            if starved {
                self.process_admin(&mut c);
            }
        } else {
            let Some(sq) = c.admin.sqs.first_mut() else {
                return;
            };
            if val >= sq.size {
                let ev = self.doorbell_error(
                    aer::ERR_INVALID_DOORBELL_VALUE,
                    format_args!("admin SQ tail {val}: beyond its {} entries", sq.size),
                );
                self.async_event(&mut c, ev);
                return;
            }
            sq.tail = val;
            self.process_admin(&mut c);
        }
        drop(c);
        self.update_intx();
    }

    /// Fetch and run every admin command the host has queued.
    pub fn process_admin(&self, c: &mut Ctrl) {
        let mem = self.mem.memory();
        loop {
            if !self.flag(flag::ACCEPTING)
                || self.flag(flag::FATAL | flag::PAUSED)
                || !self.irq.bus_master()
            {
                break;
            }
            let Group { cq, sqs, .. } = &mut c.admin;
            let (Some(cq), Some(sq)) = (cq.as_mut(), sqs.first_mut()) else {
                break;
            };
            if sq.pending() == 0 || !cq.reserve() {
                break;
            }
            let Ok(sqe) = sq.fetch(&*mem) else {
                cq.unreserve();
                self.fatal("cannot read admin submission queue entry");
                break;
            };
            self.counters.admin_cmds.fetch_add(1, Ordering::Relaxed);
            if let Outcome::Done(status, dw0) = self.admin(c, &sqe) {
                if !status.is_success() {
                    c.logs.record_error(0, sqe.cid(), status, &sqe);
                }
                self.post_admin(c, sqe.cid(), status, dw0);
            }
        }
        self.raise_admin(c);
    }

    /// Post an admin completion into the entry reserved for it.
    pub fn post_admin(&self, c: &mut Ctrl, cid: u16, status: Status, dw0: u32) {
        let mem = self.mem.memory();
        let Group { cq, sqs, .. } = &mut c.admin;
        let (Some(cq), Some(sq)) = (cq.as_mut(), sqs.first()) else {
            return;
        };
        if cq
            .post(&*mem, make_cqe(0, sq.head, cid, status, dw0))
            .is_err()
        {
            self.fatal("cannot write admin completion queue entry");
        }
        self.cq_assert[0].store(cq.has_unconsumed(), Ordering::Relaxed);
    }

    /// Interrupt for new admin completions.
    pub fn raise_admin(&self, c: &mut Ctrl) {
        let Some(cq) = c.admin.cq.as_mut() else {
            return;
        };
        if cq.irq_owed && self.may_signal(cq.iv) {
            cq.irq_owed = false;
            self.fire(cq.iv);
        }
    }

    /// Whether vector `iv` may be signalled now (MSI/INTx masking by INTMS).
    pub fn may_signal(&self, iv: u16) -> bool {
        match self.irq.mode() {
            InterruptMode::MsiX => true,
            InterruptMode::Msi => self.intms.load(Ordering::Acquire) & (1 << iv.min(31)) == 0,
            InterruptMode::Intx => false, // level-triggered: see update_intx
        }
    }

    /// Send an interrupt message for vector `iv`.
    pub fn fire(&self, iv: u16) {
        if self.irq.trigger(iv) {
            self.counters.interrupts.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// INTMC unmasked `bits`: completions owed on those vectors interrupt now.
    fn raise_unmasked(&self, bits: u32) {
        {
            let mut c = self.lock();
            if let Some(cq) = c.admin.cq.as_mut() {
                if cq.has_unconsumed() && bits & 1 != 0 {
                    cq.irq_owed = true;
                }
            }
            self.raise_admin(&mut c);
        }
        for g in self.groups.iter() {
            let iv = {
                let mut g = lock(g);
                match g.cq.as_mut() {
                    Some(cq)
                        if cq.ien && cq.has_unconsumed() && bits & (1 << cq.iv.min(31)) != 0 =>
                    {
                        cq.irq_owed = false;
                        cq.coal.unsignalled = 0;
                        cq.coal.deadline = None;
                        cq.coal.wake_at = None;
                        self.cq_held[usize::from(cq.id)].store(false, Ordering::Release);
                        Some(cq.iv)
                    }
                    _ => None,
                }
            };
            if let Some(iv) = iv.filter(|&iv| self.may_signal(iv)) {
                self.fire(iv);
            }
        }
    }

    /// INTx is level-triggered: asserted while any interrupt-enabled CQ holds unconsumed entries
    /// and vector 0 is not masked by INTMS. Only does work in INTx mode.
    pub fn update_intx(&self) {
        if self.irq.mode() != InterruptMode::Intx {
            return;
        }
        let mut pci = self.lock_pci();
        let level = self.intms.load(Ordering::Acquire) & 1 == 0
            && self.cq_assert.iter().any(|a| a.load(Ordering::Acquire));
        pci.set_intx(level);
    }

    /// Controller Fatal Status: stop processing until reset.
    pub fn fatal(&self, why: &str) {
        if self.flags.fetch_or(flag::FATAL, Ordering::AcqRel) & flag::FATAL == 0 {
            log::error!("nvme {}: controller fatal: {why}", self.cfg.serial);
        }
    }

    /// Queue an asynchronous event and complete an outstanding AER if one is waiting.
    pub fn async_event(&self, c: &mut Ctrl, ev: AsyncEvent) {
        if !c
            .aer_pending
            .iter()
            .any(|e| e.typ == ev.typ && e.info == ev.info)
        {
            c.aer_pending.push(ev);
        }
        self.deliver_events(c);
    }

    /// Complete AERs for pending, unmasked events.
    pub fn deliver_events(&self, c: &mut Ctrl) {
        while !c.aer_cids.is_empty() {
            let Some(i) = c
                .aer_pending
                .iter()
                .position(|e| !c.aer_masked[usize::from(e.typ & 7)])
            else {
                break;
            };
            let ev = c.aer_pending.remove(i);
            c.aer_masked[usize::from(ev.typ & 7)] = true;
            let cid = c.aer_cids.remove(0);
            self.post_admin(c, cid, Status::SUCCESS, ev.dw0());
        }
        self.raise_admin(c);
    }

    /// Carry out deferred work: submit the batch, reap and complete what is already done
    /// (without a thread hop), send interrupts, and report errors and admin completions.
    pub fn run_work(&self, mut work: Work) {
        let mut done = Vec::new();
        for _ in 0..64 {
            let engines = std::mem::take(&mut work.engines);
            if engines == 0 {
                break;
            }
            let threads = self
                .threads
                .get()
                .expect("threads start with the controller");
            for (i, t) in threads.iter().enumerate() {
                if engines & (1 << (i % 64)) != 0 {
                    t.engine().commit_and_reap(&mut done);
                }
            }
            if done.is_empty() {
                break;
            }
            self.complete_batch(&mut done, &mut work);
        }
        // Still going after a bounded number of passes: the I/O threads take over, or what
        // their engines finished would sit unreaped. (NVMe's limits keep a command to 32
        // chunks, so only many commands can get here; AHCI's PRDTs reached it.)
        work.wake |= std::mem::take(&mut work.engines);
        self.finish_work(work);
    }

    /// The part of [`Shared::run_work`] that needs no engine.
    pub fn finish_work(&self, work: Work) {
        for iv in work.irqs {
            self.fire(iv);
        }
        let mut wake = work.wake;
        for cq in work.held {
            if self.cq_held[usize::from(cq)].load(Ordering::Acquire) {
                wake |= 1 << (self.thread_of(cq) % 64);
            }
        }
        if let Some(threads) = self.threads.get() {
            for (i, t) in threads.iter().enumerate() {
                if wake & (1 << (i % 64)) != 0 {
                    if current_thread() == Some(i) {
                        again();
                    } else {
                        t.wake();
                    }
                }
            }
        }
        if let Some(why) = work.fatal {
            self.fatal(why);
        }
        if work.refetch {
            self.refetch_all();
        }
        let admin = !work.events.is_empty()
            || !work.errors.is_empty()
            || !work.admin_done.is_empty()
            || !work.aborts_done.is_empty()
            || work.idle;
        if admin {
            let mut c = self.lock();
            for (sqid, sqe, status) in &work.errors {
                c.logs.record_error(*sqid, sqe.cid(), *status, sqe);
            }
            for (sqid, cid) in &work.aborts_done {
                // The target completed, so it was not aborted.
                while let Some(p) = c
                    .held_aborts
                    .iter()
                    .position(|h| (h.target_sqid, h.target_cid) == (*sqid, *cid))
                {
                    let h = c.held_aborts.remove(p);
                    self.post_admin(&mut c, h.abort_cid, Status::SUCCESS, 1);
                }
            }
            let epoch = c.admin.sqs.first().map(|s| s.epoch);
            for (e, cid, status, dw0) in &work.admin_done {
                if epoch == Some(*e) {
                    self.post_admin(&mut c, *cid, *status, *dw0);
                }
            }
            for ev in &work.events {
                self.async_event(&mut c, *ev);
            }
            if work.idle {
                self.try_finish_reset(&mut c);
                let (m, cv) = &self.idle;
                if *lock(m) > 0 {
                    cv.notify_all();
                }
            }
            self.raise_admin(&mut c);
        }
        if work.intx || admin {
            self.update_intx();
        }
    }
}

/// Read a little-endian u32 from guest memory.
pub(crate) fn read_u32<M: vm_memory::GuestMemory>(mem: &M, addr: u64) -> Option<u32> {
    let mut b = [0u8; 4];
    vm_memory::Bytes::read_slice(mem, &mut b, vm_memory::GuestAddress(addr)).ok()?;
    Some(u32::from_le_bytes(b))
}

/// Write a little-endian u32 to guest memory.
pub(crate) fn write_u32<M: vm_memory::GuestMemory>(mem: &M, addr: u64, v: u32) -> Option<()> {
    vm_memory::Bytes::write_slice(mem, &v.to_le_bytes(), vm_memory::GuestAddress(addr)).ok()
}
