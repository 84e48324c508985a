//! The byte path of a backup and of a restore.
//!
//! Backup: a source writes raw bytes on a blocking thread into
//! raw-hash -> compress (zstd, multi-threaded, or gzip) -> encrypt (age) ->
//! a bounded channel of 1 MiB chunks, which the object store's `put` reads
//! on the async side. Memory is bounded by the channel (4 MiB), the
//! compressor's windows and the store's part buffers. A source that fails
//! sends an error down the channel instead of ending it, so `put` fails and
//! nothing appears under the key; an upload that fails closes the channel,
//! so the source stops at its next write.
//!
//! Restore and verify: the object store's `get` writes into a pipe whose
//! other end a blocking thread reads through hash -> decrypt -> decompress
//! -> raw-hash into the consumer (pg_restore's stdin, a file, a checker).

use std::io::{self, BufReader, Read, Write};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::settings::Compression;
use super::source::SourceError;
use crate::objstore::{ObjectStore, ObjectStoreError};

const CHUNK: usize = 1024 * 1024;
const CANCELLED: &str = "cancelled";
const CHANNEL_CHUNKS: usize = 4;

/// How raw bytes are turned into the stored object.
pub struct Encoding {
    pub compression: Compression,
    pub level: i32,
    /// zstd worker threads; 0 = half the cores (at least one).
    pub threads: u32,
    /// Empty: stored in clear.
    pub recipients: Vec<age::x25519::Recipient>,
}

impl Encoding {
    pub fn encryption(&self) -> &'static str {
        if self.recipients.is_empty() {
            "none"
        } else {
            "age"
        }
    }

    /// File name suffix: `.zst`, `.gz`, then `.age`.
    pub fn suffix(&self) -> String {
        let mut suffix = self.compression.extension().to_string();
        if !self.recipients.is_empty() {
            suffix.push_str(".age");
        }
        suffix
    }
}

/// How a stored object is read back.
#[derive(Clone)]
pub struct Decoding {
    pub compression: Compression,
    pub encrypted: bool,
    pub identities: Arc<Vec<Box<dyn age::Identity + Send + Sync>>>,
}

/// Progress of a running transfer, shared with whoever watches it.
#[derive(Clone, Default)]
pub struct Progress {
    inner: Arc<ProgressInner>,
}

#[derive(Default)]
struct ProgressInner {
    done: AtomicU64,
    total: AtomicU64,
    phase: Mutex<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressReport {
    pub phase: String,
    pub done: u64,
    /// 0 when unknown.
    pub total: u64,
}

impl Progress {
    pub fn phase(&self, phase: &str, total: u64) {
        *self.inner.phase.lock().unwrap_or_else(|p| p.into_inner()) = phase.to_string();
        self.inner.total.store(total, Ordering::Relaxed);
        self.inner.done.store(0, Ordering::Relaxed);
    }

    pub fn add(&self, n: u64) {
        self.inner.done.fetch_add(n, Ordering::Relaxed);
    }

    pub fn report(&self) -> ProgressReport {
        ProgressReport {
            phase: self.inner.phase.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            done: self.inner.done.load(Ordering::Relaxed),
            total: self.inner.total.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Store(#[from] ObjectStoreError),
    #[error("{key}: {what}: {source}")]
    Encoding {
        key: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{key}: stored SHA-256 {actual} differs from the recorded {expected}")]
    Checksum {
        key: String,
        expected: String,
        actual: String,
    },
    #[error("cancelled: {0}")]
    Cancelled(String),
    #[error("worker thread failed: {0}")]
    Task(String),
}

/// What a finished upload stored.
#[derive(Debug, Clone)]
pub struct Stored {
    pub key: String,
    pub bytes: u64,
    pub sha256: String,
    pub raw_bytes: u64,
    pub raw_sha256: String,
}

/// Streams what `produce` writes, encoded, into `objects` under `key`.
/// (Eight arguments: each is one independent input of the transfer.)
/// `produce` runs on a blocking thread; it must check `cancel` (or notice a
/// failing write) and return promptly when either says stop.
#[allow(clippy::too_many_arguments)]
pub async fn store<P>(
    objects: &dyn ObjectStore,
    key: &str,
    metadata: std::collections::BTreeMap<String, String>,
    encoding: Arc<Encoding>,
    max_rate: u64,
    progress: Progress,
    cancel: CancellationToken,
    produce: P,
) -> Result<Stored, PipelineError>
where
    P: FnOnce(&mut dyn Write, &CancellationToken) -> Result<(), SourceError> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(CHANNEL_CHUNKS);
    let upload_stopped = Arc::new(AtomicBool::new(false));
    let producer = {
        let (cancel, key, upload_stopped) = (cancel.clone(), key.to_string(), upload_stopped.clone());
        let progress = progress.clone();
        tokio::task::spawn_blocking(move || -> Result<(String, u64), PipelineError> {
            let channel = ChannelWriter {
                tx,
                buf: Vec::with_capacity(CHUNK),
                finished: false,
                upload_stopped,
            };
            let encoding_error = |what| {
                let key = key.clone();
                move |source| PipelineError::Encoding { key, what, source }
            };
            let encrypted =
                EncryptWriter::new(channel, &encoding.recipients).map_err(encoding_error("start encryption"))?;
            let compressed = CompressWriter::new(encrypted, &encoding).map_err(encoding_error("start compression"))?;
            let mut raw = RawSink {
                inner: compressed,
                hasher: Sha256::new(),
                bytes: 0,
                progress,
                cancel: cancel.clone(),
            };
            // On error the chain is dropped unfinished: the channel sends an
            // error, and `put` fails.
            produce(&mut raw, &cancel)?;
            if cancel.is_cancelled() {
                return Err(PipelineError::Cancelled("stopped before the end of the source".into()));
            }
            let RawSink {
                inner, hasher, bytes, ..
            } = raw;
            let encrypted = inner.finish().map_err(encoding_error("finish compression"))?;
            let mut channel = encrypted.finish().map_err(encoding_error("finish encryption"))?;
            channel.finish().map_err(encoding_error("hand over the last chunk"))?;
            Ok((hex::encode(hasher.finalize()), bytes))
        })
    };
    let mut reader = ChannelReader {
        rx,
        current: Bytes::new(),
        limit: RateLimit::new(max_rate),
        cancel: cancel.clone(),
    };
    let put = objects.put(key, &mut reader, metadata).await;
    // Closing our end makes a producer blocked on a full channel fail fast.
    drop(reader);
    let produced = producer.await.map_err(|err| PipelineError::Task(err.to_string()));
    let produced = produced.and_then(|r| r);
    match (put, produced) {
        (Ok(info), Ok((raw_sha256, raw_bytes))) => Ok(Stored {
            key: key.to_string(),
            bytes: info.size,
            sha256: info.sha256,
            raw_bytes,
            raw_sha256,
        }),
        // The upload failed first and the source only noticed: the upload's
        // error is the cause.
        (Err(err), Err(_)) if upload_stopped.load(Ordering::Relaxed) => Err(err.into()),
        (_, Err(err)) => Err(err),
        (Err(err), Ok(_)) => Err(err.into()),
    }
}

/// What a finished read of a stored object saw.
#[derive(Debug, Clone)]
pub struct Fetched<T> {
    pub bytes: u64,
    pub sha256: String,
    pub raw_bytes: u64,
    pub raw_sha256: String,
    pub value: T,
}

/// Reads `key` back through decryption and decompression into `consume`
/// (on a blocking thread). Whatever `consume` leaves unread is drained, so
/// the stored bytes are always hashed whole; with `expected_sha256` a
/// mismatch is an error.
pub async fn fetch<T, C>(
    objects: &dyn ObjectStore,
    key: &str,
    expected_sha256: Option<&str>,
    decoding: Decoding,
    progress: Progress,
    consume: C,
) -> Result<Fetched<T>, PipelineError>
where
    T: Send + 'static,
    C: FnOnce(&mut dyn Read) -> Result<T, SourceError> + Send + 'static,
{
    let (mut writer, pipe_reader) = tokio::io::duplex(CHUNK);
    let stored = Arc::new(Mutex::new((Sha256::new(), 0u64)));
    let consumer = {
        let (stored, key) = (stored.clone(), key.to_string());
        tokio::task::spawn_blocking(move || -> Result<(T, String, u64), PipelineError> {
            let bridge = tokio_util::io::SyncIoBridge::new(pipe_reader);
            let hashing = HashingReader {
                inner: bridge,
                state: stored,
                progress,
            };
            let encoding_error = |what| {
                let key = key.clone();
                move |source| PipelineError::Encoding { key, what, source }
            };
            let mut decoded = decode(hashing, &decoding).map_err(encoding_error("start decoding"))?;
            let mut raw = RawReader {
                inner: &mut decoded,
                hasher: Sha256::new(),
                bytes: 0,
            };
            let value = consume(&mut raw)?;
            io::copy(&mut raw, &mut io::sink()).map_err(encoding_error("read to the end"))?;
            Ok((value, hex::encode(raw.hasher.finalize()), raw.bytes))
        })
    };
    let got = objects.get(key, &mut writer).await;
    drop(writer);
    let consumed = consumer
        .await
        .map_err(|err| PipelineError::Task(err.to_string()))
        .and_then(|r| r);
    let (value, raw_sha256, raw_bytes) = match (got, consumed) {
        (Ok(_), Ok(done)) => done,
        (Err(err), _) => return Err(err.into()),
        (Ok(_), Err(err)) => return Err(err),
    };
    let (hasher, bytes) = {
        let mut state = stored.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *state)
    };
    let sha256 = hex::encode(hasher.finalize());
    if let Some(expected) = expected_sha256 {
        if !expected.is_empty() && expected != sha256 {
            return Err(PipelineError::Checksum {
                key: key.to_string(),
                expected: expected.to_string(),
                actual: sha256,
            });
        }
    }
    Ok(Fetched {
        bytes,
        sha256,
        raw_bytes,
        raw_sha256,
        value,
    })
}

/// The stored bytes of `key`, hashed only (the read-back after upload).
pub async fn stored_sha256(objects: &dyn ObjectStore, key: &str) -> Result<(String, u64), ObjectStoreError> {
    let mut sink = HashingSink::default();
    objects.get(key, &mut sink).await?;
    Ok((hex::encode(sink.hasher.finalize()), sink.bytes))
}

fn decode<'a, R: Read + Send + 'a>(input: R, decoding: &Decoding) -> io::Result<Box<dyn Read + Send + 'a>> {
    let decrypted: Box<dyn Read + Send + 'a> = if decoding.encrypted {
        if decoding.identities.is_empty() {
            return Err(io::Error::other(
                "the object is encrypted and backup.age_identity_file names no identity to decrypt it",
            ));
        }
        let decryptor = age::Decryptor::new_buffered(BufReader::with_capacity(256 * 1024, input))
            .map_err(|err| io::Error::other(format!("not an age file: {err}")))?;
        let reader = decryptor
            .decrypt(decoding.identities.iter().map(|i| i.as_ref() as &dyn age::Identity))
            .map_err(|err| io::Error::other(format!("cannot decrypt: {err}")))?;
        Box::new(reader)
    } else {
        Box::new(input)
    };
    Ok(match decoding.compression {
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(decrypted)?),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(BufReader::with_capacity(
            256 * 1024,
            decrypted,
        ))),
        Compression::None => decrypted,
    })
}

/// Sends 1 MiB chunks to the uploader.
struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
    finished: bool,
    upload_stopped: Arc<AtomicBool>,
}

impl ChannelWriter {
    fn send(&mut self, item: io::Result<Bytes>) -> io::Result<()> {
        self.tx.blocking_send(item).map_err(|_| {
            self.upload_stopped.store(true, Ordering::Relaxed);
            io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped")
        })
    }

    fn send_buffered(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.send(Ok(chunk))
    }

    fn finish(&mut self) -> io::Result<()> {
        self.send_buffered()?;
        self.finished = true;
        Ok(())
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = CHUNK - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK {
            self.send_buffered()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ChannelWriter {
    fn drop(&mut self) {
        if !self.finished {
            // Never let a truncated stream look complete.
            let _ = self.tx.blocking_send(Err(io::Error::other("the backup source failed")));
        }
    }
}

enum EncryptWriter<W: Write> {
    Plain(W),
    Age(age::stream::StreamWriter<W>),
}

impl<W: Write> EncryptWriter<W> {
    fn new(inner: W, recipients: &[age::x25519::Recipient]) -> io::Result<Self> {
        if recipients.is_empty() {
            return Ok(EncryptWriter::Plain(inner));
        }
        let encryptor = age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
            .map_err(|err| io::Error::other(err.to_string()))?;
        Ok(EncryptWriter::Age(encryptor.wrap_output(inner)?))
    }

    fn finish(self) -> io::Result<W> {
        match self {
            EncryptWriter::Plain(inner) => Ok(inner),
            EncryptWriter::Age(stream) => stream.finish(),
        }
    }
}

impl<W: Write> Write for EncryptWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            EncryptWriter::Plain(inner) => inner.write(data),
            EncryptWriter::Age(stream) => stream.write(data),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            EncryptWriter::Plain(inner) => inner.flush(),
            EncryptWriter::Age(stream) => stream.flush(),
        }
    }
}

enum CompressWriter<W: Write> {
    None(W),
    Zstd(zstd::stream::write::Encoder<'static, W>),
    Gzip(flate2::write::GzEncoder<W>),
}

impl<W: Write> CompressWriter<W> {
    fn new(inner: W, encoding: &Encoding) -> io::Result<Self> {
        Ok(match encoding.compression {
            Compression::None => CompressWriter::None(inner),
            Compression::Gzip => CompressWriter::Gzip(flate2::write::GzEncoder::new(
                inner,
                flate2::Compression::new(encoding.level.clamp(1, 9) as u32),
            )),
            Compression::Zstd => {
                let mut encoder = zstd::stream::write::Encoder::new(inner, encoding.level)?;
                encoder.include_checksum(true)?;
                // Always multi-threaded: even one worker compresses while
                // this thread reads the source. Auto leaves half the cores
                // to the database and the dump tool feeding us.
                let workers = match encoding.threads {
                    0 => std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1) as u32),
                    n => n,
                };
                encoder.multithread(workers)?;
                // Jobs of 1 MiB instead of zstd's default (4 windows, 8 MiB
                // at level 3) keep each worker's buffers, and so the agent's
                // memory, small; the ratio hardly changes.
                encoder.set_parameter(zstd::zstd_safe::CParameter::JobSize(1024 * 1024))?;
                CompressWriter::Zstd(encoder)
            }
        })
    }

    fn finish(self) -> io::Result<W> {
        match self {
            CompressWriter::None(inner) => Ok(inner),
            CompressWriter::Zstd(encoder) => encoder.finish(),
            CompressWriter::Gzip(encoder) => encoder.finish(),
        }
    }
}

impl<W: Write> Write for CompressWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            CompressWriter::None(inner) => inner.write(data),
            CompressWriter::Zstd(encoder) => encoder.write(data),
            CompressWriter::Gzip(encoder) => encoder.write(data),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            CompressWriter::None(inner) => inner.flush(),
            CompressWriter::Zstd(encoder) => encoder.flush(),
            CompressWriter::Gzip(encoder) => encoder.flush(),
        }
    }
}

/// Counts and hashes what the source writes; refuses writes once cancelled.
struct RawSink<W: Write> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
    progress: Progress,
    cancel: CancellationToken,
}

impl<W: Write> Write for RawSink<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.cancel.is_cancelled() {
            // Not ErrorKind::Interrupted: `write_all` retries those forever.
            return Err(io::Error::other(CANCELLED));
        }
        let n = self.inner.write(data)?;
        self.hasher.update(&data[..n]);
        self.bytes += n as u64;
        self.progress.add(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

struct RawReader<'a> {
    inner: &'a mut (dyn Read + Send),
    hasher: Sha256,
    bytes: u64,
}

impl Read for RawReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

struct HashingReader<R> {
    inner: R,
    state: Arc<Mutex<(Sha256, u64)>>,
    progress: Progress,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.0.update(&buf[..n]);
        state.1 += n as u64;
        self.progress.add(n as u64);
        Ok(n)
    }
}

#[derive(Default)]
struct HashingSink {
    hasher: Sha256,
    bytes: u64,
}

impl tokio::io::AsyncWrite for HashingSink {
    fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.hasher.update(buf);
        self.bytes += buf.len() as u64;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The uploader's side of the channel, with an optional bandwidth limit.
/// Once cancelled it fails the upload at once, even while the source is
/// stuck.
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
    limit: RateLimit,
    cancel: CancellationToken,
}

impl AsyncRead for ChannelReader {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.cancel.is_cancelled() {
            return Poll::Ready(Err(io::Error::other(CANCELLED)));
        }
        if let Some(sleep) = self.limit.pending.as_mut() {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.limit.pending = None;
        }
        while self.current.is_empty() {
            match self.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Ready(Some(Err(err))) => return Poll::Ready(Err(err)),
                Poll::Ready(Some(Ok(chunk))) => self.current = chunk,
            }
        }
        let n = self.current.len().min(buf.remaining());
        buf.put_slice(&self.current[..n]);
        let _ = self.current.split_to(n);
        self.limit.consumed(n as u64);
        Poll::Ready(Ok(()))
    }
}

use std::future::Future;

struct RateLimit {
    bytes_per_second: u64,
    started: tokio::time::Instant,
    sent: u64,
    pending: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl RateLimit {
    fn new(bytes_per_second: u64) -> Self {
        RateLimit {
            bytes_per_second,
            started: tokio::time::Instant::now(),
            sent: 0,
            pending: None,
        }
    }

    /// After `n` more bytes: when ahead of the allowed rate, the next read
    /// waits until the rate is met again.
    fn consumed(&mut self, n: u64) {
        if self.bytes_per_second == 0 {
            return;
        }
        self.sent += n;
        let due = Duration::from_secs_f64(self.sent as f64 / self.bytes_per_second as f64);
        let elapsed = self.started.elapsed();
        if due > elapsed {
            self.pending = Some(Box::pin(tokio::time::sleep(due - elapsed)));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::objstore::LocalStore;

    fn identity() -> (age::x25519::Identity, age::x25519::Recipient) {
        let identity = age::x25519::Identity::generate();
        let recipient = identity.to_public();
        (identity, recipient)
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn round_trips_through_every_encoding() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().to_path_buf());
        let (identity, recipient) = identity();
        let identities: Arc<Vec<Box<dyn age::Identity + Send + Sync>>> = Arc::new(vec![Box::new(identity)]);
        let payload = data(3 * CHUNK + 12345);
        for compression in [Compression::Zstd, Compression::Gzip, Compression::None] {
            for encrypt in [false, true] {
                let encoding = Arc::new(Encoding {
                    compression,
                    level: 3,
                    threads: 2,
                    recipients: if encrypt { vec![recipient.clone()] } else { vec![] },
                });
                let key = format!("t/{}{}", compression.as_str(), encoding.suffix());
                let input = payload.clone();
                let stored = store_bytes(&store, &key, encoding, input).await.unwrap();
                assert_eq!(stored.raw_bytes, payload.len() as u64);
                assert_eq!(stored.raw_sha256, hex::encode(Sha256::digest(&payload)));
                let object = std::fs::read(dir.path().join(&key)).unwrap();
                assert_eq!(stored.sha256, hex::encode(Sha256::digest(&object)));
                if encrypt {
                    assert!(object.starts_with(b"age-encryption.org/v1"), "{key}");
                }
                if compression != Compression::None && !encrypt {
                    assert!(object.len() < payload.len() / 2, "{key} is compressed");
                }
                let decoding = Decoding {
                    compression,
                    encrypted: encrypt,
                    identities: identities.clone(),
                };
                let fetched = fetch(&store, &key, Some(&stored.sha256), decoding, Progress::default(), |r| {
                    let mut out = Vec::new();
                    r.read_to_end(&mut out).map_err(|e| SourceError::io("read", e))?;
                    Ok(out)
                })
                .await
                .unwrap();
                assert_eq!(fetched.value, payload, "{key}");
                assert_eq!(fetched.raw_sha256, stored.raw_sha256);
                assert_eq!(fetched.sha256, stored.sha256);
            }
        }
    }

    async fn store_bytes(
        objects: &dyn ObjectStore,
        key: &str,
        encoding: Arc<Encoding>,
        input: Vec<u8>,
    ) -> Result<Stored, PipelineError> {
        super::store(
            objects,
            key,
            BTreeMap::new(),
            encoding,
            0,
            Progress::default(),
            CancellationToken::new(),
            move |w, _| w.write_all(&input).map_err(|e| SourceError::io("write", e)),
        )
        .await
    }

    #[tokio::test]
    async fn a_failing_source_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().to_path_buf());
        let encoding = Arc::new(Encoding {
            compression: Compression::Zstd,
            level: 1,
            threads: 1,
            recipients: vec![],
        });
        let err = super::store(
            &store,
            "k",
            BTreeMap::new(),
            encoding,
            0,
            Progress::default(),
            CancellationToken::new(),
            |w, _| {
                w.write_all(&data(5 * CHUNK)).map_err(|e| SourceError::io("write", e))?;
                Err(SourceError::Invalid("pg_dump exited 1".into()))
            },
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("pg_dump exited 1"), "{err}");
        assert!(store.head("k").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_wrong_checksum_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().to_path_buf());
        let encoding = Arc::new(Encoding {
            compression: Compression::None,
            level: 1,
            threads: 1,
            recipients: vec![],
        });
        store_bytes(&store, "k", encoding, b"hello".to_vec()).await.unwrap();
        let decoding = Decoding {
            compression: Compression::None,
            encrypted: false,
            identities: Arc::new(vec![]),
        };
        let err = fetch(&store, "k", Some("00"), decoding, Progress::default(), |_| Ok(()))
            .await
            .unwrap_err();
        assert!(matches!(err, PipelineError::Checksum { .. }), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancel_stops_a_source_that_keeps_writing() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().to_path_buf());
        let encoding = Arc::new(Encoding {
            compression: Compression::Zstd,
            level: 1,
            threads: 2,
            recipients: vec![],
        });
        let cancel = CancellationToken::new();
        let progress = Progress::default();
        let stopper = {
            let (cancel, progress) = (cancel.clone(), progress.clone());
            tokio::spawn(async move {
                while progress.report().done < 4 * CHUNK as u64 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                cancel.cancel();
            })
        };
        let started = std::time::Instant::now();
        let result = super::store(&store, "k", BTreeMap::new(), encoding, 0, progress, cancel, |w, _| {
            loop {
                // A source that never ends by itself.
                w.write_all(&data(CHUNK)).map_err(|e| SourceError::io("write", e))?;
            }
        })
        .await;
        stopper.await.unwrap();
        assert!(result.is_err());
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
        assert!(store.head("k").await.unwrap().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_limit_paces_reads() {
        let (tx, rx) = mpsc::channel(8);
        for _ in 0..4 {
            tx.send(Ok(Bytes::from(vec![0u8; 1000]))).await.unwrap();
        }
        drop(tx);
        let mut reader = ChannelReader {
            rx,
            current: Bytes::new(),
            limit: RateLimit::new(1000),
            cancel: CancellationToken::new(),
        };
        let started = tokio::time::Instant::now();
        let mut out = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut out)
            .await
            .unwrap();
        assert_eq!(out.len(), 4000);
        // 4000 bytes at 1000 B/s: the last read waits until 4 s.
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(4) && took < Duration::from_secs(5),
            "{took:?}"
        );
    }
}
