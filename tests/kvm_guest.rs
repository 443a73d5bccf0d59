//! `rhyve run` end to end with the tiny test guest (guest/kvm-test): PCI enumeration, BAR
//! programming and moves, MSI-X through irqfd, NVMe with shadow doorbells as ioeventfds, the
//! lifecycle exit codes, and the command-line errors.
//!
//! The guest runs at CPL0 without SSE, so it also runs on hosts whose /dev/kvm has no VT-x (KVM's
//! instruction emulator). It reports on COM1 (stdout here); rhyve's own lines are on stderr.

mod common;

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use common::process::{kvm_usable, rhyve_run, vtx_flag};
use common::{image, root};

/// Longest a guest may take before the harness kills it (a hang guard, not a pass criterion).
const HANG_GUARD: Duration = Duration::from_secs(300);

/// KVM usable? Tests that need it print why they skip otherwise.
fn kvm() -> bool {
    let ok = kvm_usable();
    if !ok {
        println!("SKIPPED (no /dev/kvm): cannot open /dev/kvm read-write");
    }
    ok
}

/// The test guest ELF, built (and cached) by guest/kvm-test/build.sh.
fn guest() -> &'static Path {
    static G: OnceLock<PathBuf> = OnceLock::new();
    G.get_or_init(|| {
        let out = Command::new("bash")
            .arg(root().join("guest/kvm-test/build.sh"))
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        assert!(out.status.success(), "guest/kvm-test/build.sh failed");
        PathBuf::from(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .last()
                .expect("build.sh printed a path"),
        )
    })
}

fn scratch(name: &str) -> PathBuf {
    common::scratch_in(
        &PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kvm"),
        name,
    )
}

struct Run {
    code: i32,
    console: String,
    log: String,
}

impl Run {
    fn dump(&self) -> String {
        format!(
            "exit {}\n--- console ---\n{}\n--- rhyve ---\n{}",
            self.code, self.console, self.log
        )
    }

    /// The `rhyve: phase N:` line's exit total and the line itself.
    fn phase(&self, n: u32) -> (u64, String) {
        let p = format!("rhyve: phase {n}: ");
        let l = self
            .log
            .lines()
            .find(|l| l.starts_with(&p))
            .unwrap_or_else(|| panic!("no phase {n} line\n{}", self.dump()));
        let exits = l
            .split(" I/Os, ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap();
        (exits, l.to_string())
    }

    /// `key=value` from rhyve's `--stats` line for the device at `addr`.
    fn device_counter(&self, addr: &str, key: &str) -> u64 {
        let p = format!("rhyve: {addr} ");
        let l = self
            .log
            .lines()
            .find(|l| l.starts_with(&p))
            .unwrap_or_else(|| panic!("no stats for {addr}\n{}", self.dump()));
        let k = format!("{key}=");
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(&k))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {l}"))
    }
}

fn collect(child: Child) -> Run {
    let f = common::process::collect(child, HANG_GUARD);
    Run {
        code: f.status.code().unwrap_or(-1),
        console: f.stdout,
        log: f.stderr,
    }
}

fn run(args: &[&str]) -> Run {
    collect(rhyve_run().args(args).spawn().expect("spawn rhyve"))
}

/// The guest's data pattern (guest/kvm-test/lib.h `pattern`) of round `round` (0-based) of a `rounds=N` run.
fn pattern_round(dev: u32, lba: u64, off: u32, round: u32) -> u8 {
    let x = (lba as u32).wrapping_mul(2_654_435_761) ^ (dev << 24) ^ off.wrapping_mul(40503);
    (x ^ (x >> 11) ^ (x >> 19) ^ round.wrapping_mul(0x5b)) as u8
}

/// Assert `blocks` 512-byte sectors from `lba` of `img` hold the pattern of device `dev`.
fn assert_pattern(img: &Path, dev: u32, lba: u64, blocks: u64) {
    assert_pattern_round(img, dev, lba, blocks, 0);
}

/// [`assert_pattern`] for round `round` of a `rounds=N` run.
fn assert_pattern_round(img: &Path, dev: u32, lba: u64, blocks: u64, round: u32) {
    let mut f = std::fs::File::open(img).unwrap();
    f.seek(SeekFrom::Start(lba * 512)).unwrap();
    let mut buf = vec![0u8; (blocks * 512) as usize];
    f.read_exact(&mut buf).unwrap();
    for (i, b) in buf.iter().enumerate() {
        let (l, o) = (lba + i as u64 / 512, (i % 512) as u32);
        assert_eq!(
            *b,
            pattern_round(dev, l, o, round),
            "{}: byte {o} of LBA {l}",
            img.display()
        );
    }
}

/// NVMe regions the guest writes: phase 1 at LBA 2048, phase 2 at 2560, 256 sectors each.
fn assert_nvme_data(img: &Path) {
    assert_pattern(img, 1, 2048, 256);
    assert_pattern(img, 1, 2560, 256);
}

fn nvme_args<'a>(img: &'a str, kernel: &'a str, cmdline: &'a str) -> Vec<&'a str> {
    vec![
        "-m",
        "128M",
        "--testdev",
        "--stats",
        "-s",
        "0,hostbridge",
        "-s",
        img,
        "--kernel",
        kernel,
        "--cmdline",
        cmdline,
    ]
}

#[test]
fn kvm_nvme_shadow_doorbells_take_no_exits() {
    if !kvm() {
        return;
    }
    let dir = scratch("nvme-dbbuf");
    let img = image(&dir, "nvme.img", 64 << 20);
    let slot = format!("4,nvme,{}", img.display());
    let r = run(&nvme_args(&slot, guest().to_str().unwrap(), ""));
    assert_eq!(r.code, 0, "{}", r.dump());
    for want in [
        "NVME: shadow doorbells on",
        "NVME: phase 1: I/O commands 32 interrupts 32 mismatched bytes 0",
        "NVME: BAR0 moved to ",
        "NVME: phase 2: I/O commands 32 interrupts 32 mismatched bytes 0",
        "KVMTEST: PASS",
    ] {
        assert!(r.console.contains(want), "missing {want:?}\n{}", r.dump());
    }
    // Doorbells through ioeventfd: not one userspace exit while the I/O runs, before and after
    // the guest moved BAR0.
    for phase in [1, 2] {
        let (exits, line) = r.phase(phase);
        println!("{line}");
        assert_eq!(
            exits,
            0,
            "userspace exits during I/O phase {phase}\n{}",
            r.dump()
        );
    }
    assert_eq!(
        r.device_counter("0:4.0", "ioeventfd_kicks"),
        64,
        "{}",
        r.dump()
    );
    // Interrupts through irqfd/MSI-X: the guest counted one per command in its handler.
    assert!(
        r.device_counter("0:4.0", "irqfd_msi") >= 64 + 5,
        "{}",
        r.dump()
    );
    assert_eq!(r.device_counter("0:4.0", "signal_msi"), 0, "{}", r.dump());
    assert_eq!(r.device_counter("0:4.0", "write_commands"), 32);
    assert_eq!(r.device_counter("0:4.0", "bytes_written"), 32 * 8192);
    assert!(
        r.log
            .contains("rhyve: test guest exited with status 0 (pass)"),
        "{}",
        r.dump()
    );
    assert_nvme_data(&img);
}

#[test]
fn kvm_nvme_mmio_doorbells_exit_twice_per_io() {
    if !kvm() {
        return;
    }
    let dir = scratch("nvme-mmio");
    let img = image(&dir, "nvme.img", 64 << 20);
    let slot = format!("4,nvme,{}", img.display());
    let r = run(&nvme_args(&slot, guest().to_str().unwrap(), "nodbbuf"));
    assert_eq!(r.code, 0, "{}", r.dump());
    assert!(r.console.contains("KVMTEST: PASS"), "{}", r.dump());
    for phase in [1, 2] {
        let (exits, line) = r.phase(phase);
        println!("{line}");
        // One SQ tail and one CQ head doorbell per command, no other register access. Without
        // shadow doorbells the vCPU itself submits to io_uring, so a completion the kernel
        // finishes through that thread's task work can add an interrupted-run exit ("other"),
        // which costs no device work.
        assert!(line.contains("mmio_read=0 mmio_write=64"), "{line}");
        assert!(line.contains("[slot4.0 nvme bar0] r=0 w=64"), "{line}");
        assert!((64..=96).contains(&exits), "{}", r.dump());
    }
    assert_eq!(r.device_counter("0:4.0", "ioeventfd_kicks"), 0);
    assert_nvme_data(&img);
}

#[test]
fn kvm_ahci_dma_and_ncq() {
    if !kvm() {
        return;
    }
    let dir = scratch("ahci");
    let img = image(&dir, "sata.img", 64 << 20);
    let slot = format!("5,ahci,hd:{}", img.display());
    let r = run(&nvme_args(&slot, guest().to_str().unwrap(), ""));
    assert_eq!(r.code, 0, "{}", r.dump());
    for want in [
        "AHCI: model 'RHYVE SATA DISK",
        "AHCI: phase 3: DMA commands 16 interrupts 16 mismatched bytes 0",
        "AHCI: phase 4: FPDMA QUEUED commands 8 interrupts ",
        "AHCI: OK",
        "KVMTEST: PASS",
    ] {
        assert!(r.console.contains(want), "missing {want:?}\n{}", r.dump());
    }
    for phase in [3, 4] {
        let (exits, line) = r.phase(phase);
        println!("{line}");
        // Only the HBA's own registers: no stray exits elsewhere during the I/O.
        assert!(
            exits > 0
                && line.contains(&format!(
                    "[slot5.0 ahci bar5] r={} w={}",
                    line_reads(&line),
                    line_writes(&line)
                )),
            "{line}"
        );
    }
    // DMA phase: the PxCI doorbells went through ioeventfd; the only writes that exit are the
    // interrupt acknowledgements (PxIS, IS), two per command.
    let (_, line) = r.phase(3);
    assert_eq!(line_writes(&line), 2 * 16, "{line}");
    assert!(
        r.device_counter("0:5.0", "ioeventfd_kicks") >= 16 + 8,
        "{}",
        r.dump()
    );
    assert_eq!(r.device_counter("0:5.0", "signal_msi"), 0, "{}", r.dump());
    assert!(r.device_counter("0:5.0", "irqfd_msi") >= 17, "{}", r.dump());
    assert_eq!(r.device_counter("0:5.0", "errors"), 0, "{}", r.dump());
    // DMA EXT region, then the NCQ region.
    assert_pattern(&img, 2, 4096, 128);
    assert_pattern(&img, 2, 4096 + 256, 64);
}

fn line_reads(l: &str) -> u64 {
    l.split("mmio_read=")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap()
}

fn line_writes(l: &str) -> u64 {
    l.split("mmio_write=")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap()
}

/// `[NAME] r=R w=W` of rhyve's `--stats` exits line, and its `coalesced_pio=`.
fn bucket_and_coalesced(log: &str, name: &str) -> (u64, u64, u64) {
    let line = log
        .lines()
        .find(|l| l.starts_with("rhyve: exits:"))
        .expect("no exits line");
    let field = |s: &str, key: &str| -> u64 {
        s.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let after = line
        .split(&format!("[{name}]"))
        .nth(1)
        .unwrap_or("")
        .split('[')
        .next()
        .unwrap_or("");
    (
        field(after, "r="),
        field(after, "w="),
        field(line, "coalesced_pio="),
    )
}

#[test]
fn kvm_config_address_writes_take_no_exits() {
    if !kvm() {
        return;
    }
    let g = guest().to_str().unwrap();
    let r = run(&[
        "-m",
        "64M",
        "--stats",
        "-s",
        "4,nvme,ram=16",
        "--kernel",
        g,
        "--cmdline",
        "action=poweroff",
    ]);
    assert_eq!(r.code, 0, "{}", r.dump());
    let (reads, writes, coalesced) = bucket_and_coalesced(&r.log, "pci-config");
    // The guest enumerates bus 0 and sizes BARs through 0xCF8/0xCFC: every CONFIG_DATA access
    // follows a CONFIG_ADDRESS write, and those went to KVM's ring, not to an exit. What
    // still exits are the CONFIG_DATA accesses themselves.
    assert!(reads > 32, "config reads {reads}\n{}", r.dump());
    assert!(
        coalesced >= reads && writes < coalesced,
        "pci-config r={reads} w={writes} coalesced_pio={coalesced}\n{}",
        r.dump()
    );
}

#[test]
fn kvm_lifecycle_exit_codes() {
    if !kvm() {
        return;
    }
    let g = guest().to_str().unwrap();
    let cases: &[(&str, i32, &str)] = &[
        ("action=poweroff", 0, "rhyve: guest powered off"),
        (
            "action=reboot",
            3,
            "rhyve: guest requested a reset (reboot)",
        ),
        (
            "action=reset-acpi",
            3,
            "rhyve: guest requested a reset (reboot)",
        ),
        (
            "action=reset-cf9",
            3,
            "rhyve: guest requested a reset (reboot)",
        ),
        ("action=triplefault", 4, "rhyve: vCPU 0 triple-faulted"),
    ];
    for (arg, code, line) in cases {
        let r = run(&["-m", "64M", "--kernel", g, "--cmdline", arg]);
        assert_eq!(r.code, *code, "{arg}: {}", r.dump());
        assert!(r.log.contains(line), "{arg}: {}", r.dump());
    }
    // int3 is one of the instructions KVM's emulator cannot run: without VT-x it is a KVM
    // internal error; with VT-x the guest's own exception handler reports it (status 1).
    let r = run(&[
        "-m",
        "64M",
        "--testdev",
        "--kernel",
        g,
        "--cmdline",
        "action=badinsn",
    ]);
    if vtx_flag().is_some() {
        assert_eq!(r.code, 1, "{}", r.dump());
    } else {
        assert_eq!(r.code, 5, "{}", r.dump());
        assert!(
            r.log
                .contains("rhyve: KVM internal error on vCPU 0: suberror 1"),
            "{}",
            r.dump()
        );
    }
}

#[test]
fn kvm_sigint_flushes_and_exits() {
    if !kvm() {
        return;
    }
    let dir = scratch("sigint");
    let img = image(&dir, "nvme.img", 64 << 20);
    let slot = format!("4,nvme,{}", img.display());
    let mut child = rhyve_run()
        .args([
            "-m",
            "128M",
            "--testdev",
            "-s",
            &slot,
            "--kernel",
            guest().to_str().unwrap(),
            "--cmdline",
            "action=spin",
        ])
        .spawn()
        .unwrap();
    // Wait until the guest has done its I/O and is idling, then Ctrl-C.
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut console = String::new();
    let mut line = String::new();
    while out.read_line(&mut line).unwrap() > 0 {
        console.push_str(&line);
        if line.contains("KVMTEST: spinning") {
            break;
        }
        line.clear();
    }
    assert!(
        console.contains("KVMTEST: spinning"),
        "guest never got to spin:\n{console}"
    );
    let st = Command::new("kill")
        .arg("-INT")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(st.success());
    let drain = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let mut rest = collect(child);
    rest.console = console + &drain.join().unwrap();
    assert_eq!(rest.code, 130, "{}", rest.dump());
    assert!(
        rest.log
            .contains("rhyve: stopped by signal 2; disks flushed"),
        "{}",
        rest.dump()
    );
    assert_nvme_data(&img);
}

#[test]
fn kvm_api_socket_reports_devices_and_counters_and_shuts_down() {
    if !kvm() {
        return;
    }
    let dir = scratch("api");
    let img = image(&dir, "nvme.img", 64 << 20);
    let sock = dir.join("api.sock");
    let slot = format!("4,nvme,{}", img.display());
    let mut child = rhyve_run()
        .args([
            "-m",
            "128M",
            "-c",
            "2",
            "--testdev",
            "-s",
            &slot,
            "--api-socket",
            sock.to_str().unwrap(),
            "--kernel",
            guest().to_str().unwrap(),
            "--cmdline",
            "action=spin",
        ])
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut console = String::new();
    let mut line = String::new();
    while out.read_line(&mut line).unwrap() > 0 {
        console.push_str(&line);
        if line.contains("KVMTEST: spinning") {
            break;
        }
        line.clear();
    }
    assert!(console.contains("KVMTEST: spinning"), "{console}");
    let (code, info) = ctl(&sock, &["info"]);
    assert_eq!(code, 0, "{info}");
    assert!(
        info.contains("\"frontend\":\"kvm\"") && info.contains("\"vcpus\":2"),
        "{info}"
    );
    assert!(info.contains("\"emulation\":\"nvme\""), "{info}");
    let (code, stats) = ctl(&sock, &["stats"]);
    assert_eq!(code, 0);
    assert!(
        stats.contains("\"write_commands\":32"),
        "the guest's writes: {stats}"
    );
    // Per device: a latency histogram of every I/O command, and exits and interrupts per I/O
    // (the guest rings its doorbells through shadow buffers and ioeventfd: next to no exits).
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    let nvme = &v["devices"][0];
    assert_eq!(nvme["emulation"], "nvme", "{stats}");
    let lat: u64 = nvme["latency_us"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(lat, 64, "{stats}");
    assert_eq!(nvme["per_io"]["io_commands"], 64, "{stats}");
    let exits = nvme["per_io"]["exits"].as_f64().unwrap();
    let irqs = nvme["per_io"]["interrupts"].as_f64().unwrap();
    // (Setup exits included: the register reads of the reset and enable, 33 here.)
    assert!(exits < 1.0 && (1.0..1.5).contains(&irqs), "{stats}");
    // The spinning guest ignores the power button: stopped when the second is up.
    let (code, answer) = ctl(&sock, &["shutdown", "--json", "{\"timeout_s\": 1}"]);
    assert_eq!(code, 0, "{answer}");
    assert!(answer.contains("\"timeout_s\":1"), "{answer}");
    let drain = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let mut rest = collect(child);
    rest.console = console + &drain.join().unwrap();
    assert_eq!(rest.code, 0, "{}", rest.dump());
    assert!(
        rest.log.contains("stopped through the API socket"),
        "{}",
        rest.dump()
    );
    assert_nvme_data(&img);
}

#[test]
fn kvm_api_pause_stops_the_guest_and_resume_continues_it() {
    if !kvm() {
        return;
    }
    let dir = scratch("pause");
    let sock = dir.join("api.sock");
    let mut child = rhyve_run()
        .args([
            "-m",
            "128M",
            "-c",
            "2",
            "--testdev",
            "--api-socket",
            sock.to_str().unwrap(),
            "--kernel",
            guest().to_str().unwrap(),
            "--cmdline",
            "action=tick",
        ])
        .spawn()
        .unwrap();
    // Every console line, as it comes.
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let out = child.stdout.take().unwrap();
    let l2 = lines.clone();
    let reader = std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            l2.lock().unwrap().push(l);
        }
    });
    let ticks = || {
        lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("KVMTEST: tick"))
            .count()
    };
    let wait_for = |n: usize| {
        let t = std::time::Instant::now();
        while ticks() < n {
            assert!(t.elapsed() < std::time::Duration::from_secs(60), "no ticks");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    wait_for(3);
    let (code, out) = ctl(&sock, &["pause"]);
    assert_eq!(code, 0, "{out}");
    let at_pause = ticks();
    let (_, info) = ctl(&sock, &["info"]);
    assert!(info.contains("\"state\":\"paused\""), "{info}");
    let (code, out) = ctl(&sock, &["pause"]);
    assert_eq!(code, 1, "pausing twice is a conflict: {out}");
    // Paused for longer than several ticks: the guest prints nothing.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(ticks(), at_pause, "the guest ran while paused");
    let (code, out) = ctl(&sock, &["resume"]);
    assert_eq!(code, 0, "{out}");
    wait_for(at_pause + 2);
    let (code, _) = ctl(&sock, &["shutdown", "--json", "{\"timeout_s\": 0}"]);
    assert_eq!(code, 0);
    let status = child.wait().unwrap();
    reader.join().unwrap();
    assert_eq!(status.code(), Some(0));
}

/// One line on stderr, nothing on the console, exit code 2.
fn refused(args: &[&str], message: &str) {
    let r = run(args);
    assert_eq!(r.code, 2, "{args:?}: {}", r.dump());
    assert_eq!(r.log.trim_end(), message, "{args:?}");
    assert_eq!(r.console, "", "{args:?}: a guest ran");
}

#[test]
fn kvm_cli_refuses_bad_configurations() {
    let dir = scratch("cli");
    let img = image(&dir, "a.img", 1 << 20);
    let img = img.to_str().unwrap();
    let g = guest().to_str().unwrap();
    let nvme = format!("4,nvme,{img}");
    refused(
        &["--kernel", g, "-m", "1X"],
        "rhyve: bad memory size '1X': expected a number with an optional K, M, G or T suffix",
    );
    refused(
        &["--kernel", g, "-m", "8M"],
        "rhyve: memory size '8M' is too small: rhyve needs at least 16M",
    );
    refused(
        &["--kernel", g, "-c", "0"],
        "rhyve: bad vCPU count '0': must be from 1 to 254",
    );
    refused(
        &["--kernel", "/nonexistent/bzImage"],
        "rhyve: cannot open kernel '/nonexistent/bzImage': No such file or directory (os error 2)",
    );
    refused(
        &["--kernel", g, "--initrd", "/nonexistent/initrd"],
        "rhyve: cannot open initrd '/nonexistent/initrd': No such file or directory (os error 2)",
    );
    refused(
        &["--kernel", g, "-s", &nvme, "-s", &nvme],
        "rhyve: slot 0:4.0 is already taken",
    );
    refused(
        &["--kernel", g, "-s", "4,nvmx,a.img"],
        "rhyve: unknown device 'nvmx': valid devices are nvme, ahci, ahci-hd, ahci-cd, virtio-blk, virtio-block, hostbridge, amd_hostbridge",
    );
    refused(
        &["--kernel", g, "-s", "40,nvme,a.img"],
        "rhyve: bad slot '40': expected slot[:func] or bus:slot:func (slot 0-31, func 0-7)",
    );
    refused(
        &["--kernel", g, "-l", "com2,stdio"],
        "rhyve: unknown LPC device 'com2': rhyve has com1",
    );
    if kvm() {
        // Device options are checked by the device models, still before the guest runs.
        refused(
            &["--kernel", g, "-s", "4,nvme,/nonexistent.img"],
            "rhyve: nvme: cannot open /nonexistent.img: No such file or directory",
        );
        refused(
            &["--kernel", g, "-s", &format!("4,nvme,{img},maxq=0")],
            "rhyve: nvme: maxq=0 is invalid: must be from 1 to 64",
        );
        refused(&["--kernel", img, "-s", &nvme], &format!("rhyve: {img}: not a bzImage or ELF kernel (Kernel Loader: failed to load bzImage kernel image: Kernel Loader: Invalid bzImage)"));
    }
}

/// The PVH flavour of the test guest (built next to the 64-bit one): an ELF with the
/// `XEN_ELFNOTE_PHYS32_ENTRY` note and a 32-bit entry.
fn pvh_guest() -> PathBuf {
    guest().with_file_name("kvm-test-pvh.elf")
}

/// The e820 map rhyve gives `mem` bytes of RAM (crates/vmm/src/layout.rs `e820_map`), as the
/// guest prints it: (address, size, type).
fn expected_memmap(mem: u64) -> Vec<(u64, u64, u32)> {
    let low = mem.min(3 << 30);
    let mut m = vec![
        (0, 0x9fc00, 1),
        (0x9fc00, 0x400, 2),
        (0xe0000, 0x20000, 2),
        (0x10_0000, low - 0x10_0000, 1),
        (0xe000_0000, 0x1000_0000, 2),
    ];
    if mem > low {
        m.push((1 << 32, mem - low, 1));
    }
    m
}

#[test]
fn kvm_pvh_boot_passes_start_info() {
    if !kvm() {
        return;
    }
    let dir = scratch("pvh");
    let img = image(&dir, "nvme.img", 64 << 20);
    let initrd = dir.join("initrd.img");
    std::fs::write(&initrd, b"RHYVE-PVH-INITRD and some more bytes").unwrap();
    let slot = format!("4,nvme,{}", img.display());
    let cmdline = "pvhtest=hello-42 console=ttyS0";
    // Above 3 GiB so the memory map has RAM on both sides of the PCI hole.
    let mem: u64 = 5 << 30;
    let r = run(&[
        "-m",
        "5G",
        "--testdev",
        "-s",
        "0,hostbridge",
        "-s",
        &slot,
        "--kernel",
        pvh_guest().to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--cmdline",
        cmdline,
    ]);
    assert_eq!(r.code, 0, "{}", r.dump());
    // The guest entered at the 32-bit PVH entry (start.S checked EBX's start info, built its
    // own page tables and switched to long mode), then ran the usual device tests.
    let map = expected_memmap(mem);
    let ram: u64 = map.iter().filter(|e| e.2 == 1).map(|e| e.1).sum();
    let mut want = vec![
        "PVH: start_info at 0x7000".to_string(),
        "PVH: entry checks failed 0x0".into(),
        "PVH: magic 0x336ec578 version 1".into(),
        format!("PVH: cmdline '{cmdline}'"),
        format!("PVH: memmap entries {}", map.len()),
    ];
    want.extend(
        map.iter()
            .map(|(a, s, t)| format!("PVH: memmap {a:#x} {s:#x} {t}")),
    );
    want.extend([
        format!(
            "PVH: memmap ram bytes {ram} top {:#x}",
            (1u64 << 32) + mem - (3 << 30)
        ),
        "PVH: modules 1".into(),
        "PVH: module 0 size 36 head 'RHYVE-PVH-INITRD'".into(),
        "PVH: OK".into(),
        "NVME: phase 2: I/O commands 32 interrupts 32 mismatched bytes 0".into(),
        "KVMTEST: PASS".into(),
    ]);
    let lines: Vec<&str> = r.console.lines().map(|l| l.trim_end()).collect();
    for w in &want {
        assert!(lines.contains(&w.as_str()), "missing {w:?}\n{}", r.dump());
    }
    assert_eq!(ram, mem - (0x10_0000 - 0x9fc00));
    // rsdp_paddr is the RSDP rhyve's ACPI tables start from.
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("PVH: rsdp 0x") && l.ends_with(" 'RSD PTR '")),
        "{}",
        r.dump()
    );
    assert_nvme_data(&img);

    // The same ELF without PVH (the 64-bit flavour) still boots through boot_params.
    let r = run(&[
        "-m",
        "64M",
        "--kernel",
        guest().to_str().unwrap(),
        "--cmdline",
        "action=poweroff",
    ]);
    assert_eq!(r.code, 0, "{}", r.dump());
    assert!(!r.console.contains("PVH:"), "{}", r.dump());
}

#[test]
fn kvm_virtio_blk_notifies_through_ioeventfd_and_interrupts_through_irqfd() {
    if !kvm() {
        return;
    }
    let dir = scratch("virtio");
    let img = image(&dir, "vblk.img", 64 << 20);
    let slot = format!("6,virtio-blk,{},ser=KVM-VBLK,queues=2", img.display());
    let r = run(&nvme_args(&slot, guest().to_str().unwrap(), ""));
    assert_eq!(r.code, 0, "{}", r.dump());
    for want in [
        "VIRTIO: phase 5: queues 2 requests 32 interrupts 32 mismatched bytes 0",
        "VIRTIO: id 'KVM-VBLK'",
        "VIRTIO: OK",
        "KVMTEST: PASS",
    ] {
        assert!(r.console.contains(want), "missing {want:?}\n{}", r.dump());
    }
    // Notifications through ioeventfd, interrupts through irqfd: the I/O phase takes no
    // userspace exit at all.
    let (exits, line) = r.phase(5);
    println!("{line}");
    assert_eq!(
        exits,
        0,
        "userspace exits during the I/O phase\n{}",
        r.dump()
    );
    assert!(
        r.device_counter("0:6.0", "ioeventfd_kicks") >= 32,
        "{}",
        r.dump()
    );
    assert_eq!(r.device_counter("0:6.0", "signal_msi"), 0, "{}", r.dump());
    assert_eq!(r.device_counter("0:6.0", "bytes_written"), 16 * 8192);
    assert_pattern(&img, 3, 6144, 256);
}

/// A `rhyve run` whose console is read line by line as it comes.
struct Live {
    child: Option<Child>,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Live {
    fn spawn(args: &[&str]) -> Live {
        let mut child = rhyve_run().args(args).spawn().expect("spawn rhyve");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let out = child.stdout.take().unwrap();
        let l2 = lines.clone();
        let reader = std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                l2.lock().unwrap().push(l);
            }
        });
        Live {
            child: Some(child),
            lines,
            reader: Some(reader),
        }
    }

    /// Wait (at most `secs`) for a console line starting with `prefix`.
    fn wait_line(&self, prefix: &str, secs: u64) {
        let t = std::time::Instant::now();
        while !self
            .lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.starts_with(prefix))
        {
            assert!(
                t.elapsed() < Duration::from_secs(secs),
                "no {prefix:?} line within {secs} s:\n{}",
                self.lines.lock().unwrap().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait for the exit; (exit code, console, rhyve's stderr).
    fn finish(mut self) -> Run {
        let reader = self.reader.take().unwrap();
        let f = common::process::collect(self.child.take().unwrap(), HANG_GUARD);
        reader.join().unwrap();
        Run {
            code: f.status.code().unwrap_or(-1),
            console: self.lines.lock().unwrap().join("\n"),
            log: f.stderr,
        }
    }
}

impl Drop for Live {
    /// A failed test does not leave its VM running.
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `rhyve ctl --api-socket SOCK ARGS…`: (exit code, stdout).
fn ctl(sock: &Path, args: &[&str]) -> (i32, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_rhyve"))
        .args(["ctl", "--api-socket", sock.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

/// The NVMe and AHCI regions the guest writes, holding round `round`'s pattern.
fn assert_round_data(nvme: &Path, sata: &Path, round: u32) {
    assert_pattern_round(nvme, 1, 2048, 256, round);
    assert_pattern_round(nvme, 1, 2560, 256, round);
    assert_pattern_round(sata, 2, 4096, 128, round);
    assert_pattern_round(sata, 2, 4096 + 256, 64, round);
}

#[test]
fn kvm_snapshot_mid_run_restores_in_a_new_process() {
    if !kvm() {
        return;
    }
    let dir = scratch("snapshot");
    let nvme = image(&dir, "nvme.img", 64 << 20);
    let sata = image(&dir, "sata.img", 64 << 20);
    let sock = dir.join("api.sock");
    let snap = dir.join("snap");
    // The AHCI serial number is named: by default it follows the image path, and the restore
    // below uses other paths.
    let (nvme_s, sata_s) = (
        format!("4,nvme,{}", nvme.display()),
        format!("5,ahci,hd:{},ser=SNAPDISK", sata.display()),
    );
    let g = guest().to_str().unwrap();
    let src = Live::spawn(&[
        "-m",
        "128M",
        "--testdev",
        "-s",
        "0,hostbridge",
        "-s",
        &nvme_s,
        "-s",
        &sata_s,
        "--kernel",
        g,
        "--cmdline",
        "rounds=3",
        "--api-socket",
        sock.to_str().unwrap(),
    ]);
    // Into the second round: the guest is resetting, setting up or moving data.
    src.wait_line("KVMTEST: round 1 of 3", 240);
    let (code, out) = ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("\"status\":\"paused\""), "{out}");
    let (_, info) = ctl(&sock, &["info"]);
    assert!(info.contains("\"state\":\"paused\""), "{info}");
    let (code, _) = ctl(&sock, &["shutdown"]);
    assert_eq!(code, 0);
    let first = src.finish();
    assert_eq!(first.code, 0, "{}", first.dump());
    assert!(
        first.log.contains("rhyve: snapshot in "),
        "{}",
        first.dump()
    );
    assert!(!first.console.contains("KVMTEST: PASS"), "{}", first.dump());

    // The new process uses copies of the images (taken after the pause flushed them), named
    // on its command line.
    let (nvme2, sata2) = (dir.join("nvme2.img"), dir.join("sata2.img"));
    std::fs::copy(&nvme, &nvme2).unwrap();
    std::fs::copy(&sata, &sata2).unwrap();
    let before = std::fs::read(&nvme).unwrap();
    let r = run(&[
        "--restore",
        snap.to_str().unwrap(),
        "-s",
        "0,hostbridge",
        "-s",
        &format!("4,nvme,{}", nvme2.display()),
        "-s",
        &format!("5,ahci,hd:{},ser=SNAPDISK", sata2.display()),
    ]);
    assert_eq!(r.code, 0, "{}", r.dump());
    // It continued where the snapshot was taken: no boot, the remaining rounds, every
    // command's interrupt counted and every byte compared by the guest.
    assert!(!r.console.contains("KVMTEST: start"), "{}", r.dump());
    for want in ["KVMTEST: round 3 of 3", "KVMTEST: PASS"] {
        assert!(r.console.contains(want), "missing {want:?}\n{}", r.dump());
    }
    assert_round_data(&nvme2, &sata2, 2);
    assert_eq!(
        std::fs::read(&nvme).unwrap(),
        before,
        "the restored VM wrote to the images it was told not to use"
    );
}

#[test]
fn kvm_restore_refuses_damaged_or_mismatched_snapshots() {
    if !kvm() {
        return;
    }
    let dir = scratch("snapshot-bad");
    let img = image(&dir, "nvme.img", 16 << 20);
    let sock = dir.join("api.sock");
    let snap = dir.join("snap");
    let nvme_s = format!("4,nvme,{}", img.display());
    let src = Live::spawn(&[
        "-m",
        "64M",
        "-s",
        &nvme_s,
        "--kernel",
        guest().to_str().unwrap(),
        "--cmdline",
        "action=tick",
        "--api-socket",
        sock.to_str().unwrap(),
    ]);
    src.wait_line("KVMTEST: tick", 240);
    let (code, out) = ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    ctl(&sock, &["shutdown"]);
    assert_eq!(src.finish().code, 0);

    let bad = |args: &[&str], msg: &str| {
        let r = run(args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.dump());
        assert!(r.log.contains(msg), "{args:?}: want {msg:?}\n{}", r.dump());
        assert_eq!(r.console, "", "a guest ran");
    };
    let s = snap.to_str().unwrap();
    bad(
        &["--restore", "/nonexistent/snap"],
        "cannot read /nonexistent/snap/state.json",
    );
    bad(
        &["--restore", s, "-s", &format!("5,nvme,{}", img.display())],
        "the snapshot has PCI functions [0:0.0 hostbridge, 0:4.0 nvme], this VM [0:0.0 hostbridge, 0:5.0 nvme]",
    );
    let small = image(&dir, "small.img", 8 << 20);
    bad(
        &["--restore", s, "-s", &format!("4,nvme,{}", small.display())],
        "its image now has 8388608",
    );
    bad(
        &["--restore", s, "--kernel", guest().to_str().unwrap()],
        "cannot be used with",
    );
    // A damaged state file and another format version.
    let state = std::fs::read_to_string(snap.join("state.json")).unwrap();
    std::fs::write(snap.join("state.json"), &state[..state.len() / 2]).unwrap();
    bad(&["--restore", s], "not a snapshot state file");
    std::fs::write(
        snap.join("state.json"),
        state.replacen("\"version\":1", "\"version\":99", 1),
    )
    .unwrap();
    bad(
        &["--restore", s],
        "snapshot format version 99, this rhyve reads version 1",
    );
    // A truncated RAM file.
    std::fs::write(snap.join("state.json"), &state).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(snap.join("memory"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    bad(&["--restore", s], "1048576 bytes, the snapshot's RAM is");
}

/// The source VM of the migration tests: NVMe, AHCI and virtio-blk (`vblk.img` in `dir`),
/// three rounds, an API socket.
fn migration_source(dir: &Path, nvme: &Path, sata: &Path) -> Live {
    let sock = dir.join("api.sock");
    let vblk = image(dir, "vblk.img", 64 << 20);
    Live::spawn(&[
        "-m",
        "128M",
        "--testdev",
        "-s",
        "0,hostbridge",
        "-s",
        &format!("4,nvme,{}", nvme.display()),
        "-s",
        &format!("5,ahci,hd:{}", sata.display()),
        "-s",
        &format!("6,virtio-blk,{},queues=2", vblk.display()),
        "--kernel",
        guest().to_str().unwrap(),
        "--cmdline",
        "rounds=3",
        "--api-socket",
        sock.to_str().unwrap(),
    ])
}

/// The migration source's guest finished its three rounds (wherever it ran at the end), and
/// its three disks hold the last round's data.
fn assert_migration_source_finished(r: &Run, dir: &Path) {
    for want in [
        "KVMTEST: round 3 of 3",
        "KVMTEST: devices tested 3",
        "KVMTEST: PASS",
    ] {
        assert!(r.console.contains(want), "missing {want:?}\n{}", r.dump());
    }
    assert_round_data(&dir.join("nvme.img"), &dir.join("sata.img"), 2);
    assert_pattern_round(&dir.join("vblk.img"), 3, 6144, 256, 2);
}

#[test]
fn kvm_live_migration_moves_a_running_guest() {
    if !kvm() {
        return;
    }
    let dir = scratch("migrate");
    let nvme = image(&dir, "nvme.img", 64 << 20);
    let sata = image(&dir, "sata.img", 64 << 20);
    let url = format!("unix:{}", dir.join("migrate.sock").display());
    let dst = Live::spawn(&["--migrate-receive", &url]);
    let src = migration_source(&dir, &nvme, &sata);
    src.wait_line("KVMTEST: round 1 of 3", 240);
    // The destination listens by now (it started first and binds at once).
    let (code, out) = ctl(&dir.join("api.sock"), &["migrate-send", &url]);
    assert_eq!(code, 0, "{out}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let downtime = report["downtime_ms"].as_u64().expect("downtime reported");
    println!("migration: {out}");
    let first = src.finish();
    assert_eq!(first.code, 0, "{}", first.dump());
    assert!(
        first.log.contains(&format!(
            "the guest migrated: now running at {url}; downtime {downtime} ms"
        )),
        "{}",
        first.dump()
    );
    assert!(!first.console.contains("KVMTEST: PASS"), "{}", first.dump());
    let second = dst.finish();
    assert_eq!(second.code, 0, "{}", second.dump());
    assert!(
        !second.console.contains("KVMTEST: start"),
        "{}",
        second.dump()
    );
    assert_migration_source_finished(&second, &dir);
}

#[test]
fn kvm_refused_migration_leaves_the_guest_running_at_the_source() {
    if !kvm() {
        return;
    }
    let dir = scratch("migrate-refused");
    let nvme = image(&dir, "nvme.img", 64 << 20);
    let sata = image(&dir, "sata.img", 64 << 20);
    // Over TCP this time (the other test uses a UNIX socket); a port that was free a moment ago.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("tcp:127.0.0.1:{port}");
    // A destination that cannot take this VM: its NVMe sits in another slot.
    let other = format!("6,nvme,{}", nvme.display());
    let dst = Live::spawn(&[
        "--migrate-receive",
        &url,
        "-s",
        "0,hostbridge",
        "-s",
        &other,
    ]);
    let src = migration_source(&dir, &nvme, &sata);
    src.wait_line("KVMTEST: round 1 of 3", 240);
    let (code, out) = ctl(&dir.join("api.sock"), &["migrate-send", &url]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("the destination refused the VM"), "{out}");
    let second = dst.finish();
    assert_eq!(second.code, 2, "{}", second.dump());
    // The source carries on and finishes the job itself.
    let first = src.finish();
    assert_eq!(first.code, 0, "{}", first.dump());
    assert_migration_source_finished(&first, &dir);
}

#[test]
fn kvm_shutdown_presses_the_acpi_power_button() {
    if !kvm() {
        return;
    }
    let dir = scratch("powerbutton");
    let sock = dir.join("api.sock");
    let g = Live::spawn(&[
        "-m",
        "64M",
        "--kernel",
        guest().to_str().unwrap(),
        "--cmdline",
        "action=powerbutton",
        "--api-socket",
        sock.to_str().unwrap(),
    ]);
    g.wait_line("KVMTEST: waiting for the power button", 240);
    let (code, out) = ctl(&sock, &["shutdown"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("\"timeout_s\":10"), "{out}");
    let r = g.finish();
    // The guest took the Generic Event Device's interrupt and powered off by itself.
    assert_eq!(r.code, 0, "{}", r.dump());
    assert!(
        r.console
            .contains("KVMTEST: power button pressed, powering off"),
        "{}",
        r.dump()
    );
    assert!(r.log.contains("rhyve: guest powered off"), "{}", r.dump());
}
