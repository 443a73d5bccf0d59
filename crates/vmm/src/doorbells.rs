//! Doorbell adapters: device models whose doorbell writes can become ioeventfd kicks.
//!
//! NVMe: once the guest has configured shadow doorbells (Doorbell Buffer Config), an I/O
//! submission queue's tail lives in guest memory, so the SQ tail doorbell can be absorbed by KVM
//! and turned into [`nvme::NvmeController::kick`]. CQ head doorbells stay on the userspace path:
//! the host rings them only when the controller asks through the EventIdx (completions waiting for
//! space, INTx), and then the controller needs to act on the new head, which `kick` does not do.
//! Admin queue doorbells are never absorbed (shadow doorbells do not cover queue 0).
//!
//! AHCI: PxCI is write-1-to-set, and drivers issue one command per write (`1 << slot`), so each
//! port gets one datamatch registration per command slot; a kick replays exactly that write
//! (`bar_write(5, PxCI, 1 << slot)`). Writes of other values (several slots at once) still exit.
//! PxSACT is not absorbed: an NCQ command's PxSACT write must reach the HBA before its PxCI write,
//! and the synchronous exit guarantees that (the drain-before-access rule in [`crate::ioevent`]
//! covers the other direction).
//!
//! These adapters exist because `pci::PciDevice` has no doorbell methods yet; the proposal is to
//! add [`crate::device::VmmDevice`]'s two methods to it with these defaults, after which the device
//! crates implement them and this file goes away.

use pci::{BarInfo, ConfigError, DeviceContext, PciDevice, SlotSpec};

use crate::device::{DataMatch, IoEvent, VmmDevice};

/// Offset of the first doorbell in BAR0.
const DOORBELL_BASE: u64 = 0x1000;

/// An NVMe controller with SQ tail doorbells as ioeventfd kicks.
pub struct NvmeDevice {
    ctrl: nvme::NvmeController,
    maxq: u16,
}

/// Build an NVMe controller exactly as `nvme::create` does, keeping its concrete type.
pub fn create_nvme(
    spec: &SlotSpec,
    ctx: &DeviceContext,
) -> Result<Box<dyn VmmDevice>, ConfigError> {
    let cfg = nvme::config::CtrlConfig::from_spec(spec)?;
    let mut namespaces = Vec::new();
    for (i, ns) in cfg.namespaces.iter().enumerate() {
        let backend = block::open(ns).map_err(|e| ConfigError::Device {
            device: spec.emul.clone(),
            msg: e.to_string(),
        })?;
        namespaces.push(nvme::namespace::Namespace::new(i as u32 + 1, backend));
    }
    let maxq = cfg.maxq;
    Ok(Box::new(NvmeDevice {
        ctrl: nvme::NvmeController::new(cfg, ctx, namespaces),
        maxq,
    }))
}

impl PciDevice for NvmeDevice {
    fn name(&self) -> &str {
        self.ctrl.name()
    }
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.ctrl.config_read(offset, data)
    }
    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.ctrl.config_write(offset, data)
    }
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        self.ctrl.bar_read(bar, offset, data)
    }
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        self.ctrl.bar_write(bar, offset, data)
    }
    fn bars(&self) -> Vec<BarInfo> {
        self.ctrl.bars()
    }
    fn shutdown(&mut self) {
        self.ctrl.shutdown()
    }
    fn stats(&self) -> Vec<(String, u64)> {
        self.ctrl.stats()
    }
}

impl VmmDevice for NvmeDevice {
    fn ioevents(&self) -> Vec<IoEvent> {
        if !self.ctrl.shadow_doorbells() {
            return Vec::new();
        }
        (1..=self.maxq)
            .map(|qid| IoEvent {
                bar: 0,
                offset: DOORBELL_BASE + 8 * u64::from(qid),
                datamatch: None,
                token: u32::from(qid),
            })
            .collect()
    }

    fn kick(&mut self, token: u32) {
        self.ctrl.kick(token as u16);
    }
}

/// AHCI register offsets used here (AHCI 1.3.1 §3).
const AHCI_ABAR: u8 = 5;
const AHCI_CAP: u64 = 0x00;
const AHCI_PI: u64 = 0x0c;
const AHCI_PORT_BASE: u64 = 0x100;
const AHCI_PORT_STRIDE: u64 = 0x80;
const AHCI_PX_CI: u64 = 0x38;

/// An AHCI HBA whose one-slot PxCI writes are ioeventfd kicks.
pub struct AhciDevice {
    dev: Box<dyn PciDevice>,
    events: Vec<IoEvent>,
}

fn ahci_ci(port: u32) -> u64 {
    AHCI_PORT_BASE + AHCI_PORT_STRIDE * u64::from(port) + AHCI_PX_CI
}

impl AhciDevice {
    /// Wrap a registry-built AHCI HBA; its ports and slots are read from CAP and PI.
    pub fn new(mut dev: Box<dyn PciDevice>) -> Self {
        let mut rd = |off| {
            let mut b = [0u8; 4];
            dev.bar_read(AHCI_ABAR, off, &mut b);
            u32::from_le_bytes(b)
        };
        let (cap, pi) = (rd(AHCI_CAP), rd(AHCI_PI));
        let slots = ((cap >> 8) & 0x1f) + 1;
        let mut events = Vec::new();
        for port in (0..32).filter(|p| pi & (1 << p) != 0) {
            for slot in 0..slots {
                events.push(IoEvent {
                    bar: AHCI_ABAR,
                    offset: ahci_ci(port),
                    datamatch: Some(DataMatch::U32(1 << slot)),
                    token: (port << 8) | slot,
                });
            }
        }
        AhciDevice { dev, events }
    }
}

/// Build an AHCI HBA through the registry and wrap it.
pub fn create_ahci(
    registry: &pci::DeviceRegistry,
    spec: &SlotSpec,
    ctx: &DeviceContext,
) -> Result<Box<dyn VmmDevice>, ConfigError> {
    Ok(Box::new(AhciDevice::new(registry.create(spec, ctx)?)))
}

impl PciDevice for AhciDevice {
    fn name(&self) -> &str {
        self.dev.name()
    }
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.dev.config_read(offset, data)
    }
    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.dev.config_write(offset, data)
    }
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        self.dev.bar_read(bar, offset, data)
    }
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        self.dev.bar_write(bar, offset, data)
    }
    fn bars(&self) -> Vec<BarInfo> {
        self.dev.bars()
    }
    fn shutdown(&mut self) {
        self.dev.shutdown()
    }
    fn stats(&self) -> Vec<(String, u64)> {
        self.dev.stats()
    }
}

impl VmmDevice for AhciDevice {
    fn ioevents(&self) -> Vec<IoEvent> {
        self.events.clone()
    }

    fn kick(&mut self, token: u32) {
        let (port, slot) = (token >> 8, token & 0xff);
        self.dev
            .bar_write(AHCI_ABAR, ahci_ci(port), &(1u32 << slot).to_le_bytes());
    }
}
