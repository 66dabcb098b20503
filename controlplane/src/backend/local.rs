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
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use agentbox_proto::{CreatedBy, SandboxStatus, SandboxSummary, StopReason};
use nix::poll::{poll, PollFd, PollFlags};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::{now_rfc3339, random_hex, valid_key, Backend, CreateSpec, RunnerAddr, Target};
use crate::config::Isolation;
use crate::error::{Error, Result};
use crate::templates::{OnTimeout, Template, LOCAL_DEFAULT_PIDS};

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
    /// Its lifetime (a Go duration), counted from `started_at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    timeout: Option<String>,
    /// Its idle timeout (a Go duration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    idle_timeout: Option<String>,
    /// RFC 3339: when its lifetime began (its create, or its last resume that was not a
    /// resume on demand).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    started_at: Option<String>,
    /// Why it was last stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stop_reason: Option<StopReason>,
    /// The sandbox it was cloned from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cloned_from: Option<String>,
}

/// Runner processes on this machine.
#[derive(Debug)]
pub struct LocalBackend {
    /// Where sandboxes live and how their runners start (cloned onto a blocking thread).
    launch: Launch,
    create_lock: tokio::sync::Mutex<()>,
    resolved: Mutex<HashMap<String, Resolved>>,
    /// When this replica last stamped each sandbox's activity file ([`Backend::touch`]).
    touched: Mutex<HashMap<String, Instant>>,
    /// Warm pool claims per template in this replica: (hits, misses).
    pool_counts: Mutex<HashMap<String, (u64, u64)>>,
}

/// A pooled sandbox's directory is this prefix + random hex: not a valid sandbox name, so
/// never listed. A create claims one by creating its [`CLAIMED`] file (exclusive) and a
/// symbolic link from the new name to it; its runner keeps running, unaware.
const POOL_PREFIX: &str = ".pool-";

/// The file that marks a pooled sandbox as claimed (or being retired).
const CLAIMED: &str = "claimed";

/// A deleted sandbox's directory is renamed to this prefix + its name before it is removed
/// (not a valid sandbox name, so never listed); leftovers of a crash are removed at start.
const DELETED_PREFIX: &str = ".deleted-";

/// A sandbox's activity is stamped at most this often per replica.
const TOUCH_EVERY: Duration = Duration::from_millis(500);

/// The file whose modification time is when a request last used the sandbox.
const ACTIVITY_FILE: &str = "activity";

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

/// Now, RFC 3339 to the millisecond (a lifetime's start: seconds would cut up to one off it).
fn now_millis() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// A host uid of its own for a new isolated sandbox (the control plane runs as root).
fn new_host_uid() -> Result<u32> {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).map_err(|e| Error::Internal(e.to_string()))?;
    Ok(HOST_UID_BASE + (u32::from_le_bytes(b) & 0x00ff_ffff))
}

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
        env.insert(
            "AGENTBOX_SANDBOX".into(),
            super::display_name(&record.name, &record.namespace).to_owned(),
        );
        env.insert("AGENTBOX_LOG".into(), "info".into());
        if !record.template.credentials.is_empty() {
            let dir = self.credentials_seen_at(workspace.parent().unwrap_or(workspace));
            env.insert(
                "AGENTBOX_CREDENTIALS_DIR".into(),
                dir.to_string_lossy().into_owned(),
            );
        }
        env
    }

    /// Where the sandbox in `dir` sees its credentials directory: `/run/credentials` when
    /// isolated, the host path otherwise.
    fn credentials_seen_at(&self, dir: &Path) -> PathBuf {
        if self.isolation == Isolation::Namespaces {
            PathBuf::from(crate::credentials::INSIDE_DIR)
        } else {
            dir.join("credentials")
        }
    }

    /// (Re)writes the credentials directory of the sandbox in `dir` ([`crate::credentials::write_dir`]).
    fn write_credentials(&self, record: &Record, dir: &Path, strict: bool) -> Result<bool> {
        let owner = crate::credentials::Owner {
            uid: record
                .host_uid
                .filter(|_| self.isolation == Isolation::Namespaces),
            mode: 0o400,
        };
        crate::credentials::write_dir(
            self.root.parent().unwrap_or(&self.root),
            &record.namespace,
            &record.template.credentials,
            &dir.join("credentials"),
            owner,
            strict,
        )
    }

    /// Rewrites the credentials directory of every sandbox of `namespace` that references
    /// `name` (a rotation or a deletion): running ones see it at their next process start.
    fn rewrite_credentials(&self, namespace: &str, name: &str) -> Result<()> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let Some(id) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let dir = self.root.join(&id);
            let Ok(Some(record)) = read_record(&self.root, &id) else {
                continue;
            };
            if record.namespace != namespace
                || !crate::credentials::references(&record.template.credentials, name)
                || !dir.join("credentials").is_dir()
            {
                continue;
            }
            if let Err(e) = self.write_credentials(&record, &dir, false) {
                tracing::warn!(sandbox = %record.name, "cannot rewrite credentials: {e}");
            }
        }
        Ok(())
    }

    /// The runner's own flags from the template.
    fn runner_args(&self, record: &Record, dir: &Path) -> Vec<String> {
        let mut args = vec!["--mode".into(), record.template.mode.clone()];
        if !record.template.credentials.is_empty() {
            args.push("--credentials-env".into());
            args.push(
                self.credentials_seen_at(dir)
                    .join(crate::credentials::ENV_FILE)
                    .to_string_lossy()
                    .into_owned(),
            );
        }
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
            record.host_uid = Some(new_host_uid()?);
        }
        Ok(serde_json::json!({
            "name": record.name,
            "dir": dir,
            "workspace": workspace,
            "runnerArgs": self.runner_args(record, dir),
            "credentials": (!record.template.credentials.is_empty()).then(|| dir.join("credentials")),
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
        // Credentials (crate::credentials): written afresh at every start (and again by a
        // rotation), so a start sees the latest. An isolated sandbox's spec (which assigns its
        // host uid) comes first. No value is in the spec, the flags or the environment.
        let spec = if isolated {
            Some(self.spec(record, &dir, &workspace)?)
        } else {
            None
        };
        self.write_credentials(record, &dir, true)?;
        if let Some(spec) = spec {
            let spec_path = dir.join("sandbox.spec.json");
            std::fs::write(&spec_path, spec.to_string())?;
            cmd.arg("sandbox").arg("--spec").arg(&spec_path);
            cmd.stdin(Stdio::piped());
        } else {
            cmd.args(["--listen", "127.0.0.1:0", "--workspace"])
                .arg(&workspace)
                .args(self.runner_args(record, &dir))
                .envs(self.environment(record, &workspace))
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
            std::thread::sleep(Duration::from_millis(1));
        };
        // A start counts as use: the idle time runs from here.
        let _ = std::fs::File::create(dir.join(ACTIVITY_FILE));
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

/// The unclaimed pooled sandboxes of `template`, oldest first: (directory name, record).
fn pool_entries(root: &Path, template: &str) -> Vec<(String, Record)> {
    let Ok(dir) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut out: Vec<(String, Record)> = dir
        .flatten()
        .filter_map(|e| {
            let id = e.file_name().to_str()?.to_owned();
            if !id.starts_with(POOL_PREFIX) || e.path().join(CLAIMED).exists() {
                return None;
            }
            let record = read_record(root, &id).ok()??;
            (record.template.name == template).then_some((id, record))
        })
        .collect();
    out.sort_by(|a, b| a.1.created_at.cmp(&b.1.created_at));
    out
}

/// Reads `<root>/<name>/sandbox.json`; `None` when there is none.
fn read_record(root: &Path, name: &str) -> Result<Option<Record>> {
    match std::fs::read(root.join(name).join("sandbox.json")) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::Backend(format!("sandbox {name:?}: bad record: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Replaces the record in `dir`: temp file, fsync, rename.
fn write_record(dir: &Path, record: &Record) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(record).map_err(|e| Error::Internal(e.to_string()))?;
    let tmp = dir.join(format!(".sandbox.json.{}", random_hex(4)));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join("sandbox.json"))?;
    Ok(())
}

/// Holds the sandbox's `lock` file (`flock`, exclusive) until the returned file is dropped:
/// stops and resumes of one sandbox never overlap, in one control plane or several sharing
/// the state directory (a sweep and a request, two requests waking it), so one sandbox never
/// gets two runners.
fn lock_sandbox(dir: &Path, name: &str) -> Result<std::fs::File> {
    let file = match std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::SandboxNotFound(name.into()))
        }
        Err(e) => return Err(e.into()),
    };
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| Error::Internal(format!("cannot lock sandbox {name:?}: {e}")))?;
    Ok(file)
}

/// When sandbox `name` was last used: the newest modification time of the runner's state
/// directory, its `invokes/` and `sessions/` (an invoke or session started, the
/// configuration changed), and of the activity file the control plane stamps when it proxies
/// a request and when the runner starts.
fn last_activity(root: &Path, name: &str) -> Option<SystemTime> {
    let dir = root.join(name);
    let state = dir.join("workspace").join(".agentbox");
    ["", "invokes", "sessions"]
        .iter()
        .map(|sub| state.join(sub))
        .chain([dir.join(ACTIVITY_FILE)])
        .filter_map(|path| std::fs::metadata(path).ok()?.modified().ok())
        .max()
}

/// Creates a pooled sandbox's [`CLAIMED`] file; false when it exists (somebody else has it).
fn mark_claimed(dir: &Path) -> bool {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dir.join(CLAIMED))
        .is_ok()
}

/// Stops a marked pooled sandbox and removes its directory.
fn remove_pooled(root: &Path, id: &str, record: &Record) {
    LocalBackend::halt(record);
    let tomb = root.join(format!("{DELETED_PREFIX}{id}-{}", random_hex(4)));
    if std::fs::rename(root.join(id), &tomb).is_ok() {
        let _ = std::fs::remove_dir_all(&tomb);
    }
}

/// Retires pooled sandboxes that are gone, too old or of an older version of their template,
/// and starts new ones until each pool has its size. One replica at a time (a `flock` on
/// `<root>/.pool.lock`; a replica finding it taken skips the round).
fn refill(launch: &Launch, templates: &[Template]) -> Result<()> {
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(launch.root.join(".pool.lock"))?;
    if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        return Ok(());
    }
    // A claim (or retirement) that died between its mark and its link leaves a marked entry
    // still under its pool name: after a minute, it is retired.
    for entry in std::fs::read_dir(&launch.root)?.flatten() {
        let Some(id) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if !id.starts_with(POOL_PREFIX) {
            continue;
        }
        let Ok(Some(record)) = read_record(&launch.root, &id) else {
            continue;
        };
        let mark = entry.path().join(CLAIMED);
        let stale = std::fs::metadata(&mark)
            .ok()
            .and_then(|m| m.modified().ok()?.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(60));
        if stale && record.name == id {
            remove_pooled(&launch.root, &id, &record);
            continue;
        }
        // The pool of a template that has none any more (or is gone) is emptied.
        let pooled = templates.iter().any(|t| t.name == record.template.name);
        if !pooled && !mark.exists() && mark_claimed(&entry.path()) {
            remove_pooled(&launch.root, &id, &record);
        }
    }
    for t in templates {
        let Some(pool) = &t.warm_pool else { continue };
        let max_age = pool
            .max_age
            .as_deref()
            .and_then(|a| crate::lifecycle::parse_duration(a).ok());
        let mut ready = 0;
        for (id, record) in pool_entries(&launch.root, &t.name) {
            let old = max_age.is_some_and(|age| {
                humantime::parse_rfc3339_weak(&record.created_at)
                    .ok()
                    .and_then(|at| at.elapsed().ok())
                    .is_some_and(|e| e > age)
            });
            let good = record.template == *t && record.running && record.alive() && !old;
            if good && ready < pool.size {
                ready += 1;
                continue;
            }
            // Retire it: marked first, so that no create claims it meanwhile.
            if mark_claimed(&launch.root.join(&id)) {
                remove_pooled(&launch.root, &id, &record);
            }
        }
        for _ in ready..pool.size {
            let id = format!("{POOL_PREFIX}{}", random_hex(8));
            std::fs::create_dir(launch.root.join(&id))?;
            let created_by = CreatedBy {
                email: None,
                display_name: None,
            };
            let mut record = Record {
                created_at: now_millis(),
                ..Record::fresh(id.clone(), String::new(), t.clone(), created_by)
            };
            if let Err(e) = launch.start(&mut record) {
                let _ = std::fs::remove_dir_all(launch.root.join(&id));
                return Err(e);
            }
            write_record(&launch.root.join(&id), &record)?;
        }
    }
    Ok(())
}

/// The most directory levels [`copy_tree`] descends (two descriptors held per level).
const COPY_MAX_DEPTH: usize = 128;

/// Copies the directory `from` into the new directory `to`, inside the two parent
/// directories given as descriptors: directories, regular files (reflinked where the
/// filesystem can, else copied with `copy_file_range`), symbolic links as links; modes and
/// file modification times kept; entries owned by `owner.0` become `owner.1`'s. Sockets,
/// FIFOs and devices are left out, and so is `skip` (a path below `from`). Nothing is ever
/// followed: every open is relative to its parent's descriptor with `O_NOFOLLOW`, so code in
/// the source sandbox swapping a directory for a link mid-copy cannot make the control plane
/// read outside that workspace. Answers the bytes copied.
fn copy_tree(from: &Path, to: &Path, skip: &Path, owner: Option<(u32, u32)>) -> Result<u64> {
    use rustix::fs::{Mode, OFlags, CWD};
    let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let src = rustix::fs::openat(CWD, from, dir_flags, Mode::empty())
        .map_err(|e| Error::Backend(format!("{}: {e}", from.display())))?;
    let meta = rustix::fs::fstat(&src).map_err(std::io::Error::from)?;
    rustix::fs::mkdirat(CWD, to, Mode::from_raw_mode(meta.st_mode & 0o7777))
        .map_err(std::io::Error::from)?;
    let dst =
        rustix::fs::openat(CWD, to, dir_flags, Mode::empty()).map_err(std::io::Error::from)?;
    chown_if(&dst, &meta, owner)?;
    let mut bytes = 0;
    copy_dir(&src, &dst, Path::new(""), skip, owner, 0, &mut bytes)?;
    Ok(bytes)
}

fn chown_if(fd: &OwnedFd, meta: &rustix::fs::Stat, owner: Option<(u32, u32)>) -> Result<()> {
    if let Some((from, to)) = owner.filter(|(from, _)| meta.st_uid == *from) {
        let id = rustix::process::Uid::from_raw(to);
        let gid =
            rustix::process::Gid::from_raw(if meta.st_gid == from { to } else { meta.st_gid });
        rustix::fs::fchown(fd, Some(id), Some(gid)).map_err(std::io::Error::from)?;
    }
    Ok(())
}

fn copy_dir(
    src: &OwnedFd,
    dst: &OwnedFd,
    rel: &Path,
    skip: &Path,
    owner: Option<(u32, u32)>,
    depth: usize,
    bytes: &mut u64,
) -> Result<()> {
    use rustix::fs::{AtFlags, FileType, Mode, OFlags};
    if depth > COPY_MAX_DEPTH {
        return Err(Error::InvalidRequest(format!(
            "the workspace is nested deeper than {COPY_MAX_DEPTH} directories at {}",
            rel.display()
        )));
    }
    let io = |e: rustix::io::Errno| Error::from(std::io::Error::from(e));
    let names: Vec<std::ffi::CString> = rustix::fs::Dir::read_from(src)
        .map_err(io)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_owned())
        .filter(|n| n.as_bytes() != b"." && n.as_bytes() != b"..")
        .collect();
    for name in names {
        let child = rel.join(std::ffi::OsStr::from_bytes(name.as_bytes()));
        if child == skip {
            continue;
        }
        let Ok(meta) = rustix::fs::statat(src, &name, AtFlags::SYMLINK_NOFOLLOW) else {
            continue; // gone meanwhile
        };
        let mode = Mode::from_raw_mode(meta.st_mode & 0o7777);
        match FileType::from_raw_mode(meta.st_mode) {
            FileType::Directory => {
                let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                let Ok(from) = rustix::fs::openat(src, &name, flags, Mode::empty()) else {
                    continue;
                };
                rustix::fs::mkdirat(dst, &name, Mode::from_raw_mode(0o700)).map_err(io)?;
                let to = rustix::fs::openat(dst, &name, flags, Mode::empty()).map_err(io)?;
                copy_dir(&from, &to, &child, skip, owner, depth + 1, bytes)?;
                rustix::fs::fchmod(&to, mode).map_err(io)?;
                chown_if(&to, &meta, owner)?;
            }
            FileType::RegularFile => {
                // Non-blocking, and checked again once open: a file swapped for a FIFO
                // meanwhile must not hang the copy.
                let Ok(from) = rustix::fs::openat(
                    src,
                    &name,
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
                    Mode::empty(),
                ) else {
                    continue;
                };
                let regular = rustix::fs::fstat(&from)
                    .is_ok_and(|m| FileType::from_raw_mode(m.st_mode) == FileType::RegularFile);
                if !regular {
                    continue;
                }
                let to = rustix::fs::openat(
                    dst,
                    &name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(io)?;
                let (from, to) = (std::fs::File::from(from), std::fs::File::from(to));
                if rustix::fs::ioctl_ficlone(&to, &from).is_err() {
                    std::io::copy(&mut &from, &mut &to)?;
                }
                *bytes += meta.st_size as u64;
                let modified = std::time::UNIX_EPOCH
                    + Duration::new(meta.st_mtime.max(0) as u64, meta.st_mtime_nsec as u32);
                let _ = to.set_modified(modified);
                let to = OwnedFd::from(to);
                rustix::fs::fchmod(&to, mode).map_err(io)?;
                chown_if(&to, &meta, owner)?;
            }
            FileType::Symlink => {
                let Ok(target) = rustix::fs::readlinkat(src, &name, Vec::new()) else {
                    continue;
                };
                rustix::fs::symlinkat(&target, dst, &name).map_err(io)?;
                if let Some((from, to)) = owner.filter(|(from, _)| meta.st_uid == *from) {
                    let gid = if meta.st_gid == from { to } else { meta.st_gid };
                    rustix::fs::chownat(
                        dst,
                        &name,
                        Some(rustix::process::Uid::from_raw(to)),
                        Some(rustix::process::Gid::from_raw(gid)),
                        AtFlags::SYMLINK_NOFOLLOW,
                    )
                    .map_err(io)?;
                }
            }
            _ => {}
        }
    }
    Ok(())
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
    /// A sandbox about to be started for the first time: a fresh token, nothing running yet.
    fn fresh(name: String, namespace: String, template: Template, created_by: CreatedBy) -> Self {
        Record {
            name,
            namespace,
            template,
            created_at: now_rfc3339(),
            created_by,
            running: true,
            addr: None,
            pid: None,
            pid_started: None,
            token: random_hex(32),
            message: None,
            isolated: false,
            limits_enforced: None,
            host_uid: None,
            timeout: None,
            idle_timeout: None,
            started_at: None,
            stop_reason: None,
            cloned_from: None,
        }
    }

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
            stop_reason: self
                .stop_reason
                .filter(|_| status == SandboxStatus::Stopped),
            timeout: self.timeout.clone(),
            idle_timeout: self.idle_timeout.clone(),
            expires_at: self
                .expires_at()
                .filter(|_| {
                    status == SandboxStatus::Running || self.stop_reason == Some(StopReason::Idle)
                })
                .map(|t| humantime::format_rfc3339_millis(t).to_string()),
            cloned_from: self.cloned_from.clone(),
            from_warm_pool: None,
        }
    }

    /// When its lifetime ends, if it has one.
    fn expires_at(&self) -> Option<SystemTime> {
        let lifetime = crate::lifecycle::parse_duration(self.timeout.as_deref()?).ok()?;
        let start = humantime::parse_rfc3339_weak(self.started_at.as_deref()?).ok()?;
        start.checked_add(lifetime)
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
        for entry in std::fs::read_dir(&root)?.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(DELETED_PREFIX)
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
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
            touched: Mutex::new(HashMap::new()),
            pool_counts: Mutex::new(HashMap::new()),
        })
    }

    /// `record` as the API shows it, with `lastActivityAt` read off the runner's state
    /// directory (no call to the runner): the newest modification time of the directory
    /// itself (the configuration is replaced there), of `invokes/` (a file is created there
    /// when an invoke starts, or the runner sets its time when it reuses a pruned one's) and of `sessions/`.
    fn summary(&self, record: &Record) -> SandboxSummary {
        let mut summary = record.summary();
        summary.last_activity_at = last_activity(&self.launch.root, &record.name)
            .map(|t| humantime::format_rfc3339_millis(t).to_string());
        summary
    }

    fn dir(&self, name: &str) -> Option<PathBuf> {
        valid_key(name).then(|| self.launch.root.join(name))
    }

    /// The directory of a new sandbox keyed `key`: an isolated sandbox's runner listens on
    /// `<dir>/runner.sock`, and a unix socket's path is at most 107 bytes, which a long name
    /// and namespace together (or a deep `--state-dir`) can pass.
    fn new_dir(&self, key: &str) -> Result<PathBuf> {
        let dir = self
            .dir(key)
            .ok_or_else(|| Error::InvalidRequest(format!("{key:?} is not a valid name")))?;
        let socket = dir.join("runner.sock");
        if self.launch.isolation == Isolation::Namespaces && socket.as_os_str().len() > 107 {
            let (name, namespace) = key.split_once('.').unwrap_or((key, "default"));
            // (The host's path is not the caller's business.)
            return Err(Error::InvalidRequest(format!(
                "sandbox {name:?} in namespace {namespace:?}: the name and the namespace are too \
                 long together for this control plane (its runner's socket path would pass the \
                 107 bytes of a unix socket path)"
            )));
        }
        Ok(dir)
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
        if !valid_key(name) {
            return Ok(None);
        }
        read_record(&self.launch.root, name)
    }

    /// Replaces `record` on disk (temp file, fsync, rename) on a blocking thread: the fsync
    /// would otherwise stall every stream of the runtime's one thread.
    async fn write(&self, record: &Record) -> Result<()> {
        let dir = self.launch.root.join(&record.name);
        let record = record.clone();
        blocking(move || write_record(&dir, &record)).await?
    }

    /// Claims a ready pooled sandbox of `spec`'s template for `spec.name`; `None` when none
    /// is ready.
    async fn claim(&self, spec: &CreateSpec) -> Result<Option<Record>> {
        let root = self.launch.root.clone();
        let spec = spec.clone();
        blocking(move || {
            for (id, mut record) in pool_entries(&root, &spec.template.name) {
                let pool_dir = root.join(&id);
                if record.template != spec.template || !record.running || !record.alive() {
                    continue;
                }
                // Exactly one claimer (or the refill retiring it) creates the mark.
                let marked = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(pool_dir.join(CLAIMED));
                if marked.is_err() {
                    continue;
                }
                let link = root.join(&spec.name);
                if let Err(e) = std::os::unix::fs::symlink(&id, &link) {
                    let _ = std::fs::remove_file(pool_dir.join(CLAIMED));
                    return Err(if e.kind() == std::io::ErrorKind::AlreadyExists {
                        Error::AlreadyExists(spec.name)
                    } else {
                        e.into()
                    });
                }
                record.name = spec.name.clone();
                record.namespace = spec.namespace.clone();
                record.created_at = now_rfc3339();
                record.created_by = spec.created_by.clone();
                record.timeout = spec.timeout.clone();
                record.idle_timeout = spec.idle_timeout.clone();
                record.started_at = Some(now_millis());
                write_record(&pool_dir, &record)?;
                let _ = std::fs::File::create(pool_dir.join(ACTIVITY_FILE));
                return Ok(Some(record));
            }
            Ok(None)
        })
        .await?
    }

    /// Stops `name` for `reason` under its lock (see [`Backend::stop_for`]); `None` when
    /// there was nothing to do.
    async fn stop_locked(
        &self,
        name: &str,
        reason: StopReason,
        idle_since: SystemTime,
    ) -> Result<Option<Record>> {
        if !valid_key(name) {
            return Err(Error::SandboxNotFound(name.into()));
        }
        let root = self.launch.root.clone();
        let name = name.to_owned();
        blocking(move || {
            let dir = root.join(&name);
            let _lock = lock_sandbox(&dir, &name)?;
            let Some(mut record) = read_record(&root, &name)? else {
                return Err(Error::SandboxNotFound(name));
            };
            let asleep = !record.running && record.stop_reason == Some(StopReason::Idle);
            match reason {
                StopReason::User => {}
                // A lifetime also ends while the sandbox sleeps.
                StopReason::Timeout if record.running || asleep => {}
                StopReason::Idle
                    if record.running
                        && last_activity(&root, &name).is_none_or(|t| t <= idle_since) => {}
                _ => return Ok(None),
            }
            LocalBackend::halt(&record);
            record.running = false;
            record.addr = None;
            record.stop_reason = Some(reason);
            write_record(&dir, &record)?;
            Ok(Some(record))
        })
        .await?
    }

    /// SIGTERM to the runner (it cancels its invokes), SIGKILL to whatever lingers. An isolated
    /// runner sits below the recorded launcher (which forwards the TERM), so every process
    /// group of the recorded process's subtree is signaled, not just its own.
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
        let dir = self.new_dir(&spec.name)?;
        let _one_at_a_time = self.create_lock.lock().await;
        let pooled = spec.template.warm_pool.as_ref().is_some_and(|p| p.size > 0);
        if pooled {
            let claimed = self.claim(&spec).await?;
            let mut counts = self.pool_counts.lock().unwrap_or_else(|p| p.into_inner());
            let entry = counts.entry(spec.template.name.clone()).or_default();
            if let Some(record) = claimed {
                entry.0 += 1;
                drop(counts);
                tracing::info!(sandbox = %record.name, "sandbox created from the warm pool");
                let mut summary = self.summary(&record);
                summary.from_warm_pool = Some(true);
                return Ok(summary);
            }
            entry.1 += 1;
        }
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(Error::AlreadyExists(spec.name))
            }
            Err(e) => return Err(e.into()),
        }
        let record = Record {
            timeout: spec.timeout,
            idle_timeout: spec.idle_timeout,
            started_at: Some(now_millis()),
            ..Record::fresh(spec.name, spec.namespace, spec.template, spec.created_by)
        };
        let (record, started) = self.start(record).await?;
        if let Err(e) = started {
            // A create that failed leaves nothing behind: the name can be used again.
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        self.write(&record).await?;
        tracing::info!(sandbox = %record.name, "sandbox created");
        let mut summary = self.summary(&record);
        summary.from_warm_pool = pooled.then_some(false);
        Ok(summary)
    }

    async fn delete(&self, name: &str) -> Result<()> {
        if self.read(name)?.is_none() {
            return Err(Error::SandboxNotFound(name.into()));
        }
        let (root, name) = (self.launch.root.clone(), name.to_owned());
        blocking(move || {
            let dir = root.join(&name);
            // A sandbox claimed from the warm pool is a link to the pooled directory.
            let pooled = std::fs::symlink_metadata(&dir)
                .is_ok_and(|m| m.file_type().is_symlink())
                .then(|| std::fs::canonicalize(&dir).ok())
                .flatten();
            // Under the sandbox's lock, so that no resume (a request waking it, another
            // replica) starts a runner meanwhile; the directory leaves the name at once (a
            // rename), and a waiting resume or stop then finds no sandbox.
            let tomb = root.join(format!("{DELETED_PREFIX}{name}-{}", random_hex(4)));
            {
                let _lock = lock_sandbox(&dir, &name)?;
                let Some(mut record) = read_record(&root, &name)? else {
                    return Err(Error::SandboxNotFound(name));
                };
                record.running = false;
                write_record(&dir, &record)?;
                Self::halt(&record);
                match &pooled {
                    Some(real) => {
                        std::fs::rename(real, &tomb)?;
                        std::fs::remove_file(&dir)?;
                    }
                    None => std::fs::rename(&dir, &tomb)?,
                }
            }
            // Gone for the API already; what is left (another replica starting may remove
            // it too) is removed at the next start.
            if let Err(e) = std::fs::remove_dir_all(&tomb) {
                tracing::warn!(sandbox = %name, error = %e, "a deleted sandbox's files are left");
            }
            tracing::info!(sandbox = %name, "sandbox deleted");
            Ok(())
        })
        .await?
    }

    async fn stop(&self, name: &str) -> Result<SandboxSummary> {
        let record = self
            .stop_locked(name, StopReason::User, SystemTime::now())
            .await?
            .ok_or_else(|| Error::Internal("a stop by a user always stops".into()))?;
        Ok(self.summary(&record))
    }

    async fn stop_for(
        &self,
        name: &str,
        reason: StopReason,
        idle_since: SystemTime,
    ) -> Result<Option<SandboxSummary>> {
        Ok(self
            .stop_locked(name, reason, idle_since)
            .await?
            .map(|r| self.summary(&r)))
    }

    async fn expire(&self, name: &str) -> Result<()> {
        let Some(record) = self.read(name)? else {
            return Ok(());
        };
        match record.template.on_timeout.unwrap_or_default() {
            OnTimeout::Delete => match self.delete(name).await {
                Err(Error::SandboxNotFound(_)) => Ok(()),
                other => other,
            },
            OnTimeout::Stop => self
                .stop_locked(name, StopReason::Timeout, SystemTime::now())
                .await
                .map(|_| ()),
        }
    }

    async fn resume(&self, name: &str) -> Result<SandboxSummary> {
        if !valid_key(name) {
            return Err(Error::SandboxNotFound(name.into()));
        }
        let (root, launch, name) = (
            self.launch.root.clone(),
            self.launch.clone(),
            name.to_owned(),
        );
        let record = blocking(move || {
            let dir = root.join(&name);
            let _lock = lock_sandbox(&dir, &name)?;
            let Some(mut record) = read_record(&root, &name)? else {
                return Err(Error::SandboxNotFound(name));
            };
            if record.running && record.alive() {
                return Ok(record);
            }
            // A resume on demand continues the lifetime; any other starts a new one.
            if record.stop_reason != Some(StopReason::Idle) || record.started_at.is_none() {
                record.started_at = Some(now_millis());
            }
            let started = launch.start(&mut record);
            if started.is_ok() {
                record.stop_reason = None;
            }
            write_record(&dir, &record)?;
            started.map(|()| record)
        })
        .await??;
        Ok(self.summary(&record))
    }

    async fn refill_pools(&self, templates: &[Template]) -> Result<()> {
        let pooled: Vec<Template> = templates
            .iter()
            .filter(|t| t.warm_pool.as_ref().is_some_and(|p| p.size > 0))
            // Credentials are a namespace's, and a pooled sandbox has none yet: such a
            // template's creates start cold.
            .filter(|t| t.credentials.is_empty())
            .cloned()
            .collect();
        let launch = self.launch.clone();
        blocking(move || refill(&launch, &pooled)).await?
    }

    fn warm_pools(&self, templates: &[Template]) -> Vec<agentbox_proto::WarmPoolInfo> {
        let counts = self
            .pool_counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        templates
            .iter()
            .filter_map(|t| {
                let size = t.warm_pool.as_ref()?.size;
                let ready = pool_entries(&self.launch.root, &t.name)
                    .iter()
                    .filter(|(_, r)| r.template == *t && r.running && r.alive())
                    .count() as u32;
                let (hits, misses) = counts.get(&t.name).copied().unwrap_or_default();
                Some(agentbox_proto::WarmPoolInfo {
                    template: t.name.clone(),
                    size,
                    ready,
                    hits,
                    misses,
                })
            })
            .collect()
    }

    fn keeps_lifecycle(&self) -> bool {
        true
    }

    fn touch(&self, name: &str) {
        let now = Instant::now();
        {
            let mut touched = self.touched.lock().unwrap_or_else(|p| p.into_inner());
            if touched
                .get(name)
                .is_some_and(|t| now.duration_since(*t) < TOUCH_EVERY)
            {
                return;
            }
            // Bounded: one entry per sandbox used in the last moments.
            if touched.len() >= 10_000 {
                touched.retain(|_, t| now.duration_since(*t) < TOUCH_EVERY);
            }
            touched.insert(name.to_owned(), now);
        }
        let Some(dir) = self.dir(name) else {
            return;
        };
        // Never created here: a deleted sandbox's directory must not come back.
        if let Ok(f) = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join(ACTIVITY_FILE))
        {
            let _ = f.set_modified(SystemTime::now());
        }
    }

    async fn clone_sandbox(
        &self,
        source: &str,
        name: &str,
        created_by: CreatedBy,
    ) -> Result<SandboxSummary> {
        let Some(src) = self.read(source)? else {
            return Err(Error::SandboxNotFound(source.into()));
        };
        let dir = self.new_dir(name)?;
        let _one_at_a_time = self.create_lock.lock().await;
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(Error::AlreadyExists(name.into()))
            }
            Err(e) => return Err(e.into()),
        }
        let host_uid = match src.host_uid {
            Some(_) if rustix::process::geteuid().is_root() => Some(new_host_uid()?),
            _ => None,
        };
        let record = Record {
            host_uid,
            timeout: src.timeout.clone(),
            idle_timeout: src.idle_timeout.clone(),
            started_at: Some(now_millis()),
            cloned_from: Some(source.to_owned()),
            ..Record::fresh(
                name.to_owned(),
                src.namespace.clone(),
                src.template.clone(),
                created_by,
            )
        };
        // The workspace and the runner's configuration (so a configure with the same install
        // hash skips the install), not the source's invoke journals.
        let from = self.launch.root.join(source).join("workspace");
        let to = dir.join("workspace");
        let owner = src.host_uid.zip(host_uid);
        let copied =
            blocking(move || copy_tree(&from, &to, Path::new(".agentbox/invokes"), owner)).await?;
        let started = match copied {
            Ok(bytes) => {
                tracing::info!(sandbox = %name, source = %source, bytes, "workspace copied");
                let (record, started) = self.start(record).await?;
                started.map(|()| record)
            }
            Err(e) => Err(e),
        };
        let record = match started {
            Ok(record) => record,
            Err(e) => {
                let _ = blocking(move || std::fs::remove_dir_all(dir)).await;
                return Err(e);
            }
        };
        self.write(&record).await?;
        tracing::info!(sandbox = %record.name, source = %source, "sandbox cloned");
        Ok(self.summary(&record))
    }

    async fn credentials_changed(&self, namespace: &str, name: &str) -> Result<()> {
        let launch = self.launch.clone();
        let (namespace, name) = (namespace.to_owned(), name.to_owned());
        blocking(move || launch.rewrite_credentials(&namespace, &name)).await?
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
            stop_reason: record.stop_reason.filter(|_| !record.running),
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
