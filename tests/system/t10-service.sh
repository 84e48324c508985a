#!/usr/bin/env bash
# The agent as a systemd service: installed the way the package installs it,
# started, queried, reloaded (good and bad configuration), restarted and
# stopped under a real systemd, with journald and the control socket's
# permissions checked on the way. Also proves the harness gives the guest a
# disk it can mount.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

unit=platform-agent
sock=/run/platform-agent/control.sock
bad_dropin=/etc/platform-agent/config.d/50-bad.toml
# The agent's stable journal MESSAGE_IDs (agent/src/logging.rs).
id_ready=70ab9b57cf4e43f98a3b577e2d2a32b2
id_config_reloaded=f906735482d24c9b82b80be5cc1d1e59
id_shutdown_started=496cbd7655614c4a89327adfdacd625c
id_agent_stopped=2e63f3bd15b3438d9f7d075805fce63d
# Journald gets the agent's lines asynchronously; give them this long to show.
journal_wait=10

[[ -x "$PLATFORM_AGENT_BIN" ]] || die "no agent binary at $PLATFORM_AGENT_BIN (run.sh builds it)"

prop() { in_guest systemctl show --property="$1" --value "$unit"; }
# is-active exits non-zero for anything but "active"; the word is what counts.
state() { in_guest systemctl is-active "$unit" || true; }
# A jq filter applied inside the guest (the host need not have jq).
guest_jq() { in_guest jq --raw-output "$1"; }
# journal_has for this unit; $1 is the cursor, $2 the jq condition.
unit_journal_has() { journal_has "$unit.service" "$1" "$2"; }
write_bad_dropin() {
    # shellcheck disable=SC2016 # expanded by the guest's shell
    in_guest sh -c 'printf "[agent]\nbogus = 1\n" >"$1"' sh "$bad_dropin"
}

guest_add_disk pa-data 64M
guest_boot

echo "== the disk the harness hands in"
disk=${GUEST_DISK[pa-data]}
check "guest mounts $disk, writes a file, unmounts it" \
    in_guest sh -c "mkdir -p /mnt/pa-data && mount '$disk' /mnt/pa-data &&
        echo written-in-guest >/mnt/pa-data/probe && umount /mnt/pa-data"
# Read back from the image on the host: the write reached the block device.
check_eq "the file is on the disk image" written-in-guest \
    "$(debugfs -R 'cat /probe' "${GUEST_DISK_IMAGE[pa-data]}" 2>/dev/null || true)"

echo "== install as the package does"
must "binary -> /usr/bin/platform-agent" \
    guest_copy_in "$PLATFORM_AGENT_BIN" /usr/bin/platform-agent 0755
must "unit -> /usr/lib/systemd/system" \
    guest_copy_in "$REPO_ROOT/systemd/platform-agent.service" /usr/lib/systemd/system/platform-agent.service
must "sysusers -> /usr/lib/sysusers.d" \
    guest_copy_in "$REPO_ROOT/systemd/platform-agent.sysusers" /usr/lib/sysusers.d/platform-agent.conf
must "tmpfiles -> /usr/lib/tmpfiles.d" \
    guest_copy_in "$REPO_ROOT/systemd/platform-agent.tmpfiles" /usr/lib/tmpfiles.d/platform-agent.conf
must "default config -> /usr/lib/platform-agent/config.d/00-default.toml" \
    guest_copy_in "$REPO_ROOT/config/default.toml" /usr/lib/platform-agent/config.d/00-default.toml
must "systemd-sysusers" in_guest systemd-sysusers platform-agent.conf
must "systemd-tmpfiles --create" in_guest systemd-tmpfiles --create platform-agent.conf
must "systemctl daemon-reload" in_guest systemctl daemon-reload
must "systemctl enable" in_guest systemctl enable "$unit"
# Two users for the socket permission checks: one in the agent's group, one not.
must "add user outsider" in_guest useradd --no-create-home --shell /usr/sbin/nologin outsider
must "add user member (group platform-agent)" \
    in_guest useradd --no-create-home --shell /usr/sbin/nologin --groups platform-agent member

echo "== start"
# Type=notify: start returns only once the agent has sent READY=1.
check "systemctl start" in_guest systemctl start "$unit"
check_eq "unit is active" active "$(state)"
check_match "StatusText starts with 'running'" '^running' "$(prop StatusText)"
check_within "$journal_wait" "journal: ready event ($id_ready) with SYSLOG_IDENTIFIER=platform-agent" \
    unit_journal_has "" ".MESSAGE_ID == \"$id_ready\" and .SYSLOG_IDENTIFIER == \"platform-agent\""
check_within "$journal_wait" "journal: ready event has structured field SOCKET=$sock" \
    unit_journal_has "" ".MESSAGE_ID == \"$id_ready\" and .SOCKET == \"$sock\""

echo "== status over the control socket"
json="$(in_guest platform-agent status --json 2>&1)" || fail "platform-agent status --json exits 0" "output: $json"
check_eq "status --json: .agent.state" running "$(guest_jq .agent.state <<<"$json" 2>&1 || true)"
rc=0
table="$(in_guest platform-agent status 2>&1)" || rc=$?
check_eq "platform-agent status exits 0" 0 "$rc"
check_fails "platform-agent status (no --json) is not JSON" guest_jq . <<<"$table"
check_match "platform-agent status mentions 'running'" 'running' "$table"
check "platform-agent status prints a table (several lines)" test "$(wc -l <<<"$table")" -ge 2
echo "$table" | sed 's/^/        | /'

echo "== control socket permissions"
check_eq "$sock is a socket, mode 0660, group platform-agent" \
    "socket 660 platform-agent" "$(in_guest stat --format='%F %a %G' "$sock" 2>&1 || true)"
check_fails "outsider cannot run status" in_guest runuser -u outsider -- platform-agent status
check_match "outsider gets a permission error" '[Pp]ermission' "$CHECK_OUTPUT"
sed 's/^/        | /' <<<"$CHECK_OUTPUT"
check "member (group platform-agent) can run status" in_guest runuser -u member -- platform-agent status
check_fails "member cannot reload" in_guest runuser -u member -- platform-agent reload
check_match "member's reload is refused mentioning permission" '[Pp]ermission' "$CHECK_OUTPUT"
sed 's/^/        | /' <<<"$CHECK_OUTPUT"
check "root's platform-agent reload succeeds" in_guest platform-agent reload

echo "== systemctl reload (SIGHUP)"
pid="$(prop MainPID)"
cursor="$(journal_cursor)"
check "systemctl reload" in_guest systemctl reload "$unit"
check_within "$journal_wait" "journal: configuration reloaded ($id_config_reloaded)" \
    unit_journal_has "$cursor" ".MESSAGE_ID == \"$id_config_reloaded\""
check_eq "unit is active after reload" active "$(state)"
check_eq "same process after reload" "$pid" "$(prop MainPID)"

echo "== reload with an invalid drop-in"
must "write $bad_dropin" write_bad_dropin
cursor="$(journal_cursor)"
check "systemctl reload" in_guest systemctl reload "$unit"
# PRIORITY 3 is "err"; the file may be named in MESSAGE or in any other field.
check_within "$journal_wait" "journal: an error naming 50-bad.toml" \
    unit_journal_has "$cursor" '(.PRIORITY | tonumber) <= 3 and (tostring | test("50-bad\\.toml"))'
check_eq "unit still active" active "$(state)"
check_eq "same process (kept running on the last good config)" "$pid" "$(prop MainPID)"
json="$(in_guest platform-agent status --json 2>&1 || true)"
check_eq "status --json still says running" running "$(guest_jq .agent.state <<<"$json" 2>&1 || true)"

echo "== restart after removing it"
must "remove $bad_dropin" in_guest rm "$bad_dropin"
check "systemctl restart" in_guest systemctl restart "$unit"
check_eq "unit is active" active "$(state)"

echo "== restart with the invalid drop-in present"
must "write $bad_dropin" write_bad_dropin
check_fails "systemctl restart fails" in_guest systemctl restart "$unit"
check_eq "ExecMainStatus is 78 (EX_CONFIG)" 78 "$(prop ExecMainStatus)"
# With a restart pending the unit would be activating/auto-restart; failed/failed
# is systemd having decided not to restart it (RestartPreventExitStatus=78).
check_eq "unit failed, no restart scheduled (ActiveState/SubState)" failed/failed \
    "$(prop ActiveState)/$(prop SubState)"
check_eq "NRestarts is 0" 0 "$(prop NRestarts)"
check_eq "Result is exit-code" exit-code "$(prop Result)"

echo "== stop"
must "remove $bad_dropin" in_guest rm "$bad_dropin"
check "systemctl start (again)" in_guest systemctl start "$unit"
check_eq "unit is active" active "$(state)"
cursor="$(journal_cursor)"
check "systemctl stop" in_guest systemctl stop "$unit"
check_eq "unit is inactive" inactive "$(state)"
check_eq "Result is success" success "$(prop Result)"
check_eq "main process exited (ExecMainCode=1) with status 0" 1/0 \
    "$(prop ExecMainCode)/$(prop ExecMainStatus)"
check_within "$journal_wait" "journal: shutdown started ($id_shutdown_started)" \
    unit_journal_has "$cursor" ".MESSAGE_ID == \"$id_shutdown_started\""
check_within "$journal_wait" "journal: agent stopped ($id_agent_stopped)" \
    unit_journal_has "$cursor" ".MESSAGE_ID == \"$id_agent_stopped\""

finish
