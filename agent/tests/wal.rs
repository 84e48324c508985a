//! WAL archiving end to end: the real binary as a daemon, PostgreSQL 15
//! running `platform-agent wal-push %p %f` as its archive_command (as the
//! `postgres` user, over the control socket), and a real S3 server (s3s-fs).
//! The promises of PostgreSQL's archive_command contract are checked on the
//! server's disk: a segment reported archived is there, whole, with the
//! SHA-256 of the segment in pg_wal.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{wait_for, BIN};
use platform_agent_testsupport::{make_writable_by_postgres, Postgres, S3Server};
use serde_json::Value;
use sha2::{Digest, Sha256};

const BUCKET: &str = "wal";

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The binary under test, copied once per test process into a directory
/// every user may enter: PostgreSQL runs it as `postgres`, which need not be
/// able to reach the build's target directory.
fn bin() -> &'static str {
    static BIN_COPY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN_COPY.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        chmod(&dir, 0o755);
        let copy = dir.join("platform-agent");
        std::fs::copy(BIN, &copy).unwrap();
        chmod(&copy, 0o755);
        copy.display().to_string()
    })
}

/// The daemon with WAL archiving to s3s-fs; its directory (config, socket)
/// is reachable by the `postgres` user, the socket's group is `postgres`.
struct Rig {
    s3: S3Server,
    dir: tempfile::TempDir,
    daemon: Option<std::process::Child>,
}

impl Rig {
    fn start(wal_extra: &str) -> Rig {
        let s3 = S3Server::start();
        s3.create_bucket(BUCKET);
        // The test's wrapper (running as postgres) looks at the server's files.
        chmod(s3.data_dir().parent().unwrap(), 0o755);
        chmod(s3.data_dir(), 0o755);
        let dir = tempfile::tempdir().unwrap();
        chmod(dir.path(), 0o755);
        let key = dir.path().join("s3-access-key");
        let secret = dir.path().join("s3-secret-key");
        std::fs::write(&key, s3.access_key()).unwrap();
        std::fs::write(&secret, s3.secret_key()).unwrap();
        // Readable by postgres: the direct mode test uploads as postgres.
        chmod(&key, 0o644);
        chmod(&secret, 0o644);
        let config_dir = dir.path().join("config.d");
        std::fs::create_dir(&config_dir).unwrap();
        chmod(&config_dir, 0o755);
        let config = format!(
            "[agent]\nstate_dir = \"../state\"\nshutdown_timeout = \"10s\"\n\
             [control]\nsocket = \"../control.sock\"\ngroup = \"postgres\"\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\ntextfile_dir = \"../textfile\"\n\
             [backup]\nscratch_dir = \"../scratch\"\n\
             [object_store]\nbackend = \"s3\"\n\
             [object_store.s3]\nendpoint = \"{}\"\nbucket = \"{BUCKET}\"\naccess_key_id_file = \"{}\"\nsecret_access_key_file = \"{}\"\n\
             [wal]\nenabled = true\n{wal_extra}\n",
            s3.endpoint(),
            key.display(),
            secret.display()
        );
        let file = config_dir.join("50-wal.toml");
        std::fs::write(&file, config).unwrap();
        chmod(&file, 0o644);
        let mut rig = Rig { s3, dir, daemon: None };
        rig.start_daemon();
        rig
    }

    fn start_daemon(&mut self) {
        let child = Command::new(bin())
            .arg("run")
            .arg("--config")
            .arg(self.config_dir())
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("daemon.log")).unwrap())
            .spawn()
            .unwrap();
        self.daemon = Some(child);
        wait_for("the daemon to answer", Duration::from_secs(30), || {
            self.cli(&["status"]).status.success().then_some(())
        });
    }

    fn stop_daemon(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .args(args)
            .arg("--config")
            .arg(self.config_dir())
            .output()
            .unwrap()
    }

    fn status(&self) -> Value {
        let out = self.cli(&["status", "--json"]);
        assert!(out.status.success(), "status: {}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Adds a drop-in and restarts the daemon on it.
    fn reconfigure(&mut self, name: &str, text: &str) {
        let file = self.config_dir().join(name);
        std::fs::write(&file, text).unwrap();
        chmod(&file, 0o644);
        self.stop_daemon();
        self.start_daemon();
    }

    fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    fn config_dir(&self) -> PathBuf {
        self.dir.path().join("config.d")
    }

    /// `wal-push` as the postgres user, like archive_command.
    fn push_as_postgres(&self, path: &Path, name: &str) -> Output {
        Command::new("runuser")
            .args(["-u", "postgres", "--", bin(), "wal-push", "--config"])
            .arg(self.config_dir())
            .arg(path)
            .arg(name)
            .output()
            .unwrap()
    }

    fn fetch(&self, name: &str, path: &Path) -> Output {
        Command::new(bin())
            .args(["wal-fetch", "--config"])
            .arg(self.config_dir())
            .arg(name)
            .arg(path)
            .output()
            .unwrap()
    }

    fn wal_status(&self) -> Value {
        self.status()["wal_status"].clone()
    }

    /// The object's file on the S3 server's disk.
    fn object(&self, name: &str) -> PathBuf {
        self.s3
            .data_dir()
            .join(BUCKET)
            .join("wal")
            .join(&name[..8])
            .join(format!("{name}.zst"))
    }

    /// The raw SHA-256 of an archived object, read from the server's disk.
    fn archived_sha256(&self, name: &str) -> Option<String> {
        let stored = std::fs::read(self.object(name)).ok()?;
        Some(sha256(&zstd::stream::decode_all(&stored[..]).ok()?))
    }
}

/// A file standing in for a segment: 1 MiB of content derived from `seed`.
fn fake_segment(dir: &Path, name: &str, seed: &str) -> PathBuf {
    let mut data = Vec::with_capacity(1 << 20);
    let mut block = Sha256::digest(seed.as_bytes()).to_vec();
    while data.len() < 1 << 20 {
        block = Sha256::digest(&block).to_vec();
        data.extend_from_slice(&block);
    }
    let path = dir.join(name);
    std::fs::write(&path, &data).unwrap();
    make_writable_by_postgres(&path);
    path
}

fn postgres_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    chmod(dir.path(), 0o755);
    make_writable_by_postgres(dir.path());
    dir
}

#[test]
fn rearchive_of_identical_content_succeeds_and_of_different_content_fails() {
    // No watchdog: the WAL service has no task of its own then, and must
    // still keep serving pushes (it once ended, and took the agent down).
    let rig = Rig::start("watchdog_interval = \"0s\"\n");
    let dir = postgres_dir();
    let name = "000000010000000000000007";
    let first = fake_segment(dir.path(), name, "one");
    let original = sha256(&std::fs::read(&first).unwrap());

    let out = rig.push_as_postgres(&first, name);
    assert!(out.status.success(), "first push: {}", text(&out));
    assert_eq!(rig.archived_sha256(name).as_deref(), Some(original.as_str()));

    // PostgreSQL re-archives after a crash between upload and its own
    // bookkeeping: identical content is success, without an upload.
    let out = rig.push_as_postgres(&first, name);
    assert!(out.status.success(), "identical re-archive: {}", text(&out));

    // Different content under the same name must fail and change nothing.
    let other_dir = postgres_dir();
    let different = fake_segment(other_dir.path(), name, "two");
    let out = rig.push_as_postgres(&different, name);
    assert!(
        !out.status.success(),
        "a different segment was accepted: {}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("different content"),
        "{}",
        text(&out)
    );
    assert_eq!(rig.archived_sha256(name).as_deref(), Some(original.as_str()));

    let wal = rig.wal_status();
    assert_eq!(wal["archived_total"], 1, "{wal}");
    assert_eq!(wal["already_archived_total"], 1, "{wal}");
    assert_eq!(wal["conflicts_total"], 1, "{wal}");
    assert_eq!(rig.status()["wal"]["state"], "degraded");

    // The group may push only files it owns: not root's.
    let root_owned = dir.path().join("000000010000000000000008");
    std::fs::write(&root_owned, b"secret").unwrap();
    let out = rig.push_as_postgres(&root_owned, "000000010000000000000008");
    assert!(!out.status.success(), "pushed a file of another user: {}", text(&out));
    assert!(!rig.object("000000010000000000000008").exists());

    // Names PostgreSQL never produces are refused.
    let out = rig.push_as_postgres(&first, "../../etc/passwd");
    assert!(!out.status.success());

    // And the archived content comes back bit for bit, checked.
    let back = dir.path().join("restored");
    let out = rig.fetch(name, &back);
    assert!(out.status.success(), "wal-fetch: {}", text(&out));
    assert_eq!(sha256(&std::fs::read(&back).unwrap()), original);
    // A file that was never archived: a quiet non-zero exit.
    let out = rig.fetch("00000002.history", &dir.path().join("history"));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(out.stderr.is_empty(), "{}", text(&out));
}

fn archive_command(rig: &Rig) -> String {
    format!("{} wal-push --config {} %p %f", bin(), rig.config_dir().display())
}

/// Segment names (24 hex digits) in pg_wal, sorted.
fn segments_in(pg_wal: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(pg_wal)
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().to_string_lossy().into_owned();
            (name.len() == 24 && name.bytes().all(|b| b.is_ascii_hexdigit())).then_some(name)
        })
        .collect();
    names.sort();
    names
}

#[test]
fn postgres_archives_segments_through_wal_push() {
    let rig = Rig::start("");
    let pg = Postgres::builder().archive_command(archive_command(&rig)).start();
    pg.psql("create table t (id int); insert into t select generate_series(1, 1000);");
    let mut switched = Vec::new();
    for _ in 0..3 {
        pg.psql("insert into t select generate_series(1, 100);");
        switched.push(pg.psql("select pg_walfile_name(pg_switch_wal())"));
    }
    let last = switched.last().unwrap().clone();
    wait_for(
        "the archiver to reach the last switched segment",
        Duration::from_secs(60),
        || (pg.psql("select coalesce(last_archived_wal, '') from pg_stat_archiver") >= last).then_some(()),
    );
    assert_eq!(pg.psql("select failed_count from pg_stat_archiver"), "0");
    let pg_wal = pg.data_dir().join("pg_wal");
    for name in segments_in(&pg_wal).into_iter().filter(|n| *n <= last) {
        let raw = std::fs::read(pg_wal.join(&name)).unwrap();
        assert_eq!(
            rig.archived_sha256(&name).as_deref(),
            Some(sha256(&raw).as_str()),
            "{name} is not archived with the content in pg_wal"
        );
    }
    let wal = rig.wal_status();
    assert!(wal["archived_total"].as_u64().unwrap() >= 3, "{wal}");
}

/// archive_command wrapped so that each success is checked at once: when
/// `wal-push` exits 0 the object must already be on the S3 server's disk
/// with the segment's content, or the segment is written to `violations`.
fn checking_wrapper(rig: &Rig, dir: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let script = dir.join("archive.sh");
    let violations = dir.join("violations");
    let ok = dir.join("ok");
    let failed = dir.join("failed");
    let root = rig.s3.data_dir().join(BUCKET).join("wal");
    std::fs::write(
        &script,
        format!(
            r#"#!/bin/sh
"{bin}" wal-push --config "{config}" "$1" "$2"
rc=$?
if [ $rc -eq 0 ]; then
    object="{root}/$(echo "$2" | cut -c1-8)/$2.zst"
    if [ ! -f "$object" ]; then
        echo "$2 missing" >> "{violations}"
    elif [ "$(zstd -qdc "$object" | sha256sum | cut -d' ' -f1)" != "$(sha256sum < "$1" | cut -d' ' -f1)" ]; then
        echo "$2 differs" >> "{violations}"
    fi
    echo "$2" >> "{ok}"
else
    echo "$2 $rc" >> "{failed}"
fi
exit $rc
"#,
            bin = bin(),
            config = rig.config_dir().display(),
            root = root.display(),
            violations = violations.display(),
            ok = ok.display(),
            failed = failed.display(),
        ),
    )
    .unwrap();
    chmod(&script, 0o755);
    make_writable_by_postgres(dir);
    (script, violations, ok, failed)
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The issue's fault test: pgbench load for several minutes with the S3
/// server stopped for over 60 s in the middle. Every segment PostgreSQL
/// generated ends up in S3 with its SHA-256, and none was reported archived
/// before it was there. `WAL_FAULT_LOAD_SECS` (default 180) sets the load.
#[test]
fn no_segment_is_lost_or_reported_early_when_s3_stops_under_pgbench_load() {
    let load_secs: u64 = std::env::var("WAL_FAULT_LOAD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(180);
    let outage = Duration::from_secs(65);
    let mut rig = Rig::start("");
    let check_dir = postgres_dir();
    let (script, violations, ok, failed) = checking_wrapper(&rig, check_dir.path());
    let pg = Postgres::builder()
        .wal_segsize_mb(1)
        .archive_command(format!("{} %p %f", script.display()))
        // Keep every segment in pg_wal to compare with the archive.
        .extra_conf("wal_keep_size", "8GB")
        .extra_conf("max_wal_size", "8GB")
        .start();
    let pgbench = |args: &[&str]| {
        let mut cmd = Command::new(pg.bin_dir().join("pgbench"));
        cmd.args(["-h"])
            .arg(pg.socket_dir())
            .args(["-p", &pg.port().to_string(), "-U", "postgres"])
            .args(args)
            .arg("postgres");
        cmd
    };
    let out = pgbench(&["-i", "-q", "-s", "5"]).output().unwrap();
    assert!(out.status.success(), "pgbench -i: {}", text(&out));

    let started = Instant::now();
    let mut load = pgbench(&["-c", "4", "-j", "2", "-T", &load_secs.to_string(), "-n"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let outage_at = Duration::from_secs(load_secs.saturating_sub(outage.as_secs()) / 2);
    std::thread::sleep(outage_at);
    let archived_before = lines(&ok).len();
    rig.s3.stop();
    let stopped_at = Instant::now();
    std::thread::sleep(outage);
    let failures_during_outage = lines(&failed).len();
    rig.s3.start_again();
    eprintln!(
        "S3 down {:?} from {:?}; {} archived before, {} failed pushes during the outage",
        stopped_at.elapsed(),
        outage_at,
        archived_before,
        failures_during_outage
    );
    let status = load.wait().unwrap();
    assert!(status.success(), "pgbench failed: {status}");
    let last = pg.psql("select pg_walfile_name(pg_switch_wal())");
    wait_for("the archiver to catch up", Duration::from_secs(600), || {
        (pg.psql("select coalesce(last_archived_wal, '') from pg_stat_archiver") >= last).then_some(())
    });
    eprintln!("caught up after {:?}", started.elapsed());

    assert!(archived_before > 0, "nothing was archived before the outage");
    assert!(failures_during_outage > 0, "no push failed while S3 was down");
    assert_eq!(
        lines(&violations),
        Vec::<String>::new(),
        "reported archived before durable"
    );

    let pg_wal = pg.data_dir().join("pg_wal");
    let generated: Vec<String> = segments_in(&pg_wal).into_iter().filter(|n| *n <= last).collect();
    assert!(
        generated.len() > 50,
        "only {} segments: too little load",
        generated.len()
    );
    let mut missing = Vec::new();
    for name in &generated {
        let raw = std::fs::read(pg_wal.join(name)).unwrap();
        if rig.archived_sha256(name).as_deref() != Some(sha256(&raw).as_str()) {
            missing.push(name.clone());
        }
    }
    assert_eq!(missing, Vec::<String>::new(), "segments not in S3 with their checksum");
    // PostgreSQL's own record: every .done is in S3.
    for entry in std::fs::read_dir(pg_wal.join("archive_status")).unwrap() {
        let file = entry.unwrap().file_name().to_string_lossy().into_owned();
        if let Some(name) = file.strip_suffix(".done") {
            assert!(rig.object(name).exists(), "{name} is .done but not in S3");
        }
    }
    eprintln!(
        "{} segments generated and archived; {} pushes failed and were retried",
        generated.len(),
        lines(&failed).len()
    );
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop_daemon();
    }
}

/// A backup job `base` of kind pg-basebackup for `pg`, with `extra` keys.
fn base_backup_job(pg: &Postgres, extra: &str) -> String {
    format!(
        "[[backup.jobs]]\nname = \"base\"\nkind = \"pg-basebackup\"\n{extra}\n[backup.jobs.pg-basebackup]\nhost = \"{}\"\nport = {}\nuser = \"postgres\"\nbin_dir = \"{}\"\n",
        pg.socket_dir().display(),
        pg.port(),
        pg.bin_dir().display()
    )
}

/// Point-in-time recovery: a base backup (backup job of kind
/// pg-basebackup), two transactions with a recorded time between them, the
/// WAL archived; `restore pg --pitr` into a new directory and PostgreSQL
/// started on it has exactly the rows committed before that time.
#[test]
fn pitr_restore_returns_exactly_the_rows_committed_before_the_target_time() {
    let mut rig = Rig::start("");
    let mut pg = Postgres::builder().archive_command(archive_command(&rig)).start();
    rig.reconfigure("60-base.toml", &base_backup_job(&pg, ""));

    pg.psql("create table t (v text); insert into t values ('before-backup');");
    let out = rig.cli(&["backup", "now", "base"]);
    assert!(out.status.success(), "base backup: {}", text(&out));
    pg.psql("insert into t values ('committed-before');");
    pg.psql("select pg_sleep(1)");
    let target = pg.psql(r#"select to_char(clock_timestamp() at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"#);
    pg.psql("select pg_sleep(1)");
    pg.psql("insert into t values ('committed-after');");
    let last = pg.psql("select pg_walfile_name(pg_switch_wal())");
    wait_for(
        "the archiver to reach the last switched segment",
        Duration::from_secs(60),
        || (pg.psql("select coalesce(last_archived_wal, '') from pg_stat_archiver") >= last).then_some(()),
    );
    pg.stop();

    let restored = pg.scratch_dir("restored");
    let out = rig.cli(&[
        "restore",
        "pg",
        "--pitr",
        &target,
        "--target-dir",
        restored.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "restore --pitr: {}", text(&out));
    assert!(restored.join("recovery.signal").exists());

    // The restored cluster on the same port and socket (the original is
    // stopped), archiving off so it does not write to the archive.
    let log = restored.parent().unwrap().join("restored.log");
    let start = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(pg.bin_dir().join("pg_ctl"))
        .arg("-D")
        .arg(&restored)
        .arg("-l")
        .arg(&log)
        .args(["-w", "-t", "120", "-o", "-c archive_mode=off", "start"])
        .current_dir(restored.parent().unwrap())
        .output()
        .unwrap();
    let stop = || {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(pg.bin_dir().join("pg_ctl"))
            .arg("-D")
            .arg(&restored)
            .args(["-m", "immediate", "stop"])
            .current_dir(restored.parent().unwrap())
            .output();
    };
    if !start.status.success() {
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        stop();
        panic!("restored cluster did not start: {}\n{log}", text(&start));
    }
    let promoted = (0..600).find_map(|_| {
        if pg.try_psql("select pg_is_in_recovery()").ok().as_deref() == Some("f") {
            return Some(());
        }
        std::thread::sleep(Duration::from_millis(100));
        None
    });
    let rows = pg.try_psql("select v from t order by v");
    let server_log = std::fs::read_to_string(&log).unwrap_or_default();
    stop();
    assert!(promoted.is_some(), "never promoted:\n{server_log}");
    assert_eq!(
        rows.unwrap(),
        "before-backup\ncommitted-before",
        "rows after PITR to {target}:\n{server_log}"
    );
    assert!(server_log.contains("recovery stopping before commit"), "{server_log}");
}

/// Spool mode: over `spool_max_bytes` wal-push fails (PostgreSQL would keep
/// the segment and retry), nothing spooled is dropped while S3 is away, and
/// everything is shipped once it is back.
#[test]
fn full_spool_fails_the_push_drops_nothing_and_ships_later() {
    let mut rig = Rig::start("mode = \"spool\"\nspool_max_bytes = 3145728\n");
    rig.s3.stop();
    let dir = postgres_dir();
    let names: Vec<String> = (1..=4).map(|i| format!("0000000100000000000000{i:02X}")).collect();
    let files: Vec<PathBuf> = names.iter().map(|n| fake_segment(dir.path(), n, n)).collect();
    for (name, file) in names.iter().zip(&files).take(3) {
        let out = rig.push_as_postgres(file, name);
        assert!(out.status.success(), "spooling {name}: {}", text(&out));
    }
    // 3 MiB spooled: the fourth does not fit and must fail, loudly.
    let out = rig.push_as_postgres(&files[3], &names[3]);
    assert!(!out.status.success(), "a push over the spool limit succeeded");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("spool_max_bytes"),
        "{}",
        text(&out)
    );
    let spool = rig.dir.path().join("state/wal-spool");
    let mut spooled: Vec<String> = std::fs::read_dir(&spool)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    spooled.sort();
    assert_eq!(spooled, names[..3].to_vec(), "the spool lost or gained files");

    rig.s3.start_again();
    wait_for("the spool to drain", Duration::from_secs(60), || {
        (std::fs::read_dir(&spool).unwrap().count() == 0).then_some(())
    });
    let out = rig.push_as_postgres(&files[3], &names[3]);
    assert!(out.status.success(), "push after the spool drained: {}", text(&out));
    wait_for("the last segment to be shipped", Duration::from_secs(60), || {
        rig.archived_sha256(&names[3]).map(|_| ())
    });
    for (name, file) in names.iter().zip(&files) {
        assert_eq!(
            rig.archived_sha256(name),
            Some(sha256(&std::fs::read(file).unwrap())),
            "{name}"
        );
    }
    // Re-pushing a shipped segment is an identical re-archive.
    let out = rig.push_as_postgres(&files[0], &names[0]);
    assert!(out.status.success(), "{}", text(&out));
    let wal = rig.wal_status();
    assert!(wal["failures_total"].as_u64().unwrap() >= 1, "{wal}");
}

/// when_daemon_down = "direct": with the agent stopped, wal-push uploads
/// the segment itself through the same code, re-archive rules included.
#[test]
fn wal_push_archives_directly_while_the_agent_is_down() {
    let mut rig = Rig::start("when_daemon_down = \"direct\"\n");
    rig.stop_daemon();
    let dir = postgres_dir();
    let name = "000000010000000000000011";
    let file = fake_segment(dir.path(), name, "direct");
    let out = rig.push_as_postgres(&file, name);
    assert!(out.status.success(), "direct push: {}", text(&out));
    assert_eq!(rig.archived_sha256(name), Some(sha256(&std::fs::read(&file).unwrap())));
    let out = rig.push_as_postgres(&file, name);
    assert!(out.status.success(), "identical direct re-push: {}", text(&out));
    let other_dir = postgres_dir();
    let other = fake_segment(other_dir.path(), name, "something else");
    let out = rig.push_as_postgres(&other, name);
    assert!(!out.status.success(), "a different segment was accepted directly");

    // With "fail" (the default) the push fails and PostgreSQL retries.
    let fail = Rig::start("");
    let mut fail = fail;
    fail.stop_daemon();
    let out = fail.push_as_postgres(&file, name);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(fail.archived_sha256(name).is_none());
}

/// The gap watchdog: an object deleted behind the agent's back is reported
/// as a gap (status, metrics); with `pg_wal_dir` set it is pushed again.
#[test]
fn watchdog_reports_a_deleted_segment_and_pushes_it_again_from_pg_wal() {
    let mut rig = Rig::start("watchdog_interval = \"1s\"\n");
    let pg = Postgres::builder().archive_command(archive_command(&rig)).start();
    pg.psql("create table t (id int);");
    let mut switched = Vec::new();
    for i in 0..4 {
        pg.psql(&format!("insert into t values ({i});"));
        switched.push(pg.psql("select pg_walfile_name(pg_switch_wal())"));
    }
    let last = switched.last().unwrap().clone();
    wait_for("archiving", Duration::from_secs(60), || {
        (pg.psql("select coalesce(last_archived_wal, '') from pg_stat_archiver") >= last).then_some(())
    });
    let victim = switched[1].clone();
    let original = rig.archived_sha256(&victim).expect("archived");
    std::fs::remove_file(rig.object(&victim)).unwrap();

    wait_for("the gap to be reported", Duration::from_secs(30), || {
        let wal = rig.wal_status();
        (wal["gaps"] == serde_json::json!([victim.clone()])).then_some(())
    });
    let status = rig.status();
    assert_eq!(status["wal"]["state"], "degraded", "{}", status["wal"]);
    let listen = status["metrics"]["listen"].as_str().unwrap().to_string();
    let metrics = Command::new("curl")
        .args(["-sS", "--noproxy", "*", &format!("http://{listen}/metrics")])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout).into_owned();
    assert!(metrics.contains("platform_agent_wal_gap_segments 1"), "{metrics}");
    assert!(
        metrics.contains("platform_agent_wal_last_archived_timestamp_seconds"),
        "{metrics}"
    );

    // Told where pg_wal is, the watchdog pushes the segment again.
    rig.reconfigure(
        "60-pg-wal.toml",
        &format!("[wal]\npg_wal_dir = \"{}\"\n", pg.data_dir().join("pg_wal").display()),
    );
    wait_for("the segment to be pushed again", Duration::from_secs(30), || {
        let wal = rig.wal_status();
        (wal["gaps"] == serde_json::json!([]) && wal["repushed_total"].as_u64() >= Some(1)).then_some(())
    });
    assert_eq!(rig.archived_sha256(&victim), Some(original), "{}", rig.daemon_log());
}

/// WAL retention follows base backup retention: segments older than the
/// oldest retained base backup's start are deleted, the ones it needs stay.
#[test]
fn wal_needed_by_a_retained_base_backup_survives_retention() {
    let mut rig = Rig::start("watchdog_interval = \"1s\"\n");
    let pg = Postgres::builder().archive_command(archive_command(&rig)).start();
    // Each job run applies retention too: keep both base backups at first.
    let keep = |n: u32| {
        base_backup_job(
            &pg,
            &format!("keep_last = {n}\nkeep_daily = 0\nkeep_weekly = 0\nkeep_monthly = 0\nmin_verified = 1\n"),
        )
    };
    rig.reconfigure("60-base.toml", &keep(2));
    pg.psql("create table t (id int);");
    let switch = |n: usize| -> Vec<String> {
        (0..n)
            .map(|i| {
                pg.psql(&format!("insert into t values ({i});"));
                pg.psql("select pg_walfile_name(pg_switch_wal())")
            })
            .collect()
    };
    let before_first = switch(2);
    let out = rig.cli(&["backup", "now", "base"]);
    assert!(out.status.success(), "first base backup: {}", text(&out));
    let between = switch(2);
    let out = rig.cli(&["backup", "now", "base"]);
    assert!(out.status.success(), "second base backup: {}", text(&out));
    let after = switch(2);
    let last = after.last().unwrap().clone();
    wait_for("archiving", Duration::from_secs(60), || {
        (pg.psql("select coalesce(last_archived_wal, '') from pg_stat_archiver") >= last).then_some(())
    });

    // Both base backups retained: only what is older than the first goes.
    wait_for(
        "WAL older than the first base backup to go",
        Duration::from_secs(30),
        || before_first.iter().all(|n| !rig.object(n).exists()).then_some(()),
    );
    for name in between.iter().chain(&after) {
        assert!(
            rig.object(name).exists(),
            "{name} was deleted while a retained base backup needs it"
        );
    }

    // Retention prunes the first base backup: the WAL between them goes,
    // the second's (and later) stays.
    rig.reconfigure("60-base.toml", &keep(1));
    let out = rig.cli(&["backup", "prune", "--job", "base"]);
    assert!(out.status.success(), "prune: {}", text(&out));
    wait_for(
        "WAL only the pruned backup needed to go",
        Duration::from_secs(30),
        || between.iter().all(|n| !rig.object(n).exists()).then_some(()),
    );
    let oldest = rig.wal_status()["oldest_needed"].as_str().unwrap().to_string();
    assert!(
        rig.object(&oldest).exists(),
        "the retained base backup's start segment {oldest} is gone"
    );
    for name in &after {
        assert!(
            rig.object(name).exists(),
            "{name} was deleted while a retained base backup needs it"
        );
    }
}

/// Streaming mode: pg_receivewal supervised by the daemon ships completed
/// segments, alongside archive_command, without conflicts (the streamed
/// segment and the archived one are the same bytes).
#[test]
fn streaming_mode_ships_completed_segments_beside_archive_command() {
    let mut rig = Rig::start("");
    let pg = Postgres::builder().archive_command(archive_command(&rig)).start();
    rig.reconfigure(
        "60-stream.toml",
        &format!(
            "[wal.receivewal]\nenabled = true\nhost = \"{}\"\nport = {}\nuser = \"postgres\"\nbin_dir = \"{}\"\n",
            pg.socket_dir().display(),
            pg.port(),
            pg.bin_dir().display()
        ),
    );
    wait_for("pg_receivewal to run", Duration::from_secs(30), || {
        (rig.wal_status()["receivewal_running"] == true).then_some(())
    });
    wait_for("the replication slot", Duration::from_secs(30), || {
        (pg.psql("select count(*) from pg_replication_slots where slot_name = 'platform_agent' and active") == "1")
            .then_some(())
    });
    pg.psql("create table t (id int);");
    let mut switched = Vec::new();
    for i in 0..3 {
        pg.psql(&format!("insert into t select generate_series(1, {});", 1000 * (i + 1)));
        switched.push(pg.psql("select pg_walfile_name(pg_switch_wal())"));
    }
    let last = switched.last().unwrap().clone();
    wait_for(
        "both paths to have archived the last segment",
        Duration::from_secs(60),
        || {
            (pg.psql("select coalesce(last_archived_wal, '') from pg_stat_archiver") >= last
                && rig.object(&last).exists())
            .then_some(())
        },
    );
    let pg_wal = pg.data_dir().join("pg_wal");
    for name in &switched {
        let raw = std::fs::read(pg_wal.join(name)).unwrap();
        assert_eq!(rig.archived_sha256(name), Some(sha256(&raw)), "{name}");
    }
    let wal = rig.wal_status();
    assert_eq!(wal["conflicts_total"], 0, "{wal}\n{}", rig.daemon_log());
    // Both paths pushed the same segments: the later one found them archived.
    assert!(wal["already_archived_total"].as_u64().unwrap() >= 1, "{wal}");
    assert_eq!(pg.psql("select failed_count from pg_stat_archiver"), "0");

    // pg_receivewal killed: the daemon starts it again.
    let stream_dir = rig.dir.path().join("state/wal-spool/stream");
    let pid = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .find_map(|e| {
            let pid: i32 = e.file_name().to_string_lossy().parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (cmdline.contains("pg_receivewal") && cmdline.contains(stream_dir.to_str().unwrap())).then_some(pid)
        })
        .expect("the daemon's pg_receivewal");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_for("pg_receivewal to be restarted", Duration::from_secs(30), || {
        let wal = rig.wal_status();
        (wal["receivewal_restarts"].as_u64() >= Some(1) && wal["receivewal_running"] == true).then_some(())
    });
    pg.psql("insert into t values (1);");
    let next = pg.psql("select pg_walfile_name(pg_switch_wal())");
    wait_for("a segment after the restart", Duration::from_secs(60), || {
        rig.object(&next).exists().then_some(())
    });
}

/// wal-fetch with prefetch: fetching segment N brings N+1.. into the
/// prefetch directory, and the next call is served from there, even with
/// the object store unreachable.
#[test]
fn wal_fetch_prefetches_the_following_segments() {
    let mut rig = Rig::start("prefetch = 2\n");
    let dir = postgres_dir();
    let names: Vec<String> = (1..=3).map(|i| format!("0000000100000000000000{i:02X}")).collect();
    let mut contents = Vec::new();
    for name in &names {
        let file = fake_segment(dir.path(), name, name);
        contents.push(sha256(&std::fs::read(&file).unwrap()));
        let out = rig.push_as_postgres(&file, name);
        assert!(out.status.success(), "{}", text(&out));
    }
    let pg_wal = tempfile::tempdir().unwrap();
    let target = pg_wal.path().join("RECOVERYXLOG");
    let out = rig.fetch(&names[0], &target);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(sha256(&std::fs::read(&target).unwrap()), contents[0]);
    let prefetch = pg_wal.path().join(".platform-agent-prefetch");
    for name in &names[1..] {
        assert!(prefetch.join(name).exists(), "{name} was not prefetched");
    }
    rig.s3.stop();
    let out = rig.fetch(&names[1], &target);
    assert!(out.status.success(), "not served from the prefetch: {}", text(&out));
    assert_eq!(sha256(&std::fs::read(&target).unwrap()), contents[1]);
    assert!(
        !prefetch.join(&names[1]).exists(),
        "a used prefetched file stays behind"
    );
}

/// The WAL archiver outlives the plan's stop-jobs (PostgreSQL stops with
/// K3s, after it) and flush-wal waits for the spool: a segment spooled while
/// S3 was away is in S3 when the agent has stopped, not left for its next
/// start.
#[test]
fn flush_wal_ships_the_spool_before_the_agent_stops() {
    let mut rig = Rig::start("mode = \"spool\"\n");
    rig.s3.stop();
    let dir = postgres_dir();
    let name = "000000010000000000000031";
    let file = fake_segment(dir.path(), name, "flushed at stop");
    let out = rig.push_as_postgres(&file, name);
    assert!(out.status.success(), "spooled: {}", text(&out));
    assert_eq!(rig.archived_sha256(name), None, "S3 is down: only in the spool");
    rig.s3.start_again();
    // Stop at once: the shipper is in its back-off, so only flush-wal's wait
    // gets the segment out before the agent is gone.
    let mut daemon = rig.daemon.take().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(daemon.wait().unwrap().success());
    assert_eq!(
        rig.archived_sha256(name).as_deref(),
        Some(sha256(&std::fs::read(&file).unwrap()).as_str()),
        "shipped before the agent stopped"
    );
    let log = std::fs::read_to_string(rig.dir.path().join("daemon.log")).unwrap();
    assert!(log.contains("shutdown step flush-wal: done"), "{log}");
}
