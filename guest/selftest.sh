#!/usr/bin/env bash
# Self-test of the UML guest tooling, no rhyve device involved:
# build (or reuse) the kernel and initramfs, boot tests/smoke.sh (must exit 0)
# and tests/exit3.sh (must exit 3). Prints timings to stderr.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/rhyve-selftest.XXXXXX")
trap 'rm -rf "$work"' EXIT

t=$SECONDS
K=$("$here/build-uml.sh" | tail -n 1)
echo "selftest: kernel $K ($((SECONDS - t)) s)" >&2
I=$("$here/mkinitramfs.sh" "$work/initrd.cpio.gz" | tail -n 1)

rc=0
"$here/run-uml.sh" --kernel "$K" --initrd "$I" --script "$here/tests/smoke.sh" \
    --timeout 120 --log "$work/smoke.log" >/dev/null || rc=$?
if ((rc != 0)) || ! grep -q '^== smoke OK' "$work/smoke.log"; then
    cat "$work/smoke.log" >&2
    echo "selftest: FAIL: smoke.sh (status $rc)" >&2
    exit 1
fi
rc=0
"$here/run-uml.sh" --kernel "$K" --initrd "$I" --script "$here/tests/exit3.sh" \
    --timeout 60 >/dev/null || rc=$?
if ((rc != 3)); then
    echo "selftest: FAIL: exit3.sh gave status $rc, want 3" >&2
    exit 1
fi
echo "selftest: OK" >&2
