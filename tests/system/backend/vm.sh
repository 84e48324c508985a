# shellcheck shell=bash
# VM backend for lib.sh: the bookworm image from build-vm-image.sh booted by
# qemu with its own kernel (-kernel/-initrd, root=LABEL=root), so the guest has
# udev (/dev/disk/by-uuid, by-id), real virtio block devices and a real
# poweroff at the end. Each boot runs on a qcow2 overlay of the cached image,
# which stays pristine. Disks are raw images on virtio-blk with the disk's
# label as serial number: /dev/disk/by-id/virtio-LABEL in the guest.
#
# Commands run over SSH (a forwarded port on 127.0.0.1, one multiplexed
# connection); files are handed in through a read-only 9p share.
#
# Accelerator: KVM only when the CPU shows vmx/svm and the KVM module is not
# the PVM variant (/sys/module/kvm_pvm), under which a stock kernel crawls and
# dies; otherwise TCG, software emulation with one host thread per vCPU.
#
# Set VM_QEMU_ARGS to append arguments to qemu's command line.

VM_IMAGE_DIR=""
VM_PID=""
VM_PORT=""
VM_OVERLAY=""
VM_CONSOLE=""
VM_SHARE=""
VM_DISK_ARGS=()
VM_DISK_COUNT=0
VM_SSH=()
# Where the guest mounts the 9p share.
VM_SHARE_GUEST=/mnt/host
# A boot took 35-48 s under TCG here while other builds shared the cores, up
# to 80 s at load 9; GUEST_BOOT_TIMEOUT set by the caller still wins.
: "${GUEST_BOOT_TIMEOUT:=240}"
# A poll costs the emulated guest an SSH command, often a journalctl: poll
# less often than on nspawn so the agent under test keeps the CPU.
: "${POLL_INTERVAL:=1}"

backend_requirements() {
    echo qemu-system-x86_64 qemu-img ssh ssh-keygen mkfs.ext4 e2fsck debugfs mmdebstrap timeout flock journalctl jq objcopy
}

backend_prepare() {
    [[ -n "$VM_IMAGE_DIR" ]] && return 0
    VM_IMAGE_DIR="$("$SYSTEM_DIR/build-vm-image.sh")"
}

# backend_attach_disk IMG LABEL: a raw image as a virtio disk with serial LABEL.
backend_attach_disk() {
    local img=$1 label=${2:-disk$VM_DISK_COUNT}
    # virtio-blk serial numbers are at most 20 bytes.
    ((${#label} <= 20)) || die "disk label $label is longer than a virtio serial (20)"
    VM_DISK_COUNT=$((VM_DISK_COUNT + 1))
    # cache=writeback (qemu's default) with the guest's flushes honoured:
    # what the guest has synced is on the image when qemu exits.
    VM_DISK_ARGS+=(
        -drive "file=$img,if=none,id=disk$VM_DISK_COUNT,format=raw,cache=writeback"
        -device "virtio-blk-pci,drive=disk$VM_DISK_COUNT,serial=$label"
    )
    # shellcheck disable=SC2034 # read by lib.sh
    BACKEND_DISK_PATH="/dev/disk/by-id/virtio-$label"
}

# Under TCG the CPU model is Nehalem (x86-64-v2) rather than max: measured
# here, a boot took about 20% less emulation time (39-44 s of qemu CPU time
# against 50-54 s), as the guest then uses SSE rather than AVX code paths,
# which are dearer to emulate. VM_CPU overrides it.
vm_accel_args() {
    if grep -qwE 'vmx|svm' /proc/cpuinfo && [[ ! -e /sys/module/kvm_pvm && -w /dev/kvm ]]; then
        echo "-accel kvm -cpu ${VM_CPU:-host}"
    else
        echo "-accel tcg,thread=multi -cpu ${VM_CPU:-Nehalem}"
    fi
}

# A TCP port nothing listens on (/proc/net/tcp lists them in hex).
vm_free_port() {
    local port
    for _ in $(seq 50); do
        port=$((20000 + RANDOM % 40000))
        if ! awk -v p="$(printf '%04X' "$port")" '$4 == "0A" && $2 ~ (":" p "$") { found = 1 } END { exit !found }' \
            /proc/net/tcp /proc/net/tcp6 2>/dev/null; then
            echo "$port"
            return 0
        fi
    done
    return 1
}

vm_running() {
    [[ -n "$VM_PID" ]] && kill -0 "$VM_PID" 2>/dev/null
}

# The kernel command line. journald copies every journal line to the serial
# console (the test's console log): that copy survives the guest, so a test
# can read what happened up to the power-down. quiet keeps the kernel's own
# boot messages, which cost time on an emulated serial port, off it. The rest
# saves emulated work: no speculation mitigations (plain indirect jumps
# instead of retpolines), no TSC and softlockup watchdogs, no audit.
vm_cmdline() {
    # shellcheck disable=SC2054 # console=ttyS0,115200 is one word
    local args=(
        console=ttyS0,115200 root=LABEL=root rw fsck.mode=skip net.ifnames=0 quiet panic=-1
        mitigations=off tsc=reliable no_timer_check nowatchdog audit=0
        systemd.journald.forward_to_console=1 systemd.show_status=1 systemd.log_color=0
    )
    echo "${args[*]}"
}

backend_boot() {
    local console_log=$1
    VM_CONSOLE=$console_log
    VM_OVERLAY="$WORKDIR/root.qcow2"
    qemu-img create -q -f qcow2 -F raw -b "$VM_IMAGE_DIR/base.img" "$VM_OVERLAY"
    VM_SHARE="$WORKDIR/share"
    mkdir -p "$VM_SHARE"
    VM_PORT="$(vm_free_port)" || die "no free TCP port for the guest's SSH"
    local accel
    read -ra accel <<<"$(vm_accel_args)"
    local extra=()
    [[ -n "${VM_QEMU_ARGS:-}" ]] && read -ra extra <<<"$VM_QEMU_ARGS"
    # -nodefaults: no VGA, no default NIC, no floppy or CD: only what is
    # listed. cache=unsafe on the throwaway overlay: the guest's flushes are
    # not worth waiting for there (qemu still writes it all out on exit).
    # restrict=on: the guest reaches nothing outside; the port forward still
    # lets the host in. -no-reboot: a reboot (or panic=-1) ends qemu.
    qemu-system-x86_64 -name "pa-$TEST_NAME" -nodefaults -no-user-config -display none \
        -machine pc "${accel[@]}" -smp 2 -m "${VM_MEMORY:-1536}" \
        -kernel "$VM_IMAGE_DIR/vmlinuz" -initrd "$VM_IMAGE_DIR/initrd.img" -append "$(vm_cmdline)" \
        -drive "file=$VM_OVERLAY,if=none,id=root,format=qcow2,cache=unsafe" \
        -device virtio-blk-pci,drive=root,serial=root \
        "${VM_DISK_ARGS[@]}" \
        -netdev "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:$VM_PORT-:22" \
        -device virtio-net-pci,netdev=net0,romfile= \
        -virtfs "local,path=$VM_SHARE,mount_tag=host,security_model=none,readonly=on" \
        -device virtio-rng-pci \
        -chardev "file,id=console,path=$console_log,append=on" -serial chardev:console \
        -no-reboot "${extra[@]}" \
        </dev/null >>"$WORKDIR/qemu.log" 2>&1 &
    VM_PID=$!
    VM_SSH=(
        ssh -F /dev/null -i "$VM_IMAGE_DIR/id_ed25519" -p "$VM_PORT"
        -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null
        -o LogLevel=ERROR -o ConnectTimeout=10 -o ServerAliveInterval=5 -o ServerAliveCountMax=6
        # One connection for every command: a key exchange costs the
        # emulated guest noticeable time.
        -o ControlMaster=auto -o "ControlPath=$WORKDIR/ssh.sock" -o ControlPersist=yes
        root@127.0.0.1
    )
    log "qemu pid $VM_PID, ssh on 127.0.0.1:$VM_PORT, $(vm_accel_args)"
}

# Until sshd takes a command; lib.sh then waits for is-system-running.
# SSH is tried only once the console shows the guest's address configured: a
# connection qemu forwards before that waits on a SYN nobody answers, and
# backs off for seconds.
backend_wait_booted() {
    local deadline=$(($(now_ms) + $1 * 1000)) first
    first=$(now_ms)
    until grep -q 'Finished pa-vm-network.service' "$VM_CONSOLE" 2>/dev/null &&
        "${VM_SSH[@]}" true </dev/null >/dev/null 2>&1; do
        if ! vm_running; then
            sed 's/^/qemu: /' "$WORKDIR/qemu.log" >&2
            die "qemu exited during boot (see the console log)"
        fi
        (($(now_ms) < deadline)) || die "guest sshd not answering after $1 s"
        sleep 0.5 # poll interval
    done
    log "sshd answered $(($(now_ms) - first)) ms after qemu started ($(vm_cpu_seconds) s of qemu CPU time)"
}

backend_exec() {
    # ssh hands the remote shell (root's bash) one string: quote each word.
    "${VM_SSH[@]}" -- "$(printf '%q ' "$@")"
}

# backend_copy_in SRC DEST MODE: through the 9p share (mounted on first use;
# this may run in a subshell, so the guest's mount table is the only record).
backend_copy_in() {
    local src=$1 dest=$2 mode=$3 name rc=0
    name="$(basename "$src").$RANDOM"
    cp "$src" "$VM_SHARE/$name"
    # shellcheck disable=SC2016 # expanded by the guest's shell
    in_guest sh -c '
        mountpoint -q "$1" || mount -t 9p -o trans=virtio,version=9p2000.L,ro host "$1" || exit
        mkdir -p "$(dirname "$3")" && cp "$1/$2" "$3.tmp" && chmod "$4" "$3.tmp" && mv "$3.tmp" "$3"' \
        sh "$VM_SHARE_GUEST" "$name" "$dest" "$mode" </dev/null || rc=$?
    rm -f "$VM_SHARE/$name"
    return "$rc"
}

# The CPU time qemu has used so far, in seconds: unlike wall time, it hardly
# depends on what else the host is doing.
vm_cpu_seconds() {
    local fields
    read -ra fields <<<"$(sed 's/.*) //' "/proc/$VM_PID/stat" 2>/dev/null)"
    ((${#fields[@]} > 12)) || return 1
    echo $(((fields[11] + fields[12]) / $(getconf CLK_TCK)))
}

# backend_wait_down SECONDS: until qemu has exited (the guest powered off).
backend_wait_down() {
    local cpu
    cpu="$(vm_cpu_seconds)" && log "qemu has used $cpu s of CPU time so far"
    local deadline=$(($(now_ms) + $1 * 1000))
    while vm_running; do
        (($(now_ms) < deadline)) || return 1
        sleep 0.2 # poll interval
    done
    wait "$VM_PID" 2>/dev/null || true
}

# An orderly poweroff the way an operator does it: systemctl poweroff goes
# through logind, which honours delay inhibitors (the agent's shutdown plan).
backend_poweroff() {
    vm_running || return 0
    "${VM_SSH[@]}" systemctl poweroff </dev/null >/dev/null 2>&1 || true
    backend_wait_down "$1"
}

backend_kill() {
    if vm_running; then
        kill -KILL "$VM_PID" 2>/dev/null || true
    fi
    wait "$VM_PID" 2>/dev/null || true
}

backend_cleanup() {
    if ((${#VM_SSH[@]} > 0)); then
        "${VM_SSH[@]}" -O exit </dev/null >/dev/null 2>&1 || true
    fi
    [[ -n "$VM_OVERLAY" ]] && rm -f "$VM_OVERLAY"
    return 0
}

# vm_copy_out_journal DIR: the guest's persistent journal (/var/log/journal,
# machine-id directories and all), read out of the overlay after the guest is
# down, as DIR (for journalctl --directory=DIR).
vm_copy_out_journal() {
    local dir=$1 raw="$WORKDIR/root-after.raw" rc=0
    vm_running && die "vm_copy_out_journal: the guest is still running"
    qemu-img convert -q -O raw "$VM_OVERLAY" "$raw" || return 1
    rm -rf "$dir.rdump"
    mkdir -p "$dir.rdump"
    # rdump copies the directory itself into the target: DIR.rdump/journal.
    debugfs -R "rdump /var/log/journal $dir.rdump" "$raw" >/dev/null 2>&1 || rc=$?
    rm -f "$raw"
    ((rc == 0)) && [[ -d "$dir.rdump/journal" ]] || return 1
    rm -rf "$dir"
    mv "$dir.rdump/journal" "$dir"
    rmdir "$dir.rdump"
}
