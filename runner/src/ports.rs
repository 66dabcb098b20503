//! Forwarded ports: the table of ports of the sandbox that may be reached from outside, and
//! the connections to them. The runner lives in the sandbox's network namespace (the local
//! backend's own netns, the container, the pod), so it is what reaches `127.0.0.1:PORT`; the
//! control plane's preview proxy and `agentbox port-forward` go through its tunnel route.
//!
//! The table is persisted in `<state>/ports.json` (rewritten atomically on every change), so a
//! restarted runner keeps it. Bounds: at most [`MAX_PORTS`] forwarded ports and
//! [`MAX_TUNNELS`] open tunnels at a time (each holds two sockets and a task).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentbox_proto::ForwardedPort;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{Error, Result};
use crate::fsutil;

/// Most ports forwarded at once.
pub const MAX_PORTS: usize = 64;
/// Most tunnels open at once (preview requests and `port-forward` connections together).
pub const MAX_TUNNELS: usize = 256;
/// How long a connect to a forwarded port may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The protocols a port may be forwarded as.
pub const PROTOCOLS: &[&str] = &["http", "tcp"];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Entry {
    protocol: String,
    created_at: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Stored {
    ports: BTreeMap<u16, Entry>,
}

/// The forwarded ports and the tunnel cap.
#[derive(Debug)]
pub struct Ports {
    path: PathBuf,
    table: Mutex<BTreeMap<u16, Entry>>,
    tunnels: Arc<Semaphore>,
}

/// An open connection to a forwarded port, holding one of the [`MAX_TUNNELS`] places.
#[derive(Debug)]
pub struct Tunnel {
    /// The connection to the port.
    pub stream: TcpStream,
    /// Released when the tunnel ends.
    pub permit: OwnedSemaphorePermit,
}

/// Checks a port number from a request: 1–65535.
pub fn check_port(port: i64) -> Result<u16> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| Error::InvalidPort(format!("port {port} is outside 1-65535")))
}

/// Parses a port from a path segment: 1–65535.
pub fn parse_port(text: &str) -> Result<u16> {
    match text.parse::<i64>() {
        Ok(n) if text.bytes().all(|b| b.is_ascii_digit()) => check_port(n),
        _ => Err(Error::InvalidPort(format!(
            "port {text:?} is not a number in 1-65535"
        ))),
    }
}

impl Ports {
    /// Loads `<state_dir>/ports.json` (an unreadable or absent file is an empty table).
    pub fn load(state_dir: &std::path::Path) -> Self {
        let path = state_dir.join("ports.json");
        let stored: Stored = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Self {
            path,
            table: Mutex::new(stored.ports),
            tunnels: Arc::new(Semaphore::new(MAX_TUNNELS)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u16, Entry>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, table: &BTreeMap<u16, Entry>) -> Result<()> {
        let bytes = serde_json::to_vec(&Stored {
            ports: table.clone(),
        })
        .map_err(|e| Error::Internal(e.to_string()))?;
        fsutil::write_atomic(&self.path, &bytes, 0o600)
            .map_err(|e| Error::Internal(format!("cannot save the port table: {e}")))
    }

    /// The forwarded ports, by number.
    pub fn list(&self) -> Vec<ForwardedPort> {
        self.lock().iter().map(|(p, e)| wire(*p, e)).collect()
    }

    /// Forwards `port` as `protocol` (default `http`). Returns it and whether it is new; a
    /// port already forwarded keeps its entry, with the protocol updated.
    pub fn add(&self, port: i64, protocol: Option<&str>) -> Result<(ForwardedPort, bool)> {
        let port = check_port(port)?;
        let protocol = protocol.unwrap_or("http").to_ascii_lowercase();
        if !PROTOCOLS.contains(&protocol.as_str()) {
            return Err(Error::InvalidRequest(format!(
                "protocol {protocol:?} is not one of {PROTOCOLS:?}"
            )));
        }
        let mut table = self.lock();
        if let Some(entry) = table.get(&port) {
            if entry.protocol == protocol {
                return Ok((wire(port, entry), false));
            }
        } else if table.len() >= MAX_PORTS {
            return Err(Error::TooManyPorts(format!(
                "{MAX_PORTS} ports are forwarded, the limit; remove one first"
            )));
        }
        let mut next = table.clone();
        let created_at = table
            .get(&port)
            .map(|e| e.created_at.clone())
            .unwrap_or_else(fsutil::now_rfc3339);
        let fresh = !table.contains_key(&port);
        next.insert(
            port,
            Entry {
                protocol,
                created_at,
            },
        );
        self.save(&next)?;
        *table = next;
        Ok((wire(port, &table[&port]), fresh))
    }

    /// Stops forwarding `port` (open tunnels stay until they end).
    pub fn remove(&self, port: u16) -> Result<()> {
        let mut table = self.lock();
        if !table.contains_key(&port) {
            return Err(not_forwarded(port));
        }
        let mut next = table.clone();
        next.remove(&port);
        self.save(&next)?;
        *table = next;
        Ok(())
    }

    /// Connects to forwarded `port` on 127.0.0.1, or ::1 when that refuses.
    pub async fn connect(&self, port: u16) -> Result<Tunnel> {
        if !self.lock().contains_key(&port) {
            return Err(not_forwarded(port));
        }
        let permit = Arc::clone(&self.tunnels).try_acquire_owned().map_err(|_| {
            Error::TooManyTunnels(format!(
                "{MAX_TUNNELS} tunnels are open, the limit; retry later"
            ))
        })?;
        let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
        let mut last = None;
        for addr in [v4, v6] {
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(Tunnel { stream, permit });
                }
                Ok(Err(e)) => last = Some(e.to_string()),
                Err(_) => last = Some("connect timed out".into()),
            }
        }
        Err(Error::PortUnreachable(format!(
            "nothing accepts connections on port {port} in the sandbox (127.0.0.1 and ::1): {}",
            last.unwrap_or_default()
        )))
    }
}

fn not_forwarded(port: u16) -> Error {
    Error::PortNotForwarded(format!(
        "port {port} is not forwarded; POST /v1/ports {{\"port\": {port}}} first"
    ))
}

fn wire(port: u16, entry: &Entry) -> ForwardedPort {
    let scheme = if entry.protocol == "tcp" {
        "tcp"
    } else {
        "http"
    };
    ForwardedPort {
        port,
        protocol: entry.protocol.clone(),
        preview_url: None,
        internal_url: Some(format!("{scheme}://127.0.0.1:{port}")),
        created_at: Some(entry.created_at.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_checked_and_the_table_survives_a_reload() {
        assert!(check_port(0).is_err());
        assert!(check_port(65_536).is_err());
        assert!(check_port(-1).is_err());
        assert_eq!(check_port(65_535).ok(), Some(65_535));
        assert!(parse_port("+80").is_err());
        assert!(parse_port("8o").is_err());
        assert_eq!(parse_port("8080").ok(), Some(8080));
        let dir = tempfile::tempdir().expect("dir");
        let ports = Ports::load(dir.path());
        let (p, fresh) = ports.add(8080, None).expect("add");
        assert!(fresh && p.protocol == "http");
        assert!(!ports.add(8080, Some("http")).expect("again").1);
        ports.add(9000, Some("TCP")).expect("tcp");
        assert!(matches!(
            ports.add(1, Some("udp")),
            Err(Error::InvalidRequest(_))
        ));
        let again = Ports::load(dir.path());
        let listed: Vec<(u16, String)> = again
            .list()
            .into_iter()
            .map(|p| (p.port, p.protocol))
            .collect();
        assert_eq!(listed, vec![(8080, "http".into()), (9000, "tcp".into())]);
        again.remove(8080).expect("remove");
        assert!(matches!(
            again.remove(8080),
            Err(Error::PortNotForwarded(_))
        ));
        assert_eq!(Ports::load(dir.path()).list().len(), 1);
        for n in 0..MAX_PORTS as i64 {
            let _ = again.add(20_000 + n, None);
        }
        assert!(matches!(
            again.add(30_000, None),
            Err(Error::TooManyPorts(_))
        ));
    }
}
