//! PCI config space with MSI and MSI-X: config reads and writes of any width at any offset,
//! MSI-X table and PBA accesses, and interrupts raised on any vector, against a function with
//! a power-management, MSI (up to 8 messages) and MSI-X (up to 64 vectors) capability.
//!
//! Besides no panic and no slow operation, the harness keeps its own model of what the spec
//! allows and checks every message the function delivers against it:
//! * MSI-X: only with MSI-X enabled, the function not masked, the vector not masked and Bus
//!   Master Enable set; the message is the vector's table entry at that moment; a vector raised
//!   while masked is delivered once when unmasked (its PBA bit set meanwhile).
//! * MSI: only with MSI enabled and Bus Master Enable set, to the programmed address, with data
//!   whose low bits select a vector the guest enabled.
//! * Reads of config space never panic and unimplemented bytes of a BAR read as all-ones.

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use pci::config::{BarKind, ConfigSpace};
use pci::function::InterruptMode;
use pci::{caps, InterruptSink, MsiMessage, PciFunction};

/// Table and PBA live in BAR 2; the PBA at this offset.
const TABLE_BAR: u8 = 2;
const PBA_OFFSET: u64 = 0x800;

/// One step.
#[derive(Arbitrary, Debug)]
pub enum Op {
    /// Config write at `off` (0–4095) of 1, 2, 4 or 8 bytes.
    CfgWrite { off: u16, width: u8, value: u64 },
    /// Config read.
    CfgRead { off: u16, width: u8 },
    /// MSI-X table write (offset within the BAR).
    TableWrite { off: u16, width: u8, value: u64 },
    /// MSI-X table or PBA read.
    TableRead { off: u64, width: u8 },
    /// PBA read at any offset, however large.
    PbaRead { off: u64, width: u16 },
    /// The device raises `vector`.
    Trigger { vector: u16 },
    /// The usual driver set-up of MSI-X (enable, program entries, unmask).
    SetupMsix { vectors: u8 },
    /// The usual driver set-up of MSI with 2^`mme` messages.
    SetupMsi { mme: u8 },
}

/// A whole input.
#[derive(Arbitrary, Debug)]
pub struct Input {
    /// log2 of MSI messages offered (0–3).
    msi_log2: u8,
    /// MSI-X table size − 1 (0–63).
    msix_n: u8,
    ops: Vec<Op>,
}

/// Run one input from raw fuzzer bytes.
pub fn run(data: &[u8]) {
    crate::run_with(data, run_input);
}

#[derive(Default)]
struct Sink {
    got: Mutex<Vec<MsiMessage>>,
}

impl InterruptSink for Sink {
    fn msi(&self, msg: MsiMessage) {
        self.got.lock().unwrap_or_else(|e| e.into_inner()).push(msg);
    }
    fn intx(&self, _pin: u8, _asserted: bool) {}
}

fn width(w: u8) -> usize {
    [1, 2, 4, 8][usize::from(w) % 4]
}

struct H {
    f: PciFunction,
    sink: Arc<Sink>,
    msi_cap: usize,
    msix_cap: usize,
    n: usize,
    /// Vectors raised while they could not be delivered (the model's pending bits).
    pending: Vec<bool>,
}

impl H {
    fn cfg_read(&self, off: usize, len: usize) -> u64 {
        let mut b = [0u8; 8];
        crate::timed("config read", || self.f.config_read(off, &mut b[..len]));
        u64::from_le_bytes(b)
    }
    fn cfg_write(&mut self, off: usize, len: usize, v: u64) {
        let f = &mut self.f;
        crate::timed("config write", || {
            f.config_write(off, &v.to_le_bytes()[..len])
        });
    }
    fn table_write(&mut self, off: u64, len: usize, v: u64) {
        let f = &mut self.f;
        crate::timed("table write", || {
            f.msix_table_write(off, &v.to_le_bytes()[..len])
        });
    }
    fn table_read(&self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        crate::timed("table read", || self.f.msix_table_read(off, &mut b[..len]));
        u64::from_le_bytes(b)
    }

    /// Messages delivered since the last look.
    fn take(&self) -> Vec<MsiMessage> {
        std::mem::take(&mut *self.sink.got.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn bme(&self) -> bool {
        self.cfg_read(4, 2) & 0x4 != 0
    }
    fn msix_ctrl(&self) -> u64 {
        self.cfg_read(self.msix_cap + 2, 2)
    }
    fn msix_on(&self) -> bool {
        self.msix_ctrl() & (1 << 15) != 0
    }
    fn msix_fmask(&self) -> bool {
        self.msix_ctrl() & (1 << 14) != 0
    }
    fn entry(&self, v: usize) -> (MsiMessage, bool) {
        let b = v as u64 * 16;
        let addr = self.table_read(b, 4) | (self.table_read(b + 4, 4) << 32);
        let data = self.table_read(b + 8, 4) as u32;
        let masked = self.table_read(b + 12, 4) & 1 != 0;
        (MsiMessage { addr, data }, masked)
    }
    fn msi_ctrl(&self) -> u64 {
        self.cfg_read(self.msi_cap + 2, 2)
    }

    /// After any change: vectors the model holds pending and that may now be delivered must
    /// have been, once each, with their current table entry; nothing else.
    fn check_release(&mut self) {
        let before = self.pending.clone();
        let got = self.take();
        let mut expect = Vec::new();
        if self.f.mode() == InterruptMode::MsiX
            && self.msix_on()
            && !self.msix_fmask()
            && self.bme()
        {
            for (v, &was) in before.iter().enumerate() {
                if was && !self.entry(v).1 {
                    expect.push(self.entry(v).0);
                    self.pending[v] = false;
                }
            }
        }
        if self.f.mode() == InterruptMode::Msi && self.bme() {
            // MSI pending messages (masked by the per-vector mask) are the function's business;
            // whatever comes must be a valid MSI message.
            for m in &got {
                self.check_msi(m);
            }
            return;
        }
        let mut g = got.clone();
        let mut e = expect.clone();
        g.sort_by_key(|m| (m.addr, m.data));
        e.sort_by_key(|m| (m.addr, m.data));
        assert_eq!(g, e, "messages released by a configuration change");
    }

    fn check_msi(&self, m: &MsiMessage) {
        let c = self.msi_ctrl();
        let wide = c & (1 << 7) != 0;
        let lo = self.cfg_read(self.msi_cap + 4, 4);
        let (addr, data_off) = if wide {
            (lo | (self.cfg_read(self.msi_cap + 8, 4) << 32), 12)
        } else {
            (lo, 8)
        };
        let data = self.cfg_read(self.msi_cap + data_off, 2) as u32;
        let mme = (c >> 4) & 7;
        let enabled = 1u32 << mme.min(5);
        assert_eq!(m.addr, addr, "MSI to the programmed address");
        let low = enabled - 1;
        assert_eq!(
            m.data & !low,
            data & !low,
            "MSI data {:#x} vs programmed {data:#x}",
            m.data
        );
    }

    fn trigger(&mut self, vector: u16) {
        let mode = self.f.mode();
        let before_bme = self.bme();
        crate::timed("trigger", || self.f.trigger(vector));
        let got = self.take();
        match mode {
            InterruptMode::MsiX => {
                let v = usize::from(vector);
                if v >= self.n {
                    assert!(got.is_empty(), "a message for vector {v} beyond the table");
                    return;
                }
                let (msg, masked) = self.entry(v);
                let deliverable = self.msix_on() && !self.msix_fmask() && !masked && before_bme;
                if deliverable {
                    assert_eq!(got, vec![msg], "MSI-X vector {v} delivered as its entry");
                } else {
                    assert!(got.is_empty(), "MSI-X vector {v} delivered while blocked");
                    self.pending[v] = true;
                }
            }
            InterruptMode::Msi => {
                assert!(got.len() <= 1, "one MSI per trigger");
                if !before_bme {
                    assert!(got.is_empty(), "MSI without Bus Master Enable");
                }
                for m in &got {
                    self.check_msi(m);
                }
            }
            InterruptMode::Intx => assert!(got.is_empty(), "MSI in INTx mode"),
        }
    }

    fn step(&mut self, op: &Op) {
        match op {
            Op::CfgWrite {
                off,
                width: w,
                value,
            } => {
                let len = width(*w);
                let off = usize::from(*off) % 4096;
                if off + len <= 4096 {
                    self.cfg_write(off, len, *value);
                }
            }
            Op::CfgRead { off, width: w } => {
                let len = width(*w);
                let off = usize::from(*off) % 4096;
                if off + len <= 4096 {
                    self.cfg_read(off, len);
                }
            }
            Op::TableWrite {
                off,
                width: w,
                value,
            } => self.table_write(u64::from(*off) % PBA_OFFSET, width(*w), *value),
            Op::TableRead { off, width: w } => {
                self.table_read(*off, width(*w));
            }
            Op::PbaRead { off, width: w } => {
                let mut b = vec![0u8; usize::from(*w % 4096)];
                crate::timed("PBA read", || self.f.msix_pba_read(*off, &mut b));
                for v in 0..self.n {
                    let (byte, bit) = (v / 8, v % 8);
                    let at = (byte as u64).checked_sub(*off);
                    if let Some(i) = at.filter(|&i| (i as usize) < b.len()) {
                        // A pending bit is set exactly for vectors raised while blocked.
                        let set = b[i as usize] & (1 << bit) != 0;
                        if self.f.mode() == InterruptMode::MsiX {
                            assert_eq!(set, self.pending[v], "PBA bit of vector {v}");
                        }
                    }
                }
            }
            Op::Trigger { vector } => self.trigger(*vector),
            Op::SetupMsix { vectors } => {
                self.cfg_write(4, 2, 0x6);
                // Bus mastering may release what was pending in the current mode.
                self.check_release();
                let n = (usize::from(*vectors) % self.n.max(1)) + 1;
                for v in 0..n.min(self.n) {
                    let b = v as u64 * 16;
                    self.table_write(b, 4, 0xfee0_0000);
                    self.table_write(b + 4, 4, 0);
                    self.table_write(b + 8, 4, v as u64);
                    self.table_write(b + 12, 4, 0);
                }
                self.cfg_write(self.msix_cap + 2, 2, 1 << 15);
            }
            Op::SetupMsi { mme } => {
                self.cfg_write(4, 2, 0x6);
                self.check_release();
                self.cfg_write(self.msi_cap + 4, 4, 0xfee0_0000);
                self.cfg_write(self.msi_cap + 12, 2, 0x40);
                self.cfg_write(self.msi_cap + 2, 2, 1 | (u64::from(*mme % 8) << 4));
            }
        }
        if !matches!(op, Op::Trigger { .. }) {
            self.check_release();
        }
        if self.f.mode() != InterruptMode::MsiX {
            // Pending MSI-X state is kept by the function only while MSI-X is the mode.
            for v in 0..self.n {
                if !self.f.msix_pending(v) {
                    self.pending[v] = false;
                }
            }
        }
    }
}

/// Run one structured input.
pub fn run_input(input: &Input) {
    let mut cs = ConfigSpace::new(0x1b36, 0x0010, 0x01, 0x08, 0x02, 0);
    cs.add_bar(
        0,
        BarKind::Mem64 {
            prefetchable: false,
        },
        0x4000,
    );
    cs.add_bar(
        usize::from(TABLE_BAR),
        BarKind::Mem32 {
            prefetchable: false,
        },
        0x1000,
    );
    caps::add_pm(&mut cs);
    let msi_cap = caps::add_msi(&mut cs, input.msi_log2 % 4);
    let n = usize::from(input.msix_n % 64) + 1;
    let msix_cap = caps::add_msix(
        &mut cs,
        n as u16,
        TABLE_BAR,
        0,
        TABLE_BAR,
        PBA_OFFSET as u32,
    );
    let sink = Arc::new(Sink::default());
    let f = PciFunction::new(cs, Some(msi_cap), Some(msix_cap), sink.clone());
    let mut h = H {
        f,
        sink,
        msi_cap,
        msix_cap,
        n,
        pending: vec![false; n],
    };
    for op in input.ops.iter().take(512) {
        h.step(op);
    }
}
