//! End-to-end tests of the runner core: the real binary, real HTTP, real processes.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{exit_event, parse_sse, pid_exists, rebuild, wait_for_file, Runner, TOKEN};
use serde_json::{json, Value};

#[tokio::test]
async fn health_is_open_and_everything_else_needs_the_token() {
    let r = Runner::start(&[]);
    let resp = r.client.get(r.url("/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap(), json!({"status": "ok"}));

    for (path, method) in [
        ("/v1/info", "GET"),
        ("/v1/configure", "POST"),
        ("/v1/invoke", "POST"),
        ("/v1/invokes", "GET"),
        ("/v1/invoke/cancel", "POST"),
    ] {
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("Basic dGVzdA=="),
            Some(TOKEN),
        ] {
            let mut req = r
                .client
                .request(method.parse().unwrap(), r.url(path))
                .body("{}");
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 401, "{method} {path} with {auth:?}");
            let body: Value = resp.json().await.unwrap();
            assert_eq!(body["error"], "unauthorized");
        }
    }
    let info: Value = r
        .get("/v1/info")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["configured"], false);
    assert_eq!(info["mode"], "agent");
    assert_eq!(info["inflight"], 0);
    assert_eq!(info["limits"]["maxConcurrentInvokes"], 16);
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn refuses_to_start_without_a_token_or_with_bad_flags() {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("ws");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec![], "no runner token"),
        (vec!["--default-timeout", "5x"], "unknown unit"),
        (
            vec!["--max-concurrent-invokes", "0", "--token", "t"],
            "at least 1",
        ),
        (
            vec!["--token", "t", "--insecure-no-auth"],
            "mutually exclusive",
        ),
        (
            vec!["--token-file", "/nonexistent/token"],
            "cannot read --token-file",
        ),
        (
            vec!["--token", "t", "--listen", "not-an-address"],
            "invalid",
        ),
    ];
    for (args, message) in cases {
        let listen = if args.contains(&"--listen") {
            vec![]
        } else {
            vec!["--listen", "127.0.0.1:0"]
        };
        let out = Command::new(common::bin())
            .args(["--workspace", ws.to_str().unwrap()])
            .args(&listen)
            .args(&args)
            .env_remove("AGENTBOX_RUNNER_TOKEN")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("listening"),
            "{args:?} bound a port"
        );
    }
}

#[tokio::test]
async fn insecure_no_auth_serves_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = common::Guard(
        Command::new(common::bin())
            .args([
                "--listen",
                "127.0.0.1:0",
                "--insecure-no-auth",
                "--workspace",
            ])
            .arg(dir.path().join("ws"))
            .env("AGENTBOX_LOG", "error")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.0.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();
    let resp = reqwest::get(format!("http://{addr}/v1/info"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

fn count_lines(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |s| s.lines().count())
}

#[tokio::test]
async fn configure_installs_once_per_distinct_configuration() {
    let r = Runner::start(&[]);
    let counter = r.dir.join("installs.count");
    let install = json!([
        "sh",
        "-c",
        format!(
            "echo run >> {}; echo installing; echo warn >&2",
            counter.display()
        )
    ]);
    let body = json!({
        "files": [
            {"path": "agent.sh", "content": "echo agent v1\n", "mode": "0755"},
            {"path": "/workspace/lib/data.bin", "contentBase64": "AAEC/w=="}
        ],
        "installCommand": install,
        "entrypoint": ["sh", "/workspace/agent.sh"]
    });

    // SSE: install output streams as log events, then the result.
    let resp = r.post("/v1/configure").json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let events = parse_sse(&resp.bytes().await.unwrap());
    assert_eq!(rebuild(&events, "stdout"), b"installing\n");
    assert_eq!(rebuild(&events, "stderr"), b"warn\n");
    let result = &events.last().unwrap();
    assert_eq!(result.event, "result");
    assert_eq!(result.data["skipped"], false);
    assert_eq!(result.data["installExitCode"], 0);
    assert_eq!(
        result.data["entrypoint"],
        json!(["sh", "/workspace/agent.sh"])
    );
    let hash = result.data["installCommandHash"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(hash.len(), 64);
    assert!(result.data["lastConfiguredAt"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    assert_eq!(count_lines(&counter), 1);
    assert_eq!(
        std::fs::read(r.workspace.join("lib/data.bin")).unwrap(),
        [0, 1, 2, 255]
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(r.workspace.join("agent.sh"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o755);

    // Identical: skipped, nothing re-run.
    let (status, second) = r.configure_json(body.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(second["skipped"], true);
    assert_eq!(second["installCommandHash"], hash.as_str());
    assert_eq!(count_lines(&counter), 1);

    // Only the entrypoint changes: no re-install, but the new entrypoint is in force.
    let mut changed_entry = body.clone();
    changed_entry["entrypoint"] = json!(["sh", "-c", "echo new entry"]);
    let (_, third) = r.configure_json(changed_entry).await;
    assert_eq!(third["skipped"], true);
    assert_eq!(count_lines(&counter), 1);
    let events = r.invoke_sse("", "").await;
    assert_eq!(rebuild(&events, "stdout"), b"new entry\n");

    // A changed file re-installs.
    let mut changed_file = body.clone();
    changed_file["files"][0]["content"] = json!("echo agent v2\n");
    let (_, fourth) = r.configure_json(changed_file).await;
    assert_eq!(fourth["skipped"], false);
    assert_ne!(fourth["installCommandHash"], hash.as_str());
    assert_eq!(count_lines(&counter), 2);
    assert_eq!(
        std::fs::read_to_string(r.workspace.join("agent.sh")).unwrap(),
        "echo agent v2\n"
    );
    let info: Value = r
        .get("/v1/info")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["configured"], true);
    assert_eq!(info["installCommandHash"], fourth["installCommandHash"]);
}

#[tokio::test]
async fn concurrent_identical_configures_install_once() {
    let r = Runner::start(&[]);
    let counter = r.dir.join("count");
    let body = json!({
        "files": [{"path": "a.txt", "content": "a"}],
        "installCommand": ["sh", "-c", format!("echo x >> {}; sleep 0.3", counter.display())],
        "entrypoint": ["cat"]
    });
    let results = futures_join(8, || r.configure_json(body.clone())).await;
    let skipped = results.iter().filter(|(_, b)| b["skipped"] == true).count();
    assert!(results.iter().all(|(s, _)| *s == 200));
    assert_eq!(skipped, 7, "{results:?}");
    assert_eq!(count_lines(&counter), 1);
}

async fn futures_join<F, Fut, T>(n: usize, f: F) -> Vec<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let futs: Vec<_> = (0..n).map(|_| f()).collect();
    let mut out = Vec::new();
    // join_all without a new dependency: poll them together through a JoinSet of boxed tasks
    // would need 'static; a simple sequential await of concurrently created futures does not
    // run them concurrently, so use tokio::join via a select loop instead.
    let mut pinned: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut done: Vec<Option<T>> = (0..n).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, fut) in pinned.iter_mut().enumerate() {
            if done[i].is_none() {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => done[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.extend(done.into_iter().map(|v| v.unwrap()));
    out
}

#[tokio::test]
async fn path_escapes_are_refused_and_write_nothing() {
    let r = Runner::start(&[]);
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), r.workspace.join("escape")).unwrap();
    std::fs::write(r.workspace.join("plain"), "x").unwrap();
    let hostile = [
        "../outside.txt".to_owned(),
        "a/../../outside.txt".to_owned(),
        "/etc/agentbox-test".to_owned(),
        format!("{}/x", outside.path().display()),
        "escape/x".to_owned(),
        "escape".to_owned(),
        "bad\u{0}name".to_owned(),
        "plain/x".to_owned(),
        ".agentbox/config.json".to_owned(),
        "/workspace/../x".to_owned(),
        String::new(),
        "/workspace".to_owned(),
    ];
    let before = list_tree(&r.workspace);
    for path in &hostile {
        let (status, body) = r
            .configure_json(json!({
                "files": [
                    {"path": "good-first.txt", "content": "must not be written"},
                    {"path": path, "content": "pwned"}
                ],
                "entrypoint": ["true"]
            }))
            .await;
        assert_eq!(status, 400, "{path:?}: {body}");
        assert_eq!(body["error"], "invalid_path", "{path:?}");
        assert!(body["message"].as_str().unwrap().len() > 5);
    }
    assert_eq!(list_tree(&r.workspace), before, "the workspace changed");
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    assert!(!std::path::Path::new("/etc/agentbox-test").exists());
    assert!(!r.dir.join("outside.txt").exists());
    let info: Value = r
        .get("/v1/info")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["configured"], false);
}

fn list_tree(root: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            if path.ends_with(".agentbox") {
                continue;
            }
            out.push(path.display().to_string());
            if entry.file_type().unwrap().is_dir() {
                stack.push(path);
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn size_and_count_limits_give_413() {
    let r = Runner::start(&[
        "--max-file-bytes",
        "1K",
        "--max-total-bytes",
        "2K",
        "--max-files",
        "3",
    ]);
    let big = "x".repeat(1025);
    let cases = [
        json!({"files": [{"path": "a", "content": big}], "entrypoint": ["true"]}),
        json!({"files": [
            {"path": "a", "content": "x".repeat(1000)},
            {"path": "b", "content": "x".repeat(1000)},
            {"path": "c", "content": "x".repeat(1000)}
        ], "entrypoint": ["true"]}),
        json!({"files": [
            {"path": "a"}, {"path": "b"}, {"path": "c"}, {"path": "d"}
        ], "entrypoint": ["true"]}),
    ];
    for body in cases {
        let (status, resp) = r.configure_json(body).await;
        assert_eq!(status, 413, "{resp}");
        assert_eq!(resp["error"], "payload_too_large");
    }
    assert_eq!(list_tree(&r.workspace), Vec::<String>::new());
}

#[tokio::test]
async fn a_failed_install_keeps_the_previous_configuration() {
    let r = Runner::start(&[]);
    let (status, first) = r
        .configure_json(json!({
            "files": [{"path": "v.txt", "content": "one"}],
            "installCommand": ["true"],
            "entrypoint": ["sh", "-c", "echo old"]
        }))
        .await;
    assert_eq!(status, 200);
    let (status, failed) = r
        .configure_json(json!({
            "files": [{"path": "v.txt", "content": "two"}],
            "installCommand": ["sh", "-c", "echo broken >&2; exit 7"],
            "entrypoint": ["sh", "-c", "echo new"]
        }))
        .await;
    assert_eq!(status, 200);
    assert_eq!(failed["installExitCode"], 7);
    assert_eq!(failed["skipped"], false);
    assert_eq!(failed["entrypoint"], json!(["sh", "-c", "echo old"]));
    let info: Value = r
        .get("/v1/info")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["installCommandHash"], first["installCommandHash"]);
    assert_eq!(info["entrypoint"], json!(["sh", "-c", "echo old"]));
    let events = r.invoke_sse("", "").await;
    assert_eq!(rebuild(&events, "stdout"), b"old\n");

    // An install that cannot start is an `error` event (SSE) or 422 (JSON), nothing changes.
    let (status, body) = r
        .configure_json(json!({
            "installCommand": ["/nonexistent/installer"],
            "entrypoint": ["true"]
        }))
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"], "install_failed");
    let resp = r
        .post("/v1/configure")
        .json(&json!({"installCommand": ["/nonexistent/installer2"]}))
        .send()
        .await
        .unwrap();
    let events = parse_sse(&resp.bytes().await.unwrap());
    let last = events.last().unwrap();
    assert_eq!(last.event, "error");
    assert_eq!(last.data["phase"], "install");
    let info: Value = r
        .get("/v1/info")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["entrypoint"], json!(["sh", "-c", "echo old"]));
}

#[tokio::test]
async fn invoke_before_configure_is_424() {
    let r = Runner::start(&[]);
    let resp = r.post("/v1/invoke").body("x").send().await.unwrap();
    assert_eq!(resp.status(), 424);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "not_configured");
}

#[tokio::test]
async fn stdin_to_stdout_is_byte_exact_including_invalid_utf8() {
    let r = Runner::start(&[]);
    r.configure_sh("cat; printf 'to-err\\377' >&2").await;
    let mut rng = agentbox_testkit::Rng::new(0x1234_5678_9abc_def1);
    let mut data: Vec<u8> = (0..300_000)
        .map(|_| {
            let state = rng.next();
            match state % 50 {
                0 => b'\n',
                1 => 0xff,
                2 => 0xc3,
                _ => (state >> 8) as u8,
            }
        })
        .collect();
    data.extend_from_slice(b"no final newline \xe2\x82");
    let events = r.invoke_sse("", data.clone()).await;
    assert_eq!(events[0].event, "start");
    assert_eq!(rebuild(&events, "stdout"), data);
    assert_eq!(rebuild(&events, "stderr"), b"to-err\xff");
    let ids: Vec<u64> = events.iter().map(|e| e.id).collect();
    assert_eq!(ids, (1..=events.len() as u64).collect::<Vec<_>>());
    let exit = exit_event(&events);
    assert_eq!(exit["exitCode"], 0);
    assert_eq!(exit["reason"], "completed");
    assert!(exit["durationMs"].is_u64());
    assert!(events.iter().any(|e| e.data["dataBase64"].is_string()));
    assert!(events.iter().any(|e| e.data["partial"] == true));
}

/// Bodies at the edge of the inline stdin write (≤ 4096 bytes, written by the pump) and just
/// past it (copied by a task) both arrive byte for byte, as does an empty one.
#[tokio::test]
async fn stdin_at_the_inline_limit_is_byte_exact() {
    let r = Runner::start(&[]);
    r.configure_sh("cat").await;
    for len in [0usize, 1, 4095, 4096, 4097, 70_000] {
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let events = r.invoke_sse("", data.clone()).await;
        assert_eq!(rebuild(&events, "stdout"), data, "a body of {len} bytes");
        assert_eq!(exit_event(&events)["exitCode"], 0);
    }
}

#[tokio::test]
async fn ten_thousand_lines_arrive_in_order() {
    let r = Runner::start(&[]);
    r.configure_sh("seq 1 10000").await;
    let events = r.invoke_sse("", "").await;
    let lines: Vec<&str> = events
        .iter()
        .filter(|e| e.event == "log")
        .map(|e| e.data["data"].as_str().unwrap())
        .collect();
    let want: Vec<String> = (1..=10000).map(|i| i.to_string()).collect();
    assert_eq!(lines, want);
}

/// Whether a process ends at once (read out on the runtime) or outlives the first
/// milliseconds (read by a pump thread), and whether a descendant still writes to its output
/// after it exited, every byte arrives, in order, before `exit`.
#[tokio::test]
async fn quick_slow_and_outliving_output_all_arrive() {
    let r = Runner::start(&[]);
    for (script, want) in [
        ("printf 'a\\nb'", "a\nb"),
        ("sleep 0.05; printf 'a\\nb'", "a\nb"),
        ("(sleep 0.3; echo late) & echo early", "early\nlate\n"),
        (
            "(sleep 0.3; echo late; echo err >&2) & exec >&- 2>&-",
            "late\n",
        ),
        (
            "head -c 300000 /dev/zero | tr '\\0' x",
            &"x".repeat(300_000),
        ),
    ] {
        r.configure_sh(script).await;
        let events = r.invoke_sse("", "").await;
        assert_eq!(
            String::from_utf8(rebuild(&events, "stdout")).unwrap(),
            want,
            "{script}"
        );
        let exit = exit_event(&events);
        assert_eq!(exit["exitCode"], 0, "{script}: {exit}");
        assert_eq!(exit["reason"], "completed", "{script}: {exit}");
        assert_eq!(events.last().unwrap().event, "exit", "{script}");
    }
}

#[tokio::test]
async fn prompt_json_mode_env_and_exit_codes() {
    let r = Runner::start(&[]);
    r.configure_json(json!({
        "entrypoint": ["sh", "-c", "echo \"args=$*\"; cat; echo; echo \"id=$AGENTBOX_INVOKE_ID tok=${AGENTBOX_RUNNER_TOKEN:-none} mine=$MINE\"; pwd; exit 3", "sh"],
        "env": {"MINE": "yes"}
    }))
    .await;
    let resp = r
        .post("/v1/invoke?prompt=hello%20there")
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["exitCode"], 3);
    assert_eq!(body["reason"], "completed");
    let stdout = body["stdout"].as_str().unwrap();
    let id = body["invokeId"].as_str().unwrap();
    assert!(id.starts_with("inv-"));
    let want = format!(
        "args=--prompt=hello there\nhello there\nid={id} tok=none mine=yes\n{}\n",
        r.workspace.display()
    );
    assert_eq!(stdout, want);

    // With a body, the prompt goes only to argv.
    let resp = r
        .post("/v1/invoke?prompt=p")
        .header("accept", "application/json")
        .body("{\"json\": true}")
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert!(body["stdout"]
        .as_str()
        .unwrap()
        .starts_with("args=--prompt=p\n{\"json\": true}\n"));

    // A signal: 128 + N.
    r.configure_sh("kill -9 $$").await;
    let events = r.invoke_sse("", "").await;
    let exit = exit_event(&events);
    assert_eq!(exit["exitCode"], 137);
    assert_eq!(exit["signal"], 9);
}

#[tokio::test]
async fn the_token_never_reaches_the_child() {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("ws");
    let mut child = common::Guard(
        Command::new(common::bin())
            .args(["--listen", "127.0.0.1:0", "--workspace"])
            .arg(&ws)
            .env("AGENTBOX_RUNNER_TOKEN", "env-secret-token")
            .env("AGENTBOX_LOG", "error")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.0.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();
    let client = reqwest::Client::new();
    let resp = client
        .post(format!("http://{addr}/v1/configure"))
        .bearer_auth("env-secret-token")
        .header("accept", "application/json")
        .json(&json!({"entrypoint": ["sh", "-c", "env"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = client
        .post(format!("http://{addr}/v1/invoke"))
        .bearer_auth("env-secret-token")
        .header("accept", "application/json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let out = format!("{}{}", body["stdout"], body["stderr"]);
    assert!(!out.contains("env-secret-token"), "{out}");
    assert!(out.contains("AGENTBOX_INVOKE_ID="));
}

#[test]
fn logs_written_to_a_file_are_plain_text() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("runner.log");
    let mut child = common::Guard(
        Command::new(common::bin())
            .args([
                "--listen",
                "127.0.0.1:0",
                "--insecure-no-auth",
                "--workspace",
            ])
            .arg(dir.path().join("ws"))
            .env("AGENTBOX_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.0.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.starts_with("listening on "), "{line}");
    // A stopped runner has written every line it logs.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.0.wait().unwrap().success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("runner ready"), "{text}");
    assert!(
        !text.contains('\x1b'),
        "colour codes in a log file: {text:?}"
    );
}

#[tokio::test]
async fn concurrency_cap_rejects_exactly_the_excess() {
    let r = Runner::start(&["--max-concurrent-invokes", "2"]);
    let release = r.dir.join("release");
    r.configure_sh(&format!(
        "while [ ! -e {} ]; do sleep 0.02; done; echo done",
        release.display()
    ))
    .await;
    let sends: Vec<_> = (0..5)
        .map(|_| {
            r.post("/v1/invoke")
                .header("accept", "application/json")
                .send()
        })
        .collect();
    let handles: Vec<_> = sends.into_iter().map(tokio::spawn).collect();
    // The 429s come back at once; the admitted two answer (JSON mode) only once released.
    let deadline = Instant::now() + Duration::from_secs(20);
    while handles.iter().filter(|h| h.is_finished()).count() < 3 {
        assert!(Instant::now() < deadline, "the excess was not rejected");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let info: Value = r
        .get("/v1/info")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["inflight"], 2);
    let mut rejected = 0;
    let mut finished_ok = 0;
    std::fs::write(&release, "go").unwrap();
    for h in handles {
        let resp = h.await.unwrap().unwrap();
        match resp.status().as_u16() {
            429 => {
                assert_eq!(resp.headers()["retry-after"], "5");
                let body: Value = resp.json().await.unwrap();
                assert_eq!(body["error"], "concurrency_exceeded");
                assert_eq!(body["limit"], 2);
                assert_eq!(body["inflight"], 2);
                rejected += 1;
            }
            200 => {
                let body: Value = resp.json().await.unwrap();
                assert_eq!(body["stdout"], "done\n");
                finished_ok += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!((finished_ok, rejected), (2, 3));
}

#[tokio::test]
async fn cancel_kills_the_whole_tree_including_escaped_descendants() {
    let r = Runner::start(&["--grace", "1s"]);
    let d = r.dir.display();
    // A grandchild that ignores SIGTERM, and a double-forked setsid descendant that also
    // ignores it and has closed the output pipes.
    r.configure_sh(&format!(
        "trap '' TERM; sleep 1000 & echo $! > {d}/gc.pid; \
         ( setsid sh -c 'trap \"\" TERM; sleep 1000 >/dev/null 2>&1 & echo $! > {d}/ds.pid' & ); \
         echo ready; wait"
    ))
    .await;
    let mut resp = r.post("/v1/invoke").send().await.unwrap();
    let mut buf = Vec::new();
    let events = common::read_until(&mut resp, &mut buf, |e| e.event == "log").await;
    let id = events[0].data["invokeId"].as_str().unwrap().to_owned();
    let gc: i32 = wait_for_file(&r.dir.join("gc.pid")).await.parse().unwrap();
    let ds: i32 = wait_for_file(&r.dir.join("ds.pid")).await.parse().unwrap();
    assert!(pid_exists(gc) && pid_exists(ds));

    let cancel = r
        .post(&format!("/v1/invokes/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 202);
    let body: Value = cancel.json().await.unwrap();
    assert_eq!(body, json!({"invokeId": id, "status": "canceling"}));
    let events = common::read_until(&mut resp, &mut buf, |e| e.event == "exit").await;
    let exit = exit_event(&events);
    assert_eq!(exit["reason"], "canceled");
    assert!(!pid_exists(gc), "grandchild {gc} survived");
    assert!(
        !pid_exists(ds),
        "setsid descendant {ds} survived: {:?}",
        std::fs::read_to_string(format!("/proc/{ds}/stat"))
    );

    // Finished or unknown invokes: 404, by path and by body.
    let again = r
        .post(&format!("/v1/invokes/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 404);
    let body: Value = again.json().await.unwrap();
    assert_eq!(body["error"], "invoke_not_found");
    let unknown = r
        .post("/v1/invoke/cancel")
        .json(&json!({"invokeId": "inv-000000000000-0000000000000000"}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
}

#[tokio::test]
async fn cancel_by_body_and_timeout_end_with_their_reasons() {
    let r = Runner::start(&["--grace", "500ms"]);
    r.configure_sh("echo up; exec sleep 1000").await;
    let mut resp = r.post("/v1/invoke").send().await.unwrap();
    let mut buf = Vec::new();
    let events = common::read_until(&mut resp, &mut buf, |e| e.event == "log").await;
    let id = events[0].data["invokeId"].as_str().unwrap().to_owned();
    let cancel = r
        .post("/v1/invoke/cancel")
        .json(&json!({"invokeId": id}))
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 202);
    let events = common::read_until(&mut resp, &mut buf, |e| e.event == "exit").await;
    let exit = exit_event(&events);
    assert_eq!(exit["reason"], "canceled");
    assert_eq!(exit["signal"], 15);

    let started = Instant::now();
    let events = r.invoke_sse("?timeout=1s", "").await;
    let exit = exit_event(&events);
    assert_eq!(exit["reason"], "timeout");
    let ms = exit["durationMs"].as_u64().unwrap();
    assert!((1000..5000).contains(&ms), "{ms}");
    assert!(started.elapsed() < Duration::from_secs(10));

    for bad in ["abc", "10", "-1s", "0s"] {
        let resp = r
            .post(&format!("/v1/invoke?timeout={bad}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{bad}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "invalid_timeout");
    }
}

#[tokio::test]
async fn a_restarted_runner_keeps_its_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let hash;
    {
        let r = Runner::start_in(dir.path(), &[]);
        let (status, body) = r
            .configure_json(json!({
                "files": [{"path": "x.txt", "content": "persisted"}],
                "installCommand": ["true"],
                "entrypoint": ["cat", "x.txt"],
                "env": {"A": "1"}
            }))
            .await;
        assert_eq!(status, 200);
        hash = body["installCommandHash"].as_str().unwrap().to_owned();
    }
    let r = Runner::start_in(dir.path(), &[]);
    let info: Value = r
        .get("/v1/info")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["configured"], true);
    assert_eq!(info["installCommandHash"], hash.as_str());
    let events = r.invoke_sse("", "").await;
    assert_eq!(rebuild(&events, "stdout"), b"persisted\n"[..9]);
    let (_, again) = r
        .configure_json(json!({
            "files": [{"path": "x.txt", "content": "persisted"}],
            "installCommand": ["true"]
        }))
        .await;
    assert_eq!(again["skipped"], true);
}

#[tokio::test]
async fn malformed_requests_get_json_errors() {
    let r = Runner::start(&[]);
    let cases: Vec<(&str, &str, &str, u16, &str)> = vec![
        ("POST", "/v1/configure", "{not json", 400, "invalid_request"),
        ("POST", "/v1/configure", "[]", 400, "invalid_request"),
        (
            "POST",
            "/v1/configure",
            r#"{"files": "nope"}"#,
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/configure",
            r#"{"entrypoint": "python agent.py"}"#,
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/configure",
            r#"{"entrypoint": []}"#,
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/configure",
            r#"{"files": [{"path": "a"}]}"#,
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/configure",
            r#"{"entrypoint": ["x"], "files": [{"path": "a", "content": "x", "contentBase64": "eA=="}]}"#,
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/configure",
            r#"{"entrypoint": ["x"], "files": [{"path": "a", "contentBase64": "!!!"}]}"#,
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/configure",
            r#"{"entrypoint": ["x"], "files": [{"path": "a", "mode": 99999}]}"#,
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/configure",
            r#"{"entrypoint": ["x"], "env": {"A=B": "c"}}"#,
            400,
            "invalid_request",
        ),
        ("POST", "/v1/configure", "", 400, "invalid_request"),
        ("POST", "/v1/invoke/cancel", "{}", 400, "invalid_request"),
        (
            "POST",
            "/v1/invoke/cancel",
            r#"{"invokeId": 5}"#,
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/invoke?onDisconnect=sometimes",
            "",
            400,
            "invalid_request",
        ),
        ("GET", "/v1/nothing", "", 404, "not_found"),
        ("GET", "/", "", 404, "not_found"),
        ("DELETE", "/v1/configure", "", 405, "method_not_allowed"),
        ("GET", "/v1/invoke", "", 405, "method_not_allowed"),
        ("GET", "/v1/invokes/inv-nope", "", 404, "invoke_not_found"),
        (
            "GET",
            "/v1/invokes/..%2F..%2Fetc/events",
            "",
            404,
            "invoke_not_found",
        ),
    ];
    for (method, path, body, status, code) in cases {
        let resp = r
            .client
            .request(method.parse().unwrap(), r.url(path))
            .bearer_auth(TOKEN)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status, "{method} {path} {body}");
        let json: Value = resp.json().await.unwrap();
        assert_eq!(json["error"], code, "{method} {path} {body}: {json}");
        assert!(json["message"].is_string());
    }
    // Still serving.
    let resp = r.client.get(r.url("/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

/// The static binary runs with an empty environment from a directory holding only itself.
/// `scripts/test.sh` builds it and sets AGENTBOX_STATIC_RUNNER; under CI it is required.
#[tokio::test]
async fn static_binary_runs_with_an_empty_environment() {
    let Some(path) = std::env::var_os("AGENTBOX_STATIC_RUNNER") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must set AGENTBOX_STATIC_RUNNER (scripts/test.sh does)"
        );
        eprintln!("skipped: AGENTBOX_STATIC_RUNNER is not set (scripts/test.sh sets it)");
        return;
    };
    let file = Command::new("file").arg(&path).output();
    if let Ok(out) = file {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("static-pie linked") || text.contains("statically linked"),
            "{text}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("agentbox-runner");
    std::fs::copy(&path, &bin).unwrap();
    let mut child = common::Guard(
        Command::new(&bin)
            .env_clear()
            .current_dir(dir.path())
            .args([
                "--listen",
                "127.0.0.1:0",
                "--token",
                "static-token",
                "--workspace",
                "ws",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.0.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();
    let client = reqwest::Client::new();
    let body: Value = client
        .post(format!("http://{addr}/v1/configure"))
        .bearer_auth("static-token")
        .header("accept", "application/json")
        .json(&json!({"files": [{"path": "f", "content": "static ok\n"}], "entrypoint": ["/bin/cat", "f"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["installExitCode"], 0, "{body}");
    let body: Value = client
        .post(format!("http://{addr}/v1/invoke"))
        .bearer_auth("static-token")
        .header("accept", "application/json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["stdout"], "static ok\n");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        2,
        "only the binary and its workspace"
    );
}

#[tokio::test]
async fn openapi_is_served_without_auth_and_names_every_route() {
    let r = Runner::start(&[]);
    let resp = r.client.get(r.url("/openapi.json")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let served: Value = resp.json().await.unwrap();
    let committed: Value = serde_json::from_str(include_str!("../openapi.json")).unwrap();
    assert_eq!(served, committed);
    assert!(served["openapi"].as_str().unwrap().starts_with("3."));
    let routes = [
        ("/healthz", "get"),
        ("/openapi.json", "get"),
        ("/v1/info", "get"),
        ("/v1/configure", "post"),
        ("/v1/invoke", "post"),
        ("/v1/invoke/cancel", "post"),
        ("/v1/invokes", "get"),
        ("/v1/invokes/{id}", "get"),
        ("/v1/invokes/{id}/events", "get"),
        ("/v1/invokes/{id}/cancel", "post"),
        ("/v1/exec", "post"),
        ("/v1/files", "get"),
        ("/v1/files/{path}", "get"),
        ("/v1/files/{path}", "put"),
        ("/v1/files/{path}", "delete"),
        ("/v1/archive", "get"),
        ("/v1/sessions", "post"),
        ("/v1/sessions", "get"),
        ("/v1/sessions/{id}", "get"),
        ("/v1/sessions/{id}", "delete"),
        ("/v1/sessions/{id}/events", "get"),
        ("/v1/sessions/{id}/permissions/{pid}", "post"),
        ("/v1/invokes/{id}/permissions/{pid}", "post"),
        ("/v1/sessions/{id}/config", "put"),
        ("/v1/agents", "get"),
    ];
    for (path, method) in routes {
        assert!(
            served["paths"][path][method].is_object(),
            "{method} {path} is not described"
        );
    }
    // The limits the runner reports are the ones the description requires.
    let info: Value = r
        .get("/v1/info")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for field in served["components"]["schemas"]["Limits"]["required"]
        .as_array()
        .unwrap()
    {
        let field = field.as_str().unwrap();
        assert!(info["limits"][field].is_u64(), "limits.{field} missing");
    }
}

/// The output the framing tests write: a line in two flushes with a pause between them, a line
/// of invalid UTF-8, a line longer than 64 KiB, stderr, and a prompt left without a newline at
/// the end after another pause.
const FRAMING_SCRIPT: &str = "printf 'Thinking...'; sleep 0.3; printf ' done\\n'; \
    printf 'bad \\377 line\\n'; head -c 70000 /dev/zero | tr '\\0' x; echo; \
    echo to-err >&2; printf 'prompt> '; sleep 0.3; printf tail";

fn framing_stdout() -> Vec<u8> {
    let mut out = b"Thinking... done\nbad \xff line\n".to_vec();
    out.extend(std::iter::repeat_n(b'x', 70_000));
    out.extend_from_slice(b"\nprompt> tail");
    out
}

/// `(data, dataBase64, partial)` of every stdout `log` event.
fn stdout_logs(events: &[common::Event]) -> Vec<(String, Option<String>, bool)> {
    events
        .iter()
        .filter(|e| e.event == "log" && e.data["stream"] == "stdout")
        .map(|e| {
            (
                e.data["data"]
                    .as_str()
                    .unwrap_or_else(|| panic!("a log event without data: {}", e.data))
                    .to_owned(),
                e.data["dataBase64"].as_str().map(str::to_owned),
                e.data["partial"] == true,
            )
        })
        .collect()
}

/// By default (and with `?stream=lines`) `log` events are the seed's: one per whole line, even
/// when the line was written in two flushes with a pause; only a line over 64 KiB (in pieces)
/// and the unterminated end are `partial`. `data` is always there (lossy for invalid UTF-8,
/// whose exact bytes are in `dataBase64`), and the output rebuilds byte for byte.
#[tokio::test]
async fn log_events_are_whole_lines_by_default() {
    let r = Runner::start(&[]);
    r.configure_sh(FRAMING_SCRIPT).await;
    let x = "x".repeat(70_000);
    for query in ["", "?stream=lines"] {
        let events = r.invoke_sse(query, "").await;
        assert_eq!(exit_event(&events)["exitCode"], 0, "{query}");
        assert_eq!(rebuild(&events, "stdout"), framing_stdout(), "{query}");
        assert_eq!(rebuild(&events, "stderr"), b"to-err\n", "{query}");
        let logs = stdout_logs(&events);
        let want = vec![
            ("Thinking... done".to_owned(), None, false),
            (
                "bad \u{fffd} line".to_owned(),
                Some("YmFkIP8gbGluZQ==".to_owned()),
                false,
            ),
            (x[..64 << 10].to_owned(), None, true),
            (x[64 << 10..].to_owned(), None, false),
            ("prompt> tail".to_owned(), None, true),
        ];
        assert_eq!(logs, want, "{query}");
    }
}

/// `?stream=live`: a fragment is also sent once the output pauses (prompts, streamed tokens),
/// marked `partial`; the bytes still rebuild exactly.
#[tokio::test]
async fn log_events_are_live_on_request() {
    let r = Runner::start(&[]);
    r.configure_sh(FRAMING_SCRIPT).await;
    let events = r.invoke_sse("?stream=live", "").await;
    assert_eq!(exit_event(&events)["exitCode"], 0);
    assert_eq!(rebuild(&events, "stdout"), framing_stdout());
    assert_eq!(rebuild(&events, "stderr"), b"to-err\n");
    let logs = stdout_logs(&events);
    let texts: Vec<(&str, bool)> = logs
        .iter()
        .filter(|(d, _, _)| !d.starts_with('x'))
        .map(|(d, _, p)| (d.as_str(), *p))
        .collect();
    assert_eq!(
        texts,
        [
            ("Thinking...", true),
            (" done", false),
            ("bad \u{fffd} line", false),
            ("prompt> ", true),
            ("tail", true),
        ]
    );
    assert_eq!(logs[2].1.as_deref(), Some("YmFkIP8gbGluZQ=="));
    // A bad value is refused before anything runs.
    let resp = r.post("/v1/invoke?stream=sometimes").send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "invalid_request", "{body}");
}

/// Exec and configure (its install's output) take `?stream=` too: whole lines by default,
/// fragments after a pause with `live`.
#[tokio::test]
async fn exec_and_install_output_are_framed_as_asked() {
    let r = Runner::start(&[]);
    let script = "printf 'Thinking...'; sleep 0.3; echo ' done'";
    for (query, want) in [
        ("", vec![("Thinking... done", false)]),
        (
            "?stream=live",
            vec![("Thinking...", true), (" done", false)],
        ),
    ] {
        let resp = r
            .post(&format!("/v1/exec{query}"))
            .header("accept", "text/event-stream")
            .json(&json!({"command": script}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let events = parse_sse(&resp.bytes().await.unwrap());
        let logs: Vec<(String, bool)> = stdout_logs(&events)
            .into_iter()
            .map(|(d, _, p)| (d, p))
            .collect();
        let want: Vec<(String, bool)> = want.iter().map(|(d, p)| (d.to_string(), *p)).collect();
        assert_eq!(logs, want, "exec{query}");
        assert_eq!(rebuild(&events, "stdout"), b"Thinking... done\n");

        let resp = r
            .post(&format!("/v1/configure{query}"))
            .json(&json!({
                "files": [{"path": "q.txt", "content": query}],
                "installCommand": ["sh", "-c", script],
                "entrypoint": ["true"],
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let events = parse_sse(&resp.bytes().await.unwrap());
        assert_eq!(events.last().unwrap().event, "result", "{events:?}");
        let logs: Vec<(String, bool)> = stdout_logs(&events)
            .into_iter()
            .map(|(d, _, p)| (d, p))
            .collect();
        assert_eq!(logs, want, "configure{query}");
    }
}
