//! The real binary as a daemon: systemd's notify protocol, signals, reload,
//! the control socket's protocol limits and its peer-credential checks.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use common::{is_root, wait_for, Daemon, BIN};
use nix::sys::signal::Signal;

const SECS_20: Duration = Duration::from_secs(20);

#[test]
fn ready_comes_with_a_status_line_and_the_socket_answers() {
    let mut daemon = Daemon::start("");
    let ready = daemon.wait_notification("READY=1", SECS_20);
    let status_line = ready.lines().find_map(|l| l.strip_prefix("STATUS=")).unwrap();
    assert!(status_line.starts_with("running"), "{status_line}");
    assert!(status_line.contains("store ok"), "{status_line}");

    let status = daemon.status_json();
    assert_eq!(status["agent"]["state"], "running");
    assert_eq!(status["agent"]["pid"], daemon.child.id());
    assert_eq!(status["store"]["health"]["state"], "ok");
    assert_eq!(status["object_store"]["health"]["state"], "ok");

    let table = daemon.cli(&["status"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("running") && table.contains("store"), "{table}");

    let meta = std::fs::metadata(daemon.socket()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
}

#[test]
fn sigterm_stops_cleanly_and_the_next_start_knows_it() {
    let mut daemon = Daemon::start("");
    daemon.signal(Signal::SIGTERM);
    daemon.wait_notification("STOPPING=1", SECS_20);
    let (status, stderr) = daemon.wait_exit(SECS_20);
    assert!(status.success(), "exit {status}: {stderr}");
    assert!(stderr.contains("orderly shutdown: stopped by SIGTERM"), "{stderr}");
    assert!(!daemon.socket().exists(), "the socket must be removed on stop");

    daemon.restart();
    let status = daemon.status_json();
    let previous = status["agent"]["previous_run"].as_str().unwrap();
    assert!(previous.starts_with("stopped by SIGTERM"), "{previous}");
}

#[test]
fn after_sigkill_the_stale_socket_is_replaced_and_the_run_is_marked_unclean() {
    let mut daemon = Daemon::start("");
    daemon.signal(Signal::SIGKILL);
    daemon.wait_exit(SECS_20);
    assert!(daemon.socket().exists(), "a killed daemon leaves its socket behind");
    daemon.restart();
    let status = daemon.status_json();
    let previous = status["agent"]["previous_run"].as_str().unwrap();
    assert!(previous.starts_with("unclean"), "{previous}");
}

#[test]
fn a_second_daemon_on_the_same_socket_refuses_to_start() {
    let daemon = Daemon::start("");
    let output = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&daemon.config_dir)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(69));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("already answering"), "{stderr}");
    assert_eq!(daemon.status_json()["agent"]["state"], "running");
}

#[test]
fn reload_with_a_bad_drop_in_keeps_the_last_good_config() {
    let mut daemon = Daemon::start("[agent]\nlog_level = \"info\"\n");
    let bad = daemon.config_dir.join("60-bad.toml");
    std::fs::write(&bad, "[agent]\nbogus = 1\n").unwrap();

    // Through SIGHUP, as `systemctl reload` does.
    daemon.signal(Signal::SIGHUP);
    let status = wait_for("reload error in status", SECS_20, || {
        let status = daemon.status_json();
        status["config"]["last_reload_error"].is_string().then_some(status)
    });
    let err = status["config"]["last_reload_error"].as_str().unwrap();
    assert!(err.contains("60-bad.toml:2") && err.contains("agent.bogus"), "{err}");
    assert_eq!(status["agent"]["state"], "running");
    assert_eq!(status["config"]["generation"], 1);
    // STATUS= still starts with the state word, and says why the reload failed.
    let line = wait_for("STATUS= naming the refused reload", SECS_20, || {
        daemon.wait_notification("STATUS=running", SECS_20);
        daemon
            .notifications
            .iter()
            .rev()
            .find(|n| n.contains("config reload refused"))
            .cloned()
    });
    assert!(line.starts_with("STATUS=running"), "{line}");
    assert!(line.contains("60-bad.toml"), "{line}");

    // Through the socket: the CLI reports the refusal with EX_CONFIG.
    let out = daemon.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("60-bad.toml"));

    std::fs::write(&bad, "[agent]\nlog_level = \"debug\"\n").unwrap();
    let out = daemon.cli(&["reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status = daemon.status_json();
    assert_eq!(status["config"]["generation"], 2);
    assert!(status["config"]["last_reload_error"].is_null());

    let out = daemon.cli(&["config", "show", "--json"]);
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let entry = shown["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["key"] == "agent.log_level")
        .unwrap();
    assert_eq!(entry["value"], "\"debug\"");
    assert!(entry["source"].as_str().unwrap().ends_with("60-bad.toml:2"), "{entry}");
}

fn raw_call(socket: &std::path::Path, frame: &[u8]) -> serde_json::Value {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(frame).unwrap();
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(header) as usize];
    stream.read_exact(&mut body).unwrap();
    serde_json::from_slice(&body).unwrap()
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    frame
}

#[test]
fn oversized_malformed_and_garbage_requests_get_error_replies() {
    let daemon = Daemon::start("[control]\nmax_request_bytes = 2048\n");
    let socket = daemon.socket();

    let reply = raw_call(&socket, &frame(&vec![b' '; 4096]));
    assert_eq!(reply["response"], "error");
    assert_eq!(reply["code"], "too-large");

    let reply = raw_call(&socket, &frame(b"{\"request\": \"format-disk\"}"));
    assert_eq!(reply["code"], "bad-request");
    assert!(reply["message"].as_str().unwrap().contains("malformed request"));

    let reply = raw_call(&socket, &frame(b"\xff\xfe not json"));
    assert_eq!(reply["code"], "bad-request");

    // A client that sends half a header and stalls is dropped after
    // request_timeout, without holding up anyone else.
    let mut stalled = UnixStream::connect(&socket).unwrap();
    stalled.write_all(&[0, 0]).unwrap();
    assert_eq!(daemon.status_json()["agent"]["state"], "running");

    // Pseudo-random frames (fixed seed) of every size below the limit.
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for round in 0..300 {
        let len = 1 + (round * 7) % 2000;
        let body: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let reply = raw_call(&socket, &frame(&body));
        assert_eq!(reply["response"], "error", "round {round}");
    }
    let status = daemon.status_json();
    assert_eq!(status["agent"]["state"], "running");
    assert!(status["control"]["requests_denied"].as_u64().unwrap() >= 303);
    let mut buf = [0u8; 1];
    stalled.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(
        stalled.read(&mut buf).unwrap(),
        0,
        "the stalled client must be disconnected"
    );
}

#[test]
fn watchdog_is_fed_when_systemd_asks_for_it() {
    let mut daemon = Daemon::start_with_env("", &[("WATCHDOG_USEC", "400000")]);
    daemon.wait_notification("WATCHDOG=1", SECS_20);
}

/// Runs the CLI as another user via setpriv, with an explicit group list.
fn cli_as(daemon: &Daemon, uid: u32, gid: u32, args: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg(BIN)
        .args(args)
        .arg("--socket")
        .arg(daemon.socket())
        .output()
        .unwrap()
}

#[test]
fn peer_credentials_decide_who_may_read_and_who_may_change() {
    if !is_root() {
        eprintln!("skipped: switching users needs root (CI runs as root)");
        return;
    }
    // nogroup exists on every Debian/Ubuntu system; uid 4242 needs no passwd entry.
    let group = nix::unistd::Group::from_name("nogroup")
        .unwrap()
        .expect("group nogroup");
    let daemon = Daemon::start("[control]\ngroup = \"nogroup\"\n");
    // The test's temp dir is private; open the path down to the socket the
    // way /run/platform-agent (0750 root:platform-agent) is.
    std::fs::set_permissions(daemon.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let meta = std::fs::metadata(daemon.socket()).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(meta.gid(), group.gid.as_raw());

    let outsider = cli_as(&daemon, 4242, 4242, &["status"]);
    assert_eq!(outsider.status.code(), Some(77), "{outsider:?}");
    assert!(String::from_utf8_lossy(&outsider.stderr).contains("permission denied"));

    let member = cli_as(&daemon, 4242, group.gid.as_raw(), &["status", "--json"]);
    assert!(member.status.success(), "{}", String::from_utf8_lossy(&member.stderr));

    let member_reload = cli_as(&daemon, 4242, group.gid.as_raw(), &["reload"]);
    assert_eq!(member_reload.status.code(), Some(77));
    let stderr = String::from_utf8_lossy(&member_reload.stderr);
    assert!(stderr.contains("for root only") && stderr.contains("4242"), "{stderr}");
    assert_eq!(
        daemon.status_json()["config"]["generation"],
        1,
        "the denied reload must not happen"
    );

    let root_reload = daemon.cli(&["reload"]);
    assert!(root_reload.status.success());
    assert_eq!(daemon.status_json()["config"]["generation"], 2);
}

const SIM_NODE: &str = "[agent]\ncheck_interval = \"200ms\"\n\
    [volume]\nenabled = true\nbackend = \"sim\"\nlabel = \"data\"\nmount_point = \"../data\"\n\
    [[volume.directories]]\npath = \"k3s-storage\"\nmode = \"0711\"\n\
    [k3s]\nenabled = true\nbackend = \"sim\"\n";

#[test]
fn sigterm_runs_the_shutdown_plan_in_order() {
    let mut daemon = Daemon::start(SIM_NODE);
    wait_for("sim volume and K3s up", SECS_20, || {
        let status = daemon.status_json();
        (status["volume"]["mount_state"]["state"] == "mounted" && status["k3s_status"]["tier"] == "unit-active")
            .then_some(())
    });
    assert!(daemon.path("data/k3s-storage").is_dir());
    daemon.signal(Signal::SIGTERM);
    let (status, stderr) = daemon.wait_exit(SECS_20);
    assert!(status.success(), "{stderr}");
    let order: Vec<&str> = stderr
        .lines()
        .filter_map(|l| l.split("shutdown step ").nth(1))
        .filter_map(|rest| rest.split(':').next())
        .collect();
    assert_eq!(
        order,
        [
            "stop-jobs",
            "stop-k3s",
            "clean-leftovers",
            "flush-wal",
            "sync",
            "unmount-data",
            "release-inhibitor"
        ],
        "{stderr}"
    );
    assert!(stderr.contains("shutdown step unmount-data: done"), "{stderr}");

    // The next start reports the steps of this shutdown.
    daemon.restart();
    let last = daemon.status_json()["last_shutdown"].clone();
    assert_eq!(last.as_array().map(Vec::len), Some(7), "{last}");
    assert_eq!(last[5]["step"], "unmount-data");
    assert_eq!(last[5]["outcome"], "done");
}

#[test]
fn a_fresh_restart_in_place_marker_skips_the_plan_once() {
    let mut daemon = Daemon::start(SIM_NODE);
    std::fs::write(daemon.path("restart-in-place"), b"").unwrap();
    daemon.signal(Signal::SIGTERM);
    let (status, stderr) = daemon.wait_exit(SECS_20);
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("restart in place requested"), "{stderr}");
    assert!(!stderr.contains("shutdown step stop-k3s"), "{stderr}");
    assert!(!daemon.path("restart-in-place").exists(), "the marker is used once");
}
