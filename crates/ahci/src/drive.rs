//! The device behind a port: what never changes (image, identity, geometry) and the settings a
//! guest changes with ATA commands (write cache, transfer mode, power mode, NCQ error, ATAPI
//! sense and tray state).
//!
//! The immutable half ([`DriveInfo`]) is shared with I/O jobs without locking; the mutable half
//! (`DriveState`) lives in the port under the device lock, and jobs take what they need from it
//! when they start.

use std::sync::Arc;

use block::BlockBackend;

use crate::atapi::AtapiState;
use crate::log::DriveCounters;
use crate::ncq::NcqError;

/// What kind of device a port has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriveKind {
    /// An ATA disk (hard disk or SSD).
    Disk,
    /// An ATAPI CD/DVD-ROM drive with a read-only ISO image (or an empty tray).
    Cdrom,
}

/// The fixed description of a drive.
pub struct DriveInfo {
    /// Disk or CD-ROM.
    pub kind: DriveKind,
    /// The image; `None` for a CD drive with no medium.
    pub backend: Option<Arc<dyn BlockBackend>>,
    /// ATA serial number (at most 20 ASCII characters).
    pub serial: String,
    /// ATA model number (at most 40 ASCII characters).
    pub model: String,
    /// Firmware revision (at most 8 ASCII characters).
    pub firmware: String,
    /// World wide name reported in IDENTIFY words 108–111.
    pub wwn: u64,
    /// Writes, TRIM and write-zeroes are refused.
    pub read_only: bool,
    /// Logical sector size in bytes (512 or 4096; 2048 for CD-ROMs).
    pub logical: u32,
    /// Physical sector size in bytes (a power-of-two multiple of `logical`).
    pub physical: u32,
    /// Capacity in logical sectors (CD-ROM: 2048-byte blocks).
    pub sectors: u64,
    /// TRIM is offered: the backend discards, and trimmed sectors read back as zeroes.
    pub trim: bool,
    /// The volatile write cache starts disabled (bhyve `sync`), so every write is durable.
    pub write_through: bool,
    /// Lifetime counters reported through SMART.
    pub counters: DriveCounters,
    /// A flush (or FUA write) failed: data may be lost, so FLUSH CACHE keeps failing until the
    /// HBA or the port is reset, even if a later fdatasync would succeed.
    pub flush_failed: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for DriveInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DriveInfo")
            .field("kind", &self.kind)
            .field("serial", &self.serial)
            .field("model", &self.model)
            .field("sectors", &self.sectors)
            .field("logical", &self.logical)
            .field("physical", &self.physical)
            .finish()
    }
}

/// Size of a CD-ROM logical block.
pub const CD_BLOCK: u32 = 2048;

impl DriveInfo {
    /// Describes a drive over `backend`, deriving capacity and TRIM support from it.
    pub fn new(
        kind: DriveKind,
        backend: Option<Arc<dyn BlockBackend>>,
        logical: u32,
        physical: u32,
    ) -> Self {
        let logical = if kind == DriveKind::Cdrom {
            CD_BLOCK
        } else {
            logical
        };
        let physical = if kind == DriveKind::Cdrom {
            CD_BLOCK
        } else {
            physical.max(logical)
        };
        let info = backend.as_ref().map(|b| b.info());
        let read_only = kind == DriveKind::Cdrom || info.is_some_and(|i| i.read_only);
        DriveInfo {
            kind,
            sectors: info.map_or(0, |i| i.capacity / u64::from(logical)),
            trim: kind == DriveKind::Disk && !read_only && info.is_some_and(|i| i.discard_zeroes),
            backend,
            serial: String::new(),
            model: String::new(),
            firmware: String::new(),
            wwn: 0,
            read_only,
            logical,
            physical,
            write_through: false,
            counters: DriveCounters::default(),
            flush_failed: Default::default(),
        }
    }

    /// The PxSIG value of this device.
    pub fn signature(&self) -> u32 {
        match self.kind {
            DriveKind::Disk => crate::regs::sig::ATA,
            DriveKind::Cdrom => crate::regs::sig::ATAPI,
        }
    }

    /// log2(physical / logical), for IDENTIFY word 106 and the capacity log.
    pub fn phys_shift(&self) -> u32 {
        (self.physical / self.logical).trailing_zeros()
    }
}

/// ATA power modes (ACS-4 §4.15) as CHECK POWER MODE reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PowerMode {
    /// Active or idle: FFh.
    Active,
    /// Idle (after IDLE / IDLE IMMEDIATE): 80h.
    Idle,
    /// Standby (after STANDBY / STANDBY IMMEDIATE): 00h.
    Standby,
}

impl PowerMode {
    /// The Count output of CHECK POWER MODE.
    pub fn code(self) -> u8 {
        match self {
            PowerMode::Active => 0xff,
            PowerMode::Idle => 0x80,
            PowerMode::Standby => 0x00,
        }
    }
}

/// Transfer mode selected with SET FEATURES 03h, encoded as its Count value.
pub(crate) const XFER_UDMA6: u8 = 0x46;

/// Settings and conditions a guest changes with commands.
#[derive(Debug)]
pub(crate) struct DriveState {
    /// Volatile write cache enabled.
    pub wce: bool,
    /// Read look-ahead enabled.
    pub look_ahead: bool,
    /// SMART operations enabled.
    pub smart: bool,
    /// SMART attribute autosave enabled.
    pub autosave: bool,
    /// Current power mode.
    pub power: PowerMode,
    /// Selected transfer mode (SET FEATURES 03h Count encoding).
    pub xfer_mode: u8,
    /// Sectors per DRQ block for READ/WRITE MULTIPLE (0 = not set).
    pub multiple: u8,
    /// A failed queued command waiting for READ LOG EXT 10h.
    pub ncq_error: Option<NcqError>,
    /// Software reset asserted (SRST in the Device Control register).
    pub srst: bool,
    /// ATAPI state (sense data, medium, tray lock).
    pub atapi: AtapiState,
}

/// Largest READ/WRITE MULTIPLE block (IDENTIFY word 47).
pub(crate) const MAX_MULTIPLE: u8 = 16;

impl DriveState {
    /// Power-on defaults for `info`.
    pub fn new(info: &DriveInfo) -> Self {
        DriveState {
            wce: !info.write_through,
            look_ahead: true,
            smart: true,
            autosave: true,
            power: PowerMode::Active,
            xfer_mode: XFER_UDMA6,
            multiple: MAX_MULTIPLE,
            ncq_error: None,
            srst: false,
            atapi: AtapiState::new(info.backend.is_some()),
        }
    }

    /// A hardware or software reset: queued commands and their error are gone; settings
    /// survive (software settings preservation is enabled).
    pub fn reset(&mut self) {
        self.ncq_error = None;
        self.srst = false;
        self.power = PowerMode::Active;
    }
}
