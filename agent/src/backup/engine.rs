//! The job engine: tokio-cron-scheduler fires each job's schedule (plus a
//! random jitter); a job runs only when its slot is free (no overlapping
//! runs of one job; `max_concurrent_jobs` across jobs), each attempt has a
//! deadline, failed targets are retried with exponential backoff, every
//! attempt is a catalog row, and shutdown aborts running uploads cleanly
//! (multipart aborted, row marked failed) before the agent stops.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::catalog::{BackupRecord, BackupState, NewRun, Uploaded};
use super::ids;
use super::pipeline::{self, Encoding, PipelineError, Progress};
use super::settings::{parse_cron, BackupJob, BackupKind, K3sDatastore};
use super::source::{self, Produce, SourceError, Target};
use super::{now_ms, BackupError, BackupService, Claim, Trigger};
use crate::status::{BackupJobStatus, BackupResult, Health};

/// The last attempt of each target of one run (rows oldest first). A failed
/// listing of targets ("*") no longer counts once a later attempt listed
/// them.
/// Object metadata `pa-format` of a pg_basebackup tar.
pub const BASEBACKUP_FORMAT: &str = "pg-basebackup-tar";

fn final_rows<'a>(rows: impl Iterator<Item = &'a BackupRecord>) -> Vec<&'a BackupRecord> {
    let mut last: BTreeMap<&str, &BackupRecord> = BTreeMap::new();
    for row in rows {
        if row.target != "*" {
            last.remove("*");
        }
        last.insert(&row.target, row);
    }
    last.into_values().collect()
}

#[derive(Debug, Clone)]
enum Fire {
    Backup(String),
    Drill(String),
}

fn random_below(max: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    if max.is_zero() {
        return Duration::ZERO;
    }
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_i64(now_ms());
    let fraction = (hasher.finish() % 1_000_000) as f64 / 1_000_000.0;
    max.mul_f64(fraction)
}

impl BackupService {
    /// Cleans up after an agent that did not stop in order: rows left
    /// `running` become failed (and an object one of them may have
    /// completed is deleted), multipart uploads named in the journal are
    /// aborted. (Scratch files went when the service was built.)
    pub async fn recover(&self) {
        match self
            .catalog
            .fail_interrupted(
                "interrupted: the agent stopped without recording the end of this run",
                self.agent_run,
            )
            .await
        {
            Ok(rows) => {
                for row in rows {
                    warn!(
                        message_id = ids::BACKUP_RECOVERED,
                        job = %row.job,
                        id = row.id,
                        "backup {} of job {} was interrupted by an unclean stop; marked failed",
                        row.id,
                        row.job
                    );
                    if let Some(key) = &row.key {
                        match self.objects.head(key).await {
                            Ok(Some(_)) => match self.objects.delete(key).await {
                                Ok(()) => info!(key = %key, "deleted the object of the interrupted backup {}", row.id),
                                Err(err) => {
                                    warn!(key = %key, error = %err, "cannot delete the object of an interrupted backup")
                                }
                            },
                            Ok(None) => {}
                            Err(err) => {
                                warn!(key = %key, error = %err, "cannot check for the object of an interrupted backup")
                            }
                        }
                    }
                }
            }
            Err(err) => error!(error = %err, "cannot mark interrupted backups in the catalog"),
        }
        match self.objects.recover().await {
            Ok(removed) => {
                for what in removed {
                    info!(message_id = ids::BACKUP_RECOVERED, "removed the leftover {what}");
                }
            }
            Err(err) => warn!(error = %err, "cannot clean up interrupted uploads yet; retried before the next run"),
        }
    }

    /// The engine: schedules until `cancel`, then stops running work.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) -> Result<(), String> {
        let (fire_tx, mut fire_rx) = mpsc::channel::<Fire>(64);
        let mut scheduler = if self.settings.enabled && !self.settings.jobs.is_empty() {
            Some(self.schedule(fire_tx.clone()).await.map_err(|e| e.to_string())?)
        } else {
            None
        };
        self.refresh_status().await;
        if self.settings.enabled {
            self.clone().start_missed().await;
        }
        let mut ticker = tokio::time::interval(Duration::from_secs(60));
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                Some(fire) = fire_rx.recv() => self.clone().fire(fire),
                _ = ticker.tick() => self.refresh_status().await,
            }
        }
        if let Some(scheduler) = scheduler.as_mut() {
            if let Err(err) = scheduler.shutdown().await {
                warn!(error = %err, "the backup scheduler did not stop cleanly");
            }
        }
        let running: Vec<String> = self
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(job, busy)| format!("{job} ({})", busy.what))
            .collect();
        if !running.is_empty() {
            info!("stopping running backup work: {}", running.join(", "));
        }
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.refresh_status().await;
        self.status.update(|s| {
            if !matches!(s.backups, Health::Disabled) {
                s.backups = Health::Stopped;
            }
        });
        Ok(())
    }

    async fn schedule(
        &self,
        fire_tx: mpsc::Sender<Fire>,
    ) -> Result<tokio_cron_scheduler::JobScheduler, tokio_cron_scheduler::JobSchedulerError> {
        use tokio_cron_scheduler::{Job, JobScheduler};
        let scheduler = JobScheduler::new().await?;
        for job in &self.settings.jobs {
            for (cron, fire) in [
                (&job.schedule, Fire::Backup(job.name.clone())),
                (&job.verify_schedule, Fire::Drill(job.name.clone())),
            ] {
                if cron.is_empty() {
                    continue;
                }
                let tx = fire_tx.clone();
                scheduler
                    .add(Job::new_async(cron.as_str(), move |_, _| {
                        let (tx, fire) = (tx.clone(), fire.clone());
                        Box::pin(async move {
                            let _ = tx.send(fire).await;
                        })
                    })?)
                    .await?;
            }
        }
        scheduler.start().await?;
        Ok(scheduler)
    }

    fn fire(self: Arc<Self>, fire: Fire) {
        let (job, is_drill) = match &fire {
            Fire::Backup(job) => (job.clone(), false),
            Fire::Drill(job) => (job.clone(), true),
        };
        let what = if is_drill { "restore drill" } else { "scheduled backup" };
        let claim = match self.claim(&job, what, Progress::default()) {
            Ok(claim) => claim,
            Err(err) => {
                warn!(job = %job, "{what} skipped: {err}");
                return;
            }
        };
        let service = self.clone();
        self.tasks.spawn(async move {
            if is_drill {
                match service.verify_latest(claim).await {
                    Ok(report) => info!(job = %job, "restore drill passed: {}", report.summary),
                    Err(err) => warn!(job = %job, error = %err, "restore drill failed"),
                }
            } else {
                let jitter = service.job(&job).map(|j| random_below(j.jitter)).unwrap_or_default();
                if !jitter.is_zero() {
                    tokio::select! {
                        _ = claim.cancel.cancelled() => return,
                        _ = tokio::time::sleep(jitter) => {}
                    }
                }
                let _ = service.run_job(claim, Trigger::Schedule).await;
            }
        });
    }

    /// Runs once each job whose last scheduled time passed without a
    /// successful backup.
    async fn start_missed(self: Arc<Self>) {
        let now = chrono::Utc::now();
        for job in &self.settings.jobs {
            if job.schedule.is_empty() || !job.run_missed {
                continue;
            }
            let Ok(cron) = parse_cron(&job.schedule) else { continue };
            let last = match self.catalog.latest_success(&job.name, None).await {
                Ok(last) => last,
                Err(err) => {
                    warn!(job = %job.name, error = %err, "cannot read the catalog");
                    continue;
                }
            };
            let missed = match last.and_then(|r| chrono::DateTime::from_timestamp_millis(r.started_ms)) {
                None => true,
                Some(at) => cron.find_next_occurrence(&at, false).is_ok_and(|next| next <= now),
            };
            if !missed {
                continue;
            }
            let Ok(claim) = self.claim(&job.name, "missed backup", Progress::default()) else {
                continue;
            };
            info!(job = %job.name, "the last scheduled backup was missed; running it now");
            let service = self.clone();
            self.tasks.spawn(async move {
                let _ = service.run_job(claim, Trigger::Missed).await;
            });
        }
    }

    /// `platform-agent backup now JOB`: runs it now (with its retries) and
    /// returns the catalog rows of this run.
    pub async fn backup_now(self: &Arc<Self>, job: &str, progress: Progress) -> Result<Vec<BackupRecord>, BackupError> {
        self.job(job)?;
        let claim = self.claim(job, "manual backup", progress)?;
        let service = self.clone();
        // Tracked, so that shutdown waits for it; it goes on if the client
        // goes away.
        self.tasks
            .spawn(async move { service.run_job(claim, Trigger::Manual).await })
            .await
            .map_err(|err| BackupError::Failed {
                job: job.to_string(),
                message: format!("the run's task failed: {err}"),
            })?
    }

    fn encoding(&self, job: &BackupJob) -> Arc<Encoding> {
        let compression = self.settings.compression_for(job);
        let level = match compression {
            super::Compression::Gzip => self.settings.compression_level.clamp(1, 9),
            super::Compression::Zstd => self.settings.compression_level.clamp(1, 19),
            super::Compression::None => 0,
        };
        Arc::new(Encoding {
            compression,
            level,
            threads: self.settings.compression_threads,
            recipients: if self.settings.encrypts(job) {
                self.recipients.clone()
            } else {
                Vec::new()
            },
        })
    }

    async fn targets(&self, job: &BackupJob) -> Result<Vec<Target>, SourceError> {
        match job.kind {
            BackupKind::Postgres => {
                let pg = job.postgres.clone().unwrap_or_default();
                let scratch = self.scratch_dir();
                tokio::task::spawn_blocking(move || source::postgres::Connection::new(&pg, &scratch)?.targets())
                    .await
                    .map_err(|e| SourceError::Invalid(format!("task failed: {e}")))?
            }
            BackupKind::Vault => Ok(vec![Target {
                name: "raft".into(),
                format: source::vault::FORMAT,
                extension: "snap",
            }]),
            BackupKind::K3s => {
                let etcd = job.k3s.as_ref().is_some_and(|k| k.datastore == K3sDatastore::Etcd);
                Ok(vec![Target {
                    name: if etcd { "etcd" } else { "sqlite" }.into(),
                    format: source::k3s::FORMAT,
                    extension: "tar",
                }])
            }
            BackupKind::Files => Ok(vec![Target {
                name: "files".into(),
                format: source::files::FORMAT,
                extension: "tar",
            }]),
            BackupKind::PgBasebackup => Ok(vec![Target {
                name: "cluster".into(),
                format: BASEBACKUP_FORMAT,
                extension: "tar",
            }]),
        }
    }

    /// Runs a job: all its targets, retrying the failed ones.
    async fn run_job(self: &Arc<Self>, claim: Claim, trigger: Trigger) -> Result<Vec<BackupRecord>, BackupError> {
        let job = self.job(&claim.job)?.clone();
        let _permit = tokio::select! {
            permit = self.permits.clone().acquire_owned() => permit.map_err(|_| BackupError::ShuttingDown)?,
            _ = claim.cancel.cancelled() => return Err(BackupError::ShuttingDown),
        };
        self.set_running(&job.name, true);
        let started = now_ms();
        info!(message_id = ids::BACKUP_STARTED, job = %job.name, kind = job.kind.as_str(), trigger = trigger.as_str(), "backup of {} started", job.name);
        // Uploads that an earlier failure could not abort (S3 was away).
        if let Err(err) = self.objects.recover().await {
            warn!(job = %job.name, error = %err, "cannot abort leftover multipart uploads yet");
        }
        let mut records: Vec<BackupRecord> = Vec::new();
        let mut batch: Option<i64> = None;
        // Targets still to do; None: ask the source (again).
        let mut pending: Option<Vec<Target>> = None;
        for attempt in 1..=job.retries + 1 {
            if attempt > 1 {
                let backoff = job.retry_backoff.saturating_mul(1 << (attempt - 2).min(10));
                info!(job = %job.name, attempt, "retrying in {}", humantime::format_duration(backoff));
                tokio::select! {
                    _ = claim.cancel.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
            }
            // The attempt's deadline cancels its work like shutdown does.
            let attempt_cancel = claim.cancel.child_token();
            let timer = {
                let (cancel, timeout) = (attempt_cancel.clone(), job.timeout);
                tokio::spawn(async move {
                    tokio::time::sleep(timeout).await;
                    cancel.cancel();
                })
            };
            let trigger_word = if attempt > 1 { "retry" } else { trigger.as_str() };
            let targets = match pending.take() {
                Some(targets) => Ok(targets),
                None => self.targets(&job).await,
            };
            let mut failed_any = false;
            match targets {
                Err(err) => {
                    // The source could not even say what to back up: a
                    // failed run all the same.
                    let record = self
                        .record_failure(&job, "*", trigger_word, attempt, batch, &err.to_string())
                        .await?;
                    batch.get_or_insert(record.batch);
                    records.push(record);
                    failed_any = true;
                }
                Ok(targets) => {
                    let mut failed = Vec::new();
                    for target in targets {
                        let record = self
                            .run_target(
                                &job,
                                &target,
                                trigger_word,
                                attempt,
                                batch,
                                &attempt_cancel,
                                &claim.progress,
                            )
                            .await?;
                        batch.get_or_insert(record.batch);
                        if record.state == BackupState::Failed {
                            failed.push(target);
                        }
                        records.push(record);
                    }
                    if !failed.is_empty() {
                        pending = Some(failed);
                        failed_any = true;
                    }
                }
            }
            timer.abort();
            if !failed_any || claim.cancel.is_cancelled() {
                break;
            }
        }
        let succeeded = records.iter().any(|r| r.state.is_success());
        let failed_targets: Vec<String> = final_rows(records.iter())
            .into_iter()
            .filter(|r| r.state == BackupState::Failed)
            .map(|r| format!("{}: {}", r.target, r.error.clone().unwrap_or_default()))
            .collect();
        let duration = Duration::from_millis((now_ms() - started).max(0) as u64);
        if failed_targets.is_empty() {
            info!(
                message_id = ids::BACKUP_FINISHED,
                job = %job.name,
                result = "success",
                "backup of {} succeeded in {}",
                job.name,
                humantime::format_duration(Duration::from_secs(duration.as_secs()))
            );
        } else {
            error!(
                message_id = ids::BACKUP_FINISHED,
                job = %job.name,
                result = "failure",
                "backup of {} failed: {}",
                job.name,
                failed_targets.join("; ")
            );
        }
        if succeeded && !claim.cancel.is_cancelled() {
            if let Err(err) = self.prune_job(&job, false).await {
                warn!(job = %job.name, error = %err, "retention after the backup failed");
            }
        }
        drop(claim);
        self.set_running(&job.name, false);
        self.refresh_status().await;
        if failed_targets.is_empty() {
            Ok(records)
        } else {
            Err(BackupError::Failed {
                job: job.name.clone(),
                message: format!("backup failed: {}", failed_targets.join("; ")),
            })
        }
    }

    async fn record_failure(
        &self,
        job: &BackupJob,
        target: &str,
        trigger: &str,
        attempt: u32,
        batch: Option<i64>,
        error: &str,
    ) -> Result<BackupRecord, BackupError> {
        let encoding = self.encoding(job);
        let record = self
            .catalog
            .begin(NewRun {
                batch,
                job: &job.name,
                kind: job.kind.as_str(),
                target,
                trigger,
                attempt,
                agent_run: self.agent_run,
                compression: encoding.compression.as_str(),
                encryption: encoding.encryption(),
            })
            .await?;
        self.catalog.mark_failed(record.id, error).await?;
        Ok(self.catalog.get(record.id).await?.unwrap_or(record))
    }

    /// One object: produce, upload, verify; always ends in a final state.
    #[allow(clippy::too_many_arguments)]
    async fn run_target(
        &self,
        job: &BackupJob,
        target: &Target,
        trigger: &str,
        attempt: u32,
        batch: Option<i64>,
        cancel: &CancellationToken,
        progress: &Progress,
    ) -> Result<BackupRecord, BackupError> {
        let encoding = self.encoding(job);
        let record = self
            .catalog
            .begin(NewRun {
                batch,
                job: &job.name,
                kind: job.kind.as_str(),
                target: &target.name,
                trigger,
                attempt,
                agent_run: self.agent_run,
                compression: encoding.compression.as_str(),
                encryption: encoding.encryption(),
            })
            .await?;
        let stamp = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(record.started_ms)
            .map(|t| t.format("%Y%m%dT%H%M%SZ").to_string())
            .unwrap_or_default();
        let key = format!(
            "{}/{}/{stamp}-{}.{}{}",
            job.name,
            target.name,
            record.id,
            target.extension,
            encoding.suffix()
        );
        self.catalog.set_key(record.id, &key).await?;
        progress.phase(&format!("backing up {}/{}", job.name, target.name), 0);
        let outcome = self
            .produce_and_store(job, target, &key, record.started_ms, encoding, cancel, progress)
            .await;
        let result = match outcome {
            Ok(stored) => {
                self.catalog
                    .mark_uploaded(
                        record.id,
                        Uploaded {
                            key: key.clone(),
                            bytes: stored.bytes,
                            raw_bytes: stored.raw_bytes,
                            sha256: stored.sha256.clone(),
                            raw_sha256: stored.raw_sha256.clone(),
                        },
                    )
                    .await?;
                if self.settings.verify_after_upload {
                    match self.read_back(&key, &stored.sha256).await {
                        Ok(()) => self.catalog.mark_verified(record.id).await?,
                        Err(message) => {
                            let _ = self.objects.delete(&key).await;
                            self.catalog
                                .mark_failed(record.id, &format!("read-back verification failed: {message}"))
                                .await?
                        }
                    }
                }
                Ok(())
            }
            Err(err) => {
                let message = if self.cancel.is_cancelled() {
                    format!("aborted: the agent is stopping ({err})")
                } else if cancel.is_cancelled() {
                    format!("timed out after {} ({err})", humantime::format_duration(job.timeout))
                } else {
                    err.to_string()
                };
                self.catalog.mark_failed(record.id, &message).await?;
                Err(message)
            }
        };
        let record = self.catalog.get(record.id).await?.unwrap_or(record);
        match result {
            Ok(()) => info!(
                job = %job.name,
                target = %target.name,
                id = record.id,
                key = %key,
                bytes = record.bytes.unwrap_or(0),
                raw_bytes = record.raw_bytes.unwrap_or(0),
                state = record.state.as_str(),
                "stored {key}"
            ),
            Err(message) => {
                warn!(job = %job.name, target = %target.name, id = record.id, "backup attempt {attempt} failed: {message}")
            }
        }
        Ok(record)
    }

    /// Reads the object back: its SHA-256 must be the one computed while
    /// uploading, and the one recorded in its metadata.
    async fn read_back(&self, key: &str, expected: &str) -> Result<(), String> {
        let (actual, _) = pipeline::stored_sha256(self.objects.as_ref(), key)
            .await
            .map_err(|e| e.to_string())?;
        if actual != expected {
            return Err(format!("read back SHA-256 {actual}, uploaded {expected}"));
        }
        match self.objects.head(key).await {
            Ok(Some(info)) if info.sha256 == expected => Ok(()),
            Ok(Some(info)) => Err(format!(
                "the object's recorded SHA-256 is {:?}, uploaded {expected}",
                info.sha256
            )),
            Ok(None) => Err("the object is gone".into()),
            Err(err) => Err(err.to_string()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn produce_and_store(
        &self,
        job: &BackupJob,
        target: &Target,
        key: &str,
        started_ms: i64,
        encoding: Arc<Encoding>,
        cancel: &CancellationToken,
        progress: &Progress,
    ) -> Result<pipeline::Stored, PipelineError> {
        let scratch = self.scratch().map_err(|e| {
            SourceError::io(
                format!("create a scratch directory in {}", self.settings.scratch_dir.display()),
                e,
            )
        })?;
        let produce: Produce = match job.kind {
            BackupKind::Postgres => {
                let pg = job.postgres.clone().unwrap_or_default();
                let conn = source::postgres::Connection::new(&pg, scratch.path())?;
                if target.format == source::postgres::GLOBALS_FORMAT {
                    Box::new(move |out, cancel| conn.dump_globals(out, cancel))
                } else {
                    let database = target.name.clone();
                    Box::new(move |out, cancel| conn.dump(&database, out, cancel))
                }
            }
            BackupKind::Vault => {
                let vault = job.vault.clone().unwrap_or_default();
                let spool = scratch.path().join("snapshot");
                progress.phase(&format!("downloading the {} snapshot", job.name), 0);
                let size = source::vault::download(&vault, &spool, cancel).await?;
                let checked = {
                    let spool = spool.clone();
                    tokio::task::spawn_blocking(move || {
                        let mut file = std::fs::File::open(&spool)
                            .map_err(|e| SourceError::io(format!("open {}", spool.display()), e))?;
                        source::vault::check(&mut file)
                    })
                    .await
                    .map_err(|e| PipelineError::Task(e.to_string()))??
                };
                info!(job = %job.name, bytes = size, "Vault snapshot checked: {checked}");
                progress.phase(&format!("backing up {}/{}", job.name, target.name), 0);
                Box::new(move |out, cancel| {
                    let mut file = std::fs::File::open(&spool)
                        .map_err(|e| SourceError::io(format!("open {}", spool.display()), e))?;
                    source::copy_cancellable(&mut file, out, cancel).map(drop)
                })
            }
            BackupKind::K3s => {
                let k3s = job.k3s.clone().unwrap_or_default();
                let dir = scratch.path().to_path_buf();
                let cancel = cancel.clone();
                let datastore = tokio::task::spawn_blocking(move || match k3s.datastore {
                    K3sDatastore::Sqlite => {
                        let copy = dir.join("state.db");
                        source::k3s::copy_sqlite(&k3s.db_path, &copy, &cancel).map(|()| (copy, k3s))
                    }
                    K3sDatastore::Etcd => source::k3s::etcd_snapshot(&k3s, &dir).map(|path| (path, k3s)),
                })
                .await
                .map_err(|e| PipelineError::Task(e.to_string()))??;
                Box::new(move |out, _| {
                    let (path, k3s) = datastore;
                    source::k3s::write_archive(&path, k3s.datastore, &k3s.token_file, out)
                })
            }
            BackupKind::Files => {
                let files = job.files.clone().unwrap_or_default();
                Box::new(move |out, cancel| source::files::write_archive(&files, out, cancel))
            }
            BackupKind::PgBasebackup => {
                let pg = job.pg_basebackup.clone().unwrap_or_default();
                let conn = source::postgres::Connection::new(&pg, scratch.path())?;
                let label = crate::wal::restore::label_for(key);
                Box::new(move |out, cancel| conn.basebackup(&label, out, cancel))
            }
        };
        let metadata: BTreeMap<String, String> = [
            ("pa-job", job.name.clone()),
            ("pa-kind", job.kind.as_str().to_string()),
            ("pa-target", target.name.clone()),
            ("pa-format", target.format.to_string()),
            ("pa-compression", encoding.compression.as_str().to_string()),
            ("pa-encryption", encoding.encryption().to_string()),
            ("pa-started", super::format_time(started_ms)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let stored = pipeline::store(
            self.objects.as_ref(),
            key,
            metadata,
            encoding,
            self.settings.max_upload_bytes_per_second,
            progress.clone(),
            cancel.clone(),
            produce,
        )
        .await;
        drop(scratch);
        stored
    }

    fn set_running(&self, job: &str, running: bool) {
        let since = running.then(|| (now_ms() / 1000) as u64);
        self.status.update(|s| {
            if let Some(entry) = s.backup_jobs.iter_mut().find(|j| j.job == job) {
                entry.running_since = since;
                if running {
                    entry.last_result = Some(BackupResult::Running);
                }
            }
        });
    }

    /// Rebuilds the per-job status from the catalog.
    pub async fn refresh_status(&self) {
        let mut jobs = Vec::new();
        let mut problems = Vec::new();
        for job in &self.settings.jobs {
            let rows = match self.catalog.list(Some(&job.name), 500).await {
                Ok(rows) => rows,
                Err(err) => {
                    problems.push(format!("{}: cannot read the catalog: {err}", job.name));
                    continue;
                }
            };
            let running_since = self
                .busy
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&job.name)
                .filter(|b| b.what.contains("backup"))
                .map(|b| (b.since_ms / 1000) as u64);
            let mut status = BackupJobStatus {
                job: job.name.clone(),
                kind: job.kind.as_str().to_string(),
                schedule: job.schedule.clone(),
                next_run: None,
                running_since,
                last_result: None,
                last_run_at: None,
                last_success_at: None,
                last_duration_ms: None,
                last_bytes: None,
                last_error: None,
                backups: rows.iter().filter(|r| r.state.is_success()).count() as u64,
            };
            if self.settings.enabled && !job.schedule.is_empty() {
                if let Ok(cron) = parse_cron(&job.schedule) {
                    status.next_run = cron
                        .find_next_occurrence(&chrono::Utc::now(), false)
                        .ok()
                        .map(|t| t.timestamp().max(0) as u64);
                }
            }
            if let Some(newest) = rows.first() {
                let batch: Vec<&BackupRecord> = rows.iter().filter(|r| r.batch == newest.batch).collect();
                let last_per_target = final_rows(batch.iter().rev().copied());
                let result = if last_per_target.iter().any(|r| r.state == BackupState::Running) {
                    BackupResult::Running
                } else if let Some(failed) = last_per_target.iter().find(|r| r.state == BackupState::Failed) {
                    status.last_error = failed.error.clone();
                    BackupResult::Failure
                } else {
                    BackupResult::Success
                };
                let started = batch.iter().map(|r| r.started_ms).min().unwrap_or(newest.started_ms);
                status.last_run_at = Some((started / 1000) as u64);
                if result != BackupResult::Running {
                    let finished = batch.iter().filter_map(|r| r.finished_ms).max().unwrap_or(started);
                    status.last_duration_ms = Some((finished - started).max(0) as u64);
                }
                if result == BackupResult::Failure {
                    problems.push(format!(
                        "{}: {}",
                        job.name,
                        status.last_error.clone().unwrap_or_else(|| "failed".into())
                    ));
                }
                status.last_result = Some(if running_since.is_some() {
                    BackupResult::Running
                } else {
                    result
                });
            }
            if let Some(success) = rows
                .iter()
                .find(|r| r.state.is_success() || r.state == BackupState::Pruned)
            {
                status.last_success_at = success.finished_ms.map(|f| (f / 1000) as u64);
                status.last_bytes = Some(
                    rows.iter()
                        .filter(|r| {
                            r.batch == success.batch && (r.state.is_success() || r.state == BackupState::Pruned)
                        })
                        .filter_map(|r| r.bytes)
                        .sum(),
                );
            }
            jobs.push(status);
        }
        let health = if self.settings.jobs.is_empty() || !self.settings.enabled {
            Health::Disabled
        } else if problems.is_empty() {
            Health::Ok
        } else {
            Health::Degraded {
                reason: problems.join("; "),
            }
        };
        self.status.update(|s| {
            s.backup_jobs = jobs;
            s.backups = health;
        });
    }
}
