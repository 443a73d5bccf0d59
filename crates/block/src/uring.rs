//! One io_uring and the requests it carries. The only other `unsafe` of the block layer beside
//! `guest`: pushing a submission entry hands the kernel raw pointers (the request's iovec array
//! and, through it, guest memory), so the request must stay put until its completion is reaped.
//! [`Ring`] guarantees that by owning every submitted request in a slab until then.
#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use io_uring::{opcode, squeue, types, IoUring};

use crate::req::{IoReq, Op};

/// A ring plus the requests in flight on it, indexed by their `user_data`.
///
/// At most as many requests are in the kernel as the completion queue has entries: more would
/// overflow it, and the kernel keeps overflowed completions until an `io_uring_enter` asks for
/// events (and refuses submissions meanwhile). The rest wait in `backlog`, in order, and go in
/// as completions are reaped.
pub(crate) struct Ring {
    ring: IoUring,
    slab: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// Entries pushed but not yet passed to the kernel.
    unsubmitted: usize,
    /// Most requests in the kernel at once (the completion queue's size).
    cap: usize,
    /// Requests waiting for room.
    backlog: VecDeque<Slot>,
}

/// A request in flight and the bytes it still has to move (after short transfers).
pub(crate) struct Slot {
    pub(crate) req: IoReq,
    pub(crate) fd: i32,
    /// Bytes already transferred before the current submission.
    pub(crate) done: u64,
}

/// What one reaped completion means.
pub(crate) enum Reaped {
    /// The request finished: `res` is the last result (bytes or `-errno`).
    Finished(Slot, i32),
}

impl Ring {
    /// A ring with `entries` submission slots whose completions signal `eventfd`. (Not only the
    /// async ones: a completion the kernel posts through the submitter's task work is neither
    /// "async" nor visible when the submitter reaps right after submitting, and it would
    /// otherwise sit in the ring unnoticed.)
    pub(crate) fn new(entries: u32, eventfd: BorrowedFd<'_>) -> io::Result<Ring> {
        let ring = IoUring::new(entries.next_power_of_two().clamp(8, 4096))?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        let cap = ring.params().cq_entries() as usize;
        Ok(Ring {
            ring,
            slab: Vec::new(),
            free: Vec::new(),
            unsubmitted: 0,
            cap,
            backlog: VecDeque::new(),
        })
    }

    /// Requests handed to the ring and not yet reaped (waiting ones included).
    pub(crate) fn in_flight(&self) -> usize {
        self.in_kernel() + self.backlog.len()
    }

    fn in_kernel(&self) -> usize {
        self.slab.len() - self.free.len()
    }

    /// Queue `req` on descriptor `fd` (no syscall unless the submission ring is full). On
    /// failure the request comes back with the error.
    pub(crate) fn push(
        &mut self,
        req: IoReq,
        fd: BorrowedFd<'_>,
    ) -> Result<(), (IoReq, io::Error)> {
        let slot = Slot {
            req,
            fd: fd.as_raw_fd(),
            done: 0,
        };
        if self.in_kernel() >= self.cap || !self.backlog.is_empty() {
            self.backlog.push_back(slot);
            return Ok(());
        }
        match self.start(slot) {
            Ok(()) => Ok(()),
            // The submission ring would not take it: it waits like any request beyond the
            // completion ring's size (started on the next reap).
            Err((slot, e)) if e.raw_os_error() == Some(libc::EAGAIN) => {
                self.backlog.push_back(slot);
                Ok(())
            }
            Err((slot, e)) => Err((slot.req, e)),
        }
    }

    /// Put `slot` in the slab and queue its entry.
    fn start(&mut self, slot: Slot) -> Result<(), (Slot, io::Error)> {
        let idx = match self.free.pop() {
            Some(i) => {
                self.slab[i] = Some(slot);
                i
            }
            None => {
                self.slab.push(Some(slot));
                self.slab.len() - 1
            }
        };
        self.queue(idx).map_err(|e| {
            let slot = self.slab[idx].take().expect("just filled");
            self.free.push(idx);
            (slot, e)
        })
    }

    /// Build and push the submission entry for slab slot `idx`.
    fn queue(&mut self, idx: usize) -> io::Result<()> {
        let s = self.slab[idx].as_ref().expect("queued slot is occupied");
        let fd = types::Fd(s.fd);
        let off = s.req.offset + s.done;
        let iov = s.req.iov.raw();
        let n = iov.len().min(crate::guest::IOV_MAX) as u32;
        let entry = match s.req.op {
            Op::Read => opcode::Readv::new(fd, iov.as_ptr(), n).offset(off).build(),
            Op::Write => {
                let flags = if s.req.fua { libc::RWF_DSYNC } else { 0 };
                opcode::Writev::new(fd, iov.as_ptr(), n)
                    .offset(off)
                    .rw_flags(flags)
                    .build()
            }
            Op::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Op::Discard | Op::WriteZeroes => {
                return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
            }
        }
        .user_data(idx as u64);
        self.push_entry(&entry)
    }

    fn push_entry(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        // Never more in the kernel than the completion queue holds, so a submission always
        // makes room: one retry after submitting is enough.
        for _ in 0..2 {
            // SAFETY: the entry points at the request's iovec array (a heap buffer owned by the
            // request) and, through it, at guest memory the request keeps mapped. The request
            // stays in `self.slab` until the completion for this user_data is reaped; the slab
            // may move its slots when it grows, but the heap buffer does not move with them, and
            // the iovec `Vec` is not touched while the request is in flight. The fd stays open
            // because the request holds an `Arc` of its backend.
            let pushed = unsafe { self.ring.submission().push(entry) };
            if pushed.is_ok() {
                self.unsubmitted += 1;
                return Ok(());
            }
            // Submission ring full: hand what is queued to the kernel and retry.
            self.submit()?;
        }
        Err(io::Error::from_raw_os_error(libc::EAGAIN))
    }

    /// Pass queued entries to the kernel (one `io_uring_enter`).
    pub(crate) fn submit(&mut self) -> io::Result<()> {
        if self.unsubmitted == 0 {
            return Ok(());
        }
        loop {
            match self.ring.submit() {
                Ok(_) => {
                    self.unsubmitted = 0;
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // Completion ring momentarily full: the caller reaps, then submits again.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Submit what is queued and reap what is already complete, without the completion eventfd
    /// firing for completions this call reaps itself (the kernel finishes many requests during
    /// the submission). Notifications are off only inside this call; a completion posted after
    /// it re-enables them signals as usual, and one posted before is reaped by its second look.
    pub(crate) fn submit_and_reap(&mut self, out: &mut Vec<Reaped>) -> io::Result<()> {
        self.ring.completion().disable_eventfd();
        let r = self.submit();
        self.reap(out);
        self.ring.completion().enable_eventfd();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.reap(out);
        r.and_then(|()| self.submit())
    }

    /// Reap every completion the kernel has posted. Short transfers and EINTR/EAGAIN are
    /// resubmitted here; finished requests go to `out`.
    pub(crate) fn reap(&mut self, out: &mut Vec<Reaped>) {
        let mut again = Vec::new();
        for cqe in self.ring.completion() {
            let idx = cqe.user_data() as usize;
            let res = cqe.result();
            let Some(slot) = self.slab.get_mut(idx).and_then(Option::as_mut) else {
                log::error!("io_uring: completion for unknown request {idx}");
                continue;
            };
            let rw = matches!(slot.req.op, Op::Read | Op::Write);
            if res == -libc::EINTR || res == -libc::EAGAIN {
                again.push(idx);
                continue;
            }
            if rw && res > 0 && (res as u64) < slot.req.iov.len() {
                // Short transfer: move past what was done and ask for the rest.
                slot.done += res as u64;
                slot.req.iov.advance(res as u64);
                again.push(idx);
                continue;
            }
            let slot = self.slab[idx].take().expect("checked above");
            self.free.push(idx);
            out.push(Reaped::Finished(slot, res));
        }
        for idx in again {
            if let Err(e) = self.queue(idx) {
                let slot = self.slab[idx].take().expect("requeued slot is occupied");
                self.free.push(idx);
                out.push(Reaped::Finished(
                    slot,
                    -e.raw_os_error().unwrap_or(libc::EIO),
                ));
            }
        }
        // Room freed up: start waiting requests.
        while self.in_kernel() < self.cap {
            let Some(slot) = self.backlog.pop_front() else {
                break;
            };
            if let Err((slot, e)) = self.start(slot) {
                out.push(Reaped::Finished(
                    slot,
                    -e.raw_os_error().unwrap_or(libc::EIO),
                ));
            }
        }
    }
}
