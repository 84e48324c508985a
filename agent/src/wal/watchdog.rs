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
