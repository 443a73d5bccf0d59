//! Tests of [`RawFile`] (and, through the shared model test, [`crate::Ram`]).

use super::*;
use crate::testutil::{Rng, TempFile};
use crate::Ram;
use std::os::unix::fs::MetadataExt;

/// Random piece lengths (some empty) that add up to `len`.
fn split_lens(rng: &mut Rng, len: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut left = len;
    while left > 0 {
        let n = match rng.below(4) {
            0 => 0,
            1 => 1 + rng.below(7) as usize,
            _ => 1 + rng.below(700) as usize,
        }
        .min(left);
        out.push(n);
        left -= n;
    }
    out.push(0);
    out
}

fn write_split(be: &dyn BlockBackend, rng: &mut Rng, off: u64, data: &[u8]) -> Result<()> {
    let mut slices = Vec::new();
    let mut rest = data;
    for n in split_lens(rng, data.len()) {
        let (a, b) = rest.split_at(n);
        slices.push(IoSlice::new(a));
        rest = b;
    }
    be.write_vectored(off, &slices)
}

fn read_split(be: &dyn BlockBackend, rng: &mut Rng, off: u64, len: usize) -> Result<Vec<u8>> {
    let mut pieces: Vec<Vec<u8>> = split_lens(rng, len)
        .into_iter()
        .map(|n| vec![0xAA; n])
        .collect();
    let mut slices: Vec<IoSliceMut<'_>> = pieces.iter_mut().map(|p| IoSliceMut::new(p)).collect();
    be.read_vectored(off, &mut slices)?;
    Ok(pieces.concat())
}

fn read_all(be: &dyn BlockBackend, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0x55; len];
    be.read_vectored(off, &mut [IoSliceMut::new(&mut v)])
        .unwrap();
    v
}

fn opts(sector_size: u32, direct: bool) -> RawFileOptions {
    RawFileOptions {
        read_only: false,
        direct,
        sector_size,
    }
}

/// A temp file of `len` random bytes; returns it and its contents.
fn random_file(dir: &Path, tag: &str, len: usize, seed: u64) -> (TempFile, Vec<u8>) {
    let t = TempFile::in_dir(dir, tag, 0).unwrap();
    let mut data = vec![0u8; len];
    Rng::new(seed).fill(&mut data);
    std::fs::write(t.path(), &data).unwrap();
    (t, data)
}

/// A directory whose filesystem accepts O_DIRECT, or `None` (with the reason printed).
fn direct_dir() -> Option<PathBuf> {
    let mut candidates = vec![std::env::temp_dir(), PathBuf::from("/var/tmp")];
    if let Ok(cwd) = std::env::current_dir() {
        candidates.push(cwd);
    }
    for dir in candidates {
        let Ok(t) = TempFile::in_dir(&dir, "probe", 8192) else {
            continue;
        };
        match RawFile::open(t.path(), &opts(512, true)) {
            Ok(f) => {
                let mut b = [0u8; 4096];
                match f.read_vectored(0, &mut [IoSliceMut::new(&mut b)]) {
                    Ok(()) => return Some(dir),
                    Err(e) => eprintln!("O_DIRECT I/O fails in {}: {e}", dir.display()),
                }
            }
            Err(e) => eprintln!("O_DIRECT open fails in {}: {e}", dir.display()),
        }
    }
    eprintln!("SKIP: no candidate directory accepts O_DIRECT (EINVAL), direct tests not run");
    None
}

/// Random reads, writes, discards and write-zeroes with odd iovec splits, checked against an
/// in-memory model of the disk.
fn model_test(be: &dyn BlockBackend, model: &mut [u8], seed: u64, ops: usize) {
    let cap = be.info().capacity;
    assert_eq!(cap, model.len() as u64);
    let ss = u64::from(be.info().sector_size);
    let mut rng = Rng::new(seed);
    for _ in 0..ops {
        let sectors = rng.below(2) == 0;
        let max_len = (3 * ss + 4096).min(cap);
        let (off, len) = if sectors {
            let n = 1 + rng.below(max_len / ss);
            let off = rng.below(cap / ss - n + 1) * ss;
            (off, n * ss)
        } else {
            let len = rng.below(max_len + 1);
            (rng.below(cap - len + 1), len)
        };
        let (o, l) = (off as usize, len as usize);
        match rng.below(10) {
            0..=3 => {
                let mut data = vec![0u8; l];
                rng.fill(&mut data);
                write_split(be, &mut rng, off, &data).unwrap();
                model[o..o + l].copy_from_slice(&data);
            }
            4..=7 => {
                let got = read_split(be, &mut rng, off, l).unwrap();
                assert!(got == model[o..o + l], "read mismatch at {off} len {len}");
            }
            8 => {
                be.discard(off, len).unwrap();
                model[o..o + l].fill(0);
            }
            _ => {
                be.write_zeroes(off, len).unwrap();
                model[o..o + l].fill(0);
            }
        }
    }
    assert!(
        read_all(be, 0, cap as usize) == model,
        "final image differs from the model"
    );
}

#[test]
fn model_buffered_512_and_4096() {
    for ss in [512u32, 4096] {
        let (t, mut data) = random_file(&std::env::temp_dir(), "model", 256 << 10, u64::from(ss));
        let f = RawFile::open(t.path(), &opts(ss, false)).unwrap();
        assert_eq!(f.direct_alignment(), None);
        model_test(&f, &mut data, 7 + u64::from(ss), 400);
        f.flush().unwrap();
        drop(f);
        assert!(std::fs::read(t.path()).unwrap() == data);
    }
}

#[test]
fn model_ram() {
    let ram = Ram::new(1 << 20, 512).unwrap();
    let mut model = vec![0u8; 1 << 20];
    model_test(&ram, &mut model, 99, 600);
}

#[test]
fn model_direct_unaligned_buffers_and_offsets() {
    let Some(dir) = direct_dir() else { return };
    // Kernel-reported alignment, then a forced 4096-byte alignment with 512-byte sectors so
    // that sector-sized requests need read-modify-write; odd file sizes exercise the tail.
    let cases: [(u32, Option<u64>, usize); 4] = [
        (512, None, 256 << 10),
        (4096, None, 256 << 10),
        (512, Some(4096), (256 << 10) + 13 * 512),
        (512, Some(4096), (64 << 10) + 512 + 100),
    ];
    for (i, (ss, force, size)) in cases.into_iter().enumerate() {
        let (t, data) = random_file(&dir, "direct", size, 1000 + i as u64);
        let f = RawFile::open_with_align(t.path(), &opts(ss, true), force).unwrap();
        assert!(f.direct_alignment().unwrap() >= u64::from(ss));
        let cap = f.info().capacity as usize;
        assert_eq!(cap, size / ss as usize * ss as usize);
        let mut model = data[..cap].to_vec();
        model_test(&f, &mut model, 42 + i as u64, 400);
        // Direct writes of partial tail blocks must not change the file's length, and the
        // bytes past the capacity stay as they were.
        let mut tail = vec![0u8; 512];
        Rng::new(5).fill(&mut tail);
        let last = cap as u64 - 512;
        f.write_vectored(
            last,
            &[IoSlice::new(&tail[..100]), IoSlice::new(&tail[100..])],
        )
        .unwrap();
        model[cap - 512..].copy_from_slice(&tail);
        f.write_vectored(0, &[IoSlice::new(&tail[..1])]).unwrap(); // an unaligned single byte
        model[0] = tail[0];
        drop(f);
        let on_disk = std::fs::read(t.path()).unwrap();
        assert_eq!(on_disk.len(), size, "direct write changed the file size");
        assert!(on_disk[..cap] == model[..]);
        assert!(on_disk[cap..] == data[cap..]);
    }
}

#[test]
fn direct_rmw_of_neighbouring_sectors_is_not_lost() {
    let Some(dir) = direct_dir() else { return };
    let t = TempFile::in_dir(&dir, "rmw", 64 << 10).unwrap();
    let f = std::sync::Arc::new(
        RawFile::open_with_align(t.path(), &opts(512, true), Some(4096)).unwrap(),
    );
    let threads: Vec<_> = (0..8u8)
        .map(|i| {
            let f = std::sync::Arc::clone(&f);
            std::thread::spawn(move || {
                for round in 0..50u8 {
                    // Thread i owns sector i of every 4 KiB block: all RMW the same blocks.
                    for blk in 0..16u64 {
                        let v = [i.wrapping_mul(31).wrapping_add(round); 512];
                        f.write_vectored(blk * 4096 + u64::from(i) * 512, &[IoSlice::new(&v)])
                            .unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let all = read_all(&*f, 0, 64 << 10);
    for blk in 0..16usize {
        for i in 0..8u8 {
            let s = blk * 4096 + usize::from(i) * 512;
            assert!(all[s..s + 512]
                .iter()
                .all(|&b| b == i.wrapping_mul(31).wrapping_add(49)));
        }
    }
}

#[test]
fn many_iovecs_beyond_iov_max() {
    let t = TempFile::with_len("iovmax", 64 << 10);
    let f = RawFile::open(t.path(), &opts(512, false)).unwrap();
    let mut data = vec![0u8; 3000];
    Rng::new(3).fill(&mut data);
    let slices: Vec<IoSlice<'_>> = data.chunks(1).map(IoSlice::new).collect();
    f.write_vectored(777, &slices).unwrap();
    let mut back = vec![0u8; 3000];
    let mut rs: Vec<IoSliceMut<'_>> = back.chunks_mut(1).map(IoSliceMut::new).collect();
    f.read_vectored(777, &mut rs).unwrap();
    assert_eq!(back, data);
}

#[test]
fn read_only_refuses_writes_and_leaves_file_alone() {
    let (t, data) = random_file(&std::env::temp_dir(), "ro", 8192, 11);
    let f = RawFile::open(
        t.path(),
        &RawFileOptions {
            read_only: true,
            ..opts(512, false)
        },
    )
    .unwrap();
    assert!(f.info().read_only);
    assert!(matches!(
        f.write_vectored(0, &[IoSlice::new(&[1; 512])]),
        Err(BlockError::ReadOnly)
    ));
    assert!(matches!(f.discard(0, 4096), Err(BlockError::ReadOnly)));
    assert!(matches!(f.write_zeroes(0, 4096), Err(BlockError::ReadOnly)));
    assert_eq!(read_all(&f, 0, 8192), data);
    f.flush().unwrap();
    assert_eq!(std::fs::read(t.path()).unwrap(), data);
    let s = f.stats();
    assert_eq!(
        (s.errors, s.read_ops, s.read_bytes, s.write_ops, s.flushes),
        (3, 1, 8192, 0, 1)
    );
}

#[test]
fn out_of_range_is_refused() {
    let t = TempFile::with_len("oor", 8192);
    let f = RawFile::open(t.path(), &opts(4096, false)).unwrap();
    let mut b = [0u8; 2];
    let r = f.read_vectored(8191, &mut [IoSliceMut::new(&mut b)]);
    assert!(matches!(
        r,
        Err(BlockError::OutOfRange {
            offset: 8191,
            len: 2,
            capacity: 8192
        })
    ));
    assert!(matches!(
        f.write_vectored(8192, &[IoSlice::new(&[1])]),
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(matches!(
        f.discard(4096, 4097),
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(matches!(
        f.write_zeroes(u64::MAX, 2),
        Err(BlockError::OutOfRange { .. })
    ));
    // Empty requests at the very end are fine.
    f.read_vectored(8192, &mut []).unwrap();
    f.write_vectored(8192, &[]).unwrap();
    f.discard(8192, 0).unwrap();
    assert_eq!(std::fs::metadata(t.path()).unwrap().len(), 8192);
    assert_eq!(f.stats().errors, 4);
}

#[test]
fn discard_reads_zero_and_punches_holes() {
    let (t, data) = random_file(&std::env::temp_dir(), "discard", 1 << 20, 21);
    let f = RawFile::open(t.path(), &opts(512, false)).unwrap();
    f.flush().unwrap();
    let before = std::fs::metadata(t.path()).unwrap().blocks();
    f.discard(256 << 10, 512 << 10).unwrap();
    // An unaligned discard zeroes exactly its bytes.
    f.discard(100, 1000).unwrap();
    f.flush().unwrap();
    let mut model = data.clone();
    model[256 << 10..768 << 10].fill(0);
    model[100..1100].fill(0);
    assert!(read_all(&f, 0, 1 << 20) == model);
    let after = std::fs::metadata(t.path()).unwrap().blocks();
    if f.can_punch.load(Relaxed) {
        assert!(
            after + 1000 <= before,
            "st_blocks {before} -> {after}: no hole punched"
        );
    } else {
        eprintln!("SKIP sparse check: the temp filesystem cannot punch holes");
    }
    assert_eq!(std::fs::metadata(t.path()).unwrap().len(), 1 << 20);
    assert_eq!(f.stats().discards, 2);
}

#[test]
fn write_zeroes_and_its_fallbacks() {
    for direct in [false, true] {
        let dir = if direct {
            match direct_dir() {
                Some(d) => d,
                None => continue,
            }
        } else {
            std::env::temp_dir()
        };
        let (t, data) = random_file(&dir, "wz", 256 << 10, 31);
        let f = RawFile::open(t.path(), &opts(512, direct)).unwrap();
        let mut model = data.clone();
        f.write_zeroes(4096, 8192).unwrap();
        model[4096..12288].fill(0);
        f.write_zeroes(12345, 3).unwrap();
        model[12345..12348].fill(0);
        assert!(read_all(&f, 0, 256 << 10) == model);
        // Without fallocate: explicit zero writes, across the zero-buffer chunking.
        f.can_zero_range.store(false, Relaxed);
        f.can_punch.store(false, Relaxed);
        f.write_zeroes(1000, (200 << 10) + 7).unwrap();
        model[1000..1000 + (200 << 10) + 7].fill(0);
        f.discard(250 << 10, 100).unwrap();
        model[250 << 10..(250 << 10) + 100].fill(0);
        assert!(read_all(&f, 0, 256 << 10) == model);
        let s = f.stats();
        assert_eq!((s.write_zeroes, s.discards, s.errors), (3, 1, 0));
    }
}

#[test]
fn unaligned_file_size_rounds_capacity_down() {
    let (t, data) = random_file(&std::env::temp_dir(), "odd", 5000, 41);
    let f = RawFile::open(t.path(), &opts(512, false)).unwrap();
    assert_eq!(f.info().capacity, 4608);
    assert_eq!(read_all(&f, 4096, 512), data[4096..4608]);
    assert!(f
        .read_vectored(4608, &mut [IoSliceMut::new(&mut [0u8; 1])])
        .is_err());
    let f = RawFile::open(t.path(), &opts(4096, false)).unwrap();
    assert_eq!(f.info().capacity, 4096);
    assert_eq!(f.info().sector_size, 4096);

    let small = TempFile::with_len("small", 100);
    let e = RawFile::open(small.path(), &opts(512, false))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&small.path().display().to_string()) && e.contains("smaller than one"),
        "{e}"
    );
}

#[test]
fn reads_past_a_shrunken_end_of_file_are_zero() {
    let (t, data) = random_file(&std::env::temp_dir(), "shrunk", 16384, 51);
    let f = RawFile::open(t.path(), &opts(512, false)).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(t.path())
        .unwrap()
        .set_len(10000)
        .unwrap();
    let got = read_all(&f, 8192, 8192);
    assert_eq!(got[..1808], data[8192..10000]);
    assert!(got[1808..].iter().all(|&b| b == 0));
}

#[test]
fn open_errors_name_the_path() {
    let dir = std::env::temp_dir().join("rhyve-block-no-such-dir");
    let p = dir.join("disk.img");
    let e = RawFile::open(&p, &opts(512, false))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        format!("cannot open {}: No such file or directory", p.display())
    );

    let t = TempFile::with_len("sz", 4096);
    let e = RawFile::open(t.path(), &opts(1000, false))
        .unwrap_err()
        .to_string();
    assert_eq!(e, "sectorsz=1000 is invalid: use 512 or 4096");

    // tmpfs refuses O_DIRECT; where one is mounted, the message says so.
    if let Ok(t) = TempFile::in_dir(Path::new("/dev/shm"), "shm", 4096) {
        match RawFile::open(t.path(), &opts(512, true)) {
            Err(e) => {
                let e = e.to_string();
                assert!(
                    e.starts_with(&format!("cannot open {}: ", t.path().display())),
                    "{e}"
                );
                assert!(e.contains("O_DIRECT"), "{e}");
            }
            Ok(_) => eprintln!("note: /dev/shm accepts O_DIRECT here"),
        }
    }
}

#[test]
fn stats_count_bytes_and_ops() {
    let t = TempFile::with_len("stats", 65536);
    let f = RawFile::open(t.path(), &opts(512, false)).unwrap();
    f.write_vectored(0, &[IoSlice::new(&[1; 1024]), IoSlice::new(&[2; 512])])
        .unwrap();
    read_all(&f, 0, 4096);
    read_all(&f, 512, 512);
    f.flush().unwrap();
    f.discard(0, 512).unwrap();
    f.write_zeroes(512, 512).unwrap();
    let s = f.stats();
    assert_eq!(
        s,
        StatsSnapshot {
            read_ops: 2,
            read_bytes: 4608,
            write_ops: 1,
            write_bytes: 1536,
            flushes: 1,
            discards: 1,
            write_zeroes: 1,
            errors: 0
        }
    );
}
