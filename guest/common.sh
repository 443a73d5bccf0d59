# Shared helpers for rhyve's guest/ scripts. Sourced, not executed.
# shellcheck shell=bash

# rhyve_log TAG MSG... : chatter goes to stderr so stdout stays machine-readable.
rhyve_log() { local tag=$1; shift; printf '%s: %s\n' "$tag" "$*" >&2; }
rhyve_die() { local tag=$1; shift; printf '%s: ERROR: %s\n' "$tag" "$*" >&2; exit 1; }

# rhyve_ensure_pkgs TAG PKG... : apt-get install whatever is not installed yet.
# Runs `apt-get update` once before installing (fresh CI images have no lists).
# Uses sudo when not root. Set RHYVE_NO_APT=1 to forbid installing (fail instead).
rhyve_ensure_pkgs() {
    local tag=$1; shift
    local p missing=()
    for p in "$@"; do
        if [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]]; then
            missing+=("$p")
        fi
    done
    ((${#missing[@]} == 0)) && return 0
    [[ "${RHYVE_NO_APT:-0}" == 1 ]] &&
        rhyve_die "$tag" "missing packages (RHYVE_NO_APT=1): ${missing[*]}"
    local sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null || rhyve_die "$tag" "not root and no sudo; install: ${missing[*]}"
        sudo=(sudo -n)
    fi
    rhyve_log "$tag" "apt-get install ${missing[*]}"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 ||
        rhyve_die "$tag" "apt-get update failed"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 ||
        rhyve_die "$tag" "apt-get install failed: ${missing[*]}"
}

# Host tools the guest runs through hostfs (they must exist on the host).
# shellcheck disable=SC2034  # used by build-uml.sh
RHYVE_GUEST_TOOL_PKGS=(
    fio nvme-cli e2fsprogs hdparm smartmontools sg3-utils util-linux qemu-utils
    genisoimage xorriso kmod
)
