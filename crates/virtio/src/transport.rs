//! The virtio PCI transport (virtio 1.2 §4.1): capabilities, the common configuration window,
//! feature negotiation, device status and reset, the ISR, notifications and interrupts.

use std::sync::atomic::Ordering;

use pci::{ConfigSpace, InterruptMode};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddressSpace;
use zerocopy::IntoBytes;

use crate::layout;
use crate::spec::{cap, common, feature, isr, status, BlkConfig, NO_VECTOR, SECTOR};
use crate::{lock, Shared};

/// Add the four virtio structure capabilities, each naming where in BAR0 it lives, and the
/// config-space window onto the BARs (which firmware uses to reach a BAR above 4 GiB);
/// returns the window capability's offset.
pub(crate) fn add_caps(cs: &mut ConfigSpace, queues: u16) -> usize {
    let regions = [
        (
            cap::COMMON_CFG,
            layout::COMMON,
            common::LEN.next_multiple_of(4),
        ),
        (cap::ISR_CFG, layout::ISR, 4),
        (cap::DEVICE_CFG, layout::DEVICE, layout::DEVICE_LEN),
        (
            cap::NOTIFY_CFG,
            layout::NOTIFY,
            u64::from(queues) * u64::from(layout::NOTIFY_MULTIPLIER),
        ),
    ];
    for (typ, offset, length) in regions {
        let len = if typ == cap::NOTIFY_CFG {
            cap::NOTIFY_LEN
        } else {
            cap::LEN
        };
        let at = cs.add_capability(cap::VENDOR, len);
        cs.write_u8(at + 2, len as u8); // cap_len
        cs.write_u8(at + 3, typ); // cfg_type
        cs.write_u8(at + 4, 0); // bar
        cs.write_u32(at + 8, offset as u32);
        cs.write_u32(at + 12, length as u32);
        if typ == cap::NOTIFY_CFG {
            cs.write_u32(at + 16, layout::NOTIFY_MULTIPLIER);
        }
    }
    let at = cs.add_capability(cap::VENDOR, cap::PCI_CFG_LEN);
    cs.write_u8(at + 2, cap::PCI_CFG_LEN as u8);
    cs.write_u8(at + 3, cap::PCI_CFG);
    // The driver picks the BAR, offset and length, then reads or writes the data field.
    cs.set_wmask_u8(at + 4, 0xff);
    cs.set_wmask_u32(at + 8, u32::MAX);
    cs.set_wmask_u32(at + 12, u32::MAX);
    cs.set_wmask_u32(at + 16, u32::MAX);
    at
}

/// Feature negotiation and the selected-queue window.
#[derive(Clone, Copy)]
pub(crate) struct Transport {
    device_feature_select: u32,
    driver_feature_select: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// MSI-X vector for configuration changes.
    pub config_vector: u16,
    queue_select: u16,
    config_generation: u8,
    /// A reset waits for backend requests of the old queues to finish before status reads 0.
    pub resetting: bool,
}

impl Transport {
    /// Device/driver feature select, queue select, configuration generation (snapshots).
    pub fn selects(&self) -> (u32, u32, u16, u8) {
        (
            self.device_feature_select,
            self.driver_feature_select,
            self.queue_select,
            self.config_generation,
        )
    }

    /// Put back what [`Transport::selects`] returned.
    pub fn set_selects(&mut self, s: (u32, u32, u16, u8)) {
        (
            self.device_feature_select,
            self.driver_feature_select,
            self.queue_select,
            self.config_generation,
        ) = s;
    }
}

impl Default for Transport {
    fn default() -> Self {
        Transport {
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            config_vector: NO_VECTOR,
            queue_select: 0,
            config_generation: 0,
            resetting: false,
        }
    }
}

/// A request the backend is working on, by descriptor head.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pending {
    /// Where the status byte goes.
    pub status_addr: u64,
    /// Backend requests still running.
    pub parts: u32,
    /// The status so far (the first failure wins).
    pub status: u8,
    /// Bytes written into the chain's device-writable buffers, status byte included.
    pub used_len: u32,
    /// Flush once the parts are done, before answering (discard and write zeroes on a
    /// write-through device must be durable when they complete).
    pub flush_after: bool,
    /// When the request was taken from the ring (latency statistics).
    pub started: std::time::Instant,
}

/// One virtqueue and the requests started from it.
pub(crate) struct Vq {
    /// The split ring.
    pub q: Queue,
    /// Its index.
    pub index: u16,
    /// MSI-X vector.
    pub vector: u16,
    /// Bumped at reset: completions of an older epoch are dropped (32 bits: a guest cannot
    /// reset often enough to wrap it while a request is still in flight).
    pub epoch: u32,
    /// Requests in flight, by head index.
    pub pending: Vec<Option<Pending>>,
    /// A chain could not be answered (no status byte): the queue stopped until reset.
    pub broken: bool,
    /// Until when the I/O thread watches the available ring with notifications off.
    pub poll_until: Option<std::time::Instant>,
}

impl Vq {
    /// Queue `index` with room for `max` entries.
    pub fn new(index: u16, max: u16) -> Self {
        Vq {
            q: Queue::new(max).expect("a power of two from 2 to 1024, checked by the options"),
            index,
            vector: NO_VECTOR,
            epoch: 0,
            pending: vec![None; usize::from(max)],
            broken: false,
            poll_until: None,
        }
    }

    fn reset(&mut self) {
        self.q.reset();
        self.vector = NO_VECTOR;
        self.epoch = self.epoch.wrapping_add(1);
        self.pending.iter_mut().for_each(|p| *p = None);
        self.broken = false;
        self.poll_until = None;
    }
}

impl Shared {
    /// Features this device offers.
    pub(crate) fn device_features(&self) -> u64 {
        let mut f = feature::VERSION_1
            | feature::RING_EVENT_IDX
            | feature::RING_INDIRECT_DESC
            | feature::BLK_SIZE_MAX
            | feature::BLK_SEG_MAX
            | feature::BLK_BLK_SIZE
            | feature::BLK_FLUSH
            | feature::BLK_TOPOLOGY
            | feature::BLK_CONFIG_WCE
            | feature::BLK_MQ;
        if self.backend.info().read_only {
            f |= feature::BLK_RO;
        } else {
            f |= feature::BLK_DISCARD | feature::BLK_WRITE_ZEROES;
        }
        f
    }

    /// Whether the driver accepted `f`.
    pub(crate) fn negotiated(&self, f: u64) -> bool {
        lock(&self.tr).driver_features & f != 0
    }

    /// The configuration space as the guest reads it.
    pub(crate) fn blk_config(&self) -> BlkConfig {
        let info = self.backend.info();
        BlkConfig {
            capacity: info.capacity / SECTOR,
            size_max: crate::blk::SIZE_MAX,
            seg_max: crate::blk::seg_max(self.opts.qsz),
            blk_size: info.sector_size,
            min_io_size: 1,
            writeback: u8::from(self.writeback.load(Ordering::Relaxed)),
            num_queues: self.opts.queues,
            max_discard_sectors: crate::blk::MAX_RANGE_SECTORS,
            max_discard_seg: crate::blk::MAX_RANGES,
            discard_sector_alignment: info.sector_size / SECTOR as u32,
            max_write_zeroes_sectors: crate::blk::MAX_RANGE_SECTORS,
            max_write_zeroes_seg: crate::blk::MAX_RANGES,
            write_zeroes_may_unmap: 1,
            ..Default::default()
        }
    }

    /// Guest read of BAR0, any width.
    pub(crate) fn read_bar0(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let end = offset + data.len() as u64;
        if end <= layout::COMMON + 64 {
            let img = self.common_image();
            let at = (offset - layout::COMMON) as usize;
            data.copy_from_slice(&img[at..at + data.len()]);
        } else if offset >= layout::ISR && end <= layout::ISR + 4 {
            if offset == layout::ISR {
                // Reading clears it, and with it the INTx level.
                data[0] = self.isr.swap(0, Ordering::AcqRel);
                self.update_intx();
            }
        } else if offset >= layout::DEVICE && end <= layout::DEVICE + layout::DEVICE_LEN {
            let mut img = [0u8; layout::DEVICE_LEN as usize];
            let cfg = self.blk_config();
            img[..std::mem::size_of::<BlkConfig>()].copy_from_slice(cfg.as_bytes());
            let at = (offset - layout::DEVICE) as usize;
            data.copy_from_slice(&img[at..at + data.len()]);
        }
    }

    /// The common configuration structure with the current values.
    fn common_image(&self) -> [u8; 64] {
        // Lock order: a queue before the transport (the request path reports errors with a
        // queue held), so the transport is copied and released before a queue is looked at.
        let tr = *lock(&self.tr);
        let mut b = [0u8; 64];
        let mut put =
            |off: u64, v: &[u8]| b[off as usize..off as usize + v.len()].copy_from_slice(v);
        put(
            common::DEVICE_FEATURE_SELECT,
            &tr.device_feature_select.to_le_bytes(),
        );
        let df = match tr.device_feature_select {
            0 => self.device_features() as u32,
            1 => (self.device_features() >> 32) as u32,
            _ => 0,
        };
        put(common::DEVICE_FEATURE, &df.to_le_bytes());
        put(
            common::DRIVER_FEATURE_SELECT,
            &tr.driver_feature_select.to_le_bytes(),
        );
        let gf = match tr.driver_feature_select {
            0 => tr.driver_features as u32,
            1 => (tr.driver_features >> 32) as u32,
            _ => 0,
        };
        put(common::DRIVER_FEATURE, &gf.to_le_bytes());
        put(common::CONFIG_MSIX_VECTOR, &tr.config_vector.to_le_bytes());
        put(common::NUM_QUEUES, &self.opts.queues.to_le_bytes());
        put(
            common::DEVICE_STATUS,
            &[self.status.load(Ordering::Acquire)],
        );
        put(common::CONFIG_GENERATION, &[tr.config_generation]);
        put(common::QUEUE_SELECT, &tr.queue_select.to_le_bytes());
        if let Some(vq) = self.queues.get(usize::from(tr.queue_select)) {
            let vq = lock(vq);
            put(common::QUEUE_SIZE, &vq.q.size().to_le_bytes());
            put(common::QUEUE_MSIX_VECTOR, &vq.vector.to_le_bytes());
            put(common::QUEUE_ENABLE, &u16::from(vq.q.ready()).to_le_bytes());
            put(common::QUEUE_NOTIFY_OFF, &vq.index.to_le_bytes());
            put(common::QUEUE_DESC, &vq.q.desc_table().to_le_bytes());
            put(common::QUEUE_DRIVER, &vq.q.avail_ring().to_le_bytes());
            put(common::QUEUE_DEVICE, &vq.q.used_ring().to_le_bytes());
            put(common::QUEUE_NOTIFY_DATA, &vq.index.to_le_bytes());
        }
        b
    }

    /// Guest write to BAR0: any width; each common-configuration field the write touches is
    /// merged with its current value and applied.
    pub(crate) fn write_bar0(&self, offset: u64, data: &[u8]) {
        let end = offset + data.len() as u64;
        if offset >= layout::NOTIFY {
            let q = (offset - layout::NOTIFY) / u64::from(layout::NOTIFY_MULTIPLIER);
            if let Ok(q) = u16::try_from(q) {
                self.counters.notifies.fetch_add(1, Ordering::Relaxed);
                self.notify(q);
            }
            return;
        }
        if offset >= layout::DEVICE && end <= layout::DEVICE + layout::DEVICE_LEN {
            // Only `writeback` is writable, and only once CONFIG_WCE was negotiated.
            let wb = layout::DEVICE + 32;
            if offset <= wb && wb < end && self.negotiated(feature::BLK_CONFIG_WCE) {
                let on = data[(wb - offset) as usize] != 0;
                self.writeback.store(on, Ordering::Relaxed);
            }
            return;
        }
        if end > layout::COMMON + common::LEN {
            return; // ISR is read-only; the rest of BAR0 is reserved
        }
        const FIELDS: [(u64, usize); 17] = [
            (common::DEVICE_FEATURE_SELECT, 4),
            (common::DEVICE_FEATURE, 4),
            (common::DRIVER_FEATURE_SELECT, 4),
            (common::DRIVER_FEATURE, 4),
            (common::CONFIG_MSIX_VECTOR, 2),
            (common::NUM_QUEUES, 2),
            (common::DEVICE_STATUS, 1),
            (common::CONFIG_GENERATION, 1),
            (common::QUEUE_SELECT, 2),
            (common::QUEUE_SIZE, 2),
            (common::QUEUE_MSIX_VECTOR, 2),
            (common::QUEUE_ENABLE, 2),
            (common::QUEUE_NOTIFY_OFF, 2),
            (common::QUEUE_DESC, 8),
            (common::QUEUE_DRIVER, 8),
            (common::QUEUE_DEVICE, 8),
            (common::QUEUE_NOTIFY_DATA, 2),
        ];
        let img = self.common_image();
        for (off, size) in FIELDS {
            let (f_end, w_end) = (off + size as u64, end);
            if off >= w_end || f_end <= offset {
                continue;
            }
            let mut v = [0u8; 8];
            v[..size].copy_from_slice(&img[off as usize..off as usize + size]);
            for i in 0..size as u64 {
                let at = off + i;
                if at >= offset && at < end {
                    v[i as usize] = data[(at - offset) as usize];
                }
            }
            // A 64-bit address written as two dwords: apply only the half written.
            let lo = offset < off + 4 && end > off;
            let hi = offset < off + 8 && end > off + 4;
            self.write_field(off, u64::from_le_bytes(v), lo, hi);
        }
    }

    fn write_field(&self, off: u64, v: u64, lo: bool, hi: bool) {
        let mut tr = lock(&self.tr);
        match off {
            common::DEVICE_FEATURE_SELECT => tr.device_feature_select = v as u32,
            common::DRIVER_FEATURE_SELECT => tr.driver_feature_select = v as u32,
            common::DRIVER_FEATURE => {
                if self.status.load(Ordering::Acquire) & status::FEATURES_OK != 0 {
                    return; // negotiation is over
                }
                let shift = match tr.driver_feature_select {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                tr.driver_features = (tr.driver_features & !(0xffff_ffffu64 << shift))
                    | ((v & 0xffff_ffff) << shift);
            }
            common::CONFIG_MSIX_VECTOR => tr.config_vector = self.vector_or_none(v as u16),
            common::DEVICE_STATUS => {
                drop(tr);
                self.write_status(v as u8);
            }
            common::QUEUE_SELECT => tr.queue_select = v as u16,
            common::QUEUE_SIZE
            | common::QUEUE_MSIX_VECTOR
            | common::QUEUE_ENABLE
            | common::QUEUE_DESC
            | common::QUEUE_DRIVER
            | common::QUEUE_DEVICE => {
                let sel = usize::from(tr.queue_select);
                let event_idx = tr.driver_features & feature::RING_EVENT_IDX != 0;
                drop(tr);
                if let Some(vq) = self.queues.get(sel) {
                    self.write_queue(&mut lock(vq), off, v, (lo, hi), event_idx);
                }
            }
            _ => {} // read-only fields
        }
    }

    fn write_queue(&self, vq: &mut Vq, off: u64, v: u64, (lo, hi): (bool, bool), event_idx: bool) {
        if off == common::QUEUE_MSIX_VECTOR {
            vq.vector = self.vector_or_none(v as u16);
            return;
        }
        // Everything else describes the ring and is fixed once the queue is enabled.
        if vq.q.ready() {
            return;
        }
        let (low, high) = (lo.then_some(v as u32), hi.then_some((v >> 32) as u32));
        match off {
            common::QUEUE_SIZE => vq.q.set_size(v as u16),
            common::QUEUE_DESC => vq.q.set_desc_table_address(low, high),
            common::QUEUE_DRIVER => vq.q.set_avail_ring_address(low, high),
            common::QUEUE_DEVICE => vq.q.set_used_ring_address(low, high),
            common::QUEUE_ENABLE if v & 1 == 1 => {
                let mem = self.mem.memory();
                vq.q.set_event_idx(event_idx);
                // The ring is checked as a ready queue would be used.
                vq.q.set_ready(true);
                if !vq.q.is_valid(&*mem) {
                    vq.q.set_ready(false);
                    log::debug!(
                        "virtio-blk {}: queue {} enabled with a ring outside guest RAM",
                        self.opts.serial,
                        vq.index
                    );
                    self.needs_reset();
                }
            }
            _ => {}
        }
    }

    /// A vector the function has, or NO_VECTOR (which tells the driver it was refused).
    fn vector_or_none(&self, v: u16) -> u16 {
        if usize::from(v) < self.irq.msix_vectors() {
            v
        } else {
            NO_VECTOR
        }
    }

    fn write_status(&self, new: u8) {
        if new == 0 {
            self.reset();
            return;
        }
        let old = self.status.load(Ordering::Acquire);
        let mut new = new | (old & status::DEVICE_NEEDS_RESET);
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let accepted = lock(&self.tr).driver_features;
            // The driver may accept only what was offered, and must speak virtio 1.
            if accepted & !self.device_features() != 0 || accepted & feature::VERSION_1 == 0 {
                log::debug!(
                    "virtio-blk {}: features {accepted:#x} refused (offered {:#x})",
                    self.opts.serial,
                    self.device_features()
                );
                new &= !status::FEATURES_OK;
            } else if accepted & feature::BLK_FLUSH == 0 {
                // A driver that cannot flush gets a write-through device (§5.2.5.2, §5.2.6.2).
                self.writeback.store(false, Ordering::Relaxed);
            }
        }
        self.status.store(new, Ordering::Release);
    }

    /// Device reset: forget every queue and the negotiation. Status reads 0 once backend
    /// requests of the old queues have finished (they may still write guest memory).
    fn reset(&self) {
        for vq in self.queues.iter() {
            lock(vq).reset();
        }
        *lock(&self.tr) = Transport {
            resetting: true,
            ..Transport::default()
        };
        self.isr.store(0, Ordering::Release);
        self.writeback.store(true, Ordering::Relaxed);
        self.update_intx();
        self.finish_reset_if_idle();
    }

    /// Complete a pending reset once nothing is in flight.
    pub(crate) fn finish_reset_if_idle(&self) {
        let mut tr = lock(&self.tr);
        if tr.resetting && self.inflight.load(Ordering::Acquire) == 0 {
            tr.resetting = false;
            self.status.store(0, Ordering::Release);
        }
    }

    /// The device hit something it cannot answer: set DEVICE_NEEDS_RESET and tell the driver.
    pub(crate) fn needs_reset(&self) {
        let old = self
            .status
            .fetch_or(status::DEVICE_NEEDS_RESET, Ordering::AcqRel);
        if old & status::DEVICE_NEEDS_RESET != 0 {
            return;
        }
        let vector = {
            let mut tr = lock(&self.tr);
            tr.config_generation = tr.config_generation.wrapping_add(1);
            tr.config_vector
        };
        self.interrupt(vector, isr::CONFIG);
    }

    /// Used buffers on `vq`: interrupt the driver on the queue's vector.
    pub(crate) fn signal(&self, vq: &Vq) {
        self.interrupt(vq.vector, isr::QUEUE);
    }

    fn interrupt(&self, vector: u16, isr_bit: u8) {
        if isr_bit == isr::CONFIG {
            // Set whatever the interrupt mode (§4.1.4.5).
            self.isr.fetch_or(isr::CONFIG, Ordering::AcqRel);
        }
        if self.irq.mode() == InterruptMode::MsiX {
            if vector != NO_VECTOR && self.irq.trigger(vector) {
                self.counters.interrupts.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        self.isr.fetch_or(isr_bit, Ordering::AcqRel);
        self.update_intx();
        self.counters.interrupts.fetch_add(1, Ordering::Relaxed);
    }

    /// INTx is level-triggered: asserted while the ISR has a bit set (MSI-X off).
    fn update_intx(&self) {
        if self.irq.mode() != InterruptMode::Intx {
            return;
        }
        let level = self.isr.load(Ordering::Acquire) != 0;
        lock(&self.pci).set_intx(level);
    }
}
