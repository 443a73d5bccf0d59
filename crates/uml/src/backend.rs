//! The `VhostUserBackend` that runs virt-pci commands from the cmd virtqueue (vq 0) against a
//! `PciDevice` and lets the irq virtqueue (vq 1) drain queued MSIs.

use crate::irq::UmlInterrupts;
use crate::msg::{self, HDR_LEN, MAX_XFER};
use crate::sigbus::Watch;
use log::{debug, error, trace, warn};
use pci::{GuestMem, PciDevice};
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Backend;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::{DescriptorChain, QueueT, Reader, Writer};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// vq 0: driver → device commands.
pub(crate) const CMD_VQ: u16 = 0;
/// vq 1: device → driver interrupts.
pub(crate) const IRQ_VQ: u16 = 1;
/// virt-pci's ring size (MAX_SUPPORTED_QUEUE_SIZE in virtio_uml.c).
const QUEUE_SIZE: usize = 256;
/// Posted writes the device completes before it signals the cmd vq: a quarter of the ring.
/// UML drops a posted write when the ring is full, so the signal must come long before that,
/// even if UML keeps adding writes while the SIGIO is on its way.
const fn unsignalled_limit(ring: usize) -> usize {
    if ring / 4 > 1 {
        ring / 4
    } else {
        1
    }
}

type Mem = <GuestMem as GuestAddressSpace>::T;

/// What UML asked of the device, by kind: every one of these is a guest exit under hardware
/// virtualization, so they are the numbers to minimise.
#[derive(Debug, Default)]
pub struct Counters {
    /// All commands on the cmd virtqueue.
    pub commands: AtomicU64,
    /// Commands that could not be parsed.
    pub malformed: AtomicU64,
    /// Config-space reads.
    pub cfg_reads: AtomicU64,
    /// Config-space writes.
    pub cfg_writes: AtomicU64,
    /// BAR reads (non-posted: UML waits for each).
    pub mmio_reads: AtomicU64,
    /// BAR writes and memsets (posted).
    pub mmio_writes: AtomicU64,
    /// Used-ring signals sent on the cmd queue.
    pub cmd_signals: AtomicU64,
    /// Guest-memory pages lost because the peer shrank its memory file under them (after the
    /// first, the device stops serving that peer).
    pub memory_faults: AtomicU64,
}

impl Counters {
    /// Counter names and values, for `--stats`.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("uml_cfg_reads".into(), g(&self.cfg_reads)),
            ("uml_cfg_writes".into(), g(&self.cfg_writes)),
            ("uml_mmio_reads".into(), g(&self.mmio_reads)),
            ("uml_mmio_writes".into(), g(&self.mmio_writes)),
            ("uml_malformed".into(), g(&self.malformed)),
            ("uml_cmd_signals".into(), g(&self.cmd_signals)),
            ("uml_memory_faults".into(), g(&self.memory_faults)),
        ]
    }
}

pub(crate) struct UmlBackend {
    name: String,
    device: Arc<dyn PciDevice>,
    /// BAR sizes by index (0 = not implemented), for bounds checks before the device sees an
    /// offset.
    bar_sizes: [u64; 6],
    mem: GuestMem,
    irq: Arc<UmlInterrupts>,
    irq_attached: AtomicBool,
    /// Held, never used: UML reads EOF on this channel as a broken connection and unplugs the
    /// device, so dropping it (the trait's default) kills the device ~50 ms after setup.
    backend_req: Mutex<Option<Backend>>,
    pub(crate) counters: Arc<Counters>,
    /// Used cmd-vq entries not yet signalled.
    unsignalled: std::sync::atomic::AtomicUsize,
    /// Turns SIGBUS on our guest-memory mappings into lost pages (see [`crate::sigbus`]).
    watch: Option<Watch>,
    /// The peer's memory file shrank under us: commands are no longer executed.
    broken: AtomicBool,
}

impl UmlBackend {
    pub(crate) fn new(
        device: Arc<dyn PciDevice>,
        mem: GuestMem,
        irq: Arc<UmlInterrupts>,
        counters: Arc<Counters>,
    ) -> Self {
        let name = device.name().to_string();
        let mut bar_sizes = [0u64; 6];
        for b in device.bars() {
            if let Some(s) = bar_sizes.get_mut(usize::from(b.index)) {
                *s = b.size;
            }
        }
        UmlBackend {
            name,
            device,
            bar_sizes,
            mem,
            irq,
            irq_attached: AtomicBool::new(false),
            backend_req: Mutex::new(None),
            counters,
            unsignalled: Default::default(),
            watch: Watch::new(),
            broken: AtomicBool::new(false),
        }
    }

    /// Whether the peer's memory is still whole; logs the moment it is found not to be.
    fn memory_ok(&self) -> bool {
        if self.broken.load(Ordering::Acquire) {
            return false;
        }
        let lost = self.watch.as_ref().map_or(0, Watch::faults);
        if lost == 0 {
            return true;
        }
        self.counters.memory_faults.store(lost, Ordering::Relaxed);
        if !self.broken.swap(true, Ordering::AcqRel) {
            error!(
                "{}: UML's memory file shrank under mapped guest memory ({lost} page(s) lost); \
                 no longer executing its commands",
                self.name
            );
        }
        false
    }

    /// Drain the cmd queue in FIFO order. Notifications from UML are suppressed while we work,
    /// which saves UML a (ptrace-expensive) eventfd write per posted MMIO write.
    fn process_cmd_queue(&self, vring: &VringRwLock) {
        let mem = self.mem.memory();
        let mut completed = 0usize;
        let ring = usize::from(vring.get_ref().get_queue().size());
        loop {
            if let Err(e) = vring.disable_notification() {
                debug!("{}: cmd vq: disable_notification: {e}", self.name);
            }
            loop {
                let chain = {
                    let mut st = vring.get_mut();
                    if !st.get_queue().ready() || !st.is_enabled() {
                        return;
                    }
                    st.get_queue_mut().pop_descriptor_chain(mem.clone())
                };
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                // After a lost page nothing the peer sends can be trusted to be what it wrote;
                // complete its commands without running them.
                let len = if self.memory_ok() {
                    self.run_chain(chain, &mem)
                } else {
                    0
                };
                if let Err(e) = vring.add_used(head, len) {
                    error!("{}: cmd vq: add_used({head}): {e}", self.name);
                }
                if len > 0 {
                    // A read: UML spins for its reply and takes every used buffer up to it,
                    // posted writes included, so nothing before it stays unseen.
                    completed = 0;
                    self.unsignalled.store(0, Ordering::Relaxed);
                } else {
                    completed += 1;
                }
            }
            match vring.enable_notification() {
                Ok(true) => continue, // more arrived while notifications were off
                Ok(false) => break,
                Err(e) => {
                    debug!("{}: cmd vq: enable_notification: {e}", self.name);
                    break;
                }
            }
        }
        // UML needs no signal for its reads (it polls the used ring for the reply, and frees
        // the posted writes it meets on the way) and frees posted-write buffers only when it
        // sees them. Signalling every batch costs it a SIGIO per batch; signalling never would
        // let the ring fill up (and UML drops a posted write it cannot add). So: signal once a
        // quarter of the ring is posted writes UML has not seen.
        let unseen = self.unsignalled.fetch_add(completed, Ordering::Relaxed) + completed;
        if unseen >= unsignalled_limit(ring) && vring.needs_notification().unwrap_or(true) {
            self.unsignalled.store(0, Ordering::Relaxed);
            self.counters.cmd_signals.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = vring.signal_used_queue() {
                debug!("{}: cmd vq: signal: {e}", self.name);
            }
        }
    }

    /// Execute one command chain; returns the used length (reply bytes written).
    fn run_chain(&self, chain: DescriptorChain<Mem>, mem: &Mem) -> u32 {
        self.counters.commands.fetch_add(1, Ordering::Relaxed);
        let head = chain.head_index();
        let reader = Reader::new(&**mem, chain.clone());
        let writer = Writer::new(&**mem, chain);
        let (mut reader, mut writer) = match (reader, writer) {
            (Ok(r), Ok(w)) => (r, w),
            (Err(e), _) | (_, Err(e)) => {
                self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                error!("{}: cmd vq: chain {head} unusable: {e}", self.name);
                return 0;
            }
        };
        // A message is a header plus at most MAX_XFER data bytes; read no further than that.
        let take = reader.available_bytes().min(HDR_LEN + MAX_XFER);
        let mut buf = vec![0u8; take];
        if let Err(e) = reader.read_exact(&mut buf) {
            self.counters.malformed.fetch_add(1, Ordering::Relaxed);
            error!("{}: cmd vq: reading chain {head}: {e}", self.name);
            return 0;
        }
        let room = writer.available_bytes();
        match msg::decode(&buf, room) {
            Ok(cmd) => {
                trace!("{}: {cmd:?}", self.name);
                let c = &self.counters;
                match cmd {
                    msg::Command::CfgRead { .. } => &c.cfg_reads,
                    msg::Command::CfgWrite { .. } => &c.cfg_writes,
                    msg::Command::BarRead { .. } => &c.mmio_reads,
                    msg::Command::BarWrite { .. } | msg::Command::BarMemset { .. } => {
                        &c.mmio_writes
                    }
                }
                .fetch_add(1, Ordering::Relaxed);
                let mut reply = Vec::new();
                msg::execute(&*self.device, &self.bar_sizes, &cmd, &mut reply);
                if reply.is_empty() {
                    return 0;
                }
                match writer.write_all(&reply) {
                    Ok(()) => reply.len() as u32,
                    Err(e) => {
                        error!("{}: cmd vq: writing reply to chain {head}: {e}", self.name);
                        0
                    }
                }
            }
            Err(e) => {
                self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                let hdr = msg::MsgHeader::parse(&buf);
                warn!("{}: cmd vq: rejecting {hdr:?}: {e}", self.name);
                // Whatever UML reads back must be all-ones, like an unclaimed PCI read.
                let fill = vec![0xffu8; room.min(MAX_XFER)];
                let _ = writer.write_all(&fill);
                0
            }
        }
    }
}

impl VhostUserBackend for UmlBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        // Nothing else: UML accepts any transport feature offered (packed rings, indirect
        // descriptors) and IOTLB (ACCESS_PLATFORM) it cannot do.
        (1 << VIRTIO_F_VERSION_1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // BACKEND_REQ is mandatory in 6.12: without it UML registers the vring IRQs on IRQ 0.
        VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
        let mut ranges = Vec::new();
        for r in mem.memory().iter() {
            debug!(
                "{}: guest memory {:#x}..{:#x}",
                self.name,
                r.start_addr().0,
                r.start_addr().0 + r.len()
            );
            if let Ok(p) = r.get_host_address(MemoryRegionAddress(0)) {
                ranges.push((p as usize, r.len() as usize));
            }
        }
        if let Some(w) = &self.watch {
            w.set_ranges(&ranges);
        }
        Ok(())
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        *self.backend_req.lock().unwrap_or_else(|e| e.into_inner()) = Some(backend);
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without an exit event the vring worker thread would outlive the connection.
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                error!("{}: exit event: {e}", self.name);
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        // Never return an error: it would kill the vring worker and wedge UML.
        if !self.irq_attached.swap(true, Ordering::AcqRel) {
            if let Some(v) = vrings.get(IRQ_VQ as usize) {
                self.irq.attach(v);
            }
        }
        match device_event {
            CMD_VQ => {
                if let Some(v) = vrings.get(CMD_VQ as usize) {
                    self.process_cmd_queue(v);
                }
            }
            IRQ_VQ => self.irq.kicked(),
            other => debug!("{}: unexpected event {other}", self.name),
        }
        Ok(())
    }
}
