//! Command slots: fetching commands from the command list, running each as an I/O job, and
//! reporting completion through FISes, registers and interrupts.
//!
//! Fetching happens under the device lock when the guest sets PxCI (or when a command finishes
//! and the next may start); it only reads the 32-byte header and the command FIS, then submits a
//! job to the block executor, so the MMIO path never waits for the disk. The job decodes the
//! command under the lock, moves data with no lock held, and completes under the lock again. NCQ
//! commands run concurrently (up to 32); a non-queued command runs alone, after the queue drains.

use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use vm_memory::GuestAddressSpace;
use zerocopy::{FromBytes, IntoBytes};

use crate::ata::{self, status};
use crate::atapi;
use crate::drive::{DriveInfo, DriveKind};
use crate::fis::{
    fis_type, header, rx, table, CommandHeader, DmaSetupFis, H2dRegisterFis, SetDeviceBitsFis,
    TaskFile, CONTROL_SRST, FIS_A, FIS_D, FIS_I,
};
use crate::hba::{lock, Hba};
use crate::ncq::NcqError;
use crate::plan::{Action, IoResult, Plan, Proto};
use crate::port::Port;
use crate::prdt::{read_guest, write_guest, Mem, PrdtFault, Sg};
use crate::regs::{pxis, serr, ssts};
use crate::Shared;

/// Largest piece of a transfer staged in host memory at once.
const CHUNK: u64 = 1 << 20;

/// A command taken from the command list.
#[derive(Clone, Copy, Debug)]
struct Fetched {
    slot: u8,
    header: CommandHeader,
    header_addr: u64,
    fis: H2dRegisterFis,
    queued: bool,
    generation: u64,
}

/// Start every command the port can start now (HBA lock held).
pub fn kick(shared: &Arc<Shared>, hba: &mut Hba, pidx: usize) {
    let mem = shared.mem.memory();
    let p = &mut hba.ports[pidx];
    while p.cmd & crate::regs::pxcmd::ST != 0 && !p.halted && p.link_up() && p.nonqueued.is_none() {
        let pending = p.ci & !p.queued;
        if pending == 0 {
            return;
        }
        let slot = (0..32u8)
            .map(|i| (p.next_slot + i) % 32)
            .find(|s| pending & (1 << s) != 0)
            .unwrap_or(0);
        let f = match fetch(&mem, p, slot) {
            Ok(f) => f,
            Err((bit, serr_bits)) => {
                p.serr |= serr_bits;
                p.fatal(bit, slot);
                return;
            }
        };
        if f.queued {
            accept_queued(&mem, p, &f);
            if p.halted {
                return; // the FIS area is unusable: fatal error already flagged
            }
        } else if p.queued != 0 {
            return; // a non-queued command waits for the queue to drain
        } else {
            p.nonqueued = Some(slot);
        }
        p.ccs = slot;
        p.next_slot = (slot + 1) % 32;
        p.in_flight += 1;
        p.set_ipm(ssts::IPM_ACTIVE); // issuing a command wakes the link
        let job = Job {
            shared: Arc::clone(shared),
            pidx,
            f,
            armed: true,
        };
        shared.exec.submit(Box::new(move || run(job)));
    }
}

/// Read a slot's header and command FIS. Errors are (PxIS bit, PxSERR bits).
fn fetch(mem: &Mem, p: &Port, slot: u8) -> Result<Fetched, (u32, u32)> {
    let header_addr = p.clb + u64::from(slot) * 32;
    let mut hb = [0u8; 32];
    read_guest(mem, header_addr, &mut hb).map_err(|_| (pxis::HBFS, 0))?;
    let header = CommandHeader::read_from_bytes(&hb).map_err(|_| (pxis::HBFS, 0))?;
    let mut fb = [0u8; 20];
    read_guest(mem, header.ctba() + table::CFIS, &mut fb).map_err(|_| (pxis::HBFS, 0))?;
    let fis = H2dRegisterFis::read_from_bytes(&fb).map_err(|_| (pxis::HBFS, 0))?;
    // Anything but a complete Register H2D FIS is refused by the device with R_ERR: the HBA
    // records a protocol/handshake error and stops (interface fatal error).
    let cfl = header.cfl();
    if fis.fis_type != fis_type::REG_H2D || !(5..=16).contains(&cfl) {
        return Err((pxis::IFS, serr::ERR_P | serr::DIAG_H));
    }
    let queued = fis.is_command() && p.info.kind == DriveKind::Disk && ata::is_queued(fis.command);
    Ok(Fetched {
        slot,
        header,
        header_addr,
        fis,
        queued,
        generation: p.generation,
    })
}

/// A queued command is accepted at once: the device releases the bus with a D2H Register FIS
/// (BSY clear, no interrupt), the HBA clears its PxCI bit, and a DMA Setup FIS names its tag.
fn accept_queued(mem: &Mem, p: &mut Port, f: &Fetched) {
    let bit = 1u32 << f.slot;
    p.ci &= !bit;
    p.queued |= bit;
    let tf = TaskFile {
        status: status::DRDY,
        device: ata::DEVICE_LBA,
        ..Default::default()
    };
    p.set_tfd(&tf);
    let write = f.fis.command != ata::cmd::READ_FPDMA;
    let mut ds = DmaSetupFis {
        fis_type: fis_type::DMA_SETUP,
        flags: if write { FIS_A } else { FIS_D },
        ..Default::default()
    };
    ds.buffer_id_lo.set(u32::from(f.slot));
    if p.post(mem, rx::RFIS, tf.d2h(false).as_bytes()).is_err()
        || p.post(mem, rx::DSFIS, ds.as_bytes()).is_err()
    {
        p.fatal(pxis::HBFS, f.slot);
    }
}

/// Finish pending resets whose jobs have drained, then restart command processing (HBA lock
/// held).
pub fn settle(shared: &Arc<Shared>, hba: &mut Hba) {
    if hba.reset_pending {
        if hba.ports.iter().any(|p| p.in_flight > 0) {
            return;
        }
        hba.reset_pending = false;
    }
    let mem = shared.mem.memory();
    let iss = hba.iss();
    for i in 0..hba.ports.len() {
        let p = &mut hba.ports[i];
        if p.link_pending && p.in_flight == 0 {
            p.finish_link_reset(&mem, iss);
            kick(shared, hba, i);
        }
    }
}

/// One command's job. It completes exactly once: through [`Job::finish`], or, should the job
/// ever panic, by its drop, which retires it without reporting anything (so PxCMD.CR and HBA
/// reset never wait forever for it).
struct Job {
    shared: Arc<Shared>,
    pidx: usize,
    f: Fetched,
    armed: bool,
}

impl Job {
    fn finish(mut self, done: Option<(Plan, IoResult, Option<Sg>)>) {
        self.armed = false;
        finish(&self.shared, self.pidx, &self.f, done);
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if self.armed {
            finish(&self.shared, self.pidx, &self.f, None);
        }
    }
}

/// The I/O job of one command.
fn run(job: Job) {
    let (shared, pidx, f) = (&job.shared, job.pidx, job.f);
    let mem = shared.mem.memory();
    let info = Arc::clone(&shared.drives[pidx]);
    let mut acmd = [0u8; table::ACMD_LEN];
    let packet =
        info.kind == DriveKind::Cdrom && f.fis.is_command() && f.fis.command == ata::cmd::PACKET;
    let acmd_ok = !packet || read_guest(&mem, f.header.ctba() + table::ACMD, &mut acmd).is_ok();

    let plan = {
        let mut hba = lock(&shared.state);
        let p = &mut hba.ports[pidx];
        if p.generation != f.generation {
            drop(hba);
            return job.finish(None);
        }
        if !acmd_ok {
            drop(hba);
            return job.finish(Some((
                Plan::done(ata::ok(), Proto::NonData),
                IoResult::HostFault(pxis::HBFS),
                None,
            )));
        }
        if !f.fis.is_command() {
            device_control(&mem, p, &f);
            drop(hba);
            return job.finish(None);
        }
        ata::prepare(&info, &mut p.dev, &f.fis, &acmd, f.slot)
    };

    let mut sg = None;
    let mut result = IoResult::Ok;
    if let Some((len, to_host)) = plan.transfer() {
        match Sg::load(
            &mem,
            f.header.ctba() + table::PRDT,
            f.header.prdtl.get(),
            len,
        ) {
            Ok(s) => sg = Some(s),
            Err(PrdtFault::Short) if to_host => result = IoResult::HostFault(pxis::OFS),
            Err(_) => result = IoResult::HostFault(pxis::HBFS),
        }
    }
    if result == IoResult::Ok {
        let mut none = Sg::default();
        result = execute(
            shared,
            &info,
            &mem,
            &plan.action,
            sg.as_mut().unwrap_or(&mut none),
        );
    }
    drop(mem);
    job.finish(Some((plan, result, sg)));
}

/// A Register H2D FIS with C clear updates the Device Control register: SRST asserted resets the
/// device (no reply); SRST released makes it send its signature (ATA/ATAPI software reset).
fn device_control(mem: &Mem, p: &mut Port, f: &Fetched) {
    let bit = 1u32 << f.slot;
    p.ci &= !bit;
    if f.fis.control & CONTROL_SRST != 0 {
        p.dev.reset();
        p.dev.srst = true;
        p.tfd = u32::from(status::BSY);
        if f.header.flags.get() & header::C != 0 {
            p.tfd &= !u32::from(status::BSY | status::DRQ);
        }
    } else if p.dev.srst {
        p.dev.srst = false;
        let tf = ata::signature(&p.info);
        p.sig = p.info.signature();
        p.set_tfd(&tf);
        if p.post(mem, rx::RFIS, tf.d2h(false).as_bytes()).is_err() {
            p.fatal(pxis::HBFS, f.slot);
        }
    }
}

/// Move the data of `action`, with no lock held.
fn execute(shared: &Shared, info: &DriveInfo, mem: &Mem, action: &Action, sg: &mut Sg) -> IoResult {
    let host = IoResult::HostFault(pxis::HBFS);
    let lba_at = |off: u64| off / u64::from(info.logical);
    let Some(be) = info.backend.as_deref() else {
        // No medium: decoding refuses medium access before it gets here.
        return match action {
            Action::DataIn { data, .. } => sg.write(mem, data).map_or(host, |_| IoResult::Ok),
            Action::Done(_) | Action::Flush => IoResult::Ok,
            _ => IoResult::ReadError { lba: 0 },
        };
    };
    match action {
        Action::Done(_) => IoResult::Ok,
        Action::DataIn { data, .. } => sg.write(mem, data).map_or(host, |_| IoResult::Ok),
        Action::Read { offset, len, .. } | Action::Verify { offset, len, .. } => {
            let to_host = matches!(action, Action::Read { .. });
            let mut buf = vec![0u8; (*len).min(CHUNK) as usize];
            let mut pos = 0;
            while pos < *len {
                let n = (*len - pos).min(CHUNK) as usize;
                let chunk = &mut buf[..n];
                if be
                    .read_vectored(offset + pos, &mut [IoSliceMut::new(chunk)])
                    .is_err()
                {
                    return IoResult::ReadError {
                        lba: lba_at(offset + pos),
                    };
                }
                if to_host {
                    if sg.write(mem, &buf[..n]).is_err() {
                        return host;
                    }
                    shared.stats.read_bytes.fetch_add(n as u64, Relaxed);
                    info.counters.read_bytes.fetch_add(n as u64, Relaxed);
                }
                pos += n as u64;
            }
            IoResult::Ok
        }
        Action::Write {
            offset, len, flush, ..
        } => {
            let mut buf = vec![0u8; (*len).min(CHUNK) as usize];
            let mut pos = 0;
            while pos < *len {
                let n = (*len - pos).min(CHUNK) as usize;
                if sg.read(mem, &mut buf[..n]).is_err() {
                    return host;
                }
                if be
                    .write_vectored(offset + pos, &[IoSlice::new(&buf[..n])])
                    .is_err()
                {
                    return IoResult::WriteError {
                        lba: lba_at(offset + pos),
                    };
                }
                shared.stats.written_bytes.fetch_add(n as u64, Relaxed);
                info.counters.written_bytes.fetch_add(n as u64, Relaxed);
                pos += n as u64;
            }
            if *flush && be.flush().is_err() {
                return IoResult::WriteError {
                    lba: lba_at(*offset),
                };
            }
            IoResult::Ok
        }
        Action::Flush => {
            if info.read_only || be.flush().is_ok() {
                IoResult::Ok
            } else {
                IoResult::WriteError { lba: 0 }
            }
        }
        Action::Trim { len } => {
            let mut list = vec![0u8; *len as usize];
            if sg.read(mem, &mut list).is_err() {
                return host;
            }
            trim(info, be, &list)
        }
    }
}

/// DATA SET MANAGEMENT TRIM: 8-byte entries of LBA (47:0) and length (63:48); zero-length
/// entries are padding. Every range is checked before any is discarded.
fn trim(info: &DriveInfo, be: &dyn block::BlockBackend, list: &[u8]) -> IoResult {
    let ranges: Vec<(u64, u64)> = list
        .chunks_exact(8)
        .map(|e| {
            let v = u64::from_le_bytes(e.try_into().unwrap_or([0; 8]));
            (v & 0xffff_ffff_ffff, v >> 48)
        })
        .filter(|&(_, n)| n != 0)
        .collect();
    if ranges.iter().any(|&(lba, n)| lba + n > info.sectors) {
        return IoResult::BadRange;
    }
    let sector = u64::from(info.logical);
    for (lba, n) in ranges {
        if be.discard(lba * sector, n * sector).is_err() {
            return IoResult::WriteError { lba };
        }
    }
    IoResult::Ok
}

/// The device's outputs for a finished plan.
fn outcome(info: &DriveInfo, p: &mut Port, plan: &Plan, result: IoResult) -> TaskFile {
    let cd = info.kind == DriveKind::Cdrom;
    match result {
        IoResult::Ok => match &plan.action {
            Action::Done(tf) | Action::DataIn { tf, .. } => *tf,
            _ if cd => atapi::good(),
            _ => ata::ok(),
        },
        IoResult::ReadError { .. } if cd => atapi::read_failed(&mut p.dev),
        IoResult::ReadError { lba } => ata::fail(ata::error::UNC, lba),
        IoResult::WriteError { lba } => ata::fail(ata::error::ABRT, lba),
        IoResult::BadRange | IoResult::HostFault(_) => ata::abort(),
    }
}

/// Complete a job under the lock: report the command (unless it was abandoned), then start what
/// can start next and signal interrupts.
fn finish(
    shared: &Arc<Shared>,
    pidx: usize,
    f: &Fetched,
    done: Option<(Plan, IoResult, Option<Sg>)>,
) {
    let mem = shared.mem.memory();
    let mut hba = lock(&shared.state);
    let p = &mut hba.ports[pidx];
    p.in_flight = p.in_flight.saturating_sub(1);
    let live = p.generation == f.generation;
    if live {
        if f.queued {
            p.queued &= !(1 << f.slot);
        } else if p.nonqueued == Some(f.slot) {
            p.nonqueued = None;
        }
    }
    if let (true, Some((plan, result, sg))) = (live && !p.halted, done) {
        shared.stats.commands.fetch_add(1, Relaxed);
        match result {
            IoResult::HostFault(bit) => p.fatal(bit, f.slot),
            _ => {
                let info = Arc::clone(&p.info);
                let tf = outcome(&info, p, &plan, result);
                if tf.status & status::ERR != 0 {
                    shared.stats.errors.fetch_add(1, Relaxed);
                }
                let (moved, irq) = sg.map_or((0, false), |s| (s.moved(), s.interrupt));
                report(&mem, p, f, plan.proto, &tf, moved, irq);
            }
        }
    }
    kick(shared, &mut hba, pidx);
    settle(shared, &mut hba);
    hba.update_irq(&shared.func);
}

/// Post the FISes that report a finished command and update the port registers (AHCI 1.3.1
/// §5.3: RegFIS, PIO, SDB states). A failed command leaves its PxCI bit set and halts the port.
fn report(
    mem: &Mem,
    p: &mut Port,
    f: &Fetched,
    proto: Proto,
    tf: &TaskFile,
    moved: u64,
    prd_irq: bool,
) {
    let bit = 1u32 << f.slot;
    let failed = tf.status & status::ERR != 0;
    let mut ok = true;
    let mut post = |p: &Port, off, bytes: &[u8]| ok &= p.post(mem, off, bytes).is_ok();
    match proto {
        Proto::Ncq { tag } => {
            let mut sdb = SetDeviceBitsFis {
                fis_type: fis_type::SET_DEVICE_BITS,
                flags: FIS_I,
                status: tf.status & 0x77,
                error: tf.error,
                ..Default::default()
            };
            if !failed {
                sdb.sactive.set(1 << tag);
            }
            post(p, rx::SDBFIS, sdb.as_bytes());
            // SDB updates the status bits it carries and the error register.
            p.tfd = (p.tfd & 0x88) | u32::from(tf.status & 0x77) | (u32::from(tf.error) << 8);
            if failed {
                // The log keeps the command that started the error condition.
                p.dev.ncq_error.get_or_insert(NcqError { tag, tf: *tf });
                p.fatal(pxis::TFES, f.slot);
            } else {
                p.sact &= !(1 << tag);
                p.is |= pxis::SDBS;
            }
        }
        _ => {
            let last_block = |block: u32| match moved % u64::from(block) {
                0 => moved.min(u64::from(block)),
                r => r,
            } as u16;
            let mut done_bit = pxis::DHRS;
            match proto {
                Proto::PioIn { block } if !failed => {
                    let start = status::DRDY | status::DSC | status::DRQ;
                    post(
                        p,
                        rx::PSFIS,
                        tf.pio_setup(start, last_block(block), true, true)
                            .as_bytes(),
                    );
                    done_bit = pxis::PSS;
                }
                Proto::PioOut { block } => {
                    if moved > 0 {
                        let start = status::DRDY | status::DSC | status::DRQ;
                        post(
                            p,
                            rx::PSFIS,
                            tf.pio_setup(start, last_block(block), false, false)
                                .as_bytes(),
                        );
                    }
                    post(p, rx::RFIS, tf.d2h(true).as_bytes());
                }
                Proto::Packet { dma: false } if moved > 0 => {
                    let start = status::DRDY | status::DRQ;
                    let n = moved.min(0xfffe) as u16;
                    let pio = TaskFile { count: 0x02, ..*tf }.pio_setup(start, n, true, true);
                    post(p, rx::PSFIS, pio.as_bytes());
                    p.is |= pxis::PSS;
                    post(p, rx::RFIS, tf.d2h(true).as_bytes());
                }
                _ => post(p, rx::RFIS, tf.d2h(true).as_bytes()),
            }
            p.set_tfd(tf);
            let mut prdbc = [0u8; 4];
            prdbc.copy_from_slice(&(moved as u32).to_le_bytes());
            ok &= write_guest(mem, f.header_addr + header::PRDBC_OFFSET, &prdbc).is_ok();
            if failed {
                p.fatal(pxis::TFES, f.slot);
            } else {
                p.ci &= !bit;
                p.is |= done_bit;
            }
        }
    }
    if prd_irq && moved > 0 {
        p.is |= pxis::DPS;
    }
    if !ok {
        p.fatal(pxis::HBFS, f.slot);
    }
}
