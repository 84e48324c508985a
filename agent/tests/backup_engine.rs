//! The job engine through the library, with the local object store: cron
//! schedules fire (tokio-cron-scheduler), one job never runs twice at once,
//! an attempt past its timeout is aborted, failed attempts are retried with
//! backoff, shutdown aborts a running upload and records it, and the status
//! model follows.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use platform_agent::backup::{
    BackupError, BackupJob, BackupKind, BackupService, BackupSettings, BackupState, FilesSource, Progress,
};
use platform_agent::objstore::{LocalStore, ObjectStore};
use platform_agent::status::{BackupResult, Health, Status, StatusHandle};
use platform_agent::store::Store;
use tokio_util::sync::CancellationToken;

struct Engine {
    dir: tempfile::TempDir,
    service: Arc<BackupService>,
    objects: Arc<LocalStore>,
    status: StatusHandle,
}

fn files_job(name: &str, base: &Path) -> BackupJob {
    BackupJob {
        name: name.into(),
        kind: BackupKind::Files,
        retries: 0,
        files: Some(FilesSource {
            base_dir: base.to_path_buf(),
            paths: vec!["data".into()],
        }),
        ..BackupJob::default()
    }
}

/// `data/` below the temp dir holds `mib` MiB; `rate` limits uploads.
fn engine(mib: usize, rate: u64, jobs: impl FnOnce(&Path) -> Vec<BackupJob>) -> Engine {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("data/file"), vec![42u8; mib * 1024 * 1024]).unwrap();
    let settings = BackupSettings {
        scratch_dir: dir.path().join("scratch"),
        compression: platform_agent::backup::Compression::None,
        max_upload_bytes_per_second: rate,
        jobs: jobs(dir.path()),
        ..BackupSettings::default()
    };
    let store = Store::open(&dir.path().join("state")).unwrap();
    let objects = Arc::new(LocalStore::new(dir.path().join("objects")));
    let status = StatusHandle::new(Status::new("test"));
    let service = BackupService::new(
        &settings,
        store,
        objects.clone(),
        status.clone(),
        Some(1),
        Arc::new(|| false),
    )
    .unwrap();
    Engine {
        dir,
        service,
        objects,
        status,
    }
}

/// Polls `$probe` (an expression giving an Option) every 50 ms until it is
/// Some, failing after `$deadline`.
macro_rules! wait_until {
    ($what:expr, $deadline:expr, $probe:expr) => {{
        let end = tokio::time::Instant::now() + $deadline;
        loop {
            if let Some(value) = $probe {
                break value;
            }
            assert!(tokio::time::Instant::now() < end, "timed out waiting for {}", $what);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_fire_without_overlapping_runs() {
    // Every second, but each run takes about 2.5 s (rate limit): the
    // triggers in between must be skipped, not stacked.
    let engine = engine(5, 2 * 1024 * 1024, |base| {
        vec![BackupJob {
            schedule: "* * * * * *".into(),
            run_missed: false,
            ..files_job("often", base)
        }]
    });
    let cancel = CancellationToken::new();
    let task = tokio::spawn(engine.service.clone().run(cancel.clone()));
    let rows = wait_until!("two scheduled runs", Duration::from_secs(20), {
        let rows = engine.service.list(Some("often"), 100).await.unwrap();
        (rows.iter().filter(|r| r.state.is_success()).count() >= 2).then_some(rows)
    });
    assert!(rows.iter().all(|r| r.trigger == "schedule"), "{rows:#?}");
    // Runs never overlap: each started after the previous one finished.
    let mut ordered = rows.clone();
    ordered.sort_by_key(|r| r.started_ms);
    for pair in ordered.windows(2) {
        let finished = pair[0].finished_ms.unwrap_or(i64::MAX);
        assert!(pair[1].started_ms >= finished, "overlap: {pair:#?}");
    }
    let status = engine.status.snapshot();
    assert_eq!(status.backup_jobs[0].job, "often");
    assert!(status.backup_jobs[0].next_run.is_some());
    cancel.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_run_of_a_busy_job_is_refused() {
    let engine = engine(4, 1024 * 1024, |base| vec![files_job("slow", base)]);
    let first = {
        let service = engine.service.clone();
        tokio::spawn(async move { service.backup_now("slow", Progress::default()).await })
    };
    wait_until!(
        "the first run to start",
        Duration::from_secs(10),
        engine.service.progress_of("slow").map(|_| ())
    );
    let second = engine.service.backup_now("slow", Progress::default()).await;
    assert!(matches!(second, Err(BackupError::Busy { .. })), "{second:?}");
    let runs = first.await.unwrap().unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].state, BackupState::Verified);
    let unknown = engine.service.backup_now("nope", Progress::default()).await;
    assert!(matches!(unknown, Err(BackupError::UnknownJob(_))), "{unknown:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_past_its_timeout_is_aborted_and_recorded() {
    let engine = engine(8, 1024 * 1024, |base| {
        vec![BackupJob {
            timeout: Duration::from_secs(1),
            ..files_job("short", base)
        }]
    });
    let err = engine
        .service
        .backup_now("short", Progress::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("timed out after 1s"), "{err}");
    let rows = engine.service.list(Some("short"), 10).await.unwrap();
    assert_eq!(rows[0].state, BackupState::Failed);
    assert!(engine.objects.list("").await.unwrap().is_empty(), "nothing stored");
    let status = engine.status.snapshot();
    assert_eq!(status.backup_jobs[0].last_result, Some(BackupResult::Failure));
    assert!(
        matches!(status.backups, Health::Degraded { .. }),
        "{:?}",
        status.backups
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempt_is_retried_after_the_backoff() {
    let engine = engine(1, 0, |base| {
        vec![BackupJob {
            retries: 2,
            retry_backoff: Duration::from_millis(700),
            files: Some(FilesSource {
                base_dir: base.to_path_buf(),
                paths: vec!["later".into()],
            }),
            ..files_job("flaky", base)
        }]
    });
    // The path appears while the first retry waits.
    let later = engine.dir.path().join("later");
    let creator = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        std::fs::write(later, b"here now").unwrap();
    });
    let runs = engine.service.backup_now("flaky", Progress::default()).await.unwrap();
    creator.await.unwrap();
    assert_eq!(runs.len(), 2, "{runs:#?}");
    assert_eq!((runs[0].attempt, runs[0].state), (1, BackupState::Failed));
    assert!(
        runs[0].error.as_deref().unwrap().contains("later"),
        "{:?}",
        runs[0].error
    );
    assert_eq!((runs[1].attempt, runs[1].state), (2, BackupState::Verified));
    assert_eq!(runs[1].trigger, "retry");
    assert_eq!(runs[1].batch, runs[0].batch, "one job run");
    assert!(
        runs[1].started_ms - runs[0].finished_ms.unwrap() >= 650,
        "backoff waited"
    );
    let status = engine.status.snapshot();
    assert_eq!(status.backup_jobs[0].last_result, Some(BackupResult::Success));
    assert_eq!(status.backups, Health::Ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_aborts_a_running_upload_and_records_it() {
    let engine = engine(8, 1024 * 1024, |base| vec![files_job("long", base)]);
    let cancel = CancellationToken::new();
    let task = tokio::spawn(engine.service.clone().run(cancel.clone()));
    let run = {
        let service = engine.service.clone();
        tokio::spawn(async move { service.backup_now("long", Progress::default()).await })
    };
    wait_until!(
        "bytes flowing",
        Duration::from_secs(10),
        engine
            .service
            .progress_of("long")
            .filter(|p| p.done > 1024 * 1024)
            .map(|_| ())
    );
    let stopping = tokio::time::Instant::now();
    cancel.cancel();
    task.await.unwrap().unwrap();
    assert!(stopping.elapsed() < Duration::from_secs(5), "{:?}", stopping.elapsed());
    let err = run.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("aborted: the agent is stopping"), "{err}");
    let rows = engine.service.list(Some("long"), 10).await.unwrap();
    assert_eq!(rows[0].state, BackupState::Failed);
    assert!(engine.objects.list("").await.unwrap().is_empty());
    let partial = std::fs::read_dir(engine.dir.path().join("objects/.pa-partial"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(partial, 0, "no partial file left");
    let after = engine.service.backup_now("long", Progress::default()).await;
    assert!(matches!(after, Err(BackupError::ShuttingDown)), "{after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_restore_drill_tests_the_newest_backup() {
    let engine = engine(1, 0, |base| {
        vec![BackupJob {
            verify_schedule: "* * * * * *".into(),
            ..files_job("drilled", base)
        }]
    });
    let runs = engine.service.backup_now("drilled", Progress::default()).await.unwrap();
    let id = runs[0].id;
    assert_eq!(runs[0].tested_ms, None, "{runs:#?}");
    let cancel = CancellationToken::new();
    let task = tokio::spawn(engine.service.clone().run(cancel.clone()));
    // The drill fires on its own schedule (no backup schedule is set): the
    // catalog row gets a test time and the test restore's result.
    let row = wait_until!("the drill to test the backup", Duration::from_secs(20), {
        let rows = engine.service.list(Some("drilled"), 10).await.unwrap();
        rows.into_iter().find(|r| r.id == id && r.tested_ms.is_some())
    });
    assert!(row.test_result.as_deref().is_some_and(|t| !t.is_empty()), "{row:#?}");
    let rows = engine.service.list(Some("drilled"), 10).await.unwrap();
    assert_eq!(rows.len(), 1, "a drill makes no new backup: {rows:#?}");
    cancel.cancel();
    task.await.unwrap().unwrap();
}
