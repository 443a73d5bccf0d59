//! vCPUs: CPUID from KVM's supported set, the 64-bit or PVH boot state for the BSP, and the run loop
//! that dispatches port and MMIO exits to the buses.
//!
//! Application processors are left in KVM's wait-for-SIPI state (the in-kernel LAPIC starts them
//! when the guest sends INIT/SIPI). The run loop ends when the VM is stopping or when the guest
//! powers off, resets, triple-faults or hits a KVM internal error, each reported as a
//! [`crate::VmExit`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_run,
    kvm_segment, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
    KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::boot::{BootProtocol, EntryPoint, GDT, PML4};
use crate::bus::Bus;
use crate::layout::{BOOT_CS, BOOT_DS, BOOT_TSS, GDT_ADDR};
use crate::stats::{ExitKind, Stats};
use crate::{ExitSender, VmExit};

/// What a vCPU thread needs.
#[derive(Clone)]
pub struct VcpuEnv {
    /// MMIO space.
    pub mmio: Arc<Bus>,
    /// Port space.
    pub pio: Arc<Bus>,
    /// Exit counters.
    pub stats: Arc<Stats>,
    /// Where terminal events go.
    pub exit: ExitSender,
    /// Set when the VM is stopping.
    pub stop: Arc<AtomicBool>,
    /// Pausing: while set, vCPUs park between exits.
    pub pause: Arc<Pause>,
    /// The MSRs a snapshot saves (KVM's index list).
    pub msrs: Arc<Vec<u32>>,
    /// Buffered CONFIG_ADDRESS writes, carried out before any exit is handled.
    pub coalesced: Option<Arc<crate::coalesced::CoalescedPio>>,
}

/// vCPUs park at the top of their run loop while [`Pause::paused`] is set, and count
/// themselves, so the pauser knows when none runs guest code any more. Parked vCPUs also
/// answer requests for their state (snapshots are taken on each vCPU's own thread).
#[derive(Default)]
pub struct Pause {
    /// vCPUs must not enter the guest.
    pub paused: AtomicBool,
    parked: std::sync::Mutex<usize>,
    cv: std::sync::Condvar,
    /// Per vCPU: a request for its state, and the answer.
    capture: std::sync::Mutex<Vec<Capture>>,
}

/// A snapshot's request to one parked vCPU.
enum Capture {
    /// Waiting for the vCPU to save its state.
    Asked,
    /// Its state (or why it could not be read).
    Answered(Box<Result<VcpuState, String>>),
}

impl Pause {
    /// vCPUs parked right now.
    pub fn parked(&self) -> usize {
        *self.parked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Let parked vCPUs run again.
    pub fn resume(&self) {
        self.paused.store(false, Ordering::Release);
        let _g = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        self.cv.notify_all();
    }

    /// The state of every vCPU (all parked): each saves its own on its thread.
    pub fn capture(&self, vcpus: usize) -> Result<Vec<VcpuState>, String> {
        *self.capture.lock().unwrap_or_else(|e| e.into_inner()) =
            (0..vcpus).map(|_| Capture::Asked).collect();
        {
            let _g = self.parked.lock().unwrap_or_else(|e| e.into_inner());
            self.cv.notify_all();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            {
                let mut c = self.capture.lock().unwrap_or_else(|e| e.into_inner());
                if c.iter().all(|s| matches!(s, Capture::Answered(_))) {
                    return std::mem::take(&mut *c)
                        .into_iter()
                        .map(|s| match s {
                            Capture::Answered(r) => *r,
                            Capture::Asked => unreachable!("checked above"),
                        })
                        .collect();
                }
                if std::time::Instant::now() > deadline {
                    c.clear();
                    return Err("a vCPU did not report its state".into());
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Park here while paused (and not stopping), answering state requests.
    fn park_if_paused(&self, stop: &AtomicBool, vcpu: &mut VcpuFd, id: u8, msrs: &[u32]) {
        if !self.paused.load(Ordering::Acquire) {
            return;
        }
        // Finish the exit just handled (an IN's data goes into RAX) without entering the guest,
        // so the saved registers are complete.
        vcpu.set_kvm_immediate_exit(1);
        let _ = vcpu.run();
        vcpu.set_kvm_immediate_exit(0);
        let mut n = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        *n += 1;
        while self.paused.load(Ordering::Acquire) && !stop.load(Ordering::Acquire) {
            let asked = {
                let c = self.capture.lock().unwrap_or_else(|e| e.into_inner());
                matches!(c.get(usize::from(id)), Some(Capture::Asked))
            };
            if asked {
                let st = save(vcpu, id, msrs);
                let mut c = self.capture.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(slot) = c.get_mut(usize::from(id)) {
                    *slot = Capture::Answered(Box::new(st));
                }
                continue;
            }
            n = self
                .cv
                .wait_timeout(n, std::time::Duration::from_millis(5))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *n -= 1;
    }
}

/// The x87/SSE state when KVM has no XSAVE for this vCPU.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct FpuState {
    /// ST0-7 / MM0-7.
    pub fpr: Vec<Vec<u8>>,
    /// FCW.
    pub fcw: u16,
    /// FSW.
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    /// Last opcode.
    pub last_opcode: u16,
    /// Last instruction pointer.
    pub last_ip: u64,
    /// Last data pointer.
    pub last_dp: u64,
    /// XMM0-15.
    pub xmm: Vec<Vec<u8>>,
    /// MXCSR.
    pub mxcsr: u32,
}

impl FpuState {
    fn from_kvm(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr.iter().map(|r| r.to_vec()).collect(),
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm.iter().map(|r| r.to_vec()).collect(),
            mxcsr: f.mxcsr,
        }
    }

    fn to_kvm(&self) -> kvm_fpu {
        let mut f = kvm_fpu {
            fcw: self.fcw,
            fsw: self.fsw,
            ftwx: self.ftwx,
            last_opcode: self.last_opcode,
            last_ip: self.last_ip,
            last_dp: self.last_dp,
            mxcsr: self.mxcsr,
            ..Default::default()
        };
        for (d, s) in f.fpr.iter_mut().zip(&self.fpr) {
            let n = d.len().min(s.len());
            d[..n].copy_from_slice(&s[..n]);
        }
        for (d, s) in f.xmm.iter_mut().zip(&self.xmm) {
            let n = d.len().min(s.len());
            d[..n].copy_from_slice(&s[..n]);
        }
        f
    }
}

/// A vCPU's architectural state as KVM holds it (registers, LAPIC, MSRs, FPU, pending events).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct VcpuState {
    /// vCPU index.
    pub id: u8,
    /// Running, halted, waiting for SIPI…
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// XSAVE area, where KVM has one.
    pub xsave: Option<kvm_xsave>,
    /// x87/SSE otherwise.
    pub fpu: Option<FpuState>,
    /// XCR0.
    pub xcrs: Option<kvm_xcrs>,
    /// Local APIC registers (timer included).
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM lets us read.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
    /// Debug registers.
    pub debugregs: Option<kvm_debugregs>,
}

/// The MSRs `indices` names that KVM lets us read, in order. KVM reads MSRs in order and stops
/// at the first it refuses: that one is dropped and the rest read again.
fn read_msrs(
    vcpu: &VcpuFd,
    indices: impl Iterator<Item = u32>,
) -> Result<Vec<kvm_msr_entry>, String> {
    let mut list: Vec<kvm_msr_entry> = indices
        .map(|index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    loop {
        let mut m = Msrs::from_entries(&list).map_err(|err| format!("MSR list: {err:?}"))?;
        let n = vcpu
            .get_msrs(&mut m)
            .map_err(|err| format!("KVM_GET_MSRS: {err}"))?;
        if n >= list.len() {
            return Ok(m.as_slice().to_vec());
        }
        list.remove(n);
    }
}

/// Read vCPU `id`'s state (on its own thread, with no exit half handled).
pub fn save(vcpu: &VcpuFd, id: u8, msr_index: &[u32]) -> Result<VcpuState, String> {
    let e = |what: &'static str| move |err: kvm_ioctls::Error| format!("vCPU {id}: {what}: {err}");
    let xsave = vcpu.get_xsave().ok();
    let fpu = match xsave {
        Some(_) => None,
        None => Some(FpuState::from_kvm(
            &vcpu.get_fpu().map_err(e("KVM_GET_FPU"))?,
        )),
    };
    let msrs =
        read_msrs(vcpu, msr_index.iter().copied()).map_err(|err| format!("vCPU {id}: {err}"))?;
    let regs = vcpu.get_regs().map_err(e("KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(e("KVM_GET_SREGS"))?;
    log::debug!(
        "vCPU {id} saved at CPL {} RIP {:#x}: GS.base {:#x}, KERNEL_GS_BASE {:#x}",
        sregs.cs.selector & 3,
        regs.rip,
        sregs.gs.base,
        msrs.iter()
            .find(|m| m.index == MSR_KERNEL_GS_BASE)
            .map_or(0, |m| m.data)
    );
    Ok(VcpuState {
        id,
        mp_state: vcpu.get_mp_state().map_err(e("KVM_GET_MP_STATE"))?,
        regs,
        sregs,
        xsave,
        fpu,
        xcrs: vcpu.get_xcrs().ok(),
        lapic: vcpu.get_lapic().map_err(e("KVM_GET_LAPIC"))?,
        msrs,
        events: vcpu.get_vcpu_events().map_err(e("KVM_GET_VCPU_EVENTS"))?,
        debugregs: vcpu.get_debug_regs().ok(),
    })
}

/// Load saved state into a new vCPU whose CPUID is already set.
///
/// The order matters: segment and control registers first (EFER, CR4 and the APIC base decide
/// what later state means), then registers, FPU, the LAPIC (before the MSRs: KVM drops
/// IA32_TSC_DEADLINE unless the LVT timer is already in TSC-deadline mode, so a Linux guest would
/// lose the tick it had armed), the MSRs, and last the MP state and pending events. QEMU's
/// `kvm_arch_put_registers` uses the same order for the parts both have.
pub fn restore(vcpu: &VcpuFd, s: &VcpuState) -> Result<(), VcpuError> {
    let err = |what| {
        move |err| VcpuError {
            cpu: s.id,
            what,
            err,
        }
    };
    vcpu.set_sregs(&s.sregs).map_err(err("KVM_SET_SREGS"))?;
    vcpu.set_regs(&s.regs).map_err(err("KVM_SET_REGS"))?;
    if let Some(x) = &s.xsave {
        // SAFETY: `x` is a whole kvm_xsave (4 KiB) as KVM_GET_XSAVE returned it; KVM reads no
        // more than that from it.
        unsafe { vcpu.set_xsave(x) }.map_err(err("KVM_SET_XSAVE"))?;
    } else if let Some(f) = &s.fpu {
        vcpu.set_fpu(&f.to_kvm()).map_err(err("KVM_SET_FPU"))?;
    }
    if let Some(x) = &s.xcrs {
        vcpu.set_xcrs(x).map_err(err("KVM_SET_XCRS"))?;
    }
    vcpu.set_lapic(&s.lapic).map_err(err("KVM_SET_LAPIC"))?;
    // KVM applies MSRs in order and stops at the first it refuses (host-specific ones): skip that
    // one and go on with the rest.
    let mut list = s.msrs.clone();
    while !list.is_empty() {
        let m = Msrs::from_entries(&list).expect("MSR count within KVM's limit");
        let n = vcpu.set_msrs(&m).map_err(err("KVM_SET_MSRS"))?;
        if n >= list.len() {
            break;
        }
        log::warn!(
            "vCPU {}: MSR {:#x} = {:#x} refused on restore",
            s.id,
            list[n].index,
            list[n].data
        );
        list.drain(..=n);
    }
    if let Some(d) = &s.debugregs {
        vcpu.set_debug_regs(d).map_err(err("KVM_SET_DEBUGREGS"))?;
    }
    vcpu.set_mp_state(s.mp_state)
        .map_err(err("KVM_SET_MP_STATE"))?;
    vcpu.set_vcpu_events(&s.events)
        .map_err(err("KVM_SET_VCPU_EVENTS"))?;
    for (index, want, got) in restore_mismatches(vcpu, s) {
        log::warn!(
            "vCPU {}: MSR {index:#x} is {got:#x} after restore, saved {want:#x}",
            s.id
        );
    }
    Ok(())
}

/// MSRs whose value KVM reports differently from the saved one right after a restore, as
/// (index, saved, now). Counters that move on by themselves (the TSC, Hyper-V's reference time
/// counter and vCPU run time) are left out, and so are MSRs KVM no longer lets us read. On
/// AMD, KVM keeps only the low 32 bits of SYSENTER_ESP/EIP written by userspace (the source may
/// report all 64 that the guest wrote; only the SYSENTER instruction uses them, which long mode
/// does not allow on AMD), so those compare on their low half.
pub fn restore_mismatches(vcpu: &VcpuFd, s: &VcpuState) -> Vec<(u32, u64, u64)> {
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const HV_X64_MSR_VP_RUNTIME: u32 = 0x4000_0010;
    const HV_X64_MSR_TIME_REF_COUNT: u32 = 0x4000_0020;
    const COUNTERS: [u32; 3] = [
        MSR_IA32_TSC,
        HV_X64_MSR_VP_RUNTIME,
        HV_X64_MSR_TIME_REF_COUNT,
    ];
    let indices = s.msrs.iter().map(|m| m.index);
    let now = read_msrs(vcpu, indices.filter(|i| !COUNTERS.contains(i))).unwrap_or_default();
    now.iter()
        .filter_map(|m| {
            let want = s.msrs.iter().find(|w| w.index == m.index)?.data;
            let low_half = [MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP].contains(&m.index);
            let same = want == m.data || (low_half && want as u32 == m.data as u32);
            (!same).then_some((m.index, want, m.data))
        })
        .collect()
}

/// Errors configuring a vCPU.
#[derive(Debug, thiserror::Error)]
#[error("vCPU {cpu}: {what}: {err}")]
pub struct VcpuError {
    /// vCPU index.
    pub cpu: u8,
    /// The operation.
    pub what: &'static str,
    /// KVM's answer.
    pub err: kvm_ioctls::Error,
}

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 4;
const APIC_MODE_EXTINT: u32 = 7;

/// Fix up KVM's supported CPUID for vCPU `id` of `count`.
pub fn cpuid_for(base: &CpuId, id: u8, count: u8) -> CpuId {
    let mut c = base.clone();
    for e in c.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                e.ecx |= 1 << 31; // running on a hypervisor
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: the count field is valid
                }
            }
            0xb | 0x1f => e.edx = u32::from(id),
            _ => {}
        }
    }
    c
}

fn seg(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn lapic_reg(regs: &[std::os::raw::c_char; 1024], off: usize) -> u32 {
    u32::from_le_bytes(std::array::from_fn(|i| regs[off + i] as u8))
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char; 1024], off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        regs[off + i] = *b as std::os::raw::c_char;
    }
}

/// Program CPUID, MSRs and the LAPIC's LINT pins; for the boot CPU also the entry state of its
/// boot protocol.
pub fn configure(
    vcpu: &VcpuFd,
    id: u8,
    cpuid: &CpuId,
    entry: Option<EntryPoint>,
) -> Result<(), VcpuError> {
    let err = |what| move |err| VcpuError { cpu: id, what, err };
    vcpu.set_cpuid2(cpuid).map_err(err("KVM_SET_CPUID2"))?;
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_MISC_ENABLE,
        data: 1,
        ..Default::default()
    }])
    .expect("one MSR fits");
    vcpu.set_msrs(&msrs).map_err(err("KVM_SET_MSRS"))?;
    let mut lapic = vcpu.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
    let l0 = lapic_reg(&lapic.regs, APIC_LVT_LINT0);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT_LINT0,
        (l0 & !0x700) | (APIC_MODE_EXTINT << 8),
    );
    let l1 = lapic_reg(&lapic.regs, APIC_LVT_LINT1);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT_LINT1,
        (l1 & !0x700) | (APIC_MODE_NMI << 8),
    );
    vcpu.set_lapic(&lapic).map_err(err("KVM_SET_LAPIC"))?;
    let Some(entry) = entry else { return Ok(()) };

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(err("KVM_SET_FPU"))?;
    let mut s = vcpu.get_sregs().map_err(err("KVM_GET_SREGS"))?;
    let long = entry.protocol == BootProtocol::Linux64;
    s.cs = seg(BOOT_CS, 0xb, long);
    let data = seg(BOOT_DS, 0x3, false);
    (s.ds, s.es, s.fs, s.gs, s.ss) = (data, data, data, data, data);
    // A busy TSS (VMX requires a usable TR): 64-bit for long mode, 32-bit for PVH (same type
    // value, whose meaning depends on the mode).
    s.tr = kvm_segment {
        base: 0,
        limit: 0x67,
        selector: BOOT_TSS,
        type_: 0xb,
        present: 1,
        s: 0,
        g: 0,
        ..data
    };
    s.gdt.base = GDT_ADDR;
    s.gdt.limit = (GDT.len() * 8 - 1) as u16;
    s.idt.base = 0;
    s.idt.limit = 0;
    let regs = match entry.protocol {
        BootProtocol::Linux64 => {
            s.cr3 = PML4;
            s.cr4 = 1 << 5; // PAE
            s.cr0 = 0x8001_0033; // PG | WP | NE | ET | MP | PE
            s.efer = (1 << 8) | (1 << 10); // LME | LMA
            kvm_regs {
                rip: entry.rip,
                rsi: entry.rsi,
                rsp: entry.rsp,
                rbp: entry.rsp,
                rflags: 0x2,
                ..Default::default()
            }
        }
        BootProtocol::Pvh => {
            // PVH: CR0.PE only (every other writable bit clear), CR4 = 0, no paging or long
            // mode; EBX = hvm_start_info; every other register unspecified (zero here).
            s.cr3 = 0;
            s.cr4 = 0;
            s.cr0 = 1; // PE
            s.efer = 0;
            kvm_regs {
                rip: entry.rip,
                rbx: entry.rbx,
                rflags: 0x2,
                ..Default::default()
            }
        }
    };
    vcpu.set_sregs(&s).map_err(err("KVM_SET_SREGS"))?;
    vcpu.set_regs(&regs).map_err(err("KVM_SET_REGS"))?;
    Ok(())
}

/// The `io` member of `kvm_run` after a KVM_EXIT_IO: (element size, count, data).
fn io_exit(vcpu: &mut VcpuFd) -> (usize, usize, &mut [u8]) {
    let run: &mut kvm_run = vcpu.get_kvm_run();
    // SAFETY: called only right after KVM_RUN returned KVM_EXIT_IO, so `io` is the live union
    // member.
    let io = unsafe { run.__bindgen_anon_1.io };
    let (size, count) = (usize::from(io.size), io.count as usize);
    let base = run as *mut kvm_run as *mut u8;
    // SAFETY: for KVM_EXIT_IO the kernel places size*count data bytes at data_offset inside the
    // kvm_run mapping (which spans the whole vcpu mmap area); the slice lives as long as the
    // borrow of `vcpu`, so no second KVM_RUN can happen while it exists.
    let data =
        unsafe { std::slice::from_raw_parts_mut(base.add(io.data_offset as usize), size * count) };
    (size, count, data)
}

/// The suberror and data words of a KVM_EXIT_INTERNAL_ERROR.
fn internal_error(vcpu: &mut VcpuFd) -> String {
    let run: &mut kvm_run = vcpu.get_kvm_run();
    // SAFETY: called only right after KVM_RUN returned KVM_EXIT_INTERNAL_ERROR, so `internal`
    // is the live union member.
    let ie = unsafe { run.__bindgen_anon_1.internal };
    let n = (ie.ndata as usize).min(ie.data.len());
    let words: Vec<String> = ie.data[..n].iter().map(|w| format!("{w:#x}")).collect();
    let what = match ie.suberror {
        1 => "instruction emulation failed",
        2 => "simultaneous exceptions",
        3 => "delivery event via exit",
        4 => "unexpected exit reason",
        _ => "unknown",
    };
    format!(
        "suberror {} ({what}) data [{}]",
        ie.suberror,
        words.join(" ")
    )
}

enum Io {
    In(u16),
    Out(u16),
}

/// Run vCPU `id` until the VM stops or the guest ends it.
pub fn run(mut vcpu: VcpuFd, id: u8, env: VcpuEnv) {
    let send = |e: VmExit| {
        let _ = env.exit.send(e);
    };
    loop {
        env.pause
            .park_if_paused(&env.stop, &mut vcpu, id, &env.msrs);
        if env.stop.load(Ordering::Acquire) {
            return;
        }
        let ran = vcpu.run();
        // Writes KVM buffered come before whatever this exit is (a CONFIG_DATA access must
        // see its CONFIG_ADDRESS), and before a pause or snapshot reads device state.
        if let Some(c) = &env.coalesced {
            c.flush();
        }
        let io = match ran {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, _) => Some(Io::In(port)),
                VcpuExit::IoOut(port, _) => Some(Io::Out(port)),
                VcpuExit::MmioRead(addr, data) => {
                    let r = env.mmio.find(addr);
                    env.stats
                        .count(ExitKind::MmioRead, r.as_ref().map(|r| r.tag));
                    match r {
                        Some(r) => r.dev.read(addr - r.base, data),
                        None => data.fill(0xff),
                    }
                    None
                }
                VcpuExit::MmioWrite(addr, data) => {
                    let r = env.mmio.find(addr);
                    env.stats
                        .count(ExitKind::MmioWrite, r.as_ref().map(|r| r.tag));
                    if let Some(r) = r {
                        r.dev.write(addr - r.base, data);
                    }
                    None
                }
                VcpuExit::Shutdown => {
                    send(VmExit::TripleFault { cpu: id });
                    return;
                }
                VcpuExit::SystemEvent(kind, _) => {
                    send(match kind {
                        KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::PowerOff,
                        KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
                        KVM_SYSTEM_EVENT_CRASH => VmExit::InternalError {
                            cpu: id,
                            detail: "guest crash event".into(),
                        },
                        k => VmExit::InternalError {
                            cpu: id,
                            detail: format!("system event {k}"),
                        },
                    });
                    return;
                }
                VcpuExit::InternalError => {
                    let detail = internal_error(&mut vcpu);
                    send(VmExit::InternalError { cpu: id, detail });
                    return;
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    send(VmExit::InternalError {
                        cpu: id,
                        detail: format!(
                            "VM entry failed: hardware reason {reason:#x} on host CPU {cpu}"
                        ),
                    });
                    return;
                }
                VcpuExit::Intr | VcpuExit::Hlt | VcpuExit::IrqWindowOpen => {
                    env.stats.count(ExitKind::Other, None);
                    None
                }
                other => {
                    send(VmExit::InternalError {
                        cpu: id,
                        detail: format!("unexpected exit {other:?}"),
                    });
                    return;
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                env.stats.count(ExitKind::Other, None);
                None
            }
            Err(e) => {
                send(VmExit::Failed(format!("vCPU {id}: KVM_RUN: {e}")));
                return;
            }
        };
        if let Some(io) = io {
            let (size, count, data) = io_exit(&mut vcpu);
            let size = size.max(1);
            match io {
                Io::In(port) => {
                    let r = env.pio.find(u64::from(port));
                    env.stats.count(ExitKind::PioIn, r.as_ref().map(|r| r.tag));
                    for chunk in data.chunks_mut(size).take(count) {
                        match &r {
                            Some(r) => r.dev.read(u64::from(port) - r.base, chunk),
                            None => chunk.fill(0xff),
                        }
                    }
                }
                Io::Out(port) => {
                    let r = env.pio.find(u64::from(port));
                    env.stats.count(ExitKind::PioOut, r.as_ref().map(|r| r.tag));
                    if let Some(r) = r {
                        for chunk in data.chunks(size).take(count) {
                            r.dev.write(u64::from(port) - r.base, chunk);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn cpuid_topology_fields() {
        let base = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xffff_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                edx: 0,
                ..Default::default()
            },
        ])
        .unwrap();
        let c = cpuid_for(&base, 3, 4);
        let e = c.as_slice();
        assert_eq!(e[0].ebx, 0x0304_0800);
        assert_ne!(e[0].ecx & (1 << 31), 0);
        assert_ne!(e[0].edx & (1 << 28), 0);
        assert_eq!(e[1].edx, 3);
    }

    /// A vCPU of a fresh VM with the in-kernel irqchip and KVM's supported CPUID.
    fn kvm_vcpu(kvm: &kvm_ioctls::Kvm) -> (kvm_ioctls::VmFd, VcpuFd) {
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
        let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        let base = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .expect("KVM_GET_SUPPORTED_CPUID");
        vcpu.set_cpuid2(&cpuid_for(&base, 0, 1))
            .expect("KVM_SET_CPUID2");
        (vm, vcpu)
    }

    fn msr(vcpu: &VcpuFd, index: u32) -> u64 {
        let mut m = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(vcpu.get_msrs(&mut m).unwrap(), 1, "MSR {index:#x}");
        m.as_slice()[0].data
    }

    /// A vCPU stopped in user mode: its KERNEL_GS_BASE is the per-CPU base the next interrupt's
    /// `swapgs` loads, and its LAPIC timer is armed in TSC-deadline mode. All of it must come
    /// back in the new vCPU, and KVM must report every saved MSR as saved. (IA32_TSC_DEADLINE
    /// was once written before the LAPIC and silently dropped.)
    #[test]
    fn restore_brings_back_user_mode_msrs_and_an_armed_tsc_deadline() {
        const KERNEL_GS_BASE: u32 = MSR_KERNEL_GS_BASE;
        const LSTAR: u32 = 0xc000_0082;
        const SFMASK: u32 = 0xc000_0084;
        const LVTT: usize = 0x320;
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            println!("SKIPPED (no /dev/kvm): vCPU restore");
            return;
        };
        let index = kvm.get_msr_index_list().unwrap().as_slice().to_vec();
        let (_vm, a) = kvm_vcpu(&kvm);
        let mut sregs = a.get_sregs().unwrap();
        sregs.gs.base = 0x7f00_1234_0000; // the user's GS base
        a.set_sregs(&sregs).unwrap();
        let mut lapic = a.get_lapic().unwrap();
        let lvtt = (0x40u32 | (2 << 17)).to_le_bytes(); // vector 0x40, TSC-deadline mode
        for (i, b) in lvtt.iter().enumerate() {
            lapic.regs[LVTT + i] = *b as _;
        }
        a.set_lapic(&lapic).unwrap();
        let deadline = msr(&a, MSR_IA32_TSC) + (1 << 50);
        let entries = [
            (KERNEL_GS_BASE, 0xffff_8880_7fc0_0000),
            (LSTAR, 0xffff_ffff_8100_0040),
            (SFMASK, 0x47700),
            (0x6e0, deadline),
        ]
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        });
        assert_eq!(
            a.set_msrs(&Msrs::from_entries(&entries).unwrap()).unwrap(),
            4
        );
        let saved = save(&a, 0, &index).unwrap();

        let (_vm2, b) = kvm_vcpu(&kvm);
        restore(&b, &saved).unwrap();
        assert_eq!(restore_mismatches(&b, &saved), vec![]);
        assert_eq!(msr(&b, KERNEL_GS_BASE), 0xffff_8880_7fc0_0000);
        assert_eq!(msr(&b, LSTAR), 0xffff_ffff_8100_0040);
        assert_eq!(b.get_sregs().unwrap().gs.base, 0x7f00_1234_0000);
        assert_eq!(msr(&b, 0x6e0), deadline, "the armed TSC deadline");
    }
}
