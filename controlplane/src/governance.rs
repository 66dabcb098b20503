//! Governance: per-namespace policies set by administrators, checked at create (counts,
//! template, image, resources) and applied at invoke (timeout clamp).
//!
//! Policies live in one JSON file, `<state-dir>/governance/policies.json` (a map from namespace
//! to [`Policy`]; `*` is the policy of every namespace without its own), replaced by temp file +
//! fsync + rename under `<state-dir>/governance/policies.lock`, and re-read by every replica when
//! its modification time or size changes. Creates that a count limit applies to run one at a
//! time across every replica sharing the state directory: each holds
//! `<state-dir>/governance/create.lock` (`flock`) from counting until the sandbox exists, so no
//! two creates can both take the last slot.
//!
//! On Kubernetes ([`Governance::use_configmap`]) the policies are the ConfigMap
//! [`CONFIGMAP`], and the create lock is the coordination.k8s.io/v1 Lease [`CREATE_LEASE`],
//! shared by every replica: see [`LeaseLock`]. Under it, the backend counts from the API
//! server itself ([`crate::backend::Backend::list_for_count`]), not from a cache that may lag
//! another replica's create.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::{Duration, SystemTime};

use agentbox_proto::SandboxSummary;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::Identity;
use crate::error::{Error, Result};
use crate::templates::{Limits, Template};

/// The namespace whose policy applies to every namespace without one of its own.
pub const DEFAULT_NAMESPACE: &str = "*";

/// The largest policies file read (a bound on what one PUT can store).
const MAX_FILE: u64 = 1 << 20;

/// One namespace's policy: every field optional, absent means no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Policy {
    /// Sandboxes one caller may have in the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sandboxes_per_user: Option<u32>,
    /// Sandboxes the namespace may have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sandboxes_total: Option<u32>,
    /// Agent-mode sandboxes the namespace may have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_agent_sandboxes: Option<u32>,
    /// Template names a create may use (`*` at the end matches any rest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_templates: Option<Vec<String>>,
    /// Image patterns a template's image must match (`*` at the end matches any rest); checked
    /// where the template names an image (Docker, Kubernetes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_agent_images: Option<Vec<String>>,
    /// Clamps the template's `maxConcurrentInvokes` (the runner's cap) at create and resume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_invokes_per_sandbox: Option<u32>,
    /// A Go duration: clamps an invoke's `?timeout=` and an exec's `timeout` (and is the
    /// timeout of one without).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_timeout: Option<String>,
    /// A Go duration: the longest idle timeout a sandbox may have. A create asking for a
    /// longer `idleTimeout` is refused (403); a template's longer default, or none (never
    /// idle), is clamped to it. Applied by the idle stop of every backend (local, Docker,
    /// Kubernetes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_idle_timeout: Option<String>,
    /// CPUs (`"2"`, `"500m"`): a template's `limits.cpu` may not be more; a template without
    /// one gets this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cpu: Option<String>,
    /// Memory (`"512Mi"`): a template's `limits.memory` may not be more; a template without
    /// one gets this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory: Option<String>,
}

/// One broken limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Violation {
    /// The policy field.
    pub field: String,
    /// The policy's value.
    #[schema(value_type = Object)]
    pub limit: serde_json::Value,
    /// What the request would have had.
    #[schema(value_type = Object)]
    pub actual: serde_json::Value,
}

/// The 403 body of a request that breaks a policy (the AgentTier SDK's `PolicyViolationError`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PolicyViolationBody {
    /// `policy_violation`.
    pub error: String,
    /// What was refused.
    pub message: String,
    /// Every broken limit.
    pub violations: Vec<Violation>,
}

/// Every namespace's policy: `GET`/`PUT /api/v1/governance/policies`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicySet {
    /// Namespace (or `*`) → policy.
    pub policies: BTreeMap<String, Policy>,
}

/// The caller's policy: `GET /api/v1/governance/effective`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EffectivePolicy {
    /// The namespace asked about.
    pub namespace: String,
    /// Which entry applies: the namespace, `*`, or none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The policy (empty: no limits).
    pub policy: Policy,
}

fn matches(pattern: &str, value: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => value.starts_with(prefix),
        None => pattern == value,
    }
}

/// Parses a Go duration (`90s`, `5m`, `1h30m`, `250ms`), as runners take `?timeout=`: the one
/// parser of the control plane ([`crate::lifecycle::parse_duration`]).
pub fn parse_go_duration(text: &str) -> std::result::Result<Duration, String> {
    crate::lifecycle::parse_duration(text)
}

impl Policy {
    /// Checks the values' syntax.
    pub fn validate(&self) -> std::result::Result<(), String> {
        for (field, value) in [
            ("maxTimeout", &self.max_timeout),
            ("maxIdleTimeout", &self.max_idle_timeout),
        ] {
            if let Some(v) = value {
                parse_go_duration(v).map_err(|e| format!("{field}: {e}"))?;
            }
        }
        let limits = Limits {
            cpu: self.max_cpu.clone(),
            memory: self.max_memory.clone(),
            pids: None,
        };
        limits
            .nano_cpus()
            .map_err(|e| format!("maxCpu: {e}"))
            .and_then(|_| limits.memory_bytes().map_err(|e| format!("maxMemory: {e}")))?;
        Ok(())
    }

    /// Whether a create needs the sandboxes counted (and so the create lock).
    pub fn counts(&self) -> bool {
        self.max_sandboxes_per_user.is_some()
            || self.max_sandboxes_total.is_some()
            || self.max_agent_sandboxes.is_some()
    }

    /// What a create of `template` by `id` in `namespace` breaks, given every sandbox there is.
    pub fn check_create(
        &self,
        id: &Identity,
        namespace: &str,
        template: &Template,
        existing: &[SandboxSummary],
    ) -> Vec<Violation> {
        let mut out = Vec::new();
        let mut over = |field: &str, limit: serde_json::Value, actual: serde_json::Value| {
            out.push(Violation {
                field: field.into(),
                limit,
                actual,
            })
        };
        let here: Vec<&SandboxSummary> = existing
            .iter()
            .filter(|s| s.namespace == namespace)
            .collect();
        if let Some(max) = self.max_sandboxes_total {
            if here.len() as u64 >= u64::from(max) {
                over("maxSandboxesTotal", max.into(), (here.len() + 1).into());
            }
        }
        if let Some(max) = self
            .max_agent_sandboxes
            .filter(|_| template.mode == "agent")
        {
            let agents = here.iter().filter(|s| s.mode == "agent").count();
            if agents as u64 >= u64::from(max) {
                over("maxAgentSandboxes", max.into(), (agents + 1).into());
            }
        }
        if let Some(max) = self.max_sandboxes_per_user {
            let mine = here
                .iter()
                .filter(|s| {
                    s.created_by
                        .as_ref()
                        .is_some_and(|c| c.email == id.email && c.display_name == id.name)
                })
                .count();
            if mine as u64 >= u64::from(max) {
                over("maxSandboxesPerUser", max.into(), (mine + 1).into());
            }
        }
        if let Some(allowed) = &self.allowed_templates {
            if !allowed.iter().any(|p| matches(p, &template.name)) {
                over(
                    "allowedTemplates",
                    serde_json::json!(allowed),
                    template.name.clone().into(),
                );
            }
        }
        if let (Some(allowed), Some(image)) = (&self.allowed_agent_images, &template.image) {
            if !allowed.iter().any(|p| matches(p, image)) {
                over(
                    "allowedAgentImages",
                    serde_json::json!(allowed),
                    image.clone().into(),
                );
            }
        }
        let limits = template.limits.clone().unwrap_or_default();
        let policy = Limits {
            cpu: self.max_cpu.clone(),
            memory: self.max_memory.clone(),
            pids: None,
        };
        if let (Ok(Some(max)), Ok(Some(actual))) = (policy.nano_cpus(), limits.nano_cpus()) {
            if actual > max {
                over(
                    "maxCpu",
                    self.max_cpu.clone().into(),
                    limits.cpu.clone().into(),
                );
            }
        }
        if let (Ok(Some(max)), Ok(Some(actual))) = (policy.memory_bytes(), limits.memory_bytes()) {
            if actual > max {
                over(
                    "maxMemory",
                    self.max_memory.clone().into(),
                    limits.memory.clone().into(),
                );
            }
        }
        out
    }

    /// Clamps what a sandbox starts with: the concurrency cap, and cpu/memory where the
    /// template sets none.
    pub fn apply(&self, template: &mut Template) {
        if let Some(max) = self.max_concurrent_invokes_per_sandbox {
            template.max_concurrent_invokes =
                Some(template.max_concurrent_invokes.map_or(max, |n| n.min(max)));
        }
        if self.max_cpu.is_some() || self.max_memory.is_some() {
            let limits = template.limits.get_or_insert_with(Limits::default);
            if limits.cpu.is_none() {
                limits.cpu.clone_from(&self.max_cpu);
            }
            if limits.memory.is_none() {
                limits.memory.clone_from(&self.max_memory);
            }
        }
    }

    /// The idle timeout a create gets under `maxIdleTimeout`: `asked` (the request's) longer
    /// than it is a violation; otherwise `chosen` (the request's, else the template's), at
    /// most `maxIdleTimeout`, and `maxIdleTimeout` when there is none.
    pub fn clamp_idle_timeout(
        &self,
        asked: Option<&str>,
        chosen: Option<String>,
    ) -> std::result::Result<Option<String>, Violation> {
        let Some(max_text) = self.max_idle_timeout.as_deref() else {
            return Ok(chosen);
        };
        let Ok(max) = parse_go_duration(max_text) else {
            return Ok(chosen);
        };
        if let Some(asked) = asked {
            if parse_go_duration(asked).is_ok_and(|d| d > max) {
                return Err(Violation {
                    field: "maxIdleTimeout".into(),
                    limit: max_text.into(),
                    actual: asked.trim().into(),
                });
            }
        }
        Ok(match chosen {
            Some(text) if parse_go_duration(&text).is_ok_and(|d| d <= max) => Some(text),
            _ => Some(max_text.trim().to_owned()),
        })
    }

    /// The `?timeout=` an invoke runs with: the caller's, at most `maxTimeout`; `maxTimeout`
    /// when the caller gave none. `None`: leave the query as it is.
    pub fn clamp_timeout(&self, requested: Option<&str>) -> Option<String> {
        let max_text = self.max_timeout.as_deref()?;
        let max = parse_go_duration(max_text).ok()?;
        match requested.map(parse_go_duration) {
            // A malformed timeout is the runner's to refuse.
            Some(Err(_)) => None,
            Some(Ok(d)) if d <= max => None,
            _ => Some(format!("{}ms", max.as_millis().max(1))),
        }
    }
}

/// The policies, on disk in the state directory.
#[derive(Debug)]
pub struct Governance {
    dir: PathBuf,
    cached: RwLock<(Option<(SystemTime, u64)>, PolicySet)>,
    /// On Kubernetes: the ConfigMap every replica reads ([`Governance::use_configmap`]).
    configmap: std::sync::OnceLock<ConfigMapStore>,
    /// On Kubernetes: the create lock every replica takes ([`Governance::use_configmap`]).
    lease: std::sync::OnceLock<std::sync::Arc<LeaseLock>>,
}

/// The ConfigMap holding every policy on Kubernetes (key [`CONFIGMAP_KEY`], the same JSON as
/// `policies.json`), in the control plane's namespace.
pub const CONFIGMAP: &str = "agentbox-governance";
/// The ConfigMap's key.
pub const CONFIGMAP_KEY: &str = "policies.json";
/// How often each replica re-reads the ConfigMap: a change made through another replica
/// applies here within this long (at once in the replica that made it).
pub const CONFIGMAP_REFRESH: Duration = Duration::from_secs(2);

/// Policies in a ConfigMap: read by every replica (polled every [`CONFIGMAP_REFRESH`]),
/// changed by read-modify-write with the read `resourceVersion` as the patch's precondition,
/// retried when another replica wrote in between (409 Conflict).
#[derive(Debug)]
struct ConfigMapStore {
    api: kube::Api<k8s_openapi::api::core::v1::ConfigMap>,
    cached: RwLock<PolicySet>,
}

impl ConfigMapStore {
    /// The set and the ConfigMap's `resourceVersion` (`None`: no ConfigMap yet).
    async fn read(&self) -> Result<(PolicySet, Option<String>)> {
        let cm = match self.api.get_opt(CONFIGMAP).await {
            Ok(cm) => cm,
            Err(e) => {
                return Err(Error::Backend(format!(
                    "reading ConfigMap {CONFIGMAP}: {e}"
                )))
            }
        };
        let Some(cm) = cm else {
            return Ok((PolicySet::default(), None));
        };
        let text = cm
            .data
            .as_ref()
            .and_then(|d| d.get(CONFIGMAP_KEY))
            .map_or("", String::as_str);
        let set = if text.trim().is_empty() {
            PolicySet::default()
        } else {
            serde_json::from_str(text)
                .map_err(|e| Error::Internal(format!("ConfigMap {CONFIGMAP}: {e}")))?
        };
        Ok((set, cm.metadata.resource_version))
    }

    async fn refresh(&self) -> Result<PolicySet> {
        let (set, _) = self.read().await?;
        *self.cached.write().unwrap_or_else(|p| p.into_inner()) = set.clone();
        Ok(set)
    }

    async fn update(
        &self,
        mut change: impl FnMut(&mut PolicySet) -> Result<()>,
    ) -> Result<PolicySet> {
        use kube::api::{Patch, PatchParams, PostParams};
        for _ in 0..16 {
            let (mut set, version) = self.read().await?;
            change(&mut set)?;
            let text =
                serde_json::to_string_pretty(&set).map_err(|e| Error::Internal(e.to_string()))?;
            if text.len() as u64 > MAX_FILE {
                return Err(Error::PayloadTooLarge(
                    "the policies would be larger than 1 MiB".into(),
                ));
            }
            let written = match version {
                Some(version) => {
                    let patch = serde_json::json!({
                        "metadata": {"resourceVersion": version},
                        "data": {CONFIGMAP_KEY: text},
                    });
                    self.api
                        .patch(CONFIGMAP, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .map(|_| ())
                }
                None => {
                    let cm = k8s_openapi::api::core::v1::ConfigMap {
                        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                            name: Some(CONFIGMAP.into()),
                            labels: Some(
                                [(
                                    "app.kubernetes.io/managed-by".to_owned(),
                                    "agentbox".to_owned(),
                                )]
                                .into(),
                            ),
                            ..Default::default()
                        },
                        data: Some([(CONFIGMAP_KEY.to_owned(), text)].into()),
                        ..Default::default()
                    };
                    self.api
                        .create(&PostParams::default(), &cm)
                        .await
                        .map(|_| ())
                }
            };
            match written {
                Ok(()) => {
                    *self.cached.write().unwrap_or_else(|p| p.into_inner()) = set.clone();
                    return Ok(set);
                }
                // Another replica wrote since the read: read again.
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => {
                    return Err(Error::Backend(format!(
                        "writing ConfigMap {CONFIGMAP}: {e}"
                    )))
                }
            }
        }
        Err(Error::Backend(format!(
            "ConfigMap {CONFIGMAP} kept changing under 16 writes in a row"
        )))
    }
}

/// The Lease every control-plane replica takes around counting and creating on Kubernetes.
pub const CREATE_LEASE: &str = "agentbox-create-lock";
/// The holder's `leaseDurationSeconds`: a holder that stops renewing for this long (it died)
/// loses the lock to the next replica that wants it.
pub const LEASE_SECONDS: i32 = 15;
/// How long a create waits for the lock before it fails.
const LEASE_WAIT: Duration = Duration::from_secs(30);
/// The longest pause between two looks at a Lease another replica holds.
const LEASE_POLL_MAX: Duration = Duration::from_millis(100);

/// The create lock across replicas on Kubernetes: the coordination.k8s.io/v1 Lease
/// [`CREATE_LEASE`] in the control plane's namespace, taken and released like client-go's
/// leader election takes its lock, by compare-and-swap on the Lease's `resourceVersion`:
///
/// * **take**: read the Lease; when it is absent create it (`409 AlreadyExists`: another
///   replica did first, look again), when it has no `holderIdentity` or its holder's lease has
///   expired, patch it with `metadata.resourceVersion` as the precondition (`409 Conflict`:
///   another replica changed it first, look again) to `holderIdentity` = this replica
///   (`<hostname>-<random>`, unique per process), `acquireTime` = `renewTime` = now,
///   `leaseDurationSeconds` = [`LEASE_SECONDS`], `leaseTransitions` + 1. Otherwise wait (5 ms
///   doubling to 100 ms) and look again, at most [`LEASE_WAIT`] (then the create fails with
///   500 `backend_error`).
/// * **expiry** is judged as client-go does, without trusting clocks across machines: a held
///   Lease is expired when this replica has seen the same `resourceVersion` for its
///   `leaseDurationSeconds` by its own monotonic clock (a live holder renews it every third of
///   that, which changes the `resourceVersion`). `renewTime` is written for people
///   (`kubectl get lease`), not read.
/// * **held**: renewed every `LEASE_SECONDS / 3` (a patch of `renewTime`, preconditioned);
///   a failed renewal is logged (another replica took it over: this one was presumed dead).
/// * **release** (when the create returns): a preconditioned patch removing `holderIdentity`,
///   in the background; until it is done, no other create of this replica starts (creates of
///   one replica queue on an in-process mutex first, so they do not poll the API server).
///   If the release fails, the Lease expires after `leaseDurationSeconds`.
///
/// Needs `get`, `create` and `patch` on `leases` in the control plane's namespace.
#[derive(Debug)]
pub struct LeaseLock {
    api: kube::Api<k8s_openapi::api::coordination::v1::Lease>,
    identity: String,
    local: std::sync::Arc<tokio::sync::Mutex<()>>,
}

/// The taken [`LeaseLock`]; released in the background when dropped.
#[derive(Debug)]
pub struct LeaseHeld {
    api: kube::Api<k8s_openapi::api::coordination::v1::Lease>,
    identity: String,
    version: std::sync::Arc<std::sync::Mutex<String>>,
    local: Option<tokio::sync::OwnedMutexGuard<()>>,
    renew: Option<tokio::task::JoinHandle<()>>,
}

fn micro_now() -> serde_json::Value {
    serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
        k8s_openapi::jiff::Timestamp::now(),
    ))
    .unwrap_or(serde_json::Value::Null)
}

fn lease_error(what: &str, e: &kube::Error) -> Error {
    Error::Backend(format!("Lease {CREATE_LEASE}: {what}: {e}"))
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl LeaseLock {
    fn new(client: kube::Client, namespace: &str) -> Self {
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "agentbox-controlplane".into());
        Self {
            api: kube::Api::namespaced(client, namespace),
            identity: format!("{host}-{}", crate::backend::random_hex(4)),
            local: std::sync::Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// Takes the Lease (see [`LeaseLock`]), waiting at most [`LEASE_WAIT`].
    async fn acquire(&self) -> Result<LeaseHeld> {
        use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
        use kube::api::{Patch, PatchParams, PostParams};
        let deadline = tokio::time::Instant::now() + LEASE_WAIT;
        let busy = || {
            Error::Backend(format!(
                "the create lock (Lease {CREATE_LEASE}) stayed taken for {}s; try again",
                LEASE_WAIT.as_secs()
            ))
        };
        let local =
            tokio::time::timeout_at(deadline, std::sync::Arc::clone(&self.local).lock_owned())
                .await
                .map_err(|_| busy())?;
        let mut observed: Option<(String, tokio::time::Instant)> = None;
        let mut pause = Duration::from_millis(5);
        loop {
            let lease = self
                .api
                .get_opt(CREATE_LEASE)
                .await
                .map_err(|e| lease_error("read", &e))?;
            let taken = match lease {
                None => {
                    let lease = Lease {
                        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                            name: Some(CREATE_LEASE.into()),
                            labels: Some(
                                [(
                                    "app.kubernetes.io/managed-by".to_owned(),
                                    "agentbox".to_owned(),
                                )]
                                .into(),
                            ),
                            ..Default::default()
                        },
                        spec: Some(LeaseSpec {
                            holder_identity: Some(self.identity.clone()),
                            lease_duration_seconds: Some(LEASE_SECONDS),
                            acquire_time: serde_json::from_value(micro_now()).ok(),
                            renew_time: serde_json::from_value(micro_now()).ok(),
                            lease_transitions: Some(0),
                            ..LeaseSpec::default()
                        }),
                    };
                    self.api.create(&PostParams::default(), &lease).await
                }
                Some(lease) => {
                    let version = lease.metadata.resource_version.clone().unwrap_or_default();
                    let spec = lease.spec.unwrap_or_default();
                    let free = match spec.holder_identity.as_deref().filter(|h| !h.is_empty()) {
                        None => true,
                        // Ours, while no create of this replica holds it: a release that failed.
                        Some(holder) if holder == self.identity => true,
                        Some(_) => {
                            let duration = Duration::from_secs(
                                u64::try_from(spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS))
                                    .unwrap_or(1)
                                    .clamp(1, 3600),
                            );
                            match &observed {
                                Some((seen, since)) if *seen == version => {
                                    since.elapsed() >= duration
                                }
                                _ => {
                                    observed = Some((version.clone(), tokio::time::Instant::now()));
                                    false
                                }
                            }
                        }
                    };
                    if !free {
                        if tokio::time::Instant::now() + pause > deadline {
                            return Err(busy());
                        }
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(LEASE_POLL_MAX);
                        continue;
                    }
                    let patch = serde_json::json!({
                        "metadata": {"resourceVersion": version},
                        "spec": {
                            "holderIdentity": self.identity,
                            "leaseDurationSeconds": LEASE_SECONDS,
                            "acquireTime": micro_now(),
                            "renewTime": micro_now(),
                            "leaseTransitions": spec.lease_transitions.unwrap_or(0).saturating_add(1),
                        },
                    });
                    self.api
                        .patch(CREATE_LEASE, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                }
            };
            match taken {
                Ok(lease) => {
                    let version = std::sync::Arc::new(std::sync::Mutex::new(
                        lease.metadata.resource_version.unwrap_or_default(),
                    ));
                    let renew =
                        tokio::spawn(renew(self.api.clone(), std::sync::Arc::clone(&version)));
                    return Ok(LeaseHeld {
                        api: self.api.clone(),
                        identity: self.identity.clone(),
                        version,
                        local: Some(local),
                        renew: Some(renew),
                    });
                }
                // Another replica created or changed it first: look again.
                Err(e) if is_conflict(&e) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(busy());
                    }
                }
                Err(e) => return Err(lease_error("take", &e)),
            }
        }
    }
}

/// Renews the held Lease every third of its duration.
async fn renew(
    api: kube::Api<k8s_openapi::api::coordination::v1::Lease>,
    version: std::sync::Arc<std::sync::Mutex<String>>,
) {
    use kube::api::{Patch, PatchParams};
    let every = Duration::from_secs(u64::try_from(LEASE_SECONDS / 3).unwrap_or(1).max(1));
    loop {
        tokio::time::sleep(every).await;
        let current = version.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": current},
            "spec": {"renewTime": micro_now()},
        });
        match api
            .patch(CREATE_LEASE, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(lease) => {
                *version.lock().unwrap_or_else(|p| p.into_inner()) =
                    lease.metadata.resource_version.unwrap_or_default();
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew the create lock (Lease {CREATE_LEASE}); \
                    another replica may take it over");
                if is_conflict(&e) {
                    return;
                }
            }
        }
    }
}

impl Drop for LeaseHeld {
    fn drop(&mut self) {
        if let Some(renew) = self.renew.take() {
            renew.abort();
        }
        let local = self.local.take();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let api = self.api.clone();
        let identity = self.identity.clone();
        let version = std::sync::Arc::clone(&self.version);
        runtime.spawn(async move {
            use kube::api::{Patch, PatchParams};
            let mut current = version.lock().unwrap_or_else(|p| p.into_inner()).clone();
            for _ in 0..4 {
                let patch = serde_json::json!({
                    "metadata": {"resourceVersion": current},
                    "spec": {"holderIdentity": null, "renewTime": micro_now()},
                });
                match api
                    .patch(CREATE_LEASE, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => break,
                    // A renewal that was cut off may have changed it: still ours?
                    Err(e) if is_conflict(&e) => match api.get_opt(CREATE_LEASE).await {
                        Ok(Some(lease))
                            if lease
                                .spec
                                .as_ref()
                                .and_then(|s| s.holder_identity.as_deref())
                                == Some(identity.as_str()) =>
                        {
                            current = lease.metadata.resource_version.unwrap_or_default();
                        }
                        _ => break,
                    },
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot release the create lock (Lease \
                            {CREATE_LEASE}); it expires in {LEASE_SECONDS}s");
                        break;
                    }
                }
            }
            drop(local);
        });
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// The create lock, released on drop: an exclusive `flock` on a file (released when the file
/// closes), or on Kubernetes the [`CREATE_LEASE`] (released in the background).
#[derive(Debug)]
pub struct Held {
    _file: Option<std::fs::File>,
    _lease: Option<LeaseHeld>,
}

fn lock_file(path: &Path) -> std::io::Result<Held> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    file.lock()?;
    Ok(Held {
        _file: Some(file),
        _lease: None,
    })
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("a blocking task failed: {e}")))
}

impl Governance {
    /// Policies under `state_dir/governance`.
    pub fn new(state_dir: &Path) -> std::io::Result<Self> {
        let dir = state_dir.join("governance");
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            cached: RwLock::new((None, PolicySet::default())),
            configmap: std::sync::OnceLock::new(),
            lease: std::sync::OnceLock::new(),
        })
    }

    /// Keeps the policies in ConfigMap [`CONFIGMAP`] of `namespace` from now on (the
    /// Kubernetes backend: every replica reads it), and takes the create lock as the Lease
    /// [`CREATE_LEASE`] there. Reads the ConfigMap once before returning (an unreadable
    /// ConfigMap stops the start), then every [`CONFIGMAP_REFRESH`] in the background while
    /// `self` lives.
    pub async fn use_configmap(
        self: &std::sync::Arc<Self>,
        client: kube::Client,
        namespace: &str,
    ) -> std::result::Result<(), String> {
        let store = ConfigMapStore {
            api: kube::Api::namespaced(client.clone(), namespace),
            cached: RwLock::new(PolicySet::default()),
        };
        let _ = self
            .lease
            .set(std::sync::Arc::new(LeaseLock::new(client, namespace)));
        store.refresh().await.map_err(|e| e.to_string())?;
        let _ = self.configmap.set(store);
        let weak = std::sync::Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(CONFIGMAP_REFRESH).await;
                let Some(this) = weak.upgrade() else { return };
                if let Some(store) = this.configmap.get() {
                    if let Err(e) = store.refresh().await {
                        tracing::warn!("governance policies not refreshed: {e}");
                    }
                }
            }
        });
        Ok(())
    }

    fn file(&self) -> PathBuf {
        self.dir.join("policies.json")
    }

    fn read_file(path: &Path) -> Result<PolicySet> {
        match std::fs::metadata(path) {
            Ok(m) if m.len() > MAX_FILE => {
                return Err(Error::Internal(format!(
                    "{} is larger than 1 MiB",
                    path.display()
                )))
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(PolicySet::default()),
            Err(e) => return Err(e.into()),
        }
        let bytes = std::fs::read(path)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::Internal(format!("{}: {e}", path.display())))
    }

    /// Every policy, as the file holds them now.
    pub fn all(&self) -> Result<PolicySet> {
        if let Some(store) = self.configmap.get() {
            return Ok(store
                .cached
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone());
        }
        let path = self.file();
        let now = stamp(&path);
        {
            let cached = self.cached.read().unwrap_or_else(|p| p.into_inner());
            if cached.0 == now && now.is_some() {
                return Ok(cached.1.clone());
            }
        }
        let set = Self::read_file(&path)?;
        *self.cached.write().unwrap_or_else(|p| p.into_inner()) = (now, set.clone());
        Ok(set)
    }

    /// The policy of `namespace` and where it comes from.
    pub fn effective(&self, namespace: &str) -> Result<EffectivePolicy> {
        let mut set = self.all()?;
        let (source, policy) = match set.policies.remove(namespace) {
            Some(p) => (Some(namespace.to_owned()), p),
            None => match set.policies.remove(DEFAULT_NAMESPACE) {
                Some(p) => (Some(DEFAULT_NAMESPACE.to_owned()), p),
                None => (None, Policy::default()),
            },
        };
        Ok(EffectivePolicy {
            namespace: namespace.to_owned(),
            source,
            policy,
        })
    }

    /// Changes the policies under the policies lock: `change` gets the current set.
    pub async fn update(
        &self,
        mut change: impl FnMut(&mut PolicySet) -> Result<()> + Send + 'static,
    ) -> Result<PolicySet> {
        if let Some(store) = self.configmap.get() {
            return store.update(change).await;
        }
        let dir = self.dir.clone();
        blocking(move || {
            let _held = lock_file(&dir.join("policies.lock"))?;
            let path = dir.join("policies.json");
            let mut set = Self::read_file(&path)?;
            change(&mut set)?;
            let bytes =
                serde_json::to_vec_pretty(&set).map_err(|e| Error::Internal(e.to_string()))?;
            if bytes.len() as u64 > MAX_FILE {
                return Err(Error::PayloadTooLarge(
                    "the policies would be larger than 1 MiB".into(),
                ));
            }
            let tmp = dir.join(format!(".policies.json.{}", std::process::id()));
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            Ok(set)
        })
        .await?
    }

    /// Holds the create lock of every replica sharing the state directory (on Kubernetes:
    /// of every replica, the Lease [`CREATE_LEASE`]).
    pub async fn lock_creates(&self) -> Result<Held> {
        if let Some(lease) = self.lease.get() {
            return Ok(Held {
                _file: None,
                _lease: Some(lease.acquire().await?),
            });
        }
        let path = self.dir.join("create.lock");
        Ok(blocking(move || lock_file(&path)).await??)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clamps_timeouts() {
        let p = Policy {
            max_timeout: Some("2s".into()),
            ..Policy::default()
        };
        assert_eq!(p.clamp_timeout(None), Some("2000ms".into()));
        assert_eq!(p.clamp_timeout(Some("1h")), Some("2000ms".into()));
        assert_eq!(p.clamp_timeout(Some("1s")), None);
        assert_eq!(p.clamp_timeout(Some("bad")), None);
        assert_eq!(Policy::default().clamp_timeout(Some("1h")), None);
    }

    #[test]
    fn clamps_idle_timeouts() {
        let p = Policy {
            max_idle_timeout: Some("10m".into()),
            ..Policy::default()
        };
        assert_eq!(p.clamp_idle_timeout(None, None), Ok(Some("10m".into())));
        assert_eq!(
            p.clamp_idle_timeout(None, Some("1h".into())),
            Ok(Some("10m".into()))
        );
        assert_eq!(
            p.clamp_idle_timeout(Some("5m"), Some("5m".into())),
            Ok(Some("5m".into()))
        );
        let refused = p
            .clamp_idle_timeout(Some("2h"), Some("2h".into()))
            .unwrap_err();
        assert_eq!(refused.field, "maxIdleTimeout");
        assert_eq!(refused.actual, "2h");
        assert_eq!(
            Policy::default().clamp_idle_timeout(Some("2h"), Some("2h".into())),
            Ok(Some("2h".into()))
        );
    }

    #[test]
    fn applies_caps() {
        let p = Policy {
            max_concurrent_invokes_per_sandbox: Some(2),
            max_memory: Some("256Mi".into()),
            ..Policy::default()
        };
        let mut t = Template {
            max_concurrent_invokes: Some(8),
            ..Template::default()
        };
        p.apply(&mut t);
        assert_eq!(t.max_concurrent_invokes, Some(2));
        assert_eq!(t.limits.and_then(|l| l.memory), Some("256Mi".into()));
    }

    #[test]
    fn patterns() {
        assert!(matches("ghcr.io/acme/*", "ghcr.io/acme/agent:1"));
        assert!(!matches("ghcr.io/acme/*", "docker.io/evil"));
        assert!(matches("default", "default"));
        assert!(!matches("default", "default2"));
    }
}
