//! OpenTelemetry spans `agentbox.invoke` and `agentbox.configure`, exported as OTLP/HTTP JSON
//! to `<endpoint>/v1/traces` when an endpoint is set. A small hand-written exporter: spans are
//! queued (bounded; dropped, never blocking, when the collector is slow) and sent in batches once
//! a second. Attributes are bounded: template, outcome, status, exit code, bytes, actor — never
//! argv, stdin or bodies. An incoming W3C `traceparent` becomes the span's parent.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::sync::mpsc;

/// Identifiers of one span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanIds {
    /// 16 bytes.
    pub trace_id: [u8; 16],
    /// 8 bytes.
    pub span_id: [u8; 8],
    /// The caller's span, from `traceparent`.
    pub parent: Option<[u8; 8]>,
}

impl SpanIds {
    /// New ids, continuing the trace of `traceparent` when it is valid.
    pub fn new(traceparent: Option<&str>) -> Self {
        let mut span_id = [0u8; 8];
        let _ = getrandom::fill(&mut span_id);
        if let Some((trace_id, parent)) = traceparent.and_then(parse_traceparent) {
            return Self {
                trace_id,
                span_id,
                parent: Some(parent),
            };
        }
        let mut trace_id = [0u8; 16];
        let _ = getrandom::fill(&mut trace_id);
        Self {
            trace_id,
            span_id,
            parent: None,
        }
    }

    /// The `traceparent` header naming this span, for the runner.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-01",
            hex::encode(self.trace_id),
            hex::encode(self.span_id)
        )
    }
}

/// Parses `00-<32 hex>-<16 hex>-<2 hex>`; all-zero ids are invalid.
pub fn parse_traceparent(text: &str) -> Option<([u8; 16], [u8; 8])> {
    let mut parts = text.trim().split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version == "ff" || flags.len() != 2 || parts.next().is_some() {
        return None;
    }
    let trace: [u8; 16] = hex::decode(trace).ok()?.try_into().ok()?;
    let parent: [u8; 8] = hex::decode(parent).ok()?.try_into().ok()?;
    if trace == [0; 16] || parent == [0; 8] {
        return None;
    }
    Some((trace, parent))
}

/// A value of a span attribute.
#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    /// A string.
    Str(String),
    /// An integer.
    Int(i64),
}

/// A finished span.
#[derive(Debug, Clone)]
pub struct Span {
    /// `agentbox.invoke` or `agentbox.configure`.
    pub name: &'static str,
    /// Ids.
    pub ids: SpanIds,
    /// Start.
    pub start: SystemTime,
    /// End.
    pub end: SystemTime,
    /// Bounded attributes.
    pub attributes: Vec<(&'static str, Attr)>,
    /// Whether it failed.
    pub error: bool,
}

fn nanos(t: SystemTime) -> String {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
        .to_string()
}

fn span_json(span: &Span) -> Value {
    let attributes: Vec<Value> = span
        .attributes
        .iter()
        .map(|(key, value)| match value {
            Attr::Str(s) => json!({"key": key, "value": {"stringValue": s}}),
            Attr::Int(i) => json!({"key": key, "value": {"intValue": i.to_string()}}),
        })
        .collect();
    let mut v = json!({
        "traceId": hex::encode(span.ids.trace_id),
        "spanId": hex::encode(span.ids.span_id),
        "name": span.name,
        "kind": 2,
        "startTimeUnixNano": nanos(span.start),
        "endTimeUnixNano": nanos(span.end),
        "attributes": attributes,
        "status": {"code": if span.error { 2 } else { 1 }},
    });
    if let Some(parent) = span.ids.parent {
        v["parentSpanId"] = json!(hex::encode(parent));
    }
    v
}

/// The OTLP/HTTP JSON body for a batch of spans.
pub fn export_body(spans: &[Span]) -> Value {
    json!({
        "resourceSpans": [{
            "resource": {"attributes": [
                {"key": "service.name", "value": {"stringValue": "agentbox-controlplane"}},
                {"key": "service.version", "value": {"stringValue": env!("CARGO_PKG_VERSION")}}
            ]},
            "scopeSpans": [{
                "scope": {"name": "agentbox"},
                "spans": spans.iter().map(span_json).collect::<Vec<_>>()
            }]
        }]
    })
}

/// Queues spans for export; a no-op without an endpoint.
#[derive(Debug, Clone)]
pub struct Tracer {
    tx: Option<mpsc::Sender<Span>>,
}

impl Tracer {
    /// A tracer exporting to `endpoint` (e.g. `http://collector:4318`); must be created inside
    /// the Tokio runtime when an endpoint is given.
    pub fn new(endpoint: Option<String>) -> Self {
        let Some(endpoint) = endpoint else {
            return Self { tx: None };
        };
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(export_loop(
            format!("{}/v1/traces", endpoint.trim_end_matches('/')),
            rx,
        ));
        Self { tx: Some(tx) }
    }

    /// Whether spans are exported.
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues a finished span (dropped if the queue is full).
    pub fn finish(&self, span: Span) {
        if let Some(tx) = &self.tx {
            let _ = tx.try_send(span);
        }
    }
}

async fn export_loop(url: String, mut rx: mpsc::Receiver<Span>) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_default();
    let mut batch = Vec::new();
    loop {
        let first = match rx.recv().await {
            Some(span) => span,
            None => return,
        };
        batch.push(first);
        let deadline = tokio::time::sleep(Duration::from_secs(1));
        tokio::pin!(deadline);
        while batch.len() < 512 {
            tokio::select! {
                span = rx.recv() => match span {
                    Some(span) => batch.push(span),
                    None => break,
                },
                _ = &mut deadline => break,
            }
        }
        let body = export_body(&batch);
        batch.clear();
        match client.post(&url).json(&body).send().await {
            Ok(resp) if resp.status().is_success() => {}
            Ok(resp) => tracing::warn!(status = resp.status().as_u16(), "OTLP export refused"),
            Err(e) => tracing::warn!(error = %e, "OTLP export failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trip() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (trace, parent) = parse_traceparent(tp).expect("valid");
        assert_eq!(hex::encode(trace), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex::encode(parent), "00f067aa0ba902b7");
        let ids = SpanIds::new(Some(tp));
        assert_eq!(ids.trace_id, trace);
        assert_eq!(ids.parent, Some(parent));
        assert!(ids
            .traceparent()
            .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        for bad in [
            "",
            "00-0000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn export_body_shape() {
        let span = Span {
            name: "agentbox.invoke",
            ids: SpanIds::new(None),
            start: UNIX_EPOCH + Duration::from_secs(1),
            end: UNIX_EPOCH + Duration::from_secs(2),
            attributes: vec![
                ("agentbox.template", Attr::Str("default".into())),
                ("agentbox.exit_code", Attr::Int(3)),
            ],
            error: false,
        };
        let body = export_body(&[span]);
        let s = &body["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(s["name"], "agentbox.invoke");
        assert_eq!(s["startTimeUnixNano"], "1000000000");
        assert_eq!(s["attributes"][1]["value"]["intValue"], "3");
        assert_eq!(s["traceId"].as_str().map(str::len), Some(32));
    }
}
