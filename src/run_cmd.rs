//! `rhyve run`: a KVM virtual machine with rhyve's PCI devices, booted directly into a kernel.
//!
//! Everything the command line says is checked before any guest code runs; each problem is one
//! line and exit code 2. Once the guest runs, rhyve ends with one line saying why and an exit code
//! per reason (see `vmm::VmExit::code`): 0 poweroff/test pass, 1 test failure, 3 reset,
//! 4 triple fault, 5 KVM internal error, 6 VMM failure, 130/143 SIGINT/SIGTERM (disks flushed).

use std::collections::HashSet;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use pci::{ConfigError, SlotSpec};
use vmm::serial::ConsoleSink;
use vmm::{Vm, VmConfig, VmExit};

/// Arguments of `rhyve run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Guest RAM: a number with K/M/G/T suffix; a bare number is MiB (as in bhyve).
    #[arg(short = 'm', long = "memory", default_value = "256M")]
    memory: String,
    /// Number of vCPUs.
    #[arg(short = 'c', long = "cpus", default_value = "1")]
    cpus: String,
    /// A PCI device, bhyve syntax: `slot[:func],emul[,conf]`, e.g. `4,nvme,disk.img`.
    #[arg(short = 's', long = "slot")]
    slots: Vec<String>,
    /// An LPC device: `com1,stdio`, `com1,off` or `com1,FILE` (output to FILE). Default com1,stdio.
    #[arg(short = 'l', long = "lpc")]
    lpc: Vec<String>,
    /// Kernel to boot directly: bzImage or ELF (vmlinux or a test guest).
    #[arg(long, required_unless_present_any = ["restore", "migrate_receive"])]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, conflicts_with = "restore")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "", conflicts_with = "restore")]
    cmdline: String,
    /// Continue a snapshot (`rhyve ctl snapshot DIR`) instead of booting a kernel. Memory,
    /// vCPUs and devices come from the snapshot; `-s` arguments, if given, replace the saved
    /// ones (same slots and models, e.g. other image paths).
    #[arg(long, conflicts_with_all = ["kernel", "memory", "cpus", "testdev"])]
    restore: Option<PathBuf>,
    /// Wait on `unix:PATH` or `tcp:HOST:PORT` for a VM migrating from another rhyve
    /// (`rhyve ctl migrate-send URL`), then run it. `-s` as for `--restore`.
    #[arg(long, conflicts_with_all = ["kernel", "memory", "cpus", "testdev", "restore"])]
    migrate_receive: Option<String>,
    /// Print exit and device counters when the VM ends.
    #[arg(long)]
    stats: bool,
    /// Enable rhyve's test device (ports 0xF0-0xFF) used by guest/kvm-test.
    #[arg(long)]
    testdev: bool,
    /// Answer `rhyve ctl` (info, stats, shutdown) on this UNIX socket (created mode 0600).
    #[arg(long)]
    api_socket: Option<PathBuf>,
}

/// What `rhyve run` tells its API socket.
struct RunApi {
    host: std::sync::Arc<vmm::pci_host::PciHost>,
    exit: vmm::ExitSender,
    pause: vmm::PauseHandle,
    snapshots: vmm::snapshot::Snapshotter,
    power_button: vmm::PowerButton,
    exits: std::sync::Arc<vmm::stats::Stats>,
    vcpus: u8,
    memory: u64,
    /// How a finished migration went, for the exit line.
    migrated: std::sync::Mutex<Option<String>>,
}

impl crate::api::Api for RunApi {
    fn info(&self) -> serde_json::Value {
        let devs: Vec<_> = self
            .host
            .slots()
            .map(|s| {
                serde_json::json!({
                    "slot": s.address(),
                    "emulation": s.lock().name(),
                    "bars": s.bars().iter().map(|b| serde_json::json!({
                        "index": b.index,
                        "size": b.size,
                        "base": s.bar_base(b.index),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        serde_json::json!({
            "frontend": "kvm",
            "state": if self.pause.is_paused() { "paused" } else { "running" },
            "vcpus": self.vcpus,
            "memory_bytes": self.memory,
            "devices": devs,
        })
    }

    fn stats(&self) -> serde_json::Value {
        let exits = self.exits.snapshot();
        let devs: Vec<_> = vmm::device_reports(&self.host, &exits)
            .into_iter()
            .map(|d| crate::api::device_stats(d.address, &d.name, d.counters))
            .collect();
        serde_json::json!({ "exits": exits.total(), "devices": devs })
    }

    fn shutdown(&self, grace: std::time::Duration) {
        // A paused guest cannot answer the button.
        if grace.is_zero() || self.pause.is_paused() {
            let _ = self.exit.send(VmExit::Stopped);
            return;
        }
        // The guest may power off on its own (ACPI S5 ends the run first); if it has not when
        // the time is up, stop it.
        self.power_button.press();
        let exit = self.exit.clone();
        std::thread::spawn(move || {
            std::thread::sleep(grace);
            let _ = exit.send(VmExit::Stopped);
        });
    }

    fn pause(&self) -> Result<(), (u16, String)> {
        if self.pause.is_paused() {
            return Err((409, "the VM is already paused".into()));
        }
        self.pause.pause().map_err(|e| (500, e))
    }

    fn resume(&self) -> Result<(), (u16, String)> {
        if !self.pause.is_paused() {
            return Err((409, "the VM is not paused".into()));
        }
        self.pause.resume();
        Ok(())
    }

    fn migrate(&self, url: &str) -> Result<serde_json::Value, (u16, String)> {
        if self.pause.is_paused() {
            return Err((409, "the VM is paused: resume it before migrating".into()));
        }
        let r = self.snapshots.migrate(url).map_err(|e| (500, e))?;
        let how = format!(
            "now running at {url}; downtime {} ms, {} MiB of RAM sent in {} ms ({} pre-copy rounds, {} pages while paused{})",
            r.downtime_ms,
            r.ram_bytes >> 20,
            r.total_ms,
            r.rounds,
            r.final_pages,
            if r.dirty_log { "" } else { "; no KVM dirty log, pages compared by hash" }
        );
        *self.migrated.lock().unwrap_or_else(|e| e.into_inner()) = Some(how);
        Ok(serde_json::to_value(&r).unwrap_or_default())
    }

    fn migrated(&self) {
        let how = self
            .migrated
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_default();
        let _ = self.exit.send(VmExit::Migrated(how));
    }

    fn snapshot(&self, dir: &std::path::Path) -> Result<serde_json::Value, (u16, String)> {
        let r = self.snapshots.snapshot(dir).map_err(|e| (500, e))?;
        eprintln!(
            "rhyve: snapshot in {} ({} MiB of RAM, {} ms); the VM is paused",
            r.dir.display(),
            r.memory_bytes >> 20,
            r.millis
        );
        Ok(serde_json::json!({
            "status": "paused",
            "dir": r.dir,
            "memory_bytes": r.memory_bytes,
            "millis": r.millis,
        }))
    }
}

/// Parse `-m`: K/M/G/T suffixes, bare numbers in MiB.
pub fn parse_memory(s: &str) -> Result<u64> {
    let t = s.trim();
    let bare = t.chars().last().is_some_and(|c| c.is_ascii_digit());
    let n = pci::registry::parse_number(t, true)
        .and_then(|n| {
            if bare {
                n.checked_mul(1 << 20)
            } else {
                Some(n)
            }
        })
        .with_context(|| {
            format!("bad memory size '{s}': expected a number with an optional K, M, G or T suffix")
        })?;
    if n < vmm::memory::MIN_RAM {
        bail!("memory size '{s}' is too small: rhyve needs at least 16M");
    }
    if !n.is_multiple_of(4096) {
        bail!("memory size '{s}' is not a multiple of 4K");
    }
    if n > 1 << 40 {
        bail!("memory size '{s}' is too large: the limit is 1T");
    }
    Ok(n)
}

fn parse_cpus(s: &str) -> Result<u8> {
    match s.trim().parse::<u16>() {
        Ok(n @ 1..=254) => Ok(n as u8),
        _ => bail!("bad vCPU count '{s}': must be from 1 to 254"),
    }
}

fn parse_console(lpc: &[String]) -> Result<ConsoleSink> {
    let mut console = None;
    for l in lpc {
        let (dev, backend) = l.split_once(',').unwrap_or((l, ""));
        if !dev.eq_ignore_ascii_case("com1") {
            bail!("unknown LPC device '{dev}': rhyve has com1");
        }
        if console.is_some() {
            bail!("com1 is given twice");
        }
        console = Some(match backend {
            "" => bail!("com1 needs a backend: stdio, off or a file path"),
            "stdio" => ConsoleSink::Stdio,
            "off" | "null" => ConsoleSink::Null,
            path => ConsoleSink::File(
                std::fs::File::create(path)
                    .with_context(|| format!("cannot create com1 output file '{path}'"))?,
            ),
        });
    }
    Ok(console.unwrap_or(ConsoleSink::Stdio))
}

fn check_readable(what: &str, p: &PathBuf) -> Result<String> {
    std::fs::File::open(p).with_context(|| format!("cannot open {what} '{}'", p.display()))?;
    p.to_str()
        .map(str::to_string)
        .with_context(|| format!("{what} path '{}' is not UTF-8", p.display()))
}

/// The devices `rhyve run` offers: the shared registry plus the host bridge.
pub fn registry() -> pci::DeviceRegistry {
    let mut r = crate::devices::registry();
    r.register(
        "hostbridge",
        &["amd_hostbridge"],
        vmm::pci_host::create_hostbridge,
    );
    r
}

/// Check the command line and turn it into a VM configuration (no KVM involved), starting from
/// `incoming` (a migration) when given.
fn config(a: RunArgs, incoming: Option<vmm::snapshot::Restore>) -> Result<(VmConfig, bool)> {
    let restore = match (&a.restore, incoming) {
        (_, Some(r)) => Some(r),
        (Some(dir), None) => {
            Some(vmm::snapshot::Restore::from_dir(dir).map_err(anyhow::Error::msg)?)
        }
        (None, None) => None,
    };
    let (mem_size, vcpus, testdev, slots) = match &restore {
        Some(r) => {
            let c = &r.state.config;
            let slots = if a.slots.is_empty() {
                c.devices.clone()
            } else {
                a.slots.clone()
            };
            (c.mem_size, c.vcpus, c.testdev, slots)
        }
        None => (
            parse_memory(&a.memory)?,
            parse_cpus(&a.cpus)?,
            a.testdev,
            a.slots.clone(),
        ),
    };
    let registry = registry();
    let mut taken = HashSet::new();
    let mut devices = Vec::new();
    for s in &slots {
        let spec = SlotSpec::parse(s)?;
        if !taken.insert((spec.bus, spec.slot, spec.func)) {
            bail!(ConfigError::SlotTaken(spec.address()));
        }
        if spec.bus != 0 {
            bail!("slot {}: rhyve run has only PCI bus 0", spec.address());
        }
        if registry.canonical(&spec.emul).is_none() {
            bail!(ConfigError::UnknownDevice {
                name: spec.emul.clone(),
                valid: registry.names().join(", ")
            });
        }
        devices.push(spec);
    }
    let kernel = match (&a.kernel, &restore) {
        (Some(k), None) => check_readable("kernel", k)?,
        _ => String::new(),
    };
    let initrd = a
        .initrd
        .as_ref()
        .map(|p| check_readable("initrd", p))
        .transpose()?;
    if a.cmdline.len() >= vmm::boot::CMDLINE_MAX {
        bail!(
            "kernel command line is {} bytes; the limit is {}",
            a.cmdline.len(),
            vmm::boot::CMDLINE_MAX - 1
        );
    }
    let console = parse_console(&a.lpc)?;
    Ok((
        VmConfig {
            mem_size,
            vcpus,
            kernel,
            initrd,
            cmdline: a.cmdline,
            console,
            testdev,
            devices,
            device_args: slots,
            restore,
        },
        a.stats,
    ))
}

/// Run a VM to its end. Exits the process with the VM's exit code when that is not 0.
pub fn run(a: RunArgs) -> Result<()> {
    let api_socket = a.api_socket.clone();
    let mut incoming = match &a.migrate_receive {
        Some(url) => {
            eprintln!("rhyve: waiting for a migrating VM on {url}");
            Some(vmm::migration::receive(url).map_err(anyhow::Error::msg)?)
        }
        None => None,
    };
    let (cfg, stats) =
        config(a, incoming.as_mut().and_then(|i| i.take_restore())).inspect_err(|e| {
            if let Some(i) = incoming.as_mut() {
                i.refuse(&format!("{e:#}"));
            }
        })?;
    let (vcpus, memory) = (cfg.vcpus, cfg.mem_size);
    let vm = match Vm::new(cfg, &registry()) {
        Ok(vm) => vm,
        Err(e) => {
            if let Some(i) = incoming.as_mut() {
                i.refuse(&e.to_string());
            }
            return Err(e.into());
        }
    };
    if let Some(i) = incoming.as_mut() {
        // From here the VM is ours: the source stops when it reads this.
        i.confirm().map_err(anyhow::Error::msg)?;
        eprintln!("rhyve: migrated VM received; running");
    }
    let _api = match &api_socket {
        Some(path) => Some(crate::api::serve(
            path,
            std::sync::Arc::new(RunApi {
                host: vm.host().clone(),
                exit: vm.exit_sender(),
                pause: vm.pause_handle(),
                snapshots: vm.snapshotter(),
                power_button: vm.power_button(),
                exits: vm.exit_stats(),
                migrated: Default::default(),
                vcpus,
                memory,
            }),
        )?),
        None => None,
    };
    let exit = vm.exit_sender();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .context("cannot install signal handlers")?;
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            let _ = exit.send(VmExit::Signal(sig));
        }
    });
    let out = vm.run();
    if stats {
        eprintln!(
            "rhyve: exits: {} coalesced_pio={}",
            out.stats.line(),
            out.coalesced_pio
        );
        for d in &out.devices {
            let c: Vec<String> = d.counters.iter().map(|(k, v)| format!("{k}={v}")).collect();
            eprintln!("rhyve: {} {}: {}", d.address, d.name, c.join(" "));
        }
    }
    eprintln!("rhyve: {}", out.exit.describe());
    let code = out.exit.code();
    if code != 0 {
        std::process::exit(i32::from(code));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("1G").unwrap(), 1 << 30);
        assert_eq!(parse_memory("512").unwrap(), 512 << 20);
        assert_eq!(parse_memory("64m").unwrap(), 64 << 20);
        assert_eq!(
            parse_memory("1X").unwrap_err().to_string(),
            "bad memory size '1X': expected a number with an optional K, M, G or T suffix"
        );
        assert_eq!(
            parse_memory("1M").unwrap_err().to_string(),
            "memory size '1M' is too small: rhyve needs at least 16M"
        );
        assert_eq!(
            parse_memory("20001K").unwrap_err().to_string(),
            "memory size '20001K' is not a multiple of 4K"
        );
        assert_eq!(
            parse_cpus("0").unwrap_err().to_string(),
            "bad vCPU count '0': must be from 1 to 254"
        );
        assert_eq!(parse_cpus("4").unwrap(), 4);
    }
}
