//! Which backups retention keeps and which it deletes, as one pure function
//! over a job's catalog rows, so that every safety rule lives in one place:
//!
//! - Time is counted from the newest successful backup of the target, not
//!   from the clock: a node whose backups have been failing for a month does
//!   not age its last good ones away.
//! - When the newest run of a target failed, nothing of that target is
//!   deleted until a run succeeds again.
//! - The newest `min_verified` verified backups are always kept, whatever
//!   `max_age` and the keep rules say.
//! - With no keep rule and no `max_age`, everything is kept.
//!
//! Keep rules: `keep_last` newest backups; `keep_hourly`/`daily`/`weekly`/
//! `monthly` keep the newest backup of each of the last N hours, days, ISO
//! weeks and months (UTC) that have one. `max_age` deletes what is older
//! than that (before the newest success), except for `min_verified`; set
//! alone, it keeps everything younger.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Datelike, Timelike, Utc};
use serde::{Deserialize, Serialize};

use super::catalog::{BackupRecord, BackupState};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub keep_last: u32,
    pub keep_hourly: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
    pub max_age: Duration,
    pub min_verified: u32,
}

impl Policy {
    pub fn from_job(job: &super::BackupJob) -> Self {
        Policy {
            keep_last: job.keep_last,
            keep_hourly: job.keep_hourly,
            keep_daily: job.keep_daily,
            keep_weekly: job.keep_weekly,
            keep_monthly: job.keep_monthly,
            max_age: job.max_age,
            min_verified: job.min_verified,
        }
    }

    fn has_count_rules(&self) -> bool {
        self.keep_last > 0
            || self.keep_hourly > 0
            || self.keep_daily > 0
            || self.keep_weekly > 0
            || self.keep_monthly > 0
    }

    fn has_rules(&self) -> bool {
        self.has_count_rules() || !self.max_age.is_zero()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Keep,
    Delete,
}

/// One backup object and what retention decided for it, with why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub id: i64,
    pub job: String,
    pub target: String,
    pub key: String,
    pub started_ms: i64,
    pub state: BackupState,
    pub verdict: Verdict,
    pub reasons: Vec<String>,
}

/// Decides for every backup with an object in `rows` (one job; any number
/// of targets). Rows without an object (running, failed, pruned) are only
/// looked at to find each target's newest run.
pub fn decide(rows: &[BackupRecord], policy: &Policy) -> Vec<Decision> {
    let mut targets: BTreeMap<&str, Vec<&BackupRecord>> = BTreeMap::new();
    for row in rows {
        targets.entry(row.target.as_str()).or_default().push(row);
    }
    let mut decisions = Vec::new();
    for (_, mut series) in targets {
        series.sort_by_key(|r| (r.started_ms, r.id));
        decisions.extend(decide_series(&series, policy));
    }
    decisions
}

/// Names the hour, day, ISO week or month a time falls in.
type BucketOf = fn(DateTime<Utc>) -> String;

fn decide_series(series: &[&BackupRecord], policy: &Policy) -> Vec<Decision> {
    // Newest first from here on.
    let mut backups: Vec<&BackupRecord> = series
        .iter()
        .copied()
        .filter(|r| r.state.is_success() && r.key.is_some())
        .collect();
    backups.reverse();
    let mut reasons: BTreeMap<i64, Vec<String>> = backups.iter().map(|r| (r.id, Vec::new())).collect();
    let mut keep: BTreeSet<i64> = BTreeSet::new();
    let mut mark = |keep: &mut BTreeSet<i64>, id: i64, why: String| {
        keep.insert(id);
        reasons.entry(id).or_default().push(why);
    };

    // The newest finished run: a running one says nothing yet.
    let newest_run = series.iter().rev().find(|r| r.state != BackupState::Running);
    let newest_failed = newest_run.filter(|r| r.state == BackupState::Failed);
    let freeze = newest_failed.map(|r| {
        format!(
            "the newest run ({}) failed; nothing is deleted until a run succeeds",
            r.id
        )
    });

    let mut verified = 0;
    for r in &backups {
        if verified < policy.min_verified && r.state == BackupState::Verified {
            verified += 1;
            mark(
                &mut keep,
                r.id,
                format!("min-verified: one of the newest {} verified", policy.min_verified),
            );
        }
    }

    let reference_ms = backups.first().map(|r| r.started_ms).unwrap_or(0);
    let too_old =
        |r: &BackupRecord| !policy.max_age.is_zero() && reference_ms - r.started_ms > policy.max_age.as_millis() as i64;

    if !policy.has_count_rules() && !policy.max_age.is_zero() {
        // max_age alone: keep everything younger.
        for r in &backups {
            if !too_old(r) {
                mark(
                    &mut keep,
                    r.id,
                    format!("within max-age {}", humantime::format_duration(policy.max_age)),
                );
            }
        }
    }
    for (position, r) in backups.iter().enumerate() {
        if (position as u32) < policy.keep_last && !too_old(r) {
            mark(
                &mut keep,
                r.id,
                format!("keep-last: {} of {}", position + 1, policy.keep_last),
            );
        }
    }
    let periods: [(&str, u32, BucketOf); 4] = [
        ("hourly", policy.keep_hourly, |t| {
            format!("{:04}-{:02}-{:02}T{:02}", t.year(), t.month(), t.day(), t.hour())
        }),
        ("daily", policy.keep_daily, |t| {
            format!("{:04}-{:02}-{:02}", t.year(), t.month(), t.day())
        }),
        ("weekly", policy.keep_weekly, |t| {
            let week = t.iso_week();
            format!("{:04}-W{:02}", week.year(), week.week())
        }),
        ("monthly", policy.keep_monthly, |t| {
            format!("{:04}-{:02}", t.year(), t.month())
        }),
    ];
    for (name, count, bucket_of) in periods {
        if count == 0 {
            continue;
        }
        let mut seen: BTreeSet<String> = BTreeSet::new();
        for r in &backups {
            let Some(time) = DateTime::<Utc>::from_timestamp_millis(r.started_ms) else {
                continue;
            };
            let bucket = bucket_of(time);
            if seen.contains(&bucket) {
                continue;
            }
            if seen.len() as u32 >= count {
                break;
            }
            seen.insert(bucket.clone());
            if !too_old(r) {
                mark(&mut keep, r.id, format!("keep-{name}: newest of {bucket}"));
            }
        }
    }

    backups
        .iter()
        .map(|r| {
            let mut why = reasons.remove(&r.id).unwrap_or_default();
            let verdict = if let Some(freeze) = &freeze {
                why.push(freeze.clone());
                Verdict::Keep
            } else if !policy.has_rules() {
                why.push("no keep rule and no max-age: everything is kept".into());
                Verdict::Keep
            } else if keep.contains(&r.id) {
                Verdict::Keep
            } else {
                if too_old(r) {
                    why.push(format!(
                        "older than max-age {} before the newest backup",
                        humantime::format_duration(policy.max_age)
                    ));
                } else {
                    why.push("not selected by any keep rule".into());
                }
                Verdict::Delete
            };
            Decision {
                id: r.id,
                job: r.job.clone(),
                target: r.target.clone(),
                key: r.key.clone().unwrap_or_default(),
                started_ms: r.started_ms,
                state: r.state,
                verdict,
                reasons: why,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;
    const DAY: i64 = 24 * HOUR;
    /// 2026-01-05T00:00:00Z, a Monday.
    const T0: i64 = 1_767_571_200_000;

    fn row(id: i64, started_ms: i64, state: BackupState) -> BackupRecord {
        BackupRecord {
            id,
            batch: id,
            job: "pg".into(),
            kind: "postgres".into(),
            target: "app".into(),
            trigger: "schedule".into(),
            attempt: 1,
            state,
            key: state.is_success().then(|| format!("pg/app/{id}")),
            started_ms,
            finished_ms: Some(started_ms + 1000),
            bytes: Some(1),
            raw_bytes: Some(1),
            sha256: None,
            raw_sha256: None,
            compression: "zstd".into(),
            encryption: "none".into(),
            error: None,
            verified_ms: None,
            tested_ms: None,
            test_result: None,
            pruned_ms: None,
        }
    }

    fn daily(days: i64, state: BackupState) -> Vec<BackupRecord> {
        (0..days).map(|d| row(d + 1, T0 + d * DAY, state)).collect()
    }

    fn deleted(decisions: &[Decision]) -> Vec<i64> {
        decisions
            .iter()
            .filter(|d| d.verdict == Verdict::Delete)
            .map(|d| d.id)
            .collect()
    }

    #[test]
    fn keep_last_keeps_the_newest() {
        let rows = daily(5, BackupState::Verified);
        let policy = Policy {
            keep_last: 2,
            ..Policy::default()
        };
        let decisions = decide(&rows, &policy);
        assert_eq!(deleted(&decisions), vec![3, 2, 1]);
        let kept = decisions.iter().find(|d| d.id == 5).unwrap();
        assert_eq!(kept.reasons, vec!["keep-last: 1 of 2"]);
    }

    #[test]
    fn a_failed_newest_run_freezes_deletion() {
        let mut rows = daily(5, BackupState::Verified);
        rows.push(row(6, T0 + 5 * DAY, BackupState::Failed));
        let policy = Policy {
            keep_last: 1,
            max_age: Duration::from_secs(3600),
            ..Policy::default()
        };
        let decisions = decide(&rows, &policy);
        assert!(deleted(&decisions).is_empty(), "{decisions:#?}");
        assert!(decisions
            .iter()
            .all(|d| d.reasons.iter().any(|r| r.contains("newest run (6) failed"))));
        assert_eq!(decisions.len(), 5, "the failed run has no object to decide on");

        // A running attempt after the failure does not lift the freeze ...
        rows.push(row(7, T0 + 5 * DAY + HOUR, BackupState::Running));
        assert!(deleted(&decide(&rows, &policy)).is_empty());
        // ... a success does.
        rows.push(row(8, T0 + 5 * DAY + 2 * HOUR, BackupState::Verified));
        assert_eq!(deleted(&decide(&rows, &policy)), vec![5, 4, 3, 2, 1]);
    }

    #[test]
    fn min_verified_overrides_max_age_and_keep_rules() {
        // Old verified backups, then recent ones that were only uploaded.
        let mut rows = daily(3, BackupState::Verified);
        rows.extend((0..3).map(|i| row(10 + i, T0 + 30 * DAY + i * HOUR, BackupState::Uploaded)));
        let policy = Policy {
            keep_last: 1,
            max_age: Duration::from_secs(7 * 24 * 3600),
            min_verified: 2,
            ..Policy::default()
        };
        let decisions = decide(&rows, &policy);
        assert_eq!(deleted(&decisions), vec![11, 10, 1]);
        let kept = decisions.iter().find(|d| d.id == 2).unwrap();
        assert_eq!(kept.verdict, Verdict::Keep);
        assert!(kept.reasons[0].starts_with("min-verified"), "{kept:?}");
        let old = decisions.iter().find(|d| d.id == 1).unwrap();
        assert!(old.reasons[0].contains("older than max-age 7days"), "{old:?}");
    }

    #[test]
    fn age_counts_from_the_newest_success_not_from_now() {
        // The last success was long ago (backups have been failing since,
        // but a success came last); max_age must not wipe them.
        let rows = daily(10, BackupState::Uploaded);
        let policy = Policy {
            max_age: Duration::from_secs(3 * 24 * 3600),
            ..Policy::default()
        };
        assert_eq!(deleted(&decide(&rows, &policy)), vec![6, 5, 4, 3, 2, 1]);
    }

    #[test]
    fn no_rules_keeps_everything() {
        let rows = daily(4, BackupState::Uploaded);
        let decisions = decide(&rows, &Policy::default());
        assert!(deleted(&decisions).is_empty());
        assert!(decisions[0].reasons[0].contains("no keep rule"));
    }

    #[test]
    fn period_buckets_keep_the_newest_of_each() {
        // Four backups a day for 20 days.
        let rows: Vec<BackupRecord> = (0..80)
            .map(|i| row(i + 1, T0 + (i / 4) * DAY + (i % 4) * 6 * HOUR, BackupState::Uploaded))
            .collect();
        let policy = Policy {
            keep_daily: 3,
            keep_weekly: 2,
            keep_monthly: 1,
            ..Policy::default()
        };
        let decisions = decide(&rows, &policy);
        let kept: Vec<i64> = decisions
            .iter()
            .filter(|d| d.verdict == Verdict::Keep)
            .map(|d| d.id)
            .collect();
        // Days 19, 18, 17 (newest of each: ids 80, 76, 72); weeks: the
        // newest of this week (80) and of the week before (day 13 is a
        // Sunday: id 56); month: January's newest (80).
        assert_eq!(kept, vec![80, 76, 72, 56]);
        let last = decisions.iter().find(|d| d.id == 80).unwrap();
        assert_eq!(last.reasons.len(), 3, "{last:?}");
    }

    #[test]
    fn targets_are_separate_series() {
        let mut rows = daily(3, BackupState::Verified);
        let mut other: Vec<BackupRecord> = daily(3, BackupState::Verified)
            .into_iter()
            .map(|mut r| {
                r.id += 100;
                r.target = "grafana".into();
                r
            })
            .collect();
        other.push({
            let mut r = row(200, T0 + 3 * DAY, BackupState::Failed);
            r.target = "grafana".into();
            r
        });
        rows.extend(other);
        let policy = Policy {
            keep_last: 1,
            ..Policy::default()
        };
        // app prunes; grafana's newest failed, so it keeps all.
        assert_eq!(deleted(&decide(&rows, &policy)), vec![2, 1]);
    }
}
