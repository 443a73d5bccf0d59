//! libFuzzer entry point for the `ahci` harness (crates/fuzzing/src/ahci.rs).
#![no_main]

#[global_allocator]
static ALLOC: fuzzing::CountingAlloc = fuzzing::CountingAlloc;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::ahci::run(data));
