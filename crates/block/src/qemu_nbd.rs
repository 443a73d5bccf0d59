//! A `qemu-nbd` server for tests (feature `test-support`): started on an image, waited for
//! until it accepts connections, killed when dropped.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `qemu-nbd` exporting one image as export `exp`.
pub struct QemuNbd(Child);

impl QemuNbd {
    /// Serve `img` (format `fmt`: raw, qcow2, …) on the UNIX socket `sock`, or on loopback TCP
    /// `port` when `sock` is `None`, with up to 4 clients (which also makes it offer
    /// multi-conn) and write-through caching; `extra` are more qemu-nbd arguments (`-r`).
    /// Panics if it cannot start within 10 s.
    pub fn serve(img: &Path, fmt: &str, sock: Option<&Path>, port: u16, extra: &[&str]) -> Self {
        let mut c = Command::new("qemu-nbd");
        c.args([
            "--persistent",
            "--shared=4",
            "--cache=writethrough",
            "-f",
            fmt,
            "-x",
            "exp",
        ]);
        c.args(extra);
        match sock {
            Some(s) => c.arg("-k").arg(s),
            None => c.args(["-b", "127.0.0.1", "-p", &port.to_string()]),
        };
        let child = c
            .arg(img)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("qemu-nbd (apt-get install qemu-utils)");
        let t = Instant::now();
        while !match sock {
            Some(s) => std::os::unix::net::UnixStream::connect(s).is_ok(),
            None => std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        } {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "qemu-nbd did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        QemuNbd(child)
    }

    /// Kill it now (SIGKILL), as a crash would.
    pub fn kill(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}
