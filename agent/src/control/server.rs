//! The daemon's side of the control socket.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::protocol::{
    decode_request, encode_frame, frame_len, Access, ErrorCode, FrameError, Request, Response, PROTOCOL_VERSION,
};
use crate::backup::{BackupError, BackupService, Progress};
use crate::config::{ControlSettings, LoadedConfig};
use crate::logging::ids;
use crate::status::{Health, StatusHandle};

/// Clients beyond this many at once wait for a slot; a local flood must not
/// exhaust file descriptors the rest of the agent needs.
const MAX_CONNECTIONS: usize = 32;
/// How often a long request's progress is looked at, and the longest a
/// client waits without a frame.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);
const PROGRESS_HEARTBEAT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("{}: cannot create the socket directory: {source}", path.display())]
    Directory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: another platform-agent is already answering on this socket", path.display())]
    InUse { path: PathBuf },
    #[error("{}: cannot bind: {source}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: cannot set owner group {group:?} or mode 0660: {source}", path.display())]
    Permissions {
        path: PathBuf,
        group: String,
        #[source]
        source: std::io::Error,
    },
}

/// Errors a request can end in. Each maps to exactly one reply in
/// [`ControlError::to_response`].
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{0}")]
    BadRequest(String),
    #[error("request refused: {0}")]
    Frame(#[from] FrameError),
    #[error("permission denied: request `{request}` changes state and is for root only (peer uid {uid})")]
    PermissionDenied { request: &'static str, uid: u32 },
    #[error("configuration refused, still running on the previous one: {0}")]
    ReloadRefused(String),
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Backup(#[from] BackupError),
    #[error(transparent)]
    Gitops(#[from] crate::gitops::GitopsError),
    #[error(transparent)]
    Wal(#[from] crate::wal::WalError),
}

impl ControlError {
    pub fn to_response(&self) -> Response {
        let code = match self {
            ControlError::BadRequest(_) => ErrorCode::BadRequest,
            ControlError::Frame(FrameError::TooLarge { .. }) => ErrorCode::TooLarge,
            ControlError::Frame(FrameError::Empty) => ErrorCode::BadRequest,
            ControlError::PermissionDenied { .. } => ErrorCode::PermissionDenied,
            ControlError::ReloadRefused(_) => ErrorCode::ConfigInvalid,
            ControlError::Unavailable(_) => ErrorCode::Unavailable,
            ControlError::Backup(err) => match err {
                BackupError::UnknownJob(_) | BackupError::NotFound(_) | BackupError::NothingToRestore(_) => {
                    ErrorCode::NotFound
                }
                BackupError::Ambiguous(_) => ErrorCode::BadRequest,
                BackupError::Busy { .. } => ErrorCode::Busy,
                BackupError::Refused(_) => ErrorCode::Refused,
                BackupError::ShuttingDown => ErrorCode::Unavailable,
                BackupError::Catalog(_) | BackupError::Failed { .. } => ErrorCode::Failed,
            },
            ControlError::Gitops(err) => match err {
                crate::gitops::GitopsError::Disabled | crate::gitops::GitopsError::NotRunning => ErrorCode::Unavailable,
                crate::gitops::GitopsError::Failed(_) => ErrorCode::Failed,
            },
            ControlError::Wal(err) => {
                use crate::wal::WalError;
                match err {
                    WalError::BadName(_) => ErrorCode::BadRequest,
                    WalError::NotOwner { .. } => ErrorCode::PermissionDenied,
                    WalError::Read { .. } => ErrorCode::NotFound,
                    WalError::SpoolFull { .. } | WalError::Timeout { .. } => ErrorCode::Busy,
                    WalError::Disabled => ErrorCode::Unavailable,
                    WalError::Conflict { .. }
                    | WalError::Spool { .. }
                    | WalError::Store(_)
                    | WalError::Catalog(_)
                    | WalError::Encode(_)
                    | WalError::Corrupt { .. }
                    | WalError::Setup(_)
                    | WalError::Task(_) => ErrorCode::Failed,
                }
            }
        };
        Response::Error {
            code,
            message: self.to_string(),
        }
    }
}

pub type ReloadOutcome = Result<(u64, Vec<String>), String>;

/// Asks the supervisor to reload; the supervisor owns the configuration.
pub struct ReloadRequest {
    pub reply: oneshot::Sender<ReloadOutcome>,
}

/// What request handlers may see and do.
pub struct ControlContext {
    pub status: StatusHandle,
    pub config: watch::Receiver<Arc<LoadedConfig>>,
    pub reload: mpsc::Sender<ReloadRequest>,
    /// The agent's own uid counts as privileged, so that an unprivileged
    /// local run can be driven by the user who started it.
    pub daemon_uid: u32,
    /// The backup subsystem; None when it could not start.
    pub backup: Option<Arc<BackupService>>,
    /// Asks the GitOps subsystem for a pass.
    pub gitops: Option<crate::gitops::GitopsHandle>,
    /// WAL archiving; None when disabled or it could not start.
    pub wal: Option<Arc<crate::wal::WalService>>,
}

impl ControlContext {
    fn authorize(&self, request: &Request, uid: u32) -> Result<(), ControlError> {
        match request.access() {
            Access::Read => Ok(()),
            // The socket stays open through the shutdown plan for wal-push
            // and status; nothing may start new work on a node going down.
            Access::Change if self.status.agent_state() == crate::status::AgentState::Stopping => {
                Err(ControlError::Unavailable("the agent is shutting down".into()))
            }
            Access::Change if uid == 0 || uid == self.daemon_uid => Ok(()),
            Access::Change => Err(ControlError::PermissionDenied {
                request: request.name(),
                uid,
            }),
        }
    }

    fn backup(&self) -> Result<&Arc<BackupService>, ControlError> {
        self.backup
            .as_ref()
            .ok_or_else(|| ControlError::Unavailable("the backup subsystem is not running".into()))
    }

    async fn dispatch(&self, request: Request, uid: u32, progress: Progress) -> Result<Response, ControlError> {
        match request {
            Request::Ping => Ok(Response::Pong),
            Request::Version => Ok(Response::Version {
                version: env!("CARGO_PKG_VERSION").to_string(),
                protocol: PROTOCOL_VERSION,
            }),
            Request::Status => Ok(Response::Status {
                status: Box::new(self.status.snapshot()),
            }),
            Request::ConfigShow => {
                let config = self.config.borrow().clone();
                Ok(Response::Config {
                    files: config.files.iter().map(|f| f.display().to_string()).collect(),
                    entries: config.effective(),
                })
            }
            Request::ShutdownPlan => Ok(Response::ShutdownPlan {
                steps: crate::shutdown::plan(&self.config.borrow().settings),
            }),
            Request::Reload => {
                let (reply, outcome) = oneshot::channel();
                self.reload
                    .send(ReloadRequest { reply })
                    .await
                    .map_err(|_| ControlError::Unavailable("the agent is shutting down".into()))?;
                let (generation, files) = outcome
                    .await
                    .map_err(|_| ControlError::Unavailable("the agent is shutting down".into()))?
                    .map_err(ControlError::ReloadRefused)?;
                Ok(Response::Reloaded { generation, files })
            }
            Request::BackupNow { job } => Ok(Response::Backups {
                backups: self.backup()?.backup_now(&job, progress).await?,
            }),
            Request::BackupList { job, limit } => Ok(Response::Backups {
                backups: self.backup()?.list(job.as_deref(), limit.unwrap_or(50)).await?,
            }),
            Request::BackupShow { id } => Ok(Response::Backup {
                backup: Box::new(self.backup()?.show(id).await?),
            }),
            Request::BackupPrune { job, dry_run } => Ok(Response::PrunePlan {
                dry_run,
                decisions: self.backup()?.prune(job.as_deref(), dry_run).await?,
            }),
            Request::BackupVerify { id, job, restore_test } => Ok(Response::Verified {
                report: self
                    .backup()?
                    .verify(id, job.as_deref(), restore_test, progress)
                    .await?,
            }),
            Request::Restore(request) => Ok(Response::Restored {
                report: self.backup()?.restore(request, progress).await?,
            }),
            Request::Reconcile { diff } => {
                let gitops = self.gitops.as_ref().ok_or(crate::gitops::GitopsError::NotRunning)?;
                Ok(Response::Reconciled {
                    report: gitops.reconcile(diff).await?,
                })
            }
            Request::WalPush { path, name } => {
                let wal = self.wal.as_ref().ok_or(crate::wal::WalError::Disabled)?;
                let outcome = wal.push_request(std::path::Path::new(&path), &name, uid).await?;
                Ok(Response::WalPushed { outcome })
            }
        }
    }
}

pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    inode: u64,
    max_request_bytes: usize,
    request_timeout: Duration,
}

impl ControlServer {
    pub fn bind(settings: &ControlSettings) -> Result<Self, BindError> {
        let path = settings.socket.clone();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| BindError::Directory {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        remove_stale_socket(&path)?;
        let std_listener = std::os::unix::net::UnixListener::bind(&path).map_err(|source| BindError::Bind {
            path: path.clone(),
            source,
        })?;
        let permissions = |source| BindError::Permissions {
            path: path.clone(),
            group: settings.group.clone(),
            source,
        };
        if !settings.group.is_empty() {
            let gid = nix::unistd::Group::from_name(&settings.group)
                .map_err(|e| permissions(e.into()))?
                .ok_or_else(|| permissions(std::io::Error::other("no such group")))?
                .gid;
            nix::unistd::chown(&path, None, Some(gid)).map_err(|e| permissions(e.into()))?;
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660)).map_err(permissions)?;
        let inode = std::fs::metadata(&path).map_err(permissions)?.ino();
        std_listener.set_nonblocking(true).map_err(|source| BindError::Bind {
            path: path.clone(),
            source,
        })?;
        let listener = UnixListener::from_std(std_listener).map_err(|source| BindError::Bind {
            path: path.clone(),
            source,
        })?;
        Ok(ControlServer {
            listener,
            path,
            inode,
            max_request_bytes: settings.max_request_bytes as usize,
            request_timeout: settings.request_timeout,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves until cancelled. Never returns an error for a single bad client.
    pub async fn serve(self, context: Arc<ControlContext>, cancel: CancellationToken) {
        context.status.update(|s| {
            s.control.health = Health::Ok;
            s.control.socket = self.path.display().to_string();
        });
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let limits = (self.max_request_bytes, self.request_timeout);
        loop {
            let accepted = tokio::select! {
                _ = cancel.cancelled() => break,
                accepted = self.listener.accept() => accepted,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // EMFILE and friends pass; back off instead of spinning.
                    warn!(error = %err, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            let context = context.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = serve_connection(stream, &context, limits) => {}
                }
                drop(slot);
            });
        }
        context.status.update(|s| s.control.health = Health::Stopped);
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        // Remove the socket only if it is still ours: a newer agent may have
        // replaced it already.
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn remove_stale_socket(path: &Path) -> Result<(), BindError> {
    match std::fs::symlink_metadata(path) {
        Err(_) => Ok(()),
        Ok(_) => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(BindError::InUse {
                    path: path.to_path_buf(),
                });
            }
            std::fs::remove_file(path).map_err(|source| BindError::Bind {
                path: path.to_path_buf(),
                source,
            })
        }
    }
}

async fn serve_connection(mut stream: UnixStream, context: &ControlContext, (max_request, timeout): (usize, Duration)) {
    let (uid, pid) = match stream.peer_cred() {
        Ok(cred) => (cred.uid(), cred.pid().unwrap_or(0)),
        Err(err) => {
            warn!(error = %err, "cannot read control peer credentials; dropping the connection");
            return;
        }
    };
    loop {
        let request = match tokio::time::timeout(timeout, read_request(&mut stream, max_request)).await {
            Err(_) => {
                debug!(uid, pid, "control client idle past request_timeout; closing");
                return;
            }
            Ok(Ok(None)) => return,
            Ok(Ok(Some(request))) => Ok(request),
            Ok(Err(err)) => Err(err),
        };
        let fatal = matches!(request, Err(ControlError::Frame(_)));
        let response = match request {
            Ok(request) if request.streams_progress() => {
                let progress = Progress::default();
                let work = handle(context, request, uid, pid, progress.clone());
                tokio::pin!(work);
                let mut ticker = tokio::time::interval(PROGRESS_INTERVAL);
                let mut last: Option<(crate::backup::ProgressReport, std::time::Instant)> = None;
                let mut client_gone = false;
                loop {
                    tokio::select! {
                        response = &mut work => break response,
                        _ = ticker.tick(), if !client_gone => {
                            let report = progress.report();
                            // A frame on change, and one now and then as a
                            // heartbeat while a phase shows no progress.
                            let due = match &last {
                                None => !report.phase.is_empty(),
                                Some((previous, at)) => *previous != report || at.elapsed() >= PROGRESS_HEARTBEAT,
                            };
                            if due {
                                let frame = encode_frame(&Response::Progress { progress: report.clone() });
                                // A client that went away does not stop the work.
                                client_gone = stream.write_all(&frame).await.is_err();
                                last = Some((report, std::time::Instant::now()));
                            }
                        }
                    }
                }
            }
            Ok(request) => handle(context, request, uid, pid, Progress::default()).await,
            Err(err) => {
                context.status.update(|s| s.control.requests_denied += 1);
                warn!(message_id = ids::CONTROL_BAD_REQUEST, uid, pid, error = %err, "refused a control request");
                err.to_response()
            }
        };
        if stream.write_all(&encode_frame(&response)).await.is_err() || fatal {
            // After a bad frame header the stream position is unknown; close.
            return;
        }
    }
}

async fn handle(context: &ControlContext, request: Request, uid: u32, pid: i32, progress: Progress) -> Response {
    if let Err(err) = context.authorize(&request, uid) {
        context.status.update(|s| s.control.requests_denied += 1);
        warn!(
            message_id = ids::CONTROL_DENIED,
            uid,
            pid,
            request = request.name(),
            "denied a control request"
        );
        return err.to_response();
    }
    debug!(uid, pid, request = request.name(), "control request");
    let response = match context.dispatch(request, uid, progress).await {
        Ok(response) => response,
        Err(err) => err.to_response(),
    };
    context.status.update(|s| s.control.requests_served += 1);
    response
}

/// `Ok(None)` is a clean end of the connection between requests.
async fn read_request(stream: &mut UnixStream, max: usize) -> Result<Option<Request>, ControlError> {
    let mut header = [0u8; 4];
    match stream.read_exact(&mut header).await {
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(err) => return Err(ControlError::BadRequest(format!("read failed: {err}"))),
    }
    let len = frame_len(header, max)?;
    let mut body = vec![0u8; len];
    stream
        .read_exact(&mut body)
        .await
        .map_err(|err| ControlError::BadRequest(format!("truncated request: {err}")))?;
    decode_request(&body).map(Some).map_err(ControlError::BadRequest)
}
