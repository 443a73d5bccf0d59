//! A hostile guest against the fast data path: Bus Master Enable, sticky flush failures,
//! bounded work after abandoned commands, chunked zero-copy transfers, and io_uring errors
//! reported as ATA errors.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use block::BlockBackend;

use crate::regs::{port as preg, pxcmd};
use crate::spec::{cmd, error, status};
use crate::testdrv::{disk, Cmd, Driver, TestBackend, BUF};

const MIB: u64 = 1 << 20;

/// With Bus Master Enable clear the HBA fetches nothing and sends no interrupt; setting BME
/// again runs the command.
#[test]
fn bus_master_enable_fences_command_processing() {
    let be = TestBackend::new(8 * MIB, 512);
    let mut d = Driver::started(vec![disk(be.clone(), 512, 512)]);
    d.write_mem(BUF, &[0xaa; 512]);
    let msis = d.irq.msi.lock().unwrap().len();
    d.cfg_w16(pci::config::reg::COMMAND, pci::config::cmd::MEMORY_SPACE);
    d.issue(
        0,
        3,
        &Cmd::ata(cmd::READ_DMA_EXT).lba(0).count(1).buf(BUF, 512),
    );
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(d.pr(0, preg::CI), 1 << 3, "not fetched while BME is clear");
    assert_eq!(d.read_mem(BUF, 512), vec![0xaa; 512], "no DMA");
    assert_eq!(d.irq.msi.lock().unwrap().len(), msis);
    d.cfg_w16(
        pci::config::reg::COMMAND,
        pci::config::cmd::MEMORY_SPACE | pci::config::cmd::BUS_MASTER,
    );
    let done = d.wait_slot(0, 3);
    assert!(!done.failed(), "{done:?}");
    assert_eq!(d.read_mem(BUF, 512), vec![0; 512]);
}

/// Regression (defect 9, AHCI side): once FLUSH CACHE failed it keeps failing until the HBA is
/// reset, even if the next fdatasync would succeed.
#[test]
fn a_failed_flush_keeps_failing_until_reset() {
    let be = TestBackend::new(8 * MIB, 512);
    let mut d = Driver::started(vec![disk(be.clone(), 512, 512)]);
    be.fail_flush.store(true, Ordering::SeqCst);
    let done = d.exec(0, 0, &Cmd::ata(cmd::FLUSH_CACHE_EXT));
    assert!(done.failed());
    assert_ne!(done.error() & error::ABRT, 0);
    d.recover(0);
    be.fail_flush.store(false, Ordering::SeqCst);
    let done = d.exec(0, 0, &Cmd::ata(cmd::FLUSH_CACHE_EXT));
    assert!(done.failed(), "still failing: data may be lost");
    d.recover(0);
    let mut d = d.start();
    let done = d.exec(0, 0, &Cmd::ata(cmd::FLUSH_CACHE_EXT));
    assert!(!done.failed(), "{done:?}");
}

/// A guest that stops and restarts the engine over and over while the disk stalls cannot pile
/// up work: abandoned commands still count against the port's 32, and new ones wait.
#[test]
fn abandoned_commands_bound_what_a_port_runs() {
    let be = TestBackend::new(8 * MIB, 512);
    let mut d = Driver::started(vec![disk(be.clone(), 512, 512)]);
    be.set_gate(false);
    for _round in 0..50 {
        for slot in 0..32u8 {
            let c = Cmd::fpdma(cmd::READ_FPDMA, slot, u64::from(slot), 1)
                .buf(BUF + u64::from(slot) * 512, 512);
            d.build(0, slot, &c);
        }
        d.pw(0, preg::SACT, u32::MAX);
        d.pw(0, preg::CI, u32::MAX);
        // Stop without waiting for CR (commands are still running) and start again.
        let c = d.pr(0, preg::CMD);
        d.pw(0, preg::CMD, c & !pxcmd::ST);
        let c = d.pr(0, preg::CMD);
        d.pw(0, preg::CMD, c | pxcmd::ST);
    }
    std::thread::sleep(Duration::from_millis(50));
    be.set_gate(true);
    d.port_stop(0);
    let ran = be.order.lock().unwrap().len();
    assert!(
        ran <= 64,
        "{ran} reads ran for 50 rounds of 32 abandoned commands"
    );
}

/// A transfer whose PRDT has more pieces than one backend request carries runs as a chain of
/// chunks, straight between guest memory and the disk, and moves exactly the right bytes.
#[test]
fn scattered_transfers_run_in_chunks() {
    let be = TestBackend::new(8 * MIB, 512);
    let mut d = Driver::started(vec![disk(be.clone(), 512, 512)]);
    // 600 separate 512-byte pieces, every other sector of the buffer area.
    let mut w = Cmd::ata(cmd::WRITE_DMA_EXT).lba(100).count(600).write();
    let mut r = Cmd::ata(cmd::READ_DMA_EXT).lba(100).count(600);
    let mut payload = Vec::new();
    for i in 0..600u64 {
        let a = BUF + i * 1024;
        let piece: Vec<u8> = (0..512).map(|k| (i * 7 + k) as u8).collect();
        d.write_mem(a, &piece);
        payload.extend_from_slice(&piece);
        w = w.prd_raw(a, 511);
        r = r.prd_raw(a + 512, 511);
    }
    assert!(!d.exec(0, 0, &w).failed());
    let mut disk_data = vec![0u8; 600 * 512];
    be.read_vectored(100 * 512, &mut [std::io::IoSliceMut::new(&mut disk_data)])
        .unwrap();
    assert!(
        disk_data == payload,
        "the disk holds the scattered pieces in order"
    );
    assert!(!d.exec(0, 1, &r).failed());
    for i in 0..600u64 {
        let got = d.read_mem(BUF + i * 1024 + 512, 512);
        assert_eq!(got, payload[(i * 512) as usize..((i + 1) * 512) as usize]);
    }
}

/// io_uring errors come back as ATA errors: EIO on a read is UNC, ENOSPC on a write ABRT.
#[test]
fn io_uring_errors_are_ata_errors() {
    let eio: Arc<dyn BlockBackend> = Arc::new(FdBackend::open("/proc/self/mem", 1 << 40));
    let full: Arc<dyn BlockBackend> = Arc::new(FdBackend::open("/dev/full", 1 << 20));
    let mut d = Driver::started(vec![disk(eio, 512, 512), disk(full, 512, 512)]);
    let done = d.exec(
        0,
        0,
        &Cmd::ata(cmd::READ_DMA_EXT).lba(8).count(1).buf(BUF, 512),
    );
    assert!(done.failed());
    assert_ne!(done.status() & status::ERR, 0);
    assert_ne!(done.error() & error::UNC, 0, "{done:?}");
    let done = d.exec(
        1,
        0,
        &Cmd::ata(cmd::WRITE_DMA_EXT)
            .lba(0)
            .count(1)
            .write()
            .buf(BUF, 512),
    );
    assert!(done.failed());
    assert_ne!(done.error() & error::ABRT, 0, "{done:?}");
}

/// A backend on an arbitrary descriptor, dispatched to io_uring.
struct FdBackend {
    file: std::fs::File,
    capacity: u64,
}

impl FdBackend {
    fn open(path: &str, capacity: u64) -> Self {
        FdBackend {
            file: std::fs::File::options()
                .read(true)
                .write(true)
                .open(path)
                .unwrap(),
            capacity,
        }
    }
}

impl BlockBackend for FdBackend {
    fn info(&self) -> block::BackendInfo {
        block::BackendInfo {
            capacity: self.capacity,
            sector_size: 512,
            read_only: false,
            discard_zeroes: false,
        }
    }
    fn read_vectored(&self, _: u64, _: &mut [std::io::IoSliceMut<'_>]) -> block::Result<()> {
        Err(block::BlockError::Io(std::io::Error::from_raw_os_error(5)))
    }
    fn write_vectored(&self, _: u64, _: &[std::io::IoSlice<'_>]) -> block::Result<()> {
        Err(block::BlockError::Io(std::io::Error::from_raw_os_error(5)))
    }
    fn flush(&self) -> block::Result<()> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> block::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64) -> block::Result<()> {
        Ok(())
    }
    fn dispatch(&self) -> block::Dispatch<'_> {
        use std::os::fd::AsFd;
        block::Dispatch::Fd {
            fd: self.file.as_fd(),
            direct: None,
        }
    }
}
