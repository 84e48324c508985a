# Shared preamble of the benches under bench/: sourced by bench/*/run.sh
# (bash, `set -euo pipefail` already on), never run on its own.
#
#   source "$here/../lib.sh"
#   bench_binary          # sets $bin (and $repo), building it unless told not to
#
# Environment:
#   BENCH_NO_BUILD=1       skip `cargo build` (use the binary as it is)
#   PLATFORM_AGENT_BIN=... use this binary instead of the release build
#   CARGO_TARGET_DIR       honoured: the release binary is looked for there

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Builds target/release/platform-agent (in $CARGO_TARGET_DIR when set) unless
# PLATFORM_AGENT_BIN names another binary or BENCH_NO_BUILD=1, and sets $bin.
# Exits 1 when the build fails or no executable is there.
bench_binary() {
    if [[ -n "${PLATFORM_AGENT_BIN:-}" ]]; then
        bin="$PLATFORM_AGENT_BIN"
    else
        bin="${CARGO_TARGET_DIR:-$repo/target}/release/platform-agent"
        if [[ "${BENCH_NO_BUILD:-0}" != 1 ]]; then
            echo "building: cargo build --release -p platform-agent"
            local build_log
            build_log="$(mktemp -t pa-bench-build.XXXXXX)"
            if ! (cd "$repo" && cargo build --release -p platform-agent) >"$build_log" 2>&1; then
                tail -n 30 "$build_log" >&2
                echo "ERROR: cargo build --release -p platform-agent failed (log above, full log $build_log)" >&2
                exit 1
            fi
            rm -f "$build_log"
        fi
    fi
    if [[ ! -x "$bin" ]]; then
        echo "ERROR: no executable at $bin" >&2
        exit 1
    fi
}

# Installs the named Debian packages that are missing (as root), refreshing
# the package lists only when the first attempt fails.
bench_apt_install() {
    local missing=() p
    for p in "$@"; do
        [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == "install ok installed" ]] || missing+=("$p")
    done
    ((${#missing[@]} > 0)) || return 0
    echo "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=600 "${missing[@]}" >/dev/null 2>&1; then
        apt-get -q -o DPkg::Lock::Timeout=600 update >/dev/null
        apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=600 "${missing[@]}" >/dev/null
    fi
}

# PostgreSQL 15 and s3s-fs from the test fixtures (tests/fixtures/install.sh
# installs them on first use); sets PG_BIN and S3S_FS_BIN.
bench_fixtures() {
    local fixtures="${PLATFORM_AGENT_FIXTURES:-/var/cache/platform-agent-fixtures}"
    if [[ ! -f "$fixtures/env" ]]; then
        echo "installing the test fixtures (PostgreSQL 15, s3s-fs): tests/fixtures/install.sh"
        bash "$repo/tests/fixtures/install.sh"
    fi
    # shellcheck disable=SC1091
    source "$fixtures/env"
}
