#!/usr/bin/env bash
# Exits per I/O with the real Linux drivers (UML): every MMIO read/write and every MSI that
# crosses between guest and device is a VM exit or injection under hardware virtualization.
# Runs the same fio job against rhyve's NVMe (shadow doorbells on and off) and AHCI, one run
# each, and prints per-I/O counts and ratios. Not a test: numbers are printed, not asserted.
#   bash bench/exits.sh [MiB per run, default 64]
set -euo pipefail
[[ -n "${RHYVE_BENCH_TRACE:-}" ]] && set -x
cd "$(dirname "$0")/.."
mib=${1:-64}
tmp=$(mktemp -d /tmp/rhyve-bench.XXXXXX)
trap '[[ -n "${RHYVE_BENCH_TRACE:-}" ]] || rm -rf "$tmp"' EXIT
kernel=$(bash guest/build-uml.sh | tail -n 1)
bash guest/mkinitramfs.sh "$tmp/initrd.gz" >/dev/null
cargo build --release --quiet

run() { # name dev slot-spec
    local name=$1 dev=$2 spec=$3
    truncate -s 512M "$tmp/$name.img"
    cat >"$tmp/$name.sh" <<GUEST
#!/bin/sh
fio --name=b --filename=$dev --ioengine=libaio --direct=1 --iodepth=32 --rw=randrw --bs=4k \
    --size=${mib}M --output-format=terse --terse-version=3 | cut -d';' -f8,49
GUEST
    target/release/rhyve uml --socket-dir "$tmp/s-$name" --stats -s "${spec//IMG/$tmp/$name.img}" \
        >"$tmp/$name.ready" 2>"$tmp/$name.stats" &
    local pid=$!
    local i
    for i in $(seq 100); do grep -q '^virtio_uml' "$tmp/$name.ready" 2>/dev/null && break; sleep 0.1; done
    if ! grep -q '^virtio_uml' "$tmp/$name.ready" 2>/dev/null; then
        echo "exits: rhyve did not get ready for $name in 10 s" >&2
        kill "$pid" 2>/dev/null || true
        exit 1
    fi
    local sock
    sock=$(sed -n 's/^virtio_uml.device=\(.*\):[0-9]*$/\1/p' "$tmp/$name.ready")
    bash guest/run-uml.sh --kernel "$kernel" --initrd "$tmp/initrd.gz" --script "$tmp/$name.sh" \
        --device "$sock" --timeout 600 >"$tmp/$name.console"
    wait "$pid"
    local iops stats
    iops=$(tr -d '\r' <"$tmp/$name.console" | grep -E '^[0-9]+;[0-9]+$' | tail -1 | awk -F';' '{print $1+$2}')
    stats=$(tail -1 "$tmp/$name.stats")
    python3 - "$name" "$iops" "$stats" "$tmp" <<'PY'
import sys
name, iops, stats, tmp = sys.argv[1], int(sys.argv[2] or 0), sys.argv[3], sys.argv[4]
kv = dict(x.split('=') for x in stats.split(': ', 1)[1].split() if '=' in x)
g = lambda k: int(kv.get(k, 0))
ios = g('read_commands') + g('write_commands') or g('commands')
if ios == 0:
    sys.exit(f"exits: {name}: no I/O was counted (stats line: {stats!r})")
r, w, m = g('uml_mmio_reads'), g('uml_mmio_writes'), g('msi_sent')
print(f"{name:14} {ios:8d} I/Os  {r/ios:6.3f} MMIO reads  {w/ios:6.3f} MMIO writes  "
      f"{m/ios:6.3f} MSIs  {(r+w+m)/ios:6.3f} exits+irqs per I/O  {iops:7d} IOPS")
open(f"{tmp}/{name}.exits", "w").write(f"{(r+w+m)/ios}")
PY
}

echo "fio randrw 4k iodepth 32, ${mib} MiB, release build, real Linux drivers in UML"
run nvme /dev/nvme0n1 "4,nvme,IMG"
run nvme-nodbbuf /dev/nvme0n1 "4,nvme,IMG,dbbuf=off"
run ahci /dev/sda "5,ahci-hd,IMG"
python3 - "$tmp" <<'PY'
import sys
r = {n: float(open(f"{sys.argv[1]}/{n}.exits").read()) for n in ("nvme", "nvme-nodbbuf", "ahci")}
print(f"ratio nvme(shadow doorbells) / nvme(MMIO doorbells): {r['nvme'] / r['nvme-nodbbuf']:.2f}")
print(f"ratio nvme(shadow doorbells) / ahci:                {r['nvme'] / r['ahci']:.2f}")
PY
