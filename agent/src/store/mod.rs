//! The state store: one SQLite database (`state.db`) in WAL mode holding what
//! the agent must remember across restarts. Schema changes are numbered
//! migrations tracked in `PRAGMA user_version`; an agent refuses a database
//! written by a newer agent rather than guess at it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};

use crate::status::unix_now;

pub const DB_FILE: &str = "state.db";

/// Append only: never edit a migration that has shipped.
const MIGRATIONS: &[&str] = &[
    // 1: every start of the agent and how it ended.
    "CREATE TABLE agent_runs (
        id INTEGER PRIMARY KEY,
        started_at INTEGER NOT NULL,
        stopped_at INTEGER,
        pid INTEGER NOT NULL,
        version TEXT NOT NULL,
        outcome TEXT
    );",
    // 2: the shutdown plan's steps as each run executed them.
    "CREATE TABLE shutdown_steps (
        run_id INTEGER NOT NULL REFERENCES agent_runs(id),
        position INTEGER NOT NULL,
        report TEXT NOT NULL,
        PRIMARY KEY (run_id, position)
    );",
    // 3: the backup catalog: one row per object a job run tried to store
    // (one per database for a PostgreSQL job), and the S3 multipart uploads
    // in flight, recorded before their first part so that a restart after a
    // crash can abort them (not every S3 server can list them).
    "CREATE TABLE backup_runs (
        id INTEGER PRIMARY KEY,
        batch INTEGER NOT NULL,
        job TEXT NOT NULL,
        kind TEXT NOT NULL,
        target TEXT NOT NULL,
        trigger TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        agent_run INTEGER,
        state TEXT NOT NULL,
        key TEXT,
        started_ms INTEGER NOT NULL,
        finished_ms INTEGER,
        bytes INTEGER,
        raw_bytes INTEGER,
        sha256 TEXT,
        raw_sha256 TEXT,
        compression TEXT NOT NULL,
        encryption TEXT NOT NULL,
        error TEXT,
        verified_ms INTEGER,
        tested_ms INTEGER,
        test_result TEXT,
        pruned_ms INTEGER
    );
    CREATE INDEX backup_runs_series ON backup_runs (job, target, started_ms);
    CREATE TABLE s3_multipart_uploads (
        upload_id TEXT PRIMARY KEY,
        bucket TEXT NOT NULL,
        key TEXT NOT NULL,
        started_ms INTEGER NOT NULL
    );",
    // 4: GitOps: the files the agent wrote into K3s's manifests directory
    // (prune only ever removes these), and the revision last applied.
    "CREATE TABLE gitops_files (
        dir TEXT NOT NULL,
        name TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        source TEXT NOT NULL,
        revision TEXT NOT NULL,
        written_at INTEGER NOT NULL,
        PRIMARY KEY (dir, name)
    );
    CREATE TABLE gitops_applied (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        revision TEXT NOT NULL,
        applied_at INTEGER NOT NULL
    );",
    // 5: the WAL archive's chain: one row per archived WAL file (segment,
    // history, backup label) with the SHA-256 of its raw content, which
    // decides whether a re-archive is identical.
    "CREATE TABLE wal_segments (
        name TEXT PRIMARY KEY,
        timeline INTEGER NOT NULL,
        raw_sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        archived_ms INTEGER NOT NULL,
        key TEXT NOT NULL
    );
    CREATE INDEX wal_segments_chain ON wal_segments (timeline, name);",
];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}: cannot create the state directory: {source}", path.display())]
    Directory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {action}: {source}", path.display())]
    Sqlite {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{}: schema version {found} is newer than this agent knows ({supported}); refusing to touch it", path.display())]
    TooNew { path: PathBuf, found: u32, supported: u32 },
    #[error("state store task failed: {0}")]
    Task(String),
}

#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

pub type RunId = i64;

impl Store {
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(state_dir).map_err(|source| StoreError::Directory {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let path = state_dir.join(DB_FILE);
        let sqlite = |action: &'static str| {
            let path = path.clone();
            move |source| StoreError::Sqlite { path, action, source }
        };
        let mut conn = Connection::open(&path).map_err(sqlite("open"))?;
        // FULL: a catalog row that says "archived" must survive power loss as
        // surely as the object it describes.
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")
            .map_err(sqlite("set pragmas"))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sqlite("set busy timeout"))?;
        migrate(&mut conn, &path)?;
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs a closure on the connection off the async runtime's threads.
    pub async fn call<T, F>(&self, action: &'static str, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            work(&mut conn).map_err(|source| StoreError::Sqlite { path, action, source })
        })
        .await
        .map_err(|err| StoreError::Task(err.to_string()))?
    }

    pub fn schema_version(&self) -> u32 {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        user_version(&conn).unwrap_or(0)
    }

    /// Records this start; runs left without an end are marked unclean (the
    /// agent was killed or the machine lost power). Returns a description of
    /// how the previous run ended.
    pub async fn begin_run(&self, pid: u32, version: &str) -> Result<(RunId, Option<String>), StoreError> {
        let version = version.to_string();
        self.call("record agent start", move |conn| {
            let tx = conn.transaction()?;
            tx.execute(
                "UPDATE agent_runs SET outcome = 'unclean (no orderly stop recorded)' WHERE stopped_at IS NULL",
                [],
            )?;
            let previous: Option<(i64, Option<i64>, Option<String>)> = tx
                .query_row(
                    "SELECT started_at, stopped_at, outcome FROM agent_runs ORDER BY id DESC LIMIT 1",
                    [],
                    |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
                )
                .optional()?;
            tx.execute(
                "INSERT INTO agent_runs (started_at, pid, version) VALUES (?1, ?2, ?3)",
                params![unix_now() as i64, pid, version],
            )?;
            let id = tx.last_insert_rowid();
            tx.commit()?;
            let previous = previous.map(|(started, stopped, outcome)| match stopped {
                Some(stopped) => format!(
                    "{} (ran {}s)",
                    outcome.unwrap_or_default(),
                    stopped.saturating_sub(started)
                ),
                None => outcome.unwrap_or_else(|| "unclean".into()),
            });
            Ok((id, previous))
        })
        .await
    }

    pub async fn finish_run(&self, id: RunId, outcome: &str) -> Result<(), StoreError> {
        let outcome = outcome.to_string();
        self.call("record agent stop", move |conn| {
            conn.execute(
                "UPDATE agent_runs SET stopped_at = ?1, outcome = ?2 WHERE id = ?3",
                params![unix_now() as i64, outcome, id],
            )
            .map(drop)
        })
        .await
    }

    pub async fn record_shutdown(&self, run: RunId, steps: &[crate::shutdown::StepReport]) -> Result<(), StoreError> {
        let rows: Vec<String> = steps
            .iter()
            .map(|s| serde_json::to_string(s).expect("step report serializes"))
            .collect();
        self.call("record shutdown steps", move |conn| {
            let tx = conn.transaction()?;
            for (position, report) in rows.iter().enumerate() {
                tx.execute(
                    "INSERT OR REPLACE INTO shutdown_steps (run_id, position, report) VALUES (?1, ?2, ?3)",
                    params![run, position as i64, report],
                )?;
            }
            tx.commit()
        })
        .await
    }

    /// The steps of the most recent run that recorded a shutdown.
    pub async fn last_shutdown(&self) -> Result<Vec<crate::shutdown::StepReport>, StoreError> {
        let rows: Vec<String> = self
            .call("read shutdown steps", |conn| {
                let mut stmt = conn.prepare(
                    "SELECT report FROM shutdown_steps WHERE run_id = (SELECT max(run_id) FROM shutdown_steps) ORDER BY position",
                )?;
                let rows = stmt.query_map([], |row| row.get(0))?;
                rows.collect()
            })
            .await?;
        Ok(rows.iter().filter_map(|r| serde_json::from_str(r).ok()).collect())
    }

    /// A cheap proof that the database answers; the watchdog pings systemd
    /// only when this succeeds.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.call("ping", |conn| {
            conn.query_row("SELECT count(*) FROM agent_runs", [], |_| Ok(()))
        })
        .await
    }
}

fn user_version(conn: &Connection) -> rusqlite::Result<u32> {
    conn.query_row("PRAGMA user_version", [], |row| row.get(0))
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let sqlite = |action: &'static str| {
        let path = path.to_path_buf();
        move |source| StoreError::Sqlite { path, action, source }
    };
    let current = user_version(conn).map_err(sqlite("read schema version"))?;
    let supported = MIGRATIONS.len() as u32;
    if current > supported {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found: current,
            supported,
        });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let version = index as u32 + 1;
        let tx = conn.transaction().map_err(sqlite("begin migration"))?;
        tx.execute_batch(sql).map_err(sqlite("apply migration"))?;
        tx.pragma_update(None, "user_version", version)
            .map_err(sqlite("record schema version"))?;
        tx.commit().map_err(sqlite("commit migration"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn migrates_and_records_runs() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.schema_version(), MIGRATIONS.len() as u32);
        let mode: String = store
            .call("mode", |c| c.query_row("PRAGMA journal_mode", [], |r| r.get(0)))
            .await
            .unwrap();
        assert_eq!(mode, "wal");

        let (first, previous) = store.begin_run(1, "0.1.0").await.unwrap();
        assert_eq!(previous, None);
        store.finish_run(first, "stopped by SIGTERM").await.unwrap();
        drop(store);

        let store = Store::open(dir.path()).unwrap();
        let (_, previous) = store.begin_run(2, "0.1.0").await.unwrap();
        assert!(previous.unwrap().starts_with("stopped by SIGTERM"));
    }

    #[tokio::test]
    async fn a_run_without_stop_is_reported_unclean() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.begin_run(1, "0.1.0").await.unwrap();
        drop(store); // as if killed: no finish_run
        let store = Store::open(dir.path()).unwrap();
        let (_, previous) = store.begin_run(2, "0.1.0").await.unwrap();
        assert!(previous.unwrap().starts_with("unclean"));
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.pragma_update(None, "user_version", 999).unwrap();
        drop(conn);
        let err = Store::open(dir.path()).err().unwrap();
        assert!(matches!(err, StoreError::TooNew { found: 999, .. }), "{err}");
    }
}
