//! SMART / Health counters that outlive the process, as a real drive's do.
//!
//! With `smart=PATH` the controller keeps its lifetime counters (power cycles, power-on time,
//! unsafe shutdowns, data units and commands, media errors) in a small text file: loaded at
//! start (one more power cycle; an unclean previous run is one more unsafe shutdown), saved on
//! every normal shutdown (CC.SHN) and when rhyve exits. Without it they count this run only.

use std::path::{Path, PathBuf};

/// Lifetime totals up to the start of this run, plus whether the last run ended cleanly.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub power_cycles: u64,
    pub power_on_secs: u64,
    pub unsafe_shutdowns: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub read_cmds: u64,
    pub write_cmds: u64,
    pub media_errors: u64,
    /// The controller was shut down (CC.SHN) before the process ended.
    pub clean: bool,
}

const KEYS: [&str; 9] = [
    "power_cycles",
    "power_on_secs",
    "unsafe_shutdowns",
    "bytes_read",
    "bytes_written",
    "read_cmds",
    "write_cmds",
    "media_errors",
    "clean",
];

impl Totals {
    fn fields(&mut self) -> [&mut u64; 8] {
        [
            &mut self.power_cycles,
            &mut self.power_on_secs,
            &mut self.unsafe_shutdowns,
            &mut self.bytes_read,
            &mut self.bytes_written,
            &mut self.read_cmds,
            &mut self.write_cmds,
            &mut self.media_errors,
        ]
    }

    fn parse(text: &str) -> Totals {
        let mut t = Totals {
            clean: true,
            ..Default::default()
        };
        for line in text.lines() {
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            let Ok(v) = v.trim().parse::<u64>() else {
                continue;
            };
            match KEYS.iter().position(|&x| x == k.trim()) {
                Some(8) => t.clean = v != 0,
                Some(i) => *t.fields()[i] = v,
                None => {}
            }
        }
        t
    }

    fn render(&self) -> String {
        let mut me = self.clone();
        let mut s = String::from("# rhyve NVMe SMART state\n");
        for (k, v) in KEYS.iter().zip(me.fields()) {
            s.push_str(&format!("{k}={v}\n"));
        }
        s.push_str(&format!("clean={}\n", u8::from(self.clean)));
        s
    }
}

/// The SMART state file (`smart=PATH`) could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SmartError {
    /// It exists but cannot be read.
    #[error("cannot read SMART state {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It cannot be written (or replaced).
    #[error("cannot write SMART state {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The persistent store (or none).
#[derive(Debug)]
pub struct SmartStore {
    path: Option<PathBuf>,
    /// Totals before this run started.
    pub base: Totals,
}

impl SmartStore {
    /// Open the store at `path` and count this power-on. Errors name the path.
    pub fn open(path: Option<&Path>) -> Result<SmartStore, SmartError> {
        let mut base = match path {
            Some(p) => match std::fs::read_to_string(p) {
                Ok(text) => Totals::parse(&text),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Totals {
                    clean: true,
                    ..Default::default()
                },
                Err(source) => {
                    return Err(SmartError::Read {
                        path: p.to_path_buf(),
                        source,
                    })
                }
            },
            None => Totals {
                clean: true,
                ..Default::default()
            },
        };
        base.power_cycles += 1;
        if !base.clean {
            base.unsafe_shutdowns += 1;
        }
        let store = SmartStore {
            path: path.map(Path::to_path_buf),
            base,
        };
        // Until the host shuts the controller down, ending now would be an unsafe shutdown.
        store.save(&Totals {
            clean: false,
            ..store.base.clone()
        })?;
        Ok(store)
    }

    /// Write `now` (base plus this run's counts). Atomic: a crash leaves the old or new file.
    pub fn save(&self, now: &Totals) -> Result<(), SmartError> {
        let Some(p) = &self.path else { return Ok(()) };
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, now.render())
            .and_then(|()| std::fs::rename(&tmp, p))
            .map_err(|source| SmartError::Write {
                path: p.clone(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_cycles_and_unsafe_shutdowns_persist() {
        let p = std::env::temp_dir().join(format!("rhyve-smart-{}.txt", std::process::id()));
        let _ = std::fs::remove_file(&p);
        let s = SmartStore::open(Some(&p)).unwrap();
        assert_eq!((s.base.power_cycles, s.base.unsafe_shutdowns), (1, 0));
        // Ended without CC.SHN: the next power-on counts an unsafe shutdown.
        let s = SmartStore::open(Some(&p)).unwrap();
        assert_eq!((s.base.power_cycles, s.base.unsafe_shutdowns), (2, 1));
        s.save(&Totals {
            clean: true,
            bytes_written: 4096,
            power_on_secs: 7200,
            ..s.base.clone()
        })
        .unwrap();
        let s = SmartStore::open(Some(&p)).unwrap();
        assert_eq!((s.base.power_cycles, s.base.unsafe_shutdowns), (3, 1));
        assert_eq!((s.base.bytes_written, s.base.power_on_secs), (4096, 7200));
        std::fs::remove_file(&p).unwrap();
        assert!(SmartStore::open(Some(Path::new("/nonexistent-dir/x"))).is_err());
    }
}
