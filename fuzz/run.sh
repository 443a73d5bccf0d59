#!/usr/bin/env bash
# Coverage-guided fuzzing of rhyve's guest-facing surfaces with libFuzzer (cargo-fuzz, nightly).
# The harnesses and their invariants are in crates/fuzzing; CI replays fuzz/corpus on stable
# (crates/fuzzing/tests/replay.rs).
#   bash fuzz/run.sh TARGET [RUNS]     # TARGET: nvme, ahci, pci_config, uml_msg, virtio_blk (default runs 10M)
#   bash fuzz/run.sh all [RUNS]
#   bash fuzz/run.sh cmin TARGET       # shrink the committed corpus to the inputs that add coverage
set -euo pipefail
cd "$(dirname "$0")"
targets=(nvme ahci pci_config uml_msg virtio_blk)
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
# No sanitizer: the code under test is safe Rust (the few unsafe blocks are in the block and uml
# crates' I/O paths, which the RAM-backed harnesses do not reach); throughput matters more.
# No compare tracing either: inputs are structured (arbitrary), so edge coverage guides well,
# and tracing every compare cost the NVMe harness 40% of its CPU.
fuzz() {
    local t=$1 runs=$2
    mkdir -p "corpus/$t"
    cargo +nightly fuzz run --sanitizer none --no-trace-compares "$t" "corpus/$t" -- \
        -runs="$runs" -timeout=5 -rss_limit_mb=2048 -print_final_stats=1
}
case "${1:-}" in
    cmin) cargo +nightly fuzz cmin --sanitizer none --no-trace-compares "$2" "corpus/$2" ;;
    all) for t in "${targets[@]}"; do fuzz "$t" "${2:-10000000}"; done ;;
    nvme | ahci | pci_config | uml_msg | virtio_blk) fuzz "$1" "${2:-10000000}" ;;
    *) echo "usage: $0 {${targets[*]// /|}|all} [RUNS] | cmin TARGET" >&2; exit 2 ;;
esac
