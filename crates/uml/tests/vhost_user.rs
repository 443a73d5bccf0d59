//! End to end over a real vhost-user socket: rust-vmm's `Frontend` plays UML (same message order,
//! NEED_REPLY on everything, memory table shaped like UML's), and a tiny split-ring driver in this
//! file plays virt-pci on the two virtqueues.

mod common;

use common::scratch::{self, Scratch};
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use uml::msg::{self, MsgHeader};
use uml::{UmlContext, UmlDevice};
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempdir::TempDir;

/// UML's region starts after the kernel image; mmap_offset == guest_addr == user_addr.
const BASE: u64 = 0x92a000;
const SIZE: u64 = 0x100000;
const QSIZE: u16 = 256;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

/// Driver side of one split virtqueue.
struct DrvQueue {
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    last_used: u16,
    kick: EventFd,
    call: EventFd,
}

impl DrvQueue {
    fn new(index: u64) -> Self {
        let base = BASE + index * 0x10000;
        DrvQueue {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            next_desc: 0,
            avail_idx: 0,
            last_used: 0,
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            call: EventFd::new(EFD_NONBLOCK).unwrap(),
        }
    }

    fn config(&self) -> VringConfigData {
        VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: self.desc,
            used_ring_addr: self.used,
            avail_ring_addr: self.avail,
            log_addr: None,
        }
    }

    /// Post a chain of (addr, len, device-writable) buffers; returns the head index.
    fn add(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, w)) in bufs.iter().enumerate() {
            let idx = (self.next_desc + i as u16) % QSIZE;
            let d = self.desc + 16 * u64::from(idx);
            let mut flags = if w { DESC_F_WRITE } else { 0 };
            let last = i + 1 == bufs.len();
            if !last {
                flags |= DESC_F_NEXT;
            }
            mem.write_obj(addr, GuestAddress(d)).unwrap();
            mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            mem.write_obj((idx + 1) % QSIZE, GuestAddress(d + 14))
                .unwrap();
        }
        self.next_desc = (self.next_desc + bufs.len() as u16) % QSIZE;
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        fence(Ordering::SeqCst);
        head
    }

    fn kick(&self) {
        self.kick.write(1).unwrap();
    }

    fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        fence(Ordering::SeqCst);
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Busy-poll the used ring like virt-pci does; returns (id, len).
    fn wait_used(&mut self, mem: &GuestMemoryMmap) -> (u16, u32) {
        let t0 = Instant::now();
        while self.used_idx(mem) == self.last_used {
            assert!(t0.elapsed() < Duration::from_secs(5), "no completion");
            thread::yield_now();
        }
        let e = self.used + 4 + 8 * u64::from(self.last_used % QSIZE);
        self.last_used = self.last_used.wrapping_add(1);
        let id: u32 = mem.read_obj(GuestAddress(e)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(e + 4)).unwrap();
        (id as u16, len)
    }
}

/// A fake UML: vhost-user front-end plus virt-pci's two queues.
struct FakeUml {
    fe: Frontend,
    mem: GuestMemoryMmap,
    cmd: DrvQueue,
    irq: DrvQueue,
    /// Our end of the back-end request channel; UML unplugs the device if it sees EOF here.
    backend_req: UnixStream,
    /// The memory file (UML's physmem).
    file: std::fs::File,
}

const CMD_OUT: u64 = BASE + 0x40000;
const CMD_EXTRA: u64 = BASE + 0x41000;
const CMD_IN: u64 = BASE + 0x42000;
const IRQ_BUFS: u64 = BASE + 0x50000;

impl FakeUml {
    fn connect(path: &std::path::Path, dir: &TempDir) -> Self {
        Self::connect_sized(path, dir, BASE + SIZE).expect("SET_MEM_TABLE accepted")
    }

    /// Connect with a memory file of `file_len` bytes (the table always says BASE + SIZE).
    fn connect_sized(
        path: &std::path::Path,
        dir: &TempDir,
        file_len: u64,
    ) -> Result<Self, vhost::Error> {
        // UML's physmem file: the shared region starts at offset BASE.
        let file_path = dir.as_path().join("physmem");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&file_path)
            .unwrap();
        file.set_len(file_len).unwrap();
        let mem = GuestMemoryMmap::from_ranges_with_files(&[(
            GuestAddress(BASE),
            SIZE as usize,
            Some(FileOffset::new(file.try_clone().unwrap(), BASE)),
        )])
        .unwrap();

        let mut fe = Frontend::connect(path, 2).unwrap();
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        fe.set_owner().unwrap();
        let features = fe.get_features().unwrap();
        assert_eq!(
            features,
            (1 << 32) | (1 << 30),
            "VERSION_1 | PROTOCOL_FEATURES only"
        );
        let proto = fe.get_protocol_features().unwrap();
        assert_eq!(
            proto,
            VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::BACKEND_REQ
        );
        fe.set_protocol_features(proto).unwrap();
        let (backend_req, theirs) = UnixStream::pair().unwrap();
        fe.set_backend_request_fd(&theirs).unwrap();
        fe.set_features(features).unwrap();
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: BASE,
            memory_size: SIZE,
            userspace_addr: BASE,
            mmap_offset: BASE,
            mmap_handle: file.as_raw_fd(),
        };
        fe.set_mem_table(&[region])?;

        let cmd = DrvQueue::new(0);
        let irq = DrvQueue::new(1);
        for (i, q) in [&cmd, &irq].into_iter().enumerate() {
            fe.set_vring_call(i, &q.call).unwrap();
            fe.set_vring_num(i, QSIZE).unwrap();
            fe.set_vring_base(i, 0).unwrap();
            fe.set_vring_addr(i, &q.config()).unwrap();
        }
        for (i, q) in [&cmd, &irq].into_iter().enumerate() {
            fe.set_vring_kick(i, &q.kick).unwrap();
            fe.set_vring_enable(i, true).unwrap();
        }
        Ok(FakeUml {
            fe,
            mem,
            cmd,
            irq,
            backend_req,
            file,
        })
    }

    fn hdr(op: u8, bar: u8, size: u32, addr: u64) -> [u8; 16] {
        MsgHeader {
            op,
            bar,
            size,
            addr,
        }
        .encode()
    }

    /// A non-posted read: returns (used len, reply bytes).
    fn read(&mut self, op: u8, bar: u8, size: u32, addr: u64, room: u32) -> (u32, Vec<u8>) {
        self.mem
            .write_slice(&Self::hdr(op, bar, size, addr), GuestAddress(CMD_OUT))
            .unwrap();
        self.mem
            .write_slice(&vec![0u8; room as usize], GuestAddress(CMD_IN))
            .unwrap();
        let head = self
            .cmd
            .add(&self.mem, &[(CMD_OUT, 16, false), (CMD_IN, room, true)]);
        self.cmd.kick();
        let (id, len) = self.cmd.wait_used(&self.mem);
        assert_eq!(id, head);
        let mut out = vec![0u8; room as usize];
        self.mem.read_slice(&mut out, GuestAddress(CMD_IN)).unwrap();
        (len, out)
    }

    fn cfg_read(&mut self, off: u64, size: u32) -> u64 {
        let (len, out) = self.read(msg::OP_CFG_READ, 0, size, off, 8);
        assert_eq!(len, size);
        u64::from_le_bytes(out.try_into().unwrap()) & (u64::MAX >> (64 - 8 * size))
    }

    /// A posted write; like um_pci_cfgspace_write the message is always 24 bytes. Waits for the
    /// completion only so the test can check it.
    fn posted(&mut self, op: u8, bar: u8, size: u32, addr: u64, data: &[u8], extra: bool) -> u32 {
        let h = Self::hdr(op, bar, size, addr);
        let mut bufs = Vec::new();
        if extra {
            self.mem.write_slice(&h, GuestAddress(CMD_OUT)).unwrap();
            self.mem.write_slice(data, GuestAddress(CMD_EXTRA)).unwrap();
            bufs.push((CMD_OUT, 16, false));
            bufs.push((CMD_EXTRA, data.len() as u32, false));
        } else {
            let mut m = h.to_vec();
            m.extend_from_slice(data);
            self.mem.write_slice(&m, GuestAddress(CMD_OUT)).unwrap();
            bufs.push((CMD_OUT, m.len() as u32, false));
        }
        let head = self.cmd.add(&self.mem, &bufs);
        self.cmd.kick();
        let (id, len) = self.cmd.wait_used(&self.mem);
        assert_eq!(id, head);
        len
    }

    fn cfg_write(&mut self, off: u64, size: u32, val: u64) {
        let len = self.posted(msg::OP_CFG_WRITE, 0, size, off, &val.to_le_bytes(), false);
        assert_eq!(len, 0);
    }

    fn post_irq_buffers(&mut self, n: u64) {
        for i in 0..n {
            self.irq.add(&self.mem, &[(IRQ_BUFS + 32 * i, 20, true)]);
        }
        self.irq.kick();
    }

    /// Next OP_MSI message: (addr, data).
    fn next_msi(&mut self) -> (u64, u32) {
        let (id, len) = self.irq.wait_used(&self.mem);
        assert_eq!(len, 20);
        let mut m = [0u8; 20];
        let d = self.irq.desc + 16 * u64::from(id);
        let addr: u64 = self.mem.read_obj(GuestAddress(d)).unwrap();
        self.mem.read_slice(&mut m, GuestAddress(addr)).unwrap();
        let h = MsgHeader::parse(&m).unwrap();
        assert_eq!((h.op, h.size), (msg::OP_MSI, 4));
        (h.addr, u32::from_le_bytes(m[16..20].try_into().unwrap()))
    }
}

struct Server {
    thread: JoinHandle<uml::Result<()>>,
    stop: uml::StopHandle,
    device: Arc<Scratch>,
    ctx: UmlContext,
    counters: Arc<uml::Counters>,
}

fn start(path: &std::path::Path) -> Server {
    let ctx = UmlContext::new();
    let device = Arc::new(Scratch::new(ctx.device_context().irq));
    let listener = UnixListener::bind(path).unwrap();
    let server =
        UmlDevice::new(listener, device.clone(), ctx.mem.clone(), ctx.irq.clone()).unwrap();
    let stop = server.stop_handle();
    let counters = server.counters();
    let thread = thread::spawn(move || server.run());
    Server {
        thread,
        stop,
        device,
        ctx,
        counters,
    }
}

fn join_within(t: JoinHandle<uml::Result<()>>, d: Duration) -> uml::Result<()> {
    let t0 = Instant::now();
    while !t.is_finished() {
        assert!(t0.elapsed() < d, "server did not return");
        thread::sleep(Duration::from_millis(10));
    }
    t.join().unwrap()
}

#[test]
fn uml_like_session() {
    let dir = TempDir::new().unwrap();
    let path = dir.as_path().join("dev.sock");
    let server = start(&path);
    let mut uml = FakeUml::connect(&path, &dir);

    // The device sees guest memory as soon as SET_MEM_TABLE is through.
    {
        use vm_memory::GuestAddressSpace;
        let m = server.ctx.mem.memory();
        let v: u32 = m.read_obj(GuestAddress(BASE + 0x7000)).unwrap();
        assert_eq!(v, 0);
        uml.mem
            .write_obj(0x1234_5678u32, GuestAddress(BASE + 0x7000))
            .unwrap();
        let v: u32 = m.read_obj(GuestAddress(BASE + 0x7000)).unwrap();
        assert_eq!(v, 0x1234_5678);
    }

    // IDs, 8-byte config read.
    assert_eq!(
        uml.cfg_read(0, 4),
        u64::from(scratch::VENDOR) | u64::from(scratch::DEVICE) << 16
    );
    assert_eq!(uml.cfg_read(0, 2), u64::from(scratch::VENDOR));
    assert_eq!(uml.cfg_read(2, 2), u64::from(scratch::DEVICE));
    assert_eq!(
        uml.cfg_read(0, 8) & 0xffff_ffff,
        u64::from(scratch::VENDOR) | u64::from(scratch::DEVICE) << 16
    );

    // BAR sizing the way Linux does it.
    uml.cfg_write(0x10, 4, 0xffff_ffff);
    assert_eq!(uml.cfg_read(0x10, 4), 0xffff_f000);
    uml.cfg_write(0x10, 4, 0xf000_0000);
    assert_eq!(uml.cfg_read(0x10, 4), 0xf000_0000);
    uml.cfg_write(0x4, 2, 0x0006);
    assert_eq!(uml.cfg_read(0x4, 2) & 0x6, 0x6);

    // MMIO write with the data in a separate descriptor, then read back.
    let len = uml.posted(
        msg::OP_MMIO_WRITE,
        0,
        4,
        0x20,
        &0xdead_beefu32.to_le_bytes(),
        true,
    );
    assert_eq!(len, 0);
    let (len, out) = uml.read(msg::OP_MMIO_READ, 0, 4, 0x20, 4);
    assert_eq!((len, &out[..]), (4, &0xdead_beefu32.to_le_bytes()[..]));
    // memcpy_fromio-sized read.
    let (len, out) = uml.read(msg::OP_MMIO_READ, 0, 64, 0x40, 64);
    assert_eq!(len, 64);
    assert_eq!(out, (0x40..0x80).collect::<Vec<u8>>());
    // memset_io quirk: op 2 with bar set... BAR 0 with a 16-byte count is a memset too.
    uml.posted(
        msg::OP_CFG_WRITE,
        0,
        16,
        0x200,
        &[0x5a, 0, 0, 0, 0, 0, 0, 0],
        false,
    );
    let (_, out) = uml.read(msg::OP_MMIO_READ, 0, 17, 0x200, 17);
    assert_eq!(&out[..16], &[0x5a; 16]);
    assert_eq!(out[16], 0x10);

    // Posted completions are signalled on the cmd call fd, batched: once a quarter of the
    // ring is used and unseen (UML frees posted-write buffers when it sees them).
    let _ = uml.cmd.call.read();
    for i in 0..usize::from(QSIZE / 4) {
        uml.posted(
            msg::OP_MMIO_WRITE,
            0,
            4,
            0x20,
            &(i as u32).to_le_bytes(),
            false,
        );
    }
    // The signal follows the used entry the write's completion was seen by: wait for it.
    let t0 = Instant::now();
    while uml.cmd.call.read().is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "no used-ring signal after a quarter ring of posted writes"
        );
        thread::yield_now();
    }

    // Malformed: unknown op, short header, oversize read. All complete, len 0, reply all-ones.
    let (len, out) = uml.read(42, 0, 4, 0, 8);
    assert_eq!((len, out), (0, vec![0xff; 8]));
    let (len, out) = uml.read(msg::OP_MMIO_READ, 0, 0x1000_0000, 0, 8);
    assert_eq!((len, out), (0, vec![0xff; 8]));
    let head = uml
        .cmd
        .add(&uml.mem, &[(CMD_OUT, 8, false), (CMD_IN, 8, true)]);
    uml.cmd.kick();
    assert_eq!(uml.cmd.wait_used(&uml.mem), (head, 0));
    // Still alive afterwards.
    assert_eq!(uml.cfg_read(0, 2), u64::from(scratch::VENDOR));

    // An MSI raised before UML posted irq buffers waits; identical ones merge.
    let ring = |uml: &mut FakeUml, v: u32| {
        uml.posted(
            msg::OP_MMIO_WRITE,
            0,
            4,
            scratch::DOORBELL,
            &v.to_le_bytes(),
            false,
        )
    };
    ring(&mut uml, 65);
    ring(&mut uml, 66);
    ring(&mut uml, 65);
    assert_eq!(uml.irq.used_idx(&uml.mem), 0);
    uml.post_irq_buffers(1);
    assert_eq!(uml.next_msi(), (scratch::MSI_ADDR, 65));
    // The second waits for the next buffer, which arrives with a kick.
    thread::sleep(Duration::from_millis(20));
    assert_eq!(uml.irq.used_idx(&uml.mem), 1);
    uml.post_irq_buffers(4);
    assert_eq!(uml.next_msi(), (scratch::MSI_ADDR, 66));
    // With buffers available, an MSI goes out immediately, from any thread.
    ring(&mut uml, 67);
    assert_eq!(uml.next_msi(), (scratch::MSI_ADDR, 67));
    let irq = server.ctx.irq.clone();
    thread::spawn(move || {
        pci::InterruptSink::msi(
            &*irq,
            pci::MsiMessage {
                addr: scratch::MSI_ADDR,
                data: 68,
            },
        )
    })
    .join()
    .unwrap();
    assert_eq!(uml.next_msi(), (scratch::MSI_ADDR, 68));
    assert!(uml.irq.call.read().unwrap() > 0);

    // The back-end kept its end of the request channel open (EOF would unplug the device).
    uml.backend_req.set_nonblocking(true).unwrap();
    let e = std::io::Read::read(&mut uml.backend_req, &mut [0u8; 8]).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);

    // Shutdown as UML does it: disable rings in reverse, GET_FEATURES barrier, close.
    uml.fe.set_vring_enable(1, false).unwrap();
    uml.fe.set_vring_enable(0, false).unwrap();
    uml.fe.get_features().unwrap();
    drop(uml);
    join_within(server.thread, Duration::from_secs(5)).unwrap();
    assert!(
        server
            .device
            .bar_writes
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 6
    );
}

#[test]
fn stop_before_uml_connects() {
    let dir = TempDir::new().unwrap();
    let server = start(&dir.as_path().join("dev.sock"));
    thread::sleep(Duration::from_millis(20));
    server.stop.stop();
    join_within(server.thread, Duration::from_secs(5)).unwrap();
}

#[test]
fn stop_while_connected() {
    let dir = TempDir::new().unwrap();
    let path = dir.as_path().join("dev.sock");
    let server = start(&path);
    let mut uml = FakeUml::connect(&path, &dir);
    assert_eq!(uml.cfg_read(0, 2), u64::from(scratch::VENDOR));
    server.stop.stop();
    join_within(server.thread, Duration::from_secs(5)).unwrap();
    // UML sees the connection go away.
    assert!(uml.fe.get_features().is_err());
}

/// A memory table whose region reaches past the end of its file is refused (a failed REPLY_ACK)
/// instead of mapped: the first access to the unbacked part would raise SIGBUS.
#[test]
fn mem_table_past_the_end_of_its_file_is_refused() {
    let dir = TempDir::new().unwrap();
    let path = dir.as_path().join("dev.sock");
    let server = start(&path);
    let refused = FakeUml::connect_sized(&path, &dir, BASE + SIZE / 2);
    assert!(
        refused.is_err(),
        "a table past the end of its file was accepted"
    );
    {
        use vm_memory::GuestAddressSpace;
        let m = server.ctx.mem.memory();
        assert!(
            m.read_obj::<u32>(GuestAddress(BASE)).is_err(),
            "the device got the refused memory"
        );
    }
    server.stop.stop();
    let _ = join_within(server.thread, Duration::from_secs(5));
}

/// The peer shrinks its memory file after SET_MEM_TABLE. The device's next access to a page
/// past the new end raised SIGBUS and killed the process (and every other device in it). Now
/// that page is lost instead: the access reads zeros, the loss is counted, and the device stops
/// executing that peer's commands; the process lives on.
#[test]
fn memory_file_truncated_under_the_device_loses_pages_not_the_process() {
    let dir = TempDir::new().unwrap();
    let path = dir.as_path().join("dev.sock");
    let server = start(&path);
    let mut uml = FakeUml::connect(&path, &dir);
    assert_eq!(uml.cfg_read(0, 2), u64::from(scratch::VENDOR));
    // A posted write whose data sits in the last page, which the peer then cuts off.
    let far = BASE + SIZE - 0x1000;
    uml.mem
        .write_slice(&0x1234_5678u32.to_le_bytes(), GuestAddress(far))
        .unwrap();
    uml.file.set_len(BASE + SIZE / 2).unwrap();
    uml.mem
        .write_slice(
            &FakeUml::hdr(msg::OP_MMIO_WRITE, 0, 4, 0x20),
            GuestAddress(CMD_OUT),
        )
        .unwrap();
    let head = uml
        .cmd
        .add(&uml.mem, &[(CMD_OUT, 16, false), (far, 4, false)]);
    uml.cmd.kick();
    assert_eq!(uml.cmd.wait_used(&uml.mem).0, head);
    // The process is alive; the device refuses to run anything more for this peer.
    let (len, _) = uml.read(msg::OP_CFG_READ, 0, 2, 0, 8);
    assert_eq!(len, 0, "a command ran after guest memory was lost");
    assert_eq!(server.counters.memory_faults.load(Ordering::Relaxed), 1);
    server.stop.stop();
    let _ = join_within(server.thread, Duration::from_secs(5));
}
