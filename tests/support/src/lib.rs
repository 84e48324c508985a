//! Real servers for platform-agent's integration tests: PostgreSQL 15, OpenBao
//! (raft storage) and two S3 servers (s3s-fs, and Garage for the realistic
//! tier).
//!
//! Each fixture runs on free loopback ports in its own temporary directory,
//! is ready when `start()` returns, and is killed and removed on drop. The
//! binaries come from `tests/fixtures/install.sh`, which records where it put
//! them in `$PLATFORM_AGENT_FIXTURES/env` (default
//! `/var/cache/platform-agent-fixtures/env`).

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

mod garage;
mod openbao;
mod postgres;
mod s3;

pub use garage::Garage;
pub use openbao::OpenBao;
pub use postgres::{make_writable_by_postgres, Postgres, PostgresBuilder};
pub use s3::{S3Response, S3Server};

/// What the object-store tests need of an S3 server, whichever it is, so
/// that one test body runs against s3s-fs and Garage alike.
pub trait S3Fixture {
    fn endpoint(&self) -> String;
    fn access_key(&self) -> &str;
    fn secret_key(&self) -> &str;
    fn create_bucket(&self, name: &str);
    fn request(&self, method: &str, path_and_query: &str, body: Option<&[u8]>) -> S3Response;
    fn stop(&mut self);
    fn start_again(&mut self);
    /// Multipart uploads begun in `bucket` and neither completed nor aborted.
    fn pending_uploads(&self, bucket: &str) -> Vec<String>;

    /// GetObject: `Some(bytes)`, or `None` when the server answers 404.
    fn get_object(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let resp = self.request("GET", &format!("/{bucket}/{key}"), None);
        match resp.status {
            200 => Some(resp.body),
            404 => None,
            s => panic!("GetObject {bucket}/{key}: HTTP {s}: {}", resp.text()),
        }
    }
}

macro_rules! s3_fixture_by_inherent_methods {
    ($fixture:ty) => {
        impl S3Fixture for $fixture {
            fn endpoint(&self) -> String {
                <$fixture>::endpoint(self)
            }
            fn access_key(&self) -> &str {
                <$fixture>::access_key(self)
            }
            fn secret_key(&self) -> &str {
                <$fixture>::secret_key(self)
            }
            fn create_bucket(&self, name: &str) {
                <$fixture>::create_bucket(self, name)
            }
            fn request(&self, method: &str, path_and_query: &str, body: Option<&[u8]>) -> S3Response {
                <$fixture>::request(self, method, path_and_query, body)
            }
            fn stop(&mut self) {
                <$fixture>::stop(self)
            }
            fn start_again(&mut self) {
                <$fixture>::start_again(self)
            }
            fn pending_uploads(&self, bucket: &str) -> Vec<String> {
                <$fixture>::pending_uploads(self, bucket)
            }
        }
    };
}
s3_fixture_by_inherent_methods!(S3Server);
s3_fixture_by_inherent_methods!(Garage);

/// Default for `PLATFORM_AGENT_FIXTURES`, the directory install.sh fills.
pub const DEFAULT_FIXTURES_DIR: &str = "/var/cache/platform-agent-fixtures";

const INSTALL_HINT: &str = "run `sudo bash tests/fixtures/install.sh` (from the repository root) to install the \
     real servers the integration tests need";

/// Where install.sh put each server binary.
#[derive(Debug, Clone)]
pub struct FixturePaths {
    /// The fixtures directory (`$PLATFORM_AGENT_FIXTURES` or the default).
    pub dir: PathBuf,
    /// PostgreSQL 15's bin directory (initdb, pg_ctl, postgres, psql, ...).
    pub pg_bin: PathBuf,
    /// The static OpenBao binary.
    pub bao_bin: PathBuf,
    /// The s3s-fs binary.
    pub s3s_fs_bin: PathBuf,
    /// The garage binary (the realistic S3 tier); `None` in an env file
    /// written before install.sh built it.
    pub garage_bin: Option<PathBuf>,
}

/// Reads the fixtures' env file once per process.
///
/// # Panics
/// If the env file is missing or incomplete: the message says to run
/// `tests/fixtures/install.sh`.
pub fn fixture_paths() -> &'static FixturePaths {
    static PATHS: OnceLock<FixturePaths> = OnceLock::new();
    PATHS.get_or_init(|| {
        let dir = std::env::var_os("PLATFORM_AGENT_FIXTURES")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_FIXTURES_DIR));
        let env_file = dir.join("env");
        let text = std::fs::read_to_string(&env_file)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}; {INSTALL_HINT}", env_file.display()));
        let vars: HashMap<&str, &str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .collect();
        let get = |key: &str| -> PathBuf {
            match vars.get(key) {
                Some(v) if !v.is_empty() => PathBuf::from(v),
                _ => panic!("{} has no {key}=...; {INSTALL_HINT}", env_file.display()),
            }
        };
        FixturePaths {
            pg_bin: get("PG_BIN"),
            bao_bin: get("BAO_BIN"),
            s3s_fs_bin: get("S3S_FS_BIN"),
            garage_bin: vars.get("GARAGE_BIN").filter(|v| !v.is_empty()).map(PathBuf::from),
            dir,
        }
    })
}

/// Path to an installed fixture binary; panics with the install hint if it is
/// not there (install.sh may have been interrupted or the cache pruned).
pub(crate) fn fixture_binary(path: &Path) -> PathBuf {
    if !path.is_file() {
        panic!("fixture binary {} is missing; {INSTALL_HINT}", path.display());
    }
    path.to_path_buf()
}

/// Ports handed out by this process; a port just probed free is not bound yet,
/// so without this two tests running in parallel could get the same one.
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A loopback TCP port that nothing listens on.
///
/// Ports are drawn at random from below the kernel's ephemeral range, so the
/// kernel never gives one to an outgoing connection between this check and
/// the server's bind, and never handed out twice by one process. Other
/// processes can still race for it; the window is the time until the server
/// binds. Right after this returns, a bind may fail for a moment: the probe's
/// own listener lives on in any process forked meanwhile, until its exec.
pub fn free_port() -> u16 {
    free_ports(1)
}

/// A port `p` such that both `p` and `p + 1` are free (OpenBao's API and
/// cluster ports).
pub fn free_port_pair() -> u16 {
    free_ports(2)
}

fn free_ports(count: u16) -> u16 {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse::<u16>().ok()))
        .unwrap_or(32768);
    let (low, high) = if ephemeral_low > 12_000 {
        (10_000u16, ephemeral_low - count)
    } else {
        // Unusual sysctl: the range above the ephemeral one is as good as any.
        (ephemeral_low.max(1024), 60_000)
    };
    let mut guard = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    let handed_out = guard.get_or_insert_with(HashSet::new);
    for _ in 0..2000 {
        let p = low + (random_u64() % u64::from(high - low)) as u16;
        let ports: Vec<u16> = (p..p + count).collect();
        if ports.iter().any(|q| handed_out.contains(q)) {
            continue;
        }
        // Hold all listeners at once so the probe sees the pair as a whole.
        let held: Result<Vec<TcpListener>, _> = ports
            .iter()
            .map(|q| TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, *q)))
            .collect();
        if held.is_ok() {
            handed_out.extend(ports);
            return p;
        }
    }
    panic!("found no {count} consecutive free loopback port(s) in {low}..{high}");
}

fn random_u64() -> u64 {
    // RandomState is seeded from the OS per process; the clock and a counter
    // make successive calls differ.
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// Calls `probe` until it returns `Some`, backing off from 5 ms to 100 ms
/// between tries, and gives up at `timeout`.
pub fn wait_for<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// True when the process runs as root (effective uid 0).
pub fn running_as_root() -> bool {
    // /proc/self belongs to the process's effective uid; reading it avoids
    // unsafe libc calls.
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// Last `max` bytes of a log file, for panic messages.
pub(crate) fn log_tail(path: &Path, max: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let start = bytes.len().saturating_sub(max);
            format!(
                "--- last {} bytes of {} ---\n{}",
                bytes.len() - start,
                path.display(),
                String::from_utf8_lossy(&bytes[start..])
            )
        }
        Err(e) => format!("(no log at {}: {e})", path.display()),
    }
}

/// Runs a command to completion, returning its output or a description of
/// why it failed (including stderr).
pub(crate) fn run(cmd: &mut Command) -> Result<Output, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Opens (creating or appending) a log file for a server's stdout/stderr.
pub(crate) fn log_file(path: &Path) -> io::Result<(std::fs::File, std::fs::File)> {
    let f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    let g = f.try_clone()?;
    Ok((f, g))
}

/// Starts a fixture's server with its output appended to `log` and waits
/// until `ready` says it serves. Panics, with the end of the log, when the
/// process exits first or is not ready within `timeout` (it is killed then).
pub(crate) fn spawn_server(
    what: &str,
    cmd: &mut Command,
    log: &Path,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> Child {
    let (out, err) = log_file(log).unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let up = wait_for(timeout, || {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(Err(status));
        }
        ready().then_some(Ok(()))
    });
    match up {
        Some(Ok(())) => child,
        Some(Err(status)) => panic!("{what} exited ({status})\n{}", log_tail(log, 4000)),
        None => {
            kill_child(&mut child);
            panic!("{what} did not answer within {timeout:?}\n{}", log_tail(log, 4000))
        }
    }
}

/// Kills a directly spawned server and reaps it.
pub(crate) fn kill_child(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// True when something accepts TCP connections on 127.0.0.1:`port`.
pub fn port_accepts(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &SocketAddrV4::new(Ipv4Addr::LOCALHOST, port).into(),
        Duration::from_millis(200),
    )
    .is_ok()
}
