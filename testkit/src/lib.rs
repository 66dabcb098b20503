//! Support for agentbox's tests and benchmarks: SSE parsing and exact output rebuilding
//! ([`sse`]), a minimal HTTP/1.1 client over one keep-alive `TcpStream` (so figures are the
//! servers', not an HTTP library's) and percentile summaries.
#![allow(missing_docs, clippy::unwrap_used)]

pub mod hostile;
pub mod sse;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

/// Read buffer of the client.
pub const READ_SIZE: usize = 256 << 10;

/// A minimal HTTP/1.1 client: one keep-alive connection, Content-Length requests, chunked or
/// Content-Length responses handed to a sink without copies beyond the socket buffer.
pub struct Http {
    conn: BufReader<TcpStream>,
    host: String,
    /// A whole header line, e.g. `Authorization: Bearer T` or `X-API-Key: K`.
    auth: String,
    line: Vec<u8>,
}

impl Http {
    pub fn connect(addr: SocketAddr, auth: &str) -> Http {
        let stream = TcpStream::connect(addr).expect("connect to the runner");
        Http::over(stream, auth)
    }

    /// Over a connection made elsewhere (in another network namespace, say).
    pub fn over(stream: TcpStream, auth: &str) -> Http {
        stream.set_nodelay(true).expect("TCP_NODELAY");
        let host = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "localhost".into());
        Http {
            conn: BufReader::with_capacity(READ_SIZE, stream),
            host,
            auth: auth.to_owned(),
            line: Vec::with_capacity(256),
        }
    }

    /// Writes one request in one write.
    pub fn send(&mut self, method: &str, path: &str, headers: &str, body: &[u8]) {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\n{}\r\n\
             Content-Length: {}\r\n{headers}\r\n",
            self.host,
            self.auth,
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        self.conn
            .get_mut()
            .write_all(&req)
            .expect("write the request");
    }

    fn read_line(&mut self) -> &[u8] {
        self.line.clear();
        let n = self
            .conn
            .read_until(b'\n', &mut self.line)
            .expect("read from the runner");
        assert!(n > 0, "the runner closed the connection");
        &self.line
    }

    /// Reads one response; the body goes to `sink` as it arrives. Returns the status.
    pub fn read_response(&mut self, sink: &mut impl FnMut(&[u8])) -> u16 {
        let status_line = String::from_utf8_lossy(self.read_line()).into_owned();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let mut chunked = false;
        let mut length: Option<u64> = None;
        loop {
            let line = self.read_line();
            if line == b"\r\n" {
                break;
            }
            let text = String::from_utf8_lossy(line).to_ascii_lowercase();
            if let Some((name, value)) = text.split_once(':') {
                match name.trim() {
                    "transfer-encoding" => chunked = value.contains("chunked"),
                    "content-length" => length = value.trim().parse().ok(),
                    _ => {}
                }
            }
        }
        if chunked {
            loop {
                let line = self.read_line();
                let hex = line
                    .iter()
                    .take_while(|b| b.is_ascii_hexdigit())
                    .map(|&b| b as char)
                    .collect::<String>();
                let size = u64::from_str_radix(&hex, 16).expect("chunk size");
                if size == 0 {
                    while self.read_line() != b"\r\n" {}
                    break;
                }
                self.copy_body(size, sink);
                assert_eq!(self.read_line(), b"\r\n", "chunk not followed by CRLF");
            }
        } else if let Some(n) = length {
            self.copy_body(n, sink);
        } else {
            panic!("response without a length: the bench needs keep-alive");
        }
        status
    }

    /// Reads raw bytes (head and body framing included) until `marker` appears; for streams
    /// that are left open, after which the connection is dropped.
    pub fn read_raw_until(&mut self, out: &mut Vec<u8>, marker: &[u8]) {
        while !out.windows(marker.len()).any(|w| w == marker) {
            let buf = self.conn.fill_buf().expect("read");
            assert!(!buf.is_empty(), "the connection closed before {marker:?}");
            let n = buf.len();
            out.extend_from_slice(buf);
            self.conn.consume(n);
        }
    }

    fn copy_body(&mut self, mut n: u64, sink: &mut impl FnMut(&[u8])) {
        while n > 0 {
            let buf = self.conn.fill_buf().expect("read the body");
            assert!(!buf.is_empty(), "the connection closed mid-body");
            let k = buf.len().min(n as usize);
            sink(&buf[..k]);
            self.conn.consume(k);
            n -= k as u64;
        }
    }
}

pub struct Summary {
    pub p50: f64,
    pub p99: f64,
    pub mean: f64,
}

/// Nearest-rank percentiles of `samples`, in microseconds.
pub fn summarize(samples: &[Duration]) -> Summary {
    let mut us: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    us.sort_by(f64::total_cmp);
    let rank = |p: f64| us[((p * us.len() as f64).ceil() as usize).clamp(1, us.len()) - 1];
    Summary {
        p50: rank(0.50),
        p99: rank(0.99),
        mean: us.iter().sum::<f64>() / us.len() as f64,
    }
}

pub fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "?".into())
}

/// The process whose command line has `arg` as one of its arguments (from `/proc`).
pub fn pid_with_arg(arg: &str) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        cmdline
            .split(|b| *b == 0)
            .any(|a| a == arg.as_bytes())
            .then_some(pid)
    })
}

/// The 1-minute load average: other work on the machine skews every figure.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split(' ').next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// xorshift64: deterministic pseudo-random data for tests, without extra crates.
pub struct Rng(u64);

impl Rng {
    /// A generator; nearby seeds give unrelated sequences, and zero is never a state.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// The next 64 bits.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform-ish in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Fills `buf` with pseudo-random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Checks a generated OpenAPI description (`generated`, JSON text) the way both servers' tests
/// do: every `text/event-stream` response is described event by event (a `oneOf` of frame
/// schemas; schemathesis validates each event against it), there are at least `min_streams` of
/// them, and the committed copy at `committed` is the same text. With `UPDATE_OPENAPI` set, the
/// committed copy is rewritten first.
pub fn check_openapi(generated: &str, committed: &std::path::Path, min_streams: usize) {
    let doc: serde_json::Value = serde_json::from_str(generated).expect("the description is JSON");
    let mut streams = 0;
    let paths = doc["paths"].as_object().expect("paths");
    for (path, item) in paths {
        for (method, op) in item.as_object().expect("path item") {
            for (status, response) in op["responses"].as_object().expect("responses") {
                let Some(media) = response["content"].get("text/event-stream") else {
                    continue;
                };
                streams += 1;
                let frame = media["schema"]["$ref"].as_str().unwrap_or_default();
                let name = frame.rsplit('/').next().unwrap_or_default();
                assert!(
                    doc["components"]["schemas"][name]["oneOf"].is_array(),
                    "{method} {path} {status}: {media}"
                );
            }
        }
    }
    assert!(streams >= min_streams, "{streams} event streams");
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(committed, generated).expect("write the committed description");
    }
    let on_disk = std::fs::read_to_string(committed).expect("read the committed description");
    assert!(
        on_disk == generated,
        "{} is stale: run UPDATE_OPENAPI=1 cargo test --lib openapi in its crate",
        committed.display()
    );
}
