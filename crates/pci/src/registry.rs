//! Device registry and bhyve's `-s slot[:func],emul[,conf]` syntax.
//!
//! The registry maps an emulation name (and aliases) to a constructor; the binary registers the
//! device crates, so `pci` depends on none of them. Options are parsed here once, and every bad
//! one is an error that names the key and what would have been valid.

use crate::{DeviceContext, PciDevice};
use std::fmt::Write as _;

/// A configuration error, worded for the person who typed the command line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The slot part of `-s` is malformed.
    #[error("bad slot '{0}': expected slot[:func] or bus:slot:func (slot 0-31, func 0-7)")]
    BadSlot(String),
    /// No emulation with that name.
    #[error("unknown device '{name}': valid devices are {valid}")]
    UnknownDevice { name: String, valid: String },
    /// An option key the device does not know.
    #[error("{device}: unknown option '{key}': valid options are {valid}")]
    UnknownKey {
        device: String,
        key: String,
        valid: String,
    },
    /// A value out of range or of the wrong form.
    #[error("{device}: {key}={value} is invalid: {expected}")]
    BadValue {
        device: String,
        key: String,
        value: String,
        expected: String,
    },
    /// Anything else the device refuses, already worded.
    #[error("{device}: {msg}")]
    Device { device: String, msg: String },
    /// Two devices on one slot.
    #[error("slot {0} is already taken")]
    SlotTaken(String),
}

/// One comma-separated option: `key=value` or a bare word.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotOption {
    /// The key (`maxq`), or the whole word for a bare option (`ro`, `disk.img`).
    pub key: String,
    /// The value after `=`; `None` for a bare word.
    pub value: Option<String>,
}

/// The options after `emul,` in a `-s` argument.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlotOptions {
    /// Options in command-line order.
    pub items: Vec<SlotOption>,
    device: String,
}

impl SlotOptions {
    /// Parse `a,b=c,d` for device `device` (the name is used in error messages).
    pub fn parse(device: &str, conf: &str) -> Self {
        let items = conf
            .split(',')
            .filter(|s| !s.is_empty())
            // A URI (nbd+unix:///x?socket=PATH) is one word, whatever its query holds.
            .map(
                |s| match s.split_once('=').filter(|(k, _)| !k.contains("://")) {
                    Some((k, v)) => SlotOption {
                        key: k.to_string(),
                        value: Some(v.to_string()),
                    },
                    None => SlotOption {
                        key: s.to_string(),
                        value: None,
                    },
                },
            )
            .collect();
        SlotOptions {
            items,
            device: device.to_string(),
        }
    }

    /// Options built from already-split items (used by devices with per-port groups).
    pub fn from_items(device: &str, items: Vec<SlotOption>) -> Self {
        SlotOptions {
            items,
            device: device.to_string(),
        }
    }

    /// The device name used in error messages.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// The value of `key=`, last one wins.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.items
            .iter()
            .rev()
            .find(|o| o.key == key && o.value.is_some())
            .and_then(|o| o.value.as_deref())
    }

    /// True if the bare word `flag` is present (`ro`, `direct`, `nocache`).
    pub fn flag(&self, flag: &str) -> bool {
        self.items
            .iter()
            .any(|o| o.key == flag && o.value.is_none())
    }

    /// Bare words that are not among `flags`, in order (typically the image path).
    pub fn positional(&self, flags: &[&str]) -> Vec<&str> {
        self.items
            .iter()
            .filter(|o| o.value.is_none() && !flags.contains(&o.key.as_str()))
            .map(|o| o.key.as_str())
            .collect()
    }

    /// Refuse any `key=` not in `keys` and any bare word that is a flag-like name not in `flags`
    /// beyond the first `max_positional` positional words.
    pub fn check(
        &self,
        keys: &[&str],
        flags: &[&str],
        max_positional: usize,
    ) -> Result<(), ConfigError> {
        let valid = || {
            let mut s = String::new();
            for k in keys {
                let _ = write!(s, "{k}=, ");
            }
            for f in flags {
                let _ = write!(s, "{f}, ");
            }
            s.trim_end_matches(", ").to_string()
        };
        let mut positional = 0;
        for o in &self.items {
            let ok = match &o.value {
                Some(_) => keys.contains(&o.key.as_str()),
                None if flags.contains(&o.key.as_str()) => true,
                None => {
                    positional += 1;
                    positional <= max_positional
                }
            };
            if !ok {
                return Err(ConfigError::UnknownKey {
                    device: self.device.clone(),
                    key: o.key.clone(),
                    valid: valid(),
                });
            }
        }
        Ok(())
    }

    /// Parse `key=` as a number in `range` (decimal, or hex with 0x). Sizes may carry a K/M/G/T
    /// suffix when `suffixes` is set.
    pub fn num(
        &self,
        key: &str,
        min: u64,
        max: u64,
        suffixes: bool,
    ) -> Result<Option<u64>, ConfigError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let bad = |exp: String| ConfigError::BadValue {
            device: self.device.clone(),
            key: key.to_string(),
            value: v.to_string(),
            expected: exp,
        };
        let n = parse_number(v, suffixes)
            .ok_or_else(|| bad(format!("expected a number from {min} to {max}")))?;
        if n < min || n > max {
            return Err(bad(format!("must be from {min} to {max}")));
        }
        Ok(Some(n))
    }

    /// `key=` as one of `choices`.
    pub fn choice<'a>(
        &'a self,
        key: &str,
        choices: &[&str],
    ) -> Result<Option<&'a str>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) if choices.contains(&v) => Ok(Some(v)),
            Some(v) => Err(ConfigError::BadValue {
                device: self.device.clone(),
                key: key.to_string(),
                value: v.to_string(),
                expected: format!("use one of {}", choices.join(", ")),
            }),
        }
    }

    /// An error about `key=value` in this device's words.
    pub fn bad_value(&self, key: &str, value: &str, expected: &str) -> ConfigError {
        ConfigError::BadValue {
            device: self.device.clone(),
            key: key.to_string(),
            value: value.to_string(),
            expected: expected.to_string(),
        }
    }
}

/// Parse a decimal or 0x-hex number with an optional K/M/G/T (binary) suffix.
pub fn parse_number(s: &str, suffixes: bool) -> Option<u64> {
    let s = s.trim();
    let (digits, mult) = match s.chars().last()? {
        c if suffixes && "kKmMgGtT".contains(c) => {
            let shift = match c.to_ascii_lowercase() {
                'k' => 10,
                'm' => 20,
                'g' => 30,
                _ => 40,
            };
            (&s[..s.len() - 1], 1u64 << shift)
        }
        _ => (s, 1),
    };
    let n = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(h) => u64::from_str_radix(h, 16).ok()?,
        None => digits.parse().ok()?,
    };
    n.checked_mul(mult)
}

/// A parsed `-s` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotSpec {
    /// PCI bus.
    pub bus: u8,
    /// Device number 0–31.
    pub slot: u8,
    /// Function 0–7.
    pub func: u8,
    /// Emulation name as typed (an alias stays an alias, so constructors can tell them apart).
    pub emul: String,
    /// The options after the emulation name.
    pub opts: SlotOptions,
}

impl SlotSpec {
    /// Parse `slot[:func],emul[,conf]` or `bus:slot:func,emul[,conf]`.
    pub fn parse(arg: &str) -> Result<Self, ConfigError> {
        let (slot_part, rest) = arg
            .split_once(',')
            .ok_or_else(|| ConfigError::BadSlot(arg.to_string()))?;
        let (emul, conf) = rest.split_once(',').unwrap_or((rest, ""));
        let bad = || ConfigError::BadSlot(slot_part.to_string());
        let nums: Vec<u8> = slot_part
            .split(':')
            .map(|p| p.trim().parse::<u8>().map_err(|_| bad()))
            .collect::<Result<_, _>>()?;
        let (bus, slot, func) = match nums[..] {
            [s] => (0, s, 0),
            [s, f] => (0, s, f),
            [b, s, f] => (b, s, f),
            _ => return Err(bad()),
        };
        if slot > 31 || func > 7 {
            return Err(bad());
        }
        if emul.is_empty() {
            return Err(ConfigError::BadSlot(arg.to_string()));
        }
        Ok(SlotSpec {
            bus,
            slot,
            func,
            emul: emul.to_string(),
            opts: SlotOptions::parse(emul, conf),
        })
    }

    /// `bus:slot.func` for messages.
    pub fn address(&self) -> String {
        format!("{}:{}.{}", self.bus, self.slot, self.func)
    }
}

/// A device constructor.
pub type Constructor = fn(&SlotSpec, &DeviceContext) -> Result<Box<dyn PciDevice>, ConfigError>;

struct Entry {
    name: &'static str,
    aliases: &'static [&'static str],
    ctor: Constructor,
}

/// Emulation name → constructor.
#[derive(Default)]
pub struct DeviceRegistry {
    entries: Vec<Entry>,
}

impl DeviceRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Register an emulation under `name` and `aliases`.
    pub fn register(
        &mut self,
        name: &'static str,
        aliases: &'static [&'static str],
        ctor: Constructor,
    ) {
        self.entries.push(Entry {
            name,
            aliases,
            ctor,
        });
    }

    /// All names and aliases, for help and errors.
    pub fn names(&self) -> Vec<&'static str> {
        self.entries
            .iter()
            .flat_map(|e| std::iter::once(e.name).chain(e.aliases.iter().copied()))
            .collect()
    }

    /// The canonical name for `emul` (an alias resolves to its device).
    pub fn canonical(&self, emul: &str) -> Option<&'static str> {
        self.entries
            .iter()
            .find(|e| e.name == emul || e.aliases.contains(&emul))
            .map(|e| e.name)
    }

    /// Build the device for `spec`.
    pub fn create(
        &self,
        spec: &SlotSpec,
        ctx: &DeviceContext,
    ) -> Result<Box<dyn PciDevice>, ConfigError> {
        let e = self
            .entries
            .iter()
            .find(|e| e.name == spec.emul || e.aliases.contains(&spec.emul.as_str()))
            .ok_or_else(|| ConfigError::UnknownDevice {
                name: spec.emul.clone(),
                valid: self.names().join(", "),
            })?;
        (e.ctor)(spec, ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uri_is_one_word_whatever_its_query_holds() {
        let s = SlotSpec::parse("4,nvme,nbd+unix:///exp?socket=/tmp/s.sock,ro,maxq=2").unwrap();
        let items: Vec<_> = s
            .opts
            .items
            .iter()
            .map(|i| (i.key.as_str(), i.value.as_deref()))
            .collect();
        assert_eq!(
            items,
            [
                ("nbd+unix:///exp?socket=/tmp/s.sock", None),
                ("ro", None),
                ("maxq", Some("2"))
            ]
        );
    }

    #[test]
    fn parses_bhyve_slot_syntax() {
        let s = SlotSpec::parse("4,nvme,disk.img,maxq=4,qsz=1024,ser=RHYVE0001").unwrap();
        assert_eq!((s.bus, s.slot, s.func, s.emul.as_str()), (0, 4, 0, "nvme"));
        assert_eq!(s.opts.positional(&["ro"]), vec!["disk.img"]);
        assert_eq!(s.opts.num("maxq", 1, 64, false).unwrap(), Some(4));
        assert_eq!(s.opts.get("ser"), Some("RHYVE0001"));
        let s = SlotSpec::parse("1:3:2,ahci,hd:a.img,cd:b.iso").unwrap();
        assert_eq!((s.bus, s.slot, s.func), (1, 3, 2));
        assert_eq!(SlotSpec::parse("0:5,hostbridge").unwrap().func, 5);
        for bad in ["32,nvme", "x,nvme", "4:8,nvme", "4", "4,", "1:2:3:4,nvme"] {
            assert!(
                matches!(SlotSpec::parse(bad), Err(ConfigError::BadSlot(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn errors_name_key_and_choices() {
        let s = SlotSpec::parse("4,nvme,disk.img,maxqq=4").unwrap();
        let e = s.opts.check(&["maxq", "qsz"], &["ro"], 1).unwrap_err();
        assert_eq!(
            e.to_string(),
            "nvme: unknown option 'maxqq': valid options are maxq=, qsz=, ro"
        );
        let s = SlotSpec::parse("4,nvme,disk.img,qsz=1").unwrap();
        let e = s.opts.num("qsz", 2, 65536, false).unwrap_err();
        assert_eq!(
            e.to_string(),
            "nvme: qsz=1 is invalid: must be from 2 to 65536"
        );
        let s = SlotSpec::parse("4,nvme,a.img,b.img").unwrap();
        assert!(s.opts.check(&[], &[], 1).is_err());
        assert_eq!(parse_number("64M", true), Some(64 << 20));
        assert_eq!(parse_number("0x10", false), Some(16));
        assert_eq!(parse_number("99999999999999999999T", true), None);
        let s = SlotSpec::parse("4,nvme,sectsz=100").unwrap();
        let e = s.opts.choice("sectsz", &["512", "4096"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "nvme: sectsz=100 is invalid: use one of 512, 4096"
        );
    }

    #[test]
    fn registry_resolves_aliases_and_names_unknowns() {
        fn ctor(_: &SlotSpec, _: &DeviceContext) -> Result<Box<dyn PciDevice>, ConfigError> {
            Err(ConfigError::Device {
                device: "x".into(),
                msg: "built".into(),
            })
        }
        let mut r = DeviceRegistry::new();
        r.register("ahci", &["ahci-hd", "ahci-cd"], ctor);
        assert_eq!(r.canonical("ahci-cd"), Some("ahci"));
        assert_eq!(r.names(), vec!["ahci", "ahci-hd", "ahci-cd"]);
        let ctx = DeviceContext {
            mem: crate::GuestMem::new(vm_memory::GuestMemoryMmap::new()),
            irq: std::sync::Arc::new(crate::NullInterrupts),
            intx_supported: false,
        };
        let e = r
            .create(&SlotSpec::parse("3,nvm").unwrap(), &ctx)
            .err()
            .unwrap();
        assert_eq!(
            e.to_string(),
            "unknown device 'nvm': valid devices are ahci, ahci-hd, ahci-cd"
        );
    }
}
