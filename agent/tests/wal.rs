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

use common::{wait_for, Daemon, BIN};
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

/// The daemon with WAL archiving to s3s-fs; its directory (config, socket)
/// is reachable by the `postgres` user, the socket's group is `postgres`.
struct Rig {
    s3: S3Server,
    daemon: Daemon,
}

impl Rig {
    fn start(wal_extra: &str) -> Rig {
        let s3 = S3Server::start();
        s3.create_bucket(BUCKET);
        // The test's wrapper (running as postgres) looks at the server's files.
        chmod(s3.data_dir().parent().unwrap(), 0o755);
        chmod(s3.data_dir(), 0o755);
        let creds = tempfile::tempdir().unwrap().keep();
        chmod(&creds, 0o755);
        let key = creds.join("s3-access-key");
        let secret = creds.join("s3-secret-key");
        std::fs::write(&key, s3.access_key()).unwrap();
        std::fs::write(&secret, s3.secret_key()).unwrap();
        // Readable by postgres: the direct mode test uploads as postgres.
        chmod(&key, 0o644);
        chmod(&secret, 0o644);
        let config = format!(
            "[control]\ngroup = \"postgres\"\n\
             [backup]\nscratch_dir = \"../scratch\"\n\
             [object_store]\nbackend = \"s3\"\n\
             [object_store.s3]\nendpoint = \"{}\"\nbucket = \"{BUCKET}\"\naccess_key_id_file = \"{}\"\nsecret_access_key_file = \"{}\"\n\
             [wal]\nenabled = true\n{wal_extra}\n",
            s3.endpoint(),
            key.display(),
            secret.display()
        );
        let daemon = Daemon::start(&config);
        chmod(daemon.dir.path(), 0o755);
        Rig { s3, daemon }
    }

    fn config_dir(&self) -> &Path {
        &self.daemon.config_dir
    }

    /// `wal-push` as the postgres user, like archive_command.
    fn push_as_postgres(&self, path: &Path, name: &str) -> Output {
        Command::new("runuser")
            .args(["-u", "postgres", "--", BIN, "wal-push", "--config"])
            .arg(self.config_dir())
            .arg(path)
            .arg(name)
            .output()
            .unwrap()
    }

    fn fetch(&self, name: &str, path: &Path) -> Output {
        Command::new(BIN)
            .args(["wal-fetch", "--config"])
            .arg(self.config_dir())
            .arg(name)
            .arg(path)
            .output()
            .unwrap()
    }

    fn wal_status(&self) -> Value {
        self.daemon.status_json()["wal_status"].clone()
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
    let rig = Rig::start("");
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
    assert_eq!(rig.daemon.status_json()["wal"]["state"], "degraded");

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
    format!("{BIN} wal-push --config {} %p %f", rig.config_dir().display())
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
