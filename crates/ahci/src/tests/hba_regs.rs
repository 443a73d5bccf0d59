//! PCI function, HBA and port registers: reset, start/stop, COMRESET, access widths, interrupts.

use std::sync::Arc;
use std::time::Duration;

use pci::PciDevice;

use crate::regs::{cap, ghc, hba, port as preg, pxcmd, pxis, serr, sig};
use crate::spec::cmd;
use crate::testdrv::{cdrom, disk, Cmd, Driver, TestBackend, BUF};

fn one_disk() -> Vec<crate::DriveInfo> {
    vec![disk(TestBackend::new(1 << 20, 512), 512, 512)]
}

#[test]
fn pci_identity_bar_and_capabilities() {
    let mut d = Driver::with_intx(one_disk(), false);
    assert_eq!(d.cfg_read(0, 4), 0x2821_8086);
    assert_eq!(
        d.cfg_read(8, 4) >> 8,
        0x01_06_01,
        "class: mass storage / SATA / AHCI 1.0"
    );
    assert_eq!(
        d.cfg_read(0x3d, 1),
        0,
        "no INTx pin without frontend support"
    );
    // Only BAR5, a 32-bit memory BAR.
    for i in 0..6u16 {
        d.dev.config_write(0x10 + i * 4, &[0xff; 4]);
        let v = d.cfg_read(0x10 + i * 4, 4);
        if i == 5 {
            assert_eq!(v & 0xf, 0, "memory, 32-bit, not prefetchable");
            assert_eq!(!(v & !0xf) + 1, 0x1000, "ABAR size");
        } else {
            assert_eq!(v, 0, "BAR{i} unimplemented");
        }
    }
    let bars = d.dev.bars();
    assert_eq!(bars.len(), 1);
    assert_eq!(bars[0].index, 5);
    let msi = d
        .find_cap(pci::config::cap_id::MSI)
        .expect("MSI capability");
    assert_eq!(
        (d.cfg_read(msi + 2, 2) >> 1) & 7,
        0,
        "one port: one message"
    );
    assert!(d.find_cap(pci::config::cap_id::PM).is_some());
    let mut d2 = Driver::with_intx(one_disk(), true);
    assert_eq!(d2.cfg_read(0x3d, 1), 1, "INTA when the frontend has INTx");
}

#[test]
fn hba_capabilities_and_version() {
    let drives = vec![
        disk(TestBackend::new(1 << 20, 512), 512, 512),
        cdrom(None),
        disk(TestBackend::new(1 << 20, 512), 512, 512),
    ];
    let mut d = Driver::new(drives);
    let c = d.r32(hba::CAP);
    for b in [
        cap::S64A,
        cap::SNCQ,
        cap::SSNTF,
        cap::SALP,
        cap::SAL,
        cap::SCLO,
        cap::PMD,
        cap::SSC,
        cap::PSC,
    ] {
        assert_ne!(c & b, 0, "CAP bit {b:#x}");
    }
    assert_eq!(c & cap::SSS, 0);
    assert_eq!((c >> 20) & 0xf, 3, "ISS Gen3");
    assert_eq!((c >> 8) & 0x1f, 31, "32 slots");
    assert_eq!(c & 0x1f, 2, "3 ports");
    assert_eq!(d.r32(hba::PI), 0b111);
    assert_eq!(d.r32(hba::VS), 0x0001_0301);
    assert_eq!(d.r32(hba::CAP2), 0);
    assert_ne!(d.r32(hba::GHC) & ghc::AE, 0);
    // Unimplemented port 3 and the region past the ports read zero; past the BAR, all-ones.
    assert_eq!(d.r32(0x100 + 3 * 0x80 + preg::SSTS), 0);
    let mut b = [0u8; 4];
    d.dev.bar_read(5, 0x1000, &mut b);
    assert_eq!(b, [0xff; 4]);
    d.dev.bar_read(0, 0, &mut b);
    assert_eq!(b, [0xff; 4]);
    // MSI with a vector per port needs 4 messages (3 ports, power of two).
    let msi = d.find_cap(pci::config::cap_id::MSI).unwrap();
    assert_eq!((d.cfg_read(msi + 2, 2) >> 1) & 7, 2);
}

#[test]
fn power_on_links_and_signatures() {
    let mut d = Driver::new(vec![
        disk(TestBackend::new(1 << 20, 512), 512, 512),
        cdrom(None),
    ]);
    assert_eq!(d.pr(0, preg::SSTS), 0x133, "DET=3 Gen3 active");
    assert_eq!(d.pr(0, preg::SIG), sig::ATA);
    assert_eq!(d.pr(1, preg::SIG), sig::ATAPI);
    assert_eq!(d.pr(0, preg::TFD), 0x150);
    assert_eq!(d.pr(1, preg::TFD), 0x100);
    assert_eq!(d.pr(0, preg::CMD), pxcmd::SUD | pxcmd::POD);
    assert_ne!(d.pr(0, preg::IS) & pxis::PCS, 0, "COMINIT seen");
    d.pw(0, preg::SERR, serr::DIAG_X);
    assert_eq!(d.pr(0, preg::IS) & pxis::PCS, 0, "PCS follows SERR.DIAG.X");
}

#[test]
fn hba_reset_restores_defaults_but_keeps_bases() {
    let mut d = Driver::started(one_disk());
    d.pw(0, preg::IE, 0xffff_ffff);
    assert_eq!(d.pr(0, preg::IE), pxis::IE_MASK);
    d.hba_reset();
    assert_eq!(d.pr(0, preg::IE), 0);
    assert_eq!(d.pr(0, preg::CMD), pxcmd::SUD | pxcmd::POD);
    assert_eq!(d.pr(0, preg::CLB), Driver::clb(0) as u32);
    assert_eq!(d.pr(0, preg::FB), Driver::fb(0) as u32);
    assert_eq!(d.pr(0, preg::SSTS) & 0xf, 3);
}

#[test]
fn port_start_stop_and_base_protection() {
    let mut d = Driver::started(one_disk());
    let c = d.pr(0, preg::CMD);
    assert_eq!(
        c & (pxcmd::ST | pxcmd::CR | pxcmd::FRE | pxcmd::FR),
        pxcmd::ST | pxcmd::CR | pxcmd::FRE | pxcmd::FR
    );
    // CLB cannot move while the engine runs, nor FB while FIS reception is on.
    d.pw(0, preg::CLB, 0x20_0000);
    d.pw(0, preg::FB, 0x20_0000);
    assert_eq!(d.pr(0, preg::CLB), Driver::clb(0) as u32);
    assert_eq!(d.pr(0, preg::FB), Driver::fb(0) as u32);
    d.port_stop(0);
    assert_eq!(d.pr(0, preg::CMD) & (pxcmd::ST | pxcmd::CR), 0);
    // Reserved low bits of CLB/FB are not writable.
    d.pw(0, preg::CLB, 0x20_03ff);
    assert_eq!(d.pr(0, preg::CLB), 0x20_0000);
    // A slot set while ST=0 is ignored and touches nothing.
    d.fill_canary();
    d.build(0, 0, &Cmd::ata(cmd::IDENTIFY).buf(BUF, 512));
    let before = d.read_mem(0, crate::testdrv::RAM as usize);
    d.pw(0, preg::CI, 1);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(d.pr(0, preg::CI), 0);
    assert_eq!(d.read_mem(0, crate::testdrv::RAM as usize), before);
}

#[test]
fn comreset_posts_signature_fis() {
    let mut d = Driver::started(vec![cdrom(None)]);
    d.port_stop(0);
    d.write_mem(Driver::fb(0) + 0x40, &[0u8; 20]);
    d.pw(0, preg::SERR, u32::MAX);
    let s = d.pr(0, preg::SCTL);
    d.pw(0, preg::SCTL, s | 1);
    assert_eq!(d.pr(0, preg::SSTS) & 0xf, 0, "link down during COMRESET");
    assert_eq!(d.pr(0, preg::TFD) & 0x80, 0x80, "BSY during COMRESET");
    d.comreset(0);
    let f = d.d2h(0);
    assert_eq!(
        (f.fis_type, f.status, f.error, f.count, f.lba1, f.lba2),
        (0x34, 0, 1, 1, 0x14, 0xeb)
    );
    assert_eq!(d.pr(0, preg::SIG), sig::ATAPI);
    assert_ne!(d.pr(0, preg::SERR) & serr::DIAG_X, 0);
    // SCTL.SPD limits the negotiated speed.
    let s = d.pr(0, preg::SCTL) & !0xf0;
    d.pw(0, preg::SCTL, s | 0x10);
    d.comreset(0);
    assert_eq!((d.pr(0, preg::SSTS) >> 4) & 0xf, 1);
    // DET=4 takes the PHY offline.
    d.pw(0, preg::SCTL, 4);
    assert_eq!(d.pr(0, preg::SSTS) & 0xf, 4);
}

#[test]
fn register_access_any_width_and_w1c() {
    let mut d = Driver::started(one_disk());
    // 8-byte write across CLB/CLBU while stopped.
    d.port_stop(0);
    let base = 0x100u64;
    d.dev
        .bar_write(5, base + preg::CLB, &0x0000_0001_0020_0000u64.to_le_bytes());
    assert_eq!(d.pr(0, preg::CLB), 0x20_0000);
    assert_eq!(d.pr(0, preg::CLBU), 1);
    // Byte writes to PxIE touch only that byte.
    d.pw(0, preg::IE, 0);
    d.dev.bar_write(5, base + preg::IE + 3, &[0x40]);
    assert_eq!(d.pr(0, preg::IE), pxis::TFES);
    // Unaligned, odd-width reads assemble from dwords.
    let mut b = [0u8; 3];
    d.dev.bar_read(5, hba::VS + 1, &mut b);
    assert_eq!(b, [0x03, 0x01, 0x00]);
    // W1C in PxIS: writing a bit that is not set does nothing; writing a set bit clears it.
    d.pw(0, preg::SERR, u32::MAX);
    assert_eq!(d.pr(0, preg::SERR), 0);
    // A burst of arbitrary register traffic never panics.
    let mut x = 0x1234_5678_9abc_def0u64;
    for _ in 0..20000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = x % 0x1100;
        let len = [1usize, 2, 4, 8][(x >> 20) as usize % 4];
        let v = (x >> 32).to_le_bytes();
        if x & (1 << 40) != 0 {
            d.dev.bar_write(5, off, &v[..len.min(8)]);
        } else {
            let mut r = [0u8; 8];
            d.dev.bar_read(5, off, &mut r[..len]);
        }
    }
}

#[test]
fn clo_clears_busy_only_when_stopped() {
    let mut d = Driver::started(one_disk());
    d.port_stop(0);
    let s = d.pr(0, preg::SCTL);
    d.pw(0, preg::SCTL, s | 1); // COMRESET held: TFD shows BSY
    assert_eq!(d.pr(0, preg::TFD) & 0x80, 0x80);
    let c = d.pr(0, preg::CMD);
    d.pw(0, preg::CMD, c | pxcmd::CLO);
    assert_eq!(d.pr(0, preg::TFD) & 0x88, 0);
    assert_eq!(d.pr(0, preg::CMD) & pxcmd::CLO, 0);
}

#[test]
fn link_power_management_by_icc() {
    let mut d = Driver::started(one_disk());
    let c = d.pr(0, preg::CMD);
    d.pw(0, preg::CMD, c | (2 << 28));
    assert_eq!((d.pr(0, preg::SSTS) >> 8) & 0xf, 2, "partial");
    assert_eq!(d.pr(0, preg::CMD) >> 28, 0, "ICC reads back 0");
    d.pw(0, preg::CMD, c | (6 << 28));
    assert_eq!((d.pr(0, preg::SSTS) >> 8) & 0xf, 6, "slumber");
    // A command wakes the link.
    d.exec(0, 0, &Cmd::ata(cmd::CHECK_POWER_MODE));
    assert_eq!((d.pr(0, preg::SSTS) >> 8) & 0xf, 1);
    // SCTL.IPM forbids slumber.
    let s = d.pr(0, preg::SCTL);
    d.pw(0, preg::SCTL, s | (2 << 8));
    d.pw(0, preg::CMD, c | (6 << 28));
    assert_eq!((d.pr(0, preg::SSTS) >> 8) & 0xf, 1);
}

#[test]
fn msi_single_and_per_port_vectors() {
    let drives = vec![
        disk(TestBackend::new(1 << 20, 512), 512, 512),
        disk(TestBackend::new(1 << 20, 512), 512, 512),
    ];
    let mut d = Driver::started(drives);
    d.enable_msi(0);
    d.exec(1, 0, &Cmd::ata(cmd::CHECK_POWER_MODE));
    assert_eq!(
        d.irq.msi.lock().unwrap().last().unwrap().data,
        0x4000,
        "single vector"
    );
    assert_eq!(d.r32(hba::GHC) & ghc::MRSM, 0);
    d.enable_msi(1);
    d.exec(1, 0, &Cmd::ata(cmd::CHECK_POWER_MODE));
    assert_eq!(
        d.irq.msi.lock().unwrap().last().unwrap().data,
        0x4001,
        "port 1's vector"
    );
    let n = d.irq.msi.lock().unwrap().len();
    // IE off: no message; turning IE on signals the pending condition.
    d.w32(hba::GHC, ghc::AE);
    d.issue(0, 0, &Cmd::ata(cmd::CHECK_POWER_MODE));
    d.wait_slot(0, 0);
    assert_eq!(d.irq.msi.lock().unwrap().len(), n);
    d.w32(hba::GHC, ghc::AE | ghc::IE);
    assert_eq!(d.irq.msi.lock().unwrap().len(), n + 1);
    assert_eq!(d.irq.msi.lock().unwrap().last().unwrap().data, 0x4000);
    // Clearing IS while PxIS is still set re-raises the port.
    d.w32(hba::IS, 1);
    assert_eq!(d.r32(hba::IS), 1);
    assert_eq!(d.irq.msi.lock().unwrap().len(), n + 2);
    let stats = d.dev.stats();
    assert!(stats
        .iter()
        .any(|(k, v)| k == "interrupts" && *v as usize >= n + 2));
}

#[test]
fn msi_reverts_to_single_when_too_few_vectors() {
    let drives = (0..3)
        .map(|_| disk(TestBackend::new(1 << 20, 512), 512, 512))
        .collect();
    let mut d = Driver::started(drives);
    d.enable_msi(1); // 2 of 4 wanted
    assert_ne!(d.r32(hba::GHC) & ghc::MRSM, 0);
    d.exec(2, 0, &Cmd::ata(cmd::CHECK_POWER_MODE));
    assert_eq!(d.irq.msi.lock().unwrap().last().unwrap().data, 0x4000);
}

#[test]
fn intx_level_follows_is() {
    let mut d = Driver::started(one_disk());
    d.exec(0, 0, &Cmd::ata(cmd::CHECK_POWER_MODE));
    let intx = d.irq.intx.lock().unwrap().clone();
    assert_eq!(intx, vec![(1, true), (1, false)]);
}

#[test]
fn stop_waits_for_in_flight_and_posts_nothing() {
    let be = TestBackend::new(1 << 20, 512);
    let mut d = Driver::started(vec![disk(be.clone(), 512, 512)]);
    be.set_gate(false);
    d.fill_canary();
    d.issue(
        0,
        3,
        &Cmd::ata(cmd::READ_DMA_EXT).lba(0).count(8).buf(BUF, 4096),
    );
    d.wait("job at the gate", |_| *be.waiting.lock().unwrap() == 1);
    let c = d.pr(0, preg::CMD);
    d.pw(0, preg::CMD, c & !pxcmd::ST);
    assert_eq!(d.pr(0, preg::CI), 0, "PxCI cleared by ST=0");
    assert_ne!(
        d.pr(0, preg::CMD) & pxcmd::CR,
        0,
        "CR stays set while the job runs"
    );
    // Guest tears down the FIS area and command list: nothing may be written there.
    be.set_gate(true);
    d.wait("CR to clear", |d| d.pr(0, preg::CMD) & pxcmd::CR == 0);
    let (ctrl, len) = Driver::ctrl_region(0);
    // The command header/table were written by the driver itself before the canary check;
    // only the data buffer may differ (the DMA was still running), FIS area untouched.
    d.check_canary(&[(BUF, 4096), (ctrl, 0x400), (Driver::table(0, 3), 0x800)]);
    let _ = len;
    assert_eq!(d.pr(0, preg::IS) & (pxis::DHRS | pxis::PSS), 0);
}

#[test]
fn hba_reset_waits_for_in_flight_io() {
    let be = TestBackend::new(1 << 20, 512);
    let mut d = Driver::started(vec![disk(be.clone(), 512, 512)]);
    be.set_gate(false);
    d.issue(
        0,
        0,
        &Cmd::ata(cmd::WRITE_DMA_EXT)
            .lba(0)
            .count(1)
            .buf(BUF, 512)
            .write(),
    );
    d.wait("job at the gate", |_| *be.waiting.lock().unwrap() == 1);
    d.w32(hba::GHC, ghc::HR);
    assert_ne!(
        d.r32(hba::GHC) & ghc::HR,
        0,
        "HR held while I/O is in flight"
    );
    std::thread::sleep(Duration::from_millis(20));
    assert_ne!(d.r32(hba::GHC) & ghc::HR, 0);
    be.set_gate(true);
    d.wait("HR to clear", |d| d.r32(hba::GHC) & ghc::HR == 0);
    assert_eq!(d.pr(0, preg::SSTS) & 0xf, 3);
    assert_eq!(
        d.pr(0, preg::IS) & pxis::DHRS,
        0,
        "the abandoned command reported nothing"
    );
    let _ = Arc::clone(&be);
}

#[test]
fn structures_and_buffers_above_4gib() {
    use crate::testdrv::{pattern, HIGH};
    let be = TestBackend::new(1 << 20, 512);
    let mut d = Driver::started(vec![disk(be, 512, 512)]);
    d.port_stop(0);
    let c = d.pr(0, preg::CMD);
    d.pw(0, preg::CMD, c & !pxcmd::FRE);
    let (clb, fb, table) = (HIGH, HIGH + 0x400, HIGH + 0x1000);
    d.dev.bar_write(5, 0x100 + preg::CLB, &clb.to_le_bytes());
    d.dev.bar_write(5, 0x100 + preg::FB, &fb.to_le_bytes());
    assert_eq!((d.pr(0, preg::CLBU), d.pr(0, preg::FBU)), (1, 1));
    d.pw(0, preg::CMD, c | pxcmd::FRE | pxcmd::ST);
    let data = pattern(5, 4096);
    d.write_mem(HIGH + 0x8000, &data);
    let cmd_ = Cmd::ata(cmd::WRITE_DMA_EXT)
        .lba(1)
        .count(8)
        .buf(HIGH + 0x8000, 4096)
        .write();
    // Header, table and PRDT written by hand at the high addresses.
    let mut h = crate::fis::CommandHeader::default();
    h.flags.set(5 | crate::fis::header::W);
    h.prdtl.set(1);
    h.ctba.set(table as u32);
    h.ctbau.set((table >> 32) as u32);
    use zerocopy::IntoBytes;
    d.write_mem(clb, h.as_bytes());
    d.write_mem(table, cmd_.fis.as_bytes());
    d.write_mem(table + 0x80, cmd_.prdt[0].as_bytes());
    d.pw(0, preg::CI, 1);
    let done = d.wait_slot(0, 0);
    assert_eq!(done.is & pxis::FATAL, 0, "{done:?}");
    assert_eq!(
        d.read_mem(fb + 0x40, 3),
        vec![0x34, 0x40, 0x50],
        "D2H FIS in the high FIS area"
    );
    let prdbc = u32::from_le_bytes(d.read_mem(clb + 4, 4).try_into().unwrap());
    assert_eq!(prdbc, 4096);
    // Read it back into low memory through the normal path.
    d.port_start(0);
    assert!(!d
        .exec(
            0,
            0,
            &Cmd::ata(cmd::READ_DMA_EXT).lba(1).count(8).buf(BUF, 4096)
        )
        .failed());
    assert_eq!(d.read_mem(BUF, 4096), data);
}

#[test]
fn snotification_is_write_one_to_clear() {
    let mut d = Driver::started(one_disk());
    d.pw(0, preg::SNTF, 0xffff);
    assert_eq!(d.pr(0, preg::SNTF), 0);
}

/// The race the ahci fuzzer found twice (GHC.HR reading 1 for ever, nothing in flight): a
/// settle that began before an HBA reset, while another settle finished the same request, must
/// not mark the reset's request done. With a counter cleared back to zero it did when the
/// count came back to the value the first settle had read.
#[test]
fn a_settle_that_began_before_an_hba_reset_does_not_finish_it() {
    let d = Driver::started(one_disk());
    let mem = pci::GuestMem::new(d.mem.clone());
    let ctx = pci::DeviceContext {
        mem,
        irq: d.irq.clone(),
        intx_supported: true,
    };
    let ahci = crate::Ahci::new(one_disk(), &ctx);
    let sh = ahci.shared.clone();
    // One request outstanding, as a COMRESET release leaves.
    sh.request_settle();
    super::BEFORE_SETTLED.with(|h| {
        *h.borrow_mut() = Some(Box::new(|sh: &crate::Shared| {
            sh.settle(); // another thread's settle finishes the same request
            sh.hba_reset(); // then the guest resets the HBA
        }))
    });
    sh.settle();
    // What the reset's register write does next.
    sh.run_work(Default::default());
    let mut b = [0u8; 4];
    ahci.bar_read(crate::ABAR, hba::GHC, &mut b);
    assert_eq!(
        u32::from_le_bytes(b) & ghc::HR,
        0,
        "the HBA reset never finished"
    );
    let mut b = [0u8; 4];
    ahci.bar_read(crate::ABAR, hba::PORT_BASE + preg::SSTS, &mut b);
    assert_eq!(u32::from_le_bytes(b) & 0xf, 3, "the link came back");
}
