//! Child supervision: spawning in a process group, reaping every child (the runner is a child
//! subreaper, and PID 1 in most sandboxes), pumping output into the event log, and stopping a
//! whole process tree with SIGTERM, a grace period, then SIGKILL.
//!
//! One [`Reaper`] owns every `waitpid`: children are spawned under its lock and registered
//! before it can reap them, so exit statuses are never stolen and orphans never pile up.
//! Each supervised process gets a dedicated thread ([`run`]) that spawns it (fork/exec is
//! blocking), polls its stdout and stderr, frames lines and appends them to the journal.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::process::{ChildStderr, ChildStdin, ChildStdout};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use agentbox_proto::{ExitReason, Stream};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags};
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::watch;

use crate::journal::EventLog;
use crate::proctree;

/// The poll index of the [`SideReader`].
const SIDE: usize = 2;
/// The poll index of the process's pidfd.
const EXITED: usize = 3;

/// Size of a pump's read buffer for a bulk stream: it grows to this after a read that filled
/// the buffer.
const READ_BUF_SIZE: usize = 256 << 10;
/// Size of a pump's read buffer at first, and kept between invokes: a process that writes a
/// line now and then never needs more, and a pump thread per running process would otherwise
/// hold (and have touched) 256 KiB each (1,000 running invokes: 250 MB).
const READ_BUF_START: usize = 16 << 10;

thread_local! {
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Longest fragment sent without a newline.
pub const MAX_FRAGMENT: usize = 64 << 10;
/// A fragment without a newline is sent after this long without more output.
const IDLE_FLUSH: Duration = Duration::from_millis(25);
/// After the main process exits, how long descendants may keep its output pipes open.
const DRAIN: Duration = Duration::from_millis(500);
/// How long to keep reading after the leftover tree was killed.
const DRAIN_AFTER_KILL: Duration = Duration::from_secs(2);

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code, or `128 + signal`.
    pub code: i32,
    /// The signal that ended it.
    pub signal: Option<i32>,
}

/// Owns every `waitpid` of the runner.
#[derive(Debug, Default)]
pub struct Reaper {
    waiting: Mutex<HashMap<i32, mpsc::Sender<ExitStatus>>>,
}

impl Reaper {
    /// A reaper; call [`Reaper::start`] inside the runtime.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<i32, mpsc::Sender<ExitStatus>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the runner a child subreaper and starts reaping orphans (descendants that were
    /// re-parented to it), every [`ORPHAN_REAP`].
    ///
    /// A supervised child's exit is learned from its pidfd (see [`Exit`]), so SIGCHLD is left
    /// at its default (discarded, nothing woken): a handler would wake a runner thread and the
    /// runtime for every exit, on the path of the invoke that just ended (measured ~50 µs per
    /// invoke here). On kernels without pidfds (before 5.3) it reaps on every SIGCHLD instead.
    pub fn start(self: &Arc<Self>) -> std::io::Result<()> {
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            tracing::warn!(error = %e, "cannot become a child subreaper; escaped descendants will be reaped by init");
        }
        let mut sigchld = if pidfd_open(std::process::id() as i32).is_some() {
            None
        } else {
            tracing::info!("no pidfds on this kernel: reaping on SIGCHLD");
            Some(tokio::signal::unix::signal(
                tokio::signal::unix::SignalKind::child(),
            )?)
        };
        let reaper = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(ORPHAN_REAP);
            loop {
                match &mut sigchld {
                    Some(sigchld) => {
                        tokio::select! {
                            _ = sigchld.recv() => {}
                            _ = tick.tick() => {}
                        }
                    }
                    None => {
                        tick.tick().await;
                    }
                }
                reaper.reap();
            }
        });
        Ok(())
    }

    /// Spawns `request` (see [`crate::spawn`]) and registers it before any reap can see it.
    fn spawn_run(
        &self,
        request: &crate::spawn::Request<'_>,
    ) -> std::io::Result<(crate::spawn::Child, Exit)> {
        let mut waiting = self.lock();
        let mut child = crate::spawn::spawn(request)?;
        let (tx, rx) = mpsc::channel();
        waiting.insert(child.pid, tx);
        // From the clone, or opened under the lock: the child cannot have been reaped (and its
        // pid reused) yet.
        let pidfd = child.pidfd.take().or_else(|| pidfd_open(child.pid));
        Ok((child, Exit { rx, pidfd }))
    }

    /// Reaps every exited child: registered ones get their status, orphans are just reaped.
    pub fn reap(&self) {
        let mut waiting = self.lock();
        loop {
            let (pid, status) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, ExitStatus { code, signal: None }),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (
                    pid,
                    ExitStatus {
                        code: 128 + sig as i32,
                        signal: Some(sig as i32),
                    },
                ),
                Ok(WaitStatus::StillAlive) => break,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(_) => break,
            };
            match waiting.remove(&pid.as_raw()) {
                Some(tx) => {
                    let _ = tx.send(status);
                }
                None => tracing::debug!(pid = pid.as_raw(), "reaped an orphan"),
            }
        }
    }
}

/// How often orphans are reaped (and supervised children, where no pidfd tells their exit).
const ORPHAN_REAP: Duration = Duration::from_millis(500);

/// A pidfd for `pid` (readable once the process has exited), or None where the kernel has none.
fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    let pid = rustix::process::Pid::from_raw(pid)?;
    rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
}

/// What [`Exit::wait`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    /// The child exited.
    Exited(ExitStatus),
    /// Still running when the wait ended.
    Running,
    /// It can no longer be waited for (reaped elsewhere).
    Lost,
}

/// The exit of a child spawned through the [`Reaper`]: its status comes from the reaper; its
/// pidfd becomes readable when it exits, so a waiter reaps right then.
#[derive(Debug)]
pub struct Exit {
    rx: mpsc::Receiver<ExitStatus>,
    pidfd: Option<OwnedFd>,
}

impl Exit {
    /// The status, if the child has exited (reaping it if need be).
    pub fn try_now(&self, reaper: &Reaper) -> Option<ExitStatus> {
        match self.collect(reaper) {
            Waited::Exited(status) => Some(status),
            Waited::Running | Waited::Lost => None,
        }
    }

    /// What the reaper has delivered for this child, if anything.
    fn received(&self) -> Option<Waited> {
        match self.rx.try_recv() {
            Ok(status) => Some(Waited::Exited(status)),
            Err(mpsc::TryRecvError::Disconnected) => Some(Waited::Lost),
            Err(mpsc::TryRecvError::Empty) => None,
        }
    }

    /// What the reaper has for this child, reaping first if it had nothing yet.
    fn collect(&self, reaper: &Reaper) -> Waited {
        if let Some(waited) = self.received() {
            return waited;
        }
        reaper.reap();
        self.received().unwrap_or(Waited::Running)
    }

    /// Waits up to `timeout` for the exit.
    pub fn wait(&self, reaper: &Reaper, timeout: Duration) -> Waited {
        let Some(pidfd) = &self.pidfd else {
            return match self.rx.recv_timeout(timeout) {
                Ok(status) => Waited::Exited(status),
                Err(mpsc::RecvTimeoutError::Timeout) => Waited::Running,
                Err(mpsc::RecvTimeoutError::Disconnected) => Waited::Lost,
            };
        };
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, ms) {
            Ok(n) if n > 0 => self.collect(reaper),
            _ => self.received().unwrap_or(Waited::Running),
        }
    }

    /// Waits as long as it takes; None when the child can no longer be waited for.
    pub fn wait_forever(&self, reaper: &Reaper) -> Option<ExitStatus> {
        loop {
            match self.wait(reaper, Duration::from_secs(60)) {
                Waited::Exited(status) => return Some(status),
                Waited::Running => {}
                Waited::Lost => return None,
            }
        }
    }

    /// The pidfd, where the kernel has them.
    pub fn pidfd(&self) -> Option<BorrowedFd<'_>> {
        self.pidfd.as_ref().map(|fd| fd.as_fd())
    }
}

/// A pipe the pump reads besides stdout and stderr (the agent channel's events): read in
/// the same poll loop, so its data is handled before the run's outcome is returned, and kept
/// open as long as the output pipes are (the same drain and kill rules apply).
pub trait SideReader: Send {
    /// The read end.
    fn fd(&self) -> BorrowedFd<'_>;
    /// Bytes read from it.
    fn data(&mut self, bytes: &[u8]);
    /// It closed, or the pump stopped reading; called once.
    fn end(&mut self);
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// argv; `argv[0]` is looked up in `PATH`.
    pub argv: Vec<String>,
    /// The complete environment.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: PathBuf,
    /// `NAME=value` present in the environment of the whole tree; see [`crate::proctree`].
    pub marker: String,
    /// Whether the child gets a stdin pipe (otherwise `/dev/null`).
    pub stdin: bool,
    /// Descriptors the child inherits (the agent channel); taken, and closed in the runner,
    /// right after the spawn.
    pub pass_fds: Arc<Mutex<Vec<OwnedFd>>>,
    /// `?stream=live`: a fragment without a newline is also sent once the output pauses for
    /// [`IDLE_FLUSH`] (see [`LineFramer`]); otherwise only whole lines, long lines' pieces and
    /// the unterminated end.
    pub live: bool,
    /// Run on a pseudo-terminal of this size; its output is framed raw (see
    /// [`LineFramer::raw`]).
    pub pty: Option<agentbox_proto::PtySize>,
}

/// Shared control of one supervised process tree.
#[derive(Debug)]
pub struct Process {
    pid: OnceLock<i32>,
    stop: Mutex<Option<ExitReason>>,
    done: watch::Sender<bool>,
    marker: String,
    /// Every pid signaled by a stop, recorded in the same locked step as its signal (see
    /// [`Process::signal_tree`]).
    signaled: Mutex<HashSet<i32>>,
}

impl Process {
    /// Control for a tree marked with `marker`.
    pub fn new(marker: String) -> Arc<Self> {
        Arc::new(Self {
            pid: OnceLock::new(),
            stop: Mutex::new(None),
            done: watch::channel(false).0,
            marker,
            signaled: Mutex::default(),
        })
    }

    /// Sends `signal` to every live member of the tree rooted at `root` and records them;
    /// returns how many were signaled. Signal and record happen under one lock: a member
    /// killed here drops its environment (and so the marker) before it is a zombie, so
    /// whoever waits for the tree's zombies to be reaped takes their pids from
    /// [`Process::signaled_pids`] instead of finding them again.
    fn signal_tree(&self, root: i32, signal: Signal) -> usize {
        let mut record = self.signaled.lock().unwrap_or_else(|p| p.into_inner());
        let hit = proctree::signal_members(root, &self.marker, signal);
        record.extend(&hit);
        hit.len()
    }

    /// SIGKILLs the tree until no live member is left (bounded).
    fn kill_until_gone(&self, root: i32) {
        for _ in 0..100 {
            if self.signal_tree(root, Signal::SIGKILL) == 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        tracing::warn!(root, "process tree still alive after repeated SIGKILL");
    }

    /// Every pid signaled so far by [`Process::signal_tree`].
    fn signaled_pids(&self) -> Vec<i32> {
        let record = self.signaled.lock().unwrap_or_else(|p| p.into_inner());
        record.iter().copied().collect()
    }

    /// Records the root pid of a tree spawned with [`spawn_stdio`].
    pub fn set_pid(&self, pid: i32) {
        let _ = self.pid.set(pid);
    }

    /// The root pid, once spawned.
    pub fn pid(&self) -> Option<i32> {
        self.pid.get().copied()
    }

    /// Why a stop was asked for, if one was.
    pub fn stop_reason(&self) -> Option<ExitReason> {
        *self.stop.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the process and its pump have finished.
    pub fn is_done(&self) -> bool {
        *self.done.borrow()
    }

    /// Waits until the process and its pump have finished.
    pub async fn wait_done(&self) {
        let mut rx = self.done.subscribe();
        let _ = rx.wait_for(|done| *done).await;
    }

    /// Records that the tree must stop (the pump kills it right after the spawn), without
    /// signalling anything; false when a stop was already asked for.
    pub fn mark_stopped(&self, reason: ExitReason) -> bool {
        let mut stop = self.stop.lock().unwrap_or_else(|p| p.into_inner());
        if stop.is_some() {
            return false;
        }
        *stop = Some(reason);
        true
    }

    /// Stops the tree: SIGTERM to every member, then SIGKILL after `grace`. Returns false when
    /// it already finished or a stop is already under way (the first reason wins).
    pub fn stop(self: &Arc<Self>, reason: ExitReason, grace: Duration) -> bool {
        {
            let mut stop = self.stop.lock().unwrap_or_else(|p| p.into_inner());
            if stop.is_some() || self.is_done() {
                return false;
            }
            *stop = Some(reason);
        }
        let process = Arc::clone(self);
        tokio::spawn(async move {
            // One pass over /proc, on this thread: a tree that holds every process the pids
            // limit allows (a fork bomb in a container) leaves none to spawn a helper thread.
            if let Some(pid) = process.pid() {
                process.signal_tree(pid, Signal::SIGTERM);
            }
            if tokio::time::timeout(grace, process.wait_done())
                .await
                .is_ok()
            {
                return;
            }
            if let Some(pid) = process.pid() {
                let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
                let killer = Arc::clone(&process);
                let spawned =
                    std::thread::Builder::new()
                        .name("kill-tree".into())
                        .spawn(move || {
                            killer.kill_until_gone(pid);
                            let _ = done_tx.send(());
                        });
                match spawned {
                    Ok(_) => {
                        let _ = done_rx.await;
                    }
                    // No thread to be had (the pids limit is full): kill on this one.
                    Err(_) => process.kill_until_gone(pid),
                }
            }
        });
        true
    }
}

/// How a supervised run ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The exit status, or why the process could not be started.
    pub status: Result<ExitStatus, String>,
    /// From spawn to exit.
    pub duration: Duration,
    /// Set when the tree was stopped by [`Process::stop`].
    pub stop_reason: Option<ExitReason>,
}

impl Outcome {
    /// The reason for the `exit` event.
    pub fn reason(&self) -> ExitReason {
        match (&self.status, self.stop_reason) {
            (Err(_), _) => ExitReason::Error,
            (Ok(_), Some(reason)) => reason,
            (Ok(_), None) => ExitReason::Completed,
        }
    }
}

/// Runs `f` (which does the work of a run that is not a supervised process, such as an ACP
/// prompt turn) and marks `process` done, as [`run`] does.
pub fn run_custom(process: &Process, f: impl FnOnce() -> Outcome) -> Outcome {
    let outcome = f();
    process.done.send_replace(true);
    outcome
}

/// Spawns `spec` in its own process group with piped stdin, stdout and stderr, registered with
/// the reaper, for a long-lived process the caller talks to (an ACP agent).
pub fn spawn_stdio(
    reaper: &Reaper,
    spec: &RunSpec,
) -> std::io::Result<(crate::spawn::Child, Exit)> {
    reaper.spawn_run(&crate::spawn::Request {
        argv: &spec.argv,
        env: &spec.env,
        cwd: &spec.cwd,
        stdin: true,
        pass: &[],
        pty: None,
    })
}

/// Runs `spec` to completion on the calling (dedicated, blocking) thread, appending its output
/// to `log`. `on_spawn` gets the child (pid, start time, stdin pipe) right after the spawn,
/// before any output is read.
pub fn run(
    reaper: &Reaper,
    spec: &RunSpec,
    process: &Process,
    log: &EventLog,
    side: Option<&mut dyn SideReader>,
    on_spawn: impl FnOnce(SpawnedChild),
) -> Outcome {
    match start(reaper, spec, process, on_spawn) {
        Ok(running) => pump(reaper, running, process, log, side),
        Err(outcome) => {
            process.done.send_replace(true);
            outcome
        }
    }
}

/// A process started by [`start`] whose output has not been read yet.
#[derive(Debug)]
pub struct Running {
    pid: i32,
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
    exit: Exit,
    started: Instant,
    live: bool,
    /// Output framed as it comes (a terminal's).
    raw: bool,
}

/// A process just spawned, as the `on_spawn` of [`start`] and [`run`] gets it.
#[derive(Debug)]
pub struct SpawnedChild {
    /// Its pid.
    pub pid: i32,
    /// Its start time (see [`proctree::start_time`]), which tells it from a later process
    /// with the same pid.
    pub start_time: Option<u64>,
    /// The write end of its stdin, when piped (a copy of the terminal's master on a PTY).
    pub stdin: Option<ChildStdin>,
    /// The pseudo-terminal's master, when it runs on one.
    pub pty: Option<OwnedFd>,
}

/// Spawns `spec` (see [`spawn`]); `on_spawn` gets the child (pid, start time, stdin pipe)
/// before anything else happens. Err: the outcome of a process that could not be started.
pub fn start(
    reaper: &Reaper,
    spec: &RunSpec,
    process: &Process,
    on_spawn: impl FnOnce(SpawnedChild),
) -> Result<Running, Outcome> {
    let Spawned {
        child,
        exit,
        started,
        start_time,
    } = spawn(reaper, spec).map_err(|(message, started)| Outcome {
        status: Err(message),
        duration: started.elapsed(),
        stop_reason: process.stop_reason(),
    })?;
    let pid = child.pid;
    let _ = process.pid.set(pid);
    on_spawn(SpawnedChild {
        pid,
        start_time,
        stdin: child.stdin,
        pty: child.pty,
    });
    if process.stop_reason().is_some() {
        // A stop raced with the spawn and found no pid to signal.
        process.signal_tree(pid, Signal::SIGKILL);
    }
    Ok(Running {
        pid,
        stdout: Some(child.stdout),
        stderr: Some(child.stderr),
        exit,
        started,
        live: spec.live,
        raw: spec.pty.is_some(),
    })
}

/// Pumps a process started by [`start`] to its end (see [`run`]) and marks it done.
pub fn pump(
    reaper: &Reaper,
    running: Running,
    process: &Process,
    log: &EventLog,
    side: Option<&mut dyn SideReader>,
) -> Outcome {
    let outcome = match side {
        Some(side) => {
            let outcome = pump_output(reaper, running, process, log, Some(&mut *side));
            side.end();
            outcome
        }
        None => pump_output(reaper, running, process, log, None),
    };
    process.done.send_replace(true);
    outcome
}

/// Waits up to `window` for a process started by [`start`] to exit, without blocking the
/// thread; false when it still runs (or its exit cannot be awaited here).
pub fn exited_within(
    running: &Running,
    window: Duration,
) -> impl std::future::Future<Output = bool> + Send {
    let pidfd = running.exit.pidfd().map(|fd| fd.try_clone_to_owned());
    async move { exited(pidfd, window).await }
}

async fn exited(pidfd: Option<std::io::Result<OwnedFd>>, window: Duration) -> bool {
    let Some(Ok(pidfd)) = pidfd else {
        return false;
    };
    // The registration owns its descriptor (a dup), so it cannot outlive it. (Tokio deprecates
    // this constructor in favour of an `unsafe` one only for descriptors it does not own.)
    #[allow(deprecated)]
    let Ok(fd) = tokio::io::unix::AsyncFd::with_interest(pidfd, tokio::io::Interest::READABLE) else {
        return false;
    };
    tokio::time::timeout(window, fd.readable()).await.is_ok()
}

/// Finishes a process started by [`start`] right here when it has exited, its output pipes
/// (and `side`) are closed (no descendant holds them) and no stop was asked for: reads what
/// is left in them (at most a pipe's capacity each, as nothing is written any more), frames
/// it into `log`, ends `side` and marks the process done. Otherwise gives it back, untouched,
/// for [`pump`].
pub fn try_finish(
    reaper: &Reaper,
    running: Running,
    process: &Process,
    log: &EventLog,
    side: Option<&mut dyn SideReader>,
) -> Result<Outcome, Running> {
    if process.stop_reason().is_some() {
        return Err(running);
    }
    // Every pipe hung up (one poll for all of them).
    let mut fds: Vec<PollFd<'_>> = [
        running.stdout.as_ref().map(AsFd::as_fd),
        running.stderr.as_ref().map(AsFd::as_fd),
        side.as_ref().map(|side| side.fd()),
    ]
    .into_iter()
    .flatten()
    .map(|fd| PollFd::new(fd, PollFlags::POLLIN))
    .collect();
    let all_closed = fds.is_empty()
        || (matches!(poll(&mut fds, 0u16), Ok(n) if n as usize == fds.len())
            && fds
                .iter()
                .all(|fd| fd.revents().is_some_and(|r| r.contains(PollFlags::POLLHUP))));
    drop(fds);
    if !all_closed {
        return Err(running);
    }
    let Some(status) = running.exit.try_now(reaper) else {
        return Err(running);
    };
    let Running {
        pid,
        stdout,
        stderr,
        started,
        raw,
        ..
    } = running;
    let mut buf = READ_BUF.with_borrow_mut(std::mem::take);
    buf.resize(READ_BUF_START, 0);
    let pipes: [Option<Box<dyn ReadFd>>; 2] = [
        stdout.map(|p| Box::new(p) as Box<dyn ReadFd>),
        stderr.map(|p| Box::new(p) as Box<dyn ReadFd>),
    ];
    for (i, pipe) in pipes.into_iter().enumerate() {
        let Some(mut pipe) = pipe else { continue };
        let mut framer = LineFramer::new(framer_stream(i));
        framer.raw = raw;
        // Every writer is gone (POLLHUP): these reads end at the pipe's end, never block.
        while let Ok(n @ 1..) = pipe.read(&mut buf) {
            let data = &buf[..n];
            framer.feed_into(log, data);
        }
        framer.flush_into(log);
    }
    if let Some(side) = side {
        while let Ok(n @ 1..) = nix::unistd::read(side.fd(), &mut buf) {
            side.data(&buf[..n]);
        }
        side.end();
    }
    READ_BUF.with_borrow_mut(|slot| *slot = buf);
    if proctree::group_exists(pid) {
        let _ = nix::sys::signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
    process.done.send_replace(true);
    Ok(Outcome {
        status: Ok(status),
        duration: started.elapsed(),
        stop_reason: None,
    })
}

/// A process started by [`spawn`], not yet pumped.
#[derive(Debug)]
struct Spawned {
    child: crate::spawn::Child,
    exit: Exit,
    started: Instant,
    start_time: Option<u64>,
}

/// The outcome of [`spawn`]: the process, or why it could not start (and when it was tried).
type SpawnResult = Result<Spawned, (String, Instant)>;

/// Spawns `spec` in its own process group, registered with the reaper, without reading
/// anything (see [`crate::spawn`]: the caller waits until the child has exec'd, and then
/// until it is scheduled again).
fn spawn(reaper: &Reaper, spec: &RunSpec) -> SpawnResult {
    let started = Instant::now();
    let pass = std::mem::take(&mut *spec.pass_fds.lock().unwrap_or_else(|p| p.into_inner()));
    let request = crate::spawn::Request {
        argv: &spec.argv,
        env: &spec.env,
        cwd: &spec.cwd,
        stdin: spec.stdin,
        pass: &pass,
        pty: spec.pty.map(|size| (size.cols, size.rows)),
    };
    let before = proctree::boot_ticks();
    let spawned = reaper.spawn_run(&request);
    let after = proctree::boot_ticks();
    drop(pass);
    match spawned {
        Ok((child, exit)) => Ok(Spawned {
            start_time: proctree::start_time_within(child.pid, before, after),
            child,
            exit,
            started,
        }),
        Err(e) => {
            let program = spec.argv.first().map_or("", String::as_str);
            Err((format!("cannot start {program:?}: {e}"), started))
        }
    }
}

/// Reads a process started by [`start`] until its output closes and it is reaped.
fn pump_output(
    reaper: &Reaper,
    running: Running,
    process: &Process,
    log: &EventLog,
    mut side: Option<&mut dyn SideReader>,
) -> Outcome {
    let Running {
        pid,
        stdout,
        stderr,
        exit: child_exit,
        started,
        live,
        raw,
    } = running;
    let mut pipes: [Option<Box<dyn ReadFd>>; 2] = [
        stdout.map(|p| Box::new(p) as Box<dyn ReadFd>),
        stderr.map(|p| Box::new(p) as Box<dyn ReadFd>),
    ];
    for pipe in pipes.iter().flatten() {
        let _ = nix::fcntl::fcntl(pipe.as_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
    }
    let mut framers = [
        LineFramer::new(Stream::Stdout),
        LineFramer::new(Stream::Stderr),
    ];
    for framer in &mut framers {
        framer.raw = raw;
    }
    // One small read buffer per pump thread, kept between invokes (no allocation for a quiet
    // process); it grows to READ_BUF_SIZE for the rest of the invoke once a read fills it.
    let mut buf = READ_BUF.with_borrow_mut(std::mem::take);
    buf.resize(READ_BUF_START, 0);
    let mut exit: Option<(ExitStatus, Instant)> = None;
    let mut killed_at: Option<Instant> = None;

    while pipes.iter().any(Option::is_some) || side.is_some() {
        if exit.is_none() {
            if let Ok(status) = child_exit.rx.try_recv() {
                exit = Some((status, Instant::now()));
            }
        }
        if let Some((_, exited_at)) = exit {
            match killed_at {
                None if exited_at.elapsed() >= DRAIN => {
                    // Descendants still hold the output pipes after the main process exited.
                    process.kill_until_gone(pid);
                    killed_at = Some(Instant::now());
                }
                Some(at) if at.elapsed() >= DRAIN_AFTER_KILL => break,
                _ => {}
            }
        }
        // Only a live stream wakes up for a pending fragment (to send it after IDLE_FLUSH).
        let pending = live && framers.iter().any(|f| f.has_pending());
        let timeout_ms: u16 = if pending {
            10
        } else if exit.is_some() {
            50
        } else {
            100
        };
        let ready = {
            let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(3);
            let mut which = Vec::with_capacity(3);
            for (i, pipe) in pipes.iter().enumerate() {
                if let Some(pipe) = pipe {
                    fds.push(PollFd::new(pipe.as_fd(), PollFlags::POLLIN));
                    which.push(i);
                }
            }
            if let Some(side) = &side {
                fds.push(PollFd::new(side.fd(), PollFlags::POLLIN));
                which.push(SIDE);
            }
            if let (None, Some(pidfd)) = (exit, child_exit.pidfd()) {
                fds.push(PollFd::new(pidfd, PollFlags::POLLIN));
                which.push(EXITED);
            }
            match poll(&mut fds, timeout_ms) {
                Ok(0) | Err(Errno::EINTR) => Vec::new(),
                Ok(_) => fds
                    .iter()
                    .zip(which)
                    .filter(|(fd, _)| fd.revents().is_some_and(|r| !r.is_empty()))
                    .map(|(_, i)| i)
                    .collect(),
                Err(e) => {
                    tracing::error!(error = %e, "poll failed");
                    break;
                }
            }
        };
        for i in ready {
            if i == EXITED {
                if let Some(status) = child_exit.try_now(reaper) {
                    exit = Some((status, Instant::now()));
                }
                continue;
            }
            if i == SIDE {
                if let Some(reader) = side.as_deref_mut() {
                    match nix::unistd::read(reader.fd(), &mut buf) {
                        Ok(n) if n > 0 => reader.data(&buf[..n]),
                        Err(Errno::EINTR | Errno::EAGAIN) => {}
                        Ok(_) | Err(_) => side = None,
                    }
                }
                continue;
            }
            let Some(pipe) = pipes[i].as_mut() else {
                continue;
            };
            match pipe.read(&mut buf) {
                Ok(0) | Err(_) => {
                    pipes[i] = None;
                    let framer = &mut framers[i];
                    framer.flush_into(log);
                }
                Ok(n) => {
                    let framer = &mut framers[i];
                    let data = &buf[..n];
                    framer.feed_into(log, data);
                    if n == buf.len() && n < READ_BUF_SIZE {
                        buf.resize(READ_BUF_SIZE, 0);
                    }
                }
            }
        }
        if live {
            for framer in &mut framers {
                if framer.idle_for() >= IDLE_FLUSH {
                    framer.flush_into(log);
                }
            }
        }
    }
    for framer in &mut framers {
        framer.flush_into(log);
    }
    buf.truncate(READ_BUF_START);
    buf.shrink_to(READ_BUF_START);
    READ_BUF.with_borrow_mut(|slot| *slot = buf);
    let status = match exit {
        Some((status, _)) => Ok(status),
        None => {
            // The output closed, so the process has most likely exited: reap it here rather
            // than wait for SIGCHLD to travel through the runtime to the reaper task.
            match child_exit.try_now(reaper) {
                Some(status) => Ok(status),
                None => wait_exit(reaper, &child_exit, pid, process),
            }
        }
    };
    let duration = started.elapsed();
    let stop_reason = process.stop_reason();
    // Nothing of the tree outlives the invoke's exit event: the group always, and on a stop
    // (cancel, timeout) every marked descendant too.
    if stop_reason.is_some() || killed_at.is_some() {
        // A killed process drops its environment (and so the marker) before it is a zombie:
        // every pid signaled (here, or by the stop's own task, which may have killed a member
        // just before) is waited for until it is reaped (re-parented to the runner, a
        // subreaper) or gone, not only the zombies still found as members.
        process.kill_until_gone(pid);
        let mut signaled = process.signaled_pids();
        for _ in 0..100 {
            reaper.reap();
            signaled.retain(|p| *p != pid && proctree::exists(*p));
            if signaled.is_empty() && proctree::members(pid, &process.marker).zombies == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    } else if proctree::group_exists(pid) {
        let _ = nix::sys::signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
    Outcome {
        status,
        duration,
        stop_reason,
    }
}

fn wait_exit(
    reaper: &Reaper,
    exit: &Exit,
    pid: i32,
    process: &Process,
) -> Result<ExitStatus, String> {
    loop {
        match exit.wait(reaper, Duration::from_secs(1)) {
            Waited::Exited(status) => return Ok(status),
            Waited::Lost => return Err("lost track of the process".into()),
            Waited::Running => {
                // Output is closed but the process lives on: it closed its own stdout and
                // stderr. Keep waiting; a stop or timeout still ends it.
                tracing::debug!(pid, marker = %process.marker, "waiting for exit with output closed");
            }
        }
    }
}

fn framer_stream(i: usize) -> Stream {
    if i == 0 {
        Stream::Stdout
    } else {
        Stream::Stderr
    }
}

trait ReadFd: Read + AsFd + Send {}
impl<T: Read + AsFd + Send> ReadFd for T {}

/// Splits a byte stream into `log` events: one per line without its newline; a fragment with
/// no newline yet goes out as `partial` when it reaches [`MAX_FRAGMENT`], at the end, and (for
/// a [`RunSpec::live`] stream, whose pump calls [`LineFramer::flush`] then) when the output
/// pauses.
#[derive(Debug)]
pub struct LineFramer {
    /// Every chunk read becomes `partial` events at once (a terminal's output: prompts and
    /// echoes have no newline, and a keystroke's echo must not wait).
    pub raw: bool,
    stream: Stream,
    pending: Vec<u8>,
    pending_since: Option<Instant>,
}

impl LineFramer {
    /// A framer for `stream`.
    pub fn new(stream: Stream) -> Self {
        Self {
            raw: false,
            stream,
            pending: Vec::new(),
            pending_since: None,
        }
    }

    /// The stream this framer handles.
    pub fn stream(&self) -> Stream {
        self.stream
    }

    /// Whether bytes without a newline are waiting.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// How long the oldest pending byte has waited.
    pub fn idle_for(&self) -> Duration {
        self.pending_since.map_or(Duration::ZERO, |t| t.elapsed())
    }

    /// Feeds bytes; `emit(bytes, partial)` is called for every complete event.
    pub fn feed(&mut self, mut data: &[u8], emit: &mut impl FnMut(&[u8], bool)) {
        if self.raw {
            for piece in data.chunks(MAX_FRAGMENT) {
                emit(piece, true);
            }
            return;
        }
        if !self.pending.is_empty() {
            match memchr::memchr(b'\n', data) {
                Some(nl) => {
                    self.pending.extend_from_slice(&data[..nl]);
                    let line = std::mem::take(&mut self.pending);
                    emit_line(&line, emit);
                    self.pending = line;
                    self.pending.clear();
                    self.pending_since = None;
                    data = &data[nl + 1..];
                }
                None => {
                    self.pending.extend_from_slice(data);
                    let rest = emit_long_prefix(&self.pending, emit);
                    self.pending.drain(..self.pending.len() - rest);
                    return;
                }
            }
        }
        let mut start = 0;
        for nl in memchr::memchr_iter(b'\n', data) {
            emit_line(&data[start..nl], emit);
            start = nl + 1;
        }
        let tail = &data[start..];
        if !tail.is_empty() {
            let rest = emit_long_prefix(tail, emit);
            self.pending.extend_from_slice(&tail[tail.len() - rest..]);
            self.pending_since = Some(Instant::now());
        }
    }

    /// [`LineFramer::feed`] into `log`'s events of this framer's stream.
    pub fn feed_into(&mut self, log: &EventLog, data: &[u8]) {
        let stream = self.stream;
        log.append(|batch| self.feed(data, &mut |b, p| batch.log(stream, b, p)));
    }

    /// [`LineFramer::flush`] into `log`.
    pub fn flush_into(&mut self, log: &EventLog) {
        let stream = self.stream;
        log.append(|batch| self.flush(&mut |b, p| batch.log(stream, b, p)));
    }

    /// Emits the pending fragment, if any, as `partial`.
    pub fn flush(&mut self, emit: &mut impl FnMut(&[u8], bool)) {
        if !self.pending.is_empty() {
            emit(&self.pending, true);
            self.pending.clear();
        }
        self.pending_since = None;
    }
}

/// Emits a complete line, in [`MAX_FRAGMENT`] pieces when it is longer.
fn emit_line(line: &[u8], emit: &mut impl FnMut(&[u8], bool)) {
    let rest = emit_long_prefix(line, emit);
    emit(&line[line.len() - rest..], false);
}

/// Emits full-size partial pieces off the front of `bytes` while more than [`MAX_FRAGMENT`]
/// remain... or exactly that much; returns how many bytes were left unemitted.
fn emit_long_prefix(bytes: &[u8], emit: &mut impl FnMut(&[u8], bool)) -> usize {
    let mut rest = bytes;
    while rest.len() > MAX_FRAGMENT {
        let cut = char_boundary(rest, MAX_FRAGMENT);
        emit(&rest[..cut], true);
        rest = &rest[cut..];
    }
    rest.len()
}

/// Moves `at` back (by at most 3 bytes) so a UTF-8 character is not split.
fn char_boundary(bytes: &[u8], at: usize) -> usize {
    let mut cut = at;
    while cut > at - 3 && bytes.get(cut).is_some_and(|b| b & 0xc0 == 0x80) {
        cut -= 1;
    }
    if cut == at - 3 && bytes.get(cut).is_some_and(|b| b & 0xc0 == 0x80) {
        at
    } else {
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_all(chunks: &[&[u8]]) -> Vec<(Vec<u8>, bool)> {
        let mut framer = LineFramer::new(Stream::Stdout);
        let mut out = Vec::new();
        for chunk in chunks {
            framer.feed(chunk, &mut |b, p| out.push((b.to_vec(), p)));
        }
        framer.flush(&mut |b, p| out.push((b.to_vec(), p)));
        out
    }

    fn rebuild(events: &[(Vec<u8>, bool)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (bytes, partial) in events {
            out.extend_from_slice(bytes);
            if !partial {
                out.push(b'\n');
            }
        }
        out
    }

    /// A child's exit is learned from its pidfd: the reaper here is never started (no
    /// SIGCHLD handler, no reaping tick), so only the pidfd can tell.
    #[test]
    fn an_exit_is_seen_through_the_pidfd_alone() {
        let reaper = Reaper::new();
        let spec = RunSpec {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "exec >&- 2>&-; sleep 0.1; exit 7".into(),
            ],
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            cwd: std::env::temp_dir(),
            marker: "AGENTBOX_TEST_MARKER=pidfd".into(),
            stdin: false,
            pass_fds: Arc::default(),
            live: false,
            pty: None,
        };
        let (_child, exit) = spawn_stdio(&reaper, &spec).expect("spawn");
        assert!(exit.pidfd().is_some(), "no pidfd on this kernel");
        assert_eq!(
            exit.wait(&reaper, Duration::ZERO),
            Waited::Running,
            "exited at once"
        );
        assert_eq!(
            exit.wait(&reaper, Duration::from_secs(10)),
            Waited::Exited(ExitStatus {
                code: 7,
                signal: None
            })
        );
    }

    #[test]
    fn lines_split_across_reads() {
        let events = frame_all(&[b"hel", b"lo\nwor", b"ld\n", b"\n", b"tail"]);
        assert_eq!(
            events,
            vec![
                (b"hello".to_vec(), false),
                (b"world".to_vec(), false),
                (b"".to_vec(), false),
                (b"tail".to_vec(), true),
            ]
        );
    }

    #[test]
    fn long_lines_become_bounded_partials_and_rebuild_exactly() {
        let mut data = vec![b'a'; MAX_FRAGMENT * 2 + 17];
        data.push(b'\n');
        data.extend_from_slice(&vec![b'b'; MAX_FRAGMENT * 3]);
        for chunk_size in [1usize << 10, 4096, 65536, 1 << 20] {
            let chunks: Vec<&[u8]> = data.chunks(chunk_size).collect();
            let events = frame_all(&chunks);
            assert!(events.iter().all(|(b, _)| b.len() <= MAX_FRAGMENT));
            assert_eq!(rebuild(&events), data, "chunk size {chunk_size}");
        }
    }

    #[test]
    fn cuts_do_not_split_utf8_characters() {
        let text = "é".repeat(MAX_FRAGMENT);
        let events = frame_all(&[text.as_bytes()]);
        for (bytes, _) in &events {
            assert!(std::str::from_utf8(bytes).is_ok());
        }
        assert_eq!(rebuild(&events), text.as_bytes());
    }

    #[test]
    fn random_chunkings_rebuild_exactly() {
        let mut state: u64 = 42;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..50 {
            let len = (next() % 300_000) as usize;
            let data: Vec<u8> = (0..len)
                .map(|_| match next() % 10 {
                    0 => b'\n',
                    1 => 0xff,
                    _ => b'x',
                })
                .collect();
            let mut chunks = Vec::new();
            let mut pos = 0;
            while pos < data.len() {
                let n = 1 + (next() % 100_000) as usize;
                let end = (pos + n).min(data.len());
                chunks.push(&data[pos..end]);
                pos = end;
            }
            assert_eq!(rebuild(&frame_all(&chunks)), data);
        }
    }
}
