//! NVMe: register writes in any order and width, admin and I/O commands with fuzzed fields,
//! PRP lists and SGLs in guest memory, shadow doorbells, resets and shutdowns, on one of a few
//! controller configurations.
//!
//! The harness is a host driver that keeps a model of the queues it created itself: what it
//! submitted there must complete exactly once. Raw register and config writes may break the
//! model (a new admin queue, Bus Master Enable cleared); then only the other invariants are
//! checked until the next bring-up.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use nvme::spec::{cc, csts, reg, AdminOpcode};
use vm_memory::{Bytes, GuestAddress};

use crate::{alloc, steer, Bench, RAM_END, WINDOW};

/// Controller configurations the input picks from, with the heap bound each is held to.
/// The RAM disks run inline, so the I/O engine is never used for data; `aio=threads` spares
/// each run an io_uring setup and teardown (about 1 ms, most of a run's cost).
const CONFIGS: [(&str, usize); 4] = [
    (
        "4,nvme,ram=1,maxq=4,qsz=64,coalesce=host,poll=0,aio=threads",
        24 << 20,
    ),
    (
        "4,nvme,ram=1,ram=1,maxq=2,qsz=16,mdts=0,coalesce=adaptive,poll=0,aio=threads",
        24 << 20,
    ),
    (
        "4,nvme,ram=1,sectorsz=4096,maxq=4,qsz=32,mdts=1,poll=50,aio=threads",
        24 << 20,
    ),
    (
        "4,nvme,ram=2,maxq=8,qsz=256,iothreads=2,aio=threads,coalesce=host",
        32 << 20,
    ),
];
/// Threads a configuration may add (I/O threads, pool workers, a shutdown job), at most.
const THREADS: usize = 24;

/// Harness queue layout in the window.
const ASQ: u64 = WINDOW;
const ACQ: u64 = WINDOW + 0x1000;
const QSIZE: u16 = 64;
/// I/O queue pairs the harness may create (1..=3).
const HARNESS_QUEUES: u8 = 3;
fn io_sq(q: u8) -> u64 {
    WINDOW + 0x2000 + u64::from(q - 1) * 0x2000
}
fn io_cq(q: u8) -> u64 {
    io_sq(q) + 0x1000
}
/// Shadow doorbell and EventIdx pages the harness offers.
const SHADOW: u64 = WINDOW + 0x8000;
const EVENTIDX: u64 = WINDOW + 0x9000;

/// One fuzzed command (64-byte SQE fields).
#[derive(Arbitrary, Debug, Clone)]
pub struct Cmd {
    opcode: u8,
    flags: u8,
    nsid: u32,
    cdw2: u32,
    cdw3: u32,
    mptr: u64,
    dptr: [u64; 2],
    cdw: [u32; 6],
}

/// One step of the input.
#[derive(Arbitrary, Debug)]
pub enum Op {
    /// Reset, then bring the controller up as Linux does (MSI-X, admin queues, CC.EN).
    BringUp,
    /// Create I/O queue pair `q` (1–3) through admin commands.
    CreatePair {
        q: u8,
        entries: u8,
        vector: u8,
        ien: bool,
    },
    /// An admin command.
    Admin(Cmd),
    /// An I/O command on the harness's queue pair `q`.
    Io { q: u8, cmd: Cmd },
    /// Several I/O commands, one doorbell.
    Burst { q: u8, cmds: Vec<Cmd> },
    /// A raw BAR0 write (any register, any doorbell, any width).
    Reg { off: u16, width: u8, value: u64 },
    /// A raw BAR0 read.
    RegRead { off: u16, width: u8 },
    /// A raw config-space write.
    Cfg { off: u16, width: u8, value: u32 },
    /// A raw write to the MSI-X table/PBA BAR.
    Msix { off: u16, width: u8, value: u64 },
    /// Raw bytes into the window (descriptor lists, data).
    Poke { off: u32, bytes: Vec<u8> },
    /// Doorbell Buffer Config with the harness's shadow pages.
    Dbbuf,
    /// A shadow doorbell value (SQ tail or CQ head of queue `q`), then optionally the MMIO one.
    Shadow {
        q: u8,
        cq: bool,
        value: u32,
        ring: bool,
    },
    /// Consume completions.
    Reap,
    /// Wait for the controller to finish what it has.
    Settle,
    /// CC.EN = 0 and wait for RDY to clear.
    Reset,
    /// Normal shutdown notification.
    Shutdown,
}

/// A whole input.
#[derive(Arbitrary, Debug)]
pub struct Input {
    config: u8,
    /// Allow SGLs and unsteered memory (the canary is then not checked).
    sgl_mode: bool,
    window: Vec<u8>,
    ops: Vec<Op>,
}

/// Run one input from raw fuzzer bytes.
pub fn run(data: &[u8]) {
    crate::run_with(data, run_input);
}

#[derive(Clone, Copy, Default)]
struct HostCq {
    head: u16,
    phase: bool,
    size: u16,
    /// Its MSI-X vector, if it interrupts.
    vector: Option<u16>,
}

#[derive(Clone, Copy, Default)]
struct HostSq {
    tail: u16,
    size: u16,
}

struct Host {
    b: Bench,
    strict: bool,
    /// The queue model is trustworthy (no raw writes since the last bring-up).
    model: bool,
    ready: bool,
    sqs: HashMap<u16, HostSq>,
    cqs: HashMap<u16, HostCq>,
    /// Outstanding (sqid, cid) → opcode.
    outstanding: HashMap<(u16, u16), u8>,
    /// Status of completed admin commands, by CID (for the harness's own set-up commands).
    admin_status: HashMap<u16, u16>,
    /// MSI-X messages seen per vector when its completions were last taken.
    irqs_seen: HashMap<u16, usize>,
    next_cid: u16,
    shadow: bool,
}

/// Run one structured input.
pub fn run_input(input: &Input) {
    let (spec, heap_bound) = CONFIGS[usize::from(input.config) % CONFIGS.len()];
    let base_threads = crate::check_thread_leak(THREADS);
    let base_heap = alloc::live().unwrap_or(0);
    alloc::reset_peak();
    {
        let b = Bench::new(spec, nvme::create);
        let strict = !input.sgl_mode;
        if strict {
            crate::fill_window(&b.mem, &input.window);
        } else {
            let mut w = input.window.clone();
            w.truncate((RAM_END - WINDOW) as usize);
            b.mem.write_slice(&w, GuestAddress(WINDOW)).expect("window");
        }
        let mut h = Host {
            b,
            strict,
            model: false,
            ready: false,
            sqs: HashMap::new(),
            cqs: HashMap::new(),
            outstanding: HashMap::new(),
            admin_status: HashMap::new(),
            irqs_seen: HashMap::new(),
            next_cid: 1,
            shadow: false,
        };
        for op in input.ops.iter().take(256) {
            h.step(op);
        }
        h.settle();
        h.check_done();
        if h.strict {
            crate::check_canary(&h.b.mem);
        }
        assert!(
            crate::threads() <= base_threads + THREADS,
            "{} threads, {base_threads} before the controller",
            crate::threads()
        );
        crate::timed("shutdown", || h.b.dev.shutdown());
    }
    alloc::check_peak(spec, base_heap, heap_bound);
}

fn width(w: u8) -> usize {
    [1, 2, 4, 8][usize::from(w) % 4]
}

impl Host {
    fn r32(&self, off: u64) -> u32 {
        self.b.bar_read(0, off, 4) as u32
    }
    fn w32(&self, off: u64, v: u32) {
        self.b.bar_write(0, off, 4, u64::from(v));
    }
    fn w64(&self, off: u64, v: u64) {
        self.b.bar_write(0, off, 8, v);
    }

    /// Wait for CSTS to satisfy `f`; false if CFS came instead or the wait ran out (which
    /// `must` turns into a failure: the spec bounds it by CAP.TO, 2 s here). The wait allows
    /// 10 s by the clock, as the other wall-clock bounds do: a shutdown's flush runs on a
    /// device thread, which under nice 19 beside two busy cores once waited over 2 s for a CPU
    /// (the input passed 300 times out of 300 alone). Spinning only briefly, then sleeping,
    /// leaves the CPU to it.
    ///
    /// `cfs_ends`: CFS ends the wait (false for a reset, which clears CFS: RDY reading 1 with
    /// CFS set after EN was cleared is a reset still draining, and a host that re-enabled then
    /// saw the old RDY and rang doorbells the controller rightly ignored; found at 3.4M
    /// executions, session 6). Satisfied with CFS set counts as not satisfied.
    fn wait_csts(&self, what: &str, must: bool, cfs_ends: bool, f: impl Fn(u32) -> bool) -> bool {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            let s = self.r32(reg::CSTS);
            let (done, cfs) = (f(s), s & csts::CFS != 0);
            if done || (cfs && cfs_ends) {
                return done && !cfs;
            }
            crate::wait_step(t);
        }
        assert!(!must, "{what}: CSTS stuck at {:#x}", self.r32(reg::CSTS));
        false
    }

    fn forget_queues(&mut self) {
        self.sqs.clear();
        self.cqs.clear();
        self.outstanding.clear();
        self.ready = false;
        self.shadow = false;
    }

    fn reset(&mut self) {
        let cc_now = self.r32(reg::CC);
        self.w32(reg::CC, cc_now & !cc::EN);
        self.wait_csts("reset", true, false, |s| s & csts::RDY == 0);
        self.forget_queues();
    }

    fn bring_up(&mut self) {
        self.reset();
        self.b.enable_msix();
        let zero = vec![0u8; 0x1000];
        for a in [ASQ, ACQ] {
            self.b
                .mem
                .write_slice(&zero, GuestAddress(a))
                .expect("queue");
        }
        let n = u32::from(QSIZE - 1);
        self.w32(reg::AQA, n | (n << 16));
        self.w64(reg::ASQ, ASQ);
        self.w64(reg::ACQ, ACQ);
        self.w32(
            reg::CC,
            cc::EN | (6 << cc::IOSQES_SHIFT) | (4 << cc::IOCQES_SHIFT),
        );
        if !self.wait_csts("enable", false, true, |s| s & csts::RDY != 0) {
            return; // CFS: a fuzzed register left something the controller refuses
        }
        self.sqs.insert(
            0,
            HostSq {
                tail: 0,
                size: QSIZE,
            },
        );
        self.cqs.insert(
            0,
            HostCq {
                head: 0,
                phase: true,
                size: QSIZE,
                vector: Some(0),
            },
        );
        self.irqs_seen.clear();
        self.model = true;
        self.ready = true;
    }

    /// Harness-owned memory that window re-steering must leave alone.
    fn keep(&self) -> Vec<(u64, u64)> {
        let mut k = vec![(ASQ, 0x2000), (SHADOW, 0x2000)];
        for q in 1..=HARNESS_QUEUES {
            k.push((io_sq(q), 0x2000));
        }
        k
    }

    fn sqe_bytes(&self, c: &Cmd, cid: u16) -> [u8; 64] {
        let mut s = [0u8; 64];
        let cdw0 = u32::from(c.opcode) | (u32::from(c.flags) << 8) | (u32::from(cid) << 16);
        s[0..4].copy_from_slice(&cdw0.to_le_bytes());
        s[4..8].copy_from_slice(&c.nsid.to_le_bytes());
        s[8..12].copy_from_slice(&c.cdw2.to_le_bytes());
        s[12..16].copy_from_slice(&c.cdw3.to_le_bytes());
        let (mptr, d0, d1) = if self.strict {
            // PRP only; every pointer out of the canary.
            (steer(c.mptr), steer(c.dptr[0]), steer(c.dptr[1]))
        } else {
            (c.mptr, c.dptr[0], c.dptr[1])
        };
        let flags = if self.strict { c.flags & 0x3f } else { c.flags };
        s[1] = flags;
        s[16..24].copy_from_slice(&mptr.to_le_bytes());
        s[24..32].copy_from_slice(&d0.to_le_bytes());
        s[32..40].copy_from_slice(&d1.to_le_bytes());
        for (i, d) in c.cdw.iter().enumerate() {
            s[40 + i * 4..44 + i * 4].copy_from_slice(&d.to_le_bytes());
        }
        s
    }

    /// Put commands on SQ `sqid` (harness-tracked) and ring once; returns their CIDs.
    fn submit(&mut self, sqid: u16, cmds: &[Cmd]) -> Vec<u16> {
        let mut cids = Vec::new();
        let Some(&sq) = self.sqs.get(&sqid) else {
            return cids;
        };
        if self.strict {
            crate::resteer_window(&self.b.mem, &self.keep());
        }
        let base = if sqid == 0 { ASQ } else { io_sq(sqid as u8) };
        let mut tail = sq.tail;
        for c in cmds {
            // Keep one slot free, and room in the CQ (the harness reaps before it fills).
            if self.in_flight(sqid) + 2 >= usize::from(sq.size) {
                break;
            }
            let cid = self.next_cid;
            self.next_cid = self.next_cid.wrapping_add(1).max(1);
            let bytes = self.sqe_bytes(c, cid);
            self.b
                .mem
                .write_slice(&bytes, GuestAddress(base + u64::from(tail) * 64))
                .expect("SQE");
            tail = (tail + 1) % sq.size;
            self.outstanding.insert((sqid, cid), c.opcode);
            cids.push(cid);
            if sqid == 0
                && matches!(
                    AdminOpcode(c.opcode),
                    AdminOpcode::DELETE_IO_SQ
                        | AdminOpcode::CREATE_IO_SQ
                        | AdminOpcode::DELETE_IO_CQ
                        | AdminOpcode::CREATE_IO_CQ
                        | AdminOpcode::DOORBELL_BUFFER_CONFIG
                )
            {
                // Raw queue management: the harness no longer knows the queue set.
                self.model = false;
            }
        }
        self.sqs.get_mut(&sqid).expect("sq").tail = tail;
        if self.shadow && sqid != 0 {
            let _ = self
                .b
                .mem
                .write_obj(u32::from(tail), GuestAddress(SHADOW + u64::from(sqid) * 8));
        }
        self.w32(reg::DOORBELL_BASE + u64::from(sqid) * 8, u32::from(tail));
        self.reap();
        cids
    }

    fn in_flight(&self, sqid: u16) -> usize {
        self.outstanding.keys().filter(|(s, _)| *s == sqid).count()
    }

    /// Consume every new CQE on the harness's CQs.
    fn reap(&mut self) {
        // Messages sent before this scan began: one of them may announce an entry this scan
        // finds on one CQ while another CQ sharing its vector was the one checked.
        let before = self.msi_counts();
        let ids: Vec<u16> = self.cqs.keys().copied().collect();
        let mut moved_cqs = Vec::new();
        for id in ids {
            let base = if id == 0 { ACQ } else { io_cq(id as u8) };
            let mut cq = self.cqs[&id];
            let mut moved = false;
            for _ in 0..cq.size {
                let mut e = [0u8; 16];
                if self
                    .b
                    .mem
                    .read_slice(&mut e, GuestAddress(base + u64::from(cq.head) * 16))
                    .is_err()
                {
                    break;
                }
                let dw2 = u32::from_le_bytes(e[8..12].try_into().expect("4"));
                let dw3 = u32::from_le_bytes(e[12..16].try_into().expect("4"));
                if ((dw3 >> 16) & 1 == 1) != cq.phase {
                    break;
                }
                let (sqid, cid) = ((dw2 >> 16) as u16, dw3 as u16);
                let was = self.outstanding.remove(&(sqid, cid));
                if id == 0 {
                    self.admin_status.insert(cid, (dw3 >> 17) as u16);
                }
                if self.model {
                    assert!(
                        !self.sqs.contains_key(&sqid) || was.is_some(),
                        "CQ {id}: completion for SQ {sqid} CID {cid:#x} that is not outstanding \
                         (duplicate or never submitted)"
                    );
                }
                cq.head = (cq.head + 1) % cq.size;
                if cq.head == 0 {
                    cq.phase = !cq.phase;
                }
                moved = true;
            }
            self.cqs.insert(id, cq);
            if moved {
                moved_cqs.push(id);
            }
        }
        self.check_interrupts(&moved_cqs, &before);
        for id in moved_cqs {
            let cq = self.cqs[&id];
            if self.shadow && id != 0 {
                let _ = self.b.mem.write_obj(
                    u32::from(cq.head),
                    GuestAddress(SHADOW + u64::from(id) * 8 + 4),
                );
            }
            self.w32(
                reg::DOORBELL_BASE + u64::from(id) * 8 + 4,
                u32::from(cq.head),
            );
        }
    }

    /// MSI-X messages sent so far, per vector.
    fn msi_counts(&self) -> HashMap<u16, usize> {
        self.b
            .irq
            .msis
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|(&data, &n)| Some((u16::try_from(data).ok()?, n)))
            .collect()
    }

    /// New completions on interrupting CQs must be announced: an MSI-X message for each vector
    /// involved, within the longest coalescing time (host feature 08h allows 25.5 ms). Checked
    /// before the heads are written back, so no interrupt can be legitimately dropped as
    /// consumed.
    fn check_interrupts(&mut self, cqs: &[u16], before: &HashMap<u16, usize>) {
        if !self.model {
            return;
        }
        let mut vectors: Vec<u16> = cqs.iter().filter_map(|id| self.cqs[id].vector).collect();
        vectors.sort_unstable();
        vectors.dedup();
        for v in vectors {
            let count = |b: &Bench| {
                b.irq
                    .msis
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&u32::from(v))
                    .copied()
                    .unwrap_or(0)
            };
            let seen = self.irqs_seen.get(&v).copied().unwrap_or(0);
            let t = Instant::now();
            // The deadline is generous (a coalesced interrupt is due within 25.5 ms): on a
            // machine loaded by other work the I/O thread may not run for a while, and a lost
            // interrupt never arrives however long we wait.
            while count(&self.b) <= seen && t.elapsed() < crate::MAX_OP_WALL {
                std::thread::yield_now();
            }
            let now = count(&self.b);
            assert!(
                now > seen || !self.model,
                "vector {v}: completions posted but no interrupt within {:?} ({seen} before)",
                crate::MAX_OP_WALL
            );
            // The next new entry on this vector needs a message sent after this scan began:
            // not after this check, because CQs sharing the vector are scanned one by one and
            // a message counted here may already be the one for an entry the next scan finds.
            self.irqs_seen
                .insert(v, before.get(&v).copied().unwrap_or(0).max(seen));
        }
    }

    /// Reap until nothing is outstanding but AERs, or nothing has completed for a while (the
    /// RAM backends complete at once or on a pool thread within microseconds; a queue the
    /// controller stopped serving makes no progress at all).
    fn settle(&mut self) {
        self.settle_for(Duration::from_micros(50));
    }

    fn settle_for(&mut self, quiet: Duration) {
        // A controller that is not running, has failed, or may not master the bus completes
        // nothing more: no point waiting for it.
        let s = self.r32(reg::CSTS);
        if s & csts::RDY == 0 || s & csts::CFS != 0 || self.b.cfg_read(4, 2) & 0x4 == 0 {
            self.reap();
            return;
        }
        let mut last = (Instant::now(), self.outstanding.len());
        while last.0.elapsed() < quiet {
            self.reap();
            if self
                .outstanding
                .values()
                .all(|&op| op == AdminOpcode::ASYNC_EVENT_REQUEST.0)
            {
                return;
            }
            if self.outstanding.len() != last.1 {
                last = (Instant::now(), self.outstanding.len());
            }
            std::thread::yield_now();
        }
    }

    /// Everything submitted on a tracked queue completed, unless the controller may have
    /// dropped it (it failed, or Bus Master Enable is clear).
    fn check_done(&mut self) {
        if !self.model || !self.ready {
            return;
        }
        if self
            .outstanding
            .values()
            .any(|&op| op != AdminOpcode::ASYNC_EVENT_REQUEST.0)
        {
            // Give a descheduled worker every chance before calling it lost.
            self.settle_for(Duration::from_secs(1));
        }
        let s = self.r32(reg::CSTS);
        if s & (csts::CFS | csts::SHST_MASK) != 0 || s & csts::RDY == 0 {
            return;
        }
        let missing: Vec<_> = self
            .outstanding
            .iter()
            .filter(|(_, &op)| op != AdminOpcode::ASYNC_EVENT_REQUEST.0)
            .collect();
        assert!(
            missing.is_empty(),
            "{} submitted commands never completed: {missing:?}",
            missing.len()
        );
    }

    fn create_pair(&mut self, q: u8, entries: u8, vector: u8, ien: bool) {
        let q = 1 + q % HARNESS_QUEUES;
        if !self.ready || self.sqs.contains_key(&u16::from(q)) {
            return;
        }
        let size = u16::from(entries).clamp(2, QSIZE);
        let zero = vec![0u8; 0x2000];
        self.b
            .mem
            .write_slice(&zero, GuestAddress(io_sq(q)))
            .expect("queue");
        let qid = u32::from(q);
        let cq = Cmd {
            opcode: AdminOpcode::CREATE_IO_CQ.0,
            flags: 0,
            nsid: 0,
            cdw2: 0,
            cdw3: 0,
            mptr: 0,
            dptr: [io_cq(q), 0],
            cdw: [
                qid | (u32::from(size - 1) << 16),
                1 | (u32::from(ien) << 1) | (u32::from(vector % 8) << 16),
                0,
                0,
                0,
                0,
            ],
        };
        let sq = Cmd {
            opcode: AdminOpcode::CREATE_IO_SQ.0,
            dptr: [io_sq(q), 0],
            cdw: [
                qid | (u32::from(size - 1) << 16),
                1 | (qid << 16),
                0,
                0,
                0,
                0,
            ],
            ..cq.clone()
        };
        let model = self.model;
        for c in [cq, sq] {
            let cids = self.submit(0, std::slice::from_ref(&c));
            self.settle();
            self.model = model;
            let ok = cids
                .first()
                .and_then(|cid| self.admin_status.get(cid))
                .is_some_and(|&st| st == 0);
            if !ok {
                return;
            }
        }
        self.cqs.insert(
            u16::from(q),
            HostCq {
                head: 0,
                phase: true,
                size,
                vector: ien.then_some(u16::from(vector % 8)),
            },
        );
        self.sqs.insert(u16::from(q), HostSq { tail: 0, size });
    }

    fn step(&mut self, op: &Op) {
        match op {
            Op::BringUp => self.bring_up(),
            Op::CreatePair {
                q,
                entries,
                vector,
                ien,
            } => self.create_pair(*q, *entries, *vector, *ien),
            Op::Admin(c) => {
                self.submit(0, std::slice::from_ref(c));
            }
            Op::Io { q, cmd } => {
                self.submit(u16::from(1 + q % HARNESS_QUEUES), std::slice::from_ref(cmd));
            }
            Op::Burst { q, cmds } => {
                let n = cmds.len().min(32);
                self.submit(u16::from(1 + q % HARNESS_QUEUES), &cmds[..n]);
            }
            Op::Reg {
                off,
                width: w,
                value,
            } => {
                let off = u64::from(*off) % 0x2000;
                // Interrupt masks, CC, admin queue registers, doorbells: the harness's model of
                // queues and interrupts no longer holds.
                let end = off + width(*w) as u64;
                let hits = |a: u64, b: u64| off < b && end > a;
                if hits(0x0c, 0x18) || hits(0x24, 0x38) || end > reg::DOORBELL_BASE {
                    self.model = false;
                }
                self.b.bar_write(0, off, width(*w), *value);
                if self.strict && off < 0x38 && off + width(*w) as u64 > reg::ASQ {
                    // The admin queues stay out of the canary, however the write landed.
                    for r in [reg::ASQ, reg::ACQ] {
                        let a = self.b.bar_read(0, r, 8);
                        if steer(a) != a {
                            self.b.bar_write(0, r, 8, steer(a));
                        }
                    }
                }
            }
            Op::RegRead { off, width: w } => {
                self.b.bar_read(0, u64::from(*off) % 0x2000, width(*w));
            }
            Op::Cfg {
                off,
                width: w,
                value,
            } => {
                let off = *off % 0x1000;
                self.model = false;
                self.b.cfg_write(off, width(*w).min(4), *value);
            }
            Op::Msix {
                off,
                width: w,
                value,
            } => {
                self.model = false; // vectors may be masked or moved now
                self.b
                    .bar_write(4, u64::from(*off) % 0x1000, width(*w), *value);
            }
            Op::Poke { off, bytes } => {
                let len = (RAM_END - WINDOW) as usize;
                let off = (*off as usize) % len;
                let mut v: Vec<u8> = bytes.iter().take(len - off).copied().collect();
                if self.strict {
                    // Whole words only, so every pointer-sized value gets steered.
                    let start = off & !7;
                    let mut w = vec![0u8; (off - start + v.len()).div_ceil(8) * 8];
                    let _ = self
                        .b
                        .mem
                        .read_slice(&mut w, GuestAddress(WINDOW + start as u64));
                    w[off - start..off - start + v.len()].copy_from_slice(&v);
                    crate::steer_words(&mut w);
                    v = w;
                    let _ = self
                        .b
                        .mem
                        .write_slice(&v, GuestAddress(WINDOW + start as u64));
                } else {
                    let _ = self
                        .b
                        .mem
                        .write_slice(&v, GuestAddress(WINDOW + off as u64));
                }
            }
            Op::Dbbuf => {
                if !self.ready {
                    return;
                }
                // As a driver does: the shadow slots start out with the doorbell values the
                // controller already has (zero for queues not created yet). Built first and
                // written once: a polling controller must never see a slot pass through zero
                // (a tail behind its head reads as a wrapped queue full of stale entries).
                let mut page = vec![0u8; 0x2000];
                for (&q, sq) in &self.sqs {
                    let at = usize::from(q) * 8;
                    page[at..at + 4].copy_from_slice(&u32::from(sq.tail).to_le_bytes());
                }
                for (&q, cq) in &self.cqs {
                    let at = usize::from(q) * 8 + 4;
                    page[at..at + 4].copy_from_slice(&u32::from(cq.head).to_le_bytes());
                }
                self.b
                    .mem
                    .write_slice(&page, GuestAddress(SHADOW))
                    .expect("shadow");
                let c = Cmd {
                    opcode: AdminOpcode::DOORBELL_BUFFER_CONFIG.0,
                    flags: 0,
                    nsid: 0,
                    cdw2: 0,
                    cdw3: 0,
                    mptr: 0,
                    dptr: [SHADOW, EVENTIDX],
                    cdw: [0; 6],
                };
                let model = self.model;
                let cids = self.submit(0, &[c]);
                self.settle();
                self.model = model;
                self.shadow = cids
                    .first()
                    .and_then(|cid| self.admin_status.get(cid))
                    .is_some_and(|&st| st == 0);
            }
            Op::Shadow { q, cq, value, ring } => {
                let q = u64::from(*q % 8);
                let slot = SHADOW + q * 8 + if *cq { 4 } else { 0 };
                let _ = self.b.mem.write_obj(*value, GuestAddress(slot));
                self.model = false;
                if *ring {
                    self.w32(reg::DOORBELL_BASE + q * 8 + if *cq { 4 } else { 0 }, *value);
                }
            }
            Op::Reap => self.reap(),
            Op::Settle => self.settle(),
            Op::Reset => self.reset(),
            Op::Shutdown => {
                let c = self.r32(reg::CC);
                // Enabled: CC.EN set as well as CSTS.RDY. RDY with EN clear is a reset still
                // draining, and a shutdown notified then has nothing to shut down.
                let enabled = c & cc::EN != 0 && self.r32(reg::CSTS) & csts::RDY != 0;
                self.w32(
                    reg::CC,
                    (c & !(cc::SHN_MASK << cc::SHN_SHIFT)) | (1 << cc::SHN_SHIFT),
                );
                // An enabled controller must finish its shutdown within CAP.TO.
                if enabled && self.ready {
                    self.wait_csts("shutdown", true, true, |s| {
                        s & csts::SHST_MASK == csts::SHST_COMPLETE << csts::SHST_SHIFT
                    });
                }
                self.forget_queues();
            }
        }
    }
}
