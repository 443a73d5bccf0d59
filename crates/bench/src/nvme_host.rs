//! A polling NVMe host for the in-process benchmark: it brings the controller up through its
//! registers the way the Linux driver does, then keeps a fixed number of commands in flight on
//! one I/O queue pair, ringing each doorbell once per batch and reaping completions by phase
//! bit. Interrupts go to a counting sink (nobody waits for them).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nvme::spec::{Cqe, Sqe};
use pci::{DeviceContext, GuestMem, PciDevice, SlotSpec};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryMmap};

use crate::workload::{Counting, Rng, Workload};

const ASQ: u64 = 0x10_000;
const ACQ: u64 = 0x20_000;
const ADMIN: u32 = 32;
const IOSQ: u64 = 0x100_000;
const IOCQ: u64 = 0x200_000;
const QSIZE: u32 = 256;
const BUFS: u64 = 0x1000_0000;
const LISTS: u64 = 0x0800_0000;
/// Guest RAM of the benchmark host.
pub const MEM: usize = 512 << 20;

/// The host and its controller.
pub struct NvmeHost {
    dev: Box<dyn PciDevice>,
    mem: Arc<GuestMemoryMmap>,
    pub irq: Arc<Counting>,
    sq_tail: u32,
    cq_head: u32,
    phase: bool,
    admin_tail: u32,
    admin_head: u32,
    admin_phase: bool,
    cid: u16,
    /// Namespace size in 512-byte blocks.
    blocks: u64,
}

fn sqe(opcode: u8, nsid: u32) -> Sqe {
    Sqe {
        cdw0: u32::from(opcode),
        nsid,
        ..Default::default()
    }
}

impl NvmeHost {
    /// Build the controller from `-s` text (e.g. `4,nvme,ram=512`) and bring it up with one
    /// I/O queue pair of 256 entries.
    pub fn new(spec: &str) -> Result<NvmeHost> {
        let mem = GuestMem::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)])?);
        let irq = Arc::new(Counting::default());
        let ctx = DeviceContext {
            mem: mem.clone(),
            irq: irq.clone(),
            intx_supported: false,
        };
        let dev = nvme::create(&SlotSpec::parse(spec)?, &ctx).context("nvme")?;
        let mut h = NvmeHost {
            dev,
            mem: mem.memory().into_inner(),
            irq,
            sq_tail: 0,
            cq_head: 0,
            phase: true,
            admin_tail: 0,
            admin_head: 0,
            admin_phase: true,
            cid: 0,
            blocks: 0,
        };
        h.bring_up()?;
        Ok(h)
    }

    fn w32(&self, off: u64, v: u32) {
        self.dev.bar_write(0, off, &v.to_le_bytes());
    }

    fn r32(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.bar_read(0, off, &mut b);
        u32::from_le_bytes(b)
    }

    fn bring_up(&mut self) -> Result<()> {
        self.dev.config_write(4, &6u16.to_le_bytes());
        // MSI-X: every vector programmed and unmasked, then enabled (cap found by walking).
        let mut p = [0u8];
        self.dev.config_read(0x34, &mut p);
        let mut cap = u16::from(p[0]);
        while cap != 0 {
            let mut id = [0u8; 2];
            self.dev.config_read(cap, &mut id);
            if id[0] == 0x11 {
                break;
            }
            cap = u16::from(id[1]);
        }
        if cap == 0 {
            bail!("no MSI-X capability");
        }
        for v in 0..2u64 {
            let e = [0xfee0_0000u32, 0, v as u32, 0];
            for (i, w) in e.iter().enumerate() {
                self.dev
                    .bar_write(4, v * 16 + i as u64 * 4, &w.to_le_bytes());
            }
        }
        self.dev.config_write(cap + 2, &(1u16 << 15).to_le_bytes());
        self.w32(0x24, ((ADMIN - 1) << 16) | (ADMIN - 1));
        self.dev.bar_write(0, 0x28, &ASQ.to_le_bytes());
        self.dev.bar_write(0, 0x30, &ACQ.to_le_bytes());
        self.w32(0x14, 0x0046_0001);
        let t = Instant::now();
        while self.r32(0x1c) & 1 == 0 {
            if t.elapsed() > Duration::from_secs(5) {
                bail!("controller not ready");
            }
        }
        let mut c = sqe(0x05, 0); // Create I/O CQ 1, vector 1
        c.dptr[0] = IOCQ;
        c.cdw10 = ((QSIZE - 1) << 16) | 1;
        c.cdw11 = (1 << 16) | 3;
        self.admin(c)?;
        let mut s = sqe(0x01, 0); // Create I/O SQ 1 on CQ 1
        s.dptr[0] = IOSQ;
        s.cdw10 = ((QSIZE - 1) << 16) | 1;
        s.cdw11 = (1 << 16) | 1;
        self.admin(s)?;
        let mut id = sqe(0x06, 1); // Identify Namespace 1
        id.dptr[0] = BUFS;
        self.admin(id)?;
        let nsze: u64 = self.mem.read_obj(GuestAddress(BUFS))?;
        let lbaf = self.mem.read_obj::<u8>(GuestAddress(BUFS + 26))? & 0xf;
        let ds = self
            .mem
            .read_obj::<u8>(GuestAddress(BUFS + 128 + 4 * u64::from(lbaf) + 2))?;
        self.blocks = nsze << (ds - 9);
        Ok(())
    }

    fn admin(&mut self, mut s: Sqe) -> Result<()> {
        s.cdw0 |= 0xa000 << 16;
        let a = ASQ + u64::from(self.admin_tail) * 64;
        self.mem
            .write_slice(zerocopy::IntoBytes::as_bytes(&s), GuestAddress(a))?;
        self.admin_tail = (self.admin_tail + 1) % ADMIN;
        self.w32(0x1000, self.admin_tail);
        let t = Instant::now();
        loop {
            let c: Cqe = read_cqe(&self.mem, ACQ + u64::from(self.admin_head) * 16)?;
            if (c.status & 1 == 1) == self.admin_phase {
                self.admin_head = (self.admin_head + 1) % ADMIN;
                if self.admin_head == 0 {
                    self.admin_phase = !self.admin_phase;
                }
                self.w32(0x1004, self.admin_head);
                if c.status >> 1 != 0 {
                    bail!(
                        "admin command {:#x} failed: {:#x}",
                        s.cdw0 & 0xff,
                        c.status >> 1
                    );
                }
                return Ok(());
            }
            if t.elapsed() > Duration::from_secs(5) {
                bail!("admin command timed out");
            }
        }
    }

    /// Place command number `slot` of the workload on the SQ (no doorbell).
    fn queue(&mut self, w: &Workload, slot: u16, rng: &mut Rng) -> Result<()> {
        let nlb = (w.bs / 512) as u32;
        let lba = w.next_offset(rng, slot, self.blocks * 512) / 512;
        let buf = BUFS + u64::from(slot) * w.bs;
        let mut s = sqe(if w.write { 0x01 } else { 0x02 }, 1);
        self.cid = self.cid.wrapping_add(1);
        s.cdw0 |= u32::from(slot) << 16;
        s.dptr[0] = buf;
        if w.bs > 8192 {
            // A PRP list per slot: pages 1.. of its buffer.
            let list = LISTS + u64::from(slot) * 4096;
            s.dptr[1] = list;
        } else if w.bs > 4096 {
            s.dptr[1] = buf + 4096;
        }
        s.cdw10 = lba as u32;
        s.cdw11 = (lba >> 32) as u32;
        s.cdw12 = nlb - 1;
        let a = IOSQ + u64::from(self.sq_tail) * 64;
        self.mem
            .write_slice(zerocopy::IntoBytes::as_bytes(&s), GuestAddress(a))?;
        self.sq_tail = (self.sq_tail + 1) % QSIZE;
        Ok(())
    }

    fn prepare(&mut self, w: &Workload) -> Result<()> {
        if w.bs > 8192 {
            for slot in 0..w.qd as u64 {
                let buf = BUFS + slot * w.bs;
                let entries: Vec<u8> = (1..w.bs / 4096)
                    .flat_map(|p| (buf + p * 4096).to_le_bytes())
                    .collect();
                self.mem
                    .write_slice(&entries, GuestAddress(LISTS + slot * 4096))?;
            }
        }
        Ok(())
    }

    /// Run `w` for `secs`; returns completed commands.
    pub fn run(&mut self, w: &Workload, secs: f64) -> Result<u64> {
        self.prepare(w)?;
        let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
        for slot in 0..w.qd as u16 {
            self.queue(w, slot, &mut rng)?;
        }
        self.w32(0x1008, self.sq_tail);
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        let (mut done, mut inflight, mut spins) = (0u64, w.qd as u64, 0u32);
        let mut running = true;
        while inflight > 0 {
            let seen = self.irq.seen();
            let mut reaped = 0;
            loop {
                let c = read_cqe(&self.mem, IOCQ + u64::from(self.cq_head) * 16)?;
                if (c.status & 1 == 1) != self.phase {
                    break;
                }
                if c.status >> 1 != 0 {
                    bail!("I/O failed: status {:#x}", c.status >> 1);
                }
                self.cq_head = (self.cq_head + 1) % QSIZE;
                if self.cq_head == 0 {
                    self.phase = !self.phase;
                }
                reaped += 1;
                done += 1;
                inflight -= 1;
                if running {
                    self.queue(w, c.cid, &mut rng)?;
                    inflight += 1;
                }
            }
            if reaped > 0 {
                self.w32(0x100c, self.cq_head);
                if running {
                    self.w32(0x1008, self.sq_tail);
                }
                spins = spins.wrapping_add(1);
                if spins % 64 == 0 && Instant::now() >= deadline {
                    running = false;
                }
            } else {
                self.irq.wait(seen, Duration::from_millis(1));
                if Instant::now() >= deadline + Duration::from_secs(10) {
                    bail!("{inflight} commands never completed");
                }
                if running && Instant::now() >= deadline {
                    running = false;
                }
            }
        }
        Ok(done)
    }

    /// Flush and quiesce.
    pub fn shutdown(&self) {
        self.dev.shutdown();
    }
}

/// The fields of a CQE the host needs (CID, status with phase), all in DW3: one load, so a
/// new phase can never come with a stale CID.
fn read_cqe(mem: &GuestMemoryMmap, addr: u64) -> Result<Cqe> {
    let dw3: u32 = mem.read_obj(GuestAddress(addr + 12))?;
    Ok(Cqe {
        cid: dw3 as u16,
        status: (dw3 >> 16) as u16,
        ..Default::default()
    })
}
