//! Named credentials against the real control plane and real runners: the agent gets the value
//! as an environment variable and as a read-only file, and the value's bytes appear nowhere
//! else: not in any response body of the test, not in the control plane's log, not in any file
//! of the state directory (records, specs, runner logs, journals, the audit log) but the store
//! and the sandbox's own credentials directory.
#![allow(clippy::unwrap_used)]

mod common;

use std::cell::RefCell;
use std::path::Path;
use std::process::Stdio;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};

const TEAM_B_KEY: &str = "cpt-team-b-key-1c0ffee5deadbeef";
const SECRET_ENV: &str = "sk-live-9b1f0c3e7a5d42e8b6c1f0a9d3e7b5c2";
const SECRET_FILE: &str =
    r#"{"type":"service_account","private_key":"gcp-3f8a1d6c9e2b4f70a5d8c1e6b9f2a4d7"}"#;
const ROTATED: &str = "sk-live-rotated-0d4c8e2a6b1f9d3c7e5a";

thread_local! {
    /// Every response body this test received (each test runs on a thread of its own).
    static BODIES: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

async fn call(rb: reqwest::RequestBuilder) -> (u16, Value) {
    let resp = rb.send().await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.unwrap();
    BODIES.with(|b| b.borrow_mut().extend_from_slice(&bytes));
    (status, to_json(&bytes))
}

fn sha(text: &str) -> String {
    sha256_hex(text)
}

const ROTATED_FILE: &str = r#"{"private_key":"gcp-rotated-7c2e9a4f1b8d3e6a"}"#;

/// The agent prints the SHA-256 of what it got, never the value itself. `file`: where it
/// reads the file credential (isolated: exactly the path the reference names).
fn agent(file: &str) -> String {
    format!(
        r#"printf %s "$OPENAI_API_KEY" | sha256sum | cut -d' ' -f1
sha256sum < "{file}" | cut -d' ' -f1
if printf x >> "{file}" 2>/dev/null; then echo writable; else echo read-only; fi
ls -A "$AGENTBOX_CREDENTIALS_DIR" | tr '\n' ' '; echo
echo "$AGENTBOX_CREDENTIALS_DIR""#
    )
}

async fn stdout_of(cp: &Cp, name: &str) -> Vec<String> {
    let resp = cp.sb(Method::POST, name, "/invoke").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let bytes = resp.bytes().await.unwrap();
    BODIES.with(|b| b.borrow_mut().extend_from_slice(&bytes));
    let events = parse_sse(&bytes);
    assert_eq!(exit_event(&events)["exitCode"], 0, "{events:?}");
    events
        .iter()
        .filter(|e| e.event == "log" && e.data["stream"] == "stdout")
        .map(|e| e.data["data"].as_str().unwrap().trim_end().to_owned())
        .collect()
}

/// Every file under `dir` but those under `skip`, as (path, bytes).
fn files(dir: &Path, skip: &dyn Fn(&Path) -> bool, out: &mut Vec<(String, Vec<u8>)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if skip(&path) {
            continue;
        }
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            files(&path, skip, out);
        } else if meta.is_file() {
            if let Ok(bytes) = std::fs::read(&path) {
                out.push((path.display().to_string(), bytes));
            }
        }
    }
}

fn contains(hay: &[u8], needle: &str) -> bool {
    memchr::memmem::find(hay, needle.as_bytes()).is_some()
}

async fn credentials_reach_the_agent_and_nothing_else(isolation: &str) {
    BODIES.with(|b| b.borrow_mut().clear());
    let env = Env::new();
    env.write_keys(&[
        ("admin", ADMIN_KEY, &[], true),
        ("a", TEAM_A_KEY, &["team-a"], false),
        ("b", TEAM_B_KEY, &["team-b"], false),
    ]);
    let log_path = env.root.join("controlplane.log");
    let mut cmd = env.command(&env.args(isolation));
    cmd.env("AGENTBOX_LOG", "debug")
        .stderr(Stdio::from(std::fs::File::create(&log_path).unwrap()));
    let cp = env.spawn_command_keeping_stderr(cmd);

    // team-a sets its credentials; values are never returned.
    for (name, value) in [("openai", SECRET_ENV), ("gcp", SECRET_FILE)] {
        let (status, body) = call(
            cp.req(
                Method::PUT,
                &format!("/api/v1/credentials/{name}"),
                Some(TEAM_A_KEY),
            )
            .json(&json!({"value": value})),
        )
        .await;
        assert_eq!(status, 204, "{body}");
    }
    let (status, body) = call(cp.req(Method::GET, "/api/v1/credentials", Some(TEAM_A_KEY))).await;
    assert_eq!(status, 200);
    let names: Vec<&str> = body["credentials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["gcp", "openai"]);
    // Another namespace's key sees none of them and cannot touch them.
    let (_, body) = call(cp.req(Method::GET, "/api/v1/credentials", Some(TEAM_B_KEY))).await;
    assert_eq!(body["credentials"], json!([]));
    let (status, _) = call(cp.req(
        Method::GET,
        "/api/v1/credentials?namespace=team-a",
        Some(TEAM_B_KEY),
    ))
    .await;
    assert_eq!(status, 403);
    let (status, _) = call(cp.req(
        Method::DELETE,
        "/api/v1/credentials/openai?namespace=team-a",
        Some(TEAM_B_KEY),
    ))
    .await;
    assert_eq!(status, 403);
    let (status, body) = call(
        cp.req(Method::POST, "/api/v1/sandboxes", Some(TEAM_B_KEY))
            .json(&json!({
            "name": "thief", "credentials": [{"name": "openai", "env": "X"}]})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_error(&body, "invalid_request");
    // Bad references and bodies are 400; a body's bytes are never quoted back.
    for bad in [
        json!([{"name": "openai", "env": "PATH"}]),
        json!([{"name": "openai", "file": "/etc/passwd"}]),
        json!([{"name": "openai"}]),
    ] {
        let (status, body) = call(
            cp.req(Method::POST, "/api/v1/sandboxes", Some(TEAM_A_KEY))
                .json(&json!({"name": "bad", "credentials": bad})),
        )
        .await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    let (status, body) = call(
        cp.req(Method::PUT, "/api/v1/credentials/x", Some(TEAM_A_KEY))
            .body(format!("{{\"valu\": \"{SECRET_ENV}\"}}")),
    )
    .await;
    assert_eq!(status, 400);
    assert!(!body.to_string().contains(SECRET_ENV));

    // The agent gets both: the variable and the read-only file.
    let (status, body) = call(
        cp.req(Method::POST, "/api/v1/sandboxes", Some(TEAM_A_KEY))
            .json(&json!({
            "name": "agent",
            "credentials": [
                {"name": "openai", "env": "OPENAI_API_KEY"},
                {"name": "gcp", "file": "/run/credentials/gcp.json"},
            ]})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let file = if isolation == "namespaces" {
        "/run/credentials/gcp.json"
    } else {
        "$AGENTBOX_CREDENTIALS_DIR/gcp.json"
    };
    cp.configure_sh("agent", &agent(file)).await;
    let out = stdout_of(&cp, "agent").await;
    assert_eq!(out[..2], [sha(SECRET_ENV), sha(SECRET_FILE)]);
    // The directory holds the file and the runner's env file (the agent's own values).
    assert_eq!(out[3].trim(), ".env.json gcp.json", "{out:?}");
    if isolation == "namespaces" {
        assert_eq!(out[4], "/run/credentials");
    } else {
        assert_eq!(
            Path::new(&out[4]),
            // (Keyed `name.namespace` on disk.)
            env.sandbox_dir("agent.team-a").join("credentials")
        );
    }
    // Read-only: mounted so when isolated; without isolation only mode 0400 (root ignores it).
    if isolation == "namespaces" || !rustix::process::geteuid().is_root() {
        assert_eq!(out[2], "read-only");
    }
    // Another sandbox gets nothing; isolated, it cannot read the first one's files either
    // (without isolation every sandbox is a plain process of the same user: no such claim).
    let theft = if isolation == "namespaces" {
        format!(
            "cat {} 2>&1;",
            env.sandbox_dir("agent.team-a")
                .join("credentials/gcp.json")
                .display()
        )
    } else {
        String::new()
    };
    cp.sandbox_sh("other", &format!("env; {theft} true")).await;
    let other = stdout_of(&cp, "other").await.join("\n");
    if !theft.is_empty() {
        assert!(
            other.contains("No such file") || other.contains("Permission denied"),
            "{other}"
        );
    }
    assert!(
        !other.contains("OPENAI_API_KEY") && !other.contains("AGENTBOX_CREDENTIALS_DIR"),
        "{other}"
    );

    // Reads of everything else.
    for path in [
        "/api/v1/sandboxes",
        "/api/v1/sandboxes/agent",
        "/api/v1/templates",
        "/api/v1/sandboxes/agent/invokes",
        "/api/v1/sandboxes/agent/files/?path=/workspace",
        "/api/v1/audit/events?limit=1000",
    ] {
        let (status, _) = call(cp.admin(Method::GET, path)).await;
        assert_eq!(status, 200, "{path}");
    }

    // Rotation: the very next invoke gets the new values (env and file), no restart; a
    // restart keeps them.
    for (name, value) in [("openai", ROTATED), ("gcp", ROTATED_FILE)] {
        let (status, _) = call(
            cp.req(
                Method::PUT,
                &format!("/api/v1/credentials/{name}"),
                Some(TEAM_A_KEY),
            )
            .json(&json!({"value": value})),
        )
        .await;
        assert_eq!(status, 204);
    }
    let out = stdout_of(&cp, "agent").await;
    assert_eq!(out[..2], [sha(ROTATED), sha(ROTATED_FILE)]);
    for action in ["/stop", "/resume"] {
        let (status, body) = call(cp.sb(Method::POST, "agent", action)).await;
        assert_eq!(status, 200, "{body}");
    }
    let out = stdout_of(&cp, "agent").await;
    assert_eq!(out[..2], [sha(ROTATED), sha(ROTATED_FILE)]);
    // Deleting one: the next invoke no longer has it (a start would now fail, naming it).
    let (status, _) = call(cp.req(
        Method::DELETE,
        "/api/v1/credentials/openai",
        Some(TEAM_A_KEY),
    ))
    .await;
    assert_eq!(status, 204);
    let out = stdout_of(&cp, "agent").await;
    assert_eq!(out[..2], [sha(""), sha(ROTATED_FILE)]);
    let (status, _) = call(cp.req(
        Method::DELETE,
        "/api/v1/credentials/openai",
        Some(TEAM_A_KEY),
    ))
    .await;
    assert_eq!(status, 404);

    // Every change is audited, by name.
    let audit = env.audit_log();
    assert!(audit.contains(r#""namespace":"team-a","action":"credentials.put","outcome":"ok","status":200,"detail":"openai""#), "{audit}");
    assert!(
        audit.contains(
            r#""action":"credentials.delete","outcome":"denied","status":403,"detail":"openai""#
        ),
        "{audit}"
    );
    assert!(
        audit.contains(r#""action":"credentials.delete","outcome":"ok""#),
        "{audit}"
    );

    // The bytes of no value anywhere: response bodies, the control plane's log, and every file
    // of the state directory but the store and the sandboxes' own credentials directories.
    let log = std::fs::read(&log_path).unwrap();
    assert!(!log.is_empty(), "the control plane logged nothing at debug");
    let mut all = Vec::new();
    let credentials_store = env.state.join("credentials");
    files(
        &env.state,
        &|p: &Path| {
            p == credentials_store
                || p.file_name().is_some_and(|n| n == "credentials")
                    && p.parent().and_then(Path::parent) == Some(&env.state.join("sandboxes"))
        },
        &mut all,
    );
    assert!(all.iter().any(|(p, _)| p.ends_with("runner.log")));
    assert!(all.iter().any(|(p, _)| p.ends_with("audit.log")));
    all.push((
        "response bodies".into(),
        BODIES.with(|b| b.borrow().clone()),
    ));
    all.push(("control plane log".into(), log));
    for secret in [
        SECRET_ENV,
        SECRET_FILE,
        "gcp-3f8a1d6c9e2b4f70a5d8c1e6b9f2a4d7",
        ROTATED,
        "gcp-rotated-7c2e9a4f1b8d3e6a",
    ] {
        for (path, bytes) in &all {
            assert!(!contains(bytes, secret), "{secret:?} is in {path}");
        }
    }
    // The store itself is the owner's only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(credentials_store.join("team-a/gcp"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test]
async fn credentials_without_isolation() {
    credentials_reach_the_agent_and_nothing_else("none").await;
}

#[tokio::test]
async fn credentials_in_isolated_sandboxes() {
    credentials_reach_the_agent_and_nothing_else("namespaces").await;
}
