//! [`Engine`]: asynchronous, zero-copy execution of block requests.
//!
//! A device model builds an [`IoReq`] (operation, offset, a [`GuestIov`] over guest memory, the
//! backend), calls [`Engine::submit`] for each request of a doorbell's batch and
//! [`Engine::commit`] once, then [`Engine::reap`]s whatever is already finished — on the same
//! thread, so a request the kernel completes during submission (page-cache hits, a RAM disk)
//! costs no thread hop at all. Requests that really go asynchronous are reaped by an
//! [`crate::IoThread`] woken through [`Engine::notify_fd`].
//!
//! Where a request runs is the backend's choice ([`crate::Dispatch`]): io_uring on the image's
//! descriptor, inline on the caller (RAM), or on the worker pool (anything that may block:
//! discard, write-zeroes, misaligned `O_DIRECT`, test backends). With
//! [`EngineKind::Threads`], or when io_uring cannot be set up here, the pool serves
//! everything; that fallback is reported once on stderr.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rustix::event::{eventfd, EventfdFlags};

use crate::req::{IoDone, IoReq, Op};
use crate::uring::{Reaped, Ring, Slot};
use crate::{BlockError, Dispatch, Executor, Result};

/// Which engine serves a device (`aio=` option).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum EngineKind {
    /// io_uring, one ring per I/O thread (the default).
    #[default]
    IoUring,
    /// A pool of worker threads running blocking calls.
    Threads,
}

impl std::str::FromStr for EngineKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "io_uring" | "io-uring" | "uring" => Ok(EngineKind::IoUring),
            "threads" | "thread" => Ok(EngineKind::Threads),
            _ => Err(format!("aio={s} is invalid: use io_uring or threads")),
        }
    }
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EngineKind::IoUring => "io_uring",
            EngineKind::Threads => "threads",
        })
    }
}

struct Inner {
    kind: EngineKind,
    ring: Option<Mutex<Ring>>,
    /// Finished inline and pool requests waiting to be reaped.
    done: Mutex<Vec<IoDone>>,
    pool: Arc<Executor>,
    notify: OwnedFd,
    in_flight: AtomicUsize,
}

/// Submission and completion of block requests; cheap to clone (a handle).
#[derive(Clone)]
pub struct Engine(Arc<Inner>);

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("kind", &self.0.kind)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

static FALLBACK_SAID: AtomicBool = AtomicBool::new(false);

impl Engine {
    /// An engine of `kind` with room for about `depth` requests in its ring; blocking work goes
    /// to `pool`. If io_uring is wanted but unavailable, the engine uses the pool and says so
    /// once on stderr.
    pub fn new(kind: EngineKind, depth: u32, pool: Arc<Executor>) -> std::io::Result<Engine> {
        let notify = eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC)?;
        let mut effective = kind;
        let ring = match kind {
            EngineKind::Threads => None,
            EngineKind::IoUring => match Ring::new(depth, notify.as_fd()) {
                Ok(r) => Some(Mutex::new(r)),
                Err(e) => {
                    if !FALLBACK_SAID.swap(true, Ordering::Relaxed) {
                        eprintln!(
                            "rhyve: io_uring is unavailable here ({e}); using worker threads (aio=threads)"
                        );
                    }
                    effective = EngineKind::Threads;
                    None
                }
            },
        };
        Ok(Engine(Arc::new(Inner {
            kind: effective,
            ring,
            done: Mutex::new(Vec::new()),
            pool,
            notify,
            in_flight: AtomicUsize::new(0),
        })))
    }

    /// The engine actually in use (io_uring may have fallen back to threads).
    pub fn kind(&self) -> EngineKind {
        self.0.kind
    }

    /// Readable when completions may be waiting (async io_uring completions, pool results).
    pub fn notify_fd(&self) -> BorrowedFd<'_> {
        self.0.notify.as_fd()
    }

    /// Requests submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.0.in_flight.load(Ordering::Acquire)
    }

    /// Start `req`. Never blocks on the disk; the result arrives through [`Engine::reap`].
    /// Call [`Engine::commit`] after a batch, then `reap`.
    pub fn submit(&self, req: IoReq) {
        self.0.in_flight.fetch_add(1, Ordering::AcqRel);
        let inner = &self.0;
        let backend = Arc::clone(&req.backend);
        match backend.dispatch() {
            Dispatch::Inline => {
                let result = run_sync(&req);
                lock(&inner.done).push(IoDone { req, result });
            }
            Dispatch::Fd { .. } if precheck(&req).is_err() => {
                let result = precheck(&req);
                lock(&inner.done).push(IoDone { req, result });
            }
            Dispatch::Fd { fd, direct }
                if inner.ring.is_some()
                    && matches!(req.op, Op::Read | Op::Write | Op::Flush)
                    && direct.is_none_or(|a| aligned(&req, a)) =>
            {
                let mut ring = lock(inner.ring.as_ref().expect("checked"));
                if let Err((req, e)) = ring.push(req, fd) {
                    drop(ring);
                    log::error!("io_uring submission failed: {e}");
                    lock(&inner.done).push(IoDone {
                        req,
                        result: Err(BlockError::Io(e)),
                    });
                }
            }
            _ => {
                let me = Arc::clone(&self.0);
                inner.pool.submit(Box::new(move || {
                    let result = run_sync(&req);
                    lock(&me.done).push(IoDone { req, result });
                    let _ = rustix::io::write(&me.notify, &1u64.to_ne_bytes());
                }));
            }
        }
    }

    /// Hand the batch queued since the last submission to the kernel and move every finished
    /// request to `out`: what the kernel completes during the submission is reaped here, on
    /// the submitting thread, without waking the I/O thread.
    pub fn commit_and_reap(&self, out: &mut Vec<IoDone>) {
        let before = out.len();
        {
            let mut d = lock(&self.0.done);
            out.append(&mut d);
        }
        if let Some(r) = &self.0.ring {
            let mut reaped = Vec::new();
            if let Err(e) = lock(r).submit_and_reap(&mut reaped) {
                log::error!("io_uring_enter failed: {e}");
            }
            for Reaped::Finished(slot, res) in reaped {
                out.push(finish_uring(slot, res));
            }
        }
        let n = out.len() - before;
        if n > 0 {
            self.0.in_flight.fetch_sub(n, Ordering::AcqRel);
        }
    }

    /// Hand the batch queued since the last submission to the kernel (without reaping).
    pub fn commit(&self) {
        if let Some(r) = &self.0.ring {
            if let Err(e) = lock(r).submit() {
                log::error!("io_uring_enter failed: {e}");
            }
        }
    }

    /// Move every finished request to `out` (non-blocking). Does not clear the notification
    /// (the I/O thread does, see [`Engine::clear_notify`]), so it costs no syscall when nothing
    /// went to the kernel.
    pub fn reap(&self, out: &mut Vec<IoDone>) {
        let before = out.len();
        {
            let mut d = lock(&self.0.done);
            out.append(&mut d);
        }
        if let Some(r) = &self.0.ring {
            let mut reaped = Vec::new();
            {
                let mut ring = lock(r);
                ring.reap(&mut reaped);
                // Resubmissions of short transfers were queued by reap.
                if let Err(e) = ring.submit() {
                    log::error!("io_uring_enter failed: {e}");
                }
            }
            for Reaped::Finished(slot, res) in reaped {
                out.push(finish_uring(slot, res));
            }
        }
        let n = out.len() - before;
        if n > 0 {
            self.0.in_flight.fetch_sub(n, Ordering::AcqRel);
        }
    }

    /// Consume the notification (after waking on [`Engine::notify_fd`], before reaping).
    pub fn clear_notify(&self) {
        let mut buf = [0u8; 8];
        let _ = rustix::io::read(&self.0.notify, &mut buf);
    }

    /// Requests currently inside the io_uring (for tests).
    pub fn ring_in_flight(&self) -> usize {
        self.0.ring.as_ref().map_or(0, |r| lock(r).in_flight())
    }
}

/// The checks a backend's own calls make, for requests that bypass them (io_uring).
fn precheck(req: &IoReq) -> Result<()> {
    let info = req.backend.info();
    let len = match req.op {
        Op::Read | Op::Write => req.iov.len(),
        Op::Flush => return Ok(()),
        Op::Discard | Op::WriteZeroes => req.len,
    };
    if req.op != Op::Read && info.read_only {
        return Err(BlockError::ReadOnly);
    }
    crate::check_range(req.offset, len, info.capacity)
}

/// Whether an `O_DIRECT` request meets the file's alignment.
fn aligned(req: &IoReq, (off_align, mem_align): (u64, usize)) -> bool {
    if req.op == Op::Flush {
        return true;
    }
    req.offset.is_multiple_of(off_align)
        && req.iov.raw().iter().all(|v| {
            (v.iov_base as usize).is_multiple_of(mem_align)
                && (v.iov_len as u64).is_multiple_of(off_align)
        })
}

fn finish_uring(slot: Slot, res: i32) -> IoDone {
    let req = slot.req;
    let result = if res < 0 {
        Err(BlockError::Io(std::io::Error::from_raw_os_error(-res)))
    } else {
        match req.op {
            // End of file inside the disk (the image shrank after it was opened): zeroes, as
            // the synchronous path reads.
            Op::Read if res == 0 && !req.iov.is_empty() => {
                req.iov.zero_from(0);
                Ok(())
            }
            Op::Write if res == 0 && !req.iov.is_empty() => Err(BlockError::Io(
                std::io::Error::from(std::io::ErrorKind::WriteZero),
            )),
            _ => Ok(()),
        }
    };
    let bytes = slot.done + if res > 0 { res as u64 } else { 0 };
    req.backend.account(req.op, bytes, result.is_ok());
    IoDone { req, result }
}

/// Run a request with the backend's synchronous calls.
fn run_sync(req: &IoReq) -> Result<()> {
    let b = &*req.backend;
    match req.op {
        Op::Read => b.read_iov(req.offset, &req.iov),
        Op::Write if req.fua => b.write_iov_fua(req.offset, &req.iov),
        Op::Write => b.write_iov(req.offset, &req.iov),
        Op::Flush => b.flush(),
        Op::Discard => b.discard(req.offset, req.len),
        Op::WriteZeroes => b.write_zeroes(req.offset, req.len),
    }
}

#[cfg(test)]
#[path = "aio_tests.rs"]
mod tests;
