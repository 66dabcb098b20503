//! The agent channel: two extra file descriptors every invoked entrypoint gets, named in its
//! environment, carrying JSON lines.
//!
//! - `AGENTBOX_EVENTS_FD` (agent → runner): `{"type":"event","name":..,"data":..}` becomes an
//!   `agent` event; `{"type":"permission_request","id":..,"title":..,"toolCall":{..}}` becomes a
//!   `permission` event and a pending request. Anything else is recorded as `protocol_error`
//!   and skipped.
//! - `AGENTBOX_REPLIES_FD` (runner → agent): `{"type":"permission_reply","id":..,"reply":..}`.
//!
//! A request is answered by a client (`POST .../permissions/{id}`, a reply or one of the options
//! the agent listed), by the runner when an earlier `always` or `reject_always` covers its tool
//! kind (`toolCall.kind`, or `other` without one; remembered per session, or per invoke outside
//! a session: the `permission` event then carries `autoReply`), by the runner with `reject` once
//! `--permission-timeout` passes, or `cancelled` when an ACP turn is canceled or ends first
//! ([`External::cancel_pending`]). Every answer is journaled as `permission_reply`.
//!
//! Both descriptors are pipes created close-on-exec; only the spawn of this invoke's entrypoint
//! clears the flag (see [`crate::supervisor`]). The invoke's output pump reads the events pipe
//! beside stdout and stderr ([`EventsReader`]), so every agent line is journaled before the
//! `exit` event with no extra task or thread hop; the replies pipe gets a Tokio writer task
//! only when the first reply is sent.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use agentbox_proto::{
    session_event, valid_permission_id, AgentEvent, AutoReply, InvokeId, PermissionEvent,
    PermissionOption, PermissionReply, PermissionReplyEvent, PermissionReplyRequest,
    PermissionReplyResponse, ProtocolErrorEvent, ReplyOrigin,
};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::journal::EventLog;
use crate::session::{Claim, Session};
use crate::supervisor::SideReader;

/// Longest line accepted from the agent.
const MAX_LINE: usize = 1 << 20;
/// How much of a bad line a `protocol_error` event quotes.
const QUOTE: usize = 1 << 10;

/// The open channels, by invoke.
#[derive(Debug)]
pub struct Permissions {
    map: Mutex<HashMap<InvokeId, Arc<Channel>>>,
    timeout: Duration,
}

impl Permissions {
    /// A registry whose requests time out after `timeout`.
    pub fn new(timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            map: Mutex::new(HashMap::new()),
            timeout,
        })
    }

    fn map(&self) -> MutexGuard<'_, HashMap<InvokeId, Arc<Channel>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers request `permission_id` of the running invoke `invoke_id` with a client's
    /// `reply` or `optionId`.
    pub fn answer(
        &self,
        invoke_id: &str,
        permission_id: &str,
        req: PermissionReplyRequest,
    ) -> Result<PermissionReplyResponse> {
        let choice = match (req.reply, req.option_id) {
            (Some(PermissionReply::Cancelled), None) => {
                return Err(Error::InvalidRequest(
                    "\"cancelled\" is the runner's answer to a canceled turn, not a reply; \
                     use once, always, reject or reject_always"
                        .into(),
                ))
            }
            (Some(reply), None) => Choice::Reply(reply),
            (None, Some(option_id)) => Choice::Option(option_id),
            _ => {
                return Err(Error::InvalidRequest(
                    "give \"reply\" (once, always, reject, reject_always) or \"optionId\" \
                     (one of the permission event's options), not both"
                        .into(),
                ))
            }
        };
        let channel = self
            .map()
            .get(&InvokeId(invoke_id.to_owned()))
            .cloned()
            .ok_or_else(|| {
                Error::PermissionNotFound(format!(
                    "no permission request {permission_id:?}: invoke {invoke_id:?} is not running"
                ))
            })?;
        let (reply, option_id) = channel.answer(permission_id, choice, ReplyOrigin::Client)?;
        Ok(PermissionReplyResponse {
            permission_id: permission_id.to_owned(),
            invoke_id: channel.invoke_id.clone(),
            reply,
            option_id,
        })
    }
}

/// What answers a request: a reply, or one of the agent's own options.
#[derive(Debug)]
enum Choice {
    Reply(PermissionReply),
    Option(String),
}

/// What an invoke needs to open its channel.
#[derive(Debug)]
pub struct AgentSetup {
    /// The registry.
    pub permissions: Arc<Permissions>,
    /// The session the invoke runs in, taken for it.
    pub session: Option<Claim>,
}

/// A channel opened for an invoke that is about to be spawned.
#[derive(Debug)]
pub struct Opened {
    /// Environment for the child.
    pub env: Vec<(String, String)>,
    /// The child's ends, inherited by the entrypoint only.
    pub child_fds: Vec<OwnedFd>,
    events: OwnedFd,
    channel: Arc<Channel>,
    permissions: Arc<Permissions>,
}

impl AgentSetup {
    /// Creates the pipes and, in a session, mirrors the invoke's journal into its history.
    pub fn open(self, invoke_id: &InvokeId, log: &Arc<EventLog>) -> Result<Opened> {
        let cloexec = nix::fcntl::OFlag::O_CLOEXEC;
        let (events_r, events_w) = nix::unistd::pipe2(cloexec)
            .map_err(|e| Error::Internal(format!("cannot create the events pipe: {e}")))?;
        let (replies_r, replies_w) = nix::unistd::pipe2(cloexec)
            .map_err(|e| Error::Internal(format!("cannot create the replies pipe: {e}")))?;
        let mut env = vec![
            (
                "AGENTBOX_EVENTS_FD".to_owned(),
                events_w.as_raw_fd().to_string(),
            ),
            (
                "AGENTBOX_REPLIES_FD".to_owned(),
                replies_r.as_raw_fd().to_string(),
            ),
        ];
        if let Some(claim) = &self.session {
            let session = claim.session();
            claim.set_invoke(invoke_id);
            env.push(("AGENTBOX_SESSION_ID".into(), session.id()));
            env.push((
                "AGENTBOX_SESSION_DIR".into(),
                session.files_dir().display().to_string(),
            ));
            log.set_mirror(session.mirror_for(invoke_id.clone()));
        }
        let channel = Arc::new(Channel {
            invoke_id: invoke_id.clone(),
            log: Arc::clone(log),
            replies: Mutex::new(Replies::Pipe(Some(replies_w))),
            runtime: tokio::runtime::Handle::current(),
            pending: Mutex::new(HashMap::new()),
            always_local: Mutex::new(HashSet::new()),
            timeout: self.permissions.timeout,
            claim: Mutex::new(self.session),
        });
        Ok(Opened {
            env,
            child_fds: vec![events_w, replies_r],
            events: events_r,
            channel,
            permissions: self.permissions,
        })
    }
}

impl Opened {
    /// Registers the channel for replies and returns the reader of the events pipe, for the
    /// invoke's pump (call inside the runtime, after taking [`Opened::child_fds`]).
    pub fn start(self) -> EventsReader {
        self.permissions
            .map()
            .insert(self.channel.invoke_id.clone(), Arc::clone(&self.channel));
        EventsReader {
            fd: self.events,
            channel: self.channel,
            permissions: self.permissions,
            line: Vec::new(),
            skipping: false,
        }
    }
}

/// The runner's end of the events pipe, read by the invoke's pump: splits lines and handles
/// each one as it arrives.
#[derive(Debug)]
pub struct EventsReader {
    fd: OwnedFd,
    channel: Arc<Channel>,
    permissions: Arc<Permissions>,
    line: Vec<u8>,
    skipping: bool,
}

impl SideReader for EventsReader {
    fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn data(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match memchr::memchr(b'\n', data) {
                Some(nl) => {
                    if self.skipping {
                        self.skipping = false;
                    } else {
                        self.line.extend_from_slice(&data[..nl]);
                        self.channel.handle_line(&self.line);
                    }
                    self.line.clear();
                    data = &data[nl + 1..];
                }
                None => {
                    if !self.skipping {
                        self.line.extend_from_slice(data);
                        if self.line.len() > MAX_LINE {
                            self.channel.protocol_error(
                                format!("a line is longer than {MAX_LINE} bytes; skipped"),
                                &self.line,
                            );
                            self.line.clear();
                            self.skipping = true;
                        }
                    }
                    data = &[];
                }
            }
        }
    }

    fn end(&mut self) {
        if !self.skipping && !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.channel.handle_line(&line);
        }
        // The session is free before the invoke's `exit` is written.
        self.channel.release(&self.permissions);
    }
}

impl AgentSetup {
    /// A channel fed by the runner itself rather than by descriptors (an ACP agent's
    /// permission requests): registered for replies, in the session when there is one. The
    /// receiver yields the `permission_reply` lines that would go to `AGENTBOX_REPLIES_FD`.
    pub fn open_external(
        self,
        invoke_id: &InvokeId,
        log: &Arc<EventLog>,
    ) -> (External, mpsc::UnboundedReceiver<String>) {
        if let Some(claim) = &self.session {
            claim.set_invoke(invoke_id);
            log.set_mirror(claim.session().mirror_for(invoke_id.clone()));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let channel = Arc::new(Channel {
            invoke_id: invoke_id.clone(),
            log: Arc::clone(log),
            replies: Mutex::new(Replies::Sender(tx)),
            runtime: tokio::runtime::Handle::current(),
            pending: Mutex::new(HashMap::new()),
            always_local: Mutex::new(HashSet::new()),
            timeout: self.permissions.timeout,
            claim: Mutex::new(self.session),
        });
        self.permissions
            .map()
            .insert(invoke_id.clone(), Arc::clone(&channel));
        (
            External {
                channel,
                permissions: self.permissions,
            },
            rx,
        )
    }
}

/// A channel opened with [`AgentSetup::open_external`].
#[derive(Debug)]
pub struct External {
    channel: Arc<Channel>,
    permissions: Arc<Permissions>,
}

impl External {
    /// Handles one message as if the agent had written it (`permission_request`, `event`).
    pub fn inject(&self, message: &Value) {
        self.channel.handle_line(message.to_string().as_bytes());
    }

    /// Records a `protocol_error`.
    pub fn protocol_error(&self, message: String, line: &[u8]) {
        self.channel.protocol_error(message, line);
    }

    /// Answers every request still waiting `cancelled` (`by: "cancel"`), journaled; the reply
    /// lines go to the receiver like any other.
    pub fn cancel_pending(&self) {
        let waiting: Vec<String> = self
            .channel
            .pending()
            .iter()
            .filter(|(_, p)| matches!(p, Pending::Waiting { .. }))
            .map(|(id, _)| id.clone())
            .collect();
        for id in waiting {
            let _ = self.channel.answer(
                &id,
                Choice::Reply(PermissionReply::Cancelled),
                ReplyOrigin::Cancel,
            );
        }
    }

    /// Unregisters the channel and frees the session (before the invoke's `exit`).
    pub fn close(&self) {
        self.channel.release(&self.permissions);
    }
}

/// Where `permission_reply` lines go.
#[derive(Debug)]
enum Replies {
    /// The agent's replies pipe, before the first reply (taken when its writer starts).
    Pipe(Option<OwnedFd>),
    /// A writer task's queue, or an external channel's receiver.
    Sender(mpsc::UnboundedSender<String>),
}

#[derive(Debug)]
enum Pending {
    Waiting {
        kind: String,
        options: Vec<PermissionOption>,
    },
    Answered,
}

/// One invoke's channel.
#[derive(Debug)]
struct Channel {
    invoke_id: InvokeId,
    log: Arc<EventLog>,
    replies: Mutex<Replies>,
    /// For the tasks a channel starts from the pump's thread (timeouts, the reply writer).
    runtime: tokio::runtime::Handle,
    pending: Mutex<HashMap<String, Pending>>,
    always_local: Mutex<HashSet<(String, PermissionReply)>>,
    timeout: Duration,
    claim: Mutex<Option<Claim>>,
}

impl Channel {
    /// Unregisters the channel from `permissions` and frees its session claim.
    fn release(&self, permissions: &Permissions) {
        permissions.map().remove(&self.invoke_id);
        drop(self.claim.lock().unwrap_or_else(|p| p.into_inner()).take());
    }

    fn session(&self) -> Option<Arc<Session>> {
        self.claim
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|c| Arc::clone(c.session()))
    }

    fn pending(&self) -> MutexGuard<'_, HashMap<String, Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn protocol_error(&self, message: String, line: &[u8]) {
        // Invalid bytes grow to three (U+FFFD): cut at the last char boundary within QUOTE.
        let mut quoted = String::from_utf8_lossy(&line[..line.len().min(QUOTE)]).into_owned();
        let mut end = quoted.len().min(QUOTE);
        while !quoted.is_char_boundary(end) {
            end -= 1;
        }
        quoted.truncate(end);
        tracing::debug!(invoke = %self.invoke_id, %message, "agent protocol error");
        self.log.append(|b| {
            b.event(
                session_event::PROTOCOL_ERROR,
                &ProtocolErrorEvent {
                    message,
                    line: quoted,
                },
            )
        });
    }

    fn handle_line(self: &Arc<Self>, line: &[u8]) {
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        let value: Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(e) => return self.protocol_error(format!("not JSON: {e}"), line),
        };
        match value.get("type").and_then(Value::as_str) {
            Some("event") => {
                let event = AgentEvent {
                    name: value.get("name").and_then(Value::as_str).map(str::to_owned),
                    data: value.get("data").cloned().unwrap_or(Value::Null),
                };
                self.log.append(|b| b.event(session_event::AGENT, &event));
            }
            Some("permission_request") => self.request(&value, line),
            Some(other) => {
                self.protocol_error(format!("unknown message type {other:?}"), line);
            }
            None => self.protocol_error("a message needs a string \"type\"".into(), line),
        }
    }

    fn request(self: &Arc<Self>, value: &Value, line: &[u8]) {
        let Some(id) = value
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| valid_permission_id(id))
        else {
            return self.protocol_error(
                "permission_request needs an \"id\" of 1 to 128 of A-Z a-z 0-9 . _ -".into(),
                line,
            );
        };
        let tool_call = value.get("toolCall").cloned().unwrap_or(Value::Null);
        let kind = tool_call
            .get("kind")
            .and_then(Value::as_str)
            .filter(|k| !k.is_empty() && k.len() <= 64)
            .unwrap_or("other")
            .to_owned();
        let options: Vec<PermissionOption> = value
            .get("options")
            .and_then(Value::as_array)
            .map(|all| {
                all.iter()
                    .filter_map(|o| serde_json::from_value(o.clone()).ok())
                    .collect()
            })
            .unwrap_or_default();
        let remembered = |reply: PermissionReply| match self.session() {
            Some(session) => session.remembers(&kind, reply),
            None => self
                .always_local
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&(kind.clone(), reply)),
        };
        let auto = [PermissionReply::Always, PermissionReply::RejectAlways]
            .into_iter()
            .find(|r| remembered(*r));
        {
            let mut pending = self.pending();
            if pending.contains_key(id) {
                drop(pending);
                return self.protocol_error(format!("permission id {id:?} was already used"), line);
            }
            // One the runner answers itself is answered before anyone can see it.
            let state = match auto {
                Some(_) => Pending::Answered,
                None => Pending::Waiting {
                    kind: kind.clone(),
                    options: options.clone(),
                },
            };
            pending.insert(id.to_owned(), state);
        }
        let event = PermissionEvent {
            permission_id: id.to_owned(),
            title: value
                .get("title")
                .and_then(Value::as_str)
                .map(str::to_owned),
            tool_call,
            tool_kind: kind.clone(),
            available_replies: vec![
                PermissionReply::Once,
                PermissionReply::Always,
                PermissionReply::Reject,
                PermissionReply::RejectAlways,
            ],
            options,
            auto_reply: auto.map(|reply| AutoReply {
                reply,
                by: ReplyOrigin::Always,
            }),
        };
        self.log
            .append(|b| b.event(session_event::PERMISSION, &event));
        if let Some(reply) = auto {
            self.deliver(id, kind, reply, None, ReplyOrigin::Always);
            return;
        }
        let weak: Weak<Self> = Arc::downgrade(self);
        let id = id.to_owned();
        let timeout = self.timeout;
        self.runtime.spawn(async move {
            tokio::time::sleep(timeout).await;
            if let Some(channel) = weak.upgrade() {
                let _ = channel.answer(
                    &id,
                    Choice::Reply(PermissionReply::Reject),
                    ReplyOrigin::Timeout,
                );
            }
        });
    }

    /// Answers request `id`: journals the `permission_reply`, remembers an `always` or
    /// `reject_always`, writes the reply line. Returns the reply and the option chosen.
    fn answer(
        &self,
        id: &str,
        choice: Choice,
        by: ReplyOrigin,
    ) -> Result<(PermissionReply, Option<String>)> {
        let (kind, reply, option_id) = {
            let mut pending = self.pending();
            let (kind, options) = match pending.get(id) {
                None => {
                    return Err(Error::PermissionNotFound(format!(
                        "invoke {} has no permission request {id:?}",
                        self.invoke_id
                    )))
                }
                Some(Pending::Answered) => {
                    return Err(Error::PermissionAnswered(format!(
                        "permission request {id:?} was already answered"
                    )))
                }
                Some(Pending::Waiting { kind, options }) => (kind.clone(), options),
            };
            let (reply, option_id) = match choice {
                Choice::Reply(reply) => (reply, None),
                Choice::Option(option_id) => {
                    let Some(option) = options.iter().find(|o| o.option_id == option_id) else {
                        let offered: Vec<&str> =
                            options.iter().map(|o| o.option_id.as_str()).collect();
                        return Err(Error::InvalidRequest(format!(
                            "permission request {id:?} offers no option {option_id:?} \
                             (it offers {offered:?})"
                        )));
                    };
                    let Some(reply) = PermissionReply::of_option_kind(&option.kind) else {
                        return Err(Error::InvalidRequest(format!(
                            "option {option_id:?} has kind {:?}, which the runner cannot \
                             account for; choose another or reply with once, always, reject",
                            option.kind
                        )));
                    };
                    (reply, Some(option_id))
                }
            };
            pending.insert(id.to_owned(), Pending::Answered);
            (kind, reply, option_id)
        };
        self.deliver(id, kind, reply, option_id.clone(), by);
        Ok((reply, option_id))
    }

    /// Remembers an `always` or `reject_always`, journals the `permission_reply` and writes the
    /// reply line, for request `id` (already marked answered).
    fn deliver(
        &self,
        id: &str,
        kind: String,
        reply: PermissionReply,
        option_id: Option<String>,
        by: ReplyOrigin,
    ) {
        if matches!(
            reply,
            PermissionReply::Always | PermissionReply::RejectAlways
        ) {
            match self.session() {
                Some(session) => session.remember(&kind, reply),
                None => {
                    self.always_local
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert((kind, reply));
                }
            }
        }
        self.log.append(|b| {
            b.event(
                session_event::PERMISSION_REPLY,
                &PermissionReplyEvent {
                    permission_id: id.to_owned(),
                    reply,
                    option_id: option_id.clone(),
                    by,
                },
            )
        });
        let mut message = json!({"type": "permission_reply", "id": id, "reply": reply});
        if let Some(option_id) = &option_id {
            message["optionId"] = json!(option_id);
        }
        let mut line = message.to_string();
        line.push('\n');
        let mut replies = self.replies.lock().unwrap_or_else(|p| p.into_inner());
        if let Replies::Pipe(fd) = &mut *replies {
            let (tx, rx) = mpsc::unbounded_channel();
            if let Some(fd) = fd.take() {
                self.runtime.spawn(write_replies(fd, rx));
            }
            *replies = Replies::Sender(tx);
        }
        if let Replies::Sender(tx) = &*replies {
            let _ = tx.send(line);
        }
    }
}

async fn write_replies(fd: OwnedFd, mut rx: mpsc::UnboundedReceiver<String>) {
    let Ok(mut pipe) = tokio::net::unix::pipe::Sender::from_owned_fd(fd) else {
        return;
    };
    while let Some(line) = rx.recv().await {
        // The agent closed its end or exited: the rest has nobody to go to.
        if pipe.write_all(line.as_bytes()).await.is_err() {
            return;
        }
    }
}
