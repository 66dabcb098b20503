//! Named credentials: values stored by the control plane per namespace and given to agents by
//! reference (`credentials: [{"name", "env"} | {"name", "file"}]` on a template or a create
//! request), never returned by any read API, never logged, never in an audit record.
//!
//! Store (local and Docker backends): `<state-dir>/credentials/<namespace>/<name>`, one file per
//! value, mode 0600, replaced by temp file + fsync + rename; the directory is 0700. Values are
//! not encrypted at rest: whoever can read the state directory can read them (as they can the
//! runner tokens there).
//!
//! Delivery (local and Docker backends): each sandbox that references credentials has a
//! credentials directory of its own on the host (local: `<sandbox-dir>/credentials/`; Docker:
//! `<state-dir>/docker-credentials/<scope>/<sandbox>/`), written by [`write_dir`] at every start
//! and again whenever a credential it references is set or deleted: each `file` reference as a
//! file named by the reference's base name, the `env` references together as `.env.json`.
//! An isolated local sandbox and a Docker container see that directory read-only at
//! `/run/credentials`, so a `file` reference is at exactly the path it names; without isolation
//! (a plain host process: nothing can be mounted for it) the files stay at the host path,
//! named by `AGENTBOX_CREDENTIALS_DIR` (set in every case). The runner gets
//! `--credentials-env <dir>/.env.json` and reads that file afresh for every process it starts
//! (install, invoke, exec, session), so a rotated value reaches the next invoke without a
//! restart, and no value is in the runner's own environment, its flags, the launcher's spec,
//! a container's config or a label.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use agentbox_proto::CredentialRef;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::backend::valid_name;
use crate::error::{Error, Result};

/// The largest credential value.
pub const MAX_VALUE: usize = 64 << 10;
/// Most credentials per namespace.
pub const MAX_PER_NAMESPACE: usize = 256;
/// Where `file` references must point.
pub const FILE_PREFIX: &str = "/run/credentials/";

/// `PUT /api/v1/credentials/{name}` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutCredentialRequest {
    /// The secret (text, at most 64 KiB). Never returned.
    pub value: String,
}

impl std::fmt::Debug for PutCredentialRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PutCredentialRequest { value: <redacted> }")
    }
}

/// A credential as listings show it: never its value.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CredentialInfo {
    /// Its name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// When its value was last set (RFC 3339).
    pub updated_at: String,
}

/// `GET /api/v1/credentials`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CredentialList {
    /// Names only.
    pub credentials: Vec<CredentialInfo>,
}

/// Checks references: a known name shape, exactly one of `env` and `file`, a plain variable
/// name, a file right under `/run/credentials/`, no target twice.
pub fn validate_refs(refs: &[CredentialRef]) -> std::result::Result<(), String> {
    let mut targets = std::collections::HashSet::new();
    for r in refs {
        if !valid_name(&r.name) {
            return Err(format!("credential name {:?} is not a DNS label", r.name));
        }
        let target = match (&r.env, &r.file) {
            (Some(env), None) => {
                let ok = env
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && env.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    && env.len() <= 128
                    && !env.starts_with("AGENTBOX_")
                    && !["PATH", "HOME", "LANG"].contains(&env.as_str());
                if !ok {
                    return Err(format!(
                        "credential {:?}: env {env:?} must be a variable name (letters, digits, \
                         '_'; not PATH, HOME, LANG or AGENTBOX_*)",
                        r.name
                    ));
                }
                format!("env:{env}")
            }
            (None, Some(file)) => {
                let base = file.strip_prefix(FILE_PREFIX).unwrap_or("");
                let ok = !base.is_empty()
                    && base.len() <= 128
                    && !base.starts_with('.')
                    && base
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
                if !ok {
                    return Err(format!(
                        "credential {:?}: file {file:?} must be {FILE_PREFIX}<name> \
                         (letters, digits, '.', '_', '-'; not starting with '.')",
                        r.name
                    ));
                }
                format!("file:{base}")
            }
            _ => {
                return Err(format!(
                    "credential {:?}: give exactly one of env and file",
                    r.name
                ))
            }
        };
        if !targets.insert(target) {
            return Err(format!(
                "credential {:?}: its target is given twice",
                r.name
            ));
        }
    }
    Ok(())
}

/// The credential store under the state directory.
#[derive(Debug, Clone)]
pub struct Credentials {
    dir: PathBuf,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("a blocking task failed: {e}")))
}

impl Credentials {
    /// The store of `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("credentials"),
        }
    }

    fn path(&self, namespace: &str, name: &str) -> Result<PathBuf> {
        if !valid_name(namespace) || !valid_name(name) {
            return Err(Error::InvalidRequest(format!(
                "credential {name:?} of namespace {namespace:?}: both must be DNS labels"
            )));
        }
        Ok(self.dir.join(namespace).join(name))
    }

    /// Sets a value (atomically; mode 0600).
    pub async fn put(&self, namespace: &str, name: &str, value: String) -> Result<()> {
        if value.len() > MAX_VALUE || value.contains('\0') {
            return Err(Error::InvalidRequest(
                "a credential's value is text of at most 64 KiB without NUL".into(),
            ));
        }
        let path = self.path(namespace, name)?;
        let store = self.clone();
        let namespace = namespace.to_owned();
        blocking(move || {
            let dir = path.parent().unwrap_or(&store.dir).to_owned();
            std::fs::create_dir_all(&dir)?;
            for d in [&store.dir, &dir] {
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))?;
            }
            if !path.exists() && store.names(&namespace)?.len() >= MAX_PER_NAMESPACE {
                return Err(Error::InvalidRequest(format!(
                    "namespace {namespace:?} has {MAX_PER_NAMESPACE} credentials, the most it may"
                )));
            }
            let tmp = dir.join(format!(".tmp.{}", crate::backend::random_hex(6)));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(value.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            Ok(())
        })
        .await?
    }

    /// Removes a value; `false` when there was none.
    pub async fn delete(&self, namespace: &str, name: &str) -> Result<bool> {
        let path = self.path(namespace, name)?;
        blocking(move || match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        })
        .await?
    }

    fn names(&self, namespace: &str) -> Result<Vec<CredentialInfo>> {
        let dir = self.dir.join(namespace);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !valid_name(&name) {
                continue;
            }
            let updated_at = entry
                .metadata()
                .and_then(|m| m.modified())
                .map(|t| humantime::format_rfc3339_seconds(t).to_string())
                .unwrap_or_default();
            out.push(CredentialInfo {
                name,
                namespace: namespace.to_owned(),
                updated_at,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Names (never values) in the namespaces `visible` keeps.
    pub fn list(&self, visible: impl Fn(&str) -> bool) -> Result<Vec<CredentialInfo>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for entry in entries {
            let ns = entry?.file_name().to_string_lossy().into_owned();
            if valid_name(&ns) && visible(&ns) {
                out.extend(self.names(&ns)?);
            }
        }
        Ok(out)
    }

    /// Whether `name` exists in `namespace`.
    pub fn exists(&self, namespace: &str, name: &str) -> bool {
        self.path(namespace, name).is_ok_and(|p| p.is_file())
    }

    /// A value, read when a sandbox starts.
    fn value(&self, namespace: &str, name: &str) -> Result<String> {
        let path = self.path(namespace, name)?;
        std::fs::read_to_string(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::InvalidRequest(format!(
                "credential {name:?} does not exist in namespace {namespace:?}"
            )),
            _ => Error::Internal(format!("cannot read credential {name:?}: {}", e.kind())),
        })
    }
}

/// The file, in a sandbox's credentials directory, holding its `env` credentials as a JSON
/// object; the runner reads it afresh for every process it starts (`--credentials-env`).
pub const ENV_FILE: &str = ".env.json";
/// Where an isolated local sandbox and a Docker sandbox see their credentials directory.
pub const INSIDE_DIR: &str = "/run/credentials";

/// How a sandbox's credentials directory is written.
#[derive(Debug, Clone, Copy)]
pub struct Owner {
    /// The uid (and gid) that owns the files, when given (an isolated sandbox's host uid).
    pub uid: Option<u32>,
    /// The files' mode: 0400 for an owner that is the agent's, 0444 where the agent's uid is
    /// unknown (a Docker image's `USER`; the directory's parent is 0700, so only the
    /// container, through its bind mount, reaches them).
    pub mode: u32,
}

fn write_atomically(dir: &Path, name: &str, bytes: &[u8], owner: Owner) -> Result<()> {
    let tmp = dir.join(format!(".tmp.{}", crate::backend::random_hex(6)));
    let result = (|| -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(owner.mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        if let Some(uid) = owner.uid {
            std::os::unix::fs::chown(&tmp, Some(uid), Some(uid))?;
        }
        std::fs::rename(&tmp, dir.join(name))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes the credentials `refs` name (values from the store of `state_dir`) into a
/// sandbox's credentials directory `dir`: each `file` reference as `dir/<name>`, every `env`
/// one into `dir/.env.json`, each by temp file + rename, so a sandbox that has the directory
/// mounted sees every file change whole at its next read (rotation), and the directory itself
/// is never replaced (a bind mount holds on to it). Entries no reference names are removed.
/// `strict`: a missing credential is an error (a start) rather than left out (a rotation or a
/// deletion reaching a running sandbox). Without references the directory is removed and
/// `false` returned.
pub fn write_dir(
    state_dir: &Path,
    namespace: &str,
    refs: &[CredentialRef],
    dir: &Path,
    owner: Owner,
    strict: bool,
) -> Result<bool> {
    if refs.is_empty() {
        let _ = std::fs::remove_dir_all(dir);
        return Ok(false);
    }
    let store = Credentials::new(state_dir);
    let mut env = BTreeMap::new();
    let mut files = Vec::new();
    for r in refs {
        let value = match store.value(namespace, &r.name) {
            Ok(v) => v,
            Err(_) if !strict => continue,
            Err(e) => return Err(e),
        };
        if let Some(var) = &r.env {
            env.insert(var.clone(), value);
        } else if let Some(base) = r.file.as_deref().and_then(|f| f.strip_prefix(FILE_PREFIX)) {
            files.push((base.to_owned(), value));
        }
    }
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(
        dir,
        std::fs::Permissions::from_mode(if owner.mode & 0o044 != 0 {
            0o755
        } else {
            0o700
        }),
    )?;
    if let Some(uid) = owner.uid {
        std::os::unix::fs::chown(dir, Some(uid), Some(uid))?;
    }
    let env = serde_json::to_vec(&env).map_err(|e| Error::Internal(e.to_string()))?;
    write_atomically(dir, ENV_FILE, &env, owner)?;
    for (base, value) in &files {
        write_atomically(dir, base, value.as_bytes(), owner)?;
    }
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != ENV_FILE && !name.starts_with(".tmp.") && !files.iter().any(|(b, _)| *b == name)
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(true)
}

/// Whether `refs` name the credential `name`.
pub fn references(refs: &[CredentialRef], name: &str) -> bool {
    refs.iter().any(|r| r.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(name: &str, env: Option<&str>, file: Option<&str>) -> CredentialRef {
        CredentialRef {
            name: name.into(),
            env: env.map(Into::into),
            file: file.map(Into::into),
        }
    }

    #[test]
    fn references() {
        assert!(validate_refs(&[
            r("openai", Some("OPENAI_API_KEY"), None),
            r("gcp", None, Some("/run/credentials/gcp.json")),
        ])
        .is_ok());
        for bad in [
            r("Open", Some("X"), None),
            r("a", None, None),
            r("a", Some("X"), Some("/run/credentials/x")),
            r("a", Some("PATH"), None),
            r("a", Some("AGENTBOX_RUNNER_TOKEN"), None),
            r("a", Some("1X"), None),
            r("a", None, Some("/etc/passwd")),
            r("a", None, Some("/run/credentials/../x")),
            r("a", None, Some("/run/credentials/..")),
            r("a", None, Some("/run/credentials/")),
            r("a", None, Some("/run/credentials/.env.json")),
            r("a", None, Some("/run/credentials/sub/x")),
        ] {
            assert!(
                validate_refs(std::slice::from_ref(&bad)).is_err(),
                "{bad:?}"
            );
        }
        assert!(validate_refs(&[r("a", Some("X"), None), r("b", Some("X"), None)]).is_err());
    }
}
