//! Benchmarks of the real `agentbox-controlplane` in front of a real local runner, each figure
//! next to its limit measured in the same run:
//!
//! 1. invoke round trip of `/bin/true` through the control plane, beside the same invoke sent
//!    straight to the runner, beside a bare spawn + wait (the three interleaved in ten blocks);
//!    goal: p50 ≤ 1.6× the bare spawn.
//! 2. 1 GiB of stdout through the proxy beside the same stream read straight from the runner;
//!    goal: ≥ 0.8× direct.
//! 3. 10,000 clients held open through one control plane, each following the events of one of
//!    four long-running invokes: the control plane's memory per stream; goal: ≤ 32 KiB.
//! 5. A 1 GiB download from a server in the sandbox through the preview proxy, beside the same
//!    download straight from 127.0.0.1:PORT, for an isolated sandbox (the runner hands the
//!    port's socket to the control plane; the direct download runs in the sandbox's network
//!    namespace, so it needs root) and an unisolated one (a tunnel through the runner's TCP
//!    listener); goal: ≥ 0.8× direct.
//! 4. Local sandboxes isolated (namespaces) beside unisolated: create → Running (goal p50 ≤
//!    50 ms) and an invoke of `/bin/true` (goal p50 ≤ 1.1× unisolated).
//!
//! 4. time-to-interactive: create → first `/bin/true` exec done, for new sandboxes (cold) and
//!    for sandboxes stopped for being idle (resume on demand), isolated and not; printed beside
//!    the peers' published figures.
//!
//! 5. Docker time-to-interactive: a container claimed from a warm pool of 4 (goal p50 ≤ 30 ms)
//!    and a cold start (goal p50 ≤ 250 ms), image `agentbox/python-agent` (`BENCH_ONLY=docker`,
//!    `BENCH_DOCKER_N`, default 100).
//!
//! 6. terminal keystroke → echo through the control plane (WebSocket → runner → PTY → `cat`
//!    in raw mode → back), beside the same `cat` on a local PTY; goal: p50 ≤ 2 ms.
//!
//! Run: `cargo build --release --bins && cargo bench -p agentbox-controlplane --bench
//! controlplane` (it uses target/release/agentbox-runner). Knobs: `BENCH_ONLY`
//! (`latency|throughput|streams|preview|isolation|ready|docker|terminal`), `BENCH_ECHO_N` (2000), `BENCH_N` (2000), `BENCH_BYTES` (1 GiB),
//! `BENCH_STREAMS` (10000), `BENCH_SANDBOXES` (40), `BENCH_READY_N` (100). Quick, without a
//! release build: `cargo build --bins && BENCH_ONLY=ready BENCH_READY_N=20 cargo test -p
//! agentbox-controlplane --bench controlplane` (debug binaries, said so in the output).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentbox_testkit::{env_or, loadavg, pid_with_arg, summarize, verdict, Http, Summary};
use serde_json::Value;

const KEY: &str = "bench-key-0123456789abcdef";
const WARMUP: usize = 100;

struct ControlPlane {
    child: Child,
    addr: SocketAddr,
    state: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let mut http = Http::connect(self.addr, &format!("X-API-Key: {KEY}"));
        http.send("DELETE", "/api/v1/sandboxes/bench", "", b"");
        let _ = http.read_response(&mut |_| {});
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Whatever runs on (the warm pools' sandboxes), by the process groups recorded.
        for entry in std::fs::read_dir(self.state.join("sandboxes"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let pid = std::fs::read(entry.path().join("sandbox.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .and_then(|r| r["pid"].as_i64());
            if let Some(pid) = pid.filter(|p| *p > 1) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// The runner next to this bench's profile directory: `target/release` under `cargo bench`,
/// `target/debug` under `cargo test --bench` (quick figures of debug binaries).
fn runner_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let profile = exe
        .ancestors()
        .find(|p| p.ends_with("release") || p.ends_with("debug"))
        .expect("benches run from target/release or target/debug")
        .to_path_buf();
    let bin = profile.join("agentbox-runner");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build --release --bins` first",
        bin.display()
    );
    bin
}

/// `release` or `debug`: the build the figures are of.
fn build() -> &'static str {
    if runner_bin().parent().is_some_and(|p| p.ends_with("debug")) {
        "debug"
    } else {
        "release"
    }
}

fn sha256_hex(text: &str) -> String {
    let out = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().expect("stdin").write_all(text.as_bytes())?;
            c.wait_with_output()
        })
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split(' ')
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn start() -> ControlPlane {
    start_bench("none")
}

/// A control plane whose local sandboxes run with `isolation` (`none` or `namespaces`), with
/// sandbox `bench` created.
fn start_bench(isolation: &str) -> ControlPlane {
    let cp = start_with(&["--isolation", isolation], false);
    let mut http = cp.http();
    let status = http_json(
        &mut http,
        "POST",
        "/api/v1/sandboxes",
        br#"{"name":"bench","templateRef":{"name":"bench"}}"#,
    )
    .0;
    assert_eq!(status, 201, "create the sandbox");
    cp
}

/// A control plane with `flags`; `warm`: a template `warm` with a warm pool of 4.
fn start_with(flags: &[&str], warm: bool) -> ControlPlane {
    start_with_templates(
        flags,
        if warm {
            r#"{"templates":[{"name":"warm","warmPool":{"size":4}}]}"#
        } else {
            r#"{"templates":[{"name":"bench","mode":"agent","maxConcurrentInvokes":64,
            "runnerArgs":["--journal-max-bytes","2GiB","--retain-bytes","4GiB","--retain-invokes","1"]}]}"#
        },
    )
}

/// A control plane with `flags` and the templates file `templates`.
fn start_with_templates(flags: &[&str], templates_json: &str) -> ControlPlane {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("keys.json");
    std::fs::write(
        &keys,
        format!(
            r#"{{"keys":[{{"name":"bench","sha256":"{}","admin":true}}]}}"#,
            sha256_hex(KEY)
        ),
    )
    .expect("keys");
    let templates = dir.path().join("templates.json");
    std::fs::write(&templates, templates_json).expect("templates");
    let state = dir.path().join("state");
    let mut child = Command::new(env!("CARGO_BIN_EXE_agentbox-controlplane"))
        .args(["--listen", "127.0.0.1:0", "--audit-log", "/dev/null"])
        .args(flags)
        .arg("--state-dir")
        .arg(&state)
        .arg("--api-keys-file")
        .arg(&keys)
        .arg("--templates-file")
        .arg(&templates)
        .arg("--runner-bin")
        .arg(runner_bin())
        .env("AGENTBOX_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the control plane");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("first line");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .expect("listening line")
        .parse()
        .expect("address");
    ControlPlane {
        child,
        addr,
        state,
        _dir: dir,
    }
}

impl ControlPlane {
    fn http(&self) -> Http {
        Http::connect(self.addr, &format!("X-API-Key: {KEY}"))
    }

    /// The runner's address and token, from the local backend's record.
    fn runner(&self) -> (SocketAddr, String) {
        let record: Value = serde_json::from_slice(
            &std::fs::read(self.state.join("sandboxes/bench/sandbox.json")).expect("record"),
        )
        .expect("json");
        (
            record["addr"]
                .as_str()
                .expect("addr")
                .parse()
                .expect("addr"),
            record["token"].as_str().expect("token").to_owned(),
        )
    }

    fn configure(&self, entrypoint: &[&str]) {
        let body = serde_json::json!({ "entrypoint": entrypoint }).to_string();
        let mut http = self.http();
        let (status, _) = http_json(
            &mut http,
            "POST",
            "/api/v1/sandboxes/bench/configure",
            body.as_bytes(),
        );
        assert_eq!(status, 200, "configure");
    }

    fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id())
    }
}

/// The resident memory of `pid` and its descendants.
fn tree_rss_kib(pid: u32) -> u64 {
    let children: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
                .flat_map(|c| {
                    c.split_whitespace()
                        .filter_map(|p| p.parse().ok())
                        .collect::<Vec<u32>>()
                })
                .collect()
        })
        .unwrap_or_default();
    rss_kib(pid) + children.into_iter().map(tree_rss_kib).sum::<u64>()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn http_json(http: &mut Http, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    http.send(
        method,
        path,
        "Content-Type: application/json\r\nAccept: application/json\r\n",
        body,
    );
    let mut out = Vec::new();
    let status = http.read_response(&mut |b| out.extend_from_slice(b));
    (status, out)
}

fn bare_spawn() -> Duration {
    let t0 = Instant::now();
    let out = Command::new("/bin/true")
        .stdin(Stdio::null())
        .output()
        .expect("spawn");
    assert!(out.status.success());
    t0.elapsed()
}

/// `n` invokes through `path`: their round trips.
fn invoke_rounds(http: &mut Http, path: &str, n: usize) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        http.send("POST", path, "Accept: text/event-stream\r\n", b"");
        let mut seen_exit = false;
        let mut body = Vec::new();
        let status = http.read_response(&mut |b| {
            seen_exit |= memchr::memmem::find(b, b"event: exit").is_some();
            if body.len() < 4096 {
                body.extend_from_slice(b);
            }
        });
        let elapsed = t0.elapsed();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        assert!(seen_exit, "no exit event");
        samples.push(elapsed);
    }
    samples
}

/// Create→Running of a sandbox and an invoke of `/bin/true` in it, isolated (namespaces) beside
/// unisolated, interleaved so that both see the same machine. Goals: create p50 ≤ 50 ms,
/// invoke p50 ≤ 1.1× unisolated.
fn bench_isolation(rows: &mut Vec<[String; 5]>) {
    let sandboxes = env_or("BENCH_SANDBOXES", 40usize);
    let n = env_or("BENCH_N", 2000usize) / 2;
    let isolated = start_bench("namespaces");
    let plain = start_bench("none");
    let (mut create_iso, mut create_plain) = (Vec::new(), Vec::new());
    for i in 0..sandboxes {
        for (cp, out) in [(&isolated, &mut create_iso), (&plain, &mut create_plain)] {
            let mut http = cp.http();
            let body = format!(r#"{{"name":"c{i}","templateRef":{{"name":"bench"}}}}"#);
            let t0 = Instant::now();
            let (status, text) = http_json(&mut http, "POST", "/api/v1/sandboxes", body.as_bytes());
            out.push(t0.elapsed());
            assert_eq!(status, 201, "{}", String::from_utf8_lossy(&text));
            assert!(String::from_utf8_lossy(&text).contains(r#""status":"Running""#));
            let (status, _) =
                http_json(&mut http, "DELETE", &format!("/api/v1/sandboxes/c{i}"), b"");
            assert_eq!(status, 200);
        }
    }
    let (ci, cp) = (summarize(&create_iso), summarize(&create_plain));
    rows.push([
        "create → Running, isolated local sandbox".into(),
        format!(
            "p50 {:.1} ms, p99 {:.1} ms",
            ci.p50 / 1000.0,
            ci.p99 / 1000.0
        ),
        format!(
            "unisolated p50 {:.1} ms, p99 {:.1} ms",
            cp.p50 / 1000.0,
            cp.p99 / 1000.0
        ),
        format!("{:.2}× unisolated (goal p50 ≤ 50 ms)", ci.p50 / cp.p50),
        verdict(ci.p50 <= 50_000.0).into(),
    ]);
    isolated.configure(&["/bin/true"]);
    plain.configure(&["/bin/true"]);
    let (mut hi, mut hp) = (isolated.http(), plain.http());
    let path = "/api/v1/sandboxes/bench/invoke";
    invoke_rounds(&mut hi, path, WARMUP);
    invoke_rounds(&mut hp, path, WARMUP);
    let blocks = 10.min(n.max(1));
    let (mut vi, mut vp) = (Vec::new(), Vec::new());
    for block in 0..blocks {
        let size = n / blocks + usize::from(block < n % blocks);
        vi.extend(invoke_rounds(&mut hi, path, size));
        vp.extend(invoke_rounds(&mut hp, path, size));
    }
    let (vi, vp) = (summarize(&vi), summarize(&vp));
    let ratio = vi.p50 / vp.p50;
    rows.push([
        "invoke /bin/true via control plane, isolated".into(),
        us(&vi),
        format!("unisolated {}", us(&vp)),
        format!("{ratio:.2}× unisolated (goal ≤ 1.1×)"),
        verdict(ratio <= 1.1).into(),
    ]);
}

fn us(s: &Summary) -> String {
    format!("p50 {:.0} µs, p99 {:.0} µs", s.p50, s.p99)
}

fn bench_latency(cp: &ControlPlane, rows: &mut Vec<[String; 5]>) {
    let n = env_or("BENCH_N", 2000usize);
    cp.configure(&["/bin/true"]);
    let (runner, token) = cp.runner();
    let mut direct_http = Http::connect(runner, &format!("Authorization: Bearer {token}"));
    let mut cp_http = cp.http();
    for _ in 0..WARMUP {
        bare_spawn();
    }
    invoke_rounds(&mut direct_http, "/v1/invoke", WARMUP);
    invoke_rounds(&mut cp_http, "/api/v1/sandboxes/bench/invoke", WARMUP);
    // Interleaved in blocks, so that all three see the same machine: on a shared VM the cost
    // of a spawn drifts by tens of percent within a minute.
    let blocks = 10.min(n);
    let (mut bare, mut direct, mut via) = (Vec::new(), Vec::new(), Vec::new());
    for block in 0..blocks {
        let size = n / blocks + usize::from(block < n % blocks);
        bare.extend((0..size).map(|_| bare_spawn()));
        direct.extend(invoke_rounds(&mut direct_http, "/v1/invoke", size));
        via.extend(invoke_rounds(
            &mut cp_http,
            "/api/v1/sandboxes/bench/invoke",
            size,
        ));
    }
    let (bare, direct, via) = (summarize(&bare), summarize(&direct), summarize(&via));
    let ratio = via.p50 / bare.p50;
    rows.push([
        "invoke /bin/true via control plane".into(),
        us(&via),
        format!("bare spawn {}; direct to runner {}", us(&bare), us(&direct)),
        format!("{ratio:.2}× bare (goal ≤ 1.6×)"),
        verdict(ratio <= 1.6).into(),
    ]);
}

fn stream_once(http: &mut Http, path: &str) -> (u64, Duration) {
    let t0 = Instant::now();
    http.send("POST", path, "Accept: text/event-stream\r\n", b"");
    let mut bytes = 0u64;
    let status = http.read_response(&mut |b| bytes += b.len() as u64);
    assert_eq!(status, 200);
    (bytes, t0.elapsed())
}

fn bench_throughput(cp: &ControlPlane, rows: &mut Vec<[String; 5]>) {
    let total: u64 = env_or("BENCH_BYTES", 1u64 << 30);
    let line = "a".repeat(99);
    let script = format!("yes {line} | head -c {total}");
    cp.configure(&["sh", "-c", &script]);
    let (runner, token) = cp.runner();
    let mut best_direct = Duration::MAX;
    let mut best_via = Duration::MAX;
    let mut wire = 0;
    // Round 0 warms up: the runner keeps one finished invoke (as a busy runner does), so from
    // round 1 on every stream, direct or proxied, overwrites a pruned journal in place and
    // both paths meet the same journal.
    for round in 0..3 {
        let mut direct = Http::connect(runner, &format!("Authorization: Bearer {token}"));
        let (bytes_d, d) = stream_once(&mut direct, "/v1/invoke");
        let mut via = cp.http();
        let (bytes_v, v) = stream_once(&mut via, "/api/v1/sandboxes/bench/invoke");
        assert!(bytes_d > total && bytes_v > total, "short stream");
        println!(
            "  round {round}{}: direct {:.0} MB/s, via the control plane {:.0} MB/s",
            if round == 0 { " (warm-up)" } else { "" },
            total as f64 / d.as_secs_f64() / 1e6,
            total as f64 / v.as_secs_f64() / 1e6
        );
        if round == 0 {
            continue;
        }
        wire = bytes_v;
        best_direct = best_direct.min(d);
        best_via = best_via.min(v);
    }
    let mbps = |d: Duration| total as f64 / d.as_secs_f64() / 1e6;
    let ratio = mbps(best_via) / mbps(best_direct);
    rows.push([
        format!("{} MiB stdout (100-byte lines) via proxy", total >> 20),
        format!("{:.0} MB/s", mbps(best_via)),
        format!(
            "direct to runner {:.0} MB/s ({:.2} GB on the wire)",
            mbps(best_direct),
            wire as f64 / 1e9
        ),
        format!("{ratio:.2}× direct (goal ≥ 0.8×)"),
        verdict(ratio >= 0.8).into(),
    ]);
}

/// A Python file server on an ephemeral port in the sandbox, sending with `sendfile(2)` (so
/// the direct path is not held back by Python copying); it writes its port to a file.
const FILE_SERVER: &str = r#"
import functools, http.server, os, sys
class H(http.server.SimpleHTTPRequestHandler):
    def copyfile(self, source, outputfile):
        self.connection.sendfile(source)
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(H, directory=sys.argv[1]))
with open(sys.argv[2] + ".tmp", "w") as f:
    f.write(str(s.server_address[1]))
os.rename(sys.argv[2] + ".tmp", sys.argv[2])
s.serve_forever()
"#;

fn get_once(http: &mut Http, path: &str) -> (u64, Duration) {
    let t0 = Instant::now();
    http.send("GET", path, "", b"");
    let mut bytes = 0u64;
    let status = http.read_response(&mut |b| bytes += b.len() as u64);
    assert_eq!(status, 200, "GET {path}");
    (bytes, t0.elapsed())
}

/// A download of `BENCH_BYTES` (1 GiB) from a server in sandbox `bench` of `cp`, whose
/// sandboxes run with `isolation`, through the preview proxy, beside the same download straight
/// from 127.0.0.1:PORT in the sandbox's network: the host's for `none`, the sandbox's own
/// namespace (entered by a thread of this bench, as root) for `namespaces`.
fn bench_preview(cp: &ControlPlane, isolation: &str, rows: &mut Vec<[String; 5]>) {
    let total: u64 = env_or("BENCH_BYTES", 1u64 << 30);
    let command = format!(
        "mkdir -p site && truncate -s {total} site/big && cat > srv.py <<'EOF'\n{FILE_SERVER}\nEOF\n"
    );
    let body = serde_json::json!({ "command": command }).to_string();
    let mut http = cp.http();
    let (status, out) = http_json(
        &mut http,
        "POST",
        "/api/v1/sandboxes/bench/exec",
        body.as_bytes(),
    );
    assert_eq!(status, 200, "exec: {}", String::from_utf8_lossy(&out));
    // A server is a process of the sandbox (an exec's leftovers end with the exec). The last
    // argument marks it, for finding its network namespace.
    let marker = format!("bench-preview-{}", std::process::id());
    let body =
        serde_json::json!({ "argv": ["python3", "srv.py", "site", "port", marker] }).to_string();
    let (status, out) = http_json(
        &mut http,
        "POST",
        "/api/v1/sandboxes/bench/processes",
        body.as_bytes(),
    );
    assert_eq!(status, 201, "process: {}", String::from_utf8_lossy(&out));
    let port_file = cp.state.join("sandboxes/bench/workspace/port");
    // Python's start can take seconds on a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(60);
    let port: u16 = loop {
        if let Some(p) = std::fs::read_to_string(&port_file)
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "the file server did not start: exec said {}; the workspace holds {:?}",
            String::from_utf8_lossy(&out),
            std::fs::read_dir(cp.state.join("sandboxes/bench/workspace"))
                .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let (status, out) = http_json(
        &mut http,
        "POST",
        "/api/v1/sandboxes/bench/ports",
        format!(r#"{{"port":{port}}}"#).as_bytes(),
    );
    assert_eq!(status, 201, "forward: {}", String::from_utf8_lossy(&out));
    let netns = (isolation != "none").then(|| {
        let pid = pid_with_arg(&marker).expect("the file server's process");
        std::fs::File::open(format!("/proc/{pid}/ns/net")).expect("its network namespace")
    });
    let direct_addr = SocketAddr::from(([127, 0, 0, 1], port));
    let via_path = format!("/api/v1/sandboxes/bench/preview/{port}/big");
    let in_sandbox = |f: Box<dyn FnOnce() -> std::net::TcpStream + Send>| match &netns {
        None => f(),
        Some(ns) => {
            let ns = ns.try_clone().expect("dup");
            // A thread of its own enters the namespace, and ends there; the socket it
            // connects stays in that namespace, usable from any thread.
            std::thread::spawn(move || {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .expect("setns (the isolated row needs root)");
                f()
            })
            .join()
            .expect("a connection in the sandbox's network")
        }
    };
    let connect = move || std::net::TcpStream::connect(direct_addr).expect("connect");
    let mut best = [Duration::MAX; 4];
    for round in 0..4 {
        let mut took = [Duration::ZERO; 4];
        for (i, how) in ["direct", "copy", "splice", "via"].into_iter().enumerate() {
            let (bytes, d) = match how {
                "via" => get_once(&mut cp.http(), &via_path),
                "direct" => {
                    let stream = in_sandbox(Box::new(connect));
                    get_once(&mut Http::over(stream, "X-Bench: direct"), "/big")
                }
                bare => {
                    let upstream = in_sandbox(Box::new(connect));
                    let proxy = BareProxy::start(upstream, bare == "splice");
                    let got = get_once(&mut Http::connect(proxy.addr, "X-Bench: bare"), "/big");
                    proxy.join();
                    got
                }
            };
            assert_eq!(bytes, total, "short download ({how})");
            took[i] = d;
        }
        let mbps = |d: Duration| total as f64 / d.as_secs_f64() / 1e6;
        println!(
            "  {isolation}, round {round}{}: direct {:.0} MB/s, a bare copy proxy {:.0}, a bare splice proxy {:.0}, through the preview proxy {:.0}",
            if round == 0 { " (warm-up)" } else { "" },
            mbps(took[0]),
            mbps(took[1]),
            mbps(took[2]),
            mbps(took[3])
        );
        if round > 0 {
            for (b, t) in best.iter_mut().zip(took) {
                *b = (*b).min(t);
            }
        }
    }
    let mbps = |d: Duration| total as f64 / d.as_secs_f64() / 1e6;
    let [direct, copy, splice, via] = best.map(mbps);
    let ratio = via / direct;
    let (how, place) = if isolation == "none" {
        (
            "not isolated: a tunnel through the runner",
            "on the host (the sandbox shares its network)",
        )
    } else {
        (
            "isolated: the runner hands the port's socket over",
            "in the sandbox's network namespace",
        )
    };
    rows.push([
        format!(
            "{} MiB download through the preview proxy, {how} ({})",
            total >> 20,
            build()
        ),
        format!("{via:.0} MB/s"),
        format!(
            "direct to 127.0.0.1:PORT {place} {direct:.0} MB/s; a bare user-space copy proxy \
             (one thread, read/write of 496 KiB) {copy:.0} MB/s ({:.2}×); a bare `splice(2)` \
             proxy {splice:.0} MB/s ({:.2}×)",
            copy / direct,
            splice / direct
        ),
        format!(
            "{ratio:.2}× direct, {:.2}× the bare copy proxy (goal ≥ 0.8× direct)",
            via / copy
        ),
        verdict(ratio >= 0.8).into(),
    ]);
}

/// A proxy of one connection with nothing on top, the floor of a user-space proxy and of a
/// zero-copy one: the client's request bytes go up with `std::io::copy`, the response comes
/// down by `read`/`write` of 496 KiB (hyper's read size) or by `splice(2)` through a 1 MiB
/// pipe.
struct BareProxy {
    addr: SocketAddr,
    thread: std::thread::JoinHandle<()>,
}

impl BareProxy {
    fn start(upstream: std::net::TcpStream, zero_copy: bool) -> BareProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let thread = std::thread::spawn(move || {
            let (client, _) = listener.accept().expect("accept");
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let (mut up_w, mut client_r) = (
                upstream.try_clone().expect("dup"),
                client.try_clone().expect("dup"),
            );
            // The request goes up until the client closes its side.
            let up = std::thread::spawn(move || {
                let _ = std::io::copy(&mut client_r, &mut up_w);
                let _ = up_w.shutdown(std::net::Shutdown::Write);
            });
            if zero_copy {
                splice_all(&upstream, &client);
            } else {
                copy_all(&upstream, &client);
            }
            let _ = client.shutdown(std::net::Shutdown::Both);
            let _ = up.join();
        });
        BareProxy { addr, thread }
    }

    fn join(self) {
        let _ = self.thread.join();
    }
}

fn copy_all(from: &std::net::TcpStream, to: &std::net::TcpStream) {
    use std::io::{Read, Write};
    let mut buf = vec![0u8; 496 << 10];
    let (mut from, mut to) = (from, to);
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

fn splice_all(from: &std::net::TcpStream, to: &std::net::TcpStream) {
    use rustix::pipe::{fcntl_setpipe_size, pipe, splice, SpliceFlags};
    let (r, w) = pipe().expect("pipe");
    let size = fcntl_setpipe_size(&w, 1 << 20).unwrap_or(64 << 10);
    let flags = SpliceFlags::MOVE | SpliceFlags::MORE;
    loop {
        let n = match splice(from, None, &w, None, size, flags) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut left = n;
        while left > 0 {
            match splice(&r, None, to, None, left, flags) {
                Ok(0) | Err(_) => return,
                Ok(k) => left -= k,
            }
        }
    }
}

fn raise_fd_limit(want: u64) -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024));
    for target in [want, hard] {
        if setrlimit(Resource::RLIMIT_NOFILE, target, target.max(hard)).is_ok() {
            return target;
        }
    }
    soft
}

async fn open_stream(addr: SocketAddr, path: String) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nX-API-Key: {KEY}\r\nAccept: text/event-stream\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("request");
    let mut buf = vec![0u8; 4096];
    let mut seen = Vec::new();
    // Held until the replayed `start` event has arrived: the stream is established end to end.
    while memchr::memmem::find(&seen, b"event: start").is_none() {
        let n = s.read(&mut buf).await.expect("read");
        assert!(n > 0, "stream closed early");
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(
        seen.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    s
}

fn bench_streams(cp: &ControlPlane, rows: &mut Vec<[String; 5]>) {
    let want: usize = env_or("BENCH_STREAMS", 10_000usize);
    // This process holds `want` sockets, the control plane as many (its streams to the runner
    // share one HTTP/2 connection): the limit is raised for both (they inherit it).
    let limit = raise_fd_limit(want as u64 + 1024);
    let n = want.min((limit as usize).saturating_sub(1024));
    cp.configure(&["sh", "-c", "echo up; exec sleep 600"]);
    let mut ids = Vec::new();
    for _ in 0..4 {
        let mut http = cp.http();
        http.send(
            "POST",
            "/api/v1/sandboxes/bench/invoke?onDisconnect=continue",
            "Accept: text/event-stream\r\n",
            b"",
        );
        // Read only the head of the stream: the invoke keeps running after we leave.
        let mut head = Vec::new();
        let stream = http_first_event(&mut http, &mut head);
        ids.push(stream);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let addr = cp.addr;
    let before = cp.rss_kib();
    let t0 = Instant::now();
    let held = runtime.block_on(async {
        let mut held = Vec::with_capacity(n);
        for batch in (0..n).collect::<Vec<_>>().chunks(250) {
            let mut tasks = Vec::new();
            for i in batch {
                let path = format!(
                    "/api/v1/sandboxes/bench/invokes/{}/events",
                    ids[i % ids.len()]
                );
                tasks.push(tokio::spawn(open_stream(addr, path)));
            }
            for t in tasks {
                held.push(t.await.expect("task"));
            }
        }
        held
    });
    let opened = t0.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let after = cp.rss_kib();
    let per_stream_kib = (after.saturating_sub(before)) as f64 / n as f64;
    drop(held);
    drop(runtime);
    let mut http = cp.http();
    for id in &ids {
        http.send(
            "POST",
            &format!("/api/v1/sandboxes/bench/invokes/{id}/cancel"),
            "",
            b"",
        );
        let _ = http.read_response(&mut |_| {});
    }
    rows.push([
        format!("{n} streams held open through one control plane"),
        format!("{per_stream_kib:.1} KiB per stream"),
        format!(
            "control plane RSS {} MiB → {} MiB; all open in {:.1} s",
            before / 1024,
            after / 1024,
            opened.as_secs_f64()
        ),
        "goal ≤ 32 KiB".into(),
        verdict(per_stream_kib <= 32.0).into(),
    ]);
}

/// Reads a streaming response until its `start` event and returns the invoke id; the
/// connection is then dropped by the caller.
fn http_first_event(http: &mut Http, head: &mut Vec<u8>) -> String {
    http.read_raw_until(head, b"event: start\ndata: {");
    http.read_raw_until(head, b"\n\n");
    let text = String::from_utf8_lossy(head);
    let at = text.find("\"invokeId\":\"").expect("invoke id") + 12;
    text[at..at + text[at..].find('"').expect("end of id")].to_owned()
}

/// `/bin/true` by exec (JSON answer) in sandbox `name`; asserts it ran.
fn exec_true(http: &mut Http, name: &str) {
    let (status, body) = http_json(
        http,
        "POST",
        &format!("/api/v1/sandboxes/{name}/exec"),
        br#"{"argv":["/bin/true"]}"#,
    );
    assert_eq!(status, 200, "exec: {}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).expect("exec json");
    assert_eq!(v["exitCode"], 0, "{v}");
}

fn ms(s: &Summary) -> String {
    format!("p50 {:.1} ms, p99 {:.1} ms", s.p50 / 1e3, s.p99 / 1e3)
}

/// Time-to-interactive of new sandboxes, and of idle-stopped ones woken by a request, under
/// `isolation`.
fn bench_ready(isolation: &str, rows: &mut Vec<[String; 5]>) {
    let n = env_or("BENCH_READY_N", 100usize);
    let cp = start_with(
        &["--isolation", isolation, "--lifecycle-interval", "100ms"],
        true,
    );
    let mut http = cp.http();
    // Warm: each create claims a pooled sandbox; the pool is full again (no refill taking
    // the CPU) before the next.
    let pool_full = |http: &mut Http| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, out) = http_json(http, "GET", "/api/v1/warmpool/status", b"");
            let status: Value = serde_json::from_slice(&out).expect("pool status");
            if status["pools"][0]["ready"] == 4 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the pool never refilled: {status}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    pool_full(&mut http);
    // Memory: the process tree of an idle pooled sandbox (and, below, of a used one).
    let pooled_kib = std::fs::read_dir(cp.state.join("sandboxes"))
        .expect("sandboxes")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".pool-"))
        .find_map(|e| {
            let r: Value =
                serde_json::from_slice(&std::fs::read(e.path().join("sandbox.json")).ok()?).ok()?;
            Some(tree_rss_kib(r["pid"].as_u64()? as u32))
        })
        .unwrap_or(0);
    let (mut warm, mut claims, mut floor) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        pool_full(&mut http);
        let (claim, ready, again) = claim_pooled(&mut http, &format!("warm-{i}"), "warm");
        claims.push(claim);
        warm.push(ready);
        floor.push(again);
    }
    let used: Value = serde_json::from_slice(
        &std::fs::read(cp.state.join("sandboxes/warm-0/sandbox.json")).expect("record"),
    )
    .expect("json");
    let used_kib = tree_rss_kib(used["pid"].as_u64().expect("pid") as u32);
    for i in 0..n {
        let _ = http_json(
            &mut http,
            "DELETE",
            &format!("/api/v1/sandboxes/warm-{i}"),
            b"",
        );
    }
    let mut cold = Vec::with_capacity(n);
    for i in 0..n {
        let body = format!(r#"{{"name":"tti-{i}","idleTimeout":"1s"}}"#);
        let t0 = Instant::now();
        let (status, out) = http_json(&mut http, "POST", "/api/v1/sandboxes", body.as_bytes());
        assert_eq!(status, 201, "create: {}", String::from_utf8_lossy(&out));
        exec_true(&mut http, &format!("tti-{i}"));
        cold.push(t0.elapsed());
    }
    // All of them idle past 1 s, then woken one by one by the same exec.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, out) = http_json(&mut http, "GET", "/api/v1/sandboxes?status=Stopped", b"");
        let list: Value = serde_json::from_slice(&out).expect("list");
        let asleep = list["sandboxes"].as_array().map_or(0, Vec::len);
        if asleep == n {
            break;
        }
        assert!(Instant::now() < deadline, "only {asleep} of {n} went idle");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut woken = Vec::with_capacity(n);
    for i in 0..n {
        let t0 = Instant::now();
        exec_true(&mut http, &format!("tti-{i}"));
        woken.push(t0.elapsed());
    }
    for i in 0..n {
        let _ = http_json(
            &mut http,
            "DELETE",
            &format!("/api/v1/sandboxes/tti-{i}"),
            b"",
        );
    }
    let (cold, woken, warm) = (summarize(&cold), summarize(&woken), summarize(&warm));
    let (claims, floor) = (summarize(&claims), summarize(&floor));
    let build = build();
    rows.push([
        format!("time to interactive, local warm (a pooled sandbox claimed), isolation {isolation} ({build} build, {n} sandboxes)"),
        format!("{} (the create alone: {})", ms(&warm), ms(&claims)),
        format!(
            "the same exec on the running sandbox: {}; goal p50 ≤ 10 ms, p99 ≤ 30 ms",
            ms(&floor)
        ),
        format!("p50 {:.2}×", warm.p50 / floor.p50),
        verdict(warm.p50 <= 10e3 && warm.p99 <= 30e3).into(),
    ]);
    rows.push([
        format!(
            "memory of a sandbox's processes, isolation {isolation}: idle pooled / after one exec"
        ),
        format!("{pooled_kib} KiB / {used_kib} KiB"),
        "—".into(),
        "—".into(),
        "—".into(),
    ]);
    rows.push([
        format!("time to interactive, local cold, isolation {isolation} ({build} build, {n} sandboxes): create → first `/bin/true` exec done"),
        ms(&cold),
        "peers' published: Daytona p50 110 ms (p99 290 ms), E2B p50 440 ms (p99 990 ms)".into(),
        "—".into(),
        "—".into(),
    ]);
    rows.push([
        format!("resume on demand from idle, isolation {isolation} ({build} build): exec to a sandbox stopped for idleness, until done"),
        ms(&woken),
        "goal p50 ≤ 50 ms".into(),
        "—".into(),
        verdict(woken.p50 <= 50e3).into(),
    ]);
}

/// Removes a Docker bench's containers, volumes and network.
struct DockerScope {
    scope: String,
    network: String,
}

impl Drop for DockerScope {
    fn drop(&mut self) {
        let docker = |args: &[&str]| {
            Command::new("docker")
                .args(args)
                .stderr(Stdio::null())
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        let filter = format!("label=agentbox.dev/scope={}", self.scope);
        for id in docker(&["ps", "-aq", "--filter", &filter]).split_whitespace() {
            docker(&["rm", "-f", id]);
        }
        for v in docker(&["volume", "ls", "-q", "--filter", &filter]).split_whitespace() {
            docker(&["volume", "rm", "-f", v]);
        }
        docker(&["network", "rm", &self.network]);
    }
}

/// Time-to-interactive of Docker sandboxes (image `agentbox/python-agent`): claimed from a
/// warm pool of 4, and started cold.
/// Creates `name` from `template`'s warm pool (asserting it was pooled) and execs `/bin/true`
/// in it twice: the create's time, the time to interactive (create → first exec done), and the
/// second exec's (the floor: the same exec on the now running sandbox).
fn claim_pooled(http: &mut Http, name: &str, template: &str) -> (Duration, Duration, Duration) {
    let body = format!(r#"{{"name":"{name}","templateRef":{{"name":"{template}"}}}}"#);
    let t0 = Instant::now();
    let (status, out) = http_json(http, "POST", "/api/v1/sandboxes", body.as_bytes());
    assert_eq!(status, 201, "create: {}", String::from_utf8_lossy(&out));
    let claim = t0.elapsed();
    exec_true(http, name);
    let ready = t0.elapsed();
    let t1 = Instant::now();
    exec_true(http, name);
    let again = t1.elapsed();
    let created: Value = serde_json::from_slice(&out).expect("json");
    assert_eq!(created["fromWarmPool"], true, "{created}");
    (claim, ready, again)
}

fn bench_docker(rows: &mut Vec<[String; 5]>) {
    let n = env_or("BENCH_DOCKER_N", 100usize);
    let image = "agentbox/python-agent:latest";
    let guard = DockerScope {
        scope: format!("bench{}", std::process::id()),
        network: format!("agentbox-bench{}", std::process::id()),
    };
    let templates = format!(
        r#"{{"templates":[{{"name":"dcold","image":"{image}"}},
        {{"name":"dwarm","image":"{image}","warmPool":{{"size":4}}}}]}}"#
    );
    let cp = start_with_templates(
        &[
            "--backend",
            "docker",
            "--docker-scope",
            &guard.scope,
            "--docker-network",
            &guard.network,
            "--docker-image",
            image,
        ],
        &templates,
    );
    let mut http = cp.http();
    let pool_full = |http: &mut Http| {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (_, out) = http_json(http, "GET", "/api/v1/warmpool/status", b"");
            let status: Value = serde_json::from_slice(&out).expect("pool status");
            if status["pools"][0]["ready"] == 4 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the Docker pool never refilled: {status}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let (mut warm, mut claims, mut floor) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        pool_full(&mut http);
        let (claim, ready, again) = claim_pooled(&mut http, &format!("dw-{i}"), "dwarm");
        claims.push(claim);
        warm.push(ready);
        floor.push(again);
        let _ = http_json(
            &mut http,
            "DELETE",
            &format!("/api/v1/sandboxes/dw-{i}"),
            b"",
        );
    }
    let mut cold = Vec::with_capacity(n);
    for i in 0..n {
        let body = format!(r#"{{"name":"dc-{i}","templateRef":{{"name":"dcold"}}}}"#);
        let t0 = Instant::now();
        let (status, out) = http_json(&mut http, "POST", "/api/v1/sandboxes", body.as_bytes());
        assert_eq!(status, 201, "create: {}", String::from_utf8_lossy(&out));
        exec_true(&mut http, &format!("dc-{i}"));
        cold.push(t0.elapsed());
        let _ = http_json(
            &mut http,
            "DELETE",
            &format!("/api/v1/sandboxes/dc-{i}"),
            b"",
        );
    }
    drop(cp);
    drop(guard);
    // The engine's own floor for a cold start: `docker run` of the same image with no network,
    // its entrypoint `/bin/true` (create, start, exit, remove; no runner, no health wait).
    let mut engine = Vec::new();
    for _ in 0..n.min(20) {
        let t0 = Instant::now();
        let ok = Command::new("docker")
            .args([
                "run",
                "--rm",
                "--network",
                "none",
                "--entrypoint",
                "/bin/true",
                image,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "docker run {image} failed");
        engine.push(t0.elapsed());
    }
    let (warm, claims, floor, cold, engine) = (
        summarize(&warm),
        summarize(&claims),
        summarize(&floor),
        summarize(&cold),
        summarize(&engine),
    );
    let build = build();
    rows.push([
        format!("time to interactive, Docker warm (a pooled container claimed; {build} build, {n} sandboxes)"),
        format!("{} (the create alone: {})", ms(&warm), ms(&claims)),
        format!(
            "the same exec on the running sandbox: {}; goal p50 ≤ 30 ms",
            ms(&floor)
        ),
        format!("p50 {:.2}×", warm.p50 / floor.p50),
        verdict(warm.p50 <= 30e3).into(),
    ]);
    rows.push([
        format!("time to interactive, Docker cold ({build} build, {n} sandboxes): create → first `/bin/true` exec done"),
        ms(&cold),
        format!(
            "`docker run --rm --network none` of the image's `/bin/true` (the engine's floor): {}; goal p50 ≤ 250 ms; peers' published: Daytona p50 110 ms (p99 290 ms), E2B p50 440 ms (p99 990 ms)",
            ms(&engine)
        ),
        format!("p50 {:.2}× the engine's floor", cold.p50 / engine.p50),
        verdict(cold.p50 <= 250e3).into(),
    ]);
}

fn main() {
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let mut rows = Vec::new();
    if only == "docker" {
        bench_docker(&mut rows);
        print_rows(rows);
        return;
    }
    if only.is_empty() || only == "isolation" {
        bench_isolation(&mut rows);
    }
    if only == "isolation" {
        print_rows(rows);
        return;
    }
    if only == "ready" {
        bench_ready("namespaces", &mut rows);
        bench_ready("none", &mut rows);
        print_rows(rows);
        return;
    }
    let cp = start();
    if only.is_empty() || only == "terminal" {
        bench_terminal(&cp, &mut rows);
    }
    if only.is_empty() || only == "latency" {
        bench_latency(&cp, &mut rows);
    }
    if only.is_empty() || only == "throughput" {
        bench_throughput(&cp, &mut rows);
    }
    if only.is_empty() || only == "streams" {
        bench_streams(&cp, &mut rows);
    }
    if only.is_empty() || only == "preview" {
        bench_preview(&cp, "none", &mut rows);
    }
    drop(cp);
    if only.is_empty() || only == "preview" {
        let isolated = start_bench("namespaces");
        bench_preview(&isolated, "namespaces", &mut rows);
    }
    if only.is_empty() {
        bench_ready("namespaces", &mut rows);
        bench_ready("none", &mut rows);
        bench_docker(&mut rows);
    }
    print_rows(rows);
}

fn print_rows(rows: Vec<[String; 5]>) {
    println!("\n## Control plane (`cargo bench -p agentbox-controlplane --bench controlplane`)\n");
    println!("load average at the end: {}\n", loadavg());
    println!("| figure | measured | limit measured in the same run | ratio | result |");
    println!("|---|---|---|---|---|");
    for r in rows {
        println!("| {} | {} | {} | {} | {} |", r[0], r[1], r[2], r[3], r[4]);
    }
}

/// The byte's echo round trips on a local PTY running `stty raw -echo; exec cat`.
fn local_pty_echo(n: usize) -> Vec<Duration> {
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    use std::io::{Read, Write};
    use std::os::fd::OwnedFd;
    let master =
        openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC).expect("pty");
    grantpt(&master).expect("grantpt");
    unlockpt(&master).expect("unlockpt");
    let name = ptsname(&master, Vec::new()).expect("ptsname");
    let slave: OwnedFd = rustix::fs::open(
        name.as_c_str(),
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NOCTTY,
        rustix::fs::Mode::empty(),
    )
    .expect("slave");
    let mut child = Command::new("sh")
        .args(["-c", "stty raw -echo; echo ready; exec cat"])
        .stdin(Stdio::from(slave.try_clone().expect("dup")))
        .stdout(Stdio::from(slave.try_clone().expect("dup")))
        .stderr(Stdio::from(slave))
        .spawn()
        .expect("sh");
    let mut master = std::fs::File::from(master);
    let mut buf = [0u8; 4096];
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("ready") {
        let n = master.read(&mut buf).expect("read");
        seen.extend_from_slice(&buf[..n]);
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n + WARMUP {
        let t = Instant::now();
        master.write_all(b"a").expect("write");
        loop {
            let got = master.read(&mut buf).expect("read");
            if buf[..got].contains(&b'a') {
                break;
            }
        }
        if i >= WARMUP {
            out.push(t.elapsed());
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    out
}

/// The byte's echo round trips through the control plane's terminal WebSocket.
fn terminal_echo(cp: &ControlPlane, n: usize) -> Vec<Duration> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        // argv = ["sh","-c","stty raw -echo; echo ready; exec cat"]
        let argv = "%5B%22sh%22%2C%22-c%22%2C%22stty%20raw%20-echo%3B%20echo%20ready%3B%20exec%20cat%22%5D";
        let url = format!("ws://{}/api/v1/sandboxes/bench/terminal?argv={argv}", cp.addr);
        let mut req = url.into_client_request().expect("request");
        req.headers_mut().insert("x-api-key", KEY.parse().expect("key"));
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect("terminal");
        let mut seen = Vec::new();
        while !String::from_utf8_lossy(&seen).contains("ready") {
            if let Some(Ok(Message::Binary(b))) = ws.next().await {
                seen.extend_from_slice(&b);
            }
        }
        let mut out = Vec::with_capacity(n);
        for i in 0..n + WARMUP {
            let t = Instant::now();
            ws.send(Message::binary(b"a".to_vec())).await.expect("send");
            loop {
                match ws.next().await {
                    Some(Ok(Message::Binary(b))) if b.contains(&b'a') => break,
                    Some(Ok(_)) => {}
                    other => panic!("terminal ended: {other:?}"),
                }
            }
            if i >= WARMUP {
                out.push(t.elapsed());
            }
        }
        let _ = ws.send(Message::binary(vec![3u8])).await;
        out
    })
}

fn bench_terminal(cp: &ControlPlane, rows: &mut Vec<[String; 5]>) {
    let n = env_or("BENCH_ECHO_N", 2000usize);
    // Interleaved in blocks, as the invoke latency.
    let blocks = 5.min(n);
    let (mut local, mut via) = (Vec::new(), Vec::new());
    for _ in 0..blocks {
        local.extend(local_pty_echo(n / blocks));
        via.extend(terminal_echo(cp, n / blocks));
    }
    let (local, via) = (summarize(&local), summarize(&via));
    let ms = |s: &Summary| format!("p50 {:.3} ms, p99 {:.3} ms", s.p50 / 1000.0, s.p99 / 1000.0);
    rows.push([
        "terminal keystroke → echo via control plane (WebSocket, runner, PTY, `cat`)".into(),
        ms(&via),
        format!("local PTY, same `cat`: {}", ms(&local)),
        format!(
            "{:.1}× local; p50 {:.3} ms (goal ≤ 2 ms)",
            via.p50 / local.p50,
            via.p50 / 1000.0
        ),
        verdict(via.p50 <= 2000.0).into(),
    ]);
}
