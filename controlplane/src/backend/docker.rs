//! The Docker backend (single host, real isolation): every sandbox is a container from its
//! template's image on one dedicated bridge network with inter-container traffic disabled, and a
//! named volume holding its `/workspace`. The control plane reaches the runner at the
//! container's IP on port 8421, so it must run on the Docker host itself (not in a container
//! on that network: inter-container traffic is off).
//!
//! # Objects, all labelled `app.kubernetes.io/managed-by=agentbox`, `agentbox.dev/scope=<scope>`
//! and `agentbox.dev/sandbox=<name>`
//!
//! * **Volume `agentbox-<scope>-<name>`**, the record: labels `agentbox.dev/namespace`,
//!   `agentbox.dev/template`, `agentbox.dev/mode`, `agentbox.dev/created-at`,
//!   `agentbox.dev/created-by` (JSON), `agentbox.dev/spec` (the template as JSON at creation, so
//!   resume recreates the same container) and `agentbox.dev/token` (the sandbox's own runner
//!   token; whoever can read Docker's labels is root on the host anyway). Mounted at
//!   `/workspace`: stop and resume keep it, delete removes it.
//! * **Container `agentbox-<scope>-<name>`**, the runner: the template's `image` (else
//!   `--docker-image`) with its own entrypoint, which must be `agentbox-runner`; env
//!   `AGENTBOX_RUNNER_TOKEN`, `AGENTBOX_MODE`, `AGENTBOX_LISTEN=0.0.0.0:8421`,
//!   `AGENTBOX_WORKSPACE=/workspace`, `AGENTBOX_SANDBOX`, `AGENTBOX_MAX_CONCURRENT_INVOKES` and
//!   the template's `env`; the template's `runnerArgs` as its command; the template's `limits`
//!   (cpu, memory, pids) as the container's; all capabilities dropped, `no-new-privileges`.
//! * **Network `--docker-network`** (default `agentbox`), created when missing, bridge with
//!   `com.docker.network.bridge.enable_icc=false`: sandboxes cannot reach each other, the host
//!   reaches them all.
//!
//! The scope (`--docker-scope`, default `default`) separates control planes sharing an engine;
//! every query filters on it. Nothing else is kept: after a restart the control plane finds its
//! sandboxes by label.
//!
//! # Phases (read from the engine: an inspect per call, except that a running sandbox's runner
//! address is kept between requests while the engine's events say nothing changed, see
//! [`targets`])
//!
//! volume without container → `Stopped`; container running with an IP on the network →
//! `Running`; created or restarting → `Creating`; removing → `Deleting`; exited or dead →
//! `Error` (resume starts it again).
//!
//! # Lifecycle
//!
//! * create: volume (`409 already_exists` when the sandbox exists), container, start, wait
//!   (bounded by `--runner-start-timeout`) until the runner answers `/healthz`; a failure removes
//!   what was made. Creates are not serialized: the volume, made first and labelled with a
//!   fresh token, decides which of two creates of one name proceeds.
//! * stop: stop the container (the runner gets SIGTERM and cancels its invokes, SIGKILL after
//!   10 s), remove it; the volume stays.
//! * resume: remove a dead container, create and start it again from the volume's record.
//! * delete: remove the container and the volume.
//!
//! Idle stop, lifetimes, warm pools and clone are in [`lifecycle`] (its module documentation
//! names the objects and labels they add).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};

use agentbox_proto::{CreatedBy, SandboxStatus, SandboxSummary, StopReason};
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum, HealthConfig,
    HostConfig, NetworkCreateRequest, Volume, VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, ListVolumesOptionsBuilder,
    RemoveContainerOptionsBuilder, RemoveVolumeOptions, StopContainerOptionsBuilder,
};
use bollard::Docker;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::docker_net::SandboxNet;
use super::{
    display_name, now_rfc3339, random_hex, valid_key, Backend, CreateSpec, RunnerAddr, Target,
};
use crate::config::DockerConfig;
use crate::error::{Error, Result};
use crate::templates::Template;

const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
const MANAGER: &str = "agentbox";
const SCOPE: &str = "agentbox.dev/scope";
const SANDBOX: &str = "agentbox.dev/sandbox";
const NAMESPACE: &str = "agentbox.dev/namespace";
const TEMPLATE: &str = "agentbox.dev/template";
const MODE: &str = "agentbox.dev/mode";
const CREATED_AT: &str = "agentbox.dev/created-at";
const CREATED_BY: &str = "agentbox.dev/created-by";
const SPEC: &str = "agentbox.dev/spec";
const TOKEN: &str = "agentbox.dev/token";
const TIMEOUT: &str = "agentbox.dev/timeout";
const IDLE_TIMEOUT: &str = "agentbox.dev/idle-timeout";
const CLONED_FROM: &str = "agentbox.dev/cloned-from";
const WORKSPACE: &str = "agentbox.dev/workspace";
const STARTED_AT: &str = "agentbox.dev/started-at";
const POOL: &str = "agentbox.dev/pool";

mod lifecycle;
mod targets;
/// The runner's port in every sandbox container.
pub const RUNNER_PORT: u16 = 8421;

/// Sandboxes as containers on one Docker engine.
#[derive(Debug)]
pub struct DockerBackend {
    docker: Docker,
    network: String,
    image: String,
    scope: String,
    start_timeout: Duration,
    /// The control plane's state directory: the credential store, and each sandbox's
    /// credentials directory ([`DockerBackend::with_credentials`]).
    state_dir: Option<std::path::PathBuf>,
    /// Lifecycle state of this replica (activity stamps, per-sandbox locks, pool counters).
    life: lifecycle::State,
    /// `Some` under `--isolation namespaces`: containers without a network (docker_net.rs),
    /// each sandbox's directory keyed by its workspace volume ([`DockerBackend::net_key`]).
    net: Option<SandboxNet>,
    /// Running sandboxes' runner addresses, kept true by the engine's events (targets.rs).
    targets: std::sync::Arc<targets::Targets>,
}

fn engine(e: DockerError) -> Error {
    Error::Backend(format!("docker: {e}"))
}

fn not_found(e: &DockerError) -> bool {
    matches!(
        e,
        DockerError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// What the volume's labels record about a sandbox.
#[derive(Debug, Clone)]
struct Record {
    name: String,
    namespace: String,
    template: Template,
    created_at: String,
    created_by: CreatedBy,
    token: String,
    /// Its lifetime and idle timeout (Go durations).
    timeout: Option<String>,
    idle_timeout: Option<String>,
    /// The sandbox it was cloned from.
    cloned_from: Option<String>,
    /// The volume holding its workspace when it is not the record's own (a claimed pooled
    /// sandbox keeps its pool volume).
    workspace: Option<String>,
}

impl Record {
    fn from_volume(volume: &Volume) -> Option<Self> {
        let l = &volume.labels;
        Some(Self {
            name: l.get(SANDBOX)?.clone(),
            namespace: l.get(NAMESPACE)?.clone(),
            template: serde_json::from_str(l.get(SPEC)?).ok()?,
            created_at: l.get(CREATED_AT).cloned().unwrap_or_default(),
            created_by: l
                .get(CREATED_BY)
                .and_then(|t| serde_json::from_str(t).ok())
                .unwrap_or(CreatedBy {
                    email: None,
                    display_name: None,
                }),
            token: l.get(TOKEN)?.clone(),
            timeout: l.get(TIMEOUT).cloned(),
            idle_timeout: l.get(IDLE_TIMEOUT).cloned(),
            cloned_from: l.get(CLONED_FROM).cloned(),
            workspace: l.get(WORKSPACE).cloned(),
        })
    }
}

impl DockerBackend {
    /// Connects to the engine (`DOCKER_HOST`, else the local socket), agrees on an API
    /// version and makes sure the network exists.
    pub async fn connect(cfg: &DockerConfig, start_timeout: Duration) -> Result<Self, String> {
        let docker = Docker::connect_with_local_defaults()
            .map_err(|e| format!("cannot reach the Docker engine: {e}"))?
            .negotiate_version()
            .await
            .map_err(|e| format!("cannot reach the Docker engine: {e}"))?;
        let backend = Self {
            docker,
            network: cfg.network.clone(),
            image: cfg.image.clone(),
            scope: cfg.scope.clone(),
            start_timeout,
            state_dir: None,
            life: lifecycle::State::default(),
            targets: std::sync::Arc::default(),
            net: if cfg.isolated {
                Some(SandboxNet::new(cfg.run_dir.clone())?)
            } else {
                None
            },
        };
        targets::Targets::watch(
            &backend.targets,
            backend.docker.clone(),
            backend.scope.clone(),
        );
        if backend.net.is_none() {
            backend.ensure_network().await?;
        } else {
            // A restarted control plane serves its running sandboxes' proxies again.
            let sandboxes = backend
                .list()
                .await
                .map_err(|e| format!("cannot list the sandboxes: {e}"))?;
            for s in sandboxes
                .iter()
                .filter(|s| s.status == SandboxStatus::Running)
            {
                if let Err(e) = backend.serve_egress(&s.name).await {
                    tracing::warn!(sandbox = %s.name, error = %e, "cannot serve the egress proxy");
                }
            }
        }
        Ok(backend)
    }

    /// The key of a sandbox's network directory: its workspace volume, which stays the same
    /// when its container is renamed (a claimed pooled sandbox, one asleep).
    fn net_key(&self, record: &Record) -> String {
        record
            .workspace
            .clone()
            .unwrap_or_else(|| self.object_name(&record.name))
    }

    /// Serves `name`'s egress proxy unless this process already does (isolated mode only).
    async fn serve_egress(&self, name: &str) -> Result<()> {
        let Some(net) = &self.net else {
            return Ok(());
        };
        let Some(record) = self.record(name).await? else {
            return Ok(());
        };
        let key = self.net_key(&record);
        if net.is_served(&key) {
            return Ok(());
        }
        net.serve(&key, name, &record.template)
    }

    /// Stops serving the proxy of `record` and removes its directory (its container is gone).
    fn stop_net(&self, record: &Record) {
        if let Some(net) = &self.net {
            net.stop(&self.net_key(record));
        }
    }

    async fn ensure_network(&self) -> Result<(), String> {
        match self.docker.inspect_network(&self.network, None).await {
            Ok(_) => return Ok(()),
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(format!("docker network {:?}: {e}", self.network)),
        }
        let request = NetworkCreateRequest {
            name: self.network.clone(),
            driver: Some("bridge".into()),
            options: Some(HashMap::from([(
                "com.docker.network.bridge.enable_icc".to_string(),
                "false".to_string(),
            )])),
            labels: Some(HashMap::from([(
                MANAGED_BY.to_string(),
                MANAGER.to_string(),
            )])),
            ..Default::default()
        };
        match self.docker.create_network(request).await {
            Ok(_) => Ok(()),
            // Another control plane made it meanwhile.
            Err(DockerError::DockerResponseServerError {
                status_code: 409, ..
            }) => Ok(()),
            Err(e) => Err(format!(
                "cannot create docker network {:?}: {e}",
                self.network
            )),
        }
    }

    /// The container's and the volume's name.
    fn object_name(&self, sandbox: &str) -> String {
        format!("agentbox-{}-{sandbox}", self.scope)
    }

    fn filters(&self, sandbox: Option<&str>) -> HashMap<String, Vec<String>> {
        let mut labels = vec![
            format!("{MANAGED_BY}={MANAGER}"),
            format!("{SCOPE}={}", self.scope),
        ];
        if let Some(name) = sandbox {
            labels.push(format!("{SANDBOX}={name}"));
        }
        HashMap::from([("label".to_string(), labels)])
    }

    async fn record(&self, name: &str) -> Result<Option<Record>> {
        if !valid_key(name) {
            return Ok(None);
        }
        match self.docker.inspect_volume(&self.object_name(name)).await {
            Ok(volume) if volume.labels.get(SCOPE) == Some(&self.scope) => {
                Ok(Record::from_volume(&volume))
            }
            Ok(_) => Ok(None),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(engine(e)),
        }
    }

    async fn container(&self, name: &str) -> Result<Option<ContainerInspectResponse>> {
        match self
            .docker
            .inspect_container(&self.object_name(name), None)
            .await
        {
            Ok(c) => {
                // What this replica reads it trusts over what it kept (the engine's event may
                // still be on its way).
                let running = c
                    .state
                    .as_ref()
                    .and_then(|s| s.status)
                    .is_some_and(|s| s == ContainerStateStatusEnum::RUNNING);
                if !running {
                    self.targets.forget(name);
                }
                Ok(Some(c))
            }
            Err(e) if not_found(&e) => {
                self.targets.forget(name);
                Ok(None)
            }
            Err(e) => Err(engine(e)),
        }
    }

    /// Phase, message and runner address of a container (or of its absence).
    fn phase(
        &self,
        container: Option<&ContainerInspectResponse>,
    ) -> (SandboxStatus, Option<String>, Option<RunnerAddr>) {
        let Some(c) = container else {
            return (SandboxStatus::Stopped, None, None);
        };
        let state = c.state.as_ref();
        let ip: Option<IpAddr> = c
            .network_settings
            .as_ref()
            .and_then(|n| n.networks.as_ref())
            .and_then(|n| n.get(&self.network))
            .and_then(|e| e.ip_address.as_deref())
            .and_then(|ip| ip.parse().ok());
        match state.and_then(|s| s.status) {
            // Isolated: the runner's socket is in the directory mounted at /run/agentbox.
            Some(ContainerStateStatusEnum::RUNNING) if self.net.is_some() => {
                let socket = c
                    .mounts
                    .iter()
                    .flatten()
                    .find(|m| m.destination.as_deref() == Some(super::docker_net::RUN_MOUNT))
                    .and_then(|m| m.source.as_deref())
                    .map(|dir| std::path::Path::new(dir).join(super::docker_net::RUNNER_SOCKET));
                (SandboxStatus::Running, None, socket.map(RunnerAddr::unix))
            }
            Some(ContainerStateStatusEnum::RUNNING) => match ip {
                Some(ip) => (
                    SandboxStatus::Running,
                    None,
                    Some(RunnerAddr::Tcp(SocketAddr::new(ip, RUNNER_PORT))),
                ),
                None => (
                    SandboxStatus::Error,
                    Some(format!(
                        "the container has no address on {:?}",
                        self.network
                    )),
                    None,
                ),
            },
            Some(ContainerStateStatusEnum::CREATED | ContainerStateStatusEnum::RESTARTING) => {
                (SandboxStatus::Creating, None, None)
            }
            Some(ContainerStateStatusEnum::REMOVING) => (SandboxStatus::Deleting, None, None),
            _ => {
                let code = state.and_then(|s| s.exit_code).unwrap_or(-1);
                let oom = state.and_then(|s| s.oom_killed).unwrap_or(false);
                (
                    SandboxStatus::Error,
                    Some(format!(
                        "the container exited (code {code}{}); resume starts it again",
                        if oom { ", out of memory" } else { "" }
                    )),
                    None,
                )
            }
        }
    }

    fn summary(
        &self,
        record: &Record,
        container: Option<&ContainerInspectResponse>,
    ) -> SandboxSummary {
        self.summary_asleep(record, container, None)
    }

    /// The summary of a sandbox whose container is `container`, or (none) asleep for
    /// `asleep` (its container kept under a name of its own, see [`lifecycle`]).
    fn summary_asleep(
        &self,
        record: &Record,
        container: Option<&ContainerInspectResponse>,
        asleep: Option<(StopReason, &ContainerInspectResponse)>,
    ) -> SandboxSummary {
        let (status, message, _) = self.phase(container);
        let stop_reason = match (status, asleep) {
            (SandboxStatus::Stopped, Some((reason, _))) => Some(reason),
            (SandboxStatus::Stopped, None) => Some(StopReason::User),
            _ => None,
        };
        let expires_at = match (status, stop_reason) {
            (SandboxStatus::Running, _) => self.expires_at(record, container),
            (_, Some(StopReason::Idle)) => self.expires_at(record, asleep.map(|(_, c)| c)),
            _ => None,
        };
        SandboxSummary {
            sandbox_id: record.name.clone(),
            name: record.name.clone(),
            namespace: record.namespace.clone(),
            status,
            mode: record.template.mode.clone(),
            template_ref: Some(record.template.name.clone()),
            pod_name: container
                .filter(|_| status == SandboxStatus::Running)
                .map(|_| self.object_name(&record.name)),
            pvc_name: Some(self.object_name(&record.name)),
            created_at: Some(record.created_at.clone()),
            created_by: Some(record.created_by.clone()),
            message,
            // Under `--isolation none` the container reaches the host and the networks it
            // reaches: not isolated as the threat model means it.
            isolated: self.net.is_some(),
            limits_enforced: None,
            stop_reason,
            timeout: record.timeout.clone(),
            idle_timeout: record.idle_timeout.clone(),
            expires_at: expires_at.map(|t| humantime::format_rfc3339_millis(t).to_string()),
            cloned_from: record.cloned_from.clone(),
            from_warm_pool: None,
            last_activity_at: self
                .last_activity(record, container)
                .map(|t| humantime::format_rfc3339_millis(t).to_string()),
        }
    }

    fn labels(&self, record: &Record) -> HashMap<String, String> {
        HashMap::from([
            (MANAGED_BY.into(), MANAGER.into()),
            (SCOPE.into(), self.scope.clone()),
            (SANDBOX.into(), record.name.clone()),
            (NAMESPACE.into(), record.namespace.clone()),
            (TEMPLATE.into(), record.template.name.clone()),
            (MODE.into(), record.template.mode.clone()),
        ])
    }

    /// Creates the volume that records `record` (labels: the record; `409 already_exists`
    /// when the name is taken, here or by another control plane's concurrent create).
    async fn make_volume(&self, record: &Record) -> Result<()> {
        let mut labels = self.labels(record);
        labels.insert(CREATED_AT.into(), record.created_at.clone());
        labels.insert(
            CREATED_BY.into(),
            serde_json::to_string(&record.created_by)
                .map_err(|e| Error::Internal(e.to_string()))?,
        );
        labels.insert(
            SPEC.into(),
            serde_json::to_string(&record.template).map_err(|e| Error::Internal(e.to_string()))?,
        );
        labels.insert(TOKEN.into(), record.token.clone());
        for (key, value) in [
            (TIMEOUT, &record.timeout),
            (IDLE_TIMEOUT, &record.idle_timeout),
            (CLONED_FROM, &record.cloned_from),
            (WORKSPACE, &record.workspace),
        ] {
            if let Some(value) = value {
                labels.insert(key.into(), value.clone());
            }
        }
        let made = match self
            .docker
            .create_volume(VolumeCreateRequest {
                name: Some(self.object_name(&record.name)),
                labels: Some(labels),
                ..Default::default()
            })
            .await
        {
            Ok(made) => made,
            Err(DockerError::DockerResponseServerError {
                status_code: 409, ..
            }) => return Err(Error::AlreadyExists(record.name.clone())),
            Err(e) => return Err(engine(e)),
        };
        // Creating an existing volume returns it: another control plane won the race for the
        // name, and nothing of its sandbox may be touched.
        if made.labels.get(TOKEN) != Some(&record.token) {
            return Err(Error::AlreadyExists(record.name.clone()));
        }
        Ok(())
    }

    /// Makes `record`'s volume and starts its container; a failure removes what was made.
    /// A clone's workspace is copied from container `copy_from` between its container's
    /// create and its start.
    async fn create_record(
        &self,
        record: &Record,
        copy_from: Option<&str>,
    ) -> Result<SandboxSummary> {
        self.make_volume(record).await?;
        let volume = self.object_name(&record.name);
        if let Some(net) = &self.net {
            // What an earlier sandbox of this name may have left (a crash).
            net.reset(&self.net_key(record));
        }
        let started = async {
            let mut labels = self.labels(record);
            labels.insert(STARTED_AT.into(), lifecycle::now_millis());
            let body = self.container_body(
                record,
                display_name(&record.name, &record.namespace),
                labels,
            )?;
            self.create_container_named(&volume, &record.name, body)
                .await?;
            if let Some(from) = copy_from {
                self.copy_workspace(from, &volume).await?;
            }
            self.start_and_wait(&volume, &record.name).await
        }
        .await;
        if let Err(e) = started {
            if !matches!(e, Error::AlreadyExists(_)) {
                // A create that failed leaves nothing behind: the name can be used again.
                let _ = self.remove_container(&record.name, 0).await;
                self.remove_credentials(&record.name);
                self.stop_net(record);
            }
            // A container of that name that is someone else's is left alone (the volume
            // cannot be removed while it is mounted there).
            let _ = self
                .docker
                .remove_volume(&volume, None::<RemoveVolumeOptions>)
                .await;
            return Err(e);
        }
        tracing::info!(sandbox = %record.name, "sandbox created");
        let container = self.container(&record.name).await?;
        Ok(self.summary(record, container.as_ref()))
    }

    /// Creates and starts the container of `record` and waits until its runner answers.
    async fn start(&self, record: &Record) -> Result<()> {
        let object = self.object_name(&record.name);
        let mut labels = self.labels(record);
        labels.insert(STARTED_AT.into(), lifecycle::now_millis());
        let body = self.container_body(
            record,
            display_name(&record.name, &record.namespace),
            labels,
        )?;
        self.create_container_named(&object, &record.name, body)
            .await?;
        self.start_and_wait(&object, &record.name).await
    }

    /// The container of `record`: hostname and `AGENTBOX_SANDBOX` are `host`, its workspace
    /// the record's volume.
    fn container_body(
        &self,
        record: &Record,
        host: &str,
        labels: HashMap<String, String>,
    ) -> Result<ContainerCreateBody> {
        let t = &record.template;
        let limits = t.limits.clone().unwrap_or_default();
        let mut env = match &self.net {
            Some(_) => SandboxNet::env(),
            None => vec![format!("AGENTBOX_LISTEN=0.0.0.0:{RUNNER_PORT}")],
        };
        env.extend(t.env.iter().map(|(k, v)| format!("{k}={v}")));
        env.extend(memory_events(limits.memory.is_some()));
        env.extend([
            format!("AGENTBOX_RUNNER_TOKEN={}", record.token),
            format!("AGENTBOX_MODE={}", t.mode),
            "AGENTBOX_WORKSPACE=/workspace".into(),
            format!("AGENTBOX_SANDBOX={host}"),
        ]);
        if let Some(n) = t.max_concurrent_invokes {
            env.push(format!("AGENTBOX_MAX_CONCURRENT_INVOKES={n}"));
        }
        let volume = record
            .workspace
            .clone()
            .unwrap_or_else(|| self.object_name(&record.name));
        let mut binds = vec![format!("{volume}:/workspace")];
        if let Some(net) = &self.net {
            // The container about to be made gets its proxy served first (replacing one
            // served before for this workspace).
            net.serve(&volume, host, t)?;
            binds.push(net.bind(&volume));
        }
        if let Some(dir) = self.write_credentials(record, true)? {
            let inside = crate::credentials::INSIDE_DIR;
            binds.push(format!("{}:{inside}:ro", dir.display()));
            env.push(format!(
                "AGENTBOX_CREDENTIALS_ENV={inside}/{}",
                crate::credentials::ENV_FILE
            ));
            env.push(format!("AGENTBOX_CREDENTIALS_DIR={inside}"));
        }
        Ok(ContainerCreateBody {
            image: Some(t.image.clone().unwrap_or_else(|| self.image.clone())),
            env: Some(env),
            cmd: (!t.runner_args.is_empty()).then(|| t.runner_args.clone()),
            labels: Some(labels),
            hostname: Some(host.to_owned()),
            // An image's own HEALTHCHECK may probe a TCP port the runner no longer listens
            // on; the control plane asks /healthz itself.
            healthcheck: self.net.as_ref().map(|_| HealthConfig {
                test: Some(vec!["NONE".into()]),
                ..Default::default()
            }),
            host_config: Some(HostConfig {
                binds: Some(binds),
                network_mode: Some(if self.net.is_some() {
                    "none".into()
                } else {
                    self.network.clone()
                }),
                nano_cpus: limits.nano_cpus().map_err(Error::InvalidRequest)?,
                memory: limits.memory_bytes().map_err(Error::InvalidRequest)?,
                pids_limit: limits.pids.map(i64::from),
                cap_drop: Some(vec!["ALL".into()]),
                security_opt: Some(vec!["no-new-privileges".into()]),
                init: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    /// Creates (does not start) container `object` of sandbox `sandbox`.
    async fn create_container_named(
        &self,
        object: &str,
        sandbox: &str,
        body: ContainerCreateBody,
    ) -> Result<()> {
        let options = CreateContainerOptionsBuilder::new().name(object).build();
        self.docker
            .create_container(Some(options), body)
            .await
            .map_err(|e| match e {
                DockerError::DockerResponseServerError {
                    status_code: 404,
                    message,
                } => Error::Backend(format!("sandbox {sandbox:?}: {message}")),
                DockerError::DockerResponseServerError {
                    status_code: 409, ..
                } => Error::AlreadyExists(sandbox.to_owned()),
                e => engine(e),
            })?;
        Ok(())
    }

    /// Starts container `object` (a no-op when it runs) and waits, bounded by the runner
    /// start timeout, until its runner answers `/healthz`.
    async fn start_and_wait(&self, object: &str, sandbox: &str) -> Result<()> {
        match self.docker.start_container(object, None).await {
            Ok(()) => {}
            // 304: it runs already.
            Err(DockerError::DockerResponseServerError {
                status_code: 304, ..
            }) => {}
            Err(e) => return Err(engine(e)),
        }
        let deadline = Instant::now() + self.start_timeout;
        loop {
            let container = match self.docker.inspect_container(object, None).await {
                Ok(c) => Some(c),
                Err(e) if not_found(&e) => None,
                Err(e) => return Err(engine(e)),
            };
            let (status, message, addr) = self.phase(container.as_ref());
            match (status, addr) {
                (SandboxStatus::Running, Some(addr)) if healthy(&addr).await => return Ok(()),
                (SandboxStatus::Running | SandboxStatus::Creating, _)
                    if Instant::now() < deadline => {}
                _ => {
                    return Err(Error::Backend(format!(
                        "sandbox {sandbox:?}: the runner did not start: {}",
                        message.unwrap_or_else(|| "it did not answer /healthz in time".into())
                    )))
                }
            }
            // The runner binds within milliseconds of the container's start: poll often.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops (SIGTERM, SIGKILL after `grace`) and removes the container, if any.
    async fn remove_container(&self, name: &str, grace: i32) -> Result<()> {
        self.targets.forget(name);
        self.remove_object(&self.object_name(name), grace).await
    }

    /// Stops (SIGTERM, SIGKILL after `grace`) and removes container `object`, if any.
    async fn remove_object(&self, object: &str, grace: i32) -> Result<()> {
        let object = object.to_owned();
        if grace > 0 {
            let stop = StopContainerOptionsBuilder::new().t(grace).build();
            match self.docker.stop_container(&object, Some(stop)).await {
                Ok(()) => {}
                Err(e) if not_found(&e) => return Ok(()),
                // 304: already stopped.
                Err(DockerError::DockerResponseServerError {
                    status_code: 304, ..
                }) => {}
                Err(e) => return Err(engine(e)),
            }
        }
        let remove = RemoveContainerOptionsBuilder::new().force(true).build();
        match self.docker.remove_container(&object, Some(remove)).await {
            Ok(()) => Ok(()),
            Err(e) if not_found(&e) => Ok(()),
            Err(e) => Err(engine(e)),
        }
    }
}

/// `AGENTBOX_OOM_EVENTS` for a container with a memory limit: its cgroup's memory-kill counter
/// as the container sees it (cgroup v2 or v1, as on this host), so that an invoke killed by
/// the limit ends with reason `memory_limit`; and its children die before the runner.
fn memory_events(limited: bool) -> Vec<String> {
    if !limited {
        return Vec::new();
    }
    let file = if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "/sys/fs/cgroup/memory.events"
    } else {
        "/sys/fs/cgroup/memory/memory.oom_control"
    };
    vec![
        format!("AGENTBOX_OOM_EVENTS={file}"),
        "AGENTBOX_CHILDREN_OOM_FIRST=true".into(),
    ]
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for S {}

/// Whether the runner at `addr` answers `GET /healthz` with 200 within a second.
async fn healthy(addr: &RunnerAddr) -> bool {
    let probe = async {
        let mut stream: Box<dyn Stream> = match addr {
            RunnerAddr::Tcp(a) => Box::new(tokio::net::TcpStream::connect(a).await.ok()?),
            RunnerAddr::Unix { unix } => {
                Box::new(tokio::net::UnixStream::connect(unix).await.ok()?)
            }
        };
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: runner\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.ok()?;
        Some(head.starts_with(b"HTTP/1.1 200"))
    };
    tokio::time::timeout(Duration::from_secs(1), probe)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// Credentials (crate::credentials): a sandbox that references any has a host directory,
/// `<state-dir>/docker-credentials/<scope>/<sandbox>/` (its parents 0700), bind-mounted
/// read-only at `/run/credentials`; files 0444 there, as the image's `USER` is not known; only
/// the container reaches them through the mount. The runner reads `.env.json` from it for
/// every process (`AGENTBOX_CREDENTIALS_ENV`): no value is in the container's config, its
/// environment as `docker inspect` shows it, or a label.
impl DockerBackend {
    /// Uses `state_dir`'s credential store (without it, a create with credentials is refused).
    pub fn with_credentials(mut self, state_dir: &std::path::Path) -> Self {
        self.state_dir = Some(state_dir.to_owned());
        self
    }

    fn credentials_dir(&self, sandbox: &str) -> Option<std::path::PathBuf> {
        self.state_dir
            .as_ref()
            .map(|d| d.join("docker-credentials").join(&self.scope).join(sandbox))
    }

    /// Writes the credentials directory of `record` (`strict`: at a start, every credential
    /// must exist); `Some(dir)` to mount when it references any.
    fn write_credentials(
        &self,
        record: &Record,
        strict: bool,
    ) -> Result<Option<std::path::PathBuf>> {
        let refs = &record.template.credentials;
        let (Some(state_dir), Some(dir)) = (&self.state_dir, self.credentials_dir(&record.name))
        else {
            if refs.is_empty() {
                return Ok(None);
            }
            return Err(Error::Backend(
                "this Docker backend has no credential store".into(),
            ));
        };
        if let Some(parent) = dir.parent() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::create_dir_all(parent)?;
            for d in [parent, parent.parent().unwrap_or(parent)] {
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))?;
            }
        }
        let owner = crate::credentials::Owner {
            uid: None,
            mode: 0o444,
        };
        let written =
            crate::credentials::write_dir(state_dir, &record.namespace, refs, &dir, owner, strict)?;
        Ok(written.then_some(dir))
    }

    fn remove_credentials(&self, sandbox: &str) {
        if let Some(dir) = self.credentials_dir(sandbox) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[async_trait::async_trait]
impl Backend for DockerBackend {
    async fn list(&self) -> Result<Vec<SandboxSummary>> {
        let volumes = self
            .docker
            .list_volumes(Some(
                ListVolumesOptionsBuilder::new()
                    .filters(&self.filters(None))
                    .build(),
            ))
            .await
            .map_err(engine)?
            .volumes
            .unwrap_or_default();
        let containers = self
            .docker
            .list_containers(Some(
                ListContainersOptionsBuilder::new()
                    .all(true)
                    .filters(&self.filters(None))
                    .build(),
            ))
            .await
            .map_err(engine)?;
        // Containers by name: a claimed pooled sandbox's carries no sandbox label.
        let names: std::collections::HashSet<String> = containers
            .iter()
            .flat_map(|c| c.names.iter().flatten())
            .map(|n| n.trim_start_matches('/').to_owned())
            .collect();
        let mut out = Vec::new();
        for volume in &volumes {
            let Some(record) = Record::from_volume(volume) else {
                continue;
            };
            let object = self.object_name(&record.name);
            // The summary's phase needs the container's network settings: inspect it.
            let container = if names.contains(&object) {
                self.container(&record.name).await?
            } else {
                None
            };
            let asleep = if container.is_none() {
                self.asleep_among(&record.name, &names).await?
            } else {
                None
            };
            out.push(self.summary_asleep(
                &record,
                container.as_ref(),
                asleep.as_ref().map(|(r, c)| (*r, c)),
            ));
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn get(&self, name: &str) -> Result<Option<SandboxSummary>> {
        let Some(record) = self.record(name).await? else {
            return Ok(None);
        };
        let container = self.container(name).await?;
        let asleep = if container.is_none() {
            self.asleep(name).await?
        } else {
            None
        };
        Ok(Some(self.summary_asleep(
            &record,
            container.as_ref(),
            asleep.as_ref().map(|(r, c)| (*r, c)),
        )))
    }

    async fn create(&self, spec: CreateSpec) -> Result<SandboxSummary> {
        if !valid_key(&spec.name) {
            return Err(Error::InvalidRequest(format!(
                "{:?} is not a valid name",
                spec.name
            )));
        }
        // A stopped container is renamed `<object>.<reason>`: the key `<name>.<namespace>` of
        // a namespace named like a reason would take another sandbox's stopped name.
        if let Some((_, namespace)) = spec.name.split_once('.') {
            if ["idle", "timeout", "stopped"].contains(&namespace) {
                return Err(Error::InvalidRequest(format!(
                    "namespace {namespace:?} cannot hold sandboxes on the Docker backend (its \
                     name is a stop reason in the engine's container names)"
                )));
            }
        }
        // No lock: creates run side by side (one waiting for a slow image's /healthz delays no
        // other). Two creates of one name, here or in another replica, are told apart by the
        // volume's token label below: only the create that made the volume goes on.
        if self.record(&spec.name).await?.is_some() {
            return Err(Error::AlreadyExists(spec.name));
        }
        let pooled = spec.template.warm_pool.as_ref().is_some_and(|p| p.size > 0);
        if pooled {
            if let Some(mut summary) = self.claim(&spec).await? {
                self.life.count(&spec.template.name, true);
                tracing::info!(sandbox = %spec.name, "sandbox created from the warm pool");
                summary.from_warm_pool = Some(true);
                return Ok(summary);
            }
            self.life.count(&spec.template.name, false);
        }
        let record = Record {
            name: spec.name,
            namespace: spec.namespace,
            template: spec.template,
            created_at: now_rfc3339(),
            created_by: spec.created_by,
            token: random_hex(32),
            timeout: spec.timeout,
            idle_timeout: spec.idle_timeout,
            cloned_from: None,
            workspace: None,
        };
        let mut summary = self.create_record(&record, None).await?;
        summary.from_warm_pool = pooled.then_some(false);
        Ok(summary)
    }

    async fn delete(&self, name: &str) -> Result<()> {
        let Some(record) = self.record(name).await? else {
            return Err(Error::SandboxNotFound(name.into()));
        };
        self.remove_container(name, 0).await?;
        self.remove_asleep(name).await?;
        let object = self.object_name(name);
        for volume in [Some(object.clone()), record.workspace.clone()]
            .into_iter()
            .flatten()
        {
            match self
                .docker
                .remove_volume(&volume, None::<RemoveVolumeOptions>)
                .await
            {
                Ok(()) => {}
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(engine(e)),
            }
        }
        self.remove_credentials(name);
        self.stop_net(&record);
        self.life.forget(name);
        tracing::info!(sandbox = %name, "sandbox deleted");
        Ok(())
    }

    async fn stop(&self, name: &str) -> Result<SandboxSummary> {
        let Some(record) = self.record(name).await? else {
            return Err(Error::SandboxNotFound(name.into()));
        };
        let _guard = self.life.lock(name).await;
        self.remove_container(name, 10).await?;
        self.remove_asleep(name).await?;
        self.stop_net(&record);
        Ok(self.summary(&record, None))
    }

    async fn resume(&self, name: &str) -> Result<SandboxSummary> {
        let Some(record) = self.record(name).await? else {
            return Err(Error::SandboxNotFound(name.into()));
        };
        let _guard = self.life.lock(name).await;
        let container = self.container(name).await?;
        if let (SandboxStatus::Running, _, Some(addr)) = self.phase(container.as_ref()) {
            if healthy(&addr).await {
                self.serve_egress(name).await?;
                return Ok(self.summary(&record, container.as_ref()));
            }
        }
        if container.is_none() && self.wake_asleep(&record).await? {
            self.serve_egress(name).await?;
            let container = self.container(name).await?;
            return Ok(self.summary(&record, container.as_ref()));
        }
        self.remove_container(name, 0).await?;
        self.remove_asleep(name).await?;
        self.start(&record).await?;
        let container = self.container(name).await?;
        Ok(self.summary(&record, container.as_ref()))
    }

    async fn credentials_changed(&self, namespace: &str, name: &str) -> Result<()> {
        let Some(root) = self
            .credentials_dir("x")
            .and_then(|d| d.parent().map(Into::into))
        else {
            return Ok(());
        };
        let root: std::path::PathBuf = root;
        let Ok(entries) = std::fs::read_dir(&root) else {
            return Ok(());
        };
        let sandboxes: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .filter(|n| valid_key(n))
            .collect();
        for sandbox in sandboxes {
            let Some(record) = self.record(&sandbox).await? else {
                continue;
            };
            if record.namespace == namespace
                && crate::credentials::references(&record.template.credentials, name)
            {
                if let Err(e) = self.write_credentials(&record, false) {
                    tracing::warn!(sandbox = %sandbox, "cannot rewrite credentials: {e}");
                }
            }
        }
        Ok(())
    }

    async fn stop_for(
        &self,
        name: &str,
        reason: StopReason,
        idle_since: SystemTime,
    ) -> Result<Option<SandboxSummary>> {
        self.sleep(name, reason, idle_since).await
    }

    async fn expire(&self, name: &str) -> Result<()> {
        let Some(record) = self.record(name).await? else {
            return Err(Error::SandboxNotFound(name.into()));
        };
        match record.template.on_timeout.unwrap_or_default() {
            crate::templates::OnTimeout::Delete => self.delete(name).await,
            crate::templates::OnTimeout::Stop => self
                .sleep(name, StopReason::Timeout, SystemTime::now())
                .await
                .map(|_| ()),
        }
    }

    fn keeps_lifecycle(&self) -> bool {
        true
    }

    fn touch(&self, name: &str) {
        self.life.touch(name);
    }

    async fn refill_pools(&self, templates: &[Template]) -> Result<()> {
        self.refill(templates).await
    }

    fn warm_pools(&self, templates: &[Template]) -> Vec<agentbox_proto::WarmPoolInfo> {
        self.life.pools(templates)
    }

    async fn clone_sandbox(
        &self,
        source: &str,
        name: &str,
        created_by: CreatedBy,
    ) -> Result<SandboxSummary> {
        self.clone_from(source, name, created_by).await
    }

    async fn resolve(&self, name: &str) -> Result<Option<Target>> {
        if !valid_key(name) {
            return Ok(None);
        }
        if let Some(target) = self.targets.get(name) {
            return Ok(Some(target));
        }
        let container = self.container(name).await?;
        let target = self.resolve_from(name, container.as_ref()).await?;
        if let (Some(t), Some(id)) = (&target, container.as_ref().and_then(|c| c.id.as_deref())) {
            if t.status == SandboxStatus::Running {
                self.targets.put(name, id, t);
            }
        }
        Ok(target)
    }
}

impl DockerBackend {
    /// [`Backend::resolve`] from an inspect of `name`'s container (`None`: there is none).
    async fn resolve_from(
        &self,
        name: &str,
        container: Option<&ContainerInspectResponse>,
    ) -> Result<Option<Target>> {
        // A running container carries everything; otherwise the volume says whether it exists.
        let labels = container
            .as_ref()
            .and_then(|c| c.config.as_ref())
            .and_then(|c| c.labels.clone())
            .filter(|l| l.get(SCOPE) == Some(&self.scope));
        let token_from_env = container
            .as_ref()
            .and_then(|c| c.config.as_ref())
            .and_then(|c| c.env.as_ref())
            .and_then(|env| {
                env.iter()
                    .find_map(|kv| kv.strip_prefix("AGENTBOX_RUNNER_TOKEN="))
                    .map(str::to_owned)
            });
        let (status, _, addr) = self.phase(container);
        let addr = addr.unwrap_or_else(|| RunnerAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 0))));
        if let (Some(net), SandboxStatus::Running, Some(_)) = (&self.net, status, &labels) {
            // After a restart of this process: serve the proxy again (a map lookup otherwise).
            let workspace = container
                .as_ref()
                .and_then(|c| c.mounts.as_ref())
                .and_then(|m| {
                    m.iter()
                        .find(|m| m.destination.as_deref() == Some("/workspace"))
                })
                .and_then(|m| m.name.clone());
            if !workspace.is_some_and(|w| net.is_served(&w)) {
                self.serve_egress(name).await?;
            }
        }
        match (labels, token_from_env) {
            // A claimed pooled sandbox's container is labelled with its pool: its record says
            // the rest (read once per container).
            (Some(labels), Some(token)) if labels.contains_key(POOL) => {
                let id = container
                    .as_ref()
                    .and_then(|c| c.id.clone())
                    .unwrap_or_default();
                let Some((namespace, mode, template)) = self.claimed_owner(&id, name).await? else {
                    return Ok(None);
                };
                Ok(Some(Target {
                    addr,
                    token,
                    status,
                    mode,
                    namespace,
                    template,
                    stop_reason: None,
                }))
            }
            (Some(labels), Some(token)) => Ok(Some(Target {
                addr,
                token,
                status,
                mode: labels.get(MODE).cloned().unwrap_or_default(),
                namespace: labels.get(NAMESPACE).cloned().unwrap_or_default(),
                template: labels.get(TEMPLATE).cloned().unwrap_or_default(),
                stop_reason: None,
            })),
            _ => {
                let Some(record) = self.record(name).await? else {
                    return Ok(None);
                };
                let reason = match self.asleep(name).await? {
                    Some((reason, _)) => reason,
                    None => StopReason::User,
                };
                Ok(Some(Target {
                    addr,
                    token: record.token,
                    status: SandboxStatus::Stopped,
                    mode: record.template.mode,
                    namespace: record.namespace,
                    template: record.template.name,
                    stop_reason: Some(reason),
                }))
            }
        }
    }
}
