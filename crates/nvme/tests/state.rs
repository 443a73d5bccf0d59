//! Pause, save and restore (snapshots and migration): commands in flight on several queues when
//! the controller is paused, more queued while it is paused, the state restored into a fresh
//! controller; every command completes exactly once with the right data.
mod common;

use std::sync::Arc;
use std::time::Duration;

use block::BlockBackend;
use common::*;
use pci::{PciDevice, StateError};

// Interrupts go out at once (no adaptive holding), so the test can count them.
const SPEC: &str = "4,nvme,ram=1,maxq=4,qsz=256,ser=SNAP0001,coalesce=host";
const LBA: u64 = 512;

/// A read of 8 blocks at `slba` into a fresh buffer: (cid, buffer).
fn read8(d: &mut TestDriver, q: u16, slba: u64) -> (u16, u64) {
    let buf = d.alloc(4096);
    let cid = d.submit(q, rw(IoOpcode::READ, 1, slba, 8).prp(buf, 0));
    (cid, buf)
}

#[test]
fn save_restore_with_commands_in_flight_on_several_queues() {
    let (mut d, backend) = TestDriver::on(SPEC, 4 << 20);
    d.bring_up();
    d.create_pair(2, 32);
    d.create_pair(3, 16);
    let disk = data(256 * 1024, 3);
    d.write_blocks(1, 1, 0, LBA, &disk);
    let aer = d.submit(0, async_event_request());

    // Reads on three queues, held at the backend.
    backend.hold();
    let mut reads = Vec::new(); // (sqid, cid, buf, slba)
    for (q, n) in [(1u16, 4u64), (2, 3), (3, 2)] {
        for i in 0..n {
            let slba = u64::from(q) * 64 + i * 8;
            let (cid, buf) = read8(&mut d, q, slba);
            reads.push((q, cid, buf, slba));
        }
    }
    backend.wait_parked(1);
    // Pausing waits for them: it returns only after they completed.
    std::thread::scope(|s| {
        let dev = &d.dev;
        let p = s.spawn(move || dev.pause());
        std::thread::sleep(Duration::from_millis(50));
        backend.release();
        p.join().unwrap().expect("pause");
    });
    // Commands queued while paused are not fetched: writes never reach the disk.
    let new_data = data(4096, 99);
    let mut writes = Vec::new(); // (sqid, cid, slba)
    for (q, slba) in [(2u16, 400u64), (3, 480)] {
        let (p1, p2) = d.prp_buffer(&new_data);
        let cid = d.submit(q, rw(IoOpcode::WRITE, 1, slba, 8).prp(p1, p2));
        writes.push((q, cid, slba));
    }
    let (cid, buf) = read8(&mut d, 1, 8);
    reads.push((1, cid, buf, 8));
    let mut on_disk = vec![0u8; 4096];
    backend
        .ram
        .read_vectored(400 * LBA, &mut [std::io::IoSliceMut::new(&mut on_disk)])
        .unwrap();
    assert_eq!(
        on_disk,
        disk[400 * 512..400 * 512 + 4096],
        "fetched while paused"
    );

    let state = d.dev.save_state().expect("save");
    // As a snapshot file would carry it.
    let text = serde_json::to_string(&state).unwrap();
    let state: serde_json::Value = serde_json::from_str(&text).unwrap();
    let fresh = d.twin(SPEC, vec![backend.clone() as Arc<dyn BlockBackend>]);
    fresh.restore_state(&state).expect("restore");
    d.dev = fresh; // the old controller is gone
    let irqs_before = d.irq.total();
    d.dev.resume();

    let mut seen = std::collections::HashSet::new();
    for &(q, cid, buf, slba) in &reads {
        let c = d.wait_cid(q, cid);
        assert_ok(&c);
        assert!(seen.insert((q, cid)), "completed twice");
        let want = &disk[(slba * LBA) as usize..(slba * LBA) as usize + 4096];
        assert_eq!(d.read_mem(buf, 4096), want, "read at LBA {slba}");
        d.expect(buf, want);
    }
    for &(q, cid, _) in &writes {
        assert_ok(&d.wait_cid(q, cid));
        assert!(seen.insert((q, cid)), "completed twice");
    }
    for q in 1..=3 {
        d.assert_cq_empty(q);
    }
    // Interrupts may be held for coalescing for a moment.
    let deadline = std::time::Instant::now() + WAIT;
    while d.irq.total() == irqs_before {
        assert!(
            std::time::Instant::now() < deadline,
            "no MSI-X after restore"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    for &(_, _, slba) in &writes {
        assert_eq!(d.read_blocks(1, 1, slba, 8, LBA), new_data);
    }
    d.check_mem();

    // The Asynchronous Event Request outstanding at the snapshot is still there: a doorbell
    // write to a queue that does not exist completes it.
    d.bar_write32(0, 0x1000 + 8 * 4, 1);
    let c = d.wait_cid(0, aer);
    assert_ok(&c);
    assert_eq!(c.dw0 & 7, 0, "asynchronous event type: error status");
}

#[test]
fn restore_checks_everything_before_changing_anything() {
    let (mut d, backend) = TestDriver::on(SPEC, 4 << 20);
    d.bring_up();
    d.create_pair(2, 32);
    let disk = data(8192, 5);
    d.write_blocks(2, 1, 16, LBA, &disk);
    assert!(
        matches!(d.dev.save_state(), Err(StateError::Refused(_))),
        "saved while running"
    );
    d.dev.pause().unwrap();
    let good = d.dev.save_state().unwrap();
    let backends = || vec![backend.clone() as Arc<dyn BlockBackend>];

    let fresh = d.twin(SPEC, backends());
    let mut bad = good.clone();
    bad["version"] = 2.into();
    let e = fresh.restore_state(&bad).unwrap_err();
    assert!(e.to_string().contains("format version 2"), "{e}");
    for (path, val) in [
        (&["groups", "0", "cq", "size"][..], 257u64), // beyond qsz
        (&["groups", "0", "cq", "head"][..], 64),     // beyond the ring
        (&["groups", "1", "sqs", "0", "id"][..], 1),  // SQ 1 twice
        (&["groups", "1", "cq", "iv"][..], 9),        // no such vector
        (&["admin", "sqs", "0", "page"][..], 1000),   // not a page size
        (&["namespaces", "0", "flbas"][..], 7),       // no such LBA format
        (&["namespaces", "0", "capacity"][..], 1 << 20), // another image size
    ] {
        let mut bad = good.clone();
        let mut v = &mut bad;
        for k in path {
            v = match k.parse::<usize>() {
                Ok(i) => &mut v[i],
                Err(_) => &mut v[*k],
            };
        }
        assert!(!v.is_null(), "{path:?}");
        *v = val.into();
        let e = fresh.restore_state(&bad).unwrap_err();
        assert!(
            matches!(e, StateError::Invalid(_) | StateError::Refused(_)),
            "{path:?}: {e}"
        );
    }
    let e = fresh
        .restore_state(&serde_json::json!({"version": 1}))
        .unwrap_err();
    assert!(matches!(e, StateError::Invalid(_)), "{e}");
    // Another controller's state.
    let other = d.twin(
        "4,nvme,ram=1,maxq=4,qsz=256,ser=OTHER,coalesce=host",
        backends(),
    );
    let e = other.restore_state(&good).unwrap_err();
    assert!(e.to_string().contains("ser=SNAP0001"), "{e}");
    drop(other);

    // None of that changed the fresh controller: the good state still goes in.
    fresh.restore_state(&good).unwrap();
    // Restoring twice is refused (no longer fresh).
    let e = fresh.restore_state(&good).unwrap_err();
    assert!(matches!(e, StateError::Refused(_)), "{e}");
    d.dev = fresh;
    d.dev.resume();
    assert_eq!(d.read_blocks(2, 1, 16, 16, LBA), disk);
    assert_eq!(d.read_blocks(1, 1, 16, 16, LBA), disk);
}

/// Every number in a saved state, set to extreme values one at a time: a restore either refuses
/// it or gives a controller that keeps working without a panic (in any thread) or a hang.
#[test]
fn mutated_states_are_refused_or_harmless() {
    pci::state_testing::count_panics();
    let (mut d, backend) = TestDriver::on(SPEC, 4 << 20);
    d.bring_up();
    d.create_pair(2, 32);
    let db = d.alloc_queue(4096);
    let ei = d.alloc_queue(4096);
    assert_ok(&d.admin(doorbell_buffer_config(db, ei)));
    d.dev.pause().unwrap();
    let good = d.dev.save_state().unwrap();
    let log_buf = d.alloc(4096);
    pci::state_testing::campaign(&good, |bad| {
        let fresh = d.twin(SPEC, vec![backend.clone() as Arc<dyn BlockBackend>]);
        fresh.restore_state(bad).ok()?;
        let old = std::mem::replace(&mut d.dev, fresh);
        let (sqs, cqs) = (d.sqs.clone(), d.cqs.clone());
        d.dev.resume();
        // The logs and features a host reads after a restore.
        for sqe in [
            get_log_page(lid::SMART_HEALTH, 127),
            get_log_page(lid::ERROR_INFORMATION, 127),
            get_features(fid::NUMBER_OF_QUEUES, 0),
        ] {
            d.submit(0, sqe.prp(log_buf, 0));
            let _ = d.poll_cq(0, Duration::from_millis(20));
        }
        (d.sqs, d.cqs) = (sqs, cqs);
        let fresh = std::mem::replace(&mut d.dev, old);
        // What a guest might do next: read the registers, ring every doorbell.
        let mut b = [0u8; 4];
        for off in (0..0x40).step_by(4) {
            fresh.bar_read(0, off, &mut b);
        }
        for db in 0..10u64 {
            fresh.bar_write(0, 0x1000 + 4 * db, &1u32.to_le_bytes());
        }
        Some(fresh)
    });
    // The mutated controllers wrote where their queues said: not the test's business.
    d.allow(0, MEM_SIZE);
}

/// Found by the nvme fuzzer (once in 6.1M runs, on a loaded machine): CC.EN set again while a
/// reset still waited for a command (the enable is deferred, CSTS.RDY still reads 1), then a
/// shutdown notification. The deferred enable wiped SHST, and the shutdown never reported
/// complete.
#[test]
fn a_shutdown_requested_while_an_enable_waits_for_a_reset_completes() {
    let (mut d, backend) = TestDriver::on("4,nvme,ram=1", 1 << 20);
    d.bring_up();
    backend.hold();
    let buf = d.alloc(4096);
    d.submit(1, rw(IoOpcode::READ, 1, 0, 8).prp(buf, 0));
    backend.wait_parked(1);
    let cc = d.reg(0x14);
    d.set_reg(0x14, cc & !1); // reset: waits for the held read
    d.set_reg(0x14, cc | 1); // enable again at once: deferred
    d.set_reg(0x14, cc | 1 | (1 << 14)); // normal shutdown notification
    backend.release();
    // SHST must come to 10b (complete).
    d.wait_csts(0xc, 0x8);
    d.allow(buf, 4096);
}

/// SHN written while the controller is disabled notifies nothing; the write that then enables
/// it with SHN still set does, and the shutdown must complete (the fuzzer's host waited for
/// SHST for ever, session 6).
#[test]
fn a_shutdown_notified_in_the_enabling_write_completes() {
    let (mut d, _backend) = TestDriver::on("4,nvme,ram=1", 1 << 20);
    d.bring_up();
    let cc = d.reg(0x14);
    d.set_reg(0x14, (cc & !1) | (1 << 14)); // reset, SHN=01 while disabling
    d.wait_csts(0x1, 0x0);
    d.set_reg(0x14, cc | 1 | (1 << 14)); // enable, SHN still 01
    d.wait_csts(0xd, 0x9); // RDY and SHST complete
}

#[test]
fn device_self_test_results_and_a_running_test_survive_save_and_restore() {
    let (mut d, backend) = TestDriver::on(SPEC, 4 << 20);
    d.bring_up();
    let mut dst = sqe(AdminOpcode::DEVICE_SELF_TEST.0, 1);
    dst.cdw10 = 1;
    assert_ok(&d.admin(dst));
    dst.cdw10 = 0xf;
    assert_ok(&d.admin(dst)); // result: short, aborted by command
    dst.cdw10 = 2;
    assert_ok(&d.admin(dst)); // an extended test left running
    d.dev.pause().expect("pause");
    let state = d.dev.save_state().expect("save");
    let text = serde_json::to_string(&state).unwrap();
    let state: serde_json::Value = serde_json::from_str(&text).unwrap();
    let fresh = d.twin(SPEC, vec![backend.clone() as Arc<dyn BlockBackend>]);
    fresh.restore_state(&state).expect("restore");
    d.dev = fresh;
    d.dev.resume();
    let (c, log) = d.get_log(0x06, 0, 564, 0, false);
    assert_ok(&c);
    assert_eq!(log[0], 2, "the extended test is still in progress");
    assert_eq!(log[4], 0x11, "the earlier result came along");
    // And it still refuses a second one.
    dst.cdw10 = 1;
    assert_status(&d.admin(dst), 1, 0x1d);
}
