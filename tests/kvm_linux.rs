//! Real Linux under `rhyve run`: Debian's kernel (`linux-image-amd64`, bzImage) with a busybox
//! initramfs that loads the nvme and ahci drivers and runs `fio --verify=crc32c` on both disks,
//! then powers off through ACPI.
//!
//! This is what users run. It needs hardware virtualization: where /proc/cpuinfo has neither
//! `vmx` nor `svm`, KVM can only emulate (see shared/notes/kvm-on-this-machine.md) and the test
//! prints `SKIPPED (no VT-x): …` and returns.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::process::{collect, kvm_usable, rhyve_run, vtx_flag};
use common::root;

/// Install Debian packages that are missing (the test runs as root in CI).
fn ensure_pkgs(pkgs: &[&str]) {
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
fn debian_kernel() -> (String, PathBuf) {
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

#[test]
fn kvm_linux_boots_and_fio_verifies_nvme_and_ahci() {
    let Some(flag) = vtx_flag() else {
        println!(
            "SKIPPED (no VT-x): /proc/cpuinfo has neither vmx nor svm, so KVM here cannot run a stock Linux kernel"
        );
        return;
    };
    if !kvm_usable() {
        println!(
            "SKIPPED (no /dev/kvm): the CPU has {flag} but /dev/kvm cannot be opened read-write"
        );
        return;
    }
    ensure_pkgs(&["linux-image-amd64", "busybox-static", "fio", "kmod", "cpio"]);
    let (kver, kernel) = debian_kernel();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("kvm-linux")
        .join(std::process::id().to_string());
    std::fs::create_dir_all(&dir).unwrap();
    let initrd = dir.join("initrd.cpio.gz");
    let st = Command::new("bash")
        .arg(root().join("guest/kvm-test/linux-initramfs.sh"))
        .arg(&kver)
        .arg(&initrd)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "linux-initramfs.sh failed");
    let nvme = dir.join("nvme.img");
    let sata = dir.join("sata.img");
    for img in [&nvme, &sata] {
        std::fs::File::create(img)
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
    }
    let child = rhyve_run()
        .args(["-m", "1G", "-c", "2", "--stats", "-s", "0,hostbridge"])
        .args(["-s", &format!("4,nvme,{},ser=RHYVELINUX", nvme.display())])
        .args(["-s", &format!("5,ahci,hd:{}", sata.display())])
        .args(["-l", "com1,stdio", "--kernel"])
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--cmdline", "console=ttyS0 panic=-1 quiet loglevel=4"])
        .spawn()
        .expect("spawn rhyve");
    // A hang guard only: a healthy run takes well under a minute.
    let done = collect(child, Duration::from_secs(900));
    let (status, console, log) = (done.status, done.stdout, done.stderr);
    std::fs::write(dir.join("console.log"), &console).unwrap();
    let dump = format!("rhyve {status}\n--- console ---\n{console}\n--- rhyve ---\n{log}");
    assert_eq!(status.code(), Some(0), "{dump}");
    assert!(log.contains("rhyve: guest powered off"), "{dump}");
    for want in [
        "RHYVE-LINUX: up, 2 CPUs",
        "RHYVE-LINUX: found /dev/nvme0n1",
        "RHYVE-LINUX: found /dev/sda",
        "RHYVE-LINUX: fio nvme0n1 rc=0",
        "RHYVE-LINUX: fio sda rc=0",
        "RHYVE-LINUX: PASS",
    ] {
        assert!(console.contains(want), "missing {want:?}\n{dump}");
    }
    println!(
        "{}",
        log.lines()
            .filter(|l| l.starts_with("rhyve: "))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
