//! Node metrics in Prometheus format under node_exporter's names, plus the
//! agent's own metrics read from the status model.
//!
//! - [`node`]: the host collectors (cpu, meminfo, filesystem, ...), each
//!   named, labelled and typed as node_exporter 1.5 does;
//! - [`scrape`]: runs them against one deadline, so that a collector stuck
//!   in the kernel fails alone and the scrape still answers on time;
//! - [`agent`]: the `platform_agent_*` families from one status snapshot
//!   (its documentation lists the metric names dashboards and alerts use);
//! - [`encode`] and [`exposition`]: writing and reading the text formats;
//! - `http`: `/metrics` on TCP and an optional Unix socket;
//! - [`preflight`]: who holds a port, for the error when ours is taken.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::status::{Health, StatusHandle};

pub mod agent;
pub mod encode;
pub mod exposition;
mod http;
pub mod node;
pub mod preflight;
pub mod scrape;

pub use encode::Format;
pub use scrape::Scraper;

/// `sun_path` is 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// Makes the filesystem collector's statfs of this mount point block forever,
/// standing in for a stuck NFS or FUSE mount in tests of the real binary.
pub const FAILPOINT_STATFS_HANG: &str = "PLATFORM_AGENT_FAILPOINT_STATFS_HANG";

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    pub enabled: bool,
    /// 9100 is node_exporter's and 9101 Traefik's on these hosts.
    pub listen: String,
    /// Optional second endpoint on a Unix socket ("" for none).
    pub unix_socket: PathBuf,
    /// node_exporter's textfile collector directory ("" for none).
    pub textfile_dir: PathBuf,
    /// A collector that takes longer is reported failed for this scrape.
    #[serde(with = "crate::config::duration")]
    pub collector_timeout: Duration,
    /// Mount points left out of `node_filesystem_*` (a regular expression;
    /// node_exporter's `--collector.filesystem.mount-points-exclude`).
    pub filesystem_mount_points_exclude: String,
    /// Filesystem types left out (`--collector.filesystem.fs-types-exclude`).
    pub filesystem_fs_types_exclude: String,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        MetricsSettings {
            enabled: true,
            listen: "0.0.0.0:9102".into(),
            unix_socket: PathBuf::new(),
            textfile_dir: PathBuf::from("/var/lib/platform-agent/textfile"),
            collector_timeout: Duration::from_secs(2),
            filesystem_mount_points_exclude: node::filesystem::MOUNT_POINTS_EXCLUDE.into(),
            filesystem_fs_types_exclude: node::filesystem::FS_TYPES_EXCLUDE.into(),
        }
    }
}

impl MetricsSettings {
    /// Problems as (key below `metrics.`, message), for config validation.
    pub fn validate(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if self.enabled && self.listen.parse::<SocketAddr>().is_err() {
            problems.push(("listen", format!("{:?} is not an address:port", self.listen)));
        }
        let socket = self.unix_socket.as_os_str();
        if !socket.is_empty() {
            if self.unix_socket.is_relative() {
                problems.push((
                    "unix_socket",
                    format!(
                        "{} must be an absolute path (or \"\" for none)",
                        self.unix_socket.display()
                    ),
                ));
            }
            if socket.len() > MAX_SOCKET_PATH {
                problems.push((
                    "unix_socket",
                    format!(
                        "path is {} bytes long; a Unix socket path may have at most {MAX_SOCKET_PATH}",
                        socket.len()
                    ),
                ));
            }
        }
        if !self.textfile_dir.as_os_str().is_empty() && self.textfile_dir.is_relative() {
            problems.push((
                "textfile_dir",
                format!(
                    "{} must be an absolute path (or \"\" for none)",
                    self.textfile_dir.display()
                ),
            ));
        }
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(60));
        if self.collector_timeout < min || self.collector_timeout > max {
            problems.push((
                "collector_timeout",
                format!(
                    "{} is out of range {}..={}",
                    humantime::format_duration(self.collector_timeout),
                    humantime::format_duration(min),
                    humantime::format_duration(max)
                ),
            ));
        }
        for (key, pattern) in [
            ("filesystem_mount_points_exclude", &self.filesystem_mount_points_exclude),
            ("filesystem_fs_types_exclude", &self.filesystem_fs_types_exclude),
        ] {
            if let Err(err) = regex_lite::Regex::new(pattern) {
                problems.push((key, format!("{pattern:?} is not a valid regular expression: {err}")));
            }
        }
        problems
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics: cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "metrics: cannot listen on {addr}: port {port} is {users}{convention}; set metrics.listen to a free port \
         (on these hosts 9100 is node_exporter's, 9101 Traefik's and 10250 the kubelet's)"
    )]
    PortTaken {
        addr: String,
        port: u16,
        users: String,
        /// ", which is conventionally X's" or "".
        convention: String,
    },
    #[error("metrics: Unix socket {path}: {message}")]
    UnixSocket { path: String, message: String },
    #[error("metrics: {0}")]
    Settings(String),
}

/// A bound metrics endpoint. Binding is separate from serving so that a
/// taken port fails the start-up (before READY) with an error naming
/// `metrics.listen`, instead of a half-started agent.
pub struct MetricsServer {
    tcp: TcpListener,
    unix: Option<(UnixListener, PathBuf)>,
    scraper: Scraper,
}

impl MetricsServer {
    pub async fn bind(settings: &MetricsSettings) -> Result<MetricsServer, MetricsError> {
        let addr: SocketAddr = settings.listen.parse().map_err(|_| {
            MetricsError::Settings(format!("metrics.listen {:?} is not an address:port", settings.listen))
        })?;
        let tcp = match TcpListener::bind(addr).await {
            Ok(tcp) => tcp,
            Err(source) if source.kind() == std::io::ErrorKind::AddrInUse => {
                let port = addr.port();
                let users = tokio::task::spawn_blocking(move || preflight::describe_users(port))
                    .await
                    .unwrap_or_else(|_| "in use".into());
                let convention = match preflight::conventional_owner(port) {
                    Some(owner) if owner != "platform-agent" => format!(", which is conventionally {owner}'s"),
                    _ => String::new(),
                };
                return Err(MetricsError::PortTaken {
                    addr: settings.listen.clone(),
                    port,
                    users,
                    convention,
                });
            }
            Err(source) => {
                return Err(MetricsError::Bind {
                    addr: settings.listen.clone(),
                    source,
                })
            }
        };
        let unix = if settings.unix_socket.as_os_str().is_empty() {
            None
        } else {
            Some((bind_unix(&settings.unix_socket)?, settings.unix_socket.clone()))
        };
        let mut collectors = node::default_collectors(settings).map_err(MetricsError::Settings)?;
        if let Ok(mountpoint) = std::env::var(FAILPOINT_STATFS_HANG) {
            warn!(failpoint = FAILPOINT_STATFS_HANG, %mountpoint, "failpoint set: statfs of this mount point hangs");
            for collector in collectors.iter_mut().filter(|c| c.name() == "filesystem") {
                *collector = Box::new(hanging_filesystem(settings, mountpoint.clone())?);
            }
        }
        Ok(MetricsServer {
            tcp,
            unix,
            scraper: Scraper::new(collectors, settings.collector_timeout),
        })
    }

    /// The bound TCP address (resolves port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.tcp.local_addr().ok()
    }

    /// Serves /metrics until cancelled.
    pub async fn serve(self, status: StatusHandle, cancel: CancellationToken) -> Result<(), MetricsError> {
        let local = self.tcp.local_addr().map_err(|source| MetricsError::Bind {
            addr: "the bound socket".into(),
            source,
        })?;
        status.update(|s| {
            s.metrics.listen = local.to_string();
            s.metrics.health = Health::Ok;
        });
        let unix_path = self.unix.as_ref().map(|(_, path)| path.clone());
        info!(
            listen = %local,
            unix_socket = %unix_path.as_deref().map(Path::display).map(|d| d.to_string()).unwrap_or_default(),
            "metrics endpoint listening"
        );
        // Scanning every process's sockets takes a few milliseconds on a
        // busy host; READY does not wait for this log line.
        tokio::task::spawn_blocking(move || log_port_neighbours(local.port()));

        let app = Arc::new(http::App {
            scraper: self.scraper,
            status: status.clone(),
        });
        http::serve(app, self.tcp, self.unix.map(|(listener, _)| listener), cancel).await;
        if let Some(path) = unix_path {
            let _ = std::fs::remove_file(path);
        }
        status.update(|s| s.metrics.health = Health::Stopped);
        Ok(())
    }
}

/// The well-known ports' users, once at start, so an operator reading the
/// log of a port clash sees the whole picture.
fn log_port_neighbours(ours: u16) {
    for (port, owner) in preflight::WELL_KNOWN {
        if port == ours {
            continue;
        }
        info!(
            port,
            conventional_owner = owner,
            "port {port}: {}",
            preflight::describe_users(port)
        );
    }
    if let Some(owner) = preflight::conventional_owner(ours).filter(|o| *o != "platform-agent") {
        warn!(
            port = ours,
            "metrics.listen uses port {ours}, which is conventionally {owner}'s; it may clash once that is installed"
        );
    }
}

fn bind_unix(path: &Path) -> Result<UnixListener, MetricsError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let fail = |message: String| MetricsError::UnixSocket {
        path: path.display().to_string(),
        message,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(fail("exists and is not a socket".into()));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(fail("another process is serving on it".into()));
        }
        // Left behind by an agent that did not stop cleanly.
        std::fs::remove_file(path).map_err(|e| fail(format!("cannot remove the stale socket: {e}")))?;
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| fail(format!("cannot create {}: {e}", parent.display())))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| fail(e.to_string()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| fail(format!("cannot set mode 0660: {e}")))?;
    Ok(listener)
}

fn hanging_filesystem(settings: &MetricsSettings, hang_at: String) -> Result<node::Filesystem, MetricsError> {
    let filesystem = node::Filesystem::new(
        &settings.filesystem_mount_points_exclude,
        &settings.filesystem_fs_types_exclude,
    )
    .map_err(MetricsError::Settings)?;
    Ok(filesystem.with_stat(Arc::new(move |path: &str| {
        if path == hang_at {
            loop {
                std::thread::park();
            }
        }
        node::filesystem::statfs(path)
    })))
}

#[cfg(test)]
mod tests;
