//! Sessions, the agent channel and permissions, end to end against the real binary with a real
//! Python agent (`tests/agents/permission_agent.py`, the README's example).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{exit_event, parse_sse, read_until, Event, Runner};
use serde_json::{json, Value};

const AGENT: &str = include_str!("agents/permission_agent.py");

async fn configure_agent(r: &Runner) {
    let (status, body) = r
        .configure_json(json!({
            "files": [{"path": "agent.py", "content": AGENT}],
            "entrypoint": ["python3", "agent.py"],
        }))
        .await;
    assert_eq!(status, 200, "{body}");
}

async fn json_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:?}"))
    };
    (status, body)
}

async fn post_session(r: &Runner, body: &Value) -> (u16, Value) {
    json_of(r.post("/v1/sessions").json(body).send().await.unwrap()).await
}

async fn create_session(r: &Runner, id: &str) -> Value {
    let (status, body) = post_session(r, &json!({"id": id, "metadata": {"owner": "test"}})).await;
    assert_eq!(status, 201, "{body}");
    body
}

/// Starts an invoke (SSE) and reads until its first `permission` event.
async fn start_until_permission(
    r: &Runner,
    query: &str,
    prompt: &str,
) -> (reqwest::Response, Vec<u8>, Vec<Event>) {
    let mut resp = r
        .post(&format!("/v1/invoke{query}"))
        .body(prompt.to_owned())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut buf = Vec::new();
    let events = read_until(&mut resp, &mut buf, |e| e.event == "permission").await;
    (resp, buf, events)
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

fn stdout_of(events: &[Event]) -> String {
    events
        .iter()
        .filter(|e| e.event == "log" && e.data["stream"] == "stdout")
        .map(|e| format!("{}\n", e.data["data"].as_str().unwrap()))
        .collect()
}

fn invoke_id(events: &[Event]) -> String {
    events[0].data["invokeId"].as_str().unwrap().to_owned()
}

async fn reply(r: &Runner, path: &str, reply: &str) -> (u16, Value) {
    json_of(
        r.post(path)
            .json(&json!({"reply": reply}))
            .send()
            .await
            .unwrap(),
    )
    .await
}

/// Every event of a session's history, paged `limit` at a time.
async fn history(r: &Runner, id: &str, limit: u64) -> Vec<Value> {
    let mut all = Vec::new();
    let mut offset = 0;
    loop {
        let (status, page) = json_of(
            r.get(&format!(
                "/v1/sessions/{id}/events?offset={offset}&limit={limit}"
            ))
            .send()
            .await
            .unwrap(),
        )
        .await;
        assert_eq!(status, 200, "{page}");
        let items = page["items"].as_array().unwrap();
        assert!(items.len() as u64 <= limit);
        all.extend(items.iter().cloned());
        offset = page["nextOffset"].as_u64().unwrap();
        if !page["hasMore"].as_bool().unwrap() {
            return all;
        }
        assert_eq!(
            items.len() as u64,
            limit,
            "a page short of the limit says hasMore"
        );
    }
}

#[tokio::test]
async fn session_crud_ids_and_paging() {
    let r = Runner::start(&[]);
    let created = create_session(&r, "alpha").await;
    assert_eq!(created["id"], "alpha");
    assert_eq!(created["metadata"]["owner"], "test");
    assert_eq!(created["eventCount"], 0);
    assert!(created["createdAt"].as_u64().unwrap() > 0);

    let (status, body) = post_session(&r, &json!({"id": "alpha"})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("session_exists"))
    );

    for bad in ["a/b", "../x", ".hidden", "", "sp ace"] {
        let (status, body) = post_session(&r, &json!({"id": bad})).await;
        assert_eq!(status, 400, "{bad:?}: {body}");
        assert_eq!(body["error"], "invalid_session_id");
    }
    let (status, body) = json_of(r.get("/v1/sessions/bad%20id%21").send().await.unwrap()).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_session_id"))
    );
    let (status, body) = json_of(r.get("/v1/sessions/nope").send().await.unwrap()).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("session_not_found"))
    );
    r.configure_sh("true").await;
    let (status, body) = json_of(r.post("/v1/invoke?session=nope").send().await.unwrap()).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("session_not_found"))
    );
    let (status, body) = json_of(r.post("/v1/invoke?session=..").send().await.unwrap()).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_session_id"))
    );

    // A generated id.
    let (status, generated) = post_session(&r, &json!({})).await;
    assert_eq!(status, 201);
    assert!(generated["id"].as_str().unwrap().starts_with("ses-"));
    create_session(&r, "gamma").await;

    let (_, page1) = json_of(r.get("/v1/sessions?limit=2").send().await.unwrap()).await;
    let (_, page2) = json_of(r.get("/v1/sessions?offset=2&limit=2").send().await.unwrap()).await;
    let listed: Vec<&Value> = page1["items"]
        .as_array()
        .unwrap()
        .iter()
        .chain(page2["items"].as_array().unwrap())
        .collect();
    let ids: Vec<&str> = listed.iter().map(|s| s["id"].as_str().unwrap()).collect();
    // Oldest first; sessions created within the same millisecond by id.
    let mut expected = listed.clone();
    expected.sort_by_key(|s| (s["createdAt"].as_u64().unwrap(), s["id"].as_str().unwrap()));
    let expected: Vec<&str> = expected.iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids, expected);
    let mut all = ids.clone();
    all.sort_unstable();
    let mut created = vec!["alpha", generated["id"].as_str().unwrap(), "gamma"];
    created.sort_unstable();
    assert_eq!(all, created);
    assert_eq!(page1["nextOffset"], 2);
    assert!(page2.get("nextOffset").is_none(), "{page2}");
    let (status, _) = json_of(r.get("/v1/sessions?limit=0").send().await.unwrap()).await;
    assert_eq!(status, 400);

    let resp = r
        .client
        .delete(r.url("/v1/sessions/alpha"))
        .bearer_auth(common::TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let (status, _) = json_of(r.get("/v1/sessions/alpha").send().await.unwrap()).await;
    assert_eq!(status, 404);
    assert!(!r.workspace.join(".agentbox/sessions/alpha").exists());
}

#[tokio::test]
async fn each_reply_changes_what_the_agent_does() {
    let r = Runner::start(&[]);
    configure_agent(&r).await;
    create_session(&r, "s1").await;
    let note = r.workspace.join(".agentbox/sessions/s1/files/note.txt");

    // once: the agent writes.
    let (resp, buf, events) = start_until_permission(&r, "?session=s1", "first").await;
    let ask = events.iter().find(|e| e.event == "permission").unwrap();
    assert_eq!(ask.data["permissionId"], "write-1");
    assert_eq!(ask.data["toolKind"], "edit");
    assert_eq!(ask.data["toolCall"]["kind"], "edit");
    assert_eq!(
        ask.data["availableReplies"],
        json!(["once", "always", "reject", "reject_always"])
    );
    assert!(ask.data.get("autoReply").is_none(), "{ask:?}");
    assert!(ask.data["title"]
        .as_str()
        .unwrap()
        .starts_with("Append to "));
    let agent = events.iter().find(|e| e.event == "agent").unwrap();
    assert_eq!(
        agent.data,
        json!({"name": "thinking", "data": {"prompt": "first"}})
    );
    // Nothing is written before the answer.
    assert!(!note.exists());
    let (status, body) = reply(&r, "/v1/sessions/s1/permissions/nope", "once").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("permission_not_found"))
    );
    let (status, body) = reply(&r, "/v1/sessions/s1/permissions/write-1", "sometimes").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );
    let (status, body) = reply(&r, "/v1/sessions/s1/permissions/write-1", "once").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["reply"], "once");
    let id = invoke_id(&events);
    assert_eq!(body["invokeId"], id.as_str());
    let events = rest_of(resp, buf).await;
    assert_eq!(exit_event(&events)["exitCode"], 0);
    assert!(stdout_of(&events).contains("1: wrote"), "{events:?}");
    let answered = events
        .iter()
        .find(|e| e.event == "permission_reply")
        .unwrap();
    assert_eq!(
        answered.data,
        json!({"permissionId": "write-1", "reply": "once", "by": "client"})
    );
    assert_eq!(std::fs::read_to_string(&note).unwrap(), "first\n");

    // reject: it does not; a second answer to the same request is 409.
    let (resp, buf, events) = start_until_permission(&r, "?session=s1", "second asks=2").await;
    let id = invoke_id(&events);
    let (status, _) = reply(
        &r,
        &format!("/v1/invokes/{id}/permissions/write-1"),
        "reject",
    )
    .await;
    assert_eq!(status, 200);
    let mut resp = resp;
    let mut buf = buf;
    read_until(&mut resp, &mut buf, |e| {
        e.event == "permission" && e.data["permissionId"] == "write-2"
    })
    .await;
    let (status, body) = reply(&r, "/v1/sessions/s1/permissions/write-1", "once").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("permission_answered"))
    );
    // Another invoke in a busy session is refused.
    let (status, body) = json_of(r.post("/v1/invoke?session=s1").send().await.unwrap()).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("session_busy"))
    );
    let refused = r
        .client
        .delete(r.url("/v1/sessions/s1"))
        .bearer_auth(common::TOKEN)
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(refused).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("session_busy"))
    );
    let (status, _) = reply(&r, "/v1/sessions/s1/permissions/write-2", "reject").await;
    assert_eq!(status, 200);
    let events = rest_of(resp, buf).await;
    assert_eq!(
        stdout_of(&events),
        "1: not allowed (reject)\n2: not allowed (reject)\n"
    );
    assert_eq!(std::fs::read_to_string(&note).unwrap(), "first\n");
    // Once the invoke is over, its requests are gone.
    let (status, _) = reply(&r, &format!("/v1/invokes/{id}/permissions/write-2"), "once").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn always_is_answered_once_then_applied_by_the_runner() {
    let r = Runner::start(&[]);
    configure_agent(&r).await;
    create_session(&r, "s2").await;
    let (resp, buf, events) = start_until_permission(&r, "?session=s2", "go asks=3").await;
    assert_eq!(events.last().unwrap().data["permissionId"], "write-1");
    let (status, _) = reply(&r, "/v1/sessions/s2/permissions/write-1", "always").await;
    assert_eq!(status, 200);
    let events = rest_of(resp, buf).await;
    assert_eq!(
        stdout_of(&events),
        format!(
            "1: wrote {n} (always)\n2: wrote {n} (always)\n3: wrote {n} (always)\n",
            n = r
                .workspace
                .join(".agentbox/sessions/s2/files/note.txt")
                .display()
        )
    );
    let by: Vec<&str> = events
        .iter()
        .filter(|e| e.event == "permission_reply")
        .map(|e| e.data["by"].as_str().unwrap())
        .collect();
    assert_eq!(by, vec!["client", "always", "always"]);
    // The requests the runner answered itself say so: nothing waits for a client.
    let auto: Vec<&Value> = events
        .iter()
        .filter(|e| e.event == "permission")
        .map(|e| &e.data["autoReply"])
        .collect();
    let always = json!({"reply": "always", "by": "always"});
    assert_eq!(auto, vec![&Value::Null, &always, &always]);
    let (_, info) = json_of(r.get("/v1/sessions/s2").send().await.unwrap()).await;
    assert_eq!(info["alwaysAllowed"], json!(["edit"]));

    // A later invoke in the session is covered too; one outside it is not.
    let events = r.invoke_sse("?session=s2", "again").await;
    assert!(stdout_of(&events).contains("(always)"));
    let (resp, buf, events) = start_until_permission(&r, "", "outside").await;
    assert!(!events.iter().any(|e| e.event == "permission_reply"));
    let id = invoke_id(&events);
    let (status, _) = reply(
        &r,
        &format!("/v1/invokes/{id}/permissions/write-1"),
        "reject",
    )
    .await;
    assert_eq!(status, 200);
    let events = rest_of(resp, buf).await;
    assert_eq!(stdout_of(&events), "1: not allowed (reject)\n");
}

#[tokio::test]
async fn unanswered_requests_are_rejected_after_the_timeout() {
    let r = Runner::start(&["--permission-timeout", "300ms"]);
    configure_agent(&r).await;
    let started = std::time::Instant::now();
    let events = r.invoke_sse("", "wait").await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    let answered = events
        .iter()
        .find(|e| e.event == "permission_reply")
        .unwrap();
    assert_eq!(
        answered.data,
        json!({"permissionId": "write-1", "reply": "reject", "by": "timeout"})
    );
    assert_eq!(stdout_of(&events), "1: not allowed (reject)\n");
    let order: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        order,
        vec![
            "start",
            "agent",
            "permission",
            "permission_reply",
            "log",
            "exit"
        ]
    );
}

#[tokio::test]
async fn malformed_agent_lines_are_recorded_not_fatal() {
    let r = Runner::start(&["--permission-timeout", "200ms"]);
    configure_agent(&r).await;
    create_session(&r, "garbled").await;
    let events = r.invoke_sse("?session=garbled", "garbage").await;
    let errors: Vec<&Event> = events
        .iter()
        .filter(|e| e.event == "protocol_error")
        .collect();
    assert_eq!(errors.len(), 6, "{events:?}");
    assert!(errors[0].data["message"]
        .as_str()
        .unwrap()
        .starts_with("not JSON"));
    assert_eq!(errors[0].data["line"], "this is not json");
    assert!(errors[1].data["message"]
        .as_str()
        .unwrap()
        .contains("no-such-type"));
    assert!(errors[2].data["message"]
        .as_str()
        .unwrap()
        .contains("\"id\""));
    assert!(errors[3].data["message"]
        .as_str()
        .unwrap()
        .contains("longer than"));
    assert_eq!(errors[3].data["line"].as_str().unwrap().len(), 1024);
    // Invalid UTF-8 is quoted lossily, cut at a char boundary within 1024 bytes.
    assert_eq!(
        errors[4].data["line"].as_str().unwrap(),
        "\u{fffd}".repeat(341)
    );
    assert_eq!(errors[5].data["line"].as_str().unwrap(), "a".repeat(1023));
    // The agent went on: its event and its request came through after the bad lines.
    assert!(events.iter().any(|e| e.event == "agent"));
    assert!(events.iter().any(|e| e.event == "permission"));
    assert_eq!(exit_event(&events)["exitCode"], 0);
    // The session is free again: the next invoke runs (not 409 session_busy).
    let events = r.invoke_sse("?session=garbled", "hello").await;
    assert_eq!(exit_event(&events)["exitCode"], 0, "{events:?}");
}

#[tokio::test]
async fn history_pages_and_follows_live() {
    let r = Runner::start(&[]);
    configure_agent(&r).await;
    create_session(&r, "h").await;
    for prompt in ["one", "two"] {
        let (resp, buf, _) =
            start_until_permission(&r, &format!("?session=h&prompt={prompt}"), "").await;
        reply(&r, "/v1/sessions/h/permissions/write-1", "once").await;
        rest_of(resp, buf).await;
    }
    let all = history(&r, "h", 1000).await;
    let indices: Vec<u64> = all
        .iter()
        .map(|e| e["eventIndex"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, (1..=all.len() as u64).collect::<Vec<_>>());
    let kinds: Vec<(&str, &str)> = all
        .iter()
        .map(|e| (e["type"].as_str().unwrap(), e["sender"].as_str().unwrap()))
        .collect();
    let one = vec![
        ("prompt", "client"),
        ("start", "runner"),
        ("agent", "agent"),
        ("permission", "agent"),
        ("permission_reply", "client"),
        ("log", "agent"),
        ("exit", "runner"),
    ];
    assert_eq!(kinds, [one.clone(), one].concat());
    assert_eq!(all[0]["data"], json!({"text": "one"}));
    assert!(all[0].get("invokeId").is_none());
    let first_invoke = all[1]["invokeId"].as_str().unwrap();
    assert!(all[1..7].iter().all(|e| e["invokeId"] == first_invoke));
    assert_ne!(all[8]["invokeId"], first_invoke);
    assert_eq!(
        all[5]["data"]["data"].as_str().unwrap().split(':').next(),
        Some("1")
    );
    // Every page size gives the same events.
    for limit in [1, 3, 13] {
        assert_eq!(history(&r, "h", limit).await, all, "limit {limit}");
    }
    let (_, info) = json_of(r.get("/v1/sessions/h").send().await.unwrap()).await;
    assert_eq!(info["eventCount"], all.len());

    // Live: resume after the 12th event, then watch a third invoke arrive.
    let mut follow = r
        .get("/v1/sessions/h/events")
        .header("accept", "text/event-stream")
        .header("last-event-id", "12")
        .send()
        .await
        .unwrap();
    assert_eq!(follow.status(), 200);
    assert_eq!(follow.headers()["content-type"], "text/event-stream");
    let mut fbuf = Vec::new();
    let seen = read_until(&mut follow, &mut fbuf, |e| e.id == 14).await;
    assert_eq!(seen.iter().map(|e| e.id).collect::<Vec<_>>(), vec![13, 14]);
    assert_eq!(seen[1].event, "exit");
    assert_eq!(seen[1].data["eventIndex"], 14);
    assert_eq!(seen[1].data["type"], "exit");
    let (resp, buf, _) = start_until_permission(&r, "?session=h&prompt=three", "").await;
    let live = read_until(&mut follow, &mut fbuf, |e| e.event == "permission").await;
    assert_eq!(live.last().unwrap().id, 18);
    reply(&r, "/v1/sessions/h/permissions/write-1", "once").await;
    rest_of(resp, buf).await;
    let live = read_until(&mut follow, &mut fbuf, |e| e.event == "exit" && e.id > 14).await;
    let ids: Vec<u64> = live.iter().map(|e| e.id).collect();
    assert_eq!(ids, (13..=21).collect::<Vec<_>>());
}

#[tokio::test]
async fn reattach_mid_permission_replays_the_request() {
    let r = Runner::start(&[]);
    configure_agent(&r).await;
    create_session(&r, "re").await;
    let (resp, _, events) =
        start_until_permission(&r, "?session=re&onDisconnect=continue", "x").await;
    let id = invoke_id(&events);
    let ask_id = events.last().unwrap().id;
    drop(resp);
    // The invoke stream, from just before the request.
    let mut again = r
        .get(&format!("/v1/invokes/{id}/events"))
        .header("last-event-id", (ask_id - 1).to_string())
        .send()
        .await
        .unwrap();
    let mut buf = Vec::new();
    let replayed = read_until(&mut again, &mut buf, |e| e.event == "permission").await;
    assert_eq!(replayed[0].id, ask_id);
    assert_eq!(replayed[0].data["permissionId"], "write-1");
    // The session stream too.
    let mut follow = r
        .get("/v1/sessions/re/events")
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    let mut fbuf = Vec::new();
    let seen = read_until(&mut follow, &mut fbuf, |e| e.event == "permission").await;
    assert_eq!(seen.last().unwrap().data["data"]["permissionId"], "write-1");
    let (status, _) = reply(&r, &format!("/v1/invokes/{id}/permissions/write-1"), "once").await;
    assert_eq!(status, 200);
    let events = rest_of(again, buf).await;
    assert!(stdout_of(&events).starts_with("1: wrote"));
    assert_eq!(exit_event(&events)["exitCode"], 0);
}

#[tokio::test]
async fn a_session_survives_a_runner_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let mut r = Runner::start_in(tmp.path(), &[]);
    configure_agent(&r).await;
    create_session(&r, "keep").await;
    let (resp, buf, _) = start_until_permission(&r, "?session=keep", "before").await;
    reply(&r, "/v1/sessions/keep/permissions/write-1", "always").await;
    rest_of(resp, buf).await;
    let before = history(&r, "keep", 100).await;
    r.kill9();

    let r = Runner::start_in(tmp.path(), &[]);
    let (status, info) = json_of(r.get("/v1/sessions/keep").send().await.unwrap()).await;
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["metadata"]["owner"], "test");
    assert_eq!(info["alwaysAllowed"], json!(["edit"]));
    assert_eq!(history(&r, "keep", 5).await, before);
    // The session directory and the `always` carried over.
    let events = r.invoke_sse("?session=keep", "after").await;
    assert!(stdout_of(&events).contains("(always)"), "{events:?}");
    let note = r.workspace.join(".agentbox/sessions/keep/files/note.txt");
    assert_eq!(std::fs::read_to_string(note).unwrap(), "before\nafter\n");
    let after = history(&r, "keep", 100).await;
    assert_eq!(&after[..before.len()], &before[..]);
    let indices: Vec<u64> = after
        .iter()
        .map(|e| e["eventIndex"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, (1..=after.len() as u64).collect::<Vec<_>>());
}

/// The descriptor numbers a `list_fds` line names, and its `ev=`/`re=` values.
fn fd_line(line: &str) -> (BTreeSet<String>, String, String) {
    let mut fds = BTreeSet::new();
    let (mut ev, mut re) = (String::new(), String::new());
    for word in line.split_whitespace().skip(1) {
        if let Some(v) = word.strip_prefix("ev=") {
            ev = v.to_owned();
        } else if let Some(v) = word.strip_prefix("re=") {
            re = v.to_owned();
        } else {
            fds.insert(word.to_owned());
        }
    }
    (fds, ev, re)
}

#[tokio::test]
async fn channel_descriptors_reach_only_their_own_entrypoint() {
    let r = Runner::start(&[]);
    let gate = r.dir.join("gate");
    let list_fds = "printf 'fds '; ls /proc/self/fd | tr '\\n' ' '; \
         echo ev=${AGENTBOX_EVENTS_FD:-none} re=${AGENTBOX_REPLIES_FD:-none}";
    // Lists its own descriptors, then (the first one, which takes the gate before it lists)
    // waits until the gate is removed, so that its channel is open in the runner while the
    // others start.
    r.configure_sh(&format!(
        "if [ ! -e {g} ]; then touch {g}; {list_fds}; while [ -e {g} ]; do sleep 0.02; done; \
         else {list_fds}; fi",
        g = gate.display()
    ))
    .await;
    let mut first = r.post("/v1/invoke").send().await.unwrap();
    assert_eq!(first.status(), 200);
    let mut first_buf = Vec::new();
    // Its `log` event: it holds the gate and its channel is open.
    tokio::time::timeout(
        Duration::from_secs(20),
        read_until(&mut first, &mut first_buf, |e| e.event == "log"),
    )
    .await
    .expect("the first invoke never started");
    // The same shell under exec, which gets no channel: the baseline of what any child of
    // this runner inherits (the test harness may pass some descriptors down to the runner).
    let (status, body) = json_of(
        r.post("/v1/exec")
            .header("accept", "application/json")
            .json(&json!({"command": list_fds}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    let (baseline, ev, re) = fd_line(body["stdout"].as_str().unwrap());
    assert_eq!((ev.as_str(), re.as_str()), ("none", "none"));
    let second = r.invoke_sse("", "").await;
    std::fs::remove_file(&gate).unwrap();
    let first = rest_of(first, first_buf).await;
    for events in [&first, &second] {
        let line = stdout_of(events);
        let (mut fds, ev, re) = fd_line(&line);
        assert!(fds.remove(&ev) && fds.remove(&re), "{line}");
        assert_eq!(fds, baseline, "{line}");
    }
}

#[test]
fn the_runner_reference_shows_the_agent_the_tests_run() {
    assert!(
        include_str!("../../docs/runner.md").contains(AGENT),
        "docs/runner.md must quote tests/agents/permission_agent.py verbatim"
    );
}

#[tokio::test]
async fn idle_sessions_hold_no_descriptors() {
    let r = Runner::start(&[]);
    configure_agent(&r).await;
    // Files and pipes (HTTP connections, which the client pools, are sockets).
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", r.pid()))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| !target.to_string_lossy().starts_with("socket:"))
            .count()
    };
    create_session(&r, "first").await;
    let before = fds();
    for n in 0..40 {
        let id = format!("s{n}");
        create_session(&r, &id).await;
        assert!(history(&r, &id, 10).await.is_empty());
    }
    let (resp, buf, _) = start_until_permission(&r, "?session=s7", "x").await;
    reply(&r, "/v1/sessions/s7/permissions/write-1", "reject").await;
    rest_of(resp, buf).await;
    assert_eq!(history(&r, "s7", 100).await.len(), 6);
    // Give the finished invoke's pump a moment to let go of its own descriptors.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while fds() > before {
        assert!(
            std::time::Instant::now() < deadline,
            "{} descriptors open, {before} before 40 sessions",
            fds()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn creating_over_a_damaged_session_directory_is_refused_and_keeps_it() {
    let tmp = tempfile::tempdir().unwrap();
    let damaged = tmp.path().join("ws/.agentbox/sessions/old");
    std::fs::create_dir_all(&damaged).unwrap();
    std::fs::write(damaged.join("session.json"), b"{not json").unwrap();
    std::fs::write(damaged.join("events.jsonl"), b"stored history\n").unwrap();
    let r = Runner::start_in(tmp.path(), &[]);
    let (status, _) = json_of(r.get("/v1/sessions/old").send().await.unwrap()).await;
    assert_eq!(status, 404);
    let (status, body) = post_session(&r, &json!({"id": "old"})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("session_exists"))
    );
    assert_eq!(
        std::fs::read(damaged.join("events.jsonl")).unwrap(),
        b"stored history\n"
    );
    assert_eq!(
        std::fs::read(damaged.join("session.json")).unwrap(),
        b"{not json"
    );
}

#[tokio::test]
async fn an_fd_agent_lists_options_and_gets_the_chosen_option_id() {
    let r = Runner::start(&[]);
    // The agent offers two options of its own and prints the reply line it gets.
    let script = r#"
import json, os
events = os.fdopen(int(os.environ["AGENTBOX_EVENTS_FD"]), "w", buffering=1)
replies = os.fdopen(int(os.environ["AGENTBOX_REPLIES_FD"]))
events.write(json.dumps({"type": "permission_request", "id": "p1", "title": "Run it",
    "toolCall": {"kind": "execute"},
    "options": [{"optionId": "yes", "name": "Yes", "kind": "allow_once"},
                {"optionId": "never", "name": "Never", "kind": "reject_always"}]}) + "\n")
print(replies.readline().strip())
"#;
    let (status, body) = r
        .configure_json(json!({"entrypoint": ["python3", "-c", script]}))
        .await;
    assert_eq!(status, 200, "{body}");
    create_session(&r, "s").await;
    let (resp, buf, events) = start_until_permission(&r, "?session=s", "").await;
    let ask = &events.last().unwrap().data;
    assert_eq!(
        ask["options"],
        json!([
            {"optionId": "yes", "name": "Yes", "kind": "allow_once"},
            {"optionId": "never", "name": "Never", "kind": "reject_always"},
        ])
    );
    let (status, body) = json_of(
        r.post("/v1/sessions/s/permissions/p1")
            .json(&json!({"optionId": "never"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["reply"], "reject_always");
    let events = rest_of(resp, buf).await;
    assert_eq!(
        serde_json::from_str::<Value>(stdout_of(&events).trim()).unwrap(),
        json!({"type": "permission_reply", "id": "p1", "reply": "reject_always", "optionId": "never"})
    );
    // Remembered for the kind: the next request of it is refused by the runner.
    let (_, info) = json_of(r.get("/v1/sessions/s").send().await.unwrap()).await;
    assert_eq!(info["alwaysRejected"], json!(["execute"]));
    let events = r.invoke_sse("?session=s", "").await;
    let ask = events.iter().find(|e| e.event == "permission").unwrap();
    assert_eq!(
        ask.data["autoReply"],
        json!({"reply": "reject_always", "by": "always"})
    );
    assert!(
        stdout_of(&events).contains("\"reply\":\"reject_always\""),
        "{events:?}"
    );
}
