//! The audit log: one JSON line per action on a sandbox. It records who, what, which sandbox,
//! the outcome and the status; never argv, stdin, bodies or credentials.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use serde::Serialize;

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
    /// What else the action names: a credential's name, the fields of a policy violation
    /// (never a value of a credential).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<&'a str>,
}

/// Where audit records go.
pub struct Audit {
    out: Mutex<Box<dyn Write + Send>>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Audit")
    }
}

impl Audit {
    /// Appends to `path`, or writes to stderr when `None`.
    pub fn open(path: Option<&Path>) -> std::io::Result<Self> {
        let out: Box<dyn Write + Send> = match path {
            Some(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
            None => Box::new(std::io::stderr()),
        };
        Ok(Self {
            out: Mutex::new(out),
        })
    }

    /// Writes one record (best effort: an audit failure is logged, not fatal).
    pub fn write(&self, record: &Record<'_>) {
        let Ok(mut line) = serde_json::to_vec(record) else {
            return;
        };
        line.push(b'\n');
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = out.write_all(&line).and_then(|()| out.flush()) {
            tracing::error!(error = %e, "cannot write the audit log");
        }
    }
}
