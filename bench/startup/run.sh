#!/usr/bin/env bash
# Startup and idle-memory bench for platform-agent; see bench/README.md.
#
#   bash bench/startup/run.sh
#
# Builds the release binary, installs node_exporter (the peer) if missing,
# then measures exec -> READY=1 (cold and warm, >= 20 runs each) and the idle
# RSS after 60 s next to node_exporter's. Takes about 1.5 minutes after the
# build. Exits non-zero only if something failed to run; a missed target is
# printed as MISSED.
#
# Environment:
#   BENCH_RUNS=30          runs per startup series (at least 20)
#   BENCH_IDLE=60          seconds of idle before reading VmRSS
#   BENCH_NO_BUILD=1       skip `cargo build` (use the binary as it is)
#   PLATFORM_AGENT_BIN=... use this binary instead of target/release/platform-agent
#   BENCH_KEEP=1           keep the temporary directory (logs, state)
#   BENCH_SETTLE_MS=0      wait between READY and SIGTERM (default: SIGTERM at once)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo"

if [[ -n "${PLATFORM_AGENT_BIN:-}" ]]; then
    bin="$PLATFORM_AGENT_BIN"
else
    bin="$repo/target/release/platform-agent"
    if [[ "${BENCH_NO_BUILD:-0}" != 1 ]]; then
        echo "building: cargo build --release -p platform-agent"
        build_log="$(mktemp -t pa-bench-build.XXXXXX)"
        if ! cargo build --release -p platform-agent >"$build_log" 2>&1; then
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

exporter="$(command -v prometheus-node-exporter || true)"
if [[ -z "$exporter" ]]; then
    echo "installing prometheus-node-exporter (the peer)"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends prometheus-node-exporter >/dev/null 2>&1; then
        apt-get update >/dev/null
        apt-get install -y --no-install-recommends prometheus-node-exporter >/dev/null
    fi
    exporter="$(command -v prometheus-node-exporter)"
fi

keep=()
[[ "${BENCH_KEEP:-0}" == 1 ]] && keep=(--keep)

exec python3 "$here/bench.py" \
    --bin "$bin" \
    --config "$repo/config/local.toml" \
    --node-exporter "$exporter" \
    --runs "${BENCH_RUNS:-30}" \
    --idle "${BENCH_IDLE:-60}" \
    --settle-ms "${BENCH_SETTLE_MS:-0}" \
    "${keep[@]}"
