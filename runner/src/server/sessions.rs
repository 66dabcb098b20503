//! Routes of sessions and permission replies: `/v1/sessions...` and
//! `/v1/invokes/{id}/permissions/{pid}`. The domain is in [`crate::session`] and
//! [`crate::channel`].

use std::sync::Arc;

use agentbox_proto::{
    session_event, CreateSessionRequest, ErrorBody, PermissionReplyRequest,
    PermissionReplyResponse, PromptEvent, Sender, SessionConfigRequest, SessionEvent,
    SessionEventPage, SessionInfo, SessionList,
};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::{query, read_json, sse_response};
use crate::acp::{Launch, Turn};
use crate::channel::AgentSetup;
use crate::error::{Error, Result};
use crate::session::Session;
use crate::sse;
use crate::state::Stored;
use crate::AppState;

/// Default and largest page size.
const PAGE: u64 = 100;
const MAX_PAGE: u64 = 1000;

/// The routes (authenticated by the caller's layer).
pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/sessions", post(create).get(list))
        .route("/v1/sessions/{id}", get(get_one).delete(delete))
        .route("/v1/sessions/{id}/events", get(events))
        .route("/v1/sessions/{id}/config", axum::routing::put(set_config))
        .route(
            "/v1/sessions/{id}/permissions/{pid}",
            post(reply_in_session),
        )
        .route("/v1/invokes/{id}/permissions/{pid}", post(reply_in_invoke))
}

/// The agent channel of an invoke, in session `session` when one is named: claims the session
/// (409 while another invoke runs in it) and records the prompt in its history.
pub(super) fn agent_setup(
    app: &AppState,
    session: Option<&str>,
    prompt: Option<&str>,
) -> Result<AgentSetup> {
    let claim = match session {
        None => None,
        Some(id) => {
            let claim = app.sessions.get(id)?.claim()?;
            if let Some(text) = prompt {
                let data = serde_json::to_value(PromptEvent {
                    text: text.to_owned(),
                    content: None,
                })
                .unwrap_or_default();
                claim
                    .session()
                    .record(Sender::Client, None, session_event::PROMPT, data);
            }
            Some(claim)
        }
    };
    Ok(AgentSetup {
        permissions: Arc::clone(&app.permissions),
        session: claim,
    })
}

/// The agent an invoke in session `session` (or outside any) runs: the session's, or the
/// default one. 424 `not_configured` before any configure; 424 `agent_failed` when the
/// session's agent is no longer configured.
pub(super) fn agent_of(
    app: &AppState,
    stored: &Stored,
    session: Option<&str>,
) -> Result<crate::state::Agent> {
    let name = match session {
        Some(id) => app.sessions.get(id)?.agent(),
        None => None,
    };
    match (stored.agent(name.as_deref()), name) {
        (Some(agent), _) => Ok(agent),
        (None, Some(name)) => Err(Error::AgentFailed(format!(
            "the session's agent {name:?} is not configured (any more); configure it or \
             create a session with another agent"
        ))),
        (None, None) => Err(Error::NotConfigured),
    }
}

/// A session's working directory: `cwd` resolved in the jail, an existing directory (400
/// `invalid_path` / `not_a_directory` otherwise).
pub(super) fn session_cwd(app: &AppState, cwd: &str) -> Result<std::path::PathBuf> {
    let real = app.jail.resolve(cwd)?;
    if !real.is_dir() {
        let rel = real.strip_prefix(app.jail.root()).unwrap_or(&real);
        return Err(Error::NotADirectory(crate::jail::Jail::shown(rel)));
    }
    Ok(real)
}

/// The ACP session's `cwd` for session `session`: its `cwd`, or the workspace.
pub(super) fn cwd_of(app: &AppState, session: Option<&Arc<Session>>) -> Result<std::path::PathBuf> {
    match session.and_then(|s| s.cwd()) {
        Some(cwd) => session_cwd(app, &cwd),
        None => Ok(app.cfg.workspace.clone()),
    }
}

fn launch(
    app: &AppState,
    stored: &Stored,
    agent: &crate::state::Agent,
    session_cwd: std::path::PathBuf,
) -> Launch {
    let mut full = app.cfg.child_env();
    full.extend(agent.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    full.push((
        "AGENTBOX_WORKSPACE".into(),
        app.cfg.workspace.display().to_string(),
    ));
    Launch {
        agent: agent.name.clone(),
        install_hash: stored.install_command_hash.clone(),
        argv: app.jail.map_argv(&agent.entrypoint),
        env: full,
        cwd: app.cfg.workspace.clone(),
        session_cwd,
        mcp_servers: agent.mcp_servers.clone(),
    }
}

/// The prompt turn of an invoke of an ACP agent: `?prompt=`, or else the body, is the prompt.
pub(super) async fn acp_turn(
    app: &Arc<AppState>,
    stored: &Stored,
    chosen: &crate::state::Agent,
    agent: AgentSetup,
    prompt: Option<String>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Turn> {
    let Some(session) = agent.session.as_ref().map(|c| Arc::clone(c.session())) else {
        return Err(Error::InvalidRequest(
            "the entrypoint is an ACP agent, which runs in a session: \
             pass ?session=ID (create one with POST /v1/sessions)"
                .into(),
        ));
    };
    let launch = launch(app, stored, chosen, cwd_of(app, Some(&session))?);
    let json_body = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.trim_start().starts_with("application/json"));
    let blocks = match prompt {
        // Recorded in the history by `agent_setup`.
        Some(text) => vec![json!({"type": "text", "text": text})],
        None => {
            let bytes = read_prompt(body, 16 << 20).await?;
            let parsed = json_body
                .then(|| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
                .flatten()
                .filter(|v| v.get("prompt").is_some());
            let (text, content) = match parsed {
                Some(body) => {
                    let blocks = content_blocks(&body["prompt"])?;
                    // What the agent must have advertised for these blocks.
                    let needs: Vec<(&str, &str)> = blocks
                        .iter()
                        .filter_map(|b| match b["type"].as_str() {
                            Some("image") => Some(("image", "image")),
                            Some("audio") => Some(("audio", "audio")),
                            Some("resource") => Some(("resource", "embeddedContext")),
                            _ => None,
                        })
                        .collect();
                    if !needs.is_empty() {
                        let caps = app
                            .acp
                            .prompt_capabilities(&session, &launch, &app.reaper)
                            .await?;
                        if let Some((kind, cap)) = needs
                            .into_iter()
                            .find(|(_, cap)| caps.get(*cap).and_then(|v| v.as_bool()) != Some(true))
                        {
                            return Err(Error::InvalidRequest(format!(
                                "the agent {:?} does not accept {kind} blocks (its \
                                 promptCapabilities.{cap} is not true); send text, \
                                 resource_link or what it advertises (GET /v1/agents)",
                                launch.agent
                            )));
                        }
                    }
                    let text: Vec<&str> = blocks
                        .iter()
                        .filter_map(|b| b.get("text").and_then(|t| t.as_str()))
                        .collect();
                    (text.join("\n"), Some(blocks))
                }
                None => {
                    let text = String::from_utf8(bytes).map_err(|_| {
                        Error::InvalidRequest("an ACP prompt must be UTF-8 text".into())
                    })?;
                    (text, None)
                }
            };
            let data = serde_json::to_value(PromptEvent {
                text: text.clone(),
                content: content.clone(),
            })
            .unwrap_or_default();
            session.record(Sender::Client, None, session_event::PROMPT, data);
            content.unwrap_or_else(|| vec![json!({"type": "text", "text": text})])
        }
    };
    Ok(Turn {
        agents: Arc::clone(&app.acp),
        reaper: Arc::clone(&app.reaper),
        session,
        setup: agent,
        launch,
        prompt: blocks,
        grace: app.cfg.grace,
        runtime: tokio::runtime::Handle::current(),
    })
}

/// Checks the content blocks of a `{"prompt": [...]}` body (ACP's `ContentBlock`s: `text`,
/// `image`, `audio`, `resource`, `resource_link`, at most 1000).
fn content_blocks(prompt: &serde_json::Value) -> Result<Vec<serde_json::Value>> {
    let bad = |i: usize, what: &str| {
        Error::InvalidRequest(format!("prompt[{i}]: {what} (ACP content blocks: text {{text}}, image {{data, mimeType}}, audio {{data, mimeType}}, resource {{resource: {{uri, text | blob}}}}, resource_link {{uri, name}})"))
    };
    let Some(blocks) = prompt
        .as_array()
        .filter(|b| !b.is_empty() && b.len() <= 1000)
    else {
        return Err(Error::InvalidRequest(
            "\"prompt\" must be an array of 1 to 1000 content blocks".into(),
        ));
    };
    let is_str = |b: &serde_json::Value, k: &str| b.get(k).is_some_and(|v| v.is_string());
    for (i, b) in blocks.iter().enumerate() {
        let ok = match b.get("type").and_then(|t| t.as_str()) {
            Some("text") => is_str(b, "text"),
            Some("image" | "audio") => is_str(b, "data") && is_str(b, "mimeType"),
            Some("resource") => b
                .get("resource")
                .is_some_and(|r| is_str(r, "uri") && (is_str(r, "text") || is_str(r, "blob"))),
            Some("resource_link") => is_str(b, "uri") && is_str(b, "name"),
            Some(other) => return Err(bad(i, &format!("unknown type {other:?}"))),
            None => return Err(bad(i, "no \"type\"")),
        };
        if !ok {
            return Err(bad(i, "a required field is missing or not a string"));
        }
    }
    Ok(blocks.clone())
}

/// The body, up to `limit` bytes (else 413 `payload_too_large`).
async fn read_prompt(body: Body, limit: usize) -> Result<Vec<u8>> {
    use futures_util::StreamExt;
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| Error::InvalidRequest(format!("cannot read the prompt: {e}")))?;
        if bytes.len() + chunk.len() > limit {
            // Read (a bounded amount of) the rest, so the client gets the 413.
            crate::files::drain(&mut stream).await;
            return Err(Error::PayloadTooLarge(format!(
                "an ACP prompt is larger than {limit} bytes"
            )));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// Set an ACP agent's session config
///
/// Mode, model, thought level and config options the agent advertised; starts the session's
/// agent if needed, and answers the session with its fresh ACP state.
#[utoipa::path(put, path = "/v1/sessions/{id}/config", tag = "sessions",
    params(("id" = String, Path, description = "The session id: 1 to 128 of `A-Z a-z 0-9 . _ -`, not starting with `.` or `-`.")),
    request_body(content = SessionConfigRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The session with its ACP state after the changes (`acp`).", body = SessionInfo),
        (status = 400, description = "`invalid_session_id`; `invalid_request`: not an ACP agent, a bad body, a setting the agent does not offer, or one it refused.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody),
        (status = 404, description = "`session_not_found`.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is over 1 MiB.", body = ErrorBody),
        (status = 424, description = "`agent_failed`: the configured ACP agent could not be started or initialized.", body = ErrorBody)))]
pub(super) async fn set_config(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Body,
) -> Result<Json<SessionInfo>> {
    let req: agentbox_proto::SessionConfigRequest = read_json(body, 1 << 20).await?;
    let session = app.sessions.get(&id)?;
    let stored = app.store.get();
    let chosen = agent_of(&app, &stored, Some(&id))?;
    if chosen.protocol != agentbox_proto::AgentProtocol::Acp {
        return Err(Error::InvalidRequest(
            "only an ACP agent (configure with \"protocol\": \"acp\") has session config".into(),
        ));
    }
    let launch = launch(&app, &stored, &chosen, cwd_of(&app, Some(&session))?);
    Ok(Json(
        app.acp
            .configure(&session, &launch, &app.reaper, req)
            .await?,
    ))
}

/// Create a session
///
/// The runner picks an id (`ses-…`) when none is given.
#[utoipa::path(post, path = "/v1/sessions", tag = "sessions",
    request_body(content = CreateSessionRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "Created.", body = SessionInfo),
        (status = 400, description = "`invalid_session_id`; `invalid_request`: a bad body, an `agent` that is not configured, or `mcpServers` that are not ACP `McpServer`s; `invalid_path`, `not_a_directory`: a `cwd` outside the workspace or not a directory.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody),
        (status = 409, description = "`session_exists`: the id is taken, or a directory of that name exists that did not load as a session (it is kept as it is).", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is over 1 MiB.", body = ErrorBody)))]
pub(super) async fn create(State(app): State<Arc<AppState>>, body: Body) -> Result<Response> {
    // An object, not merely something serde can read as the struct (`[null, null]` is one).
    let req: serde_json::Value = read_json(body, 1 << 20).await?;
    if !req.is_object() {
        return Err(Error::InvalidRequest(
            "the body must be a JSON object: {\"id\"?, \"metadata\"?, \"agent\"?, \"mcpServers\"?, \"cwd\"?}".into(),
        ));
    }
    let req: CreateSessionRequest = serde_json::from_value(req).map_err(|e| {
        Error::InvalidRequest(format!("the body is not valid JSON for this route: {e}"))
    })?;
    if let Some(name) = &req.agent {
        let stored = app.store.get();
        if stored.agent(Some(name)).is_none() {
            let names: Vec<String> = stored.agents().into_iter().map(|a| a.name).collect();
            return Err(Error::InvalidRequest(format!(
                "no agent {name:?} is configured (the agents are {names:?}; GET /v1/agents)"
            )));
        }
    }
    let mcp_servers = req.mcp_servers.unwrap_or_default();
    agentbox_proto::check_mcp_servers(&mcp_servers).map_err(Error::InvalidRequest)?;
    if let Some(cwd) = &req.cwd {
        session_cwd(&app, cwd)?;
    }
    let session = app
        .sessions
        .create(req.id, req.metadata, req.agent, mcp_servers, req.cwd)?;
    let (sessions, keep) = (Arc::clone(&app.sessions), session.id());
    tokio::task::spawn_blocking(move || sessions.prune(Some(&keep)))
        .await
        .map_err(|e| Error::Internal(e.to_string()))?;
    Ok((StatusCode::CREATED, Json(session.info())).into_response())
}

#[derive(Debug, Deserialize)]
struct PageQuery {
    offset: Option<u64>,
    limit: Option<u64>,
}

fn page_of(uri: &Uri) -> Result<(u64, u64)> {
    let q: PageQuery = query(uri)?;
    let limit = q.limit.unwrap_or(PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(Error::InvalidRequest(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    Ok((q.offset.unwrap_or(0), limit))
}

/// Sessions, oldest first, a page at a time
#[utoipa::path(get, path = "/v1/sessions", tag = "sessions",
    params(("offset" = Option<u64>, Query, description = "Sessions to skip."),
        ("limit" = Option<u64>, Query, description = "Page size, 1 to 1000 (default 100).")),
    responses(
        (status = 200, description = "One page.", body = SessionList),
        (status = 400, description = "`invalid_request`: a bad `offset` or `limit`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody)))]
pub(super) async fn list(State(app): State<Arc<AppState>>, uri: Uri) -> Result<Json<SessionList>> {
    let (offset, limit) = page_of(&uri)?;
    let all = app.sessions.list();
    let items: Vec<SessionInfo> = all
        .iter()
        .skip(offset.min(usize::MAX as u64) as usize)
        .take(limit as usize)
        .map(|s| s.info())
        .collect();
    let next = offset + items.len() as u64;
    Ok(Json(SessionList {
        items,
        next_offset: ((next as usize) < all.len()).then_some(next),
    }))
}

/// One session
#[utoipa::path(get, path = "/v1/sessions/{id}", tag = "sessions",
    params(("id" = String, Path, description = "The session id: 1 to 128 of `A-Z a-z 0-9 . _ -`, not starting with `.` or `-`.")),
    responses(
        (status = 200, description = "The session.", body = SessionInfo),
        (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody),
        (status = 400, description = "`invalid_session_id`.", body = ErrorBody),
        (status = 404, description = "`session_not_found`.", body = ErrorBody)))]
pub(super) async fn get_one(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<SessionInfo>> {
    Ok(Json(app.sessions.get(&id)?.info()))
}

/// Delete a session, its history and its directory
#[utoipa::path(delete, path = "/v1/sessions/{id}", tag = "sessions",
    params(("id" = String, Path, description = "The session id: 1 to 128 of `A-Z a-z 0-9 . _ -`, not starting with `.` or `-`.")),
    responses(
        (status = 204, description = "Deleted."),
        (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody),
        (status = 400, description = "`invalid_session_id`.", body = ErrorBody),
        (status = 404, description = "`session_not_found`.", body = ErrorBody),
        (status = 409, description = "`session_busy`: an invoke runs in it.", body = ErrorBody)))]
pub(super) async fn delete(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    app.sessions.delete(&id)?;
    app.acp.stop(&id).await;
    Ok(StatusCode::NO_CONTENT)
}

/// A session's history
///
/// A JSON page of events after `offset` by default; with `Accept: text/event-stream`, the
/// events after `Last-Event-ID` (or `offset`), then live ones, as Server-Sent Events.
#[utoipa::path(get, path = "/v1/sessions/{id}/events", tag = "sessions",
    params(("id" = String, Path, description = "The session id: 1 to 128 of `A-Z a-z 0-9 . _ -`, not starting with `.` or `-`."),
        ("offset" = Option<u64>, Query, description = "Events with `eventIndex` greater than this."),
        ("limit" = Option<u64>, Query, description = "Page size, 1 to 1000 (default 100)."),
        ("Last-Event-ID" = Option<String>, Header, description = "For the event stream: resume after this `eventIndex`.")),
    responses(
        (status = 200, description = "A page of the history, or the history as Server-Sent Events.",
            content((SessionEventPage = "application/json"), (String = "text/event-stream"))),
        (status = 400, description = "`invalid_session_id`; `invalid_request`: a bad `offset`, `limit` or `Last-Event-ID`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody),
        (status = 404, description = "`session_not_found`.", body = ErrorBody)))]
pub(super) async fn events(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response> {
    let (offset, limit) = page_of(&uri)?;
    let session = app.sessions.get(&id)?;
    let wants_sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"));
    let after = match headers.get("last-event-id") {
        Some(v) if wants_sse => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| Error::InvalidRequest("Last-Event-ID must be an event id".into()))?,
        _ => offset,
    };
    let opened = Arc::clone(&session);
    let (log, mut sub) = tokio::task::spawn_blocking(move || {
        let log = opened.log()?;
        let sub = log.subscribe(after)?;
        Ok::<_, std::io::Error>((log, sub))
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))??;
    if wants_sse {
        return Ok(sse_response(sub, None, app.cfg.keepalive));
    }
    let end = log.progress().end;
    let mut items: Vec<SessionEvent> = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    while sub.position() < end && items.len() as u64 <= limit {
        let Some(chunk) = sub.next().await else {
            break;
        };
        pending.extend_from_slice(&chunk?);
        let (frames, used) = sse::parse_frames(&pending);
        for frame in frames {
            match serde_json::from_str::<SessionEvent>(frame.data) {
                Ok(event) => items.push(event),
                Err(e) => {
                    tracing::warn!(session = %id, error = %e, "skipping a damaged history event")
                }
            }
        }
        pending.drain(..used);
    }
    let has_more = items.len() as u64 > limit;
    items.truncate(limit as usize);
    let next_offset = items.last().map_or(after, |e| e.event_index);
    Ok(Json(SessionEventPage {
        items,
        next_offset,
        has_more,
    })
    .into_response())
}

/// Answer a permission request in a session
#[utoipa::path(post, path = "/v1/sessions/{id}/permissions/{pid}", tag = "sessions",
    params(("id" = String, Path, description = "The session id: 1 to 128 of `A-Z a-z 0-9 . _ -`, not starting with `.` or `-`."), ("pid" = String, Path, description = "The `permissionId` of the `permission` event.")),
    request_body(content = PermissionReplyRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The reply was written to the agent.", body = PermissionReplyResponse),
        (status = 400, description = "`invalid_session_id`; `invalid_request`: the body is not `{reply}`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody),
        (status = 404, description = "`session_not_found` or `permission_not_found`.", body = ErrorBody),
        (status = 409, description = "`permission_answered`: already answered.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is over 64 KiB.", body = ErrorBody)))]
pub(super) async fn reply_in_session(
    State(app): State<Arc<AppState>>,
    Path((id, pid)): Path<(String, String)>,
    body: Body,
) -> Result<Json<PermissionReplyResponse>> {
    let req: PermissionReplyRequest = read_json(body, 64 << 10).await?;
    let session = app.sessions.get(&id)?;
    let invoke = session.running_invoke().ok_or_else(|| {
        Error::PermissionNotFound(format!(
            "no permission request {pid:?}: nothing runs in session {id:?}"
        ))
    })?;
    Ok(Json(app.permissions.answer(invoke.as_str(), &pid, req)?))
}

/// Answer a permission request of an invoke
#[utoipa::path(post, path = "/v1/invokes/{id}/permissions/{pid}", tag = "invokes",
    params(("id" = String, Path, description = "The invoke id (`inv-…`)."),
        ("pid" = String, Path, description = "The `permissionId` of the `permission` event.")),
    request_body(content = PermissionReplyRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The reply was written to the agent.", body = PermissionReplyResponse),
        (status = 400, description = "`invalid_request`: the body is not `{reply}`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody),
        (status = 404, description = "`permission_not_found`.", body = ErrorBody),
        (status = 409, description = "`permission_answered`: already answered.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is over 64 KiB.", body = ErrorBody)))]
pub(super) async fn reply_in_invoke(
    State(app): State<Arc<AppState>>,
    Path((id, pid)): Path<(String, String)>,
    body: Body,
) -> Result<Json<PermissionReplyResponse>> {
    let req: PermissionReplyRequest = read_json(body, 64 << 10).await?;
    Ok(Json(app.permissions.answer(&id, &pid, req)?))
}
