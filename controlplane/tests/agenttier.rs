//! AgentTier drop-in: the seed's stream contract by default through a real control plane, over
//! raw HTTP (both framings, reattach past the end, the routes agentbox does not serve), and the
//! published AgentTier Python SDK (`agenttier==0.8.1`, installed from PyPI into a virtualenv)
//! driving it sync and async (`agenttier_sdk.py`).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    assert_error, exit_event, invoke_id, parse_sse, read_to_end, rebuild, send, Env, ADMIN_KEY,
};
use reqwest::Method;
use serde_json::{json, Value};

/// A line in two flushes with a pause, invalid UTF-8, a line over 64 KiB, stderr, and a prompt
/// left without a newline after another pause.
const SCRIPT: &str = "printf 'Thinking...'; sleep 0.3; printf ' done\\n'; \
    printf 'bad \\377 line\\n'; head -c 70000 /dev/zero | tr '\\0' x; echo; \
    echo to-err >&2; printf 'prompt> '; sleep 0.3; printf tail";

fn script_stdout() -> Vec<u8> {
    let mut out = b"Thinking... done\nbad \xff line\n".to_vec();
    out.extend(std::iter::repeat_n(b'x', 70_000));
    out.extend_from_slice(b"\nprompt> tail");
    out
}

/// `(data, partial)` of the stdout `log` events that are not the long line's pieces.
fn short_logs(events: &[common::Event]) -> Vec<(String, bool)> {
    events
        .iter()
        .filter(|e| e.event == "log" && e.data["stream"] == "stdout")
        .map(|e| {
            let data = e.data["data"].as_str().unwrap_or_else(|| {
                panic!("a log event without data: {}", e.data);
            });
            (data.to_owned(), e.data["partial"] == true)
        })
        .filter(|(d, _)| !d.starts_with('x'))
        .collect()
}

async fn invoke_raw(cp: &common::Cp, name: &str, query: &str) -> Vec<common::Event> {
    let resp = cp
        .sb(Method::POST, name, &format!("/invoke{query}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    parse_sse(&resp.bytes().await.unwrap())
}

/// Through the control plane: whole lines by default (the seed's), fragments after a pause with
/// `?stream=live`; `data` always present; the exact bytes rebuild in both.
#[tokio::test]
async fn both_framings_rebuild_byte_exact_through_the_control_plane() {
    let env = Env::new();
    let cp = env.start();
    cp.sandbox_sh("frames", SCRIPT).await;

    let events = invoke_raw(&cp, "frames", "").await;
    assert_eq!(exit_event(&events)["exitCode"], 0);
    assert_eq!(rebuild(&events, "stdout"), script_stdout());
    assert_eq!(rebuild(&events, "stderr"), b"to-err\n");
    assert_eq!(
        short_logs(&events),
        [
            ("Thinking... done".to_owned(), false),
            ("bad \u{fffd} line".to_owned(), false),
            ("prompt> tail".to_owned(), true),
        ]
    );
    let bad = events
        .iter()
        .find(|e| e.data["data"] == "bad \u{fffd} line")
        .unwrap();
    assert_eq!(bad.data["dataBase64"], "YmFkIP8gbGluZQ==");
    let pieces: Vec<(usize, bool)> = events
        .iter()
        .filter(|e| e.data["data"].as_str().is_some_and(|d| d.starts_with('x')))
        .map(|e| {
            (
                e.data["data"].as_str().unwrap().len(),
                e.data["partial"] == true,
            )
        })
        .collect();
    assert_eq!(pieces, [(65536, true), (70_000 - 65536, false)]);

    let events = invoke_raw(&cp, "frames", "?stream=live").await;
    assert_eq!(exit_event(&events)["exitCode"], 0);
    assert_eq!(rebuild(&events, "stdout"), script_stdout());
    assert_eq!(rebuild(&events, "stderr"), b"to-err\n");
    assert_eq!(
        short_logs(&events),
        [
            ("Thinking...".to_owned(), true),
            (" done".to_owned(), false),
            ("bad \u{fffd} line".to_owned(), false),
            ("prompt> ".to_owned(), true),
            ("tail".to_owned(), true),
        ]
    );
}

/// `Last-Event-ID` at or past the final event (as a browser's EventSource reconnects after a
/// clean end): 200, nothing replayed, no `error` event, a clean end. Before it: the rest.
#[tokio::test]
async fn reattach_at_or_past_the_end_is_a_clean_empty_end() {
    let env = Env::new();
    let cp = env.start();
    cp.sandbox_sh("ended", "echo one; echo two").await;
    let events = cp.invoke("ended", "").await;
    let iid = invoke_id(&events);
    let last = events.last().unwrap().id;
    assert_eq!(exit_event(&events)["reason"], "completed");
    let path = format!("/invokes/{iid}/events");
    for (header, query) in [
        (Some(last), ""),
        (Some(last + 1), ""),
        (Some(last + 1000), ""),
        (None, &*format!("?after={last}")),
    ] {
        let mut rb = cp.sb(Method::GET, "ended", &format!("{path}{query}"));
        if let Some(id) = header {
            rb = rb.header("last-event-id", id.to_string());
        }
        let mut resp = rb.send().await.unwrap();
        assert_eq!(resp.status(), 200, "{header:?} {query}");
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let mut buf = Vec::new();
        let replayed = read_to_end(&mut resp, &mut buf).await;
        assert!(
            buf.is_empty(),
            "Last-Event-ID {header:?} {query}: {:?}",
            String::from_utf8_lossy(&buf)
        );
        assert!(replayed.is_empty());
    }
    // One before the end: only the final event, and nothing appended.
    let mut resp = cp
        .sb(Method::GET, "ended", &path)
        .header("last-event-id", (last - 1).to_string())
        .send()
        .await
        .unwrap();
    let mut buf = Vec::new();
    let rest = read_to_end(&mut resp, &mut buf).await;
    assert_eq!(rest.len(), 1, "{rest:?}");
    assert_eq!(rest[0].event, "exit");
    assert_eq!(rest[0].id, last);
}

/// The seed's quickstart template name works; AgentTier routes agentbox does not serve answer
/// 501 `not_implemented` naming the route (after authentication), other unknown routes 404.
#[tokio::test]
async fn quickstart_template_and_unserved_routes() {
    let env = Env::new();
    let cp = env.start();
    let created = cp.create("demo-agent", "langgraph-agent").await;
    assert_eq!(created["templateRef"], "langgraph-agent", "{created}");
    let (status, t) = send(cp.admin(Method::GET, "/api/v1/templates/langgraph-agent")).await;
    assert_eq!(status, 200, "{t}");
    assert_eq!(t["spec"]["mode"], "agent", "{t}");
    // The seed's quickstart, as written (`python` may be missing here: python3).
    cp.configure(
        "demo-agent",
        json!({
            "files": [{"path": "/workspace/agent.py",
                       "content": "import sys\nprint(f\"hello {sys.stdin.read()}\")\n"}],
            "entrypoint": ["python3", "/workspace/agent.py"],
        }),
    )
    .await;
    let events = cp.invoke("demo-agent", "world").await;
    let logs: Vec<&Value> = events
        .iter()
        .filter(|e| e.event == "log")
        .map(|e| &e.data)
        .collect();
    assert_eq!(logs, [&json!({"stream": "stdout", "data": "hello world"})]);

    for (method, path, route) in [(
        Method::GET,
        "/api/v1/analytics/usage",
        "GET /api/v1/analytics/usage",
    )] {
        let (status, body) = send(cp.req(method.clone(), path, None)).await;
        assert_eq!(status, 401, "{method} {path} without a key: {body}");
        let (status, body) = send(cp.admin(method.clone(), path)).await;
        assert_eq!(status, 501, "{method} {path}: {body}");
        assert_error(&body, "not_implemented");
        assert!(
            body["message"].as_str().unwrap().contains(route),
            "{method} {path}: {body}"
        );
    }
    let (status, body) = send(cp.admin(Method::GET, "/api/v1/sandboxes/demo-agent/nothing")).await;
    assert_eq!(status, 404, "{body}");
    assert_error(&body, "not_found");
}

/// The virtualenv's python with `agenttier==0.8.1`: `AGENTBOX_AGENTTIER_VENV`, else
/// `target/agenttier-venv`, created (from PyPI) when it is missing or holds another version.
fn sdk_python() -> PathBuf {
    let venv = match std::env::var_os("AGENTBOX_AGENTTIER_VENV") {
        Some(dir) => PathBuf::from(dir),
        None => {
            // target/<profile>/deps/<test> → target/agenttier-venv
            let exe = std::env::current_exe().unwrap();
            let target = exe
                .ancestors()
                .nth(3)
                .expect("target/<profile>/deps/<test>");
            target.join("agenttier-venv")
        }
    };
    let python = venv.join("bin/python");
    let has_sdk = || {
        Command::new(&python)
            .args([
                "-c",
                "import agenttier, sys; sys.exit(agenttier.__version__ != '0.8.1')",
            ])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has_sdk() {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .unwrap();
        assert!(made.success(), "python3 -m venv {} failed", venv.display());
        let installed = Command::new(venv.join("bin/pip"))
            .args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "agenttier==0.8.1",
            ])
            .status()
            .unwrap();
        assert!(
            installed.success(),
            "pip install agenttier==0.8.1 into {} failed (PyPI unreachable?)",
            venv.display()
        );
        assert!(has_sdk(), "agenttier 0.8.1 not importable after install");
    }
    python
}

/// The published SDK, sync and async, through every method agentbox serves
/// (`agenttier_sdk.py`): fails when the script fails.
#[test]
fn agenttier_python_sdk_drives_a_real_control_plane() {
    let python = sdk_python();
    let env = Env::new();
    let templates = env.root.join("templates.json");
    std::fs::write(
        &templates,
        json!({"templates": [{"name": "cap1", "mode": "agent", "maxConcurrentInvokes": 1,
                              "runnerArgs": ["--grace", "3s"]}]})
        .to_string(),
    )
    .unwrap();
    let cp = env.start_with(
        "none",
        &["--templates-file", &templates.display().to_string()],
    );
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/agenttier_sdk.py");
    let mut child = Command::new(&python)
        .arg(&script)
        .env("AGENTBOX_URL", format!("http://{}", cp.addr))
        .env("AGENTTIER_API_KEY", ADMIN_KEY)
        .env("AGENTBOX_GRACE_SECONDS", "3")
        .env(common::TAG_VAR, &env.tag)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut out).unwrap();
        out
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            panic!("the SDK suite did not finish within 300 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = reader.join().unwrap();
    print!("{out}");
    assert!(status.success(), "the SDK suite failed ({status}):\n{out}");
    let count: usize = out
        .lines()
        .find_map(|l| {
            l.strip_prefix("ok: ")?
                .strip_suffix(" checks")?
                .parse()
                .ok()
        })
        .expect("no `ok: N checks` line");
    assert!(count >= 98, "only {count} checks ran");
}
