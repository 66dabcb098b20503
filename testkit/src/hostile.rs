//! Hostile clients for the abuse tests (issue 20): floods of idle and half-sent connections,
//! timed plain requests, and the open-file limit they need. Blocking std sockets, so the
//! client side costs no runtime and its timing is plain.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// A request head cut off before its end (no blank line).
pub const HALF_HEAD: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: agentbox\r\nX-Slow: ";

/// Raises this process's soft open-file limit towards `want` (up to the hard limit); returns
/// the soft limit now in force.
pub fn raise_nofile(want: u64) -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let cur = getrlimit(Resource::Nofile);
    let hard = cur.maximum.unwrap_or(u64::MAX);
    let soft = want.min(hard).max(cur.current.unwrap_or(0));
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(soft),
            maximum: cur.maximum,
        },
    );
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Opens `n` connections to `addr` and keeps them: every other one sends [`HALF_HEAD`], the
/// rest send nothing. Returns the open ones and how many could not connect within 1 s; stops
/// early after 10 failures in a row (a server that no longer accepts).
pub fn flood(addr: SocketAddr, n: usize) -> (Vec<TcpStream>, usize) {
    let mut open = Vec::with_capacity(n);
    let (mut failed, mut in_a_row) = (0, 0);
    for i in 0..n {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(mut s) => {
                in_a_row = 0;
                if i % 2 == 1 {
                    let _ = s.write_all(HALF_HEAD);
                }
                open.push(s);
            }
            Err(_) => {
                failed += 1;
                in_a_row += 1;
                if in_a_row == 10 {
                    break;
                }
            }
        }
    }
    (open, failed)
}

/// `GET path` on a fresh connection: the time until the whole response head (status 200)
/// arrived, or why not within `limit`.
pub fn timed_get(addr: SocketAddr, path: &str, limit: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, limit).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(limit)).map_err(|e| e.to_string())?;
    let _ = s.set_nodelay(true);
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: agentbox\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) => return Err(format!("closed after {head:?}")),
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("read after {:?}: {e}", started.elapsed())),
        }
    }
    if !head.starts_with(b"HTTP/1.1 200") {
        return Err(format!("answer {:?}", String::from_utf8_lossy(&head)));
    }
    Ok(started.elapsed())
}

/// Connects, writes `send`, and waits (up to `limit`) for the server to close the connection:
/// the time it took, or `None` when it was still open at `limit`. Whatever the server sends
/// before closing (a response to a complete request) is read and ignored.
pub fn closed_after(addr: SocketAddr, send: &[u8], limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, limit).ok()?;
    s.write_all(send).ok()?;
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.checked_sub(started.elapsed())?;
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .ok()?;
        match s.read(&mut buf) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Some(started.elapsed())
            }
            Err(_) => return None,
        }
    }
}
