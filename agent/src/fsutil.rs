//! Files the agent writes: temp file in the same directory, fsync, rename,
//! fsync the directory. A reader (K3s, systemd, the next agent) sees the old
//! file or the new one, never a torn one, even across a power cut.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut temp = tempfile::Builder::new().prefix(".pa-tmp-").tempfile_in(dir)?;
    temp.write_all(contents)?;
    temp.as_file().set_permissions(std::fs::Permissions::from_mode(mode))?;
    temp.as_file().sync_all()?;
    temp.persist(path).map_err(|err| err.error)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Writes only when the content differs, so that watchers keyed on mtime
/// (K3s's manifest loader, systemd) are not woken for nothing. Returns
/// whether it wrote.
pub fn write_if_changed(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<bool> {
    match std::fs::read(path) {
        Ok(existing) if existing == contents => Ok(false),
        _ => write_atomic(path, contents, mode).map(|()| true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_replaces_and_skips_identical_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/file.conf");
        assert!(write_if_changed(&path, b"one", 0o640).unwrap());
        assert!(!write_if_changed(&path, b"one", 0o640).unwrap());
        assert!(write_if_changed(&path, b"two", 0o640).unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
    }
}
