use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tempfile::TempDir;

use crate::{fixture_binary, fixture_paths, free_port, kill_child, port_accepts, random_u64, spawn_server};

const START_TIMEOUT: Duration = Duration::from_secs(30);
const REGION: &str = "us-east-1";

/// Status and body of one S3 request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl S3Response {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body as text (S3 errors are XML).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A real S3 server (s3s-fs) on 127.0.0.1 with random credentials, serving a
/// data directory in which each bucket is a directory and each object a file.
///
/// It checks SigV4 signatures and payload hashes (path-style requests,
/// region `us-east-1`). Its own quirk: PutObject into a bucket that does not
/// exist creates it instead of answering NoSuchBucket.
///
/// [`S3Server::request`] signs requests with curl's `--aws-sigv4`, so tests
/// need no S3 client of their own to set up or check data.
pub struct S3Server {
    tmp: TempDir,
    bin: PathBuf,
    data_dir: PathBuf,
    log: PathBuf,
    port: u16,
    access_key: String,
    secret_key: String,
    child: Option<Child>,
}

impl S3Server {
    /// Starts s3s-fs on a free port with an empty data directory.
    pub fn start() -> S3Server {
        let bin = fixture_binary(&fixture_paths().s3s_fs_bin);
        let tmp = tempfile::Builder::new()
            .prefix("pa-testsupport-s3-")
            .tempdir()
            .expect("create temp dir for s3s-fs");
        let data_dir = tmp.path().join("data");
        std::fs::create_dir(&data_dir).expect("create s3 data dir");
        let log = tmp.path().join("s3s-fs.log");
        let mut s3 = S3Server {
            bin,
            data_dir,
            log,
            port: free_port(),
            access_key: format!("AK{:016X}", random_u64()),
            secret_key: format!("{:016x}{:016x}", random_u64(), random_u64()),
            child: None,
            tmp,
        };
        s3.start_again();
        s3
    }

    /// `http://127.0.0.1:PORT` (use path-style addressing).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Always `us-east-1`.
    pub fn region(&self) -> &str {
        REGION
    }

    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    /// The served directory: `<data_dir>/<bucket>/<key>` holds each object.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server's log (stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Creates a bucket with a signed CreateBucket request.
    ///
    /// # Panics
    /// If the server does not answer 2xx.
    pub fn create_bucket(&self, name: &str) {
        let resp = self.request("PUT", &format!("/{name}"), None);
        assert!(
            resp.is_success(),
            "CreateBucket {name}: HTTP {}: {}",
            resp.status,
            resp.text()
        );
    }

    /// PutObject; panics unless the server answers 2xx.
    pub fn put_object(&self, bucket: &str, key: &str, body: &[u8]) {
        let resp = self.request("PUT", &format!("/{bucket}/{key}"), Some(body));
        assert!(
            resp.is_success(),
            "PutObject {bucket}/{key}: HTTP {}: {}",
            resp.status,
            resp.text()
        );
    }

    /// GetObject: `Some(bytes)`, or `None` when the server answers 404.
    pub fn get_object(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let resp = self.request("GET", &format!("/{bucket}/{key}"), None);
        match resp.status {
            200 => Some(resp.body),
            404 => None,
            s => panic!("GetObject {bucket}/{key}: HTTP {s}: {}", resp.text()),
        }
    }

    /// A request signed with the server's credentials. `path_and_query`
    /// starts with `/` (`/bucket/key`, `/bucket?list-type=2`).
    ///
    /// # Panics
    /// If no HTTP answer comes back (server stopped, say); see
    /// [`S3Server::try_request_as`] to observe that.
    pub fn request(&self, method: &str, path_and_query: &str, body: Option<&[u8]>) -> S3Response {
        self.try_request_as(method, path_and_query, body, &self.access_key, &self.secret_key)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// A request signed with the given credentials (wrong ones to test
    /// rejection). `Err` when no HTTP answer came back.
    pub fn try_request_as(
        &self,
        method: &str,
        path_and_query: &str,
        body: Option<&[u8]>,
        access_key: &str,
        secret_key: &str,
    ) -> Result<S3Response, String> {
        signed_request(&self.endpoint(), method, path_and_query, body, access_key, secret_key)
    }

    /// Multipart uploads in flight: s3s-fs keeps an `.upload-<id>.json` (or
    /// `.upload_id-`) file per upload in its data directory, whatever the
    /// bucket (it has no ListMultipartUploads).
    pub fn pending_uploads(&self, _bucket: &str) -> Vec<String> {
        std::fs::read_dir(&self.data_dir)
            .expect("read the s3s-fs data dir")
            .map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with(".upload-") || name.starts_with(".upload_id-"))
            .collect()
    }

    /// Kills the server (SIGKILL), as a crash or network loss would look to
    /// a client mid-upload: the port then refuses connections. The data
    /// directory stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_child(&mut child);
        }
    }

    /// Starts the server again on the same port, credentials and data
    /// directory; returns once it accepts connections. No-op while it runs.
    pub fn start_again(&mut self) {
        if self.child.is_some() {
            return;
        }
        let mut cmd = Command::new(&self.bin);
        cmd.args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", &self.access_key, "--secret-key", &self.secret_key])
            .arg(&self.data_dir)
            .current_dir(self.tmp.path());
        // s3s-fs accepts as soon as it listens.
        let what = format!("s3s-fs on port {}", self.port);
        let port = self.port;
        self.child = Some(spawn_server(&what, &mut cmd, &self.log, START_TIMEOUT, || {
            port_accepts(port)
        }));
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One S3 request signed (SigV4, region `us-east-1`) by curl's `--aws-sigv4`
/// with the given credentials; `Err` when no HTTP answer came back. Serves
/// every S3 fixture, so tests need no S3 client of their own.
pub(crate) fn signed_request(
    endpoint: &str,
    method: &str,
    path_and_query: &str,
    body: Option<&[u8]>,
    access_key: &str,
    secret_key: &str,
) -> Result<S3Response, String> {
    let url = format!("{endpoint}{path_and_query}");
    let payload = body.unwrap_or(&[]);
    // s3s insists on x-amz-content-sha256, which this curl's SigV4 does
    // not add; curl signs the headers it is given, this one included.
    let digest = hex(&Sha256::digest(payload));
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--noproxy", "*", "--max-time", "60", "-X", method])
        .args(["--aws-sigv4", &format!("aws:amz:{REGION}:s3")])
        .args(["--user", &format!("{access_key}:{secret_key}")])
        .args(["-H", &format!("x-amz-content-sha256: {digest}")])
        // Status on stderr keeps stdout for the body alone.
        .args(["-w", "%{stderr}\nHTTP_STATUS=%{http_code}\n"]);
    if body.is_some() {
        cmd.args(["--data-binary", "@-", "-H", "Content-Type: application/octet-stream"]);
    }
    cmd.arg(&url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("cannot run curl: {e}"))?;
    let mut stdin = child.stdin.take().expect("curl stdin");
    // Feed the body from another thread: curl may start answering (and
    // fill the stdout pipe) before it has read all of it.
    let payload_owned = payload.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&payload_owned);
    });
    let out = child.wait_with_output().map_err(|e| format!("curl: {e}"))?;
    let _ = writer.join();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let status = stderr
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("HTTP_STATUS="))
        .and_then(|s| s.trim().parse::<u16>().ok())
        .unwrap_or(0);
    if !out.status.success() || status == 0 {
        return Err(format!(
            "{method} {url}: no HTTP answer ({}): {}",
            out.status,
            stderr.trim()
        ));
    }
    Ok(S3Response {
        status,
        body: out.stdout,
    })
}
