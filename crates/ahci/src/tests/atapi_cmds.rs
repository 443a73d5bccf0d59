//! ATAPI CD/DVD-ROM: the ATA side of a packet device and the MMC-6 commands, with the sense
//! data each failure leaves.

use std::io::IoSlice;
use std::sync::Arc;

use block::BlockBackend;

use crate::regs::{port as preg, pxis, sig};
use crate::spec::{cmd, error, op};
use crate::testdrv::{cdrom, pattern, Cmd, Done, Driver, TestBackend, BUF};

const BLOCKS: u64 = 1000;

fn setup() -> (Driver, Arc<TestBackend>) {
    let be = TestBackend::new(BLOCKS * 2048, 512);
    be.write_vectored(0, &[IoSlice::new(&pattern(21, (BLOCKS * 2048) as usize))])
        .unwrap();
    let mut d = Driver::started(vec![cdrom(Some(be.clone()))]);
    // Consume the power-on unit attention.
    let (done, _) = packet(&mut d, &[op::TEST_UNIT_READY], 0, true);
    assert!(done.failed());
    d.recover(0);
    assert_eq!(sense(&mut d), (6, 0x29, 0));
    (d, be)
}

/// Run a CDB with `alloc` bytes of buffer; return the outcome and the bytes that arrived.
fn packet(d: &mut Driver, cdb: &[u8], alloc: u64, dma: bool) -> (Done, Vec<u8>) {
    d.write_mem(BUF, &vec![0xee; alloc as usize + 2]);
    let mut c = Cmd::packet(cdb, dma);
    if alloc > 0 {
        c = c.buf(BUF, alloc.div_ceil(2) * 2);
    }
    let done = d.exec(0, 1, &c);
    let n = d.prdbc(0, 1) as usize;
    (done, d.read_mem(BUF, n))
}

fn good(d: &mut Driver, cdb: &[u8], alloc: u64) -> Vec<u8> {
    let (done, data) = packet(d, cdb, alloc, true);
    assert_eq!(
        done.is & pxis::FATAL,
        0,
        "{cdb:02x?}: {done:?} sense {:?}",
        sense(d)
    );
    assert_eq!(done.status(), 0x50);
    assert_eq!(d.d2h(0).count, 3, "interrupt reason: command complete");
    data
}

/// Expect CHECK CONDITION with `key/asc/ascq` (and recover the port).
fn check(d: &mut Driver, cdb: &[u8], alloc: u64, want: (u8, u8, u8)) {
    let (done, _) = packet(d, cdb, alloc, true);
    assert!(done.failed(), "{cdb:02x?} should fail: {done:?}");
    assert_eq!(
        (done.status(), done.error()),
        (0x41, want.0 << 4),
        "{cdb:02x?}"
    );
    d.recover(0);
    assert_eq!(sense(d), want, "{cdb:02x?}");
}

fn sense(d: &mut Driver) -> (u8, u8, u8) {
    let (done, s) = packet(d, &[op::REQUEST_SENSE, 0, 0, 0, 18, 0], 18, false);
    assert!(!done.failed());
    assert_eq!((s[0], s[7]), (0x70, 10));
    (s[2], s[12], s[13])
}

fn cdb10(opcode: u8, lba: u32, len: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = opcode;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&len.to_be_bytes());
    c
}

#[test]
fn signature_identify_and_ata_side() {
    let (mut d, _) = setup();
    assert_eq!(d.pr(0, preg::SIG), sig::ATAPI);
    let (done, _) = d.identify(0, cmd::IDENTIFY);
    assert!(done.failed());
    let f = d.d2h(0);
    assert_eq!(
        (f.status & 1, f.error, f.count, f.lba0, f.lba1, f.lba2),
        (1, error::ABRT, 1, 1, 0x14, 0xeb)
    );
    d.recover(0);
    let (done, w) = d.identify(0, cmd::IDENTIFY_PACKET);
    assert!(!done.failed());
    assert_ne!(done.is & pxis::PSS, 0);
    assert_eq!(w[0], 0x85c0, "ATAPI CD-ROM, removable, 12-byte packets");
    assert_eq!(w[82] & 0x4210, 0x4210, "NOP, DEVICE RESET, PACKET");
    assert_eq!(w[75], 0);
    let sum = w
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .fold(0u8, |a, b| a.wrapping_add(b));
    assert_eq!(sum, 0);
    for c in [cmd::DEVICE_RESET, cmd::EXEC_DIAGNOSTIC] {
        let done = d.exec(0, 0, &Cmd::ata(c));
        assert!(!done.failed());
        let f = d.d2h(0);
        assert_eq!((f.error, f.lba1, f.lba2), (1, 0x14, 0xeb));
    }
    assert!(!d.exec(0, 0, &Cmd::ata(cmd::CHECK_POWER_MODE)).failed());
    assert!(!d.exec(0, 0, &Cmd::ata(cmd::IDLE_IMMEDIATE)).failed());
    for c in [
        cmd::READ_DMA_EXT,
        cmd::FLUSH_CACHE,
        cmd::NOP,
        cmd::READ_FPDMA,
        cmd::SMART,
    ] {
        let done = d.exec(0, 0, &Cmd::ata(c).count(1).buf(BUF, 512));
        assert!(
            done.failed() && done.error() == error::ABRT,
            "{c:#x}: {done:?}"
        );
        d.recover(0);
    }
}

#[test]
fn unit_attention_and_sense_lifecycle() {
    let be = TestBackend::new(BLOCKS * 2048, 512);
    let mut d = Driver::started(vec![cdrom(Some(be))]);
    // INQUIRY does not report the power-on unit attention.
    good(&mut d, &[op::INQUIRY, 0, 0, 0, 36, 0], 36);
    check(
        &mut d,
        &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0],
        0,
        (6, 0x29, 0),
    );
    good(&mut d, &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0], 0);
    assert_eq!(sense(&mut d), (0, 0, 0));
}

#[test]
fn inquiry_and_vpd() {
    let (mut d, _) = setup();
    let s = good(&mut d, &[op::INQUIRY, 0, 0, 0, 96, 0], 96);
    assert_eq!(s.len(), 36);
    assert_eq!((s[0], s[1], s[4]), (0x05, 0x80, 31));
    assert_eq!(&s[8..16], b"RHYVE   ");
    assert_eq!(&s[16..32], b"RHYVE TEST DVD  ");
    let s = good(&mut d, &[op::INQUIRY, 0, 0, 0, 5, 0], 5);
    assert_eq!(s.len(), 5, "allocation length truncates");
    assert_eq!(
        good(&mut d, &[op::INQUIRY, 1, 0x00, 0, 255, 0], 255),
        vec![5, 0, 0, 2, 0, 0x80]
    );
    let s = good(&mut d, &[op::INQUIRY, 1, 0x80, 0, 255, 0], 255);
    assert_eq!(&s[4..], b"RHYVE-TEST-CD01");
    check(
        &mut d,
        &[op::INQUIRY, 1, 0x83, 0, 255, 0],
        255,
        (5, 0x24, 0),
    );
    check(
        &mut d,
        &[op::INQUIRY, 0, 0x80, 0, 255, 0],
        255,
        (5, 0x24, 0),
    );
}

#[test]
fn capacity_and_reads_by_dma_and_pio() {
    let (mut d, _) = setup();
    let cap = good(&mut d, &cdb10(op::READ_CAPACITY, 0, 0), 8);
    assert_eq!(cap, [0, 0, 0x03, 0xe7, 0, 0, 0x08, 0]);
    let image = pattern(21, (BLOCKS * 2048) as usize);
    let data = good(&mut d, &cdb10(op::READ_10, 10, 4), 8192);
    assert_eq!(data, image[10 * 2048..14 * 2048]);
    let mut r12 = [0u8; 12];
    r12[0] = op::READ_12;
    r12[2..6].copy_from_slice(&(BLOCKS as u32 - 2).to_be_bytes());
    r12[6..10].copy_from_slice(&2u32.to_be_bytes());
    assert_eq!(
        good(&mut d, &r12, 4096),
        image[(BLOCKS as usize - 2) * 2048..]
    );
    // PIO: PIO Setup FIS for the data, then the D2H FIS.
    let (done, data) = packet(&mut d, &cdb10(op::READ_10, 0, 1), 2048, false);
    assert!(!done.failed());
    assert_eq!(done.is & (pxis::PSS | pxis::DHRS), pxis::PSS | pxis::DHRS);
    assert_eq!(d.pio_setup(0).transfer_count.get(), 2048);
    assert_eq!(data, image[..2048]);
    assert_eq!(good(&mut d, &cdb10(op::READ_10, 5, 0), 0), Vec::<u8>::new());
    check(
        &mut d,
        &cdb10(op::READ_10, BLOCKS as u32 - 1, 2),
        4096,
        (5, 0x21, 0),
    );
    r12[2..6].copy_from_slice(&u32::MAX.to_be_bytes());
    check(&mut d, &r12, 4096, (5, 0x21, 0));
}

#[test]
fn read_toc_formats() {
    let (mut d, _) = setup();
    let toc = |format: u8, msf: bool, track: u8| {
        let mut c = [0u8; 10];
        c[0] = op::READ_TOC;
        c[1] = if msf { 2 } else { 0 };
        c[2] = format;
        c[6] = track;
        c[7..9].copy_from_slice(&1024u16.to_be_bytes());
        c
    };
    let t = good(&mut d, &toc(0, false, 0), 1024);
    assert_eq!(t.len(), 20);
    assert_eq!(&t[..4], &[0, 18, 1, 1]);
    assert_eq!(&t[4..12], &[0, 0x14, 1, 0, 0, 0, 0, 0]);
    assert_eq!(&t[12..20], &[0, 0x14, 0xaa, 0, 0, 0, 0x03, 0xe8]);
    let t = good(&mut d, &toc(0, true, 1), 1024);
    assert_eq!(&t[8..12], &[0, 0, 2, 0], "track 1 at 00:02:00");
    assert_eq!(
        &t[16..20],
        &[0, 0, 15, 25],
        "lead-out at LBA 1000 = 00:15:25"
    );
    assert_eq!(good(&mut d, &toc(0, false, 0xaa), 1024).len(), 12);
    let s = good(&mut d, &toc(1, false, 0), 1024);
    assert_eq!(s, vec![0, 10, 1, 1, 0, 0x14, 1, 0, 0, 0, 0, 0]);
    let f = good(&mut d, &toc(2, false, 0), 1024);
    assert_eq!(f.len(), 48);
    assert_eq!(&f[..4], &[0, 46, 1, 1]);
    assert_eq!(f[4 + 3], 0xa0);
    assert_eq!(&f[4 + 22 + 3..4 + 22 + 11], &[0xa2, 0, 0, 0, 0, 0, 15, 25]);
    let mut short = toc(0, false, 0);
    short[7..9].copy_from_slice(&4u16.to_be_bytes());
    assert_eq!(
        good(&mut d, &short, 4),
        vec![0, 18, 1, 1],
        "allocation length"
    );
    check(&mut d, &toc(3, false, 0), 1024, (5, 0x24, 0));
    check(&mut d, &toc(0, false, 2), 1024, (5, 0x24, 0));
}

fn mode_sense(pc_page: u8) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = op::MODE_SENSE_10;
    c[2] = pc_page;
    c[7..9].copy_from_slice(&512u16.to_be_bytes());
    c
}

#[test]
fn mode_sense_pages_and_lock_state() {
    let (mut d, _) = setup();
    let m = good(&mut d, &mode_sense(0x2a), 512);
    assert_eq!(m.len(), 30);
    assert_eq!(&m[..8], &[0, 28, 0, 0, 0, 0, 0, 0]);
    assert_eq!((m[8], m[9], m[8 + 6] & 0xeb), (0x2a, 0x14, 0x29));
    good(&mut d, &[op::PREVENT_ALLOW, 0, 0, 0, 1, 0], 0);
    let m = good(&mut d, &mode_sense(0x2a), 512);
    assert_eq!(m[8 + 6] & 2, 2, "lock state");
    good(&mut d, &[op::PREVENT_ALLOW, 0, 0, 0, 0, 0], 0);
    let m = good(&mut d, &mode_sense(0x01), 512);
    assert_eq!((m[1], m[8], m[9]), (18, 0x01, 0x0a));
    assert_eq!(good(&mut d, &mode_sense(0x3f), 512).len(), 8 + 12 + 22);
    let c = good(&mut d, &mode_sense(0x40 | 0x2a), 512);
    assert!(c[10..].iter().all(|&b| b == 0), "nothing changeable");
    check(&mut d, &mode_sense(0xc0 | 0x2a), 512, (5, 0x39, 0));
    check(&mut d, &mode_sense(0x0d), 512, (5, 0x24, 0));
}

fn get_config(rt: u8, start: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = op::GET_CONFIGURATION;
    c[1] = rt;
    c[2..4].copy_from_slice(&start.to_be_bytes());
    c[7..9].copy_from_slice(&1024u16.to_be_bytes());
    c
}

/// Feature codes in a GET CONFIGURATION response.
fn features(r: &[u8]) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let mut i = 8;
    while i + 4 <= r.len() {
        out.push((u16::from_be_bytes([r[i], r[i + 1]]), r[i + 2] & 1));
        i += 4 + usize::from(r[i + 3]);
    }
    out
}

#[test]
fn get_configuration_and_profiles() {
    let (mut d, _) = setup();
    let r = good(&mut d, &get_config(0, 0), 1024);
    assert_eq!(
        u32::from_be_bytes(r[..4].try_into().unwrap()) as usize,
        r.len() - 4
    );
    assert_eq!(&r[6..8], &[0, 8], "current profile CD-ROM");
    let f = features(&r);
    assert_eq!(
        f.iter().map(|x| x.0).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 0x10, 0x1e, 0x1f, 0x100]
    );
    assert_eq!(
        &r[12..20],
        &[0, 0x10, 0, 0, 0, 0x08, 1, 0],
        "profile list: DVD-ROM, CD-ROM (current)"
    );
    let cur = features(&good(&mut d, &get_config(1, 0), 1024));
    assert!(cur.iter().all(|&(_, c)| c == 1));
    assert!(
        !cur.iter().any(|&(code, _)| code == 0x1f),
        "DVD Read is not current for a CD"
    );
    let one = features(&good(&mut d, &get_config(2, 3), 1024));
    assert_eq!(one, vec![(3, 1)]);
    check(&mut d, &get_config(3, 0), 1024, (5, 0x24, 0));
}

fn gesn(polled: bool) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = op::GET_EVENT_STATUS;
    c[1] = u8::from(polled);
    c[4] = 0x10;
    c[7..9].copy_from_slice(&8u16.to_be_bytes());
    c
}

fn start_stop(loej: bool, start: bool) -> [u8; 6] {
    [
        op::START_STOP_UNIT,
        0,
        0,
        0,
        (u8::from(loej) << 1) | u8::from(start),
        0,
    ]
}

#[test]
fn eject_prevent_load_events() {
    let (mut d, _) = setup();
    assert_eq!(
        good(&mut d, &gesn(true), 8),
        vec![0, 6, 4, 0x10, 0, 2, 0, 0],
        "no change, medium present"
    );
    check(&mut d, &gesn(false), 8, (5, 0x24, 0));
    good(&mut d, &[op::PREVENT_ALLOW, 0, 0, 0, 1, 0], 0);
    check(&mut d, &start_stop(true, false), 0, (5, 0x53, 2));
    good(&mut d, &[op::PREVENT_ALLOW, 0, 0, 0, 0, 0], 0);
    good(&mut d, &start_stop(true, false), 0);
    assert_eq!(
        good(&mut d, &gesn(true), 8)[4..6],
        [3, 1],
        "media removal, tray open"
    );
    assert_eq!(good(&mut d, &gesn(true), 8)[4..6], [0, 1]);
    check(
        &mut d,
        &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0],
        0,
        (2, 0x3a, 2),
    );
    check(&mut d, &cdb10(op::READ_CAPACITY, 0, 0), 8, (2, 0x3a, 2));
    check(&mut d, &cdb10(op::READ_10, 0, 1), 2048, (2, 0x3a, 2));
    let mut ms = [0u8; 10];
    ms[0] = op::MECHANISM_STATUS;
    ms[8..10].copy_from_slice(&8u16.to_be_bytes());
    assert_eq!(
        good(&mut d, &ms, 8),
        vec![0, 0x10, 0, 0, 0, 0, 0, 0],
        "door open"
    );
    good(&mut d, &start_stop(true, true), 0);
    assert_eq!(
        good(&mut d, &gesn(true), 8)[4..6],
        [2, 2],
        "new media, present"
    );
    check(
        &mut d,
        &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0],
        0,
        (6, 0x28, 0),
    );
    good(&mut d, &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0], 0);
    assert_eq!(good(&mut d, &ms, 8)[1], 0);
    good(&mut d, &start_stop(false, true), 0);
}

#[test]
fn disc_information_and_unknown_opcodes() {
    let (mut d, _) = setup();
    let mut c = [0u8; 10];
    c[0] = op::READ_DISC_INFO;
    c[7..9].copy_from_slice(&34u16.to_be_bytes());
    let r = good(&mut d, &c, 34);
    assert_eq!(&r[..9], &[0, 32, 0x0e, 1, 1, 1, 1, 0x20, 0]);
    assert_eq!(&r[16..24], &[0xff; 8]);
    c[1] = 1;
    check(&mut d, &c, 34, (5, 0x24, 0));
    for opcode in [0x55u8, 0xbb, 0xad, 0xff] {
        check(
            &mut d,
            &[opcode, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            0,
            (5, 0x20, 0),
        );
    }
}

#[test]
fn empty_tray() {
    let mut d = Driver::started(vec![cdrom(None)]);
    check(
        &mut d,
        &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0],
        0,
        (6, 0x29, 0),
    );
    check(
        &mut d,
        &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0],
        0,
        (2, 0x3a, 1),
    );
    let r = good(&mut d, &get_config(0, 0), 1024);
    assert_eq!(&r[6..8], &[0, 0], "no current profile");
    good(&mut d, &start_stop(true, true), 0);
    check(
        &mut d,
        &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0],
        0,
        (2, 0x3a, 1),
    );
}

#[test]
fn medium_error_on_failed_read() {
    let (mut d, be) = setup();
    *be.fail_reads.lock().unwrap() = Some((20 * 2048, 21 * 2048));
    check(&mut d, &cdb10(op::READ_10, 19, 4), 8192, (3, 0x11, 0));
}
