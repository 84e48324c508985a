//! Runs the real `platform-agent` binary as a daemon for integration tests,
//! listening on its own sd_notify socket the way systemd does.

#![allow(dead_code)]

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_platform-agent");

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Polls `condition` until it returns Some or the deadline passes.
pub fn wait_for<T>(what: &str, deadline: Duration, mut condition: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = condition() {
            return value;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub child: Child,
    pub notify: UnixDatagram,
    /// Every sd_notify datagram received so far.
    pub notifications: Vec<String>,
    pub config_dir: PathBuf,
}

impl Daemon {
    /// Writes `00-base.toml` (state, socket and objects inside a temp dir)
    /// plus `extra` as `50-test.toml`, and starts the daemon on that
    /// directory. Returns once READY=1 arrives.
    pub fn start(extra: &str) -> Daemon {
        Self::start_with_env(extra, &[])
    }

    pub fn start_with_env(extra: &str, env: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let config_dir = dir.path().join("config.d");
        std::fs::create_dir(&config_dir).unwrap();
        std::fs::write(
            config_dir.join("00-base.toml"),
            "[agent]\nstate_dir = \"../state\"\nshutdown_timeout = \"10s\"\n\
             [control]\nsocket = \"../control.sock\"\ngroup = \"\"\nrequest_timeout = \"2s\"\n\
             [object_store.local]\npath = \"../objects\"\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\ntextfile_dir = \"../textfile\"\n",
        )
        .unwrap();
        std::fs::write(config_dir.join("50-test.toml"), extra).unwrap();
        let mut daemon = Self::spawn(dir, config_dir, env);
        daemon.wait_notification("READY=1", Duration::from_secs(20));
        daemon
    }

    fn spawn(dir: tempfile::TempDir, config_dir: PathBuf, env: &[(&str, &str)]) -> Daemon {
        let notify_path = dir.path().join("notify.sock");
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        notify.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut command = if env.iter().any(|(key, _)| *key == "WATCHDOG_USEC") {
            // systemd sets WATCHDOG_PID to the main PID, which we only know
            // after fork: the shell's $$ survives the exec.
            let mut shim = Command::new("/bin/sh");
            shim.args(["-c", "WATCHDOG_PID=$$ exec \"$0\" \"$@\"", BIN]);
            shim
        } else {
            Command::new(BIN)
        };
        command
            .arg("run")
            .arg("--config")
            .arg(&config_dir)
            .env("NOTIFY_SOCKET", &notify_path)
            .env_remove("JOURNAL_STREAM")
            .env_remove("PLATFORM_AGENT_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().unwrap();
        Daemon {
            dir,
            child,
            notify,
            notifications: Vec::new(),
            config_dir,
        }
    }

    /// Replaces the process with a fresh daemon on the same directories
    /// (after a clean stop, or after killing it to simulate a crash).
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::remove_file(self.dir.path().join("notify.sock")).ok();
        let notify_path = self.dir.path().join("notify.sock");
        self.notify = UnixDatagram::bind(&notify_path).unwrap();
        self.notify.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        self.notifications.clear();
        self.child = Command::new(BIN)
            .arg("run")
            .arg("--config")
            .arg(&self.config_dir)
            .env("NOTIFY_SOCKET", &notify_path)
            .env_remove("JOURNAL_STREAM")
            .env_remove("PLATFORM_AGENT_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        self.wait_notification("READY=1", Duration::from_secs(20));
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn drain_notifications(&mut self) {
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.notify.recv(&mut buf) {
            self.notifications.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }

    /// Waits for a datagram containing the line `needle` (e.g. "READY=1").
    pub fn wait_notification(&mut self, needle: &str, deadline: Duration) -> String {
        let start = Instant::now();
        loop {
            self.drain_notifications();
            if let Some(found) = self
                .notifications
                .iter()
                .find(|n| n.lines().any(|l| l.starts_with(needle)))
            {
                return found.clone();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                let mut stderr = String::new();
                use std::io::Read;
                self.child.stderr.take().unwrap().read_to_string(&mut stderr).ok();
                panic!("daemon exited with {status} before sending {needle}:\n{stderr}");
            }
            assert!(
                start.elapsed() < deadline,
                "no {needle} within {deadline:?}; got {:?}",
                self.notifications
            );
        }
    }

    /// Runs the CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .arg("--socket")
            .arg(self.socket())
            .output()
            .unwrap()
    }

    pub fn status_json(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }

    pub fn wait_exit(&mut self, deadline: Duration) -> (ExitStatus, String) {
        let status = wait_for("daemon exit", deadline, || self.child.try_wait().unwrap());
        let mut stderr = String::new();
        use std::io::Read;
        self.child.stderr.take().unwrap().read_to_string(&mut stderr).ok();
        (status, stderr)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary to completion with a deadline (a config that is wrongly
/// accepted would otherwise start a daemon and hang the test).
pub fn run_with_deadline(args: &[&Path], deadline: Duration) -> (Option<i32>, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("JOURNAL_STREAM")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    use std::io::Read;
    child.stderr.take().unwrap().read_to_string(&mut stderr).ok();
    (status.and_then(|s| s.code()), stderr)
}
