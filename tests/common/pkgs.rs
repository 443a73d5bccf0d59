//! Debian packages and kernels for the tests that boot real Linux: install what is missing (the
//! suite runs as root on a fresh Debian 12 machine) and find the newest installed kernel.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Install Debian packages that are missing (the test runs as root in CI).
pub fn ensure_pkgs(pkgs: &[&str]) {
    let missing: Vec<&str> = pkgs
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output();
            !out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout) == "install ok installed")
        })
        .collect();
    if missing.is_empty() {
        return;
    }
    let env = [("DEBIAN_FRONTEND", "noninteractive")];
    let st = Command::new("apt-get")
        .arg("update")
        .arg("-q")
        .envs(env)
        .status()
        .expect("apt-get");
    assert!(st.success(), "apt-get update failed");
    let st = Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .envs(env)
        .status()
        .unwrap();
    assert!(st.success(), "apt-get install {missing:?} failed");
}

/// The newest installed Debian kernel: (version, /boot/vmlinuz-version).
pub fn debian_kernel() -> (String, PathBuf) {
    let mut versions: Vec<String> = std::fs::read_dir("/boot")
        .expect("/boot")
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_prefix("vmlinuz-")
                .map(str::to_string)
        })
        .filter(|v| {
            Path::new("/lib/modules")
                .join(v)
                .join("modules.dep")
                .exists()
        })
        .collect();
    versions.sort_by(|a, b| {
        let key = |s: &str| {
            s.split(|c: char| !c.is_ascii_digit())
                .filter_map(|n| n.parse::<u64>().ok())
                .collect::<Vec<_>>()
        };
        key(a).cmp(&key(b))
    });
    let v = versions
        .pop()
        .expect("no /boot/vmlinuz-* with modules installed");
    let k = PathBuf::from(format!("/boot/vmlinuz-{v}"));
    (v, k)
}
