//! Doorbell adapters: device models whose doorbell writes can become ioeventfd kicks.
//!
//! NVMe: once the guest has configured shadow doorbells (Doorbell Buffer Config), an I/O
//! submission queue's tail lives in guest memory, so the SQ tail doorbell can be absorbed by KVM
//! and turned into [`nvme::NvmeController::kick`]. CQ head doorbells stay on the userspace path:
//! the host rings them only when the controller asks through the EventIdx (completions waiting for
//! space, INTx), and then the controller needs to act on the new head, which `kick` does not do.
//! Admin queue doorbells are never absorbed (shadow doorbells do not cover queue 0).
//!
//! This adapter exists because `pci::PciDevice` has no doorbell methods yet; the proposal is to add
//! [`crate::device::VmmDevice`]'s two methods to it with these defaults, after which
//! `NvmeController` implements them itself and this file goes away.

use pci::{BarInfo, ConfigError, DeviceContext, PciDevice, SlotSpec};

use crate::device::{IoEvent, VmmDevice};

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
