#!/usr/bin/env bash
# The whole test suite: unit tests of every crate plus the end-to-end tests that boot User-Mode
# Linux with the real nvme/ahci drivers against rhyve. Installs what it needs (apt packages, the
# UML kernel build, cached under ~/.cache/rhyve) on a fresh Debian 12 machine.
set -euo pipefail
cd "$(dirname "$0")/.."

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
