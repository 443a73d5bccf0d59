//! A PCI function's interrupt-bearing state: config space plus MSI, MSI-X and INTx delivery.
//!
//! Two halves:
//! * [`PciFunction`] owns the configuration space and the MSI-X table. The device keeps it behind
//!   a lock and hands it config-space and table accesses; those are rare (set-up, masking).
//! * [`Interrupts`] is the part the I/O path needs: a lock-free snapshot of what the guest
//!   enabled (mode, Bus Master Enable, every vector's message and mask) that any thread may
//!   [`Interrupts::trigger`] without taking a lock. `PciFunction` mirrors every relevant config or
//!   table write into it.
//!
//! Masked vectors set their pending bit and are delivered when the guest unmasks them, as PCI 3.0
//! §6.8 requires. A function whose Bus Master Enable is clear sends no message (an MSI is a memory
//! write); the vector stays pending and goes out when the guest sets BME again. Each pending bit is
//! claimed with an atomic swap, so a trigger racing with an unmask delivers exactly once.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::SeqCst};
use std::sync::Arc;

use crate::caps::{msi, msix};
use crate::config::{cmd, reg, ConfigSpace};
use crate::{InterruptSink, MsiMessage};

/// Which interrupt mechanism the guest has enabled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptMode {
    /// MSI-X enabled.
    MsiX,
    /// MSI enabled.
    Msi,
    /// Neither: legacy INTx (if the function has a pin).
    Intx,
}

impl InterruptMode {
    fn to_u8(self) -> u8 {
        match self {
            InterruptMode::Intx => 0,
            InterruptMode::Msi => 1,
            InterruptMode::MsiX => 2,
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            2 => InterruptMode::MsiX,
            1 => InterruptMode::Msi,
            _ => InterruptMode::Intx,
        }
    }
}

/// One MSI-X table entry as the delivery path sees it.
#[derive(Debug, Default)]
struct Vector {
    addr: AtomicU64,
    data: AtomicU32,
    masked: AtomicBool,
    pending: AtomicBool,
}

/// The lock-free delivery side of a function's interrupts (see the module docs).
pub struct Interrupts {
    sink: Arc<dyn InterruptSink>,
    mode: AtomicU8,
    bus_master: AtomicBool,
    /// MSI-X Enable clear or Function Mask set.
    msix_blocked: AtomicBool,
    msix: Box<[Vector]>,
    msi_addr: AtomicU64,
    msi_data: AtomicU32,
    /// Messages the guest enabled (a power of two, 1..=32).
    msi_enabled: AtomicU32,
    msi_mask: AtomicU32,
    msi_pending: AtomicU32,
    /// Messages handed to the sink.
    sent: AtomicU64,
}

impl std::fmt::Debug for Interrupts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interrupts")
            .field("mode", &self.mode())
            .field("bus_master", &self.bus_master())
            .finish()
    }
}

impl Interrupts {
    /// The mechanism in force now.
    pub fn mode(&self) -> InterruptMode {
        InterruptMode::from_u8(self.mode.load(SeqCst))
    }

    /// Bus Master Enable: the function may DMA and send messages.
    pub fn bus_master(&self) -> bool {
        self.bus_master.load(SeqCst)
    }

    /// Number of MSI-X vectors (0 without MSI-X).
    pub fn msix_vectors(&self) -> usize {
        self.msix.len()
    }

    /// Number of MSI messages the guest enabled (0 when MSI is off).
    pub fn msi_vectors(&self) -> usize {
        match self.mode() {
            InterruptMode::Msi => self.msi_enabled.load(SeqCst) as usize,
            _ => 0,
        }
    }

    /// Vectors usable in the current mode (1 for INTx).
    pub fn vectors(&self) -> usize {
        match self.mode() {
            InterruptMode::MsiX => self.msix_vectors(),
            InterruptMode::Msi => self.msi_vectors(),
            InterruptMode::Intx => 1,
        }
    }

    /// Messages delivered to the frontend so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(SeqCst)
    }

    /// Raise interrupt `vector` (an MSI-X table index or MSI message number). Returns false when
    /// the function is in INTx mode, in which case the device drives INTx itself. Lock-free.
    pub fn trigger(&self, vector: u16) -> bool {
        match self.mode() {
            InterruptMode::MsiX => {
                let Some(v) = self.msix.get(usize::from(vector)) else {
                    log::warn!(
                        "MSI-X vector {vector} beyond table size {}",
                        self.msix.len()
                    );
                    return true;
                };
                v.pending.store(true, SeqCst);
                self.msix_deliver(v);
                true
            }
            InterruptMode::Msi => {
                let n = self.msi_enabled.load(SeqCst).max(1);
                let bit = 1u32 << (u32::from(vector) % n);
                self.msi_pending.fetch_or(bit, SeqCst);
                self.msi_deliver(bit);
                true
            }
            InterruptMode::Intx => false,
        }
    }

    /// Send vector `v` if it is pending and nothing blocks it; claims the pending bit atomically.
    fn msix_deliver(&self, v: &Vector) {
        if self.msix_blocked.load(SeqCst) || v.masked.load(SeqCst) || !self.bus_master() {
            return;
        }
        if v.pending.swap(false, SeqCst) {
            self.send(MsiMessage {
                addr: v.addr.load(SeqCst),
                data: v.data.load(SeqCst),
            });
        }
    }

    /// Send the pending, unmasked MSI messages among `bits`.
    fn msi_deliver(&self, bits: u32) {
        if !self.bus_master() || self.mode() != InterruptMode::Msi {
            return;
        }
        let n = self.msi_enabled.load(SeqCst).max(1);
        let open = bits & !self.msi_mask.load(SeqCst) & enabled_mask(n);
        let claimed = self.msi_pending.fetch_and(!open, SeqCst) & open;
        for v in 0..32 {
            if claimed & (1 << v) != 0 {
                self.send(self.msi_message(v, n));
            }
        }
    }

    fn msi_message(&self, vector: u32, n: u32) -> MsiMessage {
        let data = self.msi_data.load(SeqCst);
        MsiMessage {
            addr: self.msi_addr.load(SeqCst),
            data: (data & !(n - 1)) | (vector & (n - 1)),
        }
    }

    fn send(&self, msg: MsiMessage) {
        self.sent.fetch_add(1, SeqCst);
        self.sink.msi(msg);
    }

    /// Deliver everything pending that is no longer blocked (after an unmask, enable or BME).
    fn deliver_all(&self) {
        match self.mode() {
            InterruptMode::MsiX => self.msix.iter().for_each(|v| self.msix_deliver(v)),
            InterruptMode::Msi => self.msi_deliver(u32::MAX),
            InterruptMode::Intx => {}
        }
    }

    fn msix_message(&self, v: &Vector, live: bool) -> Option<MsiMessage> {
        live.then(|| MsiMessage {
            addr: v.addr.load(SeqCst),
            data: v.data.load(SeqCst),
        })
    }
}

fn enabled_mask(n: u32) -> u32 {
    if n >= 32 {
        u32::MAX
    } else {
        (1u32 << n) - 1
    }
}

struct MsixCap {
    cap: usize,
    /// Vector Control words as the guest wrote them (the mask bit is mirrored in `Interrupts`).
    ctrl: Vec<u32>,
}

/// Config space + interrupt delivery for one function.
pub struct PciFunction {
    /// The configuration space (devices may read and program it directly).
    pub cfg: ConfigSpace,
    msi_cap: Option<usize>,
    msix: Option<MsixCap>,
    lines: Arc<Interrupts>,
    intx_level: bool,
    intx_sent: bool,
}

impl std::fmt::Debug for PciFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciFunction")
            .field("cfg", &self.cfg)
            .finish()
    }
}

/// A function's state as a snapshot keeps it: config space (with BAR addresses and the MSI
/// capability), the MSI-X table, the pending bits and the INTx level.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FunctionState {
    /// All of config space.
    pub config: Vec<u8>,
    /// MSI-X table entries: (message address, message data, vector control).
    pub msix_table: Vec<(u64, u32, u32)>,
    /// MSI-X pending bits, one per vector.
    pub msix_pending: Vec<bool>,
    /// MSI pending bits.
    pub msi_pending: u32,
    /// The device's INTx level.
    pub intx_level: bool,
}

/// Why device state cannot be saved or restored (a function's or a whole device's).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// The device has no snapshot support.
    #[error("{device}: snapshots are not supported by this device")]
    Unsupported {
        /// The emulation name.
        device: String,
    },
    /// The device is not in a state that can be saved, or cannot take this state now.
    #[error("{0}")]
    Refused(String),
    /// The saved state is damaged, of another format version, or out of range.
    #[error("{0}")]
    Invalid(String),
    /// Another device, or one built with other options.
    #[error("saved state is of {what} {saved:#x}, this function has {here:#x}")]
    Mismatch {
        /// Which identity field.
        what: &'static str,
        /// In the saved state.
        saved: u64,
        /// Here.
        here: u64,
    },
}

impl PciFunction {
    /// The state a snapshot keeps.
    pub fn save(&self) -> FunctionState {
        let l = &self.lines;
        FunctionState {
            config: self.cfg.bytes().to_vec(),
            msix_table: self.msix.as_ref().map_or_else(Vec::new, |m| {
                l.msix
                    .iter()
                    .zip(&m.ctrl)
                    .map(|(v, &c)| (v.addr.load(SeqCst), v.data.load(SeqCst), c))
                    .collect()
            }),
            msix_pending: l.msix.iter().map(|v| v.pending.load(SeqCst)).collect(),
            msi_pending: l.msi_pending.load(SeqCst),
            intx_level: self.intx_level,
        }
    }

    /// Put saved state into this (freshly built, same-configuration) function. Checks the
    /// identity and layout first and changes nothing if they differ; nothing is delivered
    /// here (pending messages go out when the guest next unmasks, as they would have).
    pub fn restore(&mut self, s: &FunctionState) -> Result<(), StateError> {
        let mismatch = |what, saved: usize, here: usize| StateError::Mismatch {
            what,
            saved: saved as u64,
            here: here as u64,
        };
        let here = self.cfg.bytes();
        if s.config.len() != here.len() {
            return Err(mismatch("config space size", s.config.len(), here.len()));
        }
        // Vendor, device, revision/class, and the capability pointer: the same device.
        for (what, range) in [
            ("vendor/device ID", 0..4),
            ("revision/class", 8..12),
            ("capabilities pointer", 0x34..0x35),
        ] {
            let (a, b) = (&s.config[range.clone()], &here[range]);
            if a != b {
                let v = |x: &[u8]| {
                    x.iter()
                        .rev()
                        .fold(0usize, |acc, &b| acc << 8 | usize::from(b))
                };
                return Err(mismatch(what, v(a), v(b)));
            }
        }
        if s.msix_table.len() != self.lines.msix.len()
            || s.msix_pending.len() != self.lines.msix.len()
        {
            return Err(mismatch(
                "MSI-X vector count",
                s.msix_table.len(),
                self.lines.msix.len(),
            ));
        }
        self.cfg.restore_bytes(&s.config);
        if let Some(m) = self.msix.as_mut() {
            for (i, &(addr, data, ctrl)) in s.msix_table.iter().enumerate() {
                let v = &self.lines.msix[i];
                v.addr.store(addr, SeqCst);
                v.data.store(data, SeqCst);
                m.ctrl[i] = ctrl & msix::VECTOR_MASKED;
                v.masked.store(m.ctrl[i] != 0, SeqCst);
                v.pending.store(s.msix_pending[i], SeqCst);
            }
        }
        self.lines.msi_pending.store(s.msi_pending, SeqCst);
        self.intx_level = s.intx_level;
        // Everything derived from config space, as after a guest write of all of it.
        self.sync_mode();
        self.lines
            .bus_master
            .store(self.cfg.command() & cmd::BUS_MASTER != 0, SeqCst);
        if let Some(c) = self.msi_cap {
            self.msi_changed(c);
        }
        for v in 0..self.msix_vectors() {
            self.msix_route(v);
        }
        self.update_intx();
        Ok(())
    }

    /// Wrap a config space whose capabilities are already built. `msi_cap` / `msix_cap` are the
    /// offsets returned by [`crate::caps::add_msi`] / [`crate::caps::add_msix`].
    pub fn new(
        cfg: ConfigSpace,
        msi_cap: Option<usize>,
        msix_cap: Option<usize>,
        irq: Arc<dyn InterruptSink>,
    ) -> Self {
        let n = msix_cap.map_or(0, |cap| {
            usize::from(cfg.read_u16(cap + msix::CONTROL) & 0x7ff) + 1
        });
        let vectors: Vec<Vector> = (0..n)
            .map(|_| Vector {
                masked: AtomicBool::new(true),
                ..Default::default()
            })
            .collect();
        let lines = Arc::new(Interrupts {
            sink: irq,
            mode: AtomicU8::new(InterruptMode::Intx.to_u8()),
            bus_master: AtomicBool::new(cfg.bus_master()),
            msix_blocked: AtomicBool::new(true),
            msix: vectors.into_boxed_slice(),
            msi_addr: AtomicU64::new(0),
            msi_data: AtomicU32::new(0),
            msi_enabled: AtomicU32::new(1),
            msi_mask: AtomicU32::new(0),
            msi_pending: AtomicU32::new(0),
            sent: AtomicU64::new(0),
        });
        PciFunction {
            cfg,
            msi_cap,
            msix: msix_cap.map(|cap| MsixCap {
                cap,
                ctrl: vec![msix::VECTOR_MASKED; n],
            }),
            lines,
            intx_level: false,
            intx_sent: false,
        }
    }

    /// The lock-free delivery handle (share it with the I/O path).
    pub fn interrupts(&self) -> Arc<Interrupts> {
        Arc::clone(&self.lines)
    }

    /// Number of MSI-X vectors (0 without MSI-X).
    pub fn msix_vectors(&self) -> usize {
        self.lines.msix_vectors()
    }

    /// Number of MSI messages the guest enabled (0 when MSI is off).
    pub fn msi_vectors(&self) -> usize {
        self.lines.msi_vectors()
    }

    /// The mechanism in force now.
    pub fn mode(&self) -> InterruptMode {
        self.lines.mode()
    }

    /// Raise interrupt `vector`; see [`Interrupts::trigger`].
    pub fn trigger(&self, vector: u16) -> bool {
        self.lines.trigger(vector)
    }

    /// Guest config-space read. MSI Pending Bits come from the live delivery state.
    pub fn config_read(&self, offset: usize, data: &mut [u8]) {
        self.cfg.read(offset, data);
        if let Some(c) = self.msi_cap {
            let p = self.lines.msi_pending.load(SeqCst).to_le_bytes();
            for (i, b) in data.iter_mut().enumerate() {
                if let Some(k) = (offset + i)
                    .checked_sub(c + msi::PENDING)
                    .filter(|k| *k < 4)
                {
                    *b = p[k];
                }
            }
        }
    }

    /// Guest config-space write; unmasking delivers pending messages, and INTx follows the
    /// command register's Interrupt Disable bit.
    pub fn config_write(&mut self, offset: usize, data: &[u8]) {
        let end = offset + data.len();
        let touches = |start: usize, len: usize| offset < start + len && end > start;
        self.cfg.write(offset, data);
        if let Some(c) = self.msi_cap {
            if touches(c, msi::LEN) {
                self.clamp_mme(c);
            }
        }
        self.sync_mode();
        if touches(reg::COMMAND, 2) {
            self.lines
                .bus_master
                .store(self.cfg.command() & cmd::BUS_MASTER != 0, SeqCst);
            self.update_intx();
        }
        if let Some(c) = self.msi_cap {
            if touches(c, msi::LEN) {
                self.msi_changed(c);
            }
        }
        if let Some(c) = self.msix.as_ref().map(|m| m.cap) {
            if touches(c + msix::CONTROL, 2) {
                self.update_intx();
                for v in 0..self.msix_vectors() {
                    self.msix_route(v);
                }
            }
        }
        self.lines.deliver_all();
    }

    /// Multiple Message Enable may not exceed Multiple Message Capable (PCI 3.0 §6.8.1.3):
    /// a larger value is taken as MMC, so a device never uses vectors the guest has not got.
    fn clamp_mme(&mut self, c: usize) {
        let ctl = self.cfg.read_u16(c + msi::CONTROL);
        let mmc = (ctl >> 1) & 7;
        let mme = (ctl >> msi::CTRL_MME_SHIFT) & 7;
        if mme > mmc {
            let ctl = (ctl & !(7 << msi::CTRL_MME_SHIFT)) | (mmc << msi::CTRL_MME_SHIFT);
            self.cfg.write_u16(c + msi::CONTROL, ctl);
        }
    }

    /// Recompute the mode and MSI-X blocking from the capability control registers.
    fn sync_mode(&self) {
        let mut mode = InterruptMode::Intx;
        let mut blocked = true;
        if let Some(m) = &self.msix {
            let ctl = self.cfg.read_u16(m.cap + msix::CONTROL);
            if ctl & msix::CTRL_ENABLE != 0 {
                mode = InterruptMode::MsiX;
                blocked = ctl & msix::CTRL_FUNCTION_MASK != 0;
            }
        }
        if mode == InterruptMode::Intx {
            if let Some(c) = self.msi_cap {
                let ctl = self.cfg.read_u16(c + msi::CONTROL);
                if ctl & msi::CTRL_ENABLE != 0 {
                    mode = InterruptMode::Msi;
                }
            }
        }
        self.lines.msix_blocked.store(blocked, SeqCst);
        self.lines.mode.store(mode.to_u8(), SeqCst);
    }

    fn msi_changed(&mut self, c: usize) {
        let ctl = self.cfg.read_u16(c + msi::CONTROL);
        let n = 1u32 << ((ctl >> msi::CTRL_MME_SHIFT) & 7).min(5);
        let l = Arc::clone(&self.lines);
        l.msi_addr.store(
            u64::from(self.cfg.read_u32(c + msi::ADDR_LO))
                | (u64::from(self.cfg.read_u32(c + msi::ADDR_HI)) << 32),
            SeqCst,
        );
        l.msi_data
            .store(u32::from(self.cfg.read_u16(c + msi::DATA)), SeqCst);
        l.msi_enabled.store(n, SeqCst);
        l.msi_mask.store(self.cfg.read_u32(c + msi::MASK), SeqCst);
        self.update_intx();
        let on = ctl & msi::CTRL_ENABLE != 0;
        let mask = l.msi_mask.load(SeqCst);
        for v in 0..32u32 {
            let routed = on && v < n && mask & (1 << v) == 0;
            l.sink
                .route_changed(v as u16, routed.then(|| l.msi_message(v, n)));
        }
    }

    /// Set the device's INTx level. It reaches the pin only in INTx mode and while the command
    /// register's Interrupt Disable bit is clear.
    pub fn set_intx(&mut self, asserted: bool) {
        self.intx_level = asserted;
        self.update_intx();
    }

    fn update_intx(&mut self) {
        let pin = self.cfg.interrupt_pin();
        self.cfg.set_interrupt_status(self.intx_level);
        let out = pin != 0
            && self.intx_level
            && self.mode() == InterruptMode::Intx
            && self.cfg.command() & cmd::INTX_DISABLE == 0;
        if out != self.intx_sent {
            self.intx_sent = out;
            self.lines.sink.intx(pin, out);
        }
    }

    fn msix_route(&self, v: usize) {
        let l = &self.lines;
        let vec = &l.msix[v];
        let live = !l.msix_blocked.load(SeqCst) && !vec.masked.load(SeqCst);
        l.sink.route_changed(v as u16, l.msix_message(vec, live));
    }

    /// Guest read of the MSI-X table at `offset` (relative to the table start). Any width;
    /// bytes outside the table read as all-ones.
    pub fn msix_table_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|off| self.msix_table_byte(off))
                .unwrap_or(0xff);
        }
    }

    fn msix_table_byte(&self, off: u64) -> Option<u8> {
        let m = self.msix.as_ref()?;
        let idx = usize::try_from(off / msix::ENTRY_SIZE as u64).ok()?;
        let e = self.lines.msix.get(idx)?;
        let within = (off % msix::ENTRY_SIZE as u64) as usize;
        let addr = e.addr.load(SeqCst);
        let words = [
            addr as u32,
            (addr >> 32) as u32,
            e.data.load(SeqCst),
            m.ctrl[idx],
        ];
        Some(words[within / 4].to_le_bytes()[within % 4])
    }

    /// Guest write to the MSI-X table. Unmasking a vector with its pending bit set delivers it.
    pub fn msix_table_write(&mut self, offset: u64, data: &[u8]) {
        let mut touched = Vec::new();
        for (i, &b) in data.iter().enumerate() {
            let Some(m) = self.msix.as_mut() else { return };
            let Some(off) = offset.checked_add(i as u64) else {
                break;
            };
            let Ok(idx) = usize::try_from(off / msix::ENTRY_SIZE as u64) else {
                continue;
            };
            let Some(e) = self.lines.msix.get(idx) else {
                continue;
            };
            let within = (off % msix::ENTRY_SIZE as u64) as usize;
            let (word, byte) = (within / 4, (within % 4) * 8);
            let set = |w: u32| (w & !(0xff << byte)) | (u32::from(b) << byte);
            match word {
                0 => {
                    let a = e.addr.load(SeqCst);
                    let lo = set(a as u32) & !3;
                    e.addr.store((a & !0xffff_ffff) | u64::from(lo), SeqCst);
                }
                1 => {
                    let a = e.addr.load(SeqCst);
                    let hi = set((a >> 32) as u32);
                    e.addr
                        .store((a & 0xffff_ffff) | (u64::from(hi) << 32), SeqCst);
                }
                2 => e.data.store(set(e.data.load(SeqCst)), SeqCst),
                _ => {
                    m.ctrl[idx] = set(m.ctrl[idx]) & msix::VECTOR_MASKED;
                    e.masked
                        .store(m.ctrl[idx] & msix::VECTOR_MASKED != 0, SeqCst);
                }
            }
            if touched.last() != Some(&idx) {
                touched.push(idx);
            }
        }
        for idx in touched {
            self.lines.msix_deliver(&self.lines.msix[idx]);
            self.msix_route(idx);
        }
    }

    /// A read of a BAR that holds the MSI-X table at offset 0 and the PBA at `pba_offset` (the
    /// layout rhyve's devices use).
    pub fn msix_bar_read(&self, offset: u64, data: &mut [u8], pba_offset: u64) {
        if offset >= pba_offset {
            self.msix_pba_read(offset - pba_offset, data);
        } else {
            self.msix_table_read(offset, data);
        }
    }

    /// A write to such a BAR: the table is writable, the PBA is not.
    pub fn msix_bar_write(&mut self, offset: u64, data: &[u8], pba_offset: u64) {
        if offset < pba_offset {
            self.msix_table_write(offset, data);
        }
    }

    /// Guest read of the Pending Bit Array at `offset` (relative to the PBA start); bytes past
    /// the array read as all-ones.
    pub fn msix_pba_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|off| {
                    // The PBA is an array of QWORDs, one bit per vector.
                    let byte = usize::try_from(off).ok()?;
                    if self.msix.is_none() || byte >= self.lines.msix.len().div_ceil(64) * 8 {
                        return None;
                    }
                    let first = byte * 8;
                    let bits = (0..8)
                        .filter(|k| {
                            self.lines
                                .msix
                                .get(first + k)
                                .is_some_and(|v| v.pending.load(SeqCst))
                        })
                        .fold(0u8, |acc, k| acc | (1 << k));
                    Some(bits)
                })
                .unwrap_or(0xff);
        }
    }

    /// True if MSI-X vector `v` is pending (for tests and stats).
    pub fn msix_pending(&self, v: usize) -> bool {
        self.lines
            .msix
            .get(v)
            .is_some_and(|x| x.pending.load(SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caps;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Rec(Mutex<Vec<MsiMessage>>, Mutex<Vec<(u8, bool)>>);
    impl InterruptSink for Rec {
        fn msi(&self, m: MsiMessage) {
            self.0.lock().unwrap().push(m);
        }
        fn intx(&self, pin: u8, a: bool) {
            self.1.lock().unwrap().push((pin, a));
        }
    }

    fn func(rec: &Arc<Rec>) -> (PciFunction, usize, usize) {
        let mut cfg = ConfigSpace::new(1, 2, 1, 8, 2, 0);
        cfg.set_interrupt_pin(1);
        let msi = caps::add_msi(&mut cfg, 2);
        let msix = caps::add_msix(&mut cfg, 4, 4, 0, 4, 0x800);
        let mut f = PciFunction::new(cfg, Some(msi), Some(msix), rec.clone());
        f.config_write(reg::COMMAND, &cmd::BUS_MASTER.to_le_bytes());
        (f, msi, msix)
    }

    #[test]
    fn saved_state_restores_into_a_fresh_function_and_pending_vectors_deliver_after() {
        let rec = Arc::new(Rec::default());
        let (mut f, _, cap) = func(&rec);
        f.msix_table_write(16, &0xfee0_0000u32.to_le_bytes());
        f.msix_table_write(24, &0x41u32.to_le_bytes());
        f.msix_table_write(28, &0u32.to_le_bytes()); // vector 1 unmasked
        f.config_write(
            cap + 2,
            &(msix::CTRL_ENABLE | msix::CTRL_FUNCTION_MASK).to_le_bytes(),
        );
        assert!(f.trigger(1)); // pending: the function is masked
        let saved = f.save();
        // Through serde, as a snapshot file would carry it.
        let json = format!("{saved:?}");
        assert!(json.contains("msix_pending"));

        let rec2 = Arc::new(Rec::default());
        let (mut g, _, _) = func(&rec2);
        g.restore(&saved).unwrap();
        assert_eq!(g.save(), saved);
        assert_eq!(g.mode(), InterruptMode::MsiX);
        assert!(
            g.interrupts().bus_master(),
            "the command register came back"
        );
        let mut pba = [0u8; 8];
        g.msix_pba_read(0, &mut pba);
        assert_eq!(pba[0], 2, "pending bit restored");
        assert!(
            rec2.0.lock().unwrap().is_empty(),
            "nothing delivered by a restore"
        );
        // The guest lifts the function mask: the pending message goes out once, as it would
        // have on the original.
        g.config_write(cap + 2, &msix::CTRL_ENABLE.to_le_bytes());
        assert_eq!(
            *rec2.0.lock().unwrap(),
            vec![MsiMessage {
                addr: 0xfee0_0000,
                data: 0x41
            }]
        );

        // Another device's state is refused, and nothing changes.
        let mut other = saved.clone();
        other.config[0] ^= 1;
        let (mut h, _, _) = func(&Arc::new(Rec::default()));
        let before = h.save();
        assert!(matches!(
            h.restore(&other),
            Err(StateError::Mismatch {
                what: "vendor/device ID",
                ..
            })
        ));
        assert_eq!(h.save(), before);
        let mut short = saved;
        short.msix_table.pop();
        assert!(h.restore(&short).is_err());
        assert_eq!(h.save(), before);
    }

    #[test]
    fn msix_masking_and_pending_delivery() {
        let rec = Arc::new(Rec::default());
        let (mut f, _, cap) = func(&rec);
        f.msix_table_write(16, &0xfee0_0000u32.to_le_bytes());
        f.msix_table_write(24, &0x41u32.to_le_bytes());
        f.config_write(
            cap + 2,
            &(msix::CTRL_ENABLE | msix::CTRL_FUNCTION_MASK).to_le_bytes(),
        );
        assert!(f.trigger(1));
        assert!(rec.0.lock().unwrap().is_empty());
        let mut pba = [0u8; 8];
        f.msix_pba_read(0, &mut pba);
        assert_eq!(pba[0], 2);
        f.config_write(cap + 2, &msix::CTRL_ENABLE.to_le_bytes());
        assert!(
            rec.0.lock().unwrap().is_empty(),
            "vector itself still masked"
        );
        f.msix_table_write(28, &0u32.to_le_bytes());
        assert_eq!(
            *rec.0.lock().unwrap(),
            vec![MsiMessage {
                addr: 0xfee0_0000,
                data: 0x41
            }]
        );
        f.msix_pba_read(0, &mut pba);
        assert_eq!(pba[0], 0);
        f.trigger(1);
        assert_eq!(rec.0.lock().unwrap().len(), 2);
        f.trigger(99); // out of range: ignored
        let mut e = [0u8; 4];
        f.msix_table_read(12, &mut e);
        assert_eq!(u32::from_le_bytes(e), 1, "reset state is masked");
        f.msix_table_read(4 * 16, &mut e);
        assert_eq!(e, [0xff; 4]);
    }

    #[test]
    fn msi_multi_message_and_masking() {
        let rec = Arc::new(Rec::default());
        let (mut f, cap, _) = func(&rec);
        f.config_write(cap + msi::ADDR_LO, &0xfee0_1000u32.to_le_bytes());
        f.config_write(cap + msi::DATA, &0x60u16.to_le_bytes());
        f.config_write(cap + msi::MASK, &2u32.to_le_bytes());
        // enable with MME=2 (4 messages)
        f.config_write(cap + 2, &(1u16 | (2 << 4)).to_le_bytes());
        assert_eq!(f.mode(), InterruptMode::Msi);
        f.trigger(2);
        f.trigger(1);
        assert_eq!(
            *rec.0.lock().unwrap(),
            vec![MsiMessage {
                addr: 0xfee0_1000,
                data: 0x62
            }]
        );
        let mut p = [0u8; 4];
        f.config_read(cap + msi::PENDING, &mut p);
        assert_eq!(u32::from_le_bytes(p), 2, "masked message is pending");
        f.config_write(cap + msi::MASK, &0u32.to_le_bytes());
        assert_eq!(
            rec.0.lock().unwrap()[1],
            MsiMessage {
                addr: 0xfee0_1000,
                data: 0x61
            }
        );
        f.config_read(cap + msi::PENDING, &mut p);
        assert_eq!(u32::from_le_bytes(p), 0);
    }

    #[test]
    fn intx_follows_level_mode_and_disable_bit() {
        let rec = Arc::new(Rec::default());
        let (mut f, _, _) = func(&rec);
        assert!(!f.trigger(0));
        f.set_intx(true);
        f.config_write(reg::COMMAND, &cmd::INTX_DISABLE.to_le_bytes());
        f.config_write(reg::COMMAND, &0u16.to_le_bytes());
        f.set_intx(false);
        assert_eq!(
            *rec.1.lock().unwrap(),
            vec![(1, true), (1, false), (1, true), (1, false)]
        );
    }

    /// Regression: MME above MMC was accepted (capped at 5), so devices used vectors the guest
    /// never got.
    #[test]
    fn msi_mme_is_clamped_to_mmc() {
        let rec = Arc::new(Rec::default());
        let (mut f, cap, _) = func(&rec); // MMC = 2 (4 messages)
        f.config_write(cap + 2, &(1u16 | (5 << 4)).to_le_bytes());
        assert_eq!(f.msi_vectors(), 4);
        let ctl = f.cfg.read_u16(cap + 2);
        assert_eq!((ctl >> 4) & 7, 2, "MME reads back as MMC");
    }

    /// Regression: with Bus Master Enable clear a device still sent MSIs. Now the vector waits
    /// in the PBA and goes out when the guest sets BME again.
    #[test]
    fn no_message_while_bus_master_is_clear() {
        let rec = Arc::new(Rec::default());
        let (mut f, _, cap) = func(&rec);
        f.msix_table_write(8, &0x55u32.to_le_bytes());
        f.msix_table_write(12, &0u32.to_le_bytes());
        f.config_write(cap + 2, &msix::CTRL_ENABLE.to_le_bytes());
        f.config_write(reg::COMMAND, &0u16.to_le_bytes());
        assert!(!f.interrupts().bus_master());
        f.trigger(0);
        assert!(rec.0.lock().unwrap().is_empty());
        assert!(f.msix_pending(0));
        f.config_write(reg::COMMAND, &cmd::BUS_MASTER.to_le_bytes());
        assert_eq!(rec.0.lock().unwrap().len(), 1);
        assert!(!f.msix_pending(0));
    }

    /// Regression: a PBA or table access at an offset near 2^64 overflowed.
    #[test]
    fn table_and_pba_offsets_near_the_top_read_all_ones() {
        let rec = Arc::new(Rec::default());
        let (mut f, _, _) = func(&rec);
        let mut b = [0u8; 32];
        f.msix_pba_read(u64::MAX - 16, &mut b);
        assert_eq!(b, [0xff; 32]);
        f.msix_table_read(u64::MAX - 3, &mut b);
        assert_eq!(b, [0xff; 32]);
        f.msix_table_write(u64::MAX - 3, &[1; 16]);
        let mut pba = [0u8; 16];
        f.msix_pba_read(0, &mut pba);
        assert_eq!(pba[..8], [0; 8], "4 vectors, none pending");
        assert_eq!(pba[8..], [0xff; 8], "past the array");
    }

    /// A trigger racing with an unmask delivers exactly once.
    #[test]
    fn concurrent_trigger_and_unmask_deliver_exactly_once() {
        for _ in 0..200 {
            let rec = Arc::new(Rec::default());
            let (mut f, _, cap) = func(&rec);
            f.config_write(cap + 2, &msix::CTRL_ENABLE.to_le_bytes());
            let lines = f.interrupts();
            let t = std::thread::spawn(move || {
                lines.trigger(2);
            });
            f.msix_table_write(2 * 16 + 12, &0u32.to_le_bytes());
            t.join().unwrap();
            assert_eq!(rec.0.lock().unwrap().len(), 1);
        }
    }
}
