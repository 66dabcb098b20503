//! `agentbox shell`: an interactive terminal on a sandbox's terminal WebSocket. The local
//! terminal goes to raw mode (rustix termios; restored on exit, error, panic unwind and
//! SIGTERM/SIGHUP), window changes (SIGWINCH) become `resize` frames, every key (Ctrl-C too)
//! goes to the remote process, and its exit code becomes this command's. `Ctrl-]` detaches:
//! the shell keeps running for the runner's reconnect window, and `--attach ID` resumes it
//! (replaying what was missed).

use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsFd;

use agentbox_cli::client::{encode_query, Client, ClientError};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::signal::unix::{signal, SignalKind};
use tokio_tungstenite::tungstenite::Message;

/// The detach key: Ctrl-] (as telnet's escape).
pub(crate) const DETACH: u8 = 0x1d;

/// The terminal's settings before raw mode, put back on drop.
struct RawMode {
    saved: Option<rustix::termios::Termios>,
}

impl RawMode {
    fn enter() -> RawMode {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return RawMode { saved: None };
        }
        let Ok(saved) = rustix::termios::tcgetattr(stdin.as_fd()) else {
            return RawMode { saved: None };
        };
        let mut raw = saved.clone();
        raw.make_raw();
        let _ = rustix::termios::tcsetattr(
            stdin.as_fd(),
            rustix::termios::OptionalActions::Flush,
            &raw,
        );
        RawMode { saved: Some(saved) }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = rustix::termios::tcsetattr(
                std::io::stdin().as_fd(),
                rustix::termios::OptionalActions::Now,
                saved,
            );
        }
    }
}

fn size() -> (u16, u16) {
    rustix::termios::tcgetwinsize(std::io::stdout().as_fd())
        .ok()
        .filter(|w| w.ws_col > 0 && w.ws_row > 0)
        .map_or((80, 24), |w| (w.ws_col, w.ws_row))
}

fn resize_frame() -> Message {
    let (cols, rows) = size();
    Message::text(format!(
        r#"{{"type":"resize","cols":{cols},"rows":{rows}}}"#
    ))
}

/// How the session ended.
pub(crate) enum Ended {
    /// The remote process exited with this code.
    Exited(u8),
    /// Detached (Ctrl-]); the process id to reattach to.
    Detached(String),
}

/// Runs the terminal until the remote process exits or the user detaches.
pub(crate) async fn run(
    client: &Client,
    name: &str,
    command: &[String],
    attach: Option<&str>,
) -> Result<Ended, ClientError> {
    let query = match attach {
        Some(id) => format!("process={}", encode_query(id)),
        None => {
            let (cols, rows) = size();
            let mut q = format!("cols={cols}&rows={rows}");
            if !command.is_empty() {
                let argv = serde_json::to_string(command).unwrap_or_default();
                q.push_str(&format!("&argv={}", encode_query(&argv)));
            }
            q
        }
    };
    let ws = client.terminal(name, &query).await?;
    let (mut tx, mut rx) = ws.split();
    // Keys come from a thread of their own (a blocking read the runtime need not wait for).
    let (keys_tx, mut keys) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if keys_tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let io = |e: std::io::Error| ClientError::Protocol(e.to_string());
    let mut winch = signal(SignalKind::window_change()).map_err(io)?;
    let mut term = signal(SignalKind::terminate()).map_err(io)?;
    let mut hup = signal(SignalKind::hangup()).map_err(io)?;
    let raw = RawMode::enter();
    let mut stdout = std::io::stdout();
    let mut process_id = attach.map(str::to_owned);
    let mut stdin_open = true;
    let lost = |e: tokio_tungstenite::tungstenite::Error| {
        ClientError::Protocol(format!("the terminal connection failed: {e}"))
    };
    let ended = loop {
        tokio::select! {
            message = rx.next() => match message {
                Some(Ok(Message::Binary(bytes))) => {
                    let _ = stdout.write_all(&bytes);
                    let _ = stdout.flush();
                }
                Some(Ok(Message::Text(text))) => {
                    let v: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
                    match v["type"].as_str() {
                        Some("attached") => {
                            process_id = v["processId"].as_str().map(str::to_owned);
                        }
                        Some("exit") => {
                            let code = match (v["exitCode"].as_i64(), v["signal"].as_i64()) {
                                (_, Some(sig)) => 128 + sig,
                                (Some(code), None) => code,
                                _ => 1,
                            };
                            break Ended::Exited(u8::try_from(code.clamp(0, 255)).unwrap_or(1));
                        }
                        Some("error") => {
                            let _ = write!(
                                stdout,
                                "\r\n[agentbox: {}]\r\n",
                                v["message"].as_str().unwrap_or("error")
                            );
                        }
                        _ => {}
                    }
                }
                Some(Ok(Message::Close(_))) | None => {
                    return Err(ClientError::Protocol(
                        "the terminal closed without an exit".into(),
                    ));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(lost(e)),
            },
            key = keys.recv(), if stdin_open => match key {
                Some(bytes) => {
                    if let Some(at) = bytes.iter().position(|b| *b == DETACH) {
                        if at > 0 {
                            tx.send(Message::binary(bytes[..at].to_vec())).await.map_err(lost)?;
                        }
                        let _ = tx.send(Message::Close(None)).await;
                        break Ended::Detached(process_id.clone().unwrap_or_default());
                    }
                    tx.send(Message::binary(bytes)).await.map_err(lost)?;
                }
                None => stdin_open = false,
            },
            _ = winch.recv() => {
                tx.send(resize_frame()).await.map_err(lost)?;
            }
            _ = term.recv() => {
                let _ = tx.send(Message::Close(None)).await;
                break Ended::Detached(process_id.clone().unwrap_or_default());
            }
            _ = hup.recv() => {
                let _ = tx.send(Message::Close(None)).await;
                break Ended::Detached(process_id.clone().unwrap_or_default());
            }
        }
    };
    drop(raw);
    Ok(ended)
}
