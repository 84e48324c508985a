//! `platform-agent wal-push %p %f` and `platform-agent wal-fetch %f %p`.
//!
//! wal-push is run by PostgreSQL once per segment, so it does as little as
//! it can: it reads the configuration without the machine checks `run`
//! makes (PostgreSQL's user need not read the agent's secrets), sends one
//! `wal-push` request over the blocking Unix socket client and waits for the
//! answer; no async runtime is started on that path. Only when the daemon
//! is down and `wal.when_daemon_down = "direct"` does it build the object
//! store client from the same configuration and upload the segment itself
//! through the same [`Archiver::push`], on a current-thread runtime.
//!
//! wal-fetch never needs the daemon (during a restore the daemon may be the
//! one restoring): it fetches, checks both SHA-256s, decodes, and writes
//! `%p` atomically. A file that is not archived exits 1 quietly (PostgreSQL
//! probes for files that do not exist, e.g. the next timeline's history).
//! With `wal.prefetch = N` it then also fetches the next N segments in
//! parallel into `<dir of %p>/.platform-agent-prefetch/`, which the following
//! calls take from instead of asking the object store.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use super::archive::{Archiver, PushOutcome};
use super::names::{next_segment, WalFileKind, WalName};
use super::settings::WhenDaemonDown;
use super::WalError;
use crate::config::{self, ConfigSources, Settings};
use crate::control::{Client, ClientError, Request, Response};

const PREFETCH_DIR: &str = ".platform-agent-prefetch";

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("platform-agent: {message}");
    ExitCode::FAILURE
}

fn load_settings(sources: &ConfigSources) -> Result<Settings, ExitCode> {
    config::load_unchecked(sources).map_err(|errors| fail(format!("configuration: {errors}")))
}

/// `wal-push PATH NAME`: exit 0 only when the file is durable (archived, or
/// identical content was already archived, or, in spool mode, spooled).
pub fn push(sources: &ConfigSources, socket: Option<&Path>, path: &Path, name: &str) -> ExitCode {
    let settings = match load_settings(sources) {
        Ok(settings) => settings,
        Err(code) => return code,
    };
    if !settings.wal.enabled {
        return fail(WalError::Disabled);
    }
    // PostgreSQL runs archive_command in PGDATA with %p relative to it.
    let path = if path.is_absolute() {
        path.to_path_buf()
    } else {
        match std::env::current_dir() {
            Ok(cwd) => cwd.join(path),
            Err(err) => return fail(format!("cannot resolve {}: {err}", path.display())),
        }
    };
    let socket = socket.map_or_else(|| settings.control.socket.clone(), Path::to_path_buf);
    // A little beyond the daemon's own deadline, so that its answer (and
    // not our timeout) says what happened.
    let timeout = settings.wal.push_timeout + Duration::from_secs(5);
    let request = Request::WalPush {
        path: path.display().to_string(),
        name: name.to_string(),
    };
    let answer = Client::connect(&socket, timeout).and_then(|mut client| client.call(&request));
    match answer {
        Ok(Response::WalPushed { outcome }) => {
            if std::env::var_os("PLATFORM_AGENT_WAL_VERBOSE").is_some() {
                eprintln!("platform-agent: {name}: {}", outcome.as_str());
            }
            ExitCode::SUCCESS
        }
        Ok(other) => fail(format!("unexpected answer from the agent: {other:?}")),
        Err(ClientError::NotRunning { .. }) if settings.wal.when_daemon_down == WhenDaemonDown::Direct => {
            push_direct(&settings, &path, name)
        }
        Err(err) => fail(err),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| fail(format!("cannot start the async runtime: {err}")))
}

fn archiver(settings: &Settings, identities: bool) -> Result<Archiver, WalError> {
    let objects = crate::objstore::open(&settings.object_store, crate::objstore::OpenOptions::default())?;
    Archiver::new(&settings.wal, &settings.backup, objects, None, identities)
}

/// The daemon is down: upload from this process, through the same code.
fn push_direct(settings: &Settings, path: &Path, name: &str) -> ExitCode {
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let result = runtime.block_on(async {
        let archiver = archiver(settings, false)?;
        let raw = super::archive::read_raw(path, name, None)?;
        tokio::time::timeout(settings.wal.push_timeout, archiver.push(raw))
            .await
            .unwrap_or_else(|_| {
                Err(WalError::Timeout {
                    name: name.to_string(),
                    seconds: settings.wal.push_timeout.as_secs(),
                })
            })
    });
    match result {
        Ok((outcome, _)) => {
            if std::env::var_os("PLATFORM_AGENT_WAL_VERBOSE").is_some() {
                eprintln!(
                    "platform-agent: {name}: {} (direct, agent not running)",
                    outcome.as_str()
                );
            }
            ExitCode::SUCCESS
        }
        Err(err) => fail(err),
    }
}

/// `wal-fetch NAME PATH`: 0 when written, 1 when not archived (quietly) or
/// on any error (with a message).
pub fn fetch(sources: &ConfigSources, name: &str, path: &Path) -> ExitCode {
    let settings = match load_settings(sources) {
        Ok(settings) => settings,
        Err(code) => return code,
    };
    let Some(wal_name) = WalName::parse(name) else {
        // PostgreSQL asks for nothing else; say so, exit non-zero.
        return fail(WalError::BadName(name.to_string()));
    };
    let path = if path.is_absolute() {
        path.to_path_buf()
    } else {
        match std::env::current_dir() {
            Ok(cwd) => cwd.join(path),
            Err(err) => return fail(format!("cannot resolve {}: {err}", path.display())),
        }
    };
    let dir = path.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let prefetch_dir = dir.join(PREFETCH_DIR);
    // A prefetched copy was checked when it was fetched.
    let prefetched = prefetch_dir.join(name);
    if prefetched.is_file() && std::fs::rename(&prefetched, &path).is_ok() {
        return ExitCode::SUCCESS;
    }
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let result = runtime.block_on(async {
        let archiver = Arc::new(archiver(&settings, true)?);
        let Some(data) = archiver.fetch(&wal_name).await? else {
            return Ok(false);
        };
        write_file(&path, &data).map_err(|source| WalError::Read {
            path: path.clone(),
            source,
        })?;
        if wal_name.kind == WalFileKind::Segment && settings.wal.prefetch > 0 {
            prefetch(&archiver, name, data.len() as u64, settings.wal.prefetch, &prefetch_dir).await;
        }
        Ok::<bool, WalError>(true)
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => fail(err),
    }
}

/// Fetches the `count` segments after `name` in parallel into `dir`; a
/// segment not archived (yet) ends the run quietly. Older prefetched files
/// are removed.
async fn prefetch(archiver: &Arc<Archiver>, name: &str, segment_size: u64, count: u32, dir: &Path) {
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            if file.as_str() <= name {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    let mut next = name.to_string();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..count {
        let Some(following) = next_segment(&next, segment_size) else {
            break;
        };
        next = following.clone();
        let target = dir.join(&following);
        if target.exists() {
            continue;
        }
        let archiver = archiver.clone();
        tasks.spawn(async move {
            let Some(parsed) = WalName::parse(&following) else {
                return;
            };
            if let Ok(Some(data)) = archiver.fetch(&parsed).await {
                let _ = write_file(&target, &data);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Temp file beside the target, then rename: PostgreSQL never sees a torn
/// file under `%p`.
fn write_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut temp = tempfile::Builder::new().prefix(".pa-tmp-").tempfile_in(dir)?;
    temp.write_all(data)?;
    temp.as_file().sync_all()?;
    temp.persist(path).map_err(|err| err.error)?;
    Ok(())
}

impl From<PushOutcome> for Response {
    fn from(outcome: PushOutcome) -> Self {
        Response::WalPushed { outcome }
    }
}
