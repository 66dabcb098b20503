//! ACP agents: with `configure {"protocol": "acp"}` the entrypoint is an Agent Client Protocol
//! agent (JSON-RPC 2.0, one message per line, over stdio). The runner is the ACP client: it
//! keeps one agent process per session ([`AcpAgents`]), started on the session's first invoke
//! with `initialize` and `session/new` (cwd: the workspace), and runs each invoke as one prompt
//! turn ([`Turn::run`]): `session/prompt` with the invoke's prompt, `session/update`
//! notifications as `agent` events, `session/request_permission` as `permission` events
//! answered through the same endpoints as the fd channel ([`crate::channel`]), and the prompt's
//! response as the turn's end. Cancel (or timeout) sends `session/cancel` and kills the agent's
//! process tree if the turn has not ended within `--grace`. The agent's stderr becomes `log`
//! events of the running turn. Requests the runner does not offer (file system, terminals) are
//! answered "method not found"; the runner advertises no such capability.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use agentbox_proto::{
    event, session_event, AcpSessionState, AgentEvent, ErrorEvent, ExitReason, InvokeId, Sender,
    Stream,
};
use serde_json::{json, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot, watch};

use crate::channel::{AgentSetup, External};
use crate::error::{Error, Result};
use crate::fsutil::random_hex;
use crate::journal::EventLog;
use crate::session::Session;
use crate::supervisor::{self, ExitStatus, Outcome, Process, Reaper, RunSpec};

/// Agents whose `initialize` answer is remembered (a configuration has at most 65).
const MAX_KNOWN: usize = 256;
/// The ACP protocol version the runner speaks.
const PROTOCOL_VERSION: u64 = 1;
/// Longest wait for `initialize` and `session/new`.
const STARTUP: Duration = Duration::from_secs(30);
/// Longest line read from the agent's stdout (longer ones are skipped as protocol errors) and
/// longest `log` event made of its stderr (longer lines are split).
const MAX_LINE: usize = 16 << 20;

type Reply = std::result::Result<Value, Value>;

/// What the agent is started with; a change (a new configure: other files or install command,
/// argv, env, or agent definition) restarts it at the session's next turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// The agent's name in the configuration.
    pub agent: String,
    /// MCP servers of the agent (the session's own follow them).
    pub mcp_servers: Vec<Value>,
    /// The install hash in force (files and install command): new agent code on disk is a
    /// change even when argv, env and cwd are the same.
    pub install_hash: Option<String>,
    /// argv.
    pub argv: Vec<String>,
    /// The complete environment.
    pub env: Vec<(String, String)>,
    /// The agent process's working directory: the workspace.
    pub cwd: std::path::PathBuf,
    /// The ACP session's `cwd` (`session/new`, `session/load`): the session's, or the workspace.
    pub session_cwd: std::path::PathBuf,
}

/// The running ACP agents, one per session.
#[derive(Debug, Default)]
pub struct AcpAgents {
    /// Per session, a slot locked while its agent starts: a slow start holds up only its own
    /// session.
    map: Mutex<HashMap<String, Slot>>,
    /// Per agent name, the `initialize` answer of its latest start.
    known: Mutex<HashMap<String, Value>>,
}

type Slot = Arc<tokio::sync::Mutex<Option<Arc<Conn>>>>;

impl AcpAgents {
    /// No agents yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn slot(&self, session_id: &str) -> Slot {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(map.entry(session_id.to_owned()).or_default())
    }

    /// The session's agent, started (and initialized, with its ACP session open) if needed.
    async fn get_or_start(
        &self,
        session: &Arc<Session>,
        launch: &Launch,
        reaper: &Arc<Reaper>,
    ) -> Result<Arc<Conn>> {
        let slot = self.slot(&session.id());
        let mut slot = slot.lock().await;
        if let Some(conn) = slot.as_ref() {
            if !*conn.dead.borrow() && conn.launch == *launch {
                return Ok(Arc::clone(conn));
            }
            conn.kill();
            *slot = None;
        }
        let conn = Conn::start(session, launch, reaper).await?;
        {
            let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
            // Names of agents configured long ago linger here; bounded all the same.
            if known.len() >= MAX_KNOWN && !known.contains_key(&launch.agent) {
                known.clear();
            }
            known.insert(launch.agent.clone(), conn.init.clone());
        }
        *slot = Some(Arc::clone(&conn));
        Ok(conn)
    }

    /// The `initialize` answer of agent `name`'s latest start, if it has started.
    pub fn initialized(&self, name: &str) -> Option<Value> {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// The session's agent's `promptCapabilities`, starting it if needed.
    pub async fn prompt_capabilities(
        &self,
        session: &Arc<Session>,
        launch: &Launch,
        reaper: &Arc<Reaper>,
    ) -> Result<Value> {
        let conn = self.get_or_start(session, launch, reaper).await?;
        Ok(conn
            .init
            .pointer("/agentCapabilities/promptCapabilities")
            .cloned()
            .unwrap_or(Value::Null))
    }

    /// Stops the session's agent, if one runs (session deleted, or a turn it did not end).
    pub async fn stop(&self, session_id: &str) {
        let slot = self
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(session_id);
        if let Some(slot) = slot {
            if let Some(conn) = slot.lock().await.take() {
                conn.kill();
            }
        }
    }

    /// Stops every agent (runner shutdown) and waits for them, up to `limit`.
    pub async fn stop_all(&self, limit: Duration) {
        let slots: Vec<Slot> = self
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, slot)| slot)
            .collect();
        let mut conns = Vec::new();
        for slot in slots {
            // A slot locked now is an agent still starting; it sees its stdin close when the
            // runner exits.
            if let Some(conn) = slot.try_lock().ok().and_then(|mut c| c.take()) {
                conns.push(conn);
            }
        }
        for conn in &conns {
            conn.kill();
        }
        let _ = tokio::time::timeout(limit, async {
            for conn in &conns {
                let mut dead = conn.dead.clone();
                let _ = dead.wait_for(|d| *d).await;
            }
        })
        .await;
    }

    /// Sets mode, model, thought level and config options of the session's ACP session, in
    /// that order, keeping the session's state current from each answer; returns the session.
    pub async fn configure(
        &self,
        session: &Arc<Session>,
        launch: &Launch,
        reaper: &Arc<Reaper>,
        req: agentbox_proto::SessionConfigRequest,
    ) -> Result<agentbox_proto::SessionInfo> {
        let conn = self.get_or_start(session, launch, reaper).await?;
        let sid = conn.acp_session.clone();
        let state = session.acp_state().unwrap_or_default();
        // Through the config option of `category` when the agent offers one.
        let by_option = |category: &str, value: &str| {
            state
                .option_of_category(category)
                .map(|config_id| (config_id, json!(value)))
        };
        let mut options: Vec<(String, Value)> = Vec::new();
        if let Some(mode) = &req.mode {
            if state.modes.is_some() {
                let params = json!({"sessionId": sid, "modeId": mode});
                let answer = conn.request("session/set_mode", params).await;
                answer_json("session/set_mode", answer)?;
                session.update_acp(|s| {
                    if let Some(modes) = s.as_mut().and_then(|s| s.modes.as_mut()) {
                        set_field(modes, "currentModeId", json!(mode));
                    }
                });
            } else {
                options
                    .push(by_option("mode", mode).ok_or_else(|| {
                        Error::InvalidRequest("the agent offers no modes".into())
                    })?);
            }
        }
        if let Some(model) = &req.model {
            match by_option("model", model) {
                Some(option) => options.push(option),
                None if state.models.is_some() => {
                    let params = json!({"sessionId": sid, "modelId": model});
                    let answer = conn.request("session/set_model", params).await;
                    answer_json("session/set_model", answer)?;
                    session.update_acp(|s| {
                        if let Some(models) = s.as_mut().and_then(|s| s.models.as_mut()) {
                            set_field(models, "currentModelId", json!(model));
                        }
                    });
                }
                None => return Err(Error::InvalidRequest("the agent offers no models".into())),
            }
        }
        if let Some(level) = &req.thought_level {
            options.push(by_option("thought_level", level).ok_or_else(|| {
                Error::InvalidRequest("the agent offers no thought level".into())
            })?);
        }
        options.extend(req.options.unwrap_or_default());
        for (config_id, value) in options {
            let params = json!({"sessionId": sid, "configId": config_id, "value": value});
            let answer = conn.request("session/set_config_option", params).await;
            let answer = answer_json("session/set_config_option", answer)?;
            // The answer is the full set of options with their current values.
            if let Some(all) = answer.get("configOptions").filter(|v| v.is_array()) {
                session.update_acp(|s| {
                    if let Some(s) = s.as_mut() {
                        s.config_options = Some(all.clone());
                    }
                });
            }
        }
        Ok(session.info())
    }
}

/// Sets `key` of `object` when it is one (an agent's malformed `modes` is left as it is; indexing
/// would panic).
fn set_field(object: &mut Value, key: &str, value: Value) {
    if let Some(object) = object.as_object_mut() {
        object.insert(key.to_owned(), value);
    }
}

fn answer_json(method: &str, answer: Reply) -> Result<Value> {
    match answer {
        Ok(v) => Ok(v),
        Err(e) if e.get("code").and_then(Value::as_i64) == Some(-32601) => Err(
            Error::InvalidRequest(format!("the agent does not support {method}")),
        ),
        Err(e) => Err(Error::InvalidRequest(format!(
            "the agent refused {method}: {e}"
        ))),
    }
}

/// One agent process and its ACP session.
#[derive(Debug)]
struct Conn {
    launch: Launch,
    out: mpsc::UnboundedSender<String>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
    next_id: AtomicU64,
    acp_session: String,
    /// The agent's `initialize` answer (its capabilities and info).
    init: Value,
    turn: Mutex<Option<Arc<TurnSink>>>,
    session: Arc<Session>,
    process: Arc<Process>,
    dead: watch::Receiver<bool>,
    /// The agent's exit status, set before `dead` turns true.
    status: Arc<Mutex<Option<ExitStatus>>>,
}

/// Where the agent's messages go while a turn runs.
#[derive(Debug)]
struct TurnSink {
    log: Arc<EventLog>,
    external: External,
    /// Permission id → (JSON-RPC id, the offered options).
    asks: Mutex<HashMap<String, (Value, Vec<Value>)>>,
    next_ask: AtomicU64,
}

impl TurnSink {
    fn asks(&self) -> MutexGuard<'_, HashMap<String, (Value, Vec<Value>)>> {
        self.asks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Conn {
    async fn start(
        session: &Arc<Session>,
        launch: &Launch,
        reaper: &Arc<Reaper>,
    ) -> Result<Arc<Self>> {
        let marker_value = random_hex(8);
        let marker = format!("AGENTBOX_ACP_ID={marker_value}");
        let mut env = launch.env.clone();
        env.push(("AGENTBOX_ACP_ID".into(), marker_value));
        env.push(("AGENTBOX_SESSION_ID".into(), session.id()));
        env.push((
            "AGENTBOX_SESSION_DIR".into(),
            session.files_dir().display().to_string(),
        ));
        let spec = RunSpec {
            argv: launch.argv.clone(),
            env,
            cwd: launch.cwd.clone(),
            marker: marker.clone(),
            stdin: true,
            pass_fds: Default::default(),
            live: false,
            pty: None,
        };
        let (child, exit) = supervisor::spawn_stdio(reaper, &spec).map_err(|e| {
            Error::AgentFailed(format!("cannot start the ACP agent {:?}: {e}", launch.argv))
        })?;
        let process = Process::new(marker);
        process.set_pid(child.pid);
        // Stops the agent if the start fails or is abandoned (the invoke canceled or timed out).
        let mut guard = StopOnDrop(Some(Arc::clone(&process)));
        let (Some(stdin), stdout, stderr) = (child.stdin, child.stdout, child.stderr) else {
            return Err(Error::Internal("the ACP agent has no stdin pipe".into()));
        };
        let stdin = tokio::net::unix::pipe::Sender::from_owned_fd(stdin.into())?;
        let stdout = tokio::net::unix::pipe::Receiver::from_owned_fd(stdout.into())?;
        let stderr = tokio::net::unix::pipe::Receiver::from_owned_fd(stderr.into())?;
        let (out, out_rx) = mpsc::unbounded_channel();
        let (dead_tx, dead) = watch::channel(false);
        tokio::spawn(write_out(stdin, out_rx));
        // Until the connection exists, the reader answers only responses.
        let early: Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>> = Arc::default();
        let conn_cell: Arc<Mutex<Option<Arc<Conn>>>> = Arc::default();
        let boot = Boot {
            out: out.clone(),
            pending: Arc::clone(&early),
            next_id: AtomicU64::new(1),
        };
        tokio::spawn(read_messages(
            stdout,
            Arc::clone(&conn_cell),
            Arc::clone(&early),
            out.clone(),
        ));
        tokio::spawn(read_stderr(stderr, Arc::clone(&conn_cell)));
        let exit_status: Arc<Mutex<Option<ExitStatus>>> = Arc::default();
        {
            let early = Arc::clone(&early);
            let reaper = Arc::clone(reaper);
            let exit_status = Arc::clone(&exit_status);
            tokio::task::spawn_blocking(move || {
                let status: Option<ExitStatus> = exit.wait_forever(&reaper);
                tracing::info!(?status, "ACP agent exited");
                *exit_status.lock().unwrap_or_else(|p| p.into_inner()) = status;
                let _ = dead_tx.send(true);
                for (_, tx) in early.lock().unwrap_or_else(|p| p.into_inner()).drain() {
                    let _ = tx.send(Err(json!({"code": -32000, "message": "the agent exited"})));
                }
            });
        }
        let init = boot
            .request(
                "initialize",
                json!({
                    "protocolVersion": PROTOCOL_VERSION,
                    "clientCapabilities": {"fs": {"readTextFile": false, "writeTextFile": false}, "terminal": false},
                    "clientInfo": {"name": "agentbox-runner", "version": env!("CARGO_PKG_VERSION")},
                }),
                &dead,
            )
            .await;
        let fail = |what: &str, e: Value| {
            process.stop(ExitReason::Error, Duration::ZERO);
            Error::AgentFailed(format!("the ACP agent failed {what}: {e}"))
        };
        let init = init.map_err(|e| fail("initialize", e))?;
        tracing::debug!(%init, "ACP agent initialized");
        let version = init.get("protocolVersion");
        if version.and_then(Value::as_u64) != Some(PROTOCOL_VERSION) {
            return Err(Error::AgentFailed(format!(
                "the ACP agent answered initialize with protocolVersion {}; the runner speaks \
                 ACP version {PROTOCOL_VERSION} only",
                version.map_or_else(|| "(none)".to_owned(), Value::to_string)
            )));
        }
        // The session's MCP servers: the configuration's and the agent's, then the session's.
        let mut mcp_servers = launch.mcp_servers.clone();
        mcp_servers.extend(session.mcp_servers());
        let cwd = launch.session_cwd.display().to_string();
        let can_load = init
            .pointer("/agentCapabilities/loadSession")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        // Only the same agent can load its own session.
        let state = session.acp_state();
        let other_agent = state
            .as_ref()
            .and_then(|s| s.agent.clone())
            .filter(|a| *a != launch.agent);
        let previous = state
            .filter(|_| other_agent.is_none())
            .map(|s| s.session_id);
        // Continuity: a new process resumes the previous ACP session when the agent can load
        // one (the updates it replays while loading are already in the history: dropped).
        let mut continuity = json!({"continuity": "new"});
        let mut opened: Option<(String, Value)> = None;
        match (&previous, can_load) {
            (Some(previous), true) => {
                let params = json!({"sessionId": previous, "cwd": cwd, "mcpServers": mcp_servers});
                match boot.request("session/load", params, &dead).await {
                    Ok(answer) => {
                        continuity = json!({"continuity": "loaded"});
                        opened = Some((previous.clone(), answer));
                    }
                    Err(e) => {
                        if *dead.borrow() {
                            return Err(fail("session/load", e));
                        }
                        continuity = json!({"continuity": "new", "reason": format!("session/load of {previous} failed: {e}")});
                    }
                }
            }
            (Some(_), false) => {
                continuity = json!({"continuity": "new", "reason": "the agent cannot load sessions (no loadSession capability)"});
            }
            (None, _) => {
                if let Some(other) = other_agent {
                    continuity = json!({"continuity": "new", "reason": format!("the previous ACP session was agent {other:?}'s")});
                }
            }
        }
        let (acp_session, answer) = match opened {
            Some(opened) => opened,
            None => {
                let answer = boot
                    .request(
                        "session/new",
                        json!({"cwd": cwd, "mcpServers": mcp_servers}),
                        &dead,
                    )
                    .await
                    .map_err(|e| fail("session/new", e))?;
                let Some(id) = answer
                    .get("sessionId")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                else {
                    return Err(fail("session/new", json!("no sessionId")));
                };
                (id, answer)
            }
        };
        let mut data = json!({"initialize": init, "session": answer, "agent": launch.agent});
        if let (Some(data), Value::Object(extra)) = (data.as_object_mut(), continuity) {
            data.extend(extra);
        }
        session.record(
            Sender::Runner,
            None,
            session_event::AGENT,
            serde_json::to_value(AgentEvent {
                name: Some("acp_session".into()),
                data,
            })
            .unwrap_or_default(),
        );
        let field = |name: &str| answer.get(name).filter(|v| !v.is_null()).cloned();
        session.update_acp(|s| {
            *s = Some(AcpSessionState {
                session_id: acp_session.clone(),
                agent: Some(launch.agent.clone()),
                modes: field("modes"),
                models: field("models"),
                config_options: field("configOptions"),
                ..Default::default()
            })
        });
        let conn = Arc::new(Conn {
            launch: launch.clone(),
            out,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(boot.next_id.load(Ordering::SeqCst)),
            acp_session,
            init,
            turn: Mutex::new(None),
            session: Arc::clone(session),
            process,
            dead,
            status: exit_status,
        });
        // From here on the connection's own table answers responses.
        *conn_cell.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&conn));
        guard.0 = None;
        Ok(conn)
    }

    fn kill(&self) {
        self.process.stop(ExitReason::Canceled, Duration::ZERO);
    }

    fn turn(&self) -> Option<Arc<TurnSink>> {
        self.turn.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn send(&self, message: &Value) {
        let mut line = message.to_string();
        line.push('\n');
        let _ = self.out.send(line);
    }

    async fn request(&self, method: &str, params: Value) -> Reply {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}));
        let mut dead = self.dead.clone();
        tokio::select! {
            r = rx => r.unwrap_or_else(|_| Err(json!({"code": -32000, "message": "no answer"}))),
            _ = dead.wait_for(|d| *d) => Err(json!({"code": -32000, "message": "the agent exited"})),
        }
    }

    fn respond(&self, id: &Value, result: Value) {
        self.send(&json!({"jsonrpc": "2.0", "id": id, "result": result}));
    }

    fn handle(&self, message: Value, raw: &str) {
        let method = message.get("method").and_then(Value::as_str);
        let id = message.get("id").cloned();
        match (method, id) {
            (Some("session/update"), None) => {
                let update = message
                    .get("params")
                    .and_then(|p| p.get("update"))
                    .cloned()
                    .unwrap_or(Value::Null);
                self.track(&update);
                let event = AgentEvent {
                    name: update
                        .get("sessionUpdate")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                    data: update,
                };
                match self.turn() {
                    Some(turn) => {
                        turn.log.append(|b| b.event(session_event::AGENT, &event));
                    }
                    None => self.session.record(
                        Sender::Agent,
                        None,
                        session_event::AGENT,
                        serde_json::to_value(&event).unwrap_or_default(),
                    ),
                }
            }
            (Some("session/request_permission"), Some(id)) => match self.turn() {
                Some(turn) => {
                    let params = message.get("params").cloned().unwrap_or(Value::Null);
                    let tool_call = params.get("toolCall").cloned().unwrap_or(Value::Null);
                    let options = params
                        .get("options")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default();
                    let n = turn.next_ask.fetch_add(1, Ordering::SeqCst) + 1;
                    let pid = format!("acp-{n}");
                    turn.asks().insert(pid.clone(), (id, options));
                    turn.external.inject(&json!({
                        "type": "permission_request",
                        "id": pid,
                        "title": tool_call.get("title").cloned().unwrap_or(Value::Null),
                        "toolCall": tool_call,
                        "options": turn.asks().get(&pid).map(|a| a.1.clone()).unwrap_or_default(),
                    }));
                }
                None => self.respond(&id, json!({"outcome": {"outcome": "cancelled"}})),
            },
            (Some(other), Some(id)) => {
                self.send(&json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32601, "message": format!("method not found: {other}")}}));
            }
            (Some(_), None) => {}
            (None, Some(id)) => {
                let Some(n) = id.as_u64() else {
                    return self.protocol_error("a response with an unknown id", raw.as_bytes());
                };
                let tx = self
                    .pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&n);
                if let Some(tx) = tx {
                    let reply = match message.get("error") {
                        Some(e) => Err(e.clone()),
                        None => Ok(message.get("result").cloned().unwrap_or(Value::Null)),
                    };
                    let _ = tx.send(reply);
                }
            }
            (None, None) => self.protocol_error("neither a request nor a response", raw.as_bytes()),
        }
    }

    /// Keeps the session's state current from the updates that change it.
    fn track(&self, update: &Value) {
        match update.get("sessionUpdate").and_then(Value::as_str) {
            Some("current_mode_update") => {
                let Some(mode) = update.get("currentModeId").cloned() else {
                    return;
                };
                self.session.update_acp(|s| {
                    if let Some(s) = s.as_mut() {
                        set_field(
                            s.modes.get_or_insert_with(|| json!({})),
                            "currentModeId",
                            mode,
                        );
                    }
                });
            }
            Some("config_option_update") => {
                let Some(all) = update.get("configOptions").filter(|v| v.is_array()) else {
                    return;
                };
                self.session.update_acp(|s| {
                    if let Some(s) = s.as_mut() {
                        s.config_options = Some(all.clone());
                    }
                });
            }
            _ => {}
        }
    }

    fn protocol_error(&self, message: &str, raw: &[u8]) {
        match self.turn() {
            Some(turn) => turn.external.protocol_error(format!("ACP: {message}"), raw),
            None => tracing::debug!(%message, "ACP protocol error outside a turn"),
        }
    }

    /// Answers a permission request of the turn with the option matching `reply`.
    fn answer(&self, turn: &TurnSink, line: &str) {
        let Ok(message) = serde_json::from_str::<Value>(line) else {
            return;
        };
        let (Some(pid), Some(reply)) = (
            message.get("id").and_then(Value::as_str),
            message.get("reply").and_then(Value::as_str),
        ) else {
            return;
        };
        let Some((id, options)) = turn.asks().remove(pid) else {
            return;
        };
        // A client that named one of the agent's options gets exactly that one (the channel
        // checked it was offered).
        if let Some(option_id) = message.get("optionId").and_then(Value::as_str) {
            let outcome = json!({"outcome": "selected", "optionId": option_id});
            self.respond(&id, json!({ "outcome": outcome }));
            return;
        }
        // Never grant more than the user gave: `once` is only ever `allow_once`; `always` may
        // fall back to `allow_once`; `reject` to `reject_always` (it grants nothing), and
        // `reject_always` to `reject_once`. Without a matching option the answer is
        // `cancelled`, which grants nothing either.
        let wanted: &[&str] = match reply {
            "once" => &["allow_once"],
            "always" => &["allow_always", "allow_once"],
            "reject_always" => &["reject_always", "reject_once"],
            "cancelled" => &[],
            _ => &["reject_once", "reject_always"],
        };
        let chosen = wanted.iter().find_map(|kind| {
            options
                .iter()
                .find(|o| o.get("kind").and_then(Value::as_str) == Some(kind))
                .and_then(|o| o.get("optionId").cloned())
        });
        let outcome = match chosen {
            Some(option_id) => json!({"outcome": "selected", "optionId": option_id}),
            None => json!({"outcome": "cancelled"}),
        };
        self.respond(&id, json!({ "outcome": outcome }));
    }
}

/// Kills a starting agent unless disarmed (`.0 = None`).
struct StopOnDrop(Option<Arc<Process>>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Some(process) = self.0.take() {
            process.stop(ExitReason::Error, Duration::ZERO);
        }
    }
}

/// Sends requests before the connection is complete (`initialize`, `session/new`).
struct Boot {
    out: mpsc::UnboundedSender<String>,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>>,
    next_id: AtomicU64,
}

impl Boot {
    async fn request(&self, method: &str, params: Value, dead: &watch::Receiver<bool>) -> Reply {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        let mut line =
            json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string();
        line.push('\n');
        let _ = self.out.send(line);
        let mut dead = dead.clone();
        tokio::select! {
            r = rx => r.unwrap_or_else(|_| Err(json!("no answer"))),
            _ = dead.wait_for(|d| *d) => Err(json!("the agent exited")),
            _ = tokio::time::sleep(STARTUP) => Err(json!(format!("no answer within {STARTUP:?}"))),
        }
    }
}

async fn write_out(
    mut pipe: tokio::net::unix::pipe::Sender,
    mut rx: mpsc::UnboundedReceiver<String>,
) {
    while let Some(line) = rx.recv().await {
        if pipe.write_all(line.as_bytes()).await.is_err() {
            return;
        }
    }
}

async fn read_messages(
    stdout: tokio::net::unix::pipe::Receiver,
    conn: Arc<Mutex<Option<Arc<Conn>>>>,
    early: Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>>,
    out: mpsc::UnboundedSender<String>,
) {
    let mut reader = BufReader::new(stdout);
    let mut raw = Vec::new();
    let mut skipping = false;
    while let Some(ended) = read_part(&mut reader, &mut raw, MAX_LINE).await {
        if skipping {
            skipping = !ended;
            continue;
        }
        let current = conn.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if !ended {
            skipping = true;
            if let Some(c) = &current {
                c.protocol_error(
                    &format!("a line is longer than {MAX_LINE} bytes; skipped"),
                    &raw,
                );
            }
            continue;
        }
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let Ok(line) = std::str::from_utf8(&raw) else {
            if let Some(c) = &current {
                c.protocol_error("not UTF-8", &raw);
            }
            continue;
        };
        let message: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                if let Some(c) = &current {
                    c.protocol_error(&format!("not JSON: {e}"), &raw);
                }
                continue;
            }
        };
        // Responses to the start-up requests.
        if message.get("method").is_none() {
            if let Some(n) = message.get("id").and_then(Value::as_u64) {
                let tx = early.lock().unwrap_or_else(|p| p.into_inner()).remove(&n);
                if let Some(tx) = tx {
                    let reply = match message.get("error") {
                        Some(e) => Err(e.clone()),
                        None => Ok(message.get("result").cloned().unwrap_or(Value::Null)),
                    };
                    let _ = tx.send(reply);
                    continue;
                }
            }
        }
        match current {
            Some(c) => c.handle(message, line),
            None => {
                if let Some(id) = message
                    .get("id")
                    .filter(|_| message.get("method").is_some())
                {
                    let mut reply = json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32000, "message": "not ready"}}).to_string();
                    reply.push('\n');
                    let _ = out.send(reply);
                }
            }
        }
    }
}

async fn read_stderr(
    stderr: tokio::net::unix::pipe::Receiver,
    conn: Arc<Mutex<Option<Arc<Conn>>>>,
) {
    let mut reader = BufReader::new(stderr);
    let mut raw = Vec::new();
    // Any bytes: a line longer than MAX_LINE becomes several (partial) `log` events.
    while let Some(ended) = read_part(&mut reader, &mut raw, MAX_LINE).await {
        let current = conn.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match current.and_then(|c| c.turn()) {
            Some(turn) => {
                turn.log.append(|b| b.log(Stream::Stderr, &raw, !ended));
            }
            None => tracing::debug!(line = %String::from_utf8_lossy(&raw), "ACP agent stderr"),
        }
    }
}

/// Reads the next line, or its next `max` bytes, into `buf` (cleared first, without the
/// newline): `Some(true)` when the line ended, `Some(false)` when `max` bytes came first (the
/// rest follows in the next calls), `None` at the end of the stream or on a read error.
async fn read_part<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> Option<bool> {
    buf.clear();
    loop {
        let data = match reader.fill_buf().await {
            Ok(data) => data,
            Err(_) => return None,
        };
        if data.is_empty() {
            return (!buf.is_empty()).then_some(true);
        }
        let room = max - buf.len();
        match memchr::memchr(b'\n', &data[..data.len().min(room + 1)]) {
            Some(nl) => {
                buf.extend_from_slice(&data[..nl]);
                reader.consume(nl + 1);
                return Some(true);
            }
            None => {
                let n = data.len().min(room);
                buf.extend_from_slice(&data[..n]);
                reader.consume(n);
                if buf.len() == max {
                    return Some(false);
                }
            }
        }
    }
}

/// One prompt turn: the work of an invoke of an ACP agent.
#[derive(Debug)]
pub struct Turn {
    /// The registry.
    pub agents: Arc<AcpAgents>,
    /// The reaper (to start the agent).
    pub reaper: Arc<Reaper>,
    /// The session, already claimed in `setup`.
    pub session: Arc<Session>,
    /// The permission channel setup, holding the session's claim.
    pub setup: AgentSetup,
    /// How to start the agent.
    pub launch: Launch,
    /// The prompt's content blocks.
    pub prompt: Vec<Value>,
    /// Time between `session/cancel` and killing the agent.
    pub grace: Duration,
    /// The runtime (the turn runs on an invoke's own thread).
    pub runtime: tokio::runtime::Handle,
}

impl Turn {
    /// Runs the turn to its end (blocking the invoke's thread), journaling into `log`.
    pub fn run(self, invoke_id: &InvokeId, process: &Arc<Process>, log: &Arc<EventLog>) -> Outcome {
        let started = Instant::now();
        let runtime = self.runtime.clone();
        let status = runtime.block_on(self.run_async(invoke_id, process, log));
        Outcome {
            status: Ok(status),
            duration: started.elapsed(),
            stop_reason: process.stop_reason(),
        }
    }

    async fn run_async(
        self,
        invoke_id: &InvokeId,
        process: &Arc<Process>,
        log: &Arc<EventLog>,
    ) -> ExitStatus {
        let (external, mut replies) = self.setup.open_external(invoke_id, log);
        // The start (up to STARTUP) gives way to a cancel or the invoke's timeout.
        let start = self
            .agents
            .get_or_start(&self.session, &self.launch, &self.reaper);
        tokio::pin!(start);
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let started = loop {
            tokio::select! {
                r = &mut start => break Some(r),
                _ = tick.tick() => {
                    if process.stop_reason().is_some() {
                        break None;
                    }
                }
            }
        };
        let Some(started) = started else {
            // Returning drops the start, which kills the half-started agent; the next turn
            // starts anew.
            external.close();
            return ExitStatus {
                code: 137,
                signal: None,
            };
        };
        let conn = match started {
            Ok(conn) => conn,
            Err(e) => {
                log.append(|b| {
                    b.event(
                        event::ERROR,
                        &ErrorEvent {
                            phase: Some("acp".into()),
                            message: e.to_string(),
                        },
                    )
                });
                external.close();
                return ExitStatus {
                    code: 1,
                    signal: None,
                };
            }
        };
        let sink = Arc::new(TurnSink {
            log: Arc::clone(log),
            external,
            asks: Mutex::new(HashMap::new()),
            next_ask: AtomicU64::new(0),
        });
        *conn.turn.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&sink));
        let prompt = json!({
            "sessionId": conn.acp_session,
            "prompt": self.prompt,
        });
        let request = conn.request("session/prompt", prompt);
        tokio::pin!(request);
        let mut cancel_at: Option<tokio::time::Instant> = None;
        let answer = loop {
            tokio::select! {
                answer = &mut request => break Some(answer),
                Some(line) = replies.recv() => conn.answer(&sink, &line),
                _ = tick.tick() => {
                    match cancel_at {
                        None if process.stop_reason().is_some() => {
                            conn.send(&json!({"jsonrpc": "2.0", "method": "session/cancel", "params": {"sessionId": conn.acp_session}}));
                            // A cancel answers every open permission request `cancelled`
                            // (journaled `by: "cancel"`).
                            sink.external.cancel_pending();
                            let open: Vec<(Value, Vec<Value>)> = sink.asks().drain().map(|(_, v)| v).collect();
                            for (id, _) in open {
                                conn.respond(&id, json!({"outcome": {"outcome": "cancelled"}}));
                            }
                            cancel_at = Some(tokio::time::Instant::now() + self.grace);
                        }
                        Some(at) if tokio::time::Instant::now() >= at => break None,
                        _ => {}
                    }
                }
            }
        };
        *conn.turn.lock().unwrap_or_else(|p| p.into_inner()) = None;
        // Requests the agent left open when the turn ended are `cancelled` too.
        sink.external.cancel_pending();
        let open: Vec<(Value, Vec<Value>)> = sink.asks().drain().map(|(_, v)| v).collect();
        for (id, _) in open {
            conn.respond(&id, json!({"outcome": {"outcome": "cancelled"}}));
        }
        let status = match answer {
            Some(Ok(result)) => {
                log.append(|b| {
                    b.event(
                        session_event::AGENT,
                        &AgentEvent {
                            name: Some("prompt_response".into()),
                            data: result,
                        },
                    )
                });
                ExitStatus {
                    code: 0,
                    signal: None,
                }
            }
            Some(Err(e)) => {
                // An agent that died mid-turn: its own exit status is the turn's.
                let status = match *conn.dead.borrow() {
                    true => *conn.status.lock().unwrap_or_else(|p| p.into_inner()),
                    false => None,
                };
                let message = match status {
                    Some(ExitStatus {
                        signal: Some(signal),
                        ..
                    }) => format!("the agent was killed by signal {signal} during the turn"),
                    Some(ExitStatus { code, .. }) => {
                        format!("the agent exited with code {code} during the turn")
                    }
                    None => format!("session/prompt failed: {e}"),
                };
                log.append(|b| {
                    b.event(
                        event::ERROR,
                        &ErrorEvent {
                            phase: Some("acp".into()),
                            message,
                        },
                    )
                });
                status.unwrap_or(ExitStatus {
                    code: 1,
                    signal: None,
                })
            }
            None => {
                // The agent did not end the turn within the grace period: kill its tree.
                self.agents.stop(&self.session.id()).await;
                let mut dead = conn.dead.clone();
                let _ = tokio::time::timeout(Duration::from_secs(5), dead.wait_for(|d| *d)).await;
                ExitStatus {
                    code: 137,
                    signal: None,
                }
            }
        };
        sink.external.close();
        status
    }
}
