//! ATAPI CD/DVD-ROM: the MMC-6 (and SPC) commands a read-only drive with an ISO image needs.
//!
//! A PACKET command carries a SCSI CDB in the command table's ACMD area. Success ends with status
//! DRDY|DSC; failure is CHECK CONDITION, reported as ERR with the sense key in the high nibble
//! of the Error register, and the full sense (key, ASC, ASCQ) is kept for REQUEST SENSE. The
//! medium can be ejected and reloaded (START STOP UNIT) unless the host prevents removal. That
//! sense and tray state lives in `drive` with the device's other settings.

use crate::drive::{DriveInfo, DriveState, Sense, CD_BLOCK};
use crate::fis::{H2dRegisterFis, TaskFile};
use crate::plan::{Action, Plan, Proto};
use crate::spec::{asc, key, media_event, op, profile, status};

/// Largest CD (80 minutes); bigger images are presented as DVD-ROM media.
pub const CD_MAX_BLOCKS: u64 = 80 * 60 * 75;
/// ATAPI interrupt reason (Count register) at command completion: I/O and C/D.
pub const REASON_COMPLETE: u16 = 0x03;
/// Read speed reported in the capabilities page (KB/s, 40x).
const READ_SPEED_KBS: u16 = 40 * 176;

/// Outputs of a PACKET command that completed with GOOD status.
pub fn good() -> TaskFile {
    TaskFile {
        status: status::GOOD,
        count: REASON_COMPLETE,
        ..Default::default()
    }
}

/// CHECK CONDITION: remember `sense` and report its key in the Error register.
pub fn check_condition(st: &mut DriveState, sense: Sense) -> TaskFile {
    st.atapi.sense = sense;
    TaskFile {
        status: status::FAILED,
        error: sense.key << 4,
        count: REASON_COMPLETE,
        ..Default::default()
    }
}

/// Outputs for a medium read that failed after the command started.
pub fn read_failed(st: &mut DriveState) -> TaskFile {
    check_condition(st, Sense::new(key::MEDIUM_ERROR, asc::UNRECOVERED_READ, 0))
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// LBA to MSF (minute, second, frame), counting the 2-second pregap.
fn msf(lba: u64) -> [u8; 3] {
    let f = lba + 150;
    [
        (f / (75 * 60)).min(255) as u8,
        ((f / 75) % 60) as u8,
        (f % 75) as u8,
    ]
}

/// A TOC address field: MSF (0, M, S, F) or a big-endian LBA.
fn toc_addr(lba: u64, use_msf: bool) -> [u8; 4] {
    if use_msf {
        let m = msf(lba);
        [0, m[0], m[1], m[2]]
    } else {
        (lba as u32).to_be_bytes()
    }
}

/// Decode a PACKET command.
pub fn prepare(
    info: &DriveInfo,
    st: &mut DriveState,
    fis: &H2dRegisterFis,
    cdb: &[u8; 16],
) -> Plan {
    let proto = Proto::Packet {
        dma: fis.features & 1 != 0,
    };
    let opcode = cdb[0];
    let fail = |st: &mut DriveState, s: Sense| Plan::done(check_condition(st, s), proto);
    let illegal =
        |st: &mut DriveState, asc_: u8| fail(st, Sense::new(key::ILLEGAL_REQUEST, asc_, 0));
    let reply = |data: Vec<u8>, alloc: usize| {
        let mut data = data;
        data.truncate(alloc);
        Plan {
            action: Action::DataIn { data, tf: good() },
            proto,
        }
    };

    // A pending unit attention fails the first command that may report one (MMC-6 §4.1.6.1);
    // REQUEST SENSE reports it as data instead.
    let reports_ua = !matches!(
        opcode,
        op::INQUIRY | op::REQUEST_SENSE | op::GET_CONFIGURATION | op::GET_EVENT_STATUS
    );
    if reports_ua {
        if let Some(ua) = st.atapi.unit_attention.take() {
            return fail(st, ua);
        }
    }
    if opcode != op::REQUEST_SENSE {
        st.atapi.sense = Sense::default();
    }
    let needs_medium = matches!(
        opcode,
        op::TEST_UNIT_READY
            | op::READ_CAPACITY
            | op::READ_10
            | op::READ_12
            | op::READ_TOC
            | op::READ_DISC_INFO
    );
    if needs_medium && !st.atapi.loaded {
        let s = st.atapi.not_present();
        return fail(st, s);
    }
    let blocks = info.sectors;

    match opcode {
        op::TEST_UNIT_READY => Plan::done(good(), proto),
        op::REQUEST_SENSE => {
            let s = st.atapi.unit_attention.take().unwrap_or(st.atapi.sense);
            st.atapi.sense = Sense::default();
            let mut d = vec![0u8; 18];
            d[0] = 0x70; // current error, fixed format
            d[2] = s.key;
            d[7] = 10;
            d[12] = s.asc;
            d[13] = s.ascq;
            reply(d, usize::from(cdb[4]))
        }
        op::INQUIRY => {
            let alloc = usize::from(be16(&cdb[3..5]));
            match (cdb[1] & 1 != 0, cdb[2]) {
                (false, 0) => reply(inquiry(info), alloc),
                (true, 0x00) => reply(vec![0x05, 0x00, 0, 2, 0x00, 0x80], alloc),
                (true, 0x80) => {
                    let mut d = vec![0x05, 0x80, 0, info.serial.len() as u8];
                    d.extend(info.serial.bytes());
                    reply(d, alloc)
                }
                _ => illegal(st, asc::INVALID_FIELD),
            }
        }
        op::START_STOP_UNIT => {
            let (power, loej, start) = (cdb[4] >> 4, cdb[4] & 2 != 0, cdb[4] & 1 != 0);
            if power != 0 || !loej {
                return Plan::done(good(), proto);
            }
            let a = &mut st.atapi;
            if start {
                if a.has_image && !a.loaded {
                    a.loaded = true;
                    a.event = media_event::NEW_MEDIA;
                    a.unit_attention =
                        Some(Sense::new(key::UNIT_ATTENTION, asc::MEDIUM_CHANGED, 0));
                }
                a.tray_open = false;
            } else {
                if a.locked {
                    return fail(
                        st,
                        Sense::new(key::ILLEGAL_REQUEST, asc::REMOVAL_PREVENTED, 2),
                    );
                }
                if a.loaded {
                    a.event = media_event::MEDIA_REMOVAL;
                }
                a.loaded = false;
                a.tray_open = true;
            }
            Plan::done(good(), proto)
        }
        op::PREVENT_ALLOW => {
            st.atapi.locked = cdb[4] & 3 != 0;
            Plan::done(good(), proto)
        }
        op::READ_CAPACITY => {
            let mut d = (blocks.saturating_sub(1).min(u64::from(u32::MAX)) as u32)
                .to_be_bytes()
                .to_vec();
            d.extend(CD_BLOCK.to_be_bytes());
            reply(d, 8)
        }
        op::READ_10 | op::READ_12 => {
            let lba = u64::from(be32(&cdb[2..6]));
            let n = if opcode == op::READ_10 {
                u64::from(be16(&cdb[7..9]))
            } else {
                u64::from(be32(&cdb[6..10]))
            };
            if lba + n > blocks {
                return illegal(st, asc::LBA_OUT_OF_RANGE);
            }
            if n == 0 {
                return Plan::done(good(), proto);
            }
            let b = u64::from(CD_BLOCK);
            Plan {
                action: Action::Read {
                    offset: lba * b,
                    len: n * b,
                    lba,
                },
                proto,
            }
        }
        op::READ_TOC => {
            let use_msf = cdb[1] & 2 != 0;
            let mut format = cdb[2] & 0x0f;
            if format == 0 {
                format = cdb[9] >> 6; // pre-MMC placement of the format field
            }
            match read_toc(blocks, format, cdb[6], use_msf) {
                Some(d) => reply(d, usize::from(be16(&cdb[7..9]))),
                None => illegal(st, asc::INVALID_FIELD),
            }
        }
        op::MODE_SENSE_10 => {
            let (pc, page, subpage) = (cdb[2] >> 6, cdb[2] & 0x3f, cdb[3]);
            if pc == 3 {
                return illegal(st, asc::SAVING_NOT_SUPPORTED);
            }
            match mode_sense(st, pc, page, subpage) {
                Some(d) => reply(d, usize::from(be16(&cdb[7..9]))),
                None => illegal(st, asc::INVALID_FIELD),
            }
        }
        op::GET_CONFIGURATION => {
            let rt = cdb[1] & 3;
            if rt == 3 {
                return illegal(st, asc::INVALID_FIELD);
            }
            reply(
                get_configuration(st, blocks, rt, be16(&cdb[2..4])),
                usize::from(be16(&cdb[7..9])),
            )
        }
        op::GET_EVENT_STATUS => {
            if cdb[1] & 1 == 0 {
                return illegal(st, asc::INVALID_FIELD); // asynchronous operation is not offered
            }
            let alloc = usize::from(be16(&cdb[7..9]));
            const MEDIA_CLASS: u8 = 1 << 4;
            if cdb[4] & MEDIA_CLASS == 0 {
                return reply(vec![0, 2, 0x80, MEDIA_CLASS], alloc); // no event available
            }
            let a = &mut st.atapi;
            let status = u8::from(a.tray_open) | (u8::from(a.loaded) << 1);
            let d = vec![0, 6, 0x04, MEDIA_CLASS, a.event, status, 0, 0];
            a.event = media_event::NO_CHANGE;
            reply(d, alloc)
        }
        op::MECHANISM_STATUS => {
            let d = vec![0, u8::from(st.atapi.tray_open) << 4, 0, 0, 0, 0, 0, 0];
            reply(d, usize::from(be16(&cdb[8..10])))
        }
        op::READ_DISC_INFO => {
            if cdb[1] & 7 != 0 {
                return illegal(st, asc::INVALID_FIELD);
            }
            let mut d = vec![0u8; 34];
            d[1] = 32; // information length
            d[2] = 0x0e; // last session complete, disc complete
            d[3] = 1; // first track
            d[4] = 1; // sessions
            d[5] = 1; // first track in last session
            d[6] = 1; // last track in last session
            d[7] = 0x20; // unrestricted use
            d[16..24].fill(0xff); // lead-in / lead-out of a complete disc: not applicable
            reply(d, usize::from(be16(&cdb[7..9])))
        }
        _ => illegal(st, asc::INVALID_OPCODE),
    }
}

/// Standard INQUIRY data: CD/DVD device, removable, SPC-3, 36 bytes.
fn inquiry(info: &DriveInfo) -> Vec<u8> {
    let mut d = vec![0u8; 36];
    d[0] = 0x05;
    d[1] = 0x80;
    d[2] = 0x05;
    d[3] = 0x02;
    d[4] = 31;
    let put = |d: &mut [u8], s: &str| {
        d.fill(b' ');
        for (o, c) in d.iter_mut().zip(s.bytes()) {
            *o = if c.is_ascii_graphic() { c } else { b' ' };
        }
    };
    put(&mut d[8..16], "RHYVE");
    put(&mut d[16..32], &info.model);
    put(&mut d[32..36], &info.firmware);
    d
}

/// READ TOC/PMA/ATIP for a single-session, single-data-track disc of `blocks` blocks.
fn read_toc(blocks: u64, format: u8, track: u8, use_msf: bool) -> Option<Vec<u8>> {
    const ADR_CONTROL: u8 = 0x14; // Q sub-channel mode 1, data track
    const LEAD_OUT: u8 = 0xaa;
    let mut d = vec![0, 0, 1, 1];
    match format {
        0 => {
            if track > 1 && track != LEAD_OUT {
                return None;
            }
            if track <= 1 {
                d.extend([0, ADR_CONTROL, 1, 0]);
                d.extend(toc_addr(0, use_msf));
            }
            d.extend([0, ADR_CONTROL, LEAD_OUT, 0]);
            d.extend(toc_addr(blocks, use_msf));
        }
        1 => {
            d.extend([0, ADR_CONTROL, 1, 0]);
            d.extend(toc_addr(0, use_msf));
        }
        2 => {
            let lo = msf(blocks);
            let t1 = msf(0);
            for (point, p) in [
                (0xa0, [1, 0x00, 0]),
                (0xa1, [1, 0, 0]),
                (0xa2, lo),
                (0x01, t1),
            ] {
                d.extend([1, ADR_CONTROL, 0, point, 0, 0, 0, 0]);
                d.extend(p);
            }
        }
        _ => return None,
    }
    let len = (d.len() - 2) as u16;
    d[0..2].copy_from_slice(&len.to_be_bytes());
    Some(d)
}

/// MODE SENSE(10) for page 01h (read error recovery), 2Ah (capabilities) or 3Fh (both).
fn mode_sense(st: &DriveState, pc: u8, page: u8, subpage: u8) -> Option<Vec<u8>> {
    if subpage != 0 && subpage != 0xff {
        return None;
    }
    let changeable = pc == 1;
    let recovery = || {
        let mut p = vec![0x01, 0x0a, 0, 5, 0, 0, 0, 0, 5, 0, 0, 0];
        if changeable {
            p[2..].fill(0);
        }
        p
    };
    let caps = || {
        let mut p = vec![0u8; 22];
        p[0] = 0x2a;
        p[1] = 0x14;
        if !changeable {
            p[2] = 0x0b; // reads CD-R, CD-RW, DVD-ROM
            p[4] = 0x50; // mode 2 form 1, multi-session
            p[6] = 0x29 | (u8::from(st.atapi.locked) << 1); // tray, eject, lock, lock state
            p[8..10].copy_from_slice(&READ_SPEED_KBS.to_be_bytes());
            p[12..14].copy_from_slice(&512u16.to_be_bytes()); // buffer KiB
            p[14..16].copy_from_slice(&READ_SPEED_KBS.to_be_bytes());
        }
        p
    };
    let mut d = vec![0u8; 8];
    match page {
        0x01 => d.extend(recovery()),
        0x2a => d.extend(caps()),
        0x3f => {
            d.extend(recovery());
            d.extend(caps());
        }
        _ => return None,
    }
    let len = (d.len() - 2) as u16;
    d[0..2].copy_from_slice(&len.to_be_bytes());
    Some(d)
}

/// GET CONFIGURATION: feature descriptors from `start`, all (RT 0), current (RT 1) or one (RT 2).
fn get_configuration(st: &DriveState, blocks: u64, rt: u8, start: u16) -> Vec<u8> {
    let loaded = st.atapi.loaded;
    let dvd = blocks > CD_MAX_BLOCKS;
    let current = match (loaded, dvd) {
        (false, _) => profile::NONE,
        (true, true) => profile::DVD_ROM,
        (true, false) => profile::CD_ROM,
    };
    // (code, version, persistent, current, payload)
    let mut profiles = Vec::new();
    for p in [profile::DVD_ROM, profile::CD_ROM] {
        profiles.extend(p.to_be_bytes());
        profiles.extend([u8::from(p == current), 0]);
    }
    let mut random = CD_BLOCK.to_be_bytes().to_vec();
    random.extend(if dvd { 16u16 } else { 1 }.to_be_bytes());
    random.extend([0, 0]);
    let features: [(u16, u8, bool, bool, Vec<u8>); 8] = [
        (0x0000, 0, true, true, profiles),
        (0x0001, 2, true, true, vec![0, 0, 0, 2, 0, 0, 0, 0]), // Core: ATAPI interface
        (0x0002, 1, true, true, vec![0x02, 0, 0, 0]),          // Morphing: OCEvent
        (0x0003, 0, true, true, vec![0x39, 0, 0, 0]),          // Removable: tray, load, eject, lock
        (0x0010, 0, false, loaded, random),                    // Random Readable
        (0x001e, 2, false, loaded && !dvd, vec![0; 4]),        // CD Read
        (0x001f, 0, false, loaded && dvd, vec![0; 4]),         // DVD Read
        (0x0100, 0, true, true, vec![]),                       // Power Management
    ];
    let mut d = vec![0u8; 8];
    d[6..8].copy_from_slice(&current.to_be_bytes());
    for (code, version, persistent, cur, payload) in features {
        let wanted = match rt {
            0 => code >= start,
            1 => code >= start && cur,
            _ => code == start,
        };
        if wanted {
            d.extend(code.to_be_bytes());
            d.push((version << 2) | (u8::from(persistent) << 1) | u8::from(cur));
            d.push(payload.len() as u8);
            d.extend(payload);
        }
    }
    let len = (d.len() - 4) as u32;
    d[0..4].copy_from_slice(&len.to_be_bytes());
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msf_and_toc() {
        assert_eq!(msf(0), [0, 2, 0]);
        assert_eq!(msf(4500 - 150), [1, 0, 0]);
        let t = read_toc(1000, 0, 0, false).unwrap();
        assert_eq!(t.len(), 20);
        assert_eq!(&t[0..4], &[0, 18, 1, 1]);
        assert_eq!(&t[16..20], &1000u32.to_be_bytes());
        assert_eq!(read_toc(1000, 0, 0xaa, true).unwrap().len(), 12);
        assert!(read_toc(1000, 0, 2, false).is_none());
        assert_eq!(read_toc(1000, 2, 0, false).unwrap().len(), 48);
        assert!(read_toc(1000, 5, 0, false).is_none());
    }
}
