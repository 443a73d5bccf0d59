//! ioeventfd doorbells: KVM absorbs registered writes and signals an eventfd; the VMM turns the
//! signals into [`pci::PciDevice::kick`] calls for the registrations devices list in
//! [`pci::PciDevice::ioevents`].
//!
//! Registrations are grouped per device, each group with its own epoll set, and resolved to
//! absolute addresses by the PCI host (BAR base + offset) whenever a BAR moves or the device's
//! set changes; [`IoEvents::set`] diffs the new set against the old and issues only the
//! KVM_IOEVENTFD calls that differ.
//!
//! Ordering: an absorbed write is a posted write. Before the VMM lets a device see any later
//! synchronous access (an MMIO or config exit), it drains that device's signalled eventfds under
//! the device's lock ([`IoEvents::drain`]), and the I/O-event thread drains under the same lock, so
//! a device never sees a register access that the guest issued after a doorbell before that
//! doorbell — the PCI rule that a read pushes earlier posted writes. The cost is one non-blocking
//! `epoll_wait` per exit, only for devices that have registrations.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use pci::DataMatch;

/// A registration at an absolute address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Resolved {
    /// Port I/O (true) or MMIO.
    pub pio: bool,
    /// Guest address or port.
    pub addr: u64,
    /// Value filter.
    pub datamatch: Option<DataMatch>,
    /// Device's token.
    pub token: u32,
}

struct Reg {
    what: Resolved,
    fd: EventFd,
}

/// One device's registrations and the epoll set that watches them.
struct DevEvents {
    epoll: Epoll,
    regs: Mutex<HashMap<u64, Reg>>,
}

/// Key reserved for the stop eventfd.
const STOP_KEY: u64 = u64::MAX;

/// All ioeventfd registrations of a VM.
pub struct IoEvents {
    vm: Arc<VmFd>,
    epoll: Epoll,
    devices: Mutex<HashMap<usize, Arc<DevEvents>>>,
    next_key: Mutex<u64>,
    stop: EventFd,
    stopping: AtomicBool,
}

fn addr_of(r: &Resolved) -> IoEventAddress {
    if r.pio {
        IoEventAddress::Pio(r.addr)
    } else {
        IoEventAddress::Mmio(r.addr)
    }
}

impl IoEvents {
    /// A registry with no registrations.
    pub fn new(vm: Arc<VmFd>) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_KEY),
        )?;
        Ok(IoEvents {
            vm,
            epoll,
            devices: Mutex::new(HashMap::new()),
            next_key: Mutex::new(0),
            stop,
            stopping: AtomicBool::new(false),
        })
    }

    fn kvm_register(&self, r: &Resolved, fd: &EventFd) -> Result<(), kvm_ioctls::Error> {
        let a = addr_of(r);
        match r.datamatch {
            None => self.vm.register_ioevent(fd, &a, NoDatamatch),
            Some(DataMatch::U8(v)) => self.vm.register_ioevent(fd, &a, v),
            Some(DataMatch::U16(v)) => self.vm.register_ioevent(fd, &a, v),
            Some(DataMatch::U32(v)) => self.vm.register_ioevent(fd, &a, v),
            Some(DataMatch::U64(v)) => self.vm.register_ioevent(fd, &a, v),
        }
    }

    fn kvm_unregister(&self, r: &Resolved, fd: &EventFd) -> Result<(), kvm_ioctls::Error> {
        let a = addr_of(r);
        match r.datamatch {
            None => self.vm.unregister_ioevent(fd, &a, NoDatamatch),
            Some(DataMatch::U8(v)) => self.vm.unregister_ioevent(fd, &a, v),
            Some(DataMatch::U16(v)) => self.vm.unregister_ioevent(fd, &a, v),
            Some(DataMatch::U32(v)) => self.vm.unregister_ioevent(fd, &a, v),
            Some(DataMatch::U64(v)) => self.vm.unregister_ioevent(fd, &a, v),
        }
    }

    fn device(&self, device: usize) -> Option<Arc<DevEvents>> {
        self.devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&device)
            .cloned()
    }

    fn device_or_new(&self, device: usize) -> std::io::Result<Arc<DevEvents>> {
        let mut devs = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = devs.get(&device) {
            return Ok(d.clone());
        }
        let d = Arc::new(DevEvents {
            epoll: Epoll::new()?,
            regs: Mutex::new(HashMap::new()),
        });
        self.epoll.ctl(
            ControlOperation::Add,
            d.epoll.as_raw_fd(),
            EpollEvent::new(EventSet::IN, device as u64),
        )?;
        devs.insert(device, d.clone());
        Ok(d)
    }

    /// Make `device`'s registrations exactly `wanted`. Failures are logged and leave that write on
    /// the (correct, slower) userspace path.
    pub fn set(&self, device: usize, wanted: &[Resolved]) {
        let dev = match (wanted.is_empty(), self.device(device)) {
            (true, None) => return,
            (_, Some(d)) => d,
            (false, None) => match self.device_or_new(device) {
                Ok(d) => d,
                Err(e) => {
                    log::warn!("ioeventfd epoll for device {device}: {e}");
                    return;
                }
            },
        };
        let mut regs = dev.regs.lock().unwrap_or_else(|e| e.into_inner());
        let stale: Vec<u64> = regs
            .iter()
            .filter(|(_, r)| !wanted.contains(&r.what))
            .map(|(&k, _)| k)
            .collect();
        for k in stale {
            let r = regs.remove(&k).expect("key just listed");
            if let Err(e) = self.kvm_unregister(&r.what, &r.fd) {
                log::warn!("unregistering ioeventfd at {:#x}: {e}", r.what.addr);
            }
            let _ = dev.epoll.ctl(
                ControlOperation::Delete,
                r.fd.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        for w in wanted {
            if regs.values().any(|r| r.what == *w) {
                continue;
            }
            let fd = match EventFd::new(libc::EFD_NONBLOCK) {
                Ok(fd) => fd,
                Err(e) => {
                    log::warn!("eventfd for ioeventfd at {:#x}: {e}", w.addr);
                    continue;
                }
            };
            if let Err(e) = self.kvm_register(w, &fd) {
                log::warn!(
                    "KVM_IOEVENTFD at {:#x}: {e}; that write stays a userspace exit",
                    w.addr
                );
                continue;
            }
            let key = {
                let mut k = self.next_key.lock().unwrap_or_else(|e| e.into_inner());
                *k += 1;
                *k
            };
            if let Err(e) = dev.epoll.ctl(
                ControlOperation::Add,
                fd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, key),
            ) {
                log::warn!("epoll add for ioeventfd at {:#x}: {e}", w.addr);
                let _ = self.kvm_unregister(w, &fd);
                continue;
            }
            regs.insert(key, Reg { what: *w, fd });
        }
    }

    /// Registrations of `device` now in force.
    pub fn registered(&self, device: usize) -> Vec<Resolved> {
        let Some(dev) = self.device(device) else {
            return Vec::new();
        };
        let regs = dev.regs.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<Resolved> = regs.values().map(|r| r.what).collect();
        v.sort_by_key(|r| (r.addr, r.token));
        v
    }

    /// Deliver every absorbed write of `device` that is waiting: `kick(token)` once per signalled
    /// registration. Call it with the device locked (see the module docs).
    pub fn drain(&self, device: usize, mut kick: impl FnMut(u32)) {
        let Some(dev) = self.device(device) else {
            return;
        };
        let mut events = [EpollEvent::default(); 32];
        loop {
            let n = match dev.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("ioeventfd epoll of device {device}: {e}");
                    return;
                }
            };
            if n == 0 {
                return;
            }
            let tokens: Vec<u32> = {
                let regs = dev.regs.lock().unwrap_or_else(|e| e.into_inner());
                events[..n]
                    .iter()
                    .filter_map(|ev| regs.get(&ev.data()))
                    .filter(|r| r.fd.read().is_ok())
                    .map(|r| r.what.token)
                    .collect()
            };
            tokens.into_iter().for_each(&mut kick);
        }
    }

    /// Serve until [`IoEvents::stop`]: whenever a device has signalled registrations, call
    /// `ready(device)`, which should lock the device and [`IoEvents::drain`] it.
    pub fn run(&self, ready: impl Fn(usize)) {
        let mut events = vec![EpollEvent::default(); 64];
        while !self.stopping.load(Ordering::Acquire) {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("ioeventfd epoll: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    STOP_KEY => return,
                    device => ready(device as usize),
                }
            }
        }
    }

    /// Make [`IoEvents::run`] return.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        let _ = self.stop.write(1);
    }
}
