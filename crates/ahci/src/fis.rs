//! Frame Information Structures (SATA 3.x §10.5) and AHCI's in-memory structures (AHCI 1.3.1
//! §4.2): the command header, the command table and its PRDT, and the received-FIS area.
//!
//! Every structure is a `#[repr(C)]` zerocopy type built from unaligned little-endian fields, so
//! guest bytes are parsed without `unsafe` and without alignment assumptions, and each size is
//! checked at compile time against the specification.

use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// FIS type codes.
pub mod fis_type {
    /// Register FIS, host to device.
    pub const REG_H2D: u8 = 0x27;
    /// Register FIS, device to host.
    pub const REG_D2H: u8 = 0x34;
    /// DMA Activate FIS, device to host.
    pub const DMA_ACTIVATE: u8 = 0x39;
    /// DMA Setup FIS, bidirectional.
    pub const DMA_SETUP: u8 = 0x41;
    /// Data FIS, bidirectional.
    pub const DATA: u8 = 0x46;
    /// BIST Activate FIS.
    pub const BIST: u8 = 0x58;
    /// PIO Setup FIS, device to host.
    pub const PIO_SETUP: u8 = 0x5f;
    /// Set Device Bits FIS, device to host.
    pub const SET_DEVICE_BITS: u8 = 0xa1;
}

/// Byte 1 of a Register H2D FIS: C bit (the FIS updates the Command register).
pub const H2D_C: u8 = 1 << 7;
/// Interrupt bit in byte 1 of device-to-host FISes.
pub const FIS_I: u8 = 1 << 6;
/// Direction bit in byte 1 of PIO Setup and DMA Setup FISes (1 = device to host).
pub const FIS_D: u8 = 1 << 5;
/// Auto-activate bit in byte 1 of a DMA Setup FIS.
pub const FIS_A: u8 = 1 << 7;
/// Notification bit in byte 1 of a Set Device Bits FIS.
pub const SDB_N: u8 = 1 << 7;
/// Device Control register: software reset.
pub const CONTROL_SRST: u8 = 1 << 2;

/// Register FIS, host to device: the command (or device control) the host sends.
#[repr(C)]
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
pub struct H2dRegisterFis {
    /// [`fis_type::REG_H2D`].
    pub fis_type: u8,
    /// Bits 3:0 PM port, bit 7 C (command register update).
    pub flags: u8,
    /// ATA command.
    pub command: u8,
    /// Features 7:0.
    pub features: u8,
    /// LBA 7:0.
    pub lba0: u8,
    /// LBA 15:8.
    pub lba1: u8,
    /// LBA 23:16.
    pub lba2: u8,
    /// Device register.
    pub device: u8,
    /// LBA 31:24.
    pub lba3: u8,
    /// LBA 39:32.
    pub lba4: u8,
    /// LBA 47:40.
    pub lba5: u8,
    /// Features 15:8.
    pub features_exp: u8,
    /// Count 7:0.
    pub count: u8,
    /// Count 15:8.
    pub count_exp: u8,
    /// Isochronous command completion.
    pub icc: u8,
    /// Device Control register.
    pub control: u8,
    /// Auxiliary 31:0.
    pub aux: U32,
}

impl H2dRegisterFis {
    /// The 48-bit LBA.
    pub fn lba48(&self) -> u64 {
        u64::from_le_bytes([
            self.lba0, self.lba1, self.lba2, self.lba3, self.lba4, self.lba5, 0, 0,
        ])
    }
    /// The 28-bit LBA (bits 27:24 come from the Device register).
    pub fn lba28(&self) -> u64 {
        u64::from_le_bytes([
            self.lba0,
            self.lba1,
            self.lba2,
            self.device & 0x0f,
            0,
            0,
            0,
            0,
        ])
    }
    /// Count 15:0.
    pub fn count16(&self) -> u16 {
        u16::from_le_bytes([self.count, self.count_exp])
    }
    /// Features 15:0.
    pub fn features16(&self) -> u16 {
        u16::from_le_bytes([self.features, self.features_exp])
    }
    /// True when the C bit says this FIS carries a command (else it is a device control update).
    pub fn is_command(&self) -> bool {
        self.flags & H2D_C != 0
    }
}

/// Register FIS, device to host: command status and register outputs.
#[repr(C)]
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
pub struct D2hRegisterFis {
    /// [`fis_type::REG_D2H`].
    pub fis_type: u8,
    /// Bit 6: interrupt.
    pub flags: u8,
    /// Status register.
    pub status: u8,
    /// Error register.
    pub error: u8,
    /// LBA 7:0.
    pub lba0: u8,
    /// LBA 15:8.
    pub lba1: u8,
    /// LBA 23:16.
    pub lba2: u8,
    /// Device register.
    pub device: u8,
    /// LBA 31:24.
    pub lba3: u8,
    /// LBA 39:32.
    pub lba4: u8,
    /// LBA 47:40.
    pub lba5: u8,
    /// Reserved.
    pub rsvd0: u8,
    /// Count 7:0.
    pub count: u8,
    /// Count 15:8.
    pub count_exp: u8,
    /// Reserved.
    pub rsvd1: [u8; 6],
}

/// PIO Setup FIS, device to host: announces a PIO data block and the status after it.
#[repr(C)]
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
pub struct PioSetupFis {
    /// [`fis_type::PIO_SETUP`].
    pub fis_type: u8,
    /// Bit 5: direction (1 = device to host), bit 6: interrupt.
    pub flags: u8,
    /// Status register at the start of the transfer.
    pub status: u8,
    /// Error register.
    pub error: u8,
    /// LBA 7:0.
    pub lba0: u8,
    /// LBA 15:8.
    pub lba1: u8,
    /// LBA 23:16.
    pub lba2: u8,
    /// Device register.
    pub device: u8,
    /// LBA 31:24.
    pub lba3: u8,
    /// LBA 39:32.
    pub lba4: u8,
    /// LBA 47:40.
    pub lba5: u8,
    /// Reserved.
    pub rsvd0: u8,
    /// Count 7:0.
    pub count: u8,
    /// Count 15:8.
    pub count_exp: u8,
    /// Reserved.
    pub rsvd1: u8,
    /// Status register after the data block (E_Status).
    pub e_status: u8,
    /// Bytes in the data block.
    pub transfer_count: U16,
    /// Reserved.
    pub rsvd2: [u8; 2],
}

/// DMA Setup FIS: announces a first-party DMA transfer (sent by the device for NCQ).
#[repr(C)]
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
pub struct DmaSetupFis {
    /// [`fis_type::DMA_SETUP`].
    pub fis_type: u8,
    /// Bit 5: direction, bit 6: interrupt, bit 7: auto-activate.
    pub flags: u8,
    /// Reserved.
    pub rsvd0: [u8; 2],
    /// DMA buffer identifier low (the NCQ tag for AHCI).
    pub buffer_id_lo: U32,
    /// DMA buffer identifier high.
    pub buffer_id_hi: U32,
    /// Reserved.
    pub rsvd1: U32,
    /// Byte offset into the buffer.
    pub buffer_offset: U32,
    /// Bytes to transfer.
    pub transfer_count: U32,
    /// Reserved.
    pub rsvd2: U32,
}

/// Set Device Bits FIS: NCQ completions (SActive bits) and asynchronous notification.
#[repr(C)]
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
pub struct SetDeviceBitsFis {
    /// [`fis_type::SET_DEVICE_BITS`].
    pub fis_type: u8,
    /// Bit 6: interrupt, bit 7: notification.
    pub flags: u8,
    /// Status bits 6:4 (high nibble) and 2:0 (low nibble).
    pub status: u8,
    /// Error register.
    pub error: u8,
    /// Tags completed (one bit per tag).
    pub sactive: U32,
}

/// Command header: one of 32 entries in a port's command list.
#[repr(C)]
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
pub struct CommandHeader {
    /// DW0 bits 15:0: CFL, A, W, P, R, B, C, PMP.
    pub flags: U16,
    /// PRD Table Length (entries).
    pub prdtl: U16,
    /// PRD Byte Count (bytes transferred, written by the HBA).
    pub prdbc: U32,
    /// Command Table Base Address (128-byte aligned).
    pub ctba: U32,
    /// Command Table Base Address Upper 32 bits.
    pub ctbau: U32,
    /// Reserved.
    pub rsvd: [U32; 4],
}

/// Command header flag fields.
pub mod header {
    /// Command FIS Length in dwords (bits 4:0).
    pub const CFL_MASK: u16 = 0x1f;
    /// ATAPI: the command table's ACMD holds a SCSI CDB.
    pub const A: u16 = 1 << 5;
    /// Write (host to device).
    pub const W: u16 = 1 << 6;
    /// Prefetchable.
    pub const P: u16 = 1 << 7;
    /// Reset (part of a software reset sequence).
    pub const R: u16 = 1 << 8;
    /// BIST.
    pub const B: u16 = 1 << 9;
    /// Clear Busy upon R_OK.
    pub const C: u16 = 1 << 10;
    /// Offset of the PRDBC field in the header.
    pub const PRDBC_OFFSET: u64 = 4;
    /// Address bits of CTBA that are significant (128-byte alignment).
    pub const CTBA_MASK: u32 = !0x7f;
}

impl CommandHeader {
    /// Command FIS length in dwords.
    pub fn cfl(&self) -> u16 {
        self.flags.get() & header::CFL_MASK
    }
    /// Command table address (reserved low bits ignored, as the hardware does).
    pub fn ctba(&self) -> u64 {
        u64::from(self.ctba.get() & header::CTBA_MASK) | (u64::from(self.ctbau.get()) << 32)
    }
}

/// Physical Region Descriptor: one scatter/gather element of a command's data buffer.
#[repr(C)]
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
pub struct PrdtEntry {
    /// Data Base Address (bit 0 reserved: word aligned).
    pub dba: U32,
    /// Data Base Address Upper 32 bits.
    pub dbau: U32,
    /// Reserved.
    pub rsvd: U32,
    /// Bits 21:0 byte count - 1, bits 30:22 reserved, bit 31 interrupt on completion.
    pub dbc: U32,
}

/// PRDT entry DW3 fields.
pub mod prd {
    /// Byte count minus one (22 bits: at most 4 MiB per entry).
    pub const DBC_MASK: u32 = 0x003f_ffff;
    /// Reserved bits that a well-formed entry leaves zero.
    pub const RESERVED_MASK: u32 = 0x7fc0_0000;
    /// Interrupt on completion.
    pub const I: u32 = 1 << 31;
    /// Largest byte count of one entry.
    pub const MAX_BYTES: u32 = 4 << 20;
}

/// Command table layout.
pub mod table {
    /// Offset of the command FIS.
    pub const CFIS: u64 = 0x00;
    /// Size of the command FIS area.
    pub const CFIS_LEN: usize = 64;
    /// Offset of the ATAPI command (CDB).
    pub const ACMD: u64 = 0x40;
    /// Size of the ATAPI command area.
    pub const ACMD_LEN: usize = 16;
    /// Offset of the first PRDT entry.
    pub const PRDT: u64 = 0x80;
}

/// Received-FIS area (AHCI 1.3.1 §4.2.1): where the HBA copies FISes from the device.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct ReceivedFis {
    /// DMA Setup FIS (DSFIS) at 00h.
    pub dsfis: DmaSetupFis,
    /// Reserved.
    pub rsvd0: [u8; 4],
    /// PIO Setup FIS (PSFIS) at 20h.
    pub psfis: PioSetupFis,
    /// Reserved.
    pub rsvd1: [u8; 12],
    /// D2H Register FIS (RFIS) at 40h.
    pub rfis: D2hRegisterFis,
    /// Reserved.
    pub rsvd2: [u8; 4],
    /// Set Device Bits FIS (SDBFIS) at 58h.
    pub sdbfis: SetDeviceBitsFis,
    /// Unknown FIS (UFIS) at 60h.
    pub ufis: [u8; 64],
    /// Reserved.
    pub rsvd3: [u8; 96],
}

/// Offsets of the received-FIS slots.
pub mod rx {
    /// DMA Setup FIS.
    pub const DSFIS: u64 = 0x00;
    /// PIO Setup FIS.
    pub const PSFIS: u64 = 0x20;
    /// D2H Register FIS.
    pub const RFIS: u64 = 0x40;
    /// Set Device Bits FIS.
    pub const SDBFIS: u64 = 0x58;
    /// Unknown FIS.
    pub const UFIS: u64 = 0x60;
}

/// Size of one command header.
pub const COMMAND_HEADER_SIZE: usize = 32;
/// Size of one PRDT entry.
pub const PRDT_ENTRY_SIZE: usize = 16;
/// Size of the received-FIS area.
pub const RECEIVED_FIS_SIZE: usize = 256;

const _: () = assert!(size_of::<H2dRegisterFis>() == 20);
const _: () = assert!(size_of::<D2hRegisterFis>() == 20);
const _: () = assert!(size_of::<PioSetupFis>() == 20);
const _: () = assert!(size_of::<DmaSetupFis>() == 28);
const _: () = assert!(size_of::<SetDeviceBitsFis>() == 8);
const _: () = assert!(size_of::<CommandHeader>() == COMMAND_HEADER_SIZE);
const _: () = assert!(size_of::<PrdtEntry>() == PRDT_ENTRY_SIZE);
const _: () = assert!(size_of::<ReceivedFis>() == RECEIVED_FIS_SIZE);
const _: () = assert!(std::mem::offset_of!(ReceivedFis, psfis) as u64 == rx::PSFIS);
const _: () = assert!(std::mem::offset_of!(ReceivedFis, rfis) as u64 == rx::RFIS);
const _: () = assert!(std::mem::offset_of!(ReceivedFis, sdbfis) as u64 == rx::SDBFIS);
const _: () = assert!(std::mem::offset_of!(ReceivedFis, ufis) as u64 == rx::UFIS);

/// Register outputs of a command, as the device reports them in a D2H Register FIS (and in the
/// PIO Setup / Set Device Bits FISes, which carry subsets).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TaskFile {
    /// Status register.
    pub status: u8,
    /// Error register.
    pub error: u8,
    /// Count 15:0.
    pub count: u16,
    /// LBA 47:0.
    pub lba: u64,
    /// Device register.
    pub device: u8,
}

impl TaskFile {
    /// The D2H Register FIS carrying these outputs.
    pub fn d2h(&self, interrupt: bool) -> D2hRegisterFis {
        let l = self.lba.to_le_bytes();
        let c = self.count.to_le_bytes();
        D2hRegisterFis {
            fis_type: fis_type::REG_D2H,
            flags: if interrupt { FIS_I } else { 0 },
            status: self.status,
            error: self.error,
            lba0: l[0],
            lba1: l[1],
            lba2: l[2],
            device: self.device,
            lba3: l[3],
            lba4: l[4],
            lba5: l[5],
            count: c[0],
            count_exp: c[1],
            ..Default::default()
        }
    }

    /// A PIO Setup FIS announcing `bytes` of data with these outputs and ending status.
    pub fn pio_setup(
        &self,
        start_status: u8,
        bytes: u16,
        to_host: bool,
        interrupt: bool,
    ) -> PioSetupFis {
        let d = self.d2h(false);
        PioSetupFis {
            fis_type: fis_type::PIO_SETUP,
            flags: (if to_host { FIS_D } else { 0 }) | (if interrupt { FIS_I } else { 0 }),
            status: start_status,
            error: self.error,
            lba0: d.lba0,
            lba1: d.lba1,
            lba2: d.lba2,
            device: d.device,
            lba3: d.lba3,
            lba4: d.lba4,
            lba5: d.lba5,
            count: d.count,
            count_exp: d.count_exp,
            e_status: self.status,
            transfer_count: U16::new(bytes),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h2d_field_decoding() {
        let mut b = [0u8; 20];
        b[0] = fis_type::REG_H2D;
        b[1] = H2D_C;
        b[2] = 0x25;
        b[3] = 0x11;
        b[4..8].copy_from_slice(&[1, 2, 3, 0xe5]);
        b[8..12].copy_from_slice(&[4, 5, 6, 0x22]);
        b[12..14].copy_from_slice(&[0x10, 0x01]);
        let f = H2dRegisterFis::read_from_bytes(&b).unwrap();
        assert!(f.is_command());
        assert_eq!(f.lba48(), 0x0605_0403_0201);
        assert_eq!(f.lba28(), 0x0503_0201);
        assert_eq!(f.count16(), 0x0110);
        assert_eq!(f.features16(), 0x2211);
    }

    #[test]
    fn outputs_to_fis() {
        let tf = TaskFile {
            status: 0x51,
            error: 0x10,
            count: 0x0203,
            lba: 0x0a0b_0c0d_0e0f,
            device: 0x40,
        };
        let d = tf.d2h(true);
        assert_eq!(
            d.as_bytes()[..14],
            [0x34, 0x40, 0x51, 0x10, 0x0f, 0x0e, 0x0d, 0x40, 0x0c, 0x0b, 0x0a, 0, 3, 2]
        );
        let p = tf.pio_setup(0x58, 512, true, true);
        assert_eq!(
            (p.flags, p.status, p.e_status, p.transfer_count.get()),
            (0x60, 0x58, 0x51, 512)
        );
    }
}
