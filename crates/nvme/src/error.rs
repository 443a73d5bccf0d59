//! Why a command failed: the status the guest sees plus the reason a user reading the log
//! needs, and a rate limit for the warnings a guest can provoke in a loop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use crate::spec::Status;

/// A failed command: the completion status and why it was chosen.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {reason}")]
pub struct NvmeError {
    /// What the guest sees in the CQE.
    pub status: Status,
    /// Why.
    pub reason: Reason,
}

impl NvmeError {
    /// A status with its reason.
    pub fn new(status: Status, reason: Reason) -> Self {
        NvmeError { status, reason }
    }

    /// Invalid Field in Command, naming the field and what is wrong with it.
    pub fn field(why: &'static str) -> Self {
        NvmeError::new(Status::INVALID_FIELD, Reason::Field(why))
    }
}

/// A status from a lower layer (data pointer walking, guest copies) that names its own cause.
impl From<Status> for NvmeError {
    fn from(status: Status) -> Self {
        NvmeError::new(status, Reason::Transfer)
    }
}

/// Why a command failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    /// A queue identifier that cannot be used here.
    #[error("queue {qid}: {why}")]
    InvalidQueueId {
        /// The queue the command named.
        qid: u32,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A queue size outside what the controller supports.
    #[error("queue size {size} outside 2..={max}")]
    QueueSize {
        /// Entries asked for.
        size: u32,
        /// CAP.MQES + 1.
        max: u32,
    },
    /// An interrupt vector the function does not have.
    #[error("interrupt vector {iv}, the function has {vectors}")]
    Vector {
        /// The vector asked for.
        iv: u32,
        /// Vectors enabled.
        vectors: u32,
    },
    /// A namespace ID that names no active namespace.
    #[error("namespace {nsid} is not active")]
    Namespace {
        /// The NSID of the command.
        nsid: u32,
    },
    /// Logical blocks past the end of the namespace.
    #[error("LBAs {slba}+{nlb} past the namespace's {nsze} blocks")]
    LbaRange {
        /// Starting LBA.
        slba: u64,
        /// Blocks.
        nlb: u64,
        /// Namespace size in blocks.
        nsze: u64,
    },
    /// A transfer larger than MDTS allows.
    #[error("{bytes} bytes exceed the maximum data transfer size of {max}")]
    TooLarge {
        /// Bytes the command asked for.
        bytes: u64,
        /// The MDTS limit in bytes.
        max: u64,
    },
    /// A field of the command that is invalid, and why.
    #[error("{0}")]
    Field(&'static str),
    /// An opcode the controller does not support in this configuration.
    #[error("opcode not supported")]
    Opcode,
    /// A log page the controller does not have.
    #[error("log page {lid:#04x} not supported")]
    LogPage {
        /// Log Page Identifier.
        lid: u8,
    },
    /// A write to a read-only namespace.
    #[error("namespace is read-only")]
    ReadOnly,
    /// The data pointer (PRP, SGL) or the guest memory it names was refused.
    #[error("data pointer or guest memory refused")]
    Transfer,
    /// The command is valid but the controller's state does not allow it now.
    #[error("{0}")]
    Sequence(&'static str),
    /// A limit of outstanding commands of a kind (AER, Abort).
    #[error("{0} limit exceeded")]
    Limit(&'static str),
    /// The backend failed.
    #[error("backend: {0}")]
    Backend(String),
}

/// Lets a warning through at most once a second, and says how many were held back since.
#[derive(Default)]
pub struct RateLimit {
    /// Milliseconds since [`epoch`] when one last went through (+1, so 0 means never).
    last: AtomicU64,
    suppressed: AtomicU64,
}

fn epoch() -> Instant {
    static E: OnceLock<Instant> = OnceLock::new();
    *E.get_or_init(Instant::now)
}

impl RateLimit {
    /// A limiter that has let nothing through yet.
    pub const fn new() -> Self {
        RateLimit {
            last: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(held back since the last one)` if this one may be logged.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(epoch().elapsed().as_millis() as u64 + 1)
    }

    /// [`RateLimit::allow`] at `now` (milliseconds, from 1).
    fn allow_at(&self, now: u64) -> Option<u64> {
        let last = self.last.load(Ordering::Relaxed);
        if last != 0 && now < last + 1000
            || self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

/// `log::warn!` through a [`RateLimit`]: a guest that repeats the cause cannot flood the log.
#[macro_export]
macro_rules! warn_limited {
    ($limit:expr, $($arg:tt)+) => {
        if let Some(held) = $limit.allow() {
            if held > 0 {
                log::warn!("{} ({held} more like it not shown)", format_args!($($arg)+));
            } else {
                log::warn!($($arg)+);
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_cut_to_one_a_second_and_counted() {
        let r = RateLimit::new();
        assert_eq!(r.allow_at(1), Some(0));
        for ms in 0..100 {
            assert_eq!(r.allow_at(2 + ms * 9), None);
        }
        assert_eq!(r.allow_at(1001), Some(100));
        assert_eq!(r.allow_at(1002), None);
    }

    #[test]
    fn errors_read_as_status_and_reason() {
        let e = NvmeError::new(
            Status::INVALID_QID,
            Reason::InvalidQueueId {
                qid: 9,
                why: "beyond Number of Queues",
            },
        );
        assert_eq!(
            e.to_string(),
            "INVALID_QID (1/01h): queue 9: beyond Number of Queues"
        );
    }
}
