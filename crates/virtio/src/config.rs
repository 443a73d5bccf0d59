//! `-s slot,virtio-blk,IMAGE[,ro][,direct][,sectorsz=512|4096][,ser=ID][,queues=N][,qsz=N]
//! [,aio=io_uring|threads][,iothreads=N][,poll=µs]` (or `ram=MiB` instead of `IMAGE`).

use block::{BackendSpec, EngineKind};
use pci::{ConfigError, SlotSpec};

/// Keys taking a value.
const KEYS: &[&str] = &[
    "ram",
    "poll",
    "sectorsz",
    "sectsz",
    "ser",
    "queues",
    "qsz",
    "aio",
    "iothreads",
];
/// Flags.
const FLAGS: &[&str] = &["ro", "direct", "nocache"];

/// A virtio-blk device's configuration.
#[derive(Clone, Debug)]
pub struct BlkOptions {
    /// The disk.
    pub backend: BackendSpec,
    /// Device ID string (GET_ID), at most 20 bytes.
    pub serial: String,
    /// Request queues.
    pub queues: u16,
    /// Entries per queue (a power of two).
    pub qsz: u16,
    /// I/O engine.
    pub aio: EngineKind,
    /// I/O threads (queue `q` belongs to thread `q % iothreads`).
    pub iothreads: u16,
    /// After serving a queue, watch its available ring for this long (µs) with the driver's
    /// notifications off, so a driver that keeps submitting does not notify for each request.
    pub poll_us: u32,
}

impl BlkOptions {
    /// Parse the options of a `-s` argument, naming any bad value.
    pub fn from_spec(spec: &SlotSpec) -> Result<Self, ConfigError> {
        let o = &spec.opts;
        let dev = o.device().to_string();
        let mut backend: Option<BackendSpec> = None;
        for item in &o.items {
            match (item.key.as_str(), item.value.as_deref()) {
                (f, None) if FLAGS.contains(&f) => {}
                (path, None) => {
                    if backend.is_some() {
                        return Err(ConfigError::Device {
                            device: dev,
                            msg: format!("a second disk image {path:?}: virtio-blk has one"),
                        });
                    }
                    backend = Some(BackendSpec::file(path));
                }
                ("ram", Some(v)) => {
                    let mib = pci::registry::parse_number(v, false)
                        .filter(|m| (1..=1 << 20).contains(m))
                        .ok_or_else(|| o.bad_value("ram", v, "a size in MiB from 1 to 1048576"))?;
                    backend = Some(BackendSpec::ram(mib));
                }
                (k, Some(_)) if KEYS.contains(&k) => {}
                (k, _) => {
                    return Err(ConfigError::UnknownKey {
                        device: dev,
                        key: k.to_string(),
                        valid: KEYS
                            .iter()
                            .map(|k| format!("{k}="))
                            .chain(FLAGS.iter().map(|f| f.to_string()))
                            .collect::<Vec<_>>()
                            .join(", "),
                    })
                }
            }
        }
        let Some(mut backend) = backend else {
            return Err(ConfigError::Device {
                device: dev,
                msg: "no disk image: give a path (6,virtio-blk,disk.img) or ram=MiB".into(),
            });
        };
        backend.read_only |= o.flag("ro");
        backend.direct |= o.flag("direct") || o.flag("nocache");
        if let Some(v) = o.get("sectorsz").or(o.get("sectsz")) {
            backend.sector_size = match v {
                "512" => 512,
                "4096" => 4096,
                _ => return Err(o.bad_value("sectorsz", v, "use 512 or 4096")),
            };
        }
        let serial = o.get("ser").unwrap_or("RHYVE-VBLK").to_string();
        if serial.is_empty()
            || serial.len() > 20
            || !serial.bytes().all(|b| (0x20..0x7f).contains(&b))
        {
            return Err(o.bad_value("ser", &serial, "1 to 20 printable ASCII characters"));
        }
        let queues = o.num("queues", 1, 64, false)?.unwrap_or(1) as u16;
        let qsz = o.num("qsz", 2, 1024, false)?.unwrap_or(256) as u16;
        if !qsz.is_power_of_two() {
            return Err(o.bad_value("qsz", &qsz.to_string(), "a power of two from 2 to 1024"));
        }
        let aio = match o.get("aio") {
            Some(v) => v
                .parse::<EngineKind>()
                .map_err(|_| o.bad_value("aio", v, "io_uring or threads"))?,
            None => EngineKind::default(),
        };
        let iothreads = (o.num("iothreads", 1, 64, false)?.unwrap_or(1) as u16).min(queues);
        let poll_us = o.num("poll", 0, 10_000, false)?.unwrap_or(100) as u32;
        Ok(BlkOptions {
            backend,
            serial,
            queues,
            qsz,
            aio,
            iothreads,
            poll_us,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<BlkOptions, ConfigError> {
        BlkOptions::from_spec(&SlotSpec::parse(s).unwrap())
    }

    #[test]
    fn options_and_errors_name_the_bad_value() {
        let o = parse("6,virtio-blk,ram=8,ro,queues=4,qsz=128,ser=ABC,sectorsz=4096").unwrap();
        assert_eq!((o.queues, o.qsz, o.serial.as_str()), (4, 128, "ABC"));
        assert!(o.backend.read_only);
        assert_eq!(o.backend.sector_size, 4096);
        let e = parse("6,virtio-blk,ram=8,qsz=100").unwrap_err().to_string();
        assert!(e.contains("qsz") && e.contains("100"), "{e}");
        let e = parse("6,virtio-blk,ram=8,bogus=1").unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = parse("6,virtio-blk,ro").unwrap_err().to_string();
        assert!(e.contains("no disk image"), "{e}");
        assert!(parse("6,virtio-blk,a.img,b.img").is_err());
        assert!(parse("6,virtio-blk,ram=8,ser=").is_err());
    }
}
