#!/usr/bin/env bash
# system-test-backends: vm
# The /data volume and K3s under real systemd, udev and a real disk:
#   - the data disk is attached but carries no filesystem with the configured
#     UUID: /data stays unmounted, the K3s stand-in is never started (not even
#     for a moment), the agent says device-absent and logs the fence;
#   - the filesystem appears (mkfs.ext4 -U inside the guest; udev adds the
#     by-uuid link): the agent mounts it through data.mount by UUID, writes
#     its marker, lays out the directories with their owners and modes, and
#     only then starts the stand-in, which comes up to api-ready;
#   - `systemctl stop platform-agent` runs the shutdown plan in order (from
#     the journal's PLAN_STEP entries), the stand-in's shim and container,
#     which ignore SIGTERM and hold a file open on /data, are killed, and
#     /data is unmounted; e2fsck finds the filesystem clean, in the guest and
#     again on the host after poweroff.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

uuid="$(cat /proc/sys/kernel/random/uuid)"
by_uuid="/dev/disk/by-uuid/$uuid"
journal_wait=30

unit_prop() { in_guest systemctl show --property="$2" --value "$1"; }
unit_state() { in_guest systemctl is-active "$1" || true; }
k3s_never_started() { [[ "$(unit_prop k3s.service ExecMainStartTimestampMonotonic)" == 0 ]]; }
data_unmounted() { ! in_guest findmnt --mountpoint /data >/dev/null; }

guest_add_disk datadisk 256M --blank
guest_boot
disk=${GUEST_DISK[datadisk]}

echo "== install the agent and the K3s stand-in"
guest_install_node "$uuid"
show_in_log "platform-agent config show (files; the agent is not running yet)" in_guest platform-agent config show
plan_ms="$(in_guest platform-agent shutdown-plan --json | jq '[.[].deadline_ms] | add')"
delay_ms="$(in_guest busctl get-property org.freedesktop.login1 /org/freedesktop/login1 \
    org.freedesktop.login1.Manager InhibitDelayMaxUSec | awk '{ print int($2 / 1000) }')"
check "logind's InhibitDelayMaxSec (${delay_ms} ms, the drop-in) covers the plan's deadlines (${plan_ms} ms)" \
    test "${delay_ms:-0}" -ge "${plan_ms:-1}"

echo "== the disk is there, but no filesystem with UUID $uuid"
check "$disk exists (udev's by-id link for serial datadisk)" in_guest test -b "$disk"
check_fails "$by_uuid does not exist" in_guest test -e "$by_uuid"
check "systemctl start platform-agent" in_guest systemctl start platform-agent
check_within "$journal_wait" "journal: volume not ready ($ID_VOLUME_NOT_READY)" \
    journal_has platform-agent.service "" ".MESSAGE_ID == \"$ID_VOLUME_NOT_READY\""
check_within "$journal_wait" "journal: K3s fenced, not started ($ID_K3S_FENCED)" \
    journal_has platform-agent.service "" ".MESSAGE_ID == \"$ID_K3S_FENCED\""
check_within 10 "status: .volume.mount_state.state is device-absent" \
    guest_status_is .volume.mount_state.state device-absent
check_eq "status: .volume.mount_state.device names $by_uuid" "$by_uuid" \
    "$(guest_status_jq .volume.mount_state.device 2>&1)"
check_eq "status: .k3s_status.tier is stopped" stopped "$(guest_status_jq .k3s_status.tier 2>&1)"
# Three check intervals (1 s each) for anything to go wrong.
holds_for 3 "k3s.service never started (ExecMainStartTimestampMonotonic stays 0)" k3s_never_started
check_eq "k3s.service is inactive" inactive "$(unit_state k3s.service)"
check "/data is not mounted" data_unmounted
check_eq "data.mount is not active" inactive "$(unit_state data.mount)"

echo "== the filesystem appears"
must "mkfs.ext4 -U $uuid on $disk (in the guest)" in_guest mkfs.ext4 -q -U "$uuid" -L pa-data "$disk"
check_within 30 "udev made $by_uuid" in_guest test -b "$by_uuid"
check_within "$journal_wait" "journal: volume ready ($ID_VOLUME_READY)" \
    journal_has platform-agent.service "" ".MESSAGE_ID == \"$ID_VOLUME_READY\""
check_within "$journal_wait" "journal: K3s started ($ID_K3S_STARTED)" \
    journal_has platform-agent.service "" ".MESSAGE_ID == \"$ID_K3S_STARTED\""
check_eq "journal: volume ready comes before K3s started" true \
    "$(journal_query "" "[.[] | .MESSAGE_ID] | (index(\"$ID_VOLUME_READY\") // -1) as \$v |
        (index(\"$ID_K3S_STARTED\") // -1) as \$k | \$v >= 0 and \$k > \$v" 2>&1)"
check_eq "findmnt: /data is mounted from UUID $uuid" "$uuid ext4" \
    "$(in_guest findmnt --noheadings --output UUID,FSTYPE --mountpoint /data 2>&1 | tr -s ' ')"
check_eq "data.mount is active" active "$(unit_state data.mount)"
# (systemctl show's What= is the resolved /dev/vdX once mounted: read the file.)
check "the agent's data.mount unit says What=$by_uuid" \
    in_guest grep -qx "What=$by_uuid" "$(unit_prop data.mount FragmentPath)"
check_match "marker /data/.platform-agent-volume names uuid=$uuid" "\"uuid=$uuid\"" \
    "$(in_guest cat /data/.platform-agent-volume 2>&1)"
check_eq "/data/k3s-storage: owner 0, group 0, mode 711" "0 0 711" \
    "$(in_guest stat --format='%u %g %a' /data/k3s-storage 2>&1)"
check_eq "/data/traefik: owner 65532, group 65532, mode 700" "65532 65532 700" \
    "$(in_guest stat --format='%u %g %a' /data/traefik 2>&1)"
check_eq "k3s.service is active" active "$(unit_state k3s.service)"
check_match "k3s.service RequiresMountsFor includes /data (the agent's drop-in)" '(^| )/data( |$)' \
    "$(unit_prop k3s.service RequiresMountsFor)"
# Monotonic microseconds: the stand-in's process started after the mount.
mounted_at="$(unit_prop data.mount ActiveEnterTimestampMonotonic)"
k3s_at="$(unit_prop k3s.service ExecMainStartTimestampMonotonic)"
check "k3s.service started ($k3s_at) after data.mount was mounted ($mounted_at)" \
    test "$k3s_at" -gt "$mounted_at"
check_within "$journal_wait" "status: .k3s_status.tier is api-ready" \
    guest_status_is .k3s_status.tier api-ready
check_within "$journal_wait" "journal: readiness tier api-ready ($ID_K3S_READINESS, TIER)" \
    journal_has platform-agent.service "" ".MESSAGE_ID == \"$ID_K3S_READINESS\" and .TIER == \"api-ready\""
check_eq "status: .volume.mount_state.state is mounted" mounted "$(guest_status_jq .volume.mount_state.state 2>&1)"
check "the stand-in's datastore is on /data (data-dir from the agent's K3s drop-in)" \
    in_guest test -f /data/k3s/server/db/state.db
shim="$(guest_pid_file shim 2>&1)" || fail "stand-in wrote shim.pid" "$shim"
app="$(guest_pid_file container 2>&1)" || fail "stand-in wrote container.pid" "$app"
check_eq "the shim's process name is containerd-shim (k3s.shim_prefixes)" containerd-shim \
    "$(in_guest cat "/proc/$shim/comm" 2>&1)"
check_match "the container (pid $app) holds $STANDIN_HELD_FILE open" "$STANDIN_HELD_FILE" \
    "$(in_guest ls -l "/proc/$app/fd" 2>&1)"
show_in_log "processes of k3s.service" in_guest systemd-cgls --no-pager --unit k3s.service
show_in_log "platform-agent status" in_guest platform-agent status
show_in_log "platform-agent shutdown-plan (from the running agent)" in_guest platform-agent shutdown-plan
check_fails "journal: no warning that logind's InhibitDelayMaxSec is shorter than the plan" \
    journal_has platform-agent.service "" '.MESSAGE | test("InhibitDelayMaxSec is shorter")'

echo "== systemctl stop platform-agent runs the shutdown plan"
cursor="$(journal_cursor)"
check "systemctl stop platform-agent" in_guest systemctl stop platform-agent
check_eq "platform-agent is inactive" inactive "$(unit_state platform-agent)"
check_within "$journal_wait" "journal: plan finished ($ID_PLAN_FINISHED)" \
    journal_has platform-agent.service "$cursor" ".MESSAGE_ID == \"$ID_PLAN_FINISHED\""
steps="$(plan_steps "$cursor")"
echo "    plan steps from the journal: $steps"
check_eq "journal: the plan's steps in order (STEP:OUTCOME)" \
    "stop-jobs:done stop-k3s:done clean-leftovers:done flush-wal:skipped sync:done unmount-data:done release-inhibitor:done" \
    "$steps"
# release-inhibitor is logged once the delay lock is gone, which is after
# PLAN_FINISHED (and the steps' record in the state store).
check_eq "journal: plan started, then its steps, plan finished, then release-inhibitor" \
    "started $(sed 's/[^ ]*/step/g; s/ step$//' <<<"$PLAN_STEPS") finished step" "$(plan_sequence "$cursor")"
check_eq "journal: PLAN_FINISHED says 0 steps failed" 0 \
    "$(journal_query "$cursor" "[.[] | select(.MESSAGE_ID == \"$ID_PLAN_FINISHED\") | .FAILED_STEPS] | last" 2>&1)"
for pid in "$shim" "$app"; do
    check "journal: leftover pid $pid got SIGKILL after ignoring SIGTERM ($ID_LEFTOVER_SIGNALLED)" \
        journal_has platform-agent.service "$cursor" \
        ".MESSAGE_ID == \"$ID_LEFTOVER_SIGNALLED\" and .PID == \"$pid\" and .SIGNAL == \"SIGKILL\""
    check "leftover pid $pid is gone" guest_process_gone "$pid"
done
check_eq "k3s.service is inactive" inactive "$(unit_state k3s.service)"
check "/data is not mounted" data_unmounted
check_eq "data.mount is inactive" inactive "$(unit_state data.mount)"
check "e2fsck -fn $by_uuid (in the guest) finds it clean" in_guest e2fsck -fn "$by_uuid"

echo "== after poweroff, on the host"
if guest_poweroff; then pass "guest powers off"; else fail "guest powers off"; fi
check "e2fsck -fn on the data image finds it clean" e2fsck -fn "${GUEST_DISK_IMAGE[datadisk]}"

finish
