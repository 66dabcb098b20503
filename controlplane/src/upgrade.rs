//! HTTP/1.1 upgrades to a runner: a port tunnel (`Upgrade: agentbox-tcp`), and any other
//! protocol a runner route switches to (a WebSocket). The proxy's pooled HTTP/2 connections
//! cannot carry an upgrade (h2c has no `101`), so each upgrade opens a connection of its own
//! through the same [`RunnerConnector`] (TCP or the runner's unix socket), sends one request
//! with the sandbox's runner token, and hands back the upgraded byte stream.
//!
//! [`receive_socket`] takes a socket the runner hands over on such a connection (a forwarded
//! port's connection, `Upgrade: agentbox-tcp-fd`), so the bytes of a preview go straight from
//! the sandbox's server to the control plane, not through the runner too.

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use axum::response::Response;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;

use crate::backend::Target;
use crate::connector::RunnerConnector;
use crate::error::{Error, Result};

/// What a runner answered to an upgrade request.
#[derive(Debug)]
pub enum Upgrade {
    /// `101`: the response's headers, and the connection as a byte stream (Tokio I/O).
    Switched(HeaderMap, TokioIo<Upgraded>),
    /// Any other answer (a JSON error, say), to pass on to the caller as it is.
    Refused(Response),
}

/// Opens an HTTP/1.1 connection to `target`'s runner, sends `GET path_and_query` with
/// `headers` (plus `Connection: upgrade` and the runner token) and returns the upgraded
/// stream, or the runner's answer when it did not switch protocols. `headers` must name the
/// protocol (`Upgrade: ...`) and whatever else it needs (`Sec-WebSocket-Key`, ...).
pub async fn open(
    connector: &RunnerConnector,
    target: &Target,
    path_and_query: &str,
    mut headers: HeaderMap,
) -> Result<Upgrade> {
    let authority = connector.authority(&target.addr);
    let uri: Uri = format!("http://{authority}{path_and_query}")
        .parse()
        .map_err(|e| Error::InvalidRequest(format!("bad path: {e}")))?;
    let io = tower::ServiceExt::oneshot(connector.clone(), uri)
        .await
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::TimedOut {
                Error::RunnerTimeout
            } else {
                Error::RunnerUnreachable(e.to_string())
            }
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| Error::RunnerUnreachable(e.to_string()))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "an upgraded runner connection failed");
        }
    });
    let bearer = HeaderValue::from_str(&format!("Bearer {}", target.token))
        .map_err(|_| Error::Internal("runner token is not a header value".into()))?;
    headers.insert(header::AUTHORIZATION, bearer);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(
        header::HOST,
        HeaderValue::from_str(&authority).unwrap_or(HeaderValue::from_static("runner")),
    );
    let mut request = Request::new(Body::empty());
    *request.method_mut() = Method::GET;
    *request.uri_mut() = Uri::builder()
        .path_and_query(path_and_query)
        .build()
        .map_err(|e| Error::InvalidRequest(format!("bad path: {e}")))?;
    *request.headers_mut() = headers;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| Error::RunnerUnreachable(e.to_string()))?;
    if response.status() == StatusCode::UNAUTHORIZED {
        tracing::error!(addr = %target.addr, "a runner refused its sandbox's runner token");
        return Err(Error::RunnerUnauthorized);
    }
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (mut parts, body) = response.into_parts();
        for name in ["connection", "keep-alive", "transfer-encoding", "upgrade"] {
            parts.headers.remove(name);
        }
        return Ok(Upgrade::Refused(Response::from_parts(
            parts,
            Body::new(body),
        )));
    }
    let headers = response.headers().clone();
    let upgraded = hyper::upgrade::on(response)
        .await
        .map_err(|e| Error::RunnerUnreachable(format!("the upgrade failed: {e}")))?;
    Ok(Upgrade::Switched(headers, TokioIo::new(upgraded)))
}

/// How long [`receive_socket`] waits for the runner's descriptor.
const HANDOFF_WAIT: Duration = Duration::from_secs(10);

/// Receives the socket a runner hands over after a `101` to `agentbox-tcp-fd` on its unix
/// socket: sends one byte (the runner waits for it, so that the HTTP client never reads the
/// descriptor's byte and loses the descriptor), then reads one byte with `SCM_RIGHTS`. Only a
/// connected TCP stream socket is taken; anything else the runner sends is closed, and the
/// call fails.
pub async fn receive_socket(io: TokioIo<Upgraded>) -> Result<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let parts = io
        .into_inner()
        .downcast::<crate::connector::RunnerIo>()
        .map_err(|_| Error::Internal("a handoff's connection is not a runner's".into()))?;
    if !parts.read_buf.is_empty() {
        return Err(Error::RunnerUnreachable(
            "the runner sent bytes before the handed-over socket".into(),
        ));
    }
    let mut unix = parts.io.into_unix().ok_or_else(|| {
        Error::Internal("a handoff needs the runner's unix socket, not TCP".into())
    })?;
    let received = tokio::time::timeout(HANDOFF_WAIT, async {
        unix.write_all(b"r").await?;
        loop {
            unix.readable().await?;
            match unix.try_io(tokio::io::Interest::READABLE, || receive_fd(&unix)) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                other => break other,
            }
        }
    })
    .await
    .map_err(|_| Error::RunnerTimeout)?
    .map_err(|e| Error::RunnerUnreachable(format!("the handoff of a port's socket: {e}")))?;
    let std = std::net::TcpStream::from(received);
    std.set_nonblocking(true)
        .and_then(|()| tokio::net::TcpStream::from_std(std))
        .inspect(|tcp| {
            let _ = tcp.set_nodelay(true);
        })
        .map_err(|e| Error::Internal(format!("a handed-over socket: {e}")))
}

/// One `recvmsg` of one byte and at most one descriptor, which must be a TCP stream socket.
fn receive_fd(unix: &tokio::net::UnixStream) -> std::io::Result<std::os::fd::OwnedFd> {
    use rustix::net::{
        recvmsg, sockopt, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags,
        ReturnFlags, SocketType,
    };
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    let msg = recvmsg(
        unix,
        &mut [std::io::IoSliceMut::new(&mut byte)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    if msg.bytes == 0 {
        return Err(std::io::Error::other("the runner closed the connection"));
    }
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    if msg.flags.contains(ReturnFlags::CTRUNC) || fds.len() != 1 {
        return Err(std::io::Error::other(format!(
            "expected one descriptor, got {}{}",
            fds.len(),
            if msg.flags.contains(ReturnFlags::CTRUNC) {
                " and more, cut"
            } else {
                ""
            }
        )));
    }
    let fd = fds.remove(0);
    let domain = sockopt::socket_domain(&fd)?;
    if sockopt::socket_type(&fd)? != SocketType::STREAM
        || !(domain == AddressFamily::INET || domain == AddressFamily::INET6)
    {
        return Err(std::io::Error::other("the descriptor is not a TCP socket"));
    }
    // A listening or unconnected socket has no peer.
    rustix::net::getpeername(&fd)?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, BorrowedFd};

    use super::*;

    /// Sends one byte carrying `fds` on `from` (what a runner, honest or not, may send).
    fn send_fds(from: &tokio::net::UnixStream, fds: &[BorrowedFd<'_>]) {
        use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() {
            assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
        }
        let sent = sendmsg(
            from,
            &[std::io::IoSlice::new(b"x")],
            &mut control,
            SendFlags::empty(),
        )
        .expect("sendmsg");
        assert_eq!(sent, 1);
    }

    /// How many descriptors of this process name what `fd` names (by device and inode; other
    /// tests of this process open descriptors too, so a plain count would not do).
    fn copies(fd: BorrowedFd<'_>) -> usize {
        use std::os::unix::fs::MetadataExt;
        let want = rustix::fs::fstat(fd).expect("fstat");
        std::fs::read_dir("/proc/self/fd")
            .expect("fds")
            .flatten()
            .filter(|e| {
                std::fs::metadata(e.path())
                    .is_ok_and(|m| m.dev() == want.st_dev as u64 && m.ino() == want.st_ino as u64)
            })
            .count()
    }

    #[tokio::test]
    async fn only_one_connected_tcp_socket_is_taken() {
        let (runner, cp) = tokio::net::UnixStream::pair().expect("pair");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (mut server, _) = listener.accept().expect("accept");

        // A connected TCP socket: taken, and it is the very connection.
        send_fds(&runner, &[client.as_fd()]);
        let fd = receive_fd(&cp).expect("a TCP socket is taken");
        let mut taken = std::net::TcpStream::from(fd);
        std::io::Write::write_all(&mut taken, b"ping").expect("write");
        let mut got = [0u8; 4];
        std::io::Read::read_exact(&mut server, &mut got).expect("read");
        assert_eq!(&got, b"ping");

        // Anything else is refused, and nothing received stays open.
        let file = tempfile::tempfile().expect("file");
        let (pipe_r, pipe_w) = rustix::pipe::pipe().expect("pipe");
        let cases: [(&str, Vec<BorrowedFd<'_>>); 5] = [
            ("a file", vec![file.as_fd()]),
            ("a pipe", vec![pipe_r.as_fd()]),
            ("a listening socket", vec![listener.as_fd()]),
            ("two sockets", vec![client.as_fd(), taken.as_fd()]),
            ("no descriptor", vec![]),
        ];
        for (what, fds) in cases {
            let before: Vec<usize> = fds.iter().map(|fd| copies(*fd)).collect();
            send_fds(&runner, &fds);
            let e = receive_fd(&cp).expect_err(what);
            assert!(!e.to_string().is_empty(), "{what}");
            let after: Vec<usize> = fds.iter().map(|fd| copies(*fd)).collect();
            assert_eq!(after, before, "{what}: a received descriptor stayed open");
        }
        drop((pipe_w, file));
        // The runner closed: an error, not a hang.
        drop(runner);
        assert!(receive_fd(&cp).is_err());
    }
}
