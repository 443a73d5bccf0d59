//! Admin command set: queues, Identify, features, logs, Abort, AER, Format NVM.

use std::sync::atomic::Ordering;
use std::time::Instant;

use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemory, Permissions};
use zerocopy::{FromZeros, IntoBytes};

use crate::ctrl::{flag, lock, AsyncEvent, Ctrl, HeldAbort, Outcome, Shared};
use crate::features::{Features, AEC_SUPPORTED, COMPOSITE_TEMP};
use crate::identify::{self, ACL, AERL};
use crate::namespace::Namespace;
use crate::namespace::LBA_FORMATS;
use crate::prp;
use crate::queue::{CompQueue, SubQueue};
use crate::spec::{admin_op, aer, cc, cns, fid, lid, SmartLog, Sqe, Status, NSID_ALL};

impl Shared {
    /// Execute one admin command.
    pub fn admin(&self, c: &mut Ctrl, sqe: &Sqe) -> Outcome {
        if sqe.psdt() != 0 || sqe.fuse() != 0 {
            return Outcome::status(Status::INVALID_FIELD); // admin data uses PRPs; no fusing
        }
        match sqe.opcode() {
            admin_op::DELETE_IO_SQ => self.delete_sq(c, sqe),
            admin_op::CREATE_IO_SQ => self.create_sq(c, sqe),
            admin_op::GET_LOG_PAGE => self.get_log_page(c, sqe),
            admin_op::DELETE_IO_CQ => self.delete_cq(c, sqe),
            admin_op::CREATE_IO_CQ => self.create_cq(c, sqe),
            admin_op::IDENTIFY => self.identify(c, sqe),
            admin_op::ABORT => self.abort(c, sqe),
            admin_op::SET_FEATURES => self.set_features(c, sqe),
            admin_op::GET_FEATURES => self.get_features(c, sqe),
            admin_op::ASYNC_EVENT_REQUEST => {
                if c.aer_cids.len() > usize::from(AERL) {
                    return Outcome::status(Status::AER_LIMIT_EXCEEDED);
                }
                c.aer_cids.push(sqe.cid());
                self.deliver_events(c);
                Outcome::Deferred
            }
            admin_op::FORMAT_NVM => self.format(c, sqe),
            admin_op::DOORBELL_BUFFER_CONFIG if self.cfg.dbbuf => {
                self.doorbell_buffer_config(c, sqe)
            }
            _ => Outcome::status(Status::INVALID_OPCODE),
        }
    }

    /// Copy `data` to the host buffer named by the command's PRPs.
    pub fn to_host(&self, c: &Ctrl, sqe: &Sqe, data: &[u8]) -> Status {
        self.to_host_len(c, sqe, data, data.len() as u64)
    }

    /// Copy `data` to the first bytes of a `len`-byte host buffer and zero the rest (no host
    /// buffer of `len` bytes is allocated).
    pub fn to_host_len(&self, c: &Ctrl, sqe: &Sqe, data: &[u8], len: u64) -> Status {
        let mem = self.mem.memory();
        let segs = match prp::map_prp(&*mem, sqe.dptr[0], sqe.dptr[1], len, Self::page_size(c)) {
            Ok(s) => s,
            Err(e) => return e,
        };
        match prp::copy_to_guest(&*mem, &segs, data) {
            Ok(()) => Status::SUCCESS,
            Err(e) => e,
        }
    }

    fn data_from_host(&self, c: &Ctrl, sqe: &Sqe, len: usize) -> Result<Vec<u8>, Status> {
        let mem = self.mem.memory();
        let segs = prp::map_prp(
            &*mem,
            sqe.dptr[0],
            sqe.dptr[1],
            len as u64,
            Self::page_size(c),
        )?;
        let mut buf = vec![0; len];
        prp::copy_from_guest(&*mem, &segs, &mut buf)?;
        Ok(buf)
    }

    fn vectors(&self) -> u32 {
        self.irq.vectors() as u32
    }

    /// Whether any I/O queue exists.
    fn io_queues_exist(&self) -> bool {
        self.sq_cq.iter().any(|q| q.load(Ordering::Acquire) != 0)
            || self.groups.iter().any(|g| lock(g).cq.is_some())
    }

    fn namespaces(&self) -> std::sync::RwLockReadGuard<'_, Vec<Namespace>> {
        self.ns.read().unwrap_or_else(|e| e.into_inner())
    }

    fn queue_base_ok(&self, c: &Ctrl, base: u64, bytes: u64) -> Result<(), Status> {
        if base & (Self::page_size(c) - 1) != 0 {
            return Err(Status::PRP_OFFSET_INVALID);
        }
        let mem = self.mem.memory();
        if !usize::try_from(bytes)
            .is_ok_and(|b| mem.check_range(GuestAddress(base), b, Permissions::ReadWrite))
        {
            return Err(Status::INVALID_FIELD);
        }
        Ok(())
    }

    fn create_cq(&self, c: &mut Ctrl, sqe: &Sqe) -> Outcome {
        let qid = (sqe.cdw10 & 0xffff) as usize;
        let qsize = (sqe.cdw10 >> 16) + 1;
        let (pc, ien, iv) = (
            sqe.cdw11 & 1 != 0,
            sqe.cdw11 & 2 != 0,
            (sqe.cdw11 >> 16) as u16,
        );
        if qid == 0
            || qid > usize::from(c.features.ncqa) + 1
            || self.groups.get(qid).is_none_or(|g| lock(g).cq.is_some())
        {
            return Outcome::status(Status::INVALID_QID);
        }
        if qsize < 2 || qsize > self.cfg.qsz {
            return Outcome::status(Status::INVALID_QUEUE_SIZE);
        }
        if !pc || (c.cc >> cc::IOCQES_SHIFT) & 0xf != 4 {
            return Outcome::status(Status::INVALID_FIELD);
        }
        if ien && u32::from(iv) >= self.vectors() {
            return Outcome::status(Status::INVALID_INTERRUPT_VECTOR);
        }
        if let Err(s) = self.queue_base_ok(c, sqe.dptr[0], u64::from(qsize) * 16) {
            return Outcome::status(s);
        }
        let mut g = lock(&self.groups[qid]);
        g.cq = Some(CompQueue::new(qid as u16, sqe.dptr[0], qsize, ien, iv));
        g.poll_until = None;
        Outcome::status(Status::SUCCESS)
    }

    fn create_sq(&self, c: &mut Ctrl, sqe: &Sqe) -> Outcome {
        let qid = (sqe.cdw10 & 0xffff) as usize;
        let qsize = (sqe.cdw10 >> 16) + 1;
        let pc = sqe.cdw11 & 1 != 0;
        let cqid = (sqe.cdw11 >> 16) as usize;
        if qid == 0
            || qid > usize::from(c.features.nsqa) + 1
            || self
                .sq_cq
                .get(qid)
                .is_none_or(|q| q.load(Ordering::Acquire) != 0)
        {
            return Outcome::status(Status::INVALID_QID);
        }
        if cqid == 0 || self.groups.get(cqid).is_none_or(|g| lock(g).cq.is_none()) {
            return Outcome::status(Status::CQ_INVALID);
        }
        if qsize < 2 || qsize > self.cfg.qsz {
            return Outcome::status(Status::INVALID_QUEUE_SIZE);
        }
        if !pc || (c.cc >> cc::IOSQES_SHIFT) & 0xf != 6 {
            return Outcome::status(Status::INVALID_FIELD);
        }
        if let Err(s) = self.queue_base_ok(c, sqe.dptr[0], u64::from(qsize) * 64) {
            return Outcome::status(s);
        }
        let page = Self::page_size(c);
        let epoch = self.next_epoch();
        let mut g = lock(&self.groups[cqid]);
        g.sqs.retain(|s| s.id != qid as u16);
        g.sqs.push(SubQueue::new(
            qid as u16,
            sqe.dptr[0],
            qsize,
            cqid as u16,
            page,
            epoch,
        ));
        self.sq_cq[qid].store(cqid as u16, Ordering::Release);
        Outcome::status(Status::SUCCESS)
    }

    fn delete_sq(&self, c: &mut Ctrl, sqe: &Sqe) -> Outcome {
        let qid = (sqe.cdw10 & 0xffff) as u16;
        let cqid = self
            .sq_cq
            .get(usize::from(qid))
            .map_or(0, |q| q.load(Ordering::Acquire));
        if qid == 0 || cqid == 0 {
            return Outcome::status(Status::INVALID_QID);
        }
        let mut g = lock(&self.groups[usize::from(cqid)]);
        let Some(sq) = g.sq_mut(qid) else {
            return Outcome::status(Status::INVALID_QID);
        };
        if sq.delete_cid.is_some() {
            return Outcome::status(Status::INVALID_QID);
        }
        if sq.inflight > 0 {
            // Commands already started finish (and post) first; the delete completes after them.
            sq.delete_cid = Some((Self::admin_epoch(c), sqe.cid()));
            return Outcome::Deferred;
        }
        g.sqs.retain(|s| s.id != qid);
        self.sq_cq[usize::from(qid)].store(0, Ordering::Release);
        Outcome::status(Status::SUCCESS)
    }

    fn delete_cq(&self, _c: &mut Ctrl, sqe: &Sqe) -> Outcome {
        let qid = (sqe.cdw10 & 0xffff) as usize;
        if qid == 0 || self.groups.get(qid).is_none_or(|g| lock(g).cq.is_none()) {
            return Outcome::status(Status::INVALID_QID);
        }
        if self
            .sq_cq
            .iter()
            .any(|q| usize::from(q.load(Ordering::Acquire)) == qid)
        {
            return Outcome::status(Status::INVALID_QUEUE_DELETION);
        }
        let mut g = lock(&self.groups[qid]);
        g.cq = None;
        g.poll_until = None;
        self.cq_assert[qid].store(false, Ordering::Relaxed);
        self.cq_held[qid].store(false, Ordering::Relaxed);
        Outcome::status(Status::SUCCESS)
    }

    fn active_ns(&self, _c: &Ctrl, nsid: u32) -> Option<usize> {
        let i = usize::try_from(nsid).ok()?.checked_sub(1)?;
        (i < self.namespaces().len()).then_some(i)
    }

    fn identify(&self, c: &mut Ctrl, sqe: &Sqe) -> Outcome {
        let cns = sqe.cdw10 as u8;
        let csi = (sqe.cdw11 >> 24) as u8;
        let nsid = sqe.nsid;
        let ns = self.namespaces();
        let data = match cns {
            cns::CONTROLLER => identify::bytes(&identify::controller(&self.cfg, &ns)),
            cns::NAMESPACE => match self.active_ns(c, nsid) {
                Some(i) => identify::bytes(&identify::namespace(&self.cfg, &ns[i])),
                None => return Outcome::status(Status::INVALID_NAMESPACE),
            },
            cns::ACTIVE_NS_LIST | cns::CSI_ACTIVE_NS_LIST => {
                if nsid >= 0xffff_fffe || (cns == cns::CSI_ACTIVE_NS_LIST && csi != 0) {
                    return Outcome::status(if nsid >= 0xffff_fffe {
                        Status::INVALID_NAMESPACE
                    } else {
                        Status::INVALID_FIELD
                    });
                }
                identify::active_list(&ns, nsid)
            }
            cns::NS_ID_DESCRIPTORS => match self.active_ns(c, nsid) {
                Some(_) => identify::ns_descriptors(&self.cfg, nsid),
                None => return Outcome::status(Status::INVALID_NAMESPACE),
            },
            cns::CSI_NAMESPACE => {
                if csi != 0 {
                    return Outcome::status(Status::INVALID_FIELD);
                }
                match self.active_ns(c, nsid) {
                    Some(_) => vec![0; 4096], // no protection information or extended LBA formats
                    None => return Outcome::status(Status::INVALID_NAMESPACE),
                }
            }
            cns::CSI_CONTROLLER if csi == 0 => identify::nvm_controller(&self.cfg),
            _ => return Outcome::status(Status::INVALID_FIELD),
        };
        drop(ns);
        Outcome::status(self.to_host(c, sqe, &data))
    }

    fn abort(&self, c: &mut Ctrl, sqe: &Sqe) -> Outcome {
        let sqid = (sqe.cdw10 & 0xffff) as u16;
        let cid = (sqe.cdw10 >> 16) as u16;
        if sqid == 0 {
            if let Some(p) = c.aer_cids.iter().position(|&x| x == cid) {
                c.aer_cids.remove(p);
                self.post_admin(c, cid, Status::ABORT_REQUESTED, 0);
                return Outcome::Done(Status::SUCCESS, 0);
            }
        }
        let cqid = self
            .sq_cq
            .get(usize::from(sqid))
            .map_or(0, |q| q.load(Ordering::Acquire));
        if sqid != 0 && cqid != 0 {
            let mut g = lock(&self.groups[usize::from(cqid)]);
            let slot = g.sq(sqid).and_then(|sq| sq.find_cid(cid));
            if let (Some(slot), Some(sq)) = (slot, g.sq_mut(sqid)) {
                if c.held_aborts.len() > usize::from(ACL) {
                    return Outcome::status(Status::ABORT_LIMIT_EXCEEDED);
                }
                // Already executing on the backend: it cannot be recalled. The Abort completes,
                // reporting "not aborted", when the command does.
                if let Some(s) = sq.slots[usize::from(slot)].as_mut() {
                    s.abort_waiting = true;
                }
                c.held_aborts.push(HeldAbort {
                    abort_cid: sqe.cid(),
                    target_sqid: sqid,
                    target_cid: cid,
                });
                return Outcome::Deferred;
            }
        }
        Outcome::Done(Status::SUCCESS, 1) // not found: not aborted
    }

    fn check_temperature(&self, c: &mut Ctrl) {
        let f = &c.features;
        let hot =
            COMPOSITE_TEMP >= f.temp_over || (f.temp_under != 0 && COMPOSITE_TEMP <= f.temp_under);
        if hot && c.features.async_event_config & (1 << 1) != 0 {
            self.async_event(
                c,
                AsyncEvent {
                    typ: aer::TYPE_SMART,
                    info: aer::SMART_TEMPERATURE,
                    lid: lid::SMART_HEALTH,
                },
            );
        }
    }

    fn critical_warning(&self, c: &Ctrl) -> u8 {
        let f = &c.features;
        let hot =
            COMPOSITE_TEMP >= f.temp_over || (f.temp_under != 0 && COMPOSITE_TEMP <= f.temp_under);
        let ro = self.namespaces().iter().any(|n| n.read_only);
        (u8::from(hot) << 1) | (u8::from(ro) << 3)
    }

    fn feature_value(&self, f: &Features, fid_: u8, sqe: &Sqe) -> Result<u32, Status> {
        Ok(match fid_ {
            fid::ARBITRATION => f.arbitration,
            fid::POWER_MANAGEMENT => f.power_state,
            fid::TEMPERATURE_THRESHOLD => {
                let tmpsel = (sqe.cdw11 >> 16) & 0xf;
                let thsel = (sqe.cdw11 >> 20) & 3;
                if tmpsel != 0 || thsel > 1 {
                    return Err(Status::INVALID_FIELD);
                }
                let v = if thsel == 0 {
                    f.temp_over
                } else {
                    f.temp_under
                };
                u32::from(v) | (sqe.cdw11 & 0x003f_0000)
            }
            fid::ERROR_RECOVERY => f.error_recovery,
            fid::VOLATILE_WRITE_CACHE => u32::from(f.volatile_wc),
            fid::NUMBER_OF_QUEUES => u32::from(f.nsqa) | (u32::from(f.ncqa) << 16),
            fid::INTERRUPT_COALESCING => f.coalescing,
            fid::INTERRUPT_VECTOR_CONFIG => {
                let iv = sqe.cdw11 & 0xffff;
                if iv >= self.vectors() {
                    return Err(Status::INVALID_FIELD);
                }
                iv | (u32::from(f.vector_cd.get(iv as usize).copied().unwrap_or(false)) << 16)
            }
            fid::WRITE_ATOMICITY => f.write_atomicity,
            fid::ASYNC_EVENT_CONFIG => f.async_event_config,
            fid::TIMESTAMP => 0,
            _ => return Err(Status::INVALID_FIELD),
        })
    }

    fn timestamp_bytes(&self, c: &Ctrl) -> [u8; 8] {
        let (ms, origin) = match c.timestamp {
            Some((set, at)) => (set + at.elapsed().as_millis() as u64, 1u8),
            None => (self.started.elapsed().as_millis() as u64, 0u8),
        };
        let mut b = [0u8; 8];
        b[..6].copy_from_slice(&ms.to_le_bytes()[..6]);
        b[6] = origin << 1;
        b
    }

    fn get_features(&self, c: &mut Ctrl, sqe: &Sqe) -> Outcome {
        let f = sqe.cdw10 as u8;
        let sel = (sqe.cdw10 >> 8) & 7;
        if !Features::supported(f) || sel > 3 {
            return Outcome::status(Status::INVALID_FIELD);
        }
        if Features::ns_specific(f)
            && sqe.nsid != 0
            && sqe.nsid != NSID_ALL
            && self.active_ns(c, sqe.nsid).is_none()
        {
            return Outcome::status(Status::INVALID_NAMESPACE);
        }
        if sel == 3 {
            // Capabilities: changeable, namespace specific; nothing is saveable.
            return Outcome::Done(
                Status::SUCCESS,
                (1 << 2) | (u32::from(Features::ns_specific(f)) << 1),
            );
        }
        if f == fid::TIMESTAMP {
            let b = self.timestamp_bytes(c);
            return Outcome::status(self.to_host(c, sqe, &b));
        }
        let defaults;
        let feats = if sel == 0 {
            &c.features
        } else {
            defaults = Features::new(self.cfg.maxq, c.features.vector_cd.len());
            &defaults
        };
        match self.feature_value(feats, f, sqe) {
            Ok(v) => Outcome::Done(Status::SUCCESS, v),
            Err(s) => Outcome::status(s),
        }
    }

    fn set_features(&self, c: &mut Ctrl, sqe: &Sqe) -> Outcome {
        let f = sqe.cdw10 as u8;
        let v = sqe.cdw11;
        if !Features::supported(f) {
            return Outcome::status(Status::INVALID_FIELD);
        }
        if sqe.cdw10 & (1 << 31) != 0 {
            return Outcome::status(Status::FEATURE_NOT_SAVEABLE);
        }
        if !Features::ns_specific(f) && sqe.nsid != 0 && sqe.nsid != NSID_ALL {
            return Outcome::status(Status::FEATURE_NOT_NS_SPECIFIC);
        }
        if Features::ns_specific(f)
            && sqe.nsid != 0
            && sqe.nsid != NSID_ALL
            && self.active_ns(c, sqe.nsid).is_none()
        {
            return Outcome::status(Status::INVALID_NAMESPACE);
        }
        let vectors = self.vectors();
        let ft = &mut c.features;
        match f {
            fid::ARBITRATION => ft.arbitration = v & 0xffff_ff07,
            fid::POWER_MANAGEMENT => {
                if v & 0x1f != 0 {
                    return Outcome::status(Status::INVALID_FIELD); // only power state 0 exists
                }
                ft.power_state = v & 0xff;
            }
            fid::TEMPERATURE_THRESHOLD => {
                let (tmpth, tmpsel, thsel) = ((v & 0xffff) as u16, (v >> 16) & 0xf, (v >> 20) & 3);
                if (tmpsel != 0 && tmpsel != 0xf) || thsel > 1 {
                    return Outcome::status(Status::INVALID_FIELD);
                }
                if thsel == 0 {
                    ft.temp_over = tmpth;
                } else {
                    ft.temp_under = tmpth;
                }
                self.check_temperature(c);
            }
            fid::ERROR_RECOVERY => {
                if v & (1 << 16) != 0 {
                    return Outcome::status(Status::INVALID_FIELD); // DULBE needs NSFEAT bit 2
                }
                ft.error_recovery = v & 0xffff;
            }
            fid::VOLATILE_WRITE_CACHE => ft.volatile_wc = v & 1 != 0,
            fid::NUMBER_OF_QUEUES => {
                let (nsqr, ncqr) = (v & 0xffff, v >> 16);
                if nsqr == 0xffff || ncqr == 0xffff {
                    return Outcome::status(Status::INVALID_FIELD);
                }
                if self.io_queues_exist() {
                    return Outcome::status(Status::COMMAND_SEQUENCE_ERROR);
                }
                let max = u32::from(self.cfg.maxq - 1);
                let ft = &mut c.features;
                ft.nsqa = nsqr.min(max) as u16;
                ft.ncqa = ncqr.min(max) as u16;
                ft.nq_set = true;
                return Outcome::Done(
                    Status::SUCCESS,
                    u32::from(ft.nsqa) | (u32::from(ft.ncqa) << 16),
                );
            }
            fid::INTERRUPT_COALESCING => ft.coalescing = v & 0xffff,
            fid::INTERRUPT_VECTOR_CONFIG => {
                let iv = v & 0xffff;
                if iv >= vectors || iv as usize >= ft.vector_cd.len() {
                    return Outcome::status(Status::INVALID_FIELD);
                }
                ft.vector_cd[iv as usize] = v & (1 << 16) != 0;
            }
            fid::WRITE_ATOMICITY => ft.write_atomicity = v & 1,
            fid::ASYNC_EVENT_CONFIG => ft.async_event_config = v & AEC_SUPPORTED,
            fid::TIMESTAMP => match self.data_from_host(c, sqe, 8) {
                Ok(b) => {
                    let mut ms = [0u8; 8];
                    ms[..6].copy_from_slice(&b[..6]);
                    c.timestamp = Some((u64::from_le_bytes(ms), Instant::now()));
                }
                Err(s) => return Outcome::status(s),
            },
            _ => return Outcome::status(Status::INVALID_FIELD),
        }
        self.sync_features(&c.features);
        Outcome::status(Status::SUCCESS)
    }

    fn smart_log(&self, c: &Ctrl) -> Vec<u8> {
        let t = self.smart_totals(false);
        let units = |bytes: u64| u128::from(bytes.div_ceil(512).div_ceil(1000));
        let mut s = SmartLog::new_zeroed();
        s.critical_warning = self.critical_warning(c);
        s.composite_temperature = COMPOSITE_TEMP;
        s.available_spare = 100;
        s.available_spare_threshold = 10;
        s.data_units_read = units(t.bytes_read);
        s.data_units_written = units(t.bytes_written);
        s.host_read_commands = u128::from(t.read_cmds);
        s.host_write_commands = u128::from(t.write_cmds);
        s.power_cycles = u128::from(t.power_cycles);
        s.power_on_hours = u128::from(t.power_on_secs / 3600);
        s.unsafe_shutdowns = u128::from(t.unsafe_shutdowns);
        s.media_errors = u128::from(t.media_errors);
        s.num_error_log_entries = u128::from(c.logs.error_count);
        let mut temps = [0u16; 8];
        temps[0] = COMPOSITE_TEMP;
        s.temp_sensor = temps;
        s.as_bytes().to_vec()
    }

    fn effects_log(&self) -> Vec<u8> {
        const CSUPP: u32 = 1;
        const LBCC: u32 = 1 << 1;
        const NCC: u32 = 1 << 2;
        const CSE_NS: u32 = 1 << 16;
        let mut acs = [0u32; 256];
        for op in [
            admin_op::DELETE_IO_SQ,
            admin_op::CREATE_IO_SQ,
            admin_op::GET_LOG_PAGE,
            admin_op::DELETE_IO_CQ,
            admin_op::CREATE_IO_CQ,
            admin_op::IDENTIFY,
            admin_op::ABORT,
            admin_op::SET_FEATURES,
            admin_op::GET_FEATURES,
            admin_op::ASYNC_EVENT_REQUEST,
        ] {
            acs[usize::from(op)] = CSUPP;
        }
        if self.cfg.dbbuf {
            acs[usize::from(admin_op::DOORBELL_BUFFER_CONFIG)] = CSUPP;
        }
        acs[usize::from(admin_op::FORMAT_NVM)] = CSUPP | LBCC | NCC | CSE_NS;
        let mut iocs = [0u32; 256];
        for op in [
            crate::spec::io_op::FLUSH,
            crate::spec::io_op::READ,
            crate::spec::io_op::COMPARE,
            crate::spec::io_op::VERIFY,
        ] {
            iocs[usize::from(op)] = CSUPP;
        }
        for op in [crate::spec::io_op::WRITE, crate::spec::io_op::WRITE_ZEROES] {
            iocs[usize::from(op)] = CSUPP | LBCC;
        }
        if self.cfg.dsm {
            iocs[usize::from(crate::spec::io_op::DATASET_MANAGEMENT)] = CSUPP | LBCC;
        }
        let mut v = Vec::with_capacity(4096);
        v.extend_from_slice(acs.as_bytes());
        v.extend_from_slice(iocs.as_bytes());
        v.resize(4096, 0);
        v
    }

    fn get_log_page(&self, c: &mut Ctrl, sqe: &Sqe) -> Outcome {
        let lid_ = sqe.cdw10 as u8;
        let rae = sqe.cdw10 & (1 << 15) != 0;
        let numd = ((u64::from(sqe.cdw11 & 0xffff) << 16) | u64::from(sqe.cdw10 >> 16)) + 1;
        let len = numd * 4;
        let offset = u64::from(sqe.cdw12) | (u64::from(sqe.cdw13) << 32);
        let csi = (sqe.cdw14 >> 24) as u8;
        if offset & 3 != 0 {
            return Outcome::status(Status::INVALID_FIELD);
        }
        let (log, event_type) = match lid_ {
            lid::ERROR_INFORMATION => {
                let mut v = Vec::with_capacity(crate::log::ERROR_LOG_ENTRIES * 64);
                for e in &c.logs.errors {
                    v.extend_from_slice(e.as_bytes());
                }
                v.resize(crate::log::ERROR_LOG_ENTRIES * 64, 0);
                (v, Some(aer::TYPE_ERROR))
            }
            lid::SMART_HEALTH => {
                if sqe.nsid != 0 && sqe.nsid != NSID_ALL {
                    return Outcome::status(Status::INVALID_FIELD); // LPA bit 0: no per-namespace data
                }
                (self.smart_log(c), Some(aer::TYPE_SMART))
            }
            lid::FIRMWARE_SLOT => {
                let mut v = vec![0u8; 512];
                v[0] = 1; // active slot 1
                let mut fr = [b' '; 8];
                fr[..self.cfg.firmware.len().min(8)].copy_from_slice(
                    &self.cfg.firmware.as_bytes()[..self.cfg.firmware.len().min(8)],
                );
                v[8..16].copy_from_slice(&fr);
                (v, None)
            }
            lid::CHANGED_NAMESPACES => {
                let mut v = vec![0u8; 4096];
                if c.logs.changed_ns.len() > 1024 {
                    v[..4].copy_from_slice(&NSID_ALL.to_le_bytes());
                } else {
                    for (i, n) in c.logs.changed_ns.iter().enumerate() {
                        v[i * 4..i * 4 + 4].copy_from_slice(&n.to_le_bytes());
                    }
                }
                if !rae {
                    c.logs.changed_ns.clear();
                }
                (v, Some(aer::TYPE_NOTICE))
            }
            lid::COMMANDS_SUPPORTED_EFFECTS => {
                if csi != 0 {
                    return Outcome::status(Status::INVALID_FIELD);
                }
                (self.effects_log(), None)
            }
            _ => return Outcome::status(Status::INVALID_LOG_PAGE),
        };
        if offset >= log.len() as u64 {
            return Outcome::status(Status::INVALID_FIELD);
        }
        // MDTS bounds every data transfer, admin commands included (Base 2.0 Identify Controller
        // MDTS: "a command that exceeds this transfer size is aborted with Invalid Field").
        let max = if self.cfg.mdts == 0 {
            16 << 20
        } else {
            4096u64 << self.cfg.mdts
        };
        if len > max {
            return Outcome::status(Status::INVALID_FIELD);
        }
        let avail = &log[offset as usize..];
        let n = avail.len().min(len as usize);
        let s = self.to_host_len(c, sqe, &avail[..n], len);
        if s.is_success() && !rae {
            if let Some(t) = event_type {
                c.aer_masked[usize::from(t)] = false;
                c.aer_pending.retain(|e| e.typ != t);
                self.deliver_events(c);
            }
        }
        Outcome::status(s)
    }

    /// Doorbell Buffer Config (§5.8): the host keeps I/O queue doorbells in memory and rings
    /// MMIO only when our EventIdx asks.
    fn doorbell_buffer_config(&self, c: &mut Ctrl, sqe: &Sqe) -> Outcome {
        let (db, ei) = (sqe.dptr[0], sqe.dptr[1]);
        let page = Self::page_size(c);
        let len = 8 * (usize::from(self.cfg.maxq) + 1);
        let mem = self.mem.memory();
        if db & (page - 1) != 0 || ei & (page - 1) != 0 || db == 0 || ei == 0 {
            return Outcome::status(Status::INVALID_FIELD);
        }
        if !mem.check_range(GuestAddress(db), len, Permissions::ReadWrite)
            || !mem.check_range(GuestAddress(ei), len, Permissions::ReadWrite)
        {
            return Outcome::status(Status::INVALID_FIELD);
        }
        c.dbbuf = Some((db, ei));
        self.shadow.0.store(db, Ordering::Release);
        self.shadow.1.store(ei, Ordering::Release);
        self.flags.fetch_or(flag::SHADOW, Ordering::AcqRel);
        Outcome::status(Status::SUCCESS)
    }

    fn format(&self, c: &mut Ctrl, sqe: &Sqe) -> Outcome {
        let lbaf = ((sqe.cdw10 & 0xf) | (((sqe.cdw10 >> 12) & 3) << 4)) as usize;
        let pi = (sqe.cdw10 >> 5) & 7;
        let ses = (sqe.cdw10 >> 9) & 7;
        let mut ns = self.ns.write().unwrap_or_else(|e| e.into_inner());
        let targets: Vec<usize> = if sqe.nsid == NSID_ALL {
            (0..ns.len()).collect()
        } else {
            match usize::try_from(sqe.nsid)
                .ok()
                .and_then(|n| n.checked_sub(1))
                .filter(|&i| i < ns.len())
            {
                Some(i) => vec![i],
                None => return Outcome::status(Status::INVALID_NAMESPACE),
            }
        };
        if lbaf >= LBA_FORMATS.len() || pi != 0 {
            return Outcome::status(Status::INVALID_FORMAT);
        }
        if ses > 1 {
            return Outcome::status(Status::INVALID_FIELD); // no cryptographic erase
        }
        if targets.iter().any(|&i| ns[i].read_only) {
            return Outcome::status(Status::NS_WRITE_PROTECTED);
        }
        let mut any_changed = false;
        for &i in &targets {
            let n = &mut ns[i];
            let changed = n.flbas != lbaf as u8;
            n.flbas = lbaf as u8;
            let nsid = n.nsid;
            any_changed |= changed;
            if changed && !c.logs.changed_ns.contains(&nsid) {
                c.logs.changed_ns.push(nsid);
            }
        }
        let backends: Vec<_> = targets.iter().map(|&i| ns[i].backend.clone()).collect();
        drop(ns);
        // Namespace Attribute Notices announce a changed Identify Namespace; a format that keeps
        // the LBA format changes nothing the host could re-read.
        if any_changed && c.features.async_event_config & (1 << 8) != 0 {
            self.async_event(
                c,
                AsyncEvent {
                    typ: aer::TYPE_NOTICE,
                    info: aer::NOTICE_NS_ATTR_CHANGED,
                    lid: lid::CHANGED_NAMESPACES,
                },
            );
        }
        if ses == 0 {
            return Outcome::status(Status::SUCCESS);
        }
        // User data erase: zero every target namespace off the register path.
        let Some(me) = self.me.upgrade() else {
            return Outcome::status(Status::INTERNAL_ERROR);
        };
        let (cid, epoch) = (sqe.cid(), Self::admin_epoch(c));
        self.begin();
        self.pool.submit(Box::new(move || {
            let mut status = Status::SUCCESS;
            for b in &backends {
                let cap = b.info().capacity;
                if let Err(e) = b.write_zeroes(0, cap).and_then(|_| b.flush()) {
                    log::error!("nvme: format erase failed: {e}");
                    status = Status::INTERNAL_ERROR;
                }
            }
            let mut work = crate::ctrl::Work::default();
            me.end(&mut work);
            work.admin_done.push((epoch, cid, status, 0));
            me.finish_work(work);
        }));
        Outcome::Deferred
    }
}
