//! Who is calling: API keys (a JSON file of SHA-256 digests, re-read when it changes, compared
//! in constant time) and OIDC JWTs (through [`TokenVerifier`]). Keys are never logged.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use axum::http::HeaderMap;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::{Error, Result};

/// The caller, as the server sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// API key name or token subject.
    pub sub: String,
    /// Display name.
    pub name: Option<String>,
    /// Email.
    pub email: Option<String>,
    /// Groups.
    pub groups: Vec<String>,
    /// Namespaces the caller may use; `None` means all.
    pub namespaces: Option<Vec<String>>,
    /// Administrator.
    pub admin: bool,
}

impl Identity {
    /// Whether the caller may see sandboxes of `namespace`.
    pub fn can_use(&self, namespace: &str) -> bool {
        self.admin
            || self
                .namespaces
                .as_ref()
                .is_none_or(|list| list.iter().any(|n| n == namespace))
    }

    /// The namespace a create without one goes to.
    pub fn default_namespace(&self) -> String {
        self.namespaces
            .as_ref()
            .and_then(|list| list.first().cloned())
            .unwrap_or_else(|| "default".into())
    }
}

#[derive(Debug, Deserialize)]
struct KeysFile {
    keys: Vec<KeyEntryFile>,
}

#[derive(Debug, Deserialize)]
struct KeyEntryFile {
    name: String,
    sha256: String,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default)]
    admin: bool,
}

#[derive(Debug, Clone)]
struct KeyEntry {
    name: String,
    digest: [u8; 32],
    namespaces: Option<Vec<String>>,
    admin: bool,
}

#[derive(Debug)]
struct Loaded {
    stamp: Option<(SystemTime, u64)>,
    keys: Vec<KeyEntry>,
}

/// API keys from a file, re-read whenever its modification time or size changes.
#[derive(Debug)]
pub struct ApiKeys {
    path: PathBuf,
    loaded: RwLock<Loaded>,
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// SHA-256 of a secret.
pub fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

impl ApiKeys {
    /// Loads the file; errors name what is wrong (never a key).
    pub fn load(path: &Path) -> std::result::Result<Self, String> {
        let keys = Self::read(path)?;
        Ok(Self {
            path: path.to_owned(),
            loaded: RwLock::new(Loaded {
                stamp: stamp(path),
                keys,
            }),
        })
    }

    fn read(path: &Path) -> std::result::Result<Vec<KeyEntry>, String> {
        let text = std::fs::read(path).map_err(|e| e.to_string())?;
        let file: KeysFile =
            serde_json::from_slice(&text).map_err(|e| format!("not a keys file: {e}"))?;
        file.keys
            .into_iter()
            .map(|k| {
                let bytes = hex::decode(k.sha256.trim())
                    .ok()
                    .filter(|b| b.len() == 32)
                    .ok_or_else(|| format!("key {:?}: sha256 must be 64 hex digits", k.name))?;
                let mut digest = [0u8; 32];
                digest.copy_from_slice(&bytes);
                let all = k.namespaces.is_empty() || k.namespaces.iter().any(|n| n == "*");
                Ok(KeyEntry {
                    name: k.name,
                    digest,
                    namespaces: (!all).then_some(k.namespaces),
                    admin: k.admin,
                })
            })
            .collect()
    }

    fn refresh(&self) {
        let now = stamp(&self.path);
        let current = self.loaded.read().unwrap_or_else(|p| p.into_inner()).stamp;
        if now == current {
            return;
        }
        match Self::read(&self.path) {
            Ok(keys) => {
                tracing::info!(count = keys.len(), "API keys reloaded");
                *self.loaded.write().unwrap_or_else(|p| p.into_inner()) =
                    Loaded { stamp: now, keys };
            }
            // A file caught mid-write or broken keeps the last good keys in force.
            Err(e) => tracing::warn!(error = %e, "API keys file not reloaded"),
        }
    }

    /// The identity of `key`, comparing its digest with every entry in constant time.
    pub fn check(&self, key: &str) -> Option<Identity> {
        self.refresh();
        let presented = digest(key);
        let loaded = self.loaded.read().unwrap_or_else(|p| p.into_inner());
        let mut found: Option<&KeyEntry> = None;
        for entry in &loaded.keys {
            if bool::from(entry.digest.ct_eq(&presented)) {
                found = Some(entry);
            }
        }
        found.map(|k| Identity {
            sub: k.name.clone(),
            name: Some(k.name.clone()),
            email: None,
            groups: Vec::new(),
            namespaces: k.namespaces.clone(),
            admin: k.admin,
        })
    }
}

/// Verifies bearer JWTs (OIDC).
#[async_trait::async_trait]
pub trait TokenVerifier: Send + Sync + std::fmt::Debug {
    /// The identity in a valid token; [`Error::Unauthorized`] otherwise.
    async fn verify(&self, token: &str) -> Result<Identity>;
}

/// Turns request headers into an [`Identity`].
#[derive(Debug)]
pub struct Authenticator {
    /// API keys, when configured.
    pub keys: Option<ApiKeys>,
    /// OIDC, when configured.
    pub oidc: Option<Arc<dyn TokenVerifier>>,
    /// Dev mode: everyone is an administrator.
    pub dev: bool,
}

fn looks_like_jwt(token: &str) -> bool {
    token.starts_with("eyJ") && token.split('.').count() == 3
}

impl Authenticator {
    /// Authenticates `X-API-Key: <key>` or `Authorization: Bearer <key | JWT>`.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Identity> {
        let api_key = headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .filter(|k| !k.trim().is_empty());
        let bearer = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            });
        let credential = api_key.or(bearer).map(str::trim);
        let Some(credential) = credential.filter(|c| !c.is_empty()) else {
            if self.dev {
                return Ok(Identity {
                    sub: "dev".into(),
                    name: Some("developer".into()),
                    email: None,
                    groups: Vec::new(),
                    namespaces: None,
                    admin: true,
                });
            }
            return Err(Error::Unauthorized(
                "send an API key in X-API-Key or Authorization: Bearer".into(),
            ));
        };
        if api_key.is_none() && looks_like_jwt(credential) {
            if let Some(oidc) = &self.oidc {
                return oidc.verify(credential).await;
            }
        }
        if let Some(identity) = self.keys.as_ref().and_then(|k| k.check(credential)) {
            return Ok(identity);
        }
        if self.dev && self.keys.is_none() && self.oidc.is_none() {
            return Err(Error::Unauthorized(
                "dev mode takes no credential; this one is not valid here".into(),
            ));
        }
        Err(Error::Unauthorized("the credential is not valid".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_keys(path: &Path, entries: &[(&str, &str, &[&str], bool)]) {
        let keys: Vec<serde_json::Value> = entries
            .iter()
            .map(|(name, key, ns, admin)| {
                serde_json::json!({
                    "name": name,
                    "sha256": hex::encode(digest(key)),
                    "namespaces": ns,
                    "admin": admin
                })
            })
            .collect();
        std::fs::write(path, serde_json::json!({ "keys": keys }).to_string()).expect("write");
    }

    #[test]
    fn keys_are_checked_and_reloaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys.json");
        write_keys(&path, &[("ci", "secret-1", &["team-a"], false)]);
        let keys = ApiKeys::load(&path).expect("load");
        let id = keys.check("secret-1").expect("valid");
        assert_eq!(id.sub, "ci");
        assert!(id.can_use("team-a") && !id.can_use("team-b"));
        assert!(keys.check("secret-2").is_none());
        assert!(keys.check("").is_none());

        write_keys(
            &path,
            &[
                ("ci", "secret-1", &["team-a"], false),
                ("ops", "secret-2-longer", &[], true),
            ],
        );
        let ops = keys.check("secret-2-longer").expect("reloaded");
        assert!(ops.admin && ops.can_use("anything"));

        std::fs::write(&path, "{broken").expect("write");
        assert!(
            keys.check("secret-1").is_some(),
            "a broken file keeps the last keys"
        );
    }

    #[test]
    fn bad_files_are_refused_at_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys.json");
        std::fs::write(&path, r#"{"keys":[{"name":"x","sha256":"abc"}]}"#).expect("write");
        assert!(ApiKeys::load(&path).is_err());
        assert!(ApiKeys::load(&dir.path().join("missing")).is_err());
    }
}
