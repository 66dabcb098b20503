//! `agentbox up`: a control plane with the local backend, embedded and in the foreground, with
//! a fresh API key saved where the other commands find it. `--demo` also creates a sandbox,
//! configures a small agent, invokes it and shows the stream.

use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
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
    /// Isolation of the sandboxes' runners.
    #[arg(long, value_enum, default_value_t = Isolation::Auto)]
    isolation: Isolation,
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

/// Runs the embedded control plane until Ctrl-C, then stops its sandboxes.
pub(crate) async fn run(args: &UpArgs, state_dir: &Path) -> Outcome {
    // Installed first, so that no Ctrl-C is lost and sandboxes are always stopped on the way out.
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    std::fs::create_dir_all(state_dir)?;
    let mut raw = [0u8; 24];
    getrandom::fill(&mut raw).map_err(|e| fail(format!("no randomness: {e}")))?;
    let key = format!("abx_{}", hex::encode(raw));
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(key.as_bytes()));
    let keys_file = state_dir.join("api-keys.json");
    let keys = json!({"keys": [{"name": "local-admin", "sha256": digest, "admin": true}]});
    write_private(&keys_file, keys.to_string().as_bytes())?;

    let isolation = match args.isolation {
        Isolation::Auto => "auto",
        Isolation::Bwrap => "bwrap",
        Isolation::None => "none",
    };
    let listen = args.listen.to_string();
    let cp_args = agentbox_controlplane::config::Args::try_parse_from([
        "agentbox-controlplane",
        "--listen",
        &listen,
        "--state-dir",
        &state_dir.to_string_lossy(),
        "--api-keys-file",
        &keys_file.to_string_lossy(),
        "--isolation",
        isolation,
    ])
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
    let isolated = config.bwrap;
    let app = AppState::new(config).map_err(fail)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| fail(format!("cannot listen on {}: {e}", args.listen)))?;
    let addr = listener.local_addr()?;
    let url = format!("http://{addr}");
    write_private(
        &state_dir.join("cli.json"),
        json!({"apiUrl": url, "apiKey": key}).to_string().as_bytes(),
    )?;
    println!("agentbox is up at {url}");
    println!("API key: {key}");
    println!(
        "  saved in {}; agentbox commands run from here pick it up",
        state_dir.join("cli.json").display()
    );
    println!(
        "  sandboxes run as local processes{}; Ctrl-C stops them",
        if isolated {
            " under bubblewrap"
        } else {
            " (no bubblewrap: not isolated)"
        }
    );

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
            _ = sigint.recv() => {
                return Ok(shutdown(&app, stop_tx, server, code).await);
            }
        }
        println!("demo done (exit code {code}); serving until Ctrl-C");
    }
    let _ = sigint.recv().await;
    Ok(shutdown(&app, stop_tx, server, code).await)
}

async fn shutdown(
    app: &Arc<AppState>,
    stop_tx: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    code: u8,
) -> u8 {
    println!("stopping sandboxes…");
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
