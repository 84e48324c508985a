//! Streaming mode: the daemon supervises `pg_receivewal -D
//! <spool_dir>/stream --slot <slot>` (restarted with backoff when it exits)
//! and ships each completed segment (never a `.partial`) through the same
//! push as `wal-push`, identical re-archive rules included, so streaming and
//! `archive_command` may run side by side. A shipped segment is removed,
//! except the newest, from which pg_receivewal resumes after a restart (with
//! an empty directory it starts at the slot's position).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::names::{WalFileKind, WalName};
use super::settings::ReceiveWalSettings;
use super::{ids, WalError, WalService};

fn tool(settings: &ReceiveWalSettings) -> PathBuf {
    if settings.bin_dir.as_os_str().is_empty() {
        PathBuf::from("pg_receivewal")
    } else {
        settings.bin_dir.join("pg_receivewal")
    }
}

fn command(settings: &ReceiveWalSettings) -> Command {
    let mut cmd = Command::new(tool(settings));
    cmd.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("LC_ALL", "C")
        .env("PGAPPNAME", "platform-agent-receivewal")
        .env("PGCONNECT_TIMEOUT", "15")
        .args([
            "-h",
            &settings.host,
            "-p",
            &settings.port.to_string(),
            "-U",
            &settings.user,
        ])
        .args(["--slot", &settings.slot, "--no-password"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Completed files in the stream directory, in name order.
fn completed(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| WalName::parse(n).is_some_and(|w| matches!(w.kind, WalFileKind::Segment | WalFileKind::History)))
        .collect();
    names.sort();
    names
}

impl WalService {
    pub(super) async fn stream(self: Arc<Self>, cancel: CancellationToken) {
        let settings = self.settings.receivewal.clone();
        let dir = self.spool_dir.join("stream");
        if let Err(err) = std::fs::create_dir_all(&dir) {
            error!(dir = %dir.display(), "streaming mode cannot create its directory: {err}");
            return;
        }
        let mut backoff = Duration::from_secs(1);
        loop {
            // The slot first: pg_receivewal --create-slot creates and exits.
            let created = command(&settings)
                .args(["--create-slot", "--if-not-exists"])
                .output()
                .await;
            if let Ok(out) = &created {
                if !out.status.success() {
                    warn!(slot = %settings.slot, "cannot create the replication slot: {}", String::from_utf8_lossy(&out.stderr).trim());
                }
            }
            let child = command(&settings).arg("-D").arg(&dir).arg("-n").spawn();
            let mut child = match child {
                Ok(child) => child,
                Err(err) => {
                    error!("cannot start {}: {err}", tool(&settings).display());
                    self.set_streaming(false, Some(format!("cannot start pg_receivewal: {err}")));
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            };
            info!(slot = %settings.slot, dir = %dir.display(), "pg_receivewal started");
            self.set_streaming(true, None);
            let started = std::time::Instant::now();
            let exit = loop {
                self.ship_stream(&dir).await;
                tokio::select! {
                    _ = cancel.cancelled() => {
                        let _ = child.start_kill();
                        let _ = child.wait().await;
                        self.ship_stream(&dir).await;
                        return;
                    }
                    status = child.wait() => break status,
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            };
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ = pipe.read_to_string(&mut stderr).await;
            }
            let reason = format!(
                "pg_receivewal exited ({}): {}",
                exit.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                stderr.trim().lines().last().unwrap_or("")
            );
            warn!("{reason}; restarting in {}", humantime::format_duration(backoff));
            self.set_streaming(false, Some(reason));
            self.ship_stream(&dir).await;
            if started.elapsed() > Duration::from_secs(60) {
                backoff = Duration::from_secs(1);
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    /// Ships completed files; keeps the newest segment for the restart
    /// position, and any file whose push failed (retried next round).
    async fn ship_stream(&self, dir: &Path) {
        let names = completed(dir);
        let newest_segment = names.iter().rev().find(|n| n.len() == 24).cloned();
        for name in names {
            let path = dir.join(&name);
            let result = self.push_file(&path, &name, None).await;
            match &result {
                Ok(_) if Some(&name) != newest_segment.as_ref() => {
                    let _ = std::fs::remove_file(&path);
                }
                Ok(_) => {}
                Err(WalError::Conflict { .. }) => {
                    let _ = std::fs::rename(&path, dir.join(format!("{name}.conflict")));
                    error!(message_id = ids::WAL_CONFLICT, segment = %name, "streamed WAL file conflicts with the archive; kept for the operator");
                }
                Err(_) => {}
            }
            // Re-shipping the kept newest segment is an identical
            // re-archive: do not count it again.
            if !(Some(&name) == newest_segment.as_ref() && matches!(result, Ok(super::PushOutcome::AlreadyArchived))) {
                self.account(&name, &result);
            }
        }
    }

    fn set_streaming(&self, running: bool, error: Option<String>) {
        self.status.update(|s| {
            if let Some(wal) = s.wal_status.as_mut() {
                wal.receivewal_running = Some(running);
                if !running {
                    wal.receivewal_restarts += 1;
                }
                if let Some(error) = error {
                    wal.last_error = Some(error);
                }
            }
        });
    }
}
