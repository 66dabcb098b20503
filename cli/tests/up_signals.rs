//! `agentbox up` ends its sandboxes however it is stopped: Ctrl-C, `kill` (TERM), a closed
//! terminal (HUP) stop them and exit 0; `kill -9` leaves nothing either (each sandbox's
//! launcher has a parent-death signal, its runner dies with the launcher, and everything in the
//! sandbox with its runner). Isolated sandboxes (the default), real processes.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{alive, Up};
use nix::sys::signal::Signal;

/// Every descendant of `root`, by parent pid.
fn descendants(root: i32) -> Vec<i32> {
    let table: Vec<(i32, i32)> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let ppid = stat
                .get(stat.rfind(')')? + 2..)?
                .split(' ')
                .nth(1)?
                .parse()
                .ok()?;
            Some((pid, ppid))
        })
        .collect();
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for (pid, ppid) in &table {
            if *ppid == parent && !out.contains(pid) {
                out.push(*pid);
                frontier.push(*pid);
            }
        }
    }
    out
}

fn stops_everything(signal: Signal) {
    let up = Up::start(&["--isolation", "namespaces"]);
    up.create("held");
    up.configure("held", "sleep 1000", &[]);
    // An invoke that runs on while `up` is stopped.
    let mut invoke = up.cmd(&["invoke", "held", "--detach"]);
    let out = common::run_with(
        {
            invoke.stdin(std::process::Stdio::null());
            invoke
        },
        None,
        Duration::from_secs(30),
    );
    out.expect_code(0);
    let tree = descendants(up.pid());
    assert!(
        tree.len() >= 4,
        "launcher, init, runner and the invoke run under up: {tree:?}"
    );
    let status = up.stop_with(signal);
    if signal != Signal::SIGKILL {
        assert_eq!(status.code(), Some(0), "{status:?}");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut left: Vec<i32> = tree.clone();
    while !left.is_empty() && std::time::Instant::now() < deadline {
        left.retain(|pid| alive(*pid));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(left, Vec::<i32>::new(), "outlived `up` after {signal}");
}

#[test]
fn sigterm_stops_the_sandboxes() {
    stops_everything(Signal::SIGTERM);
}

#[test]
fn sighup_stops_the_sandboxes() {
    stops_everything(Signal::SIGHUP);
}

#[test]
fn sigkill_leaves_no_sandbox_behind() {
    stops_everything(Signal::SIGKILL);
}

/// Where the kernel refuses the namespaces a sandbox needs, `up` refuses to start (exit 64)
/// and names the fixes, `--isolation none` among them; it writes no key. The refusal is made
/// real by running `up` in a user namespace that may have no nested ones.
#[test]
fn up_refuses_where_namespaces_are_not_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        "echo 0 > /proc/sys/user/max_user_namespaces && exec {} up --listen 127.0.0.1:0",
        common::bin().display()
    );
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["-Ur", "sh", "-c", &script])
        .current_dir(dir.path());
    let out = common::run_with(cmd, None, Duration::from_secs(30));
    let stderr = out.stderr_text();
    assert_eq!(out.code(), Some(64), "{stderr}");
    assert!(stderr.contains("unprivileged user namespaces"), "{stderr}");
    assert!(stderr.contains("--isolation none"), "{stderr}");
    assert!(
        !dir.path().join(".agentbox/cli.json").exists(),
        "a refused up saved a key"
    );
}
