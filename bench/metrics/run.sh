#!/usr/bin/env bash
# Scrape latency and CPU per scrape of platform-agent's /metrics against
# node_exporter's on the same host, in one run, alternating scrape by scrape.
#
#   bash bench/metrics/run.sh
#
# Builds the release binary, installs node_exporter if missing (as root),
# then scrapes ours, node_exporter with its defaults (less systemd, which
# needs systemd as PID 1) and node_exporter with only the collectors the
# agent implements, BENCH_SCRAPES times each (at least 500), and prints
# median and p99 latency and CPU time per scrape with the ratios. Takes
# about a minute after the build. Exits non-zero only if something failed
# to run; a missed target is printed as MISSED.
#
# Environment:
#   BENCH_SCRAPES=1000     scrapes per exporter and request kind (>= 500)
#   BENCH_NO_BUILD=1       skip `cargo build` (use the binary as it is)
#   PLATFORM_AGENT_BIN=... use this binary instead of target/release/platform-agent
#   BENCH_KEEP=1           keep the temporary directory (logs, config)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo"

# shellcheck source=../lib.sh
source "$here/../lib.sh"
bench_binary

if ! command -v prometheus-node-exporter >/dev/null; then
    bash "$repo/tests/fixtures/install-metrics-peers.sh"
fi

keep=()
[[ "${BENCH_KEEP:-0}" == 1 ]] && keep=(--keep)

exec python3 "$here/bench.py" \
    --bin "$bin" \
    --node-exporter "$(command -v prometheus-node-exporter)" \
    --scrapes "${BENCH_SCRAPES:-1000}" \
    "${keep[@]}"
