//! Process creation for supervised runs: a `vfork`-style spawn, as glibc's `posix_spawn` does
//! it (the child borrows the runner's memory from `clone` until `execve`), doing less.
//!
//! Against `std::process::Command` on glibc (measured in the runner benchmark, 2-vCPU guests):
//! glibc's child sets the disposition of all 64 signals (two system calls each, about 30 µs);
//! here `clone3` with `CLONE_CLEAR_SIGHAND` has the kernel reset the handlers, and where
//! `clone3` is missing or hidden the child reads each disposition (one call each) and resets
//! only the caught ones. The parent allocates and frees no stack per spawn (each spawning
//! thread keeps one), makes no `getrlimit` call per descriptor action, gets the pidfd from the
//! clone, and builds the environment straight into an `envp` array instead of through a
//! sorted map.
//!
//! This is the runner's only `unsafe` code. The child runs on its own stack in memory it shares
//! with the runner, while the spawning thread is suspended (`CLONE_VFORK`). Between `clone` and
//! `execve` it keeps these rules:
//! - it reads only the [`Plan`] the parent built before the clone, and writes only
//!   [`Plan::error`] and [`Plan::stage`] (atomics);
//! - it calls only async-signal-safe system calls (no allocation, no lock, no panic path);
//! - no runner signal handler can run in it: `clone3` clears them all at once; with `clone`,
//!   every signal is blocked from before the clone until the last step before `execve`, by
//!   when the child has reset every caught signal to its default;
//! - it never returns: it ends in `execve`, or in `_exit(127)` after recording the error.
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::collections::HashSet;
use std::ffi::{c_char, c_int, c_void, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{ChildStderr, ChildStdin, ChildStdout};
use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};
use std::sync::OnceLock;

use nix::fcntl::{fcntl, FcntlArg, OFlag};

/// The child's stack: enough for its few calls (glibc's own spawn uses 32 KiB).
const STACK_SIZE: usize = 64 << 10;

thread_local! {
    /// Each spawning thread's child stack, allocated on its first spawn and kept: the thread
    /// is suspended while a child uses it, so one per thread is enough.
    static STACK: RefCell<Option<Box<[u8]>>> = const { RefCell::new(None) };
}

/// What to start.
#[derive(Debug)]
pub struct Request<'a> {
    /// argv; `argv[0]` without a `/` is looked up in the `PATH` of `env` (as `execvp` does).
    pub argv: &'a [String],
    /// The complete environment; for a name given twice, the last value counts.
    pub env: &'a [(String, String)],
    /// Working directory (a relative program path is relative to it).
    pub cwd: &'a Path,
    /// Whether stdin is a pipe (otherwise `/dev/null`).
    pub stdin: bool,
    /// Descriptors the child inherits under their own numbers (all of the runner's are
    /// close-on-exec; the child clears the flag on its own copies of these).
    pub pass: &'a [OwnedFd],
    /// Run on a new pseudo-terminal of this size (cols, rows): the child starts a session
    /// (`setsid`) with the terminal as its controlling terminal and as stdin, stdout and
    /// stderr; `stdin` is then ignored.
    pub pty: Option<(u16, u16)>,
}

/// A started child: its pid and the runner's ends of its pipes. Always in a new process group
/// of its own (the group id is its pid).
#[derive(Debug)]
pub struct Child {
    /// Its pid.
    pub pid: i32,
    /// Its pidfd, when the kernel handed one back with the clone.
    pub pidfd: Option<OwnedFd>,
    /// The write end of its stdin, when piped.
    pub stdin: Option<ChildStdin>,
    /// The read end of its stdout.
    pub stdout: ChildStdout,
    /// The read end of its stderr (for a pseudo-terminal: a pipe nothing writes to).
    pub stderr: ChildStderr,
    /// The pseudo-terminal's master (for resizing), when it runs on one; `stdin` and
    /// `stdout` are copies of it.
    pub pty: Option<OwnedFd>,
}

/// The steps of the child, for the error message when one fails.
const STAGES: [&str; 7] = [
    "setpgid",
    "dup2 of stdin, stdout or stderr",
    "inheriting a descriptor",
    "chdir to the working directory",
    "execve",
    "setrlimit",
    "setsid or TIOCSCTTY",
];

/// The address-space limit of every child (0: none), set once at start-up
/// ([`set_child_memory_limit`]): a sandbox without a cgroup bounds each process's memory this
/// way, and the runner itself, which reserves address space it never touches, must not be.
static CHILD_AS_LIMIT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Sets the `RLIMIT_AS` every child gets (bytes; 0 for none).
pub fn set_child_memory_limit(bytes: u64) {
    CHILD_AS_LIMIT.store(bytes, Ordering::Relaxed);
}

/// The process limit of every child (0: none), set once at start-up
/// ([`set_child_process_limit`]). `RLIMIT_NPROC` counts the processes and threads of the
/// sandbox's one uid, the runner's included: children get the sandbox's limit while the runner
/// keeps a higher one, so a fork bomb stops below the runner's own headroom.
static CHILD_NPROC_LIMIT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Whether every child's OOM score is raised (`oom_score_adj` 500) right after it has exec'd,
/// so that a sandbox's memory-limit kill picks what the runner started over the runner itself
/// (lowering the runner's own score would need CAP_SYS_RESOURCE on the host; the child cannot
/// write its own before `execve`, while it shares the runner's non-dumpable memory).
static CHILD_OOM_FIRST: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Sets whether children raise their OOM score ([`CHILD_OOM_FIRST`]).
pub fn set_children_oom_first(on: bool) {
    CHILD_OOM_FIRST.store(on, Ordering::Relaxed);
}

/// Sets the `RLIMIT_NPROC` every child gets (0 for none).
pub fn set_child_process_limit(n: u64) {
    CHILD_NPROC_LIMIT.store(n, Ordering::Relaxed);
}

/// Everything the child reads, built by the parent before the clone (the child allocates
/// nothing). The pointers are into the parent's `Vec`s and `CString`s, alive until the
/// spawning thread resumes, which is after the child has exec'd or exited.
#[derive(Debug)]
struct Plan {
    path: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
    cwd: *const c_char,
    /// The child's ends of stdin, stdout and stderr, each 3 or above.
    stdio: [RawFd; 3],
    pass: *const RawFd,
    pass_len: usize,
    /// `errno` of the step that failed, 0 when the child reached `execve` successfully.
    error: AtomicI32,
    /// Index into [`STAGES`] of the step that failed.
    stage: AtomicI32,
    /// Set when the kernel reset the handlers (`clone3` with `CLONE_CLEAR_SIGHAND`).
    signals_cleared: bool,
    /// `RLIMIT_AS` for the child, 0 for none.
    as_limit: u64,
    /// `RLIMIT_NPROC` for the child, 0 for none.
    nproc_limit: u64,
    /// The stdio ends are a pseudo-terminal's slave: start a session and make it the
    /// controlling terminal.
    pty: bool,
}

/// Starts `req` in a new process group. An `execve` that fails (no such file, not executable)
/// is an `Err` here, as with `Command::spawn`, and leaves no process behind.
pub fn spawn(req: &Request<'_>) -> io::Result<Child> {
    spawn_via(req, VIA.load(Ordering::Relaxed))
}

/// [`spawn`] with `clone3` tried first (unless `via` is [`CLONE`]).
fn spawn_via(req: &Request<'_>, via: u8) -> io::Result<Child> {
    let Some(program) = req.argv.first() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty argv"));
    };
    let path = cstring(resolve(program, req.env, req.cwd)?.as_os_str().as_bytes())?;
    let argv = req
        .argv
        .iter()
        .map(|arg| cstring(arg.as_bytes()))
        .collect::<io::Result<Vec<_>>>()?;
    let envp = environment(req.env)?;
    let cwd = cstring(req.cwd.as_os_str().as_bytes())?;
    let argv_ptrs = pointers(&argv);
    let envp_ptrs = pointers(&envp);

    let terminal = req
        .pty
        .map(|(cols, rows)| open_pty(cols, rows))
        .transpose()?;
    let (stdin_child, stdin_parent, stdout_parent, stdout_child, stderr_parent, stderr_child);
    match &terminal {
        Some((master, slave)) => {
            // stdin, stdout and stderr are all the slave; stderr's pipe stays empty.
            stdin_child = slave.try_clone()?;
            stdout_child = slave.try_clone()?;
            stdin_parent = Some(master.try_clone()?);
            stdout_parent = master.try_clone()?;
            let (read, write) = pipe()?;
            drop(write);
            stderr_parent = read;
            stderr_child = above_stdio(slave.try_clone()?)?;
        }
        None => {
            (stdin_child, stdin_parent) = if req.stdin {
                let (read, write) = pipe()?;
                (read, Some(write))
            } else {
                (dev_null()?, None)
            };
            (stdout_parent, stdout_child) = pipe()?;
            (stderr_parent, stderr_child) = pipe()?;
        }
    }
    let pass: Vec<RawFd> = req.pass.iter().map(AsRawFd::as_raw_fd).collect();
    let mut plan = Plan {
        path: path.as_ptr(),
        argv: argv_ptrs.as_ptr(),
        envp: envp_ptrs.as_ptr(),
        cwd: cwd.as_ptr(),
        stdio: [
            stdin_child.as_raw_fd(),
            stdout_child.as_raw_fd(),
            stderr_child.as_raw_fd(),
        ],
        pass: pass.as_ptr(),
        pass_len: pass.len(),
        error: AtomicI32::new(0),
        stage: AtomicI32::new(0),
        signals_cleared: false,
        as_limit: CHILD_AS_LIMIT.load(Ordering::Relaxed),
        nproc_limit: CHILD_NPROC_LIMIT.load(Ordering::Relaxed),
        pty: terminal.is_some(),
    };
    let (pid, pidfd) = clone_vfork(&mut plan, via)?;
    if CHILD_OOM_FIRST.load(Ordering::Relaxed) {
        // Best effort (a child that already exited has no file left).
        let _ = std::fs::write(format!("/proc/{pid}/oom_score_adj"), "500");
    }
    // The spawning thread resumed: the child has exec'd, or exited after a failed step.
    drop((stdin_child, stdout_child, stderr_child));
    let pty = terminal.map(|(master, _slave)| master);
    let error = plan.error.load(Ordering::Acquire);
    if error != 0 {
        // It has already exited (with 127); reap it so that no zombie is left.
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
        let stage = usize::try_from(plan.stage.load(Ordering::Acquire)).unwrap_or(0);
        let e = io::Error::from_raw_os_error(error);
        return Err(match STAGES.get(stage) {
            Some(&"execve") | None => e,
            Some(step) => io::Error::new(e.kind(), format!("{step}: {e}")),
        });
    }
    Ok(Child {
        pid,
        pidfd,
        stdin: stdin_parent.map(ChildStdin::from),
        stdout: ChildStdout::from(stdout_parent),
        stderr: ChildStderr::from(stderr_parent),
        pty,
    })
}

/// A new pseudo-terminal of `cols` × `rows`: its master and slave, both close-on-exec and
/// above the standard descriptors (rustix's safe `openpt`/`grantpt`/`unlockpt`/`ptsname`).
fn open_pty(cols: u16, rows: u16) -> io::Result<(OwnedFd, OwnedFd)> {
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let name = ptsname(&master, Vec::new())?;
    let slave = rustix::fs::open(
        name.as_c_str(),
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NOCTTY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    set_pty_size(&master, cols, rows)?;
    Ok((above_stdio(master)?, above_stdio(slave)?))
}

/// Sets a pseudo-terminal's size (`TIOCSWINSZ`; the kernel sends `SIGWINCH` to its
/// foreground process group when the size changes).
pub fn set_pty_size(master: &OwnedFd, cols: u16, rows: u16) -> io::Result<()> {
    let size = rustix::termios::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    Ok(rustix::termios::tcsetwinsize(master, size)?)
}

/// The file `execve` gets: `program` itself when it has a `/`, else the first executable
/// regular file named `program` in the `PATH` of `env` (glibc's default path without one).
fn resolve(program: &str, env: &[(String, String)], cwd: &Path) -> io::Result<PathBuf> {
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    if program.is_empty() {
        return Err(io::Error::from(io::ErrorKind::NotFound));
    }
    let search = env
        .iter()
        .rev()
        .find(|(name, _)| name == "PATH")
        .map_or("/bin:/usr/bin", |(_, value)| value.as_str());
    let mut denied = false;
    for dir in search.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = cwd.join(dir).join(program);
        match std::fs::metadata(&candidate) {
            Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o111 != 0 => {
                return Ok(candidate)
            }
            Ok(_) => denied = true,
            Err(_) => {}
        }
    }
    Err(io::Error::from(if denied {
        io::ErrorKind::PermissionDenied
    } else {
        io::ErrorKind::NotFound
    }))
}

/// `NAME=value` strings, the last value of a name given twice (as `Command::envs` keeps it).
fn environment(env: &[(String, String)]) -> io::Result<Vec<CString>> {
    let mut seen = HashSet::with_capacity(env.len());
    let mut out = Vec::with_capacity(env.len());
    for (name, value) in env.iter().rev() {
        if !seen.insert(name.as_str()) {
            continue;
        }
        let mut entry = Vec::with_capacity(name.len() + value.len() + 2);
        entry.extend_from_slice(name.as_bytes());
        entry.push(b'=');
        entry.extend_from_slice(value.as_bytes());
        out.push(cstring_vec(entry)?);
    }
    out.reverse();
    Ok(out)
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    cstring_vec(bytes.to_vec())
}

fn cstring_vec(bytes: Vec<u8>) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "nul byte found in an argument, environment entry or path",
        )
    })
}

/// A null-terminated array of pointers into `strings`.
fn pointers(strings: &[CString]) -> Vec<*const c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// A close-on-exec pipe (read end, write end), both 3 or above (see [`above_stdio`]).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    Ok((above_stdio(read)?, above_stdio(write)?))
}

/// `fd`, or a close-on-exec copy numbered 3 or above when it is 0, 1 or 2 (a runner started
/// with its stdio closed): the child moves its ends onto 0, 1 and 2, and `dup2` onto itself
/// would keep the close-on-exec flag (and could overwrite another end).
fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    let copy = fcntl(&fd, FcntlArg::F_DUPFD_CLOEXEC(3))?;
    // The copy is a new descriptor of ours, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(copy) })
}

/// A new descriptor of `/dev/null` for a child's stdin (one opened once, duplicated).
fn dev_null() -> io::Result<OwnedFd> {
    static DEV_NULL: OnceLock<OwnedFd> = OnceLock::new();
    if DEV_NULL.get().is_none() {
        let fd = std::fs::File::open("/dev/null")?;
        let _ = DEV_NULL.set(above_stdio(OwnedFd::from(fd))?);
    }
    match DEV_NULL.get() {
        Some(fd) => above_stdio(fd.try_clone()?),
        None => Err(io::Error::other("/dev/null")),
    }
}

/// How children are cloned on this kernel: [`UNKNOWN`] until the first spawn tried `clone3`.
static VIA: AtomicU8 = AtomicU8::new(UNKNOWN);
const UNKNOWN: u8 = 0;
/// `clone3` with `CLONE_CLEAR_SIGHAND` (Linux 5.5): the kernel resets every handler in the
/// child, which then needs no signal work but SIGPIPE; and `CLONE_PIDFD` hands the pidfd back.
const CLONE3: u8 = 1;
/// `clone` (older kernels, and seccomp profiles that hide `clone3`, as Docker's default does):
/// the child reads every signal's disposition and resets the caught ones.
const CLONE: u8 = 2;

/// `CLONE_CLEAR_SIGHAND` (not in the `libc` crate).
const CLONE_CLEAR_SIGHAND: u64 = 0x1_0000_0000;

/// The first fields of the kernel's `struct clone_args` (`CLONE_ARGS_SIZE_VER0`, Linux 5.3).
#[repr(C)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
}

/// Clones a child running [`child`] on this thread's child stack, sharing memory, and waits
/// (the kernel suspends this thread) until it has exec'd or exited. Returns its pid and, from
/// `clone3`, its pidfd.
fn clone_vfork(plan: &mut Plan, via: u8) -> io::Result<(i32, Option<OwnedFd>)> {
    STACK.with_borrow_mut(|stack| {
        let stack = stack.get_or_insert_with(|| vec![0u8; STACK_SIZE].into_boxed_slice());
        // The stack grows down from its end, which the x86-64 ABI wants 16-byte aligned.
        let base = stack.as_mut_ptr() as usize;
        let top = (base + stack.len()) & !15;
        if via != CLONE {
            plan.signals_cleared = true;
            match clone3(plan, base, top - base) {
                Ok(cloned) => {
                    VIA.store(CLONE3, Ordering::Relaxed);
                    return Ok(cloned);
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ENOSYS | libc::EINVAL | libc::EPERM)
                    ) =>
                {
                    tracing::info!(error = %e, "no clone3 with CLONE_CLEAR_SIGHAND here: spawning with clone");
                    VIA.store(CLONE, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        plan.signals_cleared = false;
        clone(plan, top).map(|pid| (pid, None))
    })
}

/// `clone3(CLONE_VM | CLONE_VFORK | CLONE_CLEAR_SIGHAND | CLONE_PIDFD)` with the child on
/// `[base, base + size)`.
fn clone3(plan: &Plan, base: usize, size: usize) -> io::Result<(i32, Option<OwnedFd>)> {
    let mut pidfd: c_int = -1;
    let args = CloneArgs {
        flags: (libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD) as u64
            | CLONE_CLEAR_SIGHAND,
        pidfd: &mut pidfd as *mut c_int as u64,
        child_tid: 0,
        parent_tid: 0,
        exit_signal: libc::SIGCHLD as u64,
        stack: base as u64,
        stack_size: size as u64,
        tls: 0,
    };
    let ret: isize;
    // SAFETY: the system call runs with the arguments above. In the parent it returns the pid
    // (or -errno) and touches no register but rax, rcx and r11. In the child (rax 0) the
    // kernel has switched to the top of the given stack, which is the aligned end of a live
    // stack nothing else uses while this thread is suspended; the child calls `child` with
    // the plan and never comes back (`child` ends in execve or _exit; `ud2` traps otherwise).
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, r12",
            "call r13",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone3 as isize => ret,
            in("rdi") &args as *const CloneArgs,
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") plan as *const Plan,
            in("r13") child as extern "C" fn(*mut c_void) -> c_int,
            out("rcx") _,
            out("r11") _,
            options(nostack),
        );
    }
    if ret < 0 {
        return Err(io::Error::from_raw_os_error(-ret as i32));
    }
    // SAFETY: the kernel stored a new pidfd of ours here.
    let pidfd = (pidfd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(pidfd) });
    Ok((ret as i32, pidfd))
}

/// `clone(CLONE_VM | CLONE_VFORK)` through glibc, every signal blocked in this thread while it
/// runs (the child inherits the mask and unblocks once its handlers are reset).
fn clone(plan: &Plan, top: usize) -> io::Result<i32> {
    let mut all = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    let mut old = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: `all` is initialized by sigfillset before use; `old` is written by
    // pthread_sigmask before it is read. `child` only reads `plan` (alive until this
    // function returns, which is after the child exec'd or exited) and keeps the rules in
    // the module's documentation; `top` is the aligned end of a live, unshared stack.
    unsafe {
        libc::sigfillset(all.as_mut_ptr());
        libc::pthread_sigmask(libc::SIG_BLOCK, all.as_ptr(), old.as_mut_ptr());
        let pid = libc::clone(
            child,
            top as *mut c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            plan as *const Plan as *mut c_void,
        );
        let error = io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, old.as_ptr(), std::ptr::null_mut());
        if pid < 0 {
            Err(error)
        } else {
            Ok(pid)
        }
    }
}

/// The kernel's `struct sigaction` on x86-64 (what `rt_sigaction` reads and writes).
#[repr(C)]
struct KernelSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

/// Records the failed step of the child and its `errno`, and ends the child without running
/// any exit handler of the runner.
fn child_failed(plan: &Plan, stage: i32) -> ! {
    // SAFETY: reads the calling thread's errno.
    let errno = unsafe { *libc::__errno_location() };
    plan.error.store(errno.max(1), Ordering::Release);
    plan.stage.store(stage, Ordering::Release);
    // SAFETY: ends this process at once; nothing of the runner runs.
    unsafe { libc::_exit(127) }
}

/// The child, between `clone` and `execve` (see the rules in the module's documentation).
extern "C" fn child(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `Plan` the parent passed to clone, alive and unchanged while the
    // parent is suspended.
    let plan = unsafe { &*(arg as *const Plan) };
    let fail = |stage: i32| child_failed(plan, stage);
    // SAFETY: raw system calls on memory this function owns or the plan points to.
    unsafe {
        // Handlers reset first (a caught signal must not run a runner handler here once the
        // mask is cleared); SIGPIPE, which the Rust runtime ignores, goes back to its default
        // as `Command` does. Other ignored signals stay ignored across exec, as with `Command`.
        for sig in 1..=64 {
            if plan.signals_cleared && sig != libc::SIGPIPE {
                // clone3 reset every handler; only the ignored SIGPIPE is left.
                continue;
            }
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let mut old = KernelSigaction {
                handler: 0,
                flags: 0,
                restorer: 0,
                mask: 0,
            };
            let got = libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                std::ptr::null::<KernelSigaction>(),
                &mut old as *mut KernelSigaction,
                8usize,
            );
            let caught = old.handler != libc::SIG_DFL && old.handler != libc::SIG_IGN;
            if got == 0 && (caught || (sig == libc::SIGPIPE && old.handler == libc::SIG_IGN)) {
                let default = KernelSigaction {
                    handler: libc::SIG_DFL,
                    flags: 0,
                    restorer: 0,
                    mask: 0,
                };
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    &default as *const KernelSigaction,
                    std::ptr::null_mut::<KernelSigaction>(),
                    8usize,
                );
            }
        }
        if plan.pty {
            // A session of its own (also a new process group, its pid) with the terminal
            // as its controlling terminal.
            if libc::setsid() < 0 || libc::ioctl(plan.stdio[0], libc::TIOCSCTTY, 0) != 0 {
                fail(6);
            }
        } else if libc::setpgid(0, 0) != 0 {
            fail(0);
        }
        for (target, fd) in plan.stdio.iter().enumerate() {
            // Every end is 3 or above, so this clears close-on-exec on the copy.
            if libc::dup2(*fd, target as c_int) < 0 {
                fail(1);
            }
        }
        for i in 0..plan.pass_len {
            if libc::fcntl(*plan.pass.add(i), libc::F_SETFD, 0) != 0 {
                fail(2);
            }
        }
        if libc::chdir(plan.cwd) != 0 {
            fail(3);
        }
        if plan.as_limit != 0 {
            let limit = libc::rlimit {
                rlim_cur: plan.as_limit,
                rlim_max: plan.as_limit,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                fail(5);
            }
        }
        if plan.nproc_limit != 0 {
            let limit = libc::rlimit {
                rlim_cur: plan.nproc_limit,
                rlim_max: plan.nproc_limit,
            };
            if libc::setrlimit(libc::RLIMIT_NPROC, &limit) != 0 {
                fail(5);
            }
        }
        let empty: u64 = 0;
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &empty as *const u64,
            std::ptr::null_mut::<u64>(),
            8usize,
        );
        libc::execve(plan.path, plan.argv, plan.envp);
        fail(4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Both ways of cloning, where this kernel has `clone3`.
    const VIAS: [u8; 2] = [UNKNOWN, CLONE];

    fn run(argv: &[&str], env: &[(&str, &str)], stdin: bool) -> io::Result<(Child, String)> {
        let mut last = None;
        for via in VIAS {
            last = Some(run_via(via, argv, env, stdin)?);
        }
        Ok(last.expect("ran"))
    }

    fn run_via(
        via: u8,
        argv: &[&str],
        env: &[(&str, &str)],
        stdin: bool,
    ) -> io::Result<(Child, String)> {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let cwd = std::env::temp_dir();
        let mut child = spawn_via(
            &Request {
                argv: &argv,
                env: &env,
                cwd: &cwd,
                stdin,
                pass: &[],
                pty: None,
            },
            via,
        )?;
        if via == UNKNOWN && VIA.load(Ordering::Relaxed) == CLONE3 {
            assert!(child.pidfd.is_some(), "clone3 hands back a pidfd");
        }
        drop(child.stdin.take());
        let mut out = String::new();
        child.stdout.read_to_string(&mut out)?;
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(child.pid), None);
        Ok((child, out))
    }

    #[test]
    fn runs_in_its_own_group_with_the_given_environment_and_directory() {
        let (child, out) = run(
            &[
                "sh",
                "-c",
                "echo $$ $(cut -d' ' -f5 /proc/$$/stat) \"$A\" \"$B\" \"$(pwd)\"; cat",
            ],
            &[
                ("PATH", "/usr/bin:/bin"),
                ("A", "1"),
                ("B", "x"),
                ("A", "2"),
            ],
            true,
        )
        .expect("spawn");
        let fields: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(fields[0], child.pid.to_string(), "{out}");
        assert_eq!(fields[1], child.pid.to_string(), "own group: {out}");
        assert_eq!(fields[2], "2", "the last value of a name counts: {out}");
        assert_eq!(fields[3], "x");
        let cwd = std::env::temp_dir().canonicalize().expect("tmp");
        assert_eq!(Path::new(fields[4]).canonicalize().ok(), Some(cwd));
    }

    #[test]
    fn signals_are_at_their_defaults_and_unblocked_in_the_child() {
        // The runner (this test binary too) ignores SIGPIPE; the child must not.
        let (_, out) = run(
            &["cat", "/proc/self/status"],
            &[("PATH", "/usr/bin:/bin")],
            false,
        )
        .expect("spawn");
        let masks: Vec<&str> = out
            .lines()
            .filter(|line| {
                ["SigBlk", "SigIgn", "SigCgt"]
                    .iter()
                    .any(|k| line.starts_with(k))
            })
            .collect();
        for line in &masks {
            let mask = line.split_whitespace().nth(1).unwrap_or("?");
            let bits = u64::from_str_radix(mask, 16).expect("hex mask");
            // Nothing blocked, SIGPIPE not ignored. (Caught signals are reset by execve
            // itself; the reset in the child only closes the window before it.)
            if line.starts_with("SigIgn") {
                assert_eq!(
                    bits & (1 << (libc::SIGPIPE - 1)),
                    0,
                    "SIGPIPE ignored: {out}"
                );
            } else {
                assert_eq!(bits, 0, "{line}");
            }
        }
        assert_eq!(masks.len(), 3, "{out}");
    }

    #[test]
    fn a_missing_program_is_an_error_and_leaves_no_child() {
        let missing = run(&["/nonexistent/agent"], &[], false).expect_err("missing");
        assert_eq!(missing.kind(), io::ErrorKind::NotFound, "{missing}");
        let unknown =
            run(&["no-such-agent-anywhere"], &[("PATH", "/bin")], false).expect_err("not on PATH");
        assert_eq!(unknown.kind(), io::ErrorKind::NotFound, "{unknown}");
        let dir = run(&["/tmp"], &[], false).expect_err("a directory");
        assert_eq!(dir.kind(), io::ErrorKind::PermissionDenied, "{dir}");
    }

    #[test]
    fn a_nul_byte_is_refused_before_anything_starts() {
        let err = run(&["/bin/true", "a\0b"], &[], false).expect_err("nul");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
