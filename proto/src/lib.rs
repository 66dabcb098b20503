//! Wire types shared by the agentbox runner, control plane and CLI.
//!
//! This crate does no I/O: it only describes the JSON bodies and Server-Sent Event payloads that
//! cross the network, in camelCase as they appear on the wire.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

/// SSE event names used on `/v1/invoke`, `/v1/configure` and `/v1/invokes/{id}/events`.
pub mod event {
    /// The process started: [`super::StartEvent`].
    pub const START: &str = "start";
    /// One line (or partial fragment) of output: [`super::LogEvent`].
    pub const LOG: &str = "log";
    /// The process ended; always the last event of an invoke: [`super::ExitEvent`].
    pub const EXIT: &str = "exit";
    /// Something went wrong outside the process: [`super::ErrorEvent`].
    pub const ERROR: &str = "error";
    /// Output past the journal cap was counted, not stored: [`super::TruncatedEvent`].
    pub const TRUNCATED: &str = "truncated";
    /// The outcome of a configure; the last event of a configure stream: [`super::ConfigureResult`].
    pub const RESULT: &str = "result";
}

/// The JSON error body every agentbox server answers with: `{"error": "<code>", "message": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// A stable, machine-readable code such as `invalid_path` or `concurrency_exceeded`.
    pub error: String,
    /// A human-readable explanation.
    pub message: String,
    /// For `concurrency_exceeded`: the configured cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// For `concurrency_exceeded`: how many invokes were running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inflight: Option<u64>,
}

/// Identifies one invoke (or exec) on a runner, e.g. `inv-0193c2a4f1b2-9f3e2a71c4d0b8e6`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(transparent)]
pub struct InvokeId(pub String);

impl InvokeId {
    /// Whether the text has the shape the runner gives ids (`inv-` and `[0-9a-f-]`), so that an
    /// id taken from a URL is safe to use as a file name.
    pub fn is_well_formed(text: &str) -> bool {
        text.len() <= 64
            && text.starts_with("inv-")
            && text[4..]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b'-')
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for InvokeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One file to place in the workspace during configure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FileSpec {
    /// Relative to the workspace, or absolute inside it (`/workspace/...` always names the workspace).
    pub path: String,
    /// UTF-8 content. Exactly one of `content` and `contentBase64` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Base64 (standard alphabet) content, for binary files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_base64: Option<String>,
    /// Unix permission bits, as a number (`493`) or an octal string (`"0755"`). Default `0644`.
    #[serde(
        default,
        deserialize_with = "de_mode",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<FileMode>)]
    pub mode: Option<u32>,
}

/// How a file mode may be written (the schema of [`FileSpec::mode`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
#[serde(untagged)]
pub enum FileMode {
    /// Permission bits as a number, e.g. `493`.
    Number(u32),
    /// Octal text, e.g. `"0755"`.
    Octal(String),
}

fn de_mode<'de, D: Deserializer<'de>>(de: D) -> Result<Option<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Mode {
        Number(u32),
        Text(String),
    }
    match Option::<Mode>::deserialize(de)? {
        None => Ok(None),
        Some(Mode::Number(n)) => Ok(Some(n)),
        Some(Mode::Text(t)) => {
            let digits = t.trim_start_matches("0o");
            u32::from_str_radix(digits, 8)
                .map(Some)
                .map_err(|_| serde::de::Error::custom(format!("mode {t:?} is not an octal number")))
        }
    }
}

/// `POST /v1/configure` body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigureRequest {
    /// Files to write into the workspace before the install command runs.
    #[serde(default)]
    pub files: Vec<FileSpec>,
    /// The install command as an argv array, run in the workspace once per distinct configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install_command: Option<Vec<String>>,
    /// The entrypoint argv; required unless one is already configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// Environment for the install command and every invoke; replaces the previous map when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// How the runner talks to the entrypoint: `plain` (stdin/stdout, the default) or `acp`
    /// (an Agent Client Protocol agent, one process per session). Kept until the next configure
    /// that gives an entrypoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<AgentProtocol>,
    /// Named agents (names as session ids: 1 to 128 of `A-Z a-z 0-9 . _ -`), beside or instead
    /// of `entrypoint` (which is the agent named `default`); replaces the previous map when
    /// given. A session picks one with `POST /v1/sessions {agent}`. One install covers them all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agents: Option<BTreeMap<String, AgentSpec>>,
    /// The agent of sessions that name none and of invokes outside a session; kept until the
    /// next configure that gives `agents`. Defaults to `default` (the `entrypoint`) when there
    /// is one, else to the only agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_agent: Option<String>,
    /// MCP servers passed to every ACP agent's `session/new` and `session/load` (ACP's
    /// `McpServer`: `{name, command, args, env: [{name, value}]}` for stdio, `{type: "http" |
    /// "sse", name, url, headers: [{name, value}]}`); replaces the previous list when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub mcp_servers: Option<Vec<serde_json::Value>>,
}

/// One named agent of `configure {"agents": {...}}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentSpec {
    /// Its argv.
    pub entrypoint: Vec<String>,
    /// `plain` (the default) or `acp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<AgentProtocol>,
    /// Environment on top of the configuration's `env`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// MCP servers for this agent's ACP sessions, after the configuration's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub mcp_servers: Option<Vec<serde_json::Value>>,
}

/// One agent, as `GET /v1/agents` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentInfo {
    /// Its name (`default` for the configuration's `entrypoint`).
    pub name: String,
    /// Its argv.
    pub entrypoint: Vec<String>,
    /// How the runner talks to it.
    pub protocol: AgentProtocol,
    /// Whether sessions that name no agent get this one.
    pub default: bool,
    /// An ACP agent's `agentCapabilities` from its last `initialize`, once one has started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<serde_json::Value>,
    /// An ACP agent's `agentInfo` from its last `initialize`, if it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_info: Option<serde_json::Value>,
}

/// `GET /v1/agents` answer, by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentList {
    /// The configured agents.
    pub items: Vec<AgentInfo>,
}

/// How the runner talks to the entrypoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AgentProtocol {
    /// One process per invoke: the prompt on stdin, output as `log` events.
    #[default]
    Plain,
    /// An ACP agent (JSON-RPC over stdio), one process per session; each invoke is a prompt turn.
    Acp,
}

/// The `result` event of a configure, or its whole JSON answer with `Accept: application/json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigureResult {
    /// sha256 (hex) over the files and the install command of this request.
    pub install_command_hash: String,
    /// The install command's exit code (0 when skipped or when there is none).
    pub install_exit_code: i32,
    /// True when the hash equalled the last successful install: nothing was written or run.
    pub skipped: bool,
    /// The entrypoint now in force (the default agent's).
    pub entrypoint: Vec<String>,
    /// The named agents now in force (with `default` for the `entrypoint`), when there are
    /// several or any named ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<String>,
    /// The default agent's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_agent: Option<String>,
    /// When the configuration in force was last set (RFC 3339).
    pub last_configured_at: String,
    /// How long this configure took.
    pub duration_ms: u64,
}

/// `start` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StartEvent {
    /// The invoke's id, for reattaching and canceling.
    pub invoke_id: InvokeId,
    /// Milliseconds since the Unix epoch.
    pub started_at: u64,
}

/// Which output stream a `log` event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// The process's standard output.
    Stdout,
    /// The process's standard error.
    Stderr,
}

impl Stream {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// `log` event: one line of output without its newline, or a fragment with `partial: true`.
///
/// The exact bytes are the decoded `dataBase64` when present (the bytes are not UTF-8), else
/// `data`, followed by a newline unless `partial` is true. `data` is always present: for bytes
/// that are not UTF-8 it is their lossy text (U+FFFD for each invalid sequence).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LogEvent {
    /// `stdout` or `stderr`.
    pub stream: Stream,
    /// The line as text; lossy (U+FFFD) when it is not valid UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// The line's exact bytes as base64, only when they are not valid UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_base64: Option<String>,
    /// True when no newline followed these bytes.
    #[serde(default, skip_serializing_if = "is_false")]
    pub partial: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Why an invoke ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExitReason {
    /// The process exited by itself.
    Completed,
    /// The invoke's timeout elapsed and the process tree was stopped.
    Timeout,
    /// A caller canceled the invoke (or the disconnect policy did).
    Canceled,
    /// The process could not be started or supervised.
    Error,
    /// The runner died while the invoke ran; found at the next start.
    RunnerRestarted,
    /// The sandbox's memory limit was reached and the kernel killed the process (SIGKILL).
    MemoryLimit,
}

impl ExitReason {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ExitReason::Completed => "completed",
            ExitReason::Timeout => "timeout",
            ExitReason::Canceled => "canceled",
            ExitReason::Error => "error",
            ExitReason::RunnerRestarted => "runner_restarted",
            ExitReason::MemoryLimit => "memory_limit",
        }
    }
}

/// `exit` event: always the last event of an invoke.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExitEvent {
    /// The invoke's id.
    pub invoke_id: InvokeId,
    /// The exit code; `128 + N` when killed by signal N; `-1` when unknown.
    pub exit_code: i32,
    /// The signal that killed the process, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Wall time from spawn to exit.
    pub duration_ms: u64,
    /// Why it ended.
    pub reason: ExitReason,
}

/// `error` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorEvent {
    /// Where it happened, e.g. `install` or `spawn`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// What happened.
    pub message: String,
}

/// `truncated` event: the journal cap was reached and output past it was counted, not stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TruncatedEvent {
    /// Output bytes that were not stored.
    pub dropped_bytes: u64,
}

/// `POST /v1/invoke` answer with `Accept: application/json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InvokeResponse {
    /// The invoke's id.
    pub invoke_id: InvokeId,
    /// As in [`ExitEvent::exit_code`].
    pub exit_code: i32,
    /// As in [`ExitEvent::signal`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Wall time from spawn to exit.
    pub duration_ms: u64,
    /// Why it ended.
    pub reason: ExitReason,
    /// Standard output (invalid UTF-8 replaced by U+FFFD; use SSE for exact bytes), at most
    /// the runner's `--max-json-output` bytes.
    pub stdout: String,
    /// Standard error, likewise.
    pub stderr: String,
    /// Whether `stdout` was cut: at `--max-json-output`, or because the journal stopped storing
    /// output at `--journal-max-bytes`. The stored output stays readable over SSE
    /// (`GET /v1/invokes/{id}/events`).
    #[serde(default)]
    pub stdout_truncated: bool,
    /// Whether `stderr` was cut, likewise.
    #[serde(default)]
    pub stderr_truncated: bool,
}

/// `POST /v1/invoke/cancel` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CancelRequest {
    /// The invoke to cancel.
    pub invoke_id: InvokeId,
}

/// Answer to a cancel (202).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CancelResponse {
    /// The invoke being canceled.
    pub invoke_id: InvokeId,
    /// Always `canceling`: the `exit` event follows on the stream.
    pub status: String,
}

/// `POST /v1/ports` (runner) and `POST /api/v1/sandboxes/{id}/ports` body: forward a port of
/// the sandbox. `port` is read as any integer so that one outside 1–65535 gets a 400
/// `invalid_port`, not a deserialization error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortRequest {
    /// The port inside the sandbox (1–65535), on 127.0.0.1 or ::1.
    pub port: i64,
    /// `http` (the default: reachable through the preview proxy and the tunnel) or `tcp`
    /// (the tunnel only; no `previewUrl`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

/// A forwarded port (AgentTier's `ForwardedPort`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ForwardedPort {
    /// The port inside the sandbox.
    pub port: u16,
    /// `http` or `tcp`.
    pub protocol: String,
    /// The authenticated preview URL on the control plane (`http` ports; set by the control
    /// plane, absent in a runner's answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_url: Option<String>,
    /// The address inside the sandbox (`http://127.0.0.1:PORT`, `tcp://127.0.0.1:PORT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_url: Option<String>,
    /// When it was forwarded (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
}

/// `GET .../ports`: the forwarded ports, by port number.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PortList {
    /// The ports.
    pub ports: Vec<ForwardedPort>,
}

/// `POST /v1/exec` body: run an ad-hoc command (code mode's exec), journaled like an invoke.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecRequest {
    /// The command as an argv array. Exactly one of `argv` and `command` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
    /// A shell command, run by `/bin/sh -c`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Text given on stdin (then closed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Extra environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// Working directory, inside the workspace (default: the workspace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Seconds as a number, or a Go duration string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<ExecTimeout>,
}

/// An exec timeout: seconds, or a Go duration string such as `90s`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ExecTimeout {
    /// Seconds.
    Seconds(f64),
    /// A Go duration string.
    Text(String),
}

/// What started a run: the configured entrypoint, or an ad-hoc exec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum InvokeKind {
    /// `POST /v1/invoke`.
    #[default]
    Invoke,
    /// `POST /v1/exec`.
    Exec,
    /// `POST /v1/processes` (or a terminal's shell): long-lived, interactive.
    Process,
}

/// Whether an invoke is still running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum InvokeState {
    /// The process (tree) is running.
    Running,
    /// The process tree is gone; the `exit` event is written (or being written).
    Exited,
}

/// One entry of `GET /v1/invokes`, or the answer of `GET /v1/invokes/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InvokeSummary {
    /// The invoke's id.
    pub invoke_id: InvokeId,
    /// `invoke` or `exec`.
    #[serde(default)]
    pub kind: InvokeKind,
    /// Running or exited.
    pub state: InvokeState,
    /// Milliseconds since the Unix epoch.
    pub started_at: u64,
    /// Set once exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Set once exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<ExitReason>,
    /// Set once exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Sequence number of the last event written so far.
    pub last_event_id: u64,
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PtySize {
    /// Columns (1–1000).
    pub cols: u16,
    /// Rows (1–1000).
    pub rows: u16,
}

/// `POST /v1/processes` body: a long-lived process, optionally on a pseudo-terminal.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProcessRequest {
    /// The command as an argv array. Exactly one of `argv` and `command` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
    /// A shell command, run by `/bin/sh -c`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Extra environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// Working directory, inside the workspace (default: the workspace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Run on a pseudo-terminal of this size: stdin, stdout and stderr are the terminal, and
    /// all output is one stream (`stdout`). Without it, stdin is a pipe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<PtySize>,
    /// A label of the caller's, returned in summaries (at most 256 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// A time limit (seconds, or a Go duration string); none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<ExecTimeout>,
}

/// A process (`POST /v1/processes`, `GET /v1/processes[/{id}]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProcessSummary {
    /// The process's id (an invoke id: its events are `GET /v1/invokes/{id}/events` too).
    pub id: InvokeId,
    /// Running or exited.
    pub state: InvokeState,
    /// The root pid inside the sandbox, while known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// The terminal's size, for a process on a pseudo-terminal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<PtySize>,
    /// The caller's label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// The argv it was started with (not kept across a runner restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
    /// Milliseconds since the Unix epoch.
    pub started_at: u64,
    /// Set once exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Set once exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<ExitReason>,
    /// Set once exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Sequence number of the last event written so far.
    pub last_event_id: u64,
}

/// `GET /v1/processes` answer, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProcessList {
    /// Running and recent processes, newest first.
    pub processes: Vec<ProcessSummary>,
}

/// `POST /v1/processes/{id}/signal` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SignalRequest {
    /// A signal name (`SIGINT` or `INT`) or number.
    pub signal: serde_json::Value,
    /// Signal the whole process group instead of the root process only.
    #[serde(default)]
    pub group: bool,
}

/// `GET /v1/invokes` answer, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InvokeList {
    /// Recent invokes, newest first.
    pub invokes: Vec<InvokeSummary>,
}

/// `GET /healthz` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    /// Always `ok`.
    pub status: String,
}

/// The limits a runner enforces, reported by `/v1/info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// Invokes allowed to run at once; more get 429.
    pub max_concurrent_invokes: u64,
    /// Timeout of an invoke that asks for none.
    pub default_timeout_ms: u64,
    /// Upper bound on any requested timeout.
    pub max_timeout_ms: u64,
    /// Largest single file accepted by configure.
    pub max_file_bytes: u64,
    /// Largest sum of file sizes in one configure.
    pub max_total_bytes: u64,
    /// Most files in one configure.
    pub max_files: u64,
    /// Largest file accepted by `PUT /v1/files/{path}`.
    pub max_upload_bytes: u64,
    /// Output bytes stored per invoke journal.
    pub journal_max_bytes: u64,
}

/// `GET /v1/info` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Info {
    /// The runner's version.
    pub version: String,
    /// `agent` or `code`.
    pub mode: String,
    /// Whether an entrypoint (or a default agent) is configured.
    pub configured: bool,
    /// Hash of the last successful install.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install_command_hash: Option<String>,
    /// The entrypoint in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// When the configuration in force was set (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_configured_at: Option<String>,
    /// Invokes running now.
    pub inflight: u64,
    /// The limits in force.
    pub limits: Limits,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FileEntry {
    /// File name.
    pub name: String,
    /// Absolute path in the sandbox (`/workspace/...`).
    pub path: String,
    /// `file`, `dir` or `symlink`.
    #[serde(rename = "type")]
    pub kind: String,
    /// True for directories.
    pub is_dir: bool,
    /// Size in bytes.
    pub size: u64,
    /// `ls -l` style, e.g. `-rw-r--r--`.
    pub mode: String,
    /// Permission bits as a number.
    pub mode_bits: u32,
    /// Seconds since the Unix epoch.
    pub modified_at: u64,
}

/// `GET /v1/files?path=` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FileListing {
    /// The directory's entries, sorted by name.
    pub entries: Vec<FileEntry>,
}

/// `PUT /v1/files/{path}` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WrittenFile {
    /// Absolute path in the sandbox.
    pub path: String,
    /// Bytes written.
    pub size: u64,
    /// sha256 of the content, hex.
    pub sha256: String,
}

/// What happens when the last client watching an invoke goes away. The default, `cancel`, is
/// the seed's: closing the stream cancels the invoke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnDisconnect {
    /// Cancel when no client has been attached for `--linger`.
    Linger,
    /// Cancel at once (the default).
    #[default]
    Cancel,
    /// Run to completion.
    Continue,
}

/// How output becomes `log` events (`?stream=` of an invoke, exec or configure).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum StreamMode {
    /// The seed's framing (the default): one event per whole line; only a line over 64 KiB
    /// (in pieces) and output left without a newline at the end are sent as `partial`.
    #[default]
    Lines,
    /// As `lines`, and a fragment without a newline is also sent (`partial`) once the output
    /// pauses for 25 ms, so prompts and streamed tokens show up at once.
    Live,
}

/// Archive formats of `GET /v1/archive?format=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ArchiveFormat {
    /// zip (deflate), the default.
    #[default]
    Zip,
    /// POSIX tar, uncompressed.
    Tar,
}

/// Lifecycle phase of a sandbox, as the control plane reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum SandboxStatus {
    /// Being created; not reachable yet.
    Creating,
    /// Its runner answers.
    Running,
    /// Stopped; its workspace is kept and `resume` starts it again.
    Stopped,
    /// Should be running but is not; see `message`.
    Error,
    /// Being deleted.
    Deleting,
}

impl SandboxStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxStatus::Creating => "Creating",
            SandboxStatus::Running => "Running",
            SandboxStatus::Stopped => "Stopped",
            SandboxStatus::Error => "Error",
            SandboxStatus::Deleting => "Deleting",
        }
    }
}

/// Whether `name` can name a sandbox (or a namespace): a DNS label — lowercase letters, digits
/// and `-`, 1 to 63 characters, no `-` at either end — so it is safe as a file name, a URL path
/// segment, a pod name and a label value.
pub fn valid_sandbox_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// A reference to a template, as the seed's clients send it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateRef {
    /// Template name.
    pub name: String,
    /// `ClusterSandboxTemplate` or `SandboxTemplate`; both name agentbox templates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

/// `POST /api/v1/sandboxes` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateSandboxRequest {
    /// DNS label: lowercase letters, digits and `-`, at most 63 characters.
    pub name: String,
    /// Defaults to the caller's first namespace, or `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The template; `default` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_ref: Option<TemplateRef>,
    /// Most time the sandbox runs, from its create (or explicit resume): a Go duration such as
    /// `8h`; then it is stopped or deleted (the template's `onTimeout`). Defaults to the
    /// template's `timeout`; none when neither sets one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// How long the sandbox may go without an invoke, exec, configure, file or session
    /// request before it is stopped (its workspace kept); the next such request resumes it.
    /// A Go duration such as `30m`; defaults to the template's `idleTimeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
    /// Accepted for AgentTier clients (`{"size": "10Gi"}`) and ignored: a local or Docker
    /// workspace is bounded by its filesystem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub storage: Option<serde_json::Value>,
    /// Named credentials the agent gets (besides the template's), by name: never values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub credentials: Vec<CredentialRef>,
}

/// A named credential given to a sandbox's agent: as the environment variable `env`, or as the
/// read-only file `file` (under `/run/credentials/`). Exactly one of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CredentialRef {
    /// The credential's name (`PUT /api/v1/credentials/{name}` in the sandbox's namespace).
    pub name: String,
    /// An environment variable name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    /// A path under `/run/credentials/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

/// `POST /api/v1/sandboxes/{id}/clone` body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CloneSandboxRequest {
    /// The new sandbox's name; `<source>-clone-<unix seconds>` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Accepted for AgentTier clients and ignored (no VolumeSnapshot is taken).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_class: Option<String>,
}

/// Why a sandbox is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum StopReason {
    /// Nothing used it for its `idleTimeout`; the next request resumes it.
    Idle,
    /// Its `timeout` (lifetime) ended.
    Timeout,
    /// Somebody stopped it (`POST .../stop`).
    User,
}

/// Who created a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedBy {
    /// The caller's email, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// The caller's display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
}

/// A sandbox as the control plane shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxSummary {
    /// The id used in URLs (the sandbox's name).
    pub sandbox_id: String,
    /// The name.
    pub name: String,
    /// The namespace.
    pub namespace: String,
    /// The phase.
    pub status: SandboxStatus,
    /// `agent` or `code`.
    pub mode: String,
    /// The template's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_ref: Option<String>,
    /// The pod (Kubernetes) or process (local) behind it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// The volume holding `/workspace`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc_name: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// RFC 3339: when an invoke or session last started or the configuration last changed
    /// (local backend: read off the runner's state directory; Docker: the requests this
    /// control plane proxied, the container's start, the create; Kubernetes: the record's
    /// `agentbox.dev/last-activity` annotation, which every replica writes in the background,
    /// at most twice per interval of at most 5 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_activity_at: Option<String>,
    /// Who created it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<CreatedBy>,
    /// Why it is in its phase, when that needs saying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Whether code in the sandbox is isolated from the host: always for containers and pods;
    /// for local sandboxes unless the control plane runs with `--isolation none`.
    #[serde(default = "isolated_default")]
    pub isolated: bool,
    /// How a local sandbox's limits are enforced: `cgroup-v2`, `cgroup-v1` or `rlimits`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits_enforced: Option<String>,
    /// Why it is `Stopped`: `idle` (a request resumes it), `timeout` or `user`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<StopReason>,
    /// Its lifetime, as given on create or by the template (a Go duration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Its idle timeout, as given on create or by the template (a Go duration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
    /// RFC 3339: when its lifetime ends (while it runs and has a `timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// The sandbox it was cloned from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloned_from: Option<String>,
    /// In a create's answer, when its template has a warm pool: `true` when a pooled sandbox
    /// (already running) was claimed, `false` when none was ready and it was started cold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_warm_pool: Option<bool>,
}

/// `GET /api/v1/warmpool/status` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WarmPoolStatus {
    /// One entry per template with a warm pool.
    pub pools: Vec<WarmPoolInfo>,
}

/// One template's warm pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WarmPoolInfo {
    /// The template.
    pub template: String,
    /// How many pooled sandboxes it keeps ready.
    pub size: u32,
    /// How many are ready now.
    pub ready: u32,
    /// Creates that claimed a pooled sandbox (this control plane, since it started).
    pub hits: u64,
    /// Creates that found none ready and started cold (this control plane, since it started).
    pub misses: u64,
}

fn isolated_default() -> bool {
    true
}

/// `GET /api/v1/sandboxes` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxList {
    /// The sandboxes visible to the caller.
    pub sandboxes: Vec<SandboxSummary>,
}

/// A sandbox template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateInfo {
    /// Name.
    pub name: String,
    /// What it is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Container image (Docker and Kubernetes backends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Version of the template's definition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    /// The template's settings (mode, env, limits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub spec: Option<serde_json::Value>,
}

/// `GET /api/v1/templates` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateList {
    /// Every template.
    pub templates: Vec<TemplateInfo>,
}

/// `GET /api/v1/user/me` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserInfo {
    /// Subject: the API key's name or the token's `sub`.
    pub sub: String,
    /// Email, from OIDC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Groups, from OIDC.
    pub groups: Vec<String>,
    /// Namespaces the caller may use; absent means all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<Vec<String>>,
    /// Whether the caller is an administrator.
    pub is_admin: bool,
}

// ---------------------------------------------------------------------------------------------
// Sessions, the agent channel and permissions
// ---------------------------------------------------------------------------------------------

/// SSE event names added by sessions and the agent channel (on invoke streams and in session
/// histories), next to those of [`event`].
pub mod session_event {
    /// A `{"type":"event"}` line from the agent: [`super::AgentEvent`].
    pub const AGENT: &str = "agent";
    /// The agent asks for permission: [`super::PermissionEvent`].
    pub const PERMISSION: &str = "permission";
    /// A permission request was answered: [`super::PermissionReplyEvent`].
    pub const PERMISSION_REPLY: &str = "permission_reply";
    /// The agent wrote a line the runner could not use: [`super::ProtocolErrorEvent`].
    pub const PROTOCOL_ERROR: &str = "protocol_error";
    /// The prompt a client sent with an invoke in a session: [`super::PromptEvent`].
    pub const PROMPT: &str = "prompt";
}

/// Whether `id` can name a session: 1 to 128 of `A-Z a-z 0-9 . _ -`, not starting with `.`
/// or `-`, so it is safe as a file name and a URL path segment.
pub fn valid_session_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with(['.', '-'])
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Whether `id` can name a permission request (same rule as [`valid_session_id`]).
pub fn valid_permission_id(id: &str) -> bool {
    valid_session_id(id)
}

/// `POST /v1/sessions` body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateSessionRequest {
    /// The id to use; the runner picks one (`ses-...`) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Free-form JSON kept with the session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
    /// The configured agent to run (`GET /v1/agents`); absent: the default agent at each turn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// An ACP agent's working directory for this session (the ACP session's `cwd`): an
    /// existing directory in the workspace; absent: the workspace. The agent process itself
    /// runs in the workspace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// MCP servers for this session's ACP agent (ACP's `McpServer` objects), after the
    /// configuration's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub mcp_servers: Option<Vec<serde_json::Value>>,
}

/// Checks MCP server entries (ACP's `McpServer`): a stdio one has `name`, `command` (and
/// optional `args`, `env: [{name, value}]`); an `http` or `sse` one has `type`, `name`, `url`
/// (and optional `headers: [{name, value}]`). At most 64.
pub fn check_mcp_servers(servers: &[serde_json::Value]) -> Result<(), String> {
    if servers.len() > 64 {
        return Err(format!("{} MCP servers, the limit is 64", servers.len()));
    }
    let pairs = |v: Option<&serde_json::Value>| match v {
        None => true,
        Some(v) => v.as_array().is_some_and(|a| {
            a.iter().all(|p| {
                p.get("name").is_some_and(|n| n.is_string())
                    && p.get("value").is_some_and(|n| n.is_string())
            })
        }),
    };
    for (i, s) in servers.iter().enumerate() {
        let name = s.get("name").and_then(|n| n.as_str()).unwrap_or("");
        if name.is_empty() {
            return Err(format!("mcpServers[{i}] needs a \"name\""));
        }
        let ok = match s.get("type").and_then(|t| t.as_str()) {
            None | Some("stdio") => {
                s.get("command")
                    .and_then(|c| c.as_str())
                    .is_some_and(|c| !c.is_empty())
                    && s.get("args").is_none_or(|a| {
                        a.as_array()
                            .is_some_and(|a| a.iter().all(|x| x.is_string()))
                    })
                    && pairs(s.get("env"))
            }
            Some("http" | "sse") => {
                s.get("url")
                    .and_then(|u| u.as_str())
                    .is_some_and(|u| !u.is_empty())
                    && pairs(s.get("headers"))
            }
            Some(_) => false,
        };
        if !ok {
            return Err(format!(
                "mcpServers[{i}] ({name:?}) is not an ACP McpServer: give command (with args \
                 and env [{{name, value}}]) for stdio, or type \"http\"/\"sse\" with url (and \
                 headers [{{name, value}}])"
            ));
        }
    }
    Ok(())
}

/// A session, as `POST /v1/sessions`, `GET /v1/sessions` and `GET /v1/sessions/{id}` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionInfo {
    /// The session's id.
    pub id: String,
    /// Milliseconds since the Unix epoch.
    pub created_at: u64,
    /// As given at creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
    /// Events in the history so far (the last `eventIndex`).
    pub event_count: u64,
    /// The invoke running in the session now, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_invoke_id: Option<InvokeId>,
    /// Tool kinds answered `always`: later requests of these kinds are allowed by the runner.
    #[serde(default)]
    pub always_allowed: Vec<String>,
    /// Tool kinds answered `reject_always`: later requests of these kinds are refused by the
    /// runner.
    #[serde(default)]
    pub always_rejected: Vec<String>,
    /// The agent the session runs (`POST /v1/sessions {agent}`); absent: the default agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// The session's working directory as given (`POST /v1/sessions {cwd}`); absent: the
    /// workspace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// An ACP agent's session as the runner last knew it (absent before the first turn).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acp: Option<AcpSessionState>,
}

/// An ACP session's state, kept current from the agent's answers (`session/new`,
/// `session/load`, `session/set_*`) and its `current_mode_update` and `config_option_update`
/// notifications.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AcpSessionState {
    /// The agent's id for the session (reused by `session/load` of the same agent).
    pub session_id: String,
    /// The configured agent whose session it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// The current mode id (`modes.currentModeId`, or the config option of category `mode`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// The current model id (`models.currentModelId`, or the config option of category
    /// `model`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The current thought level (the config option of category `thought_level`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thought_level: Option<String>,
    /// The agent's `modes` (`{currentModeId, availableModes}`), as it sent them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modes: Option<serde_json::Value>,
    /// The agent's `models` (`{currentModelId, availableModels}`), as it sent them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<serde_json::Value>,
    /// The agent's `configOptions` with their current values, as it sent them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_options: Option<serde_json::Value>,
}

impl AcpSessionState {
    /// Fills `mode`, `model` and `thoughtLevel` from the raw fields.
    pub fn derive(&mut self) {
        let option = |category: &str| -> Option<String> {
            self.config_options
                .as_ref()?
                .as_array()?
                .iter()
                .find(|o| o.get("category").and_then(|c| c.as_str()) == Some(category))?
                .get("currentValue")
                .map(|v| match v.as_str() {
                    Some(s) => s.to_owned(),
                    None => v.to_string(),
                })
        };
        let current = |field: &Option<serde_json::Value>, key: &str| -> Option<String> {
            field.as_ref()?.get(key)?.as_str().map(str::to_owned)
        };
        self.mode = current(&self.modes, "currentModeId").or_else(|| option("mode"));
        self.model = option("model").or_else(|| current(&self.models, "currentModelId"));
        self.thought_level = option("thought_level");
    }

    /// The id of the config option of `category`, if the agent offers one.
    pub fn option_of_category(&self, category: &str) -> Option<String> {
        self.config_options
            .as_ref()?
            .as_array()?
            .iter()
            .find(|o| o.get("category").and_then(|c| c.as_str()) == Some(category))?
            .get("id")?
            .as_str()
            .map(str::to_owned)
    }
}

/// `GET /v1/sessions` answer, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionList {
    /// One page of sessions.
    pub items: Vec<SessionInfo>,
    /// The `offset` of the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_offset: Option<u64>,
}

/// Who caused an event in a session's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Sender {
    /// The API caller (prompts, permission replies).
    Client,
    /// The agent process (output, agent events, permission requests).
    Agent,
    /// The runner (start, exit, errors, automatic permission replies).
    Runner,
}

/// One event of a session's history (`GET /v1/sessions/{id}/events`); over SSE it is the
/// `data` of a frame whose `id` is `eventIndex` and whose `event` is `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionEvent {
    /// Position in the history, from 1.
    pub event_index: u64,
    /// Milliseconds since the Unix epoch.
    pub created_at: u64,
    /// Who caused it.
    pub sender: Sender,
    /// The invoke it belongs to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invoke_id: Option<InvokeId>,
    /// The event name: `start`, `log`, `exit`, `agent`, `permission`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// The event's payload, as on the invoke stream.
    pub data: serde_json::Value,
}

/// `GET /v1/sessions/{id}/events` answer (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionEventPage {
    /// Events with `eventIndex` greater than the requested `offset`, in order.
    pub items: Vec<SessionEvent>,
    /// The `offset` to ask for next: the last `eventIndex` returned (or the requested offset
    /// when there was nothing new).
    pub next_offset: u64,
    /// Whether more events follow already.
    pub has_more: bool,
}

/// `agent` event: a `{"type":"event","name":...,"data":...}` line the agent wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentEvent {
    /// The agent's name for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Its payload, any JSON.
    #[serde(default)]
    pub data: serde_json::Value,
}

/// How a caller answers a permission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PermissionReply {
    /// Allow this one call.
    Once,
    /// Allow, and allow every later request of the same tool kind in this session.
    Always,
    /// Refuse.
    Reject,
    /// Refuse, and refuse every later request of the same tool kind in this session.
    RejectAlways,
    /// Nobody chose: the turn was canceled or ended first (journaled only, never sent by a
    /// client).
    Cancelled,
}

impl PermissionReply {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            PermissionReply::Once => "once",
            PermissionReply::Always => "always",
            PermissionReply::Reject => "reject",
            PermissionReply::RejectAlways => "reject_always",
            PermissionReply::Cancelled => "cancelled",
        }
    }

    /// The reply an option of ACP kind `kind` (`allow_once`, `allow_always`, `reject_once`,
    /// `reject_always`) stands for.
    pub fn of_option_kind(kind: &str) -> Option<Self> {
        match kind {
            "allow_once" => Some(PermissionReply::Once),
            "allow_always" => Some(PermissionReply::Always),
            "reject_once" => Some(PermissionReply::Reject),
            "reject_always" => Some(PermissionReply::RejectAlways),
            _ => None,
        }
    }
}

/// One choice the agent offers for a permission request (ACP's `PermissionOption`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PermissionOption {
    /// The agent's id for it: answer with `{"optionId": ...}` to choose exactly this one.
    pub option_id: String,
    /// Its label, for a human.
    #[serde(default)]
    pub name: String,
    /// `allow_once`, `allow_always`, `reject_once` or `reject_always`.
    pub kind: String,
}

/// How the runner answered a request itself, without asking anyone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoReply {
    /// The answer (`always` or `reject_always`).
    pub reply: PermissionReply,
    /// Why: `always` (an earlier `always` or `reject_always` for the tool kind).
    pub by: ReplyOrigin,
}

/// `permission` event: the agent asks; answer with
/// `POST /v1/sessions/{sid}/permissions/{permissionId}` or
/// `POST /v1/invokes/{iid}/permissions/{permissionId}` (unless `autoReply` says the runner
/// already did).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PermissionEvent {
    /// The agent's id for the request.
    pub permission_id: String,
    /// What the agent wants to do, for a human.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// The tool call, as the agent described it (`kind` decides what `always` covers).
    #[serde(default)]
    pub tool_call: serde_json::Value,
    /// The tool kind this request counts as for `always` (`toolCall.kind`, or `other`).
    pub tool_kind: String,
    /// Always `["once", "always", "reject", "reject_always"]`.
    pub available_replies: Vec<PermissionReply>,
    /// The agent's own options (an ACP agent's, or those an fd-channel agent listed); a reply
    /// may name one by `optionId`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<PermissionOption>,
    /// Present when the runner answered the request itself (an earlier `always` or
    /// `reject_always` for this tool kind): nothing waits for a client; the
    /// `permission_reply` follows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_reply: Option<AutoReply>,
}

/// Who answered a permission request, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReplyOrigin {
    /// A caller, through the API.
    Client,
    /// The runner: an earlier `always` (or `reject_always`) covered it.
    Always,
    /// The runner: nobody answered within the permission timeout; the reply is `reject`.
    Timeout,
    /// The runner: the turn was canceled (or ended) first; the reply is `cancelled`.
    Cancel,
}

/// `permission_reply` event: a request was answered (by a client or by the runner).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PermissionReplyEvent {
    /// The request answered.
    pub permission_id: String,
    /// The answer written to the agent.
    pub reply: PermissionReply,
    /// The agent's option chosen, when the client named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub option_id: Option<String>,
    /// Who answered.
    pub by: ReplyOrigin,
}

/// `protocol_error` event: a line from the agent that was not valid; it was skipped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProtocolErrorEvent {
    /// What was wrong.
    pub message: String,
    /// The start of the offending line (at most 1 KiB).
    pub line: String,
}

/// `prompt` event (session histories only): the `?prompt=` of an invoke in the session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PromptEvent {
    /// The prompt text (of a prompt of content blocks: its text blocks, joined by newlines).
    pub text: String,
    /// The content blocks of a `{"prompt": [...]}` body, as sent to the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub content: Option<Vec<serde_json::Value>>,
}

/// `PUT /v1/sessions/{id}/config` body (ACP agents): what to set, each optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SessionConfigRequest {
    /// A mode id the agent advertised (`session/set_mode`, or its config option of category
    /// `mode` when it offers no modes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// A model id the agent advertised (its config option of category `model`, else
    /// `session/set_model`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// A thought level the agent advertised (its config option of category `thought_level`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thought_level: Option<String>,
    /// Config option ids to values (`session/set_config_option`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<BTreeMap<String, serde_json::Value>>,
}

/// `POST /v1/sessions/{sid}/permissions/{pid}` (and the invoke variant) body: `reply` or
/// `optionId`, not both.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PermissionReplyRequest {
    /// `once`, `always`, `reject` or `reject_always`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<PermissionReply>,
    /// One of the `options` of the `permission` event, chosen as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub option_id: Option<String>,
}

/// Answer to a permission reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PermissionReplyResponse {
    /// The request answered.
    pub permission_id: String,
    /// The invoke that asked.
    pub invoke_id: InvokeId,
    /// The answer written to the agent.
    pub reply: PermissionReply,
    /// The agent's option chosen, when the request named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub option_id: Option<String>,
}

/// OpenAPI schemas of one Server-Sent Events frame (`{id, event, data}`, `data` being the JSON
/// text of the event's payload): `InvokeStreamEvent` (start, log, exit, error, truncated, and
/// the agent channel's agent, permission, permission_reply, protocol_error),
/// `ConfigureStreamEvent` (log, result, error) and `SessionStreamEvent` (history items). Event-stream responses use them as the schema of
/// each event, which is how schemathesis validates streams.
pub fn sse_frame_schemas() -> serde_json::Value {
    fn frame(event: &str, payload: &str) -> serde_json::Value {
        serde_json::json!({
            "type": "object",
            "required": ["event", "data"],
            "properties": {
                "id": {"type": "string", "pattern": "^[0-9]+$"},
                "event": {"const": event},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {"$ref": format!("#/components/schemas/{payload}")},
                },
            },
        })
    }
    serde_json::json!({
        "InvokeStreamEvent": {
            "description": "One event of an invoke or exec stream.",
            "oneOf": [
                frame(event::START, "StartEvent"),
                frame(event::LOG, "LogEvent"),
                frame(event::EXIT, "ExitEvent"),
                frame(event::ERROR, "ErrorEvent"),
                frame(event::TRUNCATED, "TruncatedEvent"),
                frame(session_event::AGENT, "AgentEvent"),
                frame(session_event::PERMISSION, "PermissionEvent"),
                frame(session_event::PERMISSION_REPLY, "PermissionReplyEvent"),
                frame(session_event::PROTOCOL_ERROR, "ProtocolErrorEvent"),
            ],
        },
        "SessionStreamEvent": {
            "description": "One event of a session's history followed live: `id` is its `eventIndex`, `event` its `type`, `data` the whole history item.",
            "oneOf": [{
            "type": "object",
            "required": ["event", "data"],
            "properties": {
                "id": {"type": "string", "pattern": "^[0-9]+$"},
                "event": {"type": "string"},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {"$ref": "#/components/schemas/SessionEvent"},
                },
            },
            }],
        },
        "ConfigureStreamEvent": {
            "description": "One event of a configure stream: the install's `log` events, then `result` or `error`.",
            "oneOf": [
                frame(event::LOG, "LogEvent"),
                frame(event::RESULT, "ConfigureResult"),
                frame(event::ERROR, "ErrorEvent"),
            ],
        },
    })
}

/// Points every `text/event-stream` response of an OpenAPI document at the frame schemas of
/// [`sse_frame_schemas`] (configure operations at `ConfigureStreamEvent`), and adds them.
pub fn describe_event_streams(doc: &mut serde_json::Value) {
    if let Some(paths) = doc
        .get_mut("paths")
        .and_then(serde_json::Value::as_object_mut)
    {
        for (path, item) in paths.iter_mut() {
            let frame = if path.ends_with("/configure") {
                "ConfigureStreamEvent"
            } else if path.contains("/sessions/") {
                "SessionStreamEvent"
            } else {
                "InvokeStreamEvent"
            };
            let Some(ops) = item.as_object_mut() else {
                continue;
            };
            for op in ops.values_mut() {
                let Some(responses) = op
                    .get_mut("responses")
                    .and_then(serde_json::Value::as_object_mut)
                else {
                    continue;
                };
                for response in responses.values_mut() {
                    if let Some(media) = response
                        .get_mut("content")
                        .and_then(|c| c.get_mut("text/event-stream"))
                    {
                        media["schema"] =
                            serde_json::json!({"$ref": format!("#/components/schemas/{frame}")});
                    }
                }
            }
        }
    }
    if let (Some(schemas), serde_json::Value::Object(frames)) = (
        doc["components"]["schemas"].as_object_mut(),
        sse_frame_schemas(),
    ) {
        schemas.extend(frames);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_accepts_numbers_and_octal_text() {
        let f: FileSpec =
            serde_json::from_str(r#"{"path":"a","content":"x","mode":"0755"}"#).expect("parse");
        assert_eq!(f.mode, Some(0o755));
        let f: FileSpec =
            serde_json::from_str(r#"{"path":"a","content":"x","mode":420}"#).expect("parse");
        assert_eq!(f.mode, Some(0o644));
        assert!(serde_json::from_str::<FileSpec>(r#"{"path":"a","mode":"9x"}"#).is_err());
    }

    #[test]
    fn log_event_omits_empty_fields() {
        let e = LogEvent {
            stream: Stream::Stdout,
            data: Some("hi".into()),
            data_base64: None,
            partial: false,
        };
        assert_eq!(
            serde_json::to_string(&e).expect("encode"),
            r#"{"stream":"stdout","data":"hi"}"#
        );
    }

    #[test]
    fn invoke_ids_are_checked_before_use_as_file_names() {
        assert!(InvokeId::is_well_formed("inv-0193c2a4f1b2-9f3e2a71"));
        assert!(!InvokeId::is_well_formed("inv-../../etc"));
        assert!(!InvokeId::is_well_formed("abc"));
    }

    #[test]
    fn session_ids_are_safe_file_names() {
        assert!(valid_session_id("ses-1.a_B"));
        for bad in ["", ".", "..", "-x", "a/b", "a b", "é", &"x".repeat(129)] {
            assert!(!valid_session_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn mcp_servers_are_checked_as_acp_defines_them() {
        use serde_json::json;
        let good = [
            json!({"name": "fs", "command": "/bin/mcp", "args": ["-v"], "env": [{"name": "K", "value": "v"}]}),
            json!({"type": "http", "name": "web", "url": "http://x/mcp", "headers": []}),
            json!({"type": "sse", "name": "s", "url": "http://x/sse"}),
        ];
        assert_eq!(check_mcp_servers(&good), Ok(()));
        for bad in [
            json!({"command": "/bin/mcp"}),
            json!({"name": "fs"}),
            json!({"name": "fs", "command": "/bin/mcp", "args": "-v"}),
            json!({"name": "fs", "command": "/bin/mcp", "env": {"K": "v"}}),
            json!({"type": "http", "name": "web"}),
            json!({"type": "ws", "name": "web", "url": "ws://x"}),
        ] {
            assert!(
                check_mcp_servers(std::slice::from_ref(&bad)).is_err(),
                "{bad}"
            );
        }
        assert!(check_mcp_servers(&vec![good[0].clone(); 65]).is_err());
    }

    #[test]
    fn acp_state_reads_mode_model_and_thought_level() {
        use serde_json::json;
        let mut state = AcpSessionState {
            modes: Some(json!({"currentModeId": "ask"})),
            models: Some(json!({"currentModelId": "m1"})),
            config_options: Some(json!([
                {"id": "t", "category": "thought_level", "currentValue": "high"},
                {"id": "flag", "type": "boolean", "currentValue": true},
            ])),
            ..Default::default()
        };
        state.derive();
        assert_eq!(state.mode.as_deref(), Some("ask"));
        assert_eq!(state.model.as_deref(), Some("m1"));
        assert_eq!(state.thought_level.as_deref(), Some("high"));
        assert_eq!(
            state.option_of_category("thought_level").as_deref(),
            Some("t")
        );
        // A model option wins over the older `models`.
        state.config_options =
            Some(json!([{"id": "mo", "category": "model", "currentValue": "m2"}]));
        state.derive();
        assert_eq!(state.model.as_deref(), Some("m2"));
        assert_eq!(state.thought_level, None);
    }

    #[test]
    fn exit_reason_wire_names() {
        assert_eq!(
            serde_json::to_string(&ExitReason::RunnerRestarted).expect("encode"),
            r#""runner_restarted""#
        );
        assert_eq!(ExitReason::Canceled.as_str(), "canceled");
    }
}
