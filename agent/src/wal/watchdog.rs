//! The gap watchdog. Every `wal.watchdog_interval` it lists the archive,
//! reconciles the catalog with it (objects uploaded by `wal-push` in direct
//! mode are added; rows whose object vanished are forgotten), walks the
//! chain of each timeline from its oldest archived segment to its newest,
//! and reports every missing segment in status and the journal
//! ([`ids::WAL_GAP`]). A missing segment still present in `wal.pg_wal_dir`
//! is pushed again ([`ids::WAL_REPUSHED`]). It also reads pg_wal's
//! `archive_status/*.ready` for the lag figures: segments PostgreSQL has
//! finished but not yet seen archived, their bytes and the oldest one's age.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::archive::{META_SHA256, META_SIZE};
use super::names::{segment_name, segment_number, WalFileKind, WalName};
use super::{health_of, ids, WalError, WalRow, WalService};

/// What one watchdog run found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchReport {
    pub gaps: Vec<String>,
    pub repushed: Vec<String>,
}

/// Lag figures from pg_wal/archive_status.
fn pending(pg_wal: &Path) -> (u64, u64, u64) {
    let (mut count, mut bytes, mut oldest) = (0u64, 0u64, None::<SystemTime>);
    let Ok(entries) = std::fs::read_dir(pg_wal.join("archive_status")) else {
        return (0, 0, 0);
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(segment) = name.strip_suffix(".ready") else {
            continue;
        };
        count += 1;
        if let Ok(meta) = std::fs::metadata(pg_wal.join(segment)) {
            bytes += meta.len();
        }
        if let Ok(modified) = entry.metadata().and_then(|m| m.modified()) {
            oldest = Some(oldest.map_or(modified, |o: SystemTime| o.min(modified)));
        }
    }
    let age = oldest
        .and_then(|o| SystemTime::now().duration_since(o).ok())
        .map_or(0, |d| d.as_secs());
    (count, bytes, age)
}

/// Missing segment names between the oldest and newest of each timeline.
pub fn find_gaps(rows: &[WalRow]) -> Vec<String> {
    let mut per_timeline: BTreeMap<u32, (u64, BTreeSet<u64>)> = BTreeMap::new();
    for row in rows {
        if WalName::parse(&row.name).map(|n| n.kind) != Some(WalFileKind::Segment) {
            continue;
        }
        let entry = per_timeline.entry(row.timeline).or_default();
        entry.0 = entry.0.max(row.size);
        if let Some(number) = segment_number(&row.name, row.size) {
            entry.1.insert(number);
        }
    }
    let mut gaps = Vec::new();
    for (timeline, (size, numbers)) in per_timeline {
        let (Some(&first), Some(&last)) = (numbers.first(), numbers.last()) else {
            continue;
        };
        for number in first..=last {
            if !numbers.contains(&number) {
                gaps.push(segment_name(timeline, number, size));
                if gaps.len() >= 10_000 {
                    return gaps;
                }
            }
        }
    }
    gaps
}

impl WalService {
    pub(super) async fn watch(self: Arc<Self>, cancel: CancellationToken) {
        let interval = self.settings.watchdog_interval;
        if interval.is_zero() {
            return;
        }
        loop {
            if let Err(err) = self.check_chain().await {
                warn!("WAL watchdog: {err}");
                self.status.update(|s| {
                    if let Some(wal) = s.wal_status.as_mut() {
                        wal.last_error = Some(format!("watchdog: {err}"));
                    }
                });
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
                _ = self.watch_now.notified() => {}
            }
        }
    }

    /// One watchdog run (also what the tests call through a short interval).
    pub async fn check_chain(&self) -> Result<WatchReport, WalError> {
        let catalog = self.archiver.catalog.clone().expect("the daemon always has a catalog");
        let prefix = format!("{}/", self.archiver.prefix);
        let listed = self.archiver.objects.list(&prefix).await?;
        let present: BTreeSet<&str> = listed.iter().map(|o| o.key.as_str()).collect();
        let mut rows = catalog.all().await?;
        let known: BTreeSet<String> = rows.iter().map(|r| r.key.clone()).collect();
        // Rows whose object is gone: forgotten, so that a re-push uploads.
        let mut kept = Vec::with_capacity(rows.len());
        for row in rows.drain(..) {
            if present.contains(row.key.as_str()) {
                kept.push(row);
            } else {
                catalog.forget(&row.name).await?;
            }
        }
        // Objects the catalog does not know (direct-mode pushes).
        for object in &listed {
            if known.contains(&object.key) {
                continue;
            }
            let Some(file) = object.key.rsplit('/').next() else {
                continue;
            };
            let name = file.trim_end_matches(".age").trim_end_matches(".zst");
            let Some(parsed) = WalName::parse(name) else { continue };
            let Some(info) = self.archiver.objects.head(&object.key).await? else {
                continue;
            };
            let (Some(sha), Some(size)) = (info.metadata.get(META_SHA256), info.metadata.get(META_SIZE)) else {
                continue;
            };
            let row = WalRow {
                timeline: parsed.timeline,
                name: parsed.name.clone(),
                raw_sha256: sha.clone(),
                size: size.parse().unwrap_or(0),
                archived_ms: crate::backup::now_ms(),
                key: object.key.clone(),
            };
            catalog.record(&row).await?;
            kept.push(row);
        }
        let (oldest_needed, deleted) = self.apply_retention(&mut kept).await?;
        let mut gaps = find_gaps(&kept);
        let mut repushed = Vec::new();
        if !self.settings.pg_wal_dir.as_os_str().is_empty() {
            for gap in &gaps {
                let path = self.settings.pg_wal_dir.join(gap);
                if !path.exists() {
                    continue;
                }
                match self.push_file(&path, gap, None).await {
                    Ok(_) => {
                        info!(message_id = ids::WAL_REPUSHED, segment = %gap, "pushed a missing WAL segment again from pg_wal");
                        repushed.push(gap.clone());
                    }
                    Err(err) => warn!(segment = %gap, "cannot push a missing WAL segment again: {err}"),
                }
            }
            gaps.retain(|g| !repushed.contains(g));
        }
        if !gaps.is_empty() {
            warn!(message_id = ids::WAL_GAP, gaps = %gaps.join(","), "{} WAL segment(s) missing from the archive", gaps.len());
        }
        let (pending, lag_bytes, lag_seconds) = if self.settings.pg_wal_dir.as_os_str().is_empty() {
            (0, 0, 0)
        } else {
            pending(&self.settings.pg_wal_dir)
        };
        let last = catalog.last().await?;
        self.status.update(|s| {
            let Some(wal) = s.wal_status.as_mut() else { return };
            wal.gaps = gaps.clone();
            wal.repushed_total += repushed.len() as u64;
            wal.deleted_total += deleted;
            wal.oldest_needed = oldest_needed.clone();
            wal.pending_segments = pending;
            wal.lag_bytes = lag_bytes;
            wal.lag_seconds = lag_seconds;
            if wal.last_archived.is_none() {
                if let Some(last) = &last {
                    wal.last_archived = Some(last.name.clone());
                    wal.last_archived_at = Some((last.archived_ms / 1000) as u64);
                }
            }
            s.wal = health_of(wal);
        });
        Ok(WatchReport { gaps, repushed })
    }
}

impl WalService {
    /// WAL retention tied to base backups: with at least one retained
    /// (uploaded or verified, not pruned) base backup of a pg-basebackup
    /// job whose `.backup` label is in the archive, WAL files whose segment
    /// number is below the oldest such backup's start segment are deleted
    /// (on every timeline; history files are kept). Nothing else is: without
    /// a retained base backup nothing at all. Returns the oldest needed
    /// segment and how many files went.
    async fn apply_retention(&self, rows: &mut Vec<WalRow>) -> Result<(Option<String>, u64), WalError> {
        if self.base_jobs.is_empty() {
            return Ok((None, 0));
        }
        let mut retained = BTreeSet::new();
        for job in &self.base_jobs {
            let series = self
                .backup_catalog
                .series(job)
                .await
                .map_err(|e| WalError::Setup(format!("backup catalog: {e}")))?;
            retained.extend(
                series
                    .into_iter()
                    .filter(|r| r.state.is_success())
                    .filter_map(|r| r.key),
            );
        }
        if retained.is_empty() {
            return Ok((None, 0));
        }
        let labels: Vec<String> = rows
            .iter()
            .filter(|r| WalName::parse(&r.name).is_some_and(|n| n.kind == WalFileKind::Backup))
            .map(|r| r.name.clone())
            .collect();
        let mut starts: BTreeMap<String, String> = BTreeMap::new();
        for label in labels {
            let cached = self
                .backup_labels
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&label)
                .cloned();
            let info = match cached {
                Some(info) => info,
                None => {
                    let Some(parsed) = WalName::parse(&label) else { continue };
                    // Unreadable (encrypted without backup.age_identity_file,
                    // S3 away): that backup protects nothing yet, so less
                    // is deleted, never more.
                    let info = match self.archiver.fetch(&parsed).await {
                        Ok(data) => {
                            data.and_then(|data| super::restore::parse_backup_file(&String::from_utf8_lossy(&data)))
                        }
                        Err(err) => {
                            warn!(file = %label, "WAL retention cannot read a backup label: {err}");
                            return Ok((None, 0));
                        }
                    };
                    self.backup_labels
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(label.clone(), info.clone());
                    info
                }
            };
            if let Some(info) = info {
                if retained.contains(&info.key) && info.start_segment.len() == 24 {
                    starts.insert(info.key, info.start_segment);
                }
            }
        }
        // Every retained base backup must be accounted for: one whose label
        // is not (yet) in the archive keeps all WAL.
        if let Some(unknown) = retained.iter().find(|key| !starts.contains_key(*key)) {
            warn!(backup = %unknown, "WAL retention: no backup label archived for a retained base backup; deleting no WAL");
            return Ok((None, 0));
        }
        // Compared by segment number (the 16 hex digits after the timeline).
        let Some(oldest) = starts.into_values().min_by(|a, b| a[8..].cmp(&b[8..])) else {
            return Ok((None, 0));
        };
        let catalog = self.archiver.catalog.clone().expect("the daemon always has a catalog");
        let mut deleted = 0;
        let mut kept = Vec::with_capacity(rows.len());
        for row in rows.drain(..) {
            let old = WalName::parse(&row.name).is_some_and(|n| n.kind != WalFileKind::History)
                && row.name.len() >= 24
                && row.name[8..24] < oldest[8..];
            if old {
                self.archiver.objects.delete(&row.key).await?;
                catalog.forget(&row.name).await?;
                deleted += 1;
            } else {
                kept.push(row);
            }
        }
        *rows = kept;
        if deleted > 0 {
            info!(oldest_needed = %oldest, deleted, "WAL retention: deleted {deleted} file(s) no retained base backup needs");
        }
        Ok((Some(oldest), deleted))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str) -> WalRow {
        WalRow {
            timeline: u32::from_str_radix(&name[..8], 16).unwrap(),
            name: name.into(),
            raw_sha256: String::new(),
            size: 16 * 1024 * 1024,
            archived_ms: 0,
            key: String::new(),
        }
    }

    #[test]
    fn gaps_are_the_holes_between_oldest_and_newest() {
        let rows = [
            row("0000000100000000000000FE"),
            row("000000010000000100000001"),
            row("00000002.history"),
            row("000000020000000100000005"),
        ];
        assert_eq!(
            find_gaps(&rows),
            vec![
                "0000000100000000000000FF".to_string(),
                "000000010000000100000000".to_string()
            ]
        );
    }
}
