//! libFuzzer entry point for the `pci_config` harness (crates/fuzzing/src/pci_config.rs).
#![no_main]

#[global_allocator]
static ALLOC: fuzzing::CountingAlloc = fuzzing::CountingAlloc;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::pci_config::run(data));
