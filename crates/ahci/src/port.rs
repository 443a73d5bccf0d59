//! One AHCI port: its registers (AHCI 1.3.1 §3.3), the link and DMA-engine state machines that
//! the registers drive, and posting of received FISes into the guest's FIS area.
//!
//! Register writes that start work (PxCI, PxCMD.ST) only record state here; the HBA then asks
//! [`crate::slot`] to fetch commands. In-flight commands are tracked by count and by a
//! generation number: stopping the port, COMRESET and HBA reset bump the generation, so a job
//! that finishes later writes nothing into a command list or FIS area the guest has torn down,
//! and PxCMD.CR stays set until the last such job has finished.

use std::sync::Arc;

use zerocopy::IntoBytes;

use crate::drive::{DriveInfo, DriveState};
use crate::fis::{rx, TaskFile};
use crate::prdt::{write_guest, GuestFault, Mem};
use crate::regs::{cap, port as reg, pxcmd, pxis, sctl, serr, ssts, tfd};
use crate::reply;
use crate::spec::status;

/// PxTFD while the device is resetting: BSY.
const TFD_RESETTING: u32 = status::BSY as u32;

/// A port and the device attached to it.
#[derive(Debug)]
pub struct Port {
    /// The attached drive.
    pub info: Arc<DriveInfo>,
    /// The drive's mutable settings.
    pub dev: DriveState,
    /// Command list base (PxCLB/PxCLBU).
    pub clb: u64,
    /// Received-FIS base (PxFB/PxFBU).
    pub fb: u64,
    /// PxIS without the bits mirrored from PxSERR.
    pub is: u32,
    /// PxIE.
    pub ie: u32,
    /// Software-owned PxCMD bits (ST, FRE and the plain read/write ones).
    pub cmd: u32,
    /// PxCMD.CCS.
    pub ccs: u8,
    /// PxTFD.
    pub tfd: u32,
    /// PxSIG.
    pub sig: u32,
    /// PxSSTS.
    pub ssts: u32,
    /// PxSCTL.
    pub sctl: u32,
    /// PxSERR.
    pub serr: u32,
    /// PxSACT.
    pub sact: u32,
    /// PxCI.
    pub ci: u32,
    /// PxSNTF.
    pub sntf: u32,
    /// Bumped whenever in-flight commands are abandoned (stop, COMRESET, HBA reset).
    pub generation: u64,
    /// Jobs submitted and not yet completed (of any generation).
    pub in_flight: u32,
    /// Slot of the running non-queued command.
    pub nonqueued: Option<u8>,
    /// Slots of running queued commands.
    pub queued: u32,
    /// A fatal error stopped command processing until PxCMD.ST is cleared.
    pub halted: bool,
    /// The link comes up (signature FIS) once no job is in flight.
    pub link_pending: bool,
    /// Where the round-robin search for the next command slot starts.
    pub next_slot: u8,
}

/// What a register write asks the HBA to do next.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// Fetch commands (PxCI set, or the engine started).
    pub kick: bool,
    /// Bring the link up if nothing is in flight (COMRESET released).
    pub settle: bool,
}

impl Port {
    /// A port with `info` attached, in its post-reset state with the link still to come up.
    pub fn new(info: Arc<DriveInfo>) -> Self {
        let dev = DriveState::new(&info);
        Port {
            info,
            dev,
            clb: 0,
            fb: 0,
            is: 0,
            ie: 0,
            cmd: 0,
            ccs: 0,
            tfd: TFD_RESETTING,
            sig: u32::MAX,
            ssts: 0,
            sctl: 0,
            serr: 0,
            sact: 0,
            ci: 0,
            sntf: 0,
            generation: 0,
            in_flight: 0,
            nonqueued: None,
            queued: 0,
            halted: false,
            link_pending: true,
            next_slot: 0,
        }
    }

    /// PxIS as software reads it: PCS and PRCS mirror PxSERR.DIAG.X and DIAG.N.
    pub fn is_value(&self) -> u32 {
        let mut v = self.is;
        if self.serr & serr::DIAG_X != 0 {
            v |= pxis::PCS;
        }
        if self.serr & serr::DIAG_N != 0 {
            v |= pxis::PRCS;
        }
        v
    }

    /// Interrupt conditions that are both pending and enabled.
    pub fn pending_irq(&self) -> u32 {
        self.is_value() & self.ie
    }

    /// PxCMD.CR: the command list engine runs while ST is set and until abandoned jobs finish.
    pub fn cr(&self) -> bool {
        self.cmd & pxcmd::ST != 0 || self.in_flight > 0
    }

    /// The link is up and the device ready for commands.
    pub fn link_up(&self) -> bool {
        !self.link_pending && self.ssts & 0xf == ssts::DET_PRESENT
    }

    /// PxCMD as software reads it.
    pub fn cmd_value(&self) -> u32 {
        let mut v = self.cmd | pxcmd::SUD | pxcmd::POD | (u32::from(self.ccs) << pxcmd::CCS_SHIFT);
        if self.cmd & pxcmd::FRE != 0 {
            v |= pxcmd::FR;
        }
        if self.cr() {
            v |= pxcmd::CR;
        }
        v
    }

    /// Register read at `off` within the port block.
    pub fn read(&self, off: u64) -> u32 {
        match off {
            reg::CLB => self.clb as u32,
            reg::CLBU => (self.clb >> 32) as u32,
            reg::FB => self.fb as u32,
            reg::FBU => (self.fb >> 32) as u32,
            reg::IS => self.is_value(),
            reg::IE => self.ie,
            reg::CMD => self.cmd_value(),
            reg::TFD => self.tfd,
            reg::SIG => self.sig,
            reg::SSTS => self.ssts,
            reg::SCTL => self.sctl,
            reg::SERR => self.serr,
            reg::SACT => self.sact,
            reg::CI => self.ci,
            reg::SNTF => self.sntf,
            _ => 0, // FBS, DEVSLP, reserved, vendor specific
        }
    }

    /// Register write at `off`: `mask` marks the bits the guest wrote (sub-dword writes leave
    /// the others alone, and write-1-to-clear/set registers treat them as zero).
    pub fn write(&mut self, off: u64, val: u32, mask: u32, hba_cap: u32) -> Effects {
        let v = val & mask;
        let merge = |old: u32| (old & !mask) | v;
        let mut fx = Effects::default();
        match off {
            // The command list may not move while the engine runs, nor the FIS area while FIS
            // reception is on (AHCI 1.3.1 §3.3.1, §3.3.3).
            reg::CLB if !self.cr() => {
                self.clb =
                    (self.clb & !0xffff_ffff) | u64::from(merge(self.clb as u32) & reg::CLB_MASK)
            }
            reg::CLBU if !self.cr() => {
                self.clb =
                    (self.clb & 0xffff_ffff) | (u64::from(merge((self.clb >> 32) as u32)) << 32)
            }
            reg::FB if self.cmd & pxcmd::FRE == 0 => {
                self.fb = (self.fb & !0xffff_ffff) | u64::from(merge(self.fb as u32) & reg::FB_MASK)
            }
            reg::FBU if self.cmd & pxcmd::FRE == 0 => {
                self.fb = (self.fb & 0xffff_ffff) | (u64::from(merge((self.fb >> 32) as u32)) << 32)
            }
            reg::IS => self.is &= !(v & pxis::RW1C),
            reg::IE => self.ie = merge(self.ie) & pxis::IE_MASK,
            reg::CMD => fx = self.write_cmd(merge(self.cmd_value()), hba_cap),
            reg::SCTL => fx = self.write_sctl(merge(self.sctl) & sctl::WRITABLE),
            reg::SERR => self.serr &= !(v & serr::ALL),
            reg::SACT if self.cmd & pxcmd::ST != 0 => self.sact |= v,
            reg::CI if self.cmd & pxcmd::ST != 0 => {
                self.ci |= v;
                fx.kick = v != 0;
            }
            reg::SNTF => self.sntf &= !(v & 0xffff),
            _ => {} // read-only, reserved, or refused in the current state
        }
        fx
    }

    fn write_cmd(&mut self, new: u32, hba_cap: u32) -> Effects {
        let mut fx = Effects::default();
        let old = self.cmd;
        let mut rw = pxcmd::ATAPI | pxcmd::DLAE;
        if hba_cap & cap::SALP != 0 {
            rw |= pxcmd::ALPE | pxcmd::ASP;
        }
        self.cmd = (self.cmd & !(rw | pxcmd::FRE)) | (new & (rw | pxcmd::FRE));
        // Command List Override clears BSY and DRQ so a wedged device can be reset; it is only
        // honoured while the engine is stopped and reads back as zero.
        if new & pxcmd::CLO != 0 && old & pxcmd::ST == 0 {
            self.tfd &= !u32::from(status::BSY | status::DRQ);
        }
        self.interface_control((new >> pxcmd::ICC_SHIFT) & 0xf, hba_cap);
        match (old & pxcmd::ST != 0, new & pxcmd::ST != 0) {
            (false, true) => {
                self.cmd |= pxcmd::ST;
                self.ccs = 0;
                self.next_slot = 0;
                self.halted = false;
                fx.kick = true;
            }
            (true, false) => {
                self.cmd &= !pxcmd::ST;
                self.abandon();
            }
            _ => {}
        }
        fx
    }

    /// PxCMD.ICC: host-initiated link power state changes (the field always reads back 0).
    fn interface_control(&mut self, icc: u32, hba_cap: u32) {
        if !self.link_up() {
            return;
        }
        let allowed = (self.sctl >> sctl::IPM_SHIFT) & 0xf;
        let ipm = match icc {
            pxcmd::ICC_ACTIVE => ssts::IPM_ACTIVE,
            pxcmd::ICC_PARTIAL
                if hba_cap & cap::PSC != 0 && allowed & sctl::IPM_NO_PARTIAL == 0 =>
            {
                ssts::IPM_PARTIAL
            }
            pxcmd::ICC_SLUMBER
                if hba_cap & cap::SSC != 0 && allowed & sctl::IPM_NO_SLUMBER == 0 =>
            {
                ssts::IPM_SLUMBER
            }
            _ => return, // idle/no-op, DevSleep (not offered), reserved, or refused by PxSCTL.IPM
        };
        self.set_ipm(ipm);
    }

    /// Set the interface power state reported in PxSSTS.IPM.
    pub fn set_ipm(&mut self, ipm: u32) {
        self.ssts = (self.ssts & !(0xf << ssts::IPM_SHIFT)) | (ipm << ssts::IPM_SHIFT);
    }

    fn write_sctl(&mut self, new: u32) -> Effects {
        let old_det = self.sctl & sctl::DET_MASK;
        let det = new & sctl::DET_MASK;
        self.sctl = new;
        match (old_det, det) {
            (o, sctl::DET_COMRESET) if o != sctl::DET_COMRESET => {
                // COMRESET asserted: the link drops and the device resets; whatever was in
                // flight is abandoned.
                self.abandon();
                self.link_pending = false;
                self.ssts = ssts::DET_NONE;
                self.tfd = TFD_RESETTING;
                self.dev.reset();
            }
            (o, sctl::DET_DISABLE) if o != sctl::DET_DISABLE => {
                self.abandon();
                self.link_pending = false;
                self.ssts = ssts::DET_OFFLINE;
            }
            (sctl::DET_COMRESET | sctl::DET_DISABLE, sctl::DET_NONE) => {
                self.link_pending = true;
                return Effects {
                    settle: true,
                    ..Default::default()
                };
            }
            _ => {}
        }
        Effects::default()
    }

    /// Forget all issued commands: they will never complete into guest memory.
    pub fn abandon(&mut self) {
        self.generation = self.generation.wrapping_add(1);
        self.ci = 0;
        self.sact = 0;
        self.ccs = 0;
        self.queued = 0;
        self.nonqueued = None;
        self.halted = false;
    }

    /// HBA reset (GHC.HR): every register returns to its reset value except the command list
    /// and FIS base addresses, and the link is re-established (COMRESET) once nothing is in flight.
    pub fn hba_reset(&mut self) {
        self.abandon();
        self.is = 0;
        self.ie = 0;
        self.cmd = 0;
        self.tfd = TFD_RESETTING;
        self.sig = u32::MAX;
        self.ssts = 0;
        self.sctl = 0;
        self.serr = 0;
        self.sntf = 0;
        self.link_pending = true;
        self.dev.reset();
    }

    /// Complete a link reset: the device sends its signature in a D2H Register FIS.
    pub fn finish_link_reset(&mut self, mem: &Mem, iss: u32) {
        self.link_pending = false;
        if self.sctl & sctl::DET_MASK != sctl::DET_NONE {
            return;
        }
        let limit = (self.sctl >> sctl::SPD_SHIFT) & 0xf;
        let spd = if limit != 0 && limit < iss {
            limit
        } else {
            iss
        };
        self.ssts =
            ssts::DET_PRESENT | (spd << ssts::SPD_SHIFT) | (ssts::IPM_ACTIVE << ssts::IPM_SHIFT);
        self.serr |= serr::DIAG_X | serr::DIAG_N;
        self.dev.reset();
        let tf = reply::signature(&self.info);
        self.sig = self.info.signature();
        self.set_tfd(&tf);
        if self.post(mem, rx::RFIS, tf.d2h(false).as_bytes()).is_err() {
            self.fatal(pxis::HBFS, self.ccs);
        }
    }

    /// PxTFD from a device's register outputs.
    pub fn set_tfd(&mut self, tf: &TaskFile) {
        self.tfd = u32::from(tf.status) | (u32::from(tf.error) << tfd::ERR_SHIFT);
    }

    /// Copy a received FIS into the FIS area at `offset` (nothing happens while FRE is clear).
    pub fn post(&self, mem: &Mem, offset: u64, fis: &[u8]) -> Result<(), GuestFault> {
        if self.cmd & pxcmd::FRE == 0 {
            return Ok(());
        }
        write_guest(mem, self.fb + offset, fis)
    }

    /// A fatal error (AHCI 1.3.1 §6.1.2): flag it and stop processing the command list; the
    /// failing slot stays set in PxCI and is named by PxCMD.CCS.
    pub fn fatal(&mut self, bit: u32, slot: u8) {
        self.is |= bit;
        self.halted = true;
        self.ccs = slot;
    }
}
