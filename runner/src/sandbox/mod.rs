//! The local backend's sandbox: Linux namespaces set up by the runner binary itself, with
//! nothing to install (no bubblewrap, no setuid helper). Three processes, one per stage:
//!
//! ```text
//! agentbox-runner sandbox       (the launcher, on the host: uid of the control plane, or of the
//!   │                            sandbox when that is root; the egress proxy; limits; cleanup)
//!   └─ agentbox-runner sandbox-init   (own user namespace; then new mount, network, pid, ipc,
//!        │                             uts and cgroup namespaces; loopback up; egress listener)
//!        └─ agentbox-runner sandbox-pid1 → exec agentbox-runner   (pid 1 of the sandbox: new
//!             root from read-only binds, /proc, /dev, /tmp, /workspace; then a nested user
//!             namespace as uid 1000 with no capabilities, no_new_privs; then the runner)
//! ```
//!
//! The launcher writes the user namespace's maps (root maps the sandbox to an unprivileged
//! host uid of its own; anyone else maps their own uid), puts the init stage into the
//! sandbox's cgroup (v2, else v1, else rlimits), receives the egress proxy's listening socket
//! (bound inside the sandbox's network namespace) and serves it from the host's, where it
//! connects on the sandbox's behalf under the template's egress policy. The runner's socket
//! is a unix socket bound by the launcher on the host before the sandbox exists: inside, no
//! path leads to it. The token reaches the runner through a pipe, never the environment.
//! Every stage dies with the one above it (`PR_SET_PDEATHSIG`), and the kernel kills all of a
//! pid namespace when its pid 1 (the runner) exits, so nothing the sandbox started outlives it.

mod cgroup;
pub mod egress;
mod launch;
mod setup;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use serde::{Deserialize, Serialize};

pub use egress::Egress;

/// The port of the egress proxy inside every sandbox (127.0.0.1 there).
pub const EGRESS_PORT: u16 = 3128;

/// Processes and threads the runner may have beyond the sandbox's `limits.pids`: a fork bomb
/// in the sandbox stops at the limit, and the runner can still start the threads that stop it.
pub const RUNNER_PIDS_RESERVE: u64 = 64;

/// The uid and gid an agent has inside its sandbox.
pub const SANDBOX_UID: u32 = 1000;

/// Everything the launcher needs, written by the control plane as JSON (no secrets: the
/// token comes on the launcher's stdin).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Spec {
    /// The sandbox's name (its hostname).
    pub name: String,
    /// The host directory of the sandbox (the runner's socket is created there).
    pub dir: PathBuf,
    /// The host directory mounted at `/workspace`.
    pub workspace: PathBuf,
    /// The runner's own flags (mode, caps, timeouts).
    #[serde(default)]
    pub runner_args: Vec<String>,
    /// The complete environment of the runner, and so of its children.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Host paths added read-only at the same place inside.
    #[serde(default)]
    pub read_only_paths: Vec<PathBuf>,
    /// A host directory mounted read-only at `/run/credentials` (the sandbox's named
    /// credentials, rewritten in place by the control plane when one is rotated).
    #[serde(default)]
    pub credentials: Option<PathBuf>,
    /// Where the sandbox may connect.
    #[serde(default)]
    pub egress: Egress,
    /// Names the egress proxy resolves to fixed addresses (as `/etc/hosts` would).
    #[serde(default)]
    pub extra_hosts: BTreeMap<String, IpAddr>,
    /// Resource limits.
    #[serde(default)]
    pub limits: Limits,
    /// The host uid (and gid) the sandbox runs as when the launcher is root; ignored
    /// otherwise (the launcher's own uid is the only one it may map).
    #[serde(default)]
    pub host_uid: Option<u32>,
    /// Die with the launcher's parent (`agentbox up`); otherwise sandboxes outlive a
    /// control plane restart and are re-adopted.
    #[serde(default)]
    pub tie_to_parent: bool,
    /// The runner binary on the host (the launcher's own; filled in by it).
    #[serde(default)]
    pub runner_path: PathBuf,
    /// The memory cgroup's directory on the host (filled in by the launcher).
    #[serde(default)]
    pub cgroup_dir: Option<PathBuf>,
    /// Set up, then end without starting the runner (`sandbox --probe`).
    #[serde(default)]
    pub probe: bool,
}

/// Per-sandbox limits; `None` is no limit.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    /// Memory of all its processes together (cgroup), or of each one (rlimit fallback).
    pub memory_bytes: Option<u64>,
    /// Processes and threads at once.
    pub pids: Option<u64>,
    /// CPU time in millionths of a CPU per second (cgroup only).
    pub cpu_micros: Option<u64>,
    /// Size of its `/tmp` (memory-backed).
    pub tmp_bytes: Option<u64>,
}

/// How limits are enforced, as the launcher reports it on its first line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Enforcement {
    /// A cgroup v2 child cgroup: memory, pids and cpu for the sandbox as a whole.
    CgroupV2,
    /// cgroup v1 memory, pids (and cpu where mounted) hierarchies.
    CgroupV1,
    /// No cgroup could be created: RLIMIT_NPROC counts the sandbox's processes (its own user
    /// namespace), RLIMIT_AS bounds each process's memory; no CPU limit.
    Rlimits,
}

impl Enforcement {
    /// The name printed and recorded.
    pub fn as_str(self) -> &'static str {
        match self {
            Enforcement::CgroupV2 => "cgroup-v2",
            Enforcement::CgroupV1 => "cgroup-v1",
            Enforcement::Rlimits => "rlimits",
        }
    }
}

/// Runs the stage named by `argv[1]` when it is one of the sandbox's; `None` otherwise
/// (the runner proper).
pub fn dispatch() -> Option<ExitCode> {
    let args: Vec<String> = std::env::args().collect();
    let stage = args.get(1)?.as_str();
    let rest = &args[2..];
    let result = match stage {
        "sandbox" => launch::main(rest),
        "sandbox-init" => setup::init_main(rest),
        "sandbox-pid1" => setup::pid1_main(rest),
        _ => return None,
    };
    Some(match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("agentbox-runner {stage}: {message}");
            // sysexits' EX_OSERR: the sandbox could not be set up.
            ExitCode::from(71)
        }
    })
}

/// The descriptors a stage hands to the next, by number (inherited across exec).
#[derive(Debug, Clone, Copy, Default)]
struct Fds {
    /// The runner's listening unix socket.
    listen: i32,
    /// A pipe holding the runner's token.
    token: i32,
    /// The launcher ↔ init control socket.
    control: i32,
    /// A memfd holding the spec.
    spec: i32,
    /// The workspace as a detached mount (`open_tree`, a root launcher), or -1: bound by path.
    workspace: i32,
    /// The runner binary as a detached mount, or -1: bound by path.
    runner: i32,
    /// Whether a cgroup holds the sandbox (1) or rlimits bound it (-1).
    cgroup: i32,
}

impl Fds {
    fn to_arg(self) -> String {
        format!(
            "{},{},{},{},{},{},{}",
            self.listen,
            self.token,
            self.control,
            self.spec,
            self.workspace,
            self.runner,
            self.cgroup
        )
    }

    fn parse(text: &str) -> Result<Self, String> {
        let n: Vec<i32> = text
            .split(',')
            .map(|p| {
                p.parse()
                    .map_err(|_| format!("bad descriptor list {text:?}"))
            })
            .collect::<Result<_, _>>()?;
        let [listen, token, control, spec, workspace, runner, cgroup] = n[..] else {
            return Err(format!("bad descriptor list {text:?}"));
        };
        Ok(Fds {
            listen,
            token,
            control,
            spec,
            workspace,
            runner,
            cgroup,
        })
    }
}
