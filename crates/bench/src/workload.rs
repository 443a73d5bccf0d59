//! What a benchmark run does: the access pattern, and the small helpers both hosts share.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use pci::{InterruptSink, MsiMessage};
use serde::Serialize;

/// One fio-like job.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Workload {
    /// Name as in the report (`randread-4k-qd32`).
    pub name: &'static str,
    /// fio's `rw=`.
    pub fio_rw: &'static str,
    /// Writes (else reads).
    pub write: bool,
    /// Random offsets (else sequential).
    pub random: bool,
    /// Block size in bytes.
    pub bs: u64,
    /// Queue depth.
    pub qd: usize,
}

/// The workloads the benchmark runs: QD1 and QD32 of 4k random read, 4k random write and 128k
/// sequential read, and 4k random read at QD4 (where a host waits for each batch of
/// completions, and adaptive interrupt coalescing must not make it wait longer).
pub const WORKLOADS: [Workload; 7] = [
    w("randread-4k-qd1", "randread", false, true, 4096, 1),
    w("randread-4k-qd4", "randread", false, true, 4096, 4),
    w("randread-4k-qd32", "randread", false, true, 4096, 32),
    w("randwrite-4k-qd1", "randwrite", true, true, 4096, 1),
    w("randwrite-4k-qd32", "randwrite", true, true, 4096, 32),
    w("read-128k-qd1", "read", false, false, 128 << 10, 1),
    w("read-128k-qd32", "read", false, false, 128 << 10, 32),
];

const fn w(
    name: &'static str,
    fio_rw: &'static str,
    write: bool,
    random: bool,
    bs: u64,
    qd: usize,
) -> Workload {
    Workload {
        name,
        fio_rw,
        write,
        random,
        bs,
        qd,
    }
}

/// xorshift64*: cheap, deterministic offsets.
pub struct Rng(u64, u64);

impl Rng {
    /// A generator from a non-zero seed.
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1, 0)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

impl Workload {
    /// Byte offset of the next request of command slot `slot` on a disk of `size` bytes.
    pub fn next_offset(&self, rng: &mut Rng, _slot: u16, size: u64) -> u64 {
        let blocks = size / self.bs;
        if self.random {
            (rng.next() % blocks) * self.bs
        } else {
            let b = rng.1 % blocks;
            rng.1 += 1;
            b * self.bs
        }
    }
}

/// An interrupt sink that counts messages and lets the host sleep until the next one, as an
/// interrupt-driven driver does (so the host's own CPU is not spent spinning).
#[derive(Default)]
pub struct Counting {
    /// MSI messages received.
    pub msis: AtomicU64,
    lock: Mutex<()>,
    cv: Condvar,
    waiting: AtomicBool,
}

impl Counting {
    /// Messages so far.
    pub fn seen(&self) -> u64 {
        self.msis.load(Ordering::SeqCst)
    }

    /// Sleep until a message arrives after `seen` was read, or `timeout` passes.
    pub fn wait(&self, seen: u64, timeout: Duration) {
        let mut g = self.lock.lock().unwrap();
        self.waiting.store(true, Ordering::SeqCst);
        if self.seen() == seen {
            g = self.cv.wait_timeout(g, timeout).unwrap().0;
        }
        self.waiting.store(false, Ordering::SeqCst);
        drop(g);
    }
}

impl InterruptSink for Counting {
    fn msi(&self, _msg: MsiMessage) {
        self.msis.fetch_add(1, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) {
            let _g = self.lock.lock().unwrap();
            self.cv.notify_one();
        }
    }
    fn intx(&self, _pin: u8, _asserted: bool) {}
}

/// CPU time used by waited-for children (fio), from /proc/self/stat (clock ticks of 10 ms).
pub fn children_cpu() -> Duration {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // After "pid (comm)", field 3 is f[0]; cutime and cstime are fields 16 and 17.
    let ticks = f.get(13).copied().unwrap_or(0) + f.get(14).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// CPU time this process has used (all threads).
pub fn process_cpu() -> std::time::Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    std::time::Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}
