//! `rhyve uml`: one listening socket per `-s` device, then serve until UML goes away.

use std::collections::HashSet;
use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use pci::{PciDevice, SlotSpec};

/// Arguments of `rhyve uml`.
#[derive(Args)]
pub struct UmlArgs {
    /// Directory for the vhost-user sockets (`DIR/slot<N>.sock`); created if missing.
    #[arg(long)]
    socket_dir: PathBuf,
    /// A device, bhyve syntax: `slot[:func],emul[,conf]`, e.g. `4,nvme,disk.img,ser=RHYVE0001`.
    #[arg(short = 's', long = "slot", required = true)]
    slots: Vec<String>,
    /// The CONFIG_UML_PCI_OVER_VIRTIO_DEVICE_ID the UML kernel was built with.
    #[arg(long, default_value_t = 1234)]
    device_id: u32,
    /// Print per-device counters on exit.
    #[arg(long)]
    stats: bool,
    /// Answer `rhyve ctl` (info, stats, shutdown) on this UNIX socket (created mode 0600).
    #[arg(long)]
    api_socket: Option<PathBuf>,
}

/// A device as the API socket sees it: where, what, and its counters.
type ApiDevice = (
    SlotSpec,
    Arc<dyn PciDevice>,
    Arc<uml::Counters>,
    Arc<uml::UmlInterrupts>,
);

/// What `rhyve uml` tells its API socket: each device, its counters, and how to stop.
struct UmlApi {
    devices: Vec<ApiDevice>,
    stops: Vec<uml::StopHandle>,
}

impl crate::api::Api for UmlApi {
    fn info(&self) -> serde_json::Value {
        let devs: Vec<_> = self
            .devices
            .iter()
            .map(|(spec, d, ..)| {
                serde_json::json!({
                    "slot": spec.address(),
                    "emulation": d.name(),
                    "options": spec.opts.items.iter().map(|i| match &i.value {
                        Some(v) => format!("{}={v}", i.key),
                        None => i.key.clone(),
                    }).collect::<Vec<_>>(),
                    "bars": d.bars().iter().map(|b| serde_json::json!({
                        "index": b.index, "size": b.size,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        serde_json::json!({ "frontend": "uml", "devices": devs })
    }

    fn stats(&self) -> serde_json::Value {
        let devs: Vec<_> = self
            .devices
            .iter()
            .map(|(spec, d, access, irq)| {
                crate::api::device_stats(
                    spec.address(),
                    d.name(),
                    d.stats()
                        .into_iter()
                        .chain(access.snapshot())
                        .chain(irq.stats())
                        .collect(),
                )
            })
            .collect();
        serde_json::json!({ "devices": devs })
    }

    fn shutdown(&self, _grace: std::time::Duration) {
        // The device server has no guest of its own to ask: stop at once.
        for s in &self.stops {
            s.stop();
        }
    }
}

struct Served {
    spec: SlotSpec,
    device: Arc<dyn PciDevice>,
    server: uml::UmlDevice,
    irq: Arc<uml::UmlInterrupts>,
}

/// Run the UML device server.
pub fn run(a: UmlArgs) -> Result<()> {
    let registry = crate::devices::registry();
    let mut specs = Vec::new();
    let mut taken = HashSet::new();
    for s in &a.slots {
        let spec = SlotSpec::parse(s)?;
        if !taken.insert((spec.bus, spec.slot, spec.func)) {
            bail!(pci::ConfigError::SlotTaken(spec.address()));
        }
        if spec.func != 0 || spec.bus != 0 {
            bail!(
                "slot {}: UML's virt-pci has only bus 0, function 0",
                spec.address()
            );
        }
        specs.push(spec);
    }
    if specs.len() > 8 {
        bail!(
            "{} devices given: UML's virt-pci supports at most 8",
            specs.len()
        );
    }
    std::fs::create_dir_all(&a.socket_dir)
        .with_context(|| format!("cannot create socket directory {}", a.socket_dir.display()))?;
    let mut served = Vec::new();
    let mut kernel_args = Vec::new();
    for spec in specs {
        let ctx = uml::UmlContext::new();
        let dev = registry.create(&spec, &ctx.device_context())?;
        let device: Arc<dyn PciDevice> = Arc::from(dev);
        let path = a.socket_dir.join(format!("slot{}.sock", spec.slot));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .with_context(|| format!("cannot listen on {}", path.display()))?;
        let server =
            uml::UmlDevice::new(listener, device.clone(), ctx.mem.clone(), ctx.irq.clone())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        kernel_args.push(format!(
            "virtio_uml.device={}:{}",
            path.display(),
            a.device_id
        ));
        served.push(Served {
            spec,
            device,
            server,
            irq: ctx.irq.clone(),
        });
    }
    let stops: Vec<_> = served.iter().map(|s| s.server.stop_handle()).collect();
    let _api = match &a.api_socket {
        Some(path) => Some(crate::api::serve(
            path,
            Arc::new(UmlApi {
                devices: served
                    .iter()
                    .map(|s| {
                        (
                            s.spec.clone(),
                            s.device.clone(),
                            s.server.counters(),
                            s.irq.clone(),
                        )
                    })
                    .collect(),
                stops: stops.clone(),
            }),
        )?),
        None => None,
    };
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "ready")?;
        writeln!(out, "{}", kernel_args.join(" "))?;
        out.flush()?;
    }
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .context("cannot install signal handlers")?;
    let sig_stops = stops.clone();
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            log::info!("signal {sig}: stopping");
            for s in &sig_stops {
                s.stop();
            }
        }
    });
    let mut threads = Vec::new();
    let mut devices = Vec::new();
    for s in served {
        let name = format!("uml-slot{}", s.spec.slot);
        devices.push((s.spec, s.device, s.server.counters(), s.irq));
        let server = s.server;
        threads.push(
            std::thread::Builder::new()
                .name(name)
                .spawn(move || server.run())?,
        );
    }
    let mut first_err = None;
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_err.get_or_insert_with(|| anyhow::anyhow!("{e}"));
            }
            Err(_) => {
                first_err.get_or_insert_with(|| anyhow::anyhow!("a device server thread panicked"));
            }
        }
        // One device gone means UML is gone (or stopping): stop the rest too.
        for s in &stops {
            s.stop();
        }
    }
    for (spec, dev, access, irq) in &devices {
        let d = &**dev;
        d.shutdown();
        if a.stats {
            let all = d
                .stats()
                .into_iter()
                .chain(access.snapshot())
                .chain(irq.stats());
            let stats: Vec<String> = all.map(|(k, v)| format!("{k}={v}")).collect();
            eprintln!(
                "rhyve: slot {} {}: {}",
                spec.slot,
                d.name(),
                stats.join(" ")
            );
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
