//! The backup catalog in the state store: every attempt of every job, one
//! row per object it tried to store, with its state, size and checksums.
//! States move forward only: running -> uploaded -> verified, any of them ->
//! failed, uploaded/verified -> pruned; [`BackupState::can_become`] is the
//! one place that says so and every update goes through it.

use async_trait::async_trait;
use rusqlite::{params, OptionalExtension, Row};
use serde::{Deserialize, Serialize};

use crate::objstore::{PendingUpload, UploadJournal};
use crate::store::{Store, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackupState {
    /// Being produced and uploaded.
    Running,
    /// Complete under its final key, SHA-256 recorded.
    Uploaded,
    /// Read back from the object store and its SHA-256 matched.
    Verified,
    Failed,
    /// Deleted by retention.
    Pruned,
}

impl BackupState {
    pub fn as_str(self) -> &'static str {
        match self {
            BackupState::Running => "running",
            BackupState::Uploaded => "uploaded",
            BackupState::Verified => "verified",
            BackupState::Failed => "failed",
            BackupState::Pruned => "pruned",
        }
    }

    pub fn parse(word: &str) -> BackupState {
        match word {
            "running" => BackupState::Running,
            "uploaded" => BackupState::Uploaded,
            "verified" => BackupState::Verified,
            "pruned" => BackupState::Pruned,
            _ => BackupState::Failed,
        }
    }

    /// An object exists for it and it counts as a backup.
    pub fn is_success(self) -> bool {
        matches!(self, BackupState::Uploaded | BackupState::Verified)
    }

    pub fn can_become(self, next: BackupState) -> bool {
        use BackupState::*;
        matches!(
            (self, next),
            (Running, Uploaded | Failed)
                | (Uploaded, Verified | Failed | Pruned)
                | (Verified, Verified | Failed | Pruned)
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupRecord {
    pub id: i64,
    /// Id of the first row of the job run this attempt belongs to.
    pub batch: i64,
    pub job: String,
    pub kind: String,
    /// Database name, or what the kind backs up ("raft", "sqlite", "files").
    pub target: String,
    /// "schedule", "manual", "missed", "retry".
    pub trigger: String,
    pub attempt: u32,
    pub state: BackupState,
    pub key: Option<String>,
    pub started_ms: i64,
    pub finished_ms: Option<i64>,
    /// Bytes stored (after compression and encryption).
    pub bytes: Option<u64>,
    /// Bytes the source produced.
    pub raw_bytes: Option<u64>,
    pub sha256: Option<String>,
    pub raw_sha256: Option<String>,
    pub compression: String,
    pub encryption: String,
    pub error: Option<String>,
    pub verified_ms: Option<i64>,
    pub tested_ms: Option<i64>,
    pub test_result: Option<String>,
    pub pruned_ms: Option<i64>,
}

impl BackupRecord {
    pub fn duration_ms(&self) -> Option<i64> {
        self.finished_ms.map(|f| f - self.started_ms)
    }
}

/// A new attempt, before anything is produced.
pub struct NewRun<'a> {
    pub batch: Option<i64>,
    pub job: &'a str,
    pub kind: &'a str,
    pub target: &'a str,
    pub trigger: &'a str,
    pub attempt: u32,
    pub agent_run: Option<i64>,
    pub compression: &'a str,
    pub encryption: &'a str,
}

/// What a finished upload recorded.
#[derive(Debug, Clone)]
pub struct Uploaded {
    pub key: String,
    pub bytes: u64,
    pub raw_bytes: u64,
    pub sha256: String,
    pub raw_sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("backup {id}: cannot go from {from} to {to}")]
    Transition {
        id: i64,
        from: &'static str,
        to: &'static str,
    },
    #[error("no backup with id {0}")]
    NotFound(i64),
}

const COLUMNS: &str = "id, batch, job, kind, target, trigger, attempt, state, key, started_ms, finished_ms, bytes, raw_bytes, sha256, raw_sha256, compression, encryption, error, verified_ms, tested_ms, test_result, pruned_ms";

fn record(row: &Row<'_>) -> rusqlite::Result<BackupRecord> {
    let state: String = row.get(7)?;
    Ok(BackupRecord {
        id: row.get(0)?,
        batch: row.get(1)?,
        job: row.get(2)?,
        kind: row.get(3)?,
        target: row.get(4)?,
        trigger: row.get(5)?,
        attempt: row.get(6)?,
        state: BackupState::parse(&state),
        key: row.get(8)?,
        started_ms: row.get(9)?,
        finished_ms: row.get(10)?,
        bytes: row.get::<_, Option<i64>>(11)?.map(|b| b as u64),
        raw_bytes: row.get::<_, Option<i64>>(12)?.map(|b| b as u64),
        sha256: row.get(13)?,
        raw_sha256: row.get(14)?,
        compression: row.get(15)?,
        encryption: row.get(16)?,
        error: row.get(17)?,
        verified_ms: row.get(18)?,
        tested_ms: row.get(19)?,
        test_result: row.get(20)?,
        pruned_ms: row.get(21)?,
    })
}

#[derive(Clone)]
pub struct Catalog {
    store: Store,
}

impl Catalog {
    pub fn new(store: Store) -> Self {
        Catalog { store }
    }

    pub async fn begin(&self, run: NewRun<'_>) -> Result<BackupRecord, CatalogError> {
        let (batch, job, kind, target, trigger, attempt, agent_run, compression, encryption) = (
            run.batch,
            run.job.to_string(),
            run.kind.to_string(),
            run.target.to_string(),
            run.trigger.to_string(),
            run.attempt,
            run.agent_run,
            run.compression.to_string(),
            run.encryption.to_string(),
        );
        let now = super::now_ms();
        let id = self
            .store
            .call("record backup start", move |conn| {
                let tx = conn.transaction()?;
                tx.execute(
                    "INSERT INTO backup_runs (batch, job, kind, target, trigger, attempt, agent_run, state, started_ms, compression, encryption)
                     VALUES (coalesce(?1, 0), ?2, ?3, ?4, ?5, ?6, ?7, 'running', ?8, ?9, ?10)",
                    params![batch, job, kind, target, trigger, attempt, agent_run, now, compression, encryption],
                )?;
                let id = tx.last_insert_rowid();
                if batch.is_none() {
                    tx.execute("UPDATE backup_runs SET batch = id WHERE id = ?1", params![id])?;
                }
                tx.commit()?;
                Ok(id)
            })
            .await?;
        self.get(id).await?.ok_or(CatalogError::NotFound(id))
    }

    pub async fn set_key(&self, id: i64, key: &str) -> Result<(), CatalogError> {
        let key = key.to_string();
        self.store
            .call("record backup key", move |conn| {
                conn.execute("UPDATE backup_runs SET key = ?1 WHERE id = ?2", params![key, id])
                    .map(drop)
            })
            .await?;
        Ok(())
    }

    async fn transition(
        &self,
        id: i64,
        next: BackupState,
        update: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<()> + Send + 'static,
    ) -> Result<(), CatalogError> {
        let result = self
            .store
            .call("update backup state", move |conn| {
                let tx = conn.transaction()?;
                let current: Option<String> = tx
                    .query_row("SELECT state FROM backup_runs WHERE id = ?1", params![id], |r| r.get(0))
                    .optional()?;
                let Some(current) = current else {
                    return Ok(Err(CatalogError::NotFound(id)));
                };
                let current = BackupState::parse(&current);
                if !current.can_become(next) {
                    return Ok(Err(CatalogError::Transition {
                        id,
                        from: current.as_str(),
                        to: next.as_str(),
                    }));
                }
                tx.execute(
                    "UPDATE backup_runs SET state = ?1 WHERE id = ?2",
                    params![next.as_str(), id],
                )?;
                update(&tx)?;
                tx.commit()?;
                Ok(Ok(()))
            })
            .await?;
        result
    }

    pub async fn mark_uploaded(&self, id: i64, done: Uploaded) -> Result<(), CatalogError> {
        let now = super::now_ms();
        self.transition(id, BackupState::Uploaded, move |tx| {
            tx.execute(
                "UPDATE backup_runs SET key = ?1, bytes = ?2, raw_bytes = ?3, sha256 = ?4, raw_sha256 = ?5, finished_ms = ?6 WHERE id = ?7",
                params![done.key, done.bytes as i64, done.raw_bytes as i64, done.sha256, done.raw_sha256, now, id],
            )
            .map(drop)
        })
        .await
    }

    pub async fn mark_verified(&self, id: i64) -> Result<(), CatalogError> {
        let now = super::now_ms();
        self.transition(id, BackupState::Verified, move |tx| {
            tx.execute(
                "UPDATE backup_runs SET verified_ms = ?1, finished_ms = coalesce(finished_ms, ?1) WHERE id = ?2",
                params![now, id],
            )
            .map(drop)
        })
        .await
    }

    pub async fn mark_failed(&self, id: i64, error: &str) -> Result<(), CatalogError> {
        let now = super::now_ms();
        let error = error.to_string();
        self.transition(id, BackupState::Failed, move |tx| {
            tx.execute(
                "UPDATE backup_runs SET error = ?1, finished_ms = coalesce(finished_ms, ?2) WHERE id = ?3",
                params![error, now, id],
            )
            .map(drop)
        })
        .await
    }

    pub async fn mark_pruned(&self, id: i64) -> Result<(), CatalogError> {
        let now = super::now_ms();
        self.transition(id, BackupState::Pruned, move |tx| {
            tx.execute("UPDATE backup_runs SET pruned_ms = ?1 WHERE id = ?2", params![now, id])
                .map(drop)
        })
        .await
    }

    /// Records a test restore (drill or `backup verify`); the state is left
    /// alone: a failed test marks the backup failed through `mark_failed`.
    pub async fn record_test(&self, id: i64, result: &str) -> Result<(), CatalogError> {
        let now = super::now_ms();
        let result = result.to_string();
        self.store
            .call("record test restore", move |conn| {
                conn.execute(
                    "UPDATE backup_runs SET tested_ms = ?1, test_result = ?2 WHERE id = ?3",
                    params![now, result, id],
                )
                .map(drop)
            })
            .await?;
        Ok(())
    }

    pub async fn get(&self, id: i64) -> Result<Option<BackupRecord>, CatalogError> {
        Ok(self
            .store
            .call("read backup", move |conn| {
                conn.query_row(
                    &format!("SELECT {COLUMNS} FROM backup_runs WHERE id = ?1"),
                    params![id],
                    record,
                )
                .optional()
            })
            .await?)
    }

    /// Newest first.
    pub async fn list(&self, job: Option<&str>, limit: u32) -> Result<Vec<BackupRecord>, CatalogError> {
        let job = job.map(str::to_string);
        Ok(self
            .store
            .call("list backups", move |conn| {
                let mut stmt = conn.prepare(&format!(
                    "SELECT {COLUMNS} FROM backup_runs WHERE (?1 IS NULL OR job = ?1) ORDER BY started_ms DESC, id DESC LIMIT ?2"
                ))?;
                let rows = stmt.query_map(params![job, limit], record)?;
                rows.collect()
            })
            .await?)
    }

    /// Every row of one job, oldest first.
    pub async fn series(&self, job: &str) -> Result<Vec<BackupRecord>, CatalogError> {
        let job = job.to_string();
        Ok(self
            .store
            .call("read backup series", move |conn| {
                let mut stmt = conn.prepare(&format!(
                    "SELECT {COLUMNS} FROM backup_runs WHERE job = ?1 ORDER BY started_ms, id"
                ))?;
                let rows = stmt.query_map(params![job], record)?;
                rows.collect()
            })
            .await?)
    }

    /// The newest backup of a job (and target) that has an object.
    pub async fn latest_success(&self, job: &str, target: Option<&str>) -> Result<Option<BackupRecord>, CatalogError> {
        let (job, target) = (job.to_string(), target.map(str::to_string));
        Ok(self
            .store
            .call("find latest backup", move |conn| {
                conn.query_row(
                    &format!(
                        "SELECT {COLUMNS} FROM backup_runs WHERE job = ?1 AND (?2 IS NULL OR target = ?2)
                         AND state IN ('uploaded', 'verified') ORDER BY started_ms DESC, id DESC LIMIT 1"
                    ),
                    params![job, target],
                    record,
                )
                .optional()
            })
            .await?)
    }

    /// Rows left `running` by an agent that is gone (killed, crashed):
    /// they are failed now. Returns them as they were. Rows of
    /// `current_run` (this agent) are left alone.
    pub async fn fail_interrupted(
        &self,
        reason: &str,
        current_run: Option<i64>,
    ) -> Result<Vec<BackupRecord>, CatalogError> {
        let reason = reason.to_string();
        let now = super::now_ms();
        Ok(self
            .store
            .call("fail interrupted backups", move |conn| {
                let tx = conn.transaction()?;
                let rows: Vec<BackupRecord> = {
                    let mut stmt = tx.prepare(&format!(
                        "SELECT {COLUMNS} FROM backup_runs WHERE state = 'running' AND agent_run IS NOT ?1"
                    ))?;
                    let rows = stmt.query_map(params![current_run], record)?;
                    rows.collect::<rusqlite::Result<_>>()?
                };
                tx.execute(
                    "UPDATE backup_runs SET state = 'failed', error = ?1, finished_ms = ?2 WHERE state = 'running' AND agent_run IS NOT ?3",
                    params![reason, now, current_run],
                )?;
                tx.commit()?;
                Ok(rows)
            })
            .await?)
    }
}

/// The S3 multipart journal lives beside the catalog in the state store.
#[async_trait]
impl UploadJournal for Catalog {
    async fn record(&self, upload: &PendingUpload) -> Result<(), String> {
        let upload = upload.clone();
        self.store
            .call("record multipart upload", move |conn| {
                conn.execute(
                    "INSERT OR REPLACE INTO s3_multipart_uploads (upload_id, bucket, key, started_ms) VALUES (?1, ?2, ?3, ?4)",
                    params![upload.upload_id, upload.bucket, upload.key, upload.started_ms],
                )
                .map(drop)
            })
            .await
            .map_err(|e| e.to_string())
    }

    async fn forget(&self, upload_id: &str) -> Result<(), String> {
        let upload_id = upload_id.to_string();
        self.store
            .call("forget multipart upload", move |conn| {
                conn.execute(
                    "DELETE FROM s3_multipart_uploads WHERE upload_id = ?1",
                    params![upload_id],
                )
                .map(drop)
            })
            .await
            .map_err(|e| e.to_string())
    }

    async fn pending(&self) -> Result<Vec<PendingUpload>, String> {
        self.store
            .call("list multipart uploads", |conn| {
                let mut stmt = conn.prepare(
                    "SELECT upload_id, bucket, key, started_ms FROM s3_multipart_uploads ORDER BY started_ms",
                )?;
                let rows = stmt.query_map([], |row| {
                    Ok(PendingUpload {
                        upload_id: row.get(0)?,
                        bucket: row.get(1)?,
                        key: row.get(2)?,
                        started_ms: row.get(3)?,
                    })
                })?;
                rows.collect()
            })
            .await
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<'a>(job: &'a str, target: &'a str) -> NewRun<'a> {
        NewRun {
            batch: None,
            job,
            kind: "files",
            target,
            trigger: "manual",
            attempt: 1,
            agent_run: None,
            compression: "zstd",
            encryption: "none",
        }
    }

    fn uploaded(key: &str) -> Uploaded {
        Uploaded {
            key: key.into(),
            bytes: 10,
            raw_bytes: 20,
            sha256: "ab".into(),
            raw_sha256: "cd".into(),
        }
    }

    #[tokio::test]
    async fn states_move_forward_only() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::new(Store::open(dir.path()).unwrap());
        let first = catalog.begin(run("j", "t")).await.unwrap();
        assert_eq!(first.state, BackupState::Running);
        assert_eq!(first.batch, first.id);
        assert!(matches!(
            catalog.mark_verified(first.id).await,
            Err(CatalogError::Transition { .. })
        ));
        catalog.mark_uploaded(first.id, uploaded("k1")).await.unwrap();
        catalog.mark_verified(first.id).await.unwrap();
        let got = catalog.get(first.id).await.unwrap().unwrap();
        assert_eq!(got.state, BackupState::Verified);
        assert_eq!(got.key.as_deref(), Some("k1"));
        assert!(got.verified_ms.is_some());
        catalog.mark_pruned(first.id).await.unwrap();
        assert!(matches!(
            catalog.mark_uploaded(first.id, uploaded("k1")).await,
            Err(CatalogError::Transition { .. })
        ));

        let second = catalog
            .begin(NewRun {
                batch: Some(first.id),
                ..run("j", "u")
            })
            .await
            .unwrap();
        assert_eq!(second.batch, first.id);
        catalog.mark_failed(second.id, "boom").await.unwrap();
        assert!(catalog.latest_success("j", None).await.unwrap().is_none());
        assert_eq!(catalog.list(Some("j"), 10).await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn running_rows_of_a_dead_agent_become_failed() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::new(Store::open(dir.path()).unwrap());
        let a = catalog.begin(run("j", "t")).await.unwrap();
        let b = catalog.begin(run("j", "t")).await.unwrap();
        catalog.mark_uploaded(b.id, uploaded("k")).await.unwrap();
        let mine = catalog
            .begin(NewRun {
                agent_run: Some(7),
                ..run("j", "t")
            })
            .await
            .unwrap();
        let interrupted = catalog.fail_interrupted("killed", Some(7)).await.unwrap();
        assert_eq!(interrupted.iter().map(|r| r.id).collect::<Vec<_>>(), vec![a.id]);
        let a = catalog.get(a.id).await.unwrap().unwrap();
        assert_eq!(a.state, BackupState::Failed);
        assert_eq!(a.error.as_deref(), Some("killed"));
        assert_eq!(catalog.get(b.id).await.unwrap().unwrap().state, BackupState::Uploaded);
        assert_eq!(
            catalog.get(mine.id).await.unwrap().unwrap().state,
            BackupState::Running,
            "this agent's own runs are not interrupted"
        );
    }

    #[tokio::test]
    async fn the_journal_remembers_uploads_until_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::new(Store::open(dir.path()).unwrap());
        let upload = PendingUpload {
            upload_id: "u1".into(),
            bucket: "b".into(),
            key: "k".into(),
            started_ms: 1,
        };
        catalog.record(&upload).await.unwrap();
        assert_eq!(catalog.pending().await.unwrap(), vec![upload]);
        catalog.forget("u1").await.unwrap();
        assert!(catalog.pending().await.unwrap().is_empty());
    }
}
