//! An in-process NVMe host for the integration tests: it drives an [`NvmeController`] only through
//! the [`PciDevice`] trait and guest memory, the way the Linux nvme driver does.
//!
//! Guest memory layout (64 MiB):
//! * `0x10000` admin SQ, `0x11000` admin CQ;
//! * `0x100000..0x400000` I/O queues (bump-allocated, page aligned);
//! * `DATA..DATA_END` data buffers, PRP lists and SGL segments. This region starts filled with an
//!   address-dependent pattern and has a shadow copy: tests declare what the controller should
//!   write ([`TestDriver::expect`]) and [`TestDriver::check_mem`] proves every other byte is
//!   untouched.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use block::{BackendInfo, BlockBackend, BlockError, Ram};
use nvme::config::CtrlConfig;
use nvme::namespace::Namespace;
// The spec names the builders take; each test binary uses some of them.
#[allow(unused_imports)]
pub use nvme::spec::{cns, dw, fid, lid, AdminOpcode, IoOpcode, NSID_ALL};
use nvme::spec::{Cqe, Sqe};
use nvme::NvmeController;
use pci::{DeviceContext, GuestMem, InterruptSink, MsiMessage, PciDevice, SlotSpec};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryMmap, GuestMemoryRegion};

pub const MEM_SIZE: u64 = 64 << 20;
pub const ASQ: u64 = 0x10000;
pub const ACQ: u64 = 0x11000;
pub const ADMIN_ENTRIES: u32 = 64;
pub const QUEUE_AREA: u64 = 0x10_0000;
pub const DATA: u64 = 0x40_0000;
pub const DATA_END: u64 = 0xc0_0000;
pub const PAGE: u64 = 4096;
pub const WAIT: Duration = Duration::from_secs(10);

/// MSI-X message data used for vector `v`.
pub fn msix_data(v: u16) -> u32 {
    0x1000 + u32::from(v)
}
/// MSI base data (multi-message MSI replaces the low bits with the vector).
pub const MSI_DATA: u16 = 0x40;

/// The canary pattern for a guest address.
pub fn pattern(addr: u64) -> u8 {
    ((addr.wrapping_mul(0x9e37_79b9) >> 13) as u8) ^ 0xa5
}

/// Records every interrupt the controller raises.
#[derive(Default)]
pub struct Recorder {
    pub msis: Mutex<Vec<MsiMessage>>,
    pub intx: Mutex<Vec<(u8, bool)>>,
}

impl InterruptSink for Recorder {
    fn msi(&self, msg: MsiMessage) {
        self.msis.lock().unwrap().push(msg);
    }
    fn intx(&self, pin: u8, asserted: bool) {
        self.intx.lock().unwrap().push((pin, asserted));
    }
}

impl Recorder {
    /// Messages carrying `data`.
    pub fn count(&self, data: u32) -> usize {
        self.msis
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.data == data)
            .count()
    }
    pub fn total(&self) -> usize {
        self.msis.lock().unwrap().len()
    }
    /// Current INTx level (last edge reported).
    pub fn intx_level(&self) -> bool {
        self.intx.lock().unwrap().last().is_some_and(|e| e.1)
    }
}

/// A RAM disk with test hooks: reads can be held at a gate, reads can fail, flushes are counted.
pub struct TestBackend {
    pub ram: Ram,
    gate: Mutex<(bool, usize)>, // (closed, readers waiting)
    cv: Condvar,
    pub fail_reads: AtomicBool,
    pub fail_flushes: AtomicBool,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub reads: AtomicUsize,
    /// Most iovecs any one request carried.
    pub max_segments: AtomicUsize,
}

impl TestBackend {
    pub fn new(bytes: u64, sector: u32) -> Arc<Self> {
        Arc::new(TestBackend {
            ram: Ram::new(bytes, sector).unwrap(),
            gate: Mutex::new((false, 0)),
            cv: Condvar::new(),
            fail_reads: AtomicBool::new(false),
            fail_flushes: AtomicBool::new(false),
            flushes: AtomicU64::new(0),
            discards: AtomicU64::new(0),
            max_segments: AtomicUsize::new(0),
            reads: AtomicUsize::new(0),
        })
    }
    /// Make reads block until [`TestBackend::release`].
    pub fn hold(&self) {
        self.gate.lock().unwrap().0 = true;
    }
    pub fn release(&self) {
        self.gate.lock().unwrap().0 = false;
        self.cv.notify_all();
    }
    /// Wait until `n` reads are parked at the gate.
    pub fn wait_parked(&self, n: usize) {
        let deadline = Instant::now() + WAIT;
        let mut g = self.gate.lock().unwrap();
        while g.1 < n {
            let left = deadline
                .checked_duration_since(Instant::now())
                .expect("reads never reached the gate");
            g = self.cv.wait_timeout(g, left).unwrap().0;
        }
    }
}

impl BlockBackend for TestBackend {
    fn info(&self) -> BackendInfo {
        self.ram.info()
    }
    fn read_vectored(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> block::Result<()> {
        {
            let mut g = self.gate.lock().unwrap();
            if g.0 {
                g.1 += 1;
                self.cv.notify_all();
                while g.0 {
                    g = self.cv.wait(g).unwrap();
                }
                g.1 -= 1;
            }
        }
        self.reads.fetch_add(1, Ordering::SeqCst);
        if self.fail_reads.load(Ordering::SeqCst) {
            return Err(BlockError::Io(std::io::Error::other(
                "injected media error",
            )));
        }
        self.ram.read_vectored(offset, bufs)
    }
    fn write_vectored(&self, offset: u64, bufs: &[IoSlice<'_>]) -> block::Result<()> {
        self.ram.write_vectored(offset, bufs)
    }
    fn flush(&self) -> block::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        if self.fail_flushes.load(Ordering::SeqCst) {
            return Err(BlockError::Io(std::io::Error::from_raw_os_error(libc::EIO)));
        }
        self.ram.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> block::Result<()> {
        self.discards.fetch_add(1, Ordering::SeqCst);
        self.ram.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> block::Result<()> {
        self.ram.write_zeroes(offset, len)
    }
    fn read_iov(&self, offset: u64, iov: &block::GuestIov) -> block::Result<()> {
        self.max_segments
            .fetch_max(iov.segments(), Ordering::SeqCst);
        block::read_iov_staged(self, offset, iov)
    }
    fn write_iov(&self, offset: u64, iov: &block::GuestIov) -> block::Result<()> {
        self.max_segments
            .fetch_max(iov.segments(), Ordering::SeqCst);
        block::write_iov_staged(self, offset, iov)
    }
}

/// A temporary file removed on drop.
pub struct TempFile(pub PathBuf);

impl TempFile {
    pub fn new(tag: &str, contents: &[u8]) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "rhyve-nvme-test-{}-{}-{tag}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::write(&p, contents).unwrap();
        TempFile(p)
    }
    pub fn read(&self) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Parsed completion status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct St {
    pub sct: u8,
    pub sc: u8,
    pub dnr: bool,
}

pub fn status(c: &Cqe) -> St {
    let f = c.status >> 1;
    St {
        sc: f as u8,
        sct: ((f >> 8) & 7) as u8,
        dnr: f & (1 << 14) != 0,
    }
}

/// Assert a completion's (SCT, SC); errors must also set DNR.
#[track_caller]
pub fn assert_status(c: &Cqe, sct: u8, sc: u8) {
    let s = status(c);
    assert_eq!(
        (s.sct, s.sc),
        (sct, sc),
        "completion {c:x?}: want SCT {sct:#x} SC {sc:#x}"
    );
    if sct != 0 || sc != 0 {
        assert!(s.dnr, "error completion without DNR: {c:x?}");
    }
}

#[track_caller]
pub fn assert_ok(c: &Cqe) {
    assert_status(c, 0, 0);
}

// ---- command builders ----
//
// Each returns an [`Sqe`] with the named command's fields set (CID 0: [`TestDriver::submit`]
// assigns one); [`SqeExt`] adds the data pointer and the few optional fields tests set.

/// A submission queue entry with a raw opcode and NSID, every other field zero. The base of
/// every builder; tests call it directly only to send an opcode that does not exist.
pub fn sqe(opcode: u8, nsid: u32) -> Sqe {
    Sqe {
        cdw0: u32::from(opcode),
        nsid,
        ..Default::default()
    }
}

/// An admin command with no fields set (NSID 0).
pub fn admin(op: AdminOpcode) -> Sqe {
    sqe(op.0, 0)
}

/// An NVM I/O command on `nsid` with no fields set.
pub fn io_cmd(op: IoOpcode, nsid: u32) -> Sqe {
    sqe(op.0, nsid)
}

/// Identify: structure `cns` (see [`cns`]) for `nsid`.
pub fn identify(cns: u8, nsid: u32) -> Sqe {
    let mut s = sqe(AdminOpcode::IDENTIFY.0, nsid);
    s.cdw10 = dw::Cdw10Identify::new().with_cns(cns).into_bits();
    s
}

/// Get Log Page `lid` (see [`lid`]) of `numd` + 1 dwords (NUMD is 0's based).
pub fn get_log_page(lid: u8, numd: u32) -> Sqe {
    let mut s = admin(AdminOpcode::GET_LOG_PAGE);
    s.cdw10 = dw::Cdw10GetLogPage::new()
        .with_lid(lid)
        .with_numdl(numd as u16)
        .into_bits();
    s.cdw11 = dw::Cdw11GetLogPage::new()
        .with_numdu((numd >> 16) as u16)
        .into_bits();
    s
}

/// Get Features `fid` (see [`fid`]); `sel` 0 current, 1 default, 2 saved, 3 capabilities.
pub fn get_features(fid: u8, sel: u8) -> Sqe {
    let mut s = admin(AdminOpcode::GET_FEATURES);
    s.cdw10 = dw::Cdw10GetFeatures::new()
        .with_fid(fid)
        .with_sel(sel)
        .into_bits();
    s
}

/// Set Features `fid` (see [`fid`]) to `cdw11`, not saved ([`SqeExt::save`] asks to save).
pub fn set_features(fid: u8, cdw11: u32) -> Sqe {
    let mut s = admin(AdminOpcode::SET_FEATURES);
    s.cdw10 = dw::Cdw10SetFeatures::new().with_fid(fid).into_bits();
    s.cdw11 = cdw11;
    s
}

/// Asynchronous Event Request.
pub fn async_event_request() -> Sqe {
    admin(AdminOpcode::ASYNC_EVENT_REQUEST)
}

/// Create I/O Completion Queue `qid` of `entries` entries, physically contiguous, on interrupt
/// vector `iv` (interrupts enabled if `ien`); the queue's base goes in PRP1.
pub fn create_io_cq(qid: u16, entries: u32, iv: u16, ien: bool) -> Sqe {
    let mut s = admin(AdminOpcode::CREATE_IO_CQ);
    s.cdw10 = create_queue_cdw10(qid, entries);
    s.cdw11 = dw::Cdw11CreateIoCompletionQueue::new()
        .with_pc(true)
        .with_ien(ien)
        .with_iv(iv)
        .into_bits();
    s
}

/// Create I/O Submission Queue `qid` of `entries` entries, physically contiguous, completing
/// to CQ `cqid`; the queue's base goes in PRP1.
pub fn create_io_sq(qid: u16, entries: u32, cqid: u16) -> Sqe {
    let mut s = admin(AdminOpcode::CREATE_IO_SQ);
    s.cdw10 = create_queue_cdw10(qid, entries);
    s.cdw11 = dw::Cdw11CreateIoSubmissionQueue::new()
        .with_pc(true)
        .with_cqid(cqid)
        .into_bits();
    s
}

fn create_queue_cdw10(qid: u16, entries: u32) -> u32 {
    dw::Cdw10CreateQueue::new()
        .with_qid(qid)
        .with_qsize(u16::try_from(entries - 1).expect("QSIZE is 16 bits, 0's based"))
        .into_bits()
}

/// Delete I/O Submission Queue `qid`.
pub fn delete_io_sq(qid: u16) -> Sqe {
    let mut s = admin(AdminOpcode::DELETE_IO_SQ);
    s.cdw10 = dw::Cdw10DeleteQueue::new().with_qid(qid).into_bits();
    s
}

/// Delete I/O Completion Queue `qid`.
pub fn delete_io_cq(qid: u16) -> Sqe {
    let mut s = admin(AdminOpcode::DELETE_IO_CQ);
    s.cdw10 = dw::Cdw10DeleteQueue::new().with_qid(qid).into_bits();
    s
}

/// Abort command `cid` submitted on SQ `sqid`.
pub fn abort(sqid: u16, cid: u16) -> Sqe {
    let mut s = admin(AdminOpcode::ABORT);
    s.cdw10 = dw::Cdw10Abort::new()
        .with_sqid(sqid)
        .with_cid(cid)
        .into_bits();
    s
}

/// Format NVM `nsid` to LBA format `lbaf` (LBAFU:LBAFL) with Secure Erase Settings `ses`.
pub fn format_nvm(nsid: u32, lbaf: u8, ses: u8) -> Sqe {
    let mut s = sqe(AdminOpcode::FORMAT_NVM.0, nsid);
    s.cdw10 = dw::Cdw10Format::new()
        .with_lbafl(lbaf & 0xf)
        .with_lbafu(lbaf >> 4)
        .with_ses(ses)
        .into_bits();
    s
}

/// Doorbell Buffer Config: shadow doorbells at `dbs` (PRP1), EventIdx buffer at `eis` (PRP2).
pub fn doorbell_buffer_config(dbs: u64, eis: u64) -> Sqe {
    admin(AdminOpcode::DOORBELL_BUFFER_CONFIG).prp(dbs, eis)
}

/// Flush `nsid` (`NSID_ALL` for every namespace).
pub fn flush(nsid: u32) -> Sqe {
    io_cmd(IoOpcode::FLUSH, nsid)
}

/// A Read, Write, Compare, Verify or Write Zeroes of `nlb` blocks (1-based here; the SQE
/// carries it 0's based) at `slba`; the data pointer is set with [`SqeExt::prp`] or
/// [`SqeExt::sgl`].
pub fn rw(op: IoOpcode, nsid: u32, slba: u64, nlb: u32) -> Sqe {
    let mut s = io_cmd(op, nsid);
    s.cdw10 = slba as u32;
    s.cdw11 = (slba >> 32) as u32;
    s.cdw12 = dw::Cdw12ReadWrite::new()
        .with_nlb(u16::try_from(nlb - 1).expect("NLB is 16 bits, 0's based"))
        .into_bits();
    s
}

/// Dataset Management of `ranges` ranges (1-based here; NR is 0's based) with `attrs`; the
/// range list goes in PRP1.
pub fn dsm(nsid: u32, ranges: u32, attrs: dw::Cdw11Dsm) -> Sqe {
    let mut s = io_cmd(IoOpcode::DATASET_MANAGEMENT, nsid);
    s.cdw10 = dw::Cdw10Dsm::new()
        .with_nr(u8::try_from(ranges - 1).expect("NR is 8 bits, 0's based"))
        .into_bits();
    s.cdw11 = attrs.into_bits();
    s
}

/// Dataset Management deallocating `ranges` ranges.
pub fn deallocate(nsid: u32, ranges: u32) -> Sqe {
    dsm(nsid, ranges, dw::Cdw11Dsm::new().with_ad(true))
}

/// Chainable setters for the fields a builder leaves at zero.
pub trait SqeExt {
    /// Data pointer as PRP1 and PRP2.
    fn prp(self, prp1: u64, prp2: u64) -> Self;
    /// Data pointer as SGL1 (PSDT 01b).
    fn sgl(self, sgl1: [u64; 2]) -> Self;
    /// Namespace ID.
    fn nsid(self, nsid: u32) -> Self;
    /// Command Identifier, for entries written to a queue without [`TestDriver::submit`].
    fn cid(self, cid: u16) -> Self;
    /// Force Unit Access (Read/Write CDW12).
    fn fua(self) -> Self;
    /// Save (Set Features CDW10).
    fn save(self) -> Self;
}

impl SqeExt for Sqe {
    fn prp(mut self, prp1: u64, prp2: u64) -> Sqe {
        self.dptr = [prp1, prp2];
        self
    }
    fn sgl(mut self, sgl1: [u64; 2]) -> Sqe {
        self.cdw0 = dw::Cdw0::from_bits(self.cdw0).with_psdt(1).into_bits();
        self.dptr = sgl1;
        self
    }
    fn nsid(mut self, nsid: u32) -> Sqe {
        self.nsid = nsid;
        self
    }
    fn cid(mut self, cid: u16) -> Sqe {
        self.cdw0 = dw::Cdw0::from_bits(self.cdw0).with_cid(cid).into_bits();
        self
    }
    fn fua(mut self) -> Sqe {
        self.cdw12 = dw::Cdw12ReadWrite::from_bits(self.cdw12)
            .with_fua(true)
            .into_bits();
        self
    }
    fn save(mut self) -> Sqe {
        self.cdw10 = dw::Cdw10SetFeatures::from_bits(self.cdw10)
            .with_sv(true)
            .into_bits();
        self
    }
}

#[derive(Clone, Copy, Debug)]
pub struct HostSq {
    pub base: u64,
    pub size: u32,
    pub tail: u32,
    pub cqid: u16,
}

#[derive(Clone, Copy, Debug)]
pub struct HostCq {
    pub base: u64,
    pub size: u32,
    pub head: u32,
    pub phase: bool,
}

/// The in-process host.
pub struct TestDriver {
    pub dev: Box<dyn PciDevice>,
    pub mem: GuestMem,
    pub irq: Arc<Recorder>,
    pub sqs: HashMap<u16, HostSq>,
    pub cqs: HashMap<u16, HostCq>,
    next_cid: u16,
    next_queue: u64,
    next_buf: u64,
    shadow: Vec<u8>,
    /// Completions that arrived for other CIDs while waiting for a specific one.
    stash: Vec<(u16, Cqe)>,
    /// Ring the CQ head doorbell as soon as an entry is consumed (default); when false the test
    /// rings it with [`TestDriver::ring_cq_head`].
    pub auto_ring: bool,
    /// Guest ranges outside the standard areas that the test placed structures in.
    extra: Vec<(u64, u64)>,
    /// The guest RAM regions (for [`TestDriver::hide_queues`]).
    regions: Regions,
}

impl Drop for TestDriver {
    /// Every test ends by proving the controller wrote nowhere outside the admin queues, the I/O
    /// queue area, the DATA region and ranges the test declared with [`TestDriver::allow`]: all
    /// other guest memory must still be zero.
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        let mut allowed = vec![
            (ASQ, u64::from(ADMIN_ENTRIES) * 64),
            (ACQ, u64::from(ADMIN_ENTRIES) * 16),
            (QUEUE_AREA, self.next_queue - QUEUE_AREA),
            (DATA, DATA_END - DATA),
        ];
        allowed.extend(&self.extra);
        allowed.sort();
        let mut pos = 0u64;
        let mut gaps = Vec::new();
        for (a, l) in allowed {
            if a > pos {
                gaps.push((pos, a - pos));
            }
            pos = pos.max(a + l);
        }
        gaps.push((pos, MEM_SIZE - pos));
        for (a, l) in gaps {
            let m = self.read_mem(a, l as usize);
            if let Some(i) = m.iter().position(|&b| b != 0) {
                panic!(
                    "stray write to guest memory at {:#x} (outside every buffer and queue)",
                    a + i as u64
                );
            }
        }
    }
}

impl TestDriver {
    /// Declare a guest range the test uses outside the standard areas.
    pub fn allow(&mut self, addr: u64, len: u64) {
        self.extra.push((addr, len));
    }

    /// Swap in a memory map without the region holding the queues (below DATA), as a frontend
    /// replacing the guest's memory table would; returns the full map for [`Self::restore`].
    pub fn hide_queues(&mut self) -> GuestMemoryMmap {
        let full = (*self.mem.memory()).clone();
        let data_only: Vec<_> = self
            .regions
            .iter()
            .filter(|r| r.start_addr().0 >= DATA)
            .cloned()
            .collect();
        let g = self.mem.lock().unwrap();
        g.replace(GuestMemoryMmap::from_arc_regions(data_only).unwrap());
        full
    }

    /// Put back a map taken by [`Self::hide_queues`].
    pub fn restore(&mut self, full: GuestMemoryMmap) {
        self.mem.lock().unwrap().replace(full);
    }

    /// Wait until `n` messages with `data` were delivered (interrupts are raised just after the
    /// completion entry is written, possibly on another thread).
    pub fn wait_irqs(&self, data: u32, n: usize) {
        let deadline = Instant::now() + WAIT;
        while self.irq.count(data) < n {
            assert!(
                Instant::now() < deadline,
                "{} interrupts with data {data:#x}, want {n}",
                self.irq.count(data)
            );
            std::thread::yield_now();
        }
    }
}

/// Guest RAM is two regions (split where the DATA area starts), as under KVM around the PCI
/// hole, so transfers and queues exercise region boundaries, and a test can hide the queue
/// region ([`TestDriver::hide_queues`]).
fn regions() -> Vec<Arc<vm_memory::GuestRegionMmap>> {
    [(0, DATA), (DATA, MEM_SIZE - DATA)]
        .into_iter()
        .map(|(a, l)| {
            Arc::new(
                vm_memory::GuestRegionMmap::from_range(GuestAddress(a), l as usize, None).unwrap(),
            )
        })
        .collect()
}

type Regions = Vec<Arc<vm_memory::GuestRegionMmap>>;

fn context(intx: bool) -> (DeviceContext, GuestMem, Arc<Recorder>, Regions) {
    let regions = regions();
    let mmap = GuestMemoryMmap::from_arc_regions(regions.clone()).unwrap();
    let mem = GuestMem::new(mmap);
    let irq = Arc::new(Recorder::default());
    let ctx = DeviceContext {
        mem: mem.clone(),
        irq: irq.clone(),
        intx_supported: intx,
    };
    (ctx, mem, irq, regions)
}

impl TestDriver {
    /// A controller built by the registry constructor from `-s` text, e.g.
    /// `"4,nvme,ram=16,ser=TESTSER1"`. Not yet enabled.
    pub fn from_spec(spec: &str) -> Self {
        Self::from_spec_intx(spec, true)
    }

    pub fn from_spec_intx(spec: &str, intx: bool) -> Self {
        let (ctx, mem, irq, regions) = context(intx);
        let dev = nvme::create(&SlotSpec::parse(spec).unwrap(), &ctx)
            .unwrap_or_else(|e| panic!("{spec}: {e}"));
        Self::wrap(dev, mem, irq, regions)
    }

    /// A controller over the given backends (NSID 1, 2, …); `spec` gives the controller options
    /// (its image list is ignored).
    pub fn with_backends(spec: &str, backends: Vec<Arc<dyn BlockBackend>>) -> Self {
        let (ctx, mem, irq, regions) = context(true);
        let cfg = CtrlConfig::from_spec(&SlotSpec::parse(spec).unwrap()).unwrap();
        let ns = backends
            .into_iter()
            .enumerate()
            .map(|(i, b)| Namespace::new(i as u32 + 1, b))
            .collect();
        let dev = Box::new(NvmeController::new(cfg, &ctx, ns));
        Self::wrap(dev, mem, irq, regions)
    }

    fn wrap(dev: Box<dyn PciDevice>, mem: GuestMem, irq: Arc<Recorder>, regions: Regions) -> Self {
        let shadow: Vec<u8> = (DATA..DATA_END).map(pattern).collect();
        mem.memory()
            .write_slice(&shadow, GuestAddress(DATA))
            .unwrap();
        TestDriver {
            dev,
            mem,
            irq,
            sqs: HashMap::new(),
            cqs: HashMap::new(),
            next_cid: 0x100,
            next_queue: QUEUE_AREA,
            next_buf: DATA + 0x10_0000,
            shadow,
            stash: Vec::new(),
            auto_ring: true,
            extra: Vec::new(),
            regions,
        }
    }

    /// A second controller over the same guest memory and interrupt recorder, built from
    /// `spec` over `backends`: the "new process" a snapshot is restored into.
    pub fn twin(&self, spec: &str, backends: Vec<Arc<dyn BlockBackend>>) -> Box<dyn PciDevice> {
        let ctx = DeviceContext {
            mem: self.mem.clone(),
            irq: self.irq.clone(),
            intx_supported: true,
        };
        let cfg = CtrlConfig::from_spec(&SlotSpec::parse(spec).unwrap()).unwrap();
        let ns = backends
            .into_iter()
            .enumerate()
            .map(|(i, b)| Namespace::new(i as u32 + 1, b))
            .collect();
        Box::new(NvmeController::new(cfg, &ctx, ns))
    }

    /// A controller from `spec` whose one namespace is a fresh [`TestBackend`] of `bytes`
    /// (512-byte sectors), not brought up yet.
    pub fn on(spec: &str, bytes: u64) -> (Self, Arc<TestBackend>) {
        let backend = TestBackend::new(bytes, 512);
        let d = Self::with_backends(spec, vec![backend.clone() as Arc<dyn BlockBackend>]);
        (d, backend)
    }

    /// The usual bring-up: MSI-X on, controller enabled, I/O queue pair 1 (64 entries) created.
    pub fn ready(spec: &str) -> Self {
        let mut d = Self::from_spec(spec);
        d.bring_up();
        d
    }

    pub fn bring_up(&mut self) {
        self.pci_enable();
        self.enable_msix();
        self.enable();
        self.create_pair(1, 64);
    }

    // ---- config space and registers ----

    pub fn cfg_read(&mut self, off: u16, len: usize) -> u32 {
        let mut b = [0u8; 4];
        self.dev.config_read(off, &mut b[..len]);
        u32::from_le_bytes(b)
    }

    pub fn cfg_write(&mut self, off: u16, len: usize, val: u32) {
        self.dev.config_write(off, &val.to_le_bytes()[..len]);
    }

    /// Offset of capability `id` (walking the list from 0x34).
    pub fn find_cap(&mut self, id: u8) -> Option<u16> {
        let mut p = self.cfg_read(0x34, 1) as u16;
        let mut n = 0;
        while p != 0 && n < 48 {
            if self.cfg_read(p, 1) as u8 == id {
                return Some(p);
            }
            p = self.cfg_read(p + 1, 1) as u16;
            n += 1;
        }
        None
    }

    /// Memory space + bus master.
    pub fn pci_enable(&mut self) {
        self.cfg_write(4, 2, 0x6);
    }

    /// Program every MSI-X vector (data = [`msix_data`]), unmask it and enable MSI-X.
    pub fn enable_msix(&mut self) {
        let cap = self.find_cap(0x11).expect("no MSI-X capability");
        let n = (self.cfg_read(cap + 2, 2) & 0x7ff) + 1;
        for v in 0..n as u64 {
            self.bar_write32(4, v * 16, 0xfee0_0000);
            self.bar_write32(4, v * 16 + 4, 0);
            self.bar_write32(4, v * 16 + 8, msix_data(v as u16));
            self.bar_write32(4, v * 16 + 12, 0);
        }
        self.cfg_write(cap + 2, 2, 1 << 15);
    }

    /// Enable MSI with `2^mme` messages.
    pub fn enable_msi(&mut self, mme: u16) {
        let cap = self.find_cap(0x05).expect("no MSI capability");
        self.cfg_write(cap + 4, 4, 0xfee0_0000);
        self.cfg_write(cap + 8, 4, 0);
        self.cfg_write(cap + 12, 2, u32::from(MSI_DATA));
        self.cfg_write(cap + 2, 2, 1 | (u32::from(mme) << 4));
    }

    pub fn bar_read32(&mut self, bar: u8, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.bar_read(bar, off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn bar_read64(&mut self, bar: u8, off: u64) -> u64 {
        let mut b = [0u8; 8];
        self.dev.bar_read(bar, off, &mut b);
        u64::from_le_bytes(b)
    }

    pub fn bar_write32(&mut self, bar: u8, off: u64, v: u32) {
        self.dev.bar_write(bar, off, &v.to_le_bytes());
    }

    pub fn bar_write64(&mut self, bar: u8, off: u64, v: u64) {
        self.dev.bar_write(bar, off, &v.to_le_bytes());
    }

    pub fn reg(&mut self, off: u64) -> u32 {
        self.bar_read32(0, off)
    }

    pub fn set_reg(&mut self, off: u64, v: u32) {
        self.bar_write32(0, off, v);
    }

    pub fn csts(&mut self) -> u32 {
        self.reg(0x1c)
    }

    /// Poll CSTS until `(csts & mask) == want`.
    pub fn wait_csts(&mut self, mask: u32, want: u32) {
        let deadline = Instant::now() + WAIT;
        loop {
            let c = self.csts();
            if c & mask == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "CSTS {c:#x}: timed out waiting for {want:#x} under mask {mask:#x}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Program AQA/ASQ/ACQ and set CC.EN with 4 KiB pages and 64/16-byte entries.
    pub fn enable(&mut self) {
        self.enable_with_cc(0x0046_0001);
        assert_eq!(self.csts() & 3, 1, "controller did not become ready");
    }

    pub fn enable_with_cc(&mut self, cc: u32) {
        // Clear the admin CQ so stale entries from a previous life cannot look valid.
        self.mem
            .memory()
            .write_slice(&[0u8; 16 * ADMIN_ENTRIES as usize], GuestAddress(ACQ))
            .unwrap();
        self.set_reg(0x24, ((ADMIN_ENTRIES - 1) << 16) | (ADMIN_ENTRIES - 1));
        self.bar_write64(0, 0x28, ASQ);
        self.bar_write64(0, 0x30, ACQ);
        self.sqs.insert(
            0,
            HostSq {
                base: ASQ,
                size: ADMIN_ENTRIES,
                tail: 0,
                cqid: 0,
            },
        );
        self.cqs.insert(
            0,
            HostCq {
                base: ACQ,
                size: ADMIN_ENTRIES,
                head: 0,
                phase: true,
            },
        );
        self.set_reg(0x14, cc);
        if cc & 1 != 0 {
            // Ready or fatal.
            let deadline = Instant::now() + WAIT;
            while self.csts() & 3 == 0 {
                assert!(
                    Instant::now() < deadline,
                    "controller neither ready nor fatal"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// CC.EN 1→0 and wait for CSTS.RDY=0; forget host queue state.
    pub fn disable(&mut self) {
        let cc = self.reg(0x14);
        self.set_reg(0x14, cc & !1);
        self.wait_csts(1, 0);
        self.sqs.clear();
        self.cqs.clear();
        self.stash.clear();
    }

    // ---- guest memory ----

    pub fn write_mem(&mut self, addr: u64, data: &[u8]) {
        self.mem
            .memory()
            .write_slice(data, GuestAddress(addr))
            .unwrap();
        self.expect(addr, data);
    }

    pub fn read_mem(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .memory()
            .read_slice(&mut v, GuestAddress(addr))
            .unwrap();
        v
    }

    /// Zero guest memory outside the DATA region (queues placed by hand).
    pub fn mem_zero(&mut self, addr: u64, len: usize) {
        self.mem
            .memory()
            .write_slice(&vec![0u8; len], GuestAddress(addr))
            .unwrap();
    }

    pub fn write_u64(&mut self, addr: u64, v: u64) {
        self.write_mem(addr, &v.to_le_bytes());
    }

    /// Declare that the controller is expected to have written `data` at `addr` (DATA region).
    pub fn expect(&mut self, addr: u64, data: &[u8]) {
        if addr >= DATA && addr + data.len() as u64 <= DATA_END {
            let o = (addr - DATA) as usize;
            self.shadow[o..o + data.len()].copy_from_slice(data);
        }
    }

    /// Every byte of the DATA region equals what the test wrote or declared.
    #[track_caller]
    pub fn check_mem(&self) {
        let now = self.read_mem(DATA, (DATA_END - DATA) as usize);
        if now != self.shadow {
            let i = now
                .iter()
                .zip(&self.shadow)
                .position(|(a, b)| a != b)
                .unwrap();
            let n = now.iter().zip(&self.shadow).filter(|(a, b)| a != b).count();
            panic!(
                "guest memory changed outside the expected buffers: first at {:#x} (got {:#04x}, want {:#04x}), {n} bytes differ",
                DATA + i as u64,
                now[i],
                self.shadow[i]
            );
        }
    }

    /// A fresh page-aligned buffer of `len` bytes in the DATA region, still holding the pattern.
    pub fn alloc(&mut self, len: u64) -> u64 {
        let a = self.next_buf;
        self.next_buf = (a + len).div_ceil(PAGE) * PAGE + PAGE; // leave a canary page between buffers
        assert!(self.next_buf <= DATA_END, "test data region exhausted");
        a
    }

    /// A page-aligned queue area of `len` bytes (outside the DATA region), zeroed.
    pub fn alloc_queue(&mut self, len: u64) -> u64 {
        let a = self.next_queue;
        self.next_queue = (a + len).div_ceil(PAGE) * PAGE;
        assert!(self.next_queue <= DATA, "queue area exhausted");
        self.mem
            .memory()
            .write_slice(&vec![0u8; len as usize], GuestAddress(a))
            .unwrap();
        a
    }

    // ---- submission and completion ----

    /// Put `sqe` on SQ `qid` with a fresh CID (returned) and ring the tail doorbell.
    pub fn submit(&mut self, qid: u16, mut sqe: Sqe) -> u16 {
        let cid = self.next_cid;
        self.next_cid = self.next_cid.wrapping_add(1).max(0x100);
        sqe.cdw0 = (sqe.cdw0 & 0xffff) | (u32::from(cid) << 16);
        self.submit_raw(qid, sqe);
        cid
    }

    /// Put `sqe` on SQ `qid` with a fresh CID (returned) without ringing any doorbell.
    pub fn submit_at(&mut self, qid: u16, mut sqe: Sqe) -> u16 {
        let cid = self.next_cid;
        self.next_cid = self.next_cid.wrapping_add(1).max(0x100);
        sqe.cdw0 = (sqe.cdw0 & 0xffff) | (u32::from(cid) << 16);
        let q = self.sqs.get_mut(&qid).expect("no such host SQ");
        let addr = q.base + u64::from(q.tail) * 64;
        q.tail = (q.tail + 1) % q.size;
        self.mem
            .memory()
            .write_slice(zerocopy::IntoBytes::as_bytes(&sqe), GuestAddress(addr))
            .unwrap();
        cid
    }

    /// Put `sqe` on SQ `qid` as is and ring the doorbell.
    pub fn submit_raw(&mut self, qid: u16, sqe: Sqe) {
        let q = self.sqs.get_mut(&qid).expect("no such host SQ");
        let addr = q.base + u64::from(q.tail) * 64;
        q.tail = (q.tail + 1) % q.size;
        let tail = q.tail;
        self.mem
            .memory()
            .write_slice(zerocopy::IntoBytes::as_bytes(&sqe), GuestAddress(addr))
            .unwrap();
        self.bar_write32(0, 0x1000 + 8 * u64::from(qid), tail);
    }

    /// The next completion on CQ `cqid`, or None after `timeout`.
    pub fn poll_cq(&mut self, cqid: u16, timeout: Duration) -> Option<Cqe> {
        let deadline = Instant::now() + timeout;
        let q = *self.cqs.get(&cqid).expect("no such host CQ");
        let addr = q.base + u64::from(q.head) * 16;
        loop {
            let mem = self.mem.memory();
            let dw3: u32 = mem.read_obj(GuestAddress(addr + 12)).unwrap();
            if (dw3 >> 16) & 1 == u32::from(q.phase) {
                std::sync::atomic::fence(Ordering::Acquire);
                let mut b = [0u8; 16];
                mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
                let cqe = <Cqe as zerocopy::FromBytes>::read_from_bytes(&b).unwrap();
                drop(mem);
                // The controller posts a CQE and raises its interrupt under one lock; any
                // register access waits for that, so interrupt assertions after this are exact.
                let _ = self.csts();
                let q = self.cqs.get_mut(&cqid).unwrap();
                q.head = (q.head + 1) % q.size;
                if q.head == 0 {
                    q.phase = !q.phase;
                }
                if self.auto_ring {
                    self.ring_cq_head(cqid);
                }
                return Some(cqe);
            }
            drop(mem);
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::yield_now();
        }
    }

    /// Tell the controller every entry consumed so far on CQ `cqid` is free.
    pub fn ring_cq_head(&mut self, cqid: u16) {
        let head = self.cqs[&cqid].head;
        self.bar_write32(0, 0x1000 + 8 * u64::from(cqid) + 4, head);
    }

    /// The next completion on CQ `cqid`; panics after [`WAIT`].
    #[track_caller]
    pub fn wait_cq(&mut self, cqid: u16) -> Cqe {
        self.poll_cq(cqid, WAIT)
            .unwrap_or_else(|| panic!("no completion on CQ {cqid} within {WAIT:?}"))
    }

    /// The completion for `cid` submitted on SQ `sqid` (others are stashed for later).
    #[track_caller]
    pub fn wait_cid(&mut self, sqid: u16, cid: u16) -> Cqe {
        if let Some(p) = self
            .stash
            .iter()
            .position(|(s, c)| *s == sqid && c.cid == cid)
        {
            return self.stash.remove(p).1;
        }
        let cqid = self.sqs[&sqid].cqid;
        loop {
            let c = self.wait_cq(cqid);
            if c.sq_id == sqid && c.cid == cid {
                return c;
            }
            self.stash.push((c.sq_id, c));
        }
    }

    /// Submit on SQ `qid` and wait for that command's completion; checks SQID and CID.
    #[track_caller]
    pub fn cmd(&mut self, qid: u16, sqe: Sqe) -> Cqe {
        let cid = self.submit(qid, sqe);
        let c = self.wait_cid(qid, cid);
        assert_eq!((c.sq_id, c.cid), (qid, cid));
        // One command at a time: by the time it completes the controller has fetched everything
        // up to our tail, and the CQE reports that head.
        assert_eq!(
            u32::from(c.sq_head),
            self.sqs[&qid].tail,
            "SQ head in {c:x?}"
        );
        c
    }

    #[track_caller]
    pub fn admin(&mut self, sqe: Sqe) -> Cqe {
        self.cmd(0, sqe)
    }

    #[track_caller]
    pub fn io(&mut self, qid: u16, sqe: Sqe) -> Cqe {
        self.cmd(qid, sqe)
    }

    /// Nothing more arrives on CQ `cqid` for a short while.
    #[track_caller]
    pub fn assert_cq_empty(&mut self, cqid: u16) {
        if let Some((_, c)) = self
            .stash
            .iter()
            .find(|(s, _)| self.sqs.get(s).is_some_and(|q| q.cqid == cqid))
        {
            panic!("unexpected completion on CQ {cqid} (arrived earlier): {c:x?}");
        }
        if let Some(c) = self.poll_cq(cqid, Duration::from_millis(50)) {
            panic!("unexpected completion on CQ {cqid}: {c:x?}");
        }
    }

    // ---- admin helpers ----

    pub fn create_cq_cmd(&mut self, qid: u16, size: u32, base: u64, cdw11: u32) -> Cqe {
        let mut s = create_io_cq(qid, size, 0, false).prp(base, 0);
        s.cdw11 = cdw11; // raw: tests send PC=0 and bad vectors on purpose
        self.admin(s)
    }

    pub fn create_sq_cmd(
        &mut self,
        qid: u16,
        size: u32,
        base: u64,
        cqid: u16,
        cdw11_low: u32,
    ) -> Cqe {
        let mut s = create_io_sq(qid, size, cqid).prp(base, 0);
        // Raw low half: tests send PC=0 on purpose.
        s.cdw11 = dw::Cdw11CreateIoSubmissionQueue::from_bits(cdw11_low)
            .with_cqid(cqid)
            .into_bits();
        self.admin(s)
    }

    /// Create CQ `qid` (vector `qid`, interrupts on) and SQ `qid` on it.
    pub fn create_pair(&mut self, qid: u16, size: u32) {
        self.create_pair_sized(qid, size, size);
    }

    /// Create CQ `qid` of `cq_size` entries (vector `qid`, interrupts on) and SQ `qid` of
    /// `sq_size` entries on it.
    pub fn create_pair_sized(&mut self, qid: u16, cq_size: u32, sq_size: u32) {
        let size = cq_size;
        let cqb = self.alloc_queue(u64::from(size) * 16);
        assert_ok(&self.admin(create_io_cq(qid, size, qid, true).prp(cqb, 0)));
        self.cqs.insert(
            qid,
            HostCq {
                base: cqb,
                size,
                head: 0,
                phase: true,
            },
        );
        let size = sq_size;
        let sqb = self.alloc_queue(u64::from(size) * 64);
        assert_ok(&self.admin(create_io_sq(qid, size, qid).prp(sqb, 0)));
        self.sqs.insert(
            qid,
            HostSq {
                base: sqb,
                size,
                tail: 0,
                cqid: qid,
            },
        );
    }

    pub fn delete_sq(&mut self, qid: u16) -> Cqe {
        let c = self.admin(delete_io_sq(qid));
        if status(&c).sc == 0 && status(&c).sct == 0 {
            self.sqs.remove(&qid);
        }
        c
    }

    pub fn delete_cq(&mut self, qid: u16) -> Cqe {
        let c = self.admin(delete_io_cq(qid));
        if status(&c).sc == 0 && status(&c).sct == 0 {
            self.cqs.remove(&qid);
        }
        c
    }

    /// Identify into a fresh 4 KiB buffer; returns the completion and the data on success.
    pub fn identify(&mut self, cns: u8, nsid: u32, cdw11: u32) -> (Cqe, Vec<u8>) {
        let buf = self.alloc(4096);
        let mut s = identify(cns, nsid).prp(buf, 0);
        s.cdw11 = cdw11;
        let c = self.admin(s);
        let data = self.read_mem(buf, 4096);
        if status(&c)
            == (St {
                sct: 0,
                sc: 0,
                dnr: false,
            })
        {
            self.expect(buf, &data);
        }
        self.check_mem();
        (c, data)
    }

    /// Identify that must succeed.
    #[track_caller]
    pub fn identify_ok(&mut self, cns: u8, nsid: u32) -> Vec<u8> {
        let (c, d) = self.identify(cns, nsid, 0);
        assert_ok(&c);
        d
    }

    pub fn get_features(&mut self, fid: u8, sel: u8, nsid: u32, cdw11: u32) -> Cqe {
        let mut s = get_features(fid, sel).nsid(nsid);
        s.cdw11 = cdw11;
        self.admin(s)
    }

    pub fn set_features(&mut self, fid: u8, cdw11: u32) -> Cqe {
        self.admin(set_features(fid, cdw11))
    }

    /// Get Log Page of `len` bytes (a multiple of 4) at `offset` into a fresh buffer.
    pub fn get_log(
        &mut self,
        lid: u8,
        nsid: u32,
        len: u32,
        offset: u64,
        rae: bool,
    ) -> (Cqe, Vec<u8>) {
        let buf = self.alloc(u64::from(len));
        let prp2 = if u64::from(len) > PAGE {
            assert!(u64::from(len) <= 2 * PAGE, "use a PRP list");
            buf + PAGE
        } else {
            0
        };
        let mut s = get_log_page(lid, len / 4 - 1).nsid(nsid).prp(buf, prp2);
        s.cdw10 = dw::Cdw10GetLogPage::from_bits(s.cdw10)
            .with_rae(rae)
            .into_bits();
        s.cdw12 = offset as u32; // LPOL
        s.cdw13 = (offset >> 32) as u32; // LPOU
        let c = self.admin(s);
        let data = self.read_mem(buf, len as usize);
        if status(&c).sc == 0 && status(&c).sct == 0 {
            self.expect(buf, &data);
        }
        self.check_mem();
        (c, data)
    }

    // ---- I/O helpers ----

    /// Write `data` to `nsid` at `slba` through a fresh buffer (PRP list as needed); asserts success.
    #[track_caller]
    pub fn write_blocks(&mut self, qid: u16, nsid: u32, slba: u64, lba: u64, data: &[u8]) {
        let (prp1, prp2) = self.prp_buffer(data);
        let nlb = (data.len() as u64 / lba) as u32;
        let c = self.io(qid, rw(IoOpcode::WRITE, nsid, slba, nlb).prp(prp1, prp2));
        assert_ok(&c);
        self.check_mem();
    }

    /// Read `nlb` blocks through a fresh buffer; asserts success and returns the data.
    #[track_caller]
    pub fn read_blocks(&mut self, qid: u16, nsid: u32, slba: u64, nlb: u32, lba: u64) -> Vec<u8> {
        let len = u64::from(nlb) * lba;
        let buf = self.alloc(len);
        let (prp2, _) = self.prp_for(buf, len);
        let c = self.io(qid, rw(IoOpcode::READ, nsid, slba, nlb).prp(buf, prp2));
        assert_ok(&c);
        let data = self.read_mem(buf, len as usize);
        self.expect(buf, &data);
        self.check_mem();
        data
    }

    /// Place `data` in a fresh page-aligned buffer; returns (PRP1, PRP2) describing it.
    pub fn prp_buffer(&mut self, data: &[u8]) -> (u64, u64) {
        let buf = self.alloc(data.len() as u64);
        self.write_mem(buf, data);
        let (prp2, _) = self.prp_for(buf, data.len() as u64);
        (buf, prp2)
    }

    /// PRP2 for a contiguous page-aligned buffer: none, the second page, or a PRP list (built in
    /// a fresh page). Returns (PRP2, list address if any).
    pub fn prp_for(&mut self, buf: u64, len: u64) -> (u64, Option<u64>) {
        let pages = len.div_ceil(PAGE);
        match pages {
            0 | 1 => (0, None),
            2 => (buf + PAGE, None),
            _ => {
                assert!(pages - 1 <= 512, "single list page only");
                let list = self.alloc(PAGE);
                let entries: Vec<u8> = (1..pages)
                    .flat_map(|i| (buf + i * PAGE).to_le_bytes())
                    .collect();
                self.write_mem(list, &entries);
                (list, Some(list))
            }
        }
    }
}

/// Deterministic test data.
pub fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ ((i >> 9) as u8))
        .collect()
}
