//! The API socket (`--api-socket PATH`): HTTP/1.1 with JSON bodies over a UNIX socket, as
//! cloud-hypervisor's and Firecracker's, with `rhyve ctl` as its client.
//!
//! `GET /api/v1/info` (devices and their options), `GET /api/v1/stats` (per-device counters),
//! `PUT /api/v1/shutdown` (`rhyve run`: the ACPI power button, then after `{"timeout_s": N}`,
//! default 10, a stop with the devices flushed), `PUT /api/v1/pause` and `resume` (`rhyve run`; `rhyve uml` cannot
//! pause UML and answers 501), `PUT /api/v1/snapshot` with `{"dir": PATH}` (`rhyve run`: the VM
//! is left paused), `PUT /api/v1/migrate-send` with `{"url": "unix:PATH"|"tcp:HOST:PORT"}`
//! (live migration to a `rhyve run --migrate-receive`; this VM ends once the other runs). Bad
//! requests get a 4xx with `{"error": "…"}`; the socket is created mode 0600. One request per connection, bounded in size and time, so a client
//! cannot hold the server.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{json, Value};

/// What a running rhyve answers on its API socket.
pub trait Api: Send + Sync {
    /// The devices and their configuration.
    fn info(&self) -> Value;
    /// Per-device counters.
    fn stats(&self) -> Value;
    /// Stop the VM (or the UML device server) cleanly: a VM first gets the ACPI power button
    /// and `grace` to power off on its own, then it is stopped (devices flushed).
    fn shutdown(&self, grace: Duration);
    /// Stop running the guest (its devices finish what they started); an HTTP status and
    /// message when this frontend cannot.
    fn pause(&self) -> Result<(), (u16, String)> {
        Err((501, "this frontend cannot pause".into()))
    }
    /// Run the guest again.
    fn resume(&self) -> Result<(), (u16, String)> {
        Err((501, "this frontend cannot pause".into()))
    }
    /// Pause and write a snapshot into `dir`; the VM stays paused.
    fn snapshot(&self, _dir: &Path) -> Result<Value, (u16, String)> {
        Err((501, "this frontend cannot take snapshots".into()))
    }
    /// Move the running VM to the rhyve listening on `url` (`unix:PATH`, `tcp:HOST:PORT`).
    fn migrate(&self, _url: &str) -> Result<Value, (u16, String)> {
        Err((501, "this frontend cannot migrate".into()))
    }
    /// After a successful migration's answer went out: end this process's VM.
    fn migrated(&self) {}
}

/// Verbs the API knows, for error messages and `rhyve ctl`.
pub const VERBS: &[&str] = &[
    "info",
    "stats",
    "shutdown",
    "pause",
    "resume",
    "snapshot",
    "migrate-send",
];
/// How long `shutdown` lets a guest power off after the power button (`{"timeout_s": N}`).
pub const DEFAULT_SHUTDOWN_S: u64 = 10;
/// Largest request accepted (headers and body).
const MAX_REQUEST: usize = 64 << 10;
/// How long a client may take to send its request or read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// A listening API socket; removed when dropped.
pub struct ApiServer {
    path: PathBuf,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listen on `path` (mode 0600) and answer requests with `api` on a thread of its own.
pub fn serve(path: &Path, api: Arc<dyn Api>) -> Result<ApiServer> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot listen on API socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot make {} private", path.display()))?;
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(s) => handle(s, &*api),
                    Err(e) => log::warn!("API socket: {e}"),
                }
            }
        })?;
    Ok(ApiServer {
        path: path.to_path_buf(),
    })
}

/// An HTTP answer: status and JSON body.
struct Answer(u16, Value);

fn error(code: u16, msg: impl Into<String>) -> Answer {
    Answer(code, json!({ "error": msg.into() }))
}

fn handle(mut s: UnixStream, api: &dyn Api) {
    let _ = s.set_read_timeout(Some(CLIENT_TIMEOUT));
    let _ = s.set_write_timeout(Some(CLIENT_TIMEOUT));
    let (answer, after) = match read_request(&mut s) {
        Ok((method, path, body)) => route(&method, &path, &body, api),
        Err(a) => (a, None),
    };
    let Answer(code, body) = answer;
    let body = body.to_string();
    let reason = match code {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        _ => "Error",
    };
    let _ = write!(
        s,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.flush();
    drop(s);
    if let Some(f) = after {
        f(api);
    }
}

/// Read one request: (method, path, body).
fn read_request(s: &mut UnixStream) -> std::result::Result<(String, String, Vec<u8>), Answer> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s
            .read(&mut chunk)
            .map_err(|_| error(408, "the request did not arrive in time"))?;
        if n == 0 {
            return Err(error(400, "connection closed before a whole request"));
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_REQUEST {
            return Err(error(
                413,
                format!("requests are limited to {MAX_REQUEST} bytes"),
            ));
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(head)) => {
                let len = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .map(|h| {
                        std::str::from_utf8(h.value)
                            .ok()
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .ok_or_else(|| error(400, "bad Content-Length"))
                    })
                    .transpose()?
                    .unwrap_or(0);
                if head + len > MAX_REQUEST {
                    return Err(error(
                        413,
                        format!("requests are limited to {MAX_REQUEST} bytes"),
                    ));
                }
                if buf.len() >= head + len {
                    let method = req.method.unwrap_or_default().to_string();
                    let path = req.path.unwrap_or_default().to_string();
                    return Ok((method, path, buf[head..head + len].to_vec()));
                }
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Err(error(400, format!("not an HTTP/1.1 request: {e}"))),
        }
    }
}

type After = Option<Box<dyn FnOnce(&dyn Api)>>;

fn route(method: &str, path: &str, body: &[u8], api: &dyn Api) -> (Answer, After) {
    let Some(verb) = path.strip_prefix("/api/v1/") else {
        return (
            error(404, format!("no such path {path:?}: use /api/v1/VERB")),
            None,
        );
    };
    // Any body must be JSON, even where a verb takes none.
    let body: Value = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return (error(400, format!("the body is not JSON: {e}")), None),
        }
    };
    let want =
        |m: &str| (method != m).then(|| error(405, format!("{verb} takes {m}, not {method}")));
    match verb {
        "info" => (want("GET").unwrap_or_else(|| Answer(200, api.info())), None),
        "stats" => (
            want("GET").unwrap_or_else(|| Answer(200, api.stats())),
            None,
        ),
        "shutdown" => match want("PUT") {
            Some(e) => (e, None),
            None => match body.get("timeout_s").map(Value::as_u64) {
                Some(None) => (
                    error(400, "timeout_s must be a whole number of seconds"),
                    None,
                ),
                t => {
                    let secs = t.flatten().unwrap_or(DEFAULT_SHUTDOWN_S).min(3600);
                    (
                        Answer(202, json!({ "status": "shutting down", "timeout_s": secs })),
                        Some(Box::new(move |api: &dyn Api| {
                            api.shutdown(Duration::from_secs(secs))
                        })),
                    )
                }
            },
        },
        "pause" | "resume" => match want("PUT") {
            Some(e) => (e, None),
            None => {
                let r = if verb == "pause" {
                    api.pause()
                } else {
                    api.resume()
                };
                match r {
                    Ok(()) => (
                        Answer(
                            200,
                            json!({ "status": if verb == "pause" { "paused" } else { "running" } }),
                        ),
                        None,
                    ),
                    Err((code, msg)) => (error(code, msg), None),
                }
            }
        },
        "snapshot" => match want("PUT") {
            Some(e) => (e, None),
            None => {
                let dir = body.get("dir").and_then(Value::as_str).or_else(|| {
                    body.get("destination_url")
                        .and_then(Value::as_str)
                        .and_then(|u| u.strip_prefix("file://"))
                });
                match dir {
                    None | Some("") => (error(400, "snapshot needs {\"dir\": \"PATH\"}"), None),
                    Some(d) => match api.snapshot(Path::new(d)) {
                        Ok(v) => (Answer(200, v), None),
                        Err((code, msg)) => (error(code, msg), None),
                    },
                }
            }
        },
        "migrate-send" => match want("PUT") {
            Some(e) => (e, None),
            None => {
                let url = body
                    .get("url")
                    .or_else(|| body.get("destination_url"))
                    .and_then(Value::as_str);
                match url {
                    None | Some("") => (
                        error(
                            400,
                            "migrate-send needs {\"url\": \"unix:PATH\" or \"tcp:HOST:PORT\"}",
                        ),
                        None,
                    ),
                    Some(u) => match api.migrate(u) {
                        Ok(v) => (
                            Answer(200, v),
                            Some(Box::new(|api: &dyn Api| api.migrated())),
                        ),
                        Err((code, msg)) => (error(code, msg), None),
                    },
                }
            }
        },
        _ => (
            error(
                404,
                format!("unknown verb {verb:?}: the verbs are {}", VERBS.join(", ")),
            ),
            None,
        ),
    }
}

/// `rhyve ctl`: send one verb, print the JSON answer; Ok(true) for a 2xx.
pub fn request(socket: &Path, verb: &str, body: Option<&str>) -> Result<(u16, String)> {
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to API socket {}", socket.display()))?;
    // A snapshot waits for in-flight I/O (bounded at 60 s) and writes guest RAM.
    s.set_read_timeout(Some(Duration::from_secs(180)))?;
    let method = if matches!(verb, "info" | "stats") {
        "GET"
    } else {
        "PUT"
    };
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} /api/v1/{verb} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut headers);
    let head = match r.parse(&resp)? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial if resp.is_empty() => anyhow::bail!(
            "the VM ended before answering (see its log: it may have powered off or failed)"
        ),
        httparse::Status::Partial => anyhow::bail!("incomplete answer from the API socket"),
    };
    let code = r.code.unwrap_or(0);
    Ok((code, String::from_utf8_lossy(&resp[head..]).into_owned()))
}

/// Counters of one device as a JSON object.
pub fn counters(list: impl IntoIterator<Item = (String, u64)>) -> Value {
    Value::Object(list.into_iter().map(|(k, v)| (k, json!(v))).collect())
}

/// One device in `stats`: its counters, its command latency histogram (`latency_us`: bucket
/// `lt_N` counts commands that took less than N µs, and were not counted in a smaller bucket)
/// and, once it has done I/O, exits and interrupts per I/O command.
pub fn device_stats(slot: String, emulation: &str, list: Vec<(String, u64)>) -> Value {
    let get = |k: &str| list.iter().find(|(n, _)| n == k).map_or(0, |(_, v)| *v);
    let (latency, plain): (Vec<_>, Vec<_>) = list
        .iter()
        .cloned()
        .partition(|(k, _)| k.starts_with(pci::latency::STAT_PREFIX));
    let latency: serde_json::Map<String, Value> = latency
        .into_iter()
        .map(|(k, v)| {
            (
                format!("lt_{}", &k[pci::latency::STAT_PREFIX.len()..]),
                json!(v),
            )
        })
        .collect();
    // I/O commands: NVMe reads and writes, AHCI commands, virtio-blk requests.
    let ios = get("read_commands") + get("write_commands") + get("commands") + get("requests");
    // Exits: KVM's userspace exits on the device's BARs, or the MMIO messages UML sent.
    let exits = get("exits") + get("uml_mmio_reads") + get("uml_mmio_writes");
    let irqs = get("irqfd_msi") + get("signal_msi") + get("intx_asserts") + get("msi_sent");
    let mut v = json!({
        "slot": slot,
        "emulation": emulation,
        "counters": counters(plain),
        "latency_us": latency,
    });
    if ios > 0 {
        v["per_io"] = json!({
            "io_commands": ios,
            "exits": exits as f64 / ios as f64,
            "interrupts": irqs as f64 / ios as f64,
        });
    }
    v
}
