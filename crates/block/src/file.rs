//! [`RawFile`]: a raw disk image file or host block device.
//!
//! Buffered mode uses `preadv`/`pwritev` straight into the caller's buffers. Direct mode
//! (`O_DIRECT`) goes through an aligned bounce buffer and reads/writes whole aligned blocks,
//! doing read-modify-write for the partial blocks at either end of an unaligned request.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use rustix::fs::{AtFlags, FallocateFlags, StatxFlags};
use rustix::io::Errno;

use crate::guest::{self, GuestIov};
use crate::iov::{self, DrainCursor, FillCursor};
use crate::req::Op;
use crate::stats::{Stats, StatsSnapshot};
use crate::{
    check_range, validate_sector_size, BackendInfo, BlockBackend, BlockError, Dispatch, Result,
};

/// Most iovecs one `preadv`/`pwritev` call accepts (Linux `IOV_MAX`).
const IOV_MAX: usize = guest::IOV_MAX;
/// Largest bounce buffer used per step of a direct-mode request.
const DIRECT_CHUNK: u64 = 1 << 20;
/// Alignment assumed when the kernel does not report the file's direct-I/O alignment.
const DEFAULT_DIO_ALIGN: u64 = 4096;
/// Size of the zero buffer used when write-zeroes falls back to explicit writes.
const ZERO_CHUNK: u64 = 1 << 20;

/// Options for [`RawFile::open`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawFileOptions {
    /// Open the file read-only and refuse writes, discards and write-zeroes.
    pub read_only: bool,
    /// Open with `O_DIRECT`, bypassing the host page cache.
    pub direct: bool,
    /// Logical sector size reported to the guest: 512 or 4096.
    pub sector_size: u32,
}

impl Default for RawFileOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            direct: false,
            sector_size: 512,
        }
    }
}

/// Direct-I/O geometry of an `O_DIRECT` file.
#[derive(Debug)]
struct Direct {
    /// File offsets and lengths of direct I/O are multiples of this.
    align: u64,
    /// Bounce buffers start at a multiple of this.
    mem_align: usize,
    /// Bytes per step (a multiple of `align`).
    chunk: u64,
}

/// A raw image file or block device used as a disk.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    path: PathBuf,
    info: BackendInfo,
    /// Length of the file when opened (at least `info.capacity`).
    file_len: u64,
    direct: Option<Direct>,
    /// Direct mode only: read-modify-write takes this exclusively, other writes and
    /// fallocate calls take it shared, so an RMW never writes back stale bytes of a
    /// neighbouring request.
    rmw: RwLock<()>,
    can_punch: AtomicBool,
    can_zero_range: AtomicBool,
    /// The image lives in memory (tmpfs, ramfs): reads and writes are memory copies that never
    /// wait for a device, so they run on the submitting thread. io_uring cannot do better there:
    /// those filesystems cannot read without blocking, so every request would be punted to an
    /// io_uring worker thread and cost two thread hops.
    in_memory: bool,
    stats: Stats,
}

thread_local! {
    /// Per-thread bounce buffer for direct I/O, reused across requests.
    static BOUNCE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on a zero-initialised-once, `mem_align`-aligned buffer of `len` bytes.
fn with_bounce<T>(len: usize, mem_align: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
    BOUNCE.with(|cell| {
        let mut v = cell.borrow_mut();
        let need = len + mem_align;
        if v.len() < need {
            v.resize(need, 0);
        }
        let addr = v.as_ptr() as usize;
        let start = (mem_align - addr % mem_align) % mem_align;
        f(&mut v[start..start + len])
    })
}

/// The OS error text without std's " (os error N)" suffix.
fn os_text(e: &io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_string(),
        _ => s,
    }
}

fn round_down(x: u64, a: u64) -> u64 {
    x / a * a
}

fn round_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Whether `file` is on a filesystem that keeps its data in memory (tmpfs, ramfs).
fn in_memory_fs(file: &File) -> bool {
    const TMPFS_MAGIC: u64 = 0x0102_1994;
    const RAMFS_MAGIC: u64 = 0x8584_58f6;
    rustix::fs::fstatfs(file).is_ok_and(|s| {
        let t = s.f_type as u64;
        t == TMPFS_MAGIC || t == RAMFS_MAGIC
    })
}

/// Direct-I/O alignment (file offset, memory) of `file` as the kernel reports it (statx
/// `STATX_DIOALIGN`, Linux 6.1+), or a safe default.
fn dio_alignment(file: &File) -> (u64, usize) {
    let fallback = (DEFAULT_DIO_ALIGN, DEFAULT_DIO_ALIGN as usize);
    match rustix::fs::statx(file, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN) {
        Ok(st)
            if st.stx_mask & StatxFlags::DIOALIGN.bits() != 0
                && st.stx_dio_offset_align != 0
                && st.stx_dio_mem_align != 0 =>
        {
            (
                u64::from(st.stx_dio_offset_align),
                st.stx_dio_mem_align as usize,
            )
        }
        _ => fallback,
    }
}

impl RawFile {
    /// Opens the image at `path`. Capacity is the file (or device) size rounded down to a
    /// whole sector; a file smaller than one sector is refused. Errors name the path and the
    /// OS error.
    pub fn open(path: impl AsRef<Path>, opts: &RawFileOptions) -> Result<RawFile> {
        Self::open_with_align(path.as_ref(), opts, None)
    }

    /// Like [`RawFile::open`], optionally forcing the direct-I/O alignment (for tests).
    fn open_with_align(
        path: &Path,
        opts: &RawFileOptions,
        force_align: Option<u64>,
    ) -> Result<RawFile> {
        validate_sector_size(opts.sector_size)?;
        let shown = path.display();
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        if opts.direct {
            oo.custom_flags(libc::O_DIRECT);
        }
        let file = oo.open(path).map_err(|e| {
            let mut msg = format!("cannot open {shown}: {}", os_text(&e));
            match e.raw_os_error() {
                Some(libc::EINVAL) if opts.direct => {
                    msg.push_str(" (its filesystem does not support direct=on / O_DIRECT)")
                }
                Some(libc::EACCES | libc::EPERM | libc::EROFS) if !opts.read_only => {
                    msg.push_str(" (add ro to open it read-only)")
                }
                _ => {}
            }
            BlockError::Config(msg)
        })?;
        // Seeking to the end works for block devices too, whose metadata length is 0.
        let file_len = (&file).seek(SeekFrom::End(0)).map_err(|e| {
            BlockError::Config(format!("cannot get the size of {shown}: {}", os_text(&e)))
        })?;
        let ss = u64::from(opts.sector_size);
        let capacity = round_down(file_len, ss);
        if capacity == 0 {
            return Err(BlockError::Config(format!(
                "{shown} is {file_len} bytes, smaller than one {ss}-byte sector"
            )));
        }
        if capacity != file_len {
            log::warn!(
                "{shown}: size {file_len} is not a multiple of the {ss}-byte sector size; \
                 the disk has {capacity} bytes and the last {} are ignored",
                file_len - capacity
            );
        }
        let direct = opts.direct.then(|| {
            let (off_align, mem_align) = dio_alignment(&file);
            let align = force_align.unwrap_or(off_align).max(ss);
            let mem_align = mem_align.max(DEFAULT_DIO_ALIGN as usize);
            let chunk = round_down(DIRECT_CHUNK, align).max(align);
            Direct {
                align,
                mem_align,
                chunk,
            }
        });
        let in_memory = !opts.direct && in_memory_fs(&file);
        Ok(RawFile {
            file,
            path: path.to_path_buf(),
            info: BackendInfo {
                capacity,
                sector_size: opts.sector_size,
                read_only: opts.read_only,
                discard_zeroes: true,
            },
            file_len,
            direct,
            rmw: RwLock::new(()),
            can_punch: AtomicBool::new(true),
            can_zero_range: AtomicBool::new(true),
            in_memory,
            stats: Stats::new(),
        })
    }

    /// The path the image was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The alignment of direct I/O in bytes, or `None` when not opened with `O_DIRECT`.
    pub fn direct_alignment(&self) -> Option<u64> {
        self.direct.as_ref().map(|d| d.align)
    }

    fn shared(&self) -> Option<RwLockReadGuard<'_, ()>> {
        self.direct
            .as_ref()
            .map(|_| self.rmw.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.rmw.write().unwrap_or_else(|e| e.into_inner())
    }

    fn check_writable(&self, offset: u64, len: u64) -> Result<()> {
        if self.info.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, len, self.info.capacity)
    }

    fn read_impl(&self, offset: u64, len: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        match &self.direct {
            Some(d) => self.direct_read(d, offset, len, bufs),
            None => self.buffered_read(offset, bufs),
        }
    }

    fn write_impl(&self, offset: u64, len: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        match &self.direct {
            Some(d) => self.direct_write(d, offset, len, bufs),
            None => self.buffered_write(offset, bufs),
        }
    }

    fn buffered_read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        let mut local: Vec<IoSliceMut<'_>> = bufs
            .iter_mut()
            .filter(|b| !b.is_empty())
            .map(|b| IoSliceMut::new(b))
            .collect();
        let mut rest: &mut [IoSliceMut<'_>] = &mut local;
        let mut pos = offset;
        while !rest.is_empty() {
            let n = rest.len().min(IOV_MAX);
            match rustix::io::preadv(&self.file, &mut rest[..n], pos) {
                Ok(0) => {
                    // End of file inside the disk (the file shrank after open): zeroes.
                    rest.iter_mut().for_each(|b| b.fill(0));
                    break;
                }
                Ok(k) => {
                    pos += k as u64;
                    IoSliceMut::advance_slices(&mut rest, k);
                }
                Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn buffered_write(&self, offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        let mut local: Vec<IoSlice<'_>> = bufs.iter().filter(|b| !b.is_empty()).copied().collect();
        let mut rest: &mut [IoSlice<'_>] = &mut local;
        let mut pos = offset;
        while !rest.is_empty() {
            let n = rest.len().min(IOV_MAX);
            match rustix::io::pwritev(&self.file, &rest[..n], pos) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(k) => {
                    pos += k as u64;
                    IoSlice::advance_slices(&mut rest, k);
                }
                Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Reads aligned `buf` at aligned `pos` until full or end of file; returns bytes read.
    fn pread_direct(&self, d: &Direct, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], pos + done as u64) {
                Ok(0) => break,
                Ok(n) => {
                    done += n;
                    // A read ending inside a block only happens at end of file; the next
                    // offset would be unaligned, so stop here.
                    if !(done as u64).is_multiple_of(d.align) {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    /// Reads one aligned block (or chunk), zero-filling past end of file.
    fn read_block(&self, d: &Direct, buf: &mut [u8], pos: u64) -> io::Result<()> {
        let n = self.pread_direct(d, buf, pos)?;
        buf[n..].fill(0);
        Ok(())
    }

    /// Writes all of aligned `buf` at aligned `pos`.
    fn pwrite_direct(&self, d: &Direct, buf: &[u8], pos: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.write_at(&buf[done..], pos + done as u64) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    done += n;
                    if done < buf.len() && !(done as u64).is_multiple_of(d.align) {
                        return Err(io::Error::other(format!(
                            "short unaligned O_DIRECT write at offset {pos}: {done} of {} bytes",
                            buf.len()
                        )));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn direct_read(
        &self,
        d: &Direct,
        offset: u64,
        len: u64,
        bufs: &mut [IoSliceMut<'_>],
    ) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let (start, aend) = (round_down(offset, d.align), round_up(end, d.align));
        let mut cur = FillCursor::new(bufs);
        with_bounce((aend - start).min(d.chunk) as usize, d.mem_align, |buf| {
            let mut cs = start;
            while cs < aend {
                let ce = (cs + d.chunk).min(aend);
                let b = &mut buf[..(ce - cs) as usize];
                self.read_block(d, b, cs)?;
                let (ds, de) = (cs.max(offset), ce.min(end));
                cur.fill(&b[(ds - cs) as usize..(de - cs) as usize]);
                cs = ce;
            }
            Ok(())
        })
    }

    fn direct_write(
        &self,
        d: &Direct,
        offset: u64,
        len: u64,
        bufs: &[IoSlice<'_>],
    ) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let a = d.align;
        let (start, aend) = (round_down(offset, a), round_up(end, a));
        let rmw = start != offset || aend != end;
        let _shared = if rmw { None } else { self.shared() };
        let _exclusive = rmw.then(|| self.exclusive());
        let mut cur = DrainCursor::new(bufs);
        with_bounce((aend - start).min(d.chunk) as usize, d.mem_align, |buf| {
            let mut cs = start;
            while cs < aend {
                let ce = (cs + d.chunk).min(aend);
                let b = &mut buf[..(ce - cs) as usize];
                let (ds, de) = (cs.max(offset), ce.min(end));
                let head = ds > cs;
                if head {
                    self.read_block(d, &mut b[..a as usize], cs)?;
                }
                if de < ce && !(head && ce - cs == a) {
                    let bl = b.len();
                    self.read_block(d, &mut b[bl - a as usize..], ce - a)?;
                }
                cur.drain(&mut b[(ds - cs) as usize..(de - cs) as usize]);
                self.pwrite_direct(d, b, cs)?;
                cs = ce;
            }
            io::Result::Ok(())
        })?;
        if aend > self.file_len {
            // The last block reached past the end of an unaligned file: restore its size.
            // Only an RMW gets here, so the exclusive lock is still held.
            self.file.set_len(self.file_len)?;
        }
        Ok(())
    }

    /// Direct-mode read into guest buffers through the chunked, aligned bounce buffer.
    fn direct_read_iov(&self, d: &Direct, offset: u64, iov: &GuestIov) -> io::Result<()> {
        let len = iov.len();
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let (start, aend) = (round_down(offset, d.align), round_up(end, d.align));
        with_bounce((aend - start).min(d.chunk) as usize, d.mem_align, |buf| {
            let mut cs = start;
            while cs < aend {
                let ce = (cs + d.chunk).min(aend);
                let b = &mut buf[..(ce - cs) as usize];
                self.read_block(d, b, cs)?;
                let (ds, de) = (cs.max(offset), ce.min(end));
                iov.copy_from(ds - offset, &b[(ds - cs) as usize..(de - cs) as usize]);
                cs = ce;
            }
            Ok(())
        })
    }

    /// Direct-mode write from guest buffers: aligned bounce chunks, read-modify-write at
    /// unaligned ends (as [`RawFile::direct_write`]).
    fn direct_write_iov(&self, d: &Direct, offset: u64, iov: &GuestIov) -> io::Result<()> {
        let len = iov.len();
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let a = d.align;
        let (start, aend) = (round_down(offset, a), round_up(end, a));
        let rmw = start != offset || aend != end;
        let _shared = if rmw { None } else { self.shared() };
        let _exclusive = rmw.then(|| self.exclusive());
        with_bounce((aend - start).min(d.chunk) as usize, d.mem_align, |buf| {
            let mut cs = start;
            while cs < aend {
                let ce = (cs + d.chunk).min(aend);
                let b = &mut buf[..(ce - cs) as usize];
                let (ds, de) = (cs.max(offset), ce.min(end));
                let head = ds > cs;
                if head {
                    self.read_block(d, &mut b[..a as usize], cs)?;
                }
                if de < ce && !(head && ce - cs == a) {
                    let bl = b.len();
                    self.read_block(d, &mut b[bl - a as usize..], ce - a)?;
                }
                iov.copy_to(ds - offset, &mut b[(ds - cs) as usize..(de - cs) as usize]);
                self.pwrite_direct(d, b, cs)?;
                cs = ce;
            }
            io::Result::Ok(())
        })?;
        if aend > self.file_len {
            self.file.set_len(self.file_len)?;
        }
        Ok(())
    }

    /// `fallocate` over a range, retrying on EINTR. `Ok(false)` means the mode is not
    /// supported here (now or, if `flag` was cleared, ever).
    fn try_fallocate(
        &self,
        mode: FallocateFlags,
        flag: &AtomicBool,
        offset: u64,
        len: u64,
    ) -> io::Result<bool> {
        if !flag.load(Relaxed) {
            return Ok(false);
        }
        let _shared = self.shared();
        loop {
            return match rustix::fs::fallocate(&self.file, mode, offset, len) {
                Ok(()) => Ok(true),
                Err(Errno::INTR) => continue,
                Err(Errno::OPNOTSUPP | Errno::NOSYS) => {
                    flag.store(false, Relaxed);
                    Ok(false)
                }
                // Block devices want sector-aligned ranges: fall back for this request only.
                Err(Errno::INVAL) => Ok(false),
                Err(e) => Err(e.into()),
            };
        }
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<bool> {
        let mode = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        self.try_fallocate(mode, &self.can_punch, offset, len)
    }

    /// Writes zeroes with ordinary writes (the fallback when fallocate cannot).
    fn write_zero_bytes(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeros = vec![0u8; len.min(ZERO_CHUNK) as usize];
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(ZERO_CHUNK);
            self.write_impl(pos, n, &[IoSlice::new(&zeros[..n as usize])])?;
            pos += n;
        }
        Ok(())
    }

    fn discard_impl(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 || self.punch(offset, len)? {
            return Ok(());
        }
        self.write_zero_bytes(offset, len)
    }

    fn write_zeroes_impl(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mode = FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE;
        if self.try_fallocate(mode, &self.can_zero_range, offset, len)?
            || self.punch(offset, len)?
        {
            return Ok(());
        }
        self.write_zero_bytes(offset, len)
    }
}

impl BlockBackend for RawFile {
    fn info(&self) -> BackendInfo {
        self.info
    }

    fn read_vectored(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let len = iov::total_mut(bufs);
        let r = check_range(offset, len, self.info.capacity)
            .and_then(|()| Ok(self.read_impl(offset, len, bufs)?));
        self.stats.track(r)?;
        self.stats.record_read(len);
        Ok(())
    }

    fn write_vectored(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        let len = iov::total(bufs);
        let r = self
            .check_writable(offset, len)
            .and_then(|()| Ok(self.write_impl(offset, len, bufs)?));
        self.stats.track(r)?;
        self.stats.record_write(len);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.stats
            .track(self.file.sync_data().map_err(BlockError::from))?;
        self.stats.record_flush();
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let r = self
            .check_writable(offset, len)
            .and_then(|()| Ok(self.discard_impl(offset, len)?));
        self.stats.track(r)?;
        self.stats.record_discard();
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let r = self
            .check_writable(offset, len)
            .and_then(|()| Ok(self.write_zeroes_impl(offset, len)?));
        self.stats.track(r)?;
        self.stats.record_write_zeroes();
        Ok(())
    }

    fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    fn dispatch(&self) -> Dispatch<'_> {
        use std::os::fd::AsFd;
        if self.in_memory {
            return Dispatch::Inline;
        }
        Dispatch::Fd {
            fd: self.file.as_fd(),
            direct: self.direct.as_ref().map(|d| (d.align, d.mem_align)),
        }
    }

    fn read_iov(&self, offset: u64, iov: &GuestIov) -> Result<()> {
        use std::os::fd::AsFd;
        let len = iov.len();
        let r = check_range(offset, len, self.info.capacity).and_then(|()| {
            match &self.direct {
                Some(d) => self.direct_read_iov(d, offset, iov)?,
                None => {
                    let n = guest::preadv(self.file.as_fd(), iov, offset)?;
                    // End of file inside the disk (the file shrank after open): zeroes.
                    iov.zero_from(n as u64);
                }
            }
            Ok(())
        });
        self.stats.track(r)?;
        self.stats.record_read(len);
        Ok(())
    }

    fn write_iov(&self, offset: u64, iov: &GuestIov) -> Result<()> {
        use std::os::fd::AsFd;
        let len = iov.len();
        let r = self.check_writable(offset, len).and_then(|()| {
            match &self.direct {
                Some(d) => self.direct_write_iov(d, offset, iov)?,
                None => {
                    if (guest::pwritev(self.file.as_fd(), iov, offset)? as u64) < len {
                        return Err(io::Error::from(io::ErrorKind::WriteZero).into());
                    }
                }
            }
            Ok(())
        });
        self.stats.track(r)?;
        self.stats.record_write(len);
        Ok(())
    }

    fn account(&self, op: Op, bytes: u64, ok: bool) {
        if !ok {
            self.stats.record_error();
            return;
        }
        match op {
            Op::Read => self.stats.record_read(bytes),
            Op::Write => self.stats.record_write(bytes),
            Op::Flush => self.stats.record_flush(),
            Op::Discard => self.stats.record_discard(),
            Op::WriteZeroes => self.stats.record_write_zeroes(),
        }
    }
}

#[cfg(test)]
#[path = "file_tests.rs"]
mod tests;
