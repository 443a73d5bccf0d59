//! Test helpers: uniquely named temporary files that remove themselves.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static SEQ: AtomicU64 = AtomicU64::new(0);

/// A temporary file, removed on drop.
pub(crate) struct TempFile(PathBuf);

impl TempFile {
    /// A new file of `len` bytes (sparse, reading zero) in the system temp directory.
    pub(crate) fn with_len(tag: &str, len: u64) -> Self {
        Self::in_dir(&std::env::temp_dir(), tag, len).expect("create temp file")
    }

    /// A new file of `len` bytes in `dir`.
    pub(crate) fn in_dir(dir: &Path, tag: &str, len: u64) -> std::io::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "rhyve-block-{tag}-{}-{}-{nanos}.img",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let path = dir.join(name);
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        let t = TempFile(path);
        f.set_len(len)?;
        Ok(t)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A small deterministic PRNG (xorshift64*), so tests need no extra crates.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }
    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform-ish in `0..n` (n > 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub(crate) fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.next() as u8;
        }
    }
}
