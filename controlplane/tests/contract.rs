//! The wire contract with the seed product's clients: the seed's quickstart walked over plain
//! HTTP against the real `agentbox-controlplane` binary (local backend, real runners), checking
//! every field those clients read, types included. Extra fields are allowed; missing or
//! mistyped ones fail here.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{eventually, parse_sse, read_to_end, read_until, send, Env, TEAM_A_KEY, WRONG_KEY};
use reqwest::Method;
use serde_json::{json, Value};

/// The seed's agent: prints `hello <stdin>`; `wait` makes it announce itself and hang.
const AGENT_PY: &str = "import sys, time\n\
data = sys.stdin.read()\n\
if data == 'wait':\n    print('waiting', flush=True)\n    time.sleep(1000)\n\
print(f\"hello {data}\")\n";

fn templates_file(env: &Env) -> String {
    let path = env.root.join("templates.json");
    std::fs::write(
        &path,
        json!({"templates": [{
            "name": "langgraph-agent",
            "description": "The seed's reference agent template.",
            "mode": "agent",
            "maxConcurrentInvokes": 1,
            "runnerArgs": ["--max-upload-bytes", "65536", "--max-file-bytes", "65536"],
        }]})
        .to_string(),
    )
    .unwrap();
    path.display().to_string()
}

#[track_caller]
fn string(v: &Value, field: &str) -> String {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} is not a string in {v}"))
        .to_owned()
}

#[track_caller]
fn opt_string(v: &Value, field: &str) {
    assert!(
        v.get(field).is_none_or(|f| f.is_string() || f.is_null()),
        "{field} is neither absent nor a string in {v}"
    );
}

#[track_caller]
fn integer(v: &Value, field: &str) -> i64 {
    v[field]
        .as_i64()
        .unwrap_or_else(|| panic!("{field} is not an integer in {v}"))
}

#[track_caller]
fn boolean(v: &Value, field: &str) -> bool {
    v[field]
        .as_bool()
        .unwrap_or_else(|| panic!("{field} is not a boolean in {v}"))
}

/// `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`.
fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| r.clone().all(|i| b.get(i).is_some_and(u8::is_ascii_digit));
    if b.len() < 20
        || !digits(0..4)
        || b[4] != b'-'
        || !digits(5..7)
        || b[7] != b'-'
        || !digits(8..10)
        || !matches!(b[10], b'T' | b't')
        || !digits(11..13)
        || b[13] != b':'
        || !digits(14..16)
        || b[16] != b':'
        || !digits(17..19)
    {
        return false;
    }
    let mut i = 19;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    match &b[i..] {
        [b'Z' | b'z'] => true,
        [b'+' | b'-', h1, h2, b':', m1, m2] => [h1, h2, m1, m2].iter().all(|c| c.is_ascii_digit()),
        _ => false,
    }
}

#[track_caller]
fn rfc3339(v: &Value, field: &str) {
    let s = string(v, field);
    assert!(is_rfc3339(&s), "{field} {s:?} is not RFC 3339 in {v}");
}

/// The sandbox summary the seed's clients read.
#[track_caller]
fn check_summary(s: &Value, name: &str) {
    assert_eq!(string(s, "sandboxId"), name, "{s}");
    assert_eq!(string(s, "name"), name, "{s}");
    string(s, "namespace");
    let status = string(s, "status");
    assert!(
        ["Creating", "Running", "Stopped", "Error", "Deleting"].contains(&status.as_str()),
        "status {status:?}"
    );
    for field in ["podName", "pvcName", "templateRef", "message"] {
        opt_string(s, field);
    }
    for field in ["createdAt", "lastActivityAt"] {
        if s.get(field).is_some_and(|v| !v.is_null()) {
            rfc3339(s, field);
        }
    }
    if let Some(by) = s.get("createdBy").filter(|v| !v.is_null()) {
        assert!(by.is_object(), "createdBy is not an object in {s}");
        opt_string(by, "email");
        opt_string(by, "displayName");
    }
}

#[track_caller]
fn check_error(body: &Value, code: &str) {
    assert_eq!(string(body, "error"), code, "{body}");
    assert!(!string(body, "message").is_empty(), "{body}");
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn rfc3339_checker() {
    assert!(is_rfc3339("2026-11-22T18:30:49Z"));
    assert!(is_rfc3339("2026-11-22T18:30:49.123Z"));
    assert!(is_rfc3339("2026-11-22T18:30:49+02:00"));
    assert!(!is_rfc3339("2026-11-22 18:30:49"));
    assert!(!is_rfc3339("2026-11-22T18:30:49"));
    assert!(!is_rfc3339("1732300249"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_quickstart_over_plain_http() {
    let env = Env::new();
    let templates = templates_file(&env);
    let cp = env.start_with("none", &["--templates-file", &templates]);

    // Who am I, and which templates exist.
    let (status, me) = send(cp.admin(Method::GET, "/api/v1/user/me")).await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(string(&me, "sub"), "admin");
    opt_string(&me, "email");
    opt_string(&me, "name");
    assert!(
        me["groups"]
            .as_array()
            .is_some_and(|g| g.iter().all(Value::is_string)),
        "{me}"
    );
    assert!(boolean(&me, "isAdmin"));
    let (_, me_a) = send(cp.req(Method::GET, "/api/v1/user/me", Some(TEAM_A_KEY))).await;
    assert!(!boolean(&me_a, "isAdmin"), "{me_a}");

    let (status, list) = send(cp.admin(Method::GET, "/api/v1/templates")).await;
    assert_eq!(status, 200, "{list}");
    let all = list["templates"].as_array().expect("templates is an array");
    let lg = all
        .iter()
        .find(|t| t["name"] == "langgraph-agent")
        .unwrap_or_else(|| panic!("langgraph-agent not listed in {list}"));
    for t in all {
        string(t, "name");
        opt_string(t, "description");
        opt_string(t, "image");
        opt_string(t, "resourceVersion");
        assert!(
            t.get("spec").is_none_or(|s| s.is_object() || s.is_null()),
            "{t}"
        );
    }
    let (status, one) = send(cp.admin(Method::GET, "/api/v1/templates/langgraph-agent")).await;
    assert_eq!(
        (status, &one),
        (200, lg),
        "GET /templates/{{name}} is the listed one"
    );
    let (status, body) = send(cp.admin(Method::GET, "/api/v1/templates/nope")).await;
    assert_eq!(status, 404, "{body}");
    check_error(&body, "template_not_found");

    // Create, exactly as the seed's curl does.
    let resp = cp
        .admin(Method::POST, "/api/v1/sandboxes")
        .header("content-type", "application/json")
        .body(r#"{"name": "demo-agent", "templateRef": {"name": "langgraph-agent", "kind": "ClusterSandboxTemplate"}}"#)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let created: Value = resp.json().await.unwrap();
    check_summary(&created, "demo-agent");
    // The other kind names agentbox templates too; anything else is refused.
    let (status, other) = send(cp.admin(Method::POST, "/api/v1/sandboxes").json(
        &json!({"name": "ns-template", "templateRef": {"name": "langgraph-agent", "kind": "SandboxTemplate"}}),
    ))
    .await;
    assert!((200..300).contains(&status), "{other}");
    assert_eq!(string(&other, "templateRef"), "langgraph-agent", "{other}");
    let (status, body) = send(cp.admin(Method::POST, "/api/v1/sandboxes").json(
        &json!({"name": "bad-kind", "templateRef": {"name": "langgraph-agent", "kind": "Pod"}}),
    ))
    .await;
    assert_eq!(status, 400, "{body}");
    check_error(&body, "invalid_request");

    // Poll until Running, as the clients do.
    let running = eventually(Duration::from_secs(30), || async {
        let (status, s) = send(cp.sb(Method::GET, "demo-agent", "")).await;
        assert_eq!(status, 200, "{s}");
        check_summary(&s, "demo-agent");
        (s["status"] == "Running").then_some(s)
    })
    .await
    .expect("demo-agent never reached Running");
    assert_eq!(
        string(&running, "templateRef"),
        "langgraph-agent",
        "{running}"
    );
    rfc3339(&running, "createdAt");

    // Configure (SSE, as the seed's curl asks), then the same again: skipped.
    let configuration = json!({
        "files": [{"path": "/workspace/agent.py", "content": AGENT_PY}],
        "installCommand": ["sh", "-c", "echo installed > installed.txt"],
        "entrypoint": ["python3", "/workspace/agent.py"],
    });
    let mut results = Vec::new();
    for _ in 0..2 {
        let resp = cp
            .sb(Method::POST, "demo-agent", "/configure")
            .header("accept", "text/event-stream")
            .json(&configuration)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let events = parse_sse(&resp.bytes().await.unwrap());
        let last = events.last().expect("no configure events");
        assert_eq!(last.event, "result", "{events:?}");
        let r = last.data.clone();
        rfc3339(&r, "lastConfiguredAt");
        assert_eq!(string(&r, "installCommandHash").len(), 64, "{r}");
        assert_eq!(
            r["entrypoint"],
            json!(["python3", "/workspace/agent.py"]),
            "{r}"
        );
        assert_eq!(integer(&r, "installExitCode"), 0, "{r}");
        results.push((boolean(&r, "skipped"), r));
    }
    assert!(!results[0].0, "first configure ran: {}", results[0].1);
    assert!(results[1].0, "second configure skipped: {}", results[1].1);
    assert_eq!(
        results[0].1["installCommandHash"],
        results[1].1["installCommandHash"]
    );

    // A failing install: a result with its exit code (the timestamp still RFC 3339); an
    // install that cannot start: an error event {phase, message}.
    let resp = cp
        .sb(Method::POST, "ns-template", "/configure")
        .header("accept", "text/event-stream")
        .json(&json!({"installCommand": ["sh", "-c", "exit 3"], "entrypoint": ["true"]}))
        .send()
        .await
        .unwrap();
    let events = parse_sse(&resp.bytes().await.unwrap());
    let last = events.last().expect("no configure events");
    assert_eq!(last.event, "result", "{events:?}");
    assert_eq!(integer(&last.data, "installExitCode"), 3, "{events:?}");
    assert!(!boolean(&last.data, "skipped"));
    rfc3339(&last.data, "lastConfiguredAt");
    let resp = cp
        .sb(Method::POST, "ns-template", "/configure")
        .header("accept", "text/event-stream")
        .json(&json!({"installCommand": ["/no/such/installer"], "entrypoint": ["true"]}))
        .send()
        .await
        .unwrap();
    let events = parse_sse(&resp.bytes().await.unwrap());
    let error = events
        .iter()
        .find(|e| e.event == "error")
        .unwrap_or_else(|| panic!("no error event for an install that cannot start: {events:?}"));
    assert_eq!(string(&error.data, "phase"), "install", "{events:?}");
    assert!(!string(&error.data, "message").is_empty());

    // Invoke, as the seed's curl does: the body is stdin.
    let resp = cp
        .sb(Method::POST, "demo-agent", "/invoke")
        .header("accept", "text/event-stream")
        .body("world")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let events = parse_sse(&resp.bytes().await.unwrap());
    let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names, ["start", "log", "exit"], "{events:?}");
    let start = &events[0].data;
    let id = string(start, "invokeId");
    assert!(id.starts_with("inv-"), "{start}");
    assert!(integer(start, "startedAt") > 0, "{start}");
    assert_eq!(
        events[1].data,
        json!({"stream": "stdout", "data": "hello world"})
    );
    let exit = &events[2].data;
    assert_eq!(string(exit, "invokeId"), id);
    assert_eq!(integer(exit, "exitCode"), 0);
    assert!(integer(exit, "durationMs") >= 0, "{exit}");
    assert_eq!(string(exit, "reason"), "completed");

    // A JSON body reaches stdin as its JSON text; ?prompt= and Go-duration ?timeout= are taken.
    let body = json!({"prompt": "summarize this PR"});
    let resp = cp
        .sb(
            Method::POST,
            "demo-agent",
            "/invoke?prompt=summarize&timeout=1h30m",
        )
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let events = parse_sse(&resp.bytes().await.unwrap());
    let log = events.iter().find(|e| e.event == "log").expect("no log");
    assert_eq!(string(&log.data, "data"), format!("hello {body}"));
    for timeout in ["90s", "5m"] {
        let resp = cp
            .sb(
                Method::POST,
                "demo-agent",
                &format!("/invoke?timeout={timeout}"),
            )
            .body("t")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "timeout={timeout}");
        let events = parse_sse(&resp.bytes().await.unwrap());
        assert_eq!(events.last().unwrap().data["reason"], "completed");
    }
    let (status, body) = send(
        cp.sb(Method::POST, "demo-agent", "/invoke?timeout=soon")
            .body("x"),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    string(&body, "error");

    // Stream and cancel: 2xx for a running invoke, 404 once it is gone.
    let mut resp = cp
        .sb(Method::POST, "demo-agent", "/invoke")
        .body("wait")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut buf = Vec::new();
    let events = read_until(&mut resp, &mut buf, |e| e.event == "log").await;
    let id = string(&events[0].data, "invokeId");
    // Over the template's cap of one: 429 concurrency_exceeded with Retry-After.
    let over = cp
        .sb(Method::POST, "demo-agent", "/invoke")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(over.status(), 429);
    assert_eq!(over.headers()["retry-after"], "5");
    check_error(&over.json().await.unwrap(), "concurrency_exceeded");
    let (status, body) = send(
        cp.sb(Method::POST, "demo-agent", "/invoke/cancel")
            .json(&json!({"invokeId": id})),
    )
    .await;
    assert!((200..300).contains(&status), "cancel: {status} {body}");
    let events = read_to_end(&mut resp, &mut buf).await;
    let exit = &events.last().unwrap().data;
    assert_eq!(events.last().unwrap().event, "exit", "{events:?}");
    assert_eq!(string(exit, "reason"), "canceled", "{exit}");
    assert_eq!(string(exit, "invokeId"), id);
    integer(exit, "exitCode");
    integer(exit, "durationMs");
    let (status, body) = send(
        cp.sb(Method::POST, "demo-agent", "/invoke/cancel")
            .json(&json!({"invokeId": id})),
    )
    .await;
    assert_eq!(status, 404, "cancel of a finished invoke: {body}");
    check_error(&body, "invoke_not_found");
    let (status, body) = send(
        cp.sb(Method::POST, "demo-agent", "/invoke/cancel")
            .json(&json!({"invokeId": "inv-0000000000-0000"})),
    )
    .await;
    assert_eq!(status, 404, "{body}");

    // Files: write, read, list; the leading slash of the sandbox path is dropped in the URL.
    let (status, body) = send(
        cp.sb(Method::PUT, "demo-agent", "/files/workspace/notes.txt")
            .body("my notes\n"),
    )
    .await;
    assert!((200..300).contains(&status), "{body}");
    assert_eq!(
        std::fs::read_to_string(env.workspace("demo-agent").join("notes.txt")).unwrap(),
        "my notes\n"
    );
    let resp = cp
        .sb(Method::GET, "demo-agent", "/files/workspace/notes.txt")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "my notes\n");
    let (status, listing) = send(cp.sb(Method::GET, "demo-agent", "/files/?path=/workspace")).await;
    assert_eq!(status, 200, "{listing}");
    let entries = listing["entries"].as_array().expect("entries is an array");
    for e in entries {
        string(e, "name");
        assert!(e["size"].is_u64(), "{e}");
        boolean(e, "isDir");
        let mode = string(e, "mode");
        assert_eq!(mode.len(), 10, "{e}");
        assert!(
            e["modifiedAt"].is_u64(),
            "modifiedAt is integer seconds: {e}"
        );
    }
    let notes = entries
        .iter()
        .find(|e| e["name"] == "notes.txt")
        .unwrap_or_else(|| panic!("notes.txt not listed: {listing}"));
    assert_eq!(notes["size"], 9);
    assert_eq!(notes["isDir"], false);
    assert_eq!(notes["mode"], "-rw-r--r--");
    assert!(notes["modifiedAt"].as_u64().unwrap().abs_diff(now_secs()) < 600);
    assert!(entries.iter().any(|e| e["name"] == "agent.py"));
    // Outside the workspace is refused.
    for path in ["/files/etc/passwd", "/files/workspace/../../etc/passwd"] {
        let (status, body) = send(cp.sb(Method::GET, "demo-agent", path)).await;
        assert!(status == 400 || status == 404, "{path}: {status} {body}");
        string(&body, "error");
    }
    let (status, body) = send(cp.sb(Method::GET, "demo-agent", "/files/?path=/etc")).await;
    assert_eq!(status, 400, "{body}");
    check_error(&body, "invalid_path");
    // Oversized upload: 413.
    let (status, body) = send(
        cp.sb(Method::PUT, "demo-agent", "/files/workspace/big.bin")
            .body(vec![b'x'; 70_000]),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    check_error(&body, "payload_too_large");
    // Archive: a zip of the workspace.
    let resp = cp
        .sb(Method::GET, "demo-agent", "/archive?path=/workspace")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/zip");
    let zip = resp.bytes().await.unwrap();
    assert!(zip.starts_with(b"PK\x03\x04"), "not a zip");
    let zip_path = env.root.join("ws.zip");
    std::fs::write(&zip_path, &zip).unwrap();
    let out = Command::new("unzip")
        .arg("-p")
        .arg(&zip_path)
        .arg("notes.txt")
        .output();
    match out {
        Ok(out) => assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "my notes\n",
            "{out:?}"
        ),
        Err(e) => panic!("unzip is needed (CI installs it): {e}"),
    }
    // Delete: the file is gone.
    let (status, _) = send(cp.sb(Method::DELETE, "demo-agent", "/files/workspace/notes.txt")).await;
    assert!((200..300).contains(&status), "{status}");
    let (status, body) = send(cp.sb(Method::GET, "demo-agent", "/files/workspace/notes.txt")).await;
    assert_eq!(status, 404, "{body}");
    check_error(&body, "file_not_found");

    // Exec: {command, timeout?} → {stdout, stderr, exitCode}, with no Accept header at all.
    let resp = cp
        .sb(Method::POST, "demo-agent", "/exec")
        .json(&json!({"command": "echo out; echo err >&2; exit 3", "timeout": 30}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got: Value = resp.json().await.unwrap();
    assert_eq!(string(&got, "stdout"), "out\n", "{got}");
    assert_eq!(string(&got, "stderr"), "err\n", "{got}");
    assert_eq!(integer(&got, "exitCode"), 3, "{got}");

    // List.
    let (status, list) = send(cp.admin(Method::GET, "/api/v1/sandboxes")).await;
    assert_eq!(status, 200, "{list}");
    let sandboxes = list["sandboxes"].as_array().expect("sandboxes is an array");
    for s in sandboxes {
        check_summary(s, &string(s, "name"));
    }
    let demo = sandboxes
        .iter()
        .find(|s| s["name"] == "demo-agent")
        .unwrap_or_else(|| panic!("demo-agent not listed: {list}"));
    assert_eq!(demo["status"], "Running");
    assert_eq!(demo["templateRef"], "langgraph-agent");

    // Errors the seed names: 401, 403, 404, 409, 413, 424.
    let (status, body) = send(cp.req(Method::GET, "/api/v1/sandboxes", None)).await;
    assert_eq!(status, 401, "{body}");
    check_error(&body, "unauthorized");
    let (status, body) = send(cp.req(Method::GET, "/api/v1/sandboxes", Some(WRONG_KEY))).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = send(
        cp.req(Method::POST, "/api/v1/sandboxes", Some(TEAM_A_KEY))
            .json(&json!({"name": "elsewhere", "namespace": "team-b"})),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    check_error(&body, "forbidden");
    let (status, body) = send(cp.sb(Method::GET, "no-such-sandbox", "")).await;
    assert_eq!(status, 404, "{body}");
    check_error(&body, "sandbox_not_found");
    let (status, body) = send(
        cp.admin(Method::POST, "/api/v1/sandboxes")
            .json(&json!({"name": "demo-agent", "templateRef": {"name": "langgraph-agent"}})),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    check_error(&body, "already_exists");
    let (status, body) = send(
        cp.admin(Method::POST, "/api/v1/sandboxes")
            .header("content-type", "application/json")
            .body(vec![b' '; 2 << 20]),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    check_error(&body, "payload_too_large");
    let (status, _) = send(cp.admin(Method::POST, "/api/v1/sandboxes").json(
        &json!({"name": "fresh", "templateRef": {"name": "langgraph-agent", "kind": "ClusterSandboxTemplate"}}),
    ))
    .await;
    assert_eq!(status, 201);
    let (status, body) = send(cp.sb(Method::POST, "fresh", "/invoke").body("x")).await;
    assert_eq!(status, 424, "{body}");
    check_error(&body, "not_configured");
    let (status, _) = send(cp.sb(Method::POST, "fresh", "/stop")).await;
    assert_eq!(status, 200);
    let (status, body) = send(cp.sb(Method::POST, "fresh", "/invoke").body("x")).await;
    assert_eq!(status, 409, "{body}");
    check_error(&body, "sandbox_not_running");

    // A configure over the runner's limits: 413.
    let (status, body) = send(cp.sb(Method::POST, "ns-template", "/configure").json(
        &json!({"files": [{"path": "big.txt", "content": "x".repeat(70_000)}], "entrypoint": ["true"]}),
    ))
    .await;
    assert_eq!(status, 413, "{body}");
    check_error(&body, "payload_too_large");
    // Configure and invoke on a code-mode sandbox: 400 pointing at files and exec.
    let (status, _) = send(
        cp.admin(Method::POST, "/api/v1/sandboxes")
            .json(&json!({"name": "coder", "templateRef": {"name": "code"}})),
    )
    .await;
    assert_eq!(status, 201);
    for route in ["/configure", "/invoke"] {
        let (status, body) = send(
            cp.sb(Method::POST, "coder", route)
                .json(&json!({"entrypoint": ["true"]})),
        )
        .await;
        assert_eq!(status, 400, "{route}: {body}");
        check_error(&body, "wrong_mode");
        let message = string(&body, "message");
        assert!(
            message.contains("/files") && message.contains("/exec"),
            "{message}"
        );
    }

    // Delete.
    for name in ["demo-agent", "ns-template", "fresh", "coder"] {
        let (status, body) = send(cp.sb(Method::DELETE, name, "")).await;
        assert!((200..300).contains(&status), "delete {name}: {body}");
        let (status, body) = send(cp.sb(Method::GET, name, "")).await;
        assert_eq!(status, 404, "{body}");
    }
    let (_, list) = send(cp.admin(Method::GET, "/api/v1/sandboxes")).await;
    assert_eq!(list, json!({"sandboxes": []}));
}
