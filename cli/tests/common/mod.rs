//! Harness of the CLI's end-to-end tests: `agentbox up` in a fresh temporary directory (the
//! embedded control plane with the local backend, runners as plain processes), `agentbox`
//! commands run from that directory, and a check that no process of the test outlives it.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

/// How long any single CLI command may take before the test fails.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// The `agentbox` binary under test.
pub fn bin() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_agentbox"));
    let runner = bin.with_file_name("agentbox-runner");
    assert!(
        runner.is_file(),
        "{} is missing: the local backend starts it from next to `agentbox`; \
         run `cargo build --workspace --bins` first (scripts/test.sh does)",
        runner.display()
    );
    bin
}

/// A command of the binary under test, with no `AGENTBOX_*` variable of the caller's
/// environment leaking into it, no stdin, run in `dir`.
pub fn agentbox(dir: &Path) -> Command {
    let mut cmd = Command::new(bin());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AGENTBOX_") {
            cmd.env_remove(key);
        }
    }
    cmd.current_dir(dir).stdin(Stdio::null());
    cmd
}

/// What a finished command left.
pub struct Out {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub elapsed: Duration,
}

impl Out {
    /// The exit code (`None` when a signal ended it).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// Panics with everything printed unless it exited with `code`.
    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(self.code(), Some(code), "unexpected exit: {self:?}");
        self
    }
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let clip = |b: &[u8]| {
            let shown = String::from_utf8_lossy(&b[..b.len().min(4000)]).into_owned();
            if b.len() > 4000 {
                format!("{shown}… ({} bytes)", b.len())
            } else {
                shown
            }
        };
        f.debug_struct("Out")
            .field("status", &self.status)
            .field("stdout", &clip(&self.stdout))
            .field("stderr", &clip(&self.stderr))
            .field("elapsed", &self.elapsed)
            .finish()
    }
}

/// Runs `cmd` to the end with `stdin` as its standard input; kills it and fails the test after
/// `timeout`.
pub fn run_with(mut cmd: Command, stdin: Option<&[u8]>, timeout: Duration) -> Out {
    let started = Instant::now();
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().unwrap();
    let writer = stdin.map(|bytes| {
        let mut pipe = child.stdin.take().unwrap();
        let bytes = bytes.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&bytes);
        })
    });
    let out_reader = read_all(child.stdout.take().unwrap());
    let err_reader = read_all(child.stderr.take().unwrap());
    let status = wait_bounded(&mut child, timeout).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{cmd:?} did not finish within {timeout:?}");
    });
    if let Some(w) = writer {
        w.join().unwrap();
    }
    Out {
        status,
        stdout: out_reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
        elapsed: started.elapsed(),
    }
}

/// Reads a pipe to its end on a thread.
pub fn read_all(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// Waits for `child` for at most `timeout`.
pub fn wait_bounded(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Lines of a pipe, sent on a channel as they come (each with its `\n`, if it had one).
pub fn lines_of(r: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(r);
        loop {
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// Reads lines from `rx` until one satisfies `want`; fails after `timeout` or at the end.
/// Everything read is appended to `seen`.
#[track_caller]
pub fn wait_line(
    rx: &Receiver<String>,
    seen: &mut String,
    timeout: Duration,
    want: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                seen.push_str(&line);
                if want(&line) {
                    return line;
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                panic!("no expected line within {timeout:?}; output so far:\n{seen}")
            }
            Err(RecvTimeoutError::Disconnected) => {
                panic!("the output ended without the expected line; output:\n{seen}")
            }
        }
    }
}

/// Whether `pid` is a live process (not gone, not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rfind(')')
                .and_then(|i| stat.get(i + 2..i + 3))
                .unwrap_or("?");
            state != "Z" && state != "X"
        }
        Err(_) => false,
    }
}

/// Waits until `pid` is gone; false when it is still there after `timeout`.
pub fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Live processes whose command line or environment mentions `needle` (a test's temporary
/// directory: runners get their workspace as an argument, invokes get AGENTBOX_WORKSPACE).
pub fn processes_mentioning(needle: &str) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let hit = |b: &[u8]| b.windows(needle.len()).any(|w| w == needle.as_bytes());
        if (hit(&cmdline) || hit(&environ)) && alive(pid) {
            let shown = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            found.push((pid, shown));
        }
    }
    found
}

/// The runner pids recorded in `<state>/sandboxes/*/sandbox.json`.
pub fn recorded_runner_pids(state_dir: &Path) -> Vec<(String, i32)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(state_dir.join("sandboxes")) else {
        return out;
    };
    for entry in entries.flatten() {
        let Ok(bytes) = std::fs::read(entry.path().join("sandbox.json")) else {
            continue;
        };
        let Ok(record) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            continue;
        };
        if let Some(pid) = record["pid"].as_i64() {
            out.push((entry.file_name().to_string_lossy().into_owned(), pid as i32));
        }
    }
    out
}

/// `agentbox up` running in a temporary directory.
pub struct Up {
    /// The (canonical) directory it runs in; `.agentbox` is in it.
    pub dir: PathBuf,
    pub url: String,
    pub key: String,
    /// Its stdout so far.
    pub seen: String,
    /// Its state directory: `--state-dir` of the extra arguments (relative to `dir`), else
    /// `dir/.agentbox`.
    state: PathBuf,
    lines: Receiver<String>,
    child: Option<Child>,
    _tmp: tempfile::TempDir,
}

impl Up {
    /// `agentbox up --listen 127.0.0.1:0 --isolation none EXTRA...`, once it is up.
    pub fn start(extra: &[&str]) -> Up {
        Up::start_with_env(extra, &[])
    }

    /// [`Up::start`] with more environment variables for `up` (and so for its runners).
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Up {
        let tmp = tempfile::Builder::new()
            .prefix("agentbox-cli-e2e-")
            .tempdir()
            .unwrap();
        let dir = std::fs::canonicalize(tmp.path()).unwrap();
        let stderr = std::fs::File::create(dir.join("up.stderr")).unwrap();
        let mut cmd = agentbox(&dir);
        cmd.args(["up", "--listen", "127.0.0.1:0"]);
        // Plain processes unless the test asks for an isolation (the docs' examples run as
        // written, with the default).
        if !extra.contains(&"--isolation") {
            cmd.args(["--isolation", "none"]);
        }
        cmd.args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let mut child = cmd.spawn().unwrap();
        let lines = lines_of(child.stdout.take().unwrap());
        let state = extra
            .iter()
            .position(|a| *a == "--state-dir")
            .map(|i| dir.join(extra[i + 1]))
            .unwrap_or_else(|| dir.join(".agentbox"));
        let mut up = Up {
            dir,
            url: String::new(),
            key: String::new(),
            seen: String::new(),
            state,
            lines,
            child: Some(child),
            _tmp: tmp,
        };
        let first = up.wait_line(Duration::from_secs(20), |l| {
            l.starts_with("agentbox is up at ")
        });
        up.url = first
            .trim_end()
            .strip_prefix("agentbox is up at ")
            .unwrap()
            .to_owned();
        let saved: serde_json::Value =
            serde_json::from_slice(&std::fs::read(up.state_dir().join("cli.json")).unwrap())
                .unwrap();
        assert_eq!(saved["apiUrl"], up.url.as_str(), "cli.json: {saved}");
        up.key = saved["apiKey"].as_str().unwrap().to_owned();
        assert!(up.key.starts_with("abx_"), "API key {:?}", up.key);
        up
    }

    /// Reads `up`'s stdout until a line satisfies `want`.
    #[track_caller]
    pub fn wait_line(&mut self, timeout: Duration, want: impl Fn(&str) -> bool) -> String {
        let mut seen = std::mem::take(&mut self.seen);
        let line = wait_line(&self.lines, &mut seen, timeout, want);
        self.seen = seen;
        line
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state.clone()
    }

    /// The control plane's address.
    pub fn addr(&self) -> SocketAddr {
        self.url.strip_prefix("http://").unwrap().parse().unwrap()
    }

    /// The (real) workspace directory of sandbox `name`.
    pub fn workspace(&self, name: &str) -> PathBuf {
        self.state_dir()
            .join("sandboxes")
            .join(name)
            .join("workspace")
    }

    /// The runner pid of `name` from its sandbox.json.
    pub fn runner_pid(&self, name: &str) -> i32 {
        recorded_runner_pids(&self.state_dir())
            .into_iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no runner pid recorded for {name}"))
            .1
    }

    /// An `agentbox ARGS...` command run from the directory (so it finds cli.json).
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = agentbox(&self.dir);
        cmd.args(args);
        cmd
    }

    /// Runs `agentbox ARGS...` to the end.
    pub fn run(&self, args: &[&str]) -> Out {
        run_with(self.cmd(args), None, COMMAND_TIMEOUT)
    }

    /// Runs `agentbox ARGS...` with `stdin`.
    pub fn run_stdin(&self, args: &[&str], stdin: &[u8]) -> Out {
        run_with(self.cmd(args), Some(stdin), COMMAND_TIMEOUT)
    }

    /// `agentbox create NAME`, which must succeed.
    pub fn create(&self, name: &str) {
        let out = self.run(&["create", name]);
        out.expect_code(0);
        assert_eq!(out.stdout_text(), format!("{name} Running agent\n"));
    }

    /// `agentbox configure NAME --entrypoint ENTRYPOINT EXTRA...`, which must succeed.
    pub fn configure(&self, name: &str, entrypoint: &str, extra: &[&str]) {
        let mut args = vec!["configure", name, "--entrypoint", entrypoint];
        args.extend_from_slice(extra);
        self.run(&args).expect_code(0);
    }

    /// `up`'s pid.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// Ctrl-C: `up` stops its sandboxes and exits. Returns its exit status; fails when it
    /// does not exit within 30 s or when a runner or invoke process of this test outlives it.
    pub fn stop(self) -> ExitStatus {
        self.stop_with(Signal::SIGINT)
    }

    /// [`Up::stop`] with another signal (SIGTERM, SIGHUP, or SIGKILL, after which nothing of
    /// `up` may outlive it either).
    pub fn stop_with(mut self, signal: Signal) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        kill(Pid::from_raw(child.id() as i32), signal).unwrap();
        let status = wait_bounded(&mut child, Duration::from_secs(30));
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`agentbox up` did not exit within 30 s of {signal}; stdout:\n{}",
                self.seen
            );
        };
        let mut leftovers = Vec::new();
        for (name, pid) in recorded_runner_pids(&self.state_dir()) {
            if !wait_gone(pid, Duration::from_secs(5)) {
                leftovers.push(format!("runner of {name} (pid {pid})"));
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let needle = self.dir.to_string_lossy().into_owned();
        let mut strays = processes_mentioning(&needle);
        while !strays.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            strays = processes_mentioning(&needle);
        }
        for (pid, cmdline) in strays {
            leftovers.push(format!("pid {pid}: {cmdline}"));
        }
        // Drop kills whatever is left before the assertion below unwinds.
        assert!(
            leftovers.is_empty(),
            "processes outlived `agentbox up`: {leftovers:?}; up's stderr:\n{}",
            std::fs::read_to_string(self.dir.join("up.stderr")).unwrap_or_default()
        );
        status
    }

    /// `up`'s stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("up.stderr")).unwrap_or_default()
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGINT);
            if wait_bounded(&mut child, Duration::from_secs(15)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        for (_, pid) in recorded_runner_pids(&self.state_dir()) {
            if alive(pid) {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        for (pid, _) in processes_mentioning(&self.dir.to_string_lossy()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// A TCP forwarder to `upstream` that cuts every connection open at that moment, once, after
/// `cut_after` bytes have flowed back to clients.
pub struct Forwarder {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    down: Arc<AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Forwarder {
    pub fn start(upstream: SocketAddr, cut_after: u64) -> Forwarder {
        Forwarder::start_with(upstream, cut_after, false)
    }

    /// Like [`Forwarder::start`], and after the cut every new connection is dropped at once
    /// (the server looks gone).
    pub fn start_refusing(upstream: SocketAddr, cut_after: u64) -> Forwarder {
        Forwarder::start_with(upstream, cut_after, true)
    }

    fn start_with(upstream: SocketAddr, cut_after: u64, refuse_after_cut: bool) -> Forwarder {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let down = Arc::new(AtomicU64::new(0));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = {
            let cut = Arc::clone(&cut);
            let down = Arc::clone(&down);
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
                    let (cut_tx, _) = tokio::sync::watch::channel(false);
                    let cut_tx = Arc::new(cut_tx);
                    let accept = async {
                        loop {
                            let Ok((client, _)) = listener.accept().await else {
                                continue;
                            };
                            if refuse_after_cut && cut.load(Ordering::SeqCst) {
                                drop(client);
                                continue;
                            }
                            let cut_rx = cut_tx.subscribe();
                            tokio::spawn(pipe(
                                client,
                                upstream,
                                cut_after,
                                Arc::clone(&cut),
                                Arc::clone(&down),
                                Arc::clone(&cut_tx),
                                cut_rx,
                            ));
                        }
                    };
                    tokio::select! {
                        _ = accept => {}
                        _ = stop_rx => {}
                    }
                });
            })
        };
        Forwarder {
            addr,
            cut,
            down,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// Whether the cut happened.
    pub fn did_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }

    /// Bytes sent back to clients so far.
    pub fn bytes_down(&self) -> u64 {
        self.down.load(Ordering::SeqCst)
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn pipe(
    client: tokio::net::TcpStream,
    upstream: SocketAddr,
    cut_after: u64,
    cut: Arc<AtomicBool>,
    down: Arc<AtomicU64>,
    cut_tx: Arc<tokio::sync::watch::Sender<bool>>,
    mut cut_rx: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = async {
        let _ = tokio::io::copy(&mut cr, &mut sw).await;
        let _ = sw.shutdown().await;
    };
    let down_task = async {
        let mut buf = vec![0u8; 4096];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if cw.write_all(&buf[..n]).await.is_err() {
                break;
            }
            let total = down.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
            if total >= cut_after && !cut.swap(true, Ordering::SeqCst) {
                cut_tx.send_replace(true);
            }
        }
        let _ = cw.shutdown().await;
    };
    // A cut drops both sockets of every connection open at that moment, mid-stream.
    tokio::select! {
        _ = async { tokio::join!(up, down_task) } => {}
        _ = cut_rx.changed() => {}
    }
}
