//! The /data volume: mounted through a systemd .mount unit (so the mount is in
//! the host's namespace, where K3s sees it), proven to be the configured
//! filesystem (device identity plus a marker file the agent writes on first
//! adoption), laid out with the configured directories, and unmounted last,
//! only when nothing holds it.

mod backend;
pub mod holders;
pub mod mountinfo;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use backend::{unit_name_for_path, SimMount, SystemdMount, VolumeBackend};
pub use holders::Holder;

pub const MARKER_FILE: &str = ".platform-agent-volume";

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct VolumeSettings {
    pub enabled: bool,
    /// "systemd" mounts a real device; "sim" uses a plain directory.
    pub backend: VolumeBackendKind,
    /// Exactly one of uuid, label, device names the filesystem.
    pub uuid: String,
    pub label: String,
    pub device: PathBuf,
    pub fs_type: String,
    pub options: Vec<String>,
    pub mount_point: PathBuf,
    /// Write the marker on a filesystem that has none. Off: refuse such a
    /// filesystem (for operators who adopt volumes by hand).
    pub adopt: bool,
    #[serde(with = "crate::config::duration")]
    pub mount_timeout: Duration,
    pub directories: Vec<DirectorySpec>,
}

impl Default for VolumeSettings {
    fn default() -> Self {
        VolumeSettings {
            enabled: false,
            backend: VolumeBackendKind::Systemd,
            uuid: String::new(),
            label: String::new(),
            device: PathBuf::new(),
            fs_type: "ext4".into(),
            options: vec!["noatime".into()],
            mount_point: PathBuf::from("/data"),
            adopt: true,
            mount_timeout: Duration::from_secs(90),
            directories: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeBackendKind {
    Systemd,
    Sim,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DirectorySpec {
    /// Relative to the mount point.
    pub path: String,
    #[serde(default)]
    pub owner: u32,
    #[serde(default)]
    pub group: u32,
    #[serde(default = "default_mode")]
    pub mode: String,
    /// Also re-own everything already inside (never crossing into other
    /// filesystems). Off by default: existing content is left as it is.
    #[serde(default)]
    pub recursive_chown: bool,
}

fn default_mode() -> String {
    "0755".into()
}

impl VolumeSettings {
    /// How the configuration names the filesystem, as written in the marker.
    pub fn identity(&self) -> String {
        if !self.uuid.is_empty() {
            format!("uuid={}", self.uuid)
        } else if !self.label.is_empty() {
            format!("label={}", self.label)
        } else {
            format!("device={}", self.device.display())
        }
    }

    /// The device node for the configured identity (udev's by-uuid/by-label
    /// links), whether or not it exists right now.
    pub fn device_path(&self) -> PathBuf {
        if !self.uuid.is_empty() {
            PathBuf::from("/dev/disk/by-uuid").join(&self.uuid)
        } else if !self.label.is_empty() {
            PathBuf::from("/dev/disk/by-label").join(&self.label)
        } else {
            self.device.clone()
        }
    }

    /// Problems as (key below `volume.`, message).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        if !self.enabled {
            return problems;
        }
        let named = [
            !self.uuid.is_empty(),
            !self.label.is_empty(),
            !self.device.as_os_str().is_empty(),
        ]
        .iter()
        .filter(|set| **set)
        .count();
        if self.backend == VolumeBackendKind::Systemd && named != 1 {
            problems.push((
                "uuid".into(),
                format!("set exactly one of volume.uuid, volume.label, volume.device (found {named})"),
            ));
        }
        if self.mount_point.is_relative() || self.mount_point == Path::new("/") {
            problems.push((
                "mount_point".into(),
                format!("{} must be an absolute path other than /", self.mount_point.display()),
            ));
        }
        if self.fs_type.is_empty() {
            problems.push(("fs_type".into(), "must not be empty".into()));
        }
        for (index, dir) in self.directories.iter().enumerate() {
            if let Err(message) = check_relative(&dir.path) {
                problems.push((format!("directories[{index}].path"), message));
            }
            if parse_mode(&dir.mode).is_none() {
                problems.push((
                    format!("directories[{index}].mode"),
                    format!("{:?} is not an octal mode like \"0755\"", dir.mode),
                ));
            }
        }
        problems
    }
}

fn check_relative(path: &str) -> Result<(), String> {
    let p = Path::new(path);
    if path.is_empty() || p.is_absolute() || p.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(format!(
            "{path:?} must be a relative path below the mount point without `.` or `..`"
        ));
    }
    Ok(())
}

fn parse_mode(mode: &str) -> Option<u32> {
    u32::from_str_radix(mode, 8).ok().filter(|m| *m <= 0o7777)
}

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("{}: {action}: {source}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("mount {}: {source}", mount_point.display())]
    Systemd {
        mount_point: PathBuf,
        #[source]
        source: crate::systemd::SystemdError,
    },
    #[error("{}: refusing to follow the symlink {}", root.display(), link.display())]
    Symlink { root: PathBuf, link: PathBuf },
    #[error("{} is busy; not unmounting: {}", mount_point.display(), holders.iter().map(|h| h.to_string()).collect::<Vec<_>>().join("; "))]
    Busy { mount_point: PathBuf, holders: Vec<Holder> },
}

fn io(path: &Path, action: &'static str) -> impl FnOnce(std::io::Error) -> VolumeError {
    let path = path.to_path_buf();
    move |source| VolumeError::Io { path, action, source }
}

/// What the agent knows about the volume, for the status model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum MountState {
    /// The configured device node does not exist (disk not attached yet).
    DeviceAbsent {
        device: String,
    },
    Mounted,
    /// Mounted, but not the filesystem the configuration names.
    WrongVolume {
        reason: String,
    },
    Unmounted,
    /// An unmount was refused because these processes use the volume.
    Busy {
        holders: Vec<Holder>,
    },
    Failed {
        reason: String,
    },
}

/// Operator words for journald and status reasons (the serialized form is
/// for machines).
impl std::fmt::Display for MountState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MountState::DeviceAbsent { device } => write!(f, "device {device} is not present"),
            MountState::Mounted => f.write_str("mounted"),
            MountState::WrongVolume { reason } => write!(f, "wrong volume: {reason}"),
            MountState::Unmounted => f.write_str("not mounted"),
            MountState::Busy { holders } => {
                f.write_str("busy: ")?;
                for (i, holder) in holders.iter().enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    write!(f, "{holder}")?;
                }
                Ok(())
            }
            MountState::Failed { reason } => write!(f, "failed: {reason}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub mount_state: MountState,
    pub mount_point: String,
    pub identity: String,
    pub size_bytes: u64,
    pub free_bytes: u64,
    pub avail_bytes: u64,
    pub files: u64,
    pub files_free: u64,
    /// Directories created by the last layout pass.
    pub created: Vec<String>,
}

impl VolumeStatus {
    pub fn is_ready(&self) -> bool {
        self.mount_state == MountState::Mounted
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    identity: String,
    adopted_at: u64,
}

pub struct Volume {
    settings: VolumeSettings,
    backend: Box<dyn VolumeBackend>,
}

impl Volume {
    pub fn new(settings: VolumeSettings, backend: Box<dyn VolumeBackend>) -> Self {
        Volume { settings, backend }
    }

    pub fn mount_point(&self) -> &Path {
        &self.settings.mount_point
    }

    fn status(&self, mount_state: MountState) -> VolumeStatus {
        let mut status = VolumeStatus {
            mount_state,
            mount_point: self.settings.mount_point.display().to_string(),
            identity: self.settings.identity(),
            size_bytes: 0,
            free_bytes: 0,
            avail_bytes: 0,
            files: 0,
            files_free: 0,
            created: Vec::new(),
        };
        if status.is_ready() {
            if let Ok(vfs) = nix::sys::statvfs::statvfs(&self.settings.mount_point) {
                let fragment = vfs.fragment_size();
                status.size_bytes = vfs.blocks() * fragment;
                status.free_bytes = vfs.blocks_free() * fragment;
                status.avail_bytes = vfs.blocks_available() * fragment;
                status.files = vfs.files();
                status.files_free = vfs.files_free();
            }
        }
        status
    }

    /// Current state without changing anything.
    pub async fn inspect(&self) -> VolumeStatus {
        let state = match self.backend.is_mounted() {
            Err(err) => MountState::Failed {
                reason: err.to_string(),
            },
            Ok(false) if !self.backend.device_present() => MountState::DeviceAbsent {
                device: self.settings.device_path().display().to_string(),
            },
            Ok(false) => MountState::Unmounted,
            Ok(true) => match self.check_identity() {
                Ok(()) => MountState::Mounted,
                Err(reason) => MountState::WrongVolume { reason },
            },
        };
        self.status(state)
    }

    /// Mounts if needed, proves identity, lays out directories.
    pub async fn ensure_ready(&self) -> VolumeStatus {
        match self.backend.is_mounted() {
            Err(err) => {
                return self.status(MountState::Failed {
                    reason: err.to_string(),
                })
            }
            Ok(true) => {}
            Ok(false) => {
                if !self.backend.device_present() {
                    return self.status(MountState::DeviceAbsent {
                        device: self.settings.device_path().display().to_string(),
                    });
                }
                if let Err(err) = self.backend.mount().await {
                    return self.status(MountState::Failed {
                        reason: err.to_string(),
                    });
                }
            }
        }
        if let Err(reason) = self.check_identity() {
            return self.status(MountState::WrongVolume { reason });
        }
        if let Err(err) = self.adopt_if_new() {
            return self.status(MountState::WrongVolume { reason: err });
        }
        match self.layout() {
            Ok(created) => {
                let mut status = self.status(MountState::Mounted);
                status.created = created;
                status
            }
            Err(err) => self.status(MountState::Failed {
                reason: err.to_string(),
            }),
        }
    }

    fn marker_path(&self) -> PathBuf {
        self.settings.mount_point.join(MARKER_FILE)
    }

    /// The device check (the mounted filesystem is the configured device)
    /// and the marker check (a marker, if present, names this identity).
    fn check_identity(&self) -> Result<(), String> {
        self.backend.identity_matches()?;
        match std::fs::read(self.marker_path()) {
            Ok(bytes) => {
                let marker: Marker = serde_json::from_slice(&bytes)
                    .map_err(|err| format!("{} is unreadable: {err}", self.marker_path().display()))?;
                if marker.identity != self.settings.identity() {
                    return Err(format!(
                        "{} says this is the volume {}, the configuration expects {}",
                        self.marker_path().display(),
                        marker.identity,
                        self.settings.identity()
                    ));
                }
                Ok(())
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(format!("cannot read {}: {err}", self.marker_path().display())),
        }
    }

    fn adopt_if_new(&self) -> Result<(), String> {
        let path = self.marker_path();
        if path.exists() {
            return Ok(());
        }
        if !self.settings.adopt {
            return Err(format!(
                "{} has no {MARKER_FILE} and volume.adopt is off",
                self.settings.mount_point.display()
            ));
        }
        let marker = Marker {
            identity: self.settings.identity(),
            adopted_at: crate::status::unix_now(),
        };
        crate::fsutil::write_atomic(
            &path,
            &serde_json::to_vec_pretty(&marker).expect("marker serializes"),
            0o644,
        )
        .map_err(|err| format!("cannot write {}: {err}", path.display()))
    }

    /// Creates missing directories with their owner and mode, and corrects
    /// the owner and mode of existing ones (only the directory itself unless
    /// recursive_chown). Never deletes anything. Returns what it created.
    pub fn layout(&self) -> Result<Vec<String>, VolumeError> {
        let root = &self.settings.mount_point;
        let mut created = Vec::new();
        for spec in &self.settings.directories {
            let mode = parse_mode(&spec.mode).unwrap_or(0o755);
            let mut current = root.clone();
            for component in Path::new(&spec.path).components() {
                current.push(component);
                match std::fs::symlink_metadata(&current) {
                    Ok(meta) if meta.file_type().is_symlink() => {
                        return Err(VolumeError::Symlink {
                            root: root.clone(),
                            link: current,
                        })
                    }
                    Ok(_) => {}
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                        std::fs::create_dir(&current).map_err(io(&current, "create directory"))?;
                        created.push(current.display().to_string());
                    }
                    Err(err) => return Err(io(&current, "inspect")(err)),
                }
            }
            let meta = std::fs::symlink_metadata(&current).map_err(io(&current, "inspect"))?;
            if !meta.is_dir() {
                return Err(io(&current, "lay out")(std::io::Error::other(
                    "exists and is not a directory",
                )));
            }
            if meta.uid() != spec.owner || meta.gid() != spec.group {
                std::os::unix::fs::lchown(&current, Some(spec.owner), Some(spec.group))
                    .map_err(io(&current, "chown"))?;
            }
            if meta.mode() & 0o7777 != mode {
                std::fs::set_permissions(&current, std::fs::Permissions::from_mode(mode))
                    .map_err(io(&current, "chmod"))?;
            }
            if spec.recursive_chown {
                chown_tree(&current, meta.dev(), spec.owner, spec.group)?;
            }
        }
        Ok(created)
    }

    /// Unmounts only after proving nothing holds the volume; otherwise
    /// returns the holders. Never lazy, never forced.
    pub async fn unmount_checked(&self) -> Result<(), VolumeError> {
        if !self.backend.is_mounted().unwrap_or(true) {
            return Ok(());
        }
        let holders = self.holders();
        if !holders.is_empty() {
            return Err(VolumeError::Busy {
                mount_point: self.settings.mount_point.clone(),
                holders,
            });
        }
        self.backend.unmount().await
    }

    /// Processes using the volume, and mounts stacked below it.
    pub fn holders(&self) -> Vec<Holder> {
        let root = &self.settings.mount_point;
        let Ok(meta) = std::fs::metadata(root) else {
            return Vec::new();
        };
        let mounts = mountinfo::read().unwrap_or_default();
        let mut holders = holders::holders_of_device(meta.dev());
        // A mount point of its own: everything on that filesystem counts. A
        // plain directory (the sim): only what lies below it.
        if mountinfo::mount_at(&mounts, root).is_none() {
            holders.retain(|h| h.path.starts_with(root));
        }
        for below in mountinfo::mounts_below(&mounts, root) {
            holders.push(Holder {
                pid: 0,
                command: "mount".into(),
                what: format!("{} ({}) mounted below", below.mount_point.display(), below.fs_type),
                path: below.mount_point.clone(),
            });
        }
        holders
    }
}

/// Re-owns a tree without following symlinks or crossing into other filesystems.
fn chown_tree(dir: &Path, device: u64, owner: u32, group: u32) -> Result<(), VolumeError> {
    for entry in std::fs::read_dir(dir).map_err(io(dir, "read directory"))? {
        let entry = entry.map_err(io(dir, "read directory"))?;
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path).map_err(io(&path, "inspect"))?;
        if meta.dev() != device {
            continue;
        }
        std::os::unix::fs::lchown(&path, Some(owner), Some(group)).map_err(io(&path, "chown"))?;
        if meta.is_dir() {
            chown_tree(&path, device, owner, group)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
