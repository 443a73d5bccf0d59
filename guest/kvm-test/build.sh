#!/usr/bin/env bash
# Build the KVM test guest (an ELF rhyve boots with --kernel) with gcc: 64-bit, general-purpose
# registers only (no SSE/x87: on hosts without VT-x it runs in KVM's instruction emulator), no
# libc. The result is cached under target/kvm-test/<hash of the sources>/ and its path is the last
# line printed; the PVH flavour kvm-test-pvh.elf sits next to it. Usage: bash guest/kvm-test/build.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
for tool in gcc ld; do
    if ! command -v "$tool" >/dev/null; then
        echo "kvm-test: $tool not found (apt-get install gcc binutils)" >&2
        exit 1
    fi
done
cd "$here"
srcs=(start.S lib.c nvme.c ahci.c virtio.c main.c)
existing=()
for s in "${srcs[@]}"; do [[ -f $s ]] && existing+=("$s"); done
key=$( (cat "${existing[@]}" lib.h link.ld build.sh; gcc --version | head -1) | sha256sum | cut -c1-16)
out=$target/kvm-test/$key
if [[ ! -f $out/kvm-test.elf ]]; then
    mkdir -p "$(dirname "$out")"
    tmp=$(mktemp -d "$out.tmp.XXXXXX") # concurrent builds (parallel tests) each use their own
    trap 'rm -rf "$tmp"' EXIT
    cflags=(-m64 -O2 -std=gnu11 -Wall -Wextra -Werror -ffreestanding -fno-builtin -nostdlib
        -mgeneral-regs-only -mno-red-zone -fno-pic -fno-pie -static -fno-stack-protector
        -fcf-protection=none -fno-asynchronous-unwind-tables -fno-tree-loop-distribute-patterns
        -mno-sse -mno-mmx -mno-80387 -march=x86-64 -mtune=generic)
    objs=()
    for s in "${existing[@]}"; do
        gcc "${cflags[@]}" -c "$s" -o "$tmp/${s%.*}.o"
        objs+=("$tmp/${s%.*}.o")
    done
    # Two flavours: kvm-test.elf (64-bit entry) and kvm-test-pvh.elf, whose start.S also has the
    # PVH note and 32-bit entry (rhyve then boots it with the PVH protocol).
    gcc "${cflags[@]}" -DPVH -c start.S -o "$tmp/start-pvh.o"
    pvh_objs=("$tmp/start-pvh.o" "${objs[@]:1}")
    ldflags=(-m elf_x86_64 -nostdlib -static -T link.ld --build-id=none -z noexecstack --no-warn-rwx-segments)
    ld "${ldflags[@]}" -o "$tmp/kvm-test.elf" "${objs[@]}"
    ld "${ldflags[@]}" -o "$tmp/kvm-test-pvh.elf" "${pvh_objs[@]}"
    # Refuse instructions KVM's emulator cannot run (see shared/notes/kvm-on-this-machine.md).
    for elf in "$tmp/kvm-test.elf" "$tmp/kvm-test-pvh.elf"; do
        if objdump -d --no-show-raw-insn "$elf" |
            grep -E $':\t(.*%xmm|movaps|movups|movdq|pxor|xorps|mfence|lfence|sfence|endbr64|popcnt|crc32|rdtscp|xsave|fxsave|f[a-z0-9]+( |$))' >&2; then
            echo "kvm-test: the build contains instructions KVM's emulator lacks" >&2
            exit 1
        fi
    done
    # The first finished build wins; a later one finds $out non-empty and discards its copy.
    mv -T "$tmp" "$out" 2>/dev/null || rm -rf "$tmp"
fi
echo "$out/kvm-test.elf"
