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
        let mut s = sqe(0x7c, 0);
        s.dptr = [db, ei];
        assert_ok(&d.admin(s));
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
    let mut s = sqe(0x02, 1);
    s.dptr[0] = buf;
    s
}

#[test]
fn submissions_while_busy_need_no_doorbell() {
    let backend = TestBackend::new(1 << 20, 512);
    let mut d = TestDriver::with_backends(
        "4,nvme,ram=1",
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
        sh.submit(&mut d, 2, sqe(0x00, 1), cid); // Flush
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
        let mut s = sqe(0x7c, 0);
        s.dptr = [a, b];
        assert_status(&d.admin(s), 0, 0x02);
    }
}
