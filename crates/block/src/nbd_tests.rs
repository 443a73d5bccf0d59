//! The NBD backend against a real server (`qemu-nbd`, started by each test): raw and qcow2
//! exports on a UNIX socket and on loopback TCP, data compared with the host's view, and a
//! server killed and restarted under a running client.

use std::io::{IoSlice, IoSliceMut};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::qemu_nbd::{free_port, QemuNbd};
use crate::{BlockBackend, BlockError, NbdBackend};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rhyve-nbd-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(37) ^ seed ^ (i >> 9) as u8)
        .collect()
}

fn read(b: &dyn BlockBackend, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    b.read_vectored(off, &mut [IoSliceMut::new(&mut v)])
        .unwrap();
    v
}

/// Writes in pieces, reads across them, flush, write zeroes, trim, and out-of-range refusal.
fn exercise(b: &dyn BlockBackend) -> Vec<u8> {
    let size = b.info().capacity;
    let a = pattern(64 << 10, 1);
    let (x, y) = a.split_at(20_000);
    b.write_vectored(4096, &[IoSlice::new(x), IoSlice::new(y)])
        .unwrap();
    b.flush().unwrap();
    let mut r1 = vec![0u8; 3000];
    let mut r2 = vec![0u8; (64 << 10) - 3000];
    b.read_vectored(
        4096,
        &mut [IoSliceMut::new(&mut r1), IoSliceMut::new(&mut r2)],
    )
    .unwrap();
    assert_eq!([r1, r2].concat(), a);
    b.write_zeroes(8192, 8192).unwrap();
    let back = read(b, 4096, 64 << 10);
    assert_eq!(back[..4096], a[..4096]);
    assert!(back[4096..12288].iter().all(|&v| v == 0));
    assert_eq!(back[12288..], a[12288..]);
    b.discard(1 << 20, 1 << 20).unwrap();
    let e = b
        .write_vectored(size - 512, &[IoSlice::new(&[0u8; 1024])])
        .unwrap_err();
    assert!(matches!(e, BlockError::OutOfRange { .. }), "{e}");
    back
}

#[test]
fn raw_export_over_a_unix_socket_matches_the_host_file() {
    let d = dir("raw");
    let img = d.join("disk.raw");
    std::fs::write(&img, vec![0u8; 8 << 20]).unwrap();
    let sock = d.join("nbd.sock");
    let _srv = QemuNbd::serve(&img, "raw", Some(&sock), 0, &[]);
    let uri = format!("nbd+unix:///exp?socket={}", sock.display());
    let b = NbdBackend::open(&uri, false, 512).unwrap();
    assert_eq!(b.info().capacity, 8 << 20);
    assert!(!b.info().read_only);
    // qemu-nbd offers multi-conn when it lets several clients in (--shared=4): the backend
    // then spreads requests over several connections.
    assert!(b.connections() > 1, "multi-conn not used");
    let back = exercise(&b);
    drop(b);
    let host = std::fs::read(&img).unwrap();
    assert_eq!(host[4096..4096 + (64 << 10)], back[..]);
}

#[test]
fn qcow2_export_over_tcp_checks_clean_afterwards() {
    let d = dir("qcow2");
    let img = d.join("disk.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("16M")
        .status()
        .unwrap();
    assert!(st.success());
    let port = free_port();
    {
        let _srv = QemuNbd::serve(&img, "qcow2", None, port, &[]);
        let b = NbdBackend::open(&format!("nbd://127.0.0.1:{port}/exp"), false, 4096).unwrap();
        assert_eq!(b.info().capacity, 16 << 20);
        assert_eq!(b.info().sector_size, 4096);
        exercise(&b);
        // A large read goes out as one request and comes back whole (holes read zero).
        let big = read(&b, 0, 4 << 20);
        assert!(big[..4096].iter().all(|&v| v == 0));
    }
    let out = Command::new("qemu-img")
        .arg("check")
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn read_only_exports_refuse_writes() {
    let d = dir("ro");
    let img = d.join("disk.raw");
    std::fs::write(&img, pattern(1 << 20, 7)).unwrap();
    let sock = d.join("nbd.sock");
    let _srv = QemuNbd::serve(&img, "raw", Some(&sock), 0, &["-r"]);
    let b = NbdBackend::open(
        &format!("nbd+unix:///exp?socket={}", sock.display()),
        false,
        512,
    )
    .unwrap();
    assert!(b.info().read_only);
    assert!(matches!(
        b.write_vectored(0, &[IoSlice::new(&[1u8; 512])]),
        Err(BlockError::ReadOnly)
    ));
    assert_eq!(read(&b, 0, 1 << 20), pattern(1 << 20, 7));
}

#[test]
fn a_killed_server_restarted_in_time_loses_nothing_acknowledged() {
    let d = dir("restart");
    let img = d.join("disk.raw");
    std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
    let sock = d.join("nbd.sock");
    let srv = QemuNbd::serve(&img, "raw", Some(&sock), 0, &[]);
    let b = NbdBackend::open(
        &format!("nbd+unix:///exp?socket={}", sock.display()),
        false,
        512,
    )
    .unwrap();
    let a = pattern(1 << 20, 3);
    b.write_vectored(0, &[IoSlice::new(&a)]).unwrap();
    // SIGKILL: the connection drops mid-life; a new server comes up half a second later.
    srv.kill();
    let _ = std::fs::remove_file(&sock);
    let (img2, sock2) = (img.clone(), sock.clone());
    let restarter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        QemuNbd::serve(&img2, "raw", Some(&sock2), 0, &[])
    });
    let c = pattern(1 << 20, 9);
    b.write_vectored(1 << 20, &[IoSlice::new(&c)]).unwrap();
    assert_eq!(read(&b, 0, 2 << 20), [a, c].concat());
    // Write `a` was acknowledged by the old server and never flushed: the first flush says
    // it cannot vouch for it; after that, flushes are flushes again.
    assert!(matches!(b.flush(), Err(BlockError::Io(_))));
    b.flush().unwrap();
    let _srv = restarter.join().unwrap();
}

#[test]
fn a_server_that_stays_away_fails_the_request_instead_of_hanging() {
    let d = dir("gone");
    let img = d.join("disk.raw");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let sock = d.join("nbd.sock");
    let srv = QemuNbd::serve(&img, "raw", Some(&sock), 0, &[]);
    let b = NbdBackend::open(
        &format!("nbd+unix:///exp?socket={}", sock.display()),
        false,
        512,
    )
    .unwrap();
    drop(srv);
    let t = Instant::now();
    let e = b
        .read_vectored(0, &mut [IoSliceMut::new(&mut [0u8; 512])])
        .unwrap_err();
    assert!(matches!(e, BlockError::Io(_)), "{e}");
    assert!(t.elapsed() < Duration::from_secs(30));
}

/// A server that negotiates like a real one and then answers one READ with `reply` (bytes after
/// the 4-byte magic the test also supplies).
fn fake_server(sock: &std::path::Path, reply: Vec<u8>) -> std::thread::JoinHandle<()> {
    use std::io::{Read, Write};
    let l = std::os::unix::net::UnixListener::bind(sock).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut hello = Vec::new();
        hello.extend_from_slice(&0x4e42_444d_4147_4943u64.to_be_bytes());
        hello.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
        hello.extend_from_slice(&3u16.to_be_bytes());
        s.write_all(&hello).unwrap();
        let mut b4 = [0u8; 4];
        s.read_exact(&mut b4).unwrap();
        for _ in 0..2 {
            let mut h = [0u8; 16];
            s.read_exact(&mut h).unwrap();
            let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
            let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let mut d = vec![0u8; len as usize];
            s.read_exact(&mut d).unwrap();
            let rep = |s: &mut std::os::unix::net::UnixStream, t: u32, data: &[u8]| {
                let mut m = Vec::new();
                m.extend_from_slice(&0x0003_e889_0455_65a9u64.to_be_bytes());
                m.extend_from_slice(&opt.to_be_bytes());
                m.extend_from_slice(&t.to_be_bytes());
                m.extend_from_slice(&(data.len() as u32).to_be_bytes());
                m.extend_from_slice(data);
                s.write_all(&m).unwrap();
            };
            if opt == 7 {
                let mut info = vec![0u8, 0];
                info.extend_from_slice(&(1u64 << 20).to_be_bytes());
                info.extend_from_slice(&1u16.to_be_bytes()); // HAS_FLAGS only
                rep(&mut s, 3, &info);
            }
            rep(&mut s, 1, &[]);
        }
        let mut req = [0u8; 28];
        if s.read_exact(&mut req).is_ok() {
            let cookie = &req[8..16];
            let mut m = 0x668e_33efu32.to_be_bytes().to_vec();
            m.extend_from_slice(&reply[..4]); // flags, type
            m.extend_from_slice(cookie);
            m.extend_from_slice(&reply[4..]);
            let _ = s.write_all(&m);
        }
        // Then go away: the client's reconnection attempts find nobody.
    })
}

#[test]
fn hostile_structured_replies_fail_the_read_without_a_panic_or_a_hang() {
    let d = dir("hostile");
    // (flags, type) then length and payload.
    let huge = [&[0u8, 1, 0, 1][..], &u32::MAX.to_be_bytes()].concat();
    let short_done = [
        &[0u8, 1, 0, 1][..],
        &12u32.to_be_bytes(),
        &0u64.to_be_bytes(),
        &[1, 2, 3, 4],
    ]
    .concat(); // DONE after 4 of the 512 bytes asked for
    let outside = [
        &[0u8, 1, 0, 2][..],
        &12u32.to_be_bytes(),
        &(u64::MAX - 4).to_be_bytes(),
        &512u32.to_be_bytes(),
    ]
    .concat(); // a hole whose end overflows
    for (i, reply) in [huge, short_done, outside].into_iter().enumerate() {
        let sock = d.join(format!("fake{i}.sock"));
        let srv = fake_server(&sock, reply);
        let b = NbdBackend::open(
            &format!("nbd+unix:///exp?socket={}", sock.display()),
            false,
            512,
        )
        .unwrap();
        let t = Instant::now();
        let r = b.read_vectored(0, &mut [IoSliceMut::new(&mut [0u8; 512])]);
        assert!(matches!(r, Err(BlockError::Io(_))), "reply {i}: {r:?}");
        assert!(t.elapsed() < Duration::from_secs(30));
        srv.join().unwrap();
    }
}
