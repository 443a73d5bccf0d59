//! A client for the Network Block Device protocol: an `nbd://host[:port]/export` or
//! `nbd+unix:///export?socket=PATH` image, so any device model can use qcow2 and other formats
//! through `qemu-nbd`, or network and cluster storage exported over NBD.
//!
//! Fixed newstyle handshake with `NBD_OPT_GO` (and structured replies where the server offers
//! them), READ, WRITE (FUA), FLUSH, TRIM and WRITE_ZEROES, several connections when the server
//! allows multi-conn, and reconnection with a bounded retry when a connection drops: a request
//! the server never answered is sent again on the new connection (reads, writes, flushes, trims
//! and write-zeroes are all idempotent); once the retries are spent the request fails with an
//! I/O error, which each model maps to its own error status. Writes acknowledged but not yet
//! flushed when a connection is lost may be gone with the server: the next flush fails.
//! Every read is bounded by a timeout, every reply checked (chunk lengths, offsets, and that
//! a read was covered exactly), so a hostile or broken server costs errors, not a hang.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::{check_range, BackendInfo, BlockBackend, BlockError, Result, Stats, StatsSnapshot};

/// Handshake and transmission constants (the NBD protocol document, "Baseline" and
/// "Structured replies").
mod proto {
    pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
    pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
    pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
    pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
    pub const FLAG_NO_ZEROES: u16 = 2;
    pub const OPT_GO: u32 = 7;
    pub const OPT_STRUCTURED_REPLY: u32 = 8;
    pub const REP_ACK: u32 = 1;
    pub const REP_INFO: u32 = 3;
    pub const REP_ERR_BIT: u32 = 1 << 31;
    pub const INFO_EXPORT: u16 = 0;
    pub const REQUEST_MAGIC: u32 = 0x2560_9513;
    pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
    pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
    pub const CMD_READ: u16 = 0;
    pub const CMD_WRITE: u16 = 1;
    pub const CMD_DISC: u16 = 2;
    pub const CMD_FLUSH: u16 = 3;
    pub const CMD_TRIM: u16 = 4;
    pub const CMD_WRITE_ZEROES: u16 = 6;
    pub const CMD_FLAG_FUA: u16 = 1;
    pub const TF_READ_ONLY: u16 = 1 << 1;
    pub const TF_SEND_FLUSH: u16 = 1 << 2;
    pub const TF_SEND_FUA: u16 = 1 << 3;
    pub const TF_SEND_TRIM: u16 = 1 << 5;
    pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
    pub const CHUNK_DONE: u16 = 1;
    pub const CHUNK_NONE: u16 = 0;
    pub const CHUNK_OFFSET_DATA: u16 = 1;
    pub const CHUNK_OFFSET_HOLE: u16 = 2;
    pub const CHUNK_ERROR_BIT: u16 = 1 << 15;
}
use proto::*;

/// Largest request sent at once (qemu-nbd's limit is 32 MiB).
const MAX_REQUEST: u64 = 32 << 20;
/// Connections opened when the server allows multi-conn.
const MULTI_CONN: usize = 4;
/// Reconnection attempts after a dropped connection, with doubling waits from 50 ms (about 6 s
/// in all): long enough for a server restart, short enough that I/O fails rather than hangs.
const RETRIES: u32 = 7;
/// The whole reconnection effort for one request, whatever each attempt costs.
const RECONNECT_DEADLINE: Duration = Duration::from_secs(10);
/// How long one connection attempt, or one read or write on a connection, may take: a server
/// that stops answering is a lost connection, not a hang.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest structured-reply chunk payload accepted (a data chunk carries at most a request).
const MAX_CHUNK: u32 = MAX_REQUEST as u32 + 8;

/// Where the server is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdAddr {
    /// `host:port`.
    Tcp(String),
    /// A UNIX socket path.
    Unix(String),
}

/// A parsed NBD URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    /// The server.
    pub addr: NbdAddr,
    /// The export name (may be empty: the server's default).
    pub export: String,
}

/// Whether `s` names an NBD image rather than a file.
pub fn is_nbd_uri(s: &str) -> bool {
    s.starts_with("nbd://") || s.starts_with("nbd+unix://")
}

impl NbdUri {
    /// Parse `nbd://host[:port][/export]` or `nbd+unix:///export?socket=PATH`.
    pub fn parse(s: &str) -> Result<NbdUri> {
        let bad = |why: &str| BlockError::Config(format!("bad NBD URI {s:?}: {why}"));
        if let Some(rest) = s.strip_prefix("nbd+unix://") {
            let (path, query) = rest.split_once('?').ok_or_else(|| bad("no ?socket=PATH"))?;
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .filter(|p| !p.is_empty())
                .ok_or_else(|| bad("no ?socket=PATH"))?;
            let export = path.strip_prefix('/').unwrap_or(path);
            return Ok(NbdUri {
                addr: NbdAddr::Unix(socket.to_string()),
                export: export.to_string(),
            });
        }
        let rest = s
            .strip_prefix("nbd://")
            .ok_or_else(|| bad("not nbd:// or nbd+unix://"))?;
        let (hostport, export) = rest.split_once('/').unwrap_or((rest, ""));
        if hostport.is_empty() {
            return Err(bad("no host"));
        }
        let hostport = if hostport
            .rsplit_once(':')
            .is_some_and(|(_, p)| !p.contains(']'))
        {
            let (h, p) = hostport.rsplit_once(':').expect("checked");
            p.parse::<u16>().map_err(|_| bad("bad port"))?;
            format!("{h}:{p}")
        } else {
            format!("{hostport}:10809")
        };
        Ok(NbdUri {
            addr: NbdAddr::Tcp(hostport),
            export: export.to_string(),
        })
    }
}

/// One connection: either kind of stream.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(b),
            Stream::Unix(s) => s.read(b),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(b),
            Stream::Unix(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What the handshake learnt.
#[derive(Clone, Copy, Debug)]
struct Export {
    size: u64,
    flags: u16,
    structured: bool,
}

struct Conn {
    s: Stream,
    cookie: u64,
}

fn rd<const N: usize>(s: &mut Stream) -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    s.read_exact(&mut b)?;
    Ok(b)
}

fn io_err(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

/// Connect and negotiate `export`.
fn connect(uri: &NbdUri) -> std::io::Result<(Conn, Export)> {
    let mut s = match &uri.addr {
        NbdAddr::Tcp(hp) => {
            let mut last = io_err(format!("{hp}: no address"));
            let mut conn = None;
            for a in hp.to_socket_addrs()? {
                match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                    Ok(t) => {
                        conn = Some(t);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            let t = conn.ok_or(last)?;
            t.set_nodelay(true)?;
            t.set_read_timeout(Some(IO_TIMEOUT))?;
            t.set_write_timeout(Some(IO_TIMEOUT))?;
            Stream::Tcp(t)
        }
        NbdAddr::Unix(p) => {
            let u = UnixStream::connect(p)?;
            u.set_read_timeout(Some(IO_TIMEOUT))?;
            u.set_write_timeout(Some(IO_TIMEOUT))?;
            Stream::Unix(u)
        }
    };
    if u64::from_be_bytes(rd(&mut s)?) != NBDMAGIC || u64::from_be_bytes(rd(&mut s)?) != IHAVEOPT {
        return Err(io_err("not an NBD newstyle server".into()));
    }
    let hflags = u16::from_be_bytes(rd(&mut s)?);
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(io_err("server lacks fixed newstyle negotiation".into()));
    }
    let cflags = u32::from(hflags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
    s.write_all(&cflags.to_be_bytes())?;
    let opt = |s: &mut Stream, o: u32, data: &[u8]| -> std::io::Result<()> {
        let mut m = Vec::with_capacity(16 + data.len());
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&o.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        s.write_all(&m)
    };
    // One option reply: (type, data).
    let reply = |s: &mut Stream, o: u32| -> std::io::Result<(u32, Vec<u8>)> {
        if u64::from_be_bytes(rd(s)?) != REPLY_MAGIC || u32::from_be_bytes(rd(s)?) != o {
            return Err(io_err("bad option reply".into()));
        }
        let t = u32::from_be_bytes(rd(s)?);
        let len = u32::from_be_bytes(rd(s)?);
        if len > 64 << 10 {
            return Err(io_err(format!("option reply of {len} bytes")));
        }
        let mut d = vec![0u8; len as usize];
        s.read_exact(&mut d)?;
        Ok((t, d))
    };
    opt(&mut s, OPT_STRUCTURED_REPLY, &[])?;
    let structured = reply(&mut s, OPT_STRUCTURED_REPLY)?.0 == REP_ACK;
    let name = uri.export.as_bytes();
    let mut go = Vec::new();
    go.extend_from_slice(&(name.len() as u32).to_be_bytes());
    go.extend_from_slice(name);
    go.extend_from_slice(&0u16.to_be_bytes()); // no extra information requests
    opt(&mut s, OPT_GO, &go)?;
    let mut export = None;
    for _ in 0..64 {
        let (t, d) = reply(&mut s, OPT_GO)?;
        match t {
            REP_INFO if d.len() >= 12 && u16::from_be_bytes([d[0], d[1]]) == INFO_EXPORT => {
                let size = u64::from_be_bytes(d[2..10].try_into().expect("8"));
                let flags = u16::from_be_bytes([d[10], d[11]]);
                export = Some(Export {
                    size,
                    flags,
                    structured,
                });
            }
            REP_INFO => {}
            REP_ACK => {
                let export =
                    export.ok_or_else(|| io_err("server sent no export information".into()))?;
                return Ok((Conn { s, cookie: 0 }, export));
            }
            t if t & REP_ERR_BIT != 0 => {
                return Err(io_err(format!(
                    "server refused export {:?} (error {t:#x}{}{})",
                    uri.export,
                    if d.is_empty() { "" } else { ": " },
                    String::from_utf8_lossy(&d)
                )))
            }
            _ => {}
        }
    }
    Err(io_err("server never finished NBD_OPT_GO".into()))
}

/// An NBD export as a disk.
pub struct NbdBackend {
    uri: NbdUri,
    export: Export,
    conns: Vec<Mutex<Option<Conn>>>,
    next: AtomicUsize,
    read_only: bool,
    sector_size: u32,
    stats: Stats,
    /// Writes acknowledged since the last completed flush.
    dirty: AtomicBool,
    /// A connection was replaced while writes were unflushed: the server may have lost them
    /// (it crashed, or its cache went with it), so the next flush must not report success.
    lost_unflushed: AtomicBool,
}

impl std::fmt::Debug for NbdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdBackend")
            .field("uri", &self.uri)
            .field("size", &self.export.size)
            .finish()
    }
}

/// What a request carries and expects.
enum Data<'a, 'b> {
    None,
    Out(&'a [IoSlice<'b>]),
    In(&'a mut [IoSliceMut<'b>]),
}

impl NbdBackend {
    /// Connect to `uri` (a string [`is_nbd_uri`] accepts).
    pub fn open(uri: &str, read_only: bool, sector_size: u32) -> Result<NbdBackend> {
        let parsed = NbdUri::parse(uri)?;
        let (first, export) =
            connect(&parsed).map_err(|e| BlockError::Config(format!("cannot open {uri}: {e}")))?;
        if export.size % u64::from(sector_size) != 0 || export.size == 0 {
            return Err(BlockError::Config(format!(
                "{uri}: export size {} is not a positive multiple of the {sector_size}-byte sector",
                export.size
            )));
        }
        let n = if export.flags & TF_CAN_MULTI_CONN != 0 {
            MULTI_CONN
        } else {
            1
        };
        let mut conns = vec![Mutex::new(Some(first))];
        conns.extend((1..n).map(|_| Mutex::new(None)));
        Ok(NbdBackend {
            read_only: read_only || export.flags & TF_READ_ONLY != 0,
            uri: parsed,
            export,
            conns,
            next: AtomicUsize::new(0),
            sector_size,
            stats: Stats::new(),
            dirty: AtomicBool::new(false),
            lost_unflushed: AtomicBool::new(false),
        })
    }

    /// Connections this backend may use (several only with multi-conn).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Send one command and take its reply, reconnecting (and resending) if the connection
    /// drops. The server's errors are returned as they are.
    fn command(&self, cmd: u16, flags: u16, offset: u64, len: u32, mut data: Data) -> Result<()> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        let mut slot = self.conns[i].lock().unwrap_or_else(|e| e.into_inner());
        let mut attempt = 0;
        let started = Instant::now();
        loop {
            if slot.is_none() {
                match connect(&self.uri) {
                    Ok((c, e))
                        if e.size == self.export.size
                            && e.flags == self.export.flags
                            && e.structured == self.export.structured =>
                    {
                        if self.dirty.load(Ordering::Acquire) {
                            self.lost_unflushed.store(true, Ordering::Release);
                        }
                        *slot = Some(c)
                    }
                    Ok(_) => {
                        return Err(BlockError::Io(io_err(format!(
                            "{}: the export changed (size or capabilities) across a reconnect",
                            self.uri_str()
                        ))))
                    }
                    Err(e) => {
                        if attempt >= RETRIES || started.elapsed() >= RECONNECT_DEADLINE {
                            log::warn!("nbd {}: giving up reconnecting: {e}", self.uri_str());
                            return Err(BlockError::Io(e));
                        }
                        std::thread::sleep(Duration::from_millis(50 << attempt));
                        attempt += 1;
                        continue;
                    }
                }
            }
            let conn = slot.as_mut().expect("connected above");
            match self.exchange(conn, cmd, flags, offset, len, &mut data) {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(errno)) => {
                    // A server error without an errno is still an error.
                    let errno = if errno == 0 { libc_eio() } else { errno };
                    return Err(BlockError::Io(std::io::Error::from_raw_os_error(errno)));
                }
                Err(e) => {
                    // The connection is gone (or out of step): open another and resend.
                    log::warn!(
                        "nbd {}: connection lost ({e}); reconnecting",
                        self.uri_str()
                    );
                    *slot = None;
                    if attempt >= RETRIES || started.elapsed() >= RECONNECT_DEADLINE {
                        return Err(BlockError::Io(e));
                    }
                    attempt += 1;
                }
            }
        }
    }

    fn uri_str(&self) -> String {
        match &self.uri.addr {
            NbdAddr::Tcp(hp) => format!("nbd://{hp}/{}", self.uri.export),
            NbdAddr::Unix(p) => format!("nbd+unix:///{}?socket={p}", self.uri.export),
        }
    }

    /// One request and its reply on `c`. The outer error is the connection's; the inner one
    /// is the server's errno for this request.
    fn exchange(
        &self,
        c: &mut Conn,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &mut Data,
    ) -> std::io::Result<std::result::Result<(), i32>> {
        c.cookie = c.cookie.wrapping_add(1);
        let cookie = c.cookie;
        let mut h = [0u8; 28];
        h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h[4..6].copy_from_slice(&flags.to_be_bytes());
        h[6..8].copy_from_slice(&cmd.to_be_bytes());
        h[8..16].copy_from_slice(&cookie.to_be_bytes());
        h[16..24].copy_from_slice(&offset.to_be_bytes());
        h[24..28].copy_from_slice(&len.to_be_bytes());
        c.s.write_all(&h)?;
        if let Data::Out(bufs) = data {
            for b in bufs.iter() {
                c.s.write_all(b)?;
            }
        }
        let magic = u32::from_be_bytes(rd(&mut c.s)?);
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let errno = u32::from_be_bytes(rd(&mut c.s)?);
                if u64::from_be_bytes(rd(&mut c.s)?) != cookie {
                    return Err(io_err("reply for another request".into()));
                }
                if errno != 0 {
                    return Ok(Err(errno as i32));
                }
                if let Data::In(bufs) = data {
                    for b in bufs.iter_mut() {
                        c.s.read_exact(b)?;
                    }
                }
                Ok(Ok(()))
            }
            STRUCTURED_REPLY_MAGIC if self.export.structured => {
                self.structured(c, cookie, offset, len, data, true)
            }
            m => Err(io_err(format!("bad reply magic {m:#x}"))),
        }
    }

    /// The chunks of a structured reply (the first chunk's magic is already read).
    fn structured(
        &self,
        c: &mut Conn,
        cookie: u64,
        offset: u64,
        len: u32,
        data: &mut Data,
        mut magic_read: bool,
    ) -> std::io::Result<std::result::Result<(), i32>> {
        let mut error = None;
        let mut covered: Vec<(u64, u64)> = Vec::new();
        loop {
            if !magic_read && u32::from_be_bytes(rd(&mut c.s)?) != STRUCTURED_REPLY_MAGIC {
                return Err(io_err("bad structured reply magic".into()));
            }
            magic_read = false;
            let flags = u16::from_be_bytes(rd(&mut c.s)?);
            let typ = u16::from_be_bytes(rd(&mut c.s)?);
            if u64::from_be_bytes(rd(&mut c.s)?) != cookie {
                return Err(io_err("reply for another request".into()));
            }
            let clen = u32::from_be_bytes(rd(&mut c.s)?);
            if clen > MAX_CHUNK {
                return Err(io_err(format!("structured reply chunk of {clen} bytes")));
            }
            match typ {
                CHUNK_NONE if clen == 0 => {}
                CHUNK_OFFSET_DATA | CHUNK_OFFSET_HOLE
                    if (typ == CHUNK_OFFSET_DATA && clen >= 8) || clen == 12 =>
                {
                    let at = u64::from_be_bytes(rd(&mut c.s)?);
                    let n = if typ == CHUNK_OFFSET_DATA {
                        u64::from(clen - 8)
                    } else {
                        u64::from(u32::from_be_bytes(rd(&mut c.s)?))
                    };
                    let rel = at
                        .checked_sub(offset)
                        .filter(|r| r.checked_add(n).is_some_and(|e| e <= u64::from(len)));
                    let (Some(rel), Data::In(bufs)) = (rel, &mut *data) else {
                        return Err(io_err("data chunk outside the request".into()));
                    };
                    scatter(bufs, rel, n, |dst| {
                        if typ == CHUNK_OFFSET_DATA {
                            c.s.read_exact(dst)
                        } else {
                            dst.fill(0);
                            Ok(())
                        }
                    })?;
                    covered.push((rel, rel + n));
                }
                t if t & CHUNK_ERROR_BIT != 0 && clen >= 6 => {
                    let mut d = vec![0u8; clen as usize];
                    c.s.read_exact(&mut d)?;
                    let errno = u32::from_be_bytes(d[..4].try_into().expect("4")) as i32;
                    error = Some(if errno == 0 { libc_eio() } else { errno });
                }
                CHUNK_NONE | CHUNK_OFFSET_DATA | CHUNK_OFFSET_HOLE => {
                    return Err(io_err(format!("chunk type {typ} with length {clen}")));
                }
                t if t & CHUNK_ERROR_BIT != 0 => {
                    return Err(io_err(format!("error chunk of {clen} bytes")));
                }
                _ => {
                    // Unknown chunk types without the error bit may be skipped, whole.
                    std::io::copy(&mut (&mut c.s).take(u64::from(clen)), &mut std::io::sink())?;
                }
            }
            if flags & CHUNK_DONE != 0 {
                if let Some(e) = error {
                    return Ok(Err(e));
                }
                // A successful read must have been covered exactly, without overlap.
                if let Data::In(_) = data {
                    covered.sort_unstable();
                    let mut end = 0;
                    for &(a, b) in &covered {
                        if a != end {
                            return Err(io_err("read reply with a gap or an overlap".into()));
                        }
                        end = b;
                    }
                    if end != u64::from(len) {
                        return Err(io_err("read reply shorter than the request".into()));
                    }
                }
                return Ok(Ok(()));
            }
        }
    }

    fn split(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, u32) -> Result<()>,
    ) -> Result<()> {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(MAX_REQUEST);
            f(offset + done, n as u32)?;
            done += n;
        }
        Ok(())
    }
}

/// Run `f` over the `n` bytes at `rel` of the buffers `bufs`, piece by piece.
fn scatter(
    bufs: &mut [IoSliceMut<'_>],
    mut rel: u64,
    mut n: u64,
    mut f: impl FnMut(&mut [u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    for b in bufs.iter_mut() {
        if n == 0 {
            break;
        }
        let l = b.len() as u64;
        if rel >= l {
            rel -= l;
            continue;
        }
        let k = (l - rel).min(n);
        f(&mut b[rel as usize..(rel + k) as usize])?;
        n -= k;
        rel = 0;
    }
    if n == 0 {
        Ok(())
    } else {
        Err(io_err("chunk past the buffers".into()))
    }
}

impl BlockBackend for NbdBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            capacity: self.export.size,
            sector_size: self.sector_size,
            read_only: self.read_only,
            // Whether a trimmed range reads back zero is the server's business.
            discard_zeroes: false,
        }
    }

    fn read_vectored(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        check_range(offset, len, self.export.size)?;
        if len <= MAX_REQUEST {
            let r = self.command(CMD_READ, 0, offset, len as u32, Data::In(bufs));
            if r.is_ok() {
                self.stats.record_read(len);
            }
            return self.stats.track(r);
        }
        // Larger than one request: through a bounded buffer.
        let mut tmp = vec![0u8; MAX_REQUEST as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(MAX_REQUEST) as usize;
            self.command(
                CMD_READ,
                0,
                offset + done,
                n as u32,
                Data::In(&mut [IoSliceMut::new(&mut tmp[..n])]),
            )?;
            let mut src = &tmp[..n];
            scatter(bufs, done, n as u64, |dst| {
                dst.copy_from_slice(&src[..dst.len()]);
                src = &src[dst.len()..];
                Ok(())
            })?;
            done += n as u64;
        }
        self.stats.record_read(len);
        Ok(())
    }

    fn write_vectored(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        check_range(offset, len, self.export.size)?;
        if len <= MAX_REQUEST {
            let r = self.command(CMD_WRITE, 0, offset, len as u32, Data::Out(bufs));
            if r.is_ok() {
                self.dirty.store(true, Ordering::Release);
                self.stats.record_write(len);
            }
            return self.stats.track(r);
        }
        let flat: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        self.split(offset, len, |o, n| {
            let at = (o - offset) as usize;
            self.command(
                CMD_WRITE,
                0,
                o,
                n,
                Data::Out(&[IoSlice::new(&flat[at..at + n as usize])]),
            )
        })?;
        self.dirty.store(true, Ordering::Release);
        self.stats.record_write(len);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.stats.record_flush();
        if self.lost_unflushed.swap(false, Ordering::AcqRel) {
            self.dirty.store(false, Ordering::Release);
            log::warn!(
                "nbd {}: a connection was lost with unflushed writes; reporting the flush failed",
                self.uri_str()
            );
            return Err(BlockError::Io(
                std::io::Error::from_raw_os_error(libc_eio()),
            ));
        }
        // Cleared before the flush is sent: writes acknowledged meanwhile set it again.
        self.dirty.store(false, Ordering::Release);
        if self.export.flags & TF_SEND_FLUSH == 0 {
            return Ok(()); // the server has no cache to flush
        }
        // With several connections each must be flushed (multi-conn makes a flush on one
        // cover writes completed on all, but only servers that say so; flushing the one the
        // request lands on is what multi-conn promises).
        let r = self.command(CMD_FLUSH, 0, 0, 0, Data::None);
        self.stats.track(r)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, len, self.export.size)?;
        self.stats.record_discard();
        if self.export.flags & TF_SEND_TRIM == 0 {
            return Ok(()); // a hint the server does not take
        }
        let r = self.split(offset, len, |o, n| {
            self.command(CMD_TRIM, 0, o, n, Data::None)
        });
        self.stats.track(r)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, len, self.export.size)?;
        self.stats.record_write_zeroes();
        if self.export.flags & TF_SEND_WRITE_ZEROES != 0 {
            let r = self.split(offset, len, |o, n| {
                self.command(CMD_WRITE_ZEROES, 0, o, n, Data::None)
            });
            return self.stats.track(r);
        }
        let zero = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zero.len() as u64) as usize;
            self.command(
                CMD_WRITE,
                0,
                offset + done,
                n as u32,
                Data::Out(&[IoSlice::new(&zero[..n])]),
            )?;
            done += n as u64;
        }
        Ok(())
    }

    fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// NBD_CMD_FLAG_FUA where the server takes it (one round trip, not write then flush).
    fn write_iov_fua(&self, offset: u64, iov: &crate::GuestIov) -> Result<()> {
        let len = iov.len();
        // Within the staging bound; a longer write goes out in pieces and is flushed after.
        if self.export.flags & TF_SEND_FUA == 0 || len > crate::STAGE_MAX as u64 || self.read_only {
            self.write_iov(offset, iov)?;
            return self.flush();
        }
        check_range(offset, len, self.export.size)?;
        let mut buf = vec![0u8; len as usize];
        iov.copy_to(0, &mut buf);
        let r = self.command(
            CMD_WRITE,
            CMD_FLAG_FUA,
            offset,
            len as u32,
            Data::Out(&[IoSlice::new(&buf)]),
        );
        if r.is_ok() {
            self.stats.record_write(len);
        }
        self.stats.track(r)
    }
}

impl Drop for NbdBackend {
    fn drop(&mut self) {
        // A polite goodbye: NBD_CMD_DISC has no reply.
        for c in &self.conns {
            // Not waiting for a connection a stuck request still holds.
            let Ok(mut guard) = c.try_lock() else {
                continue;
            };
            if let Some(conn) = guard.as_mut() {
                let mut h = [0u8; 28];
                h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
                h[6..8].copy_from_slice(&CMD_DISC.to_be_bytes());
                let _ = conn.s.write_all(&h);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_and_errors_name_the_uri() {
        assert_eq!(
            NbdUri::parse("nbd://127.0.0.1:10810/disk").unwrap(),
            NbdUri {
                addr: NbdAddr::Tcp("127.0.0.1:10810".into()),
                export: "disk".into()
            }
        );
        assert_eq!(
            NbdUri::parse("nbd://localhost").unwrap().addr,
            NbdAddr::Tcp("localhost:10809".into())
        );
        assert_eq!(
            NbdUri::parse("nbd+unix:///exp?socket=/tmp/s.sock").unwrap(),
            NbdUri {
                addr: NbdAddr::Unix("/tmp/s.sock".into()),
                export: "exp".into()
            }
        );
        for bad in ["nbd+unix:///exp", "nbd://", "nbd://h:port/x", "http://x"] {
            let e = NbdUri::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
        assert!(is_nbd_uri("nbd://x") && is_nbd_uri("nbd+unix:///x?socket=/s"));
        assert!(!is_nbd_uri("disk.img"));
    }

    #[test]
    fn a_server_that_is_not_there_is_a_clear_error() {
        let e = NbdBackend::open("nbd+unix:///x?socket=/nonexistent/rhyve.sock", false, 512)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cannot open nbd+unix:///x?socket=/nonexistent/rhyve.sock"),
            "{e}"
        );
    }
}

#[cfg(test)]
#[path = "nbd_tests.rs"]
mod against_qemu_nbd;

/// EIO, without a libc dependency for one constant.
fn libc_eio() -> i32 {
    5
}
