//! The API socket: `rhyve ctl` against `rhyve uml --api-socket` (no guest needed), every verb,
//! and the errors: bad JSON, unknown verbs, wrong methods, oversized requests, verbs not yet
//! implemented.

mod common;
use common::*;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn ctl(sock: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rhyve"))
        .arg("ctl")
        .arg("--api-socket")
        .arg(sock)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A raw request; returns (status code, body).
fn raw(sock: &Path, request: &[u8]) -> (u16, String) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.write_all(request).unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    let code = r[9..12].parse().unwrap();
    let body = r.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (code, body)
}

#[test]
fn uml_api_socket_answers_every_verb_and_refuses_bad_requests() {
    let d = scratch("api");
    let sock = d.join("api.sock");
    let rh = Rhyve::start_with(
        &d,
        &["4,nvme,ram=8,ser=API-NVME", "6,virtio-blk,ram=8,queues=2"],
        &["--api-socket", sock.to_str().unwrap()],
    );
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "API socket mode");

    let (code, out, err) = ctl(&sock, &["info"]);
    assert_eq!(code, 0, "{err}");
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["frontend"], "uml");
    let emuls: Vec<_> = info["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["emulation"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(emuls, ["nvme", "virtio-blk"]);
    assert!(out.contains("ser=API-NVME"), "{out}");

    let (code, out, _) = ctl(&sock, &["stats"]);
    assert_eq!(code, 0);
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        stats["devices"][0]["counters"]["read_commands"].is_u64(),
        "{out}"
    );
    assert!(
        stats["devices"][1]["counters"]["requests"].is_u64(),
        "{out}"
    );

    // UML cannot be paused or snapshotted from here: a clear 501, and ctl exits 1.
    let (code, out, _) = ctl(&sock, &["pause"]);
    assert_eq!(code, 1);
    assert!(out.contains("cannot pause"), "{out}");
    let (code, out, _) = ctl(&sock, &["snapshot", "--json", "{\"dir\":\"/tmp/x\"}"]);
    assert_eq!(code, 1);
    assert!(out.contains("this frontend cannot take snapshots"), "{out}");
    let (code, out, _) = ctl(&sock, &["snapshot", "--json", "{}"]);
    assert_eq!(code, 1);
    assert!(out.contains("snapshot needs {\\\"dir\\\""), "{out}");
    // Unknown verbs, locally and on the wire.
    let (code, _, err) = ctl(&sock, &["bogus"]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown verb \"bogus\""), "{err}");
    let (code, body) = raw(&sock, b"GET /api/v1/bogus HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(code, 404);
    assert!(
        body.contains("the verbs are info, stats, shutdown"),
        "{body}"
    );
    // Bad JSON, the wrong method, something that is not HTTP, and a request too large.
    let (code, body) = raw(
        &sock,
        b"PUT /api/v1/shutdown HTTP/1.1\r\nContent-Length: 5\r\n\r\n{bad}",
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("not JSON"), "{body}");
    let (code, _) = raw(&sock, b"GET /api/v1/shutdown HTTP/1.1\r\n\r\n");
    assert_eq!(code, 405);
    let (code, _) = raw(&sock, b"\x00\x01\x02 nonsense\r\n\r\n");
    assert_eq!(code, 400);
    let (code, _) = raw(
        &sock,
        b"PUT /api/v1/snapshot HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n",
    );
    assert_eq!(code, 413);
    // The device server is still up after all that, and shuts down on request.
    let (code, out, _) = ctl(&sock, &["shutdown"]);
    assert_eq!(code, 0, "{out}");
    let t = Instant::now();
    let stats = rh.finish();
    assert!(t.elapsed() < Duration::from_secs(30));
    assert!(stats.contains("slot 4 nvme"), "{stats}");
    assert!(!sock.exists(), "the API socket is removed on exit");
}
