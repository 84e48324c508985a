//! What K3s leaves behind when its unit stops: with KillMode=process the
//! containerd shims and every container stay alive (K3s issue 2400), holding
//! files open on /data, and pod mounts stay mounted. Found here by the unit's
//! cgroup and by shim process trees; ended with SIGTERM, a deadline, SIGKILL;
//! mounts are unmounted deepest first, never lazily, never forced.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::logging::ids;
use crate::volume::mountinfo;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeftoverProcess {
    pub pid: i32,
    pub command: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CleanupReport {
    pub terminated: Vec<LeftoverProcess>,
    pub killed: Vec<LeftoverProcess>,
    pub survivors: Vec<LeftoverProcess>,
    pub unmounted: Vec<String>,
    pub unmount_failed: Vec<String>,
}

impl CleanupReport {
    pub fn is_clean(&self) -> bool {
        self.survivors.is_empty() && self.unmount_failed.is_empty()
    }
}

struct ProcInfo {
    ppid: i32,
    command: String,
}

fn process_table() -> BTreeMap<i32, ProcInfo> {
    let mut table = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return table;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ..."; comm may contain spaces and parens.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let command = stat[open + 1..close].to_string();
        let ppid = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        table.insert(pid, ProcInfo { ppid, command });
    }
    table
}

/// PIDs in a cgroup, whichever hierarchy this host uses (v2 unified, or the
/// v1 name=systemd / hybrid unified trees).
fn cgroup_pids(control_group: &str) -> BTreeSet<i32> {
    let mut pids = BTreeSet::new();
    if control_group.is_empty() {
        return pids;
    }
    let rel = control_group.trim_start_matches('/');
    for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd"] {
        collect_cgroup_tree(&Path::new(root).join(rel), &mut pids);
    }
    pids
}

fn collect_cgroup_tree(dir: &Path, pids: &mut BTreeSet<i32>) {
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                collect_cgroup_tree(&entry.path(), pids);
            }
        }
    }
}

/// Leftovers: every process still in the stopped unit's cgroup, every
/// process whose name starts with one of `shim_prefixes`, and all their
/// descendants. The agent itself is never on the list.
pub fn find(control_group: &str, shim_prefixes: &[String]) -> Vec<LeftoverProcess> {
    let table = process_table();
    let mut roots = cgroup_pids(control_group);
    roots.extend(
        table
            .iter()
            .filter(|(_, info)| shim_prefixes.iter().any(|p| info.command.starts_with(p.as_str())))
            .map(|(pid, _)| *pid),
    );
    let mut selected: BTreeSet<i32> = BTreeSet::new();
    let mut frontier: Vec<i32> = roots.into_iter().collect();
    while let Some(pid) = frontier.pop() {
        if selected.insert(pid) {
            frontier.extend(table.iter().filter(|(_, i)| i.ppid == pid).map(|(child, _)| *child));
        }
    }
    let me = std::process::id() as i32;
    selected
        .into_iter()
        .filter(|pid| *pid != me && *pid > 1 && table.contains_key(pid))
        .map(|pid| LeftoverProcess {
            pid,
            command: table[&pid].command.clone(),
        })
        .collect()
}

fn alive(pid: i32) -> bool {
    // A zombie has let go of its files; only a live process holds /data.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next()) != Some("Z"),
        Err(_) => false,
    }
}

/// SIGTERM, wait up to `grace` (polling), SIGKILL what is left, wait a little
/// for the kernel to reap it.
pub async fn terminate(processes: Vec<LeftoverProcess>, grace: Duration, report: &mut CleanupReport) {
    for process in &processes {
        info!(message_id = ids::LEFTOVER_SIGNALLED, pid = process.pid, command = %process.command, signal = "SIGTERM", "sending SIGTERM to leftover process {} ({})", process.pid, process.command);
        let _ = kill(Pid::from_raw(process.pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && processes.iter().any(|p| alive(p.pid)) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (remaining, gone): (Vec<_>, Vec<_>) = processes.into_iter().partition(|p| alive(p.pid));
    report.terminated.extend(gone);
    for process in &remaining {
        warn!(message_id = ids::LEFTOVER_SIGNALLED, pid = process.pid, command = %process.command, signal = "SIGKILL", "leftover process {} ({}) ignored SIGTERM; sending SIGKILL", process.pid, process.command);
        let _ = kill(Pid::from_raw(process.pid), Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && remaining.iter().any(|p| alive(p.pid)) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (survivors, killed): (Vec<_>, Vec<_>) = remaining.into_iter().partition(|p| alive(p.pid));
    report.killed.extend(killed);
    report.survivors.extend(survivors);
}

/// Unmounts every mount below each root, deepest first. A busy mount is
/// reported and left mounted: no MNT_DETACH, no MNT_FORCE.
pub fn unmount_below(roots: &[PathBuf], report: &mut CleanupReport) {
    let Ok(mounts) = mountinfo::read() else { return };
    let mut targets: Vec<PathBuf> = Vec::new();
    for root in roots {
        targets.extend(
            mountinfo::mounts_below(&mounts, root)
                .into_iter()
                .map(|m| m.mount_point.clone()),
        );
        if mountinfo::mount_at(&mounts, root).is_some() && root.starts_with("/run/netns") {
            targets.push(root.clone());
        }
    }
    targets.sort_by_key(|t| std::cmp::Reverse(t.components().count()));
    targets.dedup();
    for target in targets {
        match nix::mount::umount2(&target, nix::mount::MntFlags::empty()) {
            Ok(()) => report.unmounted.push(target.display().to_string()),
            Err(err) => report.unmount_failed.push(format!("{}: {err}", target.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn finds_a_shim_tree_and_kills_a_child_that_ignores_sigterm() {
        // A "shim" (by name) whose child ignores SIGTERM, like a container
        // process that traps it.
        let dir = tempfile::tempdir().unwrap();
        // comm is cut at 15 bytes; a unique name keeps real shims out of the test.
        let shim = dir.path().join("pa-test-shim");
        std::fs::copy("/bin/sh", &shim).unwrap();
        let mut parent = std::process::Command::new(&shim)
            .args([
                "-c",
                "trap '' TERM; sh -c \"trap '' TERM; while :; do sleep 1; done\" & wait",
            ])
            .spawn()
            .unwrap();
        let shim_pid = parent.id() as i32;
        let found = loop {
            let found = find("", &["pa-test-shim".to_string()]);
            if found.iter().any(|p| p.pid == shim_pid) && found.len() >= 2 {
                break found;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(found.iter().all(|p| p.pid != std::process::id() as i32));
        let mut report = CleanupReport::default();
        terminate(found.clone(), Duration::from_millis(300), &mut report).await;
        let _ = parent.wait();
        assert!(report.survivors.is_empty(), "{report:?}");
        assert!(
            !report.killed.is_empty(),
            "processes ignoring SIGTERM must be SIGKILLed: {report:?}"
        );
        for process in &found {
            assert!(!alive(process.pid), "{process:?} still alive");
        }
    }
}
