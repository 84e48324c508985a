#!/usr/bin/env bash
# The whole test suite, as the README gives it and CI runs it: installs the
# fixtures (PostgreSQL, OpenBao, s3s-fs, the systemd test root), checks
# formatting and lints, runs the unit and integration tests, then the system
# tier under real systemd. Run as root on Debian 12 (or in CI).
set -euo pipefail
cd "$(dirname "$0")/.."

section() { printf '\n==> %s\n' "$*"; }

section "fixtures"
bash tests/fixtures/install.sh
bash tests/fixtures/install-metrics-peers.sh
bash tests/system/install-deps.sh
bash packaging/install-tools.sh

section "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

section "unit and integration tests"
cargo test --workspace --locked

section "system tests (real systemd)"
cargo build -p platform-agent --locked
# t10 (the service under systemd) and t30 (the packages) run on nspawn; t2*
# (/data by UUID, the fence, the plan on stop and on poweroff, a busy /data)
# on a qemu VM with a real kernel, udev and virtio disk.
PLATFORM_AGENT_BIN="$PWD/target/debug/platform-agent" bash tests/system/run.sh t10 t2 t30
