#!/usr/bin/env bash
# system-test-backends: vm
# A process the agent must not kill holds /data: a transient unit running
# `sleep` with its working directory and an open file on /data, in no cgroup
# of K3s's and with no shim's name.
#   - `systemctl stop platform-agent` runs the plan: K3s and its leftovers go,
#     but unmount-data fails with UNMOUNT_REFUSED naming the holder's pid and
#     command; /data stays mounted (no lazy or forced unmount: the mount is
#     still in the table and the holder still sees its files), the holder is
#     alive;
#   - the agent, started again, reports that failed step in
#     `status --json` .last_shutdown;
#   - once the holder is gone, stopping the agent unmounts /data cleanly.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

uuid="$(cat /proc/sys/kernel/random/uuid)"
journal_wait=30
holder_unit=pa-holder.service

unit_state() { in_guest systemctl is-active "$1" || true; }
data_source_uuid() { in_guest findmnt --noheadings --output UUID --mountpoint /data; }

guest_add_disk datadisk 256M --uuid "$uuid"
guest_boot

echo "== install, configure, start"
guest_install_node "$uuid"
guest_start_node
shim="$(guest_pid_file shim 2>&1)" || fail "stand-in wrote shim.pid" "$shim"
app="$(guest_pid_file container 2>&1)" || fail "stand-in wrote container.pid" "$app"

echo "== a process outside K3s holds /data"
must "systemd-run $holder_unit: sleep with cwd /data/traefik and fd 3 on the marker" \
    in_guest systemd-run --unit="$holder_unit" --property=WorkingDirectory=/data/traefik \
    /bin/sh -c 'exec 3</data/.platform-agent-volume; exec sleep infinity'
# shellcheck disable=SC2016 # expanded by the guest's shell
check_within 10 "$holder_unit is running sleep" \
    in_guest sh -c 'test "$(cat /proc/$(systemctl show --property=MainPID --value '"$holder_unit"')/comm)" = sleep'
holder="$(in_guest systemctl show --property=MainPID --value "$holder_unit")"
echo "    holder pid $holder"
check_eq "the holder's cwd is /data/traefik" /data/traefik "$(in_guest readlink "/proc/$holder/cwd" 2>&1)"

echo "== systemctl stop platform-agent"
cursor="$(journal_cursor)"
check "systemctl stop platform-agent" in_guest systemctl stop platform-agent
check_within "$journal_wait" "journal: plan finished ($ID_PLAN_FINISHED)" \
    journal_has platform-agent.service "$cursor" ".MESSAGE_ID == \"$ID_PLAN_FINISHED\""
steps="$(plan_steps "$cursor")"
echo "    plan steps from the journal: $steps"
check_eq "journal: the plan's steps in order, unmount-data failed" \
    "stop-jobs:done stop-k3s:done clean-leftovers:done flush-wal:skipped sync:done unmount-data:failed release-inhibitor:done" \
    "$steps"
check_eq "journal: PLAN_FINISHED says 1 step failed" 1 \
    "$(journal_query "$cursor" "[.[] | select(.MESSAGE_ID == \"$ID_PLAN_FINISHED\") | .FAILED_STEPS] | join(\",\")" 2>&1)"
refused="$(journal_query "$cursor" "[.[] | select(.MESSAGE_ID == \"$ID_UNMOUNT_REFUSED\")] | last | \"\(.MESSAGE)\n\(.HOLDERS)\"" 2>&1)"
echo "    UNMOUNT_REFUSED: ${refused//$'\n'/ | HOLDERS=}"
check_match "journal: UNMOUNT_REFUSED's message names pid $holder (sleep)" "pid $holder \\(sleep\\)" \
    "$(head -n 1 <<<"$refused")"
check_match "journal: UNMOUNT_REFUSED's HOLDERS names pid $holder (sleep) and its cwd" \
    "pid $holder \\(sleep\\): cwd /data/traefik" "$(tail -n 1 <<<"$refused")"
check_match "journal: UNMOUNT_REFUSED's HOLDERS names the open file too" \
    "pid $holder \\(sleep\\): fd 3 /data/.platform-agent-volume" "$(tail -n 1 <<<"$refused")"
check_eq "journal: the unmount-data step's REASON says busy" true \
    "$(journal_query "$cursor" "[.[] | select(.MESSAGE_ID == \"$ID_PLAN_STEP\" and .STEP == \"unmount-data\") | .REASON | test(\"busy\")] | any" 2>&1)"
check_eq "/data is still mounted from UUID $uuid (findmnt)" "$uuid" "$(data_source_uuid 2>&1)"
check_eq "data.mount is still active" active "$(unit_state data.mount)"
check_eq "the holder is alive, its cwd still /data/traefik" /data/traefik \
    "$(in_guest readlink "/proc/$holder/cwd" 2>&1)"
check_eq "$holder_unit is still active" active "$(unit_state "$holder_unit")"
check_eq "k3s.service is inactive" inactive "$(unit_state k3s.service)"
for pid in "$shim" "$app"; do
    check "the stand-in's leftover pid $pid is gone" guest_process_gone "$pid"
done

echo "== the agent, started again, reports the failed step"
check "systemctl start platform-agent" in_guest systemctl start platform-agent
check_eq "status: .last_shutdown has unmount-data failed" failed \
    "$(guest_status_jq '.last_shutdown[] | select(.step == "unmount-data") | .outcome' 2>&1)"
check_match "status: .last_shutdown's unmount-data reason names pid $holder" "pid $holder \\(sleep\\)" \
    "$(guest_status_jq '.last_shutdown[] | select(.step == "unmount-data") | .reason' 2>&1)"
check_within 120 "status: /data mounted and K3s api-ready again" \
    guest_status_is '"\(.volume.mount_state.state) \(.k3s_status.tier)"' "mounted api-ready"

echo "== without the holder, the unmount goes through"
check "systemctl stop $holder_unit" in_guest systemctl stop "$holder_unit"
cursor="$(journal_cursor)"
check "systemctl stop platform-agent" in_guest systemctl stop platform-agent
check_within "$journal_wait" "journal: plan finished ($ID_PLAN_FINISHED)" \
    journal_has platform-agent.service "$cursor" ".MESSAGE_ID == \"$ID_PLAN_FINISHED\""
check_eq "journal: the plan's steps in order, all done" \
    "stop-jobs:done stop-k3s:done clean-leftovers:done flush-wal:skipped sync:done unmount-data:done release-inhibitor:done" \
    "$(plan_steps "$cursor")"
check_fails "/data is not mounted" data_source_uuid
check "e2fsck -fn (in the guest) finds it clean" in_guest e2fsck -fn "/dev/disk/by-uuid/$uuid"

if guest_poweroff; then pass "guest powers off"; else fail "guest powers off"; fi
check "e2fsck -fn on the data image (host) finds it clean" e2fsck -fn "${GUEST_DISK_IMAGE[datadisk]}"

finish
