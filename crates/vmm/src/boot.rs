//! Direct kernel boot: load a bzImage or an ELF (vmlinux, or the tiny test guest) with
//! linux-loader, build the zero page (boot_params with e820, command line, initrd) and the
//! identity-mapped long-mode environment the 64-bit boot protocol requires
//! (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol").
//!
//! An ELF carrying the `XEN_ELFNOTE_PHYS32_ENTRY` note (a vmlinux built with CONFIG_PVH) is
//! started with the PVH protocol instead ([`crate::pvh`]): `hvm_start_info` in EBX, 32-bit
//! protected mode at the note's entry. bzImages and ELFs without the note use the 64-bit entry.
//! What the two protocols share (GDT address and selectors, command line, e820 map,
//! [`BootError`]) is defined in [`crate::layout`] and re-exported here.
//!
//! Low memory layout:
//! ```text
//! 0x0500  GDT (null, null, __BOOT_CS 0x10, __BOOT_DS 0x18, TSS 0x20)
//! 0x7000  zero page (boot_params)              rsi at entry
//! 0x8ff0  boot stack                           rsp at entry
//! 0x9000  PML4, 0xA000 PDPT, 0xB000–0xEFFF four page directories: 0–4 GiB identity, 2 MiB pages
//! 0x20000 kernel command line
//! 0x9FC00 EBDA (reserved), 0xE0000–0xFFFFF ACPI tables / BIOS area (reserved)
//! 0x100000 kernel; initrd at the top of low RAM
//! ```

use std::fs::File;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{BzImage, Elf, KernelLoader, KernelLoaderResult, PvhBootCapability};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap, ReadVolatile};

use crate::memory::PCI_HOLE_START;
use crate::pvh;

// Shared with PVH, so defined in `layout` (below both); re-exported so `boot::` paths stay.
pub use crate::layout::{
    e820_map, BootError, BIOS_START, BOOT_CS, BOOT_DS, BOOT_TSS, CMDLINE, E820_RAM, E820_RESERVED,
    EBDA_START, GDT_ADDR, HIMEM_START,
};

/// GDT entries, encoded.
pub const GDT: [u64; 5] = [
    0,
    0,
    0x00af_9b00_0000_ffff, // 64-bit code, DPL 0, accessed
    0x00cf_9300_0000_ffff, // 32-bit flat data, accessed
    0x008f_8b00_0000_ffff, // busy 64-bit TSS (VMX requires a usable TR)
];
/// Zero page (boot_params) address.
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Page-map level 4.
pub const PML4: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPT: u64 = 0xa000;
/// First of four page directories.
pub const PD: u64 = 0xb000;
/// Longest command line accepted (Linux's COMMAND_LINE_SIZE on x86).
pub const CMDLINE_MAX: usize = 2048;

/// Which boot protocol the boot CPU's initial state follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// Linux's 64-bit boot protocol: long mode, paging on, boot_params in rsi.
    Linux64,
    /// PVH: 32-bit protected mode, paging off, `hvm_start_info` in ebx.
    Pvh,
}

/// Where the boot CPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryPoint {
    /// The protocol (CPU mode and which registers below are meaningful).
    pub protocol: BootProtocol,
    /// Entry address (rip): 64-bit entry, or PVH's 32-bit physical entry.
    pub rip: u64,
    /// boot_params address (rsi; 64-bit protocol only).
    pub rsi: u64,
    /// Stack (rsp; 64-bit protocol only).
    pub rsp: u64,
    /// `hvm_start_info` address (ebx; PVH only).
    pub rbx: u64,
}

/// Write the GDT and identity-mapping page tables (0–4 GiB, 2 MiB pages).
pub fn write_long_mode_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let w = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(|e| BootError::Memory(e.to_string()))
    };
    for (i, e) in GDT.iter().enumerate() {
        w(*e, GDT_ADDR + 8 * i as u64)?;
    }
    w(PDPT | 0x3, PML4)?;
    for gib in 0..4u64 {
        let pd = PD + gib * 0x1000;
        w(pd | 0x3, PDPT + gib * 8)?;
        for j in 0..512u64 {
            w(((gib << 30) + (j << 21)) | 0x83, pd + j * 8)?;
        }
    }
    Ok(())
}

fn is_elf(f: &mut File) -> Result<bool, std::io::Error> {
    use std::io::{Read, Seek, SeekFrom};
    let mut magic = [0u8; 4];
    f.seek(SeekFrom::Start(0))?;
    let n = f.read(&mut magic)?;
    f.seek(SeekFrom::Start(0))?;
    Ok(n == 4 && magic == *b"\x7fELF")
}

/// Load `kernel` (and `initrd`), write the zero page and long-mode tables, and return the entry.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel_path: &str,
    initrd_path: Option<&str>,
    cmdline: &str,
    rsdp: Option<u64>,
) -> Result<EntryPoint, BootError> {
    let mut kernel =
        File::open(kernel_path).map_err(|e| BootError::Io(kernel_path.to_string(), e))?;
    let elf = is_elf(&mut kernel).map_err(|e| BootError::Io(kernel_path.to_string(), e))?;
    let loaded: KernelLoaderResult = if elf {
        Elf::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START)))
    } else {
        BzImage::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START)))
    }
    .map_err(|e| BootError::BadKernel(kernel_path.to_string(), e.to_string()))?;
    // linux-loader reports the note only when the ELF is loaded at its own addresses (no
    // kernel_offset), which is how it is loaded above.
    let pvh_entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(a) => Some(a.raw_value()),
        _ => None,
    };

    let mut params = boot_params::default();
    let rip = match loaded.setup_header {
        Some(hdr) => {
            params.hdr = hdr;
            loaded.kernel_load.raw_value() + 0x200
        }
        None => {
            params.hdr.boot_flag = 0xaa55;
            params.hdr.header = 0x5372_6448; // "HdrS"
            params.hdr.kernel_alignment = 0x0100_0000;
            loaded.kernel_load.raw_value()
        }
    };
    params.hdr.type_of_loader = 0xff;
    // Command line.
    let max = match params.hdr.cmdline_size {
        0 => CMDLINE_MAX,
        n => (n as usize).min(CMDLINE_MAX),
    };
    if cmdline.len() >= max {
        return Err(BootError::CmdlineTooLong(cmdline.len(), max - 1));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE))
        .map_err(|e| BootError::Memory(e.to_string()))?;
    params.hdr.cmd_line_ptr = CMDLINE as u32;
    params.hdr.cmdline_size = bytes.len() as u32;
    // Initrd: as high in low RAM as the kernel allows.
    if let Some(path) = initrd_path {
        let mut f = File::open(path).map_err(|e| BootError::Io(path.to_string(), e))?;
        let size = f
            .metadata()
            .map_err(|e| BootError::Io(path.to_string(), e))?
            .len();
        let max_addr = match params.hdr.initrd_addr_max {
            0 => 0x37ff_ffff,
            n => u64::from(n),
        };
        let top = (max_addr + 1).min(mem_size.min(PCI_HOLE_START));
        let start = top
            .checked_sub(size)
            .map(|s| s & !0xfff)
            .filter(|&s| s >= loaded.kernel_end.max(HIMEM_START));
        let Some(start) = start else {
            return Err(BootError::InitrdTooBig(size, top));
        };
        mem.read_exact_volatile_from(GuestAddress(start), &mut f, size as usize)
            .map_err(|e| BootError::Memory(format!("{path}: {e}")))?;
        params.hdr.ramdisk_image = start as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    // Memory map.
    let map = e820_map(mem_size);
    for (i, &(addr, size, typ)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: typ,
        };
    }
    params.e820_entries = map.len() as u8;
    if let Some(r) = rsdp {
        params.acpi_rsdp_addr = r;
    }
    if let Some(rip) = pvh_entry {
        let initrd = (params.hdr.ramdisk_size != 0).then_some((
            u64::from(params.hdr.ramdisk_image),
            u64::from(params.hdr.ramdisk_size),
        ));
        let info = pvh::start_info(mem_size, CMDLINE, initrd, rsdp);
        let rbx = pvh::write(mem, &info)?;
        return Ok(EntryPoint {
            protocol: BootProtocol::Pvh,
            rip,
            rsi: 0,
            rsp: 0,
            rbx,
        });
    }
    mem.write_obj(params, GuestAddress(ZERO_PAGE))
        .map_err(|e| BootError::Memory(e.to_string()))?;
    write_long_mode_tables(mem)?;
    Ok(EntryPoint {
        protocol: BootProtocol::Linux64,
        rip,
        rsi: ZERO_PAGE,
        rsp: BOOT_STACK,
        rbx: 0,
    })
}

/// Read the whole of `f` (small files: firmware blobs, test guests).
pub fn read_all(
    f: &mut impl ReadVolatile,
    len: usize,
    mem: &GuestMemoryMmap,
    at: u64,
) -> Result<(), BootError> {
    mem.read_exact_volatile_from(GuestAddress(at), f, len)
        .map_err(|e| BootError::Memory(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tables_identity_map() {
        let (mem, _f) = crate::memory::create(32 << 20).unwrap();
        write_long_mode_tables(&mem).unwrap();
        let pdpt: u64 = mem.read_obj(GuestAddress(PML4)).unwrap();
        assert_eq!(pdpt, PDPT | 3);
        let pd3: u64 = mem.read_obj(GuestAddress(PDPT + 24)).unwrap();
        let e: u64 = mem
            .read_obj(GuestAddress((pd3 & !0xfff) + 511 * 8))
            .unwrap();
        assert_eq!(e, 0xffe0_0000 | 0x83);
    }
}
