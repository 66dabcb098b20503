//! `agentbox`: the command for people and CI.
//!
//! Exit codes: an invoke or exec exits with the entrypoint's own code (128+N when signal N
//! ended it); 124 when it timed out; 130 when it was canceled (Ctrl-C) or detached by a second
//! Ctrl-C; 75 when the runner restarted under it; 69 when the server cannot be reached or the
//! stream could not be resumed; 1 for any other error (the server's message is printed); 64 for
//! bad usage.

mod up;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use agentbox_cli::client::{Client, ClientError, EventStream, InvokeOptions};
use agentbox_cli::sse::Event;
use agentbox_proto::{ConfigureRequest, CreateSandboxRequest, ExecRequest, FileSpec, TemplateRef};
use base64::Engine;
use clap::{CommandFactory, Parser, Subcommand};
use serde_json::{json, Value};
use tokio::signal::unix::Signal;

/// Documented exit codes.
pub(crate) mod exit {
    /// Bad usage.
    pub(crate) const USAGE: u8 = 64;
    /// Any other error.
    pub(crate) const ERROR: u8 = 1;
    /// The server cannot be reached, or a stream could not be resumed.
    pub(crate) const UNAVAILABLE: u8 = 69;
    /// The runner restarted while the invoke ran.
    pub(crate) const RUNNER_RESTARTED: u8 = 75;
    /// The invoke timed out.
    pub(crate) const TIMEOUT: u8 = 124;
    /// Canceled (or detached with a second Ctrl-C).
    pub(crate) const CANCELED: u8 = 130;
}

#[derive(Debug, Parser)]
#[command(
    name = "agentbox",
    version,
    about = "Run AI agents in sandboxes and drive them over HTTP."
)]
struct Cli {
    /// Control plane URL [default: from `agentbox up`'s .agentbox/cli.json].
    #[arg(long, global = true, env = "AGENTBOX_API_URL")]
    api_url: Option<String>,
    /// API key [default: from `agentbox up`'s .agentbox/cli.json].
    #[arg(long, global = true, env = "AGENTBOX_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Talk to one runner directly instead of a control plane (sandbox names are then ignored).
    #[arg(long, global = true, env = "AGENTBOX_RUNNER_URL")]
    runner: Option<String>,
    /// The runner's token (with --runner).
    #[arg(
        long,
        global = true,
        env = "AGENTBOX_RUNNER_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// Where `up` keeps its state and the CLI finds cli.json.
    #[arg(
        long,
        global = true,
        env = "AGENTBOX_STATE_DIR",
        default_value = ".agentbox"
    )]
    state_dir: PathBuf,
    /// Machine-readable output: one JSON object, or JSON lines for streams.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a control plane with the local backend in the foreground.
    Up(up::UpArgs),
    /// Create a sandbox.
    Create {
        name: String,
        #[arg(long, default_value = "default")]
        template: String,
        #[arg(long)]
        namespace: Option<String>,
        /// Wait until it is Running.
        #[arg(long)]
        wait: bool,
    },
    /// List sandboxes.
    List,
    /// Show one sandbox.
    Get { name: String },
    /// Delete a sandbox and its workspace.
    Delete { name: String },
    /// Stop a sandbox (its workspace is kept).
    Stop { name: String },
    /// Start a stopped sandbox again.
    Resume { name: String },
    /// Upload files, run the install command once, set the entrypoint.
    Configure {
        name: String,
        /// DEST=SRC: upload local SRC as DEST (relative to /workspace, or absolute inside it).
        #[arg(long = "file", value_name = "DEST=SRC")]
        files: Vec<String>,
        /// The install command (split like a shell would, without expansions).
        #[arg(long)]
        install: Option<String>,
        /// The entrypoint command.
        #[arg(long)]
        entrypoint: Option<String>,
        /// K=V environment for installs and invokes.
        #[arg(long = "env", value_name = "K=V")]
        env: Vec<String>,
    },
    /// Run the entrypoint; stdout and stderr stream through, the exit code is the entrypoint's.
    Invoke {
        name: String,
        #[arg(long)]
        prompt: Option<String>,
        /// Send FILE (or - for standard input) as the entrypoint's stdin.
        #[arg(long)]
        stdin: Option<String>,
        /// Time limit, e.g. 90s, 5m, 1h30m.
        #[arg(long)]
        timeout: Option<String>,
        /// Start it, print its id, and leave it running.
        #[arg(long)]
        detach: bool,
    },
    /// Show an invoke's output (from the start); --follow waits for the end.
    Logs {
        name: String,
        invoke_id: String,
        #[arg(long, short)]
        follow: bool,
    },
    /// Cancel a running invoke.
    Cancel { name: String, invoke_id: String },
    /// Run a command in the sandbox (code mode's exec).
    Exec {
        name: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Move files in and out.
    Files {
        #[command(subcommand)]
        command: FilesCommand,
    },
    /// Who the server thinks you are.
    Whoami,
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
}

#[derive(Debug, Subcommand)]
enum FilesCommand {
    /// List a directory.
    Ls {
        name: String,
        #[arg(default_value = "/workspace")]
        path: String,
    },
    /// Download a file to DEST (default: standard output).
    Get {
        name: String,
        path: String,
        dest: Option<PathBuf>,
    },
    /// Upload SRC (or - for standard input) to PATH.
    Put {
        name: String,
        src: String,
        path: String,
    },
    /// Delete a file (-r: a directory).
    Rm {
        name: String,
        path: String,
        #[arg(short, long)]
        recursive: bool,
    },
}

/// A failure with its exit code.
#[derive(Debug)]
struct Failure {
    code: u8,
    message: String,
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        let code = match e {
            ClientError::Transport(_) => exit::UNAVAILABLE,
            _ => exit::ERROR,
        };
        Failure {
            code,
            message: e.to_string(),
        }
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure {
            code: exit::ERROR,
            message: e.to_string(),
        }
    }
}

fn usage(message: impl Into<String>) -> Failure {
    Failure {
        code: exit::USAGE,
        message: message.into(),
    }
}

type Outcome = std::result::Result<u8, Failure>;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(exit::USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agentbox: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("agentbox: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// Where the CLI finds its server: flags and environment first, then what `up` saved.
fn client(cli: &Cli) -> std::result::Result<Client, Failure> {
    if let Some(url) = &cli.runner {
        let token = cli
            .token
            .clone()
            .ok_or_else(|| usage("--runner needs --token (or AGENTBOX_RUNNER_TOKEN)"))?;
        return Ok(Client::runner(url, &token));
    }
    let saved: Option<Value> = std::fs::read(cli.state_dir.join("cli.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let saved_str = |key: &str| {
        saved
            .as_ref()
            .and_then(|v| v[key].as_str())
            .map(str::to_owned)
    };
    let url = cli
        .api_url
        .clone()
        .or_else(|| saved_str("apiUrl"))
        .ok_or_else(|| {
            usage("no server: pass --api-url (or AGENTBOX_API_URL), or run `agentbox up` first")
        })?;
    let key = cli
        .api_key
        .clone()
        .or_else(|| saved_str("apiKey"))
        .ok_or_else(|| usage("no API key: pass --api-key (or AGENTBOX_API_KEY)"))?;
    Ok(Client::control_plane(&url, &key))
}

/// Prints a line on stdout; when stdout is closed (`agentbox ... | head`), exits quietly the
/// way a process killed by SIGPIPE would.
fn emit(line: &str) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        std::process::exit(141);
    }
}

macro_rules! outln {
    ($($arg:tt)*) => { emit(&format!($($arg)*)) };
}

fn print_json(value: &impl serde::Serialize) {
    if let Ok(text) = serde_json::to_string(value) {
        emit(&text);
    }
}

async fn run(cli: Cli) -> Outcome {
    if let Command::Up(args) = &cli.command {
        return up::run(args, &cli.state_dir).await;
    }
    if let Command::Completions { shell } = &cli.command {
        clap_complete::generate(
            *shell,
            &mut Cli::command(),
            "agentbox",
            &mut std::io::stdout(),
        );
        return Ok(0);
    }
    let c = client(&cli)?;
    if let Some(name) = command_sandbox(&cli.command) {
        if !c.is_runner() && !agentbox_proto::valid_sandbox_name(name) {
            return Err(usage(format!(
                "{name:?} is not a sandbox name: lowercase letters, digits and '-', at most 63"
            )));
        }
    }
    match &cli.command {
        Command::Up(_) | Command::Completions { .. } => Ok(0),
        Command::Create {
            name,
            template,
            namespace,
            wait,
        } => {
            let mut s = c
                .create_sandbox(&CreateSandboxRequest {
                    name: name.clone(),
                    namespace: namespace.clone(),
                    template_ref: Some(TemplateRef {
                        name: template.clone(),
                        kind: Some("ClusterSandboxTemplate".into()),
                    }),
                })
                .await?;
            let deadline = Instant::now() + Duration::from_secs(120);
            while *wait && s.status.as_str() == "Creating" && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(250)).await;
                s = c.get_sandbox(name).await?;
            }
            show_sandbox(&cli, &s);
            Ok(0)
        }
        Command::List => {
            let list = c.list_sandboxes().await?;
            if cli.json {
                print_json(&json!({ "sandboxes": list }));
            } else {
                outln!(
                    "{:<24} {:<12} {:<9} {:<6} TEMPLATE",
                    "NAME",
                    "NAMESPACE",
                    "STATUS",
                    "MODE"
                );
                for s in list {
                    outln!(
                        "{:<24} {:<12} {:<9} {:<6} {}",
                        s.name,
                        s.namespace,
                        s.status.as_str(),
                        s.mode,
                        s.template_ref.unwrap_or_default()
                    );
                }
            }
            Ok(0)
        }
        Command::Get { name } => {
            show_sandbox(&cli, &c.get_sandbox(name).await?);
            Ok(0)
        }
        Command::Delete { name } => {
            show_sandbox(&cli, &c.delete_sandbox(name).await?);
            Ok(0)
        }
        Command::Stop { name } => {
            show_sandbox(&cli, &c.stop_sandbox(name).await?);
            Ok(0)
        }
        Command::Resume { name } => {
            show_sandbox(&cli, &c.resume_sandbox(name).await?);
            Ok(0)
        }
        Command::Whoami => {
            let me = c.whoami().await?;
            if cli.json {
                print_json(&me);
            } else {
                outln!("{} (admin: {})", me.sub, me.is_admin);
            }
            Ok(0)
        }
        Command::Configure {
            name,
            files,
            install,
            entrypoint,
            env,
        } => configure(&cli, &c, name, files, install, entrypoint, env).await,
        Command::Invoke {
            name,
            prompt,
            stdin,
            timeout,
            detach,
        } => {
            let body = match stdin.as_deref() {
                None => Vec::new(),
                Some("-") => {
                    let mut buf = Vec::new();
                    std::io::stdin().read_to_end(&mut buf)?;
                    buf
                }
                Some(path) => {
                    std::fs::read(path).map_err(|e| usage(format!("--stdin {path}: {e}")))?
                }
            };
            let options = InvokeOptions {
                prompt: prompt.clone(),
                timeout: timeout.clone(),
                on_disconnect: detach.then(|| "continue".to_owned()),
            };
            let mut sigint = interrupts()?;
            let stream = tokio::select! {
                s = c.invoke(name, body, &options) => s?,
                // The invoke may have started: the runner cancels it once nobody watches.
                _ = sigint.recv() => return Ok(exit::CANCELED),
            };
            if *detach {
                return detach_after_start(&cli, stream).await;
            }
            follow(&cli, &c, name, stream, &mut sigint).await
        }
        Command::Logs {
            name,
            invoke_id,
            follow: keep,
        } => {
            let until = if *keep {
                None
            } else {
                Some(c.invoke_summary(name, invoke_id).await?.last_event_id)
            };
            let mut sigint = interrupts()?;
            let stream = c.events(name, invoke_id, 0).await?;
            let code = follow_inner(
                &cli,
                &c,
                name,
                Some(invoke_id.clone()),
                stream,
                until,
                &mut sigint,
            )
            .await?;
            Ok(if *keep { code } else { 0 })
        }
        Command::Cancel { name, invoke_id } => {
            c.cancel(name, invoke_id).await?;
            if cli.json {
                print_json(&json!({"invokeId": invoke_id, "status": "canceling"}));
            } else {
                eprintln!("canceling {invoke_id}");
            }
            Ok(0)
        }
        Command::Exec { name, command } => {
            let mut sigint = interrupts()?;
            let request = ExecRequest {
                argv: Some(command.clone()),
                ..ExecRequest::default()
            };
            let stream = tokio::select! {
                s = c.exec(name, &request) => s?,
                _ = sigint.recv() => return Ok(exit::CANCELED),
            };
            follow(&cli, &c, name, stream, &mut sigint).await
        }
        Command::Files { command } => files(&cli, &c, command).await,
    }
}

/// A cancel that gives up after a few seconds: Ctrl-C must never hang on a dead server.
async fn cancel_bounded(c: &Client, name: &str, id: &str) -> Result<(), ClientError> {
    tokio::time::timeout(Duration::from_secs(5), c.cancel(name, id))
        .await
        .unwrap_or_else(|_| Err(ClientError::Transport("the cancel timed out".into())))
}

/// SIGINT as a stream, installed before any request so that no Ctrl-C is lost.
fn interrupts() -> std::result::Result<Signal, Failure> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).map_err(|e| Failure {
        code: exit::ERROR,
        message: format!("cannot handle Ctrl-C: {e}"),
    })
}

fn command_sandbox(command: &Command) -> Option<&str> {
    match command {
        Command::Create { name, .. }
        | Command::Get { name }
        | Command::Delete { name }
        | Command::Stop { name }
        | Command::Resume { name }
        | Command::Configure { name, .. }
        | Command::Invoke { name, .. }
        | Command::Logs { name, .. }
        | Command::Cancel { name, .. }
        | Command::Exec { name, .. } => Some(name),
        Command::Files { command } => Some(match command {
            FilesCommand::Ls { name, .. }
            | FilesCommand::Get { name, .. }
            | FilesCommand::Put { name, .. }
            | FilesCommand::Rm { name, .. } => name,
        }),
        _ => None,
    }
}

fn show_sandbox(cli: &Cli, s: &agentbox_proto::SandboxSummary) {
    if cli.json {
        print_json(s);
    } else {
        let message = s
            .message
            .as_deref()
            .map(|m| format!(" ({m})"))
            .unwrap_or_default();
        outln!("{} {} {}{message}", s.name, s.status.as_str(), s.mode);
    }
}

/// Splits a command line like a shell would (quotes and backslashes), without expansions.
fn split_words(text: &str) -> std::result::Result<Vec<String>, Failure> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = text.chars();
    let mut quote: Option<char> = None;
    while let Some(ch) = chars.next() {
        match (quote, ch) {
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') | (None, '\\') => {
                if let Some(next) = chars.next() {
                    word.push(next);
                    in_word = true;
                }
            }
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => {
                quote = Some(ch);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if quote.is_some() {
        return Err(usage(format!("unclosed quote in {text:?}")));
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

async fn configure(
    cli: &Cli,
    c: &Client,
    name: &str,
    files: &[String],
    install: &Option<String>,
    entrypoint: &Option<String>,
    env: &[String],
) -> Outcome {
    let mut specs = Vec::new();
    for f in files {
        let (dest, src) = f
            .split_once('=')
            .ok_or_else(|| usage(format!("--file {f:?}: expected DEST=SRC")))?;
        let bytes = std::fs::read(src).map_err(|e| usage(format!("--file {src}: {e}")))?;
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(src)?.permissions());
        specs.push(FileSpec {
            path: dest.to_owned(),
            content: None,
            content_base64: Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
            mode: Some(mode & 0o777),
        });
    }
    let mut env_map = BTreeMap::new();
    for kv in env {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| usage(format!("--env {kv:?}: expected K=V")))?;
        env_map.insert(k.to_owned(), v.to_owned());
    }
    let req = ConfigureRequest {
        files: specs,
        install_command: install.as_deref().map(split_words).transpose()?,
        entrypoint: entrypoint.as_deref().map(split_words).transpose()?,
        env: (!env.is_empty()).then_some(env_map),
        protocol: None,
        ..Default::default()
    };
    let mut stream = c.configure(name, &req).await?;
    let tty = std::io::stderr().is_terminal() && !cli.json;
    let started = Instant::now();
    let spinner = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut frame = 0usize;
    loop {
        let event = tokio::select! {
            ev = stream.next() => ev?,
            _ = tick.tick(), if tty => {
                frame += 1;
                eprint!("\r{} installing… {:.1}s", spinner[frame % spinner.len()], started.elapsed().as_secs_f64());
                let _ = std::io::stderr().flush();
                continue;
            }
        };
        let Some(event) = event else {
            return Err(Failure {
                code: exit::UNAVAILABLE,
                message: "the configure stream ended without a result".into(),
            });
        };
        if tty {
            eprint!("\r\x1b[2K");
        }
        if cli.json {
            print_json(&json!({"id": event.id, "event": event.event, "data": event.data}));
        }
        match event.event.as_str() {
            "log" if !cli.json => write_log(&event)?,
            "result" => {
                let r = &event.data;
                let code = r["installExitCode"].as_i64().unwrap_or(-1);
                if !cli.json {
                    let hash = r["installCommandHash"].as_str().unwrap_or("");
                    let short = hash.get(..12).unwrap_or(hash);
                    if r["skipped"] == true {
                        eprintln!("configured {name}: {short} unchanged, install skipped");
                    } else if code == 0 {
                        eprintln!(
                            "configured {name}: {short} installed in {}ms",
                            r["durationMs"]
                        );
                    } else {
                        eprintln!("install failed with exit code {code}; the previous configuration stays in force");
                    }
                }
                return Ok(if code == 0 { 0 } else { exit::ERROR });
            }
            "error" => {
                return Err(Failure {
                    code: exit::ERROR,
                    message: event.data["message"]
                        .as_str()
                        .unwrap_or("configure failed")
                        .into(),
                })
            }
            _ => {}
        }
    }
}

/// Writes a `log` event's exact bytes to stdout or stderr.
fn write_log(event: &Event) -> std::io::Result<()> {
    let d = &event.data;
    let mut bytes = match (d["data"].as_str(), d["dataBase64"].as_str()) {
        (Some(text), _) => text.as_bytes().to_vec(),
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    if d["partial"] != true {
        bytes.push(b'\n');
    }
    if d["stream"] == "stderr" {
        let mut err = std::io::stderr().lock();
        err.write_all(&bytes)?;
        err.flush()
    } else {
        let mut out = std::io::stdout().lock();
        if out.write_all(&bytes).and_then(|()| out.flush()).is_err() {
            std::process::exit(141);
        }
        Ok(())
    }
}

fn exit_code_of(data: &Value) -> u8 {
    match data["reason"].as_str() {
        Some("timeout") => exit::TIMEOUT,
        Some("canceled") => exit::CANCELED,
        Some("runner_restarted") => exit::RUNNER_RESTARTED,
        _ => {
            let code = data["exitCode"].as_i64().unwrap_or(1);
            u8::try_from(code).unwrap_or(exit::ERROR)
        }
    }
}

async fn detach_after_start(cli: &Cli, mut stream: EventStream) -> Outcome {
    while let Some(event) = stream.next().await? {
        if event.event == "start" {
            let id = event.data["invokeId"].as_str().unwrap_or_default();
            if cli.json {
                print_json(&event.data);
            } else {
                outln!("{id}");
            }
            return Ok(0);
        }
    }
    Err(Failure {
        code: exit::UNAVAILABLE,
        message: "the stream ended before the invoke started".into(),
    })
}

/// Streams an invoke to the end, resuming from the last event id when the connection drops.
/// Ctrl-C cancels the invoke and waits for its exit; a second Ctrl-C detaches.
/// Streams an invoke to the end, resuming from the last event id when the connection drops.
/// Ctrl-C cancels the invoke and waits for its exit; a second Ctrl-C detaches.
async fn follow(
    cli: &Cli,
    c: &Client,
    name: &str,
    stream: EventStream,
    sigint: &mut Signal,
) -> Outcome {
    follow_inner(cli, c, name, None, stream, None, sigint).await
}

async fn follow_inner(
    cli: &Cli,
    c: &Client,
    name: &str,
    mut invoke_id: Option<String>,
    mut stream: EventStream,
    until: Option<u64>,
    sigint: &mut Signal,
) -> Outcome {
    let mut last_id = 0u64;
    let mut interrupts = 0;
    let mut retries = 0u32;
    if until == Some(0) {
        return Ok(0);
    }
    loop {
        let next = tokio::select! {
            ev = stream.next() => ev,
            _ = sigint.recv() => {
                interrupts += 1;
                match (&invoke_id, interrupts) {
                    (Some(id), 1) => {
                        eprintln!("\nagentbox: canceling {id} (Ctrl-C again to detach)");
                        if let Err(e) = cancel_bounded(c, name, id).await {
                            eprintln!("agentbox: cancel failed: {e}");
                        }
                        continue;
                    }
                    (Some(id), _) => {
                        eprintln!("agentbox: detached from {id}; reattach with: agentbox logs {name} {id} --follow");
                        return Ok(exit::CANCELED);
                    }
                    (None, _) => return Ok(exit::CANCELED),
                }
            }
        };
        match next {
            Ok(Some(event)) => {
                retries = 0;
                if event.id > 0 {
                    last_id = event.id;
                }
                if cli.json {
                    print_json(&json!({"id": event.id, "event": event.event, "data": event.data}));
                }
                match event.event.as_str() {
                    "start" => {
                        invoke_id = event.data["invokeId"].as_str().map(str::to_owned);
                    }
                    "log" if !cli.json => write_log(&event)?,
                    "error" if !cli.json => {
                        eprintln!(
                            "agentbox: {}",
                            event.data["message"].as_str().unwrap_or("error")
                        );
                    }
                    "exit" => return Ok(exit_code_of(&event.data)),
                    _ => {}
                }
                if until.is_some_and(|u| last_id >= u) {
                    return Ok(0);
                }
            }
            Ok(None) | Err(ClientError::Transport(_)) => {
                // The connection dropped before `exit`: resume after the last event seen.
                let Some(id) = invoke_id.clone() else {
                    return Err(Failure {
                        code: exit::UNAVAILABLE,
                        message: "the connection dropped before the invoke started".into(),
                    });
                };
                retries += 1;
                if retries > 30 {
                    return Err(Failure {
                        code: exit::UNAVAILABLE,
                        message: format!("lost the stream of {id} and could not resume it"),
                    });
                }
                let pause = Duration::from_millis(100 * u64::from(retries.min(20)));
                let resumed = tokio::select! {
                    r = async {
                        tokio::time::sleep(pause).await;
                        c.events(name, &id, last_id).await
                    } => r,
                    // Ctrl-C while reconnecting: the same rule, cancel first, detach second.
                    _ = sigint.recv() => {
                        interrupts += 1;
                        if interrupts == 1 {
                            eprintln!("\nagentbox: canceling {id} (Ctrl-C again to detach)");
                            if let Err(e) = cancel_bounded(c, name, &id).await {
                                eprintln!("agentbox: cancel failed: {e}");
                            }
                            continue;
                        }
                        eprintln!("agentbox: detached from {id}; reattach with: agentbox logs {name} {id} --follow");
                        return Ok(exit::CANCELED);
                    }
                };
                match resumed {
                    Ok(s) => stream = s,
                    Err(ClientError::Transport(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

async fn files(cli: &Cli, c: &Client, command: &FilesCommand) -> Outcome {
    match command {
        FilesCommand::Ls { name, path } => {
            let listing = c.list_files(name, path).await?;
            if cli.json {
                print_json(&listing);
            } else if let Some(entries) = listing["entries"].as_array() {
                for e in entries {
                    outln!(
                        "{} {:>10} {}",
                        e["mode"].as_str().unwrap_or("?"),
                        e["size"],
                        e["name"].as_str().unwrap_or("?")
                    );
                }
            }
            Ok(0)
        }
        FilesCommand::Get { name, path, dest } => {
            let mut resp = c.get_file(name, path).await?;
            let mut out: Box<dyn Write> = match dest {
                Some(p) if p.as_os_str() != "-" => Box::new(std::fs::File::create(p)?),
                _ => Box::new(std::io::stdout().lock()),
            };
            while let Some(chunk) = resp
                .chunk()
                .await
                .map_err(|e| ClientError::Transport(e.to_string()))?
            {
                out.write_all(&chunk)?;
            }
            out.flush()?;
            Ok(0)
        }
        FilesCommand::Put { name, src, path } => {
            let body = if src == "-" {
                let mut buf = Vec::new();
                std::io::stdin().read_to_end(&mut buf)?;
                reqwest::Body::from(buf)
            } else {
                let file = tokio::fs::File::open(src)
                    .await
                    .map_err(|e| usage(format!("{src}: {e}")))?;
                reqwest::Body::wrap_stream(tokio_util_stream(file))
            };
            let written = c.put_file(name, path, body).await?;
            if cli.json {
                print_json(&written);
            } else {
                outln!(
                    "{} {} bytes sha256 {}",
                    written["path"].as_str().unwrap_or(path),
                    written["size"],
                    written["sha256"].as_str().unwrap_or("")
                );
            }
            Ok(0)
        }
        FilesCommand::Rm {
            name,
            path,
            recursive,
        } => {
            c.delete_file(name, path, *recursive).await?;
            Ok(0)
        }
    }
}

/// A file as a stream of chunks, read as the upload goes.
fn tokio_util_stream(
    file: tokio::fs::File,
) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> {
    futures_util::stream::unfold(file, |mut file| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 256 << 10];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(bytes::Bytes::from(buf)), file))
            }
            Err(e) => Some((Err(e), file)),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words() {
        let ok = |s: &str| split_words(s).map_err(|f| f.message).expect("split");
        assert_eq!(
            ok("pip install -r req.txt"),
            ["pip", "install", "-r", "req.txt"]
        );
        assert_eq!(
            ok(r#"sh -c 'echo "a b"; exit 3'"#),
            ["sh", "-c", r#"echo "a b"; exit 3"#]
        );
        assert_eq!(ok(r#"a\ b "c\"d" ''"#), ["a b", "c\"d", ""]);
        assert!(split_words("'open").is_err());
    }

    #[test]
    fn exit_codes() {
        assert_eq!(
            exit_code_of(&json!({"exitCode": 3, "reason": "completed"})),
            3
        );
        assert_eq!(
            exit_code_of(&json!({"exitCode": 137, "reason": "completed"})),
            137
        );
        assert_eq!(
            exit_code_of(&json!({"exitCode": 143, "reason": "canceled"})),
            exit::CANCELED
        );
        assert_eq!(
            exit_code_of(&json!({"exitCode": 143, "reason": "timeout"})),
            exit::TIMEOUT
        );
        assert_eq!(
            exit_code_of(&json!({"exitCode": -1, "reason": "runner_restarted"})),
            exit::RUNNER_RESTARTED
        );
    }
}
