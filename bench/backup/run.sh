#!/usr/bin/env bash
# PostgreSQL backup bench for platform-agent; see bench/backup/README.md.
#
#   bash bench/backup/run.sh
#
# Builds the release binary, finds PostgreSQL 15 and s3s-fs from the test
# fixtures (tests/fixtures/install.sh installs them), installs the AWS CLI
# (the peer's uploader) with pip if it is missing, then times our backup
# against `pg_dump | gzip | aws s3 cp -` and `pg_dump > /dev/null` on a
# pgbench database of at least 1 GiB, and reads our peak RSS for it and for
# one four times larger. About 15 minutes and 10 GB of disk on 2 cores.
#
# Environment:
#   BENCH_SCALE=70         pgbench scale of the "1 GB" database
#   BENCH_ROUNDS=3         alternating rounds of (bare, pipeline, ours)
#   BENCH_DIR=/var/tmp     where the databases and the S3 data go
#   BENCH_NO_BUILD=1       skip `cargo build` (use the binary as it is)
#   PLATFORM_AGENT_BIN=... use this binary instead of target/release/platform-agent
#   BENCH_KEEP=1           keep the temporary directory (logs)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo"

# shellcheck source=../lib.sh
source "$here/../lib.sh"
bench_binary

fixtures="${PLATFORM_AGENT_FIXTURES:-/var/cache/platform-agent-fixtures}"
if [[ ! -f "$fixtures/env" ]]; then
    echo "installing the test fixtures (PostgreSQL 15, s3s-fs): tests/fixtures/install.sh"
    bash "$repo/tests/fixtures/install.sh"
fi
# shellcheck disable=SC1091
source "$fixtures/env"

if ! command -v aws >/dev/null 2>&1; then
    echo "installing the AWS CLI (the peer's uploader) with pip"
    python3 -m pip install --quiet awscli
fi
command -v gzip >/dev/null || { echo "ERROR: gzip is missing" >&2; exit 1; }

keep=()
[[ "${BENCH_KEEP:-0}" == 1 ]] && keep=(--keep)

exec python3 "$here/bench.py" \
    --bin "$bin" \
    --pg-bin "$PG_BIN" \
    --s3s-fs "$S3S_FS_BIN" \
    --scale "${BENCH_SCALE:-70}" \
    --rounds "${BENCH_ROUNDS:-3}" \
    "${keep[@]}"
