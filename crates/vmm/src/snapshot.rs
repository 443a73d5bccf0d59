//! Snapshots of a running VM into a directory, and the state a restore starts from.
//!
//! A snapshot is taken with the VM paused: the vCPUs park between exits (each finishes the exit
//! it was handling, so no I/O is half done), then every PCI function pauses (stops fetching,
//! finishes in-flight I/O, flushes). The directory then gets:
//!
//! * `memory`: guest RAM as one sparse file, in the order of the memfd (RAM below the PCI hole,
//!   then above 4 GiB); zero blocks are holes.
//! * `state.json`: [`VmState`] (format version, the configuration, every vCPU, the in-kernel
//!   PIC/IOAPIC/PIT and clock, the PCI bus with each device's own versioned state, COM1, the
//!   RTC and the i8042), written last and renamed into place, so a directory with a
//!   `state.json` holds a complete snapshot.
//!
//! The VM stays paused afterwards: resuming it would change the disks behind the snapshot's back.
//! Disk images are not copied; a restore uses the same images (or ones the user names) in the
//! state the pause flushed them to.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::cmos::Cmos;
use crate::i8042::I8042;
use crate::pci_host::{HostState, PciHost};
use crate::serial::{SerialPort, UartState};
use crate::vcpu::VcpuState;
use crate::PauseHandle;

/// Version of [`VmState`]; another version is refused.
pub const SNAPSHOT_VERSION: u32 = 1;
/// The state file in a snapshot directory.
pub const STATE_FILE: &str = "state.json";
/// The RAM file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";

/// Unit of the RAM copy (and of hole detection).
const CHUNK: usize = 1 << 20;

/// What the VM was built from, so a restore can build the same machine.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SavedConfig {
    /// RAM bytes.
    pub mem_size: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// The `-s` arguments, as given.
    pub devices: Vec<String>,
    /// The test device was on.
    pub testdev: bool,
}

/// Everything but RAM.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// [`SNAPSHOT_VERSION`].
    pub version: u32,
    /// rhyve's version that wrote it (informational).
    pub writer: String,
    /// The machine.
    pub config: SavedConfig,
    /// Every vCPU.
    pub vcpus: Vec<VcpuState>,
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    /// The PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
    /// The PCI bus and its devices.
    pub pci: HostState,
    /// COM1.
    pub com1: UartState,
    /// RTC index register and CMOS RAM.
    pub cmos: (u8, Vec<u8>),
    /// Seconds the guest set its RTC ahead of the host clock (`hwclock -w`); 0 in snapshots
    /// from before the RTC could be set.
    #[serde(default)]
    pub cmos_offset: i64,
    /// The i8042.
    pub i8042: serde_json::Value,
}

impl VmState {
    /// Read `dir/state.json`, checking the format version and that the RAM file is there and
    /// of the right size.
    pub fn load(dir: &Path) -> Result<VmState, String> {
        let path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("{}: not a snapshot state file: {e}", path.display()))?;
        let version = v.get("version").and_then(serde_json::Value::as_u64);
        if version != Some(u64::from(SNAPSHOT_VERSION)) {
            return Err(format!(
                "{}: snapshot format version {}, this rhyve reads version {SNAPSHOT_VERSION}",
                path.display(),
                version.map_or_else(|| "missing".into(), |v| v.to_string())
            ));
        }
        let s: VmState = serde_json::from_value(v)
            .map_err(|e| format!("{}: damaged snapshot state: {e}", path.display()))?;
        if s.vcpus.len() != usize::from(s.config.vcpus) || s.irqchips.len() != 3 {
            return Err(format!(
                "{}: damaged snapshot state: {} vCPU states for {} vCPUs",
                path.display(),
                s.vcpus.len(),
                s.config.vcpus
            ));
        }
        let mem = dir.join(MEMORY_FILE);
        let len = std::fs::metadata(&mem)
            .map_err(|e| format!("cannot read {}: {e}", mem.display()))?
            .len();
        if len != s.config.mem_size {
            return Err(format!(
                "{}: {len} bytes, the snapshot's RAM is {} bytes",
                mem.display(),
                s.config.mem_size
            ));
        }
        Ok(s)
    }
}

/// Where a restored VM starts: the state and its RAM.
#[derive(Debug)]
pub struct Restore {
    /// The saved state.
    pub state: VmState,
    /// The RAM.
    pub memory: Ram,
}

/// A restored VM's RAM.
#[derive(Debug)]
pub enum Ram {
    /// In a file, in memfd order (a snapshot's `memory`): copied in.
    File(PathBuf),
    /// Already in guest memory and its memfd (a migration received it there).
    Ready(GuestMemoryMmap, File),
}

impl Restore {
    /// A snapshot directory's state and RAM.
    pub fn from_dir(dir: &Path) -> Result<Restore, String> {
        Ok(Restore {
            state: VmState::load(dir)?,
            memory: Ram::File(dir.join(MEMORY_FILE)),
        })
    }
}

/// What a snapshot took.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Where.
    pub dir: PathBuf,
    /// Bytes of RAM written (zero blocks are skipped).
    pub memory_bytes: u64,
    /// Time from the pause to the state file in place.
    pub millis: u64,
}

/// Takes snapshots of a running VM (from the API thread).
#[derive(Clone)]
pub struct Snapshotter {
    pub(crate) vm: Arc<VmFd>,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) host: Arc<PciHost>,
    pub(crate) pause: PauseHandle,
    pub(crate) serial: Arc<SerialPort>,
    pub(crate) cmos: Arc<Cmos>,
    pub(crate) kbd: Arc<I8042>,
    pub(crate) config: SavedConfig,
}

impl Snapshotter {
    /// Pause the VM (vCPUs, then devices) and write a snapshot into `dir` (created if needed;
    /// an existing snapshot there is replaced). The VM stays paused.
    pub fn snapshot(&self, dir: &Path) -> Result<Report, String> {
        let t0 = Instant::now();
        self.pause.pause_all()?;
        let state = self.capture()?;
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let memory_bytes = save_memory(&self.mem, &dir.join(MEMORY_FILE))?;
        write_state(dir, &state)?;
        Ok(Report {
            dir: dir.to_path_buf(),
            memory_bytes,
            millis: t0.elapsed().as_millis() as u64,
        })
    }

    /// Everything but RAM, from a paused VM.
    pub(crate) fn capture(&self) -> Result<VmState, String> {
        let vcpus = self.pause.capture()?;
        let mut irqchips = Vec::new();
        for id in [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ] {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.vm
                .get_irqchip(&mut c)
                .map_err(|e| format!("KVM_GET_IRQCHIP {id}: {e}"))?;
            irqchips.push(c);
        }
        let (cmos_index, cmos_ram, cmos_offset) = self.cmos.save();
        Ok(VmState {
            version: SNAPSHOT_VERSION,
            writer: format!("rhyve {}", env!("CARGO_PKG_VERSION")),
            config: self.config.clone(),
            vcpus,
            irqchips,
            pit: self
                .vm
                .get_pit2()
                .map_err(|e| format!("KVM_GET_PIT2: {e}"))?,
            clock: self
                .vm
                .get_clock()
                .map_err(|e| format!("KVM_GET_CLOCK: {e}"))?,
            pci: self.host.save()?,
            com1: self.serial.save(),
            cmos: (cmos_index, cmos_ram),
            cmos_offset,
            i8042: self.kbd.save(),
        })
    }
}

fn write_state(dir: &Path, state: &VmState) -> Result<(), String> {
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let text = serde_json::to_vec(state).map_err(|e| format!("state: {e}"))?;
    let mut f = File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    f.write_all(&text)
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(STATE_FILE)).map_err(|e| format!("{}: {e}", dir.display()))
}

/// Write guest RAM to `path` as a sparse file; returns the bytes written.
pub fn save_memory(mem: &GuestMemoryMmap, path: &Path) -> Result<u64, String> {
    let _ = std::fs::remove_file(path);
    let f = File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    f.set_len(total)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut buf = vec![0u8; CHUNK];
    let (mut off, mut written) = (0u64, 0u64);
    for r in mem.iter() {
        let mut a = 0u64;
        while a < r.len() {
            let n = (r.len() - a).min(CHUNK as u64) as usize;
            mem.read_slice(&mut buf[..n], GuestAddress(r.start_addr().0 + a))
                .map_err(|e| format!("guest RAM: {e}"))?;
            if buf[..n].iter().any(|&b| b != 0) {
                f.write_all_at(&buf[..n], off + a)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                written += n as u64;
            }
            a += n as u64;
        }
        off += r.len();
    }
    f.sync_all()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(written)
}

/// Fill guest RAM from a file [`save_memory`] wrote.
pub fn load_memory(mem: &GuestMemoryMmap, path: &Path) -> Result<(), String> {
    let f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    for r in mem.iter() {
        let mut a = 0u64;
        while a < r.len() {
            let n = (r.len() - a).min(CHUNK as u64) as usize;
            f.read_exact_at(&mut buf[..n], off + a)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if buf[..n].iter().any(|&b| b != 0) {
                mem.write_slice(&buf[..n], GuestAddress(r.start_addr().0 + a))
                    .map_err(|e| format!("guest RAM: {e}"))?;
            }
            a += n as u64;
        }
        off += r.len();
    }
    Ok(())
}

/// Put the VM-wide KVM state back (after the vCPUs and devices).
pub(crate) fn restore_vm(vm: &VmFd, s: &VmState) -> Result<(), String> {
    for c in &s.irqchips {
        vm.set_irqchip(c)
            .map_err(|e| format!("KVM_SET_IRQCHIP {}: {e}", c.chip_id))?;
    }
    vm.set_pit2(&s.pit)
        .map_err(|e| format!("KVM_SET_PIT2: {e}"))?;
    let clock = kvm_clock_data {
        clock: s.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock)
        .map_err(|e| format!("KVM_SET_CLOCK: {e}"))?;
    Ok(())
}
