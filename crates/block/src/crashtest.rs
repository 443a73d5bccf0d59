//! Crash-durability campaigns for device models (feature `test-support`).
//!
//! A test re-runs its own binary as a *child* that drives a device model over an image file:
//! it writes self-describing 4 KiB blocks, flushes now and then, and reports on stdout every
//! write the device acknowledged and every flush that completed. The *parent* kills the child
//! with SIGKILL at a random moment, then reads the image: every write that was acknowledged and
//! then covered by a completed flush (or was itself FUA) must be there, or a later write of the
//! same block. Acknowledged writes no flush covered may be lost; they are counted, not failed.
//!
//! Blocks name their own LBA and write number, and carry a pattern derived from both, so a
//! block is either empty, exactly one write, or corrupt.
//!
//! Killing a process keeps what it wrote to the page cache, so on a plain image file a kill only
//! shows that nothing is acknowledged before it reaches the kernel. The second mode puts a
//! [`VolatileCache`] in front of the file: writes stay in the child's memory until a flush, so
//! the kill is a power cut, and a Flush or FUA that does not reach the backend loses data.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};

use crate::BlockBackend;
use std::time::{Duration, Instant};

/// Size of one test block.
pub const BLOCK: usize = 4096;
const MAGIC: &[u8; 8] = b"RHYVECRS";
/// Environment variables that turn a test into the child.
const ENV_IMAGE: &str = "RHYVE_CRASH_IMAGE";
const ENV_SEQ: &str = "RHYVE_CRASH_SEQ_BASE";
const ENV_SEED: &str = "RHYVE_CRASH_SEED";
const ENV_CACHE: &str = "RHYVE_CRASH_CACHE";
/// A child stops on its own after this long (an orphan must not write forever).
pub const CHILD_LIFETIME: Duration = Duration::from_secs(30);
/// Test blocks in a campaign's image (16 MiB).
pub const BLOCKS: u64 = 4096;
/// Kills per campaign.
pub const RUNS: usize = 100;
/// Writes a child keeps in flight.
pub const DEPTH: usize = 24;
/// A child flushes after this many acknowledged writes.
pub const FLUSH_EVERY: u64 = 40;

/// The content of block `lba` as written by write number `seq` (never 0).
pub fn pattern(lba: u64, seq: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    b[..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&lba.to_le_bytes());
    b[16..24].copy_from_slice(&seq.to_le_bytes());
    let mut x = lba.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seq | 1;
    for chunk in b[24..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = chunk.len();
        chunk.copy_from_slice(&x.to_le_bytes()[..n]);
    }
    b
}

/// What a block of the image holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// Never written (all zeros).
    Empty,
    /// Exactly write number `seq` of this block.
    Write(u64),
    /// Anything else.
    Corrupt,
}

/// Classify block `lba`'s bytes.
pub fn parse(lba: u64, data: &[u8]) -> Found {
    if data.iter().all(|&b| b == 0) {
        return Found::Empty;
    }
    if data.len() != BLOCK || &data[..8] != MAGIC {
        return Found::Corrupt;
    }
    let seq = u64::from_le_bytes(data[16..24].try_into().expect("8 bytes"));
    if seq != 0 && data == pattern(lba, seq).as_slice() {
        Found::Write(seq)
    } else {
        Found::Corrupt
    }
}

/// What the child is to do, when this process is one.
#[derive(Clone, Debug)]
pub struct ChildArgs {
    /// The image to write.
    pub image: PathBuf,
    /// Write numbers start above this (so they grow across runs).
    pub seq_base: u64,
    /// Seed for the child's choices.
    pub seed: u64,
    /// Put a [`VolatileCache`] in front of the image (power-cut mode).
    pub cache: bool,
}

impl ChildArgs {
    /// The child's disk: the image file, or the image behind a volatile cache.
    pub fn backend(&self) -> Arc<dyn BlockBackend> {
        if self.cache {
            Arc::new(VolatileCache::open(&self.image).expect("open the image"))
        } else {
            Arc::new(
                crate::RawFile::open(&self.image, &crate::RawFileOptions::default())
                    .expect("open the image"),
            )
        }
    }
}

/// A disk with a volatile write cache in front of an image file: writes stay in this process's
/// memory until a flush writes them out and syncs the file. Killing the process loses what no
/// flush covered, as a power cut loses a drive's cache.
pub struct VolatileCache {
    file: std::fs::File,
    capacity: u64,
    /// Dirty 512-byte sectors.
    dirty: Mutex<BTreeMap<u64, Box<[u8; SECTOR]>>>,
}

const SECTOR: usize = 512;

impl VolatileCache {
    /// Cache in front of `path`.
    pub fn open(path: &Path) -> std::io::Result<VolatileCache> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        let capacity = file.metadata()?.len() / SECTOR as u64 * SECTOR as u64;
        Ok(VolatileCache {
            file,
            capacity,
            dirty: Mutex::new(BTreeMap::new()),
        })
    }

    fn check(&self, offset: u64, len: u64) -> crate::Result<()> {
        let end = offset.checked_add(len);
        if !offset.is_multiple_of(SECTOR as u64)
            || !len.is_multiple_of(SECTOR as u64)
            || end.is_none_or(|e| e > self.capacity)
        {
            return Err(crate::BlockError::OutOfRange {
                offset,
                len,
                capacity: self.capacity,
            });
        }
        Ok(())
    }

    fn put(&self, offset: u64, data: &[u8]) {
        let mut d = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        for (i, s) in data.chunks(SECTOR).enumerate() {
            let mut b = Box::new([0u8; SECTOR]);
            b.copy_from_slice(s);
            d.insert(offset / SECTOR as u64 + i as u64, b);
        }
    }
}

impl BlockBackend for VolatileCache {
    fn info(&self) -> crate::BackendInfo {
        crate::BackendInfo {
            capacity: self.capacity,
            sector_size: SECTOR as u32,
            read_only: false,
            discard_zeroes: true,
        }
    }
    fn read_vectored(
        &self,
        offset: u64,
        bufs: &mut [std::io::IoSliceMut<'_>],
    ) -> crate::Result<()> {
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        self.check(offset, len as u64)?;
        let mut data = vec![0u8; len];
        self.file.read_exact_at(&mut data, offset)?;
        {
            let d = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
            let first = offset / SECTOR as u64;
            for (s, b) in d.range(first..first + (len / SECTOR) as u64) {
                let at = (s - first) as usize * SECTOR;
                data[at..at + SECTOR].copy_from_slice(&b[..]);
            }
        }
        let mut at = 0;
        for b in bufs.iter_mut() {
            let n = b.len();
            b.copy_from_slice(&data[at..at + n]);
            at += n;
        }
        Ok(())
    }
    fn write_vectored(&self, offset: u64, bufs: &[std::io::IoSlice<'_>]) -> crate::Result<()> {
        let data: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        self.check(offset, data.len() as u64)?;
        self.put(offset, &data);
        Ok(())
    }
    fn flush(&self) -> crate::Result<()> {
        let mut d = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        // Runs of adjacent sectors go out in one write each, so a 4 KiB page is written whole
        // (a kill cuts a write only between pages): a drive whose atomic write unit is a page.
        let mut run: Vec<u8> = Vec::new();
        let mut start = 0u64;
        for (&s, b) in d.iter() {
            if !run.is_empty() && start + (run.len() / SECTOR) as u64 != s {
                self.file.write_all_at(&run, start * SECTOR as u64)?;
                run.clear();
            }
            if run.is_empty() {
                start = s;
            }
            run.extend_from_slice(&b[..]);
        }
        if !run.is_empty() {
            self.file.write_all_at(&run, start * SECTOR as u64)?;
        }
        self.file.sync_data()?;
        d.clear();
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> crate::Result<()> {
        self.write_zeroes(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> crate::Result<()> {
        self.check(offset, len)?;
        let zero = [0u8; SECTOR];
        let mut d = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        for s in offset / SECTOR as u64..(offset + len) / SECTOR as u64 {
            d.insert(s, Box::new(zero));
        }
        Ok(())
    }
}

/// `Some` when this process was started as a campaign's child.
pub fn child_args() -> Option<ChildArgs> {
    let image = std::env::var_os(ENV_IMAGE)?;
    let num = |k: &str| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Some(ChildArgs {
        image: image.into(),
        seq_base: num(ENV_SEQ),
        seed: num(ENV_SEED) | 1,
        cache: num(ENV_CACHE) != 0,
    })
}

/// One write the child is to make.
#[derive(Clone, Debug)]
pub struct BlockWrite {
    /// Block number.
    pub lba: u64,
    /// Write number.
    pub seq: u64,
    /// With Force Unit Access.
    pub fua: bool,
    /// The block's new content ([`pattern`]).
    pub data: Vec<u8>,
}

/// The child's side: it picks the writes (a random block with no write in flight, some FUA) and
/// reports to the parent, one line per event on stdout.
#[derive(Debug)]
pub struct Journal {
    acks: u64,
    rng: Rng,
    busy: Vec<bool>,
    seq: u64,
    /// One write in this many is FUA.
    fua_one_in: u64,
}

impl Journal {
    /// The journal of a child started with `a`.
    pub fn new(a: &ChildArgs) -> Journal {
        Journal {
            acks: 0,
            rng: Rng::new(a.seed),
            busy: vec![false; BLOCKS as usize],
            seq: a.seq_base,
            // Behind a volatile cache a FUA write flushes everything before it: rare, so that
            // what only a Flush command covers is at stake between them.
            fua_one_in: if a.cache { 200 } else { 8 },
        }
    }

    /// The next write; its block has no other write in flight until it is acknowledged.
    pub fn next_write(&mut self) -> BlockWrite {
        let lba = loop {
            let l = self.rng.below(BLOCKS);
            if !self.busy[l as usize] {
                break l;
            }
        };
        self.busy[lba as usize] = true;
        self.seq += 1;
        let fua = self.rng.below(self.fua_one_in) == 0;
        BlockWrite {
            lba,
            seq: self.seq,
            fua,
            data: pattern(lba, self.seq),
        }
    }

    fn line(&self, s: &str) {
        let mut out = std::io::stdout().lock();
        // The parent reads lines as they come; a line cut short by the kill is ignored.
        let _ = writeln!(out, "CRASH {s}");
        let _ = out.flush();
    }

    /// Set-up is done; writes begin.
    pub fn ready(&mut self) {
        self.line("READY");
    }

    /// The device acknowledged write `seq` of block `lba` (`fua`: with Force Unit Access).
    pub fn acked(&mut self, seq: u64, lba: u64, fua: bool) {
        if let Some(b) = self.busy.get_mut(lba as usize) {
            *b = false;
        }
        self.acks += 1;
        self.line(&format!("{} {seq} {lba}", if fua { "F" } else { "A" }));
    }

    /// Writes acknowledged so far: what a flush submitted now covers.
    pub fn acks(&self) -> u64 {
        self.acks
    }

    /// A flush submitted when `covers` writes had been acknowledged has completed.
    pub fn flushed(&mut self, covers: u64) {
        self.line(&format!("D {covers}"));
    }
}

/// A small deterministic generator for the child's and the parent's choices.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// From a seed (any value).
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// The outcome of a campaign.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Kills.
    pub runs: usize,
    /// Writes acknowledged, over all runs.
    pub acked: u64,
    /// Flushes that completed.
    pub flushes: u64,
    /// Blocks with a durable write, checked after the last kill (summed over runs).
    pub durable_checked: u64,
    /// Durable writes missing after a kill (must be 0).
    pub durable_lost: u64,
    /// Acknowledged writes no flush covered that were missing after a kill (allowed).
    pub unflushed_lost: u64,
    /// Blocks that were neither empty nor one whole write.
    pub corrupt: u64,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} kills: {} writes acknowledged, {} flushes; durable blocks checked {}, \
             durable writes lost {}, unflushed writes lost {}, corrupt blocks {}",
            self.runs,
            self.acked,
            self.flushes,
            self.durable_checked,
            self.durable_lost,
            self.unflushed_lost,
            self.corrupt
        )
    }
}

/// A device's crash test: in the child (see [`child_args`]) run `child`, else the campaign
/// with [`assert_durable`].
///
/// With `cache`, the child's disk is a [`VolatileCache`] (a power cut): then some unflushed
/// writes must be lost, or the test could not tell a flush that does nothing.
pub fn child_or_campaign(device: &str, test: &str, seed: u64, cache: bool, child: fn(ChildArgs)) {
    match child_args() {
        Some(a) => child(a),
        None => assert_durable(device, test, seed, cache),
    }
}

/// The whole parent side of a device's crash test: a fresh image of [`BLOCKS`] blocks,
/// [`RUNS`] kills of test `test`'s child, and the verdict (no durable write lost, no corrupt
/// block), printed with `device`'s name.
pub fn assert_durable(device: &str, test: &str, seed: u64, cache: bool) {
    let (blocks, runs) = (BLOCKS, RUNS);
    let image = std::env::temp_dir().join(format!(
        "rhyve-crash-{}-{}-{}.img",
        device.to_lowercase(),
        u8::from(cache),
        std::process::id()
    ));
    struct Remove<'a>(&'a Path);
    impl Drop for Remove<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(self.0);
        }
    }
    let _cleanup = Remove(&image);
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(blocks * BLOCK as u64))
        .expect("create the image");
    let r = campaign(test, &image, blocks, runs, seed, cache);
    let mode = if cache {
        "power cut (volatile cache)"
    } else {
        "SIGKILL"
    };
    eprintln!("{device} crash durability, {mode}: {r}");
    if cache {
        assert!(
            r.unflushed_lost > 0,
            "a power cut lost no unflushed write: the cache is not volatile ({r})"
        );
    }
    assert!(r.flushes > 0 && r.durable_checked > 0, "{r}");
    assert_eq!(r.durable_lost, 0, "{r}");
    assert_eq!(r.corrupt, 0, "{r}");
}

/// Run `runs` child/kill/check rounds of test `test` (this binary's test of that exact name)
/// against `image` (`blocks` 4 KiB blocks, already created).
pub fn campaign(
    test: &str,
    image: &Path,
    blocks: u64,
    runs: usize,
    seed: u64,
    cache: bool,
) -> Report {
    let exe = std::env::current_exe().expect("test binary path");
    let mut rng = Rng::new(seed);
    let mut durable = vec![0u64; blocks as usize];
    let mut acked = vec![0u64; blocks as usize];
    let mut report = Report {
        runs,
        ..Report::default()
    };
    for run in 0..runs {
        let mut child = Command::new(&exe)
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(ENV_IMAGE, image)
            .env(ENV_CACHE, u8::from(cache).to_string())
            .env(ENV_SEQ, ((run as u64 + 1) << 32).to_string())
            .env(ENV_SEED, rng.next_u64().to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the child");
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        let reader = std::thread::spawn(move || read_events(stdout, tx));
        // Wait for the child to start writing, let it run a random while, then kill it.
        let t0 = Instant::now();
        let mut events = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(Event::Ready) => break,
                Ok(e) => events.push(e),
                Err(_) => {
                    let _ = child.kill();
                    panic!("run {run}: the child never got ready ({:?})", t0.elapsed());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5 + rng.below(150)));
        child.kill().expect("SIGKILL the child");
        let _ = child.wait();
        reader.join().expect("reader thread");
        events.extend(rx.try_iter());
        // Apply the events in order.
        let mut acks: Vec<(u64, u64)> = Vec::new();
        for e in events {
            match e {
                Event::Ready => {}
                Event::Ack { seq, lba, fua } => {
                    let i = lba as usize;
                    assert!(i < acked.len(), "run {run}: child wrote block {lba}");
                    acked[i] = acked[i].max(seq);
                    if fua {
                        durable[i] = durable[i].max(seq);
                    }
                    acks.push((seq, lba));
                    report.acked += 1;
                }
                Event::Flushed { covers } => {
                    for &(seq, lba) in acks.iter().take(covers as usize) {
                        let i = lba as usize;
                        durable[i] = durable[i].max(seq);
                    }
                    report.flushes += 1;
                }
            }
        }
        check(image, &durable, &acked, run, &mut report);
    }
    report
}

fn check(image: &Path, durable: &[u64], acked: &[u64], run: usize, report: &mut Report) {
    let f = std::fs::File::open(image).expect("open the image");
    let mut buf = vec![0u8; BLOCK];
    for (lba, (&d, &a)) in durable.iter().zip(acked).enumerate() {
        f.read_exact_at(&mut buf, lba as u64 * BLOCK as u64)
            .expect("read the image");
        let found = parse(lba as u64, &buf);
        let on_disk = match found {
            Found::Empty => 0,
            Found::Write(s) => s,
            Found::Corrupt => {
                report.corrupt += 1;
                0
            }
        };
        if d > 0 {
            report.durable_checked += 1;
            if on_disk < d {
                report.durable_lost += 1;
                if report.durable_lost <= 10 {
                    eprintln!("run {run}: block {lba}: durable write {d:#x} lost, found {found:?}");
                }
            }
        }
        if a > d && on_disk < a {
            report.unflushed_lost += 1;
        }
    }
}

#[derive(Debug)]
enum Event {
    Ready,
    Ack { seq: u64, lba: u64, fua: bool },
    Flushed { covers: u64 },
}

fn read_events(stdout: impl Read, tx: mpsc::Sender<Event>) {
    let mut r = BufReader::new(stdout);
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !line.ends_with('\n') {
            return; // cut short by the kill
        }
        // The test harness prints around our lines (and may leave its own unfinished).
        let Some(at) = line.find("CRASH ") else {
            continue;
        };
        let mut w = line[at..].split_whitespace();
        w.next();
        let n = |w: &mut std::str::SplitWhitespace<'_>| w.next().and_then(|x| x.parse().ok());
        let e = match w.next() {
            Some("READY") => Some(Event::Ready),
            Some(k @ ("A" | "F")) => match (n(&mut w), n(&mut w)) {
                (Some(seq), Some(lba)) => Some(Event::Ack {
                    seq,
                    lba,
                    fua: k == "F",
                }),
                _ => None,
            },
            Some("D") => n(&mut w).map(|covers| Event::Flushed { covers }),
            _ => None,
        };
        if let Some(e) = e {
            if tx.send(e).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_describe_themselves() {
        let b = pattern(7, 99);
        assert_eq!(parse(7, &b), Found::Write(99));
        assert_eq!(parse(8, &b), Found::Corrupt, "another block's write");
        let mut torn = b.clone();
        torn[2048..].copy_from_slice(&pattern(7, 100)[2048..]);
        assert_eq!(parse(7, &torn), Found::Corrupt);
        assert_eq!(parse(7, &[0u8; BLOCK]), Found::Empty);
    }
}
