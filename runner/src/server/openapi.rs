//! The runner's OpenAPI description, generated from the code: schemas from the wire types
//! (`ToSchema` derives in `agentbox-proto` and here), operations from the `#[utoipa::path]`
//! annotations on the handlers, the overview from `runner/openapi-intro.md`. `GET /openapi.json`
//! serves it; `runner/openapi.json` is a committed copy that a test keeps current (regenerate it
//! with `UPDATE_OPENAPI=1 cargo test -p agentbox-runner --lib openapi`).

use std::sync::OnceLock;

use agentbox_proto::{
    AcpSessionState, AgentEvent, AgentInfo, AgentList, AgentSpec, AutoReply, CancelRequest,
    CancelResponse, ConfigureRequest, ConfigureResult, CreateSessionRequest, ErrorBody, ErrorEvent,
    ExecRequest, ExitEvent, ForwardedPort, Health, Info, InvokeList, InvokeResponse, InvokeSummary,
    LogEvent, PermissionEvent, PermissionOption, PermissionReply, PermissionReplyEvent,
    PermissionReplyRequest, PermissionReplyResponse, PortList, PortRequest, ProcessList,
    ProcessRequest, ProcessSummary, PromptEvent, ProtocolErrorEvent, PtySize, ReplyOrigin, Sender,
    SessionConfigRequest, SessionEvent, SessionEventPage, SessionInfo, SessionList, SignalRequest,
    StartEvent, TruncatedEvent,
};
use serde_json::{json, Value};
use utoipa::OpenApi;

use crate::files::{Entry, Format, Listing, Written};
use crate::invoke::{OnDisconnect, StreamMode};

#[derive(OpenApi)]
#[openapi(
    info(title = "agentbox runner API", description = include_str!("../../openapi-intro.md")),
    paths(
        super::healthz,
        super::openapi,
        super::info,
        super::configure_sandbox,
        super::invoke,
        super::cancel_invoke_by_body,
        super::list_invokes,
        super::get_invoke,
        super::stream_events,
        super::cancel_invoke,
        super::exec,
        super::files::list_files,
        super::files::read_file,
        super::files::write_file,
        super::files::delete_file,
        super::files::archive,
        super::agents::list_agents,
        super::sessions::create,
        super::sessions::list,
        super::sessions::get_one,
        super::sessions::delete,
        super::sessions::events,
        super::sessions::set_config,
        super::sessions::reply_in_session,
        super::sessions::reply_in_invoke,
        super::ports::list_ports,
        super::ports::forward_port,
        super::ports::remove_port,
        super::ports::open_tunnel,
        super::processes::start_process,
        super::processes::list_processes,
        super::processes::get_process,
        super::processes::kill_process,
        super::processes::write_stdin,
        super::processes::signal_process,
        super::processes::resize_process,
        super::processes::wait_process,
        super::processes::process_events,
        super::processes::open_terminal,
        super::processes::attach_terminal,
    ),
    components(schemas(
        ForwardedPort, PortList, PortRequest,
        ErrorBody, Health, Info, ConfigureRequest, ConfigureResult, StartEvent, LogEvent,
        ExitEvent, ErrorEvent, TruncatedEvent, InvokeResponse, CancelRequest, CancelResponse,
        InvokeSummary, InvokeList, ExecRequest, OnDisconnect, StreamMode, Format, Entry, Listing, Written,
        CreateSessionRequest, SessionInfo, SessionList, SessionEvent, SessionEventPage, Sender,
        AgentEvent, PermissionEvent, PermissionReply, PermissionReplyEvent, ReplyOrigin,
        ProtocolErrorEvent, PromptEvent, SessionConfigRequest, PermissionReplyRequest,
        PermissionReplyResponse, AgentInfo, AgentList, AgentSpec, AcpSessionState,
        PermissionOption, AutoReply, ProcessRequest, ProcessSummary, ProcessList, PtySize,
        SignalRequest,
    )),
    tags(
        (name = "meta", description = "Health, runner information and this document."),
        (name = "configure", description = "Files, install command, entrypoint and environment."),
        (name = "invokes", description = "Running the entrypoint, following, reattaching and canceling."),
        (name = "exec", description = "Ad-hoc commands, journaled like invokes; available in both modes."),
        (name = "ports", description = "Forwarded ports: the table, and tunnels (an HTTP/1.1 upgrade to raw TCP) to them."),
        (name = "sessions", description = "Sessions: a persistent history and directory across invokes, permission replies, ACP session config."),
        (name = "processes", description = "Long-lived processes: stdin, signals, pseudo-terminals, resize, wait, kill; the terminal WebSocket."),
        (name = "files", description = "Listing, downloading, uploading and deleting workspace files, and archives; available in both modes."),
    )
)]
struct ApiDoc;

/// The description as pretty-printed JSON (what `GET /openapi.json` answers).
pub(super) fn document() -> &'static str {
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

/// What the derive does not express: version, license, server, the security scheme.
fn finish(doc: &mut Value) {
    doc["info"]["version"] = json!(env!("CARGO_PKG_VERSION"));
    doc["info"]["summary"] = json!(
        "Configure an agent inside a sandbox, invoke it, and stream its output as Server-Sent Events."
    );
    doc["info"]["license"] = json!({"name": "Apache-2.0", "identifier": "Apache-2.0"});
    if let Some(info) = doc["info"].as_object_mut() {
        info.remove("contact");
    }
    doc["servers"] = json!([{
        "url": "http://{host}:{port}",
        "description": "A runner; it listens on 0.0.0.0:8421 unless started with --listen.",
        "variables": {"host": {"default": "127.0.0.1"}, "port": {"default": "8421"}},
    }]);
    doc["security"] = json!([{"bearerAuth": []}]);
    doc["components"]["securitySchemes"] = json!({"bearerAuth": {
        "type": "http",
        "scheme": "bearer",
        "description": "`Authorization: Bearer <token>` with the runner's token. The scheme must be \
            spelled `Bearer` or `bearer`; whitespace around the token is ignored. Tokens are \
            compared in constant time. A runner started with `--insecure-no-auth` does not check it.",
    }});
}

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
