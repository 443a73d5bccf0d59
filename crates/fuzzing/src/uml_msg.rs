//! virt-pci messages as UML sends them on the cmd virtqueue (header + data, any sizes), decoded
//! and run against a device that records what reaches it; plus vhost-user SET_MEM_TABLE bodies
//! through the relay's checks.
//!
//! Invariants: a reply never exceeds the room UML gave; every access that reaches the device
//! lies inside config space or inside one of its BARs (anything else is a master abort the
//! frontend answers itself); reads the device never saw come back all-ones; nothing is slow.

use std::sync::Mutex;

use arbitrary::Arbitrary;
use pci::{BarInfo, BarKind, PciDevice};
use uml::msg;

/// BAR sizes of the recording device (BARs 1 and 3 absent).
const BARS: [u64; 6] = [0x4000, 0, 0x1000, 0, 0x20, 0x2000];

/// One message.
#[derive(Arbitrary, Debug)]
pub struct Message {
    /// Raw message bytes (header + data).
    bytes: Vec<u8>,
    /// Device-writable room UML posted.
    room: u16,
}

/// A whole input.
#[derive(Arbitrary, Debug)]
pub struct Input {
    msgs: Vec<Message>,
    /// SET_MEM_TABLE bodies, with the size of the file behind them.
    tables: Vec<(Vec<u8>, Option<u64>)>,
}

/// Run one input from raw fuzzer bytes.
pub fn run(data: &[u8]) {
    crate::run_with(data, run_input);
}

/// Records accesses and checks their bounds.
#[derive(Default)]
struct Probe {
    reads: Mutex<u64>,
}

impl PciDevice for Probe {
    fn name(&self) -> &str {
        "probe"
    }
    fn config_read(&self, offset: u16, data: &mut [u8]) {
        assert!(
            usize::from(offset) + data.len() <= 4096 && matches!(data.len(), 1 | 2 | 4 | 8),
            "config read of {} at {offset:#x}",
            data.len()
        );
        *self.reads.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        data.fill(0x5a);
    }
    fn config_write(&self, offset: u16, data: &[u8]) {
        assert!(
            usize::from(offset) + data.len() <= 4096 && matches!(data.len(), 1 | 2 | 4 | 8),
            "config write of {} at {offset:#x}",
            data.len()
        );
    }
    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) {
        check_bar(bar, offset, data.len());
        data.fill(0x5a);
    }
    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) {
        check_bar(bar, offset, data.len());
    }
    fn bars(&self) -> Vec<BarInfo> {
        BARS.iter()
            .enumerate()
            .filter(|(_, &s)| s != 0)
            .map(|(i, &size)| BarInfo {
                index: i as u8,
                size,
                kind: BarKind::Mem32 {
                    prefetchable: false,
                },
            })
            .collect()
    }
}

fn check_bar(bar: u8, offset: u64, len: usize) {
    let size = BARS.get(usize::from(bar)).copied().unwrap_or(0);
    assert!(
        size != 0
            && offset
                .checked_add(len as u64)
                .is_some_and(|end| end <= size),
        "BAR {bar} access of {len} at {offset:#x} reached the device (BAR size {size:#x})"
    );
}

/// Run one structured input.
pub fn run_input(input: &Input) {
    let dev = Probe::default();
    let mut reply = Vec::new();
    for m in input.msgs.iter().take(64) {
        let room = usize::from(m.room);
        let Ok(cmd) = crate::timed("decode", || msg::decode(&m.bytes, room)) else {
            continue;
        };
        crate::timed("execute", || msg::execute(&dev, &BARS, &cmd, &mut reply));
        assert!(
            reply.len() <= room,
            "a {}-byte reply for {room} bytes of room ({cmd:?})",
            reply.len()
        );
        if let msg::Command::BarRead { bar, offset, len } = cmd {
            let inside = BARS
                .get(usize::from(bar))
                .is_some_and(|&s| pci::bar_access_ok(offset, len, s));
            if !inside {
                assert!(
                    reply.iter().all(|&b| b == 0xff),
                    "a master-aborted read returned data"
                );
            }
        }
    }
    for (body, file_len) in input.tables.iter().take(16) {
        let _ = crate::timed("mem table", || uml::check_mem_table_body(body, *file_len));
    }
}
