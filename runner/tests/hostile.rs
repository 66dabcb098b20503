//! Servers that hold under hostile load (issue 20), against the real binary: the path jail
//! raced by a process swapping a directory and a symlink to the outside, and the other abuse
//! cases each with a count of what got through.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use common::Runner;
use serde_json::{json, Value};

/// Every name under `dir` (recursively) that is one of the runner's temporary files.
fn temp_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(items) = std::fs::read_dir(&d) else {
            continue;
        };
        for item in items.flatten() {
            let path = item.path();
            if item.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path.clone());
            }
            if item.file_name().to_string_lossy().contains(".agentbox-") {
                out.push(path);
            }
        }
    }
    out
}

/// A thread swapping `ws/d` (a directory) and `ws/l` (a symlink to the outside) with
/// `renameat2(RENAME_EXCHANGE)` until dropped, as a process in the sandbox could.
struct Swapper {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Swapper {
    fn start(ws: &Path) -> Swapper {
        let stop = Arc::new(AtomicBool::new(false));
        let ws = ws.to_path_buf();
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let dir = std::fs::File::open(&ws).unwrap();
            let mut swaps = 0u64;
            while !flag.load(Ordering::Relaxed) {
                rustix::fs::renameat_with(&dir, "d", &dir, "l", rustix::fs::RenameFlags::EXCHANGE)
                    .unwrap();
                swaps += 1;
                if swaps.is_multiple_of(64) {
                    std::thread::yield_now();
                }
            }
            swaps
        });
        Swapper {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

/// A JSON error body with a code, or a success: never a 5xx, never a body that is not JSON.
async fn check_answer(op: &str, resp: reqwest::Response) -> (u16, bytes::Bytes) {
    let status = resp.status().as_u16();
    let body = resp.bytes().await.unwrap();
    assert!(
        status < 500,
        "{op}: {status} {}",
        String::from_utf8_lossy(&body)
    );
    if status >= 400 {
        let v: Value = serde_json::from_slice(&body)
            .unwrap_or_else(|_| panic!("{op}: {status} not JSON: {body:?}"));
        assert!(
            v["error"].is_string() && v["message"].is_string(),
            "{op}: {v}"
        );
    }
    (status, body)
}

/// The race of defect 5: each file operation on `d/...` runs while `d` and a symlink to an
/// outside directory trade places; not one may read, write or delete outside, every failure
/// is a JSON error, and no temporary file is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_jail_holds_against_a_swapping_race() {
    let tries: usize = std::env::var("AGENTBOX_RACE_TRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let r = Runner::start(&[]);
    let outside = tempfile::tempdir().unwrap();
    let out = std::fs::canonicalize(outside.path()).unwrap();
    std::fs::write(out.join("secret"), "OUTSIDE-SECRET").unwrap();
    let ws = r.workspace.clone();
    std::fs::create_dir(ws.join("d")).unwrap();
    std::fs::write(ws.join("d/secret"), "inside").unwrap();
    for i in 0..tries {
        std::fs::write(out.join(format!("victim-{i}")), "outside").unwrap();
        std::fs::write(ws.join(format!("d/victim-{i}")), "inside").unwrap();
    }
    std::os::unix::fs::symlink(&out, ws.join("l")).unwrap();
    let (status, body) = r.configure_json(json!({"entrypoint": ["true"]})).await;
    assert_eq!(status, 200, "{body}");

    let swapper = Swapper::start(&ws);
    let started = Instant::now();
    let mut escapes = std::collections::BTreeMap::<&str, usize>::new();
    let mut refused = std::collections::BTreeMap::<&str, usize>::new();
    for i in 0..tries {
        // GET
        let resp = r.get("/v1/files/workspace/d/secret").send().await.unwrap();
        let (status, body) = check_answer("GET", resp).await;
        *escapes.entry("GET").or_default() += usize::from(body == "OUTSIDE-SECRET".as_bytes());
        *refused.entry("GET").or_default() += usize::from(status >= 400);
        // archive (tar keeps file contents readable)
        let resp = r
            .get("/v1/archive?path=/workspace/d&format=tar")
            .send()
            .await
            .unwrap();
        let (status, body) = check_answer("archive", resp).await;
        let leaked = memchr::memmem::find(&body, b"OUTSIDE-SECRET").is_some();
        *escapes.entry("archive").or_default() += usize::from(leaked);
        *refused.entry("archive").or_default() += usize::from(status >= 400);
        // PUT
        let resp = r
            .client
            .put(r.url(&format!("/v1/files/workspace/d/put-{i}")))
            .bearer_auth(common::TOKEN)
            .body("written")
            .send()
            .await
            .unwrap();
        let (status, _) = check_answer("PUT", resp).await;
        *refused.entry("PUT").or_default() += usize::from(status >= 400);
        // configure
        let resp = r
            .post("/v1/configure")
            .header("accept", "application/json")
            .json(&json!({"files": [{"path": format!("d/cfg-{i}"), "content": "configured"}]}))
            .send()
            .await
            .unwrap();
        let (status, _) = check_answer("configure", resp).await;
        *refused.entry("configure").or_default() += usize::from(status >= 400);
        // DELETE
        let resp = r
            .client
            .delete(r.url(&format!("/v1/files/workspace/d/victim-{i}")))
            .bearer_auth(common::TOKEN)
            .send()
            .await
            .unwrap();
        let (status, _) = check_answer("DELETE", resp).await;
        *refused.entry("DELETE").or_default() += usize::from(status >= 400);
    }
    let swaps = swapper.finish();
    for i in 0..tries {
        *escapes.entry("PUT").or_default() += usize::from(out.join(format!("put-{i}")).exists());
        *escapes.entry("configure").or_default() +=
            usize::from(out.join(format!("cfg-{i}")).exists());
        *escapes.entry("DELETE").or_default() +=
            usize::from(!out.join(format!("victim-{i}")).exists());
    }
    eprintln!(
        "{tries} tries of each operation in {:?}, {swaps} swaps; escapes {escapes:?}, refused {refused:?}",
        started.elapsed()
    );
    assert!(swaps > tries as u64, "the swapper ran: {swaps} swaps");
    assert!(escapes.values().all(|n| *n == 0), "escapes: {escapes:?}");
    let leftovers: Vec<_> = temp_files(&ws)
        .into_iter()
        .chain(temp_files(&out))
        .filter(|p| !p.starts_with(ws.join(".agentbox")))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

/// A runner started under `prlimit --nofile=N:N` (the limit a small sandbox has), its log
/// (stderr, at `warn`) in a file; killed on drop.
struct Limited {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Limited {
    fn start(nofile: u64, extra: &[&str]) -> Limited {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stderr.log");
        std::fs::write(dir.path().join("token"), common::TOKEN).unwrap();
        let mut child = std::process::Command::new("prlimit")
            .arg(format!("--nofile={nofile}:{nofile}"))
            .arg("--")
            .arg(common::bin())
            .args(["--listen", "127.0.0.1:0", "--workspace"])
            .arg(dir.path().join("ws"))
            .arg("--token-file")
            .arg(dir.path().join("token"))
            .args(extra)
            .env("AGENTBOX_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("first line {line:?}"))
            .trim()
            .parse()
            .unwrap();
        Limited {
            child,
            addr,
            log,
            _dir: dir,
        }
    }

    fn log_lines(&self, needle: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }
}

impl Drop for Limited {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Defect 1: 5,000 idle and half-sent connections against a runner with 1,024 descriptors
/// (default flags). Each plain request on a new connection is still answered within 100 ms;
/// the saturation warning is rate-limited.
#[test]
fn a_connection_flood_does_not_starve_new_requests() {
    use agentbox_testkit::hostile::{flood, raise_nofile, timed_get};
    let want: usize = std::env::var("AGENTBOX_FLOOD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    let runner = Limited::start(1024, &[]);
    let limit = raise_nofile(want as u64 + 512);
    let n = want.min(limit.saturating_sub(256) as usize);
    let started = Instant::now();
    let (held, failed) = flood(runner.addr, n);
    let flood_time = started.elapsed();
    // Let the runner take the last of them from its backlog.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut latencies = Vec::new();
    for _ in 0..20 {
        let took = timed_get(runner.addr, "/healthz", std::time::Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("a plain request with {n} connections opened: {e}"));
        latencies.push(took);
    }
    let worst = latencies.iter().max().copied().unwrap_or_default();
    eprintln!(
        "{n} connections opened in {flood_time:?} ({failed} could not connect); \
         20 plain requests, worst {worst:?}; saturation warnings: {}",
        runner.log_lines("connection limit reached")
    );
    assert!(
        worst < std::time::Duration::from_millis(100),
        "{latencies:?}"
    );
    drop(held);
    let warnings = runner.log_lines("connection limit reached");
    let allowed = 1 + started.elapsed().as_secs() / 10;
    assert!(
        (1..=allowed).contains(&(warnings as u64)),
        "{warnings} saturation warnings in {:?}",
        started.elapsed()
    );
}

/// Defect 1: a half-sent request head is cut off after `--header-read-timeout`, a silent new
/// connection too, and a keep-alive connection after `--idle-timeout`; a slow response is not.
#[test]
fn header_read_and_idle_timeouts_close_connections() {
    use agentbox_testkit::hostile::{closed_after, HALF_HEAD};
    use std::time::Duration;
    let runner = Limited::start(
        1024,
        &["--header-read-timeout", "1s", "--idle-timeout", "2s"],
    );
    let limit = Duration::from_secs(6);
    let half = closed_after(runner.addr, HALF_HEAD, limit).expect("a half head is cut off");
    assert!(
        half >= Duration::from_millis(900) && half < Duration::from_secs(3),
        "{half:?}"
    );
    let silent = closed_after(runner.addr, b"", limit).expect("a silent connection is closed");
    assert!(silent < Duration::from_secs(3), "{silent:?}");
    let keep_alive = b"GET /healthz HTTP/1.1\r\nHost: agentbox\r\n\r\n";
    let idle = closed_after(runner.addr, keep_alive, limit).expect("an idle keep-alive is closed");
    assert!(
        idle >= Duration::from_millis(1900) && idle < Duration::from_secs(4),
        "{idle:?}"
    );
}

/// Whether `pid` is a live process (not gone, not a zombie waiting for its reaper).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .map(|i| s[i + 1..].trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

/// Peak resident memory of a process so far (`VmHWM`), and now (`VmRSS`), in bytes.
fn rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap()
            * 1024
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Defect 2: a JSON answer keeps at most `--max-json-output` of each stream and says so; the
/// journal still has every byte; the runner's memory does not grow with the output.
#[tokio::test]
async fn json_answers_are_capped_and_the_journal_keeps_everything() {
    let r = Runner::start(&["--max-json-output", "1MiB"]);
    let (_, idle) = rss(r.child.id());
    // 10,000 lines of 4,095 bytes and a newline.
    let total: usize = 10_000 * 4096;
    let script = "awk 'BEGIN { s = sprintf(\"%4095s\", \"\"); gsub(/ /, \"a\", s); \
                  for (i = 0; i < 10000; i++) print s }'; echo err >&2";
    let resp = r
        .post("/v1/exec")
        .json(&json!({ "command": script }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let stdout = body["stdout"].as_str().unwrap();
    assert_eq!(stdout.len(), 1 << 20, "kept exactly the cap");
    assert_eq!(body["stdoutTruncated"], true, "{}", &body["stderr"]);
    assert_eq!(body["stderrTruncated"], false);
    assert_eq!(body["stderr"], "err\n");
    let (peak, _) = rss(r.child.id());
    eprintln!(
        "idle RSS {} KiB, peak {} KiB after a {total}-byte output answered as JSON",
        idle >> 10,
        peak >> 10
    );
    assert!(peak - idle <= 64 << 20, "peak {peak} idle {idle}");
    // The journal has all of it.
    let id = body["invokeId"].as_str().unwrap();
    let events = r
        .get(&format!("/v1/invokes/{id}/events"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let events = common::parse_sse(&events);
    let out = common::rebuild(&events, "stdout");
    assert_eq!(out.len(), total);
}

/// Defect 2: a configure body of tiny entries is refused at the count limit as it arrives,
/// not after the whole body was read and parsed; the runner's peak memory stays near idle.
#[tokio::test]
async fn configure_limits_apply_while_the_body_is_read() {
    let r = Runner::start(&["--max-total-bytes", "48MiB"]);
    let (_, idle) = rss(r.child.id());
    // About 70 MB of `{"path":"f123456","content":""},` entries, generated as sent.
    let entries: usize = 2_000_000;
    let chunks = futures_util::stream::iter((0..entries / 10_000).map(move |c| {
        let mut s = String::with_capacity(10_000 * 36);
        if c == 0 {
            s.push_str(r#"{"entrypoint":["true"],"files":["#);
        }
        for i in c * 10_000..(c + 1) * 10_000 {
            if i > 0 {
                s.push(',');
            }
            s.push_str(&format!(r#"{{"path":"f{i:07}","content":""}}"#));
        }
        if c + 1 == entries / 10_000 {
            s.push_str("]}");
        }
        Ok::<_, std::io::Error>(s)
    }));
    let started = Instant::now();
    let resp = r
        .post("/v1/configure")
        .header("accept", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await;
    let (peak, _) = rss(r.child.id());
    eprintln!(
        "idle RSS {} KiB, peak {} KiB after a configure body of {entries} entries ({:?})",
        idle >> 10,
        peak >> 10,
        started.elapsed()
    );
    // The runner answers before the body ends; a client still sending may see the reset first.
    eprintln!("answer: {:?}", resp.as_ref().map(|r| r.status()));
    if let Ok(resp) = resp {
        assert_eq!(resp.status(), 413);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "payload_too_large", "{body}");
    }
    assert!(peak - idle <= 64 << 20, "peak {peak} idle {idle}");
    // Nothing was written, nothing staged is left.
    assert!(!r.workspace.join("f0000000").exists());
    let staging = r.workspace.join(".agentbox/staging");
    let left = std::fs::read_dir(&staging).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "staging directories left");
    // A configure within the limits still works, and its files land.
    let (status, body) = r
        .configure_json(json!({"entrypoint": ["true"], "files": [
            {"path": "a/b.txt", "content": "hello"},
            {"path": "c.bin", "contentBase64": "AAEC", "mode": "0755"}]}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        std::fs::read(r.workspace.join("a/b.txt")).unwrap(),
        b"hello"
    );
    assert_eq!(std::fs::read(r.workspace.join("c.bin")).unwrap(), [0, 1, 2]);
}

/// Defect 3: `--journal-max-bytes` bounds the journal on disk, not the output it holds: a
/// million one-byte lines (each a frame of about 60 bytes) stop at the cap.
#[tokio::test]
async fn the_journal_cap_counts_bytes_on_disk() {
    let r = Runner::start(&["--journal-max-bytes", "1MiB"]);
    let resp = r
        .post("/v1/exec")
        .json(&json!({"command": "yes | head -n 1000000"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["stdoutTruncated"], true);
    let id = body["invokeId"].as_str().unwrap();
    let journal = r.journal_of(id).expect("the journal");
    let size = std::fs::metadata(&journal).unwrap().len();
    eprintln!("journal of 2,000,000 output bytes with a 1 MiB cap: {size} bytes on disk");
    assert!(size <= (1 << 20) + 4096, "{size} bytes on disk");
    assert!(size >= (1 << 20) - 4096, "{size} bytes: the cap is used");
}

/// Defect 3: session histories are retained by their own flags; the oldest idle sessions
/// go, with their directories.
#[tokio::test]
async fn sessions_are_retained_by_count() {
    let r = Runner::start(&["--retain-sessions", "3"]);
    for i in 0..5 {
        let resp = r
            .post("/v1/sessions")
            .json(&json!({"id": format!("s{i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
    }
    let list = r.get_json("/v1/sessions").await;
    let ids: Vec<&str> = list["items"]
        .as_array()
        .unwrap_or_else(|| panic!("{list}"))
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["s2", "s3", "s4"]);
    let dirs = std::fs::read_dir(r.workspace.join(".agentbox/sessions"))
        .unwrap()
        .count();
    assert_eq!(dirs, 3);
}

/// Defect 9 (runner): a `Range` whose last byte is the largest integer answers the rest of
/// the file with a true `Content-Length`; a session body that is not an object is refused;
/// error messages name `/workspace` paths, never the host's workspace.
#[tokio::test]
async fn small_defects_of_the_runner() {
    let r = Runner::start(&[]);
    std::fs::write(r.workspace.join("f.txt"), b"0123456789abcdefghij").unwrap();
    let resp = r
        .get("/v1/files/workspace/f.txt")
        .header("range", "bytes=2-18446744073709551615")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 206);
    assert_eq!(resp.headers()["content-length"], "18");
    assert_eq!(resp.headers()["content-range"], "bytes 2-19/20");
    assert_eq!(resp.bytes().await.unwrap(), &b"23456789abcdefghij"[..]);

    for body in ["[null,null]", "[]", "null", "\"x\""] {
        let resp = r
            .post("/v1/sessions")
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{body}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"], "invalid_request", "{body}: {v}");
    }
    assert_eq!(r.get_json("/v1/sessions").await["items"], json!([]));

    let host = r.workspace.display().to_string();
    std::fs::create_dir(r.workspace.join("d")).unwrap();
    for (method, path) in [
        (
            "GET",
            "/v1/files/workspace/.agentbox/config.json".to_string(),
        ),
        ("GET", format!("/v1/files{host}/.agentbox/config.json")),
        ("GET", "/v1/files/workspace/f.txt/x".to_string()),
        ("GET", "/v1/files?path=/workspace/f.txt".to_string()),
        ("GET", "/v1/files/workspace/missing".to_string()),
        ("DELETE", "/v1/files/workspace/d/missing".to_string()),
    ] {
        let resp = r
            .client
            .request(method.parse().unwrap(), r.url(&path))
            .bearer_auth(common::TOKEN)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert!(status.is_client_error(), "{path}: {status} {text}");
        assert!(!text.contains(&host), "{path}: {text}");
    }
}

/// Defect 8: a runner killed (SIGKILL) while a configure's install runs. Before the fix the
/// install's tree lived on, its new files stayed under the old hash, and temporary files
/// stayed forever. The next runner kills the install, puts the old files back (files and hash
/// change together or not at all) and removes the temporary files.
#[tokio::test]
async fn a_crash_during_configure_is_undone_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Runner::start_in(dir.path(), &[]);
    let (status, body) = r
        .configure_json(json!({"entrypoint": ["true"], "files": [
            {"path": "conf.txt", "content": "old"},
            {"path": "link", "content": "was a file"}]}))
        .await;
    assert_eq!(status, 200, "{body}");
    let old_hash = body["installCommandHash"].clone();
    let pidfile = dir.path().join("install.pid");
    let script = format!("echo $$ > {}; exec sleep 60", pidfile.display());
    let request = r
        .post("/v1/configure")
        .json(&json!({"files": [
                {"path": "conf.txt", "content": "new"},
                {"path": "fresh/new.txt", "content": "new"}],
            "installCommand": ["sh", "-c", script]}))
        .send();
    let pending = tokio::spawn(async move { drop(request.await) });
    let pid: i32 = common::wait_for_file(&pidfile).await.parse().unwrap();
    assert_eq!(
        std::fs::read_to_string(r.workspace.join("conf.txt")).unwrap(),
        "new"
    );
    std::fs::create_dir_all(r.workspace.join("sub/deeper")).unwrap();
    let temps = [
        r.workspace
            .join("sub/deeper/.data.bin.agentbox-upload-0a1b2c3d4e5f"),
        r.workspace.join(".conf.txt.agentbox-write-0a1b2c3d4e5f"),
        r.workspace.join(".old.agentbox-9f8e7d6c5b4a"),
    ];
    for t in &temps {
        std::fs::write(t, b"partial").unwrap();
    }
    r.kill9();
    pending.abort();
    assert!(alive(pid), "the install outlives the runner");

    let r2 = Runner::start_in(dir.path(), &[]);
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    while (alive(pid) || temps.iter().any(|t| t.exists())) && Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(!alive(pid), "the install tree was killed");
    let left: Vec<_> = temps.iter().filter(|t| t.exists()).collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
    assert_eq!(
        std::fs::read_to_string(r2.workspace.join("conf.txt")).unwrap(),
        "old"
    );
    assert!(!r2.workspace.join("fresh/new.txt").exists());
    let info = r2.get_json("/v1/info").await;
    assert_eq!(info["installCommandHash"], old_hash, "{info}");
    assert!(!r2.workspace.join(".agentbox/staging").exists());
}
