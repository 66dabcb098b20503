//! Where running sandboxes' runners are, kept between requests and kept true by the engine's
//! event stream.
//!
//! Without it every proxied request inspected its container (one engine round trip, 5–30 ms,
//! most of a Docker invoke's latency). The cache holds only running sandboxes, each with the
//! container id it was read from. The engine's events for this scope's containers (every
//! action but execs: die, stop, kill, destroy, rename, pause, health changes, …) drop the
//! entries of that container, whichever replica or user caused them, so every replica sees a
//! change as soon as the engine reports it; this replica's own stops, deletes and renames also
//! drop the entry before they act, so it reads its own writes.
//!
//! The cache is used only while the event stream is subscribed: when it fails it is emptied
//! and bypassed until a new subscription is made, which asks for the events since two seconds
//! before the failure, so nothing that happened in between is missed. An entry also expires
//! after [`TTL`], a bound on staleness should an event be lost anyway.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bollard::query_parameters::EventsOptionsBuilder;
use bollard::Docker;
use futures_util::StreamExt;

use crate::backend::Target;

/// The longest a cached runner address is used without a fresh inspect.
pub(super) const TTL: Duration = Duration::from_secs(30);

/// How many sandboxes the cache holds at most; past it, it is emptied (a miss only costs an
/// inspect).
const MAX_ENTRIES: usize = 65_536;

#[derive(Debug, Clone)]
struct Entry {
    container: String,
    target: Target,
    at: Instant,
}

/// The running sandboxes' targets, by sandbox name.
#[derive(Debug, Default)]
pub(super) struct Targets {
    entries: Mutex<HashMap<String, Entry>>,
    /// Whether the event stream is subscribed (the cache is used only then).
    watching: AtomicBool,
}

impl Targets {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cached target of `name`, when it is fresh and the stream is watched.
    pub(super) fn get(&self, name: &str) -> Option<Target> {
        if !self.watching.load(Ordering::Acquire) {
            return None;
        }
        let entries = self.entries();
        let e = entries.get(name)?;
        (e.at.elapsed() < TTL).then(|| e.target.clone())
    }

    /// Keeps `target` of `name`, read from container `container` (running).
    pub(super) fn put(&self, name: &str, container: &str, target: &Target) {
        if !self.watching.load(Ordering::Acquire) || container.is_empty() {
            return;
        }
        let mut entries = self.entries();
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(
            name.to_owned(),
            Entry {
                container: container.to_owned(),
                target: target.clone(),
                at: Instant::now(),
            },
        );
    }

    /// Forgets `name` (this replica is about to stop, remove or rename its container).
    pub(super) fn forget(&self, name: &str) {
        self.entries().remove(name);
    }

    /// Forgets whatever was read from container `id` (an event about it).
    fn forget_container(&self, id: &str) {
        self.entries().retain(|_, e| e.container != id);
    }

    /// Follows the engine's events for `scope`'s containers for as long as `targets` lives.
    pub(super) fn watch(targets: &Arc<Targets>, docker: Docker, scope: String) {
        let weak = Arc::downgrade(targets);
        tokio::spawn(async move {
            let filters = HashMap::from([
                ("type".to_string(), vec!["container".to_string()]),
                (
                    "label".to_string(),
                    vec![format!("{}={scope}", super::SCOPE)],
                ),
            ]);
            let mut since = unix_seconds().saturating_sub(2);
            loop {
                let Some(targets) = weak.upgrade() else {
                    return;
                };
                let options = EventsOptionsBuilder::new()
                    .since(&since.to_string())
                    .filters(&filters)
                    .build();
                let mut events = docker.events(Some(options));
                // From here every event since `since` reaches the loop below; entries put
                // meanwhile are dropped by those events as by later ones.
                targets.entries().clear();
                targets.watching.store(true, Ordering::Release);
                drop(targets);
                loop {
                    let next = events.next().await;
                    let Some(targets) = weak.upgrade() else {
                        return;
                    };
                    match next {
                        Some(Ok(event)) => {
                            let action = event.action.as_deref().unwrap_or_default();
                            if action.starts_with("exec_") {
                                continue;
                            }
                            if let Some(id) = event.actor.as_ref().and_then(|a| a.id.as_deref()) {
                                targets.forget_container(id);
                            }
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "docker events: the stream failed; runner addresses are read per request until it is back");
                            break;
                        }
                        None => break,
                    }
                }
                if let Some(targets) = weak.upgrade() {
                    targets.watching.store(false, Ordering::Release);
                    targets.entries().clear();
                }
                since = unix_seconds().saturating_sub(2);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::RunnerAddr;
    use agentbox_proto::SandboxStatus;

    fn target() -> Target {
        Target {
            addr: RunnerAddr::unix("/run/x.sock".into()),
            token: "t".into(),
            status: SandboxStatus::Running,
            mode: "agent".into(),
            namespace: "default".into(),
            template: "t".into(),
            stop_reason: None,
        }
    }

    #[test]
    fn used_only_while_watched_and_dropped_by_container() {
        let t = Targets::default();
        t.put("a", "c1", &target());
        assert!(t.get("a").is_none(), "not watched: nothing kept");
        t.watching.store(true, Ordering::Release);
        t.put("a", "c1", &target());
        t.put("b", "c2", &target());
        assert!(t.get("a").is_some());
        t.forget_container("c1");
        assert!(t.get("a").is_none());
        assert!(t.get("b").is_some());
        t.forget("b");
        assert!(t.get("b").is_none());
        t.put("c", "c3", &target());
        t.watching.store(false, Ordering::Release);
        assert!(t.get("c").is_none(), "a failed stream bypasses the cache");
    }
}
