fn main() {
    let t = std::time::Instant::now();
    for i in 0..50u8 {
        fuzzing::nvme::run(&[i, 0, 0, 0, 0]);
    }
    println!("nvme: {:?} per run", t.elapsed() / 50);
    let t = std::time::Instant::now();
    for i in 0..50u8 {
        fuzzing::ahci::run(&[i, 0, 0, 0, 0]);
    }
    println!("ahci: {:?} per run", t.elapsed() / 50);
}
