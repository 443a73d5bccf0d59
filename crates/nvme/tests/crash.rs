//! Crash durability: the controller is killed with SIGKILL at random moments while it writes,
//! 100 times over; every write it acknowledged and then covered with a completed Flush (or
//! wrote with FUA) must be in the image file afterwards.

mod common;

use std::time::{Duration, Instant};

use block::crashtest::{self, Journal, Rng, BLOCK};
use common::*;

/// Test blocks in the image (16 MiB).
const BLOCKS: u64 = 4096;
/// Kills.
const RUNS: usize = 100;
/// Commands in flight.
const DEPTH: usize = 24;
/// A Flush after this many acknowledged writes.
const FLUSH_EVERY: u64 = 40;

#[test]
fn flushed_and_fua_writes_survive_sigkill() {
    if let Some(a) = crashtest::child_args() {
        child(a);
        return;
    }
    crashtest::assert_durable(
        "NVMe",
        "flushed_and_fua_writes_survive_sigkill",
        BLOCKS,
        RUNS,
        0x6e76_6d65,
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
    let mut d = TestDriver::ready(&format!("4,nvme,{}", a.image.display()));
    let mut rng = Rng::new(a.seed);
    let mut journal = Journal::default();
    let mut free: Vec<u64> = (0..DEPTH).map(|_| d.alloc(BLOCK as u64)).collect();
    let mut jobs: std::collections::HashMap<u16, Job> = Default::default();
    let mut busy = vec![false; BLOCKS as usize];
    let (mut seq, mut since_flush, mut flushing) = (a.seq_base, 0u64, false);
    journal.ready();
    let t0 = Instant::now();
    while t0.elapsed() < crashtest::CHILD_LIFETIME {
        while jobs.len() < DEPTH {
            if since_flush >= FLUSH_EVERY && !flushing {
                let covers = journal.acks();
                let cid = d.submit(1, sqe(0x00, 1));
                jobs.insert(cid, Job::Flush { covers });
                (since_flush, flushing) = (0, true);
                continue;
            }
            let Some(buf) = free.pop() else { break };
            let lba = loop {
                let l = rng.below(BLOCKS);
                if !busy[l as usize] {
                    break l;
                }
            };
            seq += 1;
            let fua = rng.below(8) == 0;
            d.write_mem(buf, &crashtest::pattern(lba, seq));
            let mut s = TestDriver::rw(0x01, 1, lba * 8, 8, buf, 0);
            if fua {
                s.cdw12 |= 1 << 30;
            }
            let cid = d.submit(1, s);
            busy[lba as usize] = true;
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
                busy[lba as usize] = false;
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
