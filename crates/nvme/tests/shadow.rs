//! Shadow doorbells (Doorbell Buffer Config, admin 7Ch): the host keeps I/O doorbells in memory
//! and rings MMIO only when the controller's EventIdx asks, exactly as the Linux driver does.

mod common;

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use common::*;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

/// The Linux driver's test: ring when the EventIdx lies in [old, new).
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

struct Shadow {
    db: u64,
    ei: u64,
    sq_rings: usize,
    cq_rings: usize,
}

impl Shadow {
    fn configure(d: &mut TestDriver) -> Shadow {
        let db = d.alloc_queue(4096);
        let ei = d.alloc_queue(4096);
        assert_ok(&d.admin(doorbell_buffer_config(db, ei)));
        Shadow {
            db,
            ei,
            sq_rings: 0,
            cq_rings: 0,
        }
    }

    fn rd(d: &TestDriver, a: u64) -> u16 {
        d.mem.memory().read_obj::<u32>(GuestAddress(a)).unwrap() as u16
    }

    /// Queue `s` on SQ `qid` with CID `cid`, update the shadow tail, ring only if asked.
    fn submit(&mut self, d: &mut TestDriver, qid: u16, mut s: nvme::spec::Sqe, cid: u16) {
        s.cdw0 = (s.cdw0 & 0xffff) | (u32::from(cid) << 16);
        let q = d.sqs.get_mut(&qid).unwrap();
        let addr = q.base + u64::from(q.tail) * 64;
        q.tail = (q.tail + 1) % q.size;
        let new = q.tail as u16;
        d.mem
            .memory()
            .write_slice(zerocopy::IntoBytes::as_bytes(&s), GuestAddress(addr))
            .unwrap();
        let slot = self.db + 8 * u64::from(qid);
        let old = Self::rd(d, slot);
        fence(Ordering::SeqCst);
        d.mem
            .memory()
            .write_obj(u32::from(new), GuestAddress(slot))
            .unwrap();
        fence(Ordering::SeqCst);
        if need_event(Self::rd(d, self.ei + 8 * u64::from(qid)), new, old) {
            self.sq_rings += 1;
            d.bar_write32(0, 0x1000 + 8 * u64::from(qid), u32::from(new));
        }
    }

    /// Take one completion from CQ `qid`, publishing the head through the shadow buffer.
    fn reap(&mut self, d: &mut TestDriver, qid: u16) -> nvme::spec::Cqe {
        let c = d.wait_cq(qid);
        let head = d.cqs[&qid].head as u16;
        let slot = self.db + 8 * u64::from(qid) + 4;
        let old = Self::rd(d, slot);
        d.mem
            .memory()
            .write_obj(u32::from(head), GuestAddress(slot))
            .unwrap();
        fence(Ordering::SeqCst);
        if need_event(Self::rd(d, self.ei + 8 * u64::from(qid) + 4), head, old) {
            self.cq_rings += 1;
            d.ring_cq_head(qid);
        }
        c
    }
}

fn read_sqe(buf: u64) -> nvme::spec::Sqe {
    rw(IoOpcode::READ, 1, 0, 1).prp(buf, 0)
}

#[test]
fn submissions_while_busy_need_no_doorbell() {
    let backend = TestBackend::new(1 << 20, 512);
    // Without a polling window, so the EventIdx is re-armed the moment the queue goes idle.
    let mut d = TestDriver::with_backends(
        "4,nvme,ram=1,poll=0",
        vec![backend.clone() as Arc<dyn block::BlockBackend>],
    );
    d.bring_up();
    d.auto_ring = false;
    let mut sh = Shadow::configure(&mut d);
    backend.hold();
    let bufs: Vec<u64> = (0..8).map(|_| d.alloc(4096)).collect();
    sh.submit(&mut d, 1, read_sqe(bufs[0]), 1);
    assert_eq!(sh.sq_rings, 1, "an idle queue asks for the first doorbell");
    backend.wait_parked(1);
    for (i, &b) in bufs.iter().enumerate().skip(1) {
        sh.submit(&mut d, 1, read_sqe(b), i as u16 + 1);
    }
    assert_eq!(sh.sq_rings, 1, "no doorbell while a command is in flight");
    backend.release();
    let mut cids: Vec<u16> = (0..8)
        .map(|_| sh.reap(&mut d, 1))
        .map(|c| {
            assert_ok(&c);
            c.cid
        })
        .collect();
    cids.sort();
    assert_eq!(cids, (1..=8).collect::<Vec<u16>>());
    for &b in &bufs {
        let data = d.read_mem(b, 4096);
        d.expect(b, &data);
    }
    // Idle again: the EventIdx equals the tail, so the next submission rings.
    assert_eq!(Shadow::rd(&d, sh.ei + 8), 8);
    let b = d.alloc(4096);
    sh.submit(&mut d, 1, read_sqe(b), 9);
    assert_eq!(sh.sq_rings, 2);
    assert_ok(&sh.reap(&mut d, 1));
    let data = d.read_mem(b, 4096);
    d.expect(b, &data);
    d.check_mem();
}

#[test]
fn full_cq_asks_for_a_head_doorbell() {
    let mut d = TestDriver::ready("4,nvme,ram=4");
    d.auto_ring = false;
    let mut sh = Shadow::configure(&mut d);
    // A 4-entry CQ behind a 32-entry SQ: completions must wait for space.
    d.create_pair_sized(2, 4, 32);
    for cid in 1..=20u16 {
        sh.submit(&mut d, 2, flush(1), cid);
    }
    let mut cids: Vec<u16> = (0..20)
        .map(|_| sh.reap(&mut d, 2))
        .map(|c| {
            assert_ok(&c);
            c.cid
        })
        .collect();
    cids.sort();
    assert_eq!(cids, (1..=20).collect::<Vec<u16>>());
    assert!(
        sh.cq_rings >= 1,
        "overflowing completions must ask for the head"
    );
    assert!(
        sh.cq_rings < 20,
        "the head doorbell is not needed for every entry ({})",
        sh.cq_rings
    );
    d.check_mem();
}

#[test]
fn doorbell_buffer_config_validates_its_pointers() {
    let mut d = TestDriver::ready("4,nvme,ram=1");
    let db = d.alloc_queue(4096);
    for (a, b) in [(db + 8, db), (db, db + 0x800), (MEM_SIZE, db)] {
        assert_status(&d.admin(doorbell_buffer_config(a, b)), 0, 0x02);
    }
}

/// With `poll=`, an idle queue keeps its EventIdx behind the tail for the polling window, so
/// submissions in that window need no MMIO doorbell and still complete with an interrupt; once
/// the window has passed the EventIdx equals the tail again and the next submission rings.
#[test]
fn polling_window_absorbs_doorbells_then_rearms() {
    let mut d = TestDriver::ready("4,nvme,ram=4,poll=300000,coalesce=host");
    d.auto_ring = false;
    let mut sh = Shadow::configure(&mut d);
    let before = d.irq.count(msix_data(1));
    let b = d.alloc(4096);
    sh.submit(&mut d, 1, read_sqe(b), 1);
    assert_eq!(
        sh.sq_rings, 1,
        "an idle, never-polled queue asks for the first doorbell"
    );
    assert_ok(&sh.reap(&mut d, 1));
    d.wait_irqs(msix_data(1), before + 1);
    // Inside the 300 ms window: no doorbell, yet the command is fetched, completed, signalled.
    for cid in 2..=5 {
        sh.submit(&mut d, 1, read_sqe(b), cid);
        assert_ok(&sh.reap(&mut d, 1));
    }
    assert_eq!(sh.sq_rings, 1, "polled: no MMIO doorbell");
    d.wait_irqs(msix_data(1), before + 5);
    // After the window the EventIdx is re-armed at the tail.
    std::thread::sleep(std::time::Duration::from_millis(400));
    let tail = d.sqs[&1].tail;
    assert_eq!(u32::from(Shadow::rd(&d, sh.ei + 8)), tail);
    sh.submit(&mut d, 1, read_sqe(b), 6);
    assert_eq!(sh.sq_rings, 2);
    assert_ok(&sh.reap(&mut d, 1));
    let data = d.read_mem(b, 4096);
    d.expect(b, &data);
}

/// Several submissions inside a polling window are fetched together; their completions are
/// coalesced but always signalled (the host here waits for the interrupt before it reaps, as
/// an interrupt-driven driver does).
#[test]
fn polled_bursts_are_signalled() {
    let mut d = TestDriver::ready("4,nvme,ram=4,poll=300000");
    d.auto_ring = false;
    let mut sh = Shadow::configure(&mut d);
    let b = d.alloc(4096);
    sh.submit(&mut d, 1, read_sqe(b), 1);
    assert_ok(&sh.reap(&mut d, 1));
    for round in 0..20u16 {
        let before = d.irq.count(msix_data(1));
        for k in 0..4 {
            sh.submit(&mut d, 1, read_sqe(b), 100 + round * 4 + k);
        }
        d.wait_irqs(msix_data(1), before + 1);
        for _ in 0..4 {
            assert_ok(&sh.reap(&mut d, 1));
        }
    }
    let data = d.read_mem(b, 4096);
    d.expect(b, &data);
}

/// Regression: a polling window opened by the I/O thread's own completion work (a command it
/// fetched as the previous window ran out, completed inline) was never polled: the thread had
/// already decided to sleep, the EventIdx stayed behind the tail, the host never rang, and its
/// next command hung. Submissions at random moments around short windows must all complete.
#[test]
fn polling_windows_opened_by_the_io_thread_are_polled() {
    let mut d = TestDriver::ready("4,nvme,ram=4,poll=40");
    d.auto_ring = false;
    let mut sh = Shadow::configure(&mut d);
    let b = d.alloc(4096);
    let mut x = 0x2545_f491_u64;
    for cid in 1..=3000u16 {
        sh.submit(&mut d, 1, read_sqe(b), cid);
        let c = d
            .poll_cq(1, std::time::Duration::from_secs(2))
            .unwrap_or_else(|| panic!("command {cid} never completed"));
        assert_ok(&c);
        let head = d.cqs[&1].head;
        d.mem
            .memory()
            .write_obj(head, GuestAddress(sh.db + 12))
            .unwrap();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let pause = x % 80;
        let t = std::time::Instant::now();
        while t.elapsed() < std::time::Duration::from_micros(pause) {
            std::hint::spin_loop();
        }
    }
    let data = d.read_mem(b, 4096);
    d.expect(b, &data);
}

#[test]
fn shadow_doorbells_survive_a_snapshot() {
    let spec = "4,nvme,ram=1,poll=0,ser=SHSNAP";
    let backend = TestBackend::new(1 << 20, 512);
    let backends = || vec![backend.clone() as Arc<dyn block::BlockBackend>];
    let mut d = TestDriver::with_backends(spec, backends());
    d.bring_up();
    d.auto_ring = false;
    let mut sh = Shadow::configure(&mut d);
    backend.hold();
    let bufs: Vec<u64> = (0..6).map(|_| d.alloc(4096)).collect();
    sh.submit(&mut d, 1, read_sqe(bufs[0]), 1);
    backend.wait_parked(1);
    sh.submit(&mut d, 1, read_sqe(bufs[1]), 2);
    backend.release();
    d.dev.pause().unwrap();
    // Queued through the shadow tail while paused; a doorbell rung anyway changes nothing.
    for (i, &b) in bufs.iter().enumerate().skip(2) {
        sh.submit(&mut d, 1, read_sqe(b), i as u16 + 1);
    }
    d.bar_write32(0, 0x1000 + 8, d.sqs[&1].tail);
    let state = d.dev.save_state().unwrap();
    let fresh = d.twin(spec, backends());
    fresh.restore_state(&state).unwrap();
    d.dev = fresh;
    d.dev.resume();
    let mut cids: Vec<u16> = (0..6).map(|_| sh.reap(&mut d, 1).cid).collect();
    cids.sort();
    assert_eq!(cids, (1..=6).collect::<Vec<u16>>(), "each exactly once");
    d.assert_cq_empty(1);
    // The restored controller keeps honouring the shadow protocol: idle, so the next
    // submission is asked for with a doorbell, and it completes.
    let rings = sh.sq_rings;
    let b = d.alloc(4096);
    sh.submit(&mut d, 1, read_sqe(b), 7);
    assert_eq!(sh.sq_rings, rings + 1);
    assert_eq!(sh.reap(&mut d, 1).cid, 7);
    for &b in bufs.iter().chain([&b]) {
        let data = d.read_mem(b, 4096);
        d.expect(b, &data);
    }
    d.check_mem();
}

#[test]
fn a_reset_forgets_the_queues_of_a_shadowed_controller() {
    let mut d = TestDriver::ready("4,nvme,ram=1");
    d.auto_ring = false;
    let mut sh = Shadow::configure(&mut d);
    for cid in 1..=4 {
        let b = d.alloc(4096);
        sh.submit(&mut d, 1, read_sqe(b), cid);
        assert_ok(&sh.reap(&mut d, 1));
        let data = d.read_mem(b, 4096);
        d.expect(b, &data);
    }
    d.auto_ring = true;
    d.disable();
    d.enable();
    // The guest's second life: Number of Queues comes before any queue is created.
    assert_ok(&d.set_features(fid::NUMBER_OF_QUEUES, 0x0001_0001));
    d.create_pair(1, 16);
    assert_eq!(d.read_blocks(1, 1, 0, 1, 512).len(), 512);
}
