//! Helpers for walking iovec lists: total lengths and sequential copy cursors.

use std::io::{IoSlice, IoSliceMut};

/// Total length of read buffers, in bytes.
pub(crate) fn total_mut(bufs: &[IoSliceMut<'_>]) -> u64 {
    bufs.iter().map(|b| b.len() as u64).sum()
}

/// Total length of write buffers, in bytes.
pub(crate) fn total(bufs: &[IoSlice<'_>]) -> u64 {
    bufs.iter().map(|b| b.len() as u64).sum()
}

/// Fills a list of read buffers front to back.
pub(crate) struct FillCursor<'a, 'b> {
    bufs: &'a mut [IoSliceMut<'b>],
    idx: usize,
    off: usize,
}

impl<'a, 'b> FillCursor<'a, 'b> {
    pub(crate) fn new(bufs: &'a mut [IoSliceMut<'b>]) -> Self {
        Self {
            bufs,
            idx: 0,
            off: 0,
        }
    }

    /// Copies `src` into the next bytes of the buffers. Panics if they are too short
    /// (callers size requests from the buffers, so that is a bug).
    pub(crate) fn fill(&mut self, mut src: &[u8]) {
        while !src.is_empty() {
            let buf = &mut self.bufs[self.idx][self.off..];
            let n = buf.len().min(src.len());
            buf[..n].copy_from_slice(&src[..n]);
            self.advance(n);
            src = &src[n..];
        }
    }

    /// Writes `n` zero bytes into the next bytes of the buffers.
    pub(crate) fn zero(&mut self, mut n: usize) {
        while n > 0 {
            let buf = &mut self.bufs[self.idx][self.off..];
            let k = buf.len().min(n);
            buf[..k].fill(0);
            self.advance(k);
            n -= k;
        }
    }

    fn advance(&mut self, n: usize) {
        self.off += n;
        while self.idx < self.bufs.len() && self.off == self.bufs[self.idx].len() {
            self.idx += 1;
            self.off = 0;
        }
    }
}

/// Drains a list of write buffers front to back.
pub(crate) struct DrainCursor<'a, 'b> {
    bufs: &'a [IoSlice<'b>],
    idx: usize,
    off: usize,
}

impl<'a, 'b> DrainCursor<'a, 'b> {
    pub(crate) fn new(bufs: &'a [IoSlice<'b>]) -> Self {
        Self {
            bufs,
            idx: 0,
            off: 0,
        }
    }

    /// Copies the next `dst.len()` bytes of the buffers into `dst`. Panics if they are too short.
    pub(crate) fn drain(&mut self, mut dst: &mut [u8]) {
        while !dst.is_empty() {
            while self.off == self.bufs[self.idx].len() {
                self.idx += 1;
                self.off = 0;
            }
            let buf = &self.bufs[self.idx][self.off..];
            let n = buf.len().min(dst.len());
            dst[..n].copy_from_slice(&buf[..n]);
            self.off += n;
            dst = &mut dst[n..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_cross_buffer_boundaries() {
        let (mut a, mut b, mut c) = ([1u8; 3], [1u8; 0], [1u8; 5]);
        let mut bufs = [
            IoSliceMut::new(&mut a),
            IoSliceMut::new(&mut b),
            IoSliceMut::new(&mut c),
        ];
        assert_eq!(total_mut(&bufs), 8);
        let mut cur = FillCursor::new(&mut bufs);
        cur.fill(&[9, 8]);
        cur.zero(2);
        cur.fill(&[7, 6, 5, 4]);
        assert_eq!((a, c), ([9, 8, 0], [0, 7, 6, 5, 4]));

        let src = [[1u8, 2], [3, 4]];
        let wb = [
            IoSlice::new(&[]),
            IoSlice::new(&src[0]),
            IoSlice::new(&[]),
            IoSlice::new(&src[1]),
        ];
        assert_eq!(total(&wb), 4);
        let mut d = DrainCursor::new(&wb);
        let mut out = [0u8; 3];
        d.drain(&mut out);
        assert_eq!(out, [1, 2, 3]);
        let mut last = [0u8; 1];
        d.drain(&mut last);
        assert_eq!(last, [4]);
    }
}
