use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use super::*;

fn settings(root: &Path) -> VolumeSettings {
    VolumeSettings {
        enabled: true,
        backend: VolumeBackendKind::Sim,
        label: "data".into(),
        mount_point: root.join("data"),
        directories: vec![
            DirectorySpec {
                path: "k3s-storage".into(),
                owner: 0,
                group: 0,
                mode: "0711".into(),
                recursive_chown: false,
            },
            DirectorySpec {
                path: "traefik/acme".into(),
                owner: 65532,
                group: 65532,
                mode: "0700".into(),
                recursive_chown: false,
            },
        ],
        ..VolumeSettings::default()
    }
}

fn sim_volume(settings: &VolumeSettings) -> (Volume, Arc<SimMount>) {
    let backend = Arc::new(SimMount::new(settings.mount_point.clone()));
    (Volume::new(settings.clone(), Box::new(backend.clone())), backend)
}

#[tokio::test]
async fn mounts_adopts_and_lays_out_with_owners() {
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(dir.path());
    let (volume, _) = sim_volume(&settings);
    let status = volume.ensure_ready().await;
    assert_eq!(status.mount_state, MountState::Mounted, "{status:?}");
    assert!(
        status.size_bytes > 0 && status.files > 0,
        "space is read from the real filesystem"
    );
    assert_eq!(status.created.len(), 3, "{:?}", status.created);

    let marker = std::fs::read_to_string(settings.mount_point.join(MARKER_FILE)).unwrap();
    assert!(marker.contains("label=data"), "{marker}");
    let acme = std::fs::metadata(settings.mount_point.join("traefik/acme")).unwrap();
    assert_eq!(acme.mode() & 0o7777, 0o700);
    if nix::unistd::geteuid().is_root() {
        assert_eq!((acme.uid(), acme.gid()), (65532, 65532));
    }
    let storage = std::fs::metadata(settings.mount_point.join("k3s-storage")).unwrap();
    assert_eq!(storage.mode() & 0o7777, 0o711);

    // A second pass creates nothing and keeps what is inside.
    std::fs::write(settings.mount_point.join("traefik/acme/acme.json"), b"{}").unwrap();
    let again = volume.ensure_ready().await;
    assert!(again.created.is_empty(), "{:?}", again.created);
    assert!(settings.mount_point.join("traefik/acme/acme.json").exists());
}

#[tokio::test]
async fn a_marker_for_another_volume_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(dir.path());
    std::fs::create_dir_all(&settings.mount_point).unwrap();
    std::fs::write(
        settings.mount_point.join(MARKER_FILE),
        br#"{"identity":"uuid=0000-other","adopted_at":1}"#,
    )
    .unwrap();
    let (volume, _) = sim_volume(&settings);
    let status = volume.ensure_ready().await;
    match status.mount_state {
        MountState::WrongVolume { reason } => assert!(reason.contains("uuid=0000-other"), "{reason}"),
        other => panic!("expected WrongVolume, got {other:?}"),
    }
    assert!(
        !settings.mount_point.join("k3s-storage").exists(),
        "no layout on a wrong volume"
    );
}

#[tokio::test]
async fn without_adopt_an_unmarked_filesystem_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings(dir.path());
    settings.adopt = false;
    let (volume, _) = sim_volume(&settings);
    assert!(matches!(
        volume.ensure_ready().await.mount_state,
        MountState::WrongVolume { .. }
    ));
}

#[tokio::test]
async fn an_absent_device_is_reported_and_not_mounted() {
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(dir.path());
    let (volume, backend) = sim_volume(&settings);
    backend.set_device_present(false);
    let status = volume.ensure_ready().await;
    assert!(
        matches!(status.mount_state, MountState::DeviceAbsent { .. }),
        "{status:?}"
    );
    backend.set_device_present(true);
    assert_eq!(volume.ensure_ready().await.mount_state, MountState::Mounted);
}

#[tokio::test]
async fn unmount_is_refused_while_a_process_holds_the_volume() {
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(dir.path());
    let (volume, backend) = sim_volume(&settings);
    volume.ensure_ready().await;
    // The temp dir shares its filesystem with other processes' files (the
    // test binary itself may live there), so only our holder is asserted.
    let held = settings.mount_point.join("k3s-storage/held.db");
    std::fs::write(&held, b"x").unwrap();
    let mut child = std::process::Command::new("sh")
        .args(["-c", "exec 7<\"$1\"; read _", "sh"])
        .arg(&held)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match volume.unmount_checked().await {
            Err(VolumeError::Busy { holders, .. }) if holders.iter().any(|h| h.pid == pid) => {
                let message = VolumeError::Busy {
                    mount_point: settings.mount_point.clone(),
                    holders,
                }
                .to_string();
                assert!(
                    message.contains(&format!("pid {pid} (sh)")) && message.contains("held.db"),
                    "{message}"
                );
                break;
            }
            other => {
                assert!(std::time::Instant::now() < deadline, "holder not reported: {other:?}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    assert!(backend.is_mounted().unwrap(), "a busy volume stays mounted");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn symlinks_in_the_layout_are_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(dir.path());
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::create_dir_all(&settings.mount_point).unwrap();
    std::os::unix::fs::symlink(&outside, settings.mount_point.join("traefik")).unwrap();
    let (volume, _) = sim_volume(&settings);
    match volume.ensure_ready().await.mount_state {
        MountState::Failed { reason } => assert!(reason.contains("symlink"), "{reason}"),
        other => panic!("expected Failed, got {other:?}"),
    }
    assert!(!outside.join("acme").exists());
}

#[test]
fn mount_unit_names_match_systemd_escape() {
    assert_eq!(unit_name_for_path(Path::new("/data")), "data.mount");
    assert_eq!(unit_name_for_path(Path::new("/srv/my-data")), "srv-my\\x2ddata.mount");
    assert_eq!(unit_name_for_path(Path::new("/mnt/.hidden/x")), "mnt-.hidden-x.mount");
    assert_eq!(unit_name_for_path(Path::new("/.x")), "\\x2ex.mount");
}

#[test]
fn mount_unit_names_the_device_by_uuid() {
    let settings = VolumeSettings {
        enabled: true,
        uuid: "0b5c-11".into(),
        ..VolumeSettings::default()
    };
    let manager: Arc<dyn crate::systemd::ServiceManager> = Arc::new(crate::systemd::SimManager::default());
    let mount = SystemdMount::new(settings, manager, PathBuf::from("/run/systemd/system"));
    let text = mount.unit_text();
    assert!(text.contains("What=/dev/disk/by-uuid/0b5c-11\n"), "{text}");
    assert!(text.contains("Where=/data\n") && text.contains("Type=ext4\n") && text.contains("Options=noatime\n"));
}

#[test]
fn validation_names_keys() {
    let mut settings = VolumeSettings {
        enabled: true,
        uuid: "a".into(),
        label: "b".into(),
        ..VolumeSettings::default()
    };
    settings.directories.push(DirectorySpec {
        path: "../etc".into(),
        owner: 0,
        group: 0,
        mode: "999".into(),
        recursive_chown: false,
    });
    let keys: Vec<String> = settings.validate().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["uuid", "directories[0].path", "directories[0].mode"]);
}
