//! Serve a scratch PCI device to UML, logging every access — a manual smoke test of the UML
//! frontend without a real device model.
//!
//!   cargo run -p uml --example uml-scratch -- SOCKET [CLASS BAR]
//!   guest/run-uml.sh --kernel K --initrd I --script S --device SOCKET
//!
//! CLASS is base/sub/prog-if as hex (default ff0000), BAR the index holding the 4 KiB of scratch
//! registers (default 0). E.g. `010601 5` poses as an AHCI HBA so the ahci driver pokes BAR5.

#[allow(dead_code)] // shared with the tests, which use more of it
#[path = "../tests/common/scratch.rs"]
mod scratch;

use pci::{BarInfo, PciDevice};
use std::os::unix::net::UnixListener;
use std::sync::Arc;

/// Logs each access at info level so the host side shows what reached the device.
struct Logged(scratch::Scratch);

impl PciDevice for Logged {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn config_read(&self, offset: u16, data: &mut [u8]) {
        self.0.config_read(offset, data);
        log::debug!("cfg read  {offset:#05x} {data:02x?}");
    }
    fn config_write(&self, offset: u16, data: &[u8]) {
        log::info!("cfg write {offset:#05x} {data:02x?}");
        self.0.config_write(offset, data);
    }
    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) {
        self.0.bar_read(bar, offset, data);
        log::info!("bar{bar} read  {offset:#06x} {data:02x?}");
    }
    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) {
        log::info!("bar{bar} write {offset:#06x} {data:02x?}");
        self.0.bar_write(bar, offset, data);
    }
    fn bars(&self) -> Vec<BarInfo> {
        self.0.bars()
    }
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_micros()
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(sock) = args.first() else {
        eprintln!("usage: uml-scratch SOCKET [CLASS BAR]");
        std::process::exit(2);
    };
    let class = args
        .get(1)
        .map(|c| u32::from_str_radix(c, 16).expect("CLASS is hex"))
        .unwrap_or(0xff0000);
    let bar = args
        .get(2)
        .map(|b| b.parse().expect("BAR is 0-5"))
        .unwrap_or(0);
    let class = [(class >> 16) as u8, (class >> 8) as u8, class as u8];

    let _ = std::fs::remove_file(sock);
    let listener = UnixListener::bind(sock).expect("bind");
    let ctx = uml::UmlContext::new();
    let dev = Logged(scratch::Scratch::with_class(
        ctx.device_context().irq,
        class,
        bar,
    ));
    let device: Arc<dyn PciDevice> = Arc::new(dev);
    println!("listening on {sock}");
    let r = uml::serve(listener, device, ctx.mem.clone(), ctx.irq.clone());
    log::info!("server returned {r:?}; irq stats {:?}", ctx.irq.stats());
}
