//! The local backend, the embedded default: each sandbox is an `agentbox-runner` process on this
//! machine with its own workspace under the state directory, a loopback port and its own token,
//! under bubblewrap when it is installed (own user, pid, ipc and uts namespaces; a read-only view
//! of the host; only its workspace writable; the control plane's state hidden).
//!
//! Everything about a sandbox is in `<state>/sandboxes/<name>/sandbox.json`, written atomically;
//! the processes do not depend on the control plane, so sandboxes survive its restart and any
//! number of control planes sharing the state directory serve the same sandboxes.

use std::collections::HashMap;
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

use super::{now_rfc3339, random_hex, valid_name, Backend, CreateSpec, Target};
use crate::error::{Error, Result};
use crate::templates::Template;

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
    /// The runner's address while running.
    addr: Option<SocketAddr>,
    /// The pid (process group) of the runner, or of bubblewrap around it.
    pid: Option<i32>,
    /// Its start time, to tell it from a later process with the same pid.
    pid_started: Option<u64>,
    token: String,
    /// Why the last start failed.
    message: Option<String>,
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
    bwrap: bool,
    start_timeout: Duration,
}

impl Launch {
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
        let mut runner_args: Vec<String> = vec!["--listen".into(), "127.0.0.1:0".into()];
        runner_args.extend(["--mode".into(), record.template.mode.clone()]);
        if let Some(n) = record.template.max_concurrent_invokes {
            runner_args.extend(["--max-concurrent-invokes".into(), n.to_string()]);
        }
        runner_args.extend(record.template.runner_args.iter().cloned());
        let mut cmd = if self.bwrap {
            let mut c = Command::new("bwrap");
            c.args(bwrap_args(&self.root, &workspace, &self.runner_bin));
            c.arg("--workspace").arg("/workspace");
            c
        } else {
            let mut c = Command::new(&self.runner_bin);
            c.arg("--workspace").arg(&workspace);
            c
        };
        cmd.args(&runner_args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("AGENTBOX_") {
                cmd.env_remove(key);
            }
        }
        cmd.envs(&record.template.env);
        cmd.env("AGENTBOX_RUNNER_TOKEN", &record.token)
            .env("AGENTBOX_SANDBOX", &record.name)
            .env("AGENTBOX_LOG", "info");
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::Backend(format!("cannot start the runner: {e}")))?;
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
                .and_then(|a| a.trim().parse::<SocketAddr>().ok())
            {
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
            std::thread::sleep(Duration::from_millis(10));
        };
        record.addr = Some(addr);
        record.pid = Some(pid);
        record.pid_started = start_time(pid);
        record.running = true;
        record.message = None;
        Ok(())
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
        }
    }
}

impl LocalBackend {
    /// A backend keeping sandboxes under `state_dir/sandboxes`.
    pub fn new(
        state_dir: &Path,
        runner_bin: PathBuf,
        bwrap: bool,
        start_timeout: Duration,
    ) -> std::io::Result<Self> {
        let root = state_dir.join("sandboxes");
        std::fs::create_dir_all(&root)?;
        Ok(Self {
            launch: Launch {
                root,
                runner_bin,
                bwrap,
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

/// bubblewrap arguments: a read-only view of the host, fresh /dev, /proc and /tmp, the
/// workspace at /workspace, the control plane's state hidden.
fn bwrap_args(state_root: &Path, workspace: &Path, runner_bin: &Path) -> Vec<String> {
    let mut args: Vec<String> = [
        "--unshare-user",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--new-session",
        "--tmpfs",
        "/",
    ]
    .map(String::from)
    .to_vec();
    if let Ok(entries) = std::fs::read_dir("/") {
        let mut names: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        names.sort();
        for path in names {
            let name = path.to_string_lossy().into_owned();
            if ["/proc", "/dev", "/tmp", "/workspace", "/run"].contains(&name.as_str()) {
                continue;
            }
            match std::fs::read_link(&path) {
                Ok(target) => args.extend([
                    "--symlink".into(),
                    target.to_string_lossy().into_owned(),
                    name,
                ]),
                Err(_) => args.extend(["--ro-bind".into(), name.clone(), name]),
            }
        }
    }
    let hidden = state_root.to_string_lossy().into_owned();
    args.extend(
        [
            "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--tmpfs",
        ]
        .map(String::from),
    );
    args.push(hidden);
    args.extend(["--dir".into(), "/workspace".into(), "--bind".into()]);
    args.push(workspace.to_string_lossy().into_owned());
    args.push("/workspace".into());
    args.extend([
        "--ro-bind".into(),
        runner_bin.to_string_lossy().into_owned(),
    ]);
    args.push("/run/agentbox-runner".into());
    args.extend(["--".into(), "/run/agentbox-runner".into()]);
    args
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
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
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
