#!/usr/bin/env bash
# The whole test suite: unit tests of every crate plus the end-to-end tests that boot User-Mode
# Linux with the real nvme/ahci drivers against rhyve. Installs what it needs (apt packages, the
# UML kernel build, cached under ~/.cache/rhyve) on a fresh Debian 12 machine.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=../guest/common.sh
source guest/common.sh

# Every package a test installs, installed here before any test runs, so no test changes the
# machine under another. Debian's qemu-system-x86 (the nested tier) can remove a newer
# qemu-utils that a machine image carries from backports (their common files conflict): seen
# taking qemu-img away from the NBD tests mid-run. So qemu-utils is ensured after it, which
# puts back the version that matches. The list is the nested tier's (tests/nested_linux.rs,
# run_tier), which keeps its own calls for when it runs alone.
rhyve_ensure_pkgs run-all qemu-system-x86 linux-image-amd64 busybox-static fio kmod cpio xz-utils
rhyve_ensure_pkgs run-all qemu-utils

# The UML kernel + guest tools (apt installs happen inside, once).
RHYVE_UML_KERNEL=$(bash guest/build-uml.sh | tail -n 1)
export RHYVE_UML_KERNEL
initrd_dir=${RHYVE_CACHE:-$HOME/.cache/rhyve}/initrd
mkdir -p "$initrd_dir"
RHYVE_UML_INITRD=$initrd_dir/initrd-$$.cpio.gz
bash guest/mkinitramfs.sh "$RHYVE_UML_INITRD" >/dev/null
export RHYVE_UML_INITRD
trap 'rm -f "$RHYVE_UML_INITRD"' EXIT

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast "$@"
else
    cargo test --workspace --no-fail-fast "$@"
fi
