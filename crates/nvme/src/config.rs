//! Controller configuration from bhyve-style options:
//! `-s 4,nvme,disk.img[,ro][,sectorsz=4096][,disk2.img…],maxq=4,qsz=1024,ser=RHYVE0001,mn=…`.
//!
//! Controller keys apply anywhere. Namespace keys (`ro`, `direct`, `nocache`, `sectorsz`/`sectsz`)
//! apply to the most recent image (a path or `ram=MiB`); each image is a namespace, NSID 1, 2, ….

use block::{BackendSpec, EngineKind};
use pci::{ConfigError, SlotOption, SlotOptions, SlotSpec};

/// Controller-level keys.
pub const CTRL_KEYS: &[&str] = &[
    "maxq",
    "qsz",
    "ioslots",
    "ser",
    "mn",
    "mdts",
    "eui64",
    "dsm",
    "smart",
    "dbbuf",
    "aio",
    "iothreads",
    "coalesce",
    "coalesce_us",
    "poll",
];
/// Default shadow-doorbell polling window (µs): long enough that a guest submitting at queue
/// depth 32 under UML rings fewer than 0.05 doorbells per I/O, short enough that an idle queue
/// stops costing CPU within a tenth of a millisecond.
pub const DEFAULT_POLL_US: u64 = 100;
/// Namespace-level keys.
pub const NS_KEYS: &[&str] = &["sectorsz", "sectsz", "ram"];
/// Namespace flags.
pub const NS_FLAGS: &[&str] = &["ro", "direct", "nocache"];

/// Validated controller configuration.
#[derive(Debug, Clone)]
pub struct CtrlConfig {
    /// Serial number (≤ 20 ASCII characters).
    pub serial: String,
    /// Model number (≤ 40 ASCII characters).
    pub model: String,
    /// Firmware revision.
    pub firmware: String,
    /// Maximum number of I/O queue pairs.
    pub maxq: u16,
    /// Maximum queue entries (CAP.MQES + 1).
    pub qsz: u32,
    /// MDTS in units of the minimum page size, as a power of two (0 = no limit).
    pub mdts: u8,
    /// IEEE-style base for EUI-64 values (namespace IDs are derived from it).
    pub eui64_base: u64,
    /// Dataset Management (deallocate) offered.
    pub dsm: bool,
    /// Doorbell Buffer Config (shadow doorbells) offered.
    pub dbbuf: bool,
    /// One backend spec per namespace.
    pub namespaces: Vec<BackendSpec>,
    /// Where lifetime SMART counters persist (`smart=PATH`); `None` counts this run only.
    pub smart: Option<std::path::PathBuf>,
    /// I/O engine (`aio=io_uring|threads`).
    pub aio: EngineKind,
    /// I/O threads; completion queue `n` is served by thread `n % iothreads`.
    pub iothreads: u16,
    /// How completions are turned into interrupts (`coalesce=`).
    pub coalesce: Coalesce,
    /// Longest an interrupt is held back by adaptive coalescing, in microseconds.
    pub coalesce_us: u32,
    /// After a queue goes idle, keep polling its shadow doorbell this long (microseconds)
    /// before asking the host for an MMIO doorbell again; 0 = never poll. Default
    /// [`DEFAULT_POLL_US`].
    pub poll_us: u32,
}

/// Interrupt coalescing policy (`coalesce=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coalesce {
    /// Only what the host asks for with Set Features Interrupt Coalescing (08h), as real
    /// controllers do.
    Host,
    /// Also coalesce on our own when the host has not: an interrupt is sent at once when a
    /// queue has no more commands in flight or runs at depth 1, otherwise after a few
    /// completions or `coalesce_us`, whichever comes first.
    Adaptive,
}

impl CtrlConfig {
    /// Number of I/O queue pairs offered by default.
    pub fn io_queues(&self) -> u16 {
        self.maxq
    }

    /// Parse a `-s` spec.
    pub fn from_spec(spec: &SlotSpec) -> Result<Self, ConfigError> {
        let o = &spec.opts;
        let dev = o.device().to_string();
        let mut namespaces: Vec<BackendSpec> = Vec::new();
        let mut pending_ns_opts: Vec<&SlotOption> = Vec::new();
        let all_keys: Vec<&str> = CTRL_KEYS.iter().chain(NS_KEYS).copied().collect();
        for item in &o.items {
            match (&item.value, item.key.as_str()) {
                (None, f) if NS_FLAGS.contains(&f) => pending_ns_opts.push(item),
                (None, path) => namespaces.push(BackendSpec::file(path)),
                (Some(v), "ram") => {
                    let mib = pci::registry::parse_number(v, false)
                        .filter(|m| (1..=1 << 20).contains(m))
                        .ok_or_else(|| o.bad_value("ram", v, "a size in MiB from 1 to 1048576"))?;
                    namespaces.push(BackendSpec::ram(mib));
                }
                (Some(_), k) if all_keys.contains(&k) => {
                    if NS_KEYS.contains(&k) {
                        pending_ns_opts.push(item);
                    }
                }
                (Some(_), k) => {
                    return Err(ConfigError::UnknownKey {
                        device: dev,
                        key: k.to_string(),
                        valid: all_keys
                            .iter()
                            .map(|k| format!("{k}="))
                            .chain(NS_FLAGS.iter().map(|f| f.to_string()))
                            .collect::<Vec<_>>()
                            .join(", "),
                    })
                }
            }
            // Namespace options bind to the image named most recently (or the first one).
            if let Some(ns) = namespaces.last_mut() {
                for it in pending_ns_opts.drain(..) {
                    apply_ns_option(o, ns, it)?;
                }
            }
        }
        if namespaces.is_empty() {
            return Err(ConfigError::Device {
                device: dev,
                msg: "no disk image: give a path (4,nvme,disk.img) or ram=MiB".into(),
            });
        }
        if let Some(ns) = namespaces.first_mut() {
            for it in pending_ns_opts.drain(..) {
                apply_ns_option(o, ns, it)?;
            }
        }
        let maxq = o.num("maxq", 1, 64, false)?.unwrap_or(16) as u16;
        let qsz = o.num("qsz", 2, 65536, false)?.unwrap_or(1024) as u32;
        o.num("ioslots", 1, 65536, false)?; // bhyve's I/O slot count: accepted, not needed here
        let mdts = o.num("mdts", 0, 12, false)?.unwrap_or(7) as u8;
        let serial = o
            .get("ser")
            .map(str::to_string)
            .unwrap_or_else(|| format!("NVME-{}-{}", spec.slot, spec.func));
        check_ascii(o, "ser", &serial, 20)?;
        let model = o.get("mn").unwrap_or("rhyve NVMe").to_string();
        check_ascii(o, "mn", &model, 40)?;
        let eui64_base = match o.get("eui64") {
            Some(v) => pci::registry::parse_number(v, false)
                .ok_or_else(|| o.bad_value("eui64", v, "a 64-bit number"))?,
            None => {
                0x5254_0000_0000_0000 | (u64::from(spec.slot) << 16) | (u64::from(spec.func) << 8)
            }
        };
        let dsm = !matches!(
            o.choice("dsm", &["auto", "enable", "disable"])?,
            Some("disable")
        );
        let dbbuf = !matches!(o.choice("dbbuf", &["on", "off"])?, Some("off"));
        let aio = match o.get("aio") {
            Some(v) => v
                .parse::<EngineKind>()
                .map_err(|_| o.bad_value("aio", v, "io_uring or threads"))?,
            None => EngineKind::default(),
        };
        // A thread per I/O queue at most: more would never serve one.
        let iothreads = (o.num("iothreads", 1, 64, false)?.unwrap_or(1) as u16).min(maxq.max(1));
        let coalesce = match o.choice("coalesce", &["host", "adaptive", "off"])? {
            Some("adaptive") => Coalesce::Adaptive,
            Some(_) => Coalesce::Host,
            None => Coalesce::Adaptive,
        };
        let coalesce_us = o.num("coalesce_us", 1, 100_000, false)?.unwrap_or(100) as u32;
        let poll_us = o
            .num("poll", 0, 1_000_000, false)?
            .unwrap_or(DEFAULT_POLL_US) as u32;
        Ok(CtrlConfig {
            serial,
            model,
            firmware: "1.0".into(),
            maxq,
            qsz,
            mdts,
            eui64_base,
            dsm,
            dbbuf,
            namespaces,
            smart: o.get("smart").map(std::path::PathBuf::from),
            aio,
            iothreads,
            coalesce,
            coalesce_us,
            poll_us,
        })
    }
}

fn apply_ns_option(
    o: &SlotOptions,
    ns: &mut BackendSpec,
    it: &SlotOption,
) -> Result<(), ConfigError> {
    match (it.key.as_str(), it.value.as_deref()) {
        ("ro", None) => ns.read_only = true,
        ("direct", None) | ("nocache", None) => ns.direct = true,
        ("sectorsz" | "sectsz", Some(v)) => {
            ns.sector_size = match v {
                "512" => 512,
                "4096" => 4096,
                _ => return Err(o.bad_value(&it.key, v, "use 512 or 4096")),
            }
        }
        _ => {}
    }
    Ok(())
}

fn check_ascii(o: &SlotOptions, key: &str, v: &str, max: usize) -> Result<(), ConfigError> {
    if v.is_empty() || v.len() > max || !v.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(o.bad_value(key, v, &format!("1 to {max} printable ASCII characters")));
    }
    Ok(())
}
