//! Prometheus metrics, rendered by hand in the text exposition format. Labels are bounded:
//! template names and a handful of outcomes, never a user or sandbox id.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
];

#[derive(Debug, Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

/// What a request was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// `/invoke`.
    Invoke,
    /// `/configure`.
    Configure,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Invoke => "agentbox_invoke",
            Kind::Configure => "agentbox_configure",
        }
    }
}

/// The control plane's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(Kind, String, String), u64>>,
    durations: Mutex<BTreeMap<(Kind, String, String), Histogram>>,
    throttled: Mutex<BTreeMap<String, u64>>,
}

/// The outcome label for a response status.
pub fn outcome(status: u16) -> &'static str {
    match status {
        200..=299 => "ok",
        429 => "throttled",
        401 | 403 => "unauthorized",
        404 => "not_found",
        409 => "not_running",
        424 => "not_configured",
        400..=499 => "client_error",
        502..=504 => "runner_unavailable",
        _ => "error",
    }
}

impl Metrics {
    /// Records one finished request (its stream included).
    pub fn record(&self, kind: Kind, template: &str, status: u16, elapsed: Duration) {
        let key = (kind, template.to_owned(), outcome(status).to_owned());
        *self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default() += 1;
        let mut durations = self.durations.lock().unwrap_or_else(|p| p.into_inner());
        let h = durations.entry(key).or_default();
        if h.counts.is_empty() {
            h.counts = vec![0; BUCKETS.len()];
        }
        let secs = elapsed.as_secs_f64();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                h.counts[i] += 1;
            }
        }
        h.sum += secs;
        h.count += 1;
        if kind == Kind::Invoke && status == 429 {
            *self
                .throttled
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(template.to_owned())
                .or_default() += 1;
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for kind in [Kind::Invoke, Kind::Configure] {
            let p = kind.prefix();
            let _ = writeln!(
                out,
                "# HELP {p}_requests_total Requests by template and outcome."
            );
            let _ = writeln!(out, "# TYPE {p}_requests_total counter");
            for ((k, template, outcome), n) in self
                .requests
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
            {
                if *k == kind {
                    let _ = writeln!(
                        out,
                        "{p}_requests_total{{template=\"{}\",outcome=\"{outcome}\"}} {n}",
                        escape(template)
                    );
                }
            }
            let _ = writeln!(
                out,
                "# HELP {p}_duration_seconds Time to the end of the response stream."
            );
            let _ = writeln!(out, "# TYPE {p}_duration_seconds histogram");
            for ((k, template, outcome), h) in self
                .durations
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
            {
                if *k != kind {
                    continue;
                }
                let labels = format!("template=\"{}\",outcome=\"{outcome}\"", escape(template));
                for (i, bound) in BUCKETS.iter().enumerate() {
                    let _ = writeln!(
                        out,
                        "{p}_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {}",
                        h.counts[i]
                    );
                }
                let _ = writeln!(
                    out,
                    "{p}_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                    h.count
                );
                let _ = writeln!(out, "{p}_duration_seconds_sum{{{labels}}} {}", h.sum);
                let _ = writeln!(out, "{p}_duration_seconds_count{{{labels}}} {}", h.count);
            }
        }
        let _ = writeln!(
            out,
            "# HELP agentbox_invoke_throttled_total Invokes refused by a concurrency cap."
        );
        let _ = writeln!(out, "# TYPE agentbox_invoke_throttled_total counter");
        for (template, n) in self
            .throttled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "agentbox_invoke_throttled_total{{template=\"{}\"}} {n}",
                escape(template)
            );
        }
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_throttles() {
        let m = Metrics::default();
        m.record(Kind::Invoke, "default", 200, Duration::from_millis(20));
        m.record(Kind::Invoke, "default", 429, Duration::from_millis(1));
        m.record(Kind::Configure, "default", 200, Duration::from_secs(2));
        let text = m.render();
        assert!(
            text.contains("agentbox_invoke_requests_total{template=\"default\",outcome=\"ok\"} 1")
        );
        assert!(text.contains("agentbox_invoke_throttled_total{template=\"default\"} 1"));
        assert!(text.contains(
            "agentbox_configure_duration_seconds_count{template=\"default\",outcome=\"ok\"} 1"
        ));
        assert!(text.contains("agentbox_invoke_duration_seconds_bucket{template=\"default\",outcome=\"ok\",le=\"0.025\"} 1"));
    }
}
