//! The configuration in force, persisted atomically under the state directory and reloaded at
//! start-up.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::RwLock;

use serde::{Deserialize, Serialize};

use crate::fsutil::write_atomic;

/// What a successful configure leaves in force.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stored {
    /// The entrypoint argv.
    pub entrypoint: Option<Vec<String>>,
    /// Environment for installs and invokes.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The last successful install command.
    pub install_command: Option<Vec<String>>,
    /// Hash of the last successful install (files + command).
    pub install_command_hash: Option<String>,
    /// When this configuration was set (RFC 3339).
    pub last_configured_at: Option<String>,
    /// How the runner talks to the entrypoint (`None`: plain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<agentbox_proto::AgentProtocol>,
}

/// The persisted configuration and the lock that serializes configures.
#[derive(Debug)]
pub struct ConfigStore {
    path: PathBuf,
    current: RwLock<Stored>,
    /// Held for the whole of a configure: two installs never run at once.
    pub lock: tokio::sync::Mutex<()>,
}

impl ConfigStore {
    /// Loads `path`, or starts empty when it does not exist.
    pub fn load(path: PathBuf) -> io::Result<Self> {
        let current = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| io::Error::other(format!("{} is not valid: {e}", path.display())))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Stored::default(),
            Err(e) => return Err(e),
        };
        Ok(Self {
            path,
            current: RwLock::new(current),
            lock: tokio::sync::Mutex::new(()),
        })
    }

    /// The configuration in force.
    pub fn get(&self) -> Stored {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Persists `stored` (temp file + fsync + rename), then puts it in force.
    pub fn save(&self, stored: Stored) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(&stored).map_err(io::Error::other)?;
        write_atomic(&self.path, &bytes, 0o600)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = stored;
        Ok(())
    }
}
