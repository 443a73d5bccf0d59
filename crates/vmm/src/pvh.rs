//! The PVH boot protocol (Xen's x86 HVM direct boot ABI, which Linux implements for vmlinux ELFs
//! carrying the `XEN_ELFNOTE_PHYS32_ENTRY` note): the `hvm_start_info` structure with its module
//! list and memory map, and the flat 32-bit segments the entry state uses.
//!
//! Entry state (built by [`crate::vcpu::configure`]): 32-bit protected mode, paging off
//! (CR0 = PE, CR4 = 0, EFER = 0), CS a flat 4 GiB execute/read segment
//! ([`crate::layout::BOOT_CS`]), DS/ES/SS flat read/write ([`crate::layout::BOOT_DS`]), TR a busy
//! 32-bit TSS with limit 0x67, EFLAGS = 0x2, EBX = [`START_INFO`]. Nothing else is defined: the
//! kernel brings its own stack, GDT and IDT.
//!
//! Layout (the 64-bit protocol's zero page is not written when PVH is used):
//! ```text
//! 0x0500  GDT (null, null, 32-bit code 0x10, data 0x18, 32-bit TSS 0x20)
//! 0x7000  hvm_start_info                        ebx at entry
//! 0x7040  hvm_modlist_entry[nr_modules]         (the initrd, if any)
//! 0x7080  hvm_memmap_table_entry[memmap_entries] (the e820 map of layout.rs)
//! 0x20000 command line (as for the 64-bit protocol)
//! ```

use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{e820_map, BootError, GDT_ADDR};

/// `hvm_start_info` address (EBX at entry).
pub const START_INFO: u64 = 0x7000;
/// Module list address (one entry: the initrd).
pub const MODLIST: u64 = 0x7040;
/// Memory map address.
pub const MEMMAP: u64 = 0x7080;
/// End of the page holding the start info, module list and memory map.
pub const START_INFO_END: u64 = 0x8000;
/// `hvm_start_info.version`: 1 has `memmap_paddr` and `memmap_entries`.
pub const START_INFO_VERSION: u32 = 1;

/// GDT for the PVH entry: the same selectors as the 64-bit protocol's, but a 32-bit code segment
/// (PVH enters in protected mode) and a 32-bit TSS.
pub const PVH_GDT: [u64; 5] = [
    0,
    0,
    0x00cf_9b00_0000_ffff, // 32-bit flat code, execute/read, accessed
    0x00cf_9300_0000_ffff, // 32-bit flat data, read/write, accessed
    0x0000_8b00_0000_0067, // busy 32-bit TSS, base 0, limit 0x67
];

/// Everything the PVH entry hands the kernel, before it is written to guest memory.
#[derive(Clone, Debug, PartialEq)]
pub struct StartInfo {
    /// The structure EBX points at.
    pub info: hvm_start_info,
    /// Modules (at `info.modlist_paddr`).
    pub modules: Vec<hvm_modlist_entry>,
    /// Memory map (at `info.memmap_paddr`).
    pub memmap: Vec<hvm_memmap_table_entry>,
}

/// Build the start info for `mem_size` bytes of RAM: the command line at `cmdline_paddr`, the
/// initrd `(address, size)` as the one module, the ACPI RSDP, and the same e820 map the 64-bit
/// protocol's boot_params carry.
pub fn start_info(
    mem_size: u64,
    cmdline_paddr: u64,
    initrd: Option<(u64, u64)>,
    rsdp: Option<u64>,
) -> StartInfo {
    let modules: Vec<hvm_modlist_entry> = initrd
        .map(|(paddr, size)| hvm_modlist_entry {
            paddr,
            size,
            cmdline_paddr: 0,
            reserved: 0,
        })
        .into_iter()
        .collect();
    let memmap: Vec<hvm_memmap_table_entry> = e820_map(mem_size)
        .into_iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            // The e820 type numbers are PVH's XEN_HVM_MEMMAP_TYPE_* values.
            type_,
            reserved: 0,
        })
        .collect();
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: START_INFO_VERSION,
        flags: 0,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() { 0 } else { MODLIST },
        cmdline_paddr,
        rsdp_paddr: rsdp.unwrap_or(0),
        memmap_paddr: MEMMAP,
        memmap_entries: memmap.len() as u32,
        reserved: 0,
    };
    StartInfo {
        info,
        modules,
        memmap,
    }
}

/// Write `s` (start info, module list, memory map) and the PVH GDT; returns the EBX value.
pub fn write(mem: &GuestMemoryMmap, s: &StartInfo) -> Result<u64, BootError> {
    let err = |e: vm_memory::GuestMemoryError| BootError::Memory(e.to_string());
    let mods_end = MODLIST + (s.modules.len() * std::mem::size_of::<hvm_modlist_entry>()) as u64;
    let map_end = MEMMAP + (s.memmap.len() * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
    if mods_end > MEMMAP || map_end > START_INFO_END {
        return Err(BootError::Memory(format!(
            "PVH start info does not fit: {} modules, {} memory map entries",
            s.modules.len(),
            s.memmap.len()
        )));
    }
    for (i, m) in s.modules.iter().enumerate() {
        let at = MODLIST + (i * std::mem::size_of::<hvm_modlist_entry>()) as u64;
        mem.write_obj(*m, GuestAddress(at)).map_err(err)?;
    }
    for (i, e) in s.memmap.iter().enumerate() {
        let at = MEMMAP + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(*e, GuestAddress(at)).map_err(err)?;
    }
    mem.write_obj(s.info, GuestAddress(START_INFO))
        .map_err(err)?;
    for (i, e) in PVH_GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(err)?;
    }
    Ok(START_INFO)
}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    use super::*;
    use crate::layout::{CMDLINE, E820_RAM, E820_RESERVED, HIMEM_START};
    use crate::memory::{ECAM_SIZE, ECAM_START, HOLE_END};

    #[test]
    fn start_info_layout_matches_xen_abi() {
        // xen/include/public/arch-x86/hvm/start_info.h
        assert_eq!(size_of::<hvm_start_info>(), 56);
        assert_eq!(offset_of!(hvm_start_info, magic), 0);
        assert_eq!(offset_of!(hvm_start_info, version), 4);
        assert_eq!(offset_of!(hvm_start_info, flags), 8);
        assert_eq!(offset_of!(hvm_start_info, nr_modules), 12);
        assert_eq!(offset_of!(hvm_start_info, modlist_paddr), 16);
        assert_eq!(offset_of!(hvm_start_info, cmdline_paddr), 24);
        assert_eq!(offset_of!(hvm_start_info, rsdp_paddr), 32);
        assert_eq!(offset_of!(hvm_start_info, memmap_paddr), 40);
        assert_eq!(offset_of!(hvm_start_info, memmap_entries), 48);
        assert_eq!(size_of::<hvm_modlist_entry>(), 32);
        assert_eq!(offset_of!(hvm_modlist_entry, paddr), 0);
        assert_eq!(offset_of!(hvm_modlist_entry, size), 8);
        assert_eq!(offset_of!(hvm_modlist_entry, cmdline_paddr), 16);
        assert_eq!(size_of::<hvm_memmap_table_entry>(), 24);
        assert_eq!(offset_of!(hvm_memmap_table_entry, addr), 0);
        assert_eq!(offset_of!(hvm_memmap_table_entry, size), 8);
        assert_eq!(offset_of!(hvm_memmap_table_entry, type_), 16);
        // The regions do not overlap each other.
        assert!(START_INFO + size_of::<hvm_start_info>() as u64 <= MODLIST);
        assert!(MODLIST + size_of::<hvm_modlist_entry>() as u64 <= MEMMAP);
    }

    #[test]
    fn start_info_contents() {
        let s = start_info(6 << 30, CMDLINE, Some((0x1000_0000, 12345)), Some(0xe0000));
        assert_eq!(s.info.magic, 0x336e_c578);
        assert_eq!(s.info.version, 1);
        assert_eq!(s.info.cmdline_paddr, CMDLINE);
        assert_eq!(s.info.rsdp_paddr, 0xe0000);
        assert_eq!((s.info.nr_modules, s.info.modlist_paddr), (1, MODLIST));
        assert_eq!(
            (
                s.modules[0].paddr,
                s.modules[0].size,
                s.modules[0].cmdline_paddr
            ),
            (0x1000_0000, 12345, 0)
        );
        assert_eq!(s.info.memmap_paddr, MEMMAP);
        assert_eq!(s.info.memmap_entries as usize, s.memmap.len());
        let map: Vec<_> = s.memmap.iter().map(|e| (e.addr, e.size, e.type_)).collect();
        assert_eq!(map, e820_map(6 << 30));
        assert_eq!(map[3], (HIMEM_START, (3 << 30) - HIMEM_START, E820_RAM));
        assert!(map.contains(&(ECAM_START, ECAM_SIZE, E820_RESERVED)));
        assert_eq!(*map.last().unwrap(), (HOLE_END, 3 << 30, E820_RAM));
        let ram: u64 = map.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        // Everything but the EBDA..1 MiB gap.
        assert_eq!(ram, (6 << 30) - (0x10_0000 - 0x9_fc00));

        // Without an initrd there is no module list.
        let s = start_info(64 << 20, CMDLINE, None, None);
        assert_eq!((s.info.nr_modules, s.info.modlist_paddr), (0, 0));
        assert_eq!(s.info.rsdp_paddr, 0);
        assert!(s.modules.is_empty());
    }

    #[test]
    fn start_info_written_to_guest_memory() {
        let (mem, _f) = crate::memory::create(32 << 20).unwrap();
        let s = start_info(32 << 20, CMDLINE, Some((0x180_0000, 4096)), Some(0xe0000));
        assert_eq!(write(&mem, &s).unwrap(), START_INFO);
        let info: hvm_start_info = mem.read_obj(GuestAddress(START_INFO)).unwrap();
        assert_eq!(info, s.info);
        let mut raw = [0u8; 56];
        mem.read_slice(&mut raw, GuestAddress(START_INFO)).unwrap();
        assert_eq!(raw[0..4], 0x336e_c578u32.to_le_bytes());
        assert_eq!(raw[24..32], CMDLINE.to_le_bytes());
        assert_eq!(raw[40..48], MEMMAP.to_le_bytes());
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(MODLIST)).unwrap();
        assert_eq!((m.paddr, m.size), (0x180_0000, 4096));
        for (i, want) in s.memmap.iter().enumerate() {
            let at = MEMMAP + 24 * i as u64;
            let e: hvm_memmap_table_entry = mem.read_obj(GuestAddress(at)).unwrap();
            assert_eq!(e, *want);
        }
        let code: u64 = mem.read_obj(GuestAddress(GDT_ADDR + 0x10)).unwrap();
        assert_eq!(code, PVH_GDT[2]);
        // D/B = 1 (32-bit), L = 0.
        assert_eq!((code >> 53) & 3, 0b10);
    }
}
