//! Guest physical memory: the x86 address map, and RAM from one memfd split around the PCI hole.
//!
//! ```text
//! 0            .. low_end        RAM (low_end = min(size, 3 GiB))
//! 0xC000_0000  .. 0xE000_0000    32-bit PCI MMIO window (BARs)
//! 0xE000_0000  .. 0xF000_0000    PCI ECAM (buses 0-255; rhyve populates bus 0)
//! 0xFEC0_0000                    IOAPIC (in-kernel)
//! 0xFEE0_0000                    LAPIC (in-kernel)
//! 4 GiB        .. 4 GiB + rest   RAM above the hole
//! ```
//!
//! RAM is a memfd so it can later be shared with other processes (vhost-user, live update). This
//! module holds the only `unsafe` of guest memory: telling KVM where the mappings are.

use std::fs::File;
use std::os::fd::FromRawFd;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Start of the 32-bit PCI hole (end of low RAM).
pub const PCI_HOLE_START: u64 = 0xC000_0000;
/// 32-bit PCI MMIO window for BARs.
pub const PCI_MMIO32_START: u64 = 0xC000_0000;
/// Size of the 32-bit PCI MMIO window.
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// PCI Express enhanced configuration access (ECAM) base.
pub const ECAM_START: u64 = 0xE000_0000;
/// ECAM size: 256 buses × 32 devices × 8 functions × 4 KiB.
pub const ECAM_SIZE: u64 = 0x1000_0000;
/// IOAPIC MMIO base.
pub const IOAPIC_START: u64 = 0xFEC0_0000;
/// LAPIC MMIO base.
pub const LAPIC_START: u64 = 0xFEE0_0000;
/// End of the 32-bit address space.
pub const HOLE_END: u64 = 1 << 32;
/// PCI I/O port window for I/O BARs.
pub const PCI_IO_START: u64 = 0xC000;
/// Size of the PCI I/O port window.
pub const PCI_IO_SIZE: u64 = 0x4000;
/// KVM's TSS (three pages) sits just below the IOAPIC on Intel; we keep it out of every window.
pub const KVM_TSS_ADDR: u64 = 0xFFFB_D000;
/// KVM's identity-map page (one page, Intel real-mode emulation) just below the TSS.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xFFFB_C000;
/// Smallest RAM size rhyve accepts.
pub const MIN_RAM: u64 = 16 << 20;

/// Errors setting up guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Size too small or not page-aligned.
    #[error("bad memory size {0}: need at least 16 MiB, a multiple of 4 KiB")]
    BadSize(u64),
    /// memfd_create or ftruncate failed.
    #[error("cannot create guest memory: {0}")]
    Memfd(std::io::Error),
    /// mmap failed.
    #[error("cannot map guest memory: {0}")]
    Mmap(String),
    /// KVM refused the memory slot.
    #[error("KVM_SET_USER_MEMORY_REGION: {0}")]
    Kvm(kvm_ioctls::Error),
}

/// RAM ranges `(guest address, length)` for `size` bytes of RAM.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    let low = size.min(PCI_HOLE_START);
    let mut v = vec![(0, low)];
    if size > low {
        v.push((HOLE_END, size - low));
    }
    v
}

/// Allocate `size` bytes of guest RAM in a memfd and map it at the addresses of [`ram_ranges`].
pub fn create(size: u64) -> Result<(GuestMemoryMmap, File), MemoryError> {
    if size < MIN_RAM || !size.is_multiple_of(4096) {
        return Err(MemoryError::BadSize(size));
    }
    let file = anonymous_file("rhyve-guest-ram").map_err(MemoryError::Memfd)?;
    file.set_len(size).map_err(MemoryError::Memfd)?;
    let mut offset = 0;
    let mut regions = Vec::new();
    for (base, len) in ram_ranges(size) {
        let fo = FileOffset::new(file.try_clone().map_err(MemoryError::Memfd)?, offset);
        regions.push((GuestAddress(base), len as usize, Some(fo)));
        offset += len;
    }
    let mem = GuestMemoryMmap::from_ranges_with_files(&regions)
        .map_err(|e| MemoryError::Mmap(e.to_string()))?;
    Ok((mem, file))
}

/// An empty memfd named `name` (close-on-exec).
pub fn anonymous_file(name: &str) -> std::io::Result<File> {
    let name = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked before use.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Register every region of `mem` with KVM as slots 0, 1, ….
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    register_with(vm, mem, 0)
}

/// Turn KVM's dirty-page logging of guest RAM on or off (live migration). Slot `i` is region
/// `i` of `mem`, as [`register`] made them.
pub fn set_dirty_logging(vm: &VmFd, mem: &GuestMemoryMmap, on: bool) -> Result<(), MemoryError> {
    register_with(
        vm,
        mem,
        if on {
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        },
    )
}

fn register_with(vm: &VmFd, mem: &GuestMemoryMmap, flags: u32) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region.as_ptr() as u64;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes owned by `mem`, which the
        // caller keeps alive (inside the Vm) for as long as the VM exists.
        unsafe { vm.set_user_memory_region(r) }.map_err(MemoryError::Kvm)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn split_around_hole() {
        assert_eq!(ram_ranges(1 << 30), vec![(0, 1 << 30)]);
        assert_eq!(ram_ranges(4 << 30), vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
        assert!(matches!(create(1 << 20), Err(MemoryError::BadSize(_))));
        assert!(matches!(
            create((32 << 20) + 1),
            Err(MemoryError::BadSize(_))
        ));
        let (m, f) = create(32 << 20).unwrap();
        m.write_obj(0x1234_5678u32, GuestAddress(0x1000)).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 32 << 20);
    }
}
