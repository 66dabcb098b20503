//! The HTTP edge: routes, authentication, request parsing and response shapes. Handlers turn
//! requests into calls on [`crate::configure`], [`crate::invoke`] and [`crate::files`] and
//! errors into responses; nothing below this module sees HTTP.

mod agents;
mod files;
mod openapi;
mod ports;
mod processes;
mod sessions;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use agentbox_proto::{
    event, CancelRequest, CancelResponse, ConfigureRequest, ConfigureResult, ErrorBody,
    ExecRequest, ExecTimeout, ExitEvent, Health, Info, InvokeKind, InvokeList, InvokeResponse,
    InvokeSummary, Limits, LogEvent, Stream,
};
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use bytes::Bytes;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::Mode;
use crate::duration::parse_duration;
use crate::error::{Error, Result};
use crate::invoke::{Attachment, OnDisconnect, StartRequest, Stdin, StreamMode};
use crate::journal::Subscription;
use crate::{configure, sse, AppState};

/// Routes of the runner.
pub fn router(app: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/info", get(info))
        .route("/v1/configure", post(configure_sandbox))
        .route("/v1/invoke", post(invoke))
        .route("/v1/invoke/cancel", post(cancel_invoke_by_body))
        .route("/v1/invokes", get(list_invokes))
        .route("/v1/invokes/{id}", get(get_invoke))
        .route("/v1/invokes/{id}/events", get(stream_events))
        .route("/v1/invokes/{id}/cancel", post(cancel_invoke))
        .route("/v1/exec", post(exec))
        .route("/v1/files", get(files::list_files))
        .route("/v1/files/", get(files::list_files))
        .route(
            "/v1/files/{*path}",
            get(files::read_file)
                .put(files::write_file)
                .delete(files::delete_file),
        )
        .route("/v1/archive", get(files::archive))
        .merge(sessions::routes())
        .merge(agents::routes())
        .merge(ports::routes())
        .merge(processes::routes())
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&app),
            authenticate,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(openapi))
        .merge(v1)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            panic_response,
        ))
        .with_state(app)
}

/// Serves `router` on an already-bound listener until `shutdown` resolves, with the
/// connection cap and timeouts of `--max-connections`, `--header-read-timeout` and
/// `--idle-timeout` (`agentbox_serve`). Any [`agentbox_serve::Listener`] (TCP, Unix) works.
pub async fn serve<L: agentbox_serve::Listener>(
    listener: L,
    app: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::TokioExecutor;
    use hyper_util::server::conn::auto;

    // HTTP/1.1 for callers, and HTTP/2 with prior knowledge for the control plane, which
    // carries every stream of one runner on one connection: a stream then costs a few hundred
    // bytes there instead of a connection with its buffers.
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .max_concurrent_streams(H2_MAX_STREAMS)
        .initial_connection_window_size(H2_CONN_WINDOW)
        .initial_stream_window_size(H2_STREAM_WINDOW);
    let limits = app.cfg.limits;
    agentbox_serve::serve(listener, router(app), builder, limits, "runner", shutdown).await
}

/// HTTP/2 limits: streams are cheap, and the control plane may hold thousands open.
const H2_MAX_STREAMS: u32 = 65_536;
const H2_CONN_WINDOW: u32 = 8 << 20;
const H2_STREAM_WINDOW: u32 = 2 << 20;

/// The SHA-256 of a bearer token; tokens are compared as digests, in constant time.
pub fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

async fn authenticate(State(app): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if let Some(expected) = &app.token_digest {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(|t| token_digest(t.trim()));
        let ok = presented.is_some_and(|p| bool::from(p.ct_eq(expected)));
        if !ok {
            return Error::Unauthorized.into_response();
        }
    }
    next.run(request).await
}

/// Liveness
///
/// Answers as soon as the runner serves HTTP; no token needed.
#[utoipa::path(get, path = "/healthz", tag = "meta", security(()),
    responses((status = 200, description = "The runner is up.", body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// This document
///
/// The runner's OpenAPI description (generated from the code; committed as `runner/openapi.json`).
#[utoipa::path(get, path = "/openapi.json", tag = "meta", security(()),
    responses((status = 200, description = "The OpenAPI description.", content_type = "application/json", body = Object)))]
async fn openapi() -> Response {
    let mut response = openapi::document().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

async fn not_found(uri: Uri) -> Error {
    Error::RouteNotFound(uri.path().to_owned())
}

async fn method_not_allowed() -> Error {
    Error::MethodNotAllowed
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    Error::Internal("the request handler panicked".into()).into_response()
}

/// Version, mode, configuration and limits
#[utoipa::path(get, path = "/v1/info", tag = "meta",
    responses((status = 200, description = "The runner's state.", body = Info), (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody)))]
async fn info(State(app): State<Arc<AppState>>) -> Json<Info> {
    let stored = app.store.get();
    let default_agent = stored.agent(None);
    let cfg = &app.cfg;
    Json(Info {
        version: env!("CARGO_PKG_VERSION").into(),
        mode: cfg.mode.as_str().into(),
        // The default agent's (the entrypoint, or a named agent).
        configured: default_agent.is_some(),
        entrypoint: default_agent.map(|a| a.entrypoint),
        install_command_hash: stored.install_command_hash,
        last_configured_at: stored.last_configured_at,
        inflight: app.invokes.inflight(),
        limits: Limits {
            max_concurrent_invokes: u64::from(cfg.max_concurrent_invokes),
            default_timeout_ms: cfg.default_timeout.as_millis() as u64,
            max_timeout_ms: cfg.max_timeout.as_millis() as u64,
            max_file_bytes: cfg.max_file_bytes,
            max_total_bytes: cfg.max_total_bytes,
            max_files: cfg.max_files,
            max_upload_bytes: cfg.max_upload_bytes,
            journal_max_bytes: cfg.journal_max_bytes,
        },
    })
}

fn require_agent_mode(app: &AppState, route: &str) -> Result<()> {
    if app.cfg.mode == Mode::Code {
        return Err(Error::WrongMode(format!(
            "{route} only works in agent mode; this sandbox is in code mode: \
             use /v1/exec to run commands and /v1/files to move files"
        )));
    }
    Ok(())
}

/// Whether the client asked for one JSON answer instead of an event stream.
fn wants_json(headers: &HeaderMap) -> bool {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    accept.contains("application/json") && !accept.contains("text/event-stream")
}

async fn read_json<T: serde::de::DeserializeOwned>(body: Body, limit: usize) -> Result<T> {
    use futures_util::StreamExt;
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| Error::InvalidRequest(format!("cannot read the request body: {e}")))?;
        if bytes.len() + chunk.len() > limit {
            // Read (a bounded amount of) the rest, so the client gets the 413 rather than a
            // connection reset while it is still sending.
            crate::files::drain(&mut stream).await;
            return Err(Error::PayloadTooLarge(format!(
                "the request body is larger than {limit} bytes"
            )));
        }
        bytes.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        Error::InvalidRequest(format!("the body is not valid JSON for this route: {e}"))
    })
}

/// Configure: files, install command, entrypoint, env
///
/// Writes `files` into the workspace, runs `installCommand` once per distinct configuration
/// (sha256 over files and install command; the same hash as the last successful install is
/// `skipped: true`) and sets the entrypoint. Streams the install's `log` events and ends with
/// one `result` event (ConfigureResult), or an `error` event (ErrorEvent) when the install cannot
/// start. With `Accept: application/json`, answers the ConfigureResult once done. A failed
/// install (`installExitCode` not 0) leaves the previous configuration in force.
#[utoipa::path(post, path = "/v1/configure", tag = "configure",
    params(("stream" = Option<StreamMode>, Query, description = "`lines` (default, the seed's framing): one `log` event per whole line. `live`: also a fragment without a newline once the output pauses for 25 ms (`partial: true`), for prompts and streamed tokens.")),
    request_body(content = ConfigureRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "`log`… then `result` (or `error`) as Server-Sent Events; or the ConfigureResult.",
            content((String = "text/event-stream"), (ConfigureResult = "application/json"))),
        (status = 400, description = "`invalid_request` (bad JSON, no entrypoint or agents on the first configure, bad agents, a `defaultAgent` that is not one of them, bad `mcpServers`), `invalid_path` (a file outside the workspace), `wrong_mode` (code mode).", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: a file, the total or the file count is over the runner's limits.", body = ErrorBody),
        (status = 422, description = "`install_failed`: the install command could not be started (JSON answer only).", body = ErrorBody)))]
async fn configure_sandbox(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    uri: Uri,
    body: Body,
) -> Result<Response> {
    require_agent_mode(&app, "/v1/configure")?;
    let q: StreamQuery = query(&uri)?;
    let plan = configure::read_plan(&app, body)
        .await?
        .with_live_output(q.stream == Some(StreamMode::Live));
    // No entrypoint or agents on the first configure, a default agent that is not one: 400
    // before anything is written (checked again under the configure lock).
    configure::check_next(&app, &plan)?;
    let (log, outcome) = configure::start(&app, plan)?;
    if wants_json(&headers) {
        let result = outcome
            .await
            .map_err(|_| Error::Internal("configure task died".into()))??;
        return Ok(Json(result).into_response());
    }
    let sub = log.subscribe(0)?;
    Ok(sse_response(sub, None, app.cfg.keepalive))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct InvokeQuery {
    prompt: Option<String>,
    timeout: Option<String>,
    on_disconnect: Option<OnDisconnect>,
    session: Option<String>,
    stream: Option<StreamMode>,
}

#[derive(Debug, Deserialize)]
struct StreamQuery {
    stream: Option<StreamMode>,
}

pub(crate) fn query<T: serde::de::DeserializeOwned>(uri: &Uri) -> Result<T> {
    Query::<T>::try_from_uri(uri)
        .map(|q| q.0)
        .map_err(|e| Error::InvalidRequest(format!("bad query string: {}", e.body_text())))
}

/// Invoke the entrypoint
///
/// Spawns the configured entrypoint with the request body on stdin (a JSON body arrives as its
/// JSON text) and `--prompt=<prompt>` appended when `?prompt=` is given (the prompt is stdin
/// when the body is empty). Streams `start`, `log`… and `exit` as Server-Sent Events; with
/// `Accept: application/json` answers one InvokeResponse when it exits.
#[utoipa::path(post, path = "/v1/invoke", tag = "invokes",
    params(
        ("prompt" = Option<String>, Query, description = "Passed as `--prompt=<prompt>`; stdin when the body is empty."),
        ("timeout" = Option<String>, Query, description = "A Go duration (`90s`, `5m`, `1h30m`); capped at `maxTimeoutMs`."),
        ("onDisconnect" = Option<OnDisconnect>, Query, description = "What happens when the last watcher leaves: `cancel` (default, as the seed: closing the stream cancels), `linger` (cancel after `--linger` without a watcher, time to reattach), `continue`."),
        ("session" = Option<String>, Query, description = "Runs the invoke in this session (created with POST /v1/sessions): the agent channel, permissions and history. Required when the entrypoint is an ACP agent."),
        ("stream" = Option<StreamMode>, Query, description = "`lines` (default, the seed's framing): one `log` event per whole line. `live`: also a fragment without a newline once the output pauses for 25 ms (`partial: true`), for prompts and streamed tokens.")),
    request_body(content = String, description = "stdin for the entrypoint, any bytes; for an ACP agent the prompt (UTF-8, at most 16 MiB) unless `?prompt=` is given, or with `Content-Type: application/json` a body `{\"prompt\": [ACP content blocks]}` (text, image, audio, resource, resource_link).", content_type = "application/octet-stream"),
    responses(
        (status = 200, description = "`start`, `log`…, `exit` as Server-Sent Events; or the InvokeResponse.",
            content((String = "text/event-stream"), (InvokeResponse = "application/json"))),
        (status = 400, description = "`invalid_request` (bad query; an ACP agent invoked without `?session=`; an ACP prompt that is not UTF-8; malformed content blocks, or blocks the agent's `promptCapabilities` do not allow), `invalid_session_id`, `invalid_timeout`, `wrong_mode` (code mode).", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody),
        (status = 404, description = "`session_not_found`: no session with the `?session=` id.", body = ErrorBody),
        (status = 409, description = "`session_busy`: another invoke runs in the session.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: an ACP prompt body over 16 MiB.", body = ErrorBody),
        (status = 424, description = "`not_configured`: no entrypoint has been configured; `agent_failed`: the session's agent is no longer configured, or an ACP agent could not be started to learn its prompt capabilities.", body = ErrorBody),
        (status = 429, description = "`concurrency_exceeded` with `limit`, `inflight` and `Retry-After: 5`.", body = ErrorBody)))]
async fn invoke(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    uri: Uri,
    body: Body,
) -> Result<Response> {
    require_agent_mode(&app, "/v1/invoke")?;
    let q: InvokeQuery = query(&uri)?;
    let timeout = match &q.timeout {
        None => app.cfg.default_timeout,
        Some(text) => parse_duration(text)
            .map_err(Error::InvalidTimeout)?
            .min(app.cfg.max_timeout),
    };
    let stored = app.store.get();
    // The session's agent, or the default one.
    let chosen = sessions::agent_of(&app, &stored, q.session.as_deref())?;
    let mut argv = app.jail.map_argv(&chosen.entrypoint);
    if let Some(prompt) = &q.prompt {
        argv.push(format!("--prompt={prompt}"));
    }
    let agent = sessions::agent_setup(&app, q.session.as_deref(), q.prompt.as_deref())?;
    let (agent, acp, body) = match chosen.protocol {
        agentbox_proto::AgentProtocol::Acp => {
            let turn = sessions::acp_turn(
                &app,
                &stored,
                &chosen,
                agent,
                q.prompt.clone(),
                &headers,
                body,
            )
            .await?;
            (None, Some(turn), Body::empty())
        }
        agentbox_proto::AgentProtocol::Plain => (Some(agent), None, body),
    };
    let stdin = Stdin::from_body(body, q.prompt).await?;
    let (sub, attachment) = app.invokes.start(StartRequest {
        kind: InvokeKind::Invoke,
        argv,
        env: chosen.env.into_iter().collect(),
        cwd: app.cfg.workspace.clone(),
        timeout,
        stdin,
        on_disconnect: q.on_disconnect.unwrap_or_default(),
        stream: q.stream.unwrap_or_default(),
        agent,
        acp,
        process: None,
    })?;
    if wants_json(&headers) {
        return json_answer(&collect(sub, attachment, app.cfg.max_json_output).await?);
    }
    Ok(new_invoke_response(sub, attachment, app.cfg.keepalive).await)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ExecQuery {
    on_disconnect: Option<OnDisconnect>,
    stream: Option<StreamMode>,
}

/// Run a command (code mode's exec)
///
/// Runs `argv` or a shell `command` in `cwd` with `stdin`, journaled like an invoke. Answers one
/// InvokeResponse (`stdout`, `stderr`, `exitCode`) when it exits, as the seed's exec does; with
/// `Accept: text/event-stream`, streams `start`, `log`…, `exit` instead. Works in both modes.
#[utoipa::path(post, path = "/v1/exec", tag = "exec",
    params(("onDisconnect" = Option<OnDisconnect>, Query, description = "What happens when the last watcher leaves: `cancel` (default, as the seed: closing the stream cancels), `linger` (cancel after `--linger` without a watcher, time to reattach), `continue`."),
        ("stream" = Option<StreamMode>, Query, description = "`lines` (default, the seed's framing): one `log` event per whole line. `live`: also a fragment without a newline once the output pauses for 25 ms (`partial: true`), for prompts and streamed tokens.")),
    request_body(content = ExecRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The InvokeResponse; or the events as Server-Sent Events.",
            content((InvokeResponse = "application/json"), (String = "text/event-stream"))),
        (status = 400, description = "`invalid_request`, `invalid_timeout`, `invalid_path` (cwd outside the workspace), `not_a_directory`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is over 16 MiB.", body = ErrorBody),
        (status = 429, description = "`concurrency_exceeded` with `Retry-After: 5`.", body = ErrorBody)))]
async fn exec(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    uri: Uri,
    body: Body,
) -> Result<Response> {
    let q: ExecQuery = query(&uri)?;
    let req: ExecRequest = read_json(body, 16 << 20).await?;
    let argv = match (req.argv, req.command) {
        (Some(argv), None) if !argv.is_empty() && !argv[0].is_empty() => app.jail.map_argv(&argv),
        (None, Some(command)) => vec!["/bin/sh".into(), "-c".into(), command],
        _ => {
            return Err(Error::InvalidRequest(
                "give either argv (a non-empty array) or command (a shell command)".into(),
            ))
        }
    };
    if argv.iter().any(|a| a.contains('\0')) {
        return Err(Error::InvalidRequest("argv contains a NUL byte".into()));
    }
    let timeout = match req.timeout {
        None => app.cfg.default_timeout,
        Some(ExecTimeout::Seconds(s)) if s > 0.0 && s.is_finite() => {
            Duration::from_secs_f64(s.min(1e9))
        }
        Some(ExecTimeout::Seconds(s)) => {
            return Err(Error::InvalidTimeout(format!(
                "timeout {s} must be positive"
            )))
        }
        Some(ExecTimeout::Text(t)) => parse_duration(&t).map_err(Error::InvalidTimeout)?,
    }
    .min(app.cfg.max_timeout);
    let cwd = app
        .jail
        .resolve(req.cwd.as_deref().unwrap_or(crate::jail::WORKSPACE_ALIAS))?;
    if !cwd.is_dir() {
        let rel = cwd.strip_prefix(app.jail.root()).unwrap_or(&cwd);
        return Err(Error::NotADirectory(crate::jail::Jail::shown(rel)));
    }
    let env = req.env.unwrap_or_default();
    if env
        .iter()
        .any(|(k, v)| k.is_empty() || k.contains(['=', '\0']) || v.contains('\0'))
    {
        return Err(Error::InvalidRequest(
            "env names must be non-empty, without '='".into(),
        ));
    }
    let (sub, attachment) = app.invokes.start(StartRequest {
        kind: InvokeKind::Exec,
        argv,
        env: env.into_iter().collect(),
        cwd,
        timeout,
        stdin: Stdin::Bytes(Bytes::from(req.stdin.unwrap_or_default())),
        on_disconnect: q.on_disconnect.unwrap_or_default(),
        stream: q.stream.unwrap_or_default(),
        agent: None,
        acp: None,
        process: None,
    })?;
    // The seed's exec answers one JSON document; events only for clients that ask for them.
    if !wants_sse(&headers) {
        return json_answer(&collect(sub, attachment, app.cfg.max_json_output).await?);
    }
    Ok(new_invoke_response(sub, attachment, app.cfg.keepalive).await)
}

/// The event stream of an invoke just started. Its head goes out with the first events once
/// the process has exited or has run for [`invoke::QUICK_EXIT`], whichever comes first: a
/// short command's whole stream (`start` … `exit`) then leaves in one write, and the client
/// is woken once instead of twice (for `/bin/true` on two vCPUs, 25 µs less per invoke; see
/// BENCHMARKS.md). A longer one's first events wait at most that long.
async fn new_invoke_response(
    sub: Subscription,
    attachment: Attachment,
    keepalive: Duration,
) -> Response {
    sub.closed_within(crate::invoke::QUICK_EXIT).await;
    sse_response(sub, Some(attachment), keepalive)
}

/// Whether the client asked for an event stream (`Accept: text/event-stream`).
fn wants_sse(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"))
}

/// Reads an invoke's events to the end and folds them into one JSON answer, keeping at most
/// `max` bytes of each stream (`--max-json-output`); past that the stream is marked truncated
/// and read on without being kept, so the answer's size and the memory it takes are bounded.
async fn collect(
    mut sub: Subscription,
    attachment: Attachment,
    max: u64,
) -> Result<InvokeResponse> {
    let max = usize::try_from(max).unwrap_or(usize::MAX);
    let mut pending: Vec<u8> = Vec::new();
    let mut out: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    let mut truncated = [false, false];
    let mut exit: Option<ExitEvent> = None;
    while let Some(chunk) = sub.next().await {
        pending.extend_from_slice(&chunk?);
        let (frames, used) = sse::parse_frames(&pending);
        for frame in &frames {
            match frame.event {
                event::LOG => {
                    let Ok(log) = serde_json::from_str::<LogEvent>(frame.data) else {
                        continue;
                    };
                    let which = usize::from(log.stream == Stream::Stderr);
                    let buf = &mut out[which];
                    let mut keep = |bytes: &[u8]| {
                        let room = max.saturating_sub(buf.len());
                        if bytes.len() > room {
                            truncated[which] = true;
                        }
                        buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
                    };
                    // The exact bytes: `dataBase64` when present (`data` is then lossy).
                    if let Some(b64) = log.data_base64 {
                        if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(b64) {
                            keep(&bytes);
                        }
                    } else if let Some(text) = log.data {
                        keep(text.as_bytes());
                    }
                    if !log.partial {
                        keep(b"\n");
                    }
                }
                // The journal stopped storing output: which stream lost bytes is not known.
                event::TRUNCATED => truncated = [true, true],
                event::EXIT => exit = serde_json::from_str(frame.data).ok(),
                _ => {}
            }
        }
        pending.drain(..used);
    }
    drop(attachment);
    let exit =
        exit.ok_or_else(|| Error::Internal("the invoke ended without an exit event".into()))?;
    let [stdout, stderr] = out;
    Ok(InvokeResponse {
        invoke_id: exit.invoke_id,
        exit_code: exit.exit_code,
        signal: exit.signal,
        duration_ms: exit.duration_ms,
        reason: exit.reason,
        // Without a copy when the bytes are UTF-8 (the common case): the answer is held once.
        stdout: utf8_lossy(stdout),
        stderr: utf8_lossy(stderr),
        stdout_truncated: truncated[0],
        stderr_truncated: truncated[1],
    })
}

/// The JSON answer of an invoke, serialized into one buffer sized for it up front (axum's
/// `Json` grows its buffer by doubling: up to twice the answer, on top of the output it holds).
fn json_answer(answer: &InvokeResponse) -> Result<Response> {
    let mut body = Vec::with_capacity(answer.stdout.len() + answer.stderr.len() + 1024);
    serde_json::to_writer(&mut body, answer).map_err(|e| Error::Internal(e.to_string()))?;
    let mut response = Response::new(Body::from(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

/// `bytes` as a `String`, invalid UTF-8 replaced by U+FFFD; no copy when valid.
fn utf8_lossy(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Cancel an invoke or exec
///
/// SIGTERM to the whole process tree, SIGKILL after `--grace`. 404 once it has finished.
#[utoipa::path(post, path = "/v1/invokes/{id}/cancel", tag = "invokes",
    params(("id" = String, Path, description = "The invoke id (`inv-…`).")),
    responses(
        (status = 202, description = "Canceling: the stream ends with `exit` (reason `canceled`).", body = CancelResponse),
        (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody), (status = 404, description = "`invoke_not_found`: no such invoke is running.", body = ErrorBody)))]
async fn cancel_invoke(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response> {
    let invoke = app.invokes.cancel(&id)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(CancelResponse {
            invoke_id: invoke.id().clone(),
            status: "canceling".into(),
        }),
    )
        .into_response())
}

/// Cancel an invoke named in the body
///
/// As `POST /v1/invokes/{id}/cancel`, with `{"invokeId": "..."}` as the body.
#[utoipa::path(post, path = "/v1/invoke/cancel", tag = "invokes",
    request_body(content = CancelRequest, content_type = "application/json"),
    responses(
        (status = 202, description = "Canceling: the invoke's stream ends with `exit` (reason `canceled`).", body = CancelResponse),
        (status = 400, description = "`invalid_request`: the body is not `{invokeId}`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody),
        (status = 404, description = "`invoke_not_found`: no such invoke is running.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is over 64 KiB.", body = ErrorBody)))]
async fn cancel_invoke_by_body(State(app): State<Arc<AppState>>, body: Body) -> Result<Response> {
    let req: CancelRequest = read_json(body, 64 << 10).await?;
    cancel_invoke(State(app), Path(req.invoke_id.0)).await
}

/// Recent invokes and execs, newest first
#[utoipa::path(get, path = "/v1/invokes", tag = "invokes",
    responses((status = 200, description = "Running and retained finished runs.", body = InvokeList), (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody)))]
async fn list_invokes(State(app): State<Arc<AppState>>) -> Json<InvokeList> {
    Json(InvokeList {
        invokes: app.invokes.list(),
    })
}

/// One invoke's summary
#[utoipa::path(get, path = "/v1/invokes/{id}", tag = "invokes",
    params(("id" = String, Path, description = "The invoke id (`inv-…`).")),
    responses((status = 200, description = "The invoke.", body = InvokeSummary), (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody),
        (status = 404, description = "`invoke_not_found`.", body = ErrorBody)))]
async fn get_invoke(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<InvokeSummary>> {
    Ok(Json(app.invokes.get(&id)?.summary()))
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    after: Option<u64>,
}

/// Reattach: an invoke's events after an id
///
/// Replays the journaled events with ids greater than `Last-Event-ID` (or `?after=`), then
/// follows live ones until `exit`. Always `text/event-stream`; at or past the final event of a
/// finished invoke, an empty stream that ends at once.
#[utoipa::path(get, path = "/v1/invokes/{id}/events", tag = "invokes",
    params(("id" = String, Path, description = "The invoke id (`inv-…`)."),
        ("after" = Option<u64>, Query, description = "Replay events with ids greater than this."),
        ("Last-Event-ID" = Option<String>, Header, description = "As `after`; wins over it.")),
    responses(
        (status = 200, description = "The events as Server-Sent Events.", content_type = "text/event-stream", body = String),
        (status = 400, description = "`invalid_request`: `Last-Event-ID` or `after` is not an event id.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody), (status = 404, description = "`invoke_not_found`.", body = ErrorBody)))]
async fn stream_events(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response> {
    let q: EventsQuery = query(&uri)?;
    let after = match headers.get("last-event-id") {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| Error::InvalidRequest("Last-Event-ID must be an event id".into()))?,
        None => q.after.unwrap_or(0),
    };
    let invoke = app.invokes.get(&id)?;
    let (sub, attachment) = app.invokes.follow(&invoke, after).await?;
    Ok(sse_response(sub, Some(attachment), app.cfg.keepalive))
}

/// An SSE response that relays `sub` as it grows, with keepalive comments when idle.
fn sse_response(
    sub: Subscription,
    attachment: Option<Attachment>,
    keepalive: Duration,
) -> Response {
    struct StreamState {
        sub: Subscription,
        _attachment: Option<Attachment>,
        failed: bool,
    }
    let state = StreamState {
        sub,
        _attachment: attachment,
        failed: false,
    };
    let stream = futures_util::stream::unfold(state, move |mut st| async move {
        if st.failed {
            return None;
        }
        let item = match tokio::time::timeout(keepalive, st.sub.next()).await {
            Err(_) => Bytes::from_static(sse::KEEPALIVE),
            Ok(None) => return None,
            Ok(Some(Ok(bytes))) => bytes,
            Ok(Some(Err(e))) => {
                tracing::error!(error = %e, "cannot read journal");
                st.failed = true;
                let mut frame = Vec::new();
                sse::push_frame(
                    &mut frame,
                    0,
                    event::ERROR,
                    &agentbox_proto::ErrorEvent {
                        phase: Some("stream".into()),
                        message: format!("cannot read the journal: {e}"),
                    },
                );
                Bytes::from(frame)
            }
        };
        Some((Ok::<_, Infallible>(item), st))
    });
    let mut response = Response::new(Body::from_stream(stream));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}
