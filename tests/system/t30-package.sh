#!/usr/bin/env bash
# The packages: the .deb installed into a fresh Debian root with real systemd
# (enabled, not started), started and queried, upgraded to a rebuilt package
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

echo "== upgrade to revision 2"
check "dpkg -i revision 2 (keeping edited config)" in_guest dpkg -i --force-confold /root/pa2.deb
check_eq "installed version is revision 2" "$(dpkg-deb -f "$deb2" Version)" \
    "$(in_guest dpkg-query -W -f='${Version}' platform-agent)"
check_eq "active after upgrade" active "$(in_guest systemctl is-active "$unit" || true)"
pid_after=$(in_guest systemctl show -p MainPID --value "$unit")
check "restarted on upgrade (MainPID $pid_before -> $pid_after)" test "$pid_before" != "$pid_after"
check "edited conffile kept" in_guest grep -q "edited by the administrator" /etc/platform-agent/config.d/50-site.toml
check "test drop-in kept" in_guest test -f /etc/platform-agent/config.d/60-test.toml

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

finish
