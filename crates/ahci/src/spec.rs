//! ATA (ACS-4) and ATAPI (SPC-4, MMC-6) numbers: opcodes, register bits, subcommands and sense
//! codes, named once as the specifications name them.
//!
//! Like `regs` and `fis`, this module imports nothing else from the crate, so every command-set
//! module (and the slot and port code) can use the tables without depending on one another.

// ---- ATA (ACS-4) ----

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
    /// SMART EXECUTE OFF-LINE IMMEDIATE (subcommand in LBA 7:0).
    pub const EXEC_OFFLINE: u8 = 0xd4;
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

    /// EXECUTE OFF-LINE IMMEDIATE subcommands (ACS-4 Table 133).
    pub mod offline {
        /// Run the SMART off-line routine in off-line mode.
        pub const ROUTINE: u8 = 0x00;
        /// Short self-test in off-line mode.
        pub const SHORT: u8 = 0x01;
        /// Extended self-test in off-line mode.
        pub const EXTENDED: u8 = 0x02;
        /// Abort the off-line mode self-test.
        pub const ABORT: u8 = 0x7f;
        /// Short self-test in captive mode.
        pub const SHORT_CAPTIVE: u8 = 0x81;
        /// Extended self-test in captive mode.
        pub const EXTENDED_CAPTIVE: u8 = 0x82;
    }

    /// Self-test execution status values (bits 7:4 of SMART data byte 363 and of a self-test
    /// log descriptor's status byte).
    pub mod selftest_status {
        /// Completed without error, or no self-test has run.
        pub const COMPLETED: u8 = 0x0;
        /// Aborted by the host.
        pub const ABORTED_BY_HOST: u8 = 0x1;
    }
}

// ---- ATAPI: SCSI primary (SPC-4) and multimedia (MMC-6) commands ----

/// SCSI/MMC operation codes a PACKET command carries (the ones the model implements).
#[allow(dead_code)] // the complete table, whether or not every entry is used yet
pub mod op {
    /// TEST UNIT READY.
    pub const TEST_UNIT_READY: u8 = 0x00;
    /// REQUEST SENSE.
    pub const REQUEST_SENSE: u8 = 0x03;
    /// INQUIRY.
    pub const INQUIRY: u8 = 0x12;
    /// START STOP UNIT.
    pub const START_STOP_UNIT: u8 = 0x1b;
    /// PREVENT ALLOW MEDIUM REMOVAL.
    pub const PREVENT_ALLOW: u8 = 0x1e;
    /// READ CAPACITY(10).
    pub const READ_CAPACITY: u8 = 0x25;
    /// READ(10).
    pub const READ_10: u8 = 0x28;
    /// READ TOC/PMA/ATIP.
    pub const READ_TOC: u8 = 0x43;
    /// GET CONFIGURATION.
    pub const GET_CONFIGURATION: u8 = 0x46;
    /// GET EVENT STATUS NOTIFICATION.
    pub const GET_EVENT_STATUS: u8 = 0x4a;
    /// READ DISC INFORMATION.
    pub const READ_DISC_INFO: u8 = 0x51;
    /// MODE SENSE(10).
    pub const MODE_SENSE_10: u8 = 0x5a;
    /// READ(12).
    pub const READ_12: u8 = 0xa8;
    /// MECHANISM STATUS.
    pub const MECHANISM_STATUS: u8 = 0xbd;
}

/// Sense keys (SPC-4 §4.5.6).
#[allow(dead_code)] // the complete table, whether or not every entry is used yet
pub mod key {
    /// No sense.
    pub const NO_SENSE: u8 = 0x0;
    /// Not ready.
    pub const NOT_READY: u8 = 0x2;
    /// Medium error.
    pub const MEDIUM_ERROR: u8 = 0x3;
    /// Illegal request.
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    /// Unit attention.
    pub const UNIT_ATTENTION: u8 = 0x6;
}

/// Additional sense codes (ASC) the model reports.
#[allow(dead_code)] // the complete table, whether or not every entry is used yet
pub mod asc {
    /// Unrecovered read error.
    pub const UNRECOVERED_READ: u8 = 0x11;
    /// Invalid command operation code.
    pub const INVALID_OPCODE: u8 = 0x20;
    /// Logical block address out of range.
    pub const LBA_OUT_OF_RANGE: u8 = 0x21;
    /// Invalid field in CDB.
    pub const INVALID_FIELD: u8 = 0x24;
    /// Not ready to ready change, medium may have changed.
    pub const MEDIUM_CHANGED: u8 = 0x28;
    /// Power on, reset, or bus device reset occurred.
    pub const POWER_ON_RESET: u8 = 0x29;
    /// Saving parameters not supported.
    pub const SAVING_NOT_SUPPORTED: u8 = 0x39;
    /// Medium not present (ASCQ 1: tray closed, 2: tray open).
    pub const MEDIUM_NOT_PRESENT: u8 = 0x3a;
    /// Medium removal prevented (ASCQ 2).
    pub const REMOVAL_PREVENTED: u8 = 0x53;
}

/// Media event codes of GET EVENT STATUS NOTIFICATION (MMC-6 §6.7.2.5).
#[allow(dead_code)] // the complete table, whether or not every entry is used yet
pub mod media_event {
    /// No change.
    pub const NO_CHANGE: u8 = 0;
    /// New media loaded.
    pub const NEW_MEDIA: u8 = 2;
    /// Media removed.
    pub const MEDIA_REMOVAL: u8 = 3;
}

/// MMC profiles.
#[allow(dead_code)] // the complete table, whether or not every entry is used yet
pub mod profile {
    /// No current profile (no medium).
    pub const NONE: u16 = 0x0000;
    /// CD-ROM.
    pub const CD_ROM: u16 = 0x0008;
    /// DVD-ROM.
    pub const DVD_ROM: u16 = 0x0010;
}
