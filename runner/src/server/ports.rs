//! Routes of forwarded ports: `/v1/ports...`. The table and the connections are
//! [`crate::ports`]; this module adds the HTTP/1.1 upgrade of the tunnel route.

use std::sync::Arc;

use agentbox_proto::{ErrorBody, ForwardedPort, PortList, PortRequest};
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use hyper_util::rt::TokioIo;

use super::read_json;
use crate::error::{Error, Result};
use crate::ports::parse_port;
use crate::AppState;

/// The protocol name of a tunnel's upgrade: raw TCP bytes after the 101.
pub(super) const TUNNEL_PROTOCOL: &str = "agentbox-tcp";
/// The protocol name of a handoff: after the 101 and one byte from the caller, the runner
/// sends the port's connection itself over the caller's unix socket (`SCM_RIGHTS`).
pub(super) const HANDOFF_PROTOCOL: &str = "agentbox-tcp-fd";
/// How long a handoff waits for the caller's byte after the 101.
const HANDOFF_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Each direction's copy buffer: large, for bulk downloads through the preview proxy.
const BUF: usize = 64 << 10;

/// The routes (authenticated by the caller's layer).
pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/ports", get(list_ports).post(forward_port))
        .route("/v1/ports/{port}", delete(remove_port))
        .route("/v1/ports/{port}/tunnel", get(open_tunnel))
}

/// List forwarded ports
#[utoipa::path(get, path = "/v1/ports", tag = "ports",
    responses(
        (status = 200, description = "The forwarded ports, by number.", body = PortList),
        (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody)))]
pub(super) async fn list_ports(State(app): State<Arc<AppState>>) -> Json<PortList> {
    Json(PortList {
        ports: app.ports.list(),
    })
}

/// Forward a port
///
/// Adds the port to the table (kept in the state directory across runner restarts). Nothing
/// needs to listen yet; a tunnel to a port where nothing listens answers 502.
#[utoipa::path(post, path = "/v1/ports", tag = "ports",
    request_body(content = PortRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "Forwarded.", body = ForwardedPort),
        (status = 200, description = "Already forwarded (the protocol is updated).", body = ForwardedPort),
        (status = 400, description = "`invalid_port`: outside 1-65535; `invalid_request`: a bad body or a protocol other than `http` and `tcp`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody),
        (status = 409, description = "`too_many_ports`: 64 ports are forwarded already.", body = ErrorBody)))]
pub(super) async fn forward_port(State(app): State<Arc<AppState>>, body: Body) -> Result<Response> {
    let req: PortRequest = read_json(body, 4096).await?;
    let (port, fresh) = app.ports.add(req.port, req.protocol.as_deref())?;
    let status = if fresh {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(port)).into_response())
}

/// Stop forwarding a port
///
/// Tunnels already open stay until they end.
#[utoipa::path(delete, path = "/v1/ports/{port}", tag = "ports",
    params(("port" = u16, Path, description = "The port, 1-65535.")),
    responses(
        (status = 204, description = "No longer forwarded."),
        (status = 400, description = "`invalid_port`: outside 1-65535.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody),
        (status = 404, description = "`port_not_forwarded`.", body = ErrorBody)))]
pub(super) async fn remove_port(
    State(app): State<Arc<AppState>>,
    Path(port): Path<String>,
) -> Result<StatusCode> {
    app.ports.remove(parse_port(&port)?)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Open a tunnel to a forwarded port
///
/// An HTTP/1.1 upgrade (`Connection: upgrade`) to one of two protocols. The runner connects
/// to the port on 127.0.0.1 (then ::1) first and answers 101 only once it is connected.
/// - `Upgrade: agentbox-tcp`: after the 101 the connection carries the port's raw bytes both
///   ways until either side closes. At most 256 tunnels are open at once.
/// - `Upgrade: agentbox-tcp-fd` (only over the runner's unix socket, where the control plane
///   shares the host): after the 101 the caller sends one byte, and the runner answers with
///   one byte carrying the connected socket itself (`SCM_RIGHTS`), then closes. The caller
///   then talks to the port directly, with no copy through the runner.
#[utoipa::path(get, path = "/v1/ports/{port}/tunnel", tag = "ports",
    params(("port" = u16, Path, description = "The port, 1-65535.")),
    responses(
        (status = 101, description = "Connected: raw bytes follow (`agentbox-tcp`), or the socket is handed over (`agentbox-tcp-fd`)."),
        (status = 400, description = "`invalid_port`: outside 1-65535; `invalid_request`: no `Upgrade: agentbox-tcp` or `agentbox-tcp-fd`, or `agentbox-tcp-fd` over TCP.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody),
        (status = 404, description = "`port_not_forwarded`.", body = ErrorBody),
        (status = 502, description = "`port_unreachable`: nothing accepts connections on the port.", body = ErrorBody),
        (status = 503, description = "`too_many_tunnels`: 256 tunnels are open.", body = ErrorBody)))]
pub(super) async fn open_tunnel(
    State(app): State<Arc<AppState>>,
    Path(port): Path<String>,
    mut request: Request,
) -> Result<Response> {
    let port = parse_port(&port)?;
    let asked = request
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let protocol = if asked.eq_ignore_ascii_case(TUNNEL_PROTOCOL) {
        TUNNEL_PROTOCOL
    } else if asked.eq_ignore_ascii_case(HANDOFF_PROTOCOL) {
        HANDOFF_PROTOCOL
    } else {
        return Err(Error::InvalidRequest(format!(
            "a tunnel is an HTTP/1.1 upgrade: send Connection: upgrade and Upgrade: {TUNNEL_PROTOCOL}"
        )));
    };
    let unix = request
        .extensions()
        .get::<agentbox_serve::UnixConnFd>()
        .copied();
    let handoff = match (protocol, unix) {
        (HANDOFF_PROTOCOL, Some(conn)) => Some(conn),
        (HANDOFF_PROTOCOL, None) => {
            return Err(Error::InvalidRequest(format!(
                "{HANDOFF_PROTOCOL} passes a socket over a unix socket connection: over TCP, use {TUNNEL_PROTOCOL}"
            )))
        }
        _ => None,
    };
    let Some(on_upgrade) = request
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>()
    else {
        return Err(Error::InvalidRequest(
            "this connection cannot be upgraded (HTTP/2?): use HTTP/1.1".into(),
        ));
    };
    let tunnel = app.ports.connect(port).await?;
    tokio::spawn(async move {
        let crate::ports::Tunnel { mut stream, permit } = tunnel;
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(port, error = %e, "a tunnel's upgrade failed");
                return;
            }
        };
        match handoff {
            Some(conn) => {
                if let Err(e) = hand_over(conn, upgraded, &stream).await {
                    tracing::debug!(port, error = %e, "a handoff failed");
                }
            }
            None => {
                let mut upgraded = TokioIo::new(upgraded);
                if let Err(e) =
                    tokio::io::copy_bidirectional_with_sizes(&mut upgraded, &mut stream, BUF, BUF)
                        .await
                {
                    tracing::debug!(port, error = %e, "a tunnel ended with an error");
                }
            }
        }
        drop(permit);
    });
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static(protocol));
    Ok(response)
}

/// Waits for the caller's byte (it has stopped reading HTTP: the descriptor's byte cannot be
/// read by its HTTP client and lost), then sends `stream`'s socket over the connection.
async fn hand_over(
    conn: agentbox_serve::UnixConnFd,
    upgraded: hyper::upgrade::Upgraded,
    stream: &tokio::net::TcpStream,
) -> std::io::Result<()> {
    use std::os::fd::AsFd;
    use tokio::io::AsyncReadExt;
    let mut upgraded = TokioIo::new(upgraded);
    let mut ready = [0u8; 1];
    tokio::time::timeout(HANDOFF_WAIT, upgraded.read_exact(&mut ready))
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "no byte from the caller")
        })??;
    crate::listen::send_fd(conn, upgraded.inner_mut(), stream.as_fd()).await
}
