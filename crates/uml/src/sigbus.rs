//! Surviving a UML peer that truncates its memory file while we have it mapped.
//!
//! Guest memory is UML's memory file, mapped shared. SET_MEM_TABLE is checked against the
//! file's size when it arrives ([`crate::shim`]), but the peer can shrink the file later; the
//! next access to a page past the new end raises SIGBUS, which would kill the process and every
//! other device it serves. A SIGBUS handler turns such a fault into a lost page instead: it
//! maps an anonymous zero page over the faulting page (the access then completes, reading zeros,
//! and writes go nowhere) and counts the fault for the device whose memory it was. The device
//! sees the count and stops serving that peer ([`crate::backend`]).
//!
//! A fault outside registered guest memory is none of ours: the previous disposition is put
//! back and the access retried, so it dies (or is handled) exactly as before.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, Once};

/// Guest memory ranges watched at once (UML sends one region per device).
const RANGES: usize = 256;
/// Devices watched at once.
const OWNERS: usize = 64;
/// Owner value of a range being written.
const BUSY: usize = usize::MAX;

struct Range {
    /// 0 = free, [`BUSY`] = being written, else owner index + 1.
    owner: AtomicUsize,
    start: AtomicUsize,
    len: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)] // only used to initialise the statics
const FREE: Range = Range {
    owner: AtomicUsize::new(0),
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
};
static TABLE: [Range; RANGES] = [FREE; RANGES];
#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);
/// Faults absorbed, per owner.
static FAULTS: [AtomicU64; OWNERS] = [ZERO; OWNERS];
/// Owner slots in use.
static OWNERS_USED: Mutex<[bool; OWNERS]> = Mutex::new([false; OWNERS]);
static PAGE: AtomicUsize = AtomicUsize::new(4096);
static INSTALL: Once = Once::new();
/// The disposition SIGBUS had before ours (restored for faults that are not ours): a leaked
/// `Box<libc::sigaction>`, or 0.
static PREVIOUS_RAW: AtomicUsize = AtomicUsize::new(0);

/// One device's watch over its guest memory.
#[derive(Debug)]
pub(crate) struct Watch {
    owner: usize,
}

impl Watch {
    /// Start watching for a device (installs the handler on first use). `None` when every
    /// owner slot is taken: that device then runs unprotected, as before.
    pub(crate) fn new() -> Option<Watch> {
        INSTALL.call_once(install);
        let mut used = OWNERS_USED.lock().unwrap_or_else(|e| e.into_inner());
        let owner = used.iter().position(|u| !u)?;
        used[owner] = true;
        FAULTS[owner].store(0, Ordering::Relaxed);
        Some(Watch { owner })
    }

    /// Watch exactly these host ranges (address, length) from now on. The new ranges are
    /// watched before the old ones are let go (the old mapping may still be in use).
    pub(crate) fn set_ranges(&self, ranges: &[(usize, usize)]) {
        let me = self.owner + 1;
        let old: Vec<usize> = (0..RANGES)
            .filter(|&i| TABLE[i].owner.load(Ordering::Acquire) == me)
            .collect();
        for &(start, len) in ranges {
            let claimed = TABLE.iter().find(|r| {
                r.owner
                    .compare_exchange(0, BUSY, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            });
            let Some(r) = claimed else {
                log::warn!("guest memory watch table full; {start:#x}+{len:#x} unprotected");
                continue;
            };
            r.start.store(start, Ordering::Relaxed);
            r.len.store(len, Ordering::Relaxed);
            r.owner.store(me, Ordering::Release);
        }
        for i in old {
            let _ = TABLE[i]
                .owner
                .compare_exchange(me, 0, Ordering::AcqRel, Ordering::Relaxed);
        }
    }

    /// Faults absorbed in this device's memory so far.
    pub(crate) fn faults(&self) -> u64 {
        FAULTS[self.owner].load(Ordering::Acquire)
    }

    fn clear(&self) {
        let me = self.owner + 1;
        for r in &TABLE {
            if r.owner.load(Ordering::Acquire) == me {
                r.owner.store(0, Ordering::Release);
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.clear();
        OWNERS_USED.lock().unwrap_or_else(|e| e.into_inner())[self.owner] = false;
    }
}

fn install() {
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page > 0 {
        PAGE.store(page as usize, Ordering::Relaxed);
    }
    // SAFETY: an all-zero sigaction is a valid value (empty mask, no flags, SIG_DFL).
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a null new action only reads the current one into `old`, which is writable.
    if unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) } == 0 {
        // Known before ours is in place, so a fault that is not ours never finds it missing.
        PREVIOUS_RAW.store(Box::into_raw(Box::new(old)) as usize, Ordering::Release);
    }
    // SAFETY: as above.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_sigbus as *const () as usize;
    act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    // SAFETY: `act` is a fully initialised sigaction whose handler is async-signal-safe (it
    // only reads atomics and calls mmap/sigaction).
    let rc = unsafe { libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut()) };
    if rc != 0 {
        log::warn!(
            "cannot install the SIGBUS handler ({}); a peer truncating its memory file would \
             kill rhyve",
            std::io::Error::last_os_error()
        );
    }
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler; si_addr is the
    // faulting address for a SIGBUS the kernel raised on an access.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    // Only an access beyond the end of a mapped file (BUS_ADRERR) is ours; a SIGBUS sent by
    // kill(2) or for a hardware error goes where it would have gone without us.
    let access = code == libc::BUS_ADRERR;
    let page = PAGE.load(Ordering::Relaxed);
    for r in TABLE.iter().filter(|_| access) {
        let owner = r.owner.load(Ordering::Acquire);
        if owner == 0 || owner == BUSY {
            continue;
        }
        let (start, len) = (
            r.start.load(Ordering::Relaxed),
            r.len.load(Ordering::Relaxed),
        );
        if addr < start || addr - start >= len || r.owner.load(Ordering::Acquire) != owner {
            continue; // not this range (or the slot changed hands meanwhile)
        }
        let base = addr & !(page - 1);
        // SAFETY: the page lies inside a guest-memory mapping this process made (it is
        // registered); replacing it with a private zero page changes what that memory holds,
        // never which addresses are mapped, so no Rust reference is invalidated. mmap is
        // async-signal-safe.
        let p = unsafe {
            libc::mmap(
                base as *mut libc::c_void,
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            if let Some(f) = FAULTS.get(owner - 1) {
                f.fetch_add(1, Ordering::AcqRel);
            }
            return; // the access is retried and now succeeds
        }
        break;
    }
    // Not ours (or the page could not be replaced): put the previous disposition back and
    // return; the access faults again and is handled as if we were never here.
    let prev = PREVIOUS_RAW.load(Ordering::Acquire) as *const libc::sigaction;
    // SAFETY: PREVIOUS_RAW is either null or a leaked, never-freed sigaction; sigaction is
    // async-signal-safe.
    unsafe {
        if prev.is_null() {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(sig, &dfl, std::ptr::null_mut());
        } else {
            libc::sigaction(sig, prev, std::ptr::null_mut());
        }
    }
}
