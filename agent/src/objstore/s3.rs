//! An S3 bucket (MinIO, garage, s3s-fs, AWS) through aws-sdk-s3.
//!
//! Uploads stream: the body is cut into parts of `part_size` bytes held in a
//! pool of two reused buffers (one filling while the other is sent), so
//! memory stays flat whatever the object's size. A body that fits in one
//! part is sent with a single PutObject. A multipart upload is recorded in
//! the journal (the state store) before its first part and forgotten once
//! completed or aborted; on any error it is aborted, and what a crash leaves
//! behind is aborted by [`ObjectStore::recover`] at the next start. S3 makes
//! an object visible only when CompleteMultipartUpload succeeds, so nothing
//! appears under the final key before the whole body is there.
//!
//! Checksums, one strategy throughout: the SDK sends no flexible checksums
//! (`RequestChecksumCalculation::WhenRequired`, no `checksum_algorithm` on
//! any request) and relies on SigV4's payload hash and the ETags, which every
//! S3-compatible server handles alike (mixing the two makes garage answer
//! InvalidDigest). The content's SHA-256 is ours: computed while streaming,
//! stored as the user metadata `sha256` (set directly on a PutObject; on a
//! multipart object by a server-side copy onto itself with the metadata
//! replaced, or, above the 5 GiB copy limit, in a `<key>.sha256sum`
//! sidecar), and checked by reading the object back.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{DisplayErrorContext, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, MetadataDirective};
use aws_sdk_s3::Client;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, warn};

use super::{check_key, ObjectInfo, ObjectStore, ObjectStoreError, OpenOptions, PendingUpload, UploadJournal};
use crate::config::S3Settings;

const DEFAULT_PART_SIZE: usize = 8 * 1024 * 1024;
/// S3 allows 10,000 parts; the part size doubles every this many parts so
/// that any object fits (2,500 parts of 8 MiB, then of 16 MiB, ...).
const PARTS_PER_SIZE_STEP: i32 = 2500;
/// CopyObject's limit: larger objects keep their SHA-256 in a sidecar.
const MAX_COPY_BYTES: u64 = 5 * 1024 * 1024 * 1024;
const SIDECAR_SUFFIX: &str = ".sha256sum";
const SHA256_META: &str = "sha256";

pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    endpoint: String,
    part_size: usize,
    journal: Option<Arc<dyn UploadJournal>>,
    /// Uploads this process has in flight: `recover` leaves them alone.
    active: Mutex<std::collections::HashSet<String>>,
}

fn read_secret(store: &str, path: &std::path::Path) -> Result<String, ObjectStoreError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| ObjectStoreError::Credentials {
            store: store.to_string(),
            path: path.to_path_buf(),
            source,
        })
}

impl S3Store {
    pub fn new(settings: &S3Settings, options: OpenOptions) -> Result<Self, ObjectStoreError> {
        let prefix = settings.prefix.trim_matches('/').to_string();
        let describe = format!("s3://{}/{}", settings.bucket, prefix);
        let access_key = read_secret(&describe, &settings.access_key_id_file)?;
        let secret_key = read_secret(&describe, &settings.secret_access_key_file)?;
        // Credentials' Debug output redacts the secret; it is never logged.
        let credentials = Credentials::new(access_key, secret_key, None, None, "platform-agent");
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(settings.region.clone()))
            .endpoint_url(settings.endpoint.trim_end_matches('/'))
            .force_path_style(settings.path_style)
            .credentials_provider(credentials)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .read_timeout(Duration::from_secs(120))
                    .build(),
            )
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(3)
                    .with_initial_backoff(Duration::from_millis(200)),
            )
            .build();
        Ok(S3Store {
            client: Client::from_conf(config),
            bucket: settings.bucket.clone(),
            prefix,
            endpoint: settings.endpoint.clone(),
            part_size: if options.part_size == 0 {
                DEFAULT_PART_SIZE
            } else {
                options.part_size
            },
            journal: options.journal,
            active: Mutex::new(Default::default()),
        })
    }

    fn full_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    fn relative_key<'a>(&self, full: &'a str) -> &'a str {
        if self.prefix.is_empty() {
            full
        } else {
            full.strip_prefix(&self.prefix)
                .and_then(|rest| rest.strip_prefix('/'))
                .unwrap_or(full)
        }
    }

    fn remote<E, R>(&self, action: &'static str, key: &str) -> impl FnOnce(SdkError<E, R>) -> ObjectStoreError
    where
        E: std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug + Send + Sync + 'static,
    {
        let store = self.describe();
        let key = key.to_string();
        move |err| ObjectStoreError::Remote {
            store,
            action,
            key,
            answered: matches!(err, SdkError::ServiceError(_)),
            message: DisplayErrorContext(&err).to_string(),
        }
    }

    fn part_size_for(&self, part_number: i32) -> usize {
        let step = ((part_number - 1) / PARTS_PER_SIZE_STEP).min(8) as u32;
        self.part_size << step
    }

    async fn put_single(
        &self,
        key: &str,
        data: Bytes,
        mut metadata: HashMap<String, String>,
        sha256: String,
    ) -> Result<(), ObjectStoreError> {
        metadata.insert(SHA256_META.into(), sha256);
        let len = data.len() as i64;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .content_length(len)
            .set_metadata(Some(metadata))
            .content_type("application/octet-stream")
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(self.remote("put", key))?;
        Ok(())
    }

    async fn journal_record(&self, key: &str, upload_id: &str) -> Result<(), ObjectStoreError> {
        if let Some(journal) = &self.journal {
            let upload = PendingUpload {
                upload_id: upload_id.to_string(),
                bucket: self.bucket.clone(),
                key: self.full_key(key),
                started_ms: crate::backup::now_ms(),
            };
            journal
                .record(&upload)
                .await
                .map_err(|message| ObjectStoreError::Journal {
                    store: self.describe(),
                    key: key.to_string(),
                    message,
                })?;
        }
        Ok(())
    }

    async fn journal_forget(&self, upload_id: &str) {
        if let Some(journal) = &self.journal {
            if let Err(err) = journal.forget(upload_id).await {
                warn!(upload_id, error = %err, "cannot remove a finished multipart upload from the journal; the next start aborts it again");
            }
        }
    }

    /// Aborts an upload; `Ok(true)` when it is gone (aborted now, or the
    /// server no longer knows it), `Ok(false)` when the server did not
    /// answer and it must be tried again later.
    async fn abort_upload(&self, full_key: &str, upload_id: &str) -> Result<bool, ObjectStoreError> {
        let result = tokio::time::timeout(
            Duration::from_secs(30),
            self.client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(full_key)
                .upload_id(upload_id)
                .send(),
        )
        .await;
        match result {
            Ok(Ok(_)) => Ok(true),
            // NoSuchUpload (or AccessDenied from servers that forget the id
            // with the upload): completed or aborted already.
            Ok(Err(SdkError::ServiceError(err))) => {
                debug!(upload_id, error = ?err.err(), "abort: the server no longer knows this upload");
                Ok(true)
            }
            Ok(Err(err)) => Err(self.remote("abort multipart upload of", full_key)(err)),
            Err(_) => Ok(false),
        }
    }

    async fn put_multipart(
        &self,
        key: &str,
        first: PartBuffer,
        body: &mut (dyn AsyncRead + Send + Unpin),
        metadata: HashMap<String, String>,
        mut hasher: Sha256,
        pool: &Arc<BufferPool>,
    ) -> Result<ObjectInfo, ObjectStoreError> {
        let full_key = self.full_key(key);
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&full_key)
            .set_metadata(Some(metadata.clone()))
            .content_type("application/octet-stream")
            .send()
            .await
            .map_err(self.remote("start multipart upload of", key))?;
        let upload_id = created.upload_id().unwrap_or_default().to_string();
        let _active = ActiveUpload::new(&self.active, &upload_id);
        if let Err(err) = self.journal_record(key, &upload_id).await {
            let _ = self.abort_upload(&full_key, &upload_id).await;
            return Err(err);
        }
        let mut in_flight: Option<tokio::task::JoinHandle<Result<CompletedPart, ObjectStoreError>>> = None;
        let result = self
            .upload_parts(key, &upload_id, first, body, &mut hasher, pool, &mut in_flight)
            .await;
        let (parts, size) = match result {
            Ok(done) => done,
            Err(err) => {
                // A part still being sent must end before the abort, or it
                // could land after it and linger on the server.
                if let Some(task) = in_flight.take() {
                    task.abort();
                    let _ = task.await;
                }
                match self.abort_upload(&full_key, &upload_id).await {
                    Ok(true) => self.journal_forget(&upload_id).await,
                    Ok(false) => warn!(
                        key,
                        upload_id, "abort of the failed multipart upload timed out; retried at the next run"
                    ),
                    Err(abort) => {
                        warn!(key, upload_id, error = %abort, "cannot abort the failed multipart upload now; retried at the next run")
                    }
                }
                return Err(err);
            }
        };
        let completed = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(&full_key)
            .upload_id(&upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
            .send()
            .await;
        if let Err(err) = completed {
            let err = self.remote("complete multipart upload of", key)(err);
            if let Ok(true) = self.abort_upload(&full_key, &upload_id).await {
                self.journal_forget(&upload_id).await;
            }
            return Err(err);
        }
        self.journal_forget(&upload_id).await;
        let sha256 = hex::encode(hasher.finalize());
        if let Err(err) = self.record_sha256(key, &metadata, &sha256, size).await {
            // The object is complete but lacks its checksum; it must not
            // pass for a good backup.
            let _ = self.delete(key).await;
            return Err(err);
        }
        let mut metadata: BTreeMap<String, String> = metadata.into_iter().collect();
        metadata.insert(SHA256_META.into(), sha256.clone());
        Ok(ObjectInfo {
            key: key.to_string(),
            size,
            sha256,
            metadata,
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn upload_parts(
        &self,
        key: &str,
        upload_id: &str,
        first: PartBuffer,
        body: &mut (dyn AsyncRead + Send + Unpin),
        hasher: &mut Sha256,
        pool: &Arc<BufferPool>,
        in_flight: &mut Option<tokio::task::JoinHandle<Result<CompletedPart, ObjectStoreError>>>,
    ) -> Result<(Vec<CompletedPart>, u64), ObjectStoreError> {
        let mut parts = Vec::new();
        let mut size = 0u64;
        let mut part_number = 1;
        let mut next = Some(first);
        while let Some(buffer) = next.take() {
            let eof = buffer.eof;
            if buffer.len > 0 {
                size += buffer.len as u64;
                // Wait for the previous part: at most one is in flight while
                // the next one fills, so two buffers suffice.
                if let Some(task) = in_flight.take() {
                    parts.push(join_part(task, self, key).await?);
                }
                let data = buffer.into_bytes();
                *in_flight = Some(tokio::spawn(upload_part(
                    self.client.clone(),
                    self.bucket.clone(),
                    self.full_key(key),
                    upload_id.to_string(),
                    part_number,
                    data,
                    self.describe(),
                    key.to_string(),
                )));
                part_number += 1;
            }
            if eof {
                break;
            }
            let mut buffer = pool.take(self.part_size_for(part_number));
            buffer.fill(body).await.map_err(|source| ObjectStoreError::Io {
                store: self.describe(),
                action: "read body for",
                key: key.to_string(),
                source,
            })?;
            hasher.update(buffer.data());
            next = Some(buffer);
        }
        if let Some(task) = in_flight.take() {
            parts.push(join_part(task, self, key).await?);
        }
        Ok((parts, size))
    }

    async fn record_sha256(
        &self,
        key: &str,
        metadata: &HashMap<String, String>,
        sha256: &str,
        size: u64,
    ) -> Result<(), ObjectStoreError> {
        let full_key = self.full_key(key);
        if size > MAX_COPY_BYTES {
            let line = format!("{sha256}  {}\n", key.rsplit('/').next().unwrap_or(key));
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(format!("{full_key}{SIDECAR_SUFFIX}"))
                .body(ByteStream::from(Bytes::from(line)))
                .send()
                .await
                .map_err(self.remote("write checksum sidecar of", key))?;
            return Ok(());
        }
        let mut metadata = metadata.clone();
        metadata.insert(SHA256_META.into(), sha256.to_string());
        self.client
            .copy_object()
            .bucket(&self.bucket)
            .key(&full_key)
            .copy_source(format!("{}/{}", self.bucket, percent_encode_key(&full_key)))
            .metadata_directive(MetadataDirective::Replace)
            .set_metadata(Some(metadata))
            .content_type("application/octet-stream")
            .send()
            .await
            .map_err(self.remote("record checksum in metadata of", key))?;
        Ok(())
    }

    async fn sidecar_sha256(&self, key: &str) -> Option<String> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(format!("{}{SIDECAR_SUFFIX}", self.full_key(key)))
            .send()
            .await
            .ok()?;
        let bytes = out.body.collect().await.ok()?.into_bytes();
        let text = String::from_utf8_lossy(&bytes);
        text.split_whitespace().next().map(str::to_string)
    }

    fn info_from(&self, key: &str, size: Option<i64>, metadata: Option<&HashMap<String, String>>) -> ObjectInfo {
        let metadata: BTreeMap<String, String> = metadata
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        ObjectInfo {
            key: key.to_string(),
            size: size.unwrap_or(0).max(0) as u64,
            sha256: metadata.get(SHA256_META).cloned().unwrap_or_default(),
            metadata,
        }
    }
}

/// Marks an upload as in flight in this process while it lives.
struct ActiveUpload<'a> {
    set: &'a Mutex<std::collections::HashSet<String>>,
    id: String,
}

impl<'a> ActiveUpload<'a> {
    fn new(set: &'a Mutex<std::collections::HashSet<String>>, id: &str) -> Self {
        set.lock().unwrap_or_else(|p| p.into_inner()).insert(id.to_string());
        ActiveUpload {
            set,
            id: id.to_string(),
        }
    }
}

impl Drop for ActiveUpload<'_> {
    fn drop(&mut self) {
        self.set.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

#[allow(clippy::too_many_arguments)]
async fn upload_part(
    client: Client,
    bucket: String,
    full_key: String,
    upload_id: String,
    part_number: i32,
    data: Bytes,
    store: String,
    key: String,
) -> Result<CompletedPart, ObjectStoreError> {
    let len = data.len() as i64;
    let out = client
        .upload_part()
        .bucket(bucket)
        .key(full_key)
        .upload_id(upload_id)
        .part_number(part_number)
        .content_length(len)
        .body(ByteStream::from(data))
        .send()
        .await
        .map_err(|err| ObjectStoreError::Remote {
            store,
            action: "upload part of",
            key,
            answered: matches!(err, SdkError::ServiceError(_)),
            message: format!("part {part_number}: {}", DisplayErrorContext(&err)),
        })?;
    Ok(CompletedPart::builder()
        .set_e_tag(out.e_tag().map(str::to_string))
        .part_number(part_number)
        .build())
}

async fn join_part(
    task: tokio::task::JoinHandle<Result<CompletedPart, ObjectStoreError>>,
    store: &S3Store,
    key: &str,
) -> Result<CompletedPart, ObjectStoreError> {
    task.await.map_err(|err| ObjectStoreError::Remote {
        store: store.describe(),
        action: "upload part of",
        key: key.to_string(),
        message: format!("upload task failed: {err}"),
        answered: false,
    })?
}

/// Percent-encodes a key for `x-amz-copy-source`, keeping `/`.
fn percent_encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for byte in key.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => out.push(byte as char),
            other => out.push_str(&format!("%{other:02X}")),
        }
    }
    out
}

/// Part buffers, reused: a buffer handed to the SDK comes back to the pool
/// when the SDK drops its last reference (after the part's request ended).
struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    fn new() -> Arc<Self> {
        Arc::new(BufferPool {
            free: Mutex::new(Vec::new()),
        })
    }

    fn take(self: &Arc<Self>, size: usize) -> PartBuffer {
        let reused = self
            .free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .filter(|buf| buf.len() == size);
        PartBuffer {
            data: reused.unwrap_or_else(|| vec![0u8; size]),
            len: 0,
            eof: false,
            pool: self.clone(),
        }
    }
}

struct PartBuffer {
    data: Vec<u8>,
    len: usize,
    eof: bool,
    pool: Arc<BufferPool>,
}

impl PartBuffer {
    /// Reads until the buffer is full or the body ends.
    async fn fill(&mut self, body: &mut (dyn AsyncRead + Send + Unpin)) -> std::io::Result<()> {
        while self.len < self.data.len() {
            let n = body.read(&mut self.data[self.len..]).await?;
            if n == 0 {
                self.eof = true;
                break;
            }
            self.len += n;
        }
        Ok(())
    }

    fn data(&self) -> &[u8] {
        &self.data[..self.len]
    }

    fn into_bytes(self) -> Bytes {
        Bytes::from_owner(PooledPart {
            data: self.data,
            len: self.len,
            pool: self.pool,
        })
    }
}

struct PooledPart {
    data: Vec<u8>,
    len: usize,
    pool: Arc<BufferPool>,
}

impl AsRef<[u8]> for PooledPart {
    fn as_ref(&self) -> &[u8] {
        &self.data[..self.len]
    }
}

impl Drop for PooledPart {
    fn drop(&mut self) {
        let data = std::mem::take(&mut self.data);
        let mut free = self.pool.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < 2 {
            free.push(data);
        }
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    fn describe(&self) -> String {
        format!("s3://{}/{} at {}", self.bucket, self.prefix, self.endpoint)
    }

    async fn put(
        &self,
        key: &str,
        body: &mut (dyn AsyncRead + Send + Unpin),
        metadata: BTreeMap<String, String>,
    ) -> Result<ObjectInfo, ObjectStoreError> {
        check_key(key)?;
        let metadata: HashMap<String, String> = metadata.into_iter().collect();
        let pool = BufferPool::new();
        let mut first = pool.take(self.part_size);
        first.fill(body).await.map_err(|source| ObjectStoreError::Io {
            store: self.describe(),
            action: "read body for",
            key: key.to_string(),
            source,
        })?;
        let mut hasher = Sha256::new();
        hasher.update(first.data());
        if first.eof {
            let size = first.len as u64;
            let sha256 = hex::encode(hasher.finalize());
            self.put_single(key, first.into_bytes(), metadata.clone(), sha256.clone())
                .await?;
            let mut metadata: BTreeMap<String, String> = metadata.into_iter().collect();
            metadata.insert(SHA256_META.into(), sha256.clone());
            return Ok(ObjectInfo {
                key: key.to_string(),
                size,
                sha256,
                metadata,
            });
        }
        self.put_multipart(key, first, body, metadata, hasher, &pool).await
    }

    async fn get(&self, key: &str, sink: &mut (dyn AsyncWrite + Send + Unpin)) -> Result<ObjectInfo, ObjectStoreError> {
        check_key(key)?;
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
            .map_err(|err| {
                if err.as_service_error().is_some_and(|e| e.is_no_such_key()) {
                    ObjectStoreError::NotFound {
                        store: self.describe(),
                        key: key.to_string(),
                    }
                } else {
                    self.remote("get", key)(err)
                }
            })?;
        let mut info = self.info_from(key, out.content_length(), out.metadata());
        let mut body = out.body;
        let io = |source| ObjectStoreError::Io {
            store: self.describe(),
            action: "read",
            key: key.to_string(),
            source,
        };
        loop {
            match body.try_next().await {
                Ok(Some(chunk)) => sink.write_all(&chunk).await.map_err(io)?,
                Ok(None) => break,
                Err(err) => {
                    return Err(ObjectStoreError::Remote {
                        store: self.describe(),
                        action: "read",
                        key: key.to_string(),
                        message: DisplayErrorContext(&err).to_string(),
                        answered: false,
                    })
                }
            }
        }
        sink.flush().await.map_err(io)?;
        if info.sha256.is_empty() {
            info.sha256 = self.sidecar_sha256(key).await.unwrap_or_default();
        }
        Ok(info)
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, ObjectStoreError> {
        check_key(key)?;
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
        {
            Ok(out) => {
                let mut info = self.info_from(key, out.content_length(), out.metadata());
                if info.sha256.is_empty() {
                    info.sha256 = self.sidecar_sha256(key).await.unwrap_or_default();
                }
                Ok(Some(info))
            }
            Err(err) if err.as_service_error().is_some_and(|e| e.is_not_found()) => Ok(None),
            Err(err) if err.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Ok(None),
            Err(err) => Err(self.remote("head", key)(err)),
        }
    }

    /// Keys and sizes; metadata (and the SHA-256) only from `head`.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, ObjectStoreError> {
        let mut infos = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let out = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(self.full_key(prefix))
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(self.remote("list", prefix))?;
            for object in out.contents() {
                let Some(full) = object.key() else { continue };
                if full.ends_with(SIDECAR_SUFFIX) {
                    continue;
                }
                let key = self.relative_key(full);
                if key.starts_with(prefix) {
                    infos.push(self.info_from(key, object.size(), None));
                }
            }
            match out.next_continuation_token() {
                Some(next) if out.is_truncated() == Some(true) => token = Some(next.to_string()),
                _ => break,
            }
        }
        infos.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(infos)
    }

    async fn delete(&self, key: &str) -> Result<(), ObjectStoreError> {
        check_key(key)?;
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
            .map_err(self.remote("delete", key))?;
        // Only objects over 5 GiB have one; servers answer a missing key
        // with success or NoSuchKey, both fine here.
        let _ = self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(format!("{}{SIDECAR_SUFFIX}", self.full_key(key)))
            .send()
            .await;
        Ok(())
    }

    /// Aborts the multipart uploads the journal still names: those of a
    /// crashed agent, and those whose abort failed because S3 was away;
    /// never one this process still has in flight.
    async fn recover(&self) -> Result<Vec<String>, ObjectStoreError> {
        let Some(journal) = &self.journal else {
            return Ok(Vec::new());
        };
        let pending = journal.pending().await.map_err(|message| ObjectStoreError::Journal {
            store: self.describe(),
            key: String::new(),
            message,
        })?;
        let mut removed = Vec::new();
        let mut last_error = None;
        for upload in pending {
            let in_flight = self
                .active
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&upload.upload_id);
            if upload.bucket != self.bucket || in_flight {
                continue;
            }
            match self.abort_upload(&upload.key, &upload.upload_id).await {
                Ok(true) => {
                    self.journal_forget(&upload.upload_id).await;
                    removed.push(format!("multipart upload {} of {}", upload.upload_id, upload.key));
                }
                Ok(false) => {
                    last_error = Some(ObjectStoreError::Remote {
                        store: self.describe(),
                        action: "abort multipart upload of",
                        key: upload.key.clone(),
                        message: "timed out".into(),
                        answered: false,
                    })
                }
                Err(err) => last_error = Some(err),
            }
        }
        match last_error {
            Some(err) if removed.is_empty() => Err(err),
            Some(err) => {
                warn!(error = %err, "some multipart uploads could not be aborted yet");
                Ok(removed)
            }
            None => Ok(removed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_source_keys_are_percent_encoded_except_slashes() {
        assert_eq!(percent_encode_key("a/b c/ü.x"), "a/b%20c/%C3%BC.x");
        assert_eq!(percent_encode_key("job/db-1/2026.pgdump"), "job/db-1/2026.pgdump");
    }

    #[tokio::test]
    async fn buffers_return_to_the_pool_when_the_last_reference_drops() {
        let pool = BufferPool::new();
        let mut buffer = pool.take(16);
        buffer.fill(&mut &b"0123456789"[..]).await.unwrap();
        assert!(buffer.eof);
        assert_eq!(buffer.data(), b"0123456789");
        let bytes = buffer.into_bytes();
        let clone = bytes.clone();
        drop(bytes);
        assert!(pool.free.lock().unwrap().is_empty(), "still referenced");
        drop(clone);
        assert_eq!(pool.free.lock().unwrap().len(), 1);
        let again = pool.take(16);
        assert_eq!(again.data.len(), 16);
        assert!(pool.free.lock().unwrap().is_empty(), "reused, not allocated");
    }
}
