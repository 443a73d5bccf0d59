//! libFuzzer entry point for the `virtio_blk` harness (crates/fuzzing/src/virtio_blk.rs).
#![no_main]

#[global_allocator]
static ALLOC: fuzzing::CountingAlloc = fuzzing::CountingAlloc;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::virtio_blk::run(data));
