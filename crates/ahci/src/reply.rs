//! The outputs (status, error and the other registers) that ATA commands complete with.
//!
//! Non-queued and queued decoding, the slot code that reports I/O results, and the port's reset
//! path all finish commands the same way; keeping these encodings below the command sets lets
//! each of them share one definition instead of reaching into another command set.

use crate::drive::{DriveInfo, DriveKind};
use crate::fis::TaskFile;
use crate::spec::{error, status};

/// Device register value with the LBA bit set (what a normal completion reports).
pub const DEVICE_LBA: u8 = 0x40;

/// Outputs of a successful command.
pub fn ok() -> TaskFile {
    TaskFile {
        status: status::GOOD,
        device: DEVICE_LBA,
        ..Default::default()
    }
}

/// Outputs of a failed command with `error` bits, naming `lba`.
pub fn fail(error: u8, lba: u64) -> TaskFile {
    TaskFile {
        status: status::FAILED,
        error,
        lba,
        device: DEVICE_LBA,
        ..Default::default()
    }
}

/// Outputs of an aborted command.
pub fn abort() -> TaskFile {
    fail(error::ABRT, 0)
}

/// The signature outputs a device reports after reset or diagnostics (ACS-4 §9.1).
pub fn signature(info: &DriveInfo) -> TaskFile {
    let sig = info.signature();
    TaskFile {
        status: if info.kind == DriveKind::Disk {
            status::GOOD
        } else {
            0
        },
        error: error::DIAG_PASSED,
        count: (sig & 0xff) as u16,
        lba: u64::from(sig >> 8),
        device: 0,
    }
}

/// IDNF unless `[lba, lba + count)` lies on the medium.
pub fn check_range(info: &DriveInfo, lba: u64, count: u64) -> Result<(), TaskFile> {
    match lba.checked_add(count) {
        Some(end) if end <= info.sectors => Ok(()),
        _ => Err(fail(error::IDNF, lba)),
    }
}
