//! IDENTIFY DEVICE and IDENTIFY PACKET DEVICE data (ACS-4 §9.11, Table 45 and §7.13).
//!
//! Every word that states a capability is derived from what the model really implements and from
//! the drive's current settings, so a guest that trusts these words (Linux libata, hdparm,
//! smartctl) only ever issues commands the model handles. Words are named by their ACS-4 number.

use crate::drive::{DriveInfo, DriveState, MAX_MULTIPLE};

/// IDENTIFY data is 256 words.
pub const IDENTIFY_WORDS: usize = 256;
/// IDENTIFY data in bytes.
pub const IDENTIFY_BYTES: usize = 512;
/// NCQ queue depth (IDENTIFY word 75 reports depth - 1).
pub const NCQ_DEPTH: u16 = 32;
/// Maximum 512-byte blocks of LBA range entries per DATA SET MANAGEMENT command (word 105).
pub const DSM_MAX_BLOCKS: u16 = 8;
/// Largest 28-bit capacity (word 60–61 saturates here).
const LBA28_MAX: u64 = 0x0fff_ffff;

/// Word numbers used below.
mod w {
    pub const GENERAL_CONFIG: usize = 0;
    pub const CYLINDERS: usize = 1;
    pub const SPECIFIC_CONFIG: usize = 2;
    pub const HEADS: usize = 3;
    pub const SECTORS_PER_TRACK: usize = 6;
    pub const SERIAL: usize = 10;
    pub const FIRMWARE: usize = 23;
    pub const MODEL: usize = 27;
    pub const MAX_MULTIPLE: usize = 47;
    pub const TRUSTED: usize = 48;
    pub const CAPABILITIES: usize = 49;
    pub const CAPABILITIES2: usize = 50;
    pub const FIELD_VALID: usize = 53;
    pub const MULTIPLE: usize = 59;
    pub const LBA28: usize = 60;
    pub const MWDMA: usize = 63;
    pub const PIO_MODES: usize = 64;
    pub const MWDMA_MIN_CYCLE: usize = 65;
    pub const MWDMA_REC_CYCLE: usize = 66;
    pub const PIO_MIN_CYCLE: usize = 67;
    pub const PIO_MIN_CYCLE_IORDY: usize = 68;
    pub const ADDITIONAL_SUPPORTED: usize = 69;
    pub const QUEUE_DEPTH: usize = 75;
    pub const SATA_CAP: usize = 76;
    pub const SATA_CAP2: usize = 77;
    pub const SATA_FEAT_SUPPORTED: usize = 78;
    pub const SATA_FEAT_ENABLED: usize = 79;
    pub const MAJOR_VERSION: usize = 80;
    pub const MINOR_VERSION: usize = 81;
    pub const CMD_SET_SUPPORTED: usize = 82;
    pub const CMD_SET_SUPPORTED2: usize = 83;
    pub const CMD_SET_SUPPORTED_EXT: usize = 84;
    pub const CMD_SET_ENABLED: usize = 85;
    pub const CMD_SET_ENABLED2: usize = 86;
    pub const CMD_SET_DEFAULT: usize = 87;
    pub const UDMA: usize = 88;
    pub const LBA48: usize = 100;
    pub const DSM_MAX: usize = 105;
    pub const SECTOR_SIZE: usize = 106;
    pub const WWN: usize = 108;
    pub const LOGICAL_SECTOR_WORDS: usize = 117;
    pub const CMD_SET_SUPPORTED3: usize = 119;
    pub const CMD_SET_ENABLED3: usize = 120;
    pub const DSM: usize = 169;
    pub const ALIGNMENT: usize = 209;
    pub const ROTATION_RATE: usize = 217;
    pub const TRANSPORT_MAJOR: usize = 222;
    pub const EXT_SECTORS: usize = 230;
    pub const INTEGRITY: usize = 255;
}

/// Bits of the words above.
mod bit {
    // word 0
    pub const ATAPI_DEVICE: u16 = 0x8000;
    pub const ATAPI_CDROM: u16 = 0x05 << 8;
    pub const REMOVABLE: u16 = 1 << 7;
    pub const DRQ_50US: u16 = 2 << 5;
    // word 2: device does not need SET FEATURES to spin up, IDENTIFY response complete.
    pub const SPECIFIC_COMPLETE: u16 = 0xc837;
    // word 49
    pub const CAP_IORDY: u16 = 1 << 11;
    pub const CAP_IORDY_DISABLE: u16 = 1 << 10;
    pub const CAP_LBA: u16 = 1 << 9;
    pub const CAP_DMA: u16 = 1 << 8;
    // word 48, 50, 83, 84, 87, 119, 120, 106, 209: bit 14 shall be one (and 15 zero).
    pub const VALID: u16 = 1 << 14;
    // word 53
    pub const FIELD_88_VALID: u16 = 1 << 2;
    pub const FIELD_64_70_VALID: u16 = 1 << 1;
    // word 59
    pub const MULTIPLE_VALID: u16 = 1 << 8;
    // word 69
    pub const DRAT: u16 = 1 << 14;
    pub const RZAT: u16 = 1 << 5;
    pub const EXT_SECTORS_SUPPORTED: u16 = 1 << 3;
    // word 76
    pub const SATA_GEN1: u16 = 1 << 1;
    pub const SATA_GEN2: u16 = 1 << 2;
    pub const SATA_GEN3: u16 = 1 << 3;
    pub const SATA_NCQ: u16 = 1 << 8;
    pub const SATA_HIPM: u16 = 1 << 9;
    pub const SATA_READ_LOG_DMA: u16 = 1 << 15;
    // word 77: current speed Gen3 in bits 3:1, SEND/RECEIVE FPDMA QUEUED
    pub const SATA_SPEED_GEN3: u16 = 3 << 1;
    pub const SATA_SEND_RECV_FPDMA: u16 = 1 << 6;
    // word 78/79
    pub const SATA_IN_ORDER: u16 = 1 << 4;
    pub const SATA_SSP: u16 = 1 << 6;
    // word 82/85
    pub const NOP: u16 = 1 << 14;
    pub const DEVICE_RESET: u16 = 1 << 9;
    pub const LOOK_AHEAD: u16 = 1 << 6;
    pub const WRITE_CACHE: u16 = 1 << 5;
    pub const PACKET: u16 = 1 << 4;
    pub const POWER_MGMT: u16 = 1 << 3;
    pub const SMART: u16 = 1 << 0;
    // word 83/86
    pub const FLUSH_EXT: u16 = 1 << 13;
    pub const FLUSH: u16 = 1 << 12;
    pub const LBA48: u16 = 1 << 10;
    pub const WORDS_119_120_VALID: u16 = 1 << 15;
    // word 84/87
    pub const WWN: u16 = 1 << 8;
    pub const FUA: u16 = 1 << 6;
    pub const GPL: u16 = 1 << 5;
    pub const SMART_SELF_TEST: u16 = 1 << 1;
    pub const SMART_ERROR_LOG: u16 = 1 << 0;
    // word 119/120
    pub const READ_LOG_DMA: u16 = 1 << 3;
    // word 106
    pub const MULTIPLE_LOGICAL: u16 = 1 << 13;
    pub const LONG_LOGICAL: u16 = 1 << 12;
    // word 169
    pub const TRIM: u16 = 1 << 0;
    // word 217
    pub const NON_ROTATING: u16 = 1;
    // word 222: serial transport, ATA8-AST through SATA 3.2
    pub const TRANSPORT_SATA_3_2: u16 = 0x1000 | 0x00ff;
    // word 80: ATA/ATAPI-5 through ACS-4
    pub const MAJOR_ATA5_TO_ACS4: u16 = 0x0fe0;
    // word 255
    pub const INTEGRITY_SIGNATURE: u16 = 0xa5;
}

/// Place an ATA string: two characters per word, first character in the high byte, padded with
/// spaces.
fn put_string(words: &mut [u16], start: usize, nwords: usize, s: &str) {
    let mut bytes = vec![b' '; nwords * 2];
    for (d, c) in bytes.iter_mut().zip(s.bytes()) {
        *d = if c.is_ascii_graphic() || c == b' ' {
            c
        } else {
            b' '
        };
    }
    for i in 0..nwords {
        words[start + i] = u16::from_be_bytes([bytes[2 * i], bytes[2 * i + 1]]);
    }
}

fn put_u32(words: &mut [u16], start: usize, v: u32) {
    words[start] = v as u16;
    words[start + 1] = (v >> 16) as u16;
}

fn put_u64(words: &mut [u16], start: usize, v: u64) {
    for i in 0..4 {
        words[start + i] = (v >> (16 * i)) as u16;
    }
}

/// Transfer-mode words 63 and 88 for the selected mode.
fn transfer_words(words: &mut [u16], state: &DriveState) {
    let mode = state.xfer_mode;
    let mwdma_sel = if mode & 0xf8 == 0x20 {
        1u16 << (8 + (mode & 7))
    } else {
        0
    };
    let udma_sel = if mode & 0xf8 == 0x40 {
        1u16 << (8 + (mode & 7))
    } else {
        0
    };
    words[w::MWDMA] = 0x0007 | mwdma_sel;
    words[w::PIO_MODES] = 0x0003;
    words[w::MWDMA_MIN_CYCLE] = 120;
    words[w::MWDMA_REC_CYCLE] = 120;
    words[w::PIO_MIN_CYCLE] = 120;
    words[w::PIO_MIN_CYCLE_IORDY] = 120;
    words[w::UDMA] = 0x007f | udma_sel;
}

/// Words every SATA device (disk or packet) shares.
fn common(words: &mut [u16], info: &DriveInfo, state: &DriveState) {
    put_string(words, w::SERIAL, 10, &info.serial);
    put_string(words, w::FIRMWARE, 4, &info.firmware);
    put_string(words, w::MODEL, 20, &info.model);
    words[w::CAPABILITIES] = bit::CAP_IORDY | bit::CAP_IORDY_DISABLE | bit::CAP_LBA | bit::CAP_DMA;
    words[w::CAPABILITIES2] = bit::VALID;
    words[w::FIELD_VALID] = bit::FIELD_88_VALID | bit::FIELD_64_70_VALID;
    transfer_words(words, state);
    words[w::SATA_CAP2] = bit::SATA_SPEED_GEN3;
    words[w::SATA_FEAT_SUPPORTED] = bit::SATA_IN_ORDER | bit::SATA_SSP;
    words[w::SATA_FEAT_ENABLED] = bit::SATA_IN_ORDER | bit::SATA_SSP;
    words[w::MAJOR_VERSION] = bit::MAJOR_ATA5_TO_ACS4;
    words[w::MINOR_VERSION] = 0; // not reported
    words[w::TRANSPORT_MAJOR] = bit::TRANSPORT_SATA_3_2;
}

/// Word 255: signature A5h and a checksum making the 512 bytes sum to zero.
fn seal(words: &mut [u16; IDENTIFY_WORDS]) {
    words[w::INTEGRITY] = bit::INTEGRITY_SIGNATURE;
    let sum = words
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .fold(0u8, |a, b| a.wrapping_add(b));
    words[w::INTEGRITY] |= u16::from(0u8.wrapping_sub(sum)) << 8;
}

/// Serialise words little-endian, as the device sends them.
pub fn to_bytes(words: &[u16; IDENTIFY_WORDS]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// IDENTIFY DEVICE data for an ATA disk.
pub fn identify_device(info: &DriveInfo, state: &DriveState) -> [u16; IDENTIFY_WORDS] {
    let mut words = [0u16; IDENTIFY_WORDS];
    common(&mut words, info, state);
    let sectors = info.sectors;

    // Legacy CHS geometry (obsolete words, still read by old software): 16 heads, 63 sectors.
    let cyl = (sectors / (16 * 63)).min(16383) as u16;
    words[w::GENERAL_CONFIG] = 0x0040; // fixed (non-removable) device
    words[w::CYLINDERS] = cyl;
    words[w::SPECIFIC_CONFIG] = bit::SPECIFIC_COMPLETE;
    words[w::HEADS] = 16;
    words[w::SECTORS_PER_TRACK] = 63;

    words[w::MAX_MULTIPLE] = 0x8000 | u16::from(MAX_MULTIPLE);
    words[w::TRUSTED] = bit::VALID;
    words[w::MULTIPLE] = if state.multiple != 0 {
        bit::MULTIPLE_VALID | u16::from(state.multiple)
    } else {
        0
    };
    put_u32(&mut words, w::LBA28, sectors.min(LBA28_MAX) as u32);

    let mut add = bit::EXT_SECTORS_SUPPORTED;
    if info.trim {
        add |= bit::DRAT | bit::RZAT;
    }
    words[w::ADDITIONAL_SUPPORTED] = add;
    words[w::QUEUE_DEPTH] = NCQ_DEPTH - 1;
    words[w::SATA_CAP] = bit::SATA_GEN1
        | bit::SATA_GEN2
        | bit::SATA_GEN3
        | bit::SATA_NCQ
        | bit::SATA_HIPM
        | bit::SATA_READ_LOG_DMA;
    words[w::SATA_CAP2] |= bit::SATA_SEND_RECV_FPDMA;

    let supported = bit::LOOK_AHEAD | bit::WRITE_CACHE | bit::POWER_MGMT | bit::SMART;
    words[w::CMD_SET_SUPPORTED] = supported;
    words[w::CMD_SET_SUPPORTED2] = bit::VALID | bit::FLUSH_EXT | bit::FLUSH | bit::LBA48;
    let smart_logs = bit::SMART_SELF_TEST | bit::SMART_ERROR_LOG;
    words[w::CMD_SET_SUPPORTED_EXT] = bit::VALID | bit::WWN | bit::FUA | bit::GPL | smart_logs;
    let mut enabled = bit::POWER_MGMT;
    if state.look_ahead {
        enabled |= bit::LOOK_AHEAD;
    }
    if state.wce {
        enabled |= bit::WRITE_CACHE;
    }
    if state.smart {
        enabled |= bit::SMART;
    }
    words[w::CMD_SET_ENABLED] = enabled;
    words[w::CMD_SET_ENABLED2] =
        bit::WORDS_119_120_VALID | bit::FLUSH_EXT | bit::FLUSH | bit::LBA48;
    words[w::CMD_SET_DEFAULT] = bit::VALID | bit::WWN | bit::FUA | bit::GPL | smart_logs;

    put_u64(&mut words, w::LBA48, sectors);
    words[w::DSM_MAX] = if info.trim { DSM_MAX_BLOCKS } else { 0 };

    let mut ss = bit::VALID | info.phys_shift() as u16;
    if info.phys_shift() > 0 {
        ss |= bit::MULTIPLE_LOGICAL;
    }
    if info.logical > 512 {
        ss |= bit::LONG_LOGICAL;
        put_u32(&mut words, w::LOGICAL_SECTOR_WORDS, info.logical / 2);
    }
    words[w::SECTOR_SIZE] = ss;
    for i in 0..4 {
        words[w::WWN + i] = (info.wwn >> (48 - 16 * i)) as u16;
    }
    words[w::CMD_SET_SUPPORTED3] = bit::VALID | bit::READ_LOG_DMA;
    words[w::CMD_SET_ENABLED3] = bit::VALID | bit::READ_LOG_DMA;
    words[w::DSM] = if info.trim { bit::TRIM } else { 0 };
    words[w::ALIGNMENT] = bit::VALID; // logical sector 0 starts a physical sector
    words[w::ROTATION_RATE] = bit::NON_ROTATING;
    put_u64(&mut words, w::EXT_SECTORS, sectors);
    seal(&mut words);
    words
}

/// IDENTIFY PACKET DEVICE data for an ATAPI CD/DVD-ROM.
pub fn identify_packet_device(info: &DriveInfo, state: &DriveState) -> [u16; IDENTIFY_WORDS] {
    let mut words = [0u16; IDENTIFY_WORDS];
    common(&mut words, info, state);
    // ATAPI, CD-ROM device type, removable, 50 µs DRQ, 12-byte command packets.
    words[w::GENERAL_CONFIG] =
        bit::ATAPI_DEVICE | bit::ATAPI_CDROM | bit::REMOVABLE | bit::DRQ_50US;
    words[w::SATA_CAP] = bit::SATA_GEN1 | bit::SATA_GEN2 | bit::SATA_GEN3 | bit::SATA_HIPM;
    let set = bit::NOP | bit::DEVICE_RESET | bit::PACKET | bit::POWER_MGMT;
    words[w::CMD_SET_SUPPORTED] = set;
    words[w::CMD_SET_SUPPORTED2] = bit::VALID;
    words[w::CMD_SET_SUPPORTED_EXT] = bit::VALID;
    words[w::CMD_SET_ENABLED] = set;
    words[w::CMD_SET_DEFAULT] = bit::VALID;
    seal(&mut words);
    words
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drive::DriveKind;

    fn info(logical: u32, physical: u32) -> DriveInfo {
        let mut i = DriveInfo::new(DriveKind::Disk, None, logical, physical);
        i.sectors = 1 << 30;
        i.serial = "SER1".into();
        i.model = "Model X".into();
        i.firmware = "1.0".into();
        i.wwn = 0x5001_2345_6789_abcd;
        i
    }

    #[test]
    fn strings_sizes_and_checksum() {
        let i = info(512, 4096);
        let s = DriveState::new(&i);
        let words = identify_device(&i, &s);
        let bytes = to_bytes(&words);
        assert_eq!(bytes.len(), IDENTIFY_BYTES);
        assert_eq!(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(words[255] & 0xff, 0xa5);
        assert_eq!(&bytes[20..24], b"ES1R"); // "SER1", first character of each pair in the high byte
        assert_eq!(&bytes[54..62], b"oMed l X");
        assert_eq!(words[106], 0x6003);
        assert_eq!(words[60..62], [0xffff, 0x0fff]);
        assert_eq!(words[100..104], [0, 0x4000, 0, 0]);
        assert_eq!(words[108..112], [0x5001, 0x2345, 0x6789, 0xabcd]);
        let i4 = info(4096, 4096);
        let w4 = identify_device(&i4, &DriveState::new(&i4));
        assert_eq!(w4[106], 0x5000);
        assert_eq!(w4[117..119], [2048, 0]);
    }
}
