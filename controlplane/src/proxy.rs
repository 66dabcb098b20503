//! The streaming proxy to a sandbox's runner. Bodies pass through as they come, in both
//! directions: the first SSE byte leaves as soon as the runner sends it. Hop-by-hop headers and
//! the caller's credentials are dropped, the sandbox's runner token added.

use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderName, HeaderValue, Uri};
use axum::response::Response;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::backend::Target;
use crate::error::{Error, Result};

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the
/// caller's credentials, which must never reach a runner.
const DROPPED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "authorization",
    "x-api-key",
    "cookie",
];

const H2_STREAM_WINDOW: u32 = 2 << 20;
const H2_CONN_WINDOW: u32 = 8 << 20;
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A client towards runners: HTTP/2 with prior knowledge, one connection per runner carrying
/// all of its streams (a held stream costs an HTTP/2 stream, not a connection with its own
/// buffers and task), kept alive with pings so a runner that vanished without a reset (a
/// deleted pod, a killed container) fails its streams within seconds instead of hanging them.
#[derive(Debug, Clone)]
pub struct Proxy {
    client: Client<HttpConnector, Body>,
}

impl Proxy {
    /// A proxy whose connects time out after `connect_timeout` (streams themselves never do).
    pub fn new(connect_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .http2_only(true)
            .http2_initial_stream_window_size(H2_STREAM_WINDOW)
            .http2_initial_connection_window_size(H2_CONN_WINDOW)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .http2_keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .http2_keep_alive_while_idle(true)
            .build(connector);
        Self { client }
    }

    /// Sends `req` to `path_and_query` on the runner of `target` and returns its response,
    /// streaming.
    pub async fn forward(
        &self,
        target: &Target,
        path_and_query: &str,
        req: Request,
    ) -> Result<Response> {
        let (mut parts, body) = req.into_parts();
        let uri: Uri = format!("http://{}{}", target.addr, path_and_query)
            .parse()
            .map_err(|e| Error::InvalidRequest(format!("bad path: {e}")))?;
        for name in DROPPED {
            parts.headers.remove(*name);
        }
        strip_connection_listed(&mut parts.headers);
        let bearer = HeaderValue::from_str(&format!("Bearer {}", target.token))
            .map_err(|_| Error::Internal("runner token is not a header value".into()))?;
        parts.headers.insert(header::AUTHORIZATION, bearer);
        parts.uri = uri;
        let outgoing = axum::http::Request::from_parts(parts, body);
        let response = self.client.request(outgoing).await.map_err(|e| {
            let text = format!("{e:?}");
            if text.contains("ConnectTimeout") || text.contains("timed out") {
                Error::RunnerTimeout
            } else {
                Error::RunnerUnreachable(e.to_string())
            }
        })?;
        let (mut parts, body) = response.into_parts();
        for name in [
            "connection",
            "keep-alive",
            "transfer-encoding",
            "trailer",
            "upgrade",
        ] {
            parts.headers.remove(name);
        }
        Ok(Response::from_parts(parts, Body::new(body)))
    }
}

fn strip_connection_listed(headers: &mut axum::http::HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
}
