use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use tempfile::TempDir;

use crate::{fixture_binary, fixture_paths, free_port, log_tail, run, running_as_root};

/// The cluster's superuser (initdb `-U`); also the OS user the server runs as
/// when the tests run as root.
const SUPERUSER: &str = "postgres";
const OS_USER: &str = "postgres";

/// uid and gid of the `postgres` OS user, looked up once.
fn postgres_ids() -> (u32, u32) {
    static IDS: OnceLock<(u32, u32)> = OnceLock::new();
    *IDS.get_or_init(|| {
        let id = |flag: &str| -> u32 {
            let out = run(Command::new("id").args([flag, OS_USER]))
                .unwrap_or_else(|e| panic!("no `{OS_USER}` OS user (installed with the postgresql package): {e}"));
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .unwrap_or_else(|e| panic!("`id {flag} {OS_USER}` printed no number: {e}"))
        };
        (id("-u"), id("-g"))
    })
}

/// Gives `path` (recursively) to the `postgres` OS user when the tests run as
/// root, so that the server and its `archive_command` can write there; does
/// nothing otherwise, as the server then runs as the current user.
///
/// A directory from `tempfile::tempdir()` needs only this: /tmp lets anyone
/// through, and the directory itself is then the server user's.
pub fn make_writable_by_postgres(path: &Path) {
    if !running_as_root() {
        return;
    }
    let (uid, gid) = postgres_ids();
    chown_recursive(path, uid, gid).unwrap_or_else(|e| panic!("chown {} to {OS_USER}: {e}", path.display()));
}

fn chown_recursive(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    let meta = std::fs::symlink_metadata(path)?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_recursive(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Settings for a throwaway cluster before it starts; see [`Postgres::builder`].
///
/// The temporary directory exists from `builder()` on, so a test can make
/// directories for `archive_command` inside it with [`PostgresBuilder::scratch_dir`]
/// and have them removed with the cluster.
pub struct PostgresBuilder {
    tmp: TempDir,
    archive_command: Option<String>,
    extra: Vec<(String, String)>,
    wal_segsize_mb: Option<u32>,
}

impl PostgresBuilder {
    /// initdb `--wal-segsize` in MiB (a power of two, 1..1024): small
    /// segments make more of them per minute of load.
    pub fn wal_segsize_mb(mut self, mb: u32) -> Self {
        self.wal_segsize_mb = Some(mb);
        self
    }

    /// Turns on `archive_mode` with this `archive_command` (`%p` and `%f` as
    /// PostgreSQL expands them). The command runs as the server's OS user.
    pub fn archive_command(mut self, command: impl Into<String>) -> Self {
        self.archive_command = Some(command.into());
        self
    }

    /// Adds `key = 'value'` to postgresql.conf after the fixture's own
    /// settings, so it overrides them.
    pub fn extra_conf(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.extra.push((key.into(), value.into()));
        self
    }

    /// A new directory `name` inside the cluster's temporary directory,
    /// writable by the server (and its archive_command), removed on drop.
    pub fn scratch_dir(&self, name: &str) -> PathBuf {
        scratch_dir(self.tmp.path(), name)
    }

    /// Creates the cluster with initdb and starts it; returns once it accepts
    /// connections.
    pub fn start(self) -> Postgres {
        let bin = fixture_paths().pg_bin.clone();
        for b in ["initdb", "pg_ctl", "postgres", "psql"] {
            fixture_binary(&bin.join(b));
        }
        let as_root = running_as_root();
        let root = self.tmp.path().to_path_buf();
        let data_dir = root.join("data");
        let socket_dir = root.join("socket");
        let log = root.join("postgres.log");
        std::fs::create_dir(&socket_dir).expect("create socket dir");
        // Other users (the agent under test may drop privileges) need to reach
        // the socket; the data dir stays private as PostgreSQL requires.
        set_mode(&root, 0o755);
        set_mode(&socket_dir, 0o755);
        if as_root {
            make_writable_by_postgres(&root);
        }
        let port = free_port();

        let mut pg = Postgres {
            tmp: self.tmp,
            bin,
            data_dir,
            socket_dir,
            log,
            port,
            as_root,
            running: false,
        };
        let mut initdb = pg.server_cmd("initdb");
        if let Some(mb) = self.wal_segsize_mb {
            initdb.arg(format!("--wal-segsize={mb}"));
        }
        initdb
            .arg("-D")
            .arg(&pg.data_dir)
            .args([
                "-A",
                "trust",
                "-U",
                SUPERUSER,
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ])
            .output_checked()
            .unwrap_or_else(|e| panic!("initdb failed: {e}"));

        let mut conf = String::from("\n# platform-agent-testsupport\n");
        let mut set = |k: &str, v: &str| conf.push_str(&format!("{k} = '{}'\n", v.replace('\'', "''")));
        set("port", &port.to_string());
        set("listen_addresses", "127.0.0.1");
        set("unix_socket_directories", &pg.socket_dir.to_string_lossy());
        set("wal_level", "replica");
        set("max_wal_senders", "4");
        set("logging_collector", "off");
        set("log_destination", "stderr");
        if let Some(cmd) = &self.archive_command {
            set("archive_mode", "on");
            set("archive_command", cmd);
        }
        for (k, v) in &self.extra {
            set(k, v);
        }
        let conf_path = pg.data_dir.join("postgresql.conf");
        std::fs::OpenOptions::new()
            .append(true)
            .open(&conf_path)
            .and_then(|mut f| f.write_all(conf.as_bytes()))
            .unwrap_or_else(|e| panic!("append to {}: {e}", conf_path.display()));

        pg.start_again();
        pg
    }
}

/// A throwaway PostgreSQL 15 cluster on 127.0.0.1 and a private Unix socket
/// directory, with trust authentication for the superuser `postgres`.
///
/// When the tests run as root the server runs as the `postgres` OS user
/// (initdb refuses root); the fixture's whole temporary directory belongs to
/// that user then. Dropping it stops the server (immediate mode) and deletes
/// everything.
pub struct Postgres {
    tmp: TempDir,
    bin: PathBuf,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    log: PathBuf,
    port: u16,
    as_root: bool,
    running: bool,
}

impl Postgres {
    /// Starts a cluster with the default settings.
    pub fn start() -> Postgres {
        Self::builder().start()
    }

    /// A builder for archive settings and extra postgresql.conf lines.
    pub fn builder() -> PostgresBuilder {
        let tmp = tempfile::Builder::new()
            .prefix("pa-testsupport-postgres-")
            .tempdir()
            .expect("create temp dir for postgres");
        PostgresBuilder {
            tmp,
            archive_command: None,
            extra: Vec::new(),
            wal_segsize_mb: None,
        }
    }

    /// Always `127.0.0.1`.
    pub fn host(&self) -> &str {
        "127.0.0.1"
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Directory holding the server's Unix socket (usable as libpq's `host`).
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The superuser, `postgres`; no password (trust authentication).
    pub fn superuser(&self) -> &str {
        SUPERUSER
    }

    /// libpq keyword/value connection string over TCP to the `postgres` database.
    pub fn connection_string(&self) -> String {
        format!(
            "host={} port={} user={} dbname=postgres",
            self.host(),
            self.port,
            SUPERUSER
        )
    }

    /// `postgresql://` URL over TCP to the `postgres` database.
    pub fn url(&self) -> String {
        format!("postgresql://{}@{}:{}/postgres", SUPERUSER, self.host(), self.port)
    }

    /// PostgreSQL's bin directory (pg_basebackup, pg_receivewal, pgbench, ...).
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// PGDATA.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server log (stderr of the postmaster).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// A new directory `name` inside the fixture's temporary directory,
    /// writable by the server, removed on drop.
    pub fn scratch_dir(&self, name: &str) -> PathBuf {
        scratch_dir(self.tmp.path(), name)
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Runs SQL through the real `psql` (over the Unix socket, as the
    /// superuser, stopping at the first error) and returns its unaligned,
    /// tuples-only output with the trailing newline trimmed: `select 1, 2`
    /// gives `1|2`, several rows come one per line.
    ///
    /// # Panics
    /// If psql fails; the message holds its stderr.
    pub fn psql(&self, sql: &str) -> String {
        self.try_psql(sql).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Postgres::psql`], returning psql's error instead of panicking.
    pub fn try_psql(&self, sql: &str) -> Result<String, String> {
        let mut cmd = Command::new(self.bin.join("psql"));
        cmd.args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            "postgres",
            "-U",
            SUPERUSER,
            "-h",
        ])
        .arg(&self.socket_dir)
        .args(["-p", &self.port.to_string(), "-f", "-"])
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGPASSWORD")
        .env_remove("PGSERVICE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| format!("cannot run psql: {e}"))?;
        // psql reads all of stdin before it answers, so writing first cannot
        // deadlock on a full stdout pipe.
        let write = child.stdin.take().expect("psql stdin").write_all(sql.as_bytes());
        let out = child.wait_with_output().map_err(|e| format!("psql: {e}"))?;
        write.map_err(|e| format!("writing SQL to psql: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "psql failed ({}) on:\n{sql}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text.trim_end_matches('\n').to_string())
    }

    /// Stops the server cleanly (`pg_ctl stop -m fast`): a shutdown
    /// checkpoint, and the archiver gets to finish.
    pub fn stop(&mut self) {
        self.pg_ctl_stop("fast").unwrap_or_else(|e| panic!("{e}"));
    }

    /// Stops the server the way a crash would (`pg_ctl stop -m immediate`):
    /// no checkpoint; the next start runs crash recovery.
    pub fn stop_immediate(&mut self) {
        self.pg_ctl_stop("immediate").unwrap_or_else(|e| panic!("{e}"));
    }

    /// Starts the stopped server again on the same port and data directory;
    /// returns once it accepts connections. No-op while it runs.
    pub fn start_again(&mut self) {
        if self.running {
            return;
        }
        // pg_ctl -w polls the postmaster.pid status line until the server
        // reports ready (or has failed), bounded by -t.
        let res = self
            .server_cmd("pg_ctl")
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", "60", "start"])
            .output_checked();
        if let Err(e) = res {
            panic!("starting postgres failed: {e}\n{}", log_tail(&self.log, 4000));
        }
        self.running = true;
    }

    /// `stop()` then `start_again()`.
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    fn pg_ctl_stop(&mut self, mode: &str) -> Result<(), String> {
        if !self.running {
            return Ok(());
        }
        self.server_cmd("pg_ctl")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", mode, "-w", "-t", "60", "stop"])
            .output_checked()
            .map_err(|e| format!("stopping postgres ({mode}) failed: {e}\n{}", log_tail(&self.log, 4000)))?;
        self.running = false;
        Ok(())
    }

    /// A command for one of the server binaries, run as the `postgres` OS
    /// user when we are root.
    fn server_cmd(&self, program: &str) -> ServerCmd {
        let path = self.bin.join(program);
        let mut cmd = if self.as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", OS_USER, "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        // The server user may not be able to enter the test's working
        // directory, and pg_ctl refuses to run without one.
        cmd.current_dir(self.tmp.path());
        ServerCmd(cmd)
    }
}

struct ServerCmd(Command);

impl ServerCmd {
    fn arg(&mut self, a: impl AsRef<std::ffi::OsStr>) -> &mut Self {
        self.0.arg(a);
        self
    }
    fn args<I: IntoIterator<Item = S>, S: AsRef<std::ffi::OsStr>>(&mut self, a: I) -> &mut Self {
        self.0.args(a);
        self
    }
    fn output_checked(&mut self) -> Result<(), String> {
        run(&mut self.0).map(|_| ())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if !self.running {
            return;
        }
        if self.pg_ctl_stop("immediate").is_ok() {
            return;
        }
        // pg_ctl failed (say, the data dir was damaged by the test): kill the
        // postmaster by the pid it recorded so it does not outlive the test.
        let pid_file = self.data_dir.join("postmaster.pid");
        if let Some(pid) = std::fs::read_to_string(pid_file)
            .ok()
            .and_then(|s| s.lines().next().map(str::to_owned))
        {
            let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
        }
    }
}

fn scratch_dir(root: &Path, name: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    make_writable_by_postgres(&dir);
    dir
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}
