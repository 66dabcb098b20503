//! `POST /v1/configure`: validate the files, write them atomically, run the install command
//! once per distinct configuration, persist what is in force.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use agentbox_proto::{event, ConfigureResult, ErrorEvent};
use base64::Engine;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::fsutil::{now_rfc3339, random_hex, write_atomic_at};
use crate::jail::Jail;
use crate::journal::EventLog;
use crate::state::Stored;
use crate::supervisor::{self, Process, RunSpec};
use crate::AppState;

/// Finished install journals kept for inspection.
const KEEP_INSTALL_LOGS: usize = 5;

/// A validated configure request: nothing in it can escape the workspace. The files' bytes
/// wait in a staging directory, not in memory.
#[derive(Debug)]
pub struct Plan {
    files: Vec<PlannedFile>,
    install: Option<Vec<String>>,
    entrypoint: Option<Vec<String>>,
    env: Option<BTreeMap<String, String>>,
    protocol: Option<agentbox_proto::AgentProtocol>,
    agents: Option<BTreeMap<String, agentbox_proto::AgentSpec>>,
    default_agent: Option<String>,
    mcp_servers: Option<Vec<serde_json::Value>>,
    hash: String,
    /// `?stream=live`: the install's output framed live (see [`crate::supervisor::RunSpec`]).
    live: bool,
    staging: Staging,
}

impl Plan {
    /// Frames the install's output live (`?stream=live`) instead of by whole lines.
    pub fn with_live_output(mut self, live: bool) -> Self {
        self.live = live;
        self
    }

    /// Whether the request named an entrypoint.
    pub fn has_entrypoint(&self) -> bool {
        self.entrypoint.is_some()
    }
}

#[derive(Debug)]
struct PlannedFile {
    rel: String,
    /// The decoded content, in the staging directory.
    staged: PathBuf,
    size: u64,
    mode: u32,
}

/// Where a configure's files wait between the request and the write
/// (`<state>/staging/<time>-<random>/<n>`); removed when the configure is done, and any left
/// by a crash at the next start ([`recover`]).
#[derive(Debug)]
struct Staging {
    dir: PathBuf,
}

impl Staging {
    fn new(state_dir: &Path) -> std::io::Result<Staging> {
        let dir = state_dir.join(STAGING).join(format!(
            "{:013}-{}",
            crate::fsutil::now_ms(),
            random_hex(4)
        ));
        std::fs::create_dir_all(&dir)?;
        Ok(Staging { dir })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The staging directory's name under the state directory.
const STAGING: &str = "staging";

/// The manifest of a configure being written: the hash it records once done, and what each
/// file replaced.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Manifest {
    hash: String,
    entries: Vec<Replaced>,
}

/// What a configure file replaced: `backup` (a hard link or copy of the old file, in the
/// staging directory), `symlink` (the old entry was that symlink) or nothing (it was new).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Replaced {
    rel: String,
    backup: Option<String>,
    symlink: Option<String>,
}

const MANIFEST: &str = "manifest.json";

/// The install command running, recorded for the next runner (`installs/running.json`).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct RunningInstall {
    pid: i32,
    start_time: Option<u64>,
    marker: String,
}

const RUNNING_INSTALL: &str = "running.json";

/// Keeps what the entry `at` holds now in `staging` (as `backup-<i>`), for a rollback.
fn back_up(at: &crate::jail::Parent, staging: &Path, i: usize) -> std::io::Result<Replaced> {
    use rustix::fs::{AtFlags, FileType};
    let errno = |e: rustix::io::Errno| std::io::Error::from_raw_os_error(e.raw_os_error());
    let rel = at.rel.to_string_lossy().into_owned();
    let st = match rustix::fs::statat(&at.dir, at.name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => {
            return Ok(Replaced {
                rel,
                backup: None,
                symlink: None,
            })
        }
        Err(e) => return Err(errno(e)),
    };
    match FileType::from_raw_mode(st.st_mode) {
        FileType::Symlink => {
            let target =
                rustix::fs::readlinkat(&at.dir, at.name.as_os_str(), Vec::new()).map_err(errno)?;
            Ok(Replaced {
                rel,
                backup: None,
                symlink: Some(target.to_string_lossy().into_owned()),
            })
        }
        FileType::RegularFile => {
            let name = format!("backup-{i}");
            let staging_fd = std::fs::File::open(staging)?;
            match rustix::fs::linkat(
                &at.dir,
                at.name.as_os_str(),
                &staging_fd,
                name.as_str(),
                AtFlags::empty(),
            ) {
                Ok(()) => {}
                // The state directory is on another filesystem: a copy, with its mode.
                Err(rustix::io::Errno::XDEV) => {
                    let fd = rustix::fs::openat(
                        &at.dir,
                        at.name.as_os_str(),
                        rustix::fs::OFlags::RDONLY
                            | rustix::fs::OFlags::NOFOLLOW
                            | rustix::fs::OFlags::CLOEXEC,
                        rustix::fs::Mode::empty(),
                    )
                    .map_err(errno)?;
                    let mut old = std::fs::File::from(fd);
                    let mut copy = std::fs::File::create(staging.join(&name))?;
                    std::io::copy(&mut old, &mut copy)?;
                    rustix::fs::fchmod(&copy, rustix::fs::Mode::from_raw_mode(st.st_mode & 0o7777))
                        .map_err(errno)?;
                }
                Err(e) => return Err(errno(e)),
            }
            Ok(Replaced {
                rel,
                backup: Some(name),
                symlink: None,
            })
        }
        // A directory (the write will fail and nothing is replaced) or a special file.
        _ => Ok(Replaced {
            rel,
            backup: None,
            symlink: None,
        }),
    }
}

/// Cleans up after a runner that died: kills the install command it left running (its whole
/// tree), puts back the files of a configure whose hash was not recorded (so files and hash
/// change together or not at all), and removes staging directories. Runs at start, before
/// anything is served.
pub fn recover(cfg: &crate::config::Config, jail: &Jail, recorded_hash: Option<&str>) {
    let record = cfg.state_dir.join("installs").join(RUNNING_INSTALL);
    if let Some(running) = std::fs::read(&record)
        .ok()
        .and_then(|b| serde_json::from_slice::<RunningInstall>(&b).ok())
    {
        let root = crate::proctree::recorded_root(running.pid, running.start_time);
        let killed =
            crate::proctree::signal(root, &running.marker, nix::sys::signal::Signal::SIGKILL);
        tracing::warn!(
            killed,
            "killed the install command a previous runner left running"
        );
    }
    let _ = std::fs::remove_file(&record);
    // A runner killed right after the spawn may not have written the record: look for the
    // installs of this workspace by their environment as well.
    let workspace = format!("AGENTBOX_WORKSPACE={}", cfg.workspace.display());
    for (pid, marker) in install_processes(workspace.as_bytes()) {
        let root = nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid))).map_or(0, |g| {
            if g.as_raw() == pid {
                pid
            } else {
                0
            }
        });
        let killed = crate::proctree::signal(root, &marker, nix::sys::signal::Signal::SIGKILL);
        tracing::warn!(
            pid,
            killed,
            "killed an install command a previous runner left running"
        );
    }
    let root = cfg.state_dir.join(STAGING);
    for dir in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        let dir = dir.path();
        let Some(manifest) = std::fs::read(dir.join(MANIFEST))
            .ok()
            .and_then(|b| serde_json::from_slice::<Manifest>(&b).ok())
        else {
            continue;
        };
        if recorded_hash == Some(manifest.hash.as_str()) {
            continue; // Committed: only the cleanup was missed.
        }
        let mut restored = 0;
        for entry in &manifest.entries {
            if let Err(e) = roll_back(jail, &dir, entry) {
                tracing::error!(path = %entry.rel, error = %e, "cannot put back a file of an unfinished configure");
            } else {
                restored += 1;
            }
        }
        tracing::warn!(
            restored,
            "rolled back the files of a configure a previous runner did not finish"
        );
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// Processes whose environment holds `workspace` and an install marker: (pid, marker).
fn install_processes(workspace: &[u8]) -> Vec<(i32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let vars = || env.split(|b| *b == 0);
        if !vars().any(|v| v == workspace) {
            continue;
        }
        if let Some(marker) = vars().find(|v| v.starts_with(b"AGENTBOX_INSTALL_ID=")) {
            found.push((pid, String::from_utf8_lossy(marker).into_owned()));
        }
    }
    found
}

fn roll_back(jail: &Jail, staging: &Path, entry: &Replaced) -> Result<()> {
    use rustix::fs::AtFlags;
    let io = |e: rustix::io::Errno| Error::Internal(e.to_string());
    let at = match jail.parent(&entry.rel, false) {
        Ok(at) => at,
        Err(Error::FileNotFound(_)) => return Ok(()),
        Err(e) => return Err(e),
    };
    let name = at.name.as_os_str();
    match (&entry.backup, &entry.symlink) {
        (Some(backup), _) => {
            let staging_fd = std::fs::File::open(staging)?;
            rustix::fs::renameat(&staging_fd, backup.as_str(), &at.dir, name).map_err(io)
        }
        (None, Some(target)) => {
            match rustix::fs::unlinkat(&at.dir, name, AtFlags::empty()) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                Err(e) => return Err(io(e)),
            }
            rustix::fs::symlinkat(target.as_str(), &at.dir, name).map_err(io)
        }
        (None, None) => match rustix::fs::unlinkat(&at.dir, name, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(io(e)),
        },
    }
}

/// Reads a configure body as it arrives and checks it: each file is checked (jail, duplicates,
/// size, the running total and count) the moment its entry is parsed, its bytes go to the
/// staging directory, and the body itself is cut off past its limit. So a request over a limit
/// is refused after reading at most one entry past it, and memory holds one file's content at
/// a time, never the body.
pub async fn read_plan(app: &Arc<AppState>, body: axum::body::Body) -> Result<Plan> {
    use futures_util::TryStreamExt;
    let cfg = &app.cfg;
    // Base64 grows content by 4/3; allow for JSON around it.
    let limit = cfg.max_total_bytes.saturating_mul(4) / 3 + (8 << 20);
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(stream));
    let app = Arc::clone(app);
    tokio::task::spawn_blocking(move || {
        let mut body = Counted {
            inner: std::io::BufReader::with_capacity(64 << 10, reader),
            left: limit,
            exceeded: false,
        };
        let staging = Staging::new(&app.cfg.state_dir)?;
        let state = std::cell::RefCell::new(Intake {
            app: &app,
            staging: &staging,
            files: Vec::new(),
            seen: BTreeSet::new(),
            total: 0,
            failure: None,
        });
        let mut de = serde_json::Deserializer::from_reader(&mut body);
        let parsed = serde::de::DeserializeSeed::deserialize(RequestSeed(&state), &mut de)
            .and_then(|fields| de.end().map(|()| fields));
        let intake = state.into_inner();
        let fields = match (parsed, intake.failure) {
            (_, Some(e)) => return Err(e),
            (Err(_), None) if body.exceeded => {
                return Err(Error::PayloadTooLarge(format!(
                    "the request body is larger than {limit} bytes"
                )))
            }
            (Err(e), None) if e.is_io() => {
                return Err(Error::InvalidRequest(format!(
                    "cannot read the request body: {e}"
                )))
            }
            (Err(e), None) => {
                return Err(Error::InvalidRequest(format!(
                    "the body is not valid JSON for this route: {e}"
                )))
            }
            (Ok(fields), None) => fields,
        };
        let files = intake.files;
        finish_plan(files, fields, staging)
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))?
}

/// The request body, counted: past `left` bytes reads fail (and `exceeded` is set).
struct Counted<R> {
    inner: R,
    left: u64,
    exceeded: bool,
}

impl<R: std::io::Read> std::io::Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            self.exceeded = true;
            return Err(std::io::Error::other("the request body is too large"));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// What the parse has accepted so far; a check that fails leaves its error in `failure`.
struct Intake<'a> {
    app: &'a AppState,
    staging: &'a Staging,
    files: Vec<PlannedFile>,
    seen: BTreeSet<String>,
    total: u64,
    failure: Option<Error>,
}

impl Intake<'_> {
    /// Checks one file entry and stages its bytes.
    fn add(&mut self, spec: agentbox_proto::FileSpec) -> Result<()> {
        let (app, cfg) = (self.app, &self.app.cfg);
        if self.files.len() as u64 >= cfg.max_files {
            return Err(Error::PayloadTooLarge(format!(
                "more than {} files, the limit is {}",
                cfg.max_files, cfg.max_files
            )));
        }
        let rel = app.jail.relative(&spec.path)?;
        if rel.as_os_str().is_empty() {
            return Err(Error::InvalidPath(format!(
                "{:?} names the workspace itself, not a file in it",
                spec.path
            )));
        }
        // Checked now (nothing written before every path passed), opened again by descriptor
        // when written, so a swap in between cannot lead outside either.
        app.jail.resolve(&spec.path)?;
        let rel = rel.to_string_lossy().into_owned();
        if !self.seen.insert(rel.clone()) {
            return Err(Error::InvalidRequest(format!(
                "{:?} is given more than once",
                spec.path
            )));
        }
        let bytes = match (spec.content, spec.content_base64) {
            (Some(text), None) => text.into_bytes(),
            (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(|e| {
                    Error::InvalidRequest(format!(
                        "{:?}: contentBase64 is not base64: {e}",
                        spec.path
                    ))
                })?,
            (None, None) => Vec::new(),
            (Some(_), Some(_)) => {
                return Err(Error::InvalidRequest(format!(
                    "{:?}: give content or contentBase64, not both",
                    spec.path
                )))
            }
        };
        if bytes.len() as u64 > cfg.max_file_bytes {
            return Err(Error::PayloadTooLarge(format!(
                "{:?} is {} bytes, the limit is {}",
                spec.path,
                bytes.len(),
                cfg.max_file_bytes
            )));
        }
        self.total += bytes.len() as u64;
        if self.total > cfg.max_total_bytes {
            return Err(Error::PayloadTooLarge(format!(
                "the files add up to more than {} bytes",
                cfg.max_total_bytes
            )));
        }
        let mode = spec.mode.unwrap_or(0o644);
        if mode > 0o7777 {
            return Err(Error::InvalidRequest(format!(
                "{:?}: mode {mode:o} is not a permission mode",
                spec.path
            )));
        }
        let staged = self.staging.dir.join(self.files.len().to_string());
        std::fs::write(&staged, &bytes)
            .map_err(|e| Error::Internal(format!("staging a file: {e}")))?;
        self.files.push(PlannedFile {
            rel,
            staged,
            size: bytes.len() as u64,
            mode,
        });
        Ok(())
    }
}

/// The request's other fields (files go straight to the [`Intake`]).
#[derive(Default)]
struct Fields {
    install: Option<Vec<String>>,
    entrypoint: Option<Vec<String>>,
    env: Option<BTreeMap<String, String>>,
    protocol: Option<agentbox_proto::AgentProtocol>,
    agents: Option<BTreeMap<String, agentbox_proto::AgentSpec>>,
    default_agent: Option<String>,
    mcp_servers: Option<Vec<serde_json::Value>>,
}

struct RequestSeed<'s, 'a>(&'s std::cell::RefCell<Intake<'a>>);

impl<'de> serde::de::DeserializeSeed<'de> for RequestSeed<'_, '_> {
    type Value = Fields;
    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        d: D,
    ) -> std::result::Result<Fields, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for RequestSeed<'_, '_> {
    type Value = Fields;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a configure request object")
    }
    fn visit_map<M: serde::de::MapAccess<'de>>(
        self,
        mut map: M,
    ) -> std::result::Result<Fields, M::Error> {
        let mut fields = Fields::default();
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "files" => map.next_value_seed(FilesSeed(self.0))?,
                "installCommand" => fields.install = map.next_value()?,
                "entrypoint" => fields.entrypoint = map.next_value()?,
                "env" => fields.env = map.next_value()?,
                "protocol" => fields.protocol = map.next_value()?,
                "agents" => fields.agents = map.next_value()?,
                "defaultAgent" => fields.default_agent = map.next_value()?,
                "mcpServers" => fields.mcp_servers = map.next_value()?,
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(fields)
    }
}

struct FilesSeed<'s, 'a>(&'s std::cell::RefCell<Intake<'a>>);

impl<'de> serde::de::DeserializeSeed<'de> for FilesSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for FilesSeed<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of files")
    }
    fn visit_seq<S: serde::de::SeqAccess<'de>>(
        self,
        mut seq: S,
    ) -> std::result::Result<(), S::Error> {
        use serde::de::Error as _;
        while let Some(spec) = seq.next_element::<agentbox_proto::FileSpec>()? {
            let mut intake = self.0.borrow_mut();
            if let Err(e) = intake.add(spec) {
                intake.failure = Some(e);
                return Err(S::Error::custom("a file was refused"));
            }
        }
        Ok(())
    }
}

/// Checks the rest of the request and computes the install hash from the staged files.
fn finish_plan(mut files: Vec<PlannedFile>, req: Fields, staging: Staging) -> Result<Plan> {
    check_agents(req.agents.as_ref(), req.mcp_servers.as_ref())?;
    for (name, argv) in [
        ("installCommand", &req.install),
        ("entrypoint", &req.entrypoint),
    ] {
        if let Some(argv) = argv {
            if argv.is_empty() || argv[0].is_empty() {
                return Err(Error::InvalidRequest(format!(
                    "{name} must be a non-empty argv array"
                )));
            }
            if argv.iter().any(|a| a.contains('\0')) {
                return Err(Error::InvalidRequest(format!("{name} contains a NUL byte")));
            }
        }
    }
    if let Some(env) = &req.env {
        if let Some(bad) = env
            .iter()
            .find(|(k, v)| k.is_empty() || k.contains(['=', '\0']) || v.contains('\0'))
        {
            return Err(Error::InvalidRequest(format!(
                "env name {:?} is not a valid variable name",
                bad.0
            )));
        }
    }
    files.sort_by(|a, b| a.rel.cmp(&b.rel));
    let hash = install_hash(&files, req.install.as_deref())
        .map_err(|e| Error::Internal(format!("reading a staged file: {e}")))?;
    Ok(Plan {
        files,
        protocol: match (&req.entrypoint, req.protocol) {
            (_, Some(p)) => Some(p),
            (Some(_), None) => Some(agentbox_proto::AgentProtocol::Plain),
            (None, None) => None,
        },
        install: req.install,
        entrypoint: req.entrypoint,
        env: req.env,
        agents: req.agents,
        default_agent: req.default_agent,
        mcp_servers: req.mcp_servers,
        hash,
        live: false,
        staging,
    })
}

/// Checks the named agents and MCP servers of a request (at most 64 agents).
fn check_agents(
    agents: Option<&BTreeMap<String, agentbox_proto::AgentSpec>>,
    mcp_servers: Option<&Vec<serde_json::Value>>,
) -> Result<()> {
    let bad_env = |env: &BTreeMap<String, String>| {
        env.keys()
            .find(|k| k.is_empty() || k.contains(['=', '\0']))
            .cloned()
            .or_else(|| {
                env.iter()
                    .find(|(_, v)| v.contains('\0'))
                    .map(|(k, _)| k.clone())
            })
    };
    if let Some(servers) = mcp_servers {
        agentbox_proto::check_mcp_servers(servers).map_err(Error::InvalidRequest)?;
    }
    let Some(agents) = agents else {
        return Ok(());
    };
    if agents.len() > 64 {
        return Err(Error::InvalidRequest(format!(
            "{} agents, the limit is 64",
            agents.len()
        )));
    }
    for (name, spec) in agents {
        if !agentbox_proto::valid_session_id(name) {
            return Err(Error::InvalidRequest(format!(
                "agent name {name:?}: use 1 to 128 of A-Z a-z 0-9 . _ - (not starting with . or -)"
            )));
        }
        if spec.entrypoint.is_empty() || spec.entrypoint[0].is_empty() {
            return Err(Error::InvalidRequest(format!(
                "agents.{name}.entrypoint must be a non-empty argv array"
            )));
        }
        if spec.entrypoint.iter().any(|a| a.contains('\0')) {
            return Err(Error::InvalidRequest(format!(
                "agents.{name}.entrypoint contains a NUL byte"
            )));
        }
        if let Some(bad) = spec.env.as_ref().and_then(bad_env) {
            return Err(Error::InvalidRequest(format!(
                "agents.{name}.env: {bad:?} is not a valid variable name or its value holds a NUL"
            )));
        }
        if let Some(servers) = &spec.mcp_servers {
            agentbox_proto::check_mcp_servers(servers)
                .map_err(|e| Error::InvalidRequest(format!("agents.{name}: {e}")))?;
        }
    }
    Ok(())
}

/// The next configuration's agent fields: `agents`, `defaultAgent` and `mcpServers` replace
/// the stored ones when given; the default agent must exist.
fn next_config(plan: &Plan, stored: &Stored, env: BTreeMap<String, String>) -> Result<Stored> {
    let protocol = plan
        .protocol
        .or(stored.protocol)
        .filter(|p| *p == agentbox_proto::AgentProtocol::Acp);
    let renamed = plan.agents.is_some() || plan.default_agent.is_some();
    let next = Stored {
        entrypoint: plan
            .entrypoint
            .clone()
            .or_else(|| stored.entrypoint.clone()),
        env,
        protocol,
        agents: plan.agents.clone().unwrap_or_else(|| stored.agents.clone()),
        default_agent: if renamed {
            plan.default_agent.clone()
        } else {
            stored.default_agent.clone()
        },
        mcp_servers: plan
            .mcp_servers
            .clone()
            .unwrap_or_else(|| stored.mcp_servers.clone()),
        ..stored.clone()
    };
    if next.entrypoint.is_none() && next.agents.is_empty() {
        return Err(Error::InvalidRequest(
            "entrypoint (or agents) is required on the first configure".into(),
        ));
    }
    match next.default_agent() {
        Some(name) if next.agent(Some(&name)).is_some() => Ok(next),
        Some(name) => Err(Error::InvalidRequest(format!(
            "defaultAgent {name:?} is not one of the agents"
        ))),
        None => Err(Error::InvalidRequest(
            "with several agents and no entrypoint, name the defaultAgent".into(),
        )),
    }
}

/// Whether `plan` would leave a usable configuration over the one in force now.
pub fn check_next(app: &AppState, plan: &Plan) -> Result<()> {
    let stored = app.store.get();
    let env = plan.env.clone().unwrap_or_else(|| stored.env.clone());
    next_config(plan, &stored, env).map(|_| ())
}

/// `entrypoint`, `agents` and `defaultAgent` of a configure's result.
fn in_force(stored: &Stored) -> (Vec<String>, Vec<String>, Option<String>) {
    let agents = stored.agents();
    let default = stored.default_agent();
    let entrypoint = stored
        .agent(default.as_deref())
        .map(|a| a.entrypoint)
        .unwrap_or_default();
    let names = if stored.agents.is_empty() {
        Vec::new()
    } else {
        agents.into_iter().map(|a| a.name).collect()
    };
    (
        entrypoint,
        names,
        default.filter(|_| !stored.agents.is_empty()),
    )
}

/// sha256 over a canonical, length-prefixed encoding of the files (sorted by path: path,
/// mode, bytes) and the install command, so no two different configurations collide. The
/// bytes are read back from the staging directory.
fn install_hash(files: &[PlannedFile], install: Option<&[String]>) -> std::io::Result<String> {
    let mut h = Sha256::new();
    fn field(h: &mut Sha256, bytes: &[u8]) {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    field(&mut h, b"agentbox-configure-v1");
    field(&mut h, &(files.len() as u64).to_le_bytes());
    for f in files {
        field(&mut h, f.rel.as_bytes());
        field(&mut h, &f.mode.to_le_bytes());
        h.update(f.size.to_le_bytes());
        std::io::copy(&mut std::fs::File::open(&f.staged)?, &mut h)?;
    }
    match install {
        None => field(&mut h, b"no-install"),
        Some(argv) => {
            field(&mut h, &(argv.len() as u64).to_le_bytes());
            for arg in argv {
                field(&mut h, arg.as_bytes());
            }
        }
    }
    Ok(hex::encode(h.finalize()))
}

/// Starts a configure in the background: it holds the configure lock, appends `log` events of
/// the install and then `result` (or `error`) to the returned log, and also hands the outcome to
/// the returned receiver. It goes on even if the client leaves.
pub fn start(
    app: &Arc<AppState>,
    plan: Plan,
) -> Result<(Arc<EventLog>, oneshot::Receiver<Result<ConfigureResult>>)> {
    let dir = app.cfg.state_dir.join("installs");
    std::fs::create_dir_all(&dir)?;
    prune_install_logs(&dir);
    let name = format!("{:013}-{}.events", crate::fsutil::now_ms(), random_hex(4));
    let log = EventLog::create(&dir.join(name), app.cfg.journal_max_bytes)?;
    let (tx, rx) = oneshot::channel();
    let app = Arc::clone(app);
    let task_log = Arc::clone(&log);
    tokio::spawn(async move {
        let outcome = run(&app, plan, &task_log).await;
        task_log.append(|b| match &outcome {
            Ok(result) => {
                b.event(event::RESULT, result);
            }
            Err(e) => {
                let phase = match e {
                    Error::InstallFailed(_) => "install",
                    _ => "configure",
                };
                b.event(
                    event::ERROR,
                    &ErrorEvent {
                        phase: Some(phase.into()),
                        message: e.to_string(),
                    },
                );
            }
        });
        task_log.close();
        let _ = tx.send(outcome);
    });
    Ok((log, rx))
}

async fn run(app: &Arc<AppState>, plan: Plan, log: &Arc<EventLog>) -> Result<ConfigureResult> {
    let started = Instant::now();
    let _serialized = app.store.lock.lock().await;
    let stored = app.store.get();
    let env = plan.env.clone().unwrap_or_else(|| stored.env.clone());
    let next = next_config(&plan, &stored, env)?;

    if stored.install_command_hash.as_deref() == Some(plan.hash.as_str()) {
        let in_force_now = if next != stored {
            let next = Stored {
                last_configured_at: Some(now_rfc3339()),
                ..next
            };
            app.store.save(next.clone())?;
            next
        } else {
            stored
        };
        tracing::info!(hash = %plan.hash, "configure skipped: same files and install command");
        let (entrypoint, agents, default_agent) = in_force(&in_force_now);
        return Ok(ConfigureResult {
            install_command_hash: plan.hash,
            install_exit_code: 0,
            skipped: true,
            entrypoint,
            agents,
            default_agent,
            last_configured_at: in_force_now.last_configured_at.unwrap_or_default(),
            duration_ms: started.elapsed().as_millis() as u64,
        });
    }

    let files = plan.files;
    let staging = plan.staging;
    let writer = Arc::clone(app);
    let staging_dir = staging.dir.clone();
    let new_hash = plan.hash.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        // First what the files replace, with the new hash, in the staging directory: a runner
        // that dies before the new hash is recorded puts it back at its next start.
        let mut manifest = Manifest {
            hash: new_hash,
            entries: Vec::with_capacity(files.len()),
        };
        for (i, f) in files.iter().enumerate() {
            let at = writer.jail.parent(&f.rel, true)?;
            manifest
                .entries
                .push(back_up(&at, &staging_dir, i).map_err(|e| {
                    Error::Internal(format!("keeping the old {}: {e}", Jail::shown(&at.rel)))
                })?);
        }
        let bytes = serde_json::to_vec(&manifest).map_err(|e| Error::Internal(e.to_string()))?;
        crate::fsutil::write_atomic(&staging_dir.join(MANIFEST), &bytes, 0o600)
            .map_err(|e| Error::Internal(format!("writing the configure manifest: {e}")))?;
        for f in &files {
            let at = writer.jail.parent(&f.rel, true)?;
            let shown = Jail::shown(&at.rel);
            let mut staged = std::fs::File::open(&f.staged)
                .map_err(|e| Error::Internal(format!("reading the staged {shown}: {e}")))?;
            write_atomic_at(at.dir.as_fd(), &at.name, &mut staged, f.mode)
                .map_err(|e| Error::Internal(format!("writing {shown}: {e}")))?;
        }
        Ok(())
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))??;

    let exit_code = match &plan.install {
        None => 0,
        Some(argv) => install(app, argv, &next.env, log, plan.live).await?,
    };
    if exit_code != 0 {
        tracing::warn!(
            exit_code,
            "install failed; the previous configuration stays in force"
        );
        let (entrypoint, agents, default_agent) = in_force(&stored);
        return Ok(ConfigureResult {
            install_command_hash: plan.hash,
            install_exit_code: exit_code,
            skipped: false,
            entrypoint,
            agents,
            default_agent,
            // Always a timestamp on the wire: this attempt's when nothing was configured yet.
            last_configured_at: stored.last_configured_at.unwrap_or_else(now_rfc3339),
            duration_ms: started.elapsed().as_millis() as u64,
        });
    }
    let now = now_rfc3339();
    // The new hash and the files now change together: the staging directory (with its
    // manifest) goes only after this.
    let next = Stored {
        install_command: plan.install,
        install_command_hash: Some(plan.hash.clone()),
        last_configured_at: Some(now.clone()),
        ..next
    };
    app.store.save(next.clone())?;
    drop(staging);
    tracing::info!(hash = %plan.hash, "configured");
    let (entrypoint, agents, default_agent) = in_force(&next);
    Ok(ConfigureResult {
        install_command_hash: plan.hash,
        install_exit_code: 0,
        skipped: false,
        entrypoint,
        agents,
        default_agent,
        last_configured_at: now,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// Runs the install command under supervision (its own process group, the install timeout),
/// streaming its output into `log`; returns its exit code.
async fn install(
    app: &Arc<AppState>,
    argv: &[String],
    env: &BTreeMap<String, String>,
    log: &Arc<EventLog>,
    live: bool,
) -> Result<i32> {
    let id = random_hex(8);
    let mut full_env = app.cfg.child_env();
    full_env.extend(env.iter().map(|(k, v)| (k.clone(), v.clone())));
    full_env.push(("AGENTBOX_INSTALL_ID".into(), id.clone()));
    full_env.push((
        "AGENTBOX_WORKSPACE".into(),
        app.cfg.workspace.display().to_string(),
    ));
    let marker = format!("AGENTBOX_INSTALL_ID={id}");
    let spec = RunSpec {
        argv: app.jail.map_argv(argv),
        env: full_env,
        cwd: app.cfg.workspace.clone(),
        marker: marker.clone(),
        stdin: false,
        pass_fds: Default::default(),
        live,
        pty: None,
    };
    let process = Process::new(marker.clone());
    let (tx, rx) = oneshot::channel();
    {
        let reaper = Arc::clone(&app.reaper);
        let process = Arc::clone(&process);
        let log = Arc::clone(log);
        let record = app.cfg.state_dir.join("installs").join(RUNNING_INSTALL);
        let marker = marker.clone();
        crate::pool::run(move || {
            let outcome = supervisor::run(&reaper, &spec, &process, &log, None, |child| {
                // For the next runner, should this one die first (`recover`).
                let running = RunningInstall {
                    pid: child.pid,
                    start_time: child.start_time,
                    marker,
                };
                if let Ok(bytes) = serde_json::to_vec(&running) {
                    let _ = crate::fsutil::write_replace(&record, &bytes, 0o600, false);
                }
            });
            let _ = std::fs::remove_file(&record);
            let _ = tx.send(outcome);
        })
        .map_err(|e| Error::Internal(format!("cannot start a thread: {e}")))?;
    }
    let timer = {
        let process = Arc::clone(&process);
        let (limit, grace) = (app.cfg.install_timeout, app.cfg.grace);
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(limit) => {
                    process.stop(agentbox_proto::ExitReason::Timeout, grace);
                }
                _ = process.wait_done() => {}
            }
        })
    };
    let outcome = rx
        .await
        .map_err(|_| Error::Internal("install thread died".into()));
    timer.abort();
    let outcome = outcome?;
    if outcome.stop_reason.is_some() {
        return Err(Error::InstallFailed(format!(
            "the install command did not finish within {}",
            humantime::format_duration(app.cfg.install_timeout)
        )));
    }
    match outcome.status {
        Ok(status) => Ok(status.code),
        Err(message) => Err(Error::InstallFailed(message)),
    }
}

fn prune_install_logs(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut names: Vec<PathBuf> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
    names.sort();
    let excess = names.len().saturating_sub(KEEP_INSTALL_LOGS);
    for path in names.into_iter().take(excess) {
        let _ = std::fs::remove_file(path);
    }
}
