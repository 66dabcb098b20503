//! The control plane's OpenAPI description, generated from the code: schemas from the wire
//! types (`ToSchema` derives in `agentbox-proto`), operations from the `#[utoipa::path]`
//! annotations on the handlers in [`crate::api`] and, for the routes passed through to runners
//! (one handler serves them all), on the stubs below; the overview is
//! `controlplane/openapi-intro.md`. `GET /openapi.json` serves it; `controlplane/openapi.json` is
//! a committed copy that a test keeps current (regenerate it with
//! `UPDATE_OPENAPI=1 cargo test -p agentbox-controlplane --lib openapi`).

use std::sync::OnceLock;

use agentbox_proto::{
    AgentEvent, AgentList, ArchiveFormat, CancelRequest, CancelResponse, ConfigureRequest,
    ConfigureResult, CreateSessionRequest, ErrorBody, ErrorEvent, ExecRequest, ExitEvent,
    FileListing, ForwardedPort, InvokeList, InvokeResponse, InvokeSummary, LogEvent, OnDisconnect,
    PermissionEvent, PermissionReplyEvent, PermissionReplyRequest, PermissionReplyResponse,
    PortList, PortRequest, ProtocolErrorEvent, SessionConfigRequest, SessionEvent,
    SessionEventPage, SessionInfo, SessionList, StartEvent, StreamMode, TruncatedEvent,
    WrittenFile,
};
use serde_json::{json, Value};
use utoipa::OpenApi;

use crate::{admin_api, api};

#[derive(OpenApi)]
#[openapi(
    info(title = "agentbox control plane API", description = include_str!("../openapi-intro.md")),
    paths(
        api::healthz,
        api::render_metrics,
        api::openapi,
        api::user_me,
        api::list_templates,
        api::get_template,
        api::list_sandboxes,
        api::create_sandbox,
        api::get_sandbox,
        api::delete_sandbox,
        api::stop_sandbox,
        api::resume_sandbox,
        crate::lifecycle::clone_sandbox,
        crate::lifecycle::warm_pool_status,
        admin_api::list_policies,
        admin_api::replace_policies,
        admin_api::get_policy,
        admin_api::put_policy,
        admin_api::delete_policy,
        admin_api::effective_policy,
        admin_api::audit_events,
        admin_api::list_credentials,
        admin_api::put_credential,
        admin_api::delete_credential,
        configure,
        invoke,
        invoke_cancel,
        invokes_list,
        invokes_get,
        invokes_events,
        invokes_cancel,
        exec,
        files_list,
        files_get,
        files_put,
        files_delete,
        archive,
        agents_list,
        sessions_create,
        sessions_list,
        sessions_get,
        sessions_delete,
        sessions_events,
        sessions_config,
        sessions_permission,
        invokes_permission,
        ports_list,
        ports_forward,
        ports_remove,
        ports_tunnel,
        preview,
        processes_start,
        processes_list,
        processes_get,
        processes_kill,
        processes_stdin,
        processes_signal,
        processes_resize,
        processes_wait,
        processes_events,
        crate::terminal::mint_ticket,
        crate::terminal::open_terminal,
        ws_terminal,
    ),
    components(schemas(
        StartEvent, LogEvent, ExitEvent, ErrorEvent, TruncatedEvent, ConfigureResult, OnDisconnect,
        StreamMode, ArchiveFormat, AgentEvent, PermissionEvent, PermissionReplyEvent, ProtocolErrorEvent,
        SessionEvent, crate::governance::PolicyViolationBody, crate::governance::Violation,
    )),
    tags(
        (name = "processes", description = "Long-lived processes and pseudo-terminals in a sandbox (passed to the runner)."),
        (name = "meta", description = "Health, metrics and this document; no credential needed."),
        (name = "user", description = "The caller's identity and namespaces."),
        (name = "templates", description = "What sandboxes can be created from."),
        (name = "sandboxes", description = "Creating, listing, stopping, resuming and deleting sandboxes."),
        (name = "configure", description = "Files, install command, entrypoint and environment of an agent-mode sandbox (passed to its runner)."),
        (name = "invokes", description = "Running the entrypoint, following, reattaching and canceling (passed to the sandbox's runner)."),
        (name = "exec", description = "Ad-hoc commands, journaled like invokes; both modes (passed to the sandbox's runner)."),
        (name = "sessions", description = "Sessions, their histories, permission replies and ACP session config (passed to the sandbox's runner)."),
        (name = "governance", description = "Per-namespace policies: limits on sandboxes, templates, images, resources, concurrency and timeouts; a request that breaks one gets 403 `policy_violation`."),
        (name = "audit", description = "The audit trail: who did what to which sandbox, with what outcome; never argv, stdin, bodies or secrets."),
        (name = "credentials", description = "Named secrets given to agents by reference (`credentials` on a template or a create request); values are never returned."),
        (name = "ports", description = "Forwarded ports of a sandbox, the preview proxy (HTTP and WebSockets) and raw TCP tunnels; the sandbox's runner reaches the ports from inside the sandbox's network."),
        (name = "files", description = "Listing, downloading, uploading and deleting workspace files, and archives; both modes (passed to the sandbox's runner)."),
    )
)]
struct ApiDoc;

/// The description as pretty-printed JSON (what `GET /openapi.json` answers).
pub fn document() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the description is JSON");
        finish(&mut doc);
        agentbox_proto::describe_event_streams(&mut doc);
        let mut text = serde_json::to_string_pretty(&doc).expect("the description is JSON");
        text.push('\n');
        text
    })
}

/// What the derive does not express: version, license, server, the security schemes.
fn finish(doc: &mut Value) {
    doc["info"]["version"] = json!(env!("CARGO_PKG_VERSION"));
    doc["info"]["summary"] = json!(
        "Create, stop, resume and delete sandboxes, and configure, invoke and stream agents in \
         them through their runners."
    );
    doc["info"]["license"] = json!({"name": "Apache-2.0", "identifier": "Apache-2.0"});
    if let Some(info) = doc["info"].as_object_mut() {
        info.remove("contact");
    }
    doc["servers"] = json!([{
        "url": "http://{host}:{port}",
        "description": "A control plane; it listens on 127.0.0.1:8420 unless started with --listen.",
        "variables": {"host": {"default": "127.0.0.1"}, "port": {"default": "8420"}},
    }]);
    per_namespace_names(doc);
    doc["security"] = json!([{"apiKeyAuth": []}, {"bearerAuth": []}]);
    doc["components"]["securitySchemes"] = json!({
        "apiKeyAuth": {
            "type": "apiKey",
            "in": "header",
            "name": "X-API-Key",
            "description": "`X-API-Key: <key>` with an API key from `--api-keys-file` (stored as \
                SHA-256 digests, compared in constant time). Sent together with \
                `Authorization`, this header is the one used.",
        },
        "bearerAuth": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "API key or OIDC JWT",
            "description": "`Authorization: Bearer <credential>`: an API key, or a JWT from the \
                configured OIDC issuer (signature, `exp`, `nbf`, `iss`, `aud`).",
        },
    });
}

/// Every route of one sandbox finds its `{id}` among the caller's namespaces
/// (`api::locate`): the id may be `name.namespace`, `?namespace=` picks (not on a preview,
/// whose query is the sandbox's server's), and a name in several of them is 409
/// `ambiguous_name`.
fn per_namespace_names(doc: &mut Value) {
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        if !(path.starts_with("/api/v1/sandboxes/{id}") || path.starts_with("/ws/terminal/{id}")) {
            continue;
        }
        let preview = path.contains("/preview/");
        let Some(operations) = item.as_object_mut() else {
            continue;
        };
        for operation in operations.values_mut() {
            let Some(params) = operation["parameters"].as_array_mut() else {
                continue;
            };
            for p in params.iter_mut() {
                if p["name"] == "id" && p["in"] == "path" {
                    p["description"] = json!(
                        "The sandbox's name (names are per namespace), or `name.namespace` to \
                         pick its namespace."
                    );
                }
            }
            if !preview {
                params.push(json!({
                    "name": "namespace",
                    "in": "query",
                    "required": false,
                    "schema": {"type": "string"},
                    "description": "The sandbox's namespace. Without it, the name is looked for \
                        in the caller's own namespace (where its creates go; `default` for a \
                        caller of every namespace), then in the caller's other namespaces, \
                        where it must be in exactly one. Never passed to the runner.",
                }));
            }
            let ambiguous = "`ambiguous_name`: the name is in several of the caller's \
                namespaces and none was picked (`?namespace=`, or the id `name.namespace`).";
            let responses = &mut operation["responses"];
            if let Some(conflict) = responses.get_mut("409") {
                let before = conflict["description"].as_str().unwrap_or_default();
                conflict["description"] = json!(format!("{before} {ambiguous}"));
            } else if let Some(responses) = responses.as_object_mut() {
                responses.insert(
                    "409".into(),
                    json!({
                        "description": ambiguous,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
                    }),
                );
            }
        }
    }
}

// The routes passed through to the sandbox's runner. These functions are never called: they
// carry the annotations for the one handler (`api::to_runner`) that serves them all.

/// Configure: files, install command, entrypoint, env
///
/// Passed to the runner's `POST /v1/configure`. Streams the install's `log` events and ends
/// with `result` (ConfigureResult: `lastConfiguredAt`, `installCommandHash`, `entrypoint`,
/// `installExitCode`, `skipped`) or `error` (`{phase, message}`); with `Accept:
/// application/json`, answers the ConfigureResult. The same files and install command as the
/// last successful install are `skipped: true`.
#[utoipa::path(post, path = "/api/v1/sandboxes/{id}/configure", tag = "configure",
    params(("id" = String, Path, description = "The sandbox id."),
        ("stream" = Option<StreamMode>, Query, description = "`lines` (default): the install's output one `log` event per whole line; `live`: fragments too, after a 25 ms pause.")),
    request_body(content = ConfigureRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "`log`… then `result` (or `error`) as Server-Sent Events; or the ConfigureResult.",
            content((String = "text/event-stream"), (ConfigureResult = "application/json"))),
        (status = 400, description = "`invalid_request`, `invalid_path`; `wrong_mode` on a code-mode sandbox.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running`.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`.", body = ErrorBody),
        (status = 422, description = "`install_failed` (JSON answer only).", body = ErrorBody),
        (status = 502, description = "`runner_unreachable`; `runner_unauthorized`: the runner refused the control plane's runner token.", body = ErrorBody),
        (status = 504, description = "`runner_timeout`.", body = ErrorBody)))]
#[allow(dead_code)]
fn configure() {}

/// Invoke the entrypoint
///
/// Passed to the runner's `POST /v1/invoke`. The body is the entrypoint's stdin (a JSON body
/// arrives as its JSON text). Streams `start {invokeId, startedAt}`, `log {stream, data}`…,
/// `exit {invokeId, exitCode, durationMs, reason}`; with `Accept: application/json`, one
/// InvokeResponse. With `session`, the invoke runs in that session (created with
/// `POST /api/v1/sandboxes/{id}/sessions`): its events also go to the session's history and the
/// agent may ask permissions, answered under `/sessions/{sid}/permissions/{pid}`. When the
/// sandbox's runner goes away mid-stream, the stream ends with an `error` event (ErrorEvent,
/// phase `proxy`, no `id:`) and a clean end of the body. By default, as the seed: one `log`
/// per whole line (`data` always present, lossy for bytes that are not UTF-8, whose exact bytes
/// are in `dataBase64`), and closing the stream cancels the invoke.
#[utoipa::path(post, path = "/api/v1/sandboxes/{id}/invoke", tag = "invokes",
    params(("id" = String, Path, description = "The sandbox id."),
        ("prompt" = Option<String>, Query, description = "Passed as `--prompt=<prompt>`; stdin when the body is empty."),
        ("timeout" = Option<String>, Query, description = "A Go duration (`90s`, `5m`, `1h30m`); clamped to the namespace policy's `maxTimeout` (which is also the timeout of an invoke without one)."),
        ("onDisconnect" = Option<OnDisconnect>, Query, description = "What happens when the last watcher leaves: `cancel` (default, as the seed: closing the stream cancels), `linger` (cancel after the runner's `--linger` without a watcher, time to reattach), `continue`."),
        ("stream" = Option<StreamMode>, Query, description = "`lines` (default, the seed's framing): one `log` event per whole line. `live`: also a fragment without a newline once the output pauses for 25 ms (`partial: true`), for prompts and streamed tokens."),
        ("session" = Option<String>, Query, description = "Run in this session (1 to 128 of `A-Z a-z 0-9 . _ -`, not starting with `.` or `-`); one invoke at a time per session.")),
    request_body(content = String, description = "stdin for the entrypoint, any bytes; for an ACP agent the prompt text, or `{\"prompt\": [content blocks]}` with `Content-Type: application/json`.", content_type = "application/octet-stream"),
    responses(
        (status = 200, description = "Server-Sent Events (ending with `exit`, or with an `error` event from the proxy when the runner went away); or the InvokeResponse.",
            content((String = "text/event-stream"), (InvokeResponse = "application/json"))),
        (status = 400, description = "`invalid_request`, `invalid_timeout`, `invalid_session_id` (a malformed `session`); `wrong_mode` on a code-mode sandbox.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`, or `session_not_found`: no such session.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running`, or `session_busy`: the session already runs an invoke.", body = ErrorBody),
        (status = 424, description = "`not_configured`: configure first; `agent_failed`: the session's agent is no longer configured, or an ACP agent could not be started to learn its prompt capabilities.", body = ErrorBody),
        (status = 429, description = "`concurrency_exceeded` with `Retry-After: 5`.", body = ErrorBody),
        (status = 502, description = "`runner_unreachable`; `runner_unauthorized`: the runner refused the control plane's runner token.", body = ErrorBody),
        (status = 504, description = "`runner_timeout`.", body = ErrorBody)))]
#[allow(dead_code)]
fn invoke() {}

/// Cancel an invoke named in the body
#[utoipa::path(post, path = "/api/v1/sandboxes/{id}/invoke/cancel", tag = "invokes",
    params(("id" = String, Path, description = "The sandbox id.")),
    request_body(content = CancelRequest, content_type = "application/json"),
    responses(
        (status = 202, description = "Canceling: the stream ends with `exit` (reason `canceled`).", body = CancelResponse),
        (status = 400, description = "`invalid_request`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`, or `invoke_not_found`: no such invoke runs.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running`.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`.", body = ErrorBody),
        (status = 502, description = "`runner_unreachable`; `runner_unauthorized`: the runner refused the control plane's runner token.", body = ErrorBody),
        (status = 504, description = "`runner_timeout`.", body = ErrorBody)))]
#[allow(dead_code)]
fn invoke_cancel() {}

/// Recent invokes and execs, newest first
#[utoipa::path(get, path = "/api/v1/sandboxes/{id}/invokes", tag = "invokes",
    params(("id" = String, Path, description = "The sandbox id.")),
    responses((status = 200, description = "The runs.", body = InvokeList),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running`.", body = ErrorBody),
        (status = 502, description = "`runner_unreachable`; `runner_unauthorized`: the runner refused the control plane's runner token.", body = ErrorBody),
        (status = 504, description = "`runner_timeout`.", body = ErrorBody)))]
#[allow(dead_code)]
fn invokes_list() {}

/// One invoke's summary
#[utoipa::path(get, path = "/api/v1/sandboxes/{id}/invokes/{iid}", tag = "invokes",
    params(("id" = String, Path, description = "The sandbox id."),
        ("iid" = String, Path, description = "The invoke id (`inv-…`).")),
    responses((status = 200, description = "The invoke.", body = InvokeSummary),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`, `invoke_not_found`.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running`.", body = ErrorBody),
        (status = 502, description = "`runner_unreachable`; `runner_unauthorized`: the runner refused the control plane's runner token.", body = ErrorBody),
        (status = 504, description = "`runner_timeout`.", body = ErrorBody)))]
#[allow(dead_code)]
fn invokes_get() {}

/// Reattach: an invoke's events after an id
///
/// Passed to the runner's `GET /v1/invokes/{id}/events`: replays the events after
/// `Last-Event-ID` (or `after`), then follows live ones until the final event. At or past the
/// final event nothing is replayed and the stream ends at once, cleanly (no `error` event).
#[utoipa::path(get, path = "/api/v1/sandboxes/{id}/invokes/{iid}/events", tag = "invokes",
    params(("id" = String, Path, description = "The sandbox id."),
        ("iid" = String, Path, description = "The invoke id (`inv-…`)."),
        ("after" = Option<u64>, Query, description = "Replay events with ids greater than this."),
        ("Last-Event-ID" = Option<String>, Header, description = "As `after`; wins over it.")),
    responses(
        (status = 200, description = "The events as Server-Sent Events.", content_type = "text/event-stream", body = String),
        (status = 400, description = "`invalid_request`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`, `invoke_not_found`.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running`.", body = ErrorBody),
        (status = 502, description = "`runner_unreachable`; `runner_unauthorized`: the runner refused the control plane's runner token.", body = ErrorBody),
        (status = 504, description = "`runner_timeout`.", body = ErrorBody)))]
#[allow(dead_code)]
fn invokes_events() {}

/// Cancel an invoke or exec
#[utoipa::path(post, path = "/api/v1/sandboxes/{id}/invokes/{iid}/cancel", tag = "invokes",
    params(("id" = String, Path, description = "The sandbox id."),
        ("iid" = String, Path, description = "The invoke id (`inv-…`).")),
    responses(
        (status = 202, description = "Canceling.", body = CancelResponse),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`, `invoke_not_found`.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running`.", body = ErrorBody),
        (status = 502, description = "`runner_unreachable`; `runner_unauthorized`: the runner refused the control plane's runner token.", body = ErrorBody),
        (status = 504, description = "`runner_timeout`.", body = ErrorBody)))]
#[allow(dead_code)]
fn invokes_cancel() {}

/// Run a command: `{command, timeout?}` → `{stdout, stderr, exitCode}`
///
/// Passed to the runner's `POST /v1/exec`. Answers one InvokeResponse when the command exits;
/// with `Accept: text/event-stream`, streams its events instead. Works in both modes. Under a
/// namespace policy with `maxTimeout`, `timeout` is clamped to it (and set to it when absent).
#[utoipa::path(post, path = "/api/v1/sandboxes/{id}/exec", tag = "exec",
    params(("id" = String, Path, description = "The sandbox id."),
        ("onDisconnect" = Option<OnDisconnect>, Query, description = "What happens when the last watcher leaves: `cancel` (default), `linger`, `continue`."),
        ("stream" = Option<StreamMode>, Query, description = "`lines` (default, the seed's framing): one `log` event per whole line. `live`: also a fragment without a newline once the output pauses for 25 ms (`partial: true`), for prompts and streamed tokens.")),
    request_body(content = ExecRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The InvokeResponse; or Server-Sent Events.",
            content((InvokeResponse = "application/json"), (String = "text/event-stream"))),
        (status = 400, description = "`invalid_request`, `invalid_timeout`, `invalid_path`, `not_a_directory`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running`.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`.", body = ErrorBody),
        (status = 429, description = "`concurrency_exceeded`.", body = ErrorBody),
        (status = 502, description = "`runner_unreachable`; `runner_unauthorized`: the runner refused the control plane's runner token.", body = ErrorBody),
        (status = 504, description = "`runner_timeout`.", body = ErrorBody)))]
#[allow(dead_code)]
fn exec() {}

/// List a directory: `files/?path=/workspace`
#[utoipa::path(get, path = "/api/v1/sandboxes/{id}/files/", tag = "files",
    params(("id" = String, Path, description = "The sandbox id."),
        ("path" = Option<String>, Query, description = "A sandbox path, default `/workspace`.")),
    responses((status = 200, description = "`{\"entries\": [{name, size, isDir, mode, modifiedAt, …}]}`.", body = FileListing),
        (status = 400, description = "`invalid_path`, `not_a_directory`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`, `file_not_found`.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running`.", body = ErrorBody),
        (status = 502, description = "`runner_unreachable`; `runner_unauthorized`: the runner refused the control plane's runner token.", body = ErrorBody),
        (status = 504, description = "`runner_timeout`.", body = ErrorBody)))]
#[allow(dead_code)]
fn files_list() {}

/// Download a file: `files/workspace/notes.txt` is `/workspace/notes.txt`
#[utoipa::path(get, path = "/api/v1/sandboxes/{id}/files/{path}", tag = "files",
    params(("id" = String, Path, description = "The sandbox id."),
        ("path" = String, Path, description = "The sandbox path without its leading slash."),
        ("Range" = Option<String>, Header, description = "One byte range, e.g. `bytes=0-1023`.")),
    responses(
        (status = 200, description = "The file's bytes.", content_type = "application/octet-stream", body = String),
        (status = 206, description = "The requested range.", content_type = "application/octet-stream", body = String),
        (status = 400, description = "`invalid_path`, `is_a_directory`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`, `file_not_found`.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running`.", body = ErrorBody),
        (status = 416, description = "`range_not_satisfiable`.", body = ErrorBody),
        (status = 502, description = "`runner_unreachable`; `runner_unauthorized`: the runner refused the control plane's runner token.", body = ErrorBody),
        (status = 504, description = "`runner_timeout`.", body = ErrorBody)))]
#[allow(dead_code)]
fn files_get() {}

/// Upload a file
#[utoipa::path(put, path = "/api/v1/sandboxes/{id}/files/{path}", tag = "files",
    params(("id" = String, Path, description = "The sandbox id."),
        ("path" = String, Path, description = "The sandbox path without its leading slash.")),
    request_body(content = String, content_type = "application/octet-stream"),
    responses(
        (status = 201, description = "Written.", body = WrittenFile),
        (status = 400, description = "`invalid_path`, `is_a_directory`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running`.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`.", body = ErrorBody),
        (status = 502, description = "`runner_unreachable`; `runner_unauthorized`: the runner refused the control plane's runner token.", body = ErrorBody),
        (status = 504, description = "`runner_timeout`.", body = ErrorBody)))]
#[allow(dead_code)]
fn files_put() {}

/// Delete a file or directory
#[utoipa::path(delete, path = "/api/v1/sandboxes/{id}/files/{path}", tag = "files",
    params(("id" = String, Path, description = "The sandbox id."),
        ("path" = String, Path, description = "The sandbox path without its leading slash."),
        ("recursive" = Option<bool>, Query, description = "Delete a directory with its content.")),
    responses(
        (status = 204, description = "Deleted."),
        (status = 400, description = "`invalid_path`, `invalid_request`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`, `file_not_found`.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running`, `directory_not_empty`.", body = ErrorBody),
        (status = 502, description = "`runner_unreachable`; `runner_unauthorized`: the runner refused the control plane's runner token.", body = ErrorBody),
        (status = 504, description = "`runner_timeout`.", body = ErrorBody)))]
#[allow(dead_code)]
fn files_delete() {}

/// Download a directory as a zip (or tar)
#[utoipa::path(get, path = "/api/v1/sandboxes/{id}/archive", tag = "files",
    params(("id" = String, Path, description = "The sandbox id."),
        ("path" = Option<String>, Query, description = "A sandbox directory, default `/workspace`."),
        ("format" = Option<ArchiveFormat>, Query, description = "`zip` (default) or `tar`.")),
    responses(
        (status = 200, description = "The archive, streamed as it is built.",
            content((String = "application/zip"), (String = "application/x-tar"))),
        (status = 400, description = "`invalid_path`, `not_a_directory`, `invalid_request`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`, `file_not_found`.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running`.", body = ErrorBody),
        (status = 502, description = "`runner_unreachable`; `runner_unauthorized`: the runner refused the control plane's runner token.", body = ErrorBody),
        (status = 504, description = "`runner_timeout`.", body = ErrorBody)))]
#[allow(dead_code)]
fn archive() {}

/// The sandbox's configured agents
///
/// Passed to the runner's `GET /v1/agents`: every agent by name (`default` is the
/// `entrypoint`), with an ACP agent's advertised capabilities once it has started.
#[utoipa::path(get, path = "/api/v1/sandboxes/{id}/agents", tag = "configure",
    params(("id" = String, Path, description = "The sandbox id.")),
    responses(
        (status = 200, description = "The agents.", body = AgentList),
        (status = 404, description = "`sandbox_not_found`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running`.", body = ErrorBody),
        (status = 502, description = "`runner_unreachable`; `runner_unauthorized`: the runner refused the control plane's runner token.", body = ErrorBody),
        (status = 504, description = "`runner_timeout`.", body = ErrorBody)))]
#[allow(dead_code)]
fn agents_list() {}

/// Create a session in the sandbox
#[utoipa::path(post, path = "/api/v1/sandboxes/{id}/sessions", tag = "sessions",
    params(("id" = String, Path, description = "The sandbox id.")),
    request_body(content = CreateSessionRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "Created.", body = SessionInfo),
        (status = 400, description = "`invalid_session_id`, `invalid_request` (also: an `agent` that is not configured, bad `mcpServers`).", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running`, `session_exists`.", body = ErrorBody),
        (status = 502, description = "`runner_unreachable`; `runner_unauthorized`: the runner refused the control plane's runner token.", body = ErrorBody),
        (status = 504, description = "`runner_timeout`.", body = ErrorBody)))]
#[allow(dead_code)]
fn sessions_create() {}

/// Sessions, oldest first, a page at a time
#[utoipa::path(get, path = "/api/v1/sandboxes/{id}/sessions", tag = "sessions",
    params(("id" = String, Path, description = "The sandbox id."),
        ("offset" = Option<u64>, Query, description = "Sessions to skip."),
        ("limit" = Option<u64>, Query, description = "Page size, 1 to 1000 (default 100).")),
    responses(
        (status = 200, description = "One page.", body = SessionList),
        (status = 400, description = "`invalid_request`.", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running`.", body = ErrorBody),
        (status = 502, description = "`runner_unreachable`; `runner_unauthorized`: the runner refused the control plane's runner token.", body = ErrorBody),
        (status = 504, description = "`runner_timeout`.", body = ErrorBody)))]
#[allow(dead_code)]
fn sessions_list() {}

/// One session
#[utoipa::path(get, path = "/api/v1/sandboxes/{id}/sessions/{sid}", tag = "sessions",
    params(("id" = String, Path, description = "The sandbox id."), ("sid" = String, Path, description = "The session id.")),
    responses(
        (status = 200, description = "The session.", body = SessionInfo),
        (status = 400, description = "`invalid_session_id`.", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`, `session_not_found`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running`.", body = ErrorBody),
        (status = 502, description = "`runner_unreachable`; `runner_unauthorized`: the runner refused the control plane's runner token.", body = ErrorBody),
        (status = 504, description = "`runner_timeout`.", body = ErrorBody)))]
#[allow(dead_code)]
fn sessions_get() {}

/// Delete a session, its history and its directory
#[utoipa::path(delete, path = "/api/v1/sandboxes/{id}/sessions/{sid}", tag = "sessions",
    params(("id" = String, Path, description = "The sandbox id."), ("sid" = String, Path, description = "The session id.")),
    responses(
        (status = 204, description = "Deleted."),
        (status = 400, description = "`invalid_session_id`.", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`, `session_not_found`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running`, `session_busy`.", body = ErrorBody),
        (status = 502, description = "`runner_unreachable`; `runner_unauthorized`: the runner refused the control plane's runner token.", body = ErrorBody),
        (status = 504, description = "`runner_timeout`.", body = ErrorBody)))]
#[allow(dead_code)]
fn sessions_delete() {}

/// A session's history
///
/// A JSON page by default; with `Accept: text/event-stream`, followed live (resumable with
/// `Last-Event-ID`).
#[utoipa::path(get, path = "/api/v1/sandboxes/{id}/sessions/{sid}/events", tag = "sessions",
    params(("id" = String, Path, description = "The sandbox id."), ("sid" = String, Path, description = "The session id."),
        ("offset" = Option<u64>, Query, description = "Events with `eventIndex` greater than this."),
        ("limit" = Option<u64>, Query, description = "Page size, 1 to 1000 (default 100)."),
        ("Last-Event-ID" = Option<String>, Header, description = "For the event stream: resume after this `eventIndex`.")),
    responses(
        (status = 200, description = "A page of the history, or the history as Server-Sent Events.",
            content((SessionEventPage = "application/json"), (String = "text/event-stream"))),
        (status = 400, description = "`invalid_request`, `invalid_session_id`.", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`, `session_not_found`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running`.", body = ErrorBody),
        (status = 502, description = "`runner_unreachable`; `runner_unauthorized`: the runner refused the control plane's runner token.", body = ErrorBody),
        (status = 504, description = "`runner_timeout`.", body = ErrorBody)))]
#[allow(dead_code)]
fn sessions_events() {}

/// Set an ACP agent's session config (mode, model, thought level, options)
#[utoipa::path(put, path = "/api/v1/sandboxes/{id}/sessions/{sid}/config", tag = "sessions",
    params(("id" = String, Path, description = "The sandbox id."), ("sid" = String, Path, description = "The session id.")),
    request_body(content = SessionConfigRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The session with its ACP state after the changes (`acp`).", body = SessionInfo),
        (status = 400, description = "`invalid_request`, `invalid_session_id`.", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`, `session_not_found`.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`.", body = ErrorBody),
        (status = 424, description = "`agent_failed`: the configured ACP agent could not be started or initialized.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running`.", body = ErrorBody),
        (status = 502, description = "`runner_unreachable`; `runner_unauthorized`: the runner refused the control plane's runner token.", body = ErrorBody),
        (status = 504, description = "`runner_timeout`.", body = ErrorBody)))]
#[allow(dead_code)]
fn sessions_config() {}

/// Answer a permission request in a session
#[utoipa::path(post, path = "/api/v1/sandboxes/{id}/sessions/{sid}/permissions/{pid}", tag = "sessions",
    params(("id" = String, Path, description = "The sandbox id."), ("sid" = String, Path, description = "The session id."), ("pid" = String, Path, description = "The `permissionId` of the `permission` event.")),
    request_body(content = PermissionReplyRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The reply was written to the agent.", body = PermissionReplyResponse),
        (status = 400, description = "`invalid_request`, `invalid_session_id`.", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`, `session_not_found`, `permission_not_found`.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running`, `permission_answered`.", body = ErrorBody),
        (status = 502, description = "`runner_unreachable`; `runner_unauthorized`: the runner refused the control plane's runner token.", body = ErrorBody),
        (status = 504, description = "`runner_timeout`.", body = ErrorBody)))]
#[allow(dead_code)]
fn sessions_permission() {}

/// Answer a permission request of an invoke
#[utoipa::path(post, path = "/api/v1/sandboxes/{id}/invokes/{iid}/permissions/{pid}", tag = "invokes",
    params(("id" = String, Path, description = "The sandbox id."), ("iid" = String, Path, description = "The invoke id (`inv-…`)."), ("pid" = String, Path, description = "The `permissionId` of the `permission` event.")),
    request_body(content = PermissionReplyRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The reply was written to the agent.", body = PermissionReplyResponse),
        (status = 400, description = "`invalid_request`.", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`, `permission_not_found`.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running`, `permission_answered`.", body = ErrorBody),
        (status = 502, description = "`runner_unreachable`; `runner_unauthorized`: the runner refused the control plane's runner token.", body = ErrorBody),
        (status = 504, description = "`runner_timeout`.", body = ErrorBody)))]
#[allow(dead_code)]
fn invokes_permission() {}

/// List forwarded ports
///
/// The runner's table, each `http` port with its `previewUrl` (from the request's `Host`, or
/// `X-Forwarded-Host` and `X-Forwarded-Proto`).
#[utoipa::path(get, path = "/api/v1/sandboxes/{id}/ports", tag = "ports",
    params(("id" = String, Path, description = "The sandbox id.")),
    responses((status = 200, description = "`{\"ports\": [{port, protocol, previewUrl, internalUrl}]}`.", body = PortList),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running`.", body = ErrorBody),
        (status = 502, description = "`runner_unreachable`; `runner_unauthorized`.", body = ErrorBody),
        (status = 504, description = "`runner_timeout`.", body = ErrorBody)))]
#[allow(dead_code)]
fn ports_list() {}

/// Forward a port
///
/// Kept by the sandbox's runner across its restarts; nothing needs to listen yet. `protocol`:
/// `http` (default) or `tcp` (tunnel only, no `previewUrl`). At most 64 ports per sandbox.
#[utoipa::path(post, path = "/api/v1/sandboxes/{id}/ports", tag = "ports",
    params(("id" = String, Path, description = "The sandbox id.")),
    request_body(content = PortRequest, content_type = "application/json"),
    responses((status = 201, description = "Forwarded.", body = ForwardedPort),
        (status = 200, description = "It was forwarded already.", body = ForwardedPort),
        (status = 400, description = "`invalid_port`: outside 1-65535; `invalid_request`: a bad body or protocol.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running`; `too_many_ports`.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: over 4 KiB.", body = ErrorBody),
        (status = 502, description = "`runner_unreachable`; `runner_unauthorized`.", body = ErrorBody),
        (status = 504, description = "`runner_timeout`.", body = ErrorBody)))]
#[allow(dead_code)]
fn ports_forward() {}

/// Stop forwarding a port
///
/// Tunnels already open (a preview response streaming, a port-forward connection) stay until
/// they end.
#[utoipa::path(delete, path = "/api/v1/sandboxes/{id}/ports/{port}", tag = "ports",
    params(("id" = String, Path, description = "The sandbox id."),
        ("port" = u16, Path, description = "The port, 1-65535.")),
    responses((status = 204, description = "No longer forwarded."),
        (status = 400, description = "`invalid_port`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`, `port_not_forwarded`.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running`.", body = ErrorBody),
        (status = 502, description = "`runner_unreachable`; `runner_unauthorized`.", body = ErrorBody),
        (status = 504, description = "`runner_timeout`.", body = ErrorBody)))]
#[allow(dead_code)]
fn ports_remove() {}

/// A raw TCP tunnel to a forwarded port
///
/// An HTTP/1.1 upgrade: send `Connection: upgrade` and `Upgrade: agentbox-tcp`. The answer is
/// 101 once the sandbox's runner is connected to the port (127.0.0.1, then ::1); then the
/// connection carries the port's bytes both ways. `agentbox port-forward` opens one per local
/// connection. At most 256 tunnels and preview requests are open per sandbox. Where the runner
/// listens on a unix socket on this host (an isolated local sandbox, a Docker sandbox without
/// a network), it hands the connection itself to the control plane, and the bytes skip it.
#[utoipa::path(get, path = "/api/v1/sandboxes/{id}/ports/{port}/tunnel", tag = "ports",
    params(("id" = String, Path, description = "The sandbox id."),
        ("port" = u16, Path, description = "The port, 1-65535.")),
    responses((status = 101, description = "Connected: raw bytes follow."),
        (status = 400, description = "`invalid_port`; `invalid_request`: not an `agentbox-tcp` upgrade.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`, `port_not_forwarded`.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running`.", body = ErrorBody),
        (status = 502, description = "`port_unreachable`: nothing listens on the port; `runner_unreachable`; `runner_unauthorized`.", body = ErrorBody),
        (status = 503, description = "`too_many_tunnels`: 256 connections to the sandbox's ports are open (in its runner, or handed over to this control plane).", body = ErrorBody),
        (status = 504, description = "`runner_timeout`.", body = ErrorBody)))]
#[allow(dead_code)]
fn ports_tunnel() {}

/// The preview proxy
///
/// Any method (described here as GET). Sent to the sandbox's server on the forwarded port as
/// `/{path}?{query}` over HTTP/1.1, bodies streamed both ways; a WebSocket (any `Upgrade`) is
/// spliced through after the server's 101. `Authorization`, `X-API-Key` and
/// `Proxy-Authorization` are removed; `Host` is `localhost:PORT`, with `X-Forwarded-Host` and
/// `X-Forwarded-Prefix`. Other answers are the server's own. `.../preview/{port}` without the
/// slash redirects (308) to it.
#[utoipa::path(get, path = "/api/v1/sandboxes/{id}/preview/{port}/{path}", tag = "ports",
    params(("id" = String, Path, description = "The sandbox id."),
        ("port" = u16, Path, description = "A forwarded port, 1-65535."),
        ("path" = String, Path, description = "The path on the sandbox's server, without its leading slash (may be empty).")),
    responses((status = 200, description = "The sandbox's server's answer, whatever its status.", content_type = "application/octet-stream", body = String),
        (status = 101, description = "A WebSocket (or other upgrade) the server accepted."),
        (status = 400, description = "`invalid_port`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`, `port_not_forwarded`.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running`.", body = ErrorBody),
        (status = 502, description = "`port_unreachable`: nothing listens; `runner_unreachable`: the server did not answer.", body = ErrorBody),
        (status = 503, description = "`too_many_tunnels`: 256 connections to the sandbox's ports are open (in its runner, or handed over to this control plane).", body = ErrorBody),
        (status = 504, description = "`runner_timeout`.", body = ErrorBody)))]
#[allow(dead_code)]
fn preview() {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every event stream is described event by event (schemathesis found streams described as
    /// one string), and the committed `openapi.json` is what the code generates
    /// (`UPDATE_OPENAPI=1` rewrites it).
    #[test]
    fn openapi_json_is_current_and_streams_are_described_per_event() {
        let committed = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json"));
        agentbox_testkit::check_openapi(document(), committed, 4);
    }
}

/// Start a process
///
/// Passed to the runner's `POST /v1/processes`: a long-lived process (`argv` or `command`,
/// `env`, `cwd`, optional `pty: {cols, rows}`, `tag`, `timeout`). It keeps running when the
/// caller goes away and counts against the runner's concurrency cap. Audited as
/// `processes.start` (never its argv).
#[utoipa::path(post, path = "/api/v1/sandboxes/{id}/processes", tag = "processes",
    params(("id" = String, Path, description = "The sandbox id.")),
    request_body(content = agentbox_proto::ProcessRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "Started.", body = agentbox_proto::ProcessSummary),
        (status = 400, description = "`invalid_request`, `invalid_timeout`, `invalid_path`, `not_a_directory`.", body = ErrorBody),
        (status = 429, description = "`concurrency_exceeded`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`; `process_not_found`.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running`; `process_exited`.", body = ErrorBody),
        (status = 502, description = "`runner_unreachable`; `runner_unauthorized`.", body = ErrorBody),
        (status = 504, description = "`runner_timeout`.", body = ErrorBody)))]
#[allow(dead_code)]
fn processes_start() {}

/// Running and recent processes
#[utoipa::path(get, path = "/api/v1/sandboxes/{id}/processes", tag = "processes",
    params(("id" = String, Path, description = "The sandbox id.")),
    responses((status = 200, description = "Newest first.", body = agentbox_proto::ProcessList),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`; `process_not_found`.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running`; `process_exited`.", body = ErrorBody),
        (status = 502, description = "`runner_unreachable`; `runner_unauthorized`.", body = ErrorBody),
        (status = 504, description = "`runner_timeout`.", body = ErrorBody)))]
#[allow(dead_code)]
fn processes_list() {}

/// One process
#[utoipa::path(get, path = "/api/v1/sandboxes/{id}/processes/{pid}", tag = "processes",
    params(("id" = String, Path, description = "The sandbox id."), ("pid" = String, Path, description = "The process id.")),
    responses((status = 200, description = "The process.", body = agentbox_proto::ProcessSummary),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`; `process_not_found`.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running`; `process_exited`.", body = ErrorBody),
        (status = 502, description = "`runner_unreachable`; `runner_unauthorized`.", body = ErrorBody),
        (status = 504, description = "`runner_timeout`.", body = ErrorBody)))]
#[allow(dead_code)]
fn processes_get() {}

/// Kill a process and its whole tree
#[utoipa::path(delete, path = "/api/v1/sandboxes/{id}/processes/{pid}", tag = "processes",
    params(("id" = String, Path, description = "The sandbox id."), ("pid" = String, Path, description = "The process id.")),
    responses((status = 200, description = "The exited process (reason `canceled`).", body = agentbox_proto::ProcessSummary),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`; `process_not_found`.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running`; `process_exited`.", body = ErrorBody),
        (status = 502, description = "`runner_unreachable`; `runner_unauthorized`.", body = ErrorBody),
        (status = 504, description = "`runner_timeout`.", body = ErrorBody)))]
#[allow(dead_code)]
fn processes_kill() {}

/// Write to a process's stdin
///
/// The body's bytes (at most 1 MiB); `?close=true` closes stdin after them (on a terminal:
/// `^D`). Never audited beyond the action name.
#[utoipa::path(post, path = "/api/v1/sandboxes/{id}/processes/{pid}/stdin", tag = "processes",
    params(("id" = String, Path, description = "The sandbox id."), ("pid" = String, Path, description = "The process id."),
        ("close" = Option<bool>, Query, description = "Close stdin after the body.")),
    request_body(content = String, content_type = "application/octet-stream"),
    responses((status = 204, description = "Written."),
        (status = 400, description = "`invalid_request`: a bad `close` value.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`; `process_not_found`.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running`; `process_exited`.", body = ErrorBody),
        (status = 502, description = "`runner_unreachable`; `runner_unauthorized`.", body = ErrorBody),
        (status = 504, description = "`runner_timeout`.", body = ErrorBody)))]
#[allow(dead_code)]
fn processes_stdin() {}

/// Send a signal
#[utoipa::path(post, path = "/api/v1/sandboxes/{id}/processes/{pid}/signal", tag = "processes",
    params(("id" = String, Path, description = "The sandbox id."), ("pid" = String, Path, description = "The process id.")),
    request_body(content = agentbox_proto::SignalRequest, content_type = "application/json"),
    responses((status = 204, description = "Sent."),
        (status = 400, description = "`invalid_request`: an unknown signal.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`; `process_not_found`.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running`; `process_exited`.", body = ErrorBody),
        (status = 502, description = "`runner_unreachable`; `runner_unauthorized`.", body = ErrorBody),
        (status = 504, description = "`runner_timeout`.", body = ErrorBody)))]
#[allow(dead_code)]
fn processes_signal() {}

/// Resize a process's terminal
#[utoipa::path(post, path = "/api/v1/sandboxes/{id}/processes/{pid}/resize", tag = "processes",
    params(("id" = String, Path, description = "The sandbox id."), ("pid" = String, Path, description = "The process id.")),
    request_body(content = agentbox_proto::PtySize, content_type = "application/json"),
    responses((status = 204, description = "Resized."),
        (status = 400, description = "`not_a_terminal`; `invalid_request`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`; `process_not_found`.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running`; `process_exited`.", body = ErrorBody),
        (status = 502, description = "`runner_unreachable`; `runner_unauthorized`.", body = ErrorBody),
        (status = 504, description = "`runner_timeout`.", body = ErrorBody)))]
#[allow(dead_code)]
fn processes_resize() {}

/// Wait for a process to exit
#[utoipa::path(post, path = "/api/v1/sandboxes/{id}/processes/{pid}/wait", tag = "processes",
    params(("id" = String, Path, description = "The sandbox id."), ("pid" = String, Path, description = "The process id."),
        ("timeout" = Option<String>, Query, description = "How long to wait (default and at most `5m`).")),
    responses((status = 200, description = "The process, exited unless the wait timed out.", body = agentbox_proto::ProcessSummary),
        (status = 400, description = "`invalid_timeout`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`; `process_not_found`.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running`; `process_exited`.", body = ErrorBody),
        (status = 502, description = "`runner_unreachable`; `runner_unauthorized`.", body = ErrorBody),
        (status = 504, description = "`runner_timeout`.", body = ErrorBody)))]
#[allow(dead_code)]
fn processes_wait() {}

/// A process's events
///
/// `start`, `log`…, `exit` as Server-Sent Events after `Last-Event-ID` (as an invoke's).
#[utoipa::path(get, path = "/api/v1/sandboxes/{id}/processes/{pid}/events", tag = "processes",
    params(("id" = String, Path, description = "The sandbox id."), ("pid" = String, Path, description = "The process id."),
        ("after" = Option<u64>, Query, description = "Replay events with ids greater than this."),
        ("Last-Event-ID" = Option<String>, Header, description = "As `after`; wins over it.")),
    responses((status = 200, description = "Server-Sent Events.", content_type = "text/event-stream", body = String),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`; `process_not_found`.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running`; `process_exited`.", body = ErrorBody),
        (status = 502, description = "`runner_unreachable`; `runner_unauthorized`.", body = ErrorBody),
        (status = 504, description = "`runner_timeout`.", body = ErrorBody)))]
#[allow(dead_code)]
fn processes_events() {}

/// Open a terminal (the seed's path)
///
/// As `GET /api/v1/sandboxes/{id}/terminal`.
#[utoipa::path(get, path = "/ws/terminal/{id}", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox name."),
        ("ticket" = Option<String>, Query, description = "A ticket from `POST .../terminal/ticket`, instead of headers.")),
    responses((status = 101, description = "Switching to the WebSocket protocol."),
        (status = 400, description = "`invalid_request`: not a WebSocket upgrade; the runner's 400s.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`; `process_not_found`.", body = ErrorBody),
        (status = 409, description = "`sandbox_not_running`; `process_exited`.", body = ErrorBody),
        (status = 502, description = "`runner_unreachable`; `runner_unauthorized`.", body = ErrorBody),
        (status = 504, description = "`runner_timeout`.", body = ErrorBody)))]
#[allow(dead_code)]
fn ws_terminal() {}
