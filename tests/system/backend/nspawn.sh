# shellcheck shell=bash
# nspawn backend for lib.sh: the cached bookworm root booted with
# `systemd-nspawn --boot`, systemd as PID 1 with journald, D-Bus and logind.
# Boots in well under a second. It shares the host's kernel, so there is no
# real shutdown of a machine and no udev (/dev/disk/by-* does not exist): disks
# are loop devices bound into the container by path.

NSPAWN_ROOTFS=""
NSPAWN_PID=""    # the systemd-nspawn process
NSPAWN_LEADER="" # the container's PID 1, as a host PID
NSPAWN_BINDS=()
NSPAWN_LOOPS=()
# A test sets NSPAWN_HOST_NETWORK=1 before guest_boot to share the host's
# network namespace (to reach fixture servers on the host's loopback); the
# default is a private one.
NSPAWN_HOST_NETWORK="${NSPAWN_HOST_NETWORK:-0}"

backend_requirements() {
    echo systemd-nspawn nsenter losetup mkfs.ext4 mmdebstrap timeout jq
}

backend_prepare() {
    NSPAWN_ROOTFS="$("$SYSTEM_DIR/build-rootfs.sh")"
}

backend_attach_disk() {
    local dev
    dev="$(losetup --find --show "$1")"
    NSPAWN_LOOPS+=("$dev")
    NSPAWN_BINDS+=("--bind=$dev")
    # shellcheck disable=SC2034 # read by lib.sh
    BACKEND_DISK_PATH="$dev"
}

backend_boot() {
    local console_log=$1 machine network=(--private-network)
    [[ "$NSPAWN_HOST_NETWORK" == 1 ]] && network=()
    machine="pa-$(tr -c 'a-zA-Z0-9\n' - <<<"$TEST_NAME")-$$"
    # --volatile=overlay: the root is the cache behind a tmpfs overlay, so
    #   every boot starts from the same pristine tree and leaves nothing.
    # --register=no --keep-unit: the host has no systemd (or D-Bus) to register
    #   the machine with or to ask for a scope unit.
    # --private-network (unless NSPAWN_HOST_NETWORK=1): the guest must not
    #   touch the host's network.
    # Arguments after "--" go to the guest's systemd as its kernel command line:
    # journald copies every journal line to the console, which lib.sh prints
    # when a test fails.
    systemd-nspawn --boot --directory="$NSPAWN_ROOTFS" --volatile=overlay \
        --register=no --keep-unit "${network[@]}" --machine="${machine:0:64}" \
        --console=read-only "${NSPAWN_BINDS[@]}" \
        -- systemd.journald.forward_to_console=1 systemd.show_status=no systemd.log_color=0 \
        </dev/null >>"$console_log" 2>&1 &
    NSPAWN_PID=$!
}

# The container's PID 1 is the child of systemd-nspawn that is PID 1 in its
# own PID namespace.
nspawn_find_leader() {
    local child children
    children="$(cat /proc/"$NSPAWN_PID"/task/*/children 2>/dev/null || true)"
    for child in $children; do
        if grep -qE $'^NSpid:\t[0-9]+\t1$' /proc/"$child"/status 2>/dev/null; then
            NSPAWN_LEADER=$child
            return 0
        fi
    done
    return 1
}

nspawn_running() {
    # A finished background job is reaped by bash at once, so kill -0 fails.
    [[ -n "$NSPAWN_PID" ]] && kill -0 "$NSPAWN_PID" 2>/dev/null
}

# systemd creates its private socket once it is ready to take requests
# (systemctl then works); is-system-running --wait in lib.sh does the rest.
backend_wait_booted() {
    local deadline=$(($(now_ms) + $1 * 1000))
    until nspawn_find_leader && [[ -e /proc/$NSPAWN_LEADER/root/run/systemd/private ]]; do
        nspawn_running || die "systemd-nspawn exited during boot (see the console log)"
        (($(now_ms) < deadline)) || die "guest systemd not up after $1 s"
        sleep 0.05 # poll interval
    done
}

backend_exec() {
    nsenter --target="$NSPAWN_LEADER" --all "$@"
}

# The container ends when the guest's systemd does (after `systemctl
# poweroff` inside it, for example).
backend_wait_down() {
    local deadline=$(($(now_ms) + $1 * 1000))
    while nspawn_running; do
        (($(now_ms) < deadline)) || return 1
        sleep 0.05 # poll interval
    done
    wait "$NSPAWN_PID" 2>/dev/null || true
}

# nspawn turns SIGTERM into an orderly shutdown of the container (it sends
# SIGRTMIN+3 to the guest's systemd, like `systemctl halt`).
backend_poweroff() {
    nspawn_running || return 0
    kill -TERM "$NSPAWN_PID" 2>/dev/null || true
    backend_wait_down "$1"
}

backend_kill() {
    # Killing PID 1 of a PID namespace kills everything in it.
    if [[ -n "$NSPAWN_LEADER" ]]; then
        kill -KILL "$NSPAWN_LEADER" 2>/dev/null || true
    fi
    local deadline=$(($(now_ms) + 10000))
    while nspawn_running && (($(now_ms) < deadline)); do
        sleep 0.05 # poll interval
    done
    if nspawn_running; then
        kill -KILL "$NSPAWN_PID" 2>/dev/null || true
    fi
    wait "$NSPAWN_PID" 2>/dev/null || true
}

backend_cleanup() {
    local dev
    for dev in "${NSPAWN_LOOPS[@]}"; do
        losetup --detach "$dev" || log "could not detach $dev"
    done
    NSPAWN_LOOPS=()
}
