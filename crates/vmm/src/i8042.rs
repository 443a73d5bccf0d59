//! A minimal i8042 keyboard controller: enough for Linux to probe it and to reset the machine.
//!
//! The reset line is pulsed by command 0xFE (or a write of the output port with bit 0 clear);
//! either ends the VM with [`crate::VmExit::Reset`]. There is no keyboard behind it: keyboard
//! commands are acknowledged and nothing is ever typed.

use std::sync::Mutex;

use crate::bus::BusDevice;
use crate::{ExitSender, VmExit};

/// Data port.
pub const DATA_PORT: u64 = 0x60;
/// Status/command port.
pub const CMD_PORT: u64 = 0x64;

const STATUS_OBF: u8 = 0x01;
const STATUS_SYS: u8 = 0x04;
const STATUS_CMD: u8 = 0x08;
/// Keyboard not inhibited (the keylock switch is off); without it Linux says "Keylock active".
const STATUS_UNLOCKED: u8 = 0x10;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct State {
    ctr: u8,
    out: Option<u8>,
    queued: Option<u8>,
    pending: Option<u8>,
    last_cmd: bool,
}

/// The controller; register it for ports 0x60 and 0x64 (offset 0 of each).
pub struct I8042 {
    st: Mutex<State>,
    exit: ExitSender,
}

impl I8042 {
    /// A controller whose reset line ends the VM through `exit`.
    pub fn new(exit: ExitSender) -> Self {
        I8042 {
            st: Mutex::new(State {
                ctr: 0x45,
                out: None,
                queued: None,
                pending: None,
                last_cmd: false,
            }),
            exit,
        }
    }

    /// The controller's registers, for a snapshot.
    pub fn save(&self) -> serde_json::Value {
        let st = self.st.lock().unwrap_or_else(|e| e.into_inner());
        serde_json::to_value(&*st).unwrap_or_default()
    }

    /// Put back what [`I8042::save`] returned; a value that does not fit is an error.
    pub fn restore(&self, v: &serde_json::Value) -> Result<(), String> {
        let s: State = serde::Deserialize::deserialize(v).map_err(|e| format!("i8042: {e}"))?;
        *self.st.lock().unwrap_or_else(|e| e.into_inner()) = s;
        Ok(())
    }

    fn reset(&self) {
        let _ = self.exit.send(VmExit::Reset);
    }

    /// Read port 0x60 (`data`) or 0x64.
    pub fn read_port(&self, data_port: bool) -> u8 {
        let mut st = self.st.lock().unwrap_or_else(|e| e.into_inner());
        if data_port {
            let v = st.out.take().unwrap_or(0);
            st.out = st.queued.take();
            v
        } else {
            STATUS_SYS
                | STATUS_UNLOCKED
                | if st.out.is_some() { STATUS_OBF } else { 0 }
                | if st.last_cmd { STATUS_CMD } else { 0 }
        }
    }

    /// Write port 0x60 (`data`) or 0x64.
    pub fn write_port(&self, data_port: bool, v: u8) {
        let mut st = self.st.lock().unwrap_or_else(|e| e.into_inner());
        st.last_cmd = !data_port;
        if data_port {
            match st.pending.take() {
                Some(0x60) => st.ctr = v,
                Some(0xd1) if v & 1 == 0 => {
                    drop(st);
                    self.reset();
                }
                Some(0xd1) => {}
                // Commands to the (absent) mouse: no answer.
                Some(0xd4) => {}
                _ => {
                    // A keyboard command: acknowledge; "reset" also reports self-test passed.
                    st.out = Some(0xfa);
                    if v == 0xff {
                        st.queued = Some(0xaa);
                    }
                }
            }
            return;
        }
        match v {
            0x20 => st.out = Some(st.ctr),
            0x60 | 0xd1 | 0xd4 => st.pending = Some(v),
            0xa7 => st.ctr |= 0x20,
            0xa8 => st.ctr &= !0x20,
            0xa9 => st.out = Some(0xff), // no auxiliary port
            0xaa => st.out = Some(0x55),
            0xab => st.out = Some(0x00),
            0xad => st.ctr |= 0x10,
            0xae => st.ctr &= !0x10,
            0xd0 => st.out = Some(0x01),
            0xfe => {
                drop(st);
                self.reset();
            }
            _ => {}
        }
    }
}

/// One of the two ports on the PIO bus.
pub struct I8042Port {
    /// The controller.
    pub dev: std::sync::Arc<I8042>,
    /// True for 0x60.
    pub data_port: bool,
}

impl BusDevice for I8042Port {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = self.dev.read_port(self.data_port);
    }
    fn write(&self, _offset: u64, data: &[u8]) {
        self.dev.write_port(self.data_port, data[0]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_test_ctr_and_reset() {
        let (tx, rx) = std::sync::mpsc::channel();
        let k = I8042::new(tx);
        k.write_port(false, 0xaa);
        assert_eq!(k.read_port(false) & STATUS_OBF, STATUS_OBF);
        assert_eq!(k.read_port(true), 0x55);
        k.write_port(false, 0x60);
        k.write_port(true, 0x61);
        k.write_port(false, 0x20);
        assert_eq!(k.read_port(true), 0x61);
        k.write_port(true, 0xff);
        assert_eq!((k.read_port(true), k.read_port(true)), (0xfa, 0xaa));
        assert!(rx.try_recv().is_err());
        k.write_port(false, 0xfe);
        assert!(matches!(rx.try_recv(), Ok(VmExit::Reset)));
    }
}
