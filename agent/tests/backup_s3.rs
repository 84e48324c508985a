//! The S3 object store against two real S3 servers, each test once per
//! server: s3s-fs (checks signatures and payload hashes, refuses parts under
//! 5 MiB) and Garage (a real self-hosted store that keeps and lists multipart
//! uploads): streaming multipart uploads with the SHA-256 in the object's
//! metadata, nothing under the key after a failed upload, and the multipart
//! journal that lets a restart abort what a crash left behind.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use platform_agent::backup::Catalog;
use platform_agent::config::S3Settings;
use platform_agent::objstore::{ObjectStore, OpenOptions, S3Store, UploadJournal};
use platform_agent::store::Store;
use platform_agent_testsupport::{Garage, S3Fixture, S3Server};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, ReadBuf};

const BUCKET: &str = "backups";

struct Setup<S> {
    s3: S,
    _dir: tempfile::TempDir,
    catalog: Catalog,
    store: S3Store,
}

fn setup<S: S3Fixture>(s3: S, prefix: &str) -> Setup<S> {
    s3.create_bucket(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("access_key");
    let secret_file = dir.path().join("secret_key");
    std::fs::write(&key_file, format!("{}\n", s3.access_key())).unwrap();
    std::fs::write(&secret_file, s3.secret_key()).unwrap();
    let catalog = Catalog::new(Store::open(&dir.path().join("state")).unwrap());
    let settings = S3Settings {
        endpoint: s3.endpoint(),
        region: "us-east-1".into(),
        bucket: BUCKET.into(),
        prefix: prefix.into(),
        path_style: true,
        access_key_id_file: key_file,
        secret_access_key_file: secret_file,
    };
    let store = S3Store::new(
        &settings,
        OpenOptions {
            journal: Some(Arc::new(catalog.clone())),
            part_size: 5 * 1024 * 1024,
        },
    )
    .unwrap();
    Setup {
        s3,
        _dir: dir,
        catalog,
        store,
    }
}

/// Incompressible test data.
fn random_bytes(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut block = Sha256::digest(b"seed").to_vec();
    while out.len() < len {
        block = Sha256::digest(&block).to_vec();
        out.extend_from_slice(&block);
    }
    out.truncate(len);
    out
}

/// Each test body once per server.
macro_rules! on_both_servers {
    ($($body:ident),* $(,)?) => {
        mod s3s_fs {
            $(#[tokio::test]
            async fn $body() {
                super::$body(super::S3Server::start()).await
            })*
        }
        // The realistic tier: Garage takes 10-15 minutes to build, so
        // tests/run-all.sh builds it and runs these last, with --ignored.
        mod garage {
            $(#[tokio::test]
            #[ignore = "realistic tier (Garage): tests/run-all.sh runs it after tests/fixtures/install-garage.sh"]
            async fn $body() {
                super::$body(super::Garage::start()).await
            })*
        }
    };
}

on_both_servers!(
    multipart_upload_streams_and_records_the_sha256,
    a_failed_body_aborts_the_upload_and_leaves_no_object,
    recover_aborts_what_a_crash_left_in_flight,
    an_unreachable_server_keeps_the_journal_entry_for_later,
    recover_leaves_an_upload_in_flight_alone,
);

async fn multipart_upload_streams_and_records_the_sha256<S: S3Fixture>(s3: S) {
    let setup = setup(s3, "node1/");
    let data = random_bytes(12 * 1024 * 1024 + 12345);
    let meta = BTreeMap::from([("pa-job".to_string(), "pg".to_string())]);
    let info = setup
        .store
        .put("pg/app/one.pgdump", &mut &data[..], meta)
        .await
        .unwrap();
    let expected = hex::encode(Sha256::digest(&data));
    assert_eq!(info.size, data.len() as u64);
    assert_eq!(info.sha256, expected);

    // The object sits under the prefix, complete, as the server serves it.
    let stored = setup.s3.get_object(BUCKET, "node1/pg/app/one.pgdump").unwrap();
    assert_eq!(hex::encode(Sha256::digest(&stored)), expected);

    let head = setup.store.head("pg/app/one.pgdump").await.unwrap().unwrap();
    assert_eq!(head.sha256, expected, "SHA-256 is in the object's metadata");
    assert_eq!(head.metadata.get("pa-job").map(String::as_str), Some("pg"));
    assert_eq!(head.size, data.len() as u64);

    let mut back = Vec::new();
    let got = setup.store.get("pg/app/one.pgdump", &mut back).await.unwrap();
    assert_eq!(back, data);
    assert_eq!(got.sha256, expected);

    let small = setup
        .store
        .put("pg/app/two.pgdump", &mut &b"tiny"[..], BTreeMap::new())
        .await
        .unwrap();
    assert_eq!(small.sha256, hex::encode(Sha256::digest(b"tiny")));
    let keys: Vec<String> = setup
        .store
        .list("pg/")
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.key)
        .collect();
    assert_eq!(keys, ["pg/app/one.pgdump", "pg/app/two.pgdump"]);

    setup.store.delete("pg/app/one.pgdump").await.unwrap();
    assert!(setup.store.head("pg/app/one.pgdump").await.unwrap().is_none());
    assert!(setup.s3.pending_uploads(BUCKET).is_empty());
    assert!(
        setup.catalog.pending().await.unwrap().is_empty(),
        "journal is empty after success"
    );
}

/// A body that yields `good` bytes, then fails, as a dying pg_dump would.
struct FailingBody {
    data: Vec<u8>,
    pos: usize,
}

impl AsyncRead for FailingBody {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.pos >= self.data.len() {
            return Poll::Ready(Err(std::io::Error::other("pg_dump died")));
        }
        let n = buf.remaining().min(self.data.len() - self.pos).min(64 * 1024);
        let start = self.pos;
        buf.put_slice(&self.data[start..start + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

async fn a_failed_body_aborts_the_upload_and_leaves_no_object<S: S3Fixture>(s3: S) {
    let setup = setup(s3, "");
    let mut body = FailingBody {
        data: random_bytes(11 * 1024 * 1024),
        pos: 0,
    };
    let err = setup
        .store
        .put("files/x.tar", &mut body, BTreeMap::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("pg_dump died"), "{err}");
    assert!(setup.store.head("files/x.tar").await.unwrap().is_none());
    assert!(setup.s3.get_object(BUCKET, "files/x.tar").is_none());
    assert_eq!(
        setup.s3.pending_uploads(BUCKET),
        Vec::<String>::new(),
        "the multipart upload was aborted"
    );
    assert!(setup.catalog.pending().await.unwrap().is_empty());
}

/// Never ends: the upload stays in flight until the future is dropped.
struct EndlessBody(usize);

impl AsyncRead for EndlessBody {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.0 == 0 {
            return Poll::Pending;
        }
        let n = buf.remaining().min(self.0).min(64 * 1024);
        buf.put_slice(&vec![7u8; n]);
        self.0 -= n;
        Poll::Ready(Ok(()))
    }
}

async fn recover_aborts_what_a_crash_left_in_flight<S: S3Fixture>(s3: S) {
    let setup = setup(s3, "");
    // Two parts' worth, then the source hangs; dropping the future stands
    // in for the agent being killed: nothing runs the abort.
    let mut body = EndlessBody(10 * 1024 * 1024 + 1);
    let put = setup.store.put("k3s/sqlite/x.tar", &mut body, BTreeMap::new());
    let _ = tokio::time::timeout(std::time::Duration::from_secs(3), put).await;
    assert_eq!(
        setup.catalog.pending().await.unwrap().len(),
        1,
        "recorded before the first part"
    );
    assert!(
        !setup.s3.pending_uploads(BUCKET).is_empty(),
        "the upload is on the server"
    );

    let removed = setup.store.recover().await.unwrap();
    assert_eq!(removed.len(), 1, "{removed:?}");
    assert!(setup.s3.pending_uploads(BUCKET).is_empty(), "aborted on the server");
    assert!(setup.catalog.pending().await.unwrap().is_empty());
    assert!(setup.store.head("k3s/sqlite/x.tar").await.unwrap().is_none());
}

async fn an_unreachable_server_keeps_the_journal_entry_for_later<S: S3Fixture>(s3: S) {
    let mut setup = setup(s3, "");
    let mut body = EndlessBody(6 * 1024 * 1024);
    let put = setup.store.put("x/y", &mut body, BTreeMap::new());
    let _ = tokio::time::timeout(std::time::Duration::from_secs(3), put).await;
    setup.s3.stop();
    assert!(setup.store.recover().await.is_err(), "no server: nothing aborted");
    assert_eq!(setup.catalog.pending().await.unwrap().len(), 1, "kept for the next try");
    setup.s3.start_again();
    assert_eq!(setup.store.recover().await.unwrap().len(), 1);
    assert!(setup.s3.pending_uploads(BUCKET).is_empty());
}

async fn recover_leaves_an_upload_in_flight_alone<S: S3Fixture>(s3: S) {
    use tokio::io::AsyncWriteExt;
    let setup = setup(s3, "");
    let data = random_bytes(7 * 1024 * 1024);
    let (mut tx, mut rx) = tokio::io::duplex(64 * 1024);
    let put = setup.store.put("files/live.tar", &mut rx, BTreeMap::new());
    let other = async {
        tx.write_all(&data[..6 * 1024 * 1024]).await.unwrap();
        // The first part is on its way: the upload is journaled.
        for _ in 0..100 {
            if !setup.catalog.pending().await.unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(setup.catalog.pending().await.unwrap().len(), 1);
        assert!(
            setup.store.recover().await.unwrap().is_empty(),
            "another run's upload is not aborted"
        );
        tx.write_all(&data[6 * 1024 * 1024..]).await.unwrap();
        drop(tx);
    };
    let (info, ()) = tokio::join!(put, other);
    assert_eq!(info.unwrap().sha256, hex::encode(Sha256::digest(&data)));
    assert!(setup.catalog.pending().await.unwrap().is_empty());
}
