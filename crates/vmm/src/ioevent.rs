//! ioeventfd doorbells: KVM absorbs registered writes and signals an eventfd; one thread turns the
//! signals into [`crate::device::VmmDevice::kick`] calls.
//!
//! Registrations are keyed by device index and resolved to absolute addresses by the PCI host
//! (BAR base + offset) whenever a BAR moves or the device's set changes; [`IoEvents::set`] diffs
//! the new set against the old and issues only the KVM_IOEVENTFD calls that differ.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::device::DataMatch;

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
    device: usize,
    what: Resolved,
    fd: EventFd,
}

#[derive(Default)]
struct State {
    regs: HashMap<u64, Reg>,
    next_key: u64,
}

/// Key reserved for the stop eventfd.
const STOP_KEY: u64 = u64::MAX;

/// All ioeventfd registrations of a VM.
pub struct IoEvents {
    vm: Arc<VmFd>,
    epoll: Epoll,
    state: Mutex<State>,
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
            state: Mutex::new(State::default()),
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

    /// Make `device`'s registrations exactly `wanted`. Failures are logged and leave that write on
    /// the (correct, slower) userspace path.
    pub fn set(&self, device: usize, wanted: &[Resolved]) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let stale: Vec<u64> = st
            .regs
            .iter()
            .filter(|(_, r)| r.device == device && !wanted.contains(&r.what))
            .map(|(&k, _)| k)
            .collect();
        for k in stale {
            let r = st.regs.remove(&k).expect("key just listed");
            if let Err(e) = self.kvm_unregister(&r.what, &r.fd) {
                log::warn!("unregistering ioeventfd at {:#x}: {e}", r.what.addr);
            }
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                r.fd.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        for w in wanted {
            if st.regs.values().any(|r| r.device == device && r.what == *w) {
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
            let key = st.next_key;
            st.next_key += 1;
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Add,
                fd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, key),
            ) {
                log::warn!("epoll add for ioeventfd at {:#x}: {e}", w.addr);
                let _ = self.kvm_unregister(w, &fd);
                continue;
            }
            st.regs.insert(
                key,
                Reg {
                    device,
                    what: *w,
                    fd,
                },
            );
        }
    }

    /// Registrations of `device` now in force.
    pub fn registered(&self, device: usize) -> Vec<Resolved> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<Resolved> = st
            .regs
            .values()
            .filter(|r| r.device == device)
            .map(|r| r.what)
            .collect();
        v.sort_by_key(|r| (r.addr, r.token));
        v
    }

    /// Serve kicks until [`IoEvents::stop`]: for each signalled registration call
    /// `kick(device, token)` (with no lock held, so `kick` may call [`IoEvents::set`]).
    pub fn run(&self, kick: impl Fn(usize, u32)) {
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
                let key = ev.data();
                if key == STOP_KEY {
                    return;
                }
                let hit = {
                    let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                    st.regs
                        .get(&key)
                        .and_then(|r| r.fd.read().ok().map(|_| (r.device, r.what.token)))
                };
                if let Some((device, token)) = hit {
                    kick(device, token);
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
