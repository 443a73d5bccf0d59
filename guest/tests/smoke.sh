#!/bin/sh
# Runs INSIDE the UML guest (via guest/run-uml.sh): checks that the chrooted host
# userspace works on UML's kernel. No rhyve device needed.
set -eu
echo "== uname";      uname -a
echo "== mounts";     grep -E ' (/|/proc|/sys|/dev|/dev/pts|/dev/shm|/tmp|/run|/run/host-tmp) ' /proc/mounts
echo "== /dev";       ls /dev
echo "== tools"
fio --version
nvme version
mkfs.ext4 -V 2>&1 | head -1
hdparm -V
smartctl --version | head -1
sg_raw -V 2>&1 | head -1
echo "== fio libaio direct=1 on guest tmpfs"
fio --name=smoke --filename=/tmp/fio.dat --size=8M --bs=4k --rw=randrw \
    --ioengine=libaio --direct=1 --iodepth=8 --verify=crc32c --do_verify=1 \
    --output-format=terse --terse-version=3 | cut -d';' -f1-8
echo "== ext4 on a loop device over guest tmpfs"
truncate -s 64M /tmp/loop.img
mkfs.ext4 -q -F /tmp/loop.img
mkdir -p /tmp/mnt && mount -o loop /tmp/loop.img /tmp/mnt
echo hello >/tmp/mnt/f && sync && cat /tmp/mnt/f
umount /tmp/mnt && e2fsck -fn /tmp/loop.img >/dev/null && echo "fsck clean"
echo "== smoke OK"
