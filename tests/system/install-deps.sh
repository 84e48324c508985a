#!/usr/bin/env bash
# Host packages for the system-test tier (tests/system). Run as root on a fresh
# Debian 12 machine; safe to run again: it installs only what is missing and
# refreshes the package lists only when it has to install something.
set -euo pipefail
# losetup, mkfs.ext4 and friends live in sbin, which a CI shell may not have.
PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

if [[ $(id -u) -ne 0 ]]; then
    echo "install-deps.sh: must run as root (it uses apt-get)" >&2
    exit 1
fi

# command -> Debian package that provides it. Checking commands rather than
# dpkg state keeps this working on hosts where a tool came from elsewhere.
declare -A wanted=(
    [systemd-nspawn]=systemd-container # boots the guest with systemd as PID 1
    [mmdebstrap]=mmdebstrap            # builds the bookworm root (build-rootfs.sh)
    [gpg]=gpg                          # mmdebstrap checks the archive keys with it
    [mkfs.ext4]=e2fsprogs              # formats the loop-device disk
    [debugfs]=e2fsprogs                # reads a disk image without mounting it
    [losetup]=util-linux               # attaches the disk image
    [nsenter]=util-linux               # runs commands inside the guest
    [flock]=util-linux                 # one rootfs build at a time
    [timeout]=coreutils
)

missing=()
for cmd in "${!wanted[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${wanted[$cmd]}")
done
# mmdebstrap verifies the archive's Release files with the host's copy of
# Debian's keyring; it is a dependency there is no command to probe for.
[[ -e /usr/share/keyrings/debian-archive-keyring.gpg ]] || missing+=(debian-archive-keyring)

if ((${#missing[@]} == 0)); then
    echo "install-deps.sh: everything already installed"
    exit 0
fi

# Deduplicate (util-linux provides several commands).
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
echo "install-deps.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
