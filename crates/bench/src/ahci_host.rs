//! A polling AHCI host for the in-process benchmark: port 0 set up the way libata does, then
//! NCQ reads or writes (READ/WRITE FPDMA QUEUED) kept in flight on up to 32 tags, each issued
//! with its own PxSACT and PxCI writes as Linux does, completions found by polling PxSACT and
//! acknowledged by clearing PxIS and IS as an interrupt handler would.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ahci::{DriveInfo, DriveKind};
use anyhow::{bail, Result};
use block::BlockBackend;
use pci::{DeviceContext, GuestMem, PciDevice};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryMmap};

use crate::workload::{Counting, Rng, Workload};

const ABAR: u8 = 5;
const PORT: u64 = 0x100;
const CLB: u64 = 0x10_000;
const FB: u64 = 0x11_000;
const TABLES: u64 = 0x20_000;
const TABLE_STRIDE: u64 = 0x1000;
const BUFS: u64 = 0x1000_0000;
/// Guest RAM of the benchmark host.
pub const MEM: usize = 512 << 20;

mod reg {
    pub const GHC: u64 = 0x04;
    pub const IS: u64 = 0x08;
    pub const P_CLB: u64 = 0x00;
    pub const P_FB: u64 = 0x08;
    pub const P_IS: u64 = 0x10;
    pub const P_IE: u64 = 0x14;
    pub const P_CMD: u64 = 0x18;
    pub const P_TFD: u64 = 0x20;
    pub const P_SSTS: u64 = 0x28;
    pub const P_SERR: u64 = 0x30;
    pub const P_SACT: u64 = 0x34;
    pub const P_CI: u64 = 0x38;
}

/// The host and its HBA.
pub struct AhciHost {
    dev: Box<dyn PciDevice>,
    mem: Arc<GuestMemoryMmap>,
    pub irq: Arc<Counting>,
    sectors: u64,
}

impl AhciHost {
    /// An HBA with one disk over `backend`, brought up with MSI and port 0 running.
    pub fn new(backend: Arc<dyn BlockBackend>, aio: block::EngineKind) -> Result<AhciHost> {
        let mem = GuestMem::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)])?);
        let irq = Arc::new(Counting::default());
        let ctx = DeviceContext {
            mem: mem.clone(),
            irq: irq.clone(),
            intx_supported: false,
        };
        let sectors = backend.info().capacity / 512;
        let drive = DriveInfo::new(DriveKind::Disk, Some(backend), 512, 512);
        let opts = ahci::HbaOptions { aio, iothreads: 1 };
        let dev: Box<dyn PciDevice> = Box::new(ahci::Ahci::with_options(vec![drive], &ctx, opts)?);
        let h = AhciHost {
            dev,
            mem: mem.memory().into_inner(),
            irq,
            sectors,
        };
        h.bring_up()?;
        Ok(h)
    }

    fn w(&self, off: u64, v: u32) {
        self.dev.bar_write(ABAR, off, &v.to_le_bytes());
    }

    fn r(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.bar_read(ABAR, off, &mut b);
        u32::from_le_bytes(b)
    }

    fn bring_up(&self) -> Result<()> {
        self.dev.config_write(4, &6u16.to_le_bytes());
        // MSI (single message) at the first capability with ID 05h.
        let mut p = [0u8];
        self.dev.config_read(0x34, &mut p);
        let mut cap = u16::from(p[0]);
        while cap != 0 {
            let mut id = [0u8; 2];
            self.dev.config_read(cap, &mut id);
            if id[0] == 0x05 {
                break;
            }
            cap = u16::from(id[1]);
        }
        if cap != 0 {
            self.dev
                .config_write(cap + 4, &0xfee0_0000u32.to_le_bytes());
            self.dev.config_write(cap + 12, &0x41u16.to_le_bytes());
            self.dev.config_write(cap + 2, &1u16.to_le_bytes());
        }
        self.w(reg::GHC, 1 << 31 | 1 << 1); // AE, IE
        let cmd = self.r(PORT + reg::P_CMD);
        self.w(PORT + reg::P_CMD, cmd & !(1 | 1 << 4));
        self.w(PORT + reg::P_CLB, CLB as u32);
        self.w(PORT + reg::P_FB, FB as u32);
        self.w(PORT + reg::P_CMD, 1 << 4); // FRE
        let t = Instant::now();
        while self.r(PORT + reg::P_SSTS) & 0xf != 3 || self.r(PORT + reg::P_TFD) & 0x88 != 0 {
            if t.elapsed() > Duration::from_secs(5) {
                bail!("AHCI link did not come up");
            }
        }
        self.w(PORT + reg::P_SERR, u32::MAX);
        self.w(PORT + reg::P_IS, u32::MAX);
        self.w(reg::IS, u32::MAX);
        self.w(PORT + reg::P_IE, 0x7dc0_007f);
        self.w(PORT + reg::P_CMD, 1 << 4 | 1); // FRE | ST
        for tag in 0..32u64 {
            let t = TABLES + tag * TABLE_STRIDE;
            let mut h = [0u8; 32];
            h[8..12].copy_from_slice(&(t as u32).to_le_bytes());
            self.mem.write_slice(&h, GuestAddress(CLB + tag * 32))?;
        }
        Ok(())
    }

    /// Build tag `tag`'s command (header, FIS, PRDT) for the next request of `w`.
    fn build(&self, w: &Workload, tag: u8, rng: &mut Rng) -> Result<()> {
        let count = (w.bs / 512) as u16;
        let lba = w.next_offset(rng, u16::from(tag), self.sectors * 512) / 512;
        let t = TABLES + u64::from(tag) * TABLE_STRIDE;
        let buf = BUFS + u64::from(tag) * w.bs;
        let mut fis = [0u8; 20];
        fis[0] = 0x27;
        fis[1] = 0x80;
        fis[2] = if w.write { 0x61 } else { 0x60 };
        fis[3] = count as u8;
        fis[4..7].copy_from_slice(&lba.to_le_bytes()[..3]);
        fis[7] = 0x40;
        fis[8..11].copy_from_slice(&lba.to_le_bytes()[3..6]);
        fis[11] = (count >> 8) as u8;
        fis[12] = tag << 3;
        self.mem.write_slice(&fis, GuestAddress(t))?;
        let mut prd = [0u8; 16];
        prd[..4].copy_from_slice(&(buf as u32).to_le_bytes());
        prd[4..8].copy_from_slice(&((buf >> 32) as u32).to_le_bytes());
        prd[12..16].copy_from_slice(&((w.bs - 1) as u32).to_le_bytes());
        self.mem.write_slice(&prd, GuestAddress(t + 0x80))?;
        let flags: u32 = 5 | if w.write { 1 << 6 } else { 0 } | (1 << 16);
        self.mem
            .write_obj(flags, GuestAddress(CLB + u64::from(tag) * 32))?;
        Ok(())
    }

    fn issue(&self, tag: u8) {
        self.w(PORT + reg::P_SACT, 1 << tag);
        self.w(PORT + reg::P_CI, 1 << tag);
    }

    /// Run `w` for `secs`; returns completed commands.
    pub fn run(&mut self, w: &Workload, secs: f64) -> Result<u64> {
        let qd = w.qd.min(32);
        let mut rng = Rng::new(0x2545_f491_4f6c_dd1d);
        for tag in 0..qd as u8 {
            self.build(w, tag, &mut rng)?;
            self.issue(tag);
        }
        let mut outstanding: u32 = if qd == 32 { u32::MAX } else { (1 << qd) - 1 };
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        let mut done = 0u64;
        let mut running = true;
        while outstanding != 0 {
            let seen = self.irq.seen();
            let sact = self.r(PORT + reg::P_SACT);
            let finished = outstanding & !sact;
            if finished == 0 {
                self.irq.wait(seen, Duration::from_millis(1));
                let now = Instant::now();
                if now >= deadline + Duration::from_secs(10) {
                    bail!("AHCI commands never completed (SACT {sact:#x})");
                }
                if running && now >= deadline {
                    running = false;
                }
                if self.r(PORT + reg::P_IS) & 0x4000_0000 != 0 {
                    bail!("AHCI task file error: TFD {:#x}", self.r(PORT + reg::P_TFD));
                }
                continue;
            }
            // What an interrupt handler does: acknowledge, then reap.
            self.w(PORT + reg::P_IS, 1 << 3);
            self.w(reg::IS, 1);
            outstanding &= !finished;
            done += u64::from(finished.count_ones());
            if running && Instant::now() >= deadline {
                running = false;
            }
            if running {
                for tag in 0..32u8 {
                    if finished & (1 << tag) != 0 {
                        self.build(w, tag, &mut rng)?;
                        outstanding |= 1 << tag;
                        self.issue(tag);
                    }
                }
            }
        }
        Ok(done)
    }

    /// Flush and quiesce.
    pub fn shutdown(&self) {
        self.dev.shutdown();
    }
}
