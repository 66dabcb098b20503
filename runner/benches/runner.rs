//! Benchmarks of the real `agentbox-runner` binary, each figure printed next to its physical
//! limit measured in the same run:
//!
//! 1. invoke round trip of `/bin/true` (POST /v1/invoke, SSE read to its end) against a bare
//!    spawn + wait of `/bin/true` from this process; goal: p50 ≤ 1.3× bare. Also measured,
//!    interleaved: a minimal server's round trip (spawn on a runtime thread, pidfd, one read
//!    and one write; no HTTP, journal or events), the floor of any server-mediated invoke.
//! 2. 1 GiB of stdout through the (journaled) SSE stream against a bare pipe read of the same
//!    producer; goal: ≥ 0.5× bare. Two producers: 100-byte lines and 4000-byte lines.
//!
//! The client is a minimal HTTP/1.1 client over one keep-alive `TcpStream` (TCP_NODELAY), so
//! the figures are the runner's, not an HTTP library's.
//!
//! Besides the goals it prints where the time goes: time to the `exit` event versus the end of
//! the stream (the journal's fsync), CPU per invoke (runner, child, client), drift over the run,
//! and the disk's write+fdatasync rate, which caps a journaled stream (the journal holds the
//! SSE bytes, 1.6× the payload for 100-byte lines).
//!
//! Run: `cargo bench -p agentbox-runner --bench runner`. Knobs (environment): `BENCH_ONLY`
//! (`latency`, `throughput` or `memory`), `BENCH_N` (invokes, default 2000), `BENCH_BYTES`
//! (stream size, default 1 GiB), `BENCH_REPEAT` (stream runs, best kept, default 3),
//! `BENCH_CONCURRENT` (running invokes whose RSS is measured, default `100,1000`),
//! `BENCH_CONFIGURE_MB` (the huge configure body, default 300). The machine should be
//! otherwise idle: the load average is printed with the table.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use agentbox_testkit::{command_line, env_or, loadavg, summarize, verdict, Http, READ_SIZE};
use memchr::memmem;

const TOKEN: &str = "bench-token-0123456789abcdef";
const WARMUP: usize = 100;
/// The runner's pipe size and read size, given to the bare reader too.
const PIPE_SIZE: i32 = 1 << 20;

// ---------------------------------------------------------------------------------------------
// The runner under test.

/// A running `agentbox-runner` in a temporary directory; SIGTERM (then SIGKILL) on drop.
struct Runner {
    child: Child,
    addr: SocketAddr,
    _stdout: ChildStdout,
    tmp: tempfile::TempDir,
}

impl Runner {
    fn start(extra: &[&str]) -> Runner {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ws = tmp.path().join("ws");
        std::fs::create_dir_all(&ws).expect("create the workspace");
        let token = tmp.path().join("token");
        std::fs::write(&token, format!("{TOKEN}\n")).expect("write the token file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_agentbox-runner"))
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--workspace")
            .arg(&ws)
            .arg("--token-file")
            .arg(&token)
            .args(extra)
            .env("AGENTBOX_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start agentbox-runner");
        let mut stdout = BufReader::new(child.stdout.take().expect("runner stdout"));
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .expect("read the runner's first line");
        let addr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .trim()
            .parse()
            .expect("listen address");
        Runner {
            child,
            addr,
            _stdout: stdout.into_inner(),
            tmp,
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Configures `entrypoint` (JSON answer) over `http`.
    fn configure(&self, http: &mut Http, entrypoint: &[&str]) {
        let body = serde_json::json!({ "entrypoint": entrypoint }).to_string();
        http.send(
            "POST",
            "/v1/configure",
            "Accept: application/json\r\nContent-Type: application/json\r\n",
            body.as_bytes(),
        );
        let mut answer = Vec::new();
        let status = http.read_response(&mut |b| answer.extend_from_slice(b));
        assert_eq!(
            status,
            200,
            "configure failed: {}",
            String::from_utf8_lossy(&answer)
        );
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
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics and output.

/// One row of the final table.
struct Row {
    name: String,
    runner: String,
    limit: String,
    ratio: String,
    goal: String,
    result: String,
}

impl Row {
    fn info(name: String, runner: String, limit: String, ratio: String) -> Row {
        Row {
            name,
            runner,
            limit,
            ratio,
            goal: "—".into(),
            result: "—".into(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Invoke round trip.

/// A minimal server, for the floor of any server-mediated invoke on this machine: on a Tokio
/// runtime like the runner's, each request (one read) spawns `/bin/true` with piped output
/// on the runtime thread, awaits its pidfd, reaps it and answers with one write. No HTTP
/// parsing, journal, summary or event stream: what is left is the spawn, the wake-ups
/// between the client, the runtime threads and the child, and loopback TCP.
fn start_minimal_server() -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    continue;
                };
                let _ = conn.set_nodelay(true);
                tokio::spawn(async move {
                    let mut buf = [0u8; 512];
                    while conn.read(&mut buf).await.is_ok_and(|n| n > 0) {
                        let child = Command::new("/bin/true")
                            .stdin(Stdio::null())
                            .stdout(Stdio::piped())
                            .stderr(Stdio::piped())
                            .spawn()
                            .expect("spawn");
                        let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("pid");
                        let pidfd =
                            rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
                                .expect("pidfd");
                        #[allow(deprecated)]
                        let exited = tokio::io::unix::AsyncFd::with_interest(
                            pidfd,
                            tokio::io::Interest::READABLE,
                        )
                        .expect("register");
                        let _ = exited.readable().await.expect("readable");
                        let status = child.wait_with_output().expect("wait").status;
                        let answer: &[u8] = if status.success() { b"ok\n" } else { b"no\n" };
                        if conn.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
    });
    addr
}

/// One request to the minimal server.
fn minimal_once(conn: &mut std::net::TcpStream) -> Duration {
    let t0 = Instant::now();
    conn.write_all(b"x").expect("write");
    let mut answer = [0u8; 3];
    conn.read_exact(&mut answer).expect("read");
    let elapsed = t0.elapsed();
    assert_eq!(&answer, b"ok\n");
    elapsed
}

fn bare_spawn() -> Duration {
    let t0 = Instant::now();
    let out = Command::new("/bin/true")
        .stdin(Stdio::null())
        .output()
        .expect("spawn /bin/true");
    let elapsed = t0.elapsed();
    assert!(out.status.success());
    elapsed
}

/// CPU time of a process (`self` or a pid) from `/proc`: (its own, its reaped children's), in
/// seconds (USER_HZ is 100 on Linux).
fn cpu_seconds(pid: &str) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<f64> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split(' ').filter_map(|f| f.parse().ok()).collect())
        .unwrap_or_default();
    // Numbering from /proc/[pid]/stat(5); the parsed list starts at field 4 (ppid), as the
    // state letter (field 3) does not parse.
    let field = |i: usize| fields.get(i - 4).copied().unwrap_or(0.0) / 100.0;
    (field(14) + field(15), field(16) + field(17))
}

/// One invoke of the configured `/bin/true`: (until the stream ended, until `exit` arrived).
fn invoke_once(http: &mut Http, body: &mut Vec<u8>) -> (Duration, Duration) {
    body.clear();
    let t0 = Instant::now();
    let mut exit_at = None;
    http.send("POST", "/v1/invoke", "", b"");
    let status = http.read_response(&mut |chunk| {
        body.extend_from_slice(chunk);
        if exit_at.is_none() && memmem::find(body, b"\nevent: exit\n").is_some() {
            exit_at = Some(t0.elapsed());
        }
    });
    let total = t0.elapsed();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(body));
    assert!(
        memmem::find(body, b"\"exitCode\":0").is_some(),
        "no exit 0 in {}",
        String::from_utf8_lossy(body)
    );
    (total, exit_at.expect("an exit event"))
}

fn bench_latency(rows: &mut Vec<Row>) {
    let n: usize = env_or("BENCH_N", 2000);
    println!(
        "== invoke round trip of /bin/true: {n} sequential invokes after {WARMUP} warm-up, \
         interleaved in blocks with as many bare spawns"
    );

    let runner = Runner::start(&[]);
    let mut http = Http::connect(runner.addr, &format!("Authorization: Bearer {TOKEN}"));
    runner.configure(&mut http, &["/bin/true"]);
    let mut body = Vec::with_capacity(4096);
    let mut minimal = std::net::TcpStream::connect(start_minimal_server()).expect("connect");
    minimal.set_nodelay(true).expect("nodelay");
    for _ in 0..WARMUP {
        bare_spawn();
        invoke_once(&mut http, &mut body);
        minimal_once(&mut minimal);
    }
    // Interleaved in blocks, so that both see the same machine: on a shared VM the cost of a
    // spawn drifts by tens of percent within a minute.
    let pid = runner.pid().to_string();
    let blocks = 10.min(n);
    let mut bare: Vec<Duration> = Vec::with_capacity(n);
    let mut minimal_server: Vec<Duration> = Vec::with_capacity(n);
    let (mut ends, mut exits): (Vec<Duration>, Vec<Duration>) = (Vec::new(), Vec::new());
    let (mut bare_cpu, mut runner_cpu, mut client_cpu) = ((0.0, 0.0), (0.0, 0.0), 0.0);
    let mut wall = Duration::ZERO;
    let add = |sum: &mut (f64, f64), a: (f64, f64), b: (f64, f64)| {
        sum.0 += b.0 - a.0;
        sum.1 += b.1 - a.1;
    };
    for block in 0..blocks {
        let count = n / blocks + usize::from(block < n % blocks);
        let cpu0 = cpu_seconds("self");
        bare.extend((0..count).map(|_| bare_spawn()));
        let cpu1 = cpu_seconds("self");
        add(&mut bare_cpu, cpu0, cpu1);
        let (client0, runner0) = (cpu_seconds("self"), cpu_seconds(&pid));
        let t0 = Instant::now();
        for _ in 0..count {
            let (end, exit) = invoke_once(&mut http, &mut body);
            ends.push(end);
            exits.push(exit);
        }
        wall += t0.elapsed();
        let (client1, runner1) = (cpu_seconds("self"), cpu_seconds(&pid));
        add(&mut runner_cpu, runner0, runner1);
        client_cpu += client1.0 - client0.0;
        minimal_server.extend((0..count).map(|_| minimal_once(&mut minimal)));
    }
    // The HTTP floor: an authenticated GET of `/v1/info` (no process) on the same connection.
    let mut floor = Vec::with_capacity(n);
    let mut sink = Vec::new();
    for _ in 0..n {
        sink.clear();
        let t0 = Instant::now();
        http.send("GET", "/v1/info", "", b"");
        let status = http.read_response(&mut |b| sink.extend_from_slice(b));
        floor.push(t0.elapsed());
        assert_eq!(status, 200);
    }
    drop(http);
    drop(runner);

    let f = summarize(&floor);
    let m = summarize(&minimal_server);
    let b = summarize(&bare);
    let r = summarize(&ends);
    let x = summarize(&exits);
    let ratio = r.p50 / b.p50;
    let pass = ratio <= 1.3;
    println!(
        "  bare spawn+wait     p50 {:>8.0} µs   p99 {:>8.0} µs   mean {:>8.0} µs",
        b.p50, b.p99, b.mean
    );
    println!(
        "  invoke (stream end) p50 {:>8.0} µs   p99 {:>8.0} µs   mean {:>8.0} µs   ({:.0} invokes/s)",
        r.p50,
        r.p99,
        r.mean,
        n as f64 / wall.as_secs_f64()
    );
    println!(
        "  invoke (exit event) p50 {:>8.0} µs   p99 {:>8.0} µs   mean {:>8.0} µs",
        x.p50, x.p99, x.mean
    );
    println!(
        "  HTTP floor (GET /v1/info, no process) p50 {:>6.0} µs; bare spawn + that {:.0} µs = {:.2}× bare",
        f.p50,
        b.p50 + f.p50,
        (b.p50 + f.p50) / b.p50
    );
    println!(
        "  minimal server (spawn on its runtime thread, pidfd, one read and one write) p50 {:.0} µs = {:.2}× bare",
        m.p50,
        m.p50 / b.p50
    );
    let tenth = (n / 10).max(1);
    println!(
        "  drift: invoke p50 over the first tenth {:.0} µs, over the last tenth {:.0} µs",
        summarize(&ends[..tenth]).p50,
        summarize(&ends[n - tenth..]).p50
    );
    let per = |seconds: f64| seconds / n as f64 * 1e6;
    let (bare_self, bare_child) = (per(bare_cpu.0), per(bare_cpu.1));
    let (runner_self, runner_child) = (per(runner_cpu.0), per(runner_cpu.1));
    let client_self = per(client_cpu);
    println!(
        "  CPU per operation: bare {:.0} µs (spawner {bare_self:.0} + child {bare_child:.0}); \
         invoke {:.0} µs (runner {runner_self:.0} + child {runner_child:.0} + bench client \
         {client_self:.0})",
        bare_self + bare_child,
        runner_self + runner_child + client_self
    );
    println!("  ratio p50 {ratio:.2}× (goal ≤ 1.30×): {}", verdict(pass));

    let name = format!("Invoke round trip `/bin/true` ({n} seq., keep-alive)");
    rows.push(Row {
        name: format!("{name}, p50"),
        runner: format!("{:.0} µs", r.p50),
        limit: format!("{:.0} µs (bare spawn+wait)", b.p50),
        ratio: format!("{ratio:.2}×"),
        goal: "≤ 1.3×".into(),
        result: verdict(pass).into(),
    });
    rows.push(Row::info(
        format!("{name}, p99"),
        format!("{:.0} µs", r.p99),
        format!("{:.0} µs", b.p99),
        format!("{:.2}×", r.p99 / b.p99),
    ));
    rows.push(Row::info(
        format!("{name}, mean"),
        format!("{:.0} µs", r.mean),
        format!("{:.0} µs", b.mean),
        format!("{:.2}×", r.mean / b.mean),
    ));
    rows.push(Row::info(
        "HTTP round trip without a process (`GET /v1/info`), p50".into(),
        format!("{:.0} µs", f.p50),
        format!("{:.0} µs", b.p50),
        format!("bare + it: {:.2}×", (b.p50 + f.p50) / b.p50),
    ));
    rows.push(Row::info(
        "Minimal server on the same machine (spawn, pidfd, no journal or HTTP), p50".into(),
        format!("{:.0} µs", m.p50),
        format!("{:.0} µs", b.p50),
        format!("{:.2}×", m.p50 / b.p50),
    ));
    rows.push(Row::info(
        "Same, until the `exit` event arrives, p50".into(),
        format!("{:.0} µs", x.p50),
        format!("{:.0} µs", b.p50),
        format!("{:.2}×", x.p50 / b.p50),
    ));
}

// ---------------------------------------------------------------------------------------------
// 2. Stream throughput.

/// `sh -c` script writing `total` bytes of `line_len`-byte lines (`line_len - 1` × `a` + LF).
fn producer(line_len: usize, total: u64) -> String {
    format!("yes '{}' | head -c {total}", "a".repeat(line_len - 1))
}

fn set_pipe_size(pipe: &impl std::os::fd::AsFd) {
    let _ = nix::fcntl::fcntl(pipe.as_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
}

/// Reads the producer's stdout to EOF: (bytes, time).
fn bare_stream(script: &str) -> (u64, Duration) {
    let t0 = Instant::now();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the producer");
    let mut out = child.stdout.take().expect("producer stdout");
    set_pipe_size(&out);
    let mut buf = vec![0u8; READ_SIZE];
    let mut bytes = 0u64;
    loop {
        match out.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => bytes += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read the producer: {e}"),
        }
    }
    assert!(child.wait().expect("wait").success());
    (bytes, t0.elapsed())
}

/// Counts `needle` in a stream fed piece by piece, including matches across pieces.
struct Counter {
    finder: memmem::Finder<'static>,
    carry: Vec<u8>,
    count: u64,
}

impl Counter {
    fn new(needle: &'static [u8]) -> Counter {
        Counter {
            finder: memmem::Finder::new(needle),
            carry: Vec::with_capacity(2 * needle.len()),
            count: 0,
        }
    }

    fn feed(&mut self, piece: &[u8]) {
        let k = self.finder.needle().len() - 1;
        if !self.carry.is_empty() {
            // Matches that start in the carried bytes and end in this piece.
            let c = self.carry.len();
            self.carry.extend_from_slice(&piece[..piece.len().min(k)]);
            self.count += self
                .finder
                .find_iter(&self.carry)
                .filter(|&at| at < c && at + k >= c)
                .count() as u64;
            self.carry.truncate(c);
        }
        self.count += self.finder.find_iter(piece).count() as u64;
        if piece.len() >= k {
            self.carry.clear();
            self.carry.extend_from_slice(&piece[piece.len() - k..]);
        } else {
            self.carry.extend_from_slice(piece);
            let excess = self.carry.len().saturating_sub(k);
            self.carry.drain(..excess);
        }
    }
}

/// What the client saw of one SSE invoke stream.
struct StreamSeen {
    bytes: u64,
    head: Vec<u8>,
    tail: Vec<u8>,
    logs: Counter,
    partials: Counter,
    exit_at: Option<Duration>,
}

const HEAD_KEEP: usize = 4096;
const TAIL_KEEP: usize = 16 << 10;

impl StreamSeen {
    fn new() -> StreamSeen {
        StreamSeen {
            bytes: 0,
            head: Vec::with_capacity(HEAD_KEEP),
            tail: Vec::with_capacity(2 * TAIL_KEEP),
            logs: Counter::new(b"\nevent: log\n"),
            partials: Counter::new(b"\"partial\":true"),
            exit_at: None,
        }
    }

    fn feed(&mut self, piece: &[u8], t0: Instant) {
        self.bytes += piece.len() as u64;
        if self.head.len() < HEAD_KEEP {
            let k = (HEAD_KEEP - self.head.len()).min(piece.len());
            self.head.extend_from_slice(&piece[..k]);
        }
        self.logs.feed(piece);
        self.partials.feed(piece);
        if piece.len() >= TAIL_KEEP {
            self.tail.clear();
            self.tail
                .extend_from_slice(&piece[piece.len() - TAIL_KEEP..]);
        } else {
            self.tail.extend_from_slice(piece);
            if self.tail.len() > 2 * TAIL_KEEP {
                let excess = self.tail.len() - TAIL_KEEP;
                self.tail.drain(..excess);
            }
        }
        if self.exit_at.is_none() {
            let from = self.tail.len().saturating_sub(piece.len() + 16);
            if memmem::find(&self.tail[from..], b"\nevent: exit\n").is_some() {
                self.exit_at = Some(t0.elapsed());
            }
        }
    }

    /// Checks the stream carried exactly `total` bytes of stdout and ended with exit 0;
    /// returns the number of `log` events.
    fn verify(&self, total: u64) -> u64 {
        let n = self.logs.count;
        let p = self.partials.count;
        // First frame: `start` (id 1).
        let start_len = memmem::find(&self.head, b"\n\n").expect("a start frame") as u64 + 2;
        assert!(
            self.head.starts_with(b"id: 1\nevent: start\n"),
            "the stream does not open with start"
        );
        // Last frame: `exit`.
        let t = &self.tail;
        assert!(t.ends_with(b"\n\n"), "the stream does not end with a frame");
        let exit_from = memmem::rfind(&t[..t.len() - 2], b"\n\n").expect("an exit frame") + 2;
        let exit_frame = std::str::from_utf8(&t[exit_from..]).expect("utf-8 exit frame");
        assert!(
            memmem::find(&t[..exit_from], b"\nevent: truncated\n").is_none(),
            "the journal cap truncated the stream"
        );
        let mut lines = exit_frame.lines();
        let id: u64 = lines
            .next()
            .and_then(|l| l.strip_prefix("id: "))
            .and_then(|v| v.parse().ok())
            .expect("exit id");
        assert_eq!(
            lines.next(),
            Some("event: exit"),
            "last frame: {exit_frame}"
        );
        let data: serde_json::Value = lines
            .next()
            .and_then(|l| l.strip_prefix("data: "))
            .and_then(|d| serde_json::from_str(d).ok())
            .expect("exit data");
        assert_eq!(data["exitCode"], 0, "exit: {data}");
        assert_eq!(id, n + 2, "events are start, {n} logs, exit");
        // Every log frame is `id: ID\nevent: log\ndata: {"stream":"stdout","data":"…"}\n\n`
        // (plus `,"partial":true` on partial ones), ids 2..=n+1, so the stdout bytes they
        // carry follow from the body length.
        let fixed = (b"id: ".len()
            + b"\nevent: log\ndata: ".len()
            + br#"{"stream":"stdout","data":""#.len()
            + b"\"}\n\n".len()) as u64;
        let digits: u64 = (2..=n + 1).map(|id| u64::from(id.ilog10() + 1)).sum();
        let log_bytes = self.bytes - start_len - exit_frame.len() as u64;
        let text = log_bytes - n * fixed - digits - p * br#","partial":true"#.len() as u64;
        let stdout = text + (n - p);
        assert_eq!(
            stdout, total,
            "stdout bytes carried by the stream ({n} logs, {p} partial)"
        );
        n
    }
}

/// Streams one invoke of the configured producer: (what was seen, time to stream end).
fn runner_stream(http: &mut Http) -> (StreamSeen, Duration) {
    let mut seen = StreamSeen::new();
    let t0 = Instant::now();
    http.send("POST", "/v1/invoke", "", b"");
    let status = http.read_response(&mut |piece| seen.feed(piece, t0));
    let elapsed = t0.elapsed();
    assert_eq!(status, 200);
    (seen, elapsed)
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

/// Writes `bytes` to a new file in `dir` in 1 MiB writes, then `fdatasync`: what the disk
/// takes in when a journal of that size is written and synced. Returns MB/s.
fn disk_write(dir: &std::path::Path, bytes: u64) -> f64 {
    let path = dir.join("disk-probe");
    let chunk = vec![b'a'; 1 << 20];
    let t0 = Instant::now();
    let mut f = std::fs::File::create(&path).expect("create the disk probe");
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n]).expect("write the disk probe");
        left -= n as u64;
    }
    f.sync_data().expect("fdatasync the disk probe");
    let rate = mbps(bytes, t0.elapsed());
    drop(f);
    std::fs::remove_file(&path).expect("remove the disk probe");
    rate
}

fn bench_throughput(rows: &mut Vec<Row>) {
    let total: u64 = env_or("BENCH_BYTES", 1u64 << 30);
    let repeat: usize = env_or("BENCH_REPEAT", 3).max(1);
    // One finished invoke kept, as on a runner that has been busy for a while: the journal
    // of the one before is a spare whose file the next stream overwrites in place (the first
    // run of each line length writes a new file; every run is printed).
    let runner = Runner::start(&[
        "--journal-max-bytes",
        "2GiB",
        "--retain-bytes",
        "4GiB",
        "--retain-invokes",
        "1",
    ]);
    let mut http = Http::connect(runner.addr, &format!("Authorization: Bearer {TOKEN}"));
    let size = if total == 1 << 30 {
        "1 GiB".to_owned()
    } else {
        format!("{total} B")
    };
    let disk = disk_write(runner.tmp.path(), total);
    println!("== disk: {size} written and fdatasync'ed next to the journals: {disk:.0} MB/s");
    for line_len in [100usize, 4000] {
        let script = producer(line_len, total);
        println!(
            "== stream {size} of stdout in {line_len}-byte lines through SSE (journaled), \
             best of {repeat}"
        );
        // A short run first: page cache, binaries, the connection.
        let warm = producer(line_len, 8 << 20);
        bare_stream(&warm);
        runner.configure(&mut http, &["sh", "-c", &warm]);
        runner_stream(&mut http).0.verify(8 << 20);

        runner.configure(&mut http, &["sh", "-c", &script]);
        let mut bare_time = Duration::MAX;
        let mut best: Option<(StreamSeen, Duration)> = None;
        for run in 1..=repeat {
            let (bare_bytes, bare_t) = bare_stream(&script);
            assert_eq!(
                bare_bytes, total,
                "the bare producer wrote a different amount"
            );
            bare_time = bare_time.min(bare_t);
            let (seen, t) = runner_stream(&mut http);
            seen.verify(total);
            println!(
                "  run {run}: bare pipe {:.0} MB/s, runner {:.0} MB/s ({:.2}×)",
                mbps(total, bare_t),
                mbps(total, t),
                bare_t.as_secs_f64() / t.as_secs_f64()
            );
            if best.as_ref().is_none_or(|(_, b)| t < *b) {
                best = Some((seen, t));
            }
        }
        let (seen, time) = best.expect("at least one run");
        let events = seen.verify(total);
        let exit_at = seen.exit_at.expect("exit event");

        let bare = mbps(total, bare_time);
        let through = mbps(total, time);
        let ratio = through / bare;
        let pass = ratio >= 0.5;
        // The journal holds the SSE bytes, so the disk caps the payload rate at this.
        let ceiling = disk * total as f64 / seen.bytes as f64;
        println!(
            "  bare pipe read      {bare:>8.0} MB/s   ({:.2} s)",
            bare_time.as_secs_f64()
        );
        println!(
            "  runner SSE          {through:>8.0} MB/s   ({:.2} s; exit event after {:.2} s; \
             {events} log events, {:.2} M events/s; {:.0} MB/s of SSE on the wire)",
            time.as_secs_f64(),
            exit_at.as_secs_f64(),
            events as f64 / time.as_secs_f64() / 1e6,
            mbps(seen.bytes, time),
        );
        println!(
            "  journal ceiling     {ceiling:>8.0} MB/s   (the disk rate × payload / SSE bytes \
             {:.2})",
            total as f64 / seen.bytes as f64
        );
        println!("  ratio {ratio:.2}× (goal ≥ 0.50×): {}", verdict(pass));
        rows.push(Row {
            name: format!("Stream {size} stdout, {line_len}-byte lines ({events} events)"),
            runner: format!("{through:.0} MB/s"),
            limit: format!("{bare:.0} MB/s (bare pipe read)"),
            ratio: format!("{ratio:.2}×"),
            goal: "≥ 0.5×".into(),
            result: verdict(pass).into(),
        });
        rows.push(Row::info(
            format!("Same, until the `exit` event arrives ({line_len}-byte lines)"),
            format!("{:.0} MB/s", mbps(total, exit_at)),
            format!("{bare:.0} MB/s"),
            format!("{:.2}×", mbps(total, exit_at) / bare),
        ));
        rows.push(Row::info(
            format!("Same, against the journal's disk ceiling ({line_len}-byte lines)"),
            format!("{through:.0} MB/s"),
            format!(
                "{ceiling:.0} MB/s (disk {disk:.0} MB/s × {:.2})",
                total as f64 / seen.bytes as f64
            ),
            format!("{:.2}×", through / ceiling),
        ));
    }
    drop(http);
    drop(runner);
}

// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// 3. Memory: runner RSS per running invoke, and the peak of a huge configure body.

/// `VmRSS` / `VmHWM` / `Threads` of a process (kB for the sizes).
fn proc_status(pid: i32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn bench_memory(rows: &mut Vec<Row>) {
    let levels: Vec<usize> = std::env::var("BENCH_CONCURRENT")
        .unwrap_or_else(|_| "100,1000".into())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    let most = levels.iter().copied().max().unwrap_or(0) as u64;
    agentbox_testkit::hostile::raise_nofile(most * 8 + 1024);
    for n in levels {
        // Each runs long enough for all n to be running at once (spawning 1,000 takes seconds);
        // the runner's stop cancels them afterwards.
        println!("== runner RSS with {n} concurrent streaming invokes of `echo; sleep 60; echo`");
        let cap = (n + 1).to_string();
        let runner = Runner::start(&["--max-concurrent-invokes", &cap, "--grace", "1s"]);
        let mut http = Http::connect(runner.addr, &format!("Authorization: Bearer {TOKEN}"));
        runner.configure(
            &mut http,
            &["sh", "-c", "echo started; sleep 60; echo done"],
        );
        let pid = runner.pid();
        let idle = proc_status(pid, "VmRSS:");
        let request = format!(
            "POST /v1/invoke HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Length: 0\r\n\r\n"
        );
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            let mut c = std::net::TcpStream::connect(runner.addr).expect("connect");
            c.write_all(request.as_bytes()).expect("send");
            conns.push(c);
        }
        // Every process has printed its first line: all n are running.
        let mut buf = vec![0u8; 64 << 10];
        for c in &mut conns {
            let mut seen = Vec::new();
            while memmem::find(&seen, b"started").is_none() {
                let got = c.read(&mut buf).expect("read");
                assert!(
                    got > 0,
                    "stream ended early: {}",
                    String::from_utf8_lossy(&seen)
                );
                seen.extend_from_slice(&buf[..got]);
            }
        }
        let running = proc_status(pid, "VmRSS:");
        let threads = proc_status(pid, "Threads:");
        let per = (running.saturating_sub(idle) as f64) / n as f64;
        println!(
            "   idle {idle} KiB, {n} running {running} KiB, {threads} threads: {per:.0} KiB per running invoke"
        );
        rows.push(Row {
            name: format!("runner RSS per running invoke, {n} concurrent"),
            runner: format!("{per:.0} KiB"),
            limit: format!("idle {idle} KiB"),
            ratio: format!("{threads} threads"),
            goal: "≤ 256 KiB".into(),
            result: verdict(per <= 256.0).into(),
        });
        drop(conns);
        drop(runner);
    }

    let total: usize = env_or("BENCH_CONFIGURE_MB", 300) * 1_000_000;
    println!(
        "== peak runner RSS of a {} MB configure body of tiny entries",
        total / 1_000_000
    );
    let runner = Runner::start(&[]);
    let pid = runner.pid();
    let idle = proc_status(pid, "VmRSS:");
    let mut c = std::net::TcpStream::connect(runner.addr).expect("connect");
    let head = format!(
        "POST /v1/configure HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {TOKEN}\r\n\
         Accept: application/json\r\nContent-Length: {total}\r\n\r\n"
    );
    c.write_all(head.as_bytes()).expect("send");
    let mut body = Vec::with_capacity(total.min(64 << 20));
    body.extend_from_slice(br#"{"entrypoint":["true"],"files":["#);
    let mut i = 0u64;
    while body.len() + 64 < total {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(format!(r#"{{"path":"f{i:09}","content":""}}"#).as_bytes());
        i += 1;
    }
    body.extend_from_slice(b"]}");
    body.resize(total, b' ');
    // The runner answers (413) long before the end; stop sending when it has.
    let _ = c.set_write_timeout(Some(Duration::from_secs(5)));
    for chunk in body.chunks(1 << 20) {
        if c.write_all(chunk).is_err() {
            break;
        }
    }
    let mut answer = vec![0u8; 4096];
    let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
    let got = c.read(&mut answer).unwrap_or(0);
    let status = String::from_utf8_lossy(&answer[..got.min(12)]).into_owned();
    let peak = proc_status(pid, "VmHWM:");
    println!("   idle {idle} KiB, peak {peak} KiB; answer {status:?}");
    rows.push(Row {
        name: format!("runner peak RSS, {} MB configure body", total / 1_000_000),
        runner: format!("+{} KiB", peak.saturating_sub(idle)),
        limit: format!("idle {idle} KiB"),
        ratio: "—".into(),
        goal: "≤ +64 MiB".into(),
        result: verdict(peak.saturating_sub(idle) <= 64 << 10).into(),
    });
}

fn main() {
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let started = Instant::now();
    let load_before = loadavg();
    let mut rows = Vec::new();
    if only.is_empty() || only == "latency" {
        bench_latency(&mut rows);
    }
    if only.is_empty() || only == "throughput" {
        bench_throughput(&mut rows);
    }
    if only.is_empty() || only == "memory" {
        bench_memory(&mut rows);
    }

    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "?".into());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = loadavg();
    println!();
    println!("### Runner benchmarks");
    println!();
    println!(
        "`cargo bench -p agentbox-runner --bench runner` — {}; {nproc} CPUs ({cpu}), Linux {}; \
         load average {load_before} before, {load} after; bench took {:.0} s. \
         MB = 10⁶ bytes; limits measured in the same run.",
        command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        command_line("uname", &["-r"]),
        started.elapsed().as_secs_f64()
    );
    println!();
    println!("| Benchmark | Runner | Physical limit | Ratio | Goal | Result |");
    println!("|---|---:|---:|---:|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.name, r.runner, r.limit, r.ratio, r.goal, r.result
        );
    }
}
