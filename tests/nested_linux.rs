//! The nested tier: real Debian Linux under `rhyve run` on every CI run, with the unmodified
//! nvme, ahci and libata drivers, rhyve's ACPI tables, host bridge, ECAM, MSI/MSI-X through
//! irqfd, INTx through `_PRT` and ioeventfd doorbells.
//!
//! Where the CPU has VT-x/AMD-V the L2 scenarios run straight under `rhyve run`. Elsewhere (this
//! machine and CI) they run one level down: Debian's kernel boots in `qemu-system-x86_64 -accel
//! tcg -cpu max -smp 1` (QEMU's TCG emulates SVM with nested paging), loads kvm_amd and runs
//! `rhyve run` from its initramfs (guest/nested/build-l1.sh). L1 has one CPU because nested SVM
//! under multi-threaded TCG is unstable in QEMU 7.2 (L2 triple faults, RCU stalls).
//!
//! L1 boots once; guest/nested/scenarios.sh runs every scenario inside it and prints a
//! `NESTED: <scenario> PASS|FAIL …` line each. Each test here asserts its own scenario's line,
//! so the tier shows up as separate tests while booting L1 only once per test run: the first
//! test to get there runs it under a file lock and leaves the lines for the others.
//!
//! Hang guards: the whole run has a deadline, and a watchdog kills QEMU if it uses almost no
//! CPU for three minutes (a frozen L1 has happened, QEMU idle for 17 minutes).

mod common;

use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::pkgs::{debian_kernel, ensure_pkgs};
use common::process::{kvm_usable, vtx_flag};
use common::root;

/// The longest the whole tier may take (L1 boot plus every scenario).
const DEADLINE: Duration = Duration::from_secs(40 * 60);
/// QEMU using less than this much CPU over [`IDLE_WINDOW`] is taken as a frozen L1.
const IDLE_CPU: Duration = Duration::from_secs(5);
const IDLE_WINDOW: Duration = Duration::from_secs(180);

/// The tier's outcome: every `NESTED: …` line, and where the full logs are.
struct Tier {
    lines: Vec<String>,
    how: String,
    logs: PathBuf,
}

impl Tier {
    /// The scenario's verdict line, or a failure with what the tier printed.
    fn check(&self, scenario: &str) {
        let pass = format!("NESTED: {scenario} PASS");
        if self.lines.contains(&pass) {
            println!("{pass} ({})", self.how);
            // The scenario's own figures (`NESTED: stats <scenario> …`) and notes (a retried
            // boot), the stats scenario's all figures.
            let mine = format!("NESTED: stats {scenario} ");
            let note = format!("NESTED: {scenario} NOTE");
            for l in self.lines.iter().filter(|l| {
                l.starts_with(&mine)
                    || l.starts_with(&note)
                    || (scenario == "stats" && l.starts_with("NESTED: stats"))
            }) {
                println!("{l}");
            }
            return;
        }
        panic!(
            "no `{pass}` from the nested tier ({}); logs in {}:\n{}",
            self.how,
            self.logs.display(),
            self.lines.join("\n")
        );
    }
}

/// One key per test run: nextest runs each test in its own process and names the run.
fn run_key() -> String {
    std::env::var("NEXTEST_RUN_ID").unwrap_or_else(|_| format!("pid{}", std::process::id()))
}

fn tier() -> &'static Tier {
    static T: OnceLock<Tier> = OnceLock::new();
    T.get_or_init(|| {
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("nested");
        fs::create_dir_all(&base).unwrap();
        let dir = base.join(run_key());
        fs::create_dir_all(&dir).unwrap();
        let lock = File::create(base.join("lock")).unwrap();
        lock.lock().expect("lock the nested tier");
        let results = dir.join("results.txt");
        if !results.exists() {
            let (how, lines) = run_tier(&dir);
            let mut text = format!("{how}\n");
            for l in &lines {
                text.push_str(l);
                text.push('\n');
            }
            fs::write(&results, text).unwrap();
        }
        let text = fs::read_to_string(&results).unwrap();
        let mut it = text.lines().map(str::to_string);
        let how = it.next().unwrap_or_default();
        Tier {
            lines: it.collect(),
            how,
            logs: dir,
        }
    })
}

/// Run every scenario; returns how, and the `NESTED: …` lines (a `NESTED: tier FAIL …` line
/// when the tier itself could not run).
fn run_tier(dir: &Path) -> (String, Vec<String>) {
    ensure_pkgs(&[
        "linux-image-amd64",
        "busybox-static",
        "fio",
        "kmod",
        "cpio",
        "xz-utils",
    ]);
    let (kver, kernel) = debian_kernel();
    let l2 = l2_initramfs(&kver);
    let rhyve = PathBuf::from(env!("CARGO_BIN_EXE_rhyve"));
    if let (Some(flag), true) = (vtx_flag(), kvm_usable()) {
        let how = format!("direct: {flag} on this host, L2 kernel {kver}");
        let work = dir.join("work");
        fs::create_dir_all(&work).unwrap();
        let out = Command::new("sh")
            .arg(root().join("guest/nested/scenarios.sh"))
            .env("RHYVE", &rhyve)
            .env("KERNEL", &kernel)
            .env("INITRD", &l2)
            .env("WORK", &work)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .expect("run scenarios.sh");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        fs::write(dir.join("scenarios.log"), &text).unwrap();
        return (how, nested_lines(&text));
    }
    ensure_pkgs(&["qemu-system-x86"]);
    // Installing it may have removed a newer qemu-utils from backports (tests/run-all.sh).
    ensure_pkgs(&["qemu-utils"]);
    let how = format!(
        "nested: no VT-x here, L1 = Debian {kver} in QEMU TCG -cpu max -smp 1, L2 = the same kernel under rhyve run"
    );
    let run_sh = dir.join("run.sh");
    fs::write(
        &run_sh,
        format!(
            "#!/bin/sh\nRHYVE=/usr/bin/rhyve KERNEL=/l2/{k} INITRD=/l2/{i} WORK=/tmp sh /l2/scenarios.sh\n",
            k = kernel.file_name().unwrap().to_string_lossy(),
            i = l2.file_name().unwrap().to_string_lossy(),
        ),
    )
    .unwrap();
    let l1 = dir.join("l1.cpio.gz");
    let st = Command::new("bash")
        .arg(root().join("guest/nested/build-l1.sh"))
        .arg(&kver)
        .arg(&rhyve)
        .arg(&l1)
        .arg(&run_sh)
        .arg(root().join("guest/nested/scenarios.sh"))
        .arg(&kernel)
        .arg(&l2)
        .stdout(Stdio::null())
        .status()
        .expect("build-l1.sh");
    assert!(st.success(), "guest/nested/build-l1.sh failed");
    let log = dir.join("l1.log");
    let text = run_l1(&kernel, &l1, &log);
    (how, nested_lines(&text))
}

/// The L2 initramfs, cached with the UML kernel and keyed on its scripts, the kernel, fio and
/// busybox.
fn l2_initramfs(kver: &str) -> PathBuf {
    let script = root().join("guest/nested/build-l2.sh");
    let key = {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&fs::read(&script).unwrap(), &mut h);
        std::hash::Hash::hash(
            &fs::read(root().join("guest/nested/stage.sh")).unwrap(),
            &mut h,
        );
        std::hash::Hash::hash(&fs::read("/usr/bin/fio").unwrap_or_default(), &mut h);
        std::hash::Hash::hash(&fs::read("/bin/busybox").unwrap_or_default(), &mut h);
        std::hash::Hasher::finish(&h)
    };
    let cache = std::env::var_os("RHYVE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/rhyve"))
        .join("nested");
    fs::create_dir_all(&cache).unwrap();
    let out = cache.join(format!("l2-{kver}-{key:016x}.cpio.gz"));
    if !out.exists() {
        let tmp = cache.join(format!("l2-{}.tmp", std::process::id()));
        let st = Command::new("bash")
            .arg(&script)
            .arg(kver)
            .arg(&tmp)
            .stdout(Stdio::null())
            .status()
            .expect("build-l2.sh");
        assert!(st.success(), "guest/nested/build-l2.sh failed");
        fs::rename(&tmp, &out).unwrap();
    }
    out
}

/// Boot L1 in QEMU and return its console, killing QEMU at the deadline or when it stops
/// using CPU.
fn run_l1(kernel: &Path, l1: &Path, log: &Path) -> String {
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", "3G"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(l1)
        .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=3"])
        .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
        .args(["-no-reboot", "-net", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qemu-system-x86_64");
    let pid = child.id();
    let out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let log_path = log.to_path_buf();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let mut f = File::create(&log_path).unwrap();
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let line = line.replace(['\r', '\u{1b}'], "");
            std::io::Write::write_all(&mut f, format!("{line}\n").as_bytes()).unwrap();
            if line.contains("NESTED: ") {
                // Progress for whoever watches the test's output.
                eprintln!("{line}");
            }
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let start = Instant::now();
    let mut window = (Instant::now(), cpu_of(pid));
    let mut killed = None;
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > DEADLINE {
            killed = Some(format!("the tier's {DEADLINE:?} deadline passed"));
        } else if window.0.elapsed() >= IDLE_WINDOW {
            let used = cpu_of(pid).saturating_sub(window.1);
            if used < IDLE_CPU {
                killed = Some(format!(
                    "QEMU used {used:?} of CPU in {IDLE_WINDOW:?}: L1 froze"
                ));
            }
            window = (Instant::now(), cpu_of(pid));
        }
        if killed.is_some() {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let mut text = reader.join().unwrap();
    let qemu_err = err_reader.join().unwrap();
    if let Some(why) = killed {
        text.push_str(&format!("NESTED: tier FAIL {why}\n"));
    }
    if !qemu_err.trim().is_empty() {
        text.push_str(&format!("NESTED: qemu stderr: {}\n", qemu_err.trim()));
    }
    text
}

/// CPU time (user + system) of a process so far.
fn cpu_of(pid: u32) -> Duration {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i)?.parse::<u64>().ok())
        .sum();
    // USER_HZ, the unit of /proc/PID/stat times, is 100 on x86-64 Linux.
    Duration::from_millis(ticks * 10)
}

fn nested_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.find("NESTED: ").map(|i| l[i..].trim_end().to_string()))
        .collect()
}

#[test]
fn nested_boot_one_vcpu() {
    tier().check("boot-1");
}

#[test]
fn nested_boot_two_vcpus() {
    tier().check("boot-2");
}

#[test]
fn nested_rtc_works_and_legacy_devices_probe_cleanly() {
    tier().check("rtc");
}

#[test]
fn nested_reboot_exits_3() {
    tier().check("reboot");
}

#[test]
fn nested_data_reaches_the_image_files() {
    tier().check("data");
}

#[test]
fn nested_fio_verify_msix_and_msi() {
    tier().check("fio-msi");
}

#[test]
fn nested_fio_verify_intx() {
    tier().check("fio-intx");
}

/// Live migration to a second `rhyve run` two seconds into a fio verify job on NVMe and AHCI:
/// the destination finishes both jobs and they verify, the source stops, and the downtime is
/// reported.
#[test]
fn nested_live_migration_with_fio_in_flight() {
    let t = tier();
    t.check("migrate");
    assert!(
        t.lines.iter().any(|l| l
            .strip_prefix("NESTED: stats migrate downtime_ms=")
            .is_some_and(|ms| ms.parse::<u64>().is_ok())),
        "no downtime reported: {:?}",
        t.lines
    );
}

/// A snapshot two seconds into the same job, the VM stopped, and `rhyve run --restore` in a new
/// process: the restored guest finishes both jobs and they verify.
#[test]
fn nested_snapshot_restore_with_fio_in_flight() {
    tier().check("snapshot");
}

#[test]
fn nested_exits_and_interrupts_per_io() {
    let t = tier();
    t.check("stats");
    let stats: Vec<&String> = t
        .lines
        .iter()
        .filter(|l| l.starts_with("NESTED: stats"))
        .collect();
    for want in ["nvme dbbuf=on", "nvme dbbuf=off", "ahci"] {
        assert!(
            stats
                .iter()
                .any(|l| l.contains(&format!("stats {want} ios="))),
            "no I/O counted for {want}: {stats:?}"
        );
    }
}

#[test]
fn nested_l1_finished_every_scenario() {
    let t = tier();
    assert!(
        t.how.starts_with("direct") || t.lines.iter().any(|l| l == "NESTED: DONE rc=0"),
        "L1 did not finish cleanly ({}); logs in {}:\n{}",
        t.how,
        t.logs.display(),
        t.lines.join("\n")
    );
}
