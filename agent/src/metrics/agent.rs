//! The agent's own metrics, all derived from one status snapshot: this is
//! the one place where a subsystem's status becomes metrics.
//!
//! # Metric names (a contract)
//!
//! The dashboard (`packaging/monitoring/grafana-dashboard.json`) and the
//! alert rules (`packaging/monitoring/prometheus-rules.yaml`) use these
//! names; the ones marked *later* are added here by the issue that adds the
//! status they come from, under exactly these names, labels and types.
//! "One series per state" families carry value 1 on the current state's
//! series and 0 on the others (the kube-state-metrics idiom), so alerts can
//! match a state without knowing the others.
//!
//! | metric | type | labels | meaning |
//! | --- | --- | --- | --- |
//! | `platform_agent_build_info` | gauge | `version`, `arch` | always 1 |
//! | `platform_agent_up` | gauge | | 1 while the agent's state is `running` |
//! | `platform_agent_state` | gauge | `state` | one series per agent state |
//! | `platform_agent_start_time_seconds` | gauge | | Unix time the agent started |
//! | `platform_agent_config_generation` | gauge | | bumped by every successful (re)load |
//! | `platform_agent_config_last_reload_success_timestamp_seconds` | gauge | | Unix time of the last successful load |
//! | `platform_agent_config_reload_failed` | gauge | | 1 while the last reload was refused |
//! | `platform_agent_subsystem_health` | gauge | `subsystem`, `state` | one series per state (`disabled`, `starting`, `ok`, `degraded`, `failed`, `stopped`) |
//! | `platform_agent_control_requests_total` | counter | | control requests served |
//! | `platform_agent_control_requests_denied_total` | counter | | control requests refused for want of permission |
//! | `platform_agent_metrics_scrapes_total` | counter | | scrapes answered before this one |
//! | `platform_agent_data_mounted` | gauge | | *later* (volume): 1 while `/data` is mounted |
//! | `platform_agent_data_identity_ok` | gauge | | *later* (volume): 1 while the mounted `/data` is the expected filesystem |
//! | `platform_agent_k3s_ready_tier` | gauge | | *later* (K3s): 0 stopped, 1 unit active, 2 API `/readyz` answers, 3 node Ready |
//! | `platform_agent_backup_last_success_timestamp_seconds` | gauge | `kind` | *later* (backups): per `postgres`, `vault`, `k3s` |
//! | `platform_agent_backup_last_duration_seconds` | gauge | `kind` | *later*: duration of the last run, whatever its result |
//! | `platform_agent_backup_last_bytes` | gauge | `kind` | *later*: bytes uploaded by the last successful run |
//! | `platform_agent_backup_last_result` | gauge | `kind`, `result` | *later*: one series per `success`, `failure`, `running` |
//! | `platform_agent_wal_archive_lag_seconds` | gauge | | (WAL, with `wal.pg_wal_dir`): age of the oldest segment marked ready but not archived (0 when none) |
//! | `platform_agent_wal_archive_lag_bytes` | gauge | | WAL bytes finished but not archived |
//! | `platform_agent_wal_queue_segments` | gauge | | segments waiting to be archived (in flight, spooled, ready in pg_wal) |
//! | `platform_agent_wal_spool_bytes` | gauge | | bytes in the spool (spool mode) |
//! | `platform_agent_wal_gap_segments` | gauge | | segments missing from the archived chain |
//! | `platform_agent_wal_last_archived_timestamp_seconds` | gauge | | Unix time of the last archived segment |
//! | `platform_agent_wal_archived_total`, `_conflicts_total`, `_failures_total`, `_repushed_total` | counter | | uploads, refused re-archives with different content, failed pushes, watchdog re-pushes |
//! | `platform_agent_gitops_revision_info` | gauge | `revision` | *later* (GitOps): 1 for the revision last applied |
//! | `platform_agent_gitops_last_result` | gauge | `result` | *later*: one series per `success`, `failure` of the last reconcile |
//! | `platform_agent_gitops_last_reconcile_timestamp_seconds` | gauge | | *later*: Unix time of the last reconcile |
//! | `platform_agent_gitops_last_success_timestamp_seconds` | gauge | | Unix time of the last pass that applied its revision |
//! | `platform_agent_gitops_files_managed` | gauge | | files the agent wrote into the manifests directory |
//! | `platform_agent_gitops_prune_refused_files` | gauge | | files the prune guard kept in the last pass |
//! | `platform_agent_shutdown_step_duration_seconds` | gauge | `step` | *later* (shutdown): each step of the last orderly shutdown, from the state store |

use super::encode::{Encoder, MetricType};
use crate::status::{AgentState, Status};

const HEALTH_STATES: [&str; 6] = ["disabled", "starting", "ok", "degraded", "failed", "stopped"];
const AGENT_STATES: [AgentState; 4] = [
    AgentState::Starting,
    AgentState::Running,
    AgentState::Stopping,
    AgentState::Stopped,
];

pub fn encode(status: &Status, out: &mut Encoder) {
    out.family(
        "platform_agent_build_info",
        "The agent's version; always 1.",
        MetricType::Gauge,
    );
    out.sample(
        "platform_agent_build_info",
        &[("version", &status.agent.version), ("arch", std::env::consts::ARCH)],
        1.0,
    );
    out.single(
        "platform_agent_up",
        "1 while the agent is running (not starting or stopping).",
        MetricType::Gauge,
        bool_value(status.agent.state == AgentState::Running),
    );
    out.family(
        "platform_agent_state",
        "The agent's life-cycle state, one series per state.",
        MetricType::Gauge,
    );
    for state in AGENT_STATES {
        out.sample(
            "platform_agent_state",
            &[("state", state.as_str())],
            bool_value(status.agent.state == state),
        );
    }
    out.single(
        "platform_agent_start_time_seconds",
        "Unix time the agent started.",
        MetricType::Gauge,
        status.agent.started_at as f64,
    );

    out.single(
        "platform_agent_config_generation",
        "Generation of the configuration in force; bumped by every successful (re)load.",
        MetricType::Gauge,
        status.config.generation as f64,
    );
    out.single(
        "platform_agent_config_last_reload_success_timestamp_seconds",
        "Unix time the configuration in force was loaded.",
        MetricType::Gauge,
        status.config.loaded_at as f64,
    );
    out.single(
        "platform_agent_config_reload_failed",
        "1 while the last reload was refused (the agent runs on the previous configuration).",
        MetricType::Gauge,
        bool_value(status.config.last_reload_error.is_some()),
    );

    out.family(
        "platform_agent_subsystem_health",
        "Health of each part of the node the agent looks after, one series per state.",
        MetricType::Gauge,
    );
    for (subsystem, health) in status.sections() {
        let current = health.word();
        for state in HEALTH_STATES {
            out.sample(
                "platform_agent_subsystem_health",
                &[("subsystem", subsystem), ("state", state)],
                bool_value(current == state),
            );
        }
    }

    out.single(
        "platform_agent_control_requests_total",
        "Requests served on the control socket.",
        MetricType::Counter,
        status.control.requests_served as f64,
    );
    out.single(
        "platform_agent_control_requests_denied_total",
        "Control requests refused because the peer may not make them.",
        MetricType::Counter,
        status.control.requests_denied as f64,
    );
    out.single(
        "platform_agent_metrics_scrapes_total",
        "Scrapes of this endpoint answered before this one.",
        MetricType::Counter,
        status.metrics.scrapes as f64,
    );

    if let Some(wal) = &status.wal_status {
        encode_wal(wal, out);
    }

    // The volume, K3s, backup, WAL, GitOps and shutdown subsystems add their
    // families here, from their status sections, under the names listed in
    // the module documentation.
    encode_gitops(status, out);
}

fn encode_gitops(status: &Status, out: &mut Encoder) {
    let Some(gitops) = &status.gitops_status else {
        return;
    };
    if let Some(revision) = &gitops.applied_revision {
        out.family(
            "platform_agent_gitops_revision_info",
            "The Git revision whose files are in K3s's manifests directory; always 1.",
            MetricType::Gauge,
        );
        out.sample("platform_agent_gitops_revision_info", &[("revision", revision)], 1.0);
    }
    if let Some(result) = &gitops.last_result {
        out.family(
            "platform_agent_gitops_last_result",
            "Result of the last GitOps pass, one series per result.",
            MetricType::Gauge,
        );
        for candidate in ["success", "failure"] {
            out.sample(
                "platform_agent_gitops_last_result",
                &[("result", candidate)],
                bool_value(result == candidate),
            );
        }
    }
    if let Some(at) = gitops.last_attempt_at {
        out.single(
            "platform_agent_gitops_last_reconcile_timestamp_seconds",
            "Unix time of the last GitOps pass, whatever its result.",
            MetricType::Gauge,
            at as f64,
        );
    }
    if let Some(at) = gitops.last_success_at {
        out.single(
            "platform_agent_gitops_last_success_timestamp_seconds",
            "Unix time of the last GitOps pass that applied its revision.",
            MetricType::Gauge,
            at as f64,
        );
    }
    out.single(
        "platform_agent_gitops_files_managed",
        "Files the agent wrote into the manifests directory and looks after.",
        MetricType::Gauge,
        gitops.files_managed as f64,
    );
    out.single(
        "platform_agent_gitops_prune_refused_files",
        "Files gone from Git that the prune guard kept in the last pass.",
        MetricType::Gauge,
        gitops.files_refused as f64,
    );
}

/// The WAL archiver's families, present while archiving is on.
fn encode_wal(wal: &crate::wal::WalStatus, out: &mut Encoder) {
    let gauges: [(&str, &str, f64); 6] = [
        (
            "platform_agent_wal_archive_lag_seconds",
            "Age of the oldest WAL segment PostgreSQL marked ready but not yet archived (0 when none).",
            wal.lag_seconds as f64,
        ),
        (
            "platform_agent_wal_archive_lag_bytes",
            "WAL bytes PostgreSQL finished but not yet archived.",
            wal.lag_bytes as f64,
        ),
        (
            "platform_agent_wal_queue_segments",
            "WAL segments waiting to be archived: pushes in flight, spooled, and ready in pg_wal.",
            (wal.queue_segments + wal.pending_segments) as f64,
        ),
        (
            "platform_agent_wal_spool_bytes",
            "Bytes in the WAL spool (spool mode).",
            wal.spool_bytes as f64,
        ),
        (
            "platform_agent_wal_gap_segments",
            "Segments missing from the archived WAL chain at the last watchdog run.",
            wal.gaps.len() as f64,
        ),
        (
            "platform_agent_wal_last_archived_timestamp_seconds",
            "Unix time the last WAL segment was archived (0 before the first).",
            wal.last_archived_at.unwrap_or(0) as f64,
        ),
    ];
    for (name, help, value) in gauges {
        out.single(name, help, MetricType::Gauge, value);
    }
    let counters: [(&str, &str, u64); 4] = [
        (
            "platform_agent_wal_archived_total",
            "WAL files uploaded since the agent started.",
            wal.archived_total,
        ),
        (
            "platform_agent_wal_conflicts_total",
            "Pushes refused because different content is archived under the same name.",
            wal.conflicts_total,
        ),
        (
            "platform_agent_wal_failures_total",
            "Pushes that failed (PostgreSQL keeps the WAL and retries).",
            wal.failures_total,
        ),
        (
            "platform_agent_wal_repushed_total",
            "Missing segments the watchdog pushed again from pg_wal.",
            wal.repushed_total,
        ),
    ];
    for (name, help, value) in counters {
        out.single(name, help, MetricType::Counter, value as f64);
    }
}

fn bool_value(condition: bool) -> f64 {
    if condition {
        1.0
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::encode::Format;
    use crate::metrics::exposition;
    use crate::status::Health;

    fn families(status: &Status) -> Vec<exposition::Family> {
        let mut out = Encoder::new(Format::Text);
        encode(status, &mut out);
        exposition::parse(std::str::from_utf8(out.as_bytes()).unwrap()).unwrap()
    }

    fn value(families: &[exposition::Family], name: &str, labels: &[(&str, &str)]) -> f64 {
        let family = families
            .iter()
            .find(|f| f.name == name)
            .unwrap_or_else(|| panic!("no {name}"));
        family
            .samples
            .iter()
            .find(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
            })
            .unwrap_or_else(|| panic!("no {name}{labels:?}"))
            .value
    }

    #[test]
    fn status_becomes_one_series_per_state() {
        let mut status = Status::new("1.2.3");
        status.agent.state = AgentState::Running;
        status.store.health = Health::Ok;
        status.object_store.health = Health::Failed { reason: "x".into() };
        status.config.generation = 4;
        status.config.last_reload_error = Some("bad".into());
        status.control.requests_served = 7;
        let families = families(&status);
        assert_eq!(
            value(&families, "platform_agent_build_info", &[("version", "1.2.3")]),
            1.0
        );
        assert_eq!(value(&families, "platform_agent_up", &[]), 1.0);
        assert_eq!(value(&families, "platform_agent_state", &[("state", "running")]), 1.0);
        assert_eq!(value(&families, "platform_agent_state", &[("state", "starting")]), 0.0);
        assert_eq!(value(&families, "platform_agent_config_generation", &[]), 4.0);
        assert_eq!(value(&families, "platform_agent_config_reload_failed", &[]), 1.0);
        assert_eq!(value(&families, "platform_agent_control_requests_total", &[]), 7.0);
        let health = |subsystem, state| {
            value(
                &families,
                "platform_agent_subsystem_health",
                &[("subsystem", subsystem), ("state", state)],
            )
        };
        assert_eq!(health("store", "ok"), 1.0);
        assert_eq!(health("store", "failed"), 0.0);
        assert_eq!(health("object_store", "failed"), 1.0);
        assert_eq!(health("k3s", "disabled"), 1.0);
        let per_subsystem = families
            .iter()
            .find(|f| f.name == "platform_agent_subsystem_health")
            .unwrap()
            .samples
            .iter()
            .filter(|s| s.labels[0].1 == "mount")
            .map(|s| s.value)
            .sum::<f64>();
        assert_eq!(per_subsystem, 1.0, "exactly one state is current");
    }

    #[test]
    fn gitops_status_becomes_its_families() {
        let mut status = Status::new("1.2.3");
        assert!(!families(&status)
            .iter()
            .any(|f| f.name.starts_with("platform_agent_gitops_")));
        status.gitops_status = Some(crate::gitops::GitopsStatus {
            applied_revision: Some("abc123".into()),
            last_attempt_at: Some(100),
            last_success_at: Some(90),
            last_result: Some("failure".into()),
            files_managed: 4,
            files_refused: 3,
            ..Default::default()
        });
        let families = families(&status);
        assert_eq!(
            value(
                &families,
                "platform_agent_gitops_revision_info",
                &[("revision", "abc123")]
            ),
            1.0
        );
        assert_eq!(
            value(&families, "platform_agent_gitops_last_result", &[("result", "failure")]),
            1.0
        );
        assert_eq!(
            value(&families, "platform_agent_gitops_last_result", &[("result", "success")]),
            0.0
        );
        assert_eq!(
            value(&families, "platform_agent_gitops_last_reconcile_timestamp_seconds", &[]),
            100.0
        );
        assert_eq!(
            value(&families, "platform_agent_gitops_last_success_timestamp_seconds", &[]),
            90.0
        );
        assert_eq!(value(&families, "platform_agent_gitops_files_managed", &[]), 4.0);
        assert_eq!(value(&families, "platform_agent_gitops_prune_refused_files", &[]), 3.0);
    }
}
