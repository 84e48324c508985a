//! The metrics endpoint of the real binary: formats, compression, the Unix
//! socket, a taken port, a stuck mount, and family-by-family compatibility
//! with node_exporter and promtool (Debian's prometheus-node-exporter and
//! prometheus packages, installed by tests/fixtures/install-metrics-peers.sh).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{wait_for, Daemon};
use platform_agent::metrics::exposition::{self, Family};
use platform_agent::metrics::node::filesystem::{FS_TYPES_EXCLUDE, MOUNT_POINTS_EXCLUDE};
use platform_agent::metrics::node::Filesystem;
use platform_agent::metrics::FAILPOINT_STATFS_HANG;

const INSTALL_HINT: &str = "run `sudo bash tests/fixtures/install-metrics-peers.sh` to install the peers";

struct Response {
    status: u16,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(&name.to_ascii_lowercase()).map(String::as_str)
    }

    fn text(&self) -> String {
        let body = if self.header("content-encoding") == Some("gzip") {
            let mut plain = Vec::new();
            flate2::read::GzDecoder::new(&self.body[..])
                .read_to_end(&mut plain)
                .expect("valid gzip");
            plain
        } else {
            self.body.clone()
        };
        String::from_utf8(body).expect("UTF-8 body")
    }

    fn families(&self) -> Vec<Family> {
        exposition::parse(&self.text()).unwrap_or_else(|e| panic!("unparsable exposition: {e}"))
    }
}

/// A plain HTTP/1.1 GET; `Connection: close` makes the body run to EOF.
fn get(mut stream: impl Read + Write, path: &str, headers: &[(&str, &str)]) -> Response {
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("end of headers");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers.get("transfer-encoding").is_some_and(|te| te == "chunked") {
        body = dechunk(&body);
    }
    Response { status, headers, body }
}

/// Decodes a chunked body (node_exporter's Go server sends one).
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n").expect("chunk size line");
        let size_text = String::from_utf8_lossy(&raw[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).expect("chunk size");
        if size == 0 {
            return body;
        }
        body.extend_from_slice(&raw[line_end + 2..line_end + 2 + size]);
        raw = &raw[line_end + 2 + size + 2..];
    }
}

fn get_tcp(addr: &str, headers: &[(&str, &str)]) -> Response {
    let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    get(stream, "/metrics", headers)
}

/// The bound address once the daemon has published it in its status.
fn metrics_addr(daemon: &Daemon) -> String {
    wait_for("metrics.listen in the status", Duration::from_secs(10), || {
        let status = daemon.status_json();
        let listen = status["status"]["metrics"]["listen"]
            .as_str()
            .or_else(|| status["metrics"]["listen"].as_str())?
            .to_string();
        (!listen.is_empty() && !listen.ends_with(":0")).then_some(listen)
    })
}

fn value(families: &[Family], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let family = families.iter().find(|f| f.name == name)?;
    family
        .samples
        .iter()
        .find(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
        })
        .map(|s| s.value)
}

#[test]
fn endpoint_serves_text_openmetrics_gzip_and_the_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("metrics.sock");
    let mut daemon = Daemon::start(&format!("[metrics]\nunix_socket = \"{}\"\n", socket.display()));
    let addr = metrics_addr(&daemon);

    let plain = get_tcp(&addr, &[]);
    assert_eq!(plain.status, 200);
    assert_eq!(
        plain.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert_eq!(plain.header("content-encoding"), None, "gzip only when asked");
    let families = plain.families();
    assert_eq!(
        value(
            &families,
            "platform_agent_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    assert_eq!(value(&families, "platform_agent_up", &[]), Some(1.0));
    assert_eq!(
        value(
            &families,
            "platform_agent_subsystem_health",
            &[("subsystem", "store"), ("state", "ok")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&families, "node_scrape_collector_success", &[("collector", "cpu")]),
        Some(1.0)
    );

    let om = get_tcp(
        &addr,
        &[(
            "Accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
        )],
    );
    assert!(om
        .header("content-type")
        .unwrap()
        .starts_with("application/openmetrics-text; version=1.0.0"));
    let om_text = om.text();
    assert!(om_text.ends_with("# EOF\n"));
    assert!(om_text.contains("# TYPE node_cpu_seconds counter\n"));

    let gz = get_tcp(&addr, &[("Accept-Encoding", "gzip")]);
    assert_eq!(gz.header("content-encoding"), Some("gzip"));
    assert!(gz.body.len() * 3 < gz.text().len(), "compressed");
    assert!(gz.families().iter().any(|f| f.name == "node_load1"));

    let mode = std::fs::metadata(&socket).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()));
    assert_eq!(mode.unwrap() & 0o777, 0o660);
    let unix = get(UnixStream::connect(&socket).unwrap(), "/metrics", &[]);
    assert_eq!(unix.status, 200);
    assert!(unix.families().iter().any(|f| f.name == "node_memory_MemTotal_bytes"));

    let missing = get(TcpStream::connect(&addr).unwrap(), "/nothing", &[]);
    assert_eq!(missing.status, 404);

    let status = daemon.status_json();
    let metrics = if status["status"].is_object() {
        &status["status"]["metrics"]
    } else {
        &status["metrics"]
    };
    assert_eq!(metrics["health"]["state"], "ok", "{metrics}");
    assert!(metrics["scrapes"].as_u64().unwrap() >= 4, "{metrics}");

    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    let (exit, _) = daemon.wait_exit(Duration::from_secs(20));
    assert!(exit.success());
    assert!(!socket.exists(), "the Unix socket is removed at stop");
}

#[test]
fn taken_port_stops_the_start_naming_the_holder() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.toml"),
        format!(
            "[agent]\nstate_dir = \"state\"\n[control]\nsocket = \"control.sock\"\ngroup = \"\"\n\
             [object_store.local]\npath = \"objects\"\n[metrics]\nlisten = \"{addr}\"\n"
        ),
    )
    .unwrap();
    let config = dir.path().join("config.toml");
    let (code, stderr) = common::run_with_deadline(
        &[Path::new("run"), Path::new("--config"), &config],
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(69), "EX_UNAVAILABLE; stderr:\n{stderr}");
    let port = addr.port();
    let me = std::fs::read_to_string("/proc/self/comm").unwrap();
    let expected = format!("port {port} is in use by {} (pid {})", me.trim(), std::process::id());
    assert!(stderr.contains(&expected), "expected {expected:?} in:\n{stderr}");
    assert!(stderr.contains("metrics.listen"), "{stderr}");
}

/// A local mount the filesystem collector reports on this machine.
fn a_reported_mount() -> String {
    let filesystem = Filesystem::new(MOUNT_POINTS_EXCLUDE, FS_TYPES_EXCLUDE).unwrap();
    filesystem
        .mounts()
        .unwrap()
        .iter()
        .find(|m| !m.fstype.starts_with("nfs") && !m.fstype.starts_with("fuse."))
        .expect("at least one reported mount")
        .mountpoint
        .clone()
}

fn threads_named(pid: u32, name: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .flatten()
                .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn stuck_statfs_fails_only_the_filesystem_collector_and_piles_up_no_threads() {
    let stuck = a_reported_mount();
    let timeout = Duration::from_millis(1500);
    let daemon = Daemon::start_with_env(
        "[metrics]\ncollector_timeout = \"1500ms\"\n",
        &[(FAILPOINT_STATFS_HANG, stuck.as_str())],
    );
    let addr = metrics_addr(&daemon);
    let pid = daemon.child.id();
    for round in 0..6 {
        let start = Instant::now();
        let response = get_tcp(&addr, &[]);
        let took = start.elapsed();
        assert!(
            took < timeout + Duration::from_millis(500),
            "round {round}: the scrape took {took:?}, past its {timeout:?} deadline"
        );
        if round > 0 {
            assert!(
                took < timeout / 2,
                "round {round}: a known-stuck mount is skipped without waiting, took {took:?}"
            );
        }
        let families = response.families();
        let success = |collector| value(&families, "node_scrape_collector_success", &[("collector", collector)]);
        assert_eq!(success("filesystem"), Some(0.0), "round {round}");
        for other in [
            "cpu",
            "meminfo",
            "loadavg",
            "diskstats",
            "netdev",
            "stat",
            "time",
            "uname",
            "vmstat",
        ] {
            assert_eq!(success(other), Some(1.0), "round {round}: {other}");
        }
        assert_eq!(
            value(&families, "node_filesystem_device_error", &[("mountpoint", &stuck)]),
            Some(1.0),
            "round {round}: the stuck mount is flagged"
        );
        assert_eq!(
            value(&families, "node_filesystem_size_bytes", &[("mountpoint", &stuck)]),
            None,
            "round {round}: no figures for the stuck mount"
        );
    }
    // The stuck call holds one thread; one more stats the healthy mounts and
    // is kept for the next scrape. Six scrapes must not have added more.
    let threads = threads_named(pid, "statfs");
    assert_eq!(threads, 2, "statfs threads after 6 scrapes over a stuck mount");
}

/// A node_exporter on a free loopback port with only the collectors the
/// agent implements, killed on drop.
struct NodeExporter {
    child: Child,
    addr: String,
}

impl NodeExporter {
    const COLLECTORS: [&'static str; 13] = [
        "cpu",
        "diskstats",
        "filefd",
        "filesystem",
        "loadavg",
        "meminfo",
        "netdev",
        "pressure",
        "stat",
        "textfile",
        "time",
        "uname",
        "vmstat",
    ];

    fn start(textfile_dir: &Path) -> NodeExporter {
        let binary = PathBuf::from("/usr/bin/prometheus-node-exporter");
        assert!(binary.exists(), "{} is missing; {INSTALL_HINT}", binary.display());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let mut command = Command::new(binary);
        command
            .arg(format!("--web.listen-address={addr}"))
            .arg("--collector.disable-defaults")
            .arg(format!("--collector.textfile.directory={}", textfile_dir.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for collector in Self::COLLECTORS {
            command.arg(format!("--collector.{collector}"));
        }
        let child = command.spawn().unwrap();
        let exporter = NodeExporter { child, addr };
        wait_for("node_exporter to answer", Duration::from_secs(15), || {
            TcpStream::connect(&exporter.addr).ok().map(|_| ())
        });
        exporter
    }
}

impl Drop for NodeExporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `promtool check metrics` on an exposition: its lint findings as
/// (metric, problem) pairs. Exit code 3 means findings, anything but 0 or 3
/// a parse failure.
fn promtool_findings(text: &str) -> BTreeSet<(String, String)> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("promtool: {e}; {INSTALL_HINT}"));
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)),
        "promtool could not read the exposition ({:?}):\n{report}",
        out.status
    );
    report
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(metric, problem)| (metric.to_string(), problem.to_string()))
        .collect()
}

#[test]
fn families_match_node_exporter_and_promtool_finds_nothing_new() {
    let mut daemon = Daemon::start("");
    let textfile_dir = daemon.path("textfile");
    std::fs::create_dir_all(&textfile_dir).unwrap();
    std::fs::write(
        textfile_dir.join("backup.prom"),
        "# HELP site_backup_age_seconds Age of the last site backup.\n# TYPE site_backup_age_seconds gauge\n\
         site_backup_age_seconds{site=\"a\"} 12\n",
    )
    .unwrap();
    let exporter = NodeExporter::start(&textfile_dir);
    let addr = metrics_addr(&daemon);

    let theirs = get_tcp(&exporter.addr, &[]).families();
    let ours_response = get_tcp(&addr, &[]);
    let ours = ours_response.families();
    let by_name: BTreeMap<&str, &Family> = ours.iter().map(|f| (f.name.as_str(), f)).collect();

    // Every family of these collectors node_exporter exports here, except its
    // own build info, must exist in ours with the same type and label names.
    let compared: Vec<&Family> = theirs
        .iter()
        .filter(|f| f.name.starts_with("node_") && !f.name.starts_with("node_exporter_"))
        .chain(theirs.iter().filter(|f| f.name == "site_backup_age_seconds"))
        .collect();
    let mut problems = Vec::new();
    for family in &compared {
        match by_name.get(family.name.as_str()) {
            None => problems.push(format!("{} ({}) is missing", family.name, family.kind)),
            Some(our) if our.kind != family.kind => problems.push(format!(
                "{}: type {} here, {} in node_exporter",
                family.name, our.kind, family.kind
            )),
            Some(our) if our.label_names() != family.label_names() => problems.push(format!(
                "{}: labels {:?} here, {:?} in node_exporter",
                family.name,
                our.label_names(),
                family.label_names()
            )),
            Some(_) => {}
        }
    }
    assert!(
        problems.is_empty(),
        "differences from node_exporter:\n{}",
        problems.join("\n")
    );

    // The comparison covers every collector of the list.
    let prefixes = [
        ("cpu", "node_cpu_seconds_total"),
        ("meminfo", "node_memory_"),
        ("loadavg", "node_load"),
        ("filesystem", "node_filesystem_"),
        ("diskstats", "node_disk_"),
        ("netdev", "node_network_"),
        ("pressure", "node_pressure_"),
        ("uname", "node_uname_info"),
        ("time", "node_time_"),
        ("stat", "node_boot_time_seconds"),
        ("filefd", "node_filefd_"),
        ("vmstat", "node_vmstat_"),
        ("textfile", "node_textfile_"),
    ];
    for (collector, prefix) in prefixes {
        let count = compared.iter().filter(|f| f.name.starts_with(prefix)).count();
        assert!(count > 0, "node_exporter exported nothing for {collector} ({prefix}*)");
        assert_eq!(
            value(&theirs, "node_scrape_collector_success", &[("collector", collector)]),
            value(&ours, "node_scrape_collector_success", &[("collector", collector)]),
            "{collector} succeeded in one exporter only"
        );
    }
    assert_eq!(
        value(&ours, "site_backup_age_seconds", &[("site", "a")]),
        Some(12.0),
        "textfile metrics pass through"
    );

    // Same machine, same figures where they do not move.
    for name in [
        "node_boot_time_seconds",
        "node_memory_MemTotal_bytes",
        "node_filefd_maximum",
    ] {
        let (a, b) = (value(&ours, name, &[]), value(&theirs, name, &[]));
        assert!(
            a.is_some() && (a.unwrap() - b.unwrap()).abs() <= 1.0,
            "{name}: {a:?} here, {b:?} in node_exporter"
        );
    }
    let series = |families: &[Family], name: &str| -> BTreeSet<Vec<(String, String)>> {
        families
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.samples.iter().map(|s| s.labels.clone()).collect())
            .unwrap_or_default()
    };
    for name in [
        "node_cpu_seconds_total",
        "node_disk_reads_completed_total",
        "node_uname_info",
    ] {
        assert_eq!(series(&ours, name), series(&theirs, name), "{name}: different series");
    }

    // promtool: our output parses, and the only lint findings are those it
    // also reports for node_exporter's identical names (meminfo's
    // CamelCase fields, which dashboards depend on).
    let ours_findings = promtool_findings(&ours_response.text());
    let theirs_findings = promtool_findings(&get_tcp(&exporter.addr, &[]).text());
    let new: Vec<&(String, String)> = ours_findings.difference(&theirs_findings).collect();
    assert!(
        new.is_empty(),
        "promtool findings that node_exporter does not have: {new:#?}"
    );
    assert!(
        ours_findings
            .iter()
            .all(|(metric, _)| metric.starts_with("node_memory_")),
        "{ours_findings:#?}"
    );
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    let _ = daemon.wait_exit(Duration::from_secs(20));
}
