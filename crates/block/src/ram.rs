//! [`Ram`]: an in-memory disk in independently locked, lazily allocated chunks.

use std::io::{IoSlice, IoSliceMut};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::guest::GuestIov;
use crate::iov::{self, DrainCursor, FillCursor};
use crate::stats::{Stats, StatsSnapshot};
use crate::{
    check_range, validate_sector_size, BackendInfo, BlockBackend, BlockError, Dispatch, Result,
};

/// Bytes per chunk: the unit of locking and of lazy allocation.
const CHUNK: u64 = 256 << 10;

/// One chunk; `None` until first written, and again after a whole-chunk discard (reads zero).
type Chunk = RwLock<Option<Box<[u8]>>>;

/// An in-memory disk. Memory is allocated on first write; discard frees whole chunks.
#[derive(Debug)]
pub struct Ram {
    chunks: Vec<Chunk>,
    info: BackendInfo,
    stats: Stats,
}

impl Ram {
    /// A zero-filled RAM disk of `size_bytes` (a non-zero multiple of `sector_size`, which is
    /// 512 or 4096).
    pub fn new(size_bytes: u64, sector_size: u32) -> Result<Ram> {
        validate_sector_size(sector_size)?;
        if size_bytes == 0 || !size_bytes.is_multiple_of(u64::from(sector_size)) {
            return Err(BlockError::Config(format!(
                "RAM disk size {size_bytes} is not a positive multiple of the {sector_size}-byte sector size"
            )));
        }
        if usize::try_from(size_bytes).is_err() {
            return Err(BlockError::Config(format!(
                "RAM disk size {size_bytes} is too large"
            )));
        }
        let n = size_bytes.div_ceil(CHUNK);
        Ok(Ram {
            chunks: (0..n).map(|_| RwLock::new(None)).collect(),
            info: BackendInfo {
                capacity: size_bytes,
                sector_size,
                read_only: false,
                discard_zeroes: true,
            },
            stats: Stats::new(),
        })
    }

    /// Makes the disk refuse writes (or accept them again).
    pub fn with_read_only(mut self, read_only: bool) -> Self {
        self.info.read_only = read_only;
        self
    }

    /// Splits `[offset, offset+len)` into (chunk index, offset in chunk, length) pieces.
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (usize, usize, usize)> {
        let end = offset + len;
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let idx = pos / CHUNK;
            let within = pos % CHUNK;
            let n = (CHUNK - within).min(end - pos);
            pos += n;
            Some((idx as usize, within as usize, n as usize))
        })
    }

    fn chunk_len(&self, idx: usize) -> usize {
        (self.info.capacity - idx as u64 * CHUNK).min(CHUNK) as usize
    }

    fn read_chunk(&self, idx: usize) -> RwLockReadGuard<'_, Option<Box<[u8]>>> {
        self.chunks[idx].read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_chunk(&self, idx: usize) -> RwLockWriteGuard<'_, Option<Box<[u8]>>> {
        self.chunks[idx].write().unwrap_or_else(|e| e.into_inner())
    }

    fn check_writable(&self, offset: u64, len: u64) -> Result<()> {
        if self.info.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, len, self.info.capacity)
    }

    fn zero_range(&self, offset: u64, len: u64) {
        for (idx, within, n) in self.pieces(offset, len) {
            let mut chunk = self.write_chunk(idx);
            if n == self.chunk_len(idx) {
                *chunk = None;
            } else if let Some(data) = chunk.as_mut() {
                data[within..within + n].fill(0);
            }
        }
    }
}

impl BlockBackend for Ram {
    fn info(&self) -> BackendInfo {
        self.info
    }

    fn read_vectored(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let len = iov::total_mut(bufs);
        self.stats
            .track(check_range(offset, len, self.info.capacity))?;
        let mut cur = FillCursor::new(bufs);
        for (idx, within, n) in self.pieces(offset, len) {
            match self.read_chunk(idx).as_ref() {
                Some(data) => cur.fill(&data[within..within + n]),
                None => cur.zero(n),
            }
        }
        self.stats.record_read(len);
        Ok(())
    }

    fn write_vectored(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        let len = iov::total(bufs);
        self.stats.track(self.check_writable(offset, len))?;
        let mut cur = DrainCursor::new(bufs);
        for (idx, within, n) in self.pieces(offset, len) {
            let clen = self.chunk_len(idx);
            let mut chunk = self.write_chunk(idx);
            let data = chunk.get_or_insert_with(|| vec![0u8; clen].into_boxed_slice());
            cur.drain(&mut data[within..within + n]);
        }
        self.stats.record_write(len);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.stats.record_flush();
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.stats.track(self.check_writable(offset, len))?;
        self.zero_range(offset, len);
        self.stats.record_discard();
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.stats.track(self.check_writable(offset, len))?;
        self.zero_range(offset, len);
        self.stats.record_write_zeroes();
        Ok(())
    }

    fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    fn dispatch(&self) -> Dispatch<'_> {
        Dispatch::Inline
    }

    fn read_iov(&self, offset: u64, iov: &GuestIov) -> Result<()> {
        let len = iov.len();
        self.stats
            .track(check_range(offset, len, self.info.capacity))?;
        let mut at = 0u64;
        for (idx, within, n) in self.pieces(offset, len) {
            match self.read_chunk(idx).as_ref() {
                Some(data) => {
                    iov.copy_from(at, &data[within..within + n]);
                }
                None => zero_part(iov, at, n),
            }
            at += n as u64;
        }
        self.stats.record_read(len);
        Ok(())
    }

    fn write_iov(&self, offset: u64, iov: &GuestIov) -> Result<()> {
        let len = iov.len();
        self.stats.track(self.check_writable(offset, len))?;
        let mut at = 0u64;
        for (idx, within, n) in self.pieces(offset, len) {
            let clen = self.chunk_len(idx);
            let mut chunk = self.write_chunk(idx);
            let data = chunk.get_or_insert_with(|| vec![0u8; clen].into_boxed_slice());
            iov.copy_to(at, &mut data[within..within + n]);
            at += n as u64;
        }
        self.stats.record_write(len);
        Ok(())
    }
}

/// Zero `n` bytes of `iov` starting `at` bytes in (an unallocated chunk reads as zeroes).
fn zero_part(iov: &GuestIov, at: u64, n: usize) {
    const Z: [u8; 4096] = [0; 4096];
    let mut done = 0;
    while done < n {
        let k = (n - done).min(Z.len());
        iov.copy_from(at + done as u64, &Z[..k]);
        done += k;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_geometry() {
        assert!(Ram::new(0, 512).is_err());
        assert!(Ram::new(1000, 512).is_err());
        assert!(Ram::new(512, 4096).is_err());
        let e = Ram::new(4096, 1000).err().unwrap().to_string();
        assert_eq!(e, "sectorsz=1000 is invalid: use 512 or 4096");
    }

    #[test]
    fn roundtrip_across_chunks_and_discard() {
        // Not a multiple of CHUNK, so the last chunk is short.
        let size = 3 * CHUNK + 4096;
        let ram = Ram::new(size, 4096).unwrap();
        let data: Vec<u8> = (0..CHUNK as usize + 1000)
            .map(|i| (i % 251) as u8 + 1)
            .collect();
        let off = CHUNK - 500;
        let (a, b) = data.split_at(77);
        ram.write_vectored(off, &[IoSlice::new(a), IoSlice::new(&[]), IoSlice::new(b)])
            .unwrap();
        let mut back = vec![0u8; data.len()];
        ram.read_vectored(off, &mut [IoSliceMut::new(&mut back)])
            .unwrap();
        assert_eq!(back, data);

        // Discard a whole chunk plus a partial one: all reads zero, the whole chunk is freed.
        ram.discard(CHUNK, CHUNK + 10).unwrap();
        assert!(ram.chunks[1].read().unwrap().is_none());
        ram.read_vectored(off, &mut [IoSliceMut::new(&mut back)])
            .unwrap();
        assert_eq!(&back[..500], &data[..500]);
        assert!(back[500..510 + CHUNK as usize].iter().all(|&x| x == 0));
        assert_eq!(&back[510 + CHUNK as usize..], &data[510 + CHUNK as usize..]);

        // Writes reaching the short last chunk, and the range check at the very end.
        ram.write_vectored(size - 8, &[IoSlice::new(&[7; 8])])
            .unwrap();
        let mut tail = [0u8; 8];
        ram.read_vectored(size - 8, &mut [IoSliceMut::new(&mut tail)])
            .unwrap();
        assert_eq!(tail, [7; 8]);
        let err = ram
            .write_vectored(size - 7, &[IoSlice::new(&[7; 8])])
            .unwrap_err();
        assert!(
            matches!(err, BlockError::OutOfRange { offset, len: 8, capacity } if offset == size - 7 && capacity == size)
        );
        ram.write_zeroes(size - 8, 8).unwrap();
        ram.read_vectored(size - 8, &mut [IoSliceMut::new(&mut tail)])
            .unwrap();
        assert_eq!(tail, [0; 8]);

        let s = ram.stats();
        assert_eq!(
            (
                s.read_ops,
                s.write_ops,
                s.discards,
                s.write_zeroes,
                s.errors
            ),
            (4, 2, 1, 1, 1)
        );
    }

    #[test]
    fn read_only_ram_refuses_writes() {
        let ram = Ram::new(1 << 20, 512).unwrap().with_read_only(true);
        assert!(ram.info().read_only);
        assert!(matches!(
            ram.write_vectored(0, &[IoSlice::new(&[1])]),
            Err(BlockError::ReadOnly)
        ));
        assert!(matches!(ram.discard(0, 512), Err(BlockError::ReadOnly)));
        assert!(matches!(
            ram.write_zeroes(0, 512),
            Err(BlockError::ReadOnly)
        ));
        ram.flush().unwrap();
        let mut b = [1u8; 512];
        ram.read_vectored(0, &mut [IoSliceMut::new(&mut b)])
            .unwrap();
        assert_eq!(b, [0; 512]);
    }
}
