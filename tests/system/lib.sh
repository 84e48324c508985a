# shellcheck shell=bash
# Shared by every tests/system/t*.sh: boots a throwaway guest with real
# systemd as PID 1, runs commands in it, records checks, and tears everything
# down on exit, also when the test fails half-way.
#
#   source "$(dirname "$0")/lib.sh"
#   guest_add_disk pa-data 64M        # optional, before guest_boot
#   guest_boot
#   check "unit is active" in_guest systemctl is-active foo
#   finish
#
# How the guest is made is up to a backend in backend/<name>.sh. A test names
# the backends it can run on in a header line (the first one is its default;
# none means nspawn):
#   # system-test-backends: vm
# SYSTEM_TEST_BACKEND picks one of them (run.sh sets it). A backend defines:
#   backend_requirements          commands it needs on the host
#   backend_prepare               find or build its image (may be slow once)
#   backend_attach_disk IMG LABEL make IMG visible to the next boot; sets
#                                 BACKEND_DISK_PATH to the device path the
#                                 guest will see
#   backend_boot CONSOLE_LOG      start the guest in the background
#   backend_wait_booted SECONDS   until the guest's systemd answers
#   backend_exec CMD...           run CMD in the guest (stdin/stdout passed on)
#   backend_wait_down SECONDS     until the guest has gone down by itself
#                                 (after a poweroff from inside); non-zero
#                                 if not done in time
#   backend_poweroff SECONDS      orderly shutdown; non-zero if not done in time
#   backend_kill                  stop the guest at once
#   backend_cleanup               release whatever attach/boot took on the host
# and may define backend_copy_in SRC DEST MODE (a faster way in for big files).
#   nspawn  systemd-nspawn --boot on the cached root: boots in under a second,
#           shares the host's kernel: no udev, no real poweroff.
#   vm      qemu with the root's own kernel: udev, virtio disks, a real
#           poweroff; 35-50 s to boot under TCG here (see README.md).

set -euo pipefail
# losetup, mkfs.ext4 and friends live in sbin, which a CI shell may not have.
PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
# Let the ERR trap below see failures inside functions too.
set -E

SYSTEM_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SYSTEM_DIR/../.." && pwd)"
TEST_NAME="$(basename "$0" .sh)"
# The backends this test declares (see above); the first is its default.
read -ra TEST_BACKENDS <<<"$(sed -n 's/^# system-test-backends: *//p' "$0" | head -n 1)"
((${#TEST_BACKENDS[@]} > 0)) || TEST_BACKENDS=(nspawn)
SYSTEM_TEST_BACKEND="${SYSTEM_TEST_BACKEND:-${TEST_BACKENDS[0]}}"
if [[ " ${TEST_BACKENDS[*]} " != *" $SYSTEM_TEST_BACKEND "* ]]; then
    echo "[$TEST_NAME] error: runs on ${TEST_BACKENDS[*]}, not on SYSTEM_TEST_BACKEND=$SYSTEM_TEST_BACKEND" >&2
    exit 1
fi
PLATFORM_AGENT_BIN="${PLATFORM_AGENT_BIN:-${CARGO_TARGET_DIR:-$REPO_ROOT/target}/debug/platform-agent}"
# Default limit for one command run in the guest; a hung command must fail the
# test, not the CI job.
GUEST_TIMEOUT="${GUEST_TIMEOUT:-60}"

if [[ -n "${SYSTEM_TEST_WORKDIR:-}" ]]; then
    WORKDIR="$SYSTEM_TEST_WORKDIR"
    mkdir -p "$WORKDIR"
else
    WORKDIR="$(mktemp -d "${TMPDIR:-/tmp}/platform-agent-$TEST_NAME.XXXXXX")"
fi
CONSOLE_LOG="$WORKDIR/console.log"

# shellcheck source=backend/nspawn.sh
source "$SYSTEM_DIR/backend/$SYSTEM_TEST_BACKEND.sh"
# Between two polls of a condition (wait_until, check_within, holds_for). A
# backend may set a longer one: under emulation every poll (SSH, journalctl)
# takes guest time away from what the test waits for.
POLL_INTERVAL="${POLL_INTERVAL:-0.1}"

log() { echo "[$TEST_NAME] $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# Milliseconds since the epoch, without forking date.
now_ms() {
    local t=${EPOCHREALTIME/./}
    echo $((t / 1000))
}

# wait_until SECONDS WHAT CMD...: polls CMD until it succeeds. Fails (and says
# what it was waiting for) once SECONDS have passed.
wait_until() {
    local seconds=$1 what=$2
    shift 2
    local deadline=$(($(now_ms) + seconds * 1000))
    until "$@" >/dev/null 2>&1; do
        if (($(now_ms) >= deadline)); then
            log "timed out after ${seconds}s waiting for $what"
            return 1
        fi
        sleep "$POLL_INTERVAL" # not a wait for readiness
    done
}

# ---------------------------------------------------------------------------
# Checks. A failed check is reported and the test goes on, so one run shows
# every mismatch; `finish` turns any failure into a non-zero exit.

FAILED_CHECKS=()

# Seconds since the test started, shown with every check: where the time goes.
TEST_START_MS=$(now_ms)
elapsed() {
    local ms=$(($(now_ms) - TEST_START_MS))
    printf '%4d.%d' $((ms / 1000)) $((ms % 1000 / 100))
}
pass() { echo "  ok    $(elapsed) $1"; }
fail() {
    local what=$1
    shift
    echo "  FAIL  $(elapsed) $what"
    local line
    for line in "$@"; do
        sed 's/^/          /' <<<"$line"
    done
    FAILED_CHECKS+=("$what")
}

# check WHAT CMD...: CMD must exit 0.
check() {
    local what=$1 out rc=0
    shift
    out="$("$@" 2>&1)" || rc=$?
    if ((rc == 0)); then
        pass "$what"
    else
        fail "$what" "command: $*" "exit status: $rc" "output: $out"
    fi
    return 0
}

# must WHAT CMD...: a step the rest of the test depends on; the test stops
# here if it fails.
must() {
    local what=$1 out rc=0
    shift
    out="$("$@" 2>&1)" || rc=$?
    if ((rc == 0)); then
        pass "$what"
    else
        fail "$what" "command: $*" "exit status: $rc" "output: $out"
        die "cannot go on after: $what"
    fi
}

# check_fails WHAT CMD...: CMD must exit non-zero; its output is kept in
# CHECK_OUTPUT for further checks on the error message.
CHECK_OUTPUT=""
check_fails() {
    local what=$1 rc=0
    shift
    CHECK_OUTPUT="$("$@" 2>&1)" || rc=$?
    if ((rc != 0)); then
        pass "$what (exit status $rc)"
    else
        fail "$what" "command: $*" "expected a non-zero exit status, got 0" "output: $CHECK_OUTPUT"
    fi
    return 0
}

# check_eq WHAT EXPECTED ACTUAL
check_eq() {
    if [[ "$3" == "$2" ]]; then
        pass "$1"
    else
        fail "$1" "expected: $2" "actual:   $3"
    fi
}

# check_match WHAT EXTENDED-REGEX ACTUAL
check_match() {
    if [[ "$3" =~ $2 ]]; then
        pass "$1"
    else
        fail "$1" "expected to match: $2" "actual: $3"
    fi
}

# check_within SECONDS WHAT CMD...: CMD must succeed within SECONDS (polled),
# for things that happen asynchronously, such as journal entries.
check_within() {
    local seconds=$1 what=$2
    shift 2
    if wait_until "$seconds" "$what" "$@" 2>/dev/null; then
        pass "$what"
    else
        local out rc=0
        out="$("$@" 2>&1)" || rc=$?
        fail "$what" "not true within ${seconds}s: $*" "last exit status: $rc" "last output: $out"
    fi
}

# Ends a test: non-zero exit if any check failed.
finish() {
    if ((${#FAILED_CHECKS[@]} > 0)); then
        log "${#FAILED_CHECKS[@]} check(s) failed:"
        printf '  - %s\n' "${FAILED_CHECKS[@]}" >&2
        exit 1
    fi
    log "all checks passed"
}

# ---------------------------------------------------------------------------
# The guest.

GUEST_STATE=down # down | booting | up
# shellcheck disable=SC2034 # read by the tests
declare -A GUEST_DISK=()       # label -> device path in the guest
declare -A GUEST_DISK_IMAGE=() # label -> image file on the host
DISK_IMAGES=()

# guest_add_disk LABEL SIZE [--blank | --uuid UUID]: a sparse disk of SIZE
# (truncate syntax, e.g. 64M) attached to the next boot, with an ext4 file
# system labelled LABEL (and the given UUID), or nothing on it (--blank). Its
# device path inside the guest is then in GUEST_DISK[LABEL] (on the vm
# backend /dev/disk/by-id/virtio-LABEL), the image on the host in
# GUEST_DISK_IMAGE[LABEL].
guest_add_disk() {
    local label=$1 size=$2 format=true uuid_args=()
    shift 2
    while (($# > 0)); do
        case $1 in
        --blank) format=false ;;
        --uuid)
            uuid_args=(-U "$2")
            shift
            ;;
        *) die "guest_add_disk: unknown option $1" ;;
        esac
        shift
    done
    [[ "$GUEST_STATE" == down ]] || die "guest_add_disk must come before guest_boot"
    local img="$WORKDIR/disk-$label.img"
    rm -f "$img"
    truncate -s "$size" "$img"
    DISK_IMAGES+=("$img")
    # mkfs works on the file directly; attaching it is the backend's business.
    if $format; then
        mkfs.ext4 -q -F -L "$label" "${uuid_args[@]}" "$img"
    fi
    # shellcheck disable=SC2034 # read by the tests
    GUEST_DISK_IMAGE[$label]="$img"
    backend_attach_disk "$img" "$label"
    GUEST_DISK[$label]="$BACKEND_DISK_PATH"
    log "disk $label ($size) is ${GUEST_DISK[$label]} in the guest"
}

# guest_boot: boots a fresh guest and returns once its systemd reports the
# system as running.
guest_boot() {
    local start
    start=$(now_ms)
    backend_prepare
    GUEST_STATE=booting
    : >"$CONSOLE_LOG"
    backend_boot "$CONSOLE_LOG"
    backend_wait_booted "${GUEST_BOOT_TIMEOUT:-60}"
    # "degraded" means some unit of the image itself failed: better to stop
    # here than to let a test chase a broken guest.
    local state
    state="$(in_guest systemctl is-system-running --wait)" || true
    if [[ "$state" != running ]]; then
        in_guest systemctl --failed --no-legend >&2 || true
        die "guest is '$state' after boot, expected 'running'"
    fi
    GUEST_STATE=up
    log "guest up in $(($(now_ms) - start)) ms"
}

# in_guest CMD...: runs CMD as root inside the guest with a clean environment;
# stdin, stdout, stderr and the exit status are CMD's. Killed after
# GUEST_TIMEOUT seconds (exit status 124). The timeout runs inside the guest,
# as CMD's parent: killed from the host, CMD would be left to the guest's init
# as an orphan, which held up the guest's shutdown by its remaining run time.
in_guest() {
    [[ "$GUEST_STATE" != down ]] || die "in_guest: no guest is running"
    backend_exec env -i \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LANG=C.UTF-8 TERM=dumb SYSTEMD_PAGER= SYSTEMD_COLORS=0 \
        timeout --kill-after=5 "$GUEST_TIMEOUT" "$@"
}

# guest_copy_in SRC DEST [MODE]: copies a host file into the guest, creating
# DEST's directory, as a package install would.
guest_copy_in() {
    local src=$1 dest=$2 mode=${3:-0644}
    [[ -f "$src" ]] || die "guest_copy_in: no such file: $src"
    if declare -F backend_copy_in >/dev/null; then
        backend_copy_in "$src" "$dest" "$mode"
        return
    fi
    # shellcheck disable=SC2016 # expanded by the guest's shell
    in_guest sh -c 'mkdir -p "$(dirname "$1")" && cat >"$1" && chmod "$2" "$1"' \
        sh "$dest" "$mode" <"$src"
}

# guest_poweroff: orderly shutdown within GUEST_POWEROFF_TIMEOUT seconds, else
# the guest is killed (and this returns non-zero).
guest_poweroff() {
    [[ "$GUEST_STATE" != down ]] || return 0
    local rc=0 start
    start=$(now_ms)
    backend_poweroff "${GUEST_POWEROFF_TIMEOUT:-90}" || rc=$?
    if ((rc != 0)); then
        log "guest did not power off in time; killing it"
        backend_kill || true
    else
        log "guest down in $(($(now_ms) - start)) ms"
    fi
    GUEST_STATE=down
    return "$rc"
}

# guest_wait_down SECONDS: after a poweroff started inside the guest (say
# `in_guest systemctl poweroff`), until the guest is down. Non-zero, and the
# guest killed, if it is not down in time.
guest_wait_down() {
    [[ "$GUEST_STATE" != down ]] || return 0
    local rc=0 start
    start=$(now_ms)
    backend_wait_down "$1" || rc=$?
    if ((rc != 0)); then
        log "guest did not go down within $1 s; killing it"
        backend_kill || true
    else
        log "guest down in $(($(now_ms) - start)) ms"
    fi
    GUEST_STATE=down
    return "$rc"
}

# ---------------------------------------------------------------------------
# The journal inside the guest.

# journal_cursor: prints a cursor for "now", to look only at later entries.
journal_cursor() {
    in_guest journalctl --quiet --lines=1 --output=json --output-fields=__CURSOR |
        sed -n 's/.*"__CURSOR" *: *"\([^"]*\)".*/\1/p'
}

# journal_has UNIT CURSOR JQ-CONDITION: some entry of UNIT (empty: any) after
# CURSOR (empty: since boot) satisfies JQ-CONDITION, a jq expression on one
# `journalctl -o json` entry, e.g. '.MESSAGE_ID == "..."'.
# jq runs on the host: under emulation its start-up alone takes seconds.
journal_has() {
    # shellcheck disable=SC2016 # expanded by the guest's shell
    in_guest sh -c 'journalctl ${1:+--unit="$1"} ${2:+--after-cursor="$2"} --output=json --no-pager' \
        sh "$1" "$2" | jq --slurp --exit-status "any(.[]; $3)" >/dev/null
}

# journal_query CURSOR JQ-FILTER: JQ-FILTER applied (raw output) to the array
# of all journal entries after CURSOR (empty: since boot), e.g.
#   journal_query "$cursor" '[.[] | select(.MESSAGE_ID == "...") | .STEP] | join(" ")'
journal_query() {
    local json
    # shellcheck disable=SC2016 # expanded by the guest's shell
    json="$(in_guest sh -c 'journalctl ${1:+--after-cursor="$1"} --output=json --no-pager' sh "$1")" ||
        return
    jq --slurp --raw-output "$2" <<<"$json"
}

# guest_status_jq FILTER: FILTER (raw output) on `platform-agent status --json`.
guest_status_jq() {
    local json
    json="$(in_guest platform-agent status --json)" || return
    jq --raw-output "$1" <<<"$json"
}

# guest_status_is FILTER EXPECTED: guest_status_jq FILTER prints EXPECTED
# (for check_within, which runs it again on every poll).
guest_status_is() {
    local actual
    actual="$(guest_status_jq "$1")" || return
    [[ "$actual" == "$2" ]] || {
        echo "$actual"
        return 1
    }
}

# guest_write FILE [MODE]: writes stdin to FILE in the guest (creating its
# directory).
guest_write() {
    # shellcheck disable=SC2016 # expanded by the guest's shell
    in_guest sh -c 'mkdir -p "$(dirname "$1")" && cat >"$1" && chmod "$2" "$1"' sh "$1" "${2:-0644}"
}

# holds_for SECONDS WHAT CMD...: CMD must succeed every time it is polled for
# SECONDS: something that must *not* happen (K3s starting while the disk is
# absent) gets that long to happen.
holds_for() {
    local seconds=$1 what=$2
    shift 2
    local deadline=$(($(now_ms) + seconds * 1000)) out rc
    while (($(now_ms) < deadline)); do
        rc=0
        out="$("$@" 2>&1)" || rc=$?
        if ((rc != 0)); then
            fail "$what" "stopped holding within ${seconds}s: $*" "exit status: $rc" "output: $out"
            return 0
        fi
        sleep "$POLL_INTERVAL"
    done
    pass "$what"
}

# ---------------------------------------------------------------------------
# The agent and the K3s stand-in in the guest (the t2* tests).

# The agent's stable journal MESSAGE_IDs (agent/src/logging.rs).
# shellcheck disable=SC2034 # read by the tests
{
    ID_AGENT_READY=70ab9b57cf4e43f98a3b577e2d2a32b2
    ID_SHUTDOWN_STARTED=496cbd7655614c4a89327adfdacd625c
    ID_AGENT_STOPPED=2e63f3bd15b3438d9f7d075805fce63d
    ID_VOLUME_READY=586ab27a954a47589e68fa15b0a4fc76
    ID_VOLUME_NOT_READY=401ff5c470ab4ea89d49232f73ea7949
    ID_K3S_STARTED=bac07c7454bd42009e215e2b73f7a66d
    ID_K3S_FENCED=6affde2da35548efa0436c640d9442ab
    ID_K3S_READINESS=c877defee8814e30901aea3e63244b70
    ID_PLAN_STARTED=30ecbd4233274c7f8a3739eba05c4529
    ID_PLAN_STEP=2be9f09f68024447a51dbea476a515e1
    ID_UNMOUNT_REFUSED=d22a64575ba349d991aa1070496072d6
    ID_LEFTOVER_SIGNALLED=fddf48230739492fbdccd326ceb2d09b
    ID_PLAN_FINISHED=dd31fe7fea494a269392f9f3acf801f5
    # The shutdown plan's steps, in the order they must run.
    PLAN_STEPS="stop-jobs stop-k3s clean-leftovers flush-wal sync unmount-data release-inhibitor"
    # Where the stand-in's container keeps a file open, below
    # default-local-storage-path (guest_write_node_config sets it).
    STANDIN_HELD_FILE=/data/k3s-storage/pvc-standin/held.dat
    # ... and what it wrote there: the output of `seq $STANDIN_HELD_LINES`.
    STANDIN_HELD_LINES=10000
    STANDIN_READYZ=http://127.0.0.1:6443/readyz
}

# guest_install_node UUID: the agent as the package installs it (binary,
# unit, sysusers, tmpfiles, vendor configuration, logind drop-in; enabled, not
# started), the K3s stand-in as k3s.service (k3s-standin.py as
# /usr/local/bin/k3s-standin; installed disabled: the agent starts it), and
# the test configuration for the volume with UUID (guest_write_node_config).
# One daemon-reload for all of it (a reload costs seconds under emulation),
# and logind restarted so the drop-in's InhibitDelayMaxSec holds now.
guest_install_node() {
    [[ -x "$PLATFORM_AGENT_BIN" ]] || die "no agent binary at $PLATFORM_AGENT_BIN (run.sh builds it)"
    # Without its debug info the binary is a fraction of the size: quicker to
    # hand in, quicker to start; the code is the same.
    local bin="$WORKDIR/platform-agent"
    objcopy --strip-debug "$PLATFORM_AGENT_BIN" "$bin"
    must "binary -> /usr/bin/platform-agent" guest_copy_in "$bin" /usr/bin/platform-agent 0755
    rm -f "$bin"
    local files=(
        systemd/platform-agent.service /usr/lib/systemd/system/platform-agent.service
        systemd/platform-agent.sysusers /usr/lib/sysusers.d/platform-agent.conf
        systemd/platform-agent.tmpfiles /usr/lib/tmpfiles.d/platform-agent.conf
        systemd/platform-agent-logind.conf /usr/lib/systemd/logind.conf.d/50-platform-agent.conf
        config/default.toml /usr/lib/platform-agent/config.d/00-default.toml
        tests/system/k3s-standin/k3s.service /etc/systemd/system/k3s.service
    ) i
    for ((i = 0; i < ${#files[@]}; i += 2)); do
        must "${files[i]} -> ${files[i + 1]}" guest_copy_in "$REPO_ROOT/${files[i]}" "${files[i + 1]}"
    done
    must "tests/system/k3s-standin/k3s-standin.py -> /usr/local/bin/k3s-standin" \
        guest_copy_in "$SYSTEM_DIR/k3s-standin/k3s-standin.py" /usr/local/bin/k3s-standin 0755
    must "systemd-sysusers, systemd-tmpfiles --create, enable, daemon-reload, restart logind" \
        in_guest sh -c 'systemd-sysusers platform-agent.conf &&
            systemd-tmpfiles --create platform-agent.conf &&
            systemctl enable --no-reload platform-agent.service &&
            systemctl daemon-reload && systemctl restart systemd-logind'
    guest_write_node_config "$1"
}

# guest_write_node_config UUID: /etc/platform-agent/config.d/50-test.toml,
# the volume (by UUID, with two directories to lay out) and the stand-in as
# K3s, checked every second.
guest_write_node_config() {
    must "write /etc/platform-agent/config.d/50-test.toml" guest_write /etc/platform-agent/config.d/50-test.toml <<EOF
[agent]
check_interval = "1s"

[volume]
enabled = true
uuid = "$1"
mount_point = "/data"

[[volume.directories]]
path = "k3s-storage"
mode = "0711"

[[volume.directories]]
path = "traefik"
owner = 65532
group = 65532
mode = "0700"

[k3s]
enabled = true
unit = "k3s.service"
data_dir = "/data/k3s"
local_storage_path = "/data/k3s-storage"
readyz_url = "$STANDIN_READYZ"
leftover_grace = "3s"

[metrics]
enabled = false
EOF
    must "platform-agent config check" in_guest platform-agent config check
}

# guest_start_node: starts the agent (installed and configured as above, with
# the data disk's filesystem present) and waits until K3s is api-ready.
guest_start_node() {
    must "systemctl start platform-agent" in_guest systemctl start platform-agent
    check_within 120 "status: /data mounted and K3s api-ready" \
        guest_status_is '"\(.volume.mount_state.state) \(.k3s_status.tier)"' "mounted api-ready"
}

# show_in_log WHAT CMD...: CMD's output in the test log, indented.
show_in_log() {
    local what=$1 out rc=0
    shift
    out="$("$@" 2>&1)" || rc=$?
    echo "    -- $what (exit status $rc):"
    sed 's/^/        | /' <<<"$out"
}

# plan_steps CURSOR: "STEP:OUTCOME ..." of the shutdown plan's step entries
# after CURSOR, in journal order.
plan_steps() {
    journal_query "$1" "[.[] | select(.MESSAGE_ID == \"$ID_PLAN_STEP\") | \"\(.STEP):\(.OUTCOME)\"] | join(\" \")"
}

# plan_sequence CURSOR: the plan's entries after CURSOR as words, in journal
# order: "started step step ... finished".
plan_sequence() {
    journal_query "$1" "[.[] | .MESSAGE_ID |
        if . == \"$ID_PLAN_STARTED\" then \"started\" elif . == \"$ID_PLAN_STEP\" then \"step\"
        elif . == \"$ID_PLAN_FINISHED\" then \"finished\" else empty end] | join(\" \")"
}

# guest_pid_file NAME: a PID the stand-in wrote to /run/k3s-standin/NAME.pid.
guest_pid_file() {
    in_guest cat "/run/k3s-standin/$1.pid"
}

# guest_process_gone PID: no such process in the guest (a zombie counts as
# gone: it holds nothing open).
guest_process_gone() {
    # shellcheck disable=SC2016 # expanded by the guest's shell
    in_guest sh -c '! test -e /proc/$1 || grep -q "^State:.*Z" /proc/$1/status' sh "$1"
}

# ---------------------------------------------------------------------------
# Clean-up, whatever way the test ends.

on_err() {
    log "error: line $1: '$2' exited with status $3"
}
trap 'on_err "$LINENO" "$BASH_COMMAND" "$?"' ERR

on_exit() {
    local rc=$?
    trap - ERR
    set +e
    if ((rc != 0)) && [[ "$GUEST_STATE" == up ]]; then
        # The journal in full, for units whose lines did not reach the console.
        in_guest journalctl --boot --no-pager -o short-monotonic >"$WORKDIR/journal.txt" 2>&1
    fi
    guest_poweroff
    backend_cleanup
    rm -f "${DISK_IMAGES[@]}"
    if ((rc != 0)); then
        echo "----- console of $TEST_NAME ($CONSOLE_LOG) -----"
        cat "$CONSOLE_LOG" 2>/dev/null
        echo "----- end of console -----"
        [[ -s "$WORKDIR/journal.txt" ]] && log "full guest journal: $WORKDIR/journal.txt"
    elif [[ -z "${SYSTEM_TEST_WORKDIR:-}" ]]; then
        rm -rf "$WORKDIR"
    fi
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

[[ $(id -u) -eq 0 ]] || die "system tests run as root (they boot containers and attach loop devices)"
