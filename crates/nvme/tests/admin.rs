//! Admin commands: Identify, Get/Set Features, Get Log Page, queue management, Abort, AER,
//! Format NVM — each success and each error status with a crafted command.

mod common;

use common::*;
use std::time::{Duration, Instant};

/// Interrupt counts here are exact: coalescing only as the host asks (feature 08h).
const SPEC: &str = "4,nvme,ram=16,ram=8,ser=TESTSER1,coalesce=host";
const NS1_BLOCKS: u64 = (16 << 20) / 512;
const NS2_BLOCKS: u64 = (8 << 20) / 512;

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}
fn u128_at(b: &[u8], o: usize) -> u128 {
    u128::from_le_bytes(b[o..o + 16].try_into().unwrap())
}

// ---------------------------------------------------------------- Identify

#[test]
fn identify_controller_into_buffer_straddling_a_page() {
    let mut d = TestDriver::ready(SPEC);
    // PRP1 8 bytes before a page end; PRP2 names the next (non-adjacent) page.
    let page = d.alloc(3 * PAGE);
    let prp1 = page + PAGE - 8;
    let prp2 = page + 2 * PAGE;
    assert_ok(&d.admin(identify(cns::CONTROLLER, 0).prp(prp1, prp2)));
    let mut id = d.read_mem(prp1, 8);
    id.extend(d.read_mem(prp2, 4088));
    d.expect(prp1, &id[..8]);
    d.expect(prp2, &id[8..]);
    d.check_mem(); // the 4 KiB after PRP1's 8 bytes and everything else is untouched

    assert_eq!(u16_at(&id, 0), 0xfb5d, "VID");
    assert_eq!(u16_at(&id, 2), 0xfb5d, "SSVID");
    assert_eq!(&id[4..24], b"TESTSER1            ", "SN, space padded");
    assert_eq!(
        &id[24..64],
        format!("{:<40}", "rhyve NVMe").as_bytes(),
        "MN"
    );
    assert_eq!(&id[64..72], b"1.0     ", "FR");
    assert_eq!(id[77], 7, "MDTS");
    assert_eq!(u16_at(&id, 78), 1, "CNTLID");
    assert_eq!(u32_at(&id, 80), 0x0002_0000, "VER");
    assert_eq!(
        u32_at(&id, 92) & (1 << 8),
        1 << 8,
        "OAES namespace attribute notices"
    );
    assert_eq!(id[111], 1, "CNTRLTYPE I/O controller");
    assert_eq!(
        u16_at(&id, 256),
        (1 << 1) | (1 << 4) | (1 << 8),
        "OACS: Format NVM, Device Self-test, Doorbell Buffer Config"
    );
    assert_eq!(id[258], 3, "ACL");
    assert_eq!(id[259], 3, "AERL");
    assert_eq!(id[261] & 0b110, 0b110, "LPA: effects log, extended data");
    assert_eq!(id[262], 63, "ELPE");
    assert_eq!(u128_at(&id, 280), (24 << 20) as u128, "TNVMCAP");
    assert_eq!(id[512], 0x66, "SQES");
    assert_eq!(id[513], 0x44, "CQES");
    assert_eq!(u32_at(&id, 516), 2, "NN");
    assert_eq!(
        u16_at(&id, 520),
        0b1101_1101,
        "ONCS: compare, DSM, WZ, save/select, timestamp, verify"
    );
    assert_eq!(id[525], 0x7, "VWC present, flush broadcast supported");
    assert_eq!(u32_at(&id, 536), 0x1 | (1 << 16), "SGLS");
    assert!(id[768..].starts_with(b"nqn.2026-11.io.rhyve:nvme:TESTSER1\0"));
    assert_eq!(u16_at(&id, 2048), 2500, "PSD0 max power");
}

#[test]
fn identify_namespaces_lists_and_descriptors() {
    let mut d = TestDriver::ready(SPEC);
    let ns1 = d.identify_ok(0x00, 1);
    assert_eq!(u64_at(&ns1, 0), NS1_BLOCKS, "NSZE");
    assert_eq!(u64_at(&ns1, 8), NS1_BLOCKS, "NCAP");
    assert_eq!(ns1[25], 1, "NLBAF: two formats");
    assert_eq!(ns1[26], 0, "FLBAS: 512");
    assert_eq!(ns1[33] & 0x7, 1, "DLFEAT: deallocated blocks read zero");
    assert_eq!(ns1[99], 0, "NSATTR: writable");
    assert_eq!((u16_at(&ns1, 128), ns1[130]), (0, 9), "LBAF0 512");
    assert_eq!((u16_at(&ns1, 132), ns1[134]), (0, 12), "LBAF1 4096");
    let ns2 = d.identify_ok(0x00, 2);
    assert_eq!(u64_at(&ns2, 0), NS2_BLOCKS);
    assert_ne!(
        &ns1[104..128],
        &ns2[104..128],
        "NGUID/EUI64 differ per namespace"
    );

    for nsid in [0, 3, 0xffff_fffe, 0xffff_ffff] {
        let (c, _) = d.identify(0x00, nsid, 0);
        assert_status(&c, 0, 0x0b);
    }

    // Active namespace lists (CNS 02h and its CSI form 07h).
    let l = d.identify_ok(0x02, 0);
    assert_eq!((u32_at(&l, 0), u32_at(&l, 4), u32_at(&l, 8)), (1, 2, 0));
    let l = d.identify_ok(0x02, 1);
    assert_eq!((u32_at(&l, 0), u32_at(&l, 4)), (2, 0));
    let l = d.identify_ok(0x07, 0);
    assert_eq!((u32_at(&l, 0), u32_at(&l, 4)), (1, 2));
    assert_status(&d.identify(0x07, 0, 2 << 24).0, 0, 0x02);
    for nsid in [0xffff_fffe, 0xffff_ffff] {
        assert_status(&d.identify(0x02, nsid, 0).0, 0, 0x0b);
    }

    // Namespace identification descriptors: EUI-64, NGUID, UUID, CSI.
    let desc = d.identify_ok(0x03, 1);
    assert_eq!(&desc[0..4], &[1, 8, 0, 0]);
    assert_eq!(
        &desc[4..12],
        &ns1[120..128],
        "EUI-64 matches Identify Namespace"
    );
    assert_eq!(&desc[12..16], &[2, 16, 0, 0]);
    assert_eq!(
        &desc[16..32],
        &ns1[104..120],
        "NGUID matches Identify Namespace"
    );
    assert_eq!(&desc[32..36], &[3, 16, 0, 0]);
    let uuid = &desc[36..52];
    assert_eq!(uuid[6] >> 4, 8, "UUID version 8");
    assert_eq!(uuid[8] >> 6, 0b10, "UUID variant");
    assert_eq!(&desc[52..57], &[4, 1, 0, 0, 0], "CSI = NVM");
    assert!(desc[57..].iter().all(|&b| b == 0));
    assert_status(&d.identify(0x03, 3, 0).0, 0, 0x0b);
    assert_status(&d.identify(0x03, 0, 0).0, 0, 0x0b);

    // Stable: the same serial and NSID give the same IDs on a new controller; another serial
    // does not.
    let mut same = TestDriver::ready(SPEC);
    assert_eq!(same.identify_ok(0x03, 1), desc);
    let mut other = TestDriver::ready("4,nvme,ram=16,ram=8,ser=OTHER");
    let od = other.identify_ok(0x03, 1);
    assert_ne!(&od[4..12], &desc[4..12]);
    assert_ne!(&od[16..32], &desc[16..32]);
    assert_ne!(&od[36..52], &desc[36..52]);
    let d2 = d.identify_ok(0x03, 2);
    assert_ne!(&d2[36..52], uuid);

    // CNS 05h / 06h for the NVM command set (CSI 0); other CSIs are invalid.
    let nvm_ns = d.identify_ok(0x05, 1);
    assert!(nvm_ns.iter().all(|&b| b == 0));
    assert_status(&d.identify(0x05, 1, 2 << 24).0, 0, 0x02);
    assert_status(&d.identify(0x05, 9, 0).0, 0, 0x0b);
    let nvm_ctrl = d.identify_ok(0x06, 0);
    assert_eq!(nvm_ctrl[0], 7, "VSL = MDTS");
    assert_eq!(nvm_ctrl[3], 0xff, "DMRL");
    assert_status(&d.identify(0x06, 0, 1 << 24).0, 0, 0x02);
    // Unsupported CNS.
    assert_status(&d.identify(0x1f, 0, 0).0, 0, 0x02);
    d.check_mem();
}

#[test]
fn identify_bad_data_pointers() {
    let mut d = TestDriver::ready(SPEC);
    let buf = d.alloc(2 * PAGE);
    let id = |prp1: u64, prp2: u64| identify(cns::CONTROLLER, 0).prp(prp1, prp2);
    // PRP1 not dword aligned.
    assert_status(&d.admin(id(buf + 2, 0)), 0, 0x13);
    // PRP2 with an offset when it names the second page of the transfer.
    assert_status(&d.admin(id(buf + 0x800, buf + PAGE + 0x10)), 0, 0x13);
    // Outside guest RAM: whole buffer, and only its second part.
    assert_status(&d.admin(id(MEM_SIZE + PAGE, 0)), 0, 0x04);
    assert_status(&d.admin(id(MEM_SIZE - 8, MEM_SIZE)), 0, 0x04);
    assert_status(&d.admin(id(buf + PAGE - 8, MEM_SIZE)), 0, 0x04);
    d.check_mem();
    assert_eq!(
        d.read_mem(MEM_SIZE - 8, 8),
        vec![0u8; 8],
        "nothing written at the end of RAM"
    );
    // Admin commands must use PRPs: PSDT != 0 is an invalid field, as is a fused admin command.
    let mut s = id(buf, 0);
    s.cdw0 |= 1 << 14; // PSDT 01b (SGL): deliberately invalid here
    assert_status(&d.admin(s), 0, 0x02);
    let mut s = id(buf, 0);
    s.cdw0 |= 1 << 8; // FUSE 01b: deliberately invalid here
    assert_status(&d.admin(s), 0, 0x02);
    d.check_mem();
    // Unknown admin opcode.
    assert_status(&d.admin(sqe(0xc1, 0)), 0, 0x01); // vendor specific: none offered
    assert_status(&d.admin(sqe(0x7f, 0)), 0, 0x01); // Fabrics: no such admin opcode on PCIe
}

// ---------------------------------------------------------------- Features

/// (FID, a non-default value to set, what Get returns after setting it, default).
const FEATURES: &[(u8, u32, u32, u32)] = &[
    (0x01, 0x0302_0103, 0x0302_0103, 0),           // arbitration
    (0x02, 0x20, 0x20, 0),                         // power management: PS 0, workload hint 1
    (0x04, 0x0000_0150, 0x0000_0150, 343),         // temperature threshold (composite, over)
    (0x05, 0x0000_0005, 0x0000_0005, 0),           // error recovery: TLER
    (0x06, 0, 0, 1),                               // volatile write cache off
    (0x08, 0x0000_0a05, 0x0000_0a05, 0),           // interrupt coalescing
    (0x09, 0x0001_0002, 0x0001_0002, 0x0000_0002), // vector 2 coalescing disable (get cdw11=2)
    (0x0a, 1, 1, 0),                               // write atomicity normal
    (0x0b, 0x0000_0102, 0x0000_0102, 0),           // async event config
];

#[test]
fn features_current_default_saved_and_capabilities() {
    let mut d = TestDriver::ready(SPEC);
    for &(fid, set, got, default) in FEATURES {
        let cdw11 = if fid == 0x09 { 2 } else { 0 };
        let nsid = if fid == 0x05 { 1 } else { 0 };
        let cur = d.get_features(fid, 0, nsid, cdw11);
        assert_ok(&cur);
        assert_eq!(cur.dw0, default, "FID {fid:#x} current before set");
        assert_ok(&d.set_features(fid, set));
        assert_eq!(
            d.get_features(fid, 0, nsid, cdw11).dw0,
            got,
            "FID {fid:#x} current after set"
        );
        assert_eq!(
            d.get_features(fid, 1, nsid, cdw11).dw0,
            default,
            "FID {fid:#x} default"
        );
        assert_eq!(
            d.get_features(fid, 2, nsid, cdw11).dw0,
            default,
            "FID {fid:#x} saved = default"
        );
        let caps = d.get_features(fid, 3, nsid, cdw11);
        assert_ok(&caps);
        let ns_specific = u32::from(fid == 0x05) << 1;
        assert_eq!(
            caps.dw0,
            0b100 | ns_specific,
            "FID {fid:#x}: changeable, not saveable"
        );
        // Save is not supported for any feature.
        assert_status(&d.admin(set_features(fid, set).save()), 1, 0x0d);
        // Reserved select values.
        assert_status(&d.get_features(fid, 4, nsid, cdw11), 0, 0x02);
    }
    // Number of queues: default is maxq-1 (0's based) for both.
    assert_eq!(d.get_features(0x07, 0, 0, 0).dw0, 0x000f_000f);
    assert_eq!(d.get_features(0x07, 1, 0, 0).dw0, 0x000f_000f);
    assert_eq!(d.get_features(0x07, 3, 0, 0).dw0, 0b100);
    // Unsupported FIDs.
    assert_status(&d.get_features(0x03, 0, 0, 0), 0, 0x02);
    assert_status(&d.set_features(0x0c, 0), 0, 0x02);
    assert_status(&d.get_features(0x80, 0, 0, 0), 0, 0x02);
    // Invalid values.
    assert_status(&d.set_features(0x02, 1), 0, 0x02); // power state 1 does not exist
    assert_status(&d.set_features(0x05, 1 << 16), 0, 0x02); // DULBE unsupported
    assert_status(&d.set_features(0x04, 0x0001_0000 | 300), 0, 0x02); // sensor 1 absent
    assert_status(&d.get_features(0x04, 0, 0, 2 << 20), 0, 0x02); // THSEL reserved
    assert_status(&d.get_features(0x09, 0, 0, 17), 0, 0x02); // vector 17 of 17
    assert_status(&d.set_features(0x09, 17), 0, 0x02);
    // Under-temperature threshold is separate.
    assert_ok(&d.set_features(0x04, (1 << 20) | 250));
    assert_eq!(d.get_features(0x04, 0, 0, 1 << 20).dw0 & 0xffff, 250);
    // Namespace scoping: error recovery is per namespace, the rest are not.
    assert_status(&d.get_features(0x05, 0, 3, 0), 0, 0x0b);
    let vwc = set_features(fid::VOLATILE_WRITE_CACHE, 1).nsid(1);
    assert_status(&d.admin(vwc), 1, 0x0f);
    assert_ok(&d.admin(set_features(fid::ERROR_RECOVERY, 7).nsid(1)));
}

#[test]
fn number_of_queues_limits_queue_creation_and_is_locked_after_creation() {
    let mut d = TestDriver::from_spec(SPEC);
    d.pci_enable();
    d.enable_msix();
    d.enable();
    // Asking for more than maxq grants maxq (0's based 15).
    assert_eq!(d.set_features(0x07, 0x0040_0040).dw0, 0x000f_000f);
    let c = d.set_features(0x07, 0x0001_0002); // 3 SQs, 2 CQs
    assert_ok(&c);
    assert_eq!(c.dw0, 0x0001_0002);
    assert_eq!(d.get_features(0x07, 0, 0, 0).dw0, 0x0001_0002);
    assert_status(&d.set_features(0x07, 0xffff), 0, 0x02);
    let cqb = d.alloc_queue(1024);
    assert_status(&d.create_cq_cmd(3, 16, cqb, 1), 1, 0x01); // only CQs 1-2 allocated
    d.create_pair(1, 16);
    assert_status(&d.set_features(0x07, 0), 0, 0x0c); // Command Sequence Error
    d.create_pair(2, 16);
    let sqb = d.alloc_queue(1024);
    assert_ok(&d.create_sq_cmd(3, 16, sqb, 2, 1)); // SQ 3 shares CQ 2
    let sqb = d.alloc_queue(1024);
    assert_status(&d.create_sq_cmd(4, 16, sqb, 2, 1), 1, 0x01);
    // A reset returns to the default allocation.
    d.disable();
    d.enable();
    assert_eq!(d.get_features(0x07, 0, 0, 0).dw0, 0x000f_000f);
}

#[test]
fn timestamp_feature_round_trip() {
    let mut d = TestDriver::ready(SPEC);
    let buf = d.alloc(8);
    let get = |d: &mut TestDriver| {
        let c = d.admin(get_features(fid::TIMESTAMP, 0).prp(buf, 0));
        let v = d.read_mem(buf, 8);
        d.expect(buf, &v);
        (c, v)
    };
    let (c, v) = get(&mut d);
    assert_ok(&c);
    assert_eq!((v[6] >> 1) & 7, 0, "origin: reset");
    assert_eq!(
        d.get_features(0x0e, 3, 0, 0).dw0,
        0b100,
        "changeable, not saveable"
    );
    assert_status(&d.admin(set_features(fid::TIMESTAMP, 0).save()), 1, 0x0d);
    let set_ms: u64 = 1_700_000_000_000;
    let src = d.alloc(8);
    let mut b = set_ms.to_le_bytes();
    b[6] = 0;
    d.write_mem(src, &b);
    assert_ok(&d.admin(set_features(fid::TIMESTAMP, 0).prp(src, 0)));
    let (c, v) = get(&mut d);
    assert_ok(&c);
    let mut ms = [0u8; 8];
    ms[..6].copy_from_slice(&v[..6]);
    let now = u64::from_le_bytes(ms);
    assert!(
        now >= set_ms && now < set_ms + 600_000,
        "timestamp {now} continues from {set_ms}"
    );
    assert_eq!((v[6] >> 1) & 7, 1, "origin: set by host");
    // A bad data pointer fails the set.
    let s = set_features(fid::TIMESTAMP, 0).prp(MEM_SIZE, 0);
    assert_status(&d.admin(s), 0, 0x04);
    d.check_mem();
}

#[test]
fn temperature_threshold_raises_smart_event() {
    let mut d = TestDriver::ready(SPEC);
    assert_ok(&d.set_features(0x0b, 0x2)); // temperature warnings on
    let aer = d.submit(0, async_event_request());
    d.assert_cq_empty(0);
    assert_ok(&d.set_features(0x04, 300)); // over-temperature threshold below 308 K
    let c = d.wait_cid(0, aer);
    assert_ok(&c);
    assert_eq!(
        c.dw0, 0x02_01_01,
        "SMART event, temperature threshold, log 02h"
    );
    let (c, smart) = d.get_log(0x02, 0, 512, 0, false);
    assert_ok(&c);
    assert_eq!(smart[0] & 0b10, 0b10, "critical warning: temperature");
    assert_eq!(u16_at(&smart, 1), 308, "composite temperature");
    assert_ok(&d.set_features(0x04, 343));
    let (_, smart) = d.get_log(0x02, 0, 512, 0, false);
    assert_eq!(smart[0] & 0b10, 0);
}

// ---------------------------------------------------------------- Log pages

#[test]
fn error_log_records_failed_commands() {
    let mut d = TestDriver::ready(SPEC);
    let cid1 = d.submit(0, sqe(0x7f, 0)); // no such admin opcode on PCIe
    assert_status(&d.wait_cid(0, cid1), 0, 0x01);
    let buf = d.alloc(512);
    let cid2 = d.submit(1, rw(IoOpcode::READ, 1, NS1_BLOCKS, 1).prp(buf, 0));
    assert_status(&d.wait_cid(1, cid2), 0, 0x80);
    let (c, log) = d.get_log(0x01, 0, 4096, 0, false);
    assert_ok(&c);
    // Newest first.
    assert_eq!(u64_at(&log, 0), 2, "error count");
    assert_eq!((u16_at(&log, 8), u16_at(&log, 10)), (1, cid2));
    assert_eq!(u16_at(&log, 12) >> 1 & 0xff, 0x80, "status field");
    assert_eq!(u64_at(&log, 16), NS1_BLOCKS, "LBA");
    assert_eq!(u32_at(&log, 24), 1, "NSID");
    assert_eq!(u64_at(&log, 64), 1);
    assert_eq!((u16_at(&log, 72), u16_at(&log, 74)), (0, cid1));
    assert_eq!(u16_at(&log, 76) >> 1 & 0x7ff, 0x01);
    assert!(log[128..].iter().all(|&b| b == 0));
    // A partial read at a dword offset.
    let (c, part) = d.get_log(0x01, 0, 8, 64, true);
    assert_ok(&c);
    assert_eq!(u64_at(&part, 0), 1);
}

#[test]
fn smart_log_counts_io() {
    let be = TestBackend::new(4 << 20, 512);
    let mut d = TestDriver::with_backends("4,nvme,ram=1,ser=TESTSER1", vec![be.clone()]);
    d.bring_up();
    let (_, s0) = d.get_log(0x02, 0, 512, 0, false);
    assert_eq!(u128_at(&s0, 32), 0, "data units read");
    assert_eq!(u128_at(&s0, 48), 0, "data units written");
    assert_eq!(u128_at(&s0, 112), 1, "power cycles");
    assert_eq!(u128_at(&s0, 128), 0, "power-on hours");
    assert_eq!(u128_at(&s0, 144), 0, "unsafe shutdowns");
    assert_eq!(u128_at(&s0, 160), 0, "media errors");
    assert_eq!(s0[3], 100, "available spare");
    // 3 writes of 8 blocks, 2 reads of 1000 blocks and 1 of 1 block.
    for i in 0..3 {
        d.write_blocks(1, 1, i * 8, 512, &data(4096, i as u8));
    }
    d.read_blocks(1, 1, 0, 1000, 512);
    d.read_blocks(1, 1, 0, 1000, 512);
    d.read_blocks(1, 1, 0, 1, 512);
    // A failing read: unrecovered read error, counted as a media error, not as a read.
    be.fail_reads
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let buf = d.alloc(512);
    let c = d.io(1, rw(IoOpcode::READ, 1, 77, 1).prp(buf, 0));
    assert_status(&c, 2, 0x81);
    be.fail_reads
        .store(false, std::sync::atomic::Ordering::SeqCst);
    d.check_mem();
    let (c, s) = d.get_log(0x02, 0, 512, 0, false);
    assert_ok(&c);
    assert_eq!(
        u128_at(&s, 32),
        3,
        "2001 units of 512 B read = 3 thousand (rounded up)"
    );
    assert_eq!(
        u128_at(&s, 48),
        1,
        "24 units written = 1 thousand (rounded up)"
    );
    assert_eq!(u128_at(&s, 64), 3, "host read commands");
    assert_eq!(u128_at(&s, 80), 3, "host write commands");
    assert_eq!(u128_at(&s, 160), 1, "media errors");
    assert_eq!(u128_at(&s, 176), 1, "error log entries");
    let (_, e) = d.get_log(0x01, 0, 64, 0, false);
    assert_eq!(u16_at(&e, 12) >> 1 & 0x7ff, 0x281, "media error entry");
    assert_eq!(u64_at(&e, 16), 77, "LBA of the failed read");
    // Per-namespace SMART data is not supported (LPA bit 0 clear).
    assert_status(&d.get_log(0x02, 1, 512, 0, false).0, 0, 0x02);
    assert_ok(&d.get_log(0x02, 0xffff_ffff, 512, 0, false).0);
}

#[test]
fn firmware_slot_effects_and_invalid_log_pages() {
    let mut d = TestDriver::ready(SPEC);
    let (c, fw) = d.get_log(0x03, 0, 512, 0, false);
    assert_ok(&c);
    assert_eq!(fw[0], 1, "active slot 1");
    assert_eq!(&fw[8..16], b"1.0     ");
    let (c, fx) = d.get_log(0x05, 0, 4096, 0, false);
    assert_ok(&c);
    let acs = |op: AdminOpcode| u32_at(&fx, usize::from(op.0) * 4);
    let iocs = |op: IoOpcode| u32_at(&fx, 1024 + usize::from(op.0) * 4);
    for op in [
        AdminOpcode::DELETE_IO_SQ,
        AdminOpcode::CREATE_IO_SQ,
        AdminOpcode::GET_LOG_PAGE,
        AdminOpcode::DELETE_IO_CQ,
        AdminOpcode::CREATE_IO_CQ,
        AdminOpcode::IDENTIFY,
        AdminOpcode::ABORT,
        AdminOpcode::SET_FEATURES,
        AdminOpcode::GET_FEATURES,
        AdminOpcode::ASYNC_EVENT_REQUEST,
    ] {
        assert_eq!(acs(op) & 1, 1, "admin {:#x} supported", op.0);
    }
    assert_eq!(
        acs(AdminOpcode::FORMAT_NVM),
        0x1_0007,
        "Format: CSUPP, LBCC, NCC, CSE namespace"
    );
    assert_eq!(acs(AdminOpcode(0x03)), 0); // reserved opcode
    assert_eq!(
        acs(AdminOpcode::KEEP_ALIVE),
        0,
        "Keep Alive not implemented"
    );
    assert_eq!(iocs(IoOpcode::WRITE), 0b11, "Write changes LBA content");
    assert_eq!(iocs(IoOpcode::READ), 0b01);
    assert_eq!(iocs(IoOpcode::COMPARE), 0b01);
    assert_eq!(iocs(IoOpcode::WRITE_ZEROES), 0b11);
    assert_eq!(iocs(IoOpcode::DATASET_MANAGEMENT), 0b11);
    assert_eq!(iocs(IoOpcode::VERIFY), 0b01);
    assert_eq!(
        iocs(IoOpcode::WRITE_UNCORRECTABLE),
        0,
        "Write Uncorrectable not offered"
    );
    // Effects for a non-NVM CSI.
    let buf = d.alloc(4096);
    let mut s = get_log_page(lid::COMMANDS_SUPPORTED_EFFECTS, 1023).prp(buf, 0);
    s.cdw14 = dw::Cdw14GetLogPage::new().with_csi(2).into_bits();
    assert_status(&d.admin(s), 0, 0x02);
    // Unknown log page: Invalid Field in Command (Base 2.0 §5.16), not Invalid Log Page.
    assert_status(&d.get_log(0x7f, 0, 512, 0, false).0, 0, 0x02);
    assert_status(&d.get_log(0xc0, 0, 512, 0, false).0, 0, 0x02);
    // Supported Log Pages lists exactly the logs that answer.
    let (c, sl) = d.get_log(0x00, 0, 1024, 0, false);
    assert_ok(&c);
    let listed: Vec<u8> = (0..=255u8)
        .filter(|&l| u32_at(&sl, usize::from(l) * 4) != 0)
        .collect();
    assert_eq!(listed, [0, 1, 2, 3, 4, 5, 6]);
    assert!(
        listed.iter().all(|&l| u32_at(&sl, usize::from(l) * 4) == 1),
        "LSUPP only"
    );
    for l in listed {
        assert_ok(&d.get_log(l, 0, 4, 0, true).0);
    }
    // No log takes an index offset (IOS clear), and Supported Log Pages is for CSI 0.
    for cdw14 in [
        dw::Cdw14GetLogPage::new().with_ot(true),
        dw::Cdw14GetLogPage::new().with_csi(2),
    ] {
        let mut s = get_log_page(lid::SUPPORTED_LOG_PAGES, 255).prp(buf, 0);
        s.cdw14 = cdw14.into_bits();
        assert_status(&d.admin(s), 0, 0x02);
    }
    // Offsets: beyond the page, and not dword aligned.
    assert_status(&d.get_log(0x03, 0, 4, 512, false).0, 0, 0x02);
    assert_status(&d.get_log(0x03, 0, 4, 2, false).0, 0, 0x02);
    // Reading past the end of a log returns zeroes for the remainder.
    let (c, tail) = d.get_log(0x03, 0, 16, 504, false);
    assert_ok(&c);
    assert_eq!(tail, vec![0u8; 16]);
    // With offset into the effects log.
    let (c, part) = d.get_log(0x05, 0, 8, 0x80 * 4, false);
    assert_ok(&c);
    assert_eq!(u32_at(&part, 0), 0x1_0007);
    d.check_mem();
}

#[test]
fn get_log_page_larger_than_mdts_is_invalid() {
    // mdts=1: 8 KiB.
    let mut d = TestDriver::ready("4,nvme,ram=16,mdts=1,ser=TESTSER1");
    let buf = d.alloc(4 * PAGE);
    let list = d.alloc(PAGE);
    d.write_u64(list, buf + PAGE);
    d.write_u64(list + 8, buf + 2 * PAGE);
    let s = get_log_page(lid::ERROR_INFORMATION, 3 * 1024 - 1).prp(buf, list); // 12 KiB
    assert_status(&d.admin(s), 0, 0x02);
    d.check_mem();
    assert_ok(&d.get_log(0x01, 0, 8192, 0, false).0);
}

// ---------------------------------------------------------------- Queues

#[test]
fn create_and_delete_queue_validation() {
    let mut d = TestDriver::from_spec("4,nvme,ram=16,maxq=4,qsz=256,ser=TESTSER1");
    d.pci_enable();
    d.enable_msix();
    d.enable();
    let cqb = d.alloc_queue(256 * 16);
    // Create I/O CQ errors.
    assert_status(&d.create_cq_cmd(0, 16, cqb, 3), 1, 0x01); // QID 0
    assert_status(&d.create_cq_cmd(5, 16, cqb, 3), 1, 0x01); // beyond maxq
    assert_status(&d.create_cq_cmd(0xffff, 16, cqb, 3), 1, 0x01);
    assert_status(&d.create_cq_cmd(1, 1, cqb, 3), 1, 0x02); // QSIZE 0's based 0
    assert_status(&d.create_cq_cmd(1, 257, cqb, 3), 1, 0x02); // > MQES+1
    assert_status(&d.create_cq_cmd(1, 16, cqb, 2), 0, 0x02); // PC=0 with CAP.CQR=1
    assert_status(&d.create_cq_cmd(1, 16, cqb, 3 | (5 << 16)), 1, 0x08); // 5 vectors: 0-4
    assert_status(&d.create_cq_cmd(1, 16, cqb + 0x100, 3), 0, 0x13); // not page aligned
    assert_status(&d.create_cq_cmd(1, 16, MEM_SIZE, 3), 0, 0x02); // outside RAM
    assert_ok(&d.create_cq_cmd(1, 256, cqb, 3 | (4 << 16)));
    assert_status(&d.create_cq_cmd(1, 16, cqb, 3), 1, 0x01); // exists
    d.cqs.insert(
        1,
        HostCq {
            base: cqb,
            size: 256,
            head: 0,
            phase: true,
        },
    );
    // Create I/O SQ errors.
    let sqb = d.alloc_queue(256 * 64);
    assert_status(&d.create_sq_cmd(0, 16, sqb, 1, 1), 1, 0x01);
    assert_status(&d.create_sq_cmd(5, 16, sqb, 1, 1), 1, 0x01);
    assert_status(&d.create_sq_cmd(1, 16, sqb, 0, 1), 1, 0x00); // CQ 0 is the admin CQ
    assert_status(&d.create_sq_cmd(1, 16, sqb, 2, 1), 1, 0x00); // CQ 2 does not exist
    assert_status(&d.create_sq_cmd(1, 16, sqb, 9, 1), 1, 0x00);
    assert_status(&d.create_sq_cmd(1, 1, sqb, 1, 1), 1, 0x02);
    assert_status(&d.create_sq_cmd(1, 512, sqb, 1, 1), 1, 0x02);
    assert_status(&d.create_sq_cmd(1, 16, sqb, 1, 0), 0, 0x02); // PC=0
    assert_status(&d.create_sq_cmd(1, 16, sqb + 64, 1, 1), 0, 0x13);
    assert_status(&d.create_sq_cmd(1, 256, MEM_SIZE - PAGE, 1, 1), 0, 0x02); // runs off RAM
    assert_ok(&d.create_sq_cmd(1, 256, sqb, 1, 1));
    d.sqs.insert(
        1,
        HostSq {
            base: sqb,
            size: 256,
            tail: 0,
            cqid: 1,
        },
    );
    assert_status(&d.create_sq_cmd(1, 16, sqb, 1, 1), 1, 0x01);
    // A second SQ on the same CQ.
    let sqb2 = d.alloc_queue(16 * 64);
    assert_ok(&d.create_sq_cmd(2, 16, sqb2, 1, 1));
    d.sqs.insert(
        2,
        HostSq {
            base: sqb2,
            size: 16,
            tail: 0,
            cqid: 1,
        },
    );
    d.read_blocks(1, 1, 0, 1, 512);
    d.read_blocks(2, 1, 0, 1, 512);
    assert_eq!(d.irq.count(msix_data(4)), 2, "CQ 1 uses vector 4");
    // Deletion errors.
    assert_status(&d.delete_cq(1), 1, 0x0c); // still used by SQ 1 and 2
    assert_status(&d.delete_sq(0), 1, 0x01);
    assert_status(&d.delete_sq(3), 1, 0x01);
    assert_status(&d.delete_cq(0), 1, 0x01);
    assert_status(&d.delete_cq(3), 1, 0x01);
    assert_ok(&d.delete_sq(1));
    assert_status(&d.delete_sq(1), 1, 0x01);
    assert_status(&d.delete_cq(1), 1, 0x0c); // SQ 2 remains
    assert_ok(&d.delete_sq(2));
    assert_ok(&d.delete_cq(1));
    // A doorbell to the deleted SQ is an error event, not a command.
    let aer = d.submit(0, async_event_request());
    d.bar_write32(0, 0x1000 + 8, 1);
    assert_eq!(d.wait_cid(0, aer).dw0, 0x01_00_00);
    // Re-create with a different size.
    d.create_pair(1, 2);
    for _ in 0..5 {
        d.read_blocks(1, 1, 0, 1, 512); // wraps the 2-entry queues repeatedly
    }
    d.check_mem();
}

#[test]
fn queues_of_65536_entries() {
    let mut d = TestDriver::from_spec("4,nvme,ram=16,maxq=2,qsz=65536,ser=TESTSER1");
    d.pci_enable();
    d.enable_msix();
    d.enable();
    assert_eq!(d.bar_read64(0, 0) & 0xffff, 0xffff);
    // Queues outside the standard areas: 1 MiB CQ at 16 MiB, 4 MiB SQ at 20 MiB.
    let (cqb, sqb) = (16 << 20, 20 << 20);
    d.allow(cqb, 1 << 20);
    d.allow(sqb, 4 << 20);
    assert_ok(&d.create_cq_cmd(1, 65536, cqb, 3 | (1 << 16)));
    d.cqs.insert(
        1,
        HostCq {
            base: cqb,
            size: 65536,
            head: 0,
            phase: true,
        },
    );
    assert_ok(&d.create_sq_cmd(1, 65536, sqb, 1, 1));
    d.sqs.insert(
        1,
        HostSq {
            base: sqb,
            size: 65536,
            tail: 0,
            cqid: 1,
        },
    );
    let w = data(512, 0x42);
    d.write_blocks(1, 1, 3, 512, &w);
    assert_eq!(d.read_blocks(1, 1, 3, 1, 512), w);
    let aer = d.submit(0, async_event_request());
    // CQ head beyond what was posted: an error event, not a crash.
    d.bar_write32(0, 0x1000 + 8 + 4, 40000);
    assert_eq!(d.wait_cid(0, aer).dw0, 0x01_01_00);
    assert_eq!(d.cqs[&1].head, 2);
    assert_eq!(d.read_blocks(1, 1, 3, 1, 512), w);
}

// ---------------------------------------------------------------- Abort and AER

#[test]
fn abort_and_asynchronous_event_limits() {
    let be = TestBackend::new(4 << 20, 512);
    let mut d = TestDriver::with_backends("4,nvme,ram=1,ser=TESTSER1", vec![be.clone()]);
    d.bring_up();
    // Aborting a command that does not exist: success, "not aborted".
    let c = d.admin(abort(1, 0x1234));
    assert_ok(&c);
    assert_eq!(c.dw0 & 1, 1);

    // AERs: four may be outstanding (AERL = 3), the fifth is refused.
    let aers: Vec<u16> = (0..4).map(|_| d.submit(0, async_event_request())).collect();
    d.assert_cq_empty(0);
    assert_status(&d.admin(async_event_request()), 1, 0x05);
    // Aborting an outstanding AER completes it with Abort Requested.
    let acid = d.submit(0, abort(0, aers[3]));
    let c = d.wait_cid(0, aers[3]);
    assert_status(&c, 0, 0x07);
    let c = d.wait_cid(0, acid);
    assert_ok(&c);
    assert_eq!(c.dw0 & 1, 0, "aborted");

    // Five reads held in the backend.
    be.hold();
    let bufs: Vec<u64> = (0..5).map(|_| d.alloc(512)).collect();
    let reads: Vec<u16> = bufs
        .iter()
        .map(|&b| d.submit(1, rw(IoOpcode::READ, 1, 0, 1).prp(b, 0)))
        .collect();
    be.wait_parked(4); // four executor threads; the fifth waits in the executor queue
                       // Four Aborts are held (ACL = 3) until their targets complete; the fifth exceeds the limit.
    let aborts: Vec<u16> = reads[..4]
        .iter()
        .map(|&r| d.submit(0, abort(1, r)))
        .collect();
    d.assert_cq_empty(0);
    assert_status(&d.admin(abort(1, reads[4])), 1, 0x03);
    d.assert_cq_empty(1);
    be.release();
    for (i, &r) in reads.iter().enumerate() {
        assert_ok(&d.wait_cid(1, r));
        d.expect(bufs[i], &[0u8; 512]);
    }
    for &a in &aborts {
        let c = d.wait_cid(0, a);
        assert_ok(&c);
        assert_eq!(
            c.dw0 & 1,
            1,
            "in-flight commands complete normally: not aborted"
        );
    }
    d.check_mem();
    // The three remaining AERs still work: trigger a notice via Format (AEC bit 8 set).
    assert_ok(&d.set_features(0x0b, 1 << 8));
    assert_ok(&d.admin(format_nvm(1, 1, 0))); // LBA format 1 (4096)
    let c = d.wait_cid(0, aers[0]);
    assert_eq!(
        c.dw0, 0x04_00_02,
        "notice, namespace attribute changed, log 04h"
    );
}

#[test]
fn delete_sq_waits_for_in_flight_commands() {
    let be = TestBackend::new(4 << 20, 512);
    let mut d = TestDriver::with_backends("4,nvme,ram=1,ser=TESTSER1", vec![be.clone()]);
    d.bring_up();
    be.hold();
    let buf = d.alloc(512);
    let r = d.submit(1, rw(IoOpcode::READ, 1, 0, 1).prp(buf, 0));
    be.wait_parked(1);
    let del = d.submit(0, delete_io_sq(1));
    d.assert_cq_empty(0);
    // The CQ cannot go while its SQ is being deleted.
    assert_status(&d.delete_cq(1), 1, 0x0c);
    be.release();
    assert_ok(&d.wait_cid(1, r));
    assert_ok(&d.wait_cid(0, del));
    d.expect(buf, &[0u8; 512]);
    d.check_mem();
    assert_ok(&d.delete_cq(1));
}

// ---------------------------------------------------------------- Format NVM

#[test]
fn format_lba_formats_and_errors() {
    let mut d = TestDriver::ready(SPEC);
    let w = data(4096, 5);
    d.write_blocks(1, 1, 0, 512, &w);
    assert_ok(&d.admin(format_nvm(1, 1, 0)));
    let ns = d.identify_ok(0x00, 1);
    assert_eq!(ns[26], 1, "FLBAS: 4096");
    assert_eq!(u64_at(&ns, 0), (16 << 20) / 4096);
    assert_eq!(
        u64_at(&d.identify_ok(0x00, 2), 0),
        NS2_BLOCKS,
        "namespace 2 unchanged"
    );
    // 4096-byte LBAs now: LBA 4095 is the last.
    let w2 = data(4096, 6);
    d.write_blocks(1, 1, 4095, 4096, &w2);
    assert_eq!(d.read_blocks(1, 1, 4095, 1, 4096), w2);
    let buf = d.alloc(4096);
    assert_status(
        &d.io(1, rw(IoOpcode::READ, 1, 4096, 1).prp(buf, 0)),
        0,
        0x80,
    );
    // Changed namespace list reports NSID 1 once.
    let (c, l) = d.get_log(0x04, 0, 4096, 0, false);
    assert_ok(&c);
    assert_eq!((u32_at(&l, 0), u32_at(&l, 4)), (1, 0));
    let (_, l) = d.get_log(0x04, 0, 4096, 0, false);
    assert_eq!(u32_at(&l, 0), 0, "cleared by the read");
    // Back to 512 on all namespaces.
    assert_ok(&d.admin(format_nvm(NSID_ALL, 0, 0)));
    assert_eq!(d.identify_ok(0x00, 1)[26], 0);
    // Errors.
    assert_status(&d.admin(format_nvm(1, 2, 0)), 1, 0x0a); // LBA format 2 does not exist
    assert_status(&d.admin(format_nvm(1, 0x10, 0)), 1, 0x0a); // LBAFU
    let mut pi = format_nvm(1, 0, 0);
    pi.cdw10 = dw::Cdw10Format::new().with_pi(1).into_bits(); // protection information
    assert_status(&d.admin(pi), 1, 0x0a);
    assert_status(&d.admin(format_nvm(1, 0, 2)), 0, 0x02); // cryptographic erase
    assert_status(&d.admin(format_nvm(3, 0, 0)), 0, 0x0b);
    assert_status(&d.admin(format_nvm(0, 0, 0)), 0, 0x0b);
    d.check_mem();
}

#[test]
fn format_with_user_data_erase_zeroes_the_namespace() {
    let mut d = TestDriver::ready(SPEC);
    let w = data(8192, 7);
    d.write_blocks(1, 1, 0, 512, &w);
    d.write_blocks(1, 1, NS1_BLOCKS - 16, 512, &w);
    d.write_blocks(1, 2, 0, 512, &w);
    assert_ok(&d.admin(format_nvm(1, 0, 1))); // user data erase, LBA format 0
    assert_eq!(d.read_blocks(1, 1, 0, 16, 512), vec![0u8; 8192]);
    assert_eq!(
        d.read_blocks(1, 1, NS1_BLOCKS - 16, 16, 512),
        vec![0u8; 8192]
    );
    assert_eq!(
        d.read_blocks(1, 2, 0, 16, 512),
        w,
        "other namespace untouched"
    );
}

#[test]
fn format_read_only_namespace_is_write_protected() {
    let img = TempFile::new("fmt-ro", &data(1 << 20, 1));
    let mut d = TestDriver::ready(&format!("4,nvme,{},ro,ser=TESTSER1", img.0.display()));
    assert_status(&d.admin(format_nvm(1, 0, 1)), 0, 0x20);
    assert_eq!(img.read(), data(1 << 20, 1));
    assert_eq!(d.identify_ok(0x00, 1)[99] & 1, 1, "NSATTR write protected");
}

#[test]
fn commands_on_many_namespaces_stay_apart() {
    let mut d = TestDriver::ready("4,nvme,ram=1,ram=2,ram=3,ram=4,ser=TESTSER1");
    assert_eq!(u32_at(&d.identify_ok(0x01, 0), 516), 4);
    for ns in 1..=4u32 {
        d.write_blocks(1, ns, 5, 512, &data(1024, ns as u8));
        assert_eq!(u64_at(&d.identify_ok(0x00, ns), 0), u64::from(ns) * 2048);
    }
    for ns in 1..=4u32 {
        assert_eq!(d.read_blocks(1, ns, 5, 2, 512), data(1024, ns as u8));
    }
}

#[test]
fn format_raises_a_namespace_notice_only_when_the_namespace_changes() {
    let mut d = TestDriver::ready(SPEC);
    assert_ok(&d.set_features(0x0b, 1 << 8));
    let aer = d.submit(0, async_event_request());
    assert_ok(&d.admin(format_nvm(1, 0, 0))); // already LBA format 0
    d.assert_cq_empty(0);
    let (_, l) = d.get_log(0x04, 0, 4096, 0, false);
    assert_eq!(u32_at(&l, 0), 0, "nothing changed");
    // Notices disabled: a real change is logged but not announced.
    assert_ok(&d.set_features(0x0b, 0));
    assert_ok(&d.admin(format_nvm(1, 1, 0)));
    d.assert_cq_empty(0);
    let (_, l) = d.get_log(0x04, 0, 4096, 0, false);
    assert_eq!(u32_at(&l, 0), 1);
    // Enabled again: a change is announced.
    assert_ok(&d.set_features(0x0b, 1 << 8));
    assert_ok(&d.admin(format_nvm(1, 0, 0)));
    assert_eq!(d.wait_cid(0, aer).dw0, 0x04_00_02);
}

fn self_test(stc: u32, nsid: u32) -> nvme::spec::Sqe {
    let mut s = sqe(AdminOpcode::DEVICE_SELF_TEST.0, nsid);
    s.cdw10 = stc;
    s
}

/// The Device Self-test log.
fn self_test_log(d: &mut TestDriver) -> Vec<u8> {
    let (c, log) = d.get_log(0x06, 0, 564, 0, false);
    assert_ok(&c);
    log
}

/// Result structure `i` (0 = newest) of a Device Self-test log.
fn dst_entry(log: &[u8], i: usize) -> &[u8] {
    &log[4 + i * 28..4 + (i + 1) * 28]
}

/// Polls the Device Self-test log until no operation is in progress, checking that the
/// completion it reports never goes backwards, as a host waiting on it would.
fn wait_self_test(d: &mut TestDriver) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = 0;
    loop {
        let log = self_test_log(d);
        if log[0] == 0 {
            return log;
        }
        assert!(
            log[1] >= last && log[1] < 100,
            "completion {} after {last}",
            log[1]
        );
        last = log[1];
        assert!(Instant::now() < deadline, "self-test never finished");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn device_self_tests_run_abort_and_are_logged_newest_first() {
    let mut d = TestDriver::ready(SPEC);
    let id = d.identify_ok(cns::CONTROLLER, 0);
    assert_eq!(
        u16_at(&id, 256) & (1 << 4),
        1 << 4,
        "OACS: Device Self-test"
    );
    assert_eq!(u16_at(&id, 316), 1, "EDSTT: one minute");
    assert_eq!(id[318], 1, "DSTO: one operation at a time");
    let (c, fx) = d.get_log(0x05, 0, 4096, 0, false);
    assert_ok(&c);
    assert_eq!(
        u32_at(&fx, 0x14 * 4),
        1,
        "Device Self-test in the effects log"
    );
    let log = self_test_log(&mut d);
    assert_eq!(log[0], 0, "no operation in progress");
    assert!(
        (0..20).all(|i| dst_entry(&log, i)[0] == 0x0f),
        "every entry unused"
    );

    // Bad codes and namespaces are refused before anything starts.
    for stc in [0x0, 0x3, 0xe] {
        assert_status(&d.admin(self_test(stc, 0)), 0, 0x02);
    }
    assert_status(&d.admin(self_test(1, 9)), 0, 0x0b);
    assert_ok(&d.admin(self_test(0xf, 0))); // abort, with nothing running: no entry
    assert_eq!(dst_entry(&self_test_log(&mut d), 0)[0], 0x0f);

    // One operation at a time; an abort ends it with result 1h.
    assert_ok(&d.admin(self_test(1, 1)));
    assert_status(&d.admin(self_test(2, 0)), 1, 0x1d);
    let log = self_test_log(&mut d);
    assert_eq!(log[0], 1, "short test in progress");
    assert_ok(&d.admin(self_test(0xf, 0)));
    let log = self_test_log(&mut d);
    assert_eq!(log[0], 0);
    let e = dst_entry(&log, 0);
    assert_eq!(e[0], 0x11, "short, aborted by a Device Self-test command");
    assert_eq!(e[2], 0, "nothing failed: no diagnostic field is valid");

    // A format of a namespace the test covers aborts it with result 4h; a test of the
    // controller alone (NSID 0) is not affected.
    assert_ok(&d.admin(self_test(2, 0xffff_ffff)));
    assert_ok(&d.admin(format_nvm(1, 0, 0)));
    let e = dst_entry(&self_test_log(&mut d), 0).to_vec();
    assert_eq!(e[0], 0x24, "extended, aborted by Format NVM");
    assert_ok(&d.admin(self_test(2, 0)));
    assert_ok(&d.admin(format_nvm(0xffff_ffff, 0, 0)));
    assert_eq!(self_test_log(&mut d)[0], 2, "controller-only test goes on");
    assert_ok(&d.admin(self_test(0xf, 0)));
    assert_eq!(dst_entry(&self_test_log(&mut d), 0)[0], 0x21);

    // A controller reset aborts a short test (2h) but not an extended one.
    assert_ok(&d.admin(self_test(1, 0)));
    d.disable();
    d.bring_up();
    let log = self_test_log(&mut d);
    assert_eq!((log[0], dst_entry(&log, 0)[0]), (0, 0x12));
    assert_eq!(
        dst_entry(&log, 0)[2] & 1,
        0,
        "controller only: NSID not valid"
    );
    assert_ok(&d.admin(self_test(2, 0)));
    d.disable();
    d.bring_up();
    assert_eq!(
        self_test_log(&mut d)[0],
        2,
        "extended test survives the reset"
    );
    let log = wait_self_test(&mut d);
    assert_eq!(
        dst_entry(&log, 0)[0],
        0x20,
        "extended, completed without error"
    );
    assert_ok(&d.admin(self_test(1, 1)));
    let log = wait_self_test(&mut d);
    assert_eq!(
        dst_entry(&log, 0)[0],
        0x10,
        "short, completed without error"
    );
    let order: Vec<u8> = (0..6).map(|i| dst_entry(&log, i)[0]).collect();
    assert_eq!(order, [0x10, 0x20, 0x12, 0x21, 0x24, 0x11], "newest first");
    assert_eq!(dst_entry(&log, 6)[0], 0x0f);

    // Twenty results at most: the oldest fall off.
    for _ in 0..30 {
        assert_ok(&d.admin(self_test(2, 0)));
        assert_ok(&d.admin(self_test(0xf, 0)));
    }
    let log = self_test_log(&mut d);
    assert!((0..20).all(|i| dst_entry(&log, i)[0] == 0x21));
}
