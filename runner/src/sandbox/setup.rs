//! The two stages inside: `sandbox-init` (enters the user namespace, then the others, brings
//! loopback up, binds the egress listener) and `sandbox-pid1` (builds the root, drops to an
//! unprivileged uid in a nested user namespace and becomes the runner).

use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

use super::{Fds, Spec, EGRESS_PORT, RUNNER_PIDS_RESERVE, SANDBOX_UID};
use crate::listen::adopt;

fn step<T, E: std::fmt::Display>(what: &str, r: Result<T, E>) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

/// The init stage: `sandbox-init FDS LAUNCHER_PID ENFORCEMENT`.
pub(super) fn init_main(args: &[String]) -> Result<ExitCode, String> {
    let [fds, launcher, enforcement] = args else {
        return Err("usage: sandbox-init FDS LAUNCHER_PID ENFORCEMENT".into());
    };
    let fds = Fds::parse(fds)?;
    let launcher: i32 = launcher.parse().map_err(|_| "bad launcher pid")?;
    let control = step(
        "control socket",
        adopt(fds.control, rustix::fs::FileType::Socket),
    )?;
    let mut control = UnixStream::from(control);

    step(
        "unshare(CLONE_NEWUSER) — unprivileged user namespaces are refused here",
        unshare(CloneFlags::CLONE_NEWUSER),
    )?;
    step("setgroups", std::fs::write("/proc/self/setgroups", "deny"))?;
    step("control", control.write_all(b"U"))?;
    let mut got = [0u8; 1];
    step("control", control.read_exact(&mut got))?;
    if got[0] != b'M' {
        return Err("the launcher did not write the maps".into());
    }
    // Become the namespace's root (the sandbox's host uid): until now this process kept the
    // uid it was started with, which the map may not name.
    let root = (nix::unistd::Uid::from_raw(0), nix::unistd::Gid::from_raw(0));
    step("setresgid", nix::unistd::setresgid(root.1, root.1, root.1))?;
    step("setresuid", nix::unistd::setresuid(root.0, root.0, root.0))?;
    let mut flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWNET
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWPID;
    if enforcement != "rlimits" {
        flags |= CloneFlags::CLONE_NEWCGROUP;
    }
    step(
        "unshare(mount, network, pid, ipc, uts namespaces)",
        unshare(flags),
    )?;
    step("bringing loopback up", loopback_up())?;
    let egress = step(
        "binding the egress proxy's port",
        std::net::TcpListener::bind(("127.0.0.1", EGRESS_PORT)),
    )?;
    // Cleared by the credential change of the unshare above, so set after it.
    step("prctl", nix::sys::prctl::set_pdeathsig(Signal::SIGKILL))?;
    if nix::unistd::getppid().as_raw() != launcher {
        return Err("the launcher is gone".into());
    }
    let mut stops = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        stops.add(s);
    }
    step("sigmask", stops.thread_block())?;
    // The first child in the new pid namespace is its pid 1.
    let mut pid1 = step(
        "starting the sandbox's pid 1",
        Command::new("/proc/self/exe")
            .args(["sandbox-pid1", &args[0]])
            .spawn(),
    )?;
    let message = format!("R {}\n", pid1.id());
    let sent = sendmsg::<()>(
        control.as_raw_fd(),
        &[IoSlice::new(message.as_bytes())],
        &[ControlMessage::ScmRights(&[egress.as_raw_fd()])],
        MsgFlags::empty(),
        None,
    );
    if let Err(e) = sent {
        let _ = pid1.kill();
        return Err(format!("control: {e}"));
    }
    drop(egress);
    let status = step("wait", pid1.wait())?;
    Ok(
        match (
            status.code(),
            std::os::unix::process::ExitStatusExt::signal(&status),
        ) {
            (Some(c), _) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
            (None, Some(sig)) => ExitCode::from(u8::try_from(128 + sig).unwrap_or(1)),
            _ => ExitCode::from(1),
        },
    )
}

/// `ip link set lo up` through rtnetlink (loopback is interface 1 in every network namespace).
fn loopback_up() -> Result<(), String> {
    use nix::sys::socket::{
        recv, sendto, socket, AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType,
    };
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )
    .map_err(|e| e.to_string())?;
    let mut msg = Vec::with_capacity(32);
    msg.extend_from_slice(&32u32.to_ne_bytes()); // nlmsg_len
    msg.extend_from_slice(&16u16.to_ne_bytes()); // RTM_NEWLINK
    msg.extend_from_slice(&(1u16 | 4).to_ne_bytes()); // NLM_F_REQUEST | NLM_F_ACK
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid
    msg.extend_from_slice(&[0, 0]); // ifi_family AF_UNSPEC, pad
    msg.extend_from_slice(&0u16.to_ne_bytes()); // ifi_type
    msg.extend_from_slice(&1i32.to_ne_bytes()); // ifi_index: lo
    msg.extend_from_slice(&1u32.to_ne_bytes()); // ifi_flags: IFF_UP
    msg.extend_from_slice(&1u32.to_ne_bytes()); // ifi_change: IFF_UP
    sendto(
        fd.as_raw_fd(),
        &msg,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 256];
    let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(|e| e.to_string())?;
    // NLMSG_ERROR (2) carrying error 0 is the acknowledgement.
    if n >= 20 && u16::from_ne_bytes([buf[4], buf[5]]) == 2 {
        let errno = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
        if errno != 0 {
            return Err(std::io::Error::from_raw_os_error(-errno).to_string());
        }
        return Ok(());
    }
    Err("no acknowledgement from the kernel".into())
}

/// Host directories every sandbox sees, read-only, where they exist.
const SYSTEM_PATHS: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc",
];
/// Files under /etc covered by an empty file, and directories by an empty directory.
const HIDDEN_FILES: &[&str] = &[
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/sudoers",
    "/etc/security/opasswd",
];
const HIDDEN_DIRS: &[&str] = &["/etc/ssl/private", "/etc/ssh", "/etc/sudoers.d"];
/// Device nodes bound from the host.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];
/// Default size of a sandbox's `/tmp`.
const DEFAULT_TMP: u64 = 512 << 20;

/// The pid 1 stage: `sandbox-pid1 FDS`.
pub(super) fn pid1_main(args: &[String]) -> Result<ExitCode, String> {
    let [fds] = args else {
        return Err("usage: sandbox-pid1 FDS".into());
    };
    let fds = Fds::parse(fds)?;
    // The init stage blocks stop signals while it waits; the runner must get them.
    step("sigmask", SigSet::all().thread_unblock())?;
    let spec_fd = step("spec", adopt(fds.spec, rustix::fs::FileType::RegularFile))?;
    let mut text = String::new();
    let mut file = std::fs::File::from(spec_fd);
    step("spec", std::io::Seek::rewind(&mut file))?;
    step("spec", file.read_to_string(&mut text))?;
    let spec: Spec = step("spec", serde_json::from_str(&text))?;
    let detached = |fd: i32, kind| -> Result<Option<OwnedFd>, String> {
        if fd < 0 {
            return Ok(None);
        }
        step("detached mount", adopt(fd, kind)).map(Some)
    };
    let workspace = detached(fds.workspace, rustix::fs::FileType::Directory)?;
    let runner = detached(fds.runner, rustix::fs::FileType::RegularFile)?;
    let workspace = Source::new(workspace, &spec.workspace)?;
    let runner = Source::new(runner, &spec.runner_path)?;
    let cgroup = match &spec.cgroup_dir {
        Some(dir) => Some(Source::new(None, dir)?),
        None => None,
    };
    build_root(&spec, &workspace, &runner, cgroup.as_ref())?;
    drop((workspace, runner, cgroup));
    step("sethostname", nix::unistd::sethostname(&spec.name))?;

    // A nested user namespace whose only uid is the agent's: from here on nothing in the
    // sandbox holds a capability, in it or above it.
    step(
        "unshare(CLONE_NEWUSER), nested",
        unshare(CloneFlags::CLONE_NEWUSER),
    )?;
    step("setgroups", std::fs::write("/proc/self/setgroups", "deny"))?;
    step(
        "uid_map",
        std::fs::write("/proc/self/uid_map", format!("{SANDBOX_UID} 0 1\n")),
    )?;
    step(
        "gid_map",
        std::fs::write("/proc/self/gid_map", format!("{SANDBOX_UID} 0 1\n")),
    )?;
    step("rlimit", setrlimit(Resource::RLIMIT_CORE, 0, 0))?;
    // Counted per user namespace and uid: the sandbox's own processes and threads only. The
    // runner's is higher than its children's (see RUNNER_PIDS_RESERVE); the cgroup, where
    // there is one, holds the same total.
    if let Some(p) = spec.limits.pids {
        let runner = p + RUNNER_PIDS_RESERVE;
        step(
            "RLIMIT_NPROC",
            setrlimit(Resource::RLIMIT_NPROC, runner, runner),
        )?;
    }
    step("no_new_privs", nix::sys::prctl::set_no_new_privs())?;
    step("prctl", nix::sys::prctl::set_pdeathsig(Signal::SIGKILL))?;
    if spec.probe {
        return Ok(ExitCode::SUCCESS);
    }
    let mut argv: Vec<String> = vec![
        "--listen".into(),
        format!("fd:{}", fds.listen),
        "--token-fd".into(),
        fds.token.to_string(),
        "--workspace".into(),
        "/workspace".into(),
    ];
    if let Some(p) = spec.limits.pids {
        argv.push("--child-process-limit".into());
        argv.push(p.to_string());
    }
    if let (true, Some(m)) = (fds.cgroup < 0, spec.limits.memory_bytes) {
        // Without a cgroup, each process the runner starts gets the memory limit as its
        // address-space limit (the runner's own reservations stay outside it).
        argv.push("--child-memory-limit".into());
        argv.push(m.to_string());
    }
    if fds.cgroup >= 0 {
        argv.push("--children-oom-first".into());
        let events = ["memory.events", "memory.oom_control"]
            .iter()
            .map(|f| Path::new("/run/agentbox/cgroup").join(f))
            .find(|p| p.exists());
        if let Some(events) = events {
            argv.push("--oom-events".into());
            argv.push(events.to_string_lossy().into_owned());
        }
    }
    argv.extend(spec.runner_args.iter().cloned());
    let error = Command::new("/run/agentbox/runner")
        .arg0("agentbox-runner")
        .args(&argv)
        .env_clear()
        .envs(&spec.env)
        .current_dir("/workspace")
        .exec();
    Err(format!("cannot start the runner: {error}"))
}

fn mkdirs(path: &Path) -> Result<(), String> {
    step(
        &format!("mkdir {}", path.display()),
        std::fs::create_dir_all(path),
    )
}

fn touch(path: &Path) -> Result<(), String> {
    if std::fs::symlink_metadata(path).is_ok() {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        mkdirs(parent)?;
    }
    step(
        &format!("create {}", path.display()),
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path),
    )?;
    Ok(())
}

fn mount_fs(fstype: &str, target: &Path, flags: MsFlags, data: &str) -> Result<(), String> {
    step(
        &format!("mount {fstype} on {}", target.display()),
        mount(Some(fstype), target, Some(fstype), flags, Some(data)),
    )
}

/// The mount flags the kernel keeps locked on a bind of `path` (a remount must repeat them).
fn locked_flags(path: &Path) -> MsFlags {
    let mut flags = MsFlags::empty();
    if let Ok(st) = rustix::fs::statvfs(path) {
        use rustix::fs::StatVfsMountFlags as F;
        for (from, to) in [
            (F::NOSUID, MsFlags::MS_NOSUID),
            (F::NODEV, MsFlags::MS_NODEV),
            (F::NOEXEC, MsFlags::MS_NOEXEC),
            (F::NOATIME, MsFlags::MS_NOATIME),
            (F::NODIRATIME, MsFlags::MS_NODIRATIME),
            (F::RELATIME, MsFlags::MS_RELATIME),
        ] {
            if st.f_flag.contains(from) {
                flags |= to;
            }
        }
    }
    flags
}

/// Binds `source` at `target` (created as a file or directory like the source) with `extra`
/// flags added on the remount (read-only, nosuid, ...).
fn bind(source: &Path, target: &Path, extra: MsFlags) -> Result<(), String> {
    let meta = step(
        &format!("stat {}", source.display()),
        std::fs::metadata(source),
    )?;
    if meta.is_dir() {
        mkdirs(target)?;
    } else {
        touch(target)?;
    }
    step(
        &format!("bind {} on {}", source.display(), target.display()),
        mount(
            Some(source),
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        ),
    )?;
    let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | extra | locked_flags(target);
    step(
        &format!("remount {}", target.display()),
        mount(None::<&str>, target, None::<&str>, flags, None::<&str>),
    )
}

/// Where a mount comes from: a detached mount (`open_tree` by a root launcher) or a path
/// opened before the host's `/tmp` is covered (bound through `/proc/self/fd`, in this mount
/// namespace).
enum Source {
    Detached(OwnedFd),
    Opened(OwnedFd),
}

impl Source {
    fn new(detached: Option<OwnedFd>, path: &Path) -> Result<Self, String> {
        if let Some(fd) = detached {
            return Ok(Source::Detached(fd));
        }
        let fd = step(
            &format!("open {}", path.display()),
            rustix::fs::open(
                path,
                rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            ),
        )?;
        Ok(Source::Opened(fd))
    }

    fn fd_path(&self) -> PathBuf {
        let (Source::Detached(fd) | Source::Opened(fd)) = self;
        PathBuf::from(format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd()))
    }

    /// Mounts it at `target` with `extra` flags on the remount.
    fn attach(&self, target: &Path, extra: MsFlags) -> Result<(), String> {
        match self {
            Source::Opened(_) => bind(&self.fd_path(), target, extra),
            Source::Detached(fd) => {
                if std::fs::metadata(self.fd_path()).is_ok_and(|m| m.is_dir()) {
                    mkdirs(target)?;
                } else {
                    touch(target)?;
                }
                step(
                    &format!("attach on {}", target.display()),
                    rustix::mount::move_mount(
                        fd,
                        "",
                        rustix::fs::CWD,
                        target,
                        rustix::mount::MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
                    ),
                )?;
                let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | extra | locked_flags(target);
                step(
                    &format!("remount {}", target.display()),
                    mount(None::<&str>, target, None::<&str>, flags, None::<&str>),
                )
            }
        }
    }
}

fn read_only() -> MsFlags {
    MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV
}

/// Builds the sandbox's root on a tmpfs and pivots into it.
fn build_root(
    spec: &Spec,
    workspace: &Source,
    runner: &Source,
    cgroup: Option<&Source>,
) -> Result<(), String> {
    step(
        "making mounts private",
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        ),
    )?;
    // The template's paths, opened now: the host's /tmp is covered from here on, and they are
    // bound last, over the sandbox's own /tmp and /run when they are under them.
    let extra: Vec<(PathBuf, Source)> = spec
        .read_only_paths
        .iter()
        .filter(|p| p.exists())
        .map(|p| Source::new(None, p).map(|s| (p.clone(), s)))
        .collect::<Result<_, _>>()?;
    let credentials = match &spec.credentials {
        Some(dir) => Some(Source::new(None, dir)?),
        None => None,
    };
    let base = Path::new("/tmp");
    mount_fs(
        "tmpfs",
        base,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        "mode=0755,size=4m",
    )?;
    let root = base.join("root");
    let generated = base.join("generated");
    mkdirs(&root)?;
    mkdirs(&generated)?;
    step(
        "bind the new root",
        mount(
            Some(&root),
            &root,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        ),
    )?;
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));

    let paths: Vec<PathBuf> = SYSTEM_PATHS.iter().map(PathBuf::from).collect();
    for path in &paths {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = step("readlink", std::fs::read_link(path))?;
                let at = inside(path);
                if let Some(parent) = at.parent() {
                    mkdirs(parent)?;
                }
                if std::fs::symlink_metadata(&at).is_err() {
                    step("symlink", std::os::unix::fs::symlink(&target, &at))?;
                }
            }
            Ok(_) => bind(path, &inside(path), read_only())?,
            Err(_) => {}
        }
    }
    // Secrets under /etc: covered.
    let empty_file = generated.join("empty");
    let empty_dir = generated.join("empty.d");
    touch(&empty_file)?;
    mkdirs(&empty_dir)?;
    for f in HIDDEN_FILES {
        if inside(Path::new(f)).is_file() {
            bind(&empty_file, &inside(Path::new(f)), read_only())?;
        }
    }
    for d in HIDDEN_DIRS {
        if inside(Path::new(d)).is_dir() {
            bind(&empty_dir, &inside(Path::new(d)), read_only())?;
        }
    }
    // Who the agent is, and the sandbox's own name.
    let files = [
        ("passwd", format!("root:x:0:0:root:/root:/usr/sbin/nologin\nagent:x:{SANDBOX_UID}:{SANDBOX_UID}:agentbox sandbox:/workspace:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")),
        ("group", format!("root:x:0:\nagent:x:{SANDBOX_UID}:\nnogroup:x:65534:\n")),
        ("hosts", format!("127.0.0.1\tlocalhost {0}\n::1\tlocalhost ip6-localhost {0}\n", spec.name)),
        ("hostname", format!("{}\n", spec.name)),
    ];
    for (name, content) in files {
        let source = generated.join(name);
        step("generated file", std::fs::write(&source, content))?;
        let target = inside(&Path::new("/etc").join(name));
        if target.is_file() {
            bind(&source, &target, read_only())?;
        }
    }

    // /dev: a few host devices, a private devpts, shm.
    let dev = inside(Path::new("/dev"));
    mkdirs(&dev)?;
    mount_fs(
        "tmpfs",
        &dev,
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        "mode=0755,size=64k",
    )?;
    for d in DEVICES {
        let host = Path::new("/dev").join(d);
        if host.exists() {
            bind(&host, &dev.join(d), MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC)?;
        }
    }
    mkdirs(&dev.join("pts"))?;
    mount_fs(
        "devpts",
        &dev.join("pts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=620",
    )?;
    step(
        "symlink",
        std::os::unix::fs::symlink("pts/ptmx", dev.join("ptmx")),
    )?;
    mkdirs(&dev.join("shm"))?;
    mount_fs(
        "tmpfs",
        &dev.join("shm"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        "mode=1777,size=64m",
    )?;
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        step(
            "symlink",
            std::os::unix::fs::symlink(target, dev.join(name)),
        )?;
    }

    let proc_dir = inside(Path::new("/proc"));
    mkdirs(&proc_dir)?;
    mount_fs(
        "proc",
        &proc_dir,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        "",
    )
    .map_err(|e| format!("{e} (a /proc for the sandbox's pid namespace)"))?;

    let tmp = inside(Path::new("/tmp"));
    mkdirs(&tmp)?;
    let tmp_size = spec.limits.tmp_bytes.unwrap_or(DEFAULT_TMP);
    mount_fs(
        "tmpfs",
        &tmp,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        &format!("mode=1777,size={tmp_size}"),
    )?;

    workspace.attach(
        &inside(Path::new("/workspace")),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
    )?;

    let run = inside(Path::new("/run"));
    mkdirs(&run)?;
    mount_fs(
        "tmpfs",
        &run,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        "mode=0755,size=1m",
    )?;
    runner.attach(
        &run.join("agentbox/runner"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
    )?;
    if let Some(cg) = cgroup {
        cg.attach(
            &run.join("agentbox/cgroup"),
            read_only() | MsFlags::MS_NOEXEC,
        )?;
    }
    if let Some(source) = &credentials {
        // The directory itself (never replaced by the control plane), so files renamed into
        // it on the host are seen here at once.
        source.attach(&run.join("credentials"), read_only() | MsFlags::MS_NOEXEC)?;
    }
    for (path, source) in &extra {
        source.attach(&inside(path), read_only())?;
    }
    // Nothing else comes in: /run, /tmp and /dev are the sandbox's own from here.
    step(
        "remount /run read-only",
        mount(
            None::<&str>,
            &run,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755,size=1m"),
        ),
    )?;

    step("chdir", std::env::set_current_dir(&root))?;
    step("pivot_root", nix::unistd::pivot_root(".", "."))?;
    step(
        "detaching the host's root",
        umount2(".", MntFlags::MNT_DETACH),
    )?;
    step("chdir", std::env::set_current_dir("/"))?;
    step(
        "remount / read-only",
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_BIND
                | MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV,
            None::<&str>,
        ),
    )?;
    Ok(())
}
