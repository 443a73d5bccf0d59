//! AHCI: HBA and port registers in any order and width, command lists, FISes, PRDTs and ATAPI
//! CDBs with fuzzed fields, on a disk port and a CD-ROM port.
//!
//! The harness is a host driver (Linux's order: HBA reset, AHCI enable, per port CLB/FB, FRE,
//! ST) that issues fuzzed commands in any slot, NCQ or not. Invariants: the canary (every PRDT
//! and table address is steered out of it), every issued command completes or the port reports
//! an error within a bounded time, heap and thread bounds, and no slow operation.

use std::time::{Duration, Instant};

use ahci::regs::{ghc, hba, port as preg, pxcmd, pxis};
use arbitrary::Arbitrary;
use block::BlockBackend;
use pci::{DeviceContext, GuestMem, PciDevice};
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress};

use crate::{alloc, steer, Recorder, RAM_END, WINDOW};

/// The AHCI BAR (ABAR).
const ABAR: u8 = 5;
/// Ports the harness drives: a disk and a CD-ROM.
const PORTS: usize = 2;
/// Heap the controller may grow (two small RAM drives are allocated before measuring).
const HEAP_BOUND: usize = 16 << 20;
/// Threads a controller may add.
const THREADS: usize = 8;

fn clb(p: usize) -> u64 {
    WINDOW + p as u64 * 0x2000
}
fn fb(p: usize) -> u64 {
    clb(p) + 0x400
}
fn table(p: usize, slot: u8) -> u64 {
    WINDOW + 0x8000 + p as u64 * 0x8000 + u64::from(slot) * 0x400
}

/// One fuzzed command.
#[derive(Arbitrary, Debug, Clone)]
pub struct Cmd {
    command: u8,
    features: u16,
    lba: u64,
    count: u16,
    device: u8,
    control: u8,
    icc: u8,
    /// Header flags (A, W, P, R, B, C, PMP) above the CFL.
    flags: u16,
    cfl: u8,
    /// PRDT entries: (address, byte count − 1, interrupt bit).
    prdt: Vec<(u64, u32, bool)>,
    /// Header PRDTL (may disagree with the entries written).
    prdtl: Option<u16>,
    acmd: [u8; 16],
    /// Queued: set PxSACT before PxCI.
    ncq: bool,
    /// FIS type byte other than Register H2D.
    fis_type: Option<u8>,
    /// A known ATA command instead of `command` (index into [`ATA_COMMANDS`]): without compare
    /// tracing the fuzzer would rarely guess an opcode, and every decoder should be reached.
    known: Option<u8>,
    /// For PACKET: a known MMC opcode as the CDB's first byte (index into [`ATAPI_OPS`]).
    known_cdb: Option<u8>,
    /// For READ LOG (DMA) EXT: a known log address as LBA 7:0 (index into [`LOG_ADDRESSES`]).
    known_log: Option<u8>,
}

/// ATA commands (ACS-4) the model decodes, and a few it refuses.
const ATA_COMMANDS: [u8; 46] = [
    0x00, 0x06, 0x08, 0x20, 0x24, 0x25, 0x27, 0x29, 0x2f, 0x30, 0x34, 0x35, 0x39, 0x3d, 0x3f, 0x40,
    0x42, 0x47, 0x57, 0x60, 0x61, 0x63, 0x64, 0x65, 0x90, 0xa0, 0xa1, 0xb0, 0xc4, 0xc5, 0xc6, 0xc8,
    0xca, 0xce, 0xe0, 0xe1, 0xe2, 0xe3, 0xe5, 0xe7, 0xea, 0xec, 0xef, 0xf8, 0x92, 0xf5,
];
/// MMC opcodes the CD-ROM decodes, and a few it refuses.
const ATAPI_OPS: [u8; 18] = [
    0x00, 0x03, 0x12, 0x1b, 0x1e, 0x25, 0x28, 0x43, 0x46, 0x4a, 0x51, 0x5a, 0xa8, 0xbd, 0x55, 0xbb,
    0x2b, 0xad,
];
/// General Purpose Log addresses (ACS-4 Table A.2), known and unknown to the model.
const LOG_ADDRESSES: [u8; 12] = [
    0x00, 0x03, 0x04, 0x06, 0x07, 0x10, 0x11, 0x13, 0x30, 0x80, 0xe0, 0xff,
];

impl Cmd {
    /// The command byte the FIS carries.
    fn opcode(&self) -> u8 {
        self.known.map_or(self.command, |i| {
            ATA_COMMANDS[usize::from(i) % ATA_COMMANDS.len()]
        })
    }
}

/// One step of the input.
#[derive(Arbitrary, Debug)]
pub enum Op {
    /// HBA reset and the usual start of every port.
    Start,
    /// Build and issue a command in `slot` of `port`.
    Issue { port: u8, slot: u8, cmd: Cmd },
    /// Issue several at once (one PxCI write).
    Batch { port: u8, cmds: Vec<(u8, Cmd)> },
    /// A raw ABAR write.
    Reg { off: u16, width: u8, value: u64 },
    /// A raw ABAR read.
    RegRead { off: u16, width: u8 },
    /// A raw config-space write.
    Cfg { off: u16, width: u8, value: u32 },
    /// Raw bytes into the window (steered).
    Poke { off: u32, bytes: Vec<u8> },
    /// Wait for `port`'s commands, clearing interrupts as a handler does.
    Wait { port: u8 },
    /// Linux's error recovery: stop, clear errors, start.
    Recover { port: u8 },
}

/// A whole input.
#[derive(Arbitrary, Debug)]
pub struct Input {
    config: u8,
    window: Vec<u8>,
    ops: Vec<Op>,
}

/// Run one input from raw fuzzer bytes.
pub fn run(data: &[u8]) {
    crate::run_with(data, run_input);
}

struct Host {
    dev: Box<dyn PciDevice>,
    mem: vm_memory::GuestMemoryMmap,
    /// Slots issued since the port last started, per port.
    issued: [u32; PORTS],
    /// The port's engine is known to run with the harness's lists.
    running: [bool; PORTS],
    /// The port reported an error and waits for the host's recovery (its commands stay).
    failed: [bool; PORTS],
    /// PxSACT bits of queued commands (the device clears them; a PxSACT bit the host set for
    /// a command that is not queued stays set, as on real hardware).
    queued: [u32; PORTS],
    /// Every PRDT entry a command could use was written (and steered) by the harness. A PRDTL
    /// larger than the entries written makes the device read entries from whatever lies
    /// beyond (other slots' tables, FIS areas the device itself fills): those name memory the
    /// harness cannot vouch for, so the canary is not checked after such a run.
    strict: bool,
}

fn width(w: u8) -> usize {
    [1, 2, 4, 8][usize::from(w) % 4]
}

fn drives(config: u8) -> Vec<ahci::DriveInfo> {
    let (logical, physical) = match config % 3 {
        0 => (512, 512),
        1 => (512, 4096),
        _ => (4096, 4096),
    };
    let disk: Arc<dyn BlockBackend> =
        Arc::new(block::Ram::new(1 << 20, logical).expect("RAM disk"));
    let cd: Arc<dyn BlockBackend> = Arc::new(block::Ram::new(1 << 20, 512).expect("RAM CD"));
    let mut d = ahci::DriveInfo::new(ahci::DriveKind::Disk, Some(disk), logical, physical);
    if config & 4 != 0 {
        d.write_through = true;
    }
    vec![
        d,
        ahci::DriveInfo::new(
            ahci::DriveKind::Cdrom,
            (config & 8 == 0).then_some(cd),
            2048,
            2048,
        ),
    ]
}

/// Run one structured input.
pub fn run_input(input: &Input) {
    let base_threads = crate::check_thread_leak(THREADS);
    let drives = drives(input.config);
    let base_heap = alloc::live().unwrap_or(0);
    alloc::reset_peak();
    {
        let mem = crate::guest_memory();
        crate::fill_window(&mem, &input.window);
        let irq = Arc::new(Recorder::default());
        let ctx = DeviceContext {
            mem: GuestMem::new(mem.clone()),
            irq,
            intx_supported: true,
        };
        // RAM drives run inline: io_uring would only cost a setup and teardown per run.
        let opts = ahci::HbaOptions {
            iothreads: 1 + usize::from(input.config >> 7),
            aio: block::EngineKind::Threads,
        };
        let dev = ahci::Ahci::with_options(drives, &ctx, opts).expect("AHCI");
        let mut h = Host {
            dev: Box::new(dev),
            mem,
            issued: [0; PORTS],
            running: [false; PORTS],
            failed: [false; PORTS],
            queued: [0; PORTS],
            strict: true,
        };
        h.cfg_write(4, 2, 0x6);
        for op in input.ops.iter().take(256) {
            h.step(op);
        }
        for p in 0..PORTS {
            h.wait(p);
        }
        if h.strict {
            crate::check_canary(&h.mem);
        }
        assert!(
            crate::threads() <= base_threads + THREADS,
            "{} threads, {base_threads} before the HBA",
            crate::threads()
        );
        crate::timed("shutdown", || h.dev.shutdown());
    }
    alloc::check_peak("ahci", base_heap, HEAP_BOUND);
}

impl Host {
    /// Rewrite every port's command list and FIS base that is not a window address.
    fn steer_bases(&mut self) {
        for p in 0..PORTS {
            for (lo, hi) in [(preg::CLB, preg::CLBU), (preg::FB, preg::FBU)] {
                let a = u64::from(self.pr(p, lo)) | (u64::from(self.pr(p, hi)) << 32);
                if steer(a) != a || a >> 32 != 0 {
                    self.pw(p, lo, steer(a & 0xffff_ffff) as u32);
                    self.pw(p, hi, 0);
                }
            }
        }
    }
    fn bus_master(&self) -> bool {
        let mut b = [0u8; 2];
        self.dev.config_read(4, &mut b);
        u16::from_le_bytes(b) & 0x4 != 0
    }

    fn cfg_write(&self, off: u16, len: usize, v: u32) {
        crate::timed("config write", || {
            self.dev.config_write(off, &v.to_le_bytes()[..len])
        });
    }
    fn r(&self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        crate::timed("ABAR read", || self.dev.bar_read(ABAR, off, &mut b[..len]));
        u64::from_le_bytes(b)
    }
    fn w(&self, off: u64, len: usize, v: u64) {
        crate::timed("ABAR write", || {
            self.dev.bar_write(ABAR, off, &v.to_le_bytes()[..len])
        });
    }
    fn pr(&self, p: usize, reg: u64) -> u32 {
        self.r(hba::PORT_BASE + p as u64 * hba::PORT_STRIDE + reg, 4) as u32
    }
    fn pw(&self, p: usize, reg: u64, v: u32) {
        self.w(
            hba::PORT_BASE + p as u64 * hba::PORT_STRIDE + reg,
            4,
            u64::from(v),
        );
    }

    /// Wait (bounded) until `f` holds; false if it never did.
    fn until(&self, limit: Duration, f: impl Fn(&Self) -> bool) -> bool {
        let t = Instant::now();
        let mut spins = 0u32;
        while t.elapsed() < limit {
            if f(self) {
                return true;
            }
            // Spin briefly, then sleep: on a loaded machine a spinning harness would take the
            // CPU from the device threads it waits for.
            spins += 1;
            if spins < 1000 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        f(self)
    }

    /// What a stuck wait reports: GHC, each port's PxCMD/PxCI/PxSACT/PxTFD, the counters.
    fn describe(&self) -> String {
        let mut s = format!("GHC {:#x}", self.r(hba::GHC, 4));
        for p in 0..PORTS {
            s += &format!(
                "; port {p}: CMD {:#x} CI {:#x} SACT {:#x} TFD {:#x}",
                self.pr(p, preg::CMD),
                self.pr(p, preg::CI),
                self.pr(p, preg::SACT),
                self.pr(p, preg::TFD)
            );
        }
        format!("{s}; {:?}", self.dev.stats())
    }

    fn start(&mut self) {
        self.w(hba::GHC, 4, u64::from(ghc::HR));
        assert!(
            // Generous: the reset waits for commands in flight, and a loaded machine may not
            // run the threads finishing them for a while; a stuck reset never completes.
            self.until(crate::MAX_OP_WALL, |h| h.r(hba::GHC, 4) as u32 & ghc::HR
                == 0),
            "HBA reset never completed: {}",
            self.describe()
        );
        self.w(hba::GHC, 4, u64::from(ghc::AE | ghc::IE));
        for p in 0..PORTS {
            self.running[p] = false;
            self.failed[p] = false;
            self.queued[p] = 0;
            self.issued[p] = 0;
            let zero = vec![0u8; 0x500];
            self.mem
                .write_slice(&zero, GuestAddress(clb(p)))
                .expect("CL");
            self.pw(p, preg::CLB, clb(p) as u32);
            self.pw(p, preg::CLBU, 0);
            self.pw(p, preg::FB, fb(p) as u32);
            self.pw(p, preg::FBU, 0);
            self.pw(p, preg::SERR, u32::MAX);
            self.pw(p, preg::IS, u32::MAX);
            self.pw(p, preg::IE, u32::MAX);
            self.pw(p, preg::CMD, pxcmd::FRE | pxcmd::SUD | pxcmd::POD);
            // A drive takes a moment to report its signature (BSY clear) before ST.
            let ready = self.until(Duration::from_millis(200), |h| {
                h.pr(p, preg::TFD) & 0x88 == 0
            });
            if ready {
                self.pw(
                    p,
                    preg::CMD,
                    pxcmd::FRE | pxcmd::SUD | pxcmd::POD | pxcmd::ST,
                );
                self.running[p] = true;
            }
        }
    }

    /// Write `cmd`'s header, FIS and PRDT for `slot` of port `p`.
    fn build(&mut self, p: usize, slot: u8, c: &Cmd) {
        let t = table(p, slot);
        let mut fis = [0u8; 64];
        fis[0] = c.fis_type.unwrap_or(0x27);
        fis[1] = 0x80; // C
        fis[2] = c.opcode();
        fis[3] = c.features as u8;
        let l = c.lba.to_le_bytes();
        (fis[4], fis[5], fis[6]) = (l[0], l[1], l[2]);
        if let (0x2f | 0x47, Some(i)) = (c.opcode(), c.known_log) {
            fis[4] = LOG_ADDRESSES[usize::from(i) % LOG_ADDRESSES.len()];
        }
        fis[7] = c.device;
        (fis[8], fis[9], fis[10]) = (l[3], l[4], l[5]);
        fis[11] = (c.features >> 8) as u8;
        fis[12] = c.count as u8;
        fis[13] = (c.count >> 8) as u8;
        fis[14] = c.icc;
        fis[15] = c.control;
        let mut tab = vec![0u8; 0x80];
        tab[..64].copy_from_slice(&fis);
        tab[0x40..0x50].copy_from_slice(&c.acmd);
        if let (0xa0, Some(i)) = (c.opcode(), c.known_cdb) {
            tab[0x40] = ATAPI_OPS[usize::from(i) % ATAPI_OPS.len()];
        }
        let entries: Vec<_> = c.prdt.iter().take(56).collect();
        for (addr, dbc, i) in &entries {
            let a = steer(*addr);
            let dw3 = (dbc & 0x003f_ffff) | (u32::from(*i) << 31);
            tab.extend_from_slice(&(a as u32).to_le_bytes());
            tab.extend_from_slice(&((a >> 32) as u32).to_le_bytes());
            tab.extend_from_slice(&0u32.to_le_bytes());
            tab.extend_from_slice(&dw3.to_le_bytes());
        }
        let _ = self.mem.write_slice(&tab, GuestAddress(t));
        let prdtl = c.prdtl.unwrap_or(entries.len() as u16);
        if usize::from(prdtl) > entries.len() {
            self.strict = false;
        }
        let cfl = u16::from(c.cfl % 32).max(2);
        let dw0 = u32::from((c.flags & !0x1f) | cfl) | (u32::from(prdtl) << 16);
        let mut hdr = [0u8; 32];
        hdr[0..4].copy_from_slice(&dw0.to_le_bytes());
        hdr[8..12].copy_from_slice(&(t as u32).to_le_bytes());
        let _ = self
            .mem
            .write_slice(&hdr, GuestAddress(clb(p) + u64::from(slot) * 32));
    }

    fn issue(&mut self, p: usize, cmds: &[(u8, Cmd)]) {
        if !self.running[p] {
            return;
        }
        let busy = self.pr(p, preg::CI) | self.pr(p, preg::SACT);
        self.queued[p] &= self.pr(p, preg::SACT);
        let (mut ci, mut sact) = (0u32, 0u32);
        for (slot, c) in cmds.iter().take(32) {
            let slot = slot % 32;
            let bit = 1u32 << slot;
            if (busy | ci) & bit != 0 {
                continue;
            }
            self.build(p, slot, c);
            ci |= bit;
            if c.ncq {
                sact |= bit;
                let is_queued = matches!(c.opcode(), 0x60 | 0x61 | 0x63 | 0x64 | 0x65);
                if is_queued && p == 0 && c.fis_type.is_none() {
                    self.queued[p] |= bit;
                }
            }
        }
        if sact != 0 {
            self.pw(p, preg::SACT, sact);
        }
        if ci != 0 {
            self.pw(p, preg::CI, ci);
            self.issued[p] |= ci;
        }
    }

    /// Every issued command completes, or the port stops with an error, in bounded time.
    fn wait(&mut self, p: usize) {
        if !self.running[p] || self.failed[p] || !self.bus_master() {
            return; // nothing to wait for, or the guest fenced the HBA (Bus Master Enable off)
        }
        let failed = std::cell::Cell::new(false);
        // Generous, as for NVMe: a loaded machine may not run the I/O thread for a while.
        let settled = self.until(crate::MAX_OP_WALL, |h| {
            let is = h.pr(p, preg::IS);
            h.pw(p, preg::IS, is);
            h.w(hba::IS, 4, 1 << p);
            if is & pxis::FATAL != 0 || h.pr(p, preg::TFD) & 0x01 != 0 {
                failed.set(true);
            }
            (h.pr(p, preg::CI) | (h.pr(p, preg::SACT) & h.queued[p])) == 0
                || failed.get()
                || h.pr(p, preg::CMD) & pxcmd::ST == 0
        });
        self.failed[p] = failed.get();
        assert!(
            settled,
            "port {p}: commands CI {:#x} SACT {:#x} neither completed nor failed (TFD {:#x}, \
             IS {:#x}, CMD {:#x}, SSTS {:#x}, SERR {:#x}, GHC {:#x})",
            self.pr(p, preg::CI),
            self.pr(p, preg::SACT),
            self.pr(p, preg::TFD),
            self.pr(p, preg::IS),
            self.pr(p, preg::CMD),
            self.pr(p, preg::SSTS),
            self.pr(p, preg::SERR),
            self.r(hba::GHC, 4),
        );
    }

    fn recover(&mut self, p: usize) {
        let c = self.pr(p, preg::CMD);
        self.pw(p, preg::CMD, c & !pxcmd::ST);
        let stopped = self.until(crate::MAX_OP_WALL, |h| h.pr(p, preg::CMD) & pxcmd::CR == 0);
        assert!(
            stopped,
            "port {p}: command list never stopped (PxCMD.CR stuck)"
        );
        self.pw(p, preg::SERR, u32::MAX);
        self.pw(p, preg::IS, u32::MAX);
        self.w(hba::IS, 4, u64::from(u32::MAX));
        self.issued[p] = 0;
        self.failed[p] = false;
        self.queued[p] = 0;
        // Restart only a port the harness set up (its lists, FIS receive on), as Linux does.
        let ours = self.running[p] && self.pr(p, preg::CMD) & pxcmd::FRE != 0;
        if ours && self.pr(p, preg::TFD) & 0x89 == 0 {
            let c = self.pr(p, preg::CMD);
            self.pw(p, preg::CMD, c | pxcmd::ST);
            self.running[p] = true;
        } else {
            self.running[p] = false;
        }
    }

    fn step(&mut self, op: &Op) {
        if std::env::var_os("FUZZ_TRACE").is_some() {
            eprintln!(
                "before {op:?}: CI {:#x} IS {:#x} CMD {:#x} SERR {:#x} TFD {:#x}",
                self.pr(1, preg::CI),
                self.pr(1, preg::IS),
                self.pr(1, preg::CMD),
                self.pr(1, preg::SERR),
                self.pr(1, preg::TFD)
            );
        }
        match op {
            Op::Start => self.start(),
            Op::Issue { port, slot, cmd } => {
                self.issue(usize::from(*port) % PORTS, &[(*slot, cmd.clone())])
            }
            Op::Batch { port, cmds } => self.issue(usize::from(*port) % PORTS, cmds),
            Op::Reg {
                off,
                width: w,
                value,
            } => {
                let off =
                    u64::from(*off) % (hba::PORT_BASE + PORTS as u64 * hba::PORT_STRIDE + 0x100);
                // The harness no longer knows what the ports run with.
                if off >= hba::PORT_BASE || off == hba::GHC {
                    self.running = [false; PORTS];
                }
                // List and FIS bases stay in the window, however a write landed (any width, any
                // byte of the two 64-bit registers), and also after an HBA reset zeroed them:
                // a raw PxCMD write turning FRE on would otherwise have the port post its FISes
                // at guest address 0, which the guest named but the canary does not know.
                self.steer_bases();
                self.w(off, width(*w), *value);
                self.steer_bases();
            }
            Op::RegRead { off, width: w } => {
                self.r(u64::from(*off) % 0x200, width(*w));
            }
            Op::Cfg {
                off,
                width: w,
                value,
            } => {
                self.cfg_write(*off % 0x1000, width(*w).min(4), *value);
            }
            Op::Poke { off, bytes } => {
                let len = (RAM_END - WINDOW) as usize;
                let off = (*off as usize % len) & !7;
                let mut v: Vec<u8> = bytes.iter().take(len - off).copied().collect();
                v.resize(v.len().div_ceil(8) * 8, 0);
                v.truncate(len - off);
                crate::steer_words(&mut v);
                let _ = self.mem.write_slice(&v, GuestAddress(WINDOW + off as u64));
            }
            Op::Wait { port } => self.wait(usize::from(*port) % PORTS),
            Op::Recover { port } => self.recover(usize::from(*port) % PORTS),
        }
    }
}
