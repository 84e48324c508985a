//! The HTTP side: `/metrics` over HTTP/1.1 on TCP and, optionally, a Unix
//! socket; content negotiation between the 0.0.4 text format and
//! OpenMetrics; gzip only when the client asks for it.

use std::convert::Infallible;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ACCEPT, ACCEPT_ENCODING, ALLOW, CONTENT_ENCODING, CONTENT_TYPE, VARY};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::encode::Format;
use super::scrape::Scraper;
use crate::status::StatusHandle;

/// Prometheus opens one connection per target; more than this at once is
/// not a scraper.
const MAX_CONNECTIONS: usize = 64;
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) struct App {
    pub scraper: Scraper,
    pub status: StatusHandle,
}

/// Accepts on both listeners until cancelled; open connections are dropped
/// then (a scrape holds nothing worth finishing).
pub(super) async fn serve(app: Arc<App>, tcp: TcpListener, unix: Option<UnixListener>, cancel: CancellationToken) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = tcp.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    spawn_connection(&mut connections, stream, app.clone());
                }
                Err(err) => accept_failed(err).await,
            },
            accepted = accept_unix(unix.as_ref()) => match accepted {
                Ok(stream) => spawn_connection(&mut connections, stream, app.clone()),
                Err(err) => accept_failed(err).await,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn accept_unix(listener: Option<&UnixListener>) -> std::io::Result<tokio::net::UnixStream> {
    match listener {
        Some(listener) => listener.accept().await.map(|(stream, _)| stream),
        None => std::future::pending().await,
    }
}

/// EMFILE and friends: back off instead of spinning on accept.
async fn accept_failed(err: std::io::Error) {
    debug!(error = %err, "metrics: accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

fn spawn_connection<S>(connections: &mut JoinSet<()>, stream: S, app: Arc<App>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if connections.len() >= MAX_CONNECTIONS {
        return;
    }
    connections.spawn(async move {
        let service = hyper::service::service_fn(move |req| handle(app.clone(), req));
        let result = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service)
            .await;
        if let Err(err) = result {
            debug!(error = %err, "metrics: connection ended with an error");
        }
    });
}

async fn handle(app: Arc<App>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path();
    if path != "/metrics" {
        let (code, body) = if path == "/" {
            (StatusCode::OK, "platform-agent: node and agent metrics at /metrics\n")
        } else {
            (StatusCode::NOT_FOUND, "not found; metrics are at /metrics\n")
        };
        return Ok(plain(code, body));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(response);
    }
    let headers = req.headers();
    let format = negotiate(headers.get(ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or(""));
    let gzip = accepts_gzip(headers.get(ACCEPT_ENCODING).and_then(|v| v.to_str().ok()).unwrap_or(""));

    let snapshot = app.status.snapshot();
    let body = app.scraper.scrape(format, &snapshot).await;
    app.status.update(|s| s.metrics.scrapes += 1);

    let mut response = Response::builder()
        .header(CONTENT_TYPE, format.content_type())
        .header(VARY, "Accept, Accept-Encoding");
    let body = if gzip {
        response = response.header(CONTENT_ENCODING, "gzip");
        compress(&body)
    } else {
        body
    };
    Ok(response
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "cannot build the response\n")))
}

fn plain(code: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = code;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

fn compress(body: &[u8]) -> Vec<u8> {
    // Level 1: a scrape is mostly repeated names, which even the fastest
    // level shrinks about tenfold, at a fraction of the default's CPU.
    let mut encoder = flate2::write::GzEncoder::new(Vec::with_capacity(body.len() / 6), flate2::Compression::fast());
    let _ = encoder.write_all(body);
    encoder.finish().unwrap_or_default()
}

/// The `q` of each media range, split off its parameters.
fn media_ranges(header: &str) -> impl Iterator<Item = (&str, f32)> {
    header.split(',').map(|part| {
        let mut params = part.split(';');
        let media = params.next().unwrap_or_default().trim();
        let q = params
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        (media, q)
    })
}

/// OpenMetrics when the client prefers it (Prometheus does, by q); the text
/// format otherwise, and on a tie.
pub(super) fn negotiate(accept: &str) -> Format {
    let (mut openmetrics, mut text) = (0.0f32, 0.0f32);
    for (media, q) in media_ranges(accept) {
        match media {
            "application/openmetrics-text" => openmetrics = openmetrics.max(q),
            "text/plain" | "text/*" | "*/*" => text = text.max(q),
            _ => {}
        }
    }
    if openmetrics > 0.0 && openmetrics > text {
        Format::OpenMetrics
    } else {
        Format::Text
    }
}

pub(super) fn accepts_gzip(accept_encoding: &str) -> bool {
    media_ranges(accept_encoding).any(|(coding, q)| coding.eq_ignore_ascii_case("gzip") && q > 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiates_what_prometheus_and_curl_ask_for() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(negotiate(prometheus), Format::OpenMetrics);
        assert_eq!(negotiate("text/plain;version=0.0.4;q=1,*/*;q=0.1"), Format::Text);
        assert_eq!(negotiate("*/*"), Format::Text);
        assert_eq!(negotiate(""), Format::Text);
        assert_eq!(negotiate("application/openmetrics-text;q=0"), Format::Text);
        assert!(accepts_gzip("gzip"));
        assert!(accepts_gzip("br, gzip;q=0.5"));
        assert!(!accepts_gzip("gzip;q=0, identity"));
        assert!(!accepts_gzip(""));
    }
}
