//! NVM command set I/O: Read, Write, Compare, Write Zeroes, Dataset Management, Verify, Flush.
//!
//! Validation (namespace, LBA range, MDTS, write protection, data pointers) happens on the MMIO
//! path; data movement and backend calls run as executor jobs that post their own completions.

use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use block::{BlockBackend, BlockError};
use vm_memory::GuestAddressSpace;

use crate::ctrl::{Outcome, Shared, State};
use crate::prp::{self, Segment};
use crate::spec::{io_op, DsmRange, SglDescriptor, Sqe, Status, NSID_ALL};

/// Work for one I/O command, run on the executor.
enum Work {
    Read {
        off: u64,
        len: u64,
        segs: Vec<Segment>,
    },
    Write {
        off: u64,
        len: u64,
        segs: Vec<Segment>,
        flush: bool,
    },
    Compare {
        off: u64,
        len: u64,
        segs: Vec<Segment>,
    },
    Verify {
        off: u64,
        len: u64,
    },
    WriteZeroes {
        off: u64,
        len: u64,
        flush: bool,
    },
    Discard {
        ranges: Vec<(u64, u64)>,
    },
    Flush {
        all: Vec<Arc<dyn BlockBackend>>,
    },
}

fn backend_status(e: &BlockError, write: bool) -> Status {
    match e {
        BlockError::ReadOnly => Status::NS_WRITE_PROTECTED,
        BlockError::OutOfRange { .. } => Status::LBA_OUT_OF_RANGE,
        BlockError::Io(io) if io.kind() == std::io::ErrorKind::StorageFull => {
            Status::CAPACITY_EXCEEDED
        }
        _ if write => Status::WRITE_FAULT,
        _ => Status::UNRECOVERED_READ_ERROR,
    }
}

impl Shared {
    fn map_data(
        &self,
        st: &State,
        sqe: &Sqe,
        len: u64,
        host_to_ctrl: bool,
    ) -> Result<Vec<Segment>, Status> {
        let mem = self.mem.memory();
        match sqe.psdt() {
            0 => prp::map_prp(&*mem, sqe.dptr[0], sqe.dptr[1], len, Self::page_size(st)),
            1 => {
                let mut b = [0u8; 16];
                b[..8].copy_from_slice(&sqe.dptr[0].to_le_bytes());
                b[8..].copy_from_slice(&sqe.dptr[1].to_le_bytes());
                let d = <SglDescriptor as zerocopy::FromBytes>::read_from_bytes(&b)
                    .map_err(|_| Status::INVALID_FIELD)?;
                prp::map_sgl(&*mem, d, len, host_to_ctrl)
            }
            _ => Err(Status::INVALID_FIELD), // PSDT 10b (SGL with MPTR as SGL) not offered
        }
    }

    /// Validate an I/O command and start it. Completions of started commands are posted by the job.
    pub fn submit_io(&self, st: &mut State, sqid: u16, sqe: &Sqe) -> Outcome {
        match self.prepare_io(st, sqe) {
            Err(s) => Outcome::status(s),
            Ok((work, backend)) => {
                self.start(st, sqid, sqe, work, backend);
                Outcome::Deferred
            }
        }
    }

    fn prepare_io(
        &self,
        st: &State,
        sqe: &Sqe,
    ) -> Result<(Work, Option<Arc<dyn BlockBackend>>), Status> {
        if sqe.fuse() != 0 {
            return Err(Status::INVALID_FIELD);
        }
        let op = sqe.opcode();
        if op == io_op::FLUSH && sqe.nsid == NSID_ALL {
            let all = st.namespaces.iter().map(|n| n.backend.clone()).collect();
            return Ok((Work::Flush { all }, None));
        }
        let ns = usize::try_from(sqe.nsid)
            .ok()
            .and_then(|n| n.checked_sub(1))
            .and_then(|i| st.namespaces.get(i))
            .ok_or(Status::INVALID_NAMESPACE)?;
        let backend = Some(ns.backend.clone());
        let shift = ns.lba_shift();
        let slba = u64::from(sqe.cdw10) | (u64::from(sqe.cdw11) << 32);
        let nlb = u64::from(sqe.cdw12 & 0xffff) + 1;
        let fua = sqe.cdw12 & (1 << 30) != 0;
        let max_bytes = if self.cfg.mdts == 0 {
            u64::MAX
        } else {
            4096u64 << self.cfg.mdts
        };
        let ranged = |limit: bool| -> Result<(u64, u64), Status> {
            if !ns.in_range(slba, nlb) {
                return Err(Status::LBA_OUT_OF_RANGE);
            }
            let len = nlb << shift;
            if limit && len > max_bytes {
                return Err(Status::INVALID_FIELD);
            }
            Ok((slba << shift, len))
        };
        let work = match op {
            io_op::READ => {
                let (off, len) = ranged(true)?;
                Work::Read {
                    off,
                    len,
                    segs: self.map_data(st, sqe, len, false)?,
                }
            }
            io_op::WRITE => {
                let (off, len) = ranged(true)?;
                if ns.read_only {
                    return Err(Status::NS_WRITE_PROTECTED);
                }
                let flush = fua || !st.features.volatile_wc;
                Work::Write {
                    off,
                    len,
                    segs: self.map_data(st, sqe, len, true)?,
                    flush,
                }
            }
            io_op::COMPARE => {
                let (off, len) = ranged(true)?;
                Work::Compare {
                    off,
                    len,
                    segs: self.map_data(st, sqe, len, true)?,
                }
            }
            io_op::VERIFY => {
                let (off, len) = ranged(self.cfg.mdts != 0)?;
                Work::Verify { off, len }
            }
            io_op::WRITE_ZEROES => {
                let (off, len) = ranged(false)?;
                if ns.read_only {
                    return Err(Status::NS_WRITE_PROTECTED);
                }
                Work::WriteZeroes {
                    off,
                    len,
                    flush: fua || !st.features.volatile_wc,
                }
            }
            io_op::DATASET_MANAGEMENT if self.cfg.dsm => {
                let nr = (sqe.cdw10 & 0xff) as usize + 1;
                let deallocate = sqe.cdw11 & (1 << 2) != 0;
                let mem = self.mem.memory();
                let segs = self.map_data(st, sqe, (nr * 16) as u64, true)?;
                let mut raw = vec![0u8; nr * 16];
                prp::copy_from_guest(&*mem, &segs, &mut raw)?;
                let mut ranges = Vec::with_capacity(nr);
                for chunk in raw.chunks_exact(16) {
                    let r = <DsmRange as zerocopy::FromBytes>::read_from_bytes(chunk)
                        .map_err(|_| Status::INVALID_FIELD)?;
                    if !ns.in_range(r.slba, u64::from(r.nlb)) {
                        return Err(Status::LBA_OUT_OF_RANGE);
                    }
                    if r.nlb > 0 {
                        ranges.push((r.slba << shift, u64::from(r.nlb) << shift));
                    }
                }
                if !deallocate {
                    ranges.clear(); // attribute hints only: nothing to do
                } else if ns.read_only {
                    return Err(Status::NS_WRITE_PROTECTED);
                }
                Work::Discard { ranges }
            }
            io_op::FLUSH => Work::Flush {
                all: vec![ns.backend.clone()],
            },
            _ => return Err(Status::INVALID_OPCODE),
        };
        Ok((work, backend))
    }

    fn start(
        &self,
        st: &mut State,
        sqid: u16,
        sqe: &Sqe,
        work: Work,
        backend: Option<Arc<dyn BlockBackend>>,
    ) {
        let Some(me) = self.me.upgrade() else { return };
        if let Some(sq) = st.sqs.get_mut(usize::from(sqid)).and_then(|q| q.as_mut()) {
            sq.inflight += 1;
        }
        st.inflight_cmds.push((sqid, sqe.cid()));
        let gen = st.generation;
        let sqe = *sqe;
        self.exec.submit(Box::new(move || {
            let status = me.run(work, backend.as_deref());
            me.finish_io(gen, sqid, &sqe, status, 0);
        }));
    }

    fn run(&self, work: Work, b: Option<&dyn BlockBackend>) -> Status {
        let c = &self.counters;
        let mem = self.mem.memory();
        let res: Result<(), Status> = (|| match work {
            Work::Read { off, len, segs } => {
                let b = b.ok_or(Status::INTERNAL_ERROR)?;
                let mut buf = vec![0u8; len as usize];
                b.read_vectored(off, &mut [IoSliceMut::new(&mut buf)])
                    .map_err(|e| self.media(&e, false))?;
                prp::copy_to_guest(&*mem, &segs, &buf)?;
                c.read_cmds.fetch_add(1, Ordering::Relaxed);
                c.bytes_read.fetch_add(len, Ordering::Relaxed);
                Ok(())
            }
            Work::Write {
                off,
                len,
                segs,
                flush,
            } => {
                let b = b.ok_or(Status::INTERNAL_ERROR)?;
                let mut buf = vec![0u8; len as usize];
                prp::copy_from_guest(&*mem, &segs, &mut buf)?;
                b.write_vectored(off, &[IoSlice::new(&buf)])
                    .map_err(|e| self.media(&e, true))?;
                if flush {
                    b.flush().map_err(|e| self.media(&e, true))?;
                }
                c.write_cmds.fetch_add(1, Ordering::Relaxed);
                c.bytes_written.fetch_add(len, Ordering::Relaxed);
                Ok(())
            }
            Work::Compare { off, len, segs } => {
                let b = b.ok_or(Status::INTERNAL_ERROR)?;
                let mut disk = vec![0u8; len as usize];
                b.read_vectored(off, &mut [IoSliceMut::new(&mut disk)])
                    .map_err(|e| self.media(&e, false))?;
                let mut host = vec![0u8; len as usize];
                prp::copy_from_guest(&*mem, &segs, &mut host)?;
                c.read_cmds.fetch_add(1, Ordering::Relaxed);
                if disk != host {
                    return Err(Status::COMPARE_FAILURE);
                }
                Ok(())
            }
            Work::Verify { off, len } => {
                let b = b.ok_or(Status::INTERNAL_ERROR)?;
                let mut buf = vec![0u8; (len as usize).min(1 << 20)];
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(buf.len() as u64) as usize;
                    b.read_vectored(off + done, &mut [IoSliceMut::new(&mut buf[..n])])
                        .map_err(|e| self.media(&e, false))?;
                    done += n as u64;
                }
                c.read_cmds.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Work::WriteZeroes { off, len, flush } => {
                let b = b.ok_or(Status::INTERNAL_ERROR)?;
                b.write_zeroes(off, len).map_err(|e| self.media(&e, true))?;
                if flush {
                    b.flush().map_err(|e| self.media(&e, true))?;
                }
                c.write_cmds.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Work::Discard { ranges } => {
                let b = b.ok_or(Status::INTERNAL_ERROR)?;
                for (off, len) in ranges {
                    b.discard(off, len).map_err(|e| self.media(&e, true))?;
                }
                Ok(())
            }
            Work::Flush { all } => {
                for b in all {
                    b.flush().map_err(|e| self.media(&e, true))?;
                }
                Ok(())
            }
        })();
        match res {
            Ok(()) => Status::SUCCESS,
            Err(s) => s,
        }
    }

    fn media(&self, e: &BlockError, write: bool) -> Status {
        log::warn!("nvme {}: backend error: {e}", self.cfg.serial);
        let s = backend_status(e, write);
        if matches!(s, Status::WRITE_FAULT | Status::UNRECOVERED_READ_ERROR) {
            self.counters.media_errors.fetch_add(1, Ordering::Relaxed);
        }
        s
    }
}
