//! The terminal WebSocket through the control plane: `GET /api/v1/sandboxes/{id}/terminal`
//! (and the seed's `/ws/terminal/{id}`), authenticated by the usual credentials or by a
//! short-lived single-use ticket (`?ticket=`, minted by the authenticated
//! `POST /api/v1/sandboxes/{id}/terminal/ticket`: browsers cannot set headers on a WebSocket).
//! The upgrade is passed to the runner over an HTTP/1.1 connection of its own (the proxy's
//! pooled HTTP/2 connections carry no upgrades) and the two upgraded streams are spliced.
//!
//! A ticket is `<payload>.<mac>` (base64url): the payload names the sandbox, its namespace,
//! the caller, an expiry and a random nonce; the MAC is HMAC-SHA256 under a key kept in the
//! state directory (`terminal-ticket.key`, 32 random bytes, 0600, made by the first replica
//! that needs it), so any replica sharing the state directory verifies any ticket. Single use
//! across replicas: the first use creates `<state>/terminal-tickets/<nonce>` with `O_EXCL`;
//! a second use finds it and is refused. Markers older than twice the lifetime are swept when
//! tickets are minted.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentbox_proto::ErrorBody;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::Engine;
use hmac::{Hmac, Mac};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::auth::Identity;
use crate::error::{Error, Result};
use crate::AppState;

/// How long a ticket is valid.
pub const TICKET_TTL: Duration = Duration::from_secs(30);
const KEY_FILE: &str = "terminal-ticket.key";
const USED_DIR: &str = "terminal-tickets";

/// `POST .../terminal/ticket` answer.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Ticket {
    /// Pass as `?ticket=` on the terminal WebSocket, once, within `expiresInMs`.
    pub ticket: String,
    /// Milliseconds left.
    pub expires_in_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    /// Sandbox name.
    s: String,
    /// Its namespace.
    ns: String,
    /// The caller (for the audit record).
    sub: String,
    /// Expiry, ms since the epoch.
    exp: u64,
    /// Random, names the used-marker.
    n: String,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The ticket key: read, or created (exclusively; a replica that loses the race reads the
/// winner's).
fn key(state_dir: &FsPath) -> Result<Vec<u8>> {
    let path = state_dir.join(KEY_FILE);
    for _ in 0..50 {
        match std::fs::read(&path) {
            Ok(bytes) if bytes.len() == 32 => return Ok(bytes),
            Ok(_) => std::thread::sleep(Duration::from_millis(2)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = [0u8; 32];
                getrandom::fill(&mut bytes)
                    .map_err(|e| Error::Internal(format!("no randomness: {e}")))?;
                let tmp = state_dir.join(format!("{KEY_FILE}.{}", hex::encode(&bytes[..6])));
                let written = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)
                    .and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_all()));
                if let Err(e) = written {
                    return Err(Error::Internal(format!("cannot write the ticket key: {e}")));
                }
                // A hard link is exclusive: the first replica's key wins.
                let _ = std::fs::hard_link(&tmp, &path);
                let _ = std::fs::remove_file(&tmp);
            }
            Err(e) => return Err(Error::Internal(format!("cannot read the ticket key: {e}"))),
        }
    }
    Err(Error::Internal("the ticket key is unreadable".into()))
}

fn mac(key: &[u8], payload: &[u8]) -> Result<Hmac<Sha256>> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key)
        .map_err(|e| Error::Internal(format!("bad ticket key: {e}")))?;
    mac.update(b"agentbox terminal ticket v1\0");
    mac.update(payload);
    Ok(mac)
}

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

fn mint(state_dir: &FsPath, claims: &Claims) -> Result<String> {
    let payload = serde_json::to_vec(claims).map_err(|e| Error::Internal(e.to_string()))?;
    let tag = mac(&key(state_dir)?, &payload)?.finalize().into_bytes();
    Ok(format!("{}.{}", B64.encode(&payload), B64.encode(tag)))
}

/// Checks a ticket for `sandbox` and uses it up; the claims.
fn redeem(state_dir: &FsPath, ticket: &str, sandbox: &str) -> Result<Claims> {
    let bad = |why: &str| Error::Unauthorized(format!("invalid terminal ticket: {why}"));
    let (payload, tag) = ticket.split_once('.').ok_or_else(|| bad("malformed"))?;
    let payload = B64.decode(payload).map_err(|_| bad("malformed"))?;
    let tag = B64.decode(tag).map_err(|_| bad("malformed"))?;
    // Constant-time comparison (hmac's verify).
    mac(&key(state_dir)?, &payload)?
        .verify_slice(&tag)
        .map_err(|_| bad("not signed by this control plane"))?;
    let claims: Claims = serde_json::from_slice(&payload).map_err(|_| bad("malformed"))?;
    if claims.exp <= now_ms() {
        return Err(bad("expired"));
    }
    if claims.s != sandbox {
        return Err(bad("minted for another sandbox"));
    }
    if claims.n.len() != 32 || !claims.n.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad("malformed"));
    }
    let dir = state_dir.join(USED_DIR);
    std::fs::create_dir_all(&dir).map_err(|e| Error::Internal(e.to_string()))?;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dir.join(&claims.n))
    {
        Ok(_) => Ok(claims),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(bad("already used")),
        Err(e) => Err(Error::Internal(format!(
            "cannot record a ticket's use: {e}"
        ))),
    }
}

/// Removes used-markers past twice the ticket lifetime (their tickets are expired anyway).
fn sweep(state_dir: &FsPath) {
    let Ok(entries) = std::fs::read_dir(state_dir.join(USED_DIR)) else {
        return;
    };
    let cutoff = SystemTime::now() - TICKET_TTL * 2;
    for entry in entries.flatten() {
        if entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t < cutoff)
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Mint a terminal ticket
///
/// A short-lived (30 s), single-use ticket for `GET /api/v1/sandboxes/{id}/terminal?ticket=`
/// (or `/ws/terminal/{id}?ticket=`), for clients that cannot set headers on a WebSocket.
#[utoipa::path(post, path = "/api/v1/sandboxes/{id}/terminal/ticket", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox name.")),
    responses((status = 200, description = "The ticket.", body = Ticket),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`.", body = ErrorBody)))]
pub async fn mint_ticket(
    State(app): State<Arc<AppState>>,
    Extension(id): Extension<Identity>,
    Path(name): Path<String>,
    uri: axum::http::Uri,
) -> Result<Json<Ticket>> {
    let namespace = crate::api::namespace_param(uri.query());
    let found = crate::api::locate(&app, &id, &name, namespace.as_deref()).await?;
    let mut nonce = [0u8; 16];
    getrandom::fill(&mut nonce).map_err(|e| Error::Internal(format!("no randomness: {e}")))?;
    let claims = Claims {
        s: found.name,
        ns: found.target.namespace,
        sub: id.sub.clone(),
        exp: now_ms() + TICKET_TTL.as_millis() as u64,
        n: hex::encode(nonce),
    };
    let state_dir = app.cfg.state_dir.clone();
    let ticket = tokio::task::spawn_blocking(move || {
        sweep(&state_dir);
        mint(&state_dir, &claims)
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))??;
    Ok(Json(Ticket {
        ticket,
        expires_in_ms: TICKET_TTL.as_millis() as u64,
    }))
}

/// Open a terminal (WebSocket)
///
/// Upgrades to the runner's terminal WebSocket (`/v1/terminal`, query passed through: `cols`,
/// `rows`, `argv`, `cwd`, `process`, `after`; frames in docs/http-api.md). Credentials as
/// for every route, or `?ticket=` from `POST .../terminal/ticket`; without valid ones, 401
/// before the upgrade.
#[utoipa::path(get, path = "/api/v1/sandboxes/{id}/terminal", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox name."),
        ("ticket" = Option<String>, Query, description = "A ticket from `POST .../terminal/ticket`, instead of headers.")),
    responses((status = 101, description = "Switching to the WebSocket protocol."),
        (status = 400, description = "`invalid_request`: not a WebSocket upgrade; the runner's 400s.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no valid credentials or ticket (expired, used, for another sandbox).", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`; the runner's `process_not_found`.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running` (a sandbox stopped for idleness is woken first, as for any use); the runner's `process_exited`.", body = ErrorBody),
        (status = 502, description = "`runner_unreachable`.", body = ErrorBody)))]
pub async fn open_terminal(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
    request: Request,
) -> Response {
    let started = std::time::Instant::now();
    // The sandbox found (its name and namespace), for the audit record.
    let mut found = (name.split('.').next().unwrap_or_default().to_owned(), None);
    match terminal(&app, &name, request, &mut found).await {
        Ok((response, sub)) => {
            record(&app, &sub, &found, 101, started);
            response
        }
        Err((e, sub)) => {
            if e.status() == StatusCode::UNAUTHORIZED {
                app.audit.denied(401);
            } else {
                record(&app, &sub, &found, e.status().as_u16(), started);
            }
            e.into_response()
        }
    }
}

fn record(
    app: &AppState,
    sub: &str,
    (name, namespace): &(String, Option<String>),
    status: u16,
    started: std::time::Instant,
) {
    app.audit.write(&crate::audit::Record {
        time: crate::api::now(),
        actor: sub,
        action: "terminal",
        sandbox: Some(name),
        namespace: namespace.as_deref(),
        outcome: if status == 101 { "ok" } else { "error" },
        status,
        duration_ms: Some(started.elapsed().as_millis() as u64),
        ..Default::default()
    });
}

type Failed = (Error, String);

/// The query without `ticket` and `namespace` (the runner never sees them).
fn runner_query(query: Option<&str>) -> String {
    let kept: Vec<&str> = query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("ticket=") && !p.starts_with("namespace="))
        .collect();
    if kept.is_empty() {
        String::new()
    } else {
        format!("?{}", kept.join("&"))
    }
}

fn ticket_of(query: Option<&str>) -> Option<String> {
    query?
        .split('&')
        .find_map(|p| p.strip_prefix("ticket="))
        .map(str::to_owned)
}

async fn terminal(
    app: &Arc<AppState>,
    name: &str,
    mut request: Request,
    found: &mut (String, Option<String>),
) -> std::result::Result<(Response, String), Failed> {
    let headers = request.headers();
    let has_credentials =
        headers.contains_key(header::AUTHORIZATION) || headers.contains_key("x-api-key");
    let query = request.uri().query().map(str::to_owned);
    // Who: credentials as on every route, else a ticket (good for its sandbox's namespace).
    let (identity, namespace) = if has_credentials || ticket_of(query.as_deref()).is_none() {
        let identity = app
            .auth
            .authenticate(headers)
            .await
            .map_err(|e| (e, String::new()))?;
        (identity, crate::api::namespace_param(query.as_deref()))
    } else {
        let ticket = ticket_of(query.as_deref()).unwrap_or_default();
        let state_dir = app.cfg.state_dir.clone();
        // The id is the name, or `name.namespace`.
        let sandbox = name.split('.').next().unwrap_or_default().to_owned();
        let claims = tokio::task::spawn_blocking(move || redeem(&state_dir, &ticket, &sandbox))
            .await
            .map_err(|e| (Error::Internal(e.to_string()), String::new()))?
            .map_err(|e| (e, String::new()))?;
        let identity = Identity {
            sub: claims.sub,
            name: None,
            email: None,
            groups: Vec::new(),
            namespaces: Some(vec![claims.ns.clone()]),
            admin: false,
        };
        (identity, Some(claims.ns))
    };
    let sub = identity.sub.clone();
    let fail = |e: Error| (e, sub.clone());
    let is_upgrade = request
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !is_upgrade {
        return Err(fail(Error::InvalidRequest(
            "the terminal is a WebSocket: send an upgrade request".into(),
        )));
    }
    let located = crate::api::locate(app, &identity, name, namespace.as_deref())
        .await
        .map_err(fail)?;
    *found = (located.name.clone(), Some(located.target.namespace.clone()));
    // A sandbox that only slept is woken for its terminal, as for any other use.
    let target = crate::lifecycle::running(app, &located.key, &located.name, located.target)
        .await
        .map_err(fail)?;
    // An HTTP/1.1 connection of its own to the runner, and the upgrade request on it.
    let mut headers = HeaderMap::new();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    for name in [
        header::SEC_WEBSOCKET_KEY,
        header::SEC_WEBSOCKET_VERSION,
        header::SEC_WEBSOCKET_PROTOCOL,
    ] {
        if let Some(v) = request.headers().get(&name) {
            headers.insert(name, v.clone());
        }
    }
    let path = format!("/v1/terminal{}", runner_query(query.as_deref()));
    let (switched, mut runner) =
        match crate::upgrade::open(app.proxy.connector(), &target, &path, headers)
            .await
            .map_err(fail)?
        {
            // The runner's JSON error (404 process_not_found, 409 process_exited, ...) as it is.
            crate::upgrade::Upgrade::Refused(response) => return Ok((response, sub)),
            crate::upgrade::Upgrade::Switched(headers, io) => (headers, io),
        };
    let caller_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(caller) = caller_upgrade.await else {
            return;
        };
        let mut caller = TokioIo::new(caller);
        let _ = tokio::io::copy_bidirectional(&mut caller, &mut runner).await;
    });
    let mut answer = Response::new(Body::empty());
    *answer.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    for (name, value) in &switched {
        if [
            header::CONNECTION,
            header::UPGRADE,
            header::SEC_WEBSOCKET_ACCEPT,
            header::SEC_WEBSOCKET_PROTOCOL,
        ]
        .contains(name)
        {
            answer.headers_mut().insert(name.clone(), value.clone());
        }
    }
    Ok((answer, sub))
}

/// `PathBuf` of the ticket key, for tests and docs.
pub fn key_path(state_dir: &FsPath) -> PathBuf {
    state_dir.join(KEY_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: u64) -> Claims {
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).unwrap_or_default();
        Claims {
            s: "box".into(),
            ns: "default".into(),
            sub: "k".into(),
            exp,
            n: hex::encode(nonce),
        }
    }

    #[test]
    fn a_ticket_works_once_for_its_sandbox_until_it_expires() {
        let dir = tempfile::tempdir().expect("dir");
        let t = mint(dir.path(), &claims(now_ms() + 10_000)).expect("mint");
        assert!(redeem(dir.path(), &t, "other").is_err(), "another sandbox");
        assert!(redeem(dir.path(), &t, "box").is_ok());
        assert!(redeem(dir.path(), &t, "box").is_err(), "used");
        let old = mint(dir.path(), &claims(now_ms() - 1)).expect("mint");
        assert!(redeem(dir.path(), &old, "box").is_err(), "expired");
        // A forged one (payload changed, MAC kept).
        let t = mint(dir.path(), &claims(now_ms() + 10_000)).expect("mint");
        let (_, tag) = t.split_once('.').expect("dot");
        let forged = format!(
            "{}.{tag}",
            B64.encode(serde_json::to_vec(&claims(now_ms() + 10_000)).expect("json"))
        );
        assert!(redeem(dir.path(), &forged, "box").is_err(), "forged");
        assert_eq!(
            std::fs::metadata(key_path(dir.path())).expect("key").len(),
            32
        );
    }
}
