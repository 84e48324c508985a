//! logind's shutdown delay lock: while we hold it, logind waits (up to
//! InhibitDelayMaxSec) before shutting down, giving the ordered shutdown plan
//! its time; PrepareForShutdown(true) tells us to run it.

use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::dbus::LoginProxy;
use super::manager::{bus, SystemdError};

/// Held while the agent may still need to act before shutdown; dropping it
/// lets the shutdown go on.
pub struct DelayLock {
    _fd: Option<zbus::zvariant::OwnedFd>,
    /// The sim keeps its never-used sender here so the receiver stays open.
    _sim_sender: Option<mpsc::Sender<()>>,
}

impl DelayLock {
    pub fn release(self) {}
}

#[async_trait]
pub trait ShutdownInhibitor: Send + Sync {
    /// Takes a delay lock and starts watching PrepareForShutdown; the channel
    /// receives one message when the system starts shutting down.
    async fn take(&self) -> Result<(DelayLock, mpsc::Receiver<()>), SystemdError>;
    /// logind's InhibitDelayMaxSec, to warn when it is shorter than our plan.
    async fn max_delay(&self) -> Result<Duration, SystemdError>;
}

pub struct LogindInhibitor {
    login: LoginProxy<'static>,
}

impl LogindInhibitor {
    pub async fn connect() -> Result<Self, SystemdError> {
        let connection = zbus::Connection::system()
            .await
            .map_err(bus("connect to the system bus"))?;
        let login = LoginProxy::new(&connection).await.map_err(bus("login1 proxy"))?;
        Ok(LogindInhibitor { login })
    }
}

#[async_trait]
impl ShutdownInhibitor for LogindInhibitor {
    async fn take(&self) -> Result<(DelayLock, mpsc::Receiver<()>), SystemdError> {
        // Watch before inhibiting, so no PrepareForShutdown can slip between.
        let mut signals = self
            .login
            .receive_prepare_for_shutdown()
            .await
            .map_err(bus("watch PrepareForShutdown"))?;
        let fd = self
            .login
            .inhibit(
                "shutdown",
                "platform-agent",
                "stop K3s and unmount /data in order",
                "delay",
            )
            .await
            .map_err(bus("Inhibit shutdown (delay)"))?;
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            while let Some(signal) = signals.next().await {
                if signal.args().map(|a| a.start).unwrap_or(false) {
                    let _ = tx.send(()).await;
                    return;
                }
            }
        });
        Ok((
            DelayLock {
                _fd: Some(fd),
                _sim_sender: None,
            },
            rx,
        ))
    }

    async fn max_delay(&self) -> Result<Duration, SystemdError> {
        self.login
            .inhibit_delay_max_usec()
            .await
            .map(Duration::from_micros)
            .map_err(bus("read InhibitDelayMaxUSec"))
    }
}

/// No logind: nothing to hold, and the system never announces a shutdown.
pub struct SimInhibitor;

#[async_trait]
impl ShutdownInhibitor for SimInhibitor {
    async fn take(&self) -> Result<(DelayLock, mpsc::Receiver<()>), SystemdError> {
        let (tx, rx) = mpsc::channel(1);
        Ok((
            DelayLock {
                _fd: None,
                _sim_sender: Some(tx),
            },
            rx,
        ))
    }

    async fn max_delay(&self) -> Result<Duration, SystemdError> {
        Ok(Duration::MAX)
    }
}
