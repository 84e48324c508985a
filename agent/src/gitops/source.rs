//! The Git side: a shallow fetch (depth 1) of one branch or tag into a bare
//! repository under the agent's state directory, then the files below
//! `repo_subdir` read straight from the commit's tree. No worktree is ever
//! checked out. Everything here is blocking (gix's blocking client); the
//! service runs it on `spawn_blocking`.
//!
//! - Library: gix, pure Rust, so the release binary (zig-linked against
//!   glibc 2.31) carries no OpenSSL, libgit2 or libssh2. HTTP(S) goes through
//!   reqwest on rustls (aws-lc-rs), the TLS stack the S3 client already uses.
//! - The repository is opened *isolated*: no system or global git config, no
//!   `GIT_*` environment, no credential helpers, no prompts.
//! - HTTPS token: read from `token_file` at every fetch (rotation needs no
//!   reload) and sent as `Authorization: Basic base64(username:token)`
//!   through an in-memory `http.extraHeader` override; it is never written
//!   to disk or logged. A server that still answers 401 fails the fetch.
//! - SSH: gix runs the `ssh` program; `core.sshCommand` is set to
//!   `ssh -i <ssh_key_file> -o IdentitiesOnly=yes -o UserKnownHostsFile=<known_hosts_file>
//!   -o StrictHostKeyChecking=yes -o BatchMode=yes`, so an unknown or changed
//!   host key is a failed fetch, never a prompt.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use super::render::is_manifest_file;
use super::settings::GitRef;

#[derive(Debug, Clone)]
pub struct FetchSpec {
    pub url: String,
    pub git_ref: GitRef,
    /// The bare repository (`<state_dir>/gitops/repo.git`).
    pub repo_dir: PathBuf,
    pub repo_subdir: String,
    /// (user, token file) for HTTP(S).
    pub token: Option<(String, PathBuf)>,
    /// (key file, known_hosts file) for SSH.
    pub ssh: Option<(PathBuf, PathBuf)>,
}

/// One fetched commit, as much of it as the agent needs.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub revision: String,
    /// The first line of the commit message.
    pub subject: String,
    /// The armored `gpgsig` header, if any.
    pub signature: Option<Vec<u8>>,
    /// The commit object without its `gpgsig` header: what was signed.
    pub signed_payload: Vec<u8>,
    /// Path below `repo_subdir` -> content. Only `*.yaml`, `*.yml` and
    /// kustomization files carry their content; other files are listed with
    /// an empty one (the renderer only needs to know they exist).
    pub files: BTreeMap<String, Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{}: cannot open or create the local repository: {reason}", path.display())]
    Repository { path: PathBuf, reason: String },
    #[error("cannot read the token file {}: {source}", path.display())]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("fetching {what} from {url} failed: {reason}")]
    Fetch { url: String, what: String, reason: String },
    #[error("{url} has no {what}")]
    NoSuchRef { url: String, what: String },
    #[error("commit {revision}: {reason}")]
    Read { revision: String, reason: String },
}

/// Fetches and reads the commit `spec` names.
pub fn fetch(spec: &FetchSpec) -> Result<Snapshot, SourceError> {
    let repo = open_repo(spec)?;
    let ssh = super::settings::is_ssh_url(&spec.url);
    let fetch_error = |reason: String| SourceError::Fetch {
        url: spec.url.clone(),
        what: spec.git_ref.describe(),
        // gix passes the ssh program's stderr (host key verification and
        // the like) through to ours, that is to the journal.
        reason: if ssh {
            format!("{reason} (ssh's own message is in the agent's log)")
        } else {
            reason
        },
    };
    let refspec = spec.git_ref.refspec();
    let has_token = spec.token.is_some();
    let remote = repo
        .remote_at(spec.url.as_str())
        .map_err(|e| fetch_error(e.to_string()))?
        .with_refspecs([refspec.as_str()], gix::remote::Direction::Fetch)
        .map_err(|e| fetch_error(e.to_string()))?
        // Only the one ref: no tag following (git's default fetches tags
        // that point into the fetched history, which nothing here reads).
        .with_fetch_tags(gix::remote::fetch::Tags::None);
    let connection = remote
        .connect(gix::remote::Direction::Fetch)
        .map_err(|e| fetch_error(chain(&e)))?
        // Never ask helpers or a terminal: the token (if any) is already in
        // the request headers, so a request for credentials means it was refused.
        .with_credentials(|_action| {
            let reason = if has_token {
                "the server refused the token (HTTP 401); check gitops.token_file and the token's scopes"
            } else {
                "the server asks for credentials (HTTP 401) and gitops.token_file is not set"
            };
            Err(gix::Error::from_error(std::io::Error::other(reason)))
        });
    let outcome = connection
        .prepare_fetch(gix::progress::Discard, Default::default())
        .map_err(|e| fetch_error(chain(&e)))?
        .with_shallow(gix::remote::fetch::Shallow::DepthAtRemote(
            NonZeroU32::new(1).expect("1 is not zero"),
        ))
        .receive(gix::progress::Discard, &AtomicBool::new(false))
        .map_err(|e| fetch_error(chain(&e)))?;
    // A fetch that matched nothing succeeds; the local ref would then be a
    // stale one from an earlier fetch.
    if outcome.ref_map.mappings.is_empty() {
        return Err(SourceError::NoSuchRef {
            url: spec.url.clone(),
            what: spec.git_ref.describe(),
        });
    }
    read_commit(&repo, spec)
}

fn open_repo(spec: &FetchSpec) -> Result<gix::Repository, SourceError> {
    let repo_error = |reason: String| SourceError::Repository {
        path: spec.repo_dir.clone(),
        reason,
    };
    let mut overrides: Vec<String> = vec![
        // Give up on a stalled transfer instead of hanging a pass.
        "http.lowSpeedLimit=1".into(),
        "http.lowSpeedTime=60".into(),
    ];
    if let Some((user, token_file)) = &spec.token {
        let token = std::fs::read_to_string(token_file).map_err(|source| SourceError::Token {
            path: token_file.clone(),
            source,
        })?;
        let credentials = base64_encode(format!("{user}:{}", token.trim()).as_bytes());
        overrides.push(format!("http.extraHeader=Authorization: Basic {credentials}"));
    }
    if let Some((key, known_hosts)) = &spec.ssh {
        overrides.push(format!(
            "core.sshCommand=ssh -i {} -o IdentitiesOnly=yes -o UserKnownHostsFile={} -o StrictHostKeyChecking=yes -o BatchMode=yes",
            shell_quote(key),
            shell_quote(known_hosts)
        ));
        overrides.push("ssh.variant=ssh".into());
    }
    let options = || gix::open::Options::isolated().config_overrides(overrides.clone());
    if !spec.repo_dir.join("HEAD").exists() {
        // A half-created directory (a crash during init) is started over:
        // the repository is a cache of the remote, nothing else lives there.
        if spec.repo_dir.exists() {
            std::fs::remove_dir_all(&spec.repo_dir).map_err(|e| repo_error(e.to_string()))?;
        }
        if let Some(parent) = spec.repo_dir.parent() {
            std::fs::create_dir_all(parent).map_err(|e| repo_error(e.to_string()))?;
        }
        gix::init_bare(&spec.repo_dir).map_err(|e| repo_error(chain(&e)))?;
    }
    let repo = gix::open_opts(&spec.repo_dir, options()).map_err(|e| repo_error(chain(&e)))?;
    Ok(repo)
}

fn read_commit(repo: &gix::Repository, spec: &FetchSpec) -> Result<Snapshot, SourceError> {
    let local_ref = spec.git_ref.local_ref();
    let read_error = |revision: &str, reason: String| SourceError::Read {
        revision: revision.to_string(),
        reason,
    };
    let mut reference = repo
        .find_reference(local_ref.as_str())
        .map_err(|e| read_error(&local_ref, chain(&e)))?;
    let id = reference
        .peel_to_id()
        .map_err(|e| read_error(&local_ref, chain(&e)))?
        .detach();
    let revision = id.to_string();
    let commit = repo
        .find_object(id)
        .map_err(|e| read_error(&revision, chain(&e)))?
        .peel_to_commit()
        .map_err(|e| read_error(&revision, chain(&e)))?;
    let revision = commit.id.to_string();
    let (signature, signed_payload) = match commit.signature().map_err(|e| read_error(&revision, chain(&e)))? {
        Some((signature, signed)) => (Some(signature.to_vec()), signed.to_bstring().to_vec()),
        None => (None, commit.data.clone()),
    };
    let subject = commit
        .message_raw_sloppy()
        .to_string()
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    let tree = commit.tree().map_err(|e| read_error(&revision, chain(&e)))?;
    let subdir = spec.repo_subdir.trim_matches('/');
    let root = if subdir.is_empty() {
        tree.id
    } else {
        let entry = tree
            .lookup_entry_by_path(subdir)
            .map_err(|e| read_error(&revision, chain(&e)))?
            .ok_or_else(|| read_error(&revision, format!("there is no directory {subdir:?}")))?;
        if !entry.mode().is_tree() {
            return Err(read_error(&revision, format!("{subdir:?} is not a directory")));
        }
        entry.object_id()
    };
    let mut files = BTreeMap::new();
    walk(repo, root, "", &mut files).map_err(|reason| read_error(&revision, reason))?;
    Ok(Snapshot {
        revision,
        subject,
        signature,
        signed_payload,
        files,
    })
}

fn walk(
    repo: &gix::Repository,
    tree: gix::ObjectId,
    prefix: &str,
    out: &mut BTreeMap<String, Vec<u8>>,
) -> Result<(), String> {
    let tree = repo.find_tree(tree).map_err(|e| chain(&e))?;
    let entries: Vec<(String, gix::object::tree::EntryMode, gix::ObjectId)> = tree
        .decode()
        .map_err(|e| chain(&e))?
        .entries
        .iter()
        .map(|e| (e.filename.to_string(), e.mode, e.oid.to_owned()))
        .collect();
    for (name, mode, oid) in entries {
        let path = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        if mode.is_tree() {
            walk(repo, oid, &path, out)?;
        } else if mode.is_blob() {
            let wanted = is_manifest_file(&path) || path.rsplit('/').next() == Some("Kustomization");
            let content = if wanted {
                repo.find_blob(oid).map_err(|e| chain(&e))?.data.clone()
            } else {
                Vec::new()
            };
            out.insert(path, content);
        }
        // Symlinks and submodules are not followed.
    }
    Ok(())
}

/// An error with its sources, on one line.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', "'\\''"))
}

fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("x-access-token:ghp_abc", "eC1hY2Nlc3MtdG9rZW46Z2hwX2FiYw=="),
        ] {
            assert_eq!(base64_encode(input.as_bytes()), expected, "{input}");
        }
    }

    #[test]
    fn quotes_paths_for_the_shell() {
        assert_eq!(shell_quote(Path::new("/a b/it's")), "'/a b/it'\\''s'");
    }
}
