//! The egress proxy: the only way out of a local sandbox's network namespace. It listens on
//! `127.0.0.1:3128` inside the sandbox (the socket is bound there by the init stage and handed
//! to the launcher), and the launcher, on the host's network, serves it: `CONNECT host:port`
//! (HTTPS and any TCP) and absolute-form HTTP requests (`GET http://host/…`), each checked by
//! name and by resolved address against the template's policy before any packet leaves.
//!
//! Never reachable, whatever the policy: loopback (the control plane, sibling runners),
//! link-local (169.254.0.0/16 with cloud metadata, fe80::/10), unspecified, multicast and
//! broadcast addresses. Private ranges (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7) only
//! when an allowlist entry names them as an address or CIDR. A connection goes to the address
//! that was checked (no second resolution).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Connections the proxy holds at once per sandbox; more are answered 503.
pub const MAX_CONNECTIONS: usize = 256;
/// Longest request head read from the sandbox.
const MAX_HEAD: usize = 16 << 10;
/// Time for the sandbox to send a request head, and for a connect to the destination.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a sandbox may connect: `"none"`, `"all"` (the public internet; the default) or a list
/// of host names (`pypi.org`, `*.pythonhosted.org` for any subdomain) and addresses or CIDRs
/// (`10.20.0.0/16`, which is also how a private address is let through).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Egress {
    /// `"none"` or `"all"`.
    Mode(EgressMode),
    /// An allowlist.
    Allow(Vec<String>),
}

/// The two keywords.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EgressMode {
    /// Nothing leaves.
    None,
    /// Any public address.
    All,
}

impl Default for Egress {
    fn default() -> Self {
        Egress::Mode(EgressMode::All)
    }
}

impl Egress {
    /// Checks an allowlist's entries (a name, `*.suffix`, an address or a CIDR).
    pub fn validate(&self) -> Result<(), String> {
        if let Egress::Allow(entries) = self {
            for e in entries {
                Entry::parse(e)?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Name(String),
    Suffix(String),
    Net(IpAddr, u8),
}

impl Entry {
    fn parse(text: &str) -> Result<Self, String> {
        let bad = || {
            format!("egress entry {text:?}: expected a host name, *.domain, an address or a CIDR")
        };
        let t = text.trim().to_ascii_lowercase();
        if t.is_empty() || t.len() > 253 {
            return Err(bad());
        }
        if let Some((addr, len)) = t.split_once('/') {
            let addr: IpAddr = addr.parse().map_err(|_| bad())?;
            let len: u8 = len.parse().map_err(|_| bad())?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            if len > max {
                return Err(bad());
            }
            return Ok(Entry::Net(addr, len));
        }
        if let Ok(addr) = t.parse::<IpAddr>() {
            return Ok(Entry::Net(addr, if addr.is_ipv4() { 32 } else { 128 }));
        }
        let (suffix, name) = match t.strip_prefix("*.") {
            Some(rest) => (true, rest.to_owned()),
            None => (false, t.clone()),
        };
        let ok = name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
        if !ok {
            return Err(bad());
        }
        Ok(if suffix {
            Entry::Suffix(name)
        } else {
            Entry::Name(name)
        })
    }

    fn covers(&self, addr: IpAddr) -> bool {
        let Entry::Net(net, len) = self else {
            return false;
        };
        match (normalize(*net), normalize(addr)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if *len == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(*len).min(32))
                };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if *len == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(*len).min(128))
                };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }

    fn names(&self, host: &str) -> bool {
        match self {
            Entry::Name(n) => n == host,
            Entry::Suffix(s) => {
                host.len() > s.len() + 1
                    && host.ends_with(s.as_str())
                    && host.as_bytes()[host.len() - s.len() - 1] == b'.'
            }
            Entry::Net(..) => false,
        }
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn normalize(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(addr),
        v4 => v4,
    }
}

/// What kind of address, for the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Loopback, link-local, unspecified, multicast, broadcast: never.
    Forbidden,
    /// Private ranges: only by an explicit address or CIDR entry.
    Private,
    Public,
}

fn classify(addr: IpAddr) -> Class {
    match normalize(addr) {
        IpAddr::V4(a) => {
            let o = a.octets();
            if a.is_loopback()
                || a.is_link_local()
                || a.is_unspecified()
                || a.is_multicast()
                || a.is_broadcast()
                || o[0] == 0
            {
                Class::Forbidden
            } else if a.is_private()
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
                || o[0] >= 240
            {
                Class::Private
            } else {
                Class::Public
            }
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            if a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || (s[0] & 0xffc0) == 0xfe80
            {
                Class::Forbidden
            } else if (s[0] & 0xfe00) == 0xfc00 || (s[0] & 0xffc0) == 0xfec0 {
                Class::Private
            } else {
                Class::Public
            }
        }
    }
}

/// The policy, compiled.
#[derive(Debug, Clone)]
pub struct Policy {
    mode: Option<EgressMode>,
    entries: Vec<Entry>,
    hosts: BTreeMap<String, IpAddr>,
}

impl Policy {
    /// Compiles `egress` with the extra host names.
    pub fn new(egress: &Egress, hosts: &BTreeMap<String, IpAddr>) -> Result<Self, String> {
        let (mode, entries) = match egress {
            Egress::Mode(m) => (Some(*m), Vec::new()),
            Egress::Allow(list) => (
                None,
                list.iter()
                    .map(|e| Entry::parse(e))
                    .collect::<Result<_, _>>()?,
            ),
        };
        let hosts = hosts
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), *v))
            .collect();
        Ok(Policy {
            mode,
            entries,
            hosts,
        })
    }

    /// Whether `host` (a name or an address literal) may be asked for at all.
    fn name_allowed(&self, host: &str) -> Result<(), String> {
        match self.mode {
            Some(EgressMode::None) => Err("egress is \"none\" for this sandbox".into()),
            Some(EgressMode::All) => Ok(()),
            None => {
                if host.parse::<IpAddr>().is_ok() || self.entries.iter().any(|e| e.names(host)) {
                    Ok(())
                } else {
                    Err(format!("{host} is not in the sandbox's egress allowlist"))
                }
            }
        }
    }

    /// Whether `addr`, which `host` resolved to, may be connected to.
    fn addr_allowed(&self, host: &str, addr: IpAddr) -> Result<(), String> {
        let explicit = self.entries.iter().any(|e| e.covers(addr));
        match classify(addr) {
            Class::Forbidden => Err(format!(
                "{host} resolves to {addr}, a loopback, link-local or otherwise reserved address"
            )),
            Class::Private if explicit => Ok(()),
            Class::Private => Err(format!(
                "{host} resolves to {addr}, a private address not named in the egress allowlist"
            )),
            Class::Public => match self.mode {
                Some(_) => Ok(()),
                // An address literal needs an address entry; a name was checked by name.
                None if host.parse::<IpAddr>().is_ok() && !explicit => {
                    Err(format!("{host} is not in the sandbox's egress allowlist"))
                }
                None => Ok(()),
            },
        }
    }

    /// Resolves `host:port` and picks the first address the policy allows.
    fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, Refusal> {
        self.name_allowed(host).map_err(Refusal::Denied)?;
        let addrs: Vec<SocketAddr> = if let Some(ip) = self.hosts.get(host) {
            vec![SocketAddr::new(*ip, port)]
        } else if let Ok(ip) = host.parse::<IpAddr>() {
            vec![SocketAddr::new(ip, port)]
        } else {
            (host, port)
                .to_socket_addrs()
                .map_err(|e| Refusal::Unreachable(format!("cannot resolve {host}: {e}")))?
                .collect()
        };
        let mut first_refusal = None;
        let allowed: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(|a| match self.addr_allowed(host, a.ip()) {
                Ok(()) => true,
                Err(e) => {
                    first_refusal.get_or_insert(e);
                    false
                }
            })
            .collect();
        if allowed.is_empty() {
            return Err(first_refusal
                .map(Refusal::Denied)
                .unwrap_or_else(|| Refusal::Unreachable(format!("{host} has no address"))));
        }
        Ok(allowed)
    }
}

#[derive(Debug)]
enum Refusal {
    Denied(String),
    Unreachable(String),
    Bad(String),
    Busy,
}

impl Refusal {
    fn write_to(&self, out: &mut impl Write) {
        let (status, code, message) = match self {
            Refusal::Denied(m) => ("403 Forbidden", "egress_denied", m.as_str()),
            Refusal::Unreachable(m) => ("502 Bad Gateway", "egress_unreachable", m.as_str()),
            Refusal::Bad(m) => ("400 Bad Request", "invalid_request", m.as_str()),
            Refusal::Busy => (
                "503 Service Unavailable",
                "egress_busy",
                "too many connections through the sandbox's egress proxy",
            ),
        };
        let body = serde_json::json!({"error": code, "message": message}).to_string();
        // One write: a client reading the status line gets it whole.
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = out.write_all(response.as_bytes());
    }
}

/// Counters of one proxy (for the log).
#[derive(Debug, Default)]
struct Stats {
    active: AtomicUsize,
    refused: AtomicU64,
    logged_second: AtomicU64,
    logged_in_second: AtomicU64,
}

impl Stats {
    /// At most 5 refusal lines a second reach the log (a sandbox could otherwise fill it).
    fn log_refusal(&self, started: Instant, label: &str, what: &str) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        let second = started.elapsed().as_secs();
        if self.logged_second.swap(second, Ordering::Relaxed) != second {
            self.logged_in_second.store(0, Ordering::Relaxed);
        }
        if self.logged_in_second.fetch_add(1, Ordering::Relaxed) < 5 {
            eprintln!(
                "{label}: egress refused: {what} ({} refused so far)",
                self.refused.load(Ordering::Relaxed)
            );
        }
    }
}

/// A connection from the sandbox: TCP (a local sandbox's proxy listens in its network
/// namespace) or a unix socket (a Docker sandbox's runner relays to one on the host).
pub trait Client: Read + Write + Send + Sized + 'static {
    /// [`TcpStream::set_read_timeout`].
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()>;
    /// [`TcpStream::try_clone`].
    fn try_clone(&self) -> std::io::Result<Self>;
    /// [`TcpStream::shutdown`].
    fn shutdown(&self, how: Shutdown) -> std::io::Result<()>;
}

impl Client for TcpStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
    fn try_clone(&self) -> std::io::Result<Self> {
        TcpStream::try_clone(self)
    }
    fn shutdown(&self, how: Shutdown) -> std::io::Result<()> {
        TcpStream::shutdown(self, how)
    }
}

impl Client for UnixStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
    fn try_clone(&self) -> std::io::Result<Self> {
        UnixStream::try_clone(self)
    }
    fn shutdown(&self, how: Shutdown) -> std::io::Result<()> {
        UnixStream::shutdown(self, how)
    }
}

/// One sandbox's proxy: its policy and its counters, shared by its connections.
#[derive(Debug)]
pub struct Proxy {
    policy: Policy,
    stats: Stats,
    started: Instant,
    label: String,
}

impl Proxy {
    /// A proxy applying `policy`; `label` names it in refusal log lines.
    pub fn new(policy: Policy, label: impl Into<String>) -> Arc<Self> {
        Arc::new(Proxy {
            policy,
            stats: Stats::default(),
            started: Instant::now(),
            label: label.into(),
        })
    }

    /// Serves `conn` on a thread of its own; answers 503 when [`MAX_CONNECTIONS`] are open.
    pub fn spawn<C: Client>(self: &Arc<Self>, mut conn: C) {
        if self.stats.active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            self.stats.active.fetch_sub(1, Ordering::AcqRel);
            Refusal::Busy.write_to(&mut conn);
            return;
        }
        let proxy = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .stack_size(128 << 10)
            .spawn(move || {
                handle(conn, &proxy);
                proxy.stats.active.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            self.stats.active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Serves `listener` until the process exits: one thread per connection (two while a tunnel
/// is open), at most [`MAX_CONNECTIONS`] at once.
pub fn serve(listener: TcpListener, policy: Policy) {
    let proxy = Proxy::new(policy, "agentbox-runner sandbox");
    for conn in listener.incoming() {
        let Ok(conn) = conn else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        proxy.spawn(conn);
    }
}

fn handle<C: Client>(mut client: C, proxy: &Proxy) {
    let (policy, stats, started) = (&proxy.policy, &proxy.stats, proxy.started);
    let _ = client.set_read_timeout(Some(HEAD_TIMEOUT));
    let (head, rest) = match read_head(&mut client) {
        Ok(x) => x,
        Err(r) => {
            r.write_to(&mut client);
            return;
        }
    };
    let request = match Request::parse(&head) {
        Ok(r) => r,
        Err(r) => {
            r.write_to(&mut client);
            return;
        }
    };
    let addrs = match policy.resolve(&request.host, request.port) {
        Ok(a) => a,
        Err(r) => {
            if let Refusal::Denied(m) = &r {
                stats.log_refusal(started, &proxy.label, m);
            }
            r.write_to(&mut client);
            return;
        }
    };
    let mut upstream = None;
    let mut last_error = String::new();
    for addr in &addrs {
        match TcpStream::connect_timeout(addr, CONNECT_TIMEOUT) {
            Ok(s) => {
                upstream = Some(s);
                break;
            }
            Err(e) => {
                last_error = format!(
                    "cannot connect to {}:{} ({addr}): {e}",
                    request.host, request.port
                )
            }
        }
    }
    let Some(mut upstream) = upstream else {
        Refusal::Unreachable(last_error).write_to(&mut client);
        return;
    };
    let _ = client.set_read_timeout(None);
    let _ = upstream.set_nodelay(true);
    if request.connect {
        if client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .is_err()
        {
            return;
        }
    } else if upstream.write_all(&request.forward_head).is_err() {
        return;
    }
    if !rest.is_empty() && upstream.write_all(&rest).is_err() {
        return;
    }
    splice(client, upstream);
}

/// Copies both ways until both directions are closed.
fn splice<C: Client>(client: C, upstream: TcpStream) {
    let (Ok(client2), Ok(upstream2)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    let back = std::thread::Builder::new()
        .stack_size(64 << 10)
        .spawn(move || {
            copy_then_close(upstream2, client2);
        });
    copy_then_close(client, upstream);
    if let Ok(back) = back {
        let _ = back.join();
    }
}

fn copy_then_close<F: Client, T: Client>(mut from: F, mut to: T) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

/// Reads up to the end of the request head; returns it and whatever followed it.
fn read_head(client: &mut impl Read) -> Result<(Vec<u8>, Vec<u8>), Refusal> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = client
            .read(&mut chunk)
            .map_err(|e| Refusal::Bad(format!("reading the request: {e}")))?;
        if n == 0 {
            return Err(Refusal::Bad(
                "the connection closed before a request".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = memchr::memmem::find(&buf, b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((buf, rest));
        }
        if buf.len() > MAX_HEAD {
            return Err(Refusal::Bad(format!("request head over {MAX_HEAD} bytes")));
        }
    }
}

#[derive(Debug)]
struct Request {
    connect: bool,
    host: String,
    port: u16,
    /// For a plain HTTP request: its head rewritten to origin form, `Connection: close`.
    forward_head: Vec<u8>,
}

impl Request {
    fn parse(head: &[u8]) -> Result<Self, Refusal> {
        let text = std::str::from_utf8(head)
            .map_err(|_| Refusal::Bad("the request head is not UTF-8".into()))?;
        let mut lines = text.split("\r\n");
        let first = lines.next().unwrap_or_default();
        let mut parts = first.split(' ');
        let (Some(method), Some(target), Some(version), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Refusal::Bad(format!("bad request line {first:?}")));
        };
        if !version.starts_with("HTTP/1.") {
            return Err(Refusal::Bad(format!("unsupported version {version:?}")));
        }
        if method == "CONNECT" {
            let (host, port) = split_host_port(target, None)?;
            return Ok(Request {
                connect: true,
                host,
                port,
                forward_head: Vec::new(),
            });
        }
        let Some(rest) = target.strip_prefix("http://") else {
            return Err(Refusal::Bad(
                "the egress proxy takes CONNECT or an absolute http:// URL (set HTTPS_PROXY/HTTP_PROXY)".into(),
            ));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = split_host_port(authority, Some(80))?;
        let mut forward = format!("{method} {path} {version}\r\n");
        for line in lines.filter(|l| !l.is_empty()) {
            let name = line
                .split(':')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase();
            if matches!(
                name.as_str(),
                "proxy-connection" | "proxy-authorization" | "connection" | "keep-alive"
            ) {
                continue;
            }
            forward.push_str(line);
            forward.push_str("\r\n");
        }
        forward.push_str("Connection: close\r\n\r\n");
        Ok(Request {
            connect: false,
            host,
            port,
            forward_head: forward.into_bytes(),
        })
    }
}

fn split_host_port(authority: &str, default_port: Option<u16>) -> Result<(String, u16), Refusal> {
    let bad = || Refusal::Bad(format!("bad host {authority:?}"));
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or_else(bad)?;
        (h, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        Some(p) => p.parse::<u16>().map_err(|_| bad())?,
        None => default_port.ok_or_else(bad)?,
    };
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok((host.to_ascii_lowercase(), port))
}

/// Whether an address is never reachable from a sandbox (for tests and the docs).
pub fn is_forbidden(addr: IpAddr) -> bool {
    classify(addr) == Class::Forbidden
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(egress: Egress) -> Policy {
        Policy::new(&egress, &BTreeMap::new()).expect("policy")
    }

    #[test]
    fn reserved_addresses_are_never_reached() {
        let all = policy(Egress::Mode(EgressMode::All));
        for a in [
            "127.0.0.1",
            "169.254.169.254",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "224.0.0.1",
        ] {
            let ip: IpAddr = a.parse().expect("ip");
            assert!(all.addr_allowed(a, ip).is_err(), "{a}");
        }
        let listed = policy(Egress::Allow(vec![
            "127.0.0.0/8".into(),
            "169.254.0.0/16".into(),
        ]));
        assert!(listed
            .addr_allowed("x", "127.0.0.1".parse().expect("ip"))
            .is_err());
        assert!(listed
            .addr_allowed("x", "169.254.169.254".parse().expect("ip"))
            .is_err());
    }

    #[test]
    fn private_ranges_only_by_an_address_entry() {
        let all = policy(Egress::Mode(EgressMode::All));
        for a in [
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "fd00::1",
        ] {
            assert!(all.addr_allowed(a, a.parse().expect("ip")).is_err(), "{a}");
        }
        assert!(all
            .addr_allowed("x", "93.184.216.34".parse().expect("ip"))
            .is_ok());
        let listed = policy(Egress::Allow(vec![
            "pypi.test".into(),
            "10.9.0.0/16".into(),
        ]));
        assert!(listed
            .addr_allowed("pypi.test", "10.9.1.2".parse().expect("ip"))
            .is_ok());
        assert!(listed
            .addr_allowed("pypi.test", "10.8.1.2".parse().expect("ip"))
            .is_err());
    }

    #[test]
    fn names_by_allowlist() {
        let listed = policy(Egress::Allow(vec![
            "pypi.org".into(),
            "*.pythonhosted.org".into(),
        ]));
        assert!(listed.name_allowed("pypi.org").is_ok());
        assert!(listed.name_allowed("files.pythonhosted.org").is_ok());
        assert!(listed.name_allowed("pythonhosted.org").is_err());
        assert!(listed.name_allowed("evilpythonhosted.org").is_err());
        assert!(listed.name_allowed("example.com").is_err());
        let none = policy(Egress::Mode(EgressMode::None));
        assert!(none.name_allowed("pypi.org").is_err());
        assert!(Egress::Allow(vec!["bad name".into()]).validate().is_err());
        assert!(Egress::Allow(vec!["10.0.0.0/33".into()])
            .validate()
            .is_err());
    }

    #[test]
    fn requests_parse() {
        let r = Request::parse(b"CONNECT pypi.org:443 HTTP/1.1\r\nHost: pypi.org\r\n\r\n")
            .expect("connect");
        assert!(r.connect);
        assert_eq!((r.host.as_str(), r.port), ("pypi.org", 443));
        let r = Request::parse(b"GET http://10.0.0.1:8080/simple/ HTTP/1.1\r\nHost: x\r\nProxy-Connection: keep-alive\r\n\r\n").expect("get");
        assert!(!r.connect);
        assert_eq!(r.port, 8080);
        let head = String::from_utf8(r.forward_head).expect("utf8");
        assert_eq!(
            head,
            "GET /simple/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        );
        assert!(Request::parse(b"GET /x HTTP/1.1\r\n\r\n").is_err());
        assert!(Request::parse(b"CONNECT [::1]:443 HTTP/1.1\r\n\r\n").is_ok());
    }
}
