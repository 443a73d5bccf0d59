//! rhyve's User-Mode Linux frontend: a vhost-user "virtio-pcidev" back-end that exposes one
//! [`pci::PciDevice`] to UML's `virt-pci` driver (see shared/notes/uml-virtio-pcidev.md).
//!
//! UML is the vhost-user front-end and connects to one socket per device
//! (`virtio_uml.device=<socket>:1234`). Config and BAR accesses arrive as messages on vq 0;
//! MSIs leave as messages on vq 1. Guest memory arrives with SET_MEM_TABLE after the device
//! exists, so the device gets a [`GuestMem`] handle up front that the vhost-user layer fills.
//!
//! ```no_run
//! # fn make_device(ctx: pci::DeviceContext) -> std::sync::Arc<dyn pci::PciDevice> { unimplemented!() }
//! let ctx = uml::UmlContext::new();
//! let device = make_device(ctx.device_context());
//! let listener = std::os::unix::net::UnixListener::bind("/tmp/nvme.sock").unwrap();
//! let server =
//!     uml::UmlDevice::new(listener, device.clone(), ctx.mem.clone(), ctx.irq.clone()).unwrap();
//! let stop = server.stop_handle(); // e.g. for a SIGTERM-waiting thread
//! server.run().unwrap(); // returns when UML disconnects or stop.stop() is called
//! device.shutdown();
//! ```

#![deny(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod backend;
mod irq;
pub mod msg;
mod shim;
mod sigbus;

pub use backend::Counters;
pub use irq::UmlInterrupts;
pub use shim::check_mem_table_body;

use backend::UmlBackend;
use log::{debug, info};
use pci::{DeviceContext, GuestMem, PciDevice};
use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use vhost::vhost_user::Error as VhostUserError;
use vhost_user_backend::{
    Error as DaemonError, ShutdownHandle, VhostUserDaemon, VringEpollHandler,
};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempdir::TempDir;

/// Errors that end [`UmlDevice::run`] other than UML disconnecting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Waiting for or accepting UML's connection failed.
    #[error("accepting the UML connection: {0}")]
    Accept(#[source] io::Error),
    /// Local setup failed (stop eventfd, the internal relay socket, threads).
    #[error("setting up the UML server: {0}")]
    Setup(#[source] io::Error),
    /// The rust-vmm vhost-user daemon failed (bad message, failed setup step).
    #[error("vhost-user: {0}")]
    VhostUser(DaemonError),
}

/// Result of this crate's fallible calls.
pub type Result<T> = std::result::Result<T, Error>;

/// What a device needs before UML connects: guest memory that SET_MEM_TABLE will fill in, and the
/// interrupt sink. Build the device from [`UmlContext::device_context`], then hand `mem` and `irq`
/// to [`UmlDevice::new`].
#[derive(Clone)]
pub struct UmlContext {
    /// Empty until UML sends its memory table; addresses are UML physical addresses.
    pub mem: GuestMem,
    /// Sends OP_MSI messages on the irq virtqueue.
    pub irq: Arc<UmlInterrupts>,
}

impl UmlContext {
    /// Fresh, empty guest memory and an interrupt sink bound to it.
    pub fn new() -> Self {
        let mem = GuestMem::new(GuestMemoryMmap::new());
        let irq = UmlInterrupts::new(&mem);
        UmlContext { mem, irq }
    }

    /// The `DeviceContext` for the device constructor (UML cannot deliver INTx).
    pub fn device_context(&self) -> DeviceContext {
        DeviceContext {
            mem: self.mem.clone(),
            irq: self.irq.clone(),
            intx_supported: false,
        }
    }
}

impl Default for UmlContext {
    fn default() -> Self {
        Self::new()
    }
}

struct StopInner {
    stopped: AtomicBool,
    wake: EventFd,
    conn: Mutex<Option<(UnixStream, Option<ShutdownHandle>)>>,
}

/// Ends a running [`UmlDevice::run`] from another thread. Call it from an ordinary thread (one
/// that waits for SIGTERM, say), not from inside an async signal handler: it takes a lock.
#[derive(Clone)]
pub struct StopHandle {
    inner: Arc<StopInner>,
}

impl StopHandle {
    fn new() -> io::Result<Self> {
        Ok(StopHandle {
            inner: Arc::new(StopInner {
                stopped: AtomicBool::new(false),
                wake: EventFd::new(EFD_NONBLOCK)?,
                conn: Mutex::new(None),
            }),
        })
    }

    /// Stop serving: stops waiting for UML, or closes UML's connection (UML then marks the
    /// device broken). `run` returns `Ok(())`. Idempotent.
    pub fn stop(&self) {
        self.inner.stopped.store(true, Ordering::SeqCst);
        let _ = self.inner.wake.write(1);
        if let Some((sock, daemon)) = &*self.lock() {
            let _ = sock.shutdown(Shutdown::Both);
            if let Some(d) = daemon {
                d.shutdown();
            }
        }
    }

    /// Whether [`StopHandle::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        self.inner.stopped.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(UnixStream, Option<ShutdownHandle>)>> {
        self.inner.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Register the live connection; the flag is checked under the lock so a stop() racing with
    /// connection setup is never lost.
    fn arm(&self, sock: UnixStream, daemon: Option<ShutdownHandle>) {
        let mut g = self.lock();
        if self.is_stopped() {
            let _ = sock.shutdown(Shutdown::Both);
            if let Some(d) = &daemon {
                d.shutdown();
            }
        }
        *g = Some((sock, daemon));
    }

    fn disarm(&self) {
        if let Some((sock, _)) = self.lock().take() {
            let _ = sock.shutdown(Shutdown::Both);
        }
    }
}

/// One PCI device served to one UML connection.
pub struct UmlDevice {
    listener: UnixListener,
    device: Arc<dyn PciDevice>,
    mem: GuestMem,
    irq: Arc<UmlInterrupts>,
    stop: StopHandle,
    counters: Arc<Counters>,
}

impl UmlDevice {
    /// `listener` must already be bound: UML connects once at boot and never retries. `mem` and
    /// `irq` must be the ones the device was built with (see [`UmlContext`]).
    pub fn new(
        listener: UnixListener,
        device: Arc<dyn PciDevice>,
        mem: GuestMem,
        irq: Arc<UmlInterrupts>,
    ) -> Result<Self> {
        Ok(UmlDevice {
            listener,
            device,
            mem,
            irq,
            stop: StopHandle::new().map_err(Error::Setup)?,
            counters: Arc::default(),
        })
    }

    /// Access counters (config/MMIO reads and writes), live while serving and after.
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// A handle that makes [`UmlDevice::run`] return.
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Accept one UML connection and serve it until UML disconnects (`Ok`) or the stop handle
    /// fires (`Ok`). UML never reconnects, so this serves exactly one connection. It does not call
    /// `PciDevice::shutdown`; the caller does, once every device is done.
    pub fn run(self) -> Result<()> {
        let Some(uml) = self.accept().map_err(Error::Accept)? else {
            return Ok(());
        };
        let name = self.device.name().to_string();
        info!("{name}: UML connected");

        let backend = Arc::new(UmlBackend::new(
            self.device.clone(),
            self.mem.clone(),
            self.irq.clone(),
            self.counters.clone(),
        ));
        let mut daemon = VhostUserDaemon::new(format!("uml-{name}"), backend.clone(), self.mem)
            .map_err(Error::VhostUser)?;
        // The daemon spawned its vring worker; make sure it exits on every path out of here.
        let _workers = ExitWorkers(daemon.get_epoll_handlers());

        // The daemon only accepts on a listener, so give it a private one and relay UML's
        // connection into it (the relay also fixes UML quirks, see shim.rs).
        let dir = TempDir::new_with_prefix(std::env::temp_dir().join("rhyve-uml-"))
            .map_err(|e| Error::Setup(e.into()))?;
        let path = dir.as_path().join("vu.sock");
        let mut listener =
            vhost::vhost_user::Listener::new(&path, true).map_err(|e| Error::Setup(to_io(e)))?;
        let inner = UnixStream::connect(&path).map_err(Error::Setup)?;
        daemon.start(&mut listener).map_err(Error::VhostUser)?;
        drop(listener);
        drop(dir);

        let relays =
            shim::spawn(uml.try_clone().map_err(Error::Setup)?, inner).map_err(Error::Setup)?;
        self.stop.arm(uml, daemon.shutdown_handle());

        let result = daemon.wait();
        self.stop.disarm();
        for r in relays {
            let _ = r.join();
        }
        self.irq.detach();

        let c = &backend.counters;
        info!(
            "{name}: UML disconnected after {} commands ({} malformed)",
            c.commands.load(Ordering::Relaxed),
            c.malformed.load(Ordering::Relaxed)
        );
        match result {
            Ok(()) => Ok(()),
            Err(DaemonError::HandleRequest(
                VhostUserError::Disconnected
                | VhostUserError::PartialMessage
                | VhostUserError::SocketBroken(_),
            )) => Ok(()),
            Err(_) if self.stop.is_stopped() => Ok(()),
            Err(e) => Err(Error::VhostUser(e)),
        }
    }

    /// Wait for UML's connection, or for a stop; `None` when stopped.
    fn accept(&self) -> io::Result<Option<UnixStream>> {
        const LISTENER: u64 = 0;
        const STOP: u64 = 1;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            self.listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            self.stop.inner.wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP),
        )?;
        self.listener.set_nonblocking(true)?;
        let mut events = [EpollEvent::default(); 2];
        loop {
            if self.stop.is_stopped() {
                return Ok(None);
            }
            match epoll.wait(-1, &mut events) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
                Ok(_) => {}
            }
            match self.listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false)?;
                    debug!("accepted vhost-user connection");
                    return Ok(Some(s));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Tells the vring worker threads to exit when dropped.
struct ExitWorkers(Vec<Arc<VringEpollHandler<Arc<UmlBackend>>>>);

impl Drop for ExitWorkers {
    fn drop(&mut self) {
        for h in &self.0 {
            h.send_exit_event();
        }
    }
}

fn to_io(e: VhostUserError) -> io::Error {
    io::Error::other(e.to_string())
}

/// Serve `device` to one UML connection on `listener`; returns `Ok` when UML disconnects.
/// Shorthand for [`UmlDevice::new`] + [`UmlDevice::run`] when nobody needs to stop it early.
pub fn serve(
    listener: UnixListener,
    device: Arc<dyn PciDevice>,
    mem: GuestMem,
    irq: Arc<UmlInterrupts>,
) -> Result<()> {
    UmlDevice::new(listener, device, mem, irq)?.run()
}
