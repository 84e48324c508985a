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
say() { echo "install-deps.sh: $*"; }

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
    # The VM backend (backend/vm.sh): the guest is driven over SSH.
    [ssh]=openssh-client
    [ssh-keygen]=openssh-client
    [journalctl]=systemd # reads the guest's journal copied out after poweroff
    [jq]=jq              # reads journalctl -o json and status --json
    [objcopy]=binutils   # strips debug info off the binary handed to the VM
)
# The VM backend's qemu comes from bookworm-backports (qemu 10), as qemu-utils
# does on these machines: the two must be of the same version.
declare -A wanted_backports=(
    [qemu-system-x86_64]=qemu-system-x86
    [qemu-img]=qemu-utils
)

missing=()
for cmd in "${!wanted[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${wanted[$cmd]}")
done
# mmdebstrap verifies the archive's Release files with the host's copy of
# Debian's keyring; it is a dependency there is no command to probe for.
[[ -e /usr/share/keyrings/debian-archive-keyring.gpg ]] || missing+=(debian-archive-keyring)
missing_backports=()
for cmd in "${!wanted_backports[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing_backports+=("${wanted_backports[$cmd]}")
done
# qemu-system-x86 is needed whenever either is missing: reinstall qemu-utils
# from the same suite so their versions match.
((${#missing_backports[@]} == 0)) || missing_backports=(qemu-system-x86 qemu-utils)

if ((${#missing[@]} == 0 && ${#missing_backports[@]} == 0)); then
    say "everything already installed"
    exit 0
fi

# The host's release (bookworm) and the archive it installs from: the
# backports suite is added from that same archive, the only one this machine
# (and CI) can reach.
codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
backports="$codename-backports"
backports_list=/etc/apt/sources.list.d/platform-agent-backports.list

# Prints the URI of the first enabled one-line or deb822 entry for $codename.
host_archive_uri() {
    local f
    shopt -s nullglob
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        awk -v s="$codename" '
            $1 == "deb" {
                i = 2
                if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                if ($(i + 1) == s) { print $i; exit }
            }' "$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        awk -v s="$codename" '
            function flush(   n, m, i, j, uris, sus) {
                if (types ~ /(^| )deb( |$)/ && tolower(enabled) != "no") {
                    n = split(uri, uris, " "); m = split(suites, sus, " ")
                    for (j = 1; j <= m; j++) if (sus[j] == s) { print uris[1]; exit }
                }
                types = uri = suites = ""; enabled = "yes"
            }
            BEGIN { enabled = "yes" }
            /^[[:space:]]*#/ { next }
            /^[[:space:]]*$/ { flush(); next }
            {
                key = tolower($1); sub(/:.*/, "", key)
                val = $0; sub(/^[^:]*:[[:space:]]*/, "", val)
            }
            key == "types" { types = val }
            key == "uris" { uri = val }
            key == "suites" { suites = val }
            key == "enabled" { enabled = val }
            END { flush() }' "$f"
    done
}

if ((${#missing_backports[@]} > 0)); then
    [[ -n "$codename" ]] || {
        say "cannot tell the host's Debian release from /etc/os-release"
        exit 1
    }
    if ! grep -rqsE "(^|[[:space:]])$backports([[:space:]]|$)" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        uri="$(host_archive_uri | head -n 1)"
        if [[ -z "$uri" ]]; then
            say "no enabled $codename entry in /etc/apt/sources.list{,.d} to take the archive from"
            exit 1
        fi
        say "adding $backports from $uri ($backports_list)"
        echo "deb $uri $backports main" >"$backports_list"
    fi
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
if ((${#missing[@]} > 0)); then
    # Deduplicate (util-linux provides several commands).
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    say "installing ${missing[*]}"
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
if ((${#missing_backports[@]} > 0)); then
    say "installing ${missing_backports[*]} from $backports"
    apt-get install -y -q --no-install-recommends -t "$backports" "${missing_backports[@]}"
fi
