//! Log page state: the error information ring, the changed-namespace list and the device
//! self-test results; and the Supported Log Pages log that lists them.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use zerocopy::IntoBytes;

use crate::spec::{lid, self_test, ErrorLogEntry, IoOpcode, SelfTestResult, Sqe, Status};

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
    /// Device self-test results, newest first, at most [`self_test::RESULTS`].
    pub self_tests: VecDeque<SelfTestResult>,
    /// The device self-test operation under way, if any.
    pub self_test_running: Option<RunningSelfTest>,
}

/// A device self-test operation under way. It has nothing to exercise but takes a few
/// seconds, as a drive's would, so a host that waits for its progress to move (nvme-cli's
/// `device-self-test --wait`) sees it move; it is finished lazily when next looked at.
#[derive(Clone, Copy, Debug)]
pub struct RunningSelfTest {
    /// Self-test Code (short or extended).
    pub stc: u8,
    /// The NSID the command named.
    pub nsid: u32,
    /// When it started.
    pub started: Instant,
    /// Power-on time at the start, in seconds.
    pub poh_secs: u64,
}

impl RunningSelfTest {
    /// How long the operation runs: short 3 s, extended 8 s (EDSTT says at most a minute).
    pub fn duration(&self) -> Duration {
        if self.stc == self_test::EXTENDED {
            Duration::from_secs(8)
        } else {
            Duration::from_secs(3)
        }
    }

    /// The result structure it leaves with `result` (completed or why it was aborted) after
    /// running for `ran`. The NSID field names where a failing LBA was found (valid only with
    /// NSIDV): nothing fails here, so no diagnostic field is valid.
    fn result(&self, result: u8, ran: Duration) -> SelfTestResult {
        SelfTestResult {
            status: (self.stc << 4) | result,
            power_on_hours: self.poh_secs.saturating_add(ran.as_secs()) / 3600,
            ..Default::default()
        }
    }
}

/// Log pages this controller returns (every LID the Get Log Page dispatch knows).
pub const SUPPORTED: [u8; 7] = [
    lid::SUPPORTED_LOG_PAGES,
    lid::ERROR_INFORMATION,
    lid::SMART_HEALTH,
    lid::FIRMWARE_SLOT,
    lid::CHANGED_NAMESPACES,
    lid::COMMANDS_SUPPORTED_EFFECTS,
    lid::DEVICE_SELF_TEST,
];

/// The Supported Log Pages log (LID 00h): one LID Supported and Effects dword per LID, with
/// LSUPP (bit 0) set for each log above; no log takes an index offset (IOS clear).
pub fn supported_log_pages() -> Vec<u8> {
    let mut v = vec![0u8; 1024];
    for l in SUPPORTED {
        v[usize::from(l) * 4] = 1;
    }
    v
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

impl Logs {
    /// Records a finished device self-test (newest first; the oldest beyond 20 falls off).
    fn record_self_test(&mut self, r: SelfTestResult) {
        self.self_tests.push_front(r);
        self.self_tests.truncate(self_test::RESULTS);
    }

    /// Finishes the running self-test if its time is up.
    pub fn settle_self_test(&mut self, now: Instant) {
        if let Some(t) = self.self_test_running {
            if now.saturating_duration_since(t.started) >= t.duration() {
                self.self_test_running = None;
                self.record_self_test(t.result(self_test::COMPLETED, t.duration()));
            }
        }
    }

    /// Ends the running self-test, if any, with `result` (one of the "aborted" codes).
    pub fn abort_self_test(&mut self, result: u8) {
        if let Some(t) = self.self_test_running.take() {
            self.record_self_test(t.result(result, t.started.elapsed()));
        }
    }

    /// The Device Self-test log (LID 06h, 564 bytes): the operation in progress and how far it
    /// is, then 20 result structures, unused ones marked "entry not used".
    pub fn self_test_log(&mut self, now: Instant) -> Vec<u8> {
        self.settle_self_test(now);
        let mut v = vec![0u8; 4];
        if let Some(t) = self.self_test_running {
            let done = now.saturating_duration_since(t.started).as_millis() * 100
                / t.duration().as_millis().max(1);
            v[0] = t.stc;
            v[1] = done.min(99) as u8;
        }
        let unused = SelfTestResult {
            status: self_test::UNUSED,
            ..Default::default()
        };
        for i in 0..self_test::RESULTS {
            v.extend_from_slice(self.self_tests.get(i).unwrap_or(&unused).as_bytes());
        }
        v
    }
}
