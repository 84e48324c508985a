#!/usr/bin/env bash
# The packages: the .deb installed into a fresh Debian root with real systemd
# (enabled, not started), started and queried, pointed at real fixture servers
# on the host (PostgreSQL, OpenBao, S3) and made to back up both through the
# CLI (the objects checked in the S3 server's store), upgraded to a rebuilt package
# with a new version (service restarted, edited config kept), removed (service
# stopped, config kept), purged (config and state gone). On the host: lintian
# reports no errors, the .rpm lists the same files with sane dependencies,
# and the binary needs no glibc newer than 2.31.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

unit=platform-agent
pkgdir="$WORKDIR/packages"

echo "== build two versions of the packages"
must "build revision 1" env PACKAGE_REVISION=1 PACKAGE_OUT="$pkgdir/r1" bash "$REPO_ROOT/packaging/build.sh"
must "build revision 2" env PACKAGE_REVISION=2 PACKAGE_OUT="$pkgdir/r2" bash "$REPO_ROOT/packaging/build.sh"
deb1=$(ls "$pkgdir"/r1/platform-agent_*-1_amd64.deb)
deb2=$(ls "$pkgdir"/r2/platform-agent_*-2_amd64.deb)
rpm1=$(ls "$pkgdir"/r1/platform-agent-*-1.x86_64.rpm)

echo "== checks on the host"
needed=$(objdump -T "$pkgdir/r1/root/usr/bin/platform-agent" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -Vu | tail -1)
check_eq "the binary needs at most GLIBC_2.31" 2.31 "$(printf '%s\n2.31\n' "$needed" | sort -V | tail -1)"
lintian_out=$(lintian --tag-display-limit 0 "$deb1" 2>&1 || true)
sed 's/^/        | /' <<<"$lintian_out"
check_fails "lintian reports no errors (E:)" grep -q '^E:' <<<"$lintian_out"
deb_files=$(dpkg-deb -c "$deb1" | awk '{print $6}' | sed 's|^\./|/|' | grep -v '/$' |
    grep -v '^/usr/share/doc/platform-agent/changelog.Debian.gz$' | sort)
rpm_files=$(rpm -qpl "$rpm1" 2>/dev/null | sort)
check_eq "the .rpm installs the same files as the .deb" "$deb_files" "$rpm_files"
rpm_requires=$(rpm -qpR "$rpm1" 2>/dev/null | grep -v -e '^rpmlib(' -e '^/bin/sh$' | sort -u | tr '\n' ' ')
check_eq "rpm -qpR: systemd and glibc floor" "glibc >= 2.31 systemd >= 245 " "$rpm_requires"
check_match "rpm marks the site config as %config(noreplace)" '/etc/platform-agent/config.d/50-site.toml' \
    "$(rpm -qpc "$rpm1" 2>/dev/null)"

echo "== fixture servers on the host (PostgreSQL, OpenBao, S3)"
must "build the fixture-servers helper" cargo build --quiet --locked -p platform-agent-testsupport --bin fixture-servers \
    --manifest-path "$REPO_ROOT/Cargo.toml"
fixtures="$WORKDIR/fixtures"
guest_fixtures=/etc/platform-agent/fixtures
target_dir="$(cargo metadata --format-version 1 --no-deps --manifest-path "$REPO_ROOT/Cargo.toml" | jq -r .target_directory)"
# Runs until its stdin closes: when this script exits, the fixtures go with it.
exec {fixture_stdin}> >("$target_dir/debug/fixture-servers" "$fixtures" "$guest_fixtures" >"$WORKDIR/fixture-servers.log" 2>&1)
check_within 120 "fixture servers ready" test -e "$fixtures/ready"
# shellcheck disable=SC1091 # written by fixture-servers
source "$fixtures/env"
# The guest reaches the fixtures on the host's loopback.
NSPAWN_HOST_NETWORK=1
guest_boot

echo "== install"
must "copy the packages in" guest_copy_in "$deb1" /root/pa1.deb
must "copy the packages in" guest_copy_in "$deb2" /root/pa2.deb
check "dpkg -i" in_guest dpkg -i /root/pa1.deb
check_eq "enabled on install" enabled "$(in_guest systemctl is-enabled "$unit" || true)"
check_eq "not started on install" inactive "$(in_guest systemctl is-active "$unit" || true)"
check "group platform-agent exists" in_guest getent group platform-agent
check "the site config is a conffile" in_guest grep -qx /etc/platform-agent/config.d/50-site.toml /var/lib/dpkg/info/platform-agent.conffiles
check "man page installed" in_guest test -s /usr/share/man/man8/platform-agent.8.gz
check "bash completion installed" in_guest grep -q platform-agent /usr/share/bash-completion/completions/platform-agent

echo "== start with this host's config"
# Metrics off: the guest shares the host's network namespace.
must "write a test drop-in" in_guest sh -c 'printf "[metrics]\nenabled = false\n" >/etc/platform-agent/config.d/60-test.toml'
must "edit the conffile as an administrator would" \
    in_guest sh -c 'echo "# edited by the administrator" >>/etc/platform-agent/config.d/50-site.toml'
check "systemctl start (returns after READY)" in_guest systemctl start "$unit"
check_eq "active" active "$(in_guest systemctl is-active "$unit" || true)"
json=$(in_guest platform-agent status --json 2>&1 || true)
check_eq "status over the socket" running "$(in_guest jq -r .agent.state <<<"$json" 2>&1 || true)"
pid_before=$(in_guest systemctl show -p MainPID --value "$unit")

echo "== backups through the CLI, to the S3 server, of PostgreSQL and OpenBao"
for f in fixtures.toml s3-access-key s3-secret-key vault-role-id vault-secret-id age-identity.txt; do
    must "copy $f in" guest_copy_in "$fixtures/$f" "$guest_fixtures/$f"
done
must "point the agent at the fixtures" in_guest ln -s "$guest_fixtures/fixtures.toml" /etc/platform-agent/config.d/70-fixtures.toml
check "config check accepts the fixtures' drop-in" in_guest platform-agent config check
check "systemctl restart with the backup jobs" in_guest systemctl restart "$unit"
for job in pg vault; do
    runs=$(in_guest platform-agent backup now "$job" --json 2>&1 || true)
    sed 's/^/        | /' <<<"$runs"
    check_eq "backup now $job: verified" verified "$(jq -r '.[0].state' <<<"$runs" 2>&1 || true)"
    key=$(jq -r '.[0].key' <<<"$runs" 2>/dev/null || true)
    check "backup now $job: object $key is in the S3 server's bucket" \
        test -n "$key" -a -s "$FIXTURE_S3_DATA_DIR/$FIXTURE_S3_BUCKET/node/$key"
done
check_match "backup list shows both jobs" 'pg.*vault|vault.*pg' \
    "$(in_guest platform-agent backup list --json 2>&1 | jq -r '[.[].job] | unique | join(" ")' 2>&1 || true)"
pid_before=$(in_guest systemctl show -p MainPID --value "$unit")

echo "== upgrade to revision 2"
check "dpkg -i revision 2 (keeping edited config)" in_guest dpkg -i --force-confold /root/pa2.deb
check_eq "installed version is revision 2" "$(dpkg-deb -f "$deb2" Version)" \
    "$(in_guest dpkg-query -W -f='${Version}' platform-agent)"
check_eq "active after upgrade" active "$(in_guest systemctl is-active "$unit" || true)"
pid_after=$(in_guest systemctl show -p MainPID --value "$unit")
check "restarted on upgrade (MainPID $pid_before -> $pid_after)" test "$pid_before" != "$pid_after"
check "edited conffile kept" in_guest grep -q "edited by the administrator" /etc/platform-agent/config.d/50-site.toml
check "test drop-in kept" in_guest test -f /etc/platform-agent/config.d/60-test.toml
check_match "the backup catalog survives the upgrade" 'pg.*vault|vault.*pg' \
    "$(in_guest platform-agent backup list --json 2>&1 | jq -r '[.[].job] | unique | join(" ")' 2>&1 || true)"

echo "== remove"
check "dpkg -r" in_guest dpkg -r platform-agent
check_eq "stopped on removal" inactive "$(in_guest systemctl is-active "$unit" || true)"
check "binary gone" in_guest test ! -e /usr/bin/platform-agent
check "config kept after removal" in_guest grep -q "edited by the administrator" /etc/platform-agent/config.d/50-site.toml
check_eq "dpkg status: removed, config files remain" rc \
    "$(in_guest dpkg-query -W -f='${db:Status-Abbrev}' platform-agent | tr -d ' ')"

echo "== purge"
check "dpkg -P" in_guest dpkg -P platform-agent
check "config gone after purge" in_guest test ! -e /etc/platform-agent
check "state gone after purge" in_guest test ! -e /var/lib/platform-agent
check_fails "no trace in dpkg" in_guest dpkg-query -W platform-agent

exec {fixture_stdin}>&-
finish
