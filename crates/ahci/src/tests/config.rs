//! bhyve-style configuration through `create`: ports, aliases, per-port options, errors.

use std::path::PathBuf;

use crate::regs::{port as preg, sig};
use crate::spec::cmd;
use crate::testdrv::{Cmd, Driver, BUF};

/// A temporary image file, removed on drop.
struct Img(PathBuf);

impl Img {
    fn new(tag: &str, len: u64) -> Img {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p =
            std::env::temp_dir().join(format!("rhyve-ahci-{tag}-{}-{n}.img", std::process::id()));
        std::fs::File::create(&p).unwrap().set_len(len).unwrap();
        Img(p)
    }
    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for Img {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn err(spec: &str) -> String {
    Driver::from_spec(spec)
        .err()
        .expect("configuration should be refused")
        .to_string()
}

fn ident_string(w: &[u16; 256], at: usize, n: usize) -> String {
    w[at..at + n]
        .iter()
        .flat_map(|x| x.to_be_bytes())
        .map(char::from)
        .collect::<String>()
        .trim_end()
        .to_string()
}

#[test]
fn ports_in_order_with_their_options() {
    let hd = Img::new("hd", 4 << 20);
    let iso = Img::new("iso", 64 * 2048);
    let spec = format!(
        "5,ahci,hd:{},ser=SER123,model=My Disk,sectorsize=512/4096,cd:{},ser=CD9",
        hd.path(),
        iso.path()
    );
    let mut d = Driver::from_spec(&spec).unwrap().start();
    assert_eq!(d.r32(crate::regs::hba::PI), 0b11);
    assert_eq!(d.pr(0, preg::SIG), sig::ATA);
    assert_eq!(d.pr(1, preg::SIG), sig::ATAPI);
    let (_, w) = d.identify(0, cmd::IDENTIFY);
    assert_eq!(ident_string(&w, 10, 10), "SER123");
    assert_eq!(ident_string(&w, 27, 20), "My Disk");
    assert_eq!(w[106], 0x6003, "512e");
    assert_eq!(u32::from(w[60]) | u32::from(w[61]) << 16, 8192);
    let done = d.exec(1, 0, &Cmd::ata(cmd::IDENTIFY_PACKET).buf(BUF, 512));
    assert!(!done.failed());
    let b = d.read_mem(BUF + 20, 4);
    assert_eq!(b, b"DC 9", "CD serial");
    // Data written through the controller reaches the file.
    d.write_mem(BUF, &[0xab; 512]);
    assert!(!d
        .exec(
            0,
            0,
            &Cmd::ata(cmd::WRITE_DMA_EXT)
                .lba(3)
                .count(1)
                .buf(BUF, 512)
                .write()
        )
        .failed());
    d.dev.shutdown();
    let file = std::fs::read(&hd.0).unwrap();
    assert_eq!(&file[3 * 512..4 * 512], &[0xab; 512]);
    let stats = d.dev_stats();
    for k in [
        "commands",
        "read_bytes",
        "written_bytes",
        "interrupts",
        "errors",
    ] {
        assert!(stats.contains_key(k), "{k}");
    }
    assert_eq!(stats["written_bytes"], 512);
}

#[test]
fn aliases_and_default_identity() {
    let hd = Img::new("alias", 1 << 20);
    let mut d = Driver::from_spec(&format!("5,ahci-hd,{},sectorsz=4096,ro", hd.path()))
        .unwrap()
        .start();
    let (_, w) = d.identify(0, cmd::IDENTIFY);
    assert_eq!(w[106], 0x5000, "4Kn");
    assert_eq!(u64::from(w[100]) | u64::from(w[101]) << 16, 256);
    assert!(ident_string(&w, 10, 10).starts_with("RHYVE-"));
    assert_eq!(ident_string(&w, 27, 20), "RHYVE SATA DISK");
    let done = d.exec(
        0,
        0,
        &Cmd::ata(cmd::WRITE_DMA_EXT)
            .lba(0)
            .count(1)
            .buf(BUF, 4096)
            .write(),
    );
    assert!(done.failed(), "ro");
    let iso = Img::new("alias-cd", 16 * 2048);
    let mut d = Driver::from_spec(&format!("6,ahci-cd,{},nocache", iso.path()))
        .unwrap()
        .start();
    assert_eq!(d.pr(0, preg::SIG), sig::ATAPI);
    let mut d = Driver::from_spec("6,ahci-cd").unwrap().start();
    assert_eq!(d.pr(0, preg::SIG), sig::ATAPI, "empty tray");
    let mut d = Driver::from_spec("6,ahci,cd:").unwrap().start();
    assert_eq!(d.pr(0, preg::SIG), sig::ATAPI);
    let hd2 = Img::new("sync", 1 << 20);
    let mut d = Driver::from_spec(&format!("5,ahci,hd:{},sync,direct", hd2.path()))
        .unwrap()
        .start();
    let (_, w) = d.identify(0, cmd::IDENTIFY);
    assert_eq!(w[85] & 0x20, 0, "sync: write cache off");
}

#[test]
fn errors_name_the_problem() {
    let hd = Img::new("err", 1 << 20);
    let p = hd.path();
    assert_eq!(
        err(&format!("5,ahci,hd:{p},foo=1")),
        "ahci: unknown option 'foo': valid options are ser=, model=, sectorsz=, sectorsize=, ro, nocache, direct, sync"
    );
    assert_eq!(
        err(&format!("5,ahci,cd:{p},sectorsz=512")),
        "ahci: unknown option 'sectorsz': valid options are ser=, model=, ro, nocache, direct"
    );
    assert_eq!(
        err(&format!("5,ahci,{p}")),
        format!("ahci: unknown option '{p}': valid options are hd:PATH, cd:PATH (each followed by its options)")
    );
    assert_eq!(
        err("5,ahci,hd:/nonexistent-rhyve/disk.img"),
        "ahci: port 0: cannot open /nonexistent-rhyve/disk.img: No such file or directory"
    );
    assert!(err("5,ahci").contains("no ports"));
    assert!(err("5,ahci-hd").contains("no disk image"));
    assert!(err("5,ahci,hd:").contains("needs an image path"));
    assert_eq!(
        err(&format!("5,ahci,hd:{p},sectorsz=1024")),
        "ahci: sectorsz=1024 is invalid: use one of 512, 4096"
    );
    assert!(err(&format!("5,ahci,hd:{p},sectorsize=512/1000"))
        .starts_with("ahci: sectorsize=512/1000 is invalid"));
    assert!(err(&format!("5,ahci,hd:{p},sectorsize=4096/512")).contains("invalid"));
    assert!(err(&format!("5,ahci,hd:{p},ser=123456789012345678901"))
        .starts_with("ahci: ser=123456789012345678901 is invalid"));
    assert!(err(&format!("5,ahci,hd:{p},model=bad\u{7f}")).contains("model="));
    let many: Vec<String> = (0..33).map(|_| format!("hd:{p}")).collect();
    assert!(err(&format!("5,ahci,{}", many.join(","))).contains("at most 32"));
    let tiny = Img::new("tiny", 100);
    assert!(err(&format!("5,ahci,hd:{}", tiny.path())).contains("smaller than one 512-byte sector"));
    // 32 ports is fine.
    let ok: Vec<String> = (0..32).map(|_| format!("hd:{p},ro")).collect();
    let mut d = Driver::from_spec(&format!("5,ahci,{}", ok.join(","))).unwrap();
    assert_eq!(d.r32(crate::regs::hba::PI), u32::MAX);
    assert_eq!(d.dev.bars()[0].size, 0x2000);
}
