//! The control protocol: one JSON document per frame (requests look like
//! `{"request": "status"}`, with an `args` object for those that take any), each frame prefixed by
//! its length as a 4-byte big-endian integer. Length-prefixing lets the server
//! refuse an oversized request before reading it, and keeps the CLI free of an
//! HTTP stack (`wal-push` runs once per WAL segment and must start fast).

use serde::{Deserialize, Serialize};

use crate::backup::{BackupRecord, Decision, ProgressReport, RestoreReport, RestoreRequest, VerifyReport};
use crate::config::EffectiveEntry;
use crate::status::Status;

pub const PROTOCOL_VERSION: u32 = 1;

/// Frames larger than this are never read by the client; the server's limit
/// for requests is `control.max_request_bytes`.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", content = "args", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Ping,
    Version,
    Status,
    ConfigShow,
    /// Re-read the configuration (same as SIGHUP) and answer whether it took.
    Reload,
    /// The ordered shutdown plan with each step's deadline; changes nothing.
    ShutdownPlan,
    /// Run a backup job now and answer when it is done (progress frames
    /// come first).
    BackupNow {
        job: String,
    },
    /// Catalog rows, newest first.
    BackupList {
        #[serde(default)]
        job: Option<String>,
        #[serde(default)]
        limit: Option<u32>,
    },
    BackupShow {
        id: i64,
    },
    /// Retention now; with `dry_run` only what it would do, and why.
    BackupPrune {
        #[serde(default)]
        job: Option<String>,
        #[serde(default)]
        dry_run: bool,
    },
    /// Read a backup back (by id, or the newest of `job`) and, with
    /// `restore_test`, restore it to a scratch target.
    BackupVerify {
        #[serde(default)]
        id: Option<i64>,
        #[serde(default)]
        job: Option<String>,
        #[serde(default)]
        restore_test: bool,
    },
    Restore(RestoreRequest),
    /// A GitOps pass now; with `diff` only what it would change.
    Reconcile {
        #[serde(default)]
        diff: bool,
    },
    /// `wal-push %p %f`: archive one WAL file; answered once it is durable.
    /// Open to the socket's group (PostgreSQL's user must be a member): the
    /// daemon pushes only files the requesting user owns.
    WalPush {
        path: String,
        name: String,
    },
}

/// Who may make a request: members of the socket's group may read, only
/// root (or the user the agent runs as) may change state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Change,
}

impl Request {
    pub fn access(&self) -> Access {
        match self {
            Request::Ping
            | Request::Version
            | Request::Status
            | Request::ConfigShow
            | Request::ShutdownPlan
            | Request::BackupList { .. }
            | Request::BackupShow { .. }
            | Request::BackupPrune { dry_run: true, .. }
            | Request::Reconcile { diff: true }
            | Request::WalPush { .. } => Access::Read,
            Request::Reload
            | Request::BackupNow { .. }
            | Request::BackupPrune { dry_run: false, .. }
            | Request::BackupVerify { .. }
            | Request::Restore(_)
            | Request::Reconcile { diff: false } => Access::Change,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Request::Ping => "ping",
            Request::Version => "version",
            Request::Status => "status",
            Request::ConfigShow => "config-show",
            Request::Reload => "reload",
            Request::ShutdownPlan => "shutdown-plan",
            Request::BackupNow { .. } => "backup-now",
            Request::BackupList { .. } => "backup-list",
            Request::BackupShow { .. } => "backup-show",
            Request::BackupPrune { .. } => "backup-prune",
            Request::BackupVerify { .. } => "backup-verify",
            Request::Restore(_) => "restore",
            Request::Reconcile { .. } => "reconcile",
            Request::WalPush { .. } => "wal-push",
        }
    }

    /// Requests that may run long: the server sends `progress` frames
    /// before the answer.
    pub fn streams_progress(&self) -> bool {
        matches!(
            self,
            Request::BackupNow { .. } | Request::BackupVerify { .. } | Request::Restore(_)
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "kebab-case")]
pub enum Response {
    Pong,
    Version {
        version: String,
        protocol: u32,
    },
    Status {
        status: Box<Status>,
    },
    Config {
        files: Vec<String>,
        entries: Vec<EffectiveEntry>,
    },
    Reloaded {
        generation: u64,
        files: Vec<String>,
    },
    ShutdownPlan {
        steps: Vec<crate::shutdown::PlannedStep>,
    },
    Backups {
        backups: Vec<BackupRecord>,
    },
    Backup {
        backup: Box<BackupRecord>,
    },
    PrunePlan {
        dry_run: bool,
        decisions: Vec<Decision>,
    },
    Verified {
        report: VerifyReport,
    },
    Restored {
        report: RestoreReport,
    },
    Reconciled {
        report: crate::gitops::ReconcileReport,
    },
    WalPushed {
        outcome: crate::wal::PushOutcome,
    },
    /// An interim frame of a long request; the answer follows.
    Progress {
        progress: ProgressReport,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    BadRequest,
    TooLarge,
    PermissionDenied,
    ConfigInvalid,
    Unavailable,
    /// No such job or backup.
    NotFound,
    /// The job is already running (or being restored).
    Busy,
    /// A restore would overwrite a live target; `--force` overrides.
    Refused,
    /// The backup, verification or restore failed.
    Failed,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge { size: usize, max: usize },
    #[error("empty frame")]
    Empty,
}

/// Checks a frame header and returns the body length.
pub fn frame_len(header: [u8; 4], max: usize) -> Result<usize, FrameError> {
    let size = u32::from_be_bytes(header) as usize;
    if size == 0 {
        return Err(FrameError::Empty);
    }
    if size > max {
        return Err(FrameError::TooLarge { size, max });
    }
    Ok(size)
}

pub fn encode_frame<T: Serialize>(message: &T) -> Vec<u8> {
    let body = serde_json::to_vec(message).expect("protocol types always serialize");
    let mut frame = Vec::with_capacity(body.len() + 4);
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// Decodes a request body. Must never panic, whatever the bytes: it is the
/// first thing that touches input from other users.
pub fn decode_request(body: &[u8]) -> Result<Request, String> {
    serde_json::from_slice(body).map_err(|err| format!("malformed request: {err}"))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn round_trips_every_request() {
        for request in [
            Request::Ping,
            Request::Version,
            Request::Status,
            Request::ConfigShow,
            Request::Reload,
            Request::ShutdownPlan,
            Request::BackupNow { job: "pg".into() },
            Request::BackupList {
                job: None,
                limit: Some(5),
            },
            Request::BackupShow { id: 3 },
            Request::BackupPrune {
                job: Some("pg".into()),
                dry_run: true,
            },
            Request::BackupVerify {
                id: None,
                job: Some("pg".into()),
                restore_test: true,
            },
            Request::Restore(RestoreRequest {
                kind: crate::backup::BackupKind::Postgres,
                job: None,
                id: Some(4),
                database: Some("app".into()),
                target: None,
                force: true,
                no_owner: false,
            }),
            Request::Reconcile { diff: true },
            Request::WalPush {
                path: "/pgdata/pg_wal/000000010000000000000001".into(),
                name: "000000010000000000000001".into(),
            },
        ] {
            let frame = encode_frame(&request);
            let len = frame_len(frame[..4].try_into().unwrap(), 1024).unwrap();
            assert_eq!(len, frame.len() - 4);
            assert_eq!(decode_request(&frame[4..]).unwrap(), request);
        }
    }

    #[test]
    fn backup_requests_read_or_change_as_documented() {
        let request = |json: &str| decode_request(json.as_bytes()).unwrap();
        assert_eq!(request(r#"{"request":"backup-list","args":{}}"#).access(), Access::Read);
        assert_eq!(
            request(r#"{"request":"backup-prune","args":{"dry_run":true}}"#).access(),
            Access::Read
        );
        assert_eq!(
            request(r#"{"request":"backup-prune","args":{}}"#).access(),
            Access::Change
        );
        assert_eq!(
            request(r#"{"request":"backup-now","args":{"job":"pg"}}"#).access(),
            Access::Change
        );
        assert_eq!(
            request(r#"{"request":"restore","args":{"kind":"vault","force":true}}"#).access(),
            Access::Change
        );
        assert!(decode_request(br#"{"request":"restore","args":{"kind":"vault","forse":true}}"#).is_err());
        assert!(decode_request(br#"{"request":"backup-now","args":{}}"#).is_err());
        assert_eq!(
            request(r#"{"request":"reconcile","args":{"diff":true}}"#).access(),
            Access::Read
        );
        assert_eq!(request(r#"{"request":"reconcile","args":{}}"#).access(), Access::Change);
    }

    #[test]
    fn refuses_unknown_requests_and_fields() {
        assert!(decode_request(br#"{"request":"format-disk"}"#).is_err());
        assert!(decode_request(br#"{"request":"status","extra":1}"#).is_err());
        assert!(decode_request(b"").is_err());
    }

    #[test]
    fn frame_limits() {
        assert_eq!(frame_len([0, 0, 0, 0], 10), Err(FrameError::Empty));
        assert_eq!(
            frame_len([0, 0, 0, 11], 10),
            Err(FrameError::TooLarge { size: 11, max: 10 })
        );
        assert_eq!(
            frame_len([0xff; 4], 10).unwrap_err(),
            FrameError::TooLarge {
                size: u32::MAX as usize,
                max: 10
            }
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn decoder_never_panics_on_bytes(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_request(&body);
        }

        #[test]
        fn decoder_never_panics_on_json_like_text(body in r#"\{"request":"[a-z-]{0,12}"(,"[a-z]{0,5}":[0-9\[\]{}",]{0,20})?\}"#) {
            let _ = decode_request(body.as_bytes());
        }

        #[test]
        fn decoder_never_panics_on_deep_nesting(depth in 0usize..2000) {
            let body = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            prop_assert!(decode_request(body.as_bytes()).is_err());
        }
    }
}
