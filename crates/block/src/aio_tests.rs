//! Engine tests: the io_uring and thread-pool paths move the same bytes, and map the same
//! errors (EIO, ENOSPC, end of file, read-only, out of range).

use std::fs::File;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::testutil::TempFile;
use crate::{BackendInfo, BlockBackend, GuestIov, Ram, RawFile, RawFileOptions};

fn mem() -> Arc<GuestMemoryMmap> {
    Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap())
}

fn engines() -> Vec<Engine> {
    let pool = Arc::new(Executor::new(2, "t-aio"));
    let u = Engine::new(EngineKind::IoUring, 64, pool.clone()).unwrap();
    assert_eq!(
        u.kind(),
        EngineKind::IoUring,
        "io_uring must work on this host"
    );
    vec![u, Engine::new(EngineKind::Threads, 64, pool).unwrap()]
}

fn iov(m: &Arc<GuestMemoryMmap>, ranges: &[(u64, u64)]) -> GuestIov {
    let mut v = GuestIov::new();
    v.set_memory(m.clone());
    for &(a, l) in ranges {
        v.push_guest(a, l).unwrap();
    }
    v
}

/// Submit, commit and reap until `n` requests are back (or fail the test after 10 s).
fn run(e: &Engine, reqs: Vec<IoReq>) -> Vec<IoDone> {
    let n = reqs.len();
    for r in reqs {
        e.submit(r);
    }
    e.commit();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while out.len() < n {
        e.reap(&mut out);
        assert!(Instant::now() < deadline, "requests never completed");
        std::thread::sleep(Duration::from_micros(50));
    }
    out.sort_by_key(|d| d.req.tag);
    out
}

fn req(tag: u64, op: Op, offset: u64, iov: GuestIov, b: &Arc<dyn BlockBackend>) -> IoReq {
    IoReq {
        tag,
        op,
        offset,
        len: 0,
        fua: false,
        iov,
        backend: b.clone(),
    }
}

#[test]
fn file_roundtrip_zero_copy_on_both_engines() {
    for e in engines() {
        let t = TempFile::with_len("aio-rt", 1 << 20);
        let b: Arc<dyn BlockBackend> =
            Arc::new(RawFile::open(t.path(), &RawFileOptions::default()).unwrap());
        let m = mem();
        let pattern: Vec<u8> = (0..0x3000u32).map(|i| (i * 7 + 3) as u8).collect();
        m.write_slice(&pattern, GuestAddress(0x10000)).unwrap();
        // Scattered source: 3 pieces, one of them crossing nothing in particular.
        let src = iov(
            &m,
            &[(0x10000, 0x1000), (0x11000, 0x800), (0x11800, 0x1800)],
        );
        let mut w = req(1, Op::Write, 8192, src, &b);
        w.fua = true;
        let flush = req(2, Op::Flush, 0, GuestIov::new(), &b);
        let done = run(&e, vec![w, flush]);
        assert!(done.iter().all(|d| d.result.is_ok()), "{:?}", e.kind());
        let dst = iov(&m, &[(0x40000, 0x2000), (0x80000, 0x1000)]);
        let done = run(&e, vec![req(3, Op::Read, 8192, dst, &b)]);
        assert!(done[0].result.is_ok());
        let mut back = vec![0u8; 0x3000];
        m.read_slice(&mut back[..0x2000], GuestAddress(0x40000))
            .unwrap();
        m.read_slice(&mut back[0x2000..], GuestAddress(0x80000))
            .unwrap();
        assert_eq!(back, pattern, "{:?}", e.kind());
        let on_disk = std::fs::read(t.path()).unwrap();
        assert_eq!(&on_disk[8192..8192 + 0x3000], &pattern[..]);
        assert_eq!(e.in_flight(), 0);
    }
}

#[test]
fn end_of_file_inside_the_disk_reads_zeroes() {
    for e in engines() {
        let t = TempFile::with_len("aio-eof", 1 << 20);
        let b: Arc<dyn BlockBackend> =
            Arc::new(RawFile::open(t.path(), &RawFileOptions::default()).unwrap());
        std::fs::write(t.path(), vec![0x5a; 6000]).unwrap(); // shrinks the file under us
        let m = mem();
        m.write_slice(&[0xee; 0x4000], GuestAddress(0x20000))
            .unwrap();
        let done = run(
            &e,
            vec![req(1, Op::Read, 4096, iov(&m, &[(0x20000, 0x4000)]), &b)],
        );
        assert!(done[0].result.is_ok());
        let mut back = vec![0u8; 0x4000];
        m.read_slice(&mut back, GuestAddress(0x20000)).unwrap();
        assert!(back[..1904].iter().all(|&x| x == 0x5a), "{:?}", e.kind());
        assert!(back[1904..].iter().all(|&x| x == 0), "{:?}", e.kind());
    }
}

/// A backend on an arbitrary descriptor, to reach kernel error paths.
struct FdBackend {
    file: File,
    capacity: u64,
}

impl BlockBackend for FdBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            capacity: self.capacity,
            sector_size: 512,
            read_only: false,
            discard_zeroes: false,
        }
    }
    fn read_vectored(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> crate::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.read_exact_at(&mut bufs[0], offset)?;
        Ok(())
    }
    fn write_vectored(&self, offset: u64, bufs: &[IoSlice<'_>]) -> crate::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.write_all_at(&bufs[0], offset)?;
        Ok(())
    }
    fn flush(&self) -> crate::Result<()> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> crate::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64) -> crate::Result<()> {
        Ok(())
    }
    fn dispatch(&self) -> Dispatch<'_> {
        Dispatch::Fd {
            fd: self.file.as_fd(),
            direct: None,
        }
    }
}

fn os_error(d: &IoDone) -> Option<i32> {
    match &d.result {
        Err(BlockError::Io(e)) => e.raw_os_error(),
        _ => None,
    }
}

#[test]
fn eio_and_enospc_come_back_as_errors() {
    for e in engines() {
        let m = mem();
        // /proc/self/mem at an unmapped address answers EIO.
        let eio: Arc<dyn BlockBackend> = Arc::new(FdBackend {
            file: File::options()
                .read(true)
                .write(true)
                .open("/proc/self/mem")
                .unwrap(),
            capacity: 1 << 40,
        });
        let done = run(&e, vec![req(1, Op::Read, 4096, iov(&m, &[(0, 512)]), &eio)]);
        assert_eq!(os_error(&done[0]), Some(libc::EIO), "{:?}", e.kind());
        // /dev/full refuses every write with ENOSPC.
        let full: Arc<dyn BlockBackend> = Arc::new(FdBackend {
            file: File::options().write(true).open("/dev/full").unwrap(),
            capacity: 1 << 20,
        });
        let done = run(&e, vec![req(2, Op::Write, 0, iov(&m, &[(0, 4096)]), &full)]);
        assert_eq!(os_error(&done[0]), Some(libc::ENOSPC), "{:?}", e.kind());
        let kind = match &done[0].result {
            Err(BlockError::Io(io)) => io.kind(),
            other => panic!("{other:?}"),
        };
        assert_eq!(kind, std::io::ErrorKind::StorageFull);
    }
}

#[test]
fn range_and_read_only_checks_hold_on_the_fast_path() {
    for e in engines() {
        let t = TempFile::with_len("aio-ro", 8192);
        let opts = RawFileOptions {
            read_only: true,
            ..Default::default()
        };
        let b: Arc<dyn BlockBackend> = Arc::new(RawFile::open(t.path(), &opts).unwrap());
        let m = mem();
        let done = run(
            &e,
            vec![
                req(1, Op::Write, 0, iov(&m, &[(0, 512)]), &b),
                req(2, Op::Read, 8192 - 256, iov(&m, &[(0, 512)]), &b),
            ],
        );
        assert!(matches!(done[0].result, Err(BlockError::ReadOnly)));
        assert!(matches!(done[1].result, Err(BlockError::OutOfRange { .. })));
    }
}

#[test]
fn ram_runs_inline_and_many_requests_complete_once() {
    for e in engines() {
        let b: Arc<dyn BlockBackend> = Arc::new(Ram::new(1 << 20, 512).unwrap());
        let m = mem();
        let reqs = (0..200u64)
            .map(|i| req(i, Op::Write, i * 512, iov(&m, &[(i * 512, 512)]), &b))
            .collect();
        let done = run(&e, reqs);
        assert_eq!(done.len(), 200);
        assert!(done.iter().enumerate().all(|(i, d)| d.req.tag == i as u64));
        assert_eq!(e.in_flight(), 0);
    }
}

/// Regression: with the ring's eventfd signalled only for "async" completions, a completion the
/// kernel posted through the submitter's task work was never reaped (an NVMe read on
/// /proc/self/mem hung). The I/O thread alone must see every completion.
#[test]
fn io_thread_reaps_what_the_submitter_does_not() {
    use crate::{IoHandler, IoThread, Tick};
    use std::sync::atomic::{AtomicUsize, Ordering as O};
    struct Count(AtomicUsize);
    impl IoHandler for Count {
        fn completions(&self, _t: usize, done: &mut Vec<IoDone>) {
            self.0.fetch_add(done.len(), O::SeqCst);
        }
        fn tick(&self, _t: usize, _now: Instant) -> Tick {
            Tick::Idle
        }
    }
    let pool = Arc::new(Executor::new(1, "t-iot"));
    let e = Engine::new(EngineKind::IoUring, 8, pool).unwrap();
    let h: Arc<dyn IoHandler> = Arc::new(Count(AtomicUsize::new(0)));
    let t = IoThread::spawn("t-iot".into(), 0, e.clone(), Arc::downgrade(&h)).unwrap();
    let m = mem();
    let eio: Arc<dyn BlockBackend> = Arc::new(FdBackend {
        file: File::options().read(true).open("/proc/self/mem").unwrap(),
        capacity: 1 << 40,
    });
    let t0 = Instant::now();
    for i in 0..4 {
        e.submit(req(i, Op::Read, 4096, iov(&m, &[(0, 512)]), &eio));
    }
    e.commit();
    while e.in_flight() > 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "completions never reaped"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(t);
}

/// Regression: a ring's completion queue holds twice its depth. More requests in flight than
/// that overflowed it; the kernel parks the extra completions until an io_uring_enter asks for
/// events, which the reaper never did, so those requests never completed (and with the
/// submission ring full, a submitter could spin for ever). Requests beyond the completion
/// queue's size now wait in the engine until room frees up.
#[test]
fn more_requests_than_the_completion_ring_holds_all_complete() {
    let pool = Arc::new(Executor::new(1, "t-aio-cap"));
    let e = Engine::new(EngineKind::IoUring, 8, pool).unwrap();
    let t = TempFile::with_len("aio-cap", 1 << 20);
    std::fs::write(
        t.path(),
        (0..1u32 << 18)
            .flat_map(|x| x.to_le_bytes())
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let b: Arc<dyn BlockBackend> =
        Arc::new(RawFile::open(t.path(), &RawFileOptions::default()).unwrap());
    let m = mem();
    let reqs: Vec<IoReq> = (0..200u64)
        .map(|i| {
            let off = (i % 256) * 4096;
            req(
                i,
                Op::Read,
                off,
                iov(&m, &[(i * 4096 % (1 << 20), 4096)]),
                &b,
            )
        })
        .collect();
    let done = run(&e, reqs);
    assert_eq!(done.len(), 200);
    for d in &done {
        assert!(d.result.is_ok(), "{:?}", d.result);
    }
    assert_eq!(e.ring_in_flight(), 0);
}
