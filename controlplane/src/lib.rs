//! The agentbox control plane: thin and stateless. It authenticates callers, finds the
//! sandbox's runner through a [`backend::Backend`], checks mode and phase, and proxies the
//! stream without buffering. It keeps no invoke state, so any number of replicas serve any
//! request, cancel included.

pub(crate) mod admin_api;
pub mod api;
pub mod audit;
pub mod auth;
pub mod backend;
pub mod config;
pub mod connector;
pub mod credentials;
pub mod error;
pub mod governance;
pub mod lifecycle;
pub mod metrics;
pub mod oidc;
pub mod openapi;
pub mod otel;
pub mod ports;
pub mod proxy;
pub mod templates;
pub mod terminal;
pub mod upgrade;

use std::sync::Arc;

use crate::auth::{ApiKeys, Authenticator, TokenVerifier};
use crate::backend::docker::DockerBackend;
use crate::backend::kubernetes::KubernetesBackend;
use crate::backend::local::LocalBackend;
use crate::backend::Backend;
use crate::config::{BackendKind, Config};
use crate::templates::Templates;

/// Everything a handler can reach.
#[derive(Debug)]
pub struct AppState {
    /// Validated configuration.
    pub cfg: Config,
    /// Authentication.
    pub auth: Authenticator,
    /// Where sandboxes live.
    pub backend: Arc<dyn Backend>,
    /// Templates.
    pub templates: Templates,
    /// The proxy to runners.
    pub proxy: proxy::Proxy,
    /// Metrics.
    pub metrics: metrics::Metrics,
    /// The audit log.
    pub audit: audit::Audit,
    /// Span export.
    pub tracer: otel::Tracer,
    /// Governance policies.
    pub governance: Arc<governance::Governance>,
    /// Named credentials.
    pub credentials: credentials::Credentials,
    /// Port connections runners handed over, counted per sandbox.
    pub held_ports: ports::HeldPorts,
}

impl AppState {
    /// Builds the state from a validated configuration. The Kubernetes backend connects
    /// asynchronously: [`AppState::connect`] builds it.
    pub fn new(cfg: Config) -> Result<Arc<Self>, String> {
        Self::with_backend(cfg, None)
    }

    /// Builds the state, first connecting to the backend's platform when it needs that (the
    /// Kubernetes backend's caches are filled, bounded, before this returns).
    pub async fn connect(cfg: Config) -> Result<Arc<Self>, String> {
        let mut kube = None;
        let backend: Option<Arc<dyn Backend>> = match cfg.backend {
            BackendKind::Kubernetes => {
                let backend = KubernetesBackend::connect(&cfg.kube).await?;
                kube = Some(backend.client());
                Some(Arc::new(backend))
            }
            BackendKind::Docker => Some(Arc::new(
                DockerBackend::connect(&cfg.docker, cfg.runner_start_timeout)
                    .await?
                    .with_credentials(&cfg.state_dir),
            )),
            BackendKind::Local => None,
        };
        let state = Self::with_backend(cfg, backend)?;
        // Kubernetes: policies in a ConfigMap every replica reads, not in a pod's state dir.
        if let Some((client, namespace)) = kube {
            state.governance.use_configmap(client, &namespace).await?;
        }
        Ok(state)
    }

    /// Builds the state around `backend`, or around the configured one when `None`.
    pub fn with_backend(
        cfg: Config,
        backend: Option<Arc<dyn Backend>>,
    ) -> Result<Arc<Self>, String> {
        let keys = match &cfg.api_keys_file {
            Some(path) => Some(ApiKeys::load(path)?),
            None => None,
        };
        let templates = Templates::load(cfg.templates_file.as_deref())?;
        let backend: Arc<dyn Backend> = match (backend, cfg.backend) {
            (Some(backend), _) => backend,
            (None, BackendKind::Kubernetes | BackendKind::Docker) => {
                return Err(
                    "the kubernetes and docker backends are built by AppState::connect".into(),
                )
            }
            (None, BackendKind::Local) => Arc::new(
                LocalBackend::new(
                    &cfg.state_dir,
                    cfg.runner_bin.clone(),
                    cfg.isolation,
                    cfg.tie_sandboxes,
                    cfg.runner_start_timeout,
                )
                .map_err(|e| e.to_string())?,
            ),
        };
        let audit = audit::Audit::open(
            cfg.audit_log.as_deref(),
            cfg.audit_log_max_bytes,
            cfg.audit_log_keep,
        )
        .map_err(|e| e.to_string())?;
        Ok(Arc::new(Self {
            auth: Authenticator {
                keys,
                oidc: cfg
                    .oidc
                    .clone()
                    .map(|c| Arc::new(oidc::Oidc::new(c)) as Arc<dyn TokenVerifier>),
                dev: cfg.dev,
            },
            backend,
            templates,
            proxy: proxy::Proxy::new(cfg.connect_timeout),
            metrics: metrics::Metrics::default(),
            audit,
            tracer: otel::Tracer::new(cfg.otlp_endpoint.clone()),
            governance: Arc::new(governance::Governance::new(&cfg.state_dir).map_err(|e| {
                format!("cannot create {}/governance: {e}", cfg.state_dir.display())
            })?),
            credentials: credentials::Credentials::new(&cfg.state_dir),
            held_ports: ports::HeldPorts::default(),
            cfg,
        }))
    }
}
