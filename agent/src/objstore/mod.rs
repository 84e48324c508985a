//! Where backups and WAL segments go: an S3 bucket in production, a local
//! directory in the embedded-defaults run and in fast tests. Both promise the
//! same thing: an object is visible under its key only once it is complete
//! and durable, with its SHA-256 recorded beside it.

mod local;

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};

pub use local::LocalStore;

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
    #[error("{store}: the {backend} backend is not available in this build yet")]
    Unsupported { store: String, backend: &'static str },
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

pub fn open(settings: &ObjectStoreSettings) -> Result<Box<dyn ObjectStore>, ObjectStoreError> {
    match settings.backend {
        ObjectStoreBackend::Local => Ok(Box::new(LocalStore::new(settings.local.path.clone()))),
        ObjectStoreBackend::S3 => Err(ObjectStoreError::Unsupported {
            store: settings
                .s3
                .as_ref()
                .map(|s3| format!("s3://{}/{}", s3.bucket, s3.prefix))
                .unwrap_or_default(),
            backend: "s3",
        }),
    }
}
