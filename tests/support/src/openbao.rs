use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use serde_json::{json, Value};
use tempfile::TempDir;

use crate::{fixture_binary, fixture_paths, free_port_pair, kill_child, log_tail, spawn_server, wait_for};

const START_TIMEOUT: Duration = Duration::from_secs(60);
const ROLE_NAME: &str = "platform-agent";
const POLICY_NAME: &str = "platform-agent-snapshot";
const POLICY: &str = r#"
path "sys/storage/raft/snapshot" {
  capabilities = ["read"]
}
path "sys/storage/raft/snapshot-force" {
  capabilities = ["update"]
}
"#;

/// A real single-node OpenBao server with integrated (raft) storage, not dev
/// mode, so raft snapshots exist. After `start()` it is initialised (one
/// unseal key, threshold one), unsealed and active, has a KV v2 engine at
/// `secret/`, and an AppRole role whose policy may read
/// `sys/storage/raft/snapshot` and update `sys/storage/raft/snapshot-force`.
pub struct OpenBao {
    tmp: TempDir,
    bin: PathBuf,
    config: PathBuf,
    log: PathBuf,
    port: u16,
    addr: String,
    child: Option<Child>,
    http: ureq::Agent,
    root_token: String,
    unseal_key: String,
    role_id: String,
    secret_id: String,
}

impl OpenBao {
    /// Starts, initialises, unseals and configures the server (about 2-3 s).
    pub fn start() -> OpenBao {
        let bin = fixture_binary(&fixture_paths().bao_bin);
        let tmp = tempfile::Builder::new()
            .prefix("pa-testsupport-openbao-")
            .tempdir()
            .expect("create temp dir for openbao");
        let raft_dir = tmp.path().join("raft");
        std::fs::create_dir(&raft_dir).expect("create raft dir");
        let port = free_port_pair();
        let cluster_port = port + 1;
        let addr = format!("http://127.0.0.1:{port}");
        let config = tmp.path().join("config.hcl");
        // performance_multiplier = 1 makes raft's timeouts the short
        // production ones: leader election takes about 2 s instead of 10 s.
        let hcl = format!(
            r#"storage "raft" {{
  path = "{raft}"
  node_id = "node1"
  performance_multiplier = 1
}}

listener "tcp" {{
  address = "127.0.0.1:{port}"
  cluster_address = "127.0.0.1:{cluster_port}"
  tls_disable = true
}}

api_addr = "{addr}"
cluster_addr = "https://127.0.0.1:{cluster_port}"
disable_mlock = true
ui = false
log_level = "info"
"#,
            raft = raft_dir.display()
        );
        std::fs::write(&config, hcl).expect("write openbao config");
        let http = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .proxy(None)
                .timeout_global(Some(Duration::from_secs(30)))
                .build(),
        );
        let log = tmp.path().join("bao.log");
        let mut bao = OpenBao {
            tmp,
            bin,
            config,
            log,
            port,
            addr,
            child: None,
            http,
            root_token: String::new(),
            unseal_key: String::new(),
            role_id: String::new(),
            secret_id: String::new(),
        };
        bao.spawn();

        let (status, init) = bao.request(
            "PUT",
            "sys/init",
            None,
            Some(&json!({"secret_shares": 1, "secret_threshold": 1})),
        );
        bao.expect_ok(status, &init, "sys/init");
        bao.unseal_key = init["keys_base64"][0]
            .as_str()
            .expect("init: keys_base64[0]")
            .to_owned();
        bao.root_token = init["root_token"].as_str().expect("init: root_token").to_owned();
        bao.unseal_and_wait_active();
        bao.configure();
        bao
    }

    /// `http://127.0.0.1:PORT`, the API address (BAO_ADDR / VAULT_ADDR).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// API port; the cluster port is `port() + 1`.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn root_token(&self) -> &str {
        &self.root_token
    }

    /// The single unseal key (base64), also needed to unseal a cluster that
    /// was restored from this one's snapshot.
    pub fn unseal_key(&self) -> &str {
        &self.unseal_key
    }

    /// Name of the AppRole role (mounted at `auth/approle`).
    pub fn role_name(&self) -> &str {
        ROLE_NAME
    }

    /// Name of the ACL policy attached to the role.
    pub fn policy_name(&self) -> &str {
        POLICY_NAME
    }

    pub fn role_id(&self) -> &str {
        &self.role_id
    }

    pub fn secret_id(&self) -> &str {
        &self.secret_id
    }

    /// The `bao` binary (usable as a CLI with `BAO_ADDR` and `BAO_TOKEN`).
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// Raft storage directory.
    pub fn data_dir(&self) -> PathBuf {
        self.tmp.path().join("raft")
    }

    /// The server's log (stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Writes `data` (a JSON object) as a new version of the KV v2 secret at
    /// `secret/<path>`; returns the version number.
    ///
    /// # Panics
    /// If OpenBao does not answer 200.
    pub fn kv_put(&self, path: &str, data: &Value) -> u64 {
        let api = format!("secret/data/{}", path.trim_start_matches('/'));
        let (status, body) = self.request("POST", &api, Some(&self.root_token), Some(&json!({ "data": data })));
        self.expect_ok(status, &body, &api);
        body["data"]["version"].as_u64().unwrap_or(0)
    }

    /// The latest version's data of the KV v2 secret at `secret/<path>`, or
    /// `None` if there is none.
    pub fn kv_get(&self, path: &str) -> Option<Value> {
        let api = format!("secret/data/{}", path.trim_start_matches('/'));
        let (status, body) = self.request("GET", &api, Some(&self.root_token), None);
        match status {
            200 => Some(body["data"]["data"].clone()),
            404 => None,
            _ => panic!("GET {api}: HTTP {status}: {body}"),
        }
    }

    /// Logs in with the role's role_id and secret_id; returns the client token.
    pub fn approle_login(&self) -> String {
        let (status, body) = self.request(
            "POST",
            "auth/approle/login",
            None,
            Some(&json!({"role_id": self.role_id, "secret_id": self.secret_id})),
        );
        self.expect_ok(status, &body, "auth/approle/login");
        body["auth"]["client_token"]
            .as_str()
            .expect("login: auth.client_token")
            .to_owned()
    }

    /// A JSON API call: `path` is relative to `/v1/`. Returns the status and
    /// the parsed body (`Value::Null` when the body is empty or not JSON).
    ///
    /// # Panics
    /// If the server cannot be reached at all.
    pub fn request(&self, method: &str, path: &str, token: Option<&str>, body: Option<&Value>) -> (u16, Value) {
        let bytes = body.map(|b| serde_json::to_vec(b).expect("serialize body"));
        let (status, raw) = self
            .try_raw(method, path, token, bytes)
            .unwrap_or_else(|e| panic!("{method} {}/v1/{path}: {e}\n{}", self.addr, log_tail(&self.log, 3000)));
        (status, serde_json::from_slice(&raw).unwrap_or(Value::Null))
    }

    /// A GET returning the raw body, e.g. `sys/storage/raft/snapshot`.
    pub fn get_bytes(&self, path: &str, token: &str) -> (u16, Vec<u8>) {
        self.try_raw("GET", path, Some(token), None)
            .unwrap_or_else(|e| panic!("GET {}/v1/{path}: {e}", self.addr))
    }

    /// A raw API call; `Err` only when no HTTP answer came back.
    pub fn try_raw(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Vec<u8>), String> {
        let url = format!("{}/v1/{}", self.addr, path.trim_start_matches('/'));
        let mut req = ureq::http::Request::builder().method(method).uri(&url);
        if let Some(t) = token {
            req = req.header("X-Vault-Token", t);
        }
        let mut resp = match body {
            Some(b) => {
                let req = req
                    .header("Content-Type", "application/json")
                    .body(b)
                    .map_err(|e| e.to_string())?;
                self.http.run(req)
            }
            None => self.http.run(req.body(()).map_err(|e| e.to_string())?),
        }
        .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        // Snapshots exceed ureq's default 10 MB body limit in larger tests.
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(u64::MAX)
            .read_to_vec()
            .map_err(|e| e.to_string())?;
        Ok((status, bytes))
    }

    /// Kills the server (SIGKILL); the raft data stays. Also usable to make
    /// the API unreachable in fault tests.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_child(&mut child);
        }
    }

    /// Starts the stopped server again on the same ports and data, unseals it
    /// with the fixture's key and waits until it is active. No-op while it runs.
    pub fn start_again(&mut self) {
        if self.child.is_some() {
            return;
        }
        self.spawn();
        self.unseal_and_wait_active();
    }

    /// Unseals with `key` (for example after a snapshot-force restore from
    /// another cluster, which seals this one with that cluster's keys).
    pub fn unseal_with(&self, key: &str) -> Value {
        let (status, body) = self.request("PUT", "sys/unseal", None, Some(&json!({ "key": key })));
        self.expect_ok(status, &body, "sys/unseal");
        body
    }

    /// Polls `sys/health` until it reports initialised, unsealed and active
    /// (HTTP 200).
    pub fn wait_active(&self) {
        let ok = wait_for(START_TIMEOUT, || {
            matches!(self.try_raw("GET", "sys/health", None, None), Ok((200, _))).then_some(())
        });
        if ok.is_none() {
            panic!(
                "openbao at {} not active after {START_TIMEOUT:?}\n{}",
                self.addr,
                log_tail(&self.log, 4000)
            );
        }
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("server")
            .arg(format!("-config={}", self.config.display()))
            .current_dir(self.tmp.path())
            .env_remove("BAO_ADDR")
            .env_remove("VAULT_ADDR");
        // Any HTTP answer (501 uninitialised, 503 sealed) means the listener
        // is up.
        let what = format!("bao server on {}", self.addr);
        let child = spawn_server(&what, &mut cmd, &self.log, START_TIMEOUT, || {
            self.try_raw("GET", "sys/health", None, None).is_ok()
        });
        self.child = Some(child);
    }

    fn unseal_and_wait_active(&self) {
        let key = self.unseal_key.clone();
        self.unseal_with(&key);
        self.wait_active();
    }

    fn configure(&mut self) {
        let token = self.root_token.clone();
        let t = Some(token.as_str());
        let calls: [(&str, &str, Value); 4] = [
            (
                "POST",
                "sys/mounts/secret",
                json!({"type": "kv", "options": {"version": "2"}}),
            ),
            ("POST", "sys/auth/approle", json!({"type": "approle"})),
            (
                "PUT",
                &format!("sys/policies/acl/{POLICY_NAME}"),
                json!({ "policy": POLICY }),
            ),
            (
                "POST",
                &format!("auth/approle/role/{ROLE_NAME}"),
                json!({"token_policies": [POLICY_NAME], "token_ttl": "1h", "token_max_ttl": "4h"}),
            ),
        ];
        for (method, path, body) in &calls {
            let (status, resp) = self.request(method, path, t, Some(body));
            self.expect_ok(status, &resp, path);
        }
        let (status, resp) = self.request("GET", &format!("auth/approle/role/{ROLE_NAME}/role-id"), t, None);
        self.expect_ok(status, &resp, "role-id");
        self.role_id = resp["data"]["role_id"].as_str().expect("data.role_id").to_owned();
        let (status, resp) = self.request("POST", &format!("auth/approle/role/{ROLE_NAME}/secret-id"), t, None);
        self.expect_ok(status, &resp, "secret-id");
        self.secret_id = resp["data"]["secret_id"].as_str().expect("data.secret_id").to_owned();

        // A new KV v2 mount answers "Upgrading from non-versioned to
        // versioned data" for a moment; tests should not see that.
        let ready = wait_for(START_TIMEOUT, || {
            let (status, _) = self.request("GET", "secret/config", t, None);
            (status == 200).then_some(())
        });
        if ready.is_none() {
            panic!("kv v2 at secret/ not ready\n{}", log_tail(&self.log, 4000));
        }
    }

    fn expect_ok(&self, status: u16, body: &Value, what: &str) {
        if !(200..300).contains(&status) {
            panic!("openbao {what}: HTTP {status}: {body}\n{}", log_tail(&self.log, 3000));
        }
    }
}

impl Drop for OpenBao {
    fn drop(&mut self) {
        self.stop();
    }
}
