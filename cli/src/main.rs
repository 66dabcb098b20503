//! `agentbox`: the command for people and CI.
//!
//! Exit codes: an invoke or exec exits with the entrypoint's own code (128+N when signal N
//! ended it); 124 when it timed out; 130 when it was canceled (Ctrl-C) or detached by a second
//! Ctrl-C; 75 when the runner restarted under it; 69 when the server cannot be reached or the
//! stream could not be resumed; 1 for any other error (the server's message is printed); 64 for
//! bad usage.

mod locate;
mod shell;
mod up;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use agentbox_cli::client::{encode_path, Client, ClientError, EventStream, InvokeOptions};
use agentbox_cli::sse::Event;
use agentbox_proto::{ConfigureRequest, CreateSandboxRequest, ExecRequest, FileSpec, TemplateRef};
use base64::Engine;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
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

/// Exit codes, shown at the end of `agentbox --help` and in docs/cli.md.
const EXIT_CODES_HELP: &str = "\
Exit codes:
  0      success
  N      invoke, exec: the entrypoint's own exit code (128+N when signal N ended it)
  1      any other error (the server's message is printed on one line)
  64     bad usage: an unknown flag, a missing argument, no server known
  69     the server cannot be reached, or a cut stream could not be resumed
  75     the runner restarted while the invoke ran
  124    the invoke timed out
  130    canceled with Ctrl-C (or detached with a second one)

Where the CLI finds its server: --api-url/--api-key (or AGENTBOX_API_URL/AGENTBOX_API_KEY),
else the cli.json that `agentbox up` writes: <--state-dir>/cli.json when --state-dir or
AGENTBOX_STATE_DIR is set, else the first .agentbox/cli.json in the current directory or one
of its parents.";

/// The heading of the options every command takes.
const GLOBAL: &str = "Global options";

#[derive(Debug, Parser)]
#[command(
    name = "agentbox",
    version,
    about = "Run AI agents in sandboxes and drive them over HTTP.",
    after_help = EXIT_CODES_HELP,
    max_term_width = 100
)]
struct Cli {
    /// Control plane URL [default: the apiUrl of `agentbox up`'s cli.json].
    #[arg(
        long,
        global = true,
        env = "AGENTBOX_API_URL",
        hide_env_values = true,
        value_name = "URL",
        help_heading = GLOBAL
    )]
    api_url: Option<String>,
    /// API key [default: the apiKey of `agentbox up`'s cli.json].
    #[arg(
        long,
        global = true,
        env = "AGENTBOX_API_KEY",
        hide_env_values = true,
        value_name = "KEY",
        help_heading = GLOBAL
    )]
    api_key: Option<String>,
    /// Talk to one runner directly instead of a control plane (sandbox names are then ignored).
    #[arg(
        long,
        global = true,
        env = "AGENTBOX_RUNNER_URL",
        hide_env_values = true,
        value_name = "URL",
        help_heading = GLOBAL
    )]
    runner: Option<String>,
    /// The runner's token (with --runner).
    #[arg(
        long,
        global = true,
        env = "AGENTBOX_RUNNER_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN",
        help_heading = GLOBAL
    )]
    token: Option<String>,
    /// The directory of `agentbox up`'s state and cli.json [default for `up`: .agentbox; for the
    /// other commands: the first .agentbox/cli.json in the current directory or its parents].
    #[arg(
        long,
        global = true,
        env = "AGENTBOX_STATE_DIR",
        hide_env_values = true,
        value_name = "DIR",
        help_heading = GLOBAL
    )]
    state_dir: Option<PathBuf>,
    /// Output format: text for people, json for programs (one JSON object, or JSON lines for
    /// streams).
    #[arg(
        short,
        long,
        global = true,
        value_enum,
        default_value_t = Output::Text,
        value_name = "FORMAT",
        help_heading = GLOBAL
    )]
    output: Output,
    /// The namespace of the sandbox named: names are per namespace, so a caller of several
    /// picks one (needed when the name is in more than one) [create's default: the caller's
    /// first namespace; elsewhere: wherever the name is, the caller's first namespace first].
    /// With `list` and `credentials list`: only this namespace.
    #[arg(
        id = "sandbox_namespace",
        long = "namespace",
        global = true,
        env = "AGENTBOX_NAMESPACE",
        value_name = "NAMESPACE",
        help_heading = GLOBAL
    )]
    namespace: Option<String>,
    /// The same as -o json.
    #[arg(long, global = true, hide = true)]
    json: bool,
    /// Print only what was asked for: no progress, no notes on stderr (errors still are), names
    /// only in lists.
    #[arg(short, long, global = true, help_heading = GLOBAL)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

/// `-o`'s values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    /// Tables and plain lines.
    Text,
    /// JSON.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a control plane in the foreground (local backend by default) with a fresh API key,
    /// saved in <state-dir>/cli.json for the other commands.
    Up(up::UpArgs),
    /// Create a sandbox.
    Create {
        /// The sandbox's name: lowercase letters, digits and '-', at most 63.
        name: String,
        /// The template it is made from (`agentbox up` has `default` and `code`, plus those of
        /// --templates-file).
        #[arg(long, default_value = "default")]
        template: String,
        /// Wait until it is Running (at most 2 minutes).
        #[arg(long)]
        wait: bool,
        /// Its lifetime, e.g. `8h`: then it is stopped (or deleted, per its template)
        /// [default: the template's, else none].
        #[arg(long)]
        timeout: Option<String>,
        /// Stop it after this long without use, e.g. `30m`; the next request resumes it
        /// [default: the template's, else never].
        #[arg(long)]
        idle_timeout: Option<String>,
    },
    /// List sandboxes.
    List,
    /// Show one sandbox.
    Get {
        /// The sandbox.
        name: String,
    },
    /// Delete a sandbox and its workspace.
    Delete {
        /// The sandbox.
        name: String,
    },
    /// Stop a sandbox (its workspace is kept).
    Stop {
        /// The sandbox.
        name: String,
    },
    /// Start a stopped sandbox again, on its kept workspace.
    Resume {
        /// The sandbox.
        name: String,
    },
    /// Upload files, run the install command (once per distinct files + command), set the
    /// entrypoint. The install's output streams through; exits 1 when the install fails.
    Configure {
        /// The sandbox.
        name: String,
        /// Upload the local file SRC as DEST (relative to /workspace, or absolute inside it);
        /// repeat for more files.
        #[arg(long = "file", short = 'f', value_name = "DEST=SRC")]
        files: Vec<String>,
        /// The install command, run in /workspace (split like a shell would, without
        /// expansions: use `sh -c '...'` for pipes and variables).
        #[arg(long, value_name = "COMMAND")]
        install: Option<String>,
        /// The command every invoke runs (split like --install) [default: the previous one].
        #[arg(long, value_name = "COMMAND")]
        entrypoint: Option<String>,
        /// K=V environment for installs and invokes; repeat for more.
        #[arg(long = "env", short = 'e', value_name = "K=V")]
        env: Vec<String>,
    },
    /// Run the entrypoint; stdout and stderr stream through byte for byte, the exit code is the
    /// entrypoint's. Ctrl-C cancels it (a second Ctrl-C detaches).
    Invoke {
        /// The sandbox.
        name: String,
        /// The prompt: the entrypoint's stdin when --stdin sends nothing (an ACP agent's prompt turn).
        #[arg(long, short)]
        prompt: Option<String>,
        /// Send FILE (or - for standard input) as the entrypoint's stdin.
        #[arg(long, value_name = "FILE")]
        stdin: Option<String>,
        /// Time limit, e.g. 90s, 5m, 1h30m [default: the runner's, 30m].
        #[arg(long, value_name = "DURATION")]
        timeout: Option<String>,
        /// Start it, print its id, and leave it running.
        #[arg(long)]
        detach: bool,
    },
    /// An interactive terminal in the sandbox: a shell in /workspace, or CMD. Keys (Ctrl-C too)
    /// go to the remote process and its exit code becomes this command's; the window size
    /// follows. Ctrl-] detaches (the shell keeps running for the runner's reconnect window,
    /// 5m by default); --attach ID reattaches and replays what was missed.
    Shell {
        /// The sandbox.
        name: String,
        /// Reattach to this process (printed on detach; `agentbox ps NAME` lists them).
        #[arg(long, value_name = "ID", conflicts_with = "command")]
        attach: Option<String>,
        /// What to run instead of the shell.
        #[arg(last = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// List a sandbox's processes (newest first): id, state, pid or exit, tty, command.
    Ps {
        /// The sandbox.
        name: String,
    },
    /// List a sandbox's recent invokes and execs (newest first): id, state, exit, duration.
    Invokes {
        /// The sandbox.
        name: String,
        /// Show at most N.
        #[arg(long, short = 'n', default_value_t = 20, value_name = "N")]
        limit: usize,
    },
    /// Show an invoke's output (from the start); --follow waits for the end.
    Logs {
        /// The sandbox.
        name: String,
        /// The invoke (`agentbox invokes NAME` lists them).
        invoke_id: String,
        /// Keep following until the invoke exits, and exit with its code.
        #[arg(long, short)]
        follow: bool,
    },
    /// Cancel a running invoke.
    Cancel {
        /// The sandbox.
        name: String,
        /// The invoke (`agentbox invokes NAME` lists them).
        invoke_id: String,
    },
    /// Run a command in the sandbox, outside the entrypoint (`agentbox exec NAME -- ls -la`).
    Exec {
        /// The sandbox.
        name: String,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Forward a local port to a port in the sandbox, like `kubectl port-forward`: listens on
    /// 127.0.0.1:LOCAL and tunnels each connection (any TCP protocol) to 127.0.0.1:REMOTE in
    /// the sandbox through the control plane. `:REMOTE` or `0:REMOTE` picks a free local port
    /// and prints it. Forwards the port first if needed. Ctrl-C stops.
    PortForward {
        /// The sandbox.
        name: String,
        /// LOCAL:REMOTE, `:REMOTE`, or REMOTE (the same port number locally).
        #[arg(value_name = "LOCAL:REMOTE")]
        ports: String,
    },
    /// Move files in and out of a sandbox's workspace.
    Files {
        #[command(subcommand)]
        command: FilesCommand,
    },
    /// Who the server thinks you are.
    Whoami,
    /// Governance policies per namespace (administrators set them).
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Named credentials given to agents by reference; values are never shown.
    Credentials {
        #[command(subcommand)]
        command: CredentialsCommand,
    },
    /// The audit trail, newest first.
    Audit {
        /// Only this sandbox.
        #[arg(long)]
        sandbox: Option<String>,
        /// Only this caller (an API key's name).
        #[arg(long)]
        actor: Option<String>,
        /// Only this action (`governance.*` for a prefix).
        #[arg(long)]
        action: Option<String>,
        /// Only records this recent (e.g. 1h, 30m) or since an RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// At most this many records (1 to 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Then print new records as they are written, until Ctrl-C.
        #[arg(short, long)]
        follow: bool,
    },
    /// Print a shell completion script (`agentbox completions bash > /etc/bash_completion.d/agentbox`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Print a namespace's policy (`*`: the default), or every policy.
    Get {
        /// The namespace [default: every policy].
        namespace: Option<String>,
    },
    /// Set a namespace's policy from JSON, e.g. '{"maxSandboxesTotal": 10}'.
    Set {
        /// The namespace, or `*` for every namespace without its own.
        namespace: String,
        /// The policy as JSON, or @FILE to read it from FILE.
        policy: String,
    },
}

#[derive(Debug, Subcommand)]
enum CredentialsCommand {
    /// Set a credential's value from a file or an environment variable (never an argument).
    Set {
        /// The credential's name.
        name: String,
        /// Read the value from FILE.
        #[arg(
            long,
            conflicts_with = "from_env",
            required_unless_present = "from_env"
        )]
        from_file: Option<std::path::PathBuf>,
        /// Read the value from the environment variable VAR.
        #[arg(long)]
        from_env: Option<String>,
    },
    /// List credentials' names.
    List,
    /// Delete a credential.
    Delete {
        /// The credential's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum FilesCommand {
    /// List a directory.
    Ls {
        /// The sandbox.
        name: String,
        /// The directory (relative to /workspace, or absolute inside it).
        #[arg(default_value = "/workspace")]
        path: String,
    },
    /// Download a file to DEST (default: standard output).
    Get {
        /// The sandbox.
        name: String,
        /// The file in the sandbox.
        path: String,
        /// Where to write it (- or nothing: standard output).
        dest: Option<PathBuf>,
    },
    /// Upload SRC (or - for standard input) to PATH.
    Put {
        /// The sandbox.
        name: String,
        /// The local file, or - for standard input.
        src: String,
        /// Where it goes in the sandbox (parent directories are made).
        path: String,
    },
    /// Delete a file (-r: a directory).
    Rm {
        /// The sandbox.
        name: String,
        /// The file or directory in the sandbox.
        path: String,
        /// Delete a directory and everything in it.
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

/// The global options named at the end of every command's help (they are described once, in
/// `agentbox --help`).
const GLOBAL_NOTE: &str =
    "Global options (see `agentbox --help`): --api-url, --api-key, --runner, \
                           --token, --state-dir, -o/--output, -q/--quiet";

/// The command line, with the global options described once: in `agentbox --help`. Each
/// subcommand gets hidden copies of them (clap then does not add its own visible ones), except
/// that `up` shows the two that concern it (--state-dir, --quiet).
fn cli_command() -> clap::Command {
    fn hide(cmd: clap::Command, globals: &[clap::Arg]) -> clap::Command {
        let up = cmd.get_name() == "up";
        let mut cmd = cmd;
        for arg in globals {
            let shown = up && matches!(arg.get_id().as_str(), "state_dir" | "quiet");
            cmd = cmd.arg(arg.clone().hide(!shown));
        }
        if !up {
            cmd = cmd.after_help(GLOBAL_NOTE);
        }
        let subs: Vec<String> = cmd
            .get_subcommands()
            .map(|s| s.get_name().to_owned())
            .collect();
        for name in subs {
            cmd = cmd.mut_subcommand(name, |s| hide(s, globals));
        }
        cmd
    }
    let cmd = Cli::command();
    let globals: Vec<clap::Arg> = cmd
        .get_arguments()
        .filter(|a| a.is_global_set())
        .cloned()
        .collect();
    let subs: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_owned())
        .collect();
    subs.into_iter().fold(cmd, |cmd, name| {
        cmd.mut_subcommand(name, |s| hide(s, &globals))
    })
}

/// Where the credential and the state directory came from (flag or variable).
#[derive(Debug, Default)]
struct Sources {
    api_url: Option<locate::Source>,
    api_key: Option<locate::Source>,
    token: Option<locate::Source>,
}

fn source_of(
    matches: &clap::ArgMatches,
    id: &str,
    flag: &'static str,
    var: &'static str,
) -> Option<locate::Source> {
    match matches.value_source(id)? {
        clap::parser::ValueSource::CommandLine => Some(locate::Source::Flag(flag)),
        clap::parser::ValueSource::EnvVariable => Some(locate::Source::Env(var)),
        _ => None,
    }
}

fn main() -> ExitCode {
    let parsed = cli_command()
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m).map(|cli| (cli, m)));
    let (mut cli, matches) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(exit::USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    cli.json |= cli.output == Output::Json;
    let sources = Sources {
        api_url: source_of(&matches, "api_url", "--api-url", "AGENTBOX_API_URL"),
        api_key: source_of(&matches, "api_key", "--api-key", "AGENTBOX_API_KEY"),
        token: source_of(&matches, "token", "--token", "AGENTBOX_RUNNER_TOKEN"),
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
    match runtime.block_on(run(cli, sources)) {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("agentbox: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// Where the CLI finds its server: flags and environment first, then what `up` saved.
fn client(cli: &Cli, sources: &Sources) -> std::result::Result<Client, Failure> {
    if let Some(url) = &cli.runner {
        let token = cli
            .token
            .clone()
            .ok_or_else(|| usage("--runner needs --token (or AGENTBOX_RUNNER_TOKEN)"))?;
        let from = sources
            .token
            .clone()
            .unwrap_or(locate::Source::Flag("--token"));
        return Ok(Client::runner(url, &token).with_refusal_hint(format!(
            "the runner at {url} refused the token from {from}; check it"
        )));
    }
    let cwd = std::env::current_dir()?;
    let saved = locate::find_saved(cli.state_dir.as_deref(), &cwd).map_err(usage)?;
    let with =
        |value: &Option<String>, source: &Option<locate::Source>| value.clone().zip(source.clone());
    let target = locate::target(
        with(&cli.api_url, &sources.api_url),
        with(&cli.api_key, &sources.api_key),
        saved,
    )
    .map_err(usage)?;
    let hint = target.refusal_hint();
    Ok(Client::control_plane(&target.url, &target.key)
        .with_refusal_hint(hint)
        .with_namespace(cli.namespace.clone()))
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

async fn run(cli: Cli, sources: Sources) -> Outcome {
    if let Command::Up(args) = &cli.command {
        for (source, flag) in [
            (&sources.api_url, "--api-url"),
            (&sources.api_key, "--api-key"),
            (&sources.token, "--token"),
        ] {
            if matches!(source, Some(locate::Source::Flag(_))) {
                return Err(usage(format!(
                    "`agentbox up` starts its own control plane and makes its own key; {flag} is for the other commands"
                )));
            }
        }
        let state_dir = cli
            .state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(".agentbox"));
        return up::run(args, &state_dir, cli.quiet).await;
    }
    if let Command::Completions { shell } = &cli.command {
        clap_complete::generate(
            *shell,
            &mut cli_command(),
            "agentbox",
            &mut std::io::stdout(),
        );
        return Ok(0);
    }
    let c = client(&cli, &sources)?;
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
            wait,
            timeout,
            idle_timeout,
        } => {
            let mut s = c
                .create_sandbox(&CreateSandboxRequest {
                    name: name.clone(),
                    namespace: cli.namespace.clone(),
                    template_ref: Some(TemplateRef {
                        name: template.clone(),
                        kind: Some("ClusterSandboxTemplate".into()),
                    }),
                    timeout: timeout.clone(),
                    idle_timeout: idle_timeout.clone(),
                    storage: None,
                    credentials: Vec::new(),
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
            } else if cli.quiet {
                for s in list {
                    outln!("{}", s.name);
                }
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
        Command::Policy { command } => {
            let value = match command {
                PolicyCommand::Get { namespace } => {
                    let rest = match namespace {
                        Some(ns) => format!("governance/policies/{}", encode_path(ns)),
                        None => "governance/policies".into(),
                    };
                    c.api_json(reqwest::Method::GET, &rest, None).await?
                }
                PolicyCommand::Set { namespace, policy } => {
                    let text = match policy.strip_prefix('@') {
                        Some(path) => std::fs::read_to_string(path)
                            .map_err(|e| usage(format!("{path}: {e}")))?,
                        None => policy.clone(),
                    };
                    let body: serde_json::Value = serde_json::from_str(&text)
                        .map_err(|e| usage(format!("the policy is not JSON: {e}")))?;
                    let rest = format!("governance/policies/{}", encode_path(namespace));
                    c.api_json(reqwest::Method::PUT, &rest, Some(&body)).await?
                }
            };
            print_json(&value);
            Ok(0)
        }
        Command::Credentials { command } => {
            let query = |ns: &Option<String>| {
                ns.as_ref()
                    .map(|n| format!("?namespace={}", encode_path(n)))
                    .unwrap_or_default()
            };
            let namespace = &cli.namespace;
            match command {
                CredentialsCommand::Set {
                    name,
                    from_file,
                    from_env,
                } => {
                    let value = match (from_file, from_env) {
                        (Some(path), _) => std::fs::read_to_string(path)
                            .map_err(|e| usage(format!("{}: {e}", path.display())))?,
                        (None, Some(var)) => std::env::var(var)
                            .map_err(|_| usage(format!("${var} is not set (or not UTF-8)")))?,
                        (None, None) => return Err(usage("give --from-file or --from-env")),
                    };
                    let rest = format!("credentials/{}{}", encode_path(name), query(namespace));
                    c.api_json(
                        reqwest::Method::PUT,
                        &rest,
                        Some(&json!({ "value": value })),
                    )
                    .await?;
                    if !cli.quiet {
                        outln!("credential {name} set");
                    }
                }
                CredentialsCommand::List => {
                    let list = c
                        .api_json(
                            reqwest::Method::GET,
                            &format!("credentials{}", query(namespace)),
                            None,
                        )
                        .await?;
                    if cli.json {
                        print_json(&list);
                    } else {
                        for item in list["credentials"].as_array().into_iter().flatten() {
                            outln!(
                                "{:<24} {:<16} {}",
                                item["name"].as_str().unwrap_or(""),
                                item["namespace"].as_str().unwrap_or(""),
                                item["updatedAt"].as_str().unwrap_or("")
                            );
                        }
                    }
                }
                CredentialsCommand::Delete { name } => {
                    let rest = format!("credentials/{}{}", encode_path(name), query(namespace));
                    c.api_json(reqwest::Method::DELETE, &rest, None).await?;
                }
            }
            Ok(0)
        }
        Command::Audit {
            sandbox,
            actor,
            action,
            since,
            limit,
            follow,
        } => {
            let mut base = String::new();
            for (key, value) in [("sandbox", sandbox), ("actor", actor), ("action", action)] {
                if let Some(v) = value {
                    base.push_str(&format!("&{key}={}", encode_path(v)));
                }
            }
            let line = |e: &serde_json::Value| {
                if cli.json {
                    return e.to_string();
                }
                let text = |k: &str| e[k].as_str().unwrap_or("-").to_owned();
                format!(
                    "{} {:<12} {:<24} {:<16} {:<8} {}",
                    text("time"),
                    text("actor"),
                    text("action"),
                    text("sandbox"),
                    text("outcome"),
                    e["status"]
                )
            };
            let mut query = format!("audit/events?limit={limit}{base}");
            if let Some(v) = since {
                query.push_str(&format!("&since={}", encode_path(v)));
            }
            let page = c.api_json(reqwest::Method::GET, &query, None).await?;
            let events: Vec<serde_json::Value> =
                page["events"].as_array().cloned().unwrap_or_default();
            if !follow {
                if cli.json {
                    print_json(&page);
                } else {
                    for e in &events {
                        outln!("{}", line(e));
                    }
                }
                return Ok(0);
            }
            // Oldest first, then every new record as it is written (polled each second), one
            // JSON object per line with --json; until Ctrl-C.
            for e in events.iter().rev() {
                outln!("{}", line(e));
            }
            let mut newest = events
                .first()
                .and_then(|e| e["time"].as_str())
                .map(str::to_owned);
            let mut seen: std::collections::HashSet<String> = events
                .iter()
                .filter(|e| e["time"].as_str() == newest.as_deref())
                .map(|e| e.to_string())
                .collect();
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let mut query = format!("audit/events?limit=1000{base}");
                match &newest {
                    Some(t) => query.push_str(&format!("&since={}", encode_path(t))),
                    None => query.push_str("&since=2s"),
                }
                let page = c.api_json(reqwest::Method::GET, &query, None).await?;
                let events: Vec<serde_json::Value> =
                    page["events"].as_array().cloned().unwrap_or_default();
                for e in events.iter().rev() {
                    let text = e.to_string();
                    if seen.contains(&text) {
                        continue;
                    }
                    outln!("{}", line(e));
                    let time = e["time"].as_str().map(str::to_owned);
                    if time != newest {
                        newest = time;
                        seen.clear();
                    }
                    seen.insert(text);
                }
            }
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
                // Linger, not the server's default `cancel`: a dropped connection is resumed
                // (Ctrl-C cancels explicitly); a detached invoke runs on.
                on_disconnect: Some(if *detach { "continue" } else { "linger" }.to_owned()),
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
                Some(
                    c.invoke_summary(name, invoke_id)
                        .await
                        .map_err(|e| unknown_invoke(e, name))?
                        .last_event_id,
                )
            };
            let mut sigint = interrupts()?;
            let stream = c
                .events(name, invoke_id, 0)
                .await
                .map_err(|e| unknown_invoke(e, name))?;
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
        Command::Shell {
            name,
            attach,
            command,
        } => {
            let ended = shell::run(&c, name, command, attach.as_deref()).await?;
            let code = match ended {
                shell::Ended::Exited(code) => code,
                shell::Ended::Detached(id) => {
                    eprintln!("\r\ndetached; reattach with: agentbox shell {name} --attach {id}");
                    0
                }
            };
            // The key-reading thread may sit in a read: leave without waiting for it.
            let _ = std::io::stdout().flush();
            std::process::exit(i32::from(code));
        }
        Command::Ps { name } => {
            let list = c.processes(name).await?;
            if cli.json {
                print_json(&json!(list));
            } else if cli.quiet {
                for p in &list.processes {
                    outln!("{}", p.id);
                }
            } else {
                outln!(
                    "{:<34} {:<8} {:<10} {:<8} COMMAND",
                    "ID",
                    "STATE",
                    "PID/EXIT",
                    "TTY"
                );
                for p in &list.processes {
                    let state = match p.state {
                        agentbox_proto::InvokeState::Running => "running",
                        agentbox_proto::InvokeState::Exited => "exited",
                    };
                    let pid = match (p.pid, p.exit_code, p.reason) {
                        (Some(pid), _, _) => pid.to_string(),
                        (None, _, Some(r)) if r != agentbox_proto::ExitReason::Completed => {
                            r.as_str().to_owned()
                        }
                        (None, Some(code), _) => code.to_string(),
                        _ => "-".into(),
                    };
                    let tty = p
                        .pty
                        .map_or("-".to_owned(), |s| format!("{}x{}", s.cols, s.rows));
                    let cmd = p.argv.as_ref().map_or(String::from("?"), |a| a.join(" "));
                    outln!("{:<34} {:<8} {:<10} {:<8} {}", p.id, state, pid, tty, cmd);
                }
            }
            Ok(0)
        }
        Command::Invokes { name, limit } => {
            let list = c.invokes(name).await?;
            let shown = list.invokes.iter().take(*limit);
            if cli.json {
                print_json(&json!({ "invokes": shown.collect::<Vec<_>>() }));
            } else if cli.quiet {
                for i in shown {
                    outln!("{}", i.invoke_id);
                }
            } else {
                let shown: Vec<_> = shown.collect();
                let width = shown
                    .iter()
                    .map(|i| i.invoke_id.as_str().len())
                    .max()
                    .unwrap_or(0)
                    .max(2);
                outln!(
                    "{:<width$} {:<6} {:<8} {:<9} {:>9}  STARTED",
                    "ID",
                    "KIND",
                    "STATE",
                    "EXIT",
                    "DURATION"
                );
                for i in shown {
                    outln!("{}", invoke_row(i, width));
                }
            }
            Ok(0)
        }
        Command::Cancel { name, invoke_id } => {
            c.cancel(name, invoke_id)
                .await
                .map_err(|e| unknown_invoke(e, name))?;
            if cli.json {
                print_json(&json!({"invokeId": invoke_id, "status": "canceling"}));
            } else if !cli.quiet {
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
        Command::PortForward { name, ports } => port_forward(&cli, &c, name, ports).await,
    }
}

/// Parses `LOCAL:REMOTE`, `:REMOTE` or `REMOTE` into (local, remote); local 0 picks one.
fn parse_port_pair(text: &str) -> std::result::Result<(u16, u16), String> {
    let port = |s: &str, zero: bool| {
        s.parse::<u16>()
            .ok()
            .filter(|p| zero || *p != 0)
            .ok_or_else(|| format!("{s:?} is not a port (1-65535)"))
    };
    match text.split_once(':') {
        Some(("", remote)) => Ok((0, port(remote, false)?)),
        Some((local, remote)) => Ok((port(local, true)?, port(remote, false)?)),
        None => {
            let p = port(text, false)?;
            Ok((p, p))
        }
    }
}

/// `agentbox port-forward`: a local listener whose connections are tunnelled to the
/// sandbox's port, until Ctrl-C.
async fn port_forward(cli: &Cli, c: &Client, name: &str, ports: &str) -> Outcome {
    let (local, remote) = parse_port_pair(ports).map_err(|m| Failure {
        code: exit::USAGE,
        message: format!("bad LOCAL:REMOTE {ports:?}: {m}"),
    })?;
    let mut sigint = interrupts()?;
    // A port forwarded already (as `tcp`, say) is left as it is.
    if !c.list_ports(name).await?.iter().any(|p| p.port == remote) {
        c.forward_port(name, remote, "http").await?;
    }
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", local))
        .await
        .map_err(|e| Failure {
            code: exit::ERROR,
            message: format!("cannot listen on 127.0.0.1:{local}: {e}"),
        })?;
    let bound = listener.local_addr().map_err(|e| Failure {
        code: exit::ERROR,
        message: e.to_string(),
    })?;
    if cli.json {
        print_json(&json!({"local": bound.to_string(), "remote": remote}));
    } else {
        println!("Forwarding from {bound} -> {remote}");
    }
    let _ = std::io::stdout().flush();
    loop {
        let (mut socket, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    if !cli.quiet {
                        eprintln!("accept failed: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = sigint.recv() => return Ok(0),
        };
        let c = c.clone();
        let name = name.to_owned();
        let quiet = cli.quiet;
        tokio::spawn(async move {
            let _ = socket.set_nodelay(true);
            match c.open_tunnel(&name, remote).await {
                Ok(mut tunnel) => {
                    let _ = tokio::io::copy_bidirectional_with_sizes(
                        &mut socket,
                        &mut tunnel,
                        64 << 10,
                        64 << 10,
                    )
                    .await;
                }
                Err(e) => {
                    if !quiet {
                        eprintln!("port {remote}: {e}");
                    }
                }
            }
        });
    }
}

/// An unknown invoke id: the server's answer, and where to find the ids.
fn unknown_invoke(e: ClientError, name: &str) -> Failure {
    let hint = matches!(&e, ClientError::Api { code, .. } if code == "invoke_not_found");
    let mut failure = Failure::from(e);
    if hint {
        failure.message.push_str(&format!(
            "; `agentbox invokes {name}` lists the recent ones"
        ));
    }
    failure
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
        | Command::Invokes { name, .. }
        | Command::Shell { name, .. }
        | Command::Ps { name }
        | Command::Cancel { name, .. }
        | Command::Exec { name, .. }
        | Command::PortForward { name, .. } => Some(name),
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
    } else if cli.quiet {
        outln!("{}", s.name);
    } else {
        let message = s
            .message
            .as_deref()
            .map(|m| format!(" ({m})"))
            .unwrap_or_default();
        outln!("{} {} {}{message}", s.name, s.status.as_str(), s.mode);
    }
}

/// One line of `agentbox invokes`.
fn invoke_row(i: &agentbox_proto::InvokeSummary, width: usize) -> String {
    let state = match i.state {
        agentbox_proto::InvokeState::Running => "running",
        agentbox_proto::InvokeState::Exited => "exited",
    };
    let kind = match i.kind {
        agentbox_proto::InvokeKind::Invoke => "invoke",
        agentbox_proto::InvokeKind::Exec => "exec",
        agentbox_proto::InvokeKind::Process => "process",
    };
    let exit = match (i.exit_code, i.reason) {
        (_, Some(reason)) if reason != agentbox_proto::ExitReason::Completed => {
            reason.as_str().to_owned()
        }
        (Some(code), _) => code.to_string(),
        (None, _) => "-".to_owned(),
    };
    let duration = i
        .duration_ms
        .map(|ms| format!("{:.1}s", ms as f64 / 1000.0))
        .unwrap_or_else(|| "-".to_owned());
    let ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|now| now.as_millis() as u64)
        .unwrap_or(0)
        .saturating_sub(i.started_at)
        / 1000;
    let started = match ago {
        s if s < 60 => format!("{s}s ago"),
        s if s < 3600 => format!("{}m ago", s / 60),
        s if s < 86_400 => format!("{}h ago", s / 3600),
        s => format!("{}d ago", s / 86_400),
    };
    format!(
        "{:<width$} {:<6} {:<8} {:<9} {:>9}  {started}",
        i.invoke_id, kind, state, exit, duration
    )
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
    let mut sigint = interrupts()?;
    let tty = std::io::stderr().is_terminal() && !cli.json && !cli.quiet;
    // Ctrl-C: the install goes on in the sandbox (the runner finishes every configure it
    // started, so that a half-done install never takes effect); say so, and leave the terminal
    // on a clean line.
    let interrupted = |tty: bool| {
        if tty {
            eprint!("\r\x1b[2K");
        }
        eprintln!(
            "agentbox: interrupted; the configure goes on in the sandbox and takes effect if its \
             install succeeds (a failed install keeps the previous configuration). Run the same \
             `agentbox configure` again to wait for it: an identical one does not install twice."
        );
        Ok(exit::CANCELED)
    };
    let mut stream = tokio::select! {
        s = c.configure(name, &req) => s?,
        _ = sigint.recv() => return interrupted(false),
    };
    let started = Instant::now();
    let spinner = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut frame = 0usize;
    loop {
        let event = tokio::select! {
            ev = stream.next() => ev?,
            _ = sigint.recv() => return interrupted(tty),
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
                let quiet_success = cli.quiet && code == 0;
                if !cli.json && !quiet_success {
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
    // `dataBase64` holds the exact bytes when they are not UTF-8 (`data` is then lossy).
    let mut bytes = match (d["dataBase64"].as_str(), d["data"].as_str()) {
        (Some(b64), _) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap_or_default(),
        (None, Some(text)) => text.as_bytes().to_vec(),
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

/// docs/cli.md: every command's `--help`, generated from the definitions above (a test keeps
/// the committed file equal to it).
#[cfg(test)]
fn reference() -> String {
    fn walk(cmd: &mut clap::Command, path: &str, toc: &mut String, body: &mut String) {
        let help = cmd.render_long_help().to_string();
        let help: Vec<&str> = help.lines().map(str::trim_end).collect();
        let anchor = path.replace(' ', "-");
        toc.push_str(&format!("- [`{path}`](#{anchor})\n"));
        body.push_str(&format!(
            "## {path}\n\n```text\n{}\n```\n\n",
            help.join("\n").trim_end()
        ));
        for sub in cmd.get_subcommands_mut() {
            if sub.get_name() != "help" {
                let path = format!("{path} {}", sub.get_name());
                walk(sub, &path, toc, body);
            }
        }
    }
    let mut cmd = cli_command();
    cmd.build();
    let (mut toc, mut body) = (String::new(), String::new());
    walk(&mut cmd, "agentbox", &mut toc, &mut body);
    format!(
        "# CLI reference\n\n<!-- Generated from cli/src/main.rs and cli/src/up.rs by \
         `UPDATE_DOCS=1 cargo test -p agentbox-cli --bin agentbox reference`; a test fails when \
         it is stale. -->\n\nEvery command's `--help`. The global options are described once, \
         under `agentbox`.\n\n{toc}\n{}",
        body.trim_end()
    ) + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/cli.md");
        let generated = reference();
        if std::env::var_os("UPDATE_DOCS").is_some() {
            std::fs::write(&path, &generated).expect("write docs/cli.md");
            return;
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "docs/cli.md is stale: run `UPDATE_DOCS=1 cargo test -p agentbox-cli --bin agentbox reference`"
        );
    }

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
