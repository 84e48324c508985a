//! Proves each fixture is the real server: every check here would fail
//! against a stub that merely accepts connections.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::path::Path;
use std::time::Duration;

use platform_agent_testsupport::{
    free_port, free_port_pair, make_writable_by_postgres, port_accepts, wait_for, OpenBao, Postgres, S3Server,
};
use serde_json::json;

#[test]
fn free_ports_are_distinct_and_bindable() {
    let mut seen = std::collections::HashSet::new();
    for _ in 0..50 {
        let p = free_port();
        assert!(seen.insert(p), "port {p} handed out twice");
        assert_bindable(p);
    }
    let p = free_port_pair();
    assert!(!seen.contains(&p) && !seen.contains(&(p + 1)));
    assert_bindable(p);
    assert_bindable(p + 1);
}

/// The probe's own listener can live on for a moment in a process another
/// test is forking (until its exec closes it), so "bindable" means "bindable
/// within a second".
fn assert_bindable(port: u16) {
    let bound = wait_for(Duration::from_secs(1), || {
        std::net::TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).ok()
    });
    assert!(bound.is_some(), "free port {port} cannot be bound");
}

#[test]
fn postgres_stores_rows_and_archives_wal() {
    let archive = tempfile::tempdir().expect("archive dir");
    make_writable_by_postgres(archive.path());
    // test ! -f: PostgreSQL's documented form, refusing to overwrite a segment.
    let cmd = format!("test ! -f '{0}/%f' && cp %p '{0}/%f'", archive.path().display());
    let mut pg = Postgres::builder().archive_command(cmd).start();

    assert_eq!(pg.psql("show server_version_num").get(..2), Some("15"));
    assert_eq!(pg.psql("show wal_level"), "replica");
    assert_eq!(pg.psql("show archive_mode"), "on");
    assert_eq!(pg.psql("show fsync"), "on", "durability tests need fsync on");

    pg.psql("create table t (id int primary key, v text); insert into t select g, 'row ' || g from generate_series(1, 1000) g;");
    assert_eq!(pg.psql("select count(*), sum(id) from t"), "1000|500500");

    // The segment the switch closes is the one that held our inserts.
    let segment = pg.psql("select pg_walfile_name(pg_current_wal_lsn())");
    assert_eq!(segment.len(), 24, "unexpected WAL file name {segment:?}");
    pg.psql("select pg_switch_wal()");
    let archived = archive.path().join(&segment);
    // cp writes in place, so the file shows up before it is whole.
    let full = wait_for(Duration::from_secs(30), || {
        let len = std::fs::metadata(&archived).map(|m| m.len()).unwrap_or(0);
        (len == 16 * 1024 * 1024).then_some(())
    });
    assert!(
        full.is_some(),
        "{segment} never fully archived; pg_stat_archiver: {}",
        pg.psql("select * from pg_stat_archiver")
    );
    let archived_count = wait_for(Duration::from_secs(10), || {
        let n: u64 = pg.psql("select archived_count from pg_stat_archiver").parse().ok()?;
        (n >= 1).then_some(n)
    });
    assert!(archived_count.is_some(), "pg_stat_archiver never counted the segment");

    // A clean restart keeps committed rows.
    pg.restart();
    assert_eq!(pg.psql("select count(*) from t"), "1000");

    // TCP works as well as the socket.
    let stream = TcpStream::connect((pg.host(), pg.port()));
    assert!(stream.is_ok(), "postgres not listening on {}:{}", pg.host(), pg.port());

    let data_dir = pg.data_dir().to_path_buf();
    drop(pg);
    assert!(!data_dir.exists(), "data dir survived drop");
}

#[test]
fn openbao_kv_approle_and_raft_snapshot() {
    let bao = OpenBao::start();

    let version = bao.kv_put("platform/db", &json!({"password": "s3cr3t", "n": 7}));
    assert_eq!(version, 1);
    assert_eq!(bao.kv_get("platform/db"), Some(json!({"password": "s3cr3t", "n": 7})));
    assert_eq!(bao.kv_put("platform/db", &json!({"password": "rotated"})), 2);
    assert_eq!(bao.kv_get("platform/db").unwrap()["password"], "rotated");
    assert_eq!(bao.kv_get("platform/missing"), None);

    let (status, _) = bao.request(
        "POST",
        "auth/approle/login",
        None,
        Some(&json!({"role_id": bao.role_id(), "secret_id": "not-the-secret"})),
    );
    assert!(
        status == 400 || status == 403,
        "login with a wrong secret_id answered {status}"
    );
    let token = bao.approle_login();
    assert_ne!(token, bao.root_token());

    // The role may take snapshots but not read secrets.
    let (status, _) = bao.request("GET", "secret/data/platform/db", Some(&token), None);
    assert_eq!(status, 403);

    let (status, snapshot) = bao.get_bytes("sys/storage/raft/snapshot", &token);
    assert_eq!(status, 200, "snapshot: {}", String::from_utf8_lossy(&snapshot));
    assert_eq!(&snapshot[..2], &[0x1f, 0x8b], "snapshot is not gzip");
    let names = tar_gz_names(&snapshot);
    for wanted in ["SHA256SUMS", "state.bin", "meta.json"] {
        assert!(names.iter().any(|n| n == wanted), "snapshot lacks {wanted}: {names:?}");
    }
}

#[test]
fn openbao_survives_restart() {
    let mut bao = OpenBao::start();
    bao.kv_put("keep", &json!({"k": "v"}));
    bao.stop();
    assert!(!port_accepts(bao.port()));
    bao.start_again();
    assert_eq!(bao.kv_get("keep"), Some(json!({"k": "v"})));
}

#[test]
fn s3_signed_roundtrip_auth_and_restart() {
    let mut s3 = S3Server::start();
    s3.create_bucket("backups");
    assert!(s3.data_dir().join("backups").is_dir());

    let body: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    s3.put_object("backups", "wal/000000010000000000000001", &body);
    assert_eq!(
        s3.get_object("backups", "wal/000000010000000000000001").as_deref(),
        Some(&body[..])
    );
    assert_eq!(
        std::fs::read(s3.data_dir().join("backups/wal/000000010000000000000001")).unwrap(),
        body,
        "object not stored where s3s-fs keeps it"
    );
    assert_eq!(s3.get_object("backups", "nope"), None);

    let wrong = s3
        .try_request_as(
            "GET",
            "/backups/wal/000000010000000000000001",
            None,
            s3.access_key(),
            "wrong-secret",
        )
        .expect("an HTTP answer");
    assert_eq!(wrong.status, 403, "wrong secret accepted: {}", wrong.text());
    assert!(wrong.text().contains("SignatureDoesNotMatch"), "{}", wrong.text());
    let unknown = s3
        .try_request_as(
            "GET",
            "/backups/wal/000000010000000000000001",
            None,
            "AKUNKNOWN",
            s3.secret_key(),
        )
        .expect("an HTTP answer");
    assert_eq!(unknown.status, 403, "unknown access key accepted: {}", unknown.text());

    let port = s3.port();
    s3.stop();
    let refused = TcpStream::connect_timeout(
        &SocketAddrV4::new(Ipv4Addr::LOCALHOST, port).into(),
        Duration::from_secs(1),
    );
    assert!(refused.is_err(), "port {port} still accepts after stop()");
    assert!(s3
        .try_request_as("GET", "/backups/x", None, s3.access_key(), s3.secret_key())
        .is_err());

    s3.start_again();
    assert_eq!(s3.port(), port);
    assert_eq!(
        s3.get_object("backups", "wal/000000010000000000000001").as_deref(),
        Some(&body[..])
    );
}

/// Member names of a gzip'd tar, read with the system's tar so the test
/// needs no archive crates.
fn tar_gz_names(bytes: &[u8]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("snap.tar.gz");
    std::fs::write(&file, bytes).unwrap();
    list_tar(&file)
}

fn list_tar(file: &Path) -> Vec<String> {
    let mut child = std::process::Command::new("tar")
        .arg("-tzf")
        .arg(file)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run tar");
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(child.wait().unwrap().success(), "tar -tzf failed: not a gzip'd tar");
    out.lines().map(|l| l.trim_start_matches("./").to_owned()).collect()
}
