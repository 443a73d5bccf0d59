//! Pause, save and restore: what a paused controller holds, as versioned serde data.
//!
//! **Pausing** sets [`flag::PAUSED`]: nothing more is fetched (doorbells still record their
//! tails), the commands in flight finish and post their completions as usual, and backends are
//! flushed. What is left then is registers and queue positions; no command is half done, so a
//! restored controller owes the guest nothing but the completions it has not fetched yet, and
//! every command completes exactly once. Outstanding Asynchronous Event Requests are the
//! exception by design: they are kept, with the events waiting for them.
//!
//! **Restoring** checks everything (format version, identity, every queue's geometry, vector
//! and ID) before it changes anything, so a damaged or foreign state never half-restores.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pci::{FunctionState, StateError};
use serde::{Deserialize, Serialize};
use zerocopy::{FromBytes, IntoBytes};

use crate::ctrl::{flag, lock, AsyncEvent, Shared};
use crate::features::Features;
use crate::logpage::{RunningSelfTest, ERROR_LOG_ENTRIES};
use crate::namespace::LBA_FORMATS;
use crate::queue::{CompQueue, Group, SubQueue};
use crate::spec::dw::{Cc, Csts};
use crate::spec::{csts, self_test, ErrorLogEntry, SelfTestResult};

/// Version of [`NvmeState`]; a state of another version is refused.
pub const STATE_VERSION: u32 = 1;

/// How long a pause waits for in-flight backend requests (an NBD backend gives up after 30 s).
const PAUSE_WAIT: Duration = Duration::from_secs(60);

/// Largest admin queue (AQA: 12-bit sizes).
const ADMIN_MAX: u32 = 4096;

/// A paused controller's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NvmeState {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// Identity: serial number, I/O queue pairs and largest queue, which the restoring
    /// controller must have been built with.
    pub serial: String,
    /// `maxq`.
    pub maxq: u16,
    /// `qsz`.
    pub qsz: u32,
    /// Namespaces.
    pub namespaces: Vec<NsState>,
    /// Config space, MSI/MSI-X and INTx.
    pub pci: FunctionState,
    /// Registers.
    pub regs: Regs,
    /// The admin queue pair (present while enabled).
    pub admin: Option<GroupState>,
    /// The I/O completion queues and their submission queues.
    pub groups: Vec<GroupState>,
    /// Feature values.
    pub features: Features,
    /// Doorbell Buffer Config: (shadow doorbells, EventIdx) addresses.
    pub dbbuf: Option<(u64, u64)>,
    /// Asynchronous events.
    pub aer: AerState,
    /// Error Information log entries, newest first, 64 bytes each.
    pub error_log: Vec<Vec<u8>>,
    /// Errors ever logged.
    pub error_count: u64,
    /// Changed Namespace List entries.
    pub changed_ns: Vec<u32>,
    /// Device self-test results, newest first, 28 bytes each (absent in older snapshots).
    #[serde(default)]
    pub self_tests: Vec<Vec<u8>>,
    /// The device self-test under way: (self-test code, NSID, milliseconds run, power-on
    /// seconds at its start).
    #[serde(default)]
    pub self_test_running: Option<(u8, u32, u64, u64)>,
    /// The host-set timestamp's current value (ms), if it set one.
    pub timestamp_ms: Option<u64>,
    /// Shutdown notifications seen.
    pub shutdown_seq: u64,
    /// Counters (SMART log and `--stats`).
    pub counters: CounterState,
}

/// The register file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Regs {
    /// CC.
    pub cc: u32,
    /// CSTS without CFS.
    pub csts: u32,
    /// CSTS.CFS.
    pub fatal: bool,
    /// AQA.
    pub aqa: u32,
    /// ASQ.
    pub asq: u64,
    /// ACQ.
    pub acq: u64,
    /// INTMS.
    pub intms: u32,
}

/// One namespace.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NsState {
    /// Namespace ID.
    pub nsid: u32,
    /// Backend size in bytes (must match).
    pub capacity: u64,
    /// LBA format in use.
    pub flbas: u8,
    /// A flush failed since the last reset.
    pub flush_failed: bool,
}

/// A completion queue and its submission queues.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupState {
    /// The CQ.
    pub cq: CqState,
    /// Its SQs.
    pub sqs: Vec<SqState>,
}

/// A completion queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CqState {
    /// Queue ID.
    pub id: u16,
    /// Base address.
    pub base: u64,
    /// Entries.
    pub size: u32,
    /// Host head.
    pub head: u32,
    /// Controller tail.
    pub tail: u32,
    /// Phase tag.
    pub phase: bool,
    /// Interrupts enabled.
    pub ien: bool,
    /// Interrupt vector.
    pub iv: u16,
    /// An interrupt is owed (posted or held by coalescing, not sent).
    pub irq_owed: bool,
    /// A fetch stopped for want of room.
    pub starved: bool,
}

/// A submission queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SqState {
    /// Queue ID.
    pub id: u16,
    /// Base address.
    pub base: u64,
    /// Entries.
    pub size: u32,
    /// Next entry to fetch.
    pub head: u32,
    /// Host tail.
    pub tail: u32,
    /// Memory page size for its PRPs.
    pub page: u64,
    /// Stopped after a bad shadow doorbell.
    pub stopped: bool,
}

/// Asynchronous event state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AerState {
    /// Outstanding Asynchronous Event Request CIDs.
    pub cids: Vec<u16>,
    /// Events waiting: (type, information, log page).
    pub pending: Vec<(u8, u8, u8)>,
    /// Types masked until their log page is read.
    pub masked: [bool; 8],
}

/// Counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CounterState {
    /// Read commands.
    pub read_cmds: u64,
    /// Write commands.
    pub write_cmds: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Interrupts sent.
    pub interrupts: u64,
    /// Media errors.
    pub media_errors: u64,
    /// Admin commands.
    pub admin_cmds: u64,
}

fn refused(what: std::fmt::Arguments<'_>) -> StateError {
    StateError::Refused(format!("nvme: {what}"))
}

fn invalid(what: std::fmt::Arguments<'_>) -> StateError {
    StateError::Invalid(format!("nvme state: {what}"))
}

impl Shared {
    /// Stop fetching, wait for the commands in flight and flush.
    pub fn pause(&self) -> Result<(), StateError> {
        self.flags.fetch_or(flag::PAUSED, Ordering::SeqCst);
        let deadline = Instant::now() + PAUSE_WAIT;
        loop {
            self.wait_idle_until(deadline);
            if self.quiesced() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(refused(format_args!(
                    "{} commands still in flight after {} s",
                    self.inflight.load(Ordering::SeqCst),
                    PAUSE_WAIT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // A reset waiting for the old queues to drain finishes now rather than on a thread
        // that may not have got to it yet.
        let mut c = self.lock();
        self.try_finish_reset(&mut c);
        drop(c);
        self.flush_all();
        Ok(())
    }

    /// Nothing is running: no backend request, no command between chunks.
    fn quiesced(&self) -> bool {
        if self.inflight.load(Ordering::SeqCst) != 0 {
            return false;
        }
        self.groups.iter().all(|g| {
            lock(g)
                .sqs
                .iter()
                .all(|s| s.slots.iter().flatten().all(|slot| slot.held))
        })
    }

    /// Fetch again after a pause or restore: owed interrupts go out, queued commands run.
    pub fn unpause(&self) {
        if self.flags.fetch_and(!flag::PAUSED, Ordering::SeqCst) & flag::PAUSED == 0 {
            return;
        }
        for g in self.groups.iter() {
            let iv = {
                let mut g = lock(g);
                match g.cq.as_mut() {
                    Some(cq) if cq.irq_owed && cq.ien && self.may_signal(cq.iv) => {
                        cq.irq_owed = false;
                        Some(cq.iv)
                    }
                    _ => None,
                }
            };
            if let Some(iv) = iv {
                self.fire(iv);
            }
        }
        {
            let mut c = self.lock();
            self.raise_admin(&mut c);
            let shst = Csts::from_bits(c.csts).shst();
            if u32::from(shst) == csts::SHST_OCCURRING && self.flag(flag::ACCEPTING) {
                drop(c);
                self.start_shutdown();
            }
        }
        self.update_intx();
        self.refetch_all();
        let mut c = self.lock();
        self.process_admin(&mut c);
        drop(c);
        self.update_intx();
    }

    /// The paused controller's state.
    pub fn save(&self) -> Result<NvmeState, StateError> {
        if !self.flag(flag::PAUSED) || !self.quiesced() {
            return Err(refused(format_args!("save needs a paused controller")));
        }
        let c = self.lock();
        if self.groups.iter().any(|g| {
            lock(g)
                .sqs
                .iter()
                .any(|s| s.slots.iter().flatten().next().is_some())
        }) {
            // Commands finished while Bus Master Enable was clear and their completions wait
            // for it; Linux never clears BME with I/O outstanding, so this is not worth a
            // format of its own.
            return Err(refused(format_args!(
                "completions are held while Bus Master Enable is clear"
            )));
        }
        let ns = self.ns.read().unwrap_or_else(|e| e.into_inner());
        let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let k = &self.counters;
        Ok(NvmeState {
            version: STATE_VERSION,
            serial: self.cfg.serial.clone(),
            maxq: self.cfg.maxq,
            qsz: self.cfg.qsz,
            namespaces: ns
                .iter()
                .map(|n| NsState {
                    nsid: n.nsid,
                    capacity: n.backend.info().capacity,
                    flbas: n.flbas,
                    flush_failed: n.flush_failed.load(Ordering::Acquire),
                })
                .collect(),
            pci: self.lock_pci().save(),
            regs: Regs {
                cc: c.cc,
                csts: c.csts,
                fatal: self.flag(flag::FATAL),
                aqa: c.aqa,
                asq: c.asq,
                acq: c.acq,
                intms: self.intms.load(Ordering::Acquire),
            },
            admin: save_group(&c.admin),
            groups: self
                .groups
                .iter()
                .filter_map(|g| save_group(&lock(g)))
                .collect(),
            features: c.features.clone(),
            dbbuf: c.dbbuf,
            aer: AerState {
                cids: c.aer_cids.clone(),
                pending: c
                    .aer_pending
                    .iter()
                    .map(|e| (e.typ, e.info, e.lid))
                    .collect(),
                masked: c.aer_masked,
            },
            error_log: c
                .logs
                .errors
                .iter()
                .map(|e| e.as_bytes().to_vec())
                .collect(),
            error_count: c.logs.error_count,
            changed_ns: c.logs.changed_ns.clone(),
            self_tests: c
                .logs
                .self_tests
                .iter()
                .map(|r| r.as_bytes().to_vec())
                .collect(),
            self_test_running: c.logs.self_test_running.map(|t| {
                let ms = t.started.elapsed().as_millis();
                (
                    t.stc,
                    t.nsid,
                    ms.min(u128::from(u64::MAX)) as u64,
                    t.poh_secs,
                )
            }),
            timestamp_ms: c
                .timestamp
                .map(|(ms, at)| ms + at.elapsed().as_millis() as u64),
            shutdown_seq: c.shutdown_seq,
            counters: CounterState {
                read_cmds: g(&k.read_cmds),
                write_cmds: g(&k.write_cmds),
                bytes_read: g(&k.bytes_read),
                bytes_written: g(&k.bytes_written),
                interrupts: g(&k.interrupts),
                media_errors: g(&k.media_errors),
                admin_cmds: g(&k.admin_cmds),
            },
        })
    }

    /// Check `s` against this controller's build and against the spec's limits.
    fn check(&self, s: &NvmeState) -> Result<(), StateError> {
        if s.version != STATE_VERSION {
            return Err(invalid(format_args!(
                "format version {}, this rhyve reads version {STATE_VERSION}",
                s.version
            )));
        }
        let cfg = &self.cfg;
        if (s.serial.as_str(), s.maxq, s.qsz) != (cfg.serial.as_str(), cfg.maxq, cfg.qsz) {
            return Err(refused(format_args!(
                "state of a controller with ser={} maxq={} qsz={}, this one has ser={} maxq={} qsz={}",
                s.serial, s.maxq, s.qsz, cfg.serial, cfg.maxq, cfg.qsz
            )));
        }
        let ns = self.ns.read().unwrap_or_else(|e| e.into_inner());
        if s.namespaces.len() != ns.len() {
            return Err(refused(format_args!(
                "state has {} namespaces, this controller {}",
                s.namespaces.len(),
                ns.len()
            )));
        }
        for (saved, here) in s.namespaces.iter().zip(ns.iter()) {
            let cap = here.backend.info().capacity;
            if saved.nsid != here.nsid || saved.capacity != cap {
                return Err(refused(format_args!(
                    "namespace {} was {} bytes, its image now has {cap}",
                    saved.nsid, saved.capacity
                )));
            }
            if usize::from(saved.flbas) >= LBA_FORMATS.len() {
                return Err(invalid(format_args!(
                    "namespace {} LBA format {}",
                    saved.nsid, saved.flbas
                )));
            }
        }
        let vectors = usize::from(cfg.maxq) + 1;
        let f = &s.features;
        if f.nsqa >= cfg.maxq || f.ncqa >= cfg.maxq || f.power_state & 0x1f != 0 {
            return Err(invalid(format_args!(
                "features: {} SQs and {} CQs granted of {}, power state {}",
                u32::from(f.nsqa) + 1,
                u32::from(f.ncqa) + 1,
                cfg.maxq,
                f.power_state
            )));
        }
        if s.features.vector_cd.len() != vectors {
            return Err(invalid(format_args!(
                "{} interrupt vectors configured, the controller has {vectors}",
                s.features.vector_cd.len()
            )));
        }
        let page_ok = |p: u64| p.is_power_of_two() && (4096..=65536).contains(&p);
        let ring = |what: &str, id: u16, size: u32, max: u32, pos: [u32; 2]| {
            if size < 2 || size > max || pos.iter().any(|&p| p >= size) {
                Err(invalid(format_args!(
                    "{what} {id}: {size} entries (2..={max}), positions {pos:?}"
                )))
            } else {
                Ok(())
            }
        };
        if let Some(a) = &s.admin {
            if a.cq.id != 0 || a.sqs.len() != 1 || a.sqs[0].id != 0 {
                return Err(invalid(format_args!("admin queues are not queue 0")));
            }
            ring("admin CQ", 0, a.cq.size, ADMIN_MAX, [a.cq.head, a.cq.tail])?;
            let sq = &a.sqs[0];
            ring("admin SQ", 0, sq.size, ADMIN_MAX, [sq.head, sq.tail])?;
            if !page_ok(sq.page) {
                return Err(invalid(format_args!("admin SQ page size {}", sq.page)));
            }
        }
        let mut cq_seen = vec![false; vectors];
        let mut sq_seen = vec![false; vectors];
        for g in &s.groups {
            let q = &g.cq;
            let idx = usize::from(q.id);
            if q.id == 0 || idx >= vectors || std::mem::replace(&mut cq_seen[idx], true) {
                return Err(invalid(format_args!(
                    "CQ ID {} out of range or twice",
                    q.id
                )));
            }
            ring("CQ", q.id, q.size, cfg.qsz, [q.head, q.tail])?;
            if usize::from(q.iv) >= vectors {
                return Err(invalid(format_args!("CQ {} vector {}", q.id, q.iv)));
            }
            for sq in &g.sqs {
                let idx = usize::from(sq.id);
                if sq.id == 0 || idx >= vectors || std::mem::replace(&mut sq_seen[idx], true) {
                    return Err(invalid(format_args!(
                        "SQ ID {} out of range or twice",
                        sq.id
                    )));
                }
                ring("SQ", sq.id, sq.size, cfg.qsz, [sq.head, sq.tail])?;
                if !page_ok(sq.page) {
                    return Err(invalid(format_args!("SQ {} page size {}", sq.id, sq.page)));
                }
            }
        }
        if let Some((db, ei)) = s.dbbuf {
            let len = 8 * (u64::from(cfg.maxq) + 1);
            let ok = |a: u64| a != 0 && a.is_multiple_of(4096) && a.checked_add(len).is_some();
            if !ok(db) || !ok(ei) {
                return Err(invalid(format_args!(
                    "shadow doorbell buffers {db:#x}/{ei:#x}"
                )));
            }
        }
        if s.error_log.len() > ERROR_LOG_ENTRIES
            || s.error_log
                .iter()
                .any(|e| e.len() != std::mem::size_of::<ErrorLogEntry>())
        {
            return Err(invalid(format_args!("error log entries")));
        }
        if s.self_tests.len() > self_test::RESULTS
            || s.self_tests
                .iter()
                .any(|e| e.len() != std::mem::size_of::<SelfTestResult>())
        {
            return Err(invalid(format_args!("device self-test results")));
        }
        if let Some((stc, ..)) = s.self_test_running {
            if stc != self_test::SHORT && stc != self_test::EXTENDED {
                return Err(invalid(format_args!("running self-test code {stc}")));
            }
        }
        if s.aer.cids.len() > 16 || s.aer.pending.len() > 64 || s.changed_ns.len() > 1024 {
            return Err(invalid(format_args!("asynchronous event lists too long")));
        }
        Ok(())
    }

    /// Load `s` into this freshly built controller; it stays paused.
    pub fn restore(&self, s: &NvmeState) -> Result<(), StateError> {
        let mut c = self.lock();
        if c.cc != 0 || self.flags.load(Ordering::SeqCst) & !flag::PAUSED != 0 {
            return Err(refused(format_args!(
                "restore needs a freshly created controller"
            )));
        }
        self.check(s)?;
        self.lock_pci().restore(&s.pci)?;
        // From here on nothing can fail.
        self.flags.fetch_or(flag::PAUSED, Ordering::SeqCst);
        let r = &s.regs;
        (c.cc, c.csts, c.aqa, c.asq, c.acq) = (r.cc, r.csts, r.aqa, r.asq, r.acq);
        self.intms.store(r.intms, Ordering::Release);
        c.features = s.features.clone();
        self.sync_features(&c.features);
        c.dbbuf = s.dbbuf;
        c.aer_cids = s.aer.cids.clone();
        c.aer_pending = s
            .aer
            .pending
            .iter()
            .map(|&(typ, info, lid)| AsyncEvent { typ, info, lid })
            .collect();
        c.aer_masked = s.aer.masked;
        c.logs.errors = s
            .error_log
            .iter()
            .filter_map(|b| ErrorLogEntry::read_from_bytes(b).ok())
            .collect();
        c.logs.error_count = s.error_count;
        c.logs.changed_ns = s.changed_ns.clone();
        c.logs.self_tests = s
            .self_tests
            .iter()
            .filter_map(|b| SelfTestResult::read_from_bytes(b).ok())
            .collect();
        c.logs.self_test_running = s.self_test_running.map(|(stc, nsid, ms, poh_secs)| {
            // A test longer than its duration is simply finished when next looked at.
            let ran = Duration::from_millis(ms.min(60_000));
            RunningSelfTest {
                stc,
                nsid,
                started: Instant::now().checked_sub(ran).unwrap_or_else(Instant::now),
                poh_secs: poh_secs.min(u64::MAX / 2),
            }
        });
        c.timestamp = s.timestamp_ms.map(|ms| (ms, Instant::now()));
        c.shutdown_seq = s.shutdown_seq;
        {
            let mut ns = self.ns.write().unwrap_or_else(|e| e.into_inner());
            for (n, saved) in ns.iter_mut().zip(&s.namespaces) {
                n.flbas = saved.flbas;
                n.flush_failed.store(saved.flush_failed, Ordering::Release);
            }
        }
        if let Some(a) = &s.admin {
            c.admin = self.load_group(a);
            self.cq_assert[0].store(
                c.admin.cq.as_ref().is_some_and(CompQueue::has_unconsumed),
                Ordering::Relaxed,
            );
        }
        for gs in &s.groups {
            let group = self.load_group(gs);
            for sq in &group.sqs {
                self.sq_cq[usize::from(sq.id)].store(gs.cq.id, Ordering::Release);
            }
            let cq = group.cq.as_ref().expect("loaded with its CQ");
            self.cq_assert[usize::from(cq.id)]
                .store(cq.ien && cq.has_unconsumed(), Ordering::Relaxed);
            *lock(&self.groups[usize::from(gs.cq.id)]) = group;
        }
        if let Some((db, ei)) = s.dbbuf {
            self.shadow.0.store(db, Ordering::Release);
            self.shadow.1.store(ei, Ordering::Release);
        }
        let mut f = flag::PAUSED;
        if s.dbbuf.is_some() {
            f |= flag::SHADOW;
        }
        if r.fatal {
            f |= flag::FATAL;
        }
        if Cc::from_bits(r.cc).en() && Csts::from_bits(r.csts).rdy() {
            f |= flag::ACCEPTING;
        }
        self.flags.store(f, Ordering::SeqCst);
        let k = &self.counters;
        let n = &s.counters;
        for (a, v) in [
            (&k.read_cmds, n.read_cmds),
            (&k.write_cmds, n.write_cmds),
            (&k.bytes_read, n.bytes_read),
            (&k.bytes_written, n.bytes_written),
            (&k.interrupts, n.interrupts),
            (&k.media_errors, n.media_errors),
            (&k.admin_cmds, n.admin_cmds),
        ] {
            a.fetch_add(v, Ordering::Relaxed);
        }
        Ok(())
    }

    fn load_group(&self, g: &GroupState) -> Group {
        let q = &g.cq;
        let mut cq = CompQueue::new(q.id, q.base, q.size, q.ien, q.iv);
        (cq.head, cq.tail, cq.phase) = (q.head, q.tail, q.phase);
        (cq.irq_owed, cq.starved) = (q.irq_owed, q.starved);
        let sqs = g
            .sqs
            .iter()
            .map(|s| {
                let mut sq = SubQueue::new(s.id, s.base, s.size, s.page, self.next_epoch());
                (sq.head, sq.tail, sq.paced_tail) = (s.head, s.tail, s.tail);
                sq.stopped = s.stopped;
                sq
            })
            .collect();
        Group {
            cq: Some(cq),
            sqs,
            poll_until: None,
        }
    }
}

fn save_group(g: &Group) -> Option<GroupState> {
    let cq = g.cq.as_ref()?;
    Some(GroupState {
        cq: CqState {
            id: cq.id,
            base: cq.base,
            size: cq.size,
            head: cq.head,
            tail: cq.tail,
            phase: cq.phase,
            ien: cq.ien,
            iv: cq.iv,
            irq_owed: cq.irq_owed || cq.coal.deadline.is_some(),
            starved: cq.starved,
        },
        sqs: g
            .sqs
            .iter()
            .filter(|s| !s.gone)
            .map(|s| SqState {
                id: s.id,
                base: s.base,
                size: s.size,
                head: s.head,
                tail: s.tail,
                page: s.page,
                stopped: s.stopped,
            })
            .collect(),
    })
}
