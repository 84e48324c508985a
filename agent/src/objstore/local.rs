//! A directory standing in for an S3 bucket. Objects are written to a temp
//! file inside the store (same filesystem), fsynced, and renamed into place,
//! so a crash leaves either the old object or the new one, never a torn one.
//! Metadata lives in a sidecar written before the data is renamed in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{check_key, ObjectInfo, ObjectStore, ObjectStoreError};

const TEMP_DIR: &str = ".pa-partial";
const META_SUFFIX: &str = ".pa-meta.json";

pub struct LocalStore {
    root: PathBuf,
    /// Partial files of `put`s in flight in this process: `recover` leaves
    /// them alone.
    active: std::sync::Mutex<std::collections::HashSet<PathBuf>>,
}

impl LocalStore {
    pub fn new(root: PathBuf) -> Self {
        LocalStore {
            root,
            active: Default::default(),
        }
    }

    fn io(&self, action: &'static str, key: &str) -> impl FnOnce(std::io::Error) -> ObjectStoreError {
        let store = self.describe();
        let key = key.to_string();
        move |source| ObjectStoreError::Io {
            store,
            action,
            key,
            source,
        }
    }

    fn data_path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn meta_path(&self, key: &str) -> PathBuf {
        self.root.join(format!("{key}{META_SUFFIX}"))
    }

    async fn read_info(&self, key: &str) -> Result<Option<ObjectInfo>, ObjectStoreError> {
        match tokio::fs::read(self.meta_path(key)).await {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|err| self.io("read metadata of", key)(std::io::Error::other(err))),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(self.io("read metadata of", key)(err)),
        }
    }
}

/// Marks a partial file as in flight while it lives.
struct ActiveFile<'a> {
    set: &'a std::sync::Mutex<std::collections::HashSet<PathBuf>>,
    path: PathBuf,
}

impl<'a> ActiveFile<'a> {
    fn new(set: &'a std::sync::Mutex<std::collections::HashSet<PathBuf>>, path: PathBuf) -> Self {
        set.lock().unwrap_or_else(|p| p.into_inner()).insert(path.clone());
        ActiveFile { set, path }
    }
}

impl Drop for ActiveFile<'_> {
    fn drop(&mut self) {
        self.set.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.path);
    }
}

async fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    tokio::fs::File::open(dir).await?.sync_all().await
}

#[async_trait]
impl ObjectStore for LocalStore {
    fn describe(&self) -> String {
        format!("local:{}", self.root.display())
    }

    async fn put(
        &self,
        key: &str,
        body: &mut (dyn AsyncRead + Send + Unpin),
        metadata: BTreeMap<String, String>,
    ) -> Result<ObjectInfo, ObjectStoreError> {
        check_key(key)?;
        let temp_dir = self.root.join(TEMP_DIR);
        tokio::fs::create_dir_all(&temp_dir)
            .await
            .map_err(self.io("prepare", key))?;
        let temp = tempfile::Builder::new()
            .prefix("put-")
            .tempfile_in(&temp_dir)
            .map_err(self.io("create temp file for", key))?;
        // Dropping the TempPath on any early return removes the partial file.
        let (file, temp_path) = temp.into_parts();
        let _active = ActiveFile::new(&self.active, temp_path.to_path_buf());
        let mut file = tokio::fs::File::from_std(file);
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = body.read(&mut buf).await.map_err(self.io("read body for", key))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n]).await.map_err(self.io("write", key))?;
            size += n as u64;
        }
        file.sync_all().await.map_err(self.io("fsync", key))?;
        drop(file);
        let info = ObjectInfo {
            key: key.to_string(),
            size,
            sha256: hex::encode(hasher.finalize()),
            metadata,
        };

        let target = self.data_path(key);
        let parent = target.parent().unwrap_or(&self.root).to_path_buf();
        tokio::fs::create_dir_all(&parent)
            .await
            .map_err(self.io("create directory for", key))?;
        let meta_temp = tempfile::Builder::new()
            .prefix("meta-")
            .tempfile_in(&temp_dir)
            .map_err(self.io("create metadata for", key))?;
        let _active_meta = ActiveFile::new(&self.active, meta_temp.path().to_path_buf());
        let meta_json = serde_json::to_vec(&info).expect("object info serializes");
        std::fs::write(meta_temp.path(), &meta_json).map_err(self.io("write metadata for", key))?;
        meta_temp
            .as_file()
            .sync_all()
            .map_err(self.io("fsync metadata for", key))?;
        // Metadata first: an object whose data is visible always has it. A
        // crash between the two renames leaves metadata without data, which
        // `head` and `list` treat as absent.
        meta_temp
            .persist(self.meta_path(key))
            .map_err(|err| self.io("publish metadata for", key)(err.error))?;
        temp_path
            .persist(&target)
            .map_err(|err| self.io("publish", key)(err.error))?;
        fsync_dir(&parent).await.map_err(self.io("fsync directory of", key))?;
        Ok(info)
    }

    async fn get(&self, key: &str, sink: &mut (dyn AsyncWrite + Send + Unpin)) -> Result<ObjectInfo, ObjectStoreError> {
        check_key(key)?;
        let info = self.head(key).await?.ok_or_else(|| ObjectStoreError::NotFound {
            store: self.describe(),
            key: key.to_string(),
        })?;
        let mut file = tokio::fs::File::open(self.data_path(key))
            .await
            .map_err(self.io("open", key))?;
        tokio::io::copy(&mut file, sink).await.map_err(self.io("read", key))?;
        sink.flush().await.map_err(self.io("read", key))?;
        Ok(info)
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, ObjectStoreError> {
        check_key(key)?;
        if !tokio::fs::try_exists(self.data_path(key))
            .await
            .map_err(self.io("stat", key))?
        {
            return Ok(None);
        }
        self.read_info(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, ObjectStoreError> {
        let mut keys = Vec::new();
        let mut pending = vec![self.root.clone()];
        while let Some(dir) = pending.pop() {
            let mut entries = match tokio::fs::read_dir(&dir).await {
                Ok(entries) => entries,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => return Err(self.io("list", prefix)(err)),
            };
            while let Some(entry) = entries.next_entry().await.map_err(self.io("list", prefix))? {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(".pa-") || name.ends_with(META_SUFFIX) {
                    continue;
                }
                let path = entry.path();
                if entry.file_type().await.map_err(self.io("list", prefix))?.is_dir() {
                    pending.push(path);
                } else if let Ok(rel) = path.strip_prefix(&self.root) {
                    let key = rel.to_string_lossy().into_owned();
                    if key.starts_with(prefix) {
                        keys.push(key);
                    }
                }
            }
        }
        keys.sort();
        let mut infos = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some(info) = self.read_info(&key).await? {
                infos.push(info);
            }
        }
        Ok(infos)
    }

    async fn delete(&self, key: &str) -> Result<(), ObjectStoreError> {
        check_key(key)?;
        // Data first, so that a crash in between leaves no visible object.
        for path in [self.data_path(key), self.meta_path(key)] {
            match tokio::fs::remove_file(&path).await {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(self.io("delete", key)(err)),
            }
        }
        Ok(())
    }

    /// Partial files of `put`s interrupted by a crash (a clean failure
    /// removes its own).
    async fn recover(&self) -> Result<Vec<String>, ObjectStoreError> {
        let temp_dir = self.root.join(TEMP_DIR);
        let mut removed = Vec::new();
        let mut entries = match tokio::fs::read_dir(&temp_dir).await {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
            Err(err) => return Err(self.io("list", TEMP_DIR)(err)),
        };
        while let Some(entry) = entries.next_entry().await.map_err(self.io("list", TEMP_DIR))? {
            let path = entry.path();
            if self.active.lock().unwrap_or_else(|p| p.into_inner()).contains(&path) {
                continue;
            }
            tokio::fs::remove_file(&path)
                .await
                .map_err(self.io("remove partial file", TEMP_DIR))?;
            removed.push(format!("partial file {}", path.display()));
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;

    #[tokio::test]
    async fn put_get_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().to_path_buf());
        let meta = BTreeMap::from([("kind".to_string(), "test".to_string())]);
        let info = store.put("a/b/one", &mut &b"hello"[..], meta.clone()).await.unwrap();
        assert_eq!(info.size, 5);
        assert_eq!(
            info.sha256,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        store.put("a/two", &mut &b"x"[..], BTreeMap::new()).await.unwrap();
        store.put("b/three", &mut &b"y"[..], BTreeMap::new()).await.unwrap();

        let mut out = Vec::new();
        let got = store.get("a/b/one", &mut out).await.unwrap();
        assert_eq!(out, b"hello");
        assert_eq!(got.metadata, meta);
        let keys: Vec<_> = store.list("a/").await.unwrap().into_iter().map(|i| i.key).collect();
        assert_eq!(keys, ["a/b/one", "a/two"]);

        store.delete("a/b/one").await.unwrap();
        assert_eq!(store.head("a/b/one").await.unwrap(), None);
        assert!(matches!(
            store.get("a/b/one", &mut Vec::new()).await,
            Err(ObjectStoreError::NotFound { .. })
        ));
    }

    /// A body that fails half-way, as an upload source that dies would.
    struct FailingBody(usize);
    impl AsyncRead for FailingBody {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            if self.0 == 0 {
                return Poll::Ready(Err(std::io::Error::other("source died")));
            }
            self.0 -= 1;
            buf.put_slice(b"partial data");
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_failed_put_leaves_no_object_and_keeps_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().to_path_buf());
        store.put("k", &mut &b"old"[..], BTreeMap::new()).await.unwrap();
        assert!(store.put("k", &mut FailingBody(3), BTreeMap::new()).await.is_err());
        assert!(store.put("new", &mut FailingBody(3), BTreeMap::new()).await.is_err());
        let mut out = Vec::new();
        store.get("k", &mut out).await.unwrap();
        assert_eq!(out, b"old");
        assert_eq!(store.head("new").await.unwrap(), None);
        let leftovers = std::fs::read_dir(dir.path().join(TEMP_DIR)).unwrap().count();
        assert_eq!(leftovers, 0, "partial files must be cleaned up");
        let keys: Vec<_> = store.list("").await.unwrap().into_iter().map(|i| i.key).collect();
        assert_eq!(keys, ["k"]);
    }

    #[tokio::test]
    async fn recover_removes_partial_files_left_by_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().to_path_buf());
        store.put("k", &mut &b"data"[..], BTreeMap::new()).await.unwrap();
        std::fs::write(dir.path().join(TEMP_DIR).join("put-crashed"), b"half").unwrap();
        let removed = store.recover().await.unwrap();
        assert_eq!(removed.len(), 1, "{removed:?}");
        assert_eq!(std::fs::read_dir(dir.path().join(TEMP_DIR)).unwrap().count(), 0);
        assert!(store.head("k").await.unwrap().is_some(), "complete objects stay");
        assert!(store.recover().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn recover_leaves_a_put_in_flight_alone() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().to_path_buf());
        let (mut tx, mut rx) = tokio::io::duplex(64);
        let put = store.put("k", &mut rx, BTreeMap::new());
        let other = async {
            tx.write_all(b"first ").await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            assert!(
                store.recover().await.unwrap().is_empty(),
                "nothing of a live put is removed"
            );
            tx.write_all(b"second").await.unwrap();
            drop(tx);
        };
        let (info, ()) = tokio::join!(put, other);
        assert_eq!(info.unwrap().size, 12);
    }

    #[tokio::test]
    async fn keys_cannot_escape_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().join("root"));
        for key in ["../evil", "a/../../b", "/abs", "", "a//b", ".pa-partial/x"] {
            assert!(
                matches!(
                    store.put(key, &mut &b""[..], BTreeMap::new()).await,
                    Err(ObjectStoreError::InvalidKey { .. })
                ),
                "{key}"
            );
        }
    }
}
