//! Physical Region Descriptor Tables: turning a guest's scatter/gather list into validated guest
//! memory segments, and moving bytes through them.
//!
//! A PRDT is guest-controlled, so it is checked completely before any byte moves: every entry the
//! transfer needs must be well formed and lie inside guest RAM. A bad table therefore fails the
//! command without touching memory, and a short one is detected up front (AHCI overflow) instead
//! of halfway through a transfer.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use zerocopy::FromBytes;

use crate::fis::{prd, PrdtEntry, PRDT_ENTRY_SIZE};

/// Guest memory as the device sees it.
pub type Mem = GuestMemoryMmap;

/// Why a PRDT cannot carry a transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrdtFault {
    /// The table or a data buffer lies (partly) outside guest RAM.
    OutsideRam,
    /// An entry has reserved bits set (for example a byte count above 4 MiB).
    Malformed,
    /// The entries describe fewer bytes than the command transfers.
    Short,
}

/// Guest memory that vanished under a validated transfer (the frontend replaced the memory map).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestFault;

/// Read `buf.len()` bytes of guest memory at `addr`, failing without side effects when any part
/// lies outside guest RAM.
pub fn read_guest(mem: &Mem, addr: u64, buf: &mut [u8]) -> Result<(), GuestFault> {
    mem.read_slice(buf, GuestAddress(addr))
        .map_err(|_| GuestFault)
}

/// Write `buf` to guest memory at `addr` only if all of it lies inside guest RAM (a plain
/// `write_slice` would write the part before a hole and then fail).
pub fn write_guest(mem: &Mem, addr: u64, buf: &[u8]) -> Result<(), GuestFault> {
    if !in_ram(mem, addr, buf.len() as u64) {
        return Err(GuestFault);
    }
    mem.write_slice(buf, GuestAddress(addr))
        .map_err(|_| GuestFault)
}

/// True if `[addr, addr + len)` is entirely guest RAM.
pub fn in_ram(mem: &Mem, addr: u64, len: u64) -> bool {
    let Ok(len) = usize::try_from(len) else {
        return false;
    };
    addr.checked_add(len as u64).is_some()
        && GuestMemoryBackend::check_range(mem, GuestAddress(addr), len)
}

/// A validated scatter/gather list with a cursor: bytes are moved front to back. The list is
/// not copied into host memory (a PRDT may have 65535 entries): it is validated once when
/// loaded, then read again from guest memory as the transfer proceeds, each entry re-checked,
/// so a guest that rewrites its PRDT mid-command only fails its own command.
#[derive(Debug, Default, Clone)]
pub struct Sg {
    /// Guest address of the PRDT.
    table: u64,
    /// Bytes the command transfers.
    need: u64,
    /// An entry with the Interrupt bit is part of the transfer (PxIS.DPS at completion).
    pub interrupt: bool,
    /// Cursor: entry index and offset within it.
    idx: u32,
    off: u64,
    moved: u64,
}

/// Entries read from guest memory per batch.
const BATCH: usize = 64;

/// One PRDT entry as (guest address, byte count), checked.
fn entry_at(mem: &Mem, table: u64, idx: u32) -> Result<(u64, u64, bool), PrdtFault> {
    let addr = table
        .checked_add(u64::from(idx) * PRDT_ENTRY_SIZE as u64)
        .ok_or(PrdtFault::OutsideRam)?;
    let mut raw = [0u8; PRDT_ENTRY_SIZE];
    read_guest(mem, addr, &mut raw).map_err(|_| PrdtFault::OutsideRam)?;
    decode(&raw)
}

fn decode(raw: &[u8]) -> Result<(u64, u64, bool), PrdtFault> {
    let e = PrdtEntry::read_from_bytes(raw).map_err(|_| PrdtFault::Malformed)?;
    let dbc = e.dbc.get();
    if dbc & prd::RESERVED_MASK != 0 {
        return Err(PrdtFault::Malformed);
    }
    let base = u64::from(e.dba.get() & !1) | (u64::from(e.dbau.get()) << 32);
    Ok((base, u64::from(dbc & prd::DBC_MASK) + 1, dbc & prd::I != 0))
}

impl Sg {
    /// Validate the entries of the PRDT at `table` (with `entries` entries) that cover the first
    /// `need` bytes. Entries past those are never read, as an HBA would not fetch them.
    pub fn load(mem: &Mem, table: u64, entries: u16, need: u64) -> Result<Sg, PrdtFault> {
        let mut sg = Sg {
            table,
            need,
            ..Default::default()
        };
        let mut total = 0u64;
        let mut next = 0usize;
        let mut raw = [0u8; PRDT_ENTRY_SIZE * BATCH];
        while total < need && next < usize::from(entries) {
            let n = (usize::from(entries) - next).min(BATCH);
            let addr = table
                .checked_add((next * PRDT_ENTRY_SIZE) as u64)
                .ok_or(PrdtFault::OutsideRam)?;
            let buf = &mut raw[..n * PRDT_ENTRY_SIZE];
            read_guest(mem, addr, buf).map_err(|_| PrdtFault::OutsideRam)?;
            for chunk in buf.chunks_exact(PRDT_ENTRY_SIZE) {
                if total >= need {
                    break;
                }
                let (base, len, irq) = decode(chunk)?;
                let len = len.min(need - total);
                if !in_ram(mem, base, len) {
                    return Err(PrdtFault::OutsideRam);
                }
                sg.interrupt |= irq;
                total += len;
            }
            next += n;
        }
        if total < need {
            return Err(PrdtFault::Short);
        }
        Ok(sg)
    }

    /// Bytes moved so far.
    pub fn moved(&self) -> u64 {
        self.moved
    }

    /// Bytes not yet moved.
    pub fn remaining(&self) -> u64 {
        self.need - self.moved
    }

    /// Visit the next `len` bytes of the list as (guest address, offset into the caller's
    /// buffer, length) pieces, advancing the cursor.
    fn walk(
        &mut self,
        mem: &Mem,
        len: u64,
        mut f: impl FnMut(u64, u64, u64) -> Result<(), GuestFault>,
    ) -> Result<(), GuestFault> {
        let mut done = 0u64;
        while done < len && self.moved < self.need {
            let (base, elen, _) = entry_at(mem, self.table, self.idx).map_err(|_| GuestFault)?;
            let elen = elen.min(self.need - (self.moved - self.off));
            if self.off >= elen {
                self.idx += 1;
                self.off = 0;
                continue;
            }
            let n = (elen - self.off).min(len - done);
            let addr = base + self.off;
            if !in_ram(mem, addr, n) {
                return Err(GuestFault);
            }
            f(addr, done, n)?;
            done += n;
            self.off += n;
            self.moved += n;
            if self.off == elen {
                self.idx += 1;
                self.off = 0;
            }
        }
        if done < len {
            return Err(GuestFault);
        }
        Ok(())
    }

    /// Copy `data` to the next bytes of the list (device to host).
    pub fn write(&mut self, mem: &Mem, data: &[u8]) -> Result<(), GuestFault> {
        self.walk(mem, data.len() as u64, |addr, at, n| {
            write_guest(mem, addr, &data[at as usize..(at + n) as usize])
        })
    }

    /// Fill `buf` from the next bytes of the list (host to device).
    pub fn read(&mut self, mem: &Mem, buf: &mut [u8]) -> Result<(), GuestFault> {
        let len = buf.len() as u64;
        self.walk(mem, len, |addr, at, n| {
            read_guest(mem, addr, &mut buf[at as usize..(at + n) as usize])
        })
    }

    /// Append the next pieces of the list to `iov`, at most `max_bytes` bytes and until `iov`
    /// holds `max_segs` segments; returns the bytes added.
    pub fn fill_iov(
        &mut self,
        mem: &Mem,
        iov: &mut block::GuestIov,
        max_segs: usize,
        max_bytes: u64,
    ) -> Result<u64, GuestFault> {
        let start = self.moved;
        while self.moved < self.need && iov.segments() < max_segs && self.moved - start < max_bytes
        {
            let (base, elen, _) = entry_at(mem, self.table, self.idx).map_err(|_| GuestFault)?;
            let elen = elen.min(self.need - (self.moved - self.off));
            let n = (elen - self.off).min(max_bytes - (self.moved - start));
            iov.push_guest(base + self.off, n).map_err(|_| GuestFault)?;
            self.off += n;
            self.moved += n;
            if self.off == elen {
                self.idx += 1;
                self.off = 0;
            }
        }
        Ok(self.moved - start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::IntoBytes;

    fn entry(addr: u64, bytes: u32, irq: bool) -> PrdtEntry {
        let mut e = PrdtEntry::default();
        e.dba.set(addr as u32);
        e.dbau.set((addr >> 32) as u32);
        e.dbc.set((bytes - 1) | if irq { prd::I } else { 0 });
        e
    }

    #[test]
    fn load_validates_and_walks() {
        let mem = Mem::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let t = [
            entry(0x1000, 6, false),
            entry(0x2000, 10, true),
            entry(0xdead_0000, 16, false),
        ];
        let bytes: Vec<u8> = t.iter().flat_map(|e| e.as_bytes().to_vec()).collect();
        mem.write_slice(&bytes, GuestAddress(0x100)).unwrap();
        // The third (bad) entry is never needed for 12 bytes.
        let mut sg = Sg::load(&mem, 0x100, 3, 12).unwrap();
        assert!(sg.interrupt);
        sg.write(&mem, &[1; 12]).unwrap();
        assert_eq!(sg.remaining(), 0);
        let mut b = [0u8; 8];
        mem.read_slice(&mut b, GuestAddress(0x2000)).unwrap();
        assert_eq!(b, [1, 1, 1, 1, 1, 1, 0, 0]);
        assert_eq!(sg.moved(), 12);
        assert_eq!(
            Sg::load(&mem, 0x100, 3, 20).unwrap_err(),
            PrdtFault::OutsideRam
        );
        assert_eq!(Sg::load(&mem, 0x100, 2, 20).unwrap_err(), PrdtFault::Short);
        assert_eq!(
            Sg::load(&mem, 0xfff8, 2, 4).unwrap_err(),
            PrdtFault::OutsideRam
        );
        let mut bad = entry(0x1000, 2, false);
        bad.dbc.set(bad.dbc.get() | 1 << 22);
        mem.write_slice(bad.as_bytes(), GuestAddress(0x100))
            .unwrap();
        assert_eq!(
            Sg::load(&mem, 0x100, 1, 2).unwrap_err(),
            PrdtFault::Malformed
        );
    }
}
