//! ACP agents end to end: the real runner and a test agent built on the official Python SDK
//! (`pip install agent-client-protocol`; `.ci/run` installs it), so framing, initialization
//! and capability negotiation are the SDK's, not ours.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{exit_event, parse_sse, read_until, Event, Runner};
use serde_json::{json, Value};

const AGENT: &str = include_str!("agents/acp_agent.py");

fn require_sdk() {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import acp"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "the ACP tests need the Python SDK: python3 -m pip install agent-client-protocol==0.12.1"
    );
}

async fn setup(extra: &[&str]) -> Runner {
    require_sdk();
    configured_with_session(
        Runner::start(extra),
        json!({
            "files": [{"path": "acp_agent.py", "content": AGENT}],
            "entrypoint": ["python3", "acp_agent.py"],
            "protocol": "acp",
        }),
    )
    .await
}

/// Configures `r` with `config` and creates session `a`.
async fn configured_with_session(r: Runner, config: Value) -> Runner {
    let (status, body) = r.configure_json(config).await;
    assert_eq!(status, 200, "{body}");
    let resp = r
        .post("/v1/sessions")
        .json(&json!({"id": "a"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    r
}

async fn json_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// The text of the agent's message chunks.
fn said(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.event == "agent" && e.data["name"] == "agent_message_chunk")
        .map(|e| {
            e.data["data"]["content"]["text"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

fn stop_reason(events: &[Event]) -> Value {
    events
        .iter()
        .find(|e| e.event == "agent" && e.data["name"] == "prompt_response")
        .map(|e| e.data["data"]["stopReason"].clone())
        .unwrap_or(Value::Null)
}

/// "... pid N ..." → N.
fn pid_in(text: &str) -> String {
    let words: Vec<&str> = text.split_whitespace().collect();
    let i = words.iter().position(|w| *w == "pid").unwrap();
    words[i + 1].to_owned()
}

async fn rest_of(mut resp: reqwest::Response, mut buf: Vec<u8>) -> Vec<Event> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), resp.chunk()).await {
            Ok(Ok(Some(chunk))) => buf.extend_from_slice(&chunk),
            Ok(Ok(None)) => break,
            other => panic!("stream failed: {other:?}"),
        }
    }
    parse_sse(&buf)
}

async fn turn_until(
    r: &Runner,
    prompt: &str,
    event: &str,
) -> (reqwest::Response, Vec<u8>, Vec<Event>) {
    let mut resp = r
        .post("/v1/invoke?session=a")
        .body(prompt.to_owned())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut buf = Vec::new();
    let events = read_until(&mut resp, &mut buf, |e| e.event == event).await;
    (resp, buf, events)
}

async fn answer(r: &Runner, reply: &str) {
    let resp = r
        .post("/v1/sessions/a/permissions/acp-1")
        .json(&json!({"reply": reply}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acp_prompt_permission_config_and_cancel() {
    let r = setup(&["--grace", "3s"]).await;

    // Outside a session there is no ACP agent to talk to.
    let (status, body) = json_of(r.post("/v1/invoke?prompt=x").send().await.unwrap()).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );

    // A prompt: start, the agent's updates, the prompt's answer, exit.
    let events = r.invoke_sse("?session=a&prompt=hello", "").await;
    let texts = said(&events);
    assert_eq!(texts.len(), 1, "{events:?}");
    assert!(texts[0].starts_with("echo hello turn 1 pid "), "{texts:?}");
    let pid = pid_in(&texts[0]);
    assert_eq!(stop_reason(&events), "end_turn");
    assert_eq!(events[0].event, "start");
    let exit = exit_event(&events);
    assert_eq!(
        (exit["exitCode"].as_i64(), exit["reason"].as_str()),
        (Some(0), Some("completed"))
    );

    // A permission: asked, waited for, and each reply does something different.
    let (resp, buf, events) = turn_until(&r, "write one", "permission").await;
    let ask = &events.last().unwrap().data;
    assert_eq!(ask["permissionId"], "acp-1");
    assert_eq!(ask["toolKind"], "edit");
    assert_eq!(ask["title"], "Write acp.txt");
    assert!(!r.workspace.join("acp.txt").exists());
    answer(&r, "once").await;
    let events = rest_of(resp, buf).await;
    assert_eq!(
        said(&events),
        vec![format!("wrote (allow-once) turn 2 pid {pid} mode ask")]
    );
    assert_eq!(
        std::fs::read_to_string(r.workspace.join("acp.txt")).unwrap(),
        "one\n"
    );

    let (resp, buf, _) = turn_until(&r, "write two", "permission").await;
    answer(&r, "reject").await;
    let events = rest_of(resp, buf).await;
    assert_eq!(
        said(&events),
        vec![format!("refused (reject) turn 3 pid {pid} mode ask")]
    );

    let (resp, buf, _) = turn_until(&r, "write three", "permission").await;
    answer(&r, "always").await;
    rest_of(resp, buf).await;
    // `always` for kind `edit` in this session: the runner answers the next one itself.
    let events = r.invoke_sse("?session=a", "write four").await;
    let replies: Vec<&Value> = events
        .iter()
        .filter(|e| e.event == "permission_reply")
        .map(|e| &e.data)
        .collect();
    assert_eq!(
        replies,
        vec![&json!({"permissionId": "acp-1", "reply": "always", "by": "always"})]
    );
    assert_eq!(
        said(&events),
        vec![format!("wrote (allow-always) turn 5 pid {pid} mode ask")]
    );
    assert_eq!(
        std::fs::read_to_string(r.workspace.join("acp.txt")).unwrap(),
        "one\nthree\nfour\n"
    );

    // Session config: the mode the agent advertised.
    let resp = r
        .client
        .put(r.url("/v1/sessions/a/config"))
        .bearer_auth(common::TOKEN)
        .json(&json!({"mode": "yolo"}))
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(resp).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["acp"]["mode"], "yolo", "the fresh state: {body}");
    let events = r.invoke_sse("?session=a&prompt=hi", "").await;
    assert_eq!(
        said(&events),
        vec![format!("echo hi turn 6 pid {pid} mode yolo")]
    );

    // Cancel: session/cancel, the agent ends the turn itself, the process stays.
    let (resp, buf, events) = turn_until(&r, "wait", "agent").await;
    let id = events[0].data["invokeId"].as_str().unwrap().to_owned();
    let cancel = r
        .post(&format!("/v1/invokes/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 202);
    let started = std::time::Instant::now();
    let events = rest_of(resp, buf).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the agent ended the turn"
    );
    assert_eq!(stop_reason(&events), "cancelled");
    assert_eq!(exit_event(&events)["reason"], "canceled");
    let events = r.invoke_sse("?session=a&prompt=again", "").await;
    assert_eq!(
        said(&events),
        vec![format!("echo again turn 8 pid {pid} mode yolo")]
    );

    // Everything is in the session's history.
    let (_, page) = json_of(
        r.get("/v1/sessions/a/events?limit=1000")
            .send()
            .await
            .unwrap(),
    )
    .await;
    let kinds: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.iter().filter(|k| **k == "prompt").count(), 8);
    assert_eq!(kinds.iter().filter(|k| **k == "exit").count(), 8);
    assert_eq!(kinds.iter().filter(|k| **k == "permission").count(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acp_agent_that_ignores_cancel_is_killed_after_the_grace() {
    let r = setup(&["--grace", "500ms"]).await;
    let events = r.invoke_sse("?session=a&prompt=hello", "").await;
    let first = pid_in(&said(&events)[0]);
    let (resp, buf, events) = turn_until(&r, "stuck", "agent").await;
    let id = events[0].data["invokeId"].as_str().unwrap().to_owned();
    let cancel = r
        .post(&format!("/v1/invokes/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 202);
    let events = rest_of(resp, buf).await;
    let exit = exit_event(&events);
    assert_eq!(
        (exit["exitCode"].as_i64(), exit["reason"].as_str()),
        (Some(137), Some("canceled"))
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{first}/stat")).exists()
            || std::fs::read_to_string(format!("/proc/{first}/stat"))
                .unwrap()
                .contains(") Z")
    );
    // The next turn starts a new agent process.
    let events = r.invoke_sse("?session=a&prompt=hello", "").await;
    let texts = said(&events);
    assert!(texts[0].starts_with("echo hello turn 1 pid "), "{texts:?}");
    assert_ne!(pid_in(&texts[0]), first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_dies_at_start_is_an_error_not_a_hang() {
    let r = Runner::start(&[]);
    let resp = r
        .post("/v1/sessions")
        .json(&json!({"id": "a"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    // Session config needs an ACP agent.
    r.configure_sh("echo plain").await;
    let resp = r
        .client
        .put(r.url("/v1/sessions/a/config"))
        .bearer_auth(common::TOKEN)
        .json(&json!({"mode": "x"}))
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(resp).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );

    let (status, body) = r
        .configure_json(
            json!({"entrypoint": ["sh", "-c", "echo not an agent >&2; exit 3"], "protocol": "acp"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let started = std::time::Instant::now();
    let events = r.invoke_sse("?session=a&prompt=hi", "").await;
    assert!(started.elapsed() < Duration::from_secs(10));
    let error = events.iter().find(|e| e.event == "error").unwrap();
    assert_eq!(error.data["phase"], "acp");
    assert!(
        error.data["message"]
            .as_str()
            .unwrap()
            .contains("initialize"),
        "{error:?}"
    );
    assert_eq!(exit_event(&events)["exitCode"], 1);
    // The session is free again.
    let (status, info) = json_of(r.get("/v1/sessions/a").send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert!(info.get("runningInvokeId").is_none(), "{info}");

    // Session config with an agent that fails to start, or does not exist, is the
    // configuration's fault: 424 `agent_failed`, not a 500 (found by schemathesis).
    for entrypoint in [
        json!(["sh", "-c", "exit 3"]),
        json!(["no-such-agent-binary"]),
    ] {
        let (status, body) = r
            .configure_json(json!({"entrypoint": entrypoint, "protocol": "acp"}))
            .await;
        assert_eq!(status, 200, "{body}");
        let resp = r
            .client
            .put(r.url("/v1/sessions/a/config"))
            .bearer_auth(common::TOKEN)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        let (status, body) = json_of(resp).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (424, Some("agent_failed")),
            "{entrypoint}: {body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acp_bytes_that_are_not_utf8_do_not_stop_the_reader() {
    let r = setup(&[]).await;
    let events = tokio::time::timeout(
        Duration::from_secs(30),
        r.invoke_sse("?session=a&prompt=garbage", ""),
    )
    .await
    .expect("the turn ends");
    let error = events
        .iter()
        .find(|e| e.event == "protocol_error")
        .unwrap_or_else(|| panic!("{events:?}"));
    assert_eq!(error.data["message"], "ACP: not UTF-8");
    assert_eq!(error.data["line"], "\u{fffd}\u{fffd} not UTF-8");
    // stderr is passed on byte for byte (not UTF-8: base64).
    assert!(
        events.iter().any(|e| e.event == "log"
            && e.data["stream"] == "stderr"
            && e.data["dataBase64"] == "YmFkIP8gc3RkZXJy"),
        "{events:?}"
    );
    let texts = said(&events);
    assert_eq!(texts.len(), 1, "{events:?}");
    assert!(texts[0].starts_with("after garbage turn 1 "), "{texts:?}");
    assert_eq!(exit_event(&events)["exitCode"], 0);
    // The reader goes on: the next turn of the same agent works.
    let events = tokio::time::timeout(
        Duration::from_secs(30),
        r.invoke_sse("?session=a&prompt=hello", ""),
    )
    .await
    .expect("the turn ends");
    assert!(said(&events)[0].starts_with("echo hello turn 2 "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acp_once_never_selects_allow_always() {
    let r = setup(&[]).await;
    // The agent offers allow_always and reject_once only: `once` cannot be granted.
    let (resp, buf, events) = turn_until(&r, "write! x", "permission").await;
    assert_eq!(events.last().unwrap().data["permissionId"], "acp-1");
    answer(&r, "once").await;
    let events = rest_of(resp, buf).await;
    let texts = said(&events);
    assert_eq!(texts.len(), 1, "{events:?}");
    assert!(
        texts[0].starts_with("refused (cancelled) turn 1 "),
        "{texts:?}"
    );
    assert!(!r.workspace.join("acp.txt").exists());
    // `always` may take allow_always.
    let (resp, buf, _) = turn_until(&r, "write! y", "permission").await;
    answer(&r, "always").await;
    let events = rest_of(resp, buf).await;
    assert!(said(&events)[0].starts_with("wrote (allow-always) turn 2 "));
}

/// A runner with session `a` and an ACP entrypoint that is a shell script (no SDK needed).
async fn setup_sh(script: &str) -> Runner {
    configured_with_session(
        Runner::start(&[]),
        json!({"entrypoint": ["sh", "-c", script], "protocol": "acp"}),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timeout_ends_a_turn_whose_agent_is_still_starting() {
    // Never answers `initialize` (the runner would wait 30 s for it).
    let r = setup_sh("exec sleep 60").await;
    let started = std::time::Instant::now();
    let events = tokio::time::timeout(
        Duration::from_secs(20),
        r.invoke_sse("?session=a&prompt=hi&timeout=1s", ""),
    )
    .await
    .expect("the turn ends");
    assert!(started.elapsed() < Duration::from_secs(10), "{events:?}");
    assert_eq!(exit_event(&events)["reason"], "timeout", "{events:?}");
    // The session is free again.
    let (status, info) = json_of(r.get("/v1/sessions/a").send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert!(info.get("runningInvokeId").is_none(), "{info}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsupported_protocol_version_fails_the_start() {
    let r = setup_sh(
        r#"read line; echo '{"jsonrpc":"2.0","id":1,"result":{"protocolVersion":99}}'; exec sleep 60"#,
    )
    .await;
    let started = std::time::Instant::now();
    let events = tokio::time::timeout(
        Duration::from_secs(20),
        r.invoke_sse("?session=a&prompt=hi", ""),
    )
    .await
    .expect("the turn ends");
    assert!(started.elapsed() < Duration::from_secs(10), "{events:?}");
    let error = events.iter().find(|e| e.event == "error").unwrap();
    assert_eq!(error.data["phase"], "acp");
    let message = error.data["message"].as_str().unwrap();
    assert!(message.contains("protocolVersion 99"), "{message}");
    assert_eq!(exit_event(&events)["exitCode"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_over_16_mib_is_413() {
    let r = setup_sh("exec sleep 60").await;
    let resp = r
        .post("/v1/invoke?session=a")
        .body(vec![b'a'; (16 << 20) + 1])
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(resp).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (413, Some("payload_too_large")),
        "{body}"
    );
    // The session is free again.
    let (_, info) = json_of(r.get("/v1/sessions/a").send().await.unwrap()).await;
    assert!(info.get("runningInvokeId").is_none(), "{info}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configure_that_changes_only_files_restarts_the_agent() {
    let r = setup(&[]).await;
    let events = r.invoke_sse("?session=a&prompt=hi", "").await;
    let texts = said(&events);
    assert!(texts[0].starts_with("echo hi turn 1 pid "), "{texts:?}");
    let first = pid_in(&texts[0]);
    // New agent code: same argv, env and cwd, other files (so another install hash).
    let (status, body) = r
        .configure_json(json!({
            "files": [{"path": "acp_agent.py", "content": AGENT.replace("f\"echo {text}", "f\"new {text}")}],
            "entrypoint": ["python3", "acp_agent.py"],
            "protocol": "acp",
        }))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["skipped"], false, "{body}");
    let events = r.invoke_sse("?session=a&prompt=hi", "").await;
    let texts = said(&events);
    assert_eq!(texts.len(), 1, "{events:?}");
    assert!(texts[0].starts_with("new hi turn 1 pid "), "{texts:?}");
    assert_ne!(pid_in(&texts[0]), first);
    // The old process is gone (killed when the new one started; the signal may take a moment).
    let mut stat = String::new();
    for _ in 0..100 {
        stat = std::fs::read_to_string(format!("/proc/{first}/stat")).unwrap_or_default();
        if stat.is_empty() || stat.contains(") Z") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(stat.is_empty() || stat.contains(") Z"), "{stat}");
}

async fn answer_with(r: &Runner, body: Value) -> (u16, Value) {
    json_of(
        r.post("/v1/sessions/a/permissions/acp-1")
            .json(&body)
            .send()
            .await
            .unwrap(),
    )
    .await
}

fn of_kind<'a>(events: &'a [Event], kind: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e.event == kind)
        .map(|e| &e.data)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acp_permissions_offer_the_agents_options_and_remember_reject_always() {
    let r = setup(&["--grace", "3s"]).await;
    // The event carries the agent's own options; a reply may name one.
    let (resp, buf, events) = turn_until(&r, "write one", "permission").await;
    let ask = events.last().unwrap().data.clone();
    assert_eq!(
        ask["options"],
        json!([
            {"optionId": "allow-once", "name": "Allow", "kind": "allow_once"},
            {"optionId": "allow-always", "name": "Always allow", "kind": "allow_always"},
            {"optionId": "reject", "name": "Reject", "kind": "reject_once"},
            {"optionId": "reject-always", "name": "Never", "kind": "reject_always"},
        ])
    );
    assert!(ask.get("autoReply").is_none());
    let (status, body) = answer_with(&r, json!({"optionId": "nope"})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request")),
        "{body}"
    );
    let (status, body) = answer_with(&r, json!({"reply": "once", "optionId": "allow-once"})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request")),
        "{body}"
    );
    let (status, body) = answer_with(&r, json!({"optionId": "allow-once"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["reply"].as_str(), body["optionId"].as_str()),
        (Some("once"), Some("allow-once"))
    );
    let events = rest_of(resp, buf).await;
    assert!(
        said(&events)[0].starts_with("wrote (allow-once) turn 1 "),
        "{events:?}"
    );
    assert_eq!(
        of_kind(&events, "permission_reply"),
        vec![
            &json!({"permissionId": "acp-1", "reply": "once", "optionId": "allow-once", "by": "client"})
        ]
    );

    // reject_always selects the agent's reject_always option and is remembered for `edit`.
    let (resp, buf, _) = turn_until(&r, "write two", "permission").await;
    let (status, body) = answer_with(&r, json!({"reply": "reject_always"})).await;
    assert_eq!(status, 200, "{body}");
    let events = rest_of(resp, buf).await;
    assert!(
        said(&events)[0].starts_with("refused (reject-always) turn 2 "),
        "{events:?}"
    );
    let (_, info) = json_of(r.get("/v1/sessions/a").send().await.unwrap()).await;
    assert_eq!(info["alwaysRejected"], json!(["edit"]), "{info}");
    // The next request of that kind is refused by the runner: one `permission` event that says
    // so (no request waits for a client), then its `permission_reply`.
    let events = r.invoke_sse("?session=a", "write three").await;
    let asks = of_kind(&events, "permission");
    assert_eq!(asks.len(), 1, "{events:?}");
    assert_eq!(
        asks[0]["autoReply"],
        json!({"reply": "reject_always", "by": "always"})
    );
    assert_eq!(
        of_kind(&events, "permission_reply"),
        vec![&json!({"permissionId": "acp-1", "reply": "reject_always", "by": "always"})]
    );
    assert!(
        said(&events)[0].starts_with("refused (reject-always) turn 3 "),
        "{events:?}"
    );
    assert_eq!(
        std::fs::read_to_string(r.workspace.join("acp.txt")).unwrap(),
        "one\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acp_cancel_answers_a_pending_permission_cancelled() {
    let r = setup(&["--grace", "3s"]).await;
    let (resp, buf, events) = turn_until(&r, "write one", "permission").await;
    let id = events[0].data["invokeId"].as_str().unwrap().to_owned();
    let cancel = r
        .post(&format!("/v1/invokes/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 202);
    let events = rest_of(resp, buf).await;
    assert_eq!(
        of_kind(&events, "permission_reply"),
        vec![&json!({"permissionId": "acp-1", "reply": "cancelled", "by": "cancel"})]
    );
    assert!(
        said(&events)[0].starts_with("refused (cancelled) turn 1 "),
        "{events:?}"
    );
    assert_eq!(exit_event(&events)["reason"], "canceled");
    assert!(!r.workspace.join("acp.txt").exists());
    // In the history too, sent by the runner.
    let (_, page) = json_of(
        r.get("/v1/sessions/a/events?limit=1000")
            .send()
            .await
            .unwrap(),
    )
    .await;
    let reply = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "permission_reply")
        .unwrap();
    assert_eq!(reply["sender"], "runner");
}

async fn put_config(r: &Runner, body: Value) -> (u16, Value) {
    json_of(
        r.client
            .put(r.url("/v1/sessions/a/config"))
            .bearer_auth(common::TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acp_session_state_stays_current_and_updates_between_turns_go_out_live() {
    let r = setup(&[]).await;
    let (_, info) = json_of(r.get("/v1/sessions/a").send().await.unwrap()).await;
    assert!(info.get("acp").is_none(), "{info}");
    let events = r.invoke_sse("?session=a&prompt=hi", "").await;
    assert_eq!(exit_event(&events)["exitCode"], 0);
    let (_, info) = json_of(r.get("/v1/sessions/a").send().await.unwrap()).await;
    let acp = &info["acp"];
    assert_eq!(acp["sessionId"].as_str().unwrap().len(), 32, "{info}");
    assert_eq!(
        (
            acp["mode"].as_str(),
            acp["model"].as_str(),
            acp["thoughtLevel"].as_str()
        ),
        (Some("ask"), Some("small"), Some("low")),
        "{info}"
    );
    assert_eq!(acp["modes"]["availableModes"].as_array().unwrap().len(), 2);
    assert_eq!(acp["configOptions"].as_array().unwrap().len(), 2);

    // Follow the session's history live from here.
    let count = info["eventCount"].as_u64().unwrap();
    let mut follow = r
        .get("/v1/sessions/a/events")
        .header("accept", "text/event-stream")
        .header("last-event-id", count.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(follow.status(), 200);

    // PUT answers the fresh state.
    let (status, body) = put_config(&r, json!({"mode": "yolo"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["acp"]["mode"], "yolo", "{body}");
    assert_eq!(body["acp"]["modes"]["currentModeId"], "yolo", "{body}");
    // The agent's update between turns reaches the live stream.
    let mut buf = Vec::new();
    let events = read_until(&mut follow, &mut buf, |e| {
        e.event == "agent" && e.data["data"]["name"] == "current_mode_update"
    })
    .await;
    let update = events.last().unwrap();
    assert_eq!(update.data["data"]["data"]["currentModeId"], "yolo");
    assert_eq!(update.data["sender"], "agent");

    let (status, body) = put_config(&r, json!({"model": "large", "thoughtLevel": "high"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (
            body["acp"]["model"].as_str(),
            body["acp"]["thoughtLevel"].as_str()
        ),
        (Some("large"), Some("high")),
        "{body}"
    );
    // A value the agent refuses is a 400 with its reason.
    let (status, body) = put_config(&r, json!({"options": {"nope": "x"}})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request")),
        "{body}"
    );
    let events = r.invoke_sse("?session=a&prompt=state", "").await;
    assert!(
        said(&events)[0].starts_with("state model large thought high turn 2 "),
        "{events:?}"
    );
    let (_, info) = json_of(r.get("/v1/sessions/a").send().await.unwrap()).await;
    assert_eq!(info["acp"]["model"], "large");
    assert_eq!(info["acp"]["mode"], "yolo");

    // An agent that dies mid-turn: its own exit code, and the next turn starts a new one.
    let events = r.invoke_sse("?session=a&prompt=crash", "").await;
    let exit = exit_event(&events);
    assert_eq!(exit["exitCode"], 7, "{events:?}");
    let error = events.iter().find(|e| e.event == "error").unwrap();
    assert!(
        error.data["message"]
            .as_str()
            .unwrap()
            .contains("exited with code 7"),
        "{error:?}"
    );
}

/// A runner whose session `a` runs the SDK agent with `env` (e.g. `ACP_TEST_PLAIN`).
async fn setup_env(extra: &[&str], env: Value) -> Runner {
    require_sdk();
    configured_with_session(
        Runner::start(extra),
        json!({
            "files": [{"path": "acp_agent.py", "content": AGENT}],
            "entrypoint": ["python3", "acp_agent.py"],
            "protocol": "acp",
            "env": env,
        }),
    )
    .await
}

async fn prompt_blocks(r: &Runner, blocks: Value) -> reqwest::Response {
    r.post("/v1/invoke?session=a")
        .json(&json!({"prompt": blocks}))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acp_prompts_of_content_blocks_reach_the_agent_when_it_accepts_them() {
    let r = setup(&[]).await;
    let blocks = json!([
        {"type": "text", "text": "look"},
        {"type": "image", "mimeType": "image/png", "data": "iVBORw0KGgo="},
        {"type": "resource", "resource": {"uri": "file:///workspace/a.txt", "text": "hello file", "mimeType": "text/plain"}},
        {"type": "resource_link", "uri": "file:///workspace/b.txt", "name": "b.txt"},
    ]);
    let resp = prompt_blocks(&r, blocks.clone()).await;
    assert_eq!(resp.status(), 200);
    let events = parse_sse(&resp.bytes().await.unwrap());
    let texts = said(&events);
    assert!(
        texts[0].starts_with(
            "got text:look; image:image/png:iVBORw0KGgo=; resource:file:///workspace/a.txt:hello file; \
             resource_link:file:///workspace/b.txt turn 1 "
        ),
        "{texts:?}"
    );
    // The history has the blocks as sent.
    let (_, page) = json_of(
        r.get("/v1/sessions/a/events?limit=1000")
            .send()
            .await
            .unwrap(),
    )
    .await;
    let prompt = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "prompt")
        .unwrap();
    assert_eq!(prompt["data"]["content"], blocks);
    assert_eq!(prompt["data"]["text"], "look");
    // Malformed blocks are a 400, and the session is free again.
    for bad in [
        json!([]),
        json!([{"type": "video"}]),
        json!([{"type": "image", "data": "x"}]),
    ] {
        let (status, body) = json_of(prompt_blocks(&r, bad.clone()).await).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_request")),
            "{bad}: {body}"
        );
    }
    // A plain-text JSON body without "prompt" is still a text prompt.
    let events = r.invoke_sse("?session=a", "{\"x\": 1}").await;
    assert!(
        said(&events)[0].starts_with("echo {\"x\": 1} turn 2 "),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acp_blocks_the_agent_did_not_advertise_are_400() {
    let r = setup_env(&[], json!({"ACP_TEST_PLAIN": "1"})).await;
    for blocks in [
        json!([{"type": "image", "mimeType": "image/png", "data": "AAAA"}]),
        json!([{"type": "resource", "resource": {"uri": "file:///x", "text": "x"}}]),
    ] {
        let (status, body) = json_of(prompt_blocks(&r, blocks.clone()).await).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_request")),
            "{blocks}: {body}"
        );
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("promptCapabilities"),
            "{body}"
        );
    }
    // Text and resource links need no capability.
    let resp = prompt_blocks(
        &r,
        json!([{"type": "text", "text": "see"}, {"type": "resource_link", "uri": "file:///x", "name": "x"}]),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let events = parse_sse(&resp.bytes().await.unwrap());
    assert!(
        said(&events)[0].starts_with("got text:see; resource_link:file:///x turn 1 "),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acp_session_load_after_a_runner_restart_keeps_the_agents_memory() {
    let mut r = setup(&[]).await;
    let events = r.invoke_sse("?session=a&prompt=first", "").await;
    assert!(
        said(&events)[0].starts_with("echo first turn 1 "),
        "{events:?}"
    );
    let events = r.invoke_sse("?session=a&prompt=second", "").await;
    let first_pid = pid_in(&said(&events)[0]);
    let (_, info) = json_of(r.get("/v1/sessions/a").send().await.unwrap()).await;
    let acp_session = info["acp"]["sessionId"].as_str().unwrap().to_owned();

    // The runner is killed (its agent with it, or orphaned: a new runner starts a new one).
    r.kill9();
    let _ = nix_kill(&first_pid);
    let r2 = Runner::start_in(&r.dir, &[]);
    let events = r2.invoke_sse("?session=a&prompt=recall", "").await;
    let texts = said(&events);
    assert_eq!(
        texts.len(),
        1,
        "the replay of session/load is not a new event: {events:?}"
    );
    assert!(
        texts[0].starts_with("recall first|second turn 1 pid "),
        "{texts:?}"
    );
    assert_ne!(pid_in(&texts[0]), first_pid);
    let (_, info) = json_of(r2.get("/v1/sessions/a").send().await.unwrap()).await;
    assert_eq!(info["acp"]["sessionId"], acp_session.as_str());
    // The history says how the session continued.
    let (_, page) = json_of(
        r2.get("/v1/sessions/a/events?limit=1000")
            .send()
            .await
            .unwrap(),
    )
    .await;
    let opened: Vec<&Value> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "agent" && e["data"]["name"] == "acp_session")
        .map(|e| &e["data"]["data"]["continuity"])
        .collect();
    assert_eq!(opened, vec![&json!("new"), &json!("loaded")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acp_without_load_session_a_new_agent_starts_a_new_session_and_says_why() {
    let r = setup_env(&[], json!({"ACP_TEST_PLAIN": "1"})).await;
    let events = r.invoke_sse("?session=a&prompt=first", "").await;
    assert!(
        said(&events)[0].starts_with("echo first turn 1 "),
        "{events:?}"
    );
    let events = r.invoke_sse("?session=a&prompt=crash", "").await;
    assert_eq!(exit_event(&events)["exitCode"], 7);
    let events = r.invoke_sse("?session=a&prompt=recall", "").await;
    // A new ACP session: the agent remembers nothing of it.
    assert!(
        said(&events)[0].starts_with("recall  turn 1 "),
        "{events:?}"
    );
    let (_, page) = json_of(
        r.get("/v1/sessions/a/events?limit=1000")
            .send()
            .await
            .unwrap(),
    )
    .await;
    let last = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .rfind(|e| e["type"] == "agent" && e["data"]["name"] == "acp_session")
        .unwrap();
    assert_eq!(last["data"]["data"]["continuity"], "new");
    assert!(
        last["data"]["data"]["reason"]
            .as_str()
            .unwrap()
            .contains("loadSession"),
        "{last}"
    );
}

fn nix_kill(pid: &str) -> std::io::Result<std::process::ExitStatus> {
    std::process::Command::new("kill")
        .args(["-9", pid])
        .status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acp_mcp_servers_reach_session_new() {
    require_sdk();
    let r = Runner::start(&[]);
    let (status, body) = r
        .configure_json(json!({
            "files": [{"path": "acp_agent.py", "content": AGENT}],
            "entrypoint": ["python3", "acp_agent.py"],
            "protocol": "acp",
            "mcpServers": [{"name": "files", "command": "/usr/bin/mcp-files", "args": ["--root", "/workspace"], "env": [{"name": "TOKEN", "value": "s3cret"}]}],
        }))
        .await;
    assert_eq!(status, 200, "{body}");
    // Bad entries are refused before anything is written.
    let (status, body) = r
        .configure_json(json!({"mcpServers": [{"name": "x", "type": "http"}]}))
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request")),
        "{body}"
    );
    let (status, body) = json_of(
        r.post("/v1/sessions")
            .json(&json!({"id": "a", "mcpServers": [{"type": "http", "name": "search", "url": "http://127.0.0.1:9/mcp", "headers": []}]}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = json_of(
        r.post("/v1/sessions")
            .json(&json!({"id": "b", "mcpServers": [{"command": "x"}]}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request")),
        "{body}"
    );
    let events = r.invoke_sse("?session=a&prompt=mcp", "").await;
    assert!(
        said(&events)[0]
            .starts_with("mcp files:/usr/bin/mcp-files,search:http://127.0.0.1:9/mcp turn 1 "),
        "{events:?}"
    );
    // The servers' env (secrets) is not in the history.
    let history = std::fs::read_to_string(r.workspace.join(".agentbox/sessions/a/events")).unwrap();
    assert!(!history.contains("s3cret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_in_one_sandbox_serve_two_sessions_at_once() {
    require_sdk();
    let r = Runner::start(&[]);
    let agent = |name: &str| json!({"entrypoint": ["python3", "acp_agent.py"], "protocol": "acp", "env": {"AGENT_NAME": name}});
    let (status, body) = r
        .configure_json(json!({
            "files": [{"path": "acp_agent.py", "content": AGENT}],
            "agents": {"claude": agent("claude"), "codex": agent("codex")},
            "defaultAgent": "claude",
        }))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["agents"], json!(["claude", "codex"]));
    assert_eq!(body["defaultAgent"], "claude");
    assert_eq!(body["entrypoint"], json!(["python3", "acp_agent.py"]));
    let info = r.get_json("/v1/info").await;
    assert_eq!(info["configured"], true, "{info}");
    assert_eq!(
        info["entrypoint"],
        json!(["python3", "acp_agent.py"]),
        "{info}"
    );
    // A default that is not an agent, or several agents and no default, is refused.
    for bad in [
        json!({"agents": {"x": agent("x")}, "defaultAgent": "y"}),
        json!({"agents": {"x": agent("x"), "y": agent("y")}}),
        json!({"agents": {"../x": agent("x")}}),
        json!({"agents": {"x": {"entrypoint": []}}}),
    ] {
        let (status, body) = r.configure_json(bad.clone()).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_request")),
            "{bad}: {body}"
        );
    }
    let (status, agents) = json_of(r.get("/v1/agents").send().await.unwrap()).await;
    assert_eq!(status, 200);
    let names: Vec<(&str, bool)> = agents["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["name"].as_str().unwrap(), a["default"].as_bool().unwrap()))
        .collect();
    assert_eq!(names, vec![("claude", true), ("codex", false)]);
    assert!(agents["items"][0].get("capabilities").is_none());

    for (id, agent) in [("c1", Some("codex")), ("d1", None)] {
        let mut body = json!({"id": id});
        if let Some(agent) = agent {
            body["agent"] = json!(agent);
        }
        let (status, info) =
            json_of(r.post("/v1/sessions").json(&body).send().await.unwrap()).await;
        assert_eq!(status, 201, "{info}");
    }
    let (status, body) = json_of(
        r.post("/v1/sessions")
            .json(&json!({"id": "z", "agent": "gemini"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request")),
        "{body}"
    );
    let (_, info) = json_of(r.get("/v1/sessions/c1").send().await.unwrap()).await;
    assert_eq!(info["agent"], "codex");

    // Both at once: each session's turn waits in its own agent.
    let mut turns = Vec::new();
    for id in ["c1", "d1"] {
        let mut resp = r
            .post(&format!("/v1/invoke?session={id}"))
            .body("wait")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut buf = Vec::new();
        let events = read_until(&mut resp, &mut buf, |e| e.event == "agent").await;
        turns.push((resp, buf, events));
    }
    let mut texts = Vec::new();
    for (resp, buf, events) in turns {
        let id = events[0].data["invokeId"].as_str().unwrap().to_owned();
        let cancel = r
            .post(&format!("/v1/invokes/{id}/cancel"))
            .send()
            .await
            .unwrap();
        assert_eq!(cancel.status(), 202);
        texts.push(said(&rest_of(resp, buf).await)[0].clone());
    }
    assert!(texts[0].starts_with("[codex] waiting turn 1 "), "{texts:?}");
    assert!(
        texts[1].starts_with("[claude] waiting turn 1 "),
        "{texts:?}"
    );
    assert_ne!(pid_in(&texts[0]), pid_in(&texts[1]));
    // Capabilities are known once the agents have started.
    let (_, agents) = json_of(r.get("/v1/agents").send().await.unwrap()).await;
    for agent in agents["items"].as_array().unwrap() {
        assert_eq!(agent["capabilities"]["loadSession"], true, "{agent}");
    }

    // Another default agent: the session that named none moves to it, with a new ACP session
    // (one agent cannot load another's), and says so.
    let (status, body) = r.configure_json(json!({"defaultAgent": "codex"})).await;
    assert_eq!(
        (status, body["defaultAgent"].as_str()),
        (200, Some("codex")),
        "{body}"
    );
    let events = r.invoke_sse("?session=d1&prompt=recall", "").await;
    assert!(
        said(&events)[0].starts_with("[codex] recall  turn 1 "),
        "{events:?}"
    );
    let (_, page) = json_of(
        r.get("/v1/sessions/d1/events?limit=1000")
            .send()
            .await
            .unwrap(),
    )
    .await;
    let last = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .rfind(|e| e["type"] == "agent" && e["data"]["name"] == "acp_session")
        .unwrap();
    assert_eq!(last["data"]["data"]["agent"], "codex");
    assert_eq!(last["data"]["data"]["continuity"], "new");
    assert!(
        last["data"]["data"]["reason"]
            .as_str()
            .unwrap()
            .contains("claude"),
        "{last}"
    );
    // Removing the session's agent makes its invokes fail with 424 until it is back.
    let (status, body) = r
        .configure_json(json!({"agents": {"claude": agent("claude")}}))
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = json_of(
        r.post("/v1/invoke?session=c1")
            .body("hi")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (424, Some("agent_failed")),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_cwd_is_the_acp_sessions_cwd() {
    require_sdk();
    let r = Runner::start(&[]);
    let (status, body) = r
        .configure_json(json!({
            "files": [{"path": "acp_agent.py", "content": AGENT}, {"path": "sub/keep.txt", "content": ""}],
            "entrypoint": ["python3", "acp_agent.py"],
            "protocol": "acp",
        }))
        .await;
    assert_eq!(status, 200, "{body}");
    for (cwd, code) in [
        ("../x", "invalid_path"),
        ("acp_agent.py", "not_a_directory"),
    ] {
        let (status, body) = json_of(
            r.post("/v1/sessions")
                .json(&json!({"id": "w", "cwd": cwd}))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some(code)),
            "{cwd}: {body}"
        );
    }
    let (status, info) = json_of(
        r.post("/v1/sessions")
            .json(&json!({"id": "a", "cwd": "/workspace/sub"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, info["cwd"].as_str()),
        (201, Some("/workspace/sub")),
        "{info}"
    );
    let (resp, buf, _) = turn_until(&r, "write here", "permission").await;
    answer(&r, "once").await;
    let events = rest_of(resp, buf).await;
    assert!(
        said(&events)[0].starts_with("wrote (allow-once) turn 1 "),
        "{events:?}"
    );
    assert_eq!(
        std::fs::read_to_string(r.workspace.join("sub/acp.txt")).unwrap(),
        "here\n"
    );
    assert!(!r.workspace.join("acp.txt").exists());
}
