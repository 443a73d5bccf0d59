//! Interrupt delivery to UML: OP_MSI messages on the irq virtqueue (vq 1).

use crate::msg::{encode_msi, MSI_MSG_LEN};
use log::{debug, error, warn};
use pci::{GuestMem, InterruptSink, MsiMessage};
use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{QueueT, Writer};
use vm_memory::GuestAddressSpace;

/// What happened to one delivery attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// The message went into a buffer.
    Sent,
    /// No buffer is available (or the queue is not running yet); retry on the next kick.
    NoBuffer,
    /// A buffer was consumed but could not hold the message; try the next buffer.
    BadBuffer,
}

/// Undelivered MSIs in arrival order. An MSI identical to one still waiting is merged into it:
/// that is what hardware does with a pending vector (one PBA bit), drivers reap all work per
/// interrupt, and it bounds the queue by the number of distinct vectors while UML is stalled.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    q: VecDeque<MsiMessage>,
    merged: u64,
}

impl Pending {
    /// Queue `msg`; false when it was merged into an identical pending message.
    pub(crate) fn push(&mut self, msg: MsiMessage) -> bool {
        if self.q.contains(&msg) {
            self.merged += 1;
            false
        } else {
            self.q.push_back(msg);
            true
        }
    }

    /// Deliver in order until `send` runs out of buffers; returns how many buffers were used.
    pub(crate) fn drain(&mut self, mut send: impl FnMut(&MsiMessage) -> Delivery) -> usize {
        let mut used = 0;
        while let Some(msg) = self.q.front() {
            match send(msg) {
                Delivery::Sent => {
                    self.q.pop_front();
                    used += 1;
                }
                Delivery::BadBuffer => used += 1,
                Delivery::NoBuffer => break,
            }
        }
        used
    }

    pub(crate) fn len(&self) -> usize {
        self.q.len()
    }
}

struct IrqState {
    /// vq 1, known once the vhost-user worker first runs (the daemon creates it per connection).
    vring: Option<VringRwLock>,
    pending: Pending,
}

/// The UML frontend's [`InterruptSink`]. Create it (with [`UmlInterrupts::new`]) before the
/// device, hand it to the device in its `DeviceContext`, then give the same `Arc` to
/// [`crate::UmlDevice`]. Callable from any thread; never blocks on UML.
pub struct UmlInterrupts {
    mem: GuestMem,
    state: Mutex<IrqState>,
    intx_warned: AtomicBool,
    sent: AtomicU64,
}

impl UmlInterrupts {
    /// `mem` must be the `GuestMem` the server is given: the irq ring lives in guest memory.
    pub fn new(mem: &GuestMem) -> Arc<Self> {
        Arc::new(UmlInterrupts {
            mem: mem.clone(),
            state: Mutex::new(IrqState {
                vring: None,
                pending: Pending::default(),
            }),
            intx_warned: AtomicBool::new(false),
            sent: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, IrqState> {
        // The state stays consistent across a panic (queue ops are single calls), so keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bind to the irq vring of a new connection and deliver anything queued before it existed.
    pub(crate) fn attach(&self, vring: &VringRwLock) {
        let mut st = self.lock();
        st.vring = Some(vring.clone());
        self.flush(&mut st);
    }

    /// Forget the ring of a finished connection; later MSIs wait in the queue.
    pub(crate) fn detach(&self) {
        self.lock().vring = None;
    }

    /// UML kicked the irq vq (it re-posted buffers): send what is waiting.
    pub(crate) fn kicked(&self) {
        let mut st = self.lock();
        self.flush(&mut st);
    }

    /// Counters for `--stats`.
    pub fn stats(&self) -> Vec<(String, u64)> {
        let st = self.lock();
        vec![
            ("msi_sent".into(), self.sent.load(Ordering::Relaxed)),
            ("msi_merged".into(), st.pending.merged),
            ("msi_pending".into(), st.pending.len() as u64),
        ]
    }

    fn flush(&self, st: &mut IrqState) {
        let IrqState { vring, pending } = st;
        let Some(vring) = vring.as_ref() else {
            return;
        };
        let mem = self.mem.memory();
        let mut sent = 0;
        let used = pending.drain(|msg| {
            let d = deliver(vring, &mem, msg);
            if d == Delivery::Sent {
                sent += 1;
            }
            d
        });
        self.sent.fetch_add(sent, Ordering::Relaxed);
        if used > 0 && vring.needs_notification().unwrap_or(true) {
            // The call fd is non-blocking (see shim.rs); a full socket means UML has an unread
            // notification already, so losing this one loses nothing.
            if let Err(e) = vring.signal_used_queue() {
                debug!("irq vq: signal: {e}");
            }
        }
    }
}

/// Put one OP_MSI message into the next irq-vq buffer.
fn deliver(
    vring: &VringRwLock,
    mem: &<GuestMem as GuestAddressSpace>::T,
    msg: &MsiMessage,
) -> Delivery {
    let chain = {
        let mut st = vring.get_mut();
        if !st.get_queue().ready() || !st.is_enabled() {
            return Delivery::NoBuffer;
        }
        st.get_queue_mut().pop_descriptor_chain(mem.clone())
    };
    let Some(chain) = chain else {
        return Delivery::NoBuffer;
    };
    let head = chain.head_index();
    let bytes = encode_msi(msg.addr, msg.data);
    let result = match Writer::new(&**mem, chain) {
        Ok(mut w) if w.available_bytes() >= MSI_MSG_LEN => {
            w.write_all(&bytes).map_err(|e| e.to_string())
        }
        Ok(w) => Err(format!("buffer of {} bytes", w.available_bytes())),
        Err(e) => Err(e.to_string()),
    };
    let (len, d) = match result {
        Ok(()) => (MSI_MSG_LEN as u32, Delivery::Sent),
        Err(e) => {
            error!("irq vq: unusable buffer (head {head}): {e}; MSI kept for the next one");
            (0, Delivery::BadBuffer)
        }
    };
    if let Err(e) = vring.add_used(head, len) {
        error!("irq vq: add_used: {e}");
    }
    d
}

impl InterruptSink for UmlInterrupts {
    fn msi(&self, msg: MsiMessage) {
        let mut st = self.lock();
        st.pending.push(msg);
        self.flush(&mut st);
    }

    fn intx(&self, pin: u8, asserted: bool) {
        // UML 6.12's per-device INTx irq has no irq_chip, so request_irq() fails anyway.
        if asserted && !self.intx_warned.swap(true, Ordering::Relaxed) {
            warn!("INTx (pin {pin}) cannot be delivered to UML; dropping (use MSI or MSI-X)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(data: u32) -> MsiMessage {
        MsiMessage {
            addr: 0xa0000,
            data,
        }
    }

    #[test]
    fn queues_until_buffers_then_drains_in_order() {
        let mut p = Pending::default();
        assert!(p.push(m(65)));
        assert!(p.push(m(66)));
        assert!(p.push(m(67)));
        // No buffers: nothing leaves.
        assert_eq!(p.drain(|_| Delivery::NoBuffer), 0);
        assert_eq!(p.len(), 3);
        // Two buffers: the two oldest leave, in order.
        let mut got = Vec::new();
        let mut budget = 2;
        let used = p.drain(|msg| {
            if budget == 0 {
                return Delivery::NoBuffer;
            }
            budget -= 1;
            got.push(msg.data);
            Delivery::Sent
        });
        assert_eq!((used, got.as_slice()), (2, &[65, 66][..]));
        assert_eq!(p.len(), 1);
        let mut got = Vec::new();
        p.drain(|msg| {
            got.push(msg.data);
            Delivery::Sent
        });
        assert_eq!(got, vec![67]);
        assert_eq!(p.len(), 0);
    }

    #[test]
    fn identical_pending_messages_merge() {
        let mut p = Pending::default();
        assert!(p.push(m(65)));
        assert!(!p.push(m(65)));
        assert!(p.push(m(66)));
        assert!(!p.push(m(66)));
        assert_eq!(p.len(), 2);
        assert_eq!(p.merged, 2);
        // Once delivered, the same vector queues again.
        p.drain(|_| Delivery::Sent);
        assert!(p.push(m(65)));
    }

    #[test]
    fn bad_buffer_keeps_the_message() {
        let mut p = Pending::default();
        p.push(m(70));
        let mut calls = 0;
        let used = p.drain(|_| {
            calls += 1;
            match calls {
                1 => Delivery::BadBuffer,
                2 => Delivery::Sent,
                _ => Delivery::NoBuffer,
            }
        });
        assert_eq!((used, calls, p.len()), (2, 2, 0));
    }

    #[test]
    fn sink_without_ring_queues_and_never_blocks() {
        let mem = GuestMem::new(vm_memory::GuestMemoryMmap::new());
        let irq = UmlInterrupts::new(&mem);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let irq = irq.clone();
                std::thread::spawn(move || {
                    for v in 0..100 {
                        irq.msi(m(100 + (t * 100 + v) % 8));
                    }
                    irq.intx(1, true);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let stats = irq.stats();
        assert_eq!(stats[0], ("msi_sent".into(), 0));
        assert_eq!(stats[1], ("msi_merged".into(), 392));
        assert_eq!(stats[2], ("msi_pending".into(), 8));
    }
}
