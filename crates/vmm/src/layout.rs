//! What both boot protocols share: the 64-bit entry ([`crate::boot`]) and PVH ([`crate::pvh`])
//! put the GDT, the command line and the e820 map at the same places and fail the same way.
//! These live below both so that `boot` can hand PVH kernels to `pvh` without `pvh` depending
//! on `boot`. `boot` re-exports everything here under its old paths.

use crate::memory::{ram_ranges, ECAM_SIZE, ECAM_START};

/// GDT address.
pub const GDT_ADDR: u64 = 0x500;
/// Selector of the boot code segment (`__BOOT_CS`).
pub const BOOT_CS: u16 = 0x10;
/// Selector of the boot data segment (`__BOOT_DS`).
pub const BOOT_DS: u16 = 0x18;
/// Selector of the TSS.
pub const BOOT_TSS: u16 = 0x20;
/// Command-line address.
pub const CMDLINE: u64 = 0x20000;
/// Extended BIOS data area (reserved in e820).
pub const EBDA_START: u64 = 0x9fc00;
/// BIOS area (reserved in e820; ACPI tables live here).
pub const BIOS_START: u64 = 0xe0000;
/// Where the kernel goes.
pub const HIMEM_START: u64 = 0x10_0000;

/// e820 RAM.
pub const E820_RAM: u32 = 1;
/// e820 reserved.
pub const E820_RESERVED: u32 = 2;

/// Errors loading the kernel.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The file is neither a bzImage nor an ELF.
    #[error("{0}: not a bzImage or ELF kernel ({1})")]
    BadKernel(String, String),
    /// Reading a file failed.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// The command line does not fit.
    #[error("kernel command line is {0} bytes; the limit is {1}")]
    CmdlineTooLong(usize, usize),
    /// The initrd does not fit below the kernel's limit.
    #[error("initrd of {0} bytes does not fit in guest memory below {1:#x}")]
    InitrdTooBig(u64, u64),
    /// Guest memory write failed.
    #[error("writing boot data to guest memory: {0}")]
    Memory(String),
}

/// The e820 map for `mem_size` bytes of RAM: (address, size, type).
pub fn e820_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut v = Vec::new();
    for (base, len) in ram_ranges(mem_size) {
        if base == 0 {
            v.push((0, EBDA_START, E820_RAM));
            v.push((EBDA_START, 0xa0000 - EBDA_START, E820_RESERVED));
            v.push((BIOS_START, HIMEM_START - BIOS_START, E820_RESERVED));
            v.push((HIMEM_START, len - HIMEM_START, E820_RAM));
        } else {
            v.push((base, len, E820_RAM));
        }
    }
    v.push((ECAM_START, ECAM_SIZE, E820_RESERVED));
    v.sort_by_key(|e| e.0);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_layout() {
        let m = e820_map(1 << 30);
        assert_eq!(m[0], (0, EBDA_START, E820_RAM));
        assert_eq!(m[3], (HIMEM_START, (1 << 30) - HIMEM_START, E820_RAM));
        assert_eq!(*m.last().unwrap(), (ECAM_START, ECAM_SIZE, E820_RESERVED));
        let m = e820_map(6 << 30);
        assert_eq!(
            *m.last().unwrap(),
            (crate::memory::HOLE_END, 3 << 30, E820_RAM)
        );
    }
}
