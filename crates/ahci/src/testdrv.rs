//! An in-process AHCI driver for the unit tests: it does what Linux's `ahci`/`libata` do (HBA
//! reset, CLB/FB setup, FIS receive, engine start, command headers + tables + PRDTs, PxCI, polling
//! PxCI/PxIS with a timeout, reading back D2H/PIO Setup/SDB FISes) over real guest memory.
//!
//! Test backends wrap a RAM disk to make completion order observable (per-request delays), to
//! hold I/O in flight (a gate), and to fail reads.

use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use block::{BackendInfo, BlockBackend, Ram};
use pci::{DeviceContext, GuestMem, InterruptSink, MsiMessage, PciDevice};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::{FromBytes, IntoBytes};

use crate::drive::{DriveInfo, DriveKind};
use crate::fis::{
    fis_type, header, rx, CommandHeader, D2hRegisterFis, H2dRegisterFis, PioSetupFis, PrdtEntry,
    SetDeviceBitsFis, H2D_C,
};
use crate::regs::{ghc, hba, port as preg, pxcmd, pxis};
use crate::Ahci;

/// Guest RAM: 16 MiB at address 0.
pub const RAM: u64 = 16 << 20;
/// A second, small RAM region above 4 GiB (exercises the upper address registers).
pub const HIGH: u64 = 0x1_0000_0000;
/// Size of the high region.
pub const HIGH_LEN: u64 = 1 << 20;
/// An address just past guest RAM.
pub const OUTSIDE: u64 = RAM + 0x1000;
/// Start of the data buffer area.
pub const BUF: u64 = 4 << 20;
/// Per-port control region (command list, FIS area, command tables).
const CTRL_BASE: u64 = 0x10_0000;
const CTRL_STRIDE: u64 = 0x2_0000;
const TABLE_OFF: u64 = 0x1000;
const TABLE_STRIDE: u64 = 0x800;
/// PxIE value Linux uses (errors and every completion FIS).
pub const DEF_IE: u32 = pxis::TFES
    | pxis::HBFS
    | pxis::HBDS
    | pxis::IFS
    | pxis::PRCS
    | pxis::PCS
    | pxis::UFS
    | pxis::SDBS
    | pxis::DSS
    | pxis::PSS
    | pxis::DHRS
    | pxis::DPS
    | pxis::OFS;
/// How long a command may take before a test fails.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Records interrupts.
#[derive(Default)]
pub struct Rec {
    pub msi: Mutex<Vec<MsiMessage>>,
    pub intx: Mutex<Vec<(u8, bool)>>,
}

impl InterruptSink for Rec {
    fn msi(&self, m: MsiMessage) {
        self.msi.lock().unwrap().push(m);
    }
    fn intx(&self, pin: u8, a: bool) {
        self.intx.lock().unwrap().push((pin, a));
    }
}

/// A RAM disk with test hooks.
pub struct TestBackend {
    inner: Ram,
    /// Delay for requests starting at a byte offset.
    pub delays: Mutex<HashMap<u64, Duration>>,
    /// Offsets of finished reads/writes, in completion order.
    pub order: Mutex<Vec<u64>>,
    /// Reads overlapping this byte range fail.
    pub fail_reads: Mutex<Option<(u64, u64)>>,
    gate: (Mutex<bool>, Condvar),
    /// Number of requests waiting at the gate.
    pub waiting: Mutex<usize>,
    /// Flushes fail (EIO) while set.
    pub fail_flush: std::sync::atomic::AtomicBool,
}

impl TestBackend {
    pub fn new(bytes: u64, sector: u32) -> Arc<Self> {
        Arc::new(TestBackend {
            inner: Ram::new(bytes, sector).unwrap(),
            delays: Mutex::default(),
            order: Mutex::default(),
            fail_reads: Mutex::default(),
            gate: (Mutex::new(true), Condvar::new()),
            waiting: Mutex::new(0),
            fail_flush: Default::default(),
        })
    }

    /// Close (false) or open (true) the gate that I/O waits at.
    pub fn set_gate(&self, open: bool) {
        *self.gate.0.lock().unwrap() = open;
        self.gate.1.notify_all();
    }

    fn before(&self, offset: u64) {
        let d = self.delays.lock().unwrap().get(&offset).copied();
        if let Some(d) = d {
            std::thread::sleep(d);
        }
        let mut open = self.gate.0.lock().unwrap();
        if !*open {
            *self.waiting.lock().unwrap() += 1;
            while !*open {
                open = self.gate.1.wait(open).unwrap();
            }
            *self.waiting.lock().unwrap() -= 1;
        }
    }
}

impl BlockBackend for TestBackend {
    fn info(&self) -> BackendInfo {
        self.inner.info()
    }
    fn read_vectored(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> block::Result<()> {
        self.before(offset);
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        if let Some((a, b)) = *self.fail_reads.lock().unwrap() {
            if offset < b && offset + len > a {
                return Err(block::BlockError::Io(std::io::Error::other(
                    "injected read error",
                )));
            }
        }
        let r = self.inner.read_vectored(offset, bufs);
        self.order.lock().unwrap().push(offset);
        r
    }
    fn write_vectored(&self, offset: u64, bufs: &[IoSlice<'_>]) -> block::Result<()> {
        self.before(offset);
        let r = self.inner.write_vectored(offset, bufs);
        self.order.lock().unwrap().push(offset);
        r
    }
    fn flush(&self) -> block::Result<()> {
        if self.fail_flush.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(block::BlockError::Io(std::io::Error::from_raw_os_error(5)));
        }
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> block::Result<()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> block::Result<()> {
        self.inner.write_zeroes(offset, len)
    }
}

/// A disk drive over `be`.
pub fn disk(be: Arc<dyn BlockBackend>, logical: u32, physical: u32) -> DriveInfo {
    let mut d = DriveInfo::new(DriveKind::Disk, Some(be), logical, physical);
    d.serial = "RHYVE-TEST-0001".into();
    d.model = "RHYVE TEST DISK".into();
    d.firmware = "0.1.0".into();
    d.wwn = 0x5000_0000_1234_5678;
    d
}

/// A CD drive over `be` (or an empty tray).
pub fn cdrom(be: Option<Arc<dyn BlockBackend>>) -> DriveInfo {
    let mut d = DriveInfo::new(DriveKind::Cdrom, be, 2048, 2048);
    d.serial = "RHYVE-TEST-CD01".into();
    d.model = "RHYVE TEST DVD".into();
    d.firmware = "0.1.0".into();
    d
}

/// One command as a driver builds it.
#[derive(Clone, Debug)]
pub struct Cmd {
    pub fis: H2dRegisterFis,
    pub acmd: [u8; 16],
    pub prdt: Vec<PrdtEntry>,
    /// Header flags beyond CFL (A, W, R, C).
    pub flags: u16,
    pub cfl: u16,
    /// Set PxSACT before PxCI (NCQ).
    pub ncq: bool,
}

impl Cmd {
    /// An ATA command (C bit set, LBA mode).
    pub fn ata(command: u8) -> Cmd {
        let fis = H2dRegisterFis {
            fis_type: fis_type::REG_H2D,
            flags: H2D_C,
            command,
            device: 0x40,
            ..Default::default()
        };
        Cmd {
            fis,
            acmd: [0; 16],
            prdt: Vec::new(),
            flags: 0,
            cfl: 5,
            ncq: false,
        }
    }
    /// A 48-bit LBA (also sets the 28-bit fields).
    pub fn lba(mut self, lba: u64) -> Cmd {
        let b = lba.to_le_bytes();
        (self.fis.lba0, self.fis.lba1, self.fis.lba2) = (b[0], b[1], b[2]);
        (self.fis.lba3, self.fis.lba4, self.fis.lba5) = (b[3], b[4], b[5]);
        self
    }
    /// Count 15:0.
    pub fn count(mut self, n: u16) -> Cmd {
        (self.fis.count, self.fis.count_exp) = (n as u8, (n >> 8) as u8);
        self
    }
    /// Features 15:0.
    pub fn features(mut self, n: u16) -> Cmd {
        (self.fis.features, self.fis.features_exp) = (n as u8, (n >> 8) as u8);
        self
    }
    /// Host-to-device data (header W bit).
    pub fn write(mut self) -> Cmd {
        self.flags |= header::W;
        self
    }
    /// A raw PRDT entry.
    pub fn prd_raw(mut self, addr: u64, dbc: u32) -> Cmd {
        let mut e = PrdtEntry::default();
        e.dba.set(addr as u32);
        e.dbau.set((addr >> 32) as u32);
        e.dbc.set(dbc);
        self.prdt.push(e);
        self
    }
    /// PRDT entries covering `len` bytes at `addr` (4 MiB pieces).
    pub fn buf(mut self, addr: u64, len: u64) -> Cmd {
        let mut off = 0;
        while off < len {
            let n = (len - off).min(4 << 20);
            self = self.prd_raw(addr + off, (n - 1) as u32);
            off += n;
        }
        self
    }
    /// A PACKET command carrying `cdb`, data by DMA or PIO.
    pub fn packet(cdb: &[u8], dma: bool) -> Cmd {
        let mut c = Cmd::ata(crate::spec::cmd::PACKET).features(u16::from(dma));
        c.fis.device = 0;
        (c.fis.lba1, c.fis.lba2) = (0xfe, 0xff); // byte count limit
        c.acmd[..cdb.len()].copy_from_slice(cdb);
        c.flags |= header::A;
        c
    }
    /// READ/WRITE FPDMA QUEUED of `count` sectors at `lba` with `tag`.
    pub fn fpdma(command: u8, tag: u8, lba: u64, count: u16) -> Cmd {
        let mut c = Cmd::ata(command)
            .lba(lba)
            .features(count)
            .count(u16::from(tag) << 3);
        c.ncq = true;
        c
    }
}

/// Register snapshot after a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Done {
    pub is: u32,
    pub tfd: u32,
    pub ci: u32,
    pub sact: u32,
}

impl Done {
    /// ATA status from PxTFD.
    pub fn status(&self) -> u8 {
        self.tfd as u8
    }
    /// ATA error from PxTFD.
    pub fn error(&self) -> u8 {
        (self.tfd >> 8) as u8
    }
    /// The command failed with a task file error.
    pub fn failed(&self) -> bool {
        self.is & pxis::TFES != 0
    }
}

/// The driver.
pub struct Driver {
    pub dev: Box<dyn PciDevice>,
    pub mem: GuestMemoryMmap,
    pub irq: Arc<Rec>,
}

impl Driver {
    /// A controller with `drives` over fresh guest RAM, INTx available.
    pub fn new(drives: Vec<DriveInfo>) -> Driver {
        Self::with_intx(drives, true)
    }

    pub fn with_intx(drives: Vec<DriveInfo>, intx_supported: bool) -> Driver {
        Self::build_with(|ctx| Ok(Box::new(Ahci::new(drives, ctx))), intx_supported).unwrap()
    }

    /// A controller from a `-s` specification, e.g. `5,ahci,hd:disk.img`.
    pub fn from_spec(spec: &str) -> Result<Driver, pci::ConfigError> {
        let spec = pci::SlotSpec::parse(spec)?;
        Self::build_with(|ctx| crate::create(&spec, ctx), true)
    }

    fn build_with(
        make: impl FnOnce(&DeviceContext) -> Result<Box<dyn PciDevice>, pci::ConfigError>,
        intx_supported: bool,
    ) -> Result<Driver, pci::ConfigError> {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), RAM as usize),
            (GuestAddress(HIGH), HIGH_LEN as usize),
        ])
        .unwrap();
        let irq = Arc::new(Rec::default());
        let ctx = DeviceContext {
            mem: GuestMem::new(mem.clone()),
            irq: irq.clone(),
            intx_supported,
        };
        let dev = make(&ctx)?;
        let mut d = Driver { dev, mem, irq };
        d.cfg_w16(
            pci::config::reg::COMMAND,
            pci::config::cmd::MEMORY_SPACE | pci::config::cmd::BUS_MASTER,
        );
        Ok(d)
    }

    /// A second controller over the same guest memory and interrupt recorder: the "new
    /// process" a snapshot is restored into.
    pub fn twin(&self, drives: Vec<DriveInfo>) -> Box<dyn PciDevice> {
        let ctx = DeviceContext {
            mem: GuestMem::new(self.mem.clone()),
            irq: self.irq.clone(),
            intx_supported: true,
        };
        Box::new(Ahci::new(drives, &ctx))
    }

    /// A controller with ports already reset and started, the way Linux leaves them.
    pub fn started(drives: Vec<DriveInfo>) -> Driver {
        Driver::new(drives).start()
    }

    /// Reset the HBA and start every port.
    pub fn start(mut self) -> Driver {
        self.hba_reset();
        let n = (self.r32(hba::CAP) & 0x1f) as usize + 1;
        for p in 0..n {
            self.port_start(p);
        }
        self
    }

    /// The controller's counters by name.
    pub fn dev_stats(&self) -> HashMap<String, u64> {
        self.dev.stats().into_iter().collect()
    }

    pub fn cfg_read(&mut self, off: u16, len: usize) -> u32 {
        let mut b = [0u8; 4];
        self.dev.config_read(off, &mut b[..len]);
        u32::from_le_bytes(b)
    }
    pub fn cfg_w16(&mut self, off: usize, v: u16) {
        self.dev.config_write(off as u16, &v.to_le_bytes());
    }
    pub fn cfg_w32(&mut self, off: usize, v: u32) {
        self.dev.config_write(off as u16, &v.to_le_bytes());
    }

    /// Offset of the capability with `id`.
    pub fn find_cap(&mut self, id: u8) -> Option<u16> {
        let mut p = self.cfg_read(0x34, 1) as u16;
        while p != 0 {
            if self.cfg_read(p, 1) as u8 == id {
                return Some(p);
            }
            p = self.cfg_read(p + 1, 1) as u16;
        }
        None
    }

    /// Enable MSI with `2^log2` messages at a fixed address and data.
    pub fn enable_msi(&mut self, log2: u16) {
        let c = usize::from(self.find_cap(pci::config::cap_id::MSI).unwrap());
        self.cfg_w32(c + 4, 0xfee0_0000);
        self.cfg_w32(c + 8, 0);
        self.cfg_w16(c + 12, 0x4000);
        self.cfg_w16(c + 2, 1 | (log2 << 4));
    }

    pub fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.bar_read(crate::ABAR, off, &mut b);
        u32::from_le_bytes(b)
    }
    pub fn w32(&mut self, off: u64, v: u32) {
        self.dev.bar_write(crate::ABAR, off, &v.to_le_bytes());
    }
    fn port_off(p: usize, reg: u64) -> u64 {
        hba::PORT_BASE + p as u64 * hba::PORT_STRIDE + reg
    }
    pub fn pr(&mut self, p: usize, reg: u64) -> u32 {
        self.r32(Self::port_off(p, reg))
    }
    pub fn pw(&mut self, p: usize, reg: u64, v: u32) {
        self.w32(Self::port_off(p, reg), v)
    }

    /// Poll until `f` holds or the timeout passes.
    pub fn wait(&mut self, what: &str, mut f: impl FnMut(&mut Self) -> bool) {
        let t = Instant::now();
        while !f(self) {
            assert!(t.elapsed() < TIMEOUT, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// GHC.HR, wait for it to clear, then AE and IE.
    pub fn hba_reset(&mut self) {
        self.w32(hba::GHC, ghc::HR);
        self.wait("GHC.HR to clear", |d| d.r32(hba::GHC) & ghc::HR == 0);
        self.w32(hba::GHC, ghc::AE | ghc::IE);
    }

    pub fn clb(p: usize) -> u64 {
        CTRL_BASE + p as u64 * CTRL_STRIDE
    }
    pub fn fb(p: usize) -> u64 {
        Self::clb(p) + 0x400
    }
    pub fn table(p: usize, slot: u8) -> u64 {
        Self::clb(p) + TABLE_OFF + u64::from(slot) * TABLE_STRIDE
    }
    /// The whole control region of port `p` (excluded from canary checks).
    pub fn ctrl_region(p: usize) -> (u64, u64) {
        (Self::clb(p), TABLE_OFF + 32 * TABLE_STRIDE)
    }

    /// Stop the engine and wait for CR to clear.
    pub fn port_stop(&mut self, p: usize) {
        let c = self.pr(p, preg::CMD);
        self.pw(p, preg::CMD, c & !pxcmd::ST);
        self.wait("PxCMD.CR to clear", |d| d.pr(p, preg::CMD) & pxcmd::CR == 0);
    }

    /// Linux's port init and engine start: stop, set CLB/FB, clear errors, FRE, wait for the
    /// link, ST.
    pub fn port_start(&mut self, p: usize) {
        self.port_stop(p);
        let c = self.pr(p, preg::CMD);
        self.pw(p, preg::CMD, c & !pxcmd::FRE);
        self.wait("FR to clear", |d| d.pr(p, preg::CMD) & pxcmd::FR == 0);
        let (clb, fb) = (Self::clb(p), Self::fb(p));
        self.pw(p, preg::CLB, clb as u32);
        self.pw(p, preg::CLBU, (clb >> 32) as u32);
        self.pw(p, preg::FB, fb as u32);
        self.pw(p, preg::FBU, (fb >> 32) as u32);
        let c = self.pr(p, preg::CMD);
        self.pw(p, preg::CMD, c | pxcmd::FRE);
        self.wait("link up", |d| {
            d.pr(p, preg::SSTS) & 0xf == 3 && d.pr(p, preg::TFD) & 0x88 == 0
        });
        self.pw(p, preg::SERR, u32::MAX);
        self.pw(p, preg::IS, u32::MAX);
        self.w32(hba::IS, u32::MAX);
        self.pw(p, preg::IE, DEF_IE);
        let c = self.pr(p, preg::CMD);
        self.pw(p, preg::CMD, c | pxcmd::ST);
    }

    /// COMRESET through PxSCTL.DET and wait for the device's signature.
    pub fn comreset(&mut self, p: usize) {
        let s = self.pr(p, preg::SCTL) & !0xf;
        self.pw(p, preg::SCTL, s | 1);
        std::thread::sleep(Duration::from_millis(1));
        self.pw(p, preg::SCTL, s);
        self.wait("link up after COMRESET", |d| {
            d.pr(p, preg::SSTS) & 0xf == 3 && d.pr(p, preg::TFD) & 0x80 == 0
        });
    }

    /// Write the command header and table for `slot` (does not issue it).
    pub fn build(&mut self, p: usize, slot: u8, cmd: &Cmd) {
        let t = Self::table(p, slot);
        let mut h = CommandHeader::default();
        h.flags.set(cmd.cfl | cmd.flags);
        h.prdtl.set(cmd.prdt.len() as u16);
        h.ctba.set(t as u32);
        h.ctbau.set((t >> 32) as u32);
        self.write_mem(Self::clb(p) + u64::from(slot) * 32, h.as_bytes());
        let mut cfis = [0u8; 64];
        cfis[..20].copy_from_slice(cmd.fis.as_bytes());
        self.write_mem(t, &cfis);
        self.write_mem(t + 0x40, &cmd.acmd);
        let prdt: Vec<u8> = cmd
            .prdt
            .iter()
            .flat_map(|e| e.as_bytes().to_vec())
            .collect();
        self.write_mem(t + 0x80, &prdt);
    }

    /// Build and issue `cmd` in `slot`.
    pub fn issue(&mut self, p: usize, slot: u8, cmd: &Cmd) {
        self.build(p, slot, cmd);
        if cmd.ncq {
            self.pw(p, preg::SACT, 1 << slot);
        }
        self.pw(p, preg::CI, 1 << slot);
    }

    /// Wait until `slot` completes (PxCI and PxSACT clear) or the port reports a fatal error.
    pub fn wait_slot(&mut self, p: usize, slot: u8) -> Done {
        let bit = 1u32 << slot;
        self.wait("command completion", |d| {
            (d.pr(p, preg::CI) | d.pr(p, preg::SACT)) & bit == 0
                || d.pr(p, preg::IS) & pxis::FATAL != 0
        });
        self.snapshot(p)
    }

    pub fn snapshot(&mut self, p: usize) -> Done {
        Done {
            is: self.pr(p, preg::IS),
            tfd: self.pr(p, preg::TFD),
            ci: self.pr(p, preg::CI),
            sact: self.pr(p, preg::SACT),
        }
    }

    /// Issue, wait, then clear PxIS and IS (as an interrupt handler would).
    pub fn exec(&mut self, p: usize, slot: u8, cmd: &Cmd) -> Done {
        self.issue(p, slot, cmd);
        let d = self.wait_slot(p, slot);
        self.pw(p, preg::IS, d.is);
        self.w32(hba::IS, 1 << p);
        d
    }

    /// Linux's recovery after a fatal error: stop the engine (clearing PxCI/PxSACT), clear the
    /// error bits, restart.
    pub fn recover(&mut self, p: usize) {
        self.port_stop(p);
        self.pw(p, preg::SERR, u32::MAX);
        self.pw(p, preg::IS, u32::MAX);
        self.w32(hba::IS, u32::MAX);
        let c = self.pr(p, preg::CMD);
        self.pw(p, preg::CMD, c | pxcmd::ST);
    }

    pub fn write_mem(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }
    pub fn read_mem(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    }

    pub fn d2h(&self, p: usize) -> D2hRegisterFis {
        D2hRegisterFis::read_from_bytes(&self.read_mem(Self::fb(p) + rx::RFIS, 20)).unwrap()
    }
    pub fn pio_setup(&self, p: usize) -> PioSetupFis {
        PioSetupFis::read_from_bytes(&self.read_mem(Self::fb(p) + rx::PSFIS, 20)).unwrap()
    }
    pub fn sdb(&self, p: usize) -> SetDeviceBitsFis {
        SetDeviceBitsFis::read_from_bytes(&self.read_mem(Self::fb(p) + rx::SDBFIS, 8)).unwrap()
    }
    pub fn prdbc(&self, p: usize, slot: u8) -> u32 {
        let h = self.read_mem(Self::clb(p) + u64::from(slot) * 32, 32);
        CommandHeader::read_from_bytes(&h).unwrap().prdbc.get()
    }

    /// IDENTIFY (PACKET) DEVICE into a buffer; returns the words.
    pub fn identify(&mut self, p: usize, command: u8) -> (Done, [u16; 256]) {
        let d = self.exec(p, 0, &Cmd::ata(command).buf(BUF, 512));
        let b = self.read_mem(BUF, 512);
        let mut w = [0u16; 256];
        for (i, x) in w.iter_mut().enumerate() {
            *x = u16::from_le_bytes([b[2 * i], b[2 * i + 1]]);
        }
        (d, w)
    }

    /// Fill all of guest RAM with an address-dependent pattern.
    pub fn fill_canary(&self) {
        self.write_mem(0, canary());
    }

    /// Assert RAM still holds the pattern outside `allowed` (address, length) ranges.
    pub fn check_canary(&self, allowed: &[(u64, u64)]) {
        let now = self.read_mem(0, RAM as usize);
        let want = canary();
        for (c, (a, b)) in now.chunks(4096).zip(want.chunks(4096)).enumerate() {
            if a == b {
                continue;
            }
            for i in (0..a.len()).filter(|&i| a[i] != b[i]) {
                let addr = (c * 4096 + i) as u64;
                assert!(
                    allowed.iter().any(|&(s, l)| addr >= s && addr < s + l),
                    "guest memory changed outside the buffers at {addr:#x}"
                );
            }
        }
    }
}

/// The canary pattern for all of guest RAM.
pub fn canary() -> &'static [u8] {
    static PATTERN: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    PATTERN.get_or_init(|| {
        (0..RAM)
            .map(|a| (a ^ (a >> 7) ^ (a >> 13)) as u8 ^ 0x5a)
            .collect()
    })
}

/// A deterministic byte pattern for disk data.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
