//! Continuous WAL archiving: PostgreSQL's `archive_command` is
//! `platform-agent wal-push %p %f`, its `restore_command`
//! `platform-agent wal-fetch %f %p`.
//!
//! PostgreSQL's contract, kept here: `wal-push` exits 0 only once the file is
//! durable (in the object store in `sync` mode; fsync'd in the local spool in
//! `spool` mode, which the daemon then ships); an identical re-archive
//! succeeds without uploading; different content under a name already
//! archived fails, with an alert (`MESSAGE_ID` [`ids::WAL_CONFLICT`]) and a
//! counter in status. A full spool makes `wal-push` fail (PostgreSQL then
//! keeps the WAL in pg_wal and retries) instead of dropping anything.
//!
//! - [`settings`]: the `[wal]` section.
//! - [`names`]: WAL file names, segment arithmetic.
//! - [`archive`]: encode, upload with checksum, re-archive semantics, fetch.
//! - [`catalog`]: the chain in the state store (migration 4).
//! - [`client`]: the `wal-push` and `wal-fetch` commands.
//! - [`spool`]: spool mode's local queue and its shipper.
//! - [`watchdog`]: the gap watchdog and the lag figures in status.
//! - [`receivewal`]: streaming mode, `pg_receivewal` supervised.
//! - [`restore`]: `restore pg --pitr` from a base backup and the archive.

pub mod archive;
pub mod catalog;
pub mod client;
pub mod names;
pub mod receivewal;
pub mod restore;
pub mod settings;
pub mod spool;
pub mod watchdog;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use archive::{Archiver, PushOutcome};
pub use catalog::{WalCatalog, WalRow};
pub use settings::{WalCompression, WalMode, WalSettings, WhenDaemonDown};

use crate::objstore::{ObjectStore, ObjectStoreError};
use crate::status::{unix_now, Health, StatusHandle};
use crate::store::{Store, StoreError};

/// Stable journal MESSAGE_IDs of WAL events (beside `logging::ids`).
pub mod ids {
    /// Different content under a name already archived (fields `SEGMENT`, `KEY`).
    pub const WAL_CONFLICT: &str = "3d4c2f1b8e5a4a7c9f0e6b2d1a8c7e54";
    /// A push failed; PostgreSQL keeps the segment and retries (field `SEGMENT`).
    pub const WAL_PUSH_FAILED: &str = "b7e1c0a94f2d4d6e8a3c5f7b9d1e2a60";
    /// The spool is over `wal.spool_max_bytes`: pushes fail until it drains.
    pub const WAL_SPOOL_FULL: &str = "5a9e3c7d1b2f4e8a9c6d0f1e2b3a4c58";
    /// The watchdog found missing segments in the chain (field `GAPS`).
    pub const WAL_GAP: &str = "c2f8a6e41d3b4c9e8f7a0b1c2d3e4f51";
    /// The watchdog pushed a missing segment again from pg_wal.
    pub const WAL_REPUSHED: &str = "9e4b7a2c6d1f4e3a8b5c0d9e7f6a1b23";
}

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("{0:?} is not a WAL file name (segment, .partial, .history or .backup)")]
    BadName(String),
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not owned by the requesting user (uid {uid})", path.display())]
    NotOwner { path: PathBuf, uid: u32 },
    #[error("{name}: different content is already archived under {key} (archived raw SHA-256 {existing}, this one {new}); refusing to overwrite")]
    Conflict {
        name: String,
        key: String,
        existing: String,
        new: String,
    },
    #[error("{name}: not durable within {seconds}s (wal.push_timeout); PostgreSQL keeps it and retries")]
    Timeout { name: String, seconds: u64 },
    #[error("spool {} holds {bytes} bytes, over wal.spool_max_bytes = {max}: refusing {name} until the daemon has shipped older segments (PostgreSQL keeps it in pg_wal and retries)", dir.display())]
    SpoolFull {
        dir: PathBuf,
        bytes: u64,
        max: u64,
        name: String,
    },
    #[error("{}: {source}", path.display())]
    Spool {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] ObjectStoreError),
    #[error(transparent)]
    Catalog(#[from] StoreError),
    #[error("encoding: {0}")]
    Encode(String),
    #[error("{key}: {message}")]
    Corrupt { key: String, message: String },
    #[error("{0}")]
    Setup(String),
    #[error("WAL archiving is disabled (wal.enabled = false)")]
    Disabled,
    #[error("worker task failed: {0}")]
    Task(String),
}

/// The `wal` section of the status model (socket, metrics, STATUS=).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalStatus {
    pub mode: String,
    pub location: String,
    pub last_archived: Option<String>,
    /// Unix seconds.
    pub last_archived_at: Option<u64>,
    pub archived_total: u64,
    pub already_archived_total: u64,
    pub conflicts_total: u64,
    pub failures_total: u64,
    pub repushed_total: u64,
    /// WAL files deleted because no retained base backup needs them.
    pub deleted_total: u64,
    /// The oldest segment a retained base backup needs (WAL retention).
    pub oldest_needed: Option<String>,
    /// Streaming mode: whether pg_receivewal runs (None: mode off).
    pub receivewal_running: Option<bool>,
    pub receivewal_restarts: u64,
    /// Pushes in flight plus segments waiting in the spool.
    pub queue_segments: u64,
    pub spool_bytes: u64,
    /// Segments PostgreSQL marked `.ready` in pg_wal (not archived yet), and
    /// the age of the oldest, when `wal.pg_wal_dir` is set.
    pub pending_segments: u64,
    pub lag_seconds: u64,
    pub lag_bytes: u64,
    /// Segments missing from the archived chain, per the last watchdog run.
    pub gaps: Vec<String>,
    pub last_error: Option<String>,
}

/// The daemon's side.
pub struct WalService {
    settings: WalSettings,
    archiver: Arc<Archiver>,
    permits: Arc<Semaphore>,
    status: StatusHandle,
    /// One push per name at a time (PostgreSQL's retry, the watchdog and
    /// the shipper may meet on the same segment).
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    in_flight: AtomicU64,
    daemon_uid: u32,
    spool_dir: PathBuf,
    /// Wakes the spool shipper when a file was spooled.
    spooled: tokio::sync::Notify,
    /// Wakes the watchdog early.
    watch_now: tokio::sync::Notify,
    /// Backup jobs of kind pg-basebackup: their retained base backups decide
    /// which WAL may be deleted.
    base_jobs: Vec<String>,
    backup_catalog: crate::backup::Catalog,
    /// `.backup` history files already read (they never change).
    backup_labels: Mutex<HashMap<String, Option<restore::BaseBackupInfo>>>,
}

impl WalService {
    pub fn new(
        settings: &crate::config::Settings,
        store: Store,
        objects: Arc<dyn ObjectStore>,
        status: StatusHandle,
    ) -> Result<Arc<Self>, WalError> {
        let wal = settings.wal.clone();
        let archiver = Archiver::new(
            &wal,
            &settings.backup,
            objects.clone(),
            Some(WalCatalog::new(store.clone())),
            true,
        )?;
        let base_jobs = settings
            .backup
            .jobs
            .iter()
            .filter(|j| j.kind == crate::backup::BackupKind::PgBasebackup)
            .map(|j| j.name.clone())
            .collect();
        let spool_dir = wal.spool_dir(&settings.agent.state_dir);
        if wal.mode == WalMode::Spool {
            spool::prepare(&spool_dir)?;
        }
        status.update(|s| {
            s.wal = Health::Ok;
            s.wal_status = Some(WalStatus {
                mode: wal.mode.as_str().into(),
                location: format!("{} under {}/", objects.describe(), archiver.prefix),
                ..Default::default()
            });
        });
        Ok(Arc::new(WalService {
            permits: Arc::new(Semaphore::new(wal.upload_parallelism.max(1) as usize)),
            settings: wal,
            archiver: Arc::new(archiver),
            status,
            locks: Mutex::new(HashMap::new()),
            in_flight: AtomicU64::new(0),
            daemon_uid: nix::unistd::geteuid().as_raw(),
            spool_dir,
            spooled: tokio::sync::Notify::new(),
            watch_now: tokio::sync::Notify::new(),
            base_jobs,
            backup_catalog: crate::backup::Catalog::new(store),
            backup_labels: Mutex::new(HashMap::new()),
        }))
    }

    pub fn settings(&self) -> &WalSettings {
        &self.settings
    }

    pub fn archiver(&self) -> &Arc<Archiver> {
        &self.archiver
    }

    fn lock_for(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        // Forget locks nobody holds, so the map stays small.
        locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        locks.entry(name.to_string()).or_default().clone()
    }

    /// A `wal-push` over the socket. `peer_uid` is the client's uid: anyone
    /// but root and the agent's own user may push only files they own.
    pub async fn push_request(&self, path: &Path, name: &str, peer_uid: u32) -> Result<PushOutcome, WalError> {
        if !path.is_absolute() {
            return Err(WalError::Read {
                path: path.to_path_buf(),
                source: std::io::Error::other("wal-push sends absolute paths"),
            });
        }
        let owner = (peer_uid != 0 && peer_uid != self.daemon_uid).then_some(peer_uid);
        let result = match self.settings.mode {
            WalMode::Sync => self.push_file(path, name, owner).await,
            WalMode::Spool => self.spool_file(path, name, owner).await,
        };
        self.account(name, &result);
        result
    }

    /// Reads and archives one file now, bounded by the upload permits and
    /// `push_timeout`.
    async fn push_file(&self, path: &Path, name: &str, owner: Option<u32>) -> Result<PushOutcome, WalError> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let result = tokio::time::timeout(self.settings.push_timeout, async {
            let lock = self.lock_for(name);
            let _held = lock.lock().await;
            let _permit = self
                .permits
                .acquire()
                .await
                .map_err(|e| WalError::Task(e.to_string()))?;
            let (path, name) = (path.to_path_buf(), name.to_string());
            let raw = tokio::task::spawn_blocking(move || archive::read_raw(&path, &name, owner))
                .await
                .map_err(|e| WalError::Task(e.to_string()))??;
            self.archiver.push(raw).await.map(|(outcome, _)| outcome)
        })
        .await
        .unwrap_or_else(|_| {
            Err(WalError::Timeout {
                name: name.to_string(),
                seconds: self.settings.push_timeout.as_secs(),
            })
        });
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        result
    }

    /// Updates status and logs the outcome of one push.
    fn account(&self, name: &str, result: &Result<PushOutcome, WalError>) {
        match result {
            Ok(outcome) => tracing::debug!(segment = name, outcome = outcome.as_str(), "WAL file pushed"),
            Err(err @ WalError::Conflict { key, .. }) => {
                error!(message_id = ids::WAL_CONFLICT, segment = name, key = %key, "{err}")
            }
            Err(err @ WalError::SpoolFull { .. }) => {
                error!(message_id = ids::WAL_SPOOL_FULL, segment = name, "{err}")
            }
            Err(err) => warn!(
                message_id = ids::WAL_PUSH_FAILED,
                segment = name,
                "WAL push failed: {err}"
            ),
        }
        let queue = self.in_flight.load(Ordering::Relaxed);
        self.status.update(|s| {
            let Some(wal) = s.wal_status.as_mut() else { return };
            wal.queue_segments = queue + spool::queued_count(&self.spool_dir, self.settings.mode);
            match result {
                Ok(PushOutcome::Archived) => {
                    wal.archived_total += 1;
                    wal.last_archived = Some(name.to_string());
                    wal.last_archived_at = Some(unix_now());
                }
                Ok(PushOutcome::AlreadyArchived) => wal.already_archived_total += 1,
                Ok(PushOutcome::Spooled) => {}
                Err(err) => {
                    if matches!(err, WalError::Conflict { .. }) {
                        wal.conflicts_total += 1;
                    } else {
                        wal.failures_total += 1;
                    }
                    wal.last_error = Some(err.to_string());
                }
            }
            s.wal = health_of(wal);
        });
    }

    /// Ships the spool (spool mode) and runs the gap watchdog until
    /// cancelled.
    /// The shutdown plan's flush-wal: returns once no push is in flight and,
    /// in spool mode, the spool is shipped (the shipper goes on until the
    /// service is cancelled, after this). The plan bounds the wait.
    pub async fn flush(&self) {
        while self.in_flight.load(Ordering::Relaxed) + spool::queued_count(&self.spool_dir, self.settings.mode) > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    pub async fn run(self: Arc<Self>, cancel: CancellationToken) -> Result<(), String> {
        info!(mode = self.settings.mode.as_str(), "WAL archiving on");
        let mut tasks = tokio::task::JoinSet::new();
        if self.settings.mode == WalMode::Spool {
            let (me, cancel) = (self.clone(), cancel.clone());
            tasks.spawn(async move { me.ship_spool(cancel).await });
        }
        {
            let (me, cancel) = (self.clone(), cancel.clone());
            tasks.spawn(async move { me.watch(cancel).await });
        }
        if self.settings.receivewal.enabled {
            let (me, cancel) = (self.clone(), cancel.clone());
            tasks.spawn(async move { me.stream(cancel).await });
        }
        while tasks.join_next().await.is_some() {}
        // Pushes are served through the control socket, not by these tasks:
        // with none of them configured (sync mode, watchdog_interval = "0s")
        // the service still lives until the agent stops.
        cancel.cancelled().await;
        Ok(())
    }
}

/// Degraded while anything needs an operator: conflicts, gaps, the last
/// push failing.
fn health_of(wal: &WalStatus) -> Health {
    if wal.conflicts_total > 0 {
        Health::Degraded {
            reason: format!(
                "{} WAL conflict(s): different content under an archived name",
                wal.conflicts_total
            ),
        }
    } else if !wal.gaps.is_empty() {
        Health::Degraded {
            reason: format!("{} segment(s) missing from the archive", wal.gaps.len()),
        }
    } else {
        Health::Ok
    }
}
