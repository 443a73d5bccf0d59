//! The rhyve test device (only with `--testdev`): lets a test guest mark phases and exit.
//!
//! Ports (32-bit `out`):
//! * `0xF0` begin phase `value`: the VMM snapshots its exit counters;
//! * `0xF4` end phase, `value` = I/O commands the guest issued in it: the VMM prints one line
//!   `rhyve: phase P: N I/Os, E userspace exits (X per I/O): <counters>`;
//! * `0xFC` exit with status `value` (0 = the guest's checks passed).
//!
//! Test guests report everything else as text on COM1.

use std::sync::{Arc, Mutex};

use crate::bus::BusDevice;
use crate::stats::{Snapshot, Stats};
use crate::{ExitSender, VmExit};

/// First port.
pub const BASE_PORT: u64 = 0xf0;
/// Ports claimed.
pub const LEN: u64 = 0x10;

/// One finished phase.
#[derive(Clone, Debug)]
pub struct Phase {
    /// The guest's phase number.
    pub id: u32,
    /// I/O commands the guest says it issued.
    pub ios: u32,
    /// Exits during the phase (the `end` write itself excluded).
    pub exits: Snapshot,
}

/// The device.
pub struct TestDev {
    stats: Arc<Stats>,
    exit: ExitSender,
    open: Mutex<Option<(u32, Snapshot)>>,
    /// Finished phases.
    pub phases: Mutex<Vec<Phase>>,
}

impl TestDev {
    /// A test device counting from `stats`.
    pub fn new(stats: Arc<Stats>, exit: ExitSender) -> Self {
        TestDev {
            stats,
            exit,
            open: Mutex::new(None),
            phases: Mutex::new(Vec::new()),
        }
    }
}

impl BusDevice for TestDev {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(b);
        match offset {
            0x0 => {
                // The begin write was counted before it reached us; it is not part of the phase.
                *self.open.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((value, self.stats.snapshot()));
            }
            0x4 => {
                let Some((id, start)) = self.open.lock().unwrap_or_else(|e| e.into_inner()).take()
                else {
                    log::warn!("testdev: end of a phase that never began");
                    return;
                };
                let mut exits = self.stats.snapshot().since(&start);
                // Do not count this very write.
                exits = exits.since(&one_pio_out(&exits, "testdev"));
                let per = if value > 0 {
                    exits.total() as f64 / f64::from(value)
                } else {
                    0.0
                };
                eprintln!(
                    "rhyve: phase {id}: {value} I/Os, {} userspace exits ({per:.2} per I/O): {}",
                    exits.total(),
                    exits.line()
                );
                self.phases
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Phase {
                        id,
                        ios: value,
                        exits,
                    });
            }
            0xc => {
                let _ = self.exit.send(VmExit::GuestExit(value));
            }
            _ => {}
        }
    }
}

/// A snapshot shaped like `like` holding exactly one PIO write to `bucket`.
fn one_pio_out(like: &Snapshot, bucket: &str) -> Snapshot {
    let mut s = Snapshot::default();
    s.buckets = like
        .buckets
        .iter()
        .map(|(n, _, _)| (n.clone(), 0, 0))
        .collect();
    s.set_kind(crate::stats::ExitKind::PioOut, 1);
    if let Some(b) = s.buckets.iter_mut().find(|b| b.0 == bucket) {
        b.2 = 1;
    }
    s
}
