//! A message-level relay between UML and the rust-vmm vhost-user back-end that fixes two UML
//! specifics the back-end cannot be told about:
//!
//! * Unpatched 6.12 `vhost_user_set_mem_table()` sends a SET_MEM_TABLE body sized for two regions
//!   (72 bytes) with `num` = 1; `vhost` 0.18 rejects any body that is not `8 + 32 * num` bytes.
//!   We trim the body to what `num` says (guest/uml-set-mem-table.patch fixes the kernel side).
//! * UML's vring call "fds" are socketpairs, and a socket, unlike an eventfd, does not coalesce
//!   writes: signalling a stalled UML often enough fills the socket and blocks the writer. We make
//!   the call fd non-blocking; a failed signal then only means a signal is already pending.
//!
//! Setup-time traffic only: the data path is the virtqueues and fds, so the extra hop is free.

use log::{debug, error, info, trace, warn};
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::thread::{self, JoinHandle};
use vhost::vhost_user::message::{FrontendReq, MAX_MSG_SIZE};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// vhost-user header: u32 request, u32 flags, u32 size.
const VU_HDR_LEN: usize = 12;
/// SET_MEM_TABLE body: u32 num, u32 padding, then 32-byte regions.
const MEM_TABLE_HDR: usize = 8;
const MEM_REGION_LEN: usize = 32;

/// One front-end message as relayed.
#[derive(Debug)]
pub(crate) struct Message {
    pub request: u32,
    pub flags: u32,
    pub body: Vec<u8>,
    pub file: Option<File>,
}

/// Read one message; `Ok(None)` on a clean EOF between messages.
fn recv_message(sock: &mut UnixStream) -> io::Result<Option<Message>> {
    let mut hdr = [0u8; VU_HDR_LEN];
    // UML sends header, body and fds in one sendmsg(); the fds arrive with the first byte.
    let (n, file) = sock.recv_with_fd(&mut hdr).map_err(io::Error::from)?;
    if n == 0 {
        return Ok(None);
    }
    sock.read_exact(&mut hdr[n..])?;
    let word = |i: usize| u32::from_ne_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
    let (request, flags, size) = (word(0), word(4), word(8) as usize);
    if size > MAX_MSG_SIZE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("vhost-user request {request} with a {size}-byte body"),
        ));
    }
    let mut body = vec![0u8; size];
    sock.read_exact(&mut body)?;
    Ok(Some(Message {
        request,
        flags,
        body,
        file,
    }))
}

/// vhost-user header flag: the front-end wants a reply (REPLY_ACK).
const NEED_REPLY: u32 = 1 << 3;
/// vhost-user header flags of a reply: version 1, reply bit.
const REPLY_FLAGS: u32 = 0x1 | (1 << 2);

/// Why a SET_MEM_TABLE is refused before the back-end maps it, if it is.
///
/// The back-end maps each region from its file. A region reaching past the end of the file maps
/// pages with nothing behind them, and the first access to one (a vring, a data buffer) raises
/// SIGBUS. The relay forwards one file descriptor per message, so a table must have one region.
pub(crate) fn check_mem_table(msg: &Message) -> Option<String> {
    if msg.request != u32::from(FrontendReq::SET_MEM_TABLE) {
        return None;
    }
    let file_len = match &msg.file {
        None => None,
        Some(f) => match f.metadata() {
            Ok(m) => Some(m.len()),
            Err(e) => return Some(format!("fstat of the region's file: {e}")),
        },
    };
    check_mem_table_body(&msg.body, file_len).err()
}

/// Check a SET_MEM_TABLE body against the size of the file sent with it (`None`: no file):
/// one region that lies inside the file. The error says what is wrong.
pub fn check_mem_table_body(body: &[u8], file_len: Option<u64>) -> Result<(), String> {
    if body.len() < MEM_TABLE_HDR {
        return Err(format!("a {}-byte body", body.len()));
    }
    let u64_at = |o: usize| {
        body.get(o..o + 8)
            .map(|b| u64::from_ne_bytes(b.try_into().expect("8 bytes")))
    };
    let num = u32::from_ne_bytes([body[0], body[1], body[2], body[3]]);
    if num != 1 {
        return Err(format!(
            "{num} regions (one file descriptor per table is relayed)"
        ));
    }
    let Some(file_len) = file_len else {
        return Err("no file descriptor".into());
    };
    let region = MEM_TABLE_HDR;
    let (Some(size), Some(offset)) = (u64_at(region + 8), u64_at(region + 24)) else {
        return Err(format!("a {}-byte body", body.len()));
    };
    match offset.checked_add(size) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(format!(
            "region of {size:#x} bytes at file offset {offset:#x} reaches past the end of its \
             {file_len:#x}-byte file"
        )),
    }
}

/// The reply to a refused request: REPLY_ACK with a non-zero (failure) value.
fn refusal(msg: &Message) -> Message {
    Message {
        request: msg.request,
        flags: REPLY_FLAGS,
        body: 1u64.to_ne_bytes().to_vec(),
        file: None,
    }
}

/// Apply the UML fix-ups to one message in place.
pub(crate) fn fix_message(msg: &mut Message) -> io::Result<()> {
    if msg.request == u32::from(FrontendReq::SET_MEM_TABLE) && msg.body.len() >= MEM_TABLE_HDR {
        let num = u32::from_ne_bytes([msg.body[0], msg.body[1], msg.body[2], msg.body[3]]);
        let want = MEM_TABLE_HDR.saturating_add((num as usize).saturating_mul(MEM_REGION_LEN));
        if want < msg.body.len() {
            info!(
                "SET_MEM_TABLE: {num} region(s) in a {}-byte body; trimming to {want} (UML quirk)",
                msg.body.len()
            );
            msg.body.truncate(want);
        }
    }
    if msg.request == u32::from(FrontendReq::SET_VRING_CALL) {
        if let Some(f) = &msg.file {
            // A dup shares the file description, so the flag sticks to the fd we forward.
            UnixStream::from(OwnedFd::from(f.try_clone()?)).set_nonblocking(true)?;
        }
    }
    Ok(())
}

fn send_message(sock: &mut UnixStream, msg: &Message) -> io::Result<()> {
    let mut buf = Vec::with_capacity(VU_HDR_LEN + msg.body.len());
    buf.extend_from_slice(&msg.request.to_ne_bytes());
    buf.extend_from_slice(&msg.flags.to_ne_bytes());
    buf.extend_from_slice(&(msg.body.len() as u32).to_ne_bytes());
    buf.extend_from_slice(&msg.body);
    let sent = match &msg.file {
        Some(f) => sock
            .send_with_fds(&[&buf[..]], &[f.as_raw_fd()])
            .map_err(io::Error::from)?,
        None => 0,
    };
    sock.write_all(&buf[sent..])
}

/// Relay front-end → back-end with fix-ups until EOF or error, then half-close the back-end so it
/// sees the disconnect.
fn forward(mut from: UnixStream, mut to: UnixStream) {
    loop {
        match recv_message(&mut from) {
            Ok(Some(mut msg)) => {
                trace!(
                    "vhost-user request {} flags {:#x} size {} fd {}",
                    msg.request,
                    msg.flags,
                    msg.body.len(),
                    msg.file.is_some()
                );
                if let Err(e) = fix_message(&mut msg) {
                    warn!("vhost-user request {}: fix-up failed: {e}", msg.request);
                }
                if let Some(why) = check_mem_table(&msg) {
                    error!("SET_MEM_TABLE refused: {why}");
                    if msg.flags & NEED_REPLY != 0 {
                        if let Err(e) = send_message(&mut from, &refusal(&msg)) {
                            debug!("vhost-user relay to UML: {e}");
                            break;
                        }
                        continue;
                    }
                    // No way to say no: drop the connection rather than map the table.
                    break;
                }
                if let Err(e) = send_message(&mut to, &msg) {
                    debug!("vhost-user relay to back-end: {e}");
                    break;
                }
            }
            Ok(None) => {
                debug!("UML closed the vhost-user socket");
                break;
            }
            Err(e) => {
                // ConnectionReset/EBADF also land here when we are being stopped.
                debug!("vhost-user relay from UML: {e}");
                break;
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

/// Relay back-end → front-end verbatim (replies carry no fds); when the back-end goes away,
/// close UML's socket so UML notices.
fn backward(mut from: UnixStream, mut to: UnixStream) {
    if let Err(e) = io::copy(&mut from, &mut to) {
        debug!("vhost-user relay to UML: {e}");
    }
    let _ = to.shutdown(Shutdown::Both);
}

/// Start relaying between UML's connection `uml` and the back-end's end `backend`.
pub(crate) fn spawn(uml: UnixStream, backend: UnixStream) -> io::Result<[JoinHandle<()>; 2]> {
    let (uml2, backend2) = (uml.try_clone()?, backend.try_clone()?);
    let fwd = thread::Builder::new()
        .name("uml-vu-fwd".into())
        .spawn(move || forward(uml, backend))?;
    let bwd = thread::Builder::new()
        .name("uml-vu-bwd".into())
        .spawn(move || backward(backend2, uml2))?;
    Ok([fwd, bwd])
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    fn raw(request: u32, flags: u32, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&request.to_ne_bytes());
        v.extend_from_slice(&flags.to_ne_bytes());
        v.extend_from_slice(&(body.len() as u32).to_ne_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn trims_uml_mem_table_and_keeps_fd() {
        let (uml, uml_peer) = UnixStream::pair().unwrap();
        let (be_peer, be) = UnixStream::pair().unwrap();
        let threads = spawn(uml_peer, be_peer).unwrap();

        // num = 1, body sized for two regions, like unpatched UML.
        let mut body = vec![0u8; 72];
        body[0] = 1;
        body[8..16].copy_from_slice(&0x92a000u64.to_ne_bytes());
        body[40..48].copy_from_slice(&0xdeadu64.to_ne_bytes());
        let fd = EventFd::new(0).unwrap();
        let msg = raw(5, 0x9, &body);
        uml.send_with_fds(&[&msg[..]], &[fd.as_raw_fd()]).unwrap();

        let mut be = be;
        let got = recv_message(&mut be).unwrap().unwrap();
        assert_eq!((got.request, got.flags, got.body.len()), (5, 0x9, 40));
        assert_eq!(&got.body[..], &body[..40]);
        assert!(got.file.is_some());

        // A spec-sized message passes untouched, and replies flow back verbatim.
        let ok = raw(5, 0x1, &body[..40]);
        uml.send_with_fds(&[&ok[..]], &[fd.as_raw_fd()]).unwrap();
        let got = recv_message(&mut be).unwrap().unwrap();
        assert_eq!(got.body.len(), 40);
        be.write_all(&raw(5, 0x5, &0u64.to_ne_bytes())).unwrap();
        let mut uml = uml;
        let mut reply = [0u8; 20];
        uml.read_exact(&mut reply).unwrap();
        assert_eq!(reply[4], 0x5);

        // UML hangs up: the back-end sees EOF, UML's socket is closed after the back-end's.
        drop(uml);
        assert!(recv_message(&mut be).unwrap().is_none());
        drop(be);
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn call_fd_becomes_nonblocking() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut msg = Message {
            request: u32::from(FrontendReq::SET_VRING_CALL),
            flags: 1,
            body: 0u64.to_ne_bytes().to_vec(),
            file: Some(File::from(OwnedFd::from(a))),
        };
        fix_message(&mut msg).unwrap();
        let mut f = msg.file.unwrap();
        // Fill the socket: with O_NONBLOCK this ends in WouldBlock instead of hanging.
        let err = loop {
            if let Err(e) = f.write(&1u64.to_ne_bytes()) {
                break e;
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        drop(b);
    }

    #[test]
    fn oversized_body_is_an_error() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let mut v = raw(1, 1, &[]);
        v[8..12].copy_from_slice(&0x10000u32.to_ne_bytes());
        a.write_all(&v).unwrap();
        assert!(recv_message(&mut b).is_err());
    }
}
