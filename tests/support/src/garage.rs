//! Garage, a real self-hosted S3 store (the usual MinIO alternative), as a
//! single node: the realistic tier beside s3s-fs. Unlike s3s-fs it keeps
//! multipart uploads in its own metadata and lists them
//! (ListMultipartUploads), and it answers with its own idea of S3 errors.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use tempfile::TempDir;

use crate::s3::{signed_request, S3Response};
use crate::{fixture_binary, fixture_paths, free_port, kill_child, log_tail, random_u64, run, spawn_server};

const START_TIMEOUT: Duration = Duration::from_secs(60);
const KEY_NAME: &str = "platform-agent-tests";

/// A single-node Garage on free loopback ports, with one access key that
/// owns every bucket made by [`Garage::create_bucket`]. Killed and removed
/// on drop.
pub struct Garage {
    tmp: TempDir,
    bin: PathBuf,
    config: PathBuf,
    log: PathBuf,
    s3_port: u16,
    access_key: String,
    secret_key: String,
    child: Option<Child>,
}

impl Garage {
    /// Starts Garage, assigns this node the whole layout, imports the access
    /// key; ready for [`Garage::create_bucket`] when it returns.
    pub fn start() -> Garage {
        let bin = fixture_binary(fixture_paths().garage_bin.as_ref().unwrap_or_else(|| {
            panic!("GARAGE_BIN is not in the fixtures' env file; run `sudo bash tests/fixtures/install-garage.sh`")
        }));
        let tmp = tempfile::Builder::new()
            .prefix("pa-testsupport-garage-")
            .tempdir()
            .expect("create temp dir for garage");
        let (s3_port, rpc_port) = (free_port(), free_port());
        let config = tmp.path().join("garage.toml");
        std::fs::write(
            &config,
            format!(
                "metadata_dir = \"{meta}\"\ndata_dir = \"{data}\"\ndb_engine = \"sqlite\"\n\
                 replication_factor = 1\n\
                 rpc_bind_addr = \"127.0.0.1:{rpc_port}\"\nrpc_public_addr = \"127.0.0.1:{rpc_port}\"\n\
                 rpc_secret = \"{secret}\"\n\
                 [s3_api]\ns3_region = \"us-east-1\"\napi_bind_addr = \"127.0.0.1:{s3_port}\"\n",
                meta = tmp.path().join("meta").display(),
                data = tmp.path().join("data").display(),
                secret = hex32(),
            ),
        )
        .expect("write garage.toml");
        let mut garage = Garage {
            log: tmp.path().join("garage.log"),
            tmp,
            bin,
            config,
            s3_port,
            // Garage's own key format: GK + 24 hex digits, 64 hex digits secret.
            access_key: format!("GK{}", &hex32()[..24]),
            secret_key: hex32(),
            child: None,
        };
        garage.start_again();
        let node = garage.cli(&["node", "id", "-q"]);
        let node = node.trim().split('@').next().unwrap_or_default().to_string();
        garage.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]);
        garage.cli(&["layout", "apply", "--version", "1"]);
        garage.cli(&[
            "key",
            "import",
            "--yes",
            "-n",
            KEY_NAME,
            &garage.access_key,
            &garage.secret_key,
        ]);
        garage
    }

    /// Runs the garage CLI against this node; panics with its output on failure.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = run(Command::new(&self.bin).arg("-c").arg(&self.config).args(args))
            .unwrap_or_else(|e| panic!("{e}\n{}", log_tail(&self.log, 3000)));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `http://127.0.0.1:PORT` (path-style addressing, region `us-east-1`).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Creates the bucket and gives the test key read, write and owner rights.
    pub fn create_bucket(&self, name: &str) {
        self.cli(&["bucket", "create", name]);
        self.cli(&[
            "bucket", "allow", "--read", "--write", "--owner", name, "--key", KEY_NAME,
        ]);
    }

    /// A request signed with the test key; panics if no HTTP answer came.
    pub fn request(&self, method: &str, path_and_query: &str, body: Option<&[u8]>) -> S3Response {
        signed_request(
            &self.endpoint(),
            method,
            path_and_query,
            body,
            &self.access_key,
            &self.secret_key,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Upload ids of the bucket's multipart uploads in flight
    /// (ListMultipartUploads).
    pub fn pending_uploads(&self, bucket: &str) -> Vec<String> {
        // `uploads=`, not `uploads`: curl signs the bare form differently
        // from how Garage canonicalises it (403 Invalid signature).
        let resp = self.request("GET", &format!("/{bucket}?uploads="), None);
        assert!(
            resp.is_success(),
            "ListMultipartUploads {bucket}: HTTP {}: {}",
            resp.status,
            resp.text()
        );
        resp.text()
            .split("<UploadId>")
            .skip(1)
            .filter_map(|rest| rest.split("</UploadId>").next())
            .map(str::to_string)
            .collect()
    }

    /// Kills the server (SIGKILL); metadata and data stay.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_child(&mut child);
        }
    }

    /// Starts the stopped server again on the same ports and data; returns
    /// once its S3 API answers. No-op while it runs.
    pub fn start_again(&mut self) {
        if self.child.is_some() {
            return;
        }
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-c")
            .arg(&self.config)
            .arg("server")
            .env("RUST_LOG", "garage=warn")
            .current_dir(self.tmp.path());
        // The S3 API answers (an error to an anonymous request) once the
        // server is up.
        let endpoint = self.endpoint();
        self.child = Some(spawn_server("garage", &mut cmd, &self.log, START_TIMEOUT, || {
            Command::new("curl")
                .args(["-s", "-o", "/dev/null", "--noproxy", "*", "--max-time", "2"])
                .arg(&endpoint)
                .status()
                .is_ok_and(|s| s.success())
        }));
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.stop();
    }
}

fn hex32() -> String {
    format!(
        "{:016x}{:016x}{:016x}{:016x}",
        random_u64(),
        random_u64(),
        random_u64(),
        random_u64()
    )
}
