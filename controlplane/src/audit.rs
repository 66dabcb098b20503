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
#[derive(Debug, Default, Serialize)]
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
    /// What else the action names: a credential's name, the fields of a policy violation
    /// (never a value of a credential).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<&'a str>,
    /// The invoke (`invoke.end`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invoke_id: Option<&'a str>,
    /// How long the stream lasted (`invoke.end`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
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
            ..Default::default()
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

/// One record as the query returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditEvent {
    /// RFC 3339.
    pub time: String,
    /// The caller's subject (`anonymous` for a refused credential).
    pub actor: String,
    /// The namespace, when the action had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The sandbox, when the action had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// e.g. `create`, `invoke`, `files.put`, `governance.create`, `credentials.put`.
    pub action: String,
    /// `ok`, `error`, `denied`, `allowed`, `clamped`, ...
    pub outcome: String,
    /// The HTTP status answered.
    pub status: u16,
    /// A credential's name, a policy violation's fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The invoke, on `invoke.end`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invoke_id: Option<String>,
    /// How long the invoke's stream lasted, on `invoke.end`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

/// A page of `GET /api/v1/audit/events`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditPage {
    /// Newest first.
    pub events: Vec<AuditEvent>,
    /// Pass as `cursor` for the next (older) page; absent at the start of the log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// What a query keeps.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    /// Exact sandbox.
    pub sandbox: Option<String>,
    /// Exact actor.
    pub actor: Option<String>,
    /// Exact action, or a prefix ending in `.` or `*` (`governance.*`).
    pub action: Option<String>,
    /// Exact outcome.
    pub outcome: Option<String>,
    /// At or after.
    pub since: Option<std::time::SystemTime>,
    /// Before.
    pub until: Option<std::time::SystemTime>,
    /// Namespaces the caller may read (`None`: all, and records without one; `*`: any
    /// namespace).
    pub namespaces: Option<Vec<String>>,
}

impl Filter {
    fn keeps(&self, e: &AuditEvent, at: std::time::SystemTime) -> bool {
        let eq = |want: &Option<String>, have: Option<&str>| {
            want.as_deref().is_none_or(|w| Some(w) == have)
        };
        eq(&self.sandbox, e.sandbox.as_deref())
            && eq(&self.actor, Some(&e.actor))
            && eq(&self.outcome, Some(&e.outcome))
            && self
                .action
                .as_deref()
                .is_none_or(|a| match a.strip_suffix('*') {
                    Some(prefix) => e.action.starts_with(prefix),
                    None => a == e.action,
                })
            && self.since.is_none_or(|s| at >= s)
            && self.until.is_none_or(|u| at < u)
            && self.namespaces.as_ref().is_none_or(|list| {
                e.namespace
                    .as_ref()
                    .is_some_and(|n| list.iter().any(|l| l == n || l == "*"))
            })
    }
}

/// How far back one query reads before it returns what it found with a cursor (a bound on
/// the work of one request, whatever the filters).
pub const SCAN_LIMIT: u64 = 32 << 20;
/// The longest line read; longer ones (never written by this module) are skipped.
const MAX_LINE: usize = 64 << 10;
/// Records are appended by several replicas: one whose time is this much before `since` ends
/// the scan.
const CLOCK_SLACK: std::time::Duration = std::time::Duration::from_secs(60);

fn cursor_text(offset: u64, inode: u64) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("v1:{inode}:{offset}"))
}

/// The byte offset a cursor continues before; `Err` for one that is not ours or is of another
/// file (the log was rotated).
fn parse_cursor(text: &str, inode: u64) -> Result<u64, String> {
    use base64::Engine as _;
    let bad = || "the cursor is not one this log handed out (was the log rotated?)".to_owned();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let mut parts = text.split(':');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("v1"), Some(i), Some(o), None) if i.parse() == Ok(inode) => {
            o.parse().map_err(|_| bad())
        }
        _ => Err(bad()),
    }
}

/// Reads `path` backwards from the end (or from `cursor`): up to `limit` records the filter
/// keeps, newest first. `Err(Ok(msg))` for a bad cursor, `Err(Err(e))` for I/O.
pub fn query(
    path: &Path,
    filter: &Filter,
    cursor: Option<&str>,
    limit: usize,
) -> Result<AuditPage, Result<String, std::io::Error>> {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::MetadataExt;
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && cursor.is_none() => {
            return Ok(AuditPage {
                events: Vec::new(),
                next_cursor: None,
            })
        }
        Err(e) => return Err(Err(e)),
    };
    let meta = file.metadata().map_err(Err)?;
    let inode = meta.ino();
    let mut end = match cursor {
        Some(c) => parse_cursor(c, inode).map_err(Ok)?.min(meta.len()),
        None => meta.len(),
    };
    let stop_before = filter.since.map(|s| s - CLOCK_SLACK);
    let mut events = Vec::new();
    let mut scanned = 0u64;
    // Bytes of a line cut by the chunk boundary (the start of the line is further back).
    let mut carry: Vec<u8> = Vec::new();
    const CHUNK: u64 = 64 << 10;
    while end > 0 {
        if scanned >= SCAN_LIMIT {
            return Ok(AuditPage {
                events,
                next_cursor: Some(cursor_text(end + carry.len() as u64, inode)),
            });
        }
        let start = end.saturating_sub(CHUNK);
        let mut chunk = vec![0u8; (end - start) as usize];
        file.seek(SeekFrom::Start(start)).map_err(Err)?;
        file.read_exact(&mut chunk).map_err(Err)?;
        scanned += chunk.len() as u64;
        chunk.extend_from_slice(&carry);
        carry.clear();
        // Lines from the last to the first whole one; `line_end` is exclusive.
        let mut line_end = chunk.len();
        loop {
            let search = &chunk[..line_end];
            let newline = memchr::memrchr(b'\n', search.strip_suffix(b"\n").unwrap_or(search));
            let line_start = match newline {
                Some(i) => i + 1,
                None if start == 0 => 0,
                None => break,
            };
            let line = &chunk[line_start..line_end];
            let line_offset = start + line_start as u64;
            if line.len() <= MAX_LINE {
                if let Ok(e) = serde_json::from_slice::<AuditEvent>(line) {
                    if let Ok(at) = humantime::parse_rfc3339_weak(&e.time) {
                        if stop_before.is_some_and(|s| at < s) {
                            return Ok(AuditPage {
                                events,
                                next_cursor: None,
                            });
                        }
                        if filter.keeps(&e, at) {
                            events.push(e);
                            if events.len() == limit {
                                return Ok(AuditPage {
                                    events,
                                    next_cursor: (line_offset > 0)
                                        .then(|| cursor_text(line_offset, inode)),
                                });
                            }
                        }
                    }
                }
            }
            line_end = line_start;
            if line_start == 0 {
                break;
            }
        }
        if line_end > MAX_LINE + CHUNK as usize {
            // A line longer than any record: drop what is kept of it.
            line_end = 0;
        }
        carry = chunk[..line_end].to_vec();
        end = start;
    }
    Ok(AuditPage {
        events,
        next_cursor: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_log(path: &Path, n: usize) {
        let mut text = String::new();
        for i in 0..n {
            let t =
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000 + i as u64);
            text.push_str(
                &serde_json::to_string(&Record {
                    time: humantime::format_rfc3339_millis(t).to_string(),
                    actor: if i % 2 == 0 { "a" } else { "b" },
                    sandbox: Some(&format!("s{}", i % 7)),
                    namespace: Some("ns"),
                    action: "invoke",
                    outcome: "ok",
                    status: 200,
                    detail: None,
                    ..Default::default()
                })
                .unwrap_or_default(),
            );
            text.push('\n');
        }
        std::fs::write(path, text).unwrap_or_default();
    }

    #[test]
    fn pages_cover_every_record_once_newest_first() {
        let dir = std::env::temp_dir().join(format!("audit-q-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("audit.log");
        write_log(&path, 3001);
        for limit in [1, 7, 1000] {
            let mut seen = Vec::new();
            let mut cursor = None;
            loop {
                let page = query(&path, &Filter::default(), cursor.as_deref(), limit)
                    .map_err(|_| "query")
                    .unwrap_or_else(|e| panic!("{e}"));
                seen.extend(page.events);
                match page.next_cursor {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
            assert_eq!(seen.len(), 3001, "limit {limit}");
            assert!(
                seen.windows(2).all(|w| w[0].time > w[1].time),
                "limit {limit}"
            );
        }
        let filter = Filter {
            sandbox: Some("s3".into()),
            actor: Some("a".into()),
            ..Filter::default()
        };
        let page = query(&path, &filter, None, 1000).map_err(|_| "query");
        let n = page.map(|p| p.events.len()).unwrap_or_default();
        assert_eq!(n, (0..3001).filter(|i| i % 7 == 3 && i % 2 == 0).count());
        assert!(query(&path, &Filter::default(), Some("bogus"), 10).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
