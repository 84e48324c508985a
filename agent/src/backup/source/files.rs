//! Files and directories below a base directory (Traefik's acme.json and
//! the like) as a tar archive, streamed file by file; symlinks are stored
//! as links, owners and modes are kept.

use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use tokio_util::sync::CancellationToken;

use super::SourceError;
use crate::backup::settings::FilesSource;

pub const FORMAT: &str = "files-tar";

pub fn write_archive(
    settings: &FilesSource,
    out: &mut dyn Write,
    cancel: &CancellationToken,
) -> Result<(), SourceError> {
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    for rel in &settings.paths {
        if cancel.is_cancelled() {
            return Err(SourceError::Cancelled);
        }
        let full = settings.base_dir.join(rel);
        let meta =
            std::fs::symlink_metadata(&full).map_err(|e| SourceError::io(format!("stat {}", full.display()), e))?;
        let result = if meta.is_dir() {
            builder.append_dir_all(rel, &full)
        } else {
            builder.append_path_with_name(&full, rel)
        };
        result.map_err(|e| {
            if cancel.is_cancelled() {
                SourceError::Cancelled
            } else {
                SourceError::io(format!("archive {}", full.display()), e)
            }
        })?;
    }
    builder
        .into_inner()
        .map_err(|e| SourceError::io("finish the archive", e))?
        .flush()
        .map_err(|e| SourceError::io("finish the archive", e))
}

/// Reads the whole archive; returns (entries, bytes of file content).
pub fn check(input: &mut dyn Read) -> Result<(u64, u64), SourceError> {
    let mut archive = tar::Archive::new(input);
    let (mut entries, mut bytes) = (0u64, 0u64);
    for entry in archive
        .entries()
        .map_err(|e| SourceError::Invalid(format!("not a tar archive: {e}")))?
    {
        let mut entry = entry.map_err(|e| SourceError::Invalid(format!("damaged archive: {e}")))?;
        bytes += std::io::copy(&mut entry, &mut std::io::sink())
            .map_err(|e| SourceError::Invalid(format!("damaged archive: {e}")))?;
        entries += 1;
    }
    if entries == 0 {
        return Err(SourceError::Invalid("the archive is empty".into()));
    }
    Ok((entries, bytes))
}

/// Unpacks into `staging` (a fresh directory on the target's filesystem),
/// then moves every file into `target`; with existing files and no
/// `force`, nothing is moved and the restore is refused.
pub fn restore(
    input: &mut dyn Read,
    staging: &Path,
    target: &Path,
    force: bool,
) -> Result<(u64, Vec<PathBuf>), SourceError> {
    let mut archive = tar::Archive::new(input);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(nix::unistd::geteuid().is_root());
    archive.set_overwrite(true);
    archive
        .unpack(staging)
        .map_err(|e| SourceError::Invalid(format!("cannot unpack the archive: {e}")))?;
    let mut files = Vec::new();
    collect_files(staging, staging, &mut files)?;
    let existing: Vec<&PathBuf> = files.iter().filter(|rel| target.join(rel).exists()).collect();
    if !existing.is_empty() && !force {
        let names: Vec<String> = existing.iter().take(5).map(|p| p.display().to_string()).collect();
        return Err(SourceError::Refused(format!(
            "{} file(s) exist under {} ({}{}); pass --force to overwrite them",
            existing.len(),
            target.display(),
            names.join(", "),
            if existing.len() > 5 { ", ..." } else { "" }
        )));
    }
    for rel in &files {
        let dest = target.join(rel);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| SourceError::io(format!("create {}", parent.display()), e))?;
        }
        std::fs::rename(staging.join(rel), &dest)
            .map_err(|e| SourceError::io(format!("move into {}", dest.display()), e))?;
    }
    Ok((files.len() as u64, files))
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), SourceError> {
    for entry in std::fs::read_dir(dir).map_err(|e| SourceError::io(format!("list {}", dir.display()), e))? {
        let entry = entry.map_err(|e| SourceError::io(format!("list {}", dir.display()), e))?;
        let path = entry.path();
        let kind = entry
            .file_type()
            .map_err(|e| SourceError::io(format!("stat {}", path.display()), e))?;
        if kind.is_dir() {
            collect_files(root, &path, out)?;
        } else if let Ok(rel) = path.strip_prefix(root) {
            if rel.components().all(|c| matches!(c, Component::Normal(_))) {
                out.push(rel.to_path_buf());
            }
        }
    }
    out.sort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archives_checks_and_restores_without_overwriting() {
        let base = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(base.path().join("traefik")).unwrap();
        std::fs::write(base.path().join("traefik/acme.json"), b"{\"certs\":1}").unwrap();
        std::fs::create_dir_all(base.path().join("other/deep")).unwrap();
        std::fs::write(base.path().join("other/deep/x"), vec![1u8; 10_000]).unwrap();
        let settings = FilesSource {
            base_dir: base.path().to_path_buf(),
            paths: vec!["traefik/acme.json".into(), "other".into()],
        };
        let mut archive = Vec::new();
        write_archive(&settings, &mut archive, &CancellationToken::new()).unwrap();
        let (entries, bytes) = check(&mut &archive[..]).unwrap();
        assert!(entries >= 3, "{entries}");
        assert_eq!(bytes, 10_000 + 11);

        let target = tempfile::tempdir().unwrap();
        let staging = tempfile::tempdir().unwrap();
        let (count, _) = restore(&mut &archive[..], staging.path(), target.path(), false).unwrap();
        assert_eq!(count, 2);
        assert_eq!(
            std::fs::read(target.path().join("traefik/acme.json")).unwrap(),
            b"{\"certs\":1}"
        );

        std::fs::write(target.path().join("traefik/acme.json"), b"newer").unwrap();
        let staging = tempfile::tempdir().unwrap();
        let err = restore(&mut &archive[..], staging.path(), target.path(), false).unwrap_err();
        assert!(matches!(err, SourceError::Refused(_)), "{err}");
        assert_eq!(
            std::fs::read(target.path().join("traefik/acme.json")).unwrap(),
            b"newer"
        );
        let staging = tempfile::tempdir().unwrap();
        restore(&mut &archive[..], staging.path(), target.path(), true).unwrap();
        assert_eq!(
            std::fs::read(target.path().join("traefik/acme.json")).unwrap(),
            b"{\"certs\":1}"
        );
    }

    #[test]
    fn a_truncated_archive_fails_the_check() {
        let base = tempfile::tempdir().unwrap();
        std::fs::write(base.path().join("f"), vec![9u8; 50_000]).unwrap();
        let settings = FilesSource {
            base_dir: base.path().to_path_buf(),
            paths: vec![".".into()],
        };
        let mut archive = Vec::new();
        write_archive(&settings, &mut archive, &CancellationToken::new()).unwrap();
        assert!(check(&mut &archive[..20_000]).is_err());
    }
}
