//! GitOps pull against real git repositories: a bare repository made with the
//! `git` CLI, served over file:// and over smart HTTP (`git http-backend`
//! behind `tests/support/git-http-server.py`, which demands a token), and the
//! real daemon binary applying it into a manifests directory.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{wait_for, Daemon};

/// A bare repository plus a work tree that pushes to it.
struct Repo {
    dir: tempfile::TempDir,
}

impl Repo {
    fn new() -> Repo {
        let repo = Repo {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::create_dir_all(repo.dir.path().join("home")).unwrap();
        repo.git(
            &["init", "-q", "--bare", "-b", "main", "root/repo.git"],
            repo.dir.path(),
        );
        repo.git(&["init", "-q", "-b", "main", "work"], repo.dir.path());
        repo
    }

    fn bare(&self) -> PathBuf {
        self.dir.path().join("root/repo.git")
    }

    fn work(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    fn url(&self) -> String {
        format!("file://{}", self.bare().display())
    }

    fn git(&self, args: &[&str], cwd: &Path) -> String {
        let out = Command::new("git")
            .args(["-c", "user.name=Test", "-c", "user.email=test@example.invalid"])
            .args(args)
            .current_dir(cwd)
            .env("HOME", self.dir.path().join("home"))
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env_remove("GIT_DIR")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Writes (Some) or deletes (None) files below the work tree, commits
    /// with `extra` commit arguments (e.g. signing), pushes; returns the sha.
    fn commit_with(&self, files: &[(&str, Option<&str>)], extra: &[&str]) -> String {
        let work = self.work();
        for (path, content) in files {
            let path = work.join(path);
            match content {
                Some(text) => {
                    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                    std::fs::write(&path, text).unwrap();
                }
                None => std::fs::remove_file(&path).unwrap(),
            }
        }
        self.git(&["add", "-A"], &work);
        let mut args = extra.to_vec();
        args.extend(["commit", "-q", "--allow-empty", "-m", "change"]);
        self.git(&args, &work);
        self.git(&["push", "-q", "-f", "../root/repo.git", "main"], &work);
        self.git(&["rev-parse", "HEAD"], &work)
    }

    fn commit(&self, files: &[(&str, Option<&str>)]) -> String {
        self.commit_with(files, &[])
    }
}

fn gitops_config(url: &str, extra: &str) -> String {
    format!(
        "[gitops]\nenabled = true\nurl = \"{url}\"\nbranch = \"main\"\nrepo_subdir = \"bootstrap\"\n\
         manifests_dir = \"../manifests\"\n{extra}\n"
    )
}

fn manifest(daemon: &Daemon, name: &str) -> Option<String> {
    std::fs::read_to_string(daemon.path("manifests").join(name)).ok()
}

fn wait_content(daemon: &Daemon, name: &str, expected: &str, deadline: Duration) {
    wait_for(&format!("{name} = {expected:?}"), deadline, || {
        (manifest(daemon, name).as_deref() == Some(expected)).then_some(())
    });
}

fn gitops_status(daemon: &Daemon) -> serde_json::Value {
    daemon.status_json()["gitops_status"].clone()
}

fn reconcile(daemon: &Daemon, args: &[&str]) -> (bool, String, String) {
    let mut all = vec!["reconcile"];
    all.extend_from_slice(args);
    let out = daemon.cli(&all);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn yaml(name: &str) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n")
}

#[test]
fn a_new_commit_appears_within_one_poll() {
    let repo = Repo::new();
    let first = repo.commit(&[("bootstrap/ns.yaml", Some(&yaml("one"))), ("README.md", Some("x"))]);
    let daemon = Daemon::start(&gitops_config(&repo.url(), "poll_interval = \"1s\""));
    wait_content(&daemon, "gitops-ns.yaml", &yaml("one"), Duration::from_secs(10));
    assert!(manifest(&daemon, "gitops-README.md").is_none());
    wait_for("status shows the first revision", Duration::from_secs(5), || {
        (gitops_status(&daemon)["applied_revision"] == first.as_str()).then_some(())
    });

    let second = repo.commit(&[
        ("bootstrap/ns.yaml", Some(&yaml("two"))),
        ("bootstrap/apps/root.yml", Some(&yaml("apps"))),
    ]);
    let pushed = Instant::now();
    wait_content(&daemon, "gitops-ns.yaml", &yaml("two"), Duration::from_secs(5));
    wait_content(&daemon, "gitops-apps-root.yml", &yaml("apps"), Duration::from_secs(5));
    // One poll is 1 s; allow the fetch itself on a loaded 2-core machine.
    assert!(
        pushed.elapsed() < Duration::from_millis(2500),
        "took {:?}",
        pushed.elapsed()
    );
    let status = wait_for("status shows the new revision", Duration::from_secs(5), || {
        let status = daemon.status_json();
        (status["gitops_status"]["applied_revision"] == second.as_str()).then_some(status)
    });
    assert_eq!(status["gitops"]["state"], "ok", "{status}");
    assert_eq!(status["gitops_status"]["last_result"], "success");
    assert_eq!(status["gitops_status"]["files_managed"], 2);
    assert!(status["gitops_status"]["applied_at"].as_u64().unwrap() > 0);

    // Metrics carry the applied revision.
    let listen = status["metrics"]["listen"].as_str().unwrap().to_string();
    let metrics = http_get(&listen, "/metrics");
    assert!(
        metrics.contains(&format!(
            "platform_agent_gitops_revision_info{{revision=\"{second}\"}} 1"
        )),
        "{metrics}"
    );
    assert!(metrics.contains("platform_agent_gitops_last_result{result=\"success\"} 1"));
    let text = String::from_utf8_lossy(&daemon.cli(&["status"]).stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("gitops"))
        .unwrap_or_default();
    assert!(
        line.contains(" ok ") && line.contains(&second[..12]) && line.contains("2 files managed"),
        "{text}"
    );
    // The fetch is shallow: the local repository has a shallow boundary.
    assert!(daemon.path("state/gitops/repo.git/shallow").exists());
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

#[test]
fn reconcile_applies_within_two_seconds_and_diff_writes_nothing() {
    let repo = Repo::new();
    repo.commit(&[
        ("bootstrap/a.yaml", Some(&yaml("a"))),
        ("bootstrap/b.yaml", Some(&yaml("b"))),
    ]);
    // A poll interval far beyond the test: only `reconcile` can bring changes.
    let daemon = Daemon::start(&gitops_config(&repo.url(), "poll_interval = \"1h\""));
    wait_content(&daemon, "gitops-a.yaml", &yaml("a"), Duration::from_secs(10));

    let head = repo.commit(&[
        ("bootstrap/a.yaml", Some(&yaml("a2"))),
        ("bootstrap/c.yaml", Some(&yaml("c"))),
        ("bootstrap/b.yaml", None),
    ]);
    let before = std::fs::metadata(daemon.path("manifests/gitops-a.yaml"))
        .unwrap()
        .modified()
        .unwrap();
    let (ok, stdout, stderr) = reconcile(&daemon, &["--diff", "--json"]);
    assert!(ok, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["dry_run"], true);
    assert_eq!(report["revision"], head.as_str());
    let changes: Vec<(String, String)> = report["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["file"].as_str().unwrap().to_string(),
                c["action"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        changes,
        [
            ("gitops-a.yaml".to_string(), "update".to_string()),
            ("gitops-c.yaml".to_string(), "add".to_string()),
            ("gitops-b.yaml".to_string(), "retain".to_string()),
        ]
    );
    // --diff wrote nothing.
    assert_eq!(manifest(&daemon, "gitops-a.yaml").unwrap(), yaml("a"));
    assert!(manifest(&daemon, "gitops-c.yaml").is_none());
    let after = std::fs::metadata(daemon.path("manifests/gitops-a.yaml"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after);
    assert_eq!(gitops_status(&daemon)["pending_changes"], 2);
    let (ok, text, _) = reconcile(&daemon, &["--diff"]);
    assert!(
        ok && text.contains("would apply") && text.contains("add         gitops-c.yaml"),
        "{text}"
    );

    let started = Instant::now();
    let (ok, stdout, stderr) = reconcile(&daemon, &[]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("applied"), "{stdout}");
    wait_content(&daemon, "gitops-c.yaml", &yaml("c"), Duration::from_secs(2));
    assert_eq!(manifest(&daemon, "gitops-a.yaml").unwrap(), yaml("a2"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    // Prune is off: the file that left Git stays.
    assert_eq!(manifest(&daemon, "gitops-b.yaml").unwrap(), yaml("b"));
    assert_eq!(gitops_status(&daemon)["files_retained"], 1);
}

#[test]
fn removed_file_stays_without_prune_and_goes_with_prune() {
    let repo = Repo::new();
    let files: Vec<(String, String)> = (1..=4)
        .map(|i| (format!("bootstrap/f{i}.yaml"), yaml(&format!("f{i}"))))
        .collect();
    let refs: Vec<(&str, Option<&str>)> = files.iter().map(|(p, c)| (p.as_str(), Some(c.as_str()))).collect();
    repo.commit(&refs);
    let mut daemon = Daemon::start(&gitops_config(&repo.url(), "poll_interval = \"1h\""));
    wait_content(&daemon, "gitops-f4.yaml", &yaml("f4"), Duration::from_secs(10));
    // A foreign file in the directory, even with our prefix, is never removed.
    std::fs::write(daemon.path("manifests/gitops-foreign.yaml"), "foreign").unwrap();
    std::fs::write(daemon.path("manifests/traefik.yaml"), "k3s's own").unwrap();

    repo.commit(&[("bootstrap/f4.yaml", None)]);
    let (ok, _, stderr) = reconcile(&daemon, &[]);
    assert!(ok, "{stderr}");
    assert_eq!(manifest(&daemon, "gitops-f4.yaml").unwrap(), yaml("f4"), "prune is off");

    // Turn prune on (1 of 4 = 0.25 is within the default fraction).
    std::fs::write(
        daemon.config_dir.join("50-test.toml"),
        gitops_config(&repo.url(), "poll_interval = \"1h\"\nprune = true"),
    )
    .unwrap();
    let out = daemon.cli(&["reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A reload starts a pass at once.
    wait_for("f4 pruned", Duration::from_secs(5), || {
        manifest(&daemon, "gitops-f4.yaml").is_none().then_some(())
    });
    let status = wait_for("status after the prune", Duration::from_secs(5), || {
        let status = gitops_status(&daemon);
        (status["files_managed"] == 3).then_some(status)
    });
    assert_eq!(status["files_pruned"], 1, "{status}");
    assert_eq!(manifest(&daemon, "gitops-f1.yaml").unwrap(), yaml("f1"));
    assert_eq!(manifest(&daemon, "gitops-foreign.yaml").unwrap(), "foreign");
    assert_eq!(manifest(&daemon, "traefik.yaml").unwrap(), "k3s's own");
    let (ok, stdout, stderr) = reconcile(&daemon, &[]);
    assert!(ok && stdout.contains("no changes"), "{stdout}{stderr}");

    // The inventory survives a restart: the agent still knows its files.
    daemon.restart();
    repo.commit(&[("bootstrap/f3.yaml", None)]);
    let (_, stdout, _) = reconcile(&daemon, &[]);
    // 1 of 3 is more than 0.25: refused after the restart as before it.
    assert!(stdout.contains("prune refused: 1 of 3"), "{stdout}");
    assert_eq!(manifest(&daemon, "gitops-f3.yaml").unwrap(), yaml("f3"));
}

#[test]
fn mass_removal_beyond_the_fraction_is_refused() {
    let repo = Repo::new();
    let files: Vec<(String, String)> = (1..=4)
        .map(|i| (format!("bootstrap/f{i}.yaml"), yaml(&format!("f{i}"))))
        .collect();
    let refs: Vec<(&str, Option<&str>)> = files.iter().map(|(p, c)| (p.as_str(), Some(c.as_str()))).collect();
    repo.commit(&refs);
    let daemon = Daemon::start(&gitops_config(
        &repo.url(),
        "poll_interval = \"1h\"\nprune = true\nprune_max_fraction = 0.25",
    ));
    wait_content(&daemon, "gitops-f4.yaml", &yaml("f4"), Duration::from_secs(10));

    repo.commit(&[
        ("bootstrap/f2.yaml", None),
        ("bootstrap/f3.yaml", None),
        ("bootstrap/f4.yaml", None),
    ]);
    let out = daemon.cli(&["reconcile"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("prune refused"), "{stdout}");
    assert_eq!(out.status.code(), Some(73), "a refused prune is not a silent success");
    for i in 1..=4 {
        assert_eq!(
            manifest(&daemon, &format!("gitops-f{i}.yaml")).unwrap(),
            yaml(&format!("f{i}")),
            "nothing is removed"
        );
    }
    let status = daemon.status_json();
    assert_eq!(status["gitops"]["state"], "degraded", "{status}");
    let error = status["gitops_status"]["last_error"].as_str().unwrap();
    assert!(error.contains("prune refused") && error.contains("3 of 4"), "{error}");
    assert_eq!(status["gitops_status"]["files_refused"], 3);
}

#[test]
fn unsigned_head_is_not_applied_when_verification_is_on() {
    let repo = Repo::new();
    let keys = repo.dir.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    for name in ["trusted", "stranger"] {
        let status = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
            .arg(keys.join(name))
            .status()
            .unwrap();
        assert!(status.success());
    }
    let trusted_pub = std::fs::read_to_string(keys.join("trusted.pub")).unwrap();
    let sign_with = |name: &str| {
        vec![
            "-c".to_string(),
            "gpg.format=ssh".to_string(),
            "-c".to_string(),
            format!("user.signingkey={}", keys.join(name).display()),
        ]
    };
    let signed = |files: &[(&str, Option<&str>)], name: &str| {
        let mut args = sign_with(name);
        args.push("-c".into());
        args.push("commit.gpgsign=true".into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        repo.commit_with(files, &args)
    };

    let first = signed(&[("bootstrap/a.yaml", Some(&yaml("signed")))], "trusted");
    let config = gitops_config(
        &repo.url(),
        &format!(
            "poll_interval = \"1h\"\n[gitops.verify]\nallowed_signers = [\"ops@example {}\"]",
            trusted_pub.trim()
        ),
    );
    let daemon = Daemon::start(&config);
    wait_content(&daemon, "gitops-a.yaml", &yaml("signed"), Duration::from_secs(10));
    wait_for("verified_by in status", Duration::from_secs(5), || {
        let status = gitops_status(&daemon);
        (status["applied_revision"] == first.as_str() && status["verified_by"].as_str().is_some()).then_some(())
    });

    // Unsigned head: refused, nothing written, status says why.
    let unsigned = repo.commit(&[("bootstrap/a.yaml", Some(&yaml("unsigned")))]);
    let (ok, _, stderr) = reconcile(&daemon, &[]);
    assert!(!ok);
    assert!(stderr.contains("not signed"), "{stderr}");
    assert_eq!(manifest(&daemon, "gitops-a.yaml").unwrap(), yaml("signed"));
    let status = daemon.status_json();
    assert_eq!(status["gitops"]["state"], "failed");
    assert!(status["gitops_status"]["last_error"]
        .as_str()
        .unwrap()
        .contains(&format!("commit {unsigned} is not signed")));
    assert_eq!(status["gitops_status"]["applied_revision"], first.as_str());

    // Signed by a key that is not allowed: refused too.
    signed(&[("bootstrap/a.yaml", Some(&yaml("stranger")))], "stranger");
    let (ok, _, stderr) = reconcile(&daemon, &[]);
    assert!(!ok);
    assert!(stderr.contains("not in gitops.verify.allowed_signers"), "{stderr}");
    assert_eq!(manifest(&daemon, "gitops-a.yaml").unwrap(), yaml("signed"));

    // Signed by the trusted key: applied.
    let good = signed(&[("bootstrap/a.yaml", Some(&yaml("signed-again")))], "trusted");
    let (ok, _, stderr) = reconcile(&daemon, &[]);
    assert!(ok, "{stderr}");
    assert_eq!(manifest(&daemon, "gitops-a.yaml").unwrap(), yaml("signed-again"));
    assert_eq!(gitops_status(&daemon)["applied_revision"], good.as_str());
}

#[test]
fn a_hand_edited_file_is_restored_on_the_next_pass() {
    let repo = Repo::new();
    repo.commit(&[
        ("bootstrap/a.yaml", Some(&yaml("a"))),
        ("bootstrap/b.yaml", Some(&yaml("b"))),
    ]);
    let daemon = Daemon::start(&gitops_config(&repo.url(), "poll_interval = \"1s\""));
    wait_content(&daemon, "gitops-a.yaml", &yaml("a"), Duration::from_secs(10));
    wait_content(&daemon, "gitops-b.yaml", &yaml("b"), Duration::from_secs(10));
    let b_mtime = || {
        std::fs::metadata(daemon.path("manifests/gitops-b.yaml"))
            .unwrap()
            .modified()
            .unwrap()
    };
    let b_before = b_mtime();

    std::fs::write(daemon.path("manifests/gitops-a.yaml"), "edited by hand\n").unwrap();
    wait_content(&daemon, "gitops-a.yaml", &yaml("a"), Duration::from_secs(5));
    std::fs::remove_file(daemon.path("manifests/gitops-a.yaml")).unwrap();
    wait_content(&daemon, "gitops-a.yaml", &yaml("a"), Duration::from_secs(5));
    // An untouched file is never rewritten (K3s re-applies on mtime change).
    assert_eq!(b_mtime(), b_before);
    let leftovers: Vec<String> = std::fs::read_dir(daemon.path("manifests"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".pa-tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn bootstrap_secrets_are_placed_before_the_manifests() {
    let repo = Repo::new();
    repo.commit(&[("bootstrap/a.yaml", Some(&yaml("a")))]);
    let secret_dir = tempfile::tempdir().unwrap();
    let source = secret_dir.path().join("token");
    std::fs::write(&source, "K10secret\n").unwrap();
    let destination = secret_dir.path().join("placed/token");
    let daemon = Daemon::start(&gitops_config(
        &repo.url(),
        &format!(
            "poll_interval = \"1h\"\n[[gitops.bootstrap_secrets]]\nsource_file = \"{}\"\ndestination = \"{}\"\nmode = \"0600\"",
            source.display(),
            destination.display()
        ),
    ));
    wait_content(&daemon, "gitops-a.yaml", &yaml("a"), Duration::from_secs(10));
    assert_eq!(std::fs::read_to_string(&destination).unwrap(), "K10secret\n");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&destination).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn an_unsupported_kustomization_is_refused_naming_file_and_key() {
    let repo = Repo::new();
    repo.commit(&[
        ("bootstrap/kustomization.yaml", Some("resources:\n  - a.yaml\n")),
        ("bootstrap/a.yaml", Some(&yaml("a"))),
        ("bootstrap/unlisted.yaml", Some(&yaml("unlisted"))),
    ]);
    let daemon = Daemon::start(&gitops_config(&repo.url(), "poll_interval = \"1h\""));
    wait_content(&daemon, "gitops-a.yaml", &yaml("a"), Duration::from_secs(10));
    assert!(manifest(&daemon, "gitops-unlisted.yaml").is_none());
    assert!(manifest(&daemon, "gitops-kustomization.yaml").is_none());

    repo.commit(&[
        (
            "bootstrap/kustomization.yaml",
            Some("resources:\n  - a.yaml\npatches:\n  - path: p.yaml\n"),
        ),
        ("bootstrap/a.yaml", Some(&yaml("a2"))),
    ]);
    let (ok, _, stderr) = reconcile(&daemon, &[]);
    assert!(!ok);
    assert!(
        stderr.contains("kustomization.yaml") && stderr.contains("`patches`"),
        "{stderr}"
    );
    assert_eq!(manifest(&daemon, "gitops-a.yaml").unwrap(), yaml("a"));
}

/// `git http-backend` behind a token check, on a free port.
struct HttpGit {
    child: Child,
    port: u16,
    token_file: PathBuf,
}

impl HttpGit {
    fn start(project_root: &Path, token_file: &Path) -> HttpGit {
        use std::io::BufRead;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/support/git-http-server.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(project_root)
            .arg(token_file)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().strip_prefix("PORT ").unwrap().parse().unwrap();
        HttpGit {
            child,
            port,
            token_file: token_file.to_path_buf(),
        }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for HttpGit {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn over_http_with_a_token_and_an_unreachable_repo_leaves_files_untouched() {
    let repo = Repo::new();
    let first = repo.commit(&[("bootstrap/a.yaml", Some(&yaml("a")))]);
    let server_token = repo.dir.path().join("server-token");
    std::fs::write(&server_token, "ghp_secret\n").unwrap();
    let mut server = HttpGit::start(&repo.dir.path().join("root"), &server_token);
    let agent_token = repo.dir.path().join("agent-token");
    std::fs::write(&agent_token, "ghp_secret\n").unwrap();
    let url = format!("http://127.0.0.1:{}/repo.git", server.port);
    let daemon = Daemon::start(&gitops_config(
        &url,
        &format!("poll_interval = \"1h\"\ntoken_file = \"{}\"", agent_token.display()),
    ));
    wait_content(&daemon, "gitops-a.yaml", &yaml("a"), Duration::from_secs(10));
    assert_eq!(gitops_status(&daemon)["applied_revision"], first.as_str());

    // A new commit over HTTP, within 2 s of `reconcile`.
    let second = repo.commit(&[("bootstrap/a.yaml", Some(&yaml("a2")))]);
    let started = Instant::now();
    let (ok, _, stderr) = reconcile(&daemon, &[]);
    assert!(ok, "{stderr}");
    assert_eq!(manifest(&daemon, "gitops-a.yaml").unwrap(), yaml("a2"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(gitops_status(&daemon)["applied_revision"], second.as_str());

    // The server stops accepting the token: nothing changes, status says why.
    std::fs::write(&server.token_file, "rotated\n").unwrap();
    repo.commit(&[("bootstrap/a.yaml", Some(&yaml("a3")))]);
    let (ok, _, stderr) = reconcile(&daemon, &[]);
    assert!(!ok, "a refused token must fail the pass");
    assert_eq!(manifest(&daemon, "gitops-a.yaml").unwrap(), yaml("a2"));
    let status = daemon.status_json();
    assert_eq!(status["gitops"]["state"], "failed");
    let error = status["gitops_status"]["last_error"].as_str().unwrap().to_string();
    assert!(error.contains(&url) && error.contains("refused the token"), "{error}");
    assert!(!error.contains("ghp_secret") && !stderr.contains("ghp_secret"));
    assert_eq!(status["gitops_status"]["applied_revision"], second.as_str());

    // The token file is read at every fetch: rotating it needs no reload.
    std::fs::write(&agent_token, "rotated\n").unwrap();
    let (ok, _, stderr) = reconcile(&daemon, &[]);
    assert!(ok, "{stderr}");
    assert_eq!(manifest(&daemon, "gitops-a.yaml").unwrap(), yaml("a3"));

    // The server goes away: the last applied state stays, status says why.
    server.stop();
    repo.commit(&[("bootstrap/a.yaml", Some(&yaml("a4")))]);
    let (ok, _, stderr) = reconcile(&daemon, &[]);
    assert!(!ok);
    assert!(stderr.contains("fetching branch main from"), "{stderr}");
    assert_eq!(manifest(&daemon, "gitops-a.yaml").unwrap(), yaml("a3"));
    let status = daemon.status_json();
    assert_eq!(status["gitops"]["state"], "failed");
    assert_eq!(status["gitops_status"]["last_result"], "failure");
    assert!(status["gitops_status"]["last_error"]
        .as_str()
        .unwrap()
        .contains("fetching branch main"));
}

#[test]
fn a_missing_branch_or_directory_is_an_error_not_an_empty_apply() {
    let repo = Repo::new();
    repo.commit(&[("bootstrap/a.yaml", Some(&yaml("a")))]);
    let daemon = Daemon::start(&gitops_config(
        &repo.url(),
        "poll_interval = \"1h\"\nprune = true\nprune_max_fraction = 1.0",
    ));
    wait_content(&daemon, "gitops-a.yaml", &yaml("a"), Duration::from_secs(10));
    repo.commit(&[("bootstrap/a.yaml", None), ("other/x.yaml", Some("x"))]);
    let (ok, _, stderr) = reconcile(&daemon, &[]);
    assert!(!ok);
    assert!(stderr.contains("no directory \"bootstrap\""), "{stderr}");
    assert_eq!(manifest(&daemon, "gitops-a.yaml").unwrap(), yaml("a"));

    // A branch the remote does not have: an error naming it, nothing removed.
    std::fs::write(
        daemon.config_dir.join("50-test.toml"),
        gitops_config(
            &repo.url(),
            "poll_interval = \"1h\"\nprune = true\nprune_max_fraction = 1.0",
        )
        .replace("branch = \"main\"", "branch = \"nope\""),
    )
    .unwrap();
    let out = daemon.cli(&["reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (ok, _, stderr) = reconcile(&daemon, &[]);
    assert!(!ok);
    assert!(
        stderr.contains("fetching branch nope") && stderr.contains("refs/heads/nope"),
        "{stderr}"
    );
    assert_eq!(manifest(&daemon, "gitops-a.yaml").unwrap(), yaml("a"));
}

#[test]
fn a_tag_is_followed_when_configured_instead_of_a_branch() {
    let repo = Repo::new();
    repo.commit(&[("bootstrap/a.yaml", Some(&yaml("v1")))]);
    repo.git(&["tag", "-a", "-m", "release", "v1"], &repo.work());
    repo.git(&["push", "-q", "../root/repo.git", "v1"], &repo.work());
    // main moves on; the agent stays on the tag.
    repo.commit(&[("bootstrap/a.yaml", Some(&yaml("main")))]);
    let config = gitops_config(&repo.url(), "poll_interval = \"1h\"").replace("branch = \"main\"", "tag = \"v1\"");
    let daemon = Daemon::start(&config);
    wait_content(&daemon, "gitops-a.yaml", &yaml("v1"), Duration::from_secs(10));
    assert_eq!(gitops_status(&daemon)["reference"], "tag v1");

    // The tag is moved (force-pushed): the next pass follows it.
    repo.git(&["tag", "-f", "-a", "-m", "release", "v1"], &repo.work());
    repo.git(&["push", "-q", "-f", "../root/repo.git", "v1"], &repo.work());
    let (ok, _, stderr) = reconcile(&daemon, &[]);
    assert!(ok, "{stderr}");
    assert_eq!(manifest(&daemon, "gitops-a.yaml").unwrap(), yaml("main"));
}

/// A real OpenSSH server on a free port, logging in the current user with
/// one authorized key; the repository is served by `git-upload-pack` as git
/// hosts do.
struct Sshd {
    child: Child,
    port: u16,
    host_public_key: String,
}

impl Sshd {
    fn start(dir: &Path, authorized_key: &str) -> Sshd {
        keygen(&dir.join("host_key"), "host");
        std::fs::write(dir.join("authorized_keys"), authorized_key).unwrap();
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "ListenAddress 127.0.0.1:{port}\nHostKey {}\nPidFile none\nAuthorizedKeysFile {}\n\
                 StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
                 PermitRootLogin prohibit-password\n",
                dir.join("host_key").display(),
                dir.join("authorized_keys").display()
            ),
        )
        .unwrap();
        // sshd's privilege separation directory.
        std::fs::create_dir_all("/run/sshd").unwrap();
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for("sshd listening", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(drop)
        });
        let host_public_key = std::fs::read_to_string(dir.join("host_key.pub")).unwrap();
        Sshd {
            child,
            port,
            host_public_key,
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keygen(path: &Path, comment: &str) {
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn over_ssh_with_a_key_and_strict_host_key_checking() {
    if !common::is_root() || !Path::new("/usr/sbin/sshd").exists() {
        eprintln!("skipped: needs root and openssh-server (tests/fixtures/install.sh installs it)");
        return;
    }
    let repo = Repo::new();
    repo.commit(&[("bootstrap/a.yaml", Some(&yaml("ssh")))]);
    let ssh_dir = repo.dir.path().join("ssh");
    std::fs::create_dir_all(&ssh_dir).unwrap();
    keygen(&ssh_dir.join("client_key"), "agent");
    let client_public = std::fs::read_to_string(ssh_dir.join("client_key.pub")).unwrap();
    let sshd = Sshd::start(&ssh_dir, &client_public);
    let known_hosts = ssh_dir.join("known_hosts");
    std::fs::write(
        &known_hosts,
        format!("[127.0.0.1]:{} {}", sshd.port, sshd.host_public_key),
    )
    .unwrap();
    let user = nix::unistd::User::from_uid(nix::unistd::geteuid())
        .unwrap()
        .unwrap()
        .name;
    let url = format!("ssh://{user}@127.0.0.1:{}{}", sshd.port, repo.bare().display());
    let daemon = Daemon::start(&gitops_config(
        &url,
        &format!(
            "poll_interval = \"1h\"\nssh_key_file = \"{}\"\nknown_hosts_file = \"{}\"",
            ssh_dir.join("client_key").display(),
            known_hosts.display()
        ),
    ));
    wait_content(&daemon, "gitops-a.yaml", &yaml("ssh"), Duration::from_secs(15));

    // A host key that is not the known one: refused, nothing applied.
    keygen(&ssh_dir.join("other_host_key"), "impostor");
    let impostor = std::fs::read_to_string(ssh_dir.join("other_host_key.pub")).unwrap();
    std::fs::write(&known_hosts, format!("[127.0.0.1]:{} {}", sshd.port, impostor)).unwrap();
    repo.commit(&[("bootstrap/a.yaml", Some(&yaml("after")))]);
    let (ok, _, stderr) = reconcile(&daemon, &[]);
    assert!(!ok, "an unknown host key must fail the pass");
    assert!(
        stderr.contains("fetching branch main") && stderr.contains("ssh's own message"),
        "{stderr}"
    );
    assert_eq!(manifest(&daemon, "gitops-a.yaml").unwrap(), yaml("ssh"));
}

#[test]
fn rewritten_history_is_followed() {
    let repo = Repo::new();
    repo.commit(&[("bootstrap/a.yaml", Some(&yaml("before")))]);
    let daemon = Daemon::start(&gitops_config(&repo.url(), "poll_interval = \"1h\""));
    wait_content(&daemon, "gitops-a.yaml", &yaml("before"), Duration::from_secs(10));
    // Amend and force-push: the old head is no longer an ancestor.
    std::fs::write(repo.work().join("bootstrap/a.yaml"), yaml("amended")).unwrap();
    repo.git(&["commit", "-q", "-a", "--amend", "-m", "rewritten"], &repo.work());
    repo.git(&["push", "-q", "-f", "../root/repo.git", "main"], &repo.work());
    let head = repo.git(&["rev-parse", "HEAD"], &repo.work());
    let (ok, stdout, stderr) = reconcile(&daemon, &[]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("(rewritten)"), "{stdout}");
    assert_eq!(manifest(&daemon, "gitops-a.yaml").unwrap(), yaml("amended"));
    assert_eq!(gitops_status(&daemon)["applied_revision"], head.as_str());
}

#[test]
fn a_bootstrap_secret_comes_back_from_a_backup_before_any_manifest() {
    let repo = Repo::new();
    repo.commit(&[("bootstrap/a.yaml", Some(&yaml("a")))]);
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::write(secrets.join("sealed-key.yaml"), "kind: Secret\n").unwrap();
    let destination = dir.path().join("placed/sealed-key.yaml");
    let config = format!(
        "[backup]\nscratch_dir = \"{}\"\n[[backup.jobs]]\nname = \"secrets\"\nkind = \"files\"\nretries = 0\n\
         [backup.jobs.files]\nbase_dir = \"{}\"\npaths = [\".\"]\n{}\n\
         [[gitops.bootstrap_secrets]]\nbackup_job = \"secrets\"\nbackup_member = \"sealed-key.yaml\"\ndestination = \"{}\"\n",
        dir.path().join("scratch").display(),
        secrets.display(),
        gitops_config(&repo.url(), "poll_interval = \"1h\""),
        destination.display()
    );
    let daemon = Daemon::start(&config);
    // No backup yet: the pass fails before writing any manifest.
    let status = wait_for("the first pass to fail", Duration::from_secs(10), || {
        let status = gitops_status(&daemon);
        (status["last_result"] == "failure").then_some(status)
    });
    assert!(
        status["last_error"]
            .as_str()
            .unwrap()
            .contains("from backup job \"secrets\""),
        "{status}"
    );
    assert!(manifest(&daemon, "gitops-a.yaml").is_none());

    let out = daemon.cli(&["backup", "now", "secrets"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (ok, _, stderr) = reconcile(&daemon, &[]);
    assert!(ok, "{stderr}");
    assert_eq!(std::fs::read_to_string(&destination).unwrap(), "kind: Secret\n");
    assert_eq!(manifest(&daemon, "gitops-a.yaml").unwrap(), yaml("a"));
}
