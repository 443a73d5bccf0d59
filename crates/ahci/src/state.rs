//! Pause, save and restore: the HBA's and every port's state, as versioned serde data.
//!
//! Pausing stops command fetch (PxCI bits the guest sets meanwhile stay set), waits for the
//! running commands to complete into the guest's FIS areas and command lists, lets pending resets
//! settle, and flushes the disks. What is left is registers and drive settings: a command is
//! either complete or still only a PxCI bit, which a restored port fetches on resume.

use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::time::{Duration, Instant};

use pci::{FunctionState, StateError};
use serde::{Deserialize, Serialize};

use crate::drive::{DriveKind, DriveState, MAX_MULTIPLE};
use crate::hba::lock;
use crate::Shared;

/// Version of [`AhciState`]; a state of another version is refused.
pub const STATE_VERSION: u32 = 1;

/// How long a pause waits for running commands.
const PAUSE_WAIT: Duration = Duration::from_secs(60);

/// A paused HBA's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AhciState {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// Config space and MSI.
    pub pci: FunctionState,
    /// GHC (IE).
    pub ghc: u32,
    /// IS.
    pub is: u32,
    /// INTx level.
    pub intx: bool,
    /// Interrupts sent so far.
    pub interrupts: u64,
    /// One per port.
    pub ports: Vec<PortSave>,
}

/// A port: identity of its drive, registers, drive settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PortSave {
    /// "disk" or "cdrom" (must match).
    pub kind: String,
    /// Capacity in logical blocks (must match).
    pub sectors: u64,
    /// Serial number (must match).
    pub serial: String,
    /// PxCLB.
    pub clb: u64,
    /// PxFB.
    pub fb: u64,
    /// PxIS (own bits).
    pub is: u32,
    /// PxIE.
    pub ie: u32,
    /// PxCMD (software bits).
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
    /// PxCI (commands issued and not fetched yet).
    pub ci: u32,
    /// PxSNTF.
    pub sntf: u32,
    /// Stopped by a fatal error until PxCMD.ST is cleared.
    pub halted: bool,
    /// Round-robin position.
    pub next_slot: u8,
    /// Drive settings, sense and medium state.
    pub drive: serde_json::Value,
    /// A flush failed since the last reset.
    pub flush_failed: bool,
    /// Bytes read (SMART).
    pub read_bytes: u64,
    /// Bytes written (SMART).
    pub written_bytes: u64,
}

fn kind_name(k: DriveKind) -> &'static str {
    match k {
        DriveKind::Disk => "disk",
        DriveKind::Cdrom => "cdrom",
    }
}

impl Shared {
    /// Nothing running, no reset waiting.
    fn quiesced(&self) -> bool {
        let ports_idle = (0..self.ports.len()).all(|i| {
            let p = &self.port(i).port;
            p.in_flight == 0 && p.queued == 0 && p.nonqueued.is_none() && !p.link_pending
        });
        ports_idle && !lock(&self.hba).reset_pending
    }

    /// Stop fetching, wait for running commands and pending resets, flush.
    pub(crate) fn pause(&self) -> Result<(), StateError> {
        self.paused.store(true, SeqCst);
        let deadline = Instant::now() + PAUSE_WAIT;
        while !self.quiesced() {
            if self.settle_wanted() {
                self.settle();
                continue;
            }
            if Instant::now() >= deadline {
                return Err(StateError::Refused(format!(
                    "ahci: commands still running after {} s",
                    PAUSE_WAIT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        for be in self
            .drives
            .iter()
            .filter(|d| !d.read_only)
            .filter_map(|d| d.backend.as_ref())
        {
            if let Err(e) = be.flush() {
                ::log::warn!("ahci: flush for pause failed: {e}");
            }
        }
        Ok(())
    }

    /// Fetch again: issued commands start.
    pub(crate) fn unpause(&self) {
        if self.paused.swap(false, SeqCst) {
            self.kick_all();
        }
    }

    /// The paused HBA's state.
    pub(crate) fn save(&self) -> Result<AhciState, StateError> {
        if !self.paused.load(SeqCst) || !self.quiesced() {
            return Err(StateError::Refused(
                "ahci: save needs a paused controller".into(),
            ));
        }
        let hba = lock(&self.hba);
        let ports = (0..self.ports.len())
            .map(|i| {
                let ps = self.port(i);
                let p = &ps.port;
                PortSave {
                    kind: kind_name(p.info.kind).into(),
                    sectors: p.info.sectors,
                    serial: p.info.serial.clone(),
                    clb: p.clb,
                    fb: p.fb,
                    is: p.is,
                    ie: p.ie,
                    cmd: p.cmd,
                    ccs: p.ccs,
                    tfd: p.tfd,
                    sig: p.sig,
                    ssts: p.ssts,
                    sctl: p.sctl,
                    serr: p.serr,
                    sact: p.sact,
                    ci: p.ci,
                    sntf: p.sntf,
                    halted: p.halted,
                    next_slot: p.next_slot,
                    drive: serde_json::to_value(&p.dev).unwrap_or_default(),
                    flush_failed: p.info.flush_failed.load(Relaxed),
                    read_bytes: p.info.counters.read_bytes.load(Relaxed),
                    written_bytes: p.info.counters.written_bytes.load(Relaxed),
                }
            })
            .collect();
        Ok(AhciState {
            version: STATE_VERSION,
            pci: lock(&self.func).save(),
            ghc: hba.ghc,
            is: hba.is,
            intx: hba.intx,
            interrupts: hba.interrupts,
            ports,
        })
    }

    /// Load `s` into this freshly built HBA; it stays paused.
    pub(crate) fn restore(&self, s: &AhciState) -> Result<(), StateError> {
        let invalid = |m: String| StateError::Invalid(format!("ahci state: {m}"));
        if s.version != STATE_VERSION {
            return Err(invalid(format!(
                "format version {}, this rhyve reads version {STATE_VERSION}",
                s.version
            )));
        }
        let fresh = (0..self.ports.len()).all(|i| {
            let p = &self.port(i).port;
            p.cmd == 0 && p.clb == 0 && p.in_flight == 0
        }) && lock(&self.hba).ghc == 0;
        if !fresh {
            return Err(StateError::Refused(
                "ahci: restore needs a freshly created controller".into(),
            ));
        }
        if s.ports.len() != self.ports.len() {
            return Err(StateError::Refused(format!(
                "ahci: state has {} ports, this controller {}",
                s.ports.len(),
                self.ports.len()
            )));
        }
        let mut drives = Vec::new();
        for (i, (saved, info)) in s.ports.iter().zip(&self.drives).enumerate() {
            let here = (kind_name(info.kind), info.sectors, info.serial.as_str());
            if (saved.kind.as_str(), saved.sectors, saved.serial.as_str()) != here {
                let hint = if saved.serial != here.2 {
                    format!(
                        " (the serial follows the image path unless set: add ser={})",
                        saved.serial
                    )
                } else {
                    String::new()
                };
                return Err(StateError::Refused(format!(
                    "ahci port {i}: state of a {} of {} blocks, serial {:?}; \
                     this port has a {} of {} blocks, serial {:?}{hint}",
                    saved.kind, saved.sectors, saved.serial, here.0, here.1, here.2
                )));
            }
            let d = DriveState::deserialize(&saved.drive)
                .map_err(|e| invalid(format!("port {i} drive: {e}")))?;
            if d.multiple > MAX_MULTIPLE
                || d.ncq_error.is_some_and(|e| e.tag >= 32)
                || usize::from(saved.next_slot) >= 32
            {
                return Err(invalid(format!("port {i}: value out of range")));
            }
            drives.push(d);
        }
        lock(&self.func).restore(&s.pci)?;
        // From here on nothing can fail.
        self.paused.store(true, SeqCst);
        {
            let mut h = lock(&self.hba);
            (h.ghc, h.is, h.intx, h.interrupts) = (s.ghc, s.is, s.intx, s.interrupts);
            h.reset_pending = false;
        }
        for (i, (saved, dev)) in s.ports.iter().zip(drives).enumerate() {
            let mut ps = self.port(i);
            let p = &mut ps.port;
            (p.clb, p.fb, p.is, p.ie, p.cmd, p.ccs) = (
                saved.clb, saved.fb, saved.is, saved.ie, saved.cmd, saved.ccs,
            );
            (p.tfd, p.sig, p.ssts, p.sctl, p.serr) =
                (saved.tfd, saved.sig, saved.ssts, saved.sctl, saved.serr);
            (p.sact, p.ci, p.sntf, p.halted) = (saved.sact, saved.ci, saved.sntf, saved.halted);
            p.next_slot = saved.next_slot;
            p.link_pending = false;
            p.dev = dev;
            p.info.flush_failed.store(saved.flush_failed, Relaxed);
            let c = &p.info.counters;
            c.read_bytes.fetch_add(saved.read_bytes, Relaxed);
            c.written_bytes.fetch_add(saved.written_bytes, Relaxed);
        }
        self.settled
            .store(self.settle_requested.load(SeqCst), SeqCst);
        Ok(())
    }
}
