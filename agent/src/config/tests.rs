use std::fs;
use std::path::{Path, PathBuf};

use super::*;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, text).unwrap();
    path
}

fn repo_config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config")
}

#[test]
fn shipped_default_toml_matches_built_in_defaults() {
    let text = fs::read_to_string(repo_config_dir().join("default.toml")).unwrap();
    let parsed: Settings = toml::from_str(&text).unwrap();
    assert_eq!(parsed, Settings::default());
}

#[test]
fn every_file_in_config_dir_loads() {
    let mut checked = 0;
    for entry in fs::read_dir(repo_config_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            // The group may not exist on a developer machine; that is an
            // environment fact, not a flaw of the shipped file.
            let relax = tempfile::tempdir().unwrap();
            let no_group = write(relax.path(), "zz-test.toml", "[control]\ngroup = \"\"\n");
            let loaded = load(&ConfigSources::Explicit(vec![path.clone(), no_group]));
            assert!(loaded.is_ok(), "{}: {}", path.display(), loaded.unwrap_err());
            checked += 1;
        }
    }
    assert!(checked >= 2, "expected config/default.toml and config/local.toml");
}

#[test]
fn later_file_overrides_single_keys_and_provenance_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let a = write(
        dir.path(),
        "10-a.toml",
        "[control]\ngroup = \"\"\nmax_request_bytes = 2048\n",
    );
    let b = write(dir.path(), "20-b.toml", "\n\n[control]\nmax_request_bytes = 4096\n");
    let loaded = load(&ConfigSources::Explicit(vec![dir.path().to_path_buf()])).unwrap();
    assert_eq!(loaded.files, vec![a.clone(), b.clone()]);
    assert_eq!(loaded.settings.control.max_request_bytes, 4096);
    assert_eq!(loaded.settings.control.group, "");
    assert_eq!(
        loaded.origin("control.max_request_bytes"),
        Origin::File { path: b, line: 4 }
    );
    assert_eq!(loaded.origin("control.group"), Origin::File { path: a, line: 2 });
    assert_eq!(loaded.origin("agent.log_level"), Origin::BuiltIn);
    let effective = loaded.effective();
    let entry = effective.iter().find(|e| e.key == "control.max_request_bytes").unwrap();
    assert_eq!(entry.value, "4096");
    assert!(entry.source.ends_with("20-b.toml:4"), "{}", entry.source);
    assert!(effective
        .iter()
        .any(|e| e.key == "agent.state_dir" && e.source == "built-in default"));
}

#[test]
fn later_directory_masks_file_of_same_name() {
    let vendor = tempfile::tempdir().unwrap();
    let admin = tempfile::tempdir().unwrap();
    write(vendor.path(), "00-default.toml", "[agent]\nlog_level = \"debug\"\n");
    write(vendor.path(), "10-extra.toml", "[agent]\nshutdown_timeout = \"9s\"\n");
    let masking = write(admin.path(), "00-default.toml", "[agent]\nlog_level = \"warn\"\n");
    let files = files_in_dirs(&[vendor.path(), admin.path(), Path::new("/nonexistent/dir")]).unwrap();
    assert_eq!(files.len(), 2);
    assert_eq!(files[0], masking);
}

#[test]
fn relative_paths_resolve_against_the_setting_file() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("conf")).unwrap();
    let file = write(
        &dir.path().join("conf"),
        "a.toml",
        "[agent]\nstate_dir = \"../state\"\n[control]\nsocket = \"run/c.sock\"\ngroup = \"\"\n",
    );
    let loaded = load(&ConfigSources::Explicit(vec![file])).unwrap();
    assert_eq!(loaded.settings.agent.state_dir, dir.path().join("state"));
    assert_eq!(loaded.settings.control.socket, dir.path().join("conf/run/c.sock"));
}

#[test]
fn unknown_key_error_names_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "50-bad.toml", "[agent]\nlog_level = \"info\"\nbogus = 1\n");
    let err = load(&ConfigSources::Explicit(vec![file])).unwrap_err().to_string();
    assert!(err.contains("50-bad.toml:3:"), "{err}");
    assert!(err.contains("agent.bogus"), "{err}");
    assert!(err.contains("unknown field"), "{err}");
}

#[test]
fn wrong_type_error_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "x.toml", "[control]\nmax_request_bytes = \"big\"\n");
    let err = load(&ConfigSources::Explicit(vec![file])).unwrap_err().to_string();
    assert!(err.contains("x.toml:2:"), "{err}");
    assert!(err.contains("control.max_request_bytes"), "{err}");
}

#[test]
fn validation_error_names_the_file_that_set_the_key() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "10-a.toml", "[control]\ngroup = \"\"\n");
    write(
        dir.path(),
        "20-b.toml",
        "# comment\n[agent]\nshutdown_timeout = \"0s\"\n",
    );
    let err = load(&ConfigSources::Explicit(vec![dir.path().to_path_buf()]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("20-b.toml:3: key `agent.shutdown_timeout`"), "{err}");
}

#[test]
fn errors_from_several_files_are_all_reported() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "10-a.toml", "[agent]\nnope = 1\n");
    write(dir.path(), "20-b.toml", "[control]\nalso_nope = 1\n");
    let errs = load(&ConfigSources::Explicit(vec![dir.path().to_path_buf()])).unwrap_err();
    assert_eq!(errs.0.len(), 2, "{errs}");
}

#[test]
fn bucket_names_follow_s3_rules() {
    for good in ["backups", "my.bucket-1", "abc"] {
        assert!(validate::check_bucket_name(good).is_ok(), "{good}");
    }
    for bad in ["ab", "Backups", "-x-", "a..b", "bucket_", &"x".repeat(64)] {
        assert!(validate::check_bucket_name(bad).is_err(), "{bad}");
    }
}
