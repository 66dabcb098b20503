//! Sessions: a named, persistent context for a series of invokes. Each session has a directory
//! under the state dir (`sessions/<id>/`) holding its summary (`session.json`), its history
//! (`events`, a journal written by [`crate::journal::EventLog`] like an invoke's) and the
//! directory the agent keeps its own state in (`files/`, given as `AGENTBOX_SESSION_DIR`).
//!
//! An invoke run in a session mirrors every event of its own journal into the session's
//! history, synchronously under the invoke journal's lock ([`Session::mirror_for`]): whatever a
//! client has seen on the invoke stream is already in the history. History items are SSE
//! frames whose `id` is the `eventIndex` and whose data is the whole [`SessionEvent`], so the
//! paged JSON view, the live SSE view and the replay after a restart read the same bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use agentbox_proto::{
    session_event, valid_session_id, AcpSessionState, InvokeId, PermissionReply, ReplyOrigin,
    Sender, SessionEvent, SessionInfo,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::fsutil::{now_ms, random_hex, write_atomic};
use crate::journal::{EventLog, Mirror};
use crate::sse;

/// Largest `modes`, `models` or `configOptions` of an agent kept in a session's state (JSON
/// bytes).
pub const MAX_AGENT_STATE: usize = 256 << 10;

/// What `session.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    id: String,
    created_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    metadata: Option<Value>,
    #[serde(default)]
    always_allowed: BTreeSet<String>,
    #[serde(default)]
    always_rejected: BTreeSet<String>,
    /// The agent chosen at creation (`None`: the default one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    agent: Option<String>,
    /// The ACP session's last known state (its id is what `session/load` reuses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    acp: Option<AcpSessionState>,
    /// MCP servers given at creation, passed to `session/new` and `session/load`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    mcp_servers: Vec<Value>,
    /// The working directory given at creation (a sandbox path, checked again at each use).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cwd: Option<String>,
}

/// One session. Its history is open only while something uses it (an invoke running in the
/// session, a client following it): an idle session holds no file descriptor and no memory
/// beyond its summary.
#[derive(Debug)]
pub struct Session {
    dir: PathBuf,
    meta: Mutex<Meta>,
    log: Mutex<Weak<EventLog>>,
    /// Events in the history (the last `eventIndex`), known without opening it.
    event_count: AtomicU64,
    busy: AtomicBool,
    running: Mutex<Option<InvokeId>>,
}

impl Session {
    fn meta(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The id.
    pub fn id(&self) -> String {
        self.meta().id.clone()
    }

    /// The session's history, opened if no one holds it open. Blocking (it may read the file).
    pub fn log(&self) -> io::Result<Arc<EventLog>> {
        let mut slot = self.log.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(log) = slot.upgrade() {
            return Ok(log);
        }
        let path = self.dir.join("events");
        let log = if path.exists() {
            EventLog::open_existing(&path)?.0
        } else {
            EventLog::create(&path, u64::MAX)?
        };
        self.event_count
            .store(log.progress().last_seq, Ordering::SeqCst);
        *slot = Arc::downgrade(&log);
        Ok(log)
    }

    fn append_events(&self, f: impl FnOnce(&mut crate::journal::Batch<'_>)) {
        match self.log() {
            Ok(log) => {
                log.append(f);
                self.event_count
                    .store(log.progress().last_seq, Ordering::SeqCst);
            }
            Err(e) => {
                tracing::error!(session = %self.id(), error = %e, "cannot open the session history");
            }
        }
    }

    /// The directory given to the agent as `AGENTBOX_SESSION_DIR`.
    pub fn files_dir(&self) -> PathBuf {
        self.dir.join("files")
    }

    /// The wire view.
    pub fn info(&self) -> SessionInfo {
        let meta = self.meta().clone();
        SessionInfo {
            id: meta.id,
            created_at: meta.created_at,
            metadata: meta.metadata,
            event_count: self.event_count.load(Ordering::SeqCst),
            running_invoke_id: self.running_invoke(),
            always_allowed: meta.always_allowed.into_iter().collect(),
            always_rejected: meta.always_rejected.into_iter().collect(),
            agent: meta.agent,
            cwd: meta.cwd,
            acp: meta.acp.map(|mut state| {
                state.derive();
                state
            }),
        }
    }

    /// The invoke running in the session, if any.
    pub fn running_invoke(&self) -> Option<InvokeId> {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Takes the session for one invoke; 409 `session_busy` when one is running.
    pub fn claim(self: &Arc<Self>) -> Result<Claim> {
        let log = self.log()?;
        if self
            .busy
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return Err(Error::SessionBusy(format!(
                "session {:?} is running an invoke; wait for its exit or cancel it",
                self.id()
            )));
        }
        Ok(Claim(Arc::clone(self), Some(log)))
    }

    /// The agent chosen at creation (`None`: the default one).
    pub fn agent(&self) -> Option<String> {
        self.meta().agent.clone()
    }

    /// The working directory given at creation (a sandbox path).
    pub fn cwd(&self) -> Option<String> {
        self.meta().cwd.clone()
    }

    /// MCP servers given at creation.
    pub fn mcp_servers(&self) -> Vec<Value> {
        self.meta().mcp_servers.clone()
    }

    /// The ACP session's last known state.
    pub fn acp_state(&self) -> Option<AcpSessionState> {
        self.meta().acp.clone()
    }

    /// Changes the ACP session's state with `f`; persisted when it changed. Each of the
    /// agent's `modes`, `models` and `configOptions` is kept only up to [`MAX_AGENT_STATE`]
    /// bytes of JSON (a larger one is dropped, with a warning).
    pub fn update_acp(&self, f: impl FnOnce(&mut Option<AcpSessionState>)) {
        let meta = {
            let mut meta = self.meta();
            let before = meta.acp.clone();
            f(&mut meta.acp);
            let id = meta.id.clone();
            if let Some(state) = meta.acp.as_mut() {
                for (name, field) in [
                    ("modes", &mut state.modes),
                    ("models", &mut state.models),
                    ("configOptions", &mut state.config_options),
                ] {
                    let size = field
                        .as_ref()
                        .map_or(0, |v| serde_json::to_vec(v).map_or(0, |b| b.len()));
                    if size > MAX_AGENT_STATE {
                        tracing::warn!(session = %id, field = name, size, "the agent's session state is too large to keep; dropped");
                        *field = None;
                    }
                }
            }
            if meta.acp == before {
                return;
            }
            meta.clone()
        };
        if let Err(e) = save_meta(&self.dir, &meta) {
            tracing::error!(session = %meta.id, error = %e, "cannot persist the session");
        }
    }

    /// Whether `kind` was answered `reply` (`always` or `reject_always`) in this session.
    pub fn remembers(&self, kind: &str, reply: PermissionReply) -> bool {
        let meta = self.meta();
        match reply {
            PermissionReply::Always => meta.always_allowed.contains(kind),
            PermissionReply::RejectAlways => meta.always_rejected.contains(kind),
            _ => false,
        }
    }

    /// Remembers an `always` or `reject_always` for `kind` (persisted); the latest one wins.
    pub fn remember(&self, kind: &str, reply: PermissionReply) {
        let meta = {
            let mut guard = self.meta();
            let meta = &mut *guard;
            let (add, remove) = match reply {
                PermissionReply::Always => (&mut meta.always_allowed, &mut meta.always_rejected),
                PermissionReply::RejectAlways => {
                    (&mut meta.always_rejected, &mut meta.always_allowed)
                }
                _ => return,
            };
            let removed = remove.remove(kind);
            if !add.insert(kind.to_owned()) && !removed {
                return;
            }
            meta.clone()
        };
        if let Err(e) = save_meta(&self.dir, &meta) {
            tracing::error!(session = %meta.id, error = %e, "cannot persist the session");
        }
    }

    /// Appends one event to the history.
    pub fn record(&self, sender: Sender, invoke_id: Option<&InvokeId>, kind: &str, data: Value) {
        let created_at = now_ms();
        self.append_events(|b| {
            let event = SessionEvent {
                event_index: b.next_seq(),
                created_at,
                sender,
                invoke_id: invoke_id.cloned(),
                kind: kind.to_owned(),
                data,
            };
            b.event(kind, &event);
        });
    }

    /// A mirror for the journal of invoke `invoke_id`: copies its events into the history.
    pub fn mirror_for(self: &Arc<Self>, invoke_id: InvokeId) -> Mirror {
        let session = Arc::clone(self);
        Mirror(Box::new(move |bytes: &[u8]| {
            let (frames, _) = sse::parse_frames(bytes);
            if frames.is_empty() {
                return;
            }
            let created_at = now_ms();
            session.append_events(|b| {
                for frame in &frames {
                    let data: Value = serde_json::from_str(frame.data).unwrap_or(Value::Null);
                    let event = SessionEvent {
                        event_index: b.next_seq(),
                        created_at,
                        sender: sender_of(frame.event, &data),
                        invoke_id: Some(invoke_id.clone()),
                        kind: frame.event.to_owned(),
                        data,
                    };
                    b.event(frame.event, &event);
                }
            });
        }))
    }
}

/// Who an invoke event comes from.
fn sender_of(event: &str, data: &Value) -> Sender {
    match event {
        "log" | session_event::AGENT | session_event::PERMISSION => Sender::Agent,
        session_event::PERMISSION_REPLY => {
            let client = serde_json::to_value(ReplyOrigin::Client).unwrap_or(Value::Null);
            if data.get("by") == Some(&client) {
                Sender::Client
            } else {
                Sender::Runner
            }
        }
        session_event::PROMPT => Sender::Client,
        _ => Sender::Runner,
    }
}

/// A session taken by one invoke, its history held open; released on drop.
#[derive(Debug)]
pub struct Claim(Arc<Session>, Option<Arc<EventLog>>);

impl Claim {
    /// The session.
    pub fn session(&self) -> &Arc<Session> {
        &self.0
    }

    /// Records which invoke holds the session.
    pub fn set_invoke(&self, id: &InvokeId) {
        *self.0.running.lock().unwrap_or_else(|p| p.into_inner()) = Some(id.clone());
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        *self.0.running.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.1 = None;
        self.0.busy.store(false, Ordering::SeqCst);
    }
}

fn save_meta(dir: &Path, meta: &Meta) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(meta).map_err(io::Error::other)?;
    write_atomic(&dir.join("session.json"), &bytes, 0o600)
}

/// The registry of sessions.
#[derive(Debug)]
pub struct Sessions {
    dir: PathBuf,
    map: Mutex<BTreeMap<String, Arc<Session>>>,
    /// Sessions kept (`--retain-sessions`).
    retain: usize,
    /// History bytes kept over all sessions (`--retain-session-bytes`).
    retain_bytes: u64,
}

/// The bytes a session's history takes on disk.
fn history_bytes(session: &Session) -> u64 {
    std::fs::metadata(session.dir.join("events")).map_or(0, |m| m.len())
}

impl Sessions {
    /// Loads the sessions kept under `<state>/sessions`, keeping at most `retain` of them and
    /// `retain_bytes` of history (the oldest idle ones are deleted past either).
    pub fn load(state_dir: &Path, retain: usize, retain_bytes: u64) -> io::Result<Arc<Self>> {
        let dir = state_dir.join("sessions");
        std::fs::create_dir_all(&dir)?;
        let mut map = BTreeMap::new();
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if !valid_session_id(name) {
                continue;
            }
            let meta = match std::fs::read(path.join("session.json"))
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Meta>(&b).map_err(|e| e.to_string()))
            {
                Ok(meta) if meta.id == name => meta,
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(session = name, error = %e, "skipping a damaged session");
                    continue;
                }
            };
            std::fs::create_dir_all(path.join("files"))?;
            let session = Arc::new(Session {
                dir: path.clone(),
                meta: Mutex::new(meta),
                log: Mutex::new(Weak::new()),
                event_count: AtomicU64::new(0),
                busy: AtomicBool::new(false),
                running: Mutex::new(None),
            });
            // Opened once to count its events (and repair a torn tail), then closed.
            drop(session.log()?);
            map.insert(name.to_owned(), session);
        }
        let sessions = Arc::new(Self {
            dir,
            map: Mutex::new(map),
            retain,
            retain_bytes,
        });
        sessions.prune(None);
        Ok(sessions)
    }

    /// Deletes the oldest idle sessions (by creation) while more than `--retain-sessions` are
    /// kept or their histories take more than `--retain-session-bytes`; a session running an
    /// invoke, and `keep`, are never deleted. Returns how many were deleted.
    pub fn prune(&self, keep: Option<&str>) -> usize {
        let all = self.list();
        let mut count = all.len();
        let mut bytes: u64 = all.iter().map(|s| history_bytes(s)).sum();
        let mut deleted = 0;
        for session in all {
            if count <= self.retain && bytes <= self.retain_bytes {
                break;
            }
            let id = session.id();
            if keep == Some(id.as_str()) {
                continue;
            }
            let size = history_bytes(&session);
            if self.delete(&id).is_ok() {
                tracing::info!(session = %id, "session deleted: over --retain-sessions or --retain-session-bytes");
                count -= 1;
                bytes = bytes.saturating_sub(size);
                deleted += 1;
            }
        }
        deleted
    }

    fn map(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Session>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks a session id from a URL or body.
    pub fn check_id(id: &str) -> Result<()> {
        if valid_session_id(id) {
            Ok(())
        } else {
            Err(Error::InvalidSessionId(format!(
                "{id:?} is not a session id: use 1 to 128 of A-Z a-z 0-9 . _ - (not starting with . or -)"
            )))
        }
    }

    /// Creates a session.
    pub fn create(
        &self,
        id: Option<String>,
        metadata: Option<Value>,
        agent: Option<String>,
        mcp_servers: Vec<Value>,
        cwd: Option<String>,
    ) -> Result<Arc<Session>> {
        let id = match id {
            Some(id) => {
                Self::check_id(&id)?;
                id
            }
            None => format!("ses-{:012x}-{}", now_ms(), random_hex(6)),
        };
        let mut map = self.map();
        if map.contains_key(&id) {
            return Err(Error::SessionExists(format!(
                "session {id:?} already exists"
            )));
        }
        let dir = self.dir.join(&id);
        // A directory not loaded as a session (damaged, or its summary never reached the disk)
        // may still hold history: never delete it here.
        if dir.symlink_metadata().is_ok() {
            return Err(Error::SessionExists(format!(
                "the state directory's sessions/{id} exists but is not a loadable session; \
                 remove it on disk or choose another id"
            )));
        }
        std::fs::create_dir_all(dir.join("files"))?;
        let meta = Meta {
            id: id.clone(),
            created_at: now_ms(),
            metadata,
            always_allowed: BTreeSet::new(),
            always_rejected: BTreeSet::new(),
            agent,
            acp: None,
            mcp_servers,
            cwd,
        };
        save_meta(&dir, &meta)?;
        let session = Arc::new(Session {
            dir,
            meta: Mutex::new(meta),
            log: Mutex::new(Weak::new()),
            event_count: AtomicU64::new(0),
            busy: AtomicBool::new(false),
            running: Mutex::new(None),
        });
        map.insert(id, Arc::clone(&session));
        Ok(session)
    }

    /// Looks a session up.
    pub fn get(&self, id: &str) -> Result<Arc<Session>> {
        Self::check_id(id)?;
        self.map()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::SessionNotFound(format!("no session {id:?}")))
    }

    /// Every session, oldest first.
    pub fn list(&self) -> Vec<Arc<Session>> {
        let mut all: Vec<Arc<Session>> = self.map().values().cloned().collect();
        all.sort_by_key(|s| {
            let meta = s.meta();
            (meta.created_at, meta.id.clone())
        });
        all
    }

    /// Deletes a session with its history and directory; 409 while an invoke runs in it.
    pub fn delete(&self, id: &str) -> Result<()> {
        let session = self.get(id)?;
        let claim = session.claim()?;
        self.map().remove(id);
        // Followers of the history end.
        if let Some(log) = claim.1.as_ref() {
            log.close();
        }
        drop(claim);
        std::fs::remove_dir_all(&session.dir)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn acp_state_is_persisted_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let sessions = Sessions::load(dir.path(), 1000, 1 << 30).unwrap();
        let session = sessions
            .create(
                Some("s".into()),
                None,
                Some("codex".into()),
                Vec::new(),
                None,
            )
            .unwrap();
        let big = Value::String("x".repeat(MAX_AGENT_STATE));
        session.update_acp(|s| {
            *s = Some(AcpSessionState {
                session_id: "acp-1".into(),
                modes: Some(serde_json::json!({"currentModeId": "ask"})),
                config_options: Some(Value::Array(vec![big])),
                ..Default::default()
            })
        });
        let state = session.acp_state().unwrap();
        assert_eq!(state.config_options, None, "over the bound: dropped");
        assert!(state.modes.is_some());
        // Reloaded from session.json, as after a runner restart.
        let again = Sessions::load(dir.path(), 1000, 1 << 30)
            .unwrap()
            .get("s")
            .unwrap();
        assert_eq!(again.acp_state().unwrap().session_id, "acp-1");
        assert_eq!(again.agent().as_deref(), Some("codex"));
        assert_eq!(again.info().acp.unwrap().mode.as_deref(), Some("ask"));
    }
}
