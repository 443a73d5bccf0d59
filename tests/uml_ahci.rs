//! Issue 3 acceptance: the real Linux ahci/libata drivers (in User-Mode Linux) against rhyve's
//! AHCI controller: SATA disks and an ATAPI CD-ROM, checked with hdparm, smartctl, fio, mkfs/fsck,
//! blkdiscard, an ISO mount and host-side reads of the images.

mod common;
use common::*;

const MIB: u64 = 1 << 20;

/// An ISO 9660 image holding `hello.bin` with known contents; returns (iso, sha256 of the file).
fn make_iso(dir: &std::path::Path) -> (std::path::PathBuf, String) {
    let src = dir.join("isosrc");
    std::fs::create_dir_all(&src).unwrap();
    let data: Vec<u8> = (0..3 * MIB as usize + 123)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    std::fs::write(src.join("hello.bin"), &data).unwrap();
    let iso = dir.join("x.iso");
    let tool = if which("genisoimage") {
        "genisoimage"
    } else {
        "xorrisofs"
    };
    let st = std::process::Command::new(tool)
        .args(["-quiet", "-J", "-R", "-V", "RHYVE", "-o"])
        .arg(&iso)
        .arg(&src)
        .status()
        .expect("genisoimage");
    assert!(st.success());
    let sha = host_sha256(&src.join("hello.bin"), 0, data.len() as u64);
    (iso, sha)
}

fn which(t: &str) -> bool {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {t}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn libata_links_and_tools_see_a_real_disk() {
    let d = scratch("ahci-ident");
    let a = image(&d, "a.img", 64 * MIB);
    let b = image(&d, "b.img", 64 * MIB);
    let rh = Rhyve::start(
        &d,
        &[&format!(
            "5,ahci,hd:{},ser=AHCISER01,model=rhyve SATA A,hd:{},sectorsize=512/4096,ser=AHCISER02",
            a.display(),
            b.display()
        )],
    );
    let run = run_guest(
        &d,
        &rh,
        r#"set -e
dmesg | grep -E 'SATA link up' || true
for s in sda sdb; do
  echo "DEV $s bytes=$(blockdev --getsize64 /dev/$s) lss=$(blockdev --getss /dev/$s) pss=$(blockdev --getpbsz /dev/$s) qd=$(cat /sys/block/$s/device/queue_depth)"
done
hdparm -I /dev/sda > /tmp/i
cat /tmp/i
grep -q 'Model Number: *rhyve SATA A' /tmp/i && echo MODEL=ok
grep -q 'Serial Number: *AHCISER01' /tmp/i && echo SERIAL=ok
grep -q 'Queue depth: 32' /tmp/i && echo NCQ=32
grep -q 'TRIM supported' /tmp/i && echo TRIM=yes
smartctl -H /dev/sda | tee /tmp/h
grep -q PASSED /tmp/h && echo SMART=passed
smartctl -t short /dev/sda > /dev/null && echo SELFTEST_START=ok
smartctl -l selftest /dev/sda | tee /tmp/st
grep -q '^# 1  Short offline  *Completed without error' /tmp/st && echo SELFTEST=completed
smartctl -l error /dev/sda | grep -q 'No Errors Logged' && echo ERRLOG=empty
"#,
        120,
    );
    rh.finish();
    run.assert_ok();
    let c = &run.console;
    assert!(c.contains("SATA link up 6.0 Gbps"), "link speed:\n{c}");
    assert!(
        c.contains("DEV sda bytes=67108864 lss=512 pss=512"),
        "sda geometry:\n{c}"
    );
    assert!(
        c.contains("DEV sdb bytes=67108864 lss=512 pss=4096"),
        "sdb 512e geometry:\n{c}"
    );
    let qd: Vec<&str> = c.lines().filter_map(|l| l.split("qd=").nth(1)).collect();
    assert!(
        !qd.is_empty() && qd.iter().all(|q| *q == "31" || *q == "32"),
        "queue depth: {qd:?}"
    );
    for (k, v) in [
        ("MODEL", "ok"),
        ("SERIAL", "ok"),
        ("NCQ", "32"),
        ("TRIM", "yes"),
        ("SMART", "passed"),
        ("SELFTEST_START", "ok"),
        ("SELFTEST", "completed"),
        ("ERRLOG", "empty"),
    ] {
        assert_eq!(run.value(k).as_deref(), Some(v), "{k}; console:\n{c}");
    }
}

#[test]
fn ahci_4kn_disk_reports_4096_sectors() {
    let d = scratch("ahci-4kn");
    let a = image(&d, "a.img", 64 * MIB);
    let rh = Rhyve::start(&d, &[&format!("5,ahci-hd,{},sectorsz=4096", a.display())]);
    let run = run_guest(
        &d,
        &rh,
        "echo \"DEV bytes=$(blockdev --getsize64 /dev/sda) lss=$(blockdev --getss /dev/sda) pss=$(blockdev --getpbsz /dev/sda)\"",
        120,
    );
    rh.finish();
    run.assert_ok();
    assert!(
        run.console.contains("DEV bytes=67108864 lss=4096 pss=4096"),
        "console:\n{}",
        run.console
    );
}

#[test]
fn ahci_fio_verify_and_host_sees_the_bytes() {
    let d = scratch("ahci-fio");
    let img = image(&d, "disk.img", 256 * MIB);
    let rh = Rhyve::start(&d, &[&format!("5,ahci,hd:{}", img.display())]);
    let run = run_guest(&d, &rh, &fio_verify_script("/dev/sda"), 600);
    rh.finish();
    run.assert_ok();
    assert_eq!(run.value("SHA").unwrap(), host_sha256(&img, 0, 192 * MIB));
}

#[test]
fn ahci_ext4_fsck_and_discard_zeroes() {
    let d = scratch("ahci-ext4");
    let img = image(&d, "disk.img", 128 * MIB);
    let z = image(&d, "z.img", 32 * MIB);
    fill(&z, 32 * MIB, 0xa5);
    let rh = Rhyve::start(
        &d,
        &[&format!("5,ahci,hd:{},hd:{}", img.display(), z.display())],
    );
    let run = run_guest(
        &d,
        &rh,
        r#"set -e
mkfs.ext4 -q -F /dev/sda
mkdir -p /tmp/m && mount /dev/sda /tmp/m
dd if=/dev/urandom of=/tmp/m/big bs=1M count=16 2>/dev/null
(cd /tmp/m && sha256sum big) > /tmp/sums
rm -f /tmp/m/big2; dd if=/dev/urandom of=/tmp/m/big2 bs=1M count=8 2>/dev/null; sync; rm /tmp/m/big2
fstrim -v /tmp/m
sync; umount /tmp/m
fsck.ext4 -fn /dev/sda && echo FSCK=clean
mount /dev/sda /tmp/m && (cd /tmp/m && sha256sum -c --quiet /tmp/sums) && echo SUMS=match
umount /tmp/m
blkdiscard -o 1048576 -l 4194304 /dev/sdb
echo DONE=1
"#,
        300,
    );
    rh.finish();
    run.assert_ok();
    assert_eq!(run.value("FSCK").as_deref(), Some("clean"));
    assert_eq!(run.value("SUMS").as_deref(), Some("match"));
    let data = std::fs::read(&z).unwrap();
    assert!(
        data[..MIB as usize].iter().all(|&b| b == 0xa5),
        "bytes before the discard changed"
    );
    assert!(
        data[MIB as usize..5 * MIB as usize].iter().all(|&b| b == 0),
        "discarded range not zero"
    );
    assert!(
        data[5 * MIB as usize..].iter().all(|&b| b == 0xa5),
        "bytes after the discard changed"
    );
    assert_host_fsck_clean(&img);
}

#[test]
fn two_disks_a_cdrom_and_a_read_only_disk() {
    let d = scratch("ahci-cd");
    let a = image(&d, "a.img", 64 * MIB);
    let ro = image(&d, "ro.img", 16 * MIB);
    fill(&ro, 16 * MIB, 0x5a);
    let ro_sha = host_sha256(&ro, 0, 16 * MIB);
    let (iso, file_sha) = make_iso(&d);
    let iso_sha = host_sha256(&iso, 0, std::fs::metadata(&iso).unwrap().len());
    let rh = Rhyve::start(
        &d,
        &[&format!(
            "5,ahci,hd:{},hd:{},ro,cd:{}",
            a.display(),
            ro.display(),
            iso.display()
        )],
    );
    let run = run_guest(
        &d,
        &rh,
        r#"
ls -l /dev/sd* /dev/sr0
fio --name=a --filename=/dev/sda --ioengine=libaio --direct=1 --iodepth=16 --rw=randwrite --bs=8k --size=16M --verify=crc32c --do_verify=1 --verify_fatal=1 >/tmp/fio 2>&1 && echo FIO=ok
echo "ROSHA=$(dd if=/dev/sdb bs=1M count=16 2>/dev/null | sha256sum | cut -d' ' -f1)"
dd if=/dev/zero of=/dev/sdb bs=4k count=1 oflag=direct 2>/dev/null && echo ROWRITE=ok || echo ROWRITE=refused
mkdir -p /tmp/cd && mount -t iso9660 -o ro /dev/sr0 /tmp/cd && echo "FILESHA=$(sha256sum /tmp/cd/hello.bin | cut -d' ' -f1)"
umount /tmp/cd
dd if=/dev/zero of=/dev/sr0 bs=2048 count=1 2>/dev/null && echo CDWRITE=ok || echo CDWRITE=refused
exit 0
"#,
        300,
    );
    rh.finish();
    run.assert_ok();
    assert_eq!(
        run.value("FIO").as_deref(),
        Some("ok"),
        "console:\n{}",
        run.console
    );
    assert_eq!(run.value("ROSHA").unwrap(), ro_sha);
    assert_eq!(run.value("ROWRITE").as_deref(), Some("refused"));
    assert_eq!(
        run.value("FILESHA").as_deref(),
        Some(file_sha.as_str()),
        "console:\n{}",
        run.console
    );
    assert_eq!(run.value("CDWRITE").as_deref(), Some("refused"));
    assert_eq!(
        host_sha256(&ro, 0, 16 * MIB),
        ro_sha,
        "read-only image changed"
    );
    assert_eq!(
        host_sha256(&iso, 0, std::fs::metadata(&iso).unwrap().len()),
        iso_sha,
        "ISO changed"
    );
}

#[test]
fn read_past_end_fails_and_disk_keeps_working() {
    let d = scratch("ahci-eod");
    let a = image(&d, "a.img", 16 * MIB);
    fill(&a, 16 * MIB, 0x3c);
    let rh = Rhyve::start(&d, &[&format!("5,ahci,hd:{}", a.display())]);
    let run = run_guest(
        &d,
        &rh,
        r#"
# ATA PASS-THROUGH(16), PIO data-in, READ SECTORS EXT of one sector: straight to the drive,
# past libata's own range checks. (hdparm --read-sector misreads libata's fixed-format sense and
# reports success even when the drive refuses, so its verdict is useless here.)
sg_raw -r 512 /dev/sda 85 09 0e 00 00 00 01 00 00 00 80 00 00 40 24 00 > /tmp/r 2>&1 && echo PAST=ok || echo PAST=failed
cat /tmp/r | head -8
sg_raw -r 512 /dev/sda 85 09 0e 00 00 00 01 00 ff 00 7f 00 00 40 24 00 > /tmp/l 2>&1 && echo LAST=ok || echo LAST=failed
echo "SHA=$(dd if=/dev/sda bs=1M count=16 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
exit 0
"#,
        120,
    );
    rh.finish();
    run.assert_ok();
    assert_eq!(
        run.value("PAST").as_deref(),
        Some("failed"),
        "console:\n{}",
        run.console
    );
    assert_eq!(
        run.value("LAST").as_deref(),
        Some("ok"),
        "console:\n{}",
        run.console
    );
    assert_eq!(run.value("SHA").unwrap(), host_sha256(&a, 0, 16 * MIB));
}
