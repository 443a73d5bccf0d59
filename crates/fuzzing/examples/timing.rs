//! Time the harnesses over a corpus: `cargo run --release -p fuzzing --example timing -- TARGET DIR`.
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let run: fn(&[u8]) = match args[1].as_str() {
        "nvme" => fuzzing::nvme::run,
        "ahci" => fuzzing::ahci::run,
        "pci_config" => fuzzing::pci_config::run,
        "virtio_blk" => fuzzing::virtio_blk::run,
        _ => fuzzing::uml_msg::run,
    };
    let files: Vec<_> = std::fs::read_dir(&args[2])
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    let t = std::time::Instant::now();
    for f in &files {
        run(f);
    }
    println!(
        "{} inputs, {:?} per input",
        files.len(),
        t.elapsed() / files.len() as u32
    );
}
