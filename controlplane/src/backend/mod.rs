//! Where sandboxes live. The control plane asks a [`Backend`] only for lifecycle operations and
//! for [`Target`]s (where a sandbox's runner listens); it keeps no state of its own.

use agentbox_proto::{CreatedBy, SandboxStatus, SandboxSummary, StopReason};

pub use crate::connector::RunnerAddr;
use crate::error::Result;
use crate::templates::Template;

pub mod docker;
pub mod docker_net;
pub mod kubernetes;
pub mod local;

/// Where one sandbox's runner is, and whether requests may go there.
#[derive(Debug, Clone)]
pub struct Target {
    /// The runner's address.
    pub addr: RunnerAddr,
    /// The sandbox's own runner token.
    pub token: String,
    /// The phase.
    pub status: SandboxStatus,
    /// `agent` or `code`.
    pub mode: String,
    /// The namespace.
    pub namespace: String,
    /// The template's name (a metrics label).
    pub template: String,
    /// Why it is stopped; a request to a sandbox stopped for `idle` resumes it.
    pub stop_reason: Option<StopReason>,
}

/// What to create.
#[derive(Debug, Clone)]
pub struct CreateSpec {
    /// Name (validated DNS label).
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Template.
    pub template: Template,
    /// The caller.
    pub created_by: CreatedBy,
    /// Its lifetime (a validated Go duration), from the request or the template.
    pub timeout: Option<String>,
    /// Its idle timeout (a validated Go duration), from the request or the template.
    pub idle_timeout: Option<String>,
}

/// One small interface per place sandboxes can live.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Every sandbox.
    async fn list(&self) -> Result<Vec<SandboxSummary>>;
    /// The sandboxes of `namespace` as the platform holds them at this moment: what a create
    /// counts under the create lock ([`crate::governance::Governance::lock_creates`]). Only
    /// their name, namespace, mode and `createdBy` need be right. Backends whose `list` reads
    /// their own store use it; Kubernetes asks the API server, since its caches may not show
    /// another replica's create yet.
    async fn list_for_count(&self, namespace: &str) -> Result<Vec<SandboxSummary>> {
        let mut all = self.list().await?;
        all.retain(|s| s.namespace == namespace);
        Ok(all)
    }
    /// One sandbox, or `None`.
    async fn get(&self, name: &str) -> Result<Option<SandboxSummary>>;
    /// Creates and starts a sandbox ([`crate::error::Error::AlreadyExists`] when taken).
    async fn create(&self, spec: CreateSpec) -> Result<SandboxSummary>;
    /// Deletes a sandbox and its workspace.
    async fn delete(&self, name: &str) -> Result<()>;
    /// Stops a sandbox; its workspace is kept.
    async fn stop(&self, name: &str) -> Result<SandboxSummary>;
    /// Starts a stopped sandbox again, with the same workspace.
    async fn resume(&self, name: &str) -> Result<SandboxSummary>;
    /// Stops a sandbox for `reason` (shown as `stopReason`). For [`StopReason::Idle`] the
    /// backend checks again, under its own lock, that nothing used the sandbox since
    /// `idle_since`, and answers `Ok(None)` without stopping when something did. Backends
    /// that keep no reason stop it plainly.
    async fn stop_for(
        &self,
        name: &str,
        reason: StopReason,
        _idle_since: std::time::SystemTime,
    ) -> Result<Option<SandboxSummary>> {
        if reason == StopReason::Idle {
            // Without a reason kept, an idle stop could not be resumed on demand.
            return Ok(None);
        }
        self.stop(name).await.map(Some)
    }
    /// Ends a sandbox's lifetime: stops it (`stopReason: timeout`) or deletes it, as its
    /// template's `onTimeout` says.
    async fn expire(&self, name: &str) -> Result<()> {
        self.stop_for(name, StopReason::Timeout, std::time::SystemTime::now())
            .await
            .map(|_| ())
    }
    /// Whether this backend keeps `timeout` and `idleTimeout` (and so needs the lifecycle
    /// sweep at all; the others' listing would be work for nothing).
    fn keeps_lifecycle(&self) -> bool {
        false
    }
    /// Notes that a request used the sandbox now (its `lastActivityAt`). Cheap: called on
    /// every proxied request.
    fn touch(&self, _name: &str) {}
    /// Starts pooled sandboxes until every template's warm pool is full, and replaces those
    /// past their `maxAge` or gone. Called in the background, never on a request's path.
    async fn refill_pools(&self, _templates: &[Template]) -> Result<()> {
        Ok(())
    }
    /// The warm pools of `templates`.
    fn warm_pools(&self, _templates: &[Template]) -> Vec<agentbox_proto::WarmPoolInfo> {
        Vec::new()
    }
    /// Creates `name` as a copy of `source`: its workspace and configuration, its template,
    /// namespace and timeouts; started like a create.
    async fn clone_sandbox(
        &self,
        source: &str,
        _name: &str,
        _created_by: CreatedBy,
    ) -> Result<SandboxSummary> {
        Err(crate::error::Error::Backend(format!(
            "sandbox {source:?}: this backend cannot clone sandboxes yet (the local backend can)"
        )))
    }
    /// The credential `name` of `namespace` was set or deleted: rewrite it where running
    /// sandboxes that reference it read it (their credentials directory), so their next
    /// invoke sees the change. Backends whose credentials are the platform's own (Kubernetes
    /// Secrets) do nothing.
    async fn credentials_changed(&self, _namespace: &str, _name: &str) -> Result<()> {
        Ok(())
    }
    /// Where the runner is; `None` for an unknown sandbox. Must not be slow: it is on every
    /// request's path.
    async fn resolve(&self, name: &str) -> Result<Option<Target>>;
    /// Records the outcome of a configure or invoke where the platform keeps such records
    /// (Kubernetes Events on the Pod). Called after the response ended; never on the
    /// request's path. `action` is `configure` or `invoke`, `outcome` a metrics outcome label.
    async fn record(&self, _name: &str, _action: &str, _outcome: &str, _status: u16) {}
    /// Whether [`Backend::record`] keeps anything: when not, no task is spawned to call it
    /// (a task per invoke, and on a multi-threaded runtime often a worker woken for it).
    fn records_outcomes(&self) -> bool {
        false
    }
}

/// Whether `name` can name a sandbox: the rule is part of the wire contract, see
/// [`agentbox_proto::valid_sandbox_name`].
pub fn valid_name(name: &str) -> bool {
    agentbox_proto::valid_sandbox_name(name)
}

/// The namespace whose sandboxes are keyed by their plain name.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The backend key of sandbox `name` in `namespace`: the name itself in `default` (so every
/// sandbox of a single-namespace deployment, and every one made before names were per
/// namespace, keeps its key), else `{name}.{namespace}`. A name is a DNS label and has no
/// dot, so two (namespace, name) pairs never share a key. Backends know sandboxes only by
/// key; the API shows the name and the namespace ([`display_name`]), never the key.
pub fn sandbox_key(namespace: &str, name: &str) -> String {
    if namespace == DEFAULT_NAMESPACE {
        name.to_owned()
    } else {
        format!("{name}.{namespace}")
    }
}

/// The name shown for the sandbox keyed `key` in `namespace`: the key without its
/// `.{namespace}`. A record made before names were per namespace is keyed by its plain name
/// in any namespace, and shows it unchanged.
pub fn display_name<'a>(key: &'a str, namespace: &str) -> &'a str {
    key.strip_suffix(namespace)
        .and_then(|k| k.strip_suffix('.'))
        .filter(|k| !k.is_empty())
        .unwrap_or(key)
}

/// Whether `key` can key a sandbox: a name, or `name.namespace`, each a DNS label.
pub fn valid_key(key: &str) -> bool {
    match key.split_once('.') {
        None => valid_name(key),
        Some((name, namespace)) => valid_name(name) && valid_name(namespace),
    }
}

/// `n` random bytes as hex (tokens, temporary names).
pub(crate) fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    getrandom::fill(&mut buf).expect("the kernel's random source is available");
    hex::encode(buf)
}

/// Now, RFC 3339 to the second.
pub(crate) fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert_eq!(sandbox_key("default", "foo"), "foo");
        assert_eq!(sandbox_key("team-a", "foo"), "foo.team-a");
        assert_ne!(sandbox_key("team-a", "foo"), sandbox_key("team-b", "foo"));
        assert_ne!(sandbox_key("team-a", "foo"), sandbox_key("default", "foo"));
        for (namespace, name) in [("default", "foo"), ("team-a", "foo"), ("a", "b-c")] {
            let key = sandbox_key(namespace, name);
            assert!(valid_key(&key), "{key}");
            assert_eq!(display_name(&key, namespace), name);
        }
        // A record keyed by its plain name outside `default` (made before names were per
        // namespace) shows its key.
        assert_eq!(display_name("foo", "team-a"), "foo");
        // Only the record's own namespace is stripped.
        assert_eq!(display_name("foo.team-a", "team-b"), "foo.team-a");
        assert_eq!(display_name("xteam-a", "team-a"), "xteam-a");
        assert_eq!(display_name(".team-a", "team-a"), ".team-a");
        for bad in [
            "", ".", "foo.", ".ns", "a.b.c", "Foo.ns", "foo.Ns", "foo..ns",
        ] {
            assert!(!valid_key(bad), "{bad}");
        }
        assert!(valid_key(&format!("{}.{}", "a".repeat(63), "b".repeat(63))));
        assert!(!valid_key(&format!("{}.b", "a".repeat(64))));
    }

    #[test]
    fn names() {
        for ok in ["a", "demo-agent", "x1", &"a".repeat(63)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a.b",
            "../x",
            &"a".repeat(64),
            "a b",
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
