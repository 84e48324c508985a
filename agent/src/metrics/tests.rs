use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::encode::{Encoder, Format, MetricType};
use super::exposition::{self, Family};
use super::node::filesystem::{FsStats, FS_TYPES_EXCLUDE, MOUNT_POINTS_EXCLUDE};
use super::node::{self, CollectError, Collector};
use super::{MetricsSettings, Scraper};
use crate::status::Status;

fn parse(body: &[u8]) -> Vec<Family> {
    exposition::parse(std::str::from_utf8(body).unwrap()).unwrap()
}

fn sample(families: &[Family], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    families.iter().find(|f| f.name == name).and_then(|f| {
        f.samples
            .iter()
            .find(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
            })
            .map(|s| s.value)
    })
}

fn success(families: &[Family], collector: &str) -> f64 {
    sample(families, "node_scrape_collector_success", &[("collector", collector)])
        .unwrap_or_else(|| panic!("no success series for {collector}"))
}

/// Blocks every caller until `release` is called (and none after); counts
/// the calls.
#[derive(Clone, Default)]
struct Gate {
    calls: Arc<AtomicUsize>,
    open: Arc<(Mutex<bool>, Condvar)>,
}

impl Gate {
    fn wait(&self) {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let (open, cond) = &*self.open;
        let mut open = open.lock().unwrap();
        while !*open {
            open = cond.wait(open).unwrap();
        }
    }

    fn release(&self) {
        let (open, cond) = &*self.open;
        *open.lock().unwrap() = true;
        cond.notify_all();
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

/// Scrapes until `done` holds for the result (a released collector needs a
/// moment to return on its thread), or panics after a few seconds.
async fn scrape_until(scraper: &Scraper, done: impl Fn(&[Family]) -> bool) -> Vec<Family> {
    let start = Instant::now();
    loop {
        let families = parse(&scraper.scrape(Format::Text, &Status::new("0.0.0")).await);
        if done(&families) {
            return families;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "condition not reached");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn stuck_statfs_fails_the_filesystem_collector_and_the_scrape_still_answers_on_time() {
    let dir = tempfile::tempdir().unwrap();
    let mountinfo = dir.path().join("mountinfo");
    std::fs::write(
        &mountinfo,
        "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n\
         2 1 0:50 / /stuck rw - ext4 /dev/sdb rw\n\
         3 1 0:51 / /ok rw - xfs /dev/sdc rw\n",
    )
    .unwrap();
    let gate = Gate::default();
    let stat_gate = gate.clone();
    let filesystem = node::Filesystem::new(MOUNT_POINTS_EXCLUDE, FS_TYPES_EXCLUDE)
        .unwrap()
        .with_mountinfo(mountinfo)
        .with_stat(Arc::new(move |path: &str| {
            if path == "/stuck" {
                stat_gate.wait();
            }
            Ok(FsStats {
                size: 1000,
                free: 500,
                avail: 400,
                files: 10,
                files_free: 5,
            })
        }));
    // Generous, because `cargo test` runs this beside everything else on two
    // cores: only the first scrape waits for it.
    let timeout = Duration::from_millis(1500);
    let scraper = Scraper::new(vec![Box::new(filesystem), Box::new(node::Loadavg)], timeout);

    for round in 0..3 {
        let start = Instant::now();
        let families = parse(&scraper.scrape(Format::Text, &Status::new("0.0.0")).await);
        let took = start.elapsed();
        assert!(
            took < timeout + Duration::from_millis(500),
            "round {round}: scrape took {took:?}"
        );
        assert_eq!(success(&families, "filesystem"), 0.0, "round {round}");
        assert_eq!(success(&families, "loadavg"), 1.0, "round {round}");
        let device_error = |mp| sample(&families, "node_filesystem_device_error", &[("mountpoint", mp)]);
        assert_eq!(device_error("/stuck"), Some(1.0), "round {round}");
        assert_eq!(device_error("/ok"), Some(0.0), "round {round}");
        assert_eq!(
            sample(&families, "node_filesystem_size_bytes", &[("mountpoint", "/ok")]),
            Some(1000.0)
        );
        assert_eq!(
            sample(&families, "node_filesystem_size_bytes", &[("mountpoint", "/stuck")]),
            None
        );
        if round > 0 {
            assert!(
                took < timeout / 2,
                "round {round}: a known-stuck mount is skipped without waiting, took {took:?}"
            );
        }
    }
    assert_eq!(
        gate.calls(),
        1,
        "the stuck mount was not stat'ed again while its call hung"
    );

    gate.release();
    let families = scrape_until(&scraper, |f| success(f, "filesystem") == 1.0).await;
    assert_eq!(
        sample(&families, "node_filesystem_device_error", &[("mountpoint", "/stuck")]),
        Some(0.0)
    );
    assert_eq!(gate.calls(), 2, "stat'ed again once the hung call returned");
}

#[tokio::test]
async fn network_filesystems_are_stated_off_the_scrape_path_and_served_from_cache() {
    let dir = tempfile::tempdir().unwrap();
    let mountinfo = dir.path().join("mountinfo");
    std::fs::write(
        &mountinfo,
        "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n\
         2 1 0:60 / /srv/share rw - nfs4 server:/export rw\n",
    )
    .unwrap();
    let gate = Gate::default();
    let stat_gate = gate.clone();
    let threads = Arc::new(Mutex::new(Vec::new()));
    let seen = threads.clone();
    let filesystem = node::Filesystem::new(MOUNT_POINTS_EXCLUDE, FS_TYPES_EXCLUDE)
        .unwrap()
        .with_mountinfo(mountinfo)
        .with_stat(Arc::new(move |path: &str| {
            if path == "/srv/share" {
                let name = std::thread::current().name().map(str::to_string);
                seen.lock().unwrap().push(name);
                stat_gate.wait();
            }
            Ok(FsStats {
                size: 2000,
                free: 1000,
                avail: 900,
                files: 20,
                files_free: 10,
            })
        }));
    let timeout = Duration::from_millis(1500);
    let scraper = Scraper::new(vec![Box::new(filesystem)], timeout);

    let start = Instant::now();
    let families = parse(&scraper.scrape(Format::Text, &Status::new("0.0.0")).await);
    assert!(
        start.elapsed() < timeout / 3,
        "the scrape did not wait for the NFS server: {:?}",
        start.elapsed()
    );
    assert_eq!(success(&families, "filesystem"), 1.0);
    assert_eq!(
        sample(&families, "node_filesystem_size_bytes", &[("mountpoint", "/")]),
        Some(2000.0)
    );
    assert_eq!(
        sample(
            &families,
            "node_filesystem_device_error",
            &[("mountpoint", "/srv/share")]
        ),
        None,
        "no figures before the first background statfs returns"
    );

    gate.release();
    let families = scrape_until(&scraper, |f| {
        sample(f, "node_filesystem_size_bytes", &[("mountpoint", "/srv/share")]).is_some()
    })
    .await;
    assert_eq!(
        sample(
            &families,
            "node_filesystem_device_error",
            &[("mountpoint", "/srv/share")]
        ),
        Some(0.0)
    );
    let threads = threads.lock().unwrap();
    assert_eq!(
        threads.len(),
        1,
        "one background statfs per refresh interval, not one per scrape"
    );
    assert_eq!(threads[0].as_deref(), Some("statfs-net"));
}

struct Hanging {
    gate: Gate,
}

impl Collector for Hanging {
    fn name(&self) -> &'static str {
        "hanging"
    }

    fn collect(&self, out: &mut Encoder, _deadline: Instant) -> Result<(), CollectError> {
        self.gate.wait();
        out.single("hanging_metric", "x", MetricType::Gauge, 1.0);
        Ok(())
    }
}

#[tokio::test]
async fn collector_that_never_returns_is_reported_failed_and_not_restarted() {
    let gate = Gate::default();
    let timeout = Duration::from_millis(1500);
    let scraper = Scraper::new(
        vec![Box::new(Hanging { gate: gate.clone() }), Box::new(node::Loadavg)],
        timeout,
    );
    for round in 0..3 {
        let start = Instant::now();
        let families = parse(&scraper.scrape(Format::Text, &Status::new("0.0.0")).await);
        let took = start.elapsed();
        assert!(took < timeout + Duration::from_millis(500), "round {round}: {took:?}");
        assert_eq!(success(&families, "hanging"), 0.0);
        assert_eq!(success(&families, "loadavg"), 1.0);
        assert!(families.iter().all(|f| f.name != "hanging_metric"));
        assert!(sample(&families, "node_load1", &[]).is_some());
    }
    assert_eq!(gate.calls(), 1, "one stuck thread, not one per scrape");
    gate.release();
    let families = scrape_until(&scraper, |f| success(f, "hanging") == 1.0).await;
    assert_eq!(sample(&families, "hanging_metric", &[]), Some(1.0));
}

/// Families each collector must produce on any Linux host (the ones that
/// depend on hardware, like per-disk series, are checked where they exist).
const REQUIRED: &[(&str, &str)] = &[
    ("cpu", "node_cpu_seconds_total"),
    ("filefd", "node_filefd_allocated"),
    ("filesystem", "node_filesystem_size_bytes"),
    ("loadavg", "node_load1"),
    ("meminfo", "node_memory_MemTotal_bytes"),
    ("netdev", "node_network_receive_bytes_total"),
    ("stat", "node_boot_time_seconds"),
    ("time", "node_time_seconds"),
    ("uname", "node_uname_info"),
    ("vmstat", "node_vmstat_pgfault"),
    ("textfile", "node_textfile_scrape_error"),
];

#[tokio::test]
async fn scrape_of_this_host_is_well_formed_in_both_formats() {
    let dir = tempfile::tempdir().unwrap();
    let settings = MetricsSettings {
        textfile_dir: dir.path().to_path_buf(),
        ..MetricsSettings::default()
    };
    let scraper = Scraper::new(node::default_collectors(&settings).unwrap(), Duration::from_secs(5));
    let body = scraper.scrape(Format::Text, &Status::new("0.0.0")).await;
    let families = parse(&body);
    for (collector, family) in REQUIRED {
        assert_eq!(success(&families, collector), 1.0, "{collector}");
        assert!(families.iter().any(|f| f.name == *family), "{family} missing");
    }
    let cpu = families.iter().find(|f| f.name == "node_cpu_seconds_total").unwrap();
    assert_eq!(cpu.kind, "counter");
    assert_eq!(cpu.label_names(), ["cpu", "mode"]);
    assert!(families.iter().any(|f| f.name == "platform_agent_build_info"));

    let om = String::from_utf8(scraper.scrape(Format::OpenMetrics, &Status::new("0.0.0")).await).unwrap();
    assert!(om.ends_with("# EOF\n"));
    assert!(om.contains("# TYPE node_cpu_seconds counter\n"));
    assert!(om.contains("\nnode_cpu_seconds_total{cpu=\"0\",mode=\"idle\"} "));
}

#[test]
fn settings_are_validated() {
    assert!(MetricsSettings::default().validate().is_empty());
    let bad = MetricsSettings {
        listen: "9102".into(),
        unix_socket: "relative.sock".into(),
        textfile_dir: "relative".into(),
        collector_timeout: Duration::from_millis(1),
        filesystem_fs_types_exclude: "(".into(),
        ..MetricsSettings::default()
    };
    let keys: Vec<&str> = bad.validate().into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        keys,
        [
            "listen",
            "unix_socket",
            "textfile_dir",
            "collector_timeout",
            "filesystem_fs_types_exclude"
        ]
    );
}
