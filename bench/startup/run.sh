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

# shellcheck source=../lib.sh
source "$here/../lib.sh"
bench_binary

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
