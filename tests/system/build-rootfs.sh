#!/usr/bin/env bash
# Builds the Debian bookworm root that system tests boot, and prints its path.
# The nspawn backend boots it as it is; build-vm-image.sh turns a copy of it
# into the VM backend's disk image (one mmdebstrap run serves both backends). The root is cached under a name that contains a hash of
# this script, so editing the package list or the tweaks below is enough to get
# a fresh build; an unchanged script reuses the cache (tests never write to it:
# lib.sh boots it behind a throwaway overlay).
#
#   tests/system/build-rootfs.sh            # build if missing, print the path
#   PLATFORM_AGENT_FIXTURES=DIR ...         # cache somewhere else
#   PLATFORM_AGENT_APT_SOURCES=FILE ...     # one-line apt entries to use instead
#                                           # of the host's own Debian entries
set -euo pipefail

suite=bookworm
# What the tests need inside the guest, nothing more: systemd as init with
# D-Bus (logind, systemctl over the bus), jq to read `status --json` and
# `journalctl -o json`, e2fsprogs for the disk checks, procps to look around
# in a failed test (ps, pgrep). util-linux (mount, findmnt, runuser) and passwd
# (useradd) already come with minbase. For the VM backend only (unused, and
# harmless, in a container): a kernel with its initramfs, udev for
# /dev/disk/by-*, sshd to drive the guest and iproute2 to give it an address,
# and python3-minimal for the K3s stand-in (k3s-standin/, stdlib only).
# postgresql-client-15: pg_dump for the package test's backup through the CLI
# (the server is the host's fixture).
packages=systemd-sysv,dbus,procps,jq,e2fsprogs,postgresql-client-15
packages+=,linux-image-amd64,initramfs-tools,udev,kmod,openssh-server,iproute2,python3-minimal

self="$(readlink -f "${BASH_SOURCE[0]}")"
cache_root="${PLATFORM_AGENT_FIXTURES:-/var/cache/platform-agent-fixtures}"
hash="$(sha256sum "$self" | cut -c1-16)"
rootfs="$cache_root/rootfs-$suite-$hash"

log() { echo "build-rootfs: $*" >&2; }

if [[ -e "$rootfs/.complete" ]]; then
    echo "$rootfs"
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    log "must run as root: mmdebstrap runs in root mode"
    exit 1
fi

# Prints one-line apt entries for $suite and its -updates/-security suites,
# taken from the host's enabled sources: the guest downloads from the same
# place the host does, the only archive this machine (and CI) can reach.
host_sources() {
    local f
    shopt -s nullglob
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f "$f" ]] || continue
        # "deb [options] URI SUITE COMPONENTS...". Options are dropped:
        # mmdebstrap checks signatures against the host's keyring itself.
        awk -v s="$suite" '
            $1 == "deb" {
                i = 2
                if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                uri = $i; su = $(i + 1)
                if (su == s || su == s "-updates" || su == s "-security")
                    print "deb " uri " " su " main"
            }' "$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        # deb822: stanzas separated by blank lines.
        awk -v s="$suite" '
            function flush(   n, m, i, j, uris, sus) {
                if (types ~ /(^| )deb( |$)/ && tolower(enabled) != "no") {
                    n = split(uri, uris, " "); m = split(suites, sus, " ")
                    for (i = 1; i <= n; i++) for (j = 1; j <= m; j++)
                        if (sus[j] == s || sus[j] == s "-updates" || sus[j] == s "-security")
                            print "deb " uris[i] " " sus[j] " main"
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

if [[ -n "${PLATFORM_AGENT_APT_SOURCES:-}" ]]; then
    sources="$(cat "$PLATFORM_AGENT_APT_SOURCES")"
else
    sources="$(host_sources | awk '!seen[$0]++')"
fi
if [[ -z "$sources" ]]; then
    log "no enabled Debian $suite entry in /etc/apt/sources.list{,.d}; set PLATFORM_AGENT_APT_SOURCES"
    exit 1
fi

mkdir -p "$cache_root"
# A developer and run.sh (or two CI jobs) must not build into the same place at
# once; the second one waits here and then finds the cache.
exec 9>"$cache_root/.rootfs-$suite.lock"
flock 9
if [[ -e "$rootfs/.complete" ]]; then
    echo "$rootfs"
    exit 0
fi

# Build beside the final place and rename at the end, so an interrupted build
# never looks like a cache hit.
tmp="$rootfs.tmp"
rm -rf "$tmp"
log "building $rootfs from:"
sed 's/^/build-rootfs:   /' <<<"$sources" >&2
start=$SECONDS
# The initramfs hook behind MODULES=list (see the hooks below): the modules to
# find and mount a root filesystem on a virtio disk, loaded at once, and the
# virtio NIC's, so eth0 exists before systemd starts (the VM configures it
# without waiting for udev's coldplug).
# shellcheck disable=SC2016 # a script: expanded when it runs
export PA_INITRAMFS_HOOK='#!/bin/sh
[ "$1" = prereqs ] && exit 0
. /usr/share/initramfs-tools/hook-functions
for module in virtio_pci virtio_blk ext4 virtio_net; do force_load "$module"; done'
# The hooks are shell code run by mmdebstrap with $1 = the new root.
# shellcheck disable=SC2016
hooks=(
    # The VM boots this kernel directly from a virtio disk: an initramfs with
    # just the modules for that (MODULES=list plus this hook) is a fraction of
    # the default one and unpacks much faster under software emulation.
    # Written before the kernel package is installed, so its first
    # update-initramfs already uses them; neither file belongs to a package.
    --essential-hook='mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/etc/initramfs-tools/hooks"'
    --essential-hook='echo MODULES=list >"$1/etc/initramfs-tools/conf.d/platform-agent-vm.conf"'
    --essential-hook='printf "%s\n" "$PA_INITRAMFS_HOOK" >"$1/etc/initramfs-tools/hooks/platform-agent-vm"'
    --essential-hook='chmod 0755 "$1/etc/initramfs-tools/hooks/platform-agent-vm"'
    # sshd runs in the VM only (build-vm-image.sh enables it there).
    --customize-hook='chroot "$1" systemctl disable ssh.service'
    # No fstab entries: the guest has no block devices of its own, and a
    # missing one would drop the boot into emergency mode.
    --customize-hook=': > "$1/etc/fstab"'
    # Nobody logs in; tests enter with nsenter.
    --customize-hook='chroot "$1" passwd --lock root'
    # Timers that would wake up at random moments during a test and do work
    # (apt downloads, filesystem scrubs) that has nothing to do with it.
    --customize-hook='chroot "$1" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service'
    # Nobody logs in on the console either; a getty there only adds noise
    # to the console log that a failed test prints.
    --customize-hook='chroot "$1" systemctl mask console-getty.service'
    --customize-hook='chroot "$1" systemctl set-default multi-user.target'
    # Empty: nspawn then hands each boot a transient machine id.
    --customize-hook='rm -f "$1/etc/machine-id"; : > "$1/etc/machine-id"'
    # mmdebstrap copies the build host's name; without the file the guest
    # keeps the name the backend gives it.
    --customize-hook='rm -f "$1/etc/hostname"'
)
mmdebstrap --mode=root --variant=minbase --quiet --include="$packages" \
    "${hooks[@]}" "$suite" "$tmp" - <<<"$sources"
touch "$tmp/.complete"
mv "$tmp" "$rootfs"
log "built in $((SECONDS - start)) s"

# Roots built by earlier versions of this script are dead weight (about 200 MB
# each) once the script has changed.
for old in "$cache_root"/rootfs-"$suite"-*; do
    [[ "$old" == "$rootfs" ]] && continue
    log "removing stale $old"
    rm -rf "$old"
done
echo "$rootfs"
