#!/usr/bin/env bash
# system-test-backends: vm
# `systemctl poweroff` with the agent running the K3s stand-in on /data:
#   - logind announces the shutdown (PrepareForShutdown) and waits for the
#     agent's delay lock: the whole plan runs, in order, before logind lets
#     the power-down begin (checked in the persisted journal, read out of the
#     guest's disk after it is off, and on the serial console);
#   - the stand-in's shim and container, which ignore SIGTERM and hold a file
#     open on /data, are killed by the plan, and the agent itself unmounts
#     /data before systemd's own shutdown starts;
#   - on the host afterwards: e2fsck -fn finds the data disk clean and the
#     file the container held is intact.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

uuid="$(cat /proc/sys/kernel/random/uuid)"
# systemd's "System is powering down" (logind, SD_MESSAGE_SHUTDOWN), logged
# once logind stops waiting for delay locks and starts poweroff.target.
id_system_shutdown=98268866d1d54a499c4e98921d93bc40
# systemd's "a stop job for UNIT has finished" (SD_MESSAGE_UNIT_STOPPED).
id_stop_job_done=9d1aaa27d60140bd96365438aad20286

guest_add_disk datadisk 256M --uuid "$uuid"
guest_boot

echo "== install, configure, start"
guest_install_node "$uuid"
show_in_log "platform-agent shutdown-plan" in_guest platform-agent shutdown-plan
guest_start_node
shim="$(guest_pid_file shim 2>&1)" || fail "stand-in wrote shim.pid" "$shim"
app="$(guest_pid_file container 2>&1)" || fail "stand-in wrote container.pid" "$app"
check_match "the container (pid $app) holds $STANDIN_HELD_FILE open" "$STANDIN_HELD_FILE" \
    "$(in_guest ls -l "/proc/$app/fd" 2>&1)"
check_fails "journal: no warning that logind's InhibitDelayMaxSec is shorter than the plan" \
    journal_has platform-agent.service "" '.MESSAGE | test("InhibitDelayMaxSec is shorter")'
check "logind lists the agent's delay lock on shutdown" \
    in_guest sh -c 'systemd-inhibit --list --no-legend | grep -E "platform-agent.*shutdown.*delay"'

echo "== systemctl poweroff"
rc=0
in_guest systemctl poweroff || rc=$?
# 0, or 255 when the SSH connection went down before the answer came back.
check_match "systemctl poweroff accepted (exit status $rc)" '^(0|255)$' "$rc"
if guest_wait_down 240; then pass "guest powered off"; else fail "guest powered off within 240 s"; fi

echo "== the persisted journal, read from the guest's disk"
journal_dir="$WORKDIR/journal"
if vm_copy_out_journal "$journal_dir"; then pass "journal copied out of the overlay"; else
    fail "journal copied out of the overlay"
fi
# The entries of the one boot, oldest first, as one JSON array.
entries="$WORKDIR/journal.json"
journalctl --directory="$journal_dir" --output=json --no-pager 2>"$WORKDIR/journalctl.err" |
    jq --slurp . >"$entries" || true
host_jq() { jq --raw-output "$1" "$entries"; }
# position CONDITION: index of the first entry satisfying CONDITION, or -1.
position() { host_jq "[.[] | ($1)] | index(true) // -1"; }
check "journal has entries" test "$(host_jq length 2>&1)" -gt 0
steps="$(host_jq "[.[] | select(.MESSAGE_ID == \"$ID_PLAN_STEP\") | \"\(.STEP):\(.OUTCOME)\"] | join(\" \")" 2>&1)"
echo "    plan steps from the journal: $steps"
check_eq "journal: the plan's steps in order (STEP:OUTCOME)" \
    "stop-jobs:done stop-k3s:done clean-leftovers:done flush-wal:skipped sync:done unmount-data:done release-inhibitor:done" \
    "$steps"
check_match "journal: the shutdown was started by logind's PrepareForShutdown (REASON)" 'PrepareForShutdown' \
    "$(host_jq "[.[] | select(.MESSAGE_ID == \"$ID_SHUTDOWN_STARTED\") | .REASON] | join(\"; \")" 2>&1)"
# Positions in the journal. Every step up to unmount-data, and PLAN_FINISHED
# (logged, with the steps recorded in the state store, before the delay lock is
# dropped), must come before logind lets the power-down begin; only the
# release-inhibitor line, logged once the lock is gone, may come after
# logind's "System is powering down".
at_started="$(position ".MESSAGE_ID == \"$ID_PLAN_STARTED\"")"
at_unmounted="$(position ".MESSAGE_ID == \"$ID_PLAN_STEP\" and .STEP == \"unmount-data\"")"
at_shutdown="$(position ".MESSAGE_ID == \"$id_system_shutdown\"")"
at_finished="$(position ".MESSAGE_ID == \"$ID_PLAN_FINISHED\"")"
echo "    journal positions: plan started $at_started, step unmount-data $at_unmounted," \
    "system powering down $at_shutdown, plan finished $at_finished"
check "journal: plan started, ..., step unmount-data, plan finished, then 'System is powering down'" \
    test "$at_started" -ge 0 -a "$at_unmounted" -gt "$at_started" -a "$at_finished" -gt "$at_unmounted" \
    -a "$at_shutdown" -gt "$at_finished"
check_eq "journal: PLAN_FINISHED says 0 steps failed" 0 \
    "$(host_jq "[.[] | select(.MESSAGE_ID == \"$ID_PLAN_FINISHED\") | .FAILED_STEPS] | join(\",\")" 2>&1)"
for pid in "$shim" "$app"; do
    check_eq "journal: leftover pid $pid got SIGTERM, then SIGKILL" "SIGTERM SIGKILL" \
        "$(host_jq "[.[] | select(.MESSAGE_ID == \"$ID_LEFTOVER_SIGNALLED\" and .PID == \"$pid\") | .SIGNAL] | join(\" \")" 2>&1)"
done
# systemd's "Unmounted /data" (the stop job of data.mount done): that must be
# the agent's doing, during the plan, not systemd's umount.target after the
# power-down began.
unmounted_at="$(position ".UNIT == \"data.mount\" and .MESSAGE_ID == \"$id_stop_job_done\"")"
check "journal: data.mount's stop job (position $unmounted_at) ran inside the plan's unmount-data step" \
    test "$unmounted_at" -gt "$at_started" -a "$unmounted_at" -lt "$at_unmounted"

echo "== the serial console (journald's copy, until the kernel powers off)"
console_steps="$(grep -o 'platform-agent\[[0-9]*\]: shutdown step [a-z0-9-]*: [a-z-]*' "$CONSOLE_LOG" |
    sed 's/.*shutdown step \([a-z0-9-]*\): \([a-z-]*\)/\1:\2/' | tr '\n' ' ' | sed 's/ $//')"
check_eq "console: the plan's steps in order" \
    "stop-jobs:done stop-k3s:done clean-leftovers:done flush-wal:skipped sync:done unmount-data:done release-inhibitor:done" \
    "$console_steps"
line_of() { grep -n -m1 -- "$1" "$CONSOLE_LOG" | cut -d: -f1; }
unmounted_line="$(line_of 'shutdown step unmount-data: done')"
down_line="$(line_of 'System is powering down')"
off_line="$(line_of 'reboot: Power down')"
check "console: step unmount-data (line ${unmounted_line:-none}), then powering down (${down_line:-none}), then power off (${off_line:-none})" \
    test "${unmounted_line:-0}" -gt 0 -a "${down_line:-0}" -gt "${unmounted_line:-0}" -a "${off_line:-0}" -gt "${down_line:-0}"
check "console: the plan finished message is there" grep -q 'shutdown plan finished in [0-9]* ms, 0 steps failed' "$CONSOLE_LOG"

echo "== the data disk, on the host"
img=${GUEST_DISK_IMAGE[datadisk]}
check "e2fsck -fn finds the data image clean" e2fsck -fn "$img"
check_eq "the file the container held is intact (seq $STANDIN_HELD_LINES)" \
    "$(seq "$STANDIN_HELD_LINES" | sha256sum)" \
    "$(debugfs -R "cat ${STANDIN_HELD_FILE#/data}" "$img" 2>/dev/null | sha256sum)"
check_match "the agent's marker is on the disk" "uuid=$uuid" \
    "$(debugfs -R 'cat /.platform-agent-volume' "$img" 2>/dev/null)"

finish
