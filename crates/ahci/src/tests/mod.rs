//! In-process tests: a driver modelled on Linux's ahci/libata runs every command and error path
//! against the controller over real guest memory.

mod ata_cmds;
mod atapi_cmds;
mod bad_input;
mod config;
mod crash;
mod hba_regs;
mod hostile;
mod ncq;
mod state;

/// A test's code run inside a settle.
pub(crate) type SettleHook = Box<dyn FnOnce(&crate::Shared)>;

thread_local! {
    /// Runs inside the next [`crate::Shared::settle`] on this thread, just before it marks its
    /// requests done: where a concurrent settle and a reset can slip in.
    pub(crate) static BEFORE_SETTLED: std::cell::RefCell<Option<SettleHook>> =
        const { std::cell::RefCell::new(None) };
}
