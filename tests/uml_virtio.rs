//! Issue 10 acceptance, virtio-blk: the real Linux virtio_pci and virtio_blk drivers (in
//! User-Mode Linux, through virt-pci) against rhyve's virtio-blk, checked with fio, mkfs/fsck,
//! blkdiscard, sysfs and host-side reads of the images.

mod common;
use common::*;

const MIB: u64 = 1 << 20;

#[test]
fn virtio_fio_verify_4k_and_128k_and_host_sees_the_bytes() {
    let d = scratch("vblk-fio");
    let img = image(&d, "disk.img", 256 * MIB);
    let rh = Rhyve::start(
        &d,
        &[&format!("6,virtio-blk,{},ser=VBLK-FIO", img.display())],
    );
    let run = run_guest(
        &d,
        &rh,
        &format!(
            "echo \"SERIAL=$(cat /sys/block/vda/serial)\"\n{}",
            fio_verify_script("/dev/vda")
        ),
        600,
    );
    let stats = rh.finish();
    run.assert_ok();
    assert_eq!(run.value("SERIAL").as_deref(), Some("VBLK-FIO"));
    let guest = run.value("SHA").expect("guest printed no SHA");
    assert_eq!(guest, host_sha256(&img, 0, 192 * MIB), "host image differs");
    assert!(stats.contains("bytes_written="), "no stats: {stats}");
}

#[test]
fn virtio_ext4_mkfs_mount_fsck_and_remount_checksums() {
    let d = scratch("vblk-ext4");
    let img = image(&d, "disk.img", 128 * MIB);
    let rh = Rhyve::start(&d, &[&format!("6,virtio-blk,{}", img.display())]);
    let run = run_guest(&d, &rh, &ext4_roundtrip_script("/dev/vda"), 300);
    rh.finish();
    run.assert_ok();
    assert_eq!(run.value("FSCK").as_deref(), Some("clean"));
    assert_eq!(run.value("SUMS").as_deref(), Some("match"));
    assert_host_fsck_clean(&img);
}

#[test]
fn virtio_blkdiscard_and_write_zeroes_zero_the_host_file() {
    let d = scratch("vblk-zero");
    let img = image(&d, "disk.img", 64 * MIB);
    fill(&img, 16 * MIB, 0xa5);
    let rh = Rhyve::start(&d, &[&format!("6,virtio-blk,{}", img.display())]);
    let run = run_guest(
        &d,
        &rh,
        r#"set -e
echo "DMAX=$(cat /sys/block/vda/queue/discard_max_bytes)"
echo "ZMAX=$(cat /sys/block/vda/queue/write_zeroes_max_bytes)"
blkdiscard -o 0 -l 4194304 /dev/vda
blkdiscard -z -o 8388608 -l 1048576 /dev/vda
echo DONE=1
"#,
        120,
    );
    rh.finish();
    run.assert_ok();
    assert_ne!(
        run.value("DMAX").as_deref(),
        Some("0"),
        "discard not offered"
    );
    assert_ne!(
        run.value("ZMAX").as_deref(),
        Some("0"),
        "write zeroes not offered"
    );
    let data = std::fs::read(&img).unwrap();
    let all = |r: std::ops::Range<u64>, b: u8| {
        data[r.start as usize..r.end as usize]
            .iter()
            .all(|&x| x == b)
    };
    assert!(all(0..4 * MIB, 0), "discarded range not zero");
    assert!(
        all(4 * MIB..8 * MIB, 0xa5),
        "data next to the discard changed"
    );
    assert!(all(8 * MIB..9 * MIB, 0), "write-zeroes range not zero");
    assert!(
        all(9 * MIB..16 * MIB, 0xa5),
        "data after write-zeroes changed"
    );
}

#[test]
fn virtio_read_only_image_refuses_writes() {
    let d = scratch("vblk-ro");
    let img = image(&d, "ro.img", 32 * MIB);
    fill(&img, 32 * MIB, 0x5a);
    let before = host_sha256(&img, 0, 32 * MIB);
    let rh = Rhyve::start(&d, &[&format!("6,virtio-blk,{},ro", img.display())]);
    let run = run_guest(
        &d,
        &rh,
        r#"
echo "SHA=$(dd if=/dev/vda bs=1M count=32 2>/dev/null | sha256sum | cut -d' ' -f1)"
echo "RO=$(cat /sys/block/vda/ro)"
dd if=/dev/zero of=/dev/vda bs=4k count=1 oflag=direct 2>/dev/null && echo DD=ok || echo DD=refused
exit 0
"#,
        120,
    );
    rh.finish();
    run.assert_ok();
    assert_eq!(run.value("SHA").unwrap(), before);
    assert_eq!(run.value("RO").as_deref(), Some("1"));
    assert_eq!(run.value("DD").as_deref(), Some("refused"));
    assert_eq!(
        host_sha256(&img, 0, 32 * MIB),
        before,
        "read-only image changed"
    );
}

/// The configured geometry as Linux sees it in sysfs. (UML has one CPU, and Linux's
/// virtio_blk uses at most one interrupt-driven queue per CPU and, with one, no poll queues:
/// it reads `num_queues` and uses one. Several queues in use are covered in-process,
/// `crates/virtio/tests/blk.rs`.)
#[test]
fn virtio_configured_geometry_in_sysfs() {
    let d = scratch("vblk-geom");
    let img = image(&d, "disk.img", 64 * MIB);
    let rh = Rhyve::start(
        &d,
        &[&format!(
            "6,virtio-blk,{},queues=4,qsz=128,sectorsz=4096",
            img.display()
        )],
    );
    let run = run_guest(
        &d,
        &rh,
        r#"set -e
q=/sys/block/vda/queue
echo "LBS=$(cat $q/logical_block_size) PBS=$(cat $q/physical_block_size)"
echo "TAGS=$(cat /sys/block/vda/mq/0/nr_tags) MAXSEG=$(cat $q/max_segments) MAXSEGSZ=$(cat $q/max_segment_size)"
echo "HWQ=$(ls /sys/block/vda/mq | wc -l)"
echo "WC=$(cat $q/write_cache)"
echo "SIZE=$(blockdev --getsize64 /dev/vda)"
fio --name=geom --filename=/dev/vda --ioengine=libaio --direct=1 --iodepth=32 --rw=randwrite --bs=4k --size=16M --verify=crc32c --do_verify=1 --verify_fatal=1
echo "SHA=$(dd if=/dev/vda bs=1M count=16 2>/dev/null | sha256sum | cut -d' ' -f1)"
"#,
        300,
    );
    rh.finish();
    run.assert_ok();
    let c = &run.console;
    assert!(c.contains("LBS=4096 PBS=4096"), "console:\n{c}");
    assert!(
        c.contains("TAGS=128 MAXSEG=126 MAXSEGSZ=1048576"),
        "queue depth from qsz, seg_max (qsz - 2), size_max; console:\n{c}"
    );
    assert_eq!(run.value("HWQ").as_deref(), Some("1"));
    assert_eq!(run.value("WC").as_deref(), Some("write back"));
    assert_eq!(run.value("SIZE").as_deref(), Some("67108864"));
    assert_eq!(run.value("SHA").unwrap(), host_sha256(&img, 0, 16 * MIB));
}
