//! Address-space dispatch: a range map from guest addresses (MMIO or port I/O) to handlers.
//!
//! Every userspace exit is looked up here. Ranges never overlap; inserting an overlapping range is
//! refused, so a guest that programs two BARs onto the same address gets the first one only (and a
//! log line), as bhyve does. Lookups take a read lock; BAR moves take the write lock briefly.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

/// Something that answers accesses to a range of one address space.
pub trait BusDevice: Send + Sync {
    /// Read `data.len()` bytes at `offset` from the start of the range.
    fn read(&self, offset: u64, data: &mut [u8]);
    /// Write `data` at `offset` from the start of the range.
    fn write(&self, offset: u64, data: &[u8]);
}

/// A claimed range.
#[derive(Clone)]
pub struct Range {
    /// First address.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
    /// The handler.
    pub dev: Arc<dyn BusDevice>,
    /// Which counter bucket accesses to this range count in (see [`crate::stats`]).
    pub tag: usize,
}

/// Why a range could not be inserted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range overlaps one already on the bus.
    #[error("range {base:#x}+{len:#x} overlaps {other:#x}+{other_len:#x}")]
    Overlap {
        /// Base of the refused range.
        base: u64,
        /// Length of the refused range.
        len: u64,
        /// Base of the range in the way.
        other: u64,
        /// Length of the range in the way.
        other_len: u64,
    },
    /// Zero length or the range wraps the address space.
    #[error("range {base:#x}+{len:#x} is empty or wraps")]
    Invalid {
        /// Base of the refused range.
        base: u64,
        /// Length of the refused range.
        len: u64,
    },
}

/// One address space (MMIO or PIO).
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Range>>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Claim `[base, base + len)` for `dev`.
    pub fn insert(
        &self,
        base: u64,
        len: u64,
        dev: Arc<dyn BusDevice>,
        tag: usize,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::Invalid { base, len })?;
        let mut map = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        let clash = map
            .range(..end)
            .next_back()
            .filter(|(_, r)| r.base + r.len > base)
            .map(|(_, r)| (r.base, r.len));
        if let Some((other, other_len)) = clash {
            return Err(BusError::Overlap {
                base,
                len,
                other,
                other_len,
            });
        }
        map.insert(
            base,
            Range {
                base,
                len,
                dev,
                tag,
            },
        );
        Ok(())
    }

    /// Release the range that starts at `base`; returns whether one was there.
    pub fn remove(&self, base: u64) -> bool {
        self.ranges
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&base)
            .is_some()
    }

    /// The range containing `addr`, if any.
    pub fn find(&self, addr: u64) -> Option<Range> {
        let map = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        map.range(..=addr)
            .next_back()
            .filter(|(_, r)| addr - r.base < r.len)
            .map(|(_, r)| r.clone())
    }

    /// Dispatch a read. Returns the range's tag, or `None` if nothing claims `addr` (then `data`
    /// is filled with all-ones, the PCI master-abort value).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Option<usize> {
        match self.find(addr) {
            Some(r) => {
                r.dev.read(addr - r.base, data);
                Some(r.tag)
            }
            None => {
                data.fill(0xff);
                None
            }
        }
    }

    /// Dispatch a write. Returns the range's tag, or `None` if the write was dropped.
    pub fn write(&self, addr: u64, data: &[u8]) -> Option<usize> {
        let r = self.find(addr)?;
        r.dev.write(addr - r.base, data);
        Some(r.tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Rec(Mutex<Vec<(u64, Vec<u8>)>>);
    impl BusDevice for Rec {
        fn read(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&self, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_overlap_and_fallback() {
        let bus = Bus::new();
        let a = Arc::new(Rec::default());
        bus.insert(0x1000, 0x100, a.clone(), 1).unwrap();
        bus.insert(0x1100, 0x100, a.clone(), 2).unwrap();
        assert!(matches!(
            bus.insert(0x10ff, 2, a.clone(), 3),
            Err(BusError::Overlap { other: 0x1100, .. })
        ));
        assert!(matches!(
            bus.insert(0x0f00, 0x101, a.clone(), 3),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0x0, 0, a.clone(), 3),
            Err(BusError::Invalid { .. })
        ));
        assert!(matches!(
            bus.insert(u64::MAX, 2, a.clone(), 3),
            Err(BusError::Invalid { .. })
        ));
        let mut d = [0u8; 2];
        assert_eq!(bus.read(0x1105, &mut d), Some(2));
        assert_eq!(d, [5, 5]);
        assert_eq!(bus.read(0x1200, &mut d), None);
        assert_eq!(d, [0xff, 0xff]);
        assert_eq!(bus.write(0x10ff, &[7]), Some(1));
        assert_eq!(a.0.lock().unwrap()[0], (0xff, vec![7]));
        assert!(bus.remove(0x1000));
        assert!(!bus.remove(0x1000));
        assert_eq!(bus.write(0x1000, &[1]), None);
        bus.insert(0x0f00, 0x200, a, 4).unwrap();
    }
}
