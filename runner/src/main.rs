//! `agentbox-runner`: parse and validate flags (exit 64 on bad configuration, before any port
//! is bound), bind, print `listening on ADDR`, serve until SIGTERM or SIGINT.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use agentbox_runner::config::Args;
use agentbox_runner::{server, AppState};
use anyhow::Context;
use clap::Parser;

/// mimalloc instead of glibc's malloc: an invoke allocates and frees a few hundred small
/// objects (HTTP buffers, the child's environment), and glibc spent a sixth of the runner's CPU
/// per invoke on them, consolidating its fast bins whenever hyper took a new 8 KiB read buffer.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// sysexits' EX_USAGE.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    // The local backend's sandbox stages (`sandbox`, `sandbox-init`, `sandbox-pid1`) run from
    // this binary before anything else: single-threaded, as unshare(CLONE_NEWUSER) requires.
    if let Some(code) = agentbox_runner::sandbox::dispatch() {
        return code;
    }
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
            eprintln!("agentbox-runner: {message}");
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
    // Processes in the sandbox run as the same user: keep them from reading the runner's
    // memory and environment (where the token lives) through /proc.
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!(error = %e, "cannot clear the dumpable flag");
    }
    // One runtime thread: a runner serves one sandbox, and its blocking work (pumping output,
    // uploads, installs, ACP turns) runs on threads of its own. Against two worker threads it
    // cut an invoke's round trip by ~0.15× a bare spawn on two vCPUs (no hand-offs of tasks
    // and wake-ups between the workers; see BENCHMARKS.md).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agentbox-runner: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(config));
    // A blocking task stuck in a syscall must not keep a stopping runner alive.
    runtime.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agentbox-runner: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: agentbox_runner::config::Config) -> anyhow::Result<()> {
    let listen = config.listen.clone();
    if config.token.is_none() {
        tracing::warn!("authentication is off (--insecure-no-auth)");
    }
    let stop = shutdown_signal().context("cannot handle SIGTERM and SIGINT")?;
    let relay = match &config.egress_relay {
        Some(target) => Some(
            agentbox_runner::relay::bind(target.clone())
                .await
                .with_context(|| {
                    format!(
                        "cannot listen on {} for the egress relay",
                        agentbox_runner::relay::RELAY_LISTEN
                    )
                })?,
        ),
        None => None,
    };
    let app = AppState::start(config).context("cannot load the runner's state")?;
    if let Some(relay) = relay {
        tokio::spawn(relay.serve());
    }
    let listener = agentbox_runner::listen::Listener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.describe();
    println!("listening on {addr}");
    let _ = std::io::stdout().flush();
    tracing::info!(%addr, workspace = %app.cfg.workspace.display(), mode = app.cfg.mode.as_str(), "runner ready");

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::serve(
        listener,
        std::sync::Arc::clone(&app),
        async {
            let _ = stop_rx.await;
        },
    ));
    stop.await;
    tracing::info!("shutting down: canceling running invokes");
    app.invokes
        .cancel_all(app.cfg.grace + Duration::from_secs(2))
        .await;
    app.acp.stop_all(Duration::from_secs(2)).await;
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    Ok(())
}

/// Takes SIGTERM and SIGINT over at once (before the runner says it is listening, so a stop
/// sent right after that is a graceful one); the future resolves at the first of them.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
