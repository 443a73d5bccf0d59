//! libFuzzer entry point for the `uml_msg` harness (crates/fuzzing/src/uml_msg.rs).
#![no_main]

#[global_allocator]
static ALLOC: fuzzing::CountingAlloc = fuzzing::CountingAlloc;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::uml_msg::run(data));
