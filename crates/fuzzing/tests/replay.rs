//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`) through the harnesses on
//! stable Rust, with the same invariants the fuzzer checks. A file that makes a harness panic
//! is a regression.

use std::path::{Path, PathBuf};

#[global_allocator]
static ALLOC: fuzzing::CountingAlloc = fuzzing::CountingAlloc;

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "empty corpus {}", dir.display());
    files
}

fn replay(target: &str, run: fn(&[u8])) {
    let files = corpus(target);
    for f in &files {
        // A fuzzer running on this checkout replaces files as it shrinks them.
        let Ok(data) = std::fs::read(f) else {
            continue;
        };
        let r = std::panic::catch_unwind(|| run(&data));
        assert!(r.is_ok(), "{target}: {} fails", f.display());
    }
    eprintln!("{target}: {} inputs replayed", files.len());
}

#[test]
fn nvme_corpus() {
    replay("nvme", fuzzing::nvme::run);
}

#[test]
fn ahci_corpus() {
    replay("ahci", fuzzing::ahci::run);
}

#[test]
fn pci_config_corpus() {
    replay("pci_config", fuzzing::pci_config::run);
}

#[test]
fn uml_msg_corpus() {
    replay("uml_msg", fuzzing::uml_msg::run);
}

#[test]
fn virtio_blk_corpus() {
    replay("virtio_blk", fuzzing::virtio_blk::run);
}
