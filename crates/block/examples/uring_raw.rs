use io_uring::{opcode, types, IoUring};
use std::os::fd::AsRawFd;
use std::time::Instant;

fn main() {
    let path = std::env::args().nth(1).unwrap();
    let mode = std::env::args().nth(2).unwrap_or_default();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let cap = f.metadata().unwrap().len() / 4096;
    let mut ring = IoUring::new(64).unwrap();
    if mode.contains("efd") {
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK) };
        ring.submitter().register_eventfd(efd).unwrap();
    }
    let mem: *mut u8 = if mode.contains("mmap") {
        unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                64 << 20,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            ) as *mut u8
        }
    } else {
        Box::leak(vec![0u8; 64 << 20].into_boxed_slice()).as_mut_ptr()
    };
    let iovs: Vec<libc::iovec> = (0..32)
        .map(|i| libc::iovec {
            iov_base: unsafe { mem.add(i * 4096) } as _,
            iov_len: 4096,
        })
        .collect();
    let mut x: u64 = 88172645463325252;
    let mut push = |ring: &mut IoUring, i: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let e = opcode::Readv::new(types::Fd(f.as_raw_fd()), &iovs[i], 1)
            .offset((x % cap) * 4096)
            .build()
            .user_data(i as u64);
        unsafe { ring.submission().push(&e).unwrap() };
    };
    for i in 0..32 {
        push(&mut ring, i);
    }
    ring.submit().unwrap();
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed().as_secs_f64() < 2.0 {
        let done: Vec<u64> = ring.completion().map(|c| c.user_data()).collect();
        for i in done {
            n += 1;
            push(&mut ring, i as usize);
        }
        ring.submit().unwrap();
    }
    println!("{mode}: {} IOPS", n as f64 / t.elapsed().as_secs_f64());
}
