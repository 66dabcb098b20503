//! Server-Sent Events framing. Events are encoded once, when they are appended to an invoke's
//! journal, as the exact bytes that go on the wire:
//!
//! ```text
//! id: 7
//! event: log
//! data: {"stream":"stdout","data":"hello"}
//!
//! ```
//!
//! so live subscribers, reattaching clients and the journal on disk all share one encoding.
//! Data payloads are single-line JSON, so a frame never holds a blank line before its end.

use agentbox_proto::Stream;
use base64::Engine;
use serde::Serialize;

/// The comment sent on idle streams.
pub const KEEPALIVE: &[u8] = b": keepalive\n\n";

/// Appends one frame with a JSON payload.
pub fn push_frame<T: Serialize>(buf: &mut Vec<u8>, id: u64, event: &str, data: &T) {
    push_head(buf, id, event);
    // Serializing our own wire structs cannot fail: they hold only strings, numbers and maps
    // with string keys.
    if serde_json::to_writer(&mut *buf, data).is_err() {
        buf.extend_from_slice(b"null");
    }
    buf.extend_from_slice(b"\n\n");
}

fn push_head(buf: &mut Vec<u8>, id: u64, event: &str) {
    buf.extend_from_slice(IdLine::new(id).bytes());
    buf.extend_from_slice(b"\nevent: ");
    buf.extend_from_slice(event.as_bytes());
    buf.extend_from_slice(b"\ndata: ");
}

/// Appends one `log` frame for `bytes` of `stream`, without going through serde: this is the
/// hot path of output streaming. Valid UTF-8 goes in `data`; anything else goes in `data` as
/// lossy text (U+FFFD, for clients that read only `data`, as the seed's do) and, exactly, in
/// `dataBase64`.
pub fn push_log_frame(buf: &mut Vec<u8>, id: u64, stream: Stream, bytes: &[u8], partial: bool) {
    buf.reserve(bytes.len() + 96);
    buf.extend_from_slice(IdLine::new(id).bytes());
    // The rest of the head and the payload's opening, as one constant per stream: this runs
    // once per output line.
    let text = std::str::from_utf8(bytes);
    buf.extend_from_slice(match stream {
        Stream::Stdout => b"\nevent: log\ndata: {\"stream\":\"stdout\",\"data\":\"",
        Stream::Stderr => b"\nevent: log\ndata: {\"stream\":\"stderr\",\"data\":\"",
    });
    match text {
        Ok(text) => push_json_str_body(buf, text),
        Err(_) => {
            push_json_str_body(buf, &String::from_utf8_lossy(bytes));
            buf.extend_from_slice(b"\",\"dataBase64\":\"");
            let start = buf.len();
            let encoded_len = base64::encoded_len(bytes.len(), true).unwrap_or(0);
            buf.resize(start + encoded_len, 0);
            let written = base64::engine::general_purpose::STANDARD
                .encode_slice(bytes, &mut buf[start..])
                .unwrap_or(0);
            buf.truncate(start + written);
        }
    }
    if partial {
        buf.extend_from_slice(b"\",\"partial\":true}\n\n");
    } else {
        buf.extend_from_slice(b"\"}\n\n");
    }
}

/// Escapes `text` as the inside of a JSON string.
fn push_json_str_body(buf: &mut Vec<u8>, text: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = text.as_bytes();
    // Most output needs no escaping: one branch-free scan, then one copy.
    if !bytes.iter().fold(false, |any, &b| {
        any | (b < 0x20) | (b == b'"') | (b == b'\\') | (b == 0x7f)
    }) {
        buf.extend_from_slice(bytes);
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x00..=0x1f | 0x7f => b"",
            _ => continue,
        };
        buf.extend_from_slice(&bytes[start..i]);
        if escape.is_empty() {
            buf.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(b >> 4) as usize],
                HEX[(b & 0xf) as usize],
            ]);
        } else {
            buf.extend_from_slice(escape);
        }
        start = i + 1;
    }
    buf.extend_from_slice(&bytes[start..]);
}

/// `id: N`, built right to left in a fixed buffer.
struct IdLine {
    buf: [u8; 24],
    start: usize,
}

impl IdLine {
    fn new(mut n: u64) -> IdLine {
        let mut buf = [0u8; 24];
        let mut i = buf.len();
        loop {
            i -= 1;
            buf[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        // u64::MAX has 20 digits, so the 4-byte prefix always fits.
        i -= 4;
        buf[i..i + 4].copy_from_slice(b"id: ");
        IdLine { buf, start: i }
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

/// One parsed frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The `id:` field.
    pub id: u64,
    /// The `event:` field.
    pub event: &'a str,
    /// The `data:` field.
    pub data: &'a str,
}

/// Splits complete frames off the front of `bytes`, as written by this module. Returns the
/// frames and how many bytes they used; a torn frame at the end is left unconsumed.
pub fn parse_frames(bytes: &[u8]) -> (Vec<Frame<'_>>, usize) {
    let mut frames = Vec::new();
    let mut pos = 0;
    while let Some(end) = memchr::memmem::find(&bytes[pos..], b"\n\n") {
        let raw = &bytes[pos..pos + end];
        pos += end + 2;
        let Ok(text) = std::str::from_utf8(raw) else {
            continue;
        };
        let mut frame = Frame {
            id: 0,
            event: "message",
            data: "",
        };
        for line in text.split('\n') {
            if let Some(v) = line.strip_prefix("id: ") {
                frame.id = v.parse().unwrap_or(0);
            } else if let Some(v) = line.strip_prefix("event: ") {
                frame.event = v;
            } else if let Some(v) = line.strip_prefix("data: ") {
                frame.data = v;
            }
        }
        if !text.starts_with(':') {
            frames.push(frame);
        }
    }
    (frames, pos)
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentbox_proto::LogEvent;

    fn decode(frame: &Frame<'_>) -> Vec<u8> {
        let ev: LogEvent = serde_json::from_str(frame.data).expect("log json");
        let mut out = match (ev.data, ev.data_base64) {
            (Some(d), None) => d.into_bytes(),
            (Some(d), Some(b)) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .expect("base64");
                assert_eq!(d, String::from_utf8_lossy(&bytes), "data is the lossy text");
                bytes
            }
            other => panic!("bad log event {other:?}"),
        };
        if !ev.partial {
            out.push(b'\n');
        }
        out
    }

    #[test]
    fn log_frames_round_trip_every_byte() {
        let mut lines: Vec<Vec<u8>> = (0u8..=255).map(|b| vec![b'a', b, b'z']).collect();
        lines.push("héllo \"quoted\" \\ back\ttab".as_bytes().to_vec());
        lines.push(vec![0xff, 0xfe, 0x00]);
        lines.push(Vec::new());
        for (i, line) in lines.iter().enumerate() {
            if line.contains(&b'\n') {
                continue;
            }
            for (partial, stream) in [false, true]
                .into_iter()
                .flat_map(|p| [(p, Stream::Stdout), (p, Stream::Stderr)])
            {
                let mut buf = Vec::new();
                let id = [i as u64 + 1, u64::MAX][i % 2];
                push_log_frame(&mut buf, id, stream, line, partial);
                let (frames, used) = parse_frames(&buf);
                assert_eq!(used, buf.len());
                assert_eq!(frames.len(), 1);
                assert_eq!(frames[0].id, id);
                assert_eq!(frames[0].event, "log");
                let ev: LogEvent = serde_json::from_str(frames[0].data).expect("log json");
                assert_eq!(ev.stream, stream);
                let mut want = line.clone();
                if !partial {
                    want.push(b'\n');
                }
                assert_eq!(decode(&frames[0]), want, "line {line:?}");
            }
        }
    }

    #[test]
    fn parse_leaves_torn_frames() {
        let mut buf = Vec::new();
        push_frame(&mut buf, 1, "start", &serde_json::json!({"a": 1}));
        let whole = buf.len();
        buf.extend_from_slice(b"id: 2\nevent: log\ndata: {\"str");
        let (frames, used) = parse_frames(&buf);
        assert_eq!(frames.len(), 1);
        assert_eq!(used, whole);
        assert_eq!(frames[0].data, r#"{"a":1}"#);
    }

    #[test]
    fn ids_are_decimal() {
        for n in [0u64, 7, 10, 12345, u64::MAX] {
            let mut buf = Vec::new();
            push_frame(&mut buf, n, "x", &1);
            assert!(buf.starts_with(format!("id: {n}\n").as_bytes()));
        }
    }
}
