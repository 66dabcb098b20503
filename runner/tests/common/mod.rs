//! Test harness: starts the real `agentbox-runner` binary on an ephemeral port with its own
//! temporary workspace, reads the bound address from its first line, and talks HTTP to it.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const TOKEN: &str = "test-token-0123456789";

/// A running runner; stopped (SIGTERM, then SIGKILL) on drop.
pub struct Runner {
    pub child: Child,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    pub workspace: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub client: reqwest::Client,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_agentbox-runner")
}

impl Runner {
    /// `<state>/invokes`, where each invoke's journal and summary live.
    pub fn invokes_dir(&self) -> PathBuf {
        self.workspace.join(".agentbox").join("invokes")
    }

    /// The files of `invokes/` with extension `ext`.
    fn invoke_files(&self, ext: &str) -> Vec<PathBuf> {
        std::fs::read_dir(self.invokes_dir())
            .map(|dir| {
                dir.map(|e| e.unwrap().path())
                    .filter(|p| p.extension().is_some_and(|e| e == ext))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The journal (`<name>.events`) holding invoke `id`'s events, found by its `start` event:
    /// a pair recycled from a pruned invoke keeps the name it was created with.
    pub fn journal_of(&self, id: &str) -> Option<PathBuf> {
        let own_start = format!("id: 1\nevent: start\ndata: {{\"invokeId\":\"{id}\"");
        self.invoke_files("events").into_iter().find(|p| {
            let mut head = vec![0u8; own_start.len()];
            std::fs::File::open(p)
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
                .is_ok_and(|()| head == own_start.as_bytes())
        })
    }

    /// A summary file (`<name>.json`) whose last line names invoke `id` (not a spare's, which
    /// a NUL first byte bars).
    pub fn summary_file_of(&self, id: &str) -> Option<PathBuf> {
        let own = format!("\"invokeId\":\"{id}\"");
        self.invoke_files("json").into_iter().find(|p| {
            std::fs::read_to_string(p).is_ok_and(|text| {
                !text.starts_with('\0')
                    && text
                        .lines()
                        .rev()
                        .find(|l| !l.is_empty())
                        .is_some_and(|l| l.contains(&own))
            })
        })
    }

    /// A runner in a fresh temporary directory.
    pub fn start(extra: &[&str]) -> Runner {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut r = Runner::start_in(&dir, extra);
        r._tmp = Some(tmp);
        r
    }

    /// A runner using `dir` (workspace `dir/ws`, token file `dir/token`); used for restarts.
    pub fn start_in(dir: &Path, extra: &[&str]) -> Runner {
        let workspace = dir.join("ws");
        std::fs::create_dir_all(&workspace).unwrap();
        std::fs::write(dir.join("token"), format!("{TOKEN}\n")).unwrap();
        let mut cmd = Command::new(bin());
        cmd.arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--workspace")
            .arg(&workspace)
            .arg("--token-file")
            .arg(dir.join("token"))
            .args(extra)
            .env("AGENTBOX_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let addr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .trim()
            .parse()
            .unwrap();
        Runner {
            child,
            addr,
            dir: dir.to_path_buf(),
            workspace: std::fs::canonicalize(workspace).unwrap(),
            _tmp: None,
            client: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.get(self.url(path)).bearer_auth(TOKEN)
    }

    /// An authenticated GET of `path`, as JSON (whatever the status).
    #[allow(dead_code)] // not every test binary uses it
    pub async fn get_json(&self, path: &str) -> Value {
        self.get(path).send().await.unwrap().json().await.unwrap()
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.post(self.url(path)).bearer_auth(TOKEN)
    }

    /// Configure with `Accept: application/json`; returns (status, body).
    pub async fn configure_json(&self, body: Value) -> (u16, Value) {
        let resp = self
            .post("/v1/configure")
            .header("accept", "application/json")
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap())
    }

    /// Configures `sh -c SCRIPT` as the entrypoint.
    pub async fn configure_sh(&self, script: &str) {
        let (status, body) = self
            .configure_json(json!({"entrypoint": ["sh", "-c", script]}))
            .await;
        assert_eq!(status, 200, "{body}");
    }

    /// Invokes over SSE and reads the stream to its end.
    pub async fn invoke_sse(&self, query: &str, stdin: impl Into<reqwest::Body>) -> Vec<Event> {
        let resp = self
            .post(&format!("/v1/invoke{query}"))
            .body(stdin)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        parse_sse(&resp.bytes().await.unwrap())
    }

    /// Stops the runner with SIGKILL (no cleanup), keeping the directory.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid()),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Kills a child process on drop, so a failing test leaves nothing running.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[allow(unused_imports)]
pub use agentbox_testkit::sse::{parse_sse, parse_sse_prefix, rebuild, Event};

pub fn exit_event(events: &[Event]) -> &Value {
    let last = events.last().expect("no events");
    assert_eq!(last.event, "exit", "last event is not exit: {events:?}");
    &last.data
}

/// Whether a process exists at all (zombies included).
pub fn pid_exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Waits for a file to appear (written by a child process) and returns its trimmed content.
pub async fn wait_for_file(path: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if text.ends_with('\n') {
                return text.trim().to_owned();
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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
        match tokio::time::timeout(Duration::from_secs(30), resp.chunk()).await {
            Ok(Ok(Some(chunk))) => buf.extend_from_slice(&chunk),
            other => panic!("stream ended before the awaited event: {other:?}"),
        }
    }
}
