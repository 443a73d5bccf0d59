//! Hostile guest input: every bad pointer, count, address and FIS gets the specification's error,
//! never a panic or hang, and guest memory outside the command's buffers stays untouched (checked
//! against a canary pattern over all of RAM).

use std::io::IoSliceMut;
use std::sync::Arc;

use block::BlockBackend;

use crate::fis::prd;
use crate::regs::{port as preg, pxcmd, pxis, serr};
use crate::spec::{cmd, error, op};
use crate::testdrv::{cdrom, disk, Cmd, Done, Driver, TestBackend, BUF, OUTSIDE, RAM};

const MIB: u64 = 1 << 20;

fn setup() -> (Driver, Arc<TestBackend>) {
    let be = TestBackend::new(8 * MIB, 512);
    let d = Driver::started(vec![disk(be.clone(), 512, 512)]);
    d.fill_canary();
    (d, be)
}

/// Run `c` in slot 4 and expect the fatal PxIS bit `bit`, the slot left in PxCI, nothing posted,
/// and RAM unchanged outside the control region and `allowed`.
fn fatal(d: &mut Driver, c: &Cmd, bit: u32, allowed: &[(u64, u64)]) -> Done {
    let done = d.exec(0, 4, c);
    assert_ne!(done.is & bit, 0, "expected PxIS {bit:#x}: {done:?}");
    assert_eq!(
        done.is & (pxis::DHRS | pxis::PSS | pxis::SDBS),
        0,
        "no completion FIS: {done:?}"
    );
    assert_ne!(done.ci & (1 << 4), 0, "failed slot stays issued");
    assert_eq!((d.pr(0, preg::CMD) >> pxcmd::CCS_SHIFT) & 0x1f, 4);
    let mut ok = vec![Driver::ctrl_region(0)];
    ok.extend_from_slice(allowed);
    d.check_canary(&ok);
    d.recover(0);
    // The port works again afterwards.
    let again = d.exec(0, 0, &Cmd::ata(cmd::CHECK_POWER_MODE));
    assert!(!again.failed() && again.is & pxis::FATAL == 0, "{again:?}");
    done
}

#[test]
fn prdt_outside_guest_ram() {
    let (mut d, be) = setup();
    // Second entry past the end of RAM: nothing is transferred, not even into the first.
    let c = Cmd::ata(cmd::READ_DMA_EXT)
        .lba(0)
        .count(8)
        .buf(BUF, 2048)
        .buf(OUTSIDE, 2048);
    fatal(&mut d, &c, pxis::HBFS, &[]);
    // An entry straddling the end of RAM.
    let c = Cmd::ata(cmd::READ_DMA_EXT)
        .lba(0)
        .count(1)
        .buf(RAM - 256, 512);
    fatal(&mut d, &c, pxis::HBFS, &[]);
    // 64-bit address far above RAM.
    let c = Cmd::ata(cmd::IDENTIFY).prd_raw(0x7_0000_0000, 511);
    fatal(&mut d, &c, pxis::HBFS, &[]);
    // Address arithmetic that would wrap.
    let c = Cmd::ata(cmd::READ_DMA_EXT)
        .lba(0)
        .count(1)
        .prd_raw(u64::MAX - 255, 511);
    fatal(&mut d, &c, pxis::HBFS, &[]);
    // A write from outside RAM leaves the disk untouched.
    let c = Cmd::ata(cmd::WRITE_DMA_EXT)
        .lba(0)
        .count(1)
        .buf(OUTSIDE, 512)
        .write();
    fatal(&mut d, &c, pxis::HBFS, &[]);
    let mut b = vec![1u8; 512];
    be.read_vectored(0, &mut [IoSliceMut::new(&mut b)]).unwrap();
    assert!(b.iter().all(|&x| x == 0));
}

#[test]
fn prdt_byte_counts() {
    let (mut d, _) = setup();
    // Reserved bits set: an entry claiming more than 4 MiB.
    let c = Cmd::ata(cmd::READ_DMA_EXT)
        .lba(0)
        .count(1)
        .prd_raw(BUF, (8 << 20) - 1);
    fatal(&mut d, &c, pxis::HBFS, &[]);
    let c = Cmd::ata(cmd::READ_DMA_EXT)
        .lba(0)
        .count(1)
        .prd_raw(BUF, 511 | 1 << 30);
    fatal(&mut d, &c, pxis::HBFS, &[]);
    // No PRDT at all (zero bytes) for data the device sends: overflow.
    let c = Cmd::ata(cmd::READ_DMA_EXT).lba(0).count(1);
    fatal(&mut d, &c, pxis::OFS, &[]);
    // A PRDT shorter than the transfer.
    let c = Cmd::ata(cmd::READ_DMA_EXT).lba(0).count(8).buf(BUF, 4094);
    fatal(&mut d, &c, pxis::OFS, &[]);
    // ... and for data the host sends.
    let c = Cmd::ata(cmd::WRITE_DMA_EXT).lba(0).count(1).write();
    fatal(&mut d, &c, pxis::HBFS, &[]);
    // The largest legal entry (exactly 4 MiB) works.
    let c = Cmd::ata(cmd::READ_DMA_EXT)
        .lba(0)
        .count(8192)
        .prd_raw(BUF, prd::DBC_MASK);
    let done = d.exec(0, 1, &c);
    assert!(!done.failed() && done.is & pxis::FATAL == 0);
    assert_eq!(d.prdbc(0, 1), 4 << 20);
}

#[test]
fn lba_and_trim_range_past_capacity() {
    let (mut d, be) = setup();
    let sectors = 8 * MIB / 512;
    for c in [
        Cmd::ata(cmd::READ_DMA_EXT)
            .lba(sectors)
            .count(1)
            .buf(BUF, 512),
        Cmd::ata(cmd::READ_DMA_EXT)
            .lba(sectors - 1)
            .count(2)
            .buf(BUF, 1024),
        Cmd::ata(cmd::WRITE_DMA_EXT)
            .lba(0xffff_ffff_ffff)
            .count(0)
            .buf(BUF, 32 * MIB)
            .write(),
        Cmd::ata(cmd::READ_DMA)
            .lba(sectors)
            .count(0)
            .buf(BUF, 128 * 1024),
        Cmd::ata(cmd::READ_SECTORS)
            .lba(0x0fff_ffff)
            .count(1)
            .buf(BUF, 512),
    ] {
        let done = d.exec(0, 2, &c);
        assert!(done.failed());
        assert_eq!((done.status(), done.error()), (0x41, error::IDNF));
        d.check_canary(&[Driver::ctrl_region(0)]);
        d.recover(0);
    }
    // TRIM: the range list is read from the buffer, nothing else changes, nothing is trimmed.
    be.write_vectored(0, &[std::io::IoSlice::new(&[7u8; 512])])
        .unwrap();
    let mut list = vec![0u8; 512];
    list[..8].copy_from_slice(&(1u64 << 48).to_le_bytes());
    list[8..16].copy_from_slice(&(sectors | 1 << 48).to_le_bytes());
    d.write_mem(BUF, &list);
    let done = d.exec(
        0,
        2,
        &Cmd::ata(cmd::DSM)
            .features(1)
            .count(1)
            .buf(BUF, 512)
            .write(),
    );
    assert_eq!((done.status(), done.error()), (0x41, error::ABRT));
    d.check_canary(&[Driver::ctrl_region(0), (BUF, 512)]);
    let mut b = vec![0u8; 512];
    be.read_vectored(0, &mut [IoSliceMut::new(&mut b)]).unwrap();
    assert_eq!(b, vec![7u8; 512]);
}

#[test]
fn wrong_command_fis() {
    let (mut d, _) = setup();
    for (fis_type, cfl) in [(0x34u8, 5u16), (0x00, 5), (0x27, 4), (0x27, 0), (0x27, 17)] {
        let mut c = Cmd::ata(cmd::READ_DMA_EXT).lba(0).count(1).buf(BUF, 512);
        c.fis.fis_type = fis_type;
        c.cfl = cfl;
        d.pw(0, preg::SERR, u32::MAX);
        fatal(&mut d, &c, pxis::IFS, &[]);
        // The error bits were recorded (the helper cleared them afterwards).
    }
    let mut c = Cmd::ata(cmd::IDENTIFY).buf(BUF, 512);
    c.fis.fis_type = 0x5f;
    let done = d.exec(0, 4, &c);
    assert_ne!(done.is & pxis::IFS, 0);
    assert_eq!(
        d.pr(0, preg::SERR) & (serr::ERR_P | serr::DIAG_H),
        serr::ERR_P | serr::DIAG_H
    );
    d.check_canary(&[Driver::ctrl_region(0)]);
}

#[test]
fn command_list_table_and_fis_area_outside_ram() {
    let (mut d, _) = setup();
    // Command table outside RAM: build the header by hand.
    let c = Cmd::ata(cmd::IDENTIFY).buf(BUF, 512);
    d.build(0, 4, &c);
    let hdr = Driver::clb(0) + 4 * 32;
    d.write_mem(hdr + 8, &(OUTSIDE as u32).to_le_bytes());
    d.pw(0, preg::CI, 1 << 4);
    let done = d.wait_slot(0, 4);
    assert_ne!(done.is & pxis::HBFS, 0);
    d.check_canary(&[Driver::ctrl_region(0)]);
    d.recover(0);
    // Command list outside RAM.
    d.port_stop(0);
    d.pw(0, preg::CLB, OUTSIDE as u32);
    let cmd_ = d.pr(0, preg::CMD);
    d.pw(0, preg::CMD, cmd_ | pxcmd::ST);
    d.pw(0, preg::CI, 1);
    let done = d.wait_slot(0, 0);
    assert_ne!(done.is & pxis::HBFS, 0);
    d.check_canary(&[Driver::ctrl_region(0)]);
    // FIS area outside RAM: data moves, the FIS cannot be posted.
    d.port_stop(0);
    d.pw(0, preg::CLB, Driver::clb(0) as u32);
    let c = d.pr(0, preg::CMD);
    d.pw(0, preg::CMD, c & !pxcmd::FRE);
    d.pw(0, preg::FB, (RAM - 0x100) as u32 + 0x100);
    d.pw(0, preg::IS, u32::MAX);
    d.pw(0, preg::CMD, c | pxcmd::FRE | pxcmd::ST);
    let done = d.exec(0, 1, &Cmd::ata(cmd::CHECK_POWER_MODE));
    assert_ne!(done.is & pxis::HBFS, 0);
    d.check_canary(&[Driver::ctrl_region(0)]);
}

#[test]
fn atapi_response_larger_than_prdt() {
    let be = TestBackend::new(100 * 2048, 512);
    let mut d = Driver::started(vec![cdrom(Some(be))]);
    d.fill_canary();
    let mut c = Cmd::packet(&[op::INQUIRY, 0, 0, 0, 36, 0], true).buf(BUF, 16);
    c.fis.lba1 = 0;
    let done = d.exec(0, 1, &c);
    assert_ne!(done.is & pxis::OFS, 0);
    d.check_canary(&[Driver::ctrl_region(0)]);
}

/// A small xorshift generator.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn random_commands_stay_inside_their_buffers() {
    let (mut d, _) = setup();
    let area = (BUF, 8 * MIB);
    let opcodes = [
        cmd::READ_DMA_EXT,
        cmd::WRITE_DMA_EXT,
        cmd::READ_DMA,
        cmd::READ_SECTORS,
        cmd::WRITE_SECTORS_EXT,
        cmd::READ_MULTIPLE,
        cmd::READ_LOG_EXT,
        cmd::READ_LOG_DMA_EXT,
        cmd::SMART,
        cmd::SET_FEATURES,
        cmd::DSM,
        cmd::IDENTIFY,
        cmd::READ_VERIFY_EXT,
        cmd::FLUSH_CACHE,
        cmd::SET_MULTIPLE,
        cmd::READ_FPDMA,
        cmd::WRITE_FPDMA,
        cmd::SEND_FPDMA,
        0x00,
        0x77,
        0xff,
    ];
    let mut r = Rng(0x2545_f491_4f6c_dd1d);
    for i in 0..400 {
        let slot = (r.next() % 32) as u8;
        let mut c = Cmd::ata(opcodes[(r.next() % opcodes.len() as u64) as usize]);
        let raw = r.next().to_le_bytes();
        c.fis.features = raw[0];
        c.fis.count = raw[1];
        c.fis.count_exp = raw[2] & 0x3;
        c.fis.lba0 = raw[3];
        c.fis.lba1 = raw[4];
        c.fis.lba2 = raw[5] & 0x3f;
        c.fis.device = raw[6];
        c.fis.features_exp = raw[7] & 1;
        if c.fis.command == cmd::SMART && i % 2 == 0 {
            (c.fis.lba1, c.fis.lba2) = (0x4f, 0xc2);
        }
        c.ncq = crate::ata::is_queued(c.fis.command);
        if c.ncq {
            c.fis.count = slot << 3;
        }
        for _ in 0..(r.next() % 6) {
            let len = (r.next() % (256 * 1024)) & !1;
            let addr = (BUF + r.next() % (area.1 - len - 2)) & !1;
            c = c.prd_raw(addr, (len as u32).max(2) - 1);
        }
        d.issue(0, slot, &c);
        let done = d.wait_slot(0, slot);
        d.pw(0, preg::IS, done.is);
        if done.is & pxis::FATAL != 0 {
            d.recover(0);
        }
    }
    d.check_canary(&[Driver::ctrl_region(0), area]);
}
