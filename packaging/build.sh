#!/usr/bin/env bash
# `make package`: the .deb and the .rpm, from the one file list in
# packaging/files.txt.
#
# The binary is linked against glibc 2.31 (Ubuntu 20.04's) with zig, so one
# build runs on Ubuntu 20.04, 22.04 and 24.04; the build fails if any symbol
# needs a newer glibc.
#
# Environment: PACKAGE_VERSION (default: the workspace version),
# PACKAGE_REVISION (default 1), PACKAGE_OUT (default target/packaging).
set -euo pipefail
cd "$(dirname "$0")/.."

cache=${PLATFORM_AGENT_FIXTURES:-/var/cache/platform-agent-fixtures}
[[ -f "$cache/packaging.env" ]] || bash packaging/install-tools.sh
# shellcheck source=/dev/null
source "$cache/packaging.env"

glibc_floor=2.31
triple=x86_64-unknown-linux-gnu
version=${PACKAGE_VERSION:-$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)}
revision=${PACKAGE_REVISION:-1}
out=${PACKAGE_OUT:-$PWD/target/packaging}
mkdir -p "$out"
out=$(cd "$out" && pwd)

echo "==> binary (release, glibc $glibc_floor)"
PATH="$ZIG_BIN_DIR:$CARGO_ZIGBUILD_DIR:$PATH" \
    cargo zigbuild --release --locked -p platform-agent --target "$triple.$glibc_floor"
bin="target/$triple/release/platform-agent"

needed=$(objdump -T "$bin" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -Vu | tail -1)
if [[ "$(printf '%s\n%s\n' "$needed" "$glibc_floor" | sort -V | tail -1)" != "$glibc_floor" ]]; then
    echo "build.sh: $bin needs GLIBC_$needed, above the floor $glibc_floor" >&2
    exit 1
fi
echo "    needs at most GLIBC_$needed (floor $glibc_floor)"

echo "==> completions and man page"
# Debug profile: the tests have built it already; only the packaged binary
# needs the release build.
cargo run --quiet --locked -p platform-agent-gen -- "$out/gen"

echo "==> staging files.txt"
root="$out/root"
rm -rf "$root"
conffiles=()
rpm_files=()
while read -r src dest mode flag; do
    [[ -z "$src" || "$src" == \#* ]] && continue
    case "$src" in
        @bin) sources=("$bin") ;;
        @gen/*) sources=("$out/gen/${src#@gen/}") ;;
        *) sources=($src) ;; # globs expand here on purpose
    esac
    for file in "${sources[@]}"; do
        [[ -f "$file" ]] || { echo "build.sh: files.txt names $file, which does not exist" >&2; exit 1; }
        target="$dest"
        [[ "$dest" == */ ]] && target="$dest$(basename "$file")"
        install -D -m "$mode" "$file" "$root$target"
        if [[ "$target" == /usr/share/man/* ]]; then
            gzip -9n "$root$target"
            target="$target.gz"
        fi
        if [[ "$target" == /usr/bin/* ]]; then
            strip --strip-unneeded "$root$target"
        fi
        if [[ "$flag" == conf ]]; then
            conffiles+=("$target")
            rpm_files+=("%config(noreplace) $target")
        else
            rpm_files+=("$target")
        fi
    done
done <packaging/files.txt

echo "==> .deb"
deb_root="$out/deb-root"
rm -rf "$deb_root"
cp -a "$root" "$deb_root"
mkdir -p "$deb_root/DEBIAN" "$deb_root/usr/share/doc/platform-agent"
sed "1s/([^)]*)/($version-$revision)/" packaging/changelog | gzip -9n >"$deb_root/usr/share/doc/platform-agent/changelog.Debian.gz"
installed_size=$(du -sk --exclude=DEBIAN "$deb_root" | cut -f1)
cat >"$deb_root/DEBIAN/control" <<CONTROL
Package: platform-agent
Version: $version-$revision
Architecture: amd64
Maintainer: platform-agent maintainers <maintainers@platform-agent.invalid>
Installed-Size: $installed_size
Depends: libc6 (>= $glibc_floor), systemd (>= 245), init-system-helpers (>= 1.54)
Recommends: postgresql-client
Section: admin
Priority: optional
Homepage: https://example.invalid/platform-agent
Description: host caretaker for a single-node K3s GitOps server
 platform-agent owns the /data volume (mount by UUID, directory layout, a
 fence that keeps K3s off a missing or wrong volume), runs the K3s
 lifecycle over systemd's D-Bus API, exports node metrics under
 node_exporter's names on port 9102, backs up to S3 and shuts the node down
 in order: jobs, K3s, leftover container processes, then /data.
CONTROL
printf '%s\n' "${conffiles[@]}" >"$deb_root/DEBIAN/conffiles"
install -m 0755 packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm "$deb_root/DEBIAN/"
deb="$out/platform-agent_${version}-${revision}_amd64.deb"
dpkg-deb --root-owner-group -Zxz --build "$deb_root" "$deb" >/dev/null
echo "    $deb"

echo "==> .rpm"
rpm_top="$out/rpm"
rm -rf "$rpm_top"
mkdir -p "$rpm_top"/{SPECS,RPMS,BUILD,BUILDROOT}
{
    cat <<SPEC
Name: platform-agent
Version: $version
Release: $revision
Summary: Host caretaker for a single-node K3s GitOps server
License: Apache-2.0
URL: https://example.invalid/platform-agent
BuildArch: x86_64
Requires: systemd >= 245
Requires: glibc >= $glibc_floor
AutoReqProv: no

%description
platform-agent owns the /data volume, runs the K3s lifecycle over systemd's
D-Bus API, exports node metrics on port 9102, backs up to S3 and shuts the
node down in order.

%install
cp -a "$root/." %{buildroot}/

%post
systemd-sysusers /usr/lib/sysusers.d/platform-agent.conf || :
systemd-tmpfiles --create /usr/lib/tmpfiles.d/platform-agent.conf || :
if [ -d /run/systemd/system ]; then systemctl daemon-reload || :; fi
if [ \$1 -eq 1 ]; then systemctl enable platform-agent.service >/dev/null 2>&1 || :; fi

%preun
if [ \$1 -eq 0 ]; then
    systemctl --no-reload disable platform-agent.service >/dev/null 2>&1 || :
    if [ -d /run/systemd/system ]; then systemctl stop platform-agent.service || :; fi
fi

%postun
if [ -d /run/systemd/system ]; then systemctl daemon-reload || :; fi
if [ \$1 -ge 1 ] && [ -d /run/systemd/system ] && systemctl is-active --quiet platform-agent.service; then
    touch /run/platform-agent/restart-in-place
    systemctl restart platform-agent.service || :
fi

%files
SPEC
    printf '%s\n' "${rpm_files[@]}"
} >"$rpm_top/SPECS/platform-agent.spec"
rpmbuild --quiet -bb --define "_topdir $rpm_top" --define "_build_id_links none" \
    --define "__strip /bin/true" --define "_binary_payload w9.xzdio" \
    "$rpm_top/SPECS/platform-agent.spec" >/dev/null 2>"$rpm_top/rpmbuild.log" || { cat "$rpm_top/rpmbuild.log" >&2; exit 1; }
rpm=$(find "$rpm_top/RPMS" -name '*.rpm' | head -1)
cp "$rpm" "$out/"
echo "    $out/$(basename "$rpm")"
