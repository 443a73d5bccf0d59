//! CI smoke of both benchmarks: each completes and writes valid JSON (and a chart). Speed is
//! not checked here; the benchmarks print their figures when run for real.

use std::path::{Path, PathBuf};
use std::process::Command;

use vmm_sys_util::tempdir::TempDir;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// The report has the right kind, a summary, and samples that all measured something.
fn check(path: &Path, kind: &str, targets: &[&str]) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert_eq!(doc["kind"], kind);
    assert!(!doc["summary"].as_array().expect("summary").is_empty());
    let samples = doc["samples"].as_array().expect("samples");
    for t in targets {
        let mine: Vec<_> = samples.iter().filter(|s| s["target"] == *t).collect();
        assert!(!mine.is_empty(), "no {t} samples in {}", path.display());
        for s in mine {
            assert!(s["iops"].as_f64().unwrap() > 0.0, "{s}");
            assert!(s["ios"].as_u64().unwrap() > 0, "{s}");
        }
    }
    let png = path.with_extension("png");
    let meta = std::fs::metadata(&png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
    assert!(meta.len() > 0);
}

#[test]
fn inproc_smoke_writes_valid_json() {
    let out = TempDir::new().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_rhyve-bench"))
        .args(["inproc", "--smoke", "--out"])
        .arg(out.as_path())
        .current_dir(root())
        .status()
        .unwrap();
    assert!(status.success());
    check(
        &out.as_path().join("inproc.json"),
        "inproc",
        &["nvme", "ahci", "fio"],
    );
}

#[test]
fn uml_smoke_writes_valid_json() {
    let out = TempDir::new().unwrap();
    // The rhyve binary of this build (same profile directory as rhyve-bench).
    let rhyve = Path::new(env!("CARGO_BIN_EXE_rhyve-bench")).with_file_name("rhyve");
    if !rhyve.exists() {
        let ok = Command::new(env!("CARGO"))
            .args(["build", "--bin", "rhyve"])
            .current_dir(root())
            .status()
            .unwrap()
            .success();
        assert!(ok, "building rhyve");
    }
    let status = Command::new(env!("CARGO_BIN_EXE_rhyve-bench"))
        .args(["uml", "--smoke", "--out"])
        .arg(out.as_path())
        .arg("--rhyve")
        .arg(&rhyve)
        .current_dir(root())
        .status()
        .unwrap();
    assert!(status.success());
    check(
        &out.as_path().join("uml.json"),
        "uml",
        &["nvme", "ahci", "qsd"],
    );
}
