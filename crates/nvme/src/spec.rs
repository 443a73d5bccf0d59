//! NVMe Base 2.0 / NVM Command Set 1.0 / PCIe transport facts: register offsets and bits, opcodes,
//! status codes, feature and log identifiers, and the wire layouts (SQE, CQE, Identify pages) with
//! size assertions. Names follow the specification so a line can be checked against it quickly.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Controller register offsets in BAR0 (Base spec §3.1.3).
pub mod reg {
    pub const CAP: u64 = 0x00;
    pub const VS: u64 = 0x08;
    pub const INTMS: u64 = 0x0c;
    pub const INTMC: u64 = 0x10;
    pub const CC: u64 = 0x14;
    pub const CSTS: u64 = 0x1c;
    pub const NSSR: u64 = 0x20;
    pub const AQA: u64 = 0x24;
    pub const ASQ: u64 = 0x28;
    pub const ACQ: u64 = 0x30;
    pub const CMBLOC: u64 = 0x38;
    pub const CMBSZ: u64 = 0x3c;
    /// First doorbell (SQ 0 tail); with DSTRD=0 doorbells are 4 bytes apart.
    pub const DOORBELL_BASE: u64 = 0x1000;
}

/// Controller Configuration (CC) fields.
pub mod cc {
    pub const EN: u32 = 1 << 0;
    pub const CSS_SHIFT: u32 = 4;
    pub const CSS_MASK: u32 = 0x7;
    pub const MPS_SHIFT: u32 = 7;
    pub const MPS_MASK: u32 = 0xf;
    pub const AMS_SHIFT: u32 = 11;
    pub const SHN_SHIFT: u32 = 14;
    pub const SHN_MASK: u32 = 0x3;
    pub const IOSQES_SHIFT: u32 = 16;
    pub const IOCQES_SHIFT: u32 = 20;
    /// Bits the host may write (EN, CSS, MPS, AMS, SHN, IOSQES, IOCQES).
    pub const WRITABLE: u32 = 0x00ff_fff1;
}

/// Controller Status (CSTS) bits.
pub mod csts {
    pub const RDY: u32 = 1 << 0;
    pub const CFS: u32 = 1 << 1;
    pub const SHST_SHIFT: u32 = 2;
    pub const SHST_NORMAL: u32 = 0;
    pub const SHST_OCCURRING: u32 = 1;
    pub const SHST_COMPLETE: u32 = 2;
    pub const SHST_MASK: u32 = 0x3 << 2;
}

/// Admin command opcodes.
pub mod admin_op {
    pub const DELETE_IO_SQ: u8 = 0x00;
    pub const CREATE_IO_SQ: u8 = 0x01;
    pub const GET_LOG_PAGE: u8 = 0x02;
    pub const DELETE_IO_CQ: u8 = 0x04;
    pub const CREATE_IO_CQ: u8 = 0x05;
    pub const IDENTIFY: u8 = 0x06;
    pub const ABORT: u8 = 0x08;
    pub const SET_FEATURES: u8 = 0x09;
    pub const GET_FEATURES: u8 = 0x0a;
    pub const ASYNC_EVENT_REQUEST: u8 = 0x0c;
    pub const KEEP_ALIVE: u8 = 0x18;
    pub const DOORBELL_BUFFER_CONFIG: u8 = 0x7c;
    pub const FORMAT_NVM: u8 = 0x80;
}

/// NVM command set I/O opcodes.
pub mod io_op {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const WRITE_UNCORRECTABLE: u8 = 0x04;
    pub const COMPARE: u8 = 0x05;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DATASET_MANAGEMENT: u8 = 0x09;
    pub const VERIFY: u8 = 0x0c;
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

    pub const SUCCESS: Status = Status::new(0, 0x00);
    pub const INVALID_OPCODE: Status = Status::new(0, 0x01);
    pub const INVALID_FIELD: Status = Status::new(0, 0x02);
    pub const DATA_TRANSFER_ERROR: Status = Status::new(0, 0x04);
    pub const INTERNAL_ERROR: Status = Status::new(0, 0x06);
    pub const ABORT_REQUESTED: Status = Status::new(0, 0x07);
    pub const ABORTED_SQ_DELETION: Status = Status::new(0, 0x08);
    pub const INVALID_NAMESPACE: Status = Status::new(0, 0x0b);
    pub const COMMAND_SEQUENCE_ERROR: Status = Status::new(0, 0x0c);
    pub const INVALID_SGL_SEGMENT: Status = Status::new(0, 0x0d);
    pub const INVALID_SGL_COUNT: Status = Status::new(0, 0x0e);
    pub const DATA_SGL_LENGTH_INVALID: Status = Status::new(0, 0x0f);
    pub const SGL_TYPE_INVALID: Status = Status::new(0, 0x11);
    pub const PRP_OFFSET_INVALID: Status = Status::new(0, 0x13);
    pub const SGL_OFFSET_INVALID: Status = Status::new(0, 0x16);
    pub const NS_WRITE_PROTECTED: Status = Status::new(0, 0x20);
    pub const LBA_OUT_OF_RANGE: Status = Status::new(0, 0x80);
    pub const CAPACITY_EXCEEDED: Status = Status::new(0, 0x81);

    pub const CQ_INVALID: Status = Status::new(1, 0x00);
    pub const INVALID_QID: Status = Status::new(1, 0x01);
    pub const INVALID_QUEUE_SIZE: Status = Status::new(1, 0x02);
    pub const ABORT_LIMIT_EXCEEDED: Status = Status::new(1, 0x03);
    pub const AER_LIMIT_EXCEEDED: Status = Status::new(1, 0x05);
    pub const INVALID_INTERRUPT_VECTOR: Status = Status::new(1, 0x08);
    pub const INVALID_LOG_PAGE: Status = Status::new(1, 0x09);
    pub const INVALID_FORMAT: Status = Status::new(1, 0x0a);
    pub const INVALID_QUEUE_DELETION: Status = Status::new(1, 0x0c);
    pub const FEATURE_NOT_SAVEABLE: Status = Status::new(1, 0x0d);
    pub const FEATURE_NOT_NS_SPECIFIC: Status = Status::new(1, 0x0f);
    pub const WRITE_TO_RO_RANGE: Status = Status::new(1, 0x82);

    pub const WRITE_FAULT: Status = Status::new(2, 0x80);
    pub const UNRECOVERED_READ_ERROR: Status = Status::new(2, 0x81);
    pub const COMPARE_FAILURE: Status = Status::new(2, 0x85);
}

/// Feature identifiers (Get/Set Features).
pub mod fid {
    pub const ARBITRATION: u8 = 0x01;
    pub const POWER_MANAGEMENT: u8 = 0x02;
    pub const TEMPERATURE_THRESHOLD: u8 = 0x04;
    pub const ERROR_RECOVERY: u8 = 0x05;
    pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
    pub const INTERRUPT_COALESCING: u8 = 0x08;
    pub const INTERRUPT_VECTOR_CONFIG: u8 = 0x09;
    pub const WRITE_ATOMICITY: u8 = 0x0a;
    pub const ASYNC_EVENT_CONFIG: u8 = 0x0b;
    pub const TIMESTAMP: u8 = 0x0e;
}

/// Log page identifiers.
pub mod lid {
    pub const ERROR_INFORMATION: u8 = 0x01;
    pub const SMART_HEALTH: u8 = 0x02;
    pub const FIRMWARE_SLOT: u8 = 0x03;
    pub const CHANGED_NAMESPACES: u8 = 0x04;
    pub const COMMANDS_SUPPORTED_EFFECTS: u8 = 0x05;
}

/// Identify CNS values.
pub mod cns {
    pub const NAMESPACE: u8 = 0x00;
    pub const CONTROLLER: u8 = 0x01;
    pub const ACTIVE_NS_LIST: u8 = 0x02;
    pub const NS_ID_DESCRIPTORS: u8 = 0x03;
    pub const CSI_NAMESPACE: u8 = 0x05;
    pub const CSI_CONTROLLER: u8 = 0x06;
    pub const CSI_ACTIVE_NS_LIST: u8 = 0x07;
}

/// Asynchronous event types and information (Base spec Figure 150ff).
pub mod aer {
    pub const TYPE_ERROR: u8 = 0;
    pub const TYPE_SMART: u8 = 1;
    pub const TYPE_NOTICE: u8 = 2;
    pub const ERR_INVALID_DOORBELL: u8 = 0x00;
    pub const ERR_INVALID_DOORBELL_VALUE: u8 = 0x01;
    pub const SMART_TEMPERATURE: u8 = 0x01;
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
    pub nsid: u32,
    pub cdw2: u32,
    pub cdw3: u32,
    pub mptr: u64,
    /// Data pointer: PRP1/PRP2 or SGL1 (16 bytes).
    pub dptr: [u64; 2],
    pub cdw10: u32,
    pub cdw11: u32,
    pub cdw12: u32,
    pub cdw13: u32,
    pub cdw14: u32,
    pub cdw15: u32,
}
const _: () = assert!(std::mem::size_of::<Sqe>() == 64);

impl Sqe {
    /// Opcode.
    pub fn opcode(&self) -> u8 {
        self.cdw0 as u8
    }
    /// Command identifier.
    pub fn cid(&self) -> u16 {
        (self.cdw0 >> 16) as u16
    }
    /// Fused operation field.
    pub fn fuse(&self) -> u8 {
        ((self.cdw0 >> 8) & 3) as u8
    }
    /// PRP or SGL for Data Transfer (0 = PRP).
    pub fn psdt(&self) -> u8 {
        ((self.cdw0 >> 14) & 3) as u8
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
    pub mp: u16,
    pub rsvd2: u8,
    pub flags: u8,
    pub enlat: u32,
    pub exlat: u32,
    pub rrt: u8,
    pub rrl: u8,
    pub rwt: u8,
    pub rwl: u8,
    pub idlp: u16,
    pub ips: u8,
    pub rsvd19: u8,
    pub actp: u16,
    pub apw_aps: u8,
    pub rsvd23: [u8; 9],
}
const _: () = assert!(std::mem::size_of::<PowerState>() == 32);

/// Identify Controller data structure (CNS 01h, 4096 bytes).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct IdentifyController {
    pub vid: u16,
    pub ssvid: u16,
    pub sn: [u8; 20],
    pub mn: [u8; 40],
    pub fr: [u8; 8],
    pub rab: u8,
    pub ieee: [u8; 3],
    pub cmic: u8,
    pub mdts: u8,
    pub cntlid: u16,
    pub ver: u32,
    pub rtd3r: u32,
    pub rtd3e: u32,
    pub oaes: u32,
    pub ctratt: u32,
    pub rrls: u16,
    pub rsvd102: [u8; 9],
    pub cntrltype: u8,
    pub fguid: [u8; 16],
    pub crdt: [u16; 3],
    pub rsvd134: [u8; 119],
    pub nvmsr: u8,
    pub vwci: u8,
    pub mec: u8,
    pub oacs: u16,
    pub acl: u8,
    pub aerl: u8,
    pub frmw: u8,
    pub lpa: u8,
    pub elpe: u8,
    pub npss: u8,
    pub avscc: u8,
    pub apsta: u8,
    pub wctemp: u16,
    pub cctemp: u16,
    pub mtfa: u16,
    pub hmpre: u32,
    pub hmmin: u32,
    pub tnvmcap: [u8; 16],
    pub unvmcap: [u8; 16],
    pub rpmbs: u32,
    pub edstt: u16,
    pub dsto: u8,
    pub fwug: u8,
    pub kas: u16,
    pub hctma: u16,
    pub mntmt: u16,
    pub mxtmt: u16,
    pub sanicap: u32,
    pub hmminds: u32,
    pub hmmaxd: u16,
    pub nsetidmax: u16,
    pub endgidmax: u16,
    pub anatt: u8,
    pub anacap: u8,
    pub anagrpmax: u32,
    pub nanagrpid: u32,
    pub pels: u32,
    pub domainid: u16,
    pub rsvd358: [u8; 10],
    pub megcap: [u8; 16],
    pub rsvd384: [u8; 128],
    pub sqes: u8,
    pub cqes: u8,
    pub maxcmd: u16,
    pub nn: u32,
    pub oncs: u16,
    pub fuses: u16,
    pub fna: u8,
    pub vwc: u8,
    pub awun: u16,
    pub awupf: u16,
    pub icsvscc: u8,
    pub nwpc: u8,
    pub acwu: u16,
    pub ocfs: u16,
    pub sgls: u32,
    pub mnan: u32,
    pub maxdna: [u8; 16],
    pub maxcna: u32,
    pub rsvd564: [u8; 204],
    pub subnqn: [u8; 256],
    pub rsvd1024: [u8; 768],
    pub ioccsz: u32,
    pub iorcsz: u32,
    pub icdoff: u16,
    pub fcatt: u8,
    pub msdbd: u8,
    pub ofcs: u16,
    pub rsvd1806: [u8; 242],
    pub psd: [PowerState; 32],
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
    pub nsze: u64,
    pub ncap: u64,
    pub nuse: u64,
    pub nsfeat: u8,
    pub nlbaf: u8,
    pub flbas: u8,
    pub mc: u8,
    pub dpc: u8,
    pub dps: u8,
    pub nmic: u8,
    pub rescap: u8,
    pub fpi: u8,
    pub dlfeat: u8,
    pub nawun: u16,
    pub nawupf: u16,
    pub nacwu: u16,
    pub nabsn: u16,
    pub nabo: u16,
    pub nabspf: u16,
    pub noiob: u16,
    pub nvmcap: [u8; 16],
    pub npwg: u16,
    pub npwa: u16,
    pub npdg: u16,
    pub npda: u16,
    pub nows: u16,
    pub mssrl: u16,
    pub mcl: u32,
    pub msrc: u8,
    pub rsvd81: u8,
    pub nulbaf: u8,
    pub rsvd83: [u8; 9],
    pub anagrpid: u32,
    pub rsvd96: [u8; 3],
    pub nsattr: u8,
    pub nvmsetid: u16,
    pub endgid: u16,
    pub nguid: [u8; 16],
    pub eui64: [u8; 8],
    pub lbaf: [LbaFormat; 64],
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
    pub critical_warning: u8,
    pub composite_temperature: u16,
    pub available_spare: u8,
    pub available_spare_threshold: u8,
    pub percentage_used: u8,
    pub endurance_group_summary: u8,
    pub rsvd7: [u8; 25],
    pub data_units_read: u128,
    pub data_units_written: u128,
    pub host_read_commands: u128,
    pub host_write_commands: u128,
    pub controller_busy_time: u128,
    pub power_cycles: u128,
    pub power_on_hours: u128,
    pub unsafe_shutdowns: u128,
    pub media_errors: u128,
    pub num_error_log_entries: u128,
    pub warning_temp_time: u32,
    pub critical_temp_time: u32,
    pub temp_sensor: [u16; 8],
    pub rsvd216: [u8; 296],
}
const _: () = assert!(std::mem::size_of::<SmartLog>() == 512);

/// Error Information log entry (LID 01h, 64 bytes each).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C, packed)]
pub struct ErrorLogEntry {
    pub error_count: u64,
    pub sqid: u16,
    pub cid: u16,
    pub status: u16,
    pub param_error_location: u16,
    pub lba: u64,
    pub nsid: u32,
    pub vendor_specific: u8,
    pub trtype: u8,
    pub rsvd30: [u8; 2],
    pub cs: u64,
    pub trtype_spec: u16,
    pub rsvd42: [u8; 22],
}
const _: () = assert!(std::mem::size_of::<ErrorLogEntry>() == 64);

/// SGL descriptor (16 bytes).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct SglDescriptor {
    pub addr: u64,
    pub len: u32,
    pub rsvd: [u8; 3],
    /// Descriptor type (7:4) and subtype (3:0).
    pub id: u8,
}
const _: () = assert!(std::mem::size_of::<SglDescriptor>() == 16);

/// SGL descriptor types.
pub mod sgl {
    pub const DATA_BLOCK: u8 = 0x0;
    pub const BIT_BUCKET: u8 = 0x1;
    pub const SEGMENT: u8 = 0x2;
    pub const LAST_SEGMENT: u8 = 0x3;
}

/// Dataset Management range (16 bytes).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct DsmRange {
    pub attributes: u32,
    pub nlb: u32,
    pub slba: u64,
}
const _: () = assert!(std::mem::size_of::<DsmRange>() == 16);
