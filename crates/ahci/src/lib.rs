//! rhyve's AHCI SATA controller: an AHCI 1.3.1 HBA with 1–32 ports, each with an ATA disk
//! (ACS-4, NCQ, TRIM, SMART, logs) or an ATAPI CD/DVD-ROM (MMC-6), behind a PCI function with a
//! memory ABAR in BAR5, MSI (one vector per port when granted) and INTx where the frontend has it.
//!
//! Lineage: FreeBSD bhyve's `pci_ahci.c` (configuration syntax, overall shape) and QEMU's AHCI;
//! the behaviour follows the specifications. Module map:
//!
//! * [`regs`], [`fis`]: register map and in-memory structures, typed and size-checked.
//! * `hba`, `port`: register semantics, resets, interrupts.
//! * `slot`: command fetch, the I/O job per command, completion FISes.
//! * `ata`, `ncq`, `atapi`, `identify`, `log`: the device command sets.
//! * `prdt`: scatter/gather over guest memory; `config`: bhyve option parsing.
//!
//! Threads: register accesses run on the caller's thread and never wait for the disk; each
//! command runs as a job on a [`block::Executor`]. Lock order: device state, then the PCI
//! function.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod ata;
mod atapi;
mod config;
pub mod drive;
pub mod fis;
mod hba;
mod identify;
mod log;
mod ncq;
mod plan;
mod port;
mod prdt;
pub mod regs;
mod slot;

#[cfg(test)]
mod testdrv;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use block::Executor;
use pci::config::BarKind;
use pci::{
    caps, BarInfo, ConfigError, ConfigSpace, DataMatch, DeviceContext, GuestMem, IoEvent,
    PciDevice, PciFunction, SlotSpec,
};

pub use drive::{DriveInfo, DriveKind};

use hba::{lock, Hba};
use port::Port;
use regs::hba as hreg;
use regs::port as preg;

/// Emulation name on the command line.
pub const NAME: &str = "ahci";
/// One-port shorthands: `ahci-hd,disk.img` and `ahci-cd,image.iso`.
pub const ALIASES: &[&str] = &["ahci-hd", "ahci-cd"];

/// PCI vendor ID (Intel).
pub const VENDOR_ID: u16 = 0x8086;
/// PCI device ID: ICH8 AHCI. Linux's `ahci` binds AHCI controllers by class code; this ID carries
/// no quirks there.
pub const DEVICE_ID: u16 = 0x2821;
/// Class code: mass storage, SATA, AHCI 1.0 programming interface.
pub const CLASS: (u8, u8, u8) = (0x01, 0x06, 0x01);
/// Revision ID.
pub const REVISION: u8 = 0x02;
/// The ABAR is BAR5.
pub const ABAR: u8 = 5;
/// Worker threads per controller (blocking file I/O overlaps across them).
const IO_THREADS: usize = 4;

/// Per-controller counters.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) commands: AtomicU64,
    pub(crate) read_bytes: AtomicU64,
    pub(crate) written_bytes: AtomicU64,
    pub(crate) errors: AtomicU64,
}

/// State shared by the register path and the I/O jobs.
pub(crate) struct Shared {
    /// Device state (HBA and ports). Locked before `func`.
    pub(crate) state: Mutex<Hba>,
    /// Config space and interrupt delivery.
    pub(crate) func: Mutex<PciFunction>,
    pub(crate) mem: GuestMem,
    pub(crate) exec: Executor,
    pub(crate) stats: Stats,
    /// Port index → drive description (also held by each port).
    pub(crate) drives: Vec<Arc<DriveInfo>>,
}

/// An AHCI controller.
pub struct Ahci {
    shared: Arc<Shared>,
    bar_size: u64,
}

impl std::fmt::Debug for Ahci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ahci")
            .field("ports", &self.shared.drives)
            .finish()
    }
}

/// Build an AHCI controller from a `-s` slot specification (`ahci`, `ahci-hd` or `ahci-cd`).
pub fn create(spec: &SlotSpec, ctx: &DeviceContext) -> Result<Box<dyn PciDevice>, ConfigError> {
    let ports = config::parse(spec)?;
    let drives = ports
        .iter()
        .enumerate()
        .map(|(i, p)| config::open(&spec.emul, i, p))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Box::new(Ahci::new(drives, ctx)))
}

impl Ahci {
    /// A controller with one port per drive (1–32 drives).
    ///
    /// # Panics
    /// If `drives` is empty or has more than 32 entries (a caller bug; [`create`] checks).
    pub fn new(drives: Vec<DriveInfo>, ctx: &DeviceContext) -> Ahci {
        assert!(
            (1..=hreg::MAX_PORTS).contains(&drives.len()),
            "AHCI needs 1 to 32 ports"
        );
        let n = drives.len();
        let drives: Vec<Arc<DriveInfo>> = drives.into_iter().map(Arc::new).collect();
        let ports = drives.iter().map(|d| Port::new(Arc::clone(d))).collect();

        let (class, subclass, prog_if) = CLASS;
        let mut cfg = ConfigSpace::new(VENDOR_ID, DEVICE_ID, class, subclass, prog_if, REVISION);
        if ctx.intx_supported {
            cfg.set_interrupt_pin(1);
        }
        let bar_size = (hreg::PORT_BASE + n as u64 * hreg::PORT_STRIDE)
            .next_power_of_two()
            .max(0x1000);
        cfg.add_bar(
            usize::from(ABAR),
            BarKind::Mem32 {
                prefetchable: false,
            },
            bar_size,
        );
        let log2_vectors = n.next_power_of_two().trailing_zeros() as u8;
        let msi = caps::add_msi(&mut cfg, log2_vectors);
        caps::add_pm(&mut cfg);
        let func = PciFunction::new(cfg, Some(msi), None, Arc::clone(&ctx.irq));

        let shared = Arc::new(Shared {
            state: Mutex::new(Hba::new(ports)),
            func: Mutex::new(func),
            mem: ctx.mem.clone(),
            exec: Executor::new(IO_THREADS, "ahci-io"),
            stats: Stats::default(),
            drives,
        });
        // Power-on: the HBA comes out of reset with every link trained (no staggered spin-up).
        {
            let mut hba = lock(&shared.state);
            slot::settle(&shared, &mut hba);
        }
        Ahci { shared, bar_size }
    }

    fn read32(&self, hba: &Hba, off: u64) -> u32 {
        if off < hreg::PORT_BASE {
            return hba.read_global(off, &self.shared.func);
        }
        let p = ((off - hreg::PORT_BASE) / hreg::PORT_STRIDE) as usize;
        match hba.ports.get(p) {
            Some(port) => port.read((off - hreg::PORT_BASE) % hreg::PORT_STRIDE),
            None => 0,
        }
    }

    /// Offset of port `p`'s PxCI in the ABAR.
    fn ci_offset(p: u32) -> u64 {
        hreg::PORT_BASE + u64::from(p) * hreg::PORT_STRIDE + preg::CI
    }

    fn write32(&self, hba: &mut Hba, off: u64, val: u32, mask: u32) {
        let sh = &self.shared;
        if off < hreg::PORT_BASE {
            if hba.write_global(off, val, mask, &sh.func) {
                hba.reset(&sh.func);
                slot::settle(sh, hba);
            }
            return;
        }
        let p = ((off - hreg::PORT_BASE) / hreg::PORT_STRIDE) as usize;
        if p >= hba.ports.len() {
            return;
        }
        let fx = hba.write_port(p, (off - hreg::PORT_BASE) % hreg::PORT_STRIDE, val, mask);
        if fx.kick {
            slot::kick(sh, hba, p);
        }
        if fx.settle {
            slot::settle(sh, hba);
        }
    }
}

impl PciDevice for Ahci {
    fn name(&self) -> &str {
        NAME
    }

    fn config_read(&self, offset: u16, data: &mut [u8]) {
        lock(&self.shared.func).config_read(usize::from(offset), data);
    }

    fn config_write(&self, offset: u16, data: &[u8]) {
        lock(&self.shared.func).config_write(usize::from(offset), data);
    }

    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) {
        if bar != ABAR {
            data.fill(0xff);
            return;
        }
        let hba = lock(&self.shared.state);
        let mut cached: Option<(u64, u32)> = None;
        for (i, b) in data.iter_mut().enumerate() {
            let Some(off) = offset.checked_add(i as u64).filter(|o| *o < self.bar_size) else {
                *b = 0xff;
                continue;
            };
            let dw = off & !3;
            let v = match cached {
                Some((d, v)) if d == dw => v,
                _ => {
                    let v = self.read32(&hba, dw);
                    cached = Some((dw, v));
                    v
                }
            };
            *b = (v >> ((off & 3) * 8)) as u8;
        }
    }

    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) {
        if bar != ABAR {
            return;
        }
        // Gather the bytes into (dword, value, byte-mask) writes, applied in address order.
        let mut writes: Vec<(u64, u32, u32)> = Vec::new();
        for (i, &b) in data.iter().enumerate() {
            let Some(off) = offset.checked_add(i as u64).filter(|o| *o < self.bar_size) else {
                continue;
            };
            let (dw, shift) = (off & !3, (off & 3) * 8);
            match writes.last_mut() {
                Some((d, v, m)) if *d == dw => {
                    *v |= u32::from(b) << shift;
                    *m |= 0xff << shift;
                }
                _ => writes.push((dw, u32::from(b) << shift, 0xff << shift)),
            }
        }
        let mut hba = lock(&self.shared.state);
        for (dw, v, m) in writes {
            self.write32(&mut hba, dw, v, m);
        }
        hba.update_irq(&self.shared.func);
    }

    fn bars(&self) -> Vec<BarInfo> {
        vec![BarInfo {
            index: ABAR,
            size: self.bar_size,
            kind: BarKind::Mem32 {
                prefetchable: false,
            },
        }]
    }

    fn shutdown(&self) {
        self.shared.exec.wait_idle();
        for be in self
            .shared
            .drives
            .iter()
            .filter(|d| !d.read_only)
            .filter_map(|d| d.backend.as_ref())
        {
            if let Err(e) = be.flush() {
                ::log::warn!("ahci: flush at shutdown failed: {e}");
            }
        }
    }

    fn stats(&self) -> Vec<(String, u64)> {
        let s = &self.shared.stats;
        let interrupts = lock(&self.shared.state).interrupts;
        vec![
            ("commands".into(), s.commands.load(Relaxed)),
            ("read_bytes".into(), s.read_bytes.load(Relaxed)),
            ("written_bytes".into(), s.written_bytes.load(Relaxed)),
            ("errors".into(), s.errors.load(Relaxed)),
            ("interrupts".into(), interrupts),
        ]
    }

    /// PxCI is write-1-to-set and drivers issue one command per write (`1 << slot`), so every
    /// port gets one datamatch registration per command slot: token = `port << 8 | slot`. Writes
    /// of other values (several slots at once) still arrive as `bar_write`. PxSACT is not
    /// absorbed: an NCQ command's PxSACT write must reach the HBA before its PxCI write, and the
    /// synchronous access guarantees that (kicks are delivered before later accesses).
    fn ioevents(&self) -> Vec<IoEvent> {
        let ports = self.shared.drives.len() as u32;
        (0..ports)
            .flat_map(|port| {
                (0..hba::SLOTS).map(move |slot| IoEvent {
                    bar: ABAR,
                    offset: Self::ci_offset(port),
                    datamatch: Some(DataMatch::U32(1 << slot)),
                    token: (port << 8) | slot,
                })
            })
            .collect()
    }

    /// An absorbed PxCI write of `1 << slot`: replay it.
    fn kick(&self, token: u32) {
        let (port, slot) = (token >> 8, token & 0xff);
        self.bar_write(ABAR, Self::ci_offset(port), &(1u32 << slot).to_le_bytes());
    }
}
