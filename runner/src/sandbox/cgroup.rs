//! The sandbox's cgroup, made by the launcher: a child of the launcher's own cgroup in the v2
//! hierarchy when its memory and pids controllers are delegated there, else in the v1 memory
//! and pids hierarchies (cpu too where mounted) when they are writable, else none (the caller
//! falls back to rlimits). Removed when the launcher ends.

use std::path::{Path, PathBuf};

use super::{Enforcement, Limits};

/// A cgroup made for one sandbox (one directory per v1 hierarchy).
#[derive(Debug)]
pub(super) struct Cgroup {
    pub(super) kind: Enforcement,
    dirs: Vec<PathBuf>,
    /// The directory whose file counts memory kills (`memory.events` / `memory.oom_control`).
    pub(super) memory_dir: Option<PathBuf>,
}

/// `(mount point, fstype, super options)` of every cgroup mount.
fn cgroup_mounts() -> Vec<(PathBuf, String, String)> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let mount_point = pre.split(' ').nth(4)?;
            let mut post = post.split(' ');
            let fstype = post.next()?;
            let _source = post.next()?;
            let options = post.next().unwrap_or_default();
            fstype.starts_with("cgroup").then(|| {
                (
                    PathBuf::from(mount_point),
                    fstype.to_owned(),
                    options.to_owned(),
                )
            })
        })
        .collect()
}

/// `(hierarchy's controllers, path)` lines of `/proc/self/cgroup`.
fn own_cgroups() -> Vec<(String, String)> {
    std::fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?.to_owned();
            let path = parts.next()?.to_owned();
            Some((controllers, path))
        })
        .collect()
}

/// Removes the empty cgroups an earlier launcher of the same sandbox left when it was killed
/// (`agentbox-<name>-<dir hash>-<pid>`; a cgroup with processes in it refuses removal).
fn sweep(parent: &Path, leaf: &str) {
    let Some(prefix) = leaf.rsplit_once('-').map(|(p, _)| format!("{p}-")) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

fn write(dir: &Path, file: &str, value: &str) -> std::io::Result<()> {
    std::fs::write(dir.join(file), value)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", dir.join(file).display())))
}

impl Cgroup {
    /// Makes the cgroup `leaf` with `limits`, or `None` when no hierarchy can be written.
    pub(super) fn create(leaf: &str, limits: &Limits) -> Option<Cgroup> {
        let mounts = cgroup_mounts();
        let own = own_cgroups();
        if let Some(cg) = Self::v2(&mounts, &own, leaf, limits) {
            return Some(cg);
        }
        Self::v1(&mounts, &own, leaf, limits)
    }

    fn v2(
        mounts: &[(PathBuf, String, String)],
        own: &[(String, String)],
        leaf: &str,
        limits: &Limits,
    ) -> Option<Cgroup> {
        let (mount, _, _) = mounts.iter().find(|(_, t, _)| t == "cgroup2")?;
        let (_, path) = own.iter().find(|(c, _)| c.is_empty())?;
        let parent = mount.join(path.trim_start_matches('/'));
        let enabled = std::fs::read_to_string(parent.join("cgroup.subtree_control")).ok()?;
        let has = |c: &str| enabled.split_whitespace().any(|x| x == c);
        if !(has("memory") && has("pids")) {
            // Try to enable them (works where the parent has no processes of its own).
            write(&parent, "cgroup.subtree_control", "+memory +pids").ok()?;
        }
        sweep(&parent, leaf);
        let dir = parent.join(leaf);
        std::fs::create_dir(&dir).ok()?;
        let cg = Cgroup {
            kind: Enforcement::CgroupV2,
            dirs: vec![dir.clone()],
            memory_dir: Some(dir.clone()),
        };
        let set = || -> std::io::Result<()> {
            if let Some(m) = limits.memory_bytes {
                write(&dir, "memory.max", &m.to_string())?;
                let _ = write(&dir, "memory.swap.max", "0");
            }
            if let Some(p) = limits.pids {
                write(
                    &dir,
                    "pids.max",
                    &(p + super::RUNNER_PIDS_RESERVE).to_string(),
                )?;
            }
            if let Some(c) = limits.cpu_micros {
                let _ = write(&dir, "cpu.max", &format!("{c} 1000000"));
            }
            Ok(())
        };
        match set() {
            Ok(()) => Some(cg),
            Err(e) => {
                eprintln!("agentbox-runner sandbox: cgroup v2 limits refused ({e}); trying v1");
                drop(cg);
                None
            }
        }
    }

    fn v1(
        mounts: &[(PathBuf, String, String)],
        own: &[(String, String)],
        leaf: &str,
        limits: &Limits,
    ) -> Option<Cgroup> {
        let hierarchy = |controller: &str| -> Option<PathBuf> {
            let (mount, _, _) = mounts
                .iter()
                .find(|(_, t, o)| t == "cgroup" && o.split(',').any(|x| x == controller))?;
            let (_, path) = own
                .iter()
                .find(|(c, _)| c.split(',').any(|x| x == controller))?;
            Some(mount.join(path.trim_start_matches('/')))
        };
        let memory = hierarchy("memory")?;
        let pids = hierarchy("pids")?;
        let mut cg = Cgroup {
            kind: Enforcement::CgroupV1,
            dirs: Vec::new(),
            memory_dir: None,
        };
        let mut make = |parent: PathBuf| -> Option<PathBuf> {
            sweep(&parent, leaf);
            let dir = parent.join(leaf);
            std::fs::create_dir(&dir).ok()?;
            cg.dirs.push(dir.clone());
            Some(dir)
        };
        let memory = make(memory)?;
        let pids = make(pids)?;
        let cpu = hierarchy("cpu").and_then(&mut make);
        cg.memory_dir = Some(memory.clone());
        let set = || -> std::io::Result<()> {
            if let Some(m) = limits.memory_bytes {
                write(&memory, "memory.limit_in_bytes", &m.to_string())?;
                // Without swap accounting the file is absent: the limit is then memory only.
                let _ = write(&memory, "memory.memsw.limit_in_bytes", &m.to_string());
            }
            if let Some(p) = limits.pids {
                write(
                    &pids,
                    "pids.max",
                    &(p + super::RUNNER_PIDS_RESERVE).to_string(),
                )?;
            }
            if let (Some(c), Some(cpu)) = (limits.cpu_micros, &cpu) {
                let _ = write(cpu, "cpu.cfs_period_us", "100000");
                let _ = write(cpu, "cpu.cfs_quota_us", &(c / 10).max(1000).to_string());
            }
            Ok(())
        };
        match set() {
            Ok(()) => Some(cg),
            Err(e) => {
                eprintln!("agentbox-runner sandbox: cgroup v1 limits refused ({e})");
                None
            }
        }
    }

    /// Moves process `pid` (and so everything it starts) into the cgroup.
    pub(super) fn add(&self, pid: u32) -> std::io::Result<()> {
        for dir in &self.dirs {
            write(dir, "cgroup.procs", &pid.to_string())?;
        }
        Ok(())
    }

    /// Kills whatever is left in it (v2 `cgroup.kill` where present, else each listed pid).
    fn kill_all(&self) {
        for dir in &self.dirs {
            if write(dir, "cgroup.kill", "1").is_ok() {
                continue;
            }
            for pid in std::fs::read_to_string(dir.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
            {
                if let Ok(pid) = pid.trim().parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        self.kill_all();
        for dir in &self.dirs {
            // A cgroup is removable once its last process is gone (reaped): a few tries.
            for _ in 0..50 {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
                }
            }
        }
    }
}
