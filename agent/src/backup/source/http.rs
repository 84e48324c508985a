//! A minimal HTTP/1.1 client for the Vault/OpenBao API: one request per
//! connection, bodies streamed both ways, TLS through the same rustls stack
//! the S3 client uses (system roots plus an optional CA file).

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncRead;

use super::SourceError;

pub type RequestBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

pub struct HttpClient {
    scheme_https: bool,
    authority: String,
    host: String,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl HttpClient {
    pub fn new(address: &str, ca_file: &Path) -> Result<Self, SourceError> {
        let invalid = |why: &str| SourceError::Invalid(format!("{address:?}: {why}"));
        let (https, rest) = if let Some(rest) = address.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = address.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(invalid("not an http:// or https:// URL"));
        };
        let authority = rest.split('/').next().unwrap_or_default().to_string();
        if authority.is_empty() {
            return Err(invalid("no host"));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => (
                host.trim_matches(['[', ']']).to_string(),
                port.parse().map_err(|_| invalid("bad port"))?,
            ),
            _ => (authority.clone(), if https { 443 } else { 80 }),
        };
        let tls = if https {
            Some(Arc::new(tls_config(ca_file)?))
        } else {
            None
        };
        Ok(HttpClient {
            scheme_https: https,
            authority,
            host,
            port,
            tls,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!(
            "{}://{}{path}",
            if self.scheme_https { "https" } else { "http" },
            self.authority
        )
    }

    /// Sends one request; the response body is left to the caller.
    pub async fn send(
        &self,
        method: hyper::Method,
        path: &str,
        headers: &[(&str, &str)],
        body: RequestBody,
    ) -> Result<hyper::Response<Incoming>, SourceError> {
        let url = self.url(path);
        let http = |message: String| SourceError::Http {
            url: url.clone(),
            message,
        };
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|err| http(format!("cannot connect: {err}")))?;
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.authority);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(body).map_err(|err| http(err.to_string()))?;
        match &self.tls {
            None => {
                let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                    .await
                    .map_err(|err| http(err.to_string()))?;
                tokio::spawn(connection);
                sender.send_request(request).await.map_err(|err| http(err.to_string()))
            }
            Some(config) => {
                let server_name = rustls::pki_types::ServerName::try_from(self.host.clone())
                    .map_err(|err| http(format!("bad TLS server name: {err}")))?;
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(server_name, tcp)
                    .await
                    .map_err(|err| http(format!("TLS: {err}")))?;
                let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                    .await
                    .map_err(|err| http(err.to_string()))?;
                tokio::spawn(connection);
                sender.send_request(request).await.map_err(|err| http(err.to_string()))
            }
        }
    }

    /// A request with a JSON body (or none); returns status and JSON.
    pub async fn json(
        &self,
        method: hyper::Method,
        path: &str,
        token: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, serde_json::Value), SourceError> {
        let mut headers = vec![("content-type", "application/json")];
        if let Some(token) = token {
            headers.push(("x-vault-token", token));
        }
        let body = match body {
            Some(value) => full(serde_json::to_vec(&value).unwrap_or_default()),
            None => empty(),
        };
        let response = self.send(method, path, &headers, body).await?;
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|err| SourceError::Http {
                url: self.url(path),
                message: format!("reading the answer: {err}"),
            })?
            .to_bytes();
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        ))
    }
}

pub fn empty() -> RequestBody {
    Full::new(Bytes::new()).map_err(|never| match never {}).boxed()
}

pub fn full(bytes: Vec<u8>) -> RequestBody {
    Full::new(Bytes::from(bytes)).map_err(|never| match never {}).boxed()
}

/// A request body streamed from a reader (a snapshot file).
pub fn streaming<R: AsyncRead + Send + Sync + Unpin + 'static>(reader: R) -> RequestBody {
    ReaderBody {
        reader,
        buf: vec![0u8; 256 * 1024],
    }
    .boxed()
}

struct ReaderBody<R> {
    reader: R,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> Body for ReaderBody<R> {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        let mut read_buf = tokio::io::ReadBuf::new(&mut this.buf);
        match Pin::new(&mut this.reader).poll_read(cx, &mut read_buf) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(err)) => Poll::Ready(Some(Err(err))),
            Poll::Ready(Ok(())) if read_buf.filled().is_empty() => Poll::Ready(None),
            Poll::Ready(Ok(())) => Poll::Ready(Some(Ok(Frame::data(Bytes::copy_from_slice(read_buf.filled()))))),
        }
    }
}

fn tls_config(ca_file: &Path) -> Result<rustls::ClientConfig, SourceError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if !ca_file.as_os_str().is_empty() {
        let certs = CertificateDer::pem_file_iter(ca_file)
            .map_err(|err| SourceError::Invalid(format!("{}: {err}", ca_file.display())))?;
        for cert in certs {
            let cert = cert.map_err(|err| SourceError::Invalid(format!("{}: {err}", ca_file.display())))?;
            roots
                .add(cert)
                .map_err(|err| SourceError::Invalid(format!("{}: {err}", ca_file.display())))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| SourceError::Invalid(format!("TLS setup: {err}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
