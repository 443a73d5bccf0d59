//! The in-process benchmark: rhyve's NVMe and AHCI models driven through their registers by a
//! polling host, on a RAM disk and on a file in /dev/shm, interleaved with host fio (io_uring)
//! on the same file, same block size and depth.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use block::{BlockBackend, EngineKind, Ram, RawFile, RawFileOptions};
use serde::Serialize;

use crate::ahci_host::AhciHost;
use crate::nvme_host::NvmeHost;
use crate::workload::{process_cpu, Workload, WORKLOADS};

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Seconds per run.
    pub secs: f64,
    /// Repetitions of the whole matrix (interleaved).
    pub repeat: usize,
    /// Disk size in MiB.
    pub disk_mib: u64,
    /// Only these workloads (all when empty).
    pub only: Vec<String>,
    /// Only these targets: nvme, ahci, fio (all when empty).
    pub targets: Vec<String>,
    /// Only these backends: ram, file (all when empty).
    pub backends: Vec<String>,
    /// I/O engine.
    pub aio: EngineKind,
    /// Extra NVMe options (`,poll=50`).
    pub nvme_extra: String,
    /// Where the image file lives (/dev/shm by default).
    pub dir: PathBuf,
}

/// One measurement.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    /// `nvme`, `ahci` or `fio`.
    pub target: String,
    /// `ram` or `file`.
    pub backend: String,
    /// Workload name.
    pub workload: String,
    /// Repetition number.
    pub rep: usize,
    /// I/Os completed.
    pub ios: u64,
    /// I/Os per second.
    pub iops: f64,
    /// Process CPU per I/O in microseconds (host driver included; fio: fio's own).
    pub cpu_us_per_io: f64,
    /// Interrupt messages per I/O (rhyve only).
    pub irqs_per_io: Option<f64>,
}

fn fill(path: &Path, mib: u64) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).with_context(|| format!("{}", path.display()))?;
    let chunk: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    for _ in 0..mib {
        f.write_all(&chunk)?;
    }
    Ok(())
}

/// What one run measured.
struct Meas {
    ios: u64,
    wall: f64,
    cpu: f64,
    irqs: Option<u64>,
}

fn sample(target: &str, backend: &str, w: &Workload, rep: usize, m: Meas) -> Sample {
    let n = m.ios.max(1) as f64;
    Sample {
        target: target.into(),
        backend: backend.into(),
        workload: w.name.into(),
        rep,
        ios: m.ios,
        iops: m.ios as f64 / m.wall,
        cpu_us_per_io: m.cpu * 1e6 / n,
        irqs_per_io: m.irqs.map(|i| i as f64 / n),
    }
}

fn nvme_run(spec: &str, w: &Workload, secs: f64, rep: usize, backend: &str) -> Result<Sample> {
    let mut h = NvmeHost::new(spec)?;
    let irq0 = h.irq.msis.load(Ordering::Relaxed);
    let (t0, c0) = (Instant::now(), process_cpu());
    let ios = h.run(w, secs)?;
    let (wall, cpu) = (
        t0.elapsed().as_secs_f64(),
        (process_cpu() - c0).as_secs_f64(),
    );
    let irqs = h.irq.msis.load(Ordering::Relaxed) - irq0;
    h.shutdown();
    let irqs = Some(irqs);
    Ok(sample(
        "nvme",
        backend,
        w,
        rep,
        Meas {
            ios,
            wall,
            cpu,
            irqs,
        },
    ))
}

fn ahci_run(
    be: Arc<dyn BlockBackend>,
    aio: EngineKind,
    w: &Workload,
    secs: f64,
    rep: usize,
    backend: &str,
) -> Result<Sample> {
    let mut h = AhciHost::new(be, aio)?;
    let irq0 = h.irq.msis.load(Ordering::Relaxed);
    let (t0, c0) = (Instant::now(), process_cpu());
    let ios = h.run(w, secs)?;
    let (wall, cpu) = (
        t0.elapsed().as_secs_f64(),
        (process_cpu() - c0).as_secs_f64(),
    );
    let irqs = h.irq.msis.load(Ordering::Relaxed) - irq0;
    h.shutdown();
    let irqs = Some(irqs);
    Ok(sample(
        "ahci",
        backend,
        w,
        rep,
        Meas {
            ios,
            wall,
            cpu,
            irqs,
        },
    ))
}

/// Run the matrix; every sample is returned, in the order taken.
pub fn run(o: &Options) -> Result<Vec<Sample>> {
    crate::ensure_packages(&["fio", "fonts-dejavu-core"])?;
    let dir = o.dir.clone();
    let file = dir.join(format!("rhyve-bench-{}.img", std::process::id()));
    fill(&file, o.disk_mib)?;
    let _cleanup = Remove(file.clone());
    let size = o.disk_mib << 20;
    let spec_file = format!("4,nvme,{},aio={}{}", file.display(), o.aio, o.nvme_extra);
    let spec_ram = format!("4,nvme,ram={},aio={}{}", o.disk_mib, o.aio, o.nvme_extra);
    let workloads: Vec<&Workload> = WORKLOADS
        .iter()
        .filter(|w| o.only.is_empty() || o.only.iter().any(|n| n == w.name))
        .collect();
    let mut out = Vec::new();
    for rep in 0..o.repeat {
        for w in &workloads {
            // Interleaved: every configuration of this workload, then the next workload.
            let want = |t: &str, b: &str| {
                (o.targets.is_empty() || o.targets.iter().any(|x| x == t))
                    && (o.backends.is_empty() || o.backends.iter().any(|x| x == b))
            };
            let mut keep = |s: Sample| {
                eprintln!("{}", line(&s));
                out.push(s);
            };
            if want("nvme", "ram") {
                keep(nvme_run(&spec_ram, w, o.secs, rep, "ram")?);
            }
            if want("nvme", "file") {
                keep(nvme_run(&spec_file, w, o.secs, rep, "file")?);
            }
            if want("ahci", "ram") {
                let ram: Arc<dyn BlockBackend> = Arc::new(Ram::new(size, 512)?);
                keep(ahci_run(ram, o.aio, w, o.secs, rep, "ram")?);
            }
            if want("ahci", "file") {
                let f: Arc<dyn BlockBackend> =
                    Arc::new(RawFile::open(&file, &RawFileOptions::default())?);
                keep(ahci_run(f, o.aio, w, o.secs, rep, "file")?);
            }
            if !want("fio", "file") {
                continue;
            }
            let r = crate::fio::run(&file, w, o.secs, size)?;
            let m = Meas {
                ios: r.ios,
                wall: r.ios as f64 / r.iops.max(1.0),
                cpu: r.cpu,
                irqs: None,
            };
            let s = sample("fio", "file", w, rep, m);
            keep(Sample { iops: r.iops, ..s });
        }
    }
    Ok(out)
}

fn line(s: &Sample) -> String {
    format!(
        "  {:5} {:4} {:18} rep {}: {:9.0} IOPS  {:6.2} µs CPU/IO{}",
        s.target,
        s.backend,
        s.workload,
        s.rep,
        s.iops,
        s.cpu_us_per_io,
        s.irqs_per_io
            .map(|x| format!("  {x:.3} irq/IO"))
            .unwrap_or_default()
    )
}

struct Remove(PathBuf);

impl Drop for Remove {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
