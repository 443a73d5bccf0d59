//! Interrupt delivery to UML: OP_MSI messages on the irq virtqueue (vq 1).
//!
//! **One message in flight per vector.** UML dispatches an MSI with `handle_simple_irq`, which
//! drops an interrupt that arrives while the same IRQ's handler is still running. A message is in
//! flight from the moment it enters the used ring until UML re-posts its buffer, which it does
//! only after the handler returned; a second message for the same vector waits (merged) until
//! then. So nothing is lost, and a slow guest takes one interrupt for a burst of completions.
//!
//! **No kicks UML need not send.** UML kicks the irq queue each time it re-posts a buffer. Those
//! kicks matter only while a message waits for a buffer or for its vector to land, so the queue's
//! notifications are on only then.

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

    /// Deliver in order until `send` runs out of buffers, leaving the messages `hold` names
    /// queued; returns how many buffers were used.
    pub(crate) fn drain(
        &mut self,
        mut hold: impl FnMut(&MsiMessage) -> bool,
        mut send: impl FnMut(&MsiMessage) -> Delivery,
    ) -> usize {
        let mut used = 0;
        let mut i = 0;
        while i < self.q.len() {
            let msg = self.q[i];
            if hold(&msg) {
                i += 1;
                continue;
            }
            match send(&msg) {
                Delivery::Sent => {
                    self.q.remove(i);
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

/// Messages UML has received whose buffers it has not re-posted yet (oldest first).
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    q: VecDeque<(MsiMessage, std::time::Instant)>,
    /// Buffers UML keeps posted (the most ever seen available at once).
    posted: u16,
}

/// A message UML has not finished with after this long is taken as handled, so a buffer UML
/// dropped cannot hold its vector for ever.
const FLIGHT_LIMIT: std::time::Duration = std::time::Duration::from_millis(20);

impl InFlight {
    /// UML shows `available` buffers: all but the last `posted - available` messages sent have
    /// been handled.
    pub(crate) fn settle(&mut self, available: u16, now: std::time::Instant) {
        self.posted = self.posted.max(available);
        let still = usize::from(self.posted.saturating_sub(available));
        while self.q.len() > still {
            self.q.pop_front();
        }
        while self
            .q
            .front()
            .is_some_and(|(_, t)| now.duration_since(*t) > FLIGHT_LIMIT)
        {
            self.q.pop_front();
        }
    }

    /// Whether a message for `msg`'s vector is still being handled.
    pub(crate) fn busy(&self, msg: &MsiMessage) -> bool {
        self.q.iter().any(|(m, _)| m == msg)
    }

    /// `msg` went to UML.
    pub(crate) fn push(&mut self, msg: MsiMessage, now: std::time::Instant) {
        self.q.push_back((msg, now));
    }

    /// Messages in flight.
    pub(crate) fn len(&self) -> usize {
        self.q.len()
    }
}

struct IrqState {
    /// vq 1, known once the vhost-user worker first runs (the daemon creates it per connection).
    vring: Option<VringRwLock>,
    pending: Pending,
    flight: InFlight,
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
                flight: InFlight::default(),
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
        st.flight = InFlight::default();
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
        let IrqState {
            vring,
            pending,
            flight,
        } = st;
        let Some(vring) = vring.as_ref() else {
            return;
        };
        let mem = self.mem.memory();
        let mut used = 0;
        for _ in 0..4 {
            let now = std::time::Instant::now();
            if let Some(avail) = available(vring, &mem) {
                flight.settle(avail, now);
            }
            let mut sent = Vec::new();
            used += pending.drain(
                |msg| flight.busy(msg),
                |msg| {
                    let d = deliver(vring, &mem, msg);
                    if d == Delivery::Sent {
                        sent.push(*msg);
                    }
                    d
                },
            );
            self.sent.fetch_add(sent.len() as u64, Ordering::Relaxed);
            for m in sent {
                flight.push(m, now);
            }
            if pending.len() == 0 {
                // Nothing waits: UML need not kick us when it re-posts buffers.
                let _ = vring.disable_notification();
                break;
            }
            // Something waits for a buffer or for its vector: ask for kicks, then look once
            // more in case UML re-posted before it could see the request.
            let _ = vring.enable_notification();
            std::sync::atomic::fence(Ordering::SeqCst);
            let before = flight.len();
            if let Some(avail) = available(vring, &mem) {
                flight.settle(avail, std::time::Instant::now());
            }
            if flight.len() == before {
                break;
            }
        }
        if used > 0 && vring.needs_notification().unwrap_or(true) {
            // The call fd is non-blocking (see shim.rs); a full socket means UML has an unread
            // notification already, so losing this one loses nothing.
            if let Err(e) = vring.signal_used_queue() {
                debug!("irq vq: signal: {e}");
            }
        }
    }
}

/// Buffers UML has posted that we have not used yet.
fn available(vring: &VringRwLock, mem: &<GuestMem as GuestAddressSpace>::T) -> Option<u16> {
    let st = vring.get_ref();
    let q = st.get_queue();
    if !q.ready() {
        return None;
    }
    let avail = q
        .avail_idx(&**mem, std::sync::atomic::Ordering::Acquire)
        .ok()?;
    Some(avail.0.wrapping_sub(q.next_avail()))
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
        assert_eq!(p.drain(|_| false, |_| Delivery::NoBuffer), 0);
        assert_eq!(p.len(), 3);
        // Two buffers: the two oldest leave, in order.
        let mut got = Vec::new();
        let mut budget = 2;
        let used = p.drain(
            |_| false,
            |msg| {
                if budget == 0 {
                    return Delivery::NoBuffer;
                }
                budget -= 1;
                got.push(msg.data);
                Delivery::Sent
            },
        );
        assert_eq!((used, got.as_slice()), (2, &[65, 66][..]));
        assert_eq!(p.len(), 1);
        let mut got = Vec::new();
        p.drain(
            |_| false,
            |msg| {
                got.push(msg.data);
                Delivery::Sent
            },
        );
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
        p.drain(|_| false, |_| Delivery::Sent);
        assert!(p.push(m(65)));
    }

    #[test]
    fn bad_buffer_keeps_the_message() {
        let mut p = Pending::default();
        p.push(m(70));
        let mut calls = 0;
        let used = p.drain(
            |_| false,
            |_| {
                calls += 1;
                match calls {
                    1 => Delivery::BadBuffer,
                    2 => Delivery::Sent,
                    _ => Delivery::NoBuffer,
                }
            },
        );
        assert_eq!((used, calls, p.len()), (2, 2, 0));
    }

    /// A vector with a message still being handled waits; other vectors go; the held one goes
    /// once UML re-posts the buffer of the first.
    #[test]
    fn one_message_in_flight_per_vector() {
        let t = std::time::Instant::now();
        let mut f = InFlight::default();
        f.settle(10, t); // UML posted 10 buffers
        let mut p = Pending::default();
        p.push(m(65));
        let mut sent = Vec::new();
        p.drain(
            |x| f.busy(x),
            |x| {
                sent.push(x.data);
                Delivery::Sent
            },
        );
        f.push(m(65), t);
        f.settle(9, t); // one buffer used, not re-posted: 65 is in flight
        p.push(m(65));
        p.push(m(66));
        p.drain(
            |x| f.busy(x),
            |x| {
                sent.push(x.data);
                Delivery::Sent
            },
        );
        f.push(m(66), t);
        assert_eq!(sent, vec![65, 66], "66 passes the held 65");
        assert_eq!(p.len(), 1);
        f.settle(8, t); // still both in flight
        assert!(f.busy(&m(65)) && f.busy(&m(66)));
        f.settle(9, t); // UML re-posted the first buffer: 65 was handled
        assert!(!f.busy(&m(65)) && f.busy(&m(66)));
        p.drain(
            |x| f.busy(x),
            |x| {
                sent.push(x.data);
                Delivery::Sent
            },
        );
        assert_eq!(sent, vec![65, 66, 65]);
        // A buffer UML never gives back does not hold its vector for ever.
        f.settle(10, t + FLIGHT_LIMIT * 2);
        assert_eq!(f.len(), 0);
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
