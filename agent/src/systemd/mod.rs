//! Talking to systemd. For now the service-manager notification protocol;
//! D-Bus proxies for systemd1 and login1 join when the K3s and volume
//! subsystems need them.

pub mod notify;
