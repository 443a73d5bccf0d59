//! [`Executor`]: a pool of up to N worker threads running submitted jobs. One worker starts
//! with the pool; the others start when jobs find every worker busy, so a device that seldom
//! needs the pool does not keep idle threads.

use std::cell::Cell;
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send>;

struct State {
    queue: VecDeque<Job>,
    /// Jobs submitted and not yet finished (queued + running).
    in_flight: usize,
    shutdown: bool,
    /// Workers waiting for a job.
    waiting: usize,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when a job is queued or shutdown begins.
    work: Condvar,
    /// Signalled when `in_flight` drops to zero.
    idle: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Jobs run outside the lock, so a poisoned lock cannot hold broken state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

thread_local! {
    /// Identity of the executor whose worker this thread is (0 for other threads).
    static WORKER_OF: Cell<usize> = const { Cell::new(0) };
}

/// A pool of worker threads. Jobs run in submission order per worker, concurrently across
/// workers. Dropping the executor runs every job already submitted, then joins the threads.
pub struct Executor {
    shared: Arc<Shared>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    /// Most workers.
    max: usize,
    name: String,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("threads", &self.threads())
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

impl Executor {
    /// Starts `threads` workers (at least one) named `name-0`, `name-1`, ...
    /// Panics if the OS cannot create a thread, like `std::thread::spawn`; devices use
    /// [`Executor::try_new`].
    pub fn new(threads: usize, name: &str) -> Executor {
        Self::try_new(threads, name).expect("cannot spawn executor thread")
    }

    /// A pool of up to `threads` workers (at least one), the first started now, failing with
    /// the OS error when it cannot be created.
    pub fn try_new(threads: usize, name: &str) -> std::io::Result<Executor> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                in_flight: 0,
                shutdown: false,
                waiting: 0,
            }),
            work: Condvar::new(),
            idle: Condvar::new(),
        });
        let ex = Executor {
            shared,
            workers: Mutex::new(Vec::new()),
            max: threads.max(1),
            name: name.to_string(),
        };
        ex.spawn()?;
        Ok(ex)
    }

    /// Start one more worker.
    fn spawn(&self) -> std::io::Result<()> {
        let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        let shared = Arc::clone(&self.shared);
        let w = std::thread::Builder::new()
            .name(format!("{}-{}", self.name, workers.len()))
            .spawn(move || worker(shared))?;
        workers.push(w);
        Ok(())
    }

    /// Queues `job` to run on a worker. Never blocks on the workers (the queue is unbounded);
    /// starts another worker, up to the pool's size, when every one is busy.
    pub fn submit(&self, job: Box<dyn FnOnce() + Send>) {
        let mut st = self.shared.lock();
        st.queue.push_back(job);
        st.in_flight += 1;
        let more = st.queue.len() > st.waiting;
        drop(st);
        self.shared.work.notify_one();
        if more && self.threads() < self.max {
            if let Err(e) = self.spawn() {
                // The workers there are will get to it.
                log::warn!("{}: cannot start another worker: {e}", self.name);
            }
        }
    }

    /// Blocks until every job submitted so far (and any submitted meanwhile) has finished.
    /// Panics if called from one of this executor's own jobs, which would deadlock.
    pub fn wait_idle(&self) {
        assert!(
            WORKER_OF.with(Cell::get) != self.id(),
            "Executor::wait_idle called from one of its own jobs (would deadlock)"
        );
        let mut st = self.shared.lock();
        while st.in_flight > 0 {
            st = self.shared.idle.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Jobs submitted and not yet finished (queued or running).
    pub fn in_flight(&self) -> usize {
        self.shared.lock().in_flight
    }

    /// Number of worker threads started so far.
    pub fn threads(&self) -> usize {
        self.workers.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn id(&self) -> usize {
        Arc::as_ptr(&self.shared) as usize
    }
}

fn worker(shared: Arc<Shared>) {
    WORKER_OF.with(|w| w.set(Arc::as_ptr(&shared) as usize));
    let mut st = shared.lock();
    loop {
        if let Some(job) = st.queue.pop_front() {
            drop(st);
            if catch_unwind(AssertUnwindSafe(job)).is_err() {
                log::error!("block executor job panicked");
            }
            st = shared.lock();
            st.in_flight -= 1;
            if st.in_flight == 0 {
                shared.idle.notify_all();
            }
        } else if st.shutdown {
            return;
        } else {
            st.waiting += 1;
            st = shared.work.wait(st).unwrap_or_else(|e| e.into_inner());
            st.waiting -= 1;
        }
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.work.notify_all();
        let me = std::thread::current().id();
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|e| e.into_inner()));
        for w in workers {
            // A job holding the last reference drops the executor on a worker: that worker
            // finishes on its own once the queue is empty; joining it would deadlock.
            if w.thread().id() != me {
                let _ = w.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn wait_idle_waits_for_many_jobs() {
        let ex = Executor::new(4, "t-exec");
        assert_eq!(ex.threads(), 1, "one worker starts with the pool");
        let done = Arc::new(AtomicUsize::new(0));
        for i in 0..2000 {
            let done = Arc::clone(&done);
            ex.submit(Box::new(move || {
                if i % 100 == 0 {
                    std::thread::sleep(Duration::from_millis(2));
                }
                done.fetch_add(1, Ordering::SeqCst);
            }));
        }
        ex.wait_idle();
        assert_eq!(done.load(Ordering::SeqCst), 2000);
        assert_eq!(ex.in_flight(), 0);
        // Idle executor: returns at once.
        ex.wait_idle();
    }

    /// Workers start as jobs find every worker busy, up to the pool's size, and no further.
    #[test]
    fn workers_start_on_demand_up_to_the_limit() {
        let ex = Executor::new(3, "t-lazy");
        assert_eq!(ex.threads(), 1);
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        for _ in 0..6 {
            let gate = Arc::clone(&gate);
            ex.submit(Box::new(move || {
                let (m, cv) = &*gate;
                let mut open = m.lock().unwrap();
                while !*open {
                    open = cv.wait(open).unwrap();
                }
            }));
        }
        assert_eq!(ex.threads(), 3, "six blocked jobs, a pool of three");
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        ex.wait_idle();
        assert_eq!(ex.threads(), 3);
    }

    #[test]
    fn concurrent_submitters_and_waiters() {
        let ex = Arc::new(Executor::new(3, "t-conc"));
        let done = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (ex, done) = (Arc::clone(&ex), Arc::clone(&done));
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        for _ in 0..10 {
                            let done = Arc::clone(&done);
                            ex.submit(Box::new(move || {
                                done.fetch_add(1, Ordering::SeqCst);
                            }));
                        }
                        // Everything this thread submitted so far has finished after this.
                        let before = done.load(Ordering::SeqCst);
                        ex.wait_idle();
                        assert!(done.load(Ordering::SeqCst) >= before);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        ex.wait_idle();
        assert_eq!(done.load(Ordering::SeqCst), 2000);
    }

    #[test]
    fn in_flight_counts_queued_and_running_jobs() {
        let ex = Executor::new(1, "t-inflight");
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        for _ in 0..3 {
            let gate = Arc::clone(&gate);
            ex.submit(Box::new(move || {
                let (m, c) = &*gate;
                let mut open = m.lock().unwrap();
                while !*open {
                    open = c.wait(open).unwrap();
                }
            }));
        }
        assert_eq!(ex.in_flight(), 3);
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        ex.wait_idle();
        assert_eq!(ex.in_flight(), 0);
    }

    #[test]
    fn drop_runs_pending_jobs_and_survives_panics() {
        let done = Arc::new(AtomicUsize::new(0));
        {
            let ex = Executor::new(0, "t-drop"); // clamped to one thread
            assert_eq!(ex.threads(), 1);
            ex.submit(Box::new(|| {
                panic!("job panics on purpose (expected in this test)")
            }));
            for _ in 0..100 {
                let done = Arc::clone(&done);
                ex.submit(Box::new(move || {
                    done.fetch_add(1, Ordering::SeqCst);
                }));
            }
        }
        assert_eq!(done.load(Ordering::SeqCst), 100);
    }

    #[test]
    fn wait_idle_from_own_job_panics_instead_of_deadlocking() {
        let ex = Arc::new(Executor::new(1, "t-self"));
        let caught = Arc::new(AtomicUsize::new(0));
        let (ex2, caught2) = (Arc::clone(&ex), Arc::clone(&caught));
        ex.submit(Box::new(move || {
            let r = catch_unwind(AssertUnwindSafe(|| ex2.wait_idle()));
            if r.is_err() {
                caught2.fetch_add(1, Ordering::SeqCst);
            }
        }));
        ex.wait_idle();
        assert_eq!(caught.load(Ordering::SeqCst), 1);
    }
}
