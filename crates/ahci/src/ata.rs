//! The ATA command set (ACS-4) for non-queued commands: decoding a command FIS against the
//! drive's settings into a [`Plan`], and the status/error encodings every command shares.
//!
//! Decoding runs under the device lock and changes settings (write cache, power mode, SMART)
//! directly; anything that touches the medium becomes an [`Action`] for the I/O job. Unknown or
//! malformed commands abort with ABRT, range errors report IDNF, as ACS-4 §6.2 prescribes.

use crate::atapi;
use crate::drive::{DriveInfo, DriveKind, DriveState, PowerMode, MAX_MULTIPLE};
use crate::fis::{H2dRegisterFis, TaskFile};
use crate::identify::{self, DSM_MAX_BLOCKS, IDENTIFY_BYTES};
use crate::log;
use crate::ncq;
use crate::plan::{Action, Plan, Proto};

/// ATA command opcodes.
#[allow(dead_code)] // the complete table, whether or not every entry is used yet
pub mod cmd {
    /// NOP (always aborts).
    pub const NOP: u8 = 0x00;
    /// DATA SET MANAGEMENT (TRIM).
    pub const DSM: u8 = 0x06;
    /// DEVICE RESET (PACKET devices).
    pub const DEVICE_RESET: u8 = 0x08;
    /// READ SECTOR(S).
    pub const READ_SECTORS: u8 = 0x20;
    /// READ SECTOR(S) EXT.
    pub const READ_SECTORS_EXT: u8 = 0x24;
    /// READ DMA EXT.
    pub const READ_DMA_EXT: u8 = 0x25;
    /// READ NATIVE MAX ADDRESS EXT.
    pub const READ_NATIVE_MAX_EXT: u8 = 0x27;
    /// READ MULTIPLE EXT.
    pub const READ_MULTIPLE_EXT: u8 = 0x29;
    /// READ LOG EXT.
    pub const READ_LOG_EXT: u8 = 0x2f;
    /// WRITE SECTOR(S).
    pub const WRITE_SECTORS: u8 = 0x30;
    /// WRITE SECTOR(S) EXT.
    pub const WRITE_SECTORS_EXT: u8 = 0x34;
    /// WRITE DMA EXT.
    pub const WRITE_DMA_EXT: u8 = 0x35;
    /// WRITE MULTIPLE EXT.
    pub const WRITE_MULTIPLE_EXT: u8 = 0x39;
    /// WRITE DMA FUA EXT.
    pub const WRITE_DMA_FUA_EXT: u8 = 0x3d;
    /// WRITE LOG EXT.
    pub const WRITE_LOG_EXT: u8 = 0x3f;
    /// READ VERIFY SECTOR(S).
    pub const READ_VERIFY: u8 = 0x40;
    /// READ VERIFY SECTOR(S) EXT.
    pub const READ_VERIFY_EXT: u8 = 0x42;
    /// READ LOG DMA EXT.
    pub const READ_LOG_DMA_EXT: u8 = 0x47;
    /// WRITE LOG DMA EXT.
    pub const WRITE_LOG_DMA_EXT: u8 = 0x57;
    /// READ FPDMA QUEUED.
    pub const READ_FPDMA: u8 = 0x60;
    /// WRITE FPDMA QUEUED.
    pub const WRITE_FPDMA: u8 = 0x61;
    /// NCQ NON-DATA.
    pub const NCQ_NON_DATA: u8 = 0x63;
    /// SEND FPDMA QUEUED.
    pub const SEND_FPDMA: u8 = 0x64;
    /// RECEIVE FPDMA QUEUED.
    pub const RECEIVE_FPDMA: u8 = 0x65;
    /// EXECUTE DEVICE DIAGNOSTIC.
    pub const EXEC_DIAGNOSTIC: u8 = 0x90;
    /// PACKET.
    pub const PACKET: u8 = 0xa0;
    /// IDENTIFY PACKET DEVICE.
    pub const IDENTIFY_PACKET: u8 = 0xa1;
    /// SMART.
    pub const SMART: u8 = 0xb0;
    /// READ MULTIPLE.
    pub const READ_MULTIPLE: u8 = 0xc4;
    /// WRITE MULTIPLE.
    pub const WRITE_MULTIPLE: u8 = 0xc5;
    /// SET MULTIPLE MODE.
    pub const SET_MULTIPLE: u8 = 0xc6;
    /// READ DMA.
    pub const READ_DMA: u8 = 0xc8;
    /// WRITE DMA.
    pub const WRITE_DMA: u8 = 0xca;
    /// WRITE MULTIPLE FUA EXT.
    pub const WRITE_MULTIPLE_FUA_EXT: u8 = 0xce;
    /// STANDBY IMMEDIATE.
    pub const STANDBY_IMMEDIATE: u8 = 0xe0;
    /// IDLE IMMEDIATE.
    pub const IDLE_IMMEDIATE: u8 = 0xe1;
    /// STANDBY.
    pub const STANDBY: u8 = 0xe2;
    /// IDLE.
    pub const IDLE: u8 = 0xe3;
    /// CHECK POWER MODE.
    pub const CHECK_POWER_MODE: u8 = 0xe5;
    /// FLUSH CACHE.
    pub const FLUSH_CACHE: u8 = 0xe7;
    /// FLUSH CACHE EXT.
    pub const FLUSH_CACHE_EXT: u8 = 0xea;
    /// IDENTIFY DEVICE.
    pub const IDENTIFY: u8 = 0xec;
    /// SET FEATURES.
    pub const SET_FEATURES: u8 = 0xef;
    /// READ NATIVE MAX ADDRESS.
    pub const READ_NATIVE_MAX: u8 = 0xf8;
}

/// Status register bits.
#[allow(dead_code)] // the complete table, whether or not every entry is used yet
pub mod status {
    /// Busy.
    pub const BSY: u8 = 0x80;
    /// Device ready.
    pub const DRDY: u8 = 0x40;
    /// Device fault.
    pub const DF: u8 = 0x20;
    /// Device seek complete / service (legacy, set with DRDY on success).
    pub const DSC: u8 = 0x10;
    /// Data request.
    pub const DRQ: u8 = 0x08;
    /// Error.
    pub const ERR: u8 = 0x01;
    /// Successful completion.
    pub const GOOD: u8 = DRDY | DSC;
    /// Failed completion.
    pub const FAILED: u8 = DRDY | ERR;
}

/// Error register bits.
#[allow(dead_code)] // the complete table, whether or not every entry is used yet
pub mod error {
    /// Interface CRC error.
    pub const ICRC: u8 = 0x80;
    /// Uncorrectable data error.
    pub const UNC: u8 = 0x40;
    /// ID not found (address out of range).
    pub const IDNF: u8 = 0x10;
    /// Command aborted.
    pub const ABRT: u8 = 0x04;
    /// EXECUTE DEVICE DIAGNOSTIC / reset code: device 0 passed.
    pub const DIAG_PASSED: u8 = 0x01;
}

/// SET FEATURES subcommands (Features register).
#[allow(dead_code)] // the complete table, whether or not every entry is used yet
pub mod feature {
    /// Enable volatile write cache.
    pub const ENABLE_WRITE_CACHE: u8 = 0x02;
    /// Set transfer mode (Count holds the mode).
    pub const SET_TRANSFER_MODE: u8 = 0x03;
    /// Enable a SATA feature (Count holds the feature).
    pub const ENABLE_SATA_FEATURE: u8 = 0x10;
    /// Disable read look-ahead.
    pub const DISABLE_LOOK_AHEAD: u8 = 0x55;
    /// Disable reverting to power-on defaults.
    pub const DISABLE_REVERT: u8 = 0x66;
    /// Disable volatile write cache.
    pub const DISABLE_WRITE_CACHE: u8 = 0x82;
    /// Disable a SATA feature.
    pub const DISABLE_SATA_FEATURE: u8 = 0x90;
    /// Enable read look-ahead.
    pub const ENABLE_LOOK_AHEAD: u8 = 0xaa;
    /// Enable reverting to power-on defaults.
    pub const ENABLE_REVERT: u8 = 0xcc;
    /// SATA feature: guaranteed in-order data delivery.
    pub const SATA_IN_ORDER: u8 = 0x04;
    /// SATA feature: software settings preservation.
    pub const SATA_SSP: u8 = 0x06;
}

/// SMART subcommands (Features register) and the key in LBA 23:8.
#[allow(dead_code)] // the complete table, whether or not every entry is used yet
pub mod smart {
    /// SMART READ DATA.
    pub const READ_DATA: u8 = 0xd0;
    /// SMART READ ATTRIBUTE THRESHOLDS.
    pub const READ_THRESHOLDS: u8 = 0xd1;
    /// SMART ENABLE/DISABLE ATTRIBUTE AUTOSAVE.
    pub const AUTOSAVE: u8 = 0xd2;
    /// SMART READ LOG.
    pub const READ_LOG: u8 = 0xd5;
    /// SMART ENABLE OPERATIONS.
    pub const ENABLE: u8 = 0xd8;
    /// SMART DISABLE OPERATIONS.
    pub const DISABLE: u8 = 0xd9;
    /// SMART RETURN STATUS.
    pub const RETURN_STATUS: u8 = 0xda;
    /// LBA 15:8 of every SMART command.
    pub const LBA_MID: u8 = 0x4f;
    /// LBA 23:16 of every SMART command.
    pub const LBA_HIGH: u8 = 0xc2;
    /// AUTOSAVE Count: enable.
    pub const AUTOSAVE_ON: u8 = 0xf1;
}

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

/// True for the FPDMA opcodes, which the HBA runs as queued commands.
pub fn is_queued(command: u8) -> bool {
    matches!(
        command,
        cmd::READ_FPDMA
            | cmd::WRITE_FPDMA
            | cmd::NCQ_NON_DATA
            | cmd::SEND_FPDMA
            | cmd::RECEIVE_FPDMA
    )
}

/// Decode a non-queued command for a disk or for the ATA side of a packet device.
pub fn prepare(
    info: &DriveInfo,
    st: &mut DriveState,
    fis: &H2dRegisterFis,
    acmd: &[u8; 16],
    slot: u8,
) -> Plan {
    if info.kind == DriveKind::Cdrom {
        return prepare_packet_device(info, st, fis, acmd);
    }
    if is_queued(fis.command) {
        return ncq::prepare(info, st, fis, slot);
    }
    let nd = |tf| Plan::done(tf, Proto::NonData);
    let sector = info.logical;
    match fis.command {
        cmd::IDENTIFY => data_in(
            identify::to_bytes(&identify::identify_device(info, st)),
            pio_in(IDENTIFY_BYTES as u32),
        ),
        cmd::READ_DMA | cmd::READ_DMA_EXT => rw(info, st, fis, false, false, Proto::Dma),
        cmd::WRITE_DMA | cmd::WRITE_DMA_EXT => rw(info, st, fis, true, false, Proto::Dma),
        cmd::WRITE_DMA_FUA_EXT => rw(info, st, fis, true, true, Proto::Dma),
        cmd::READ_SECTORS | cmd::READ_SECTORS_EXT => {
            rw(info, st, fis, false, false, pio_in(sector))
        }
        cmd::WRITE_SECTORS | cmd::WRITE_SECTORS_EXT => {
            rw(info, st, fis, true, false, Proto::PioOut { block: sector })
        }
        cmd::READ_MULTIPLE
        | cmd::READ_MULTIPLE_EXT
        | cmd::WRITE_MULTIPLE
        | cmd::WRITE_MULTIPLE_EXT
        | cmd::WRITE_MULTIPLE_FUA_EXT => {
            if st.multiple == 0 {
                return nd(abort());
            }
            let block = sector * u32::from(st.multiple);
            match fis.command {
                cmd::READ_MULTIPLE | cmd::READ_MULTIPLE_EXT => {
                    rw(info, st, fis, false, false, pio_in(block))
                }
                c => rw(
                    info,
                    st,
                    fis,
                    true,
                    c == cmd::WRITE_MULTIPLE_FUA_EXT,
                    Proto::PioOut { block },
                ),
            }
        }
        cmd::READ_VERIFY | cmd::READ_VERIFY_EXT => match range(info, fis) {
            Err(tf) => nd(tf),
            Ok((lba, count)) => {
                st.power = PowerMode::Active;
                let (offset, len) = (lba * u64::from(sector), count * u64::from(sector));
                Plan {
                    action: Action::Verify { offset, len, lba },
                    proto: Proto::NonData,
                }
            }
        },
        cmd::FLUSH_CACHE | cmd::FLUSH_CACHE_EXT => Plan {
            action: Action::Flush,
            proto: Proto::NonData,
        },
        cmd::DSM => dsm(info, fis),
        cmd::READ_LOG_EXT | cmd::READ_LOG_DMA_EXT => read_log(info, st, fis),
        cmd::WRITE_LOG_EXT | cmd::WRITE_LOG_DMA_EXT => nd(abort()), // every log here is read-only
        cmd::SET_FEATURES => set_features(st, fis),
        cmd::SET_MULTIPLE => {
            let n = fis.count;
            if n == 0 || (n.is_power_of_two() && n <= MAX_MULTIPLE) {
                st.multiple = n;
                nd(ok())
            } else {
                nd(abort())
            }
        }
        cmd::SMART => smart_cmd(info, st, fis),
        cmd::CHECK_POWER_MODE => nd(TaskFile {
            count: u16::from(st.power.code()),
            ..ok()
        }),
        cmd::IDLE | cmd::IDLE_IMMEDIATE => {
            st.power = PowerMode::Idle;
            nd(ok())
        }
        cmd::STANDBY | cmd::STANDBY_IMMEDIATE => {
            // The cache is written to the medium before the device spins down.
            st.power = PowerMode::Standby;
            Plan {
                action: Action::Flush,
                proto: Proto::NonData,
            }
        }
        cmd::READ_NATIVE_MAX => {
            let max = info.sectors.saturating_sub(1).min(0x0fff_ffff);
            nd(TaskFile {
                lba: max & 0xff_ffff,
                device: DEVICE_LBA | (max >> 24) as u8,
                ..ok()
            })
        }
        cmd::READ_NATIVE_MAX_EXT => nd(TaskFile {
            lba: info.sectors.saturating_sub(1),
            ..ok()
        }),
        cmd::EXEC_DIAGNOSTIC => nd(signature(info)),
        _ => nd(abort()), // NOP, DEVICE RESET (disk), PACKET (disk), unknown
    }
}

fn pio_in(block: u32) -> Proto {
    Proto::PioIn { block }
}

fn data_in(data: Vec<u8>, proto: Proto) -> Plan {
    Plan {
        action: Action::DataIn { data, tf: ok() },
        proto,
    }
}

/// Is the command a 48-bit one (EXT)? Decides LBA and Count widths.
fn is_ext(command: u8) -> bool {
    !matches!(
        command,
        cmd::READ_SECTORS
            | cmd::WRITE_SECTORS
            | cmd::READ_DMA
            | cmd::WRITE_DMA
            | cmd::READ_MULTIPLE
            | cmd::WRITE_MULTIPLE
            | cmd::READ_VERIFY
    )
}

/// LBA and sector count of a read/write/verify command, or IDNF when it leaves the medium.
fn range(info: &DriveInfo, fis: &H2dRegisterFis) -> Result<(u64, u64), TaskFile> {
    let (lba, count) = if is_ext(fis.command) {
        (
            fis.lba48(),
            match fis.count16() {
                0 => 65536,
                n => u64::from(n),
            },
        )
    } else {
        (
            fis.lba28(),
            match fis.count {
                0 => 256,
                n => u64::from(n),
            },
        )
    };
    check_range(info, lba, count)?;
    Ok((lba, count))
}

/// IDNF unless `[lba, lba + count)` lies on the medium.
pub fn check_range(info: &DriveInfo, lba: u64, count: u64) -> Result<(), TaskFile> {
    match lba.checked_add(count) {
        Some(end) if end <= info.sectors => Ok(()),
        _ => Err(fail(error::IDNF, lba)),
    }
}

/// A read or write of the medium.
fn rw(
    info: &DriveInfo,
    st: &mut DriveState,
    fis: &H2dRegisterFis,
    write: bool,
    fua: bool,
    proto: Proto,
) -> Plan {
    let (lba, count) = match range(info, fis) {
        Ok(r) => r,
        Err(tf) => return Plan::done(tf, proto),
    };
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
            flush: fua || !st.wce,
        }
    } else {
        Action::Read { offset, len, lba }
    };
    Plan { action, proto }
}

/// DATA SET MANAGEMENT: only the TRIM function, with at most [`DSM_MAX_BLOCKS`] blocks of ranges.
fn dsm(info: &DriveInfo, fis: &H2dRegisterFis) -> Plan {
    let blocks = fis.count16();
    if fis.features & 1 == 0 || !info.trim || blocks == 0 || blocks > DSM_MAX_BLOCKS {
        return Plan::done(abort(), Proto::Dma);
    }
    Plan {
        action: Action::Trim {
            len: u64::from(blocks) * 512,
        },
        proto: Proto::Dma,
    }
}

/// READ LOG EXT / READ LOG DMA EXT.
fn read_log(info: &DriveInfo, st: &mut DriveState, fis: &H2dRegisterFis) -> Plan {
    let proto = if fis.command == cmd::READ_LOG_DMA_EXT {
        Proto::Dma
    } else {
        pio_in(log::PAGE as u32)
    };
    let log_addr = fis.lba0;
    let page = u16::from_le_bytes([fis.lba1, fis.lba4]);
    let count = fis.count16();
    let data = if log_addr == log::addr::NCQ_ERROR {
        // Reading the NCQ Command Error log ends the NCQ error condition (ACS-4 §9.13).
        (page == 0 && count == 1).then(|| ncq::error_log(st.ncq_error.take().as_ref()))
    } else {
        log::read_log(info, st, log_addr, page, count)
    };
    match data {
        Some(d) => data_in(d, proto),
        None => Plan::done(abort(), proto),
    }
}

/// SET FEATURES.
fn set_features(st: &mut DriveState, fis: &H2dRegisterFis) -> Plan {
    let nd = |tf| Plan::done(tf, Proto::NonData);
    match fis.features {
        feature::ENABLE_WRITE_CACHE => st.wce = true,
        feature::DISABLE_WRITE_CACHE => {
            // Cached data becomes durable before write-through mode takes effect.
            st.wce = false;
            return Plan {
                action: Action::Flush,
                proto: Proto::NonData,
            };
        }
        feature::SET_TRANSFER_MODE => {
            let mode = fis.count;
            let valid = matches!(mode, 0x00 | 0x01 | 0x08..=0x0c | 0x20..=0x22 | 0x40..=0x46);
            if !valid {
                return nd(abort());
            }
            st.xfer_mode = mode;
        }
        feature::ENABLE_LOOK_AHEAD => st.look_ahead = true,
        feature::DISABLE_LOOK_AHEAD => st.look_ahead = false,
        feature::ENABLE_REVERT | feature::DISABLE_REVERT => {}
        feature::ENABLE_SATA_FEATURE
            if matches!(fis.count, feature::SATA_IN_ORDER | feature::SATA_SSP) => {}
        _ => return nd(abort()),
    }
    nd(ok())
}

/// SMART: READ DATA, READ THRESHOLDS, READ LOG (directory), AUTOSAVE, ENABLE, DISABLE,
/// RETURN STATUS.
fn smart_cmd(info: &DriveInfo, st: &mut DriveState, fis: &H2dRegisterFis) -> Plan {
    let nd = |tf| Plan::done(tf, Proto::NonData);
    if fis.lba1 != smart::LBA_MID || fis.lba2 != smart::LBA_HIGH {
        return nd(abort());
    }
    if !st.smart && fis.features != smart::ENABLE {
        return nd(abort());
    }
    match fis.features {
        smart::READ_DATA => data_in(log::smart_data(&info.counters), pio_in(512)),
        smart::READ_THRESHOLDS => data_in(log::smart_thresholds(&info.counters), pio_in(512)),
        // The SMART log directory (log address 0, one page) is the only SMART log: error and
        // self-test logging are not offered (SMART READ DATA says so), so others abort.
        smart::READ_LOG if fis.lba0 == 0 && fis.count == 1 => {
            data_in(log::smart_log_directory(), pio_in(512))
        }
        smart::AUTOSAVE => match fis.count {
            smart::AUTOSAVE_ON => {
                st.autosave = true;
                nd(ok())
            }
            0 => {
                st.autosave = false;
                nd(ok())
            }
            _ => nd(abort()),
        },
        smart::ENABLE => {
            st.smart = true;
            nd(ok())
        }
        smart::DISABLE => {
            st.smart = false;
            nd(ok())
        }
        // No threshold is ever exceeded: report the "good" key in LBA 23:8.
        smart::RETURN_STATUS => nd(TaskFile {
            lba: u64::from(smart::LBA_MID) << 8 | u64::from(smart::LBA_HIGH) << 16,
            ..ok()
        }),
        _ => nd(abort()),
    }
}

/// ATA commands a PACKET device accepts (ACS-4 §4.3): IDENTIFY PACKET DEVICE, PACKET, DEVICE
/// RESET, EXECUTE DEVICE DIAGNOSTIC, power management and SET FEATURES; IDENTIFY DEVICE aborts
/// with the PACKET signature so the host learns what it is talking to.
fn prepare_packet_device(
    info: &DriveInfo,
    st: &mut DriveState,
    fis: &H2dRegisterFis,
    acmd: &[u8; 16],
) -> Plan {
    let nd = |tf| Plan::done(tf, Proto::NonData);
    match fis.command {
        cmd::PACKET => atapi::prepare(info, st, fis, acmd),
        cmd::IDENTIFY_PACKET => data_in(
            identify::to_bytes(&identify::identify_packet_device(info, st)),
            pio_in(IDENTIFY_BYTES as u32),
        ),
        cmd::IDENTIFY => nd(TaskFile {
            status: status::FAILED,
            error: error::ABRT,
            ..signature(info)
        }),
        cmd::DEVICE_RESET => {
            st.reset();
            st.atapi.reset();
            nd(signature(info))
        }
        cmd::EXEC_DIAGNOSTIC => nd(signature(info)),
        cmd::SET_FEATURES => set_features(st, fis),
        cmd::CHECK_POWER_MODE => nd(TaskFile {
            count: u16::from(st.power.code()),
            ..ok()
        }),
        cmd::IDLE_IMMEDIATE => {
            st.power = PowerMode::Idle;
            nd(ok())
        }
        cmd::STANDBY_IMMEDIATE => {
            st.power = PowerMode::Standby;
            nd(ok())
        }
        _ => nd(abort()),
    }
}
