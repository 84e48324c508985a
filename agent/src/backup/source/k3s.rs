//! The K3s datastore and the server token, as one tar archive:
//! `state.db` (a consistent copy of kine's SQLite database made with
//! SQLite's online backup API while K3s runs) or `etcd/<snapshot>` (from
//! `k3s etcd-snapshot save`), plus `token`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{run_command, SourceError};
use crate::backup::settings::{K3sDatastore, K3sSource};

pub const FORMAT: &str = "k3s-datastore-tar";
const DB_MEMBER: &str = "state.db";
const TOKEN_MEMBER: &str = "token";
const ETCD_DIR: &str = "etcd/";

/// Copies the live SQLite database into `dest` a few pages at a time, so
/// that K3s's writers are never held up for long, and checks the copy.
pub fn copy_sqlite(db: &Path, dest: &Path, cancel: &CancellationToken) -> Result<(), SourceError> {
    let sqlite = |what: &str| {
        let what = format!("{what} {}", db.display());
        move |e: rusqlite::Error| SourceError::Invalid(format!("{what}: {e}"))
    };
    if !db.exists() {
        return Err(SourceError::Invalid(format!("{} does not exist", db.display())));
    }
    let source = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(sqlite("open"))?;
    source
        .busy_timeout(Duration::from_secs(10))
        .map_err(sqlite("configure"))?;
    let mut target = rusqlite::Connection::open(dest).map_err(sqlite("create a copy of"))?;
    {
        let backup = rusqlite::backup::Backup::new(&source, &mut target).map_err(sqlite("start the backup of"))?;
        loop {
            if cancel.is_cancelled() {
                return Err(SourceError::Cancelled);
            }
            match backup.step(1024).map_err(sqlite("copy pages of"))? {
                rusqlite::backup::StepResult::Done => break,
                rusqlite::backup::StepResult::More => std::thread::sleep(Duration::from_millis(1)),
                rusqlite::backup::StepResult::Busy | rusqlite::backup::StepResult::Locked => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
    let check: String = target
        .query_row("PRAGMA quick_check", [], |row| row.get(0))
        .map_err(sqlite("check the copy of"))?;
    if check != "ok" {
        return Err(SourceError::Invalid(format!(
            "the copy of {} fails SQLite's quick_check: {check}",
            db.display()
        )));
    }
    Ok(())
}

/// Runs `k3s etcd-snapshot save` into `dir`; returns the snapshot file.
pub fn etcd_snapshot(settings: &K3sSource, dir: &Path) -> Result<PathBuf, SourceError> {
    let name = format!("platform-agent-{}", chrono::Utc::now().format("%Y%m%dT%H%M%SZ"));
    let mut cmd = Command::new(&settings.k3s_command);
    cmd.args(["etcd-snapshot", "save", "--name", &name, "--dir"]).arg(dir);
    run_command(cmd)?;
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| SourceError::io(format!("list {}", dir.display()), e))? {
        let entry = entry.map_err(|e| SourceError::io(format!("list {}", dir.display()), e))?;
        if entry.file_name().to_string_lossy().starts_with(&name) && entry.path().is_file() {
            found.push(entry.path());
        }
    }
    found.sort();
    found.pop().ok_or_else(|| {
        SourceError::Invalid(format!(
            "k3s etcd-snapshot save wrote no {name}* into {}",
            dir.display()
        ))
    })
}

/// Writes the archive: the datastore copy (or etcd snapshot) and the token.
pub fn write_archive(
    datastore: &Path,
    datastore_kind: K3sDatastore,
    token_file: &Path,
    out: &mut dyn Write,
) -> Result<(), SourceError> {
    let token = std::fs::read(token_file).map_err(|e| {
        SourceError::io(
            format!(
                "read the K3s server token {} (needed to bring the cluster back)",
                token_file.display()
            ),
            e,
        )
    })?;
    let mut builder = tar::Builder::new(out);
    let member = match datastore_kind {
        K3sDatastore::Sqlite => DB_MEMBER.to_string(),
        K3sDatastore::Etcd => format!(
            "{ETCD_DIR}{}",
            datastore.file_name().unwrap_or_default().to_string_lossy()
        ),
    };
    builder
        .append_path_with_name(datastore, &member)
        .map_err(|e| SourceError::io(format!("archive {}", datastore.display()), e))?;
    let mut header = tar::Header::new_gnu();
    header.set_size(token.len() as u64);
    header.set_mode(0o600);
    header.set_mtime(chrono::Utc::now().timestamp().max(0) as u64);
    header.set_cksum();
    builder
        .append_data(&mut header, TOKEN_MEMBER, &token[..])
        .map_err(|e| SourceError::io("archive the token", e))?;
    builder
        .into_inner()
        .map_err(|e| SourceError::io("finish the archive", e))?
        .flush()
        .map_err(|e| SourceError::io("finish the archive", e))
}

/// What an archive unpacked into a directory holds.
pub struct Unpacked {
    pub datastore: PathBuf,
    pub kind: K3sDatastore,
    pub token: Vec<u8>,
}

/// Unpacks an archive into `dir` (a private scratch directory).
pub fn unpack(input: &mut dyn Read, dir: &Path) -> Result<Unpacked, SourceError> {
    let mut archive = tar::Archive::new(input);
    let mut datastore = None;
    let mut token = None;
    for entry in archive
        .entries()
        .map_err(|e| SourceError::Invalid(format!("not a K3s backup archive: {e}")))?
    {
        let mut entry = entry.map_err(|e| SourceError::Invalid(format!("damaged archive: {e}")))?;
        let name = entry
            .path()
            .map_err(|e| SourceError::Invalid(format!("bad member name: {e}")))?
            .to_string_lossy()
            .into_owned();
        if name == TOKEN_MEMBER {
            let mut bytes = Vec::new();
            entry
                .read_to_end(&mut bytes)
                .map_err(|e| SourceError::io("read the token", e))?;
            token = Some(bytes);
        } else if name == DB_MEMBER || name.starts_with(ETCD_DIR) {
            let file_name = Path::new(&name).file_name().unwrap_or_default().to_owned();
            let path = dir.join(file_name);
            let mut file =
                std::fs::File::create(&path).map_err(|e| SourceError::io(format!("create {}", path.display()), e))?;
            std::io::copy(&mut entry, &mut file)
                .map_err(|e| SourceError::io(format!("write {}", path.display()), e))?;
            file.sync_all()
                .map_err(|e| SourceError::io(format!("fsync {}", path.display()), e))?;
            let kind = if name == DB_MEMBER {
                K3sDatastore::Sqlite
            } else {
                K3sDatastore::Etcd
            };
            datastore = Some((path, kind));
        }
    }
    let (datastore, kind) = datastore.ok_or_else(|| SourceError::Invalid("the archive holds no datastore".into()))?;
    let token = token.ok_or_else(|| SourceError::Invalid("the archive holds no server token".into()))?;
    if token.iter().all(u8::is_ascii_whitespace) {
        return Err(SourceError::Invalid("the archived server token is empty".into()));
    }
    Ok(Unpacked { datastore, kind, token })
}

/// The full integrity check of a restored SQLite datastore.
pub fn integrity_check(db: &Path) -> Result<String, SourceError> {
    let conn = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| SourceError::Invalid(format!("open {}: {e}", db.display())))?;
    let result: String = conn
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .map_err(|e| SourceError::Invalid(format!("integrity_check of {}: {e}", db.display())))?;
    if result != "ok" {
        return Err(SourceError::Invalid(format!(
            "{} fails PRAGMA integrity_check: {result}",
            db.display()
        )));
    }
    let tables: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_master WHERE type = 'table'", [], |row| {
            row.get(0)
        })
        .unwrap_or(0);
    Ok(format!("PRAGMA integrity_check ok ({tables} tables)"))
}

/// Puts a restored SQLite datastore in place: written next to the target,
/// fsynced, renamed over it; K3s's stale -wal and -shm files go.
pub fn install_sqlite(unpacked: &Path, target: &Path) -> Result<(), SourceError> {
    let dir = target.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(|e| SourceError::io(format!("create {}", dir.display()), e))?;
    let temp = dir.join(format!(
        ".{}.platform-agent-restore",
        target.file_name().unwrap_or_default().to_string_lossy()
    ));
    std::fs::copy(unpacked, &temp).map_err(|e| SourceError::io(format!("write {}", temp.display()), e))?;
    std::fs::File::open(&temp)
        .and_then(|f| f.sync_all())
        .map_err(|e| SourceError::io(format!("fsync {}", temp.display()), e))?;
    for suffix in ["-wal", "-shm"] {
        let stale = PathBuf::from(format!("{}{suffix}", target.display()));
        match std::fs::remove_file(&stale) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(SourceError::io(format!("remove {}", stale.display()), err)),
        }
    }
    std::fs::rename(&temp, target).map_err(|e| SourceError::io(format!("rename onto {}", target.display()), e))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| SourceError::io(format!("fsync {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make_db(path: &Path, rows: i64) {
        let conn = rusqlite::Connection::open(path).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; CREATE TABLE kine (id INTEGER PRIMARY KEY, name TEXT, value BLOB);",
        )
        .unwrap();
        for i in 0..rows {
            conn.execute(
                "INSERT INTO kine (name, value) VALUES (?1, ?2)",
                rusqlite::params![format!("/registry/x/{i}"), vec![i as u8; 100]],
            )
            .unwrap();
        }
    }

    #[test]
    fn sqlite_copy_archive_and_unpack_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.db");
        make_db(&db, 500);
        // Keep a writer open with uncheckpointed WAL content, as K3s would.
        let live = rusqlite::Connection::open(&db).unwrap();
        live.execute("INSERT INTO kine (name) VALUES ('/registry/late')", [])
            .unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "K10abc::server:secret\n").unwrap();

        let copy = dir.path().join("copy.db");
        copy_sqlite(&db, &copy, &CancellationToken::new()).unwrap();
        let mut archive = Vec::new();
        write_archive(&copy, K3sDatastore::Sqlite, &token, &mut archive).unwrap();

        let out = tempfile::tempdir().unwrap();
        let unpacked = unpack(&mut &archive[..], out.path()).unwrap();
        assert_eq!(unpacked.token, b"K10abc::server:secret\n");
        assert!(integrity_check(&unpacked.datastore)
            .unwrap()
            .starts_with("PRAGMA integrity_check ok"));
        let restored = rusqlite::Connection::open(&unpacked.datastore).unwrap();
        let count: i64 = restored
            .query_row("SELECT count(*) FROM kine", [], |r| r.get(0))
            .unwrap();
        assert_eq!(count, 501, "the copy includes what was only in the WAL");

        let target = dir.path().join("restored/state.db");
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::write(format!("{}-wal", target.display()), b"stale").unwrap();
        install_sqlite(&unpacked.datastore, &target).unwrap();
        assert!(!Path::new(&format!("{}-wal", target.display())).exists());
        assert!(integrity_check(&target).is_ok());
    }

    #[test]
    fn a_corrupt_datastore_fails_the_check() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.db");
        make_db(&db, 2000);
        // Overwrite a page in the middle of the file.
        let mut bytes = std::fs::read(&db).unwrap();
        if bytes.len() < 20_000 {
            rusqlite::Connection::open(&db)
                .unwrap()
                .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
                .unwrap();
            bytes = std::fs::read(&db).unwrap();
        }
        let middle = bytes.len() / 2;
        bytes[middle..middle + 4096].fill(0xAB);
        let broken = dir.path().join("broken.db");
        std::fs::write(&broken, &bytes).unwrap();
        assert!(integrity_check(&broken).is_err());
    }

    #[test]
    fn a_missing_token_fails_the_backup() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.db");
        make_db(&db, 1);
        let err = write_archive(&db, K3sDatastore::Sqlite, &dir.path().join("nope"), &mut Vec::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("server token"), "{err}");
    }
}
