//! Starting and stopping units, waiting for the job's result the way
//! systemctl does: subscribe to JobRemoved before queueing the job, then wait
//! for the signal naming our job path.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use zbus::zvariant::OwnedObjectPath;

use super::dbus::{ManagerProxy, ServiceProxy, UnitProxy};

#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("systemd D-Bus: {action}: {source}")]
    Bus {
        action: String,
        #[source]
        source: Box<zbus::Error>,
    },
    #[error("{action} {unit}: job ended with result {result:?}")]
    JobFailed {
        action: &'static str,
        unit: String,
        result: String,
    },
    #[error("{action} {unit}: no result within {}", humantime::format_duration(*after))]
    Timeout {
        action: &'static str,
        unit: String,
        after: Duration,
    },
}

pub(crate) fn bus(action: impl Into<String>) -> impl FnOnce(zbus::Error) -> SystemdError {
    let action = action.into();
    move |source| SystemdError::Bus {
        action,
        source: Box::new(source),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitState {
    pub load: String,
    pub active: String,
    pub sub: String,
    pub main_pid: u32,
    /// Path below the cgroup root, e.g. "/system.slice/k3s.service".
    pub control_group: String,
}

impl UnitState {
    pub fn is_active(&self) -> bool {
        self.active == "active" || self.active == "reloading"
    }
}

#[async_trait]
pub trait ServiceManager: Send + Sync {
    async fn start(&self, unit: &str, timeout: Duration) -> Result<(), SystemdError>;
    async fn stop(&self, unit: &str, timeout: Duration) -> Result<(), SystemdError>;
    async fn restart(&self, unit: &str, timeout: Duration) -> Result<(), SystemdError>;
    /// `systemctl daemon-reload`, after writing unit files or drop-ins.
    async fn daemon_reload(&self) -> Result<(), SystemdError>;
    async fn state(&self, unit: &str) -> Result<UnitState, SystemdError>;
}

/// The real thing, on the system bus.
pub struct DbusManager {
    connection: zbus::Connection,
    manager: ManagerProxy<'static>,
}

impl DbusManager {
    pub async fn connect() -> Result<Self, SystemdError> {
        let connection = zbus::Connection::system()
            .await
            .map_err(bus("connect to the system bus"))?;
        let manager = ManagerProxy::new(&connection)
            .await
            .map_err(bus("systemd1 manager proxy"))?;
        manager.subscribe().await.map_err(bus("Subscribe"))?;
        Ok(DbusManager { connection, manager })
    }

    async fn run_job(
        &self,
        action: &'static str,
        unit: &str,
        timeout: Duration,
        queue: impl std::future::Future<Output = zbus::Result<OwnedObjectPath>>,
    ) -> Result<(), SystemdError> {
        // Subscribe first: a job can finish before StartUnit's reply arrives.
        let mut removed = self
            .manager
            .receive_job_removed()
            .await
            .map_err(bus("watch JobRemoved"))?;
        let job = queue.await.map_err(bus(format!("{action} {unit}")))?;
        let wait = async {
            while let Some(signal) = removed.next().await {
                let Ok(args) = signal.args() else { continue };
                if args.job == job {
                    return Some(args.result);
                }
            }
            None
        };
        let result = tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| SystemdError::Timeout {
                action,
                unit: unit.to_string(),
                after: timeout,
            })?
            .unwrap_or_else(|| "bus-closed".into());
        if result == "done" {
            Ok(())
        } else {
            Err(SystemdError::JobFailed {
                action,
                unit: unit.to_string(),
                result,
            })
        }
    }
}

#[async_trait]
impl ServiceManager for DbusManager {
    async fn start(&self, unit: &str, timeout: Duration) -> Result<(), SystemdError> {
        self.run_job("start", unit, timeout, self.manager.start_unit(unit, "replace"))
            .await
    }

    async fn stop(&self, unit: &str, timeout: Duration) -> Result<(), SystemdError> {
        self.run_job("stop", unit, timeout, self.manager.stop_unit(unit, "replace"))
            .await
    }

    async fn restart(&self, unit: &str, timeout: Duration) -> Result<(), SystemdError> {
        self.run_job("restart", unit, timeout, self.manager.restart_unit(unit, "replace"))
            .await
    }

    async fn daemon_reload(&self) -> Result<(), SystemdError> {
        self.manager.reload().await.map_err(bus("daemon-reload"))
    }

    async fn state(&self, unit: &str) -> Result<UnitState, SystemdError> {
        let path = self
            .manager
            .load_unit(unit)
            .await
            .map_err(bus(format!("LoadUnit {unit}")))?;
        let unit_proxy = UnitProxy::builder(&self.connection)
            .path(path.clone())
            .map_err(bus("unit path"))?
            .build()
            .await
            .map_err(bus("unit proxy"))?;
        let read = |what: &str| format!("read {what} of {unit}");
        let mut state = UnitState {
            load: unit_proxy.load_state().await.map_err(bus(read("LoadState")))?,
            active: unit_proxy.active_state().await.map_err(bus(read("ActiveState")))?,
            sub: unit_proxy.sub_state().await.map_err(bus(read("SubState")))?,
            main_pid: 0,
            control_group: String::new(),
        };
        if unit.ends_with(".service") {
            let service = ServiceProxy::builder(&self.connection)
                .path(path)
                .map_err(bus("unit path"))?
                .build()
                .await
                .map_err(bus("service proxy"))?;
            state.main_pid = service.main_pid().await.map_err(bus(read("MainPID")))?;
            state.control_group = service.control_group().await.map_err(bus(read("ControlGroup")))?;
        }
        Ok(state)
    }
}

/// Units that live in memory: start makes them active at once. For the
/// embedded-defaults run and unit tests; it never touches the host.
#[derive(Default)]
pub struct SimManager {
    units: Mutex<BTreeMap<String, bool>>,
    failing: Mutex<BTreeMap<String, String>>,
}

impl SimManager {
    /// Makes the next start of `unit` fail with `result` (fault injection).
    pub fn fail_next_start(&self, unit: &str, result: &str) {
        self.failing.lock().unwrap().insert(unit.into(), result.into());
    }
}

#[async_trait]
impl ServiceManager for SimManager {
    async fn start(&self, unit: &str, _timeout: Duration) -> Result<(), SystemdError> {
        if let Some(result) = self.failing.lock().unwrap().remove(unit) {
            return Err(SystemdError::JobFailed {
                action: "start",
                unit: unit.into(),
                result,
            });
        }
        self.units.lock().unwrap().insert(unit.into(), true);
        Ok(())
    }

    async fn stop(&self, unit: &str, _timeout: Duration) -> Result<(), SystemdError> {
        self.units.lock().unwrap().insert(unit.into(), false);
        Ok(())
    }

    async fn restart(&self, unit: &str, timeout: Duration) -> Result<(), SystemdError> {
        self.start(unit, timeout).await
    }

    async fn daemon_reload(&self) -> Result<(), SystemdError> {
        Ok(())
    }

    async fn state(&self, unit: &str) -> Result<UnitState, SystemdError> {
        let active = self.units.lock().unwrap().get(unit).copied().unwrap_or(false);
        Ok(UnitState {
            load: "loaded".into(),
            active: if active { "active" } else { "inactive" }.into(),
            sub: if active { "running" } else { "dead" }.into(),
            main_pid: 0,
            control_group: String::new(),
        })
    }
}
