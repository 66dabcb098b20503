//! HTTP/1.1 upgrades to a runner: a port tunnel (`Upgrade: agentbox-tcp`), and any other
//! protocol a runner route switches to (a WebSocket). The proxy's pooled HTTP/2 connections
//! cannot carry an upgrade (h2c has no `101`), so each upgrade opens a connection of its own
//! through the same [`RunnerConnector`] (TCP or the runner's unix socket), sends one request
//! with the sandbox's runner token, and hands back the upgraded byte stream.

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use axum::response::Response;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;

use crate::backend::Target;
use crate::connector::RunnerConnector;
use crate::error::{Error, Result};

/// What a runner answered to an upgrade request.
#[derive(Debug)]
pub enum Upgrade {
    /// `101`: the response's headers, and the connection as a byte stream (Tokio I/O).
    Switched(HeaderMap, TokioIo<Upgraded>),
    /// Any other answer (a JSON error, say), to pass on to the caller as it is.
    Refused(Response),
}

/// Opens an HTTP/1.1 connection to `target`'s runner, sends `GET path_and_query` with
/// `headers` (plus `Connection: upgrade` and the runner token) and returns the upgraded
/// stream, or the runner's answer when it did not switch protocols. `headers` must name the
/// protocol (`Upgrade: ...`) and whatever else it needs (`Sec-WebSocket-Key`, ...).
pub async fn open(
    connector: &RunnerConnector,
    target: &Target,
    path_and_query: &str,
    mut headers: HeaderMap,
) -> Result<Upgrade> {
    let authority = connector.authority(&target.addr);
    let uri: Uri = format!("http://{authority}{path_and_query}")
        .parse()
        .map_err(|e| Error::InvalidRequest(format!("bad path: {e}")))?;
    let io = tower::ServiceExt::oneshot(connector.clone(), uri)
        .await
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::TimedOut {
                Error::RunnerTimeout
            } else {
                Error::RunnerUnreachable(e.to_string())
            }
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| Error::RunnerUnreachable(e.to_string()))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "an upgraded runner connection failed");
        }
    });
    let bearer = HeaderValue::from_str(&format!("Bearer {}", target.token))
        .map_err(|_| Error::Internal("runner token is not a header value".into()))?;
    headers.insert(header::AUTHORIZATION, bearer);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(
        header::HOST,
        HeaderValue::from_str(&authority).unwrap_or(HeaderValue::from_static("runner")),
    );
    let mut request = Request::new(Body::empty());
    *request.method_mut() = Method::GET;
    *request.uri_mut() = Uri::builder()
        .path_and_query(path_and_query)
        .build()
        .map_err(|e| Error::InvalidRequest(format!("bad path: {e}")))?;
    *request.headers_mut() = headers;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| Error::RunnerUnreachable(e.to_string()))?;
    if response.status() == StatusCode::UNAUTHORIZED {
        tracing::error!(addr = %target.addr, "a runner refused its sandbox's runner token");
        return Err(Error::RunnerUnauthorized);
    }
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (mut parts, body) = response.into_parts();
        for name in ["connection", "keep-alive", "transfer-encoding", "upgrade"] {
            parts.headers.remove(name);
        }
        return Ok(Upgrade::Refused(Response::from_parts(
            parts,
            Body::new(body),
        )));
    }
    let headers = response.headers().clone();
    let upgraded = hyper::upgrade::on(response)
        .await
        .map_err(|e| Error::RunnerUnreachable(format!("the upgrade failed: {e}")))?;
    Ok(Upgrade::Switched(headers, TokioIo::new(upgraded)))
}
