//! Crash durability: the HBA is killed at random moments while NCQ writes run, 100 times over;
//! every write it acknowledged and then covered with a completed FLUSH CACHE EXT (or wrote with
//! FUA) must be in the image file afterwards. Once with SIGKILL on the image file, once as a
//! power cut (a volatile write cache in front of the file).

use std::time::Instant;

use block::crashtest::{self, Journal, BLOCK, FLUSH_EVERY};

use crate::regs::{hba, port as preg, pxis};
use crate::spec::cmd;
use crate::testdrv::{Cmd, Driver, BUF};

/// NCQ tags in use.
const DEPTH: u8 = crashtest::DEPTH as u8;

#[test]
fn flushed_and_fua_writes_survive_sigkill() {
    crashtest::child_or_campaign(
        "AHCI",
        "tests::crash::flushed_and_fua_writes_survive_sigkill",
        0x6168_6369,
        false,
        child,
    );
}

#[test]
fn flushed_and_fua_writes_survive_a_power_cut() {
    crashtest::child_or_campaign(
        "AHCI",
        "tests::crash::flushed_and_fua_writes_survive_a_power_cut",
        0x6168_636a,
        true,
        child,
    );
}

/// The child: random NCQ 4 KiB writes (one in flight per block), some FUA, a FLUSH CACHE EXT
/// after every few dozen (with the queue drained, as ATA requires for a non-queued command),
/// each acknowledgement reported, until killed.
fn child(a: crashtest::ChildArgs) {
    let mut d = if a.cache {
        Driver::started(vec![crate::testdrv::disk(a.backend(), 512, 512)])
    } else {
        Driver::from_spec(&format!("5,ahci-hd,{}", a.image.display()))
            .unwrap()
            .start()
    };
    let mut journal = Journal::new(&a);
    let mut tags: [Option<(u64, u64, bool)>; 32] = [None; 32];
    let mut since_flush = 0u64;
    journal.ready();
    let t0 = Instant::now();
    while t0.elapsed() < crashtest::CHILD_LIFETIME {
        if since_flush >= FLUSH_EVERY {
            while tags.iter().any(Option::is_some) {
                reap(&mut d, &mut tags, &mut journal);
            }
            let covers = journal.acks();
            let done = d.exec(0, 0, &Cmd::ata(cmd::FLUSH_CACHE_EXT));
            assert!(!done.failed(), "FLUSH CACHE EXT failed: {done:?}");
            journal.flushed(covers);
            since_flush = 0;
        }
        let mut issue = 0u32;
        for tag in 0..DEPTH {
            if tags[usize::from(tag)].is_some() {
                continue;
            }
            let crashtest::BlockWrite {
                lba,
                seq,
                fua,
                data,
            } = journal.next_write();
            let buf = BUF + u64::from(tag) * BLOCK as u64;
            d.write_mem(buf, &data);
            let mut c = Cmd::fpdma(cmd::WRITE_FPDMA, tag, lba * 8, 8)
                .write()
                .buf(buf, BLOCK as u64);
            if fua {
                c.fis.device |= crate::ncq::DEVICE_FUA;
            }
            d.build(0, tag, &c);
            tags[usize::from(tag)] = Some((seq, lba, fua));
            issue |= 1 << tag;
        }
        if issue != 0 {
            d.pw(0, preg::SACT, issue);
            d.pw(0, preg::CI, issue);
        }
        since_flush += reap(&mut d, &mut tags, &mut journal);
    }
    std::process::exit(0);
}

/// Report the writes that completed since the last look; returns how many.
fn reap(d: &mut Driver, tags: &mut [Option<(u64, u64, bool)>; 32], journal: &mut Journal) -> u64 {
    let is = d.pr(0, preg::IS);
    assert_eq!(is & pxis::TFES, 0, "a write failed: PxIS {is:#x}");
    d.pw(0, preg::IS, is);
    d.w32(hba::IS, 1);
    let sact = d.pr(0, preg::SACT);
    let mut n = 0;
    for (tag, t) in tags.iter_mut().enumerate() {
        if sact & (1 << tag) != 0 {
            continue;
        }
        if let Some((seq, lba, fua)) = t.take() {
            journal.acked(seq, lba, fua);
            n += 1;
        }
    }
    if n == 0 {
        std::thread::yield_now();
    }
    n
}
