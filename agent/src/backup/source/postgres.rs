//! PostgreSQL: `pg_dump --format=custom` per database, uncompressed (our
//! zstd does it faster and on all cores); test restore and restore with
//! `pg_restore` reading the decoded stream on stdin. Roles and tablespaces
//! live outside every database: `pg_dumpall --globals-only` stores them as
//! one more target, `_globals`, so that a rebuilt server gets the owners and
//! logins its restored databases refer to.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use tokio_util::sync::CancellationToken;

use super::{feed_command, stream_command, SourceError, Target};
use crate::backup::settings::PostgresSource;

pub const FORMAT: &str = "pg-custom";
pub const GLOBALS_FORMAT: &str = "pg-globals";
/// The target of the globals dump. A database of this name is skipped (its
/// objects would mix with the globals'); no sane cluster has one.
pub const GLOBALS_TARGET: &str = "_globals";
const GLOBALS_HEADER: &str = "-- PostgreSQL database cluster dump\n";
const GLOBALS_TRAILER: &str = "-- PostgreSQL database cluster dump complete\n";
/// A globals dump is a few KiB; anything near this is not one.
const GLOBALS_MAX_BYTES: u64 = 64 << 20;

/// How to reach the server: a prepared environment for the client tools,
/// with the password in a private pgpass file that lives as long as this.
pub struct Connection {
    settings: PostgresSource,
    passfile: Option<tempfile::TempPath>,
    ids: Option<(u32, u32)>,
}

impl Connection {
    pub fn new(settings: &PostgresSource, scratch: &Path) -> Result<Self, SourceError> {
        let ids = if settings.os_user.is_empty() {
            None
        } else {
            let user = nix::unistd::User::from_name(&settings.os_user)
                .map_err(|e| SourceError::Invalid(format!("cannot look up user {:?}: {e}", settings.os_user)))?
                .ok_or_else(|| SourceError::Invalid(format!("user {:?} does not exist", settings.os_user)))?;
            Some((user.uid.as_raw(), user.gid.as_raw()))
        };
        let passfile = if settings.password_file.as_os_str().is_empty() {
            None
        } else {
            let password = std::fs::read_to_string(&settings.password_file)
                .map_err(|e| SourceError::io(format!("read {}", settings.password_file.display()), e))?;
            let password = password.trim_end_matches(['\n', '\r']);
            let escaped = password.replace('\\', "\\\\").replace(':', "\\:");
            std::fs::create_dir_all(scratch)
                .map_err(|e| SourceError::io(format!("create {}", scratch.display()), e))?;
            let mut file = tempfile::Builder::new()
                .prefix("pgpass-")
                .tempfile_in(scratch)
                .map_err(|e| SourceError::io("create a pgpass file", e))?;
            file.write_all(format!("*:*:*:*:{escaped}\n").as_bytes())
                .map_err(|e| SourceError::io("write the pgpass file", e))?;
            file.as_file()
                .set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(|e| SourceError::io("protect the pgpass file", e))?;
            if let Some((uid, gid)) = ids {
                std::os::unix::fs::chown(file.path(), Some(uid), Some(gid))
                    .map_err(|e| SourceError::io("hand the pgpass file to the client user", e))?;
            }
            Some(file.into_temp_path())
        };
        Ok(Connection {
            settings: settings.clone(),
            passfile,
            ids,
        })
    }

    fn bin(&self, tool: &str) -> PathBuf {
        if self.settings.bin_dir.as_os_str().is_empty() {
            PathBuf::from(tool)
        } else {
            self.settings.bin_dir.join(tool)
        }
    }

    /// A client tool with the connection in its environment.
    pub fn command(&self, tool: &str) -> Command {
        let mut cmd = Command::new(self.bin(tool));
        cmd.env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("LC_ALL", "C")
            .env("PGHOST", &self.settings.host)
            .env("PGPORT", self.settings.port.to_string())
            .env("PGUSER", &self.settings.user)
            .env("PGAPPNAME", "platform-agent")
            .env("PGCONNECT_TIMEOUT", "15")
            .current_dir("/");
        match &self.passfile {
            Some(path) => cmd.env("PGPASSFILE", path.as_os_str()),
            None => cmd.env("PGPASSFILE", "/dev/null"),
        };
        if let Some((uid, gid)) = self.ids {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    /// Runs a psql script on `database` with `vars` as psql variables
    /// (quoted in the script as :'name' or :"name"); returns unaligned,
    /// tuples-only output.
    pub fn psql(&self, database: &str, script: &str, vars: &[(&str, &str)]) -> Result<String, SourceError> {
        let mut cmd = self.command("psql");
        cmd.args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "--no-password",
            "-d",
            database,
        ]);
        for (name, value) in vars {
            cmd.arg("-v").arg(format!("{name}={value}"));
        }
        cmd.args(["-f", "-"]);
        let out = feed_command(cmd, &mut script.as_bytes(), &CancellationToken::new())?;
        Ok(out.trim_end().to_string())
    }

    /// The databases this job dumps, one object each.
    pub fn targets(&self) -> Result<Vec<Target>, SourceError> {
        let names: Vec<String> = if self.settings.databases.iter().any(|d| d == "*") {
            self.psql(
                "postgres",
                "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY datname;",
                &[],
            )?
            .lines()
            .map(str::to_string)
            .filter(|n| !n.is_empty())
            .collect()
        } else {
            self.settings.databases.clone()
        };
        // Globals first: a restore in catalog order creates the roles before
        // the databases that name them as owners.
        let mut targets = Vec::new();
        if self.settings.globals {
            targets.push(Target {
                name: GLOBALS_TARGET.into(),
                format: GLOBALS_FORMAT,
                extension: "sql",
            });
        }
        for name in names {
            if name == GLOBALS_TARGET {
                tracing::warn!(database = %name, "skipping a database named like the globals dump's target");
                continue;
            }
            if crate::backup::settings::check_target_segment(&name).is_err() {
                tracing::warn!(database = %name, "skipping a database whose name cannot be an object key");
                continue;
            }
            targets.push(Target {
                name,
                format: FORMAT,
                extension: "pgdump",
            });
        }
        if targets.iter().all(|t| t.format != FORMAT) {
            return Err(SourceError::Invalid("no database to dump".into()));
        }
        Ok(targets)
    }

    /// Roles (with their password hashes) and tablespaces, as SQL.
    pub fn dump_globals(&self, out: &mut dyn Write, cancel: &CancellationToken) -> Result<(), SourceError> {
        let mut cmd = self.command("pg_dumpall");
        cmd.args(["--globals-only", "--no-password"]);
        stream_command(cmd, out, cancel)
    }

    /// Replays a globals dump on the server. Roles that exist already (the
    /// superuser always does) make their CREATE ROLE fail, which is why
    /// psql goes on after errors here; the ALTER ROLEs that follow still set
    /// their attributes and passwords. Success means every role of the dump
    /// exists afterwards.
    pub fn restore_globals(&self, input: &mut dyn Read) -> Result<String, SourceError> {
        let dump = read_globals(input)?;
        let roles = created_roles(&dump);
        self.psql("postgres", &format!("\\set ON_ERROR_STOP off\n{dump}"), &[])?;
        let present: std::collections::HashSet<String> = self
            .psql("postgres", "SELECT rolname FROM pg_roles;", &[])?
            .lines()
            .map(str::to_string)
            .collect();
        let missing: Vec<&String> = roles.iter().filter(|r| !present.contains(*r)).collect();
        if !missing.is_empty() {
            return Err(SourceError::Failed {
                program: "psql".into(),
                status: "globals not applied".into(),
                stderr: format!("roles still missing after the replay: {missing:?}"),
            });
        }
        Ok(format!("{} roles present", roles.len()))
    }

    pub fn dump(&self, database: &str, out: &mut dyn Write, cancel: &CancellationToken) -> Result<(), SourceError> {
        let mut cmd = self.command("pg_dump");
        cmd.args(["--format=custom", "--compress=0", "--no-password"])
            .arg(format!("--dbname={database}"));
        stream_command(cmd, out, cancel)
    }

    /// A base backup of the whole cluster as one tar stream (`-D - -Ft`,
    /// so one tablespace only), without WAL: the WAL archive supplies it.
    /// `label` becomes the backup label, which PostgreSQL also writes into
    /// the `.backup` history file it archives: that is how a restore finds
    /// the backup's start segment and stop time.
    pub fn basebackup(&self, label: &str, out: &mut dyn Write, cancel: &CancellationToken) -> Result<(), SourceError> {
        let mut cmd = self.command("pg_basebackup");
        cmd.args(["-D", "-", "-Ft", "-X", "none", "--checkpoint=fast", "--no-password"])
            .arg(format!("--label={label}"));
        stream_command(cmd, out, cancel)
    }

    pub fn database_exists(&self, database: &str) -> Result<bool, SourceError> {
        let out = self.psql(
            "postgres",
            "SELECT 1 FROM pg_database WHERE datname = :'name';",
            &[("name", database)],
        )?;
        Ok(out.trim() == "1")
    }

    pub fn create_database(&self, database: &str) -> Result<(), SourceError> {
        self.psql("postgres", "CREATE DATABASE :\"name\";", &[("name", database)])
            .map(drop)
    }

    pub fn drop_database(&self, database: &str) -> Result<(), SourceError> {
        self.psql(
            "postgres",
            "DROP DATABASE IF EXISTS :\"name\" WITH (FORCE);",
            &[("name", database)],
        )
        .map(drop)
    }

    /// Restores a custom-format dump from `input` into `database`.
    pub fn restore_into(
        &self,
        database: &str,
        input: &mut dyn Read,
        no_owner: bool,
        cancel: &CancellationToken,
    ) -> Result<(), SourceError> {
        let mut cmd = self.command("pg_restore");
        cmd.args(["--exit-on-error", "--no-password"])
            .arg(format!("--dbname={database}"));
        if no_owner {
            cmd.args(["--no-owner", "--no-acl"]);
        }
        feed_command(cmd, input, cancel).map(drop)
    }

    /// User tables and their total row estimate in `database`, for reports.
    pub fn table_count(&self, database: &str) -> Result<u64, SourceError> {
        let out = self.psql(
            database,
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema');",
            &[],
        )?;
        out.trim()
            .parse()
            .map_err(|_| SourceError::Invalid(format!("unexpected answer from psql: {out:?}")))
    }
}

/// The test restore of a drill or `backup verify`: into a scratch database
/// that is dropped again, whatever happens.
pub fn test_restore(
    conn: &Connection,
    scratch_db: &str,
    input: &mut dyn Read,
    cancel: &CancellationToken,
) -> Result<String, SourceError> {
    conn.drop_database(scratch_db)?;
    conn.create_database(scratch_db)?;
    let result = conn
        .restore_into(scratch_db, input, true, cancel)
        .and_then(|()| conn.table_count(scratch_db));
    let dropped = conn.drop_database(scratch_db);
    let tables = result?;
    dropped?;
    Ok(format!(
        "pg_restore into scratch database {scratch_db} succeeded ({tables} tables); dropped again"
    ))
}

/// Makes `database` ready to be restored into: refuses an existing one
/// unless `force`, which drops it first.
pub fn prepare_restore_target(conn: &Connection, database: &str, force: bool) -> Result<(), SourceError> {
    if conn.database_exists(database)? {
        if !force {
            return Err(SourceError::Refused(format!(
                "database {database:?} exists; restore into another one with --target NAME, or pass --force to drop and replace it"
            )));
        }
        conn.drop_database(database)?;
    }
    conn.create_database(database)
}

fn read_globals(input: &mut dyn Read) -> Result<String, SourceError> {
    let mut dump = String::new();
    input
        .take(GLOBALS_MAX_BYTES)
        .read_to_string(&mut dump)
        .map_err(|e| SourceError::io("read the globals dump", e))?;
    check_globals_text(&dump)?;
    Ok(dump)
}

/// A globals dump is complete when pg_dumpall's trailer is there: a cut-off
/// one (a truncated object) fails here, not half-way through a restore.
fn check_globals_text(dump: &str) -> Result<(), SourceError> {
    if !dump.contains(GLOBALS_HEADER) {
        return Err(SourceError::Invalid("not a pg_dumpall globals dump (no header)".into()));
    }
    if !dump.contains(GLOBALS_TRAILER) {
        return Err(SourceError::Invalid(
            "the globals dump is truncated (no completion trailer)".into(),
        ));
    }
    Ok(())
}

/// The test restore of a globals dump: complete, and how many roles it holds.
/// Replaying it for a test would change the live server's roles.
pub fn check_globals(input: &mut dyn Read) -> Result<String, SourceError> {
    let dump = read_globals(input)?;
    Ok(format!("globals dump complete: {} roles", created_roles(&dump).len()))
}

/// Role names of the dump's `CREATE ROLE name;` lines, unquoted.
fn created_roles(dump: &str) -> Vec<String> {
    dump.lines()
        .filter_map(|line| line.strip_prefix("CREATE ROLE ")?.strip_suffix(';'))
        .map(|name| match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
            Some(quoted) => quoted.replace("\"\"", "\""),
            None => name.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUMP: &str = "--\n-- PostgreSQL database cluster dump\n--\n\nCREATE ROLE postgres;\nALTER ROLE postgres WITH SUPERUSER;\nCREATE ROLE \"App \"\"Reader\"\"\";\n\n--\n-- PostgreSQL database cluster dump complete\n--\n\n";

    #[test]
    fn globals_roles_are_read_from_create_role_lines() {
        assert_eq!(
            created_roles(DUMP),
            vec!["postgres".to_string(), "App \"Reader\"".to_string()]
        );
        assert_eq!(
            check_globals(&mut DUMP.as_bytes()).unwrap(),
            "globals dump complete: 2 roles"
        );
    }

    #[test]
    fn a_truncated_globals_dump_is_refused() {
        let cut = &DUMP[..DUMP.len() - 50];
        let err = check_globals(&mut cut.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        assert!(check_globals(&mut "SELECT 1;".as_bytes()).is_err());
    }
}
