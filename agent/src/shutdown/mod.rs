//! The ordered shutdown plan: jobs, WAL, K3s, leftovers, sync, /data, in
//! that order, each step with a deadline and logged with its duration. Run
//! on logind's PrepareForShutdown(true) (the agent holds a delay lock until
//! it is done) and on SIGTERM.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::config::Settings;
use crate::k3s::K3s;
use crate::logging::ids;
use crate::status::StatusHandle;
use crate::volume::{MountState, Volume, VolumeError};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownSettings {
    /// What stopping the agent (SIGTERM, `systemctl stop`) does:
    /// "run-plan" stops K3s and unmounts /data as at poweroff;
    /// "leave-running" stops only the agent (for upgrades by hand).
    pub on_agent_stop: OnAgentStop,
    #[serde(with = "crate::config::duration")]
    pub wal_flush_timeout: Duration,
    #[serde(with = "crate::config::duration")]
    pub leftovers_timeout: Duration,
    #[serde(with = "crate::config::duration")]
    pub sync_timeout: Duration,
    #[serde(with = "crate::config::duration")]
    pub unmount_timeout: Duration,
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        ShutdownSettings {
            on_agent_stop: OnAgentStop::RunPlan,
            wal_flush_timeout: Duration::from_secs(20),
            leftovers_timeout: Duration::from_secs(30),
            sync_timeout: Duration::from_secs(20),
            unmount_timeout: Duration::from_secs(20),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnAgentStop {
    RunPlan,
    LeaveRunning,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    StopJobs,
    FlushWal,
    StopK3s,
    CleanLeftovers,
    Sync,
    UnmountData,
    ReleaseInhibitor,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::StopJobs => "stop-jobs",
            Step::FlushWal => "flush-wal",
            Step::StopK3s => "stop-k3s",
            Step::CleanLeftovers => "clean-leftovers",
            Step::Sync => "sync",
            Step::UnmountData => "unmount-data",
            Step::ReleaseInhibitor => "release-inhibitor",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedStep {
    pub step: Step,
    pub deadline_ms: u64,
    /// Why the step will do nothing in this configuration.
    pub skip: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Outcome {
    Done,
    Skipped { reason: String },
    Failed { reason: String },
    TimedOut,
}

impl Outcome {
    pub fn word(&self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::Skipped { .. } => "skipped",
            Outcome::Failed { .. } => "failed",
            Outcome::TimedOut => "timed-out",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepReport {
    pub step: Step,
    #[serde(flatten)]
    pub outcome: Outcome,
    pub duration_ms: u64,
}

/// The plan for this configuration, with each step's deadline.
pub fn plan(settings: &Settings) -> Vec<PlannedStep> {
    let s = &settings.shutdown;
    let k3s = settings.k3s.enabled;
    let volume = settings.volume.enabled;
    let step = |step, deadline: Duration, skip: Option<&str>| PlannedStep {
        step,
        deadline_ms: deadline.as_millis() as u64,
        skip: skip.map(str::to_string),
    };
    let no_k3s = (!k3s).then_some("k3s is not enabled");
    // PostgreSQL runs in K3s and only stops with it (or, as real K3s leaves
    // pods running, when its leftovers are signalled): its last
    // archive_command calls come during stop-k3s and clean-leftovers, so the
    // WAL archiver (and the control socket that wal-push talks to) keeps
    // serving until flush-wal, which comes after them.
    vec![
        step(Step::StopJobs, settings.agent.shutdown_timeout, None),
        step(Step::StopK3s, settings.k3s.stop_timeout, no_k3s),
        step(
            Step::CleanLeftovers,
            s.leftovers_timeout
                .max(settings.k3s.leftover_grace + Duration::from_secs(5)),
            no_k3s,
        ),
        step(
            Step::FlushWal,
            s.wal_flush_timeout,
            (!settings.wal.enabled).then_some("WAL archiving is not enabled"),
        ),
        step(Step::Sync, s.sync_timeout, None),
        step(
            Step::UnmountData,
            s.unmount_timeout,
            (!volume).then_some("volume is not enabled"),
        ),
        step(Step::ReleaseInhibitor, Duration::from_secs(1), None),
    ]
}

/// Total of all deadlines: what logind's InhibitDelayMaxSec must cover.
pub fn total_deadline(plan: &[PlannedStep]) -> Duration {
    Duration::from_millis(plan.iter().map(|s| s.deadline_ms).sum())
}

/// The parts of the node the plan acts on.
pub struct PlanContext<'a> {
    pub k3s: Option<&'a K3s>,
    pub volume: Option<&'a Volume>,
    pub status: &'a StatusHandle,
}

pub fn log_step(report: &StepReport, deadline_ms: u64) {
    let reason = match &report.outcome {
        Outcome::Skipped { reason } | Outcome::Failed { reason } => reason.as_str(),
        _ => "",
    };
    let step = report.step.as_str();
    let outcome = report.outcome.word();
    if matches!(report.outcome, Outcome::Failed { .. } | Outcome::TimedOut) {
        error!(
            message_id = ids::PLAN_STEP,
            step,
            outcome,
            duration_ms = report.duration_ms,
            deadline_ms,
            reason,
            "shutdown step {step}: {outcome} after {} ms {reason}",
            report.duration_ms
        );
    } else {
        info!(
            message_id = ids::PLAN_STEP,
            step,
            outcome,
            duration_ms = report.duration_ms,
            deadline_ms,
            reason,
            "shutdown step {step}: {outcome} after {} ms {reason}",
            report.duration_ms
        );
    }
}

/// Runs the node's steps of `planned` (stop-k3s, clean-leftovers, sync,
/// unmount-data); the supervisor does stop-jobs, flush-wal and the release
/// of the inhibitor, and calls this for the stretches between them.
pub async fn execute(planned: &[PlannedStep], context: &PlanContext<'_>) -> Vec<StepReport> {
    let mut reports = Vec::new();
    let mut k3s_cgroup = String::new();
    for planned in planned {
        if matches!(planned.step, Step::StopJobs | Step::FlushWal | Step::ReleaseInhibitor) {
            continue;
        }
        let started = Instant::now();
        let deadline = Duration::from_millis(planned.deadline_ms);
        let outcome = if let Some(reason) = &planned.skip {
            Outcome::Skipped { reason: reason.clone() }
        } else {
            let work = run_step(planned.step, context, &mut k3s_cgroup);
            match tokio::time::timeout(deadline, work).await {
                Ok(outcome) => outcome,
                Err(_) => Outcome::TimedOut,
            }
        };
        let report = StepReport {
            step: planned.step,
            outcome,
            duration_ms: started.elapsed().as_millis() as u64,
        };
        log_step(&report, planned.deadline_ms);
        reports.push(report);
    }
    reports
}

async fn run_step(step: Step, context: &PlanContext<'_>, k3s_cgroup: &mut String) -> Outcome {
    match step {
        Step::StopK3s => {
            let Some(k3s) = context.k3s else {
                return skipped("k3s is not enabled");
            };
            // The cgroup path is needed after the stop, to find what stayed.
            if let Ok(state) = k3s.unit_state().await {
                *k3s_cgroup = state.control_group;
            }
            match k3s.stop().await {
                Ok(()) => Outcome::Done,
                Err(err) => Outcome::Failed {
                    reason: err.to_string(),
                },
            }
        }
        Step::CleanLeftovers => {
            let Some(k3s) = context.k3s else {
                return skipped("k3s is not enabled");
            };
            let report = k3s.clean_leftovers(k3s_cgroup).await;
            let clean = report.is_clean();
            let summary = format!(
                "{} terminated, {} killed, {} unmounted",
                report.terminated.len(),
                report.killed.len(),
                report.unmounted.len()
            );
            let failure = format!(
                "survivors: {:?}; unmount failed: {:?}",
                report.survivors, report.unmount_failed
            );
            context.status.update(|s| {
                if let Some(k3s) = s.k3s_status.as_mut() {
                    k3s.last_cleanup = Some(report);
                }
            });
            if clean {
                info!("leftovers: {summary}");
                Outcome::Done
            } else {
                Outcome::Failed {
                    reason: format!("{summary}; {failure}"),
                }
            }
        }
        Step::Sync => match tokio::task::spawn_blocking(nix::unistd::sync).await {
            Ok(()) => Outcome::Done,
            Err(err) => Outcome::Failed {
                reason: err.to_string(),
            },
        },
        Step::UnmountData => {
            let Some(volume) = context.volume else {
                return skipped("volume is not enabled");
            };
            match volume.unmount_checked().await {
                Ok(()) => {
                    context.status.update(|s| {
                        if let Some(v) = s.volume.as_mut() {
                            v.mount_state = MountState::Unmounted;
                        }
                    });
                    Outcome::Done
                }
                Err(VolumeError::Busy { mount_point, holders }) => {
                    let names: Vec<String> = holders.iter().map(|h| h.to_string()).collect();
                    warn!(
                        message_id = ids::UNMOUNT_REFUSED,
                        mount_point = %mount_point.display(),
                        holders = %names.join("; "),
                        "not unmounting {}: still in use by {}",
                        mount_point.display(),
                        names.join("; ")
                    );
                    context.status.update(|s| {
                        if let Some(v) = s.volume.as_mut() {
                            v.mount_state = MountState::Busy {
                                holders: holders.clone(),
                            };
                        }
                    });
                    Outcome::Failed {
                        reason: format!("{} is busy: {}", mount_point.display(), names.join("; ")),
                    }
                }
                Err(err) => Outcome::Failed {
                    reason: err.to_string(),
                },
            }
        }
        Step::StopJobs | Step::FlushWal | Step::ReleaseInhibitor => skipped("run by the supervisor"),
    }
}

fn skipped(reason: &str) -> Outcome {
    Outcome::Skipped { reason: reason.into() }
}

#[cfg(test)]
mod tests;
