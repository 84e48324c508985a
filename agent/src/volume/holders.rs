//! Who holds a filesystem busy: open files, working directories, root
//! directories, memory-mapped files and executables of every process, found
//! by walking /proc (what fuser -m and lsof do). Before /data is unmounted the
//! agent proves this list is empty; if it is not, it names the processes
//! instead of forcing the unmount.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub pid: i32,
    pub command: String,
    /// "fd 3 /data/x.db", "cwd /data", "mmap /data/lib.so", ...
    pub what: String,
    /// The file or directory held.
    pub path: PathBuf,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} ({}): {}", self.pid, self.command, self.what)
    }
}

/// Processes using anything on the filesystem whose device is `device`
/// (st_dev of the mount point). Our own process is included: the agent must
/// not hold /data either.
pub fn holders_of_device(device: u64) -> Vec<Holder> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let proc_dir = entry.path();
        let command = std::fs::read_to_string(proc_dir.join("comm"))
            .map(|c| c.trim().to_string())
            .unwrap_or_default();
        let mut add = |what: String, path: PathBuf| {
            found.push(Holder {
                pid,
                command: command.clone(),
                what: format!("{what} {}", path.display()),
                path,
            })
        };
        for link in ["cwd", "root", "exe"] {
            let path = proc_dir.join(link);
            if on_device(&path, device) {
                add(link.to_string(), std::fs::read_link(&path).unwrap_or_default());
            }
        }
        if let Ok(fds) = std::fs::read_dir(proc_dir.join("fd")) {
            for fd in fds.flatten() {
                if on_device(&fd.path(), device) {
                    add(
                        format!("fd {}", fd.file_name().to_string_lossy()),
                        std::fs::read_link(fd.path()).unwrap_or_default(),
                    );
                }
            }
        }
        if let Ok(maps) = std::fs::read_to_string(proc_dir.join("maps")) {
            let mut seen = std::collections::BTreeSet::new();
            for line in maps.lines() {
                // address perms offset dev inode path
                let mut fields = line.split_whitespace();
                let dev = fields.nth(3);
                let path = fields.nth(1);
                if let (Some(dev), Some(path)) = (dev, path) {
                    if maps_device(dev) == Some(device) && seen.insert(path.to_string()) {
                        add("mmap".into(), PathBuf::from(path));
                    }
                }
            }
        }
    }
    found
}

/// `stat` follows /proc/PID/{fd,cwd,...} to the real file; a process that
/// vanished meanwhile simply is not a holder.
fn on_device(path: &Path, device: u64) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.dev() == device)
}

/// /proc/PID/maps writes the device as hex "major:minor".
fn maps_device(field: &str) -> Option<u64> {
    let (major, minor) = field.split_once(':')?;
    let major = u64::from_str_radix(major, 16).ok()?;
    let minor = u64::from_str_radix(minor, 16).ok()?;
    Some(libc::makedev(major as u32, minor as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_an_open_file_and_a_cwd_in_another_process() {
        let dir = tempfile::tempdir().unwrap();
        let device = std::fs::metadata(dir.path()).unwrap().dev();
        let held = dir.path().join("held");
        std::fs::write(&held, b"x").unwrap();
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg("exec 3<\"$1\"; cd \"$2\"; read _")
            .arg("sh")
            .arg(&held)
            .arg(dir.path())
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let holders = loop {
            let mine: Vec<Holder> = holders_of_device(device).into_iter().filter(|h| h.pid == pid).collect();
            if mine.iter().any(|h| h.what.starts_with("fd 3")) && mine.iter().any(|h| h.what.starts_with("cwd")) {
                break mine;
            }
            assert!(std::time::Instant::now() < deadline, "holder not found: {mine:?}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert!(
            holders.iter().any(|h| h.what.ends_with("/held") && h.command == "sh"),
            "{holders:?}"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn maps_device_is_hex() {
        assert_eq!(maps_device("fd:01"), Some(libc::makedev(0xfd, 1)));
        assert_eq!(maps_device("zz"), None);
    }
}
