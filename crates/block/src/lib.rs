//! rhyve's block layer.
//!
//! Device models see a [`BlockBackend`]: positional operations on a byte-addressed disk. The data
//! path is asynchronous and zero-copy: a model describes a request's buffers as a [`GuestIov`]
//! (host iovecs straight into guest memory, no bounce buffer) and hands it to an [`Engine`]
//! (io_uring, or a worker pool where io_uring cannot serve), whose completions an [`IoThread`]
//! or the submitting thread reaps. Models never block an MMIO path on a backend.
//!
//! * [`RawFile`]: a raw image file or block device (buffered or `O_DIRECT`).
//! * [`Ram`]: an in-memory disk.
//! * [`NbdBackend`]: an export of a Network Block Device server (`nbd://`, `nbd+unix://`).
//! * [`open`]: builds either from a [`BackendSpec`].
//! * [`Stats`]/[`StatsSnapshot`]: per-backend operation counters.
//!
//! `unsafe` lives only in `guest` (iovecs into guest memory and the raw vectored syscalls) and
//! `uring` (io_uring submission); everything else forbids it.
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod aio;
#[cfg(feature = "test-support")]
pub mod crashtest;
mod exec;
mod file;
mod guest;
mod iothread;
mod iov;
mod nbd;
mod opts;
#[cfg(any(test, feature = "test-support"))]
pub mod qemu_nbd;
mod ram;
mod req;
mod stats;
#[cfg(test)]
mod testutil;
mod uring;

pub use aio::{Engine, EngineKind};
pub use exec::Executor;
pub use file::{RawFile, RawFileOptions};
pub use guest::{GuestIov, OutsideRam, SINK_SEGMENT};
pub use iothread::{IoHandler, IoThread, Tick};
pub use nbd::{is_nbd_uri, NbdAddr, NbdBackend, NbdUri};
pub use opts::{open, validate_sector_size, BackendSpec};
pub use ram::Ram;
pub use req::{IoDone, IoReq, Op};
pub use stats::{Stats, StatsSnapshot};

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::BorrowedFd;

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

/// How an [`Engine`] runs requests on a backend.
#[derive(Clone, Copy, Debug)]
pub enum Dispatch<'a> {
    /// Quick and never blocks (a RAM disk): run on the submitting thread.
    Inline,
    /// Reads, writes and flushes may go to io_uring on this descriptor. `direct` is the
    /// `O_DIRECT` alignment (file offset, buffer address) requests must meet; a request that
    /// does not goes to [`BlockBackend::read_iov`]/[`BlockBackend::write_iov`] on a worker.
    Fd {
        /// The open image.
        fd: BorrowedFd<'a>,
        /// `Some((offset_align, mem_align))` when the file is open with `O_DIRECT`.
        direct: Option<(u64, usize)>,
    },
    /// May block: run on a worker thread.
    Blocking,
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
    /// How an engine should run requests here. The default (worker threads calling the methods
    /// above) suits any backend.
    fn dispatch(&self) -> Dispatch<'_> {
        Dispatch::Blocking
    }
    /// Read straight into guest memory. The default ([`read_iov_staged`]) goes through a
    /// bounded host buffer; backends that can, override it to transfer directly.
    fn read_iov(&self, offset: u64, iov: &GuestIov) -> Result<()> {
        read_iov_staged(self, offset, iov)
    }
    /// Write straight from guest memory. The default ([`write_iov_staged`]) goes through a
    /// bounded host buffer.
    fn write_iov(&self, offset: u64, iov: &GuestIov) -> Result<()> {
        write_iov_staged(self, offset, iov)
    }
    /// Write straight from guest memory with Force Unit Access: durable when it returns. The
    /// default writes, then flushes; backends with a real FUA override it.
    fn write_iov_fua(&self, offset: u64, iov: &GuestIov) -> Result<()> {
        self.write_iov(offset, iov)?;
        self.flush()
    }
    /// Count an operation an engine performed on the descriptor from [`Dispatch::Fd`].
    fn account(&self, _op: Op, _bytes: u64, _ok: bool) {}
}

/// Largest host buffer the staged transfers use: a request is moved piece by piece, so the
/// host memory it needs does not grow with its length.
pub const STAGE_MAX: usize = 1 << 20;

/// [`BlockBackend::read_iov`] for backends without a direct path: `read_vectored` into a host
/// buffer of at most [`STAGE_MAX`] bytes, copied to guest memory piece by piece.
pub fn read_iov_staged<B: BlockBackend + ?Sized>(b: &B, offset: u64, iov: &GuestIov) -> Result<()> {
    let total = iov.len();
    let mut buf = vec![0u8; total.min(STAGE_MAX as u64) as usize];
    let mut done = 0u64;
    while done < total {
        let n = (total - done).min(buf.len() as u64) as usize;
        b.read_vectored(offset + done, &mut [IoSliceMut::new(&mut buf[..n])])?;
        iov.copy_from(done, &buf[..n]);
        done += n as u64;
    }
    Ok(())
}

/// [`BlockBackend::write_iov`] for backends without a direct path (see [`read_iov_staged`]).
pub fn write_iov_staged<B: BlockBackend + ?Sized>(
    b: &B,
    offset: u64,
    iov: &GuestIov,
) -> Result<()> {
    let total = iov.len();
    let mut buf = vec![0u8; total.min(STAGE_MAX as u64) as usize];
    let mut done = 0u64;
    while done < total {
        let n = (total - done).min(buf.len() as u64) as usize;
        iov.copy_to(done, &mut buf[..n]);
        b.write_vectored(offset + done, &[IoSlice::new(&buf[..n])])?;
        done += n as u64;
    }
    Ok(())
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
