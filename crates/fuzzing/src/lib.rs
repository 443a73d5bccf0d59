//! Fuzz harnesses for rhyve's guest-facing surfaces, and the invariants they hold the devices
//! to. `fuzz/` (cargo-fuzz, nightly) drives them with libFuzzer; `tests/replay.rs` replays the
//! committed corpora through the same functions on stable Rust.
//!
//! Every harness checks more than "no panic":
//! * **No stray DMA**: guest RAM below [`WINDOW`] is a canary no command can name (every
//!   pointer the guest controls is moved out of it before the device sees it), and it must be
//!   intact at the end.
//! * **Exactly once** (NVMe): every command the harness submitted on a queue it tracks
//!   completes once, and nothing else completes there.
//! * **Bounded resources**: host heap (through [`CountingAlloc`], installed by the binaries)
//!   and threads stay under a bound derived from the device's configuration.
//! * **No hang**: no single operation on the device takes longer than [`MAX_OP`].
//!
//! A violated invariant panics, which libFuzzer reports as a crash with the input.
#![deny(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod ahci;
#[allow(unsafe_code)] // a GlobalAlloc wrapper
pub mod alloc;
pub mod nvme;
pub mod pci_config;
pub mod uml_msg;
pub mod virtio_blk;

pub use alloc::CountingAlloc;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::pci::{DeviceContext, GuestMem, InterruptSink, MsiMessage, PciDevice};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Most CPU time any single device operation may take (a spin is a hang too).
pub const MAX_OP: Duration = Duration::from_secs(1);
/// Longest any single device operation may take by the clock: generous, because a fuzzer
/// shares a loaded machine at low priority, but a blocked operation never returns at all.
pub const MAX_OP_WALL: Duration = Duration::from_secs(10);
/// Guest RAM: the canary `[0, WINDOW)` and the window `[WINDOW, RAM_END)` where the guest's
/// queues, buffers and descriptor lists live.
pub const WINDOW: u64 = 0x2_0000;
/// End of guest RAM; addresses from here up are outside RAM.
pub const RAM_END: u64 = 0x4_0000;
/// The canary byte pattern.
const CANARY: u8 = 0xa5;

/// Move a guest-chosen address out of the canary: addresses below [`WINDOW`] are shifted into
/// the window (keeping their page offset); others (the window, or outside RAM) are kept.
pub fn steer(addr: u64) -> u64 {
    if addr < WINDOW {
        addr + WINDOW
    } else {
        addr
    }
}

/// Guest memory for a harness: the canary filled, the window zeroed.
pub fn guest_memory() -> GuestMemoryMmap {
    MEMORY_GENERATION.fetch_add(1, Ordering::Relaxed);
    let mem =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM_END as usize)]).expect("guest memory");
    mem.write_slice(&[CANARY; WINDOW as usize], GuestAddress(0))
        .expect("canary");
    mem
}

/// Fill the window from fuzz bytes (repeated), with every aligned u64 steered out of the
/// canary: whatever the device later reads as a pointer (PRP list entries, SGL descriptors,
/// PRDT entries, command table addresses) cannot name the canary.
pub fn fill_window(mem: &GuestMemoryMmap, seed: &[u8]) {
    let len = (RAM_END - WINDOW) as usize;
    SCRATCH.with_borrow_mut(|w| {
        w.clear();
        w.resize(len, 0);
        if !seed.is_empty() {
            for c in w.chunks_mut(seed.len()) {
                c.copy_from_slice(&seed[..c.len()]);
            }
        }
        steer_words(w);
        mem.write_slice(w, GuestAddress(WINDOW)).expect("window");
    });
}

/// Steer every aligned u64 of `bytes` (an image of window memory) out of the canary.
pub fn steer_words(bytes: &mut [u8]) {
    for c in bytes.chunks_exact_mut(8) {
        let v = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        c.copy_from_slice(&steer(v).to_le_bytes());
    }
}

/// The smallest aligned u64 in `bytes`.
fn min_word(bytes: &[u8]) -> u64 {
    bytes.chunks_exact(8).fold(u64::MAX, |m, c| {
        m.min(u64::from_le_bytes(c.try_into().expect("8 bytes")))
    })
}

/// Bumped for every harness memory [`guest_memory`] makes: the window copy
/// [`resteer_window`] keeps is only good for the memory it was taken from.
static MEMORY_GENERATION: AtomicUsize = AtomicUsize::new(0);

/// Re-steer the window in place (the device may have written pointer-like values into it since:
/// log pages, read data), except `keep` ranges (the harness's own queues).
pub fn resteer_window(mem: &GuestMemoryMmap, keep: &[(u64, u64)]) {
    const PAGE: usize = 0x1000;
    thread_local! {
        // Reused buffers (a fresh 128 KiB one per call is an mmap, page faults and an munmap):
        // the window now, and as it was after the last call on this memory.
        static BUF: std::cell::RefCell<(Vec<u8>, Vec<u8>, usize)> =
            const { std::cell::RefCell::new((Vec::new(), Vec::new(), 0)) };
    }
    let kept = |addr: u64| {
        keep.iter()
            .any(|&(a, l)| addr >= a && addr < a.saturating_add(l))
    };
    let len = (RAM_END - WINDOW) as usize;
    // Which memory the saved copy belongs to (a new harness run maps new memory).
    let id = MEMORY_GENERATION.load(Ordering::Relaxed);
    BUF.with_borrow_mut(|(w, last, last_id)| {
        w.resize(len, 0);
        mem.read_slice(w, GuestAddress(WINDOW)).expect("window");
        let fresh = *last_id != id || last.len() != len;
        for (p, page) in w.chunks_exact(PAGE).enumerate() {
            let base = WINDOW + (p * PAGE) as u64;
            // Untouched since the last call (a memcmp, which the fuzzer does not trace), kept
            // by the harness, or nothing in it to steer.
            if !fresh && page == &last[p * PAGE..(p + 1) * PAGE] {
                continue;
            }
            if (kept(base) && kept(base + PAGE as u64 - 1)) || min_word(page) >= WINDOW {
                continue;
            }
            for (i, c) in page.chunks_exact(8).enumerate() {
                let v = u64::from_le_bytes(c.try_into().expect("8 bytes"));
                let addr = base + 8 * i as u64;
                if steer(v) != v && !kept(addr) {
                    mem.write_obj(steer(v).to_le_bytes(), GuestAddress(addr))
                        .expect("window");
                }
            }
        }
        mem.read_slice(w, GuestAddress(WINDOW)).expect("window");
        std::mem::swap(w, last);
        *last_id = id;
    });
}

/// Panic unless the canary is intact.
pub fn check_canary(mem: &GuestMemoryMmap) {
    const PAGE: [u8; 0x1000] = [CANARY; 0x1000];
    SCRATCH.with_borrow_mut(|c| {
        c.resize(WINDOW as usize, 0);
        mem.read_slice(c, GuestAddress(0)).expect("canary");
        // Page compares are memcmp calls; look byte by byte only to report a failure.
        if c.chunks(PAGE.len()).all(|p| p == &PAGE[..p.len()]) {
            return;
        }
        let i = c
            .iter()
            .position(|&b| b != CANARY)
            .expect("a differing byte");
        panic!(
            "stray DMA: canary byte {i:#x} is {:#04x} (the guest never named the canary)",
            c[i]
        );
    });
}

thread_local! {
    /// A reused window-sized buffer: a fresh one per call is an mmap, page faults and an munmap.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Run `f`, aborting the process if it takes more than [`MAX_OP`] of this thread's CPU or
/// [`MAX_OP_WALL`] by the clock.
///
/// A watchdog thread samples the operation in progress every [`WATCH_EVERY`] instead of reading
/// clocks around each call: on this kind of machine a CPU-clock read is a system call, and two
/// of them per operation were most of a fuzz run's time. An operation that spins or blocks never
/// returns, so the watchdog, not the caller, has to report it; it aborts (libFuzzer keeps the
/// input as a crash).
pub fn timed<T>(what: &'static str, f: impl FnOnce() -> T) -> T {
    WATCHED.with(|w| {
        *w.what.lock().unwrap() = what;
        w.seq.fetch_add(1, Ordering::SeqCst); // odd: in progress
        let r = f();
        w.seq.fetch_add(1, Ordering::SeqCst);
        r
    })
}

/// One step of a harness wait that started at `t`: spin for 5 ms (completions take
/// microseconds), then sleep, so that on a loaded machine the device's own threads, in the same
/// scheduling group, get the CPU this thread would otherwise spin away (a yield loop starved
/// them for over a second once, under nice 19 beside two busy cores).
pub fn wait_step(t: Instant) {
    if t.elapsed() < Duration::from_millis(5) {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// How often the watchdog looks at the operations in progress.
pub const WATCH_EVERY: Duration = Duration::from_millis(50);

/// One thread's operation in progress, as the watchdog sees it.
struct Watched {
    /// Odd while an operation runs; bumped at its start and end.
    seq: AtomicU64,
    /// Which operation.
    what: Mutex<&'static str>,
    /// `/proc/self/task/TID/schedstat` of the thread, whose first field is its CPU time in ns.
    schedstat: String,
}

thread_local! {
    static WATCHED: Arc<Watched> = {
        let w = Arc::new(Watched {
            seq: AtomicU64::new(0),
            what: Mutex::new(""),
            schedstat: format!("/proc/self/task/{}/schedstat", rustix::thread::gettid().as_raw_nonzero()),
        });
        watchdog().lock().unwrap().push(Arc::downgrade(&w));
        w
    };
}

/// The watched threads, and the watchdog thread started with the first.
fn watchdog() -> &'static Mutex<Vec<std::sync::Weak<Watched>>> {
    static LIST: std::sync::OnceLock<Mutex<Vec<std::sync::Weak<Watched>>>> =
        std::sync::OnceLock::new();
    LIST.get_or_init(|| {
        std::thread::Builder::new()
            .name("fuzz-watchdog".into())
            .spawn(watch)
            .expect("watchdog thread");
        Mutex::new(Vec::new())
    })
}

/// CPU time of a thread so far, from its schedstat file.
fn thread_cpu(schedstat: &str) -> Option<Duration> {
    let s = std::fs::read_to_string(schedstat).ok()?;
    Some(Duration::from_nanos(
        s.split_whitespace().next()?.parse().ok()?,
    ))
}

/// The watchdog: an operation seen in progress (the same odd sequence number) for more than
/// [`MAX_OP`] of its thread's CPU or [`MAX_OP_WALL`] by the clock aborts the process.
fn watch() {
    // Per watched thread: the sequence number first seen in progress, when, and its CPU then.
    let mut seen: Vec<(std::sync::Weak<Watched>, u64, Instant, Duration)> = Vec::new();
    loop {
        std::thread::sleep(WATCH_EVERY);
        let list: Vec<_> = {
            let mut l = watchdog().lock().unwrap();
            l.retain(|w| w.strong_count() > 0);
            l.clone()
        };
        seen.retain(|(w, ..)| w.strong_count() > 0);
        for weak in list {
            let Some(w) = weak.upgrade() else { continue };
            let seq = w.seq.load(Ordering::SeqCst);
            let i = match seen.iter().position(|(s, ..)| s.ptr_eq(&weak)) {
                Some(i) => i,
                None => {
                    seen.push((weak.clone(), 0, Instant::now(), Duration::ZERO));
                    seen.len() - 1
                }
            };
            let entry = &mut seen[i];
            if seq % 2 == 0 {
                entry.1 = seq;
                continue;
            }
            let cpu = thread_cpu(&w.schedstat).unwrap_or_default();
            if entry.1 != seq {
                *entry = (weak.clone(), seq, Instant::now(), cpu);
                continue;
            }
            let (took, spent) = (entry.2.elapsed(), cpu.saturating_sub(entry.3));
            if spent >= MAX_OP || took >= MAX_OP_WALL {
                eprintln!(
                    "fuzzing: {} took more than {took:?} ({spent:?} of CPU): a device operation hangs",
                    w.what.lock().unwrap()
                );
                std::process::abort();
            }
        }
    }
}

/// Threads of this process before any harness ran, plus what one device may leave behind
/// while it winds down: a harness checks at its start that devices do not leak threads.
/// Returns the threads now.
pub fn check_thread_leak(per_device: usize) -> usize {
    static BASE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(threads);
    // A device dropped by one of its own threads (a job still holding it) lets that thread
    // finish on its own: give stragglers a moment before calling them leaked.
    let t = Instant::now();
    let mut now = threads();
    while now > base + per_device && t.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_micros(50));
        now = threads();
    }
    assert!(
        now <= base + per_device,
        "{now} threads before a run, {base} at the first: devices leak threads"
    );
    now
}

/// Threads of this process.
pub fn threads() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Interrupts a device sent, for harnesses that check them.
#[derive(Default)]
pub struct Recorder {
    /// MSI/MSI-X messages sent so far, counted by message data (a list of every message
    /// made each harness scan linear in the messages of the whole run).
    pub msis: Mutex<std::collections::HashMap<u32, usize>>,
    /// INTx level changes.
    pub intx: AtomicUsize,
}

impl InterruptSink for Recorder {
    fn msi(&self, msg: MsiMessage) {
        *self
            .msis
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(msg.data)
            .or_default() += 1;
    }
    fn intx(&self, _pin: u8, _asserted: bool) {
        self.intx.fetch_add(1, Ordering::Relaxed);
    }
}

/// A device constructor as the registry holds them (`nvme::create`, `ahci::create`).
pub type MakeDevice =
    fn(&::pci::SlotSpec, &DeviceContext) -> Result<Box<dyn PciDevice>, ::pci::ConfigError>;

/// A device built the way the frontends build it, over harness memory.
pub struct Bench {
    /// The device.
    pub dev: Box<dyn PciDevice>,
    /// Guest RAM (the device shares it).
    pub mem: GuestMemoryMmap,
    /// Its interrupts.
    pub irq: Arc<Recorder>,
}

impl Bench {
    /// Build device `spec` (bhyve `-s` syntax) with `make`.
    pub fn new(spec: &str, make: MakeDevice) -> Bench {
        let mem = guest_memory();
        let irq = Arc::new(Recorder::default());
        let ctx = DeviceContext {
            mem: GuestMem::new(mem.clone()),
            irq: irq.clone(),
            intx_supported: true,
        };
        let spec = ::pci::SlotSpec::parse(spec).expect("harness spec");
        let dev = make(&spec, &ctx).expect("harness device");
        Bench { dev, mem, irq }
    }

    /// Config read of `len` (1, 2, 4) bytes.
    pub fn cfg_read(&self, off: u16, len: usize) -> u32 {
        let mut b = [0u8; 4];
        timed("config read", || self.dev.config_read(off, &mut b[..len]));
        u32::from_le_bytes(b)
    }

    /// Config write of the low `len` bytes of `v`.
    pub fn cfg_write(&self, off: u16, len: usize, v: u32) {
        timed("config write", || {
            self.dev.config_write(off, &v.to_le_bytes()[..len])
        });
    }

    /// BAR read of `len` (≤ 8) bytes.
    pub fn bar_read(&self, bar: u8, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        timed("BAR read", || self.dev.bar_read(bar, off, &mut b[..len]));
        u64::from_le_bytes(b)
    }

    /// BAR write of the low `len` bytes of `v`.
    pub fn bar_write(&self, bar: u8, off: u64, len: usize, v: u64) {
        timed("BAR write", || {
            self.dev.bar_write(bar, off, &v.to_le_bytes()[..len])
        });
    }

    /// Offset of capability `id` in config space.
    pub fn find_cap(&self, id: u8) -> Option<u16> {
        let mut p = self.cfg_read(0x34, 1) as u16 & 0xfc;
        for _ in 0..48 {
            if p == 0 {
                return None;
            }
            if self.cfg_read(p, 1) as u8 == id {
                return Some(p);
            }
            p = self.cfg_read(p + 1, 1) as u16 & 0xfc;
        }
        None
    }

    /// Memory space and bus mastering on, MSI-X on with every vector pointing at `data = n`.
    pub fn enable_msix(&self) -> bool {
        self.cfg_write(4, 2, 0x6);
        let Some(cap) = self.find_cap(0x11) else {
            return false;
        };
        let n = (self.cfg_read(cap + 2, 2) & 0x7ff) + 1;
        let table = self.cfg_read(cap + 4, 4);
        let (bir, off) = ((table & 7) as u8, u64::from(table & !7));
        for v in 0..u64::from(n) {
            self.bar_write(bir, off + v * 16, 4, 0xfee0_0000);
            self.bar_write(bir, off + v * 16 + 4, 4, 0);
            self.bar_write(bir, off + v * 16 + 8, 4, v);
            self.bar_write(bir, off + v * 16 + 12, 4, 0);
        }
        self.cfg_write(cap + 2, 2, 1 << 15);
        true
    }
}

/// Decode fuzzer bytes as `I` and run it (inputs that do not decode are skipped).
pub fn run_with<'a, I: arbitrary::Arbitrary<'a>>(data: &'a [u8], run: impl FnOnce(&I)) {
    if let Ok(input) = I::arbitrary(&mut arbitrary::Unstructured::new(data)) {
        run(&input);
    }
}

/// Bytes read from the harness input, for harnesses that parse raw bytes themselves.
pub fn le_u64(b: &[u8]) -> u64 {
    let mut x = [0u8; 8];
    let n = b.len().min(8);
    x[..n].copy_from_slice(&b[..n]);
    u64::from_le_bytes(x)
}
