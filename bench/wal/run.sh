#!/usr/bin/env bash
# WAL archiving bench: platform-agent wal-push against pgBackRest's
# archive-push, to the same S3 server; see bench/wal/README.md.
#
#   bash bench/wal/run.sh
#
# Builds the release binary, takes PostgreSQL 15 and s3s-fs from the test
# fixtures (tests/fixtures/install.sh installs them), installs pgbackrest and
# stunnel4 from Debian if missing (as root), then measures, alternating the
# two tools: latency from pg_switch_wal() to the acknowledged archive (median,
# p99) and sustained segments archived per minute, and prints the ratios
# against the targets (latency <= 0.5x pgBackRest's, throughput >= 1.5x).
# About 5 minutes after the build. Exits non-zero only if something failed to
# run; a missed target is printed as MISSED. A binary without `wal-push`
# measures pgBackRest alone and says so.
#
# Environment:
#   BENCH_ROUNDS=100       latency rounds per tool (p99 = 2nd slowest of 100)
#   BENCH_SEGMENTS=500     backlog of segments archived per throughput window
#   BENCH_WINDOWS=2        alternating throughput windows per tool
#   BENCH_SEGSIZE=1        wal_segment_size in MiB for both clusters (initdb)
#   BENCH_ZSTD_LEVEL=1     zstd level for both tools (ours' default is 1)
#   BENCH_WAL_EXTRA=...    extra [wal] keys for ours, ';'-separated
#   BENCH_PEER_ONLY=1      measure pgBackRest alone
#   BENCH_DIR=/var/tmp     where the clusters and the S3 data go
#   BENCH_NO_BUILD=1       skip `cargo build` (use the binary as it is)
#   PLATFORM_AGENT_BIN=... use this binary instead of target/release/platform-agent
#   BENCH_KEEP=1           keep the temporary directory (logs)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../lib.sh
source "$here/../lib.sh"
cd "$repo"

[[ $(id -u) -eq 0 ]] || { echo "ERROR: run as root (apt-get, runuser postgres)" >&2; exit 1; }

ours=()
if [[ "${BENCH_PEER_ONLY:-0}" != 1 ]]; then
    bench_binary
    if "$bin" wal-push --help >/dev/null 2>&1; then
        ours=(--bin "$bin")
    else
        echo "NOTE: $bin has no wal-push subcommand: measuring pgBackRest alone"
    fi
fi

bench_fixtures
bench_apt_install pgbackrest stunnel4 openssl curl

keep=()
[[ "${BENCH_KEEP:-0}" == 1 ]] && keep=(--keep)

exec python3 "$here/bench.py" \
    "${ours[@]}" \
    --pg-bin "$PG_BIN" \
    --s3s-fs "$S3S_FS_BIN" \
    --pgbackrest "$(command -v pgbackrest)" \
    --stunnel "$(command -v stunnel4 || command -v stunnel)" \
    --rounds "${BENCH_ROUNDS:-100}" \
    --segments "${BENCH_SEGMENTS:-500}" \
    --windows "${BENCH_WINDOWS:-2}" \
    --segsize "${BENCH_SEGSIZE:-1}" \
    --zstd-level "${BENCH_ZSTD_LEVEL:-1}" \
    --wal-extra "${BENCH_WAL_EXTRA:-}" \
    "${keep[@]}"
