//! A minimal PCI function for exercising the UML frontend: IDs, one 4 KiB 32-bit memory BAR of
//! scratch registers, and a doorbell at BAR0+0x100 whose written dword is sent as MSI data.

use pci::{BarInfo, BarKind, ConfigSpace, InterruptSink, MsiMessage, PciDevice};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Test IDs; no Linux driver claims them.
pub const VENDOR: u16 = 0x1b36;
pub const DEVICE: u16 = 0x0beb;
/// BAR0 size.
pub const BAR0_SIZE: u64 = 4096;
/// Writing a dword here raises an MSI whose data is that dword.
pub const DOORBELL: u64 = 0x100;
/// MSI address used for doorbell MSIs (what Linux programs under UML).
pub const MSI_ADDR: u64 = 0xa0000;

pub struct Scratch {
    cfg: Mutex<ConfigSpace>,
    bar: u8,
    regs: Mutex<Vec<u8>>,
    irq: Arc<dyn InterruptSink>,
    pub bar_writes: AtomicU64,
}

impl Scratch {
    /// Class 0xff ("unassigned"): no Linux driver binds, so the BAR stays ours to poke.
    pub fn new(irq: Arc<dyn InterruptSink>) -> Self {
        Self::with_class(irq, [0xff, 0, 0], 0)
    }

    /// `class` = [base, sub, prog-if]; the scratch registers live in BAR `bar`. Lets a smoke test
    /// impersonate a class whose Linux driver pokes the BAR at probe time.
    pub fn with_class(irq: Arc<dyn InterruptSink>, class: [u8; 3], bar: u8) -> Self {
        let mut cfg = ConfigSpace::new(VENDOR, DEVICE, class[0], class[1], class[2], 1);
        let kind = BarKind::Mem32 {
            prefetchable: false,
        };
        cfg.add_bar(bar as usize, kind, BAR0_SIZE);
        let regs = (0..BAR0_SIZE as usize).map(|i| i as u8).collect();
        Scratch {
            cfg: Mutex::new(cfg),
            bar,
            regs: Mutex::new(regs),
            irq,
            bar_writes: AtomicU64::new(0),
        }
    }
}

impl PciDevice for Scratch {
    fn name(&self) -> &str {
        "scratch"
    }
    fn config_read(&self, offset: u16, data: &mut [u8]) {
        self.cfg.lock().unwrap().read(offset as usize, data);
    }
    fn config_write(&self, offset: u16, data: &[u8]) {
        self.cfg.lock().unwrap().write(offset as usize, data);
    }
    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) {
        let regs = self.regs.lock().unwrap();
        for (i, b) in data.iter_mut().enumerate() {
            let o = (offset as usize).wrapping_add(i);
            *b = if bar == self.bar {
                regs.get(o).copied().unwrap_or(0xff)
            } else {
                0xff
            };
        }
    }
    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) {
        if bar != self.bar {
            return;
        }
        self.bar_writes.fetch_add(1, Ordering::Relaxed);
        let mut regs = self.regs.lock().unwrap();
        for (i, &b) in data.iter().enumerate() {
            if let Some(r) = regs.get_mut((offset as usize).wrapping_add(i)) {
                *r = b;
            }
        }
        drop(regs);
        if offset == DOORBELL && data.len() == 4 {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.irq.msi(MsiMessage {
                addr: MSI_ADDR,
                data: v,
            });
        }
    }
    fn bars(&self) -> Vec<BarInfo> {
        vec![BarInfo {
            index: self.bar,
            size: BAR0_SIZE,
            kind: BarKind::Mem32 {
                prefetchable: false,
            },
        }]
    }
}
