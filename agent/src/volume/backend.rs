//! How the volume is mounted: a systemd .mount unit started over D-Bus on a
//! real host, or a plain directory in the sim.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;

use super::{io, mountinfo, VolumeError, VolumeSettings};
use crate::systemd::ServiceManager;

#[async_trait]
pub trait VolumeBackend: Send + Sync {
    fn device_present(&self) -> bool;
    fn is_mounted(&self) -> Result<bool, VolumeError>;
    /// Err(reason) when what is mounted is not the configured device.
    fn identity_matches(&self) -> Result<(), String>;
    async fn mount(&self) -> Result<(), VolumeError>;
    async fn unmount(&self) -> Result<(), VolumeError>;
}

/// systemd's unit name for a mount point (what `systemd-escape --path
/// --suffix=mount` prints): "/data" -> "data.mount", "/srv/my-data" ->
/// "srv-my\x2ddata.mount".
pub fn unit_name_for_path(path: &Path) -> String {
    let text = path.to_string_lossy();
    let trimmed = text.trim_matches('/');
    if trimmed.is_empty() {
        return "-.mount".into();
    }
    let mut out = String::new();
    for (i, byte) in trimmed.bytes().enumerate() {
        match byte {
            b'/' => out.push('-'),
            b'.' if i == 0 => out.push_str("\\x2e"),
            b if b.is_ascii_alphanumeric() || b == b':' || b == b'_' || b == b'.' => out.push(b as char),
            b => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    format!("{out}.mount")
}

pub struct SystemdMount {
    settings: VolumeSettings,
    manager: Arc<dyn ServiceManager>,
    /// Where the generated unit goes; /run/systemd/system on a host, so it
    /// is regenerated from the configuration at every boot.
    unit_dir: PathBuf,
}

impl SystemdMount {
    pub fn new(settings: VolumeSettings, manager: Arc<dyn ServiceManager>, unit_dir: PathBuf) -> Self {
        SystemdMount {
            settings,
            manager,
            unit_dir,
        }
    }

    pub fn unit_name(&self) -> String {
        unit_name_for_path(&self.settings.mount_point)
    }

    pub fn unit_text(&self) -> String {
        let options = self.settings.options.join(",");
        format!(
            "# Written by platform-agent from its [volume] configuration; regenerated at every start.\n\
             [Unit]\n\
             Description=platform-agent data volume ({identity})\n\
             Documentation=man:platform-agent(8)\n\
             # Stopped only by the agent's shutdown plan (or by systemd after it).\n\
             DefaultDependencies=no\n\
             Conflicts=umount.target\n\
             Before=umount.target\n\
             After=local-fs-pre.target\n\
             \n\
             [Mount]\n\
             What={what}\n\
             Where={where_}\n\
             Type={fs_type}\n\
             {options_line}\
             TimeoutSec={timeout}\n",
            identity = self.settings.identity(),
            what = self.settings.device_path().display(),
            where_ = self.settings.mount_point.display(),
            fs_type = self.settings.fs_type,
            options_line = if options.is_empty() {
                String::new()
            } else {
                format!("Options={options}\n")
            },
            timeout = self.settings.mount_timeout.as_secs().max(1),
        )
    }
}

#[async_trait]
impl VolumeBackend for SystemdMount {
    fn device_present(&self) -> bool {
        self.settings.device_path().exists()
    }

    fn is_mounted(&self) -> Result<bool, VolumeError> {
        let mounts = mountinfo::read().map_err(io(Path::new("/proc/self/mountinfo"), "read"))?;
        Ok(mountinfo::mount_at(&mounts, &self.settings.mount_point).is_some())
    }

    fn identity_matches(&self) -> Result<(), String> {
        let device = self.settings.device_path();
        let device_meta =
            std::fs::metadata(&device).map_err(|err| format!("cannot stat {}: {err}", device.display()))?;
        let mount_meta = std::fs::metadata(&self.settings.mount_point)
            .map_err(|err| format!("cannot stat {}: {err}", self.settings.mount_point.display()))?;
        if device_meta.rdev() != mount_meta.dev() {
            return Err(format!(
                "{} is mounted from device {}:{}, but {} is {}:{}",
                self.settings.mount_point.display(),
                libc::major(mount_meta.dev()),
                libc::minor(mount_meta.dev()),
                device.display(),
                libc::major(device_meta.rdev()),
                libc::minor(device_meta.rdev()),
            ));
        }
        Ok(())
    }

    async fn mount(&self) -> Result<(), VolumeError> {
        let unit_path = self.unit_dir.join(self.unit_name());
        let changed = crate::fsutil::write_if_changed(&unit_path, self.unit_text().as_bytes(), 0o644)
            .map_err(io(&unit_path, "write mount unit"))?;
        std::fs::create_dir_all(&self.settings.mount_point).map_err(io(&self.settings.mount_point, "create"))?;
        let systemd = |source| VolumeError::Systemd {
            mount_point: self.settings.mount_point.clone(),
            source,
        };
        if changed {
            self.manager.daemon_reload().await.map_err(systemd)?;
        }
        self.manager
            .start(&self.unit_name(), self.settings.mount_timeout)
            .await
            .map_err(systemd)
    }

    async fn unmount(&self) -> Result<(), VolumeError> {
        self.manager
            .stop(&self.unit_name(), self.settings.mount_timeout)
            .await
            .map_err(|source| VolumeError::Systemd {
                mount_point: self.settings.mount_point.clone(),
                source,
            })
    }
}

/// A directory standing in for the volume: "mounting" creates it. Shares
/// everything else (identity marker, layout, holders, space) with the real
/// backend, which is what the embedded-defaults run exercises.
pub struct SimMount {
    mount_point: PathBuf,
    mounted: AtomicBool,
    device_present: AtomicBool,
}

impl SimMount {
    pub fn new(mount_point: PathBuf) -> Self {
        SimMount {
            mount_point,
            mounted: AtomicBool::new(false),
            device_present: AtomicBool::new(true),
        }
    }

    /// Fault injection: the disk disappears or comes back.
    pub fn set_device_present(&self, present: bool) {
        self.device_present.store(present, Ordering::SeqCst);
        if !present {
            self.mounted.store(false, Ordering::SeqCst);
        }
    }
}

#[async_trait]
impl VolumeBackend for SimMount {
    fn device_present(&self) -> bool {
        self.device_present.load(Ordering::SeqCst)
    }

    fn is_mounted(&self) -> Result<bool, VolumeError> {
        Ok(self.mounted.load(Ordering::SeqCst))
    }

    fn identity_matches(&self) -> Result<(), String> {
        Ok(())
    }

    async fn mount(&self) -> Result<(), VolumeError> {
        std::fs::create_dir_all(&self.mount_point).map_err(io(&self.mount_point, "create"))?;
        self.mounted.store(true, Ordering::SeqCst);
        Ok(())
    }

    async fn unmount(&self) -> Result<(), VolumeError> {
        self.mounted.store(false, Ordering::SeqCst);
        Ok(())
    }
}

/// Lets a caller keep a handle on a backend it also gave to a Volume (tests
/// inject faults through it).
#[async_trait]
impl<T: VolumeBackend + ?Sized> VolumeBackend for Arc<T> {
    fn device_present(&self) -> bool {
        (**self).device_present()
    }
    fn is_mounted(&self) -> Result<bool, VolumeError> {
        (**self).is_mounted()
    }
    fn identity_matches(&self) -> Result<(), String> {
        (**self).identity_matches()
    }
    async fn mount(&self) -> Result<(), VolumeError> {
        (**self).mount().await
    }
    async fn unmount(&self) -> Result<(), VolumeError> {
        (**self).unmount().await
    }
}
