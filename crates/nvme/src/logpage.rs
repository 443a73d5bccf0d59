//! Log page state: the error information ring and the changed-namespace list.

use std::collections::VecDeque;

use crate::spec::{ErrorLogEntry, IoOpcode, Sqe, Status};

/// Error Log Page Entries supported (ELPE + 1).
pub const ERROR_LOG_ENTRIES: usize = 64;

/// Log state.
#[derive(Debug, Default)]
pub struct Logs {
    /// Newest first.
    pub errors: VecDeque<ErrorLogEntry>,
    /// Total errors ever logged (the entries' Error Count).
    pub error_count: u64,
    /// Namespaces whose attributes changed since the log was last read.
    pub changed_ns: Vec<u32>,
}

impl Logs {
    /// Record a failed command.
    pub fn record_error(&mut self, sqid: u16, cid: u16, status: Status, sqe: &Sqe) {
        // 64 bits, starting at 1; at the top it goes back to 1 (0 marks an invalid entry).
        self.error_count = self.error_count.checked_add(1).unwrap_or(1);
        // The LBA field names the failing block for the commands that address one.
        let lba = match IoOpcode(sqe.opcode()) {
            IoOpcode::WRITE
            | IoOpcode::READ
            | IoOpcode::COMPARE
            | IoOpcode::WRITE_ZEROES
            | IoOpcode::VERIFY
                if sqid != 0 =>
            {
                u64::from(sqe.cdw10) | (u64::from(sqe.cdw11) << 32)
            }
            _ => 0,
        };
        let e = ErrorLogEntry {
            error_count: self.error_count,
            sqid,
            cid,
            status: status.field() << 1,
            param_error_location: 0xffff,
            lba,
            nsid: sqe.nsid,
            ..Default::default()
        };
        self.errors.push_front(e);
        self.errors.truncate(ERROR_LOG_ENTRIES);
    }
}
