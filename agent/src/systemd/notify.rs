//! `sd_notify`: READY, STATUS, WATCHDOG and STOPPING. Every call is a no-op
//! when not started by systemd (no NOTIFY_SOCKET), so the local run and the
//! tests need no special casing.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::debug;

fn send(states: &[NotifyState]) {
    // Keep NOTIFY_SOCKET set: we notify for the whole life of the process.
    if let Err(err) = sd_notify::notify(false, states) {
        debug!(error = %err, "sd_notify failed");
    }
}

pub fn ready(status_line: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status_line)]);
}

pub fn status(status_line: &str) {
    send(&[NotifyState::Status(status_line)]);
}

pub fn stopping(status_line: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status_line)]);
}

pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// The interval at which systemd expects WATCHDOG=1, if `WatchdogSec=` is set
/// for this process.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0u64;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        Some(Duration::from_micros(usec))
    } else {
        None
    }
}
