//! Parsing complete SSE bodies as agentbox servers write them, and rebuilding exact output.

use base64::Engine;
use serde_json::Value;

/// One SSE event.
#[derive(Debug, Clone)]
pub struct Event {
    pub id: u64,
    pub event: String,
    pub data: Value,
}

/// Parses a complete SSE body (comments skipped); panics on a torn last frame.
pub fn parse_sse(bytes: &[u8]) -> Vec<Event> {
    let (events, rest) = parse_sse_prefix(bytes);
    assert!(
        rest == bytes.len(),
        "torn frame at the end: {:?}",
        String::from_utf8_lossy(&bytes[rest..])
    );
    events
}

/// Parses the complete frames at the front of `bytes`; returns them and the bytes used.
pub fn parse_sse_prefix(bytes: &[u8]) -> (Vec<Event>, usize) {
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some(end) = find(&bytes[pos..], b"\n\n") {
        let text = std::str::from_utf8(&bytes[pos..pos + end]).unwrap();
        pos += end + 2;
        if text.starts_with(':') {
            continue;
        }
        let mut ev = Event {
            id: 0,
            event: String::new(),
            data: Value::Null,
        };
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("id: ") {
                ev.id = v.parse().unwrap();
            } else if let Some(v) = line.strip_prefix("event: ") {
                ev.event = v.to_owned();
            } else if let Some(v) = line.strip_prefix("data: ") {
                ev.data = serde_json::from_str(v).unwrap();
            }
        }
        out.push(ev);
    }
    (out, pos)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The exact bytes of `stream` ("stdout" or "stderr") rebuilt from `log` events.
pub fn rebuild(events: &[Event], stream: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for e in events
        .iter()
        .filter(|e| e.event == "log" && e.data["stream"] == stream)
    {
        // `data` is always there; for bytes that are not UTF-8 it is lossy and `dataBase64`
        // holds them exactly.
        let text = e.data["data"].as_str().expect("a log event without data");
        match e.data["dataBase64"].as_str() {
            Some(b64) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .unwrap();
                assert_eq!(
                    text,
                    String::from_utf8_lossy(&bytes),
                    "data is the lossy text"
                );
                out.extend(bytes);
            }
            None => out.extend_from_slice(text.as_bytes()),
        }
        if e.data["partial"] != Value::Bool(true) {
            out.push(b'\n');
        }
    }
    out
}
