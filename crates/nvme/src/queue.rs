//! Submission and completion queues: ring arithmetic, fetching SQEs and posting CQEs.
//!
//! Queue memory is guest memory named by the host; every fetch and post goes through `vm-memory`
//! and a failure is reported to the caller (who fails the controller), never a panic. A completion
//! that finds its CQ full waits in `overflow` until the host frees slots, so no entry is dropped or
//! overwritten.

use std::collections::VecDeque;

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::spec::{Cqe, Sqe, Status};

/// Queue memory named by the host could not be read or written (it is not guest RAM).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueMemFault;

/// A submission queue.
#[derive(Debug)]
pub struct SubQueue {
    /// Guest physical address of entry 0.
    pub base: u64,
    /// Number of entries (up to 65536, so wider than the 16-bit QSIZE field).
    pub size: u32,
    /// Next entry the controller fetches.
    pub head: u32,
    /// Host-written tail.
    pub tail: u32,
    /// The completion queue this SQ posts to.
    pub cqid: u16,
    /// Commands fetched but not yet completed.
    pub inflight: u32,
    /// A Delete I/O SQ waiting for `inflight` to drain: the admin command's CID.
    pub delete_cid: Option<u16>,
}

impl SubQueue {
    /// True when the host has submitted entries the controller has not fetched.
    pub fn has_work(&self) -> bool {
        self.head != self.tail
    }

    /// Fetch the entry at `head` and advance it.
    pub fn fetch<M: GuestMemory>(&mut self, mem: &M) -> Result<Sqe, QueueMemFault> {
        let addr = self.base.wrapping_add(u64::from(self.head) * 64);
        let sqe: Sqe = crate::prp::read_struct(mem, addr).ok_or(QueueMemFault)?;
        self.head = (self.head + 1) % self.size;
        Ok(sqe)
    }
}

/// A completion queue.
#[derive(Debug)]
pub struct CompQueue {
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
    /// Completions waiting for space.
    pub overflow: VecDeque<Cqe>,
    /// An interrupt is owed for entries posted since the last one was raised.
    pub irq_owed: bool,
}

impl CompQueue {
    /// A new, empty CQ.
    pub fn new(base: u64, size: u32, ien: bool, iv: u16) -> Self {
        CompQueue {
            base,
            size,
            head: 0,
            tail: 0,
            phase: true,
            ien,
            iv,
            overflow: VecDeque::new(),
            irq_owed: false,
        }
    }

    fn full(&self) -> bool {
        (self.tail + 1) % self.size == self.head
    }

    /// Entries posted that the host has not consumed.
    pub fn has_unconsumed(&self) -> bool {
        self.head != self.tail
    }

    /// Number of entries posted that the host has not consumed.
    pub fn outstanding(&self) -> u32 {
        (self.tail + self.size - self.head) % self.size
    }

    /// Post `cqe` (its phase bit is set here), or queue it while the CQ is full.
    pub fn post<M: GuestMemory>(&mut self, mem: &M, cqe: Cqe) -> Result<(), QueueMemFault> {
        if self.full() || !self.overflow.is_empty() {
            self.overflow.push_back(cqe);
            return Ok(());
        }
        self.write(mem, cqe)
    }

    fn write<M: GuestMemory>(&mut self, mem: &M, mut cqe: Cqe) -> Result<(), QueueMemFault> {
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

    /// The host moved the head: post waiting completions into the freed slots.
    pub fn drain_overflow<M: GuestMemory>(&mut self, mem: &M) -> Result<(), QueueMemFault> {
        while !self.full() {
            let Some(c) = self.overflow.pop_front() else {
                break;
            };
            self.write(mem, c)?;
        }
        Ok(())
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
    fn phase_flips_on_wrap_and_overflow_waits() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut cq = CompQueue::new(0x1000, 3, true, 0);
        for cid in 0..4 {
            cq.post(&mem, make_cqe(1, 0, cid, Status::SUCCESS, 0))
                .unwrap();
        }
        // size 3 holds 2 entries before it is full (head = 0).
        assert_eq!(cq.tail, 2);
        assert_eq!(cq.overflow.len(), 2);
        let c: Cqe = crate::prp::read_struct(&mem, 0x1010).unwrap();
        assert_eq!((c.cid, c.status & 1), (1, 1));
        cq.head = 2;
        cq.drain_overflow(&mem).unwrap();
        assert_eq!((cq.tail, cq.phase), (1, false));
        let c: Cqe = crate::prp::read_struct(&mem, 0x1000).unwrap();
        assert_eq!((c.cid, c.status & 1), (3, 0), "second lap has phase 0");
    }
}
