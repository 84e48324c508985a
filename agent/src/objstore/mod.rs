//! Where backups and WAL segments go: an S3 bucket in production, a local
//! directory in the embedded-defaults run and in fast tests. Both promise the
//! same thing: an object is visible under its key only once it is complete
//! and durable, with its SHA-256 recorded beside it.

mod local;
mod s3;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};

pub use local::LocalStore;
pub use s3::S3Store;

use crate::config::{ObjectStoreBackend, ObjectStoreSettings};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    pub sha256: String,
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ObjectStoreError {
    #[error("object {key:?} not found in {store}")]
    NotFound { store: String, key: String },
    #[error("invalid object key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    #[error("{store}: {action} {key:?}: {source}")]
    Io {
        store: String,
        action: &'static str,
        key: String,
        #[source]
        source: std::io::Error,
    },
    /// The server answered with an error, or could not be reached.
    #[error("{store}: {action} {key:?}: {message}")]
    Remote {
        store: String,
        action: &'static str,
        key: String,
        message: String,
        /// False when the server never answered (connection refused,
        /// timeout): the same request may succeed later.
        answered: bool,
    },
    #[error("{store}: cannot record multipart upload of {key:?} in the state store: {message}")]
    Journal {
        store: String,
        key: String,
        message: String,
    },
    #[error("{store}: cannot read credentials from {}: {source}", path.display())]
    Credentials {
        store: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A multipart upload in flight. Recorded before the first part is sent and
/// forgotten once it is completed or aborted, so that one interrupted by a
/// crash can be aborted at the next start; not every S3 server can list them
/// (s3s-fs has no ListMultipartUploads).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingUpload {
    pub upload_id: String,
    pub bucket: String,
    pub key: String,
    pub started_ms: i64,
}

#[async_trait]
pub trait UploadJournal: Send + Sync {
    async fn record(&self, upload: &PendingUpload) -> Result<(), String>;
    async fn forget(&self, upload_id: &str) -> Result<(), String>;
    async fn pending(&self) -> Result<Vec<PendingUpload>, String>;
}

/// What opening a store needs besides its settings.
#[derive(Clone, Default)]
pub struct OpenOptions {
    /// Where S3 multipart uploads are recorded (the state store). Without
    /// one, an upload interrupted by a crash is left for the bucket's
    /// lifecycle rules.
    pub journal: Option<Arc<dyn UploadJournal>>,
    /// S3 multipart part size in bytes (0 = 8 MiB).
    pub part_size: usize,
}

#[async_trait]
pub trait ObjectStore: Send + Sync {
    /// "local:/var/lib/..." or "s3://bucket/prefix", for logs and status.
    fn describe(&self) -> String;

    /// Streams `body` under `key`; returns what was stored. On any error no
    /// object appears under `key` (a previous one stays as it was).
    async fn put(
        &self,
        key: &str,
        body: &mut (dyn AsyncRead + Send + Unpin),
        metadata: BTreeMap<String, String>,
    ) -> Result<ObjectInfo, ObjectStoreError>;

    async fn get(&self, key: &str, sink: &mut (dyn AsyncWrite + Send + Unpin)) -> Result<ObjectInfo, ObjectStoreError>;

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, ObjectStoreError>;

    /// Keys under `prefix`, sorted.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, ObjectStoreError>;

    async fn delete(&self, key: &str) -> Result<(), ObjectStoreError>;

    /// Cleans up what interrupted `put`s left behind (partial files; S3
    /// multipart uploads named in the journal) and describes each thing it
    /// removed. Anything it could not remove yet is left for the next call.
    async fn recover(&self) -> Result<Vec<String>, ObjectStoreError> {
        Ok(Vec::new())
    }
}

/// Keys are relative, slash-separated paths without empty, `.` or `..`
/// segments, so that no backend can be tricked into writing outside its root.
pub fn check_key(key: &str) -> Result<(), ObjectStoreError> {
    let invalid = |reason| {
        Err(ObjectStoreError::InvalidKey {
            key: key.to_string(),
            reason,
        })
    };
    if key.is_empty() || key.len() > 1024 {
        return invalid("must be 1 to 1024 bytes");
    }
    if key
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == ".." || seg.starts_with(".pa-"))
    {
        return invalid("segments must be non-empty, not `.` or `..`, and not start with `.pa-`");
    }
    if key.chars().any(|c| c.is_control()) {
        return invalid("control characters are not allowed");
    }
    Ok(())
}

pub fn open(settings: &ObjectStoreSettings, options: OpenOptions) -> Result<Arc<dyn ObjectStore>, ObjectStoreError> {
    match settings.backend {
        ObjectStoreBackend::Local => Ok(Arc::new(LocalStore::new(settings.local.path.clone()))),
        ObjectStoreBackend::S3 => {
            let s3 = settings.s3.as_ref().ok_or_else(|| ObjectStoreError::Remote {
                store: "s3".into(),
                action: "configure",
                key: String::new(),
                message: "backend is \"s3\" but there is no [object_store.s3] section".into(),
                answered: false,
            })?;
            Ok(Arc::new(S3Store::new(s3, options)?))
        }
    }
}
