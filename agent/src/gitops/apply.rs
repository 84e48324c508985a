//! From the rendered files to the manifests directory: what changes (the
//! plan, which is also `reconcile --diff`), the prune guard, and the writes.
//!
//! - Every write is atomic (temp file in the same directory, fsync, rename,
//!   fsync the directory: `fsutil::write_atomic`), and only files whose
//!   content differs are written, because K3s re-applies a manifest when its
//!   mtime changes.
//! - Drift: a file the agent wrote that was edited or deleted by hand is
//!   rewritten on the next pass (action `restore`).
//! - Prune: only files in the agent's inventory (files it wrote itself, in
//!   the state store) can ever be removed; foreign files in the directory are
//!   never touched. With `prune = false` files that left Git stay (`retain`);
//!   with `prune = true` they go, unless more than `prune_max_fraction` of the
//!   managed files would go in one pass: then none goes and the pass says why.
//!   K3s does not delete the objects of a removed manifest; deleting them
//!   through the Kubernetes API is not built (see the README).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::render::Manifest;
use super::settings::BootstrapSecret;

/// Mode of the files written to the manifests directory (K3s reads them as root).
pub const MANIFEST_MODE: u32 = 0o600;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// New in Git.
    Add,
    /// Changed in Git.
    Update,
    /// Unchanged in Git but edited or deleted on disk: written back.
    Restore,
    /// Gone from Git and removed (prune on).
    Prune,
    /// Gone from Git and kept (prune off, or refused by the guard).
    Retain,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Add => "add",
            Action::Update => "update",
            Action::Restore => "restore",
            Action::Prune => "prune",
            Action::Retain => "retain",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The file's name in the manifests directory.
    pub file: String,
    pub action: Action,
    /// Its path in the repository (below `repo_subdir`), when it has one.
    pub source: Option<String>,
}

/// A file the agent wrote, as the state store remembers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InventoryEntry {
    pub sha256: String,
    pub revision: String,
}

pub type Inventory = BTreeMap<String, InventoryEntry>;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub changes: Vec<Change>,
    /// Files already as Git has them.
    pub unchanged: usize,
    /// Why a prune was refused, when it was.
    pub prune_refused: Option<String>,
}

impl Plan {
    pub fn writes(&self) -> impl Iterator<Item = &Change> {
        self.changes
            .iter()
            .filter(|c| matches!(c.action, Action::Add | Action::Update | Action::Restore))
    }

    pub fn count(&self, action: Action) -> usize {
        self.changes.iter().filter(|c| c.action == action).count()
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Whether removing `removing` of `managed` files stays within the fraction.
pub fn prune_allowed(removing: usize, managed: usize, max_fraction: f64) -> bool {
    if removing == 0 {
        return true;
    }
    if managed == 0 {
        return false;
    }
    // The small epsilon keeps 1 of 4 at 0.25 allowed despite float rounding.
    (removing as f64) <= max_fraction * managed as f64 + 1e-9
}

/// Compares Git (`desired`), the inventory and the directory.
pub fn plan(
    desired: &BTreeMap<String, Manifest>,
    inventory: &Inventory,
    dir: &Path,
    prune: bool,
    max_fraction: f64,
) -> Plan {
    let mut plan = Plan::default();
    for (name, manifest) in desired {
        let on_disk = std::fs::read(dir.join(name)).ok();
        if on_disk.as_deref() == Some(manifest.content.as_slice()) {
            plan.unchanged += 1;
            continue;
        }
        let wanted = sha256_hex(&manifest.content);
        let action = match inventory.get(name) {
            Some(entry) if entry.sha256 == wanted => Action::Restore,
            Some(_) => Action::Update,
            None if on_disk.is_some() => Action::Update,
            None => Action::Add,
        };
        plan.changes.push(Change {
            file: name.clone(),
            action,
            source: Some(manifest.source.clone()),
        });
    }
    let stale: Vec<&String> = inventory.keys().filter(|name| !desired.contains_key(*name)).collect();
    let mut action = if prune { Action::Prune } else { Action::Retain };
    if prune && !prune_allowed(stale.len(), inventory.len(), max_fraction) {
        plan.prune_refused = Some(format!(
            "prune refused: {} of {} managed files left Git, more than gitops.prune_max_fraction = {} allows in one pass; nothing was removed ({})",
            stale.len(),
            inventory.len(),
            max_fraction,
            stale.iter().take(5).map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        ));
        action = Action::Retain;
    }
    for name in stale {
        plan.changes.push(Change {
            file: name.clone(),
            action,
            source: None,
        });
    }
    plan
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("bootstrap secret {}: cannot read {}: {source}", destination.display(), source_file.display())]
    SecretSource {
        source_file: PathBuf,
        destination: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: cannot write: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: cannot remove: {source}", path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

/// Places the bootstrap secrets that are missing or differ; returns how many
/// were written.
pub fn place_secrets(secrets: &[BootstrapSecret]) -> Result<usize, ApplyError> {
    let mut written = 0;
    for secret in secrets.iter().filter(|s| s.backup_job.is_empty()) {
        let content = std::fs::read(&secret.source_file).map_err(|source| ApplyError::SecretSource {
            source_file: secret.source_file.clone(),
            destination: secret.destination.clone(),
            source,
        })?;
        let mode = secret.mode_bits().map_err(ApplyError::Invalid)?;
        if crate::fsutil::write_if_changed(&secret.destination, &content, mode).map_err(|source| ApplyError::Write {
            path: secret.destination.clone(),
            source,
        })? {
            written += 1;
        }
    }
    Ok(written)
}

/// What one apply did to the directory, for the inventory.
#[derive(Debug, Default)]
pub struct Applied {
    /// name -> (sha256, source) of every desired file now on disk as Git has it.
    pub present: BTreeMap<String, (String, String)>,
    pub removed: Vec<String>,
    pub written: usize,
}

/// Carries out `plan`. Writes first, then removals; stops at the first error
/// (what was done so far is reported through the error path's caller, which
/// re-plans on the next pass).
pub fn apply(desired: &BTreeMap<String, Manifest>, plan: &Plan, dir: &Path) -> Result<Applied, ApplyError> {
    let mut applied = Applied::default();
    std::fs::create_dir_all(dir).map_err(|source| ApplyError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    for change in plan.writes() {
        let manifest = &desired[&change.file];
        let path = dir.join(&change.file);
        crate::fsutil::write_atomic(&path, &manifest.content, MANIFEST_MODE)
            .map_err(|source| ApplyError::Write { path, source })?;
        applied.written += 1;
    }
    for (name, manifest) in desired {
        applied
            .present
            .insert(name.clone(), (sha256_hex(&manifest.content), manifest.source.clone()));
    }
    let removals: Vec<&Change> = plan.changes.iter().filter(|c| c.action == Action::Prune).collect();
    for change in &removals {
        let path = dir.join(&change.file);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(ApplyError::Remove { path, source }),
        }
        applied.removed.push(change.file.clone());
    }
    if !removals.is_empty() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| ApplyError::Remove {
                path: dir.to_path_buf(),
                source,
            })?;
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifests(entries: &[(&str, &str)]) -> BTreeMap<String, Manifest> {
        entries
            .iter()
            .map(|(name, text)| {
                (
                    name.to_string(),
                    Manifest {
                        source: name.to_string(),
                        content: text.as_bytes().to_vec(),
                    },
                )
            })
            .collect()
    }

    fn inventory_of(entries: &[(&str, &str)]) -> Inventory {
        entries
            .iter()
            .map(|(name, text)| {
                (
                    name.to_string(),
                    InventoryEntry {
                        sha256: sha256_hex(text.as_bytes()),
                        revision: "r1".into(),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn prune_fraction_guard() {
        assert!(prune_allowed(0, 0, 0.0));
        assert!(prune_allowed(1, 4, 0.25));
        assert!(!prune_allowed(2, 4, 0.25));
        assert!(!prune_allowed(1, 1, 0.25));
        assert!(prune_allowed(1, 1, 1.0));
        assert!(!prune_allowed(1, 10, 0.0));
        assert!(prune_allowed(3, 10, 0.3));
    }

    #[test]
    fn plans_adds_updates_restores_and_guarded_prunes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("g-same.yaml"), "same").unwrap();
        std::fs::write(dir.path().join("g-edited.yaml"), "hand edit").unwrap();
        std::fs::write(dir.path().join("g-changed.yaml"), "old").unwrap();
        std::fs::write(dir.path().join("foreign.yaml"), "not ours").unwrap();
        let desired = manifests(&[
            ("g-same.yaml", "same"),
            ("g-edited.yaml", "git"),
            ("g-changed.yaml", "new"),
            ("g-new.yaml", "new"),
        ]);
        let inventory = inventory_of(&[
            ("g-same.yaml", "same"),
            ("g-edited.yaml", "git"),
            ("g-changed.yaml", "old"),
            ("g-gone.yaml", "gone"),
        ]);
        let plan = plan(&desired, &inventory, dir.path(), false, 0.25);
        let actions: Vec<(&str, Action)> = plan.changes.iter().map(|c| (c.file.as_str(), c.action)).collect();
        assert_eq!(
            actions,
            [
                ("g-changed.yaml", Action::Update),
                ("g-edited.yaml", Action::Restore),
                ("g-new.yaml", Action::Add),
                ("g-gone.yaml", Action::Retain),
            ]
        );
        assert_eq!(plan.unchanged, 1);
        let with_prune = super::plan(&desired, &inventory, dir.path(), true, 0.25);
        assert_eq!(with_prune.count(Action::Prune), 1);
        assert!(with_prune.prune_refused.is_none());

        // Three of four managed files gone: refused whole.
        let few = manifests(&[("g-same.yaml", "same")]);
        let refused = super::plan(&few, &inventory, dir.path(), true, 0.25);
        assert_eq!(refused.count(Action::Prune), 0);
        assert_eq!(refused.count(Action::Retain), 3);
        assert!(refused.prune_refused.unwrap().contains("3 of 4"));

        let applied = apply(&desired, &with_prune, dir.path()).unwrap();
        assert_eq!(applied.written, 3);
        assert_eq!(std::fs::read(dir.path().join("g-edited.yaml")).unwrap(), b"git");
        assert_eq!(
            std::fs::read(dir.path().join("foreign.yaml")).unwrap(),
            b"not ours",
            "foreign files are never touched"
        );
        let again = super::plan(&desired, &inventory, dir.path(), false, 0.25);
        assert_eq!(again.writes().count(), 0);
    }
}
