//! What an operator asks for: `backup verify` (and scheduled drills),
//! `backup prune`, and `restore`.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::catalog::{BackupRecord, BackupState};
use super::pipeline::{self, Decoding, PipelineError, Progress};
use super::retention::{self, Decision, Policy, Verdict};
use super::settings::{BackupJob, BackupKind, Compression, K3sDatastore};
use super::source::{self, SourceError};
use super::{ids, now_ms, BackupError, BackupService, Claim};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub id: i64,
    pub job: String,
    pub key: String,
    pub bytes: u64,
    pub sha256: String,
    /// What the test restore found; None when only the checksum was read.
    pub test_restore: Option<String>,
    pub summary: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    pub kind: BackupKind,
    /// Needed when several jobs back up this kind.
    #[serde(default)]
    pub job: Option<String>,
    /// A catalog id; none: the newest backup (from the catalog, or, on a
    /// node whose catalog is gone, from the object store).
    #[serde(default)]
    pub id: Option<i64>,
    /// PostgreSQL: which database's backups (default: the job's only one).
    #[serde(default)]
    pub database: Option<String>,
    /// Where to restore: a database name, a file or a directory.
    #[serde(default)]
    pub target: Option<String>,
    #[serde(default)]
    pub force: bool,
    /// PostgreSQL: skip ownership and privileges (roles missing on a new server).
    #[serde(default)]
    pub no_owner: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreReport {
    /// 0 when the backup was found in the object store only.
    pub id: i64,
    pub job: String,
    pub key: String,
    pub target: String,
    pub bytes: u64,
    pub summary: String,
}

type Consumer = Box<dyn FnOnce(&mut dyn Read) -> Result<String, SourceError> + Send>;

fn failed(job: &str, err: impl std::fmt::Display) -> BackupError {
    BackupError::Failed {
        job: job.to_string(),
        message: err.to_string(),
    }
}

impl BackupService {
    fn decoding(&self, record: &BackupRecord) -> Decoding {
        Decoding {
            compression: Compression::parse(&record.compression).unwrap_or(Compression::None),
            encrypted: record.encryption == "age",
            identities: self.identities.clone(),
        }
    }

    /// `backup verify`: reads a backup back (the newest of `job` when no
    /// id is given) and, with `restore_test`, restores it to a scratch
    /// target.
    pub async fn verify(
        self: &Arc<Self>,
        id: Option<i64>,
        job: Option<&str>,
        restore_test: bool,
        progress: Progress,
    ) -> Result<VerifyReport, BackupError> {
        let record = match (id, job) {
            (Some(id), _) => self.show(id).await?,
            (None, Some(job)) => {
                self.job(job)?;
                self.catalog
                    .latest_success(job, None)
                    .await?
                    .ok_or_else(|| BackupError::NothingToRestore(format!("job {job:?} has no backup to verify")))?
            }
            (None, None) => return Err(BackupError::NothingToRestore("name a backup id or --job".into())),
        };
        let claim = self.claim(&record.job, "verify", progress)?;
        self.verify_record(record, restore_test, &claim).await
    }

    /// The scheduled restore drill: the newest backup, test-restored.
    pub(super) async fn verify_latest(self: &Arc<Self>, claim: Claim) -> Result<VerifyReport, BackupError> {
        let record = self
            .catalog
            .latest_success(&claim.job, None)
            .await?
            .ok_or_else(|| BackupError::NothingToRestore(format!("job {:?} has no backup to drill", claim.job)))?;
        self.verify_record(record, true, &claim).await
    }

    async fn verify_record(
        &self,
        record: BackupRecord,
        restore_test: bool,
        claim: &Claim,
    ) -> Result<VerifyReport, BackupError> {
        if !record.state.is_success() {
            return Err(BackupError::NothingToRestore(format!(
                "backup {} is {}; only uploaded or verified backups can be verified",
                record.id,
                record.state.as_str()
            )));
        }
        let key = record.key.clone().unwrap_or_default();
        let expected = record.sha256.clone().unwrap_or_default();
        claim
            .progress
            .phase(&format!("verifying {key}"), record.bytes.unwrap_or(0));
        let outcome: Result<(u64, String, Option<String>), PipelineError> = if restore_test {
            match self.consumer_for_test(&record, &claim.cancel) {
                Err(err) => Err(err.into()),
                Ok((consumer, _scratch)) => {
                    let fetched = pipeline::fetch(
                        self.objects.as_ref(),
                        &key,
                        Some(&expected),
                        self.decoding(&record),
                        claim.progress.clone(),
                        consumer,
                    )
                    .await;
                    match fetched {
                        Ok(fetched) => match &record.raw_sha256 {
                            Some(raw) if !raw.is_empty() && *raw != fetched.raw_sha256 => {
                                Err(PipelineError::Source(SourceError::Invalid(format!(
                                    "decoded content SHA-256 {} differs from the recorded {raw}",
                                    fetched.raw_sha256
                                ))))
                            }
                            _ => Ok((fetched.bytes, fetched.sha256, Some(fetched.value))),
                        },
                        Err(err) => Err(err),
                    }
                }
            }
        } else {
            match pipeline::stored_sha256(self.objects.as_ref(), &key).await {
                Ok((sha, bytes)) if sha == expected => Ok((bytes, sha, None)),
                Ok((sha, _)) => Err(PipelineError::Checksum {
                    key: key.clone(),
                    expected: expected.clone(),
                    actual: sha,
                }),
                Err(err) => Err(err.into()),
            }
        };
        match outcome {
            Ok((bytes, sha256, test)) => {
                if record.state == BackupState::Uploaded || record.state == BackupState::Verified {
                    self.catalog.mark_verified(record.id).await?;
                }
                if let Some(test) = &test {
                    self.catalog.record_test(record.id, &format!("ok: {test}")).await?;
                }
                let summary = match &test {
                    Some(test) => format!("backup {} ({key}): checksum ok; test restore: {test}", record.id),
                    None => format!(
                        "backup {} ({key}): {bytes} bytes read back, SHA-256 {sha256} matches",
                        record.id
                    ),
                };
                info!(job = %record.job, id = record.id, "{summary}");
                Ok(VerifyReport {
                    id: record.id,
                    job: record.job.clone(),
                    key,
                    bytes,
                    sha256,
                    test_restore: test,
                    summary,
                })
            }
            Err(err) => {
                let message = err.to_string();
                if restore_test {
                    self.catalog
                        .record_test(record.id, &format!("failed: {message}"))
                        .await?;
                }
                // The backup itself is bad (not the scratch server or the
                // network): it must not count as a good backup any more.
                let corrupt = matches!(
                    err,
                    PipelineError::Checksum { .. }
                        | PipelineError::Encoding { .. }
                        | PipelineError::Source(SourceError::Invalid(_))
                );
                if corrupt {
                    self.catalog
                        .mark_failed(record.id, &format!("verification failed: {message}"))
                        .await?;
                }
                warn!(job = %record.job, id = record.id, error = %message, "verification of backup {} failed", record.id);
                Err(failed(
                    &record.job,
                    format!("verification of backup {} failed: {message}", record.id),
                ))
            }
        }
    }

    fn consumer_for_test(
        &self,
        record: &BackupRecord,
        cancel: &CancellationToken,
    ) -> Result<(Consumer, Option<tempfile::TempDir>), SourceError> {
        if record.encryption == "age" && self.identities.is_empty() {
            return Err(SourceError::Refused(
                "the backup is encrypted; a test restore needs backup.age_identity_file".into(),
            ));
        }
        let cancel = cancel.clone();
        Ok(match BackupKind::parse(&record.kind) {
            Some(BackupKind::Postgres) if record.target == source::postgres::GLOBALS_TARGET => {
                (Box::new(source::postgres::check_globals), None)
            }
            Some(BackupKind::Postgres) => {
                let job = self.settings.job(&record.job).ok_or_else(|| {
                    SourceError::Refused(format!(
                        "job {:?} is not configured; no server to test-restore into",
                        record.job
                    ))
                })?;
                let pg = job.postgres.clone().unwrap_or_default();
                let scratch = self
                    .scratch()
                    .map_err(|e| SourceError::io("create a scratch directory", e))?;
                let conn = source::postgres::Connection::new(&pg, scratch.path())?;
                let database = format!("pa_verify_{}_{}", record.id, now_ms() % 100_000);
                (
                    Box::new(move |input| source::postgres::test_restore(&conn, &database, input, &cancel)),
                    Some(scratch),
                )
            }
            Some(BackupKind::Vault) => (
                Box::new(|input| source::vault::check(input).map(|c| c.to_string())),
                None,
            ),
            Some(BackupKind::K3s) => {
                let scratch = self
                    .scratch()
                    .map_err(|e| SourceError::io("create a scratch directory", e))?;
                let dir = scratch.path().to_path_buf();
                (
                    Box::new(move |input| {
                        let unpacked = source::k3s::unpack(input, &dir)?;
                        let datastore = match unpacked.kind {
                            K3sDatastore::Sqlite => source::k3s::integrity_check(&unpacked.datastore)?,
                            K3sDatastore::Etcd => {
                                let size = std::fs::metadata(&unpacked.datastore).map(|m| m.len()).unwrap_or(0);
                                if size == 0 {
                                    return Err(SourceError::Invalid("the etcd snapshot is empty".into()));
                                }
                                format!("etcd snapshot of {size} bytes")
                            }
                        };
                        Ok(format!("{datastore}; server token present"))
                    }),
                    Some(scratch),
                )
            }
            Some(BackupKind::Files | BackupKind::PgBasebackup) => (
                Box::new(|input| {
                    source::files::check(input)
                        .map(|(entries, bytes)| format!("{entries} archive entries, {bytes} bytes of files"))
                }),
                None,
            ),
            None => return Err(SourceError::Invalid(format!("unknown backup kind {:?}", record.kind))),
        })
    }

    /// `backup prune`: retention for one job or all; with `dry_run`, only
    /// the decisions.
    pub async fn prune(self: &Arc<Self>, job: Option<&str>, dry_run: bool) -> Result<Vec<Decision>, BackupError> {
        let jobs: Vec<BackupJob> = match job {
            Some(name) => vec![self.job(name)?.clone()],
            None => self.settings.jobs.clone(),
        };
        let mut decisions = Vec::new();
        for job in jobs {
            let _claim = if dry_run {
                None
            } else {
                Some(self.claim(&job.name, "prune", Progress::default())?)
            };
            decisions.extend(self.prune_job(&job, dry_run).await?);
        }
        if !dry_run {
            self.refresh_status().await;
        }
        Ok(decisions)
    }

    pub(super) async fn prune_job(&self, job: &BackupJob, dry_run: bool) -> Result<Vec<Decision>, BackupError> {
        let rows = self.catalog.series(&job.name).await?;
        let mut decisions = retention::decide(&rows, &Policy::from_job(job));
        if dry_run {
            return Ok(decisions);
        }
        for decision in decisions.iter_mut().filter(|d| d.verdict == Verdict::Delete) {
            match self.objects.delete(&decision.key).await {
                Ok(()) => {
                    self.catalog.mark_pruned(decision.id).await?;
                    decision.state = BackupState::Pruned;
                    info!(
                        message_id = ids::BACKUP_PRUNED,
                        job = %job.name,
                        id = decision.id,
                        key = %decision.key,
                        "pruned backup {} ({}): {}",
                        decision.id,
                        decision.key,
                        decision.reasons.join("; ")
                    );
                }
                Err(err) => {
                    warn!(job = %job.name, key = %decision.key, error = %err, "cannot delete a pruned backup; kept for now");
                    decision.verdict = Verdict::Keep;
                    decision.reasons.push(format!("delete failed: {err}"));
                }
            }
        }
        Ok(decisions)
    }

    fn job_for_restore(&self, request: &RestoreRequest) -> Result<BackupJob, BackupError> {
        if let Some(name) = &request.job {
            let job = self.job(name)?;
            if job.kind != request.kind {
                return Err(BackupError::Ambiguous(format!(
                    "job {name:?} backs up {}, not {}",
                    job.kind.as_str(),
                    request.kind.as_str()
                )));
            }
            return Ok(job.clone());
        }
        let candidates: Vec<&BackupJob> = self.settings.jobs.iter().filter(|j| j.kind == request.kind).collect();
        match candidates.as_slice() {
            [job] => Ok((*job).clone()),
            [] => Err(BackupError::UnknownJob(format!(
                "(no {} job is configured)",
                request.kind.as_str()
            ))),
            many => Err(BackupError::Ambiguous(format!(
                "several {} jobs: {}; name one with --job",
                request.kind.as_str(),
                many.iter().map(|j| j.name.as_str()).collect::<Vec<_>>().join(", ")
            ))),
        }
    }

    /// The backup to restore: by id, else the newest in the catalog, else
    /// (a rebuilt node) the newest in the object store.
    async fn record_for_restore(&self, job: &BackupJob, request: &RestoreRequest) -> Result<BackupRecord, BackupError> {
        let target: Option<String> = match job.kind {
            BackupKind::Postgres => match &request.database {
                Some(db) => Some(db.clone()),
                None => {
                    let databases = &job.postgres.as_ref().map(|p| p.databases.clone()).unwrap_or_default();
                    match databases.as_slice() {
                        [one] if one != "*" => Some(one.clone()),
                        _ => {
                            return Err(BackupError::Ambiguous(format!(
                                "job {:?} backs up several databases; name one with --database",
                                job.name
                            )))
                        }
                    }
                }
            },
            _ => None,
        };
        if let Some(id) = request.id {
            let record = self.show(id).await?;
            if record.job != job.name {
                return Err(BackupError::Ambiguous(format!(
                    "backup {id} belongs to job {:?}, not {:?}",
                    record.job, job.name
                )));
            }
            if !record.state.is_success() {
                return Err(BackupError::NothingToRestore(format!(
                    "backup {id} is {}; there is nothing to restore",
                    record.state.as_str()
                )));
            }
            return Ok(record);
        }
        if let Some(record) = self.catalog.latest_success(&job.name, target.as_deref()).await? {
            return Ok(record);
        }
        self.record_from_store(job, target.as_deref()).await
    }

    async fn record_from_store(&self, job: &BackupJob, target: Option<&str>) -> Result<BackupRecord, BackupError> {
        let prefix = match target {
            Some(target) => format!("{}/{target}/", job.name),
            None => format!("{}/", job.name),
        };
        let listed = self.objects.list(&prefix).await.map_err(|e| failed(&job.name, e))?;
        // Keys end in <UTC time>-<id>.<ext>: the newest sorts last by name
        // within a target.
        let newest = listed
            .iter()
            .max_by(|a, b| {
                let name = |k: &str| k.rsplit('/').next().unwrap_or(k).to_string();
                name(&a.key).cmp(&name(&b.key))
            })
            .ok_or_else(|| {
                BackupError::NothingToRestore(format!(
                    "no backup of job {:?} in the catalog or under {prefix} in the object store",
                    job.name
                ))
            })?;
        let info = self
            .objects
            .head(&newest.key)
            .await
            .map_err(|e| failed(&job.name, e))?
            .ok_or_else(|| BackupError::NothingToRestore(format!("{} vanished", newest.key)))?;
        let meta = |k: &str| info.metadata.get(k).cloned().unwrap_or_default();
        info!(job = %job.name, key = %info.key, "the catalog has no backup of this job; restoring the newest in the object store");
        Ok(BackupRecord {
            id: 0,
            batch: 0,
            job: job.name.clone(),
            kind: job.kind.as_str().to_string(),
            target: meta("pa-target"),
            trigger: "object-store".into(),
            attempt: 0,
            state: BackupState::Uploaded,
            key: Some(info.key.clone()),
            started_ms: 0,
            finished_ms: None,
            bytes: Some(info.size),
            raw_bytes: None,
            sha256: Some(info.sha256.clone()).filter(|s| !s.is_empty()),
            raw_sha256: None,
            compression: meta("pa-compression"),
            encryption: meta("pa-encryption"),
            error: None,
            verified_ms: None,
            tested_ms: None,
            test_result: None,
            pruned_ms: None,
        })
    }

    /// `platform-agent restore KIND`.
    pub async fn restore(
        self: &Arc<Self>,
        request: RestoreRequest,
        progress: Progress,
    ) -> Result<RestoreReport, BackupError> {
        let job = self.job_for_restore(&request)?;
        let claim = self.claim(&job.name, "restore", progress)?;
        let record = self.record_for_restore(&job, &request).await?;
        if record.encryption == "age" && self.identities.is_empty() {
            return Err(BackupError::Refused(
                "the backup is encrypted; set backup.age_identity_file to the private key to restore it".into(),
            ));
        }
        let key = record.key.clone().unwrap_or_default();
        let expected = record.sha256.clone();
        let bytes = record.bytes.unwrap_or(0);
        claim.progress.phase(&format!("restoring {key}"), bytes);
        let fetch = |consumer: Consumer| {
            let decoding = self.decoding(&record);
            let (key, expected, progress) = (key.clone(), expected.clone(), claim.progress.clone());
            async move {
                pipeline::fetch(
                    self.objects.as_ref(),
                    &key,
                    expected.as_deref(),
                    decoding,
                    progress,
                    consumer,
                )
                .await
            }
        };
        let (target, summary) = match job.kind {
            BackupKind::Postgres if record.target == source::postgres::GLOBALS_TARGET => {
                let pg = job.postgres.clone().unwrap_or_default();
                let scratch = self.scratch().map_err(|e| failed(&job.name, e))?;
                let conn = source::postgres::Connection::new(&pg, scratch.path()).map_err(|e| failed(&job.name, e))?;
                let consumer: Consumer = Box::new(move |input| conn.restore_globals(input));
                let fetched = fetch(consumer).await.map_err(|e| pipeline_error(&job.name, e))?;
                (
                    record.target.clone(),
                    format!("roles and tablespaces replayed: {}", fetched.value),
                )
            }
            BackupKind::PgBasebackup => {
                return Err(BackupError::Refused(
                    "a base backup is restored with `platform-agent restore pg --pitr TIME --target-dir DIR`".into(),
                ))
            }
            BackupKind::Postgres => {
                let pg = job.postgres.clone().unwrap_or_default();
                let database = request.target.clone().unwrap_or_else(|| record.target.clone());
                let scratch = self.scratch().map_err(|e| failed(&job.name, e))?;
                let conn =
                    Arc::new(source::postgres::Connection::new(&pg, scratch.path()).map_err(|e| failed(&job.name, e))?);
                {
                    let (conn, database, force) = (conn.clone(), database.clone(), request.force);
                    tokio::task::spawn_blocking(move || {
                        source::postgres::prepare_restore_target(&conn, &database, force)
                    })
                    .await
                    .map_err(|e| failed(&job.name, e))?
                    .map_err(|e| source_error(&job.name, e))?;
                }
                let consumer: Consumer = {
                    let (conn, database, no_owner, cancel) =
                        (conn.clone(), database.clone(), request.no_owner, claim.cancel.clone());
                    Box::new(move |input| {
                        conn.restore_into(&database, input, no_owner, &cancel)?;
                        Ok(format!("{} tables", conn.table_count(&database)?))
                    })
                };
                let fetched = fetch(consumer).await.map_err(|e| pipeline_error(&job.name, e))?;
                (
                    database.clone(),
                    format!("restored into database {database:?}: {}", fetched.value),
                )
            }
            BackupKind::Vault => {
                if !request.force {
                    return Err(BackupError::Refused(
                        "restoring a raft snapshot replaces all of Vault's data (snapshot-force); pass --force".into(),
                    ));
                }
                let vault = job.vault.clone().unwrap_or_default();
                let scratch = self.scratch().map_err(|e| failed(&job.name, e))?;
                let spool = scratch.path().join("snapshot");
                let consumer: Consumer = {
                    let spool = spool.clone();
                    Box::new(move |input| {
                        let mut file = std::fs::File::create(&spool)
                            .map_err(|e| SourceError::io(format!("create {}", spool.display()), e))?;
                        let n =
                            std::io::copy(input, &mut file).map_err(|e| SourceError::io("spool the snapshot", e))?;
                        file.sync_all().map_err(|e| SourceError::io("fsync the snapshot", e))?;
                        Ok(format!("{n} bytes"))
                    })
                };
                fetch(consumer).await.map_err(|e| pipeline_error(&job.name, e))?;
                claim
                    .progress
                    .phase("sending the snapshot to Vault (snapshot-force)", 0);
                let checked = source::vault::restore(&vault, &spool)
                    .await
                    .map_err(|e| source_error(&job.name, e))?;
                (vault.address.clone(), format!("Vault restored from {checked}"))
            }
            BackupKind::K3s => {
                let k3s = job.k3s.clone().unwrap_or_default();
                let etcd = record.target == "etcd" || k3s.datastore == K3sDatastore::Etcd;
                let target = PathBuf::from(request.target.clone().unwrap_or_else(|| {
                    if etcd {
                        "/var/lib/rancher/k3s/server/db/snapshots".into()
                    } else {
                        k3s.db_path.display().to_string()
                    }
                }));
                let running = (self.k3s_running)();
                if !etcd && !request.force && (running || target.exists()) {
                    return Err(BackupError::Refused(format!(
                        "{} is live ({}); stop K3s or restore elsewhere with --target PATH, or pass --force",
                        target.display(),
                        if running { "K3s is running" } else { "the file exists" }
                    )));
                }
                let scratch = self.scratch().map_err(|e| failed(&job.name, e))?;
                let dir = scratch.path().to_path_buf();
                let (tx, rx) = std::sync::mpsc::channel();
                let consumer: Consumer = Box::new(move |input| {
                    let unpacked = source::k3s::unpack(input, &dir)?;
                    let check = match unpacked.kind {
                        K3sDatastore::Sqlite => source::k3s::integrity_check(&unpacked.datastore)?,
                        K3sDatastore::Etcd => "etcd snapshot".to_string(),
                    };
                    let _ = tx.send(unpacked);
                    Ok(check)
                });
                let fetched = fetch(consumer).await.map_err(|e| pipeline_error(&job.name, e))?;
                let unpacked = rx.recv().map_err(|e| failed(&job.name, e))?;
                let token_file = k3s.token_file.clone();
                let force = request.force;
                let target_for_install = target.clone();
                let summary = tokio::task::spawn_blocking(move || -> Result<String, SourceError> {
                    let mut summary = match unpacked.kind {
                        K3sDatastore::Sqlite => {
                            source::k3s::install_sqlite(&unpacked.datastore, &target_for_install)?;
                            format!("datastore restored to {} ({})", target_for_install.display(), fetched.value)
                        }
                        K3sDatastore::Etcd => {
                            std::fs::create_dir_all(&target_for_install)
                                .map_err(|e| SourceError::io(format!("create {}", target_for_install.display()), e))?;
                            let dest = target_for_install.join(unpacked.datastore.file_name().unwrap_or_default());
                            std::fs::copy(&unpacked.datastore, &dest)
                                .map_err(|e| SourceError::io(format!("write {}", dest.display()), e))?;
                            format!(
                                "etcd snapshot written to {}; bring the cluster back with: k3s server --cluster-reset --cluster-reset-restore-path={}",
                                dest.display(),
                                dest.display()
                            )
                        }
                    };
                    if force || !token_file.exists() {
                        crate::fsutil::write_atomic(&token_file, &unpacked.token, 0o600)
                            .map_err(|e| SourceError::io(format!("write {}", token_file.display()), e))?;
                        summary.push_str(&format!("; server token written to {}", token_file.display()));
                    } else if std::fs::read(&token_file).ok().as_deref() != Some(&unpacked.token[..]) {
                        summary.push_str(&format!(
                            "; {} differs from the archived token and was left alone (--force replaces it)",
                            token_file.display()
                        ));
                    }
                    Ok(summary)
                })
                .await
                .map_err(|e| failed(&job.name, e))?
                .map_err(|e| source_error(&job.name, e))?;
                (target.display().to_string(), summary)
            }
            BackupKind::Files => {
                let files = job.files.clone().unwrap_or_default();
                let target = PathBuf::from(
                    request
                        .target
                        .clone()
                        .unwrap_or_else(|| files.base_dir.display().to_string()),
                );
                std::fs::create_dir_all(&target)
                    .map_err(|e| failed(&job.name, format!("create {}: {e}", target.display())))?;
                let staging = tempfile::Builder::new()
                    .prefix(".platform-agent-restore-")
                    .tempdir_in(&target)
                    .map_err(|e| {
                        failed(
                            &job.name,
                            format!("create a staging directory in {}: {e}", target.display()),
                        )
                    })?;
                let consumer: Consumer = {
                    let (staging, target, force) = (staging.path().to_path_buf(), target.clone(), request.force);
                    Box::new(move |input| {
                        let (count, _) = source::files::restore(input, &staging, &target, force)?;
                        Ok(format!("{count} files"))
                    })
                };
                let fetched = fetch(consumer).await.map_err(|e| pipeline_error(&job.name, e))?;
                (
                    target.display().to_string(),
                    format!("restored {} into {}", fetched.value, target.display()),
                )
            }
        };
        info!(
            message_id = ids::RESTORE_FINISHED,
            job = %job.name,
            id = record.id,
            key = %key,
            target = %target,
            "restore of {key}: {summary}"
        );
        Ok(RestoreReport {
            id: record.id,
            job: job.name.clone(),
            key,
            target,
            bytes,
            summary,
        })
    }
}

fn source_error(job: &str, err: SourceError) -> BackupError {
    match err {
        SourceError::Refused(message) => BackupError::Refused(message),
        other => failed(job, other),
    }
}

fn pipeline_error(job: &str, err: PipelineError) -> BackupError {
    match err {
        PipelineError::Source(source) => source_error(job, source),
        other => failed(job, other),
    }
}
