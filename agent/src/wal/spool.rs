//! Spool mode: `wal-push` returns once the daemon has copied the segment
//! into `wal.spool_dir` and fsync'd the file and the directory, so its
//! durability is the local disk's until the shipper has uploaded it (through
//! the same [`Archiver::push`](super::Archiver::push) as sync mode) and
//! removed it. The spool is bounded by `wal.spool_max_bytes`: over it a push
//! fails (PostgreSQL keeps the segment in pg_wal and retries) and nothing is
//! dropped. A spooled file whose upload conflicts with what is archived is
//! kept, renamed `<name>.conflict`, for the operator.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use super::archive::{self, PushOutcome};
use super::settings::WalMode;
use super::{ids, WalError, WalService};

const TEMP_PREFIX: &str = ".tmp-";
const CONFLICT_SUFFIX: &str = ".conflict";

pub fn prepare(dir: &Path) -> Result<(), WalError> {
    let err = |source| WalError::Spool {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    // A temp file is a copy that never got renamed: its source is still in
    // pg_wal (wal-push did not succeed), so it can go.
    for entry in std::fs::read_dir(dir).map_err(err)?.flatten() {
        if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// Spooled files waiting to be shipped, oldest name first, with sizes.
fn queued(dir: &Path) -> Vec<(String, u64)> {
    let mut files: Vec<(String, u64)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(TEMP_PREFIX) || name.ends_with(CONFLICT_SUFFIX) {
                return None;
            }
            Some((name, entry.metadata().ok()?.len()))
        })
        .collect();
    files.sort();
    files
}

pub fn queued_count(dir: &Path, mode: WalMode) -> u64 {
    if mode == WalMode::Spool {
        queued(dir).len() as u64
    } else {
        0
    }
}

fn spool_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok().map(|m| m.len()))
        .sum()
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl WalService {
    pub(super) async fn spool_file(
        &self,
        path: &Path,
        name: &str,
        owner: Option<u32>,
    ) -> Result<PushOutcome, WalError> {
        let lock = self.lock_for(name);
        let _held = lock.lock().await;
        let (path, name_owned) = (path.to_path_buf(), name.to_string());
        let raw = tokio::task::spawn_blocking(move || archive::read_raw(&path, &name_owned, owner))
            .await
            .map_err(|e| WalError::Task(e.to_string()))??;
        if let Some(catalog) = &self.archiver.catalog {
            if let Some(row) = catalog.lookup(name).await? {
                return if row.raw_sha256 == raw.sha256 {
                    Ok(PushOutcome::AlreadyArchived)
                } else {
                    Err(WalError::Conflict {
                        name: name.to_string(),
                        key: row.key,
                        existing: row.raw_sha256,
                        new: raw.sha256,
                    })
                };
            }
        }
        let dir = self.spool_dir.clone();
        let max = self.settings.spool_max_bytes;
        let name = name.to_string();
        let outcome = tokio::task::spawn_blocking(move || -> Result<PushOutcome, WalError> {
            let target = dir.join(&name);
            let spool_err = |path: &Path| {
                let path = path.to_path_buf();
                move |source| WalError::Spool { path, source }
            };
            if let Ok(existing) = std::fs::read(&target) {
                let existing_sha = hex::encode(Sha256::digest(&existing));
                return if existing_sha == raw.sha256 {
                    Ok(PushOutcome::Spooled)
                } else {
                    Err(WalError::Conflict {
                        name: name.clone(),
                        key: target.display().to_string(),
                        existing: existing_sha,
                        new: raw.sha256.clone(),
                    })
                };
            }
            let bytes = spool_bytes(&dir);
            if bytes + raw.data.len() as u64 > max {
                return Err(WalError::SpoolFull {
                    dir: dir.clone(),
                    bytes,
                    max,
                    name: name.clone(),
                });
            }
            let temp = dir.join(format!("{TEMP_PREFIX}{name}"));
            let mut file = std::fs::File::create(&temp).map_err(spool_err(&temp))?;
            file.write_all(&raw.data)
                .and_then(|()| file.sync_all())
                .map_err(spool_err(&temp))?;
            drop(file);
            std::fs::rename(&temp, &target).map_err(spool_err(&target))?;
            sync_dir(&dir).map_err(spool_err(&dir))?;
            Ok(PushOutcome::Spooled)
        })
        .await
        .map_err(|e| WalError::Task(e.to_string()))??;
        self.spooled.notify_one();
        Ok(outcome)
    }

    /// Uploads spooled files, oldest first, `upload_parallelism` at a time;
    /// each is removed only after its upload succeeded.
    pub(super) async fn ship_spool(self: Arc<Self>, cancel: CancellationToken) {
        let mut backoff = Duration::from_millis(200);
        loop {
            let files = queued(&self.spool_dir);
            let mut uploads = tokio::task::JoinSet::new();
            for (name, _) in files {
                let me = self.clone();
                uploads.spawn(async move {
                    let path = me.spool_dir.join(&name);
                    let result = me.push_file(&path, &name, None).await;
                    (name, path, result)
                });
            }
            let mut failed = false;
            while let Some(joined) = uploads.join_next().await {
                let Ok((name, path, result)) = joined else { continue };
                match &result {
                    Ok(_) => {
                        if let Err(err) = std::fs::remove_file(&path).and_then(|()| sync_dir(&self.spool_dir)) {
                            warn!(segment = %name, "cannot remove a shipped spool file: {err}");
                        }
                    }
                    Err(WalError::Conflict { .. }) => {
                        let kept = self.spool_dir.join(format!("{name}{CONFLICT_SUFFIX}"));
                        let _ = std::fs::rename(&path, &kept);
                        error!(message_id = ids::WAL_CONFLICT, segment = %name, kept = %kept.display(), "spooled WAL file conflicts with the archive; kept for the operator");
                    }
                    Err(_) => failed = true,
                }
                self.account_shipped(&name, &result);
            }
            let wait = if failed {
                backoff = (backoff * 2).min(Duration::from_secs(10));
                backoff
            } else {
                backoff = Duration::from_millis(200);
                Duration::from_secs(5)
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.spooled.notified(), if !failed => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    fn account_shipped(&self, name: &str, result: &Result<PushOutcome, WalError>) {
        self.account(name, result);
        let bytes = spool_bytes(&self.spool_dir);
        self.status.update(|s| {
            if let Some(wal) = s.wal_status.as_mut() {
                wal.spool_bytes = bytes;
            }
        });
    }
}
