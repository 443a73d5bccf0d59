//! Admin command set: queues, Identify, features, logs, Abort, AER, Format NVM.

use std::time::Instant;

use pci::InterruptMode;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemory, Permissions};
use zerocopy::{FromZeros, IntoBytes};

use crate::ctrl::{HeldAbort, Outcome, Shared, State};
use crate::features::{Features, AEC_SUPPORTED, COMPOSITE_TEMP};
use crate::identify::{self, ACL, AERL};
use crate::namespace::LBA_FORMATS;
use crate::prp;
use crate::queue::{CompQueue, SubQueue};
use crate::spec::{admin_op, aer, cc, cns, fid, lid, SmartLog, Sqe, Status, NSID_ALL};

impl Shared {
    /// Execute one admin command.
    pub fn admin(&self, st: &mut State, sqe: &Sqe) -> Outcome {
        if sqe.psdt() != 0 || sqe.fuse() != 0 {
            return Outcome::status(Status::INVALID_FIELD); // admin data uses PRPs; no fusing
        }
        match sqe.opcode() {
            admin_op::DELETE_IO_SQ => self.delete_sq(st, sqe),
            admin_op::CREATE_IO_SQ => self.create_sq(st, sqe),
            admin_op::GET_LOG_PAGE => self.get_log_page(st, sqe),
            admin_op::DELETE_IO_CQ => self.delete_cq(st, sqe),
            admin_op::CREATE_IO_CQ => self.create_cq(st, sqe),
            admin_op::IDENTIFY => self.identify(st, sqe),
            admin_op::ABORT => self.abort(st, sqe),
            admin_op::SET_FEATURES => self.set_features(st, sqe),
            admin_op::GET_FEATURES => self.get_features(st, sqe),
            admin_op::ASYNC_EVENT_REQUEST => {
                if st.aer_cids.len() > usize::from(AERL) {
                    return Outcome::status(Status::AER_LIMIT_EXCEEDED);
                }
                st.aer_cids.push(sqe.cid());
                self.deliver_events(st);
                Outcome::Deferred
            }
            admin_op::FORMAT_NVM => self.format(st, sqe),
            admin_op::DOORBELL_BUFFER_CONFIG if self.cfg.dbbuf => {
                self.doorbell_buffer_config(st, sqe)
            }
            _ => Outcome::status(Status::INVALID_OPCODE),
        }
    }

    /// Copy `data` to the host buffer named by the command's PRPs.
    pub fn to_host(&self, st: &State, sqe: &Sqe, data: &[u8]) -> Status {
        let mem = self.mem.memory();
        let segs = match prp::map_prp(
            &*mem,
            sqe.dptr[0],
            sqe.dptr[1],
            data.len() as u64,
            Self::page_size(st),
        ) {
            Ok(s) => s,
            Err(e) => return e,
        };
        match prp::copy_to_guest(&*mem, &segs, data) {
            Ok(()) => Status::SUCCESS,
            Err(e) => e,
        }
    }

    fn data_from_host(&self, st: &State, sqe: &Sqe, len: usize) -> Result<Vec<u8>, Status> {
        let mem = self.mem.memory();
        let segs = prp::map_prp(
            &*mem,
            sqe.dptr[0],
            sqe.dptr[1],
            len as u64,
            Self::page_size(st),
        )?;
        let mut buf = vec![0; len];
        prp::copy_from_guest(&*mem, &segs, &mut buf)?;
        Ok(buf)
    }

    fn vectors(&self) -> u32 {
        let pci = self.pci.lock().unwrap_or_else(|e| e.into_inner());
        match pci.mode() {
            InterruptMode::MsiX => pci.msix_vectors() as u32,
            InterruptMode::Msi => pci.msi_vectors() as u32,
            InterruptMode::Intx => 1,
        }
    }

    fn queue_base_ok(&self, st: &State, base: u64, bytes: u64) -> Result<(), Status> {
        if base & (Self::page_size(st) - 1) != 0 {
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

    fn create_cq(&self, st: &mut State, sqe: &Sqe) -> Outcome {
        let qid = (sqe.cdw10 & 0xffff) as usize;
        let qsize = (sqe.cdw10 >> 16) + 1;
        let (pc, ien, iv) = (
            sqe.cdw11 & 1 != 0,
            sqe.cdw11 & 2 != 0,
            (sqe.cdw11 >> 16) as u16,
        );
        if qid == 0
            || qid > usize::from(st.features.ncqa) + 1
            || st.cqs.get(qid).is_none_or(|q| q.is_some())
        {
            return Outcome::status(Status::INVALID_QID);
        }
        if qsize < 2 || qsize > self.cfg.qsz {
            return Outcome::status(Status::INVALID_QUEUE_SIZE);
        }
        if !pc || (st.cc >> cc::IOCQES_SHIFT) & 0xf != 4 {
            return Outcome::status(Status::INVALID_FIELD);
        }
        if ien && u32::from(iv) >= self.vectors() {
            return Outcome::status(Status::INVALID_INTERRUPT_VECTOR);
        }
        if let Err(s) = self.queue_base_ok(st, sqe.dptr[0], u64::from(qsize) * 16) {
            return Outcome::status(s);
        }
        st.cqs[qid] = Some(CompQueue::new(sqe.dptr[0], qsize, ien, iv));
        Outcome::status(Status::SUCCESS)
    }

    fn create_sq(&self, st: &mut State, sqe: &Sqe) -> Outcome {
        let qid = (sqe.cdw10 & 0xffff) as usize;
        let qsize = (sqe.cdw10 >> 16) + 1;
        let pc = sqe.cdw11 & 1 != 0;
        let cqid = (sqe.cdw11 >> 16) as usize;
        if qid == 0
            || qid > usize::from(st.features.nsqa) + 1
            || st.sqs.get(qid).is_none_or(|q| q.is_some())
        {
            return Outcome::status(Status::INVALID_QID);
        }
        if cqid == 0 || st.cqs.get(cqid).is_none_or(|q| q.is_none()) {
            return Outcome::status(Status::CQ_INVALID);
        }
        if qsize < 2 || qsize > self.cfg.qsz {
            return Outcome::status(Status::INVALID_QUEUE_SIZE);
        }
        if !pc || (st.cc >> cc::IOSQES_SHIFT) & 0xf != 6 {
            return Outcome::status(Status::INVALID_FIELD);
        }
        if let Err(s) = self.queue_base_ok(st, sqe.dptr[0], u64::from(qsize) * 64) {
            return Outcome::status(s);
        }
        st.sqs[qid] = Some(SubQueue {
            base: sqe.dptr[0],
            size: qsize,
            head: 0,
            tail: 0,
            cqid: cqid as u16,
            inflight: 0,
            delete_cid: None,
        });
        Outcome::status(Status::SUCCESS)
    }

    fn delete_sq(&self, st: &mut State, sqe: &Sqe) -> Outcome {
        let qid = (sqe.cdw10 & 0xffff) as usize;
        let Some(sq) = st
            .sqs
            .get_mut(qid)
            .filter(|_| qid != 0)
            .and_then(|q| q.as_mut())
        else {
            return Outcome::status(Status::INVALID_QID);
        };
        if sq.delete_cid.is_some() {
            return Outcome::status(Status::INVALID_QID);
        }
        if sq.inflight > 0 {
            // Commands already started finish (and post) first; the delete completes after them.
            sq.delete_cid = Some(sqe.cid());
            return Outcome::Deferred;
        }
        st.sqs[qid] = None;
        Outcome::status(Status::SUCCESS)
    }

    fn delete_cq(&self, st: &mut State, sqe: &Sqe) -> Outcome {
        let qid = (sqe.cdw10 & 0xffff) as usize;
        if qid == 0 || st.cqs.get(qid).is_none_or(|q| q.is_none()) {
            return Outcome::status(Status::INVALID_QID);
        }
        if st
            .sqs
            .iter()
            .flatten()
            .any(|sq| usize::from(sq.cqid) == qid)
        {
            return Outcome::status(Status::INVALID_QUEUE_DELETION);
        }
        st.cqs[qid] = None;
        Outcome::status(Status::SUCCESS)
    }

    fn active_ns(&self, st: &State, nsid: u32) -> Option<usize> {
        let i = usize::try_from(nsid).ok()?.checked_sub(1)?;
        (i < st.namespaces.len()).then_some(i)
    }

    fn identify(&self, st: &mut State, sqe: &Sqe) -> Outcome {
        let cns = sqe.cdw10 as u8;
        let csi = (sqe.cdw11 >> 24) as u8;
        let nsid = sqe.nsid;
        let data = match cns {
            cns::CONTROLLER => identify::bytes(&identify::controller(&self.cfg, &st.namespaces)),
            cns::NAMESPACE => match self.active_ns(st, nsid) {
                Some(i) => identify::bytes(&identify::namespace(&self.cfg, &st.namespaces[i])),
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
                identify::active_list(&st.namespaces, nsid)
            }
            cns::NS_ID_DESCRIPTORS => match self.active_ns(st, nsid) {
                Some(_) => identify::ns_descriptors(&self.cfg, nsid),
                None => return Outcome::status(Status::INVALID_NAMESPACE),
            },
            cns::CSI_NAMESPACE => {
                if csi != 0 {
                    return Outcome::status(Status::INVALID_FIELD);
                }
                match self.active_ns(st, nsid) {
                    Some(_) => vec![0; 4096], // no protection information or extended LBA formats
                    None => return Outcome::status(Status::INVALID_NAMESPACE),
                }
            }
            cns::CSI_CONTROLLER if csi == 0 => identify::nvm_controller(&self.cfg),
            _ => return Outcome::status(Status::INVALID_FIELD),
        };
        Outcome::status(self.to_host(st, sqe, &data))
    }

    fn abort(&self, st: &mut State, sqe: &Sqe) -> Outcome {
        let sqid = (sqe.cdw10 & 0xffff) as u16;
        let cid = (sqe.cdw10 >> 16) as u16;
        if sqid == 0 {
            if let Some(p) = st.aer_cids.iter().position(|&c| c == cid) {
                st.aer_cids.remove(p);
                self.post(st, 0, cid, Status::ABORT_REQUESTED, 0);
                return Outcome::Done(Status::SUCCESS, 0);
            }
        }
        if st.inflight_cmds.contains(&(sqid, cid)) {
            if st.held_aborts.len() > usize::from(ACL) {
                return Outcome::status(Status::ABORT_LIMIT_EXCEEDED);
            }
            // Already executing on the backend: it cannot be recalled. The Abort completes,
            // reporting "not aborted", when the command does.
            st.held_aborts.push(HeldAbort {
                abort_cid: sqe.cid(),
                target_sqid: sqid,
                target_cid: cid,
            });
            return Outcome::Deferred;
        }
        Outcome::Done(Status::SUCCESS, 1) // not found: not aborted
    }

    fn check_temperature(&self, st: &mut State) {
        let f = &st.features;
        let hot =
            COMPOSITE_TEMP >= f.temp_over || (f.temp_under != 0 && COMPOSITE_TEMP <= f.temp_under);
        if hot && st.features.async_event_config & (1 << 1) != 0 {
            self.async_event(
                st,
                aer::TYPE_SMART,
                aer::SMART_TEMPERATURE,
                lid::SMART_HEALTH,
            );
        }
    }

    fn critical_warning(&self, st: &State) -> u8 {
        let f = &st.features;
        let hot =
            COMPOSITE_TEMP >= f.temp_over || (f.temp_under != 0 && COMPOSITE_TEMP <= f.temp_under);
        let ro = st.namespaces.iter().any(|n| n.read_only);
        (u8::from(hot) << 1) | (u8::from(ro) << 3)
    }

    fn feature_value(&self, st: &State, f: &Features, fid_: u8, sqe: &Sqe) -> Result<u32, Status> {
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
            fid::TIMESTAMP => {
                let _ = st;
                0
            }
            _ => return Err(Status::INVALID_FIELD),
        })
    }

    fn timestamp_bytes(&self, st: &State) -> [u8; 8] {
        let (ms, origin) = match st.timestamp {
            Some((set, at)) => (set + at.elapsed().as_millis() as u64, 1u8),
            None => (self.started.elapsed().as_millis() as u64, 0u8),
        };
        let mut b = [0u8; 8];
        b[..6].copy_from_slice(&ms.to_le_bytes()[..6]);
        b[6] = origin << 1;
        b
    }

    fn get_features(&self, st: &mut State, sqe: &Sqe) -> Outcome {
        let f = sqe.cdw10 as u8;
        let sel = (sqe.cdw10 >> 8) & 7;
        if !Features::supported(f) || sel > 3 {
            return Outcome::status(Status::INVALID_FIELD);
        }
        if Features::ns_specific(f)
            && sqe.nsid != 0
            && sqe.nsid != NSID_ALL
            && self.active_ns(st, sqe.nsid).is_none()
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
            let b = self.timestamp_bytes(st);
            return Outcome::status(self.to_host(st, sqe, &b));
        }
        let defaults;
        let feats = if sel == 0 {
            &st.features
        } else {
            defaults = Features::new(self.cfg.maxq, st.features.vector_cd.len());
            &defaults
        };
        let feats = feats.clone();
        match self.feature_value(st, &feats, f, sqe) {
            Ok(v) => Outcome::Done(Status::SUCCESS, v),
            Err(s) => Outcome::status(s),
        }
    }

    fn set_features(&self, st: &mut State, sqe: &Sqe) -> Outcome {
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
            && self.active_ns(st, sqe.nsid).is_none()
        {
            return Outcome::status(Status::INVALID_NAMESPACE);
        }
        let vectors = self.vectors();
        let ft = &mut st.features;
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
                self.check_temperature(st);
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
                if st.sqs.iter().skip(1).any(Option::is_some)
                    || st.cqs.iter().skip(1).any(Option::is_some)
                {
                    return Outcome::status(Status::COMMAND_SEQUENCE_ERROR);
                }
                let max = u32::from(self.cfg.maxq - 1);
                let ft = &mut st.features;
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
            fid::TIMESTAMP => match self.data_from_host(st, sqe, 8) {
                Ok(b) => {
                    let mut ms = [0u8; 8];
                    ms[..6].copy_from_slice(&b[..6]);
                    st.timestamp = Some((u64::from_le_bytes(ms), Instant::now()));
                }
                Err(s) => return Outcome::status(s),
            },
            _ => return Outcome::status(Status::INVALID_FIELD),
        }
        Outcome::status(Status::SUCCESS)
    }

    fn smart_log(&self, st: &State) -> Vec<u8> {
        let t = self.smart_totals(false);
        let units = |bytes: u64| u128::from(bytes.div_ceil(512).div_ceil(1000));
        let mut s = SmartLog::new_zeroed();
        s.critical_warning = self.critical_warning(st);
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
        s.num_error_log_entries = u128::from(st.logs.error_count);
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
            admin_op::DOORBELL_BUFFER_CONFIG,
        ] {
            acs[usize::from(op)] = CSUPP;
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

    fn get_log_page(&self, st: &mut State, sqe: &Sqe) -> Outcome {
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
                for e in &st.logs.errors {
                    v.extend_from_slice(e.as_bytes());
                }
                v.resize(crate::log::ERROR_LOG_ENTRIES * 64, 0);
                (v, Some(aer::TYPE_ERROR))
            }
            lid::SMART_HEALTH => {
                if sqe.nsid != 0 && sqe.nsid != NSID_ALL {
                    return Outcome::status(Status::INVALID_FIELD); // LPA bit 0: no per-namespace data
                }
                (self.smart_log(st), Some(aer::TYPE_SMART))
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
                if st.logs.changed_ns.len() > 1024 {
                    v[..4].copy_from_slice(&NSID_ALL.to_le_bytes());
                } else {
                    for (i, n) in st.logs.changed_ns.iter().enumerate() {
                        v[i * 4..i * 4 + 4].copy_from_slice(&n.to_le_bytes());
                    }
                }
                if !rae {
                    st.logs.changed_ns.clear();
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
        let mut out = vec![0u8; len as usize];
        let avail = &log[offset as usize..];
        let n = avail.len().min(out.len());
        out[..n].copy_from_slice(&avail[..n]);
        let s = self.to_host(st, sqe, &out);
        if s.is_success() && !rae {
            if let Some(t) = event_type {
                st.aer_masked[usize::from(t)] = false;
                st.aer_pending.retain(|e| e.0 != t);
                self.deliver_events(st);
            }
        }
        Outcome::status(s)
    }

    /// Doorbell Buffer Config (§5.8): the host keeps I/O queue doorbells in memory and rings
    /// MMIO only when our EventIdx asks.
    fn doorbell_buffer_config(&self, st: &mut State, sqe: &Sqe) -> Outcome {
        let (db, ei) = (sqe.dptr[0], sqe.dptr[1]);
        let page = Self::page_size(st);
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
        st.dbbuf = Some((db, ei));
        Outcome::status(Status::SUCCESS)
    }

    fn format(&self, st: &mut State, sqe: &Sqe) -> Outcome {
        let lbaf = ((sqe.cdw10 & 0xf) | (((sqe.cdw10 >> 12) & 3) << 4)) as usize;
        let pi = (sqe.cdw10 >> 5) & 7;
        let ses = (sqe.cdw10 >> 9) & 7;
        let targets: Vec<usize> = if sqe.nsid == NSID_ALL {
            (0..st.namespaces.len()).collect()
        } else {
            match self.active_ns(st, sqe.nsid) {
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
        if targets.iter().any(|&i| st.namespaces[i].read_only) {
            return Outcome::status(Status::NS_WRITE_PROTECTED);
        }
        let mut any_changed = false;
        for &i in &targets {
            let ns = &mut st.namespaces[i];
            let changed = ns.flbas != lbaf as u8;
            ns.flbas = lbaf as u8;
            let nsid = ns.nsid;
            any_changed |= changed;
            if changed && !st.logs.changed_ns.contains(&nsid) {
                st.logs.changed_ns.push(nsid);
            }
        }
        // Namespace Attribute Notices announce a changed Identify Namespace; a format that keeps
        // the LBA format changes nothing the host could re-read.
        if any_changed && st.features.async_event_config & (1 << 8) != 0 {
            self.async_event(
                st,
                aer::TYPE_NOTICE,
                aer::NOTICE_NS_ATTR_CHANGED,
                lid::CHANGED_NAMESPACES,
            );
        }
        if ses == 0 {
            return Outcome::status(Status::SUCCESS);
        }
        // User data erase: zero every target namespace off the MMIO path.
        let backends: Vec<_> = targets
            .iter()
            .map(|&i| st.namespaces[i].backend.clone())
            .collect();
        let Some(me) = self.me.upgrade() else {
            return Outcome::status(Status::INTERNAL_ERROR);
        };
        let gen = st.generation;
        let sqe = *sqe;
        if let Some(sq) = st.sqs[0].as_mut() {
            sq.inflight += 1;
        }
        st.inflight_cmds.push((0, sqe.cid()));
        self.exec.submit(Box::new(move || {
            let mut status = Status::SUCCESS;
            for b in &backends {
                let cap = b.info().capacity;
                if let Err(e) = b.write_zeroes(0, cap).and_then(|_| b.flush()) {
                    log::error!("nvme: format erase failed: {e}");
                    status = Status::INTERNAL_ERROR;
                }
            }
            me.finish_io(gen, 0, &sqe, status, 0);
        }));
        Outcome::Deferred
    }
}
