//! The audit query against the real control plane: filters, newest-first paging with an opaque
//! cursor over more than 10,000 records, namespace scoping, and what records never hold.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::{Duration, UNIX_EPOCH};

use common::*;
use reqwest::Method;
use serde_json::{json, Value};

const N: usize = 10_000;
/// The synthetic records' first second (2023-11-14), one second apart.
const BASE: u64 = 1_700_000_000;

fn at(i: usize) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_secs(BASE + i as u64)).to_string()
}

const ACTIONS: [&str; 4] = ["invoke", "configure", "files.get", "governance.create"];

/// Record `i` of the synthetic history: the same shape the control plane writes.
fn synthetic(i: usize) -> Value {
    json!({
        "time": at(i),
        "actor": if i.is_multiple_of(2) { "alice" } else { "bob" },
        "sandbox": format!("s{}", i % 10),
        "namespace": if i % 4 < 2 { "team-a" } else { "team-b" },
        "action": ACTIONS[i % 4],
        "outcome": if i.is_multiple_of(5) { "error" } else { "ok" },
        "status": if i.is_multiple_of(5) { 500 } else { 200 },
    })
}

async fn page(cp: &Cp, key: &str, query: &str) -> Value {
    let (status, body) = send(cp.req(
        Method::GET,
        &format!("/api/v1/audit/events?{query}"),
        Some(key),
    ))
    .await;
    assert_eq!(status, 200, "{query}: {body}");
    body
}

/// Every record the query gives for `query`, following cursors; asserts newest first.
async fn all(cp: &Cp, key: &str, query: &str) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let q = match &cursor {
            Some(c) => format!("{query}&cursor={c}"),
            None => query.to_owned(),
        };
        let body = page(cp, key, &q).await;
        out.extend(body["events"].as_array().unwrap().iter().cloned());
        match body["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    for w in out.windows(2) {
        assert!(w[0]["time"].as_str() >= w[1]["time"].as_str(), "{w:?}");
    }
    out
}

#[tokio::test]
async fn filters_and_pages_over_ten_thousand_records() {
    let env = Env::new();
    std::fs::create_dir_all(&env.state).unwrap();
    let mut text = String::new();
    for i in 0..N {
        text.push_str(&synthetic(i).to_string());
        text.push('\n');
    }
    std::fs::write(env.state.join("audit.log"), text).unwrap();
    let cp = env.start();
    // Real records after the synthetic ones: a create and a denied request.
    cp.create("real", "code").await;
    let (status, _) = send(cp.req(Method::GET, "/api/v1/sandboxes", Some(WRONG_KEY))).await;
    assert_eq!(status, 401);

    // Everything, in pages of 1000: each record once, newest first, the real ones on top.
    let everything = all(&cp, ADMIN_KEY, "limit=1000").await;
    assert_eq!(everything.len(), N + 2, "create + the refused credential");
    assert_eq!(everything[0]["action"], "authenticate");
    assert_eq!(everything[0]["outcome"], "denied");
    assert_eq!(everything[1]["action"], "create");
    assert_eq!(everything[1]["sandbox"], "real");
    let expected: Vec<Value> = (0..N).rev().map(synthetic).collect();
    assert_eq!(everything[2..], expected[..]);
    // Small pages cover the same records.
    let first = page(&cp, ADMIN_KEY, "limit=7").await;
    assert_eq!(first["events"].as_array().unwrap().len(), 7);
    let second = page(
        &cp,
        ADMIN_KEY,
        &format!("limit=7&cursor={}", first["nextCursor"].as_str().unwrap()),
    )
    .await;
    assert_eq!(second["events"][0], everything[7]);

    // Filters, alone and together, against the same filter applied here.
    let window = format!("since={}&until={}", at(2000), at(3000));
    for (query, keep) in [
        (
            "sandbox=s3",
            Box::new(|i: usize| i % 10 == 3) as Box<dyn Fn(usize) -> bool>,
        ),
        ("actor=bob", Box::new(|i| i % 2 == 1)),
        ("action=governance.*", Box::new(|i| i % 4 == 3)),
        (
            "action=files.get&outcome=error",
            Box::new(|i| i % 4 == 2 && i % 5 == 0),
        ),
        (window.as_str(), Box::new(|i| (2000..3000).contains(&i))),
        (
            &format!("sandbox=s4&outcome=ok&{window}")[..],
            Box::new(|i| i % 10 == 4 && i % 5 != 0 && (2000..3000).contains(&i)),
        ),
    ] {
        let got = all(&cp, ADMIN_KEY, &format!("limit=100&{query}")).await;
        let want: Vec<Value> = (0..N).rev().filter(|&i| keep(i)).map(synthetic).collect();
        assert_eq!(got, want, "{query}");
    }
    // `since` as a duration ago: the real records only (the scan stops at older ones).
    let recent = all(&cp, ADMIN_KEY, "since=1h").await;
    assert_eq!(recent[..], everything[..2]);

    // A namespace-scoped key sees its namespace's records only, never records without one.
    let team_a = all(&cp, TEAM_A_KEY, "limit=1000").await;
    let want: Vec<Value> = (0..N).rev().filter(|&i| i % 4 < 2).map(synthetic).collect();
    assert_eq!(team_a, want);
    let (status, body) = send(cp.req(
        Method::GET,
        "/api/v1/audit/events?sandbox=s2&limit=1000",
        Some(TEAM_A_KEY),
    ))
    .await;
    assert_eq!(status, 200);
    assert!(body["events"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["namespace"] == "team-a"));

    // Bad queries are 400 with a JSON error.
    for bad in [
        "limit=0",
        "limit=1001",
        "limit=x",
        "since=yesterday",
        "cursor=bogus",
        "cursor=djE6MTox", // base64 of a cursor of another file
        "colour=red",
    ] {
        let (status, body) =
            send(cp.admin(Method::GET, &format!("/api/v1/audit/events?{bad}"))).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_error(&body, "invalid_request");
    }
    let (status, _) = send(cp.req(Method::GET, "/api/v1/audit/events", None)).await;
    assert_eq!(status, 401);
    // Nothing of a key in the records the query returns.
    let text = serde_json::to_string(&everything).unwrap();
    for key in [ADMIN_KEY, TEAM_A_KEY, WRONG_KEY] {
        assert!(!text.contains(key));
    }
    let seen: HashSet<String> = everything.iter().map(|e| e.to_string()).collect();
    assert_eq!(seen.len(), everything.len());
}

#[tokio::test]
async fn an_audit_log_on_stderr_cannot_be_queried() {
    let env = Env::new();
    let cp = env.start_with("none", &["--audit-log", "-"]);
    let (status, body) = send(cp.admin(Method::GET, "/api/v1/audit/events")).await;
    assert_eq!(status, 404, "{body}");
    assert_error(&body, "audit_unavailable");
}

#[tokio::test]
async fn an_invoke_ends_with_a_record_of_its_id_reason_and_duration() {
    let env = Env::new();
    let cp = env.start();
    cp.sandbox_sh("s", "read -r x; echo \"out-$x\"; sleep 0.2")
        .await;
    let events = cp.invoke("s", "canary-0c9d1e\n").await;
    let sse_id = invoke_id(&events);
    let (status, answer) = send(
        cp.sb(Method::POST, "s", "/invoke")
            .header("accept", "application/json")
            .body("canary-0c9d1e\n"),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let json_id = answer["invokeId"].as_str().unwrap().to_owned();
    let resp = cp
        .sb(Method::POST, "s", "/invoke?timeout=50ms")
        .body("x\n")
        .send()
        .await
        .unwrap();
    let timed_out = invoke_id(&parse_sse(&resp.bytes().await.unwrap()));
    // Recorded when each stream ends, a moment after the client saw it.
    let ends = eventually(Duration::from_secs(5), || async {
        let body = page(&cp, ADMIN_KEY, "action=invoke.end").await;
        let events = body["events"].as_array().unwrap().clone();
        (events.len() == 3).then_some(events)
    })
    .await
    .expect("three invoke.end records");
    let by_id = |id: &str| ends.iter().find(|e| e["invokeId"] == id).cloned().unwrap();
    for id in [&sse_id, &json_id] {
        let e = by_id(id);
        assert_eq!(e["outcome"], "completed", "{e}");
        assert_eq!(e["sandbox"], "s");
        assert!(e["durationMs"].as_u64().unwrap() >= 200, "{e}");
    }
    assert_eq!(by_id(&timed_out)["outcome"], "timeout");
    // Still never the output or the input.
    let audit = env.audit_log();
    assert!(!audit.contains("canary-0c9d1e"), "{audit}");
}
