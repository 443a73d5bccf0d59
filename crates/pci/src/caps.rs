//! Capability builders: Power Management, MSI, MSI-X and PCI Express (endpoint).
//!
//! Each builder appends the capability to a [`ConfigSpace`], sets which bits the guest may write,
//! and returns the capability's offset. Run-time behaviour (delivering MSI/MSI-X) is in
//! [`crate::function`].

use crate::config::{cap_id, ConfigSpace};

/// MSI capability register offsets relative to the capability (64-bit layout with masking).
pub mod msi {
    pub const CONTROL: usize = 2;
    pub const ADDR_LO: usize = 4;
    pub const ADDR_HI: usize = 8;
    pub const DATA: usize = 12;
    pub const MASK: usize = 16;
    pub const PENDING: usize = 20;
    /// Capability length.
    pub const LEN: usize = 24;
    pub const CTRL_ENABLE: u16 = 1 << 0;
    pub const CTRL_MME_SHIFT: u16 = 4;
    pub const CTRL_64BIT: u16 = 1 << 7;
    pub const CTRL_PVM: u16 = 1 << 8;
}

/// MSI-X capability register offsets and bits.
pub mod msix {
    pub const CONTROL: usize = 2;
    pub const TABLE: usize = 4;
    pub const PBA: usize = 8;
    pub const LEN: usize = 12;
    pub const CTRL_FUNCTION_MASK: u16 = 1 << 14;
    pub const CTRL_ENABLE: u16 = 1 << 15;
    /// Size of one table entry.
    pub const ENTRY_SIZE: usize = 16;
    /// Vector Control: masked.
    pub const VECTOR_MASKED: u32 = 1;
}

/// PM capability: D0/D3hot, No_Soft_Reset set (D3hot→D0 keeps the function's state).
pub fn add_pm(cfg: &mut ConfigSpace) -> usize {
    let off = cfg.add_capability(cap_id::PM, 8);
    cfg.write_u16(off + 2, 0x0003); // PMC: version 3 (PCI PM 1.2)
    cfg.write_u16(off + 4, 1 << 3); // PMCSR: D0, No_Soft_Reset
    cfg.set_wmask_u16(off + 4, 0x0003 | (1 << 8)); // PowerState, PME_En
    cfg.set_w1c_u16(off + 4, 1 << 15); // PME_Status
    off
}

/// MSI capability, 64-bit with per-vector masking, offering `2^log2_vectors` messages (0..=5).
pub fn add_msi(cfg: &mut ConfigSpace, log2_vectors: u8) -> usize {
    assert!(log2_vectors <= 5);
    let off = cfg.add_capability(cap_id::MSI, msi::LEN);
    cfg.write_u16(
        off + msi::CONTROL,
        msi::CTRL_64BIT | msi::CTRL_PVM | (u16::from(log2_vectors) << 1),
    );
    cfg.set_wmask_u16(
        off + msi::CONTROL,
        msi::CTRL_ENABLE | (0x7 << msi::CTRL_MME_SHIFT),
    );
    cfg.set_wmask_u32(off + msi::ADDR_LO, 0xffff_fffc);
    cfg.set_wmask_u32(off + msi::ADDR_HI, 0xffff_ffff);
    cfg.set_wmask_u16(off + msi::DATA, 0xffff);
    let nvec = 1u64 << log2_vectors;
    cfg.set_wmask_u32(off + msi::MASK, ((1u64 << nvec) - 1) as u32);
    off
}

/// MSI-X capability with `table_size` vectors; table and PBA at the given BAR and offsets.
pub fn add_msix(
    cfg: &mut ConfigSpace,
    table_size: u16,
    table_bar: u8,
    table_offset: u32,
    pba_bar: u8,
    pba_offset: u32,
) -> usize {
    assert!((1..=2048).contains(&table_size));
    assert!(table_offset.is_multiple_of(8) && pba_offset.is_multiple_of(8));
    let off = cfg.add_capability(cap_id::MSIX, msix::LEN);
    cfg.write_u16(off + msix::CONTROL, table_size - 1);
    cfg.set_wmask_u16(
        off + msix::CONTROL,
        msix::CTRL_ENABLE | msix::CTRL_FUNCTION_MASK,
    );
    cfg.write_u32(off + msix::TABLE, table_offset | u32::from(table_bar));
    cfg.write_u32(off + msix::PBA, pba_offset | u32::from(pba_bar));
    off
}

/// Link speeds for the PCIe capability (Link Capabilities encoding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkSpeed {
    /// 2.5 GT/s
    Gen1 = 1,
    /// 5 GT/s
    Gen2 = 2,
    /// 8 GT/s
    Gen3 = 3,
}

/// PCI Express capability (version 2) for a root-complex-integrated or ordinary endpoint.
pub fn add_pcie_endpoint(cfg: &mut ConfigSpace, speed: LinkSpeed, width: u8) -> usize {
    let off = cfg.add_capability(cap_id::PCIE, 0x3c);
    cfg.write_u16(off + 2, 0x0002); // version 2, device/port type 0 = PCIe endpoint
                                    // Device Capabilities: max payload 256 bytes, role-based error reporting, FLR not offered.
    cfg.write_u32(off + 4, 0x1 | (1 << 15));
    // Device Control: error reporting enables, relaxed ordering, payload, ext tag, no snoop, MRRS.
    cfg.write_u16(off + 8, (2 << 12) | (1 << 4) | (1 << 11));
    cfg.set_wmask_u16(off + 8, 0x7fff);
    cfg.set_w1c_u16(off + 0x0a, 0x000f); // Device Status error bits
    let (s, w) = (speed as u32, u32::from(width));
    cfg.write_u32(off + 0x0c, s | (w << 4)); // Link Capabilities
    cfg.set_wmask_u16(off + 0x10, 0x01c3 | (1 << 6)); // Link Control: ASPM, RCB, CCC, ExtSync
    cfg.write_u16(off + 0x12, (s as u16) | ((w as u16) << 4)); // Link Status: trained at max
    cfg.write_u32(off + 0x24, 0x0000_001f); // Device Capabilities 2: completion timeout ranges
    cfg.set_wmask_u16(off + 0x28, 0x040f); // Device Control 2
    cfg.write_u32(off + 0x2c, ((1 << s) - 1) << 1); // Link Capabilities 2: speeds up to s
    cfg.write_u16(off + 0x30, s as u16); // Link Control 2: target speed
    cfg.set_wmask_u16(off + 0x30, 0x000f);
    off
}
