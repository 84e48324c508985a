//! The one status model. The control socket answers `status` from it,
//! `sd_notify STATUS=` is rendered from it, and the metrics exporter reads it;
//! none of them keeps state of its own. Subsystems change it only through
//! [`StatusHandle::update`], which wakes every reader.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Life cycle of the agent itself. Transitions only go forward, except that a
/// reload does not change it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgentState {
    Starting,
    Running,
    Stopping,
    Stopped,
}

impl AgentState {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Starting => "starting",
            AgentState::Running => "running",
            AgentState::Stopping => "stopping",
            AgentState::Stopped => "stopped",
        }
    }

    fn can_become(self, next: AgentState) -> bool {
        use AgentState::*;
        matches!(
            (self, next),
            (Starting, Running) | (Starting, Stopping) | (Running, Stopping) | (Stopping, Stopped)
        ) || self == next
    }
}

/// Health of one part of the node, as operators and alerts want to see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum Health {
    /// Not part of this configuration (or not built yet).
    Disabled,
    Starting,
    Ok,
    Degraded {
        reason: String,
    },
    Failed {
        reason: String,
    },
    Stopped,
}

impl Health {
    pub fn word(&self) -> &'static str {
        match self {
            Health::Disabled => "disabled",
            Health::Starting => "starting",
            Health::Ok => "ok",
            Health::Degraded { .. } => "degraded",
            Health::Failed { .. } => "failed",
            Health::Stopped => "stopped",
        }
    }

    pub fn reason(&self) -> Option<&str> {
        match self {
            Health::Degraded { reason } | Health::Failed { reason } => Some(reason),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub agent: AgentStatus,
    pub config: ConfigStatus,
    pub store: StoreStatus,
    pub control: ControlStatus,
    pub object_store: ObjectStoreStatus,
    /// Sections the domain subsystems fill in as they are configured.
    pub mount: Health,
    pub k3s: Health,
    pub backups: Health,
    pub wal: Health,
    pub gitops: Health,
    pub metrics: MetricsStatus,
    /// Details behind `mount` once a volume is configured.
    pub volume: Option<crate::volume::VolumeStatus>,
    /// Details behind `k3s` once K3s is managed.
    pub k3s_status: Option<crate::k3s::K3sStatus>,
    /// The shutdown plan's steps as last run (by this or the previous agent).
    pub last_shutdown: Vec<crate::shutdown::StepReport>,
    /// One entry per configured backup job; `backups` summarises them.
    #[serde(default)]
    pub backup_jobs: Vec<BackupJobStatus>,
    /// Details behind `gitops` once it is enabled.
    #[serde(default)]
    pub gitops_status: Option<crate::gitops::GitopsStatus>,
    /// Details behind `wal` once WAL archiving is on.
    #[serde(default)]
    pub wal_status: Option<crate::wal::WalStatus>,
}

/// The outcome of a backup job's last run, as the metrics export it
/// (`platform_agent_backup_last_result{kind,result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackupResult {
    Success,
    Failure,
    Running,
}

impl BackupResult {
    pub fn as_str(self) -> &'static str {
        match self {
            BackupResult::Success => "success",
            BackupResult::Failure => "failure",
            BackupResult::Running => "running",
        }
    }
}

/// What operators and the metrics need of one backup job. Times are Unix
/// seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupJobStatus {
    pub job: String,
    /// postgres, vault, k3s, files: the metrics' `kind` label.
    pub kind: String,
    pub schedule: String,
    pub next_run: Option<u64>,
    pub running_since: Option<u64>,
    /// None until the job has run once.
    pub last_result: Option<BackupResult>,
    pub last_run_at: Option<u64>,
    pub last_success_at: Option<u64>,
    /// Duration of the last finished run, whatever its result.
    pub last_duration_ms: Option<u64>,
    /// Bytes stored by the last successful run (all its objects).
    pub last_bytes: Option<u64>,
    pub last_error: Option<String>,
    /// Backups of this job with an object (uploaded or verified).
    pub backups: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsStatus {
    pub health: Health,
    /// The address actually bound (resolves port 0).
    pub listen: String,
    pub scrapes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub state: AgentState,
    pub version: String,
    pub pid: u32,
    /// Unix seconds.
    pub started_at: u64,
    /// How the previous run of the agent ended, from the state store.
    pub previous_run: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigStatus {
    /// Bumped on every successful (re)load.
    pub generation: u64,
    pub files: Vec<String>,
    /// Unix seconds of the last successful load.
    pub loaded_at: u64,
    /// The last reload that was refused; the agent keeps running on the
    /// previous configuration.
    pub last_reload_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStatus {
    pub health: Health,
    pub path: String,
    pub schema_version: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlStatus {
    pub health: Health,
    pub socket: String,
    pub requests_served: u64,
    pub requests_denied: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectStoreStatus {
    pub health: Health,
    pub backend: String,
    pub location: String,
}

impl Status {
    pub fn new(version: &str) -> Self {
        Status {
            agent: AgentStatus {
                state: AgentState::Starting,
                version: version.to_string(),
                pid: std::process::id(),
                started_at: unix_now(),
                previous_run: None,
            },
            config: ConfigStatus {
                generation: 0,
                files: Vec::new(),
                loaded_at: 0,
                last_reload_error: None,
            },
            store: StoreStatus {
                health: Health::Starting,
                path: String::new(),
                schema_version: 0,
            },
            control: ControlStatus {
                health: Health::Starting,
                socket: String::new(),
                requests_served: 0,
                requests_denied: 0,
            },
            object_store: ObjectStoreStatus {
                health: Health::Starting,
                backend: String::new(),
                location: String::new(),
            },
            mount: Health::Disabled,
            k3s: Health::Disabled,
            backups: Health::Disabled,
            wal: Health::Disabled,
            gitops: Health::Disabled,
            metrics: MetricsStatus {
                health: Health::Disabled,
                listen: String::new(),
                scrapes: 0,
            },
            volume: None,
            k3s_status: None,
            last_shutdown: Vec::new(),
            backup_jobs: Vec::new(),
            gitops_status: None,
            wal_status: None,
        }
    }

    /// Named sections with their health, in the order operators read them.
    pub fn sections(&self) -> Vec<(&'static str, &Health)> {
        vec![
            ("store", &self.store.health),
            ("control", &self.control.health),
            ("object_store", &self.object_store.health),
            ("mount", &self.mount),
            ("k3s", &self.k3s),
            ("backups", &self.backups),
            ("wal", &self.wal),
            ("gitops", &self.gitops),
            ("metrics", &self.metrics.health),
        ]
    }

    /// One line for `sd_notify STATUS=` (what `systemctl status` shows). It
    /// starts with the agent's state word so scripts can match on it.
    pub fn summary_line(&self) -> String {
        let mut parts = vec![self.agent.state.as_str().to_string()];
        let mut problems = Vec::new();
        for (name, health) in self.sections() {
            match health {
                Health::Disabled => {}
                Health::Degraded { reason } | Health::Failed { reason } => {
                    problems.push(format!("{name} {}: {reason}", health.word()))
                }
                other => parts.push(format!("{name} {}", other.word())),
            }
        }
        if let Some(err) = &self.config.last_reload_error {
            problems.push(format!("config reload refused: {err}"));
        }
        let mut line = parts.join(", ");
        if !problems.is_empty() {
            line.push_str("; ");
            line.push_str(&problems.join("; "));
        }
        // STATUS= is one line; journald and systemctl cut long ones anyway.
        let line = line.replace('\n', " ");
        if line.len() > 400 {
            let mut cut = 400;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            format!("{}...", &line[..cut])
        } else {
            line
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("agent state cannot go from {from} to {to}")]
pub struct InvalidTransition {
    pub from: &'static str,
    pub to: &'static str,
}

/// Shared, cheap to clone handle on the status model.
#[derive(Clone)]
pub struct StatusHandle {
    tx: watch::Sender<Status>,
}

impl StatusHandle {
    pub fn new(status: Status) -> Self {
        let (tx, _rx) = watch::channel(status);
        StatusHandle { tx }
    }

    pub fn snapshot(&self) -> Status {
        self.tx.borrow().clone()
    }

    /// The agent's state alone, without copying the whole status.
    pub fn agent_state(&self) -> AgentState {
        self.tx.borrow().agent.state
    }

    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.tx.subscribe()
    }

    pub fn update(&self, change: impl FnOnce(&mut Status)) {
        self.tx.send_if_modified(|status| {
            let before = status.clone();
            change(status);
            *status != before
        });
    }

    pub fn set_agent_state(&self, next: AgentState) -> Result<(), InvalidTransition> {
        let mut result = Ok(());
        self.tx.send_if_modified(|status| {
            let current = status.agent.state;
            if !current.can_become(next) {
                result = Err(InvalidTransition {
                    from: current.as_str(),
                    to: next.as_str(),
                });
                return false;
            }
            let changed = current != next;
            status.agent.state = next;
            changed
        });
        result
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_only_moves_forward() {
        let handle = StatusHandle::new(Status::new("0.0.0"));
        handle.set_agent_state(AgentState::Running).unwrap();
        assert!(handle.set_agent_state(AgentState::Starting).is_err());
        handle.set_agent_state(AgentState::Stopping).unwrap();
        assert!(handle.set_agent_state(AgentState::Running).is_err());
        handle.set_agent_state(AgentState::Stopped).unwrap();
        assert_eq!(handle.snapshot().agent.state, AgentState::Stopped);
    }

    #[test]
    fn summary_starts_with_state_and_lists_problems() {
        let mut status = Status::new("0.0.0");
        status.agent.state = AgentState::Running;
        status.store.health = Health::Ok;
        status.object_store.health = Health::Failed {
            reason: "disk full".into(),
        };
        let line = status.summary_line();
        assert!(line.starts_with("running, store ok"), "{line}");
        assert!(line.contains("object_store failed: disk full"), "{line}");
        assert!(!line.contains("k3s"), "disabled sections stay out: {line}");
    }

    #[tokio::test]
    async fn update_wakes_subscribers_only_on_change() {
        let handle = StatusHandle::new(Status::new("0.0.0"));
        let mut rx = handle.subscribe();
        rx.mark_unchanged();
        handle.update(|s| s.mount = Health::Disabled);
        assert!(!rx.has_changed().unwrap());
        handle.update(|s| s.mount = Health::Ok);
        assert!(rx.has_changed().unwrap());
    }
}
