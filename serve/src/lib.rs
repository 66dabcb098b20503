//! The accept loop both agentbox servers share (the runner's `server::serve`, the control
//! plane's `api::serve`), so that nothing a client can open without authenticating is
//! unbounded:
//!
//! - **a cap on open connections** ([`Limits::max_connections`], lowered to half the process's
//!   open-file limit): at the cap, the connection idle for longest (no request in progress;
//!   a half-sent request head counts as idle) is closed to make room; when every connection is
//!   busy, the new one is closed instead. Running out of descriptors in `accept` closes the
//!   oldest idle one as well.
//! - **a header-read timeout**: a request head must arrive in full within
//!   [`Limits::header_read_timeout`] of its first byte (of the accept, for a new connection).
//! - **an idle timeout**: a keep-alive connection with no request in progress for
//!   [`Limits::idle_timeout`] is closed.
//! - **a rate-limited saturation log**: one warning per [`LOG_EVERY`] while at the cap, with
//!   counts of what was closed and refused meanwhile.
//!
//! A connection is busy from the moment hyper hands a request to the router until its response
//! body has been sent or dropped (an SSE stream stays busy while it is open), so no timeout and
//! no eviction ever cuts a response. A connection closed at the cap is dropped at once (its
//! descriptor is needed); one that timed out gets hyper's graceful shutdown (HTTP/2: `GOAWAY`)
//! and is dropped after [`CLOSE_GRACE`] at the latest.
//!
//! Generic over the listener ([`Listener`]: TCP and Unix sockets), so every transport gets
//! the same limits.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{watch, Notify};

/// At most one saturation warning per this interval.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// How long a connection being closed (timeout, eviction) may take to finish its graceful
/// shutdown before it is dropped.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The limits of one server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open connections at most (further lowered to half the open-file limit).
    pub max_connections: usize,
    /// A request head must be complete this long after its first byte.
    pub header_read_timeout: Duration,
    /// A connection with no request in progress is closed after this long.
    pub idle_timeout: Duration,
}

impl Limits {
    /// `max_connections` as it will be applied: at most half the soft open-file limit
    /// (`RLIMIT_NOFILE`), so the server keeps descriptors for its own work, at least 1.
    pub fn effective_max_connections(&self) -> usize {
        let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX);
        let half = usize::try_from(soft / 2).unwrap_or(usize::MAX);
        self.max_connections.min(half).max(1)
    }
}

/// Connections the kernel may hold for a listener before `accept` (`listen(2)` is called
/// again with it: the standard library's 128 overflowed under a burst of new connections at
/// the cap, and a dropped SYN costs the client a second).
pub const BACKLOG: i32 = 1024;

/// What [`serve`] accepts connections from.
pub trait Listener: Send + 'static {
    /// The connection type.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The next connection.
    fn accept(&mut self) -> impl Future<Output = io::Result<Self::Io>> + Send;
    /// Sets the backlog of the already listening socket to [`BACKLOG`] (best effort).
    fn widen_backlog(&self) {}
    /// The descriptor of `io` when it is a unix socket connection (put in each of its
    /// upgrade requests as [`UnixConnFd`]); `None` otherwise.
    fn unix_fd(_io: &Self::Io) -> Option<RawFd> {
        None
    }
}

/// A request extension on a unix socket connection's upgrade requests (those with an `Upgrade`
/// header): the connection's descriptor, for a handler that passes descriptors over the
/// connection (`SCM_RIGHTS`) once it is upgraded. It names an open
/// descriptor only while the connection is: a handler may use it while it holds the upgraded
/// stream (which owns the connection), never after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnixConnFd(pub RawFd);

impl Listener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    fn widen_backlog(&self) {
        let _ = rustix::net::listen(self, BACKLOG);
    }
    async fn accept(&mut self) -> io::Result<Self::Io> {
        let (tcp, _) = tokio::net::TcpListener::accept(self).await?;
        // Events are small writes that must leave at once.
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }
}

impl Listener for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    fn widen_backlog(&self) {
        let _ = rustix::net::listen(self, BACKLOG);
    }
    async fn accept(&mut self) -> io::Result<Self::Io> {
        Ok(tokio::net::UnixListener::accept(self).await?.0)
    }
    fn unix_fd(io: &Self::Io) -> Option<RawFd> {
        Some(io.as_raw_fd())
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds since [`epoch`], never 0 (0 means "not set").
fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64 + 1
}

/// One open connection's state, shared by its IO wrapper, its requests and the registry.
#[derive(Debug, Default)]
struct Conn {
    /// Requests handed to the router whose response bodies are not finished.
    inflight: AtomicUsize,
    /// When the connection last had no request in progress (accept, or the last response).
    idle_since: AtomicU64,
    /// When the first byte arrived while idle (a request head being read); 0: none.
    reading_since: AtomicU64,
    /// Whether a request was ever handed to the router.
    served: AtomicBool,
    /// Set once the connection was chosen to be closed.
    closing: AtomicBool,
    close: Notify,
}

impl Conn {
    fn new() -> Arc<Self> {
        let conn = Conn::default();
        conn.idle_since.store(now_ms(), Ordering::Relaxed);
        Arc::new(conn)
    }

    fn begin(&self) {
        self.inflight.fetch_add(1, Ordering::AcqRel);
        self.reading_since.store(0, Ordering::Relaxed);
        self.served.store(true, Ordering::Relaxed);
    }

    fn end(&self) {
        self.idle_since.store(now_ms(), Ordering::Relaxed);
        self.inflight.fetch_sub(1, Ordering::AcqRel);
    }

    fn is_idle(&self) -> bool {
        self.inflight.load(Ordering::Acquire) == 0
    }

    /// When an idle connection is due to be closed; `None` while busy.
    fn deadline(&self, limits: &Limits) -> Option<u64> {
        if !self.is_idle() {
            return None;
        }
        let reading = self.reading_since.load(Ordering::Relaxed);
        let idle = self.idle_since.load(Ordering::Relaxed);
        Some(if reading != 0 {
            reading + limits.header_read_timeout.as_millis() as u64
        } else if !self.served.load(Ordering::Relaxed) {
            idle + limits.header_read_timeout.as_millis() as u64
        } else {
            idle + limits.idle_timeout.as_millis() as u64
        })
    }
}

/// The open connections, for choosing which to close at the cap.
#[derive(Default)]
struct Registry {
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    next: AtomicU64,
    /// Of those, the ones chosen to close.
    closing: AtomicUsize,
}

impl Registry {
    fn insert(&self, conn: Arc<Conn>) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, conn);
        id
    }

    fn remove(&self, id: u64) {
        let removed = self.lock().remove(&id);
        if removed.is_some_and(|c| c.closing.load(Ordering::Relaxed)) {
            self.closing.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Open connections not already being closed.
    fn live(&self) -> usize {
        let open = self.lock().len();
        open.saturating_sub(self.closing.load(Ordering::Relaxed))
    }

    /// Asks the connection idle for longest to close; false when every one is busy.
    fn close_oldest_idle(&self) -> bool {
        let conns = self.lock();
        let oldest = conns
            .values()
            .filter(|c| c.is_idle() && !c.closing.load(Ordering::Relaxed))
            .min_by_key(|c| c.idle_since.load(Ordering::Relaxed));
        match oldest {
            Some(c) => {
                c.closing.store(true, Ordering::Relaxed);
                self.closing.fetch_add(1, Ordering::Relaxed);
                c.close.notify_one();
                true
            }
            None => false,
        }
    }
}

/// The saturation warning, at most one per [`LOG_EVERY`].
struct SaturationLog {
    server: &'static str,
    limit: usize,
    last: Option<Instant>,
    closed: u64,
    refused: u64,
    accept_errors: u64,
}

impl SaturationLog {
    fn note(&mut self) {
        if self.last.is_some_and(|t| t.elapsed() < LOG_EVERY) {
            return;
        }
        self.last = Some(Instant::now());
        tracing::warn!(
            server = self.server,
            limit = self.limit,
            closed_idle = self.closed,
            refused = self.refused,
            accept_errors = self.accept_errors,
            "connection limit reached: closing the oldest idle connections \
             (counts since the last warning; next warning in {}s at the earliest)",
            LOG_EVERY.as_secs()
        );
        self.closed = 0;
        self.refused = 0;
        self.accept_errors = 0;
    }
}

/// Serves `router` on `listener` with `builder`'s protocol settings and the `limits`, until
/// `shutdown` resolves; then every connection shuts down gracefully and this returns when the
/// last one is closed. `server` names the server in log lines.
pub async fn serve<L: Listener>(
    mut listener: L,
    router: Router,
    builder: auto::Builder<TokioExecutor>,
    limits: Limits,
    server: &'static str,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let max = limits.effective_max_connections();
    listener.widen_backlog();
    let registry = Arc::new(Registry::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut log = SaturationLog {
        server,
        limit: max,
        last: None,
        closed: 0,
        refused: 0,
        accept_errors: 0,
    };
    let open = Arc::new(AtomicUsize::new(0));
    let all_closed = Arc::new(Notify::new());
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let io = match accepted {
            Ok(io) => io,
            Err(e) if is_connection_error(&e) => continue,
            Err(_) => {
                // Out of descriptors (or memory): make room, and do not spin.
                log.accept_errors += 1;
                if registry.close_oldest_idle() {
                    log.closed += 1;
                }
                log.note();
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        if registry.live() >= max {
            // The chosen connection closes when its task next runs: at the latest when the
            // runtime's budget makes this loop yield, so the overshoot stays small.
            if registry.close_oldest_idle() {
                log.closed += 1;
                log.note();
            } else {
                log.refused += 1;
                log.note();
                drop(io);
                continue;
            }
        }
        let conn = Conn::new();
        let id = registry.insert(Arc::clone(&conn));
        let service = RequestService {
            router: router.clone(),
            conn: Arc::clone(&conn),
            unix_fd: L::unix_fd(&io).map(UnixConnFd),
        };
        let io = TokioIo::new(Tracked {
            io,
            conn: Arc::clone(&conn),
        });
        // With upgrades: a runner's port tunnel (and a WebSocket) leaves the HTTP connection after
        // its 101, and the connection's task ends; the upgraded stream is its handler's.
        let connection = builder
            .serve_connection_with_upgrades(io, service)
            .into_owned();
        let registry = Arc::clone(&registry);
        let stop = stop_rx.clone();
        let (open, all_closed) = (Arc::clone(&open), Arc::clone(&all_closed));
        open.fetch_add(1, Ordering::AcqRel);
        tokio::spawn(async move {
            drive(connection, &conn, &limits, stop).await;
            registry.remove(id);
            if open.fetch_sub(1, Ordering::AcqRel) == 1 {
                all_closed.notify_waiters();
            }
        });
    }
    let _ = stop_tx.send(true);
    loop {
        let notified = all_closed.notified();
        if open.load(Ordering::Acquire) == 0 {
            break;
        }
        notified.await;
    }
    Ok(())
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Runs one connection until it ends, times out, is chosen to close, or the server stops.
async fn drive<I>(
    connection: auto::UpgradeableConnection<
        'static,
        TokioIo<Tracked<I>>,
        RequestService,
        TokioExecutor,
    >,
    conn: &Conn,
    limits: &Limits,
    mut stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::pin!(connection);
    // How often a busy connection looks again (it cannot time out while busy).
    let recheck = limits.header_read_timeout.min(limits.idle_timeout);
    let closing = loop {
        let wait = match conn.deadline(limits) {
            Some(at) => Duration::from_millis(at.saturating_sub(now_ms())),
            None => recheck,
        };
        tokio::select! {
            _ = connection.as_mut() => return,
            () = tokio::time::sleep(wait) => {
                if conn.deadline(limits).is_some_and(|at| at <= now_ms()) {
                    break Closing::TimedOut;
                }
            }
            // Chosen at the cap: it is idle, and the descriptor is needed now.
            () = conn.close.notified() => return,
            _ = stop.wait_for(|s| *s) => break Closing::Stopping,
        }
    };
    connection.as_mut().graceful_shutdown();
    match closing {
        // The server stops: in-flight responses finish (the runner ends its streams).
        Closing::Stopping => drop(connection.await),
        // Idle: HTTP/2 gets its GOAWAY; a half-sent head is not waited for.
        Closing::TimedOut => drop(tokio::time::timeout(CLOSE_GRACE, connection).await),
    }
}

enum Closing {
    TimedOut,
    Stopping,
}

/// The per-connection service: marks the connection busy from the request until the end of
/// its response body.
#[derive(Clone)]
struct RequestService {
    router: Router,
    conn: Arc<Conn>,
    /// Put in the upgrade requests of a unix socket connection.
    unix_fd: Option<UnixConnFd>,
}

impl hyper::service::Service<hyper::Request<Incoming>> for RequestService {
    type Response = hyper::Response<TrackedBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, mut request: hyper::Request<Incoming>) -> Self::Future {
        // Only an upgrade can use it (no allocation on the other requests).
        if let Some(fd) = self.unix_fd {
            if request.headers().contains_key(hyper::header::UPGRADE) {
                request.extensions_mut().insert(fd);
            }
        }
        self.conn.begin();
        let busy = Busy(Arc::clone(&self.conn));
        let mut router = self.router.clone();
        Box::pin(async move {
            let response = match tower_service::Service::call(&mut router, request).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            Ok(response.map(|body| TrackedBody { body, _busy: busy }))
        })
    }
}

/// Held while a request is in progress: from the router's call to the body's end.
struct Busy(Arc<Conn>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// A response body that keeps its connection busy until it is finished or dropped.
pub struct TrackedBody {
    body: Body,
    _busy: Busy,
}

impl http_body::Body for TrackedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The connection's IO, noting when the first byte of a request head arrives.
struct Tracked<I> {
    io: I,
    conn: Arc<Conn>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Tracked<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let conn = &self.conn;
            if conn.is_idle() && conn.reading_since.load(Ordering::Relaxed) == 0 {
                conn.reading_since.store(now_ms(), Ordering::Relaxed);
            }
        }
        result
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Tracked<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_connections: 4,
        header_read_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(120),
    };

    #[test]
    fn deadlines_follow_the_connection_state() {
        let conn = Conn::new();
        let accepted = conn.idle_since.load(Ordering::Relaxed);
        assert_eq!(
            conn.deadline(&LIMITS),
            Some(accepted + 10_000),
            "new: header timeout"
        );
        conn.begin();
        assert_eq!(conn.deadline(&LIMITS), None, "busy: never");
        conn.end();
        let idle = conn.idle_since.load(Ordering::Relaxed);
        assert_eq!(
            conn.deadline(&LIMITS),
            Some(idle + 120_000),
            "idle keep-alive"
        );
        conn.reading_since.store(idle + 5, Ordering::Relaxed);
        assert_eq!(
            conn.deadline(&LIMITS),
            Some(idle + 5 + 10_000),
            "a head on its way"
        );
    }

    #[test]
    fn the_oldest_idle_connection_is_chosen_never_a_busy_one() {
        let registry = Registry::default();
        let conns: Vec<Arc<Conn>> = (0..3).map(|_| Conn::new()).collect();
        for (i, c) in conns.iter().enumerate() {
            c.idle_since.store(100 - i as u64 * 10, Ordering::Relaxed);
            registry.insert(Arc::clone(c));
        }
        conns[2].begin(); // the oldest is busy
        assert!(registry.close_oldest_idle());
        assert!(
            conns[1].closing.load(Ordering::Relaxed),
            "oldest idle chosen"
        );
        assert_eq!(registry.live(), 2);
        assert!(registry.close_oldest_idle());
        assert!(conns[0].closing.load(Ordering::Relaxed));
        assert!(!registry.close_oldest_idle(), "only a busy one is left");
        assert!(
            Limits {
                max_connections: 1 << 30,
                ..LIMITS
            }
            .effective_max_connections()
                < 1 << 30
        );
    }
}
