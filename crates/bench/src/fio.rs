//! Host fio, the reference: the same job, file, block size and depth, with io_uring.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::workload::Workload;

/// What fio measured.
#[derive(Clone, Copy, Debug)]
pub struct FioResult {
    /// I/Os completed.
    pub ios: u64,
    /// I/Os per second.
    pub iops: f64,
    /// CPU seconds of the fio process, io_uring workers included (user + system).
    pub cpu: f64,
}

/// Run `w` against `file` for `secs` seconds.
pub fn run(file: &Path, w: &Workload, secs: f64, size: u64) -> Result<FioResult> {
    let c0 = crate::workload::children_cpu();
    let out = Command::new("fio")
        .args([
            "--name=bench",
            &format!("--filename={}", file.display()),
            "--ioengine=io_uring",
            "--direct=0",
            "--invalidate=0",
            &format!("--rw={}", w.fio_rw),
            &format!("--bs={}", w.bs),
            &format!("--iodepth={}", w.qd),
            &format!("--size={size}"),
            "--time_based",
            &format!("--runtime={}ms", (secs * 1000.0) as u64),
            "--output-format=json",
        ])
        .output()
        .context("cannot run fio (apt-get install fio)")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print notes before the JSON object.
    let start = text.find('{').context("fio printed no JSON")?;
    let v: serde_json::Value = serde_json::from_str(&text[start..]).context("fio JSON")?;
    let job = &v["jobs"][0];
    let num = |x: &serde_json::Value| x.as_f64().unwrap_or(0.0);
    let ios = num(&job["read"]["total_ios"]) + num(&job["write"]["total_ios"]);
    let iops = num(&job["read"]["iops"]) + num(&job["write"]["iops"]);
    // fio's own figure leaves out io_uring's worker threads; the process's rusage does not.
    let cpu = (crate::workload::children_cpu() - c0).as_secs_f64();
    if ios == 0.0 {
        bail!("fio did no I/O");
    }
    Ok(FioResult {
        ios: ios as u64,
        iops,
        cpu,
    })
}
