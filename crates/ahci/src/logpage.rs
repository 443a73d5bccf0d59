//! General Purpose Logs (ACS-4 §9) and SMART data: what READ LOG (DMA) EXT and SMART READ DATA
//! return. (Named `logpage`, not `log`, so it does not shadow the `log` crate.)
//!
//! Logs are generated from the drive's description and counters when read, so they can never
//! disagree with IDENTIFY. The NCQ Command Error log (10h) lives in `ncq` because it is part of
//! NCQ error recovery; the counters SMART reports are kept with the drive (`drive`).

use std::sync::atomic::Ordering::Relaxed;

use crate::drive::{DriveCounters, DriveInfo, DriveState, SelfTests};
use crate::identify;

/// Size of one log page.
pub const PAGE: usize = 512;

/// Log addresses this device implements.
pub mod addr {
    /// General Purpose Log Directory (and, through SMART READ LOG, the SMART Log Directory).
    pub const DIRECTORY: u8 = 0x00;
    /// Summary SMART Error log (SMART READ LOG only).
    pub const SMART_ERROR: u8 = 0x01;
    /// Extended Comprehensive SMART Error log (GPL only).
    pub const EXT_ERROR: u8 = 0x03;
    /// SMART Self-Test log (SMART READ LOG only).
    pub const SMART_SELF_TEST: u8 = 0x06;
    /// Extended SMART Self-Test log (GPL only).
    pub const EXT_SELF_TEST: u8 = 0x07;
    /// NCQ Command Error log.
    pub const NCQ_ERROR: u8 = 0x10;
    /// NCQ Send and Receive log.
    pub const NCQ_SEND_RECV: u8 = 0x13;
    /// IDENTIFY DEVICE data log.
    pub const IDENTIFY: u8 = 0x30;
}

/// IDENTIFY DEVICE data log pages.
pub mod id_page {
    /// List of supported pages.
    pub const LIST: u8 = 0x00;
    /// Copy of IDENTIFY DEVICE data.
    pub const COPY: u8 = 0x01;
    /// Capacity.
    pub const CAPACITY: u8 = 0x02;
    /// Number of pages implemented (0 through CAPACITY).
    pub const COUNT: u16 = 3;
}

/// Pages in each General Purpose log this device implements (0 = not implemented).
pub fn log_pages(log: u8) -> u16 {
    match log {
        addr::DIRECTORY
        | addr::EXT_ERROR
        | addr::EXT_SELF_TEST
        | addr::NCQ_ERROR
        | addr::NCQ_SEND_RECV => 1,
        addr::IDENTIFY => id_page::COUNT,
        _ => 0,
    }
}

/// The General Purpose Log Directory: version 1, then the page count of every log.
fn directory() -> Vec<u8> {
    let mut p = vec![0u8; PAGE];
    p[0] = 1;
    for log in 1..=255u8 {
        let n = log_pages(log);
        p[usize::from(log) * 2..usize::from(log) * 2 + 2].copy_from_slice(&n.to_le_bytes());
    }
    p
}

/// Pages in each log SMART READ LOG reads (0 = not implemented).
fn smart_log_pages(log: u8) -> u8 {
    match log {
        addr::DIRECTORY | addr::SMART_ERROR | addr::SMART_SELF_TEST => 1,
        _ => 0,
    }
}

/// SMART READ LOG data: `count` pages of `log` from its first page, or `None` when the log is
/// not implemented or shorter (the command then aborts).
pub fn smart_read_log(tests: &SelfTests, log: u8, count: u8) -> Option<Vec<u8>> {
    if count == 0 || count > smart_log_pages(log) {
        return None;
    }
    Some(match log {
        addr::DIRECTORY => {
            // The SMART Log Directory: version 1, then the page count of every SMART log.
            let mut p = vec![0u8; PAGE];
            p[0] = 1;
            for l in 1..=255u8 {
                p[usize::from(l) * 2] = smart_log_pages(l);
            }
            p
        }
        addr::SMART_ERROR => empty_error_log(),
        addr::SMART_SELF_TEST => self_test_log(tests),
        _ => return None,
    })
}

/// An error log with no entries: the Summary SMART Error log (ACS-4 §A.21) and page 0 of the
/// Extended Comprehensive SMART Error log (§9.5) both start with version 1 and, empty, read as
/// zeroes (index, entries, device error count) up to the checksum. Commands that abort
/// (unsupported features, out-of-range LBAs) are the host's errors, not the device's, and an
/// image has no media errors of its own, so nothing is ever logged.
fn empty_error_log() -> Vec<u8> {
    let mut p = vec![0u8; PAGE];
    p[0] = 1;
    smart_checksum(&mut p);
    p
}

/// SMART Self-Test log (ACS-4 §A.20): revision 1, 21 descriptors of 24 bytes from byte 2 used
/// as a circular buffer, the newest descriptor's index in byte 508.
fn self_test_log(tests: &SelfTests) -> Vec<u8> {
    const SLOTS: usize = crate::drive::SELF_TEST_LOG_ENTRIES;
    let mut p = vec![0u8; PAGE];
    p[0..2].copy_from_slice(&1u16.to_le_bytes());
    let (placed, newest) = tests.placed(SLOTS);
    for (slot, e) in placed {
        let d = &mut p[2 + (slot - 1) * 24..2 + slot * 24];
        d[0] = e.subcommand;
        d[1] = e.status;
        d[2..4].copy_from_slice(&e.hours.to_le_bytes());
        // Checkpoint and failing LBA stay 0: no test has failed.
    }
    p[508] = newest as u8;
    smart_checksum(&mut p);
    p
}

/// Extended SMART Self-Test log (ACS-4 §9.24), page 0: revision 1, the newest descriptor's
/// index in bytes 3:2, 19 descriptors of 26 bytes from byte 4.
fn ext_self_test_log(tests: &SelfTests) -> Vec<u8> {
    const SLOTS: usize = 19;
    let mut p = vec![0u8; PAGE];
    p[0] = 1;
    let (placed, newest) = tests.placed(SLOTS);
    for (slot, e) in placed {
        let d = &mut p[4 + (slot - 1) * 26..4 + slot * 26];
        d[0] = e.subcommand;
        d[1] = e.status;
        d[2..4].copy_from_slice(&e.hours.to_le_bytes());
    }
    p[2..4].copy_from_slice(&(newest as u16).to_le_bytes());
    smart_checksum(&mut p);
    p
}

/// NCQ Send and Receive log: SEND FPDMA QUEUED with the DATA SET MANAGEMENT subcommand and its
/// TRIM function (ACS-4 §9.16).
fn ncq_send_recv(info: &DriveInfo) -> Vec<u8> {
    let mut p = vec![0u8; PAGE];
    if info.trim {
        p[0] = 1; // queued DATA SET MANAGEMENT supported
        p[4] = 1; // its TRIM function supported
    }
    p
}

/// One IDENTIFY DEVICE data log page header: bit 63 set, revision 1, page number.
fn id_header(page: u8) -> u64 {
    (1 << 63) | (u64::from(page) << 16) | 1
}

fn put_qword(p: &mut [u8], index: usize, v: u64) {
    p[index * 8..index * 8 + 8].copy_from_slice(&v.to_le_bytes());
}

/// One page of the IDENTIFY DEVICE data log.
fn identify_page(info: &DriveInfo, state: &DriveState, page: u8) -> Vec<u8> {
    const VALID: u64 = 1 << 63;
    let mut p = vec![0u8; PAGE];
    match page {
        id_page::LIST => {
            put_qword(&mut p, 0, id_header(page));
            let pages = [id_page::LIST, id_page::COPY, id_page::CAPACITY];
            p[8] = pages.len() as u8;
            p[9..9 + pages.len()].copy_from_slice(&pages);
        }
        id_page::COPY => {
            p = identify::to_bytes(&identify::identify_device(info, state));
        }
        id_page::CAPACITY => {
            put_qword(&mut p, 0, id_header(page));
            put_qword(&mut p, 1, VALID | info.sectors);
            // Physical/logical sector size: relationship and logical size supported.
            put_qword(
                &mut p,
                2,
                VALID | (1 << 62) | (1 << 61) | (u64::from(info.phys_shift()) << 16),
            );
            put_qword(&mut p, 3, VALID | u64::from(info.logical / 2));
            put_qword(&mut p, 4, 0); // nominal buffer size not reported
        }
        _ => {}
    }
    p
}

/// READ LOG (DMA) EXT data for `count` pages of `log` starting at `page`, or `None` when the
/// request names a log or page the device lacks (the command then aborts). Log 10h is handled by
/// the caller.
pub fn read_log(
    info: &DriveInfo,
    state: &DriveState,
    log: u8,
    page: u16,
    count: u16,
) -> Option<Vec<u8>> {
    let size = log_pages(log);
    if count == 0 || u32::from(page) + u32::from(count) > u32::from(size) {
        return None;
    }
    let mut out = Vec::with_capacity(usize::from(count) * PAGE);
    for pg in page..page + count {
        out.extend(match log {
            addr::DIRECTORY => directory(),
            addr::EXT_ERROR => empty_error_log(),
            addr::EXT_SELF_TEST => ext_self_test_log(&state.self_tests),
            addr::NCQ_SEND_RECV => ncq_send_recv(info),
            addr::IDENTIFY => identify_page(info, state, pg as u8),
            _ => return None,
        });
    }
    Some(out)
}

/// SMART attribute IDs reported.
pub mod attr {
    /// Reallocated Sectors Count.
    pub const REALLOCATED: u8 = 0x05;
    /// Power-On Hours.
    pub const POWER_ON_HOURS: u8 = 0x09;
    /// Power Cycle Count.
    pub const POWER_CYCLES: u8 = 0x0c;
    /// Temperature (Celsius).
    pub const TEMPERATURE: u8 = 0xc2;
    /// Total LBAs Written (512-byte units).
    pub const LBAS_WRITTEN: u8 = 0xf1;
    /// Total LBAs Read (512-byte units).
    pub const LBAS_READ: u8 = 0xf2;
}

/// Fixed temperature reported by the temperature attribute.
const TEMPERATURE_C: u64 = 35;

/// (id, flags, raw value, threshold) of every attribute, from the counters now.
fn attributes(c: &DriveCounters) -> [(u8, u16, u64, u8); 6] {
    let hours = c.created.elapsed().as_secs() / 3600;
    [
        (attr::REALLOCATED, 0x0033, 0, 10),
        (attr::POWER_ON_HOURS, 0x0032, hours, 0),
        (attr::POWER_CYCLES, 0x0032, 1, 0),
        (attr::TEMPERATURE, 0x0022, TEMPERATURE_C, 0),
        (
            attr::LBAS_WRITTEN,
            0x0032,
            c.written_bytes.load(Relaxed) / 512,
            0,
        ),
        (attr::LBAS_READ, 0x0032, c.read_bytes.load(Relaxed) / 512, 0),
    ]
}

/// Byte 511 of SMART structures: makes the 512 bytes sum to zero.
fn smart_checksum(p: &mut [u8]) {
    let sum = p[..511].iter().fold(0u8, |a, b| a.wrapping_add(*b));
    p[511] = 0u8.wrapping_sub(sum);
}

/// SMART data structure revision.
const SMART_REVISION: u16 = 0x0010;

/// Off-line data collection capability (SMART data byte 367): EXECUTE OFF-LINE IMMEDIATE and
/// the short and extended self-tests; no automatic off-line collection, surface scan,
/// conveyance or selective self-test.
const OFFLINE_CAPABILITY: u8 = 0x01 | 0x10;

/// Recommended polling time of the short and extended self-tests, in minutes (bytes 372, 373
/// and 376:375). They finish at once; one minute is the smallest non-zero value.
const SELF_TEST_MINUTES: u8 = 1;

/// SMART READ DATA: attribute table plus status and capability bytes (ACS-3 SMART data
/// structure).
pub fn smart_data(c: &DriveCounters, tests: &SelfTests) -> Vec<u8> {
    let mut p = vec![0u8; PAGE];
    p[0..2].copy_from_slice(&SMART_REVISION.to_le_bytes());
    for (i, (id, flags, raw, _)) in attributes(c).into_iter().enumerate() {
        let e = &mut p[2 + i * 12..2 + (i + 1) * 12];
        e[0] = id;
        e[1..3].copy_from_slice(&flags.to_le_bytes());
        e[3] = 100; // normalised current value
        e[4] = 100; // worst
        e[5..11].copy_from_slice(&raw.to_le_bytes()[..6]);
    }
    p[362] = tests.offline_status;
    p[363] = tests.exec_status;
    p[367] = OFFLINE_CAPABILITY;
    // 368–369: saves data before power saving, supports autosave; 370: error logging.
    p[368..370].copy_from_slice(&0x0003u16.to_le_bytes());
    p[370] = 1;
    p[372] = SELF_TEST_MINUTES;
    p[373] = SELF_TEST_MINUTES;
    p[375..377].copy_from_slice(&u16::from(SELF_TEST_MINUTES).to_le_bytes());
    smart_checksum(&mut p);
    p
}

/// SMART READ ATTRIBUTE THRESHOLDS (obsolete in ACS but still read by smartctl).
pub fn smart_thresholds(c: &DriveCounters) -> Vec<u8> {
    let mut p = vec![0u8; PAGE];
    p[0..2].copy_from_slice(&SMART_REVISION.to_le_bytes());
    for (i, (id, _, _, thr)) in attributes(c).into_iter().enumerate() {
        p[2 + i * 12] = id;
        p[3 + i * 12] = thr;
    }
    smart_checksum(&mut p);
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drive::DriveKind;

    #[test]
    fn directory_and_bounds() {
        let info = DriveInfo::new(DriveKind::Disk, None, 512, 512);
        let st = DriveState::new(&info);
        let d = read_log(&info, &st, 0, 0, 1).unwrap();
        assert_eq!(&d[0..2], &[1, 0]);
        assert_eq!(&d[0x20..0x22], &[1, 0]);
        assert_eq!(&d[0x60..0x62], &[3, 0]);
        assert!(read_log(&info, &st, 0x30, 2, 2).is_none());
        assert!(read_log(&info, &st, 0x30, 0, 0).is_none());
        assert!(read_log(&info, &st, 0x04, 0, 1).is_none());
        assert_eq!(read_log(&info, &st, 0x30, 0, 3).unwrap().len(), 3 * PAGE);
    }

    #[test]
    fn smart_checksums() {
        let c = DriveCounters::default();
        c.written_bytes.store(4096, Relaxed);
        for p in [smart_data(&c, &SelfTests::default()), smart_thresholds(&c)] {
            assert_eq!(p.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        }
        let d = smart_data(&c, &SelfTests::default());
        assert_eq!(d[2 + 4 * 12], attr::LBAS_WRITTEN);
        assert_eq!(d[2 + 4 * 12 + 5], 8);
    }

    #[test]
    fn a_restored_self_test_record_that_disagrees_with_itself_still_reads() {
        use crate::drive::SelfTestEntry;
        let e = SelfTestEntry {
            subcommand: 1,
            status: 0,
            hours: 7,
        };
        for count in [0, 3, 40, u32::MAX] {
            let t = SelfTests {
                offline_status: 0xff,
                exec_status: 0xff,
                count,
                recent: vec![e; 40],
            };
            let p = smart_read_log(&t, addr::SMART_SELF_TEST, 1).unwrap();
            assert!(
                (1..=21).contains(&p[508]),
                "count {count}: index {}",
                p[508]
            );
            let x = ext_self_test_log(&t);
            assert!(
                (1..=19).contains(&x[2]),
                "count {count}: ext index {}",
                x[2]
            );
        }
    }
}
