//! The typed configuration. Every struct has `deny_unknown_fields` and a
//! `Default` that is the built-in default, so one type serves both for
//! checking a single drop-in file (missing keys fall back to defaults) and
//! for the merged result. `config/default.toml` documents the same values and
//! a test keeps the two equal.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub agent: AgentSettings,
    pub control: ControlSettings,
    pub object_store: ObjectStoreSettings,
    pub metrics: crate::metrics::MetricsSettings,
    pub volume: crate::volume::VolumeSettings,
    pub k3s: crate::k3s::K3sSettings,
    pub shutdown: crate::shutdown::ShutdownSettings,
    pub backup: crate::backup::BackupSettings,
    pub gitops: crate::gitops::GitopsSettings,
    pub wal: crate::wal::WalSettings,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentSettings {
    pub state_dir: PathBuf,
    /// Where the agent writes the units and drop-ins it generates (the /data
    /// mount unit, K3s's RequiresMountsFor= drop-in). Under /etc so that the
    /// fence holds at boot before the agent runs.
    pub unit_dir: PathBuf,
    pub log_level: LogLevel,
    #[serde(with = "duration")]
    pub shutdown_timeout: Duration,
    /// How often the volume and K3s are checked (the fence's reaction time).
    #[serde(with = "duration")]
    pub check_interval: Duration,
}

impl Default for AgentSettings {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("/var/lib/platform-agent"),
            unit_dir: PathBuf::from("/etc/systemd/system"),
            log_level: LogLevel::Info,
            shutdown_timeout: Duration::from_secs(30),
            check_interval: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// Enums are read through a string so that `log_level = 3` is reported as
/// "expected a string" and a typo lists the accepted words.
macro_rules! word_enum {
    ($ty:ident, $what:literal, { $($word:literal => $variant:ident),+ $(,)? }) => {
        impl TryFrom<String> for $ty {
            type Error = String;

            fn try_from(word: String) -> Result<Self, String> {
                match word.as_str() {
                    $($word => Ok($ty::$variant),)+
                    _ => Err(format!(
                        concat!("unknown ", $what, " {:?}, expected one of: {}"),
                        word,
                        [$($word),+].join(", ")
                    )),
                }
            }
        }

        impl $ty {
            /// The word the configuration uses.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $word,)+
                }
            }
        }
    };
}
pub(crate) use word_enum;

word_enum!(LogLevel, "log level", { "trace" => Trace, "debug" => Debug, "info" => Info, "warn" => Warn, "error" => Error });
word_enum!(ObjectStoreBackend, "object store backend", { "local" => Local, "s3" => S3 });

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlSettings {
    pub socket: PathBuf,
    /// Empty means: do not change the socket's group.
    pub group: String,
    pub max_request_bytes: u64,
    #[serde(with = "duration")]
    pub request_timeout: Duration,
}

impl Default for ControlSettings {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/run/platform-agent/control.sock"),
            group: "platform-agent".into(),
            max_request_bytes: 64 * 1024,
            request_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ObjectStoreSettings {
    pub backend: ObjectStoreBackend,
    pub local: LocalStoreSettings,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Settings>,
}

impl Default for ObjectStoreSettings {
    fn default() -> Self {
        Self {
            backend: ObjectStoreBackend::Local,
            local: LocalStoreSettings::default(),
            s3: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum ObjectStoreBackend {
    Local,
    S3,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalStoreSettings {
    pub path: PathBuf,
}

impl Default for LocalStoreSettings {
    fn default() -> Self {
        Self {
            path: PathBuf::from("/var/lib/platform-agent/objects"),
        }
    }
}

/// Credentials are only ever named by file so that they never appear in the
/// configuration, `config show` or the logs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Settings {
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub prefix: String,
    pub path_style: bool,
    pub access_key_id_file: PathBuf,
    pub secret_access_key_file: PathBuf,
}

impl Default for S3Settings {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            region: "us-east-1".into(),
            bucket: String::new(),
            prefix: String::new(),
            path_style: true,
            access_key_id_file: PathBuf::new(),
            secret_access_key_file: PathBuf::new(),
        }
    }
}

/// Durations are written the way operators write them in systemd units:
/// "90s", "5min", "1h 30m".
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&humantime::format_duration(*value).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text).map_err(|err| {
            serde::de::Error::custom(format!(
                "invalid duration {text:?}: {err} (write it like \"90s\", \"5min\" or \"1h 30m\")"
            ))
        })
    }
}
