//! Namespaces: a backend plus its current LBA format.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use block::BlockBackend;

/// LBA data sizes offered, as log2 (LBA format 0 = 512 B, 1 = 4096 B).
pub const LBA_FORMATS: [u8; 2] = [9, 12];

/// One namespace.
#[derive(Clone)]
pub struct Namespace {
    /// Namespace ID (1-based).
    pub nsid: u32,
    /// Storage.
    pub backend: Arc<dyn BlockBackend>,
    /// Index into [`LBA_FORMATS`] currently in use.
    pub flbas: u8,
    /// Write protected (read-only image).
    pub read_only: bool,
    /// A flush of this backend failed: what was written may be lost, so every later Flush (and
    /// FUA write) reports the failure until the controller is reset, even if the kernel has
    /// since dropped the dirty pages and a new fdatasync would succeed.
    pub flush_failed: Arc<AtomicBool>,
}

impl Namespace {
    /// A namespace whose LBA size starts as the backend's sector size.
    pub fn new(nsid: u32, backend: Arc<dyn BlockBackend>) -> Self {
        let info = backend.info();
        let flbas = if info.sector_size == 4096 { 1 } else { 0 };
        Namespace {
            nsid,
            read_only: info.read_only,
            backend,
            flbas,
            flush_failed: Arc::default(),
        }
    }

    /// log2 of the LBA size.
    pub fn lba_shift(&self) -> u32 {
        u32::from(LBA_FORMATS[usize::from(self.flbas)])
    }

    /// LBA size in bytes.
    pub fn lba_size(&self) -> u64 {
        1 << self.lba_shift()
    }

    /// Namespace size in LBAs.
    pub fn nsze(&self) -> u64 {
        self.backend.info().capacity >> self.lba_shift()
    }

    /// True if `nlb` blocks from `slba` lie inside the namespace.
    pub fn in_range(&self, slba: u64, nlb: u64) -> bool {
        slba.checked_add(nlb).is_some_and(|end| end <= self.nsze())
    }
}
