//! Issue 2 acceptance: the real Linux nvme driver (in User-Mode Linux) against rhyve's NVMe
//! controller, checked with nvme-cli, fio, mkfs/fsck, blkdiscard and host-side reads of the images.

mod common;
use common::*;

const MIB: u64 = 1 << 20;

#[test]
fn nvme_cli_reports_configuration_for_512_and_4096_formats() {
    let d = scratch("ident");
    let a = image(&d, "a.img", 64 * MIB);
    let b1 = image(&d, "b1.img", 96 * MIB);
    let b2 = image(&d, "b2.img", 32 * MIB);
    let rh = Rhyve::start(
        &d,
        &[
            &format!("4,nvme,{},ser=RHYVE0001,mn=rhyve test A", a.display()),
            &format!(
                "5,nvme,{},sectorsz=4096,{},ser=RHYVE0002,mn=rhyve test B,maxq=4",
                b1.display(),
                b2.display()
            ),
        ],
    );
    let run = run_guest(
        &d,
        &rh,
        r#"set -e
nvme list
for c in /sys/class/nvme/nvme*; do
  n=$(basename $c); s=$(cat $c/serial | tr -d ' ')
  echo "IDCTRL serial=$s nn=$(nvme id-ctrl /dev/$n | awk -F: '/^nn /{gsub(/ /,"",$2); print $2}') mn=$(nvme id-ctrl /dev/$n | awk -F': ' '/^mn /{print $2}' | sed 's/ *$//' | tr ' ' _)"
  echo "FEAT7 serial=$s $(nvme get-feature -f 7 /dev/$n | grep -o 'Current value:[0-9a-fx]*')"
  nvme smart-log /dev/$n | grep -E '^(critical_warning|temperature|power_cycles|host_write_commands)'
  nvme error-log /dev/$n -e 2 | head -5
  for b in /sys/block/${n}n*; do
    dev=/dev/$(basename $b)
    echo "NS serial=$s nsid=$(cat $b/nsid) bytes=$(blockdev --getsize64 $dev) lbs=$(blockdev --getss $dev) flbas=$(nvme id-ns $dev | awk -F: '/^flbas/{gsub(/ /,"",$2); print $2}')"
  done
  nvme list | grep -q "$s"
done
nvme supported-log-pages /dev/nvme0 | grep -c 'supports 0x1' | sed 's/^/LOGPAGES=/'
nvme device-self-test /dev/nvme0 -n 1 -s 1 -w > /dev/null && echo SELFTEST_WAIT=ok
nvme self-test-log /dev/nvme0 -o json | tr -d ' \n' | grep -o '"Selftestresult":[0-9]*,"Selftestcode":[0-9]*' | head -1 | sed 's/^/SELFTEST=/'
"#,
        120,
    );
    rh.finish();
    run.assert_ok();
    let c = &run.console;
    for want in [
        "IDCTRL serial=RHYVE0001 nn=1 mn=rhyve_test_A",
        "IDCTRL serial=RHYVE0002 nn=2 mn=rhyve_test_B",
        "NS serial=RHYVE0001 nsid=1 bytes=67108864 lbs=512 flbas=0",
        "NS serial=RHYVE0002 nsid=1 bytes=100663296 lbs=4096 flbas=0x1",
        "NS serial=RHYVE0002 nsid=2 bytes=33554432 lbs=512 flbas=0",
        "FEAT7 serial=RHYVE0001 Current value:",
    ] {
        assert!(c.contains(want), "missing {want:?} in console:\n{c}");
    }
    assert!(
        c.contains("critical_warning") && c.contains("temperature"),
        "smart-log output missing:\n{c}"
    );
    // LIDs 00h-06h; a short self-test that nvme-cli waits for (it needs to see progress)
    // and then finds "completed without error" in the log.
    assert_eq!(run.value("LOGPAGES").as_deref(), Some("7"), "console:\n{c}");
    assert_eq!(
        run.value("SELFTEST_WAIT").as_deref(),
        Some("ok"),
        "console:\n{c}"
    );
    assert_eq!(
        run.value("SELFTEST").as_deref(),
        Some("\"Selftestresult\":0,\"Selftestcode\":1"),
        "console:\n{c}"
    );
}

#[test]
fn fio_verify_4k_and_128k_and_host_sees_the_bytes() {
    let d = scratch("fio");
    let img = image(&d, "disk.img", 256 * MIB);
    let rh = Rhyve::start(&d, &[&format!("4,nvme,{},ser=FIO1", img.display())]);
    let run = run_guest(&d, &rh, &fio_verify_script("/dev/nvme0n1"), 600);
    let stats = rh.finish();
    run.assert_ok();
    let guest = run.value("SHA").expect("guest printed no SHA");
    assert_eq!(
        guest,
        host_sha256(&img, 0, 192 * MIB),
        "host image differs from what the guest read"
    );
    assert!(stats.contains("write_commands="), "no stats: {stats}");
}

#[test]
fn ext4_mkfs_mount_fsck_and_remount_checksums() {
    let d = scratch("ext4");
    let img = image(&d, "disk.img", 128 * MIB);
    let rh = Rhyve::start(&d, &[&format!("4,nvme,{}", img.display())]);
    let run = run_guest(&d, &rh, &ext4_roundtrip_script("/dev/nvme0n1"), 300);
    rh.finish();
    run.assert_ok();
    assert_eq!(run.value("FSCK").as_deref(), Some("clean"));
    assert_eq!(run.value("SUMS").as_deref(), Some("match"));
    // The host agrees the file system is consistent.
    assert_host_fsck_clean(&img);
}

#[test]
fn blkdiscard_and_write_zeroes_zero_the_host_file() {
    let d = scratch("zero");
    let img = image(&d, "disk.img", 64 * MIB);
    fill(&img, 16 * MIB, 0xa5);
    let rh = Rhyve::start(&d, &[&format!("4,nvme,{}", img.display())]);
    let run = run_guest(
        &d,
        &rh,
        r#"set -e
blkdiscard -o 0 -l 4194304 /dev/nvme0n1
nvme write-zeroes /dev/nvme0n1 -n 1 -s 16384 -c 2047
echo DONE=1
"#,
        120,
    );
    rh.finish();
    run.assert_ok();
    let data = std::fs::read(&img).unwrap();
    let zero = |r: std::ops::Range<u64>| {
        data[r.start as usize..r.end as usize]
            .iter()
            .all(|&b| b == 0)
    };
    let pat = |r: std::ops::Range<u64>| {
        data[r.start as usize..r.end as usize]
            .iter()
            .all(|&b| b == 0xa5)
    };
    assert!(zero(0..4 * MIB), "discarded range not zero");
    assert!(
        pat(4 * MIB..8 * MIB),
        "data next to the discard was changed"
    );
    assert!(zero(8 * MIB..9 * MIB), "write-zeroes range not zero");
    assert!(
        pat(9 * MIB..16 * MIB),
        "data after write-zeroes was changed"
    );
}

#[test]
fn two_namespaces_and_two_controllers_verify_with_fio() {
    let d = scratch("multi");
    let a1 = image(&d, "a1.img", 64 * MIB);
    let a2 = image(&d, "a2.img", 64 * MIB);
    let b = image(&d, "b.img", 64 * MIB);
    let rh = Rhyve::start(
        &d,
        &[
            &format!("4,nvme,{},{},ser=MULTI-A", a1.display(), a2.display()),
            &format!("5,nvme,{},ser=MULTI-B", b.display()),
        ],
    );
    let run = run_guest(
        &d,
        &rh,
        r#"set -e
ls /dev/nvme*n*
o="--ioengine=libaio --direct=1 --iodepth=16 --verify=crc32c --do_verify=1 --verify_fatal=1 --rw=randwrite --bs=8k --size=24M"
fio $o --name=a1 --filename=/dev/nvme0n1 --name=a2 --filename=/dev/nvme0n2 --name=b --filename=/dev/nvme1n1
for n in nvme0n1 nvme0n2 nvme1n1; do echo "SHA_$n=$(dd if=/dev/$n bs=1M count=24 2>/dev/null | sha256sum | cut -d' ' -f1)"; done
"#,
        600,
    );
    rh.finish();
    run.assert_ok();
    let mut host = vec![
        host_sha256(&a1, 0, 24 * MIB),
        host_sha256(&a2, 0, 24 * MIB),
        host_sha256(&b, 0, 24 * MIB),
    ];
    let mut guest: Vec<String> = ["nvme0n1", "nvme0n2", "nvme1n1"]
        .iter()
        .map(|n| run.value(&format!("SHA_{n}")).unwrap())
        .collect();
    // Controller probe order is the guest's business: compare as sets.
    host.sort();
    guest.sort();
    assert_eq!(host, guest);
}

#[test]
fn read_only_image_refuses_writes_with_write_protect_status() {
    let d = scratch("ro");
    let img = image(&d, "ro.img", 32 * MIB);
    fill(&img, 32 * MIB, 0xa5);
    let before = host_sha256(&img, 0, 32 * MIB);
    let rh = Rhyve::start(&d, &[&format!("4,nvme,{},ro", img.display())]);
    let run = run_guest(
        &d,
        &rh,
        r#"
echo "SHA=$(dd if=/dev/nvme0n1 bs=1M count=32 2>/dev/null | sha256sum | cut -d' ' -f1)"
echo "RO=$(cat /sys/block/nvme0n1/ro)"
head -c 512 /dev/zero > /tmp/z
nvme write /dev/nvme0n1 -s 0 -c 0 -z 512 -d /tmp/z 2>&1 | tee /tmp/w; true
grep -qi 'write protected' /tmp/w && echo WRITE=protected
dd if=/dev/zero of=/dev/nvme0n1 bs=4k count=1 oflag=direct 2>/dev/null && echo DD=ok || echo DD=refused
exit 0
"#,
        120,
    );
    rh.finish();
    run.assert_ok();
    assert_eq!(run.value("SHA").unwrap(), before);
    assert_eq!(run.value("RO").as_deref(), Some("1"));
    assert_eq!(
        run.value("WRITE").as_deref(),
        Some("protected"),
        "console:\n{}",
        run.console
    );
    assert_eq!(run.value("DD").as_deref(), Some("refused"));
    assert_eq!(
        host_sha256(&img, 0, 32 * MIB),
        before,
        "read-only image changed"
    );
}

#[test]
fn controller_reset_during_fio_verify() {
    let d = scratch("reset");
    let img = image(&d, "disk.img", 128 * MIB);
    let rh = Rhyve::start(&d, &[&format!("4,nvme,{}", img.display())]);
    let run = run_guest(
        &d,
        &rh,
        r#"set -e
fio --name=r --filename=/dev/nvme0n1 --ioengine=libaio --direct=1 --iodepth=32 --rw=randwrite --bs=4k --size=48M --verify=crc32c --do_verify=1 --verify_fatal=1 > /tmp/fio.out 2>&1 &
pid=$!
sleep 1
nvme reset /dev/nvme0
sleep 1
nvme reset /dev/nvme0
wait $pid && echo FIO=ok || { cat /tmp/fio.out; echo FIO=failed; }
grep -E 'err= *0' /tmp/fio.out | head -2
"#,
        600,
    );
    rh.finish();
    run.assert_ok();
    assert_eq!(
        run.value("FIO").as_deref(),
        Some("ok"),
        "console:\n{}",
        run.console
    );
}

#[test]
fn smart_counters_persist_across_power_cycles() {
    let d = scratch("smart");
    let img = image(&d, "disk.img", 32 * MIB);
    let state = d.join("smart.txt");
    let spec = format!(
        "4,nvme,{},ser=SMART1,smart={}",
        img.display(),
        state.display()
    );
    let script = r#"set -e
dd if=/dev/urandom of=/dev/nvme0n1 bs=1M count=4 oflag=direct 2>/dev/null
nvme smart-log /dev/nvme0 | tee /tmp/s
echo "CYCLES=$(awk -F: '/^power_cycles/{gsub(/[ \t]/,"",$2); print $2}' /tmp/s)"
echo "UNSAFE=$(awk -F: '/^unsafe_shutdowns/{gsub(/[ \t]/,"",$2); print $2}' /tmp/s)"
echo "WRITES=$(awk -F: '/^host_write_commands/{gsub(/[ \t,]/,"",$2); print $2}' /tmp/s)"
"#;
    let mut writes = Vec::new();
    for cycle in 1..=2 {
        let rh = Rhyve::start(&d, &[&spec]);
        let run = run_guest(&d, &rh, script, 120);
        rh.finish();
        run.assert_ok();
        assert_eq!(
            run.value("CYCLES").unwrap(),
            cycle.to_string(),
            "console:\n{}",
            run.console
        );
        // Linux shuts the controller down (CC.SHN) at power-off: no unsafe shutdowns.
        assert_eq!(run.value("UNSAFE").as_deref(), Some("0"));
        writes.push(run.value("WRITES").unwrap().parse::<u64>().unwrap());
    }
    assert!(
        writes[1] > writes[0],
        "write counts did not accumulate: {writes:?}"
    );
}
