//! Native Command Queuing (SATA 3.x §13.6, ACS-4 §7.20–7.21, §7.43): decoding the FPDMA
//! commands and the NCQ error condition.
//!
//! Up to 32 queued commands run at once, each identified by its tag (which AHCI requires to equal
//! the command slot) and completed by a Set Device Bits FIS. When one fails, the device reports
//! the error through Set Device Bits with ERR, stops completing the others, and keeps the failed
//! command's tag and registers in the NCQ Command Error log (10h) until the host reads it. That
//! pending error is part of the drive's state (`drive::NcqError`), which the slot code sets when
//! it reports the failure.

use crate::drive::{DriveInfo, DriveState, NcqError, PowerMode};
use crate::fis::H2dRegisterFis;
use crate::identify::DSM_MAX_BLOCKS;
use crate::plan::{Action, Plan, Proto};
use crate::reply::{self, check_range, fail};
use crate::spec::{cmd, error};

/// SEND FPDMA QUEUED subcommand: DATA SET MANAGEMENT.
pub const SEND_DSM: u8 = 0x00;
/// Auxiliary bit selecting the TRIM function of queued DATA SET MANAGEMENT.
pub const AUX_TRIM: u32 = 1 << 0;
/// Device register bit 7 of READ/WRITE FPDMA QUEUED: forced unit access.
pub const DEVICE_FUA: u8 = 1 << 7;
/// NCQ Command Error log byte 0: no queued command failed (NQ).
pub const LOG_NQ: u8 = 1 << 7;

/// The tag field of an FPDMA command (Count 7:3).
pub fn tag_of(fis: &H2dRegisterFis) -> u8 {
    fis.count >> 3
}

/// Decode a queued command arriving in `slot`.
pub fn prepare(info: &DriveInfo, st: &mut DriveState, fis: &H2dRegisterFis, slot: u8) -> Plan {
    let proto = Proto::Ncq { tag: slot };
    let abort = || Plan::done(reply::abort(), proto);
    // While an NCQ error is outstanding the device aborts queued commands (ACS-4 §7.21.2), and a
    // tag that is not its slot cannot be completed through SActive, so it is refused too.
    if st.ncq_error.is_some() || tag_of(fis) != slot {
        return abort();
    }
    match fis.command {
        cmd::READ_FPDMA | cmd::WRITE_FPDMA => {
            let write = fis.command == cmd::WRITE_FPDMA;
            let count = match fis.features16() {
                0 => 65536,
                n => u64::from(n),
            };
            let lba = fis.lba48();
            if let Err(tf) = check_range(info, lba, count) {
                return Plan::done(tf, proto);
            }
            if write && info.read_only {
                return Plan::done(fail(error::ABRT, lba), proto);
            }
            st.power = PowerMode::Active;
            let sector = u64::from(info.logical);
            let (offset, len) = (lba * sector, count * sector);
            let action = if write {
                Action::Write {
                    offset,
                    len,
                    lba,
                    flush: fis.device & DEVICE_FUA != 0 || !st.wce,
                }
            } else {
                Action::Read { offset, len, lba }
            };
            Plan { action, proto }
        }
        cmd::SEND_FPDMA => {
            let blocks = fis.features16();
            let queued_trim = fis.count_exp & 0x1f == SEND_DSM && fis.aux.get() & AUX_TRIM != 0;
            if !queued_trim || !info.trim || blocks == 0 || blocks > DSM_MAX_BLOCKS {
                return abort();
            }
            Plan {
                action: Action::Trim {
                    len: u64::from(blocks) * 512,
                },
                proto,
            }
        }
        _ => abort(), // NCQ NON-DATA and RECEIVE FPDMA QUEUED are not offered
    }
}

/// The NCQ Command Error log page (ACS-4 §9.13): the failed tag and its registers, or NQ when
/// there is nothing to report. Byte 511 is the checksum.
pub fn error_log(err: Option<&NcqError>) -> Vec<u8> {
    let mut p = vec![0u8; 512];
    match err {
        None => p[0] = LOG_NQ,
        Some(e) => {
            let l = e.tf.lba.to_le_bytes();
            p[0] = e.tag & 0x1f;
            p[2] = e.tf.status;
            p[3] = e.tf.error;
            p[4..7].copy_from_slice(&l[0..3]);
            p[7] = e.tf.device;
            p[8..11].copy_from_slice(&l[3..6]);
            p[12..14].copy_from_slice(&e.tf.count.to_le_bytes());
        }
    }
    let sum = p[..511].iter().fold(0u8, |a, b| a.wrapping_add(*b));
    p[511] = 0u8.wrapping_sub(sum);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_log_layout() {
        let e = NcqError {
            tag: 7,
            tf: fail(error::IDNF, 0x0102_0304_0506),
        };
        let p = error_log(Some(&e));
        assert_eq!(p[0], 7);
        assert_eq!((p[2], p[3]), (0x41, 0x10));
        assert_eq!(&p[4..11], &[6, 5, 4, 0x40, 3, 2, 1]);
        assert_eq!(p.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(error_log(None)[0], LOG_NQ);
    }
}
