//! Checks that need more than the type system: ranges, cross-key rules and
//! the machine itself (groups that must exist, secret files that must be
//! readable). `config check` runs the same checks as `run`, so a config that
//! passes the check does not fail at start-up for a reason it could have seen.

use std::path::Path;
use std::time::Duration;

use super::{ConfigError, ConfigErrors, LoadedConfig, ObjectStoreBackend};

/// `sun_path` is 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

pub(super) fn validate(config: &LoadedConfig) -> Result<(), ConfigErrors> {
    let mut errors = Vec::new();
    let mut fail = |key: &str, message: String| {
        errors.push(ConfigError::Invalid {
            origin: config.origin(key),
            key: key.to_string(),
            message,
        })
    };
    let s = &config.settings;

    check_absolute(&mut fail, "agent.state_dir", &s.agent.state_dir);
    check_range(
        &mut fail,
        "agent.shutdown_timeout",
        s.agent.shutdown_timeout,
        Duration::from_secs(1),
        Duration::from_secs(3600),
    );

    check_absolute(&mut fail, "control.socket", &s.control.socket);
    let socket_len = s.control.socket.as_os_str().len();
    if socket_len > MAX_SOCKET_PATH {
        fail(
            "control.socket",
            format!("path is {socket_len} bytes long; a Unix socket path may have at most {MAX_SOCKET_PATH}"),
        );
    }
    if !s.control.group.is_empty() {
        match nix::unistd::Group::from_name(&s.control.group) {
            Ok(Some(_)) => {}
            Ok(None) => fail(
                "control.group",
                format!(
                    "group {:?} does not exist (create it with systemd-sysusers, or set group = \"\" to leave the socket's group alone)",
                    s.control.group
                ),
            ),
            Err(err) => fail("control.group", format!("cannot look up group {:?}: {err}", s.control.group)),
        }
    }
    if !(1024..=16 * 1024 * 1024).contains(&s.control.max_request_bytes) {
        fail(
            "control.max_request_bytes",
            format!("{} is out of range 1024..=16777216", s.control.max_request_bytes),
        );
    }
    check_range(
        &mut fail,
        "control.request_timeout",
        s.control.request_timeout,
        Duration::from_millis(100),
        Duration::from_secs(300),
    );

    match s.object_store.backend {
        ObjectStoreBackend::Local => check_absolute(&mut fail, "object_store.local.path", &s.object_store.local.path),
        ObjectStoreBackend::S3 => match &s.object_store.s3 {
            None => fail(
                "object_store.backend",
                "backend is \"s3\" but there is no [object_store.s3] section".into(),
            ),
            Some(s3) => {
                if let Err(message) = check_endpoint(&s3.endpoint) {
                    fail("object_store.s3.endpoint", message);
                }
                if let Err(message) = check_bucket_name(&s3.bucket) {
                    fail("object_store.s3.bucket", message);
                }
                if s3.region.trim().is_empty() {
                    fail("object_store.s3.region", "must not be empty".into());
                }
                for (key, path) in [
                    ("object_store.s3.access_key_id_file", &s3.access_key_id_file),
                    ("object_store.s3.secret_access_key_file", &s3.secret_access_key_file),
                ] {
                    if let Err(message) = check_secret_file(path) {
                        fail(key, message);
                    }
                }
            }
        },
    }

    for (key, message) in s.k3s.validate() {
        fail(&format!("k3s.{key}"), message);
    }
    if s.k3s.enabled
        && s.volume.enabled
        && (s.k3s.backend == crate::k3s::K3sBackendKind::Sim)
            != (s.volume.backend == crate::volume::VolumeBackendKind::Sim)
    {
        fail(
            "k3s.backend",
            "k3s.backend and volume.backend must both be sim or both real".into(),
        );
    }
    for (key, message) in s.volume.validate() {
        fail(&format!("volume.{key}"), message);
    }
    for (key, message) in s.metrics.validate() {
        fail(&format!("metrics.{key}"), message);
    }
    for (key, message) in s.backup.validate(&check_secret_file) {
        fail(&format!("backup.{key}"), message);
    }
    for (key, message) in s.gitops.validate(&check_secret_file) {
        fail(&format!("gitops.{key}"), message);
    }
    let recipients = crate::backup::settings::load_recipients(&s.backup).map_or(0, |r| r.len());
    for (key, message) in s.wal.validate(recipients) {
        fail(&format!("wal.{key}"), message);
    }

    if errors.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors(errors))
    }
}

fn check_absolute(fail: &mut impl FnMut(&str, String), key: &str, path: &Path) {
    if path.as_os_str().is_empty() {
        fail(key, "must not be empty".into());
    } else if path.is_relative() {
        fail(key, format!("{} must be an absolute path", path.display()));
    }
}

fn check_range(fail: &mut impl FnMut(&str, String), key: &str, value: Duration, min: Duration, max: Duration) {
    if value < min || value > max {
        fail(
            key,
            format!(
                "{} is out of range {}..={}",
                humantime::format_duration(value),
                humantime::format_duration(min),
                humantime::format_duration(max)
            ),
        );
    }
}

fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let rest = endpoint
        .strip_prefix("https://")
        .or_else(|| endpoint.strip_prefix("http://"))
        .ok_or_else(|| format!("{endpoint:?} is not an http:// or https:// URL"))?;
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(format!("{endpoint:?} has no host"));
    }
    Ok(())
}

/// S3's bucket naming rules, so that a typo is reported here and not as an
/// opaque 400 from the server at the first upload.
pub(crate) fn check_bucket_name(bucket: &str) -> Result<(), String> {
    let valid_chars = bucket
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    let ends_ok = bucket
        .chars()
        .next()
        .zip(bucket.chars().last())
        .is_some_and(|(first, last)| first.is_ascii_alphanumeric() && last.is_ascii_alphanumeric());
    if !(3..=63).contains(&bucket.len()) || !valid_chars || !ends_ok || bucket.contains("..") {
        return Err(format!(
            "{bucket:?} is not a valid bucket name (3-63 characters: lowercase letters, digits, '-' and '.', starting and ending with a letter or digit)"
        ));
    }
    Ok(())
}

/// Reads the secret once to prove it is there; its content is not kept here.
fn check_secret_file(path: &Path) -> Result<(), String> {
    if path.as_os_str().is_empty() {
        return Err("must name a file holding the secret".into());
    }
    match std::fs::read(path) {
        Ok(bytes) if bytes.iter().all(u8::is_ascii_whitespace) => {
            Err(format!("secret file {} is empty", path.display()))
        }
        Ok(_) => Ok(()),
        Err(err) => Err(format!("cannot read secret file {}: {err}", path.display())),
    }
}
