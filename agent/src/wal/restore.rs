//! `platform-agent restore pg --pitr TIME --target-dir DIR [--from ID]`:
//! point-in-time recovery from a base backup (backup job kind
//! `pg-basebackup`) and the WAL archive. Runs in the CLI process, without the
//! daemon, from the configuration and the object store alone, so that it
//! works on a rebuilt node with an empty state store.
//!
//! How the base backup is chosen: each base backup is taken with the label
//! `pa:<object key>`; PostgreSQL archives a `.backup` history file for it
//! (through `wal-push`) holding that label, the start segment and the stop
//! time. The newest base backup that stopped before the target time (or the
//! one named by `--from`, a catalog id) is extracted into the empty target
//! directory (mode 0700, ownership as in the backup), then `recovery.signal`
//! is written and `postgresql.auto.conf` gains `restore_command = '<this
//! binary> wal-fetch %f %p'` (with `--config` when one was given),
//! `recovery_target_time` and `recovery_target_action = 'promote'`. The
//! operator then starts PostgreSQL on the directory; it replays the archived
//! WAL to the target time and promotes.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::archive::Archiver;
use super::names::{WalFileKind, WalName};
use super::WalError;
use crate::backup::pipeline::{Decoding, Progress};
use crate::backup::source::SourceError;
use crate::backup::Compression;
use crate::config::Settings;

const LABEL_PREFIX: &str = "pa:";

/// The backup label of a base backup stored under `key`.
pub fn label_for(key: &str) -> String {
    format!("{LABEL_PREFIX}{key}")
}

/// What a `.backup` history file says about one base backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseBackupInfo {
    /// The base backup's object key.
    pub key: String,
    pub start_segment: String,
    pub stop_time: chrono::DateTime<chrono::Utc>,
}

/// Parses a `.backup` history file; None unless it is one of ours.
pub fn parse_backup_file(text: &str) -> Option<BaseBackupInfo> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
    };
    let key = field("LABEL:")?.strip_prefix(LABEL_PREFIX)?.to_string();
    let start = field("START WAL LOCATION:")?;
    let start_segment = start.split("(file ").nth(1)?.trim_end_matches(')').trim().to_string();
    let stop_time = parse_pg_time(&field("STOP TIME:")?)?;
    Some(BaseBackupInfo {
        key,
        start_segment,
        stop_time,
    })
}

/// `2026-11-24 07:40:01 UTC` or `... +02`/`+0200` as PostgreSQL writes it.
fn parse_pg_time(text: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    let (stamp, zone) = text.rsplit_once(' ')?;
    let naive = chrono::NaiveDateTime::parse_from_str(stamp, "%Y-%m-%d %H:%M:%S").ok()?;
    let offset_secs = match zone {
        "UTC" | "GMT" | "Etc/UTC" => 0,
        z if z.starts_with('+') || z.starts_with('-') => {
            let sign = if z.starts_with('-') { -1 } else { 1 };
            let digits: String = z[1..].chars().filter(|c| c.is_ascii_digit()).collect();
            let (h, m) = match digits.len() {
                2 => (digits.parse::<i32>().ok()?, 0),
                4 => (digits[..2].parse::<i32>().ok()?, digits[2..].parse::<i32>().ok()?),
                _ => return None,
            };
            sign * (h * 3600 + m * 60)
        }
        _ => return None,
    };
    let offset = chrono::FixedOffset::east_opt(offset_secs)?;
    Some(naive.and_local_timezone(offset).single()?.with_timezone(&chrono::Utc))
}

/// Every base backup the WAL archive knows of, oldest stop first.
pub async fn base_backups(archiver: &Archiver) -> Result<Vec<BaseBackupInfo>, WalError> {
    let listed = archiver.objects.list(&format!("{}/", archiver.prefix)).await?;
    let mut found = Vec::new();
    for object in listed {
        let Some(file) = object.key.rsplit('/').next() else {
            continue;
        };
        let name = file.trim_end_matches(".age").trim_end_matches(".zst");
        let Some(parsed) = WalName::parse(name) else { continue };
        if parsed.kind != WalFileKind::Backup {
            continue;
        }
        if let Some(data) = archiver.fetch(&parsed).await? {
            if let Some(info) = parse_backup_file(&String::from_utf8_lossy(&data)) {
                found.push(info);
            }
        }
    }
    found.sort_by_key(|b| b.stop_time);
    Ok(found)
}

#[derive(Debug, Clone)]
pub struct PitrReport {
    pub base_backup: String,
    pub start_segment: String,
    pub target_dir: PathBuf,
    pub target_time: String,
}

/// Prepares `target_dir` for recovery to `target` (RFC 3339).
pub async fn pitr(
    settings: &Settings,
    config_args: &[PathBuf],
    target: &str,
    target_dir: &Path,
    from: Option<i64>,
) -> Result<PitrReport, WalError> {
    let target_time = chrono::DateTime::parse_from_rfc3339(target)
        .map_err(|err| WalError::Setup(format!("--pitr {target:?} is not an RFC 3339 time: {err}")))?
        .with_timezone(&chrono::Utc);
    let objects = crate::objstore::open(&settings.object_store, crate::objstore::OpenOptions::default())?;
    let archiver = Archiver::new(&settings.wal, &settings.backup, objects.clone(), None, true)?;
    let backups = base_backups(&archiver).await?;
    let chosen = match from {
        Some(id) => backups
            .iter()
            .rev()
            .find(|b| b.key.rsplit('/').next().is_some_and(|f| f.contains(&format!("-{id}."))))
            .ok_or_else(|| WalError::Setup(format!("no base backup with catalog id {id} in the WAL archive")))?,
        None => backups
            .iter()
            .rev()
            .find(|b| b.stop_time < target_time)
            .ok_or_else(|| {
                WalError::Setup(format!(
                    "no base backup finished before {target} ({} known); PITR needs one",
                    backups.len()
                ))
            })?,
    }
    .clone();
    if chosen.stop_time >= target_time {
        return Err(WalError::Setup(format!(
            "base backup {} finished at {}, after the target time {target}",
            chosen.key, chosen.stop_time
        )));
    }

    // An empty (or new) directory, private as PostgreSQL requires.
    match std::fs::read_dir(target_dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(WalError::Setup(format!(
                    "{} is not empty; PITR restores into an empty directory",
                    target_dir.display()
                )));
            }
        }
        Err(_) => std::fs::create_dir_all(target_dir).map_err(|source| WalError::Spool {
            path: target_dir.to_path_buf(),
            source,
        })?,
    }
    std::fs::set_permissions(target_dir, std::fs::Permissions::from_mode(0o700)).map_err(|source| WalError::Spool {
        path: target_dir.to_path_buf(),
        source,
    })?;

    let compression = if chosen.key.contains(".tar.zst") {
        Compression::Zstd
    } else if chosen.key.contains(".tar.gz") {
        Compression::Gzip
    } else {
        Compression::None
    };
    let decoding = Decoding {
        compression,
        encrypted: chosen.key.ends_with(".age"),
        identities: archiver.identities.clone(),
    };
    let dir = target_dir.to_path_buf();
    crate::backup::pipeline::fetch(
        objects.as_ref(),
        &chosen.key,
        None,
        decoding,
        Progress::default(),
        move |input: &mut dyn Read| {
            let mut archive = tar::Archive::new(input);
            archive.set_preserve_permissions(true);
            archive.set_preserve_ownerships(nix::unistd::geteuid().is_root());
            archive
                .unpack(&dir)
                .map_err(|e| SourceError::io(format!("unpack into {}", dir.display()), e))
        },
    )
    .await
    .map_err(|err| WalError::Setup(format!("{}: {err}", chosen.key)))?;

    // The directory belongs to whoever owns the cluster's files.
    let owner = std::fs::metadata(target_dir.join("PG_VERSION")).map_err(|source| WalError::Spool {
        path: target_dir.join("PG_VERSION"),
        source,
    })?;
    let (uid, gid) = (owner.uid(), owner.gid());
    let chown = |path: &Path| {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|source| WalError::Spool {
            path: path.to_path_buf(),
            source,
        })
    };
    chown(target_dir)?;
    for sub in ["pg_wal", "pg_wal/archive_status"] {
        let path = target_dir.join(sub);
        if !path.exists() {
            std::fs::create_dir_all(&path).map_err(|source| WalError::Spool {
                path: path.clone(),
                source,
            })?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).ok();
            chown(&path)?;
        }
    }

    let exe = std::env::current_exe().map_err(|e| WalError::Setup(format!("cannot find this binary: {e}")))?;
    let mut command = shell_quote(&exe.display().to_string());
    command.push_str(" wal-fetch");
    for config in config_args {
        let absolute = std::path::absolute(config).unwrap_or_else(|_| config.clone());
        command.push_str(" --config ");
        command.push_str(&shell_quote(&absolute.display().to_string()));
    }
    command.push_str(" %f %p");
    let pg_time = target_time.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string();
    let conf = format!(
        "\n# platform-agent restore pg --pitr {target} from {}\nrestore_command = '{}'\nrecovery_target_time = '{pg_time}'\nrecovery_target_action = 'promote'\n",
        chosen.key,
        command.replace('\'', "''")
    );
    let auto_conf = target_dir.join("postgresql.auto.conf");
    let mut text = std::fs::read_to_string(&auto_conf).unwrap_or_default();
    text.push_str(&conf);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| WalError::Spool { path, source }
    };
    crate::fsutil::write_atomic(&auto_conf, text.as_bytes(), 0o600).map_err(io(&auto_conf))?;
    chown(&auto_conf)?;
    let signal = target_dir.join("recovery.signal");
    crate::fsutil::write_atomic(&signal, b"", 0o600).map_err(io(&signal))?;
    chown(&signal)?;
    Ok(PitrReport {
        base_backup: chosen.key,
        start_segment: chosen.start_segment,
        target_dir: target_dir.to_path_buf(),
        target_time: pg_time,
    })
}

/// Single-quoted for the shell PostgreSQL runs restore_command with.
fn shell_quote(word: &str) -> String {
    if word
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,".contains(c))
    {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_backup_history_files() {
        let text = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n\
                    STOP WAL LOCATION: 0/2000100 (file 000000010000000000000002)\n\
                    CHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\nBACKUP FROM: primary\n\
                    START TIME: 2026-11-24 07:40:00 UTC\nLABEL: pa:base/cluster/20261124T074000Z-7.tar.zst\n\
                    START TIMELINE: 1\nSTOP TIME: 2026-11-24 07:40:01 UTC\nSTOP TIMELINE: 1\n";
        let info = parse_backup_file(text).unwrap();
        assert_eq!(info.key, "base/cluster/20261124T074000Z-7.tar.zst");
        assert_eq!(info.start_segment, "000000010000000000000002");
        assert_eq!(info.stop_time.to_rfc3339(), "2026-11-24T07:40:01+00:00");
        assert!(parse_backup_file(&text.replace("pa:", "other ")).is_none());
        assert_eq!(
            parse_pg_time("2026-11-24 09:40:01 +02").unwrap().to_rfc3339(),
            "2026-11-24T07:40:01+00:00"
        );
    }
}
