//! The `[wal]` section: continuous WAL archiving (disabled by default).
//!
//! Durability levels, by `mode`:
//! - `sync` (default): `wal-push` exits 0 only once the object store's `put`
//!   returned success for the segment (a single PutObject, or a multipart
//!   upload completed at the end): the segment is as durable as the object
//!   store makes it.
//! - `spool`: `wal-push` exits 0 once the segment is copied into `spool_dir`
//!   and both the file and the directory are fsync'd. Durability is then the
//!   local disk's until the daemon has shipped it (usually milliseconds
//!   later); a lost disk before that loses those segments.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WalSettings {
    pub enabled: bool,
    /// Object key prefix: `<prefix>/<timeline>/<segment>[.zst][.age]`.
    pub prefix: String,
    pub compression: WalCompression,
    /// zstd level 1..=19 (1-3 keep wal-push fast).
    pub compression_level: i32,
    /// Encrypt to `backup.age_recipients` (the backup mechanism's
    /// recipients); restoring needs `backup.age_identity_file`.
    pub encrypt: bool,
    pub mode: WalMode,
    /// Where spool mode keeps segments until they are shipped; "" =
    /// `<agent.state_dir>/wal-spool`.
    pub spool_dir: PathBuf,
    /// Over this, wal-push fails (PostgreSQL keeps the WAL in pg_wal and
    /// retries); nothing is ever dropped.
    pub spool_max_bytes: u64,
    /// Uploads in flight at once.
    pub upload_parallelism: u32,
    pub when_daemon_down: WhenDaemonDown,
    /// How long one wal-push may take before it fails (PostgreSQL retries).
    #[serde(with = "crate::config::duration")]
    pub push_timeout: Duration,
    /// PostgreSQL's pg_wal, for the gap watchdog's re-push; "" = none.
    pub pg_wal_dir: PathBuf,
    /// wal-fetch fetches this many following segments in parallel ahead.
    pub prefetch: u32,
    /// How often the gap watchdog checks the chain; "0s" = never.
    #[serde(with = "crate::config::duration")]
    pub watchdog_interval: Duration,
    /// Streaming mode: `pg_receivewal` supervised by the daemon.
    pub receivewal: ReceiveWalSettings,
}

/// Streaming mode: the daemon runs `pg_receivewal` into `<spool_dir>/stream`
/// on a replication slot and ships every completed segment like a pushed
/// one. The RPO for the object store stays one segment; the segment being
/// written (`.partial`) is on the local disk with a lag of a few
/// milliseconds behind the primary.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReceiveWalSettings {
    pub enabled: bool,
    /// libpq host: a socket directory or a host name.
    pub host: String,
    pub port: u16,
    pub user: String,
    /// The replication slot (created if missing), so that the primary keeps
    /// WAL the stream has not received.
    pub slot: String,
    /// Where pg_receivewal is; "" = $PATH.
    pub bin_dir: PathBuf,
}

impl Default for ReceiveWalSettings {
    fn default() -> Self {
        ReceiveWalSettings {
            enabled: false,
            host: "/run/postgresql".into(),
            port: 5432,
            user: "postgres".into(),
            slot: "platform_agent".into(),
            bin_dir: PathBuf::new(),
        }
    }
}

impl Default for WalSettings {
    fn default() -> Self {
        WalSettings {
            enabled: false,
            prefix: "wal".into(),
            compression: WalCompression::Zstd,
            compression_level: 1,
            encrypt: false,
            mode: WalMode::Sync,
            spool_dir: PathBuf::new(),
            spool_max_bytes: 1024 * 1024 * 1024,
            upload_parallelism: 4,
            when_daemon_down: WhenDaemonDown::Fail,
            push_timeout: Duration::from_secs(60),
            pg_wal_dir: PathBuf::new(),
            prefetch: 4,
            watchdog_interval: Duration::from_secs(60),
            receivewal: ReceiveWalSettings::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum WalCompression {
    Zstd,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum WalMode {
    Sync,
    Spool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum WhenDaemonDown {
    /// wal-push builds the object store client from the same configuration
    /// and uploads the segment itself, through the same code path.
    Direct,
    /// wal-push fails; PostgreSQL keeps the segment and retries.
    Fail,
}

crate::config::word_enum!(WalCompression, "WAL compression", { "zstd" => Zstd, "none" => None });
crate::config::word_enum!(WalMode, "WAL mode", { "sync" => Sync, "spool" => Spool });
crate::config::word_enum!(WhenDaemonDown, "when_daemon_down", { "direct" => Direct, "fail" => Fail });

impl WalCompression {
    pub fn extension(self) -> &'static str {
        match self {
            WalCompression::Zstd => ".zst",
            WalCompression::None => "",
        }
    }
}

impl WalSettings {
    pub fn spool_dir(&self, state_dir: &Path) -> PathBuf {
        if self.spool_dir.as_os_str().is_empty() {
            state_dir.join("wal-spool")
        } else {
            self.spool_dir.clone()
        }
    }

    /// Problems as (key below `wal.`, message). `recipients` is how many age
    /// recipients the backup section names.
    pub fn validate(&self, recipients: usize) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut fail = |key: &str, message: String| problems.push((key.to_string(), message));
        let prefix = self.prefix.trim_matches('/');
        if prefix.is_empty() || crate::objstore::check_key(prefix).is_err() {
            fail("prefix", format!("{:?} is not a usable object key prefix", self.prefix));
        }
        if self.compression == WalCompression::Zstd && !(1..=19).contains(&self.compression_level) {
            fail(
                "compression_level",
                format!("{} is out of range 1..=19", self.compression_level),
            );
        }
        if self.encrypt && recipients == 0 {
            fail(
                "encrypt",
                "WAL encryption needs age recipients: set backup.age_recipients or backup.age_recipients_file".into(),
            );
        }
        if !self.spool_dir.as_os_str().is_empty() && self.spool_dir.is_relative() {
            fail(
                "spool_dir",
                format!("{} must be an absolute path", self.spool_dir.display()),
            );
        }
        if !self.pg_wal_dir.as_os_str().is_empty() && self.pg_wal_dir.is_relative() {
            fail(
                "pg_wal_dir",
                format!("{} must be an absolute path", self.pg_wal_dir.display()),
            );
        }
        if self.spool_max_bytes < 64 * 1024 * 1024 && self.mode == WalMode::Spool {
            // A 16 MiB segment must fit a few times over; small limits are
            // allowed for tests down to one MiB.
            if self.spool_max_bytes < 1024 * 1024 {
                fail("spool_max_bytes", format!("{} is below 1 MiB", self.spool_max_bytes));
            }
        }
        if !(1..=64).contains(&self.upload_parallelism) {
            fail(
                "upload_parallelism",
                format!("{} is out of range 1..=64", self.upload_parallelism),
            );
        }
        if self.push_timeout < Duration::from_secs(1) || self.push_timeout > Duration::from_secs(3600) {
            fail("push_timeout", "must be within 1s..=1h".into());
        }
        if self.receivewal.enabled {
            let slot = &self.receivewal.slot;
            if slot.is_empty()
                || slot.len() > 63
                || !slot
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                fail(
                    "receivewal.slot",
                    format!("{slot:?} is not a replication slot name (lowercase letters, digits, '_')"),
                );
            }
        }
        if self.prefetch > 64 {
            fail("prefetch", format!("{} is out of range 0..=64", self.prefetch));
        }
        problems
    }
}
