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
//! # Phases (read on every call from the engine, one inspect per request)
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

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use agentbox_proto::{CreatedBy, SandboxStatus, SandboxSummary};
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
use super::{now_rfc3339, random_hex, valid_name, Backend, CreateSpec, RunnerAddr, Target};
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
    /// `Some` under `--isolation namespaces`: containers without a network (docker_net.rs).
    net: Option<SandboxNet>,
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
            net: if cfg.isolated {
                Some(SandboxNet::new(cfg.run_dir.clone())?)
            } else {
                None
            },
        };
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

    /// Serves `name`'s egress proxy unless this process already does (isolated mode only).
    async fn serve_egress(&self, name: &str) -> Result<()> {
        let Some(net) = &self.net else {
            return Ok(());
        };
        let object = self.object_name(name);
        if net.is_served(&object) {
            return Ok(());
        }
        let Some(record) = self.record(name).await? else {
            return Ok(());
        };
        net.serve(&object, name, &record.template)
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
        if !valid_name(name) {
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
            Ok(c) => Ok(Some(c)),
            Err(e) if not_found(&e) => Ok(None),
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
            Some(ContainerStateStatusEnum::RUNNING) if self.net.is_some() => {
                let socket = c
                    .config
                    .as_ref()
                    .and_then(|c| c.labels.as_ref())
                    .and_then(|l| l.get(SANDBOX))
                    .zip(self.net.as_ref())
                    .map(|(name, net)| net.runner_socket(&self.object_name(name)));
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
        let (status, message, _) = self.phase(container);
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
            last_activity_at: None,
            created_by: Some(record.created_by.clone()),
            message,
            // Under `--isolation none` the container reaches the host and the networks it
            // reaches: not isolated as the threat model means it.
            isolated: self.net.is_some(),
            limits_enforced: None,
            stop_reason: None,
            timeout: None,
            idle_timeout: None,
            expires_at: None,
            cloned_from: None,
            from_warm_pool: None,
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

    /// Creates and starts the container of `record` and waits until its runner answers.
    async fn start(&self, record: &Record) -> Result<()> {
        let t = &record.template;
        let limits = t.limits.clone().unwrap_or_default();
        let name = self.object_name(&record.name);
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
            format!("AGENTBOX_SANDBOX={}", record.name),
        ]);
        if let Some(n) = t.max_concurrent_invokes {
            env.push(format!("AGENTBOX_MAX_CONCURRENT_INVOKES={n}"));
        }
        let mut binds = vec![format!("{name}:/workspace")];
        if let Some(net) = &self.net {
            binds.push(net.bind(&name));
        }
        let body = ContainerCreateBody {
            image: Some(t.image.clone().unwrap_or_else(|| self.image.clone())),
            env: Some(env),
            cmd: (!t.runner_args.is_empty()).then(|| t.runner_args.clone()),
            labels: Some(self.labels(record)),
            hostname: Some(record.name.clone()),
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
        };
        let options = CreateContainerOptionsBuilder::new().name(&name).build();
        self.docker
            .create_container(Some(options), body)
            .await
            .map_err(|e| match e {
                DockerError::DockerResponseServerError {
                    status_code: 404,
                    message,
                } => Error::Backend(format!("sandbox {:?}: {message}", record.name)),
                DockerError::DockerResponseServerError {
                    status_code: 409, ..
                } => Error::AlreadyExists(record.name.clone()),
                e => engine(e),
            })?;
        self.docker
            .start_container(&name, None)
            .await
            .map_err(engine)?;
        let deadline = Instant::now() + self.start_timeout;
        loop {
            let container = self.container(&record.name).await?;
            let (status, message, addr) = self.phase(container.as_ref());
            match (status, addr) {
                (SandboxStatus::Running, Some(addr)) if healthy(&addr).await => return Ok(()),
                (SandboxStatus::Running | SandboxStatus::Creating, _)
                    if Instant::now() < deadline => {}
                _ => {
                    return Err(Error::Backend(format!(
                        "sandbox {:?}: the runner did not start: {}",
                        record.name,
                        message.unwrap_or_else(|| "it did not answer /healthz in time".into())
                    )))
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops (SIGTERM, SIGKILL after `grace`) and removes the container, if any.
    async fn remove_container(&self, name: &str, grace: i32) -> Result<()> {
        let object = self.object_name(name);
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

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for S {}

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
        let mut out = Vec::new();
        for volume in &volumes {
            let Some(record) = Record::from_volume(volume) else {
                continue;
            };
            let has_container = containers
                .iter()
                .any(|c| c.labels.as_ref().and_then(|l| l.get(SANDBOX)) == Some(&record.name));
            // The summary's phase needs the container's network settings: inspect it.
            let container = if has_container {
                self.container(&record.name).await?
            } else {
                None
            };
            out.push(self.summary(&record, container.as_ref()));
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn get(&self, name: &str) -> Result<Option<SandboxSummary>> {
        let Some(record) = self.record(name).await? else {
            return Ok(None);
        };
        let container = self.container(name).await?;
        Ok(Some(self.summary(&record, container.as_ref())))
    }

    async fn create(&self, spec: CreateSpec) -> Result<SandboxSummary> {
        if !valid_name(&spec.name) {
            return Err(Error::InvalidRequest(format!(
                "{:?} is not a valid name",
                spec.name
            )));
        }
        // No lock: creates run side by side (one waiting for a slow image's /healthz delays no
        // other). Two creates of one name, here or in another replica, are told apart by the
        // volume's token label below: only the create that made the volume goes on.
        if self.record(&spec.name).await?.is_some() {
            return Err(Error::AlreadyExists(spec.name));
        }
        let record = Record {
            name: spec.name,
            namespace: spec.namespace,
            template: spec.template,
            created_at: now_rfc3339(),
            created_by: spec.created_by,
            token: random_hex(32),
        };
        let mut labels = self.labels(&record);
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
        let volume = self.object_name(&record.name);
        let made = match self
            .docker
            .create_volume(VolumeCreateRequest {
                name: Some(volume.clone()),
                labels: Some(labels),
                ..Default::default()
            })
            .await
        {
            Ok(made) => made,
            Err(DockerError::DockerResponseServerError {
                status_code: 409, ..
            }) => return Err(Error::AlreadyExists(record.name)),
            Err(e) => return Err(engine(e)),
        };
        // Creating an existing volume returns it: another control plane won the race for the
        // name, and nothing of its sandbox may be touched.
        if made.labels.get(TOKEN) != Some(&record.token) {
            return Err(Error::AlreadyExists(record.name));
        }
        let started = match &self.net {
            Some(net) => {
                net.reset(&volume);
                match net.serve(&volume, &record.name, &record.template) {
                    Ok(()) => self.start(&record).await,
                    Err(e) => Err(e),
                }
            }
            None => self.start(&record).await,
        };
        if let Err(e) = started {
            if matches!(e, Error::AlreadyExists(_)) {
                // A container of that name is someone else's: leave it alone (the volume
                // cannot be removed while it is mounted there).
                let _ = self
                    .docker
                    .remove_volume(&volume, None::<RemoveVolumeOptions>)
                    .await;
                return Err(e);
            }
            // A create that failed leaves nothing behind: the name can be used again.
            let _ = self.remove_container(&record.name, 0).await;
            if let Some(net) = &self.net {
                net.stop(&volume);
            }
            let _ = self
                .docker
                .remove_volume(&volume, None::<RemoveVolumeOptions>)
                .await;
            return Err(e);
        }
        tracing::info!(sandbox = %record.name, "sandbox created");
        let container = self.container(&record.name).await?;
        Ok(self.summary(&record, container.as_ref()))
    }

    async fn delete(&self, name: &str) -> Result<()> {
        if self.record(name).await?.is_none() {
            return Err(Error::SandboxNotFound(name.into()));
        }
        self.remove_container(name, 0).await?;
        if let Some(net) = &self.net {
            net.stop(&self.object_name(name));
        }
        match self
            .docker
            .remove_volume(&self.object_name(name), None::<RemoveVolumeOptions>)
            .await
        {
            Ok(()) => {}
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(engine(e)),
        }
        tracing::info!(sandbox = %name, "sandbox deleted");
        Ok(())
    }

    async fn stop(&self, name: &str) -> Result<SandboxSummary> {
        let Some(record) = self.record(name).await? else {
            return Err(Error::SandboxNotFound(name.into()));
        };
        self.remove_container(name, 10).await?;
        if let Some(net) = &self.net {
            net.stop(&self.object_name(name));
        }
        Ok(self.summary(&record, None))
    }

    async fn resume(&self, name: &str) -> Result<SandboxSummary> {
        let Some(record) = self.record(name).await? else {
            return Err(Error::SandboxNotFound(name.into()));
        };
        let container = self.container(name).await?;
        if let (SandboxStatus::Running, _, Some(addr)) = self.phase(container.as_ref()) {
            if healthy(&addr).await {
                self.serve_egress(name).await?;
                return Ok(self.summary(&record, container.as_ref()));
            }
        }
        self.remove_container(name, 0).await?;
        if let Some(net) = &self.net {
            net.reset(&self.object_name(name));
            net.serve(&self.object_name(name), name, &record.template)?;
        }
        self.start(&record).await?;
        let container = self.container(name).await?;
        Ok(self.summary(&record, container.as_ref()))
    }

    async fn resolve(&self, name: &str) -> Result<Option<Target>> {
        if !valid_name(name) {
            return Ok(None);
        }
        let container = self.container(name).await?;
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
        let (status, _, addr) = self.phase(container.as_ref());
        if status == SandboxStatus::Running && labels.is_some() {
            // After a restart of this process: serve the proxy again (a map lookup otherwise).
            self.serve_egress(name).await?;
        }
        match (labels, token_from_env) {
            (Some(labels), Some(token)) => Ok(Some(Target {
                addr: addr
                    .unwrap_or_else(|| RunnerAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 0)))),
                token,
                status,
                mode: labels.get(MODE).cloned().unwrap_or_default(),
                namespace: labels.get(NAMESPACE).cloned().unwrap_or_default(),
                template: labels.get(TEMPLATE).cloned().unwrap_or_default(),
                stop_reason: None,
            })),
            _ => Ok(self.record(name).await?.map(|record| Target {
                addr: RunnerAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 0))),
                token: record.token,
                status: SandboxStatus::Stopped,
                mode: record.template.mode,
                namespace: record.namespace,
                template: record.template.name,
                stop_reason: None,
            })),
        }
    }
}
