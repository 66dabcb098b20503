//! Finding and stopping a process tree through `/proc`.
//!
//! A tree is: the root process; every process in the root's process group; every process whose
//! environment carries the tree's marker (`AGENTBOX_INVOKE_ID=<id>`), which is how descendants
//! that called `setsid` or double-forked away (and were re-parented to the runner, a child
//! subreaper) are still found; and every descendant of those, by parent pid.

use std::collections::{HashMap, HashSet};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The parts of `/proc/<pid>/stat` this module needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Process id.
    pub pid: i32,
    /// State letter (`R`, `S`, `Z`, ...).
    pub state: u8,
    /// Parent pid.
    pub ppid: i32,
    /// Process group id.
    pub pgrp: i32,
}

/// Parses the content of `/proc/<pid>/stat`; the command name may hold spaces and parentheses.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let pid = text[..open].trim().parse().ok()?;
    let mut rest = text.get(close + 1..)?.split_ascii_whitespace();
    let state = *rest.next()?.as_bytes().first()?;
    let ppid = rest.next()?.parse().ok()?;
    let pgrp = rest.next()?.parse().ok()?;
    Some(ProcStat {
        pid,
        state,
        ppid,
        pgrp,
    })
}

/// The start time of `pid` (clock ticks after boot), which tells a process from a later one
/// that reused its pid.
pub fn start_time(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let close = text.rfind(')')?;
    text.get(close + 1..)?
        .split_ascii_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// The boot-time clock now, in the unit of a process's start time (clock ticks after boot, as
/// `/proc/<pid>/stat` gives it: the kernel rounds down).
pub fn boot_ticks() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    let hz = rustix::param::clock_ticks_per_second().max(1);
    let (secs, nanos) = (now.tv_sec.max(0) as u64, now.tv_nsec.max(0) as u64);
    secs * hz + nanos / (1_000_000_000 / hz).max(1)
}

/// The start time of a child spawned between two readings of [`boot_ticks`]: the kernel took
/// it at the fork, so when both readings agree it is that tick, with no `/proc` read (most
/// spawns take well under a tick); otherwise it is read from `/proc`.
pub fn start_time_within(pid: i32, before: u64, after: u64) -> Option<u64> {
    if before == after {
        Some(before)
    } else {
        start_time(pid)
    }
}

/// The root to use for a tree recorded as (`pid`, `started`) by an earlier runner: `pid` when
/// it is still that process or no process at all (its group may live on, and a pid in use as a
/// group id is never reused), 0 when the pid now belongs to someone else.
pub fn recorded_root(pid: i32, started: Option<u64>) -> i32 {
    match start_time(pid) {
        None => pid,
        Some(now) if Some(now) == started => pid,
        Some(_) => 0,
    }
}

fn read_all() -> Vec<ProcStat> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| {
        let name = entry.ok()?.file_name();
        let pid: i32 = name.to_str()?.parse().ok()?;
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        parse_stat(&text)
    })
    .collect()
}

fn has_marker(pid: i32, marker: &[u8]) -> bool {
    match std::fs::read(format!("/proc/{pid}/environ")) {
        Ok(env) => env.split(|b| *b == 0).any(|var| var == marker),
        Err(_) => false,
    }
}

/// The live (non-zombie) members of a tree, and whether any zombie members remain.
#[derive(Debug, Default)]
pub struct Members {
    /// Processes that can still be signaled.
    pub alive: Vec<i32>,
    /// Members that are dead but not yet reaped.
    pub zombies: usize,
}

/// Finds the members of the tree rooted at `root` (a process group leader) and marked with
/// `marker` (`NAME=value`).
pub fn members(root: i32, marker: &str) -> Members {
    let me = std::process::id() as i32;
    let all = read_all();
    let mut by_parent: HashMap<i32, Vec<i32>> = HashMap::new();
    for p in &all {
        by_parent.entry(p.ppid).or_default().push(p.pid);
    }
    let mut set: HashSet<i32> = HashSet::new();
    let mut queue: Vec<i32> = Vec::new();
    for p in &all {
        if p.pid == me {
            continue;
        }
        // Zombies keep no environment; they are found by group or parent instead.
        let seed = p.pid == root
            || (root > 0 && p.pgrp == root)
            || (p.state != b'Z' && has_marker(p.pid, marker.as_bytes()));
        if seed && set.insert(p.pid) {
            queue.push(p.pid);
        }
    }
    while let Some(pid) = queue.pop() {
        for child in by_parent.get(&pid).into_iter().flatten() {
            if *child != me && set.insert(*child) {
                queue.push(*child);
            }
        }
    }
    let mut out = Members::default();
    for p in all.iter().filter(|p| set.contains(&p.pid)) {
        if p.state == b'Z' {
            out.zombies += 1;
        } else {
            out.alive.push(p.pid);
        }
    }
    out
}

/// Sends `signal` to every live member; returns how many were signaled.
pub fn signal(root: i32, marker: &str, signal: Signal) -> usize {
    signal_members(root, marker, signal).len()
}

/// Like [`signal`], returning the pids signaled.
pub fn signal_members(root: i32, marker: &str, signal: Signal) -> Vec<i32> {
    let mut m = members(root, marker);
    if root > 0 {
        // The group first, in one call, so that a fork storm inside it is hit at once.
        let _ = nix::sys::signal::killpg(Pid::from_raw(root), signal);
    }
    m.alive
        .retain(|pid| !matches!(kill(Pid::from_raw(*pid), signal), Err(Errno::ESRCH)));
    m.alive
}

/// Whether a process (running, dying or a zombie) has `pid`.
pub fn exists(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether any process is left in the process group `pgid` (one cheap syscall).
pub fn group_exists(pgid: i32) -> bool {
    pgid > 0 && nix::sys::signal::killpg(Pid::from_raw(pgid), None).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_awkward_command_names() {
        let s = parse_stat("1234 (a (b) c) S 1 1234 1234 0 -1 4194560 0 0").expect("parse");
        assert_eq!(
            s,
            ProcStat {
                pid: 1234,
                state: b'S',
                ppid: 1,
                pgrp: 1234
            }
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn start_time_identifies_a_process() {
        let me = std::process::id() as i32;
        let t = start_time(me).expect("own start time");
        assert_eq!(recorded_root(me, Some(t)), me);
        assert_eq!(recorded_root(me, Some(t + 1)), 0);
    }

    #[test]
    fn a_start_time_bracketed_by_the_boot_clock_is_the_one_in_proc() {
        let mut agreed = 0;
        for _ in 0..20 {
            let before = boot_ticks();
            let mut child = std::process::Command::new("/bin/sleep")
                .arg("5")
                .spawn()
                .expect("spawn");
            let after = boot_ticks();
            let pid = child.id() as i32;
            let from_proc = start_time(pid).expect("start time");
            assert!(
                before <= from_proc && from_proc <= after,
                "{before} {from_proc} {after}"
            );
            assert_eq!(start_time_within(pid, before, after), Some(from_proc));
            agreed += usize::from(before == after);
            child.kill().expect("kill");
            child.wait().expect("wait");
        }
        // Most spawns fall within one tick, so the `/proc` read is the exception.
        assert!(agreed > 10, "only {agreed} of 20 spawns within one tick");
    }

    #[test]
    fn own_process_is_never_a_member() {
        let me = std::process::id() as i32;
        let m = members(me, "NO_SUCH_MARKER=1");
        assert!(!m.alive.contains(&me));
    }
}
