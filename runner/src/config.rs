//! Command-line flags (with `AGENTBOX_*` environment fallbacks), parsed and validated once at
//! start-up before any port is bound. Handlers only ever see the validated [`Config`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::duration::{parse_duration, parse_size};
pub use crate::listen::Listen;

/// Environment variables that hold the runner's own secrets; they never reach a child process.
pub const SECRET_ENV: &[&str] = &["AGENTBOX_RUNNER_TOKEN", "AGENTBOX_TOKEN_FILE"];

/// The runner's flags.
#[derive(Debug, Parser)]
#[command(
    name = "agentbox-runner",
    version,
    about = "Runs an agent's entrypoint inside a sandbox and streams it over HTTP (SSE)."
)]
pub struct Args {
    /// Where to listen: `HOST:PORT` (port 0 picks a free port; the bound address is printed),
    /// `unix:PATH` (a unix socket), or `fd:N` (a listening socket inherited as descriptor N,
    /// TCP or unix: how the local backend's sandbox launcher hands one over).
    #[arg(long, env = "AGENTBOX_LISTEN", default_value = "0.0.0.0:8421")]
    pub listen: Listen,
    /// The workspace: uploaded files, the install command's and every invoke's working directory.
    #[arg(long, env = "AGENTBOX_WORKSPACE", default_value = "/workspace")]
    pub workspace: PathBuf,
    /// Where configuration and invoke journals are kept [default: <workspace>/.agentbox].
    #[arg(long, env = "AGENTBOX_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Bearer token callers must present. Prefer --token-file or the environment: argv is
    /// visible to every process in the sandbox.
    #[arg(long, env = "AGENTBOX_RUNNER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the bearer token (surrounding whitespace is ignored).
    #[arg(long, env = "AGENTBOX_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// An inherited descriptor (a pipe) to read the bearer token from, then closed: the token
    /// is then in no file, argument or environment a process in the sandbox could read.
    #[arg(long, conflicts_with_all = ["token", "token_file"])]
    pub token_fd: Option<i32>,
    /// A file whose `oom_kill N` line counts the sandbox's memory-limit kills (cgroup v2
    /// `memory.events`, v1 `memory.oom_control`): an invoke killed by SIGKILL while it rose
    /// ends with reason `memory_limit`. Set by the local backend's launcher.
    #[arg(long, env = "AGENTBOX_OOM_EVENTS")]
    pub oom_events: Option<PathBuf>,
    /// Address-space limit (RLIMIT_AS) of every process the runner starts, not of the runner
    /// itself: how a sandbox without a cgroup bounds memory. Set by the local backend's
    /// launcher from the template's `limits.memory` when no cgroup can be made.
    #[arg(long, env = "AGENTBOX_CHILD_MEMORY_LIMIT", value_parser = parse_size)]
    pub child_memory_limit: Option<u64>,
    /// RLIMIT_NPROC of every process the runner starts: they may not have more processes and
    /// threads than this together with the runner (the sandbox's uid's count), while the
    /// runner keeps headroom above it to stop them. Set by the local backend's launcher from
    /// the template's `limits.pids`.
    #[arg(long, env = "AGENTBOX_CHILD_PROCESS_LIMIT")]
    pub child_process_limit: Option<u64>,
    /// Every process the runner starts raises its OOM score (`oom_score_adj` 500), so that the
    /// kernel's memory-limit kill in a sandbox's cgroup takes it rather than the runner. Set by
    /// the local backend's launcher when a cgroup holds the sandbox.
    #[arg(long, env = "AGENTBOX_CHILDREN_OOM_FIRST")]
    pub children_oom_first: bool,
    /// A unix socket the runner relays a TCP listener at `127.0.0.1:3128` to: the Docker
    /// backend's egress proxy, served by the control plane on the host, for a container that
    /// has no network but loopback. Set by the Docker backend.
    #[arg(long, env = "AGENTBOX_EGRESS_RELAY")]
    pub egress_relay: Option<PathBuf>,
    /// Serve without authentication. Only for local experiments.
    #[arg(long, env = "AGENTBOX_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
    /// `agent` (configure + invoke) or `code` (files + exec only).
    #[arg(long, env = "AGENTBOX_MODE", value_enum, default_value_t = Mode::Agent)]
    pub mode: Mode,
    /// Invokes allowed to run at once; more get 429 with Retry-After.
    #[arg(long, env = "AGENTBOX_MAX_CONCURRENT_INVOKES", default_value_t = 16)]
    pub max_concurrent_invokes: u32,
    /// Timeout of an invoke that asks for none (Go syntax: 90s, 5m, 1h30m).
    #[arg(long, env = "AGENTBOX_DEFAULT_TIMEOUT", default_value = "30m", value_parser = parse_duration)]
    pub default_timeout: Duration,
    /// Upper bound for `?timeout=`; larger requests are capped to it.
    #[arg(long, env = "AGENTBOX_MAX_TIMEOUT", default_value = "24h", value_parser = parse_duration)]
    pub max_timeout: Duration,
    /// Time limit of one install command.
    #[arg(long, env = "AGENTBOX_INSTALL_TIMEOUT", default_value = "30m", value_parser = parse_duration)]
    pub install_timeout: Duration,
    /// Interval of `: keepalive` comments on idle streams.
    #[arg(long, env = "AGENTBOX_KEEPALIVE", default_value = "15s", value_parser = parse_duration)]
    pub keepalive: Duration,
    /// Time between SIGTERM and SIGKILL when an invoke is canceled or times out.
    #[arg(long, env = "AGENTBOX_GRACE", default_value = "5s", value_parser = parse_duration)]
    pub grace: Duration,
    /// Largest single file accepted by configure.
    #[arg(long, env = "AGENTBOX_MAX_FILE_BYTES", default_value = "64MiB", value_parser = parse_size)]
    pub max_file_bytes: u64,
    /// Largest sum of file sizes accepted by one configure.
    #[arg(long, env = "AGENTBOX_MAX_TOTAL_BYTES", default_value = "256MiB", value_parser = parse_size)]
    pub max_total_bytes: u64,
    /// Most files accepted by one configure.
    #[arg(long, env = "AGENTBOX_MAX_FILES", default_value_t = 10_000)]
    pub max_files: u64,
    /// Largest file accepted by `PUT /v1/files/{path}`.
    #[arg(long, env = "AGENTBOX_MAX_UPLOAD_BYTES", default_value = "1GiB", value_parser = parse_size)]
    pub max_upload_bytes: u64,
    /// Output bytes stored per invoke journal; past it output is counted, not stored.
    #[arg(long, env = "AGENTBOX_JOURNAL_MAX_BYTES", default_value = "256MiB", value_parser = parse_size)]
    pub journal_max_bytes: u64,
    /// With `?onDisconnect=linger` (the default is `cancel`), how long an invoke runs with no
    /// client attached before it is canceled.
    #[arg(long, env = "AGENTBOX_LINGER", default_value = "30s", value_parser = parse_duration)]
    pub linger: Duration,
    /// How long a shell started by a terminal WebSocket (`GET /v1/terminal`) keeps running
    /// with no terminal attached, for a reconnect; then its tree is stopped.
    #[arg(long, env = "AGENTBOX_TERMINAL_RECONNECT_WINDOW", default_value = "5m", value_parser = parse_duration)]
    pub terminal_reconnect_window: Duration,
    /// Finished invokes whose journals are kept; older ones are pruned.
    #[arg(long, env = "AGENTBOX_RETAIN_INVOKES", default_value_t = 100)]
    pub retain_invokes: usize,
    /// Total size of kept journals; the oldest finished ones are pruned past it.
    #[arg(long, env = "AGENTBOX_RETAIN_BYTES", default_value = "1GiB", value_parser = parse_size)]
    pub retain_bytes: u64,
    /// How long a permission request waits for an answer before the runner rejects it.
    #[arg(long, env = "AGENTBOX_PERMISSION_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub permission_timeout: Duration,
    /// Open HTTP connections at most (lowered to half the open-file limit); at the cap the
    /// connection idle for longest is closed to make room, or the new one when all are busy.
    #[arg(long, env = "AGENTBOX_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// A request head must arrive in full within this time of its first byte (of the accept,
    /// on a new connection); else the connection is closed.
    #[arg(long, env = "AGENTBOX_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,
    /// A keep-alive connection with no request in progress is closed after this long.
    #[arg(long, env = "AGENTBOX_IDLE_TIMEOUT", default_value = "2m", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Bytes of each of stdout and stderr kept in one JSON answer (exec, and invoke with
    /// `Accept: application/json`); past it `stdoutTruncated`/`stderrTruncated` are set. The
    /// journal keeps the output up to --journal-max-bytes either way. The default keeps one
    /// answer's memory (both streams, and the JSON of them) well under 64 MiB.
    #[arg(long, env = "AGENTBOX_MAX_JSON_OUTPUT", default_value = "8MiB", value_parser = parse_size)]
    pub max_json_output: u64,
    /// Sessions kept; past it the oldest idle ones are deleted (checked at start and when a
    /// session is created).
    #[arg(long, env = "AGENTBOX_RETAIN_SESSIONS", default_value_t = 1000)]
    pub retain_sessions: usize,
    /// Total size of session histories on disk; past it the oldest idle sessions are deleted
    /// (checked at start and when a session is created).
    #[arg(long, env = "AGENTBOX_RETAIN_SESSION_BYTES", default_value = "1GiB", value_parser = parse_size)]
    pub retain_session_bytes: u64,
    /// A JSON object of environment variables (the sandbox's named credentials), read afresh
    /// for every process the runner starts (install, invoke, exec, session), so a value the
    /// control plane rewrites reaches the next one without a restart. A missing file is no
    /// variables; a file past 16 MiB or not a JSON object of strings is ignored (logged, without
    /// its content).
    #[arg(long, env = "AGENTBOX_CREDENTIALS_ENV")]
    pub credentials_env: Option<PathBuf>,
}

/// The runner's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// configure + invoke.
    Agent,
    /// files + exec only.
    Code,
}

impl Mode {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Agent => "agent",
            Mode::Code => "code",
        }
    }
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen.
    pub listen: Listen,
    /// Canonical workspace path.
    pub workspace: PathBuf,
    /// State directory (created).
    pub state_dir: PathBuf,
    /// The bearer token, or `None` with `--insecure-no-auth`.
    pub token: Option<String>,
    /// agent or code.
    pub mode: Mode,
    /// Concurrency cap.
    pub max_concurrent_invokes: u32,
    /// Default invoke timeout.
    pub default_timeout: Duration,
    /// Maximum invoke timeout.
    pub max_timeout: Duration,
    /// Install time limit.
    pub install_timeout: Duration,
    /// Keepalive interval.
    pub keepalive: Duration,
    /// SIGTERM → SIGKILL grace.
    pub grace: Duration,
    /// Per-file limit.
    pub max_file_bytes: u64,
    /// Per-configure total limit.
    pub max_total_bytes: u64,
    /// Per-configure file count limit.
    pub max_files: u64,
    /// Upload limit.
    pub max_upload_bytes: u64,
    /// Per-invoke journal cap.
    pub journal_max_bytes: u64,
    /// Linger period for detached invokes.
    pub linger: Duration,
    /// Reconnect window of a terminal's shell.
    pub terminal_reconnect_window: Duration,
    /// Finished invokes kept.
    pub retain_invokes: usize,
    /// Journal bytes kept.
    pub retain_bytes: u64,
    /// Unanswered permission requests are rejected after this long.
    pub permission_timeout: Duration,
    /// The sandbox's memory-kill counter (`--oom-events`).
    pub oom_events: Option<PathBuf>,
    /// The egress proxy's unix socket that `127.0.0.1:3128` relays to (`--egress-relay`).
    pub egress_relay: Option<PathBuf>,
    /// The environment children start from: the runner's own, minus [`SECRET_ENV`].
    pub base_env: Vec<(String, String)>,
    /// Connection cap and timeouts of the accept loop.
    pub limits: agentbox_serve::Limits,
    /// Per-stream output kept in a JSON answer.
    pub max_json_output: u64,
    /// Sessions kept.
    pub retain_sessions: usize,
    /// Session history bytes kept.
    pub retain_session_bytes: u64,
    /// The credentials' environment file (`--credentials-env`).
    pub credentials_env: Option<PathBuf>,
}

/// The largest `--credentials-env` file read.
const MAX_CREDENTIALS_ENV: u64 = 16 << 20;

impl Config {
    /// The environment a child starts from: [`Config::base_env`], then the variables of
    /// `--credentials-env` as the file holds them now.
    pub fn child_env(&self) -> Vec<(String, String)> {
        let mut env = self.base_env.clone();
        let Some(path) = &self.credentials_env else {
            return env;
        };
        let read = || -> Result<BTreeMap<String, String>, String> {
            let file = match std::fs::File::open(path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
                Err(e) => return Err(e.kind().to_string()),
            };
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(
                &mut std::io::Read::take(file, MAX_CREDENTIALS_ENV + 1),
                &mut bytes,
            )
            .map_err(|e| e.kind().to_string())?;
            if bytes.len() as u64 > MAX_CREDENTIALS_ENV {
                return Err("larger than 16 MiB".into());
            }
            // Never quote the parser's message: it can hold a part of a value.
            serde_json::from_slice(&bytes).map_err(|_| "not a JSON object of strings".into())
        };
        match read() {
            Ok(vars) => {
                env.extend(vars.into_iter().filter(|(k, v)| {
                    !k.is_empty() && !k.contains(['=', '\0']) && !v.contains('\0')
                }))
            }
            Err(e) => tracing::warn!(path = %path.display(), "credentials env ignored: {e}"),
        }
        env
    }
}

impl Args {
    /// Validates the flags and prepares the directories. Any error here is reported before a
    /// port is bound, and `main` exits 64.
    pub fn into_config(self) -> Result<Config, String> {
        let token = match (self.token, self.token_file, self.token_fd) {
            (Some(t), _, _) => Some(t),
            (None, Some(path), _) => Some(
                std::fs::read_to_string(&path)
                    .map_err(|e| format!("cannot read --token-file {}: {e}", path.display()))?,
            ),
            (None, None, Some(fd)) => Some(crate::listen::read_token_fd(fd)?),
            (None, None, None) => None,
        }
        .map(|t| t.trim().to_owned());
        let token = match token {
            Some(t) if t.is_empty() => return Err("the runner token is empty".into()),
            Some(t) if self.insecure_no_auth => {
                drop(t);
                return Err("--insecure-no-auth and a token are mutually exclusive".into());
            }
            Some(t) => Some(t),
            None if self.insecure_no_auth => None,
            None => {
                return Err(
                    "no runner token: pass --token-file FILE, set AGENTBOX_RUNNER_TOKEN, \
                     or run with --insecure-no-auth for a local experiment"
                        .into(),
                )
            }
        };
        if self.max_concurrent_invokes == 0 {
            return Err("--max-concurrent-invokes must be at least 1".into());
        }
        if self.max_connections == 0 {
            return Err("--max-connections must be at least 1".into());
        }
        if self.header_read_timeout.is_zero() || self.idle_timeout.is_zero() {
            return Err("--header-read-timeout and --idle-timeout must be positive".into());
        }
        if self.default_timeout > self.max_timeout {
            return Err("--default-timeout is larger than --max-timeout".into());
        }
        std::fs::create_dir_all(&self.workspace)
            .map_err(|e| format!("cannot create workspace {}: {e}", self.workspace.display()))?;
        let workspace = std::fs::canonicalize(&self.workspace)
            .map_err(|e| format!("cannot resolve workspace {}: {e}", self.workspace.display()))?;
        let state_dir = self
            .state_dir
            .unwrap_or_else(|| workspace.join(".agentbox"));
        std::fs::create_dir_all(&state_dir)
            .map_err(|e| format!("cannot create state dir {}: {e}", state_dir.display()))?;
        let state_dir = std::fs::canonicalize(&state_dir)
            .map_err(|e| format!("cannot resolve state dir {}: {e}", state_dir.display()))?;
        crate::spawn::set_child_memory_limit(self.child_memory_limit.unwrap_or(0));
        crate::spawn::set_child_process_limit(self.child_process_limit.unwrap_or(0));
        crate::spawn::set_children_oom_first(self.children_oom_first);
        let base_env = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| !SECRET_ENV.contains(&k.as_str()))
            .collect();
        Ok(Config {
            egress_relay: self.egress_relay,
            listen: self.listen,
            workspace,
            state_dir,
            token,
            mode: self.mode,
            max_concurrent_invokes: self.max_concurrent_invokes,
            default_timeout: self.default_timeout,
            max_timeout: self.max_timeout,
            install_timeout: self.install_timeout,
            keepalive: self.keepalive,
            grace: self.grace,
            max_file_bytes: self.max_file_bytes,
            max_total_bytes: self.max_total_bytes,
            max_files: self.max_files,
            max_upload_bytes: self.max_upload_bytes,
            journal_max_bytes: self.journal_max_bytes,
            linger: self.linger,
            terminal_reconnect_window: self.terminal_reconnect_window,
            retain_invokes: self.retain_invokes,
            retain_bytes: self.retain_bytes,
            permission_timeout: self.permission_timeout,
            oom_events: self.oom_events,
            base_env,
            limits: agentbox_serve::Limits {
                max_connections: self.max_connections,
                header_read_timeout: self.header_read_timeout,
                idle_timeout: self.idle_timeout,
            },
            max_json_output: self.max_json_output,
            retain_sessions: self.retain_sessions,
            retain_session_bytes: self.retain_session_bytes,
            credentials_env: self.credentials_env,
        })
    }
}
