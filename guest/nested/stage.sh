# Shared helpers of the nested tier's initramfs builders (build-l1.sh, build-l2.sh). Sourced.
# shellcheck shell=bash

# nested_stage TAG KVER DIR...: check the kernel's modules are installed and make an initramfs
# tree (the path is printed) with busybox-static and its applets, and DIR... created under it.
nested_stage() {
    local tag=$1 kver=$2 stage applet
    shift 2
    [[ -f /lib/modules/$kver/modules.dep ]] ||
        rhyve_die "$tag" "/lib/modules/$kver/modules.dep missing (is linux-image-$kver installed?)"
    stage=$(mktemp -d "${TMPDIR:-/tmp}/rhyve-$tag.XXXXXX")
    mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,modules}
    for d in "$@"; do mkdir -p "$stage/$d"; done
    cp /bin/busybox "$stage/bin/busybox"
    while IFS= read -r applet; do
        [[ -n "$applet" && "$applet" != bin/busybox && ! -e "$stage/$applet" ]] || continue
        ln -s /bin/busybox "$stage/$applet"
    done < <(/bin/busybox --list-full)
    echo "$stage"
}

# nested_libs STAGE BINARY: copy the shared libraries BINARY needs into STAGE.
nested_libs() {
    local stage=$1 lib
    while read -r lib; do
        mkdir -p "$stage$(dirname "$lib")"
        cp -L "$lib" "$stage$lib"
    done < <(ldd "$2" | grep -o '/[^ ]*' | sort -u)
}

# nested_modules TAG STAGE KVER MODULE...: the modules and everything they depend on,
# decompressed into STAGE/modules, with STAGE/modules/order listing them in load order.
nested_modules() {
    local tag=$1 stage=$2 kver=$3 m ko name
    shift 3
    : >"$stage/modules/order"
    for m in "$@"; do
        modprobe --show-depends -S "$kver" "$m" | awk '$1 == "insmod" { print $2 }'
    done | awk '!seen[$0]++' | while read -r ko; do
        name=$(basename "$ko")
        case "$ko" in
        *.ko) cp "$ko" "$stage/modules/$name" ;;
        *.ko.xz) xz -dc "$ko" >"$stage/modules/${name%.xz}"; name=${name%.xz} ;;
        *.ko.zst) zstd -qdc "$ko" >"$stage/modules/${name%.zst}"; name=${name%.zst} ;;
        *) rhyve_die "$tag" "unknown module format: $ko" ;;
        esac
        echo "$name" >>"$stage/modules/order"
    done
}
