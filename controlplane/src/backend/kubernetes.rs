//! The Kubernetes backend: every sandbox is a Secret (its record) and a Pod (its runner) in one
//! namespace (`--kube-namespace`, default `agentbox`), plus an optional PersistentVolumeClaim
//! holding its workspace. The cluster comes from `KUBECONFIG` (or `~/.kube/config`), else from
//! the in-cluster service account ([`kube::Config::infer`]).
//!
//! # Objects
//!
//! Every object carries the labels `app.kubernetes.io/managed-by=agentbox` and
//! `agentbox.dev/sandbox=<name>` (and `agentbox.dev/namespace=<agentbox namespace>`).
//!
//! * **Secret `sandbox-<name>`**, the record. Annotations: `agentbox.dev/namespace` (the
//!   agentbox namespace, i.e. the tenant; not the Kubernetes one), `agentbox.dev/template`,
//!   `agentbox.dev/mode`, `agentbox.dev/created-at` (RFC 3339), `agentbox.dev/created-by` (JSON
//!   `{"email", "displayName"}`), `agentbox.dev/pvc` (the claim's name, when there is one),
//!   `agentbox.dev/started-at` (its lifetime's start: the create, or a resume after a stop that
//!   was not for idleness), `agentbox.dev/timeout`, `agentbox.dev/idle-timeout` and
//!   `agentbox.dev/on-timeout` (`delete`) when it has them, `agentbox.dev/last-activity` (see
//!   Lifecycle) and, while stopped, `agentbox.dev/stopped` (when it was stopped) and
//!   `agentbox.dev/stop-reason` (`idle`, `timeout` or `user`). Data: `token`, the sandbox's
//!   own random runner token, and `pod.json`, the Pod rendered at creation, so that resume
//!   recreates exactly the same Pod even if the template changed since.
//! * **Pod `sandbox-<name>`**, owned by the Secret (an `ownerReference`, so deleting the Secret
//!   garbage-collects the rest). Its runner container gets `AGENTBOX_RUNNER_TOKEN` from the
//!   Secret (`secretKeyRef`, never a literal), `AGENTBOX_MODE`, `AGENTBOX_SANDBOX` and the
//!   template's `env`, `maxConcurrentInvokes` and `runnerArgs`. The runner listens on the
//!   container port named `runner` (8421 when the template names none).
//! * **PersistentVolumeClaim `sandbox-<name>-workspace`**, owned by the Secret, when the
//!   template asks for one; mounted at `/workspace`. Without one, `/workspace` is an
//!   `emptyDir`, which a stop loses.
//!
//! # Templates
//!
//! Template `T` (from `--templates-file` or the built-ins) may have a ConfigMap
//! `<--kube-template-configmap-prefix>T` (default `agentbox-template-T`) in the same namespace:
//!
//! * key `pod.json`: a Pod (`{"metadata": {"labels", "annotations"}, "spec": {..}}`) or a bare
//!   PodSpec. The runner container is the one named `runner`, else the one with a port named
//!   `runner`, else the first. Its image, when empty, comes from the template's `image`, else
//!   `--kube-runner-image`. Settings the template leaves out are filled in as for the built-in
//!   pod: a `runner` port, a readiness probe on `/healthz`, the workspace volume, no service
//!   account token (`automountServiceAccountToken: false` unless it says otherwise) and no
//!   service links.
//! * key `pvc.json`: a PersistentVolumeClaim (or its spec) for the workspace.
//! * key `warmPool`: the template's warm pool (`{"size", "maxAge"}`, as in the templates file,
//!   which it overrides); see Warm pools.
//!
//! Without the ConfigMap (or without `pod.json`), the built-in pod is one container `runner`
//! running the template's `image` (else `--kube-runner-image`) with its entrypoint, which must
//! be `agentbox-runner`; no privilege escalation, all capabilities dropped, the runtime's
//! default seccomp profile.
//!
//! # Phases
//!
//! Read from two reflector caches (Pods and Secrets labelled
//! `app.kubernetes.io/managed-by=agentbox`, filled before the control plane serves, bounded by
//! `--kube-sync-timeout`), so [`Backend::resolve`], `list` and `get` make no API call:
//!
//! * Secret being deleted → `Deleting`; `agentbox.dev/stopped` → `Stopped`;
//! * no Pod → `Creating` during the first minute of the Secret, then `Error` (the Pod was
//!   deleted or evicted behind our back; resume creates it again);
//! * Pod being deleted → `Deleting`; Pending, or Running but not Ready → `Creating`; Running
//!   and Ready with a pod IP → `Running`; Failed, Succeeded, Unknown, or a container waiting
//!   on an error (image pull, crash loop, bad config) → `Error`, with the reason as `message`.
//!
//! The caches can lag a write by the watch's latency, so every write here waits (bounded) until
//! the caches show it before answering: a `get` after `create` finds the sandbox.
//!
//! # Lifecycle
//!
//! * create: read the template's ConfigMap, claim a pooled Pod when the template has a warm
//!   pool (see Warm pools), else create the Secret (`409 already_exists` if it exists), the
//!   claim, the Pod. Any failure after the Secret undoes what was created.
//! * delete: delete the Pod (the claimed pooled one and its Secret, if any), the claim, the
//!   clone's VolumeSnapshot (if any), the Secret.
//! * stop: annotate the Secret `agentbox.dev/stopped`, delete the Pod; the claim is kept.
//! * resume: remove a Pod that cannot serve (Failed, Succeeded, Unknown) and wait (bounded) for
//!   a terminating one to go, create the Pod from the Secret's `pod.json`, remove the
//!   annotations (and, unless it slept for idleness, start a new lifetime). A resume of a
//!   sandbox asleep for idleness (on demand, by the request that found it so) waits until the
//!   Pod is Running (or Error), bounded by the caller ([`crate::lifecycle::wake`]).
//! * idle stop and lifetime end ([`Backend::stop_for`], called by the lifecycle sweep of every
//!   replica): the same as stop, with `agentbox.dev/stop-reason`, written by a patch
//!   preconditioned on the cached record's `resourceVersion` (409: it changed since, e.g. a
//!   resume or a use written by another replica: nothing is done, the next sweep looks again).
//!   An idle stop is also skipped when this replica saw a use since. A lifetime's end deletes
//!   instead when the record says `agentbox.dev/on-timeout: delete`.
//! * activity ([`Backend::touch`], on every proxied request): remembered in memory, and for a
//!   sandbox with an idle timeout written to `agentbox.dev/last-activity` in the background:
//!   at once when nothing was written for 5 s (a quarter of the idle timeout when shorter, at
//!   least 250 ms), else once at the end of that interval with the latest use; so every
//!   replica's sweep sees uses served by others at most that interval late, and an idle
//!   timeout (four intervals or more) is never cut short by it.
//!
//! # Clone
//!
//! **Untested against a real CSI driver** (only against the test fixture's API server).
//! [`Backend::clone_sandbox`] needs a source with a workspace claim (else 409
//! `not_cloneable`: an `emptyDir` cannot be snapshotted): it creates the record
//! `sandbox-<new>` (new token, `agentbox.dev/cloned-from`, `agentbox.dev/snapshot`, the
//! source's template, namespace and timeouts), a VolumeSnapshot `sandbox-<new>-snapshot`
//! (snapshot.storage.k8s.io/v1, a `DynamicObject`: no k8s-openapi type; the default
//! VolumeSnapshotClass) of the source's claim, a claim `sandbox-<new>-workspace` from the
//! template's `pvc.json` with `dataSource` naming the snapshot, and the source's stored Pod
//! retargeted to the clone (`retarget_pod`). Snapshot and claim are owned by the record;
//! delete removes the snapshot too. Any failure undoes what was made.
//!
//! # Warm pools
//!
//! For a template with `warmPool` (and no credentials), every replica keeps `size` pooled
//! sandboxes ([`Backend::refill_pools`], every 250 ms, from the caches): a Secret `pool-<hex>`
//! (token), when the template has a `pvc.json` a claim `pool-<hex>-workspace`, and a Pod
//! `pool-<hex>` on it, all owned by the Secret and labelled `agentbox.dev/pool=<template>`,
//! annotated `agentbox.dev/pool-hash` (a hash of the template, its rendered pod and claim). Pooled
//! objects have no sandbox or namespace label: never listed, never counted. A create of such a
//! template whose rendering has the same hash claims a Running and Ready one: a merge patch of
//! the Pod's labels with its cached `resourceVersion` as precondition (409: another create won
//! it; the next is tried), then the record with the pooled token and `agentbox.dev/pod`
//! naming the Pod (`KubernetesBackend::pod` follows it) and the pooled claim as its
//! `agentbox.dev/pvc`, and the pooled Secret and claim handed to the record (owner reference;
//! the claim relabelled too: if that fails the claim is undone, since the claim must outlive
//! the pooled Secret). A stop deletes that Pod and its Secret and drops the annotation; resume
//! makes `sandbox-<name>` (on the same claim) from `pod.json` as always. Retiring (another hash, past `maxAge`, failed
//! for a minute, more than `size`) deletes with the seen `resourceVersion` as precondition,
//! so a Pod claimed meanwhile is never deleted by a refill.
//!
//! **Tokens.** A stop and resume keeps the token (the Pod reads it from the same Secret). To
//! rotate it: stop, replace the Secret's `token` (e.g. `kubectl patch secret sandbox-NAME
//! -p '{"stringData":{"token":"NEW"}}'`), resume. The control plane picks up the new token from
//! its cache.
//!
//! **Events.** [`Backend::record`] creates a core/v1 Event on the Pod (on the Secret when the
//! Pod is gone) for every configure and invoke: reason `Configured` or `Invoked`, type `Normal`
//! when the outcome is `ok` else `Warning`, the message `invoke ok (HTTP 200)`; never argv,
//! stdin or output. Best effort: a failure is logged and nothing else.
//!
//! # Permissions (least privilege)
//!
//! Everything is in the one namespace, so a namespaced Role bound to the control plane's
//! service account is enough; the backend uses exactly these verbs:
//!
//! | API group | resource                 | verbs                                  |
//! |-----------|--------------------------|----------------------------------------|
//! | `""`      | `secrets`                | `list`, `watch`, `create`, `patch`, `delete` |
//! | `""`      | `pods`                   | `list`, `watch`, `create`, `patch`, `delete` |
//! | `""`      | `persistentvolumeclaims` | `create`, `patch`, `delete`            |
//! | `""`      | `configmaps`             | `get`                                  |
//! | `""`      | `events`                 | `create`                               |
//! | `coordination.k8s.io` | `leases` (`agentbox-create-lock`) | `get`, `create`, `patch` |
//! | `snapshot.storage.k8s.io` | `volumesnapshots`  | `create`, `delete`                     |
//!
//! Governance adds `patch` on the ConfigMap `agentbox-governance` and `create` on configmaps,
//! and the Lease, its create lock ([`crate::governance::LeaseLock`]); under it,
//! [`Backend::list_for_count`] lists the namespace's Secrets' metadata from the API server.
//!
//! No `get` on secrets or pods (reads come from the caches), no `update`, no cluster-scoped
//! resources. The owner references on Pods and claims set no `blockOwnerDeletion`, so the
//! `OwnerReferencesPermissionEnforcement` admission plugin asks for nothing more (it wants
//! `delete` on the object carrying them, which the backend has). The sandbox Pods themselves
//! get no service account token.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use agentbox_proto::{SandboxStatus, SandboxSummary, StopReason};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    Event, EventSource, HTTPGetAction, ObjectReference, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec,
    Probe, SeccompProfile, Secret, SecretKeySelector, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use k8s_openapi::ByteString;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

// Sandboxes are known by their key (`name` or `name.namespace`, see super::sandbox_key).
use super::{now_rfc3339, random_hex, valid_key as valid_name, Backend, CreateSpec, Target};
use crate::config::KubeConfig;
use crate::error::{Error, Result};
use crate::templates::Template;

const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
const MANAGER: &str = "agentbox";
const SELECTOR: &str = "app.kubernetes.io/managed-by=agentbox";
const SANDBOX: &str = "agentbox.dev/sandbox";
const NAMESPACE: &str = "agentbox.dev/namespace";
const TEMPLATE: &str = "agentbox.dev/template";
const MODE: &str = "agentbox.dev/mode";
const CREATED_AT: &str = "agentbox.dev/created-at";
const CREATED_BY: &str = "agentbox.dev/created-by";
const STOPPED: &str = "agentbox.dev/stopped";
const PVC: &str = "agentbox.dev/pvc";
const STOP_REASON: &str = "agentbox.dev/stop-reason";
const TIMEOUT: &str = "agentbox.dev/timeout";
const IDLE_TIMEOUT: &str = "agentbox.dev/idle-timeout";
const ON_TIMEOUT: &str = "agentbox.dev/on-timeout";
const STARTED_AT: &str = "agentbox.dev/started-at";
const LAST_ACTIVITY: &str = "agentbox.dev/last-activity";
/// On a pooled Pod and its Secret: the template whose pool it is in.
const POOL: &str = "agentbox.dev/pool";
/// On a pooled Pod and its Secret: what it was made from (template and rendered pod).
const POOL_HASH: &str = "agentbox.dev/pool-hash";
/// On a record whose Pod was claimed from a pool: that Pod's name (and its Secret's).
const POD_NAME: &str = "agentbox.dev/pod";
/// On a clone's record: the sandbox it was cloned from, and its VolumeSnapshot.
const CLONED_FROM: &str = "agentbox.dev/cloned-from";
const SNAPSHOT: &str = "agentbox.dev/snapshot";
/// How long the refill reuses a template's rendering (one ConfigMap read per template).
const POOL_RENDER_TTL: Duration = Duration::from_secs(10);
/// The longest a replica waits before writing a sandbox's `last-activity` again (shorter for
/// short idle timeouts: a quarter of it, at least [`ACTIVITY_WRITE_MIN`]).
const ACTIVITY_WRITE_MAX: Duration = Duration::from_secs(5);
const ACTIVITY_WRITE_MIN: Duration = Duration::from_millis(250);
/// Sandboxes whose activity one replica remembers; past it, the oldest half is forgotten.
const MAX_TRACKED: usize = 10_000;
/// How long a resume of a sandbox stopped for being idle waits for its Pod to be Running (the
/// request that woke it is bounded more tightly by [`crate::lifecycle::wake`]).
const WAKE_WAIT: Duration = Duration::from_secs(60);
/// The Secret's key holding the runner token.
pub const TOKEN_KEY: &str = "token";
/// The Secret's key holding the rendered Pod, and the ConfigMap's key holding a template's pod.
pub const POD_KEY: &str = "pod.json";
/// The ConfigMap's key holding a template's workspace claim.
pub const PVC_KEY: &str = "pvc.json";
/// The ConfigMap's key holding a template's warm pool (`{"size", "maxAge"}`), which wins over
/// the templates file's `warmPool`.
pub const WARM_POOL_KEY: &str = "warmPool";
/// The name of the runner's container port (and preferred name of its container).
pub const RUNNER: &str = "runner";
/// The runner's port when the template names none.
pub const DEFAULT_RUNNER_PORT: u16 = 8421;
const WORKSPACE_VOLUME: &str = "workspace";
const WORKSPACE_PATH: &str = "/workspace";
/// A Secret this young without a Pod is still being created, not broken.
const CREATE_GRACE: Duration = Duration::from_secs(60);
/// How long a write waits for the caches to show it.
const SETTLE: Duration = Duration::from_secs(10);
/// How long resume waits for a terminating Pod to go.
const TERMINATE_WAIT: Duration = Duration::from_secs(45);
/// Container waiting reasons that mean the Pod will not become Ready without a change.
const STUCK: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// The name of a sandbox's Secret and Pod.
pub fn object_name(sandbox: &str) -> String {
    format!("sandbox-{sandbox}")
}

/// The name of a sandbox's workspace claim.
pub fn pvc_name(sandbox: &str) -> String {
    format!("sandbox-{sandbox}-workspace")
}

/// Aborts a task when dropped.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sandboxes as Secrets and Pods in one Kubernetes namespace.
pub struct KubernetesBackend {
    client: Client,
    namespace: String,
    template_prefix: String,
    runner_image: Option<String>,
    pods: Store<Pod>,
    secrets: Store<Secret>,
    instance: String,
    /// When this replica last saw each sandbox used, and last wrote that down.
    activity: Arc<Mutex<std::collections::HashMap<String, Activity>>>,
    /// One lock per sandbox being stopped or resumed by this replica.
    locks: Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Per template: this replica's (hits, misses) of its warm pool.
    pool_counts: Mutex<std::collections::HashMap<String, (u64, u64)>>,
    /// Per template: when it was rendered for the pool, its parts and its pool hash (`None`:
    /// it cannot be pooled).
    pool_renders: Mutex<std::collections::HashMap<String, PoolRender>>,
    _watchers: [AbortOnDrop; 2],
}

/// A template as its pooled Pods are made.
#[derive(Debug, Clone)]
struct PoolRender {
    at: Instant,
    template: Template,
    parts: PodTemplate,
    hash: Option<String>,
}

/// One sandbox's use as this replica saw it.
#[derive(Debug, Clone, Copy)]
struct Activity {
    seen: SystemTime,
    written: Option<Instant>,
    /// A write of the latest use is scheduled (for the end of the current interval).
    pending: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn parse_time(text: Option<&str>) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(text?).ok()
}

fn millis(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn stop_reason_of(secret: &Secret) -> Option<StopReason> {
    annotation(secret, STOPPED)?;
    Some(match annotation(secret, STOP_REASON) {
        Some("idle") => StopReason::Idle,
        Some("timeout") => StopReason::Timeout,
        _ => StopReason::User,
    })
}

fn reason_text(reason: StopReason) -> &'static str {
    match reason {
        StopReason::Idle => "idle",
        StopReason::Timeout => "timeout",
        StopReason::User => "user",
    }
}

/// When the sandbox's lifetime ends: its (re)start plus `timeout`.
fn expires_at(secret: &Secret) -> Option<SystemTime> {
    let lifetime = crate::lifecycle::parse_duration(annotation(secret, TIMEOUT)?).ok()?;
    let start = parse_time(annotation(secret, STARTED_AT))
        .or_else(|| parse_time(annotation(secret, CREATED_AT)))?;
    start.checked_add(lifetime)
}

impl std::fmt::Debug for KubernetesBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesBackend")
            .field("namespace", &self.namespace)
            .field("template_prefix", &self.template_prefix)
            .field("runner_image", &self.runner_image)
            .field("pods", &self.pods.len())
            .field("secrets", &self.secrets.len())
            .finish_non_exhaustive()
    }
}

/// Starts a reflector of `api`'s objects labelled [`SELECTOR`]; the last watch error, if any,
/// goes to `last_error`.
fn cache<K>(api: Api<K>, last_error: Arc<Mutex<Option<String>>>) -> (Store<K>, AbortOnDrop)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let kind = K::kind(&()).into_owned();
    let (reader, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default().labels(SELECTOR))
        .default_backoff()
        .modify(|o: &mut K| o.managed_fields_mut().clear())
        .reflect(writer);
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        while let Some(item) = stream.next().await {
            match item {
                // A relist announces itself (Init) before it has succeeded; only its end or
                // a watch event shows that the API answers again.
                Ok(
                    watcher::Event::InitDone | watcher::Event::Apply(_) | watcher::Event::Delete(_),
                ) if failing => {
                    failing = false;
                    tracing::info!(kind, "watching again");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(kind, error = %e, "watch failed; retrying");
                    failing = true;
                    if let Ok(mut last) = last_error.lock() {
                        *last = Some(format!("{kind}: {e}"));
                    }
                }
            }
        }
    });
    (reader, AbortOnDrop(task))
}

/// Whether `e` is an API answer with HTTP status `code`.
fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// A backend error naming what failed.
fn api_error(what: impl std::fmt::Display, e: &kube::Error) -> Error {
    match e {
        kube::Error::Api(s) => Error::Backend(format!(
            "Kubernetes: {what}: {} ({} {})",
            s.message, s.code, s.reason
        )),
        other => Error::Backend(format!("Kubernetes: {what}: {other}")),
    }
}

/// What a template contributes besides the control plane's [`Template`].
#[derive(Debug, Default, Clone)]
struct PodTemplate {
    /// `pod.json`, when there is one.
    pod: Option<Pod>,
    /// `pvc.json`, when there is one.
    pvc: Option<PersistentVolumeClaimSpec>,
    /// `warmPool`, when there is one.
    warm_pool: Option<crate::templates::WarmPool>,
}

/// A template's warm pool: its ConfigMap's `warmPool`, else the templates file's; `None`
/// when it has none or one of size 0.
fn pool_of(template: &Template, parts: &PodTemplate) -> Option<crate::templates::WarmPool> {
    parts
        .warm_pool
        .clone()
        .or_else(|| template.warm_pool.clone())
        .filter(|p| p.size > 0)
}

/// Parses `text` as an object of type `Full` whose `spec` is a `Spec`, or as a bare `Spec`.
fn full_or_spec<Full: DeserializeOwned, Spec: DeserializeOwned>(
    text: &str,
    wrap: impl FnOnce(Spec) -> Full,
) -> std::result::Result<Full, serde_json::Error> {
    let value: serde_json::Value = serde_json::from_str(text)?;
    if value.get("spec").is_some() {
        serde_json::from_value(value)
    } else {
        serde_json::from_value(value).map(wrap)
    }
}

fn env_value(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

/// The built-in pod: one hardened `runner` container.
fn builtin_pod() -> Pod {
    Pod {
        spec: Some(PodSpec {
            containers: vec![Container {
                name: RUNNER.into(),
                security_context: Some(SecurityContext {
                    allow_privilege_escalation: Some(false),
                    capabilities: Some(Capabilities {
                        drop: Some(vec!["ALL".into()]),
                        add: None,
                    }),
                    ..SecurityContext::default()
                }),
                ..Container::default()
            }],
            security_context: Some(PodSecurityContext {
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    localhost_profile: None,
                }),
                ..PodSecurityContext::default()
            }),
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

/// Index of the runner container: named `runner`, else with a port named `runner`, else 0.
fn runner_index(spec: &PodSpec) -> usize {
    spec.containers
        .iter()
        .position(|c| c.name == RUNNER)
        .or_else(|| {
            spec.containers.iter().position(|c| {
                c.ports
                    .iter()
                    .flatten()
                    .any(|p| p.name.as_deref() == Some(RUNNER))
            })
        })
        .unwrap_or(0)
}

/// The runner's port in a Pod: the container port named `runner`.
fn runner_port(pod: &Pod) -> u16 {
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(RUNNER))
        .and_then(|p| u16::try_from(p.container_port).ok())
        .unwrap_or(DEFAULT_RUNNER_PORT)
}

/// What the names in a sandbox's objects are.
#[derive(Debug)]
struct Names<'a> {
    sandbox: &'a str,
    namespace: &'a str,
    object: String,
}

fn labels(names: &Names<'_>) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY.to_owned(), MANAGER.to_owned()),
        (SANDBOX.to_owned(), names.sandbox.to_owned()),
        (NAMESPACE.to_owned(), names.namespace.to_owned()),
    ])
}

/// Renders the sandbox's Pod from the template (without owner references, which need the
/// Secret's uid and are added when the Pod is created).
fn render_pod(
    names: &Names<'_>,
    template: &Template,
    base: Option<Pod>,
    fallback_image: Option<&str>,
    kube_namespace: &str,
    pvc: Option<&str>,
) -> Result<Pod> {
    let mut pod = base.unwrap_or_else(builtin_pod);
    let mut pod_labels = pod.metadata.labels.take().unwrap_or_default();
    pod_labels.extend(labels(names));
    let mut annotations = pod.metadata.annotations.take().unwrap_or_default();
    annotations.insert(TEMPLATE.into(), template.name.clone());
    pod.metadata = ObjectMeta {
        name: Some(names.object.clone()),
        namespace: Some(kube_namespace.into()),
        labels: Some(pod_labels),
        annotations: Some(annotations),
        ..ObjectMeta::default()
    };
    pod.status = None;
    let spec = pod.spec.get_or_insert_with(PodSpec::default);
    if spec.containers.is_empty() {
        spec.containers.push(Container {
            name: RUNNER.into(),
            ..Container::default()
        });
    }
    spec.automount_service_account_token.get_or_insert(false);
    spec.enable_service_links.get_or_insert(false);
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    if !volumes.iter().any(|v| v.name == WORKSPACE_VOLUME) {
        volumes.push(Volume {
            name: WORKSPACE_VOLUME.into(),
            persistent_volume_claim: pvc.map(|claim| PersistentVolumeClaimVolumeSource {
                claim_name: claim.into(),
                read_only: None,
            }),
            empty_dir: pvc.is_none().then(EmptyDirVolumeSource::default),
            ..Volume::default()
        });
    }
    let index = runner_index(spec);
    let c = &mut spec.containers[index];
    if c.image.as_deref().is_none_or(str::is_empty) {
        c.image = Some(
            template
                .image
                .as_deref()
                .or(fallback_image)
                .ok_or_else(|| {
                    Error::Backend(format!(
                        "template {:?} names no image: give it an `image`, a pod.json with one, \
                         or start the control plane with --kube-runner-image",
                        template.name
                    ))
                })?
                .to_owned(),
        );
    }
    let ports = c.ports.get_or_insert_with(Vec::new);
    let port = match ports.iter().find(|p| p.name.as_deref() == Some(RUNNER)) {
        Some(p) => p.container_port,
        None => {
            ports.push(ContainerPort {
                name: Some(RUNNER.into()),
                container_port: i32::from(DEFAULT_RUNNER_PORT),
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            });
            i32::from(DEFAULT_RUNNER_PORT)
        }
    };
    // The environment: the template pod's, then the template's, then ours (which win).
    let mut forced = vec![
        EnvVar {
            name: "AGENTBOX_RUNNER_TOKEN".into(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: names.object.clone(),
                    key: TOKEN_KEY.into(),
                    optional: Some(false),
                }),
                ..EnvVarSource::default()
            }),
        },
        env_value("AGENTBOX_MODE", template.mode.clone()),
        env_value(
            "AGENTBOX_SANDBOX",
            super::display_name(names.sandbox, names.namespace),
        ),
    ];
    if let Some(n) = template.max_concurrent_invokes {
        forced.push(env_value("AGENTBOX_MAX_CONCURRENT_INVOKES", n.to_string()));
    }
    let env = c.env.get_or_insert_with(Vec::new);
    let mut defaults = vec![
        env_value("AGENTBOX_LISTEN", format!("0.0.0.0:{port}")),
        env_value("AGENTBOX_WORKSPACE", WORKSPACE_PATH),
    ];
    defaults.retain(|d| !env.iter().any(|e| e.name == d.name));
    env.extend(defaults);
    env.retain(|e| !template.env.contains_key(&e.name));
    env.extend(
        template
            .env
            .iter()
            .map(|(name, value)| env_value(name, value.clone())),
    );
    env.retain(|e| !forced.iter().any(|f| f.name == e.name));
    env.extend(forced);
    c.args
        .get_or_insert_with(Vec::new)
        .extend(template.runner_args.iter().cloned());
    let mounts = c.volume_mounts.get_or_insert_with(Vec::new);
    if !mounts.iter().any(|m| m.mount_path == WORKSPACE_PATH) {
        mounts.push(VolumeMount {
            name: WORKSPACE_VOLUME.into(),
            mount_path: WORKSPACE_PATH.into(),
            ..VolumeMount::default()
        });
    }
    if c.readiness_probe.is_none() {
        c.readiness_probe = Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz".into()),
                port: IntOrString::String(RUNNER.into()),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(2),
            ..Probe::default()
        });
    }
    add_credentials(&mut pod, names, template);
    Ok(pod)
}

/// The Secret a credential reference names on Kubernetes: `credential-<namespace>-<name>` in
/// the control plane's namespace, made by the operator (never copied through the control
/// plane), its value under the key `value`. The namespace in the name keeps one agentbox
/// namespace from referencing another's.
pub(crate) fn credential_secret(namespace: &str, name: &str) -> String {
    format!("credential-{namespace}-{name}")
}

/// The runner container's `secretKeyRef` variables and read-only secret files (under
/// `/run/credentials/`) for the template's credential references.
fn add_credentials(pod: &mut Pod, names: &Names<'_>, template: &Template) {
    if template.credentials.is_empty() {
        return;
    }
    let Some(spec) = pod.spec.as_mut() else {
        return;
    };
    let index = runner_index(spec);
    for r in &template.credentials {
        let secret = credential_secret(names.namespace, &r.name);
        if let Some(var) = &r.env {
            let env = spec.containers[index].env.get_or_insert_with(Vec::new);
            env.retain(|e| &e.name != var);
            env.push(EnvVar {
                name: var.clone(),
                value: None,
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: secret,
                        key: "value".into(),
                        optional: Some(false),
                    }),
                    ..EnvVarSource::default()
                }),
            });
        } else if let Some(base) = r
            .file
            .as_deref()
            .and_then(|f| f.strip_prefix(crate::credentials::FILE_PREFIX))
        {
            let volume = format!("credential-{}", r.name);
            spec.volumes.get_or_insert_with(Vec::new).push(Volume {
                name: volume.clone(),
                secret: Some(k8s_openapi::api::core::v1::SecretVolumeSource {
                    secret_name: Some(secret),
                    items: Some(vec![k8s_openapi::api::core::v1::KeyToPath {
                        key: "value".into(),
                        path: base.into(),
                        mode: Some(0o400),
                    }]),
                    default_mode: Some(0o400),
                    optional: Some(false),
                }),
                ..Volume::default()
            });
            spec.containers[index]
                .volume_mounts
                .get_or_insert_with(Vec::new)
                .push(VolumeMount {
                    name: volume,
                    mount_path: format!("{}{base}", crate::credentials::FILE_PREFIX),
                    sub_path: Some(base.into()),
                    read_only: Some(true),
                    ..VolumeMount::default()
                });
        }
    }
}

/// The Pod of pooled sandbox `object` of `template`: the sandbox's pod without a sandbox or
/// namespace, labelled [`POOL`], its workspace the claim [`pooled_claim`] when the template
/// has a `pvc.json`; `None` when the template cannot be pooled: its credentials name a
/// namespace's Secrets.
fn render_pooled(
    template: &Template,
    parts: &PodTemplate,
    fallback_image: Option<&str>,
    kube_namespace: &str,
    object: &str,
) -> Result<Option<Pod>> {
    if !template.credentials.is_empty() {
        return Ok(None);
    }
    let names = Names {
        sandbox: object,
        namespace: "",
        object: object.to_owned(),
    };
    let claim = parts.pvc.is_some().then(|| pooled_claim(object));
    let mut pod = render_pod(
        &names,
        template,
        parts.pod.clone(),
        fallback_image,
        kube_namespace,
        claim.as_deref(),
    )?;
    let labels = pod.metadata.labels.get_or_insert_with(BTreeMap::new);
    labels.remove(SANDBOX);
    labels.remove(NAMESPACE);
    labels.insert(POOL.to_owned(), template.name.clone());
    Ok(Some(pod))
}

/// The workspace claim of pooled sandbox `object` (when its template has a `pvc.json`).
fn pooled_claim(object: &str) -> String {
    format!("{object}-workspace")
}

/// What a pooled Pod of `template` is made from, as a short hash (of the template, its pool
/// settings left out, and its rendered pod); `None` when it cannot be pooled.
fn pool_hash(
    template: &Template,
    parts: &PodTemplate,
    fallback_image: Option<&str>,
    kube_namespace: &str,
) -> Result<Option<String>> {
    use sha2::Digest;
    let Some(pod) = render_pooled(template, parts, fallback_image, kube_namespace, "pool")? else {
        return Ok(None);
    };
    let mut bare = template.clone();
    bare.warm_pool = None;
    let mut hasher = sha2::Sha256::new();
    hasher.update(serde_json::to_vec(&bare).map_err(|e| Error::Internal(e.to_string()))?);
    hasher.update(serde_json::to_vec(&pod).map_err(|e| Error::Internal(e.to_string()))?);
    hasher.update(serde_json::to_vec(&parts.pvc).map_err(|e| Error::Internal(e.to_string()))?);
    Ok(Some(hex::encode(&hasher.finalize()[..8])))
}

/// snapshot.storage.k8s.io/v1 VolumeSnapshot (a CRD of the CSI snapshotter; no k8s-openapi
/// type).
fn volume_snapshot_resource() -> kube::api::ApiResource {
    kube::api::ApiResource {
        group: "snapshot.storage.k8s.io".into(),
        version: "v1".into(),
        api_version: "snapshot.storage.k8s.io/v1".into(),
        kind: "VolumeSnapshot".into(),
        plural: "volumesnapshots".into(),
    }
}

/// The name of a clone's VolumeSnapshot of its source's workspace.
pub fn snapshot_name(sandbox: &str) -> String {
    format!("sandbox-{sandbox}-snapshot")
}

/// The Pod `source` was stored with, made sandbox `names.sandbox`'s: its name and labels, its
/// token's Secret, its `AGENTBOX_SANDBOX`, and its workspace claim `claim`.
fn retarget_pod(mut pod: Pod, source: &str, names: &Names<'_>, claim: &str) -> Pod {
    pod.metadata.name = Some(names.object.clone());
    pod.metadata.uid = None;
    pod.metadata.resource_version = None;
    pod.metadata.owner_references = None;
    pod.metadata.creation_timestamp = None;
    pod.metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .extend(labels(names));
    pod.status = None;
    let Some(spec) = pod.spec.as_mut() else {
        return pod;
    };
    for volume in spec.volumes.iter_mut().flatten() {
        if volume.name == WORKSPACE_VOLUME {
            if let Some(pvc) = volume.persistent_volume_claim.as_mut() {
                claim.clone_into(&mut pvc.claim_name);
            }
        }
    }
    let source_object = object_name(source);
    for c in &mut spec.containers {
        for e in c.env.iter_mut().flatten() {
            if e.name == "AGENTBOX_SANDBOX" {
                e.value = Some(super::display_name(names.sandbox, names.namespace).to_owned());
            }
            if let Some(key) = e
                .value_from
                .as_mut()
                .and_then(|v| v.secret_key_ref.as_mut())
            {
                if key.name == source_object {
                    key.name.clone_from(&names.object);
                }
            }
        }
    }
    pod
}

fn created(obj: &impl ResourceExt) -> Option<SystemTime> {
    obj.meta()
        .creation_timestamp
        .as_ref()
        .and_then(|t| parse_time(Some(&t.0.to_string())))
}

fn annotation<'a>(obj: &'a impl ResourceExt, key: &str) -> Option<&'a str> {
    obj.annotations().get(key).map(String::as_str)
}

fn secret_data<'a>(secret: &'a Secret, key: &str) -> Option<&'a [u8]> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.as_slice())
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .iter()
        .flat_map(|s| s.conditions.iter().flatten())
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

fn pod_ip(pod: &Pod) -> Option<IpAddr> {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|ip| ip.parse().ok())
}

/// A container waiting on an error that will not go away by itself.
fn stuck(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
        .find_map(|c| {
            let waiting = c.state.as_ref()?.waiting.as_ref()?;
            let reason = waiting.reason.as_deref()?;
            STUCK.contains(&reason).then(|| {
                format!(
                    "container {:?}: {reason}{}",
                    c.name,
                    waiting
                        .message
                        .as_deref()
                        .map(|m| format!(": {m}"))
                        .unwrap_or_default()
                )
            })
        })
}

/// A Pod's contribution to the sandbox's phase.
fn pod_phase(pod: &Pod) -> (SandboxStatus, Option<String>) {
    if pod.metadata.deletion_timestamp.is_some() {
        return (
            SandboxStatus::Deleting,
            Some("its pod is being deleted".into()),
        );
    }
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    let why = || {
        status
            .map(|s| {
                [s.reason.as_deref(), s.message.as_deref()]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(": ")
            })
            .filter(|s| !s.is_empty())
    };
    match phase {
        "Pending" | "Running" => {
            if let Some(message) = stuck(pod) {
                (SandboxStatus::Error, Some(message))
            } else if phase == "Running" && pod_ready(pod) && pod_ip(pod).is_some() {
                (SandboxStatus::Running, None)
            } else if phase == "Running" {
                (
                    SandboxStatus::Creating,
                    Some("its pod is not Ready yet".into()),
                )
            } else {
                (
                    SandboxStatus::Creating,
                    Some(why().unwrap_or_else(|| "its pod is Pending".into())),
                )
            }
        }
        "Succeeded" => (
            SandboxStatus::Error,
            Some("its pod has exited; resume starts it again".into()),
        ),
        "Failed" => (
            SandboxStatus::Error,
            Some(format!(
                "its pod failed{}; resume starts it again",
                why().map(|w| format!(" ({w})")).unwrap_or_default()
            )),
        ),
        other => (
            SandboxStatus::Error,
            Some(format!(
                "its pod's phase is {other} (is its node reachable?)"
            )),
        ),
    }
}

/// The sandbox's phase from its Secret and Pod.
fn phase(secret: &Secret, pod: Option<&Pod>) -> (SandboxStatus, Option<String>) {
    if secret.metadata.deletion_timestamp.is_some() {
        return (SandboxStatus::Deleting, None);
    }
    if annotation(secret, STOPPED).is_some() {
        return (SandboxStatus::Stopped, None);
    }
    if secret_data(secret, TOKEN_KEY).is_none_or(<[u8]>::is_empty) {
        return (
            SandboxStatus::Error,
            Some(format!("its Secret has no {TOKEN_KEY:?}")),
        );
    }
    match pod {
        Some(pod) => pod_phase(pod),
        None => {
            let young =
                secret.metadata.creation_timestamp.as_ref().is_none_or(|t| {
                    Timestamp::now().duration_since(t.0).unsigned_abs() < CREATE_GRACE
                });
            if young {
                (SandboxStatus::Creating, Some("waiting for its pod".into()))
            } else {
                (
                    SandboxStatus::Error,
                    Some("its pod is gone (deleted or evicted); resume creates it again".into()),
                )
            }
        }
    }
}

/// Whether a Pod can never serve again and must be replaced on resume.
fn pod_finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Failed" | "Succeeded" | "Unknown")
    )
}

impl KubernetesBackend {
    /// Its client and namespace (for the governance ConfigMap).
    pub fn client(&self) -> (Client, String) {
        (self.client.clone(), self.namespace.clone())
    }

    /// Connects to the cluster (`KUBECONFIG`, `~/.kube/config`, else in-cluster), starts the
    /// caches and waits (bounded by `cfg.sync_timeout`) until they hold the first list.
    pub async fn connect(cfg: &KubeConfig) -> Result<Self, String> {
        let config = kube::Config::infer().await.map_err(|e| {
            format!(
                "cannot find a Kubernetes cluster (KUBECONFIG, ~/.kube/config, in-cluster): {e}"
            )
        })?;
        let client = Client::try_from(config)
            .map_err(|e| format!("cannot build the Kubernetes client: {e}"))?;
        Self::with_client(client, cfg).await
    }

    /// Like [`KubernetesBackend::connect`], with a client built elsewhere.
    pub async fn with_client(client: Client, cfg: &KubeConfig) -> Result<Self, String> {
        let ns = cfg.namespace.clone();
        let last_error = Arc::new(Mutex::new(None));
        let (pods, pod_watch) = cache::<Pod>(
            Api::namespaced(client.clone(), &ns),
            Arc::clone(&last_error),
        );
        let (secrets, secret_watch) = cache::<Secret>(
            Api::namespaced(client.clone(), &ns),
            Arc::clone(&last_error),
        );
        let ready = async {
            pods.wait_until_ready().await.is_ok() && secrets.wait_until_ready().await.is_ok()
        };
        if !matches!(
            tokio::time::timeout(cfg.sync_timeout, ready).await,
            Ok(true)
        ) {
            let why = last_error
                .lock()
                .ok()
                .and_then(|e| e.clone())
                .unwrap_or_else(|| "no answer".into());
            return Err(format!(
                "cannot list and watch Pods and Secrets in Kubernetes namespace {ns:?} within \
                 {} (check the cluster's address and the control plane's RBAC): {why}",
                humantime::format_duration(cfg.sync_timeout)
            ));
        }
        tracing::info!(
            namespace = %ns,
            sandboxes = secrets.len(),
            pods = pods.len(),
            "Kubernetes caches ready"
        );
        let instance = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_owned())
            })
            .unwrap_or_else(|| "agentbox-controlplane".into());
        Ok(Self {
            client,
            namespace: ns,
            template_prefix: cfg.template_configmap_prefix.clone(),
            runner_image: cfg.runner_image.clone(),
            pods,
            secrets,
            instance,
            activity: Arc::default(),
            locks: Mutex::default(),
            pool_counts: Mutex::default(),
            pool_renders: Mutex::default(),
            _watchers: [pod_watch, secret_watch],
        })
    }

    fn api<K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>>(
        &self,
    ) -> Api<K> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// The cached Secret of sandbox `name`.
    fn secret(&self, name: &str) -> Option<Arc<Secret>> {
        if !valid_name(name) {
            return None;
        }
        self.secrets
            .get(&ObjectRef::new(&object_name(name)).within(&self.namespace))
            .filter(|s| s.labels().get(SANDBOX).map(String::as_str) == Some(name))
    }

    /// The cached Pod of sandbox `name`.
    fn pod(&self, name: &str) -> Option<Arc<Pod>> {
        if !valid_name(name) {
            return None;
        }
        self.pods
            .get(&ObjectRef::new(&self.pod_object(name)).within(&self.namespace))
            .filter(|p| p.labels().get(SANDBOX).map(String::as_str) == Some(name))
    }

    /// The name of sandbox `name`'s Pod: `sandbox-<name>`, or the pooled Pod it claimed.
    fn pod_object(&self, name: &str) -> String {
        self.secret(name)
            .and_then(|s| annotation(&*s, POD_NAME).map(str::to_owned))
            .unwrap_or_else(|| object_name(name))
    }

    fn summary(&self, secret: &Secret) -> Option<SandboxSummary> {
        let name = secret.labels().get(SANDBOX)?.clone();
        let pod = self.pod(&name);
        let (status, message) = phase(secret, pod.as_deref());
        Some(SandboxSummary {
            sandbox_id: name.clone(),
            namespace: annotation(secret, NAMESPACE)
                .unwrap_or("default")
                .to_owned(),
            status,
            mode: annotation(secret, MODE).unwrap_or("agent").to_owned(),
            template_ref: annotation(secret, TEMPLATE).map(str::to_owned),
            pod_name: pod.map(|p| p.name_any()),
            pvc_name: annotation(secret, PVC).map(str::to_owned),
            created_at: annotation(secret, CREATED_AT)
                .map(str::to_owned)
                .or_else(|| {
                    secret
                        .metadata
                        .creation_timestamp
                        .as_ref()
                        .map(|t| t.0.to_string())
                }),
            last_activity_at: self.last_activity(secret).map(millis),
            created_by: annotation(secret, CREATED_BY).and_then(|j| serde_json::from_str(j).ok()),
            message,
            isolated: true,
            limits_enforced: None,
            stop_reason: stop_reason_of(secret),
            timeout: annotation(secret, TIMEOUT).map(str::to_owned),
            idle_timeout: annotation(secret, IDLE_TIMEOUT).map(str::to_owned),
            expires_at: expires_at(secret).map(millis),
            cloned_from: annotation(secret, CLONED_FROM).map(str::to_owned),
            from_warm_pool: None,
            name,
        })
    }

    /// When sandbox `secret` was last used as far as this replica knows: a request it served,
    /// the `last-activity` another replica wrote, its (re)start.
    fn last_activity(&self, secret: &Secret) -> Option<SystemTime> {
        let name = secret.labels().get(SANDBOX)?;
        [
            lock(&self.activity).get(name).map(|a| a.seen),
            parse_time(annotation(secret, LAST_ACTIVITY)),
            parse_time(annotation(secret, STARTED_AT)),
            parse_time(annotation(secret, CREATED_AT)),
        ]
        .into_iter()
        .flatten()
        .max()
    }

    /// The lock of sandbox `name`'s stops and resumes in this replica.
    async fn lock_sandbox(&self, name: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = {
            let mut locks = lock(&self.locks);
            if locks.len() >= 1000 {
                locks.retain(|_, m| Arc::strong_count(m) > 1);
            }
            Arc::clone(locks.entry(name.to_owned()).or_default())
        };
        m.lock_owned().await
    }

    /// Patches the record's annotations with `resourceVersion` as the precondition (when
    /// given); `Ok(false)` on a 409 Conflict (it changed since).
    async fn annotate(
        &self,
        name: &str,
        version: Option<&str>,
        annotations: serde_json::Value,
    ) -> Result<bool> {
        let mut patch = serde_json::json!({"metadata": {"annotations": annotations}});
        if let Some(version) = version {
            patch["metadata"]["resourceVersion"] = version.into();
        }
        match self
            .api::<Secret>()
            .patch(
                &object_name(name),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_status(&e, 409) => Ok(false),
            Err(e) if is_status(&e, 404) => Err(Error::SandboxNotFound(name.into())),
            Err(e) => Err(api_error(
                format_args!("annotate Secret {}", object_name(name)),
                &e,
            )),
        }
    }

    /// The summary from the caches, which `name` must be in.
    fn cached_summary(&self, name: &str) -> Result<SandboxSummary> {
        self.secret(name)
            .and_then(|s| self.summary(&s))
            .ok_or_else(|| Error::SandboxNotFound(name.into()))
    }

    /// Waits (bounded by `within`) until `done` holds for the caches; returns whether it did.
    async fn settle(&self, within: Duration, done: impl Fn(&Self) -> bool) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if done(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The template's ConfigMap parts, if it has a ConfigMap.
    async fn pod_template(&self, template: &Template) -> Result<PodTemplate> {
        let cm_name = format!("{}{}", self.template_prefix, template.name);
        let is_object_name = cm_name.len() <= 253
            && cm_name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !is_object_name {
            return Ok(PodTemplate::default());
        }
        let cm = self
            .api::<ConfigMap>()
            .get_opt(&cm_name)
            .await
            .map_err(|e| api_error(format_args!("get ConfigMap {cm_name}"), &e))?;
        let Some(data) = cm.and_then(|cm| cm.data) else {
            return Ok(PodTemplate::default());
        };
        let bad = |key: &str, e: serde_json::Error| {
            Error::Backend(format!(
                "template {:?}: ConfigMap {cm_name}, key {key}: {e}",
                template.name
            ))
        };
        let pod = data
            .get(POD_KEY)
            .map(|text| {
                full_or_spec::<Pod, PodSpec>(text, |spec| Pod {
                    spec: Some(spec),
                    ..Pod::default()
                })
            })
            .transpose()
            .map_err(|e| bad(POD_KEY, e))?;
        let pvc = data
            .get(PVC_KEY)
            .map(|text| {
                full_or_spec::<PersistentVolumeClaim, PersistentVolumeClaimSpec>(text, |spec| {
                    PersistentVolumeClaim {
                        spec: Some(spec),
                        ..PersistentVolumeClaim::default()
                    }
                })
            })
            .transpose()
            .map_err(|e| bad(PVC_KEY, e))?
            .map(|claim| claim.spec.unwrap_or_default());
        let warm_pool = data
            .get(WARM_POOL_KEY)
            .map(|text| {
                let pool: crate::templates::WarmPool = serde_json::from_str(text)?;
                if pool.size > crate::templates::MAX_WARM_POOL {
                    return Err(serde::de::Error::custom(format!(
                        "size is at most {}",
                        crate::templates::MAX_WARM_POOL
                    )));
                }
                if let Some(age) = &pool.max_age {
                    crate::lifecycle::check_duration("maxAge", age)
                        .map_err(serde::de::Error::custom)?;
                }
                Ok(pool)
            })
            .transpose()
            .map_err(|e| bad(WARM_POOL_KEY, e))?;
        Ok(PodTemplate {
            pod,
            pvc,
            warm_pool,
        })
    }

    fn owner(secret: &Secret) -> Result<OwnerReference> {
        Ok(OwnerReference {
            api_version: "v1".into(),
            kind: "Secret".into(),
            name: secret.name_any(),
            uid: secret
                .uid()
                .ok_or_else(|| Error::Backend("the sandbox's Secret has no uid".into()))?,
            ..OwnerReference::default()
        })
    }

    /// Creates sandbox `name`'s workspace claim `claim` from `spec`, labelled with `names` and
    /// owned by `owner` (the sandbox's Secret). A 409, most likely the claim of a deleted
    /// sandbox of the same name still going, is `AlreadyExists`.
    async fn create_claim(
        &self,
        name: &str,
        claim: &str,
        names: &Names<'_>,
        owner: OwnerReference,
        spec: PersistentVolumeClaimSpec,
    ) -> Result<()> {
        let pvc = PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some(claim.to_owned()),
                namespace: Some(self.namespace.clone()),
                labels: Some(labels(names)),
                owner_references: Some(vec![owner]),
                ..ObjectMeta::default()
            },
            spec: Some(spec),
            ..PersistentVolumeClaim::default()
        };
        match self
            .api::<PersistentVolumeClaim>()
            .create(&PostParams::default(), &pvc)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, 409) => Err(Error::AlreadyExists(name.to_owned())),
            Err(e) => Err(api_error(
                format_args!("create PersistentVolumeClaim {claim}"),
                &e,
            )),
        }
    }

    /// Creates the Pod stored in `secret`, owned by it. `Ok(false)` when it already exists.
    async fn create_pod(&self, secret: &Secret) -> Result<bool> {
        let stored = secret_data(secret, POD_KEY).ok_or_else(|| {
            Error::Backend(format!(
                "Secret {} has no {POD_KEY:?} to start the pod from",
                secret.name_any()
            ))
        })?;
        let mut pod: Pod = serde_json::from_slice(stored).map_err(|e| {
            Error::Backend(format!("Secret {}: bad {POD_KEY}: {e}", secret.name_any()))
        })?;
        pod.metadata.owner_references = Some(vec![Self::owner(secret)?]);
        let pod_name = pod.name_any();
        match self.api::<Pod>().create(&PostParams::default(), &pod).await {
            Ok(_) => Ok(true),
            Err(e) if is_status(&e, 409) => Ok(false),
            Err(e) => Err(api_error(format_args!("create Pod {pod_name}"), &e)),
        }
    }

    /// Deletes `name` of kind `K`; `Ok(false)` when it did not exist.
    async fn delete_object<K>(&self, name: &str) -> Result<bool>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + Debug,
    {
        match self
            .api::<K>()
            .delete(name, &DeleteParams::background())
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_status(&e, 404) => Ok(false),
            Err(e) => Err(api_error(
                format_args!("delete {} {name}", K::kind(&())),
                &e,
            )),
        }
    }

    /// The record Secret of a create: its annotations, its runner `token`, and `pod.json`
    /// (the Pod rendered for it, which resume creates); `pooled` names the pooled Pod it
    /// claimed, which serves until its first stop.
    fn record_secret(
        &self,
        spec: &CreateSpec,
        parts: &PodTemplate,
        claim: Option<&str>,
        token: Vec<u8>,
        pooled: Option<&str>,
    ) -> Result<Secret> {
        let name = spec.name.as_str();
        let names = Names {
            sandbox: name,
            namespace: &spec.namespace,
            object: object_name(name),
        };
        let pod = render_pod(
            &names,
            &spec.template,
            parts.pod.clone(),
            self.runner_image.as_deref(),
            &self.namespace,
            claim,
        )?;
        let pod_json = serde_json::to_vec(&pod).map_err(|e| Error::Internal(e.to_string()))?;
        let created_by =
            serde_json::to_string(&spec.created_by).map_err(|e| Error::Internal(e.to_string()))?;
        let mut annotations = BTreeMap::from([
            (NAMESPACE.to_owned(), spec.namespace.clone()),
            (TEMPLATE.to_owned(), spec.template.name.clone()),
            (MODE.to_owned(), spec.template.mode.clone()),
            (CREATED_AT.to_owned(), now_rfc3339()),
            (CREATED_BY.to_owned(), created_by),
            (STARTED_AT.to_owned(), millis(SystemTime::now())),
        ]);
        if let Some(claim) = claim {
            annotations.insert(PVC.to_owned(), claim.to_owned());
        }
        if let Some(pooled) = pooled {
            annotations.insert(POD_NAME.to_owned(), pooled.to_owned());
        }
        if let Some(t) = &spec.timeout {
            annotations.insert(TIMEOUT.to_owned(), t.clone());
        }
        if let Some(t) = &spec.idle_timeout {
            annotations.insert(IDLE_TIMEOUT.to_owned(), t.clone());
        }
        if spec.template.on_timeout == Some(crate::templates::OnTimeout::Delete) {
            annotations.insert(ON_TIMEOUT.to_owned(), "delete".to_owned());
        }
        Ok(self.record_of(&names, annotations, token, pod_json))
    }

    /// A sandbox's record Secret: `annotations`, the runner `token` and `pod.json`.
    fn record_of(
        &self,
        names: &Names<'_>,
        annotations: BTreeMap<String, String>,
        token: Vec<u8>,
        pod_json: Vec<u8>,
    ) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(names.object.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(labels(names)),
                annotations: Some(annotations),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".into()),
            data: Some(BTreeMap::from([
                (TOKEN_KEY.to_owned(), ByteString(token)),
                (POD_KEY.to_owned(), ByteString(pod_json)),
            ])),
            ..Secret::default()
        }
    }

    fn count_pool(&self, template: &str, hit: bool) {
        let mut counts = lock(&self.pool_counts);
        let c = counts.entry(template.to_owned()).or_default();
        if hit {
            c.0 += 1;
        } else {
            c.1 += 1;
        }
    }

    /// Claims a ready pooled Pod of the create's template made from the same rendering
    /// (`hash`) for sandbox `spec.name`: relabels it with its cached `resourceVersion` as the
    /// precondition (of replicas claiming one Pod at once, one wins; the others get 409 and
    /// try the next), then records the sandbox with the pooled Pod's token. `None`: none was
    /// ready.
    async fn claim(
        &self,
        spec: &CreateSpec,
        parts: &PodTemplate,
        hash: &str,
    ) -> Result<Option<SandboxSummary>> {
        let name = spec.name.as_str();
        let mut candidates: Vec<Arc<Pod>> = self
            .pods
            .state()
            .into_iter()
            .filter(|p| {
                p.labels().get(POOL) == Some(&spec.template.name)
                    && annotation(&**p, POOL_HASH) == Some(hash)
                    && pod_phase(p).0 == SandboxStatus::Running
            })
            .collect();
        if candidates.len() > 1 {
            // From a random one: replicas claiming at once mostly try different Pods.
            let mut b = [0u8; 4];
            if getrandom::fill(&mut b).is_ok() {
                let start = u32::from_le_bytes(b) as usize % candidates.len();
                candidates.rotate_left(start);
            }
        }
        for pod in candidates {
            let object = pod.name_any();
            let Some(token) = self
                .secrets
                .get(&ObjectRef::new(&object).within(&self.namespace))
                .and_then(|s| secret_data(&s, TOKEN_KEY).map(<[u8]>::to_vec))
            else {
                continue;
            };
            let patch = serde_json::json!({"metadata": {
                "resourceVersion": pod.resource_version(),
                "labels": {POOL: null, SANDBOX: name, NAMESPACE: spec.namespace},
            }});
            match self
                .api::<Pod>()
                .patch(&object, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {}
                Err(e) if is_status(&e, 409) || is_status(&e, 404) => continue,
                Err(e) => return Err(api_error(format_args!("claim Pod {object}"), &e)),
            }
            return self.adopt(spec, parts, &object, token).await.map(Some);
        }
        Ok(None)
    }

    /// Records sandbox `spec.name` as the owner of the pooled Pod `object` it just claimed.
    async fn adopt(
        &self,
        spec: &CreateSpec,
        parts: &PodTemplate,
        object: &str,
        token: Vec<u8>,
    ) -> Result<SandboxSummary> {
        let name = spec.name.as_str();
        let claim = parts.pvc.is_some().then(|| pooled_claim(object));
        let secret = self.record_secret(spec, parts, claim.as_deref(), token, Some(object))?;
        let secret = match self
            .api::<Secret>()
            .create(&PostParams::default(), &secret)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                // Nobody else can have it now: it goes.
                let _ = self.delete_object::<Pod>(object).await;
                self.remove_pooled(object).await;
                if is_status(&e, 409) {
                    return Err(Error::AlreadyExists(name.to_owned()));
                }
                return Err(api_error(
                    format_args!("create Secret {}", object_name(name)),
                    &e,
                ));
            }
        };
        // Its Secret (and through it the Pod) now belongs to the record: deleting the record
        // collects them.
        let patch = serde_json::json!({"metadata": {
            "labels": {POOL: null},
            "ownerReferences": [Self::owner(&secret)?],
        }});
        if let Err(e) = self
            .api::<Secret>()
            .patch(object, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            tracing::warn!(sandbox = %name, secret = %object, error = %e, "cannot hand the pooled Secret to the sandbox");
        }
        // The workspace claim too, and it must be: it outlives the pooled Secret (deleted at
        // the sandbox's first stop).
        if let Some(claim) = &claim {
            let patch = serde_json::json!({"metadata": {
                "labels": {POOL: null, SANDBOX: name, NAMESPACE: spec.namespace},
                "ownerReferences": [Self::owner(&secret)?],
            }});
            if let Err(e) = self
                .api::<PersistentVolumeClaim>()
                .patch(claim, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                let _ = self.delete_object::<Pod>(object).await;
                self.remove_pooled(object).await;
                let _ = self.delete_object::<Secret>(&object_name(name)).await;
                return Err(api_error(
                    format_args!("hand PersistentVolumeClaim {claim} to sandbox {name:?}"),
                    &e,
                ));
            }
        }
        self.settle(SETTLE, |b| {
            b.secret(name).is_some() && b.pod(name).is_some()
        })
        .await;
        tracing::info!(sandbox = %name, pod = %object, "sandbox claimed from the warm pool");
        let mut summary = self
            .secret(name)
            .and_then(|s| self.summary(&s))
            .or_else(|| self.summary(&secret))
            .ok_or_else(|| Error::Internal("the new Secret has no sandbox label".into()))?;
        summary.from_warm_pool = Some(true);
        Ok(summary)
    }

    /// How `template`'s pooled Pods are made now (its ConfigMap read at most every
    /// [`POOL_RENDER_TTL`]).
    async fn pool_render(&self, template: &Template) -> Result<PoolRender> {
        if let Some(r) = lock(&self.pool_renders).get(&template.name) {
            if r.at.elapsed() < POOL_RENDER_TTL && r.template == *template {
                return Ok(r.clone());
            }
        }
        let parts = self.pod_template(template).await?;
        let hash = pool_hash(
            template,
            &parts,
            self.runner_image.as_deref(),
            &self.namespace,
        )?;
        let render = PoolRender {
            at: Instant::now(),
            template: template.clone(),
            parts,
            hash,
        };
        lock(&self.pool_renders).insert(template.name.clone(), render.clone());
        Ok(render)
    }

    /// Starts one pooled sandbox of `render`: a Secret `pool-<hex>` (its token) and a Pod of
    /// the same name owned by it.
    async fn start_pooled(&self, render: &PoolRender, hash: &str) -> Result<()> {
        let object = format!("pool-{}", random_hex(6));
        let Some(mut pod) = render_pooled(
            &render.template,
            &render.parts,
            self.runner_image.as_deref(),
            &self.namespace,
            &object,
        )?
        else {
            return Ok(());
        };
        let meta = ObjectMeta {
            name: Some(object.clone()),
            namespace: Some(self.namespace.clone()),
            labels: Some(BTreeMap::from([
                (MANAGED_BY.to_owned(), MANAGER.to_owned()),
                (POOL.to_owned(), render.template.name.clone()),
            ])),
            annotations: Some(BTreeMap::from([
                (POOL_HASH.to_owned(), hash.to_owned()),
                (TEMPLATE.to_owned(), render.template.name.clone()),
            ])),
            ..ObjectMeta::default()
        };
        let secret = Secret {
            metadata: meta.clone(),
            type_: Some("Opaque".into()),
            data: Some(BTreeMap::from([(
                TOKEN_KEY.to_owned(),
                ByteString(random_hex(32).into_bytes()),
            )])),
            ..Secret::default()
        };
        let secret = self
            .api::<Secret>()
            .create(&PostParams::default(), &secret)
            .await
            .map_err(|e| api_error(format_args!("create Secret {object}"), &e))?;
        pod.metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(POOL_HASH.to_owned(), hash.to_owned());
        pod.metadata.owner_references = Some(vec![Self::owner(&secret)?]);
        if let Some(claim_spec) = &render.parts.pvc {
            let claim = pooled_claim(&object);
            let pvc = PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some(claim.clone()),
                    owner_references: Some(vec![Self::owner(&secret)?]),
                    annotations: None,
                    ..meta.clone()
                },
                spec: Some(claim_spec.clone()),
                ..PersistentVolumeClaim::default()
            };
            if let Err(e) = self
                .api::<PersistentVolumeClaim>()
                .create(&PostParams::default(), &pvc)
                .await
            {
                let _ = self.delete_object::<Secret>(&object).await;
                return Err(api_error(
                    format_args!("create PersistentVolumeClaim {claim}"),
                    &e,
                ));
            }
        }
        if let Err(e) = self.api::<Pod>().create(&PostParams::default(), &pod).await {
            self.remove_pooled(&object).await;
            return Err(api_error(format_args!("create Pod {object}"), &e));
        }
        Ok(())
    }

    /// Removes a pooled sandbox's Secret and claim (its Pod gone or never made), best effort.
    async fn remove_pooled(&self, object: &str) {
        if let Err(e) = self
            .delete_object::<PersistentVolumeClaim>(&pooled_claim(object))
            .await
        {
            tracing::warn!(pooled = %object, error = %e, "cannot remove a pooled volume claim");
        }
        if let Err(e) = self.delete_object::<Secret>(object).await {
            tracing::warn!(pooled = %object, error = %e, "cannot remove a pooled Secret");
        }
    }

    /// Removes pooled Pod `pod` unless it was claimed since this replica saw it (a delete
    /// preconditioned on its `resourceVersion`), and its Secret.
    async fn retire(&self, pod: &Pod) -> Result<()> {
        let object = pod.name_any();
        let params = DeleteParams {
            preconditions: Some(kube::api::Preconditions {
                resource_version: pod.resource_version(),
                uid: None,
            }),
            ..DeleteParams::background()
        };
        match self.api::<Pod>().delete(&object, &params).await {
            Ok(_) => {}
            // Claimed meanwhile (409), or gone.
            Err(e) if is_status(&e, 409) => return Ok(()),
            Err(e) if is_status(&e, 404) => {}
            Err(e) => return Err(api_error(format_args!("delete Pod {object}"), &e)),
        }
        self.remove_pooled(&object).await;
        Ok(())
    }

    fn snapshots(&self) -> Api<kube::api::DynamicObject> {
        Api::namespaced_with(
            self.client.clone(),
            &self.namespace,
            &volume_snapshot_resource(),
        )
    }

    async fn delete_snapshot(&self, snapshot: &str) -> Result<()> {
        match self
            .snapshots()
            .delete(snapshot, &DeleteParams::background())
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, 404) => Ok(()),
            Err(e) => Err(api_error(
                format_args!("delete VolumeSnapshot {snapshot}"),
                &e,
            )),
        }
    }

    /// Undoes a half-made create, best effort.
    async fn roll_back(&self, name: &str, pvc: bool) {
        let object = object_name(name);
        if let Err(e) = self.delete_object::<Pod>(&object).await {
            tracing::warn!(sandbox = %name, error = %e, "cannot undo the pod");
        }
        if pvc {
            if let Err(e) = self
                .delete_object::<PersistentVolumeClaim>(&pvc_name(name))
                .await
            {
                tracing::warn!(sandbox = %name, error = %e, "cannot undo the volume claim");
            }
        }
        if let Err(e) = self.delete_object::<Secret>(&object).await {
            tracing::warn!(sandbox = %name, error = %e, "cannot undo the secret");
        }
    }
}

#[async_trait::async_trait]
impl Backend for KubernetesBackend {
    async fn list(&self) -> Result<Vec<SandboxSummary>> {
        let mut out: Vec<SandboxSummary> = self
            .secrets
            .state()
            .iter()
            .filter(|s| {
                s.labels()
                    .get(SANDBOX)
                    .is_some_and(|n| valid_name(n) && s.name_any() == object_name(n))
            })
            .filter_map(|s| self.summary(s))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn get(&self, name: &str) -> Result<Option<SandboxSummary>> {
        Ok(self.secret(name).and_then(|s| self.summary(&s)))
    }

    /// A consistent read (no `resourceVersion`: served from etcd, not a watch cache) of the
    /// namespace's records' metadata only (`PartialObjectMetadataList`: no tokens, no
    /// `pod.json`), selected by the `agentbox.dev/namespace` label every create sets.
    async fn list_for_count(&self, namespace: &str) -> Result<Vec<SandboxSummary>> {
        if !valid_name(namespace) {
            return Ok(Vec::new());
        }
        let params =
            kube::api::ListParams::default().labels(&format!("{SELECTOR},{NAMESPACE}={namespace}"));
        let list = self
            .api::<Secret>()
            .list_metadata(&params)
            .await
            .map_err(|e| api_error("list Secrets", &e))?;
        Ok(list
            .items
            .into_iter()
            .filter(|m| {
                m.labels()
                    .get(SANDBOX)
                    .is_some_and(|n| valid_name(n) && m.name_any() == object_name(n))
            })
            .filter_map(|m| {
                self.summary(&Secret {
                    metadata: m.metadata,
                    ..Secret::default()
                })
            })
            .filter(|s| s.namespace == namespace)
            .collect())
    }

    async fn create(&self, spec: CreateSpec) -> Result<SandboxSummary> {
        if !valid_name(&spec.name) || !valid_name(&spec.namespace) {
            return Err(Error::InvalidRequest(format!(
                "{:?} in {:?} is not a valid sandbox name",
                spec.name, spec.namespace
            )));
        }
        if let Some((n, ns)) = spec.name.split_once('.').filter(|_| spec.name.len() > 63) {
            return Err(Error::InvalidRequest(format!("sandbox {n:?} in namespace {ns:?}: the name and the namespace are too long for Kubernetes labels (at most 62 characters together)")));
        }
        if self.secret(&spec.name).is_some() {
            return Err(Error::AlreadyExists(spec.name));
        }
        let name = spec.name.as_str();
        let names = Names {
            sandbox: name,
            namespace: &spec.namespace,
            object: object_name(name),
        };
        let parts = self.pod_template(&spec.template).await?;
        let pooled = pool_of(&spec.template, &parts).is_some();
        if pooled {
            let hash = pool_hash(
                &spec.template,
                &parts,
                self.runner_image.as_deref(),
                &self.namespace,
            )?;
            if let Some(hash) = hash {
                if let Some(summary) = self.claim(&spec, &parts, &hash).await? {
                    self.count_pool(&spec.template.name, true);
                    return Ok(summary);
                }
            }
            self.count_pool(&spec.template.name, false);
        }
        let claim = parts.pvc.is_some().then(|| pvc_name(name));
        let secret = self.record_secret(
            &spec,
            &parts,
            claim.as_deref(),
            random_hex(32).into_bytes(),
            None,
        )?;
        let secret = match self
            .api::<Secret>()
            .create(&PostParams::default(), &secret)
            .await
        {
            Ok(s) => s,
            Err(e) if is_status(&e, 409) => return Err(Error::AlreadyExists(spec.name)),
            Err(e) => {
                return Err(api_error(
                    format_args!("create Secret {}", names.object),
                    &e,
                ))
            }
        };
        let rest = async {
            if let (Some(claim), Some(claim_spec)) = (&claim, parts.pvc) {
                self.create_claim(name, claim, &names, Self::owner(&secret)?, claim_spec)
                    .await?;
            }
            if !self.create_pod(&secret).await? {
                // The pod of a deleted sandbox of the same name, still terminating.
                return Err(Error::AlreadyExists(name.to_owned()));
            }
            Ok(())
        };
        if let Err(e) = rest.await {
            self.roll_back(
                name,
                claim.is_some() && !matches!(e, Error::AlreadyExists(_)),
            )
            .await;
            return Err(e);
        }
        if !self
            .settle(SETTLE, |b| {
                b.secret(name).is_some() && b.pod(name).is_some()
            })
            .await
        {
            tracing::warn!(sandbox = %name, "created, but the caches do not show it yet");
        }
        tracing::info!(sandbox = %name, namespace = %spec.namespace, "sandbox created");
        let mut summary = self
            .secret(name)
            .and_then(|s| self.summary(&s))
            .or_else(|| self.summary(&secret))
            .ok_or_else(|| Error::Internal("the new Secret has no sandbox label".into()))?;
        if pooled {
            summary.from_warm_pool = Some(false);
        }
        Ok(summary)
    }

    async fn delete(&self, name: &str) -> Result<()> {
        if !valid_name(name) {
            return Err(Error::SandboxNotFound(name.into()));
        }
        let object = object_name(name);
        let claim = match self.secret(name) {
            Some(secret) => annotation(&*secret, PVC).map(str::to_owned),
            // Not (yet) in the cache: clean up whatever is there.
            None => Some(pvc_name(name)),
        };
        let pod_object = self.pod_object(name);
        let pod = self.delete_object::<Pod>(&pod_object).await?;
        if pod_object != object {
            // A claimed pooled Pod's Secret (its token; owned by the record anyway).
            self.delete_object::<Secret>(&pod_object).await?;
        }
        let pvc = match claim {
            Some(claim) => self.delete_object::<PersistentVolumeClaim>(&claim).await?,
            None => false,
        };
        if let Some(snapshot) = self
            .secret(name)
            .and_then(|s| annotation(&*s, SNAPSHOT).map(str::to_owned))
        {
            self.delete_snapshot(&snapshot).await?;
        }
        let secret = self.delete_object::<Secret>(&object).await?;
        if !(pod || pvc || secret) {
            return Err(Error::SandboxNotFound(name.into()));
        }
        self.settle(SETTLE, |b| b.secret(name).is_none()).await;
        lock(&self.activity).remove(name);
        tracing::info!(sandbox = %name, "sandbox deleted");
        Ok(())
    }

    async fn stop(&self, name: &str) -> Result<SandboxSummary> {
        if self.secret(name).is_none() {
            return Err(Error::SandboxNotFound(name.into()));
        }
        let _guard = self.lock_sandbox(name).await;
        let pod_object = self.pod_object(name);
        self.annotate(
            name,
            None,
            serde_json::json!({STOPPED: now_rfc3339(), STOP_REASON: "user", POD_NAME: null}),
        )
        .await?;
        self.delete_object::<Pod>(&pod_object).await?;
        if pod_object != object_name(name) {
            // The claimed pooled Pod's Secret: its token is the record's now.
            self.delete_object::<Secret>(&pod_object).await?;
        }
        self.settle(SETTLE, |b| {
            b.secret(name)
                .is_some_and(|s| annotation(&*s, STOPPED).is_some())
                && b.pod(name)
                    .is_none_or(|p| p.metadata.deletion_timestamp.is_some())
        })
        .await;
        tracing::info!(sandbox = %name, "sandbox stopped");
        self.cached_summary(name)
    }

    async fn resume(&self, name: &str) -> Result<SandboxSummary> {
        let _guard = self.lock_sandbox(name).await;
        let Some(mut secret) = self.secret(name) else {
            return Err(Error::SandboxNotFound(name.into()));
        };
        // A pooled Pod it claimed that cannot serve: from now on its own `sandbox-<name>`.
        if let Some(pooled) = annotation(&*secret, POD_NAME).map(str::to_owned) {
            let pod = self.pod(name);
            if pod.is_none_or(|p| p.metadata.deletion_timestamp.is_some() || pod_finished(&p)) {
                self.delete_object::<Pod>(&pooled).await?;
                self.annotate(name, None, serde_json::json!({POD_NAME: null}))
                    .await?;
                self.settle(SETTLE, |b| {
                    b.secret(name)
                        .is_some_and(|s| annotation(&*s, POD_NAME).is_none())
                })
                .await;
                secret = self
                    .secret(name)
                    .ok_or_else(|| Error::SandboxNotFound(name.into()))?;
            }
        }
        if secret.metadata.deletion_timestamp.is_some() {
            return Err(Error::NotRunning {
                name: name.into(),
                status: SandboxStatus::Deleting.as_str(),
            });
        }
        if let Some(pod) = self.pod(name) {
            if pod.metadata.deletion_timestamp.is_none() && pod_finished(&pod) {
                self.delete_object::<Pod>(&pod.name_any()).await?;
            }
            let replaced = pod_finished(&pod) || pod.metadata.deletion_timestamp.is_some();
            if replaced {
                let uid = pod.uid();
                let gone = self
                    .settle(TERMINATE_WAIT, |b| {
                        b.pod(name).is_none_or(|p| p.uid() != uid)
                    })
                    .await;
                if !gone {
                    return Err(Error::Backend(format!(
                        "the previous pod of sandbox {name:?} is still terminating; try again"
                    )));
                }
            }
        }
        if self.pod(name).is_none() {
            self.create_pod(&secret).await?;
        }
        let reason = stop_reason_of(&secret);
        if reason.is_some() {
            let now = millis(SystemTime::now());
            let mut changes = serde_json::json!({
                STOPPED: null, STOP_REASON: null, LAST_ACTIVITY: now,
            });
            // Asleep for idle: the same lifetime goes on; otherwise a new one starts.
            if reason != Some(StopReason::Idle) {
                changes[STARTED_AT] = now.into();
            }
            self.annotate(name, None, changes).await?;
        }
        self.settle(SETTLE, |b| {
            b.secret(name)
                .is_some_and(|s| annotation(&*s, STOPPED).is_none())
                && b.pod(name).is_some()
        })
        .await;
        // Woken for a request: it is held until the runner can serve it.
        if reason == Some(StopReason::Idle) {
            self.settle(WAKE_WAIT, |b| {
                b.secret(name).is_none_or(|s| {
                    !matches!(phase(&s, b.pod(name).as_deref()).0, SandboxStatus::Creating)
                })
            })
            .await;
        }
        tracing::info!(sandbox = %name, "sandbox resumed");
        self.cached_summary(name)
    }

    async fn resolve(&self, name: &str) -> Result<Option<Target>> {
        let Some(secret) = self.secret(name) else {
            return Ok(None);
        };
        let pod = self.pod(name);
        let (status, _) = phase(&secret, pod.as_deref());
        let addr = match (&pod, status) {
            (Some(pod), SandboxStatus::Running) => pod_ip(pod)
                .map(|ip| SocketAddr::new(ip, runner_port(pod)))
                .unwrap_or_else(|| SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)),
            _ => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        };
        let token = secret_data(&secret, TOKEN_KEY)
            .map(|t| String::from_utf8_lossy(t).trim().to_owned())
            .unwrap_or_default();
        Ok(Some(Target {
            addr: super::RunnerAddr::Tcp(addr),
            token,
            status,
            mode: annotation(&*secret, MODE).unwrap_or("agent").to_owned(),
            namespace: annotation(&*secret, NAMESPACE)
                .unwrap_or("default")
                .to_owned(),
            template: annotation(&*secret, TEMPLATE)
                .unwrap_or("default")
                .to_owned(),
            stop_reason: stop_reason_of(&secret),
        }))
    }

    /// Stops sandbox `name` for `reason`: the record says so (`stopped`, `stop-reason`) by a
    /// patch preconditioned on the cached record's `resourceVersion`, so a stop decided on a
    /// record another replica changed since (a resume, a `last-activity` written) does nothing
    /// (`Ok(None)`; the next sweep looks again); then the Pod goes. The workspace claim stays.
    async fn stop_for(
        &self,
        name: &str,
        reason: StopReason,
        idle_since: SystemTime,
    ) -> Result<Option<SandboxSummary>> {
        if reason == StopReason::User {
            return self.stop(name).await.map(Some);
        }
        let _guard = self.lock_sandbox(name).await;
        let Some(secret) = self.secret(name) else {
            return Err(Error::SandboxNotFound(name.into()));
        };
        if secret.metadata.deletion_timestamp.is_some() {
            return Ok(None);
        }
        let version = secret.metadata.resource_version.clone();
        match stop_reason_of(&secret) {
            // Asleep when its lifetime ends: it sleeps on, for `timeout`.
            Some(StopReason::Idle) if reason == StopReason::Timeout => {
                if !self
                    .annotate(
                        name,
                        version.as_deref(),
                        serde_json::json!({STOP_REASON: "timeout"}),
                    )
                    .await?
                {
                    return Ok(None);
                }
            }
            Some(_) => return Ok(None),
            None => {
                if reason == StopReason::Idle
                    && self.last_activity(&secret).is_some_and(|t| t > idle_since)
                {
                    return Ok(None);
                }
                let pod_object = self.pod_object(name);
                let changes = serde_json::json!({
                    STOPPED: now_rfc3339(), STOP_REASON: reason_text(reason), POD_NAME: null,
                });
                if !self.annotate(name, version.as_deref(), changes).await? {
                    return Ok(None);
                }
                self.delete_object::<Pod>(&pod_object).await?;
                if pod_object != object_name(name) {
                    // The claimed pooled Pod's Secret: its token is the record's now.
                    self.delete_object::<Secret>(&pod_object).await?;
                }
            }
        }
        self.settle(SETTLE, |b| {
            b.secret(name)
                .is_some_and(|s| stop_reason_of(&s) == Some(reason))
                && b.pod(name)
                    .is_none_or(|p| p.metadata.deletion_timestamp.is_some())
        })
        .await;
        tracing::info!(sandbox = %name, reason = reason_text(reason), "sandbox stopped");
        self.cached_summary(name).map(Some)
    }

    async fn expire(&self, name: &str) -> Result<()> {
        let Some(secret) = self.secret(name) else {
            return Ok(());
        };
        if annotation(&*secret, ON_TIMEOUT) == Some("delete") {
            return match self.delete(name).await {
                Err(Error::SandboxNotFound(_)) => Ok(()),
                other => other,
            };
        }
        self.stop_for(name, StopReason::Timeout, SystemTime::now())
            .await
            .map(|_| ())
    }

    fn keeps_lifecycle(&self) -> bool {
        true
    }

    /// A VolumeSnapshot of the source's workspace claim, a new claim from it (`dataSource`),
    /// and the source's stored Pod made the clone's; see the module's docs. Untested against a
    /// real CSI driver.
    async fn clone_sandbox(
        &self,
        source: &str,
        name: &str,
        created_by: agentbox_proto::CreatedBy,
    ) -> Result<SandboxSummary> {
        let Some(src) = self.secret(source) else {
            return Err(Error::SandboxNotFound(source.into()));
        };
        if !valid_name(name) {
            return Err(Error::InvalidRequest(format!(
                "{name:?} is not a valid sandbox name"
            )));
        }
        if self.secret(name).is_some() {
            return Err(Error::AlreadyExists(name.into()));
        }
        if src.metadata.deletion_timestamp.is_some() {
            return Err(Error::NotRunning {
                name: source.into(),
                status: SandboxStatus::Deleting.as_str(),
            });
        }
        let Some(source_claim) = annotation(&*src, PVC).map(str::to_owned) else {
            return Err(Error::NotCloneable(format!(
                "sandbox {source:?} cannot be cloned: its workspace is an emptyDir, which \
                 Kubernetes cannot snapshot; a clone needs a template whose ConfigMap has a \
                 pvc.json (on a StorageClass whose CSI driver supports VolumeSnapshots)"
            )));
        };
        let template_name = annotation(&*src, TEMPLATE).unwrap_or("default").to_owned();
        let parts = self
            .pod_template(&Template {
                name: template_name.clone(),
                ..Template::default()
            })
            .await?;
        let Some(mut claim_spec) = parts.pvc else {
            return Err(Error::NotCloneable(format!(
                "sandbox {source:?} cannot be cloned: the pvc.json of its template {template_name:?} \
                 is gone, so the new workspace claim has no spec"
            )));
        };
        let stored: Pod = secret_data(&src, POD_KEY)
            .ok_or_else(|| Error::Backend(format!("Secret {} has no {POD_KEY:?}", src.name_any())))
            .and_then(|b| {
                serde_json::from_slice(b).map_err(|e| {
                    Error::Backend(format!("Secret {}: bad {POD_KEY}: {e}", src.name_any()))
                })
            })?;
        let namespace = annotation(&*src, NAMESPACE).unwrap_or("default").to_owned();
        let names = Names {
            sandbox: name,
            namespace: &namespace,
            object: object_name(name),
        };
        let claim = pvc_name(name);
        let snapshot = snapshot_name(name);
        let pod = retarget_pod(stored, source, &names, &claim);
        let pod_json = serde_json::to_vec(&pod).map_err(|e| Error::Internal(e.to_string()))?;
        let created_by =
            serde_json::to_string(&created_by).map_err(|e| Error::Internal(e.to_string()))?;
        let mut annotations = BTreeMap::from([
            (NAMESPACE.to_owned(), namespace.clone()),
            (TEMPLATE.to_owned(), template_name),
            (
                MODE.to_owned(),
                annotation(&*src, MODE).unwrap_or("agent").to_owned(),
            ),
            (CREATED_AT.to_owned(), now_rfc3339()),
            (CREATED_BY.to_owned(), created_by),
            (STARTED_AT.to_owned(), millis(SystemTime::now())),
            (PVC.to_owned(), claim.clone()),
            (CLONED_FROM.to_owned(), source.to_owned()),
            (SNAPSHOT.to_owned(), snapshot.clone()),
        ]);
        for key in [TIMEOUT, IDLE_TIMEOUT, ON_TIMEOUT] {
            if let Some(v) = annotation(&*src, key) {
                annotations.insert(key.to_owned(), v.to_owned());
            }
        }
        let secret = self.record_of(&names, annotations, random_hex(32).into_bytes(), pod_json);
        let secret = match self
            .api::<Secret>()
            .create(&PostParams::default(), &secret)
            .await
        {
            Ok(s) => s,
            Err(e) if is_status(&e, 409) => return Err(Error::AlreadyExists(name.into())),
            Err(e) => {
                return Err(api_error(
                    format_args!("create Secret {}", names.object),
                    &e,
                ))
            }
        };
        let rest = async {
            let owner = Self::owner(&secret)?;
            let mut object = kube::api::DynamicObject::new(&snapshot, &volume_snapshot_resource())
                .within(&self.namespace)
                .data(serde_json::json!({
                    "spec": {"source": {"persistentVolumeClaimName": source_claim}},
                }));
            object.metadata.labels = Some(labels(&names));
            object.metadata.owner_references = Some(vec![owner.clone()]);
            match self
                .snapshots()
                .create(&PostParams::default(), &object)
                .await
            {
                Ok(_) => {}
                Err(e) if is_status(&e, 404) => {
                    return Err(Error::NotCloneable(format!(
                        "sandbox {source:?} cannot be cloned: this cluster serves no \
                         snapshot.storage.k8s.io/v1 VolumeSnapshots (install the CSI snapshot \
                         controller and CRDs)"
                    )))
                }
                Err(e) => {
                    return Err(api_error(
                        format_args!("create VolumeSnapshot {snapshot}"),
                        &e,
                    ))
                }
            }
            claim_spec.data_source = Some(k8s_openapi::api::core::v1::TypedLocalObjectReference {
                api_group: Some("snapshot.storage.k8s.io".into()),
                kind: "VolumeSnapshot".into(),
                name: snapshot.clone(),
            });
            self.create_claim(name, &claim, &names, owner, claim_spec)
                .await?;
            if !self.create_pod(&secret).await? {
                return Err(Error::AlreadyExists(name.into()));
            }
            Ok(())
        };
        if let Err(e) = rest.await {
            if let Err(e) = self.delete_snapshot(&snapshot).await {
                tracing::warn!(sandbox = %name, error = %e, "cannot undo the volume snapshot");
            }
            self.roll_back(name, !matches!(e, Error::AlreadyExists(_)))
                .await;
            return Err(e);
        }
        self.settle(SETTLE, |b| {
            b.secret(name).is_some() && b.pod(name).is_some()
        })
        .await;
        tracing::info!(sandbox = %name, source = %source, "sandbox cloned");
        self.secret(name)
            .and_then(|s| self.summary(&s))
            .or_else(|| self.summary(&secret))
            .ok_or_else(|| Error::Internal("the new Secret has no sandbox label".into()))
    }

    /// Every replica refills, from its caches: pooled Pods of a template no longer pooled,
    /// made from another rendering of it, past `maxAge`, failed or more than `size` are
    /// retired (a delete preconditioned on the `resourceVersion` seen, so a Pod claimed
    /// meanwhile stays); fewer than `size` are made up. Two replicas refilling at the same
    /// moment can start one Pod each for one missing; the next refill retires the extra.
    async fn refill_pools(&self, templates: &[Template]) -> Result<()> {
        let mut renders = std::collections::HashMap::new();
        let mut unreadable = std::collections::HashSet::new();
        for t in templates {
            // Every template: its ConfigMap (read at most every POOL_RENDER_TTL) may ask.
            let render = match self.pool_render(t).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(template = %t.name, error = %e, "cannot read the template for its warm pool");
                    unreadable.insert(t.name.clone());
                    continue;
                }
            };
            if let Some(pool) = pool_of(&render.template, &render.parts) {
                if render.hash.is_none() {
                    tracing::debug!(template = %t.name, "its credentials keep it out of a warm pool");
                }
                renders.insert(t.name.clone(), (render, pool));
            }
        }
        let now = SystemTime::now();
        let pooled: Vec<Arc<Pod>> = self
            .pods
            .state()
            .into_iter()
            .filter(|p| p.labels().contains_key(POOL) && p.metadata.deletion_timestamp.is_none())
            .collect();
        let mut live: std::collections::HashMap<String, Vec<Arc<Pod>>> =
            std::collections::HashMap::new();
        for pod in pooled {
            let template = pod.labels().get(POOL).cloned().unwrap_or_default();
            if unreadable.contains(&template) {
                continue; // left as it is until its template can be read again
            }
            let keep = renders.get(&template).is_some_and(|(r, pool)| {
                let max_age = pool
                    .max_age
                    .as_deref()
                    .and_then(|a| crate::lifecycle::parse_duration(a).ok());
                r.hash.is_some()
                    && annotation(&*pod, POOL_HASH) == r.hash.as_deref()
                    // A broken one is replaced after a while, not four times a second.
                    && (pod_phase(&pod).0 != SandboxStatus::Error
                        || created(&*pod).is_none_or(|c| {
                            now.duration_since(c).unwrap_or_default() < CREATE_GRACE
                        }))
                    && max_age.is_none_or(|max| {
                        created(&*pod)
                            .is_none_or(|c| now.duration_since(c).unwrap_or_default() < max)
                    })
            });
            if keep {
                live.entry(template).or_default().push(pod);
            } else {
                self.retire(&pod).await?;
            }
        }
        for (name, (render, pool)) in &renders {
            let Some(hash) = render.hash.as_deref() else {
                continue;
            };
            let size = pool.size as usize;
            let mut pods = live.remove(name).unwrap_or_default();
            if pods.len() > size {
                // The ones not ready yet go first, then the youngest.
                pods.sort_by_key(|p| {
                    (
                        pod_phase(p).0 == SandboxStatus::Running,
                        std::cmp::Reverse(created(&**p)),
                    )
                });
                for pod in &pods[..pods.len() - size] {
                    self.retire(pod).await?;
                }
            }
            for _ in pods.len()..size {
                self.start_pooled(render, hash).await?;
            }
        }
        // Secrets of pooled Pods that are gone (a failed start, a Pod deleted by hand).
        for secret in self.secrets.state() {
            if secret.labels().contains_key(POOL)
                && secret.metadata.deletion_timestamp.is_none()
                && self
                    .pods
                    .get(&ObjectRef::new(&secret.name_any()).within(&self.namespace))
                    .is_none()
                && created(&*secret)
                    .is_some_and(|c| now.duration_since(c).unwrap_or_default() > CREATE_GRACE)
            {
                self.remove_pooled(&secret.name_any()).await;
            }
        }
        Ok(())
    }

    /// Ready: the template's pooled Pods Running and Ready in this replica's cache; hits and
    /// misses: this replica's creates since it started.
    fn warm_pools(&self, templates: &[Template]) -> Vec<agentbox_proto::WarmPoolInfo> {
        let pods = self.pods.state();
        let counts = lock(&self.pool_counts);
        let renders = lock(&self.pool_renders);
        templates
            .iter()
            .filter_map(|t| {
                let size = renders
                    .get(&t.name)
                    .and_then(|r| r.parts.warm_pool.as_ref())
                    .or(t.warm_pool.as_ref())?
                    .size;
                let ready = pods
                    .iter()
                    .filter(|p| {
                        p.labels().get(POOL) == Some(&t.name)
                            && pod_phase(p).0 == SandboxStatus::Running
                    })
                    .count();
                let (hits, misses) = counts.get(&t.name).copied().unwrap_or_default();
                Some(agentbox_proto::WarmPoolInfo {
                    template: t.name.clone(),
                    size,
                    ready: u32::try_from(ready).unwrap_or(u32::MAX),
                    hits,
                    misses,
                })
            })
            .collect()
    }

    /// Remembers the use and, for a sandbox with an idle timeout, writes it on the record
    /// (`last-activity`, so every replica's sweep sees it) in the background: at once when
    /// nothing was written for [`ACTIVITY_WRITE_MAX`] (a quarter of its idle timeout when that
    /// is shorter, at least [`ACTIVITY_WRITE_MIN`]), else once at the end of that interval,
    /// with the latest use then. So the record shows the last use at most that interval late,
    /// with at most two writes per interval however many requests.
    fn touch(&self, name: &str) {
        let Some(secret) = self.secret(name) else {
            return;
        };
        let every = annotation(&*secret, IDLE_TIMEOUT)
            .and_then(|t| crate::lifecycle::parse_duration(t).ok())
            .map(|idle| (idle / 4).clamp(ACTIVITY_WRITE_MIN, ACTIVITY_WRITE_MAX));
        let now = SystemTime::now();
        let delay = {
            let mut activity = lock(&self.activity);
            if activity.len() >= MAX_TRACKED && !activity.contains_key(name) {
                let mut times: Vec<SystemTime> = activity.values().map(|a| a.seen).collect();
                times.sort_unstable();
                let cut = times[times.len() / 2];
                activity.retain(|_, a| a.seen > cut);
            }
            let a = activity.entry(name.to_owned()).or_insert(Activity {
                seen: now,
                written: None,
                pending: false,
            });
            a.seen = now;
            match (every, a.written) {
                (None, _) => None,
                (Some(every), Some(w)) if w.elapsed() < every => {
                    if a.pending {
                        None
                    } else {
                        a.pending = true;
                        Some(every.saturating_sub(w.elapsed()))
                    }
                }
                (Some(_), _) => {
                    a.written = Some(Instant::now());
                    Some(Duration::ZERO)
                }
            }
        };
        let Some(delay) = delay else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let api = self.api::<Secret>();
        let object = object_name(name);
        let activity = Arc::clone(&self.activity);
        let name = name.to_owned();
        runtime.spawn(async move {
            let mut seen = now;
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
                let mut activity = lock(&activity);
                let Some(a) = activity.get_mut(&name) else {
                    return; // deleted meanwhile
                };
                a.pending = false;
                a.written = Some(Instant::now());
                seen = a.seen;
            }
            let patch =
                serde_json::json!({"metadata": {"annotations": {LAST_ACTIVITY: millis(seen)}}});
            if let Err(e) = api
                .patch(&object, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                if !is_status(&e, 404) {
                    tracing::warn!(secret = %object, error = %e, "cannot record the last activity");
                }
            }
        });
    }

    fn records_outcomes(&self) -> bool {
        true
    }

    async fn record(&self, name: &str, action: &str, outcome: &str, status: u16) {
        let Some(secret) = self.secret(name) else {
            return;
        };
        let involved = match self.pod(name) {
            Some(pod) => ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.name_any()),
                namespace: Some(self.namespace.clone()),
                uid: pod.uid(),
                ..ObjectReference::default()
            },
            None => ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Secret".into()),
                name: Some(secret.name_any()),
                namespace: Some(self.namespace.clone()),
                uid: secret.uid(),
                ..ObjectReference::default()
            },
        };
        let now = Timestamp::now();
        let reason = match action {
            "configure" => "Configured",
            _ => "Invoked",
        };
        let event = Event {
            metadata: ObjectMeta {
                name: Some(format!(
                    "{}.{:x}{}",
                    involved.name.as_deref().unwrap_or_default(),
                    now.as_nanosecond(),
                    random_hex(2)
                )),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([
                    (MANAGED_BY.to_owned(), MANAGER.to_owned()),
                    (SANDBOX.to_owned(), name.to_owned()),
                ])),
                ..ObjectMeta::default()
            },
            involved_object: involved,
            reason: Some(reason.into()),
            message: Some(format!("{action} {outcome} (HTTP {status})")),
            type_: Some(if outcome == "ok" { "Normal" } else { "Warning" }.into()),
            count: Some(1),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            action: Some(action.into()),
            source: Some(EventSource {
                component: Some("agentbox-controlplane".into()),
                host: None,
            }),
            reporting_component: Some("agentbox.dev/controlplane".into()),
            reporting_instance: Some(self.instance.clone()),
            ..Event::default()
        };
        if let Err(e) = self
            .api::<Event>()
            .create(&PostParams::default(), &event)
            .await
        {
            tracing::warn!(sandbox = %name, action, error = %e, "cannot record the event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> Template {
        Template {
            name: "default".into(),
            description: None,
            mode: "agent".into(),
            image: Some("example.invalid/runner:1".into()),
            env: BTreeMap::from([("FOO".into(), "bar".into())]),
            max_concurrent_invokes: Some(4),
            runner_args: vec!["--default-timeout".into(), "5m".into()],
            limits: None,
            ..Template::default()
        }
    }

    fn names() -> Names<'static> {
        Names {
            sandbox: "demo",
            namespace: "team-a",
            object: object_name("demo"),
        }
    }

    fn env(c: &Container) -> BTreeMap<String, EnvVar> {
        c.env
            .iter()
            .flatten()
            .map(|e| (e.name.clone(), e.clone()))
            .collect()
    }

    #[test]
    fn credentials_are_secret_references_never_values() {
        let mut t = template();
        t.credentials = vec![
            agentbox_proto::CredentialRef {
                name: "openai".into(),
                env: Some("OPENAI_API_KEY".into()),
                file: None,
            },
            agentbox_proto::CredentialRef {
                name: "gcp".into(),
                env: None,
                file: Some("/run/credentials/gcp.json".into()),
            },
        ];
        let pod = render_pod(&names(), &t, None, None, "agentbox", None).unwrap();
        let spec = pod.spec.as_ref().unwrap();
        let c = &spec.containers[0];
        let var = &env(c)["OPENAI_API_KEY"];
        assert!(var.value.is_none());
        let key = var
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!(
            (key.name.as_str(), key.key.as_str()),
            ("credential-team-a-openai", "value")
        );
        let volume = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "credential-gcp")
            .unwrap();
        let secret = volume.secret.as_ref().unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("credential-team-a-gcp"));
        let mount = c
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == "credential-gcp")
            .unwrap();
        assert_eq!(mount.mount_path, "/run/credentials/gcp.json");
        assert_eq!(mount.read_only, Some(true));
    }

    #[test]
    fn builtin_pod_is_complete() {
        let pod = render_pod(&names(), &template(), None, None, "agentbox", None).unwrap();
        assert_eq!(pod.metadata.name.as_deref(), Some("sandbox-demo"));
        assert_eq!(pod.labels()[SANDBOX], "demo");
        assert_eq!(pod.labels()[MANAGED_BY], "agentbox");
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.automount_service_account_token, Some(false));
        let c = &spec.containers[0];
        assert_eq!(c.image.as_deref(), Some("example.invalid/runner:1"));
        assert_eq!(runner_port(&pod), DEFAULT_RUNNER_PORT);
        let env = env(c);
        let token = env["AGENTBOX_RUNNER_TOKEN"].value_from.as_ref().unwrap();
        let key = token.secret_key_ref.as_ref().unwrap();
        assert_eq!(
            (key.name.as_str(), key.key.as_str()),
            ("sandbox-demo", "token")
        );
        assert!(env["AGENTBOX_RUNNER_TOKEN"].value.is_none());
        assert_eq!(env["AGENTBOX_MODE"].value.as_deref(), Some("agent"));
        assert_eq!(env["FOO"].value.as_deref(), Some("bar"));
        assert_eq!(
            env["AGENTBOX_MAX_CONCURRENT_INVOKES"].value.as_deref(),
            Some("4")
        );
        assert_eq!(c.args.as_ref().unwrap(), &["--default-timeout", "5m"]);
        let volume = &spec.volumes.as_ref().unwrap()[0];
        assert!(volume.empty_dir.is_some());
    }

    #[test]
    fn template_pod_keeps_its_settings_and_gets_ours() {
        let base: Pod = full_or_spec::<Pod, PodSpec>(
            r#"{"containers": [
                {"name": "sidecar", "image": "busybox"},
                {"name": "main", "ports": [{"name": "runner", "containerPort": 9000}],
                 "env": [{"name": "AGENTBOX_RUNNER_TOKEN", "value": "leak"},
                         {"name": "KEEP", "value": "1"}]}
            ], "automountServiceAccountToken": true}"#,
            |spec| Pod {
                spec: Some(spec),
                ..Pod::default()
            },
        )
        .unwrap();
        let pod = render_pod(
            &names(),
            &template(),
            Some(base),
            None,
            "agentbox",
            Some("sandbox-demo-workspace"),
        )
        .unwrap();
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.automount_service_account_token, Some(true));
        assert_eq!(runner_port(&pod), 9000);
        let main = &spec.containers[1];
        assert_eq!(main.image.as_deref(), Some("example.invalid/runner:1"));
        let env = env(main);
        assert!(env["AGENTBOX_RUNNER_TOKEN"].value.is_none());
        assert_eq!(env["KEEP"].value.as_deref(), Some("1"));
        assert_eq!(
            env["AGENTBOX_LISTEN"].value.as_deref(),
            Some("0.0.0.0:9000")
        );
        assert!(spec.containers[0].env.is_none());
        let volume = &spec.volumes.as_ref().unwrap()[0];
        assert_eq!(
            volume.persistent_volume_claim.as_ref().unwrap().claim_name,
            "sandbox-demo-workspace"
        );
    }

    #[test]
    fn pool_hash_follows_the_pod_not_the_pool_size() {
        let parts = PodTemplate::default();
        let mut t = template();
        t.warm_pool = Some(crate::templates::WarmPool {
            size: 2,
            max_age: None,
        });
        let hash = |t: &Template| pool_hash(t, &parts, None, "agentbox").unwrap();
        let base = hash(&t).unwrap();
        t.warm_pool = Some(crate::templates::WarmPool {
            size: 5,
            max_age: Some("1h".into()),
        });
        assert_eq!(hash(&t).unwrap(), base, "resizing a pool keeps its Pods");
        t.env.insert("NEW".into(), "1".into());
        assert_ne!(
            hash(&t).unwrap(),
            base,
            "a changed pod is another rendering"
        );
        t.credentials = vec![agentbox_proto::CredentialRef {
            name: "openai".into(),
            env: Some("OPENAI_API_KEY".into()),
            file: None,
        }];
        assert_eq!(hash(&t), None, "credentials name a namespace: no pool");
        let with_claim = PodTemplate {
            pvc: Some(PersistentVolumeClaimSpec::default()),
            ..PodTemplate::default()
        };
        let claimed = pool_hash(&template(), &with_claim, None, "agentbox").unwrap();
        assert!(claimed.is_some_and(|h| h != hash(&template()).unwrap()));
        let pod = render_pooled(&template(), &with_claim, None, "agentbox", "pool-ab12")
            .unwrap()
            .unwrap();
        let volume = &pod.spec.as_ref().unwrap().volumes.as_ref().unwrap()[0];
        assert_eq!(
            volume.persistent_volume_claim.as_ref().unwrap().claim_name,
            "pool-ab12-workspace"
        );
        let pooled = render_pooled(&template(), &parts, None, "agentbox", "pool-ab12")
            .unwrap()
            .unwrap();
        assert_eq!(pooled.labels()[POOL], "default");
        assert!(!pooled.labels().contains_key(SANDBOX));
        assert!(!pooled.labels().contains_key(NAMESPACE));
    }

    #[test]
    fn a_clone_gets_the_sources_pod_under_its_own_names() {
        let source = render_pod(
            &names(),
            &template(),
            None,
            None,
            "agentbox",
            Some("sandbox-demo-workspace"),
        )
        .unwrap();
        let clone = Names {
            sandbox: "copy",
            namespace: "team-a",
            object: object_name("copy"),
        };
        let pod = retarget_pod(source.clone(), "demo", &clone, "sandbox-copy-workspace");
        assert_eq!(pod.metadata.name.as_deref(), Some("sandbox-copy"));
        assert_eq!(pod.labels()[SANDBOX], "copy");
        let spec = pod.spec.as_ref().unwrap();
        let c = &spec.containers[0];
        let env = env(c);
        assert_eq!(env["AGENTBOX_SANDBOX"].value.as_deref(), Some("copy"));
        let token = env["AGENTBOX_RUNNER_TOKEN"].value_from.as_ref().unwrap();
        assert_eq!(token.secret_key_ref.as_ref().unwrap().name, "sandbox-copy");
        assert_eq!(
            spec.volumes.as_ref().unwrap()[0]
                .persistent_volume_claim
                .as_ref()
                .unwrap()
                .claim_name,
            "sandbox-copy-workspace"
        );
        // Everything else is the source's.
        assert_eq!(c.image, source.spec.as_ref().unwrap().containers[0].image);
        assert_eq!(c.args, source.spec.as_ref().unwrap().containers[0].args);
    }

    #[test]
    fn no_image_is_an_error() {
        let mut t = template();
        t.image = None;
        assert!(render_pod(&names(), &t, None, None, "agentbox", None).is_err());
        let pod = render_pod(&names(), &t, None, Some("fallback:1"), "agentbox", None).unwrap();
        assert_eq!(
            pod.spec.unwrap().containers[0].image.as_deref(),
            Some("fallback:1")
        );
    }

    #[test]
    fn phases() {
        let pod = |phase: &str, ready: bool| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "sandbox-demo"},
                "status": {
                    "phase": phase,
                    "podIP": "10.0.0.7",
                    "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
                }
            }))
            .unwrap()
        };
        assert_eq!(pod_phase(&pod("Running", true)).0, SandboxStatus::Running);
        assert_eq!(pod_phase(&pod("Running", false)).0, SandboxStatus::Creating);
        assert_eq!(pod_phase(&pod("Pending", false)).0, SandboxStatus::Creating);
        assert_eq!(pod_phase(&pod("Failed", false)).0, SandboxStatus::Error);
        assert_eq!(pod_phase(&pod("Unknown", false)).0, SandboxStatus::Error);
        let mut crashing = pod("Running", false);
        crashing.status.as_mut().unwrap().container_statuses =
            Some(vec![serde_json::from_value(serde_json::json!({
                "name": "runner", "image": "x", "imageID": "", "ready": false, "restartCount": 3,
                "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}}
            }))
            .unwrap()]);
        let (status, message) = pod_phase(&crashing);
        assert_eq!(status, SandboxStatus::Error);
        assert!(message.unwrap().contains("CrashLoopBackOff"));
    }
}
