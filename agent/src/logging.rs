//! Logging through `tracing`: to journald when systemd connected our stderr
//! to the journal (`JOURNAL_STREAM`), else to stderr. Under journald we add no
//! timestamps of our own and every event carries its fields as journal fields
//! (`SOCKET=...`), plus a stable `MESSAGE_ID` for the events operators filter
//! on (`journalctl MESSAGE_ID=70ab9b57cf4e43f98a3b577e2d2a32b2`).

use std::io::IsTerminal;
use std::os::unix::fs::MetadataExt;

use tracing_subscriber::layer::Layered;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

use crate::config::LogLevel;

/// Stable journal MESSAGE_IDs, one per event kind. Never change a value: alerts
/// and saved journal queries depend on them.
pub mod ids {
    pub const AGENT_STARTING: &str = "e9c93d0eea064c3e946c9c193578e3b8";
    pub const AGENT_READY: &str = "70ab9b57cf4e43f98a3b577e2d2a32b2";
    pub const CONFIG_RELOADED: &str = "f906735482d24c9b82b80be5cc1d1e59";
    pub const CONFIG_INVALID: &str = "01eacfec97124e0699f475ee85cb6fc6";
    pub const SHUTDOWN_STARTED: &str = "496cbd7655614c4a89327adfdacd625c";
    pub const SUBSYSTEM_EXITED: &str = "ac2aea9f4d4c4d79a505dced0b609f4e";
    pub const AGENT_STOPPED: &str = "2e63f3bd15b3438d9f7d075805fce63d";
    pub const CONTROL_DENIED: &str = "6607ab9a92844f74a10dbcf63a0e677b";
    pub const CONTROL_BAD_REQUEST: &str = "d02b09899e874c078beb39858b397ed0";
    pub const WATCHDOG_CHECK_FAILED: &str = "8eac46b3a4f640bd9488c0be5365426b";
    pub const VOLUME_READY: &str = "586ab27a954a47589e68fa15b0a4fc76";
    pub const VOLUME_NOT_READY: &str = "401ff5c470ab4ea89d49232f73ea7949";
    pub const K3S_STARTED: &str = "bac07c7454bd42009e215e2b73f7a66d";
    pub const K3S_FENCED: &str = "6affde2da35548efa0436c640d9442ab";
    pub const K3S_READINESS: &str = "c877defee8814e30901aea3e63244b70";
    pub const PLAN_STARTED: &str = "30ecbd4233274c7f8a3739eba05c4529";
    pub const PLAN_STEP: &str = "2be9f09f68024447a51dbea476a515e1";
    pub const UNMOUNT_REFUSED: &str = "d22a64575ba349d991aa1070496072d6";
    pub const LEFTOVER_SIGNALLED: &str = "fddf48230739492fbdccd326ceb2d09b";
    pub const PLAN_FINISHED: &str = "dd31fe7fea494a269392f9f3acf801f5";
    pub const GITOPS_APPLIED: &str = "5d1a3c0b8f2e4e6d9a7b4c3e2f1d0a9b";
    pub const GITOPS_FAILED: &str = "c41e7a2d9b5f4c08a3e6d1f7b2a9c5e4";
    pub const GITOPS_PRUNE_REFUSED: &str = "8b3f6e1a4d7c4f2e9a5b0c8d3e6f1a7c";
}

/// Environment variable with `tracing` filter directives; beats the config.
pub const LOG_ENV: &str = "PLATFORM_AGENT_LOG";

type Output = Box<dyn Layer<Registry> + Send + Sync>;

pub struct LogHandle {
    filter: reload::Handle<EnvFilter, Layered<Output, Registry>>,
    env_override: bool,
}

impl LogHandle {
    /// Applies a (re)loaded `agent.log_level` unless the environment overrides it.
    pub fn set_level(&self, level: LogLevel) {
        if !self.env_override {
            let _ = self.filter.reload(EnvFilter::new(level.as_str()));
        }
    }
}

pub fn init(level: LogLevel) -> LogHandle {
    let env_filter = std::env::var(LOG_ENV).ok().and_then(|d| EnvFilter::try_new(d).ok());
    let env_override = env_filter.is_some();
    let (filter, handle) = reload::Layer::new(env_filter.unwrap_or_else(|| EnvFilter::new(level.as_str())));
    let output: Output = match journald_layer() {
        Some(layer) => Box::new(layer),
        None => Box::new(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_target(false),
        ),
    };
    // `output` is boxed against Registry, so it goes on first.
    tracing_subscriber::registry().with(output).with(filter).init();
    LogHandle {
        filter: handle,
        env_override,
    }
}

fn journald_layer() -> Option<tracing_journald::Layer> {
    if !stderr_is_journal() {
        return None;
    }
    tracing_journald::layer().ok().map(|layer| {
        layer
            .with_field_prefix(None)
            .with_syslog_identifier("platform-agent".into())
    })
}

/// systemd sets JOURNAL_STREAM to the device and inode of the stream it gave
/// us; if stderr is still that stream, the journal is listening.
fn stderr_is_journal() -> bool {
    let Ok(value) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.split_once(':') else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(meta.dev()) && ino.parse::<u64>().ok() == Some(meta.ino())
}
