//! The ATA command set (ACS-4) for non-queued commands: decoding a command FIS against the
//! drive's settings into a [`Plan`]. Every command enters here: queued ones go on to `ncq` and a
//! packet device's to its ATA subset and `atapi`, so this module sits above the other command
//! sets and nothing below it calls back up.
//!
//! Decoding runs under the device lock and changes settings (write cache, power mode, SMART)
//! directly; anything that touches the medium becomes an [`Action`] for the I/O job. Unknown or
//! malformed commands abort with ABRT, range errors report IDNF, as ACS-4 §6.2 prescribes.

use crate::atapi;
use crate::drive::{DriveInfo, DriveKind, DriveState, PowerMode, SelfTestEntry, MAX_MULTIPLE};
use crate::fis::{H2dRegisterFis, TaskFile};
use crate::identify::{self, DSM_MAX_BLOCKS, IDENTIFY_BYTES};
use crate::logpage;
use crate::ncq;
use crate::plan::{Action, Plan, Proto};
use crate::reply::{abort, check_range, fail, ok, signature, DEVICE_LBA};
use crate::spec::{cmd, error, feature, smart, status};

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

/// The LBA ranges in a DATA SET MANAGEMENT range list (non-queued or queued): 8-byte entries of
/// LBA (47:0) and sector count (63:48), with zero-count entries skipped as padding. A partial
/// trailing entry is ignored.
pub fn dsm_ranges(list: &[u8]) -> impl Iterator<Item = (u64, u64)> + '_ {
    list.chunks_exact(8).filter_map(|e| {
        let v = u64::from_le_bytes(e.try_into().unwrap_or([0; 8]));
        let (lba, cnt) = (v & 0xffff_ffff_ffff, v >> 48);
        (cnt != 0).then_some((lba, cnt))
    })
}

/// READ LOG EXT / READ LOG DMA EXT.
fn read_log(info: &DriveInfo, st: &mut DriveState, fis: &H2dRegisterFis) -> Plan {
    let proto = if fis.command == cmd::READ_LOG_DMA_EXT {
        Proto::Dma
    } else {
        pio_in(logpage::PAGE as u32)
    };
    let log_addr = fis.lba0;
    let page = u16::from_le_bytes([fis.lba1, fis.lba4]);
    let count = fis.count16();
    let data = if log_addr == logpage::addr::NCQ_ERROR {
        // Reading the NCQ Command Error log ends the NCQ error condition (ACS-4 §9.13).
        (page == 0 && count == 1).then(|| ncq::error_log(st.ncq_error.take().as_ref()))
    } else {
        logpage::read_log(info, st, log_addr, page, count)
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

/// SMART: READ DATA, READ THRESHOLDS, EXECUTE OFF-LINE IMMEDIATE, READ LOG (directory, error
/// and self-test logs), AUTOSAVE, ENABLE, DISABLE, RETURN STATUS.
fn smart_cmd(info: &DriveInfo, st: &mut DriveState, fis: &H2dRegisterFis) -> Plan {
    let nd = |tf| Plan::done(tf, Proto::NonData);
    if fis.lba1 != smart::LBA_MID || fis.lba2 != smart::LBA_HIGH {
        return nd(abort());
    }
    if !st.smart && fis.features != smart::ENABLE {
        return nd(abort());
    }
    match fis.features {
        smart::READ_DATA => data_in(
            logpage::smart_data(&info.counters, &st.self_tests),
            pio_in(512),
        ),
        smart::READ_THRESHOLDS => data_in(logpage::smart_thresholds(&info.counters), pio_in(512)),
        smart::EXEC_OFFLINE => nd(exec_offline(info, st, fis.lba0)),
        smart::READ_LOG => match logpage::smart_read_log(&st.self_tests, fis.lba0, fis.count) {
            Some(d) => data_in(d, pio_in(512)),
            None => nd(abort()),
        },
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

/// SMART EXECUTE OFF-LINE IMMEDIATE: the off-line routine and the short and extended
/// self-tests, in off-line or captive mode, finish before the command completes (an image has
/// no heads to seek or surface to scan); conveyance and selective self-tests are not offered
/// (SMART data byte 367) and abort, as do reserved subcommands.
fn exec_offline(info: &DriveInfo, st: &mut DriveState, sub: u8) -> TaskFile {
    use smart::offline;
    use smart::selftest_status::COMPLETED;
    match sub {
        // Off-line data collection "completed without error".
        offline::ROUTINE => st.self_tests.offline_status = 0x02,
        offline::SHORT | offline::EXTENDED | offline::SHORT_CAPTIVE | offline::EXTENDED_CAPTIVE => {
            let hours = info.counters.created.elapsed().as_secs() / 3600;
            st.self_tests.record(SelfTestEntry {
                subcommand: sub,
                status: COMPLETED << 4,
                hours: hours.min(u64::from(u16::MAX)) as u16,
            });
        }
        // Nothing runs in the background to abort.
        offline::ABORT => {}
        _ => return abort(),
    }
    ok()
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
