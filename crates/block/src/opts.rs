//! Backend selection: [`BackendSpec`] and [`open`].

use std::path::PathBuf;
use std::sync::Arc;

use crate::{BlockBackend, BlockError, Ram, RawFile, RawFileOptions, Result};

/// What to open: a file (or block device) by path, or a RAM disk, plus options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    /// Image file or block device. Exactly one of `path` and `ram_mib` must be set.
    pub path: Option<PathBuf>,
    /// Size of a RAM disk in MiB.
    pub ram_mib: Option<u64>,
    /// Refuse writes (and open the file read-only).
    pub read_only: bool,
    /// Bypass the host page cache (`O_DIRECT`); ignored for RAM disks.
    pub direct: bool,
    /// Logical sector size reported to the guest: 512 or 4096.
    pub sector_size: u32,
}

impl Default for BackendSpec {
    fn default() -> Self {
        Self {
            path: None,
            ram_mib: None,
            read_only: false,
            direct: false,
            sector_size: 512,
        }
    }
}

impl BackendSpec {
    /// A spec for the image at `path`, with default options.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self {
            path: Some(path.into()),
            ..Self::default()
        }
    }

    /// A spec for a RAM disk of `mib` MiB, with default options.
    pub fn ram(mib: u64) -> Self {
        Self {
            ram_mib: Some(mib),
            ..Self::default()
        }
    }
}

/// Checks a sector size option: only 512 and 4096 are accepted.
pub fn validate_sector_size(sector_size: u32) -> Result<()> {
    match sector_size {
        512 | 4096 => Ok(()),
        n => Err(BlockError::Config(format!(
            "sectorsz={n} is invalid: use 512 or 4096"
        ))),
    }
}

/// Opens the backend described by `spec`.
pub fn open(spec: &BackendSpec) -> Result<Arc<dyn BlockBackend>> {
    validate_sector_size(spec.sector_size)?;
    match (&spec.path, spec.ram_mib) {
        (Some(path), None) if path.to_str().is_some_and(crate::is_nbd_uri) => {
            let uri = path.to_str().expect("checked");
            Ok(Arc::new(crate::NbdBackend::open(
                uri,
                spec.read_only,
                spec.sector_size,
            )?))
        }
        (Some(path), None) => {
            let opts = RawFileOptions {
                read_only: spec.read_only,
                direct: spec.direct,
                sector_size: spec.sector_size,
            };
            Ok(Arc::new(RawFile::open(path, &opts)?))
        }
        (None, Some(mib)) => {
            let bytes = mib
                .checked_mul(1 << 20)
                .ok_or_else(|| BlockError::Config(format!("ram={mib} MiB is too large")))?;
            let ram = Ram::new(bytes, spec.sector_size)?.with_read_only(spec.read_only);
            Ok(Arc::new(ram))
        }
        (Some(path), Some(_)) => Err(BlockError::Config(format!(
            "give either a path ({}) or a RAM disk size, not both",
            path.display()
        ))),
        (None, None) => Err(BlockError::Config(
            "no disk given: name an image path or a RAM disk size".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempFile;

    #[test]
    fn bad_sector_size_is_named() {
        let spec = BackendSpec {
            sector_size: 1000,
            ..BackendSpec::ram(1)
        };
        let err = open(&spec).err().unwrap().to_string();
        assert_eq!(err, "sectorsz=1000 is invalid: use 512 or 4096");
    }

    #[test]
    fn missing_file_error_names_path_and_os_error() {
        let spec = BackendSpec::file("/nonexistent-rhyve-dir/disk.img");
        let err = open(&spec).err().unwrap().to_string();
        assert_eq!(
            err,
            "cannot open /nonexistent-rhyve-dir/disk.img: No such file or directory"
        );
    }

    #[test]
    fn opens_files_and_ram() {
        let t = TempFile::with_len("opts", 8192);
        let be = open(&BackendSpec {
            read_only: true,
            ..BackendSpec::file(t.path())
        })
        .unwrap();
        let info = be.info();
        assert_eq!(
            (info.capacity, info.sector_size, info.read_only),
            (8192, 512, true)
        );

        let be = open(&BackendSpec {
            sector_size: 4096,
            ..BackendSpec::ram(2)
        })
        .unwrap();
        assert_eq!(be.info().capacity, 2 << 20);
        assert_eq!(be.info().sector_size, 4096);
        assert!(!be.info().read_only);
    }

    #[test]
    fn spec_must_name_exactly_one_disk() {
        let both = BackendSpec {
            ram_mib: Some(1),
            ..BackendSpec::file("x.img")
        };
        assert!(open(&both).err().unwrap().to_string().contains("not both"));
        assert!(open(&BackendSpec::default())
            .err()
            .unwrap()
            .to_string()
            .contains("no disk"));
        let huge = BackendSpec::ram(u64::MAX);
        assert!(open(&huge).err().unwrap().to_string().contains("too large"));
    }
}
