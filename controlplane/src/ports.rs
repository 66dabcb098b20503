//! Forwarded ports on the control plane: `GET|POST /api/v1/sandboxes/{id}/ports`,
//! `DELETE .../ports/{port}`, the raw tunnel `GET .../ports/{port}/tunnel` (`agentbox
//! port-forward`) and the preview proxy `ANY .../preview/{port}/{*rest}`.
//!
//! The runner keeps the table and reaches the ports (it is inside the sandbox's network
//! namespace on every backend); the control plane adds the URLs, authenticates, audits, and
//! carries bytes. A preview request opens a tunnel to the port through the runner
//! ([`crate::upgrade::open`]) and speaks HTTP/1.1 to the sandbox's server over it, bodies
//! streaming both ways; a WebSocket (any upgrade) inside is spliced through once the server
//! answers 101. The caller's credentials never reach the sandbox's server. No Kubernetes
//! Service or Ingress is created: the control plane reaches the pod's runner by pod IP.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use agentbox_proto::{ForwardedPort, PortList, PortRequest};
use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hyper_util::rt::TokioIo;
use tokio_util::either::Either;

use crate::api::Located;
use crate::auth::Identity;
use crate::backend::Target;
use crate::connector::RunnerAddr;
use crate::error::{Error, Result};
use crate::upgrade::{self, Upgrade};
use crate::{audit, metrics, AppState};

/// The protocol of a raw tunnel's upgrade (the runner's as well).
pub const TUNNEL_PROTOCOL: &str = "agentbox-tcp";
/// The runner's upgrade that hands the port's socket over instead (unix socket runners).
const HANDOFF_PROTOCOL: &str = "agentbox-tcp-fd";
/// Each direction's copy buffer in a spliced upgrade.
const BUF: usize = 64 << 10;
/// The largest runner answer read for the port routes (64 ports of JSON fit many times).
const ANSWER_LIMIT: usize = 1 << 20;

/// A port route, from the rest of a sandbox URL (still percent-encoded).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Route {
    List,
    Forward,
    Remove(String),
    Tunnel(String),
    /// `preview/{port}` without the slash: redirected, so relative links resolve.
    PreviewRoot(String),
    Preview {
        port: String,
        /// The path on the sandbox's server, with its leading `/`.
        path: String,
    },
    /// A port route with a method it does not take.
    WrongMethod,
}

impl Route {
    fn action(&self) -> &'static str {
        match self {
            Route::List => "ports.list",
            Route::Forward => "ports.forward",
            Route::Remove(_) => "ports.remove",
            Route::Tunnel(_) => "ports.tunnel",
            Route::PreviewRoot(_) | Route::Preview { .. } => "preview",
            Route::WrongMethod => "ports",
        }
    }
}

/// Which port route `rest` is, if any.
pub(crate) fn route(method: &Method, rest: &str) -> Option<Route> {
    let mut parts = rest.splitn(3, '/');
    let head = parts.next().unwrap_or_default();
    let port = parts.next();
    let tail = parts.next();
    Some(match (head, port, tail) {
        ("ports", None, None) if method == Method::GET => Route::List,
        ("ports", None, None) if method == Method::POST => Route::Forward,
        ("ports", Some(p), None) if !p.is_empty() && method == Method::DELETE => {
            Route::Remove(p.to_owned())
        }
        ("ports", Some(p), Some("tunnel")) if !p.is_empty() && method == Method::GET => {
            Route::Tunnel(p.to_owned())
        }
        ("ports", None, None) => Route::WrongMethod,
        ("ports", Some(p), None | Some("tunnel")) if !p.is_empty() => Route::WrongMethod,
        ("preview", Some(p), None) if !p.is_empty() => Route::PreviewRoot(p.to_owned()),
        ("preview", Some(p), Some(t)) if !p.is_empty() => Route::Preview {
            port: p.to_owned(),
            path: format!("/{t}"),
        },
        _ => return None,
    })
}

/// Checks a port from a path segment or a body: 1–65535.
fn check_port(text: &str) -> Result<u16> {
    let bad = || Error::InvalidPort(format!("port {text:?} is not a number in 1-65535"));
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) || text.len() > 5 {
        return Err(bad());
    }
    text.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)
}

/// Serves a port route for sandbox `name` (already authenticated as `id`).
pub(crate) async fn serve(
    app: Arc<AppState>,
    id: &Identity,
    name: &str,
    route: Route,
    request: Request,
) -> Result<Response> {
    let action = route.action();
    let mut namespace = None;
    // Until found: the name asked for (an id `name.namespace` without its namespace).
    let mut shown = name.split('.').next().unwrap_or_default().to_owned();
    let result = serve_checked(&app, id, name, route, request, &mut namespace, &mut shown).await;
    let status = match &result {
        Ok(r) => r.status().as_u16(),
        Err(e) => e.status().as_u16(),
    };
    app.audit.write(&audit::Record {
        time: crate::api::now(),
        actor: &id.sub,
        sandbox: Some(&shown),
        namespace: namespace.as_deref(),
        action,
        outcome: metrics::outcome(status),
        status,
        ..Default::default()
    });
    result
}

async fn serve_checked(
    app: &Arc<AppState>,
    id: &Identity,
    name: &str,
    route: Route,
    request: Request,
    namespace: &mut Option<String>,
    shown: &mut String,
) -> Result<Response> {
    if route == Route::WrongMethod {
        return Err(Error::MethodNotAllowed);
    }
    // A preview's query is its server's: there the id `name.namespace` picks a namespace.
    let asked = match route {
        Route::Preview { .. } | Route::PreviewRoot(_) => None,
        _ => crate::api::namespace_param(request.uri().query()),
    };
    let Located { key, name, target } = crate::api::locate(app, id, name, asked.as_deref()).await?;
    *namespace = Some(target.namespace.clone());
    shown.clone_from(&name);
    // The id in URLs made here: the name alone in `default`, else `name.namespace`, which
    // no other namespace's sandbox answers to.
    let id_in_urls = crate::backend::sandbox_key(&target.namespace, &name);
    let name = name.as_str();
    // Bad ports before the phase: a 400 says what is wrong with the request itself.
    let port = match &route {
        Route::Remove(p)
        | Route::Tunnel(p)
        | Route::PreviewRoot(p)
        | Route::Preview { port: p, .. } => Some(check_port(p)?),
        _ => None,
    };
    if let (Route::PreviewRoot(_), Some(port)) = (&route, port) {
        let location = format!("/api/v1/sandboxes/{id_in_urls}/preview/{port}/");
        return Ok((
            StatusCode::PERMANENT_REDIRECT,
            [(header::LOCATION, location)],
        )
            .into_response());
    }
    let target = crate::lifecycle::running(app, &key, name, target).await?;
    let base = preview_base(request.headers(), &id_in_urls);
    match route {
        Route::List => {
            let answer = runner_json(app, &target, Method::GET, "/v1/ports", Body::empty()).await?;
            let mut list: PortList = match answer {
                Ok((_, bytes)) => parse_answer(&bytes)?,
                Err(response) => return Ok(response),
            };
            for p in &mut list.ports {
                add_urls(p, &base);
            }
            Ok(Json(list).into_response())
        }
        Route::Forward => {
            let bytes = crate::api::read_limited(request.into_body(), 4096)
                .await?
                .ok_or_else(|| Error::PayloadTooLarge("the body is over 4096 bytes".into()))?;
            let req: PortRequest = serde_json::from_slice(&bytes).map_err(|e| {
                Error::InvalidRequest(format!("the body is not a port request: {e}"))
            })?;
            if !(1..=65_535).contains(&req.port) {
                return Err(Error::InvalidPort(format!(
                    "port {} is outside 1-65535",
                    req.port
                )));
            }
            let body = serde_json::to_vec(&req).map_err(|e| Error::Internal(e.to_string()))?;
            let answer =
                runner_json(app, &target, Method::POST, "/v1/ports", Body::from(body)).await?;
            let (status, bytes) = match answer {
                Ok(ok) => ok,
                Err(response) => return Ok(response),
            };
            let mut port: ForwardedPort = parse_answer(&bytes)?;
            add_urls(&mut port, &base);
            Ok((status, Json(port)).into_response())
        }
        Route::Remove(_) => {
            let path = format!("/v1/ports/{}", port.unwrap_or_default());
            match runner_json(app, &target, Method::DELETE, &path, Body::empty()).await? {
                Ok((status, _)) => Ok(status.into_response()),
                Err(response) => Ok(response),
            }
        }
        Route::Tunnel(_) => tunnel(app, &key, &target, port.unwrap_or_default(), request).await,
        Route::Preview { path, .. } => {
            preview(
                app,
                &key,
                &target,
                &id_in_urls,
                port.unwrap_or_default(),
                &path,
                request,
            )
            .await
        }
        Route::PreviewRoot(_) | Route::WrongMethod => Err(Error::MethodNotAllowed),
    }
}

/// Sends a small request to the runner; a 2xx answer is read (bounded), any other is
/// returned as the response to pass on.
async fn runner_json(
    app: &AppState,
    target: &Target,
    method: Method,
    path: &str,
    body: Body,
) -> Result<std::result::Result<(StatusCode, Vec<u8>), Response>> {
    let mut request = Request::new(body);
    *request.method_mut() = method;
    request.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let response = app.proxy.forward(target, path, request, false).await?;
    if !response.status().is_success() {
        return Ok(Err(response));
    }
    let status = response.status();
    let bytes = crate::api::read_limited(response.into_body(), ANSWER_LIMIT)
        .await
        .map_err(|e| Error::RunnerUnreachable(e.to_string()))?
        .ok_or_else(|| Error::RunnerUnreachable("the runner's answer is too large".into()))?;
    Ok(Ok((status, bytes)))
}

fn parse_answer<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| Error::RunnerUnreachable(format!("the runner's answer is not JSON: {e}")))
}

/// `{scheme}://{host}/api/v1/sandboxes/{name}/preview/` as the caller reached this control
/// plane (`X-Forwarded-Proto` and `X-Forwarded-Host` from a front proxy win), or the path
/// alone when the request named no host.
fn preview_base(headers: &HeaderMap, name: &str) -> String {
    let get = |h: &str| {
        headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty() && !v.contains(['/', ' ', '"', '<', '>']))
    };
    let path = format!("/api/v1/sandboxes/{name}/preview/");
    let scheme = get("x-forwarded-proto")
        .filter(|s| s == "https" || s == "http")
        .unwrap_or_else(|| "http".into());
    match get("x-forwarded-host").or_else(|| get("host")) {
        Some(host) => format!("{scheme}://{host}{path}"),
        None => path,
    }
}

fn add_urls(port: &mut ForwardedPort, base: &str) {
    port.preview_url = (port.protocol == "http").then(|| format!("{base}{}/", port.port));
    port.created_at = None;
}

/// The raw tunnel: the caller's HTTP/1.1 upgrade spliced with the runner's tunnel.
async fn tunnel(
    app: &AppState,
    key: &str,
    target: &Target,
    port: u16,
    mut request: Request,
) -> Result<Response> {
    let asks = request
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(TUNNEL_PROTOCOL));
    let client = request
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>();
    let (true, Some(client)) = (asks, client) else {
        return Err(Error::InvalidRequest(format!(
            "a tunnel is an HTTP/1.1 upgrade: send Connection: upgrade and Upgrade: {TUNNEL_PROTOCOL}"
        )));
    };
    let runner = match open_port(app, key, target, port).await? {
        Ok(io) => io,
        Err(response) => return Ok(response),
    };
    splice(client, runner, port);
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static(TUNNEL_PROTOCOL));
    Ok(response)
}

/// A connection to a forwarded port: the sandbox's own socket, handed over by the runner, or
/// a tunnel through the runner.
type PortIo = Either<HeldSocket, TokioIo<hyper::upgrade::Upgraded>>;

/// Port connections a sandbox may have handed over to this control plane at once: the
/// runner's own cap on tunnels, which a handed-over connection no longer counts against once
/// the runner has sent it.
pub const MAX_HELD_PER_SANDBOX: usize = 256;

/// The port connections this control plane holds (handed over by runners), per sandbox key.
#[derive(Debug, Default)]
pub struct HeldPorts(Arc<Mutex<HashMap<String, usize>>>);

impl HeldPorts {
    /// A slot for one more of `key`'s connections, or `None` at [`MAX_HELD_PER_SANDBOX`].
    fn take(&self, key: &str) -> Option<HeldSlot> {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = held.entry(key.to_owned()).or_default();
        if *count >= MAX_HELD_PER_SANDBOX {
            return None;
        }
        *count += 1;
        Some(HeldSlot {
            held: Arc::clone(&self.0),
            key: key.to_owned(),
        })
    }

    /// How many of `key`'s connections are held.
    #[cfg(test)]
    fn count(&self, key: &str) -> usize {
        let held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        held.get(key).copied().unwrap_or_default()
    }
}

/// One held connection's place in [`HeldPorts`], given back when dropped.
#[derive(Debug)]
struct HeldSlot {
    held: Arc<Mutex<HashMap<String, usize>>>,
    key: String,
}

impl Drop for HeldSlot {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = held.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(&self.key);
            }
        }
    }
}

/// A handed-over socket with its slot: the slot is given back when the socket closes.
#[derive(Debug)]
pub struct HeldSocket {
    stream: tokio::net::TcpStream,
    _slot: HeldSlot,
}

impl tokio::io::AsyncRead for HeldSocket {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for HeldSocket {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A connection to `port`, or the runner's refusal (404 `port_not_forwarded`, 502
/// `port_unreachable`, 503 `too_many_tunnels`) to pass on. A runner on a unix socket (an
/// isolated local sandbox, a Docker container without a network) shares this host, so it
/// hands the connected socket over (`agentbox-tcp-fd`) and the bytes skip the runner; a runner
/// reached by TCP, or one from before handoffs (which answers 400), carries them in a tunnel.
async fn open_port(
    app: &AppState,
    key: &str,
    target: &Target,
    port: u16,
) -> Result<std::result::Result<PortIo, Response>> {
    let path = format!("/v1/ports/{port}/tunnel");
    if matches!(target.addr, RunnerAddr::Unix { .. }) {
        let slot = app.held_ports.take(key).ok_or_else(|| {
            Error::TooManyTunnels(format!(
                "{MAX_HELD_PER_SANDBOX} connections to this sandbox's ports are open"
            ))
        })?;
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, HeaderValue::from_static(HANDOFF_PROTOCOL));
        match upgrade::open(app.proxy.connector(), target, &path, headers).await? {
            Upgrade::Switched(_, io) => {
                let stream = upgrade::receive_socket(io).await?;
                return Ok(Ok(Either::Left(HeldSocket {
                    stream,
                    _slot: slot,
                })));
            }
            Upgrade::Refused(response) if response.status() != StatusCode::BAD_REQUEST => {
                return Ok(Err(response))
            }
            Upgrade::Refused(_) => {}
        }
    }
    let mut headers = HeaderMap::new();
    headers.insert(header::UPGRADE, HeaderValue::from_static(TUNNEL_PROTOCOL));
    Ok(
        match upgrade::open(app.proxy.connector(), target, &path, headers).await? {
            Upgrade::Switched(_, io) => Ok(Either::Right(io)),
            Upgrade::Refused(response) => Err(response),
        },
    )
}

/// Copies bytes both ways between the caller's upgraded connection (once it is) and `runner`.
fn splice(
    client: hyper::upgrade::OnUpgrade,
    mut runner: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    port: u16,
) {
    tokio::spawn(async move {
        match client.await {
            Ok(upgraded) => {
                let mut client = TokioIo::new(upgraded);
                if let Err(e) =
                    tokio::io::copy_bidirectional_with_sizes(&mut client, &mut runner, BUF, BUF)
                        .await
                {
                    tracing::debug!(port, error = %e, "a spliced connection ended with an error");
                }
            }
            Err(e) => tracing::debug!(port, error = %e, "the caller's upgrade failed"),
        }
    });
}

/// Request headers never passed to the sandbox's server: the caller's credentials and the
/// hop-by-hop ones (an upgrade's `Connection` and `Upgrade` are put back).
const DROPPED: &[&str] = &[
    "authorization",
    "x-api-key",
    "proxy-authorization",
    "proxy-authenticate",
    "proxy-connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "connection",
    "upgrade",
];

/// The preview proxy: one HTTP/1.1 exchange with the sandbox's server over a runner tunnel.
async fn preview(
    app: &AppState,
    key: &str,
    target: &Target,
    name: &str,
    port: u16,
    path: &str,
    mut request: Request,
) -> Result<Response> {
    let upgrade_to = request.headers().get(header::UPGRADE).cloned();
    let client_upgrade = upgrade_to.as_ref().and_then(|_| {
        request
            .extensions_mut()
            .remove::<hyper::upgrade::OnUpgrade>()
    });
    let io = match open_port(app, key, target, port).await? {
        Ok(io) => io,
        Err(response) => return Ok(response),
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| Error::RunnerUnreachable(format!("the sandbox's server: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "a preview connection failed");
        }
    });
    let (mut parts, body) = request.into_parts();
    let original_host = parts.headers.get(header::HOST).cloned();
    crate::proxy::strip_connection_listed(&mut parts.headers);
    for name in DROPPED {
        parts.headers.remove(*name);
    }
    if let (Some(protocol), Some(_)) = (&upgrade_to, &client_upgrade) {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, protocol.clone());
    }
    if let Some(host) = original_host {
        parts
            .headers
            .insert(HeaderName::from_static("x-forwarded-host"), host);
    }
    if let Ok(prefix) = HeaderValue::from_str(&format!("/api/v1/sandboxes/{name}/preview/{port}")) {
        parts
            .headers
            .insert(HeaderName::from_static("x-forwarded-prefix"), prefix);
    }
    if let Ok(host) = HeaderValue::from_str(&format!("localhost:{port}")) {
        parts.headers.insert(header::HOST, host);
    }
    let path_and_query = match parts.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    parts.uri = Uri::builder()
        .path_and_query(path_and_query)
        .build()
        .map_err(|e| Error::InvalidRequest(format!("bad path: {e}")))?;
    parts.version = axum::http::Version::HTTP_11;
    let mut response = sender
        .send_request(Request::from_parts(parts, body))
        .await
        .map_err(|e| {
            Error::RunnerUnreachable(format!(
                "the sandbox's server on port {port} did not answer: {e}"
            ))
        })?;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client) = client_upgrade else {
            return Err(Error::RunnerUnreachable(
                "the sandbox's server switched protocols unasked".into(),
            ));
        };
        let server = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            match server.await {
                Ok(server) => splice(client, TokioIo::new(server), port),
                Err(e) => tracing::debug!(port, error = %e, "the server's upgrade failed"),
            }
        });
        let (parts, _) = response.into_parts();
        return Ok(Response::from_parts(parts, Body::empty()));
    }
    let (mut parts, body) = response.into_parts();
    crate::proxy::strip_connection_listed(&mut parts.headers);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_ports() {
        let get = Method::GET;
        assert_eq!(route(&get, "ports"), Some(Route::List));
        assert_eq!(route(&Method::POST, "ports"), Some(Route::Forward));
        assert_eq!(route(&Method::PUT, "ports"), Some(Route::WrongMethod));
        assert_eq!(
            route(&Method::DELETE, "ports/8080"),
            Some(Route::Remove("8080".into()))
        );
        assert_eq!(
            route(&get, "ports/8080/tunnel"),
            Some(Route::Tunnel("8080".into()))
        );
        assert_eq!(route(&get, "ports/8080/x"), None);
        assert_eq!(
            route(&Method::POST, "preview/3000/api/x"),
            Some(Route::Preview {
                port: "3000".into(),
                path: "/api/x".into()
            })
        );
        assert_eq!(
            route(&get, "preview/3000/"),
            Some(Route::Preview {
                port: "3000".into(),
                path: "/".into()
            })
        );
        assert_eq!(
            route(&get, "preview/3000"),
            Some(Route::PreviewRoot("3000".into()))
        );
        assert_eq!(route(&get, "preview"), None);
        assert_eq!(route(&get, "files/x"), None);
        for bad in ["0", "65536", "-1", "+80", "", "80a", "999999"] {
            assert!(check_port(bad).is_err(), "{bad}");
        }
        assert_eq!(check_port("65535").ok(), Some(65_535));
    }

    #[test]
    fn preview_urls_follow_the_callers_host() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("cp.example:8080"));
        assert_eq!(
            preview_base(&h, "a"),
            "http://cp.example:8080/api/v1/sandboxes/a/preview/"
        );
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        h.insert("x-forwarded-host", HeaderValue::from_static("box.example"));
        assert_eq!(
            preview_base(&h, "a"),
            "https://box.example/api/v1/sandboxes/a/preview/"
        );
        assert_eq!(
            preview_base(&HeaderMap::new(), "a"),
            "/api/v1/sandboxes/a/preview/"
        );
    }

    #[test]
    fn held_connections_are_capped_per_sandbox_and_given_back() {
        let held = HeldPorts::default();
        let mut slots: Vec<HeldSlot> = (0..MAX_HELD_PER_SANDBOX)
            .map(|_| held.take("a").expect("under the cap"))
            .collect();
        assert!(held.take("a").is_none(), "past the cap");
        // Another sandbox has its own.
        let b = held.take("b").expect("b");
        drop(slots.pop());
        assert_eq!(held.count("a"), MAX_HELD_PER_SANDBOX - 1);
        slots.push(held.take("a").expect("a slot was given back"));
        assert!(held.take("a").is_none(), "at the cap again");
        drop(b);
        assert_eq!(held.count("b"), 0);
        drop(slots);
        assert!(
            held.0.lock().expect("lock").is_empty(),
            "entries at 0 are removed"
        );
    }
}
