//! Print what a fuzz input means and run it: `cargo run -p fuzzing --example show -- TARGET FILE`.
use arbitrary::{Arbitrary, Unstructured};

fn show<'a, T: Arbitrary<'a> + std::fmt::Debug>(data: &'a [u8]) {
    match T::arbitrary(&mut Unstructured::new(data)) {
        Ok(v) => println!("{v:#?}"),
        Err(e) => println!("not an input: {e}"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (target, file) = (&args[1], &args[2]);
    let data = std::fs::read(file).expect("input file");
    match target.as_str() {
        "nvme" => {
            show::<fuzzing::nvme::Input>(&data);
            fuzzing::nvme::run(&data);
        }
        "ahci" => {
            show::<fuzzing::ahci::Input>(&data);
            fuzzing::ahci::run(&data);
        }
        "pci_config" => {
            show::<fuzzing::pci_config::Input>(&data);
            fuzzing::pci_config::run(&data);
        }
        "uml_msg" => {
            show::<fuzzing::uml_msg::Input>(&data);
            fuzzing::uml_msg::run(&data);
        }
        "virtio_blk" => {
            show::<fuzzing::virtio_blk::Input>(&data);
            fuzzing::virtio_blk::run(&data);
        }
        t => panic!("unknown target {t}"),
    }
    println!("ok");
}
