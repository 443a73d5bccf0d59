//! The I/O path: doorbells, fetching, the NVM command set (Read, Write, Compare, Write Zeroes,
//! Dataset Management, Verify, Flush), completions, interrupt coalescing and shadow doorbells.
//!
//! A doorbell (MMIO write, ioeventfd kick, shadow poll) locks its queue group, fetches what the
//! completion queue has room for, validates each command and hands its data to the group's
//! [`block::Engine`] as iovecs over guest memory; then, with the lock dropped, it commits the
//! batch and completes whatever the kernel already finished — no thread hop. The group's I/O
//! thread reaps the rest, fires coalescing deadlines and polls shadow doorbells.

use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use block::{BlockBackend, BlockError, GuestIov, IoDone, IoHandler, IoReq, Op, Tick};
use pci::InterruptMode;
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};

use crate::config::Coalesce;
use crate::ctrl::{flag, read_u32, write_u32, Shared, Work, AGAIN, CURRENT};
use crate::error::{NvmeError, RateLimit, Reason};
use crate::namespace::Namespace;
use crate::prp::{self, DataPtr, Walker};
use crate::queue::{make_cqe, Chunks, CompQueue, Group, Slot, SubQueue};
use crate::spec::dw::{Cdw10Dsm, Cdw11Dsm, Cdw12ReadWrite};
use crate::spec::{aer, DsmRange, IoOpcode, Sqe, Status, NSID_ALL};

/// Most commands a controller has in flight at once, all queues together. Fetching pauses at
/// this many (commands wait in their SQs, as on a real controller with a finite number of
/// command contexts), so host memory does not grow with `maxq` × `qsz`.
pub const MAX_INFLIGHT: usize = 4096;
/// Most iovecs one backend request carries; larger transfers run as a chain of chunks, so the
/// host memory a command needs does not grow with its transfer size.
pub const MAX_SEGMENTS: usize = 256;
/// Largest host buffer a Compare or Verify stages at once.
const STAGE: usize = 128 << 10;
/// Most fetch/EventIdx rounds one doorbell runs before leaving the rest to the I/O thread.
const MAX_ROUNDS: usize = 16;
/// Adaptive coalescing never holds more completions than this per interrupt.
const ADAPTIVE_MAX_BATCH: u32 = 32;
/// Adaptive coalescing looks for a deeper queue at most this often.
const PROBE_EVERY: Duration = Duration::from_millis(10);
/// The shortest wait for a guest's next submission before adaptive mode gives up on it.
const QUIET_MIN: Duration = Duration::from_micros(2);

thread_local! {
    /// When this I/O thread last completed something (polled mode).
    static LAST_DONE: Cell<Option<Instant>> = const { Cell::new(None) };
}

type Mem = Arc<GuestMemoryMmap>;

/// A request tag: which queue, which instance of it, which slot.
fn tag(cqid: u16, sqid: u16, epoch: u16, slot: u16) -> u64 {
    (u64::from(cqid) << 48) | (u64::from(sqid) << 32) | (u64::from(epoch) << 16) | u64::from(slot)
}

fn untag(t: u64) -> (u16, u16, u16, u16) {
    (
        (t >> 48) as u16,
        (t >> 32) as u16,
        (t >> 16) as u16,
        t as u16,
    )
}

/// A validated command, ready to start.
enum Plan {
    Transfer {
        op: Op,
        offset: u64,
        len: u64,
        fua: bool,
        ptr: DataPtr,
        backend: Arc<dyn BlockBackend>,
    },
    Flush(Vec<Arc<dyn BlockBackend>>),
    Zeroes {
        offset: u64,
        len: u64,
        fua: bool,
        backend: Arc<dyn BlockBackend>,
    },
    /// Runs on the worker pool and returns the status.
    Blocking(Box<dyn FnOnce() -> Status + Send>),
    /// Nothing to do (DSM with only attribute hints).
    Nothing,
}

/// Map a backend error to the command's status; counts media errors.
fn backend_status(shared: &Shared, e: &BlockError, write: bool) -> Status {
    // A guest can repeat the failing I/O as fast as it likes.
    static LIMIT: RateLimit = RateLimit::new();
    crate::warn_limited!(LIMIT, "nvme {}: backend error: {e}", shared.cfg.serial);
    let s = match e {
        BlockError::ReadOnly => Status::NS_WRITE_PROTECTED,
        BlockError::OutOfRange { .. } => Status::LBA_OUT_OF_RANGE,
        BlockError::Io(io) if io.kind() == std::io::ErrorKind::StorageFull => {
            Status::CAPACITY_EXCEEDED
        }
        _ if write => Status::WRITE_FAULT,
        _ => Status::UNRECOVERED_READ_ERROR,
    };
    if matches!(s, Status::WRITE_FAULT | Status::UNRECOVERED_READ_ERROR) {
        shared.counters.media_errors.fetch_add(1, Ordering::Relaxed);
    }
    s
}

/// Fill `iov` with the walker's next segments, up to [`MAX_SEGMENTS`]; true if more remain.
fn map_chunk(
    walker: &mut Walker,
    iov: &mut GuestIov,
    mem: &GuestMemoryMmap,
) -> Result<bool, Status> {
    loop {
        if iov.segments() >= MAX_SEGMENTS && walker.remaining() > 0 {
            return Ok(true);
        }
        match walker.next(mem)? {
            None => return Ok(false),
            Some(seg) => match seg.addr {
                Some(a) => iov
                    .push_guest(a, seg.len)
                    .map_err(|_| Status::DATA_TRANSFER_ERROR)?,
                None => {
                    // A bit bucket takes one iovec per SINK_SEGMENT bytes: only what fits in
                    // this chunk, the rest goes to the next one.
                    let room = MAX_SEGMENTS.saturating_sub(iov.segments()).max(1) as u64;
                    let n = seg.len.min(room * block::SINK_SEGMENT);
                    iov.push_sink(n);
                    if n < seg.len {
                        walker.put_back(prp::Segment {
                            addr: None,
                            len: seg.len - n,
                        });
                    }
                }
            },
        }
    }
}

impl Shared {
    // ---- doorbells ----

    /// SQ `qid`'s tail doorbell: `Some(value)` from an MMIO write, `None` from an absorbed
    /// write (ioeventfd) or a poll, where the tail is in the shadow buffer.
    pub fn sq_doorbell(&self, qid: u16, mmio: Option<u32>) {
        let cqid = self.sq_cq[usize::from(qid)].load(Ordering::Acquire);
        let mut work = Work::default();
        {
            let mut g = self.group(cqid);
            let found = cqid != 0 && g.sq(qid).is_some();
            if !found {
                drop(g);
                if let Some(v) = mmio {
                    self.report(self.doorbell_error(
                        aer::ERR_INVALID_DOORBELL,
                        format_args!("SQ {qid} tail {v}: no such queue"),
                    ));
                }
                return;
            }
            if let Some(v) = mmio {
                let sq = g.sq_mut(qid).expect("checked");
                if v >= sq.size {
                    let size = sq.size;
                    drop(g);
                    self.report(self.doorbell_error(
                        aer::ERR_INVALID_DOORBELL_VALUE,
                        format_args!("SQ {qid} tail {v}: beyond its {size} entries"),
                    ));
                    return;
                }
                sq.tail = v;
            }
            self.fetch_group(&mut g, Some(qid), &mut work);
        }
        self.run_work(work);
    }

    /// CQ `qid`'s head doorbell.
    pub fn cq_doorbell(&self, qid: u16, val: u32) {
        let mut work = Work::default();
        {
            let mut g = self.group(qid);
            let Some(cq) = g.cq.as_mut() else {
                drop(g);
                self.report(self.doorbell_error(
                    aer::ERR_INVALID_DOORBELL,
                    format_args!("CQ {qid} head {val}: no such queue"),
                ));
                return;
            };
            // The new head must lie within the entries the controller has posted.
            if val >= cq.size || (val + cq.size - cq.head) % cq.size > cq.outstanding() {
                drop(g);
                self.report(self.doorbell_error(
                    aer::ERR_INVALID_DOORBELL_VALUE,
                    format_args!("CQ {qid} head {val}: not within the entries posted"),
                ));
                return;
            }
            cq.head = val;
            self.cq_assert[usize::from(qid)]
                .store(cq.ien && cq.has_unconsumed(), Ordering::Relaxed);
            work.intx = true;
            let starved = std::mem::take(&mut cq.starved);
            if starved || self.flag(flag::SHADOW) {
                self.fetch_group(&mut g, None, &mut work);
            }
        }
        self.run_work(work);
    }

    /// Fetch from SQ `only` (or every SQ of the group) as far as the CQ has room, and keep the
    /// shadow EventIdx values right.
    fn fetch_group(&self, g: &mut Group, only: Option<u16>, work: &mut Work) {
        let mem = self.mem.memory().into_inner();
        let ns = self.ns.read().unwrap_or_else(|e| e.into_inner());
        let Group {
            cq,
            sqs,
            poll_until,
        } = g;
        let Some(cq) = cq.as_mut() else { return };
        for sq in sqs.iter_mut() {
            if only.is_none_or(|q| q == sq.id) {
                self.fetch_sq(cq, sq, poll_until, &mem, &ns, work);
            }
        }
    }

    fn fetch_sq(
        &self,
        cq: &mut CompQueue,
        sq: &mut SubQueue,
        poll_until: &mut Option<Instant>,
        mem: &Mem,
        ns: &[Namespace],
        work: &mut Work,
    ) {
        if sq.stopped || sq.delete_cid.is_some() {
            return;
        }
        let shadow = self.flag(flag::SHADOW);
        let (db, ei) = (
            self.shadow.0.load(Ordering::Acquire),
            self.shadow.1.load(Ordering::Acquire),
        );
        let (tail_slot, event_slot) = (db + u64::from(sq.id) * 8, ei + u64::from(sq.id) * 8);
        for _ in 0..MAX_ROUNDS {
            if shadow && !self.read_shadow_tail(sq, mem, tail_slot, work) {
                return;
            }
            if sq.tail != sq.paced_tail {
                // New submissions (not entries still waiting for room): the host's pace.
                sq.paced_tail = sq.tail;
                self.submitted(cq);
            }
            while sq.pending() > 0 {
                if !self.flag(flag::ACCEPTING)
                    || self.flag(flag::FATAL | flag::PAUSED)
                    || !self.irq.bus_master()
                {
                    return;
                }
                if self.inflight.load(Ordering::SeqCst) >= MAX_INFLIGHT {
                    self.flags.fetch_or(flag::STARVED, Ordering::SeqCst);
                    if self.inflight.load(Ordering::SeqCst) >= MAX_INFLIGHT {
                        return; // a completion clears STARVED and fetches again
                    }
                }
                if cq.room() == 0 && shadow {
                    self.sync_shadow_head(cq, mem, db);
                }
                if !cq.reserve() {
                    if shadow {
                        self.cq_event_idx(cq, mem, db, ei);
                    }
                    return;
                }
                let Ok(sqe) = sq.fetch(&**mem) else {
                    cq.unreserve();
                    work.fatal = Some("cannot read submission queue entry");
                    return;
                };
                sq.active = true;
                self.start_io(cq, sq, sqe, mem, ns, work);
            }
            if !shadow {
                return;
            }
            self.cq_event_idx(cq, mem, db, ei);
            // Keep the EventIdx behind the tail while commands are in flight (each completion
            // looks again) or while polling; ask for an MMIO doorbell only once idle.
            if sq.inflight == 0 && sq.active && self.cfg.poll_us > 0 {
                sq.active = false;
                *poll_until = Some(Instant::now() + Duration::from_micros(self.cfg.poll_us.into()));
                work.wake |= 1 << (self.thread_of(cq.id) % 64);
            }
            let behind = sq.inflight > 0 || poll_until.is_some();
            let event = if behind {
                (sq.tail + sq.size - 1) % sq.size
            } else {
                sq.tail
            };
            let _ = write_u32(&**mem, event_slot, event);
            std::sync::atomic::fence(Ordering::SeqCst);
            if behind {
                return;
            }
            // The host may have queued more after our last read but before seeing the EventIdx.
            if read_u32(&**mem, tail_slot) == Some(sq.tail) {
                return;
            }
        }
        // Still busy after MAX_ROUNDS: the I/O thread picks up the rest.
        *poll_until = Some(Instant::now());
        work.wake |= 1 << (self.thread_of(cq.id) % 64);
    }

    /// Adopt the host's shadow SQ tail. A value outside the queue is a bad doorbell write: it is
    /// reported and the queue stops, as for an MMIO write (nothing spins on it).
    fn read_shadow_tail(
        &self,
        sq: &mut SubQueue,
        mem: &GuestMemoryMmap,
        at: u64,
        work: &mut Work,
    ) -> bool {
        match read_u32(mem, at) {
            Some(t) if t < sq.size => {
                sq.tail = t;
                true
            }
            Some(t) => {
                static LIMIT: RateLimit = RateLimit::new();
                crate::warn_limited!(
                    LIMIT,
                    "nvme {}: shadow tail {t:#x} of SQ {} (size {}): queue stopped",
                    self.cfg.serial,
                    sq.id,
                    sq.size
                );
                sq.stopped = true;
                work.events.push(self.doorbell_error(
                    aer::ERR_INVALID_DOORBELL_VALUE,
                    format_args!("shadow SQ {} tail {t:#x}: queue stopped", sq.id),
                ));
                false
            }
            None => {
                work.fatal = Some("shadow doorbell buffer is not guest memory");
                false
            }
        }
    }

    /// Adopt the host's shadow CQ head if it is a legal value.
    fn sync_shadow_head(&self, cq: &mut CompQueue, mem: &GuestMemoryMmap, db: u64) {
        let Some(h) = read_u32(mem, db + u64::from(cq.id) * 8 + 4).filter(|&h| h < cq.size) else {
            return;
        };
        let advance = (h + cq.size - cq.head) % cq.size;
        if advance != 0 && advance <= cq.outstanding() {
            cq.head = h;
            self.cq_assert[usize::from(cq.id)]
                .store(cq.ien && cq.has_unconsumed(), Ordering::Relaxed);
        }
    }

    /// Tell a host using shadow doorbells whether its next CQ head update needs an MMIO doorbell:
    /// only when fetching waits for room (or INTx must follow the head).
    fn cq_event_idx(&self, cq: &mut CompQueue, mem: &GuestMemoryMmap, db: u64, ei: u64) {
        let slot = ei + u64::from(cq.id) * 8 + 4;
        for _ in 0..MAX_ROUNDS {
            let want_ring = cq.starved || self.irq.mode() == InterruptMode::Intx;
            let event = if want_ring {
                cq.head
            } else {
                (cq.head + cq.size - 1) % cq.size
            };
            let _ = write_u32(mem, slot, event);
            std::sync::atomic::fence(Ordering::SeqCst);
            if !want_ring {
                return;
            }
            // The host may have moved the head before it could see the new EventIdx.
            let before = cq.head;
            self.sync_shadow_head(cq, mem, db);
            if cq.head == before {
                return;
            }
            cq.starved = false;
        }
    }

    // ---- commands ----

    /// Validate a fetched command and start it (its CQ entry is reserved).
    fn start_io(
        &self,
        cq: &mut CompQueue,
        sq: &mut SubQueue,
        sqe: Sqe,
        mem: &Mem,
        ns: &[Namespace],
        work: &mut Work,
    ) {
        let op = IoOpcode(sqe.opcode());
        log::trace!(
            "nvme {}: sq {} cid {} {op} nsid {} cdw10-12 {:#x} {:#x} {:#x} dptr {:#x}/{:#x}",
            self.cfg.serial,
            sq.id,
            sqe.cid(),
            sqe.nsid,
            sqe.cdw10,
            sqe.cdw11,
            sqe.cdw12,
            sqe.dptr[0],
            sqe.dptr[1]
        );
        let plan = match self.prepare_io(sq, &sqe, mem, ns) {
            Ok(p) => p,
            Err(e) => {
                log::debug!(
                    "nvme {}: sq {} cid {} {op} refused: {e}",
                    self.cfg.serial,
                    sq.id,
                    sqe.cid()
                );
                work.errors.push((sq.id, sqe, e.status));
                self.latency.record(Duration::ZERO); // answered at once
                self.post_io(cq, sq, sqe.cid(), e.status, work);
                return;
            }
        };
        if matches!(plan, Plan::Nothing) {
            self.latency.record(Duration::ZERO);
            self.post_io(cq, sq, sqe.cid(), Status::SUCCESS, work);
            return;
        }
        let bytes = match &plan {
            Plan::Transfer { len, .. } => *len,
            _ => 0,
        };
        let slot = sq.park(Slot {
            sqe,
            parts: 0,
            status: Status::SUCCESS,
            bytes,
            chunks: None,
            abort_waiting: false,
            held: false,
            started: Instant::now(),
        });
        self.begin();
        let t = tag(cq.id, sq.id, sq.epoch, slot);
        if let Err(status) = self.launch(plan, t, cq.id, sq, slot, mem, work) {
            let s = sq.unpark(slot).expect("just parked");
            self.end(work);
            work.errors.push((sq.id, s.sqe, status));
            self.post_io(cq, sq, sqe.cid(), status, work);
        }
    }

    /// Submit a command's requests; on error nothing was submitted.
    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        plan: Plan,
        t: u64,
        cqid: u16,
        sq: &mut SubQueue,
        slot: u16,
        mem: &Mem,
        work: &mut Work,
    ) -> Result<(), Status> {
        let engine = self.engine(cqid);
        let ebit = 1 << (self.thread_of(cqid) % 64);
        let (parts, chunks) = match plan {
            Plan::Transfer {
                op,
                offset,
                len,
                fua,
                ptr,
                backend,
            } => {
                let mut walker = Walker::new(ptr, len, op == Op::Write)?;
                let mut iov = sq.take_iov();
                iov.set_memory(mem.clone());
                let mapped = map_chunk(&mut walker, &mut iov, mem).and_then(|more| {
                    // A large transfer: prove the whole pointer good before any data moves.
                    if more {
                        prp::validate(&**mem, ptr, len, op == Op::Write)?;
                    }
                    Ok(more)
                });
                let more = match mapped {
                    Ok(m) => m,
                    Err(e) => {
                        sq.give_iov(iov);
                        return Err(e);
                    }
                };
                let chunks = more.then(|| Chunks {
                    walker,
                    op,
                    offset: offset + iov.len(),
                    fua,
                    backend: backend.clone(),
                });
                engine.submit(IoReq {
                    tag: t,
                    op,
                    offset,
                    len: iov.len(),
                    fua,
                    iov,
                    backend,
                });
                work.engines |= ebit;
                (1, chunks)
            }
            Plan::Flush(backends) => {
                let n = backends.len() as u32;
                for backend in backends {
                    engine.submit(IoReq {
                        tag: t,
                        op: Op::Flush,
                        offset: 0,
                        len: 0,
                        fua: false,
                        iov: GuestIov::new(),
                        backend,
                    });
                }
                work.engines |= ebit;
                (n, None)
            }
            Plan::Zeroes {
                offset,
                len,
                fua,
                backend,
            } => {
                engine.submit(IoReq {
                    tag: t,
                    op: Op::WriteZeroes,
                    offset,
                    len,
                    fua,
                    iov: GuestIov::new(),
                    backend,
                });
                work.engines |= ebit;
                (1, None)
            }
            Plan::Blocking(job) => {
                let me = self.me.upgrade().ok_or(Status::INTERNAL_ERROR)?;
                self.pool.submit(Box::new(move || {
                    let status = job();
                    me.finish_part(t, status, None);
                }));
                (1, None)
            }
            Plan::Nothing => return Err(Status::INTERNAL_ERROR),
        };
        let s = sq.slots[usize::from(slot)].as_mut().expect("parked");
        s.parts = parts;
        s.chunks = chunks;
        Ok(())
    }

    fn prepare_io(
        &self,
        sq: &SubQueue,
        sqe: &Sqe,
        mem: &Mem,
        ns: &[Namespace],
    ) -> Result<Plan, NvmeError> {
        let op = IoOpcode(sqe.opcode());
        if sqe.fuse() != 0 {
            return Err(NvmeError::field("fused operations are not supported"));
        }
        if op == IoOpcode::FLUSH && sqe.nsid == NSID_ALL {
            return Ok(Plan::Flush(ns.iter().map(|n| n.backend.clone()).collect()));
        }
        let n = usize::try_from(sqe.nsid)
            .ok()
            .and_then(|n| n.checked_sub(1))
            .and_then(|i| ns.get(i))
            .ok_or(NvmeError::new(
                Status::INVALID_NAMESPACE,
                Reason::Namespace { nsid: sqe.nsid },
            ))?;
        let backend = n.backend.clone();
        let shift = n.lba_shift();
        let slba = u64::from(sqe.cdw10) | (u64::from(sqe.cdw11) << 32);
        let rw = Cdw12ReadWrite::from_bits(sqe.cdw12);
        let nlb = u64::from(rw.nlb()) + 1;
        let fua = rw.fua();
        let durable = fua || !self.volatile_wc.load(Ordering::Acquire);
        let max_bytes = if self.cfg.mdts == 0 {
            u64::MAX
        } else {
            4096u64 << self.cfg.mdts
        };
        let out_of_range = |slba: u64, nlb: u64| {
            NvmeError::new(
                Status::LBA_OUT_OF_RANGE,
                Reason::LbaRange {
                    slba,
                    nlb,
                    nsze: n.nsze(),
                },
            )
        };
        let read_only = || NvmeError::new(Status::NS_WRITE_PROTECTED, Reason::ReadOnly);
        let ranged = |limit: bool| -> Result<(u64, u64), NvmeError> {
            if !n.in_range(slba, nlb) {
                return Err(out_of_range(slba, nlb));
            }
            let len = nlb << shift;
            if limit && len > max_bytes {
                return Err(NvmeError::new(
                    Status::INVALID_FIELD,
                    Reason::TooLarge {
                        bytes: len,
                        max: max_bytes,
                    },
                ));
            }
            Ok((slba << shift, len))
        };
        let ptr = || DataPtr::of(sqe, sq.page);
        // Checked after the namespace, as it always was: a bad NSID with an unsupported
        // opcode reports the namespace.
        if crate::commands::io(&self.cfg, op).is_none() {
            return Err(NvmeError::new(Status::INVALID_OPCODE, Reason::Opcode));
        }
        Ok(match op {
            IoOpcode::READ | IoOpcode::WRITE => {
                let (offset, len) = ranged(true)?;
                let write = op == IoOpcode::WRITE;
                if write && n.read_only {
                    return Err(read_only());
                }
                Plan::Transfer {
                    op: if write { Op::Write } else { Op::Read },
                    offset,
                    len,
                    fua: write && durable,
                    ptr: ptr()?,
                    backend,
                }
            }
            IoOpcode::COMPARE => {
                let (offset, len) = ranged(true)?;
                let p = ptr()?;
                prp::validate(&**mem, p, len, true)?;
                let (me, mem) = (self.me()?, mem.clone());
                Plan::Blocking(Box::new(move || me.compare(&backend, &mem, p, offset, len)))
            }
            IoOpcode::VERIFY => {
                let (offset, len) = ranged(self.cfg.mdts != 0)?;
                let me = self.me()?;
                Plan::Blocking(Box::new(move || me.verify(&backend, offset, len)))
            }
            IoOpcode::WRITE_ZEROES => {
                let (offset, len) = ranged(false)?;
                if n.read_only {
                    return Err(read_only());
                }
                Plan::Zeroes {
                    offset,
                    len,
                    fua: durable,
                    backend,
                }
            }
            IoOpcode::DATASET_MANAGEMENT => {
                let nr = usize::from(Cdw10Dsm::from_bits(sqe.cdw10).nr()) + 1;
                let deallocate = Cdw11Dsm::from_bits(sqe.cdw11).ad();
                let segs = prp::collect(&**mem, ptr()?, (nr * 16) as u64, true)?;
                let mut raw = [0u8; 256 * 16];
                prp::copy_from_guest(&**mem, &segs, &mut raw[..nr * 16])?;
                let mut ranges = Vec::with_capacity(nr);
                for chunk in raw[..nr * 16].chunks_exact(16) {
                    let r = <DsmRange as zerocopy::FromBytes>::read_from_bytes(chunk)
                        .map_err(|_| NvmeError::field("range is not 16 bytes"))?;
                    if !n.in_range(r.slba, u64::from(r.nlb)) {
                        return Err(out_of_range(r.slba, u64::from(r.nlb)));
                    }
                    if r.nlb > 0 {
                        ranges.push((r.slba << shift, u64::from(r.nlb) << shift));
                    }
                }
                if !deallocate || ranges.is_empty() {
                    Plan::Nothing // attribute hints only: nothing to do
                } else if n.read_only {
                    return Err(read_only());
                } else {
                    let me = self.me()?;
                    Plan::Blocking(Box::new(move || {
                        for (off, len) in ranges {
                            if let Err(e) = backend.discard(off, len) {
                                return backend_status(&me, &e, true);
                            }
                        }
                        Status::SUCCESS
                    }))
                }
            }
            IoOpcode::FLUSH => Plan::Flush(vec![backend]),
            // In the table but without a handler: a bug, answered as the spec allows.
            _ => return Err(NvmeError::new(Status::INVALID_OPCODE, Reason::Opcode)),
        })
    }

    /// This controller, owned, for work that outlives the call (pool jobs).
    fn me(&self) -> Result<Arc<Shared>, NvmeError> {
        self.me.upgrade().ok_or(NvmeError::new(
            Status::INTERNAL_ERROR,
            Reason::Sequence("controller is being dropped"),
        ))
    }

    /// Compare: the disk's data against the host's, a bounded chunk at a time.
    fn compare(
        &self,
        b: &Arc<dyn BlockBackend>,
        mem: &Mem,
        p: DataPtr,
        off: u64,
        len: u64,
    ) -> Status {
        let Ok(mut walker) = Walker::new(p, len, true) else {
            return Status::DATA_TRANSFER_ERROR;
        };
        let stage = (len as usize).min(STAGE);
        let (mut disk, mut host) = (vec![0u8; stage], vec![0u8; stage]);
        let mut done = 0u64;
        loop {
            let seg = match walker.next(&**mem) {
                Ok(Some(seg)) => seg,
                Ok(None) => break,
                Err(e) => return e,
            };
            let Some(addr) = seg.addr else {
                return Status::SGL_TYPE_INVALID; // bit buckets carry no data to compare
            };
            let mut at = 0u64;
            while at < seg.len {
                let n = (seg.len - at).min(stage as u64) as usize;
                let read =
                    b.read_vectored(off + done, &mut [std::io::IoSliceMut::new(&mut disk[..n])]);
                if let Err(e) = read {
                    return backend_status(self, &e, false);
                }
                let guest = vm_memory::Bytes::read_slice(
                    &**mem,
                    &mut host[..n],
                    vm_memory::GuestAddress(addr + at),
                );
                if guest.is_err() {
                    return Status::DATA_TRANSFER_ERROR;
                }
                if disk[..n] != host[..n] {
                    self.counters.read_cmds.fetch_add(1, Ordering::Relaxed);
                    return Status::COMPARE_FAILURE;
                }
                at += n as u64;
                done += n as u64;
            }
        }
        self.counters.read_cmds.fetch_add(1, Ordering::Relaxed);
        Status::SUCCESS
    }

    /// Verify: read the range back (the data is checked by the backend's own I/O path).
    fn verify(&self, b: &Arc<dyn BlockBackend>, off: u64, len: u64) -> Status {
        let mut buf = vec![0u8; (len as usize).min(STAGE)];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            if let Err(e) =
                b.read_vectored(off + done, &mut [std::io::IoSliceMut::new(&mut buf[..n])])
            {
                return backend_status(self, &e, false);
            }
            done += n as u64;
        }
        self.counters.read_cmds.fetch_add(1, Ordering::Relaxed);
        Status::SUCCESS
    }

    // ---- completions ----

    /// Post a completion for a command of `sq` into its reserved CQ entry, then decide on the
    /// interrupt.
    fn post_io(
        &self,
        cq: &mut CompQueue,
        sq: &SubQueue,
        cid: u16,
        status: Status,
        work: &mut Work,
    ) {
        let mem = self.mem.memory();
        if cq
            .post(&*mem, make_cqe(sq.id, sq.head, cid, status, 0))
            .is_err()
        {
            work.fatal = Some("cannot write completion queue entry");
            return;
        }
        self.cq_assert[usize::from(cq.id)].store(cq.ien && cq.has_unconsumed(), Ordering::Relaxed);
        self.after_post(cq, work);
    }

    /// Interrupt now, later (a coalescing deadline on the CQ's I/O thread), or not at all.
    fn after_post(&self, cq: &mut CompQueue, work: &mut Work) {
        if !cq.ien {
            cq.irq_owed = false;
            return;
        }
        if self.irq.mode() == InterruptMode::Intx {
            cq.irq_owed = false;
            work.intx = true;
            return;
        }
        let iv = cq.iv;
        self.sync_head(cq);
        let outstanding = cq.outstanding();
        let c = &mut cq.coal;
        c.unsignalled += 1;
        let cd = self
            .vector_cd
            .get(usize::from(iv))
            .is_some_and(|v| v.load(Ordering::Relaxed));
        let agg = self.coalescing.load(Ordering::Relaxed);
        let (thr, time) = ((agg & 0xff) + 1, (agg >> 8) & 0xff);
        let hold = if cd {
            None
        } else if time != 0 {
            // Host-requested coalescing (feature 08h): the threshold, or at most TIME × 100 µs.
            (c.unsignalled < thr).then(|| Duration::from_micros(u64::from(time) * 100))
        } else if self.cfg.coalesce == Coalesce::Adaptive {
            self.adaptive(c, outstanding)
        } else {
            None
        };
        let Some(d) = hold else {
            return self.signal(cq, work);
        };
        let first = cq.coal.deadline.is_none();
        if !first && (self.cfg.coalesce != Coalesce::Adaptive || cq.reserved != 0) {
            return; // the I/O thread already waits for this CQ's deadline
        }
        let now = Instant::now();
        if first {
            cq.coal.deadline = Some(now + d);
        }
        match self.due(cq) {
            Some(due) if due <= now => self.signal(cq, work),
            Some(due) if cq.coal.wake_at.is_none_or(|w| due < w) => {
                cq.coal.wake_at = Some(due);
                self.cq_held[usize::from(cq.id)].store(true, Ordering::Release);
                if !work.held.contains(&cq.id) {
                    work.held.push(cq.id);
                }
            }
            _ => {}
        }
    }

    /// When a held interrupt must go out: at its deadline or, in adaptive mode, once the device
    /// has nothing left of the guest's and the guest has been quiet for twice its usual gap
    /// between submissions. A guest that waits for its completions (any fixed queue depth)
    /// submits nothing more, and holding its interrupt longer would only stall it.
    fn due(&self, cq: &CompQueue) -> Option<Instant> {
        let c = &cq.coal;
        let deadline = c.deadline?;
        if self.cfg.coalesce != Coalesce::Adaptive || cq.reserved != 0 {
            return Some(deadline);
        }
        let Some(quiet) = c.quiet_since else {
            return Some(deadline);
        };
        let grace = Duration::from_nanos(2 * u64::from(c.submit_gap_ns)).max(QUIET_MIN);
        Some(deadline.min(quiet + grace))
    }

    /// The I/O thread looks at a held interrupt: send it if due (in adaptive mode, drop it if
    /// the host has already consumed every entry, as a polling host does), else say when to
    /// look again.
    fn held_tick(&self, cq: &mut CompQueue, now: Instant, work: &mut Work) -> Option<Instant> {
        let due = self.due(cq)?;
        if due <= now {
            let adaptive = self.cfg.coalesce == Coalesce::Adaptive;
            if adaptive && self.coalescing.load(Ordering::Relaxed) >> 8 & 0xff == 0 {
                self.sync_head(cq);
                if cq.outstanding() == 0 {
                    self.cancel_hold(cq);
                    return None;
                }
            }
            self.signal(cq, work);
            return None;
        }
        let deadline = cq.coal.deadline?;
        let at = if due < deadline {
            // The guest is still submitting: look again later, backing off, so a busy guest
            // costs a few wake-ups per window rather than one per submission.
            let c = &mut cq.coal;
            let step = u64::from(c.recheck_ns).max(QUIET_MIN.as_nanos() as u64);
            c.recheck_ns = (step * 2).min(u64::from(u32::MAX)) as u32;
            due.max(now + Duration::from_nanos(step)).min(deadline)
        } else {
            deadline
        };
        cq.coal.wake_at = Some(at);
        Some(at)
    }

    /// Forget a held interrupt without sending it.
    fn cancel_hold(&self, cq: &mut CompQueue) {
        let c = &mut cq.coal;
        c.unsignalled = 0;
        c.deadline = None;
        c.wake_at = None;
        c.recheck_ns = 0;
        self.cq_held[usize::from(cq.id)].store(false, Ordering::Release);
    }

    /// Fetch from every queue (fetching stopped at [`MAX_INFLIGHT`] and room freed up).
    ///
    /// Completions during the refetch may ask for another one; that runs as a further round of
    /// this loop on the same thread, not as a nested call (which could recurse as deep as the
    /// guest's backlog).
    pub(crate) fn refetch_all(&self) {
        thread_local! {
            static ACTIVE: Cell<bool> = const { Cell::new(false) };
            static AGAIN: Cell<bool> = const { Cell::new(false) };
        }
        if ACTIVE.with(|a| a.replace(true)) {
            AGAIN.with(|a| a.set(true));
            return;
        }
        loop {
            AGAIN.with(|a| a.set(false));
            for g in self.groups.iter() {
                let mut work = Work::default();
                {
                    let mut g = crate::ctrl::lock(g);
                    if g.cq.is_none() {
                        continue;
                    }
                    self.fetch_group(&mut g, None, &mut work);
                }
                self.run_work(work);
            }
            if !AGAIN.with(Cell::get) {
                break;
            }
        }
        ACTIVE.with(|a| a.set(false));
    }

    /// The guest submitted on one of `cq`'s SQs: learn its pace (adaptive mode; one clock read
    /// per batch of submissions).
    fn submitted(&self, cq: &mut CompQueue) {
        if self.cfg.coalesce != Coalesce::Adaptive {
            return;
        }
        let now = Instant::now();
        let c = &mut cq.coal;
        if let Some(q) = c.quiet_since {
            // A long silence is the guest waiting for us or idle, not its pace.
            let cap = u128::from(self.cfg.coalesce_us) * 1000;
            let gap = now.duration_since(q).as_nanos().min(cap) as u32;
            c.submit_gap_ns = c.submit_gap_ns - c.submit_gap_ns / 8 + gap / 8;
        }
        c.quiet_since = Some(now);
    }

    /// Adaptive coalescing: how long to hold the interrupt for a completion, if at all.
    ///
    /// A guest that takes one completion per interrupt (queue depth 1, or a host that waits
    /// for each command) gets every interrupt at once. A guest with more in flight shows it in
    /// the entries it has not consumed when an interrupt goes out ([`Coalescing::depth`]); then
    /// completions are gathered up to twice that depth (at most 32) or for `coalesce_us`. At
    /// most every [`PROBE_EVERY`] an interrupt is held once to learn whether more would come
    /// (a guest slower than the device never shows its depth otherwise).
    fn adaptive(&self, c: &mut crate::queue::Coalescing, outstanding: u32) -> Option<Duration> {
        let hold = Duration::from_micros(self.cfg.coalesce_us.into());
        let deep = c.depth16 >= 2 * 16;
        if deep {
            let target = (c.depth16 * 2 / 16).clamp(2, ADAPTIVE_MAX_BATCH);
            return (outstanding < target).then_some(hold);
        }
        let now = Instant::now();
        if c.last_probe
            .is_none_or(|t| now.duration_since(t) >= PROBE_EVERY)
        {
            c.last_probe = Some(now);
            return (outstanding < ADAPTIVE_MAX_BATCH).then_some(hold);
        }
        None
    }

    /// With shadow doorbells, learn how far the host has consumed the CQ (it rings no doorbell).
    fn sync_head(&self, cq: &mut CompQueue) {
        if self.flag(flag::SHADOW) && cq.id != 0 {
            let mem = self.mem.memory();
            self.sync_shadow_head(cq, &mem, self.shadow.0.load(Ordering::Acquire));
        }
    }

    /// Send the CQ's interrupt (unless INTMS masks it, in which case it stays owed).
    fn signal(&self, cq: &mut CompQueue, work: &mut Work) {
        self.sync_head(cq);
        // How many entries this interrupt hands the guest: the depth it runs at.
        let n = cq.outstanding().min(ADAPTIVE_MAX_BATCH) * 16;
        let c = &mut cq.coal;
        c.depth16 = n.max(c.depth16 - c.depth16 / 8);
        c.unsignalled = 0;
        c.deadline = None;
        c.wake_at = None;
        c.recheck_ns = 0;
        self.cq_held[usize::from(cq.id)].store(false, Ordering::Release);
        if self.cfg.coalesce == Coalesce::Adaptive {
            c.quiet_since = Some(Instant::now());
        }
        if self.may_signal(cq.iv) {
            cq.irq_owed = false;
            work.irqs.push(cq.iv);
        }
    }

    /// A request (or blocking job) of command `t` finished with `status`.
    pub fn finish_part(&self, t: u64, status: Status, iov: Option<GuestIov>) {
        let mut work = Work::default();
        {
            let (cqid, ..) = untag(t);
            let mut g = self.group(cqid);
            self.complete_one(&mut g, t, status, iov, &mut work);
            g.sqs.retain(|s| !s.gone);
            if self.flag(flag::SHADOW) {
                self.fetch_group(&mut g, None, &mut work);
            }
        }
        self.run_work(work);
    }

    /// Complete a batch of reaped requests, taking each group's lock once per run of requests
    /// on the same queue.
    pub fn complete_batch(&self, done: &mut Vec<IoDone>, work: &mut Work) {
        let mut i = 0;
        while i < done.len() {
            let (cqid, ..) = untag(done[i].req.tag);
            let mut g = self.group(cqid);
            while i < done.len() && untag(done[i].req.tag).0 == cqid {
                let d = &mut done[i];
                let status = match &d.result {
                    Ok(()) => Status::SUCCESS,
                    Err(e) => {
                        if d.req.op == Op::Flush || (d.req.op == Op::Write && d.req.fua) {
                            self.mark_flush_failed(&d.req.backend);
                        }
                        backend_status(self, e, d.req.op != Op::Read)
                    }
                };
                let iov = std::mem::take(&mut d.req.iov);
                self.complete_one(&mut g, d.req.tag, status, Some(iov), work);
                i += 1;
            }
            g.sqs.retain(|s| !s.gone);
            // Shadow doorbells: submissions made while we were busy did not ring.
            if self.flag(flag::SHADOW) {
                self.fetch_group(&mut g, None, work);
            }
        }
        done.clear();
    }

    fn mark_flush_failed(&self, b: &Arc<dyn BlockBackend>) {
        for n in self.ns.read().unwrap_or_else(|e| e.into_inner()).iter() {
            if Arc::ptr_eq(&n.backend, b) {
                n.flush_failed.store(true, Ordering::Release);
            }
        }
    }

    /// Whether a durability promise for `sqe` is broken by an earlier failed flush.
    fn flush_broken(&self, sqe: &Sqe) -> bool {
        let ns = self.ns.read().unwrap_or_else(|e| e.into_inner());
        let durable = match IoOpcode(sqe.opcode()) {
            IoOpcode::FLUSH => true,
            IoOpcode::WRITE | IoOpcode::WRITE_ZEROES => {
                Cdw12ReadWrite::from_bits(sqe.cdw12).fua()
                    || !self.volatile_wc.load(Ordering::Acquire)
            }
            _ => false,
        };
        durable
            && ns.iter().enumerate().any(|(i, n)| {
                (sqe.nsid == NSID_ALL || sqe.nsid as usize == i + 1)
                    && n.flush_failed.load(Ordering::Acquire)
            })
    }

    fn complete_one(
        &self,
        g: &mut Group,
        t: u64,
        status: Status,
        iov: Option<GuestIov>,
        work: &mut Work,
    ) {
        let (_, sqid, epoch, slot) = untag(t);
        let Group { cq, sqs, .. } = g;
        let (Some(cq), Some(sq)) = (
            cq.as_mut(),
            sqs.iter_mut().find(|s| s.id == sqid && s.epoch == epoch),
        ) else {
            // The queue was deleted or the controller reset: a stale completion.
            self.end(work);
            return;
        };
        if let Some(iov) = iov {
            sq.give_iov(iov);
        }
        let Some(s) = sq.slots.get_mut(usize::from(slot)).and_then(Option::as_mut) else {
            self.end(work);
            return;
        };
        s.parts = s.parts.saturating_sub(1);
        if !status.is_success() && s.status.is_success() {
            s.status = status;
        }
        if s.parts > 0 {
            return;
        }
        if s.status.is_success() && s.chunks.is_some() && self.next_chunk(cq.id, sq, slot, t, work)
        {
            return;
        }
        self.end(work);
        self.finish_cmd(cq, sq, slot, work);
    }

    /// Start the next chunk of a large transfer; false when the command is finished.
    fn next_chunk(&self, cqid: u16, sq: &mut SubQueue, slot: u16, t: u64, work: &mut Work) -> bool {
        let mem = self.mem.memory().into_inner();
        let mut iov = sq.take_iov();
        let s = sq.slots[usize::from(slot)].as_mut().expect("in flight");
        let Some(ch) = s.chunks.as_mut() else {
            return false;
        };
        if !self.irq.bus_master() {
            s.status = Status::DATA_TRANSFER_ERROR;
            s.chunks = None;
            return false;
        }
        iov.set_memory(mem.clone());
        let more = match map_chunk(&mut ch.walker, &mut iov, &mem) {
            Ok(m) => m,
            Err(e) => {
                s.status = e;
                s.chunks = None;
                return false;
            }
        };
        if iov.is_empty() {
            s.chunks = None;
            return false;
        }
        let req = IoReq {
            tag: t,
            op: ch.op,
            offset: ch.offset,
            len: iov.len(),
            fua: ch.fua,
            iov,
            backend: ch.backend.clone(),
        };
        ch.offset += req.len;
        if !more {
            s.chunks = None;
        }
        s.parts = 1;
        self.engine(cqid).submit(req);
        work.engines |= 1 << (self.thread_of(cqid) % 64);
        true
    }

    /// Every part of the command in `slot` is done: post its completion.
    fn finish_cmd(&self, cq: &mut CompQueue, sq: &mut SubQueue, slot: u16, work: &mut Work) {
        if !self.irq.bus_master() {
            // No DMA while Bus Master Enable is clear: the CQE waits (its entry is reserved).
            if let Some(s) = sq.slots[usize::from(slot)].as_mut() {
                s.held = true;
            }
            return;
        }
        let Some(mut s) = sq.unpark(slot) else { return };
        self.latency.record(s.started.elapsed());
        if s.status.is_success() && self.flush_broken(&s.sqe) {
            s.status = Status::WRITE_FAULT;
        }
        let c = &self.counters;
        match IoOpcode(s.sqe.opcode()) {
            IoOpcode::READ if s.status.is_success() => {
                c.read_cmds.fetch_add(1, Ordering::Relaxed);
                c.bytes_read.fetch_add(s.bytes, Ordering::Relaxed);
            }
            IoOpcode::WRITE if s.status.is_success() => {
                c.write_cmds.fetch_add(1, Ordering::Relaxed);
                c.bytes_written.fetch_add(s.bytes, Ordering::Relaxed);
            }
            IoOpcode::WRITE_ZEROES if s.status.is_success() => {
                c.write_cmds.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        if !s.status.is_success() {
            work.errors.push((sq.id, s.sqe, s.status));
        }
        if s.abort_waiting {
            work.aborts_done.push((sq.id, s.sqe.cid()));
        }
        self.post_io(cq, sq, s.sqe.cid(), s.status, work);
        if sq.inflight == 0 {
            if let Some((epoch, cid)) = sq.delete_cid.take() {
                // Delete I/O SQ waited for this: the queue goes now.
                self.sq_cq[usize::from(sq.id)].store(0, Ordering::Release);
                sq.stopped = true;
                sq.gone = true;
                work.admin_done.push((epoch, cid, Status::SUCCESS, 0));
            }
        }
    }

    /// Bus Master Enable came back: post held completions and resume fetching.
    pub fn resume(&self) {
        for cqid in 1..self.groups.len() as u16 {
            let mut work = Work::default();
            {
                let mut g = self.group(cqid);
                let Group { cq, sqs, .. } = &mut *g;
                let Some(cq) = cq.as_mut() else { continue };
                for sq in sqs.iter_mut() {
                    let held: Vec<u16> = sq
                        .slots
                        .iter()
                        .enumerate()
                        .filter(|(_, s)| s.as_ref().is_some_and(|s| s.held))
                        .map(|(i, _)| i as u16)
                        .collect();
                    for slot in held {
                        self.finish_cmd(cq, sq, slot, &mut work);
                    }
                }
                g.sqs.retain(|s| !s.gone);
                self.fetch_group(&mut g, None, &mut work);
            }
            self.run_work(work);
        }
        let mut c = self.lock();
        self.process_admin(&mut c);
    }

    /// An absorbed SQ tail doorbell of queue `qid` (ioeventfd): re-read the shadow doorbell.
    pub fn kick(&self, qid: u16) {
        if qid == 0 || usize::from(qid) >= self.sq_cq.len() || !self.flag(flag::SHADOW) {
            return;
        }
        self.sq_doorbell(qid, None);
    }

    /// Whether the host queued submissions on one of the group's SQs since we last looked.
    fn shadow_moved(&self, g: &Group) -> bool {
        let db = self.shadow.0.load(Ordering::Acquire);
        let mem = self.mem.memory();
        g.sqs
            .iter()
            .any(|s| !s.stopped && read_u32(&*mem, db + u64::from(s.id) * 8) != Some(s.tail))
    }

    /// Queues served by I/O thread `thread`.
    fn my_groups(&self, thread: usize) -> impl Iterator<Item = u16> + '_ {
        (1..self.groups.len() as u16).filter(move |&q| self.thread_of(q) == thread)
    }
}

impl IoHandler for Shared {
    fn completions(&self, thread: usize, done: &mut Vec<IoDone>) {
        CURRENT.with(|c| c.set(Some(thread)));
        LAST_DONE.with(|c| c.set(Some(Instant::now())));
        let mut work = Work::default();
        self.complete_batch(done, &mut work);
        self.run_work(work);
    }

    fn tick(&self, thread: usize, now: Instant) -> Tick {
        CURRENT.with(|c| c.set(Some(thread)));
        let mut next = Tick::Idle;
        for cqid in self.my_groups(thread) {
            let mut work = Work::default();
            {
                // A group busy on another thread is being served there; look again soon.
                let Ok(mut g) = self.groups[usize::from(cqid)].try_lock() else {
                    next = next.min(Tick::At(now + Duration::from_micros(20)));
                    continue;
                };
                if let Some(cq) = g.cq.as_mut() {
                    if let Some(at) = self.held_tick(cq, now, &mut work) {
                        next = next.min(Tick::At(at));
                    }
                }
                if let Some(until) = g.poll_until {
                    if now < until {
                        if self.shadow_moved(&g) {
                            self.counters.polled.fetch_add(1, Ordering::Relaxed);
                            self.fetch_group(&mut g, None, &mut work);
                        }
                        next = Tick::Spin;
                    } else {
                        // The window ended: re-arm EventIdx so the host rings again.
                        g.poll_until = None;
                        self.fetch_group(&mut g, None, &mut work);
                        if g.poll_until.is_some() {
                            next = Tick::Spin;
                        }
                    }
                }
            }
            self.run_work(work);
        }
        if AGAIN.with(|a| a.replace(false)) {
            next = Tick::Spin;
        }
        // Polled mode: while requests are in flight and completions keep coming, spin on the
        // completion ring instead of sleeping until the kernel signals.
        if self.cfg.poll_us > 0 {
            let busy = self
                .threads
                .get()
                .is_some_and(|t| t[thread].engine().in_flight() > 0);
            let recent = LAST_DONE.with(Cell::get).is_some_and(|t| {
                now.saturating_duration_since(t) < Duration::from_micros(self.cfg.poll_us.into())
            });
            if busy && recent {
                next = Tick::Spin;
            }
        }
        next
    }
}
