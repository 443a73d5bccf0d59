//! The ATA command set on a disk port: every command, its data, FISes and error outputs.

use std::sync::Arc;

use block::BlockBackend;

use crate::regs::{port as preg, pxis, sig};
use crate::spec::{cmd, error, feature, smart};
use crate::testdrv::{disk, pattern, Cmd, Driver, TestBackend, BUF};

const MIB: u64 = 1 << 20;

fn drv(logical: u32, physical: u32) -> (Driver, Arc<TestBackend>) {
    let be = TestBackend::new(8 * MIB, logical);
    (
        Driver::started(vec![disk(be.clone(), logical, physical)]),
        be,
    )
}

fn ok(d: &crate::testdrv::Done) {
    assert!(!d.failed(), "command failed: {d:?}");
    assert_eq!(d.status(), 0x50, "{d:?}");
}

fn aborted(d: &crate::testdrv::Done, err: u8) {
    assert!(d.failed(), "expected a task file error: {d:?}");
    assert_eq!((d.status(), d.error()), (0x41, err), "{d:?}");
}

#[test]
fn identify_device_word_map() {
    for (logical, physical, w106) in [
        (512, 512, 0x4000u16),
        (512, 4096, 0x6003),
        (4096, 4096, 0x5000),
    ] {
        let (mut d, _) = drv(logical, physical);
        let (done, w) = d.identify(0, cmd::IDENTIFY);
        ok(&done);
        assert_ne!(
            done.is & pxis::PSS,
            0,
            "PIO data-in ends with a PIO Setup FIS"
        );
        let ps = d.pio_setup(0);
        assert_eq!(
            (
                ps.fis_type,
                ps.flags & 0x60,
                ps.e_status,
                ps.transfer_count.get()
            ),
            (0x5f, 0x60, 0x50, 512)
        );
        assert_eq!(d.prdbc(0, 0), 512);
        let sectors = 8 * MIB / u64::from(logical);
        let bytes = d.read_mem(BUF, 512);
        assert_eq!(
            bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)),
            0,
            "checksum"
        );
        assert_eq!(w[255] & 0xff, 0xa5);
        let string = |a: usize, n: usize| -> String {
            w[a..a + n]
                .iter()
                .flat_map(|x| x.to_be_bytes())
                .map(char::from)
                .collect::<String>()
                .trim_end()
                .to_string()
        };
        assert_eq!(string(10, 10), "RHYVE-TEST-0001");
        assert_eq!(string(27, 20), "RHYVE TEST DISK");
        assert_eq!(string(23, 4), "0.1.0");
        assert_eq!(w[0] & 0x8000, 0, "ATA device");
        assert_eq!(w[47], 0x8010);
        assert_eq!(w[49] & 0x0300, 0x0300, "LBA and DMA");
        assert_eq!(w[59], 0x0110, "multiple setting valid, 16");
        assert_eq!(u32::from(w[60]) | u32::from(w[61]) << 16, sectors as u32);
        assert_eq!(w[75], 31, "queue depth 32");
        assert_eq!(w[76] & 0x010e, 0x010e, "NCQ, Gen1-3");
        assert_ne!(w[76] & (1 << 15), 0, "READ LOG DMA EXT");
        assert_eq!(w[77] & 0x4e, 0x46, "Gen3 current, SEND/RECEIVE FPDMA");
        assert_eq!(w[80], 0x0fe0);
        assert_eq!(w[82] & 0x0029, 0x0029, "SMART, PM, write cache");
        assert_eq!(w[83] & 0xf400, 0x7400, "LBA48, FLUSH (EXT)");
        assert_eq!(w[84] & 0xc160, 0x4160, "WWN, FUA, GPL");
        assert_eq!(w[85] & 0x0021, 0x0021, "write cache and SMART enabled");
        assert_eq!(w[86] & 0xb400, 0xb400);
        assert_eq!(w[88], 0x407f, "UDMA6 selected");
        let lba48 = (0..4).fold(0u64, |a, i| a | u64::from(w[100 + i]) << (16 * i));
        assert_eq!(lba48, sectors);
        assert_eq!(w[106], w106);
        if logical == 4096 {
            assert_eq!((w[117], w[118]), (2048, 0));
        }
        assert_eq!(w[108..112], [0x5000, 0x0000, 0x1234, 0x5678]);
        assert_eq!(w[119] & 0xc008, 0x4008);
        assert_eq!(w[169] & 1, 1, "TRIM");
        assert_eq!(w[69] & 0x4020, 0x4020, "DRAT and RZAT");
        assert_eq!(w[105], 8);
        assert_eq!(w[209], 0x4000);
        assert_eq!(w[217], 1, "non-rotating");
        assert_eq!(w[222] >> 12, 1, "serial transport");
    }
}

#[test]
fn dma_write_then_read_back() {
    let (mut d, be) = drv(512, 512);
    let data = pattern(1, 4096);
    d.write_mem(BUF, &data);
    // Two PRD entries of uneven (even-byte) sizes, the second with the I bit.
    let c = Cmd::ata(cmd::WRITE_DMA_EXT)
        .lba(100)
        .count(8)
        .write()
        .prd_raw(BUF, 1023)
        .prd_raw(BUF + 1024, 3071 | 1 << 31);
    let done = d.exec(0, 5, &c);
    ok(&done);
    assert_ne!(done.is & pxis::DHRS, 0);
    assert_ne!(
        done.is & pxis::DPS,
        0,
        "the I bit reports a processed descriptor"
    );
    assert_eq!(d.d2h(0).status, 0x50);
    assert_eq!(d.prdbc(0, 5), 4096);
    let mut disk_bytes = vec![0u8; 4096];
    be.read_vectored(100 * 512, &mut [std::io::IoSliceMut::new(&mut disk_bytes)])
        .unwrap();
    assert_eq!(disk_bytes, data);
    // 28-bit READ DMA into another buffer.
    let done = d.exec(
        0,
        6,
        &Cmd::ata(cmd::READ_DMA)
            .lba(100)
            .count(8)
            .buf(BUF + MIB, 4096),
    );
    ok(&done);
    assert_eq!(d.read_mem(BUF + MIB, 4096), data);
    assert_eq!(done.is & pxis::DPS, 0);
    // FUA write.
    ok(&d.exec(
        0,
        7,
        &Cmd::ata(cmd::WRITE_DMA_FUA_EXT)
            .lba(0)
            .count(1)
            .buf(BUF, 512)
            .write(),
    ));
    let st = d.dev_stats();
    assert!(st["written_bytes"] >= 4608 && st["read_bytes"] >= 4096 && st["commands"] >= 3);
}

#[test]
fn dma_4kn_sectors() {
    let (mut d, _) = drv(4096, 4096);
    let data = pattern(2, 8192);
    d.write_mem(BUF, &data);
    ok(&d.exec(
        0,
        0,
        &Cmd::ata(cmd::WRITE_DMA_EXT)
            .lba(3)
            .count(2)
            .buf(BUF, 8192)
            .write(),
    ));
    ok(&d.exec(
        0,
        0,
        &Cmd::ata(cmd::READ_DMA_EXT)
            .lba(3)
            .count(2)
            .buf(BUF + MIB, 8192),
    ));
    assert_eq!(d.read_mem(BUF + MIB, 8192), data);
    aborted(
        &d.exec(
            0,
            0,
            &Cmd::ata(cmd::READ_DMA_EXT)
                .lba(2047)
                .count(2)
                .buf(BUF, 8192),
        ),
        error::IDNF,
    );
}

#[test]
fn pio_sectors_and_multiple() {
    let (mut d, _) = drv(512, 512);
    let data = pattern(3, 2048);
    d.write_mem(BUF, &data);
    let done = d.exec(
        0,
        0,
        &Cmd::ata(cmd::WRITE_SECTORS)
            .lba(8)
            .count(4)
            .buf(BUF, 2048)
            .write(),
    );
    ok(&done);
    assert_ne!(done.is & pxis::DHRS, 0, "PIO data-out ends with a D2H FIS");
    let done = d.exec(
        0,
        1,
        &Cmd::ata(cmd::READ_SECTORS_EXT)
            .lba(8)
            .count(4)
            .buf(BUF + MIB, 2048),
    );
    ok(&done);
    assert_ne!(done.is & pxis::PSS, 0);
    assert_eq!(done.is & pxis::DHRS, 0, "PIO data-in has no D2H FIS");
    assert_eq!(d.pio_setup(0).transfer_count.get(), 512);
    assert_eq!(d.read_mem(BUF + MIB, 2048), data);
    // READ MULTIPLE with 4-sector blocks over 6 sectors: last block is 2 sectors.
    ok(&d.exec(0, 2, &Cmd::ata(cmd::SET_MULTIPLE).count(4)));
    let (_, w) = d.identify(0, cmd::IDENTIFY);
    assert_eq!(w[59], 0x0104);
    ok(&d.exec(
        0,
        3,
        &Cmd::ata(cmd::READ_MULTIPLE)
            .lba(8)
            .count(6)
            .buf(BUF + MIB, 3072),
    ));
    assert_eq!(d.pio_setup(0).transfer_count.get(), 1024);
    d.write_mem(BUF, &data); // IDENTIFY above used the buffer
    ok(&d.exec(
        0,
        4,
        &Cmd::ata(cmd::WRITE_MULTIPLE_EXT)
            .lba(20)
            .count(4)
            .buf(BUF, 2048)
            .write(),
    ));
    ok(&d.exec(
        0,
        4,
        &Cmd::ata(cmd::WRITE_MULTIPLE_FUA_EXT)
            .lba(20)
            .count(4)
            .buf(BUF, 2048)
            .write(),
    ));
    ok(&d.exec(
        0,
        4,
        &Cmd::ata(cmd::READ_MULTIPLE_EXT)
            .lba(20)
            .count(4)
            .buf(BUF + MIB, 2048),
    ));
    assert_eq!(d.read_mem(BUF + MIB, 2048), data);
    // Not a power of two / too big: aborted; 0 disables READ MULTIPLE.
    aborted(
        &d.exec(0, 5, &Cmd::ata(cmd::SET_MULTIPLE).count(3)),
        error::ABRT,
    );
    d.recover(0);
    aborted(
        &d.exec(0, 5, &Cmd::ata(cmd::SET_MULTIPLE).count(32)),
        error::ABRT,
    );
    d.recover(0);
    ok(&d.exec(0, 5, &Cmd::ata(cmd::SET_MULTIPLE).count(0)));
    aborted(
        &d.exec(
            0,
            6,
            &Cmd::ata(cmd::READ_MULTIPLE).lba(0).count(1).buf(BUF, 512),
        ),
        error::ABRT,
    );
}

#[test]
fn flush_and_set_features() {
    let (mut d, _) = drv(512, 512);
    ok(&d.exec(0, 0, &Cmd::ata(cmd::FLUSH_CACHE)));
    ok(&d.exec(0, 0, &Cmd::ata(cmd::FLUSH_CACHE_EXT)));
    ok(&d.exec(
        0,
        0,
        &Cmd::ata(cmd::SET_FEATURES).features(feature::DISABLE_WRITE_CACHE.into()),
    ));
    let (_, w) = d.identify(0, cmd::IDENTIFY);
    assert_eq!(w[85] & 0x20, 0, "write cache disabled");
    ok(&d.exec(
        0,
        0,
        &Cmd::ata(cmd::SET_FEATURES).features(feature::ENABLE_WRITE_CACHE.into()),
    ));
    ok(&d.exec(
        0,
        0,
        &Cmd::ata(cmd::SET_FEATURES).features(feature::DISABLE_LOOK_AHEAD.into()),
    ));
    ok(&d.exec(
        0,
        0,
        &Cmd::ata(cmd::SET_FEATURES)
            .features(feature::SET_TRANSFER_MODE.into())
            .count(0x45),
    ));
    let (_, w) = d.identify(0, cmd::IDENTIFY);
    assert_eq!(w[85] & 0x60, 0x20, "write cache on, look-ahead off");
    assert_eq!((w[88], w[63]), (0x207f, 0x0007), "UDMA5");
    ok(&d.exec(
        0,
        0,
        &Cmd::ata(cmd::SET_FEATURES)
            .features(feature::SET_TRANSFER_MODE.into())
            .count(0x22),
    ));
    let (_, w) = d.identify(0, cmd::IDENTIFY);
    assert_eq!((w[88], w[63]), (0x007f, 0x0407), "MWDMA2");
    for (f, c) in [
        (feature::SET_TRANSFER_MODE, 0x47u16),
        (0x99, 0),
        (feature::ENABLE_SATA_FEATURE, 0x03),
    ] {
        aborted(
            &d.exec(
                0,
                0,
                &Cmd::ata(cmd::SET_FEATURES).features(f.into()).count(c),
            ),
            error::ABRT,
        );
        d.recover(0);
    }
    ok(&d.exec(
        0,
        0,
        &Cmd::ata(cmd::SET_FEATURES)
            .features(feature::ENABLE_SATA_FEATURE.into())
            .count(6),
    ));
}

fn read_log(d: &mut Driver, command: u8, log: u8, page: u16, count: u16) -> crate::testdrv::Done {
    let mut c = Cmd::ata(command)
        .count(count)
        .buf(BUF, u64::from(count.max(1)) * 512);
    c.fis.lba0 = log;
    c.fis.lba1 = page as u8;
    c.fis.lba4 = (page >> 8) as u8;
    d.exec(0, 0, &c)
}

#[test]
fn general_purpose_logs() {
    let (mut d, _) = drv(512, 4096);
    for command in [cmd::READ_LOG_EXT, cmd::READ_LOG_DMA_EXT] {
        ok(&read_log(&mut d, command, 0x00, 0, 1));
        let dir = d.read_mem(BUF, 512);
        assert_eq!(&dir[0..2], &[1, 0], "GPL version 1");
        assert_eq!(
            (dir[0x20], dir[0x26], dir[0x60]),
            (1, 1, 3),
            "logs 10h, 13h, 30h"
        );
        ok(&read_log(&mut d, command, 0x13, 0, 1));
        let l = d.read_mem(BUF, 8);
        assert_eq!((l[0], l[4]), (1, 1), "queued DSM with TRIM");
        ok(&read_log(&mut d, command, 0x30, 0, 3));
        let l = d.read_mem(BUF, 1536);
        assert_eq!(&l[8..12], &[3, 0, 1, 2], "identify log page list");
        let (_, w) = d.identify(0, cmd::IDENTIFY);
        let copy: Vec<u16> = l[512..1024]
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(copy, w.to_vec(), "page 1 is IDENTIFY data");
        let cap = u64::from_le_bytes(l[1024 + 8..1024 + 16].try_into().unwrap());
        assert_eq!(cap, 1 << 63 | (8 * MIB / 512));
        let phys = u64::from_le_bytes(l[1024 + 16..1024 + 24].try_into().unwrap());
        assert_eq!((phys >> 16) & 0xf, 3, "8 logical per physical");
    }
    let pio = read_log(&mut d, cmd::READ_LOG_EXT, 0x30, 2, 1);
    assert_ne!(pio.is & pxis::PSS, 0);
    for (log, page, count) in [
        (0x04u8, 0u16, 1u16),
        (0x30, 3, 1),
        (0x30, 2, 2),
        (0x00, 0, 0),
        (0x10, 1, 1),
    ] {
        aborted(
            &read_log(&mut d, cmd::READ_LOG_EXT, log, page, count),
            error::ABRT,
        );
        d.recover(0);
    }
    aborted(
        &d.exec(
            0,
            0,
            &Cmd::ata(cmd::WRITE_LOG_EXT).count(1).buf(BUF, 512).write(),
        ),
        error::ABRT,
    );
}

fn smart_cmd(sub: u8) -> Cmd {
    let mut c = Cmd::ata(cmd::SMART).features(sub.into());
    c.fis.lba1 = smart::LBA_MID;
    c.fis.lba2 = smart::LBA_HIGH;
    c
}

#[test]
fn smart_operations() {
    let (mut d, _) = drv(512, 512);
    ok(&d.exec(
        0,
        0,
        &Cmd::ata(cmd::WRITE_DMA_EXT)
            .lba(0)
            .count(16)
            .buf(BUF, 8192)
            .write(),
    ));
    ok(&d.exec(0, 0, &smart_cmd(smart::RETURN_STATUS)));
    let f = d.d2h(0);
    assert_eq!((f.lba1, f.lba2), (0x4f, 0xc2), "no threshold exceeded");
    let done = d.exec(0, 0, &smart_cmd(smart::READ_DATA).buf(BUF, 512));
    ok(&done);
    let data = d.read_mem(BUF, 512);
    assert_eq!(data.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    let written = data[2..362].chunks(12).find(|a| a[0] == 0xf1).unwrap();
    assert_eq!(
        u64::from_le_bytes([
            written[5],
            written[6],
            written[7],
            written[8],
            written[9],
            written[10],
            0,
            0
        ]),
        16
    );
    ok(&d.exec(0, 0, &smart_cmd(smart::READ_THRESHOLDS).buf(BUF, 512)));
    // SMART READ LOG: the directory lists the error and self-test logs, one page each.
    let data = smart_log(&mut d, 0);
    assert_eq!(data[0..2], [1, 0], "directory version 1");
    assert_eq!((data[2], data[12]), (1, 1), "logs 01h and 06h");
    let listed: Vec<usize> = (1..256).filter(|&l| data[l * 2] != 0).collect();
    assert_eq!(listed, [1, 6]);
    let errlog = smart_log(&mut d, 1);
    assert_eq!((errlog[0], errlog[1]), (1, 0), "version 1, no entries");
    assert_eq!(errlog.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    let mut absent = smart_cmd(smart::READ_LOG).count(1).buf(BUF, 512);
    absent.fis.lba0 = 2;
    aborted(&d.exec(0, 0, &absent), error::ABRT);
    d.recover(0);
    let mut two = smart_cmd(smart::READ_LOG).count(2).buf(BUF, 1024);
    two.fis.lba0 = 6;
    aborted(&d.exec(0, 0, &two), error::ABRT);
    d.recover(0);
    ok(&d.exec(0, 0, &smart_cmd(smart::AUTOSAVE).count(0xf1)));
    ok(&d.exec(0, 0, &smart_cmd(smart::DISABLE)));
    let (_, w) = d.identify(0, cmd::IDENTIFY);
    assert_eq!(w[85] & 1, 0);
    aborted(
        &d.exec(0, 0, &smart_cmd(smart::READ_DATA).buf(BUF, 512)),
        error::ABRT,
    );
    d.recover(0);
    ok(&d.exec(0, 0, &smart_cmd(smart::ENABLE)));
    ok(&d.exec(0, 0, &smart_cmd(smart::READ_DATA).buf(BUF, 512)));
    let mut bad = smart_cmd(smart::READ_DATA).buf(BUF, 512);
    bad.fis.lba1 = 0;
    aborted(&d.exec(0, 0, &bad), error::ABRT);
    d.recover(0);
    // EXECUTE OFF-LINE IMMEDIATE with a reserved subcommand.
    aborted(&d.exec(0, 0, &offline(0x40)), error::ABRT);
}

/// One page of a SMART log, read with SMART READ LOG.
fn smart_log(d: &mut Driver, log: u8) -> Vec<u8> {
    let mut c = smart_cmd(smart::READ_LOG).count(1).buf(BUF, 512);
    c.fis.lba0 = log;
    ok(&d.exec(0, 0, &c));
    d.read_mem(BUF, 512)
}

/// SMART EXECUTE OFF-LINE IMMEDIATE with subcommand `sub`.
fn offline(sub: u8) -> Cmd {
    let mut c = smart_cmd(smart::EXEC_OFFLINE);
    c.fis.lba0 = sub;
    c
}

#[test]
fn smart_self_tests_complete_and_are_logged() {
    let (mut d, _) = drv(512, 512);
    let (_, w) = d.identify(0, cmd::IDENTIFY);
    assert_eq!(w[84] & 3, 3, "SMART error logging and self-test supported");
    assert_eq!(w[87] & 3, 3);
    ok(&d.exec(0, 0, &smart_cmd(smart::READ_DATA).buf(BUF, 512)));
    let data = d.read_mem(BUF, 512);
    assert_eq!((data[362], data[363]), (0, 0), "nothing run yet");
    assert_eq!(data[367], 0x11, "off-line immediate and self-tests");
    assert_eq!(data[370], 1, "error logging");
    assert_eq!((data[372], data[373]), (1, 1), "polling minutes");
    assert_eq!(smart_log(&mut d, 6)[508], 0, "empty self-test log");

    ok(&d.exec(0, 0, &offline(0x00)));
    ok(&d.exec(0, 0, &offline(0x01)));
    ok(&d.exec(0, 0, &offline(0x82)));
    ok(&d.exec(0, 0, &offline(0x7f)));
    for sub in [0x03, 0x04, 0x83, 0x84] {
        aborted(&d.exec(0, 0, &offline(sub)), error::ABRT);
        d.recover(0);
    }
    ok(&d.exec(0, 0, &smart_cmd(smart::READ_DATA).buf(BUF, 512)));
    let data = d.read_mem(BUF, 512);
    assert_eq!(
        data[362], 0x02,
        "off-line collection completed without error"
    );
    assert_eq!(data[363], 0x00, "last self-test completed without error");

    let log = smart_log(&mut d, 6);
    assert_eq!(log.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    assert_eq!(log[0..2], [1, 0]);
    assert_eq!(log[508], 2, "the newest is the second descriptor");
    assert_eq!((log[2], log[3]), (0x01, 0x00), "short, completed");
    assert_eq!(
        (log[26], log[27]),
        (0x82, 0x00),
        "extended captive, completed"
    );

    // The same through READ LOG EXT 07h, and the empty extended error log 03h.
    let mut ext = Cmd::ata(cmd::READ_LOG_EXT).count(1).buf(BUF, 512);
    ext.fis.lba0 = 0x07;
    ok(&d.exec(0, 0, &ext));
    let x = d.read_mem(BUF, 512);
    assert_eq!(x[0], 1);
    assert_eq!(x[2..4], [2, 0]);
    assert_eq!((x[4], x[30]), (0x01, 0x82));
    assert_eq!(x.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    ext.fis.lba0 = 0x03;
    ok(&d.exec(0, 0, &ext));
    let x = d.read_mem(BUF, 512);
    assert_eq!((x[0], x[2], x[3], x[500], x[501]), (1, 0, 0, 0, 0));
    ext.fis.lba0 = 0x00;
    ok(&d.exec(0, 0, &ext));
    let dir = d.read_mem(BUF, 512);
    assert_eq!((dir[6], dir[14]), (1, 1), "GP directory lists 03h and 07h");

    // 25 more: the SMART log wraps its 21 descriptors, the extended one its 19.
    for _ in 0..25 {
        ok(&d.exec(0, 0, &offline(0x01)));
    }
    let log = smart_log(&mut d, 6);
    assert_eq!(log[508], (27 - 1) % 21 + 1);
    assert!((0..21).all(|i| log[2 + i * 24] == 0x01 || log[2 + i * 24] == 0x82));
    assert_eq!(log.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    ext.fis.lba0 = 0x07;
    ok(&d.exec(0, 0, &ext));
    let x = d.read_mem(BUF, 512);
    assert_eq!(x[2..4], [(27 - 1) % 19 + 1, 0]);
}

#[test]
fn power_modes() {
    let (mut d, _) = drv(512, 512);
    let mode = |d: &mut Driver| {
        ok(&d.exec(0, 0, &Cmd::ata(cmd::CHECK_POWER_MODE)));
        d.d2h(0).count
    };
    assert_eq!(mode(&mut d), 0xff);
    ok(&d.exec(0, 0, &Cmd::ata(cmd::IDLE_IMMEDIATE)));
    assert_eq!(mode(&mut d), 0x80);
    ok(&d.exec(0, 0, &Cmd::ata(cmd::STANDBY_IMMEDIATE)));
    assert_eq!(mode(&mut d), 0x00);
    ok(&d.exec(
        0,
        0,
        &Cmd::ata(cmd::READ_DMA_EXT).lba(0).count(1).buf(BUF, 512),
    ));
    assert_eq!(mode(&mut d), 0xff, "media access spins up");
    ok(&d.exec(0, 0, &Cmd::ata(cmd::STANDBY).count(10)));
    assert_eq!(mode(&mut d), 0x00);
    ok(&d.exec(0, 0, &Cmd::ata(cmd::IDLE).count(10)));
    assert_eq!(mode(&mut d), 0x80);
}

#[test]
fn verify_native_max_diagnostics() {
    let (mut d, _) = drv(512, 512);
    let sectors = 8 * MIB / 512;
    ok(&d.exec(0, 0, &Cmd::ata(cmd::READ_VERIFY).lba(0).count(0)));
    ok(&d.exec(
        0,
        0,
        &Cmd::ata(cmd::READ_VERIFY_EXT).lba(sectors - 10).count(10),
    ));
    aborted(
        &d.exec(
            0,
            0,
            &Cmd::ata(cmd::READ_VERIFY_EXT).lba(sectors - 10).count(11),
        ),
        error::IDNF,
    );
    assert_eq!(d.d2h(0).lba0, (sectors - 10) as u8, "IDNF names the LBA");
    d.recover(0);
    ok(&d.exec(0, 0, &Cmd::ata(cmd::READ_NATIVE_MAX_EXT)));
    let f = d.d2h(0);
    assert_eq!(
        u64::from_le_bytes([f.lba0, f.lba1, f.lba2, f.lba3, f.lba4, f.lba5, 0, 0]),
        sectors - 1
    );
    ok(&d.exec(0, 0, &Cmd::ata(cmd::READ_NATIVE_MAX)));
    let f = d.d2h(0);
    assert_eq!(
        u64::from_le_bytes([f.lba0, f.lba1, f.lba2, f.device & 0xf, 0, 0, 0, 0]),
        sectors - 1
    );
    ok(&d.exec(0, 0, &Cmd::ata(cmd::EXEC_DIAGNOSTIC)));
    let f = d.d2h(0);
    assert_eq!((f.error, f.count, f.lba0, f.lba1, f.lba2), (1, 1, 1, 0, 0));
}

fn trim_entry(lba: u64, n: u16) -> [u8; 8] {
    (lba | u64::from(n) << 48).to_le_bytes()
}

#[test]
fn data_set_management_trim() {
    let (mut d, be) = drv(512, 512);
    let sectors = 8 * MIB / 512;
    d.write_mem(BUF, &pattern(4, 64 * 512));
    ok(&d.exec(
        0,
        0,
        &Cmd::ata(cmd::WRITE_DMA_EXT)
            .lba(0)
            .count(64)
            .buf(BUF, 64 * 512)
            .write(),
    ));
    let mut list = vec![0u8; 512];
    list[0..8].copy_from_slice(&trim_entry(8, 8));
    list[8..16].copy_from_slice(&trim_entry(32, 0)); // padding
    list[16..24].copy_from_slice(&trim_entry(40, 4));
    d.write_mem(BUF + MIB, &list);
    let trim = |blocks: u16| {
        Cmd::ata(cmd::DSM)
            .features(1)
            .count(blocks)
            .buf(BUF + MIB, 512)
            .write()
    };
    ok(&d.exec(0, 0, &trim(1)));
    ok(&d.exec(
        0,
        0,
        &Cmd::ata(cmd::READ_DMA_EXT)
            .lba(0)
            .count(64)
            .buf(BUF + 2 * MIB, 64 * 512),
    ));
    let back = d.read_mem(BUF + 2 * MIB, 64 * 512);
    let orig = pattern(4, 64 * 512);
    for s in 0..64usize {
        let chunk = &back[s * 512..(s + 1) * 512];
        if (8..16).contains(&s) || (40..44).contains(&s) {
            assert!(chunk.iter().all(|&b| b == 0), "sector {s} trimmed");
        } else {
            assert_eq!(chunk, &orig[s * 512..(s + 1) * 512], "sector {s} kept");
        }
    }
    // A range past the end: aborted, and nothing is trimmed (ranges are checked first).
    list[0..8].copy_from_slice(&trim_entry(0, 4));
    list[16..24].copy_from_slice(&trim_entry(sectors - 2, 4));
    d.write_mem(BUF + MIB, &list);
    aborted(&d.exec(0, 0, &trim(1)), error::ABRT);
    d.recover(0);
    let mut first = vec![0u8; 512];
    be.read_vectored(0, &mut [std::io::IoSliceMut::new(&mut first)])
        .unwrap();
    assert_eq!(first, orig[..512]);
    // TRIM bit clear, too many blocks, zero blocks.
    for c in [
        Cmd::ata(cmd::DSM).count(1).buf(BUF + MIB, 512).write(),
        trim(9),
        trim(0),
    ] {
        aborted(&d.exec(0, 0, &c), error::ABRT);
        d.recover(0);
    }
}

#[test]
fn unknown_and_nop_abort_and_halt_until_restart() {
    let (mut d, _) = drv(512, 512);
    for command in [
        0x00u8,
        0x01,
        0xfe,
        cmd::PACKET,
        cmd::IDENTIFY_PACKET,
        cmd::DEVICE_RESET,
        cmd::NCQ_NON_DATA + 0x10,
    ] {
        let done = d.exec(0, 2, &Cmd::ata(command));
        aborted(&done, error::ABRT);
        assert_eq!(done.ci, 1 << 2, "failed slot stays in PxCI");
        assert_eq!((d.pr(0, preg::CMD) >> 8) & 0x1f, 2, "CCS names it");
        let f = d.d2h(0);
        assert_eq!((f.status, f.error, f.flags & 0x40), (0x41, 0x04, 0x40));
        // The port is halted: a new command waits until the engine restarts.
        d.issue(0, 3, &Cmd::ata(cmd::CHECK_POWER_MODE));
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_ne!(d.pr(0, preg::CI) & (1 << 3), 0);
        d.recover(0);
        assert_eq!(d.pr(0, preg::CI), 0);
    }
}

#[test]
fn read_error_reports_unc_with_lba() {
    let (mut d, be) = drv(512, 512);
    *be.fail_reads.lock().unwrap() = Some((100 * 512, 101 * 512));
    let done = d.exec(
        0,
        0,
        &Cmd::ata(cmd::READ_DMA_EXT).lba(100).count(4).buf(BUF, 2048),
    );
    aborted(&done, error::UNC);
    assert_eq!(d.d2h(0).lba0, 100);
    assert!(d.dev_stats()["errors"] >= 1);
}

#[test]
fn read_only_disk_refuses_writes() {
    let be = Arc::new(block::Ram::new(MIB, 512).unwrap().with_read_only(true));
    let mut d = Driver::started(vec![disk(be, 512, 512)]);
    aborted(
        &d.exec(
            0,
            0,
            &Cmd::ata(cmd::WRITE_DMA_EXT)
                .lba(0)
                .count(1)
                .buf(BUF, 512)
                .write(),
        ),
        error::ABRT,
    );
    d.recover(0);
    let (_, w) = d.identify(0, cmd::IDENTIFY);
    assert_eq!(w[169] & 1, 0, "no TRIM on a read-only disk");
    ok(&d.exec(0, 0, &Cmd::ata(cmd::FLUSH_CACHE_EXT)));
}

#[test]
fn write_through_drive_reports_cache_disabled() {
    let mut info = disk(TestBackend::new(MIB, 512), 512, 512);
    info.write_through = true;
    let mut d = Driver::started(vec![info]);
    let (_, w) = d.identify(0, cmd::IDENTIFY);
    assert_eq!(w[82] & 0x20, 0x20);
    assert_eq!(w[85] & 0x20, 0);
    ok(&d.exec(
        0,
        0,
        &Cmd::ata(cmd::WRITE_DMA_EXT)
            .lba(0)
            .count(1)
            .buf(BUF, 512)
            .write(),
    ));
}

#[test]
fn software_reset_sequence() {
    let (mut d, _) = drv(512, 512);
    d.port_stop(0);
    d.pw(0, preg::SIG, 0);
    let c = d.pr(0, preg::CMD);
    d.pw(0, preg::CMD, c | crate::regs::pxcmd::ST);
    let mut srst = Cmd::ata(0);
    srst.fis.flags = 0; // C clear: device control
    srst.fis.control = crate::fis::CONTROL_SRST;
    srst.flags |= crate::fis::header::R | crate::fis::header::C;
    let done = d.exec(0, 0, &srst);
    assert_eq!(done.ci, 0);
    let mut release = Cmd::ata(0);
    release.fis.flags = 0;
    let done = d.exec(0, 0, &release);
    assert_eq!(done.ci, 0);
    assert_eq!(d.pr(0, preg::SIG), sig::ATA);
    assert_eq!(d.pr(0, preg::TFD), 0x150);
    let f = d.d2h(0);
    assert_eq!((f.status, f.error, f.count, f.lba0), (0x50, 1, 1, 1));
}

/// A transfer split into more chunks than one completion pass takes (over 64 × 256 PRDT
/// entries) on a RAM disk, whose requests complete inline: once the submitting thread stopped
/// after 64 passes, the rest sat finished with nobody to reap it, and the command never
/// completed.
#[test]
fn a_transfer_in_many_chunks_on_an_inline_backend_completes() {
    let ram = Arc::new(block::Ram::new(8 * MIB, 512).unwrap());
    let data = pattern(31, 1040 * 512);
    ram.write_vectored(0, &[std::io::IoSlice::new(&data)])
        .unwrap();
    let mut d = Driver::started(vec![disk(ram, 512, 512)]);
    // 16640 entries of 32 bytes, 32 bytes apart (so no two merge): 65 chunks of 256 segments.
    let mut c = Cmd::ata(cmd::READ_DMA_EXT).lba(0).count(1040);
    for i in 0..16640u64 {
        c = c.prd_raw(BUF + i * 64, 31);
    }
    ok(&d.exec(0, 0, &c));
    let got = d.read_mem(BUF, 16640 * 64);
    for (i, piece) in data.chunks(32).enumerate() {
        assert_eq!(&got[i * 64..i * 64 + 32], piece, "entry {i}");
    }
}
