//! The control plane under hostile load (issue 20), against the real binary: connection
//! floods and slow clients, each with a count of what got through.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentbox_testkit::hostile::{closed_after, flood, raise_nofile, timed_get, HALF_HEAD};
use common::Env;

/// A control plane started under `prlimit --nofile=N:N`, stderr in a file; killed on drop.
struct Limited {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Limited {
    fn start(env: &Env, nofile: u64, extra: &[&str]) -> Limited {
        let mut args = env.args("none");
        args.extend(extra.iter().map(|s| s.to_string()));
        let base = env.command(&args);
        let mut cmd = Command::new("prlimit");
        cmd.arg(format!("--nofile={nofile}:{nofile}"))
            .arg("--")
            .arg(base.get_program())
            .args(base.get_args());
        for (key, value) in base.get_envs() {
            match value {
                Some(v) => cmd.env(key, v),
                None => cmd.env_remove(key),
            };
        }
        let log = env.root.join("cp.stderr");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
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
        Limited { child, addr, log }
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

/// Defect 1: 5,000 idle and half-sent connections against a control plane with 1,024
/// descriptors (default flags); plain requests on new connections are answered within 100 ms
/// and the saturation warning is rate-limited.
#[test]
fn a_connection_flood_does_not_starve_new_requests() {
    let want: usize = std::env::var("AGENTBOX_FLOOD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    let env = Env::new();
    let cp = Limited::start(&env, 1024, &[]);
    let limit = raise_nofile(want as u64 + 512);
    let n = want.min(limit.saturating_sub(256) as usize);
    let started = Instant::now();
    let (held, failed) = flood(cp.addr, n);
    let flood_time = started.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let mut latencies = Vec::new();
    for _ in 0..20 {
        let took = timed_get(cp.addr, "/healthz", Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("a plain request with {n} connections opened: {e}"));
        latencies.push(took);
    }
    let worst = latencies.iter().max().copied().unwrap_or_default();
    eprintln!(
        "{n} connections opened in {flood_time:?} ({failed} could not connect); \
         20 plain requests, worst {worst:?}; saturation warnings: {}",
        cp.log_lines("connection limit reached")
    );
    assert!(worst < Duration::from_millis(100), "{latencies:?}");
    drop(held);
    let warnings = cp.log_lines("connection limit reached") as u64;
    let allowed = 1 + started.elapsed().as_secs() / 10;
    assert!(
        (1..=allowed).contains(&warnings),
        "{warnings} saturation warnings"
    );
}

/// Defect 1: a half-sent request head is cut off after `--header-read-timeout`, a silent new
/// connection too, and a keep-alive connection after `--idle-timeout`.
#[test]
fn header_read_and_idle_timeouts_close_connections() {
    let env = Env::new();
    let cp = Limited::start(
        &env,
        1024,
        &["--header-read-timeout", "1s", "--idle-timeout", "2s"],
    );
    let limit = Duration::from_secs(6);
    let half = closed_after(cp.addr, HALF_HEAD, limit).expect("a half head is cut off");
    assert!(
        half >= Duration::from_millis(900) && half < Duration::from_secs(3),
        "{half:?}"
    );
    let silent = closed_after(cp.addr, b"", limit).expect("a silent connection is closed");
    assert!(silent < Duration::from_secs(3), "{silent:?}");
    let keep_alive = b"GET /healthz HTTP/1.1\r\nHost: agentbox\r\n\r\n";
    let idle = closed_after(cp.addr, keep_alive, limit).expect("an idle keep-alive is closed");
    assert!(
        idle >= Duration::from_millis(1900) && idle < Duration::from_secs(4),
        "{idle:?}"
    );
}

/// Defect 7: a flood of requests with bad credentials adds a few aggregated audit records,
/// not one per request, and every refusal is still counted; the audit log is rotated by size.
#[tokio::test]
async fn refused_credentials_are_aggregated_and_the_audit_log_rotates() {
    let env = Env::new();
    let cp = env.start_with(
        "none",
        &["--audit-log-max-bytes", "8192", "--audit-log-keep", "2"],
    );
    // Authorized actions are each recorded: 200 of them (creates of a taken name), about
    // 30 KiB, rotate the log.
    cp.create("taken", "default").await;
    for _ in 0..200 {
        let resp = cp
            .admin(reqwest::Method::POST, "/api/v1/sandboxes")
            .json(&serde_json::json!({"name": "taken"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 409);
    }
    let client = reqwest::Client::new();
    let started = Instant::now();
    let refused = 2_000;
    for i in 0..refused {
        let resp = client
            .get(cp.url("/api/v1/sandboxes"))
            .header("x-api-key", format!("wrong-{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
    }
    let flood = started.elapsed();
    // The last window of refusals is written within a second.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let path = env.state.join("audit.log");
    let mut files = vec![path.clone()];
    for n in 1..=3 {
        let mut p = path.clone().into_os_string();
        p.push(format!(".{n}"));
        files.push(PathBuf::from(p));
    }
    let (mut bytes, mut denied_lines, mut denied_total, mut deletes) = (0, 0, 0, 0);
    for f in &files[..3] {
        let text = std::fs::read_to_string(f).unwrap_or_else(|e| {
            let log = std::fs::read_to_string(&files[0]).unwrap_or_default();
            panic!("{f:?}: {e}; audit.log: {}", &log[..log.len().min(2000)])
        });
        bytes += text.len();
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            if v["action"] == "authenticate" {
                denied_lines += 1;
                denied_total += v["count"].as_u64().unwrap_or(1);
            } else if v["action"] == "create" && v["status"] == 409 {
                deletes += 1;
            }
        }
    }
    assert!(
        !files[3].exists(),
        "only --audit-log-keep rotated files are kept"
    );
    eprintln!(
        "{refused} refused requests in {flood:?}: {denied_lines} audit records; \
         audit files hold {bytes} bytes"
    );
    assert!(bytes <= 3 * 8192, "{bytes} bytes");
    let allowed = 2 * (flood.as_secs() as usize + 2);
    assert!(
        denied_lines <= allowed,
        "{denied_lines} records for {refused} refusals"
    );
    // Every refusal is counted (the refusals came last, so rotation dropped none of them).
    assert_eq!(
        denied_total,
        refused as u64,
        "{}",
        std::fs::read_to_string(&files[0]).unwrap()
    );
    assert!(
        deletes > 0 && deletes < 200,
        "rotated: {deletes} delete records kept"
    );
}

/// Defect 9 (control plane): TRACE and a wrong method on a known route answer 405 JSON, also
/// on the routes passed to a runner; a `Range` with the largest last byte is answered through
/// the proxy with the rest of the file (it was a 502).
#[tokio::test]
async fn methods_and_ranges_through_the_control_plane() {
    use reqwest::Method;
    let env = Env::new();
    let cp = env.start();
    cp.create("sb", "default").await;
    let trace = Method::from_bytes(b"TRACE").unwrap();
    for (method, path) in [
        (trace.clone(), "/api/v1/sandboxes"),
        (trace.clone(), "/healthz"),
        (trace.clone(), "/api/v1/sandboxes/sb/files/workspace/x"),
        (Method::GET, "/api/v1/sandboxes/sb/invoke"),
        (Method::GET, "/api/v1/sandboxes/sb/stop"),
        (Method::PUT, "/api/v1/sandboxes/sb/configure"),
        (Method::DELETE, "/api/v1/sandboxes/sb/exec"),
    ] {
        let resp = cp.admin(method.clone(), path).send().await.unwrap();
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        assert_eq!(status, 405, "{method} {path}: {body}");
        assert_eq!(
            body["error"], "method_not_allowed",
            "{method} {path}: {body}"
        );
    }
    let resp = cp
        .admin(Method::GET, "/api/v1/sandboxes/sb/nothing")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);

    let resp = cp
        .sb(Method::PUT, "sb", "/files/workspace/f.txt")
        .body("0123456789abcdefghij")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let resp = cp
        .sb(Method::GET, "sb", "/files/workspace/f.txt")
        .header("range", "bytes=2-18446744073709551615")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 206);
    assert_eq!(resp.headers()["content-length"], "18");
    assert_eq!(resp.bytes().await.unwrap(), &b"23456789abcdefghij"[..]);
}
