//! An incremental Server-Sent Events parser over a byte stream.

use bytes::{Buf, BytesMut};
use serde_json::Value;

/// One event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The `id:` field (0 when absent).
    pub id: u64,
    /// The `event:` field (`message` when absent).
    pub event: String,
    /// The `data:` field, parsed as JSON (`Null` when it is not JSON).
    pub data: Value,
}

/// Accumulates bytes and yields complete events; comments (keepalives) are skipped.
#[derive(Debug, Default)]
pub struct Parser {
    buf: BytesMut,
}

impl Parser {
    /// Adds bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete event, if one is buffered.
    pub fn next_event(&mut self) -> Option<Event> {
        loop {
            let end = self.buf.windows(2).position(|w| w == b"\n\n")?;
            let frame = self.buf.split_to(end);
            self.buf.advance(2);
            let text = String::from_utf8_lossy(&frame);
            let mut event = Event {
                id: 0,
                event: "message".into(),
                data: Value::Null,
            };
            let mut data = String::new();
            let mut any = false;
            for line in text.split('\n') {
                if line.starts_with(':') {
                    continue;
                }
                any = true;
                if let Some(v) = line.strip_prefix("id:") {
                    event.id = v.trim().parse().unwrap_or(0);
                } else if let Some(v) = line.strip_prefix("event:") {
                    event.event = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    if !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(v.strip_prefix(' ').unwrap_or(v));
                }
            }
            if !any {
                continue;
            }
            event.data = serde_json::from_str(&data).unwrap_or(Value::String(data));
            return Some(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_anywhere() {
        let text = b": keepalive\n\nid: 1\nevent: log\ndata: {\"a\":1}\n\nid: 2\nevent: exit\ndata: {}\n\n";
        for cut in 0..text.len() {
            let mut p = Parser::default();
            let mut got = Vec::new();
            p.push(&text[..cut]);
            while let Some(e) = p.next_event() {
                got.push(e);
            }
            p.push(&text[cut..]);
            while let Some(e) = p.next_event() {
                got.push(e);
            }
            assert_eq!(got.len(), 2, "cut {cut}");
            assert_eq!(got[0].id, 1);
            assert_eq!(got[0].data["a"], 1);
            assert_eq!(got[1].event, "exit");
        }
    }
}
