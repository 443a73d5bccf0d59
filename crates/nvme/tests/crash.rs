//! Crash durability: the controller is killed at random moments while it writes, 100 times
//! over; every write it acknowledged and then covered with a completed Flush (or wrote with
//! FUA) must be in the image file afterwards. Once with SIGKILL on the image file (the real
//! backend, io_uring), once as a power cut (a volatile write cache in front of the file).

mod common;

use std::time::{Duration, Instant};

use block::crashtest::{self, Journal, BLOCK, DEPTH, FLUSH_EVERY};
use common::*;

#[test]
fn flushed_and_fua_writes_survive_sigkill() {
    crashtest::child_or_campaign(
        "NVMe",
        "flushed_and_fua_writes_survive_sigkill",
        0x6e76_6d65,
        false,
        child,
    );
}

#[test]
fn flushed_and_fua_writes_survive_a_power_cut() {
    crashtest::child_or_campaign(
        "NVMe",
        "flushed_and_fua_writes_survive_a_power_cut",
        0x6e76_6d66,
        true,
        child,
    );
}

/// What one command in flight was.
#[derive(Clone, Copy)]
enum Job {
    Write {
        seq: u64,
        lba: u64,
        fua: bool,
        buf: u64,
    },
    Flush {
        covers: u64,
    },
}

/// The child: random 4 KiB writes (one in flight per block), some with FUA, a Flush now and
/// then, each acknowledgement reported, until killed.
fn child(a: crashtest::ChildArgs) {
    let mut d = if a.cache {
        let mut d = TestDriver::with_backends("4,nvme,ram=1", vec![a.backend()]);
        d.bring_up();
        d
    } else {
        TestDriver::ready(&format!("4,nvme,{}", a.image.display()))
    };
    let mut journal = Journal::new(&a);
    let mut free: Vec<u64> = (0..DEPTH).map(|_| d.alloc(BLOCK as u64)).collect();
    let mut jobs: std::collections::HashMap<u16, Job> = Default::default();
    let (mut since_flush, mut flushing) = (0u64, false);
    journal.ready();
    let t0 = Instant::now();
    while t0.elapsed() < crashtest::CHILD_LIFETIME {
        while jobs.len() < DEPTH {
            if since_flush >= FLUSH_EVERY && !flushing {
                let covers = journal.acks();
                let cid = d.submit(1, flush(1));
                jobs.insert(cid, Job::Flush { covers });
                (since_flush, flushing) = (0, true);
                continue;
            }
            let Some(buf) = free.pop() else { break };
            let crashtest::BlockWrite {
                lba,
                seq,
                fua,
                data,
            } = journal.next_write();
            d.write_mem(buf, &data);
            let mut s = rw(IoOpcode::WRITE, 1, lba * 8, 8).prp(buf, 0);
            if fua {
                s = s.fua();
            }
            let cid = d.submit(1, s);
            jobs.insert(cid, Job::Write { seq, lba, fua, buf });
        }
        let Some(c) = d.poll_cq(1, Duration::from_secs(10)) else {
            panic!("no completion within 10 s");
        };
        assert_ok(&c);
        match jobs
            .remove(&c.cid)
            .expect("a completion for a command in flight")
        {
            Job::Write { seq, lba, fua, buf } => {
                journal.acked(seq, lba, fua);
                free.push(buf);
                since_flush += 1;
            }
            Job::Flush { covers } => {
                journal.flushed(covers);
                flushing = false;
            }
        }
    }
    std::process::exit(0);
}
