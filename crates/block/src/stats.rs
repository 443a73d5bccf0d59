//! Operation counters kept by each backend.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Live counters, updated with relaxed atomics from any thread.
#[derive(Debug, Default)]
pub struct Stats {
    read_ops: AtomicU64,
    read_bytes: AtomicU64,
    write_ops: AtomicU64,
    write_bytes: AtomicU64,
    flushes: AtomicU64,
    discards: AtomicU64,
    write_zeroes: AtomicU64,
    errors: AtomicU64,
}

/// A copy of [`Stats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Successful reads.
    pub read_ops: u64,
    /// Bytes returned by successful reads.
    pub read_bytes: u64,
    /// Successful writes.
    pub write_ops: u64,
    /// Bytes stored by successful writes.
    pub write_bytes: u64,
    /// Successful flushes.
    pub flushes: u64,
    /// Successful discards.
    pub discards: u64,
    /// Successful write-zeroes operations.
    pub write_zeroes: u64,
    /// Operations of any kind that failed (I/O error, out of range, read-only).
    pub errors: u64,
}

impl Stats {
    /// New counters, all zero.
    pub fn new() -> Self {
        Self::default()
    }
    /// Counts a successful read of `bytes`.
    pub fn record_read(&self, bytes: u64) {
        self.read_ops.fetch_add(1, Relaxed);
        self.read_bytes.fetch_add(bytes, Relaxed);
    }
    /// Counts a successful write of `bytes`.
    pub fn record_write(&self, bytes: u64) {
        self.write_ops.fetch_add(1, Relaxed);
        self.write_bytes.fetch_add(bytes, Relaxed);
    }
    /// Counts a successful flush.
    pub fn record_flush(&self) {
        self.flushes.fetch_add(1, Relaxed);
    }
    /// Counts a successful discard.
    pub fn record_discard(&self) {
        self.discards.fetch_add(1, Relaxed);
    }
    /// Counts a successful write-zeroes.
    pub fn record_write_zeroes(&self) {
        self.write_zeroes.fetch_add(1, Relaxed);
    }
    /// Counts a failed operation.
    pub fn record_error(&self) {
        self.errors.fetch_add(1, Relaxed);
    }
    /// Counts an error if `r` is one, and passes `r` through.
    pub fn track<T>(&self, r: crate::Result<T>) -> crate::Result<T> {
        if r.is_err() {
            self.record_error();
        }
        r
    }
    /// Reads all counters (each one atomically; the set is not one atomic snapshot).
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            read_ops: self.read_ops.load(Relaxed),
            read_bytes: self.read_bytes.load(Relaxed),
            write_ops: self.write_ops.load(Relaxed),
            write_bytes: self.write_bytes.load(Relaxed),
            flushes: self.flushes.load(Relaxed),
            discards: self.discards.load(Relaxed),
            write_zeroes: self.write_zeroes.load(Relaxed),
            errors: self.errors.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_snapshots() {
        let s = Stats::new();
        s.record_read(512);
        s.record_read(4096);
        s.record_write(8);
        s.record_flush();
        s.record_discard();
        s.record_write_zeroes();
        assert!(s.track::<()>(Err(crate::BlockError::ReadOnly)).is_err());
        assert!(s.track(Ok(())).is_ok());
        let snap = s.snapshot();
        assert_eq!(
            snap,
            StatsSnapshot {
                read_ops: 2,
                read_bytes: 4608,
                write_ops: 1,
                write_bytes: 8,
                flushes: 1,
                discards: 1,
                write_zeroes: 1,
                errors: 1,
            }
        );
    }
}
