//! rhyve's KVM frontend: a virtual machine that gives a guest rhyve's PCI device models.
//!
//! [`Vm::new`] builds the machine from a [`VmConfig`]: guest RAM from a memfd split around the
//! 32-bit PCI hole ([`memory`]), the in-kernel IOAPIC/LAPIC/PIT, the PCI host bridge with the
//! configured devices ([`pci_host`]), COM1 ([`serial`]), an i8042 for reset ([`i8042`]), the RTC
//! ([`cmos`]), ACPI tables ([`acpi`]) and the kernel ([`boot`]; PVH kernels through [`pvh`], both
//! on [`layout`]). [`Vm::run`] runs the vCPUs ([`vcpu`]) and the doorbell thread ([`ioevent`])
//! until the guest powers off, resets, faults or the VMM is told to stop, then flushes the devices
//! and returns what happened with the counters ([`stats`]). Interrupts go through [`irq`]. Only
//! [`memory`] and [`vcpu`] hold `unsafe` code.

#![warn(missing_docs)]
#![deny(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod acpi;
pub mod boot;
pub mod bus;
pub mod cmos;
#[allow(unsafe_code)] // borrowing the vCPU fd to map the coalesced ring
pub mod coalesced;
pub mod i8042;
pub mod ioevent;
pub mod irq;
pub mod layout;
#[allow(unsafe_code)] // KVM memory slots and the memfd
pub mod memory;
pub mod migration;
pub mod pci_host;
pub mod pvh;
pub mod serial;
pub mod snapshot;
pub mod stats;
pub mod testdev;
#[allow(unsafe_code)] // kvm_run union members of I/O and internal-error exits
pub mod vcpu;

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use pci::{ConfigError, DeviceContext, DeviceRegistry, GuestMem, SlotSpec};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::Bus;
use crate::ioevent::IoEvents;
use crate::irq::{DeviceIrq, IrqRouter};
use crate::pci_host::{ConfigAddress, ConfigData, Ecam, HostBridge, HostEnv, PciHost};
use crate::serial::{ConsoleSink, SerialPort};
use crate::stats::{Snapshot, Stats};
use crate::testdev::{Phase, TestDev};
use crate::vcpu::VcpuEnv;

/// Why the VM ended. Each has its own process exit code ([`VmExit::code`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off (ACPI S5 or a KVM shutdown event).
    PowerOff,
    /// The guest asked for a reset (i8042, 0xCF9, ACPI reset register).
    Reset,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault {
        /// The vCPU.
        cpu: u8,
    },
    /// KVM could not run the guest (internal error, failed entry, crash event).
    InternalError {
        /// The vCPU.
        cpu: u8,
        /// KVM's details.
        detail: String,
    },
    /// The test device's exit port (`--testdev`) with the guest's status.
    GuestExit(u32),
    /// The VMM got SIGINT/SIGTERM.
    Signal(i32),
    /// Stopped through the API socket (`rhyve ctl shutdown`).
    Stopped,
    /// The guest now runs in another rhyve (live migration); what it took.
    Migrated(String),
    /// The VMM itself failed.
    Failed(String),
}

impl VmExit {
    /// Process exit code: 0 powered off / test passed, 1 test guest reported failure, 3 reset,
    /// 4 triple fault, 5 KVM internal error, 6 VMM failure, 128+n for signal n. (2 is rhyve's
    /// code for configuration errors, before any guest runs.)
    pub fn code(&self) -> u8 {
        match self {
            VmExit::PowerOff | VmExit::GuestExit(0) | VmExit::Stopped | VmExit::Migrated(_) => 0,
            VmExit::GuestExit(_) => 1,
            VmExit::Reset => 3,
            VmExit::TripleFault { .. } => 4,
            VmExit::InternalError { .. } => 5,
            VmExit::Failed(_) => 6,
            VmExit::Signal(n) => 128u8.saturating_add(*n as u8),
        }
    }

    /// One line for the user.
    pub fn describe(&self) -> String {
        match self {
            VmExit::PowerOff => "guest powered off".into(),
            VmExit::Stopped => {
                "stopped through the API socket (devices flushed; the guest was not asked)".into()
            }
            VmExit::Migrated(how) => format!("the guest migrated: {how}"),
            VmExit::Reset => {
                "guest requested a reset (reboot); rhyve exits, restart it to boot again".into()
            }
            VmExit::TripleFault { cpu } => {
                format!("vCPU {cpu} triple-faulted (guest reset by shutdown)")
            }
            VmExit::InternalError { cpu, detail } => {
                format!("KVM internal error on vCPU {cpu}: {detail}")
            }
            VmExit::GuestExit(0) => "test guest exited with status 0 (pass)".into(),
            VmExit::GuestExit(s) => format!("test guest exited with status {s} (failure)"),
            VmExit::Signal(n) => format!("stopped by signal {n}; disks flushed"),
            VmExit::Failed(m) => format!("VMM failure: {m}"),
        }
    }
}

/// Each device's counters (its own, plus the exits its BARs caused, ioeventfd kicks and
/// interrupts sent through KVM), from the exit counters in `exits`.
pub fn device_reports(host: &PciHost, exits: &Snapshot) -> Vec<DeviceReport> {
    host.slots()
        .filter(|s| s.name != "hostbridge")
        .map(|s| {
            let mut counters = s.lock().stats();
            let prefix = format!("slot{}.{} ", s.index / 8, s.index % 8);
            let bar_exits: u64 = exits
                .buckets
                .iter()
                .filter(|(n, _, _)| n.starts_with(&prefix))
                .map(|(_, r, w)| r + w)
                .sum();
            counters.push(("exits".into(), bar_exits));
            if let Some(irq) = &s.irq {
                let c = &irq.counters;
                counters.push(("irqfd_msi".into(), c.irqfd.load(Ordering::Relaxed)));
                counters.push(("signal_msi".into(), c.signal_msi.load(Ordering::Relaxed)));
                counters.push(("intx_asserts".into(), c.intx.load(Ordering::Relaxed)));
            }
            counters.push(("ioeventfd_kicks".into(), s.kicks.load(Ordering::Relaxed)));
            DeviceReport {
                address: s.address(),
                name: s.name.clone(),
                counters,
            }
        })
        .collect()
}

/// Where devices report terminal events.
pub type ExitSender = Sender<VmExit>;

/// Errors building the VM. Each prints as one line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("{0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// KVM lacks a capability rhyve needs.
    #[error("KVM lacks {0:?}, which rhyve needs")]
    MissingCap(Cap),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// Kernel loading.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// A device refused its configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Interrupt routing.
    #[error(transparent)]
    Irq(#[from] irq::IrqError),
    /// vCPU setup.
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    /// Anything else, already worded.
    #[error("{0}")]
    Other(String),
}

/// What to build.
pub struct VmConfig {
    /// RAM in bytes.
    pub mem_size: u64,
    /// Number of vCPUs (1–255).
    pub vcpus: u8,
    /// Kernel: bzImage or ELF.
    pub kernel: String,
    /// Initial ramdisk.
    pub initrd: Option<String>,
    /// Kernel command line.
    pub cmdline: String,
    /// COM1.
    pub console: ConsoleSink,
    /// Enable the test device ([`testdev`]).
    pub testdev: bool,
    /// PCI devices.
    pub devices: Vec<SlotSpec>,
    /// The `-s` arguments the devices came from (kept in snapshots).
    pub device_args: Vec<String>,
    /// Start from a snapshot instead of booting `kernel` (which is then not read).
    pub restore: Option<snapshot::Restore>,
}

/// Per-device report after the run.
#[derive(Clone, Debug)]
pub struct DeviceReport {
    /// `0:4.0`.
    pub address: String,
    /// Emulation name.
    pub name: String,
    /// The model's counters (commands, bytes, interrupts).
    pub counters: Vec<(String, u64)>,
}

/// The result of [`Vm::run`].
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Why it ended.
    pub exit: VmExit,
    /// Exit counters for the whole run.
    pub stats: Snapshot,
    /// Device counters.
    pub devices: Vec<DeviceReport>,
    /// Test-device phases.
    pub phases: Vec<Phase>,
    /// Port writes KVM buffered instead of exiting (CONFIG_ADDRESS, RTC index; see
    /// [`coalesced`]).
    pub coalesced_pio: u64,
}

/// A built, not yet running, virtual machine.
pub struct Vm {
    _kvm: Kvm,
    _vm: Arc<VmFd>,
    _mem: GuestMemoryMmap,
    _memfd: File,
    host: Arc<PciHost>,
    env: VcpuEnv,
    vcpus: Vec<VcpuFd>,
    exit_rx: Receiver<VmExit>,
    ioevents: Arc<IoEvents>,
    serial: Arc<SerialPort>,
    stdin: bool,
    testdev: Option<Arc<TestDev>>,
    /// The vCPU threads while the VM runs (for pausing: a kick makes each leave the guest).
    vcpu_threads: Arc<std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>>,
    cmos: Arc<cmos::Cmos>,
    kbd: Arc<i8042::I8042>,
    power_button: PowerButton,
    saved_config: snapshot::SavedConfig,
    devices_paused: Arc<AtomicBool>,
}

/// Presses the ACPI power button (an edge on the Generic Event Device's interrupt).
#[derive(Clone)]
pub struct PowerButton(Arc<EventFd>);

impl PowerButton {
    /// Press it: the guest gets a power-button notification (Linux: KEY_POWER).
    pub fn press(&self) {
        if let Err(e) = self.0.write(1) {
            log::warn!("power button: {e}");
        }
    }
}

/// Pauses and resumes a running VM: its vCPUs, and for snapshots its devices too.
#[derive(Clone)]
pub struct PauseHandle {
    pause: Arc<vcpu::Pause>,
    threads: Arc<std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>>,
    vcpus: usize,
    host: Arc<PciHost>,
    devices_paused: Arc<AtomicBool>,
}

impl PauseHandle {
    /// Stop every vCPU between two exits; returns once none runs guest code.
    pub fn pause(&self) -> Result<(), String> {
        self.pause.paused.store(true, Ordering::Release);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.pause.parked() < self.vcpus {
            if Instant::now() > deadline {
                return Err(format!(
                    "only {} of {} vCPUs stopped",
                    self.pause.parked(),
                    self.vcpus
                ));
            }
            // A kick taken just before KVM_RUN is lost: kick again until all have parked.
            for t in self
                .threads
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .filter(|t| !t.is_finished())
            {
                use vmm_sys_util::signal::Killable;
                let _ = t.kill(vmm_sys_util::signal::SIGRTMIN());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    /// Pause the vCPUs, then the devices (they stop fetching, finish in-flight I/O, flush).
    pub fn pause_all(&self) -> Result<(), String> {
        if !self.is_paused() {
            self.pause()?;
        }
        if !self.devices_paused.load(Ordering::Acquire) {
            if let Err(e) = self.host.pause_devices() {
                return Err(format!("cannot pause devices: {e}"));
            }
            self.devices_paused.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Every vCPU's state (the VM must be paused).
    pub fn capture(&self) -> Result<Vec<vcpu::VcpuState>, String> {
        self.pause.capture(self.vcpus)
    }

    /// Let the devices and the vCPUs run again.
    pub fn resume(&self) {
        if self.devices_paused.swap(false, Ordering::AcqRel) {
            self.host.resume_devices();
        }
        self.pause.resume();
    }

    /// Whether the VM is paused.
    pub fn is_paused(&self) -> bool {
        self.pause.paused.load(Ordering::Acquire)
    }
}

fn pio_insert(
    bus: &Bus,
    base: u64,
    len: u64,
    dev: Arc<dyn bus::BusDevice>,
    tag: usize,
) -> Result<(), Error> {
    bus.insert(base, len, dev, tag)
        .map_err(|e| Error::Other(format!("port {base:#x}: {e}")))
}

impl Vm {
    /// Build the machine. Devices are created (images opened) here, before any guest code runs.
    pub fn new(cfg: VmConfig, devices: &DeviceRegistry) -> Result<Vm, Error> {
        if cfg.vcpus == 0 {
            return Err(Error::Other("need at least one vCPU".into()));
        }
        let kvm = Kvm::new().map_err(|e| Error::Kvm("cannot open /dev/kvm", e))?;
        for cap in [
            Cap::Irqchip,
            Cap::Irqfd,
            Cap::Ioeventfd,
            Cap::IrqRouting,
            Cap::UserMemory,
            Cap::Pit2,
            Cap::SignalMsi,
        ] {
            if !kvm.check_extension(cap) {
                return Err(Error::MissingCap(cap));
            }
        }
        let vm = Arc::new(
            kvm.create_vm()
                .map_err(|e| Error::Kvm("KVM_CREATE_VM", e))?,
        );
        vm.set_tss_address(memory::KVM_TSS_ADDR as usize)
            .map_err(|e| Error::Kvm("KVM_SET_TSS_ADDR", e))?;
        if let Err(e) = vm.set_identity_map_address(memory::KVM_IDENTITY_MAP_ADDR) {
            log::debug!("KVM_SET_IDENTITY_MAP_ADDR: {e}");
        }
        vm.create_irq_chip()
            .map_err(|e| Error::Kvm("KVM_CREATE_IRQCHIP", e))?;
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(|e| Error::Kvm("KVM_CREATE_PIT2", e))?;
        let restore = cfg.restore.as_ref();
        let (mem, memfd) = match restore.map(|r| &r.memory) {
            Some(snapshot::Ram::Ready(m, f)) => (
                m.clone(),
                f.try_clone()
                    .map_err(|e| Error::Other(format!("guest RAM: {e}")))?,
            ),
            _ => memory::create(cfg.mem_size)?,
        };
        memory::register(&vm, &mem)?;
        let guest_mem = GuestMem::new(mem.clone());
        let router = Arc::new(IrqRouter::new(vm.clone())?);

        let stats = Arc::new(Stats::new());
        let (mmio, pio) = (Arc::new(Bus::new()), Arc::new(Bus::new()));
        let ioevents =
            Arc::new(IoEvents::new(vm.clone()).map_err(|e| Error::Other(format!("epoll: {e}")))?);
        let (exit_tx, exit_rx) = channel();
        let env = Arc::new(HostEnv {
            mmio: mmio.clone(),
            pio: pio.clone(),
            ioevents: ioevents.clone(),
            stats: stats.clone(),
        });
        let mut host = PciHost::new(env, exit_tx.clone());
        for spec in &cfg.devices {
            if spec.bus != 0 {
                return Err(Error::Other(format!(
                    "slot {}: rhyve run has only PCI bus 0",
                    spec.address()
                )));
            }
            if host.is_taken(spec.slot, spec.func) {
                return Err(ConfigError::SlotTaken(spec.address()).into());
            }
            let irq = Arc::new(DeviceIrq::new(router.clone(), spec.slot));
            let ctx = DeviceContext {
                mem: guest_mem.clone(),
                irq: irq.clone(),
                intx_supported: true,
            };
            let dev = devices.create(spec, &ctx)?;
            host.add(spec.slot, spec.func, dev, Some(irq));
        }
        if !host.slots().any(|s| s.name == "hostbridge") && !host.is_taken(0, 0) {
            host.add(0, 0, Box::new(HostBridge::new()), None);
        }
        let host = Arc::new(host);
        host.assign_resources().map_err(Error::Other)?;
        let cfg_tag = stats.bucket("pci-config");
        pio_insert(
            &pio,
            0xcf8,
            4,
            Arc::new(ConfigAddress(host.clone())),
            cfg_tag,
        )?;
        pio_insert(&pio, 0xcfc, 4, Arc::new(ConfigData(host.clone())), cfg_tag)?;
        mmio.insert(
            memory::ECAM_START,
            memory::ECAM_SIZE,
            Arc::new(Ecam(host.clone())),
            stats.bucket("ecam"),
        )
        .map_err(|e| Error::Other(format!("ECAM: {e}")))?;

        let serial_irq =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Other(format!("eventfd: {e}")))?;
        vm.register_irqfd(&serial_irq, serial::COM1_IRQ)
            .map_err(|e| Error::Kvm("KVM_IRQFD (COM1)", e))?;
        let stdin = matches!(cfg.console, ConsoleSink::Stdio);
        let serial = SerialPort::new(&cfg.console, serial_irq, restore.map(|r| &r.state.com1))
            .map_err(|e| Error::Other(format!("console: {e}")))?;
        pio_insert(
            &pio,
            serial::COM1_PORT,
            8,
            serial.clone(),
            stats.bucket("com1"),
        )?;
        let kbd = Arc::new(i8042::I8042::new(exit_tx.clone()));
        if let Some(r) = restore {
            kbd.restore(&r.state.i8042).map_err(Error::Other)?;
        }
        let kbd_tag = stats.bucket("i8042");
        pio_insert(
            &pio,
            i8042::DATA_PORT,
            1,
            Arc::new(i8042::I8042Port {
                dev: kbd.clone(),
                data_port: true,
            }),
            kbd_tag,
        )?;
        pio_insert(
            &pio,
            i8042::CMD_PORT,
            1,
            Arc::new(i8042::I8042Port {
                dev: kbd.clone(),
                data_port: false,
            }),
            kbd_tag,
        )?;
        let cmos = Arc::new(cmos::Cmos::new(0));
        if let Some(r) = restore {
            cmos.restore(r.state.cmos.0, &r.state.cmos.1, r.state.cmos_offset);
        }
        pio_insert(&pio, cmos::INDEX_PORT, 2, cmos.clone(), stats.bucket("rtc"))?;
        let testdev = if cfg.testdev {
            let t = Arc::new(TestDev::new(stats.clone(), exit_tx.clone()));
            pio_insert(
                &pio,
                testdev::BASE_PORT,
                testdev::LEN,
                t.clone(),
                stats.bucket("testdev"),
            )?;
            Some(t)
        } else {
            None
        };
        let button =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Other(format!("eventfd: {e}")))?;
        vm.register_irqfd(&button, acpi::GED_GSI)
            .map_err(|e| Error::Kvm("KVM_IRQFD (power button)", e))?;
        let power_button = PowerButton(Arc::new(button));
        let acpi_tag = stats.bucket("acpi");
        acpi::add_pm_ports(&pio, exit_tx.clone(), acpi_tag)?;
        let entry = match restore {
            Some(r) => {
                // RAM holds the ACPI tables and the kernel already.
                if let snapshot::Ram::File(path) = &r.memory {
                    snapshot::load_memory(&mem, path).map_err(Error::Other)?;
                }
                host.restore(&r.state.pci).map_err(Error::Other)?;
                None
            }
            None => {
                let rsdp = acpi::write_tables(&mem, &acpi::Platform { vcpus: cfg.vcpus })
                    .map_err(|e| Error::Other(format!("ACPI tables: {e}")))?;
                Some(boot::load_kernel(
                    &mem,
                    cfg.mem_size,
                    &cfg.kernel,
                    cfg.initrd.as_deref(),
                    &cfg.cmdline,
                    Some(rsdp),
                )?)
            }
        };
        let base_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        let mut vcpus = Vec::new();
        for id in 0..cfg.vcpus {
            let v = vm
                .create_vcpu(u64::from(id))
                .map_err(|e| Error::Kvm("KVM_CREATE_VCPU", e))?;
            vcpu::configure(
                &v,
                id,
                &vcpu::cpuid_for(&base_cpuid, id, cfg.vcpus),
                entry.filter(|_| id == 0),
            )?;
            if let Some(r) = restore {
                vcpu::restore(&v, &r.state.vcpus[usize::from(id)])?;
            }
            vcpus.push(v);
        }
        if let Some(r) = restore {
            snapshot::restore_vm(&vm, &r.state).map_err(Error::Other)?;
            // Devices restored paused; owed interrupts now reach restored LAPICs.
            host.resume_devices();
        }
        let coalesced = vcpus
            .first()
            .and_then(|v| coalesced::CoalescedPio::setup(&kvm, &vm, v, pio.clone()))
            .map(Arc::new);
        let msrs = kvm
            .get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .unwrap_or_default();
        let env = VcpuEnv {
            mmio,
            pio,
            stats,
            exit: exit_tx,
            stop: Arc::new(AtomicBool::new(false)),
            pause: Arc::new(vcpu::Pause::default()),
            msrs: Arc::new(msrs),
            coalesced,
        };
        let saved_config = snapshot::SavedConfig {
            mem_size: cfg.mem_size,
            vcpus: cfg.vcpus,
            devices: cfg.device_args.clone(),
            testdev: cfg.testdev,
        };
        Ok(Vm {
            _kvm: kvm,
            _vm: vm,
            _mem: mem,
            _memfd: memfd,
            host,
            env,
            vcpus,
            exit_rx,
            ioevents,
            serial,
            stdin,
            testdev,
            vcpu_threads: Arc::default(),
            cmos,
            kbd,
            power_button,
            saved_config,
            devices_paused: Arc::default(),
        })
    }

    /// A sender for stopping the VM from outside (signal handlers send [`VmExit::Signal`]).
    pub fn exit_sender(&self) -> ExitSender {
        self.env.exit.clone()
    }

    /// The PCI host (for inspection in tests).
    pub fn host(&self) -> &Arc<PciHost> {
        &self.host
    }

    /// The exit counters (for [`device_reports`] while the VM runs).
    pub fn exit_stats(&self) -> Arc<Stats> {
        self.env.stats.clone()
    }

    /// The ACPI power button.
    pub fn power_button(&self) -> PowerButton {
        self.power_button.clone()
    }

    /// Pause and resume this VM while it runs.
    pub fn pause_handle(&self) -> PauseHandle {
        PauseHandle {
            pause: self.env.pause.clone(),
            threads: self.vcpu_threads.clone(),
            vcpus: self.vcpus.len(),
            host: self.host.clone(),
            devices_paused: self.devices_paused.clone(),
        }
    }

    /// Take snapshots of this VM while it runs.
    pub fn snapshotter(&self) -> snapshot::Snapshotter {
        snapshot::Snapshotter {
            vm: self._vm.clone(),
            mem: self._mem.clone(),
            host: self.host.clone(),
            pause: self.pause_handle(),
            serial: self.serial.clone(),
            cmos: self.cmos.clone(),
            kbd: self.kbd.clone(),
            config: self.saved_config.clone(),
        }
    }

    /// Run until the guest or the VMM ends the VM; then flush every device.
    pub fn run(self) -> Outcome {
        extern "C" fn kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
        if let Err(e) =
            vmm_sys_util::signal::register_signal_handler(vmm_sys_util::signal::SIGRTMIN(), kick)
        {
            log::warn!("cannot install the vCPU kick signal handler: {e}");
        }
        if self.stdin {
            self.serial.spawn_stdin();
        }
        let host = self.host.clone();
        let ioev = self.ioevents.clone();
        let ioev_thread = std::thread::Builder::new()
            .name("ioeventfd".into())
            .spawn(move || {
                ioev.run(|dev| {
                    if let Some(s) = host.slot(dev) {
                        s.deliver_kicks();
                    }
                })
            })
            .ok();
        let mut threads = Vec::new();
        let vcpu_threads = self.vcpu_threads.clone();
        for (id, v) in self.vcpus.into_iter().enumerate() {
            let env = self.env.clone();
            match std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || vcpu::run(v, id as u8, env))
            {
                Ok(t) => threads.push(t),
                Err(e) => {
                    let _ = self
                        .env
                        .exit
                        .send(VmExit::Failed(format!("cannot start vCPU thread: {e}")));
                }
            }
        }
        *vcpu_threads.lock().unwrap_or_else(|e| e.into_inner()) = threads;
        let exit = self
            .exit_rx
            .recv()
            .unwrap_or_else(|_| VmExit::Failed("exit channel closed".into()));
        self.env.stop.store(true, Ordering::Release);
        self.env.pause.resume(); // parked vCPUs see the stop
        let threads = std::mem::take(&mut *vcpu_threads.lock().unwrap_or_else(|e| e.into_inner()));
        let deadline = Instant::now() + Duration::from_secs(10);
        for t in &threads {
            while !t.is_finished() && Instant::now() < deadline {
                use vmm_sys_util::signal::Killable;
                let _ = t.kill(vmm_sys_util::signal::SIGRTMIN());
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        for t in threads {
            if t.is_finished() {
                let _ = t.join();
            } else {
                log::error!("a vCPU thread did not stop");
            }
        }
        self.ioevents.stop();
        if let Some(t) = ioev_thread {
            let _ = t.join();
        }
        self.host.shutdown();
        self.serial.flush();
        let devices = device_reports(&self.host, &self.env.stats.snapshot());
        let phases = self
            .testdev
            .as_ref()
            .map(|t| t.phases.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .unwrap_or_default();
        Outcome {
            exit,
            stats: self.env.stats.snapshot(),
            devices,
            phases,
            coalesced_pio: self
                .env
                .coalesced
                .as_ref()
                .map_or(0, |c| c.writes.load(Ordering::Relaxed)),
        }
    }
}
