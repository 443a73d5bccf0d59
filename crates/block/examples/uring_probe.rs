use block::*;
use std::sync::Arc;
use std::time::Instant;
use vm_memory::{GuestAddress, GuestMemoryMmap};

fn main() {
    let path = std::env::args().nth(1).unwrap();
    let pool = Arc::new(Executor::new(1, "p"));
    let e = Engine::new(EngineKind::IoUring, 64, pool).unwrap();
    let b: Arc<dyn BlockBackend> =
        Arc::new(RawFile::open(&path, &RawFileOptions::default()).unwrap());
    let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap());
    let cap = b.info().capacity / 4096;
    let mut x: u64 = 88172645463325252;
    let mut done = Vec::new();
    let t = Instant::now();
    let mut n = 0u64;
    let mk = |x: &mut u64, i: u64| {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        let mut iov = GuestIov::new();
        iov.set_memory(mem.clone());
        iov.push_guest(i * 4096, 4096).unwrap();
        IoReq {
            tag: i,
            op: Op::Read,
            offset: (*x % cap) * 4096,
            len: 4096,
            fua: false,
            iov,
            backend: b.clone(),
        }
    };
    for i in 0..32 {
        e.submit(mk(&mut x, i));
    }
    e.commit();
    while t.elapsed().as_secs_f64() < 2.0 {
        e.reap(&mut done);
        for d in done.drain(..) {
            n += 1;
            e.submit(mk(&mut x, d.req.tag));
        }
        e.commit();
    }
    println!("{} IOPS", n as f64 / t.elapsed().as_secs_f64());
}
