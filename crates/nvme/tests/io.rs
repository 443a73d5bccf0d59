//! NVM I/O commands: Read, Write, Flush, Write Zeroes, Dataset Management, Compare, Verify; PRP
//! and SGL data pointers; MDTS; namespaces, read-only and file backends; every error status with a
//! crafted command, checking guest memory and the disk stay untouched.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::*;
use nvme::spec::Sqe;

const SPEC: &str = "4,nvme,ram=16,ser=TESTSER1";
const BLOCKS: u64 = (16 << 20) / 512;

/// Describe `pages` (data starting `off` bytes into the first) with PRP1/PRP2, building PRP list
/// pages as needed. The first list page starts `list_off` bytes into its page, and a list page's
/// last slot chains to the next list page when more than one entry remains.
fn build_prp(d: &mut TestDriver, pages: &[u64], off: u64, list_off: u64) -> (u64, u64) {
    let prp1 = pages[0] + off;
    let rest = &pages[1..];
    match rest.len() {
        0 => (prp1, 0),
        1 => (prp1, rest[0]),
        _ => {
            let list = d.alloc(PAGE) + list_off;
            let mut slot = list;
            let mut i = 0;
            while i < rest.len() {
                if (PAGE - slot % PAGE) / 8 == 1 && rest.len() - i > 1 {
                    let next = d.alloc(PAGE);
                    d.write_u64(slot, next);
                    slot = next;
                    continue;
                }
                d.write_u64(slot, rest[i]);
                slot += 8;
                i += 1;
            }
            (prp1, list)
        }
    }
}

/// `n` scattered data pages (allocated together, used in reverse order).
fn scattered_pages(d: &mut TestDriver, n: u64) -> Vec<u64> {
    let base = d.alloc(n * PAGE);
    (0..n).rev().map(|i| base + i * PAGE).collect()
}

/// Where the bytes of a PRP transfer land: (address, range of the data).
fn placement(pages: &[u64], off: u64, len: usize) -> Vec<(u64, std::ops::Range<usize>)> {
    let mut v = Vec::new();
    let mut done = 0usize;
    for (i, &p) in pages.iter().enumerate() {
        let start = if i == 0 { p + off } else { p };
        let room = (PAGE - (start % PAGE)) as usize;
        let n = room.min(len - done);
        v.push((start, done..done + n));
        done += n;
        if done == len {
            break;
        }
    }
    v
}

fn scatter_write(d: &mut TestDriver, pages: &[u64], off: u64, data: &[u8]) {
    for (a, r) in placement(pages, off, data.len()) {
        d.write_mem(a, &data[r]);
    }
}

fn gather(d: &mut TestDriver, pages: &[u64], off: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::new();
    for (a, r) in placement(pages, off, len) {
        let part = d.read_mem(a, r.len());
        d.expect(a, &part);
        v.extend(part);
    }
    v
}

#[test]
fn read_write_with_every_prp_layout() {
    let mut d = TestDriver::ready(SPEC);
    // (blocks, offset into the first page, offset of the PRP list in its page)
    let layouts: &[(u32, u64, u64)] = &[
        (1, 0, 0),        // PRP1 only
        (1, 0xe00, 0),    // PRP1 only, ends exactly at the page end
        (8, 0x200, 0),    // PRP1 + PRP2 as second page
        (16, 0, 0),       // exactly two pages
        (32, 0x800, 0),   // PRP list, first page partial
        (128, 0, 0xff0),  // list pointer with offset: two slots, then a chained list page
        (1024, 0x4, 0x8), // MDTS-sized, dword offset
    ];
    for (i, &(nlb, off, list_off)) in layouts.iter().enumerate() {
        let len = nlb as usize * 512;
        let w = data(len, i as u8 + 1);
        let slba = 100 + i as u64 * 2048;
        let pages = scattered_pages(&mut d, (off + len as u64).div_ceil(PAGE));
        scatter_write(&mut d, &pages, off, &w);
        let prp = build_prp(&mut d, &pages, off, list_off);
        assert_ok(&d.io(1, rw(IoOpcode::WRITE, 1, slba, nlb).prp(prp.0, prp.1)));
        d.check_mem();
        // Read back through a different layout: contiguous buffer.
        assert_eq!(d.read_blocks(1, 1, slba, nlb, 512), w, "layout {i}");
        // And through the same layout into fresh pages.
        let pages = scattered_pages(&mut d, (off + len as u64).div_ceil(PAGE));
        let prp = build_prp(&mut d, &pages, off, list_off);
        assert_ok(&d.io(1, rw(IoOpcode::READ, 1, slba, nlb).prp(prp.0, prp.1)));
        assert_eq!(gather(&mut d, &pages, off, len), w, "layout {i} read");
        d.check_mem();
    }
}

#[test]
fn chained_prp_lists_beyond_one_list_page() {
    // No MDTS limit; 514 pages need a list page of 511 entries + chain + a second list page.
    let mut d = TestDriver::ready("4,nvme,ram=16,mdts=0,ser=TESTSER1");
    let nlb = 514 * 8;
    let len = nlb as usize * 512;
    let w = data(len, 0x33);
    let pages = scattered_pages(&mut d, 514);
    scatter_write(&mut d, &pages, 0, &w);
    let prp = build_prp(&mut d, &pages, 0, 0);
    assert_ok(&d.io(1, rw(IoOpcode::WRITE, 1, 7, nlb).prp(prp.0, prp.1)));
    d.check_mem();
    let pages = scattered_pages(&mut d, 515);
    let prp = build_prp(&mut d, &pages, 0x100, 0x7f8); // offset data, list starting at its last slots
    assert_ok(&d.io(1, rw(IoOpcode::READ, 1, 7, nlb).prp(prp.0, prp.1)));
    assert_eq!(gather(&mut d, &pages, 0x100, len), w);
    d.check_mem();
}

#[test]
fn prp_errors_leave_memory_and_disk_untouched() {
    let mut d = TestDriver::ready(SPEC);
    let old = data(8192, 0x11);
    d.write_blocks(1, 1, 0, 512, &old);
    let new = data(8192, 0x99);
    let pages = scattered_pages(&mut d, 3);
    scatter_write(&mut d, &pages, 0, &new);
    let list = d.alloc(PAGE);
    d.write_u64(list, pages[1]);
    d.write_u64(list + 8, pages[2] + 0x200); // an entry with an offset
    let chain = d.alloc(PAGE);
    let cases: Vec<(&str, u64, u64, u32, u8)> = vec![
        ("PRP1 not dword aligned", pages[0] + 2, pages[1], 16, 0x13),
        (
            "PRP2 entry with offset",
            pages[0],
            pages[1] + 0x200,
            16,
            0x13,
        ),
        ("list entry with offset", pages[0], list, 24, 0x13),
        (
            "list pointer not qword aligned",
            pages[0],
            list + 4,
            24,
            0x13,
        ),
        ("PRP1 outside RAM", MEM_SIZE, pages[1], 16, 0x04),
        ("PRP2 outside RAM", pages[0], MEM_SIZE + PAGE, 16, 0x04),
        ("list outside RAM", pages[0], MEM_SIZE, 24, 0x04),
        (
            "PRP1 in RAM, PRP2 beyond its end",
            MEM_SIZE - 512,
            MEM_SIZE,
            2,
            0x04,
        ),
    ];
    for (what, prp1, prp2, nlb, sc) in cases {
        for op in [IoOpcode::WRITE, IoOpcode::READ, IoOpcode::COMPARE] {
            let c = d.io(1, rw(op, 1, 0, nlb).prp(prp1, prp2));
            assert_status(&c, 0, sc);
            assert!(status(&c).dnr, "{what}");
            d.check_mem();
        }
    }
    // A list entry outside RAM, and the chain pointer of a full list page with an offset.
    let l2 = d.alloc(PAGE);
    d.write_u64(l2, pages[1]);
    d.write_u64(l2 + 8, MEM_SIZE + 0x10000);
    assert_status(
        &d.io(1, rw(IoOpcode::READ, 1, 0, 24).prp(pages[0], l2)),
        0,
        0x04,
    );
    let entries: Vec<u8> = (0..511u64)
        .flat_map(|i| (pages[0] + (i % 2) * PAGE).to_le_bytes())
        .collect();
    d.write_mem(chain, &entries);
    d.write_u64(chain + 511 * 8, l2 + 8); // chain pointer not page aligned
    assert_status(
        &d.io(1, rw(IoOpcode::READ, 1, 0, 513 * 8).prp(pages[0], chain)),
        0,
        0x02,
    ); // > MDTS
    let mut big = TestDriver::ready("4,nvme,ram=16,mdts=0,ser=TESTSER1");
    let p = scattered_pages(&mut big, 2);
    let chain = big.alloc(PAGE);
    let entries: Vec<u8> = (0..511u64)
        .flat_map(|i| p[(i % 2) as usize].to_le_bytes())
        .collect();
    big.write_mem(chain, &entries);
    let next = big.alloc(PAGE);
    big.write_u64(chain + 511 * 8, next + 8);
    assert_status(
        &big.io(1, rw(IoOpcode::READ, 1, 0, 514 * 8).prp(p[0], chain)),
        0,
        0x13,
    );
    // A list whose pointer sits in the last slot of a page and chains to the last slot of
    // another page forever: refused, never a hang.
    let a = big.alloc(PAGE);
    let b = big.alloc(PAGE);
    big.write_u64(a + PAGE - 8, b + PAGE - 8);
    big.write_u64(b + PAGE - 8, a + PAGE - 8);
    assert_status(
        &big.io(1, rw(IoOpcode::READ, 1, 0, 64).prp(p[0], a + PAGE - 8)),
        0,
        0x13,
    );
    big.check_mem();
    // Nothing reached the disk.
    assert_eq!(d.read_blocks(1, 1, 0, 16, 512), old);
    d.check_mem();
}

/// (what, descriptors placed in the segment page, SGL1 in the SQE, opcode, expected SC).
type SglCase = (&'static str, Vec<[u8; 16]>, [u8; 16], IoOpcode, u8);

fn sgl_desc(addr: u64, len: u32, typ: u8, sub: u8) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&addr.to_le_bytes());
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[15] = (typ << 4) | sub;
    b
}

fn sgl_sqe(op: IoOpcode, slba: u64, nlb: u32, sgl1: [u8; 16]) -> Sqe {
    rw(op, 1, slba, nlb).sgl([
        u64::from_le_bytes(sgl1[..8].try_into().unwrap()),
        u64::from_le_bytes(sgl1[8..].try_into().unwrap()),
    ])
}

#[test]
fn sgl_data_blocks_segments_and_bit_buckets() {
    let mut d = TestDriver::ready(SPEC);
    let w = data(2048, 0x5c);
    // Single data block in the SQE.
    let a = d.alloc(2048);
    d.write_mem(a, &w);
    assert_ok(&d.io(1, sgl_sqe(IoOpcode::WRITE, 10, 4, sgl_desc(a, 2048, 0, 0))));
    assert_eq!(d.read_blocks(1, 1, 10, 4, 512), w);
    // Segment [DB 1000, DB 24, Last Segment] -> [DB 1024]: write, then read back the same way.
    let (b1, b2, b3) = (d.alloc(1000), d.alloc(24), d.alloc(1024));
    let (seg, last) = (d.alloc(48), d.alloc(16));
    let write_seg = |d: &mut TestDriver| {
        d.write_mem(seg, &sgl_desc(b1, 1000, 0, 0));
        d.write_mem(seg + 16, &sgl_desc(b2 + 3, 24, 0, 0));
        d.write_mem(seg + 32, &sgl_desc(last, 16, 3, 0));
        d.write_mem(last, &sgl_desc(b3, 1024, 0, 0));
    };
    write_seg(&mut d);
    let w2 = data(2048, 0x77);
    d.write_mem(b1, &w2[..1000]);
    d.write_mem(b2 + 3, &w2[1000..1024]);
    d.write_mem(b3, &w2[1024..]);
    assert_ok(&d.io(1, sgl_sqe(IoOpcode::WRITE, 20, 4, sgl_desc(seg, 48, 2, 0))));
    assert_eq!(d.read_blocks(1, 1, 20, 4, 512), w2);
    d.check_mem();
    // Read the blocks at 10 through the same SGL.
    assert_ok(&d.io(1, sgl_sqe(IoOpcode::READ, 10, 4, sgl_desc(seg, 48, 2, 0))));
    d.expect(b1, &w[..1000]);
    d.expect(b2 + 3, &w[1000..1024]);
    d.expect(b3, &w[1024..]);
    d.check_mem();
    // Bit bucket: keep blocks 0 and 3 of a 4-block read, drop the middle.
    let (k1, k2, bb) = (d.alloc(512), d.alloc(512), d.alloc(48));
    d.write_mem(bb, &sgl_desc(k1, 512, 0, 0));
    d.write_mem(bb + 16, &sgl_desc(0, 1024, 1, 0));
    d.write_mem(bb + 32, &sgl_desc(k2, 512, 0, 0));
    assert_ok(&d.io(1, sgl_sqe(IoOpcode::READ, 10, 4, sgl_desc(bb, 48, 3, 0))));
    d.expect(k1, &w[..512]);
    d.expect(k2, &w[1536..]);
    d.check_mem();
    // A bit bucket as the whole transfer.
    assert_ok(&d.io(1, sgl_sqe(IoOpcode::READ, 10, 4, sgl_desc(0, 2048, 1, 0))));
    d.check_mem();
}

#[test]
fn sgl_errors() {
    let mut d = TestDriver::ready(SPEC);
    let old = data(2048, 0x21);
    d.write_blocks(1, 1, 0, 512, &old);
    let buf = d.alloc(4096);
    d.write_mem(buf, &data(4096, 0x43));
    let seg = d.alloc(PAGE);
    let put = |d: &mut TestDriver, descs: &[[u8; 16]]| {
        for (i, x) in descs.iter().enumerate() {
            d.write_mem(seg + 16 * i as u64, x);
        }
    };
    let db = |a: u64, l: u32| sgl_desc(a, l, 0, 0);
    let cases: Vec<SglCase> = vec![
        ("too short", vec![], db(buf, 1024), IoOpcode::WRITE, 0x0f),
        ("too long", vec![], db(buf, 4096), IoOpcode::READ, 0x0f),
        (
            "bit bucket in a write",
            vec![],
            sgl_desc(0, 2048, 1, 0),
            IoOpcode::WRITE,
            0x11,
        ),
        (
            "bit bucket in a compare",
            vec![],
            sgl_desc(0, 2048, 1, 0),
            IoOpcode::COMPARE,
            0x11,
        ),
        (
            "reserved descriptor type",
            vec![],
            sgl_desc(buf, 2048, 0x5, 0),
            IoOpcode::READ,
            0x11,
        ),
        (
            "data block with offset subtype",
            vec![],
            sgl_desc(buf, 2048, 0, 1),
            IoOpcode::READ,
            0x11,
        ),
        (
            "segment length not a multiple of 16",
            vec![db(buf, 2048)],
            sgl_desc(seg, 24, 2, 0),
            IoOpcode::READ,
            0x0d,
        ),
        (
            "empty segment",
            vec![],
            sgl_desc(seg, 0, 3, 0),
            IoOpcode::READ,
            0x0d,
        ),
        (
            "segment descriptor before the end of a segment",
            vec![sgl_desc(seg, 16, 3, 0), db(buf, 2048)],
            sgl_desc(seg, 32, 2, 0),
            IoOpcode::READ,
            0x0d,
        ),
        (
            "segment inside a last segment",
            vec![db(buf, 1024), sgl_desc(seg, 16, 3, 0)],
            sgl_desc(seg, 32, 3, 0),
            IoOpcode::READ,
            0x0d,
        ),
        (
            "segment without a next segment",
            vec![db(buf, 2048)],
            sgl_desc(seg, 16, 2, 0),
            IoOpcode::READ,
            0x0d,
        ),
        (
            "segment chaining to itself",
            vec![sgl_desc(seg, 16, 2, 0)],
            sgl_desc(seg, 16, 2, 0),
            IoOpcode::READ,
            0x0e,
        ),
        (
            "data block outside RAM",
            vec![],
            db(MEM_SIZE - 1024, 2048),
            IoOpcode::READ,
            0x04,
        ),
        (
            "segment outside RAM",
            vec![],
            sgl_desc(MEM_SIZE, 16, 3, 0),
            IoOpcode::READ,
            0x04,
        ),
        (
            "write from outside RAM",
            vec![],
            db(MEM_SIZE + PAGE, 2048),
            IoOpcode::WRITE,
            0x04,
        ),
    ];
    for (what, descs, sgl1, op, sc) in cases {
        put(&mut d, &descs);
        let c = d.io(1, sgl_sqe(op, 0, 4, sgl1));
        assert_eq!((status(&c).sct, status(&c).sc), (0, sc), "{what}: {c:x?}");
        assert!(status(&c).dnr, "{what}");
        d.check_mem();
    }
    // PSDT 10b (SGL with MPTR as an SGL) is not offered.
    let mut s = sgl_sqe(IoOpcode::READ, 0, 4, db(buf, 2048));
    s.cdw0 ^= 3 << 14; // PSDT 01b -> 10b: deliberately unsupported
    assert_status(&d.io(1, s), 0, 0x02);
    assert_eq!(
        d.read_blocks(1, 1, 0, 4, 512),
        old,
        "no write reached the disk"
    );
    assert_eq!(d.read_mem(MEM_SIZE - 1024, 1024), vec![0u8; 1024]);
}

#[test]
fn mdts_lba_range_namespace_and_opcode_errors() {
    let mut d = TestDriver::ready(SPEC);
    let big = d.alloc(1025 * 512 + PAGE);
    let (prp2, _) = d.prp_for(big, 1025 * 512);
    // MDTS 7 = 512 KiB = 1024 blocks.
    for op in [
        IoOpcode::WRITE,
        IoOpcode::READ,
        IoOpcode::COMPARE,
        IoOpcode::VERIFY,
    ] {
        assert_status(&d.io(1, rw(op, 1, 0, 1025).prp(big, prp2)), 0, 0x02);
    }
    assert_ok(&d.io(1, rw(IoOpcode::VERIFY, 1, 0, 1024)));
    assert_ok(&d.io(1, rw(IoOpcode::WRITE_ZEROES, 1, 0, 4096))); // Write Zeroes: no limit
    d.read_blocks(1, 1, 0, 1024, 512);
    // LBA range.
    let buf = d.alloc(1024);
    for (slba, nlb) in [
        (BLOCKS, 1),
        (BLOCKS - 1, 2),
        (u64::MAX, 2),
        (u64::MAX - 1, 1),
        (1 << 40, 1),
    ] {
        for op in [
            IoOpcode::WRITE,
            IoOpcode::READ,
            IoOpcode::COMPARE,
            IoOpcode::WRITE_ZEROES,
            IoOpcode::VERIFY,
        ] {
            let c = d.io(1, rw(op, 1, slba, nlb).prp(buf, 0));
            assert_status(&c, 0, 0x80);
        }
    }
    assert_ok(&d.io(1, rw(IoOpcode::READ, 1, BLOCKS - 2, 2).prp(buf, 0)));
    d.expect(buf, &[0u8; 1024]);
    // Namespaces.
    for nsid in [0, 2, 0xffff_fffe, 0xffff_ffff] {
        for op in [
            IoOpcode::WRITE,
            IoOpcode::READ,
            IoOpcode::COMPARE,
            IoOpcode::WRITE_ZEROES,
            IoOpcode::DATASET_MANAGEMENT,
            IoOpcode::VERIFY,
        ] {
            assert_status(&d.io(1, rw(op, nsid, 0, 1).prp(buf, 0)), 0, 0x0b);
        }
    }
    assert_status(&d.io(1, flush(0)), 0, 0x0b);
    assert_status(&d.io(1, flush(2)), 0, 0x0b);
    // Opcodes: Write Uncorrectable is not offered, nor vendor/reserved ones.
    for op in [
        IoOpcode::WRITE_UNCORRECTABLE,
        IoOpcode(0x0d), // Reservation Register: not offered
        IoOpcode(0x11), // Reservation Acquire: not offered
        IoOpcode(0x7f), // reserved
        IoOpcode(0x80), // vendor specific
        IoOpcode(0xff), // vendor specific
    ] {
        assert_status(&d.io(1, rw(op, 1, 0, 1).prp(buf, 0)), 0, 0x01);
    }
    // Fused operations are not supported.
    let mut s = rw(IoOpcode::COMPARE, 1, 0, 1).prp(buf, 0);
    s.cdw0 |= 1 << 8; // FUSE 01b: deliberately unsupported
    assert_status(&d.io(1, s), 0, 0x02);
    d.check_mem();
}

#[test]
fn flush_write_zeroes_and_fua() {
    let a = TestBackend::new(4 << 20, 512);
    let b = TestBackend::new(4 << 20, 512);
    let mut d = TestDriver::with_backends("4,nvme,ram=1,ser=TESTSER1", vec![a.clone(), b.clone()]);
    d.bring_up();
    let flushes = |x: &Arc<TestBackend>| x.flushes.load(Ordering::SeqCst);
    assert_ok(&d.io(1, flush(1)));
    assert_eq!((flushes(&a), flushes(&b)), (1, 0));
    assert_ok(&d.io(1, flush(NSID_ALL)));
    assert_eq!(
        (flushes(&a), flushes(&b)),
        (2, 1),
        "broadcast flush reaches every namespace"
    );
    // FUA write flushes; plain writes with the volatile cache on do not.
    let w = data(4096, 1);
    d.write_blocks(1, 1, 0, 512, &w);
    assert_eq!(flushes(&a), 2);
    let (p1, p2) = d.prp_buffer(&w);
    assert_ok(&d.io(1, rw(IoOpcode::WRITE, 1, 8, 8).prp(p1, p2).fua()));
    assert_eq!(flushes(&a), 3);
    // Volatile write cache off: every write is durable before completing.
    assert_ok(&d.set_features(0x06, 0));
    d.write_blocks(1, 2, 0, 512, &w);
    assert_eq!(flushes(&b), 2);
    // Write Zeroes in the middle of written data.
    assert_ok(&d.io(1, rw(IoOpcode::WRITE_ZEROES, 1, 2, 4)));
    let mut want = w.clone();
    want[1024..3072].fill(0);
    assert_eq!(d.read_blocks(1, 1, 0, 8, 512), want);
    assert_eq!(d.read_blocks(1, 1, 8, 8, 512), w);
}

#[test]
fn dataset_management_deallocates() {
    let be = TestBackend::new(4 << 20, 512);
    let mut d = TestDriver::with_backends("4,nvme,ram=1,ser=TESTSER1", vec![be.clone()]);
    d.bring_up();
    let w = data(32 * 512, 3);
    d.write_blocks(1, 1, 0, 512, &w);
    let dsm = |d: &mut TestDriver, ranges: &[(u64, u32)], attrs: dw::Cdw11Dsm| {
        let buf = d.alloc(4096);
        let mut raw = Vec::new();
        for &(slba, nlb) in ranges {
            raw.extend_from_slice(&0u32.to_le_bytes());
            raw.extend_from_slice(&nlb.to_le_bytes());
            raw.extend_from_slice(&slba.to_le_bytes());
        }
        d.write_mem(buf, &raw);
        d.io(1, dsm(1, ranges.len() as u32, attrs).prp(buf, 0))
    };
    // Attributes only (no AD): nothing changes.
    let idr_idw = dw::Cdw11Dsm::new().with_idr(true).with_idw(true);
    assert_ok(&dsm(&mut d, &[(0, 32)], idr_idw));
    let ad = dw::Cdw11Dsm::new().with_ad(true);
    assert_eq!(be.discards.load(Ordering::SeqCst), 0);
    // A range beyond the end fails the whole command.
    assert_status(&dsm(&mut d, &[(0, 4), (8192, 1)], ad), 0, 0x80);
    assert_eq!(be.discards.load(Ordering::SeqCst), 0);
    assert_eq!(d.read_blocks(1, 1, 0, 32, 512), w);
    // Deallocate two ranges (and an empty one).
    assert_ok(&dsm(&mut d, &[(2, 3), (20, 4), (9, 0)], ad));
    assert_eq!(be.discards.load(Ordering::SeqCst), 2);
    let mut want = w.clone();
    want[2 * 512..5 * 512].fill(0);
    want[20 * 512..24 * 512].fill(0);
    assert_eq!(d.read_blocks(1, 1, 0, 32, 512), want);
    // Bad range-list pointer.
    assert_status(&d.io(1, deallocate(1, 1).prp(MEM_SIZE, 0)), 0, 0x04);
    d.check_mem();
    // With dsm=disable the command is not offered.
    let mut nod = TestDriver::ready("4,nvme,ram=1,dsm=disable,ser=TESTSER1");
    assert_eq!(
        u16_from(&nod.identify_ok(0x01, 0), 520) & (1 << 2),
        0,
        "ONCS DSM clear"
    );
    let buf = nod.alloc(16);
    assert_status(&nod.io(1, deallocate(1, 1).prp(buf, 0)), 0, 0x01);
}

fn u16_from(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

#[test]
fn compare_and_verify() {
    let be = TestBackend::new(4 << 20, 512);
    let mut d = TestDriver::with_backends("4,nvme,ram=1,ser=TESTSER1", vec![be.clone()]);
    d.bring_up();
    let w = data(8192, 9);
    d.write_blocks(1, 1, 40, 512, &w);
    let (p1, p2) = d.prp_buffer(&w);
    assert_ok(&d.io(1, rw(IoOpcode::COMPARE, 1, 40, 16).prp(p1, p2)));
    let mut other = w.clone();
    other[5000] ^= 1;
    let (p1, p2) = d.prp_buffer(&other);
    assert_status(
        &d.io(1, rw(IoOpcode::COMPARE, 1, 40, 16).prp(p1, p2)),
        2,
        0x85,
    );
    assert_status(
        &d.io(1, rw(IoOpcode::COMPARE, 1, 39, 16).prp(p1, p2)),
        2,
        0x85,
    );
    d.check_mem(); // compare never writes host memory
    assert_ok(&d.io(1, rw(IoOpcode::VERIFY, 1, 0, 1024)));
    be.fail_reads.store(true, Ordering::SeqCst);
    assert_status(&d.io(1, rw(IoOpcode::VERIFY, 1, 0, 8)), 2, 0x81);
    assert_status(
        &d.io(1, rw(IoOpcode::COMPARE, 1, 40, 16).prp(p1, p2)),
        2,
        0x81,
    );
    let buf = d.alloc(512);
    assert_status(&d.io(1, rw(IoOpcode::READ, 1, 40, 1).prp(buf, 0)), 2, 0x81);
    be.fail_reads.store(false, Ordering::SeqCst);
    d.check_mem();
}

#[test]
fn read_only_image_is_write_protected() {
    let contents = data(1 << 20, 0x6b);
    let img = TempFile::new("ro", &contents);
    let mut d = TestDriver::ready(&format!("4,nvme,{},ro,ser=TESTSER1", img.0.display()));
    assert_eq!(d.identify_ok(0x00, 1)[99] & 1, 1, "NSATTR: write protected");
    let (p1, p2) = d.prp_buffer(&data(4096, 1));
    assert_status(&d.io(1, rw(IoOpcode::WRITE, 1, 0, 8).prp(p1, p2)), 0, 0x20);
    assert_status(&d.io(1, rw(IoOpcode::WRITE_ZEROES, 1, 0, 8)), 0, 0x20);
    let r = d.alloc(16);
    d.write_mem(r, &[0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_status(&d.io(1, deallocate(1, 1).prp(r, 0)), 0, 0x20);
    assert_eq!(d.read_blocks(1, 1, 0, 16, 512), contents[..8192]);
    assert_ok(&d.io(1, flush(1)));
    d.check_mem();
    assert_eq!(img.read(), contents, "image unchanged");
    let (_, smart) = d.get_log(0x02, 0, 512, 0, false);
    assert_eq!(
        smart[0] & (1 << 3),
        1 << 3,
        "critical warning: read-only media"
    );
}

#[test]
fn file_backend_sees_the_guest_bytes() {
    let img = TempFile::new("rw", &vec![0u8; 1 << 20]);
    let img4k = TempFile::new("rw4k", &vec![0u8; 1 << 20]);
    let mut d = TestDriver::ready(&format!(
        "4,nvme,{},{},sectorsz=4096,ser=TESTSER1",
        img.0.display(),
        img4k.0.display()
    ));
    assert_eq!(d.identify_ok(0x00, 1)[26], 0);
    let ns2 = d.identify_ok(0x00, 2);
    assert_eq!(
        (ns2[26], u64::from_le_bytes(ns2[..8].try_into().unwrap())),
        (1, 256),
        "4 KiB LBAs"
    );
    let w = data(3 * 4096, 0xd1);
    d.write_blocks(1, 1, 10, 512, &w);
    d.write_blocks(1, 2, 3, 4096, &w);
    assert_ok(&d.io(1, flush(NSID_ALL)));
    let f = img.read();
    assert_eq!(&f[5120..5120 + w.len()], &w[..]);
    assert!(f[..5120]
        .iter()
        .chain(&f[5120 + w.len()..])
        .all(|&b| b == 0));
    let f = img4k.read();
    assert_eq!(&f[12288..12288 + w.len()], &w[..]);
    assert!(f[..12288].iter().all(|&b| b == 0));
    assert_eq!(d.read_blocks(1, 2, 3, 3, 4096), w);
    // Deallocate on a file punches a hole that reads back zero.
    let r = d.alloc(16);
    d.write_mem(r, &[0, 0, 0, 0, 1, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0]);
    assert_ok(&d.io(1, deallocate(2, 1).prp(r, 0)));
    assert_eq!(d.read_blocks(1, 2, 4, 1, 4096), vec![0u8; 4096]);
    assert_eq!(&img4k.read()[16384..20480], &[0u8; 4096][..]);
}

#[test]
fn many_outstanding_commands_overflow_a_small_cq() {
    let mut d = TestDriver::ready(SPEC);
    // CQ of 4 entries (3 usable) behind an SQ of 32.
    d.create_pair_sized(2, 4, 32);
    let mut cids = Vec::new();
    for i in 0..24u64 {
        let (p1, p2) = d.prp_buffer(&data(1024, i as u8));
        cids.push(d.submit(2, rw(IoOpcode::WRITE, 1, i * 2, 2).prp(p1, p2)));
    }
    let mut seen = Vec::new();
    for _ in 0..24 {
        let c = d.wait_cq(2);
        assert_ok(&c);
        assert_eq!(c.sq_id, 2);
        seen.push(c.cid);
    }
    seen.sort();
    assert_eq!(seen, cids, "every command completed exactly once");
    d.assert_cq_empty(2);
    for i in 0..24u64 {
        assert_eq!(d.read_blocks(1, 1, i * 2, 2, 512), data(1024, i as u8));
    }
    let (c, smart) = d.get_log(0x02, 0, 512, 0, false);
    assert_ok(&c);
    assert_eq!(
        u128::from_le_bytes(smart[80..96].try_into().unwrap()),
        24,
        "host write commands"
    );
    let stats = d.dev.stats();
    let get = |k: &str| stats.iter().find(|(n, _)| n == k).map(|(_, v)| *v).unwrap();
    assert_eq!(get("write_commands"), 24);
    assert_eq!(get("bytes_written"), 24 * 1024);
    assert_eq!(get("read_commands"), 24);
}
