//! platform-agent: the host-level caretaker of a single-node K3s server.
//! The binary is a thin shell over this library (see `cli`).

pub mod backup;
pub mod cli;
pub mod config;
pub mod control;
pub mod fsutil;
pub mod gitops;
pub mod k3s;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod objstore;
pub mod shutdown;
pub mod status;
pub mod store;
pub mod supervisor;
pub mod systemd;
pub mod volume;
pub mod wal;
