//! Pause, save and restore of a virtio-blk device, as versioned serde data.
//!
//! Pausing stops draining the available rings (notifications meanwhile are remembered by the
//! ring itself), waits for the backend requests in flight, whose completions go into the used
//! rings as usual, and flushes. What is left is the transport (status, features, queue
//! addresses and positions, vectors) and no request half done: a restored device drains the
//! rings from where the old one stopped.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pci::StateError;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};

use crate::spec::NO_VECTOR;
use crate::{lock, Shared};

/// Version of [`VirtioState`]; another version is refused.
pub const STATE_VERSION: u32 = 1;

const PAUSE_WAIT: Duration = Duration::from_secs(60);

/// A paused virtio-blk device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VirtioState {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// Identity: serial, queue count and size, capacity (must match).
    pub serial: String,
    /// Queues.
    pub queues: u16,
    /// Queue size.
    pub queue_size: u16,
    /// Backend bytes.
    pub capacity: u64,
    /// Config space and MSI-X.
    pub pci: pci::FunctionState,
    /// Device status.
    pub status: u8,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// Configuration-change vector.
    pub config_vector: u16,
    /// The transport's select registers and configuration generation.
    pub selects: (u32, u32, u16, u8),
    /// Write-back cache.
    pub writeback: bool,
    /// Pending ISR bits.
    pub isr: u8,
    /// Every queue.
    pub vqs: Vec<VqSave>,
}

/// One virtqueue.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VqSave {
    /// Size the driver chose.
    pub size: u16,
    /// Enabled.
    pub ready: bool,
    /// Descriptor table, available ring and used ring addresses.
    pub rings: (u64, u64, u64),
    /// Next available entry to take and next used entry to fill.
    pub next: (u16, u16),
    /// VIRTIO_F_RING_EVENT_IDX in use.
    pub event_idx: bool,
    /// MSI-X vector.
    pub vector: u16,
    /// Stopped until reset (a chain without a status byte).
    pub broken: bool,
}

fn invalid(m: String) -> StateError {
    StateError::Invalid(format!("virtio-blk state: {m}"))
}

impl Shared {
    fn quiesced(&self) -> bool {
        self.inflight.load(Ordering::Acquire) == 0
            && self
                .queues
                .iter()
                .all(|q| lock(q).pending.iter().all(Option::is_none))
    }

    /// Stop draining, wait for the requests in flight, flush.
    pub(crate) fn pause(&self) -> Result<(), StateError> {
        self.paused.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + PAUSE_WAIT;
        while !self.quiesced() {
            if Instant::now() >= deadline {
                return Err(StateError::Refused(format!(
                    "virtio-blk: {} requests still in flight after {} s",
                    self.inflight.load(Ordering::Acquire),
                    PAUSE_WAIT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        for q in self.queues.iter() {
            lock(q).poll_until = None;
        }
        if let Err(e) = self.backend.flush() {
            log::warn!(
                "virtio-blk {}: flush for pause failed: {e}",
                self.opts.serial
            );
        }
        Ok(())
    }

    /// Drain again: what the driver made available meanwhile starts now.
    pub(crate) fn unpause(&self) {
        if self.paused.swap(false, Ordering::SeqCst) {
            for q in 0..self.queues.len() {
                self.notify(q as u16);
            }
        }
    }

    pub(crate) fn save(&self) -> Result<VirtioState, StateError> {
        if !self.paused.load(Ordering::SeqCst) || !self.quiesced() {
            return Err(StateError::Refused(
                "virtio-blk: save needs a paused device".into(),
            ));
        }
        let tr = *lock(&self.tr);
        if tr.resetting {
            return Err(StateError::Refused(
                "virtio-blk: a reset is still in progress".into(),
            ));
        }
        let vqs = self
            .queues
            .iter()
            .map(|m| {
                let vq = lock(m);
                let s = vq.q.state();
                VqSave {
                    size: s.size,
                    ready: s.ready,
                    rings: (s.desc_table, s.avail_ring, s.used_ring),
                    next: (s.next_avail, s.next_used),
                    event_idx: s.event_idx_enabled,
                    vector: vq.vector,
                    broken: vq.broken,
                }
            })
            .collect();
        Ok(VirtioState {
            version: STATE_VERSION,
            serial: self.opts.serial.clone(),
            queues: self.opts.queues,
            queue_size: self.opts.qsz,
            capacity: self.backend.info().capacity,
            pci: lock(&self.pci).save(),
            status: self.status.load(Ordering::Acquire),
            driver_features: tr.driver_features,
            config_vector: tr.config_vector,
            selects: tr.selects(),
            writeback: self.writeback.load(Ordering::Acquire),
            isr: self.isr.load(Ordering::Acquire),
            vqs,
        })
    }

    pub(crate) fn restore(&self, s: &VirtioState) -> Result<(), StateError> {
        if s.version != STATE_VERSION {
            return Err(invalid(format!(
                "format version {}, this rhyve reads version {STATE_VERSION}",
                s.version
            )));
        }
        let here = (
            self.opts.serial.as_str(),
            self.opts.queues,
            self.opts.qsz,
            self.backend.info().capacity,
        );
        if (s.serial.as_str(), s.queues, s.queue_size, s.capacity) != here {
            return Err(StateError::Refused(format!(
                "virtio-blk: state of a device with serial {:?}, {} queues of {}, {} bytes; \
                 this one has serial {:?}, {} queues of {}, {} bytes",
                s.serial, s.queues, s.queue_size, s.capacity, here.0, here.1, here.2, here.3
            )));
        }
        if self.status.load(Ordering::Acquire) != 0 {
            return Err(StateError::Refused(
                "virtio-blk: restore needs a freshly created device".into(),
            ));
        }
        if s.vqs.len() != usize::from(s.queues) {
            return Err(invalid(format!("{} queues saved", s.vqs.len())));
        }
        let vectors = s.queues + 1;
        let vector_ok = |v: u16| v == NO_VECTOR || v < vectors;
        let mut queues = Vec::new();
        for (i, v) in s.vqs.iter().enumerate() {
            let q = Queue::try_from(QueueState {
                max_size: s.queue_size,
                next_avail: v.next.0,
                next_used: v.next.1,
                event_idx_enabled: v.event_idx,
                size: v.size,
                ready: v.ready,
                desc_table: v.rings.0,
                avail_ring: v.rings.1,
                used_ring: v.rings.2,
            })
            .map_err(|e| invalid(format!("queue {i}: {e:?}")))?;
            if !vector_ok(v.vector) {
                return Err(invalid(format!("queue {i}: vector {}", v.vector)));
            }
            queues.push(q);
        }
        if !vector_ok(s.config_vector) {
            return Err(invalid(format!("configuration vector {}", s.config_vector)));
        }
        lock(&self.pci).restore(&s.pci)?;
        // From here on nothing can fail.
        self.paused.store(true, Ordering::SeqCst);
        for ((m, q), v) in self.queues.iter().zip(queues).zip(&s.vqs) {
            let mut vq = lock(m);
            vq.q = q;
            vq.vector = v.vector;
            vq.broken = v.broken;
        }
        {
            let mut tr = lock(&self.tr);
            tr.driver_features = s.driver_features;
            tr.config_vector = s.config_vector;
            tr.set_selects(s.selects);
        }
        self.writeback.store(s.writeback, Ordering::Release);
        self.isr.store(s.isr, Ordering::Release);
        self.status.store(s.status, Ordering::Release);
        Ok(())
    }
}
