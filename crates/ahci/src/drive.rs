//! The device behind a port: what never changes (image, identity, geometry) and the settings a
//! guest changes with ATA commands (write cache, transfer mode, power mode, NCQ error, ATAPI
//! sense and tray state).
//!
//! The immutable half ([`DriveInfo`]) is shared with I/O jobs without locking; the mutable half
//! (`DriveState`) lives in the port under the device lock, and jobs take what they need from it
//! when they start.
//!
//! The state the command sets keep (ATAPI sense and tray, the pending NCQ error, the SMART
//! counters) is defined here rather than beside the commands that change it, so this module
//! needs only the bottom layer (`spec`, `fis`, `regs`) and every command set can build on it
//! without a cycle.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use block::BlockBackend;

use crate::fis::TaskFile;
use crate::spec::{asc, key, media_event};

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
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
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
    /// SMART self-tests and off-line data collection run so far (absent in older snapshots).
    #[serde(default)]
    pub self_tests: SelfTests,
}

/// Descriptors the SMART self-test log holds (ACS-4 §A.20); the extended log's single page
/// holds 19 of them.
pub(crate) const SELF_TEST_LOG_ENTRIES: usize = 21;

/// One self-test the guest ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct SelfTestEntry {
    /// The EXECUTE OFF-LINE IMMEDIATE subcommand that started it.
    pub subcommand: u8,
    /// Its self-test execution status byte (result in bits 7:4).
    pub status: u8,
    /// Power-on hours when it ran.
    pub hours: u16,
}

/// SMART off-line data collection and self-test results. Self-tests of an image have nothing
/// to wear out, so they complete as soon as they are started.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct SelfTests {
    /// Off-line data collection status (SMART data byte 362).
    pub offline_status: u8,
    /// Self-test execution status of the last self-test (SMART data byte 363).
    pub exec_status: u8,
    /// Self-tests run since power-on: numbers the descriptors in the logs' circular buffers.
    pub count: u32,
    /// The latest self-tests, oldest first, at most [`SELF_TEST_LOG_ENTRIES`].
    pub recent: Vec<SelfTestEntry>,
}

impl SelfTests {
    /// Records a finished self-test.
    pub fn record(&mut self, e: SelfTestEntry) {
        self.exec_status = e.status;
        self.count = self.count.wrapping_add(1);
        self.recent.push(e);
        let excess = self.recent.len().saturating_sub(SELF_TEST_LOG_ENTRIES);
        self.recent.drain(..excess);
    }

    /// The latest `slots` self-tests with their 1-based position in a circular buffer of
    /// `slots` descriptors, and the position of the newest (0 when there is none). Robust to
    /// a restored state whose count disagrees with its list.
    pub fn placed(&self, slots: usize) -> (Vec<(usize, SelfTestEntry)>, usize) {
        let n = self.recent.len().min(slots);
        let total = (self.count as usize).max(self.recent.len());
        let first = total - n;
        let placed = self.recent[self.recent.len() - n..]
            .iter()
            .enumerate()
            .map(|(i, e)| ((first + i) % slots + 1, *e))
            .collect();
        let newest = if total == 0 {
            0
        } else {
            (total - 1) % slots + 1
        };
        (placed, newest)
    }
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
            self_tests: SelfTests::default(),
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

/// Per-drive counters that SMART reports (and that outlive resets).
#[derive(Debug)]
pub struct DriveCounters {
    /// When the drive was created ("power on").
    pub created: Instant,
    /// Bytes read by the host.
    pub read_bytes: AtomicU64,
    /// Bytes written by the host.
    pub written_bytes: AtomicU64,
}

impl Default for DriveCounters {
    fn default() -> Self {
        DriveCounters {
            created: Instant::now(),
            read_bytes: AtomicU64::new(0),
            written_bytes: AtomicU64::new(0),
        }
    }
}

/// What the NCQ Command Error log reports about the failed queued command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct NcqError {
    /// Tag of the failed command.
    pub tag: u8,
    /// Its outputs (status, error, LBA, count, device).
    pub tf: TaskFile,
}

/// Sense data: key, additional sense code and qualifier.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Sense {
    /// Sense key.
    pub key: u8,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
}

impl Sense {
    /// A sense triple.
    pub const fn new(key: u8, asc: u8, ascq: u8) -> Self {
        Sense { key, asc, ascq }
    }
}

/// The drive's removable-medium and sense state.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct AtapiState {
    /// Sense of the last command, for REQUEST SENSE.
    pub sense: Sense,
    /// A unit attention waiting to be reported.
    pub unit_attention: Option<Sense>,
    /// An image is attached.
    pub has_image: bool,
    /// The medium is loaded (not ejected).
    pub loaded: bool,
    /// The tray is open.
    pub tray_open: bool,
    /// Medium removal is prevented.
    pub locked: bool,
    /// Media event waiting for GET EVENT STATUS NOTIFICATION.
    pub event: u8,
}

impl AtapiState {
    /// Power-on state: medium loaded if there is one, power-on unit attention pending.
    pub fn new(has_image: bool) -> Self {
        AtapiState {
            sense: Sense::default(),
            unit_attention: Some(Sense::new(key::UNIT_ATTENTION, asc::POWER_ON_RESET, 0)),
            has_image,
            loaded: has_image,
            tray_open: false,
            locked: false,
            event: media_event::NO_CHANGE,
        }
    }

    /// DEVICE RESET: sense is cleared and removal is allowed again.
    pub fn reset(&mut self) {
        self.sense = Sense::default();
        self.locked = false;
    }

    /// The sense a medium access reports with no medium: the qualifier tells an open tray from
    /// a closed empty one.
    pub fn not_present(&self) -> Sense {
        Sense::new(
            key::NOT_READY,
            asc::MEDIUM_NOT_PRESENT,
            if self.tray_open { 2 } else { 1 },
        )
    }
}
