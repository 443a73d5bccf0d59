//! A PCI function's interrupt-bearing state: config space plus MSI, MSI-X and INTx delivery.
//!
//! Devices call [`PciFunction::trigger`] with a vector number and this module decides, from what
//! the guest enabled, whether that becomes an MSI-X message, an MSI message, or nothing (INTx is
//! level-triggered and driven by the device through [`PciFunction::set_intx`]). Masked vectors set
//! their pending bit and are delivered when the guest unmasks them, as PCI 3.0 §6.8 requires.

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

#[derive(Clone, Copy, Debug, Default)]
struct MsixEntry {
    addr: u64,
    data: u32,
    ctrl: u32,
}

struct Msix {
    cap: usize,
    entries: Vec<MsixEntry>,
    pending: Vec<u64>,
}

/// Config space + interrupt delivery for one function.
pub struct PciFunction {
    /// The configuration space (devices may read and program it directly).
    pub cfg: ConfigSpace,
    msi_cap: Option<usize>,
    msix: Option<Msix>,
    irq: Arc<dyn InterruptSink>,
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

impl PciFunction {
    /// Wrap a config space whose capabilities are already built. `msi_cap` / `msix_cap` are the
    /// offsets returned by [`crate::caps::add_msi`] / [`crate::caps::add_msix`].
    pub fn new(
        cfg: ConfigSpace,
        msi_cap: Option<usize>,
        msix_cap: Option<usize>,
        irq: Arc<dyn InterruptSink>,
    ) -> Self {
        let msix = msix_cap.map(|cap| {
            let n = usize::from(cfg.read_u16(cap + msix::CONTROL) & 0x7ff) + 1;
            Msix {
                cap,
                entries: vec![
                    MsixEntry {
                        ctrl: msix::VECTOR_MASKED,
                        ..Default::default()
                    };
                    n
                ],
                pending: vec![0; n.div_ceil(64)],
            }
        });
        PciFunction {
            cfg,
            msi_cap,
            msix,
            irq,
            intx_level: false,
            intx_sent: false,
        }
    }

    /// Replace the interrupt sink (a frontend attaching after construction).
    pub fn set_sink(&mut self, irq: Arc<dyn InterruptSink>) {
        self.irq = irq;
    }

    /// Number of MSI-X vectors (0 without MSI-X).
    pub fn msix_vectors(&self) -> usize {
        self.msix.as_ref().map_or(0, |m| m.entries.len())
    }

    /// Number of MSI messages the guest enabled (0 when MSI is off).
    pub fn msi_vectors(&self) -> usize {
        match self.msi_cap {
            Some(c) if self.cfg.read_u16(c + msi::CONTROL) & msi::CTRL_ENABLE != 0 => {
                1 << ((self.cfg.read_u16(c + msi::CONTROL) >> msi::CTRL_MME_SHIFT) & 7).min(5)
            }
            _ => 0,
        }
    }

    /// The mechanism in force now.
    pub fn mode(&self) -> InterruptMode {
        if let Some(m) = &self.msix {
            if self.cfg.read_u16(m.cap + msix::CONTROL) & msix::CTRL_ENABLE != 0 {
                return InterruptMode::MsiX;
            }
        }
        if self.msi_vectors() > 0 {
            return InterruptMode::Msi;
        }
        InterruptMode::Intx
    }

    /// Guest config-space read.
    pub fn config_read(&self, offset: usize, data: &mut [u8]) {
        self.cfg.read(offset, data);
    }

    /// Guest config-space write; unmasking delivers pending messages, and INTx follows the
    /// command register's Interrupt Disable bit.
    pub fn config_write(&mut self, offset: usize, data: &[u8]) {
        let end = offset + data.len();
        let touches = |start: usize, len: usize| offset < start + len && end > start;
        self.cfg.write(offset, data);
        if touches(reg::COMMAND, 2) {
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
                    self.msix_deliver_if_pending(v);
                    self.msix_route(v);
                }
            }
        }
    }

    fn msi_changed(&mut self, c: usize) {
        let n = self.msi_vectors();
        self.update_intx();
        let mask = self.cfg.read_u32(c + msi::MASK);
        let mut pending = self.cfg.read_u32(c + msi::PENDING);
        for v in 0..32 {
            let bit = 1u32 << v;
            let routed = (v as usize) < n && mask & bit == 0;
            self.irq
                .route_changed(v as u16, routed.then(|| self.msi_message(c, v)));
            if pending & bit != 0 && routed {
                pending &= !bit;
                self.irq.msi(self.msi_message(c, v));
            }
        }
        self.cfg.write_u32(c + msi::PENDING, pending);
    }

    fn msi_message(&self, c: usize, vector: u32) -> MsiMessage {
        let addr = u64::from(self.cfg.read_u32(c + msi::ADDR_LO))
            | (u64::from(self.cfg.read_u32(c + msi::ADDR_HI)) << 32);
        let n = self.msi_vectors().max(1) as u32;
        let data = u32::from(self.cfg.read_u16(c + msi::DATA));
        MsiMessage {
            addr,
            data: (data & !(n - 1)) | (vector & (n - 1)),
        }
    }

    /// Raise interrupt `vector` (an MSI-X table index or MSI message number). Returns false when
    /// the function is in INTx mode, in which case the device drives INTx itself.
    pub fn trigger(&mut self, vector: u16) -> bool {
        match self.mode() {
            InterruptMode::MsiX => {
                let v = usize::from(vector);
                let Some(m) = self.msix.as_mut() else {
                    return true;
                };
                if v >= m.entries.len() {
                    log::warn!("MSI-X vector {v} beyond table size {}", m.entries.len());
                    return true;
                }
                m.pending[v / 64] |= 1 << (v % 64);
                self.msix_deliver_if_pending(v);
                true
            }
            InterruptMode::Msi => {
                let c = self.msi_cap.expect("MSI mode without MSI capability");
                let v = u32::from(vector) % self.msi_vectors() as u32;
                if self.cfg.read_u32(c + msi::MASK) & (1 << v) != 0 {
                    let p = self.cfg.read_u32(c + msi::PENDING);
                    self.cfg.write_u32(c + msi::PENDING, p | (1 << v));
                } else {
                    self.irq.msi(self.msi_message(c, v));
                }
                true
            }
            InterruptMode::Intx => false,
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
            self.irq.intx(pin, out);
        }
    }

    fn msix_function_masked(&self) -> bool {
        self.msix.as_ref().is_none_or(|m| {
            let ctrl = self.cfg.read_u16(m.cap + msix::CONTROL);
            ctrl & msix::CTRL_ENABLE == 0 || ctrl & msix::CTRL_FUNCTION_MASK != 0
        })
    }

    fn msix_deliver_if_pending(&mut self, v: usize) {
        let fmask = self.msix_function_masked();
        let Some(m) = self.msix.as_mut() else { return };
        let e = m.entries[v];
        if m.pending[v / 64] & (1 << (v % 64)) == 0 || fmask || e.ctrl & msix::VECTOR_MASKED != 0 {
            return;
        }
        m.pending[v / 64] &= !(1 << (v % 64));
        self.irq.msi(MsiMessage {
            addr: e.addr,
            data: e.data,
        });
    }

    fn msix_route(&self, v: usize) {
        let Some(m) = self.msix.as_ref() else { return };
        let e = m.entries[v];
        let live = !self.msix_function_masked() && e.ctrl & msix::VECTOR_MASKED == 0;
        self.irq.route_changed(
            v as u16,
            live.then_some(MsiMessage {
                addr: e.addr,
                data: e.data,
            }),
        );
    }

    /// Guest read of the MSI-X table at `offset` (relative to the table start). Any width.
    pub fn msix_table_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.msix_table_byte(offset + i as u64).unwrap_or(0xff);
        }
    }

    fn msix_table_byte(&self, off: u64) -> Option<u8> {
        let m = self.msix.as_ref()?;
        let idx = usize::try_from(off / msix::ENTRY_SIZE as u64).ok()?;
        let e = m.entries.get(idx)?;
        let within = (off % msix::ENTRY_SIZE as u64) as usize;
        let words = [e.addr as u32, (e.addr >> 32) as u32, e.data, e.ctrl];
        Some(words[within / 4].to_le_bytes()[within % 4])
    }

    /// Guest write to the MSI-X table. Unmasking a vector with its pending bit set delivers it.
    pub fn msix_table_write(&mut self, offset: u64, data: &[u8]) {
        let mut touched = Vec::new();
        for (i, &b) in data.iter().enumerate() {
            let off = offset + i as u64;
            let Some(m) = self.msix.as_mut() else { return };
            let Ok(idx) = usize::try_from(off / msix::ENTRY_SIZE as u64) else {
                continue;
            };
            let Some(e) = m.entries.get_mut(idx) else {
                continue;
            };
            let within = (off % msix::ENTRY_SIZE as u64) as usize;
            let (word, byte) = (within / 4, (within % 4) * 8);
            let set = |w: u32| (w & !(0xff << byte)) | (u32::from(b) << byte);
            match word {
                0 => e.addr = (e.addr & !0xffff_ffff) | u64::from(set(e.addr as u32) & !3),
                1 => {
                    e.addr = (e.addr & 0xffff_ffff) | (u64::from(set((e.addr >> 32) as u32)) << 32)
                }
                2 => e.data = set(e.data),
                _ => e.ctrl = set(e.ctrl) & msix::VECTOR_MASKED,
            }
            if touched.last() != Some(&idx) {
                touched.push(idx);
            }
        }
        for idx in touched {
            self.msix_deliver_if_pending(idx);
            self.msix_route(idx);
        }
    }

    /// Guest read of the Pending Bit Array at `offset` (relative to the PBA start).
    pub fn msix_pba_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let off = offset + i as u64;
            *b = self
                .msix
                .as_ref()
                .and_then(|m| m.pending.get(usize::try_from(off / 8).ok()?))
                .map_or(0xff, |q| q.to_le_bytes()[(off % 8) as usize]);
        }
    }

    /// True if MSI-X vector `v` is pending (for tests and stats).
    pub fn msix_pending(&self, v: usize) -> bool {
        self.msix.as_ref().is_some_and(|m| {
            m.pending
                .get(v / 64)
                .is_some_and(|q| q & (1 << (v % 64)) != 0)
        })
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
        (
            PciFunction::new(cfg, Some(msi), Some(msix), rec.clone()),
            msi,
            msix,
        )
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
        f.config_write(cap + msi::MASK, &0u32.to_le_bytes());
        assert_eq!(
            rec.0.lock().unwrap()[1],
            MsiMessage {
                addr: 0xfee0_1000,
                data: 0x61
            }
        );
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
}
