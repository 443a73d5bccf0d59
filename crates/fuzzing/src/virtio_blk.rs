//! virtio-blk: a driver-like bring-up (feature negotiation, queues, DRIVER_OK) and then any
//! sequence of descriptor tables, available-ring entries and indices, notifications, raw BAR0
//! writes of any width, config-space and MSI-X writes, resets, and raw window bytes.
//!
//! Invariants beyond "no panic": no DMA outside the window (the canary; descriptor addresses
//! and ring addresses are steered out of it); every head the device puts on a used ring was
//! made available by the harness and is used at most once per time it was made available;
//! the device never spins (each operation is timed) and stays within its heap and thread
//! bounds; after a reset and a fresh bring-up a well-formed request completes with status OK.

use std::collections::HashMap;

use arbitrary::Arbitrary;
use vm_memory::{Bytes, GuestAddress};

use crate::{alloc, steer, Bench, WINDOW};

/// Device configurations the input picks from.
const CONFIGS: [&str; 3] = [
    "6,virtio-blk,ram=1,qsz=16,aio=threads",
    "6,virtio-blk,ram=1,queues=2,qsz=8,sectorsz=4096,aio=threads",
    "6,virtio-blk,ram=1,ro,qsz=4,aio=threads,iothreads=1",
];
/// Heap a device may use over a run.
const HEAP_BOUND: usize = 16 << 20;
/// Threads a device may add (an I/O thread, pool workers).
const THREADS: usize = 8;
/// Ring memory of queue q in the window: descriptor table, available ring, used ring.
fn ring(q: u16) -> (u64, u64, u64) {
    let base = WINDOW + 0x1000 + u64::from(q) * 0x3000;
    (base, base + 0x1000, base + 0x2000)
}
const BAR0_SIZE: u64 = 0x4000;
const COMMON: u64 = 0;
const NOTIFY: u64 = 0x3000;

/// One descriptor as the fuzzer writes it.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// One operation.
#[derive(Arbitrary, Debug)]
pub enum Op {
    /// Reset, negotiate `features` (masked to the offered ones unless `raw`), set up queues
    /// of `size` entries, DRIVER_OK.
    BringUp { features: u64, raw: bool, size: u16 },
    /// Write descriptors into queue `q`'s table from index `at`.
    Descs { q: u8, at: u16, descs: Vec<Desc> },
    /// Make `heads` available on queue `q` and notify.
    Avail {
        q: u8,
        heads: Vec<u16>,
        notify: bool,
    },
    /// Set queue q's available index to any value.
    AvailIdx { q: u8, idx: u16 },
    /// Set queue q's used_event.
    UsedEvent { q: u8, idx: u16 },
    /// A well-formed request of `kind` at `sector` with `len` bytes of data on queue `q`.
    Request {
        q: u8,
        kind: u8,
        sector: u64,
        len: u16,
    },
    /// Notify queue q (any value).
    Notify { q: u16, value: u32 },
    /// Raw BAR0 write.
    BarWrite { off: u16, width: u8, value: u64 },
    /// Raw BAR0 read.
    BarRead { off: u16, width: u8 },
    /// Config space write.
    CfgWrite { off: u16, width: u8, value: u32 },
    /// MSI-X table write.
    MsixWrite { off: u8, value: u32 },
    /// Raw bytes into the window (steered).
    Window { off: u16, bytes: Vec<u8> },
    /// Device reset.
    Reset,
    /// Let the device finish what it started.
    Settle,
}

/// A whole input.
#[derive(Arbitrary, Debug)]
pub struct Input {
    config: u8,
    window: Vec<u8>,
    ops: Vec<Op>,
}

struct Host {
    b: Bench,
    /// Per queue: entries, our available index, the used index seen, heads made available and
    /// not yet used (head → times).
    q: Vec<(u16, u16, u16, HashMap<u16, u32>)>,
    /// The harness's model holds (no raw writes that could change queue geometry).
    model: bool,
}

fn width(w: u8) -> usize {
    [1, 2, 4, 8][usize::from(w) % 4]
}

/// Fuzz entry point.
pub fn run(data: &[u8]) {
    crate::run_with(data, run_input);
}

/// Run one structured input.
pub fn run_input(input: &Input) {
    let spec = CONFIGS[usize::from(input.config) % CONFIGS.len()];
    let base_threads = crate::check_thread_leak(THREADS);
    let base_heap = alloc::live().unwrap_or(0);
    alloc::reset_peak();
    {
        let b = Bench::new(spec, virtio::create);
        crate::fill_window(&b.mem, &input.window);
        let mut h = Host {
            b,
            q: Vec::new(),
            model: false,
        };
        for op in input.ops.iter().take(256) {
            h.step(op);
        }
        h.settle();
        h.reap();
        crate::check_canary(&h.b.mem);
        assert!(
            crate::threads() <= base_threads + THREADS,
            "{} threads, {base_threads} before the device",
            crate::threads()
        );
        // Whatever happened, a reset and a fresh bring-up give a working device.
        h.bring_up(u64::MAX, false, 4);
        if h.q.first().is_some_and(|q| q.0 > 0) {
            let st = h.request(0, 4, 0, 0);
            assert_eq!(st, Some(0), "flush after a fresh bring-up");
        }
        crate::timed("shutdown", || h.b.dev.shutdown());
    }
    alloc::check_peak("virtio-blk", base_heap, HEAP_BOUND);
}

impl Host {
    fn w(&self, off: u64, len: usize, v: u64) {
        self.b.bar_write(0, off, len, v);
    }
    fn r(&self, off: u64, len: usize) -> u64 {
        self.b.bar_read(0, off, len)
    }
    fn queues(&self) -> u16 {
        self.r(COMMON + 18, 2) as u16
    }

    fn bring_up(&mut self, features: u64, raw: bool, size: u16) {
        if !self.b.enable_msix() {
            return;
        }
        self.w(COMMON + 20, 1, 0);
        // Virtio 1.2 §4.1.4.3.2: after writing 0 the driver waits for device_status to read 0
        // (the device first finishes requests of the old queues). Not waiting raced the
        // bring-up below against the end of the reset, which then cleared it.
        let t = std::time::Instant::now();
        loop {
            let st = self.r(COMMON + 20, 1);
            if st == 0 {
                break;
            }
            assert!(
                t.elapsed() < std::time::Duration::from_secs(1),
                "a device reset did not complete within a second (status {st:#x})"
            );
            crate::wait_step(t);
        }
        self.w(COMMON + 20, 1, 3);
        let mut offered = 0u64;
        for sel in 0..2u64 {
            self.w(COMMON, 4, sel);
            offered |= self.r(COMMON + 4, 4) << (32 * sel);
        }
        let f = if raw {
            features
        } else {
            features & offered | (1 << 32)
        };
        for sel in 0..2u64 {
            self.w(COMMON + 8, 4, sel);
            self.w(COMMON + 12, 4, (f >> (32 * sel)) & 0xffff_ffff);
        }
        self.w(COMMON + 20, 1, 11);
        self.w(COMMON + 16, 2, 0);
        self.q.clear();
        let size = 1u16 << (size % 5).max(1); // 2..16
        for q in 0..self.queues().min(4) {
            let (d, a, u) = ring(q);
            let _ = self.b.mem.write_slice(&[0u8; 0x3000], GuestAddress(d));
            self.w(COMMON + 22, 2, u64::from(q));
            self.w(COMMON + 24, 2, u64::from(size));
            let size = self.r(COMMON + 24, 2) as u16;
            self.w(COMMON + 26, 2, u64::from(q) + 1);
            self.w(COMMON + 32, 8, d);
            self.w(COMMON + 40, 8, a);
            self.w(COMMON + 48, 8, u);
            self.w(COMMON + 28, 2, 1);
            self.q.push((size, 0, 0, HashMap::new()));
        }
        self.w(COMMON + 20, 1, 15);
        self.model = self.r(COMMON + 20, 1) == 15;
    }

    fn qi(&self, q: u8) -> Option<u16> {
        (!self.q.is_empty()).then(|| u16::from(q) % self.q.len() as u16)
    }

    fn write_desc(&self, q: u16, i: u16, d: &Desc) {
        let (dt, ..) = ring(q);
        let size = self.q[usize::from(q)].0.max(1);
        let mut e = [0u8; 16];
        e[..8].copy_from_slice(&steer(d.addr).to_le_bytes());
        e[8..12].copy_from_slice(&d.len.to_le_bytes());
        e[12..14].copy_from_slice(&d.flags.to_le_bytes());
        e[14..16].copy_from_slice(&d.next.to_le_bytes());
        let _ = self
            .b
            .mem
            .write_slice(&e, GuestAddress(dt + u64::from(i % size) * 16));
    }

    fn publish(&mut self, q: u16, heads: &[u16], notify: bool) {
        let (_, avail, _) = ring(q);
        // A driver never has more entries outstanding than the ring holds: one more would
        // overwrite an avail slot the device has not read yet.
        self.reap();
        let (size, mut idx) = (self.q[usize::from(q)].0.max(1), self.q[usize::from(q)].1);
        let free = size.saturating_sub(self.outstanding(q));
        for &h in heads.iter().take(usize::from(free)) {
            let h = h % size;
            let _ = self
                .b
                .mem
                .write_obj(h, GuestAddress(avail + 4 + u64::from(idx % size) * 2));
            idx = idx.wrapping_add(1);
            *self.q[usize::from(q)].3.entry(h).or_insert(0) += 1;
        }
        let _ = self.b.mem.write_obj(idx, GuestAddress(avail + 2));
        self.q[usize::from(q)].1 = idx;
        if notify {
            self.w(NOTIFY + u64::from(q) * 4, 2, u64::from(q));
        }
    }

    /// Avail entries published and not yet seen used.
    fn outstanding(&self, q: u16) -> u16 {
        let q = &self.q[usize::from(q)];
        q.1.wrapping_sub(q.2)
    }

    /// Take used entries: each must name a head the harness made available.
    fn reap(&mut self) {
        for q in 0..self.q.len() {
            let (_, _, used) = ring(q as u16);
            let size = self.q[q].0.max(1);
            let idx: u16 = self.b.mem.read_obj(GuestAddress(used + 2)).unwrap_or(0);
            let mut seen = self.q[q].2;
            let mut n = 0;
            while seen != idx && n < 4 * u32::from(size) {
                let e = used + 4 + u64::from(seen % size) * 8;
                let id: u32 = self.b.mem.read_obj(GuestAddress(e)).unwrap_or(u32::MAX);
                if self.model {
                    let left = u16::try_from(id)
                        .ok()
                        .and_then(|h| self.q[q].3.get_mut(&h))
                        .filter(|c| **c > 0);
                    let Some(c) = left else {
                        panic!(
                            "queue {q}: used head {id} (used entry {seen}, used idx {idx}) \
                             was not made available; outstanding {:?}",
                            self.q[q].3
                        );
                    };
                    *c -= 1;
                }
                seen = seen.wrapping_add(1);
                n += 1;
            }
            self.q[q].2 = seen;
        }
    }

    fn settle(&self) {
        // RAM disks complete inline; requests on the pool finish within microseconds. (A
        // request still running is reaped later; checks that need it done wait for it.)
        let t = std::time::Instant::now();
        while t.elapsed() < std::time::Duration::from_micros(10) {
            std::thread::yield_now();
        }
    }

    /// A well-formed request; returns its status once used (None if the queue is not usable).
    fn request(&mut self, q: u16, kind: u32, sector: u64, len: u16) -> Option<u8> {
        let qi = usize::from(q);
        let size = self.q.get(qi)?.0;
        if size < 4 {
            return None;
        }
        let limit = if self.model {
            std::time::Duration::from_secs(1)
        } else {
            std::time::Duration::from_micros(300)
        };
        if self.outstanding(q) >= size {
            // A full ring: kick the device and wait for room, as a driver would.
            self.w(NOTIFY + u64::from(q) * 4, 2, u64::from(q));
            let t = std::time::Instant::now();
            while self.outstanding(q) >= size && t.elapsed() < limit {
                if self.r(COMMON + 20, 1) & 0x40 != 0 {
                    break;
                }
                crate::wait_step(t);
                self.reap();
            }
            if self.outstanding(q) >= size {
                let status = self.r(COMMON + 20, 1) as u8;
                assert!(
                    !self.model || status & 0x40 != 0,
                    "queue {q}: a full ring was never consumed (status {status:#x})"
                );
                return None;
            }
        }
        let hdr = WINDOW + 0x10000;
        let data = WINDOW + 0x11000;
        let st = WINDOW + 0x10800;
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        let _ = self.b.mem.write_slice(&h, GuestAddress(hdr));
        let _ = self.b.mem.write_obj(0xffu8, GuestAddress(st));
        let to_guest = kind == 0 || kind == 8;
        let len = u32::from(len).min(0x8000);
        let mut descs = vec![Desc {
            addr: hdr,
            len: 16,
            flags: 1,
            next: 1,
        }];
        if len > 0 {
            descs.push(Desc {
                addr: data,
                len,
                flags: 1 | if to_guest { 2 } else { 0 },
                next: 2,
            });
        }
        descs.push(Desc {
            addr: st,
            len: 1,
            flags: 2,
            next: 0,
        });
        for (i, d) in descs.iter().enumerate() {
            self.write_desc(q, i as u16, d);
        }
        let before = self.q[qi].2;
        self.publish(q, &[0], true);
        // Within the model the request must be used (a lost one is a bug: wait long); outside
        // it (raw register writes, no DRIVER_OK) it may rightly never be, and waiting a second
        // for that made most inputs take a second.
        let t = std::time::Instant::now();
        while t.elapsed() < limit {
            self.reap();
            if self.q[qi].2 != before {
                return self.b.mem.read_obj(GuestAddress(st)).ok();
            }
            if self.r(COMMON + 20, 1) & 0x40 != 0 {
                break; // DEVICE_NEEDS_RESET: nothing more is served until a reset
            }
            crate::wait_step(t);
        }
        let status = self.r(COMMON + 20, 1) as u8;
        assert!(
            !self.model || status & 0x40 != 0,
            "queue {q}: a well-formed request was never used (status {status:#x})"
        );
        None
    }

    fn step(&mut self, op: &Op) {
        match op {
            Op::BringUp {
                features,
                raw,
                size,
            } => self.bring_up(*features, *raw, *size),
            Op::Descs { q, at, descs } => {
                if let Some(q) = self.qi(*q) {
                    for (i, d) in descs.iter().take(64).enumerate() {
                        self.write_desc(q, at.wrapping_add(i as u16), d);
                    }
                }
            }
            Op::Avail { q, heads, notify } => {
                if let Some(q) = self.qi(*q) {
                    self.publish(q, heads, *notify);
                }
            }
            Op::AvailIdx { q, idx } => {
                if let Some(q) = self.qi(*q) {
                    let (_, avail, _) = ring(q);
                    let _ = self.b.mem.write_obj(*idx, GuestAddress(avail + 2));
                    self.model = false;
                }
            }
            Op::UsedEvent { q, idx } => {
                if let Some(q) = self.qi(*q) {
                    let (_, avail, _) = ring(q);
                    let size = u64::from(self.q[usize::from(q)].0);
                    let _ = self
                        .b
                        .mem
                        .write_obj(*idx, GuestAddress(avail + 4 + size * 2));
                }
            }
            Op::Request {
                q,
                kind,
                sector,
                len,
            } => {
                if let Some(q) = self.qi(*q) {
                    let kinds = [0u32, 1, 4, 8, 11, 13, 2, 0x1234];
                    self.request(
                        q,
                        kinds[usize::from(*kind) % kinds.len()],
                        *sector % 4096,
                        *len,
                    );
                }
            }
            Op::Notify { q, value } => self.w(NOTIFY + u64::from(*q % 8) * 4, 4, u64::from(*value)),
            Op::BarWrite {
                off,
                width: w,
                value,
            } => {
                let off = u64::from(*off) % BAR0_SIZE;
                // Ring addresses the driver writes are steered out of the canary too.
                let v = if (32..56).contains(&off) {
                    steer(*value)
                } else {
                    *value
                };
                self.w(off, width(*w), v);
                if off < 0x3000 {
                    self.model = false;
                }
            }
            Op::BarRead { off, width: w } => {
                self.r(u64::from(*off) % BAR0_SIZE, width(*w));
            }
            Op::CfgWrite {
                off,
                width: w,
                value,
            } => {
                self.b.cfg_write(*off % 0x1000, width(*w).min(4), *value);
                self.model = false;
            }
            Op::MsixWrite { off, value } => {
                self.b
                    .bar_write(4, u64::from(*off) & !3, 4, u64::from(*value));
            }
            Op::Window { off, bytes } => {
                let mut v: Vec<u8> = bytes.iter().take(4096).copied().collect();
                crate::steer_words(&mut v);
                let at = WINDOW + u64::from(*off) % 0x1_0000;
                let _ = self.b.mem.write_slice(&v, GuestAddress(at & !7));
                self.model = false;
            }
            Op::Reset => {
                self.w(COMMON + 20, 1, 0);
                self.q.clear();
                self.model = false;
            }
            Op::Settle => {
                self.settle();
                self.reap();
            }
        }
    }
}
