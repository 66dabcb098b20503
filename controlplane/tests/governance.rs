//! Governance policies against the real control plane and real runners: who may set and read
//! them, each field enforced or clamped, and exact counting when two replicas sharing a state
//! directory race creates for the last slot.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use reqwest::Method;
use serde_json::{json, Value};

const POLICIES: &str = "/api/v1/governance/policies";

async fn put_policy(cp: &Cp, namespace: &str, policy: Value) {
    let (status, body) = send(
        cp.admin(Method::PUT, &format!("{POLICIES}/{namespace}"))
            .json(&policy),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

async fn create_as(
    cp: &Cp,
    key: &str,
    name: &str,
    namespace: &str,
    template: &str,
) -> (u16, Value) {
    send(
        cp.req(Method::POST, "/api/v1/sandboxes", Some(key)).json(
            &json!({"name": name, "namespace": namespace, "templateRef": {"name": template}}),
        ),
    )
    .await
}

#[track_caller]
fn assert_violation(status: u16, body: &Value, field: &str) {
    assert_eq!(status, 403, "{body}");
    assert_error(body, "policy_violation");
    let violations = body["violations"].as_array().expect("violations");
    assert!(
        violations
            .iter()
            .any(|v| v["field"] == field && !v["limit"].is_null() && !v["actual"].is_null()),
        "no {field} violation in {body}"
    );
}

#[tokio::test]
async fn policies_are_set_by_admins_read_per_namespace_and_shared_by_replicas() {
    let env = Env::new();
    let cp = env.start();
    let policy =
        json!({"maxSandboxesTotal": 3, "allowedTemplates": ["default"], "maxTimeout": "5m"});
    // A namespace-scoped key may not set policies, not even its own namespace's.
    let (status, body) = send(
        cp.req(Method::PUT, &format!("{POLICIES}/team-a"), Some(TEAM_A_KEY))
            .json(&policy),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_error(&body, "forbidden");
    // Bad bodies: unknown fields, bad durations and quantities, bad namespaces.
    for (path, bad) in [
        ("team-a", json!({"maxSandboxes": 3})),
        ("team-a", json!({"maxTimeout": "5 minutes"})),
        ("team-a", json!({"maxMemory": "lots"})),
        ("Team_A", json!({})),
    ] {
        let (status, body) = send(
            cp.admin(Method::PUT, &format!("{POLICIES}/{path}"))
                .json(&bad),
        )
        .await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_error(&body, "invalid_request");
    }
    put_policy(&cp, "team-a", policy.clone()).await;
    put_policy(&cp, "team-b", json!({"maxSandboxesTotal": 1})).await;
    put_policy(&cp, "*", json!({"maxSandboxesTotal": 10})).await;
    // team-a's key reads team-a's policy and `*`, never team-b's.
    let (status, body) =
        send(cp.req(Method::GET, &format!("{POLICIES}/team-a"), Some(TEAM_A_KEY))).await;
    assert_eq!((status, &body), (200, &policy));
    let (status, body) =
        send(cp.req(Method::GET, &format!("{POLICIES}/team-b"), Some(TEAM_A_KEY))).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = send(cp.req(Method::GET, POLICIES, Some(TEAM_A_KEY))).await;
    assert_eq!(status, 200);
    let names: Vec<&String> = body["policies"].as_object().unwrap().keys().collect();
    assert_eq!(names, ["*", "team-a"], "{body}");
    let (_, body) = send(cp.admin(Method::GET, POLICIES)).await;
    assert_eq!(body["policies"].as_object().unwrap().len(), 3, "{body}");
    // Effective: the namespace's own, else `*`; only for namespaces the caller may use.
    let (status, body) = send(cp.req(
        Method::GET,
        "/api/v1/governance/effective",
        Some(TEAM_A_KEY),
    ))
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["namespace"], "team-a");
    assert_eq!(body["source"], "team-a");
    assert_eq!(body["policy"], policy);
    let (_, body) =
        send(cp.admin(Method::GET, "/api/v1/governance/effective?namespace=other")).await;
    assert_eq!(body["source"], "*");
    let (status, _) = send(cp.req(
        Method::GET,
        "/api/v1/governance/effective?namespace=team-b",
        Some(TEAM_A_KEY),
    ))
    .await;
    assert_eq!(status, 403);
    // Stored in the state directory: a second replica (and a restart) sees them.
    let cp2 = env.start();
    let (_, body) = send(cp2.admin(Method::GET, &format!("{POLICIES}/team-b"))).await;
    assert_eq!(body, json!({"maxSandboxesTotal": 1}));
    let (status, _) = send(cp2.admin(Method::DELETE, &format!("{POLICIES}/team-b"))).await;
    assert_eq!(status, 204);
    let (status, _) = send(cp.admin(Method::GET, &format!("{POLICIES}/team-b"))).await;
    assert_eq!(status, 404);
    let (status, _) = send(cp.admin(Method::DELETE, &format!("{POLICIES}/team-b"))).await;
    assert_eq!(status, 404);
    // Every change is in the audit log.
    let audit = env.audit_log();
    assert!(
        audit.contains(r#""action":"governance.policy.put","outcome":"denied""#),
        "{audit}"
    );
    assert!(
        audit.contains(r#""action":"governance.policy.put","outcome":"ok""#),
        "{audit}"
    );
    assert!(
        audit.contains(r#""action":"governance.policy.delete","outcome":"ok""#),
        "{audit}"
    );
}

#[tokio::test]
async fn create_limits_are_enforced() {
    let env = Env::new();
    let templates = env.root.join("templates.json");
    std::fs::write(
        &templates,
        json!({"templates": [
            {"name": "big", "mode": "agent", "limits": {"cpu": "4", "memory": "4Gi"}},
            {"name": "imaged", "mode": "agent", "image": "docker.io/evil/agent:1"},
        ]})
        .to_string(),
    )
    .unwrap();
    let cp = env.start_with("none", &["--templates-file", templates.to_str().unwrap()]);
    put_policy(
        &cp,
        "team-a",
        json!({
            "maxSandboxesPerUser": 2, "maxAgentSandboxes": 2, "maxSandboxesTotal": 3,
            "allowedTemplates": ["default", "code", "big", "imaged"],
            "allowedAgentImages": ["ghcr.io/acme/*"],
            "maxCpu": "1", "maxMemory": "512Mi",
        }),
    )
    .await;
    // Per user: team-a's key gets two sandboxes; the administrator (another user) more.
    for n in ["a1", "a2"] {
        let (status, body) = create_as(&cp, TEAM_A_KEY, n, "team-a", "default").await;
        assert_eq!(status, 201, "{body}");
    }
    let (status, body) = create_as(&cp, TEAM_A_KEY, "a3", "team-a", "code").await;
    assert_violation(status, &body, "maxSandboxesPerUser");
    assert_eq!(body["violations"][0]["limit"], 2);
    assert_eq!(body["violations"][0]["actual"], 3);
    // Agent sandboxes: two in the namespace at most; code mode is not counted there.
    let (status, body) = create_as(&cp, ADMIN_KEY, "a4", "team-a", "default").await;
    assert_violation(status, &body, "maxAgentSandboxes");
    let (status, body) = create_as(&cp, ADMIN_KEY, "c1", "team-a", "code").await;
    assert_eq!(status, 201, "{body}");
    // Total: three.
    let (status, body) = create_as(&cp, ADMIN_KEY, "c2", "team-a", "code").await;
    assert_violation(status, &body, "maxSandboxesTotal");
    // A clone is a create: counted the same (it made a fourth sandbox before).
    let (status, body) = send(
        cp.sb(Method::POST, "c1.team-a", "/clone")
            .json(&json!({"name": "c3"})),
    )
    .await;
    assert_violation(status, &body, "maxSandboxesTotal");
    assert!(!env.sandbox_dir("c3.team-a").exists());
    assert!(env
        .audit_log()
        .contains(r#""sandbox":"c3","namespace":"team-a","action":"governance.clone","outcome":"denied","status":403"#));
    // Templates, images, cpu and memory.
    put_policy(
        &cp,
        "team-c",
        json!({"allowedTemplates": ["default", "big", "imaged"], "allowedAgentImages": ["ghcr.io/acme/*"],
               "maxCpu": "1", "maxMemory": "512Mi"}),
    )
    .await;
    let (status, body) = create_as(&cp, ADMIN_KEY, "t1", "team-c", "code").await;
    assert_violation(status, &body, "allowedTemplates");
    assert_eq!(body["violations"][0]["actual"], "code");
    let (status, body) = create_as(&cp, ADMIN_KEY, "t2", "team-c", "imaged").await;
    assert_violation(status, &body, "allowedAgentImages");
    let (status, body) = create_as(&cp, ADMIN_KEY, "t3", "team-c", "big").await;
    assert_violation(status, &body, "maxCpu");
    assert_violation(status, &body, "maxMemory");
    assert_eq!(body["violations"].as_array().unwrap().len(), 2, "{body}");
    // A template without limits gets the policy's.
    let (status, body) = create_as(&cp, ADMIN_KEY, "t4", "team-c", "default").await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        env.record("t4.team-c")["template"]["limits"],
        json!({"cpu": "1", "memory": "512Mi"})
    );
    // No policy, no limit: another namespace is unaffected.
    for n in ["o1", "o2"] {
        let (status, body) = create_as(&cp, ADMIN_KEY, n, "other", "code").await;
        assert_eq!(status, 201, "{body}");
    }
    // Refused creates left nothing behind; every decision is in the audit log.
    // (Keyed `name.namespace` on disk.)
    for refused in [
        "a3.team-a",
        "a4.team-a",
        "c2.team-a",
        "t1.team-c",
        "t2.team-c",
        "t3.team-c",
    ] {
        assert!(!env.sandbox_dir(refused).exists(), "{refused}");
    }
    assert!(env.sandbox_dir("a1.team-a").exists());
    let audit = env.audit_log();
    assert!(audit.contains(r#""sandbox":"a3","namespace":"team-a","action":"governance.create","outcome":"denied","status":403,"detail":"maxSandboxesPerUser""#), "{audit}");
    assert!(audit.contains(r#""sandbox":"a1","namespace":"team-a","action":"governance.create","outcome":"allowed""#), "{audit}");
    assert!(audit.contains(r#""detail":"maxCpu,maxMemory""#), "{audit}");
}

#[tokio::test]
async fn invoke_caps_and_timeouts_are_clamped() {
    let env = Env::new();
    let cp = env.start();
    put_policy(
        &cp,
        "default",
        json!({"maxConcurrentInvokesPerSandbox": 1, "maxTimeout": "1s"}),
    )
    .await;
    cp.sandbox_sh("s", "sleep 3; echo done").await;
    // One invoke at a time: a second concurrent one is refused by the runner.
    let first = cp.sb(Method::POST, "s", "/invoke").send();
    let first = tokio::spawn(first);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = send(cp.sb(Method::POST, "s", "/invoke")).await;
    assert_eq!(status, 429, "{body}");
    // `?timeout=1h` is clamped to 1s: the first (no timeout given) and this one stop at 1s.
    let resp = first.await.unwrap().unwrap();
    let events = parse_sse(&resp.bytes().await.unwrap());
    assert_eq!(exit_event(&events)["reason"], "timeout", "{events:?}");
    assert!(started.elapsed() < Duration::from_millis(2900));
    let resp = cp
        .sb(Method::POST, "s", "/invoke?timeout=1h")
        .send()
        .await
        .unwrap();
    let events = parse_sse(&resp.bytes().await.unwrap());
    assert_eq!(exit_event(&events)["reason"], "timeout", "{events:?}");
    assert!(env.audit_log().contains(
        r#""action":"governance.invoke","outcome":"clamped","status":200,"detail":"maxTimeout""#
    ));
    // An exec's body timeout is clamped too.
    let (status, body) = send(
        cp.sb(Method::POST, "s", "/exec")
            .json(&json!({"command": "sleep 3", "timeout": "1h"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["reason"], "timeout", "{body}");
    let (status, body) = send(
        cp.sb(Method::POST, "s", "/exec")
            .json(&json!({"command": "echo quick", "timeout": 0.5})),
    )
    .await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (200, Some("completed")),
        "{body}"
    );
    assert!(env
        .audit_log()
        .contains(r#""action":"governance.exec","outcome":"clamped""#));
    // Without the policy, the same invoke runs to its end.
    let (status, _) = send(cp.admin(Method::DELETE, &format!("{POLICIES}/default"))).await;
    assert_eq!(status, 204);
    let resp = cp
        .sb(Method::POST, "s", "/invoke?timeout=1h")
        .send()
        .await
        .unwrap();
    let events = parse_sse(&resp.bytes().await.unwrap());
    assert_eq!(exit_event(&events)["reason"], "completed", "{events:?}");
}

/// Two replicas on one state directory race creates for the last slot: exactly one wins,
/// every time.
#[tokio::test]
async fn replicas_racing_for_the_last_slot_never_both_win() {
    let env = Env::new();
    let cp1 = env.start();
    let cp2 = env.start();
    put_policy(&cp1, "race", json!({"maxSandboxesTotal": 1})).await;
    let trials: usize = std::env::var("GOVERNANCE_RACE_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    for trial in 0..trials {
        let names: Vec<String> = (0..4).map(|i| format!("r{trial}-{i}")).collect();
        let racers = [&cp1, &cp2, &cp1, &cp2]
            .into_iter()
            .zip(&names)
            .map(|(cp, name)| create_as(cp, ADMIN_KEY, name, "race", "code"));
        let results = futures_util::future::join_all(racers).await;
        let winners: Vec<usize> = results
            .iter()
            .enumerate()
            .filter(|(_, (s, _))| *s == 201)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(winners.len(), 1, "trial {trial}: {results:?}");
        for (status, body) in results.iter().filter(|(s, _)| *s != 201) {
            assert_violation(*status, body, "maxSandboxesTotal");
        }
        cp2.delete(&format!("r{trial}-{}", winners[0])).await;
    }
}

/// The AgentTier Python SDK (installed by .ci/run) raises its `PolicyViolationError`, with the
/// violations, on what a refused create answers.
#[tokio::test]
async fn the_agenttier_sdk_raises_policy_violation_error() {
    let env = Env::new();
    let cp = env.start();
    put_policy(
        &cp,
        "team-a",
        json!({"maxSandboxesTotal": 1, "allowedTemplates": ["code"]}),
    )
    .await;
    let script = r#"
import json, os, sys
from agenttier import AgentTierClient, PolicyViolationError
client = AgentTierClient(api_url=os.environ["CP_URL"])
client.create_sandbox(template="code", name="sdk-1", namespace="team-a")
for name, template in [("sdk-2", "code"), ("sdk-3", "default")]:
    try:
        client.create_sandbox(template=template, name=name, namespace="team-a")
        print(json.dumps({"created": name}))
    except PolicyViolationError as e:
        print(json.dumps({"refused": name, "message": str(e), "violations": e.violations}))
"#;
    let url = cp.url("");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args(["-c", script])
            .env("CP_URL", url)
            .env("AGENTTIER_API_KEY", TEAM_A_KEY)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert_eq!(lines[0]["refused"], "sdk-2");
    assert_eq!(
        lines[0]["violations"],
        json!([{"field": "maxSandboxesTotal", "limit": 1, "actual": 2}])
    );
    assert_eq!(lines[1]["refused"], "sdk-3");
    let fields: Vec<&str> = lines[1]["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["maxSandboxesTotal", "allowedTemplates"]);
}

/// `maxConcurrentInvokesPerSandbox` reaches a sandbox started before the policy (its runner's
/// own cap is the template's 16): the control plane counts its running invokes at the next
/// invoke. `maxIdleTimeout` refuses a longer `idleTimeout` and clamps the template's default.
#[tokio::test]
async fn policies_reach_existing_sandboxes_and_idle_timeouts() {
    let env = Env::new();
    let cp = env.start();
    cp.sandbox_sh("old", "sleep 2; echo done").await;
    put_policy(
        &cp,
        "default",
        json!({"maxConcurrentInvokesPerSandbox": 1, "maxIdleTimeout": "10m"}),
    )
    .await;
    let first = tokio::spawn(cp.sb(Method::POST, "old", "/invoke").send());
    let deadline = Instant::now() + Duration::from_secs(5);
    // Wait until the runner counts the first one.
    loop {
        let (_, info) = send(cp.sb(Method::GET, "old", "/invokes")).await;
        if info["invokes"]
            .as_array()
            .is_some_and(|l| l.iter().any(|i| i["state"] == "running"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "the first invoke never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = send(cp.sb(Method::POST, "old", "/invoke")).await;
    assert_violation(status, &body, "maxConcurrentInvokesPerSandbox");
    assert_eq!(body["violations"][0]["limit"], 1);
    assert_eq!(body["violations"][0]["actual"], 2);
    let resp = first.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let events = parse_sse(&resp.bytes().await.unwrap());
    assert_eq!(exit_event(&events)["reason"], "completed", "{events:?}");
    // Once it ended, the next one runs.
    let events = cp.invoke("old", "").await;
    assert_eq!(exit_event(&events)["reason"], "completed", "{events:?}");
    assert!(env.audit_log().contains(
        r#""sandbox":"old","namespace":"default","action":"governance.invoke","outcome":"denied","status":403,"detail":"maxConcurrentInvokesPerSandbox""#
    ), "{}", env.audit_log());

    // maxIdleTimeout: a longer one asked for is refused; none, or the template's, is clamped.
    let (status, body) = send(
        cp.admin(Method::POST, "/api/v1/sandboxes")
            .json(&json!({"name": "long", "idleTimeout": "2h", "templateRef": {"name": "code"}})),
    )
    .await;
    assert_violation(status, &body, "maxIdleTimeout");
    assert_eq!(body["violations"][0]["actual"], "2h");
    let (status, body) = send(cp.sb(Method::GET, "long", "")).await;
    assert_eq!(status, 404, "{body}");
    for (name, asked, want) in [("clamped", None, "10m"), ("short", Some("5m"), "5m")] {
        let mut req = json!({"name": name, "templateRef": {"name": "code"}});
        if let Some(asked) = asked {
            req["idleTimeout"] = json!(asked);
        }
        let (status, body) = send(cp.admin(Method::POST, "/api/v1/sandboxes").json(&req)).await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["idleTimeout"], want, "{body}");
    }
}

const TEAM_B_KEY: &str = "cpt-team-b-key-1c0ffee5deadbeef";

/// A namespace-B key learns nothing of a namespace-A sandbox through any per-sandbox route:
/// every answer is byte for byte the one for a name nobody uses. Names are per namespace, so
/// a create of a name taken only in A succeeds, exactly as a create of a fresh name.
#[tokio::test]
async fn another_namespace_cannot_tell_a_taken_name_from_a_free_one() {
    let env = Env::new();
    env.write_keys(&[
        ("admin", ADMIN_KEY, &[], true),
        ("a", TEAM_A_KEY, &["team-a"], false),
        ("b", TEAM_B_KEY, &["team-b"], false),
    ]);
    let cp = env.start();
    for (key, name, ns) in [
        (TEAM_A_KEY, "secret-a", "team-a"),
        (TEAM_B_KEY, "mine-b", "team-b"),
    ] {
        let (status, body) = create_as(&cp, key, name, ns, "default").await;
        assert_eq!(status, 201, "{body}");
    }
    cp.configure_sh("secret-a", "echo hi").await;
    let routes: &[(Method, &str, Option<Value>)] = &[
        (Method::GET, "", None),
        (Method::DELETE, "", None),
        (Method::POST, "/stop", None),
        (Method::POST, "/resume", None),
        (Method::POST, "/clone", Some(json!({"name": "copy-b"}))),
        (Method::POST, "/invoke", None),
        (
            Method::POST,
            "/configure",
            Some(json!({"entrypoint": ["true"]})),
        ),
        (Method::GET, "/invokes", None),
        (Method::GET, "/files/?path=/workspace", None),
        (Method::GET, "/files/x", None),
        (Method::PUT, "/files/x", None),
        (Method::POST, "/exec", Some(json!({"command": "true"}))),
        (Method::GET, "/sessions", None),
        (Method::GET, "/archive", None),
    ];
    for (method, rest, body) in routes {
        let mut answers = Vec::new();
        for name in ["secret-a", "never-was"] {
            let mut req = cp.req(
                method.clone(),
                &format!("/api/v1/sandboxes/{name}{rest}"),
                Some(TEAM_B_KEY),
            );
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap().replace(name, "NAME");
            answers.push((status, text));
        }
        assert_eq!(answers[0], answers[1], "{method} {rest}");
        assert_eq!(answers[0].0, 404, "{method} {rest}: {answers:?}");
    }
    // The list shows it not.
    let (_, list) = send(cp.req(Method::GET, "/api/v1/sandboxes", Some(TEAM_B_KEY))).await;
    assert!(!list.to_string().contains("secret-a"), "{list}");
    // A create of the name taken in A: as a create of a fresh name (the summaries differ
    // only in their times).
    let mut answers = Vec::new();
    for name in ["secret-a", "fresh-b"] {
        let (status, body) = create_as(&cp, TEAM_B_KEY, name, "team-b", "default").await;
        assert_eq!(body["name"], name, "{body}");
        assert_eq!(body["namespace"], "team-b", "{body}");
        answers.push(status);
    }
    assert_eq!(answers, [201, 201]);
    // A clash in B's own namespace is the 409.
    let (status, body) = create_as(&cp, TEAM_B_KEY, "secret-a", "team-b", "default").await;
    assert_eq!(status, 409, "{body}");
    assert_error(&body, "already_exists");
    // A's sandbox is untouched, and still A's alone.
    let resp = cp
        .req(
            Method::POST,
            "/api/v1/sandboxes/secret-a/invoke",
            Some(TEAM_A_KEY),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let events = parse_sse(&resp.bytes().await.unwrap());
    assert_eq!(exit_event(&events)["exitCode"], 0, "{events:?}");
}

/// Invokes `name` with `key` (and `query`), answering its stdout.
async fn invoke_as(cp: &Cp, key: &str, name: &str, query: &str) -> String {
    let resp = cp
        .req(
            Method::POST,
            &format!("/api/v1/sandboxes/{name}/invoke{query}"),
            Some(key),
        )
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
    let events = parse_sse(&bytes);
    assert_eq!(exit_event(&events)["exitCode"], 0, "{events:?}");
    String::from_utf8(rebuild(&events, "stdout")).unwrap()
}

/// Names are per namespace: `team-a/foo` and `team-b/foo` are two sandboxes, each with its
/// own workspace; each namespace's callers see and change only theirs; a caller of every
/// namespace picks with `?namespace=` (or the id `name.namespace`) and is told when a name
/// is ambiguous.
#[tokio::test]
async fn names_are_per_namespace() {
    let env = Env::new();
    env.write_keys(&[
        ("admin", ADMIN_KEY, &[], true),
        ("a", TEAM_A_KEY, &["team-a"], false),
        ("b", TEAM_B_KEY, &["team-b"], false),
    ]);
    let cp = env.start();
    let script = "echo \"$AGENTBOX_SANDBOX:$(cat mark 2>/dev/null || echo none)\"";
    for (key, ns) in [(TEAM_A_KEY, "team-a"), (TEAM_B_KEY, "team-b")] {
        let (status, body) = create_as(&cp, key, "foo", ns, "default").await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["name"], "foo", "{body}");
        assert_eq!(body["sandboxId"], "foo", "{body}");
        assert_eq!(body["namespace"], ns, "{body}");
        let (status, body) = send(
            cp.req(Method::POST, "/api/v1/sandboxes/foo/configure", Some(key))
                .json(&json!({"entrypoint": ["sh", "-c", script]})),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    // Two workspaces: a file written in A's is not in B's.
    let (status, body) = send(
        cp.req(
            Method::PUT,
            "/api/v1/sandboxes/foo/files/workspace/mark",
            Some(TEAM_A_KEY),
        )
        .body("from-a"),
    )
    .await;
    assert!(status < 300, "{status} {body}");
    assert_eq!(invoke_as(&cp, TEAM_A_KEY, "foo", "").await, "foo:from-a\n");
    assert_eq!(invoke_as(&cp, TEAM_B_KEY, "foo", "").await, "foo:none\n");
    let (status, _) = send(cp.req(
        Method::GET,
        "/api/v1/sandboxes/foo/files/workspace/mark",
        Some(TEAM_B_KEY),
    ))
    .await;
    assert_eq!(status, 404);
    // Each caller's answers are its own sandbox's; its list holds its own only.
    for (key, ns) in [(TEAM_A_KEY, "team-a"), (TEAM_B_KEY, "team-b")] {
        let (status, body) = send(cp.req(Method::GET, "/api/v1/sandboxes/foo", Some(key))).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            (&body["name"], &body["namespace"]),
            (&json!("foo"), &json!(ns))
        );
        let (_, list) = send(cp.req(Method::GET, "/api/v1/sandboxes", Some(key))).await;
        let shown: Vec<(Value, Value)> = list["sandboxes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["name"].clone(), s["namespace"].clone()))
            .collect();
        assert_eq!(shown, [(json!("foo"), json!(ns))], "{list}");
        // Another namespace named outright is no way in.
        let other = if ns == "team-a" { "team-b" } else { "team-a" };
        for path in [
            format!("/api/v1/sandboxes/foo?namespace={other}"),
            format!("/api/v1/sandboxes/foo.{other}"),
        ] {
            let (status, body) = send(cp.req(Method::GET, &path, Some(key))).await;
            assert_eq!(status, 404, "{path}: {body}");
        }
    }
    // A caller of every namespace: two sandboxes named foo, so it must pick.
    let (status, body) = send(cp.sb(Method::GET, "foo", "")).await;
    assert_eq!(status, 409, "{body}");
    assert_error(&body, "ambiguous_name");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("team-a") && message.contains("team-b") && message.contains("?namespace="),
        "{message}"
    );
    let (_, list) = send(cp.admin(Method::GET, "/api/v1/sandboxes")).await;
    let named_foo = list["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"] == "foo")
        .count();
    assert_eq!(named_foo, 2, "{list}");
    for (path, ns) in [
        ("/api/v1/sandboxes/foo?namespace=team-a", "team-a"),
        ("/api/v1/sandboxes/foo.team-b", "team-b"),
    ] {
        let (status, body) = send(cp.admin(Method::GET, path)).await;
        assert_eq!(status, 200, "{path}: {body}");
        assert_eq!(
            (&body["name"], &body["namespace"]),
            (&json!("foo"), &json!(ns))
        );
    }
    // `?namespace=` picks on the runner's routes too (and never reaches the runner).
    assert_eq!(
        invoke_as(&cp, ADMIN_KEY, "foo", "?namespace=team-a").await,
        "foo:from-a\n"
    );
    assert_eq!(
        invoke_as(&cp, ADMIN_KEY, "foo.team-b", "").await,
        "foo:none\n"
    );
    // A name in one namespace only resolves without picking.
    let (status, body) = create_as(&cp, TEAM_B_KEY, "solo", "team-b", "default").await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = send(cp.sb(Method::GET, "solo", "")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["namespace"], "team-b");
    // Preview URLs name the namespace (`name.namespace`: a preview's query is its server's),
    // and are no way into B's sandbox for A.
    let (status, port) = send(
        cp.req(
            Method::POST,
            "/api/v1/sandboxes/foo/ports",
            Some(TEAM_B_KEY),
        )
        .json(&json!({"port": 8000, "protocol": "http"})),
    )
    .await;
    assert_eq!(status, 201, "{port}");
    let preview = "/api/v1/sandboxes/foo.team-b/preview/8000/";
    assert_eq!(port["previewUrl"], format!("http://{}{preview}", cp.addr));
    let (status, body) = send(cp.req(Method::GET, preview, Some(TEAM_A_KEY))).await;
    assert_eq!(status, 404, "{body}");
    assert_error(&body, "sandbox_not_found");
    // A delete in B leaves A's.
    let (status, body) =
        send(cp.req(Method::DELETE, "/api/v1/sandboxes/foo", Some(TEAM_B_KEY))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["namespace"], "team-b", "{body}");
    let (status, _) = send(cp.req(Method::GET, "/api/v1/sandboxes/foo", Some(TEAM_B_KEY))).await;
    assert_eq!(status, 404);
    assert_eq!(invoke_as(&cp, TEAM_A_KEY, "foo", "").await, "foo:from-a\n");
    // Now the administrator's foo is A's alone.
    let (status, body) = send(cp.sb(Method::GET, "foo", "")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["namespace"], "team-a");
    // The audit log names sandboxes by name and namespace, never by backend key.
    let audit = env.audit_log();
    assert!(!audit.contains("foo.team-"), "{audit}");
    assert!(
        audit.lines().any(|l| l.contains("\"delete\"")
            && l.contains("\"sandbox\":\"foo\"")
            && l.contains("\"namespace\":\"team-b\"")),
        "{audit}"
    );
}

/// A sandbox made before names were per namespace (keyed by its plain name in a namespace
/// other than `default`) is still found by its namespace's callers, and still holds its
/// name there.
#[tokio::test]
async fn sandboxes_keyed_before_names_were_per_namespace_still_resolve() {
    let env = Env::new();
    env.write_keys(&[
        ("admin", ADMIN_KEY, &[], true),
        ("a", TEAM_A_KEY, &["team-a"], false),
        ("b", TEAM_B_KEY, &["team-b"], false),
    ]);
    let cp = env.start();
    let (status, body) = create_as(&cp, TEAM_A_KEY, "old", "team-a", "default").await;
    assert_eq!(status, 201, "{body}");
    let (status, body) =
        send(cp.req(Method::POST, "/api/v1/sandboxes/old/stop", Some(TEAM_A_KEY))).await;
    assert_eq!(status, 200, "{body}");
    // What the earlier control plane left: the record under the plain name.
    let mut record = env.record("old.team-a");
    record["name"] = json!("old");
    std::fs::rename(env.sandbox_dir("old.team-a"), env.sandbox_dir("old")).unwrap();
    std::fs::write(
        env.sandbox_dir("old").join("sandbox.json"),
        record.to_string(),
    )
    .unwrap();
    let (status, body) = send(cp.req(Method::GET, "/api/v1/sandboxes/old", Some(TEAM_A_KEY))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (&body["name"], &body["namespace"]),
        (&json!("old"), &json!("team-a"))
    );
    let (status, body) = send(cp.req(
        Method::POST,
        "/api/v1/sandboxes/old/resume",
        Some(TEAM_A_KEY),
    ))
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "Running", "{body}");
    let (status, body) = create_as(&cp, TEAM_A_KEY, "old", "team-a", "default").await;
    assert_eq!(status, 409, "{body}");
    assert_error(&body, "already_exists");
    let (status, body) = send(cp.req(Method::GET, "/api/v1/sandboxes/old", Some(TEAM_B_KEY))).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = send(cp.sb(Method::GET, "old", "")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["namespace"], "team-a");
}

/// A key (`name.namespace`) whose runner socket path would pass a unix socket's 107 bytes is
/// refused up front with a 400 that says why, not a failed start.
#[tokio::test]
async fn a_name_and_namespace_too_long_for_a_socket_path_are_refused() {
    let env = Env::new();
    let cp = env.start_with("namespaces", &[]);
    let (status, body) = send(cp.admin(Method::POST, "/api/v1/sandboxes").json(&json!({
        "name": "n".repeat(63), "namespace": "s".repeat(63),
        "templateRef": {"name": "default"},
    })))
    .await;
    assert_eq!(status, 400, "{body}");
    assert_error(&body, "invalid_request");
    assert!(
        body["message"].as_str().unwrap().contains("too long"),
        "{body}"
    );
    assert!(!env
        .sandbox_dir(&format!("{}.{}", "n".repeat(63), "s".repeat(63)))
        .exists());
}
