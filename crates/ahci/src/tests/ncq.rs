//! Native Command Queuing: 32 tags completing out of order, NCQ error recovery through the NCQ
//! Command Error log, queued TRIM, and ordering against non-queued commands.

use std::io::IoSlice;
use std::sync::Arc;
use std::time::Duration;

use block::BlockBackend;

use crate::regs::{hba, port as preg, pxis};
use crate::spec::{cmd, error};
use crate::testdrv::{disk, pattern, Cmd, Driver, TestBackend, BUF};

const MIB: u64 = 1 << 20;

fn setup() -> (Driver, Arc<TestBackend>) {
    let be = TestBackend::new(8 * MIB, 512);
    be.write_vectored(0, &[IoSlice::new(&pattern(9, MIB as usize))])
        .unwrap();
    let mut d = Driver::started(vec![disk(be.clone(), 512, 512)]);
    d.enable_msi(0);
    (d, be)
}

#[test]
fn thirty_two_tags_complete_out_of_order() {
    let (mut d, be) = setup();
    be.delays
        .lock()
        .unwrap()
        .insert(0, Duration::from_millis(300));
    be.delays
        .lock()
        .unwrap()
        .insert(5 * 4096, Duration::from_millis(150));
    be.order.lock().unwrap().clear();
    for tag in 0..32u8 {
        let c = Cmd::fpdma(cmd::READ_FPDMA, tag, u64::from(tag) * 8, 8)
            .buf(BUF + u64::from(tag) * 4096, 4096);
        d.build(0, tag, &c);
    }
    d.pw(0, preg::SACT, u32::MAX);
    d.pw(0, preg::CI, u32::MAX);
    assert_eq!(
        d.pr(0, preg::CI),
        0,
        "queued commands leave PxCI once accepted"
    );
    let mut seen_only_slow = false;
    d.wait("all tags", |d| {
        let sact = d.pr(0, preg::SACT);
        if sact != 0 && sact & !(1 | 1 << 5) == 0 {
            seen_only_slow = true;
        }
        // Completed tags are reported with interrupts; the handler clears PxIS then IS.
        let is = d.pr(0, preg::IS);
        d.pw(0, preg::IS, is);
        d.w32(hba::IS, 1);
        sact == 0
    });
    assert!(
        seen_only_slow,
        "fast tags completed while tags 0 and 5 were still outstanding"
    );
    let order = be.order.lock().unwrap().clone();
    assert_eq!(order.len(), 32);
    assert_eq!(&order[30..], &[5 * 4096, 0], "slow requests finished last");
    let disk_data = pattern(9, 32 * 4096);
    assert_eq!(d.read_mem(BUF, 32 * 4096), disk_data);
    let sdb = d.sdb(0);
    assert_eq!(
        (sdb.fis_type, sdb.flags & 0x40, sdb.status & 0x77, sdb.error),
        (0xa1, 0x40, 0x50, 0)
    );
    assert_eq!(sdb.sactive.get(), 1, "tag 0 completed last");
    assert!(d.irq.msi.lock().unwrap().len() >= 2);
    assert_eq!(d.pr(0, preg::TFD) & 0xff, 0x50);
    let ds = d.read_mem(Driver::fb(0), 8);
    assert_eq!(
        (ds[0], ds[1] & 0x20),
        (0x41, 0x20),
        "DMA Setup FIS, device to host"
    );
    assert!(ds[4] < 32, "buffer identifier is a tag");
}

#[test]
fn queued_writes_then_reads() {
    let (mut d, _) = setup();
    let data = pattern(11, 32 * 4096);
    d.write_mem(BUF, &data);
    for tag in 0..32u8 {
        let mut c = Cmd::fpdma(cmd::WRITE_FPDMA, tag, 1000 + u64::from(tag) * 8, 8)
            .buf(BUF + u64::from(tag) * 4096, 4096)
            .write();
        if tag % 2 == 0 {
            c.fis.device |= crate::ncq::DEVICE_FUA;
        }
        d.build(0, tag, &c);
    }
    d.pw(0, preg::SACT, u32::MAX);
    d.pw(0, preg::CI, u32::MAX);
    d.wait("writes", |d| d.pr(0, preg::SACT) == 0);
    for tag in 0..32u8 {
        let c = Cmd::fpdma(cmd::READ_FPDMA, tag, 1000 + u64::from(tag) * 8, 8)
            .buf(BUF + MIB + u64::from(tag) * 4096, 4096);
        d.issue(0, tag, &c);
    }
    d.wait("reads", |d| d.pr(0, preg::SACT) == 0);
    assert_eq!(d.read_mem(BUF + MIB, 32 * 4096), data);
    assert_eq!(d.pr(0, preg::IS) & pxis::FATAL, 0);
}

fn read_ncq_log(d: &mut Driver) -> Vec<u8> {
    let mut c = Cmd::ata(cmd::READ_LOG_EXT).count(1).buf(BUF + 4 * MIB, 512);
    c.fis.lba0 = 0x10;
    let done = d.exec(0, 0, &c);
    assert!(!done.failed(), "{done:?}");
    d.read_mem(BUF + 4 * MIB, 512)
}

#[test]
fn failed_queued_command_reported_through_error_log() {
    let (mut d, be) = setup();
    let sectors = 8 * MIB / 512;
    be.delays
        .lock()
        .unwrap()
        .insert(0, Duration::from_millis(100));
    for tag in 0..4u8 {
        let lba = if tag == 2 {
            sectors - 4
        } else {
            u64::from(tag) * 8
        };
        d.build(
            0,
            tag,
            &Cmd::fpdma(cmd::READ_FPDMA, tag, lba, 8).buf(BUF + u64::from(tag) * 4096, 4096),
        );
    }
    d.pw(0, preg::SACT, 0xf);
    d.pw(0, preg::CI, 0xf);
    d.wait("task file error", |d| d.pr(0, preg::IS) & pxis::TFES != 0);
    let s = d.snapshot(0);
    assert_eq!((s.status() & 0x77, s.error()), (0x41, error::IDNF));
    assert_ne!(s.sact & (1 << 2), 0, "failed tag stays active");
    assert_ne!(s.sact & 1, 0, "the slow tag is aborted, not completed");
    let sdb = d.sdb(0);
    assert_eq!(
        (sdb.status & 1, sdb.error, sdb.sactive.get()),
        (1, error::IDNF, 0)
    );
    std::thread::sleep(Duration::from_millis(150));
    assert_ne!(d.pr(0, preg::SACT) & 1, 0, "no completion after the error");

    // Linux EH: stop (clears SACT/CI), restart. Queued commands abort until the log is read.
    d.recover(0);
    assert_eq!(d.pr(0, preg::SACT), 0);
    d.issue(0, 7, &Cmd::fpdma(cmd::READ_FPDMA, 7, 0, 1).buf(BUF, 512));
    let done = d.wait_slot(0, 7);
    assert!(done.failed() && done.error() == error::ABRT, "{done:?}");
    d.recover(0);

    let log = read_ncq_log(&mut d);
    assert_eq!(log[0], 2, "NQ clear, tag 2");
    assert_eq!((log[2], log[3]), (0x41, error::IDNF));
    let lba = u64::from_le_bytes([log[4], log[5], log[6], log[8], log[9], log[10], 0, 0]);
    assert_eq!(lba, sectors - 4);
    assert_eq!(
        log.iter().fold(0u8, |a, b| a.wrapping_add(*b)),
        0,
        "checksum"
    );
    assert_eq!(
        read_ncq_log(&mut d)[0],
        crate::ncq::LOG_NQ,
        "reading the log cleared the error"
    );
    // Queued commands work again.
    d.issue(0, 1, &Cmd::fpdma(cmd::READ_FPDMA, 1, 0, 1).buf(BUF, 512));
    let done = d.wait_slot(0, 1);
    assert!(!done.failed());
}

#[test]
fn queued_trim_and_bad_queued_commands() {
    let (mut d, be) = setup();
    let mut list = vec![0u8; 512];
    list[0..8].copy_from_slice(&(16u64 | 8 << 48).to_le_bytes());
    d.write_mem(BUF, &list);
    let mut c = Cmd::fpdma(cmd::SEND_FPDMA, 4, 0, 1).buf(BUF, 512).write();
    c.fis.aux.set(crate::ncq::AUX_TRIM);
    d.issue(0, 4, &c);
    let done = d.wait_slot(0, 4);
    assert!(!done.failed(), "{done:?}");
    let mut b = vec![1u8; 4096];
    be.read_vectored(16 * 512, &mut [std::io::IoSliceMut::new(&mut b)])
        .unwrap();
    assert!(b.iter().all(|&x| x == 0));

    // Tag differs from slot; an unsupported SEND subcommand; RECEIVE FPDMA QUEUED.
    let mut wrong_tag = Cmd::fpdma(cmd::READ_FPDMA, 9, 0, 1).buf(BUF, 512);
    wrong_tag.ncq = true;
    let mut bad_sub = c.clone();
    bad_sub.fis.count_exp = 2;
    bad_sub.fis.count = 3 << 3;
    let recv = Cmd::fpdma(cmd::RECEIVE_FPDMA, 3, 0, 1).buf(BUF, 512);
    for (slot, cmd_) in [(3u8, wrong_tag), (3, bad_sub), (3, recv)] {
        d.issue(0, slot, &cmd_);
        let done = d.wait_slot(0, slot);
        assert!(done.failed() && done.error() == error::ABRT, "{done:?}");
        d.recover(0);
        assert_eq!(read_ncq_log(&mut d)[0], 3);
    }
}

#[test]
fn non_queued_command_waits_for_the_queue() {
    let (mut d, be) = setup();
    be.set_gate(false);
    d.issue(0, 0, &Cmd::fpdma(cmd::READ_FPDMA, 0, 0, 8).buf(BUF, 4096));
    d.wait("queued read at the gate", |_| {
        *be.waiting.lock().unwrap() == 1
    });
    d.issue(0, 1, &Cmd::ata(cmd::CHECK_POWER_MODE));
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(d.pr(0, preg::CI), 1 << 1, "non-queued command not started");
    be.set_gate(true);
    let done = d.wait_slot(0, 1);
    assert!(!done.failed());
    assert_eq!(d.pr(0, preg::SACT), 0);
}
