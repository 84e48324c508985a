//! The K3s lifecycle: K3s's unit is started over systemd's D-Bus API only
//! when /data is ready, stopped when it is not (the fence), its readiness is
//! reported in tiers, and what it leaves behind when it stops is cleaned up.

pub mod leftovers;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::systemd::{ServiceManager, SystemdError, UnitState};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct K3sSettings {
    pub enabled: bool,
    /// "systemd" drives the real unit; "sim" an in-memory one.
    pub backend: K3sBackendKind,
    pub unit: String,
    /// Start K3s once the volume is ready. Off: the agent only fences (stops
    /// K3s when /data is lost) and reports.
    pub autostart: bool,
    /// K3s's --data-dir; "" leaves K3s's default (/var/lib/rancher/k3s).
    pub data_dir: PathBuf,
    /// K3s's --default-local-storage-path; "" leaves K3s's default.
    pub local_storage_path: PathBuf,
    /// The K3s config drop-in the agent writes; "" to write none.
    pub config_dropin: PathBuf,
    /// Traefik's metrics port moved off node_exporter's 9100; 0 writes no
    /// HelmChartConfig.
    pub traefik_metrics_port: u16,
    /// Tier 2 of readiness; "" skips it. http:// only in this build (see README).
    pub readyz_url: String,
    #[serde(with = "crate::config::duration")]
    pub start_timeout: Duration,
    #[serde(with = "crate::config::duration")]
    pub stop_timeout: Duration,
    /// Between SIGTERM and SIGKILL for leftover container processes.
    #[serde(with = "crate::config::duration")]
    pub leftover_grace: Duration,
    /// Process names that mark a container shim tree.
    pub shim_prefixes: Vec<String>,
    /// Mounts below these are unmounted after K3s stops (pod volumes,
    /// containerd's run state, network namespaces).
    pub pod_mount_roots: Vec<PathBuf>,
}

impl Default for K3sSettings {
    fn default() -> Self {
        K3sSettings {
            enabled: false,
            backend: K3sBackendKind::Systemd,
            unit: "k3s.service".into(),
            autostart: true,
            data_dir: PathBuf::new(),
            local_storage_path: PathBuf::new(),
            config_dropin: PathBuf::from("/etc/rancher/k3s/config.yaml.d/50-platform-agent.yaml"),
            traefik_metrics_port: 9101,
            readyz_url: String::new(),
            start_timeout: Duration::from_secs(300),
            stop_timeout: Duration::from_secs(60),
            leftover_grace: Duration::from_secs(20),
            shim_prefixes: vec!["containerd-shim".into()],
            pod_mount_roots: vec![
                PathBuf::from("/var/lib/kubelet/pods"),
                PathBuf::from("/run/k3s"),
                PathBuf::from("/run/netns"),
            ],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum K3sBackendKind {
    Systemd,
    Sim,
}

impl K3sSettings {
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        if !self.enabled {
            return problems;
        }
        if !self.unit.ends_with(".service") || self.unit.contains('/') {
            problems.push(("unit".into(), format!("{:?} is not a service unit name", self.unit)));
        }
        if !self.readyz_url.is_empty() && !self.readyz_url.starts_with("http://") {
            problems.push((
                "readyz_url".into(),
                format!(
                    "{:?}: only http:// is supported in this build; leave it empty to stop at the unit-active tier",
                    self.readyz_url
                ),
            ));
        }
        problems
    }

    /// Where K3s auto-applies manifests from.
    pub fn manifests_dir(&self) -> PathBuf {
        let data_dir = if self.data_dir.as_os_str().is_empty() {
            PathBuf::from("/var/lib/rancher/k3s")
        } else {
            self.data_dir.clone()
        };
        data_dir.join("server/manifests")
    }
}

/// How far K3s has come up. Each tier implies the ones below.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReadyTier {
    Stopped = 0,
    UnitActive = 1,
    ApiReady = 2,
}

impl ReadyTier {
    pub fn as_str(self) -> &'static str {
        match self {
            ReadyTier::Stopped => "stopped",
            ReadyTier::UnitActive => "unit-active",
            ReadyTier::ApiReady => "api-ready",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct K3sStatus {
    pub unit: String,
    pub tier: ReadyTier,
    pub active_state: String,
    /// Why K3s is held stopped, if it is.
    pub fenced: Option<String>,
    /// The last leftover clean-up.
    pub last_cleanup: Option<leftovers::CleanupReport>,
}

#[derive(Debug, thiserror::Error)]
pub enum K3sError {
    #[error(transparent)]
    Systemd(#[from] SystemdError),
    #[error("{}: {action}: {source}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
}

pub struct K3s {
    settings: K3sSettings,
    manager: Arc<dyn ServiceManager>,
    /// Where generated unit drop-ins go (/etc/systemd/system on a host).
    unit_dir: PathBuf,
}

impl K3s {
    pub fn new(settings: K3sSettings, manager: Arc<dyn ServiceManager>, unit_dir: PathBuf) -> Self {
        K3s {
            settings,
            manager,
            unit_dir,
        }
    }

    pub fn settings(&self) -> &K3sSettings {
        &self.settings
    }

    pub fn unit(&self) -> &str {
        &self.settings.unit
    }

    /// The unit drop-in that makes systemd itself refuse to start K3s
    /// without the volume, even when something other than the agent starts
    /// it (RequiresMountsFor= pulls in and orders after the .mount unit).
    pub fn unit_dropin_text(mount_point: &Path) -> String {
        format!(
            "# Written by platform-agent: K3s runs only on top of the data volume.\n\
             [Unit]\n\
             RequiresMountsFor={}\n",
            mount_point.display()
        )
    }

    fn config_text(&self) -> Option<String> {
        let mut lines = Vec::new();
        if !self.settings.data_dir.as_os_str().is_empty() {
            lines.push(format!("data-dir: {:?}", self.settings.data_dir.display().to_string()));
        }
        if !self.settings.local_storage_path.as_os_str().is_empty() {
            lines.push(format!(
                "default-local-storage-path: {:?}",
                self.settings.local_storage_path.display().to_string()
            ));
        }
        (!lines.is_empty()).then(|| {
            format!(
                "# Written by platform-agent from [k3s] in its configuration; edit that instead.\n{}\n",
                lines.join("\n")
            )
        })
    }

    fn traefik_text(&self) -> String {
        format!(
            "# Written by platform-agent: Traefik's metrics leave port 9100 to node_exporter.\n\
             apiVersion: helm.cattle.io/v1\n\
             kind: HelmChartConfig\n\
             metadata:\n  name: traefik\n  namespace: kube-system\n\
             spec:\n  valuesContent: |-\n    ports:\n      metrics:\n        port: {port}\n",
            port = self.settings.traefik_metrics_port
        )
    }

    /// Writes the unit drop-in and, unless `fenced`, the K3s config drop-in
    /// and Traefik config, each only when its content changed; reloads
    /// systemd if the unit drop-in changed. The unit drop-in is written even
    /// while fenced: it is what keeps systemd itself from starting K3s on the
    /// bare mount point at the next boot, before the agent runs. The other
    /// files may live under the (not yet mounted) data directory.
    pub async fn write_configuration(
        &self,
        mount_point: Option<&Path>,
        fenced: bool,
    ) -> Result<Vec<PathBuf>, K3sError> {
        let mut written = Vec::new();
        let write = |path: PathBuf, text: String, written: &mut Vec<PathBuf>| -> Result<bool, K3sError> {
            let changed =
                crate::fsutil::write_if_changed(&path, text.as_bytes(), 0o644).map_err(|source| K3sError::Io {
                    path: path.clone(),
                    action: "write",
                    source,
                })?;
            if changed {
                written.push(path);
            }
            Ok(changed)
        };
        let mut unit_changed = false;
        if let Some(mount_point) = mount_point {
            let path = self
                .unit_dir
                .join(format!("{}.d", self.settings.unit))
                .join("50-platform-agent.conf");
            unit_changed = write(path, Self::unit_dropin_text(mount_point), &mut written)?;
        }
        if self.settings.backend == K3sBackendKind::Systemd && !fenced {
            if let Some(text) = self
                .config_text()
                .filter(|_| !self.settings.config_dropin.as_os_str().is_empty())
            {
                write(self.settings.config_dropin.clone(), text, &mut written)?;
            }
            if self.settings.traefik_metrics_port != 0 {
                write(
                    self.settings.manifests_dir().join("platform-agent-traefik-config.yaml"),
                    self.traefik_text(),
                    &mut written,
                )?;
            }
        }
        if unit_changed {
            self.manager.daemon_reload().await?;
        }
        Ok(written)
    }

    pub async fn unit_state(&self) -> Result<UnitState, K3sError> {
        Ok(self.manager.state(&self.settings.unit).await?)
    }

    pub async fn start(&self) -> Result<(), K3sError> {
        Ok(self
            .manager
            .start(&self.settings.unit, self.settings.start_timeout)
            .await?)
    }

    pub async fn stop(&self) -> Result<(), K3sError> {
        Ok(self
            .manager
            .stop(&self.settings.unit, self.settings.stop_timeout)
            .await?)
    }

    /// Unit active, then the API's /readyz.
    pub async fn readiness(&self) -> ReadyTier {
        match self.unit_state().await {
            Ok(state) if state.is_active() => {}
            _ => return ReadyTier::Stopped,
        }
        if self.settings.readyz_url.is_empty() {
            return ReadyTier::UnitActive;
        }
        match tokio::time::timeout(Duration::from_secs(5), http_get_status(&self.settings.readyz_url)).await {
            Ok(Ok(200)) => ReadyTier::ApiReady,
            _ => ReadyTier::UnitActive,
        }
    }

    /// After K3s stopped: end its leftover processes, unmount pod mounts.
    pub async fn clean_leftovers(&self, control_group: &str) -> leftovers::CleanupReport {
        let mut report = leftovers::CleanupReport::default();
        if self.settings.backend == K3sBackendKind::Sim {
            return report;
        }
        let found = leftovers::find(control_group, &self.settings.shim_prefixes);
        leftovers::terminate(found, self.settings.leftover_grace, &mut report).await;
        leftovers::unmount_below(&self.settings.pod_mount_roots, &mut report);
        report
    }
}

/// GET over plain HTTP/1.1; returns the status code.
async fn http_get_status(url: &str) -> Result<u16, String> {
    use http_body_util::Empty;
    use hyper::body::Bytes;

    let rest = url.strip_prefix("http://").ok_or("not an http:// URL")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let stream = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, authority)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    Ok(response.status().as_u16())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::systemd::SimManager;

    fn k3s(dir: &Path, settings: K3sSettings) -> K3s {
        K3s::new(settings, Arc::new(SimManager::default()), dir.join("units"))
    }

    #[tokio::test]
    async fn writes_drop_ins_once_and_only_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let settings = K3sSettings {
            enabled: true,
            data_dir: dir.path().join("data/k3s"),
            local_storage_path: PathBuf::from("/data/k3s-storage"),
            config_dropin: dir.path().join("etc/config.yaml.d/50-platform-agent.yaml"),
            ..K3sSettings::default()
        };
        let k3s = k3s(dir.path(), settings);
        // Fenced (the volume is not ready): only the unit drop-in, which keeps
        // systemd from starting K3s at boot before /data is mounted; nothing is
        // written under the data directory.
        let written = k3s.write_configuration(Some(Path::new("/data")), true).await.unwrap();
        assert_eq!(
            written,
            vec![dir.path().join("units/k3s.service.d/50-platform-agent.conf")]
        );
        assert!(!dir.path().join("data").exists());
        assert!(!dir.path().join("etc").exists());
        let written = k3s.write_configuration(Some(Path::new("/data")), false).await.unwrap();
        assert_eq!(written.len(), 2, "{written:?}");
        let unit = std::fs::read_to_string(dir.path().join("units/k3s.service.d/50-platform-agent.conf")).unwrap();
        assert!(unit.contains("RequiresMountsFor=/data\n"), "{unit}");
        let config = std::fs::read_to_string(dir.path().join("etc/config.yaml.d/50-platform-agent.yaml")).unwrap();
        assert!(
            config.contains("default-local-storage-path: \"/data/k3s-storage\""),
            "{config}"
        );
        let traefik = std::fs::read_to_string(
            dir.path()
                .join("data/k3s/server/manifests/platform-agent-traefik-config.yaml"),
        )
        .unwrap();
        assert!(
            traefik.contains("kind: HelmChartConfig") && traefik.contains("port: 9101"),
            "{traefik}"
        );
        assert!(k3s
            .write_configuration(Some(Path::new("/data")), false)
            .await
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn readiness_tiers_follow_the_unit_and_readyz() {
        let dir = tempfile::tempdir().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let settings = K3sSettings {
            enabled: true,
            backend: K3sBackendKind::Sim,
            readyz_url: format!("http://{addr}/readyz"),
            ..K3sSettings::default()
        };
        let k3s = k3s(dir.path(), settings);
        assert_eq!(k3s.readiness().await, ReadyTier::Stopped);
        k3s.start().await.unwrap();
        // Nothing answers HTTP yet on the listener: unit active only.
        drop(listener);
        assert_eq!(k3s.readiness().await, ReadyTier::UnitActive);
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = socket.read(&mut buf).await;
                let _ = socket
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
            }
        });
        assert_eq!(k3s.readiness().await, ReadyTier::ApiReady);
        k3s.stop().await.unwrap();
        assert_eq!(k3s.readiness().await, ReadyTier::Stopped);
    }
}
