//! The `[gitops]` section: where the cluster's bootstrap layer lives in Git
//! and how it is put into K3s's auto-deploying manifests directory.
//!
//! Key names matter to the config loader: keys ending in `_file`, `_dir` or
//! `_path` are file system paths resolved against the drop-in that sets them.
//! The directory *inside the repository* is therefore called `repo_subdir`
//! (not `path`/`repo_path`), so that it is left exactly as written.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct GitopsSettings {
    /// Off by default: a node without a repository is a valid node.
    pub enabled: bool,
    /// `https://...`, `http://...`, `file://...`, `ssh://...` or `user@host:path`.
    pub url: String,
    /// Exactly one of `branch` and `tag`.
    pub branch: String,
    pub tag: String,
    /// Directory inside the repository whose files are applied; "" = the root.
    pub repo_subdir: String,
    #[serde(with = "crate::config::duration")]
    pub poll_interval: Duration,
    /// K3s's auto-deploying manifests directory.
    pub manifests_dir: PathBuf,
    /// Files are written as `<file_prefix>-<flattened relative path>`; the
    /// prefix keeps ours apart from K3s's own (`ccm.yaml`, `traefik.yaml`...).
    pub file_prefix: String,
    /// HTTPS: a file holding a token (GitHub PAT), read at every fetch so it
    /// can be rotated without a reload; sent as HTTP basic auth.
    pub token_file: PathBuf,
    /// The basic-auth user sent with the token (GitHub accepts any; this is
    /// what its docs use).
    pub username: String,
    /// SSH: the private key and the known_hosts file `ssh` is run with.
    pub ssh_key_file: PathBuf,
    pub known_hosts_file: PathBuf,
    pub verify: VerifySettings,
    /// Remove files that left Git from the manifests directory (only files
    /// the agent itself wrote). Off as in the seeds.
    pub prune: bool,
    /// Never remove more than this fraction of the managed files in one pass
    /// (0.0..=1.0); a larger removal is refused whole.
    pub prune_max_fraction: Fraction,
    /// Secrets that cannot live in Git, placed before the first manifest
    /// write of every pass (only when missing or different).
    pub bootstrap_secrets: Vec<BootstrapSecret>,
}

impl Default for GitopsSettings {
    fn default() -> Self {
        GitopsSettings {
            enabled: false,
            url: String::new(),
            branch: String::new(),
            tag: String::new(),
            repo_subdir: String::new(),
            poll_interval: Duration::from_secs(60),
            manifests_dir: PathBuf::from("/var/lib/rancher/k3s/server/manifests"),
            file_prefix: "gitops".into(),
            token_file: PathBuf::new(),
            username: "x-access-token".into(),
            ssh_key_file: PathBuf::new(),
            known_hosts_file: PathBuf::new(),
            verify: VerifySettings::default(),
            prune: false,
            prune_max_fraction: Fraction(0.25),
            bootstrap_secrets: Vec::new(),
        }
    }
}

/// Commit signature verification: on as soon as any signer is listed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct VerifySettings {
    /// Public keys allowed to sign the applied commit, one per entry, in
    /// OpenSSH form (`ssh-ed25519 AAAA... comment`), optionally preceded by a
    /// principal as in git's allowed_signers file. OpenPGP keys are refused
    /// (not supported in this build).
    pub allowed_signers: Vec<String>,
}

/// A fraction in 0.0..=1.0. Settings compare with `Eq`; NaN is refused at
/// validation, so equality of the bits is a true equivalence.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Fraction(pub f64);

impl Eq for Fraction {}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BootstrapSecret {
    /// The file holding the secret on this machine (placed by cloud-init, a
    /// rescue USB, or restored by hand). Copied when missing or different.
    pub source_file: PathBuf,
    /// Or: a `files` backup job whose newest backup holds the secret, and
    /// the member's path in it (relative to the job's `base_dir`). Restored
    /// only when `destination` is missing (a wiped node), not at every pass.
    pub backup_job: String,
    pub backup_member: String,
    /// Where it must be, absolute (e.g. the K3s token file, or a
    /// sealed-secrets key manifest in the manifests directory).
    pub destination: PathBuf,
    /// Octal file mode, e.g. "0600".
    pub mode: String,
}

impl Default for BootstrapSecret {
    fn default() -> Self {
        BootstrapSecret {
            source_file: PathBuf::new(),
            backup_job: String::new(),
            backup_member: String::new(),
            destination: PathBuf::new(),
            mode: "0600".into(),
        }
    }
}

impl BootstrapSecret {
    pub fn mode_bits(&self) -> Result<u32, String> {
        let digits = self.mode.trim_start_matches("0o");
        match u32::from_str_radix(digits, 8) {
            Ok(mode) if mode <= 0o7777 && !digits.is_empty() => Ok(mode),
            _ => Err(format!("{:?} is not an octal file mode like \"0600\"", self.mode)),
        }
    }
}

/// What to fetch, from the settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GitRef {
    Branch(String),
    Tag(String),
}

impl GitRef {
    pub fn refspec(&self) -> String {
        match self {
            GitRef::Branch(name) => format!("+refs/heads/{name}:refs/remotes/origin/{name}"),
            GitRef::Tag(name) => format!("+refs/tags/{name}:refs/tags/{name}"),
        }
    }

    pub fn local_ref(&self) -> String {
        match self {
            GitRef::Branch(name) => format!("refs/remotes/origin/{name}"),
            GitRef::Tag(name) => format!("refs/tags/{name}"),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            GitRef::Branch(name) => format!("branch {name}"),
            GitRef::Tag(name) => format!("tag {name}"),
        }
    }
}

impl GitopsSettings {
    pub fn git_ref(&self) -> GitRef {
        if self.tag.is_empty() {
            GitRef::Branch(self.branch.clone())
        } else {
            GitRef::Tag(self.tag.clone())
        }
    }

    /// Problems as (key relative to `gitops.`, message). Only an enabled
    /// section is checked in depth: a disabled one may be half written.
    pub fn validate(&self, check_secret: &dyn Fn(&Path) -> Result<(), String>) -> Vec<(String, String)> {
        let mut errors = Vec::new();
        let mut fail = |key: &str, message: String| errors.push((key.to_string(), message));
        if !(0.0..=1.0).contains(&self.prune_max_fraction.0) {
            fail(
                "prune_max_fraction",
                format!("{} is out of range 0.0..=1.0", self.prune_max_fraction.0),
            );
        }
        if !self.enabled {
            return errors;
        }
        if let Err(message) = check_url(&self.url) {
            fail("url", message);
        }
        match (self.branch.is_empty(), self.tag.is_empty()) {
            (true, true) => fail("branch", "set exactly one of `branch` and `tag`".into()),
            (false, false) => fail("tag", "set exactly one of `branch` and `tag`, not both".into()),
            _ => {}
        }
        for (key, name) in [("branch", &self.branch), ("tag", &self.tag)] {
            if !name.is_empty() && !valid_ref_name(name) {
                fail(key, format!("{name:?} is not a valid git reference name"));
            }
        }
        if let Err(message) = check_subdir(&self.repo_subdir) {
            fail("repo_subdir", message);
        }
        if self.poll_interval < Duration::from_secs(1) || self.poll_interval > Duration::from_secs(86400) {
            fail(
                "poll_interval",
                format!(
                    "{} is out of range 1s..=1day",
                    humantime::format_duration(self.poll_interval)
                ),
            );
        }
        if self.manifests_dir.as_os_str().is_empty() || self.manifests_dir.is_relative() {
            fail("manifests_dir", "must be an absolute path".into());
        }
        let prefix_ok = !self.file_prefix.is_empty()
            && self
                .file_prefix
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !prefix_ok {
            fail(
                "file_prefix",
                format!(
                    "{:?}: use lowercase letters, digits and '-' (it names the files the agent owns)",
                    self.file_prefix
                ),
            );
        }
        let ssh = is_ssh_url(&self.url);
        if !self.token_file.as_os_str().is_empty() {
            if ssh {
                fail("token_file", "a token is for https:// URLs; this URL uses ssh".into());
            } else if let Err(message) = check_secret(&self.token_file) {
                fail("token_file", message);
            }
        }
        if !self.ssh_key_file.as_os_str().is_empty() || !self.known_hosts_file.as_os_str().is_empty() {
            if !ssh {
                fail(
                    "ssh_key_file",
                    "ssh_key_file and known_hosts_file are for ssh URLs".into(),
                );
            } else {
                for (key, path) in [
                    ("ssh_key_file", &self.ssh_key_file),
                    ("known_hosts_file", &self.known_hosts_file),
                ] {
                    if let Err(message) = check_secret(path) {
                        fail(key, message);
                    }
                }
            }
        }
        if ssh && self.known_hosts_file.as_os_str().is_empty() {
            fail(
                "known_hosts_file",
                "an ssh URL needs known_hosts_file (host keys are checked strictly)".into(),
            );
        }
        for (i, signer) in self.verify.allowed_signers.iter().enumerate() {
            if let Err(message) = super::verify::parse_allowed_signer(signer) {
                fail(&format!("verify.allowed_signers[{i}]"), message);
            }
        }
        for (i, secret) in self.bootstrap_secrets.iter().enumerate() {
            let key = |k: &str| format!("bootstrap_secrets[{i}].{k}");
            match (secret.source_file.as_os_str().is_empty(), secret.backup_job.is_empty()) {
                (true, true) => fail(
                    &key("source_file"),
                    "set source_file, or backup_job and backup_member".into(),
                ),
                (false, false) => fail(
                    &key("backup_job"),
                    "set either source_file or backup_job, not both".into(),
                ),
                (false, true) => {
                    if let Err(message) = check_secret(&secret.source_file) {
                        fail(&key("source_file"), message);
                    }
                }
                (true, false) => {
                    let member = &secret.backup_member;
                    if member.is_empty() || member.starts_with('/') || member.split('/').any(|p| p == "..") {
                        fail(
                            &key("backup_member"),
                            format!("{member:?}: the file's path inside the backup, relative to the job's base_dir"),
                        );
                    }
                }
            }
            if secret.destination.as_os_str().is_empty() || secret.destination.is_relative() {
                fail(&key("destination"), "must be an absolute path".into());
            }
            if let Err(message) = secret.mode_bits() {
                fail(&key("mode"), message);
            }
        }
        errors
    }
}

pub fn is_ssh_url(url: &str) -> bool {
    url.starts_with("ssh://")
        || url.starts_with("git+ssh://")
        || (!url.contains("://") && url.contains(':') && url.contains('@'))
}

fn check_url(url: &str) -> Result<(), String> {
    if url.is_empty() {
        return Err("must name the repository (https://, http://, ssh:// or file:// URL)".into());
    }
    let known = ["https://", "http://", "ssh://", "git+ssh://", "file://"];
    if !known.iter().any(|p| url.starts_with(p)) && !is_ssh_url(url) {
        return Err(format!(
            "{url:?}: expected an https://, http://, ssh://, file:// URL or user@host:path"
        ));
    }
    if url.contains(char::is_whitespace) {
        return Err(format!("{url:?} contains whitespace"));
    }
    // Credentials in the URL would show in status, logs and `config show`.
    if let Some(rest) = url.split_once("://").map(|(_, rest)| rest) {
        let authority = rest.split('/').next().unwrap_or_default();
        if authority.contains('@') && (url.starts_with("http://") || url.starts_with("https://")) {
            return Err("put no credentials in the URL; use token_file".into());
        }
    }
    Ok(())
}

fn valid_ref_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('/')
        && !name.ends_with('/')
        && !name.ends_with(".lock")
        && !name.contains("..")
        && !name.contains("//")
        && !name.starts_with('-')
        && name.chars().all(|c| !c.is_control() && !" ~^:?*[\\".contains(c))
}

fn check_subdir(subdir: &str) -> Result<(), String> {
    if subdir.starts_with('/') {
        return Err(format!(
            "{subdir:?}: a directory inside the repository, without a leading '/'"
        ));
    }
    if subdir.split('/').any(|part| part == "..") {
        return Err(format!("{subdir:?} must not leave the repository"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(_: &Path) -> Result<(), String> {
        Ok(())
    }

    #[test]
    fn disabled_default_is_valid() {
        assert!(GitopsSettings::default().validate(&ok).is_empty());
    }

    #[test]
    fn enabled_needs_url_and_exactly_one_ref() {
        let mut s = GitopsSettings {
            enabled: true,
            ..Default::default()
        };
        let keys: Vec<String> = s.validate(&ok).into_iter().map(|(k, _)| k).collect();
        assert!(keys.contains(&"url".to_string()), "{keys:?}");
        assert!(keys.contains(&"branch".to_string()), "{keys:?}");
        s.url = "https://github.com/example/infra.git".into();
        s.branch = "main".into();
        assert!(s.validate(&ok).is_empty(), "{:?}", s.validate(&ok));
        s.tag = "v1".into();
        assert_eq!(s.validate(&ok)[0].0, "tag");
        s.tag.clear();
        s.prune_max_fraction = Fraction(1.5);
        assert_eq!(s.validate(&ok)[0].0, "prune_max_fraction");
    }

    #[test]
    fn refuses_credentials_in_url_and_escaping_subdir() {
        let s = GitopsSettings {
            enabled: true,
            url: "https://user:secret@github.com/x/y.git".into(),
            branch: "main".into(),
            repo_subdir: "../etc".into(),
            ..Default::default()
        };
        let keys: Vec<String> = s.validate(&ok).into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["url", "repo_subdir"]);
    }

    #[test]
    fn ssh_urls_need_known_hosts() {
        let s = GitopsSettings {
            enabled: true,
            url: "git@github.com:example/infra.git".into(),
            branch: "main".into(),
            ..Default::default()
        };
        let keys: Vec<String> = s.validate(&ok).into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["known_hosts_file"]);
    }

    #[test]
    fn a_bootstrap_secret_has_exactly_one_source() {
        let mut s = GitopsSettings {
            enabled: true,
            url: "file:///srv/infra.git".into(),
            branch: "main".into(),
            bootstrap_secrets: vec![BootstrapSecret {
                destination: "/etc/rancher/k3s/token".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let keys = |s: &GitopsSettings| s.validate(&ok).into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert_eq!(keys(&s), ["bootstrap_secrets[0].source_file"]);
        s.bootstrap_secrets[0].backup_job = "secrets".into();
        assert_eq!(keys(&s), ["bootstrap_secrets[0].backup_member"]);
        s.bootstrap_secrets[0].backup_member = "token".into();
        assert!(keys(&s).is_empty());
        s.bootstrap_secrets[0].source_file = "/root/token".into();
        assert_eq!(keys(&s), ["bootstrap_secrets[0].backup_job"]);
    }

    #[test]
    fn modes_are_octal() {
        let mut secret = BootstrapSecret::default();
        assert_eq!(secret.mode_bits(), Ok(0o600));
        secret.mode = "0644".into();
        assert_eq!(secret.mode_bits(), Ok(0o644));
        secret.mode = "rw".into();
        assert!(secret.mode_bits().is_err());
    }
}
