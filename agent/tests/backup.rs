//! Backups end to end: the real binary as a daemon, driven by its CLI, with
//! real PostgreSQL 15, OpenBao (raft) and S3 (s3s-fs) from tests/support.
//! Round trips (backup, then restore, then compare), and the faults the
//! issue names: S3 stopped mid-upload, the agent SIGKILLed mid-upload, and
//! retention when the newest run failed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use age::secrecy::ExposeSecret;
use common::{wait_for, Daemon};
use nix::sys::signal::Signal;
use platform_agent_testsupport::{OpenBao, Postgres, S3Server};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const BUCKET: &str = "backups";
const PREFIX: &str = "node1";

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs the CLI and parses its `--json` output; panics unless it exits 0.
fn cli_json(daemon: &Daemon, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    let out = daemon.cli(&args);
    assert!(
        out.status.success(),
        "{args:?} exited {:?}: {}{}",
        out.status.code(),
        stdout(&out),
        stderr(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {}", stdout(&out)))
}

fn backups(daemon: &Daemon, job: &str) -> Vec<Value> {
    cli_json(daemon, &["backup", "list", "--job", job])
        .as_array()
        .unwrap()
        .clone()
}

/// `[object_store]` pointing at the s3s-fs server, credentials in files.
fn s3_config(s3: &S3Server, dir: &Path) -> String {
    let key = dir.join("s3-access-key");
    let secret = dir.join("s3-secret-key");
    std::fs::write(&key, s3.access_key()).unwrap();
    std::fs::write(&secret, s3.secret_key()).unwrap();
    format!(
        "[object_store]\nbackend = \"s3\"\n[object_store.s3]\nendpoint = \"{}\"\nbucket = \"{BUCKET}\"\nprefix = \"{PREFIX}\"\naccess_key_id_file = \"{}\"\nsecret_access_key_file = \"{}\"\n",
        s3.endpoint(),
        key.display(),
        secret.display()
    )
}

/// An age key pair in files; returns the `[backup]` keys that use it.
fn age_config(dir: &Path) -> String {
    let identity = age::x25519::Identity::generate();
    let identity_file = dir.join("age-identity.txt");
    std::fs::write(&identity_file, format!("{}\n", identity.to_string().expose_secret())).unwrap();
    format!(
        "age_recipients = [\"{}\"]\nage_identity_file = \"{}\"\n",
        identity.to_public(),
        identity_file.display()
    )
}

fn s3_object(s3: &S3Server, key: &str) -> PathBuf {
    s3.data_dir().join(BUCKET).join(PREFIX).join(key)
}

/// Multipart uploads s3s-fs has in flight (one `.upload-<id>.json` each).
fn dangling_uploads(s3: &S3Server) -> Vec<String> {
    std::fs::read_dir(s3.data_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".upload-"))
        .collect()
}

/// Incompressible bytes, deterministic.
fn random_bytes(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut block = Sha256::digest(b"backup-tests").to_vec();
    while out.len() < len {
        block = Sha256::digest(&block).to_vec();
        out.extend_from_slice(&block);
    }
    out.truncate(len);
    out
}

fn table_checksums(pg: &Postgres, database: &str) -> String {
    pg.psql(&format!(
        "\\c {database}\n\
         SELECT 'accounts', count(*), md5(string_agg(a::text, ',' ORDER BY aid)) FROM pgbench_accounts a;\n\
         SELECT 'tellers', count(*), md5(string_agg(t::text, ',' ORDER BY tid)) FROM pgbench_tellers t;\n\
         SELECT 'branches', count(*), md5(string_agg(b::text, ',' ORDER BY bid)) FROM pgbench_branches b;\n\
         SELECT 'blobs', count(*), md5(string_agg(x::text, ',' ORDER BY i)) FROM blobs x;"
    ))
}

#[test]
fn postgres_backup_verify_and_restore_round_trip_through_s3() {
    let pg = Postgres::start();
    let s3 = S3Server::start();
    s3.create_bucket(BUCKET);
    pg.psql("CREATE DATABASE app;");
    let pgbench = std::process::Command::new(pg.bin_dir().join("pgbench"))
        .args(["-i", "-s", "2", "-q", "-h"])
        .arg(pg.socket_dir())
        .args(["-p", &pg.port().to_string(), "-U", "postgres", "app"])
        .output()
        .unwrap();
    assert!(pgbench.status.success(), "pgbench: {}", stderr(&pgbench));
    // Hex is only half compressible: the dump spans several 5 MiB parts.
    pg.psql("\\c app\nCREATE TABLE blobs AS SELECT i, md5(i::text) || md5((i * 7)::text) || md5((i * 13)::text) AS v FROM generate_series(1, 250000) i;");
    let before = table_checksums(&pg, "app");
    assert!(before.contains("accounts|200000|"), "{before}");
    // A role lives outside the database: the `_globals` target carries it.
    pg.psql("CREATE ROLE app_reader LOGIN PASSWORD 'reader-secret' CONNECTION LIMIT 7;");

    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{}[backup]\nscratch_dir = \"{}\"\npart_size_mib = 5\n[[backup.jobs]]\nname = \"pg\"\nkind = \"postgres\"\nretries = 0\n\
         [backup.jobs.postgres]\nhost = \"{}\"\nport = {}\nuser = \"postgres\"\ndatabases = [\"app\"]\nbin_dir = \"{}\"\n",
        s3_config(&s3, dir.path()),
        dir.path().join("scratch").display(),
        pg.socket_dir().display(),
        pg.port(),
        pg.bin_dir().display()
    );
    let daemon = Daemon::start(&config);

    let runs = cli_json(&daemon, &["backup", "now", "pg"]);
    let targets: Vec<&str> = runs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["target"].as_str().unwrap())
        .collect();
    assert_eq!(targets, ["_globals", "app"], "globals first, then the databases");
    let globals = &runs[0];
    assert_eq!(globals["state"], "verified", "{globals:#}");
    let run = &runs[1];
    assert_eq!(run["state"], "verified", "{run:#}");
    assert_eq!(run["target"], "app");
    assert_eq!(run["compression"], "zstd");
    let key = run["key"].as_str().unwrap().to_string();
    assert!(key.starts_with("pg/app/") && key.ends_with(".pgdump.zst"), "{key}");
    let stored = std::fs::read(s3_object(&s3, &key)).unwrap();
    assert_eq!(stored.len() as u64, run["bytes"].as_u64().unwrap());
    assert!(stored.len() > 10 * 1024 * 1024, "multipart: {} bytes", stored.len());
    assert_eq!(hex::encode(Sha256::digest(&stored)), run["sha256"].as_str().unwrap());
    assert!(stored.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]), "a zstd frame");
    assert!(dangling_uploads(&s3).is_empty());

    let status = daemon.status_json();
    let job = &status["backup_jobs"][0];
    assert_eq!(job["last_result"], "success", "{job:#}");
    assert_eq!(
        job["last_bytes"].as_u64(),
        Some(stored.len() as u64 + globals["bytes"].as_u64().unwrap()),
        "the whole run: the database and the globals"
    );
    assert_eq!(status["backups"]["state"], "ok");

    // A drill: test restore into a scratch database, dropped afterwards.
    let report = cli_json(&daemon, &["backup", "verify", "--job", "pg"]);
    let test = report["test_restore"].as_str().unwrap();
    assert!(
        test.contains("pg_restore into scratch database") && test.contains("5 tables"),
        "{test}"
    );
    let databases = pg.psql("SELECT string_agg(datname, ',' ORDER BY datname) FROM pg_database;");
    assert!(
        !databases.contains("pa_verify"),
        "the scratch database is dropped: {databases}"
    );

    // The live database is not overwritten without --force.
    let refused = daemon.cli(&["restore", "pg", "--database", "app"]);
    assert_eq!(refused.status.code(), Some(73), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("exists"), "{}", stderr(&refused));

    let restored = cli_json(
        &daemon,
        &[
            "restore",
            "pg",
            "--latest",
            "--database",
            "app",
            "--target",
            "app_restored",
        ],
    );
    assert_eq!(restored["target"], "app_restored");
    assert_eq!(
        table_checksums(&pg, "app_restored"),
        before,
        "row counts and checksums are equal"
    );

    // --force replaces the live database with the backup.
    pg.psql("\\c app\nDELETE FROM pgbench_accounts WHERE aid <= 1000;\nUPDATE blobs SET v = 'changed' WHERE i = 7;");
    assert_ne!(table_checksums(&pg, "app"), before);
    cli_json(&daemon, &["restore", "pg", "--database", "app", "--force"]);
    assert_eq!(table_checksums(&pg, "app"), before);

    // The globals: checked in a drill (complete dump, its roles counted),
    // and a dropped role comes back with its attributes.
    let report = cli_json(&daemon, &["backup", "verify", &globals["id"].to_string()]);
    let test = report["test_restore"].as_str().unwrap();
    assert!(
        test.starts_with("globals dump complete: ") && test.ends_with(" roles"),
        "{test}"
    );
    let role = "SELECT rolcanlogin, rolconnlimit FROM pg_roles WHERE rolname = 'app_reader';";
    let before_role = pg.psql(role);
    assert_eq!(before_role.trim(), "t|7");
    pg.psql("DROP ROLE app_reader;");
    assert_eq!(pg.psql(role).trim(), "");
    let restored = cli_json(&daemon, &["restore", "pg", "--latest", "--database", "_globals"]);
    assert!(
        restored["summary"]
            .as_str()
            .unwrap_or_default()
            .contains("roles present"),
        "{restored:#}"
    );
    assert_eq!(pg.psql(role), before_role);
}

#[test]
fn vault_snapshot_is_encrypted_and_a_changed_secret_comes_back_after_restore() {
    let bao = OpenBao::start();
    let s3 = S3Server::start();
    s3.create_bucket(BUCKET);
    bao.kv_put("app/db", &json!({"password": "before-the-snapshot"}));

    let dir = tempfile::tempdir().unwrap();
    let role = dir.path().join("role-id");
    let secret = dir.path().join("secret-id");
    std::fs::write(&role, bao.role_id()).unwrap();
    std::fs::write(&secret, bao.secret_id()).unwrap();
    let config = format!(
        "{}[backup]\nscratch_dir = \"{}\"\n{}[[backup.jobs]]\nname = \"vault\"\nkind = \"vault\"\nretries = 0\n\
         [backup.jobs.vault]\naddress = \"{}\"\napprole_role_id_file = \"{}\"\napprole_secret_id_file = \"{}\"\n",
        s3_config(&s3, dir.path()),
        dir.path().join("scratch").display(),
        age_config(dir.path()),
        bao.addr(),
        role.display(),
        secret.display()
    );
    let daemon = Daemon::start(&config);
    let runs = cli_json(&daemon, &["backup", "now", "vault"]);
    let run = &runs[0];
    assert_eq!(run["state"], "verified", "{run:#}");
    assert_eq!(run["encryption"], "age");
    let key = run["key"].as_str().unwrap();
    assert!(
        key.starts_with("vault/raft/") && key.ends_with(".snap.zst.age"),
        "{key}"
    );
    let stored = std::fs::read(s3_object(&s3, key)).unwrap();
    assert!(stored.starts_with(b"age-encryption.org/v1"), "never stored in clear");

    let report = cli_json(&daemon, &["backup", "verify", "--job", "vault"]);
    let test = report["test_restore"].as_str().unwrap();
    assert!(
        test.contains("SHA256SUMS match") && test.contains("state.bin"),
        "{test}"
    );

    bao.kv_put("app/db", &json!({"password": "after-the-snapshot"}));
    assert_eq!(bao.kv_get("app/db").unwrap()["password"], "after-the-snapshot");

    let refused = daemon.cli(&["restore", "vault"]);
    assert_eq!(refused.status.code(), Some(73), "{}", stderr(&refused));
    let restored = cli_json(&daemon, &["restore", "vault", "--latest", "--force"]);
    assert!(
        restored["summary"].as_str().unwrap().contains("Vault restored"),
        "{restored:#}"
    );
    bao.wait_active();
    let value = wait_for("the restored secret", Duration::from_secs(30), || {
        bao.kv_get("app/db").filter(|v| v["password"] == "before-the-snapshot")
    });
    assert_eq!(value["password"], "before-the-snapshot");
}

/// A files job over one incompressible file, uploaded at 4 MiB/s in 5 MiB
/// parts, so that a fault can be injected while the upload runs.
fn slow_files_job(dir: &Path, object_store: &str, mib: usize) -> String {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("big.bin"), random_bytes(mib * 1024 * 1024)).unwrap();
    format!(
        "{object_store}[backup]\nscratch_dir = \"{}\"\npart_size_mib = 5\nmax_upload_bytes_per_second = 4194304\ncompression = \"none\"\n\
         [[backup.jobs]]\nname = \"big\"\nkind = \"files\"\nretries = 0\n[backup.jobs.files]\nbase_dir = \"{}\"\npaths = [\".\"]\n",
        dir.join("scratch").display(),
        data.display()
    )
}

#[test]
fn s3_stopped_mid_upload_fails_the_run_and_the_next_run_succeeds() {
    let mut s3 = S3Server::start();
    s3.create_bucket(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let config = slow_files_job(dir.path(), &s3_config(&s3, dir.path()), 24);
    let daemon = Daemon::start(&config);

    let socket = daemon.socket();
    let run = std::thread::spawn(move || {
        std::process::Command::new(common::BIN)
            .args(["backup", "now", "big", "--socket"])
            .arg(socket)
            .output()
            .unwrap()
    });
    wait_for("the multipart upload to start", Duration::from_secs(20), || {
        (!dangling_uploads(&s3).is_empty()).then_some(())
    });
    std::thread::sleep(Duration::from_millis(1500));
    s3.stop();
    let out = run.join().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}{}", stdout(&out), stderr(&out));
    assert!(stderr(&out).contains("backup failed"), "{}", stderr(&out));

    let rows = backups(&daemon, "big");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["state"], "failed", "{:#}", rows[0]);
    let key = rows[0]["key"].as_str().unwrap().to_string();
    assert!(!s3_object(&s3, &key).exists(), "nothing under the final key");
    assert_eq!(daemon.status_json()["backup_jobs"][0]["last_result"], "failure");

    s3.start_again();
    // The server was away, so the failed run could not abort its upload.
    assert_eq!(dangling_uploads(&s3).len(), 1);
    let runs = cli_json(&daemon, &["backup", "now", "big"]);
    assert_eq!(runs[0]["state"], "verified", "{:#}", runs[0]);
    assert!(s3_object(&s3, runs[0]["key"].as_str().unwrap()).exists());
    assert!(!s3_object(&s3, &key).exists());
    assert!(
        dangling_uploads(&s3).is_empty(),
        "the next run aborted the leftover upload: {:?}",
        dangling_uploads(&s3)
    );
    assert_eq!(daemon.status_json()["backup_jobs"][0]["last_result"], "success");
}

#[test]
fn agent_killed_mid_upload_leaves_no_dangling_upload_and_no_false_success() {
    let s3 = S3Server::start();
    s3.create_bucket(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let config = slow_files_job(dir.path(), &s3_config(&s3, dir.path()), 24);
    let mut daemon = Daemon::start(&config);

    let socket = daemon.socket();
    let run = std::thread::spawn(move || {
        std::process::Command::new(common::BIN)
            .args(["backup", "now", "big", "--socket"])
            .arg(socket)
            .output()
            .unwrap()
    });
    wait_for("the multipart upload to start", Duration::from_secs(20), || {
        (!dangling_uploads(&s3).is_empty()).then_some(())
    });
    std::thread::sleep(Duration::from_millis(1500));
    daemon.signal(Signal::SIGKILL);
    daemon.wait_exit(Duration::from_secs(10));
    let out = run.join().unwrap();
    assert!(!out.status.success(), "the client sees the agent die");
    assert_eq!(dangling_uploads(&s3).len(), 1, "a killed agent aborts nothing");

    daemon.restart();
    wait_for("the leftover upload to be aborted", Duration::from_secs(20), || {
        dangling_uploads(&s3).is_empty().then_some(())
    });
    let rows = backups(&daemon, "big");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["state"], "failed", "{:#}", rows[0]);
    assert!(
        rows[0]["error"].as_str().unwrap().contains("interrupted"),
        "{:#}",
        rows[0]
    );
    assert!(!s3_object(&s3, rows[0]["key"].as_str().unwrap()).exists());
    let objects: Vec<_> = walk(&s3.data_dir().join(BUCKET));
    assert!(
        objects.iter().all(|p| !p.to_string_lossy().contains("big/")),
        "no object of the killed run: {objects:?}"
    );
}

#[test]
fn sigterm_mid_upload_aborts_the_upload_and_records_why() {
    let s3 = S3Server::start();
    s3.create_bucket(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let config = slow_files_job(dir.path(), &s3_config(&s3, dir.path()), 24);
    let mut daemon = Daemon::start(&config);
    let socket = daemon.socket();
    let run = std::thread::spawn(move || {
        std::process::Command::new(common::BIN)
            .args(["backup", "now", "big", "--socket"])
            .arg(socket)
            .output()
            .unwrap()
    });
    wait_for("the multipart upload to start", Duration::from_secs(20), || {
        (!dangling_uploads(&s3).is_empty()).then_some(())
    });
    std::thread::sleep(Duration::from_millis(1000));
    let stopping = std::time::Instant::now();
    daemon.signal(Signal::SIGTERM);
    let (status, log) = daemon.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "exit {status}: {log}");
    assert!(stopping.elapsed() < Duration::from_secs(10), "{:?}", stopping.elapsed());
    assert!(
        dangling_uploads(&s3).is_empty(),
        "the upload was aborted before the agent exited"
    );
    assert!(!run.join().unwrap().status.success());

    daemon.restart();
    let rows = backups(&daemon, "big");
    assert_eq!(rows[0]["state"], "failed", "{:#}", rows[0]);
    let error = rows[0]["error"].as_str().unwrap();
    assert!(error.contains("aborted: the agent is stopping"), "{error}");
    assert!(!s3_object(&s3, rows[0]["key"].as_str().unwrap()).exists());
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(walk(&path));
            } else {
                out.push(path);
            }
        }
    }
    out
}

#[test]
fn retention_deletes_nothing_while_the_newest_run_failed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("traefik")).unwrap();
    std::fs::write(data.join("traefik/acme.json"), b"{\"certs\": []}").unwrap();
    let config = format!(
        "[backup]\nscratch_dir = \"{}\"\n[[backup.jobs]]\nname = \"acme\"\nkind = \"files\"\nretries = 0\n\
         keep_last = 1\nkeep_daily = 0\nkeep_weekly = 0\nkeep_monthly = 0\nmin_verified = 3\n\
         [backup.jobs.files]\nbase_dir = \"{}\"\npaths = [\"traefik\"]\n",
        dir.path().join("scratch").display(),
        data.display()
    );
    let daemon = Daemon::start(&config);
    let objects = daemon.path("objects");
    let mut keys = Vec::new();
    for _ in 0..3 {
        let runs = cli_json(&daemon, &["backup", "now", "acme"]);
        assert_eq!(runs[0]["state"], "verified");
        keys.push(runs[0]["key"].as_str().unwrap().to_string());
    }
    // The source disappears: the newest run fails.
    std::fs::remove_dir_all(data.join("traefik")).unwrap();
    let failed = daemon.cli(&["backup", "now", "acme"]);
    assert_eq!(failed.status.code(), Some(1), "{}", stderr(&failed));

    let plan = daemon.cli(&["backup", "prune", "--dry-run"]);
    let text = stdout(&plan);
    assert!(plan.status.success(), "{}", stderr(&plan));
    assert_eq!(text.lines().filter(|l| l.starts_with("keep")).count(), 3, "{text}");
    assert!(
        text.contains("failed; nothing is deleted until a run succeeds"),
        "{text}"
    );

    let pruned = cli_json(&daemon, &["backup", "prune", "--job", "acme"]);
    assert!(
        pruned.as_array().unwrap().iter().all(|d| d["verdict"] == "keep"),
        "{pruned:#}"
    );
    for key in &keys {
        assert!(objects.join(key).exists(), "{key} must survive");
    }

    // Back to normal: a success lifts the freeze; keep-last 1 and
    // min-verified 3 keep the newest three, the oldest goes.
    std::fs::create_dir_all(data.join("traefik")).unwrap();
    std::fs::write(data.join("traefik/acme.json"), b"{\"certs\": [1]}").unwrap();
    cli_json(&daemon, &["backup", "now", "acme"]);
    assert!(!objects.join(&keys[0]).exists(), "the oldest is pruned");
    assert!(objects.join(&keys[1]).exists() && objects.join(&keys[2]).exists());
    let rows = backups(&daemon, "acme");
    let oldest = rows.iter().find(|r| r["key"] == keys[0].as_str()).unwrap();
    assert_eq!(oldest["state"], "pruned");
}

#[test]
fn k3s_datastore_backup_verify_and_restore() {
    let dir = tempfile::tempdir().unwrap();
    let server = dir.path().join("k3s/server");
    std::fs::create_dir_all(server.join("db")).unwrap();
    let db = server.join("db/state.db");
    let token = server.join("token");
    std::fs::write(&token, "K10secret::server:abc\n").unwrap();
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE kine (id INTEGER PRIMARY KEY, name TEXT, value BLOB);")
        .unwrap();
    for i in 0..2000 {
        conn.execute(
            "INSERT INTO kine (name, value) VALUES (?1, ?2)",
            rusqlite::params![format!("/registry/pods/{i}"), vec![(i % 251) as u8; 200]],
        )
        .unwrap();
    }
    let config = format!(
        "[backup]\nscratch_dir = \"{}\"\n{}[[backup.jobs]]\nname = \"k3s\"\nkind = \"k3s\"\nretries = 0\n\
         [backup.jobs.k3s]\ndb_path = \"{}\"\ntoken_file = \"{}\"\n",
        dir.path().join("scratch").display(),
        age_config(dir.path()),
        db.display(),
        token.display()
    );
    let daemon = Daemon::start(&config);
    // K3s keeps writing while the backup runs: the online backup copes.
    let runs = cli_json(&daemon, &["backup", "now", "k3s"]);
    assert_eq!(runs[0]["state"], "verified", "{:#}", runs[0]);
    assert_eq!(runs[0]["target"], "sqlite");
    conn.execute("INSERT INTO kine (name) VALUES ('/registry/after')", [])
        .unwrap();

    let report = cli_json(&daemon, &["backup", "verify", "--job", "k3s"]);
    let test = report["test_restore"].as_str().unwrap();
    assert!(
        test.contains("integrity_check ok") && test.contains("token present"),
        "{test}"
    );

    let refused = daemon.cli(&["restore", "k3s"]);
    assert_eq!(refused.status.code(), Some(73), "{}", stderr(&refused));

    let target = dir.path().join("restored/state.db");
    let restored = cli_json(&daemon, &["restore", "k3s", "--target", target.to_str().unwrap()]);
    assert!(
        restored["summary"].as_str().unwrap().contains("datastore restored"),
        "{restored:#}"
    );
    let copy = rusqlite::Connection::open(&target).unwrap();
    let count: i64 = copy.query_row("SELECT count(*) FROM kine", [], |r| r.get(0)).unwrap();
    assert_eq!(count, 2000, "the state at backup time");
    let checksum = |c: &rusqlite::Connection| -> String {
        c.query_row(
            "SELECT group_concat(name || hex(value), ',') FROM (SELECT * FROM kine WHERE id <= 2000 ORDER BY id)",
            [],
            |r| r.get(0),
        )
        .unwrap()
    };
    assert_eq!(checksum(&copy), checksum(&conn));
}

/// K3s with embedded etcd: the job runs `k3s etcd-snapshot save --name N
/// --dir D`. K3s itself cannot run here; the stand-in does what matters of
/// the real command: it writes `D/N-<node>-<unix time>` (K3s appends the node
/// name and the time), or, as a broken K3s would, nothing.
#[test]
fn k3s_etcd_snapshot_backup_verify_and_restore() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "K10etcd::server:xyz\n").unwrap();
    let snapshot: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
    std::fs::write(dir.path().join("snapshot.bin"), &snapshot).unwrap();
    let standin = dir.path().join("k3s");
    std::fs::write(
        &standin,
        format!(
            "#!/bin/sh\n# k3s etcd-snapshot save --name N --dir D\n\
             [ \"$1 $2 $3\" = \"etcd-snapshot save --name\" ] && [ \"$5\" = --dir ] || exit 2\n\
             [ -e \"{broken}\" ] && {{ echo 'etcd: context deadline exceeded' >&2; exit 1; }}\n\
             cp \"{snap}\" \"$6/$4-node1-$(date +%s)\"\n",
            broken = dir.path().join("broken").display(),
            snap = dir.path().join("snapshot.bin").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&standin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = format!(
        "[backup]\nscratch_dir = \"{}\"\n{}[[backup.jobs]]\nname = \"etcd\"\nkind = \"k3s\"\nretries = 0\n\
         [backup.jobs.k3s]\ndatastore = \"etcd\"\nk3s_command = \"{}\"\ntoken_file = \"{}\"\n",
        dir.path().join("scratch").display(),
        age_config(dir.path()),
        standin.display(),
        token.display()
    );
    let daemon = Daemon::start(&config);
    let runs = cli_json(&daemon, &["backup", "now", "etcd"]);
    assert_eq!(runs[0]["state"], "verified", "{:#}", runs[0]);
    assert_eq!(runs[0]["target"], "etcd");

    let report = cli_json(&daemon, &["backup", "verify", "--job", "etcd"]);
    let test = report["test_restore"].as_str().unwrap();
    assert_eq!(
        test,
        format!("etcd snapshot of {} bytes; server token present", snapshot.len())
    );

    let target = dir.path().join("restored-snapshots");
    let restored = cli_json(&daemon, &["restore", "k3s", "--target", target.to_str().unwrap()]);
    let summary = restored["summary"].as_str().unwrap();
    assert!(summary.contains("--cluster-reset-restore-path="), "{summary}");
    let files: Vec<PathBuf> = std::fs::read_dir(&target).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(
        std::fs::read(&files[0]).unwrap(),
        snapshot,
        "the snapshot, byte for byte"
    );

    // A failing `k3s etcd-snapshot save` fails the run with its message.
    std::fs::write(dir.path().join("broken"), "").unwrap();
    let out = daemon.cli(&["backup", "now", "etcd"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("context deadline exceeded"), "{}", stderr(&out));
}
