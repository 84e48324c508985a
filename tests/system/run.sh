#!/usr/bin/env bash
# Runs the system tests: every tests/system/t*.sh, each in a fresh guest with
# real systemd as PID 1, on the backend its header names
# ("# system-test-backends: vm"; none: nspawn), and ends with
# "system: N passed, M failed".
#
#   tests/system/run.sh                 # all tests
#   tests/system/run.sh t10             # only tests whose name starts with t10
#   PLATFORM_AGENT_BIN=path/to/binary   # default: target/debug/platform-agent,
#                                       # built with cargo if missing
#   SYSTEM_TEST_BACKEND=vm              # only the tests that can run on this
#                                       # backend, all on it (backend/*.sh)
#   SYSTEM_TEST_VERBOSE=1               # show every test's output, not only
#                                       # that of failed ones
#
# Needs root and the packages from tests/system/install-deps.sh.
set -euo pipefail
# losetup, mkfs.ext4 and friends live in sbin, which a CI shell may not have.
PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
say() { echo "system: $*"; }

if [[ $(id -u) -ne 0 ]]; then
    say "must run as root (tests boot containers and attach loop devices)"
    exit 1
fi

# The backends a test can run on: its header line, nspawn if it has none.
test_backends() {
    local declared
    declared="$(sed -n 's/^# system-test-backends: *//p' "$1" | head -n 1)"
    echo "${declared:-nspawn}"
}

tests=()
backend_of=()
skipped=0
for t in "$here"/t*.sh; do
    name="$(basename "$t" .sh)"
    if (($# > 0)); then
        selected=false
        for want in "$@"; do [[ "$name" == "$want"* ]] && selected=true; done
        $selected || continue
    fi
    read -ra backends <<<"$(test_backends "$t")"
    if [[ -n "${SYSTEM_TEST_BACKEND:-}" ]]; then
        if [[ " ${backends[*]} " != *" $SYSTEM_TEST_BACKEND "* ]]; then
            skipped=$((skipped + 1))
            continue
        fi
        backend_of+=("$SYSTEM_TEST_BACKEND")
    else
        backend_of+=("${backends[0]}")
    fi
    tests+=("$t")
done
if ((${#tests[@]} == 0)); then
    say "no test matches: $* ${SYSTEM_TEST_BACKEND:+(backend $SYSTEM_TEST_BACKEND)}"
    exit 1
fi
mapfile -t used_backends < <(printf '%s\n' "${backend_of[@]}" | sort -u)
for b in "${used_backends[@]}"; do
    [[ -f "$here/backend/$b.sh" ]] || {
        say "no backend $b (tests/system/backend/$b.sh)"
        exit 1
    }
done

# shellcheck disable=SC2034 # read by the backends, sourced below
SYSTEM_DIR="$here" # the backends find their image scripts through it
missing=()
for b in "${used_backends[@]}"; do
    # Each backend in a subshell of its own: they define the same functions.
    # shellcheck disable=SC1090
    for cmd in $(source "$here/backend/$b.sh" && backend_requirements); do
        command -v "$cmd" >/dev/null || missing+=("$cmd")
    done
done
if ((${#missing[@]} > 0)); then
    say "missing host commands: ${missing[*]}; run tests/system/install-deps.sh"
    exit 1
fi

export PLATFORM_AGENT_BIN="${PLATFORM_AGENT_BIN:-${CARGO_TARGET_DIR:-$repo/target}/debug/platform-agent}"
if [[ ! -x "$PLATFORM_AGENT_BIN" ]]; then
    say "no binary at $PLATFORM_AGENT_BIN; building it"
    (cd "$repo" && cargo build -p platform-agent)
    [[ -x "$PLATFORM_AGENT_BIN" ]] || {
        say "cargo build did not produce $PLATFORM_AGENT_BIN"
        exit 1
    }
fi

# Build (or find) each backend's guest image once, up front: its build time
# should not count against the first test, and a failure here is not a test
# failure.
# A backend's functions may call lib.sh's log and die.
# shellcheck disable=SC2317 # log and die are called by the sourced backend
prepare_backend() (
    log() { echo "system: $*" >&2; }
    die() {
        log "$*"
        exit 1
    }
    # shellcheck disable=SC1090
    source "$here/backend/$1.sh"
    backend_prepare >/dev/null
)
for b in "${used_backends[@]}"; do
    start=$SECONDS
    prepare_backend "$b"
    say "$b guest image ready in $((SECONDS - start)) s"
done

rundir="$(mktemp -d "${TMPDIR:-/tmp}/platform-agent-system.XXXXXX")"
passed=0
failed=0
failed_names=()
for i in "${!tests[@]}"; do
    t=${tests[$i]}
    backend=${backend_of[$i]}
    name="$(basename "$t" .sh)"
    workdir="$rundir/$name"
    mkdir -p "$workdir"
    t0=${EPOCHREALTIME/./}
    rc=0
    # In the background so that a TERM or INT sent to run.sh alone (a CI
    # timeout) reaches the test, whose EXIT trap then takes its guest down.
    if [[ "${SYSTEM_TEST_VERBOSE:-}" == 1 ]]; then
        SYSTEM_TEST_BACKEND="$backend" SYSTEM_TEST_WORKDIR="$workdir" bash "$t" \
            > >(tee "$workdir/output.log") 2>&1 &
    else
        SYSTEM_TEST_BACKEND="$backend" SYSTEM_TEST_WORKDIR="$workdir" bash "$t" >"$workdir/output.log" 2>&1 &
    fi
    test_pid=$!
    trap 'kill -TERM "$test_pid" 2>/dev/null; wait "$test_pid"; exit 143' TERM INT
    wait "$test_pid" || rc=$?
    trap - TERM INT
    t1=${EPOCHREALTIME/./}
    ms=$(((t1 - t0) / 1000))
    duration="$((ms / 1000)).$(printf '%03d' $((ms % 1000)))s"
    if ((rc == 0)); then
        passed=$((passed + 1))
        echo "PASS $name [$backend] ($duration)"
    else
        failed=$((failed + 1))
        failed_names+=("$name")
        # The test's own output ends with the guest's console log.
        [[ "${SYSTEM_TEST_VERBOSE:-}" == 1 ]] || sed "s/^/  $name | /" "$workdir/output.log"
        echo "FAIL $name [$backend] ($duration, exit status $rc; files in $workdir)"
    fi
done

if ((failed == 0)); then
    rm -rf "$rundir"
else
    say "failed: ${failed_names[*]}"
fi
if ((skipped > 0)); then
    echo "system: $passed passed, $failed failed, $skipped skipped"
else
    echo "system: $passed passed, $failed failed"
fi
((failed == 0))
