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
