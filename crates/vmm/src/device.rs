//! The device interface the VMM drives: [`pci::PciDevice`] plus doorbell registrations.
//!
//! A doorbell write (NVMe SQ tail / CQ head, AHCI PxCI) should reach the device's worker without a
//! userspace exit. Under KVM that is an ioeventfd: KVM swallows the write and signals an eventfd,
//! so the device learns *that* the register was written, not *what* was written — unless the
//! registration has a datamatch, in which case only writes of that exact value are swallowed.
//! A device therefore opts in per register, through [`VmmDevice::ioevents`], once it can work
//! without the value (NVMe with shadow doorbells, where the value is in guest memory) or with a
//! datamatch (one registration per value, e.g. AHCI's one-bit PxCI writes).
//!
//! These two methods are the proposal for default methods on `pci::PciDevice`; until the device
//! crates implement them, [`Plain`] adapts any `PciDevice` with "no doorbells".

use pci::{BarInfo, ConfigError, DeviceContext, DeviceRegistry, PciDevice, SlotSpec};

/// The value a datamatch registration matches; its width is the access width.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataMatch {
    /// A 1-byte write of this value.
    U8(u8),
    /// A 2-byte write of this value.
    U16(u16),
    /// A 4-byte write of this value.
    U32(u32),
    /// An 8-byte write of this value.
    U64(u64),
}

impl DataMatch {
    /// The value and width as (value, bytes).
    pub fn value(self) -> (u64, usize) {
        match self {
            DataMatch::U8(v) => (u64::from(v), 1),
            DataMatch::U16(v) => (u64::from(v), 2),
            DataMatch::U32(v) => (u64::from(v), 4),
            DataMatch::U64(v) => (v, 8),
        }
    }
}

/// One register write a device lets the frontend absorb.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IoEvent {
    /// BAR index.
    pub bar: u8,
    /// Offset of the register in the BAR.
    pub offset: u64,
    /// `None`: every write to the address (any width) is absorbed and its value lost.
    /// `Some`: only writes of exactly this width and value; others reach `bar_write` as usual.
    pub datamatch: Option<DataMatch>,
    /// Handed back to [`VmmDevice::kick`] when an absorbed write happens.
    pub token: u32,
}

/// A PCI device as the VMM drives it.
pub trait VmmDevice: PciDevice {
    /// The register writes the frontend may absorb. The VMM asks again after every
    /// `config_write` and userspace `bar_write`, and re-registers only what changed; the set must
    /// not change otherwise (a kick must not change it). Absorbing happens only while the BAR is
    /// mapped, and follows BAR moves.
    fn ioevents(&self) -> Vec<IoEvent> {
        Vec::new()
    }

    /// An absorbed write to the register registered with `token` happened (possibly several,
    /// coalesced). Called on the VMM's I/O-event thread; must not block on disk I/O.
    fn kick(&mut self, _token: u32) {}
}

/// Any [`PciDevice`] as a [`VmmDevice`] without doorbell registrations.
pub struct Plain(pub Box<dyn PciDevice>);

impl PciDevice for Plain {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.0.config_read(offset, data)
    }
    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.0.config_write(offset, data)
    }
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        self.0.bar_read(bar, offset, data)
    }
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        self.0.bar_write(bar, offset, data)
    }
    fn bars(&self) -> Vec<BarInfo> {
        self.0.bars()
    }
    fn shutdown(&mut self) {
        self.0.shutdown()
    }
    fn stats(&self) -> Vec<(String, u64)> {
        self.0.stats()
    }
}

impl VmmDevice for Plain {}

/// Builds the devices of `-s` specs for the VMM.
pub trait DeviceFactory {
    /// Build the device for `spec`.
    fn create(
        &self,
        spec: &SlotSpec,
        ctx: &DeviceContext,
    ) -> Result<Box<dyn VmmDevice>, ConfigError>;
}

impl DeviceFactory for DeviceRegistry {
    fn create(
        &self,
        spec: &SlotSpec,
        ctx: &DeviceContext,
    ) -> Result<Box<dyn VmmDevice>, ConfigError> {
        Ok(Box::new(Plain(DeviceRegistry::create(self, spec, ctx)?)))
    }
}

/// The registry's devices, with doorbell-capable adapters where a model offers kicks
/// ([`crate::doorbells`]).
pub struct KvmDevices(pub DeviceRegistry);

impl DeviceFactory for KvmDevices {
    fn create(
        &self,
        spec: &SlotSpec,
        ctx: &DeviceContext,
    ) -> Result<Box<dyn VmmDevice>, ConfigError> {
        match self.0.canonical(&spec.emul) {
            Some(nvme::NAME) => crate::doorbells::create_nvme(spec, ctx),
            Some("ahci") => crate::doorbells::create_ahci(&self.0, spec, ctx),
            _ => DeviceFactory::create(&self.0, spec, ctx),
        }
    }
}
