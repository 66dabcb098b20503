//! How the proxy reaches a runner: TCP (Docker containers, Kubernetes pods, unisolated local
//! runners) or a unix socket (isolated local sandboxes, whose runner lives in a network
//! namespace of its own: the launcher binds the socket on the host before the sandbox exists).
//!
//! hyper's client pools connections by the URI's authority, so a unix socket is named in the
//! URI by a short key (`unix-<16 hex digits of its path's SHA-256>`) that this connector maps
//! back to the path.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::net::{TcpStream, UnixStream};
use tokio_util::either::Either;

/// Where a runner listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RunnerAddr {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A unix socket on this machine.
    Unix {
        /// Its path.
        unix: PathBuf,
    },
}

impl RunnerAddr {
    /// A unix socket address.
    pub fn unix(path: PathBuf) -> Self {
        RunnerAddr::Unix { unix: path }
    }

    /// The URI authority naming it.
    pub fn authority(&self) -> String {
        match self {
            RunnerAddr::Tcp(addr) => addr.to_string(),
            RunnerAddr::Unix { unix } => {
                let digest = Sha256::digest(unix.as_os_str().as_encoded_bytes());
                format!("unix-{}", hex::encode(&digest[..8]))
            }
        }
    }
}

impl fmt::Display for RunnerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunnerAddr::Tcp(addr) => write!(f, "{addr}"),
            RunnerAddr::Unix { unix } => write!(f, "unix:{}", unix.display()),
        }
    }
}

/// A connection to a runner.
#[derive(Debug)]
pub struct RunnerIo(TokioIo<Either<TcpStream, UnixStream>>);

impl RunnerIo {
    /// The unix socket under it, if it is one.
    pub fn into_unix(self) -> Option<UnixStream> {
        match self.0.into_inner() {
            Either::Left(_) => None,
            Either::Right(unix) => Some(unix),
        }
    }
}

impl Connection for RunnerIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for RunnerIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for RunnerIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Connects by a URI's authority: `unix-<key>` to a registered socket path, anything else by
/// TCP (no delay: events are small writes).
#[derive(Debug, Clone)]
pub struct RunnerConnector {
    unix: Arc<Mutex<HashMap<String, PathBuf>>>,
    timeout: Duration,
}

impl RunnerConnector {
    /// A connector whose connects time out after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self {
            unix: Arc::default(),
            timeout,
        }
    }

    /// The authority to put in a URI for `addr` (a unix path is remembered under it).
    pub fn authority(&self, addr: &RunnerAddr) -> String {
        let key = addr.authority();
        if let RunnerAddr::Unix { unix } = addr {
            let mut map = self.unix.lock().unwrap_or_else(|p| p.into_inner());
            if map.get(&key) != Some(unix) {
                map.insert(key.clone(), unix.clone());
            }
        }
        key
    }
}

impl tower::Service<Uri> for RunnerConnector {
    type Response = RunnerIo;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<RunnerIo>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default();
        let unix = authority.strip_prefix("unix-").and_then(|_| {
            let map = self.unix.lock().unwrap_or_else(|p| p.into_inner());
            map.get(&authority).cloned()
        });
        let timeout = self.timeout;
        Box::pin(async move {
            let timed_out =
                || std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out");
            let io = match unix {
                Some(path) => Either::Right(
                    tokio::time::timeout(timeout, UnixStream::connect(&path))
                        .await
                        .map_err(|_| timed_out())??,
                ),
                None => {
                    let tcp = tokio::time::timeout(timeout, TcpStream::connect(authority.as_str()))
                        .await
                        .map_err(|_| timed_out())??;
                    let _ = tcp.set_nodelay(true);
                    Either::Left(tcp)
                }
            };
            Ok(RunnerIo(TokioIo::new(io)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_of_either_kind_read_back() {
        // A record written before unix sockets: a plain address string.
        let old: RunnerAddr = serde_json::from_str(r#""127.0.0.1:8421""#).expect("tcp");
        assert_eq!(
            old,
            RunnerAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 8421)))
        );
        let unix = RunnerAddr::unix(PathBuf::from("/state/sandboxes/a/runner.sock"));
        let text = serde_json::to_string(&unix).expect("json");
        assert_eq!(text, r#"{"unix":"/state/sandboxes/a/runner.sock"}"#);
        assert_eq!(
            serde_json::from_str::<RunnerAddr>(&text).expect("unix"),
            unix
        );
        assert!(unix.authority().starts_with("unix-") && unix.authority().len() == 21);
        assert_eq!(old.authority(), "127.0.0.1:8421");
    }

    #[tokio::test]
    async fn connects_to_a_registered_socket_and_refuses_an_unknown_key() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("r.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let mut connector = RunnerConnector::new(Duration::from_secs(2));
        let authority = connector.authority(&RunnerAddr::unix(path));
        let uri: Uri = format!("http://{authority}/healthz").parse().expect("uri");
        let (io, accepted) =
            tokio::join!(tower::Service::call(&mut connector, uri), listener.accept());
        assert!(io.is_ok() && accepted.is_ok());
        // A key nobody registered is not a host name to resolve.
        let uri: Uri = "http://unix-0123456789abcdef/x".parse().expect("uri");
        assert!(tower::Service::call(&mut connector, uri).await.is_err());
    }
}
