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
# How the guest is made is up to a backend in backend/<name>.sh, chosen by
# SYSTEM_TEST_BACKEND (default: nspawn). A backend defines:
#   backend_requirements          commands it needs on the host
#   backend_prepare               find or build its image (may be slow once)
#   backend_attach_disk IMG       make IMG visible to the next boot; sets
#                                 BACKEND_DISK_PATH to the device path the
#                                 guest will see
#   backend_boot CONSOLE_LOG      start the guest in the background
#   backend_wait_booted SECONDS   until the guest's systemd answers
#   backend_exec CMD...           run CMD in the guest (stdin/stdout passed on)
#   backend_poweroff SECONDS      orderly shutdown; non-zero if not done in time
#   backend_kill                  stop the guest at once
#   backend_cleanup               release whatever attach/boot took on the host
# Only nspawn exists now; a qemu VM backend (real kernel, real block devices,
# real shutdown) is meant to sit beside it as backend/vm.sh.

set -euo pipefail
# losetup, mkfs.ext4 and friends live in sbin, which a CI shell may not have.
PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
# Let the ERR trap below see failures inside functions too.
set -E

SYSTEM_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SYSTEM_DIR/../.." && pwd)"
TEST_NAME="$(basename "$0" .sh)"
SYSTEM_TEST_BACKEND="${SYSTEM_TEST_BACKEND:-nspawn}"
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
        sleep 0.1 # poll interval, not a wait for readiness
    done
}

# ---------------------------------------------------------------------------
# Checks. A failed check is reported and the test goes on, so one run shows
# every mismatch; `finish` turns any failure into a non-zero exit.

FAILED_CHECKS=()

pass() { echo "  ok    $1"; }
fail() {
    local what=$1
    shift
    echo "  FAIL  $what"
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

# guest_add_disk LABEL SIZE: a blank sparse disk of SIZE (truncate syntax,
# e.g. 64M) with an ext4 file system labelled LABEL, attached to the next
# boot. Its device path inside the guest is then in GUEST_DISK[LABEL].
guest_add_disk() {
    local label=$1 size=$2
    [[ "$GUEST_STATE" == down ]] || die "guest_add_disk must come before guest_boot"
    local img="$WORKDIR/disk-$label.img"
    truncate -s "$size" "$img"
    DISK_IMAGES+=("$img")
    # mkfs works on the file directly; attaching it is the backend's business.
    mkfs.ext4 -q -F -L "$label" "$img"
    # shellcheck disable=SC2034 # read by the tests
    GUEST_DISK_IMAGE[$label]="$img"
    backend_attach_disk "$img"
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
journal_has() {
    # shellcheck disable=SC2016 # expanded by the guest's shell
    in_guest sh -c '
        journalctl ${1:+--unit="$1"} ${2:+--after-cursor="$2"} --output=json --no-pager |
            jq --slurp --exit-status "any(.[]; $3)"' sh "$1" "$2" "$3" >/dev/null
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
