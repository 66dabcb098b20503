//! End-to-end tests of the `agentbox` command against `agentbox up` (the embedded control plane
//! with the local backend, `--isolation none`) in a temporary directory: exit codes, exact bytes
//! of stdout and stderr, Ctrl-C, resuming a cut stream, JSON output, files, exec, logs,
//! detach/cancel, the demo, completions.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{alive, lines_of, wait_bounded, wait_gone, wait_line, Forwarder, Out, Up};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use sha2::Digest;

/// Deterministic bytes of every value (xorshift64*).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

/// Asserts that `out` failed with `code` and a single readable line on stderr that mentions
/// `mention`, and printed nothing on stdout.
#[track_caller]
fn assert_one_line_error(out: &Out, code: i32, mention: &str) {
    out.expect_code(code);
    let err = out.stderr_text();
    assert!(
        err.starts_with("agentbox: ") && err.ends_with('\n') && err.lines().count() == 1,
        "stderr is not one `agentbox: ...` line: {out:?}"
    );
    assert!(
        err.contains(mention),
        "stderr does not mention {mention:?}: {out:?}"
    );
    assert!(out.stdout.is_empty(), "stdout: {out:?}");
}

#[track_caller]
fn json_of(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|e| {
        panic!(
            "not one JSON document ({e}): {:?}",
            String::from_utf8_lossy(bytes)
        )
    })
}

#[test]
fn exit_codes_pass_through() {
    let up = Up::start(&[]);
    up.create("codes");
    for (entrypoint, want) in [
        ("sh -c 'exit 0'", 0),
        ("sh -c 'exit 3'", 3),
        // Killed by SIGKILL: 128 + 9.
        ("sh -c 'kill -9 $$'", 137),
    ] {
        up.configure("codes", entrypoint, &[]);
        let out = up.run(&["invoke", "codes"]);
        assert_eq!(out.code(), Some(want), "{entrypoint}: {out:?}");
        assert!(out.stdout.is_empty(), "{entrypoint}: {out:?}");
    }

    // An entrypoint that cannot start: 127 and the runner's reason on stderr.
    up.configure("codes", "no-such-program-here", &[]);
    let out = up.run(&["invoke", "codes"]);
    out.expect_code(127);
    assert!(
        out.stderr_text().starts_with("agentbox: ")
            && out.stderr_text().contains("no-such-program-here"),
        "{out:?}"
    );

    // A time limit: 124, and the limit is kept.
    up.configure("codes", "sleep 30", &[]);
    let out = up.run(&["invoke", "codes", "--timeout", "1s"]);
    out.expect_code(124);
    assert!(out.elapsed < Duration::from_secs(15), "{out:?}");

    // A failing install exits 1, shows the install's output, and keeps the previous
    // configuration in force.
    up.configure("codes", "sh -c 'exit 3'", &[]);
    let out = up.run(&[
        "configure",
        "codes",
        "--install",
        "sh -c 'echo installing; exit 4'",
        "--entrypoint",
        "sh -c 'exit 0'",
    ]);
    out.expect_code(1);
    assert_eq!(out.stdout_text(), "installing\n", "{out:?}");
    assert!(
        out.stderr_text()
            .contains("install failed with exit code 4"),
        "{out:?}"
    );
    up.run(&["invoke", "codes"]).expect_code(3);

    // Unknown sandboxes: 1 and one readable line; names that cannot be sandbox names are
    // refused before any request, as bad usage (64).
    assert_one_line_error(&up.run(&["invoke", "nosuch"]), 1, "\"nosuch\"");
    assert_one_line_error(&up.run(&["get", "nosuch"]), 1, "\"nosuch\"");
    assert_one_line_error(&up.run(&["create", "Bad_Name"]), 64, "Bad_Name");

    // No server: 69.
    let no_server = ["--api-url", "http://127.0.0.1:1", "--api-key", "k"];
    for args in [&["list"][..], &["invoke", "codes"][..]] {
        let mut all = no_server.to_vec();
        all.extend_from_slice(args);
        assert_one_line_error(&up.run(&all), 69, "cannot reach the server");
    }

    // Bad usage: 64, including no server known at all (no .agentbox here).
    let out = up.run(&["invoke"]);
    out.expect_code(64);
    let elsewhere = tempfile::tempdir().unwrap();
    let out = common::run_with(
        {
            let mut c = common::agentbox(elsewhere.path());
            c.arg("list");
            c
        },
        None,
        common::COMMAND_TIMEOUT,
    );
    assert_one_line_error(&out, 64, "agentbox up");

    assert!(up.stop().success());
}

#[test]
fn binary_output_and_stdin_are_byte_exact() {
    let up = Up::start(&[]);
    up.create("bytes");
    // Invalid UTF-8, NULs, CR, lines longer than any frame, and no final newline.
    let mut stdout_bytes = b"\x00\x01text \xff\xfe\r\n\x00\nhalf a char \xc3".to_vec();
    stdout_bytes.extend(noise(1, 300_000));
    stdout_bytes.extend(vec![b'x'; 100_000]);
    stdout_bytes.extend(b"\ntail without newline \x00\xff");
    let mut stderr_bytes = b"err \x80\x00\n".to_vec();
    stderr_bytes.extend(noise(2, 50_000));
    stderr_bytes.extend(b"\x7fend");
    let src = up.dir.join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("out.bin"), &stdout_bytes).unwrap();
    std::fs::write(src.join("err.bin"), &stderr_bytes).unwrap();
    let out_file = format!("out.bin={}", src.join("out.bin").display());
    let err_file = format!("data/err.bin={}", src.join("err.bin").display());
    up.configure(
        "bytes",
        "sh -c 'cat out.bin; cat data/err.bin >&2; cat out.bin; exit 9'",
        &["--file", &out_file, "--file", &err_file],
    );
    let out = up.run(&["invoke", "bytes"]);
    out.expect_code(9);
    let mut want = stdout_bytes.clone();
    want.extend_from_slice(&stdout_bytes);
    assert!(out.stdout == want, "stdout differs: {out:?}");
    assert!(out.stderr == stderr_bytes, "stderr differs: {out:?}");

    // Stdin, from a file and from standard input, reaches the entrypoint exactly.
    up.configure("bytes", "cat", &[]);
    let input = {
        let mut b = noise(3, 200_000);
        b.extend(b"\x00no newline");
        b
    };
    std::fs::write(src.join("in.bin"), &input).unwrap();
    let out = up.run(&[
        "invoke",
        "bytes",
        "--stdin",
        &src.join("in.bin").to_string_lossy(),
    ]);
    out.expect_code(0);
    assert!(out.stdout == input, "--stdin FILE: {out:?}");
    assert!(out.stderr.is_empty(), "{out:?}");
    let out = up.run_stdin(&["invoke", "bytes", "--stdin", "-"], &input);
    out.expect_code(0);
    assert!(out.stdout == input, "--stdin -: {out:?}");
    assert!(out.stderr.is_empty(), "{out:?}");

    assert!(up.stop().success());
}

#[test]
fn ctrl_c_cancels_the_remote_process() {
    let up = Up::start(&[]);
    up.create("ctrlc");
    // The entrypoint runs in the workspace, so `pid` lands there.
    up.configure(
        "ctrlc",
        "sh -c 'echo $$ > pid; echo ready; exec sleep 1000'",
        &[],
    );
    let mut child = up
        .cmd(&["invoke", "ctrlc"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = lines_of(child.stdout.take().unwrap());
    let stderr = common::read_all(child.stderr.take().unwrap());
    let mut seen = String::new();
    wait_line(&lines, &mut seen, Duration::from_secs(20), |l| {
        l == "ready\n"
    });
    let pid: i32 = std::fs::read_to_string(up.workspace("ctrlc").join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(pid), "the entrypoint {pid} is not running");

    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    let status = wait_bounded(&mut child, Duration::from_secs(20));
    let Some(status) = status else {
        let _ = child.kill();
        panic!("the CLI did not exit within 20 s of SIGINT");
    };
    let stderr = String::from_utf8_lossy(&stderr.join().unwrap()).into_owned();
    assert_eq!(status.code(), Some(130), "{status:?}; stderr: {stderr}");
    assert!(stderr.contains("canceling inv-"), "stderr: {stderr}");
    assert!(
        wait_gone(pid, Duration::from_secs(10)),
        "the entrypoint {pid} survived the CLI's Ctrl-C"
    );
    let rest: String = lines.try_iter().collect();
    assert_eq!(seen + &rest, "ready\n");

    assert!(up.stop().success());
}

/// The CLI asks for live framing: a prompt without a newline shows up while the process still
/// runs (by default the server would hold it until its line is complete, here at the exit).
#[test]
fn a_prompt_shows_before_its_newline() {
    let up = Up::start(&[]);
    up.create("prompt");
    up.configure("prompt", "sh -c 'printf prompt; sleep 2; echo done'", &[]);
    let mut child = up
        .cmd(&["invoke", "prompt"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match std::io::Read::read(&mut stdout, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let _ = tx.send((Instant::now(), buf[..n].to_vec()));
                }
            }
        }
    });
    let (first_at, first) = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("no output within 20 s");
    assert_eq!(first, b"prompt", "the first output");
    let status = wait_bounded(&mut child, Duration::from_secs(20)).expect("the CLI did not exit");
    let exited_at = Instant::now();
    reader.join().unwrap();
    let rest: Vec<u8> = rx.try_iter().flat_map(|(_, b)| b).collect();
    assert_eq!(rest, b"done\n");
    assert_eq!(status.code(), Some(0));
    assert!(
        exited_at - first_at >= Duration::from_secs(1),
        "the prompt came {:?} before the exit: held until its line was complete",
        exited_at - first_at
    );
    assert!(up.stop().success());
}

#[test]
fn a_cut_connection_is_resumed_without_loss_or_duplication() {
    let up = Up::start(&[]);
    up.create("cut");
    up.configure("cut", "sh -c 'seq 1 10000; sleep 1; seq 10001 20000'", &[]);
    // The first burst of output alone is far more than 30000 bytes of events.
    let fwd = Forwarder::start(up.addr(), 30_000);
    let url = format!("http://{}", fwd.addr);
    let out = up.run(&["--api-url", &url, "--api-key", &up.key, "invoke", "cut"]);
    assert!(
        fwd.did_cut(),
        "the forwarder never cut ({} bytes)",
        fwd.bytes_down()
    );
    let want: String = (1..=20000).map(|n| format!("{n}\n")).collect();
    assert!(
        out.stdout == want.as_bytes(),
        "stdout is not exactly 1..20000 ({} bytes, want {}): {out:?}",
        out.stdout.len(),
        want.len()
    );
    out.expect_code(0);
    drop(fwd);
    assert!(up.stop().success());
}

#[test]
fn json_output_parses() {
    let up = Up::start(&[]);
    // `up` wrote where the other commands look, privately.
    for file in ["cli.json", "api-keys.json"] {
        let meta = std::fs::metadata(up.state_dir().join(file)).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
            0o600,
            "{file}"
        );
    }
    assert!(up.seen.starts_with("agentbox is up at "), "{}", up.seen);

    let out = up.run(&["--json", "create", "j1"]);
    out.expect_code(0);
    let created = json_of(&out.stdout);
    assert_eq!(created["name"], "j1", "{created}");
    assert_eq!(created["status"], "Running", "{created}");

    let out = up.run(&["--json", "list"]);
    out.expect_code(0);
    let list = json_of(&out.stdout);
    let names: Vec<&str> = list["sandboxes"]
        .as_array()
        .unwrap_or_else(|| panic!("{list}"))
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["j1"]);

    let out = up.run(&["--json", "get", "j1"]);
    out.expect_code(0);
    let got = json_of(&out.stdout);
    assert_eq!(got["name"], "j1");
    assert_eq!(got["mode"], "agent");

    let out = up.run(&["--json", "whoami"]);
    out.expect_code(0);
    assert_eq!(json_of(&out.stdout)["isAdmin"], true, "{out:?}");

    up.configure(
        "j1",
        "sh -c 'echo one; printf \"\\377\\n\"; echo two >&2; exit 6'",
        &[],
    );
    let out = up.run(&["--json", "invoke", "j1"]);
    out.expect_code(6);
    let events: Vec<Value> = out
        .stdout_text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    assert!(events.len() >= 5, "{out:?}");
    let ids: Vec<u64> = events.iter().map(|e| e["id"].as_u64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids {ids:?}");
    assert_eq!(events[0]["event"], "start", "{out:?}");
    let invoke_id = events[0]["data"]["invokeId"].as_str().unwrap();
    assert!(invoke_id.starts_with("inv-"), "{invoke_id}");
    let last = events.last().unwrap();
    assert_eq!(last["event"], "exit", "{out:?}");
    assert_eq!(last["data"]["exitCode"], 6);
    assert_eq!(last["data"]["invokeId"], invoke_id);
    let logs: Vec<&Value> = events.iter().filter(|e| e["event"] == "log").collect();
    assert_eq!(logs.len(), 3, "{out:?}");
    assert_eq!(logs[0]["data"]["data"], "one");
    assert_eq!(logs[1]["data"]["dataBase64"], "/w==");
    assert!(
        out.stderr.is_empty(),
        "with --json logs stay in the JSON: {out:?}"
    );

    let out = up.run(&["--json", "files", "ls", "j1"]);
    out.expect_code(0);
    let listing = json_of(&out.stdout);
    assert!(listing["entries"].is_array(), "{listing}");

    assert!(up.stop().success());
}

#[test]
fn files_round_trip_exactly() {
    let up = Up::start(&[]);
    up.create("files");
    let mut content = noise(4, 700_000);
    content.extend(b"\x00\xff end");
    let src = up.dir.join("x.bin");
    std::fs::write(&src, &content).unwrap();
    let sha = hex::encode(sha2::Sha256::digest(&content));

    let out = up.run(&[
        "files",
        "put",
        "files",
        &src.to_string_lossy(),
        "/workspace/x.bin",
    ]);
    out.expect_code(0);
    assert_eq!(
        out.stdout_text(),
        format!("/workspace/x.bin {} bytes sha256 {sha}\n", content.len())
    );
    assert_eq!(
        std::fs::read(up.workspace("files").join("x.bin")).unwrap(),
        content
    );

    let dest = up.dir.join("back.bin");
    let out = up.run(&[
        "files",
        "get",
        "files",
        "/workspace/x.bin",
        &dest.to_string_lossy(),
    ]);
    out.expect_code(0);
    assert!(out.stdout.is_empty(), "{out:?}");
    assert!(
        std::fs::read(&dest).unwrap() == content,
        "downloaded bytes differ"
    );
    let out = up.run(&["files", "get", "files", "/workspace/x.bin"]);
    out.expect_code(0);
    assert!(out.stdout == content, "bytes on stdout differ");

    // From standard input, into a new directory.
    let small = b"\x00small\n\xfe".to_vec();
    let out = up.run_stdin(
        &["files", "put", "files", "-", "/workspace/d/y.bin"],
        &small,
    );
    out.expect_code(0);
    assert_eq!(
        std::fs::read(up.workspace("files").join("d/y.bin")).unwrap(),
        small
    );

    let out = up.run(&["files", "ls", "files"]);
    out.expect_code(0);
    let text = out.stdout_text();
    let x_line = text
        .lines()
        .find(|l| l.ends_with(" x.bin"))
        .unwrap_or_else(|| panic!("no x.bin in {text:?}"));
    assert!(
        x_line.contains(&format!(" {} ", content.len())),
        "{x_line:?}"
    );
    assert!(text.lines().any(|l| l.ends_with(" d")), "{text:?}");

    let out = up.run(&["--json", "files", "ls", "files", "/workspace/d"]);
    out.expect_code(0);
    let listing = json_of(&out.stdout);
    let entries = listing["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{listing}");
    assert_eq!(entries[0]["name"], "y.bin");
    assert_eq!(entries[0]["size"], small.len());

    up.run(&["files", "rm", "files", "/workspace/x.bin"])
        .expect_code(0);
    assert!(!up.workspace("files").join("x.bin").exists());
    let out = up.run(&["files", "get", "files", "/workspace/x.bin"]);
    assert_one_line_error(&out, 1, "x.bin");
    // A directory needs -r.
    assert_eq!(
        up.run(&["files", "rm", "files", "/workspace/d"]).code(),
        Some(1)
    );
    up.run(&["files", "rm", "-r", "files", "/workspace/d"])
        .expect_code(0);
    assert!(!up.workspace("files").join("d").exists());
    let out = up.run(&["files", "ls", "files"]);
    out.expect_code(0);
    assert_eq!(out.stdout_text(), "");

    assert!(up.stop().success());
}

#[test]
fn exec_streams_and_exits_with_the_command() {
    let up = Up::start(&[]);
    up.create("ex");
    let out = up.run(&[
        "exec",
        "ex",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 5",
    ]);
    assert_eq!(out.code(), Some(5), "{out:?}");
    assert_eq!(out.stdout, b"out\n", "{out:?}");
    assert_eq!(out.stderr, b"err\n", "{out:?}");

    // It runs in the workspace.
    let out = up.run(&["exec", "ex", "--", "sh", "-c", "printf '%s' \"$PWD\""]);
    out.expect_code(0);
    assert_eq!(
        out.stdout_text(),
        up.workspace("ex").to_string_lossy(),
        "{out:?}"
    );
    assert!(up.stop().success());
}

#[test]
fn logs_detach_follow_and_cancel() {
    let up = Up::start(&[]);
    up.create("lg");
    let ws = up.workspace("lg");

    // A finished invoke replays exactly.
    up.configure(
        "lg",
        "sh -c 'echo a; printf \"b\\377\\000\"; echo c >&2; exit 2'",
        &[],
    );
    let out = up.run(&["--json", "invoke", "lg"]);
    out.expect_code(2);
    let first: Value = serde_json::from_str(out.stdout_text().lines().next().unwrap()).unwrap();
    let id = first["data"]["invokeId"].as_str().unwrap().to_owned();
    let out = up.run(&["logs", "lg", &id]);
    out.expect_code(0);
    assert_eq!(out.stdout, b"a\nb\xff\x00", "{out:?}");
    assert_eq!(out.stderr, b"c\n", "{out:?}");

    // --detach prints the id and leaves it running.
    up.configure(
        "lg",
        "sh -c 'echo first; while [ ! -e go ]; do sleep 0.05; done; echo second; exit 7'",
        &[],
    );
    let out = up.run(&["invoke", "lg", "--detach"]);
    out.expect_code(0);
    let text = out.stdout_text();
    let id = text.trim_end().to_owned();
    assert!(
        id.starts_with("inv-") && text == format!("{id}\n"),
        "{out:?}"
    );
    // What is there so far, while it runs (until `first` shows up).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = up.run(&["logs", "lg", &id]);
        out.expect_code(0);
        if out.stdout == b"first\n" {
            break;
        }
        assert!(out.stdout.is_empty(), "{out:?}");
        assert!(Instant::now() < deadline, "`first` never showed up");
        std::thread::sleep(Duration::from_millis(100));
    }
    // --follow waits for the rest and exits with its code.
    let mut follower = up
        .cmd(&["logs", "lg", &id, "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let follower_out = common::read_all(follower.stdout.take().unwrap());
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        follower.try_wait().unwrap().is_none(),
        "logs --follow exited while the invoke runs"
    );
    std::fs::write(ws.join("go"), b"").unwrap();
    let status = wait_bounded(&mut follower, Duration::from_secs(20)).expect("logs --follow ended");
    assert_eq!(status.code(), Some(7));
    assert_eq!(follower_out.join().unwrap(), b"first\nsecond\n");
    let out = up.run(&["logs", "lg", &id]);
    out.expect_code(0);
    assert_eq!(out.stdout, b"first\nsecond\n", "{out:?}");

    // cancel stops a detached invoke; its follower exits 130.
    up.configure("lg", "sh -c 'echo $$ > pid; echo up; exec sleep 1000'", &[]);
    let out = up.run(&["invoke", "lg", "--detach"]);
    out.expect_code(0);
    let id = out.stdout_text().trim_end().to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    let pid = loop {
        if let Ok(text) = std::fs::read_to_string(ws.join("pid")) {
            if let Ok(pid) = text.trim().parse::<i32>() {
                break pid;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the detached invoke never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(alive(pid));
    let out = up.run(&["cancel", "lg", &id]);
    out.expect_code(0);
    assert_eq!(out.stderr_text(), format!("canceling {id}\n"), "{out:?}");
    let out = up.run(&["logs", "lg", &id, "--follow"]);
    assert_eq!(out.code(), Some(130), "{out:?}");
    assert_eq!(out.stdout, b"up\n", "{out:?}");
    assert!(
        wait_gone(pid, Duration::from_secs(10)),
        "{pid} survived cancel"
    );
    // Canceling a finished invoke is an error.
    assert_one_line_error(&up.run(&["cancel", "lg", &id]), 1, &id);

    assert!(up.stop().success());
}

#[test]
fn up_demo_runs_from_an_empty_directory() {
    let mut up = Up::start(&["--demo"]);
    let exit_line = up.wait_line(Duration::from_secs(60), |l| l.starts_with("[exit "));
    assert!(exit_line.starts_with("[exit 0 "), "{}", up.seen);
    assert!(up.seen.contains("hello\n"), "{}", up.seen);
    assert!(
        up.seen.contains("world,\n") || up.seen.contains("world\n"),
        "{}",
        up.seen
    );
    // Ctrl-C is only listened for again once the demo is done.
    up.wait_line(Duration::from_secs(20), |l| l.starts_with("demo done"));
    assert!(up.seen.contains("demo done (exit code 0)"), "{}", up.seen);
    let runner = up.runner_pid("demo");
    assert!(alive(runner));
    let stderr_before = up.stderr();
    let status = up.stop();
    assert_eq!(status.code(), Some(0), "up's stderr: {stderr_before}");
    assert!(!alive(runner), "the demo's runner {runner} outlived up");
}

#[test]
fn malformed_sandbox_names_get_a_readable_error() {
    let up = Up::start(&[]);
    for (args, name) in [
        (&["invoke", "a?b"][..], "a?b"),
        (&["invoke", "a#b"][..], "a#b"),
        (&["get", "a/b"][..], "a/b"),
        (&["files", "ls", "x/../y"][..], "x/../y"),
    ] {
        let out = up.run(args);
        // A usage error (64) if the CLI checks the name, or the server's 404 (1).
        assert!(matches!(out.code(), Some(1 | 64)), "{args:?}: {out:?}");
        let err = out.stderr_text();
        assert!(
            err.lines().count() == 1 && err.contains(name),
            "{args:?}: the error does not name {name:?}: {out:?}"
        );
    }
    assert!(up.stop().success());
}

#[test]
fn ctrl_c_while_reconnecting_detaches() {
    let up = Up::start(&[]);
    up.create("gone");
    up.configure("gone", "sh -c 'seq 1 10000; exec sleep 1000'", &[]);
    // After the cut the server looks gone: the CLI keeps trying to resume.
    let fwd = Forwarder::start_refusing(up.addr(), 30_000);
    let url = format!("http://{}", fwd.addr);
    let mut child = up
        .cmd(&["--api-url", &url, "--api-key", &up.key, "invoke", "gone"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = lines_of(child.stderr.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !fwd.did_cut() {
        assert!(Instant::now() < deadline, "the forwarder never cut");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(700));
    // Ctrl-C: the cancel cannot reach the server; Ctrl-C again: detached, 130.
    let pid = Pid::from_raw(child.id() as i32);
    let _ = kill(pid, Signal::SIGINT);
    let mut seen = String::new();
    let acknowledged = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_line(&stderr, &mut seen, Duration::from_secs(5), |l| {
            l.contains("Ctrl-C again to detach")
        });
    }));
    if acknowledged.is_err() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("Ctrl-C while reconnecting was not acknowledged within 5 s");
    }
    let _ = kill(pid, Signal::SIGINT);
    let status = wait_bounded(&mut child, Duration::from_secs(5));
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let rest: String = stderr.iter().collect();
    let stderr = seen + &rest;
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(130),
        "a second Ctrl-C while reconnecting did not detach; stderr: {stderr}"
    );
    assert!(stderr.contains("detached from inv-"), "stderr: {stderr}");
    drop(fwd);
    assert!(up.stop().success());
}

#[test]
fn stop_resume_delete() {
    let up = Up::start(&[]);
    up.create("life");
    up.configure("life", "sh -c 'cat marker'", &[]);
    std::fs::write(up.workspace("life").join("marker"), b"kept\n").unwrap();
    let first = up.runner_pid("life");
    assert!(alive(first));

    let out = up.run(&["stop", "life"]);
    out.expect_code(0);
    assert_eq!(out.stdout_text(), "life Stopped agent\n");
    assert!(
        wait_gone(first, Duration::from_secs(10)),
        "runner {first} survived stop"
    );
    let out = up.run(&["invoke", "life"]);
    assert_one_line_error(&out, 1, "Stopped");

    let out = up.run(&["resume", "life"]);
    out.expect_code(0);
    assert_eq!(out.stdout_text(), "life Running agent\n");
    let second = up.runner_pid("life");
    assert_ne!(first, second);
    // The workspace and the configuration survived.
    let out = up.run(&["invoke", "life"]);
    out.expect_code(0);
    assert_eq!(out.stdout, b"kept\n");

    let out = up.run(&["delete", "life"]);
    out.expect_code(0);
    assert!(
        wait_gone(second, Duration::from_secs(10)),
        "runner {second} survived delete"
    );
    assert!(!up.state_dir().join("sandboxes/life").exists());
    assert_one_line_error(&up.run(&["get", "life"]), 1, "\"life\"");
    let out = up.run(&["list"]);
    out.expect_code(0);
    assert_eq!(
        out.stdout_text().lines().count(),
        1,
        "only the header: {out:?}"
    );
    assert!(up.stop().success());
}

#[test]
fn completions_and_version() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let mut c = common::agentbox(dir.path());
        c.args(args);
        common::run_with(c, None, common::COMMAND_TIMEOUT)
    };
    let out = run(&["completions", "bash"]);
    out.expect_code(0);
    let script = out.stdout_text();
    assert!(script.contains("agentbox"), "{out:?}");
    assert!(script.contains("complete -F"), "{out:?}");
    assert!(out.stderr.is_empty());

    let out = run(&["--version"]);
    out.expect_code(0);
    assert_eq!(
        out.stdout_text(),
        format!("agentbox {}\n", env!("CARGO_PKG_VERSION"))
    );

    let out = run(&["completions", "no-such-shell"]);
    out.expect_code(64);
    // Nothing was created in the directory by any of this.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn policy_credentials_and_audit_commands() {
    let up = Up::start(&[]);
    let out = up.run(&["policy", "set", "default", r#"{"maxSandboxesTotal": 1}"#]);
    out.expect_code(0);
    let out = up.run(&["policy", "get", "default"]);
    out.expect_code(0);
    assert_eq!(
        json_of(&out.stdout),
        serde_json::json!({"maxSandboxesTotal": 1})
    );
    up.create("p1");
    let out = up.run(&["create", "p2"]);
    assert_ne!(out.code(), Some(0));
    assert!(
        out.stderr_text().contains("policy_violation"),
        "{}",
        out.stderr_text()
    );

    let secret = "cli-secret-5f1d9a2c7e3b8046";
    let mut cmd = up.cmd(&["credentials", "set", "openai", "--from-env", "MY_SECRET"]);
    cmd.env("MY_SECRET", secret);
    let out = common::run_with(cmd, None, Duration::from_secs(30));
    out.expect_code(0);
    let file = up.dir.join("gcp.json");
    std::fs::write(&file, secret).unwrap();
    up.run(&[
        "credentials",
        "set",
        "gcp",
        "--from-file",
        file.to_str().unwrap(),
    ])
    .expect_code(0);
    let out = up.run(&["credentials", "list"]);
    out.expect_code(0);
    let listed = out.stdout_text();
    assert!(
        listed.contains("openai") && listed.contains("gcp"),
        "{listed}"
    );
    assert!(!listed.contains(secret));
    assert_ne!(up.run(&["credentials", "set", "x"]).code(), Some(0));

    let out = up.run(&["audit", "--sandbox", "p2", "--since", "1h"]);
    out.expect_code(0);
    let audit = out.stdout_text();
    assert!(
        audit.contains("governance.create") && audit.contains("denied"),
        "{audit}"
    );
    let out = up.run(&["--json", "audit", "--action", "credentials.*"]);
    out.expect_code(0);
    let page = json_of(&out.stdout);
    assert_eq!(page["events"].as_array().unwrap().len(), 2, "{page}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains(secret));

    // --follow prints what happens after it started.
    let mut follow = up
        .cmd(&["audit", "--follow", "--action", "delete"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = lines_of(follow.stdout.take().unwrap());
    std::thread::sleep(Duration::from_millis(1500));
    up.run(&["delete", "p1"]).expect_code(0);
    let mut seen = String::new();
    let line = wait_line(&lines, &mut seen, Duration::from_secs(20), |l| {
        l.contains("p1")
    });
    assert!(line.contains("delete") && line.contains("ok"), "{line}");
    let _ = follow.kill();
    let _ = follow.wait();
}

/// Names are per namespace: `--namespace` creates, picks and lists; a name in two of the
/// caller's namespaces must be picked.
#[test]
fn one_name_in_two_namespaces() {
    let up = Up::start(&[]);
    for ns in ["team-a", "team-b"] {
        let out = up.run(&["create", "twin", "--namespace", ns]);
        out.expect_code(0);
        assert_eq!(out.stdout_text(), "twin Running agent\n");
        up.configure(
            "twin",
            "sh -c 'cat mark 2>/dev/null || echo none'",
            &["--namespace", ns],
        );
    }
    std::fs::write(up.workspace("twin.team-a").join("mark"), b"in a\n").unwrap();
    let out = up.run(&["invoke", "twin", "--namespace", "team-a"]);
    out.expect_code(0);
    assert_eq!(out.stdout, b"in a\n");
    let out = up.run(&["--namespace", "team-b", "invoke", "twin"]);
    out.expect_code(0);
    assert_eq!(out.stdout, b"none\n");
    // Unpicked, the name is ambiguous: the error says how to pick.
    assert_one_line_error(&up.run(&["get", "twin"]), 1, "?namespace=");
    let out = up.run(&["list", "-q", "--namespace", "team-b"]);
    out.expect_code(0);
    assert_eq!(out.stdout_text(), "twin\n");
    up.run(&["delete", "twin", "--namespace", "team-b"])
        .expect_code(0);
    // One left: found without picking.
    let out = up.run(&["invoke", "twin"]);
    out.expect_code(0);
    assert_eq!(out.stdout, b"in a\n");
    assert!(up.stop().success());
}
