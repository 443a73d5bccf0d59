//! A minimal PCI function for exercising the UML frontend: IDs, one 4 KiB 32-bit memory BAR of
//! scratch registers, and a doorbell at BAR0+0x100 whose written dword is sent as MSI data.

use pci::{BarInfo, BarKind, ConfigSpace, InterruptSink, MsiMessage, PciDevice};
use std::sync::Arc;

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
    cfg: ConfigSpace,
    bar: u8,
    regs: Vec<u8>,
    irq: Arc<dyn InterruptSink>,
    pub bar_writes: u64,
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
            cfg,
            bar,
            regs,
            irq,
            bar_writes: 0,
        }
    }
}

impl PciDevice for Scratch {
    fn name(&self) -> &str {
        "scratch"
    }
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.cfg.read(offset as usize, data);
    }
    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.cfg.write(offset as usize, data);
    }
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let o = offset as usize + i;
            *b = if bar == self.bar {
                self.regs.get(o).copied().unwrap_or(0xff)
            } else {
                0xff
            };
        }
    }
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar != self.bar {
            return;
        }
        self.bar_writes += 1;
        for (i, &b) in data.iter().enumerate() {
            if let Some(r) = self.regs.get_mut(offset as usize + i) {
                *r = b;
            }
        }
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
