//! The audit log: one JSON line per action on a sandbox. It records who, what, which sandbox,
//! the outcome and the status; never argv, stdin, bodies or credentials.
//!
//! Bounded against floods of unauthenticated requests: refused credentials are aggregated,
//! at most one record per [`DENIED_WINDOW`] (the first of a window at once, the rest counted
//! into one record with `count`), and the file is rotated by size (`--audit-log-max-bytes`,
//! `--audit-log-keep`: `audit.log.1` … `audit.log.N`, the oldest dropped).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Refused-credential records are written at most once per this interval.
pub const DENIED_WINDOW: Duration = Duration::from_secs(1);

/// One audit record.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Record<'a> {
    /// RFC 3339.
    pub time: String,
    /// The caller's subject.
    pub actor: &'a str,
    /// The sandbox, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<&'a str>,
    /// The sandbox's namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<&'a str>,
    /// e.g. `invoke`, `configure`, `create`, `files.put`.
    pub action: &'a str,
    /// `ok`, `denied`, `error`, ...
    pub outcome: &'a str,
    /// HTTP status.
    pub status: u16,
}

/// An aggregated record of refused credentials.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Aggregated<'a> {
    time: String,
    actor: &'a str,
    action: &'a str,
    outcome: &'a str,
    status: u16,
    /// Refused requests this record stands for (since the previous record of them).
    count: u64,
}

/// Where records go, and what rotation needs to know.
struct Sink {
    out: Box<dyn Write + Send>,
    /// The file, when not stderr.
    path: Option<PathBuf>,
    written: u64,
    max_bytes: u64,
    keep: usize,
}

/// Refused credentials not yet written: (status, count) since `since`.
#[derive(Default)]
struct Denied {
    since: Option<Instant>,
    pending: Vec<(u16, u64)>,
}

/// Where audit records go.
pub struct Audit {
    sink: Mutex<Sink>,
    denied: Mutex<Denied>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Audit")
    }
}

fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

impl Audit {
    /// Appends to `path` (rotated past `max_bytes`, keeping `keep` old files), or writes to
    /// stderr when `None`.
    pub fn open(path: Option<&Path>, max_bytes: u64, keep: usize) -> std::io::Result<Self> {
        let (out, written): (Box<dyn Write + Send>, u64) = match path {
            Some(p) => {
                let file = open_append(p)?;
                let len = file.metadata()?.len();
                (Box::new(file), len)
            }
            None => (Box::new(std::io::stderr()), 0),
        };
        Ok(Self {
            sink: Mutex::new(Sink {
                out,
                path: path.map(Path::to_path_buf),
                written,
                max_bytes,
                keep,
            }),
            denied: Mutex::new(Denied::default()),
        })
    }

    /// Writes one record (best effort: an audit failure is logged, not fatal).
    pub fn write(&self, record: &Record<'_>) {
        if let Ok(line) = serde_json::to_vec(record) {
            self.write_line(line);
        }
    }

    /// Records a request refused for its credentials: the first of each [`DENIED_WINDOW`] is
    /// written at once, the others are counted into one record written when the window is over
    /// (by the next refusal, or [`Audit::flush_denied`]).
    pub fn denied(&self, status: u16) {
        let now = Instant::now();
        let due = {
            let mut d = self.denied.lock().unwrap_or_else(|p| p.into_inner());
            match d.since {
                Some(since) if now.duration_since(since) < DENIED_WINDOW => {
                    match d.pending.iter_mut().find(|(s, _)| *s == status) {
                        Some((_, n)) => *n += 1,
                        None => d.pending.push((status, 1)),
                    }
                    return;
                }
                _ => {
                    d.since = Some(now);
                    std::mem::take(&mut d.pending)
                }
            }
        };
        self.write_aggregated(due);
        self.write(&Record {
            time: crate::api::now(),
            actor: "anonymous",
            sandbox: None,
            namespace: None,
            action: "authenticate",
            outcome: "denied",
            status,
        });
    }

    /// Writes the refusals counted in a window that is over (any window with `all`, at
    /// shutdown); called once a second.
    pub fn flush_denied(&self, all: bool) {
        let due = {
            let mut d = self.denied.lock().unwrap_or_else(|p| p.into_inner());
            if all || d.since.is_some_and(|s| s.elapsed() >= DENIED_WINDOW) {
                d.since = None;
                std::mem::take(&mut d.pending)
            } else {
                Vec::new()
            }
        };
        self.write_aggregated(due);
    }

    fn write_aggregated(&self, due: Vec<(u16, u64)>) {
        for (status, count) in due {
            let record = Aggregated {
                time: crate::api::now(),
                actor: "anonymous",
                action: "authenticate",
                outcome: "denied",
                status,
                count,
            };
            if let Ok(line) = serde_json::to_vec(&record) {
                self.write_line(line);
            }
        }
    }

    fn write_line(&self, mut line: Vec<u8>) {
        line.push(b'\n');
        let mut sink = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        if sink.path.is_some() && sink.written + line.len() as u64 > sink.max_bytes {
            if let Err(e) = sink.rotate() {
                tracing::error!(error = %e, "cannot rotate the audit log");
            }
        }
        let written = sink.out.write_all(&line).and_then(|()| sink.out.flush());
        match written {
            Ok(()) => sink.written += line.len() as u64,
            Err(e) => tracing::error!(error = %e, "cannot write the audit log"),
        }
    }
}

impl Sink {
    /// `audit.log` → `audit.log.1` → … → `audit.log.<keep>` (dropped past it), then a new file.
    fn rotate(&mut self) -> std::io::Result<()> {
        let Some(path) = self.path.clone() else {
            return Ok(());
        };
        let numbered = |n: usize| {
            let mut p = path.clone().into_os_string();
            p.push(format!(".{n}"));
            PathBuf::from(p)
        };
        if self.keep == 0 {
            std::fs::remove_file(&path)?;
        } else {
            let _ = std::fs::remove_file(numbered(self.keep));
            for n in (1..self.keep).rev() {
                let _ = std::fs::rename(numbered(n), numbered(n + 1));
            }
            std::fs::rename(&path, numbered(1))?;
        }
        self.out = Box::new(open_append(&path)?);
        self.written = 0;
        Ok(())
    }
}
