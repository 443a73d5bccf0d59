//! Running `rhyve run` as a child process for the KVM tests, and what the host's KVM can do.
//!
//! A guest that hangs must fail its test rather than the whole run, and a chatty one must not
//! block on a full pipe: [`collect`] drains both pipes on threads and kills the child after a
//! hang guard.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How often [`collect`] looks whether the child has exited.
const POLL: Duration = Duration::from_millis(20);

/// `rhyve run` with stdin closed and both outputs piped for [`collect`]: stdout is the guest's
/// COM1, stderr rhyve's own lines.
pub fn rhyve_run() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rhyve"));
    c.arg("run")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// What a finished child printed.
pub struct Finished {
    /// How it exited (killed, if it outlived the hang guard).
    pub status: ExitStatus,
    /// Its stdout; empty if the caller had already taken the pipe.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
}

/// Wait for `child`, killing it after `hang_guard`, and read all it printed. Its stdout may have
/// been taken already (a test that reads the console as it goes); its stderr must be piped.
pub fn collect(mut child: Child, hang_guard: Duration) -> Finished {
    let out = child.stdout.take();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut out) = out {
            let _ = out.read_to_string(&mut s);
        }
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + hang_guard;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(POLL);
    };
    Finished {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

/// The hardware-virtualization flag (`vmx` or `svm`) in /proc/cpuinfo, if any: without one KVM
/// can only emulate, which a stock kernel does not survive.
pub fn vtx_flag() -> Option<&'static str> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))?
        .to_string();
    ["vmx", "svm"]
        .into_iter()
        .find(|f| flags.split_whitespace().any(|x| x == *f))
}

/// Whether /dev/kvm opens read-write (callers say why they skip when it does not).
pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}
