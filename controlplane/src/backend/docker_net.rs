//! The network of Docker sandboxes under `--isolation namespaces` (the default): a container
//! has **no network but loopback** (`--network none`), so it reaches nothing on the host (the
//! control plane's port, published ports), no sibling runner, no link-local or private address
//! and no internet, whatever routes and firewall the host has. Two unix sockets in a
//! per-sandbox host directory, bind-mounted at [`RUN_MOUNT`], are its only ways out:
//!
//! * `runner.sock`: the runner listens there (`AGENTBOX_LISTEN=unix:...`); the control plane
//!   connects to it from the host.
//! * `egress.sock`: the sandbox's egress proxy, served here, in the control plane, with the
//!   local sandboxes' own code and policy ([`agentbox_runner::sandbox::egress`]: the template's
//!   `egress` and `extraHosts`; loopback and link-local never, private ranges only by explicit
//!   CIDR, checked by name and by resolved address). The runner relays `127.0.0.1:3128` inside
//!   the container to it (`AGENTBOX_EGRESS_RELAY`), and `HTTP(S)_PROXY` point there.
//!
//! The directories live under `<state dir>/docker/` (mode 0700, so no other host user reaches a
//! socket), each named by 16 hex digits of a digest of its container's name (socket paths stay
//! under the 107 bytes a unix address holds); a sandbox's own directory is writable by the container's user (any uid an image
//! runs as), which is why the proxy's socket is bound in a private staging directory, made
//! connectable there and renamed into place: nothing here follows a name the sandbox could
//! have planted.
//!
//! The proxies are tasks of this process; a restarted control plane serves the running
//! sandboxes' proxies again at start ([`super::docker::DockerBackend::connect`]) and on the
//! first request for a sandbox whose proxy it does not serve.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentbox_runner::sandbox::egress::{Policy, Proxy};
use agentbox_runner::sandbox::Egress;

use super::random_hex;
use crate::error::{Error, Result};
use crate::templates::Template;

/// Where a sandbox's directory is mounted in its container.
pub const RUN_MOUNT: &str = "/run/agentbox";
/// The runner's socket's name in a sandbox's directory.
pub const RUNNER_SOCKET: &str = "runner.sock";
/// The proxy address programs in a sandbox are given (the runner's relay).
const EGRESS_PROXY: &str = "http://127.0.0.1:3128";

/// A served proxy: its accept loop ends when this is dropped.
#[derive(Debug)]
struct Served(tokio::task::JoinHandle<()>);

impl Drop for Served {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The sandboxes' directories and their proxies.
#[derive(Debug)]
pub struct SandboxNet {
    root: PathBuf,
    served: Mutex<HashMap<String, Served>>,
}

fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Backend(format!("{what} {}: {e}", path.display()))
}

impl SandboxNet {
    /// Keeps the directories under `root` (made, mode 0700).
    pub fn new(root: PathBuf) -> Result<Self, String> {
        // `<root>/<16 hex>/runner.sock` must fit a unix socket address.
        if root.as_os_str().len() + 29 > 107 {
            return Err(format!(
                "the state directory {} is too long for the Docker sandboxes' sockets \
                 (at most 71 bytes)",
                root.parent().unwrap_or(&root).display()
            ));
        }
        for dir in [root.clone(), root.join(".staging")] {
            std::fs::create_dir_all(&dir)
                .and_then(|()| {
                    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                })
                .map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
        }
        Ok(Self {
            root,
            served: Mutex::new(HashMap::new()),
        })
    }

    /// A sandbox's directory: named by a digest of its container's name, so that socket
    /// paths stay short (a unix socket's path has at most 107 bytes).
    fn dir(&self, object: &str) -> PathBuf {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(object.as_bytes());
        self.root.join(hex::encode(&digest[..8]))
    }

    /// The runner's socket of the sandbox whose container is `object`, seen from the host.
    pub fn runner_socket(&self, object: &str) -> PathBuf {
        self.dir(object).join(RUNNER_SOCKET)
    }

    /// The container's bind mount of its directory.
    pub fn bind(&self, object: &str) -> String {
        format!("{}:{RUN_MOUNT}", self.dir(object).display())
    }

    /// The container's environment for this network: the runner's socket, the relay, and the
    /// proxy variables (as the local backend sets them); the template's `env` comes after.
    pub fn env() -> Vec<String> {
        let mut env = vec![
            format!("AGENTBOX_LISTEN=unix:{RUN_MOUNT}/runner.sock"),
            format!("AGENTBOX_EGRESS_RELAY={RUN_MOUNT}/egress.sock"),
        ];
        for name in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
            env.push(format!("{name}={EGRESS_PROXY}"));
        }
        for name in ["NO_PROXY", "no_proxy"] {
            env.push(format!("{name}=localhost,127.0.0.1,::1"));
        }
        env
    }

    /// Whether this process serves `object`'s proxy.
    pub fn is_served(&self, object: &str) -> bool {
        self.lock().contains_key(object)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Served>> {
        self.served.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes what an earlier sandbox of this name left (a fresh create).
    pub fn reset(&self, object: &str) {
        self.stop(object);
    }

    /// Serves `object`'s egress proxy with `template`'s policy (replacing one served before),
    /// making its directory when missing. Must run inside the runtime.
    pub fn serve(&self, object: &str, sandbox: &str, template: &Template) -> Result<()> {
        let egress: Egress = match &template.egress {
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|e| Error::InvalidRequest(format!("egress: {e}")))?,
            None => Egress::default(),
        };
        let policy = Policy::new(&egress, &template.extra_hosts).map_err(Error::InvalidRequest)?;
        let dir = self.dir(object);
        std::fs::create_dir_all(&dir).map_err(|e| io("cannot make", &dir, e))?;
        // Any uid the image runs as binds runner.sock here (the parent is 0700).
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
            .map_err(|e| io("cannot open", &dir, e))?;
        let staged = self
            .root
            .join(".staging")
            .join(format!("{}.sock", random_hex(8)));
        let listener = std::os::unix::net::UnixListener::bind(&staged)
            .map_err(|e| io("cannot bind", &staged, e))?;
        let placed = std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o666))
            .and_then(|()| std::fs::rename(&staged, dir.join("egress.sock")));
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&staged);
            return Err(io("cannot place the egress proxy's socket in", &dir, e));
        }
        listener
            .set_nonblocking(true)
            .map_err(|e| io("cannot serve", &dir, e))?;
        let listener = tokio::net::UnixListener::from_std(listener)
            .map_err(|e| io("cannot serve", &dir, e))?;
        let proxy: Arc<Proxy> = Proxy::new(policy, format!("sandbox {sandbox}"));
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((conn, _)) => {
                        if let Ok(conn) = conn.into_std() {
                            if conn.set_nonblocking(false).is_ok() {
                                proxy.spawn(conn);
                            }
                        }
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        });
        self.lock().insert(object.to_owned(), Served(task));
        Ok(())
    }

    /// Stops serving `object`'s proxy and removes its directory (the container is gone).
    pub fn stop(&self, object: &str) {
        self.lock().remove(object);
        let dir = self.dir(object);
        // Does not follow links the sandbox may have made inside.
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a sandbox's directory")
            }
        }
    }
}
