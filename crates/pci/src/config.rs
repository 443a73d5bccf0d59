//! PCI configuration space: 4 KiB of registers with per-byte write and write-1-to-clear masks.
//!
//! Read-only, read-write and RW1C behaviour is data, not code: a device declares its header, BARs
//! and capabilities once, and every guest access of any width at any offset is then handled by the
//! same byte loop. BAR sizing falls out of the masks (the low bits of a BAR are not writable).

/// Size of a PCIe function's configuration space.
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Start of the PCIe extended capability area.
pub const EXT_CAP_START: usize = 0x100;

/// Type-0 header register offsets (PCI Local Bus 3.0 §6.1).
pub mod reg {
    pub const VENDOR_ID: usize = 0x00;
    pub const DEVICE_ID: usize = 0x02;
    pub const COMMAND: usize = 0x04;
    pub const STATUS: usize = 0x06;
    pub const REVISION_ID: usize = 0x08;
    pub const PROG_IF: usize = 0x09;
    pub const SUBCLASS: usize = 0x0a;
    pub const CLASS_CODE: usize = 0x0b;
    pub const CACHE_LINE_SIZE: usize = 0x0c;
    pub const LATENCY_TIMER: usize = 0x0d;
    pub const HEADER_TYPE: usize = 0x0e;
    pub const BAR0: usize = 0x10;
    pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
    pub const SUBSYSTEM_ID: usize = 0x2e;
    pub const EXPANSION_ROM: usize = 0x30;
    pub const CAPABILITIES_PTR: usize = 0x34;
    pub const INTERRUPT_LINE: usize = 0x3c;
    pub const INTERRUPT_PIN: usize = 0x3d;
}

/// Command register bits.
pub mod cmd {
    pub const IO_SPACE: u16 = 1 << 0;
    pub const MEMORY_SPACE: u16 = 1 << 1;
    pub const BUS_MASTER: u16 = 1 << 2;
    pub const PARITY_ERROR_RESPONSE: u16 = 1 << 6;
    pub const SERR_ENABLE: u16 = 1 << 8;
    pub const INTX_DISABLE: u16 = 1 << 10;
    /// Bits a type-0 function lets software write.
    pub const WRITABLE: u16 =
        IO_SPACE | MEMORY_SPACE | BUS_MASTER | PARITY_ERROR_RESPONSE | SERR_ENABLE | INTX_DISABLE;
}

/// Status register bits.
pub mod status {
    pub const INTERRUPT: u16 = 1 << 3;
    pub const CAP_LIST: u16 = 1 << 4;
    /// Error bits that are write-1-to-clear.
    pub const RW1C: u16 = (1 << 8) | (1 << 11) | (1 << 12) | (1 << 13) | (1 << 14) | (1 << 15);
}

/// Capability IDs used by rhyve's devices.
pub mod cap_id {
    pub const PM: u8 = 0x01;
    pub const MSI: u8 = 0x05;
    pub const PCIE: u8 = 0x10;
    pub const MSIX: u8 = 0x11;
    pub const SATA: u8 = 0x12;
}

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// I/O space.
    Io,
    /// 32-bit memory space.
    Mem32 {
        /// Prefetchable.
        prefetchable: bool,
    },
    /// 64-bit memory space (uses this BAR and the next).
    Mem64 {
        /// Prefetchable.
        prefetchable: bool,
    },
}

impl BarKind {
    fn type_bits(self) -> u32 {
        match self {
            BarKind::Io => 0x1,
            BarKind::Mem32 { prefetchable } => (prefetchable as u32) << 3,
            BarKind::Mem64 { prefetchable } => 0x4 | ((prefetchable as u32) << 3),
        }
    }
}

/// A function's configuration space.
#[derive(Clone)]
pub struct ConfigSpace {
    data: Vec<u8>,
    wmask: Vec<u8>,
    w1c: Vec<u8>,
    bars: [Option<(BarKind, u64)>; 6],
    last_cap: Option<usize>,
    next_cap: usize,
    last_ext_cap: Option<usize>,
    next_ext_cap: usize,
}

impl std::fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigSpace")
            .field(
                "vendor",
                &format_args!("{:#06x}", self.read_u16(reg::VENDOR_ID)),
            )
            .field(
                "device",
                &format_args!("{:#06x}", self.read_u16(reg::DEVICE_ID)),
            )
            .field("bars", &self.bars)
            .finish()
    }
}

impl ConfigSpace {
    /// A type-0 header with the given IDs and class code (base class, subclass, programming
    /// interface) and revision.
    pub fn new(vendor: u16, device: u16, class: u8, subclass: u8, prog_if: u8, rev: u8) -> Self {
        let mut c = ConfigSpace {
            data: vec![0; CONFIG_SPACE_SIZE],
            wmask: vec![0; CONFIG_SPACE_SIZE],
            w1c: vec![0; CONFIG_SPACE_SIZE],
            bars: [None; 6],
            last_cap: None,
            next_cap: 0x40,
            last_ext_cap: None,
            next_ext_cap: EXT_CAP_START,
        };
        c.write_u16(reg::VENDOR_ID, vendor);
        c.write_u16(reg::DEVICE_ID, device);
        c.data[reg::REVISION_ID] = rev;
        c.data[reg::PROG_IF] = prog_if;
        c.data[reg::SUBCLASS] = subclass;
        c.data[reg::CLASS_CODE] = class;
        c.set_wmask_u16(reg::COMMAND, cmd::WRITABLE);
        c.set_w1c_u16(reg::STATUS, status::RW1C);
        c.wmask[reg::CACHE_LINE_SIZE] = 0xff;
        c.wmask[reg::LATENCY_TIMER] = 0xff;
        c.wmask[reg::INTERRUPT_LINE] = 0xff;
        c
    }

    /// Set the subsystem vendor and subsystem IDs (read-only to the guest).
    pub fn set_subsystem(&mut self, vendor: u16, id: u16) {
        self.write_u16(reg::SUBSYSTEM_VENDOR_ID, vendor);
        self.write_u16(reg::SUBSYSTEM_ID, id);
    }

    /// Set the INTx pin (1 = INTA … 4 = INTD, 0 = none).
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.data[reg::INTERRUPT_PIN] = pin;
    }

    /// The INTx pin (0 = none).
    pub fn interrupt_pin(&self) -> u8 {
        self.data[reg::INTERRUPT_PIN]
    }

    /// Declare BAR `index` of `size` bytes (a power of two; ≥16 for memory, ≥4 for I/O).
    ///
    /// # Panics
    /// On a malformed declaration (device-model bug, never guest input).
    pub fn add_bar(&mut self, index: usize, kind: BarKind, size: u64) {
        assert!(size.is_power_of_two(), "BAR size must be a power of two");
        let is64 = matches!(kind, BarKind::Mem64 { .. });
        assert!(index < 6 && (!is64 || index < 5), "bad BAR index {index}");
        match kind {
            BarKind::Io => assert!((4..=256).contains(&size), "I/O BAR size {size}"),
            BarKind::Mem32 { .. } => assert!((16..=1 << 31).contains(&size), "BAR size {size}"),
            BarKind::Mem64 { .. } => assert!(size >= 16, "BAR size {size}"),
        }
        let off = reg::BAR0 + index * 4;
        let low_mask = if kind == BarKind::Io { !3u32 } else { !0xfu32 };
        let mask = !(size - 1);
        self.write_u32(off, kind.type_bits());
        self.set_wmask_u32(off, (mask as u32) & low_mask);
        if is64 {
            self.write_u32(off + 4, 0);
            self.set_wmask_u32(off + 4, (mask >> 32) as u32);
        }
        self.bars[index] = Some((kind, size));
    }

    /// BAR `index`'s kind and size, if declared (the high half of a 64-bit BAR is not).
    pub fn bar(&self, index: usize) -> Option<(BarKind, u64)> {
        self.bars.get(index).copied().flatten()
    }

    /// The address currently programmed into BAR `index` (without the type bits).
    pub fn bar_address(&self, index: usize) -> u64 {
        let Some((kind, _)) = self.bar(index) else {
            return 0;
        };
        let off = reg::BAR0 + index * 4;
        let low = self.read_u32(off);
        match kind {
            BarKind::Io => u64::from(low & !3),
            BarKind::Mem32 { .. } => u64::from(low & !0xf),
            BarKind::Mem64 { .. } => {
                u64::from(low & !0xf) | (u64::from(self.read_u32(off + 4)) << 32)
            }
        }
    }

    /// Program BAR `index` (used by a VMM that places BARs itself, as firmware would).
    pub fn set_bar_address(&mut self, index: usize, addr: u64) {
        let Some((kind, size)) = self.bar(index) else {
            return;
        };
        let off = reg::BAR0 + index * 4;
        let addr = addr & !(size - 1);
        let low_mask = if kind == BarKind::Io { !3u32 } else { !0xfu32 };
        self.write_u32(off, (addr as u32) & low_mask | kind.type_bits());
        if matches!(kind, BarKind::Mem64 { .. }) {
            self.write_u32(off + 4, (addr >> 32) as u32);
        }
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.read_u16(reg::COMMAND)
    }

    /// Memory space decoding enabled.
    pub fn memory_enabled(&self) -> bool {
        self.command() & cmd::MEMORY_SPACE != 0
    }

    /// I/O space decoding enabled.
    pub fn io_enabled(&self) -> bool {
        self.command() & cmd::IO_SPACE != 0
    }

    /// The function may master the bus (DMA, MSI writes).
    pub fn bus_master(&self) -> bool {
        self.command() & cmd::BUS_MASTER != 0
    }

    /// Reflect the INTx level in the status register (bit 3, read-only to software).
    pub fn set_interrupt_status(&mut self, asserted: bool) {
        let s = self.read_u16(reg::STATUS);
        let s = if asserted {
            s | status::INTERRUPT
        } else {
            s & !status::INTERRUPT
        };
        self.write_u16(reg::STATUS, s);
    }

    /// Append a capability of `len` bytes (including its 2-byte header) to the standard list and
    /// return its offset. The header is read-only; the body starts read-only and zeroed.
    ///
    /// # Panics
    /// If the 256-byte standard area is exhausted (device-model bug).
    pub fn add_capability(&mut self, id: u8, len: usize) -> usize {
        let off = self.next_cap;
        assert!(off + len <= EXT_CAP_START, "out of capability space");
        self.data[off] = id;
        self.data[off + 1] = 0;
        match self.last_cap {
            None => self.data[reg::CAPABILITIES_PTR] = off as u8,
            Some(prev) => self.data[prev + 1] = off as u8,
        }
        self.last_cap = Some(off);
        self.next_cap = (off + len + 3) & !3;
        let s = self.read_u16(reg::STATUS) | status::CAP_LIST;
        self.write_u16(reg::STATUS, s);
        off
    }

    /// Append a PCIe extended capability (`len` includes the 4-byte header) and return its offset.
    pub fn add_ext_capability(&mut self, id: u16, version: u8, len: usize) -> usize {
        let off = self.next_ext_cap;
        assert!(
            off + len <= CONFIG_SPACE_SIZE,
            "out of extended capability space"
        );
        self.write_u32(off, u32::from(id) | (u32::from(version & 0xf) << 16));
        if let Some(prev) = self.last_ext_cap {
            let h = self.read_u32(prev) & 0x000f_ffff;
            self.write_u32(prev, h | ((off as u32) << 20));
        }
        self.last_ext_cap = Some(off);
        self.next_ext_cap = (off + len + 3) & !3;
        off
    }

    /// Guest read of `data.len()` bytes at `offset`; bytes beyond the space read as all-ones.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.data.get(offset + i).copied().unwrap_or(0xff);
        }
    }

    /// Guest write: only writable bits change, RW1C bits clear where a 1 is written.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            let o = offset + i;
            if o >= CONFIG_SPACE_SIZE {
                break;
            }
            let cur = self.data[o];
            let mut new = (cur & !self.wmask[o]) | (v & self.wmask[o]);
            new &= !(v & self.w1c[o]);
            self.data[o] = new;
        }
    }

    /// Device-side read of a byte.
    pub fn read_u8(&self, off: usize) -> u8 {
        self.data[off]
    }
    /// Device-side read of a little-endian word.
    pub fn read_u16(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.data[off], self.data[off + 1]])
    }
    /// Device-side read of a little-endian dword.
    pub fn read_u32(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.data[off..off + 4].try_into().unwrap())
    }
    /// Device-side write of a byte, ignoring masks.
    pub fn write_u8(&mut self, off: usize, v: u8) {
        self.data[off] = v;
    }
    /// Device-side write of a word, ignoring masks.
    pub fn write_u16(&mut self, off: usize, v: u16) {
        self.data[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }
    /// Device-side write of a dword, ignoring masks.
    pub fn write_u32(&mut self, off: usize, v: u32) {
        self.data[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    /// Make bits of a byte guest-writable.
    pub fn set_wmask_u8(&mut self, off: usize, m: u8) {
        self.wmask[off] = m;
    }
    /// All of config space, as a snapshot saves it.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// Put saved bytes back (same length; write masks do not apply: this is the device's own
    /// state returning, not a guest write).
    pub fn restore_bytes(&mut self, b: &[u8]) -> bool {
        if b.len() != self.data.len() {
            return false;
        }
        self.data.copy_from_slice(b);
        true
    }

    /// Make bits of a word guest-writable.
    pub fn set_wmask_u16(&mut self, off: usize, m: u16) {
        self.wmask[off..off + 2].copy_from_slice(&m.to_le_bytes());
    }
    /// Make bits of a dword guest-writable.
    pub fn set_wmask_u32(&mut self, off: usize, m: u32) {
        self.wmask[off..off + 4].copy_from_slice(&m.to_le_bytes());
    }
    /// Make bits of a word write-1-to-clear.
    pub fn set_w1c_u16(&mut self, off: usize, m: u16) {
        self.w1c[off..off + 2].copy_from_slice(&m.to_le_bytes());
    }
    /// Make bits of a dword write-1-to-clear.
    pub fn set_w1c_u32(&mut self, off: usize, m: u32) {
        self.w1c[off..off + 4].copy_from_slice(&m.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd32(c: &ConfigSpace, off: usize) -> u32 {
        let mut b = [0; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn header_ids_are_read_only() {
        let mut c = ConfigSpace::new(0x1b36, 0x0010, 1, 8, 2, 0);
        c.write(0, &[0xff; 4]);
        assert_eq!(rd32(&c, 0), 0x0010_1b36);
        assert_eq!(rd32(&c, 8), 0x0108_0200);
    }

    #[test]
    fn bar_sizing_32_and_64() {
        let mut c = ConfigSpace::new(1, 2, 1, 8, 2, 0);
        c.add_bar(
            0,
            BarKind::Mem64 {
                prefetchable: false,
            },
            0x4000,
        );
        c.add_bar(2, BarKind::Mem32 { prefetchable: true }, 0x1000);
        c.add_bar(4, BarKind::Io, 16);
        for i in 0..6 {
            c.write(0x10 + i * 4, &[0xff; 4]);
        }
        assert_eq!(rd32(&c, 0x10), 0xffff_c004);
        assert_eq!(rd32(&c, 0x14), 0xffff_ffff);
        assert_eq!(rd32(&c, 0x18), 0xffff_f008);
        assert_eq!(rd32(&c, 0x1c), 0);
        assert_eq!(rd32(&c, 0x20), 0xffff_fff1);
        assert_eq!(rd32(&c, 0x24), 0);
        c.write(0x10, &0xfebf_0000u32.to_le_bytes());
        c.write(0x14, &1u32.to_le_bytes());
        assert_eq!(c.bar_address(0), 0x1_febf_0000);
    }

    #[test]
    fn command_and_status_semantics() {
        let mut c = ConfigSpace::new(1, 2, 1, 8, 2, 0);
        c.write(reg::COMMAND, &[0xff, 0xff]);
        assert_eq!(c.command(), cmd::WRITABLE);
        c.write_u16(reg::STATUS, 0x8000 | status::CAP_LIST);
        c.write(reg::STATUS, &[0xff, 0xff]);
        assert_eq!(c.read_u16(reg::STATUS), status::CAP_LIST);
    }

    #[test]
    fn capability_chain_and_out_of_range_reads() {
        let mut c = ConfigSpace::new(1, 2, 1, 8, 2, 0);
        let a = c.add_capability(cap_id::PM, 8);
        let b = c.add_capability(cap_id::MSIX, 12);
        assert_eq!(c.read_u8(reg::CAPABILITIES_PTR) as usize, a);
        assert_eq!(c.read_u8(a + 1) as usize, b);
        assert_eq!(c.read_u8(b + 1), 0);
        let mut d = [0u8; 4];
        c.read(4094, &mut d);
        assert_eq!(d, [0, 0, 0xff, 0xff]);
        c.write(4094, &[1, 2, 3, 4]);
    }
}
