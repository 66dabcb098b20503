//! Invokes: the registry of running and recent invokes, starting one (spawn thread, stdin
//! copier, timeout), cancel, the disconnect policy, restart recovery and journal retention.
//! HTTP handlers for these live in [`crate::server`]; this module never sees a request.

use std::collections::BTreeMap;
use std::io::{self, Read as _};
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use agentbox_proto::{
    event, ErrorEvent, ExitEvent, ExitReason, InvokeId, InvokeKind, InvokeState, InvokeSummary,
    StartEvent, TruncatedEvent,
};
use axum::body::Body;
use bytes::Bytes;
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::fsutil::{now_ms, random_hex};
use crate::journal::{EventLog, Journal, StaleTail, Subscription};
use crate::proctree;
use crate::supervisor::{self, Outcome, Process, Reaper, RunSpec};

pub use agentbox_proto::{OnDisconnect, StreamMode};

/// Bodies up to this size are read before the spawn and written by the invoke's own thread;
/// larger or chunked ones are copied as they come. A fresh pipe always holds one page, even
/// when the user is over `pipe-user-pages-soft` and pipes shrink to that, so writing this much
/// never blocks the thread that must also read the process's output.
const STDIN_INLINE_MAX: u64 = 4096;

/// What an invoke's process reads on stdin; either way stdin is a pipe, closed at the end.
#[derive(Debug)]
pub enum Stdin {
    /// Bytes known up front (usually a small request body, often none).
    Bytes(Bytes),
    /// A body copied as it arrives; `fallback` is written instead when it turns out empty.
    Stream {
        body: Body,
        fallback: Option<String>,
    },
}

impl Stdin {
    /// The request body, or `fallback` when the body is empty (`?prompt=` without a body).
    /// A body of known small size is read here, so the process gets it without a copy task.
    pub async fn from_body(body: Body, fallback: Option<String>) -> Result<Stdin> {
        use axum::body::HttpBody as _;
        match body.size_hint().exact() {
            Some(n) if n <= STDIN_INLINE_MAX => {
                let bytes = body
                    .collect()
                    .await
                    .map_err(|e| Error::InvalidRequest(format!("cannot read the body: {e}")))?
                    .to_bytes();
                Ok(match fallback {
                    Some(text) if bytes.is_empty() => Stdin::Bytes(Bytes::from(text)),
                    _ => Stdin::Bytes(bytes),
                })
            }
            _ => Ok(Stdin::Stream { body, fallback }),
        }
    }
}

/// Name prefix of the spare files earlier builds kept (removed at start; spares now keep the
/// name they were created with, see [`Invoke::base`]).
const SPARE_PREFIX: &str = "spare-";
/// At most this many spare pairs are kept.
const MAX_SPARES: usize = 64;
/// The newest spares keep their journal open from retiring to reuse (the next invokes open
/// no journal); older ones are opened by path. Few, as every spawn copies the descriptor
/// table.
const WARM_SPARES: usize = 2;

/// A pruned invoke's file pair kept for a new invoke (see [`Invokes::retire`]), under the
/// name the pair was created with.
#[derive(Debug)]
struct Spare {
    /// `<state>/invokes/<name>`.
    base: PathBuf,
    /// The old bytes its journal still holds (counted in `--retain-bytes`).
    bytes: u64,
    /// The journal (read and write), still open from retiring: only the newest
    /// [`WARM_SPARES`].
    open: Option<std::fs::File>,
    /// The summary: open (with the journal) for the newest spares, and its length.
    summary: SummaryFile,
}

/// An invoke's summary file (`<name>.json`): one JSON line written over the file in place,
/// padded with spaces to cover what it held before, so that the file is never truncated or
/// extended once it has its size (a truncate cost a forced writeback on ext4 at the next
/// close, and an extension a block allocation). A NUL first byte marks a spare's summary.
#[derive(Debug, Default)]
struct SummaryFile {
    /// Open for writing, or None.
    file: Option<std::fs::File>,
    /// The file's length, when known (read from the file when it is opened otherwise).
    len: Option<u64>,
}

impl SummaryFile {
    /// A summary file that does not exist yet.
    fn new() -> Self {
        Self {
            file: None,
            len: Some(0),
        }
    }

    /// The open file at `path` (created when missing) and its length.
    fn open(&mut self, path: &Path) -> io::Result<(&std::fs::File, u64)> {
        if self.file.is_none() {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)?;
            if self.len.is_none() {
                self.len = Some(file.metadata()?.len());
            }
            self.file = Some(file);
        }
        match (&self.file, self.len) {
            (Some(file), Some(len)) => Ok((file, len)),
            _ => Err(io::Error::other("summary file not open")),
        }
    }

    /// Writes `line` (one JSON object, no newline) over the file, padded to its length.
    fn write(&mut self, path: &Path, line: &[u8]) -> io::Result<()> {
        let (file, len) = self.open(path)?;
        let mut bytes = Vec::with_capacity((line.len() + 1).max(len as usize));
        bytes.extend_from_slice(line);
        let padded = (len as usize).max(line.len() + 1);
        bytes.resize(padded - 1, b' ');
        bytes.push(b'\n');
        file.write_all_at(&bytes, 0)?;
        self.len = Some(padded as u64);
        Ok(())
    }
}

/// What to start.
#[derive(Debug)]
pub struct StartRequest {
    /// invoke or exec.
    pub kind: InvokeKind,
    /// argv.
    pub argv: Vec<String>,
    /// Environment added on top of the runner's base environment.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: PathBuf,
    /// The time limit.
    pub timeout: Duration,
    /// What the process reads on stdin.
    pub stdin: Stdin,
    /// The disconnect policy.
    pub on_disconnect: OnDisconnect,
    /// How output becomes `log` events.
    pub stream: StreamMode,
    /// The agent channel (and session), for invokes of the entrypoint.
    pub agent: Option<crate::channel::AgentSetup>,
    /// For an ACP agent: the prompt turn to run instead of a process.
    pub acp: Option<crate::acp::Turn>,
    /// A process (`kind: process`): its pseudo-terminal, label, and how long it runs with no
    /// client attached under `OnDisconnect::Linger` (default `--linger`).
    pub process: Option<ProcessOptions>,
}

/// What a long-lived process (`POST /v1/processes`, a terminal's shell) adds to a run.
#[derive(Debug, Clone, Default)]
pub struct ProcessOptions {
    /// Run on a pseudo-terminal of this size.
    pub pty: Option<agentbox_proto::PtySize>,
    /// The caller's label.
    pub tag: Option<String>,
    /// The linger period (for a terminal's shell: the reconnect window).
    pub linger: Option<Duration>,
}

/// The live ends of a process: its stdin (kept open for `POST .../stdin`) and its
/// pseudo-terminal's master (for resizes).
#[derive(Debug, Default)]
struct Interactive {
    argv: Vec<String>,
    linger: Option<Duration>,
    /// The write end of stdin (a copy of the master on a terminal); None once closed. A
    /// tokio lock: a write waits on a blocking thread while the process does not read.
    stdin: tokio::sync::Mutex<Option<std::process::ChildStdin>>,
    master: Mutex<Option<std::os::fd::OwnedFd>>,
    /// The last event a terminal WebSocket that went away had sent (its reconnect replays
    /// from after it).
    terminal_sent: AtomicU64,
}

/// Persisted summary of an invoke (`<name>.json` next to its journal `<name>.events`, see
/// [`Invoke::base`]). A cache of what the journal says, plus the pid: when it is missing or
/// damaged, the journal decides.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    invoke_id: InvokeId,
    #[serde(default)]
    kind: InvokeKind,
    started_at: u64,
    state: InvokeState,
    #[serde(default)]
    pid: Option<i32>,
    /// Start time of `pid`, to tell it from a later process that reuses the pid.
    #[serde(default)]
    pid_started: Option<u64>,
    #[serde(default)]
    exit_code: Option<i32>,
    #[serde(default)]
    reason: Option<ExitReason>,
    #[serde(default)]
    duration_ms: Option<u64>,
    /// Sequence number of the last event, once exited.
    #[serde(default)]
    last_event_id: u64,
    /// A process's terminal size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pty: Option<agentbox_proto::PtySize>,
    /// A process's label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tag: Option<String>,
}

impl Meta {
    /// The summary of an invoke that has just started.
    fn running(invoke_id: InvokeId, kind: InvokeKind, started_at: u64) -> Self {
        Self {
            invoke_id,
            kind,
            started_at,
            state: InvokeState::Running,
            pid: None,
            pid_started: None,
            exit_code: None,
            reason: None,
            duration_ms: None,
            last_event_id: 0,
            pty: None,
            tag: None,
        }
    }
}

/// One invoke, running or finished.
#[derive(Debug)]
pub struct Invoke {
    id: InvokeId,
    /// `<state>/invokes/<name>`: the journal is `<name>.events`, the summary `<name>.json`,
    /// where `name` is the id of the invoke that created the pair: files recycled from a
    /// pruned invoke keep their names (a rename is an ext4 journal transaction, and two per
    /// invoke were 8% of the runner's CPU), and both files name the invoke they hold (the
    /// summary's `invokeId`, the journal's `start`). Two files and no directory per invoke:
    /// creating and deleting inodes is a real share of an invoke's cost.
    base: PathBuf,
    meta: Mutex<Meta>,
    /// The summary file, open while the invoke runs.
    meta_file: Mutex<SummaryFile>,
    /// Held while running; afterwards only weakly, so a finished invoke that nobody watches
    /// keeps no file descriptors (every spawn pays for open descriptors at exec).
    log: Mutex<LogRef>,
    /// The journal's size once finished (for retention without a stat).
    journal_size: AtomicU64,
    /// Counted in [`Invokes::finished`] (finished, its journal size fixed): prunable.
    counted: std::sync::atomic::AtomicBool,
    process: Option<Arc<Process>>,
    policy: OnDisconnect,
    attached: AtomicUsize,
    detach_generation: AtomicU64,
    /// Set for a process started by this runner (`kind: process`).
    interactive: Option<Interactive>,
}

impl Invoke {
    /// The id.
    pub fn id(&self) -> &InvokeId {
        &self.id
    }

    fn meta(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this is a process (`POST /v1/processes`, a terminal's shell).
    pub fn is_process(&self) -> bool {
        self.meta().kind == InvokeKind::Process
    }

    /// Whether it runs on a pseudo-terminal.
    pub fn is_terminal(&self) -> bool {
        self.meta().pty.is_some()
    }

    /// The process summary.
    pub fn process_summary(&self) -> agentbox_proto::ProcessSummary {
        let summary = self.summary();
        let meta = self.meta().clone();
        agentbox_proto::ProcessSummary {
            id: summary.invoke_id,
            state: summary.state,
            pid: (summary.state == InvokeState::Running)
                .then_some(meta.pid)
                .flatten(),
            pty: meta.pty,
            tag: meta.tag,
            argv: self.interactive.as_ref().map(|i| i.argv.clone()),
            started_at: summary.started_at,
            exit_code: summary.exit_code,
            reason: summary.reason,
            duration_ms: summary.duration_ms,
            last_event_id: summary.last_event_id,
        }
    }

    fn running_process(&self) -> Result<(&Interactive, Arc<Process>)> {
        match (&self.interactive, &self.process) {
            (Some(live), Some(process)) if self.is_running() => Ok((live, Arc::clone(process))),
            _ => Err(Error::ProcessExited(format!(
                "process {} has exited",
                self.id
            ))),
        }
    }

    /// Writes `data` to the process's stdin (on a blocking thread: a process that does not
    /// read blocks only this write), then closes stdin when `close` (on a terminal, `close`
    /// sends end-of-file, ^D, instead: the terminal stays).
    pub async fn write_stdin(&self, data: Bytes, close: bool) -> Result<()> {
        let (live, _) = self.running_process()?;
        let terminal = self.is_terminal();
        let mut slot = live.stdin.lock().await;
        let Some(stdin) = slot.take() else {
            return Err(Error::ProcessExited(format!(
                "the stdin of process {} is closed",
                self.id
            )));
        };
        let mut data = data.to_vec();
        if close && terminal {
            data.push(0x04);
        }
        let (stdin, written) = tokio::task::spawn_blocking(move || {
            use std::io::Write as _;
            let mut stdin = stdin;
            let written = stdin.write_all(&data);
            (stdin, written)
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))?;
        if !close || terminal {
            *slot = Some(stdin);
        }
        written.map_err(|e| Error::ProcessExited(format!("cannot write to the process: {e}")))
    }

    /// Sends `signal` to the root process, or its whole process group.
    pub fn signal(&self, signal: nix::sys::signal::Signal, group: bool) -> Result<()> {
        let (_, process) = self.running_process()?;
        let Some(pid) = process.pid() else {
            return Err(Error::ProcessExited(format!(
                "process {} has no pid",
                self.id
            )));
        };
        let pid = nix::unistd::Pid::from_raw(pid);
        let sent = if group {
            nix::sys::signal::killpg(pid, signal)
        } else {
            nix::sys::signal::kill(pid, signal)
        };
        sent.map_err(|e| Error::ProcessExited(format!("cannot signal process {}: {e}", self.id)))
    }

    /// Resizes its pseudo-terminal (the kernel sends SIGWINCH to its foreground group).
    pub fn resize(&self, size: agentbox_proto::PtySize) -> Result<()> {
        if !self.is_terminal() {
            return Err(Error::NotATerminal(format!(
                "process {} has no terminal to resize",
                self.id
            )));
        }
        let (live, _) = self.running_process()?;
        let master = live.master.lock().unwrap_or_else(|p| p.into_inner());
        let Some(master) = master.as_ref() else {
            return Err(Error::ProcessExited(format!(
                "process {} has exited",
                self.id
            )));
        };
        crate::spawn::set_pty_size(master, size.cols, size.rows)
            .map_err(|e| Error::Internal(format!("cannot resize the terminal: {e}")))?;
        self.meta().pty = Some(size);
        Ok(())
    }

    /// The last event a terminal that went away had sent.
    pub fn terminal_sent(&self) -> u64 {
        self.interactive
            .as_ref()
            .map_or(0, |i| i.terminal_sent.load(Ordering::SeqCst))
    }

    /// Records the last event a terminal that goes away had sent.
    pub fn set_terminal_sent(&self, seq: u64) {
        if let Some(i) = &self.interactive {
            i.terminal_sent.store(seq, Ordering::SeqCst);
        }
    }

    /// Waits until the `exit` event is published, at most `window`; whether it is.
    pub async fn wait_exit(&self, window: Duration) -> bool {
        if !self.is_running() {
            return true;
        }
        let Some(log) = self.loaded() else {
            return !self.is_running();
        };
        let Ok(sub) = log.subscribe(0) else {
            return !self.is_running();
        };
        sub.closed_within(window).await;
        !self.is_running()
    }

    /// Whether the exit event has not been written yet.
    pub fn is_running(&self) -> bool {
        self.meta().state == InvokeState::Running
    }

    /// The wire summary.
    pub fn summary(&self) -> InvokeSummary {
        let meta = self.meta().clone();
        let last_event_id = self
            .loaded()
            .map_or(meta.last_event_id, |l| l.progress().last_seq);
        InvokeSummary {
            invoke_id: meta.invoke_id,
            kind: meta.kind,
            state: meta.state,
            started_at: meta.started_at,
            exit_code: meta.exit_code,
            reason: meta.reason,
            duration_ms: meta.duration_ms,
            last_event_id,
        }
    }

    /// The event log, opening the journal of an invoke found on disk at start-up.
    pub fn log(&self) -> io::Result<Arc<EventLog>> {
        let mut slot = self.log.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(log) = slot.get() {
            return Ok(log);
        }
        if slot.retired {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("invoke {} was pruned", self.id),
            ));
        }
        let (log, _) = EventLog::open_existing(&self.journal_path())?;
        log.close();
        slot.weak = Arc::downgrade(&log);
        Ok(log)
    }

    /// The event log if it is in memory.
    fn loaded(&self) -> Option<Arc<EventLog>> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).get()
    }

    fn set_log(&self, log: &Arc<EventLog>, strong: bool) {
        let mut slot = self.log.lock().unwrap_or_else(|p| p.into_inner());
        slot.weak = Arc::downgrade(log);
        slot.strong = strong.then(|| Arc::clone(log));
    }

    /// Registers a watching client; dropping the guard applies the disconnect policy.
    pub fn attach(self: &Arc<Self>, invokes: &Arc<Invokes>) -> Attachment {
        self.attached.fetch_add(1, Ordering::SeqCst);
        Attachment {
            invoke: Arc::clone(self),
            invokes: Arc::clone(invokes),
        }
    }

    fn journal_bytes(&self) -> u64 {
        match self.journal_size.load(Ordering::Relaxed) {
            0 => self.loaded().map_or_else(
                || std::fs::metadata(self.journal_path()).map_or(0, |m| m.len()),
                |log| log.progress().end,
            ),
            n => n,
        }
    }

    /// Appends the summary, fsynced, and closes the summary file.
    fn save_meta(&self) {
        self.write_meta(true, true);
    }

    /// Appends the summary (not fsynced); `close` when it is the last one.
    fn save_meta_fast(&self, close: bool) {
        self.write_meta(false, close);
    }

    fn journal_path(&self) -> PathBuf {
        self.base.with_extension("events")
    }

    fn meta_path(&self) -> PathBuf {
        self.base.with_extension("json")
    }

    /// Writes the summary over `<name>.json` as one JSON line (see [`SummaryFile`]). The file
    /// stays open while the invoke runs.
    fn write_meta(&self, durable: bool, close: bool) {
        let line = match serde_json::to_vec(&*self.meta()) {
            Ok(line) => line,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode invoke state");
                return;
            }
        };
        let mut slot = self.meta_file.lock().unwrap_or_else(|p| p.into_inner());
        let written = slot
            .write(&self.meta_path(), &line)
            .and_then(|()| match &slot.file {
                Some(file) if durable => file.sync_data(),
                _ => Ok(()),
            });
        if let Err(e) = written {
            tracing::error!(invoke = %self.id, error = %e, "cannot persist invoke state");
        }
        if close {
            slot.file = None;
        }
    }
}

/// Whether `<base>.events` and `<base>.json` are a pruned invoke's files kept for reuse: both
/// empty or barred by a NUL first byte (see [`Invokes::retire`]; an empty summary is how
/// earlier versions marked it).
fn is_spare(base: &Path) -> bool {
    let barred = |path: PathBuf| {
        std::fs::File::open(path).is_ok_and(|mut f| {
            let mut first = [0u8; 1];
            matches!(f.read(&mut first), Ok(0) | Ok(1) if first[0] == 0)
        })
    };
    barred(base.with_extension("json")) && barred(base.with_extension("events"))
}

/// The `start` event at the head of a journal, when it is there.
fn journal_start(path: &Path) -> Option<StartEvent> {
    let mut head = vec![0u8; 4096];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .ok()?;
    let (frames, _) = crate::sse::parse_frames(&head[..n]);
    let first = frames.first().filter(|f| f.event == event::START)?;
    serde_json::from_str(first.data).ok()
}

/// The summary in a `<name>.json`: its last line that parses (a torn last line is skipped).
fn parse_meta(bytes: &[u8]) -> std::result::Result<Meta, String> {
    bytes
        .split(|b| *b == b'\n')
        .rev()
        .filter(|line| !line.is_empty())
        .find_map(|line| serde_json::from_slice(line).ok())
        .ok_or_else(|| "no complete summary line".to_owned())
}

/// How an invoke holds its event log.
#[derive(Debug, Default)]
struct LogRef {
    strong: Option<Arc<EventLog>>,
    weak: std::sync::Weak<EventLog>,
    /// Pruned, its files kept (under its name) for a new invoke: never to be read again.
    retired: bool,
}

impl LogRef {
    fn get(&self) -> Option<Arc<EventLog>> {
        self.strong.clone().or_else(|| self.weak.upgrade())
    }
}

/// A client watching an invoke. Dropping it applies the invoke's [`OnDisconnect`] policy when
/// it was the last one.
#[derive(Debug)]
pub struct Attachment {
    invoke: Arc<Invoke>,
    invokes: Arc<Invokes>,
}

impl Attachment {
    /// The invoke watched.
    pub fn invoke(&self) -> &Arc<Invoke> {
        &self.invoke
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        let invoke = &self.invoke;
        if invoke.attached.fetch_sub(1, Ordering::SeqCst) != 1 || !invoke.is_running() {
            return;
        }
        let Some(process) = invoke.process.clone() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let grace = self.invokes.cfg.grace;
        match invoke.policy {
            OnDisconnect::Continue => {}
            OnDisconnect::Cancel => {
                tracing::info!(invoke = %invoke.id, "client went away: canceling");
                let _guard = runtime.enter();
                process.stop(ExitReason::Canceled, grace);
            }
            OnDisconnect::Linger => {
                let generation = invoke.detach_generation.fetch_add(1, Ordering::SeqCst) + 1;
                let invoke = Arc::clone(invoke);
                let linger = invoke
                    .interactive
                    .as_ref()
                    .and_then(|i| i.linger)
                    .unwrap_or(self.invokes.cfg.linger);
                runtime.spawn(async move {
                    tokio::select! {
                        _ = tokio::time::sleep(linger) => {}
                        _ = process.wait_done() => return,
                    }
                    if invoke.attached.load(Ordering::SeqCst) == 0
                        && invoke.detach_generation.load(Ordering::SeqCst) == generation
                    {
                        tracing::info!(invoke = %invoke.id, "no client for the linger period: canceling");
                        process.stop(ExitReason::Canceled, grace);
                    }
                });
            }
        }
    }
}

/// The registry of invokes.
#[derive(Debug)]
pub struct Invokes {
    cfg: Arc<Config>,
    reaper: Arc<Reaper>,
    permits: Arc<Semaphore>,
    map: Mutex<BTreeMap<InvokeId, Arc<Invoke>>>,
    dir: PathBuf,
    /// `dir`, open: a recycled pair changes nothing in it, so starting an invoke on one sets
    /// its modification time instead (the control plane reads `lastActivityAt` off it).
    dir_handle: Option<std::fs::File>,
    pruning: Mutex<()>,
    prune_wanted: std::sync::atomic::AtomicBool,
    /// Finished invokes in `map`, and the bytes of their journals: pruning looks at the
    /// oldest only when these are over `--retain-invokes` or `--retain-bytes`.
    finished: AtomicUsize,
    finished_bytes: AtomicU64,
    /// Journal+summary pairs of pruned invokes (under their names), reused by new invokes
    /// newest first.
    spares: Mutex<Vec<Spare>>,
    /// Memory-limit kills already attributed to an invoke (`--oom-events`).
    oom_seen: AtomicU64,
}

/// The `oom_kill N` count of a cgroup's `memory.events` (v2) or `memory.oom_control` (v1).
fn oom_kills(path: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}

impl Invokes {
    /// The registry, with invokes left by an earlier runner recovered: those that were running
    /// when it died get an `exit` event with reason `runner_restarted`.
    pub fn recover(cfg: Arc<Config>, reaper: Arc<Reaper>) -> io::Result<Arc<Self>> {
        let dir = cfg.state_dir.join("invokes");
        std::fs::create_dir_all(&dir)?;
        let mut map = BTreeMap::new();
        let (mut finished, mut finished_bytes) = (0usize, 0u64);
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(SPARE_PREFIX))
            {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "events") {
                continue;
            }
            let Some(name) = path.file_stem().and_then(|n| n.to_str()) else {
                continue;
            };
            if !InvokeId::is_well_formed(name) {
                continue;
            }
            let base = dir.join(name);
            if is_spare(&base) {
                // Pruned and emptied for reuse by a runner that stopped before reusing it.
                for ext in ["events", "json"] {
                    let _ = std::fs::remove_file(base.with_extension(ext));
                }
                continue;
            }
            let meta: Meta = match std::fs::read(base.with_extension("json"))
                .map_err(|e| e.to_string())
                .and_then(|b| parse_meta(&b))
            {
                Ok(meta) => meta,
                Err(e) => {
                    // No summary, or a torn one: the journal decides (as running, so that
                    // recovery reads its last event or marks it runner_restarted). Its
                    // `start` names the invoke (a recycled file keeps an older one's name).
                    tracing::warn!(invoke = name, error = %e, "rebuilding an invoke summary from its journal");
                    match journal_start(&path) {
                        Some(start) => {
                            Meta::running(start.invoke_id, InvokeKind::Invoke, start.started_at)
                        }
                        None => Meta::running(
                            InvokeId(name.to_owned()),
                            InvokeKind::Invoke,
                            std::fs::metadata(&path)
                                .and_then(|m| m.created().or_else(|_| m.modified()))
                                .ok()
                                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                                .map_or(0, |d| d.as_millis() as u64),
                        ),
                    }
                }
            };
            let invoke = Arc::new(Invoke {
                id: meta.invoke_id.clone(),
                base,
                meta: Mutex::new(meta),
                meta_file: Mutex::new(SummaryFile::default()),
                log: Mutex::new(LogRef::default()),
                journal_size: AtomicU64::new(0),
                counted: std::sync::atomic::AtomicBool::new(false),
                process: None,
                policy: OnDisconnect::Continue,
                attached: AtomicUsize::new(0),
                detach_generation: AtomicU64::new(0),
                interactive: None,
            });
            if invoke.is_running() {
                mark_restarted(&invoke)?;
            }
            // Fixed once finished: pruning subtracts what was added here.
            let bytes = invoke.journal_bytes();
            invoke.journal_size.store(bytes, Ordering::Relaxed);
            invoke.counted.store(true, Ordering::SeqCst);
            finished += 1;
            finished_bytes += bytes;
            map.insert(invoke.id.clone(), invoke);
        }
        let oom_seen = cfg.oom_events.as_deref().and_then(oom_kills).unwrap_or(0);
        let invokes = Arc::new(Self {
            permits: Arc::new(Semaphore::new(cfg.max_concurrent_invokes as usize)),
            cfg,
            reaper,
            map: Mutex::new(map),
            dir_handle: std::fs::File::open(&dir).ok(),
            dir,
            pruning: Mutex::new(()),
            prune_wanted: std::sync::atomic::AtomicBool::new(false),
            finished: AtomicUsize::new(finished),
            finished_bytes: AtomicU64::new(finished_bytes),
            spares: Mutex::new(Vec::new()),
            oom_seen: AtomicU64::new(oom_seen),
        });
        invokes.prune();
        Ok(invokes)
    }

    fn map(&self) -> MutexGuard<'_, BTreeMap<InvokeId, Arc<Invoke>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Invokes running now.
    pub fn inflight(&self) -> u64 {
        (self.cfg.max_concurrent_invokes as usize - self.permits.available_permits()) as u64
    }

    /// Looks an invoke up by the id from a URL.
    pub fn get(&self, id: &str) -> Result<Arc<Invoke>> {
        self.map()
            .get(&InvokeId(id.to_owned()))
            .cloned()
            .ok_or_else(|| Error::InvokeNotFound(format!("no invoke {id:?}")))
    }

    /// Recent invokes, newest first.
    pub fn list(&self) -> Vec<InvokeSummary> {
        self.map().values().rev().map(|i| i.summary()).collect()
    }

    /// Looks a process up by the id from a URL.
    pub fn get_process(&self, id: &str) -> Result<Arc<Invoke>> {
        match self.map().get(&InvokeId(id.to_owned())) {
            Some(invoke) if invoke.is_process() => Ok(Arc::clone(invoke)),
            _ => Err(Error::ProcessNotFound(format!("no process {id:?}"))),
        }
    }

    /// Running and recent processes, newest first.
    pub fn list_processes(&self) -> Vec<agentbox_proto::ProcessSummary> {
        self.map()
            .values()
            .rev()
            .filter(|i| i.is_process())
            .map(|i| i.process_summary())
            .collect()
    }

    /// Cancels a running invoke.
    pub fn cancel(&self, id: &str) -> Result<Arc<Invoke>> {
        let invoke = self.get(id)?;
        match &invoke.process {
            Some(process) if invoke.is_running() => {
                process.stop(ExitReason::Canceled, self.cfg.grace);
                Ok(invoke)
            }
            _ => Err(Error::InvokeNotFound(format!(
                "invoke {id:?} has already finished"
            ))),
        }
    }

    /// Stops every running invoke (runner shutdown) and waits for them, up to `limit`.
    pub async fn cancel_all(&self, limit: Duration) {
        let running: Vec<Arc<Process>> = self
            .map()
            .values()
            .filter(|i| i.is_running())
            .filter_map(|i| i.process.clone())
            .collect();
        for process in &running {
            process.stop(ExitReason::Canceled, self.cfg.grace);
        }
        let _ = tokio::time::timeout(limit, async {
            for process in &running {
                process.wait_done().await;
            }
        })
        .await;
    }

    /// Starts an invoke. Returned: a subscription from its first event and the caller's
    /// attachment, both taken before the process is spawned, so the caller reads every event
    /// even when the process is done (and, past `--retain-invokes`, pruned) before it gets to
    /// read.
    pub fn start(self: &Arc<Self>, req: StartRequest) -> Result<(Subscription, Attachment)> {
        let permit = Arc::clone(&self.permits).try_acquire_owned().map_err(|_| {
            Error::ConcurrencyExceeded {
                limit: u64::from(self.cfg.max_concurrent_invokes),
                inflight: self.inflight(),
            }
        })?;
        let started_at = now_ms();
        let id = new_invoke_id(started_at);
        let spare = self.spares().pop();
        let base = spare
            .as_ref()
            .map_or_else(|| self.dir.join(id.as_str()), |s| s.base.clone());
        // The journal file itself is opened once the process is spawned (`Begin::open_journal`).
        let log = EventLog::deferred(&base.with_extension("events"), self.cfg.journal_max_bytes);
        let sub = log.subscribe(0)?;
        let channel = match req.agent.map(|agent| agent.open(&id, &log)).transpose() {
            Ok(channel) => channel,
            Err(e) => {
                if let Some(spare) = spare {
                    self.spares().push(spare);
                }
                return Err(e);
            }
        };
        let (journal, summary) = match spare {
            None => (Journal::New, SummaryFile::new()),
            Some(spare) => {
                self.touch_dir();
                (Journal::Recycled(spare.open), spare.summary)
            }
        };
        let marker = format!("AGENTBOX_INVOKE_ID={id}");
        let process = Process::new(marker);
        let mut meta = Meta::running(id.clone(), req.kind, started_at);
        let options = req.process.unwrap_or_default();
        meta.pty = options.pty;
        meta.tag = options.tag;
        let interactive = (req.kind == InvokeKind::Process).then(|| Interactive {
            argv: req.argv.clone(),
            linger: options.linger,
            ..Interactive::default()
        });
        let invoke = Arc::new(Invoke {
            id: id.clone(),
            base,
            meta: Mutex::new(meta),
            meta_file: Mutex::new(summary),
            log: Mutex::new(LogRef {
                strong: Some(Arc::clone(&log)),
                weak: Arc::downgrade(&log),
                retired: false,
            }),
            journal_size: AtomicU64::new(0),
            counted: std::sync::atomic::AtomicBool::new(false),
            process: Some(Arc::clone(&process)),
            policy: req.on_disconnect,
            attached: AtomicUsize::new(0),
            detach_generation: AtomicU64::new(0),
            interactive,
        });
        self.map().insert(id.clone(), Arc::clone(&invoke));
        let attachment = invoke.attach(self);

        let mut env = self.cfg.child_env();
        env.extend(req.env);
        env.push(("AGENTBOX_INVOKE_ID".into(), id.to_string()));
        let (channel, pass_fds) = match channel {
            Some(mut opened) => {
                env.append(&mut opened.env);
                let fds = std::mem::take(&mut opened.child_fds);
                (Some(opened), fds)
            }
            None => (None, Vec::new()),
        };
        env.push((
            "AGENTBOX_WORKSPACE".into(),
            self.cfg.workspace.display().to_string(),
        ));
        let spec = RunSpec {
            argv: req.argv,
            env,
            cwd: req.cwd,
            marker: format!("AGENTBOX_INVOKE_ID={id}"),
            stdin: true,
            pass_fds: Arc::new(Mutex::new(pass_fds)),
            live: req.stream == StreamMode::Live,
            pty: options.pty,
        };
        let mut events = channel.map(|c| c.start());
        let (stdin_now, stdin_stream) = match req.stdin {
            Stdin::Bytes(bytes) => (Some(bytes), None),
            Stdin::Stream { body, fallback } => (None, Some((body, fallback))),
        };
        let (stdin_tx, stdin_rx) = oneshot::channel();
        let mut begin = Begin {
            invoke: Arc::clone(&invoke),
            log: Arc::clone(&log),
            journal: Some(journal),
            started_at,
            stdin_now,
            stdin_tx: Some(stdin_tx),
        };
        let acp = req.acp;
        let deadline = Deadline {
            process: Arc::clone(&process),
            at: tokio::time::Instant::now().checked_add(req.timeout),
            grace: self.cfg.grace,
        };
        if acp.is_none() {
            // A plain command is spawned right here, on the request's runtime thread, as
            // `tokio::process` does (a posix_spawn: back once the child has exec'd), and a
            // process that is done within QUICK_EXIT is finished on the runtime: no pump
            // thread is woken for it (less runner CPU per short invoke; see BENCHMARKS.md).
            // The journal is opened while the child runs (and, for a process that could not
            // start, before its events are written).
            let running = supervisor::start(&self.reaper, &spec, &process, |child| {
                let journal_error = begin.open_journal(&process);
                begin.spawned(child, journal_error.as_ref());
            });
            if running.is_err() {
                begin.open_journal(&process);
            }
            let invokes = Arc::clone(self);
            let invoke = Arc::clone(&invoke);
            let process = Arc::clone(&process);
            tokio::spawn(async move {
                let running = match running {
                    Ok(running) => running,
                    Err(outcome) => {
                        let outcome = supervisor::run_custom(&process, || outcome);
                        invokes.finish(&invoke, &log, &outcome, permit);
                        return;
                    }
                };
                // The timeout is watched only for a process still running after the quick
                // window (no timer task for a quick one).
                let running = if supervisor::exited_within(&running, QUICK_EXIT).await {
                    let reaper = &invokes.reaper;
                    match supervisor::try_finish(
                        reaper,
                        running,
                        &process,
                        &log,
                        side_reader(&mut events),
                    ) {
                        Ok(outcome) => {
                            let tail = invokes.publish_exit(&invoke, &log, &outcome, permit);
                            if tail.as_ref().is_some_and(|t| t.bytes() > BIG_STALE_TAIL) {
                                // Freeing that many cached pages takes a while: not on the
                                // runtime's only thread.
                                tokio::task::spawn_blocking(move || {
                                    invokes.record_exit(&invoke, tail)
                                });
                                return;
                            }
                            // The client's `exit` goes out before the rest is written.
                            tokio::task::yield_now().await;
                            invokes.record_exit(&invoke, tail);
                            return;
                        }
                        Err(running) => running,
                    }
                } else {
                    running
                };
                deadline.start();
                crate::pool::run_or_queue(move || {
                    let side = side_reader(&mut events);
                    let outcome = supervisor::pump(&invokes.reaper, running, &process, &log, side);
                    invokes.finish(&invoke, &log, &outcome, permit);
                });
            });
        } else {
            let thread = {
                let invokes = Arc::clone(self);
                let invoke = Arc::clone(&invoke);
                let process = Arc::clone(&process);
                let reaper = Arc::clone(&self.reaper);
                crate::pool::run(move || {
                    let journal_error = begin.open_journal(&process);
                    if let Some(turn) = acp {
                        begin.write_start(journal_error.as_ref());
                        let outcome = supervisor::run_custom(&process, || {
                            turn.run(&invoke.id, &process, &log)
                        });
                        invokes.finish(&invoke, &log, &outcome, permit);
                        return;
                    }
                    let side = side_reader(&mut events);
                    let outcome = supervisor::run(&reaper, &spec, &process, &log, side, |child| {
                        begin.spawned(child, journal_error.as_ref());
                    });
                    invokes.finish(&invoke, &log, &outcome, permit);
                })
            };
            if let Err(e) = thread {
                self.map().remove(&id);
                return Err(Error::Internal(format!("cannot start a thread: {e}")));
            }
            deadline.start();
        }
        tracing::info!(invoke = %id, "invoke started");
        if let Some((body, fallback)) = stdin_stream {
            tokio::spawn(copy_stdin(stdin_rx, body, fallback));
        }
        Ok((sub, attachment))
    }

    /// Writes the closing events, persists the summary, releases the slot, prunes journals.
    fn finish(
        &self,
        invoke: &Invoke,
        log: &Arc<EventLog>,
        outcome: &Outcome,
        permit: OwnedSemaphorePermit,
    ) {
        let tail = self.publish_exit(invoke, log, outcome, permit);
        self.record_exit(invoke, tail);
    }

    /// The first half of [`Invokes::finish`]: releases the slot and writes and publishes the
    /// closing events (the stream ends).
    /// Whether a process that ended by SIGKILL nobody here sent was killed by the sandbox's
    /// memory limit: the cgroup's kill count rose past what earlier invokes were given. Read
    /// only for such exits, never on a normal one.
    fn memory_kill(&self, outcome: &Outcome) -> bool {
        let killed = matches!(&outcome.status, Ok(s) if s.signal == Some(9));
        let (true, None, Some(path)) =
            (killed, outcome.stop_reason, self.cfg.oom_events.as_deref())
        else {
            return false;
        };
        let Some(now) = oom_kills(path) else {
            return false;
        };
        self.oom_seen.fetch_max(now, Ordering::SeqCst) < now
    }

    fn publish_exit(
        &self,
        invoke: &Invoke,
        log: &Arc<EventLog>,
        outcome: &Outcome,
        permit: OwnedSemaphorePermit,
    ) -> Option<StaleTail> {
        let reason = match self.memory_kill(outcome) {
            true => ExitReason::MemoryLimit,
            false => outcome.reason(),
        };
        let (exit_code, signal) = match &outcome.status {
            Ok(status) => (status.code, status.signal),
            Err(_) => (127, None),
        };
        let duration_ms = outcome.duration.as_millis() as u64;
        let dropped = log.dropped_bytes();
        // In memory the invoke is exited before its `exit` event is published, so a client
        // that has seen `exit` never finds it running (a cancel then gets 404).
        {
            let mut meta = invoke.meta();
            meta.state = InvokeState::Exited;
            meta.exit_code = Some(exit_code);
            meta.reason = Some(reason);
            meta.duration_ms = Some(duration_ms);
        }
        // The process tree is gone: its slot is free before anyone can see `exit`.
        drop(permit);
        log.append(|b| {
            if let Err(message) = &outcome.status {
                // The process never started, so no `start` was written: every invoke stream
                // still opens with `start` and closes with `exit`.
                b.event(
                    event::START,
                    &StartEvent {
                        invoke_id: invoke.id.clone(),
                        started_at: invoke.meta().started_at,
                    },
                );
                b.event(
                    event::ERROR,
                    &ErrorEvent {
                        phase: Some("spawn".into()),
                        message: message.clone(),
                    },
                );
            }
            if dropped > 0 {
                b.event(
                    event::TRUNCATED,
                    &TruncatedEvent {
                        dropped_bytes: dropped,
                    },
                );
            }
            b.event(
                event::EXIT,
                &ExitEvent {
                    invoke_id: invoke.id.clone(),
                    exit_code,
                    signal,
                    duration_ms,
                    reason,
                },
            );
        });
        let tail = log.close_keeping_tail();
        invoke.meta().last_event_id = log.progress().last_seq;
        let size = log.progress().end;
        invoke.journal_size.store(size, Ordering::Relaxed);
        invoke.set_log(log, false);
        self.finished.fetch_add(1, Ordering::SeqCst);
        self.finished_bytes.fetch_add(size, Ordering::SeqCst);
        invoke.counted.store(true, Ordering::SeqCst);
        tracing::info!(invoke = %invoke.id, exit_code, reason = reason.as_str(), duration_ms, "invoke exited");
        tail
    }

    /// The second half of [`Invokes::finish`]: cuts a recycled journal's old tail, persists
    /// the summary, prunes journals.
    fn record_exit(&self, invoke: &Invoke, tail: Option<StaleTail>) {
        if let Some(tail) = tail {
            tail.cut();
        }
        // Not fsynced: the journal (synced by `close`) already holds the `exit` event, and
        // recovery takes the outcome from there when this summary did not reach the disk.
        invoke.save_meta_fast(true);
        self.prune();
    }

    /// Deletes the oldest finished invokes beyond `--retain-invokes` or `--retain-bytes`.
    fn prune(&self) {
        // One pruner at a time; a finish that finds it busy leaves the work to it, and the
        // pruner goes round again when such a request came in while it worked (otherwise the
        // last finish of a burst could go unpruned until the next one).
        self.prune_wanted.store(true, Ordering::SeqCst);
        loop {
            let Ok(_pruning) = self.pruning.try_lock() else {
                return;
            };
            if !self.prune_wanted.swap(false, Ordering::SeqCst) {
                return;
            }
            self.prune_once();
        }
    }

    /// Keeps the newest finished invokes that fit both limits (and always the newest one):
    /// retires the oldest finished ones (ids sort in start order) until the rest fit.
    fn prune_once(&self) {
        loop {
            let count = self.finished.load(Ordering::SeqCst);
            let bytes = self.finished_bytes.load(Ordering::SeqCst);
            if count <= 1 || (count <= self.cfg.retain_invokes && bytes <= self.cfg.retain_bytes) {
                break;
            }
            let oldest = {
                let mut map = self.map();
                let Some(id) = map
                    .values()
                    .find(|i| i.counted.load(Ordering::SeqCst))
                    .map(|i| i.id.clone())
                else {
                    break;
                };
                map.remove(&id)
            };
            let Some(invoke) = oldest else { break };
            // Counted before it could be found here: these never go below zero.
            self.finished.fetch_sub(1, Ordering::SeqCst);
            self.finished_bytes.fetch_sub(
                invoke.journal_size.load(Ordering::Relaxed),
                Ordering::SeqCst,
            );
            self.retire(&invoke);
        }
        let kept = self.finished_bytes.load(Ordering::SeqCst);
        self.fit_spares(self.cfg.retain_bytes.saturating_sub(kept));
    }

    fn spares(&self) -> MutexGuard<'_, Vec<Spare>> {
        self.spares.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the modification time of `invokes/` to now: starting an invoke on a recycled pair
    /// changes nothing else there (the control plane reads `lastActivityAt` off it).
    fn touch_dir(&self) {
        if let Some(dir) = &self.dir_handle {
            let now = std::fs::FileTimes::new().set_modified(std::time::SystemTime::now());
            if let Err(e) = dir.set_times(now) {
                tracing::debug!(error = %e, "cannot set the invokes directory's time");
            }
        }
    }

    /// Empties the oldest spare journals until the old bytes of all of them fit in `budget`
    /// (what `--retain-bytes` leaves after the kept journals).
    fn fit_spares(&self, budget: u64) {
        let mut spares = self.spares();
        let mut held: u64 = spares.iter().map(|s| s.bytes).sum();
        for spare in spares.iter_mut() {
            if held <= budget {
                break;
            }
            if spare.bytes == 0 {
                continue;
            }
            let journal = spare.base.with_extension("events");
            let emptied = match &spare.open {
                Some(file) => file.set_len(0),
                None => std::fs::OpenOptions::new()
                    .write(true)
                    .open(&journal)
                    .and_then(|f| f.set_len(0)),
            };
            match emptied {
                Ok(()) => {
                    held -= spare.bytes;
                    spare.bytes = 0;
                }
                Err(e) => {
                    tracing::warn!(path = %journal.display(), error = %e, "cannot empty a spare journal")
                }
            }
        }
    }

    /// Deletes a pruned invoke's files, or keeps them as a spare pair for a new invoke.
    /// Reusing inodes matters: on ext4 without a journal, every inode allocation scans past
    /// the inodes deleted in the last minutes, so a busy runner that deletes two files per
    /// invoke makes each new file dearer (it doubled an invoke's CPU within minutes). The
    /// journal keeps its bytes (and so its cached pages, which a new invoke overwrites faster
    /// than it fills new ones, see `journal::JournalFile`) behind a NUL written over its first
    /// byte, so that nothing can read it as events, and so does the summary (written over in
    /// place by the next invoke, see [`SummaryFile`]); both keep their names for good (see [`Invoke::base`]), and a runner that starts finds such a
    /// pair by those marks ([`is_spare`]) and deletes it. The newest [`WARM_SPARES`] stay
    /// open for the next invokes. [`Invokes::fit_spares`] keeps the old bytes of all spares
    /// within `--retain-bytes`.
    fn retire(&self, invoke: &Invoke) {
        // Held throughout: a reader that already has the journal open keeps it (and the files
        // are deleted instead); once retired, nothing opens it again.
        let mut slot = invoke.log.lock().unwrap_or_else(|p| p.into_inner());
        let (journal, meta) = (invoke.journal_path(), invoke.meta_path());
        if slot.get().is_none() && self.spares().len() < MAX_SPARES {
            let barred = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&journal)
                .and_then(|f| {
                    let len = match invoke.journal_size.load(Ordering::Relaxed) {
                        0 => f.metadata()?.len(),
                        n => n,
                    };
                    if len > 0 {
                        f.write_all_at(&[0], 0)?;
                    }
                    Ok((f, len))
                });
            let mut summary =
                std::mem::take(&mut *invoke.meta_file.lock().unwrap_or_else(|p| p.into_inner()));
            let emptied = summary.open(&meta).and_then(|(f, len)| {
                if len > 0 {
                    f.write_all_at(&[0], 0)
                } else {
                    Ok(())
                }
            });
            if let (Ok((journal, len)), Ok(())) = (barred, emptied) {
                slot.retired = true;
                let mut spares = self.spares();
                spares.push(Spare {
                    base: invoke.base.clone(),
                    bytes: len,
                    open: Some(journal),
                    summary,
                });
                // Only the newest stay open (older ones were closed as these came).
                if let Some(cooled) = spares.len().checked_sub(WARM_SPARES + 1) {
                    spares[cooled].open = None;
                    spares[cooled].summary.file = None;
                }
                return;
            }
        }
        for path in [journal, meta] {
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(invoke = %invoke.id, error = %e, "cannot prune journal");
                }
            }
        }
    }

    /// Follows an invoke's events after `after`, attached for the disconnect policy.
    pub async fn follow(
        self: &Arc<Self>,
        invoke: &Arc<Invoke>,
        after: u64,
    ) -> Result<(Subscription, Attachment)> {
        let attachment = invoke.attach(self);
        if after == 0 {
            if let Some(log) = invoke.loaded() {
                // From the start of a log in memory: no file is read, no thread hop.
                return Ok((log.subscribe(0)?, attachment));
            }
        }
        let invoke = Arc::clone(invoke);
        let sub = tokio::task::spawn_blocking(move || invoke.log()?.subscribe(after))
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
        Ok((sub, attachment))
    }
}

/// Appends `exit {reason: runner_restarted}` to an invoke the previous runner left running,
/// after stopping whatever is left of its process tree.
fn mark_restarted(invoke: &Invoke) -> io::Result<()> {
    let pid = {
        let meta = invoke.meta();
        meta.pid
            .map_or(0, |pid| proctree::recorded_root(pid, meta.pid_started))
    };
    let marker = format!("AGENTBOX_INVOKE_ID={}", invoke.id);
    for _ in 0..50 {
        if proctree::signal(pid, &marker, nix::sys::signal::Signal::SIGKILL) == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let (log, last) = EventLog::open_existing(&invoke.journal_path())?;
    if let Some(exit) = last
        .filter(|(name, _)| name == event::EXIT)
        .and_then(|(_, data)| serde_json::from_str::<ExitEvent>(&data).ok())
    {
        // The runner died after journaling `exit` but before saving the summary.
        log.close();
        {
            let mut meta = invoke.meta();
            meta.state = InvokeState::Exited;
            meta.exit_code = Some(exit.exit_code);
            meta.reason = Some(exit.reason);
            meta.duration_ms = Some(exit.duration_ms);
            meta.last_event_id = log.progress().last_seq;
        }
        invoke.save_meta();
        invoke.set_log(&log, false);
        return Ok(());
    }
    let started_at = invoke.meta().started_at;
    let duration_ms = now_ms().saturating_sub(started_at);
    log.append(|b| {
        b.event(
            event::EXIT,
            &ExitEvent {
                invoke_id: invoke.id.clone(),
                exit_code: -1,
                signal: None,
                duration_ms,
                reason: ExitReason::RunnerRestarted,
            },
        )
    });
    log.close();
    {
        let mut meta = invoke.meta();
        meta.state = InvokeState::Exited;
        meta.exit_code = Some(-1);
        meta.reason = Some(ExitReason::RunnerRestarted);
        meta.duration_ms = Some(duration_ms);
        meta.last_event_id = log.progress().last_seq;
    }
    invoke.save_meta();
    invoke.set_log(&log, false);
    tracing::info!(invoke = %invoke.id, "marked runner_restarted");
    Ok(())
}

/// Streams the request body into the child's stdin, then closes it. When the body was empty
/// and a fallback is given (the `?prompt=`), the fallback is written instead.
async fn copy_stdin(
    stdin_rx: oneshot::Receiver<std::process::ChildStdin>,
    mut body: Body,
    fallback: Option<String>,
) {
    let Ok(stdin) = stdin_rx.await else {
        return;
    };
    let Ok(mut pipe) = tokio::net::unix::pipe::Sender::from_owned_fd(stdin.into()) else {
        return;
    };
    let mut written = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return;
        };
        if let Ok(data) = frame.into_data() {
            written += data.len();
            if pipe.write_all(&data).await.is_err() {
                return;
            }
        }
    }
    if written == 0 {
        if let Some(text) = fallback {
            let _ = pipe.write_all(Bytes::from(text).as_ref()).await;
        }
    }
}

/// A new invoke id. Ids sort in start order, which pruning and listing follow: the start
/// time in milliseconds, then a counter that orders the invokes of one millisecond, then
/// random bits that keep ids unguessable.
fn new_invoke_id(started_at: u64) -> InvokeId {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    InvokeId(format!("inv-{started_at:012x}-{n:08x}{}", random_hex(4)))
}

/// How long a plain command may take to exit before its output is handed to a pump thread
/// (a process that is done by then is finished on the runtime thread that spawned it). Its
/// output waits at most this long before it is read, and a new invoke's response at most this
/// long for its first events (`server::new_invoke_response`).
pub const QUICK_EXIT: Duration = Duration::from_millis(2);

/// The old bytes of a recycled journal that a quick invoke cuts off on the runtime thread;
/// more are cut on a blocking thread.
const BIG_STALE_TAIL: u64 = 4 << 20;

/// When a running invoke times out.
struct Deadline {
    process: Arc<Process>,
    at: Option<tokio::time::Instant>,
    grace: Duration,
}

impl Deadline {
    /// Stops the process with reason `timeout` at the deadline, unless it is done by then
    /// (no deadline at all for a timeout too far away to be a time, as a process's none).
    fn start(self) {
        let Some(at) = self.at else {
            return;
        };
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {
                    self.process.stop(ExitReason::Timeout, self.grace);
                }
                _ = self.process.wait_done() => {}
            }
        });
    }
}

/// The agent channel's events pipe as the pump's side reader.
fn side_reader(
    events: &mut Option<crate::channel::EventsReader>,
) -> Option<&mut dyn supervisor::SideReader> {
    events
        .as_mut()
        .map(|e| e as &mut dyn supervisor::SideReader)
}

/// What an invoke does around its spawn, on whichever thread spawns it.
struct Begin {
    invoke: Arc<Invoke>,
    log: Arc<EventLog>,
    /// The journal file to open (taken by the first [`Begin::open_journal`]).
    journal: Option<Journal>,
    started_at: u64,
    stdin_now: Option<Bytes>,
    stdin_tx: Option<oneshot::Sender<std::process::ChildStdin>>,
}

impl Begin {
    /// Opens the journal file (new, or a spare's). On failure the invoke is stopped at once
    /// (the process is killed right after its spawn) and the error is what `start` is
    /// followed by.
    fn open_journal(&mut self, process: &Process) -> Option<ErrorEvent> {
        let e = self.log.open_file(self.journal.take()?).err()?;
        tracing::error!(invoke = %self.invoke.id, error = %e, "cannot create the journal");
        process.mark_stopped(ExitReason::Error);
        Some(ErrorEvent {
            phase: Some("journal".into()),
            message: format!("cannot create the journal: {e}"),
        })
    }

    /// Appends `start` (and the journal's error, if any).
    fn write_start(&self, journal_error: Option<&ErrorEvent>) {
        self.log.append(|b| {
            b.event(
                event::START,
                &StartEvent {
                    invoke_id: self.invoke.id.clone(),
                    started_at: self.started_at,
                },
            );
            if let Some(error) = journal_error {
                b.event(event::ERROR, error);
            }
        });
    }

    /// Right after the spawn, before any output is read: records the pid, writes `start`,
    /// gives the process its stdin.
    fn spawned(&mut self, child: supervisor::SpawnedChild, journal_error: Option<&ErrorEvent>) {
        let supervisor::SpawnedChild {
            pid,
            start_time,
            stdin,
            pty,
        } = child;
        {
            let mut meta = self.invoke.meta();
            meta.pid = Some(pid);
            meta.pid_started = start_time;
        }
        // Recorded before any output is read, so that a runner killed now finds this tree
        // at its next start.
        self.invoke.save_meta_fast(false);
        self.write_start(journal_error);
        if let Some(live) = &self.invoke.interactive {
            // A process keeps its stdin for `POST .../stdin` (a fresh lock: never contended).
            if let Ok(mut slot) = live.stdin.try_lock() {
                *slot = stdin;
            }
            *live.master.lock().unwrap_or_else(|p| p.into_inner()) = pty;
            return;
        }
        match (stdin, self.stdin_now.take()) {
            (Some(mut stdin), Some(bytes)) => {
                // A fresh pipe holds STDIN_INLINE_MAX bytes, so this never blocks; a
                // process that exits without reading gets EPIPE, ignored.
                use std::io::Write;
                let _ = stdin.write_all(&bytes);
            }
            (Some(stdin), None) => {
                if let Some(tx) = self.stdin_tx.take() {
                    let _ = tx.send(stdin);
                }
            }
            (None, _) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Invokes started within one millisecond sort in the order they started (pruning keeps
    /// the newest by id: random suffixes alone once pruned the invoke just started).
    #[test]
    fn invoke_ids_sort_in_start_order() {
        let ids: Vec<InvokeId> = (0..1000).map(|_| new_invoke_id(0x0123_4567_89ab)).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        let later = new_invoke_id(0x0123_4567_89ac);
        assert!(ids.iter().all(|id| *id < later));
        assert!(ids
            .iter()
            .all(|id| id.as_str().len() == "inv-".len() + 12 + 1 + 16));
    }

    #[test]
    fn the_last_complete_summary_line_counts() {
        let running = Meta::running(InvokeId("inv-1".into()), InvokeKind::Invoke, 7);
        let mut exited = running.clone();
        exited.state = InvokeState::Exited;
        exited.exit_code = Some(3);
        let mut text = serde_json::to_vec(&running).unwrap();
        text.push(b'\n');
        text.extend(serde_json::to_vec(&exited).unwrap());
        text.push(b'\n');
        assert_eq!(parse_meta(&text).unwrap().exit_code, Some(3));
        // A torn last line (the runner died while appending) is skipped.
        let torn = text.len() - 10;
        assert_eq!(
            parse_meta(&text[..torn]).unwrap().state,
            InvokeState::Running
        );
        // The single-object file of earlier versions still reads.
        let old = serde_json::to_vec(&exited).unwrap();
        assert_eq!(parse_meta(&old).unwrap().exit_code, Some(3));
        assert!(parse_meta(b"{\"invo").is_err());
    }

    #[test]
    fn a_summary_is_written_over_in_place_and_covers_what_was_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        // A file of the appending versions: two lines, the last one counting.
        let mut long = Meta::running(
            InvokeId("inv-old-with-a-long-id".into()),
            InvokeKind::Exec,
            7,
        );
        long.exit_code = Some(1);
        let mut text = serde_json::to_vec(&long).unwrap();
        text.push(b'\n');
        text.extend(serde_json::to_vec(&long).unwrap());
        text.push(b'\n');
        std::fs::write(&path, &text).unwrap();

        let short = Meta::running(InvokeId("inv-2".into()), InvokeKind::Invoke, 9);
        let mut file = SummaryFile::default();
        file.write(&path, &serde_json::to_vec(&short).unwrap())
            .unwrap();
        let after = std::fs::read(&path).unwrap();
        assert_eq!(after.len(), text.len(), "neither truncated nor extended");
        assert_eq!(after.iter().filter(|b| **b == b'\n').count(), 1, "one line");
        assert_eq!(parse_meta(&after).unwrap().invoke_id.0, "inv-2");

        // Longer than the file: it grows, still one line.
        let mut longer = short.clone();
        longer.invoke_id = InvokeId("x".repeat(text.len()));
        file.write(&path, &serde_json::to_vec(&longer).unwrap())
            .unwrap();
        let after = std::fs::read(&path).unwrap();
        assert!(after.len() > text.len());
        assert_eq!(parse_meta(&after).unwrap().invoke_id, longer.invoke_id);
        assert_eq!(after.last(), Some(&b'\n'));
    }
}
