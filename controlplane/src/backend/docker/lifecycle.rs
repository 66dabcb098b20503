//! The Docker backend's lifecycle: idle stop, lifetimes, warm pools and clone. Container
//! labels cannot change, so what changes is said by names, which can (the engine's rename is
//! atomic: of two renames of one container, one wins).
//!
//! * **Asleep.** A sandbox stopped for being idle, or at its lifetime's end, keeps its
//!   container, stopped and renamed `agentbox-<scope>-<name>.idle` (or `.timeout`): the name is
//!   its `stopReason`. Resume (on demand, or `POST .../resume`) of an `.idle` one renames it
//!   back and starts it: the same container, writable layer, hostname and lifetime. A user's
//!   stop removes it; a resume of a `.timeout` one makes a new container (a new lifetime).
//!   Stops and resumes of one sandbox hold a lock of this replica, so a request that finds the
//!   sandbox going to sleep waits and then wakes it.
//! * **Lifetime.** Containers carry `agentbox.dev/started-at`; a lifetime ends at the later of
//!   that and the record's `created-at`, plus `timeout`.
//! * **Activity** is this replica's memory of the requests it proxied (at most
//!   [`MAX_TRACKED`] sandboxes), the container's start and the create; the sweep also asks the
//!   runner for its invokes. A file or terminal request served by another replica is not seen
//!   here (its invokes are).
//! * **Warm pools.** `agentbox-<scope>.pool-<hex>`: a volume and a container labelled
//!   `agentbox.dev/pool=<template>` (and the template as JSON, and the runner token), started
//!   as `.warming-<hex>` and renamed once its runner answers. A create claims one by renaming
//!   its container to `agentbox-<scope>-<name>` and making the record volume, whose
//!   `agentbox.dev/workspace` names the pool volume. The runner runs on, unaware: its hostname
//!   and `AGENTBOX_SANDBOX` stay `pool-<hex>` until its container is made anew. Retiring one
//!   (too old, of an older template, more than the size) first renames it
//!   `.retiring-<hex>`, so no create claims it meanwhile. The engine's rename is no
//!   compare-and-swap (concurrent renames of one container by its old name all succeed), so
//!   this replica renames pooled containers one at a time; two replicas on one engine could
//!   hand one pooled container to two creates (run one control plane per Docker engine).
//! * **Clone.** A new record volume and container (created, not started); a helper container
//!   (created from the source's image, never started) mounts the source's workspace, and the
//!   engine's archive of its `/workspace` is streamed into the new container; then it starts.
//!   The runner's configuration is in the workspace (`.agentbox`), so a configure with the
//!   same hash skips the install; so are its invoke journals, which the clone's runner lists.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use agentbox_proto::{SandboxSummary, StopReason, WarmPoolInfo};
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerSummaryStateEnum, HostConfig,
    VolumeCreateRequest,
};
use bollard::query_parameters::{
    DownloadFromContainerOptions, ListContainersOptionsBuilder, RemoveVolumeOptions,
    RenameContainerOptions, StopContainerOptionsBuilder, UploadToContainerOptions,
};
use futures_util::TryStreamExt;

use super::{
    engine, not_found, DockerBackend, Record, CREATED_AT, MANAGED_BY, MANAGER, MODE, POOL, SCOPE,
    SPEC, STARTED_AT, TEMPLATE, TOKEN,
};
use crate::backend::{now_rfc3339, random_hex, valid_key};
use crate::error::{Error, Result};
use crate::templates::Template;

/// Sandboxes whose activity this replica remembers; past it, the oldest half is forgotten.
pub(super) const MAX_TRACKED: usize = 10_000;

/// How long a `.warming-` container may take before the refill takes it for a leftover.
const WARMING_LEFTOVER: Duration = Duration::from_secs(120);

/// Now, RFC 3339 to the millisecond.
pub(super) fn now_millis() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn parse_time(text: Option<&str>) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(text?).ok()
}

/// What one replica keeps about the lifecycle (nothing it could not lose).
#[derive(Debug, Default)]
pub(super) struct State {
    /// When this replica last proxied a request that used each sandbox.
    touched: Mutex<HashMap<String, SystemTime>>,
    /// One lock per sandbox being stopped or resumed.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Per template: (hits, misses) of this replica.
    counts: Mutex<HashMap<String, (u64, u64)>>,
    /// Per template: pooled sandboxes ready at the last refill.
    ready: Mutex<HashMap<String, u32>>,
    /// A claimed pooled container's owner (namespace, mode, template) by container id.
    owners: Mutex<HashMap<String, (String, String, String)>>,
    /// Held around every rename of a pooled container. The engine's rename is not a
    /// compare-and-swap: renames of one container by its old name that look it up at the same
    /// time all succeed, one after the other. One at a time, the second finds the old name gone.
    renames: tokio::sync::Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl State {
    pub(super) fn touch(&self, name: &str) {
        let mut touched = lock(&self.touched);
        if touched.len() >= MAX_TRACKED && !touched.contains_key(name) {
            let mut times: Vec<SystemTime> = touched.values().copied().collect();
            times.sort_unstable();
            let cut = times[times.len() / 2];
            touched.retain(|_, t| *t > cut);
        }
        touched.insert(name.to_owned(), SystemTime::now());
    }

    fn touched(&self, name: &str) -> Option<SystemTime> {
        lock(&self.touched).get(name).copied()
    }

    pub(super) fn forget(&self, name: &str) {
        lock(&self.touched).remove(name);
    }

    /// The lock of sandbox `name`'s stops and resumes.
    pub(super) async fn lock(&self, name: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = {
            let mut locks = lock(&self.locks);
            if locks.len() >= 1000 {
                locks.retain(|_, m| Arc::strong_count(m) > 1);
            }
            locks.entry(name.to_owned()).or_default().clone()
        };
        m.lock_owned().await
    }

    pub(super) fn count(&self, template: &str, hit: bool) {
        let mut counts = lock(&self.counts);
        let c = counts.entry(template.to_owned()).or_default();
        if hit {
            c.0 += 1;
            // One fewer ready until the next refill counts again.
            if let Some(ready) = lock(&self.ready).get_mut(template) {
                *ready = ready.saturating_sub(1);
            }
        } else {
            c.1 += 1;
        }
    }

    pub(super) fn pools(&self, templates: &[Template]) -> Vec<WarmPoolInfo> {
        let counts = lock(&self.counts);
        let ready = lock(&self.ready);
        templates
            .iter()
            .filter_map(|t| {
                let size = t.warm_pool.as_ref()?.size;
                let (hits, misses) = counts.get(&t.name).copied().unwrap_or_default();
                Some(WarmPoolInfo {
                    template: t.name.clone(),
                    size,
                    ready: ready.get(&t.name).copied().unwrap_or(0),
                    hits,
                    misses,
                })
            })
            .collect()
    }
}

fn reason_suffix(reason: StopReason) -> &'static str {
    match reason {
        StopReason::Idle => "idle",
        StopReason::Timeout => "timeout",
        StopReason::User => "stopped",
    }
}

impl DockerBackend {
    /// The name of `name`'s container while asleep for `reason`.
    fn asleep_name(&self, name: &str, reason: StopReason) -> String {
        format!("{}.{}", self.object_name(name), reason_suffix(reason))
    }

    async fn inspect(&self, object: &str) -> Result<Option<ContainerInspectResponse>> {
        match self.docker.inspect_container(object, None).await {
            Ok(c) => Ok(Some(c)),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(engine(e)),
        }
    }

    async fn rename(&self, from: &str, to: &str) -> std::result::Result<(), DockerError> {
        self.docker
            .rename_container(
                from,
                RenameContainerOptions {
                    name: to.to_owned(),
                },
            )
            .await
    }

    /// Sandbox `name`'s container kept asleep, and why.
    pub(super) async fn asleep(
        &self,
        name: &str,
    ) -> Result<Option<(StopReason, ContainerInspectResponse)>> {
        for reason in [StopReason::Idle, StopReason::Timeout] {
            if let Some(c) = self.inspect(&self.asleep_name(name, reason)).await? {
                return Ok(Some((reason, c)));
            }
        }
        Ok(None)
    }

    /// [`Self::asleep`], asking the engine only about names in `names` (a listing's).
    pub(super) async fn asleep_among(
        &self,
        name: &str,
        names: &HashSet<String>,
    ) -> Result<Option<(StopReason, ContainerInspectResponse)>> {
        for reason in [StopReason::Idle, StopReason::Timeout] {
            let object = self.asleep_name(name, reason);
            if names.contains(&object) {
                if let Some(c) = self.inspect(&object).await? {
                    return Ok(Some((reason, c)));
                }
            }
        }
        Ok(None)
    }

    /// Removes sandbox `name`'s containers kept asleep.
    pub(super) async fn remove_asleep(&self, name: &str) -> Result<()> {
        for reason in [StopReason::Idle, StopReason::Timeout] {
            self.remove_object(&self.asleep_name(name, reason), 0)
                .await?;
        }
        Ok(())
    }

    /// When sandbox `record`'s lifetime ends, its container being `container`.
    pub(super) fn expires_at(
        &self,
        record: &Record,
        container: Option<&ContainerInspectResponse>,
    ) -> Option<SystemTime> {
        let lifetime = crate::lifecycle::parse_duration(record.timeout.as_deref()?).ok()?;
        let label = container
            .and_then(|c| c.config.as_ref())
            .and_then(|c| c.labels.as_ref())
            .and_then(|l| parse_time(l.get(STARTED_AT).map(String::as_str)));
        let start = label
            .into_iter()
            .chain(parse_time(Some(&record.created_at)))
            .max()?;
        start.checked_add(lifetime)
    }

    /// When sandbox `name` was last used, as far as this replica knows: a request it proxied,
    /// its container's start, its create.
    pub(super) fn last_activity(
        &self,
        record: &Record,
        container: Option<&ContainerInspectResponse>,
    ) -> Option<SystemTime> {
        let started = container
            .and_then(|c| c.state.as_ref())
            .and_then(|s| parse_time(s.started_at.as_deref()));
        [
            self.life.touched(&record.name),
            started,
            parse_time(Some(&record.created_at)),
        ]
        .into_iter()
        .flatten()
        .max()
    }

    /// Puts sandbox `name` to sleep for `reason` (idle: unless this replica saw it used since
    /// `idle_since`); `None` when nothing was done.
    pub(super) async fn sleep(
        &self,
        name: &str,
        reason: StopReason,
        idle_since: SystemTime,
    ) -> Result<Option<SandboxSummary>> {
        use crate::backend::Backend;
        let Some(record) = self.record(name).await? else {
            return Err(Error::SandboxNotFound(name.into()));
        };
        if reason == StopReason::User {
            return self.stop(name).await.map(Some);
        }
        let _guard = self.life.lock(name).await;
        self.targets.forget(name);
        let object = self.object_name(name);
        let asleep = self.asleep_name(name, reason);
        match self.container(name).await? {
            None => {
                // The lifetime of a sleeping sandbox ends: it sleeps on, for `timeout`.
                if reason != StopReason::Timeout {
                    return Ok(None);
                }
                let idle = self.asleep_name(name, StopReason::Idle);
                match self.rename(&idle, &asleep).await {
                    Ok(()) => {}
                    Err(e) if not_found(&e) => return Ok(None),
                    Err(e) => return Err(engine(e)),
                }
            }
            Some(_) => {
                if reason == StopReason::Idle
                    && self.life.touched(name).is_some_and(|t| t > idle_since)
                {
                    return Ok(None);
                }
                self.remove_asleep(name).await?;
                // Renamed first: from now on requests find it asleep (and wait for the lock).
                self.rename(&object, &asleep).await.map_err(engine)?;
                let stop = StopContainerOptionsBuilder::new().t(10).build();
                match self.docker.stop_container(&asleep, Some(stop)).await {
                    Ok(()) => {}
                    Err(DockerError::DockerResponseServerError {
                        status_code: 304, ..
                    }) => {}
                    Err(e) => return Err(engine(e)),
                }
            }
        }
        tracing::info!(sandbox = %name, reason = reason_suffix(reason), "sandbox asleep");
        let kept = self.inspect(&asleep).await?;
        Ok(Some(self.summary_asleep(
            &record,
            None,
            kept.as_ref().map(|c| (reason, c)),
        )))
    }

    /// Wakes sandbox `record` when it sleeps for being idle (the caller holds its lock):
    /// its container renamed back and started. False when it does not sleep so.
    pub(super) async fn wake_asleep(&self, record: &Record) -> Result<bool> {
        let idle = self.asleep_name(&record.name, StopReason::Idle);
        let object = self.object_name(&record.name);
        match self.rename(&idle, &object).await {
            Ok(()) => {}
            Err(e) if not_found(&e) => return Ok(false),
            Err(e) => return Err(engine(e)),
        }
        self.life.touch(&record.name);
        self.start_and_wait(&object, &record.name).await?;
        Ok(true)
    }

    /// Who owns the claimed pooled container `id` now named for sandbox `name`.
    pub(super) async fn claimed_owner(
        &self,
        id: &str,
        name: &str,
    ) -> Result<Option<(String, String, String)>> {
        if let Some(owner) = lock(&self.life.owners).get(id) {
            return Ok(Some(owner.clone()));
        }
        let Some(record) = self.record(name).await? else {
            return Ok(None);
        };
        let owner = (record.namespace, record.template.mode, record.template.name);
        let mut owners = lock(&self.life.owners);
        if owners.len() >= MAX_TRACKED {
            owners.clear();
        }
        owners.insert(id.to_owned(), owner.clone());
        Ok(Some(owner))
    }

    fn pool_prefix(&self, state: &str) -> String {
        format!("agentbox-{}.{state}-", self.scope)
    }

    /// Claims a ready pooled sandbox of `spec`'s template for `spec.name`; `None` when none
    /// is ready.
    pub(super) async fn claim(
        &self,
        spec: &crate::backend::CreateSpec,
    ) -> Result<Option<SandboxSummary>> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![
                format!("{MANAGED_BY}={MANAGER}"),
                format!("{SCOPE}={}", self.scope),
                format!("{POOL}={}", spec.template.name),
            ],
        )]);
        let pooled = self
            .docker
            .list_containers(Some(
                ListContainersOptionsBuilder::new()
                    .filters(&filters)
                    .build(),
            ))
            .await
            .map_err(engine)?;
        let prefix = self.pool_prefix("pool");
        let object = self.object_name(&spec.name);
        for c in pooled {
            let Some(pool) = c
                .names
                .iter()
                .flatten()
                .map(|n| n.trim_start_matches('/'))
                .find(|n| n.starts_with(&prefix))
            else {
                continue;
            };
            let labels = c.labels.clone().unwrap_or_default();
            let same = labels
                .get(SPEC)
                .and_then(|s| serde_json::from_str::<Template>(s).ok())
                .is_some_and(|t| t == spec.template);
            let Some(token) = labels.get(TOKEN).cloned() else {
                continue;
            };
            if !same || c.state != Some(ContainerSummaryStateEnum::RUNNING) {
                continue;
            }
            let renamed = {
                let _one = self.life.renames.lock().await;
                self.rename(pool, &object).await
            };
            match renamed {
                Ok(()) => {}
                // Another create claimed it (or the refill retired it) first.
                Err(e) if not_found(&e) => continue,
                Err(DockerError::DockerResponseServerError {
                    status_code: 409, ..
                }) => return Err(Error::AlreadyExists(spec.name.clone())),
                Err(e) => return Err(engine(e)),
            }
            let record = Record {
                name: spec.name.clone(),
                namespace: spec.namespace.clone(),
                template: spec.template.clone(),
                created_at: now_rfc3339(),
                created_by: spec.created_by.clone(),
                token,
                timeout: spec.timeout.clone(),
                idle_timeout: spec.idle_timeout.clone(),
                cloned_from: None,
                workspace: Some(pool.to_owned()),
            };
            if let Err(e) = self.make_volume(&record).await {
                // The name was taken meanwhile: the claimed container goes (by its id, so
                // that another sandbox's is never touched).
                if let Some(id) = &c.id {
                    let _ = self.remove_object(id, 0).await;
                }
                if let Some(net) = &self.net {
                    net.stop(pool);
                }
                let _ = self
                    .docker
                    .remove_volume(pool, None::<RemoveVolumeOptions>)
                    .await;
                return Err(e);
            }
            let container = self.container(&spec.name).await?;
            return Ok(Some(self.summary(&record, container.as_ref())));
        }
        Ok(None)
    }

    /// Retires pooled sandboxes that are gone, too old, of an older template or more than
    /// the size, and starts new ones until each pool has its size.
    pub(super) async fn refill(&self, templates: &[Template]) -> Result<()> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![
                format!("{MANAGED_BY}={MANAGER}"),
                format!("{SCOPE}={}", self.scope),
                POOL.to_string(),
            ],
        )]);
        let listed = self
            .docker
            .list_containers(Some(
                ListContainersOptionsBuilder::new()
                    .all(true)
                    .filters(&filters)
                    .build(),
            ))
            .await
            .map_err(engine)?;
        let (pool, warming, retiring) = (
            self.pool_prefix("pool"),
            self.pool_prefix("warming"),
            self.pool_prefix("retiring"),
        );
        let now = SystemTime::now();
        let mut ready: HashMap<&str, u32> = HashMap::new();
        let mut retire = Vec::new();
        for c in &listed {
            let Some(name) = c.names.iter().flatten().next() else {
                continue;
            };
            let name = name.trim_start_matches('/');
            let age = c
                .created
                .and_then(|at| u64::try_from(at).ok())
                .and_then(|at| {
                    now.duration_since(SystemTime::UNIX_EPOCH + Duration::from_secs(at))
                        .ok()
                })
                .unwrap_or_default();
            let labels = c.labels.clone().unwrap_or_default();
            let template = templates.iter().find(|t| {
                Some(&t.name) == labels.get(POOL)
                    && t.warm_pool.as_ref().is_some_and(|p| p.size > 0)
                    && labels
                        .get(SPEC)
                        .and_then(|s| serde_json::from_str::<Template>(s).ok())
                        .is_some_and(|spec| spec == **t)
            });
            if let Some(hex) = name.strip_prefix(&retiring) {
                retire.push((name.to_owned(), hex.to_owned()));
            } else if let Some(hex) = name.strip_prefix(&warming) {
                match template {
                    // Another replica's start in progress.
                    Some(t) if age < WARMING_LEFTOVER => *ready.entry(&t.name).or_default() += 1,
                    _ => retire.push((name.to_owned(), hex.to_owned())),
                }
            } else if let Some(hex) = name.strip_prefix(&pool) {
                let keep = template.is_some_and(|t| {
                    let p = t.warm_pool.as_ref().expect("filtered on");
                    let old = p
                        .max_age
                        .as_deref()
                        .and_then(|a| crate::lifecycle::parse_duration(a).ok())
                        .is_some_and(|max| age > max);
                    !old && c.state == Some(ContainerSummaryStateEnum::RUNNING)
                        && ready.get(t.name.as_str()).copied().unwrap_or(0) < p.size
                });
                if let (true, Some(t)) = (keep, template) {
                    *ready.entry(&t.name).or_default() += 1;
                    continue;
                }
                // Renamed first, so that no create claims it meanwhile; a 404 means one did.
                let to = format!("{retiring}{hex}");
                let renamed = {
                    let _one = self.life.renames.lock().await;
                    self.rename(name, &to).await
                };
                if renamed.is_ok() {
                    retire.push((to, hex.to_owned()));
                }
            }
        }
        for (object, hex) in retire {
            self.remove_object(&object, 0).await?;
            if let Some(net) = &self.net {
                net.stop(&format!("{pool}{hex}"));
            }
            let _ = self
                .docker
                .remove_volume(&format!("{pool}{hex}"), None::<RemoveVolumeOptions>)
                .await;
        }
        let mut result = Ok(());
        for t in templates {
            let Some(p) = t.warm_pool.as_ref().filter(|p| p.size > 0) else {
                continue;
            };
            let mut have = ready.get(t.name.as_str()).copied().unwrap_or(0);
            while have < p.size {
                if let Err(e) = self.start_pooled(t).await {
                    result = Err(e);
                    break;
                }
                have += 1;
                lock(&self.life.ready).insert(t.name.clone(), have);
            }
            lock(&self.life.ready).insert(t.name.clone(), have);
        }
        result
    }

    /// Starts one pooled sandbox of template `t`: volume, container (as `.warming-`),
    /// runner answering, renamed `.pool-`.
    async fn start_pooled(&self, t: &Template) -> Result<()> {
        let hex = random_hex(8);
        let volume = format!("{}{hex}", self.pool_prefix("pool"));
        let warming = format!("{}{hex}", self.pool_prefix("warming"));
        let spec = serde_json::to_string(t).map_err(|e| Error::Internal(e.to_string()))?;
        let record = Record {
            name: format!("pool-{hex}"),
            namespace: String::new(),
            template: t.clone(),
            created_at: now_rfc3339(),
            created_by: agentbox_proto::CreatedBy {
                email: None,
                display_name: None,
            },
            token: random_hex(32),
            timeout: None,
            idle_timeout: None,
            cloned_from: None,
            workspace: Some(volume.clone()),
        };
        let mut labels = HashMap::from([
            (MANAGED_BY.to_string(), MANAGER.to_string()),
            (SCOPE.into(), self.scope.clone()),
            (POOL.into(), t.name.clone()),
        ]);
        self.docker
            .create_volume(VolumeCreateRequest {
                name: Some(volume.clone()),
                labels: Some(labels.clone()),
                ..Default::default()
            })
            .await
            .map_err(engine)?;
        labels.extend([
            (SPEC.to_string(), spec),
            (TOKEN.into(), record.token.clone()),
            (MODE.into(), t.mode.clone()),
            (TEMPLATE.into(), t.name.clone()),
            (CREATED_AT.into(), record.created_at.clone()),
            (STARTED_AT.into(), now_millis()),
        ]);
        let started = async {
            let body = self.container_body(&record, &record.name, labels)?;
            self.create_container_named(&warming, &record.name, body)
                .await?;
            self.start_and_wait(&warming, &record.name).await?;
            self.rename(&warming, &format!("{}{hex}", self.pool_prefix("pool")))
                .await
                .map_err(engine)
        }
        .await;
        if let Err(e) = started {
            let _ = self.remove_object(&warming, 0).await;
            if let Some(net) = &self.net {
                net.stop(&volume);
            }
            let _ = self
                .docker
                .remove_volume(&volume, None::<RemoveVolumeOptions>)
                .await;
            return Err(e);
        }
        Ok(())
    }

    /// Creates sandbox `name` as a copy of `source` (see the module's documentation).
    pub(super) async fn clone_from(
        &self,
        source: &str,
        name: &str,
        created_by: agentbox_proto::CreatedBy,
    ) -> Result<SandboxSummary> {
        if !valid_key(name) {
            return Err(Error::InvalidRequest(format!(
                "{name:?} is not a valid name"
            )));
        }
        let Some(src) = self.record(source).await? else {
            return Err(Error::SandboxNotFound(source.into()));
        };
        if self.record(name).await?.is_some() {
            return Err(Error::AlreadyExists(name.into()));
        }
        let record = Record {
            name: name.to_owned(),
            namespace: src.namespace.clone(),
            template: src.template.clone(),
            created_at: now_rfc3339(),
            created_by,
            token: random_hex(32),
            timeout: src.timeout.clone(),
            idle_timeout: src.idle_timeout.clone(),
            cloned_from: Some(source.to_owned()),
            workspace: None,
        };
        // A helper container, never started, mounting the source's workspace read-only.
        let helper = format!("{}.clone-source", self.object_name(name));
        let body = ContainerCreateBody {
            image: Some(
                src.template
                    .image
                    .clone()
                    .unwrap_or_else(|| self.image.clone()),
            ),
            labels: Some(HashMap::from([
                (MANAGED_BY.to_string(), MANAGER.to_string()),
                (SCOPE.into(), self.scope.clone()),
            ])),
            network_disabled: Some(true),
            host_config: Some(HostConfig {
                binds: Some(vec![format!(
                    "{}:/workspace:ro",
                    src.workspace
                        .clone()
                        .unwrap_or_else(|| self.object_name(source))
                )]),
                network_mode: Some("none".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        self.remove_object(&helper, 0).await?;
        self.create_container_named(&helper, name, body).await?;
        let made = self.create_record(&record, Some(&helper)).await;
        let _ = self.remove_object(&helper, 0).await;
        let summary = made?;
        tracing::info!(sandbox = %name, source = %source, "sandbox cloned");
        Ok(summary)
    }

    /// Streams container `from`'s `/workspace` into container `to`'s (neither runs: the
    /// engine mounts their volumes for the copy). Memory: the engine's chunks, one at a time.
    pub(super) async fn copy_workspace(&self, from: &str, to: &str) -> Result<()> {
        let tar = self
            .docker
            .download_from_container(
                from,
                Some(DownloadFromContainerOptions {
                    path: "/workspace".into(),
                }),
            )
            .map_err(std::io::Error::other);
        self.docker
            .upload_to_container(
                to,
                Some(UploadToContainerOptions {
                    path: "/".into(),
                    ..Default::default()
                }),
                bollard::body_try_stream(tar),
            )
            .await
            .map_err(|e| Error::Backend(format!("copying the workspace: {e}")))
    }
}
