//! Talking to systemd: the notify protocol, and D-Bus (systemd1 for units,
//! login1 for the shutdown delay lock), each behind a trait with a sim
//! implementation for runs without systemd.

pub mod dbus;
pub mod login;
pub mod manager;
pub mod notify;

pub use login::{DelayLock, LogindInhibitor, ShutdownInhibitor, SimInhibitor};
pub use manager::{DbusManager, ServiceManager, SimManager, SystemdError, UnitState};
