#!/usr/bin/env bash
# Line coverage the committed corpora reach in the device crates: replays them on stable with
# -C instrument-coverage (crates/fuzzing/tests/replay.rs) and reports per file with llvm-cov.
# Needs llvm-profdata/llvm-cov of rustc's LLVM major version (Debian: llvm-<N>).
#   bash fuzz/coverage.sh [TARGET...]      (default: all five)
set -euo pipefail
cd "$(dirname "$0")/.."
major=$(rustc --version --verbose | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
prof=$(command -v "llvm-profdata-$major" || echo "/usr/lib/llvm-$major/bin/llvm-profdata")
cov=$(command -v "llvm-cov-$major" || echo "/usr/lib/llvm-$major/bin/llvm-cov")
[[ -x $prof && -x $cov ]] || { echo "coverage: needs llvm-$major (apt-get install llvm-$major)" >&2; exit 1; }
out=target/fuzz-coverage
rm -rf "$out/profraw"
mkdir -p "$out/profraw"
tests=("$@")
((${#tests[@]})) || tests=(nvme ahci pci_config uml_msg virtio_blk)
CARGO_TARGET_DIR=$out/build RUSTFLAGS="-C instrument-coverage" \
    LLVM_PROFILE_FILE="$PWD/$out/profraw/%p-%m.profraw" \
    cargo test -q -p fuzzing --test replay -- --test-threads=1 --exact \
    $(printf -- '%s_corpus ' "${tests[@]}") >&2
"$prof" merge -sparse "$out"/profraw/*.profraw -o "$out/replay.profdata"
bin=$(find "$out/build/debug/deps" -maxdepth 1 -type f -executable -name 'replay-*' | head -n 1)
"$cov" report "$bin" -instr-profile="$out/replay.profdata" \
    --ignore-filename-regex='(\.cargo|rustc|crates/fuzzing|crates/block/src/(aio_tests|testutil))' \
    | sed -n '1,2p;/\/src\//p;/^TOTAL/p'
