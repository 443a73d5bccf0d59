//! Command slots: fetching commands from the command list, running them, and reporting
//! completion through FISes, registers and interrupts.
//!
//! Everything here runs under one port's lock, never the HBA's: a PxCI write (or a completion
//! that frees the port for the next command) fetches the 32-byte header and the command FIS,
//! decodes the command, and either finishes it at once (non-data commands, IDENTIFY, logs,
//! ATAPI responses: small data generated here) or hands its data to the port's I/O engine as
//! iovecs straight over the PRDT's guest buffers. Large transfers run as a chain of bounded
//! chunks. Completions come back through [`complete`], on the submitting thread or the port's
//! I/O thread. NCQ commands run concurrently (up to 32); a non-queued command runs alone,
//! after the queue drains.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use block::{GuestIov, IoDone, IoReq, Op};
use vm_memory::GuestAddressSpace;
use zerocopy::{FromBytes, IntoBytes};

use crate::ata;
use crate::atapi;
use crate::drive::{DriveInfo, DriveKind, NcqError};
use crate::fis::{
    fis_type, header, rx, table, CommandHeader, DmaSetupFis, H2dRegisterFis, SetDeviceBitsFis,
    TaskFile, CONTROL_SRST, FIS_A, FIS_D, FIS_I,
};
use crate::plan::{Action, IoResult, Plan, Proto};
use crate::port::Port;
use crate::prdt::{read_guest, write_guest, Mem, PrdtFault, Sg};
use crate::regs::{pxis, serr, ssts};
use crate::reply;
use crate::spec::{cmd, error, status};
use crate::Shared;

/// Most iovecs in one backend request; longer transfers run chunk after chunk.
const MAX_SEGMENTS: usize = 256;
/// Most bytes in one backend request.
const MAX_CHUNK: u64 = 4 << 20;
/// Host buffer for verify and TRIM range lists.
const STAGE: usize = 64 << 10;
/// Commands a port may have running, abandoned ones included: new commands wait while a stop
/// or reset leaves old ones running, so a port never holds more than this.
const MAX_JOBS: u32 = 32;

/// A command taken from the command list.
#[derive(Clone, Copy, Debug)]
pub struct Fetched {
    slot: u8,
    header: CommandHeader,
    header_addr: u64,
    fis: H2dRegisterFis,
    queued: bool,
    generation: u64,
    /// When it was fetched (latency statistics).
    started: std::time::Instant,
}

/// A command running on the backend.
pub struct Job {
    f: Fetched,
    plan: Plan,
    sg: Sg,
    /// Disk offset of the next chunk.
    next: u64,
    /// Backend requests still running.
    parts: u32,
    result: IoResult,
    /// The drive's backend (for later chunks).
    be: Arc<dyn block::BlockBackend>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("slot", &self.f.slot)
            .field("plan", &self.plan)
            .field("parts", &self.parts)
            .finish()
    }
}

/// A port with the commands it has running.
#[derive(Debug)]
pub struct PortState {
    /// The registers and the device.
    pub port: Port,
    /// Running commands (this generation's and abandoned ones).
    pub jobs: Vec<Job>,
}

impl PortState {
    /// A port with nothing running.
    pub fn new(port: Port) -> Self {
        PortState {
            port,
            jobs: Vec::new(),
        }
    }
}

fn tag(port: usize, slot: u8, generation: u64) -> u64 {
    ((port as u64) << 56) | (u64::from(slot) << 48) | (generation & 0xffff_ffff_ffff)
}

fn untag(t: u64) -> (usize, u8, u64) {
    ((t >> 56) as usize, (t >> 48) as u8, t & 0xffff_ffff_ffff)
}

/// Deferred work: I/O threads whose engines got requests.
#[derive(Default)]
pub struct Work {
    /// Bit per I/O thread.
    pub engines: u64,
}

/// Start every command the port can start now (port lock held).
pub fn kick(sh: &Shared, ps: &mut PortState, pidx: usize, work: &mut Work) {
    let mem = sh.mem.memory();
    loop {
        let p = &mut ps.port;
        let ready = p.cmd & crate::regs::pxcmd::ST != 0
            && !p.halted
            && p.link_up()
            && p.nonqueued.is_none()
            && p.in_flight < MAX_JOBS
            && sh.irq.bus_master()
            && !sh.paused.load(std::sync::atomic::Ordering::SeqCst);
        if !ready {
            return;
        }
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
        start(sh, ps, pidx, f, &mem, work);
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
    log::trace!(
        "ahci: slot {slot} command {:#04x} features {:#06x} count {:#x} lba {:#x}{}",
        fis.command,
        fis.features16(),
        fis.count16(),
        fis.lba48(),
        if queued { " (queued)" } else { "" }
    );
    Ok(Fetched {
        slot,
        header,
        header_addr,
        fis,
        queued,
        generation: p.generation,
        started: std::time::Instant::now(),
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
        device: reply::DEVICE_LBA,
        ..Default::default()
    };
    p.set_tfd(&tf);
    let write = f.fis.command != cmd::READ_FPDMA;
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

/// Decode a fetched command and run it: at once, or on the backend.
fn start(sh: &Shared, ps: &mut PortState, pidx: usize, f: Fetched, mem: &Mem, work: &mut Work) {
    let p = &mut ps.port;
    let info = Arc::clone(&p.info);
    if !f.fis.is_command() {
        device_control(mem, p, &f);
        finish(sh, ps, &f, None);
        return;
    }
    let mut acmd = [0u8; table::ACMD_LEN];
    let packet = info.kind == DriveKind::Cdrom && f.fis.command == cmd::PACKET;
    if packet && read_guest(mem, f.header.ctba() + table::ACMD, &mut acmd).is_err() {
        let plan = Plan::done(reply::ok(), Proto::NonData);
        finish(
            sh,
            ps,
            &f,
            Some((plan, IoResult::HostFault(pxis::HBFS), None)),
        );
        return;
    }
    let plan = ata::prepare(&info, &mut p.dev, &f.fis, &acmd, f.slot);
    let mut sg = None;
    let mut result = IoResult::Ok;
    if let Some((len, to_host)) = plan.transfer() {
        match Sg::load(
            mem,
            f.header.ctba() + table::PRDT,
            f.header.prdtl.get(),
            len,
        ) {
            Ok(s) => sg = Some(s),
            Err(PrdtFault::Short) if to_host => result = IoResult::HostFault(pxis::OFS),
            Err(_) => result = IoResult::HostFault(pxis::HBFS),
        }
    }
    let be = info.backend.clone();
    let (be, mut sg) = match (result, be, sg) {
        (IoResult::Ok, Some(be), sg) => (be, sg.unwrap_or_default()),
        (IoResult::Ok, None, sg) => {
            // No medium: decoding refuses medium access before it gets here.
            let mut sg = sg.unwrap_or_default();
            let r = match &plan.action {
                Action::DataIn { data, .. } => host(sg.write(mem, data)),
                Action::Done(_) | Action::Flush => IoResult::Ok,
                _ => IoResult::ReadError { lba: 0 },
            };
            finish(sh, ps, &f, Some((plan, r, Some(sg))));
            return;
        }
        (r, _, sg) => {
            finish(sh, ps, &f, Some((plan, r, sg)));
            return;
        }
    };
    let t = tag(pidx, f.slot, f.generation);
    let engine = sh.engine(pidx);
    let ebit = 1 << (sh.thread_of(pidx) % 64);
    let parts = match &plan.action {
        Action::Done(_) => {
            finish(sh, ps, &f, Some((plan, IoResult::Ok, Some(sg))));
            return;
        }
        Action::DataIn { data, .. } => {
            let r = host(sg.write(mem, data));
            finish(sh, ps, &f, Some((plan, r, Some(sg))));
            return;
        }
        Action::Flush if info.read_only => {
            finish(sh, ps, &f, Some((plan, IoResult::Ok, Some(sg))));
            return;
        }
        Action::Flush => {
            engine.submit(IoReq {
                tag: t,
                op: Op::Flush,
                offset: 0,
                len: 0,
                fua: false,
                iov: GuestIov::new(),
                backend: be.clone(),
            });
            work.engines |= ebit;
            1
        }
        Action::Read { offset, .. } | Action::Write { offset, .. } => {
            let (op, fua) = match plan.action {
                Action::Write { flush, .. } => (Op::Write, flush),
                _ => (Op::Read, false),
            };
            let offset = *offset;
            let mut iov = GuestIov::new();
            iov.set_memory(sh.mem.memory().into_inner());
            if sg.fill_iov(mem, &mut iov, MAX_SEGMENTS, MAX_CHUNK).is_err() {
                finish(
                    sh,
                    ps,
                    &f,
                    Some((plan, IoResult::HostFault(pxis::HBFS), Some(sg))),
                );
                return;
            }
            let next = offset + iov.len();
            engine.submit(IoReq {
                tag: t,
                op,
                offset,
                len: iov.len(),
                fua,
                iov,
                backend: be.clone(),
            });
            work.engines |= ebit;
            ps.jobs.push(Job {
                f,
                plan,
                sg,
                next,
                parts: 1,
                result: IoResult::Ok,
                be,
            });
            return;
        }
        Action::Verify { offset, len, lba } => {
            let (offset, len, lba, b) = (*offset, *len, *lba, be.clone());
            let sector = u64::from(info.logical.max(1));
            blocking(sh, t, move |_| verify(&*b, offset, len, lba, sector));
            1
        }
        Action::Trim { .. } => {
            let (list, info2, m, b) = (sg.clone(), Arc::clone(&info), sh.mem.clone(), be.clone());
            blocking(sh, t, move |_| trim(&info2, &*b, &m.memory(), list));
            1
        }
    };
    ps.jobs.push(Job {
        f,
        plan,
        sg,
        next: 0,
        parts,
        result: IoResult::Ok,
        be,
    });
}

fn host(r: Result<(), crate::prdt::GuestFault>) -> IoResult {
    r.map_or(IoResult::HostFault(pxis::HBFS), |_| IoResult::Ok)
}

/// Run `job` on the worker pool; its result completes command `t`.
fn blocking(sh: &Shared, t: u64, job: impl FnOnce(&Shared) -> IoResult + Send + 'static) {
    let Some(me) = sh.me.upgrade() else { return };
    sh.pool.submit(Box::new(move || {
        let r = job(&me);
        me.complete_result(t, r, None);
    }));
}

/// READ VERIFY: read the range back in bounded chunks (the data goes nowhere).
fn verify(be: &dyn block::BlockBackend, offset: u64, len: u64, lba: u64, sector: u64) -> IoResult {
    let mut buf = vec![0u8; (len as usize).min(STAGE)];
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(buf.len() as u64) as usize;
        if be
            .read_vectored(offset + pos, &mut [std::io::IoSliceMut::new(&mut buf[..n])])
            .is_err()
        {
            return IoResult::ReadError {
                lba: lba + pos / sector,
            };
        }
        pos += n as u64;
    }
    IoResult::Ok
}

/// DATA SET MANAGEMENT TRIM (entries decoded by [`ata::dsm_ranges`]). Every range is checked
/// before any is discarded; the list is read from guest memory twice in bounded pieces rather
/// than copied whole.
fn trim(info: &DriveInfo, be: &dyn block::BlockBackend, mem: &Mem, list: Sg) -> IoResult {
    let each = |apply: bool| -> IoResult {
        let mut sg = list.clone();
        let mut buf = vec![0u8; STAGE];
        let sector = u64::from(info.logical);
        while sg.remaining() > 0 {
            let n = sg.remaining().min(STAGE as u64) as usize;
            if sg.read(mem, &mut buf[..n]).is_err() {
                return IoResult::HostFault(pxis::HBFS);
            }
            for (lba, cnt) in ata::dsm_ranges(&buf[..n]) {
                if !apply && lba + cnt > info.sectors {
                    return IoResult::BadRange;
                }
                if apply && be.discard(lba * sector, cnt * sector).is_err() {
                    return IoResult::WriteError { lba };
                }
            }
        }
        IoResult::Ok
    };
    match each(false) {
        IoResult::Ok => each(true),
        r => r,
    }
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
        let tf = reply::signature(&p.info);
        p.sig = p.info.signature();
        p.set_tfd(&tf);
        if p.post(mem, rx::RFIS, tf.d2h(false).as_bytes()).is_err() {
            p.fatal(pxis::HBFS, f.slot);
        }
    }
}

/// One backend request of command `t` finished (port lock held). Starts the next chunk, or
/// finishes the command.
pub fn complete(
    sh: &Shared,
    ps: &mut PortState,
    t: u64,
    r: IoResult,
    iov: Option<GuestIov>,
    work: &mut Work,
) {
    drop(iov);
    let (pidx, slot, generation) = untag(t);
    let Some(i) = ps
        .jobs
        .iter()
        .position(|j| j.f.slot == slot && j.f.generation & 0xffff_ffff_ffff == generation)
    else {
        return;
    };
    let j = &mut ps.jobs[i];
    j.parts = j.parts.saturating_sub(1);
    if j.result == IoResult::Ok {
        j.result = r;
    }
    if j.parts > 0 {
        return;
    }
    let live = j.f.generation == ps.port.generation && !ps.port.halted;
    if live && j.result == IoResult::Ok && j.sg.remaining() > 0 {
        if let Some(req) = next_chunk(sh, j, t) {
            sh.engine(pidx).submit(req);
            work.engines |= 1 << (sh.thread_of(pidx) % 64);
            return;
        }
    }
    let j = ps.jobs.swap_remove(i);
    let f = j.f;
    finish(sh, ps, &f, Some((j.plan, j.result, Some(j.sg))));
    kick(sh, ps, pidx, work);
}

/// The next chunk of a large transfer, or `None` (with the job's result set) if it cannot go.
fn next_chunk(sh: &Shared, j: &mut Job, t: u64) -> Option<IoReq> {
    let be = j.be.clone();
    let mem = sh.mem.memory();
    let mut iov = GuestIov::new();
    iov.set_memory(sh.mem.memory().into_inner());
    if !sh.irq.bus_master()
        || j.sg
            .fill_iov(&mem, &mut iov, MAX_SEGMENTS, MAX_CHUNK)
            .is_err()
    {
        j.result = IoResult::HostFault(pxis::HBFS);
        return None;
    }
    let (op, fua) = match j.plan.action {
        Action::Write { flush, .. } => (Op::Write, flush),
        _ => (Op::Read, false),
    };
    let offset = j.next;
    j.next += iov.len();
    j.parts = 1;
    Some(IoReq {
        tag: t,
        op,
        offset,
        len: iov.len(),
        fua,
        iov,
        backend: be,
    })
}

/// The device's outputs for a finished plan.
fn outcome(info: &DriveInfo, p: &mut Port, plan: &Plan, result: IoResult) -> TaskFile {
    let cd = info.kind == DriveKind::Cdrom;
    match result {
        IoResult::Ok => match &plan.action {
            Action::Done(tf) | Action::DataIn { tf, .. } => *tf,
            _ if cd => atapi::good(),
            _ => reply::ok(),
        },
        IoResult::ReadError { .. } if cd => atapi::read_failed(&mut p.dev),
        IoResult::ReadError { lba } => reply::fail(error::UNC, lba),
        IoResult::WriteError { lba } => reply::fail(error::ABRT, lba),
        IoResult::BadRange | IoResult::HostFault(_) => reply::abort(),
    }
}

/// A command is done: report it (unless it was abandoned) and free its place.
fn finish(
    sh: &Shared,
    ps: &mut PortState,
    f: &Fetched,
    done: Option<(Plan, IoResult, Option<Sg>)>,
) {
    let mem = sh.mem.memory();
    sh.latency.record(f.started.elapsed());
    let p = &mut ps.port;
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
        sh.stats.commands.fetch_add(1, Relaxed);
        match result {
            IoResult::HostFault(bit) => {
                log::debug!(
                    "ahci: slot {} command {:#04x}: host fault (PxIS {bit:#x}), port halted",
                    f.slot,
                    f.fis.command
                );
                p.fatal(bit, f.slot)
            }
            _ => {
                let info = Arc::clone(&p.info);
                let tf = outcome(&info, p, &plan, result);
                if tf.status & status::ERR != 0 {
                    sh.stats.errors.fetch_add(1, Relaxed);
                    // What the guest's driver sees, for a user reading RUST_LOG=ahci=debug:
                    // the error register says why (ABRT refused, IDNF out of range, UNC/ICRC
                    // a backend failure; for ATAPI the sense key is in its upper nibble).
                    log::debug!(
                        "ahci: slot {} command {:#04x} (features {:#04x}) failed: status {:#04x} error {:#04x}",
                        f.slot,
                        f.fis.command,
                        f.fis.features,
                        tf.status,
                        tf.error
                    );
                }
                let (moved, irq) = sg.map_or((0, false), |s| (s.moved(), s.interrupt));
                match plan.action {
                    Action::Read { .. } if result == IoResult::Ok => {
                        sh.stats.read_bytes.fetch_add(moved, Relaxed);
                        info.counters.read_bytes.fetch_add(moved, Relaxed);
                    }
                    Action::Write { .. } if result == IoResult::Ok => {
                        sh.stats.written_bytes.fetch_add(moved, Relaxed);
                        info.counters.written_bytes.fetch_add(moved, Relaxed);
                    }
                    _ => {}
                }
                report(&mem, p, f, plan.proto, &tf, moved, irq);
            }
        }
    }
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

/// Map an engine result to the command's outcome.
pub fn io_result(d: &IoDone, ps: &PortState) -> IoResult {
    let (_, slot, generation) = untag(d.req.tag);
    let first_lba = ps
        .jobs
        .iter()
        .find(|j| j.f.slot == slot && j.f.generation & 0xffff_ffff_ffff == generation)
        .map(|j| match j.plan.action {
            Action::Read { lba, offset, .. } | Action::Write { lba, offset, .. } => {
                let sector = u64::from(ps.port.info.logical.max(1));
                lba + d.req.offset.saturating_sub(offset) / sector
            }
            _ => 0,
        })
        .unwrap_or(0);
    match (&d.result, d.req.op) {
        (Ok(()), _) => IoResult::Ok,
        (Err(_), Op::Read) => IoResult::ReadError { lba: first_lba },
        (Err(_), _) => IoResult::WriteError { lba: first_lba },
    }
}

/// Where the port index of a request tag is.
pub fn port_of(t: u64) -> usize {
    untag(t).0
}
