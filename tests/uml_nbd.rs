//! Issue 10 acceptance, NBD: rhyve's NVMe on images served by `qemu-nbd` (qcow2 over loopback
//! TCP, raw over a UNIX socket), driven by the real Linux nvme driver in User-Mode Linux, and a
//! server killed and restarted while the guest runs fio verify.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;

use block::qemu_nbd::{free_port, QemuNbd};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn qcow2(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&p)
        .arg(size.to_string())
        .status()
        .unwrap();
    assert!(st.success());
    p
}

fn qemu_img_check(img: &Path) {
    let out = Command::new("qemu-img")
        .arg("check")
        .arg(img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img check {}: {}{}",
        img.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn nbd_qcow2_over_tcp_and_raw_over_unix_verify_with_fio() {
    let d = scratch("nbd-fio");
    let q = qcow2(&d, "disk.qcow2", 64 * MIB);
    let raw = image(&d, "disk.raw", 64 * MIB);
    let sock = d.join("raw.sock");
    let port = free_port();
    let sq = QemuNbd::serve(&q, "qcow2", None, port, &[]);
    let sr = QemuNbd::serve(&raw, "raw", Some(&sock), 0, &[]);
    let rh = Rhyve::start(
        &d,
        &[
            &format!("4,nvme,nbd://127.0.0.1:{port}/exp,ser=NBD-QCOW2"),
            &format!(
                "5,nvme,nbd+unix:///exp?socket={},ser=NBD-RAW",
                sock.display()
            ),
        ],
    );
    let run = run_guest(
        &d,
        &rh,
        r#"set -e
o="--ioengine=libaio --direct=1 --iodepth=16 --verify=crc32c --do_verify=1 --verify_fatal=1 --rw=randwrite --bs=8k --size=24M"
for c in /sys/class/nvme/nvme*; do
  n=$(basename $c)
  fio $o --name=$n --filename=/dev/${n}n1
  echo "SHA_$(cat $c/serial | tr -d ' ' | tr - _)=$(dd if=/dev/${n}n1 bs=1M count=24 2>/dev/null | sha256sum | cut -d' ' -f1)"
done
"#,
        600,
    );
    rh.finish();
    drop((sq, sr));
    run.assert_ok();
    assert_eq!(
        run.value("SHA_NBD_RAW").expect("raw checksum"),
        host_sha256(&raw, 0, 24 * MIB),
        "raw image differs from what the guest read"
    );
    assert!(run.value("SHA_NBD_QCOW2").is_some(), "{}", run.console);
    qemu_img_check(&q);
}

#[test]
fn nbd_server_killed_and_restarted_mid_run_loses_nothing() {
    let d = scratch("nbd-restart");
    let raw = image(&d, "disk.raw", 64 * MIB);
    let sock = d.join("raw.sock");
    let srv = QemuNbd::serve(&raw, "raw", Some(&sock), 0, &[]);
    let rh = Rhyve::start(
        &d,
        &[&format!(
            "4,nvme,nbd+unix:///exp?socket={},ser=NBD-RS",
            sock.display()
        )],
    );
    // Once the guest's fio is running, kill the server and bring it back half a second later.
    let (started, done) = (d.join("started"), d.join("done"));
    let (raw2, sock2, started2, done2) = (raw.clone(), sock.clone(), started.clone(), done.clone());
    let over = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let over2 = over.clone();
    let killer = std::thread::spawn(move || {
        let t = Instant::now();
        while !started2.exists()
            && !over2.load(std::sync::atomic::Ordering::Relaxed)
            && t.elapsed() < Duration::from_secs(300)
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_secs(2));
        let mid_run = !done2.exists();
        srv.kill();
        let _ = std::fs::remove_file(&sock2);
        std::thread::sleep(Duration::from_millis(500));
        (QemuNbd::serve(&raw2, "raw", Some(&sock2), 0, &[]), mid_run)
    });
    let script = format!(
        r#"set -e
touch {}
fio --name=rs --filename=/dev/nvme0n1 --ioengine=libaio --direct=1 --iodepth=8 --rw=randwrite --bs=4k --size=48M --verify=crc32c --do_verify=1 --verify_fatal=1
touch {}
echo "SHA=$(dd if=/dev/nvme0n1 bs=1M count=48 2>/dev/null | sha256sum | cut -d' ' -f1)"
"#,
        guest_path(&started),
        guest_path(&done)
    );
    let run = run_guest(&d, &rh, &script, 600);
    over.store(true, std::sync::atomic::Ordering::Relaxed);
    let stats = rh.finish();
    let (_srv, mid_run) = killer.join().unwrap();
    run.assert_ok();
    assert!(
        mid_run,
        "the server was killed after fio had finished: the test proved nothing"
    );
    assert_eq!(
        run.value("SHA").expect("guest checksum"),
        host_sha256(&raw, 0, 48 * MIB),
        "the image lost writes the guest saw acknowledged"
    );
    assert!(stats.contains("write_commands="), "{stats}");
}
