#!/bin/sh
# The nested tier's L2 scenarios: real Debian Linux under `rhyve run`, one VM per scenario.
# Runs inside L1 (guest/nested/build-l1.sh puts it there as /l2/run.sh) or straight on a host
# with VT-x/AMD-V. Environment: RHYVE (the binary), KERNEL and INITRD (L2, from build-l2.sh),
# WORK (a scratch directory), ONLY (a space-separated subset of the default,
# "boot reboot data fio migrate snapshot stats"),
# STATS_ROUNDS (repeat the stats runs, dbbuf on and off interleaved). Prints `NESTED: <scenario> PASS` or `NESTED: <scenario> FAIL
# <why>` per scenario and `NESTED: stats …` lines; exits 0 if every scenario passed.
RHYVE=${RHYVE:-rhyve}
KERNEL=${KERNEL:-/l2/vmlinuz}
INITRD=${INITRD:-/l2/l2.cpio.gz}
WORK=${WORK:-/tmp}
# rhyve's warnings, and the vCPU state it saves when it pauses a VM (vcpu_notes below).
export RUST_LOG="${RUST_LOG:-warn,vmm::vcpu=debug}"
failed=0
# vm NAME WANT_RC CMDLINE RHYVE_ARGS…: run one L2; its console in $WORK/NAME.out, rhyve's lines
# in $WORK/NAME.err.
vm() {
    name=$1 want=$2 cmdline=$3
    shift 3
    # A hang guard only: an L2 boot takes 15-40 s in L1 under TCG.
    timeout -s KILL "${L2_TIMEOUT:-600}" \
        "$RHYVE" run -m 512M -l com1,stdio --kernel "$KERNEL" --initrd "$INITRD" \
        --cmdline "console=ttyS0 panic=-1 quiet loglevel=4 $cmdline" "$@" \
        >"$WORK/$name.out" 2>"$WORK/$name.err"
    rc=$?
    if [ "$rc" != "$want" ]; then
        why="rhyve exit $rc, wanted $want: $(tail -n 1 "$WORK/$name.err")"
        return 1
    fi
    return 0
}
has() { grep -q "$2" "$WORK/$1.out"; }
# verdict NAME [CONSOLE]: PASS, or FAIL with $why and the tail of CONSOLE (default NAME).
verdict() {
    if [ -z "$why" ]; then
        echo "NESTED: $1 PASS"
    else
        echo "NESTED: $1 FAIL $why"
        tail -n 20 "$WORK/${2:-$1}.out" | sed "s/^/NESTED:   | /"
        failed=1
    fi
}
disks() {
    rm -f "$WORK/n.img" "$WORK/s.img"
    truncate -s 64M "$WORK/n.img" "$WORK/s.img"
}
# counter FILE ADDR KEY: KEY=value from rhyve's --stats line for the device at ADDR.
counter() {
    v=$(grep "^rhyve: $2 " "$1" | tr ' ' '\n' | sed -n "s/^$3=//p")
    echo "${v:-0}"
}

want() { case " ${ONLY:-boot reboot data fio migrate snapshot stats} " in *" $1 "*) return 0 ;; esac; return 1; }

if want boot; then
for cpus in 1 2; do
    why=""
    vm boot-$cpus 0 "l2.scenario=boot l2.now=$(date +%s)" -c $cpus --stats || true
    [ -z "$why" ] && ! has boot-$cpus "L2: nproc $cpus" && why="nproc is not $cpus"
    [ -z "$why" ] && ! has boot-$cpus "L2: boot PASS" && why="$(grep 'L2: boot' "$WORK/boot-$cpus.out")"
    verdict boot-$cpus
    if [ $cpus = 1 ]; then
        # The RTC and the legacy devices, judged on the same boot.
        why=""
        has boot-1 "L2: rtc PASS" || why="$(grep 'L2: rtc\|L2: dmesg' "$WORK/boot-1.out" | tr '\n' ' ')"
        verdict rtc
    fi
    # Exits of a whole boot (to poweroff), and the PCI config share of them.
    echo "NESTED: stats boot-$cpus $(grep '^rhyve: exits:' "$WORK/boot-$cpus.err" | cut -d' ' -f3-)"
done

fi

if want reboot; then
why=""
vm reboot 3 "l2.scenario=boot l2.action=reboot" || true
[ -z "$why" ] && ! has reboot "L2: boot PASS" && why="no PASS from L2"
verdict reboot
fi

if want data; then
# The pattern build-l2.sh put in L2 as /pattern, made here the same way.
awk 'BEGIN { for (b = 0; b < 2048; b++) { s = sprintf("rhyve-nested block %06d ", b);
    while (length(s) < 511) s = s "#"; print s } }' >"$WORK/pattern"
why=""
disks
vm data 0 "l2.scenario=data" -s 4,nvme,"$WORK/n.img" -s 5,ahci,hd:"$WORK/s.img" || true
[ -z "$why" ] && ! has data "L2: data PASS" && why="$(grep 'L2: data' "$WORK/data.out")"
for img in n s; do
    [ -z "$why" ] || break
    dd if="$WORK/$img.img" of="$WORK/$img.back" bs=4096 skip=1024 count=256 2>/dev/null
    cmp -s "$WORK/$img.back" "$WORK/pattern" || why="$img.img does not hold the pattern at 4 MiB"
done
verdict data
fi

if want fio; then
# fio verify with each interrupt mode: MSI-X (NVMe) and MSI (AHCI) by default, INTx through
# _PRT with pci=nomsi.
for mode in msi intx; do
    why=""
    extra=""
    [ $mode = intx ] && extra="pci=nomsi"
    disks
    vm fio-$mode 0 "l2.scenario=fio l2.size=8 $extra" --stats -c 2 \
        -s 4,nvme,"$WORK/n.img" -s 5,ahci,hd:"$WORK/s.img" || true
    [ -z "$why" ] && ! has fio-$mode "L2: fio PASS" && why="$(grep 'L2: fio' "$WORK/fio-$mode.out")"
    if [ -z "$why" ]; then
        # What the drivers say they use, and that rhyve sent interrupts that way.
        if [ $mode = msi ]; then
            want_n=msix want_a=msi counter_n=irqfd_msi counter_a=irqfd_msi
        else
            want_n=intx want_a=intx counter_n=intx_asserts counter_a=intx_asserts
        fi
        has fio-$mode "L2: irq nvme ${want_n}[^a-z]*$" || why="nvme not on $want_n: $(grep 'L2: irq nvme' "$WORK/fio-$mode.out")"
        has fio-$mode "L2: irq ahci ${want_a}[^a-z]*$" || why="${why}ahci not on $want_a: $(grep 'L2: irq ahci' "$WORK/fio-$mode.out")"
        n=$(counter "$WORK/fio-$mode.err" 0:4.0 $counter_n)
        a=$(counter "$WORK/fio-$mode.err" 0:5.0 $counter_a)
        echo "NESTED: stats fio-$mode nvme $counter_n=$n ahci $counter_a=$a"
        [ "$n" -gt 0 ] && [ "$a" -gt 0 ] || why="${why}no $counter_n counted (nvme $n, ahci $a)"
    fi
    verdict fio-$mode
done
fi

# start NAME CMDLINE RHYVE_ARGS…: an L2 in the background (its pid in $pid), with the API socket
# $WORK/api.sock.
start() {
    name=$1 cmdline=$2
    shift 2
    rm -f "$WORK/api.sock"
    timeout -s KILL "${L2_TIMEOUT:-600}" \
        "$RHYVE" run -m 512M -l com1,stdio --kernel "$KERNEL" --initrd "$INITRD" \
        --cmdline "console=ttyS0 panic=-1 quiet loglevel=4 $cmdline" \
        --api-socket "$WORK/api.sock" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" &
    pid=$!
}
# wait_for NAME TEXT: until TEXT shows on NAME's console (5 minutes at most).
wait_for() {
    n=0
    while ! grep -q "$2" "$WORK/$1.out" && [ $n -lt 300 ]; do sleep 1; n=$((n + 1)); done
    grep -q "$2" "$WORK/$1.out"
}
ctl() { "$RHYVE" ctl --api-socket "$WORK/api.sock" "$@" 2>&1; }

# A source VM for the migrate and snapshot scenarios: fio on both disks, waited for until the
# NVMe job runs. Sets $src, or $stalled if L2 printed nothing of it for 5 minutes (seen twice
# in ~20 runs under nested TCG, always before any migration; the scenario then boots once more
# and says so).
fio_source() {
    stalled=""
    disks
    # Three rounds of the NVMe job: the migration (slower with a debug build of rhyve) must
    # end while it still runs.
    start "$1" "l2.scenario=fio l2.size=8 l2.rounds=3" --stats -s 4,nvme,"$WORK/n.img" -s 5,ahci,hd:"$WORK/s.img"
    src=$pid
    if ! wait_for "$1" "L2: fio nvme0n1 start"; then
        # Stop it with SIGTERM (rhyve then prints its exit counters: did the guest run, did
        # it write to COM1?) for whoever looks into these stalls next.
        # ($src is rhyve under busybox's timeout, which execs it; GNU timeout passes the
        # signal on.)
        kill -TERM $src 2>/dev/null
        sleep 3
        kill -KILL $src 2>/dev/null
        wait $src
        stalled="L2 never started fio ($(wc -l <"$WORK/$1.out") console lines; $(grep '^rhyve: exits:' "$WORK/$1.err" | cut -c1-400))"
    fi
}

# retried NAME FN: run FN (a scenario whose source VM comes from fio_source); if that source's
# boot stalled, say so and run it once more.
retried() {
    "$2"
    if [ -n "$stalled" ]; then
        echo "NESTED: $1 NOTE the source's boot stalled ($stalled); booting it once more"
        "$2"
        [ -n "$stalled" ] && why="$stalled, twice"
    fi
}

# Live migration between two rhyve processes with fio verifying on both disks: the move
# happens two seconds into the NVMe job; the destination finishes both jobs, and their verify
# passes, with nothing run twice or lost.
migrate_once() {
    why=""
    rep=""
    fio_source migrate
    [ -n "$stalled" ] && return
    rm -f "$WORK/migrate.sock"
    timeout -s KILL "${L2_TIMEOUT:-600}" "$RHYVE" run --migrate-receive "unix:$WORK/migrate.sock" \
        >"$WORK/migrate-dst.out" 2>"$WORK/migrate-dst.err" &
    dst=$!
    n=0
    while [ ! -S "$WORK/migrate.sock" ] && [ $n -lt 30 ]; do sleep 1; n=$((n + 1)); done
    sleep 1
    rep=$(ctl migrate-send "unix:$WORK/migrate.sock") || why="migrate-send failed: $rep"
    wait $src
    src_rc=$?
    wait $dst
    dst_rc=$?
    [ -z "$why" ] && [ $src_rc != 0 ] && why="source exit $src_rc: $(tail -n 1 "$WORK/migrate.err")"
    [ -z "$why" ] && ! grep -q "the guest migrated" "$WORK/migrate.err" && why="source: $(tail -n 1 "$WORK/migrate.err")"
    [ -z "$why" ] && [ $dst_rc != 0 ] && why="destination exit $dst_rc: $(tail -n 1 "$WORK/migrate-dst.err")"
    [ -z "$why" ] && ! grep -q "L2: fio PASS" "$WORK/migrate-dst.out" && why="destination: $(grep 'L2: fio' "$WORK/migrate-dst.out" | tr '\n' ' ')"
    [ -z "$why" ] && grep -q "L2: fio PASS" "$WORK/migrate.out" && why="the source finished the job too"
}
# What the source saw of each vCPU when it paused it (CPL, GS bases), and any MSR the
# destination did not take back (guest/nested/README.md: the restore panic of session 5).
vcpu_notes() {
    local l
    l=$(cat "$@" 2>/dev/null | grep -h 'saved at CPL\|after restore\|refused on restore' | sed 's/^.*vCPU/vCPU/' | tr '\n' ';')
    [ -n "$l" ] && echo "NESTED: $SCEN NOTE $l"
}
if want migrate; then
    retried migrate migrate_once
    SCEN=migrate vcpu_notes "$WORK/migrate.err" "$WORK/migrate-dst.err"
    echo "NESTED: stats migrate $(echo "$rep" | tr -d '\n' | sed 's/.*"downtime_ms": *\([0-9]*\).*/downtime_ms=\1/')"
    verdict migrate migrate-dst
fi

# Snapshot with fio in flight, stop, and restore in a new process: the job finishes and
# verifies.
snapshot_once() {
    why=""
    rm -rf "$WORK/snap"
    fio_source snapshot
    [ -n "$stalled" ] && return
    sleep 2
    rep=$(ctl snapshot "$WORK/snap") || why="snapshot failed: $rep"
    ctl shutdown --json '{"timeout_s": 0}' >/dev/null
    wait $src
    [ -n "$why" ] && return
    timeout -s KILL "${L2_TIMEOUT:-600}" "$RHYVE" run --restore "$WORK/snap" \
        >"$WORK/snapshot-restored.out" 2>"$WORK/snapshot-restored.err"
    rc=$?
    [ $rc != 0 ] && why="restored exit $rc: $(tail -n 1 "$WORK/snapshot-restored.err")"
    [ -z "$why" ] && ! grep -q "L2: fio PASS" "$WORK/snapshot-restored.out" && why="restored: $(grep 'L2: fio' "$WORK/snapshot-restored.out" | tr '\n' ' ')"
    [ -z "$why" ] && grep -q "L2: fio PASS" "$WORK/snapshot.out" && why="the source finished the job before the snapshot"
}
if want snapshot; then
    retried snapshot snapshot_once
    SCEN=snapshot vcpu_notes "$WORK/snapshot.err" "$WORK/snapshot-restored.err"
    verdict snapshot snapshot-restored
fi

# Exits and interrupts per I/O under real Linux (reported, not judged): NVMe with and without
# shadow doorbells, AHCI, during the same fio job. The scenario passes when both runs moved
# their data.
if want stats; then
stats_why=""
for round in $(seq "${STATS_ROUNDS:-1}"); do
for db in on off; do
    why=""
    disks
    vm stats-$db 0 "l2.scenario=fio l2.size=8" --stats \
        -s 4,nvme,"$WORK/n.img",dbbuf=$db -s 5,ahci,hd:"$WORK/s.img" || true
    [ -z "$why" ] && ! has stats-$db "L2: fio PASS" && why="$(grep 'L2: fio' "$WORK/stats-$db.out")"
    [ -n "$why" ] && stats_why="$stats_why dbbuf=$db: $why"
    f="$WORK/stats-$db.err"
    for dev in "0:4.0 nvme" "0:5.0 ahci"; do
        addr=${dev% *} kind=${dev#* }
        [ $kind = ahci ] && [ $db = off ] && continue
        ios=$(( $(counter "$f" "$addr" read_commands) + $(counter "$f" "$addr" write_commands) + $(counter "$f" "$addr" commands) ))
        exits=$(counter "$f" "$addr" exits)
        kicks=$(counter "$f" "$addr" ioeventfd_kicks)
        irqs=$(counter "$f" "$addr" irqfd_msi)
        [ "$ios" -gt 0 ] 2>/dev/null || { echo "NESTED: stats $kind: no I/O counted"; continue; }
        echo "NESTED: stats $kind$([ $kind = nvme ] && echo " dbbuf=$db") ios=$ios exits=$exits kicks=$kicks irqs=$irqs" \
            "exits/io=$(awk "BEGIN { printf \"%.3f\", $exits / $ios }")" \
            "kicks/io=$(awk "BEGIN { printf \"%.3f\", $kicks / $ios }")" \
            "irq/io=$(awk "BEGIN { printf \"%.3f\", $irqs / $ios }")"
    done
done
done
why=$stats_why
verdict stats
fi
exit $failed
