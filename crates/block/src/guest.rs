//! [`GuestIov`]: the data buffers of one request as host iovecs straight into guest memory.
//!
//! This module and [`crate::uring`] hold the block layer's only `unsafe` code. A `GuestIov` is
//! built from guest physical ranges through `vm-memory` (which checks each range lies inside a
//! mapped region and splits it at region boundaries); it then keeps the mapping alive with an
//! `Arc` of the memory map, so the pointers stay valid for as long as the request exists, even if
//! the frontend installs a new memory map meanwhile. Nothing here creates a Rust reference into
//! guest memory: the guest may change those bytes at any time, so they are only ever touched
//! through raw-pointer copies or handed to the kernel.
#![allow(unsafe_code)]

use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// A guest range named by the guest is not (entirely) guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("guest range {addr:#x}+{len:#x} is not guest RAM")]
pub struct OutsideRam {
    /// First byte of the range.
    pub addr: u64,
    /// Length of the range.
    pub len: u64,
}

/// Size of the discard buffer that bit-bucket segments point at.
/// Bytes of bit bucket one iovec carries ([`GuestIov::push_sink`] adds one per this many).
pub const SINK_SEGMENT: u64 = 64 << 10;
const SINK_LEN: usize = SINK_SEGMENT as usize;

/// Where bit-bucket bytes go: read data nobody wants. The kernel writes it; nothing reads it.
fn sink() -> *mut u8 {
    static SINK: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *SINK.get_or_init(|| Box::leak(vec![0u8; SINK_LEN].into_boxed_slice()).as_mut_ptr() as usize)
        as *mut u8
}

/// The data buffers of one request: host iovecs into guest memory (and bit buckets).
pub struct GuestIov {
    iov: Vec<libc::iovec>,
    len: u64,
    mem: Option<Arc<GuestMemoryMmap>>,
}

// SAFETY: the raw pointers point into guest memory kept mapped by `mem` (or into the leaked
// sink buffer); they carry no thread affinity, and every access through them is a raw copy or a
// syscall, never a reference.
unsafe impl Send for GuestIov {}
// SAFETY: as for Send; `&GuestIov` only allows copying through the pointers, which is the same
// unsynchronised access the guest itself has.
unsafe impl Sync for GuestIov {}

impl std::fmt::Debug for GuestIov {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestIov")
            .field("segments", &self.iov.len())
            .field("len", &self.len)
            .finish()
    }
}

impl Default for GuestIov {
    fn default() -> Self {
        Self::new()
    }
}

impl GuestIov {
    /// An empty list.
    pub fn new() -> Self {
        GuestIov {
            iov: Vec::new(),
            len: 0,
            mem: None,
        }
    }

    /// Empty the list for reuse; keeps its allocation, drops the memory map reference.
    pub fn clear(&mut self) {
        self.iov.clear();
        self.len = 0;
        self.mem = None;
    }

    /// Use `mem` for the ranges pushed from now on (and keep it mapped while this list lives).
    pub fn set_memory(&mut self, mem: Arc<GuestMemoryMmap>) {
        self.mem = Some(mem);
    }

    /// Total bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the list holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Segments the list can hold without reallocating.
    pub fn capacity(&self) -> usize {
        self.iov.capacity()
    }

    /// Number of host segments.
    pub fn segments(&self) -> usize {
        self.iov.len()
    }

    /// Append the guest range `[addr, addr + len)`. Fails, leaving the list unchanged, unless
    /// the whole range is guest RAM of the memory given to [`GuestIov::set_memory`].
    pub fn push_guest(&mut self, addr: u64, len: u64) -> Result<(), OutsideRam> {
        if len == 0 {
            return Ok(());
        }
        // Borrow the map out of `self` for the walk (no reference-count traffic).
        let mem = self.mem.take().ok_or(OutsideRam { addr, len })?;
        let r = self.push_from(&mem, addr, len);
        self.mem = Some(mem);
        r
    }

    fn push_from(&mut self, mem: &GuestMemoryMmap, addr: u64, len: u64) -> Result<(), OutsideRam> {
        let bad = OutsideRam { addr, len };
        let n = usize::try_from(len).map_err(|_| bad)?;
        if addr.checked_add(len).is_none() || !mem.check_range(GuestAddress(addr), n) {
            return Err(bad);
        }
        let before = (self.iov.len(), self.len);
        for slice in mem.get_slices(GuestAddress(addr), n) {
            let Ok(s) = slice else {
                self.iov.truncate(before.0);
                self.len = before.1;
                return Err(bad);
            };
            self.push_raw(s.ptr_guard_mut().as_ptr(), s.len());
        }
        Ok(())
    }

    /// Append `len` bytes of bit bucket: read data for them is dropped. Only for reads.
    pub fn push_sink(&mut self, len: u64) {
        let mut left = len;
        while left > 0 {
            let n = left.min(SINK_LEN as u64) as usize;
            self.push_raw(sink(), n);
            left -= n as u64;
        }
    }

    fn push_raw(&mut self, base: *mut u8, n: usize) {
        if n == 0 {
            return;
        }
        if let Some(last) = self.iov.last_mut() {
            // SAFETY: pointer arithmetic only (no access); `last` describes one live mapping.
            let end = unsafe { (last.iov_base as *mut u8).add(last.iov_len) };
            if end == base && base != sink() {
                last.iov_len += n;
                self.len += n as u64;
                return;
            }
        }
        self.iov.push(libc::iovec {
            iov_base: base.cast(),
            iov_len: n,
        });
        self.len += n as u64;
    }

    /// The iovecs, for a readv/writev-style syscall or io_uring. The caller must not let the
    /// kernel write through them for a write request.
    pub(crate) fn raw(&self) -> &[libc::iovec] {
        &self.iov
    }

    /// Drop the first `n` bytes (after a short transfer, to resubmit the rest).
    pub fn advance(&mut self, mut n: u64) {
        let mut drop = 0;
        for v in &mut self.iov {
            if n == 0 {
                break;
            }
            let k = (v.iov_len as u64).min(n);
            // SAFETY: stays within the segment (k <= iov_len).
            v.iov_base = unsafe { (v.iov_base as *mut u8).add(k as usize) }.cast();
            v.iov_len -= k as usize;
            n -= k;
            self.len -= k;
            if v.iov_len == 0 {
                drop += 1;
            }
        }
        self.iov.drain(..drop);
    }

    /// Walk the segments overlapping `[at, at + len)` as (segment pointer, offset in the
    /// caller's buffer, length), skipping bit buckets.
    fn walk(&self, at: u64, len: usize, mut f: impl FnMut(*mut u8, usize, usize)) -> usize {
        let mut pos = 0u64; // start of the current segment within the list
        let mut done = 0usize;
        let sink = sink();
        for v in &self.iov {
            let seg_end = pos + v.iov_len as u64;
            let want_start = at + done as u64;
            if done < len && seg_end > want_start {
                let within = (want_start - pos) as usize;
                let n = (v.iov_len - within).min(len - done);
                if v.iov_base as *mut u8 != sink {
                    // SAFETY: within < iov_len, so the pointer stays in the segment.
                    f(unsafe { (v.iov_base as *mut u8).add(within) }, done, n);
                }
                done += n;
            }
            pos = seg_end;
            if done == len {
                break;
            }
        }
        done
    }

    /// Copy `src` into the buffers starting `at` bytes in (a read's data reaching the guest).
    /// Returns the bytes placed (short only if the list ends first).
    pub fn copy_from(&self, at: u64, src: &[u8]) -> usize {
        self.walk(at, src.len(), |p, off, n| {
            // SAFETY: `p..p+n` is inside a segment of guest memory kept mapped by `self.mem`;
            // `src[off..off+n]` is a distinct host buffer, so the ranges cannot overlap.
            unsafe { std::ptr::copy_nonoverlapping(src[off..].as_ptr(), p, n) }
        })
    }

    /// Copy from the buffers starting `at` bytes in into `dst` (a write's data leaving the
    /// guest). Returns the bytes copied.
    pub fn copy_to(&self, at: u64, dst: &mut [u8]) -> usize {
        let len = dst.len();
        let d = dst.as_mut_ptr();
        self.walk(at, len, |p, off, n| {
            // SAFETY: as in `copy_from`, with the roles swapped; `d.add(off)..+n` is in `dst`.
            unsafe { std::ptr::copy_nonoverlapping(p, d.add(off), n) }
        })
    }

    /// Fill the buffers with zeroes from `at` to the end.
    pub fn zero_from(&self, at: u64) {
        let len = self.len.saturating_sub(at) as usize;
        self.walk(at, len, |p, _, n| {
            // SAFETY: `p..p+n` is inside a live guest segment.
            unsafe { std::ptr::write_bytes(p, 0, n) }
        });
    }
}

/// `preadv` into `iov` at `offset`, retrying on EINTR; returns bytes read (short at end of file).
pub(crate) fn preadv(
    fd: std::os::fd::BorrowedFd<'_>,
    iov: &GuestIov,
    offset: u64,
) -> std::io::Result<usize> {
    rw(fd, iov.raw(), offset, true)
}

/// `pwritev` from `iov` at `offset`, retrying on EINTR; returns bytes written.
pub(crate) fn pwritev(
    fd: std::os::fd::BorrowedFd<'_>,
    iov: &GuestIov,
    offset: u64,
) -> std::io::Result<usize> {
    rw(fd, iov.raw(), offset, false)
}

/// Most iovecs one `preadv`/`pwritev` call accepts (Linux `IOV_MAX`).
pub(crate) const IOV_MAX: usize = 1024;

fn rw(
    fd: std::os::fd::BorrowedFd<'_>,
    iov: &[libc::iovec],
    offset: u64,
    read: bool,
) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut total = 0usize;
    let mut idx = 0usize;
    let mut skip = 0usize; // bytes of iov[idx] already done
    let mut local: Vec<libc::iovec> = Vec::new();
    while idx < iov.len() {
        let n = (iov.len() - idx).min(IOV_MAX);
        local.clear();
        local.extend_from_slice(&iov[idx..idx + n]);
        if skip > 0 {
            // SAFETY: skip < iov_len of this segment (it was partially transferred).
            local[0].iov_base = unsafe { (local[0].iov_base as *mut u8).add(skip) }.cast();
            local[0].iov_len -= skip;
        }
        let off = libc::off_t::try_from(offset + total as u64)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: every iovec points into memory kept mapped by the caller's GuestIov (or the
        // sink); for a read the kernel writes only within those ranges.
        let r = unsafe {
            if read {
                libc::preadv(fd.as_raw_fd(), local.as_ptr(), n as libc::c_int, off)
            } else {
                libc::pwritev(fd.as_raw_fd(), local.as_ptr(), n as libc::c_int, off)
            }
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Ok(total);
        }
        let mut k = r as usize;
        total += k;
        // Advance (idx, skip) by k bytes.
        while k > 0 && idx < iov.len() {
            let rest = iov[idx].iov_len - skip;
            if k >= rest {
                k -= rest;
                idx += 1;
                skip = 0;
            } else {
                skip += k;
                k = 0;
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn mem() -> Arc<GuestMemoryMmap> {
        // Two regions with a hole between them, as under KVM around the PCI hole.
        Arc::new(
            GuestMemoryMmap::from_ranges(&[
                (GuestAddress(0), 0x10000),
                (GuestAddress(0x10000), 0x10000),
                (GuestAddress(0x40000), 0x1000),
            ])
            .unwrap(),
        )
    }

    #[test]
    fn ranges_split_at_regions_and_holes_are_refused() {
        let m = mem();
        let mut iov = GuestIov::new();
        iov.set_memory(m.clone());
        iov.push_guest(0xff00, 0x200).unwrap(); // crosses the region boundary
        assert_eq!(iov.len(), 0x200);
        assert_eq!(
            iov.push_guest(0x1ff00, 0x200),
            Err(OutsideRam {
                addr: 0x1ff00,
                len: 0x200
            })
        );
        assert_eq!(
            iov.len(),
            0x200,
            "a refused range leaves the list unchanged"
        );
        assert!(iov.push_guest(u64::MAX - 4, 8).is_err());
        assert!(iov.push_guest(0x50000, 1).is_err());
        iov.copy_from(0, &[7u8; 0x200]);
        let mut back = [0u8; 0x200];
        m.read_slice(&mut back, GuestAddress(0xff00)).unwrap();
        assert_eq!(back, [7u8; 0x200]);
    }

    #[test]
    fn copies_cross_segments_and_skip_bit_buckets() {
        let m = mem();
        m.write_slice(&[1, 2, 3, 4], GuestAddress(0x100)).unwrap();
        m.write_slice(&[5, 6, 7, 8], GuestAddress(0x40000)).unwrap();
        let mut iov = GuestIov::new();
        iov.set_memory(m.clone());
        iov.push_guest(0x100, 4).unwrap();
        iov.push_sink(3);
        iov.push_guest(0x40000, 4).unwrap();
        assert_eq!((iov.len(), iov.segments()), (11, 3));
        let mut out = [0u8; 6];
        assert_eq!(iov.copy_to(2, &mut out), 6);
        assert_eq!(out, [3, 4, 0, 0, 0, 5], "bit bucket bytes are left alone");
        iov.copy_from(0, &[9; 11]);
        let mut a = [0u8; 4];
        m.read_slice(&mut a, GuestAddress(0x40000)).unwrap();
        assert_eq!(a, [9; 4]);
        iov.zero_from(5);
        m.read_slice(&mut a, GuestAddress(0x100)).unwrap();
        assert_eq!(a, [9; 4]);
        m.read_slice(&mut a, GuestAddress(0x40000)).unwrap();
        assert_eq!(a, [0; 4]);
        iov.advance(6);
        assert_eq!((iov.len(), iov.segments()), (5, 2));
    }

    #[test]
    fn preadv_pwritev_through_guest_memory() {
        use std::os::fd::AsFd;
        let m = mem();
        let path = std::env::temp_dir().join(format!("rhyve-guest-iov-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        m.write_slice(&[0xab; 0x3000], GuestAddress(0xe000))
            .unwrap();
        let mut iov = GuestIov::new();
        iov.set_memory(m.clone());
        // 2000 separate 1-byte pieces exceed IOV_MAX: the helper loops.
        for i in 0..2000u64 {
            iov.push_guest(0xe000 + i * 2, 1).unwrap();
        }
        assert_eq!(pwritev(f.as_fd(), &iov, 512).unwrap(), 2000);
        let mut rd = GuestIov::new();
        rd.set_memory(m.clone());
        rd.push_guest(0x40000, 0x1000).unwrap();
        assert_eq!(
            preadv(f.as_fd(), &rd, 0).unwrap(),
            2512,
            "short at end of file"
        );
        let mut got = vec![0u8; 2512];
        m.read_slice(&mut got, GuestAddress(0x40000)).unwrap();
        assert!(got[..512].iter().all(|&b| b == 0));
        assert!(got[512..].iter().all(|&b| b == 0xab));
    }
}
