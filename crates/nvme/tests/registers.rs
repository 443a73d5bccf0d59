//! Controller registers, enable/reset/shutdown, doorbells and interrupt delivery (MSI-X, MSI,
//! INTx, INTMS/INTMC).

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;

/// Interrupt counts here are exact: coalescing only as the host asks (feature 08h).
const SPEC: &str = "4,nvme,ram=16,ser=TESTSER1,coalesce=host";

#[test]
fn pci_identity_capabilities_and_bars() {
    let mut d = TestDriver::from_spec(SPEC);
    assert_eq!(d.cfg_read(0, 2), 0xfb5d);
    assert_eq!(d.cfg_read(2, 2), 0x0a0a);
    // Mass storage / NVM / NVMe I/O controller.
    assert_eq!(d.cfg_read(9, 1), 0x02);
    assert_eq!(d.cfg_read(0xa, 1), 0x08);
    assert_eq!(d.cfg_read(0xb, 1), 0x01);
    assert_eq!(d.cfg_read(0x3d, 1), 1, "INTA when the frontend has INTx");
    for id in [0x01, 0x05, 0x10, 0x11] {
        assert!(d.find_cap(id).is_some(), "capability {id:#x} missing");
    }
    let msix = d.find_cap(0x11).unwrap();
    assert_eq!(
        (d.cfg_read(msix + 2, 2) & 0x7ff) + 1,
        17,
        "one vector per queue pair (maxq=16) + admin"
    );
    assert_eq!(d.cfg_read(msix + 4, 4), 4, "table in BAR4 at 0");
    assert_eq!(d.cfg_read(msix + 8, 4), 0x1004, "PBA in BAR4 at 0x1000");
    let bars = d.dev.bars();
    assert_eq!(bars.len(), 2);
    assert_eq!((bars[0].index, bars[0].size), (0, 0x4000));
    assert_eq!((bars[1].index, bars[1].size), (4, 0x2000));

    let mut no_intx = TestDriver::from_spec_intx(SPEC, false);
    assert_eq!(
        no_intx.cfg_read(0x3d, 1),
        0,
        "no interrupt pin without INTx"
    );
}

#[test]
fn cap_and_version() {
    let mut d = TestDriver::from_spec("4,nvme,ram=16,qsz=256,ser=TESTSER1");
    let cap = d.bar_read64(0, 0);
    assert_eq!(cap & 0xffff, 255, "MQES");
    assert_eq!((cap >> 16) & 1, 1, "CQR");
    assert_eq!((cap >> 17) & 3, 0, "AMS: round robin only");
    assert_eq!((cap >> 24) & 0xff, 0x0f, "TO");
    assert_eq!((cap >> 32) & 0xf, 0, "DSTRD");
    assert_eq!((cap >> 36) & 1, 0, "NSSRS");
    assert_eq!((cap >> 37) & 0xff, 1, "CSS: NVM command set");
    assert_eq!((cap >> 48) & 0xf, 0, "MPSMIN 4 KiB");
    assert_eq!((cap >> 52) & 0xf, 4, "MPSMAX 64 KiB");
    assert_eq!(d.reg(0), cap as u32);
    assert_eq!(d.reg(4), (cap >> 32) as u32);
    assert_eq!(d.reg(8), 0x0002_0000, "VS 2.0.0");
    // CAP and VS are read-only.
    d.set_reg(0, 0);
    d.set_reg(8, 0);
    assert_eq!(d.bar_read64(0, 0), cap);
    assert_eq!(d.reg(8), 0x0002_0000);
    // Unimplemented BARs read as all-ones; writes to them are ignored.
    assert_eq!(d.bar_read32(2, 0), 0xffff_ffff);
    d.bar_write32(2, 0, 0);
    // Beyond BAR0's doorbells: ignored, never a crash.
    d.bar_write32(0, 0x3ffc, 1);
    assert_eq!(d.bar_read32(0, 0x5000), 0xffff_ffff);
}

#[test]
fn admin_queue_registers_and_enable() {
    let mut d = TestDriver::from_spec(SPEC);
    assert_eq!(d.csts(), 0);
    d.set_reg(0x24, 0x0fff_0fff | 0xf000_f000);
    assert_eq!(d.reg(0x24), 0x0fff_0fff, "AQA reserved bits read 0");
    d.bar_write64(0, 0x28, 0x1234_5678_9abc_dfff);
    assert_eq!(
        d.bar_read64(0, 0x28),
        0x1234_5678_9abc_d000,
        "ASQ low 12 bits reserved"
    );
    d.bar_write64(0, 0x30, 0x0000_0001_0000_1000);
    assert_eq!(d.bar_read64(0, 0x30), 0x0000_0001_0000_1000);
    // Partial (16-bit) writes merge into the register.
    d.dev.bar_write(0, 0x24, &0x003fu16.to_le_bytes());
    d.dev.bar_write(0, 0x26, &0x001fu16.to_le_bytes());
    assert_eq!(d.reg(0x24), 0x001f_003f);

    d.pci_enable(); // Bus Master Enable: the controller may fetch commands
    d.enable();
    assert_eq!(d.csts(), 1, "RDY, no CFS, SHST normal");
    assert_eq!(d.reg(0x14), 0x0046_0001);
    // CC fields other than EN/SHN cannot change while enabled.
    d.set_reg(0x14, 0x0046_0001 | (1 << 7));
    assert_eq!(d.reg(0x14), 0x0046_0001, "MPS is locked while enabled");
    let id = d.identify_ok(1, 0);
    assert_eq!(&id[4..12], b"TESTSER1");
    assert!(
        d.irq.count(msix_data(0)) == 0,
        "MSI-X not enabled: no messages"
    );
}

#[test]
fn enable_with_invalid_configuration_sets_cfs_and_reset_clears_it() {
    let mut d = TestDriver::from_spec(SPEC);
    d.pci_enable();
    // MPS 5 (128 KiB) exceeds MPSMAX.
    d.enable_with_cc(0x0046_0001 | (5 << 7));
    d.wait_csts(2, 2);
    assert_eq!(d.csts() & 1, 0, "not ready");
    // Doorbells while not ready are ignored.
    d.submit(0, admin(AdminOpcode::IDENTIFY));
    d.assert_cq_empty(0);
    d.set_reg(0x14, 0);
    assert_eq!(d.csts(), 0, "reset clears CFS");
    // CSS 1 (reserved) also refuses.
    d.enable_with_cc(0x0046_0011);
    d.wait_csts(2, 2);
    d.set_reg(0x14, 0);
    d.enable();
    assert_ok(&d.identify(1, 0, 0).0);
}

#[test]
fn doorbell_before_ready_is_ignored() {
    let mut d = TestDriver::from_spec(SPEC);
    d.pci_enable();
    d.enable_msix();
    // Queue an Identify on the admin SQ and ring before the controller exists.
    let buf = d.alloc(4096);
    let s = identify(cns::CONTROLLER, 0).prp(buf, 0).cid(0x77);
    d.write_mem(ASQ, zerocopy::IntoBytes::as_bytes(&s));
    d.bar_write32(0, 0x1000, 1);
    d.bar_write32(0, 0x1004, 1);
    d.bar_write32(0, 0x1008, 5);
    d.enable();
    d.assert_cq_empty(0);
    d.check_mem(); // the early Identify never ran
                   // The controller's SQ tail is still 0: the next command is taken from slot 0 after we
                   // ring tail 1 — our host state starts at tail 0 as well.
    let (c, id) = d.identify(1, 0, 0);
    assert_ok(&c);
    assert_eq!(c.sq_head, 1);
    assert_eq!(&id[4..12], b"TESTSER1");
    assert_eq!(
        d.irq.count(msix_data(0)),
        1,
        "admin completion raised vector 0"
    );
}

#[test]
fn reset_clears_queues_and_features() {
    let mut d = TestDriver::ready(SPEC);
    assert_ok(&d.set_features(0x06, 0)); // volatile write cache off
    assert_ok(&d.set_features(0x08, 0x0a05));
    d.disable();
    assert_eq!(
        d.reg(0x14),
        0x0046_0000,
        "CC keeps what the host wrote, EN clear"
    );
    assert_eq!(d.csts(), 0);
    // Doorbells after reset go nowhere.
    d.bar_write32(0, 0x1000 + 8, 1);
    d.enable();
    assert_eq!(
        d.get_features(0x06, 0, 0, 0).dw0,
        1,
        "VWC back to its default"
    );
    assert_eq!(
        d.get_features(0x08, 0, 0, 0).dw0,
        0,
        "coalescing back to its default"
    );
    // I/O queue 1 is gone: deleting it fails, re-creating it works.
    assert_status(&d.delete_sq(1), 1, 0x01);
    assert_status(&d.delete_cq(1), 1, 0x01);
    d.create_pair(1, 16);
    let w = data(512, 3);
    d.write_blocks(1, 1, 0, 512, &w);
    assert_eq!(d.read_blocks(1, 1, 0, 1, 512), w);
}

#[test]
fn shutdown_notification_flushes_then_reports_complete() {
    let be = TestBackend::new(8 << 20, 512);
    let mut d = TestDriver::with_backends(SPEC, vec![be.clone()]);
    d.bring_up();
    let w = data(4096, 9);
    d.write_blocks(1, 1, 8, 512, &w); // VWC on: no flush per write
    let before = be.flushes.load(Ordering::SeqCst);
    assert_eq!(before, 0, "write-back cache: writes do not flush");
    let cc = d.reg(0x14);
    d.set_reg(0x14, cc | (1 << 14)); // SHN = normal shutdown
    d.wait_csts(0xc, 0x8); // SHST = complete
    assert!(
        be.flushes.load(Ordering::SeqCst) > before,
        "shutdown flushed the backend"
    );
    assert_eq!(d.csts() & 1, 1, "still ready");
    // Reset after shutdown: SHST survives the reset, a new enable clears it.
    d.disable();
    d.enable();
    assert_eq!(d.csts(), 1);
    d.create_pair(1, 16);
    assert_eq!(
        d.read_blocks(1, 1, 8, 8, 512),
        w,
        "data survived shutdown and reset"
    );
}

#[test]
fn doorbells_for_absent_queues_raise_an_error_event() {
    let mut d = TestDriver::ready(SPEC);
    let aer = d.submit(0, async_event_request());
    d.assert_cq_empty(0);
    // SQ 5 tail doorbell: no such queue.
    d.bar_write32(0, 0x1000 + 8 * 5, 1);
    let c = d.wait_cid(0, aer);
    assert_ok(&c);
    assert_eq!(
        c.dw0, 0x01_00_00,
        "error event, Invalid Doorbell Register, log page 01h"
    );
    // While the error log has not been read, further error events stay masked.
    let aer2 = d.submit(0, async_event_request());
    d.bar_write32(0, 0x1000 + 8 * 7 + 4, 0); // CQ 7 head: absent
    d.assert_cq_empty(0);
    // Reading the error log (no RAE) unmasks; the next bad doorbell is reported.
    let (c, _) = d.get_log(0x01, 0, 64, 0, false);
    assert_ok(&c);
    d.assert_cq_empty(0);
    d.bar_write32(0, 0x1000 + 8 * 16, 3); // qid 16 within BAR but never created
    let c = d.wait_cid(0, aer2);
    assert_eq!(c.dw0, 0x01_00_00);
    // The controller keeps working.
    assert_ok(&d.identify(1, 0, 0).0);
}

#[test]
fn out_of_range_doorbell_values_raise_an_event_and_are_ignored() {
    let mut d = TestDriver::ready(SPEC);
    let aer = d.submit(0, async_event_request());
    // SQ 1 has 64 entries: tail 64 is out of range.
    d.bar_write32(0, 0x1000 + 8, 64);
    let c = d.wait_cid(0, aer);
    assert_eq!(
        c.dw0, 0x01_01_00,
        "error event, Invalid Doorbell Write Value"
    );
    assert_ok(&d.get_log(0x01, 0, 64, 0, false).0);
    // CQ 1 head beyond what the controller posted (nothing posted yet).
    let aer = d.submit(0, async_event_request());
    d.bar_write32(0, 0x1000 + 8 + 4, 5);
    let c = d.wait_cid(0, aer);
    assert_eq!(c.dw0, 0x01_01_00);
    assert_ok(&d.get_log(0x01, 0, 64, 0, false).0);
    // Admin CQ head past the end.
    let aer = d.submit(0, async_event_request());
    d.bar_write32(0, 0x1004, 0xffff_ffff);
    let c = d.wait_cid(0, aer);
    assert_eq!(c.dw0, 0x01_01_00);
    // None of this moved the queues: I/O still works in order.
    let w = data(1024, 1);
    d.write_blocks(1, 1, 0, 512, &w);
    assert_eq!(d.read_blocks(1, 1, 0, 2, 512), w);
}

#[test]
fn msix_vector_per_queue_masking_and_pba() {
    let mut d = TestDriver::ready(SPEC);
    d.create_pair(2, 16);
    let admin_before = d.irq.count(msix_data(0));
    d.read_blocks(1, 1, 0, 1, 512);
    d.read_blocks(2, 1, 0, 1, 512);
    d.read_blocks(2, 1, 0, 1, 512);
    assert_eq!(d.irq.count(msix_data(1)), 1);
    assert_eq!(d.irq.count(msix_data(2)), 2);
    assert_eq!(
        d.irq.count(msix_data(0)),
        admin_before,
        "I/O completions do not use vector 0"
    );
    // Mask vector 1: the completion is posted, the message waits in the PBA.
    d.bar_write32(4, 16 + 12, 1);
    d.read_blocks(1, 1, 0, 1, 512);
    assert_eq!(d.irq.count(msix_data(1)), 1);
    assert_eq!(d.bar_read32(4, 0x1000) & 0b10, 0b10, "PBA bit 1 pending");
    d.bar_write32(4, 16 + 12, 0);
    assert_eq!(
        d.irq.count(msix_data(1)),
        2,
        "unmasking delivered the pending message"
    );
    assert_eq!(d.bar_read32(4, 0x1000) & 0b10, 0);
    // INTMS/INTMC are not used with MSI-X.
    d.set_reg(0x0c, 0xffff_ffff);
    assert_eq!(d.reg(0x0c), 0);
    d.read_blocks(1, 1, 0, 1, 512);
    assert_eq!(d.irq.count(msix_data(1)), 3);
}

#[test]
fn msi_mode_with_intms_and_intmc() {
    let mut d = TestDriver::from_spec(SPEC);
    d.pci_enable();
    d.enable_msi(2); // 4 messages
    d.enable();
    let msi = |v: u32| u32::from(MSI_DATA) | v;
    let before = d.irq.count(msi(0));
    assert_ok(&d.identify(1, 0, 0).0);
    assert_eq!(d.irq.count(msi(0)), before + 1);
    // Vector 4 does not exist with 4 MSI messages.
    let cqb = d.alloc_queue(16 * 16);
    assert_status(&d.create_cq_cmd(1, 16, cqb, 0x3 | (4 << 16)), 1, 0x08);
    d.create_pair(1, 16); // vector 1
    d.read_blocks(1, 1, 0, 1, 512);
    assert_eq!(d.irq.count(msi(1)), 1);

    // Mask vector 1 through INTMS: completions post, no message.
    d.set_reg(0x0c, 0b10);
    assert_eq!(d.reg(0x0c), 0b10);
    assert_eq!(d.reg(0x10), 0b10, "INTMC reads the same mask");
    d.auto_ring = false;
    let buf = d.alloc(512);
    let c = d.io(1, rw(IoOpcode::READ, 1, 0, 1).prp(buf, 0));
    assert_ok(&c);
    d.expect(buf, &d.read_mem(buf, 512));
    assert_eq!(d.irq.count(msi(1)), 1, "masked by INTMS");
    // Unmask with INTMC: the entry is still unconsumed, so the message goes out now.
    d.set_reg(0x10, 0b10);
    assert_eq!(d.reg(0x0c), 0);
    assert_eq!(d.irq.count(msi(1)), 2, "INTMC delivered the owed interrupt");
    d.ring_cq_head(1);
    d.auto_ring = true;
    // Admin vector is unaffected by masking vector 1.
    d.set_reg(0x0c, 0b10);
    let before = d.irq.count(msi(0));
    assert_ok(&d.identify(1, 0, 0).0);
    assert_eq!(d.irq.count(msi(0)), before + 1);
    d.check_mem();
}

#[test]
fn intx_level_follows_unconsumed_entries_and_intms() {
    let mut d = TestDriver::from_spec(SPEC);
    d.pci_enable();
    d.enable(); // no MSI/MSI-X: INTx
    d.auto_ring = false;
    assert!(!d.irq.intx_level());
    let (c, _) = d.identify(1, 0, 0);
    assert_ok(&c);
    assert!(
        d.irq.intx_level(),
        "INTA asserted while the admin CQ holds an entry"
    );
    assert_eq!(d.cfg_read(6, 2) & (1 << 3), 1 << 3, "Interrupt Status bit");
    d.ring_cq_head(0);
    assert!(!d.irq.intx_level(), "deasserted once the host consumed it");
    // INTMS bit 0 masks INTx.
    d.set_reg(0x0c, 1);
    assert_ok(&d.identify(1, 0, 0).0);
    assert!(!d.irq.intx_level());
    d.set_reg(0x10, 1);
    assert!(
        d.irq.intx_level(),
        "INTMC re-asserts for the unconsumed entry"
    );
    d.ring_cq_head(0);
    assert!(!d.irq.intx_level());
    assert_eq!(d.irq.total(), 0, "no MSI messages in INTx mode");
    // Only vector 0 exists in INTx mode.
    d.auto_ring = true;
    let cqb = d.alloc_queue(16 * 16);
    assert_status(&d.create_cq_cmd(1, 16, cqb, 0x3 | (1 << 16)), 1, 0x08);
    assert_ok(&d.create_cq_cmd(1, 16, cqb, 0x3));
    // I/O completions assert INTx too.
    d.cqs.insert(
        1,
        HostCq {
            base: cqb,
            size: 16,
            head: 0,
            phase: true,
        },
    );
    let sqb = d.alloc_queue(16 * 64);
    assert_ok(&d.create_sq_cmd(1, 16, sqb, 1, 1));
    d.sqs.insert(
        1,
        HostSq {
            base: sqb,
            size: 16,
            tail: 0,
            cqid: 1,
        },
    );
    d.auto_ring = false;
    let cid = d.submit(1, flush(1));
    let c = d.wait_cid(1, cid);
    assert_ok(&c);
    assert!(d.irq.intx_level());
    d.ring_cq_head(1);
    assert!(!d.irq.intx_level());
    // Reset drops the level.
    let (c, _) = d.identify(1, 0, 0);
    assert_ok(&c);
    assert!(d.irq.intx_level());
    d.disable();
    assert!(!d.irq.intx_level());
}

#[test]
fn reset_with_io_in_flight_drops_its_completion() {
    let be = TestBackend::new(8 << 20, 512);
    let mut d = TestDriver::with_backends(SPEC, vec![be.clone()]);
    d.bring_up();
    be.hold();
    let buf = d.alloc(4096);
    d.submit(1, rw(IoOpcode::READ, 1, 0, 8).prp(buf, 0));
    be.wait_parked(1);
    let cq1 = d.cqs[&1];
    let releaser = {
        let be = Arc::clone(&be);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            be.release();
        })
    };
    // CC.EN 1→0 waits for the read to finish before RDY drops.
    d.disable();
    releaser.join().unwrap();
    // The read's data landed (the command ran to completion) but no CQE was posted.
    d.expect(buf, &vec![0u8; 4096]);
    d.check_mem();
    let cqe = d.read_mem(cq1.base, 16);
    assert_eq!(
        cqe,
        vec![0u8; 16],
        "no completion written to the queue of a reset controller"
    );
    d.enable();
    assert_ok(&d.identify(1, 0, 0).0);
}

#[test]
fn completion_queue_with_interrupts_disabled_raises_none() {
    let mut d = TestDriver::ready(SPEC);
    let cqb = d.alloc_queue(16 * 16);
    assert_ok(&d.create_cq_cmd(3, 16, cqb, 0x1 | (3 << 16))); // PC, IEN clear
    d.cqs.insert(
        3,
        HostCq {
            base: cqb,
            size: 16,
            head: 0,
            phase: true,
        },
    );
    let sqb = d.alloc_queue(16 * 64);
    assert_ok(&d.create_sq_cmd(3, 16, sqb, 3, 1));
    d.sqs.insert(
        3,
        HostSq {
            base: sqb,
            size: 16,
            tail: 0,
            cqid: 3,
        },
    );
    let before = d.irq.total();
    for _ in 0..3 {
        d.read_blocks(3, 1, 0, 8, 512);
    }
    assert_eq!(d.irq.total(), before, "polled queue: no messages");
    d.read_blocks(1, 1, 0, 8, 512);
    assert_eq!(d.irq.count(msix_data(1)), 1);
}

#[test]
fn admin_queues_outside_ram_fail_the_controller_not_the_process() {
    let mut d = TestDriver::from_spec(SPEC);
    d.pci_enable();
    d.set_reg(0x24, 0x003f_003f);
    d.bar_write64(0, 0x28, MEM_SIZE + 0x10000);
    d.bar_write64(0, 0x30, ACQ);
    d.set_reg(0x14, 0x0046_0001);
    assert_eq!(d.csts() & 1, 1);
    d.bar_write32(0, 0x1000, 1); // the SQE cannot be fetched
    assert_eq!(d.csts() & 2, 2, "CFS");
    d.bar_write32(0, 0x1000, 2); // ignored from now on
    d.set_reg(0x14, 0);
    assert_eq!(d.csts(), 0);
    // Admin CQ of 4096 entries in the last page of RAM: entry 256 lies past the end. The
    // Identifies run; the first CQE that cannot be written fails the controller.
    d.set_reg(0x24, 0x0fff_003f);
    d.bar_write64(0, 0x28, ASQ);
    d.bar_write64(0, 0x30, MEM_SIZE - PAGE);
    d.allow(MEM_SIZE - PAGE, PAGE);
    d.sqs.insert(
        0,
        HostSq {
            base: ASQ,
            size: 64,
            tail: 0,
            cqid: 0,
        },
    );
    d.set_reg(0x14, 0x0046_0001);
    assert_eq!(d.csts(), 1);
    let buf = d.alloc(4096);
    let s = identify(cns::CONTROLLER, 0).prp(buf, 0);
    for _ in 0..256 {
        d.submit_raw(0, s);
    }
    assert_eq!(d.csts(), 1, "256 completions fit");
    let last = d.read_mem(MEM_SIZE - 16, 16);
    assert_eq!(
        (
            last[14] & 1,
            status(&<nvme::spec::Cqe as zerocopy::FromBytes>::read_from_bytes(&last[..]).unwrap())
                .sc
        ),
        (1, 0)
    );
    d.submit_raw(0, s);
    assert_eq!(d.csts() & 2, 2, "CFS once a CQE cannot be written");
    let id = d.read_mem(buf, 4096);
    d.expect(buf, &id);
    d.check_mem();
    d.disable();
    d.enable();
    assert_ok(&d.identify(1, 0, 0).0);
}
