//! A new user's first hour, end to end against the real `agentbox up`: a state directory the
//! other commands find (from the same directory, a subdirectory, or by AGENTBOX_STATE_DIR); a
//! second `up` that changes nothing; refused credentials that say where they came from;
//! `agentbox invokes`; Ctrl-C during `configure` under a pseudo-terminal; the help.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use common::{agentbox, run_with, Out, Up, COMMAND_TIMEOUT};
use serde_json::Value;

fn run_in(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Out {
    let mut c = agentbox(dir);
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    run_with(c, None, COMMAND_TIMEOUT)
}

fn file_state(path: &Path) -> (Vec<u8>, SystemTime) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mtime = std::fs::metadata(path).unwrap().modified().unwrap();
    (bytes, mtime)
}

#[test]
fn a_state_dir_is_found_from_the_directory_below_it_and_by_variable() {
    let up = Up::start(&["--state-dir", "state"]);
    assert_eq!(up.state_dir(), up.dir.join("state"));
    // The key lives in the state directory only; ./.agentbox/cli.json points there.
    let pointer: Value =
        serde_json::from_slice(&std::fs::read(up.dir.join(".agentbox/cli.json")).unwrap()).unwrap();
    assert_eq!(pointer["stateDir"], up.dir.join("state").to_str().unwrap());
    assert!(pointer.get("apiKey").is_none(), "{pointer}");

    let out = up.run(&["create", "here"]);
    out.expect_code(0);
    assert_eq!(out.stdout_text(), "here Running agent\n");

    let sub = up.dir.join("a/b");
    std::fs::create_dir_all(&sub).unwrap();
    let out = run_in(&sub, &["list", "-q"], &[]);
    out.expect_code(0);
    assert_eq!(out.stdout_text(), "here\n");

    // From anywhere else: only with the state directory named.
    let elsewhere = tempfile::tempdir().unwrap();
    let state = up.state_dir();
    let state = state.to_str().unwrap();
    let out = run_in(elsewhere.path(), &["list", "-q"], &[]);
    out.expect_code(64);
    assert!(out.stderr_text().contains("agentbox up"), "{out:?}");
    let out = run_in(
        elsewhere.path(),
        &["list", "-q"],
        &[("AGENTBOX_STATE_DIR", state)],
    );
    out.expect_code(0);
    assert_eq!(out.stdout_text(), "here\n");
    let out = run_in(
        elsewhere.path(),
        &["get", "here", "--state-dir", state],
        &[],
    );
    out.expect_code(0);
    // A state directory with no cli.json is not silently replaced by another one.
    let out = run_in(&sub, &["list", "--state-dir", "/nonexistent"], &[]);
    out.expect_code(64);

    assert!(up.stop().success());
}

#[test]
fn a_second_up_changes_nothing_and_the_first_key_still_works() {
    let up = Up::start(&[]);
    let state = up.state_dir();
    let keys = file_state(&state.join("api-keys.json"));
    let saved = file_state(&state.join("cli.json"));

    // The same state directory: refused before anything is touched.
    let out = run_in(&up.dir, &["up", "--listen", "127.0.0.1:0"], &[]);
    out.expect_code(64);
    let err = out.stderr_text();
    assert!(
        err.contains("another `agentbox up` is running")
            && err.contains(&up.url)
            && err.contains("nothing was changed"),
        "{out:?}"
    );
    assert!(out.stdout.is_empty(), "{out:?}");
    assert_eq!(file_state(&state.join("api-keys.json")), keys);
    assert_eq!(file_state(&state.join("cli.json")), saved);

    // Another state directory on the same port: the bind fails, nothing is written.
    let out = run_in(
        &up.dir,
        &[
            "up",
            "--state-dir",
            "other",
            "--listen",
            &up.addr().to_string(),
        ],
        &[],
    );
    out.expect_code(1);
    assert!(out.stderr_text().contains("cannot listen on"), "{out:?}");
    assert!(!up.dir.join("other/api-keys.json").exists());
    assert!(!up.dir.join("other/cli.json").exists());
    assert_eq!(file_state(&state.join("cli.json")), saved);

    // The first one's key still works.
    let out = up.run(&["whoami"]);
    out.expect_code(0);

    // Flags of the other commands are refused by `up`, again before anything happens.
    let out = run_in(&up.dir, &["up", "--api-key", "x"], &[]);
    out.expect_code(64);
    assert!(out.stderr_text().contains("--api-key"), "{out:?}");
    assert_eq!(file_state(&state.join("api-keys.json")), keys);

    assert!(up.stop().success());
}

#[test]
fn a_refused_key_names_where_it_came_from() {
    let up = Up::start(&[]);
    let saved = up.state_dir().join("cli.json");
    let saved = saved.to_str().unwrap();

    // An exported key overrides cli.json: say so, and how to stop it.
    let out = run_in(&up.dir, &["list"], &[("AGENTBOX_API_KEY", "abx_stale")]);
    out.expect_code(1);
    let err = out.stderr_text();
    assert!(
        err.starts_with("agentbox: ") && err.lines().count() == 1,
        "{out:?}"
    );
    assert!(
        err.contains("HTTP 401")
            && err.contains("AGENTBOX_API_KEY")
            && err.contains(saved)
            && err.contains("unset AGENTBOX_API_KEY"),
        "{out:?}"
    );

    // A flag.
    let out = run_in(&up.dir, &["list", "--api-key", "abx_wrong"], &[]);
    out.expect_code(1);
    let err = out.stderr_text();
    assert!(err.contains("--api-key") && err.contains(saved), "{out:?}");

    // A cli.json whose `up` is not the server at its URL any more.
    let other = tempfile::tempdir().unwrap();
    std::fs::create_dir(other.path().join(".agentbox")).unwrap();
    let stale = other.path().join(".agentbox/cli.json");
    std::fs::write(
        &stale,
        serde_json::json!({"apiUrl": up.url, "apiKey": "abx_old"}).to_string(),
    )
    .unwrap();
    let out = run_in(other.path(), &["list"], &[]);
    out.expect_code(1);
    let err = out.stderr_text();
    assert!(
        err.contains(stale.to_str().unwrap()) && err.contains("start `agentbox up` again"),
        "{out:?}"
    );

    // A runner's token, from a flag or the environment.
    up.create("direct");
    let record: Value = serde_json::from_slice(
        &std::fs::read(up.state_dir().join("sandboxes/direct/sandbox.json")).unwrap(),
    )
    .unwrap();
    let runner = format!("http://{}", record["addr"].as_str().unwrap());
    let out = run_in(
        &up.dir,
        &["--runner", &runner, "--token", "wrong", "invokes", "-"],
        &[],
    );
    out.expect_code(1);
    assert!(
        out.stderr_text().contains("HTTP 401")
            && out.stderr_text().contains("refused the token from --token"),
        "{out:?}"
    );
    let out = run_in(
        &up.dir,
        &["--runner", &runner, "invokes", "-"],
        &[("AGENTBOX_RUNNER_TOKEN", "wrong")],
    );
    out.expect_code(1);
    assert!(
        out.stderr_text()
            .contains("refused the token from the environment variable AGENTBOX_RUNNER_TOKEN"),
        "{out:?}"
    );

    assert!(up.stop().success());
}

#[test]
fn invokes_lists_the_recent_ones() {
    let up = Up::start(&[]);
    up.create("hist");
    up.configure("hist", "sh -c 'echo hi; exit 3'", &[]);
    up.run(&["invoke", "hist"]).expect_code(3);
    // -q: a successful configure prints nothing at all.
    let out = up.run(&["configure", "hist", "--entrypoint", "sh -c 'exit 0'", "-q"]);
    out.expect_code(0);
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{out:?}");
    up.run(&["invoke", "hist"]).expect_code(0);
    up.configure("hist", "sleep 60", &[]);
    let out = up.run(&["invoke", "hist", "--detach"]);
    out.expect_code(0);
    let running = out.stdout_text().trim().to_owned();
    assert!(running.starts_with("inv-"), "{out:?}");

    let out = up.run(&["invokes", "hist"]);
    out.expect_code(0);
    let text = out.stdout_text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{out:?}");
    assert!(
        lines[0].starts_with("ID ") && lines[0].contains("DURATION"),
        "{out:?}"
    );
    let cols = |l: &str| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
    let newest = cols(lines[1]);
    assert_eq!(newest[0], running, "{out:?}");
    assert_eq!(&newest[1..4], ["invoke", "running", "-"], "{out:?}");
    assert_eq!(&cols(lines[2])[1..4], ["invoke", "exited", "0"], "{out:?}");
    assert_eq!(&cols(lines[3])[1..4], ["invoke", "exited", "3"], "{out:?}");
    assert!(cols(lines[3])[4].ends_with('s'), "{out:?}");

    let out = up.run(&["invokes", "hist", "-q", "-n", "1"]);
    out.expect_code(0);
    assert_eq!(out.stdout_text(), format!("{running}\n"));

    let out = up.run(&["invokes", "hist", "-o", "json"]);
    out.expect_code(0);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let items = list["invokes"].as_array().unwrap();
    assert_eq!(items.len(), 3, "{list}");
    assert_eq!(items[2]["exitCode"], 3, "{list}");
    assert_eq!(items[0]["state"], "running", "{list}");

    // An id that is not there: the error says where the ids are.
    let out = up.run(&["logs", "hist", "inv-0000"]);
    out.expect_code(1);
    assert!(
        out.stderr_text()
            .contains("`agentbox invokes hist` lists the recent ones"),
        "{out:?}"
    );

    // The id it printed is the one `cancel` takes; the list then shows how it ended.
    up.run(&["cancel", "hist", &running]).expect_code(0);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = up.run(&["invokes", "hist", "-n", "1"]);
        if out.stdout_text().contains("canceled") {
            break;
        }
        assert!(Instant::now() < deadline, "{out:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(up.stop().success());
}

#[test]
fn ctrl_c_during_configure_restores_the_line_and_says_what_happens() {
    let up = Up::start(&[]);
    up.create("slow");
    let install = "sh -c 'echo installing; sleep 2; touch installed'";
    let args = [
        "configure",
        "slow",
        "--install",
        install,
        "--entrypoint",
        "true",
    ];
    // The CLI on a pseudo-terminal (its stderr is a terminal, so the spinner runs), as the
    // session leader with the terminal as its controlling one: a ^C typed into the terminal
    // reaches it as SIGINT from the line discipline, as a user's would.
    let pty = nix::pty::openpty(None, None).unwrap();
    let slave = std::fs::File::from(pty.slave);
    let mut cmd = std::process::Command::new("setsid");
    cmd.arg("--ctty")
        .arg(common::bin())
        .args(args)
        .current_dir(&up.dir)
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AGENTBOX_") {
            cmd.env_remove(key);
        }
    }
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    let mut master = std::fs::File::from(pty.master);
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    {
        let mut master = master.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // EIO once the child and every copy of the slave are gone.
            while let Ok(n) = master.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
    }
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !String::from_utf8_lossy(&seen).contains("installing…") {
        assert!(
            Instant::now() < deadline,
            "no spinner: {:?}",
            String::from_utf8_lossy(&seen)
        );
        if let Ok(chunk) = rx.recv_timeout(Duration::from_millis(100)) {
            seen.extend(chunk);
        }
    }
    master.write_all(b"\x03").unwrap();
    let status = common::wait_bounded(&mut child, Duration::from_secs(10)).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("configure did not exit after ^C");
    });
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(chunk) => seen.extend(chunk),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(_) => {}
        }
    }
    let text = String::from_utf8_lossy(&seen).into_owned();
    assert_eq!(status.code(), Some(130), "{text:?}");
    // The spinner's line is cleared, and the message starts on a clean line.
    let at = text
        .find("agentbox: interrupted")
        .unwrap_or_else(|| panic!("{text:?}"));
    assert!(text[..at].ends_with("\r\x1b[2K"), "{text:?}");
    assert!(
        text[at..].contains("goes on in the sandbox") && text.ends_with("\r\n"),
        "{text:?}"
    );

    // As it said: the install finished on its own, and the same configure again installs
    // nothing.
    let marker = up.workspace("slow").join("installed");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !marker.exists() {
        assert!(Instant::now() < deadline, "the install did not go on");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = up.run(&args);
    out.expect_code(0);
    assert!(
        out.stderr_text().contains("unchanged, install skipped"),
        "{out:?}"
    );
    assert!(up.stop().success());
}

#[test]
fn help_describes_every_flag_and_argument_and_lists_global_options_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_in(dir.path(), &["--help"], &[]);
    out.expect_code(0);
    let top = out.stdout_text();
    assert_eq!(top.matches("--api-key <KEY>").count(), 1, "{top}");
    assert!(top.contains("Exit codes:") && top.contains("130"), "{top}");

    let out = run_in(dir.path(), &["up", "--help"], &[]);
    out.expect_code(0);
    let up = out.stdout_text();
    for want in ["--backend", "--templates-file", "--state-dir", "--listen"] {
        assert!(up.contains(want), "{want}: {up}");
    }
    for unwanted in ["--api-url", "--runner", "--token"] {
        assert!(!up.contains(unwanted), "{unwanted}: {up}");
    }

    // Every argument of every command has a description: clap's short help prints an
    // undescribed one as a bare name at the end of its line.
    for cmd in [
        "create",
        "get",
        "delete",
        "stop",
        "resume",
        "configure",
        "invoke",
        "invokes",
        "logs",
        "cancel",
        "exec",
        "whoami",
        "completions",
    ] {
        let out = run_in(dir.path(), &[cmd, "-h"], &[]);
        out.expect_code(0);
        let help = out.stdout_text();
        assert!(
            help.contains("Global options (see `agentbox --help`)"),
            "{help}"
        );
        assert!(!help.contains("--api-key <KEY>"), "{cmd}: {help}");
        for line in help.lines() {
            let t = line.trim();
            let item = t.starts_with('-') || t.starts_with('<') || t.starts_with('[');
            if item && !t.starts_with("-h, --help") {
                assert!(t.contains("  "), "{cmd}: {t:?} has no description:\n{help}");
            }
        }
    }
    // Nothing was created in the directory by any of this.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn up_refuses_a_missing_templates_file_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_in(
        dir.path(),
        &[
            "up",
            "--listen",
            "127.0.0.1:0",
            "--templates-file",
            "nope.json",
        ],
        &[],
    );
    out.expect_code(64);
    assert!(out.stderr_text().contains("nope.json"), "{out:?}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    // A real one: its template can be used, and only it besides the built-in ones.
    let file = dir.path().join("t.json");
    std::fs::write(
        &file,
        r#"{"templates": [{"name": "small", "mode": "agent", "maxConcurrentInvokes": 1}]}"#,
    )
    .unwrap();
    let up = Up::start(&["--templates-file", file.to_str().unwrap()]);
    let out = up.run(&["create", "s1", "--template", "small"]);
    out.expect_code(0);
    let out = up.run(&["create", "s2", "--template", "nosuch"]);
    out.expect_code(1);
    assert!(out.stderr_text().contains("nosuch"), "{out:?}");
    assert!(up.stop().success());
}

#[test]
fn up_with_docker_and_no_engine_says_so_and_saves_no_server() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_in(
        dir.path(),
        &["up", "--listen", "127.0.0.1:0", "--backend", "docker"],
        &[("DOCKER_HOST", "unix:///nonexistent/docker.sock")],
    );
    out.expect_code(1);
    let err = out.stderr_text();
    assert!(
        err.starts_with("agentbox: ") && err.contains("Docker engine"),
        "{out:?}"
    );
    assert!(!dir.path().join(".agentbox/cli.json").exists());
    assert!(out.stdout.is_empty(), "{out:?}");
}

#[test]
fn up_quiet_prints_only_its_url() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = agentbox(dir.path())
        .args(["up", "-q", "--listen", "127.0.0.1:0", "--isolation", "none"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lines = common::lines_of(child.stdout.take().unwrap());
    let mut seen = String::new();
    common::wait_line(&lines, &mut seen, Duration::from_secs(20), |l| {
        l.starts_with("agentbox is up at http://127.0.0.1:")
    });
    let saved: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join(".agentbox/cli.json")).unwrap())
            .unwrap();
    let key = saved["apiKey"].as_str().unwrap().to_owned();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = common::wait_bounded(&mut child, Duration::from_secs(20)).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("up did not stop");
    });
    assert!(status.success(), "{status:?}");
    let rest: String = lines.iter().collect();
    let all = seen + &rest;
    assert!(!all.contains(&key) && !all.contains("API key"), "{all}");
}
