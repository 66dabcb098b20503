//! The launcher: the host side of one sandbox (`agentbox-runner sandbox --spec FILE`, token on
//! stdin). Prepares what must be opened with the host's view and rights, starts the init
//! stage, writes its user namespace's maps, puts it in the cgroup, serves the egress proxy,
//! forwards stop signals to the runner and, when the sandbox ends, removes what it made.

use std::io::{IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use rustix::io::FdFlags;

use super::cgroup::Cgroup;
use super::egress::{self, Policy};
use super::{Enforcement, Fds, Spec};

/// The host uid a root launcher gives a sandbox whose spec names none: unprivileged, and no
/// common distribution allocates it to anybody.
const DEFAULT_HOST_UID: u32 = 0x5A_0000;

pub(super) fn main(args: &[String]) -> Result<ExitCode, String> {
    let mut spec_path = None;
    let mut probe = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--spec" => spec_path = it.next().map(PathBuf::from),
            "--probe" => probe = true,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if probe {
        return run_probe();
    }
    let spec_path = spec_path.ok_or("--spec FILE is required")?;
    let spec: Spec = serde_json::from_slice(
        &std::fs::read(&spec_path)
            .map_err(|e| format!("cannot read {}: {e}", spec_path.display()))?,
    )
    .map_err(|e| format!("bad spec {}: {e}", spec_path.display()))?;
    let mut token = String::new();
    std::io::stdin()
        .take(4096)
        .read_to_string(&mut token)
        .map_err(|e| format!("cannot read the token on stdin: {e}"))?;
    let token = token.trim().to_owned();
    if token.is_empty() {
        return Err("no token on stdin".into());
    }
    launch(&spec, &token, false)
}

/// Sets up a throwaway sandbox in a temporary directory and ends it at once: exit 0 when
/// every namespace, mount and map the sandbox needs is allowed here.
fn run_probe() -> Result<ExitCode, String> {
    let dir = std::env::temp_dir().join(format!("agentbox-probe-{}", std::process::id()));
    let workspace = dir.join("workspace");
    std::fs::create_dir_all(&workspace).map_err(|e| format!("{}: {e}", workspace.display()))?;
    let spec = Spec {
        name: "probe".into(),
        dir: dir.clone(),
        workspace,
        ..Spec::default()
    };
    let result = launch(&spec, "probe", true);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// A detached copy of the mount at `path` (root only), which the sandbox's pid 1 attaches in
/// its own mount namespace: it needs no path that the sandbox's uid could walk.
fn detached(path: &Path) -> Option<OwnedFd> {
    use rustix::mount::OpenTreeFlags as F;
    rustix::mount::open_tree(
        rustix::fs::CWD,
        path,
        F::OPEN_TREE_CLONE | F::OPEN_TREE_CLOEXEC | F::AT_RECURSIVE,
    )
    .ok()
}

fn inheritable(fd: &impl AsFd) -> Result<i32, String> {
    rustix::io::fcntl_setfd(fd, FdFlags::empty()).map_err(|e| format!("fcntl: {e}"))?;
    Ok(fd.as_fd().as_raw_fd())
}

fn launch(spec: &Spec, token: &str, probe: bool) -> Result<ExitCode, String> {
    if spec.tie_to_parent {
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(|e| format!("prctl: {e}"))?;
        if nix::unistd::getppid().as_raw() == 1 {
            return Err("the control plane that started this sandbox is gone".into());
        }
    }
    // Stop signals are taken by one thread (below) and passed to the runner; blocked here,
    // before any thread exists, so every thread inherits the mask. Children get an empty one.
    let mut stops = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        stops.add(s);
    }
    stops.thread_block().map_err(|e| format!("sigmask: {e}"))?;

    let policy = Policy::new(&spec.egress, &spec.extra_hosts)?;
    let euid = rustix::process::geteuid();
    let own = (euid.as_raw(), rustix::process::getegid().as_raw());
    let (host_uid, host_gid) = if euid.is_root() {
        let u = spec.host_uid.unwrap_or(DEFAULT_HOST_UID);
        if u == 0 {
            return Err("a sandbox never runs as the host's root".into());
        }
        // The sandbox's uid must own its workspace (only the top: what is inside was made by
        // that uid in earlier runs). A root that is itself in a user namespace where that uid
        // does not exist (EINVAL) maps its own uid instead, as an unprivileged user does.
        let ws = std::fs::canonicalize(&spec.workspace)
            .map_err(|e| format!("{}: {e}", spec.workspace.display()))?;
        match std::os::unix::fs::chown(&ws, Some(u), Some(u)) {
            Ok(()) => (u, u),
            Err(e) if e.raw_os_error() == Some(22) => own,
            Err(e) => return Err(format!("chown {}: {e}", ws.display())),
        }
    } else {
        own
    };

    let limited = spec.limits.memory_bytes.is_some()
        || spec.limits.pids.is_some()
        || spec.limits.cpu_micros.is_some();
    let cgroup = if limited {
        // Named by the sandbox's directory too: sandboxes of one name under other state
        // directories (other control planes) have cgroups of their own, which the sweep of
        // this one's leftovers (`agentbox-<name>-<dir>-*`) must not touch.
        let dir = {
            use sha2::Digest;
            hex::encode(&sha2::Sha256::digest(spec.dir.as_os_str().as_encoded_bytes())[..4])
        };
        Cgroup::create(
            &format!("agentbox-{}-{dir}-{}", spec.name, std::process::id()),
            &spec.limits,
        )
    } else {
        None
    };
    let enforcement = cgroup.as_ref().map_or(Enforcement::Rlimits, |c| c.kind);

    // The runner's socket, bound here with the host's view; only its descriptor goes in.
    let sock_path = spec.dir.join("runner.sock");
    if sock_path.exists() {
        let _ = std::fs::remove_file(&sock_path);
    }
    let listener = UnixListener::bind(&sock_path)
        .map_err(|e| format!("cannot bind {}: {e}", sock_path.display()))?;
    let _ = std::fs::set_permissions(&sock_path, std::fs::Permissions::from_mode(0o600));
    let (token_r, token_w) = rustix::pipe::pipe().map_err(|e| format!("pipe: {e}"))?;
    std::fs::File::from(token_w)
        .write_all(token.as_bytes())
        .map_err(|e| format!("token pipe: {e}"))?;
    let spec_fd = rustix::fs::memfd_create("agentbox-spec", rustix::fs::MemfdFlags::CLOEXEC)
        .map_err(|e| format!("memfd: {e}"))?;
    let mut spec = spec.clone();
    spec.probe = probe;
    spec.runner_path =
        std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    spec.cgroup_dir = cgroup.as_ref().and_then(|c| c.memory_dir.clone());
    let spec_json = serde_json::to_value(&spec).map_err(|e| e.to_string())?;
    std::fs::File::from(rustix::io::dup(&spec_fd).map_err(|e| format!("dup: {e}"))?)
        .write_all(spec_json.to_string().as_bytes())
        .map_err(|e| format!("memfd: {e}"))?;
    let (workspace, runner) = if euid.is_root() {
        (detached(&spec.workspace), detached(&spec.runner_path))
    } else {
        (None, None)
    };
    let (control, control_child) = nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::Stream,
        None,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| format!("socketpair: {e}"))?;
    let fds = Fds {
        listen: inheritable(&listener)?,
        token: inheritable(&token_r)?,
        control: inheritable(&control_child)?,
        spec: inheritable(&spec_fd)?,
        workspace: match &workspace {
            Some(fd) => inheritable(fd)?,
            None => -1,
        },
        runner: match &runner {
            Some(fd) => inheritable(fd)?,
            None => -1,
        },
        cgroup: if cgroup.is_some() { 1 } else { -1 },
    };
    let mut init = Command::new("/proc/self/exe")
        .args([
            "sandbox-init".to_owned(),
            fds.to_arg(),
            std::process::id().to_string(),
            enforcement.as_str().to_owned(),
        ])
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the sandbox's init stage: {e}"))?;
    drop((listener, token_r, control_child, spec_fd, workspace, runner));
    let init_pid = init.id();
    let kill_init = |init: &mut std::process::Child, why: String| -> String {
        let _ = init.kill();
        let _ = init.wait();
        why
    };
    if let Some(cg) = &cgroup {
        if let Err(e) = cg.add(init_pid) {
            return Err(kill_init(
                &mut init,
                format!("cannot join the sandbox's cgroup: {e}"),
            ));
        }
    }
    let mut control = UnixStream::from(control);
    let handshake = (|| -> Result<(OwnedFd, i32), String> {
        expect(&mut control, b'U')?;
        std::fs::write(
            format!("/proc/{init_pid}/uid_map"),
            format!("0 {host_uid} 1\n"),
        )
        .map_err(|e| format!("cannot write the sandbox's uid map: {e}"))?;
        std::fs::write(
            format!("/proc/{init_pid}/gid_map"),
            format!("0 {host_gid} 1\n"),
        )
        .map_err(|e| format!("cannot write the sandbox's gid map: {e}"))?;
        control
            .write_all(b"M")
            .map_err(|e| format!("control: {e}"))?;
        receive_ready(&control)
    })();
    let (egress_listener, runner_pid) = match handshake {
        Ok(x) => x,
        Err(e) => {
            // The init stage said why on stderr (the same log) when it failed first.
            let _ = init.kill();
            let status = init.wait().ok();
            return Err(format!("{e} (init stage: {status:?})"));
        }
    };
    // The memory limit's kills should go to what the sandbox runs, not to its runner: where
    // the host allows it (CAP_SYS_RESOURCE), the runner is exempt; its children raise their
    // own scores in any case (`--children-oom-first`).
    let _ = std::fs::write(format!("/proc/{runner_pid}/oom_score_adj"), "-1000");
    println!(
        "isolation: namespaces; limits: {}; uid: {host_uid}",
        enforcement.as_str()
    );
    let _ = std::io::stdout().flush();

    let egress_listener = std::net::TcpListener::from(egress_listener);
    std::thread::Builder::new()
        .name("egress".into())
        .spawn(move || egress::serve(egress_listener, policy))
        .map_err(|e| format!("cannot start the egress proxy: {e}"))?;
    std::thread::Builder::new()
        .name("signals".into())
        .stack_size(64 << 10)
        .spawn(move || loop {
            if let Ok(sig) = stops.wait() {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(runner_pid), sig);
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;

    let status = init.wait().map_err(|e| format!("wait: {e}"))?;
    drop(cgroup);
    let _ = std::fs::remove_file(&sock_path);
    Ok(match status.code() {
        Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        None => ExitCode::from(1),
    })
}

fn expect(control: &mut UnixStream, byte: u8) -> Result<(), String> {
    let mut got = [0u8; 1];
    control
        .read_exact(&mut got)
        .map_err(|e| format!("the sandbox's init stage ended during set-up ({e})"))?;
    if got[0] != byte {
        return Err(format!("unexpected control byte {:?}", got[0] as char));
    }
    Ok(())
}

/// The last message of the set-up: `R <runner's pid>` with the egress listener attached.
fn receive_ready(control: &UnixStream) -> Result<(OwnedFd, i32), String> {
    let mut buf = [0u8; 64];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let (n, fd) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            control.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| format!("control: {e}"))?;
        let mut fd = None;
        for c in msg.cmsgs().map_err(|e| format!("control: {e}"))? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                fd = fds.first().copied();
            }
        }
        (msg.bytes, fd)
    };
    let text = std::str::from_utf8(&buf[..n]).unwrap_or_default();
    let pid = text
        .strip_prefix("R ")
        .and_then(|p| p.trim().parse::<i32>().ok())
        .ok_or_else(|| format!("the sandbox's init stage ended during set-up ({text:?})"))?;
    let fd = fd.ok_or("no egress listener came back")?;
    let fd = crate::listen::adopt(fd, rustix::fs::FileType::Socket).map_err(|e| e.to_string())?;
    Ok((fd, pid))
}
