//! COM1: a 16550A UART (vm-superio) at 0x3F8, IRQ 4, wired to stdio, a file, or nothing.
//!
//! Output goes to the chosen sink and is flushed at every newline; input (stdio only) is read by a
//! thread and queued into the receive FIFO, which raises the receive interrupt. The interrupt is an
//! irqfd on GSI 4, so raising it costs no ioctl.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// COM1 base port.
pub const COM1_PORT: u64 = 0x3f8;
/// COM1's ISA IRQ (= GSI).
pub const COM1_IRQ: u32 = 4;

/// Raises the UART's interrupt through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where the console goes.
pub enum ConsoleSink {
    /// The process's stdout (input from stdin).
    Stdio,
    /// A file (no input).
    File(std::fs::File),
    /// Discard.
    Null,
}

/// A writer that flushes at newlines and when its buffer fills.
pub struct LineOut {
    inner: Box<dyn Write + Send>,
    buf: Vec<u8>,
}

impl LineOut {
    /// Buffer in front of `inner`.
    pub fn new(inner: Box<dyn Write + Send>) -> Self {
        LineOut {
            inner,
            buf: Vec::with_capacity(256),
        }
    }
}

impl Write for LineOut {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if data.contains(&b'\n') || self.buf.len() >= 1024 {
            self.flush()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let r = self.inner.write_all(&self.buf);
        self.buf.clear();
        r.and_then(|_| self.inner.flush())
    }
}

/// A UART's state in a snapshot: DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR, SCR and the receive
/// FIFO.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct UartState {
    /// The registers, in the order above.
    pub regs: [u8; 9],
    /// Received bytes not yet read.
    pub in_buffer: Vec<u8>,
}

impl UartState {
    fn to_superio(&self) -> vm_superio::serial::SerialState {
        let r = self.regs;
        vm_superio::serial::SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: self.in_buffer.clone(),
        }
    }
}

/// The UART on the PIO bus.
pub struct SerialPort {
    uart: Mutex<Serial<IrqTrigger, vm_superio::serial::NoEvents, LineOut>>,
}

impl SerialPort {
    /// A UART writing to `sink`, interrupting through `irq`; with `state`, in the state a
    /// snapshot saved.
    pub fn new(
        sink: &ConsoleSink,
        irq: EventFd,
        state: Option<&UartState>,
    ) -> std::io::Result<Arc<Self>> {
        let out: Box<dyn Write + Send> = match sink {
            ConsoleSink::Stdio => Box::new(std::io::stdout()),
            ConsoleSink::File(f) => Box::new(f.try_clone()?),
            ConsoleSink::Null => Box::new(std::io::sink()),
        };
        let uart = match state {
            None => Serial::new(IrqTrigger(irq), LineOut::new(out)),
            Some(s) => Serial::from_state(
                &s.to_superio(),
                IrqTrigger(irq),
                vm_superio::serial::NoEvents,
                LineOut::new(out),
            )
            .map_err(|e| std::io::Error::other(format!("COM1 state: {e}")))?,
        };
        Ok(Arc::new(SerialPort {
            uart: Mutex::new(uart),
        }))
    }

    /// The UART's registers and receive FIFO, for a snapshot.
    pub fn save(&self) -> UartState {
        let s = self.uart.lock().unwrap_or_else(|e| e.into_inner()).state();
        UartState {
            regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }

    /// Feed stdin into the receive FIFO from a background thread (ends at EOF).
    pub fn spawn_stdin(self: &Arc<Self>) {
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("com1-stdin".into())
            .spawn(move || {
                let mut buf = [0u8; 64];
                let mut stdin = std::io::stdin();
                while let Ok(n) = stdin.read(&mut buf) {
                    if n == 0 {
                        return;
                    }
                    let mut rest = &buf[..n];
                    while !rest.is_empty() {
                        let done = me
                            .uart
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .enqueue_raw_bytes(rest)
                            .unwrap_or(0);
                        rest = &rest[done..];
                        if !rest.is_empty() {
                            std::thread::sleep(std::time::Duration::from_millis(5));
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            log::warn!("com1: no input thread: {e}");
        }
    }

    /// Flush buffered output.
    pub fn flush(&self) {
        let _ = self
            .uart
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .writer_mut()
            .flush();
    }
}

impl BusDevice for SerialPort {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let mut u = self.uart.lock().unwrap_or_else(|e| e.into_inner());
        for (i, b) in data.iter_mut().enumerate() {
            *b = u.read((offset as u8).wrapping_add(i as u8));
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let mut u = self.uart.lock().unwrap_or_else(|e| e.into_inner());
        for (i, &b) in data.iter().enumerate() {
            if let Err(e) = u.write((offset as u8).wrapping_add(i as u8), b) {
                log::debug!("com1: {e:?}");
            }
        }
    }
}
