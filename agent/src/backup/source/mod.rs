//! What is backed up, and how each kind is test-restored and restored:
//! PostgreSQL (pg_dump custom format), Vault/OpenBao (raft snapshot), the
//! K3s datastore (SQLite online backup or etcd snapshot, plus the server
//! token) and plain files (tar).

pub mod files;
pub mod http;
pub mod k3s;
pub mod postgres;
pub mod vault;

use std::io::{self, Read, Write};
use std::process::{Command, Stdio};

use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{program}: cannot start: {source}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("{program} failed ({status}){}", if stderr.is_empty() { String::new() } else { format!(": {stderr}") })]
    Failed {
        program: String,
        status: String,
        stderr: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{url}: {message}")]
    Http { url: String, message: String },
    /// The data is not what it must be (an empty or truncated snapshot, a
    /// corrupt datastore); never stored, never restored.
    #[error("{0}")]
    Invalid(String),
    /// The restore target is live; `--force` overrides.
    #[error("{0}")]
    Refused(String),
    #[error("cancelled")]
    Cancelled,
}

impl SourceError {
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        SourceError::Io {
            what: what.into(),
            source,
        }
    }
}

/// One object a job run produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Key segment and catalog `target`: a database name, "raft", "sqlite",
    /// "etcd", "files".
    pub name: String,
    /// Recorded as object metadata: how to read it back.
    pub format: &'static str,
    /// File name extension before compression, e.g. "pgdump".
    pub extension: &'static str,
}

/// The blocking half of a backup: writes the raw bytes.
pub type Produce = Box<dyn FnOnce(&mut dyn Write, &CancellationToken) -> Result<(), SourceError> + Send>;

/// The last bytes of a child's stderr, for error messages.
fn stderr_tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    let start = text.len().saturating_sub(2000);
    let mut cut = start;
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    text[cut..].replace('\n', " | ")
}

fn program_name(cmd: &Command) -> String {
    std::path::Path::new(cmd.get_program())
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Kills the child when `cancel` fires, until dropped.
struct KillOnCancel(Option<tokio::task::JoinHandle<()>>);

impl KillOnCancel {
    fn new(pid: u32, cancel: &CancellationToken) -> Self {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return KillOnCancel(None);
        };
        let cancel = cancel.clone();
        KillOnCancel(Some(handle.spawn(async move {
            cancel.cancelled().await;
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        })))
    }
}

impl Drop for KillOnCancel {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// Collects stderr on a thread so that a chatty child cannot block on it.
fn collect_stderr(child: &mut std::process::Child) -> std::thread::JoinHandle<Vec<u8>> {
    let stderr = child.stderr.take();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        if let Some(mut stderr) = stderr {
            let _ = stderr.read_to_end(&mut out);
        }
        out
    })
}

fn finish_child(
    program: &str,
    mut child: std::process::Child,
    stderr: std::thread::JoinHandle<Vec<u8>>,
    cancel: &CancellationToken,
    copy_error: Option<SourceError>,
) -> Result<(), SourceError> {
    let status = child
        .wait()
        .map_err(|e| SourceError::io(format!("wait for {program}"), e))?;
    let stderr = stderr.join().unwrap_or_default();
    if cancel.is_cancelled() {
        return Err(SourceError::Cancelled);
    }
    if !status.success() {
        return Err(SourceError::Failed {
            program: program.to_string(),
            status: status.to_string(),
            stderr: stderr_tail(&stderr),
        });
    }
    match copy_error {
        Some(err) => Err(err),
        None => Ok(()),
    }
}

/// Runs `cmd` and streams its stdout into `out`; fails on a non-zero exit
/// (with the end of its stderr) and kills it when cancelled or when `out`
/// fails.
pub fn stream_command(mut cmd: Command, out: &mut dyn Write, cancel: &CancellationToken) -> Result<(), SourceError> {
    let program = program_name(&cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| SourceError::Spawn {
            program: program.clone(),
            source,
        })?;
    let _kill = KillOnCancel::new(child.id(), cancel);
    let stderr = collect_stderr(&mut child);
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut buf = vec![0u8; 256 * 1024];
    let mut copy_error = None;
    loop {
        let n = match stdout.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => {
                copy_error = Some(SourceError::io(format!("read the output of {program}"), err));
                break;
            }
        };
        if let Err(err) = out.write_all(&buf[..n]) {
            copy_error = Some(if cancel.is_cancelled() {
                SourceError::Cancelled
            } else {
                SourceError::io(format!("pass on the output of {program}"), err)
            });
            let _ = child.kill();
            break;
        }
    }
    drop(stdout);
    finish_child(&program, child, stderr, cancel, copy_error)
}

/// Runs `cmd` with `input` on its stdin; returns its stdout.
pub fn feed_command(mut cmd: Command, input: &mut dyn Read, cancel: &CancellationToken) -> Result<String, SourceError> {
    let program = program_name(&cmd);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| SourceError::Spawn {
            program: program.clone(),
            source,
        })?;
    let _kill = KillOnCancel::new(child.id(), cancel);
    let stderr = collect_stderr(&mut child);
    let stdout = child.stdout.take();
    let stdout = std::thread::spawn(move || {
        let mut out = Vec::new();
        if let Some(mut stdout) = stdout {
            let _ = stdout.read_to_end(&mut out);
        }
        out
    });
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let copied = io::copy(input, &mut stdin);
    drop(stdin);
    // A child that exits early (pg_restore --exit-on-error) breaks the pipe;
    // its exit status then says more than the broken pipe.
    let copy_error = match copied {
        Err(err) if err.kind() != io::ErrorKind::BrokenPipe => {
            let _ = child.kill();
            Some(SourceError::io(format!("feed {program}"), err))
        }
        _ => None,
    };
    let result = finish_child(&program, child, stderr, cancel, copy_error);
    let stdout = stdout.join().unwrap_or_default();
    result.map(|()| String::from_utf8_lossy(&stdout).into_owned())
}

/// Runs a short command to completion; returns its stdout.
pub fn run_command(mut cmd: Command) -> Result<String, SourceError> {
    let program = program_name(&cmd);
    let out = cmd.stdin(Stdio::null()).output().map_err(|source| SourceError::Spawn {
        program: program.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(SourceError::Failed {
            program,
            status: out.status.to_string(),
            stderr: stderr_tail(&out.stderr),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Copies a reader into a writer, stopping when cancelled.
pub fn copy_cancellable(
    input: &mut dyn Read,
    out: &mut dyn Write,
    cancel: &CancellationToken,
) -> Result<u64, SourceError> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        if cancel.is_cancelled() {
            return Err(SourceError::Cancelled);
        }
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(SourceError::io("read", err)),
        };
        out.write_all(&buf[..n]).map_err(|err| {
            if cancel.is_cancelled() {
                SourceError::Cancelled
            } else {
                SourceError::io("write", err)
            }
        })?;
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_command_reports_its_stderr() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo partial; echo 'FATAL: no such database' >&2; exit 3"]);
        let mut out = Vec::new();
        let err = stream_command(cmd, &mut out, &CancellationToken::new()).unwrap_err();
        assert_eq!(out, b"partial\n");
        let text = err.to_string();
        assert!(
            text.contains("sh failed") && text.contains("no such database"),
            "{text}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancel_kills_a_command_that_waits() {
        let cancel = CancellationToken::new();
        let inner = cancel.clone();
        let task = tokio::task::spawn_blocking(move || {
            let mut cmd = Command::new("sleep");
            cmd.arg("30");
            stream_command(cmd, &mut Vec::new(), &inner)
        });
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let started = std::time::Instant::now();
        cancel.cancel();
        let result = task.await.unwrap();
        assert!(matches!(result, Err(SourceError::Cancelled)), "{result:?}");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn feed_command_passes_stdin_and_returns_stdout() {
        let mut cmd = Command::new("tr");
        cmd.args(["a-z", "A-Z"]);
        let out = feed_command(cmd, &mut &b"hello"[..], &CancellationToken::new()).unwrap();
        assert_eq!(out, "HELLO");
    }
}
