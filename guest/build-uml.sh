#!/usr/bin/env bash
# Build (or reuse from cache) the User-Mode Linux kernel rhyve's UML tests boot.
#
#   K=$(guest/build-uml.sh | tail -1)
#
# The last (and only) stdout line is the absolute path of the stripped kernel.
# Everything else goes to stderr; the full make output goes to a build log.
#
# Inputs: Debian's linux-source-6.12 package, guest/uml.config (config fragment),
# the kernel patches listed in PATCHES below (applied in order with patch -p1),
# and this script. The cache directory is
#   ${RHYVE_CACHE:-$HOME/.cache/rhyve}/uml-<key>/linux
# where <key> is the first 16 hex digits of a sha256 over those inputs.
#
# Environment:
#   RHYVE_CACHE        cache root (default $HOME/.cache/rhyve)
#   RHYVE_JOBS         make -j (default 2)
#   RHYVE_VERBOSE=1    stream make output to stderr as well as the log
#   RHYVE_KEEP_BUILD=1 keep the kernel build tree (uml-<key>/build) for fast relinks
#   RHYVE_NO_APT=1     never run apt-get; fail if a package is missing
set -euo pipefail

TAG=build-uml
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
. "$here/common.sh"

SRC_PKG=linux-source-6.12
TARBALL=/usr/src/$SRC_PKG.tar.xz
FRAGMENT=$here/uml.config
# Kernel patches, applied in this order. Adding one here changes the cache key.
PATCHES=(
    "$here/uml-set-mem-table.patch"
    "$here/uml-virt-pci-irqsave.patch"
    "$here/uml-no-exit-unplug.patch"
)
SELF=$here/$(basename "${BASH_SOURCE[0]}")
CACHE=${RHYVE_CACHE:-$HOME/.cache/rhyve}
JOBS=${RHYVE_JOBS:-2}

[[ "$(uname -m)" == x86_64 ]] || rhyve_die $TAG "only x86_64 hosts are supported (got $(uname -m))"

rhyve_ensure_pkgs $TAG \
    "$SRC_PKG" build-essential flex bison libelf-dev bc xz-utils patch \
    binutils busybox-static cpio gzip "${RHYVE_GUEST_TOOL_PKGS[@]}"

[[ -f "$TARBALL" ]] || rhyve_die $TAG "$TARBALL missing although $SRC_PKG is installed"
src_ver=$(dpkg-query -W -f='${Version}' "$SRC_PKG")

key=$(
    {
        echo "$SRC_PKG $src_ver"
        sha256sum <"$FRAGMENT"
        for p in "${PATCHES[@]}"; do sha256sum <"$p"; done
        sha256sum <"$SELF"
    } | sha256sum | cut -c1-16
)
out=$CACHE/uml-$key
kernel=$out/linux

if [[ -x "$kernel" ]]; then
    rhyve_log $TAG "cached: $kernel"
    echo "$kernel"
    exit 0
fi

mkdir -p "$CACHE"
# Serialise concurrent builds of the same key (e.g. parallel CI jobs sharing a cache).
exec 9>"$CACHE/uml-$key.lock"
flock 9
if [[ -x "$kernel" ]]; then
    rhyve_log $TAG "cached (built concurrently): $kernel"
    echo "$kernel"
    exit 0
fi

work=$(mktemp -d "$CACHE/uml-$key.tmp.XXXXXX")
cleanup() { rm -rf "$work"; }
trap cleanup EXIT
buildlog=$work/build.log
failedlog=$CACHE/uml-$key.failed.log

# run CMD...: run a build step, appending its output to the build log.
run() {
    echo "+ $*" >>"$buildlog"
    local rc=0
    if [[ "${RHYVE_VERBOSE:-0}" == 1 ]]; then
        "$@" 2>&1 | tee -a "$buildlog" >&2 || rc=$?
    else
        "$@" >>"$buildlog" 2>&1 || rc=$?
    fi
    if ((rc != 0)); then
        cp "$buildlog" "$failedlog" || true
        tail -n 40 "$buildlog" >&2 || true
        rhyve_die $TAG "step failed (rc=$rc): $* (full log: $failedlog)"
    fi
}

t0=$SECONDS
rhyve_log $TAG "building $SRC_PKG $src_ver for ARCH=um (key $key, -j$JOBS) in $work"

rhyve_log $TAG "extracting $TARBALL"
run tar -xJf "$TARBALL" -C "$work"
ksrc=$work/$SRC_PKG
[[ -f "$ksrc/Makefile" ]] || rhyve_die $TAG "unexpected tarball layout (no $SRC_PKG/Makefile)"
cd "$ksrc"

for p in "${PATCHES[@]}"; do
    rhyve_log $TAG "applying $(basename "$p")"
    run patch -p1 --forward --batch -i "$p"
done

# Keep make's parallelism ours even when called from another make/cargo jobserver.
unset MAKEFLAGS MFLAGS MAKELEVEL GNUMAKEFLAGS ARCH CROSS_COMPILE || true
mk() { run make ARCH=um "$@"; }

rhyve_log $TAG "configuring (defconfig + $(basename "$FRAGMENT"))"
mk defconfig

# Parse the fragment into (symbol, wanted-line) pairs and apply them.
symbols=() wanted=()
while IFS= read -r line || [[ -n "$line" ]]; do
    line=${line%$'\r'}
    if [[ "$line" =~ ^#\ CONFIG_([A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
        sym=${BASH_REMATCH[1]}
        run scripts/config --file .config --disable "$sym"
    elif [[ "$line" =~ ^CONFIG_([A-Za-z0-9_]+)=(.*)$ ]]; then
        sym=${BASH_REMATCH[1]} val=${BASH_REMATCH[2]}
        case "$val" in
        y) run scripts/config --file .config --enable "$sym" ;;
        m) run scripts/config --file .config --module "$sym" ;;
        n) rhyve_die $TAG "$FRAGMENT: write '# CONFIG_$sym is not set' instead of =n" ;;
        \"*\") run scripts/config --file .config --set-str "$sym" "${val:1:${#val}-2}" ;;
        *) run scripts/config --file .config --set-val "$sym" "$val" ;;
        esac
    elif [[ "$line" =~ ^[[:space:]]*(#.*)?$ ]]; then
        continue
    else
        rhyve_die $TAG "$FRAGMENT: cannot parse line: $line"
    fi
    symbols+=("$sym") wanted+=("$line")
done <"$FRAGMENT"
((${#symbols[@]} > 0)) || rhyve_die $TAG "$FRAGMENT has no options"

mk olddefconfig

# Every requested option must have survived olddefconfig (unmet dependencies
# silently drop options, which would give a kernel without the drivers under test).
bad=()
for i in "${!symbols[@]}"; do
    sym=${symbols[$i]} line=${wanted[$i]}
    if [[ "$line" == "# CONFIG_"* ]]; then
        # "not set" is satisfied by either the comment or the symbol being absent.
        grep -q "^CONFIG_$sym=" .config && bad+=("$line  (got: $(grep "^CONFIG_$sym=" .config))")
    else
        grep -qxF -- "$line" .config ||
            bad+=("$line  (got: $(grep -E "^(# )?CONFIG_${sym}[= ]" .config || echo absent))")
    fi
done
if ((${#bad[@]} > 0)); then
    cp .config "$CACHE/uml-$key.failed.config" || true
    printf '  %s\n' "${bad[@]}" >&2
    rhyve_die $TAG "${#bad[@]} config option(s) did not survive olddefconfig (see above; .config saved to $CACHE/uml-$key.failed.config)"
fi
rhyve_log $TAG "config verified: ${#symbols[@]} options"

rhyve_log $TAG "make ARCH=um -j$JOBS linux (a few minutes; log: $buildlog)"
mk -j"$JOBS" linux
[[ -x linux ]] || rhyve_die $TAG "make finished but ./linux is missing"

run strip -o "$work/linux.stripped" linux
"$work/linux.stripped" --version >/dev/null 2>&1 ||
    rhyve_log $TAG "note: '$work/linux.stripped --version' returned non-zero (ignored)"

# Assemble the cache entry next to its final place, then publish it atomically.
stage=$work/out
mkdir -p "$stage"
mv "$work/linux.stripped" "$stage/linux"
cp .config "$stage/config"
cp "$FRAGMENT" "${PATCHES[@]}" "$stage/"
{
    echo "key=$key"
    echo "source=$SRC_PKG $src_ver"
    echo "fragment_sha256=$(sha256sum <"$FRAGMENT" | cut -d' ' -f1)"
    for p in "${PATCHES[@]}"; do echo "patch=$(basename "$p") sha256=$(sha256sum <"$p" | cut -d' ' -f1)"; done
    echo "script_sha256=$(sha256sum <"$SELF" | cut -d' ' -f1)"
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ) host=$(uname -n) seconds=$((SECONDS - t0))"
} >"$stage/key.txt"
cp "$buildlog" "$stage/build.log"
if [[ "${RHYVE_KEEP_BUILD:-0}" == 1 ]]; then
    cd "$work"
    mv "$ksrc" "$stage/build"
fi
rm -rf "$out"
mv -T "$stage" "$out"
rm -f "$failedlog" "$CACHE/uml-$key.failed.config"

rhyve_log $TAG "built in $((SECONDS - t0)) s: $kernel ($(du -h "$kernel" | cut -f1))"
echo "$kernel"
