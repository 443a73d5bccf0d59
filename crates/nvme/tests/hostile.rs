//! A hostile host: the defects found by attacking the controller, each with the test that
//! failed before its fix, plus the bounds the controller keeps whatever the host does.

mod common;

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

/// Run `f` on another thread and fail the test if it does not return within `secs` (a hang
/// would otherwise wedge the whole test binary).
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("{what} did not return within {secs} s"))
}

fn configure_shadow(d: &mut TestDriver) -> (u64, u64) {
    let db = d.alloc_queue(4096);
    let ei = d.alloc_queue(4096);
    assert_ok(&d.admin(doorbell_buffer_config(db, ei)));
    (db, ei)
}

fn write_u32(d: &TestDriver, addr: u64, v: u32) {
    d.mem.memory().write_obj(v, GuestAddress(addr)).unwrap();
}

/// Resident memory of this process, KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .unwrap()
}

fn threads() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Regression (defect 1): a shadow SQ tail ≥ the queue size made SQ processing loop forever
/// under the controller lock; the doorbell thread hung and rhyve could not exit. Now it is a bad
/// doorbell value: an Error asynchronous event, and that queue stops.
#[test]
fn bad_shadow_tail_stops_the_queue_instead_of_spinning() {
    let mut d = TestDriver::ready("4,nvme,ram=4");
    let aer = d.submit(0, async_event_request());
    let (db, _) = configure_shadow(&mut d);
    write_u32(&d, db + 8, 0xffff_ffff);
    let dev: Arc<dyn pci::PciDevice> =
        Arc::from(std::mem::replace(&mut d.dev, Box::new(NullDevice)));
    let dev2 = dev.clone();
    within(5, "an MMIO SQ doorbell", move || {
        dev2.bar_write(0, 0x1008, &1u32.to_le_bytes())
    });
    let dev3 = dev.clone();
    within(5, "an ioeventfd kick", move || dev3.kick(1));
    d.dev = Box::new(ArcDevice(dev));
    let c = d.wait_cid(0, aer);
    assert_ok(&c);
    assert_eq!(
        c.dw0 & 0xffff,
        0x0100,
        "Error event, invalid doorbell write value"
    );
    // The queue stopped: a now-valid tail fetches nothing, the controller still answers.
    write_u32(&d, db + 8, 1);
    d.bar_write32(0, 0x1008, 1);
    assert_eq!(d.csts() & 3, 1, "ready, not fatal");
    assert!(d.poll_cq(1, Duration::from_millis(100)).is_none());
    // The admin queue (not shadowed) keeps working.
    let id = d.identify_ok(1, 0);
    assert_eq!(&id[4..12], b"NVME-4-0");
}

/// Queue `s` on SQ `qid`, publish the tail in the shadow buffer `db`, and ring MMIO.
fn shadow_submit(d: &mut TestDriver, db: u64, qid: u16, s: nvme::spec::Sqe) -> u16 {
    let cid = d.submit_at(qid, s);
    let tail = d.sqs[&qid].tail;
    write_u32(d, db + 8 * u64::from(qid), tail);
    d.bar_write32(0, 0x1000 + 8 * u64::from(qid), tail);
    cid
}

/// A device that does nothing, to park the real one while a test shares it between threads.
struct NullDevice;
impl pci::PciDevice for NullDevice {
    fn name(&self) -> &str {
        "null"
    }
    fn config_read(&self, _: u16, d: &mut [u8]) {
        d.fill(0xff)
    }
    fn config_write(&self, _: u16, _: &[u8]) {}
    fn bar_read(&self, _: u8, _: u64, d: &mut [u8]) {
        d.fill(0xff)
    }
    fn bar_write(&self, _: u8, _: u64, _: &[u8]) {}
    fn bars(&self) -> Vec<pci::BarInfo> {
        Vec::new()
    }
}

/// A shared device behind the driver's `Box<dyn PciDevice>`.
struct ArcDevice(Arc<dyn pci::PciDevice>);
impl pci::PciDevice for ArcDevice {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn config_read(&self, o: u16, d: &mut [u8]) {
        self.0.config_read(o, d)
    }
    fn config_write(&self, o: u16, d: &[u8]) {
        self.0.config_write(o, d)
    }
    fn bar_read(&self, b: u8, o: u64, d: &mut [u8]) {
        self.0.bar_read(b, o, d)
    }
    fn bar_write(&self, b: u8, o: u64, d: &[u8]) {
        self.0.bar_write(b, o, d)
    }
    fn bars(&self) -> Vec<pci::BarInfo> {
        self.0.bars()
    }
    fn kick(&self, t: u32) {
        self.0.kick(t)
    }
}

/// Regression (defect 2): commands were fetched while their CQ was full and the completions
/// parked in an unbounded list. Now nothing is fetched without a free CQ entry: a 2-entry CQ
/// behind a 1024-entry SQ has at most one command executed until the host consumes it.
#[test]
fn a_full_cq_stops_fetching() {
    let (mut d, backend) = TestDriver::on("4,nvme,ram=1,qsz=1024", 1 << 20);
    d.bring_up();
    d.auto_ring = false;
    d.create_pair_sized(2, 2, 1024);
    for _ in 0..1000 {
        d.submit(2, flush(1));
    }
    let c = d.wait_cq(2);
    assert_ok(&c);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        backend.flushes.load(Ordering::SeqCst),
        1,
        "one CQ entry, one command"
    );
    assert_eq!(c.sq_head, 1, "the SQ head shows only one entry was fetched");
    // Each entry the host frees lets exactly one more command through.
    for n in 2..=5 {
        d.ring_cq_head(2);
        assert_ok(&d.wait_cq(2));
        assert_eq!(backend.flushes.load(Ordering::SeqCst), n);
    }
}

/// Regression (defect 2): with a stalled backend, 2520 reads were accepted behind a 64-entry
/// SQ (the host refilled the SQ as the head moved). What is in flight is bounded by the CQ: of
/// 40 refills of 63 reads, at most 63 are accepted while the backend stalls.
#[test]
fn a_stalled_backend_holds_at_most_the_cq() {
    let (mut d, backend) = TestDriver::on("4,nvme,ram=1", 1 << 20);
    d.bring_up(); // pair 1: 64/64
    d.auto_ring = false;
    backend.hold();
    let buf = d.alloc(512);
    for _round in 0..40 {
        for _ in 0..63 {
            let s = rw(IoOpcode::READ, 1, 0, 1).prp(buf, 0);
            d.submit(1, s);
        }
    }
    backend.wait_parked(1);
    std::thread::sleep(Duration::from_millis(100));
    backend.release();
    // Without the host freeing CQ entries nothing more can start: exactly 63 complete.
    let mut n = 0;
    while d.poll_cq(1, Duration::from_millis(300)).is_some() {
        n += 1;
    }
    assert_eq!(n, 63, "completions");
    assert_eq!(backend.reads.load(Ordering::SeqCst), 63, "reads started");
    let data = d.read_mem(buf, 512);
    d.expect(buf, &data);
}

/// Regression (defect 3): every CC.SHN 00→01 edge spawned a thread (20,000 toggles left
/// thousands alive) and a stale one could report SHST before the latest flush. Now one flush
/// job at a time, and SHST belongs to the latest request.
#[test]
fn shutdown_storm_spawns_no_threads_and_shst_follows_the_latest() {
    let (mut d, backend) = TestDriver::on("4,nvme,ram=1", 1 << 20);
    d.bring_up();
    let base = threads();
    let cc = d.reg(0x14);
    for _ in 0..20_000 {
        d.set_reg(0x14, cc | (1 << 14));
        d.set_reg(0x14, cc);
    }
    assert!(
        threads() <= base + 2,
        "{} threads after the storm, {base} before",
        threads()
    );
    let flushes = backend.flushes.load(Ordering::SeqCst);
    d.set_reg(0x14, cc | (1 << 14));
    d.wait_csts(0xc, 0x8);
    assert!(
        backend.flushes.load(Ordering::SeqCst) > flushes,
        "the latest request was flushed before SHST said complete"
    );
}

/// Regression (defect 6): after CSTS.CFS, a kick or an I/O completion still fetched and ran
/// commands. Nothing is fetched once CFS is set, until reset.
#[test]
fn nothing_is_fetched_after_controller_fatal_status() {
    let (mut d, backend) = TestDriver::on("4,nvme,ram=1", 1 << 20);
    d.bring_up();
    let (db, _) = configure_shadow(&mut d);
    backend.hold();
    let buf = d.alloc(512);
    let s = rw(IoOpcode::READ, 1, 0, 1).prp(buf, 0);
    shadow_submit(&mut d, db, 1, s); // in flight, held
    backend.wait_parked(1);
    // The queues vanish from guest memory (a new memory table): the next fetch fails → CFS.
    let full = d.hide_queues();
    d.dev.kick(1);
    d.restore(full);
    assert_eq!(d.csts() & 2, 2, "CFS");
    // More work queued: neither a kick nor the held read's completion may fetch it.
    let q = d.sqs[&1];
    let s = rw(IoOpcode::READ, 1, 0, 1).prp(buf, 0).cid(0x77);
    d.mem
        .memory()
        .write_slice(
            zerocopy::IntoBytes::as_bytes(&s),
            GuestAddress(q.base + u64::from(q.tail) * 64),
        )
        .unwrap();
    write_u32(&d, db + 8, q.tail + 1);
    d.dev.kick(1);
    backend.release();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        backend.reads.load(Ordering::SeqCst),
        1,
        "only the read from before CFS ran"
    );
    let data = d.read_mem(buf, 512);
    d.expect(buf, &data);
    // Reset clears CFS; the controller comes back.
    d.disable();
    assert_eq!(d.csts() & 2, 0);
    d.enable();
    d.create_pair(1, 16);
    assert_eq!(d.read_blocks(1, 1, 0, 1, 512).len(), 512);
}

/// Regression (defect 7): with Bus Master Enable clear the controller DMAed a read and sent an
/// MSI. With BME clear nothing is fetched, no CQE is written and no message sent; setting BME
/// again resumes.
#[test]
fn bus_master_enable_fences_dma_and_interrupts() {
    let (mut d, backend) = TestDriver::on("4,nvme,ram=1", 1 << 20);
    d.bring_up();
    d.write_blocks(1, 1, 0, 512, &data(512, 7));
    let irqs = d.irq.count(msix_data(1));
    // A read in flight when BME goes: its CQE and interrupt wait.
    backend.hold();
    let b1 = d.alloc(512);
    let s = rw(IoOpcode::READ, 1, 0, 1).prp(b1, 0);
    let held = d.submit(1, s);
    backend.wait_parked(1);
    d.cfg_write(4, 2, 0x2); // memory space only: BME clear
    backend.release();
    // A read submitted while BME is clear is not even fetched.
    let b2 = d.alloc(512);
    let s = rw(IoOpcode::READ, 1, 0, 1).prp(b2, 0);
    let fenced = d.submit(1, s);
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        d.poll_cq(1, Duration::from_millis(50)).is_none(),
        "no CQE while BME is clear"
    );
    assert_eq!(d.irq.count(msix_data(1)), irqs, "no MSI while BME is clear");
    assert!(
        d.read_mem(b2, 512)
            .iter()
            .enumerate()
            .all(|(i, &x)| x == pattern(b2 + i as u64)),
        "no DMA into the second buffer"
    );
    d.cfg_write(4, 2, 0x6);
    let c1 = d.wait_cid(1, held);
    let c2 = d.wait_cid(1, fenced);
    assert_ok(&c1);
    assert_ok(&c2);
    d.wait_irqs(msix_data(1), irqs + 1);
    assert_eq!(d.read_mem(b2, 512), data(512, 7));
    let (a, b) = (d.read_mem(b1, 512), d.read_mem(b2, 512));
    d.expect(b1, &a);
    d.expect(b2, &b);
}

/// Regression (defect 9): a failed fdatasync was forgotten, so a later Flush could succeed
/// after the kernel had dropped the dirty pages. Once a flush failed, every Flush reports
/// Write Fault until the controller is reset, and SMART counts a media error.
#[test]
fn a_failed_flush_is_reported_until_reset() {
    let (mut d, backend) = TestDriver::on("4,nvme,ram=1", 1 << 20);
    d.bring_up();
    let media = |d: &mut TestDriver| {
        let (c, log) = d.get_log(0x02, 0, 512, 0, false);
        assert_ok(&c);
        u128::from_le_bytes(log[160..176].try_into().unwrap())
    };
    assert_eq!(media(&mut d), 0);
    backend.fail_flushes.store(true, Ordering::SeqCst);
    assert_status(&d.io(1, flush(1)), 2, 0x80);
    backend.fail_flushes.store(false, Ordering::SeqCst);
    assert_status(&d.io(1, flush(1)), 2, 0x80);
    assert_status(&d.io(1, flush(NSID_ALL)), 2, 0x80);
    // A FUA write promises durability too.
    let (p1, p2) = d.prp_buffer(&data(512, 1));
    let w = rw(IoOpcode::WRITE, 1, 0, 1).prp(p1, p2).fua();
    assert_status(&d.io(1, w), 2, 0x80);
    assert!(media(&mut d) >= 1, "counted as a media error");
    d.disable();
    d.enable();
    d.create_pair(1, 16);
    assert_ok(&d.io(1, flush(1)));
}

/// Feature 08h is applied: with threshold 4 a burst interrupts once per 4 completions, and a
/// lone completion is signalled when the aggregation time runs out.
#[test]
fn coalescing_threshold_and_time() {
    let mut d = TestDriver::ready("4,nvme,ram=4,coalesce=host");
    assert_ok(&d.set_features(0x08, (10 << 8) | 3)); // THR 4, TIME 1 ms
    d.auto_ring = false;
    let before = d.irq.count(msix_data(1));
    let bufs: Vec<u64> = (0..8).map(|_| d.alloc(512)).collect();
    // Queue 8 reads, then ring once: they complete in one pass.
    for &b in &bufs {
        let s = rw(IoOpcode::READ, 1, 0, 1).prp(b, 0);
        let q = d.sqs.get_mut(&1).unwrap();
        let addr = q.base + u64::from(q.tail) * 64;
        q.tail += 1;
        d.mem
            .memory()
            .write_slice(zerocopy::IntoBytes::as_bytes(&s), GuestAddress(addr))
            .unwrap();
    }
    let t0 = Instant::now();
    d.bar_write32(0, 0x1008, 8);
    for _ in 0..8 {
        assert_ok(&d.wait_cq(1));
    }
    d.ring_cq_head(1);
    assert_eq!(
        d.irq.count(msix_data(1)) - before,
        2,
        "8 completions, threshold 4"
    );
    // One more: below the threshold, so it waits for the aggregation time.
    let b = d.alloc(512);
    let s = rw(IoOpcode::READ, 1, 0, 1).prp(b, 0);
    let t1 = Instant::now();
    d.submit(1, s);
    assert_ok(&d.wait_cq(1));
    d.wait_irqs(msix_data(1), before + 3);
    let waited = t1.elapsed();
    assert!(
        waited >= Duration::from_micros(900),
        "signalled after {waited:?}, before the aggregation time"
    );
    let _ = t0;
    // Coalescing Disable on the vector: every completion interrupts at once.
    assert_ok(&d.set_features(0x09, (1 << 16) | 1));
    let before = d.irq.count(msix_data(1));
    d.ring_cq_head(1);
    let b = d.alloc(512);
    let s = rw(IoOpcode::READ, 1, 0, 1).prp(b, 0);
    d.submit(1, s);
    assert_ok(&d.wait_cq(1));
    d.wait_irqs(msix_data(1), before + 1);
    for &b in bufs.iter() {
        let x = d.read_mem(b, 512);
        d.expect(b, &x);
    }
}

/// Adaptive coalescing: depth 1 interrupts every completion at once; a deep burst is gathered.
#[test]
fn adaptive_coalescing_leaves_qd1_alone_and_batches_bursts() {
    let mut d = TestDriver::ready("4,nvme,ram=4,coalesce=adaptive");
    d.auto_ring = false;
    let before = d.irq.count(msix_data(1));
    let buf = d.alloc(512);
    for i in 0..10u64 {
        // An interrupt-driven host: submit, wait for the interrupt, then reap. Adaptive mode may
        // hold one interrupt now and then (at most every 10 ms) to look for a deeper queue; it
        // still comes, one per command.
        d.submit(1, rw(IoOpcode::READ, 1, i, 1).prp(buf, 0));
        d.wait_irqs(msix_data(1), before + i as usize + 1);
        assert_ok(&d.wait_cq(1));
        d.ring_cq_head(1);
        assert_eq!(
            d.irq.count(msix_data(1)) - before,
            i as usize + 1,
            "QD1: one each"
        );
        let x = d.read_mem(buf, 512);
        d.expect(buf, &x);
    }
    let before = d.irq.count(msix_data(1));
    let bufs: Vec<u64> = (0..32).map(|_| d.alloc(512)).collect();
    for &b in &bufs {
        let s = rw(IoOpcode::READ, 1, 0, 1).prp(b, 0);
        let q = d.sqs.get_mut(&1).unwrap();
        let addr = q.base + u64::from(q.tail) * 64;
        q.tail = (q.tail + 1) % q.size;
        d.mem
            .memory()
            .write_slice(zerocopy::IntoBytes::as_bytes(&s), GuestAddress(addr))
            .unwrap();
    }
    let tail = d.sqs[&1].tail;
    d.bar_write32(0, 0x1008, tail);
    // An interrupt-driven host: it looks at the CQ when the interrupt comes.
    d.wait_irqs(msix_data(1), before + 1);
    for _ in 0..32 {
        assert_ok(&d.wait_cq(1));
    }
    d.ring_cq_head(1);
    let n = d.irq.count(msix_data(1)) - before;
    assert!(
        (1..=8).contains(&n),
        "32 completions in one burst, {n} interrupts"
    );
    for &b in &bufs {
        let x = d.read_mem(b, 512);
        d.expect(b, &x);
    }
}

/// Regression: adaptive coalescing learnt that a host takes 4 completions per interrupt and then
/// held every interrupt until 8 had gathered, which a host at queue depth 4 (waiting for its
/// interrupt before it submits again) never reaches: each batch sat out the whole aggregation
/// time. Once the device has nothing left of the host's and the host has gone quiet, the
/// interrupt goes out. With a 100 ms aggregation time, 20 rounds must take far less than the
/// 2 s they took before.
#[test]
fn adaptive_coalescing_does_not_stall_a_fixed_depth_host() {
    let mut d = TestDriver::ready("4,nvme,ram=4,coalesce=adaptive,coalesce_us=100000");
    d.auto_ring = false;
    let bufs: Vec<u64> = (0..4).map(|_| d.alloc(512)).collect();
    let t = Instant::now();
    for round in 0..20u64 {
        let before = d.irq.count(msix_data(1));
        for (k, &b) in bufs.iter().enumerate() {
            d.submit_at(1, rw(IoOpcode::READ, 1, round * 4 + k as u64, 1).prp(b, 0));
        }
        let tail = d.sqs[&1].tail;
        d.bar_write32(0, 0x1008, tail);
        d.wait_irqs(msix_data(1), before + 1);
        for _ in 0..4 {
            assert_ok(&d.wait_cq(1));
        }
        d.ring_cq_head(1);
        for &b in &bufs {
            let x = d.read_mem(b, 512);
            d.expect(b, &x);
        }
    }
    let took = t.elapsed();
    assert!(
        took < Duration::from_millis(1000),
        "20 rounds at QD4 took {took:?}: interrupts waited for the aggregation time"
    );
}

/// mdts=0 (no limit): a 4 MiB transfer through a PRP list of 1023 scattered pages runs chunk
/// by chunk, so no host buffer grows with the transfer; the data is exact. A bad entry at the
/// very end of the list fails the command before any byte moves.
#[test]
fn unlimited_transfers_run_in_chunks_and_validate_first() {
    let mut d = TestDriver::ready("4,nvme,ram=16,mdts=0");
    const PAGES: u64 = 1024;
    let len = (PAGES * 4096) as usize;
    let payload = data(len, 3);
    let buf = d.alloc(PAGES * 4096);
    let list = d.alloc(3 * 4096);
    // Transfer page k lives at buf + (PAGES-1-k) pages: no two neighbours are contiguous.
    let phys = |k: u64| buf + (PAGES - 1 - k) * 4096;
    let build_list = |d: &mut TestDriver, bad_last: bool| {
        let mut entries: Vec<u64> = (1..PAGES).map(phys).collect();
        if bad_last {
            *entries.last_mut().unwrap() += 8; // not page aligned
        }
        let mut bytes = Vec::new();
        let (mut page_no, mut i) = (0u64, 0usize);
        while i < entries.len() {
            if entries.len() - i > 512 {
                for e in &entries[i..i + 511] {
                    bytes.extend_from_slice(&e.to_le_bytes());
                }
                page_no += 1;
                bytes.extend_from_slice(&(list + page_no * 4096).to_le_bytes());
                i += 511;
            } else {
                for e in &entries[i..] {
                    bytes.extend_from_slice(&e.to_le_bytes());
                }
                i = entries.len();
            }
        }
        d.write_mem(list, &bytes);
    };
    let place = |d: &mut TestDriver, data: &[u8]| {
        for k in 0..PAGES {
            let p = &data[(k * 4096) as usize..((k + 1) * 4096) as usize];
            d.write_mem(phys(k), p);
        }
    };
    let gather = |d: &TestDriver| -> Vec<u8> {
        (0..PAGES).flat_map(|k| d.read_mem(phys(k), 4096)).collect()
    };
    build_list(&mut d, false);
    place(&mut d, &payload);
    let nlb = (len / 512) as u32;
    assert_ok(&d.io(1, rw(IoOpcode::WRITE, 1, 0, nlb).prp(phys(0), list)));
    let zeroes = vec![0u8; len];
    place(&mut d, &zeroes);
    assert_ok(&d.io(1, rw(IoOpcode::READ, 1, 0, nlb).prp(phys(0), list)));
    assert!(gather(&d) == payload, "4 MiB read back intact");
    place(&mut d, &payload);
    // A bad last entry: nothing moves.
    build_list(&mut d, true);
    place(&mut d, &zeroes);
    assert_status(
        &d.io(1, rw(IoOpcode::READ, 1, 0, nlb).prp(phys(0), list)),
        0,
        0x13,
    );
    assert!(gather(&d).iter().all(|&x| x == 0), "no data was written");
    d.check_mem();
}

/// Backend errors through io_uring reach the host as the spec's statuses: EIO on a read is an
/// Unrecovered Read Error, ENOSPC on a write is Capacity Exceeded, EIO on a write a Write Fault.
#[test]
fn io_uring_errors_map_to_nvme_statuses() {
    let eio: Arc<dyn block::BlockBackend> = Arc::new(FdBackend::open("/proc/self/mem", 1 << 40));
    let full: Arc<dyn block::BlockBackend> = Arc::new(FdBackend::open("/dev/full", 1 << 20));
    let mut d = TestDriver::with_backends("4,nvme,ram=1,aio=io_uring", vec![eio, full]);
    d.bring_up();
    let b = d.alloc(4096);
    // NSID 1: /proc/self/mem at LBA 8 (address 4096, never mapped) answers EIO.
    assert_status(&d.io(1, rw(IoOpcode::READ, 1, 8, 1).prp(b, 0)), 2, 0x81);
    assert_status(&d.io(1, rw(IoOpcode::WRITE, 1, 8, 1).prp(b, 0)), 2, 0x80);
    // NSID 2: /dev/full refuses writes with ENOSPC.
    assert_status(&d.io(1, rw(IoOpcode::WRITE, 2, 0, 1).prp(b, 0)), 0, 0x81);
    let x = d.read_mem(b, 4096);
    d.expect(b, &x);
}

/// A backend on an arbitrary descriptor, dispatched to io_uring, to reach kernel error paths.
struct FdBackend {
    file: std::fs::File,
    capacity: u64,
}

impl FdBackend {
    fn open(path: &str, capacity: u64) -> Self {
        FdBackend {
            file: std::fs::File::options()
                .read(true)
                .write(true)
                .open(path)
                .unwrap(),
            capacity,
        }
    }
}

impl block::BlockBackend for FdBackend {
    fn info(&self) -> block::BackendInfo {
        block::BackendInfo {
            capacity: self.capacity,
            sector_size: 512,
            read_only: false,
            discard_zeroes: false,
        }
    }
    fn read_vectored(&self, _: u64, _: &mut [std::io::IoSliceMut<'_>]) -> block::Result<()> {
        Err(block::BlockError::Io(std::io::Error::from_raw_os_error(
            libc::EIO,
        )))
    }
    fn write_vectored(&self, _: u64, _: &[std::io::IoSlice<'_>]) -> block::Result<()> {
        Err(block::BlockError::Io(std::io::Error::from_raw_os_error(
            libc::EIO,
        )))
    }
    fn flush(&self) -> block::Result<()> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> block::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64) -> block::Result<()> {
        Ok(())
    }
    fn dispatch(&self) -> block::Dispatch<'_> {
        use std::os::fd::AsFd;
        block::Dispatch::Fd {
            fd: self.file.as_fd(),
            direct: None,
        }
    }
}

/// What the controller holds stays bounded by its configuration under the worst host: memory
/// and threads after a storm of hostile commands on every queue.
#[test]
fn host_memory_and_threads_stay_bounded() {
    let (mut d, backend) = TestDriver::on("4,nvme,ram=1,maxq=4,qsz=256", 1 << 20);
    d.bring_up();
    for q in 2..=4 {
        d.create_pair_sized(q, 4, 256);
    }
    let base_threads = threads();
    backend.hold();
    let before = rss_kib();
    let b = d.alloc(4096);
    for _ in 0..50 {
        for q in 1..=4 {
            for _ in 0..200 {
                let s = rw(IoOpcode::READ, 1, 0, 8).prp(b, 0);
                let qq = d.sqs.get_mut(&q).unwrap();
                let addr = qq.base + u64::from(qq.tail) * 64;
                qq.tail = (qq.tail + 1) % qq.size;
                d.mem
                    .memory()
                    .write_slice(zerocopy::IntoBytes::as_bytes(&s), GuestAddress(addr))
                    .unwrap();
            }
            let t = d.sqs[&q].tail;
            d.bar_write32(0, 0x1000 + 8 * u64::from(q), t);
        }
    }
    std::thread::sleep(Duration::from_millis(100));
    let grown = rss_kib().saturating_sub(before);
    assert!(grown < 8 << 10, "RSS grew {grown} KiB");
    assert!(
        // Pool workers start on demand, up to 4; nothing beyond the documented bound.
        threads() <= base_threads + 3,
        "{} threads, {base_threads} before",
        threads()
    );
    backend.release();
    while d.poll_cq(1, Duration::from_millis(200)).is_some() {}
    let x = d.read_mem(b, 4096);
    d.expect(b, &x);
}

/// Regression: an SGL bit bucket was mapped as one iovec per 64 KiB in a single step, past the
/// per-request iovec limit: a 32 MiB read that drops all but its last page built a 511-iovec
/// request. Bit buckets now split across chunks like any other segment.
#[test]
fn sgl_bit_buckets_respect_the_iovec_limit() {
    const LEN: u64 = 32 << 20;
    let (mut d, backend) = TestDriver::on("4,nvme,ram=32,mdts=0", LEN);
    d.bring_up();
    // The disk's last page holds a pattern; everything before it goes to the bit bucket.
    let tail = data(4096, 9);
    d.write_blocks(1, 1, (LEN - 4096) / 512, 512, &tail);
    let buf = d.alloc(4096);
    let list = d.alloc(32);
    let mut descs = Vec::new();
    descs.extend_from_slice(&0u64.to_le_bytes());
    descs.extend_from_slice(&((LEN - 4096) as u32).to_le_bytes());
    descs.extend_from_slice(&[0, 0, 0, 0x10]); // bit bucket
    descs.extend_from_slice(&buf.to_le_bytes());
    descs.extend_from_slice(&4096u32.to_le_bytes());
    descs.extend_from_slice(&[0, 0, 0, 0x00]); // data block
    d.write_mem(list, &descs);
    // SGL1: a Last Segment descriptor of 2 entries.
    let s = rw(IoOpcode::READ, 1, 0, (LEN / 512) as u32).sgl([list, 32 | (0x30u64 << 56)]);
    let c = d.io(1, s);
    assert_ok(&c);
    let got = d.read_mem(buf, 4096);
    assert_eq!(got, tail);
    d.expect(buf, &got);
    let most = backend.max_segments.load(Ordering::SeqCst);
    assert!(
        most <= nvme::MAX_SEGMENTS + 2,
        "one request carried {most} iovecs"
    );
}

/// Regression: nothing bounded the commands a controller held but its queues' geometry, so a
/// guest with 8 queues of 1024 entries behind a stalled disk had 8184 commands (and their
/// iovec lists) in flight. Fetching now pauses at `MAX_INFLIGHT`, and resumes as commands
/// complete: every command still completes, exactly once.
#[test]
fn commands_in_flight_are_capped_and_fetching_resumes() {
    let (mut d, backend) = TestDriver::on("4,nvme,ram=1,maxq=8,qsz=1024", 1 << 20);
    d.bring_up();
    for q in 2..=8 {
        d.create_pair(q, 1024);
    }
    // Queue 1 was created with 64 entries by bring_up; use 2..=8 (7 × 1023 = 7161 commands).
    backend.hold();
    d.auto_ring = false;
    let b = d.alloc(4096);
    let mut submitted = std::collections::HashMap::new();
    for q in 2..=8u16 {
        for _ in 0..1023 {
            let cid = d.submit_at(q, rw(IoOpcode::READ, 1, 0, 8).prp(b, 0));
            submitted.insert((q, cid), ());
        }
        let t = d.sqs[&q].tail;
        d.bar_write32(0, 0x1000 + 8 * u64::from(q), t);
    }
    backend.wait_parked(1);
    std::thread::sleep(Duration::from_millis(50));
    let peak = d
        .dev
        .stats()
        .into_iter()
        .find(|(k, _)| k == "inflight_peak")
        .map(|(_, v)| v)
        .unwrap();
    assert_eq!(
        peak, 4096,
        "commands in flight at once (7161 fetched without a limit)"
    );
    backend.release();
    // Fetching resumes on its own as commands complete; each completes exactly once.
    let mut last = Instant::now();
    while !submitted.is_empty() {
        for q in 2..=8u16 {
            while let Some(c) = d.poll_cq(q, Duration::ZERO) {
                assert_ok(&c);
                assert!(
                    submitted.remove(&(q, c.cid)).is_some(),
                    "CID {:#x} on queue {q} completed twice or was never submitted",
                    c.cid
                );
                last = Instant::now();
            }
            d.ring_cq_head(q);
        }
        assert!(
            last.elapsed() < Duration::from_secs(5),
            "stalled with {} commands outstanding",
            submitted.len()
        );
        std::thread::yield_now();
    }
}

/// The README's limits under the worst guest: 64 queues of 512 entries, every entry a 512 KiB
/// read through a PRP list of 127 scattered pages (all commands share one list and one set of
/// buffers: a few hundred KiB of guest memory), behind a disk that never answers. Host memory
/// stays within the documented bound (4096 commands in flight × 8.5 KiB, plus command slots
/// and worker scratch), and no thread is added.
#[test]
fn worst_guest_stays_within_the_documented_bounds() {
    let (mut d, backend) = TestDriver::on("4,nvme,ram=1,maxq=64,qsz=512", 1 << 20);
    d.bring_up();
    for q in 2..=64 {
        d.create_pair(q, 512);
    }
    // 128 pages, every other one: no two segments merge.
    let bufs = d.alloc(256 * 4096);
    let list = d.alloc(4096);
    let entries: Vec<u8> = (1..128u64)
        .flat_map(|i| (bufs + 2 * i * 4096).to_le_bytes())
        .collect();
    d.write_mem(list, &entries);
    backend.hold();
    d.auto_ring = false;
    let (base_threads, before) = (threads(), rss_kib());
    for q in 2..=64u16 {
        for _ in 0..511 {
            d.submit_at(q, rw(IoOpcode::READ, 1, 0, 1024).prp(bufs, list));
        }
        let t = d.sqs[&q].tail;
        d.bar_write32(0, 0x1000 + 8 * u64::from(q), t);
    }
    backend.wait_parked(1);
    std::thread::sleep(Duration::from_millis(100));
    let grown_kib = rss_kib().saturating_sub(before);
    let bound_kib = 4096 * 17 / 2 + 63 * 511 * 3 / 10 + 10 * 1024;
    assert!(
        grown_kib <= bound_kib,
        "host memory grew {grown_kib} KiB with {} commands submitted, bound {bound_kib} KiB",
        63 * 511
    );
    assert!(
        threads() <= base_threads + 3,
        "threads beyond the on-demand pool workers were added"
    );
    backend.release();
    let mut left = 63 * 511;
    let mut last = Instant::now();
    while left > 0 {
        for q in 2..=64u16 {
            while let Some(c) = d.poll_cq(q, Duration::ZERO) {
                assert_ok(&c);
                left -= 1;
                last = Instant::now();
            }
            d.ring_cq_head(q);
        }
        assert!(
            last.elapsed() < Duration::from_secs(10),
            "{left} never completed"
        );
    }
}
