//! Pause, save and restore: NCQ and ATAPI commands running on two ports when the HBA is
//! paused, more issued while it is paused, the state restored into a fresh HBA; every command
//! runs exactly once, drive settings and ATAPI sense state carry over, and nothing outside the
//! buffers changes.

use std::io::IoSlice;
use std::sync::Arc;
use std::time::Duration;

use block::{BlockBackend, Ram};
use pci::StateError;

use crate::regs::{hba, port as preg};
use crate::spec::{cmd, feature, op};
use crate::testdrv::{cdrom, disk, pattern, Cmd, Driver, TestBackend, BUF};

const MIB: u64 = 1 << 20;

fn drives(be: &Arc<TestBackend>, cd: &Arc<dyn BlockBackend>) -> Vec<crate::DriveInfo> {
    vec![disk(be.clone(), 512, 512), cdrom(Some(cd.clone()))]
}

/// Run a CDB on port 1, slot 2, with no data.
fn packet(d: &mut Driver, cdb: &[u8]) -> crate::testdrv::Done {
    d.exec(1, 2, &Cmd::packet(cdb, true))
}

#[test]
fn save_restore_with_commands_running_on_both_ports() {
    let be = TestBackend::new(8 * MIB, 512);
    let disk_data = pattern(4, MIB as usize);
    be.write_vectored(0, &[IoSlice::new(&disk_data)]).unwrap();
    let cd_be = TestBackend::new(100 * 2048, 512);
    let cd_data = pattern(8, 100 * 2048);
    cd_be.write_vectored(0, &[IoSlice::new(&cd_data)]).unwrap();
    let cd = cd_be.clone() as Arc<dyn BlockBackend>;
    let mut d = Driver::started(drives(&be, &cd));
    d.enable_msi(1);
    d.fill_canary();
    // State the guest leaves in the drives: write cache off on the disk, the CD's power-on
    // unit attention consumed.
    let c = Cmd::ata(cmd::SET_FEATURES).features(feature::DISABLE_WRITE_CACHE.into());
    assert!(!d.exec(0, 0, &c).failed());
    assert!(packet(&mut d, &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0]).failed());
    d.recover(1);
    assert!(!packet(&mut d, &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0]).failed());

    // Three queued reads held at the backend (the pool's four workers block at the gate: one
    // is left for the CD).
    // And a CD READ(10) of 4 blocks on the other port, held too.
    be.set_gate(false);
    cd_be.set_gate(false);
    for tag in 0..3u8 {
        let c = Cmd::fpdma(cmd::READ_FPDMA, tag, u64::from(tag) * 16, 8)
            .buf(BUF + u64::from(tag) * 4096, 4096);
        d.issue(0, tag, &c);
    }
    let cd_buf = BUF + 0x80000;
    d.issue(
        1,
        3,
        &Cmd::packet(&[op::READ_10, 0, 0, 0, 0, 10, 0, 0, 4, 0], true).buf(cd_buf, 4 * 2048),
    );
    d.wait("reads at the gates", |_| {
        *be.waiting.lock().unwrap() > 0 && *cd_be.waiting.lock().unwrap() > 0
    });
    std::thread::scope(|s| {
        let dev = &d.dev;
        let p = s.spawn(move || dev.pause());
        std::thread::sleep(Duration::from_millis(50));
        be.set_gate(true);
        cd_be.set_gate(true);
        p.join().unwrap().expect("pause");
    });
    assert_eq!(d.pr(0, preg::SACT), 0, "pause waits for running commands");
    assert_eq!(d.pr(1, preg::CI), 0, "pause waits for the CD read");
    assert_eq!(d.read_mem(cd_buf, 4 * 2048), cd_data[10 * 2048..14 * 2048]);
    be.order.lock().unwrap().clear();
    cd_be.order.lock().unwrap().clear();
    // Issued while paused: stays issued, runs after the restore.
    let new_data = pattern(77, 8192);
    d.write_mem(BUF + 0x10_0000, &new_data);
    let c = Cmd::fpdma(cmd::WRITE_FPDMA, 9, 1000, 16)
        .write()
        .buf(BUF + 0x10_0000, 8192);
    d.issue(0, 9, &c);
    assert_eq!(d.pr(0, preg::SACT), 1 << 9);
    let state = d.dev.save_state().expect("save");
    let text = serde_json::to_string(&state).unwrap();
    let state: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(be.order.lock().unwrap().is_empty(), "ran while paused");

    let fresh = d.twin(drives(&be, &cd));
    fresh.restore_state(&state).expect("restore");
    d.dev = fresh;
    d.dev.resume();
    d.wait("the write issued while paused", |d| {
        let is = d.pr(0, preg::IS);
        d.pw(0, preg::IS, is);
        d.w32(hba::IS, 1);
        d.pr(0, preg::SACT) == 0
    });
    // Only the new command ran after the restore: nothing ran twice.
    assert_eq!(*be.order.lock().unwrap(), vec![1000 * 512]);
    assert!(
        cd_be.order.lock().unwrap().is_empty(),
        "the CD read ran twice"
    );
    let mut on_disk = vec![0u8; 8192];
    be.read_vectored(1000 * 512, &mut [std::io::IoSliceMut::new(&mut on_disk)])
        .unwrap();
    assert_eq!(on_disk, new_data);
    for tag in 0..3u64 {
        let at = (tag * 16 * 512) as usize;
        assert_eq!(
            d.read_mem(BUF + tag * 4096, 4096),
            disk_data[at..at + 4096],
            "tag {tag}"
        );
    }
    // The drives kept their settings: write cache off, no second unit attention.
    let (_, id) = d.identify(0, cmd::IDENTIFY);
    assert_eq!(
        id[85] & (1 << 5),
        0,
        "write cache re-enabled by the restore"
    );
    assert!(!packet(&mut d, &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0]).failed());
    d.check_canary(&[
        Driver::ctrl_region(0),
        Driver::ctrl_region(1),
        (BUF, 0x10_0000 + 8192),
    ]);
    drop(cd);
}

#[test]
fn restore_refuses_damaged_or_foreign_state() {
    let be = TestBackend::new(8 * MIB, 512);
    let cd: Arc<dyn BlockBackend> = Arc::new(Ram::new(100 * 2048, 512).unwrap());
    let mut d = Driver::started(drives(&be, &cd));
    assert!(matches!(d.dev.save_state(), Err(StateError::Refused(_))));
    d.dev.pause().unwrap();
    let good = d.dev.save_state().unwrap();
    let fresh = d.twin(drives(&be, &cd));
    let mut bad = good.clone();
    bad["version"] = 9.into();
    assert!(matches!(
        fresh.restore_state(&bad),
        Err(StateError::Invalid(_))
    ));
    let mut bad = good.clone();
    bad["ports"][0]["drive"]["multiple"] = 200.into();
    assert!(matches!(
        fresh.restore_state(&bad),
        Err(StateError::Invalid(_))
    ));
    let mut bad = good.clone();
    bad["ports"][1]["drive"] = serde_json::json!("garbage");
    assert!(matches!(
        fresh.restore_state(&bad),
        Err(StateError::Invalid(_))
    ));
    // Another disk size on port 0.
    let small = TestBackend::new(4 * MIB, 512);
    let other = d.twin(drives(&small, &cd));
    let e = other.restore_state(&good).unwrap_err();
    assert!(e.to_string().contains("port 0"), "{e}");
    // Ports swapped.
    let swapped = d.twin(vec![cdrom(Some(cd.clone())), disk(be.clone(), 512, 512)]);
    assert!(swapped.restore_state(&good).is_err());
    // None of that touched the fresh HBA: the good state still goes in, once.
    fresh.restore_state(&good).unwrap();
    assert!(matches!(
        fresh.restore_state(&good),
        Err(StateError::Refused(_))
    ));
    d.dev = fresh;
    d.dev.resume();
    let c = Cmd::ata(cmd::READ_DMA_EXT).lba(0).count(8).buf(BUF, 4096);
    assert!(!d.exec(0, 3, &c).failed());
}

/// Every number in a saved state, set to extreme values one at a time: a restore either refuses
/// it or gives an HBA that keeps working without a panic (in any thread) or a hang.
#[test]
fn mutated_states_are_refused_or_harmless() {
    pci::state_testing::count_panics();
    let be = TestBackend::new(8 * MIB, 512);
    let cd: Arc<dyn BlockBackend> = Arc::new(Ram::new(100 * 2048, 512).unwrap());
    let mut d = Driver::started(drives(&be, &cd));
    d.enable_msi(1);
    let c = Cmd::fpdma(cmd::READ_FPDMA, 1, 0, 8).buf(BUF, 4096);
    d.issue(0, 1, &c);
    d.wait("the read", |d| d.pr(0, preg::SACT) == 0);
    d.dev.pause().unwrap();
    let good = d.dev.save_state().unwrap();
    pci::state_testing::campaign(&good, |bad| {
        let fresh = d.twin(drives(&be, &cd));
        fresh.restore_state(bad).ok()?;
        fresh.resume();
        // What a driver does next: read every register, issue a command on each port.
        let mut b = [0u8; 4];
        for off in (0..0x200).step_by(4) {
            fresh.bar_read(crate::ABAR, off, &mut b);
        }
        for p in 0..2u64 {
            let ci = hba::PORT_BASE + p * hba::PORT_STRIDE + preg::CI;
            fresh.bar_write(crate::ABAR, ci, &1u32.to_le_bytes());
        }
        Some(fresh)
    });
}
