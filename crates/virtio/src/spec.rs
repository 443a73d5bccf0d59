//! virtio 1.2 facts for a block device on the PCI transport: the capability layout, the common
//! configuration registers, status and feature bits, the block device's configuration space and
//! request format, with size assertions. Names follow the specification (sections 4.1 and 5.2).

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// PCI vendor ID of virtio devices.
pub const PCI_VENDOR_ID: u16 = 0x1af4;
/// PCI device ID of a modern (non-transitional) block device: 0x1040 + device type 2.
pub const PCI_DEVICE_ID_BLOCK: u16 = 0x1042;
/// Subsystem device ID: non-transitional devices use 0x40 or higher (§4.1.2.1).
pub const PCI_SUBSYSTEM_ID: u16 = 0x0040;

/// Virtio PCI capability types (`cfg_type`, §4.1.4).
pub mod cap {
    /// The vendor-specific capability ID every virtio structure uses.
    pub const VENDOR: u8 = 0x09;
    /// Common configuration.
    pub const COMMON_CFG: u8 = 1;
    /// Notifications.
    pub const NOTIFY_CFG: u8 = 2;
    /// ISR status.
    pub const ISR_CFG: u8 = 3;
    /// Device-specific configuration.
    pub const DEVICE_CFG: u8 = 4;
    /// A window in config space onto the BARs (`struct virtio_pci_cfg_cap`).
    pub const PCI_CFG: u8 = 5;
    /// Length of `struct virtio_pci_cfg_cap` (the cap plus `pci_cfg_data`).
    pub const PCI_CFG_LEN: usize = 20;
    /// Length of `struct virtio_pci_cap`.
    pub const LEN: usize = 16;
    /// Length of `struct virtio_pci_notify_cap` (the cap plus `notify_off_multiplier`).
    pub const NOTIFY_LEN: usize = 20;
}

/// Offsets in `struct virtio_pci_common_cfg` (§4.1.4.3).
pub mod common {
    /// Which 32 bits of the device features `DEVICE_FEATURE` shows.
    pub const DEVICE_FEATURE_SELECT: u64 = 0;
    /// Device features, 32 bits at a time (read-only).
    pub const DEVICE_FEATURE: u64 = 4;
    /// Which 32 bits of the driver features `DRIVER_FEATURE` takes.
    pub const DRIVER_FEATURE_SELECT: u64 = 8;
    /// Features the driver accepts, 32 bits at a time.
    pub const DRIVER_FEATURE: u64 = 12;
    /// MSI-X vector for configuration changes.
    pub const CONFIG_MSIX_VECTOR: u64 = 16;
    /// Number of queues (read-only).
    pub const NUM_QUEUES: u64 = 18;
    /// Device status.
    pub const DEVICE_STATUS: u64 = 20;
    /// Configuration generation (read-only).
    pub const CONFIG_GENERATION: u64 = 21;
    /// Which queue the `QUEUE_*` registers show.
    pub const QUEUE_SELECT: u64 = 22;
    /// Size of the selected queue.
    pub const QUEUE_SIZE: u64 = 24;
    /// MSI-X vector of the selected queue.
    pub const QUEUE_MSIX_VECTOR: u64 = 26;
    /// The selected queue is enabled.
    pub const QUEUE_ENABLE: u64 = 28;
    /// Notification offset of the selected queue (read-only).
    pub const QUEUE_NOTIFY_OFF: u64 = 30;
    /// Descriptor table address.
    pub const QUEUE_DESC: u64 = 32;
    /// Driver (available) ring address.
    pub const QUEUE_DRIVER: u64 = 40;
    /// Device (used) ring address.
    pub const QUEUE_DEVICE: u64 = 48;
    /// Notification data of the selected queue (read-only).
    pub const QUEUE_NOTIFY_DATA: u64 = 56;
    /// Reset the selected queue (VIRTIO_F_RING_RESET; not offered, reads 0).
    pub const QUEUE_RESET: u64 = 58;
    /// Size of the structure.
    pub const LEN: u64 = 60;
}

/// Device status bits (§2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready: queues may be used.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u8 = 0x80;
}

/// "No vector" for `config_msix_vector` and `queue_msix_vector`.
pub const NO_VECTOR: u16 = 0xffff;

/// ISR status bits (§4.1.4.5), cleared by reading.
pub mod isr {
    /// A queue has used buffers.
    pub const QUEUE: u8 = 1;
    /// The device configuration changed.
    pub const CONFIG: u8 = 2;
}

/// Feature bits (§5.2.3, §6).
pub mod feature {
    /// Maximum size of any single segment is in `size_max`.
    pub const BLK_SIZE_MAX: u64 = 1 << 1;
    /// Maximum number of segments in a request is in `seg_max`.
    pub const BLK_SEG_MAX: u64 = 1 << 2;
    /// The device is read-only.
    pub const BLK_RO: u64 = 1 << 5;
    /// The block size is in `blk_size`.
    pub const BLK_BLK_SIZE: u64 = 1 << 6;
    /// Cache flush command support.
    pub const BLK_FLUSH: u64 = 1 << 9;
    /// Optimal I/O alignment is in `topology`.
    pub const BLK_TOPOLOGY: u64 = 1 << 10;
    /// The cache mode (writeback or writethrough) can be read and set in `writeback`.
    pub const BLK_CONFIG_WCE: u64 = 1 << 11;
    /// Multiple queues (`num_queues`).
    pub const BLK_MQ: u64 = 1 << 12;
    /// Discard command support.
    pub const BLK_DISCARD: u64 = 1 << 13;
    /// Write zeroes command support.
    pub const BLK_WRITE_ZEROES: u64 = 1 << 14;
    /// Indirect descriptor tables.
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// `used_event` and `avail_event` suppress notifications.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// A virtio 1.x device.
    pub const VERSION_1: u64 = 1 << 32;
}

/// Block request types (§5.2.6).
pub mod req {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush.
    pub const FLUSH: u32 = 4;
    /// Device ID string.
    pub const GET_ID: u32 = 8;
    /// Discard.
    pub const DISCARD: u32 = 11;
    /// Write zeroes.
    pub const WRITE_ZEROES: u32 = 13;
    /// Length of the device ID string.
    pub const ID_BYTES: usize = 20;
}

/// Block request status values (§5.2.6).
pub mod blk_status {
    /// Success.
    pub const OK: u8 = 0;
    /// The request failed (bad range, backend error, bad buffers).
    pub const IOERR: u8 = 1;
    /// The request type or its flags are not supported.
    pub const UNSUPP: u8 = 2;
}

/// The 512-byte unit of `sector` fields, whatever the logical block size.
pub const SECTOR: u64 = 512;

/// The request header every block request starts with (§5.2.6).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct BlkReqHeader {
    /// Request type ([`req`]).
    pub type_: u32,
    /// Reserved (ioprio in older specs).
    pub reserved: u32,
    /// First 512-byte sector.
    pub sector: u64,
}
const _: () = assert!(std::mem::size_of::<BlkReqHeader>() == 16);

/// A discard or write-zeroes range (§5.2.6, `virtio_blk_discard_write_zeroes`).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct DiscardWriteZeroes {
    /// First 512-byte sector.
    pub sector: u64,
    /// Sectors.
    pub num_sectors: u32,
    /// Bit 0: unmap (write zeroes only); the rest reserved.
    pub flags: u32,
}
const _: () = assert!(std::mem::size_of::<DiscardWriteZeroes>() == 16);

/// The block device's configuration space (§5.2.4, `struct virtio_blk_config`).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C, packed)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Largest segment, in bytes.
    pub size_max: u32,
    /// Most data segments in a request.
    pub seg_max: u32,
    /// Legacy geometry: cylinders.
    pub cylinders: u16,
    /// Legacy geometry: heads.
    pub heads: u8,
    /// Legacy geometry: sectors per track.
    pub sectors: u8,
    /// Logical block size in bytes.
    pub blk_size: u32,
    /// log2 of logical blocks per physical block.
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// Suggested minimum I/O size, in blocks.
    pub min_io_size: u16,
    /// Optimal (suggested maximum) I/O size, in blocks.
    pub opt_io_size: u32,
    /// Write-back cache on (1) or write-through (0).
    pub writeback: u8,
    /// Reserved.
    pub unused0: u8,
    /// Request queues.
    pub num_queues: u16,
    /// Most sectors one discard segment may cover.
    pub max_discard_sectors: u32,
    /// Most segments one discard request may carry.
    pub max_discard_seg: u32,
    /// Discard alignment, in sectors.
    pub discard_sector_alignment: u32,
    /// Most sectors one write-zeroes segment may cover.
    pub max_write_zeroes_sectors: u32,
    /// Most segments one write-zeroes request may carry.
    pub max_write_zeroes_seg: u32,
    /// Write zeroes may deallocate (with the unmap flag).
    pub write_zeroes_may_unmap: u8,
    /// Reserved.
    pub unused1: [u8; 3],
}
const _: () = assert!(std::mem::size_of::<BlkConfig>() == 60);
