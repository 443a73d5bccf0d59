//! Submission and completion queues: ring arithmetic, fetching SQEs, posting CQEs, and the
//! bookkeeping that bounds what the controller holds.
//!
//! Queue memory is guest memory named by the host; every fetch and post goes through `vm-memory`
//! and a failure is reported to the caller (who fails the controller), never a panic.
//!
//! **Bounded by construction.** A command is fetched only after it has *reserved* a slot in its
//! completion queue ([`CompQueue::reserve`]), so a completion always has room and nothing is
//! ever parked in host memory waiting for the host to free CQ slots; the controller simply stops
//! fetching from an SQ whose CQ is full (Base 2.0 §3.3.1.2 lets it). Every command in flight
//! sits in one of its SQ's [`Slot`]s, of which there are at most as many as the SQ has entries.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::spec::{Cqe, Sqe, Status};

/// Queue memory named by the host could not be read or written (it is not guest RAM).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueMemFault;

/// What the next chunk of a large transfer needs.
#[derive(Clone)]
pub struct Chunks {
    /// Where the data pointer walk stands.
    pub walker: crate::prp::Walker,
    /// Read or write.
    pub op: block::Op,
    /// Disk offset of the next chunk.
    pub offset: u64,
    /// Force Unit Access.
    pub fua: bool,
    /// The namespace's backend.
    pub backend: std::sync::Arc<dyn block::BlockBackend>,
}

impl std::fmt::Debug for Chunks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chunks")
            .field("op", &self.op)
            .field("offset", &self.offset)
            .finish()
    }
}

/// A command fetched and not yet completed.
#[derive(Clone, Debug)]
pub struct Slot {
    /// The command as fetched.
    pub sqe: Sqe,
    /// Backend requests (or blocking jobs) of this command still running.
    pub parts: u32,
    /// The first error any part reported.
    pub status: Status,
    /// Bytes the command moves (for the counters).
    pub bytes: u64,
    /// A large transfer runs chunk after chunk; this is the rest.
    pub chunks: Option<Chunks>,
    /// An Abort is waiting for this command.
    pub abort_waiting: bool,
    /// Finished while Bus Master Enable was clear: the completion waits for BME.
    pub held: bool,
    /// When it was fetched (latency statistics).
    pub started: std::time::Instant,
}

/// A submission queue.
#[derive(Debug)]
pub struct SubQueue {
    /// Queue ID.
    pub id: u16,
    /// Guest physical address of entry 0.
    pub base: u64,
    /// Number of entries (up to 65536, so wider than the 16-bit QSIZE field).
    pub size: u32,
    /// Next entry the controller fetches.
    pub head: u32,
    /// Host-written tail.
    pub tail: u32,
    /// Memory page size (CC.MPS) for this queue's PRPs.
    pub page: u64,
    /// Distinguishes this queue from earlier ones with the same ID (stale completions).
    pub epoch: u16,
    /// Commands in flight, indexed by slot number; `None` is free.
    pub slots: Vec<Option<Slot>>,
    /// Free slot numbers.
    pub free: Vec<u16>,
    /// Commands fetched but not yet completed.
    pub inflight: u32,
    /// A Delete I/O SQ waiting for `inflight` to drain: (admin queue epoch, command's CID).
    pub delete_cid: Option<(u16, u16)>,
    /// The host wrote a bad doorbell value through its shadow buffer: the queue has stopped.
    pub stopped: bool,
    /// Recycled data-buffer lists (bounded by the number of slots).
    pub iovs: Vec<block::GuestIov>,
    /// Commands were fetched since the queue was last idle (starts a shadow polling window).
    pub active: bool,
    /// Deleted: leaves its group when the lock is next released.
    pub gone: bool,
    /// The tail when the host's submission pace was last sampled (adaptive coalescing).
    pub paced_tail: u32,
}

impl SubQueue {
    /// A new, empty SQ.
    pub fn new(id: u16, base: u64, size: u32, page: u64, epoch: u16) -> Self {
        SubQueue {
            id,
            base,
            size,
            head: 0,
            tail: 0,
            page,
            epoch,
            slots: Vec::new(),
            free: Vec::new(),
            inflight: 0,
            delete_cid: None,
            stopped: false,
            iovs: Vec::new(),
            active: false,
            gone: false,
            paced_tail: 0,
        }
    }

    /// Entries the host has submitted that the controller has not fetched.
    pub fn pending(&self) -> u32 {
        (self.tail + self.size - self.head) % self.size
    }

    /// Fetch the entry at `head` and advance it.
    pub fn fetch<M: GuestMemory>(&mut self, mem: &M) -> Result<Sqe, QueueMemFault> {
        let addr = self.base.wrapping_add(u64::from(self.head) * 64);
        let sqe: Sqe = crate::prp::read_struct(mem, addr).ok_or(QueueMemFault)?;
        self.head = (self.head + 1) % self.size;
        Ok(sqe)
    }

    /// Park a fetched command in a free slot; returns the slot number. There is always one: a
    /// queue of `size` entries holds at most `size - 1` commands.
    pub fn park(&mut self, slot: Slot) -> u16 {
        self.inflight += 1;
        match self.free.pop() {
            Some(i) => {
                self.slots[usize::from(i)] = Some(slot);
                i
            }
            None => {
                self.slots.push(Some(slot));
                (self.slots.len() - 1) as u16
            }
        }
    }

    /// Release slot `i` and return its command.
    pub fn unpark(&mut self, i: u16) -> Option<Slot> {
        let s = self.slots.get_mut(usize::from(i))?.take()?;
        self.free.push(i);
        self.inflight -= 1;
        Some(s)
    }

    /// A data-buffer list to fill (recycled when possible).
    pub fn take_iov(&mut self) -> block::GuestIov {
        self.iovs.pop().unwrap_or_default()
    }

    /// Return a data-buffer list for reuse. The pool keeps a few small lists per queue, so what
    /// it holds stays bounded whatever the guest's transfers looked like.
    pub fn give_iov(&mut self, mut iov: block::GuestIov) {
        const POOL: usize = 64;
        const POOLED_SEGMENTS: usize = 64;
        if self.iovs.len() < POOL.min(self.size as usize) && iov.capacity() <= POOLED_SEGMENTS {
            iov.clear();
            self.iovs.push(iov);
        }
    }

    /// The slot holding command `cid`, if it is in flight.
    pub fn find_cid(&self, cid: u16) -> Option<u16> {
        self.slots
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.sqe.cid() == cid))
            .map(|i| i as u16)
    }
}

/// Interrupt coalescing state of one completion queue.
#[derive(Debug, Default, Clone, Copy)]
pub struct Coalescing {
    /// Completions posted since the last interrupt.
    pub unsignalled: u32,
    /// When the oldest of them was posted, if a deadline applies.
    pub deadline: Option<std::time::Instant>,
    /// Entries the guest takes per interrupt (a decaying maximum, ×16), adaptive mode.
    pub depth16: u32,
    /// When adaptive mode last held an interrupt to look for a deeper queue.
    pub last_probe: Option<std::time::Instant>,
    /// When the guest last submitted on this CQ's SQs, or last got an interrupt, whichever is
    /// later (adaptive mode): the start of the time the guest is "thinking".
    pub quiet_since: Option<std::time::Instant>,
    /// How long the guest usually takes to submit again (a moving average, ns).
    pub submit_gap_ns: u32,
    /// When the CQ's I/O thread was last told to look at this CQ.
    pub wake_at: Option<std::time::Instant>,
    /// How long the I/O thread waits before it looks again at a guest that keeps submitting
    /// while its interrupt is held (doubles each time, ns).
    pub recheck_ns: u32,
}

/// A completion queue.
#[derive(Debug)]
pub struct CompQueue {
    /// Queue ID.
    pub id: u16,
    /// Guest physical address of entry 0.
    pub base: u64,
    /// Number of entries (up to 65536).
    pub size: u32,
    /// Host-written head.
    pub head: u32,
    /// Next slot the controller writes.
    pub tail: u32,
    /// Current phase tag.
    pub phase: bool,
    /// Interrupts enabled.
    pub ien: bool,
    /// Interrupt vector.
    pub iv: u16,
    /// Entries promised to fetched commands and not yet posted.
    pub reserved: u32,
    /// An interrupt is owed for entries posted since the last one was raised.
    pub irq_owed: bool,
    /// A fetch stopped for want of room: the host must tell us when it frees entries.
    pub starved: bool,
    /// Coalescing state.
    pub coal: Coalescing,
}

impl CompQueue {
    /// A new, empty CQ.
    pub fn new(id: u16, base: u64, size: u32, ien: bool, iv: u16) -> Self {
        CompQueue {
            id,
            base,
            size,
            head: 0,
            tail: 0,
            phase: true,
            ien,
            iv,
            reserved: 0,
            irq_owed: false,
            starved: false,
            coal: Coalescing::default(),
        }
    }

    /// Entries posted that the host has not consumed.
    pub fn outstanding(&self) -> u32 {
        (self.tail + self.size - self.head) % self.size
    }

    /// Entries posted that the host has not consumed.
    pub fn has_unconsumed(&self) -> bool {
        self.head != self.tail
    }

    /// Free entries not promised to a command already fetched.
    pub fn room(&self) -> u32 {
        (self.size - 1).saturating_sub(self.outstanding() + self.reserved)
    }

    /// Promise an entry to a command about to be fetched; false when there is no room.
    pub fn reserve(&mut self) -> bool {
        if self.room() == 0 {
            self.starved = true;
            return false;
        }
        self.reserved += 1;
        true
    }

    /// Give back a promised entry without posting (the command's queue went away).
    pub fn unreserve(&mut self) {
        self.reserved = self.reserved.saturating_sub(1);
    }

    /// Post `cqe` into the entry reserved for it (its phase bit is set here).
    pub fn post<M: GuestMemory>(&mut self, mem: &M, mut cqe: Cqe) -> Result<(), QueueMemFault> {
        self.unreserve();
        if (self.tail + 1) % self.size == self.head {
            // Cannot happen while every post has a reservation; refuse rather than overwrite.
            return Err(QueueMemFault);
        }
        cqe.status = (cqe.status & !1) | u16::from(self.phase);
        let addr = self.base.wrapping_add(u64::from(self.tail) * 16);
        // Write DW0-DW2 first and the DW3 (CID + status with phase) last: a host polling the phase
        // bit must never see a new phase with stale contents.
        let bytes = zerocopy::IntoBytes::as_bytes(&cqe);
        mem.write_slice(&bytes[..12], GuestAddress(addr))
            .map_err(|_| QueueMemFault)?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        mem.write_slice(&bytes[12..], GuestAddress(addr + 12))
            .map_err(|_| QueueMemFault)?;
        self.tail = (self.tail + 1) % self.size;
        if self.tail == 0 {
            self.phase = !self.phase;
        }
        self.irq_owed = true;
        Ok(())
    }
}

/// A completion queue and the submission queues that post to it: the unit of locking on the I/O
/// path. Two groups never share a lock, so queues on different CQs never contend.
#[derive(Debug, Default)]
pub struct Group {
    /// The CQ (`None` while the ID is free).
    pub cq: Option<CompQueue>,
    /// SQs bound to the CQ (Linux binds one per CQ).
    pub sqs: Vec<SubQueue>,
    /// The queues went idle: poll their shadow doorbells until then before re-arming EventIdx.
    pub poll_until: Option<std::time::Instant>,
}

impl Group {
    /// The SQ with ID `qid` in this group.
    pub fn sq_mut(&mut self, qid: u16) -> Option<&mut SubQueue> {
        self.sqs.iter_mut().find(|s| s.id == qid)
    }

    /// The SQ with ID `qid` in this group.
    pub fn sq(&self, qid: u16) -> Option<&SubQueue> {
        self.sqs.iter().find(|s| s.id == qid)
    }
}

/// Build a CQE for a command.
pub fn make_cqe(sqid: u16, sq_head: u32, cid: u16, status: Status, dw0: u32) -> Cqe {
    Cqe {
        dw0,
        dw1: 0,
        sq_head: sq_head as u16,
        sq_id: sqid,
        cid,
        status: status.field() << 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn phase_flips_on_wrap_and_reservations_bound_fetching() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut cq = CompQueue::new(1, 0x1000, 3, true, 0);
        // size 3 holds 2 entries: two reservations, then no room.
        assert!(cq.reserve() && cq.reserve());
        assert!(!cq.reserve() && cq.starved);
        for cid in 0..2 {
            cq.post(&mem, make_cqe(1, 0, cid, Status::SUCCESS, 0))
                .unwrap();
        }
        assert_eq!((cq.tail, cq.room()), (2, 0));
        let c: Cqe = crate::prp::read_struct(&mem, 0x1010).unwrap();
        assert_eq!((c.cid, c.status & 1), (1, 1));
        cq.head = 2;
        assert!(cq.reserve());
        cq.post(&mem, make_cqe(1, 0, 3, Status::SUCCESS, 0))
            .unwrap();
        assert_eq!((cq.tail, cq.phase), (0, false));
        let c: Cqe = crate::prp::read_struct(&mem, 0x1020).unwrap();
        assert_eq!((c.cid, c.status & 1), (3, 1));
        // A post without room is refused instead of overwriting an unconsumed entry.
        cq.head = 1;
        assert!(cq
            .post(&mem, make_cqe(1, 0, 4, Status::SUCCESS, 0))
            .is_err());
    }
}
