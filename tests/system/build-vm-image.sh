#!/usr/bin/env bash
# Builds the VM backend's image from the root build-rootfs.sh makes, and prints
# the directory holding it:
#
#   base.img        raw ext4 disk labelled "root" (booted as root=LABEL=root;
#                   every test boots a qcow2 overlay on it, never the file)
#   vmlinuz         the root's kernel and initramfs, for qemu -kernel/-initrd
#   initrd.img
#   id_ed25519      the key root's authorized_keys in the image accepts
#
# Cached under a name made of a hash of this script and the root's own cached
# name, so a change to either gives a fresh build and an unchanged pair reuses
# the cache. The VM-only tweaks are made to a copy of the root, so the nspawn
# backend keeps booting the root as it is.
#
#   PLATFORM_AGENT_FIXTURES=DIR ...   cache somewhere else (as build-rootfs.sh)
set -euo pipefail
PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
self="$(readlink -f "${BASH_SOURCE[0]}")"
cache_root="${PLATFORM_AGENT_FIXTURES:-/var/cache/platform-agent-fixtures}"
# Room for the root (about 700 MB) and what tests write; the file is sparse.
image_size=3G

log() { echo "build-vm-image: $*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    log "must run as root"
    exit 1
fi

rootfs="$("$here/build-rootfs.sh")"
hash="$( (sha256sum "$self" | cut -c1-64 && basename "$rootfs") | sha256sum | cut -c1-16)"
out="$cache_root/vm-bookworm-$hash"

if [[ -e "$out/.complete" ]]; then
    echo "$out"
    exit 0
fi

mkdir -p "$cache_root"
exec 9>"$cache_root/.vm-bookworm.lock"
flock 9
if [[ -e "$out/.complete" ]]; then
    echo "$out"
    exit 0
fi

start=$SECONDS
tmp="$out.tmp"
rm -rf "$tmp"
mkdir -p "$tmp"
tree="$tmp/root"
log "building $out from $rootfs"
# A copy keeps the nspawn root untouched (and reflinks where the filesystem can).
cp -a --reflink=auto "$rootfs" "$tree"
rm -f "$tree/.complete"

# The kernel and initramfs the root's packages installed, for direct boot.
kernel="$(find "$tree/boot" -maxdepth 1 -name 'vmlinuz-*' | sort -V | tail -n 1)"
[[ -n "$kernel" ]] || {
    log "no kernel under $tree/boot"
    exit 1
}
version="${kernel##*/vmlinuz-}"
cp "$kernel" "$tmp/vmlinuz"
cp "$tree/boot/initrd.img-$version" "$tmp/initrd.img"

# Root logs in with this key only (the password stays locked). sshd is
# socket-activated: systemd listens on port 22 from early boot, long before a
# resident sshd would have started.
ssh-keygen -q -t ed25519 -N "" -C platform-agent-system-tests -f "$tmp/id_ed25519"
install -d -m 0700 "$tree/root/.ssh"
install -m 0600 "$tmp/id_ed25519.pub" "$tree/root/.ssh/authorized_keys"
systemctl --root="$tree" --quiet enable ssh.socket

# qemu's user-mode network: the guest is always 10.0.2.15, and only the host
# reaches it, through the forwarded SSH port. One `ip` call costs a fraction
# of starting systemd-networkd under emulation. The initramfs loads virtio_net
# (build-rootfs.sh), so eth0 exists when systemd starts and the address is set
# early in sysinit, without waiting for udev's coldplug to announce the device;
# net.ifnames=0 on the kernel command line keeps the name eth0.
cat >"$tree/etc/systemd/system/pa-vm-network.service" <<'UNIT'
[Unit]
Description=Static address on qemu's user network (platform-agent system tests)
DefaultDependencies=no
Before=sysinit.target network-pre.target network.target
Wants=network.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/sbin/ip address add 10.0.2.15/24 dev eth0
ExecStart=/usr/sbin/ip link set eth0 up
ExecStart=/usr/sbin/ip route add default via 10.0.2.2

[Install]
WantedBy=sysinit.target
UNIT
systemctl --root="$tree" --quiet enable pa-vm-network.service

# Nobody logs in on a terminal: the console is a log file. The rest is work
# each boot would do under emulation for nothing a test looks at: kernel
# modules and pseudo filesystems nothing here uses, binfmt, utmp records.
systemctl --root="$tree" --quiet mask \
    getty.target serial-getty@ttyS0.service getty@tty1.service \
    modprobe@.service kmod-static-nodes.service systemd-modules-load.service \
    dev-hugepages.mount dev-mqueue.mount sys-kernel-debug.mount sys-kernel-tracing.mount \
    sys-kernel-config.mount sys-fs-fuse-connections.mount \
    proc-sys-fs-binfmt_misc.automount systemd-binfmt.service \
    systemd-network-generator.service systemd-pstore.service \
    systemd-update-utmp.service systemd-update-utmp-runlevel.service \
    systemd-user-sessions.service

# A fixed machine id: an empty one would make every boot a "first boot"
# (presets applied again, ConditionFirstBoot units run).
printf '%s\n' "$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$tree/etc/machine-id"
echo pa-vm >"$tree/etc/hostname"

# A persistent journal (Debian's Storage=auto keeps it on disk when this
# directory exists): t21 reads it out of the overlay after the guest has
# powered off, to see the last entries before the power-down.
chroot "$tree" install -d -m 2755 -g systemd-journal /var/log/journal
# The 9p share the backend hands files in through.
install -d "$tree/mnt/host"

mkfs.ext4 -q -F -L root -d "$tree" "$tmp/base.img" "$image_size" >&2
rm -rf "$tree"
touch "$tmp/.complete"
mv "$tmp" "$out"
log "built in $((SECONDS - start)) s"

for old in "$cache_root"/vm-bookworm-*; do
    [[ "$old" == "$out" ]] && continue
    log "removing stale $old"
    rm -rf "$old"
done
echo "$out"
