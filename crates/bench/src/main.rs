//! `rhyve-bench`: rhyve's benchmarks. Figures, not tests: nothing here asserts a speed.
//!
//! * `rhyve-bench inproc`: the NVMe and AHCI models driven in-process by a polling host over
//!   their registers, on a RAM disk and on a file in /dev/shm, interleaved with host fio
//!   (io_uring) on the same file; prints and writes rhyve/fio ratios of IOPS and CPU per I/O.
//! * `rhyve-bench uml`: real Linux (User-Mode Linux) running fio against rhyve NVMe, rhyve
//!   AHCI and qemu-storage-daemon's vhost-user-blk on the same file.
//!
//! Both write `<out>/<kind>.json` and `<out>/<kind>.png`.

mod ahci_host;
mod fio;
mod inproc;
mod nvme_host;
mod report;
mod uml;
mod workload;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use serde::Serialize;

#[derive(Parser)]
#[command(about = "rhyve's benchmarks (figures, not tests)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// In-process NVMe and AHCI against host fio.
    Inproc {
        /// Seconds per run.
        #[arg(long, default_value_t = 2.0)]
        secs: f64,
        /// Repetitions of the whole interleaved matrix.
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// Disk size in MiB.
        #[arg(long, default_value_t = 512)]
        disk_mib: u64,
        /// Only this workload (repeatable), e.g. randread-4k-qd32.
        #[arg(long)]
        only: Vec<String>,
        /// Only this target (repeatable): nvme, ahci, fio.
        #[arg(long)]
        target: Vec<String>,
        /// Only this backend (repeatable): ram, file.
        #[arg(long)]
        backend: Vec<String>,
        /// I/O engine of the models.
        #[arg(long, default_value = "io_uring")]
        aio: String,
        /// Extra NVMe options appended to the `-s` spec, e.g. `,poll=50`.
        #[arg(long, default_value = "")]
        nvme_opts: String,
        /// Directory for the image file (a tmpfs by default, as the reference runs use).
        #[arg(long, default_value = "/dev/shm")]
        dir: PathBuf,
        /// A quick run that only proves the benchmark works (CI).
        #[arg(long)]
        smoke: bool,
        /// Output directory.
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
    /// Real Linux in UML: fio against rhyve NVMe, rhyve AHCI and qemu-storage-daemon.
    Uml(uml::Args),
}

#[derive(Serialize)]
struct Doc<'a, S: Serialize> {
    kind: &'a str,
    date: String,
    host: serde_json::Value,
    params: serde_json::Value,
    summary: Vec<report::Row>,
    samples: &'a [S],
}

/// What machine the figures come from.
pub fn host_info() -> serde_json::Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let model = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|s| s.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    serde_json::json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "cpu_model": model,
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
    })
}

fn now() -> String {
    std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%dT%H:%M:%SZ")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Install missing Debian packages through the project's helper (when run from a checkout).
pub fn ensure_packages(pkgs: &[&str]) -> Result<()> {
    if !std::path::Path::new("guest/common.sh").exists() {
        return Ok(());
    }
    let status = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source guest/common.sh && rhyve_ensure_pkgs rhyve-bench {}",
            pkgs.join(" ")
        ))
        .status()?;
    anyhow::ensure!(status.success(), "installing {pkgs:?} failed");
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Inproc {
            secs,
            repeat,
            disk_mib,
            only,
            target,
            backend,
            aio,
            nvme_opts,
            dir,
            smoke,
            out,
        } => {
            let mut o = inproc::Options {
                secs,
                repeat,
                disk_mib,
                only,
                targets: target,
                backends: backend,
                aio: aio.parse().map_err(anyhow::Error::msg)?,
                nvme_extra: nvme_opts,
                dir,
            };
            if smoke {
                o.secs = 0.2;
                o.repeat = 1;
                o.disk_mib = 64;
                if o.only.is_empty() {
                    o.only = vec!["randread-4k-qd32".into(), "read-128k-qd1".into()];
                }
            }
            std::fs::create_dir_all(&out)?;
            eprintln!(
                "in-process benchmark: {} s per run, {} repetitions, interleaved",
                o.secs, o.repeat
            );
            let samples = inproc::run(&o)?;
            let values: Vec<serde_json::Value> = samples
                .iter()
                .map(|s| serde_json::to_value(s).unwrap())
                .collect();
            let rows = report::summarize(&values, "fio");
            report::print(&rows, &["iops", "cpu_us_per_io", "irqs_per_io"]);
            let doc = Doc {
                kind: "inproc",
                date: now(),
                host: host_info(),
                params: serde_json::json!({"secs": o.secs, "repeat": o.repeat, "disk_mib": o.disk_mib, "aio": o.aio.to_string()}),
                summary: rows.clone(),
                samples: &samples,
            };
            report::write_json(&out.join("inproc.json"), &doc)?;
            if let Err(e) = report::chart(
                &out.join("inproc.png"),
                "rhyve in-process vs host fio (io_uring)",
                &rows,
                &[
                    ("iops", "IOPS ratio"),
                    ("cpu_us_per_io", "CPU per I/O ratio"),
                ],
            ) {
                eprintln!("rhyve-bench: no chart: {e:#}");
            }
            println!("wrote {}", out.join("inproc.json").display());
        }
        Cmd::Uml(args) => uml::main(args)?,
    }
    Ok(())
}
