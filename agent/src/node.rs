//! The node controller: keeps /data mounted and laid out, and K3s running
//! on top of it and only on top of it. Each pass looks at the volume, then
//! starts K3s if the volume is ready, or stops it (the fence) if the volume
//! is lost or is the wrong one.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Settings;
use crate::k3s::{K3s, K3sBackendKind, K3sStatus, ReadyTier};
use crate::logging::ids;
use crate::status::{Health, StatusHandle};
use crate::systemd::{DbusManager, ServiceManager, SimManager, SystemdError};
use crate::volume::{MountState, SimMount, SystemdMount, Volume, VolumeBackendKind};

pub struct Node {
    pub volume: Option<Volume>,
    pub k3s: Option<K3s>,
    status: StatusHandle,
    interval: Duration,
    /// Wakes the loop before the interval (e.g. after a reload).
    wake: Notify,
}

/// Whether anything in this configuration needs the real systemd.
pub fn needs_systemd(settings: &Settings) -> bool {
    (settings.volume.enabled && settings.volume.backend == VolumeBackendKind::Systemd)
        || (settings.k3s.enabled && settings.k3s.backend == K3sBackendKind::Systemd)
}

impl Node {
    pub async fn build(settings: &Settings, status: StatusHandle) -> Result<Node, SystemdError> {
        let manager: Arc<dyn ServiceManager> = if needs_systemd(settings) {
            Arc::new(DbusManager::connect().await?)
        } else {
            Arc::new(SimManager::default())
        };
        let volume = settings.volume.enabled.then(|| {
            let backend: Box<dyn crate::volume::VolumeBackend> = match settings.volume.backend {
                VolumeBackendKind::Systemd => Box::new(SystemdMount::new(
                    settings.volume.clone(),
                    manager.clone(),
                    settings.agent.unit_dir.clone(),
                )),
                VolumeBackendKind::Sim => Box::new(SimMount::new(settings.volume.mount_point.clone())),
            };
            Volume::new(settings.volume.clone(), backend)
        });
        let k3s = settings
            .k3s
            .enabled
            .then(|| K3s::new(settings.k3s.clone(), manager.clone(), settings.agent.unit_dir.clone()));
        Ok(Node {
            volume,
            k3s,
            status,
            interval: settings.agent.check_interval,
            wake: Notify::new(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.volume.is_none() && self.k3s.is_none()
    }

    pub fn wake(&self) {
        self.wake.notify_one();
    }

    pub async fn run(self: Arc<Self>, cancel: CancellationToken) -> Result<(), String> {
        let mut last_volume_state: Option<MountState> = None;
        let mut last_tier: Option<ReadyTier> = None;
        let mut last_fence: Option<String> = None;
        loop {
            self.pass(&mut last_volume_state, &mut last_tier, &mut last_fence).await;
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(self.interval) => {}
                _ = self.wake.notified() => {}
            }
        }
    }

    async fn pass(
        &self,
        last_volume_state: &mut Option<MountState>,
        last_tier: &mut Option<ReadyTier>,
        last_fence: &mut Option<String>,
    ) {
        // Not ready: the reason K3s must not run.
        let mut fence: Option<String> = None;
        if let Some(volume) = &self.volume {
            let status = volume.ensure_ready().await;
            if last_volume_state.as_ref() != Some(&status.mount_state) {
                match &status.mount_state {
                    MountState::Mounted => info!(
                        message_id = ids::VOLUME_READY,
                        mount_point = %status.mount_point,
                        identity = %status.identity,
                        created = %status.created.join(" "),
                        "{} is mounted and verified ({})",
                        status.mount_point,
                        status.identity
                    ),
                    other => warn!(
                        message_id = ids::VOLUME_NOT_READY,
                        mount_point = %status.mount_point,
                        state = %other,
                        "{} is not ready: {other}",
                        status.mount_point
                    ),
                }
                *last_volume_state = Some(status.mount_state.clone());
            }
            if !status.is_ready() {
                fence = Some(format!("{} is not ready ({})", status.mount_point, status.mount_state));
            }
            let health = match &status.mount_state {
                MountState::Mounted => Health::Ok,
                MountState::Failed { reason } | MountState::WrongVolume { reason } => {
                    Health::Failed { reason: reason.clone() }
                }
                other => Health::Degraded {
                    reason: other.to_string(),
                },
            };
            self.status.update(|s| {
                s.mount = health;
                s.volume = Some(status);
            });
        }

        let Some(k3s) = &self.k3s else { return };
        let mount_point = self.volume.as_ref().map(|v| v.mount_point().to_path_buf());
        let mut problem: Option<String> = None;
        if let Err(err) = k3s.write_configuration(mount_point.as_deref(), fence.is_some()).await {
            problem = Some(format!("cannot write K3s configuration: {err}"));
        }
        let active = match k3s.unit_state().await {
            Ok(state) => state.is_active(),
            Err(err) => {
                problem = Some(err.to_string());
                false
            }
        };
        match (&fence, active) {
            (None, false) if k3s.settings().autostart && problem.is_none() => match k3s.start().await {
                Ok(()) => info!(
                    message_id = ids::K3S_STARTED,
                    unit = k3s.unit(),
                    "started {}",
                    k3s.unit()
                ),
                Err(err) => {
                    error!(unit = k3s.unit(), error = %err, "cannot start {}", k3s.unit());
                    problem = Some(err.to_string());
                }
            },
            (Some(reason), true) => {
                warn!(message_id = ids::K3S_FENCED, unit = k3s.unit(), reason = %reason, "stopping {}: {reason}", k3s.unit());
                let cgroup = k3s.unit_state().await.map(|s| s.control_group).unwrap_or_default();
                if let Err(err) = k3s.stop().await {
                    error!(unit = k3s.unit(), error = %err, "cannot stop {} for the fence", k3s.unit());
                }
                let report = k3s.clean_leftovers(&cgroup).await;
                self.status.update(|s| {
                    if let Some(k) = s.k3s_status.as_mut() {
                        k.last_cleanup = Some(report);
                    }
                });
                *last_fence = Some(reason.clone());
            }
            (Some(reason), false) if last_fence.as_ref() != Some(reason) => {
                warn!(message_id = ids::K3S_FENCED, unit = k3s.unit(), reason = %reason, "not starting {}: {reason}", k3s.unit());
                *last_fence = Some(reason.clone());
            }
            _ => {}
        }
        if fence.is_none() {
            *last_fence = None;
        }
        let tier = k3s.readiness().await;
        if *last_tier != Some(tier) {
            info!(
                message_id = ids::K3S_READINESS,
                unit = k3s.unit(),
                tier = tier.as_str(),
                "{} readiness: {}",
                k3s.unit(),
                tier.as_str()
            );
            *last_tier = Some(tier);
        }
        let active_state = k3s
            .unit_state()
            .await
            .map(|s| s.active)
            .unwrap_or_else(|_| "unknown".into());
        let health = match (&problem, &fence, tier) {
            (Some(p), _, _) => Health::Failed { reason: p.clone() },
            (None, Some(f), _) => Health::Degraded {
                reason: format!("fenced: {f}"),
            },
            (None, None, ReadyTier::Stopped) => Health::Degraded {
                reason: "not running".into(),
            },
            (None, None, _) => Health::Ok,
        };
        self.status.update(|s| {
            s.k3s = health;
            let last_cleanup = s.k3s_status.as_ref().and_then(|k| k.last_cleanup.clone());
            s.k3s_status = Some(K3sStatus {
                unit: k3s.unit().to_string(),
                tier,
                active_state,
                fenced: fence.clone(),
                last_cleanup,
            });
        });
    }
}
