//! Command-line flags (with `AGENTBOX_*` environment fallbacks), validated once at start-up,
//! before any port is bound.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// The control plane's flags.
#[derive(Debug, Parser)]
#[command(
    name = "agentbox-controlplane",
    version,
    about = "Authenticates callers and proxies them to each sandbox's agentbox-runner."
)]
pub struct Args {
    /// Address to listen on; port 0 picks a free port (the bound address is printed).
    #[arg(long, env = "AGENTBOX_LISTEN", default_value = "127.0.0.1:8420")]
    pub listen: SocketAddr,
    /// Where the local backend keeps sandboxes, and the default audit log.
    #[arg(long, env = "AGENTBOX_STATE_DIR", default_value = ".agentbox")]
    pub state_dir: PathBuf,
    /// Where sandboxes live.
    #[arg(long, env = "AGENTBOX_BACKEND", value_enum, default_value_t = BackendKind::Local)]
    pub backend: BackendKind,
    /// JSON file of API keys: {"keys": [{"name", "sha256", "namespaces": [..], "admin"}]}.
    /// Re-read when it changes.
    #[arg(long, env = "AGENTBOX_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Serve without authentication (every caller is an administrator). Only on loopback.
    #[arg(long, env = "AGENTBOX_DEV")]
    pub dev: bool,
    /// OIDC issuer (`iss`) of accepted JWTs.
    #[arg(long, env = "AGENTBOX_OIDC_ISSUER")]
    pub oidc_issuer: Option<String>,
    /// OIDC audience (`aud`) of accepted JWTs.
    #[arg(long, env = "AGENTBOX_OIDC_AUDIENCE")]
    pub oidc_audience: Option<String>,
    /// URL of the issuer's JWKS.
    #[arg(long, env = "AGENTBOX_OIDC_JWKS_URL")]
    pub oidc_jwks_url: Option<String>,
    /// JWT claim (a string or an array) naming the caller's namespaces.
    #[arg(
        long,
        env = "AGENTBOX_OIDC_NAMESPACES_CLAIM",
        default_value = "namespaces"
    )]
    pub oidc_namespaces_claim: String,
    /// Members of this group (`groups` claim) are administrators.
    #[arg(long, env = "AGENTBOX_OIDC_ADMIN_GROUP")]
    pub oidc_admin_group: Option<String>,
    /// JSON file of templates: {"templates": [{"name", "mode", "env", ...}]}.
    #[arg(long, env = "AGENTBOX_TEMPLATES_FILE")]
    pub templates_file: Option<PathBuf>,
    /// The agentbox-runner binary for local sandboxes [default: next to this binary, else PATH].
    #[arg(long, env = "AGENTBOX_RUNNER_BIN")]
    pub runner_bin: Option<PathBuf>,
    /// Isolation of local sandboxes: Linux namespaces (the default: own user, mount, pid,
    /// network, ipc and uts namespaces, a read-only system view, egress only through the
    /// template's policy, cgroup or rlimit limits), or none (plain processes as this user:
    /// no security boundary, a warning at every start). Docker backend: namespaces gives
    /// containers no network but loopback and egress only through the template's policy;
    /// none puts them on the `--docker-network` bridge (they reach the host and what it
    /// reaches; a warning at every start).
    #[arg(long, env = "AGENTBOX_ISOLATION", value_enum, default_value_t = Isolation::Namespaces)]
    pub isolation: Isolation,
    /// Local sandboxes die with this process (`agentbox up`) instead of outliving a restart.
    #[arg(long, env = "AGENTBOX_TIE_SANDBOXES", hide = true)]
    pub tie_sandboxes: bool,
    /// Audit log of JSON lines; `-` for stderr [default: <state-dir>/audit.log].
    #[arg(long, env = "AGENTBOX_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,
    /// Connect timeout towards runners (no total timeout: streams run as long as they run).
    #[arg(long, env = "AGENTBOX_CONNECT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
    /// OTLP/HTTP endpoint for spans (e.g. http://collector:4318); none: no spans.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// How long a local runner may take to start.
    #[arg(long, env = "AGENTBOX_RUNNER_START_TIMEOUT", default_value = "15s", value_parser = humantime::parse_duration)]
    pub runner_start_timeout: Duration,
    /// How often the control plane looks for sandboxes past their `idleTimeout` or `timeout`
    /// (each look reads every sandbox's record; every replica looks, and stops are
    /// idempotent).
    #[arg(long, env = "AGENTBOX_LIFECYCLE_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub lifecycle_interval: Duration,
    /// Threads serving requests. 1 (the default): every request, proxied stream and runner
    /// connection on one thread, the shortest path for an invoke (no task handed between
    /// threads); more: a multi-threaded runtime for CPU-heavy loads (many TLS callers, say).
    /// Replicas scale it out either way.
    #[arg(long, env = "AGENTBOX_WORKER_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub worker_threads: u16,
    /// Kubernetes backend: the namespace holding every sandbox's Secret, Pod, volume and
    /// Events, and the template ConfigMaps. The cluster comes from KUBECONFIG (or
    /// ~/.kube/config), else the in-cluster service account.
    #[arg(long, env = "AGENTBOX_KUBE_NAMESPACE", default_value = "agentbox")]
    pub kube_namespace: String,
    /// Kubernetes backend: template T's pod (key `pod.json`) and workspace volume claim (key
    /// `pvc.json`) are in the ConfigMap named PREFIX + T.
    #[arg(
        long,
        env = "AGENTBOX_KUBE_TEMPLATE_CONFIGMAP_PREFIX",
        default_value = "agentbox-template-"
    )]
    pub kube_template_configmap_prefix: String,
    /// Kubernetes backend: the runner image for templates that name none.
    #[arg(long, env = "AGENTBOX_KUBE_RUNNER_IMAGE")]
    pub kube_runner_image: Option<String>,
    /// Kubernetes backend: how long the first list of Pods and Secrets may take at start-up.
    #[arg(long, env = "AGENTBOX_KUBE_SYNC_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub kube_sync_timeout: Duration,
    /// Docker backend with `--isolation none`: the bridge network of every sandbox (created
    /// when missing, with inter-container traffic disabled).
    #[arg(long, env = "AGENTBOX_DOCKER_NETWORK", default_value = "agentbox")]
    pub docker_network: String,
    /// Docker backend: the image for templates that name none (its entrypoint must be
    /// agentbox-runner).
    #[arg(
        long,
        env = "AGENTBOX_DOCKER_IMAGE",
        default_value = "agentbox/python-agent:latest"
    )]
    pub docker_image: String,
    /// Docker backend: separates control planes sharing one engine; part of every container's
    /// and volume's name and labels.
    #[arg(long, env = "AGENTBOX_DOCKER_SCOPE", default_value = "default")]
    pub docker_scope: String,
    /// Open HTTP connections at most (lowered to half the open-file limit); at the cap the
    /// connection idle for longest is closed to make room, or the new one when all are busy.
    #[arg(long, env = "AGENTBOX_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// A request head must arrive in full within this time of its first byte (of the accept,
    /// on a new connection); else the connection is closed.
    #[arg(long, env = "AGENTBOX_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,
    /// A keep-alive connection with no request in progress is closed after this long.
    #[arg(long, env = "AGENTBOX_IDLE_TIMEOUT", default_value = "2m", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// The audit log is rotated when it would grow past this (`64MiB`, `512KiB`, bytes).
    #[arg(long, env = "AGENTBOX_AUDIT_LOG_MAX_BYTES", default_value = "64MiB", value_parser = parse_bytes)]
    pub audit_log_max_bytes: u64,
    /// Rotated audit logs kept (`audit.log.1` newest); 0 keeps none.
    #[arg(long, env = "AGENTBOX_AUDIT_LOG_KEEP", default_value_t = 4)]
    pub audit_log_keep: usize,
}

/// A size: bytes, or a number with `KiB`, `MiB` or `GiB`.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, ""), |i| text.split_at(i));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size (e.g. 64MiB)"))?;
    let scale = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?} (use KiB, MiB or GiB)")),
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Which backend holds the sandboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// Runner processes on this machine.
    Local,
    /// A Secret and a Pod per sandbox in one Kubernetes namespace.
    Kubernetes,
    /// A container and a volume per sandbox on the local Docker engine.
    Docker,
}

/// Isolation of local sandboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Isolation {
    /// Linux namespaces set up by the runner binary (no helper to install).
    Namespaces,
    /// Plain processes: no security boundary.
    None,
}

impl Isolation {
    /// The flag's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Namespaces => "namespaces",
            Isolation::None => "none",
        }
    }
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to bind.
    pub listen: SocketAddr,
    /// State directory (created, canonical).
    pub state_dir: PathBuf,
    /// The backend.
    pub backend: BackendKind,
    /// API keys file.
    pub api_keys_file: Option<PathBuf>,
    /// Dev mode (no auth).
    pub dev: bool,
    /// OIDC settings when all three are given.
    pub oidc: Option<OidcConfig>,
    /// Templates file.
    pub templates_file: Option<PathBuf>,
    /// The runner binary.
    pub runner_bin: PathBuf,
    /// How local sandboxes are isolated.
    pub isolation: Isolation,
    /// Local sandboxes die with this process.
    pub tie_sandboxes: bool,
    /// Audit log path; `None` means stderr.
    pub audit_log: Option<PathBuf>,
    /// Threads serving requests (1: a current-thread runtime).
    pub worker_threads: usize,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Runner start timeout.
    pub runner_start_timeout: Duration,
    /// How often idle and expired sandboxes are looked for.
    pub lifecycle_interval: Duration,
    /// OTLP endpoint.
    pub otlp_endpoint: Option<String>,
    /// Kubernetes backend settings.
    pub kube: KubeConfig,
    /// Docker backend settings.
    pub docker: DockerConfig,
    /// Connection cap and timeouts of the accept loop.
    pub limits: agentbox_serve::Limits,
    /// Audit log rotation size.
    pub audit_log_max_bytes: u64,
    /// Rotated audit logs kept.
    pub audit_log_keep: usize,
}

/// Docker backend settings.
#[derive(Debug, Clone)]
pub struct DockerConfig {
    /// The sandboxes' network.
    pub network: String,
    /// The image for templates that name none.
    pub image: String,
    /// The label scope (and name prefix) of this control plane's objects.
    pub scope: String,
    /// `--isolation namespaces`: containers with no network but loopback, runner and egress
    /// proxy on unix sockets under `run_dir` (docker_net.rs); otherwise the bridge network.
    pub isolated: bool,
    /// The sandboxes' socket directories: `<state dir>/docker`.
    pub run_dir: PathBuf,
}

/// Kubernetes backend settings.
#[derive(Debug, Clone)]
pub struct KubeConfig {
    /// The namespace holding sandboxes and template ConfigMaps.
    pub namespace: String,
    /// Prefix of template ConfigMaps' names.
    pub template_configmap_prefix: String,
    /// The runner image for templates that name none.
    pub runner_image: Option<String>,
    /// Bound of the initial cache sync.
    pub sync_timeout: Duration,
}

/// OIDC verification settings.
#[derive(Debug, Clone)]
pub struct OidcConfig {
    /// Expected `iss`.
    pub issuer: String,
    /// Expected `aud`.
    pub audience: String,
    /// Where the keys are.
    pub jwks_url: String,
    /// Claim holding namespaces.
    pub namespaces_claim: String,
    /// Admin group.
    pub admin_group: Option<String>,
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

impl Args {
    /// Validates flags; errors are reported before any port is bound (exit 64).
    pub fn into_config(self) -> Result<Config, String> {
        if self.max_connections == 0 {
            return Err("--max-connections must be at least 1".into());
        }
        if self.audit_log_max_bytes < 4096 {
            return Err("--audit-log-max-bytes must be at least 4096".into());
        }
        if self.header_read_timeout.is_zero() || self.idle_timeout.is_zero() {
            return Err("--header-read-timeout and --idle-timeout must be positive".into());
        }
        let oidc = match (self.oidc_issuer, self.oidc_audience, self.oidc_jwks_url) {
            (Some(issuer), Some(audience), Some(jwks_url)) => Some(OidcConfig {
                issuer,
                audience,
                jwks_url,
                namespaces_claim: self.oidc_namespaces_claim,
                admin_group: self.oidc_admin_group,
            }),
            (None, None, None) => None,
            _ => {
                return Err(
                    "OIDC needs all of --oidc-issuer, --oidc-audience and --oidc-jwks-url".into(),
                )
            }
        };
        if self.dev {
            if !self.listen.ip().is_loopback() {
                return Err(format!(
                    "--dev turns authentication off, so it only listens on loopback, not {}",
                    self.listen
                ));
            }
        } else if self.api_keys_file.is_none() && oidc.is_none() {
            return Err(
                "no way to authenticate callers: pass --api-keys-file FILE and/or the \
                 --oidc-* flags (or --dev, on loopback only, for a local experiment)"
                    .into(),
            );
        }
        if let Some(path) = &self.api_keys_file {
            crate::auth::ApiKeys::load(path)
                .map_err(|e| format!("--api-keys-file {}: {e}", path.display()))?;
        }
        if let Some(path) = &self.templates_file {
            crate::templates::Templates::load(Some(path))
                .map_err(|e| format!("--templates-file {}: {e}", path.display()))?;
        }
        std::fs::create_dir_all(&self.state_dir)
            .map_err(|e| format!("cannot create {}: {e}", self.state_dir.display()))?;
        let state_dir = std::fs::canonicalize(&self.state_dir)
            .map_err(|e| format!("cannot resolve {}: {e}", self.state_dir.display()))?;
        if self.backend == BackendKind::Kubernetes {
            if !crate::backend::valid_name(&self.kube_namespace) {
                return Err(format!(
                    "--kube-namespace {:?} is not a DNS label",
                    self.kube_namespace
                ));
            }
            let prefix = &self.kube_template_configmap_prefix;
            if prefix.is_empty()
                || prefix.len() > 200
                || !prefix
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            {
                return Err(format!(
                    "--kube-template-configmap-prefix {prefix:?} must be lowercase letters, \
                     digits, '-' and '.'"
                ));
            }
        }
        if self.backend == BackendKind::Docker {
            let scope = &self.docker_scope;
            if !crate::backend::valid_name(scope) || scope.len() > 30 {
                return Err(format!(
                    "--docker-scope {scope:?} must be a DNS label of at most 30 characters"
                ));
            }
            if self.docker_network.is_empty() || self.docker_image.is_empty() {
                return Err("--docker-network and --docker-image must not be empty".into());
            }
        }
        // Runner processes only run on this machine with the local backend.
        let runner_bin = match self.runner_bin {
            Some(p) => p,
            None if self.backend != BackendKind::Local => PathBuf::from("agentbox-runner"),
            None => std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(|d| d.join("agentbox-runner")))
                .filter(|p| p.is_file())
                .or_else(|| find_in_path("agentbox-runner"))
                .ok_or(
                    "cannot find agentbox-runner next to this binary or in PATH; pass --runner-bin",
                )?,
        };
        if self.backend == BackendKind::Local && !runner_bin.is_file() {
            return Err(format!(
                "--runner-bin {} does not exist",
                runner_bin.display()
            ));
        }
        if self.backend == BackendKind::Local && self.isolation == Isolation::Namespaces {
            probe_namespaces(&runner_bin)?;
        }
        let audit_log = match self.audit_log {
            Some(p) if p.as_os_str() == "-" => None,
            Some(p) => Some(p),
            None => Some(state_dir.join("audit.log")),
        };
        let docker_run_dir = state_dir.join("docker");
        Ok(Config {
            listen: self.listen,
            state_dir,
            backend: self.backend,
            api_keys_file: self.api_keys_file,
            dev: self.dev,
            oidc,
            templates_file: self.templates_file,
            runner_bin,
            isolation: self.isolation,
            tie_sandboxes: self.tie_sandboxes,
            audit_log,
            worker_threads: usize::from(self.worker_threads),
            connect_timeout: self.connect_timeout,
            runner_start_timeout: self.runner_start_timeout,
            lifecycle_interval: self.lifecycle_interval,
            otlp_endpoint: self.otlp_endpoint,
            kube: KubeConfig {
                namespace: self.kube_namespace,
                template_configmap_prefix: self.kube_template_configmap_prefix,
                runner_image: self.kube_runner_image,
                sync_timeout: self.kube_sync_timeout,
            },
            docker: DockerConfig {
                network: self.docker_network,
                image: self.docker_image,
                scope: self.docker_scope,
                isolated: self.isolation == Isolation::Namespaces,
                run_dir: docker_run_dir,
            },
            limits: agentbox_serve::Limits {
                max_connections: self.max_connections,
                header_read_timeout: self.header_read_timeout,
                idle_timeout: self.idle_timeout,
            },
            audit_log_max_bytes: self.audit_log_max_bytes,
            audit_log_keep: self.audit_log_keep,
        })
    }
}

/// Sets up and ends a throwaway sandbox (`agentbox-runner sandbox --probe`): every namespace,
/// mount and map a local sandbox needs must be allowed here, or the control plane refuses to
/// start and says how to fix it.
fn probe_namespaces(runner_bin: &std::path::Path) -> Result<(), String> {
    let out = std::process::Command::new(runner_bin)
        .args(["sandbox", "--probe"])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {} sandbox --probe: {e}", runner_bin.display()))?;
    if out.status.success() {
        return Ok(());
    }
    let why = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    Err(format!(
        "this machine does not allow the Linux namespaces that isolate local sandboxes: {why}\n\
         Fixes: allow unprivileged user namespaces (Ubuntu 24.04+: \
         `sudo sysctl kernel.apparmor_restrict_unprivileged_userns=0`; Debian before 11: \
         `sudo sysctl kernel.unprivileged_userns_clone=1`; a container: run it with \
         `--security-opt seccomp=unconfined --security-opt apparmor=unconfined` or use the \
         docker backend), or start with `--isolation none` to run sandboxes as plain processes \
         with no security boundary."
    ))
}
