//! Test harness: starts the real `agentbox-controlplane` binary (one or more replicas on one
//! state directory) with an API keys file, real local `agentbox-runner` sandboxes behind it, and
//! talks HTTP to it. Every process started for a test carries a unique `CP_TEST_TAG` in its
//! environment or this test's directory in its command line or working directory (sandboxes get
//! none of the control plane's environment), so the end of a test can find and stop every one
//! of them: no runner outlives the test run.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

pub mod docker;
pub mod escape;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use reqwest::Method;
use serde_json::{json, Value};
use sha2::Digest;

/// An administrator's key (all namespaces).
pub const ADMIN_KEY: &str = "cpt-admin-key-7f3a9c21d84e55b0";
/// A key limited to namespace `team-a`.
pub const TEAM_A_KEY: &str = "cpt-team-a-key-52be0d6f91ac3377";
/// A key that is in no keys file.
pub const WRONG_KEY: &str = "cpt-wrong-key-0a1b2c3d4e5f6789";
/// The environment variable that marks every process of one test.
pub const TAG_VAR: &str = "CP_TEST_TAG";

pub fn cp_bin() -> &'static str {
    env!("CARGO_BIN_EXE_agentbox-controlplane")
}

/// The runner binary, next to the test executable's target directory
/// (`target/debug/deps/<test>-<hash>` → `target/debug/agentbox-runner`).
pub fn runner_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps");
    let bin = dir.join("agentbox-runner");
    assert!(
        bin.is_file(),
        "{} does not exist: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        bin.display()
    );
    bin
}

pub fn sha256_hex(secret: &str) -> String {
    hex::encode(sha2::Sha256::digest(secret.as_bytes()))
}

/// One entry of a keys file: (name, key, namespaces, admin).
pub type KeySpec<'a> = (&'a str, &'a str, &'a [&'a str], bool);

/// The keys every test starts with: `admin` (all namespaces) and `a` (team-a only).
pub const DEFAULT_KEYS: &[KeySpec<'static>] = &[
    ("admin", ADMIN_KEY, &[], true),
    ("a", TEAM_A_KEY, &["team-a"], false),
];

/// A temporary directory with a state directory and a keys file. On drop, every process of the
/// test still running (launchers, runners, invokes, control planes) is stopped.
pub struct Env {
    pub root: PathBuf,
    pub state: PathBuf,
    pub keys_file: PathBuf,
    pub tag: String,
    _tmp: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        let tmp = tempfile::Builder::new().prefix("cpt-").tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let tag = root.file_name().unwrap().to_string_lossy().into_owned();
        let env = Env {
            state: root.join("state"),
            keys_file: root.join("keys.json"),
            root,
            tag,
            _tmp: tmp,
        };
        env.write_keys(DEFAULT_KEYS);
        env
    }

    /// Replaces the keys file (atomically, as an operator's tooling would).
    pub fn write_keys(&self, keys: &[KeySpec<'_>]) {
        let entries: Vec<Value> = keys
            .iter()
            .map(|(name, key, namespaces, admin)| {
                json!({
                    "name": name,
                    "sha256": sha256_hex(key),
                    "namespaces": namespaces,
                    "admin": admin,
                })
            })
            .collect();
        let tmp = self.root.join(".keys.json.tmp");
        std::fs::write(&tmp, json!({ "keys": entries }).to_string()).unwrap();
        std::fs::rename(&tmp, &self.keys_file).unwrap();
    }

    /// The standard flags, with `isolation` (`none` or `namespaces`).
    pub fn args(&self, isolation: &str) -> Vec<String> {
        vec![
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--state-dir".into(),
            self.state.display().to_string(),
            "--api-keys-file".into(),
            self.keys_file.display().to_string(),
            "--runner-bin".into(),
            runner_bin().display().to_string(),
            "--isolation".into(),
            isolation.into(),
        ]
    }

    /// A control plane with the standard flags and no isolation.
    pub fn start(&self) -> Cp {
        self.spawn(&self.args("none"))
    }

    /// A control plane with the standard flags plus `extra`.
    pub fn start_with(&self, isolation: &str, extra: &[&str]) -> Cp {
        let mut args = self.args(isolation);
        args.extend(extra.iter().map(|s| s.to_string()));
        self.spawn(&args)
    }

    /// The control-plane command with a clean environment (no `AGENTBOX_*` from the caller),
    /// `AGENTBOX_LOG=warn` and this test's tag.
    pub fn command(&self, args: &[String]) -> Command {
        let mut cmd = Command::new(cp_bin());
        cmd.args(args);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("AGENTBOX_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("AGENTBOX_LOG", "warn")
            .env(TAG_VAR, &self.tag)
            .stdin(Stdio::null());
        cmd
    }

    /// Starts a control plane with exactly `args` and reads its `listening on ADDR` line.
    pub fn spawn(&self, args: &[String]) -> Cp {
        self.spawn_command(self.command(args))
    }

    /// Starts `cmd` (a control plane) and reads its `listening on ADDR` line.
    pub fn spawn_command(&self, mut cmd: Command) -> Cp {
        cmd.stderr(Stdio::inherit());
        self.spawn_command_keeping_stderr(cmd)
    }

    /// [`Env::spawn_command`] with the command's own stderr (a log file, say).
    pub fn spawn_command_keeping_stderr(&self, mut cmd: Command) -> Cp {
        let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let Some(addr) = line.strip_prefix("listening on ") else {
            let _ = child.kill();
            let status = child.wait();
            panic!("the control plane did not start: first line {line:?}, {status:?}");
        };
        let addr: SocketAddr = addr.trim().parse().unwrap();
        Cp {
            child,
            addr,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
            _stdout: stdout,
        }
    }

    pub fn sandbox_dir(&self, name: &str) -> PathBuf {
        self.state.join("sandboxes").join(name)
    }

    pub fn workspace(&self, name: &str) -> PathBuf {
        self.sandbox_dir(name).join("workspace")
    }

    /// The backend's record of a sandbox (`sandbox.json`).
    pub fn record(&self, name: &str) -> Value {
        let bytes = std::fs::read(self.sandbox_dir(name).join("sandbox.json")).unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    pub fn audit_log(&self) -> String {
        std::fs::read_to_string(self.state.join("audit.log")).unwrap_or_default()
    }

    /// Live (non-zombie) processes carrying this test's tag, except `except`.
    pub fn tagged_pids(&self, except: &[i32]) -> Vec<i32> {
        let needle = format!("{TAG_VAR}={}", self.tag);
        let me = std::process::id() as i32;
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return out;
        };
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            if pid == me || except.contains(&pid) || !alive(pid) {
                continue;
            }
            // The tag, where the environment was passed on (the control plane itself); a
            // sandbox gets none of the control plane's environment, so its launcher and runner
            // are known by this test's directory in their command line or working directory.
            let tagged = std::fs::read(entry.path().join("environ")).is_ok_and(|environ| {
                environ
                    .split(|b| *b == 0)
                    .any(|var| var == needle.as_bytes())
            });
            let root = self.root.as_os_str().as_encoded_bytes();
            let in_root = std::fs::read(entry.path().join("cmdline"))
                .is_ok_and(|c| c.windows(root.len()).any(|w| w == root))
                || std::fs::read_link(entry.path().join("cwd"))
                    .is_ok_and(|c| c.starts_with(&self.root));
            if tagged || in_root {
                out.push(pid);
            }
        }
        out.sort_unstable();
        out
    }

    /// Waits (bounded) until no process of this test but `except` is alive; returns the rest.
    pub fn wait_no_tagged(&self, except: &[i32], within: Duration) -> Vec<i32> {
        let deadline = Instant::now() + within;
        loop {
            let left = self.tagged_pids(except);
            if left.is_empty() || Instant::now() > deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops every process of this test: SIGTERM (runners cancel their invokes), then SIGKILL
    /// whatever is left after a grace period. Returns the processes that had to be killed.
    pub fn sweep(&self) -> Vec<i32> {
        // The process groups the backend recorded (in case /proc/PID/environ is unreadable),
        // when the recorded start time shows it is still the same process.
        let me = nix::unistd::getpgrp().as_raw();
        let dirs = std::fs::read_dir(self.state.join("sandboxes"));
        for dir in dirs.into_iter().flatten().flatten() {
            let Ok(bytes) = std::fs::read(dir.path().join("sandbox.json")) else {
                continue;
            };
            let Ok(record) = serde_json::from_slice::<Value>(&bytes) else {
                continue;
            };
            let (Some(pid), Some(started)) =
                (record["pid"].as_i64(), record["pidStarted"].as_u64())
            else {
                continue;
            };
            let pid = pid as i32;
            if pid > 1 && pid != me && start_time(pid) == Some(started) {
                let _ = nix::sys::signal::killpg(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        for pid in self.tagged_pids(&[]) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let left = self.wait_no_tagged(&[], Duration::from_secs(10));
        for pid in &left {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        self.wait_no_tagged(&[], Duration::from_secs(5));
        left
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.sweep();
    }
}

/// The start time of a process (field 22 of `/proc/PID/stat`).
pub fn start_time(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let close = text.rfind(')')?;
    text.get(close + 1..)?
        .split_ascii_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(text) => text
            .rfind(')')
            .and_then(|c| text.get(c + 2..c + 3))
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// A running control plane; killed on drop (it is stateless; sandboxes outlive it).
pub struct Cp {
    pub child: Child,
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    _stdout: BufReader<ChildStdout>,
}

impl Cp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// A request with `key` in `X-API-Key` (none when `None`).
    pub fn req(&self, method: Method, path: &str, key: Option<&str>) -> reqwest::RequestBuilder {
        let rb = self.client.request(method, self.url(path));
        match key {
            Some(k) => rb.header("x-api-key", k),
            None => rb,
        }
    }

    /// A request as the administrator.
    pub fn admin(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.req(method, path, Some(ADMIN_KEY))
    }

    /// `/api/v1/sandboxes/{name}{rest}` as the administrator.
    pub fn sb(&self, method: Method, name: &str, rest: &str) -> reqwest::RequestBuilder {
        self.admin(method, &format!("/api/v1/sandboxes/{name}{rest}"))
    }

    /// Creates a sandbox as the administrator; asserts 201 and returns the summary.
    pub async fn create(&self, name: &str, template: &str) -> Value {
        let (status, body) = send(self.admin(Method::POST, "/api/v1/sandboxes").json(&json!({
            "name": name,
            "templateRef": {"name": template, "kind": "ClusterSandboxTemplate"},
        })))
        .await;
        assert_eq!(status, 201, "create {name}: {body}");
        body
    }

    /// Configures over SSE; asserts 200 and a final `result` event, which it returns with
    /// every event.
    pub async fn configure(&self, name: &str, body: Value) -> (Value, Vec<Event>) {
        let resp = self
            .sb(Method::POST, name, "/configure")
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap();
        assert_eq!(
            status,
            200,
            "configure {name}: {}",
            String::from_utf8_lossy(&bytes)
        );
        let events = parse_sse(&bytes);
        let last = events.last().expect("configure sent no events");
        assert_eq!(
            last.event, "result",
            "configure did not succeed: {events:?}"
        );
        (last.data.clone(), events)
    }

    /// Creates sandbox `name` from the `default` template and configures `sh -c script`.
    pub async fn sandbox_sh(&self, name: &str, script: &str) -> Value {
        self.create(name, "default").await;
        self.configure_sh(name, script).await
    }

    /// Configures `sh -c SCRIPT` as the entrypoint.
    pub async fn configure_sh(&self, name: &str, script: &str) -> Value {
        self.configure(name, json!({"entrypoint": ["sh", "-c", script]}))
            .await
            .0
    }

    /// Invokes over SSE as the administrator and reads the stream to its end.
    pub async fn invoke(&self, name: &str, stdin: impl Into<reqwest::Body>) -> Vec<Event> {
        let resp = self
            .sb(Method::POST, name, "/invoke")
            .body(stdin)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap();
        assert_eq!(
            status,
            200,
            "invoke {name}: {}",
            String::from_utf8_lossy(&bytes)
        );
        parse_sse(&bytes)
    }

    /// Deletes a sandbox as the administrator; asserts 200.
    pub async fn delete(&self, name: &str) {
        let (status, body) = send(self.sb(Method::DELETE, name, "")).await;
        assert_eq!(status, 200, "delete {name}: {body}");
    }

    /// GET /metrics (no credential).
    pub async fn metrics(&self) -> String {
        let resp = self.client.get(self.url("/metrics")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.text().await.unwrap()
    }

    /// SIGKILL, no cleanup.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Cp {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Sends a request; returns the status and the body as JSON (a JSON string of the raw text
/// when it is not JSON, `null` when empty).
pub async fn send(rb: reqwest::RequestBuilder) -> (u16, Value) {
    let resp = rb.send().await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.unwrap();
    (status, to_json(&bytes))
}

pub fn to_json(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

/// Asserts a `{"error": code, "message": "..."}` body.
#[track_caller]
pub fn assert_error(body: &Value, code: &str) {
    assert_eq!(body["error"], code, "unexpected body {body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "no message in {body}"
    );
}

#[allow(unused_imports)]
pub use agentbox_testkit::sse::{parse_sse, parse_sse_prefix, rebuild, Event};

/// The `exit` event, which must be the last one.
#[track_caller]
pub fn exit_event(events: &[Event]) -> &Value {
    let last = events.last().expect("no events");
    assert_eq!(last.event, "exit", "last event is not exit: {events:?}");
    &last.data
}

/// The invoke id of the `start` event.
#[track_caller]
pub fn invoke_id(events: &[Event]) -> String {
    events
        .iter()
        .find(|e| e.event == "start")
        .and_then(|e| e.data["invokeId"].as_str())
        .unwrap_or_else(|| panic!("no start event in {events:?}"))
        .to_owned()
}

/// Reads an SSE response until an event matching `pred` arrives; returns everything so far.
pub async fn read_until(
    resp: &mut reqwest::Response,
    buf: &mut Vec<u8>,
    pred: impl Fn(&Event) -> bool,
) -> Vec<Event> {
    loop {
        let (events, _) = parse_sse_prefix(buf);
        if events.iter().any(&pred) {
            return events;
        }
        match tokio::time::timeout(Duration::from_secs(20), resp.chunk()).await {
            Ok(Ok(Some(chunk))) => buf.extend_from_slice(&chunk),
            other => panic!(
                "stream ended before the awaited event: {other:?}; so far {:?}",
                String::from_utf8_lossy(buf)
            ),
        }
    }
}

/// Reads an SSE response to its end (bounded) and returns every event.
pub async fn read_to_end(resp: &mut reqwest::Response, buf: &mut Vec<u8>) -> Vec<Event> {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), resp.chunk()).await {
            Ok(Ok(Some(chunk))) => buf.extend_from_slice(&chunk),
            Ok(Ok(None)) => return parse_sse(buf),
            other => panic!(
                "stream did not end: {other:?}; so far {:?}",
                String::from_utf8_lossy(buf)
            ),
        }
    }
}

/// Polls `f` until it returns `Some` or `within` passes.
pub async fn eventually<T, F, Fut>(within: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The parent of the process whose command line has `arg` as an argument, and that parent's
/// name.
pub fn parent_of_process_with_arg(arg: &str) -> Option<(i32, String)> {
    let pid = agentbox_testkit::pid_with_arg(arg)?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`: the name may hold spaces, so split after its `)`.
    let ppid: i32 = stat
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{ppid}/comm")).ok()?;
    Some((ppid, comm.trim().to_owned()))
}

/// Continues a stopped process when dropped (a failed assertion included).
pub struct Stopped(nix::unistd::Pid);

impl Stopped {
    pub fn stop(pid: i32) -> Stopped {
        let pid = nix::unistd::Pid::from_raw(pid);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

/// Downloads `file` (`size` zero bytes) from the server on `port` of sandbox `name` through
/// the preview proxy, stopping the runner (`SIGSTOP`; the server's parent, found by `marker`,
/// an argument on the server's command line) once the first MiB has arrived. Where the runner
/// handed the connection over (`handed_over`), the download goes on to its end without it;
/// through a tunnel it stalls until the runner continues (3 s show that). Every byte is counted.
pub async fn download_with_the_runner_stopped(
    cp: &Cp,
    name: &str,
    port: u16,
    file: &str,
    marker: &str,
    size: usize,
    handed_over: bool,
) {
    let mut resp = cp
        .sb(Method::GET, name, &format!("/preview/{port}/{file}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{name}");
    let mut got = 0usize;
    let mut nonzero = 0usize;
    while got < 1 << 20 {
        let chunk = resp.chunk().await.unwrap().expect("more bytes");
        got += chunk.len();
        nonzero += chunk.iter().filter(|b| **b != 0).count();
    }
    let (runner, comm) = parent_of_process_with_arg(marker).expect("the server's parent");
    // An isolated runner runs as `/.agentbox/runner` inside.
    assert!(
        comm == "agentbox-runner" || comm == "runner",
        "{name}: the server's parent is {comm}"
    );
    let stopped = Stopped::stop(runner);
    let rest = async {
        while let Some(chunk) = resp.chunk().await.unwrap() {
            got += chunk.len();
            nonzero += chunk.iter().filter(|b| **b != 0).count();
        }
    };
    // Through a tunnel, 3 s are ample to show a stall; a handoff gets longer to finish on a
    // loaded machine.
    let wait = Duration::from_secs(if handed_over { 30 } else { 3 });
    let finished = tokio::time::timeout(wait, rest).await.is_ok();
    if handed_over {
        assert!(
            finished,
            "{name}: with the runner stopped, {got} of {size} bytes arrived in {wait:?}"
        );
        drop(stopped);
    } else {
        assert!(
            !finished && got < size,
            "{name}: through the runner's tunnel, {got} bytes arrived with the runner stopped"
        );
        drop(stopped);
        while let Some(chunk) = resp.chunk().await.unwrap() {
            got += chunk.len();
            nonzero += chunk.iter().filter(|b| **b != 0).count();
        }
    }
    assert_eq!((got, nonzero), (size, 0), "{name}");
}
