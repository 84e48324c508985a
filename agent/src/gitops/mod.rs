//! GitOps pull: the cluster's bootstrap layer (Argo CD, namespaces,
//! projects, the root app-of-apps) is kept in Git and put into K3s's
//! auto-deploying manifests directory, continuously, so that a wiped node
//! reassembles itself. Argo CD keeps reconciling the applications; the agent
//! does not replace it.
//!
//! One pass: fetch (shallow, into `<state_dir>/gitops/repo.git`) -> verify
//! the head's signature (when signers are configured) -> render (plain YAML
//! or a `resources:`-only kustomization) -> plan against the inventory and
//! the directory -> place bootstrap secrets -> write changed files -> prune
//! (guarded) -> record. Any failure before the writes leaves the manifests
//! directory exactly as it was and puts the reason in status and the journal
//! (`MESSAGE_ID` `GITOPS_FAILED`).
//!
//! Passes run one at a time in one task: on a timer (`poll_interval`), at
//! start, after a reload, and on `platform-agent reconcile [--diff]`.

pub mod apply;
pub mod render;
pub mod settings;
pub mod source;
pub mod verify;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use self::apply::{Action, Change};
pub use self::settings::GitopsSettings;
use crate::config::LoadedConfig;
use crate::logging::ids;
use crate::status::{unix_now, Health, StatusHandle};
use crate::store::Store;

/// A fetch that takes longer than this fails the pass (the blocking thread
/// is left to finish on its own; gix also gives up on a stalled transfer).
const FETCH_TIMEOUT: Duration = Duration::from_secs(300);

/// The `gitops` details of the status model (the `gitops` health is the
/// summary). Times are Unix seconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GitopsStatus {
    pub url: String,
    /// "branch main" or "tag v1".
    pub reference: String,
    /// The commit whose files are in the manifests directory.
    pub applied_revision: Option<String>,
    pub applied_at: Option<u64>,
    /// The commit the last fetch found (differs from `applied_revision` when
    /// it could not be applied).
    pub fetched_revision: Option<String>,
    pub last_attempt_at: Option<u64>,
    pub last_success_at: Option<u64>,
    /// "success" or "failure" of the last pass.
    pub last_result: Option<String>,
    /// Why the last pass failed, or why its prune was refused.
    pub last_error: Option<String>,
    /// SHA256 fingerprint of the key that signed the applied commit.
    pub verified_by: Option<String>,
    /// Files the agent wrote and looks after.
    pub files_managed: u64,
    /// Of the last pass: files written (add, update, restore), removed,
    /// kept although gone from Git (prune off), and kept because the prune
    /// guard refused.
    pub files_written: u64,
    pub files_pruned: u64,
    pub files_retained: u64,
    pub files_refused: u64,
    /// Changes the last `reconcile --diff` found.
    pub pending_changes: Option<u64>,
}

/// The answer to `reconcile` (and `reconcile --diff`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileReport {
    pub revision: String,
    pub subject: String,
    /// True for `--diff`: nothing was written.
    pub dry_run: bool,
    pub changes: Vec<Change>,
    pub unchanged: u64,
    pub prune_refused: Option<String>,
    pub verified_by: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum GitopsError {
    #[error("gitops is disabled (gitops.enabled = false)")]
    Disabled,
    #[error("the gitops subsystem is not running")]
    NotRunning,
    #[error("{0}")]
    Failed(String),
}

struct Command {
    diff: bool,
    reply: oneshot::Sender<Result<ReconcileReport, GitopsError>>,
}

/// What the control server holds to ask for a pass.
#[derive(Clone)]
pub struct GitopsHandle {
    tx: mpsc::Sender<Command>,
}

impl GitopsHandle {
    pub async fn reconcile(&self, diff: bool) -> Result<ReconcileReport, GitopsError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command { diff, reply })
            .await
            .map_err(|_| GitopsError::NotRunning)?;
        answer.await.map_err(|_| GitopsError::NotRunning)?
    }
}

pub struct GitopsService {
    store: Store,
    /// For bootstrap secrets kept in a `files` backup.
    backup: Option<Arc<crate::backup::BackupService>>,
    status: StatusHandle,
    config: watch::Receiver<Arc<LoadedConfig>>,
    commands: mpsc::Receiver<Command>,
    /// The last failure logged, so that a repository that stays unreachable
    /// is logged once, not at every poll.
    last_logged_error: Option<String>,
}

impl GitopsService {
    pub fn new(
        store: Store,
        backup: Option<Arc<crate::backup::BackupService>>,
        status: StatusHandle,
        config: watch::Receiver<Arc<LoadedConfig>>,
    ) -> (GitopsService, GitopsHandle) {
        let (tx, commands) = mpsc::channel(8);
        (
            GitopsService {
                store,
                backup,
                status,
                config,
                commands,
                last_logged_error: None,
            },
            GitopsHandle { tx },
        )
    }

    pub async fn run(mut self, cancel: CancellationToken) -> Result<(), String> {
        if let Ok(Some((revision, at))) = load_applied(&self.store).await {
            self.status.update(|s| {
                let g = s.gitops_status.get_or_insert_with(Default::default);
                g.applied_revision = Some(revision);
                g.applied_at = Some(at);
            });
        }
        let mut next_poll = tokio::time::Instant::now();
        loop {
            let (settings, state_dir) = {
                let config = self.config.borrow_and_update();
                (config.settings.gitops.clone(), config.settings.agent.state_dir.clone())
            };
            if !settings.enabled {
                self.status.update(|s| s.gitops = Health::Disabled);
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    changed = self.config.changed() => {
                        if changed.is_err() { return Ok(()) }
                        next_poll = tokio::time::Instant::now();
                    }
                    Some(command) = self.commands.recv() => {
                        let _ = command.reply.send(Err(GitopsError::Disabled));
                    }
                }
                continue;
            }
            self.status.update(|s| {
                if s.gitops == Health::Disabled {
                    s.gitops = Health::Starting;
                }
            });
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep_until(next_poll) => {
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        _ = self.pass(&settings, &state_dir, false) => {}
                    }
                    next_poll = tokio::time::Instant::now() + settings.poll_interval;
                }
                Some(command) = self.commands.recv() => {
                    let result = tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        result = self.pass(&settings, &state_dir, command.diff) => result,
                    };
                    let _ = command.reply.send(result.map_err(GitopsError::Failed));
                    if !command.diff {
                        next_poll = tokio::time::Instant::now() + settings.poll_interval;
                    }
                }
                changed = self.config.changed() => {
                    if changed.is_err() { return Ok(()) }
                    // A reload may change the source: look again now.
                    next_poll = tokio::time::Instant::now();
                }
            }
        }
    }

    /// One pass; updates status and the journal whatever its outcome.
    async fn pass(
        &mut self,
        settings: &GitopsSettings,
        state_dir: &Path,
        diff: bool,
    ) -> Result<ReconcileReport, String> {
        let started = unix_now();
        let result = self.try_pass(settings, state_dir, diff).await;
        let reference = settings.git_ref().describe();
        match &result {
            Ok((report, counts)) if diff => {
                let pending = report.changes.iter().filter(|c| c.action != Action::Retain).count() as u64;
                self.status.update(|s| {
                    let g = s.gitops_status.get_or_insert_with(Default::default);
                    g.url = settings.url.clone();
                    g.reference = reference.clone();
                    g.fetched_revision = Some(report.revision.clone());
                    g.pending_changes = Some(pending);
                    g.files_managed = counts.managed;
                });
            }
            Ok((report, counts)) => {
                let changed = counts.written + counts.pruned > 0;
                let previous = self.status.snapshot().gitops_status.and_then(|g| g.applied_revision);
                if changed || previous.as_deref() != Some(report.revision.as_str()) {
                    info!(
                        message_id = ids::GITOPS_APPLIED,
                        revision = %report.revision,
                        written = counts.written,
                        pruned = counts.pruned,
                        "gitops: applied {} ({}): {} files written, {} removed",
                        short(&report.revision),
                        report.subject,
                        counts.written,
                        counts.pruned
                    );
                }
                if let Some(reason) = &report.prune_refused {
                    if self.last_logged_error.as_deref() != Some(reason.as_str()) {
                        warn!(message_id = ids::GITOPS_PRUNE_REFUSED, revision = %report.revision, "gitops: {reason}");
                    }
                }
                self.last_logged_error = report.prune_refused.clone();
                self.status.update(|s| {
                    s.gitops = match &report.prune_refused {
                        Some(reason) => Health::Degraded { reason: reason.clone() },
                        None => Health::Ok,
                    };
                    let g = s.gitops_status.get_or_insert_with(Default::default);
                    g.url = settings.url.clone();
                    g.reference = reference.clone();
                    g.fetched_revision = Some(report.revision.clone());
                    if g.applied_revision.as_deref() != Some(report.revision.as_str()) || changed {
                        g.applied_at = Some(unix_now());
                    }
                    g.applied_revision = Some(report.revision.clone());
                    g.verified_by = report.verified_by.clone();
                    g.last_attempt_at = Some(started);
                    g.last_success_at = Some(unix_now());
                    g.last_result = Some(
                        if report.prune_refused.is_some() {
                            "failure"
                        } else {
                            "success"
                        }
                        .into(),
                    );
                    g.last_error = report.prune_refused.clone();
                    g.files_managed = counts.managed;
                    g.files_written = counts.written;
                    g.files_pruned = counts.pruned;
                    g.files_retained = counts.retained;
                    g.files_refused = counts.refused;
                    g.pending_changes = Some(0);
                });
            }
            Err(reason) => {
                if self.last_logged_error.as_deref() != Some(reason.as_str()) {
                    warn!(
                        message_id = ids::GITOPS_FAILED,
                        url = %settings.url,
                        "gitops: nothing applied, the manifests directory is left as it was: {reason}"
                    );
                    self.last_logged_error = Some(reason.clone());
                }
                self.status.update(|s| {
                    s.gitops = Health::Failed { reason: reason.clone() };
                    let g = s.gitops_status.get_or_insert_with(Default::default);
                    g.url = settings.url.clone();
                    g.reference = reference.clone();
                    g.last_attempt_at = Some(started);
                    g.last_result = Some("failure".into());
                    g.last_error = Some(reason.clone());
                });
            }
        }
        result.map(|(report, _)| report)
    }

    async fn try_pass(
        &self,
        settings: &GitopsSettings,
        state_dir: &Path,
        diff: bool,
    ) -> Result<(ReconcileReport, Counts), String> {
        let spec = source::FetchSpec {
            url: settings.url.clone(),
            git_ref: settings.git_ref(),
            repo_dir: repo_dir(state_dir),
            repo_subdir: settings.repo_subdir.clone(),
            token: (!settings.token_file.as_os_str().is_empty())
                .then(|| (settings.username.clone(), settings.token_file.clone())),
            ssh: (!settings.ssh_key_file.as_os_str().is_empty())
                .then(|| (settings.ssh_key_file.clone(), settings.known_hosts_file.clone())),
        };
        let fetch = tokio::task::spawn_blocking(move || source::fetch(&spec));
        let snapshot = match tokio::time::timeout(FETCH_TIMEOUT, fetch).await {
            Err(_) => {
                return Err(format!(
                    "fetch timed out after {}",
                    humantime::format_duration(FETCH_TIMEOUT)
                ))
            }
            Ok(Err(err)) => return Err(format!("fetch task failed: {err}")),
            Ok(Ok(Err(err))) => return Err(err.to_string()),
            Ok(Ok(Ok(snapshot))) => snapshot,
        };

        let verified_by = if settings.verify.allowed_signers.is_empty() {
            None
        } else {
            let keys = settings
                .verify
                .allowed_signers
                .iter()
                .map(|s| verify::parse_allowed_signer(s))
                .collect::<Result<Vec<_>, _>>()?;
            let fingerprint = verify::verify_commit(
                &snapshot.revision,
                snapshot.signature.as_deref(),
                &snapshot.signed_payload,
                &keys,
            )
            .map_err(|err| format!("not applied: {err}"))?;
            Some(fingerprint)
        };

        let desired = render::render(&snapshot.files, &settings.file_prefix)
            .map_err(|err| format!("commit {}: {err}", short(&snapshot.revision)))?;
        let dir = settings.manifests_dir.clone();
        let inventory = load_inventory(&self.store, &dir).await.map_err(|e| e.to_string())?;

        if !diff {
            // Before any manifest is written (they may need the secrets).
            self.restore_secrets(settings, state_dir).await?;
        }
        let prune = settings.prune;
        let fraction = settings.prune_max_fraction.0;
        let secrets = settings.bootstrap_secrets.clone();
        let revision = snapshot.revision.clone();
        let managed_before = inventory.len();
        let work = tokio::task::spawn_blocking(move || -> Result<(apply::Plan, Option<apply::Applied>), String> {
            let plan = apply::plan(&desired, &inventory, &dir, prune, fraction);
            if diff {
                return Ok((plan, None));
            }
            // Secrets first: the manifests may need them (sealed-secrets key).
            apply::place_secrets(&secrets).map_err(|e| e.to_string())?;
            let applied = apply::apply(&desired, &plan, &dir).map_err(|e| e.to_string())?;
            Ok((plan, Some(applied)))
        });
        let (plan, applied) = work.await.map_err(|e| format!("apply task failed: {e}"))??;

        let mut counts = Counts {
            managed: managed_before as u64,
            retained: plan.count(Action::Retain) as u64,
            refused: if plan.prune_refused.is_some() {
                plan.count(Action::Retain) as u64
            } else {
                0
            },
            ..Counts::default()
        };
        if let Some(applied) = applied {
            counts.written = applied.written as u64;
            counts.pruned = applied.removed.len() as u64;
            counts.managed = record(&self.store, &settings.manifests_dir, &revision, applied)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok((
            ReconcileReport {
                revision: snapshot.revision,
                subject: snapshot.subject,
                dry_run: diff,
                changes: plan.changes,
                unchanged: plan.unchanged as u64,
                prune_refused: plan.prune_refused,
                verified_by,
            },
            counts,
        ))
    }
}

impl GitopsService {
    /// Bootstrap secrets kept in a `files` backup: restored (newest backup)
    /// into a scratch directory under the state directory and copied into
    /// place, only when the destination is missing.
    async fn restore_secrets(&self, settings: &GitopsSettings, state_dir: &Path) -> Result<(), String> {
        for secret in &settings.bootstrap_secrets {
            if secret.backup_job.is_empty() || secret.destination.exists() {
                continue;
            }
            let what = format!(
                "bootstrap secret {}: from backup job {:?}",
                secret.destination.display(),
                secret.backup_job
            );
            let backup = self
                .backup
                .as_ref()
                .ok_or_else(|| format!("{what}: the backup subsystem is not running"))?;
            let scratch_root = state_dir.join("gitops");
            std::fs::create_dir_all(&scratch_root).map_err(|e| format!("{what}: {e}"))?;
            let scratch = tempfile::Builder::new()
                .prefix("secret-restore-")
                .tempdir_in(&scratch_root)
                .map_err(|e| format!("{what}: {e}"))?;
            let request = crate::backup::RestoreRequest {
                kind: crate::backup::BackupKind::Files,
                job: Some(secret.backup_job.clone()),
                id: None,
                database: None,
                target: Some(scratch.path().display().to_string()),
                force: true,
                no_owner: false,
            };
            backup
                .restore(request, crate::backup::Progress::default())
                .await
                .map_err(|e| format!("{what}: {e}"))?;
            let member = scratch.path().join(&secret.backup_member);
            let content = std::fs::read(&member)
                .map_err(|e| format!("{what}: the backup has no {:?}: {e}", secret.backup_member))?;
            let mode = secret.mode_bits()?;
            crate::fsutil::write_atomic(&secret.destination, &content, mode)
                .map_err(|e| format!("{what}: cannot write: {e}"))?;
            info!(destination = %secret.destination.display(), job = %secret.backup_job, "gitops: bootstrap secret restored from backup");
        }
        Ok(())
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    managed: u64,
    written: u64,
    pruned: u64,
    retained: u64,
    refused: u64,
}

fn short(revision: &str) -> &str {
    &revision[..revision.len().min(12)]
}

fn dir_key(dir: &Path) -> String {
    dir.display().to_string()
}

async fn load_inventory(store: &Store, dir: &Path) -> Result<apply::Inventory, crate::store::StoreError> {
    let dir = dir_key(dir);
    store
        .call("read the gitops inventory", move |conn| {
            let mut statement = conn.prepare("SELECT name, sha256, revision FROM gitops_files WHERE dir = ?1")?;
            let rows = statement.query_map(params![dir], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    apply::InventoryEntry {
                        sha256: row.get(1)?,
                        revision: row.get(2)?,
                    },
                ))
            })?;
            rows.collect::<rusqlite::Result<BTreeMap<_, _>>>()
        })
        .await
}

/// Records what a pass left in the directory; returns how many files the
/// agent now manages there.
async fn record(
    store: &Store,
    dir: &Path,
    revision: &str,
    applied: apply::Applied,
) -> Result<u64, crate::store::StoreError> {
    let dir = dir_key(dir);
    let revision = revision.to_string();
    store
        .call("record the gitops inventory", move |conn| {
            let tx = conn.transaction()?;
            let now = unix_now() as i64;
            for (name, (sha256, source)) in &applied.present {
                tx.execute(
                    "INSERT INTO gitops_files (dir, name, sha256, source, revision, written_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (dir, name) DO UPDATE SET sha256 = excluded.sha256, source = excluded.source,
                         revision = excluded.revision, written_at = excluded.written_at
                     WHERE gitops_files.sha256 != excluded.sha256",
                    params![dir, name, sha256, source, revision, now],
                )?;
            }
            for name in &applied.removed {
                tx.execute(
                    "DELETE FROM gitops_files WHERE dir = ?1 AND name = ?2",
                    params![dir, name],
                )?;
            }
            tx.execute(
                "INSERT INTO gitops_applied (id, revision, applied_at) VALUES (1, ?1, ?2)
                 ON CONFLICT (id) DO UPDATE SET revision = excluded.revision, applied_at = excluded.applied_at
                 WHERE gitops_applied.revision != excluded.revision",
                params![revision, now],
            )?;
            let managed: i64 = tx.query_row(
                "SELECT count(*) FROM gitops_files WHERE dir = ?1",
                params![dir],
                |row| row.get(0),
            )?;
            tx.commit()?;
            Ok(managed as u64)
        })
        .await
}

async fn load_applied(store: &Store) -> Result<Option<(String, u64)>, crate::store::StoreError> {
    store
        .call("read the applied gitops revision", |conn| {
            conn.query_row(
                "SELECT revision, applied_at FROM gitops_applied WHERE id = 1",
                [],
                |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)? as u64)),
            )
            .optional()
        })
        .await
}

/// The bare repository the fetches go into: a cache of the remote, nothing else.
pub fn repo_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("gitops").join("repo.git")
}

/// Human-readable report for the CLI.
pub fn render_report(report: &ReconcileReport) -> String {
    let mut out = format!(
        "{} {} ({})\n",
        if report.dry_run { "would apply" } else { "applied" },
        short(&report.revision),
        report.subject
    );
    if let Some(key) = &report.verified_by {
        out.push_str(&format!("  signed by {key}\n"));
    }
    for change in &report.changes {
        let verb = match (report.dry_run, change.action) {
            (true, Action::Prune) => "would prune",
            (_, action) => action.as_str(),
        };
        match &change.source {
            Some(source) => out.push_str(&format!("  {verb:<11} {}  <- {source}\n", change.file)),
            None => out.push_str(&format!("  {verb:<11} {}\n", change.file)),
        }
    }
    if report.changes.is_empty() {
        out.push_str("  no changes\n");
    }
    out.push_str(&format!("  {} files unchanged\n", report.unchanged));
    if let Some(reason) = &report.prune_refused {
        out.push_str(&format!("  {reason}\n"));
    }
    out
}
