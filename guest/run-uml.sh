#!/usr/bin/env bash
# Boot rhyve's UML guest, run one test script in it, and exit with its status.
#
#   guest/run-uml.sh --kernel K --initrd I --script S [--mem 512M]
#                    [--device SOCK ...] [--timeout SECS] [--log FILE]
#                    [--append 'KERNEL ARGS']
#
#   --kernel K     UML kernel from guest/build-uml.sh
#   --initrd I     initramfs from guest/mkinitramfs.sh
#   --script S     host script to run inside the guest (chroot onto the host's /
#                  via hostfs; guest /tmp, /run, /dev, /proc, /sys are private)
#   --mem M        guest memory (default 512M)
#   --device SOCK  a listening vhost-user socket served by rhyve; repeatable
#                  (virtio_uml.device=SOCK:1234). rhyve must already be listening:
#                  UML connects once, at boot, and never retries.
#   --timeout S    kill UML and fail after S seconds (default 300)
#   --log FILE     also write the console output to FILE
#   --append ARGS  extra kernel command-line arguments (repeatable)
#
# The console (kernel messages and the script's stdout/stderr) goes to stdout.
# Exit status: the guest script's status, taken from the last
# `RHYVE-GUEST-EXIT <n>` line; 124 on timeout; 125 if the marker is missing
# (guest setup failed or UML crashed); 2 on usage errors.
#
# Environment: RHYVE_UML_TMPDIR (default /dev/shm) must be a tmpfs that allows
# executable mappings; UML's physical-memory file and uml_dir live there.
set -euo pipefail

TAG='run-uml'
usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "$TAG: ERROR: $*" >&2; exit 2; }

kernel='' initrd='' script='' mem=512M timeout=300 log=''
devices=() append=()
while (($#)); do
    case "$1" in
    --kernel | --initrd | --script | --mem | --device | --timeout | --log | --append)
        (($# >= 2)) || die "$1 needs a value"
        case "$1" in
        --kernel) kernel=$2 ;;
        --initrd) initrd=$2 ;;
        --script) script=$2 ;;
        --mem) mem=$2 ;;
        --device) devices+=("$2") ;;
        --timeout) timeout=$2 ;;
        --log) log=$2 ;;
        --append) append+=("$2") ;;
        esac
        shift 2 ;;
    -h | --help) usage ;;
    *) die "unknown argument: $1 (see --help)" ;;
    esac
done
[[ -n "$kernel" && -n "$initrd" && -n "$script" ]] || die "--kernel, --initrd and --script are required"
[[ -x "$kernel" ]] || die "kernel not executable: $kernel"
[[ -f "$initrd" ]] || die "initrd not found: $initrd"
[[ -f "$script" ]] || die "script not found: $script"
[[ "$timeout" =~ ^[0-9]+$ && "$timeout" -gt 0 ]] || die "--timeout must be a positive integer"
[[ "$mem" =~ ^[0-9]+[KMG]?$ ]] || die "--mem must look like 512M"
kernel=$(realpath "$kernel") initrd=$(realpath "$initrd") script=$(realpath "$script")
[[ "$script" != *[[:space:]]* ]] || die "script path must not contain whitespace: $script"
device_id=${RHYVE_UML_DEVICE_ID:-1234}
for sock in "${devices[@]}"; do
    [[ -S "$sock" ]] || die "no socket at $sock (start rhyve before booting UML)"
    [[ "$sock" != *[[:space:]:,]* ]] || die "socket path must not contain whitespace, ':' or ',': $sock"
done

tmpbase=${RHYVE_UML_TMPDIR:-/dev/shm}
[[ -d "$tmpbase" && -w "$tmpbase" ]] || die "$tmpbase is not a writable directory (set RHYVE_UML_TMPDIR)"
if findmnt -no OPTIONS --target "$tmpbase" 2>/dev/null | tr , '\n' | grep -qx noexec; then
    die "$tmpbase is mounted noexec; UML needs PROT_EXEC mappings there (set RHYVE_UML_TMPDIR)"
fi
mem_bytes=$(numfmt --from=iec "$mem")
avail_bytes=$(($(df --output=avail -k "$tmpbase" | tail -n 1) * 1024))
if ((avail_bytes < mem_bytes)); then
    echo "$TAG: warning: only $((avail_bytes >> 20)) MiB free in $tmpbase for --mem $mem;" \
        "UML dies with SIGBUS if guest RAM use exceeds it (Docker: --shm-size)" >&2
fi
run=$(mktemp -d "$tmpbase/rhyve-uml.XXXXXX")

uml_pid='' tee_pid=''
# shellcheck disable=SC2317  # invoked via trap
cleanup() {
    if [[ -n "$uml_pid" ]]; then
        kill -KILL -- "-$uml_pid" 2>/dev/null || true
    fi
    if [[ -n "$tee_pid" ]]; then
        kill "$tee_pid" 2>/dev/null || true
        wait "$tee_pid" 2>/dev/null || true
    fi
    rm -rf "$run"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

cmdline=(
    "mem=$mem" "initrd=$initrd" "uml_dir=$run" umid=rhyve
    con=null 'con0=null,fd:1' ssl=null console=tty0 rdinit=/init
    "rhyve.script=$script" virt_pci.max_delay_us=2000000
)
for sock in "${devices[@]}"; do
    cmdline+=("virtio_uml.device=$(realpath "$sock"):$device_id")
done
for a in "${append[@]}"; do
    read -r -a words <<<"$a"
    cmdline+=("${words[@]}")
done

console=$run/console.log
mkfifo "$run/console"
if [[ -n "$log" ]]; then
    : >"$log"
    tee "$console" "$log" <"$run/console" &
else
    tee "$console" <"$run/console" &
fi
tee_pid=$!

echo "$TAG: $kernel ${cmdline[*]}" >&2
now_ms() { local t=${EPOCHREALTIME//[!0-9]/}; echo $((10#$t / 1000)); }
start=$(now_ms)
# setsid: UML and every host process it spawns share one process group we can kill.
TMPDIR=$run setsid "$kernel" "${cmdline[@]}" </dev/null >"$run/console" 2>&1 &
uml_pid=$!

timed_out=0
while kill -0 "$uml_pid" 2>/dev/null; do
    if (($(now_ms) - start >= timeout * 1000)); then
        timed_out=1
        echo "$TAG: timeout after ${timeout}s, killing UML (pid $uml_pid)" >&2
        kill -TERM -- "-$uml_pid" 2>/dev/null || true
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            kill -0 "$uml_pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL -- "-$uml_pid" 2>/dev/null || true
        break
    fi
    sleep 0.1
done
uml_rc=0
wait "$uml_pid" || uml_rc=$?
# Leftover helpers would keep the console FIFO open; the group dies with UML.
kill -KILL -- "-$uml_pid" 2>/dev/null || true
uml_pid=
wait "$tee_pid" || true
tee_pid=
elapsed_ms=$(($(now_ms) - start))
elapsed=$((elapsed_ms / 1000)).$(printf %03d $((elapsed_ms % 1000)))

if ((timed_out)); then
    echo "$TAG: FAIL: guest did not finish within ${timeout}s" >&2
    exit 124
fi
status=$(tr -d '\r' <"$console" | sed -n 's/^RHYVE-GUEST-EXIT \([0-9]\{1,3\}\)[[:space:]]*$/\1/p' | tail -n 1)
if [[ -z "$status" ]]; then
    echo "$TAG: FAIL: no RHYVE-GUEST-EXIT marker (UML exit code $uml_rc after ${elapsed}s)" >&2
    exit 125
fi
((uml_rc == 0)) || echo "$TAG: warning: UML exited with code $uml_rc" >&2
echo "$TAG: guest script exited with status $status after ${elapsed}s" >&2
exit "$status"
