//! Data pointers: PRP entries and lists, and SGLs, walked into guest-memory segments.
//!
//! A [`Walker`] yields a command's data segments one at a time, so nothing is allocated in
//! proportion to the transfer size: the I/O path maps a bounded number of segments per backend
//! request (see [`crate::io`]) and [`validate`] walks a whole pointer once, without storing it,
//! so a bad pointer fails the command with the spec's status before any data moves. Every
//! segment is checked to lie inside guest RAM; list walks are bounded by the transfer length
//! (PRP) or a descriptor budget (SGL), so a hostile list cannot loop.

use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};
use zerocopy::FromBytes;

use crate::spec::{sgl, SglDescriptor, Sqe, Status};

/// A piece of a transfer: guest address and length; `None` is an SGL bit bucket (read data is
/// dropped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address, or `None` for a bit bucket.
    pub addr: Option<u64>,
    /// Length in bytes.
    pub len: u64,
}

/// Most SGL descriptors walked for one command (hostile chains end here).
pub const MAX_SGL_DESCRIPTORS: usize = 4096;

/// A command's data pointer, decoded from the SQE.
#[derive(Clone, Copy, Debug)]
pub enum DataPtr {
    /// PRP1/PRP2 with the controller's memory page size.
    Prp {
        /// PRP Entry 1.
        prp1: u64,
        /// PRP Entry 2 (data pointer or list pointer).
        prp2: u64,
        /// CC.MPS page size in bytes.
        page: u64,
    },
    /// SGL Entry 1.
    Sgl(SglDescriptor),
}

impl DataPtr {
    /// The data pointer of `sqe` (PSDT 00b: PRPs, 01b: SGL; 10b is not offered).
    pub fn of(sqe: &Sqe, page: u64) -> Result<DataPtr, Status> {
        match sqe.psdt() {
            0 => Ok(DataPtr::Prp {
                prp1: sqe.dptr[0],
                prp2: sqe.dptr[1],
                page,
            }),
            1 => {
                let mut b = [0u8; 16];
                b[..8].copy_from_slice(&sqe.dptr[0].to_le_bytes());
                b[8..].copy_from_slice(&sqe.dptr[1].to_le_bytes());
                SglDescriptor::read_from_bytes(&b)
                    .map(DataPtr::Sgl)
                    .map_err(|_| Status::INVALID_FIELD)
            }
            _ => Err(Status::INVALID_FIELD),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Stage {
    /// PRP1 not yet emitted.
    PrpFirst,
    /// PRP2 is the (single) second data pointer.
    PrpSecond,
    /// Next entry to read is at `list`.
    PrpList {
        list: u64,
    },
    /// SGL Entry 1 is itself a data descriptor.
    SglSingle,
    /// Inside segment `seg`, at descriptor `i` of `n`.
    SglSegment {
        seg: SglDescriptor,
        i: usize,
        n: usize,
    },
    Done,
}

/// Yields a data pointer's segments in transfer order.
#[derive(Clone, Debug)]
pub struct Walker {
    ptr: DataPtr,
    len: u64,
    host_to_ctrl: bool,
    /// Bytes described so far.
    described: u64,
    walked: usize,
    stage: Stage,
    /// The unused tail of a segment the caller gave back ([`Walker::put_back`]).
    carry: Option<Segment>,
}

impl Walker {
    /// Start walking `len` bytes of `ptr`; `host_to_ctrl` is true for writes (SGL bit buckets
    /// are then invalid).
    pub fn new(ptr: DataPtr, len: u64, host_to_ctrl: bool) -> Result<Walker, Status> {
        let stage = match ptr {
            _ if len == 0 && matches!(ptr, DataPtr::Prp { .. }) => Stage::Done,
            DataPtr::Prp { prp1, .. } => {
                if prp1 & 3 != 0 {
                    return Err(Status::PRP_OFFSET_INVALID);
                }
                Stage::PrpFirst
            }
            DataPtr::Sgl(d) => match d.id >> 4 {
                sgl::DATA_BLOCK | sgl::BIT_BUCKET => Stage::SglSingle,
                _ => Self::enter_segment(d, 0)?.0,
            },
        };
        let walked = match stage {
            Stage::SglSegment { n, .. } => n,
            _ => 0,
        };
        Ok(Walker {
            ptr,
            len,
            host_to_ctrl,
            described: 0,
            walked,
            stage,
            carry: None,
        })
    }

    /// Bytes of the transfer not yet described (a given-back tail included).
    pub fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.described) + self.carry.map_or(0, |c| c.len)
    }

    /// Give back the unused tail of the segment [`Walker::next`] just returned: the next call
    /// returns it again.
    pub fn put_back(&mut self, seg: Segment) {
        debug_assert!(self.carry.is_none());
        self.carry = Some(seg);
    }

    fn enter_segment(seg: SglDescriptor, walked: usize) -> Result<(Stage, usize), Status> {
        let (styp, sub) = (seg.id >> 4, seg.id & 0xf);
        if (styp != sgl::SEGMENT && styp != sgl::LAST_SEGMENT) || sub != 0 {
            return Err(Status::SGL_TYPE_INVALID);
        }
        if seg.len == 0 || !seg.len.is_multiple_of(16) {
            return Err(Status::INVALID_SGL_SEGMENT);
        }
        let n = (seg.len / 16) as usize;
        if walked + n > MAX_SGL_DESCRIPTORS {
            return Err(Status::INVALID_SGL_COUNT);
        }
        Ok((Stage::SglSegment { seg, i: 0, n }, walked + n))
    }

    fn data_desc(&mut self, d: &SglDescriptor) -> Result<Option<Segment>, Status> {
        let (typ, sub) = (d.id >> 4, d.id & 0xf);
        let l = u64::from(d.len);
        let addr = match typ {
            sgl::DATA_BLOCK if sub == 0 => Some(d.addr),
            sgl::BIT_BUCKET if sub == 0 && !self.host_to_ctrl => None,
            _ => return Err(Status::SGL_TYPE_INVALID),
        };
        self.described += l;
        if self.described > self.len {
            return Err(Status::DATA_SGL_LENGTH_INVALID);
        }
        Ok((l > 0).then_some(Segment { addr, len: l }))
    }

    /// The next segment, `None` at the end. Errors are the command's status.
    pub fn next<M: GuestMemory>(&mut self, mem: &M) -> Result<Option<Segment>, Status> {
        if let Some(c) = self.carry.take() {
            return Ok(Some(c));
        }
        loop {
            match (self.stage, self.ptr) {
                (Stage::Done, _) => {
                    if self.described != self.len {
                        return Err(Status::DATA_SGL_LENGTH_INVALID);
                    }
                    return Ok(None);
                }
                (Stage::PrpFirst, DataPtr::Prp { prp1, prp2, page }) => {
                    let first = self.len.min(page - (prp1 & (page - 1)));
                    self.described = first;
                    let rem = self.len - first;
                    self.stage = if rem == 0 {
                        Stage::Done
                    } else if rem <= page {
                        if prp2 & (page - 1) != 0 {
                            return Err(Status::PRP_OFFSET_INVALID);
                        }
                        Stage::PrpSecond
                    } else {
                        if prp2 & 7 != 0 {
                            return Err(Status::PRP_OFFSET_INVALID);
                        }
                        Stage::PrpList { list: prp2 }
                    };
                    return Ok(Some(Segment {
                        addr: Some(prp1),
                        len: first,
                    }));
                }
                (Stage::PrpSecond, DataPtr::Prp { prp2, .. }) => {
                    let n = self.remaining();
                    self.described = self.len;
                    self.stage = Stage::Done;
                    return Ok(Some(Segment {
                        addr: Some(prp2),
                        len: n,
                    }));
                }
                (Stage::PrpList { list }, DataPtr::Prp { page, .. }) => {
                    let rem = self.remaining();
                    if rem == 0 {
                        self.stage = Stage::Done;
                        continue;
                    }
                    let entry: u64 = mem
                        .read_obj(GuestAddress(list))
                        .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
                    // Like every entry inside a PRP list it has a zero page offset (Base 2.0
                    // §4.1.1); this also guarantees each further list page holds data entries,
                    // so a chain of one-slot "pages" cannot loop forever.
                    if entry & (page - 1) != 0 {
                        return Err(Status::PRP_OFFSET_INVALID);
                    }
                    let last_slot = (list + 8) & (page - 1) == 0;
                    if last_slot && rem > page {
                        // Last slot of a list page with more than one page to go: next list.
                        self.stage = Stage::PrpList { list: entry };
                        continue;
                    }
                    let n = rem.min(page);
                    self.described += n;
                    self.stage = Stage::PrpList {
                        list: list.wrapping_add(8),
                    };
                    return Ok(Some(Segment {
                        addr: Some(entry),
                        len: n,
                    }));
                }
                (Stage::SglSingle, DataPtr::Sgl(d)) => {
                    self.stage = Stage::Done;
                    if let Some(s) = self.data_desc(&d)? {
                        return Ok(Some(s));
                    }
                }
                (Stage::SglSegment { seg, i, n }, _) => {
                    if i == n {
                        // Ran off the end of a segment without a chaining descriptor.
                        if seg.id >> 4 == sgl::SEGMENT {
                            return Err(Status::INVALID_SGL_SEGMENT);
                        }
                        self.stage = Stage::Done;
                        continue;
                    }
                    let d: SglDescriptor = read_struct(mem, seg.addr.wrapping_add(i as u64 * 16))
                        .ok_or(Status::DATA_TRANSFER_ERROR)?;
                    let dt = d.id >> 4;
                    if dt == sgl::SEGMENT || dt == sgl::LAST_SEGMENT {
                        // Only the last descriptor of a (non-last) segment may chain.
                        if i != n - 1 || seg.id >> 4 == sgl::LAST_SEGMENT {
                            return Err(Status::INVALID_SGL_SEGMENT);
                        }
                        let (st, w) = Self::enter_segment(d, self.walked)?;
                        self.walked = w;
                        self.stage = st;
                        continue;
                    }
                    self.stage = Stage::SglSegment { seg, i: i + 1, n };
                    if let Some(s) = self.data_desc(&d)? {
                        return Ok(Some(s));
                    }
                }
                _ => return Err(Status::INTERNAL_ERROR),
            }
        }
    }
}

fn check_ram<M: GuestMemory>(mem: &M, s: &Segment) -> Result<(), Status> {
    if let Some(a) = s.addr {
        let ok = usize::try_from(s.len).ok().is_some_and(|l| {
            a.checked_add(s.len).is_some()
                && mem.check_range(GuestAddress(a), l, Permissions::ReadWrite)
        });
        if !ok {
            return Err(Status::DATA_TRANSFER_ERROR);
        }
    }
    Ok(())
}

/// Walk a whole data pointer, checking every segment lies in guest RAM, without storing it.
/// Returns the number of segments.
pub fn validate<M: GuestMemory>(
    mem: &M,
    ptr: DataPtr,
    len: u64,
    host_to_ctrl: bool,
) -> Result<usize, Status> {
    let mut w = Walker::new(ptr, len, host_to_ctrl)?;
    let mut n = 0;
    while let Some(s) = w.next(mem)? {
        check_ram(mem, &s)?;
        n += 1;
    }
    Ok(n)
}

/// Walk a (small) data pointer into a list of segments, merged where contiguous.
pub fn collect<M: GuestMemory>(
    mem: &M,
    ptr: DataPtr,
    len: u64,
    host_to_ctrl: bool,
) -> Result<Vec<Segment>, Status> {
    let mut w = Walker::new(ptr, len, host_to_ctrl)?;
    let mut segs: Vec<Segment> = Vec::new();
    while let Some(s) = w.next(mem)? {
        match (segs.last_mut(), s.addr) {
            (Some(last), Some(a))
                if last.addr.and_then(|la| la.checked_add(last.len)) == Some(a) =>
            {
                last.len += s.len
            }
            _ => segs.push(s),
        }
    }
    for s in &segs {
        check_ram(mem, s)?;
    }
    Ok(segs)
}

/// Map `len` bytes described by PRP1/PRP2 with memory page size `page` (small transfers: admin
/// data, DSM ranges; the I/O path walks instead).
pub fn map_prp<M: GuestMemory>(
    mem: &M,
    prp1: u64,
    prp2: u64,
    len: u64,
    page: u64,
) -> Result<Vec<Segment>, Status> {
    collect(mem, DataPtr::Prp { prp1, prp2, page }, len, false)
}

/// Map `len` bytes described by SGL1 (the SQE's 16-byte data pointer). `host_to_ctrl` is true for
/// writes (bit buckets are then invalid).
#[cfg(test)]
pub fn map_sgl<M: GuestMemory>(
    mem: &M,
    sgl1: SglDescriptor,
    len: u64,
    host_to_ctrl: bool,
) -> Result<Vec<Segment>, Status> {
    collect(mem, DataPtr::Sgl(sgl1), len, host_to_ctrl)
}

/// Read a spec structure from guest memory.
pub fn read_struct<T: FromBytes, M: GuestMemory>(mem: &M, addr: u64) -> Option<T> {
    let mut buf = [0u8; 64];
    let n = std::mem::size_of::<T>();
    if n > buf.len() {
        let mut v = vec![0u8; n];
        mem.read_slice(&mut v, GuestAddress(addr)).ok()?;
        return T::read_from_bytes(&v).ok();
    }
    mem.read_slice(&mut buf[..n], GuestAddress(addr)).ok()?;
    T::read_from_bytes(&buf[..n]).ok()
}

/// Write a spec structure to guest memory.
#[cfg(test)]
pub fn write_struct<T: zerocopy::IntoBytes + zerocopy::Immutable, M: GuestMemory>(
    mem: &M,
    addr: u64,
    v: &T,
) -> Option<()> {
    mem.write_slice(v.as_bytes(), GuestAddress(addr)).ok()
}

/// Copy `data` into the segments (controller → host) and zero-fill whatever the segments
/// describe beyond it. Bit buckets swallow their share.
pub fn copy_to_guest<M: GuestMemory>(mem: &M, segs: &[Segment], data: &[u8]) -> Result<(), Status> {
    const ZEROES: [u8; 512] = [0; 512];
    let mut off = 0usize;
    for s in segs {
        let Some(a) = s.addr else {
            off += s.len as usize;
            continue;
        };
        let mut done = 0u64;
        while done < s.len {
            let src: &[u8] = if off < data.len() {
                &data[off..data.len().min(off + (s.len - done) as usize)]
            } else {
                &ZEROES[..ZEROES.len().min((s.len - done) as usize)]
            };
            mem.write_slice(src, GuestAddress(a + done))
                .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
            done += src.len() as u64;
            off += src.len();
        }
    }
    Ok(())
}

/// Fill `data` from the segments (host → controller).
pub fn copy_from_guest<M: GuestMemory>(
    mem: &M,
    segs: &[Segment],
    data: &mut [u8],
) -> Result<(), Status> {
    let mut off = 0usize;
    for s in segs {
        let n = (s.len as usize).min(data.len() - off);
        if let Some(a) = s.addr {
            mem.read_slice(&mut data[off..off + n], GuestAddress(a))
                .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
        }
        off += n;
        if off == data.len() {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn prp_two_pages_with_offset() {
        let m = mem();
        let s = map_prp(&m, 0x1ff8, 0x5000, 4096, 4096).unwrap();
        assert_eq!(
            s,
            vec![
                Segment {
                    addr: Some(0x1ff8),
                    len: 8
                },
                Segment {
                    addr: Some(0x5000),
                    len: 4088
                }
            ]
        );
        assert_eq!(
            map_prp(&m, 0x1ff8, 0x5008, 4096, 4096),
            Err(Status::PRP_OFFSET_INVALID)
        );
        assert_eq!(
            map_prp(&m, 0x1ff9, 0x5000, 4096, 4096),
            Err(Status::PRP_OFFSET_INVALID)
        );
    }

    #[test]
    fn prp_chained_lists() {
        // The data pages reach 0x226000: give this test 4 MiB.
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        // 1 + 511 + 2 pages: list page 1 at 0x10000 has 511 entries + chain to 0x11000.
        let pages = 514u64;
        for i in 0..511u64 {
            m.write_obj(0x1000 * (i + 40), GuestAddress(0x10000 + i * 8))
                .unwrap();
        }
        m.write_obj(0x11000u64, GuestAddress(0x10000 + 511 * 8))
            .unwrap();
        m.write_obj(0x30000u64, GuestAddress(0x11000)).unwrap();
        m.write_obj(0x31000u64, GuestAddress(0x11008)).unwrap();
        let s = map_prp(&m, 0x4000, 0x10000, pages * 4096, 4096).unwrap();
        let total: u64 = s.iter().map(|x| x.len).sum();
        assert_eq!(total, pages * 4096);
        assert_eq!(
            s.last().unwrap(),
            &Segment {
                addr: Some(0x30000),
                len: 0x2000
            }
        );
        // an entry pointing outside RAM
        m.write_obj(0x4000_0000u64, GuestAddress(0x11008)).unwrap();
        assert_eq!(
            map_prp(&m, 0x4000, 0x10000, pages * 4096, 4096),
            Err(Status::DATA_TRANSFER_ERROR)
        );
    }

    #[test]
    fn sgl_segments_and_errors() {
        let m = mem();
        let d = |addr: u64, len: u32, typ: u8| SglDescriptor {
            addr,
            len,
            rsvd: [0; 3],
            id: typ << 4,
        };
        write_struct(&m, 0x6000, &d(0x8000, 100, sgl::DATA_BLOCK)).unwrap();
        write_struct(&m, 0x6010, &d(0, 28, sgl::BIT_BUCKET)).unwrap();
        write_struct(&m, 0x6020, &d(0x7000, 16, sgl::LAST_SEGMENT)).unwrap();
        write_struct(&m, 0x7000, &d(0x9000, 384, sgl::DATA_BLOCK)).unwrap();
        let s = map_sgl(&m, d(0x6000, 48, sgl::SEGMENT), 512, false).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(
            s[1],
            Segment {
                addr: None,
                len: 28
            }
        );
        assert_eq!(
            map_sgl(&m, d(0x6000, 48, sgl::SEGMENT), 512, true),
            Err(Status::SGL_TYPE_INVALID)
        );
        assert_eq!(
            map_sgl(&m, d(0x6000, 48, sgl::SEGMENT), 4096, false),
            Err(Status::DATA_SGL_LENGTH_INVALID)
        );
        assert_eq!(
            map_sgl(&m, d(0x6000, 40, sgl::SEGMENT), 512, false),
            Err(Status::INVALID_SGL_SEGMENT)
        );
        assert_eq!(
            map_sgl(&m, d(0x6000, 16, sgl::SEGMENT), 100, false),
            Err(Status::INVALID_SGL_SEGMENT)
        );
        // a segment that chains to itself forever
        write_struct(&m, 0x6100, &d(0x6100, 16, sgl::SEGMENT)).unwrap();
        assert_eq!(
            map_sgl(&m, d(0x6100, 16, sgl::SEGMENT), 512, false),
            Err(Status::INVALID_SGL_COUNT)
        );
        assert_eq!(
            map_sgl(&m, d(0x100000 - 8, 16, sgl::DATA_BLOCK), 16, false),
            Err(Status::DATA_TRANSFER_ERROR)
        );
        assert_eq!(
            map_sgl(
                &m,
                SglDescriptor {
                    id: 0x51,
                    ..d(0, 16, 0)
                },
                16,
                false
            ),
            Err(Status::SGL_TYPE_INVALID)
        );
    }
}
