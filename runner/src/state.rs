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
    /// Named agents beside the entrypoint (which is the agent `default`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub agents: BTreeMap<String, agentbox_proto::AgentSpec>,
    /// The default agent's name, when set by a configure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_agent: Option<String>,
    /// MCP servers for every ACP agent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mcp_servers: Vec<serde_json::Value>,
}

/// The name of the agent the configuration's `entrypoint` is.
pub const DEFAULT_AGENT: &str = "default";

/// One agent of the configuration in force, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    /// Its name.
    pub name: String,
    /// Its argv (as configured, not yet mapped by the jail).
    pub entrypoint: Vec<String>,
    /// How the runner talks to it.
    pub protocol: agentbox_proto::AgentProtocol,
    /// The configuration's env with the agent's own on top.
    pub env: BTreeMap<String, String>,
    /// The configuration's MCP servers, then the agent's.
    pub mcp_servers: Vec<serde_json::Value>,
}

impl Stored {
    /// Every agent, by name: the named ones and `default` (the entrypoint) unless a named one
    /// takes that name.
    pub fn agents(&self) -> Vec<Agent> {
        let mut all: BTreeMap<&str, Agent> = BTreeMap::new();
        if let Some(entrypoint) = &self.entrypoint {
            all.insert(
                DEFAULT_AGENT,
                Agent {
                    name: DEFAULT_AGENT.into(),
                    entrypoint: entrypoint.clone(),
                    protocol: self.protocol.unwrap_or_default(),
                    env: self.env.clone(),
                    mcp_servers: self.mcp_servers.clone(),
                },
            );
        }
        for (name, spec) in &self.agents {
            let mut env = self.env.clone();
            env.extend(spec.env.clone().unwrap_or_default());
            let mut mcp_servers = self.mcp_servers.clone();
            mcp_servers.extend(spec.mcp_servers.clone().unwrap_or_default());
            all.insert(
                name,
                Agent {
                    name: name.clone(),
                    entrypoint: spec.entrypoint.clone(),
                    protocol: spec.protocol.unwrap_or_default(),
                    env,
                    mcp_servers,
                },
            );
        }
        all.into_values().collect()
    }

    /// The default agent's name: the configured one, else `default` (the entrypoint), else the
    /// only agent.
    pub fn default_agent(&self) -> Option<String> {
        if self.default_agent.is_some() {
            return self.default_agent.clone();
        }
        if self.entrypoint.is_some() {
            return Some(DEFAULT_AGENT.into());
        }
        match self.agents.keys().collect::<Vec<_>>()[..] {
            [only] => Some(only.clone()),
            _ => None,
        }
    }

    /// Agent `name`, or the default one.
    pub fn agent(&self, name: Option<&str>) -> Option<Agent> {
        let name = match name {
            Some(name) => name.to_owned(),
            None => self.default_agent()?,
        };
        self.agents().into_iter().find(|a| a.name == name)
    }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use agentbox_proto::{AgentProtocol, AgentSpec};

    fn spec(argv: &str) -> AgentSpec {
        AgentSpec {
            entrypoint: vec![argv.into()],
            protocol: Some(AgentProtocol::Acp),
            env: Some(BTreeMap::from([("B".into(), "agent".into())])),
            mcp_servers: Some(vec![serde_json::json!({"name": "own"})]),
        }
    }

    #[test]
    fn agents_are_named_and_the_default_is_resolved() {
        let mut stored = Stored {
            entrypoint: Some(vec!["main".into()]),
            env: BTreeMap::from([("A".into(), "1".into()), ("B".into(), "config".into())]),
            mcp_servers: vec![serde_json::json!({"name": "shared"})],
            ..Default::default()
        };
        assert_eq!(stored.default_agent().as_deref(), Some(DEFAULT_AGENT));
        stored.agents.insert("codex".into(), spec("codex-acp"));
        let names: Vec<String> = stored.agents().into_iter().map(|a| a.name).collect();
        assert_eq!(names, vec!["codex", "default"]);
        let codex = stored.agent(Some("codex")).unwrap();
        assert_eq!(codex.env["A"], "1");
        assert_eq!(codex.env["B"], "agent", "the agent's env goes on top");
        assert_eq!(
            codex.mcp_servers.len(),
            2,
            "the configuration's, then its own"
        );
        assert_eq!(codex.protocol, AgentProtocol::Acp);
        assert_eq!(stored.agent(None).unwrap().entrypoint, vec!["main"]);
        // Without an entrypoint: the only agent, or none when there are several.
        stored.entrypoint = None;
        assert_eq!(stored.default_agent().as_deref(), Some("codex"));
        stored.agents.insert("claude".into(), spec("claude-acp"));
        assert_eq!(stored.default_agent(), None);
        stored.default_agent = Some("claude".into());
        assert_eq!(stored.agent(None).unwrap().entrypoint, vec!["claude-acp"]);
        assert!(stored.agent(Some("gemini")).is_none());
    }
}
