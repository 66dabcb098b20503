//! The local backend, the embedded default: each sandbox is an `agentbox-runner` process on this
//! machine with its own workspace under the state directory and its own token. Isolated (the
//! default), it is started through `agentbox-runner sandbox` (runner/src/sandbox): own user,
//! mount, pid, network, ipc and uts namespaces, a read-only system view, egress only through a
//! proxy that applies the template's policy, limits by cgroup or rlimits, and a unix socket for
//! the control plane. With `--isolation none` it is a plain process on a loopback port.
//!
//! Everything about a sandbox is in `<state>/sandboxes/<name>/sandbox.json`, written atomically;
//! the processes do not depend on the control plane, so sandboxes survive its restart and any
//! number of control planes sharing the state directory serve the same sandboxes.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use agentbox_proto::{CreatedBy, SandboxStatus, SandboxSummary};
use nix::poll::{poll, PollFd, PollFlags};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::{now_rfc3339, random_hex, valid_name, Backend, CreateSpec, RunnerAddr, Target};
use crate::config::Isolation;
use crate::error::{Error, Result};
use crate::templates::{Template, LOCAL_DEFAULT_PIDS};

/// What is kept on disk for one sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    name: String,
    namespace: String,
    template: Template,
    created_at: String,
    created_by: CreatedBy,
    /// Whether it should be running.
    running: bool,
    /// The runner's address while running: a unix socket (isolated) or a loopback port.
    addr: Option<RunnerAddr>,
    /// The pid (process group) of the runner, or of the sandbox's launcher.
    pid: Option<i32>,
    /// Its start time, to tell it from a later process with the same pid.
    pid_started: Option<u64>,
    token: String,
    /// Why the last start failed.
    message: Option<String>,
    /// Whether it runs in namespaces of its own (false: `--isolation none`).
    #[serde(default)]
    isolated: bool,
    /// How its limits are enforced: `cgroup-v2`, `cgroup-v1` or `rlimits`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    limits_enforced: Option<String>,
    /// The host uid an isolated sandbox runs as when the control plane is root (each sandbox
    /// its own, unprivileged); kept so that its workspace stays its own across restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    host_uid: Option<u32>,
}

/// Runner processes on this machine.
#[derive(Debug)]
pub struct LocalBackend {
    /// Where sandboxes live and how their runners start (cloned onto a blocking thread).
    launch: Launch,
    create_lock: tokio::sync::Mutex<()>,
    resolved: Mutex<HashMap<String, Resolved>>,
}

/// What starting a runner needs, owned, so that it can run on a blocking thread (a
/// `spawn_blocking` task works on any runtime; the control plane's has one thread).
#[derive(Debug, Clone)]
struct Launch {
    root: PathBuf,
    runner_bin: PathBuf,
    isolation: Isolation,
    /// Sandboxes die with this process (`agentbox up`).
    tie_to_parent: bool,
    start_timeout: Duration,
}

/// The port of the egress proxy inside an isolated sandbox (the runner's
/// `sandbox::EGRESS_PORT`).
const EGRESS_PROXY: &str = "http://127.0.0.1:3128";

/// The first host uid given to isolated sandboxes when the control plane runs as root: each
/// sandbox gets one of its own above it, unprivileged and unused by any distribution.
const HOST_UID_BASE: u32 = 0x5B00_0000;

impl Launch {
    /// The sandbox's environment: nothing of the control plane's own (its secrets stay
    /// here), only what a program expects, the template's env, and the sandbox's name.
    fn environment(&self, record: &Record, workspace: &Path) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        let isolated = self.isolation == Isolation::Namespaces;
        let path = if isolated {
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned()
        } else {
            std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into())
        };
        env.insert("PATH".into(), path);
        let home = if isolated {
            "/workspace".to_owned()
        } else {
            workspace.to_string_lossy().into_owned()
        };
        env.insert("HOME".into(), home);
        env.insert("LANG".into(), "C.UTF-8".into());
        if isolated {
            for name in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
                env.insert(name.into(), EGRESS_PROXY.into());
            }
            for name in ["NO_PROXY", "no_proxy"] {
                env.insert(name.into(), "localhost,127.0.0.1,::1".into());
            }
            // The system's Python is read-only here: pip installs for the user (into
            // $HOME/.local, in the workspace) or into a venv, as Debian's PEP 668 marker
            // would otherwise refuse.
            env.insert("PIP_BREAK_SYSTEM_PACKAGES".into(), "1".into());
        }
        env.extend(record.template.env.clone());
        env.insert("AGENTBOX_SANDBOX".into(), record.name.clone());
        env.insert("AGENTBOX_LOG".into(), "info".into());
        env
    }

    /// The runner's own flags from the template.
    fn runner_args(record: &Record) -> Vec<String> {
        let mut args = vec!["--mode".into(), record.template.mode.clone()];
        if let Some(n) = record.template.max_concurrent_invokes {
            args.extend(["--max-concurrent-invokes".into(), n.to_string()]);
        }
        args.extend(record.template.runner_args.iter().cloned());
        args
    }

    /// The launcher's spec (`agentbox-runner sandbox --spec`): JSON, no secrets.
    fn spec(&self, record: &mut Record, dir: &Path, workspace: &Path) -> Result<serde_json::Value> {
        let limits = record.template.limits.clone().unwrap_or_default();
        let memory = limits.memory_bytes().map_err(Error::InvalidRequest)?;
        let cpu = limits.nano_cpus().map_err(Error::InvalidRequest)?;
        let pids = limits.pids.unwrap_or(LOCAL_DEFAULT_PIDS);
        if rustix::process::geteuid().is_root() && record.host_uid.is_none() {
            let mut b = [0u8; 4];
            getrandom::fill(&mut b).map_err(|e| Error::Internal(e.to_string()))?;
            record.host_uid = Some(HOST_UID_BASE + (u32::from_le_bytes(b) & 0x00ff_ffff));
        }
        Ok(serde_json::json!({
            "name": record.name,
            "dir": dir,
            "workspace": workspace,
            "runnerArgs": Self::runner_args(record),
            "env": self.environment(record, workspace),
            "readOnlyPaths": record.template.read_only_paths,
            "egress": record.template.egress.clone().unwrap_or_else(|| serde_json::json!("all")),
            "extraHosts": record.template.extra_hosts,
            "limits": {
                "memoryBytes": memory,
                "pids": pids,
                "cpuMicros": cpu.map(|n| n / 1000),
            },
            "hostUid": record.host_uid,
            "tieToParent": self.tie_to_parent,
        }))
    }

    /// Starts the runner of `record` and waits for its `listening on` line.
    fn start(&self, record: &mut Record) -> Result<()> {
        let dir = self.root.join(&record.name);
        let workspace = dir.join("workspace");
        std::fs::create_dir_all(&workspace)?;
        let out_path = dir.join("runner.out");
        let stdout = std::fs::File::create(&out_path)?;
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("runner.log"))?;
        let isolated = self.isolation == Isolation::Namespaces;
        let mut cmd = Command::new(&self.runner_bin);
        cmd.env_clear()
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0);
        // Credentials (crate::credentials): values read at every start, so a start sees the
        // latest. An isolated sandbox's spec (which assigns its host uid) comes first.
        let mut _spec_fd = None;
        let spec = if isolated {
            Some(self.spec(record, &dir, &workspace)?)
        } else {
            None
        };
        let creds = crate::credentials::deliver(
            self.root.parent().unwrap_or(&self.root),
            &record.namespace,
            &record.template.credentials,
            &dir,
            record.host_uid.filter(|_| isolated),
        )?;
        if let Some(mut spec) = spec {
            if creds.env.is_empty() {
                let spec_path = dir.join("sandbox.spec.json");
                std::fs::write(&spec_path, spec.to_string())?;
                cmd.arg("sandbox").arg("--spec").arg(&spec_path);
            } else {
                if let (Some(files), Some(list)) =
                    (&creds.dir, spec["readOnlyPaths"].as_array_mut())
                {
                    list.push(serde_json::json!(files));
                }
                if let Some(env) = spec["env"].as_object_mut() {
                    for (k, v) in &creds.env {
                        env.insert(k.clone(), serde_json::Value::String(v.clone()));
                    }
                }
                // The spec holds values now: it goes through a memfd (close-on-exec) that the
                // launcher opens through /proc, never through a file.
                let fd = crate::credentials::memfd_with(spec.to_string().as_bytes())?;
                cmd.arg("sandbox").arg("--spec").arg(format!(
                    "/proc/{}/fd/{}",
                    std::process::id(),
                    std::os::fd::AsRawFd::as_raw_fd(&fd)
                ));
                let _ = std::fs::remove_file(dir.join("sandbox.spec.json"));
                _spec_fd = Some(fd);
            }
            cmd.stdin(Stdio::piped());
        } else {
            cmd.args(["--listen", "127.0.0.1:0", "--workspace"])
                .arg(&workspace)
                .args(Self::runner_args(record))
                .envs(self.environment(record, &workspace))
                .envs(&creds.env)
                .env("AGENTBOX_RUNNER_TOKEN", &record.token)
                .stdin(Stdio::null());
        }
        let mut child = spawn_from_lasting_thread(cmd)
            .map_err(|e| Error::Backend(format!("cannot start the runner: {e}")))?;
        if let Some(mut stdin) = child.stdin.take() {
            // The launcher reads the token from here; it is in no file and no environment.
            let _ = stdin.write_all(record.token.as_bytes());
        }
        let pid = child.id() as i32;
        // Reap it whenever it exits, so it never lingers as a zombie of the control plane.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        let deadline = Instant::now() + self.start_timeout;
        let addr = loop {
            let text = std::fs::read_to_string(&out_path).unwrap_or_default();
            if let Some(addr) = text
                .lines()
                .find_map(|l| l.strip_prefix("listening on "))
                .and_then(|a| parse_listening(a.trim()))
            {
                record.limits_enforced = text
                    .lines()
                    .find_map(|l| l.strip_prefix("isolation: namespaces; limits: "))
                    .and_then(|rest| rest.split(';').next())
                    .map(str::to_owned);
                break addr;
            }
            if start_time(pid).is_none() || is_zombie(pid) || Instant::now() > deadline {
                let log = std::fs::read_to_string(dir.join("runner.log")).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(5)..].join(" | ");
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                record.message = Some(format!("the runner did not start: {tail}"));
                return Err(Error::Backend(format!(
                    "sandbox {:?}: the runner did not start: {tail}",
                    record.name
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        record.addr = Some(addr);
        record.pid = Some(pid);
        record.pid_started = start_time(pid);
        record.running = true;
        record.isolated = isolated;
        record.message = None;
        Ok(())
    }
}

/// Spawns `cmd` from one thread that lives as long as the process. A launcher's parent-death
/// signal (`agentbox up`'s sandboxes die with it) fires when the *thread* that forked it ends,
/// and runtime blocking threads end after a few idle seconds.
fn spawn_from_lasting_thread(cmd: Command) -> std::io::Result<std::process::Child> {
    type Job = (
        Command,
        std::sync::mpsc::Sender<std::io::Result<std::process::Child>>,
    );
    static SPAWNER: std::sync::OnceLock<Mutex<std::sync::mpsc::Sender<Job>>> =
        std::sync::OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let _ = std::thread::Builder::new()
            .name("sandbox-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            });
        Mutex::new(tx)
    });
    let (reply, answer) = std::sync::mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((cmd, reply))
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?
}

/// The address after `listening on `: `unix:PATH` or `HOST:PORT`.
fn parse_listening(text: &str) -> Option<RunnerAddr> {
    match text.strip_prefix("unix:") {
        Some(path) => Some(RunnerAddr::unix(PathBuf::from(path))),
        None => text.parse::<SocketAddr>().ok().map(RunnerAddr::Tcp),
    }
}

/// Runs blocking work (starting or stopping a runner) off the runtime's thread.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("a blocking task failed: {e}")))
}

/// What [`LocalBackend::resolve`] read for a sandbox, kept while its record file is the same
/// version (a record is replaced by rename, so a new one has a new inode): a proxied request
/// then costs a `stat` and a `poll` instead of reading and parsing the record and
/// `/proc/<pid>/stat`. A cache only: every request checks it against the disk, so other
/// replicas' changes are seen at once.
#[derive(Debug)]
struct Resolved {
    version: (u64, i64, i64, u64),
    target: Target,
    /// A pidfd of the runner, checked against the recorded start time when it was opened
    /// (None: it was not running then). Readable once the runner has exited.
    runner: Option<OwnedFd>,
}

/// What identifies a version of a file: inode, modification time, length.
fn version_of(meta: &std::fs::Metadata) -> (u64, i64, i64, u64) {
    (meta.ino(), meta.mtime(), meta.mtime_nsec(), meta.len())
}

/// Whether the process behind `pidfd` is still running (a pidfd turns readable at its exit).
fn still_running(pidfd: &OwnedFd) -> bool {
    let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, 0u16), Ok(0))
}

/// A process's state letter and start time (clock ticks since boot), from one read of
/// `/proc/<pid>/stat`.
fn proc_stat(pid: i32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let close = text.rfind(')')?;
    let mut fields = text.get(close + 1..)?.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    let started = fields.nth(18)?.parse().ok()?;
    Some((state, started))
}

fn start_time(pid: i32) -> Option<u64> {
    proc_stat(pid).map(|(_, started)| started)
}

fn is_zombie(pid: i32) -> bool {
    proc_stat(pid).is_some_and(|(state, _)| state == 'Z')
}

/// Whether a recorded runner runs.
#[derive(Debug)]
enum Liveness {
    /// It runs; its pidfd, where the kernel has them.
    Running(Option<OwnedFd>),
    Gone,
}

impl Record {
    /// Whether the recorded runner is still that process and running: its pidfd (opened
    /// before the start time is compared, so a reused pid cannot pass) is not readable yet.
    /// The pidfd, not the `/proc` state, tells a dying runner: its main thread reads as a
    /// zombie there while its other threads still exit, and [`LocalBackend::resolve`] asks the
    /// pidfd, so both agree.
    fn liveness(&self) -> Liveness {
        let (Some(pid), Some(started)) = (self.pid, self.pid_started) else {
            return Liveness::Gone;
        };
        let pidfd = rustix::process::Pid::from_raw(pid).and_then(|pid| {
            rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
        });
        let same = proc_stat(pid)
            .is_some_and(|(state, at)| at == started && (state != 'Z' || pidfd.is_some()));
        match pidfd {
            _ if !same => Liveness::Gone,
            Some(fd) if still_running(&fd) => Liveness::Running(Some(fd)),
            Some(_) => Liveness::Gone,
            None => Liveness::Running(None),
        }
    }

    fn alive(&self) -> bool {
        matches!(self.liveness(), Liveness::Running(_))
    }

    fn status(&self) -> (SandboxStatus, Option<String>) {
        self.status_given(self.running && self.alive())
    }

    fn status_given(&self, alive: bool) -> (SandboxStatus, Option<String>) {
        match (self.running, alive) {
            (true, true) => (SandboxStatus::Running, None),
            (true, false) => {
                (
                    SandboxStatus::Error,
                    Some(self.message.clone().unwrap_or_else(|| {
                        "the runner process is gone; resume restarts it".into()
                    })),
                )
            }
            (false, _) => (SandboxStatus::Stopped, None),
        }
    }

    fn summary(&self) -> SandboxSummary {
        let (status, message) = self.status();
        SandboxSummary {
            sandbox_id: self.name.clone(),
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            status,
            mode: self.template.mode.clone(),
            template_ref: Some(self.template.name.clone()),
            pod_name: self
                .pid
                .filter(|_| status == SandboxStatus::Running)
                .map(|p| format!("pid-{p}")),
            pvc_name: None,
            created_at: Some(self.created_at.clone()),
            last_activity_at: None,
            created_by: Some(self.created_by.clone()),
            message,
            isolated: self.isolated,
            limits_enforced: self.limits_enforced.clone(),
        }
    }
}

impl LocalBackend {
    /// A backend keeping sandboxes under `state_dir/sandboxes`.
    pub fn new(
        state_dir: &Path,
        runner_bin: PathBuf,
        isolation: Isolation,
        tie_to_parent: bool,
        start_timeout: Duration,
    ) -> std::io::Result<Self> {
        let root = state_dir.join("sandboxes");
        std::fs::create_dir_all(&root)?;
        Ok(Self {
            launch: Launch {
                root,
                runner_bin,
                isolation,
                tie_to_parent,
                start_timeout,
            },
            create_lock: tokio::sync::Mutex::new(()),
            resolved: Mutex::new(HashMap::new()),
        })
    }

    /// `record` as the API shows it, with `lastActivityAt` read off the runner's state
    /// directory (no call to the runner): the newest modification time of the directory
    /// itself (the configuration is replaced there), of `invokes/` (a file is created there
    /// when an invoke starts, or the runner sets its time when it reuses a pruned one's) and of `sessions/`.
    fn summary(&self, record: &Record) -> SandboxSummary {
        let mut summary = record.summary();
        let state = self
            .launch
            .root
            .join(&record.name)
            .join("workspace")
            .join(".agentbox");
        summary.last_activity_at = ["", "invokes", "sessions"]
            .iter()
            .filter_map(|sub| std::fs::metadata(state.join(sub)).ok()?.modified().ok())
            .max()
            .map(|t| humantime::format_rfc3339_millis(t).to_string());
        summary
    }

    fn dir(&self, name: &str) -> Option<PathBuf> {
        valid_name(name).then(|| self.launch.root.join(name))
    }

    /// Starts the runner of `record` on a blocking thread; the record comes back updated
    /// either way, with the start's outcome.
    async fn start(&self, mut record: Record) -> Result<(Record, Result<()>)> {
        let launch = self.launch.clone();
        blocking(move || {
            let started = launch.start(&mut record);
            (record, started)
        })
        .await
    }

    fn read(&self, name: &str) -> Result<Option<Record>> {
        let Some(dir) = self.dir(name) else {
            return Ok(None);
        };
        match std::fs::read(dir.join("sandbox.json")) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::Backend(format!("sandbox {name:?}: bad record: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Replaces `record` on disk (temp file, fsync, rename) on a blocking thread: the fsync
    /// would otherwise stall every stream of the runtime's one thread.
    async fn write(&self, record: &Record) -> Result<()> {
        let dir = self.launch.root.join(&record.name);
        let bytes =
            serde_json::to_vec_pretty(record).map_err(|e| Error::Internal(e.to_string()))?;
        blocking(move || {
            let tmp = dir.join(format!(".sandbox.json.{}", random_hex(4)));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, dir.join("sandbox.json"))?;
            Ok(())
        })
        .await?
    }

    /// SIGTERM to the runner (it cancels its invokes), SIGKILL to whatever lingers. Under
    /// bubblewrap the runner sits in a session of its own below the recorded bwrap process, so
    /// every process group of the recorded process's subtree is signaled, not just its own.
    fn halt(record: &Record) {
        if !record.alive() {
            return;
        }
        let Some(pid) = record.pid else {
            return;
        };
        let signal_tree = |signal: Signal| {
            let mut groups = vec![pid];
            for p in descendants(pid) {
                if let Some(g) = process_group(p) {
                    if !groups.contains(&g) && g != own_group() {
                        groups.push(g);
                    }
                }
            }
            for g in groups {
                let _ = killpg(Pid::from_raw(g), signal);
            }
        };
        signal_tree(Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while record.alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        signal_tree(Signal::SIGKILL);
    }
}

fn own_group() -> i32 {
    nix::unistd::getpgrp().as_raw()
}

/// `(pid, ppid, pgrp)` of every process, from `/proc`.
fn process_table() -> Vec<(i32, i32, i32)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let mut rest = text.get(text.rfind(')')? + 1..)?.split_ascii_whitespace();
        let _state = rest.next()?;
        let ppid = rest.next()?.parse().ok()?;
        let pgrp = rest.next()?.parse().ok()?;
        Some((pid, ppid, pgrp))
    })
    .collect()
}

fn process_group(pid: i32) -> Option<i32> {
    process_table()
        .into_iter()
        .find(|(p, _, _)| *p == pid)
        .map(|(_, _, g)| g)
}

/// Every descendant of `root`, by parent pid.
fn descendants(root: i32) -> Vec<i32> {
    let table = process_table();
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for (pid, ppid, _) in &table {
            if *ppid == parent && !out.contains(pid) {
                out.push(*pid);
                frontier.push(*pid);
            }
        }
    }
    out
}

#[async_trait::async_trait]
impl Backend for LocalBackend {
    async fn list(&self) -> Result<Vec<SandboxSummary>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.launch.root)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            // One damaged record must not hide every other sandbox.
            match self.read(&name) {
                Ok(Some(record)) => out.push(self.summary(&record)),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(sandbox = %name, error = %e, "skipping an unreadable sandbox record")
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn get(&self, name: &str) -> Result<Option<SandboxSummary>> {
        Ok(self.read(name)?.map(|r| self.summary(&r)))
    }

    async fn create(&self, spec: CreateSpec) -> Result<SandboxSummary> {
        let dir = self
            .dir(&spec.name)
            .ok_or_else(|| Error::InvalidRequest(format!("{:?} is not a valid name", spec.name)))?;
        let _one_at_a_time = self.create_lock.lock().await;
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(Error::AlreadyExists(spec.name))
            }
            Err(e) => return Err(e.into()),
        }
        let record = Record {
            name: spec.name,
            namespace: spec.namespace,
            template: spec.template,
            created_at: now_rfc3339(),
            created_by: spec.created_by,
            running: true,
            addr: None,
            pid: None,
            pid_started: None,
            token: random_hex(32),
            message: None,
            isolated: false,
            limits_enforced: None,
            host_uid: None,
        };
        let (record, started) = self.start(record).await?;
        if let Err(e) = started {
            // A create that failed leaves nothing behind: the name can be used again.
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        self.write(&record).await?;
        tracing::info!(sandbox = %record.name, "sandbox created");
        Ok(self.summary(&record))
    }

    async fn delete(&self, name: &str) -> Result<()> {
        let Some(mut record) = self.read(name)? else {
            return Err(Error::SandboxNotFound(name.into()));
        };
        record.running = false;
        self.write(&record).await?;
        let halted = record.clone();
        blocking(move || Self::halt(&halted)).await?;
        let dir = self.launch.root.join(name);
        tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir))
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
        tracing::info!(sandbox = %name, "sandbox deleted");
        Ok(())
    }

    async fn stop(&self, name: &str) -> Result<SandboxSummary> {
        let Some(mut record) = self.read(name)? else {
            return Err(Error::SandboxNotFound(name.into()));
        };
        let halted = record.clone();
        blocking(move || Self::halt(&halted)).await?;
        record.running = false;
        record.addr = None;
        self.write(&record).await?;
        Ok(self.summary(&record))
    }

    async fn resume(&self, name: &str) -> Result<SandboxSummary> {
        let Some(record) = self.read(name)? else {
            return Err(Error::SandboxNotFound(name.into()));
        };
        if record.running && record.alive() {
            return Ok(self.summary(&record));
        }
        let (record, started) = self.start(record).await?;
        self.write(&record).await?;
        started?;
        Ok(self.summary(&record))
    }

    async fn resolve(&self, name: &str) -> Result<Option<Target>> {
        let Some(dir) = self.dir(name) else {
            return Ok(None);
        };
        let mut resolved = self.resolved.lock().unwrap_or_else(|p| p.into_inner());
        let version = match std::fs::metadata(dir.join("sandbox.json")) {
            Ok(meta) => version_of(&meta),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                resolved.remove(name);
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(hit) = resolved.get(name).filter(|r| r.version == version) {
            let mut target = hit.target.clone();
            if target.status == SandboxStatus::Running
                && !hit.runner.as_ref().is_some_and(still_running)
            {
                target.status = SandboxStatus::Error;
            }
            return Ok(Some(target));
        }
        let Some(record) = self.read(name)? else {
            resolved.remove(name);
            return Ok(None);
        };
        let liveness = if record.running {
            record.liveness()
        } else {
            Liveness::Gone
        };
        let (status, _) = record.status_given(matches!(liveness, Liveness::Running(_)));
        let (runner, cacheable) = match liveness {
            Liveness::Running(Some(fd)) => (Some(fd), true),
            // No pidfd (a kernel before 5.3, no descriptor left): checked through `/proc`
            // on every request.
            Liveness::Running(None) => (None, false),
            Liveness::Gone => (None, true),
        };
        let target = Target {
            addr: record
                .addr
                .unwrap_or_else(|| RunnerAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 0)))),
            token: record.token,
            status,
            mode: record.template.mode,
            namespace: record.namespace,
            template: record.template.name,
        };
        if cacheable {
            resolved.insert(
                name.to_owned(),
                Resolved {
                    version,
                    target: target.clone(),
                    runner,
                },
            );
        } else {
            resolved.remove(name);
        }
        Ok(Some(target))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One read of `/proc/<pid>/stat` gives the state and the start time: a child that
    /// exited and is not reaped yet is a zombie with the start time it had while it ran.
    #[test]
    fn proc_stat_tells_state_and_start_time() {
        let mut child = Command::new("sleep")
            .arg("0.2")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id() as i32;
        let (state, started) = proc_stat(pid).expect("a running child");
        // Running, sleeping, or in a disk wait while its exec loads the program (seen when
        // the machine is busy).
        assert!(matches!(state, 'R' | 'S' | 'D'), "{state}");
        assert!(!is_zombie(pid));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !is_zombie(pid) {
            assert!(Instant::now() < deadline, "never became a zombie");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(start_time(pid), Some(started));
        child.wait().expect("reap");
    }
}
