//! The request types shared by the engine ([`crate::aio`]) and the io_uring it drives
//! ([`crate::uring`]): what a device model submits and what it reaps. They sit below both so
//! that `uring` does not depend on `aio`.

use std::sync::Arc;

use crate::guest::GuestIov;
use crate::{BlockBackend, Result};

/// A block operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Read `iov.len()` bytes at `offset` into the guest buffers.
    Read,
    /// Write `iov.len()` bytes from the guest buffers at `offset`.
    Write,
    /// Make completed writes durable.
    Flush,
    /// Deallocate `len` bytes at `offset`.
    Discard,
    /// Zero `len` bytes at `offset`.
    WriteZeroes,
}

/// One request.
pub struct IoReq {
    /// The device's name for the request, handed back in [`IoDone`].
    pub tag: u64,
    /// What to do.
    pub op: Op,
    /// Byte offset on the disk.
    pub offset: u64,
    /// Bytes for discard and write-zeroes (reads and writes move `iov.len()`).
    pub len: u64,
    /// Write only: durable before it completes (Force Unit Access).
    pub fua: bool,
    /// Data buffers (reads and writes).
    pub iov: GuestIov,
    /// The disk.
    pub backend: Arc<dyn BlockBackend>,
}

impl std::fmt::Debug for IoReq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoReq")
            .field("tag", &self.tag)
            .field("op", &self.op)
            .field("offset", &self.offset)
            .field("len", &self.len)
            .field("fua", &self.fua)
            .field("iov", &self.iov)
            .finish()
    }
}

/// A finished request (its buffers come back for reuse).
#[derive(Debug)]
pub struct IoDone {
    /// The request as submitted.
    pub req: IoReq,
    /// Its outcome.
    pub result: Result<()>,
}
