//! End-to-end harness: start `rhyve uml`, boot User-Mode Linux with the real drivers against it,
//! run a shell script inside the guest, and hand back its status and console output. The KVM
//! tests (`rhyve run`) use the scratch helpers here and [`process`].
//!
//! The UML kernel and initramfs come from `guest/` (built once, cached outside the checkout).
//! `RHYVE_UML_KERNEL` / `RHYVE_UML_INITRD` override them.
#![allow(dead_code)]

pub mod pkgs;
pub mod process;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run_capture(cmd: &mut Command) -> String {
    let out = cmd.stderr(Stdio::inherit()).output().expect("spawn");
    assert!(out.status.success(), "{cmd:?} failed: {}", out.status);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Path of the UML kernel (built and cached by guest/build-uml.sh on first use).
pub fn kernel() -> &'static Path {
    static K: OnceLock<PathBuf> = OnceLock::new();
    K.get_or_init(|| {
        if let Ok(k) = std::env::var("RHYVE_UML_KERNEL") {
            return PathBuf::from(k);
        }
        let out = run_capture(Command::new("bash").arg(root().join("guest/build-uml.sh")));
        PathBuf::from(out.lines().last().expect("build-uml.sh printed no path"))
    })
}

/// Path of the guest initramfs.
pub fn initrd() -> &'static Path {
    static I: OnceLock<PathBuf> = OnceLock::new();
    I.get_or_init(|| {
        if let Ok(i) = std::env::var("RHYVE_UML_INITRD") {
            return PathBuf::from(i);
        }
        let dir = scratch_root().join("initrd");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("initrd-{}.cpio.gz", std::process::id()));
        run_capture(
            Command::new("bash")
                .arg(root().join("guest/mkinitramfs.sh"))
                .arg(&path),
        );
        path
    })
}

fn scratch_root() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("e2e")
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    scratch_in(&scratch_root(), name)
}

/// A fresh scratch directory `NAME-PID` under `area` (removed first, so it holds nothing from an
/// earlier run); each test binary keeps its own area.
pub fn scratch_in(area: &Path, name: &str) -> PathBuf {
    let d = area.join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Create a sparse image of `size` bytes.
pub fn image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    p
}

/// A running `rhyve uml` server.
pub struct Rhyve {
    child: Child,
    /// Socket paths, in `-s` order.
    pub sockets: Vec<PathBuf>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Rhyve {
    /// Start `rhyve uml --socket-dir DIR -s …` and wait for its `ready` line.
    pub fn start(dir: &Path, slots: &[&str]) -> Rhyve {
        Self::start_with(dir, slots, &[])
    }

    /// [`Rhyve::start`] with more `rhyve uml` arguments.
    pub fn start_with(dir: &Path, slots: &[&str], extra: &[&str]) -> Rhyve {
        let sockdir = dir.join("sock");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rhyve"));
        cmd.arg("uml")
            .arg("--socket-dir")
            .arg(&sockdir)
            .arg("--stats")
            .args(extra);
        for s in slots {
            cmd.arg("-s").arg(s);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn rhyve");
        let mut err = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        if line.trim() != "ready" {
            let _ = child.wait();
            panic!(
                "rhyve did not get ready: {line:?}; stderr: {}",
                stderr.join().unwrap()
            );
        }
        line.clear();
        out.read_line(&mut line).unwrap();
        let sockets = line
            .split_whitespace()
            .map(|a| {
                let v = a.strip_prefix("virtio_uml.device=").expect("device arg");
                PathBuf::from(v.rsplit_once(':').unwrap().0)
            })
            .collect();
        Rhyve {
            child,
            sockets,
            stderr: Some(stderr),
        }
    }

    /// Wait for rhyve to exit after UML went away; returns its stderr (stats).
    pub fn finish(mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                let err = self.stderr.take().unwrap().join().unwrap();
                assert!(st.success(), "rhyve exited with {st}: {err}");
                return err;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("rhyve did not exit after UML disconnected");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Rhyve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a guest run produced.
pub struct GuestRun {
    /// The guest script's exit status (124 timeout, 125 no marker).
    pub status: i32,
    /// The whole console.
    pub console: String,
}

impl GuestRun {
    /// Lines of the form `KEY=value` printed by the script, for `key`.
    pub fn value(&self, key: &str) -> Option<String> {
        let p = format!("{key}=");
        self.console
            .lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix(&p).map(|v| v.trim().to_string()))
    }

    /// Assert the script succeeded, printing the console if not.
    pub fn assert_ok(&self) {
        assert_eq!(
            self.status, 0,
            "guest script failed; console:\n{}",
            self.console
        );
    }
}

/// Boot UML against `rhyve`'s sockets and run `script` (a /bin/sh script) inside.
pub fn run_guest(dir: &Path, rhyve: &Rhyve, script: &str, timeout_s: u32) -> GuestRun {
    run_guest_append(dir, rhyve, script, timeout_s, &[])
}

/// [`run_guest`] with extra kernel command-line arguments.
pub fn run_guest_append(
    dir: &Path,
    rhyve: &Rhyve,
    script: &str,
    timeout_s: u32,
    append: &[&str],
) -> GuestRun {
    let sp = dir.join("guest.sh");
    let mut f = std::fs::File::create(&sp).unwrap();
    writeln!(f, "#!/bin/sh\n{script}").unwrap();
    drop(f);
    let mut cmd = Command::new("bash");
    cmd.arg(root().join("guest/run-uml.sh"))
        .arg("--kernel")
        .arg(kernel())
        .arg("--initrd")
        .arg(initrd())
        .arg("--script")
        .arg(&sp)
        .arg("--timeout")
        .arg(timeout_s.to_string());
    for s in &rhyve.sockets {
        cmd.arg("--device").arg(s);
    }
    for a in append {
        cmd.arg("--append").arg(a);
    }
    let out = cmd.stdin(Stdio::null()).output().expect("run-uml.sh");
    let console =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    std::fs::write(dir.join("console.log"), &console).unwrap();
    GuestRun {
        status: out.status.code().unwrap_or(-1),
        console,
    }
}

/// Guest script: fio crc32c verify on `dev` (4k random writes over 48 MiB at 0, 128k over
/// 128 MiB at 64 MiB), then `SHA=` of its first 192 MiB for [`host_sha256`] to compare.
pub fn fio_verify_script(dev: &str) -> String {
    format!(
        r#"set -e
common="--filename={dev} --ioengine=libaio --direct=1 --iodepth=32 --verify=crc32c --do_verify=1 --verify_fatal=1 --rw=randwrite"
fio --name=v4k $common --bs=4k --offset=0 --size=48M
fio --name=v128k $common --bs=128k --offset=64M --size=128M
echo "SHA=$(dd if={dev} bs=1M count=192 2>/dev/null | sha256sum | cut -d' ' -f1)"
"#
    )
}

/// Guest script: mkfs.ext4 on `dev`, 24 MiB plus 50 small files written and checksummed,
/// unmount, `fsck -fn` (`FSCK=clean`), remount and compare (`SUMS=match`).
pub fn ext4_roundtrip_script(dev: &str) -> String {
    format!(
        r#"set -e
mkfs.ext4 -q -F {dev}
mkdir -p /tmp/m
mount {dev} /tmp/m
dd if=/dev/urandom of=/tmp/m/big bs=1M count=24 2>/dev/null
mkdir /tmp/m/dir; for i in $(seq 1 50); do head -c $((i * 997)) /dev/urandom > /tmp/m/dir/f$i; done
(cd /tmp/m && find . -type f ! -path './lost+found/*' | sort | xargs sha256sum) > /tmp/sums
sync; umount /tmp/m
fsck.ext4 -fn {dev} && echo FSCK=clean
mount {dev} /tmp/m
(cd /tmp/m && sha256sum -c --quiet /tmp/sums) && echo SUMS=match
umount /tmp/m
"#
    )
}

/// How the UML guest names host path `p` in a shell script: the guest's /tmp is its own and
/// the host's /tmp is at `$RHYVE_HOST_TMP` (guest/README.md); everything else is the same path.
pub fn guest_path(p: &Path) -> String {
    match p.strip_prefix("/tmp") {
        Ok(rest) => format!("\"$RHYVE_HOST_TMP/{}\"", rest.display()),
        Err(_) => format!("\"{}\"", p.display()),
    }
}

/// SHA-256 of `len` bytes of `path` at `offset` (via sha256sum, as the guest computes it).
pub fn host_sha256(path: &Path, offset: u64, len: u64) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf).unwrap();
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&buf).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Fill the first `len` bytes of an image with `byte`, so zeroing is visible from the host.
pub fn fill(path: &Path, len: u64, byte: u8) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&vec![byte; len as usize], 0).unwrap();
}

/// The host's `e2fsck -fn` agrees the image holds a consistent file system.
pub fn assert_host_fsck_clean(img: &Path) {
    let st = Command::new("e2fsck").arg("-fn").arg(img).output().unwrap();
    assert!(
        st.status.success(),
        "host e2fsck: {}",
        String::from_utf8_lossy(&st.stdout)
    );
}
