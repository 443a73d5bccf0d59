//! Data pointers: PRP entries and lists, and SGLs, mapped to guest-memory segments.
//!
//! Mapping happens before any data moves, so a bad pointer fails the command with the spec's
//! status and leaves guest memory and the disk untouched. Every segment is checked to lie inside
//! guest RAM; list walks are bounded by the transfer length, so a hostile list cannot loop.

use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};
use zerocopy::FromBytes;

use crate::spec::{sgl, SglDescriptor, Status};

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

fn push(segs: &mut Vec<Segment>, addr: Option<u64>, len: u64) {
    if len == 0 {
        return;
    }
    if let (Some(last), Some(a)) = (segs.last_mut(), addr) {
        if let Some(la) = last.addr {
            if la.checked_add(last.len) == Some(a) {
                last.len += len;
                return;
            }
        }
    }
    segs.push(Segment { addr, len });
}

fn check_ram<M: GuestMemory>(mem: &M, segs: &[Segment]) -> Result<(), Status> {
    for s in segs {
        if let Some(a) = s.addr {
            let ok = usize::try_from(s.len)
                .ok()
                .is_some_and(|l| mem.check_range(GuestAddress(a), l, Permissions::ReadWrite));
            if !ok {
                return Err(Status::DATA_TRANSFER_ERROR);
            }
        }
    }
    Ok(())
}

/// Map `len` bytes described by PRP1/PRP2 with memory page size `page`.
pub fn map_prp<M: GuestMemory>(
    mem: &M,
    prp1: u64,
    prp2: u64,
    len: u64,
    page: u64,
) -> Result<Vec<Segment>, Status> {
    let mut segs = Vec::new();
    if len == 0 {
        return Ok(segs);
    }
    if prp1 & 3 != 0 {
        return Err(Status::PRP_OFFSET_INVALID);
    }
    let first = len.min(page - (prp1 & (page - 1)));
    push(&mut segs, Some(prp1), first);
    let mut rem = len - first;
    if rem == 0 {
    } else if rem <= page {
        if prp2 & (page - 1) != 0 {
            return Err(Status::PRP_OFFSET_INVALID);
        }
        push(&mut segs, Some(prp2), rem);
    } else {
        let mut list = prp2;
        if list & 7 != 0 {
            return Err(Status::PRP_OFFSET_INVALID);
        }
        while rem > 0 {
            let in_page = (page - (list & (page - 1))) / 8;
            for i in 0..in_page {
                let entry: u64 = mem
                    .read_obj(GuestAddress(list + i * 8))
                    .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
                if i == in_page - 1 && rem > page {
                    // Last slot of a list page with more than one page to go: next list pointer.
                    // Like every entry inside a PRP list it has a zero page offset (Base 2.0
                    // §4.1.1); this also guarantees each further list page holds data entries,
                    // so a chain of one-slot "pages" cannot loop forever.
                    if entry & (page - 1) != 0 {
                        return Err(Status::PRP_OFFSET_INVALID);
                    }
                    list = entry;
                    break;
                }
                if entry & (page - 1) != 0 {
                    return Err(Status::PRP_OFFSET_INVALID);
                }
                let n = rem.min(page);
                push(&mut segs, Some(entry), n);
                rem -= n;
                if rem == 0 {
                    break;
                }
            }
        }
    }
    check_ram(mem, &segs)?;
    Ok(segs)
}

/// Map `len` bytes described by SGL1 (the SQE's 16-byte data pointer). `host_to_ctrl` is true for
/// writes (bit buckets are then invalid).
pub fn map_sgl<M: GuestMemory>(
    mem: &M,
    sgl1: SglDescriptor,
    len: u64,
    host_to_ctrl: bool,
) -> Result<Vec<Segment>, Status> {
    let mut segs = Vec::new();
    let mut total: u64 = 0;
    let mut walked = 0usize;
    let data_desc =
        |d: &SglDescriptor, segs: &mut Vec<Segment>, total: &mut u64| -> Result<(), Status> {
            let (typ, sub) = (d.id >> 4, d.id & 0xf);
            let l = u64::from(d.len);
            match typ {
                sgl::DATA_BLOCK if sub == 0 => push(segs, Some(d.addr), l),
                sgl::BIT_BUCKET if sub == 0 && !host_to_ctrl => push(segs, None, l),
                _ => return Err(Status::SGL_TYPE_INVALID),
            }
            *total += l;
            Ok(())
        };
    let typ = sgl1.id >> 4;
    if typ == sgl::DATA_BLOCK || typ == sgl::BIT_BUCKET {
        data_desc(&sgl1, &mut segs, &mut total)?;
    } else {
        let mut seg = sgl1;
        loop {
            let (styp, sub) = (seg.id >> 4, seg.id & 0xf);
            if (styp != sgl::SEGMENT && styp != sgl::LAST_SEGMENT) || sub != 0 {
                return Err(Status::SGL_TYPE_INVALID);
            }
            if seg.len == 0 || !seg.len.is_multiple_of(16) {
                return Err(Status::INVALID_SGL_SEGMENT);
            }
            let n = (seg.len / 16) as usize;
            walked += n;
            if walked > MAX_SGL_DESCRIPTORS {
                return Err(Status::INVALID_SGL_COUNT);
            }
            let mut next = None;
            for i in 0..n {
                let d: SglDescriptor = read_struct(mem, seg.addr.wrapping_add(i as u64 * 16))
                    .ok_or(Status::DATA_TRANSFER_ERROR)?;
                let dt = d.id >> 4;
                if dt == sgl::SEGMENT || dt == sgl::LAST_SEGMENT {
                    // Only the last descriptor of a (non-last) segment may chain.
                    if i != n - 1 || styp == sgl::LAST_SEGMENT {
                        return Err(Status::INVALID_SGL_SEGMENT);
                    }
                    next = Some(d);
                } else {
                    data_desc(&d, &mut segs, &mut total)?;
                }
            }
            match next {
                Some(d) => seg = d,
                None if styp == sgl::SEGMENT => return Err(Status::INVALID_SGL_SEGMENT),
                None => break,
            }
        }
    }
    if total != len {
        return Err(Status::DATA_SGL_LENGTH_INVALID);
    }
    check_ram(mem, &segs)?;
    Ok(segs)
}

/// Read a spec structure from guest memory.
pub fn read_struct<T: FromBytes, M: GuestMemory>(mem: &M, addr: u64) -> Option<T> {
    let mut buf = vec![0u8; std::mem::size_of::<T>()];
    mem.read_slice(&mut buf, GuestAddress(addr)).ok()?;
    T::read_from_bytes(&buf).ok()
}

/// Write a spec structure to guest memory.
pub fn write_struct<T: zerocopy::IntoBytes + zerocopy::Immutable, M: GuestMemory>(
    mem: &M,
    addr: u64,
    v: &T,
) -> Option<()> {
    mem.write_slice(v.as_bytes(), GuestAddress(addr)).ok()
}

/// Copy `data` into the segments (controller → host). Bit buckets swallow their share.
pub fn copy_to_guest<M: GuestMemory>(mem: &M, segs: &[Segment], data: &[u8]) -> Result<(), Status> {
    let mut off = 0usize;
    for s in segs {
        let n = (s.len as usize).min(data.len() - off);
        if let Some(a) = s.addr {
            mem.write_slice(&data[off..off + n], GuestAddress(a))
                .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
        }
        off += n;
        if off == data.len() {
            break;
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
