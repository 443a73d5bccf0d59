//! The contract between command decoding and execution.
//!
//! Decoding (ATA, NCQ, ATAPI) runs under the device lock, may change device state, and yields a
//! [`Plan`]: what data moves where ([`Action`]) and how the device reports it ([`Proto`]). The
//! I/O job then executes the action without any lock held, and the completion code turns the
//! protocol and outcome into FISes. Keeping the plan a plain value is what lets slow disk I/O run
//! outside the lock while every decision stays in one place.

use crate::fis::TaskFile;

/// How the device reports progress and completion (which FISes it sends).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// No data: one D2H Register FIS.
    NonData,
    /// PIO data-in: PIO Setup FIS per DRQ block, ending status in the last one (no D2H FIS).
    PioIn {
        /// Bytes per DRQ block.
        block: u32,
    },
    /// PIO data-out: PIO Setup FIS per DRQ block, then a D2H Register FIS.
    PioOut {
        /// Bytes per DRQ block.
        block: u32,
    },
    /// DMA: data FISes, then a D2H Register FIS.
    Dma,
    /// First-party DMA queued: D2H on acceptance, DMA Setup, then a Set Device Bits FIS.
    Ncq {
        /// NCQ tag (equal to the command slot).
        tag: u8,
    },
    /// ATAPI PACKET: the data phase by DMA or PIO, then a D2H Register FIS.
    Packet {
        /// Data moves by DMA (PACKET Features bit 0).
        dma: bool,
    },
}

/// What moves between medium, device and host memory.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing to move: complete with these outputs.
    Done(TaskFile),
    /// Send generated data (IDENTIFY, logs, SCSI responses) to the host, then complete.
    DataIn {
        /// The bytes to transfer.
        data: Vec<u8>,
        /// Outputs on success.
        tf: TaskFile,
    },
    /// Read `len` bytes at byte `offset` of the medium into host memory.
    Read {
        /// Byte offset on the medium.
        offset: u64,
        /// Bytes.
        len: u64,
        /// First LBA (for error reporting).
        lba: u64,
    },
    /// Write `len` bytes from host memory at byte `offset` of the medium.
    Write {
        /// Byte offset on the medium.
        offset: u64,
        /// Bytes.
        len: u64,
        /// First LBA (for error reporting).
        lba: u64,
        /// Make the data durable before completing (FUA or write cache disabled).
        flush: bool,
    },
    /// Read and discard (READ VERIFY SECTORS).
    Verify {
        /// Byte offset on the medium.
        offset: u64,
        /// Bytes.
        len: u64,
        /// First LBA (for error reporting).
        lba: u64,
    },
    /// Make the volatile write cache durable.
    Flush,
    /// Receive a DATA SET MANAGEMENT range list of `len` bytes from the host and trim it.
    Trim {
        /// Bytes of LBA range entries.
        len: u64,
    },
}

/// A decoded command.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    /// The data movement.
    pub action: Action,
    /// The reporting protocol.
    pub proto: Proto,
}

impl Plan {
    /// A command that completes at once with `tf`, reported as `proto` (a failed data command
    /// is still reported in its own protocol, e.g. an NCQ error through Set Device Bits).
    pub fn done(tf: TaskFile, proto: Proto) -> Self {
        Plan {
            action: Action::Done(tf),
            proto,
        }
    }

    /// Bytes the data phase moves to (`true`) or from (`false`) the host, if any.
    pub fn transfer(&self) -> Option<(u64, bool)> {
        match &self.action {
            Action::DataIn { data, .. } => Some((data.len() as u64, true)),
            Action::Read { len, .. } => Some((*len, true)),
            Action::Write { len, .. } | Action::Trim { len } => Some((*len, false)),
            Action::Done(_) | Action::Verify { .. } | Action::Flush => None,
        }
    }
}

/// How the execution of an [`Action`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoResult {
    /// Everything moved.
    Ok,
    /// The medium could not be read at `lba`.
    ReadError {
        /// First LBA of the failing chunk.
        lba: u64,
    },
    /// The medium could not be written (or flushed) at `lba`.
    WriteError {
        /// First LBA of the failing chunk.
        lba: u64,
    },
    /// A TRIM range list names sectors past the end of the medium.
    BadRange,
    /// The HBA could not use host memory: set this PxIS fatal error bit.
    HostFault(u32),
}
