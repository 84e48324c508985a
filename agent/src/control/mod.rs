//! The control socket: a typed request/response protocol between the CLI and
//! the daemon, with peer credentials deciding who may change state.

pub mod client;
pub mod protocol;
pub mod server;

pub use client::{Client, ClientError};
pub use protocol::{Request, Response};
pub use server::{ControlContext, ControlServer, ReloadOutcome, ReloadRequest};
