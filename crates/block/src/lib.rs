//! rhyve's block layer.
//!
//! Device models see a [`BlockBackend`]: positional, vectored, synchronous operations on a
//! byte-addressed disk, plus [`Executor`] for asynchronous submission (a worker pool now; io_uring
//! later). Models never block an MMIO path on a backend: they submit a job and post the completion
//! from the job.
//!
//! * [`RawFile`]: a raw image file or block device (buffered or `O_DIRECT`).
//! * [`Ram`]: an in-memory disk.
//! * [`open`]: builds either from a [`BackendSpec`].
//! * [`Stats`]/[`StatsSnapshot`]: per-backend operation counters.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod exec;
mod file;
mod iov;
mod opts;
mod ram;
mod stats;
#[cfg(test)]
mod testutil;

pub use exec::Executor;
pub use file::{RawFile, RawFileOptions};
pub use opts::{open, validate_sector_size, BackendSpec};
pub use ram::Ram;
pub use stats::{Stats, StatsSnapshot};

use std::io::{IoSlice, IoSliceMut};

/// Result type of backend operations.
pub type Result<T> = std::result::Result<T, BlockError>;

/// Errors from opening or using a backend.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The OS reported an I/O error.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A write, discard or write-zeroes on a read-only backend.
    #[error("backend is read-only")]
    ReadOnly,
    /// The request reaches past the end of the disk.
    #[error(
        "request at offset {offset} length {len} is past the end of the disk ({capacity} bytes)"
    )]
    OutOfRange {
        /// First byte of the request.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// Size of the disk in bytes.
        capacity: u64,
    },
    /// A bad option when opening, or an image that cannot be opened (the message names the
    /// path and the OS error).
    #[error("{0}")]
    Config(String),
}

/// Static facts about a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendInfo {
    /// Size in bytes.
    pub capacity: u64,
    /// Logical sector size the device should report (512 or 4096).
    pub sector_size: u32,
    /// Writes are refused.
    pub read_only: bool,
    /// Discard is implemented (hole punching or RAM zeroing), and discarded ranges read back zero.
    pub discard_zeroes: bool,
}

/// A disk image behind a device model. All offsets and lengths are in bytes.
pub trait BlockBackend: Send + Sync {
    /// Size, sector size, read-only.
    fn info(&self) -> BackendInfo;
    /// Read into `bufs` starting at `offset`. Short reads are an error.
    fn read_vectored(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()>;
    /// Write `bufs` starting at `offset`. Short writes are an error.
    fn write_vectored(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()>;
    /// Make completed writes durable (fdatasync).
    fn flush(&self) -> Result<()>;
    /// Deallocate a range; it reads back as zeroes afterwards.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// Write zeroes over a range (fallocate where possible, else explicit writes).
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;
    /// Operation counters since the backend was opened (zeroes if the backend keeps none).
    fn stats(&self) -> StatsSnapshot {
        StatsSnapshot::default()
    }
}

/// Checks that `[offset, offset + len)` lies within a disk of `capacity` bytes.
pub(crate) fn check_range(offset: u64, len: u64, capacity: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(BlockError::OutOfRange {
            offset,
            len,
            capacity,
        }),
    }
}
