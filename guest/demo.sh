#!/usr/bin/env bash
# rhyve's main job on a built-in default: serve a 1 GiB NVMe disk to User-Mode Linux running the
# real Linux nvme driver, then show `nvme list`, the controller identity and a short fio run.
#   bash guest/demo.sh [IMAGE]     (default: a fresh sparse 1 GiB image in a temp dir)
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d /tmp/rhyve-demo.XXXXXX)
trap 'kill "${rh:-}" 2>/dev/null || true; rm -rf "$tmp"' EXIT
img=${1:-$tmp/disk.img}
[[ -e $img ]] || truncate -s 1G "$img"

kernel=$(bash guest/build-uml.sh | tail -n 1)
bash guest/mkinitramfs.sh "$tmp/initrd.gz" >/dev/null
cargo build --release --quiet
cat >"$tmp/demo-guest.sh" <<'GUEST'
#!/bin/sh
echo "== nvme list"; nvme list
echo "== nvme id-ctrl (excerpt)"; nvme id-ctrl /dev/nvme0 | grep -E '^(vid|sn|mn|fr|mdts|oacs|oncs|vwc|sgls|subnqn) '
echo "== fio: 4k random read/write with crc32c verify, iodepth 32"
fio --name=demo --filename=/dev/nvme0n1 --ioengine=libaio --direct=1 --iodepth=32 \
    --rw=randrw --bs=4k --size=64M --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --group_reporting | grep -E 'read:|write:|err='
GUEST
target/release/rhyve uml --socket-dir "$tmp/sock" --stats -s "4,nvme,$img,ser=RHYVE0001" >"$tmp/ready" &
rh=$!
for _ in $(seq 100); do grep -q '^virtio_uml' "$tmp/ready" 2>/dev/null && break; sleep 0.1; done
if ! grep -q '^virtio_uml' "$tmp/ready" 2>/dev/null; then
    echo "demo: rhyve did not get ready in 10 s" >&2
    kill "$rh" 2>/dev/null || true
    exit 1
fi
sock=$(sed -n 's/^virtio_uml.device=\(.*\):[0-9]*$/\1/p' "$tmp/ready")
bash guest/run-uml.sh --kernel "$kernel" --initrd "$tmp/initrd.gz" --script "$tmp/demo-guest.sh" \
    --device "$sock" --timeout 300 | grep -vE '^(\[|run-uml:)' | sed -n '/^== nvme list/,$p'
wait "$rh"
