//! The CLI's side of the control socket. Blocking on purpose: a client makes
//! one request and exits, and must start fast.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::protocol::{encode_frame, frame_len, ErrorCode, Request, Response, MAX_RESPONSE_BYTES};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{}: no agent socket here; is platform-agent running? ({source})", path.display())]
    NotRunning {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: permission denied; the control socket is for root and members of the platform-agent group", path.display())]
    PermissionDenied { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: bad reply from the agent: {message}", path.display())]
    Protocol { path: PathBuf, message: String },
    #[error("the agent refused `{request}`: {message}")]
    Refused {
        request: &'static str,
        code: ErrorCode,
        message: String,
    },
}

pub struct Client {
    stream: UnixStream,
    path: PathBuf,
}

impl Client {
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::PermissionDenied => ClientError::PermissionDenied {
                path: path.to_path_buf(),
            },
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => ClientError::NotRunning {
                path: path.to_path_buf(),
                source,
            },
            _ => ClientError::Io {
                path: path.to_path_buf(),
                source,
            },
        })?;
        let io = |source| ClientError::Io {
            path: path.to_path_buf(),
            source,
        };
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        stream.set_write_timeout(Some(timeout)).map_err(io)?;
        Ok(Client {
            stream,
            path: path.to_path_buf(),
        })
    }

    /// Sends one request; an error reply becomes [`ClientError::Refused`].
    /// Progress frames of long requests are skipped.
    pub fn call(&mut self, request: &Request) -> Result<Response, ClientError> {
        self.call_with_progress(request, |_| {})
    }

    /// Like [`Client::call`], handing each progress frame to `on_progress`.
    pub fn call_with_progress(
        &mut self,
        request: &Request,
        mut on_progress: impl FnMut(&crate::backup::ProgressReport),
    ) -> Result<Response, ClientError> {
        let io = |source| ClientError::Io {
            path: self.path.clone(),
            source,
        };
        self.stream.write_all(&encode_frame(request)).map_err(io)?;
        loop {
            let mut header = [0u8; 4];
            self.stream.read_exact(&mut header).map_err(io)?;
            let len = frame_len(header, MAX_RESPONSE_BYTES).map_err(|err| ClientError::Protocol {
                path: self.path.clone(),
                message: err.to_string(),
            })?;
            let mut body = vec![0u8; len];
            self.stream.read_exact(&mut body).map_err(io)?;
            let response: Response = serde_json::from_slice(&body).map_err(|err| ClientError::Protocol {
                path: self.path.clone(),
                message: err.to_string(),
            })?;
            match response {
                Response::Progress { progress } => on_progress(&progress),
                Response::Error { code, message } => {
                    return Err(ClientError::Refused {
                        request: request.name(),
                        code,
                        message,
                    })
                }
                other => return Ok(other),
            }
        }
    }
}
