//! Coalesced port writes (KVM_CAP_COALESCED_PIO) for the two index registers guests write
//! before every data access: CONFIG_ADDRESS at 0xCF8 and the RTC index at 0x70.
//!
//! Every type-1 config access is a write of CONFIG_ADDRESS followed by an access to
//! CONFIG_DATA, and every RTC register access a write of the index followed by one of the data
//! port. The index write needs no answer, so KVM can append it to a ring shared with rhyve
//! instead of exiting, and only the data access exits: half the exits of every config access
//! Linux makes through 0xCF8/0xCFC (all of them below offset 256, even with ECAM) and of every
//! RTC read. The ring is drained, in order, before any exit is handled, so a data access always
//! sees the index written before it, whichever vCPU wrote it.
//!
//! KVM's zone for CONFIG_ADDRESS covers 0xCF8..0xCFC, so a byte write to the reset control
//! register at 0xCF9 is buffered too and takes effect at the next exit of any vCPU (Linux and
//! FreeBSD follow it with another reset method that exits; QEMU coalesces the same range). The
//! ACPI reset register, what Linux and Windows use first, is a port of its own
//! ([`crate::acpi::RESET_PORT`]) and exits at once.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::KVM_COALESCED_MMIO_PAGE_OFFSET;
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, VolatileMemory};

use crate::bus::Bus;

/// The port ranges KVM buffers: CONFIG_ADDRESS and the RTC index.
pub const ZONES: [(u64, u32); 2] = [(0xcf8, 4), (0x70, 1)];
/// The ring is one page (x86 KVM's PAGE_SIZE) at this page offset of a vCPU's mapping.
const PAGE: usize = 4096;
/// `struct kvm_coalesced_mmio_ring`: `first` and `last`, then the entries.
const HEADER: usize = 8;
/// `struct kvm_coalesced_mmio`: phys_addr (u64), len (u32), pio (u32), data ([u8; 8]).
const ENTRY: usize = 24;
/// KVM_COALESCED_MMIO_MAX.
const SLOTS: u32 = ((PAGE - HEADER) / ENTRY) as u32;

/// The coalesced-write ring and where its writes go.
pub struct CoalescedPio {
    ring: MmapRegion,
    /// One drainer at a time: `first` is only advanced under this lock.
    drain: Mutex<()>,
    pio: Arc<Bus>,
    /// Writes taken from the ring (each one an exit saved).
    pub writes: AtomicU64,
}

impl CoalescedPio {
    /// Ask KVM to buffer writes to [`ZONES`] and map the ring through `vcpu`'s fd. None when
    /// KVM lacks the capability or refuses (every write then exits as before).
    pub fn setup(kvm: &Kvm, vm: &VmFd, vcpu: &VcpuFd, pio: Arc<Bus>) -> Option<CoalescedPio> {
        if !kvm.check_extension(Cap::CoalescedPio) {
            log::info!("KVM has no coalesced PIO: every 0xCF8 and 0x70 write exits");
            return None;
        }
        // SAFETY: the vCPU fd is open for as long as `vcpu` lives, which covers this call;
        // the clone below is an independent fd.
        let fd = unsafe { BorrowedFd::borrow_raw(vcpu.as_raw_fd()) };
        let file = std::fs::File::from(fd.try_clone_to_owned().ok()?);
        let offset = u64::from(KVM_COALESCED_MMIO_PAGE_OFFSET) * PAGE as u64;
        let ring = match MmapRegion::from_file(FileOffset::new(file, offset), PAGE) {
            Ok(r) => r,
            Err(e) => {
                log::warn!("cannot map the coalesced MMIO ring: {e}");
                return None;
            }
        };
        for (i, &(port, len)) in ZONES.iter().enumerate() {
            if let Err(e) = vm.register_coalesced_mmio(IoEventAddress::Pio(port), len) {
                log::warn!("KVM_REGISTER_COALESCED_MMIO (PIO {port:#x}): {e}");
                for &(p, l) in &ZONES[..i] {
                    let _ = vm.unregister_coalesced_mmio(IoEventAddress::Pio(p), l);
                }
                return None;
            }
        }
        Some(CoalescedPio {
            ring,
            drain: Mutex::new(()),
            pio,
            writes: AtomicU64::new(0),
        })
    }

    /// Carry out every buffered write, oldest first.
    pub fn flush(&self) {
        let ring = self.ring.as_volatile_slice();
        // Cheap when empty (the common case on every exit): no lock.
        let first = ring.load::<u32>(0, Ordering::Acquire).unwrap_or(0);
        let last = ring.load::<u32>(4, Ordering::Acquire).unwrap_or(0);
        if first == last {
            return;
        }
        let _g = self.drain.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let first = ring.load::<u32>(0, Ordering::Acquire).unwrap_or(0);
            let last = ring.load::<u32>(4, Ordering::Acquire).unwrap_or(0);
            if first == last || first >= SLOTS || last >= SLOTS {
                return;
            }
            let mut e = [0u8; ENTRY];
            if ring
                .read_slice(&mut e, HEADER + first as usize * ENTRY)
                .is_err()
            {
                return;
            }
            let addr = u64::from_le_bytes(e[0..8].try_into().expect("8 bytes"));
            let len = u32::from_le_bytes(e[8..12].try_into().expect("4 bytes")) as usize;
            let is_pio = u32::from_le_bytes(e[12..16].try_into().expect("4 bytes")) == 1;
            if is_pio && (1..=8).contains(&len) {
                if let Some(r) = self.pio.find(addr) {
                    r.dev.write(addr - r.base, &e[16..16 + len]);
                }
                self.writes.fetch_add(1, Ordering::Relaxed);
            }
            let _ = ring.store((first + 1) % SLOTS, 0, Ordering::Release);
        }
    }
}
