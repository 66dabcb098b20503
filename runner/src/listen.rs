//! Where the runner listens: a TCP address, a unix socket path, or a listening socket inherited
//! by descriptor number (how the local backend's sandbox launcher hands one over: the socket is
//! bound on the host's side before the sandbox's root is set up, so no path to it exists inside).
//! Also the token read from an inherited pipe.
//!
//! Also [`send_fd`]: a port's connection handed to the control plane over the runner's own
//! unix socket connection (`SCM_RIGHTS`).
//!
//! Adopting an inherited descriptor needs `from_raw_fd`, and borrowing a connection's
//! descriptor by number `borrow_raw`, which are `unsafe`: this module and `runner::spawn` are
//! the only ones allowed it (`.ci/run` checks). The function that adopts checks that the
//! number is open and is the kind of descriptor asked for first; [`send_fd`] borrows the
//! number only while the connection's owner is borrowed too.
#![allow(unsafe_code)]

use std::fmt;
use std::io::Read;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::str::FromStr;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_util::either::Either;

/// The `--listen` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A unix socket path (created; an old socket file there is replaced).
    Unix(PathBuf),
    /// An inherited listening socket.
    Fd(RawFd),
}

impl FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a path".into());
            }
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        if let Some(n) = s.strip_prefix("fd:") {
            let fd: RawFd = n
                .parse()
                .map_err(|_| format!("fd:{n} is not a descriptor number"))?;
            if fd < 3 {
                return Err("fd: needs a descriptor number of 3 or more".into());
            }
            return Ok(Listen::Fd(fd));
        }
        s.parse::<SocketAddr>()
            .map(Listen::Tcp)
            .map_err(|_| format!("{s:?} is neither HOST:PORT, unix:PATH nor fd:N"))
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Tcp(addr) => write!(f, "{addr}"),
            Listen::Unix(path) => write!(f, "unix:{}", path.display()),
            Listen::Fd(fd) => write!(f, "fd:{fd}"),
        }
    }
}

/// A bound listener of either kind.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// A unix socket.
    Unix(UnixListener),
}

/// An accepted connection of either kind.
pub type Conn = Either<TcpStream, UnixStream>;

impl Listener {
    /// Binds (or adopts) what `listen` names. Must run inside a runtime.
    pub async fn bind(listen: &Listen) -> std::io::Result<Self> {
        match listen {
            Listen::Tcp(addr) => Ok(Listener::Tcp(TcpListener::bind(addr).await?)),
            Listen::Unix(path) => {
                // A socket file left by an earlier run refuses the bind; nothing else is removed.
                if std::fs::symlink_metadata(path)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                {
                    std::fs::remove_file(path)?;
                }
                Ok(Listener::Unix(UnixListener::bind(path)?))
            }
            Listen::Fd(fd) => {
                let owned = adopt(*fd, rustix::fs::FileType::Socket)?;
                let kind = rustix::net::sockopt::socket_domain(&owned)?;
                if kind == rustix::net::AddressFamily::UNIX {
                    let std = std::os::unix::net::UnixListener::from(owned);
                    std.set_nonblocking(true)?;
                    Ok(Listener::Unix(UnixListener::from_std(std)?))
                } else {
                    let std = std::net::TcpListener::from(owned);
                    std.set_nonblocking(true)?;
                    Ok(Listener::Tcp(TcpListener::from_std(std)?))
                }
            }
        }
    }

    /// What to print after `listening on`.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|e| format!("tcp ({e})")),
            Listener::Unix(l) => match l.local_addr() {
                Ok(a) => match a.as_pathname() {
                    Some(p) => format!("unix:{}", p.display()),
                    None => "unix:(unnamed)".into(),
                },
                Err(e) => format!("unix ({e})"),
            },
        }
    }

    /// The next connection.
    pub async fn accept(&self) -> std::io::Result<Conn> {
        match self {
            Listener::Tcp(l) => {
                let (tcp, _) = l.accept().await?;
                // Events are small writes that must leave at once.
                let _ = tcp.set_nodelay(true);
                Ok(Either::Left(tcp))
            }
            Listener::Unix(l) => Ok(Either::Right(l.accept().await?.0)),
        }
    }
}

impl agentbox_serve::Listener for Listener {
    type Io = Conn;

    fn widen_backlog(&self) {
        match self {
            Listener::Tcp(l) => agentbox_serve::Listener::widen_backlog(l),
            Listener::Unix(l) => agentbox_serve::Listener::widen_backlog(l),
        }
    }

    async fn accept(&mut self) -> std::io::Result<Conn> {
        Listener::accept(self).await
    }

    fn unix_fd(io: &Conn) -> Option<RawFd> {
        match io {
            Either::Left(_) => None,
            Either::Right(unix) => Some(unix.as_raw_fd()),
        }
    }
}

/// How long [`send_fd`] retries a full socket buffer (it holds one byte: never, in practice).
const SEND_FD_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

/// Sends `fd` over the unix socket connection `conn` (one byte, `x`, with `SCM_RIGHTS`).
/// `upgraded` is the connection's upgraded stream, which owns the descriptor `conn` names: it
/// is borrowed (exclusively) for the call, so the descriptor is open throughout.
pub async fn send_fd(
    conn: agentbox_serve::UnixConnFd,
    upgraded: &mut hyper::upgrade::Upgraded,
    fd: BorrowedFd<'_>,
) -> std::io::Result<()> {
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let _owner = upgraded;
    // SAFETY: `conn` is the descriptor of the connection that `upgraded` owns (the accept loop
    // put it in the request that was upgraded), and `upgraded` is borrowed until this returns,
    // so the number stays open and names that socket for the borrow's lifetime.
    let socket = unsafe { BorrowedFd::borrow_raw(conn.0) };
    let deadline = std::time::Instant::now() + SEND_FD_PATIENCE;
    loop {
        let fds = [fd];
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        control.push(SendAncillaryMessage::ScmRights(&fds));
        let iov = [std::io::IoSlice::new(b"x")];
        match sendmsg(socket, &iov, &mut control, SendFlags::NOSIGNAL) {
            Ok(1) => return Ok(()),
            Ok(_) => return Err(std::io::Error::other("the descriptor was not sent")),
            Err(rustix::io::Errno::AGAIN) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Takes ownership of inherited descriptor `fd`, after checking that it is open and of `kind`
/// (so a wrong number is an error, never a descriptor the process owns elsewhere), and sets
/// close-on-exec on it so that no child inherits it further.
pub(crate) fn adopt(fd: RawFd, kind: rustix::fs::FileType) -> std::io::Result<OwnedFd> {
    if fd < 3 {
        return Err(std::io::Error::other("descriptors 0-2 cannot be adopted"));
    }
    // Checked through /proc, which needs no descriptor: a closed number is ENOENT here.
    let meta = std::fs::metadata(format!("/proc/self/fd/{fd}"))
        .map_err(|e| std::io::Error::other(format!("descriptor {fd} is not open: {e}")))?;
    let actual = rustix::fs::FileType::from_raw_mode(std::os::unix::fs::MetadataExt::mode(&meta));
    if actual != kind {
        return Err(std::io::Error::other(format!(
            "descriptor {fd} is a {actual:?}, not a {kind:?}"
        )));
    }
    // SAFETY: `fd` is open (checked above), was inherited at exec for this process to own (the
    // launcher passes it for this purpose only), and nothing else in this process refers to
    // it: it is adopted once, at start-up, before any other descriptor is opened by number.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC)?;
    Ok(owned)
}

/// Reads the token from inherited pipe `fd` to its end and closes it.
pub fn read_token_fd(fd: RawFd) -> Result<String, String> {
    let owned = adopt(fd, rustix::fs::FileType::Fifo).map_err(|e| format!("--token-fd: {e}"))?;
    let mut text = String::new();
    std::fs::File::from(owned)
        .take(4096)
        .read_to_string(&mut text)
        .map_err(|e| format!("--token-fd: cannot read descriptor {fd}: {e}"))?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms() {
        assert_eq!(
            "127.0.0.1:0".parse::<Listen>(),
            Ok(Listen::Tcp(SocketAddr::from(([127, 0, 0, 1], 0))))
        );
        assert_eq!(
            "unix:/run/x.sock".parse::<Listen>(),
            Ok(Listen::Unix(PathBuf::from("/run/x.sock")))
        );
        assert_eq!("fd:3".parse::<Listen>(), Ok(Listen::Fd(3)));
        for bad in ["fd:1", "fd:x", "unix:", "localhost", ""] {
            assert!(bad.parse::<Listen>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_closed_or_wrong_descriptor_is_refused() {
        // A number far above anything open.
        assert!(adopt(4000, rustix::fs::FileType::Socket).is_err());
        let file = tempfile::tempfile().expect("temp file");
        let n = std::os::fd::AsRawFd::as_raw_fd(&file);
        let e = adopt(n, rustix::fs::FileType::Socket).expect_err("a file is no socket");
        assert!(e.to_string().contains("not a"), "{e}");
    }
}
