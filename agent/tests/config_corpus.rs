//! Every case under tests/config-corpus/ is a broken configuration. Both
//! `config check` and `run` must refuse it with exit 78 (EX_CONFIG) and an
//! error naming the file, line and key (the case's `expect` file lists the
//! substrings), and `config check` must report exactly one problem, so each
//! case fails for the reason it claims and no other.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::run_with_deadline;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/config-corpus")
}

#[test]
fn every_bad_config_is_refused_with_file_line_and_key() {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(
        cases.len() >= 15,
        "the corpus must have at least 15 cases, has {}",
        cases.len()
    );

    // A base layer that keeps the cases independent of this machine: no
    // platform-agent group needed, state in a temp dir. Cases come after it.
    let base_dir = tempfile::tempdir().unwrap();
    let base = base_dir.path().join("00-base.toml");
    std::fs::write(
        &base,
        "[agent]\nstate_dir = \"state\"\n[control]\nsocket = \"c.sock\"\ngroup = \"\"\n[object_store.local]\npath = \"objects\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();

    let mut failures = Vec::new();
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy().into_owned();
        let expect = std::fs::read_to_string(case.join("expect")).unwrap();
        let targets: Vec<PathBuf> = match std::fs::read_to_string(case.join("args")) {
            Ok(args) => args.lines().map(|l| case.join(l.trim())).collect(),
            Err(_) => vec![case.clone()],
        };

        let mut check_args: Vec<&Path> = vec![Path::new("config"), Path::new("check"), &base];
        check_args.extend(targets.iter().map(PathBuf::as_path));
        let (code, stderr) = run_with_deadline(&check_args, Duration::from_secs(20));
        if code != Some(78) {
            failures.push(format!("{name}: config check exited {code:?}, expected 78:\n{stderr}"));
        }
        if stderr.trim().lines().count() != 1 {
            failures.push(format!(
                "{name}: expected exactly one error from config check, got:\n{stderr}"
            ));
        }

        let mut run_args: Vec<&Path> = vec![Path::new("run"), Path::new("--config"), &base];
        for target in &targets {
            run_args.push(Path::new("--config"));
            run_args.push(target);
        }
        let (run_code, run_stderr) = run_with_deadline(&run_args, Duration::from_secs(20));
        if run_code != Some(78) {
            failures.push(format!("{name}: run exited {run_code:?}, expected 78:\n{run_stderr}"));
        }

        for needle in expect.lines().filter(|l| !l.trim().is_empty()) {
            for (what, text) in [("config check", &stderr), ("run", &run_stderr)] {
                if !text.contains(needle) {
                    failures.push(format!("{name}: {what} output lacks {needle:?}:\n{text}"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} problems:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn config_check_accepts_the_shipped_examples() {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    let relax = tempfile::tempdir().unwrap();
    let no_group = relax.path().join("zz.toml");
    std::fs::write(&no_group, "[control]\ngroup = \"\"\n").unwrap();
    for file in ["default.toml", "local.toml"] {
        let path = config.join(file);
        let (code, stderr) = run_with_deadline(
            &[Path::new("config"), Path::new("check"), &path, &no_group],
            Duration::from_secs(20),
        );
        assert_eq!(code, Some(0), "{file}: {stderr}");
    }
}
