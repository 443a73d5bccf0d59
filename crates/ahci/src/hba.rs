//! The HBA: generic host control registers (AHCI 1.3.1 §3.1), HBA reset, and interrupt
//! aggregation from ports to MSI or INTx.
//!
//! Interrupts follow §10.6: a port's bit in IS is set while any of its enabled PxIS bits is set,
//! and each 0→1 transition of such a bit sends an MSI message (the port's own vector when the
//! guest granted one per port, otherwise vector 0). INTx is a level: asserted while GHC.IE is
//! set and IS is non-zero. Recomputing after every IS/PxIS write re-raises a port whose
//! condition is still pending, so no completion is ever lost between the two clears.
//!
//! The HBA never holds a port's lock: which ports have interrupt conditions arrives as a bit
//! mask the ports keep current ([`crate::Shared::pending`]).

use std::sync::Mutex;

use pci::{InterruptMode, Interrupts, PciFunction};

use crate::regs::{cap, ghc, hba as reg};

/// HBA global state.
#[derive(Debug)]
pub struct Hba {
    /// CAP (fixed at creation).
    pub cap: u32,
    /// GHC bits IE (AE is fixed; HR and MRSM are derived).
    pub ghc: u32,
    /// IS.
    pub is: u32,
    /// Number of ports.
    pub nports: usize,
    /// GHC.HR: a reset waits for in-flight jobs before the links come up again.
    pub reset_pending: bool,
    /// Current INTx level.
    pub intx: bool,
    /// Interrupt messages sent plus INTx assertions.
    pub interrupts: u64,
}

/// Number of command slots per port.
pub const SLOTS: u32 = 32;

/// What a global register write asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalEffects {
    /// GHC.HR was written: reset the HBA.
    pub reset: bool,
}

impl Hba {
    /// An HBA with `nports` ports, just out of reset.
    pub fn new(nports: usize) -> Self {
        let np = nports as u32;
        let cap = cap::S64A
            | cap::SNCQ
            | cap::SSNTF
            | cap::SALP
            | cap::SAL
            | cap::SCLO
            | (cap::ISS_GEN3 << cap::ISS_SHIFT)
            | cap::SAM
            | cap::PMD
            | cap::SSC
            | cap::PSC
            | ((SLOTS - 1) << cap::NCS_SHIFT)
            | ((np - 1) & cap::NP_MASK);
        Hba {
            cap,
            ghc: 0,
            is: 0,
            nports,
            reset_pending: false,
            intx: false,
            interrupts: 0,
        }
    }

    /// Interface speed the links train to.
    pub fn iss(&self) -> u32 {
        (self.cap >> cap::ISS_SHIFT) & 0xf
    }

    /// Ports Implemented.
    pub fn pi(&self) -> u32 {
        ((1u64 << self.nports) - 1) as u32
    }

    /// The guest granted one MSI vector per port.
    fn per_port_vectors(&self, irq: &Interrupts) -> bool {
        irq.mode() == InterruptMode::Msi && irq.msi_vectors() >= self.nports
    }

    /// GHC.MRSM: more than one but fewer than needed vectors were granted, so the HBA reverted
    /// to a single message.
    fn mrsm(&self, irq: &Interrupts) -> bool {
        irq.mode() == InterruptMode::Msi && irq.msi_vectors() > 1 && irq.msi_vectors() < self.nports
    }

    /// Read the global register at `off` (below the port blocks).
    pub fn read_global(&self, off: u64, irq: &Interrupts) -> u32 {
        match off {
            reg::CAP => self.cap,
            reg::GHC => {
                let mut v = ghc::AE | (self.ghc & ghc::IE);
                if self.reset_pending {
                    v |= ghc::HR;
                }
                if self.mrsm(irq) {
                    v |= ghc::MRSM;
                }
                v
            }
            reg::IS => self.is,
            reg::PI => self.pi(),
            reg::VS => reg::VERSION_1_3_1,
            _ => 0, // CCC, EM, CAP2 (no extended capabilities), BOHC, reserved
        }
    }

    /// Global register write; `pending` is the ports' interrupt-condition mask.
    pub fn write_global(
        &mut self,
        off: u64,
        val: u32,
        mask: u32,
        pending: u32,
        irq: &Interrupts,
        func: &Mutex<PciFunction>,
    ) -> GlobalEffects {
        let v = val & mask;
        match off {
            reg::GHC => {
                if v & ghc::HR != 0 {
                    return GlobalEffects { reset: true };
                }
                let was = self.ghc & ghc::IE != 0;
                self.ghc = (self.ghc & !mask) | (v & ghc::IE);
                if !was && self.ghc & ghc::IE != 0 && self.is != 0 {
                    // Conditions that arrived while interrupts were off are signalled now.
                    let bits = self.is;
                    self.send(irq, bits);
                }
                self.update_irq(pending, irq, func);
            }
            reg::IS => {
                self.is &= !v;
                self.update_irq(pending, irq, func);
            }
            _ => {}
        }
        GlobalEffects::default()
    }

    /// Send interrupt messages for the ports in `bits` that just became pending.
    fn send(&mut self, irq: &Interrupts, bits: u32) {
        match irq.mode() {
            InterruptMode::Intx => {}
            _ if self.per_port_vectors(irq) => {
                for p in 0..self.nports {
                    if bits & (1 << p) != 0 && irq.trigger(p as u16) {
                        self.interrupts = self.interrupts.wrapping_add(1);
                    }
                }
            }
            _ => {
                if irq.trigger(0) {
                    self.interrupts = self.interrupts.wrapping_add(1);
                }
            }
        }
    }

    /// Fold the ports' conditions (`pending`) into IS, signal new ones, and drive INTx.
    pub fn update_irq(&mut self, pending: u32, irq: &Interrupts, func: &Mutex<PciFunction>) {
        let newly = pending & !self.is;
        self.is |= newly;
        let enabled = self.ghc & ghc::IE != 0;
        if enabled && newly != 0 {
            self.send(irq, newly);
        }
        let level = enabled && self.is != 0;
        if level != self.intx {
            self.intx = level;
            let mut f = lock(func);
            f.set_intx(level);
            if level && f.mode() == InterruptMode::Intx && f.cfg.interrupt_pin() != 0 {
                self.interrupts = self.interrupts.wrapping_add(1);
            }
        }
    }
}

/// Lock a mutex, recovering the data if a panicking thread poisoned it (device state stays
/// consistent because every critical section leaves it valid).
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
