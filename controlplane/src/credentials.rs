//! Named credentials: values stored by the control plane per namespace and given to agents by
//! reference (`credentials: [{"name", "env"} | {"name", "file"}]` on a template or a create
//! request), never returned by any read API, never logged, never in an audit record.
//!
//! Store (local and Docker backends): `<state-dir>/credentials/<namespace>/<name>`, one file per
//! value, mode 0600, replaced by temp file + fsync + rename; the directory is 0700. Values are
//! not encrypted at rest: whoever can read the state directory can read them (as they can the
//! runner tokens there).
//!
//! Delivery (local backend), at every sandbox start (create, resume): `env` references become
//! variables of the runner's environment (so of every install, invoke and exec); `file`
//! references are written, read-only, to the sandbox's own `<sandbox-dir>/credentials/`, which
//! an isolated sandbox sees read-only at the same path, named by `AGENTBOX_CREDENTIALS_DIR`.
//! The launcher's spec then goes through a memfd instead of `sandbox.spec.json`, so no value
//! is in a file the sandbox's records are.

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
                    && base != "."
                    && base != ".."
                    && base
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
                if !ok {
                    return Err(format!(
                        "credential {:?}: file {file:?} must be {FILE_PREFIX}<name> \
                         (letters, digits, '.', '_', '-')",
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

/// What a sandbox start gets of its credentials.
#[derive(Default)]
pub struct Delivered {
    /// Variables for the runner's environment.
    pub env: BTreeMap<String, String>,
    /// The directory of the file credentials (to show the sandbox read-only), if any.
    pub dir: Option<PathBuf>,
}

impl std::fmt::Debug for Delivered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivered")
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("dir", &self.dir)
            .finish()
    }
}

/// Reads the values `refs` name (from the store of `state_dir`) for a start of the sandbox in
/// `sandbox_dir`: file credentials are written afresh to `<sandbox_dir>/credentials/` (0400,
/// owned by `owner` when given), env ones returned.
pub fn deliver(
    state_dir: &Path,
    namespace: &str,
    refs: &[CredentialRef],
    sandbox_dir: &Path,
    owner: Option<u32>,
) -> Result<Delivered> {
    let store = Credentials::new(state_dir);
    let files_dir = sandbox_dir.join("credentials");
    let _ = std::fs::remove_dir_all(&files_dir);
    let mut out = Delivered::default();
    if refs.is_empty() {
        return Ok(out);
    }
    for r in refs {
        let value = store.value(namespace, &r.name)?;
        if let Some(env) = &r.env {
            out.env.insert(env.clone(), value);
        } else if let Some(base) = r.file.as_deref().and_then(|f| f.strip_prefix(FILE_PREFIX)) {
            std::fs::create_dir_all(&files_dir)?;
            let path = files_dir.join(base);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o400)
                .open(&path)?;
            f.write_all(value.as_bytes())?;
            if let Some(uid) = owner {
                std::os::unix::fs::chown(&path, Some(uid), Some(uid))?;
            }
            out.dir = Some(files_dir.clone());
        }
    }
    if let Some(dir) = &out.dir {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o500))?;
        if let Some(uid) = owner {
            std::os::unix::fs::chown(dir, Some(uid), Some(uid))?;
        }
        out.env.insert(
            "AGENTBOX_CREDENTIALS_DIR".into(),
            dir.to_string_lossy().into_owned(),
        );
    }
    Ok(out)
}

/// A close-on-exec memfd holding `bytes`, read from the start by whoever opens it through
/// `/proc/<pid>/fd/<n>`.
pub fn memfd_with(bytes: &[u8]) -> Result<std::os::fd::OwnedFd> {
    let fd = rustix::fs::memfd_create("agentbox-spec", rustix::fs::MemfdFlags::CLOEXEC)
        .map_err(|e| Error::Internal(format!("memfd_create: {e}")))?;
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes)?;
    Ok(file.into())
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
        ] {
            assert!(
                validate_refs(std::slice::from_ref(&bad)).is_err(),
                "{bad:?}"
            );
        }
        assert!(validate_refs(&[r("a", Some("X"), None), r("b", Some("X"), None)]).is_err());
    }
}
