//! bhyve-compatible configuration: `-s 5,ahci,hd:disk.img,ser=X,cd:install.iso` (one port per
//! `hd:`/`cd:` item, in order, each followed by its own options), and the one-port aliases
//! `-s 5,ahci-hd,disk.img,...` and `-s 5,ahci-cd,install.iso`.
//!
//! Per-port options: `ser=`, `model=`, `ro`, `nocache` and `direct` (bypass the host page cache),
//! `sync` (bhyve: write-through, the drive's write cache starts disabled), `sectorsz=512|4096`
//! and bhyve's `sectorsize=LOGICAL[/PHYSICAL]` (e.g. `512/4096` for a 512e disk). Anything else
//! is an error naming the key and the valid ones, and an image that cannot be opened is an error
//! naming its path.

use std::path::PathBuf;

use block::{BackendSpec, EngineKind};
use pci::registry::SlotOption;
use pci::{ConfigError, SlotOptions, SlotSpec};

use crate::drive::{DriveInfo, DriveKind, CD_BLOCK};
use crate::regs::hba::MAX_PORTS;

/// Keys a disk port accepts.
const HD_KEYS: &[&str] = &["ser", "model", "sectorsz", "sectorsize"];
/// Flags a disk port accepts.
const HD_FLAGS: &[&str] = &["ro", "nocache", "direct", "sync"];
/// Keys a CD-ROM port accepts.
const CD_KEYS: &[&str] = &["ser", "model"];
/// Flags a CD-ROM port accepts (it is always read-only).
const CD_FLAGS: &[&str] = &["ro", "nocache", "direct"];
/// Longest ATA serial number.
const SERIAL_MAX: usize = 20;
/// Longest ATA model number.
const MODEL_MAX: usize = 40;
/// Largest physical sector accepted by `sectorsize=` (IDENTIFY word 106 can express more; no
/// real drive uses more).
const PHYS_MAX: u32 = 32768;

/// Controller-wide options, accepted anywhere in the list: `aio=io_uring|threads` (the I/O
/// engine) and `iothreads=N` (I/O threads; port `p` is served by thread `p % N`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HbaOptions {
    /// I/O engine.
    pub aio: EngineKind,
    /// I/O threads.
    pub iothreads: usize,
}

impl Default for HbaOptions {
    fn default() -> Self {
        HbaOptions {
            aio: EngineKind::default(),
            iothreads: 1,
        }
    }
}

/// Keys that configure the controller rather than a port.
const HBA_KEYS: &[&str] = &["aio", "iothreads"];

/// One port as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortConfig {
    /// Disk or CD-ROM.
    pub kind: DriveKind,
    /// Image path; `None` is an empty CD tray.
    pub path: Option<String>,
    /// The options that followed the port.
    pub opts: Vec<SlotOption>,
}

/// Split the slot's options into controller options and ports.
pub fn parse(spec: &SlotSpec) -> Result<(Vec<PortConfig>, HbaOptions), ConfigError> {
    let dev = spec.emul.as_str();
    let (hba_items, port_items): (Vec<SlotOption>, Vec<SlotOption>) = spec
        .opts
        .items
        .iter()
        .cloned()
        .partition(|o| o.value.is_some() && HBA_KEYS.contains(&o.key.as_str()));
    let ho = SlotOptions::from_items(dev, hba_items);
    let aio = match ho.get("aio") {
        Some(v) => v
            .parse::<EngineKind>()
            .map_err(|_| ho.bad_value("aio", v, "io_uring or threads"))?,
        None => EngineKind::default(),
    };
    let iothreads = ho.num("iothreads", 1, 32, false)?.unwrap_or(1) as usize;
    let opts = HbaOptions { aio, iothreads };
    let items = &port_items;
    let ports = match dev {
        "ahci-hd" | "ahci-cd" => {
            let kind = if dev == "ahci-hd" {
                DriveKind::Disk
            } else {
                DriveKind::Cdrom
            };
            let flags = if kind == DriveKind::Disk {
                HD_FLAGS
            } else {
                CD_FLAGS
            };
            let path = items
                .iter()
                .position(|o| o.value.is_none() && !flags.contains(&o.key.as_str()));
            let mut opts = items.clone();
            let path = path.map(|i| opts.remove(i).key);
            if path.is_none() && kind == DriveKind::Disk {
                return Err(device_err(
                    dev,
                    "no disk image given (ahci-hd,PATH[,options])",
                ));
            }
            vec![PortConfig { kind, path, opts }]
        }
        _ => {
            let mut ports: Vec<PortConfig> = Vec::new();
            for o in items {
                let word = match &o.value {
                    Some(v) => format!("{}={v}", o.key),
                    None => o.key.clone(),
                };
                let new = [("hd:", DriveKind::Disk), ("cd:", DriveKind::Cdrom)]
                    .into_iter()
                    .find_map(|(pre, kind)| word.strip_prefix(pre).map(|p| (kind, p.to_string())));
                match (new, ports.last_mut()) {
                    (Some((kind, path)), _) => {
                        let path = (!path.is_empty()).then_some(path);
                        if path.is_none() && kind == DriveKind::Disk {
                            return Err(device_err(dev, "hd: needs an image path (hd:PATH)"));
                        }
                        ports.push(PortConfig {
                            kind,
                            path,
                            opts: Vec::new(),
                        });
                    }
                    (None, Some(p)) => p.opts.push(o.clone()),
                    (None, None) => {
                        return Err(ConfigError::UnknownKey {
                            device: dev.to_string(),
                            key: o.key.clone(),
                            valid: "hd:PATH, cd:PATH (each followed by its options)".into(),
                        })
                    }
                }
            }
            if ports.is_empty() {
                return Err(device_err(dev, "no ports: add hd:PATH or cd:PATH"));
            }
            ports
        }
    };
    if ports.len() > MAX_PORTS {
        return Err(device_err(
            dev,
            &format!(
                "{} ports given; an AHCI HBA has at most {MAX_PORTS}",
                ports.len()
            ),
        ));
    }
    for p in &ports {
        let (keys, flags) = key_set(p.kind);
        SlotOptions::from_items(dev, p.opts.clone()).check(keys, flags, 0)?;
    }
    Ok((ports, opts))
}

fn key_set(kind: DriveKind) -> (&'static [&'static str], &'static [&'static str]) {
    match kind {
        DriveKind::Disk => (HD_KEYS, HD_FLAGS),
        DriveKind::Cdrom => (CD_KEYS, CD_FLAGS),
    }
}

fn device_err(dev: &str, msg: &str) -> ConfigError {
    ConfigError::Device {
        device: dev.to_string(),
        msg: msg.to_string(),
    }
}

/// FNV-1a, for stable default serial numbers and WWNs.
fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Sector sizes from `sectorsz=` / `sectorsize=` (last one wins).
fn sector_sizes(o: &SlotOptions) -> Result<(u32, u32), ConfigError> {
    let mut sizes = (512, 512);
    for item in &o.items {
        let Some(v) = item.value.as_deref() else {
            continue;
        };
        match item.key.as_str() {
            "sectorsz" => {
                let n = match v {
                    "512" => 512,
                    "4096" => 4096,
                    _ => return Err(o.bad_value("sectorsz", v, "use one of 512, 4096")),
                };
                sizes = (n, n);
            }
            "sectorsize" => {
                let bad = || {
                    o.bad_value(
                        "sectorsize",
                        v,
                        "use 512 or 4096, optionally /PHYSICAL (a power of two up to 32768)",
                    )
                };
                let (l, p) = v.split_once('/').unwrap_or((v, v));
                let l: u32 = l.parse().map_err(|_| bad())?;
                let p: u32 = p.parse().map_err(|_| bad())?;
                if !matches!(l, 512 | 4096) || !p.is_power_of_two() || p < l || p > PHYS_MAX {
                    return Err(bad());
                }
                sizes = (l, p);
            }
            _ => {}
        }
    }
    Ok(sizes)
}

/// An ATA string option: printable ASCII, at most `max` characters.
fn ata_string(o: &SlotOptions, key: &str, max: usize) -> Result<Option<String>, ConfigError> {
    match o.get(key) {
        None => Ok(None),
        Some(v) if v.len() <= max && v.bytes().all(|c| c.is_ascii_graphic() || c == b' ') => {
            Ok(Some(v.to_string()))
        }
        Some(v) => Err(o.bad_value(
            key,
            v,
            &format!("use at most {max} printable ASCII characters"),
        )),
    }
}

/// Open port `index`'s image and describe the drive.
pub fn open(dev: &str, index: usize, port: &PortConfig) -> Result<DriveInfo, ConfigError> {
    let o = SlotOptions::from_items(dev, port.opts.clone());
    let cd = port.kind == DriveKind::Cdrom;
    let (logical, physical) = sector_sizes(&o)?;
    let serial = ata_string(&o, "ser", SERIAL_MAX)?;
    let model = ata_string(&o, "model", MODEL_MAX)?;
    let backend = match &port.path {
        None => None,
        Some(path) => {
            let spec = BackendSpec {
                path: Some(PathBuf::from(path)),
                ram_mib: None,
                read_only: cd || o.flag("ro"),
                direct: o.flag("nocache") || o.flag("direct"),
                sector_size: if cd { 512 } else { logical },
            };
            let be =
                block::open(&spec).map_err(|e| device_err(dev, &format!("port {index}: {e}")))?;
            let min = if cd {
                u64::from(CD_BLOCK)
            } else {
                u64::from(logical)
            };
            if be.info().capacity < min {
                return Err(device_err(
                    dev,
                    &format!("port {index}: {path} is smaller than one {min}-byte sector"),
                ));
            }
            Some(be)
        }
    };
    let mut info = DriveInfo::new(port.kind, backend, logical, physical);
    let h = fnv(format!("{}:{index}", port.path.as_deref().unwrap_or("")).as_bytes());
    info.serial = serial.unwrap_or_else(|| {
        format!(
            "RHYVE-{:04X}-{:04X}-{:04X}",
            (h >> 32) & 0xffff,
            (h >> 16) & 0xffff,
            h & 0xffff
        )
    });
    info.model = model.unwrap_or_else(|| {
        if cd {
            "RHYVE SATA DVD-ROM"
        } else {
            "RHYVE SATA DISK"
        }
        .to_string()
    });
    info.firmware = env!("CARGO_PKG_VERSION").to_string();
    // NAA 5 (IEEE registered) layout; the company and vendor bits are derived from the serial
    // number, so they are stable but not an assigned OUI.
    info.wwn = (5 << 60) | (fnv(info.serial.as_bytes()) & ((1 << 60) - 1));
    info.write_through = o.flag("sync");
    Ok(info)
}
