//! Admin command set: queues, Identify, features, logs, Abort, AER, Format NVM.

use std::sync::atomic::Ordering;
use std::time::Instant;

use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemory, Permissions};
use zerocopy::{FromZeros, IntoBytes};

use crate::commands;
use crate::ctrl::{flag, lock, AsyncEvent, Ctrl, HeldAbort, Outcome, Shared};
use crate::error::{NvmeError, Reason};
use crate::features::{Features, AEC_SUPPORTED, COMPOSITE_TEMP};
use crate::identify::{self, ACL, AERL};
use crate::logpage::RunningSelfTest;
use crate::namespace::Namespace;
use crate::namespace::LBA_FORMATS;
use crate::prp;
use crate::queue::{CompQueue, SubQueue};
use crate::spec::dw::{
    Cc, Cdw10Abort, Cdw10CreateQueue, Cdw10DeleteQueue, Cdw10Format, Cdw10GetFeatures,
    Cdw10GetLogPage, Cdw10Identify, Cdw10SetFeatures, Cdw11CreateIoCompletionQueue,
    Cdw11CreateIoSubmissionQueue, Cdw11GetLogPage, Cdw11Identify, Cdw11InterruptVectorConfig,
    Cdw11NumberOfQueues, Cdw11TemperatureThreshold, Cdw14GetLogPage,
};
use crate::spec::{aer, cns, fid, lid, self_test, AdminOpcode, SmartLog, Sqe, Status, NSID_ALL};

/// What an admin command handler returns: its outcome, or why it failed.
type CmdResult = Result<Outcome, NvmeError>;

fn ok() -> CmdResult {
    Ok(Outcome::status(Status::SUCCESS))
}

fn bad_qid(qid: impl Into<u32>, why: &'static str) -> NvmeError {
    NvmeError::new(
        Status::INVALID_QID,
        Reason::InvalidQueueId {
            qid: qid.into(),
            why,
        },
    )
}

impl Shared {
    /// Execute one admin command: the command table decides what is supported, and a
    /// refusal is logged at debug level with its reason.
    pub fn admin(&self, c: &mut Ctrl, sqe: &Sqe) -> Outcome {
        let op = AdminOpcode(sqe.opcode());
        log::trace!(
            "nvme {}: admin cid {} {op} nsid {:#x} cdw10 {:#010x} cdw11 {:#010x} prp {:#x}/{:#x}",
            self.cfg.serial,
            sqe.cid(),
            sqe.nsid,
            sqe.cdw10,
            sqe.cdw11,
            sqe.dptr[0],
            sqe.dptr[1]
        );
        match self.run_admin(c, sqe, op) {
            Ok(o) => o,
            Err(e) => {
                log::debug!(
                    "nvme {}: admin cid {} {op} refused: {e}",
                    self.cfg.serial,
                    sqe.cid()
                );
                Outcome::status(e.status)
            }
        }
    }

    fn run_admin(&self, c: &mut Ctrl, sqe: &Sqe, op: AdminOpcode) -> CmdResult {
        if sqe.psdt() != 0 {
            return Err(NvmeError::field("admin commands take PRPs, not SGLs"));
        }
        if sqe.fuse() != 0 {
            return Err(NvmeError::field("admin commands cannot be fused"));
        }
        if commands::admin(&self.cfg, op).is_none() {
            return Err(NvmeError::new(Status::INVALID_OPCODE, Reason::Opcode));
        }
        match op {
            AdminOpcode::DELETE_IO_SQ => self.delete_sq(c, sqe),
            AdminOpcode::CREATE_IO_SQ => self.create_sq(c, sqe),
            AdminOpcode::GET_LOG_PAGE => self.get_log_page(c, sqe),
            AdminOpcode::DELETE_IO_CQ => self.delete_cq(c, sqe),
            AdminOpcode::CREATE_IO_CQ => self.create_cq(c, sqe),
            AdminOpcode::IDENTIFY => self.identify(c, sqe),
            AdminOpcode::ABORT => self.abort(c, sqe),
            AdminOpcode::SET_FEATURES => self.set_features(c, sqe),
            AdminOpcode::GET_FEATURES => self.get_features(c, sqe),
            AdminOpcode::ASYNC_EVENT_REQUEST => {
                if c.aer_cids.len() > usize::from(AERL) {
                    return Err(NvmeError::new(
                        Status::AER_LIMIT_EXCEEDED,
                        Reason::Limit("Asynchronous Event Request"),
                    ));
                }
                c.aer_cids.push(sqe.cid());
                self.deliver_events(c);
                Ok(Outcome::Deferred)
            }
            AdminOpcode::FORMAT_NVM => self.format(c, sqe),
            AdminOpcode::DEVICE_SELF_TEST => self.device_self_test(c, sqe),
            AdminOpcode::DOORBELL_BUFFER_CONFIG => self.doorbell_buffer_config(c, sqe),
            // In the table but without a handler: a bug, answered as the spec allows.
            _ => Err(NvmeError::new(Status::INVALID_OPCODE, Reason::Opcode)),
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

    fn queue_base_ok(&self, c: &Ctrl, base: u64, bytes: u64) -> Result<(), NvmeError> {
        if base & (Self::page_size(c) - 1) != 0 {
            return Err(NvmeError::new(
                Status::PRP_OFFSET_INVALID,
                Reason::Field("queue base not page aligned"),
            ));
        }
        let mem = self.mem.memory();
        if !usize::try_from(bytes)
            .is_ok_and(|b| mem.check_range(GuestAddress(base), b, Permissions::ReadWrite))
        {
            return Err(NvmeError::field("queue memory outside guest RAM"));
        }
        Ok(())
    }

    fn queue_size_ok(&self, qsize: u32) -> Result<(), NvmeError> {
        if qsize < 2 || qsize > self.cfg.qsz {
            return Err(NvmeError::new(
                Status::INVALID_QUEUE_SIZE,
                Reason::QueueSize {
                    size: qsize,
                    max: self.cfg.qsz,
                },
            ));
        }
        Ok(())
    }

    fn create_cq(&self, c: &mut Ctrl, sqe: &Sqe) -> CmdResult {
        let d10 = Cdw10CreateQueue::from_bits(sqe.cdw10);
        let d11 = Cdw11CreateIoCompletionQueue::from_bits(sqe.cdw11);
        let (qid, qsize) = (usize::from(d10.qid()), u32::from(d10.qsize()) + 1);
        if qid == 0 {
            return Err(bad_qid(
                d10.qid(),
                "the admin queue is not created by command",
            ));
        }
        if qid > usize::from(c.features.ncqa) + 1 {
            return Err(bad_qid(d10.qid(), "beyond the Number of Queues granted"));
        }
        if self.groups.get(qid).is_none_or(|g| lock(g).cq.is_some()) {
            return Err(bad_qid(d10.qid(), "completion queue exists"));
        }
        self.queue_size_ok(qsize)?;
        if !d11.pc() {
            return Err(NvmeError::field("queues must be physically contiguous"));
        }
        if Cc::from_bits(c.cc).iocqes() != 4 {
            return Err(NvmeError::field("CC.IOCQES is not 16 bytes"));
        }
        if d11.ien() && u32::from(d11.iv()) >= self.vectors() {
            return Err(NvmeError::new(
                Status::INVALID_INTERRUPT_VECTOR,
                Reason::Vector {
                    iv: u32::from(d11.iv()),
                    vectors: self.vectors(),
                },
            ));
        }
        self.queue_base_ok(c, sqe.dptr[0], u64::from(qsize) * 16)?;
        let mut g = lock(&self.groups[qid]);
        g.cq = Some(CompQueue::new(
            qid as u16,
            sqe.dptr[0],
            qsize,
            d11.ien(),
            d11.iv(),
        ));
        g.poll_until = None;
        ok()
    }

    fn create_sq(&self, c: &mut Ctrl, sqe: &Sqe) -> CmdResult {
        let d10 = Cdw10CreateQueue::from_bits(sqe.cdw10);
        let d11 = Cdw11CreateIoSubmissionQueue::from_bits(sqe.cdw11);
        let (qid, qsize, cqid) = (
            usize::from(d10.qid()),
            u32::from(d10.qsize()) + 1,
            usize::from(d11.cqid()),
        );
        if qid == 0 {
            return Err(bad_qid(
                d10.qid(),
                "the admin queue is not created by command",
            ));
        }
        if qid > usize::from(c.features.nsqa) + 1 {
            return Err(bad_qid(d10.qid(), "beyond the Number of Queues granted"));
        }
        if self
            .sq_cq
            .get(qid)
            .is_none_or(|q| q.load(Ordering::Acquire) != 0)
        {
            return Err(bad_qid(d10.qid(), "submission queue exists"));
        }
        if cqid == 0 || self.groups.get(cqid).is_none_or(|g| lock(g).cq.is_none()) {
            return Err(NvmeError::new(
                Status::CQ_INVALID,
                Reason::InvalidQueueId {
                    qid: u32::from(d11.cqid()),
                    why: "no such completion queue",
                },
            ));
        }
        self.queue_size_ok(qsize)?;
        if !d11.pc() {
            return Err(NvmeError::field("queues must be physically contiguous"));
        }
        if Cc::from_bits(c.cc).iosqes() != 6 {
            return Err(NvmeError::field("CC.IOSQES is not 64 bytes"));
        }
        self.queue_base_ok(c, sqe.dptr[0], u64::from(qsize) * 64)?;
        let page = Self::page_size(c);
        let epoch = self.next_epoch();
        let mut g = lock(&self.groups[cqid]);
        g.sqs.retain(|s| s.id != qid as u16);
        g.sqs
            .push(SubQueue::new(qid as u16, sqe.dptr[0], qsize, page, epoch));
        self.sq_cq[qid].store(cqid as u16, Ordering::Release);
        ok()
    }

    fn delete_sq(&self, c: &mut Ctrl, sqe: &Sqe) -> CmdResult {
        let qid = Cdw10DeleteQueue::from_bits(sqe.cdw10).qid();
        let cqid = self
            .sq_cq
            .get(usize::from(qid))
            .map_or(0, |q| q.load(Ordering::Acquire));
        if qid == 0 || cqid == 0 {
            return Err(bad_qid(qid, "no such I/O submission queue"));
        }
        let mut g = lock(&self.groups[usize::from(cqid)]);
        let Some(sq) = g.sq_mut(qid) else {
            return Err(bad_qid(qid, "no such I/O submission queue"));
        };
        if sq.delete_cid.is_some() {
            return Err(bad_qid(qid, "already being deleted"));
        }
        if sq.inflight > 0 {
            // Commands already started finish (and post) first; the delete completes after them.
            sq.delete_cid = Some((Self::admin_epoch(c), sqe.cid()));
            return Ok(Outcome::Deferred);
        }
        g.sqs.retain(|s| s.id != qid);
        self.sq_cq[usize::from(qid)].store(0, Ordering::Release);
        ok()
    }

    fn delete_cq(&self, _c: &mut Ctrl, sqe: &Sqe) -> CmdResult {
        let id = Cdw10DeleteQueue::from_bits(sqe.cdw10).qid();
        let qid = usize::from(id);
        if qid == 0 || self.groups.get(qid).is_none_or(|g| lock(g).cq.is_none()) {
            return Err(bad_qid(id, "no such I/O completion queue"));
        }
        if self
            .sq_cq
            .iter()
            .any(|q| usize::from(q.load(Ordering::Acquire)) == qid)
        {
            return Err(NvmeError::new(
                Status::INVALID_QUEUE_DELETION,
                Reason::InvalidQueueId {
                    qid: u32::from(id),
                    why: "submission queues still use it",
                },
            ));
        }
        let mut g = lock(&self.groups[qid]);
        g.cq = None;
        g.poll_until = None;
        self.cq_assert[qid].store(false, Ordering::Relaxed);
        self.cq_held[qid].store(false, Ordering::Relaxed);
        ok()
    }

    fn active_ns(&self, _c: &Ctrl, nsid: u32) -> Option<usize> {
        let i = usize::try_from(nsid).ok()?.checked_sub(1)?;
        (i < self.namespaces().len()).then_some(i)
    }

    fn active(&self, c: &Ctrl, nsid: u32) -> Result<usize, NvmeError> {
        self.active_ns(c, nsid).ok_or(NvmeError::new(
            Status::INVALID_NAMESPACE,
            Reason::Namespace { nsid },
        ))
    }

    fn identify(&self, c: &mut Ctrl, sqe: &Sqe) -> CmdResult {
        let cns = Cdw10Identify::from_bits(sqe.cdw10).cns();
        let csi = Cdw11Identify::from_bits(sqe.cdw11).csi();
        let nsid = sqe.nsid;
        let ns = self.namespaces();
        let data = match cns {
            cns::CONTROLLER => identify::bytes(&identify::controller(&self.cfg, &ns)),
            cns::NAMESPACE => {
                let i = self.active(c, nsid)?;
                identify::bytes(&identify::namespace(&self.cfg, &ns[i]))
            }
            cns::ACTIVE_NS_LIST | cns::CSI_ACTIVE_NS_LIST => {
                if nsid >= 0xffff_fffe {
                    return Err(NvmeError::new(
                        Status::INVALID_NAMESPACE,
                        Reason::Namespace { nsid },
                    ));
                }
                if cns == cns::CSI_ACTIVE_NS_LIST && csi != 0 {
                    return Err(NvmeError::field("only the NVM command set (CSI 0)"));
                }
                identify::active_list(&ns, nsid)
            }
            cns::NS_ID_DESCRIPTORS => {
                self.active(c, nsid)?;
                identify::ns_descriptors(&self.cfg, nsid)
            }
            cns::CSI_NAMESPACE => {
                if csi != 0 {
                    return Err(NvmeError::field("only the NVM command set (CSI 0)"));
                }
                self.active(c, nsid)?;
                vec![0; 4096] // no protection information or extended LBA formats
            }
            cns::CSI_CONTROLLER if csi == 0 => identify::nvm_controller(&self.cfg),
            _ => return Err(NvmeError::field("CNS value not supported")),
        };
        drop(ns);
        Ok(Outcome::status(self.to_host(c, sqe, &data)))
    }

    fn abort(&self, c: &mut Ctrl, sqe: &Sqe) -> CmdResult {
        let d10 = Cdw10Abort::from_bits(sqe.cdw10);
        let (sqid, cid) = (d10.sqid(), d10.cid());
        if sqid == 0 {
            if let Some(p) = c.aer_cids.iter().position(|&x| x == cid) {
                c.aer_cids.remove(p);
                self.post_admin(c, cid, Status::ABORT_REQUESTED, 0);
                return Ok(Outcome::Done(Status::SUCCESS, 0));
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
                    return Err(NvmeError::new(
                        Status::ABORT_LIMIT_EXCEEDED,
                        Reason::Limit("Abort"),
                    ));
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
                return Ok(Outcome::Deferred);
            }
        }
        Ok(Outcome::Done(Status::SUCCESS, 1)) // not found: not aborted
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

    fn feature_value(&self, f: &Features, fid_: u8, sqe: &Sqe) -> Result<u32, NvmeError> {
        Ok(match fid_ {
            fid::ARBITRATION => f.arbitration,
            fid::POWER_MANAGEMENT => f.power_state,
            fid::TEMPERATURE_THRESHOLD => {
                let t = Cdw11TemperatureThreshold::from_bits(sqe.cdw11);
                if t.tmpsel() != 0 {
                    return Err(NvmeError::field("only the composite temperature sensor"));
                }
                if t.thsel() > 1 {
                    return Err(NvmeError::field("threshold type select is reserved"));
                }
                let v = if t.thsel() == 0 {
                    f.temp_over
                } else {
                    f.temp_under
                };
                Cdw11TemperatureThreshold::new()
                    .with_tmpth(v)
                    .with_thsel(t.thsel())
                    .into_bits()
            }
            fid::ERROR_RECOVERY => f.error_recovery,
            fid::VOLATILE_WRITE_CACHE => u32::from(f.volatile_wc),
            fid::NUMBER_OF_QUEUES => Cdw11NumberOfQueues::new()
                .with_nsq(f.nsqa)
                .with_ncq(f.ncqa)
                .into_bits(),
            fid::INTERRUPT_COALESCING => f.coalescing,
            fid::INTERRUPT_VECTOR_CONFIG => {
                let iv = Cdw11InterruptVectorConfig::from_bits(sqe.cdw11).iv();
                if u32::from(iv) >= self.vectors() {
                    return Err(NvmeError::field("interrupt vector beyond the function's"));
                }
                let cd = f.vector_cd.get(usize::from(iv)).copied().unwrap_or(false);
                Cdw11InterruptVectorConfig::new()
                    .with_iv(iv)
                    .with_cd(cd)
                    .into_bits()
            }
            fid::WRITE_ATOMICITY => f.write_atomicity,
            fid::ASYNC_EVENT_CONFIG => f.async_event_config,
            // Timestamp is data, not a dword: Get Features answers it before asking here.
            _ => return Err(NvmeError::field("feature not supported")),
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

    /// A feature's namespace check: a namespace-specific feature names an active namespace
    /// (or all), any other names none.
    fn feature_nsid_ok(&self, c: &Ctrl, f: u8, nsid: u32) -> Result<(), NvmeError> {
        if nsid == 0 || nsid == NSID_ALL {
            return Ok(());
        }
        if Features::ns_specific(f) {
            self.active(c, nsid).map(drop)
        } else {
            Err(NvmeError::new(
                Status::FEATURE_NOT_NS_SPECIFIC,
                Reason::Field("feature is not namespace specific"),
            ))
        }
    }

    fn get_features(&self, c: &mut Ctrl, sqe: &Sqe) -> CmdResult {
        let d10 = Cdw10GetFeatures::from_bits(sqe.cdw10);
        let (f, sel) = (d10.fid(), d10.sel());
        if !Features::supported(f) {
            return Err(NvmeError::field("feature not supported"));
        }
        if sel > 3 {
            return Err(NvmeError::field("select value is reserved"));
        }
        if Features::ns_specific(f) {
            self.feature_nsid_ok(c, f, sqe.nsid)?;
        }
        if sel == 3 {
            // Capabilities: changeable, namespace specific; nothing is saveable.
            return Ok(Outcome::Done(
                Status::SUCCESS,
                (1 << 2) | (u32::from(Features::ns_specific(f)) << 1),
            ));
        }
        if f == fid::TIMESTAMP {
            let b = self.timestamp_bytes(c);
            return Ok(Outcome::status(self.to_host(c, sqe, &b)));
        }
        let defaults;
        let feats = if sel == 0 {
            &c.features
        } else {
            defaults = Features::new(self.cfg.maxq, c.features.vector_cd.len());
            &defaults
        };
        Ok(Outcome::Done(
            Status::SUCCESS,
            self.feature_value(feats, f, sqe)?,
        ))
    }

    fn set_features(&self, c: &mut Ctrl, sqe: &Sqe) -> CmdResult {
        let d10 = Cdw10SetFeatures::from_bits(sqe.cdw10);
        let (f, v) = (d10.fid(), sqe.cdw11);
        if !Features::supported(f) {
            return Err(NvmeError::field("feature not supported"));
        }
        if d10.sv() {
            return Err(NvmeError::new(
                Status::FEATURE_NOT_SAVEABLE,
                Reason::Field("no feature is saveable"),
            ));
        }
        self.feature_nsid_ok(c, f, sqe.nsid)?;
        let vectors = self.vectors();
        let ft = &mut c.features;
        match f {
            fid::ARBITRATION => ft.arbitration = v & 0xffff_ff07,
            fid::POWER_MANAGEMENT => {
                if v & 0x1f != 0 {
                    return Err(NvmeError::field("only power state 0 exists"));
                }
                ft.power_state = v & 0xff;
            }
            fid::TEMPERATURE_THRESHOLD => {
                let t = Cdw11TemperatureThreshold::from_bits(v);
                if t.tmpsel() != 0 && t.tmpsel() != 0xf {
                    return Err(NvmeError::field("only the composite temperature sensor"));
                }
                if t.thsel() > 1 {
                    return Err(NvmeError::field("threshold type select is reserved"));
                }
                if t.thsel() == 0 {
                    ft.temp_over = t.tmpth();
                } else {
                    ft.temp_under = t.tmpth();
                }
                self.check_temperature(c);
            }
            fid::ERROR_RECOVERY => {
                if v & (1 << 16) != 0 {
                    return Err(NvmeError::field("DULBE needs deallocated-block errors"));
                }
                ft.error_recovery = v & 0xffff;
            }
            fid::VOLATILE_WRITE_CACHE => ft.volatile_wc = v & 1 != 0,
            fid::NUMBER_OF_QUEUES => {
                let q = Cdw11NumberOfQueues::from_bits(v);
                if q.nsq() == 0xffff || q.ncq() == 0xffff {
                    return Err(NvmeError::field("65536 queues requested"));
                }
                if self.io_queues_exist() {
                    return Err(NvmeError::new(
                        Status::COMMAND_SEQUENCE_ERROR,
                        Reason::Sequence("Number of Queues set after I/O queues were created"),
                    ));
                }
                let max = self.cfg.maxq - 1;
                let ft = &mut c.features;
                ft.nsqa = q.nsq().min(max);
                ft.ncqa = q.ncq().min(max);
                ft.nq_set = true;
                let granted = Cdw11NumberOfQueues::new()
                    .with_nsq(ft.nsqa)
                    .with_ncq(ft.ncqa);
                return Ok(Outcome::Done(Status::SUCCESS, granted.into_bits()));
            }
            fid::INTERRUPT_COALESCING => ft.coalescing = v & 0xffff,
            fid::INTERRUPT_VECTOR_CONFIG => {
                let ivc = Cdw11InterruptVectorConfig::from_bits(v);
                let iv = usize::from(ivc.iv());
                if iv >= vectors as usize || iv >= ft.vector_cd.len() {
                    return Err(NvmeError::field("interrupt vector beyond the function's"));
                }
                ft.vector_cd[iv] = ivc.cd();
            }
            fid::WRITE_ATOMICITY => ft.write_atomicity = v & 1,
            fid::ASYNC_EVENT_CONFIG => ft.async_event_config = v & AEC_SUPPORTED,
            fid::TIMESTAMP => {
                let b = self.data_from_host(c, sqe, 8)?;
                let mut ms = [0u8; 8];
                ms[..6].copy_from_slice(&b[..6]);
                c.timestamp = Some((u64::from_le_bytes(ms), Instant::now()));
            }
            _ => return Err(NvmeError::field("feature not supported")),
        }
        self.sync_features(&c.features);
        ok()
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

    fn get_log_page(&self, c: &mut Ctrl, sqe: &Sqe) -> CmdResult {
        let d10 = Cdw10GetLogPage::from_bits(sqe.cdw10);
        let d11 = Cdw11GetLogPage::from_bits(sqe.cdw11);
        let (lid_, rae) = (d10.lid(), d10.rae());
        let numd = ((u64::from(d11.numdu()) << 16) | u64::from(d10.numdl())) + 1;
        let len = numd * 4;
        let offset = u64::from(sqe.cdw12) | (u64::from(sqe.cdw13) << 32);
        let d14 = Cdw14GetLogPage::from_bits(sqe.cdw14);
        let csi = d14.csi();
        // No log takes an index offset (IOS clear in Supported Log Pages): OT=1 is refused.
        if d14.ot() {
            return Err(NvmeError::field("index offsets are not supported"));
        }
        if offset & 3 != 0 {
            return Err(NvmeError::field("log page offset not dword aligned"));
        }
        let (log, event_type) = match lid_ {
            lid::ERROR_INFORMATION => {
                let mut v = Vec::with_capacity(crate::logpage::ERROR_LOG_ENTRIES * 64);
                for e in &c.logs.errors {
                    v.extend_from_slice(e.as_bytes());
                }
                v.resize(crate::logpage::ERROR_LOG_ENTRIES * 64, 0);
                (v, Some(aer::TYPE_ERROR))
            }
            lid::SMART_HEALTH => {
                if sqe.nsid != 0 && sqe.nsid != NSID_ALL {
                    // LPA bit 0 is clear: there is no per-namespace SMART data.
                    return Err(NvmeError::field("SMART log is controller-wide only"));
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
                    return Err(NvmeError::field("only the NVM command set (CSI 0)"));
                }
                (commands::effects_log(&self.cfg), None)
            }
            lid::SUPPORTED_LOG_PAGES => {
                if csi != 0 {
                    return Err(NvmeError::field("only the NVM command set (CSI 0)"));
                }
                (crate::logpage::supported_log_pages(), None)
            }
            lid::DEVICE_SELF_TEST => (c.logs.self_test_log(Instant::now()), None),
            // Base 2.0 §5.16: an unsupported Log Identifier is aborted with Invalid Field in
            // Command (not the older Invalid Log Page).
            _ => {
                return Err(NvmeError::new(
                    Status::INVALID_FIELD,
                    Reason::LogPage { lid: lid_ },
                ))
            }
        };
        if offset >= log.len() as u64 {
            return Err(NvmeError::field("log page offset past its end"));
        }
        // MDTS bounds every data transfer, admin commands included (Base 2.0 Identify Controller
        // MDTS: "a command that exceeds this transfer size is aborted with Invalid Field").
        let max = if self.cfg.mdts == 0 {
            16 << 20
        } else {
            4096u64 << self.cfg.mdts
        };
        if len > max {
            return Err(NvmeError::new(
                Status::INVALID_FIELD,
                Reason::TooLarge { bytes: len, max },
            ));
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
        Ok(Outcome::status(s))
    }

    /// Device Self-test (§5.9). An image has no media or electronics to exercise; the short
    /// and extended operations run for a few seconds in the background (see
    /// [`crate::logpage::RunningSelfTest`]) and end "completed without error".
    fn device_self_test(&self, c: &mut Ctrl, sqe: &Sqe) -> CmdResult {
        let stc = (sqe.cdw10 & 0xf) as u8;
        let nsid = sqe.nsid;
        if nsid != 0 && nsid != NSID_ALL {
            self.active(c, nsid)?;
        }
        let now = Instant::now();
        c.logs.settle_self_test(now);
        match stc {
            self_test::SHORT | self_test::EXTENDED => {
                if c.logs.self_test_running.is_some() {
                    return Err(NvmeError::new(
                        Status::SELF_TEST_IN_PROGRESS,
                        Reason::Sequence("a device self-test is already running"),
                    ));
                }
                c.logs.self_test_running = Some(RunningSelfTest {
                    stc,
                    nsid,
                    started: now,
                    poh_secs: self.smart_totals(false).power_on_secs,
                });
                ok()
            }
            self_test::ABORT => {
                c.logs.abort_self_test(self_test::ABORTED_BY_COMMAND);
                ok()
            }
            _ => Err(NvmeError::field(
                "reserved or vendor specific self-test code",
            )),
        }
    }

    /// Doorbell Buffer Config (§5.8): the host keeps I/O queue doorbells in memory and rings
    /// MMIO only when our EventIdx asks.
    fn doorbell_buffer_config(&self, c: &mut Ctrl, sqe: &Sqe) -> CmdResult {
        let (db, ei) = (sqe.dptr[0], sqe.dptr[1]);
        let page = Self::page_size(c);
        let len = 8 * (usize::from(self.cfg.maxq) + 1);
        let mem = self.mem.memory();
        if db & (page - 1) != 0 || ei & (page - 1) != 0 || db == 0 || ei == 0 {
            return Err(NvmeError::field(
                "buffers must be non-zero and page aligned",
            ));
        }
        if !mem.check_range(GuestAddress(db), len, Permissions::ReadWrite)
            || !mem.check_range(GuestAddress(ei), len, Permissions::ReadWrite)
        {
            return Err(NvmeError::field("buffers outside guest RAM"));
        }
        c.dbbuf = Some((db, ei));
        self.shadow.0.store(db, Ordering::Release);
        self.shadow.1.store(ei, Ordering::Release);
        self.flags.fetch_or(flag::SHADOW, Ordering::AcqRel);
        ok()
    }

    fn format(&self, c: &mut Ctrl, sqe: &Sqe) -> CmdResult {
        let d10 = Cdw10Format::from_bits(sqe.cdw10);
        let (lbaf, pi, ses) = (d10.lbaf(), d10.pi(), d10.ses());
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
                None => {
                    return Err(NvmeError::new(
                        Status::INVALID_NAMESPACE,
                        Reason::Namespace { nsid: sqe.nsid },
                    ))
                }
            }
        };
        if lbaf >= LBA_FORMATS.len() {
            return Err(NvmeError::new(
                Status::INVALID_FORMAT,
                Reason::Field("no such LBA format"),
            ));
        }
        if pi != 0 {
            return Err(NvmeError::new(
                Status::INVALID_FORMAT,
                Reason::Field("no protection information"),
            ));
        }
        if ses > 1 {
            return Err(NvmeError::field("no cryptographic erase"));
        }
        if targets.iter().any(|&i| ns[i].read_only) {
            return Err(NvmeError::new(Status::NS_WRITE_PROTECTED, Reason::ReadOnly));
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
        // A self-test that covers a formatted namespace is aborted (§5.9).
        c.logs.settle_self_test(Instant::now());
        // (NSID 0: the test covers the controller only, no namespace.)
        if c.logs.self_test_running.is_some_and(|t| {
            t.nsid != 0 && (t.nsid == NSID_ALL || sqe.nsid == NSID_ALL || t.nsid == sqe.nsid)
        }) {
            c.logs.abort_self_test(self_test::ABORTED_BY_FORMAT);
        }
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
            return ok();
        }
        // User data erase: zero every target namespace off the register path.
        let Some(me) = self.me.upgrade() else {
            return Err(NvmeError::new(
                Status::INTERNAL_ERROR,
                Reason::Sequence("controller is being dropped"),
            ));
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
        Ok(Outcome::Deferred)
    }
}
