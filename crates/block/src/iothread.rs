//! [`IoThread`]: a thread that reaps an [`Engine`]'s asynchronous completions and runs a
//! device's timed and polled work (interrupt coalescing deadlines, shadow-doorbell polling).
//!
//! The device is reached through a `Weak` handle, so the thread never keeps a device alive; the
//! device owns its threads and stops them when dropped.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags, Timespec};

use crate::aio::Engine;
use crate::req::IoDone;

/// When a device wants its [`IoHandler::tick`] to run again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tick {
    /// Only when woken (a completion or [`IoThread::wake`]).
    Idle,
    /// At this time at the latest.
    At(Instant),
    /// As soon as possible: the device is polling.
    Spin,
}

impl Tick {
    /// The earlier of two requests.
    pub fn min(self, other: Tick) -> Tick {
        match (self, other) {
            (Tick::Spin, _) | (_, Tick::Spin) => Tick::Spin,
            (Tick::At(a), Tick::At(b)) => Tick::At(a.min(b)),
            (Tick::At(a), Tick::Idle) | (Tick::Idle, Tick::At(a)) => Tick::At(a),
            (Tick::Idle, Tick::Idle) => Tick::Idle,
        }
    }
}

/// What a device does on its I/O threads.
pub trait IoHandler: Send + Sync {
    /// Requests this thread reaped, to complete.
    fn completions(&self, thread: usize, done: &mut Vec<IoDone>);
    /// Timed and polled work of thread `thread`; says when to run again.
    fn tick(&self, thread: usize, now: Instant) -> Tick;
}

struct Shared {
    wake: OwnedFd,
    stop: AtomicBool,
}

/// One I/O thread and its engine.
pub struct IoThread {
    engine: Engine,
    shared: Arc<Shared>,
    handle: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for IoThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoThread")
            .field("engine", &self.engine)
            .finish()
    }
}

impl IoThread {
    /// Start thread number `index`, named `name`, serving `engine` for `handler`.
    pub fn spawn(
        name: String,
        index: usize,
        engine: Engine,
        handler: Weak<dyn IoHandler>,
    ) -> io::Result<IoThread> {
        let shared = Arc::new(Shared {
            wake: eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC)?,
            stop: AtomicBool::new(false),
        });
        let (s, e) = (Arc::clone(&shared), engine.clone());
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || run(index, &e, &s, &handler))?;
        Ok(IoThread {
            engine,
            shared,
            handle: Some(handle),
        })
    }

    /// The engine this thread reaps.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Make the thread run its handler's `tick` now (a new deadline or polling window).
    pub fn wake(&self) {
        let _ = rustix::io::write(&self.shared.wake, &1u64.to_ne_bytes());
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.wake();
        if let Some(h) = self.handle.take() {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }
}

/// Longest a thread sleeps while requests are in flight.
const SAFETY: Duration = Duration::from_millis(2);

/// The thread's timer slack: coalescing deadlines are tens of microseconds, and the default
/// slack (50 µs) would stretch each of them.
const TIMER_SLACK_NS: u64 = 1_000;

fn run(index: usize, engine: &Engine, shared: &Shared, handler: &Weak<dyn IoHandler>) {
    if let Err(e) =
        rustix::thread::set_current_timer_slack(std::num::NonZeroU64::new(TIMER_SLACK_NS))
    {
        log::debug!("I/O thread {index}: timer slack: {e}");
    }
    let mut done = Vec::new();
    let mut buf = [0u8; 8];
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        engine.reap(&mut done);
        let Some(h) = handler.upgrade() else { return };
        if !done.is_empty() {
            h.completions(index, &mut done);
            done.clear();
        }
        let tick = h.tick(index, Instant::now());
        drop(h);
        let mut timeout = match tick {
            Tick::Spin => {
                // Polling must not starve the threads it polls for (the vCPU or vhost-user
                // thread that rings, the guest itself on a small host): give up the CPU
                // whenever someone else wants it.
                std::thread::yield_now();
                continue;
            }
            Tick::At(t) => Some(t.saturating_duration_since(Instant::now())),
            Tick::Idle => None,
        };
        if engine.in_flight() > 0 {
            // A safety net: submitters reap with the ring's eventfd briefly disabled, and a
            // completion racing that window is caught here at the latest.
            timeout = Some(timeout.map_or(SAFETY, |t| t.min(SAFETY)));
        }
        if timeout == Some(Duration::ZERO) {
            continue;
        }
        let ts = timeout.map(|d| Timespec {
            tv_sec: d.as_secs() as _,
            tv_nsec: d.subsec_nanos() as _,
        });
        let notify = engine.notify_fd();
        let mut fds = [
            PollFd::new(&notify, PollFlags::IN),
            PollFd::new(&shared.wake, PollFlags::IN),
        ];
        match poll(&mut fds, ts.as_ref()) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                log::error!("I/O thread {index}: poll failed: {e}");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        if fds[0].revents().contains(PollFlags::IN) {
            engine.clear_notify();
        }
        if fds[1].revents().contains(PollFlags::IN) {
            let _ = rustix::io::read(shared.wake.as_fd(), &mut buf);
        }
    }
}
