//! The egress relay of a Docker sandbox. The container has no network but loopback
//! (`--network none`); the control plane serves the sandbox's egress proxy (the same
//! [`crate::sandbox::egress`] policy as a local sandbox's) on a unix socket in a host directory
//! bind-mounted into the container. Programs in the sandbox speak HTTP proxy to
//! `127.0.0.1:3128` (`HTTP(S)_PROXY`), and the runner copies each such connection, byte for
//! byte, to that socket: it decides nothing, the proxy on the host checks every destination.
//!
//! Hand-written (a copy loop per connection, [`tokio::io::copy_bidirectional`]): no crate does
//! "TCP in, unix socket out" as a library, and it is 60 lines.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::Semaphore;

/// Where the relay listens inside the sandbox (the local sandboxes' proxy address too).
pub const RELAY_LISTEN: &str = "127.0.0.1:3128";
/// Connections relayed at once; more are answered 503 (the proxy's own cap is the same).
pub const MAX_RELAYED: usize = 256;

/// A bound relay.
#[derive(Debug)]
pub struct Relay {
    listener: TcpListener,
    target: PathBuf,
}

/// Binds [`RELAY_LISTEN`]; `target` is the proxy's unix socket (connected per connection, so
/// a proxy that is served again after a control plane restart is found again).
pub async fn bind(target: PathBuf) -> std::io::Result<Relay> {
    Ok(Relay {
        listener: TcpListener::bind(RELAY_LISTEN).await?,
        target,
    })
}

impl Relay {
    /// Relays until the runner exits.
    pub async fn serve(self) {
        let slots = Arc::new(Semaphore::new(MAX_RELAYED));
        loop {
            let mut conn = match self.listener.accept().await {
                Ok((conn, _)) => conn,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                refuse(
                    &mut conn,
                    "503 Service Unavailable",
                    "egress_busy",
                    "too many connections through the sandbox's egress proxy",
                )
                .await;
                continue;
            };
            let target = self.target.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let _ = conn.set_nodelay(true);
                match UnixStream::connect(&target).await {
                    Ok(mut upstream) => {
                        let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
                    }
                    Err(e) => {
                        let message =
                            format!("the sandbox's egress proxy is not being served ({e})");
                        refuse(&mut conn, "502 Bad Gateway", "egress_unreachable", &message).await;
                    }
                }
            });
        }
    }
}

async fn refuse(conn: &mut TcpStream, status: &str, code: &str, message: &str) {
    let body = serde_json::json!({"error": code, "message": message}).to_string();
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.write_all(response.as_bytes())).await;
}
