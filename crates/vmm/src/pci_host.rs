//! The PCI host bridge: bus 0's functions, config access through 0xCF8/0xCFC and ECAM, and BAR
//! placement that follows the guest.
//!
//! After every config-space write the host re-reads the function's command register and BARs and
//! moves its ranges on the MMIO/PIO buses to match (a BAR decodes only while its space is enabled
//! in the command register), then re-resolves the function's ioeventfd doorbells to the new
//! addresses. The VMM places every BAR at start as firmware would, so a guest that never touches
//! them (Linux keeps firmware assignments) finds them decoding.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use pci::config::{cmd, reg};
use pci::{BarInfo, BarKind, ConfigSpace, IoEvent, PciDevice};

use crate::bus::{Bus, BusDevice};
use crate::ioevent::{IoEvents, Resolved};
use crate::irq::{intx_gsi, DeviceIrq};
use crate::memory::{PCI_IO_SIZE, PCI_IO_START, PCI_MMIO32_SIZE, PCI_MMIO32_START};
use crate::stats::Stats;
use crate::{ExitSender, VmExit};

/// Functions on bus 0: 32 devices × 8 functions.
const FUNCTIONS: usize = 256;

/// What every function's ranges are wired to.
pub struct HostEnv {
    /// MMIO address space.
    pub mmio: Arc<Bus>,
    /// Port I/O address space.
    pub pio: Arc<Bus>,
    /// ioeventfd registrations.
    pub ioevents: Arc<IoEvents>,
    /// Exit counters.
    pub stats: Arc<Stats>,
}

#[derive(Default)]
struct SlotState {
    /// Base address each BAR (by position in `bars`) is mapped at.
    mapped: Vec<Option<u64>>,
    /// The device's doorbell requests as last seen.
    ioevents: Vec<IoEvent>,
}

/// One PCI function on bus 0.
pub struct PciSlot {
    /// Index `device * 8 + function`.
    pub index: usize,
    /// The emulation name (`nvme`).
    pub name: String,
    dev: Box<dyn PciDevice>,
    /// Serializes delivering absorbed doorbells with the synchronous accesses that must come
    /// after them (held only while kicks are delivered, never around an access).
    order: Mutex<()>,
    bars: Vec<BarInfo>,
    tags: Vec<usize>,
    state: Mutex<SlotState>,
    env: Arc<HostEnv>,
    /// The interrupt sink handed to the device, if the VMM made one.
    pub irq: Option<Arc<DeviceIrq>>,
    /// Doorbell kicks delivered through ioeventfd.
    pub kicks: AtomicU64,
    /// The device has ioeventfd registrations (so synchronous accesses drain them first).
    has_ioevents: AtomicBool,
}

impl PciSlot {
    /// PCI device number.
    pub fn device_no(&self) -> u8 {
        (self.index / 8) as u8
    }

    /// The device model, for a synchronous access: doorbell writes the guest made before this
    /// access (absorbed by ioeventfds, not yet delivered) reach the device first. The device
    /// itself is shared, not locked: it serializes internally per queue.
    pub fn lock(&self) -> &dyn PciDevice {
        if self.has_ioevents.load(Ordering::Acquire) {
            self.deliver_kicks();
        }
        &*self.dev
    }

    fn lock_state(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The BARs the device declared.
    pub fn bars(&self) -> &[BarInfo] {
        &self.bars
    }

    /// Where BAR `index` is decoded now, if it is.
    pub fn bar_base(&self, index: u8) -> Option<u64> {
        let i = self.bars.iter().position(|b| b.index == index)?;
        self.lock_state().mapped.get(i).copied().flatten()
    }

    fn read_cfg32(dev: &dyn PciDevice, off: usize) -> u32 {
        let mut b = [0u8; 4];
        dev.config_read(off as u16, &mut b);
        u32::from_le_bytes(b)
    }

    /// Bring the bus ranges and doorbells in line with the command register and BAR registers.
    fn refresh(self: &Arc<Self>) {
        let mut st = self.lock_state();
        let want: Vec<Option<u64>> = {
            let dev = self.lock();
            let command = Self::read_cfg32(dev, reg::COMMAND) as u16;
            self.bars
                .iter()
                .map(|b| {
                    let off = reg::BAR0 + usize::from(b.index) * 4;
                    let low = Self::read_cfg32(dev, off);
                    let (addr, on) = match b.kind {
                        BarKind::Io => (u64::from(low & !3), command & cmd::IO_SPACE != 0),
                        BarKind::Mem32 { .. } => {
                            (u64::from(low & !0xf), command & cmd::MEMORY_SPACE != 0)
                        }
                        BarKind::Mem64 { .. } => {
                            let high = Self::read_cfg32(dev, off + 4);
                            (
                                u64::from(low & !0xf) | (u64::from(high) << 32),
                                command & cmd::MEMORY_SPACE != 0,
                            )
                        }
                    };
                    (on && addr != 0).then_some(addr)
                })
                .collect()
        };
        st.mapped.resize(self.bars.len(), None);
        for (i, b) in self.bars.iter().enumerate() {
            if st.mapped[i] == want[i] {
                continue;
            }
            let bus = if b.kind == BarKind::Io {
                &self.env.pio
            } else {
                &self.env.mmio
            };
            if let Some(old) = st.mapped[i].take() {
                bus.remove(old);
            }
            if let Some(base) = want[i] {
                let handler = Arc::new(BarHandler {
                    slot: Arc::downgrade(self),
                    bar: b.index,
                });
                match bus.insert(base, b.size, handler, self.tags[i]) {
                    Ok(()) => st.mapped[i] = Some(base),
                    Err(e) => log::warn!(
                        "{} {}: BAR{} not decoded: {e}",
                        self.address(),
                        self.name,
                        b.index
                    ),
                }
            }
        }
        self.resolve_ioevents(&mut st);
    }

    /// Re-ask the device for its doorbells and register them where the BARs are now.
    fn resolve_ioevents(&self, st: &mut SlotState) {
        let events = self.lock().ioevents();
        let mut resolved = Vec::new();
        for ev in &events {
            let Some(i) = self.bars.iter().position(|b| b.index == ev.bar) else {
                continue;
            };
            let (Some(base), b) = (st.mapped[i], &self.bars[i]) else {
                continue;
            };
            if ev.offset >= b.size {
                continue;
            }
            resolved.push(Resolved {
                pio: b.kind == BarKind::Io,
                addr: base + ev.offset,
                datamatch: ev.datamatch,
                token: ev.token,
            });
        }
        st.ioevents = events;
        self.env.ioevents.set(self.index, &resolved);
        self.has_ioevents
            .store(!resolved.is_empty(), Ordering::Release);
    }

    /// After a userspace BAR write: pick up a changed doorbell set.
    fn ioevents_maybe_changed(&self) {
        let mut st = self.lock_state();
        let now = self.lock().ioevents();
        if now != st.ioevents {
            self.resolve_ioevents(&mut st);
        }
    }

    /// `bus:slot.func`.
    pub fn address(&self) -> String {
        format!("0:{}.{}", self.index / 8, self.index % 8)
    }

    /// Config read from the guest.
    pub fn config_read(&self, offset: u16, data: &mut [u8]) {
        self.lock().config_read(offset, data);
    }

    /// Config write from the guest; moves BARs and doorbells as needed.
    pub fn config_write(self: &Arc<Self>, offset: u16, data: &[u8]) {
        self.lock().config_write(offset, data);
        self.refresh();
    }

    /// Doorbells fired: deliver them (the I/O-event thread calls this, and every synchronous
    /// access first). A kick another thread is delivering right now finishes before this
    /// returns.
    pub fn deliver_kicks(&self) {
        let _order = self.order.lock().unwrap_or_else(|e| e.into_inner());
        self.env.ioevents.drain(self.index, |token| {
            self.kicks.fetch_add(1, Ordering::Relaxed);
            self.dev.kick(token);
        });
    }
}

/// A BAR's range on a bus.
struct BarHandler {
    slot: Weak<PciSlot>,
    bar: u8,
}

impl BusDevice for BarHandler {
    fn read(&self, offset: u64, data: &mut [u8]) {
        match self.slot.upgrade() {
            Some(s) => s.lock().bar_read(self.bar, offset, data),
            None => data.fill(0xff),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if let Some(s) = self.slot.upgrade() {
            s.lock().bar_write(self.bar, offset, data);
            s.ioevents_maybe_changed();
        }
    }
}

/// Bus 0 and its config mechanisms.
pub struct PciHost {
    functions: Vec<Option<Arc<PciSlot>>>,
    env: Arc<HostEnv>,
    cf8: AtomicU32,
    exit: ExitSender,
}

impl PciHost {
    /// An empty bus 0.
    pub fn new(env: Arc<HostEnv>, exit: ExitSender) -> Self {
        PciHost {
            functions: vec![None; FUNCTIONS],
            env,
            cf8: AtomicU32::new(0),
            exit,
        }
    }

    /// Whether `device.function` is taken.
    pub fn is_taken(&self, device: u8, function: u8) -> bool {
        self.functions[usize::from(device) * 8 + usize::from(function)].is_some()
    }

    /// Plug a function in at `device.function`; `irq` is the sink the device was built with.
    pub fn add(
        &mut self,
        device: u8,
        function: u8,
        dev: Box<dyn PciDevice>,
        irq: Option<Arc<DeviceIrq>>,
    ) -> Arc<PciSlot> {
        let index = usize::from(device) * 8 + usize::from(function);
        let name = dev.name().to_string();
        let bars = dev.bars();
        let tags = bars
            .iter()
            .map(|b| {
                self.env
                    .stats
                    .bucket(&format!("slot{device}.{function} {name} bar{}", b.index))
            })
            .collect();
        let slot = Arc::new(PciSlot {
            index,
            name,
            dev,
            order: Mutex::new(()),
            bars,
            tags,
            state: Mutex::new(SlotState::default()),
            env: self.env.clone(),
            irq,
            kicks: AtomicU64::new(0),
            has_ioevents: AtomicBool::new(false),
        });
        self.functions[index] = Some(slot.clone());
        slot
    }

    /// Every function, in slot order.
    pub fn slots(&self) -> impl Iterator<Item = &Arc<PciSlot>> {
        self.functions.iter().flatten()
    }

    /// The function at `index` (`device * 8 + function`).
    pub fn slot(&self, index: usize) -> Option<&Arc<PciSlot>> {
        self.functions.get(index).and_then(|s| s.as_ref())
    }

    /// Place every BAR as firmware would (memory BARs in the 32-bit window, largest first; I/O
    /// BARs in the I/O window), program the interrupt line, and enable decoding.
    pub fn assign_resources(&self) -> Result<(), String> {
        let mut want: Vec<(Arc<PciSlot>, BarInfo)> = self
            .slots()
            .flat_map(|s| s.bars.iter().map(move |b| (s.clone(), *b)))
            .collect();
        want.sort_by_key(|(s, b)| (std::cmp::Reverse(b.size), s.index, b.index));
        let (mut mem, mut io) = (PCI_MMIO32_START, PCI_IO_START);
        for (slot, b) in &want {
            let (next, end) = if b.kind == BarKind::Io {
                (&mut io, PCI_IO_START + PCI_IO_SIZE)
            } else {
                (&mut mem, PCI_MMIO32_START + PCI_MMIO32_SIZE)
            };
            let base = next.next_multiple_of(b.size);
            if base + b.size > end {
                return Err(format!(
                    "{} {}: no room for BAR{} ({} bytes) in the PCI {} window",
                    slot.address(),
                    slot.name,
                    b.index,
                    b.size,
                    if b.kind == BarKind::Io {
                        "I/O"
                    } else {
                        "memory"
                    }
                ));
            }
            *next = base + b.size;
            let dev = slot.lock();
            let off = (reg::BAR0 + usize::from(b.index) * 4) as u16;
            let low =
                PciSlot::read_cfg32(dev, off.into()) & if b.kind == BarKind::Io { 3 } else { 0xf };
            dev.config_write(off, &((base as u32) | low).to_le_bytes());
            if matches!(b.kind, BarKind::Mem64 { .. }) {
                dev.config_write(off + 4, &((base >> 32) as u32).to_le_bytes());
            }
        }
        for slot in self.slots() {
            {
                let dev = slot.lock();
                let mut pin = [0u8];
                dev.config_read(reg::INTERRUPT_PIN as u16, &mut pin);
                if pin[0] != 0 {
                    dev.config_write(
                        reg::INTERRUPT_LINE as u16,
                        &[intx_gsi(slot.device_no(), pin[0]) as u8],
                    );
                }
                let command = PciSlot::read_cfg32(dev, reg::COMMAND) as u16;
                dev.config_write(
                    reg::COMMAND as u16,
                    &(command | cmd::IO_SPACE | cmd::MEMORY_SPACE).to_le_bytes(),
                );
            }
            slot.refresh();
        }
        Ok(())
    }

    fn config_access(&self, bus: u8, devfn: usize, offset: u16, data: &mut [u8], write: bool) {
        let slot = if bus == 0 {
            self.functions.get(devfn).and_then(|s| s.as_ref())
        } else {
            None
        };
        match (slot, write) {
            (Some(s), false) => s.config_read(offset, data),
            (Some(s), true) => s.config_write(offset, data),
            (None, false) => data.fill(0xff),
            (None, true) => {}
        }
    }

    /// Ask every device to finish I/O and flush.
    pub fn shutdown(&self) {
        for s in self.slots() {
            s.lock().shutdown();
        }
    }

    /// Pause every function (see [`PciDevice::pause`]); on failure the ones paused resume.
    pub fn pause_devices(&self) -> Result<(), String> {
        let slots: Vec<_> = self.slots().collect();
        for (i, s) in slots.iter().enumerate() {
            if let Err(e) = s.lock().pause() {
                for t in &slots[..i] {
                    t.lock().resume();
                }
                return Err(format!("{} {}: {e}", s.address(), s.name));
            }
        }
        Ok(())
    }

    /// Let every function work again.
    pub fn resume_devices(&self) {
        for s in self.slots() {
            s.lock().resume();
        }
    }

    /// The paused bus's state: the CF8 latch and every function's state.
    pub fn save(&self) -> Result<HostState, String> {
        let mut slots = Vec::new();
        for s in self.slots() {
            let state = s
                .lock()
                .save_state()
                .map_err(|e| format!("{} {}: {e}", s.address(), s.name))?;
            slots.push(SlotSave {
                address: s.address(),
                name: s.name.clone(),
                state,
            });
        }
        Ok(HostState {
            cf8: self.cf8.load(Ordering::Relaxed),
            slots,
        })
    }

    /// Load saved state into this freshly built bus with the same functions in the same slots;
    /// BARs are mapped (and doorbells absorbed) where the saved config space puts them.
    pub fn restore(&self, s: &HostState) -> Result<(), String> {
        let here: Vec<(String, String)> = self
            .slots()
            .map(|x| (x.address(), x.name.clone()))
            .collect();
        let saved: Vec<(String, String)> = s
            .slots
            .iter()
            .map(|x| (x.address.clone(), x.name.clone()))
            .collect();
        if here != saved {
            let show = |v: &[(String, String)]| {
                v.iter()
                    .map(|(a, n)| format!("{a} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(format!(
                "the snapshot has PCI functions [{}], this VM [{}]",
                show(&saved),
                show(&here)
            ));
        }
        for (slot, saved) in self.slots().zip(&s.slots) {
            slot.lock()
                .restore_state(&saved.state)
                .map_err(|e| format!("{} {}: {e}", slot.address(), slot.name))?;
            slot.refresh();
        }
        self.cf8.store(s.cf8, Ordering::Relaxed);
        Ok(())
    }
}

/// A PCI bus in a snapshot.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct HostState {
    /// The 0xCF8 address latch.
    pub cf8: u32,
    /// Every function, in slot order.
    pub slots: Vec<SlotSave>,
}

/// One function in a snapshot.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SlotSave {
    /// `0:4.0`.
    pub address: String,
    /// Emulation name.
    pub name: String,
    /// The device's own state ([`PciDevice::save_state`]).
    pub state: serde_json::Value,
}

/// Ports 0xCF8–0xCFB: CONFIG_ADDRESS (dword accesses) and, at 0xCF9, the reset control register.
pub struct ConfigAddress(pub Arc<PciHost>);

impl BusDevice for ConfigAddress {
    fn read(&self, offset: u64, data: &mut [u8]) {
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.0.cf8.load(Ordering::Relaxed).to_le_bytes());
        } else {
            data.fill(if offset == 1 && data.len() == 1 {
                0
            } else {
                0xff
            });
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if offset == 0 && data.len() == 4 {
            let v = u32::from_le_bytes(data.try_into().expect("4 bytes"));
            self.0.cf8.store(v & 0x80ff_fffc, Ordering::Relaxed);
        } else if offset == 1 && data.len() == 1 && data[0] & 0x04 != 0 {
            // Reset Control Register: RST_CPU.
            let _ = self.0.exit.send(VmExit::Reset);
        }
    }
}

/// Ports 0xCFC–0xCFF: CONFIG_DATA for the function CONFIG_ADDRESS selects.
pub struct ConfigData(pub Arc<PciHost>);

impl ConfigData {
    fn access(&self, offset: u64, data: &mut [u8], write: bool) {
        let a = self.0.cf8.load(Ordering::Relaxed);
        if a & 0x8000_0000 == 0 {
            if !write {
                data.fill(0xff);
            }
            return;
        }
        let bus = (a >> 16) as u8;
        let devfn = ((a >> 8) & 0xff) as usize;
        let reg = (a & 0xfc) as u16 + offset as u16;
        self.0.config_access(bus, devfn, reg, data, write);
    }
}

impl BusDevice for ConfigData {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.access(offset, data, false);
    }
    fn write(&self, offset: u64, data: &[u8]) {
        let mut d = data.to_vec();
        self.access(offset, &mut d, true);
    }
}

/// The ECAM window: bus << 20 | device << 15 | function << 12 | register.
pub struct Ecam(pub Arc<PciHost>);

impl Ecam {
    fn access(&self, offset: u64, data: &mut [u8], write: bool) {
        let bus = (offset >> 20) as u8;
        let devfn = ((offset >> 12) & 0xff) as usize;
        let reg = (offset & 0xfff) as u16;
        // An access must stay inside one function's 4 KiB; 8-byte accesses are split.
        if usize::from(reg) + data.len() > 4096 {
            if !write {
                data.fill(0xff);
            }
            return;
        }
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            self.0
                .config_access(bus, devfn, reg + 4 * i as u16, chunk, write);
        }
    }
}

impl BusDevice for Ecam {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.access(offset, data, false);
    }
    fn write(&self, offset: u64, data: &[u8]) {
        let mut d = data.to_vec();
        self.access(offset, &mut d, true);
    }
}

/// Vendor ID of the host bridge (Red Hat, Inc.: IDs for virtual hardware).
pub const HOSTBRIDGE_VENDOR: u16 = 0x1b36;
/// Device ID of the host bridge (PCIe host bridge).
pub const HOSTBRIDGE_DEVICE: u16 = 0x0008;

/// The host bridge function (class 06/00/00), no BARs.
pub struct HostBridge {
    cfg: Mutex<ConfigSpace>,
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl HostBridge {
    /// A host bridge.
    pub fn new() -> Self {
        let mut cfg = ConfigSpace::new(HOSTBRIDGE_VENDOR, HOSTBRIDGE_DEVICE, 0x06, 0x00, 0x00, 0);
        cfg.set_subsystem(HOSTBRIDGE_VENDOR, 0x1100);
        HostBridge {
            cfg: Mutex::new(cfg),
        }
    }
}

/// Registry constructor for `-s 0,hostbridge` (no options).
pub fn create_hostbridge(
    spec: &pci::SlotSpec,
    _ctx: &pci::DeviceContext,
) -> Result<Box<dyn PciDevice>, pci::ConfigError> {
    spec.opts.check(&[], &[], 0)?;
    Ok(Box::new(HostBridge::new()))
}

impl PciDevice for HostBridge {
    fn name(&self) -> &str {
        "hostbridge"
    }
    fn config_read(&self, offset: u16, data: &mut [u8]) {
        self.cfg
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(usize::from(offset), data);
    }
    fn config_write(&self, offset: u16, data: &[u8]) {
        self.cfg
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(usize::from(offset), data);
    }
    fn bar_read(&self, _bar: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&self, _bar: u8, _offset: u64, _data: &[u8]) {}
    fn bars(&self) -> Vec<BarInfo> {
        Vec::new()
    }
    fn save_state(&self) -> Result<serde_json::Value, pci::StateError> {
        let cfg = self.cfg.lock().unwrap_or_else(|e| e.into_inner());
        Ok(serde_json::json!({ "config": cfg.bytes() }))
    }
    fn restore_state(&self, v: &serde_json::Value) -> Result<(), pci::StateError> {
        let bytes: Vec<u8> = serde_json::from_value(v["config"].clone())
            .map_err(|e| pci::StateError::Invalid(format!("hostbridge: {e}")))?;
        let mut cfg = self.cfg.lock().unwrap_or_else(|e| e.into_inner());
        if bytes.len() != cfg.bytes().len() || bytes[..4] != cfg.bytes()[..4] {
            return Err(pci::StateError::Invalid(
                "hostbridge: config space of another device".into(),
            ));
        }
        cfg.restore_bytes(&bytes);
        Ok(())
    }
}
