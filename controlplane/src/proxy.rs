//! The streaming proxy to a sandbox's runner. Bodies pass through as they come, in both
//! directions: the first SSE byte leaves as soon as the runner sends it. Hop-by-hop headers and
//! the caller's credentials are dropped, the sandbox's runner token added.
//!
//! An event stream whose runner goes away mid-stream (its process killed, its container or pod
//! gone) does not just break: the proxy ends it with one well-formed `error` event (no `id:`, so
//! it never collides with the runner's event ids used for `Last-Event-ID`) and a clean end of
//! the body. See [`guard_event_stream`]. A session's history stream is left as it is: its
//! frames are all history items, and it has no final event.

use std::convert::Infallible;
use std::time::Duration;

use agentbox_proto::{event, ErrorEvent};
use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{header, HeaderName, HeaderValue, Uri};
use axum::response::Response;
use futures_util::StreamExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::backend::Target;
use crate::connector::RunnerConnector;
use crate::error::{Error, Result};

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the
/// caller's credentials, which must never reach a runner.
const DROPPED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "authorization",
    "x-api-key",
    "cookie",
];

const H2_STREAM_WINDOW: u32 = 2 << 20;
const H2_CONN_WINDOW: u32 = 8 << 20;
/// Large DATA frames: a bulk stream crosses in as few pieces as the runner writes.
const H2_MAX_FRAME: u32 = 256 << 10;
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A client towards runners: HTTP/2 with prior knowledge, one connection per runner carrying
/// all of its streams (a held stream costs an HTTP/2 stream, not a connection with its own
/// buffers and task), kept alive with pings so a runner that vanished without a reset (a
/// deleted pod, a killed container) fails its streams within seconds instead of hanging them.
#[derive(Debug, Clone)]
pub struct Proxy {
    client: Client<RunnerConnector, Body>,
    connector: RunnerConnector,
}

impl Proxy {
    /// A proxy whose connects time out after `connect_timeout` (streams themselves never do).
    pub fn new(connect_timeout: Duration) -> Self {
        let connector = RunnerConnector::new(connect_timeout);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .http2_only(true)
            .http2_initial_stream_window_size(H2_STREAM_WINDOW)
            .http2_initial_connection_window_size(H2_CONN_WINDOW)
            .http2_max_frame_size(H2_MAX_FRAME)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .http2_keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .http2_keep_alive_while_idle(true)
            .build(connector.clone());
        Self { client, connector }
    }

    /// The connector (the terminal's HTTP/1.1 upgrade connects through it too).
    pub fn connector(&self) -> &RunnerConnector {
        &self.connector
    }

    /// Sends `req` to `path_and_query` on the runner of `target` and returns its response,
    /// streaming. With `guard`, an event-stream answer whose runner goes away ends with an
    /// `error` event ([`guard_event_stream`]); without it (a session's history, whose frames
    /// are all history items), it passes as it comes.
    pub async fn forward(
        &self,
        target: &Target,
        path_and_query: &str,
        req: Request,
        guard: bool,
    ) -> Result<Response> {
        let (mut parts, body) = req.into_parts();
        let uri: Uri = format!(
            "http://{}{}",
            self.connector.authority(&target.addr),
            path_and_query
        )
        .parse()
        .map_err(|e| Error::InvalidRequest(format!("bad path: {e}")))?;
        for name in DROPPED {
            parts.headers.remove(*name);
        }
        strip_connection_listed(&mut parts.headers);
        let bearer = HeaderValue::from_str(&format!("Bearer {}", target.token))
            .map_err(|_| Error::Internal("runner token is not a header value".into()))?;
        parts.headers.insert(header::AUTHORIZATION, bearer);
        parts.uri = uri;
        let outgoing = axum::http::Request::from_parts(parts, body);
        let response = self.client.request(outgoing).await.map_err(|e| {
            let text = format!("{e:?}");
            if text.contains("ConnectTimeout") || text.contains("timed out") {
                Error::RunnerTimeout
            } else {
                Error::RunnerUnreachable(e.to_string())
            }
        })?;
        if response.status() == axum::http::StatusCode::UNAUTHORIZED {
            // The caller was authenticated here; a 401 from the runner is about the token
            // this control plane sent, and passing it on would tell the caller their own
            // credential is wrong.
            tracing::error!(addr = %target.addr, "a runner refused its sandbox's runner token");
            return Err(Error::RunnerUnauthorized);
        }
        let (mut parts, body) = response.into_parts();
        for name in [
            "connection",
            "keep-alive",
            "transfer-encoding",
            "trailer",
            "upgrade",
        ] {
            parts.headers.remove(name);
        }
        let is_event_stream = guard
            && parts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.trim_start().starts_with("text/event-stream"));
        let body = Body::new(body);
        let body = if is_event_stream {
            guard_event_stream(body)
        } else {
            body
        };
        Ok(Response::from_parts(parts, body))
    }
}

/// Passes an event stream through chunk by chunk; when the runner's body fails, or ends while
/// its last event is not a final one (`exit`, `result`, `error`), appends one `error` event
/// (ErrorEvent, phase `proxy`, no `id:`) and ends the body cleanly instead of resetting it.
/// A stream that ended after its final event passes unchanged, and so does a body the runner
/// ended cleanly without a single byte: a reattach at or past an invoke's final event, which
/// has nothing left to replay (a runner that goes away fails the body instead).
pub fn guard_event_stream(body: Body) -> Body {
    struct State {
        upstream: axum::body::BodyDataStream,
        watch: SseWatch,
        done: bool,
    }
    let state = State {
        upstream: body.into_data_stream(),
        watch: SseWatch::default(),
        done: false,
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        let message = match st.upstream.next().await {
            Some(Ok(bytes)) => {
                st.watch.observe(&bytes);
                return Some((Ok::<_, Infallible>(bytes), st));
            }
            Some(Err(e)) => {
                let mut text = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    let part = s.to_string();
                    if !text.contains(&part) {
                        text = format!("{text}: {part}");
                    }
                    source = s.source();
                }
                tracing::warn!(error = %text, "a runner's event stream broke off");
                format!("the sandbox's runner went away mid-stream: {text}")
            }
            // Nothing to replay after the final event (a browser's EventSource reconnects
            // with the final event's id): a clean, empty end.
            None if st.watch.last_byte.is_none() => return None,
            None => "the sandbox's runner ended the stream without a final event".to_owned(),
        };
        st.done = true;
        if st.watch.finished() {
            return None;
        }
        Some((Ok(st.watch.farewell(&message)), st))
    });
    Body::from_stream(stream)
}

/// The final events of a runner's streams: after one of these, an end is a clean end.
const FINAL_EVENTS: &[&str] = &[event::EXIT, event::RESULT, event::ERROR];

/// Follows SSE framing as chunks pass, remembering whether the last complete frame named a
/// final event and whether a frame is half-sent. Per chunk it looks only at the chunk's last
/// blank lines (`memmem::rfind`) and keeps at most [`FRAME_KEEP`] bytes of the frame being
/// received; it never walks the lines of a bulk stream.
#[derive(Debug, Default)]
struct SseWatch {
    /// The first bytes of the frame being received (its `id:` and `event:` lines).
    head: Vec<u8>,
    /// Bytes of the frame being received so far.
    frame_len: usize,
    /// The last byte seen, for a blank line split across two chunks.
    last_byte: Option<u8>,
    /// Whether the last complete frame named a final event.
    last_final: bool,
}

/// Enough of a frame to read its `id:` and `event:` lines, which come first.
const FRAME_KEEP: usize = 256;

impl SseWatch {
    fn observe(&mut self, chunk: &[u8]) {
        if chunk.is_empty() {
            return;
        }
        // A blank line split across chunks: the frame being received ends at this chunk's
        // first byte.
        let split = self.frame_len > 0 && self.last_byte == Some(b'\n') && chunk[0] == b'\n';
        // Where the last frame that ends in this chunk ends (just after its blank line).
        let end = match memchr::memmem::rfind(chunk, b"\n\n") {
            Some(at) => Some(at + 2),
            None if split => Some(1),
            None => None,
        };
        self.last_byte = chunk.last().copied();
        let Some(end) = end else {
            self.keep(chunk);
            return;
        };
        // That frame starts after the blank line before it, in this chunk or an earlier one.
        let body = &chunk[..end.saturating_sub(2)];
        match memchr::memmem::rfind(body, b"\n\n") {
            Some(at) => self.last_final = names_final(&chunk[at + 2..end]),
            None if split && end > 1 => self.last_final = names_final(&chunk[1..end]),
            None => {
                self.keep(&chunk[..end]);
                self.last_final = names_final(&self.head);
            }
        }
        self.head.clear();
        self.frame_len = 0;
        self.keep(&chunk[end..]);
    }

    fn keep(&mut self, part: &[u8]) {
        let room = FRAME_KEEP.saturating_sub(self.head.len());
        self.head.extend_from_slice(&part[..part.len().min(room)]);
        self.frame_len += part.len();
    }

    /// Whether the stream already said its last word, with no frame half-sent.
    fn finished(&self) -> bool {
        self.frame_len == 0 && self.last_final
    }

    /// The closing `error` event, after ending a half-sent line or frame if there is one.
    fn farewell(&self, message: &str) -> Bytes {
        let mut out = Vec::new();
        if self.frame_len > 0 && self.last_byte != Some(b'\n') {
            out.push(b'\n');
        }
        if self.frame_len > 0 {
            out.push(b'\n');
        }
        let data = serde_json::to_string(&ErrorEvent {
            phase: Some("proxy".into()),
            message: message.to_owned(),
        })
        .unwrap_or_else(|_| "{}".into());
        out.extend_from_slice(format!("event: {}\ndata: {data}\n\n", event::ERROR).as_bytes());
        Bytes::from(out)
    }
}

/// Whether a frame's `event:` line names a final event.
fn names_final(frame: &[u8]) -> bool {
    frame
        .split(|b| *b == b'\n')
        .find_map(|line| line.strip_prefix(b"event:"))
        .is_some_and(|name| {
            let name = name.strip_prefix(b" ").unwrap_or(name);
            let name = name.strip_suffix(b"\r").unwrap_or(name);
            FINAL_EVENTS.iter().any(|e| e.as_bytes() == name)
        })
}

fn strip_connection_listed(headers: &mut axum::http::HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch(chunks: &[&[u8]]) -> SseWatch {
        let mut w = SseWatch::default();
        for c in chunks {
            w.observe(c);
        }
        w
    }

    #[test]
    fn final_events_are_seen_across_chunk_boundaries() {
        let stream = b"id: 1\nevent: start\ndata: {}\n\n: keepalive\n\nid: 2\nevent: exit\ndata: {\"exitCode\":0}\n\n";
        for cut in 0..stream.len() {
            let w = watch(&[&stream[..cut], &stream[cut..]]);
            assert!(w.finished(), "cut at {cut}");
            let w = watch(&[&stream[..cut]]);
            assert!(!w.finished(), "only {cut} bytes");
        }
        assert!(watch(&[b"id: 3\nevent: result\ndata: {}\n\n"]).finished());
        assert!(!watch(&[b"id: 3\nevent: log\ndata: {}\n\n"]).finished());
        assert!(!watch(&[b""]).finished());
        // A blank line split across chunks, then a whole frame: the last frame counts.
        let exit_then_log: [&[u8]; 2] = [
            b"id: 1\nevent: exit\ndata: {}\n",
            b"\nid: 2\nevent: log\ndata: {}\n\n",
        ];
        assert!(!watch(&exit_then_log).finished());
        let log_then_exit: [&[u8]; 2] = [
            b"id: 1\nevent: log\ndata: {}\n",
            b"\nid: 2\nevent: exit\ndata: {}\n\n",
        ];
        assert!(watch(&log_then_exit).finished());
        // Every two-cut split of a longer stream.
        let stream = b"id: 1\nevent: start\ndata: {}\n\nid: 2\nevent: log\ndata: {\"data\":\"x\"}\n\nid: 3\nevent: exit\ndata: {}\n\n";
        for a in 0..stream.len() {
            for b in a..stream.len() {
                let w = watch(&[&stream[..a], &stream[a..b], &stream[b..]]);
                assert!(w.finished(), "cuts at {a}, {b}");
                let w = watch(&[&stream[..a], &stream[a..b]]);
                assert_eq!(w.finished(), b == stream.len(), "cuts at {a}, {b}");
            }
        }
    }

    #[test]
    fn the_farewell_closes_a_torn_frame_first() {
        let w = watch(&[b"id: 1\nevent: log\ndata: {\"da"]);
        let bytes = w.farewell("gone");
        assert!(bytes.starts_with(b"\n\nevent: error\ndata: {"), "{bytes:?}");
        let w = watch(&[b"id: 1\nevent: log\n"]);
        assert!(w.farewell("gone").starts_with(b"\nevent: error\n"));
        let w = watch(&[b"id: 1\nevent: log\ndata: {}\n\n"]);
        let bytes = w.farewell("gone");
        assert_eq!(
            &bytes[..],
            b"event: error\ndata: {\"phase\":\"proxy\",\"message\":\"gone\"}\n\n"
        );
        // A long data line is followed but not kept.
        let long = vec![b'x'; 100_000];
        let w = watch(&[b"id: 1\nevent: exit\ndata: ", &long]);
        assert!(!w.finished());
        assert!(w.head.len() <= FRAME_KEEP);
    }
}
