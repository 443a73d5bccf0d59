//! The controller: state, the register file, doorbells, completion posting and interrupts,
//! enable/reset/shutdown.
//!
//! Threads: register and doorbell accesses arrive on the frontend's thread and never wait for disk
//! I/O; I/O commands run as jobs on the block [`Executor`] and post their completions from there.
//! Lock order is `state` then `pci`. A controller reset bumps `generation` so completions of
//! commands from before the reset are dropped, and waits for every job to finish before it reports
//! CSTS.RDY=0, so no DMA or CQE reaches memory the host has reclaimed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, Weak};
use std::time::Instant;

use block::Executor;
use pci::{GuestMem, InterruptMode, PciFunction};
use vm_memory::GuestAddressSpace;

use crate::config::CtrlConfig;
use crate::features::Features;
use crate::log::Logs;
use crate::namespace::Namespace;
use crate::queue::{make_cqe, CompQueue, SubQueue};
use crate::spec::{aer, cc, csts, reg, Status};

/// Per-controller counters for `--stats` and the SMART log.
#[derive(Debug, Default)]
pub struct Counters {
    pub read_cmds: AtomicU64,
    pub write_cmds: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub interrupts: AtomicU64,
    pub media_errors: AtomicU64,
    pub admin_cmds: AtomicU64,
}

/// A command whose completion is held back: Delete SQ draining, Abort waiting on its target.
#[derive(Debug, Clone, Copy)]
pub struct HeldAbort {
    pub abort_cid: u16,
    pub target_sqid: u16,
    pub target_cid: u16,
}

/// Mutable controller state, under one lock.
pub struct State {
    pub cc: u32,
    pub csts: u32,
    pub aqa: u32,
    pub asq: u64,
    pub acq: u64,
    pub intms: u32,
    /// Indexed by queue ID; 0 is the admin queue.
    pub sqs: Vec<Option<SubQueue>>,
    pub cqs: Vec<Option<CompQueue>>,
    /// Bumped by every reset; completions carry the value they started with.
    pub generation: u64,
    pub features: Features,
    pub namespaces: Vec<Namespace>,
    pub logs: Logs,
    /// Outstanding Asynchronous Event Request CIDs.
    pub aer_cids: Vec<u16>,
    /// Events waiting for an AER: (type, info, log page).
    pub aer_pending: Vec<(u8, u8, u8)>,
    /// Event types masked until the host reads their log page.
    pub aer_masked: [bool; 8],
    /// (sqid, cid) of commands being executed, for Abort.
    pub inflight_cmds: Vec<(u16, u16)>,
    pub held_aborts: Vec<HeldAbort>,
    /// Host-set timestamp (ms) and when it was set.
    pub timestamp: Option<(u64, Instant)>,
    /// Doorbell Buffer Config: (shadow doorbell base, EventIdx base), I/O queues only.
    pub dbbuf: Option<(u64, u64)>,
}

/// Everything the controller shares between the MMIO path and I/O jobs.
pub struct Shared {
    pub cfg: CtrlConfig,
    pub mem: GuestMem,
    pub pci: Mutex<PciFunction>,
    pub state: Mutex<State>,
    pub exec: Executor,
    pub counters: Counters,
    pub started: Instant,
    /// A handle to ourselves, for work that outlives the MMIO call (shutdown).
    pub me: Weak<Shared>,
    /// Lifetime SMART counters.
    pub smart: crate::smart::SmartStore,
    /// The store last recorded a clean shutdown.
    pub smart_clean: std::sync::atomic::AtomicBool,
}

/// Outcome of executing a command on the MMIO path.
pub enum Outcome {
    /// Post this completion now.
    Done(Status, u32),
    /// The completion is posted later (AER, async work, held Abort/Delete).
    Deferred,
}

impl Outcome {
    /// A status without command-specific DW0.
    pub fn status(s: Status) -> Self {
        Outcome::Done(s, 0)
    }
}

impl Shared {
    /// Lock the state (a poisoned lock means a bug already panicked; keep serving).
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_pci(&self) -> MutexGuard<'_, PciFunction> {
        self.pci.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Memory page size from CC.MPS.
    pub fn page_size(st: &State) -> u64 {
        1 << (12 + ((st.cc >> cc::MPS_SHIFT) & cc::MPS_MASK))
    }

    /// The CAP register.
    pub fn cap(&self) -> u64 {
        let mqes = u64::from(self.cfg.qsz - 1);
        mqes | (1 << 16) // CQR: queues must be physically contiguous
            | (0x0f << 24) // TO: 7.5 s
            | (1 << 37) // CSS: NVM command set
            | (4 << 52) // MPSMAX: 64 KiB (MPSMIN 4 KiB)
    }

    // ---- register file ----

    /// Guest read of BAR0.
    pub fn read_bar0(&self, offset: u64, data: &mut [u8]) {
        let st = self.lock();
        for (i, b) in data.iter_mut().enumerate() {
            let off = offset + i as u64;
            let dword = self.read_dword(&st, off & !3);
            *b = dword.to_le_bytes()[(off & 3) as usize];
        }
    }

    fn read_dword(&self, st: &State, off: u64) -> u32 {
        let cap = self.cap();
        match off {
            reg::CAP => cap as u32,
            0x04 => (cap >> 32) as u32,
            reg::VS => crate::NVME_VERSION,
            reg::INTMS | reg::INTMC => st.intms,
            reg::CC => st.cc,
            reg::CSTS => st.csts,
            reg::AQA => st.aqa,
            reg::ASQ => st.asq as u32,
            0x2c => (st.asq >> 32) as u32,
            reg::ACQ => st.acq as u32,
            0x34 => (st.acq >> 32) as u32,
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
        let mut st = self.lock();
        match off {
            reg::INTMS | reg::INTMC => {
                if self.lock_pci().mode() == InterruptMode::MsiX {
                    return; // INTMS/INTMC are not used with MSI-X (§3.1.3.3)
                }
                let bits = val & mask;
                if off == reg::INTMS {
                    st.intms |= bits;
                } else {
                    st.intms &= !bits;
                    // Unmasked vectors with entries outstanding interrupt now.
                    for cq in st.cqs.iter_mut().flatten() {
                        if cq.has_unconsumed() && bits & (1 << cq.iv.min(31)) != 0 {
                            cq.irq_owed = true;
                        }
                    }
                }
                self.raise_owed(&mut st);
            }
            reg::CC => self.write_cc(st, val & cc::WRITABLE),
            reg::CSTS | reg::NSSR => {} // NSSR not supported (CAP.NSSRS=0)
            reg::AQA => st.aqa = val & 0x0fff_0fff,
            reg::ASQ => st.asq = (st.asq & !0xffff_ffff) | u64::from(val & !0xfff),
            0x2c => st.asq = (st.asq & 0xffff_ffff) | (u64::from(val) << 32),
            reg::ACQ => st.acq = (st.acq & !0xffff_ffff) | u64::from(val & !0xfff),
            0x34 => st.acq = (st.acq & 0xffff_ffff) | (u64::from(val) << 32),
            _ => log::debug!("nvme: write to reserved register {off:#x} ignored"),
        }
    }

    fn write_cc(&self, mut st: MutexGuard<'_, State>, new: u32) {
        let old = st.cc;
        // CC fields other than EN and SHN may only change while disabled.
        st.cc = if old & cc::EN != 0 {
            (old & !(cc::EN | (cc::SHN_MASK << cc::SHN_SHIFT)))
                | (new & (cc::EN | (cc::SHN_MASK << cc::SHN_SHIFT)))
        } else {
            new
        };
        let shn_old = (old >> cc::SHN_SHIFT) & cc::SHN_MASK;
        let shn_new = (new >> cc::SHN_SHIFT) & cc::SHN_MASK;
        if shn_new == 0 && shn_old != 0 {
            st.csts &= !csts::SHST_MASK; // the host withdrew the shutdown notification
        }
        if old & cc::EN != 0 && new & cc::EN == 0 {
            drop(st);
            self.reset(new);
            return;
        }
        if old & cc::EN == 0 && new & cc::EN != 0 {
            self.enable(&mut st);
        }
        if shn_new != 0 && shn_old == 0 && st.csts & csts::RDY != 0 {
            st.csts = (st.csts & !csts::SHST_MASK) | (csts::SHST_OCCURRING << csts::SHST_SHIFT);
            let gen = st.generation;
            drop(st);
            self.start_shutdown(gen);
        }
    }

    fn enable(&self, st: &mut State) {
        let mps = (st.cc >> cc::MPS_SHIFT) & cc::MPS_MASK;
        let css = (st.cc >> cc::CSS_SHIFT) & cc::CSS_MASK;
        let asqs = (st.aqa & 0xfff) + 1;
        let acqs = ((st.aqa >> 16) & 0xfff) + 1;
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
            log::warn!(
                "nvme {}: enable refused: {why}; controller fatal status set",
                self.cfg.serial
            );
            st.csts |= csts::CFS;
            return;
        }
        st.sqs[0] = Some(SubQueue {
            base: st.asq,
            size: asqs,
            head: 0,
            tail: 0,
            cqid: 0,
            inflight: 0,
            delete_cid: None,
        });
        st.cqs[0] = Some(CompQueue::new(st.acq, acqs, true, 0));
        if self.smart_clean.load(Ordering::Relaxed) {
            self.save_smart(false);
        }
        st.csts = csts::RDY;
    }

    /// Controller reset (CC.EN 1→0): abandon queues, wait for in-flight jobs, clear state.
    /// `cc` is the value the host wrote (EN clear); it stays in CC.
    pub fn reset(&self, new_cc: u32) {
        {
            let mut st = self.lock();
            st.generation += 1;
            st.sqs.iter_mut().for_each(|q| *q = None);
            st.cqs.iter_mut().for_each(|q| *q = None);
        }
        self.exec.wait_idle();
        let mut st = self.lock();
        st.sqs.iter_mut().for_each(|q| *q = None);
        st.cqs.iter_mut().for_each(|q| *q = None);
        st.cc = new_cc & !cc::EN;
        st.csts &= csts::SHST_MASK; // keep the shutdown status across a reset (§3.6.2)
        st.intms = 0;
        st.aer_cids.clear();
        // A controller reset aborts outstanding AERs; events not yet reported go with them.
        st.aer_pending.clear();
        st.aer_masked = [false; 8];
        st.inflight_cmds.clear();
        st.held_aborts.clear();
        st.dbbuf = None;
        st.features.reset_volatile(self.cfg.io_queues());
        drop(st);
        self.lock_pci().set_intx(false);
    }

    fn start_shutdown(&self, gen: u64) {
        // Flushing may take long: do it off the MMIO path, after in-flight I/O has finished.
        let Some(me) = self.me.upgrade() else { return };
        let spawned = std::thread::Builder::new()
            .name("nvme-shutdown".into())
            .spawn(move || {
                me.exec.wait_idle();
                me.flush_all();
                me.save_smart(true);
                let mut st = me.lock();
                if st.generation == gen {
                    st.csts =
                        (st.csts & !csts::SHST_MASK) | (csts::SHST_COMPLETE << csts::SHST_SHIFT);
                }
            });
        if let Err(e) = spawned {
            log::error!("nvme: cannot start shutdown thread: {e}");
        }
    }

    /// Lifetime totals now: the stored base plus this run's counters.
    pub fn smart_totals(&self, clean: bool) -> crate::smart::Totals {
        let c = &self.counters;
        let b = &self.smart.base;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        crate::smart::Totals {
            power_cycles: b.power_cycles,
            power_on_secs: b.power_on_secs + self.started.elapsed().as_secs(),
            unsafe_shutdowns: b.unsafe_shutdowns,
            bytes_read: b.bytes_read + g(&c.bytes_read),
            bytes_written: b.bytes_written + g(&c.bytes_written),
            read_cmds: b.read_cmds + g(&c.read_cmds),
            write_cmds: b.write_cmds + g(&c.write_cmds),
            media_errors: b.media_errors + g(&c.media_errors),
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
            .lock()
            .namespaces
            .iter()
            .map(|n| n.backend.clone())
            .collect();
        for b in &backends {
            if let Err(e) = b.flush() {
                log::error!("nvme {}: flush failed: {e}", self.cfg.serial);
            }
        }
    }

    // ---- doorbells ----

    fn doorbell(&self, off: u64, val: u32) {
        let idx = (off - reg::DOORBELL_BASE) / 4;
        let qid = (idx / 2) as usize;
        let is_cq = idx % 2 == 1;
        let mut st = self.lock();
        if st.csts & csts::RDY == 0 || st.csts & csts::CFS != 0 {
            return; // writes before the controller is ready are ignored
        }
        let mem = self.mem.memory();
        if is_cq {
            let Some(cq) = st.cqs.get_mut(qid).and_then(|q| q.as_mut()) else {
                self.doorbell_error(&mut st, aer::ERR_INVALID_DOORBELL);
                return;
            };
            // The new head must lie within the entries the controller has posted.
            if val >= cq.size || (val + cq.size - cq.head) % cq.size > cq.outstanding() {
                self.doorbell_error(&mut st, aer::ERR_INVALID_DOORBELL_VALUE);
                return;
            }
            cq.head = val;
            let mut ok = cq.drain_overflow(&*mem).is_ok();
            if let Some((db, ei)) = st.dbbuf.filter(|_| qid != 0) {
                let intx = self.lock_pci().mode() == InterruptMode::Intx;
                let cq = st.cqs[qid].as_mut().expect("checked above");
                ok &= cq_event_idx(cq, &*mem, db, ei, qid, intx);
            }
            if !ok {
                self.fatal(&mut st, "cannot write completion queue");
                return;
            }
            self.raise_owed(&mut st);
            self.update_intx(&mut st);
            return;
        }
        let Some(sq) = st.sqs.get_mut(qid).and_then(|q| q.as_mut()) else {
            self.doorbell_error(&mut st, aer::ERR_INVALID_DOORBELL);
            return;
        };
        if val >= sq.size {
            self.doorbell_error(&mut st, aer::ERR_INVALID_DOORBELL_VALUE);
            return;
        }
        sq.tail = val;
        self.process_sq(&mut st, qid as u16);
        self.raise_owed(&mut st);
    }

    /// A bad doorbell write is reported as an Error status asynchronous event (§5.2.1).
    fn doorbell_error(&self, st: &mut State, info: u8) {
        self.async_event(
            st,
            aer::TYPE_ERROR,
            info,
            crate::spec::lid::ERROR_INFORMATION,
        );
    }

    /// Fetch and start every command the host has queued on `qid`. With shadow doorbells the
    /// tail is (re)read from the host's buffer and the EventIdx tells the host whether its next
    /// submission needs an MMIO doorbell: not while commands are in flight (each completion
    /// looks again), yes once the queue is idle.
    pub fn process_sq(&self, st: &mut State, qid: u16) {
        let mem = self.mem.memory();
        let shadow = st.dbbuf.filter(|_| qid != 0);
        loop {
            if let Some((db, _)) = shadow {
                let Some(sq) = st.sqs.get_mut(usize::from(qid)).and_then(|q| q.as_mut()) else {
                    return;
                };
                if let Some(t) = read_u32(&*mem, db + u64::from(qid) * 8).filter(|&t| t < sq.size) {
                    sq.tail = t;
                }
            }
            self.drain_sq(st, qid, &*mem);
            let Some((db, ei)) = shadow else { return };
            if st.csts & csts::CFS != 0 {
                return;
            }
            let Some(sq) = st.sqs.get(usize::from(qid)).and_then(|q| q.as_ref()) else {
                return;
            };
            let event = if sq.inflight > 0 {
                (sq.tail + sq.size - 1) % sq.size
            } else {
                sq.tail
            };
            let _ = write_u32(&*mem, ei + u64::from(qid) * 8, event);
            std::sync::atomic::fence(Ordering::SeqCst);
            // The host may have queued more after our last read but before seeing the EventIdx.
            if read_u32(&*mem, db + u64::from(qid) * 8) == Some(sq.tail) {
                return;
            }
        }
    }

    fn drain_sq<M: vm_memory::GuestMemory>(&self, st: &mut State, qid: u16, mem: &M) {
        loop {
            let Some(sq) = st.sqs.get_mut(usize::from(qid)).and_then(|q| q.as_mut()) else {
                return;
            };
            if !sq.has_work() || sq.delete_cid.is_some() {
                return;
            }
            let Ok(sqe) = sq.fetch(mem) else {
                self.fatal(st, "cannot read submission queue entry");
                return;
            };
            let out = if qid == 0 {
                self.counters.admin_cmds.fetch_add(1, Ordering::Relaxed);
                self.admin(st, &sqe)
            } else {
                self.submit_io(st, qid, &sqe)
            };
            if let Outcome::Done(status, dw0) = out {
                self.complete(st, qid, sqe.cid(), status, dw0, &sqe);
            }
            if st.csts & csts::CFS != 0 {
                return;
            }
        }
    }

    /// Post a completion for a command of SQ `sqid`; failed commands go to the error log.
    pub fn complete(
        &self,
        st: &mut State,
        sqid: u16,
        cid: u16,
        status: Status,
        dw0: u32,
        sqe: &crate::spec::Sqe,
    ) {
        if !status.is_success() {
            st.logs.record_error(sqid, cid, status, sqe);
        }
        self.post(st, sqid, cid, status, dw0);
    }

    /// Write the CQE for (sqid, cid) to the SQ's completion queue.
    pub fn post(&self, st: &mut State, sqid: u16, cid: u16, status: Status, dw0: u32) {
        let Some(sq) = st.sqs.get(usize::from(sqid)).and_then(|q| q.as_ref()) else {
            return;
        };
        let (cqid, head) = (usize::from(sq.cqid), sq.head);
        let mem = self.mem.memory();
        let shadow = st.dbbuf.filter(|_| cqid != 0);
        let intx = self.lock_pci().mode() == InterruptMode::Intx;
        let Some(cq) = st.cqs.get_mut(cqid).and_then(|q| q.as_mut()) else {
            return;
        };
        let mut ok = true;
        if let Some((db, _)) = shadow {
            // The host's CQ head lives in its shadow buffer; it rings the MMIO doorbell only
            // when the EventIdx asks for it.
            ok &= sync_shadow_head(cq, &*mem, db + cqid as u64 * 8 + 4);
        }
        ok &= cq
            .post(&*mem, make_cqe(sqid, head, cid, status, dw0))
            .is_ok();
        if let Some((db, ei)) = shadow {
            ok &= cq_event_idx(cq, &*mem, db, ei, cqid, intx);
        }
        if !ok {
            self.fatal(st, "cannot write completion queue entry");
        }
    }

    /// Raise interrupts owed by CQs that have new entries.
    pub fn raise_owed(&self, st: &mut State) {
        let intms = st.intms;
        let mut pci = None;
        for cq in st.cqs.iter_mut().flatten() {
            if !cq.irq_owed || !cq.ien {
                cq.irq_owed = false;
                continue;
            }
            let pci = pci.get_or_insert_with(|| self.lock_pci());
            match pci.mode() {
                InterruptMode::MsiX => {}
                InterruptMode::Msi if intms & (1 << cq.iv.min(31)) != 0 => continue, // stays owed
                InterruptMode::Msi => {}
                InterruptMode::Intx => {
                    cq.irq_owed = false;
                    continue;
                }
            }
            cq.irq_owed = false;
            if pci.trigger(cq.iv) {
                self.counters.interrupts.fetch_add(1, Ordering::Relaxed);
            }
        }
        drop(pci);
        self.update_intx(st);
    }

    /// INTx is level-triggered: asserted while any interrupt-enabled CQ holds unconsumed entries
    /// and vector 0 is not masked by INTMS.
    fn update_intx(&self, st: &mut State) {
        let level =
            st.intms & 1 == 0 && st.cqs.iter().flatten().any(|c| c.ien && c.has_unconsumed());
        let mut pci = self.lock_pci();
        if pci.mode() == InterruptMode::Intx {
            pci.set_intx(level);
        } else {
            pci.set_intx(false);
        }
    }

    /// Controller Fatal Status: stop processing until reset.
    pub fn fatal(&self, st: &mut State, why: &str) {
        log::error!("nvme {}: controller fatal: {why}", self.cfg.serial);
        st.csts |= csts::CFS;
    }

    /// Queue an asynchronous event and complete an outstanding AER if one is waiting.
    pub fn async_event(&self, st: &mut State, typ: u8, info: u8, lid: u8) {
        if !st.aer_pending.iter().any(|e| e.0 == typ && e.1 == info) {
            st.aer_pending.push((typ, info, lid));
        }
        self.deliver_events(st);
    }

    /// Complete AERs for pending, unmasked events.
    pub fn deliver_events(&self, st: &mut State) {
        loop {
            if st.aer_cids.is_empty() {
                return;
            }
            let Some(i) = st
                .aer_pending
                .iter()
                .position(|e| !st.aer_masked[usize::from(e.0 & 7)])
            else {
                return;
            };
            let (typ, info, lid) = st.aer_pending.remove(i);
            st.aer_masked[usize::from(typ & 7)] = true;
            let cid = st.aer_cids.remove(0);
            let dw0 = u32::from(typ) | (u32::from(info) << 8) | (u32::from(lid) << 16);
            self.post(st, 0, cid, Status::SUCCESS, dw0);
            self.raise_owed(st);
        }
    }

    /// An I/O job finished: post its completion unless a reset intervened.
    pub fn finish_io(&self, gen: u64, sqid: u16, sqe: &crate::spec::Sqe, status: Status, dw0: u32) {
        let mut st = self.lock();
        if st.generation != gen {
            return;
        }
        let cid = sqe.cid();
        if let Some(p) = st.inflight_cmds.iter().position(|&c| c == (sqid, cid)) {
            st.inflight_cmds.swap_remove(p);
        }
        self.complete(&mut st, sqid, cid, status, dw0, sqe);
        // Aborts that waited for this command: it completed, so it was not aborted.
        let held: Vec<_> = st
            .held_aborts
            .iter()
            .filter(|h| (h.target_sqid, h.target_cid) == (sqid, cid))
            .copied()
            .collect();
        st.held_aborts
            .retain(|h| (h.target_sqid, h.target_cid) != (sqid, cid));
        for h in held {
            self.post(&mut st, 0, h.abort_cid, Status::SUCCESS, 1);
        }
        let mut deleted = None;
        if let Some(sq) = st.sqs.get_mut(usize::from(sqid)).and_then(|q| q.as_mut()) {
            sq.inflight -= 1;
            if sq.inflight == 0 {
                deleted = sq.delete_cid;
            }
        }
        if let Some(del_cid) = deleted {
            st.sqs[usize::from(sqid)] = None;
            self.post(&mut st, 0, del_cid, Status::SUCCESS, 0);
        } else if st.dbbuf.is_some() && sqid != 0 {
            // Shadow doorbells: submissions made while we were busy did not ring.
            self.process_sq(&mut st, sqid);
        }
        self.raise_owed(&mut st);
    }

    /// A frontend saw a doorbell write without its value (ioeventfd): re-read the shadow
    /// doorbells of queue `qid` and process. Without Doorbell Buffer Config this does nothing.
    pub fn kick(&self, qid: u16) {
        let mut st = self.lock();
        if st.dbbuf.is_none() || qid == 0 || st.csts & csts::RDY == 0 {
            return;
        }
        self.process_sq(&mut st, qid);
        self.raise_owed(&mut st);
    }
}

fn read_u32<M: vm_memory::GuestMemory>(mem: &M, addr: u64) -> Option<u32> {
    let mut b = [0u8; 4];
    vm_memory::Bytes::read_slice(mem, &mut b, vm_memory::GuestAddress(addr)).ok()?;
    Some(u32::from_le_bytes(b))
}

fn write_u32<M: vm_memory::GuestMemory>(mem: &M, addr: u64, v: u32) -> Option<()> {
    vm_memory::Bytes::write_slice(mem, &v.to_le_bytes(), vm_memory::GuestAddress(addr)).ok()
}

/// Tell a host using shadow doorbells whether its next CQ head update needs an MMIO doorbell:
/// only when completions wait for space (or INTx must follow the head); otherwise every post
/// re-reads the shadow head. Returns false only if writing the CQ failed.
fn cq_event_idx<M: vm_memory::GuestMemory>(
    cq: &mut CompQueue,
    mem: &M,
    db: u64,
    ei: u64,
    cqid: usize,
    intx: bool,
) -> bool {
    let (head_slot, event_slot) = (db + cqid as u64 * 8 + 4, ei + cqid as u64 * 8 + 4);
    loop {
        let want_ring = intx || !cq.overflow.is_empty();
        let event = if want_ring {
            cq.head
        } else {
            (cq.head + cq.size - 1) % cq.size
        };
        let _ = write_u32(mem, event_slot, event);
        std::sync::atomic::fence(Ordering::SeqCst);
        if !want_ring {
            return true;
        }
        // The host may have moved the head before it could see the new EventIdx.
        let before = cq.head;
        if !sync_shadow_head(cq, mem, head_slot) {
            return false;
        }
        if cq.head == before {
            return true;
        }
    }
}

/// Adopt the host's shadow CQ head if it is a legal value, and fill freed slots. Returns false
/// only if writing the CQ failed.
fn sync_shadow_head<M: vm_memory::GuestMemory>(cq: &mut CompQueue, mem: &M, addr: u64) -> bool {
    let Some(h) = read_u32(mem, addr).filter(|&h| h < cq.size) else {
        return true;
    };
    let outstanding = (cq.tail + cq.size - cq.head) % cq.size;
    let advance = (h + cq.size - cq.head) % cq.size;
    if advance == 0 || advance > outstanding {
        return true;
    }
    cq.head = h;
    cq.drain_overflow(mem).is_ok()
}
