//! Block requests: a descriptor chain checked and turned into zero-copy backend I/O, and the
//! completions that post used buffers and interrupt.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use block::{Engine, GuestIov, IoDone, IoHandler, IoReq, Op, Tick};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryMmap};
use zerocopy::FromBytes;

use crate::spec::{blk_status, req, status, BlkReqHeader, DiscardWriteZeroes, SECTOR};
use crate::transport::{Pending, Vq};
use crate::{lock, Shared};

thread_local! {
    /// The I/O thread index of this thread, if it is one.
    static CURRENT: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Largest single data segment the driver may use (`size_max`).
pub(crate) const SIZE_MAX: u32 = 1 << 20;
/// Most sectors one discard or write-zeroes range may cover.
pub(crate) const MAX_RANGE_SECTORS: u32 = 1 << 22;
/// Most ranges one discard or write-zeroes request may carry.
pub(crate) const MAX_RANGES: u32 = 64;

/// Most data segments in a request (`seg_max`): bounded by the ring, and by what one backend
/// request carries.
pub(crate) fn seg_max(qsz: u16) -> u32 {
    // A chain may not be longer than the queue (§2.7.5.3.1): header and status take two.
    u32::from(qsz).saturating_sub(2).clamp(1, 254)
}

/// A request tag: queue (16 bits), its epoch (32), the chain's head (16).
fn tag(q: u16, epoch: u32, head: u16) -> u64 {
    (u64::from(q) << 48) | (u64::from(epoch) << 16) | u64::from(head)
}

fn untag(t: u64) -> (u16, u32, u16) {
    ((t >> 48) as u16, (t >> 16) as u32, t as u16)
}

/// A chain's buffers: `(guest address, length)`, device-readable ones first.
struct Chain {
    readable: Vec<(u64, u32)>,
    writable: Vec<(u64, u32)>,
}

impl Chain {
    fn bytes(segs: &[(u64, u32)]) -> u64 {
        segs.iter().map(|&(_, l)| u64::from(l)).sum()
    }
}

/// What became of one chain.
enum Started {
    /// Backend requests are running.
    Running,
    /// Answered at once.
    Done {
        status: u8,
        used_len: u32,
        status_addr: u64,
    },
    /// No status byte to answer with: the device needs a reset.
    Broken(&'static str),
}

impl Shared {
    fn engine(&self, q: u16) -> &Engine {
        let t = self.threads.get().expect("threads start with the device");
        t[usize::from(q) % t.len()].engine()
    }

    /// The driver notified queue `q`: start every request it made available.
    pub(crate) fn notify(&self, q: u16) {
        self.drain(q);
    }

    /// Start every request queue `q` has available. With polling on, notifications then stay
    /// off for a window in which the queue's I/O thread watches the ring instead.
    fn drain(&self, q: u16) {
        let Some(m) = self.queues.get(usize::from(q)) else {
            return;
        };
        let st = self.status.load(Ordering::Acquire);
        if st & status::DRIVER_OK == 0
            || st & status::DEVICE_NEEDS_RESET != 0
            || !self.irq.bus_master()
            || self.paused.load(Ordering::SeqCst)
        {
            // Nothing can be served now: no polling window may stay open for it.
            lock(m).poll_until = None;
            return;
        }
        let mem: Arc<GuestMemoryMmap> = self.mem.memory().into_inner();
        let engine = self.engine(q);
        let mut vq = lock(m);
        if !vq.q.ready() || vq.broken {
            vq.poll_until = None;
            return;
        }
        let epoch = vq.epoch;
        let mut used = false;
        let mut taken = 0;
        // Why the queue cannot go on, if it cannot: reported after what was started is
        // submitted and what was finished is signalled.
        let mut broken: Option<String> = None;
        loop {
            // Take what is available now (at most a ring's worth: the iterator refuses an
            // available index more than the ring size ahead), then start each.
            let announced = vq.q.avail_idx(&*mem, std::sync::atomic::Ordering::Acquire);
            let chains: Vec<_> = match vq.q.iter(&*mem) {
                Ok(it) => it.collect(),
                Err(e) => {
                    broken = Some(format!("available ring: {e}"));
                    break;
                }
            };
            if chains.is_empty() && announced.is_ok_and(|a| a.0 != vq.q.next_avail()) {
                broken = Some("available entries that cannot be read".into());
                break;
            }
            taken += chains.len();
            for chain in chains {
                self.counters.requests.fetch_add(1, Ordering::Relaxed);
                let head = chain.head_index();
                match self.start(&mut vq, chain, &mem, engine) {
                    Started::Running => {}
                    Started::Done {
                        status,
                        used_len,
                        status_addr,
                    } => {
                        self.latency.record(std::time::Duration::ZERO); // answered at once
                        used |= self.post(&mut vq, &mem, head, status, used_len, status_addr);
                    }
                    Started::Broken(why) => {
                        broken = Some(format!("head {head}: {why}"));
                        break;
                    }
                }
            }
            if broken.is_some() {
                break;
            }
            if self.opts.poll_us > 0 && (taken > 0 || vq.poll_until.is_some()) {
                // Leave notifications off (with EVENT_IDX, avail_event simply stays behind)
                // and let the I/O thread look for more until the window closes.
                let fresh = vq.poll_until.is_none();
                if taken > 0 || fresh {
                    vq.poll_until = Some(
                        Instant::now() + std::time::Duration::from_micros(self.opts.poll_us.into()),
                    );
                }
                if fresh {
                    let _ = vq.q.disable_notification(&*mem);
                    self.wake_thread_of(q);
                }
                break;
            }
            // Re-arm, then look once more: a request made available meanwhile is not missed.
            match vq.q.enable_notification(&*mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    broken = Some(format!("event index: {e}"));
                    break;
                }
            }
        }
        if used {
            self.maybe_signal(&mut vq, &mem);
        }
        drop(vq);
        let mut done = Vec::new();
        engine.commit_and_reap(&mut done);
        self.complete(&mut done);
        if let Some(why) = broken {
            #[cfg(feature = "test-support")]
            crate::test_hooks::queue_broken();
            self.break_queue(q, epoch, &why);
        }
    }

    /// Make queue `q`'s I/O thread look at its queues now (a polling window opened).
    fn wake_thread_of(&self, q: u16) {
        let Some(t) = self.threads.get() else { return };
        let i = usize::from(q) % t.len();
        if CURRENT.with(std::cell::Cell::get) != Some(i) {
            t[i].wake();
        }
    }

    /// The I/O thread's look at a polled queue: drain it if the driver made more available,
    /// or close the window (notifications back on) once it has passed. True while it is open.
    fn poll_queue(&self, q: u16, now: Instant) -> bool {
        let mem: Arc<GuestMemoryMmap> = self.mem.memory().into_inner();
        let Ok(mut vq) = self.queues[usize::from(q)].try_lock() else {
            return true; // busy on another thread: look again
        };
        let Some(until) = vq.poll_until else {
            return false;
        };
        let more =
            vq.q.avail_idx(&*mem, std::sync::atomic::Ordering::Acquire)
                .map_or(true, |i| i.0 != vq.q.next_avail());
        if now < until && !more {
            return true;
        }
        if now >= until && !more {
            vq.poll_until = None;
            match vq.q.enable_notification(&*mem) {
                Ok(false) => return false,
                Ok(true) => {} // one slipped in while notifications were off
                Err(_) => return false,
            }
        }
        drop(vq);
        self.drain(q);
        true
    }

    /// Queue `q`, as it was in `epoch`, cannot go on: stop it and ask the driver for a reset.
    /// Nothing happens if the queue was reset since (its error went with it).
    fn break_queue(&self, q: u16, epoch: u32, why: &str) {
        log::debug!(
            "virtio-blk {}: queue {q}: {why}; device needs reset",
            self.opts.serial
        );
        // DEVICE_NEEDS_RESET is set with the queue still locked (lock order: a queue, then the
        // transport): a reset the driver starts meanwhile waits for this queue, so the flag
        // lands before the reset clears the status, never after it (when it would outlive
        // the reset and device_status would never read 0 again).
        let Some(m) = self.queues.get(usize::from(q)) else {
            return;
        };
        let mut vq = lock(m);
        if vq.epoch != epoch {
            return;
        }
        vq.broken = true;
        vq.poll_until = None;
        self.needs_reset();
    }

    /// Check one chain and start it.
    fn start(
        &self,
        vq: &mut Vq,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &Arc<GuestMemoryMmap>,
        engine: &Engine,
    ) -> Started {
        let head = chain.head_index();
        // A buffer may not be made available again before it is used (virtio 1.2 §2.7.13):
        // accepting it would let one head stand for any number of requests in flight.
        if vq
            .pending
            .get(usize::from(head))
            .is_some_and(Option::is_some)
        {
            return Started::Broken("a head made available again while in flight");
        }
        let mut c = Chain {
            readable: Vec::new(),
            writable: Vec::new(),
        };
        // No chain may be longer than the ring plus one indirect table of the ring's size; the
        // queue's iterator already stops a loop, this stops an oversized indirect table.
        let limit = 2 * usize::from(vq.q.max_size()) + 2;
        let mut order_ok = true;
        for d in chain {
            if c.readable.len() + c.writable.len() >= limit {
                return Started::Broken("a chain longer than the ring and an indirect table");
            }
            if d.is_write_only() {
                c.writable.push((d.addr().0, d.len()));
            } else {
                order_ok &= c.writable.is_empty();
                c.readable.push((d.addr().0, d.len()));
            }
        }
        // The status byte is the last byte of the last device-writable buffer.
        let Some(&(last_addr, last_len)) = c.writable.last() else {
            return Started::Broken("no device-writable buffer for the status byte");
        };
        if last_len == 0 {
            return Started::Broken("an empty last buffer holds no status byte");
        }
        let status_addr = last_addr.wrapping_add(u64::from(last_len) - 1);
        if mem.check_address(GuestAddress(status_addr)).is_none() {
            return Started::Broken("the status byte is outside guest RAM");
        }
        let fail = |status| Started::Done {
            status,
            used_len: 1,
            status_addr,
        };
        if !order_ok {
            return fail(blk_status::IOERR); // a readable buffer after a writable one
        }
        let mut hdr = [0u8; 16];
        if read_region(mem, &c.readable, 0, &mut hdr).is_err() {
            return fail(blk_status::IOERR);
        }
        let h = BlkReqHeader::read_from_bytes(&hdr).expect("16 bytes");
        // The status byte is not data.
        let wdata = Chain::bytes(&c.writable) - 1;
        let rdata = Chain::bytes(&c.readable) - 16;
        let ebit = (vq.index, vq.epoch);
        let t = tag(ebit.0, ebit.1, head);
        let info = self.backend.info();
        match h.type_ {
            req::IN | req::OUT => {
                let write = h.type_ == req::OUT;
                if write && info.read_only {
                    return fail(blk_status::IOERR);
                }
                let (segs, skip, len) = if write {
                    (&c.readable, 16, rdata)
                } else {
                    (&c.writable, 0, wdata)
                };
                if let Err(s) = self.check_range(h.sector, len, info) {
                    return fail(s);
                }
                // Data segments only: the header shares the first readable buffer at most.
                if segs.len() > seg_max(self.opts.qsz) as usize + 1
                    || segs.iter().any(|&(_, l)| l > SIZE_MAX)
                {
                    return fail(blk_status::IOERR);
                }
                let mut iov = GuestIov::new();
                iov.set_memory(mem.clone());
                if map_region(&mut iov, segs, skip, len).is_err() {
                    return fail(blk_status::IOERR);
                }
                if len == 0 {
                    return fail(blk_status::OK);
                }
                let used_len = if write { 1 } else { len as u32 + 1 };
                self.park(vq, head, status_addr, 1, used_len);
                engine.submit(IoReq {
                    tag: t,
                    op: if write { Op::Write } else { Op::Read },
                    offset: h.sector * SECTOR,
                    len,
                    fua: write && !self.writeback.load(Ordering::Relaxed),
                    iov,
                    backend: self.backend.clone(),
                });
                Started::Running
            }
            req::FLUSH => {
                self.park(vq, head, status_addr, 1, 1);
                engine.submit(IoReq {
                    tag: t,
                    op: Op::Flush,
                    offset: 0,
                    len: 0,
                    fua: false,
                    iov: GuestIov::new(),
                    backend: self.backend.clone(),
                });
                Started::Running
            }
            req::GET_ID => {
                let mut id = [0u8; req::ID_BYTES];
                let s = self.opts.serial.as_bytes();
                id[..s.len()].copy_from_slice(s);
                let n = (wdata as usize).min(req::ID_BYTES);
                if write_region(mem, &c.writable, &id[..n]).is_err() {
                    return fail(blk_status::IOERR);
                }
                Started::Done {
                    status: blk_status::OK,
                    used_len: n as u32 + 1,
                    status_addr,
                }
            }
            req::DISCARD | req::WRITE_ZEROES => {
                let zeroes = h.type_ == req::WRITE_ZEROES;
                if info.read_only {
                    return fail(blk_status::IOERR);
                }
                let n = rdata / 16;
                if !rdata.is_multiple_of(16) || n == 0 || n > u64::from(MAX_RANGES) {
                    return fail(blk_status::IOERR);
                }
                let mut raw = [0u8; 16 * MAX_RANGES as usize];
                let raw = &mut raw[..rdata as usize];
                if read_region(mem, &c.readable, 16, raw).is_err() {
                    return fail(blk_status::IOERR);
                }
                let mut ranges = Vec::with_capacity(n as usize);
                for r in raw.chunks_exact(16) {
                    let r = DiscardWriteZeroes::read_from_bytes(r).expect("16 bytes");
                    let allowed = if zeroes { 1 } else { 0 }; // unmap is write zeroes' only flag
                    if r.flags & !allowed != 0 {
                        return fail(blk_status::UNSUPP);
                    }
                    if r.num_sectors > MAX_RANGE_SECTORS {
                        return fail(blk_status::IOERR);
                    }
                    let len = u64::from(r.num_sectors) * SECTOR;
                    if let Err(s) = self.check_range(r.sector, len, info) {
                        return fail(s);
                    }
                    if len > 0 {
                        ranges.push((r.sector * SECTOR, len));
                    }
                }
                if ranges.is_empty() {
                    return fail(blk_status::OK);
                }
                self.park(vq, head, status_addr, ranges.len() as u32, 1);
                if !self.writeback.load(Ordering::Relaxed) {
                    if let Some(Some(p)) = vq.pending.get_mut(usize::from(head)) {
                        p.flush_after = true;
                    }
                }
                for (offset, len) in ranges {
                    engine.submit(IoReq {
                        tag: t,
                        op: if zeroes { Op::WriteZeroes } else { Op::Discard },
                        offset,
                        len,
                        fua: false,
                        iov: GuestIov::new(),
                        backend: self.backend.clone(),
                    });
                }
                Started::Running
            }
            _ => fail(blk_status::UNSUPP),
        }
    }

    /// `len` bytes from 512-byte sector `sector`: inside the disk and on its block boundaries.
    fn check_range(&self, sector: u64, len: u64, info: block::BackendInfo) -> Result<(), u8> {
        let block = u64::from(info.sector_size);
        let offset = sector.checked_mul(SECTOR).ok_or(blk_status::IOERR)?;
        let end = offset.checked_add(len).ok_or(blk_status::IOERR)?;
        if end > info.capacity || !offset.is_multiple_of(block) || !len.is_multiple_of(block) {
            return Err(blk_status::IOERR);
        }
        Ok(())
    }

    /// Record a started request.
    fn park(&self, vq: &mut Vq, head: u16, status_addr: u64, parts: u32, used_len: u32) {
        self.inflight.fetch_add(parts as usize, Ordering::AcqRel);
        if let Some(p) = vq.pending.get_mut(usize::from(head)) {
            *p = Some(Pending {
                status_addr,
                parts,
                status: blk_status::OK,
                used_len,
                flush_after: false,
                started: Instant::now(),
            });
        }
    }

    /// Write the status byte and put the chain on the used ring; true if it was posted.
    fn post(
        &self,
        vq: &mut Vq,
        mem: &GuestMemoryMmap,
        head: u16,
        status: u8,
        used_len: u32,
        status_addr: u64,
    ) -> bool {
        if status != blk_status::OK {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        if mem.write_obj(status, GuestAddress(status_addr)).is_err() {
            return false; // checked when the chain was parsed; the map cannot have shrunk
        }
        if let Err(e) = vq.q.add_used(mem, head, used_len) {
            log::debug!("virtio-blk {}: used ring: {e}", self.opts.serial);
            vq.broken = true;
            vq.poll_until = None;
            self.needs_reset(); // lock order: a queue, then the transport
            return false;
        }
        true
    }

    /// Interrupt for the used buffers if the driver asked for it (EVENT_IDX or flags).
    fn maybe_signal(&self, vq: &mut Vq, mem: &GuestMemoryMmap) {
        if vq.q.needs_notification(mem).unwrap_or(true) {
            self.signal(vq);
        }
    }

    /// Backend requests finished.
    pub(crate) fn complete(&self, done: &mut Vec<IoDone>) {
        if done.is_empty() {
            return;
        }
        let mem: Arc<GuestMemoryMmap> = self.mem.memory().into_inner();
        let mut flushes: Vec<u16> = Vec::new();
        let mut i = 0;
        while i < done.len() {
            let (q, ..) = untag(done[i].req.tag);
            let Some(m) = self.queues.get(usize::from(q)) else {
                i += 1;
                continue;
            };
            let mut vq = lock(m);
            let mut used = false;
            while i < done.len() && untag(done[i].req.tag).0 == q {
                let d = &done[i];
                let (_, epoch, head) = untag(d.req.tag);
                let ok = match &d.result {
                    Ok(()) => {
                        let c = &self.counters;
                        match d.req.op {
                            Op::Read => c.read_bytes.fetch_add(d.req.len, Ordering::Relaxed),
                            Op::Write => c.written_bytes.fetch_add(d.req.len, Ordering::Relaxed),
                            _ => 0,
                        };
                        true
                    }
                    Err(e) => {
                        log::debug!("virtio-blk {}: backend: {e}", self.opts.serial);
                        false
                    }
                };
                i += 1;
                self.inflight.fetch_sub(1, Ordering::AcqRel);
                if epoch != vq.epoch {
                    continue; // the queue was reset meanwhile
                }
                let Some(Some(p)) = vq.pending.get_mut(usize::from(head)) else {
                    continue;
                };
                if !ok {
                    p.status = blk_status::IOERR;
                }
                p.parts -= 1;
                if p.parts > 0 {
                    continue;
                }
                if std::mem::take(&mut p.flush_after) && p.status == blk_status::OK {
                    // The ranges are done; now make them durable, then answer.
                    p.parts = 1;
                    self.inflight.fetch_add(1, Ordering::AcqRel);
                    let engine = self.engine(q);
                    engine.submit(IoReq {
                        tag: d.req.tag,
                        op: Op::Flush,
                        offset: 0,
                        len: 0,
                        fua: false,
                        iov: GuestIov::new(),
                        backend: self.backend.clone(),
                    });
                    flushes.push(q);
                    continue;
                }
                let p = vq.pending[usize::from(head)].take().expect("present");
                self.latency.record(p.started.elapsed());
                used |= self.post(&mut vq, &mem, head, p.status, p.used_len, p.status_addr);
            }
            if used {
                self.maybe_signal(&mut vq, &mem);
            }
        }
        done.clear();
        // Flushes started above: submit them (and finish any that completed at once).
        flushes.sort_unstable();
        flushes.dedup();
        for q in flushes {
            let mut more = Vec::new();
            self.engine(q).commit_and_reap(&mut more);
            self.complete(&mut more);
        }
        if self.inflight.load(Ordering::Acquire) == 0 {
            self.finish_reset_if_idle();
            let _guard = lock(&self.idle.0);
            self.idle.1.notify_all();
        }
    }

    /// Wait until no backend request is in flight.
    pub(crate) fn wait_idle(&self) {
        let mut g = lock(&self.idle.0);
        while self.inflight.load(Ordering::Acquire) != 0 {
            g = self
                .idle
                .1
                .wait_timeout(g, std::time::Duration::from_millis(10))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl IoHandler for Shared {
    fn completions(&self, thread: usize, done: &mut Vec<IoDone>) {
        CURRENT.with(|c| c.set(Some(thread)));
        self.complete(done);
    }

    fn tick(&self, thread: usize, now: Instant) -> Tick {
        CURRENT.with(|c| c.set(Some(thread)));
        let n = self.threads.get().map_or(1, Vec::len);
        let mut polling = false;
        for q in (thread..self.queues.len()).step_by(n) {
            polling |= self.poll_queue(q as u16, now);
        }
        if polling {
            Tick::Spin
        } else {
            Tick::Idle
        }
    }
}

/// Copy `dst.len()` bytes starting `skip` bytes into the buffers `segs`.
fn read_region(
    mem: &GuestMemoryMmap,
    segs: &[(u64, u32)],
    mut skip: u64,
    dst: &mut [u8],
) -> Result<(), ()> {
    let mut at = 0;
    for &(addr, len) in segs {
        let len = u64::from(len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = ((len - skip) as usize).min(dst.len() - at);
        mem.read_slice(
            &mut dst[at..at + n],
            GuestAddress(addr.checked_add(skip).ok_or(())?),
        )
        .map_err(|_| ())?;
        at += n;
        skip = 0;
        if at == dst.len() {
            return Ok(());
        }
    }
    if at == dst.len() {
        Ok(())
    } else {
        Err(())
    }
}

/// Copy `src` to the start of the buffers `segs`.
fn write_region(mem: &GuestMemoryMmap, segs: &[(u64, u32)], src: &[u8]) -> Result<(), ()> {
    let mut at = 0;
    for &(addr, len) in segs {
        if at == src.len() {
            break;
        }
        let n = (len as usize).min(src.len() - at);
        mem.write_slice(&src[at..at + n], GuestAddress(addr))
            .map_err(|_| ())?;
        at += n;
    }
    Ok(())
}

/// Add `len` bytes of the buffers `segs`, from `skip` bytes in, to `iov`.
fn map_region(iov: &mut GuestIov, segs: &[(u64, u32)], mut skip: u64, len: u64) -> Result<(), ()> {
    let mut left = len;
    for &(addr, l) in segs {
        if left == 0 {
            break;
        }
        let l = u64::from(l);
        if skip >= l {
            skip -= l;
            continue;
        }
        let n = (l - skip).min(left);
        iov.push_guest(addr.checked_add(skip).ok_or(())?, n)
            .map_err(|_| ())?;
        left -= n;
        skip = 0;
    }
    if left == 0 {
        Ok(())
    } else {
        Err(())
    }
}
