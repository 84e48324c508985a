//! One WAL file to the object store and back: the code path shared by the
//! daemon, `wal-push` in direct mode, the spool shipper, the watchdog's
//! re-push and `wal-fetch`.
//!
//! Object layout: `<prefix>/<timeline 8 hex>/<file name>` plus `.zst` when
//! compressed and `.age` when encrypted. Each object carries, besides the
//! object store's own `sha256` (of the stored bytes), the SHA-256 and size of
//! the RAW file as the metadata `wal-sha256` and `wal-size`: that is what
//! decides whether a re-archive is identical. Segments are at most 1 GiB
//! (16 MiB by default) and are encoded in memory; `put` is atomic (one
//! PutObject, or a multipart upload completed only at the end), so no
//! half-written object ever looks complete.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::catalog::{WalCatalog, WalRow};
use super::names::WalName;
use super::settings::{WalCompression, WalSettings};
use super::WalError;
use crate::objstore::{ObjectStore, ObjectStoreError};

pub const META_SHA256: &str = "wal-sha256";
pub const META_SIZE: &str = "wal-size";
pub const META_COMPRESSION: &str = "wal-compression";
pub const META_ENCRYPTION: &str = "wal-encryption";

/// The result of one push, as `wal-push` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PushOutcome {
    /// Uploaded now; durable in the object store.
    Archived,
    /// The same content was already archived: nothing uploaded.
    AlreadyArchived,
    /// Spool mode: fsync'd in the local spool; the daemon ships it.
    Spooled,
}

impl PushOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            PushOutcome::Archived => "archived",
            PushOutcome::AlreadyArchived => "already-archived",
            PushOutcome::Spooled => "spooled",
        }
    }
}

/// A WAL file read into memory with its raw checksum.
pub struct RawFile {
    pub name: WalName,
    pub data: Vec<u8>,
    pub sha256: String,
}

/// Reads `path` without following a symlink at its end. With `peer_uid`
/// (a request from another user over the socket) the file must belong to
/// that user: a group member cannot make the agent upload a file it could
/// not read itself.
pub fn read_raw(path: &Path, name: &str, peer_uid: Option<u32>) -> Result<RawFile, WalError> {
    let name = WalName::parse(name).ok_or_else(|| WalError::BadName(name.to_string()))?;
    let io = |source| WalError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(io(std::io::Error::other("not a regular file")));
    }
    if let Some(uid) = peer_uid {
        if meta.uid() != uid {
            return Err(WalError::NotOwner {
                path: path.to_path_buf(),
                uid,
            });
        }
    }
    let mut data = Vec::with_capacity(meta.len() as usize);
    file.read_to_end(&mut data).map_err(io)?;
    let sha256 = hex::encode(Sha256::digest(&data));
    Ok(RawFile { name, data, sha256 })
}

/// How files are encoded and where they go.
pub struct Archiver {
    pub objects: Arc<dyn ObjectStore>,
    pub prefix: String,
    pub compression: WalCompression,
    pub level: i32,
    pub recipients: Vec<age::x25519::Recipient>,
    pub identities: Arc<Vec<Box<dyn age::Identity + Send + Sync>>>,
    /// The daemon's catalog; None in direct mode and in wal-fetch.
    pub catalog: Option<WalCatalog>,
}

impl Archiver {
    pub fn new(
        settings: &WalSettings,
        backup: &crate::backup::BackupSettings,
        objects: Arc<dyn ObjectStore>,
        catalog: Option<WalCatalog>,
        need_identities: bool,
    ) -> Result<Archiver, WalError> {
        let recipients = if settings.encrypt {
            crate::backup::settings::load_recipients(backup).map_err(WalError::Setup)?
        } else {
            Vec::new()
        };
        let identities = if need_identities && !backup.age_identity_file.as_os_str().is_empty() {
            age::IdentityFile::from_file(backup.age_identity_file.display().to_string())
                .map_err(|err| err.to_string())
                .and_then(|file| file.into_identities().map_err(|err| err.to_string()))
                .map_err(|message| WalError::Setup(format!("{}: {message}", backup.age_identity_file.display())))?
        } else {
            Vec::new()
        };
        Ok(Archiver {
            objects,
            prefix: settings.prefix.trim_matches('/').to_string(),
            compression: settings.compression,
            level: settings.compression_level,
            recipients,
            identities: Arc::new(identities),
            catalog,
        })
    }

    fn suffix(&self, compression: WalCompression, encrypted: bool) -> String {
        let mut suffix = compression.extension().to_string();
        if encrypted {
            suffix.push_str(".age");
        }
        suffix
    }

    /// The key this configuration stores `name` under.
    pub fn key(&self, name: &WalName) -> String {
        format!(
            "{}/{}/{}{}",
            self.prefix,
            name.timeline_hex(),
            name.name,
            self.suffix(self.compression, !self.recipients.is_empty())
        )
    }

    /// Every key `name` may have been stored under (the configuration's
    /// first), for readers that must find objects written under another
    /// compression or encryption setting.
    pub fn candidate_keys(&self, name: &WalName) -> Vec<String> {
        let mut keys = vec![self.key(name)];
        for compression in [WalCompression::Zstd, WalCompression::None] {
            for encrypted in [false, true] {
                let key = format!(
                    "{}/{}/{}{}",
                    self.prefix,
                    name.timeline_hex(),
                    name.name,
                    self.suffix(compression, encrypted)
                );
                if !keys.contains(&key) {
                    keys.push(key);
                }
            }
        }
        keys
    }

    /// What is already archived under this name: (raw sha256, key).
    async fn existing(&self, raw: &RawFile, key: &str) -> Result<Option<(String, String)>, WalError> {
        if let Some(catalog) = &self.catalog {
            if let Some(row) = catalog.lookup(&raw.name.name).await? {
                if row.raw_sha256 != raw.sha256 {
                    return Ok(Some((row.raw_sha256, row.key)));
                }
                // A re-archive is rare: make sure the object is still there
                // before calling it archived (it may have been deleted
                // behind the agent's back).
                if self.objects.head(&row.key).await?.is_some() {
                    return Ok(Some((row.raw_sha256, row.key)));
                }
                catalog.forget(&row.name).await?;
            }
        }
        match self.objects.head(key).await? {
            None => Ok(None),
            Some(info) => Ok(Some((
                info.metadata.get(META_SHA256).cloned().unwrap_or_default(),
                key.to_string(),
            ))),
        }
    }

    /// Archives one file: identical content already there is success without
    /// an upload; different content under the same name is a conflict.
    pub async fn push(&self, raw: RawFile) -> Result<(PushOutcome, String), WalError> {
        let key = self.key(&raw.name);
        if let Some((existing, existing_key)) = self.existing(&raw, &key).await? {
            if existing == raw.sha256 {
                if let Some(catalog) = &self.catalog {
                    catalog.record(&self.row(&raw, &existing_key)).await?;
                }
                return Ok((PushOutcome::AlreadyArchived, existing_key));
            }
            return Err(WalError::Conflict {
                name: raw.name.name.clone(),
                key: existing_key,
                existing: if existing.is_empty() {
                    "(none recorded)".into()
                } else {
                    existing
                },
                new: raw.sha256.clone(),
            });
        }
        let metadata = BTreeMap::from([
            (META_SHA256.to_string(), raw.sha256.clone()),
            (META_SIZE.to_string(), raw.data.len().to_string()),
            (META_COMPRESSION.to_string(), self.compression.as_str().to_string()),
            (
                META_ENCRYPTION.to_string(),
                if self.recipients.is_empty() { "none" } else { "age" }.to_string(),
            ),
        ]);
        let encoded = encode(&raw.data, self.compression, self.level, &self.recipients)?;
        self.objects.put(&key, &mut &encoded[..], metadata).await?;
        // The object (with its wal-sha256) is the truth; the catalog row is
        // an index of it, written off the answer's path: the state store
        // fsyncs every commit, and wal-push latency is PostgreSQL's
        // archiving throughput. A row lost to a crash is found again by the
        // next re-archive's HEAD and by the watchdog's reconciliation.
        if let Some(catalog) = self.catalog.clone() {
            let row = self.row(&raw, &key);
            tokio::spawn(async move {
                if let Err(err) = catalog.record(&row).await {
                    tracing::warn!(segment = %row.name, "cannot record an archived WAL file in the catalog: {err}");
                }
            });
        }
        Ok((PushOutcome::Archived, key))
    }

    fn row(&self, raw: &RawFile, key: &str) -> WalRow {
        WalRow {
            timeline: raw.name.timeline,
            name: raw.name.name.clone(),
            raw_sha256: raw.sha256.clone(),
            size: raw.data.len() as u64,
            archived_ms: crate::backup::now_ms(),
            key: key.to_string(),
        }
    }

    /// Fetches `name` decoded, its raw SHA-256 checked against the object's
    /// metadata. Ok(None) when no object holds it.
    pub async fn fetch(&self, name: &WalName) -> Result<Option<Vec<u8>>, WalError> {
        for key in self.candidate_keys(name) {
            let mut stored = Vec::new();
            let info = match self.objects.get(&key, &mut stored).await {
                Ok(info) => info,
                Err(ObjectStoreError::NotFound { .. }) => continue,
                Err(err) => return Err(err.into()),
            };
            let actual = hex::encode(Sha256::digest(&stored));
            if !info.sha256.is_empty() && info.sha256 != actual {
                return Err(WalError::Corrupt {
                    key,
                    message: format!("stored SHA-256 {actual} differs from the recorded {}", info.sha256),
                });
            }
            let compression = if key.ends_with(".zst") || key.ends_with(".zst.age") {
                WalCompression::Zstd
            } else {
                WalCompression::None
            };
            let raw = decode(&stored, compression, key.ends_with(".age"), &self.identities).map_err(|message| {
                WalError::Corrupt {
                    key: key.clone(),
                    message,
                }
            })?;
            let raw_sha = hex::encode(Sha256::digest(&raw));
            match info.metadata.get(META_SHA256) {
                Some(expected) if *expected == raw_sha => {}
                Some(expected) => {
                    return Err(WalError::Corrupt {
                        key,
                        message: format!("raw SHA-256 {raw_sha} differs from the archived {expected}"),
                    })
                }
                None => {
                    return Err(WalError::Corrupt {
                        key,
                        message: "the object carries no wal-sha256".into(),
                    })
                }
            }
            return Ok(Some(raw));
        }
        Ok(None)
    }
}

pub fn encode(
    data: &[u8],
    compression: WalCompression,
    level: i32,
    recipients: &[age::x25519::Recipient],
) -> Result<Vec<u8>, WalError> {
    let compressed = match compression {
        WalCompression::Zstd => {
            zstd::bulk::compress(data, level).map_err(|err| WalError::Encode(format!("zstd: {err}")))?
        }
        WalCompression::None => data.to_vec(),
    };
    if recipients.is_empty() {
        return Ok(compressed);
    }
    let encryptor = age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
        .map_err(|err| WalError::Encode(format!("age: {err}")))?;
    let mut out = Vec::with_capacity(compressed.len() + 256);
    let mut writer = encryptor
        .wrap_output(&mut out)
        .map_err(|err| WalError::Encode(format!("age: {err}")))?;
    writer
        .write_all(&compressed)
        .and_then(|()| writer.finish().map(|_| ()))
        .map_err(|err| WalError::Encode(format!("age: {err}")))?;
    Ok(out)
}

pub fn decode(
    stored: &[u8],
    compression: WalCompression,
    encrypted: bool,
    identities: &[Box<dyn age::Identity + Send + Sync>],
) -> Result<Vec<u8>, String> {
    let clear = if encrypted {
        if identities.is_empty() {
            return Err("the object is encrypted and backup.age_identity_file names no identity".into());
        }
        let decryptor = age::Decryptor::new_buffered(stored).map_err(|err| format!("not an age file: {err}"))?;
        let mut reader = decryptor
            .decrypt(identities.iter().map(|i| i.as_ref() as &dyn age::Identity))
            .map_err(|err| format!("cannot decrypt: {err}"))?;
        let mut out = Vec::new();
        reader
            .read_to_end(&mut out)
            .map_err(|err| format!("cannot decrypt: {err}"))?;
        out
    } else {
        stored.to_vec()
    };
    match compression {
        WalCompression::Zstd => zstd::stream::decode_all(&clear[..]).map_err(|err| format!("zstd: {err}")),
        WalCompression::None => Ok(clear),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip_with_age() {
        let identity = age::x25519::Identity::generate();
        let recipient = identity.to_public();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let stored = encode(&data, WalCompression::Zstd, 1, &[recipient]).unwrap();
        assert!(stored.len() < data.len());
        let identities: Vec<Box<dyn age::Identity + Send + Sync>> = vec![Box::new(identity)];
        assert_eq!(decode(&stored, WalCompression::Zstd, true, &identities).unwrap(), data);
        assert!(decode(&stored, WalCompression::Zstd, true, &[]).is_err());
    }
}
