//! The agentbox runner: one static binary inside a sandbox that takes files, runs an install
//! command once per distinct configuration, spawns the entrypoint for each invoke and streams
//! its output as Server-Sent Events, journaled so clients can reattach.
//!
//! Map: [`config`] (flags) → [`server`] (HTTP edge) → [`configure`] / [`invoke`] (domain) →
//! [`supervisor`] (spawn, reap, pump, stop) → [`journal`] (event log) ← [`sse`] (framing).
//! [`jail`] resolves every caller-supplied path.

pub mod acp;
pub mod channel;
pub mod config;
pub mod configure;
pub mod duration;
pub mod error;
pub mod files;
pub mod fsutil;
pub mod invoke;
pub mod jail;
pub mod journal;
pub mod listen;
pub mod pool;
pub mod ports;
pub mod proctree;
pub mod relay;
pub mod sandbox;
pub mod server;
pub mod session;
pub mod spawn;
pub mod sse;
pub mod state;
pub mod supervisor;

use std::sync::Arc;

use crate::channel::Permissions;
use crate::config::Config;
use crate::invoke::Invokes;
use crate::jail::Jail;
use crate::session::Sessions;
use crate::state::ConfigStore;
use crate::supervisor::Reaper;

/// Everything a request handler can reach.
#[derive(Debug)]
pub struct AppState {
    /// Validated configuration.
    pub cfg: Arc<Config>,
    /// The path jail.
    pub jail: Jail,
    /// The configuration in force.
    pub store: ConfigStore,
    /// Running and recent invokes.
    pub invokes: Arc<Invokes>,
    /// The one owner of `waitpid`.
    pub reaper: Arc<Reaper>,
    /// Digest of the bearer token; `None` with `--insecure-no-auth`.
    pub token_digest: Option<[u8; 32]>,
    /// Sessions and their histories.
    pub sessions: Arc<Sessions>,
    /// Pending permission requests of running invokes.
    pub permissions: Arc<Permissions>,
    /// ACP agents, one per session.
    pub acp: Arc<acp::AcpAgents>,
    /// Forwarded ports and open tunnels.
    pub ports: ports::Ports,
}

impl AppState {
    /// Loads persisted state, recovers invokes left by an earlier runner and starts the reaper.
    /// Must run inside the Tokio runtime.
    pub fn start(cfg: Config) -> std::io::Result<Arc<Self>> {
        // Transparent huge pages off for the runner: with THP `always`, each pump thread's
        // allocator segment was backed by 2 MiB pages on first touch, about 1.3 MB of RSS per
        // running invoke instead of ~150 KiB (BENCHMARKS.md). Children inherit the setting.
        if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
            tracing::debug!(error = %e, "cannot turn transparent huge pages off");
        }
        let cfg = Arc::new(cfg);
        let reaper = Reaper::new();
        reaper.start()?;
        let store = ConfigStore::load(cfg.state_dir.join("config.json"))?;
        let invokes = Invokes::recover(Arc::clone(&cfg), Arc::clone(&reaper))?;
        let jail = Jail::new(cfg.workspace.clone(), vec![cfg.state_dir.clone()])?;
        configure::recover(&cfg, &jail, store.get().install_command_hash.as_deref());
        files::sweep_temp_files(&jail);
        let token_digest = cfg.token.as_deref().map(server::token_digest);
        let sessions = Sessions::load(
            &cfg.state_dir,
            cfg.retain_sessions,
            cfg.retain_session_bytes,
        )?;
        let permissions = Permissions::new(cfg.permission_timeout);
        Ok(Arc::new(Self {
            sessions,
            permissions,
            acp: acp::AcpAgents::new(),
            ports: ports::Ports::load(&cfg.state_dir),
            cfg,
            jail,
            store,
            invokes,
            reaper,
            token_digest,
        }))
    }
}
