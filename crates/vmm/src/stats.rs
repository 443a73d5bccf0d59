//! Exit counters: how many userspace exits of each kind the guest caused, and where they went.
//!
//! Every range on the MMIO and PIO buses counts in a named bucket (`slot4 nvme bar0`, `com1`,
//! `pci-config`, …); exits that nothing claims count in `unclaimed`. Counters are plain atomics so
//! the vCPU threads never contend on them. A [`Snapshot`] taken at two moments gives the exits of
//! the phase in between (the test device uses that to report exits per I/O).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

/// Kinds of userspace exits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// `in` / `ins`.
    PioIn = 0,
    /// `out` / `outs`.
    PioOut = 1,
    /// MMIO read.
    MmioRead = 2,
    /// MMIO write.
    MmioWrite = 3,
    /// Anything else that returned to userspace (HLT, interrupted, system event…).
    Other = 4,
}

const KINDS: usize = 5;
const KIND_NAMES: [&str; KINDS] = ["pio_in", "pio_out", "mmio_read", "mmio_write", "other"];

/// Bucket for accesses that no range claims.
pub const UNCLAIMED: usize = 0;

struct Bucket {
    name: String,
    reads: AtomicU64,
    writes: AtomicU64,
}

/// The VM's exit counters.
pub struct Stats {
    kinds: [AtomicU64; KINDS],
    buckets: RwLock<Vec<Bucket>>,
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

impl Stats {
    /// Counters with only the `unclaimed` bucket.
    pub fn new() -> Self {
        let s = Stats {
            kinds: Default::default(),
            buckets: RwLock::new(Vec::new()),
        };
        s.bucket("unclaimed");
        s
    }

    /// The bucket called `name`, created on first use.
    pub fn bucket(&self, name: &str) -> usize {
        let mut b = self.buckets.write().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = b.iter().position(|x| x.name == name) {
            return i;
        }
        b.push(Bucket {
            name: name.to_string(),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
        });
        b.len() - 1
    }

    /// Count one exit of `kind` that went to bucket `tag` (or [`UNCLAIMED`]).
    pub fn count(&self, kind: ExitKind, tag: Option<usize>) {
        self.kinds[kind as usize].fetch_add(1, Ordering::Relaxed);
        let write = match kind {
            ExitKind::PioOut | ExitKind::MmioWrite => true,
            ExitKind::PioIn | ExitKind::MmioRead => false,
            ExitKind::Other => return,
        };
        let b = self.buckets.read().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = b.get(tag.unwrap_or(UNCLAIMED)) {
            if write { &b.writes } else { &b.reads }.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The current values.
    pub fn snapshot(&self) -> Snapshot {
        let b = self.buckets.read().unwrap_or_else(|e| e.into_inner());
        Snapshot {
            kinds: std::array::from_fn(|i| self.kinds[i].load(Ordering::Relaxed)),
            buckets: b
                .iter()
                .map(|x| {
                    (
                        x.name.clone(),
                        x.reads.load(Ordering::Relaxed),
                        x.writes.load(Ordering::Relaxed),
                    )
                })
                .collect(),
        }
    }
}

/// Counter values at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    kinds: [u64; KINDS],
    /// (bucket name, reads, writes).
    pub buckets: Vec<(String, u64, u64)>,
}

impl Snapshot {
    /// Exits of one kind.
    pub fn kind(&self, k: ExitKind) -> u64 {
        self.kinds[k as usize]
    }

    /// Set the count of one kind (for building expected values).
    pub fn set_kind(&mut self, k: ExitKind, v: u64) {
        self.kinds[k as usize] = v;
    }

    /// All userspace exits.
    pub fn total(&self) -> u64 {
        self.kinds.iter().sum()
    }

    /// (reads, writes) of the bucket called `name` (0, 0 if it does not exist).
    pub fn bucket(&self, name: &str) -> (u64, u64) {
        self.buckets
            .iter()
            .find(|b| b.0 == name)
            .map_or((0, 0), |b| (b.1, b.2))
    }

    /// `self - earlier`, bucket by bucket.
    pub fn since(&self, earlier: &Snapshot) -> Snapshot {
        Snapshot {
            kinds: std::array::from_fn(|i| self.kinds[i] - earlier.kinds[i]),
            buckets: self
                .buckets
                .iter()
                .map(|(n, r, w)| {
                    let (er, ew) = earlier.bucket(n);
                    (n.clone(), r - er, w - ew)
                })
                .collect(),
        }
    }

    /// One line: `exits=N pio_in=… mmio_write=… [bucket=r/w …]` (buckets with no accesses left out).
    pub fn line(&self) -> String {
        let mut s = format!("exits={}", self.total());
        for (i, n) in KIND_NAMES.iter().enumerate() {
            let _ = write!(s, " {n}={}", self.kinds[i]);
        }
        for (n, r, w) in &self.buckets {
            if r + w > 0 {
                let _ = write!(s, " [{n}] r={r} w={w}");
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_deltas() {
        let s = Stats::new();
        let a = s.bucket("com1");
        assert_eq!(s.bucket("com1"), a);
        s.count(ExitKind::PioOut, Some(a));
        let before = s.snapshot();
        s.count(ExitKind::PioOut, Some(a));
        s.count(ExitKind::MmioRead, None);
        s.count(ExitKind::Other, None);
        let d = s.snapshot().since(&before);
        assert_eq!(d.total(), 3);
        assert_eq!(d.bucket("com1"), (0, 1));
        assert_eq!(d.bucket("unclaimed"), (1, 0));
        assert_eq!(d.kind(ExitKind::MmioRead), 1);
        assert_eq!(d.line(), "exits=3 pio_in=0 pio_out=1 mmio_read=1 mmio_write=0 other=1 [unclaimed] r=1 w=0 [com1] r=0 w=1");
    }
}
