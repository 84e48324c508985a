//! The `[backup]` section: global encoding and transfer settings, and one
//! `[[backup.jobs]]` table per job. A job names its kind and carries the
//! sub-table of that kind (`[backup.jobs.postgres]` and so on).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackupSettings {
    /// Off: no job is scheduled; the catalog, `backup list` and `restore`
    /// still work.
    pub enabled: bool,
    /// Temporary files (Vault snapshot spool, K3s datastore copy, test
    /// restores); private to root, emptied at start.
    pub scratch_dir: PathBuf,
    pub compression: Compression,
    /// zstd 1..=19, gzip 1..=9.
    pub compression_level: i32,
    /// zstd worker threads (compression always runs beside the source);
    /// 0 = half the cores, at least one.
    pub compression_threads: u32,
    /// age recipients (`age1...`); with any set (here or in the file), every
    /// object is encrypted to all of them.
    pub age_recipients: Vec<String>,
    /// A file of age recipients, one per line (`#` comments).
    pub age_recipients_file: PathBuf,
    /// The private age identity, needed only to verify or restore encrypted
    /// backups on this node.
    pub age_identity_file: PathBuf,
    /// Multipart part size in MiB (5..=512). Memory use is about twice this.
    pub part_size_mib: u64,
    /// Upload bandwidth limit in bytes per second; 0 = unlimited.
    pub max_upload_bytes_per_second: u64,
    /// Read every object back after upload and compare its SHA-256.
    pub verify_after_upload: bool,
    /// Jobs that may run at the same time (others wait their turn).
    pub max_concurrent_jobs: u32,
    pub jobs: Vec<BackupJob>,
}

impl Default for BackupSettings {
    fn default() -> Self {
        BackupSettings {
            enabled: true,
            scratch_dir: PathBuf::from("/var/lib/platform-agent/scratch"),
            compression: Compression::Zstd,
            compression_level: 3,
            compression_threads: 0,
            age_recipients: Vec::new(),
            age_recipients_file: PathBuf::new(),
            age_identity_file: PathBuf::new(),
            part_size_mib: 8,
            max_upload_bytes_per_second: 0,
            verify_after_upload: true,
            max_concurrent_jobs: 1,
            jobs: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Zstd,
    Gzip,
    None,
}

impl Compression {
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Zstd => "zstd",
            Compression::Gzip => "gzip",
            Compression::None => "none",
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            Compression::Zstd => ".zst",
            Compression::Gzip => ".gz",
            Compression::None => "",
        }
    }

    pub fn parse(word: &str) -> Option<Compression> {
        match word {
            "zstd" => Some(Compression::Zstd),
            "gzip" => Some(Compression::Gzip),
            "none" => Some(Compression::None),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupKind {
    Postgres,
    Vault,
    K3s,
    Files,
    /// A physical base backup (`pg_basebackup`) for point-in-time recovery
    /// with the WAL archive; connection settings in `[backup.jobs.pg-basebackup]`.
    #[serde(rename = "pg-basebackup")]
    PgBasebackup,
}

impl BackupKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackupKind::Postgres => "postgres",
            BackupKind::Vault => "vault",
            BackupKind::K3s => "k3s",
            BackupKind::Files => "files",
            BackupKind::PgBasebackup => "pg-basebackup",
        }
    }

    pub fn parse(word: &str) -> Option<BackupKind> {
        match word {
            "postgres" | "pg" => Some(BackupKind::Postgres),
            "vault" | "openbao" => Some(BackupKind::Vault),
            "k3s" => Some(BackupKind::K3s),
            "files" => Some(BackupKind::Files),
            "pg-basebackup" | "basebackup" => Some(BackupKind::PgBasebackup),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackupJob {
    /// Names the job in commands, the catalog and object keys.
    pub name: String,
    pub kind: BackupKind,
    /// Cron with seconds: "sec min hour day-of-month month day-of-week",
    /// e.g. "0 0 */6 * * *" for every six hours. "" = only on demand.
    pub schedule: String,
    /// A random delay of up to this much before each scheduled run.
    #[serde(with = "crate::config::duration")]
    pub jitter: Duration,
    /// One attempt may take this long; then it is aborted.
    #[serde(with = "crate::config::duration")]
    pub timeout: Duration,
    /// Further attempts after a failed one.
    pub retries: u32,
    /// Wait before the first retry; doubled for each further one.
    #[serde(with = "crate::config::duration")]
    pub retry_backoff: Duration,
    /// At start, run once if the last scheduled time passed without a
    /// successful backup (the node was down, or the job is new).
    pub run_missed: bool,
    /// Overrides `backup.compression` for this job.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression: Option<Compression>,
    /// Encrypt to `backup.age_recipients`: default when any are set. Vault
    /// jobs are always encrypted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encrypt: Option<bool>,
    // Retention, counted from the newest successful backup of each target.
    pub keep_last: u32,
    pub keep_hourly: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
    /// Older backups are deleted whatever the keep rules say; "0s" = no limit.
    #[serde(with = "crate::config::duration")]
    pub max_age: Duration,
    /// The newest this-many verified backups are never deleted.
    pub min_verified: u32,
    /// Cron for a restore drill: the newest backup is read back and
    /// test-restored to a scratch target. "" = none.
    pub verify_schedule: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PostgresSource>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vault: Option<VaultSource>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub k3s: Option<K3sSource>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files: Option<FilesSource>,
    /// The server to take base backups of (host, port, user, bin_dir,
    /// os_user, password_file; `databases` is not used).
    #[serde(rename = "pg-basebackup", skip_serializing_if = "Option::is_none")]
    pub pg_basebackup: Option<PostgresSource>,
}

impl Default for BackupJob {
    fn default() -> Self {
        BackupJob {
            name: String::new(),
            kind: BackupKind::Files,
            schedule: String::new(),
            jitter: Duration::ZERO,
            timeout: Duration::from_secs(6 * 3600),
            retries: 2,
            retry_backoff: Duration::from_secs(60),
            run_missed: true,
            compression: None,
            encrypt: None,
            keep_last: 7,
            keep_hourly: 0,
            keep_daily: 7,
            keep_weekly: 4,
            keep_monthly: 3,
            max_age: Duration::ZERO,
            min_verified: 2,
            verify_schedule: String::new(),
            postgres: None,
            vault: None,
            k3s: None,
            files: None,
            pg_basebackup: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresSource {
    /// libpq host: a socket directory (starts with /) or a host name.
    pub host: String,
    pub port: u16,
    pub user: String,
    /// File holding the password; "" for trust or peer authentication.
    pub password_file: PathBuf,
    /// Databases to dump, one object each; ["*"] = every database that
    /// accepts connections (templates excluded).
    pub databases: Vec<String>,
    /// Where pg_dump, pg_restore and psql are; "" = $PATH.
    pub bin_dir: PathBuf,
    /// Run the client tools as this OS user (peer authentication over the
    /// socket, e.g. "postgres"); "" = as the agent.
    pub os_user: String,
    /// Also dump roles and tablespaces (`pg_dumpall --globals-only`, target
    /// `_globals`). Needs a superuser (role passwords live in pg_authid).
    pub globals: bool,
}

impl Default for PostgresSource {
    fn default() -> Self {
        PostgresSource {
            host: "/run/postgresql".into(),
            port: 5432,
            user: "postgres".into(),
            password_file: PathBuf::new(),
            databases: vec!["*".into()],
            bin_dir: PathBuf::new(),
            os_user: String::new(),
            globals: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct VaultSource {
    /// API address, http:// or https://.
    pub address: String,
    /// File holding a token; or leave empty and use AppRole.
    pub token_file: PathBuf,
    pub approle_role_id_file: PathBuf,
    pub approle_secret_id_file: PathBuf,
    /// Mount path of the AppRole auth method.
    pub approle_mount: String,
    /// Extra PEM CA certificates for https; the system's are always trusted.
    pub ca_file: PathBuf,
}

impl Default for VaultSource {
    fn default() -> Self {
        VaultSource {
            address: "http://127.0.0.1:8200".into(),
            token_file: PathBuf::new(),
            approle_role_id_file: PathBuf::new(),
            approle_secret_id_file: PathBuf::new(),
            approle_mount: "approle".into(),
            ca_file: PathBuf::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum K3sDatastore {
    Sqlite,
    Etcd,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct K3sSource {
    pub datastore: K3sDatastore,
    /// K3s's SQLite datastore (kine).
    pub db_path: PathBuf,
    /// The server token: needed with the datastore to bring the cluster back.
    pub token_file: PathBuf,
    /// The k3s binary, for `k3s etcd-snapshot save`.
    pub k3s_command: String,
}

impl Default for K3sSource {
    fn default() -> Self {
        K3sSource {
            datastore: K3sDatastore::Sqlite,
            db_path: PathBuf::from("/var/lib/rancher/k3s/server/db/state.db"),
            token_file: PathBuf::from("/var/lib/rancher/k3s/server/token"),
            k3s_command: "k3s".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FilesSource {
    /// Paths below this directory are archived with names relative to it.
    pub base_dir: PathBuf,
    /// Files or directories relative to `base_dir`; "." is all of it.
    pub paths: Vec<String>,
}

impl Default for FilesSource {
    fn default() -> Self {
        FilesSource {
            base_dir: PathBuf::from("/data"),
            paths: Vec::new(),
        }
    }
}

/// The cron dialect tokio-cron-scheduler parses: six fields, seconds first.
pub fn parse_cron(expression: &str) -> Result<croner::Cron, String> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .dom_and_dow(true)
        .build()
        .parse(expression)
        .map_err(|err| {
            format!(
                "{expression:?} is not a cron schedule with seconds (\"sec min hour day month weekday\", e.g. \"0 0 */6 * * *\"): {err}"
            )
        })
}

/// Job names become object key segments and CLI arguments.
fn check_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a job name (1-64 characters: lowercase letters, digits, '-' and '_', starting with a letter or digit)"
        ))
    }
}

/// Parses `age1...` recipients from the list and the file.
pub fn load_recipients(settings: &BackupSettings) -> Result<Vec<age::x25519::Recipient>, String> {
    let mut words: Vec<String> = settings.age_recipients.clone();
    if !settings.age_recipients_file.as_os_str().is_empty() {
        let text = std::fs::read_to_string(&settings.age_recipients_file)
            .map_err(|err| format!("cannot read {}: {err}", settings.age_recipients_file.display()))?;
        words.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string),
        );
    }
    words
        .iter()
        .map(|word| {
            age::x25519::Recipient::from_str(word)
                .map_err(|err| format!("{word:?} is not an age X25519 recipient (age1...): {err}"))
        })
        .collect()
}

impl BackupSettings {
    pub fn job(&self, name: &str) -> Option<&BackupJob> {
        self.jobs.iter().find(|j| j.name == name)
    }

    pub fn encrypts(&self, job: &BackupJob) -> bool {
        let have_recipients = !self.age_recipients.is_empty() || !self.age_recipients_file.as_os_str().is_empty();
        job.kind == BackupKind::Vault || job.encrypt.unwrap_or(have_recipients)
    }

    pub fn compression_for(&self, job: &BackupJob) -> Compression {
        job.compression.unwrap_or(self.compression)
    }

    /// Problems as (key below `backup.`, message). `check_secret` proves a
    /// secret file is readable and not empty.
    pub fn validate(&self, check_secret: &dyn Fn(&Path) -> Result<(), String>) -> Vec<(String, String)> {
        let mut problems: Vec<(String, String)> = Vec::new();
        let mut fail = |key: String, message: String| problems.push((key, message));
        if self.scratch_dir.as_os_str().is_empty() || self.scratch_dir.is_relative() {
            fail(
                "scratch_dir".into(),
                format!("{} must be an absolute path", self.scratch_dir.display()),
            );
        }
        let levels = match self.compression {
            Compression::Zstd => 1..=19,
            Compression::Gzip => 1..=9,
            Compression::None => i32::MIN..=i32::MAX,
        };
        if !levels.contains(&self.compression_level) {
            fail(
                "compression_level".into(),
                format!(
                    "{} is out of range {}..={} for {}",
                    self.compression_level,
                    levels.start(),
                    levels.end(),
                    self.compression.as_str()
                ),
            );
        }
        if self.compression_threads > 64 {
            fail(
                "compression_threads".into(),
                format!("{} is out of range 0..=64", self.compression_threads),
            );
        }
        if !(5..=512).contains(&self.part_size_mib) {
            fail(
                "part_size_mib".into(),
                format!(
                    "{} is out of range 5..=512 (S3 refuses parts under 5 MiB)",
                    self.part_size_mib
                ),
            );
        }
        if !(1..=8).contains(&self.max_concurrent_jobs) {
            fail(
                "max_concurrent_jobs".into(),
                format!("{} is out of range 1..=8", self.max_concurrent_jobs),
            );
        }
        let recipients = match load_recipients(self) {
            Ok(recipients) => recipients.len(),
            Err(message) => {
                let key = if message.starts_with("cannot read") {
                    "age_recipients_file"
                } else {
                    "age_recipients"
                };
                fail(key.into(), message);
                usize::MAX
            }
        };
        if !self.age_identity_file.as_os_str().is_empty() {
            if let Err(message) = check_secret(&self.age_identity_file) {
                fail("age_identity_file".into(), message);
            } else if let Err(err) = age::IdentityFile::from_file(self.age_identity_file.display().to_string())
                .and_then(|file| file.into_identities().map_err(std::io::Error::other))
            {
                fail(
                    "age_identity_file".into(),
                    format!(
                        "{} holds no usable age identity: {err}",
                        self.age_identity_file.display()
                    ),
                );
            }
        }

        let mut seen = std::collections::BTreeSet::new();
        for (index, job) in self.jobs.iter().enumerate() {
            let key = |field: &str| format!("jobs[{index}].{field}");
            if let Err(message) = check_name(&job.name) {
                fail(key("name"), message);
            } else if !seen.insert(job.name.clone()) {
                fail(key("name"), format!("another job is already named {:?}", job.name));
            }
            for (field, cron) in [("schedule", &job.schedule), ("verify_schedule", &job.verify_schedule)] {
                if !cron.is_empty() {
                    if let Err(message) = parse_cron(cron) {
                        fail(key(field), message);
                    }
                }
            }
            if job.timeout < Duration::from_secs(1) {
                fail(key("timeout"), "must be at least 1s".into());
            }
            if job.retries > 20 {
                fail(key("retries"), format!("{} is out of range 0..=20", job.retries));
            }
            if job.kind == BackupKind::Vault && job.encrypt == Some(false) {
                fail(
                    key("encrypt"),
                    "Vault snapshots are never stored in clear; remove encrypt = false".into(),
                );
            }
            if self.encrypts(job) && recipients == 0 {
                fail(
                    key("encrypt"),
                    format!(
                        "job {:?} is encrypted{} but there are no age recipients: set backup.age_recipients or backup.age_recipients_file",
                        job.name,
                        if job.kind == BackupKind::Vault { " (Vault snapshots always are)" } else { "" }
                    ),
                );
            }
            let present = [
                (BackupKind::Postgres, job.postgres.is_some()),
                (BackupKind::Vault, job.vault.is_some()),
                (BackupKind::K3s, job.k3s.is_some()),
                (BackupKind::Files, job.files.is_some()),
                (BackupKind::PgBasebackup, job.pg_basebackup.is_some()),
            ];
            for (kind, set) in present {
                if set && kind != job.kind {
                    fail(
                        key(kind.as_str()),
                        format!(
                            "job {:?} is of kind {:?}; a [backup.jobs.{}] table does not belong to it",
                            job.name,
                            job.kind.as_str(),
                            kind.as_str()
                        ),
                    );
                }
            }
            match job.kind {
                BackupKind::Postgres => match &job.postgres {
                    None => fail(key("postgres"), missing_table(job)),
                    Some(pg) => {
                        if pg.databases.is_empty() {
                            fail(
                                key("postgres.databases"),
                                "name at least one database, or [\"*\"] for all".into(),
                            );
                        }
                        if pg.databases.len() > 1 && pg.databases.iter().any(|d| d == "*") {
                            fail(
                                key("postgres.databases"),
                                "\"*\" already means every database; list names or \"*\" alone".into(),
                            );
                        }
                        for db in &pg.databases {
                            if db != "*" && check_target_segment(db).is_err() {
                                fail(
                                    key("postgres.databases"),
                                    format!("{db:?} cannot be used as an object key segment"),
                                );
                            }
                        }
                        if !pg.password_file.as_os_str().is_empty() {
                            if let Err(message) = check_secret(&pg.password_file) {
                                fail(key("postgres.password_file"), message);
                            }
                        }
                        if !pg.os_user.is_empty() && matches!(nix::unistd::User::from_name(&pg.os_user), Ok(None)) {
                            fail(key("postgres.os_user"), format!("user {:?} does not exist", pg.os_user));
                        }
                    }
                },
                BackupKind::Vault => match &job.vault {
                    None => fail(key("vault"), missing_table(job)),
                    Some(vault) => {
                        if !(vault.address.starts_with("http://") || vault.address.starts_with("https://")) {
                            fail(
                                key("vault.address"),
                                format!("{:?} is not an http:// or https:// URL", vault.address),
                            );
                        }
                        let token = !vault.token_file.as_os_str().is_empty();
                        let approle = !vault.approle_role_id_file.as_os_str().is_empty()
                            || !vault.approle_secret_id_file.as_os_str().is_empty();
                        if token == approle {
                            fail(
                                key("vault.token_file"),
                                "set either token_file or both approle_role_id_file and approle_secret_id_file".into(),
                            );
                        }
                        for (field, path) in [
                            ("vault.token_file", &vault.token_file),
                            ("vault.approle_role_id_file", &vault.approle_role_id_file),
                            ("vault.approle_secret_id_file", &vault.approle_secret_id_file),
                        ] {
                            if (token && field == "vault.token_file") || (approle && field != "vault.token_file") {
                                if let Err(message) = check_secret(path) {
                                    fail(key(field), message);
                                }
                            }
                        }
                        if !vault.ca_file.as_os_str().is_empty() {
                            if let Err(err) = std::fs::metadata(&vault.ca_file) {
                                fail(
                                    key("vault.ca_file"),
                                    format!("cannot read {}: {err}", vault.ca_file.display()),
                                );
                            }
                        }
                    }
                },
                BackupKind::K3s => match &job.k3s {
                    None => fail(key("k3s"), missing_table(job)),
                    Some(k3s) => {
                        if k3s.datastore == K3sDatastore::Sqlite && k3s.db_path.is_relative() {
                            fail(
                                key("k3s.db_path"),
                                format!("{} must be an absolute path", k3s.db_path.display()),
                            );
                        }
                        if k3s.token_file.is_relative() {
                            fail(
                                key("k3s.token_file"),
                                format!("{} must be an absolute path", k3s.token_file.display()),
                            );
                        }
                    }
                },
                BackupKind::PgBasebackup => match &job.pg_basebackup {
                    None => fail(key("pg-basebackup"), missing_table(job)),
                    Some(pg) => {
                        if !pg.password_file.as_os_str().is_empty() {
                            if let Err(message) = check_secret(&pg.password_file) {
                                fail(key("pg-basebackup.password_file"), message);
                            }
                        }
                        if !pg.os_user.is_empty() && matches!(nix::unistd::User::from_name(&pg.os_user), Ok(None)) {
                            fail(
                                key("pg-basebackup.os_user"),
                                format!("user {:?} does not exist", pg.os_user),
                            );
                        }
                    }
                },
                BackupKind::Files => match &job.files {
                    None => fail(key("files"), missing_table(job)),
                    Some(files) => {
                        if files.base_dir.is_relative() {
                            fail(
                                key("files.base_dir"),
                                format!("{} must be an absolute path", files.base_dir.display()),
                            );
                        }
                        if files.paths.is_empty() {
                            fail(
                                key("files.paths"),
                                "name at least one path (\".\" for all of base_dir)".into(),
                            );
                        }
                        for path in &files.paths {
                            if let Err(message) = check_relative_path(path) {
                                fail(key("files.paths"), message);
                            }
                        }
                    }
                },
            }
        }
        problems
    }
}

fn missing_table(job: &BackupJob) -> String {
    format!(
        "job {:?} is of kind {:?} but has no [backup.jobs.{}] table",
        job.name,
        job.kind.as_str(),
        job.kind.as_str()
    )
}

pub(crate) fn check_target_segment(segment: &str) -> Result<(), String> {
    if segment.is_empty()
        || segment.len() > 128
        || segment.starts_with('.')
        || segment.contains(['/', '\\'])
        || segment.chars().any(|c| c.is_control())
    {
        return Err(format!("{segment:?} cannot be used in an object key"));
    }
    Ok(())
}

fn check_relative_path(path: &str) -> Result<(), String> {
    use std::path::Component;
    let p = Path::new(path);
    if path.is_empty() || p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!("{path:?} must be a path relative to base_dir without `..`"));
    }
    Ok(())
}
