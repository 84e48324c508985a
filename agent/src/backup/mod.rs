//! Backups: PostgreSQL, Vault/OpenBao, the K3s datastore and files, streamed
//! compressed (and encrypted) into the object store, recorded in the
//! catalog, verified, pruned by retention and restorable.
//!
//! - [`settings`]: the `[backup]` configuration.
//! - [`catalog`]: every attempt of every job in the state store.
//! - [`pipeline`]: source -> compress -> encrypt -> object store, and back.
//! - [`source`]: what each kind backs up, test-restores and restores.
//! - [`retention`]: which backups are kept, as one pure function.
//! - `engine`: schedules (tokio-cron-scheduler), runs without overlap,
//!   timeouts, retries with backoff, the status model.
//! - `ops`: `backup verify`, `backup prune`, `restore`.

pub mod catalog;
mod engine;
mod ops;
pub mod pipeline;
pub mod retention;
pub mod settings;
pub mod source;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use catalog::{BackupRecord, BackupState, Catalog};
pub use ops::{RestoreReport, RestoreRequest, VerifyReport};
pub use pipeline::{Progress, ProgressReport};
pub use retention::Decision;
pub use settings::*;

use crate::objstore::ObjectStore;
use crate::status::StatusHandle;
use crate::store::Store;

/// Stable journal MESSAGE_IDs of backup events (beside `logging::ids`;
/// never change a value).
pub mod ids {
    pub const BACKUP_STARTED: &str = "0c8030846f274079944093ebbff70d0c";
    /// Fields RESULT (success, failure), JOB.
    pub const BACKUP_FINISHED: &str = "e193cb561abb4d41a57f56639b2098f4";
    pub const BACKUP_RECOVERED: &str = "6c422ae8de694be88b37c32fc934b325";
    pub const BACKUP_PRUNED: &str = "f7030e02da7244ffb37f5e0d2dc38210";
    pub const RESTORE_FINISHED: &str = "a9a32fdbba0a4d15b0d58e3b084f95ae";
}

/// Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("no backup job named {0:?} in the configuration")]
    UnknownJob(String),
    #[error("no backup with id {0} in the catalog")]
    NotFound(i64),
    #[error("{0}")]
    NothingToRestore(String),
    #[error("{0}")]
    Ambiguous(String),
    #[error("job {job:?} is busy: {what} since {}", format_time(*since_ms))]
    Busy { job: String, what: String, since_ms: i64 },
    #[error("{0}")]
    Refused(String),
    #[error("the agent is stopping")]
    ShuttingDown,
    #[error("catalog: {0}")]
    Catalog(#[from] catalog::CatalogError),
    #[error("job {job:?}: {message}")]
    Failed { job: String, message: String },
}

pub fn format_time(ms: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%SZ").to_string())
        .unwrap_or_else(|| ms.to_string())
}

/// A job (or a restore, or a drill) holding its job's slot.
struct Busy {
    what: String,
    since_ms: i64,
    progress: Progress,
}

pub struct BackupService {
    settings: BackupSettings,
    catalog: Catalog,
    objects: Arc<dyn ObjectStore>,
    status: StatusHandle,
    agent_run: Option<i64>,
    recipients: Vec<age::x25519::Recipient>,
    identities: Arc<Vec<Box<dyn age::Identity + Send + Sync>>>,
    busy: Mutex<HashMap<String, Busy>>,
    permits: Arc<Semaphore>,
    cancel: CancellationToken,
    tasks: TaskTracker,
    k3s_running: Arc<dyn Fn() -> bool + Send + Sync>,
}

/// Releases the job's slot when dropped.
struct Claim {
    service: Arc<BackupService>,
    job: String,
    cancel: CancellationToken,
    progress: Progress,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.service
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.job);
    }
}

impl BackupService {
    /// `objects` must be the store the catalog's keys refer to;
    /// `k3s_running` tells whether K3s is up (a live restore target).
    pub fn new(
        settings: &BackupSettings,
        store: Store,
        objects: Arc<dyn ObjectStore>,
        status: StatusHandle,
        agent_run: Option<i64>,
        k3s_running: Arc<dyn Fn() -> bool + Send + Sync>,
    ) -> Result<Arc<Self>, BackupError> {
        let recipients = settings::load_recipients(settings).map_err(|message| BackupError::Failed {
            job: String::new(),
            message,
        })?;
        let identities = if settings.age_identity_file.as_os_str().is_empty() {
            Vec::new()
        } else {
            age::IdentityFile::from_file(settings.age_identity_file.display().to_string())
                .map_err(|err| err.to_string())
                .and_then(|file| file.into_identities().map_err(|err| err.to_string()))
                .map_err(|message| BackupError::Failed {
                    job: String::new(),
                    message: format!("{}: {message}", settings.age_identity_file.display()),
                })?
        };
        remove_scratch_leftovers(&settings.scratch_dir);
        Ok(Arc::new(BackupService {
            settings: settings.clone(),
            catalog: Catalog::new(store),
            objects,
            status,
            agent_run,
            recipients,
            identities: Arc::new(identities),
            busy: Mutex::new(HashMap::new()),
            permits: Arc::new(Semaphore::new(settings.max_concurrent_jobs.max(1) as usize)),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
            k3s_running,
        }))
    }

    pub fn settings(&self) -> &BackupSettings {
        &self.settings
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    fn job(&self, name: &str) -> Result<&BackupJob, BackupError> {
        self.settings
            .job(name)
            .ok_or_else(|| BackupError::UnknownJob(name.to_string()))
    }

    /// Takes the job's slot: one run, restore or drill per job at a time.
    fn claim(self: &Arc<Self>, job: &str, what: &str, progress: Progress) -> Result<Claim, BackupError> {
        if self.cancel.is_cancelled() {
            return Err(BackupError::ShuttingDown);
        }
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(current) = busy.get(job) {
            return Err(BackupError::Busy {
                job: job.to_string(),
                what: current.what.clone(),
                since_ms: current.since_ms,
            });
        }
        let cancel = self.cancel.child_token();
        busy.insert(
            job.to_string(),
            Busy {
                what: what.to_string(),
                since_ms: now_ms(),
                progress: progress.clone(),
            },
        );
        Ok(Claim {
            service: self.clone(),
            job: job.to_string(),
            cancel,
            progress,
        })
    }

    /// Progress of whatever holds the job's slot.
    pub fn progress_of(&self, job: &str) -> Option<ProgressReport> {
        self.busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(job)
            .map(|b| b.progress.report())
    }

    fn scratch(&self) -> Result<tempfile::TempDir, std::io::Error> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.settings.scratch_dir)?;
        tempfile::Builder::new()
            .prefix("work-")
            .tempdir_in(&self.settings.scratch_dir)
    }

    fn scratch_dir(&self) -> PathBuf {
        self.settings.scratch_dir.clone()
    }

    pub async fn list(&self, job: Option<&str>, limit: u32) -> Result<Vec<BackupRecord>, BackupError> {
        if let Some(job) = job {
            if self.settings.job(job).is_none() && self.catalog.list(Some(job), 1).await?.is_empty() {
                return Err(BackupError::UnknownJob(job.to_string()));
            }
        }
        Ok(self.catalog.list(job, limit.clamp(1, 10_000)).await?)
    }

    pub async fn show(&self, id: i64) -> Result<BackupRecord, BackupError> {
        self.catalog.get(id).await?.ok_or(BackupError::NotFound(id))
    }
}

/// Whatever a previous agent left in the scratch directory (spooled
/// snapshots, datastore copies): removed before any work of this one starts.
fn remove_scratch_leftovers(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        if let Err(err) = removed {
            tracing::warn!(path = %path.display(), error = %err, "cannot remove a leftover scratch file");
        }
    }
}

/// How `backup now` and the scheduler started a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trigger {
    Schedule,
    Manual,
    Missed,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Schedule => "schedule",
            Trigger::Manual => "manual",
            Trigger::Missed => "missed",
        }
    }
}
