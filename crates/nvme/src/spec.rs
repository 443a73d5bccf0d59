//! NVMe Base 2.0 / NVM Command Set 1.0 / PCIe transport facts: register offsets and bits, opcodes,
//! status codes, feature and log identifiers, and the wire layouts (SQE, CQE, Identify pages) with
//! size assertions. Names follow the specification so a line can be checked against it quickly.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Controller register offsets in BAR0 (Base spec §3.1.3).
pub mod reg {
    /// Controller Capabilities.
    pub const CAP: u64 = 0x00;
    /// Version.
    pub const VS: u64 = 0x08;
    /// Interrupt Mask Set.
    pub const INTMS: u64 = 0x0c;
    /// Interrupt Mask Clear.
    pub const INTMC: u64 = 0x10;
    /// Controller Configuration.
    pub const CC: u64 = 0x14;
    /// Controller Status.
    pub const CSTS: u64 = 0x1c;
    /// NVM Subsystem Reset.
    pub const NSSR: u64 = 0x20;
    /// Admin Queue Attributes.
    pub const AQA: u64 = 0x24;
    /// Admin Submission Queue Base Address.
    pub const ASQ: u64 = 0x28;
    /// Admin Completion Queue Base Address.
    pub const ACQ: u64 = 0x30;
    /// Controller Memory Buffer Location.
    pub const CMBLOC: u64 = 0x38;
    /// Controller Memory Buffer Size.
    pub const CMBSZ: u64 = 0x3c;
    /// First doorbell (SQ 0 tail); with DSTRD=0 doorbells are 4 bytes apart.
    pub const DOORBELL_BASE: u64 = 0x1000;
}

/// Controller Configuration (CC) fields.
pub mod cc {
    /// Enable (CC.EN).
    pub const EN: u32 = 1 << 0;
    /// Bit position of I/O Command Set Selected (CC.CSS).
    pub const CSS_SHIFT: u32 = 4;
    /// Mask of CC.CSS after shifting.
    pub const CSS_MASK: u32 = 0x7;
    /// Bit position of Memory Page Size (CC.MPS).
    pub const MPS_SHIFT: u32 = 7;
    /// Mask of CC.MPS after shifting.
    pub const MPS_MASK: u32 = 0xf;
    /// Bit position of Arbitration Mechanism Selected (CC.AMS).
    pub const AMS_SHIFT: u32 = 11;
    /// Bit position of Shutdown Notification (CC.SHN).
    pub const SHN_SHIFT: u32 = 14;
    /// Mask of CC.SHN after shifting.
    pub const SHN_MASK: u32 = 0x3;
    /// Bit position of I/O Submission Queue Entry Size (CC.IOSQES).
    pub const IOSQES_SHIFT: u32 = 16;
    /// Bit position of I/O Completion Queue Entry Size (CC.IOCQES).
    pub const IOCQES_SHIFT: u32 = 20;
    /// Bits the host may write (EN, CSS, MPS, AMS, SHN, IOSQES, IOCQES).
    pub const WRITABLE: u32 = 0x00ff_fff1;
}

/// Controller Status (CSTS) bits.
pub mod csts {
    /// Ready (CSTS.RDY).
    pub const RDY: u32 = 1 << 0;
    /// Controller Fatal Status (CSTS.CFS).
    pub const CFS: u32 = 1 << 1;
    /// Bit position of Shutdown Status (CSTS.SHST).
    pub const SHST_SHIFT: u32 = 2;
    /// CSTS.SHST 00b: Normal operation (no shutdown has been requested).
    pub const SHST_NORMAL: u32 = 0;
    /// CSTS.SHST 01b: Shutdown processing occurring.
    pub const SHST_OCCURRING: u32 = 1;
    /// CSTS.SHST 10b: Shutdown processing complete.
    pub const SHST_COMPLETE: u32 = 2;
    /// Mask of CSTS.SHST in place (bits 3:2).
    pub const SHST_MASK: u32 = 0x3 << 2;
}

/// An "open enum" over a spec code: a newtype with a named constant per known value and a
/// `name()` for logs, that still holds any value a guest writes (unknown opcodes must reach
/// dispatch to be answered with Invalid Opcode, not be lost in a conversion).
macro_rules! open_enum {
    ($(#[$m:meta])* $vis:vis struct $name:ident($ty:ty) { $($(#[$vm:meta])* $v:ident = $val:expr,)* }) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash)]
        $vis struct $name(pub $ty);
        impl $name {
            $($(#[$vm])* pub const $v: $name = $name($val);)*
            /// The spec's name for a known value.
            pub fn name(self) -> Option<&'static str> {
                match self {
                    $($name::$v => Some(stringify!($v)),)*
                    _ => None,
                }
            }
        }
        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                match self.name() {
                    Some(n) => f.write_str(n),
                    None => write!(f, "{}({:#04x})", stringify!($name), self.0),
                }
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                std::fmt::Debug::fmt(self, f)
            }
        }
    };
}

open_enum! {
    /// Admin command opcodes (Base spec Figure 84).
    pub struct AdminOpcode(u8) {
        /// Delete I/O Submission Queue.
        DELETE_IO_SQ = 0x00,
        /// Create I/O Submission Queue.
        CREATE_IO_SQ = 0x01,
        /// Get Log Page.
        GET_LOG_PAGE = 0x02,
        /// Delete I/O Completion Queue.
        DELETE_IO_CQ = 0x04,
        /// Create I/O Completion Queue.
        CREATE_IO_CQ = 0x05,
        /// Identify.
        IDENTIFY = 0x06,
        /// Abort.
        ABORT = 0x08,
        /// Set Features.
        SET_FEATURES = 0x09,
        /// Get Features.
        GET_FEATURES = 0x0a,
        /// Asynchronous Event Request.
        ASYNC_EVENT_REQUEST = 0x0c,
        /// Device Self-test.
        DEVICE_SELF_TEST = 0x14,
        /// Keep Alive (not supported: no keep-alive timer on PCIe).
        KEEP_ALIVE = 0x18,
        /// Doorbell Buffer Config.
        DOORBELL_BUFFER_CONFIG = 0x7c,
        /// Format NVM.
        FORMAT_NVM = 0x80,
    }
}

open_enum! {
    /// NVM command set I/O opcodes (NVM Command Set spec Figure 17).
    pub struct IoOpcode(u8) {
        /// Flush.
        FLUSH = 0x00,
        /// Write.
        WRITE = 0x01,
        /// Read.
        READ = 0x02,
        /// Write Uncorrectable (not supported).
        WRITE_UNCORRECTABLE = 0x04,
        /// Compare.
        COMPARE = 0x05,
        /// Write Zeroes.
        WRITE_ZEROES = 0x08,
        /// Dataset Management.
        DATASET_MANAGEMENT = 0x09,
        /// Verify.
        VERIFY = 0x0c,
    }
}

/// A completion status: Status Code Type and Status Code, plus Do Not Retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    /// Status Code Type (0 generic, 1 command specific, 2 media and data integrity).
    pub sct: u8,
    /// Status Code.
    pub sc: u8,
    /// Do Not Retry.
    pub dnr: bool,
}

impl Status {
    const fn new(sct: u8, sc: u8) -> Self {
        Status {
            sct,
            sc,
            dnr: sct != 0 || sc != 0,
        }
    }
    /// The same status, retryable (transient backend failures).
    pub const fn retryable(self) -> Self {
        Status { dnr: false, ..self }
    }
    /// Successful completion.
    pub fn is_success(self) -> bool {
        self.sct == 0 && self.sc == 0
    }
    /// The 15-bit Status Field as placed in CQE DW3 bits 31:17 (without the phase bit).
    pub fn field(self) -> u16 {
        u16::from(self.sc) | (u16::from(self.sct & 7) << 8) | (u16::from(self.dnr) << 14)
    }

    /// Successful Completion.
    pub const SUCCESS: Status = Status::new(0, 0x00);
    /// Invalid Command Opcode (generic 01h).
    pub const INVALID_OPCODE: Status = Status::new(0, 0x01);
    /// Invalid Field in Command (generic 02h).
    pub const INVALID_FIELD: Status = Status::new(0, 0x02);
    /// Data Transfer Error (generic 04h).
    pub const DATA_TRANSFER_ERROR: Status = Status::new(0, 0x04);
    /// Internal Error (generic 06h).
    pub const INTERNAL_ERROR: Status = Status::new(0, 0x06);
    /// Command Abort Requested (generic 07h).
    pub const ABORT_REQUESTED: Status = Status::new(0, 0x07);
    /// Command Aborted due to SQ Deletion (generic 08h).
    pub const ABORTED_SQ_DELETION: Status = Status::new(0, 0x08);
    /// Invalid Namespace or Format (generic 0Bh).
    pub const INVALID_NAMESPACE: Status = Status::new(0, 0x0b);
    /// Command Sequence Error (generic 0Ch).
    pub const COMMAND_SEQUENCE_ERROR: Status = Status::new(0, 0x0c);
    /// Invalid SGL Segment Descriptor (generic 0Dh).
    pub const INVALID_SGL_SEGMENT: Status = Status::new(0, 0x0d);
    /// Invalid Number of SGL Descriptors (generic 0Eh).
    pub const INVALID_SGL_COUNT: Status = Status::new(0, 0x0e);
    /// Data SGL Length Invalid (generic 0Fh).
    pub const DATA_SGL_LENGTH_INVALID: Status = Status::new(0, 0x0f);
    /// SGL Descriptor Type Invalid (generic 11h).
    pub const SGL_TYPE_INVALID: Status = Status::new(0, 0x11);
    /// PRP Offset Invalid (generic 13h).
    pub const PRP_OFFSET_INVALID: Status = Status::new(0, 0x13);
    /// SGL Offset Invalid (generic 16h).
    pub const SGL_OFFSET_INVALID: Status = Status::new(0, 0x16);
    /// Namespace is Write Protected (generic 20h).
    pub const NS_WRITE_PROTECTED: Status = Status::new(0, 0x20);
    /// LBA Out of Range (generic 80h).
    pub const LBA_OUT_OF_RANGE: Status = Status::new(0, 0x80);
    /// Capacity Exceeded (generic 81h).
    pub const CAPACITY_EXCEEDED: Status = Status::new(0, 0x81);

    /// Completion Queue Invalid (command specific 00h).
    pub const CQ_INVALID: Status = Status::new(1, 0x00);
    /// Invalid Queue Identifier (command specific 01h).
    pub const INVALID_QID: Status = Status::new(1, 0x01);
    /// Invalid Queue Size (command specific 02h).
    pub const INVALID_QUEUE_SIZE: Status = Status::new(1, 0x02);
    /// Abort Command Limit Exceeded (command specific 03h).
    pub const ABORT_LIMIT_EXCEEDED: Status = Status::new(1, 0x03);
    /// Asynchronous Event Request Limit Exceeded (command specific 05h).
    pub const AER_LIMIT_EXCEEDED: Status = Status::new(1, 0x05);
    /// Invalid Interrupt Vector (command specific 08h).
    pub const INVALID_INTERRUPT_VECTOR: Status = Status::new(1, 0x08);
    /// Invalid Log Page (command specific 09h).
    pub const INVALID_LOG_PAGE: Status = Status::new(1, 0x09);
    /// Invalid Format (command specific 0Ah).
    pub const INVALID_FORMAT: Status = Status::new(1, 0x0a);
    /// Invalid Queue Deletion (command specific 0Ch).
    pub const INVALID_QUEUE_DELETION: Status = Status::new(1, 0x0c);
    /// Feature Identifier Not Saveable (command specific 0Dh).
    pub const FEATURE_NOT_SAVEABLE: Status = Status::new(1, 0x0d);
    /// Feature Not Namespace Specific (command specific 0Fh).
    pub const FEATURE_NOT_NS_SPECIFIC: Status = Status::new(1, 0x0f);
    /// Device Self-test in Progress (command specific 1Dh).
    pub const SELF_TEST_IN_PROGRESS: Status = Status::new(1, 0x1d);
    /// Attempted Write to Read Only Range (command specific 82h).
    pub const WRITE_TO_RO_RANGE: Status = Status::new(1, 0x82);

    /// Write Fault (media and data integrity 80h).
    pub const WRITE_FAULT: Status = Status::new(2, 0x80);
    /// Unrecovered Read Error (media and data integrity 81h).
    pub const UNRECOVERED_READ_ERROR: Status = Status::new(2, 0x81);
    /// Compare Failure (media and data integrity 85h).
    pub const COMPARE_FAILURE: Status = Status::new(2, 0x85);
}

impl Status {
    /// The spec's name for a status this controller reports.
    pub fn name(self) -> &'static str {
        const ALL: [(Status, &str); 34] = [
            (Status::SUCCESS, "SUCCESS"),
            (Status::INVALID_OPCODE, "INVALID_OPCODE"),
            (Status::INVALID_FIELD, "INVALID_FIELD"),
            (Status::DATA_TRANSFER_ERROR, "DATA_TRANSFER_ERROR"),
            (Status::INTERNAL_ERROR, "INTERNAL_ERROR"),
            (Status::ABORT_REQUESTED, "ABORT_REQUESTED"),
            (Status::ABORTED_SQ_DELETION, "ABORTED_SQ_DELETION"),
            (Status::INVALID_NAMESPACE, "INVALID_NAMESPACE"),
            (Status::COMMAND_SEQUENCE_ERROR, "COMMAND_SEQUENCE_ERROR"),
            (Status::INVALID_SGL_SEGMENT, "INVALID_SGL_SEGMENT"),
            (Status::INVALID_SGL_COUNT, "INVALID_SGL_COUNT"),
            (Status::DATA_SGL_LENGTH_INVALID, "DATA_SGL_LENGTH_INVALID"),
            (Status::SGL_TYPE_INVALID, "SGL_TYPE_INVALID"),
            (Status::PRP_OFFSET_INVALID, "PRP_OFFSET_INVALID"),
            (Status::SGL_OFFSET_INVALID, "SGL_OFFSET_INVALID"),
            (Status::NS_WRITE_PROTECTED, "NS_WRITE_PROTECTED"),
            (Status::LBA_OUT_OF_RANGE, "LBA_OUT_OF_RANGE"),
            (Status::CAPACITY_EXCEEDED, "CAPACITY_EXCEEDED"),
            (Status::CQ_INVALID, "CQ_INVALID"),
            (Status::INVALID_QID, "INVALID_QID"),
            (Status::INVALID_QUEUE_SIZE, "INVALID_QUEUE_SIZE"),
            (Status::ABORT_LIMIT_EXCEEDED, "ABORT_LIMIT_EXCEEDED"),
            (Status::AER_LIMIT_EXCEEDED, "AER_LIMIT_EXCEEDED"),
            (Status::INVALID_INTERRUPT_VECTOR, "INVALID_INTERRUPT_VECTOR"),
            (Status::INVALID_LOG_PAGE, "INVALID_LOG_PAGE"),
            (Status::SELF_TEST_IN_PROGRESS, "SELF_TEST_IN_PROGRESS"),
            (Status::INVALID_FORMAT, "INVALID_FORMAT"),
            (Status::INVALID_QUEUE_DELETION, "INVALID_QUEUE_DELETION"),
            (Status::FEATURE_NOT_SAVEABLE, "FEATURE_NOT_SAVEABLE"),
            (Status::FEATURE_NOT_NS_SPECIFIC, "FEATURE_NOT_NS_SPECIFIC"),
            (Status::WRITE_TO_RO_RANGE, "WRITE_TO_RO_RANGE"),
            (Status::WRITE_FAULT, "WRITE_FAULT"),
            (Status::UNRECOVERED_READ_ERROR, "UNRECOVERED_READ_ERROR"),
            (Status::COMPARE_FAILURE, "COMPARE_FAILURE"),
        ];
        let key = (self.sct, self.sc);
        ALL.iter()
            .find(|(s, _)| (s.sct, s.sc) == key)
            .map_or("STATUS", |&(_, n)| n)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}/{:02X}h)", self.name(), self.sct, self.sc)
    }
}

/// Feature identifiers (Get/Set Features).
pub mod fid {
    /// Arbitration (FID 01h).
    pub const ARBITRATION: u8 = 0x01;
    /// Power Management (FID 02h).
    pub const POWER_MANAGEMENT: u8 = 0x02;
    /// Temperature Threshold (FID 04h).
    pub const TEMPERATURE_THRESHOLD: u8 = 0x04;
    /// Error Recovery (FID 05h).
    pub const ERROR_RECOVERY: u8 = 0x05;
    /// Volatile Write Cache (FID 06h).
    pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
    /// Number of Queues (FID 07h).
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
    /// Interrupt Coalescing (FID 08h).
    pub const INTERRUPT_COALESCING: u8 = 0x08;
    /// Interrupt Vector Configuration (FID 09h).
    pub const INTERRUPT_VECTOR_CONFIG: u8 = 0x09;
    /// Write Atomicity Normal (FID 0Ah).
    pub const WRITE_ATOMICITY: u8 = 0x0a;
    /// Asynchronous Event Configuration (FID 0Bh).
    pub const ASYNC_EVENT_CONFIG: u8 = 0x0b;
    /// Timestamp (FID 0Eh).
    pub const TIMESTAMP: u8 = 0x0e;
}

/// Log page identifiers.
pub mod lid {
    /// Supported Log Pages (LID 00h).
    pub const SUPPORTED_LOG_PAGES: u8 = 0x00;
    /// Error Information (LID 01h).
    pub const ERROR_INFORMATION: u8 = 0x01;
    /// SMART / Health Information (LID 02h).
    pub const SMART_HEALTH: u8 = 0x02;
    /// Firmware Slot Information (LID 03h).
    pub const FIRMWARE_SLOT: u8 = 0x03;
    /// Changed Namespace List (LID 04h).
    pub const CHANGED_NAMESPACES: u8 = 0x04;
    /// Commands Supported and Effects (LID 05h).
    pub const COMMANDS_SUPPORTED_EFFECTS: u8 = 0x05;
    /// Device Self-test (LID 06h).
    pub const DEVICE_SELF_TEST: u8 = 0x06;
}

/// Device Self-test command and log values (Base spec §5.9, Figures 213–215).
pub mod self_test {
    /// Self-test Code: short device self-test operation.
    pub const SHORT: u8 = 0x1;
    /// Self-test Code: extended device self-test operation.
    pub const EXTENDED: u8 = 0x2;
    /// Self-test Code: abort the device self-test operation.
    pub const ABORT: u8 = 0xf;
    /// Result: operation completed without error.
    pub const COMPLETED: u8 = 0x0;
    /// Result: aborted by a Device Self-test command.
    pub const ABORTED_BY_COMMAND: u8 = 0x1;
    /// Result: aborted by a Controller Level Reset.
    pub const ABORTED_BY_RESET: u8 = 0x2;
    /// Result: aborted by a Format NVM command.
    pub const ABORTED_BY_FORMAT: u8 = 0x4;
    /// Result: entry not used (does not contain a valid test result).
    pub const UNUSED: u8 = 0xf;
    /// Valid Diagnostic Information: the NSID field is valid.
    pub const NSIDV: u8 = 1 << 0;
    /// Self-test results the log holds, newest first.
    pub const RESULTS: usize = 20;
}

/// Identify CNS values.
pub mod cns {
    /// Identify Namespace data structure for the specified NSID (CNS 00h).
    pub const NAMESPACE: u8 = 0x00;
    /// Identify Controller data structure (CNS 01h).
    pub const CONTROLLER: u8 = 0x01;
    /// Active Namespace ID list (CNS 02h).
    pub const ACTIVE_NS_LIST: u8 = 0x02;
    /// Namespace Identification Descriptor list (CNS 03h).
    pub const NS_ID_DESCRIPTORS: u8 = 0x03;
    /// I/O Command Set specific Identify Namespace data structure (CNS 05h).
    pub const CSI_NAMESPACE: u8 = 0x05;
    /// I/O Command Set specific Identify Controller data structure (CNS 06h).
    pub const CSI_CONTROLLER: u8 = 0x06;
    /// Active Namespace ID list associated with the specified I/O Command Set (CNS 07h).
    pub const CSI_ACTIVE_NS_LIST: u8 = 0x07;
}

/// Asynchronous event types and information (Base spec Figure 150ff).
pub mod aer {
    /// Asynchronous Event Type 000b: Error status.
    pub const TYPE_ERROR: u8 = 0;
    /// Asynchronous Event Type 001b: SMART / Health status.
    pub const TYPE_SMART: u8 = 1;
    /// Asynchronous Event Type 010b: Notice.
    pub const TYPE_NOTICE: u8 = 2;
    /// Error status information 00h: Write to Invalid Doorbell Register.
    pub const ERR_INVALID_DOORBELL: u8 = 0x00;
    /// Error status information 01h: Invalid Doorbell Write Value.
    pub const ERR_INVALID_DOORBELL_VALUE: u8 = 0x01;
    /// SMART / Health status information 01h: Temperature Threshold.
    pub const SMART_TEMPERATURE: u8 = 0x01;
    /// Notice information 00h: Namespace Attribute Changed.
    pub const NOTICE_NS_ATTR_CHANGED: u8 = 0x00;
}

/// The broadcast namespace ID.
pub const NSID_ALL: u32 = 0xffff_ffff;

/// Submission Queue Entry (64 bytes).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Sqe {
    /// Opcode (7:0), FUSE (9:8), PSDT (15:14), CID (31:16).
    pub cdw0: u32,
    /// Namespace Identifier (NSID).
    pub nsid: u32,
    /// Command Dword 2 (command specific).
    pub cdw2: u32,
    /// Command Dword 3 (command specific).
    pub cdw3: u32,
    /// Metadata Pointer (MPTR).
    pub mptr: u64,
    /// Data pointer: PRP1/PRP2 or SGL1 (16 bytes).
    pub dptr: [u64; 2],
    /// Command Dword 10 (command specific).
    pub cdw10: u32,
    /// Command Dword 11 (command specific).
    pub cdw11: u32,
    /// Command Dword 12 (command specific).
    pub cdw12: u32,
    /// Command Dword 13 (command specific).
    pub cdw13: u32,
    /// Command Dword 14 (command specific).
    pub cdw14: u32,
    /// Command Dword 15 (command specific).
    pub cdw15: u32,
}
const _: () = assert!(std::mem::size_of::<Sqe>() == 64);

impl Sqe {
    /// Command Dword 0, typed.
    pub fn dw0(&self) -> dw::Cdw0 {
        dw::Cdw0::from_bits(self.cdw0)
    }
    /// Opcode.
    pub fn opcode(&self) -> u8 {
        self.dw0().opcode()
    }
    /// Command identifier.
    pub fn cid(&self) -> u16 {
        self.dw0().cid()
    }
    /// Fused operation field.
    pub fn fuse(&self) -> u8 {
        self.dw0().fuse()
    }
    /// PRP or SGL for Data Transfer (0 = PRP).
    pub fn psdt(&self) -> u8 {
        self.dw0().psdt()
    }
}

/// Completion Queue Entry (16 bytes).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct Cqe {
    /// Command specific.
    pub dw0: u32,
    /// Command specific (Dword 1).
    pub dw1: u32,
    /// SQ head pointer.
    pub sq_head: u16,
    /// SQ identifier.
    pub sq_id: u16,
    /// Command identifier.
    pub cid: u16,
    /// Phase tag (bit 0) and status field (15:1).
    pub status: u16,
}
const _: () = assert!(std::mem::size_of::<Cqe>() == 16);

/// Power State Descriptor (32 bytes).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct PowerState {
    /// Maximum Power (MP), in units set by MXPS.
    pub mp: u16,
    /// Reserved.
    pub rsvd2: u8,
    /// Max Power Scale (MXPS, bit 0) and Non-Operational State (NOPS, bit 1).
    pub flags: u8,
    /// Entry Latency (ENLAT), in microseconds.
    pub enlat: u32,
    /// Exit Latency (EXLAT), in microseconds.
    pub exlat: u32,
    /// Relative Read Throughput (RRT).
    pub rrt: u8,
    /// Relative Read Latency (RRL).
    pub rrl: u8,
    /// Relative Write Throughput (RWT).
    pub rwt: u8,
    /// Relative Write Latency (RWL).
    pub rwl: u8,
    /// Idle Power (IDLP), in units set by IPS.
    pub idlp: u16,
    /// Idle Power Scale (IPS, bits 7:6).
    pub ips: u8,
    /// Reserved.
    pub rsvd19: u8,
    /// Active Power (ACTP), in units set by APS.
    pub actp: u16,
    /// Active Power Workload (APW, bits 2:0) and Active Power Scale (APS, bits 7:6).
    pub apw_aps: u8,
    /// Reserved.
    pub rsvd23: [u8; 9],
}
const _: () = assert!(std::mem::size_of::<PowerState>() == 32);

/// Identify Controller data structure (CNS 01h, 4096 bytes).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct IdentifyController {
    /// PCI Vendor ID (VID).
    pub vid: u16,
    /// PCI Subsystem Vendor ID (SSVID).
    pub ssvid: u16,
    /// Serial Number (SN), ASCII, space padded.
    pub sn: [u8; 20],
    /// Model Number (MN), ASCII, space padded.
    pub mn: [u8; 40],
    /// Firmware Revision (FR), ASCII, space padded.
    pub fr: [u8; 8],
    /// Recommended Arbitration Burst (RAB).
    pub rab: u8,
    /// IEEE OUI Identifier (IEEE).
    pub ieee: [u8; 3],
    /// Controller Multi-Path I/O and Namespace Sharing Capabilities (CMIC).
    pub cmic: u8,
    /// Maximum Data Transfer Size (2^n × CAP.MPSMIN; 0 = no limit).
    pub mdts: u8,
    /// Controller ID (CNTLID).
    pub cntlid: u16,
    /// Version (VER), same layout as the VS register.
    pub ver: u32,
    /// RTD3 Resume Latency (RTD3R), in microseconds.
    pub rtd3r: u32,
    /// RTD3 Entry Latency (RTD3E), in microseconds.
    pub rtd3e: u32,
    /// Optional Asynchronous Events Supported (OAES).
    pub oaes: u32,
    /// Controller Attributes (CTRATT).
    pub ctratt: u32,
    /// Read Recovery Levels Supported (RRLS).
    pub rrls: u16,
    /// Reserved.
    pub rsvd102: [u8; 9],
    /// Controller Type (CNTRLTYPE).
    pub cntrltype: u8,
    /// FRU Globally Unique Identifier (FGUID).
    pub fguid: [u8; 16],
    /// Command Retry Delay Time 1–3 (CRDT1–CRDT3), in 100 ms units.
    pub crdt: [u16; 3],
    /// Reserved.
    pub rsvd134: [u8; 119],
    /// NVM Subsystem Report (NVMSR).
    pub nvmsr: u8,
    /// VPD Write Cycle Information (VWCI).
    pub vwci: u8,
    /// Management Endpoint Capabilities (MEC).
    pub mec: u8,
    /// Optional Admin Command Support (OACS).
    pub oacs: u16,
    /// Abort Command Limit (ACL), 0's based.
    pub acl: u8,
    /// Asynchronous Event Request Limit (AERL), 0's based.
    pub aerl: u8,
    /// Firmware Updates (FRMW).
    pub frmw: u8,
    /// Log Page Attributes (LPA).
    pub lpa: u8,
    /// Error Log Page Entries (ELPE), 0's based.
    pub elpe: u8,
    /// Number of Power States Support (NPSS), 0's based.
    pub npss: u8,
    /// Admin Vendor Specific Command Configuration (AVSCC).
    pub avscc: u8,
    /// Autonomous Power State Transition Attributes (APSTA).
    pub apsta: u8,
    /// Warning Composite Temperature Threshold (WCTEMP), in kelvins.
    pub wctemp: u16,
    /// Critical Composite Temperature Threshold (CCTEMP), in kelvins.
    pub cctemp: u16,
    /// Maximum Time for Firmware Activation (MTFA), in 100 ms units.
    pub mtfa: u16,
    /// Host Memory Buffer Preferred Size (HMPRE), in 4 KiB units.
    pub hmpre: u32,
    /// Host Memory Buffer Minimum Size (HMMIN), in 4 KiB units.
    pub hmmin: u32,
    /// Total NVM Capacity (TNVMCAP), in bytes.
    pub tnvmcap: [u8; 16],
    /// Unallocated NVM Capacity (UNVMCAP), in bytes.
    pub unvmcap: [u8; 16],
    /// Replay Protected Memory Block Support (RPMBS).
    pub rpmbs: u32,
    /// Extended Device Self-test Time (EDSTT), in minutes.
    pub edstt: u16,
    /// Device Self-test Options (DSTO).
    pub dsto: u8,
    /// Firmware Update Granularity (FWUG), in 4 KiB units.
    pub fwug: u8,
    /// Keep Alive Support (KAS), granularity in 100 ms units.
    pub kas: u16,
    /// Host Controlled Thermal Management Attributes (HCTMA).
    pub hctma: u16,
    /// Minimum Thermal Management Temperature (MNTMT), in kelvins.
    pub mntmt: u16,
    /// Maximum Thermal Management Temperature (MXTMT), in kelvins.
    pub mxtmt: u16,
    /// Sanitize Capabilities (SANICAP).
    pub sanicap: u32,
    /// Host Memory Buffer Minimum Descriptor Entry Size (HMMINDS), in 4 KiB units.
    pub hmminds: u32,
    /// Host Memory Maximum Descriptors Entries (HMMAXD).
    pub hmmaxd: u16,
    /// NVM Set Identifier Maximum (NSETIDMAX).
    pub nsetidmax: u16,
    /// Endurance Group Identifier Maximum (ENDGIDMAX).
    pub endgidmax: u16,
    /// ANA Transition Time (ANATT), in seconds.
    pub anatt: u8,
    /// Asymmetric Namespace Access Capabilities (ANACAP).
    pub anacap: u8,
    /// ANA Group Identifier Maximum (ANAGRPMAX).
    pub anagrpmax: u32,
    /// Number of ANA Group Identifiers (NANAGRPID).
    pub nanagrpid: u32,
    /// Persistent Event Log Size (PELS), in 64 KiB units.
    pub pels: u32,
    /// Domain Identifier.
    pub domainid: u16,
    /// Reserved.
    pub rsvd358: [u8; 10],
    /// Max Endurance Group Capacity (MEGCAP), in bytes.
    pub megcap: [u8; 16],
    /// Reserved.
    pub rsvd384: [u8; 128],
    /// Submission Queue Entry Size (SQES): maximum (7:4) and required (3:0), as 2^n bytes.
    pub sqes: u8,
    /// Completion Queue Entry Size (CQES): maximum (7:4) and required (3:0), as 2^n bytes.
    pub cqes: u8,
    /// Maximum Outstanding Commands (MAXCMD).
    pub maxcmd: u16,
    /// Number of Namespaces (NN).
    pub nn: u32,
    /// Optional NVM Command Support (ONCS).
    pub oncs: u16,
    /// Fused Operation Support (FUSES).
    pub fuses: u16,
    /// Format NVM Attributes (FNA).
    pub fna: u8,
    /// Volatile Write Cache (VWC).
    pub vwc: u8,
    /// Atomic Write Unit Normal (AWUN), in logical blocks, 0's based.
    pub awun: u16,
    /// Atomic Write Unit Power Fail (AWUPF), in logical blocks, 0's based.
    pub awupf: u16,
    /// I/O Command Set Vendor Specific Command Configuration (ICSVSCC).
    pub icsvscc: u8,
    /// Namespace Write Protection Capabilities (NWPC).
    pub nwpc: u8,
    /// Atomic Compare & Write Unit (ACWU), in logical blocks, 0's based.
    pub acwu: u16,
    /// Optional Copy Formats Supported (OCFS).
    pub ocfs: u16,
    /// SGL Support (SGLS).
    pub sgls: u32,
    /// Maximum Number of Allowed Namespaces (MNAN).
    pub mnan: u32,
    /// Maximum Domain Namespace Attachments (MAXDNA).
    pub maxdna: [u8; 16],
    /// Maximum I/O Controller Namespace Attachments (MAXCNA).
    pub maxcna: u32,
    /// Reserved.
    pub rsvd564: [u8; 204],
    /// NVM Subsystem NVMe Qualified Name (SUBNQN), UTF-8, NUL terminated.
    pub subnqn: [u8; 256],
    /// Reserved.
    pub rsvd1024: [u8; 768],
    /// I/O Queue Command Capsule Supported Size (IOCCSZ), NVMe over Fabrics only.
    pub ioccsz: u32,
    /// I/O Queue Response Capsule Supported Size (IORCSZ), NVMe over Fabrics only.
    pub iorcsz: u32,
    /// In Capsule Data Offset (ICDOFF), NVMe over Fabrics only.
    pub icdoff: u16,
    /// Fabrics Controller Attributes (FCATT), NVMe over Fabrics only.
    pub fcatt: u8,
    /// Maximum SGL Data Block Descriptors (MSDBD), NVMe over Fabrics only.
    pub msdbd: u8,
    /// Optional Fabric Commands Support (OFCS), NVMe over Fabrics only.
    pub ofcs: u16,
    /// Reserved.
    pub rsvd1806: [u8; 242],
    /// Power State Descriptors (PSD0–PSD31).
    pub psd: [PowerState; 32],
    /// Vendor Specific.
    pub vs: [u8; 1024],
}
const _: () = assert!(std::mem::size_of::<IdentifyController>() == 4096);
const _: () = assert!(std::mem::offset_of!(IdentifyController, oacs) == 256);
const _: () = assert!(std::mem::offset_of!(IdentifyController, sqes) == 512);
const _: () = assert!(std::mem::offset_of!(IdentifyController, sgls) == 536);
const _: () = assert!(std::mem::offset_of!(IdentifyController, subnqn) == 768);
const _: () = assert!(std::mem::offset_of!(IdentifyController, psd) == 2048);

/// LBA Format descriptor.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct LbaFormat {
    /// Metadata size.
    pub ms: u16,
    /// log2 of the LBA data size.
    pub lbads: u8,
    /// Relative performance (bits 1:0).
    pub rp: u8,
}

/// Identify Namespace data structure for the NVM command set (CNS 00h, 4096 bytes).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct IdentifyNamespace {
    /// Namespace Size (NSZE), in logical blocks.
    pub nsze: u64,
    /// Namespace Capacity (NCAP), in logical blocks.
    pub ncap: u64,
    /// Namespace Utilization (NUSE), in logical blocks.
    pub nuse: u64,
    /// Namespace Features (NSFEAT).
    pub nsfeat: u8,
    /// Number of LBA Formats (NLBAF), 0's based.
    pub nlbaf: u8,
    /// Formatted LBA Size (FLBAS).
    pub flbas: u8,
    /// Metadata Capabilities (MC).
    pub mc: u8,
    /// End-to-end Data Protection Capabilities (DPC).
    pub dpc: u8,
    /// End-to-end Data Protection Type Settings (DPS).
    pub dps: u8,
    /// Namespace Multi-path I/O and Namespace Sharing Capabilities (NMIC).
    pub nmic: u8,
    /// Reservation Capabilities (RESCAP).
    pub rescap: u8,
    /// Format Progress Indicator (FPI).
    pub fpi: u8,
    /// Deallocate Logical Block Features (DLFEAT).
    pub dlfeat: u8,
    /// Namespace Atomic Write Unit Normal (NAWUN), 0's based.
    pub nawun: u16,
    /// Namespace Atomic Write Unit Power Fail (NAWUPF), 0's based.
    pub nawupf: u16,
    /// Namespace Atomic Compare & Write Unit (NACWU), 0's based.
    pub nacwu: u16,
    /// Namespace Atomic Boundary Size Normal (NABSN), 0's based.
    pub nabsn: u16,
    /// Namespace Atomic Boundary Offset (NABO).
    pub nabo: u16,
    /// Namespace Atomic Boundary Size Power Fail (NABSPF), 0's based.
    pub nabspf: u16,
    /// Namespace Optimal I/O Boundary (NOIOB), in logical blocks.
    pub noiob: u16,
    /// NVM Capacity (NVMCAP), in bytes.
    pub nvmcap: [u8; 16],
    /// Namespace Preferred Write Granularity (NPWG), 0's based.
    pub npwg: u16,
    /// Namespace Preferred Write Alignment (NPWA), 0's based.
    pub npwa: u16,
    /// Namespace Preferred Deallocate Granularity (NPDG), 0's based.
    pub npdg: u16,
    /// Namespace Preferred Deallocate Alignment (NPDA), 0's based.
    pub npda: u16,
    /// Namespace Optimal Write Size (NOWS), 0's based.
    pub nows: u16,
    /// Maximum Single Source Range Length (MSSRL).
    pub mssrl: u16,
    /// Maximum Copy Length (MCL).
    pub mcl: u32,
    /// Maximum Source Range Count (MSRC), 0's based.
    pub msrc: u8,
    /// Reserved.
    pub rsvd81: u8,
    /// Number of Unique Capability LBA Formats (NULBAF).
    pub nulbaf: u8,
    /// Reserved.
    pub rsvd83: [u8; 9],
    /// ANA Group Identifier (ANAGRPID).
    pub anagrpid: u32,
    /// Reserved.
    pub rsvd96: [u8; 3],
    /// Namespace Attributes (NSATTR).
    pub nsattr: u8,
    /// NVM Set Identifier (NVMSETID).
    pub nvmsetid: u16,
    /// Endurance Group Identifier (ENDGID).
    pub endgid: u16,
    /// Namespace Globally Unique Identifier (NGUID).
    pub nguid: [u8; 16],
    /// IEEE Extended Unique Identifier (EUI64).
    pub eui64: [u8; 8],
    /// LBA Format Support (LBAF0–LBAF63).
    pub lbaf: [LbaFormat; 64],
    /// Vendor Specific.
    pub vs: [u8; 3712],
}
const _: () = assert!(std::mem::size_of::<IdentifyNamespace>() == 4096);
const _: () = assert!(std::mem::offset_of!(IdentifyNamespace, nsattr) == 99);
const _: () = assert!(std::mem::offset_of!(IdentifyNamespace, nguid) == 104);
const _: () = assert!(std::mem::offset_of!(IdentifyNamespace, lbaf) == 128);

/// SMART / Health Information log page (LID 02h, 512 bytes).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C, packed)]
pub struct SmartLog {
    /// Critical Warning.
    pub critical_warning: u8,
    /// Composite Temperature, in kelvins.
    pub composite_temperature: u16,
    /// Available Spare, percent.
    pub available_spare: u8,
    /// Available Spare Threshold, percent.
    pub available_spare_threshold: u8,
    /// Percentage Used.
    pub percentage_used: u8,
    /// Endurance Group Critical Warning Summary.
    pub endurance_group_summary: u8,
    /// Reserved.
    pub rsvd7: [u8; 25],
    /// Data Units Read, in thousands of 512-byte units.
    pub data_units_read: u128,
    /// Data Units Written, in thousands of 512-byte units.
    pub data_units_written: u128,
    /// Host Read Commands.
    pub host_read_commands: u128,
    /// Host Write Commands.
    pub host_write_commands: u128,
    /// Controller Busy Time, in minutes.
    pub controller_busy_time: u128,
    /// Power Cycles.
    pub power_cycles: u128,
    /// Power On Hours.
    pub power_on_hours: u128,
    /// Unsafe Shutdowns.
    pub unsafe_shutdowns: u128,
    /// Media and Data Integrity Errors.
    pub media_errors: u128,
    /// Number of Error Information Log Entries.
    pub num_error_log_entries: u128,
    /// Warning Composite Temperature Time, in minutes.
    pub warning_temp_time: u32,
    /// Critical Composite Temperature Time, in minutes.
    pub critical_temp_time: u32,
    /// Temperature Sensor 1–8, in kelvins.
    pub temp_sensor: [u16; 8],
    /// Bytes 511:216: Thermal Management Temperature counters (231:216), then Reserved.
    pub rsvd216: [u8; 296],
}
const _: () = assert!(std::mem::size_of::<SmartLog>() == 512);

/// Error Information log entry (LID 01h, 64 bytes each).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C, packed)]
pub struct ErrorLogEntry {
    /// Error Count.
    pub error_count: u64,
    /// Submission Queue ID.
    pub sqid: u16,
    /// Command ID.
    pub cid: u16,
    /// Status Field (15:1) and Phase Tag (bit 0).
    pub status: u16,
    /// Parameter Error Location.
    pub param_error_location: u16,
    /// Logical Block Address (LBA).
    pub lba: u64,
    /// Namespace.
    pub nsid: u32,
    /// Vendor Specific Information Available (log page ID, 0 = none).
    pub vendor_specific: u8,
    /// Transport Type (TRTYPE).
    pub trtype: u8,
    /// Reserved.
    pub rsvd30: [u8; 2],
    /// Command Specific Information.
    pub cs: u64,
    /// Transport Type Specific Information.
    pub trtype_spec: u16,
    /// Reserved.
    pub rsvd42: [u8; 22],
}
const _: () = assert!(std::mem::size_of::<ErrorLogEntry>() == 64);

/// One Self-test Result Data Structure of the Device Self-test log (LID 06h, 28 bytes).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C, packed)]
pub struct SelfTestResult {
    /// Device Self-test Status: Self-test Code (7:4) and Result (3:0).
    pub status: u8,
    /// Segment Number of the first failed segment (0: none failed).
    pub segment: u8,
    /// Valid Diagnostic Information (NSIDV, FLBAV, SCTV, SCV).
    pub valid: u8,
    /// Reserved.
    pub rsvd3: u8,
    /// Power On Hours when the operation completed.
    pub power_on_hours: u64,
    /// Namespace Identifier the operation covered (valid with NSIDV).
    pub nsid: u32,
    /// Failing LBA (valid with FLBAV).
    pub failing_lba: u64,
    /// Status Code Type (valid with SCTV).
    pub sct: u8,
    /// Status Code (valid with SCV).
    pub sc: u8,
    /// Vendor Specific.
    pub vendor: u16,
}
const _: () = assert!(std::mem::size_of::<SelfTestResult>() == 28);

/// SGL descriptor (16 bytes).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct SglDescriptor {
    /// Address.
    pub addr: u64,
    /// Length, in bytes.
    pub len: u32,
    /// Reserved.
    pub rsvd: [u8; 3],
    /// Descriptor type (7:4) and subtype (3:0).
    pub id: u8,
}
const _: () = assert!(std::mem::size_of::<SglDescriptor>() == 16);

/// SGL descriptor types.
pub mod sgl {
    /// SGL Data Block descriptor (type 0h).
    pub const DATA_BLOCK: u8 = 0x0;
    /// SGL Bit Bucket descriptor (type 1h).
    pub const BIT_BUCKET: u8 = 0x1;
    /// SGL Segment descriptor (type 2h).
    pub const SEGMENT: u8 = 0x2;
    /// SGL Last Segment descriptor (type 3h).
    pub const LAST_SEGMENT: u8 = 0x3;
}

/// Dataset Management range (16 bytes).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct DsmRange {
    /// Context Attributes.
    pub attributes: u32,
    /// Length in Logical Blocks.
    pub nlb: u32,
    /// Starting LBA.
    pub slba: u64,
}
const _: () = assert!(std::mem::size_of::<DsmRange>() == 16);

/// Typed registers and command dwords: each field named as in the spec, at the bits the spec
/// gives it, so decoding is a call to a named accessor rather than a shift and a mask.
pub mod dw {
    use bitfield_struct::bitfield;

    /// Controller Capabilities (CAP, Base spec Figure 36).
    #[bitfield(u64)]
    pub struct Cap {
        /// Maximum Queue Entries Supported, 0's based.
        pub mqes: u16,
        /// Contiguous Queues Required.
        pub cqr: bool,
        /// Arbitration Mechanism Supported.
        #[bits(2)]
        pub ams: u8,
        #[bits(5)]
        __: u8,
        /// Timeout, in 500 ms units.
        pub to: u8,
        /// Doorbell Stride (2 ^ (2 + DSTRD) bytes).
        #[bits(4)]
        pub dstrd: u8,
        /// NVM Subsystem Reset Supported.
        pub nssrs: bool,
        /// Command Sets Supported.
        pub css: u8,
        /// Boot Partition Support.
        pub bps: bool,
        /// Controller Power Scope.
        #[bits(2)]
        pub cps: u8,
        /// Memory Page Size Minimum (2 ^ (12 + MPSMIN)).
        #[bits(4)]
        pub mpsmin: u8,
        /// Memory Page Size Maximum (2 ^ (12 + MPSMAX)).
        #[bits(4)]
        pub mpsmax: u8,
        /// Persistent Memory Region Supported.
        pub pmrs: bool,
        /// Controller Memory Buffer Supported.
        pub cmbs: bool,
        /// NVM Subsystem Shutdown Supported.
        pub nsss: bool,
        /// Controller Ready Modes Supported.
        #[bits(2)]
        pub crms: u8,
        #[bits(3)]
        __: u8,
    }

    /// Controller Configuration (CC, Base spec Figure 41).
    #[bitfield(u32)]
    pub struct Cc {
        /// Enable.
        pub en: bool,
        #[bits(3)]
        __: u8,
        /// I/O Command Set Selected.
        #[bits(3)]
        pub css: u8,
        /// Memory Page Size (2 ^ (12 + MPS)).
        #[bits(4)]
        pub mps: u8,
        /// Arbitration Mechanism Selected.
        #[bits(3)]
        pub ams: u8,
        /// Shutdown Notification (01b normal, 10b abrupt).
        #[bits(2)]
        pub shn: u8,
        /// I/O Submission Queue Entry Size (2 ^ n bytes).
        #[bits(4)]
        pub iosqes: u8,
        /// I/O Completion Queue Entry Size (2 ^ n bytes).
        #[bits(4)]
        pub iocqes: u8,
        /// Controller Ready Independent of Media Enable.
        pub crime: bool,
        #[bits(7)]
        __: u8,
    }

    /// Controller Status (CSTS, Base spec Figure 42).
    #[bitfield(u32)]
    pub struct Csts {
        /// Ready.
        pub rdy: bool,
        /// Controller Fatal Status.
        pub cfs: bool,
        /// Shutdown Status (00b normal, 01b occurring, 10b complete).
        #[bits(2)]
        pub shst: u8,
        /// NVM Subsystem Reset Occurred.
        pub nssro: bool,
        /// Processing Paused.
        pub pp: bool,
        /// Shutdown Type.
        pub st: bool,
        #[bits(25)]
        __: u32,
    }

    /// Admin Queue Attributes (AQA, Base spec Figure 44); sizes are 0's based.
    #[bitfield(u32)]
    pub struct Aqa {
        /// Admin Submission Queue Size.
        #[bits(12)]
        pub asqs: u16,
        #[bits(4)]
        __: u8,
        /// Admin Completion Queue Size.
        #[bits(12)]
        pub acqs: u16,
        #[bits(4)]
        __: u8,
    }

    /// Command Dword 0 of every SQE (Base spec Figure 91).
    #[bitfield(u32)]
    pub struct Cdw0 {
        /// Opcode.
        pub opcode: u8,
        /// Fused Operation.
        #[bits(2)]
        pub fuse: u8,
        #[bits(4)]
        __: u8,
        /// PRP or SGL for Data Transfer (0 = PRPs).
        #[bits(2)]
        pub psdt: u8,
        /// Command Identifier.
        pub cid: u16,
    }

    /// CDW10 of Create I/O CQ / Create I/O SQ (Figures 473, 477); QSIZE is 0's based.
    #[bitfield(u32)]
    pub struct Cdw10CreateQueue {
        /// Queue Identifier.
        pub qid: u16,
        /// Queue Size, 0's based.
        pub qsize: u16,
    }

    /// CDW10 of Delete I/O CQ / Delete I/O SQ (Figures 487, 491).
    #[bitfield(u32)]
    pub struct Cdw10DeleteQueue {
        /// Queue Identifier.
        pub qid: u16,
        __: u16,
    }

    /// CDW11 of Create I/O Completion Queue (Figure 474).
    #[bitfield(u32)]
    pub struct Cdw11CreateIoCompletionQueue {
        /// Physically Contiguous.
        pub pc: bool,
        /// Interrupts Enabled.
        pub ien: bool,
        #[bits(14)]
        __: u16,
        /// Interrupt Vector.
        pub iv: u16,
    }

    /// CDW11 of Create I/O Submission Queue (Figure 478).
    #[bitfield(u32)]
    pub struct Cdw11CreateIoSubmissionQueue {
        /// Physically Contiguous.
        pub pc: bool,
        /// Queue Priority.
        #[bits(2)]
        pub qprio: u8,
        #[bits(13)]
        __: u16,
        /// Completion Queue Identifier.
        pub cqid: u16,
    }

    /// CDW10 of Identify (Figure 310).
    #[bitfield(u32)]
    pub struct Cdw10Identify {
        /// Controller or Namespace Structure.
        pub cns: u8,
        __: u8,
        /// Controller Identifier.
        pub cntid: u16,
    }

    /// CDW11 of Identify (Figure 311).
    #[bitfield(u32)]
    pub struct Cdw11Identify {
        /// CNS Specific Identifier.
        pub cnssid: u16,
        __: u8,
        /// Command Set Identifier.
        pub csi: u8,
    }

    /// CDW10 of Abort (Figure 212).
    #[bitfield(u32)]
    pub struct Cdw10Abort {
        /// Submission Queue Identifier.
        pub sqid: u16,
        /// Command Identifier.
        pub cid: u16,
    }

    /// CDW10 of Get Log Page (Figure 197).
    #[bitfield(u32)]
    pub struct Cdw10GetLogPage {
        /// Log Page Identifier.
        pub lid: u8,
        /// Log Specific Field.
        #[bits(7)]
        pub lsp: u8,
        /// Retain Asynchronous Event.
        pub rae: bool,
        /// Number of Dwords Lower, 0's based (with NUMDU).
        pub numdl: u16,
    }

    /// CDW11 of Get Log Page (Figure 198).
    #[bitfield(u32)]
    pub struct Cdw11GetLogPage {
        /// Number of Dwords Upper.
        pub numdu: u16,
        /// Log Specific Identifier.
        pub lsi: u16,
    }

    /// CDW14 of Get Log Page (Figure 201).
    #[bitfield(u32)]
    pub struct Cdw14GetLogPage {
        /// UUID Index.
        #[bits(7)]
        pub uuid_index: u8,
        #[bits(16)]
        __: u16,
        /// Offset Type (0: byte offset).
        pub ot: bool,
        /// Command Set Identifier.
        pub csi: u8,
    }

    /// CDW10 of Get Features (Figure 318).
    #[bitfield(u32)]
    pub struct Cdw10GetFeatures {
        /// Feature Identifier.
        pub fid: u8,
        /// Select (0 current, 1 default, 2 saved, 3 supported capabilities).
        #[bits(3)]
        pub sel: u8,
        #[bits(21)]
        __: u32,
    }

    /// CDW10 of Set Features (Figure 392).
    #[bitfield(u32)]
    pub struct Cdw10SetFeatures {
        /// Feature Identifier.
        pub fid: u8,
        #[bits(23)]
        __: u32,
        /// Save.
        pub sv: bool,
    }

    /// CDW11 of Temperature Threshold (Figure 402).
    #[bitfield(u32)]
    pub struct Cdw11TemperatureThreshold {
        /// Temperature Threshold, in kelvins.
        pub tmpth: u16,
        /// Threshold Temperature Select (0 composite, 1-8 sensors, Fh all).
        #[bits(4)]
        pub tmpsel: u8,
        /// Threshold Type Select (0 over, 1 under).
        #[bits(2)]
        pub thsel: u8,
        #[bits(10)]
        __: u16,
    }

    /// CDW11 and completion DW0 of Number of Queues (Figures 408, 409); 0's based.
    #[bitfield(u32)]
    pub struct Cdw11NumberOfQueues {
        /// Number of I/O Submission Queues (requested or allocated).
        pub nsq: u16,
        /// Number of I/O Completion Queues (requested or allocated).
        pub ncq: u16,
    }

    /// CDW11 of Interrupt Vector Configuration (Figure 412).
    #[bitfield(u32)]
    pub struct Cdw11InterruptVectorConfig {
        /// Interrupt Vector.
        pub iv: u16,
        /// Coalescing Disable.
        pub cd: bool,
        #[bits(15)]
        __: u16,
    }

    /// CDW11 of Interrupt Coalescing (Figure 410).
    #[bitfield(u32)]
    pub struct Cdw11InterruptCoalescing {
        /// Aggregation Threshold, 0's based.
        pub thr: u8,
        /// Aggregation Time, in 100 µs units.
        pub time: u8,
        __: u16,
    }

    /// CDW10 of Format NVM (Figure 338).
    #[bitfield(u32)]
    pub struct Cdw10Format {
        /// LBA Format, lower 4 bits.
        #[bits(4)]
        pub lbafl: u8,
        /// Metadata Settings.
        pub mset: bool,
        /// Protection Information.
        #[bits(3)]
        pub pi: u8,
        /// Protection Information Location.
        pub pil: bool,
        /// Secure Erase Settings (0 none, 1 user data erase, 2 cryptographic erase).
        #[bits(3)]
        pub ses: u8,
        /// LBA Format, upper 2 bits.
        #[bits(2)]
        pub lbafu: u8,
        #[bits(18)]
        __: u32,
    }

    impl Cdw10Format {
        /// The LBA format index (LBAFU:LBAFL).
        pub fn lbaf(&self) -> usize {
            usize::from(self.lbafl()) | (usize::from(self.lbafu()) << 4)
        }
    }

    /// Completion DW0 of an Asynchronous Event Request (Figure 150).
    #[bitfield(u32)]
    pub struct AerDw0 {
        /// Asynchronous Event Type.
        #[bits(3)]
        pub typ: u8,
        #[bits(5)]
        __: u8,
        /// Asynchronous Event Information.
        pub info: u8,
        /// Log Page Identifier the host reads to clear the event.
        pub lid: u8,
        __: u8,
    }

    /// CDW12 of Read, Write, Compare and Verify (NVM Command Set Figures 17ff).
    #[bitfield(u32)]
    pub struct Cdw12ReadWrite {
        /// Number of Logical Blocks, 0's based.
        pub nlb: u16,
        #[bits(4)]
        __: u8,
        /// Directive Type.
        #[bits(4)]
        pub dtype: u8,
        /// Storage Tag Check.
        pub stc: bool,
        #[bits(1)]
        __: u8,
        /// Protection Information field.
        #[bits(4)]
        pub prinfo: u8,
        /// Force Unit Access.
        pub fua: bool,
        /// Limited Retry.
        pub lr: bool,
    }

    /// CDW10 of Dataset Management (NVM Command Set Figure 38).
    #[bitfield(u32)]
    pub struct Cdw10Dsm {
        /// Number of Ranges, 0's based.
        pub nr: u8,
        #[bits(24)]
        __: u32,
    }

    /// CDW11 of Dataset Management (NVM Command Set Figure 39).
    #[bitfield(u32)]
    pub struct Cdw11Dsm {
        /// Integral Dataset for Read.
        pub idr: bool,
        /// Integral Dataset for Write.
        pub idw: bool,
        /// Deallocate.
        pub ad: bool,
        #[bits(29)]
        __: u32,
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn fields_sit_where_the_spec_puts_them() {
            let cc = Cc::from_bits(0x0046_4001);
            assert!(cc.en());
            assert_eq!((cc.shn(), cc.iosqes(), cc.iocqes()), (1, 6, 4));
            assert_eq!(Csts::new().with_rdy(true).with_shst(2).into_bits(), 0x9);
            assert_eq!(Aqa::from_bits(0x001f_003f).asqs(), 0x3f);
            assert_eq!(Aqa::from_bits(0x001f_003f).acqs(), 0x1f);
            let c0 = Cdw0::from_bits(0xbeef_4102);
            assert_eq!(
                (c0.opcode(), c0.fuse(), c0.psdt(), c0.cid()),
                (2, 1, 1, 0xbeef)
            );
            let q = Cdw11CreateIoCompletionQueue::from_bits(0x0003_0003);
            assert!(q.pc() && q.ien());
            assert_eq!(q.iv(), 3);
            let f = Cdw10Format::from_bits((2 << 12) | (1 << 9) | 0x3);
            assert_eq!((f.lbaf(), f.ses()), (0x23, 1));
            let rw = Cdw12ReadWrite::from_bits((1 << 30) | 7);
            assert!(rw.fua() && !rw.lr());
            assert_eq!(rw.nlb(), 7);
            let aer = AerDw0::new().with_typ(2).with_info(0).with_lid(4);
            assert_eq!(aer.into_bits(), 0x0004_0002);
            let cap = Cap::new()
                .with_mqes(0xfff)
                .with_cqr(true)
                .with_to(20)
                .with_css(1);
            assert_eq!(cap.into_bits(), 0x0000_0020_1401_0fff);
        }
    }
}
