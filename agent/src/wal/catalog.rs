//! The WAL chain in the state store (`wal_segments`, migration 4): one row
//! per archived file with its raw SHA-256, so that a re-archive is decided
//! without asking the object store, and the watchdog can walk the chain of
//! each timeline.

use rusqlite::{params, OptionalExtension};

use crate::store::{Store, StoreError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalRow {
    pub timeline: u32,
    pub name: String,
    pub raw_sha256: String,
    pub size: u64,
    pub archived_ms: i64,
    pub key: String,
}

#[derive(Clone)]
pub struct WalCatalog {
    store: Store,
}

fn row_from(row: &rusqlite::Row<'_>) -> rusqlite::Result<WalRow> {
    Ok(WalRow {
        timeline: row.get::<_, i64>(0)? as u32,
        name: row.get(1)?,
        raw_sha256: row.get(2)?,
        size: row.get::<_, i64>(3)? as u64,
        archived_ms: row.get(4)?,
        key: row.get(5)?,
    })
}

const COLUMNS: &str = "timeline, name, raw_sha256, size, archived_ms, key";

impl WalCatalog {
    pub fn new(store: Store) -> Self {
        WalCatalog { store }
    }

    pub async fn lookup(&self, name: &str) -> Result<Option<WalRow>, StoreError> {
        let name = name.to_string();
        self.store
            .call("look up a WAL file", move |conn| {
                conn.query_row(
                    &format!("SELECT {COLUMNS} FROM wal_segments WHERE name = ?1"),
                    params![name],
                    row_from,
                )
                .optional()
            })
            .await
    }

    /// Records an archived file; an existing row (same content, checked by
    /// the caller) keeps its first archive time.
    pub async fn record(&self, row: &WalRow) -> Result<(), StoreError> {
        let row = row.clone();
        self.store
            .call("record a WAL file", move |conn| {
                conn.execute(
                    "INSERT INTO wal_segments (timeline, name, raw_sha256, size, archived_ms, key)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (name) DO NOTHING",
                    params![
                        row.timeline as i64,
                        row.name,
                        row.raw_sha256,
                        row.size as i64,
                        row.archived_ms,
                        row.key
                    ],
                )
                .map(|_| ())
            })
            .await
    }

    /// Every row, by timeline and name (segment order).
    pub async fn all(&self) -> Result<Vec<WalRow>, StoreError> {
        self.store
            .call("list WAL files", move |conn| {
                let mut stmt = conn.prepare(&format!("SELECT {COLUMNS} FROM wal_segments ORDER BY timeline, name"))?;
                let rows = stmt.query_map([], row_from)?.collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(rows)
            })
            .await
    }

    /// The newest archived row.
    pub async fn last(&self) -> Result<Option<WalRow>, StoreError> {
        self.store
            .call("read the last WAL file", move |conn| {
                conn.query_row(
                    &format!("SELECT {COLUMNS} FROM wal_segments ORDER BY archived_ms DESC, name DESC LIMIT 1"),
                    [],
                    row_from,
                )
                .optional()
            })
            .await
    }

    pub async fn forget(&self, name: &str) -> Result<(), StoreError> {
        let name = name.to_string();
        self.store
            .call("forget a WAL file", move |conn| {
                conn.execute("DELETE FROM wal_segments WHERE name = ?1", params![name])
                    .map(|_| ())
            })
            .await
    }
}
