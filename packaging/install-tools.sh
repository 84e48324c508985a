#!/usr/bin/env bash
# Tools for building and checking the packages, cached like the test fixtures:
#   zig (from PyPI's ziglang wheel) + cargo-zigbuild, to link against glibc
#   2.31 (Ubuntu 20.04's) from a newer build host;
#   dpkg-dev, lintian and rpm (rpmbuild) from Debian.
# Idempotent; a second run skips everything that is there.
set -euo pipefail

cache=${PLATFORM_AGENT_FIXTURES:-/var/cache/platform-agent-fixtures}
zig_version=0.15.1
zigbuild_version=0.20.1
mkdir -p "$cache"

apt_missing=()
for pair in dpkg-deb:dpkg-dev lintian:lintian rpmbuild:rpm fakeroot:fakeroot; do
    command -v "${pair%%:*}" >/dev/null || apt_missing+=("${pair#*:}")
done
if ((${#apt_missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${apt_missing[@]}" >/dev/null 2>&1 ||
        { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${apt_missing[@]}" >/dev/null; }
fi

zig_dir="$cache/zig-$zig_version"
if [[ ! -x "$zig_dir/bin/zig" ]]; then
    rm -rf "$zig_dir.tmp"
    python3 -m pip install --quiet --disable-pip-version-check --no-deps \
        --target "$zig_dir.tmp/lib" "ziglang==$zig_version"
    mkdir -p "$zig_dir.tmp/bin"
    # The wheel runs zig through python; a symlink to the binary is enough.
    ln -s ../lib/ziglang/zig "$zig_dir.tmp/bin/zig"
    mv "$zig_dir.tmp" "$zig_dir"
fi

zigbuild_dir="$cache/cargo-zigbuild-$zigbuild_version"
if [[ ! -x "$zigbuild_dir/bin/cargo-zigbuild" ]]; then
    (unset CARGO_TARGET_DIR; cargo install --quiet --locked cargo-zigbuild --version "$zigbuild_version" --root "$zigbuild_dir.tmp")
    rm -rf "$zigbuild_dir"
    mv "$zigbuild_dir.tmp" "$zigbuild_dir"
fi

cat >"$cache/packaging.env" <<ENV
ZIG_BIN_DIR=$zig_dir/bin
CARGO_ZIGBUILD_DIR=$zigbuild_dir/bin
ENV
echo "packaging tools: zig $("$zig_dir/bin/zig" version), cargo-zigbuild $zigbuild_version, $(dpkg-deb --version | head -1), $(rpmbuild --version)"
