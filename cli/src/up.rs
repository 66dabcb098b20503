//! `agentbox up`: a control plane, embedded and in the foreground (the local backend, or Docker),
//! with a fresh API key saved where the other commands find it. `--demo` also creates a
//! sandbox, configures a small agent, invokes it and shows the stream.
//!
//! Order of start-up, so that a failed or second `up` changes nothing: validate the flags, take
//! the state directory's lock (`up.lock`; a second `up` on it stops here), bind the port, and
//! only then write the key (`api-keys.json`), start the control plane and write `cli.json`.

use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use agentbox_cli::client::{Client, ClientError, InvokeOptions};
use agentbox_controlplane::config::Isolation;
use agentbox_controlplane::{api, AppState};
use agentbox_proto::{ConfigureRequest, CreateSandboxRequest, FileSpec, TemplateRef};
use clap::Parser;
use serde_json::json;

use crate::{exit, write_log, Failure, Outcome};

/// `agentbox up` flags.
#[derive(Debug, clap::Args)]
pub(crate) struct UpArgs {
    /// Address of the control plane (loopback by default).
    #[arg(long, default_value = "127.0.0.1:8420")]
    listen: SocketAddr,
    /// Also create a sandbox, configure an example agent, invoke it and show the stream.
    #[arg(long)]
    demo: bool,
    /// Isolation of sandboxes: namespaces (the default; local: Linux namespaces, refused with
    /// the fix named where the kernel does not allow them; Docker: containers with no network
    /// but loopback, egress through the template's policy), or none (local: plain processes, no
    /// security boundary; Docker: a bridge network reaching the host, no egress policy).
    #[arg(long, value_enum, default_value_t = Isolation::Namespaces)]
    isolation: Isolation,
    /// Where sandboxes live: runner processes on this machine, or containers on the local
    /// Docker engine (images from scripts/images.sh).
    #[arg(long, value_enum, default_value_t = UpBackend::Local)]
    backend: UpBackend,
    /// Templates besides the built-in `default` and `code`: {"templates": [{"name", "mode",
    /// "image", "env", "maxConcurrentInvokes", "runnerArgs", "limits", "timeout",
    /// "idleTimeout", "onTimeout", "warmPool"}]} (docs/operations.md).
    #[arg(
        long,
        value_name = "FILE",
        env = "AGENTBOX_TEMPLATES_FILE",
        hide_env_values = true
    )]
    templates_file: Option<PathBuf>,
}

/// `up --backend`'s values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum UpBackend {
    /// Runner processes on this machine.
    Local,
    /// A container and a volume per sandbox on the local Docker engine.
    Docker,
}

const DEMO_AGENT: &str = r#"import sys, time
prompt = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--prompt=")), None)
prompt = prompt or sys.stdin.read() or "world"
for word in f"hello {prompt}, from an agent in a sandbox".split():
    print(word, flush=True)
    time.sleep(0.05)
"#;

fn fail(message: impl Into<String>) -> Failure {
    Failure {
        code: exit::ERROR,
        message: message.into(),
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(tmp, path)
}

/// The state directory's lock, held while `up` runs: a second `up` on the same directory fails
/// to take it and stops before touching anything.
fn lock(state_dir: &Path) -> Result<std::fs::File, Failure> {
    let path = state_dir.join("up.lock");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| fail(format!("cannot open {}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            let url = std::fs::read(state_dir.join("cli.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v["apiUrl"].as_str().map(str::to_owned))
                .map(|u| format!(" at {u}"))
                .unwrap_or_default();
            Err(Failure {
                code: exit::USAGE,
                message: format!(
                    "another `agentbox up` is running with the state directory {}{url};                      nothing was changed. Use that one, stop it (Ctrl-C), or pick another                      directory with --state-dir",
                    state_dir.display()
                ),
            })
        }
        Err(std::fs::TryLockError::Error(e)) => {
            Err(fail(format!("cannot lock {}: {e}", path.display())))
        }
    }
}

/// With a state directory other than ./.agentbox, leaves ./.agentbox/cli.json pointing to it,
/// so that commands run here or below find it; unless ./.agentbox is another running `up`'s
/// state directory. Returns the pointer's path when one was written.
fn write_pointer(state_dir: &Path) -> std::io::Result<Option<PathBuf>> {
    let cwd = std::env::current_dir()?;
    let here = cwd.join(".agentbox");
    let target = std::fs::canonicalize(state_dir)?;
    if std::fs::canonicalize(&here).ok().as_ref() == Some(&target) {
        return Ok(None);
    }
    if here.join("up.lock").exists() {
        if let Ok(f) = std::fs::File::open(here.join("up.lock")) {
            if f.try_lock().is_err() {
                return Ok(None);
            }
        }
    }
    std::fs::create_dir_all(&here)?;
    let pointer = here.join("cli.json");
    write_private(
        &pointer,
        json!({ "stateDir": target }).to_string().as_bytes(),
    )?;
    Ok(Some(pointer))
}

/// Runs the embedded control plane until Ctrl-C, then stops its sandboxes.
pub(crate) async fn run(args: &UpArgs, state_dir: &Path, quiet: bool) -> Outcome {
    // Installed first, so that no stop is lost and sandboxes are always stopped on the way out:
    // Ctrl-C, `kill`, `systemctl stop` and a closed terminal all stop them.
    let mut stop = Stop::install()?;
    if let Some(file) = &args.templates_file {
        if !file.is_file() {
            return Err(Failure {
                code: exit::USAGE,
                message: format!("--templates-file {}: no such file", file.display()),
            });
        }
    }
    std::fs::create_dir_all(state_dir)
        .map_err(|e| fail(format!("cannot create {}: {e}", state_dir.display())))?;
    let _lock = lock(state_dir)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| fail(format!("cannot listen on {}: {e}", args.listen)))?;
    let addr = listener.local_addr()?;

    // Bound: from here on the state directory is this `up`'s.
    let mut raw = [0u8; 24];
    getrandom::fill(&mut raw).map_err(|e| fail(format!("no randomness: {e}")))?;
    let key = format!("abx_{}", hex::encode(raw));
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(key.as_bytes()));
    let keys_file = state_dir.join("api-keys.json");
    let keys = json!({"keys": [{"name": "local-admin", "sha256": digest, "admin": true}]});
    write_private(&keys_file, keys.to_string().as_bytes())?;

    let isolation = args.isolation.as_str();
    let backend = match args.backend {
        UpBackend::Local => "local",
        UpBackend::Docker => "docker",
    };
    let listen = addr.to_string();
    let state = state_dir.to_string_lossy();
    let keys_path = keys_file.to_string_lossy();
    let mut cp_argv = vec![
        "agentbox-controlplane",
        "--listen",
        &listen,
        "--state-dir",
        &state,
        "--api-keys-file",
        &keys_path,
        "--isolation",
        isolation,
        "--backend",
        backend,
        // A killed `up` (even -9) takes its local sandboxes with it: each launcher has a
        // parent-death signal, and each sandbox dies with its launcher.
        "--tie-sandboxes",
    ];
    let templates = args
        .templates_file
        .as_ref()
        .map(|f| f.to_string_lossy().into_owned());
    if let Some(t) = &templates {
        cp_argv.extend(["--templates-file", t]);
    }
    let cp_args = agentbox_controlplane::config::Args::try_parse_from(cp_argv)
        .map_err(|e| fail(e.to_string()))?;
    let config = cp_args.into_config().map_err(|m| Failure {
        code: exit::USAGE,
        message: m,
    })?;
    if std::env::var_os("AGENTBOX_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_env("AGENTBOX_LOG"))
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init();
    }
    let isolated = config.isolation == Isolation::Namespaces;
    let app = AppState::connect(config).await.map_err(fail)?;
    let url = format!("http://{addr}");
    let cli_json = state_dir.join("cli.json");
    write_private(
        &cli_json,
        json!({"apiUrl": url, "apiKey": key}).to_string().as_bytes(),
    )?;
    let pointer = write_pointer(state_dir).unwrap_or(None);
    say(&format!("agentbox is up at {url}"));
    if args.backend == UpBackend::Local && !isolated {
        eprintln!(
            "agentbox: WARNING: --isolation none: sandboxes run as plain processes of this user \
             with no security boundary; code in them can read your files and reach your network"
        );
    }
    if args.backend == UpBackend::Docker && !isolated {
        eprintln!(
            "agentbox: WARNING: --isolation none: containers are on a bridge network; code in \
             them can reach this machine's ports and your network, with no egress policy"
        );
    }
    if !quiet {
        say(&format!("API key: {key}"));
        say(&format!(
            "  saved in {}; agentbox commands run from here (or below) pick it up",
            cli_json.display()
        ));
        if let Some(pointer) = pointer {
            say(&format!("  ({} points there)", pointer.display()));
        }
        let sandboxes = match args.backend {
            UpBackend::Docker if isolated => {
                "containers on the local Docker engine (no network, egress through a policy proxy)"
            }
            UpBackend::Docker => {
                "containers on a bridge network of the local Docker engine (NOT isolated: --isolation none)"
            }
            UpBackend::Local if isolated => {
                "isolated local processes (Linux namespaces, egress through a policy proxy)"
            }
            UpBackend::Local => "plain local processes (NOT isolated: --isolation none)",
        };
        say(&format!(
            "  sandboxes run as {sandboxes}; Ctrl-C stops them"
        ));
    }

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = {
        let app = Arc::clone(&app);
        tokio::spawn(async move {
            api::serve(listener, app, async {
                let _ = stop_rx.await;
            })
            .await
        })
    };

    let mut code = 0;
    if args.demo {
        let client = Client::control_plane(&url, &key);
        tokio::select! {
            result = demo(&client) => match result {
                Ok(c) => code = c,
                Err(e) => {
                    eprintln!("agentbox: demo failed: {e}");
                    code = exit::ERROR;
                }
            },
            () = stop.recv() => {
                return Ok(shutdown(&app, stop_tx, server, code).await);
            }
        }
        say(&format!(
            "demo done (exit code {code}); serving until Ctrl-C"
        ));
    }
    stop.recv().await;
    Ok(shutdown(&app, stop_tx, server, code).await)
}

/// Prints a line; a closed stdout (`agentbox up | head`, a terminal gone) is not an error.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// INT, TERM and HUP, whichever comes first.
struct Stop {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Stop {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Waits for a stop. `up` then stops its sandboxes and exits 0 (the demo's exit code
    /// when it failed): a stop asked for is a clean end.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
            _ = self.hup.recv() => {}
        }
    }
}

async fn shutdown(
    app: &Arc<AppState>,
    stop_tx: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    code: u8,
) -> u8 {
    say("stopping sandboxes…");
    if let Ok(list) = app.backend.list().await {
        for s in list {
            if s.status.as_str() == "Running" {
                let _ = app.backend.stop(&s.name).await;
            }
        }
    }
    let _ = stop_tx.send(());
    let _ = server.await;
    code
}

async fn demo(client: &Client) -> Result<u8, ClientError> {
    let name = "demo";
    println!("\n$ agentbox create {name}");
    match client
        .create_sandbox(&CreateSandboxRequest {
            name: name.into(),
            namespace: None,
            template_ref: Some(TemplateRef {
                name: "default".into(),
                kind: Some("ClusterSandboxTemplate".into()),
            }),
            timeout: None,
            idle_timeout: None,
            storage: None,
            credentials: Vec::new(),
        })
        .await
    {
        Ok(s) => println!("{} {}", s.name, s.status.as_str()),
        Err(ClientError::Api { code, .. }) if code == "already_exists" => {
            let s = client.resume_sandbox(name).await?;
            println!("{} {} (resumed)", s.name, s.status.as_str());
        }
        Err(e) => return Err(e),
    }
    println!("\n$ agentbox configure {name} --file agent.py=… --entrypoint \"python3 /workspace/agent.py\"");
    let mut stream = client
        .configure(
            name,
            &ConfigureRequest {
                files: vec![FileSpec {
                    path: "/workspace/agent.py".into(),
                    content: Some(DEMO_AGENT.into()),
                    content_base64: None,
                    mode: None,
                }],
                install_command: Some(vec!["python3".into(), "--version".into()]),
                entrypoint: Some(vec!["python3".into(), "/workspace/agent.py".into()]),
                env: None,
                protocol: None,
                ..Default::default()
            },
        )
        .await?;
    while let Some(event) = stream.next().await? {
        match event.event.as_str() {
            "log" => {
                let _ = write_log(&event);
            }
            "result" => println!(
                "configured: installExitCode {} skipped {}",
                event.data["installExitCode"], event.data["skipped"]
            ),
            "error" => println!("configure error: {}", event.data["message"]),
            _ => {}
        }
    }
    println!("\n$ agentbox invoke {name} --prompt world");
    let mut stream = client
        .invoke(
            name,
            Vec::new(),
            &InvokeOptions {
                prompt: Some("world".into()),
                on_disconnect: Some("linger".into()),
                ..InvokeOptions::default()
            },
        )
        .await?;
    let mut code = 0;
    while let Some(event) = stream.next().await? {
        match event.event.as_str() {
            "log" => {
                let _ = write_log(&event);
            }
            "exit" => {
                code = crate::exit_code_of(&event.data);
                println!(
                    "[exit {} in {}ms, reason {}]",
                    event.data["exitCode"], event.data["durationMs"], event.data["reason"]
                );
            }
            _ => {}
        }
    }
    Ok(code)
}
