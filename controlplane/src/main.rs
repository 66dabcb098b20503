//! `agentbox-controlplane`: validate flags (exit 64 before binding), bind, print
//! `listening on ADDR`, serve until SIGTERM or SIGINT. Sandboxes outlive it.

use std::io::Write;
use std::process::ExitCode;

use agentbox_controlplane::config::Args;
use agentbox_controlplane::{api, AppState};
use anyhow::Context;
use clap::Parser;

const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let config = match args.into_config() {
        Ok(config) => config,
        Err(message) => {
            eprintln!("agentbox-controlplane: {message}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AGENTBOX_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only for a terminal: a log file or journald gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // One thread by default: an invoke's request, its runner connection and the stream
    // coming back then never wait for another thread (on two vCPUs, 1.82× → 1.67× a bare
    // spawn through the proxy; BENCHMARKS.md).
    let mut builder = if config.worker_threads > 1 {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(config.worker_threads);
        builder
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agentbox-controlplane: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agentbox-controlplane: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: agentbox_controlplane::config::Config) -> anyhow::Result<()> {
    let listen = config.listen;
    if config.dev {
        tracing::warn!("dev mode: authentication is off (loopback only)");
    }
    let app = AppState::connect(config)
        .await
        .map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    println!("listening on {addr}");
    let _ = std::io::stdout().flush();
    tracing::info!(%addr, backend = ?app.cfg.backend, isolation = app.cfg.isolation.as_str(), "control plane ready");
    if app.cfg.backend == agentbox_controlplane::config::BackendKind::Local
        && app.cfg.isolation == agentbox_controlplane::config::Isolation::None
    {
        tracing::warn!("--isolation none: local sandboxes run as plain processes of this user, with no security boundary; code in them can read this machine's files and reach its network");
    }
    if app.cfg.backend == agentbox_controlplane::config::BackendKind::Docker
        && app.cfg.isolation == agentbox_controlplane::config::Isolation::None
    {
        tracing::warn!("--isolation none: Docker sandboxes are on a bridge network; code in them can reach this host's ports, metadata addresses and whatever the host reaches, with no egress policy");
    }
    api::serve(listener, app, shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
