//! Live migration between two rhyve processes over a UNIX or TCP socket.
//!
//! The destination (`rhyve run --migrate-receive URL`) listens; the source (`rhyve ctl
//! migrate-send URL`) connects and sends, in order:
//!
//! 1. a header: `RHYVEMIG`, the protocol version, the machine's [`SavedConfig`];
//! 2. pre-copy: all of RAM while the guest runs, then the pages written since, round after
//!    round. KVM's dirty log says which pages the vCPUs wrote;
//! 3. the stop: the vCPUs and devices pause (devices finish their I/O and flush), and the pages
//!    written since the last round follow. Devices write guest memory from userspace and the
//!    kernel (io_uring), which KVM's dirty log does not see, so this last round also compares
//!    every page with a hash taken when it was sent;
//! 4. the [`VmState`], as in a snapshot.
//!
//! The destination builds the VM from that, answers `{"status":"running"}` and starts the
//! vCPUs; only then does the source stop (its VM exits with [`crate::VmExit::Migrated`]). If the
//! destination fails or goes away, the source resumes the guest and reports why. The downtime
//! is from the pause to that answer.
//!
//! Messages after the header: a tag byte, then `RAM`: file offset (u64, the order of the RAM
//! memfd and of a snapshot's `memory` file), length (u32), bytes; `STATE`: length (u32), JSON.
//! Integers are little-endian. Every offset and length from the wire is checked.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::snapshot::{Ram, Restore, SavedConfig, Snapshotter, VmState, SNAPSHOT_VERSION};

/// First bytes on the wire.
pub const MAGIC: &[u8; 8] = b"RHYVEMIG";
/// Protocol version.
pub const VERSION: u32 = 1;

const TAG_RAM: u8 = 1;
const TAG_STATE: u8 = 2;
const PAGE: usize = 4096;
/// Most bytes in one RAM message.
const RUN_MAX: usize = 1 << 20;
/// Pre-copy rounds at most, and the dirty-page count that ends them early.
const MAX_ROUNDS: usize = 8;
const CONVERGED_PAGES: usize = 256;
/// Largest header or state message accepted.
const MAX_JSON: u32 = 64 << 20;
/// How long the destination waits for the next bytes of a stream that has begun.
const STALL: Duration = Duration::from_secs(60);
/// How long the source waits for the destination to say it runs.
const ACK_WAIT: Duration = Duration::from_secs(120);

/// Where to migrate: `unix:PATH` or `tcp:HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Url {
    /// A UNIX socket path.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(String),
}

impl Url {
    /// Parse `unix:PATH` or `tcp:HOST:PORT`.
    pub fn parse(s: &str) -> Result<Url, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(format!("migration URL {s:?}: no socket path"));
            }
            return Ok(Url::Unix(PathBuf::from(p)));
        }
        if let Some(a) = s.strip_prefix("tcp:") {
            if a.rsplit_once(':')
                .is_none_or(|(_, port)| port.parse::<u16>().is_err())
            {
                return Err(format!("migration URL {s:?}: expected tcp:HOST:PORT"));
            }
            return Ok(Url::Tcp(a.to_string()));
        }
        Err(format!(
            "migration URL {s:?}: expected unix:PATH or tcp:HOST:PORT"
        ))
    }
}

/// A connected migration stream.
enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn set_read_timeout(&self, d: Option<Duration>) {
        let _ = match self {
            Conn::Unix(s) => s.set_read_timeout(d),
            Conn::Tcp(s) => s.set_read_timeout(d),
        };
    }
}

impl Read for Conn {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(b),
            Conn::Tcp(s) => s.read(b),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(b),
            Conn::Tcp(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Unix(s) => s.flush(),
            Conn::Tcp(s) => s.flush(),
        }
    }
}

/// What a migration took.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// From the pause to the destination running, in milliseconds.
    pub downtime_ms: u64,
    /// The whole migration.
    pub total_ms: u64,
    /// Pre-copy rounds after the first full pass.
    pub rounds: usize,
    /// RAM bytes sent, all rounds.
    pub ram_bytes: u64,
    /// Pages sent while paused.
    pub final_pages: usize,
    /// Whether KVM's dirty log was used (else every round compared hashes).
    pub dirty_log: bool,
    /// Where the downtime went (ms): pausing vCPUs and devices, finding and sending the last
    /// pages, saving and sending the state, the destination building and starting the VM.
    pub downtime_parts: [u64; 4],
}

/// A page's fingerprint, to find pages changed behind KVM's dirty log. Four independent lanes
/// keep the multiplies from waiting on each other: the scan runs at memory speed.
fn page_hash(b: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h = [0xcbf2_9ce4_8422_2325u64, 1, 2, 3];
    for w in b.chunks_exact(32) {
        for (i, lane) in h.iter_mut().enumerate() {
            let v = u64::from_le_bytes(w[8 * i..8 * i + 8].try_into().expect("8 bytes"));
            *lane = (*lane ^ v).wrapping_mul(K).rotate_left(31);
        }
    }
    h.iter()
        .fold(0u64, |acc, &x| (acc ^ x).wrapping_mul(K).rotate_left(27))
}

/// Guest RAM as the file offsets of the memfd: (offset, guest address, length) per region.
fn layout(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u64)> {
    let mut off = 0;
    mem.iter()
        .map(|r| {
            let e = (off, r.start_addr().0, r.len());
            off += r.len();
            e
        })
        .collect()
}

/// The sending side's view of RAM.
struct Sender<'a> {
    mem: &'a GuestMemoryMmap,
    regions: Vec<(u64, u64, u64)>,
    hashes: Vec<u64>,
    conn: &'a mut Conn,
    bytes: u64,
}

impl Sender<'_> {
    fn page_addr(&self, page: usize) -> GuestAddress {
        let off = (page * PAGE) as u64;
        let (f, g, _) = self
            .regions
            .iter()
            .rev()
            .find(|(f, _, _)| *f <= off)
            .copied()
            .expect("page inside RAM");
        GuestAddress(g + off - f)
    }

    fn read_page(&self, page: usize, buf: &mut [u8]) -> Result<(), String> {
        self.mem
            .read_slice(buf, self.page_addr(page))
            .map_err(|e| format!("guest RAM: {e}"))
    }

    /// Send `pages` (sorted), batching neighbours; `skip_zero` leaves out never-written pages.
    fn send(&mut self, pages: &[usize], skip_zero: bool) -> Result<(), String> {
        let mut run: Vec<u8> = Vec::with_capacity(RUN_MAX);
        let mut start = 0usize;
        let mut page = vec![0u8; PAGE];
        for &p in pages {
            self.read_page(p, &mut page)?;
            let h = page_hash(&page);
            self.hashes[p] = h;
            if skip_zero && page.iter().all(|&b| b == 0) {
                continue;
            }
            if !run.is_empty() && (p != start + run.len() / PAGE || run.len() >= RUN_MAX) {
                self.flush_run(start, &run)?;
                run.clear();
            }
            if run.is_empty() {
                start = p;
            }
            run.extend_from_slice(&page);
        }
        if !run.is_empty() {
            self.flush_run(start, &run)?;
        }
        Ok(())
    }

    fn flush_run(&mut self, page: usize, data: &[u8]) -> Result<(), String> {
        let mut h = Vec::with_capacity(13);
        h.push(TAG_RAM);
        h.extend_from_slice(&((page * PAGE) as u64).to_le_bytes());
        h.extend_from_slice(&(data.len() as u32).to_le_bytes());
        self.conn
            .write_all(&h)
            .and_then(|_| self.conn.write_all(data))
            .map_err(|e| format!("migration stream: {e}"))?;
        self.bytes += data.len() as u64;
        Ok(())
    }

    /// Pages whose contents differ from what was sent (every CPU scans a share of RAM).
    fn changed(&self) -> Result<Vec<usize>, String> {
        let n = self.hashes.len();
        let workers = std::thread::available_parallelism()
            .map_or(1, |p| p.get())
            .clamp(1, 8);
        let share = n.div_ceil(workers);
        let parts: Vec<Result<Vec<usize>, String>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..workers)
                .map(|w| {
                    s.spawn(move || {
                        let mut page = vec![0u8; PAGE];
                        let mut out = Vec::new();
                        for p in w * share..((w + 1) * share).min(n) {
                            self.read_page(p, &mut page)?;
                            if page_hash(&page) != self.hashes[p] {
                                out.push(p);
                            }
                        }
                        Ok(out)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err("page scan failed".into())))
                .collect()
        });
        let mut out = Vec::new();
        for p in parts {
            out.extend(p?);
        }
        Ok(out)
    }
}

impl Snapshotter {
    /// Pages the vCPUs wrote since the last call (KVM's dirty log), or None if unavailable.
    fn dirty_pages(&self) -> Option<Vec<usize>> {
        let mut out = Vec::new();
        for (slot, (off, _, len)) in layout(&self.mem).into_iter().enumerate() {
            let bitmap = self.vm.get_dirty_log(slot as u32, len as usize).ok()?;
            let first = (off as usize) / PAGE;
            for (i, word) in bitmap.iter().enumerate() {
                let mut w = *word;
                while w != 0 {
                    let bit = w.trailing_zeros() as usize;
                    let p = i * 64 + bit;
                    if p < (len as usize) / PAGE {
                        out.push(first + p);
                    }
                    w &= w - 1;
                }
            }
        }
        Some(out)
    }

    /// Migrate the running VM to `url`. On success the VM is paused and belongs to the
    /// destination (the caller ends this one); on failure it runs again here.
    pub fn migrate(&self, url: &str) -> Result<Report, String> {
        let target = Url::parse(url)?;
        let mut conn = match &target {
            Url::Unix(p) => UnixStream::connect(p).map(Conn::Unix),
            Url::Tcp(a) => TcpStream::connect(a).map(|s| {
                let _ = s.set_nodelay(true);
                Conn::Tcp(s)
            }),
        }
        .map_err(|e| format!("cannot connect to {url}: {e}"))?;
        let logging = crate::memory::set_dirty_logging(&self.vm, &self.mem, true).is_ok();
        let r = self.migrate_over(&mut conn, logging);
        let _ = crate::memory::set_dirty_logging(&self.vm, &self.mem, false);
        if r.is_err() && self.pause.is_paused() {
            self.pause.resume();
        }
        r
    }

    fn migrate_over(&self, conn: &mut Conn, logging: bool) -> Result<Report, String> {
        let t0 = Instant::now();
        let io = |e: std::io::Error| format!("migration stream: {e}");
        let config = serde_json::to_vec(&self.config).map_err(|e| e.to_string())?;
        conn.write_all(MAGIC).map_err(io)?;
        conn.write_all(&VERSION.to_le_bytes()).map_err(io)?;
        conn.write_all(&(config.len() as u32).to_le_bytes())
            .map_err(io)?;
        conn.write_all(&config).map_err(io)?;
        let total = (self.config.mem_size as usize) / PAGE;
        let mut tx = Sender {
            mem: &self.mem,
            regions: layout(&self.mem),
            hashes: vec![0; total],
            conn,
            bytes: 0,
        };
        let mut dirty_log = logging && self.dirty_pages().is_some(); // also clears the log
        let all: Vec<usize> = (0..total).collect();
        tx.send(&all, true)?;
        let mut rounds = 0;
        while rounds < MAX_ROUNDS {
            let pages = match self.dirty_pages().filter(|_| dirty_log) {
                Some(p) => p,
                None => {
                    dirty_log = false;
                    tx.changed()?
                }
            };
            rounds += 1;
            tx.send(&pages, false)?;
            if pages.len() < CONVERGED_PAGES {
                break;
            }
        }
        // Stop and copy.
        let t_pause = Instant::now();
        self.pause.pause_all()?;
        let t_paused = Instant::now();
        let mut last = if dirty_log {
            self.dirty_pages().unwrap_or_default()
        } else {
            Vec::new()
        };
        last.extend(tx.changed()?);
        last.sort_unstable();
        last.dedup();
        tx.send(&last, false)?;
        let t_pages = Instant::now();
        let state = serde_json::to_vec(&self.capture()?).map_err(|e| e.to_string())?;
        let bytes = tx.bytes;
        conn.write_all(&[TAG_STATE]).map_err(io)?;
        conn.write_all(&(state.len() as u32).to_le_bytes())
            .map_err(io)?;
        conn.write_all(&state).map_err(io)?;
        conn.flush().map_err(io)?;
        let t_state = Instant::now();
        conn.set_read_timeout(Some(ACK_WAIT));
        let mut line = String::new();
        BufReader::new(&mut *conn)
            .take(64 << 10)
            .read_line(&mut line)
            .map_err(|e| format!("no answer from the destination: {e}"))?;
        let v: serde_json::Value = serde_json::from_str(line.trim())
            .map_err(|_| format!("the destination did not confirm: {:?}", line.trim()))?;
        if v["status"] != "running" {
            return Err(format!(
                "the destination refused the VM: {}",
                v["error"].as_str().unwrap_or(line.trim())
            ));
        }
        Ok(Report {
            downtime_ms: t_pause.elapsed().as_millis() as u64,
            total_ms: t0.elapsed().as_millis() as u64,
            rounds,
            ram_bytes: bytes,
            final_pages: last.len(),
            dirty_log,
            downtime_parts: [
                (t_paused - t_pause).as_millis() as u64,
                (t_pages - t_paused).as_millis() as u64,
                (t_state - t_pages).as_millis() as u64,
                t_state.elapsed().as_millis() as u64,
            ],
        })
    }
}

/// A VM received by `--migrate-receive`, ready to build; [`Incoming::confirm`] once it runs.
pub struct Incoming {
    restore: Option<Restore>,
    conn: Conn,
}

impl Incoming {
    /// The state and RAM to build the VM from (once; its RAM file stays open with `self`).
    pub fn take_restore(&mut self) -> Option<Restore> {
        self.restore.take()
    }

    /// Tell the source the VM runs here (it stops then).
    pub fn confirm(&mut self) -> Result<(), String> {
        self.conn
            .write_all(b"{\"status\":\"running\"}\n")
            .and_then(|_| self.conn.flush())
            .map_err(|e| format!("cannot confirm to the source: {e}"))
    }

    /// Tell the source the VM cannot run here (it resumes the guest).
    pub fn refuse(&mut self, why: &str) {
        let msg = serde_json::json!({ "status": "failed", "error": why }).to_string();
        let _ = self.conn.write_all(format!("{msg}\n").as_bytes());
    }
}

fn read_u32(c: &mut Conn) -> Result<u32, String> {
    let mut b = [0u8; 4];
    c.read_exact(&mut b)
        .map_err(|e| format!("migration stream: {e}"))?;
    Ok(u32::from_le_bytes(b))
}

fn read_json(c: &mut Conn, what: &str) -> Result<Vec<u8>, String> {
    let n = read_u32(c)?;
    if n > MAX_JSON {
        return Err(format!("{what}: {n} bytes is too large"));
    }
    let mut v = vec![0u8; n as usize];
    c.read_exact(&mut v)
        .map_err(|e| format!("migration stream ({what}): {e}"))?;
    Ok(v)
}

/// Wait on `url` for one source and receive its VM.
pub fn receive(url: &str) -> Result<Incoming, String> {
    let target = Url::parse(url)?;
    let mut conn = match &target {
        Url::Unix(p) => {
            let _ = std::fs::remove_file(p);
            let l = UnixListener::bind(p).map_err(|e| format!("{}: {e}", p.display()))?;
            let c = l.accept().map(|(s, _)| Conn::Unix(s));
            let _ = std::fs::remove_file(p);
            c
        }
        Url::Tcp(a) => {
            let l = TcpListener::bind(a).map_err(|e| format!("{a}: {e}"))?;
            l.accept().map(|(s, _)| Conn::Tcp(s))
        }
    }
    .map_err(|e| format!("{url}: {e}"))?;
    // A source that stalls mid-stream must not hold the destination for ever.
    conn.set_read_timeout(Some(STALL));
    let mut magic = [0u8; 8];
    conn.read_exact(&mut magic)
        .map_err(|e| format!("migration stream: {e}"))?;
    if &magic != MAGIC {
        return Err("not a rhyve migration stream".into());
    }
    let version = read_u32(&mut conn)?;
    if version != VERSION {
        return Err(format!(
            "migration protocol version {version}, this rhyve speaks version {VERSION}"
        ));
    }
    let config: SavedConfig = serde_json::from_slice(&read_json(&mut conn, "header")?)
        .map_err(|e| format!("migration header: {e}"))?;
    if config.mem_size < crate::memory::MIN_RAM || !config.mem_size.is_multiple_of(PAGE as u64) {
        return Err(format!("migration header: RAM size {}", config.mem_size));
    }
    // Straight into the new VM's guest memory: nothing is copied once the state arrives.
    let (mem, memfd) = crate::memory::create(config.mem_size).map_err(|e| e.to_string())?;
    let regions = layout(&mem);
    let mut buf = vec![0u8; RUN_MAX];
    let state = loop {
        let mut tag = [0u8];
        conn.read_exact(&mut tag)
            .map_err(|e| format!("migration stream: {e}"))?;
        match tag[0] {
            TAG_RAM => {
                let mut off = [0u8; 8];
                conn.read_exact(&mut off)
                    .map_err(|e| format!("migration stream: {e}"))?;
                let off = u64::from_le_bytes(off);
                let len = read_u32(&mut conn)? as usize;
                if len > RUN_MAX
                    || off
                        .checked_add(len as u64)
                        .is_none_or(|e| e > config.mem_size)
                {
                    return Err(format!("RAM message at {off:#x}+{len:#x} outside RAM"));
                }
                conn.read_exact(&mut buf[..len])
                    .map_err(|e| format!("migration stream: {e}"))?;
                write_at(&mem, &regions, off, &buf[..len])?;
            }
            TAG_STATE => {
                let v = read_json(&mut conn, "state")?;
                let s: VmState =
                    serde_json::from_slice(&v).map_err(|e| format!("migration state: {e}"))?;
                if s.version != SNAPSHOT_VERSION || s.vcpus.len() != usize::from(s.config.vcpus) {
                    return Err("migration state: damaged".into());
                }
                break s;
            }
            t => return Err(format!("migration stream: unknown message {t}")),
        }
    };
    Ok(Incoming {
        restore: Some(Restore {
            state,
            memory: Ram::Ready(mem, memfd),
        }),
        conn,
    })
}

/// Write `data` at RAM file offset `off` (checked to lie inside RAM), across regions.
fn write_at(
    mem: &GuestMemoryMmap,
    regions: &[(u64, u64, u64)],
    mut off: u64,
    mut data: &[u8],
) -> Result<(), String> {
    while !data.is_empty() {
        let (f, g, len) = regions
            .iter()
            .copied()
            .find(|(f, _, len)| off >= *f && off < f + len)
            .ok_or_else(|| format!("RAM message at {off:#x} outside RAM"))?;
        let n = (data.len() as u64).min(f + len - off) as usize;
        mem.write_slice(&data[..n], GuestAddress(g + off - f))
            .map_err(|e| format!("incoming RAM: {e}"))?;
        data = &data[n..];
        off += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            Url::parse("unix:/tmp/m.sock"),
            Ok(Url::Unix("/tmp/m.sock".into()))
        );
        assert_eq!(
            Url::parse("tcp:127.0.0.1:4444"),
            Ok(Url::Tcp("127.0.0.1:4444".into()))
        );
        for bad in ["unix:", "tcp:127.0.0.1", "tcp:h:port", "http://x", ""] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn page_hashes_see_single_bit_changes() {
        let a = vec![0u8; PAGE];
        let mut b = a.clone();
        for i in [0, 7, 8, PAGE - 1] {
            b[i] ^= 1;
            assert_ne!(page_hash(&a), page_hash(&b), "byte {i}");
            b[i] ^= 1;
        }
    }
}

#[cfg(test)]
mod wire_tests {
    use super::*;

    /// Run `receive` on a fresh UNIX socket and feed it `bytes` from a client; its error.
    fn receive_from(bytes: Vec<u8>) -> String {
        let dir = std::env::temp_dir().join(format!(
            "rhyve-mig-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("m.sock");
        let url = format!("unix:{}", sock.display());
        let rx = std::thread::spawn(move || receive(&url).err());
        let mut c = loop {
            match UnixStream::connect(&sock) {
                Ok(c) => break c,
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        let _ = c.write_all(&bytes);
        drop(c); // end of stream
        let e = rx.join().unwrap().expect("a bad stream must be refused");
        let _ = std::fs::remove_dir_all(&dir);
        e
    }

    fn header(version: u32, mem: u64) -> Vec<u8> {
        let cfg = serde_json::to_vec(&SavedConfig {
            mem_size: mem,
            vcpus: 1,
            devices: vec![],
            testdev: false,
        })
        .unwrap();
        let mut v = MAGIC.to_vec();
        v.extend_from_slice(&version.to_le_bytes());
        v.extend_from_slice(&(cfg.len() as u32).to_le_bytes());
        v.extend_from_slice(&cfg);
        v
    }

    fn ram(off: u64, len: u32) -> Vec<u8> {
        let mut v = vec![TAG_RAM];
        v.extend_from_slice(&off.to_le_bytes());
        v.extend_from_slice(&len.to_le_bytes());
        v
    }

    #[test]
    fn hostile_streams_are_refused_with_a_reason() {
        const MIB16: u64 = 16 << 20;
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                b"GET / HTTP/1.1\r\n\r\n".to_vec(),
                "not a rhyve migration stream",
            ),
            (header(99, MIB16), "migration protocol version 99"),
            (header(VERSION, 12345), "RAM size 12345"),
            (
                [header(VERSION, MIB16), ram(MIB16 - 4096, 8192)].concat(),
                "outside RAM",
            ),
            (
                [header(VERSION, MIB16), ram(u64::MAX - 10, 4096)].concat(),
                "outside RAM",
            ),
            (
                [header(VERSION, MIB16), ram(0, (RUN_MAX + 1) as u32)].concat(),
                "outside RAM",
            ),
            (
                [
                    header(VERSION, MIB16),
                    vec![TAG_STATE],
                    u32::MAX.to_le_bytes().to_vec(),
                ]
                .concat(),
                "too large",
            ),
            (
                [
                    header(VERSION, MIB16),
                    vec![TAG_STATE],
                    2u32.to_le_bytes().to_vec(),
                    b"{}".to_vec(),
                ]
                .concat(),
                "migration state",
            ),
            (
                [header(VERSION, MIB16), vec![7]].concat(),
                "unknown message 7",
            ),
            // Cut off in the middle of a RAM message.
            (
                [header(VERSION, MIB16), ram(0, 4096), vec![1; 100]].concat(),
                "migration stream",
            ),
        ];
        for (bytes, want) in cases {
            let e = receive_from(bytes);
            assert!(e.contains(want), "want {want:?}, got {e:?}");
        }
    }
}
