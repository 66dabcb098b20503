//! Processes and terminals: `/v1/processes` (start, list, get, stdin, signal, resize, wait,
//! events, kill) and the terminal WebSocket (`/v1/terminal`, `/v1/processes/{id}/terminal`).
//! A process is an invoke of kind `process`: the same registry, journal, concurrency cap,
//! whole-tree stop and restart recovery ([`crate::invoke`]); what it adds is a stdin kept
//! open, an optional pseudo-terminal and no timeout unless asked for.

use std::sync::Arc;
use std::time::Duration;

use agentbox_proto::{
    event, ErrorBody, ExecTimeout, ExitEvent, InvokeKind, LogEvent, ProcessList, ProcessRequest,
    ProcessSummary, PtySize, SignalRequest,
};
use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::duration::parse_duration;
use crate::error::{Error, Result};
use crate::invoke::StreamMode;
use crate::invoke::{Attachment, Invoke, OnDisconnect, ProcessOptions, StartRequest, Stdin};
use crate::journal::Subscription;
use crate::{sse, AppState};

/// Bytes one `POST .../stdin` may carry (a terminal's input is far less; a bulk feed is
/// several writes).
const MAX_STDIN_WRITE: usize = 1 << 20;
/// Terminal WebSockets open at once; more get 429 (`concurrency_exceeded`). An upgraded
/// connection leaves the accept loop's connection cap, so this bounds them instead.
const MAX_TERMINALS: usize = 256;
/// The longest `POST .../wait` waits before it answers with the running process.
const MAX_WAIT: Duration = Duration::from_secs(300);
/// Input frames larger than this are refused with an `error` frame (and frames over 1 MiB
/// close the socket).
const MAX_INPUT_FRAME: usize = 64 << 10;

static TERMINALS: Semaphore = Semaphore::const_new(MAX_TERMINALS);

/// The routes (authenticated by the caller's layer).
pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/processes", post(start_process).get(list_processes))
        .route("/v1/processes/{id}", get(get_process).delete(kill_process))
        .route("/v1/processes/{id}/stdin", post(write_stdin))
        .route("/v1/processes/{id}/signal", post(signal_process))
        .route("/v1/processes/{id}/resize", post(resize_process))
        .route("/v1/processes/{id}/wait", post(wait_process))
        .route("/v1/processes/{id}/events", get(process_events))
        .route("/v1/processes/{id}/terminal", get(attach_terminal))
        .route("/v1/terminal", get(open_terminal))
}

fn check_size(size: PtySize) -> Result<PtySize> {
    if (1..=1000).contains(&size.cols) && (1..=1000).contains(&size.rows) {
        Ok(size)
    } else {
        Err(Error::InvalidRequest(format!(
            "cols and rows must be 1-1000, got {}x{}",
            size.cols, size.rows
        )))
    }
}

/// What [`start`] runs.
struct Launch {
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: Option<String>,
    pty: Option<PtySize>,
    tag: Option<String>,
    timeout: Option<Duration>,
    on_disconnect: OnDisconnect,
    linger: Option<Duration>,
}

/// Starts a process; the caller's subscription (from event 0) and attachment.
fn start(app: &Arc<AppState>, launch: Launch) -> Result<(Arc<Invoke>, Subscription, Attachment)> {
    if launch.argv.is_empty() || launch.argv[0].is_empty() {
        return Err(Error::InvalidRequest(
            "give either argv (a non-empty array) or command (a shell command)".into(),
        ));
    }
    if launch.argv.iter().any(|a| a.contains('\0')) {
        return Err(Error::InvalidRequest("argv contains a NUL byte".into()));
    }
    if launch
        .env
        .iter()
        .any(|(k, v)| k.is_empty() || k.contains(['=', '\0']) || v.contains('\0'))
    {
        return Err(Error::InvalidRequest(
            "env names must be non-empty, without '='".into(),
        ));
    }
    if launch.tag.as_ref().is_some_and(|t| t.len() > 256) {
        return Err(Error::InvalidRequest("tag is longer than 256 bytes".into()));
    }
    let pty = launch.pty.map(check_size).transpose()?;
    let cwd = app.jail.resolve(
        launch
            .cwd
            .as_deref()
            .unwrap_or(crate::jail::WORKSPACE_ALIAS),
    )?;
    if !cwd.is_dir() {
        let rel = cwd.strip_prefix(app.jail.root()).unwrap_or(&cwd);
        return Err(Error::NotADirectory(crate::jail::Jail::shown(rel)));
    }
    let mut env = Vec::with_capacity(launch.env.len() + 1);
    if pty.is_some() && !app.cfg.base_env.iter().any(|(k, _)| k == "TERM") {
        env.push(("TERM".to_owned(), "xterm-256color".to_owned()));
    }
    env.extend(launch.env);
    let (sub, attachment) = app.invokes.start(StartRequest {
        kind: InvokeKind::Process,
        argv: app.jail.map_argv(&launch.argv),
        env,
        cwd,
        // No deadline unless asked for (a time too far away to be one).
        timeout: launch.timeout.unwrap_or(Duration::MAX),
        stdin: Stdin::Bytes(Bytes::new()),
        on_disconnect: launch.on_disconnect,
        stream: StreamMode::Lines,
        agent: None,
        acp: None,
        process: Some(ProcessOptions {
            pty,
            tag: launch.tag,
            linger: launch.linger,
        }),
    })?;
    let id = sub_invoke_id(app, &attachment)?;
    Ok((id, sub, attachment))
}

fn sub_invoke_id(app: &AppState, attachment: &Attachment) -> Result<Arc<Invoke>> {
    app.invokes.get_process(attachment.invoke().id().as_str())
}

/// Start a process
///
/// A long-lived process (`argv`, or `command` run by `/bin/sh -c`), optionally on a
/// pseudo-terminal (`pty`: stdin, stdout and stderr are the terminal; its output is one
/// `stdout` stream, framed raw: each read is one `partial` log event). It keeps running when
/// the caller goes away, until it exits or `DELETE /v1/processes/{id}`; it counts against
/// `--max-concurrent-invokes` while it runs. Its output is journaled as an invoke's
/// (`GET /v1/processes/{id}/events`).
#[utoipa::path(post, path = "/v1/processes", tag = "processes",
    request_body(content = ProcessRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "Started.", body = ProcessSummary),
        (status = 400, description = "`invalid_request` (no argv or command, NUL bytes, bad env names, a `pty` size outside 1-1000, a tag over 256 bytes), `invalid_timeout`, `invalid_path` (cwd outside the workspace), `not_a_directory`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is over 1 MiB.", body = ErrorBody),
        (status = 429, description = "`concurrency_exceeded` with `Retry-After: 5`.", body = ErrorBody)))]
async fn start_process(State(app): State<Arc<AppState>>, body: Body) -> Result<Response> {
    let req: ProcessRequest = super::read_json(body, 1 << 20).await?;
    let argv = match (req.argv, req.command) {
        (Some(argv), None) => argv,
        (None, Some(command)) => vec!["/bin/sh".into(), "-c".into(), command],
        _ => Vec::new(),
    };
    let timeout = match req.timeout {
        None => None,
        Some(ExecTimeout::Seconds(s)) if s > 0.0 && s.is_finite() => {
            Some(Duration::from_secs_f64(s.min(1e9)))
        }
        Some(ExecTimeout::Seconds(s)) => {
            return Err(Error::InvalidTimeout(format!(
                "timeout {s} must be positive"
            )))
        }
        Some(ExecTimeout::Text(t)) => Some(parse_duration(&t).map_err(Error::InvalidTimeout)?),
    };
    let (invoke, _sub, _attachment) = start(
        &app,
        Launch {
            argv,
            env: req.env.unwrap_or_default().into_iter().collect(),
            cwd: req.cwd,
            pty: req.pty,
            tag: req.tag,
            timeout,
            on_disconnect: OnDisconnect::Continue,
            linger: None,
        },
    )?;
    Ok((StatusCode::CREATED, Json(invoke.process_summary())).into_response())
}

/// Running and recent processes, newest first
#[utoipa::path(get, path = "/v1/processes", tag = "processes",
    responses((status = 200, description = "Running and retained finished processes (finished ones are pruned with invokes: `--retain-invokes`, `--retain-bytes`).", body = ProcessList),
        (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody)))]
async fn list_processes(State(app): State<Arc<AppState>>) -> Json<ProcessList> {
    Json(ProcessList {
        processes: app.invokes.list_processes(),
    })
}

/// One process
#[utoipa::path(get, path = "/v1/processes/{id}", tag = "processes",
    params(("id" = String, Path, description = "The process id.")),
    responses((status = 200, description = "The process.", body = ProcessSummary),
        (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody),
        (status = 404, description = "`process_not_found`.", body = ErrorBody)))]
async fn get_process(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<ProcessSummary>> {
    Ok(Json(app.invokes.get_process(&id)?.process_summary()))
}

/// Kill a process and its whole tree
///
/// SIGTERM to every member of the tree, SIGKILL after `--grace`; answers once it has exited
/// (reason `canceled`).
#[utoipa::path(delete, path = "/v1/processes/{id}", tag = "processes",
    params(("id" = String, Path, description = "The process id.")),
    responses((status = 200, description = "The exited process.", body = ProcessSummary),
        (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody),
        (status = 404, description = "`process_not_found`.", body = ErrorBody),
        (status = 409, description = "`process_exited`: it had already exited.", body = ErrorBody)))]
async fn kill_process(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<ProcessSummary>> {
    let invoke = app.invokes.get_process(&id)?;
    if !invoke.is_running() {
        return Err(Error::ProcessExited(format!("process {id} has exited")));
    }
    // A race with its own exit is still a kill that found nothing to do.
    let _ = app.invokes.cancel(&id);
    invoke
        .wait_exit(app.cfg.grace + Duration::from_secs(5))
        .await;
    Ok(Json(invoke.process_summary()))
}

#[derive(Debug, Deserialize)]
struct StdinQuery {
    close: Option<bool>,
}

/// Write to a process's stdin
///
/// The body's bytes (at most 1 MiB per request), in order with other writes; `?close=true`
/// closes stdin afterwards (on a terminal: sends end-of-file, `^D`). Answers once the bytes
/// are written (a process that does not read holds the request).
#[utoipa::path(post, path = "/v1/processes/{id}/stdin", tag = "processes",
    params(("id" = String, Path, description = "The process id."),
        ("close" = Option<bool>, Query, description = "Close stdin after the body.")),
    request_body(content = String, description = "Bytes for stdin.", content_type = "application/octet-stream"),
    responses((status = 204, description = "Written."),
        (status = 400, description = "`invalid_request`: a bad `close` value.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody),
        (status = 404, description = "`process_not_found`.", body = ErrorBody),
        (status = 409, description = "`process_exited`: it has exited, or its stdin is closed.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is over 1 MiB.", body = ErrorBody)))]
async fn write_stdin(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    uri: Uri,
    body: Body,
) -> Result<StatusCode> {
    let q: StdinQuery = super::query(&uri)?;
    let invoke = app.invokes.get_process(&id)?;
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| Error::InvalidRequest(format!("cannot read the request body: {e}")))?;
        if bytes.len() + chunk.len() > MAX_STDIN_WRITE {
            crate::files::drain(&mut stream).await;
            return Err(Error::PayloadTooLarge(format!(
                "one stdin write is at most {MAX_STDIN_WRITE} bytes"
            )));
        }
        bytes.extend_from_slice(&chunk);
    }
    invoke
        .write_stdin(Bytes::from(bytes), q.close.unwrap_or(false))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A signal by name (`SIGINT`, `INT`, any case) or number.
fn parse_signal(value: &serde_json::Value) -> Result<nix::sys::signal::Signal> {
    use std::str::FromStr;
    let bad = || Error::InvalidRequest(format!("unknown signal {value}"));
    match value {
        serde_json::Value::Number(n) => n
            .as_i64()
            .and_then(|n| i32::try_from(n).ok())
            .and_then(|n| nix::sys::signal::Signal::try_from(n).ok())
            .ok_or_else(bad),
        serde_json::Value::String(name) => {
            let upper = name.trim().to_ascii_uppercase();
            let full = if upper.starts_with("SIG") {
                upper
            } else {
                format!("SIG{upper}")
            };
            nix::sys::signal::Signal::from_str(&full).map_err(|_| bad())
        }
        _ => Err(bad()),
    }
}

/// Send a signal to a process
///
/// To the root process, or with `group: true` to its process group.
#[utoipa::path(post, path = "/v1/processes/{id}/signal", tag = "processes",
    params(("id" = String, Path, description = "The process id.")),
    request_body(content = SignalRequest, content_type = "application/json"),
    responses((status = 204, description = "Sent."),
        (status = 400, description = "`invalid_request`: an unknown signal.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody),
        (status = 404, description = "`process_not_found`.", body = ErrorBody),
        (status = 409, description = "`process_exited`.", body = ErrorBody)))]
async fn signal_process(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Body,
) -> Result<StatusCode> {
    let invoke = app.invokes.get_process(&id)?;
    let req: SignalRequest = super::read_json(body, 64 << 10).await?;
    invoke.signal(parse_signal(&req.signal)?, req.group)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Resize a process's terminal
///
/// `TIOCSWINSZ` on its pseudo-terminal; the kernel sends `SIGWINCH` to the terminal's
/// foreground process group.
#[utoipa::path(post, path = "/v1/processes/{id}/resize", tag = "processes",
    params(("id" = String, Path, description = "The process id.")),
    request_body(content = PtySize, content_type = "application/json"),
    responses((status = 204, description = "Resized."),
        (status = 400, description = "`not_a_terminal`: the process has no pseudo-terminal; `invalid_request`: a size outside 1-1000.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody),
        (status = 404, description = "`process_not_found`.", body = ErrorBody),
        (status = 409, description = "`process_exited`.", body = ErrorBody)))]
async fn resize_process(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Body,
) -> Result<StatusCode> {
    let invoke = app.invokes.get_process(&id)?;
    let size: PtySize = super::read_json(body, 64 << 10).await?;
    if !invoke.is_terminal() {
        return Err(Error::NotATerminal(format!(
            "process {id} has no terminal to resize"
        )));
    }
    invoke.resize(check_size(size)?)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
struct WaitQuery {
    timeout: Option<String>,
}

/// Wait for a process to exit
///
/// Answers the summary once it has exited, or after `?timeout=` (a Go duration, default and
/// at most 5m) with it still `running`.
#[utoipa::path(post, path = "/v1/processes/{id}/wait", tag = "processes",
    params(("id" = String, Path, description = "The process id."),
        ("timeout" = Option<String>, Query, description = "How long to wait (default and at most `5m`).")),
    responses((status = 200, description = "The process, exited unless the wait timed out.", body = ProcessSummary),
        (status = 400, description = "`invalid_timeout`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody),
        (status = 404, description = "`process_not_found`.", body = ErrorBody)))]
async fn wait_process(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    uri: Uri,
) -> Result<Json<ProcessSummary>> {
    let q: WaitQuery = super::query(&uri)?;
    let window = match q.timeout {
        None => MAX_WAIT,
        Some(t) => parse_duration(&t)
            .map_err(Error::InvalidTimeout)?
            .min(MAX_WAIT),
    };
    let invoke = app.invokes.get_process(&id)?;
    invoke.wait_exit(window).await;
    Ok(Json(invoke.process_summary()))
}

/// A process's events
///
/// The same journaled events as an invoke's (`start`, `log`…, `exit`), after `Last-Event-ID`
/// (or `?after=`); as `GET /v1/invokes/{id}/events`.
#[utoipa::path(get, path = "/v1/processes/{id}/events", tag = "processes",
    params(("id" = String, Path, description = "The process id."),
        ("after" = Option<u64>, Query, description = "Replay events with ids greater than this."),
        ("Last-Event-ID" = Option<String>, Header, description = "As `after`; wins over it.")),
    responses(
        (status = 200, description = "The events as Server-Sent Events.", content_type = "text/event-stream", body = String),
        (status = 400, description = "`invalid_request`: `Last-Event-ID` or `after` is not an event id.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody),
        (status = 404, description = "`process_not_found`.", body = ErrorBody)))]
async fn process_events(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response> {
    app.invokes.get_process(&id)?;
    super::stream_events(State(app), Path(id), headers, uri).await
}

/// The WebSocket upgrade, or 400 `invalid_request` as JSON (not axum's text answer) for a
/// plain request.
struct Upgrade(WebSocketUpgrade);

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self> {
        WebSocketUpgrade::from_request_parts(parts, state)
            .await
            .map(Upgrade)
            .map_err(|e| Error::InvalidRequest(format!("a WebSocket upgrade is needed: {e}")))
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TerminalQuery {
    /// Attach to this process instead of starting a shell.
    process: Option<String>,
    /// Replay output after this event (0: the whole scrollback).
    after: Option<u64>,
    cols: Option<u16>,
    rows: Option<u16>,
    /// The argv to run, as a JSON array (default: `$SHELL`, `/bin/bash` or `/bin/sh`).
    argv: Option<String>,
    cwd: Option<String>,
}

/// Open a terminal (WebSocket)
///
/// Starts a shell (`$SHELL`, else `/bin/bash`, else `/bin/sh`; or `?argv=` as a JSON array)
/// on a pseudo-terminal of `?cols=` × `?rows=` (default 80×24) in the workspace and attaches
/// to it; with `?process=ID`, attaches to that PTY process instead. Frames: see the HTTP
/// reference (`docs/http-api.md`). A shell started here runs on for
/// `--terminal-reconnect-window` (default 5m) once no terminal is attached, then its tree is
/// stopped.
#[utoipa::path(get, path = "/v1/terminal", tag = "processes",
    params(("process" = Option<String>, Query, description = "Attach to this process (one with a `pty`)."),
        ("after" = Option<u64>, Query, description = "Replay output after this event id (0: the whole scrollback); default: after what the last terminal of the process had sent, or 0."),
        ("cols" = Option<u16>, Query, description = "Columns of a new shell's terminal (default 80)."),
        ("rows" = Option<u16>, Query, description = "Rows of a new shell's terminal (default 24)."),
        ("argv" = Option<String>, Query, description = "What to run instead of the shell, a JSON array of strings."),
        ("cwd" = Option<String>, Query, description = "Working directory inside the workspace.")),
    responses((status = 101, description = "Switching to the WebSocket protocol."),
        (status = 400, description = "`invalid_request`: not a WebSocket upgrade, a bad argv or size; `not_a_terminal`: the process has no pseudo-terminal.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody),
        (status = 404, description = "`process_not_found`.", body = ErrorBody),
        (status = 409, description = "`process_exited`.", body = ErrorBody),
        (status = 429, description = "`concurrency_exceeded`: too many processes, or 256 terminals open.", body = ErrorBody)))]
async fn open_terminal(
    State(app): State<Arc<AppState>>,
    uri: Uri,
    upgrade: Upgrade,
) -> Result<Response> {
    let q: TerminalQuery = super::query(&uri)?;
    let permit = terminal_permit()?;
    if let Some(id) = &q.process {
        let invoke = app.invokes.get_process(id)?;
        return attach(app, invoke, q.after, upgrade, permit);
    }
    let argv = match &q.argv {
        Some(json) => serde_json::from_str::<Vec<String>>(json).map_err(|e| {
            Error::InvalidRequest(format!("argv must be a JSON array of strings: {e}"))
        })?,
        None => vec![default_shell(&app)],
    };
    let size = PtySize {
        cols: q.cols.unwrap_or(80),
        rows: q.rows.unwrap_or(24),
    };
    let (invoke, sub, attachment) = start(
        &app,
        Launch {
            argv,
            env: Vec::new(),
            cwd: q.cwd.clone(),
            pty: Some(size),
            tag: None,
            timeout: None,
            on_disconnect: OnDisconnect::Linger,
            linger: Some(app.cfg.terminal_reconnect_window),
        },
    )?;
    Ok(upgrade
        .0
        .max_message_size(1 << 20)
        .on_upgrade(move |socket| async move {
            run_terminal(socket, invoke, sub, attachment, 0).await;
            drop(permit);
        }))
}

/// Attach a terminal to a process (WebSocket)
///
/// As `GET /v1/terminal?process={id}`.
#[utoipa::path(get, path = "/v1/processes/{id}/terminal", tag = "processes",
    params(("id" = String, Path, description = "The process id (one with a `pty`)."),
        ("after" = Option<u64>, Query, description = "Replay output after this event id (0: the whole scrollback); default: after what the last terminal had sent.")),
    responses((status = 101, description = "Switching to the WebSocket protocol."),
        (status = 400, description = "`invalid_request`: not a WebSocket upgrade; `not_a_terminal`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody),
        (status = 404, description = "`process_not_found`.", body = ErrorBody),
        (status = 409, description = "`process_exited`.", body = ErrorBody),
        (status = 429, description = "`concurrency_exceeded`: 256 terminals open.", body = ErrorBody)))]
async fn attach_terminal(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    uri: Uri,
    upgrade: Upgrade,
) -> Result<Response> {
    let q: TerminalQuery = super::query(&uri)?;
    let permit = terminal_permit()?;
    let invoke = app.invokes.get_process(&id)?;
    attach(app, invoke, q.after, upgrade, permit)
}

fn terminal_permit() -> Result<tokio::sync::SemaphorePermit<'static>> {
    TERMINALS
        .try_acquire()
        .map_err(|_| Error::ConcurrencyExceeded {
            limit: MAX_TERMINALS as u64,
            inflight: MAX_TERMINALS as u64,
        })
}

fn attach(
    app: Arc<AppState>,
    invoke: Arc<Invoke>,
    after: Option<u64>,
    upgrade: Upgrade,
    permit: tokio::sync::SemaphorePermit<'static>,
) -> Result<Response> {
    if !invoke.is_terminal() {
        return Err(Error::NotATerminal(format!(
            "process {} has no terminal",
            invoke.id()
        )));
    }
    if !invoke.is_running() {
        return Err(Error::ProcessExited(format!(
            "process {} has exited",
            invoke.id()
        )));
    }
    let after = after.unwrap_or_else(|| invoke.terminal_sent());
    Ok(upgrade
        .0
        .max_message_size(1 << 20)
        .on_upgrade(move |socket| async move {
            match app.invokes.follow(&invoke, after).await {
                Ok((sub, attachment)) => run_terminal(socket, invoke, sub, attachment, after).await,
                Err(e) => tracing::warn!(error = %e, "cannot attach a terminal"),
            }
            drop(permit);
        }))
}

/// `$SHELL` of the runner's environment, else `/bin/bash`, else `/bin/sh`.
fn default_shell(app: &AppState) -> String {
    app.cfg
        .base_env
        .iter()
        .rev()
        .find(|(k, _)| k == "SHELL")
        .map(|(_, v)| v.clone())
        .filter(|v| !v.is_empty())
        .or_else(|| {
            ["/bin/bash", "/bin/sh"]
                .into_iter()
                .find(|p| std::path::Path::new(p).exists())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "/bin/sh".to_owned())
}

/// A JSON text frame, either way.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
enum Control {
    /// Server: the first frame: which process, and after which event the replay starts.
    #[serde(rename_all = "camelCase")]
    Attached {
        process_id: String,
        replay_after: u64,
    },
    /// Client: input as text.
    Input { data: String },
    /// Client: a new terminal size.
    Resize { cols: u16, rows: u16 },
    /// Client: answered with `pong`.
    Ping,
    /// Server: the answer to `ping`.
    Pong,
    /// Server: the process exited; the socket closes after this frame.
    #[serde(rename_all = "camelCase")]
    Exit {
        exit_code: i32,
        #[serde(skip_serializing_if = "Option::is_none")]
        signal: Option<i32>,
        reason: String,
    },
    /// Server: a client frame could not be applied (the terminal stays open).
    Error { message: String },
}

fn text(control: &Control) -> Message {
    Message::Text(serde_json::to_string(control).unwrap_or_default().into())
}

/// Relays a terminal: output events as binary frames, input frames to the process.
async fn run_terminal(
    socket: WebSocket,
    invoke: Arc<Invoke>,
    mut sub: Subscription,
    attachment: Attachment,
    after: u64,
) {
    let (mut tx, mut rx) = socket.split();
    let mut last_sent = after;
    let attached = Control::Attached {
        process_id: invoke.id().to_string(),
        replay_after: after,
    };
    if tx.send(text(&attached)).await.is_err() {
        return;
    }
    let mut pending: Vec<u8> = Vec::new();
    let mut exited = false;
    loop {
        tokio::select! {
            chunk = sub.next() => {
                let Some(Ok(chunk)) = chunk else { break };
                pending.extend_from_slice(&chunk);
                let (frames, used) = sse::parse_frames(&pending);
                let mut out: Vec<u8> = Vec::new();
                let mut exit = None;
                for frame in &frames {
                    match frame.event {
                        event::LOG => {
                            if let Ok(log) = serde_json::from_str::<LogEvent>(frame.data) {
                                push_output(&mut out, log);
                            }
                        }
                        event::EXIT => exit = serde_json::from_str::<ExitEvent>(frame.data).ok(),
                        _ => {}
                    }
                    last_sent = last_sent.max(frame.id);
                }
                pending.drain(..used);
                if !out.is_empty() && tx.send(Message::Binary(out.into())).await.is_err() {
                    break;
                }
                if let Some(exit) = exit {
                    let _ = tx
                        .send(text(&Control::Exit {
                            exit_code: exit.exit_code,
                            signal: exit.signal,
                            reason: exit.reason.as_str().to_owned(),
                        }))
                        .await;
                    let _ = tx.send(Message::Close(None)).await;
                    exited = true;
                    break;
                }
            }
            message = rx.next() => {
                let Some(Ok(message)) = message else { break };
                let reply = match message {
                    Message::Binary(bytes) => input(&invoke, bytes).await,
                    Message::Text(body) => match serde_json::from_str::<Control>(body.as_str()) {
                        Ok(Control::Input { data }) => input(&invoke, Bytes::from(data)).await,
                        Ok(Control::Resize { cols, rows }) => check_size(PtySize { cols, rows })
                            .and_then(|size| invoke.resize(size))
                            .err()
                            .map(|e| Control::Error { message: e.to_string() }),
                        Ok(Control::Ping) => Some(Control::Pong),
                        Ok(_) | Err(_) => Some(Control::Error {
                            message: "a text frame is {\"type\":\"input\"|\"resize\"|\"ping\", ...}".into(),
                        }),
                    },
                    Message::Close(_) => break,
                    // Pings are answered by the WebSocket layer.
                    Message::Ping(_) | Message::Pong(_) => None,
                };
                if let Some(reply) = reply {
                    if tx.send(text(&reply)).await.is_err() {
                        break;
                    }
                }
            }
        }
    }
    if !exited {
        invoke.set_terminal_sent(last_sent);
    }
    drop(attachment);
}

async fn input(invoke: &Invoke, bytes: Bytes) -> Option<Control> {
    if bytes.len() > MAX_INPUT_FRAME {
        return Some(Control::Error {
            message: format!("an input frame is at most {MAX_INPUT_FRAME} bytes"),
        });
    }
    invoke
        .write_stdin(bytes, false)
        .await
        .err()
        .map(|e| Control::Error {
            message: e.to_string(),
        })
}

/// Appends a `log` event's exact bytes.
fn push_output(out: &mut Vec<u8>, log: LogEvent) {
    match (log.data_base64, log.data) {
        (Some(b64), _) => {
            if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(b64) {
                out.extend_from_slice(&bytes);
            }
        }
        (None, Some(text)) => out.extend_from_slice(text.as_bytes()),
        (None, None) => {}
    }
    if !log.partial {
        out.push(b'\n');
    }
}
