//! The UML benchmark: real Linux (User-Mode Linux, the project's test kernel) runs the same
//! fio jobs against rhyve's NVMe, rhyve's AHCI and qemu-storage-daemon's vhost-user-blk, one
//! boot per run, interleaved and repeated, all on the same image file.
//!
//! Per run it records fio's IOPS and I/O count (inside the guest), the guest's interrupt counts
//! for the device (from /proc/interrupts), the MMIO accesses rhyve served (its `--stats`), and
//! the device process's CPU time over the fio job (from /proc/PID/stat, sampled when the guest
//! marks the job's start and end).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::report;
use crate::workload::{Workload, WORKLOADS};

/// Arguments of `rhyve-bench uml`.
#[derive(clap::Args)]
pub struct Args {
    /// fio runtime per run, seconds.
    #[arg(long, default_value_t = 5)]
    secs: u64,
    /// Repetitions of the interleaved matrix.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Image size in MiB.
    #[arg(long, default_value_t = 512)]
    disk_mib: u64,
    /// Directory for the image file.
    #[arg(long, default_value = "/dev/shm")]
    dir: PathBuf,
    /// Only this workload (repeatable).
    #[arg(long)]
    only: Vec<String>,
    /// Targets to run (repeatable): nvme, ahci, virtio, qsd.
    #[arg(long)]
    target: Vec<String>,
    /// Extra options for rhyve's NVMe `-s` spec, e.g. `,poll=100`.
    #[arg(long, default_value = "")]
    nvme_opts: String,
    /// Extra fio options for every job (guest side), e.g. `--iodepth_batch_submit=8`.
    #[arg(long, default_value = "")]
    fio_opts: String,
    /// A shell command the guest runs before fio (e.g. an nvme-cli set-feature).
    #[arg(long, default_value = "")]
    guest_setup: String,
    /// A quick run that proves the benchmark works (CI).
    #[arg(long)]
    smoke: bool,
    /// Output directory.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// The rhyve binary to run (default: build and use target/release/rhyve).
    #[arg(long)]
    rhyve: Option<PathBuf>,
}

/// One run.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    target: String,
    backend: String,
    workload: String,
    rep: usize,
    ios: u64,
    iops: f64,
    /// Device interrupts the guest took per I/O (MSI/MSI-X lines; the virtqueue line for
    /// vhost-user-blk).
    irqs_per_io: f64,
    /// Transport notifications per I/O: UML's SIGIO interrupts for the device's vhost-user
    /// channel (what each interrupt or posted write costs the guest on top).
    notifications_per_io: f64,
    /// MMIO reads + writes per I/O (rhyve only; a VM exit each under hardware virtualization).
    mmio_per_io: Option<f64>,
    /// MMIO writes per I/O (rhyve only).
    mmio_writes_per_io: Option<f64>,
    /// Device process CPU per I/O, microseconds.
    device_cpu_us_per_io: f64,
}

fn sh(cmd: &str) -> Result<String> {
    let out = Command::new("bash")
        .arg("-c")
        .arg(cmd)
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("`{cmd}` failed");
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// CPU ticks (user + system, 10 ms) of process `pid` so far.
fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
}

fn wait_for(path: &Path, timeout: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

struct Target {
    name: &'static str,
    dev: &'static str,
    irq_pattern: &'static str,
}

const TARGETS: [Target; 4] = [
    Target {
        name: "nvme",
        dev: "/dev/nvme0n1",
        irq_pattern: "nvme0q",
    },
    Target {
        name: "ahci",
        dev: "/dev/sda",
        irq_pattern: "ahci",
    },
    Target {
        name: "virtio",
        dev: "/dev/vda",
        irq_pattern: "-req.",
    },
    Target {
        name: "qsd",
        dev: "/dev/vda",
        irq_pattern: "-req.",
    },
];

/// Sum of /proc/interrupts counts on lines containing `pat` (the admin queue nvme0q0 excluded).
fn irq_sum(text: &str, pat: &str) -> u64 {
    text.lines()
        .filter(|l| l.contains(pat) && !l.contains("nvme0q0"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// UML's own SIGIO lines for vhost-user devices (the transport's notifications).
fn sigio_sum(text: &str, device_index: usize) -> u64 {
    let tag = format!("virtio-uml.{device_index}-");
    text.lines()
        .filter(|l| l.contains("SIGIO") && l.contains(&tag))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

struct Env {
    kernel: String,
    initrd: PathBuf,
    rhyve: PathBuf,
    image: PathBuf,
    work: PathBuf,
}

fn start_device(env: &Env, t: &Target, run: &Path, a: &Args) -> Result<(Child, String)> {
    match t.name {
        "qsd" => {
            let sock = run.join("qsd.sock");
            let child = Command::new("qemu-storage-daemon")
                .args([
                    "--blockdev",
                    &format!(
                        "driver=file,node-name=f0,filename={},aio=io_uring",
                        env.image.display()
                    ),
                    "--export",
                    &format!(
                        "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on,num-queues=1",
                        sock.display()
                    ),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .context("qemu-storage-daemon (apt-get install qemu-utils)")?;
            if !wait_for(&sock, Duration::from_secs(10)) {
                bail!("qemu-storage-daemon did not create {}", sock.display());
            }
            Ok((
                child,
                format!("--append=virtio_uml.device={}:2", sock.display()),
            ))
        }
        name => {
            let spec = match name {
                "nvme" => format!("4,nvme,{}{}", env.image.display(), a.nvme_opts),
                "virtio" => format!("6,virtio-blk,{}", env.image.display()),
                _ => format!("5,ahci-hd,{}", env.image.display()),
            };
            let child = Command::new(&env.rhyve)
                .args(["uml", "--stats", "--socket-dir"])
                .arg(run.join("s"))
                .args(["-s", &spec])
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(run.join("rhyve.stats"))?)
                .spawn()?;
            let mut child = child;
            let stdout = child.stdout.take().context("rhyve stdout")?;
            let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
            let args = loop {
                match lines.next() {
                    Some(Ok(l)) if l.starts_with("virtio_uml.device=") => break l,
                    Some(Ok(_)) => continue,
                    _ => bail!("rhyve uml did not get ready"),
                }
            };
            // Keep reading rhyve's stdout so it never writes into a closed pipe.
            std::thread::spawn(move || lines.for_each(drop));
            let sock = args
                .strip_prefix("virtio_uml.device=")
                .and_then(|s| s.rsplit_once(':'))
                .map(|(s, _)| s.to_string())
                .context("socket path")?;
            Ok((child, format!("--device={sock}")))
        }
    }
}

/// How the guest names host path `p`: the guest's /tmp is its own, and the host's /tmp is at
/// `$RHYVE_HOST_TMP` (guest/README.md); everything else is the same path.
fn guest_path(p: &Path) -> String {
    match p.strip_prefix("/tmp") {
        Ok(rest) => format!("\"$RHYVE_HOST_TMP/{}\"", rest.display()),
        Err(_) => format!("\"{}\"", p.display()),
    }
}

fn run_one(env: &Env, a: &Args, t: &Target, w: &Workload, rep: usize) -> Result<Sample> {
    let run = env.work.join(format!("{}-{}-{rep}", t.name, w.name));
    let _ = std::fs::remove_dir_all(&run);
    std::fs::create_dir_all(&run)?;
    let out = run.join("out");
    std::fs::create_dir_all(&out)?;
    let script = run.join("guest.sh");
    let size = (a.disk_mib << 20).min(256 << 20);
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nset -e\nO={o}\n{setup}\ncat /proc/interrupts > $O/irq0\ntouch $O/start\n\
             fio --name=b --filename={dev} --ioengine=libaio --direct=1 --rw={rw} --bs={bs} \
             --iodepth={qd} --size={size} --time_based --runtime={secs} {extra} \
             --output-format=json --output=$O/fio.json\n\
             touch $O/end\ncat /proc/interrupts > $O/irq1\n",
            o = guest_path(&out),
            dev = t.dev,
            rw = w.fio_rw,
            bs = w.bs,
            qd = w.qd,
            secs = a.secs,
            extra = a.fio_opts,
            setup = if t.name == "nvme" {
                a.guest_setup.as_str()
            } else {
                ""
            },
        ),
    )?;
    sh(&format!("chmod +x {}", script.display()))?;
    let (mut dev, attach) = start_device(env, t, &run, a)?;
    let pid = dev.id();
    let guest = Command::new("bash")
        .args(["guest/run-uml.sh", "--kernel", &env.kernel, "--initrd"])
        .arg(&env.initrd)
        .arg("--script")
        .arg(&script)
        .args(["--timeout", &(a.secs + 120).to_string()])
        .arg(attach.split_once('=').map_or("", |x| x.0))
        .arg(attach.split_once('=').map_or("", |x| x.1))
        .stdout(std::fs::File::create(run.join("console"))?)
        .stderr(std::fs::File::create(run.join("run-uml.log"))?)
        .spawn()?;
    let mut guest = guest;
    let started = wait_for(&out.join("start"), Duration::from_secs(120));
    let c0 = cpu_ticks(pid);
    let ended = started && wait_for(&out.join("end"), Duration::from_secs(a.secs + 120));
    let c1 = cpu_ticks(pid);
    let status = guest.wait()?;
    if t.name == "qsd" {
        let _ = Command::new("kill").arg(pid.to_string()).status();
    }
    let _ = dev.wait();
    if !(started && ended && status.success()) {
        let tail = |f: &str| {
            let t = std::fs::read_to_string(run.join(f)).unwrap_or_default();
            let lines: Vec<&str> = t.lines().collect();
            lines[lines.len().saturating_sub(15)..].join("\n")
        };
        bail!(
            "{} {} run failed (guest status {status})\n--- run-uml ---\n{}\n--- console ---\n{}",
            t.name,
            w.name,
            tail("run-uml.log"),
            tail("console")
        );
    }
    let fio: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("fio.json"))?)?;
    let job = &fio["jobs"][0];
    let num = |x: &serde_json::Value| x.as_f64().unwrap_or(0.0);
    let ios = (num(&job["read"]["total_ios"]) + num(&job["write"]["total_ios"])).max(1.0);
    let iops = num(&job["read"]["iops"]) + num(&job["write"]["iops"]);
    let (i0, i1) = (
        std::fs::read_to_string(out.join("irq0"))?,
        std::fs::read_to_string(out.join("irq1"))?,
    );
    let irqs = irq_sum(&i1, t.irq_pattern).saturating_sub(irq_sum(&i0, t.irq_pattern));
    let notes = sigio_sum(&i1, 0).saturating_sub(sigio_sum(&i0, 0));
    let (mut mmio, mut mmio_w) = (None, None);
    if t.name != "qsd" {
        let stats = std::fs::read_to_string(run.join("rhyve.stats"))?;
        let line = stats
            .lines()
            .rev()
            .find(|l| l.contains("uml_mmio_writes="))
            .unwrap_or("");
        let get = |k: &str| {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        mmio = Some((get("uml_mmio_reads") + get("uml_mmio_writes")) / ios);
        mmio_w = Some(get("uml_mmio_writes") / ios);
    }
    let cpu = (c1 - c0) as f64 * 0.01;
    let _ = std::fs::remove_dir_all(&run);
    Ok(Sample {
        target: t.name.into(),
        backend: if t.name == "nvme" && !a.nvme_opts.is_empty() {
            a.nvme_opts.trim_start_matches(',').into()
        } else {
            "file".into()
        },
        workload: w.name.into(),
        rep,
        ios: ios as u64,
        iops,
        irqs_per_io: irqs as f64 / ios,
        notifications_per_io: notes as f64 / ios,
        mmio_per_io: mmio,
        mmio_writes_per_io: mmio_w,
        device_cpu_us_per_io: cpu * 1e6 / ios,
    })
}

/// Run it.
pub fn main(mut a: Args) -> Result<()> {
    if a.smoke {
        a.secs = 1;
        a.repeat = 1;
        a.disk_mib = 64;
        if a.only.is_empty() {
            a.only = vec!["randread-4k-qd32".into()];
        }
    }
    let targets: Vec<&Target> = TARGETS
        .iter()
        .filter(|t| a.target.is_empty() || a.target.iter().any(|n| n == t.name))
        .collect();
    let workloads: Vec<&Workload> = WORKLOADS
        .iter()
        .filter(|w| a.only.is_empty() || a.only.iter().any(|n| n == w.name))
        .collect();
    std::fs::create_dir_all(&a.out)?;
    // The guest writes its results here through hostfs (see `guest_path`).
    let work = std::env::current_dir()?
        .join("target")
        .join(format!("rhyve-umlbench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let kernel = sh("bash guest/build-uml.sh | tail -n 1")?;
    let initrd = work.join("initrd.gz");
    sh(&format!(
        "bash guest/mkinitramfs.sh {} >/dev/null",
        initrd.display()
    ))?;
    // qemu-storage-daemon is in qemu-utils on Debian 12; fio comes with the guest tools.
    crate::ensure_packages(&["qemu-utils", "fio", "fonts-dejavu-core"])?;
    let rhyve = match &a.rhyve {
        Some(p) => p.clone(),
        None => {
            sh("cargo build --release --quiet --bin rhyve")?;
            PathBuf::from("target/release/rhyve")
        }
    };
    let image = a
        .dir
        .join(format!("rhyve-umlbench-{}.img", std::process::id()));
    sh(&format!(
        "dd if=/dev/urandom of={} bs=1M count={} status=none",
        image.display(),
        a.disk_mib
    ))?;
    let env = Env {
        kernel,
        initrd,
        rhyve,
        image: image.clone(),
        work: work.clone(),
    };
    eprintln!(
        "UML benchmark: fio {} s per run, {} repetitions, interleaved; image {}",
        a.secs,
        a.repeat,
        image.display()
    );
    let mut samples = Vec::new();
    let result = (|| -> Result<()> {
        for rep in 0..a.repeat {
            for w in &workloads {
                for t in &targets {
                    let s = run_one(&env, &a, t, w, rep)?;
                    eprintln!(
                        "  {:5} {:18} rep {}: {:8.0} IOPS  {:.3} irq/IO  {:.3} notif/IO  {} MMIO/IO  {:.1} µs device CPU/IO",
                        s.target,
                        s.workload,
                        rep,
                        s.iops,
                        s.irqs_per_io,
                        s.notifications_per_io,
                        s.mmio_per_io.map_or("n/a".into(), |m| format!("{m:.3}")),
                        s.device_cpu_us_per_io
                    );
                    samples.push(s);
                }
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(&image);
    let _ = std::fs::remove_dir_all(&work);
    result?;
    let values: Vec<serde_json::Value> = samples
        .iter()
        .map(|s| serde_json::to_value(s).expect("serializable"))
        .collect();
    let rows = report::summarize(&values, "qsd");
    report::print(
        &rows,
        &[
            "iops",
            "irqs_per_io",
            "mmio_writes_per_io",
            "device_cpu_us_per_io",
        ],
    );
    let doc = crate::Doc {
        kind: "uml",
        date: crate::now(),
        host: crate::host_info(),
        params: serde_json::json!({"secs": a.secs, "repeat": a.repeat, "disk_mib": a.disk_mib, "dir": a.dir, "nvme_opts": a.nvme_opts, "fio_opts": a.fio_opts}),
        summary: rows.clone(),
        samples: &samples,
    };
    report::write_json(&a.out.join("uml.json"), &doc)?;
    if let Err(e) = report::chart(
        &a.out.join("uml.png"),
        "real Linux in UML vs qemu-storage-daemon vhost-user-blk",
        &rows,
        &[
            ("iops", "IOPS ratio"),
            ("device_cpu_us_per_io", "device CPU per I/O ratio"),
        ],
    ) {
        eprintln!("rhyve-bench: no chart: {e:#}");
    }
    println!("wrote {}", a.out.join("uml.json").display());
    Ok(())
}
