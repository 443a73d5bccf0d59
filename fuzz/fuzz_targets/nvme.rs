//! libFuzzer entry point for the `nvme` harness (crates/fuzzing/src/nvme.rs).
#![no_main]

#[global_allocator]
static ALLOC: fuzzing::CountingAlloc = fuzzing::CountingAlloc;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::nvme::run(data));
