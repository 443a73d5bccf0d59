//! AHCI 1.3.1 register map: HBA (generic host control) and per-port registers, with every bit
//! the model implements named once here so the state machines read like the specification.
//!
//! Offsets are relative to ABAR (BAR5). All registers are 32 bits wide; the guest may access
//! them with any width, which the `hba` module splits into dword reads and masked dword writes.

/// Generic host control registers (AHCI 1.3.1 §3.1).
pub mod hba {
    /// Host Capabilities.
    pub const CAP: u64 = 0x00;
    /// Global HBA Control.
    pub const GHC: u64 = 0x04;
    /// Interrupt Status (one bit per port, RW1C).
    pub const IS: u64 = 0x08;
    /// Ports Implemented.
    pub const PI: u64 = 0x0c;
    /// AHCI Version.
    pub const VS: u64 = 0x10;
    /// Command Completion Coalescing Control (not supported: reads 0).
    pub const CCC_CTL: u64 = 0x14;
    /// Command Completion Coalescing Ports (not supported: reads 0).
    pub const CCC_PORTS: u64 = 0x18;
    /// Enclosure Management Location (not supported: reads 0).
    pub const EM_LOC: u64 = 0x1c;
    /// Enclosure Management Control (not supported: reads 0).
    pub const EM_CTL: u64 = 0x20;
    /// Host Capabilities Extended.
    pub const CAP2: u64 = 0x24;
    /// BIOS/OS Handoff Control and Status (not supported: reads 0).
    pub const BOHC: u64 = 0x28;
    /// First port register block.
    pub const PORT_BASE: u64 = 0x100;
    /// Size of one port register block.
    pub const PORT_STRIDE: u64 = 0x80;
    /// Maximum number of ports an AHCI HBA can have.
    pub const MAX_PORTS: usize = 32;
    /// Value of VS: AHCI 1.3.1.
    pub const VERSION_1_3_1: u32 = 0x0001_0301;
}

/// CAP bits (AHCI 1.3.1 §3.1.1).
pub mod cap {
    /// Supports 64-bit Addressing.
    pub const S64A: u32 = 1 << 31;
    /// Supports Native Command Queuing.
    pub const SNCQ: u32 = 1 << 30;
    /// Supports SNotification Register.
    pub const SSNTF: u32 = 1 << 29;
    /// Supports Mechanical Presence Switch.
    pub const SMPS: u32 = 1 << 28;
    /// Supports Staggered Spin-up.
    pub const SSS: u32 = 1 << 27;
    /// Supports Aggressive Link Power Management.
    pub const SALP: u32 = 1 << 26;
    /// Supports Activity LED.
    pub const SAL: u32 = 1 << 25;
    /// Supports Command List Override.
    pub const SCLO: u32 = 1 << 24;
    /// Interface Speed Support field shift.
    pub const ISS_SHIFT: u32 = 20;
    /// ISS value for Gen 3 (6 Gbps).
    pub const ISS_GEN3: u32 = 3;
    /// Supports AHCI mode only.
    pub const SAM: u32 = 1 << 18;
    /// Supports Port Multiplier.
    pub const SPM: u32 = 1 << 17;
    /// PIO Multiple DRQ Block.
    pub const PMD: u32 = 1 << 15;
    /// Slumber State Capable.
    pub const SSC: u32 = 1 << 14;
    /// Partial State Capable.
    pub const PSC: u32 = 1 << 13;
    /// Number of Command Slots field shift (value is slots - 1).
    pub const NCS_SHIFT: u32 = 8;
    /// Number of Ports field mask (value is ports - 1).
    pub const NP_MASK: u32 = 0x1f;
}

/// GHC bits (AHCI 1.3.1 §3.1.2).
pub mod ghc {
    /// HBA Reset.
    pub const HR: u32 = 1 << 0;
    /// Interrupt Enable.
    pub const IE: u32 = 1 << 1;
    /// MSI Revert to Single Message.
    pub const MRSM: u32 = 1 << 2;
    /// AHCI Enable.
    pub const AE: u32 = 1 << 31;
}

/// Port register offsets relative to the port block (AHCI 1.3.1 §3.3).
pub mod port {
    /// Command List Base Address (1 KiB aligned).
    pub const CLB: u64 = 0x00;
    /// Command List Base Address Upper 32 bits.
    pub const CLBU: u64 = 0x04;
    /// FIS Base Address (256-byte aligned).
    pub const FB: u64 = 0x08;
    /// FIS Base Address Upper 32 bits.
    pub const FBU: u64 = 0x0c;
    /// Interrupt Status.
    pub const IS: u64 = 0x10;
    /// Interrupt Enable.
    pub const IE: u64 = 0x14;
    /// Command and Status.
    pub const CMD: u64 = 0x18;
    /// Task File Data.
    pub const TFD: u64 = 0x20;
    /// Signature.
    pub const SIG: u64 = 0x24;
    /// Serial ATA Status (SCR0: SStatus).
    pub const SSTS: u64 = 0x28;
    /// Serial ATA Control (SCR2: SControl).
    pub const SCTL: u64 = 0x2c;
    /// Serial ATA Error (SCR1: SError).
    pub const SERR: u64 = 0x30;
    /// Serial ATA Active (SCR3: SActive).
    pub const SACT: u64 = 0x34;
    /// Command Issue.
    pub const CI: u64 = 0x38;
    /// Serial ATA Notification (SCR4: SNotification).
    pub const SNTF: u64 = 0x3c;
    /// FIS-based Switching Control (not supported: reads 0).
    pub const FBS: u64 = 0x40;
    /// Device Sleep (not supported: reads 0).
    pub const DEVSLP: u64 = 0x44;
    /// Address bits of PxCLB that software can set (1 KiB alignment).
    pub const CLB_MASK: u32 = !0x3ff;
    /// Address bits of PxFB that software can set (256-byte alignment).
    pub const FB_MASK: u32 = !0xff;
}

/// PxIS / PxIE bits (AHCI 1.3.1 §3.3.5, §3.3.6).
pub mod pxis {
    /// Device to Host Register FIS Interrupt.
    pub const DHRS: u32 = 1 << 0;
    /// PIO Setup FIS Interrupt.
    pub const PSS: u32 = 1 << 1;
    /// DMA Setup FIS Interrupt.
    pub const DSS: u32 = 1 << 2;
    /// Set Device Bits Interrupt.
    pub const SDBS: u32 = 1 << 3;
    /// Unknown FIS Interrupt.
    pub const UFS: u32 = 1 << 4;
    /// Descriptor Processed (a PRD with the I bit finished).
    pub const DPS: u32 = 1 << 5;
    /// Port Connect Change (mirrors PxSERR.DIAG.X, read-only here).
    pub const PCS: u32 = 1 << 6;
    /// Device Mechanical Presence.
    pub const DMPS: u32 = 1 << 7;
    /// PhyRdy Change (mirrors PxSERR.DIAG.N, read-only here).
    pub const PRCS: u32 = 1 << 22;
    /// Incorrect Port Multiplier.
    pub const IPMS: u32 = 1 << 23;
    /// Overflow: the device sent more data than the PRDT describes.
    pub const OFS: u32 = 1 << 24;
    /// Interface Non-fatal Error.
    pub const INFS: u32 = 1 << 26;
    /// Interface Fatal Error.
    pub const IFS: u32 = 1 << 27;
    /// Host Bus Data Error.
    pub const HBDS: u32 = 1 << 28;
    /// Host Bus Fatal Error (e.g. a pointer outside system memory).
    pub const HBFS: u32 = 1 << 29;
    /// Task File Error (a FIS arrived with ERR set).
    pub const TFES: u32 = 1 << 30;
    /// Cold Port Detect.
    pub const CPDS: u32 = 1 << 31;
    /// Bits software clears by writing 1.
    pub const RW1C: u32 =
        DHRS | PSS | DSS | SDBS | DPS | DMPS | IPMS | OFS | INFS | IFS | HBDS | HBFS | TFES | CPDS;
    /// Bits PxIE can enable.
    pub const IE_MASK: u32 = RW1C | UFS | PCS | PRCS;
    /// Errors after which the port stops processing the command list until PxCMD.ST is cleared.
    pub const FATAL: u32 = HBFS | HBDS | IFS | TFES | OFS;
}

/// PxCMD bits (AHCI 1.3.1 §3.3.7).
pub mod pxcmd {
    /// Start (process the command list).
    pub const ST: u32 = 1 << 0;
    /// Spin-Up Device (read-only 1 without staggered spin-up).
    pub const SUD: u32 = 1 << 1;
    /// Power On Device (read-only 1 without cold presence detection).
    pub const POD: u32 = 1 << 2;
    /// Command List Override.
    pub const CLO: u32 = 1 << 3;
    /// FIS Receive Enable.
    pub const FRE: u32 = 1 << 4;
    /// Current Command Slot field shift.
    pub const CCS_SHIFT: u32 = 8;
    /// Current Command Slot field mask (after shifting).
    pub const CCS_MASK: u32 = 0x1f;
    /// FIS Receive Running.
    pub const FR: u32 = 1 << 14;
    /// Command List Running.
    pub const CR: u32 = 1 << 15;
    /// Device is ATAPI (drives an activity LED; software-owned).
    pub const ATAPI: u32 = 1 << 24;
    /// Drive LED on ATAPI Enable.
    pub const DLAE: u32 = 1 << 25;
    /// Aggressive Link Power Management Enable.
    pub const ALPE: u32 = 1 << 26;
    /// Aggressive Slumber / Partial.
    pub const ASP: u32 = 1 << 27;
    /// Interface Communication Control field shift.
    pub const ICC_SHIFT: u32 = 28;
    /// ICC: no-op / idle.
    pub const ICC_IDLE: u32 = 0;
    /// ICC: go to Active.
    pub const ICC_ACTIVE: u32 = 1;
    /// ICC: go to Partial.
    pub const ICC_PARTIAL: u32 = 2;
    /// ICC: go to Slumber.
    pub const ICC_SLUMBER: u32 = 6;
    /// ICC: go to DevSleep.
    pub const ICC_DEVSLEEP: u32 = 8;
    /// Bits software owns outright (plain read/write).
    pub const RW: u32 = ATAPI | DLAE | ALPE | ASP;
}

/// PxSSTS (SStatus) fields.
pub mod ssts {
    /// DET: no device, no Phy communication.
    pub const DET_NONE: u32 = 0;
    /// DET: device presence detected, Phy communication not established.
    pub const DET_PRESENT_NO_PHY: u32 = 1;
    /// DET: device present and Phy communication established.
    pub const DET_PRESENT: u32 = 3;
    /// DET: Phy offline (interface disabled).
    pub const DET_OFFLINE: u32 = 4;
    /// SPD field shift.
    pub const SPD_SHIFT: u32 = 4;
    /// IPM field shift.
    pub const IPM_SHIFT: u32 = 8;
    /// IPM: device not present or communication not established.
    pub const IPM_NONE: u32 = 0;
    /// IPM: interface in active state.
    pub const IPM_ACTIVE: u32 = 1;
    /// IPM: Partial power management state.
    pub const IPM_PARTIAL: u32 = 2;
    /// IPM: Slumber power management state.
    pub const IPM_SLUMBER: u32 = 6;
}

/// PxSCTL (SControl) fields.
pub mod sctl {
    /// DET field mask.
    pub const DET_MASK: u32 = 0xf;
    /// DET: no action.
    pub const DET_NONE: u32 = 0;
    /// DET: perform interface initialisation (COMRESET) while set.
    pub const DET_COMRESET: u32 = 1;
    /// DET: disable the interface, Phy offline.
    pub const DET_DISABLE: u32 = 4;
    /// SPD field shift (speed limit; 0 = no restriction).
    pub const SPD_SHIFT: u32 = 4;
    /// IPM field shift (bit 0: no Partial, bit 1: no Slumber).
    pub const IPM_SHIFT: u32 = 8;
    /// IPM: transitions to Partial disabled.
    pub const IPM_NO_PARTIAL: u32 = 1;
    /// IPM: transitions to Slumber disabled.
    pub const IPM_NO_SLUMBER: u32 = 2;
    /// Fields software may write (DET, SPD, IPM, SPM, PMP).
    pub const WRITABLE: u32 = 0x000f_ffff;
}

/// PxSERR (SError) bits (SATA 3.x §14.1.3).
pub mod serr {
    /// ERR.I: recovered data integrity error.
    pub const ERR_I: u32 = 1 << 0;
    /// ERR.M: recovered communications error.
    pub const ERR_M: u32 = 1 << 1;
    /// ERR.T: transient data integrity error.
    pub const ERR_T: u32 = 1 << 8;
    /// ERR.C: persistent communication or data integrity error.
    pub const ERR_C: u32 = 1 << 9;
    /// ERR.P: protocol error.
    pub const ERR_P: u32 = 1 << 10;
    /// ERR.E: internal error.
    pub const ERR_E: u32 = 1 << 11;
    /// DIAG.N: PhyRdy change.
    pub const DIAG_N: u32 = 1 << 16;
    /// DIAG.I: Phy internal error.
    pub const DIAG_I: u32 = 1 << 17;
    /// DIAG.W: COMWAKE detected.
    pub const DIAG_W: u32 = 1 << 18;
    /// DIAG.B: 10b to 8b decode error.
    pub const DIAG_B: u32 = 1 << 19;
    /// DIAG.D: disparity error.
    pub const DIAG_D: u32 = 1 << 20;
    /// DIAG.C: CRC error.
    pub const DIAG_C: u32 = 1 << 21;
    /// DIAG.H: handshake error (R_ERR received for a transmitted frame).
    pub const DIAG_H: u32 = 1 << 22;
    /// DIAG.S: link sequence error.
    pub const DIAG_S: u32 = 1 << 23;
    /// DIAG.T: transport state transition error.
    pub const DIAG_T: u32 = 1 << 24;
    /// DIAG.F: unknown FIS type received.
    pub const DIAG_F: u32 = 1 << 25;
    /// DIAG.X: exchanged (COMINIT seen: device connected or changed).
    pub const DIAG_X: u32 = 1 << 26;
    /// All defined bits (what RW1C clears).
    pub const ALL: u32 = 0x07ff_0f03;
}

/// PxTFD layout.
pub mod tfd {
    /// Error register field shift.
    pub const ERR_SHIFT: u32 = 8;
}

/// PxSIG values (the register outputs of the signature D2H FIS after reset).
pub mod sig {
    /// ATA device.
    pub const ATA: u32 = 0x0000_0101;
    /// ATAPI device.
    pub const ATAPI: u32 = 0xeb14_0101;
}
