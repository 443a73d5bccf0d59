//! rhyve's PCI device framework.
//!
//! A device model implements [`PciDevice`]: it answers config-space and BAR accesses (BAR index +
//! offset, never absolute addresses), reads and writes guest memory through `vm-memory`, and raises
//! interrupts through an [`InterruptSink`] that the frontend (KVM, UML, unit tests) provides. The
//! building blocks here — [`config::ConfigSpace`], [`function::PciFunction`] with MSI/MSI-X, the
//! [`registry`] and the bhyve `slot,emul,conf` parser — are what every model shares.
#![forbid(unsafe_code)]

pub mod caps;
pub mod config;
pub mod function;
pub mod latency;
pub mod registry;
#[cfg(feature = "test-support")]
pub mod state_testing;

use std::sync::Arc;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

pub use config::{BarKind, ConfigSpace};
pub use function::{FunctionState, InterruptMode, Interrupts, PciFunction, StateError};
pub use latency::LatencyHistogram;
pub use registry::{ConfigError, DeviceRegistry, SlotOption, SlotOptions, SlotSpec};

/// Guest memory as every device model sees it. Atomic so a frontend can install or replace the
/// mapping (UML sends its memory table after the device exists) while models hold a handle.
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap>;

/// One MSI / MSI-X message: the doubleword `data` written to `addr`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address (LAPIC address on x86; opaque to the device).
    pub addr: u64,
    /// Message data.
    pub data: u32,
}

/// How a device's interrupts leave it. Implemented by each frontend.
pub trait InterruptSink: Send + Sync {
    /// Deliver one MSI or MSI-X message write.
    fn msi(&self, msg: MsiMessage);
    /// Set the level of INTx pin `pin` (1 = INTA … 4 = INTD). Frontends without INTx ignore it.
    fn intx(&self, pin: u8, asserted: bool);
    /// An MSI-X vector or MSI message was (re)programmed, masked (`None`) or unmasked. Frontends
    /// that pre-route interrupts (KVM irqfd) update their routes here; the default does nothing.
    fn route_changed(&self, _vector: u16, _msg: Option<MsiMessage>) {}
}

/// An interrupt sink that drops everything; for devices created before a frontend exists.
#[derive(Debug, Default)]
pub struct NullInterrupts;

impl InterruptSink for NullInterrupts {
    fn msi(&self, _msg: MsiMessage) {}
    fn intx(&self, _pin: u8, _asserted: bool) {}
}

/// What a frontend hands a device constructor.
#[derive(Clone)]
pub struct DeviceContext {
    /// Guest RAM, bounds-checked by `vm-memory`.
    pub mem: GuestMem,
    /// Where interrupts go.
    pub irq: Arc<dyn InterruptSink>,
    /// Which interrupt mechanisms the frontend can deliver (UML has no INTx).
    pub intx_supported: bool,
}

/// A BAR as the frontend needs to know it to place and route it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarInfo {
    /// BAR index 0–5 (a 64-bit BAR occupies index and index+1; it is reported at the low index).
    pub index: u8,
    /// Size in bytes (a power of two).
    pub size: u64,
    /// Memory (32/64-bit, prefetchable) or I/O.
    pub kind: BarKind,
}

/// The value a datamatch [`IoEvent`] matches; its width is the access width.
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

/// A register write the frontend may absorb (KVM: an ioeventfd) instead of delivering it through
/// [`PciDevice::bar_write`]. The frontend then learns only *that* the register was written, so a
/// device lists a register once it can work without the value (NVMe with shadow doorbells, where
/// the value is in guest memory) or with a datamatch (one registration per value, e.g. AHCI's
/// one-bit PxCI writes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IoEvent {
    /// BAR index.
    pub bar: u8,
    /// Offset of the register in the BAR.
    pub offset: u64,
    /// `None`: every write to the address (any width) is absorbed and its value lost.
    /// `Some`: only writes of exactly this width and value; others reach `bar_write` as usual.
    pub datamatch: Option<DataMatch>,
    /// Handed back to [`PciDevice::kick`] when an absorbed write happens.
    pub token: u32,
}

/// A PCI function as seen by a frontend. Every method takes `&self`: frontends share one device
/// between threads (vCPUs, an I/O-event thread, the vhost-user worker) without a lock around it,
/// and the device serializes what must be serialized inside, per queue or per register block.
/// Accesses are synchronous and must not block on disk I/O.
pub trait PciDevice: Send + Sync {
    /// The emulation name (`nvme`, `ahci`, …), for logs and stats.
    fn name(&self) -> &str;
    /// Read `data.len()` (1, 2, 4 or 8) bytes of config space at `offset` (0..4096).
    fn config_read(&self, offset: u16, data: &mut [u8]);
    /// Write config space.
    fn config_write(&self, offset: u16, data: &[u8]);
    /// Read from BAR `bar` at `offset`. Any length; unclaimed bytes read as all-ones.
    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]);
    /// Write to BAR `bar` at `offset`. Any length.
    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]);
    /// The BARs this function implements.
    fn bars(&self) -> Vec<BarInfo>;
    /// Quiesce: finish in-flight I/O and flush backends. Called once before the process exits.
    fn shutdown(&self) {}
    /// Human-readable counters (commands, bytes, interrupts) for `--stats`.
    fn stats(&self) -> Vec<(String, u64)> {
        Vec::new()
    }
    /// The register writes the frontend may absorb instead of delivering. A frontend that absorbs
    /// asks again after every `config_write` and every `bar_write` it delivers, so the set may
    /// change only then (never on a [`PciDevice::kick`]). Absorbing happens only while the BAR
    /// decodes, at its current address.
    fn ioevents(&self) -> Vec<IoEvent> {
        Vec::new()
    }
    /// An absorbed write to the register listed with `token` happened (possibly several,
    /// coalesced). It is a posted write: the frontend delivers pending kicks before any later
    /// synchronous access to the device. Must not block on disk I/O.
    fn kick(&self, _token: u32) {}
    /// Stop taking new work, for a snapshot or a migration: nothing more is fetched from the
    /// guest, in-flight backend I/O is waited for (bounded) and backends are flushed. Register
    /// accesses still work; doorbells rung meanwhile are remembered and served on
    /// [`PciDevice::resume`]. A device without queues has nothing to do.
    fn pause(&self) -> Result<(), StateError> {
        Ok(())
    }
    /// Take work again after [`PciDevice::pause`] or [`PciDevice::restore_state`].
    fn resume(&self) {}
    /// The paused device's state, as self-describing data with its own format version.
    fn save_state(&self) -> Result<serde_json::Value, StateError> {
        Err(StateError::Unsupported {
            device: self.name().to_string(),
        })
    }
    /// Load state from [`PciDevice::save_state`] into this freshly built device, built with the
    /// same options. Everything is checked first: on error nothing has changed. The device
    /// stays paused until [`PciDevice::resume`].
    fn restore_state(&self, _state: &serde_json::Value) -> Result<(), StateError> {
        Err(StateError::Unsupported {
            device: self.name().to_string(),
        })
    }
}

/// A device's saved state as the JSON [`PciDevice::save_state`] returns.
pub fn state_to_json<T: serde::Serialize>(state: &T) -> Result<serde_json::Value, StateError> {
    serde_json::to_value(state).map_err(|e| StateError::Invalid(e.to_string()))
}

/// A device's state from [`PciDevice::restore_state`]'s JSON; `device` names it in the error.
pub fn state_from_json<T: serde::de::DeserializeOwned>(
    device: &str,
    v: &serde_json::Value,
) -> Result<T, StateError> {
    T::deserialize(v).map_err(|e| StateError::Invalid(format!("{device} state: {e}")))
}

/// Whether an access of `len` bytes at `offset` lies inside a BAR of `size` bytes. Frontends and
/// devices check guest offsets with this before any arithmetic on them.
pub fn bar_access_ok(offset: u64, len: usize, size: u64) -> bool {
    offset
        .checked_add(len as u64)
        .is_some_and(|end| end <= size)
}

/// A boxed device is a device: lets a registry-built `Box<dyn PciDevice>` go straight into an
/// `Arc<dyn PciDevice>` that frontends share between threads.
impl<T: PciDevice + ?Sized> PciDevice for Box<T> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn config_read(&self, offset: u16, data: &mut [u8]) {
        (**self).config_read(offset, data)
    }
    fn config_write(&self, offset: u16, data: &[u8]) {
        (**self).config_write(offset, data)
    }
    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) {
        (**self).bar_read(bar, offset, data)
    }
    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) {
        (**self).bar_write(bar, offset, data)
    }
    fn bars(&self) -> Vec<BarInfo> {
        (**self).bars()
    }
    fn shutdown(&self) {
        (**self).shutdown()
    }
    fn stats(&self) -> Vec<(String, u64)> {
        (**self).stats()
    }
    fn ioevents(&self) -> Vec<IoEvent> {
        (**self).ioevents()
    }
    fn kick(&self, token: u32) {
        (**self).kick(token)
    }
    fn pause(&self) -> Result<(), StateError> {
        (**self).pause()
    }
    fn resume(&self) {
        (**self).resume()
    }
    fn save_state(&self) -> Result<serde_json::Value, StateError> {
        (**self).save_state()
    }
    fn restore_state(&self, state: &serde_json::Value) -> Result<(), StateError> {
        (**self).restore_state(state)
    }
}
