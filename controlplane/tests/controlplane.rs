//! End-to-end tests of the control plane: the real `agentbox-controlplane` binary, real HTTP,
//! real local `agentbox-runner` sandboxes (plain processes, and flows in Linux namespaces).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{
    assert_error, eventually, exit_event, invoke_id, parse_sse, read_to_end, read_until, rebuild,
    send, start_time, to_json, Env, ADMIN_KEY, DEFAULT_KEYS, TEAM_A_KEY, WRONG_KEY,
};
use reqwest::Method;
use serde_json::{json, Value};

/// A templates file with `one`: agent mode, one invoke at a time.
fn templates_file(env: &Env) -> String {
    let path = env.root.join("templates.json");
    std::fs::write(
        &path,
        json!({"templates": [{"name": "one", "mode": "agent", "maxConcurrentInvokes": 1}]})
            .to_string(),
    )
    .unwrap();
    path.display().to_string()
}

fn stdout_text(events: &[common::Event]) -> String {
    String::from_utf8(rebuild(events, "stdout")).unwrap()
}

#[tokio::test]
async fn full_flow() {
    let env = Env::new();
    let cp = env.start();

    // Create.
    let created = cp.create("flow", "default").await;
    assert_eq!(created["sandboxId"], "flow", "{created}");
    assert_eq!(created["name"], "flow");
    assert_eq!(created["namespace"], "default");
    assert_eq!(created["status"], "Running");
    assert_eq!(created["mode"], "agent");
    let (status, got) = send(cp.sb(Method::GET, "flow", "")).await;
    assert_eq!((status, &got["status"]), (200, &json!("Running")), "{got}");
    let (_, list) = send(cp.admin(Method::GET, "/api/v1/sandboxes")).await;
    assert!(
        list["sandboxes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "flow"),
        "{list}"
    );
    let runner_pid = env.record("flow")["pid"].as_i64().unwrap() as i32;
    assert!(common::alive(runner_pid));

    // Configure: files, an install command and the entrypoint; then the same again is skipped.
    let configuration = json!({
        "files": [
            {"path": "prompt.txt", "content": "hello from configure\n"},
            {"path": "bin/tool.sh", "content": "#!/bin/sh\necho tool\n", "mode": "0755"},
        ],
        "installCommand": ["sh", "-c", "echo installing; cp prompt.txt installed.txt"],
        "entrypoint": ["cat"],
    });
    let (result, events) = cp.configure("flow", configuration.clone()).await;
    assert_eq!(result["skipped"], false, "{result}");
    assert_eq!(result["installExitCode"], 0, "{result}");
    assert_eq!(result["entrypoint"], json!(["cat"]));
    assert!(
        result["installCommandHash"]
            .as_str()
            .is_some_and(|h| h.len() == 64),
        "{result}"
    );
    assert!(
        events
            .iter()
            .any(|e| e.event == "log" && e.data["data"] == "installing"),
        "the install's output is streamed: {events:?}"
    );
    let (again, _) = cp.configure("flow", configuration).await;
    assert_eq!(again["skipped"], true, "{again}");
    assert_eq!(again["installCommandHash"], result["installCommandHash"]);

    // Invoke: exact bytes through stdin → cat → stdout, non-UTF-8 included.
    let stdin: Vec<u8> =
        b"line one\n\xff\xfe\x00 not utf-8 \xc3\n\nlast line without newline".to_vec();
    let resp = cp
        .sb(Method::POST, "flow", "/invoke")
        .body(stdin.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let events = parse_sse(&resp.bytes().await.unwrap());
    assert_eq!(events[0].event, "start", "{events:?}");
    assert_eq!(rebuild(&events, "stdout"), stdin, "{events:?}");
    assert!(
        events.iter().any(|e| e.data["dataBase64"].is_string()),
        "non-UTF-8 lines travel as dataBase64: {events:?}"
    );
    let exit = exit_event(&events);
    assert_eq!(exit["reason"], "completed");
    assert_eq!(exit["exitCode"], 0);

    // Files: PUT, GET, list.
    let notes: Vec<u8> = b"notes \xf0\x9f\x93\x9d\nbinary \x00\xff\n".to_vec();
    let (status, written) = send(
        cp.sb(Method::PUT, "flow", "/files/workspace/notes.txt")
            .body(notes.clone()),
    )
    .await;
    assert_eq!(status, 201, "{written}");
    assert_eq!(written["path"], "/workspace/notes.txt");
    assert_eq!(written["size"], notes.len());
    let resp = cp
        .sb(Method::GET, "flow", "/files/workspace/notes.txt")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), notes.as_slice());
    let (status, installed) =
        send(cp.sb(Method::GET, "flow", "/files/workspace/installed.txt")).await;
    assert_eq!(
        (status, installed),
        (200, json!("hello from configure\n")),
        "the install command ran in the workspace"
    );
    let (status, listing) = send(cp.sb(Method::GET, "flow", "/files/?path=/workspace")).await;
    assert_eq!(status, 200, "{listing}");
    let entries = listing["entries"].as_array().unwrap();
    let entry = |name: &str| {
        entries
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("{name} not listed in {listing}"))
            .clone()
    };
    let n = entry("notes.txt");
    assert_eq!(n["size"], notes.len(), "{n}");
    assert_eq!(n["isDir"], false, "{n}");
    assert!(
        n["mode"].as_str().is_some_and(|m| m.starts_with("-rw")),
        "{n}"
    );
    assert!(n["modifiedAt"].is_u64(), "{n}");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(n["modifiedAt"].as_u64().unwrap().abs_diff(now) < 600, "{n}");
    let b = entry("bin");
    assert_eq!(b["isDir"], true, "{b}");
    assert!(
        b["mode"].as_str().is_some_and(|m| m.starts_with('d')),
        "{b}"
    );
    assert!(
        !entries.iter().any(|e| e["name"] == ".agentbox"),
        "the runner's state is not listed: {listing}"
    );

    // Stop: Stopped, invokes refused, the runner gone.
    let (status, stopped) = send(cp.sb(Method::POST, "flow", "/stop")).await;
    assert_eq!(
        (status, &stopped["status"]),
        (200, &json!("Stopped")),
        "{stopped}"
    );
    let (_, got) = send(cp.sb(Method::GET, "flow", "")).await;
    assert_eq!(got["status"], "Stopped", "{got}");
    let (status, body) = send(cp.sb(Method::POST, "flow", "/invoke").body("x")).await;
    assert_eq!(status, 409, "{body}");
    assert_error(&body, "sandbox_not_running");
    assert!(!common::alive(runner_pid), "stop ends the runner");
    assert_eq!(
        env.wait_no_tagged(&[cp.pid()], Duration::from_secs(5)),
        Vec::<i32>::new(),
        "processes left after stop"
    );

    // Resume: the workspace and the configuration are intact.
    let (status, resumed) = send(cp.sb(Method::POST, "flow", "/resume")).await;
    assert_eq!(
        (status, &resumed["status"]),
        (200, &json!("Running")),
        "{resumed}"
    );
    let resp = cp
        .sb(Method::GET, "flow", "/files/workspace/notes.txt")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), notes.as_slice());
    let events = cp.invoke("flow", stdin.clone()).await;
    assert_eq!(rebuild(&events, "stdout"), stdin, "no reconfigure needed");
    assert_eq!(exit_event(&events)["reason"], "completed");
    let new_pid = env.record("flow")["pid"].as_i64().unwrap() as i32;
    assert!(common::alive(new_pid));

    // Delete: gone from the API, from disk, and from the process table.
    let (status, deleted) = send(cp.sb(Method::DELETE, "flow", "")).await;
    assert_eq!(status, 200, "{deleted}");
    let (status, body) = send(cp.sb(Method::GET, "flow", "")).await;
    assert_eq!(status, 404, "{body}");
    assert_error(&body, "sandbox_not_found");
    assert!(
        !env.sandbox_dir("flow").exists(),
        "the sandbox's directory is removed"
    );
    assert!(!common::alive(new_pid), "delete ends the runner");
    assert_eq!(
        env.wait_no_tagged(&[cp.pid()], Duration::from_secs(5)),
        Vec::<i32>::new(),
        "processes left after delete"
    );
}

#[tokio::test]
async fn last_activity_is_read_off_the_runners_state() {
    let env = Env::new();
    let cp = env.start();
    cp.sandbox_sh("busy", "echo hi").await;
    // As if nothing had happened in the sandbox since 2020.
    let state = env.workspace("busy").join(".agentbox");
    let dirs = [state.clone(), state.join("invokes"), state.join("sessions")];
    assert!(dirs.iter().all(|d| d.is_dir()), "{dirs:?}");
    // And the file the control plane stamps when it proxies a request.
    let stamp = env.sandbox_dir("busy").join("activity");
    assert!(stamp.is_file());
    let touched = std::process::Command::new("touch")
        .args(["-d", "2020-01-01T00:00:00Z"])
        .args(&dirs)
        .arg(&stamp)
        .status()
        .unwrap();
    assert!(touched.success());
    let activity = |v: &Value| v["lastActivityAt"].as_str().map(str::to_owned);
    let (status, got) = send(cp.sb(Method::GET, "busy", "")).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(
        activity(&got).as_deref(),
        Some("2020-01-01T00:00:00.000Z"),
        "{got}"
    );

    let sent = SystemTime::now();
    cp.invoke("busy", "").await;
    let (_, got) = send(cp.sb(Method::GET, "busy", "")).await;
    let at = humantime::parse_rfc3339(&activity(&got).unwrap()).unwrap();
    // File times come from the kernel's coarse clock, which may trail by a tick.
    let tick = Duration::from_millis(50);
    assert!(
        at + tick >= sent && at <= SystemTime::now() + tick,
        "lastActivityAt {got} not at the invoke"
    );
    let (_, list) = send(cp.admin(Method::GET, "/api/v1/sandboxes")).await;
    let listed = list["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "busy")
        .cloned()
        .unwrap();
    assert_eq!(activity(&listed), activity(&got), "{list}");
}

#[tokio::test]
async fn cancel_through_a_second_replica() {
    let env = Env::new();
    let a = env.start();
    // The second replica on a multi-threaded runtime (the first has the default one thread).
    let b = env.start_with("none", &["--worker-threads", "2"]);
    a.create("long", "default").await;
    a.configure_sh("long", "echo ready; exec sleep 1000").await;

    let mut resp = a.sb(Method::POST, "long", "/invoke").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut buf = Vec::new();
    let events = read_until(&mut resp, &mut buf, |e| e.event == "log").await;
    let iid = invoke_id(&events);
    assert!(
        events.iter().any(|e| e.data["data"] == "ready"),
        "{events:?}"
    );

    // Replica B knows nothing of the invoke but reaches the same runner.
    let (status, body) = send(b.sb(Method::GET, "long", &format!("/invokes/{iid}"))).await;
    assert_eq!((status, &body["state"]), (200, &json!("running")), "{body}");
    let (status, body) = send(b.sb(Method::POST, "long", &format!("/invokes/{iid}/cancel"))).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["invokeId"], iid.as_str());
    assert_eq!(body["status"], "canceling");

    let events = read_to_end(&mut resp, &mut buf).await;
    let exit = exit_event(&events);
    assert_eq!(exit["reason"], "canceled", "{exit}");
    assert_eq!(exit["invokeId"], iid.as_str());

    let (status, list) = send(b.sb(Method::GET, "long", "/invokes")).await;
    assert_eq!(status, 200, "{list}");
    let listed = list["invokes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["invokeId"] == iid.as_str())
        .unwrap_or_else(|| panic!("{iid} not listed: {list}"))
        .clone();
    assert_eq!(listed["state"], "exited", "{listed}");
    assert_eq!(listed["reason"], "canceled", "{listed}");

    // The journal replays through B as well.
    let resp = b
        .sb(Method::GET, "long", &format!("/invokes/{iid}/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let replay = parse_sse(&resp.bytes().await.unwrap());
    assert_eq!(stdout_text(&replay), "ready\n");
    assert_eq!(exit_event(&replay)["reason"], "canceled");

    let (status, body) = send(
        b.sb(Method::POST, "long", "/invoke/cancel")
            .json(&json!({"invokeId": "inv-000000000000-0000000000000000"})),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert_error(&body, "invoke_not_found");

    a.delete("long").await;
}

/// Every route of the control plane: the sandbox ones carry `{s}` (the sandbox) and `{iid}`.
const ROUTES: &[(&str, &str, bool)] = &[
    ("GET", "/api/v1/user/me", false),
    ("GET", "/api/v1/templates", false),
    ("GET", "/api/v1/templates/default", false),
    ("GET", "/api/v1/sandboxes", false),
    ("POST", "/api/v1/sandboxes", false),
    ("GET", "/api/v1/sandboxes/{s}", true),
    ("DELETE", "/api/v1/sandboxes/{s}", true),
    ("POST", "/api/v1/sandboxes/{s}/stop", true),
    ("POST", "/api/v1/sandboxes/{s}/resume", true),
    ("POST", "/api/v1/sandboxes/{s}/configure", true),
    ("POST", "/api/v1/sandboxes/{s}/invoke", true),
    ("POST", "/api/v1/sandboxes/{s}/invoke/cancel", true),
    ("GET", "/api/v1/sandboxes/{s}/invokes", true),
    ("GET", "/api/v1/sandboxes/{s}/invokes/{iid}", true),
    ("GET", "/api/v1/sandboxes/{s}/invokes/{iid}/events", true),
    ("POST", "/api/v1/sandboxes/{s}/invokes/{iid}/cancel", true),
    ("POST", "/api/v1/sandboxes/{s}/exec", true),
    ("GET", "/api/v1/sandboxes/{s}/files/?path=/workspace", true),
    (
        "GET",
        "/api/v1/sandboxes/{s}/files/workspace/notes.txt",
        true,
    ),
    (
        "PUT",
        "/api/v1/sandboxes/{s}/files/workspace/notes.txt",
        true,
    ),
    (
        "DELETE",
        "/api/v1/sandboxes/{s}/files/workspace/notes.txt",
        true,
    ),
    ("GET", "/api/v1/sandboxes/{s}/archive", true),
];

/// A plausible body for a route, so that only authentication can stop it.
fn route_body(method: &str, path: &str, iid: &str) -> Vec<u8> {
    let body = if path.ends_with("/api/v1/sandboxes") && method == "POST" {
        json!({"name": "made-by-stranger", "namespace": "default"})
    } else if path.ends_with("/configure") {
        json!({"entrypoint": ["sh", "-c", "echo pwned"]})
    } else if path.ends_with("/invoke/cancel") {
        json!({"invokeId": iid})
    } else if path.ends_with("/exec") {
        json!({"command": "echo pwned > pwned.txt"})
    } else if method == "PUT" {
        return b"overwritten".to_vec();
    } else if path.ends_with("/invoke") {
        return b"stdin".to_vec();
    } else {
        return Vec::new();
    };
    body.to_string().into_bytes()
}

#[tokio::test]
async fn auth_matrix() {
    let env = Env::new();
    let cp = env.start();
    cp.sandbox_sh("mine", "cat").await;
    let events = cp.invoke("mine", "hi").await;
    let iid = invoke_id(&events);
    let (status, _) = send(
        cp.sb(Method::PUT, "mine", "/files/workspace/notes.txt")
            .body("original"),
    )
    .await;
    assert_eq!(status, 201);

    for (method, template, sandbox_route) in ROUTES {
        let path = template.replace("{s}", "mine").replace("{iid}", &iid);
        let method: Method = method.parse().unwrap();
        let body = route_body(method.as_str(), &path, &iid);
        let what = format!("{method} {path}");

        // No credential, a wrong key (both headers), an empty key: 401 with a JSON error.
        let attempts = [
            ("none", cp.client.request(method.clone(), cp.url(&path))),
            (
                "wrong X-API-Key",
                cp.req(method.clone(), &path, Some(WRONG_KEY)),
            ),
            (
                "wrong Bearer",
                cp.client
                    .request(method.clone(), cp.url(&path))
                    .bearer_auth(WRONG_KEY),
            ),
            (
                "Basic instead of Bearer",
                cp.client
                    .request(method.clone(), cp.url(&path))
                    .header("authorization", format!("Basic {ADMIN_KEY}")),
            ),
        ];
        for (how, rb) in attempts {
            let resp = rb.body(body.clone()).send().await.unwrap();
            assert_eq!(resp.status(), 401, "{what} with {how}");
            assert!(
                resp.headers().contains_key("www-authenticate"),
                "{what} with {how}: no WWW-Authenticate"
            );
            assert!(
                resp.headers()["content-type"]
                    .to_str()
                    .unwrap()
                    .starts_with("application/json"),
                "{what} with {how}"
            );
            let body = to_json(&resp.bytes().await.unwrap());
            assert_error(&body, "unauthorized");
        }

        // A key of another namespace: the sandbox does not exist for it.
        let (status, got) = send(cp.req(method.clone(), &path, Some(TEAM_A_KEY)).body(body)).await;
        if *sandbox_route {
            assert_eq!(status, 404, "{what} as team-a: {got}");
            assert_error(&got, "sandbox_not_found");
        } else if method == Method::POST {
            assert_eq!(status, 403, "{what} as team-a: {got}");
            assert_error(&got, "forbidden");
        } else {
            assert_eq!(status, 200, "{what} as team-a: {got}");
        }
        if path == "/api/v1/sandboxes" && method == Method::GET {
            assert_eq!(got, json!({"sandboxes": []}), "team-a sees no sandbox");
        }
        if path == "/api/v1/user/me" {
            assert_eq!(got["sub"], "a", "{got}");
            assert_eq!(got["isAdmin"], false, "{got}");
            assert_eq!(got["namespaces"], json!(["team-a"]), "{got}");
        }

        // And the administrator reaches every read-only route (so the paths above are real).
        if method == Method::GET {
            let (status, got) = send(cp.admin(method.clone(), &path)).await;
            assert_eq!(status, 200, "{what} as admin: {got}");
        }
    }

    // Bearer works as well as X-API-Key for a good key.
    let (status, me) = send(
        cp.client
            .get(cp.url("/api/v1/user/me"))
            .bearer_auth(ADMIN_KEY),
    )
    .await;
    assert_eq!(
        (status, &me["sub"], &me["isAdmin"]),
        (200, &json!("admin"), &json!(true))
    );

    // None of the refused requests changed anything.
    let (_, got) = send(cp.sb(Method::GET, "mine", "")).await;
    assert_eq!(got["status"], "Running", "{got}");
    let resp = cp
        .sb(Method::GET, "mine", "/files/workspace/notes.txt")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.bytes().await.unwrap().as_ref(), b"original");
    assert!(!env.workspace("mine").join("pwned.txt").exists());
    let (status, _) = send(cp.sb(Method::GET, "made-by-stranger", "")).await;
    assert_eq!(status, 404);
    let events = cp.invoke("mine", "still cat").await;
    assert_eq!(
        stdout_text(&events),
        "still cat",
        "the entrypoint is unchanged"
    );

    // team-a's own sandbox: visible to team-a (and the admin), not to a third namespace.
    let (status, body) = send(
        cp.req(Method::POST, "/api/v1/sandboxes", Some(TEAM_A_KEY))
            .json(&json!({"name": "theirs"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["namespace"], "team-a", "the caller's first namespace");
    let (_, list) = send(cp.req(Method::GET, "/api/v1/sandboxes", Some(TEAM_A_KEY))).await;
    let names: Vec<&str> = list["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["theirs"], "{list}");
    let (_, list) = send(cp.admin(Method::GET, "/api/v1/sandboxes?namespace=team-a")).await;
    assert_eq!(list["sandboxes"].as_array().unwrap().len(), 1, "{list}");

    cp.delete("mine").await;
    let (status, _) =
        send(cp.req(Method::DELETE, "/api/v1/sandboxes/theirs", Some(TEAM_A_KEY))).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn runner_never_sees_the_callers_key() {
    let env = Env::new();
    let cp = env.start();
    cp.create("envy", "default").await;
    cp.configure("envy", json!({"entrypoint": ["env"]})).await;
    let record = env.record("envy");
    let token = record["token"].as_str().unwrap().to_owned();
    for key in [ADMIN_KEY, TEAM_A_KEY] {
        assert!(
            !token.contains(key) && !key.contains(&token) && token != common::sha256_hex(key),
            "the runner token is derived from a caller's key"
        );
    }

    for header in ["x-api-key", "authorization"] {
        let value = if header == "authorization" {
            format!("Bearer {ADMIN_KEY}")
        } else {
            ADMIN_KEY.to_owned()
        };
        let resp = cp
            .client
            .post(cp.url("/api/v1/sandboxes/envy/invoke"))
            .header(header, value)
            .header("cookie", format!("session={TEAM_A_KEY}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let text = stdout_text(&parse_sse(&resp.bytes().await.unwrap()));
        assert!(
            text.contains("AGENTBOX_SANDBOX=envy\n"),
            "the environment was printed: {text}"
        );
        // Nothing of the control plane's own environment is passed on, even unisolated.
        assert!(
            !text.contains(common::TAG_VAR),
            "the control plane's environment reached the sandbox: {text}"
        );
        for secret in [ADMIN_KEY, TEAM_A_KEY, token.as_str()] {
            assert!(
                !text.contains(secret),
                "a secret reached the sandbox's environment via {header}: {text}"
            );
        }
    }

    // The runner does not accept the caller's key; it accepts only its own token.
    let addr = record["addr"].as_str().unwrap();
    let resp = cp
        .client
        .get(format!("http://{addr}/v1/info"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = cp
        .client
        .get(format!("http://{addr}/v1/info"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // What exactly reaches a runner: a spy runner, registered like a local sandbox, records the
    // proxied requests' heads.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let spy_addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen_by_spy = std::sync::Arc::clone(&seen);
    // The spy speaks HTTP/2 with prior knowledge, as runners do to the control plane.
    tokio::spawn(async move {
        use http_body_util::BodyExt;
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let seen_by_spy = std::sync::Arc::clone(&seen_by_spy);
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let seen_by_spy = std::sync::Arc::clone(&seen_by_spy);
                    async move {
                        let mut text = format!("{} {} HTTP/2\r\n", req.method(), req.uri());
                        for (name, value) in req.headers() {
                            text.push_str(&format!(
                                "{name}: {}\r\n",
                                String::from_utf8_lossy(value.as_bytes())
                            ));
                        }
                        text.push_str("\r\n");
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        text.push_str(&String::from_utf8_lossy(&body));
                        seen_by_spy.lock().unwrap().push(text);
                        let response = hyper::Response::builder()
                            .header("content-type", "application/json")
                            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
                            .unwrap();
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(sock), service),
            );
        }
    });
    // A process of our own stands in for the runner's pid (so the sandbox reads as Running).
    let mut stand_in = std::process::Command::new("sleep");
    std::os::unix::process::CommandExt::process_group(&mut stand_in, 0);
    let mut stand_in = stand_in.arg("600").spawn().unwrap();
    let stand_in_pid = stand_in.id() as i32;
    let mut spy = record.clone();
    spy["name"] = json!("spy");
    spy["addr"] = json!(spy_addr.to_string());
    spy["pid"] = json!(stand_in_pid);
    spy["pidStarted"] = json!(start_time(stand_in_pid).unwrap());
    spy["token"] = json!("spy-runner-token-42");
    std::fs::create_dir_all(env.workspace("spy")).unwrap();
    std::fs::write(
        env.sandbox_dir("spy").join("sandbox.json"),
        serde_json::to_vec(&spy).unwrap(),
    )
    .unwrap();

    const CALLER_TRACE: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let requests = [
        cp.client
            .get(cp.url("/api/v1/sandboxes/spy/files/workspace/x.txt"))
            .header("x-api-key", ADMIN_KEY)
            .header("authorization", format!("Bearer {ADMIN_KEY}")),
        cp.client
            .post(cp.url("/api/v1/sandboxes/spy/exec"))
            .bearer_auth(ADMIN_KEY)
            .header("cookie", format!("token={ADMIN_KEY}"))
            .header("proxy-authorization", format!("Bearer {TEAM_A_KEY}"))
            .json(&json!({"command": "true"})),
        cp.client
            .post(cp.url("/api/v1/sandboxes/spy/invoke"))
            .bearer_auth(ADMIN_KEY)
            .header("accept", "application/json")
            .header("traceparent", CALLER_TRACE),
        cp.client
            .post(cp.url("/api/v1/sandboxes/spy/invoke"))
            .bearer_auth(ADMIN_KEY)
            .header("accept", "application/json"),
    ];
    for rb in requests {
        let (status, body) = send(rb).await;
        assert_eq!(status, 200, "through to the spy: {body}");
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 4, "{seen:?}");
    for request in &seen {
        let lower = request.to_ascii_lowercase();
        assert!(
            lower.contains("authorization: bearer spy-runner-token-42\r\n"),
            "the runner gets its own token: {request}"
        );
        assert_eq!(lower.matches("authorization:").count(), 1, "{request}");
        for secret in [ADMIN_KEY, TEAM_A_KEY] {
            assert!(
                !request.contains(secret),
                "a caller's key reached the runner: {request}"
            );
        }
        assert!(!lower.contains("x-api-key"), "{request}");
        assert!(!lower.contains("cookie:"), "{request}");
    }
    assert!(
        seen[0].starts_with("GET http://")
            && seen[0].contains("/v1/files/workspace/x.txt HTTP/2\r\n"),
        "{}",
        seen[0]
    );
    assert!(
        seen[1].starts_with("POST http://") && seen[1].contains("/v1/exec HTTP/2\r\n"),
        "{}",
        seen[1]
    );
    assert!(
        seen[1].ends_with(r#"{"command":"true"}"#),
        "the body passes: {}",
        seen[1]
    );
    // No spans are exported here: an invoke's `traceparent` from the caller passes untouched,
    // and none is made up for an invoke without one.
    assert!(
        seen[2].contains(&format!("traceparent: {CALLER_TRACE}\r\n")),
        "{}",
        seen[2]
    );
    assert!(!seen[3].contains("traceparent"), "{}", seen[3]);

    // Deleting the spy ends its stand-in process group.
    cp.delete("spy").await;
    let status = stand_in.wait().unwrap();
    assert!(!status.success(), "the stand-in was signalled: {status:?}");
    cp.delete("envy").await;
}

#[tokio::test]
async fn checks_in_order() {
    let env = Env::new();
    let templates = templates_file(&env);
    let cp = env.start_with("none", &["--templates-file", &templates]);

    // 401 before 404: an unknown sandbox without a credential.
    let (status, body) = send(cp.req(Method::POST, "/api/v1/sandboxes/ghost/invoke", None)).await;
    assert_eq!(status, 401, "{body}");
    // 404 for an unknown sandbox, on lifecycle and proxied routes alike.
    for (method, rest) in [
        (Method::GET, ""),
        (Method::POST, "/stop"),
        (Method::POST, "/invoke"),
        (Method::GET, "/files/?path=/workspace"),
    ] {
        let (status, body) = send(cp.sb(method.clone(), "ghost", rest)).await;
        assert_eq!(status, 404, "{method} {rest}: {body}");
        assert_error(&body, "sandbox_not_found");
    }

    // Bad create bodies.
    let bad_bodies = [
        (json!({"name": "Bad_Name"}), 400, "invalid_request"),
        (json!({"name": ""}), 400, "invalid_request"),
        (
            json!({"name": "ok-name", "namespace": "Bad NS"}),
            400,
            "invalid_request",
        ),
        (
            json!({"name": "ok-name", "templateRef": {"name": "nope"}}),
            404,
            "template_not_found",
        ),
        (
            json!({"name": "ok-name", "templateRef": {"name": "default", "kind": "Pod"}}),
            400,
            "invalid_request",
        ),
        (json!({"nom": "x"}), 400, "invalid_request"),
    ];
    for (body, want, code) in bad_bodies {
        let (status, got) = send(cp.admin(Method::POST, "/api/v1/sandboxes").json(&body)).await;
        assert_eq!(status, want, "{body} → {got}");
        assert_error(&got, code);
    }
    let (status, got) = send(
        cp.admin(Method::POST, "/api/v1/sandboxes")
            .header("content-type", "application/json")
            .body("{not json"),
    )
    .await;
    assert_eq!(status, 400, "{got}");
    assert_error(&got, "invalid_request");
    let (status, got) = send(
        cp.req(Method::POST, "/api/v1/sandboxes", Some(TEAM_A_KEY))
            .json(&json!({"name": "sneaky", "namespace": "default"})),
    )
    .await;
    assert_eq!(status, 403, "{got}");
    assert_error(&got, "forbidden");
    let (status, list) = send(cp.admin(Method::GET, "/api/v1/sandboxes")).await;
    assert_eq!(
        (status, list),
        (200, json!({"sandboxes": []})),
        "nothing was created"
    );
    let (status, got) = send(cp.admin(Method::GET, "/api/v1/templates/nope")).await;
    assert_eq!(status, 404);
    assert_error(&got, "template_not_found");

    // 409 already_exists.
    cp.create("agent", "default").await;
    let (status, got) = send(
        cp.admin(Method::POST, "/api/v1/sandboxes")
            .json(&json!({"name": "agent"})),
    )
    .await;
    assert_eq!(status, 409, "{got}");
    assert_error(&got, "already_exists");

    // 424 from the runner passes through: invoke before configure.
    let (status, got) = send(cp.sb(Method::POST, "agent", "/invoke").body("x")).await;
    assert_eq!(status, 424, "{got}");
    assert_error(&got, "not_configured");

    // Code mode: 400 wrong_mode for configure and invoke; exec and files work.
    let code = cp.create("coder", "code").await;
    assert_eq!(code["mode"], "code", "{code}");
    for rest in ["/configure", "/invoke"] {
        let (status, got) = send(
            cp.sb(Method::POST, "coder", rest)
                .json(&json!({"entrypoint": ["true"]})),
        )
        .await;
        assert_eq!(status, 400, "{rest}: {got}");
        assert_error(&got, "wrong_mode");
    }
    let (status, got) = send(
        cp.sb(Method::PUT, "coder", "/files/workspace/src/main.txt")
            .body("code file\n"),
    )
    .await;
    assert_eq!(status, 201, "{got}");
    let (status, got) = send(
        cp.sb(Method::POST, "coder", "/exec")
            .header("accept", "application/json")
            .json(&json!({"command": "cat src/main.txt; echo exec-ok"})),
    )
    .await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["stdout"], "code file\nexec-ok\n", "{got}");
    assert_eq!(got["exitCode"], 0, "{got}");

    // Stopped: 409 for everything proxied, but wrong_mode is still checked first.
    let (status, _) = send(cp.sb(Method::POST, "coder", "/stop")).await;
    assert_eq!(status, 200);
    let (status, got) = send(cp.sb(Method::POST, "coder", "/invoke")).await;
    assert_eq!(status, 400, "wrong mode before not running: {got}");
    assert_error(&got, "wrong_mode");
    let (status, got) = send(
        cp.sb(Method::POST, "coder", "/exec")
            .json(&json!({"command": "true"})),
    )
    .await;
    assert_eq!(status, 409, "{got}");
    assert_error(&got, "sandbox_not_running");
    let (status, got) = send(cp.sb(Method::GET, "coder", "/files/workspace/src/main.txt")).await;
    assert_eq!(status, 409, "{got}");
    assert_error(&got, "sandbox_not_running");

    // 429 from the runner passes through with Retry-After.
    cp.create("single", "one").await;
    cp.configure_sh("single", "echo started; exec sleep 1000")
        .await;
    let mut first = cp
        .sb(Method::POST, "single", "/invoke")
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let mut buf = Vec::new();
    let events = read_until(&mut first, &mut buf, |e| e.event == "log").await;
    let iid = invoke_id(&events);
    let second = cp
        .sb(Method::POST, "single", "/invoke")
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), 429);
    assert_eq!(
        second
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap()),
        Some("5")
    );
    let got = to_json(&second.bytes().await.unwrap());
    assert_error(&got, "concurrency_exceeded");
    assert_eq!(
        (got["limit"].as_u64(), got["inflight"].as_u64()),
        (Some(1), Some(1)),
        "{got}"
    );
    let (status, _) = send(
        cp.sb(Method::POST, "single", "/invoke/cancel")
            .json(&json!({"invokeId": iid})),
    )
    .await;
    assert_eq!(status, 202);
    let events = read_to_end(&mut first, &mut buf).await;
    assert_eq!(exit_event(&events)["reason"], "canceled");

    // Unknown sub-routes of a sandbox are 404 not_found (never passed to the runner).
    let (status, got) = send(cp.sb(Method::GET, "agent", "/info")).await;
    assert_eq!(status, 404, "{got}");
    assert_error(&got, "not_found");

    for name in ["agent", "coder", "single"] {
        cp.delete(name).await;
    }
}

#[tokio::test]
async fn proxy_does_not_buffer() {
    let env = Env::new();
    let cp = env.start();
    cp.create("stream", "default").await;
    cp.configure_sh(
        "stream",
        r#"read -r release; echo "t=$(date +%s%N)"; while [ ! -e "$release" ]; do sleep 0.01; done; echo done"#,
    )
    .await;

    let now_ns = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i128
    };
    // Through the control plane, then (for comparison) straight to the runner.
    let record = env.record("stream");
    let direct = format!("http://{}/v1/invoke", record["addr"].as_str().unwrap());
    let token = record["token"].as_str().unwrap().to_owned();
    let (mut via_cp, mut direct_ms) = (Vec::new(), Vec::new());
    for round in 0..6 {
        let route = if round % 2 == 0 {
            "control plane"
        } else {
            "runner"
        };
        let release = format!("release-{round}");
        let rb = if route == "runner" {
            cp.client.post(&direct).bearer_auth(&token)
        } else {
            cp.sb(Method::POST, "stream", "/invoke")
        };
        let mut resp = rb.body(format!("{release}\n")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        for (header, value) in [
            ("content-type", "text/event-stream"),
            ("x-accel-buffering", "no"),
            ("cache-control", "no-cache"),
        ] {
            assert_eq!(
                resp.headers().get(header).map(|v| v.to_str().unwrap()),
                Some(value),
                "{header} through the {route}"
            );
        }
        let mut buf = Vec::new();
        let events = read_until(&mut resp, &mut buf, |e| e.event == "log").await;
        let arrived = now_ns();
        let line = events
            .iter()
            .find(|e| e.event == "log")
            .and_then(|e| e.data["data"].as_str())
            .unwrap()
            .to_owned();
        let written: i128 = line
            .strip_prefix("t=")
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("unexpected line {line:?}"));
        let delay_ms = (arrived - written) as f64 / 1e6;
        // The process is still running: it waits for the release file the test has not made.
        assert!(!events.iter().any(|e| e.event == "exit"), "{events:?}");
        let iid = invoke_id(&events);
        let (_, summary) = send(cp.sb(Method::GET, "stream", &format!("/invokes/{iid}"))).await;
        assert_eq!(summary["state"], "running", "{summary}");
        println!("first log line through the {route}: {delay_ms:.2} ms after the write");
        if route == "runner" {
            direct_ms.push(delay_ms);
        } else {
            via_cp.push(delay_ms);
        }

        std::fs::write(env.workspace("stream").join(&release), b"").unwrap();
        let events = read_to_end(&mut resp, &mut buf).await;
        assert_eq!(stdout_text(&events), format!("{line}\ndone\n"));
        assert_eq!(exit_event(&events)["reason"], "completed");
    }
    let worst = via_cp.iter().copied().fold(0.0, f64::max);
    assert!(
        worst < 500.0,
        "the first event took up to {worst:.1} ms through the control plane \
         ({via_cp:?} ms; straight from the runner: {direct_ms:?} ms)"
    );
    cp.delete("stream").await;
}

/// Runs the control plane to its exit (bounded); returns (code, stdout, stderr).
fn run_to_exit(env: &Env, args: &[&str]) -> (Option<i32>, String, String) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let child = env
        .command(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let Ok(output) = rx.recv_timeout(Duration::from_secs(20)) else {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        panic!("the control plane did not exit with {args:?}");
    };
    let output = output.unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn refuses_to_start_without_auth() {
    let env = Env::new();
    let state = env.state.display().to_string();
    let runner = common::runner_bin().display().to_string();
    let base = [
        "--state-dir",
        state.as_str(),
        "--runner-bin",
        runner.as_str(),
        "--isolation",
        "none",
    ];

    let mut args = vec!["--listen", "127.0.0.1:0"];
    args.extend(base);
    let (code, stdout, stderr) = run_to_exit(&env, &args);
    assert_eq!(code, Some(64), "stderr: {stderr}");
    assert_eq!(stdout, "", "nothing on stdout: no address was bound");
    assert!(stderr.contains("--api-keys-file"), "{stderr}");

    let mut args = vec!["--dev", "--listen", "0.0.0.0:0"];
    args.extend(base);
    let (code, stdout, stderr) = run_to_exit(&env, &args);
    assert_eq!(code, Some(64), "stderr: {stderr}");
    assert_eq!(stdout, "");
    assert!(stderr.contains("loopback"), "{stderr}");

    let mut args = vec!["--dev", "--listen", "127.0.0.1:0", "--worker-threads", "0"];
    args.extend(base);
    let (code, stdout, stderr) = run_to_exit(&env, &args);
    assert_eq!(code, Some(64), "stderr: {stderr}");
    assert_eq!(stdout, "");
    assert!(stderr.contains("--worker-threads"), "{stderr}");

    // A broken keys file is refused at start too.
    std::fs::write(
        env.root.join("broken.json"),
        "{\"keys\": [{\"name\": \"x\"}]}",
    )
    .unwrap();
    let broken = env.root.join("broken.json").display().to_string();
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--api-keys-file",
        broken.as_str(),
    ];
    args.extend(base);
    let (code, stdout, stderr) = run_to_exit(&env, &args);
    assert_eq!(code, Some(64), "stderr: {stderr}");
    assert_eq!(stdout, "");

    let mut args = vec!["--dev", "--listen", "127.0.0.1:0"];
    args.extend(base);
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let cp = env.spawn(&args);
    let (status, me) = send(cp.req(Method::GET, "/api/v1/user/me", None)).await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["isAdmin"], true, "{me}");
    let (status, _) = send(cp.req(Method::GET, "/api/v1/sandboxes", None)).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn restart_readopts() {
    let env = Env::new();
    let mut first = env.start();
    first.create("durable", "default").await;
    first
        .configure_sh("durable", "cat; echo \" (pid $$)\"")
        .await;
    let events = first.invoke("durable", "before").await;
    assert_eq!(exit_event(&events)["reason"], "completed");
    let pid = env.record("durable")["pid"].as_i64().unwrap() as i32;

    first.kill9();
    assert!(common::alive(pid), "the runner outlives its control plane");

    let second = env.start();
    let (status, list) = send(second.admin(Method::GET, "/api/v1/sandboxes")).await;
    assert_eq!(status, 200);
    let sandboxes = list["sandboxes"].as_array().unwrap();
    assert_eq!(sandboxes.len(), 1, "{list}");
    assert_eq!(sandboxes[0]["name"], "durable");
    assert_eq!(sandboxes[0]["status"], "Running", "{list}");
    assert_eq!(
        sandboxes[0]["podName"],
        format!("pid-{pid}"),
        "the same runner"
    );

    let events = second.invoke("durable", "after").await;
    let text = stdout_text(&events);
    assert!(text.starts_with("after (pid "), "{text}");
    assert_eq!(exit_event(&events)["reason"], "completed");
    let (_, invokes) = send(second.sb(Method::GET, "durable", "/invokes")).await;
    assert_eq!(invokes["invokes"].as_array().unwrap().len(), 2, "{invokes}");

    second.delete("durable").await;
    assert!(!common::alive(pid));
}

/// The value of one sample line of the Prometheus text, if present.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

#[tokio::test]
async fn metrics_and_audit() {
    let env = Env::new();
    let templates = templates_file(&env);
    let cp = env.start_with("none", &["--templates-file", &templates]);
    let stdin_canary = "stdin-canary-9d1e77c2";
    let argv_canary = "argv-canary-4b20a6f3";
    cp.create("metered", "one").await;
    cp.configure_sh(
        "metered",
        &format!(
            "read -r line; echo \"got $line\" >&2; if [ \"$line\" = hold ]; then \
             echo holding; exec sleep 1000; fi; echo {argv_canary} >/dev/null"
        ),
    )
    .await;

    for _ in 0..2 {
        let events = cp.invoke("metered", format!("{stdin_canary}\n")).await;
        assert_eq!(exit_event(&events)["reason"], "completed");
    }
    let mut held = cp
        .sb(Method::POST, "metered", "/invoke")
        .body("hold\n")
        .send()
        .await
        .unwrap();
    let mut buf = Vec::new();
    let events = read_until(&mut held, &mut buf, |e| e.data["data"] == "holding").await;
    let iid = invoke_id(&events);
    let (status, _) = send(
        cp.sb(Method::POST, "metered", "/invoke")
            .body(format!("{stdin_canary}\n")),
    )
    .await;
    assert_eq!(status, 429);
    let (status, _) = send(cp.sb(Method::POST, "metered", &format!("/invokes/{iid}/cancel"))).await;
    assert_eq!(status, 202);
    let events = read_to_end(&mut held, &mut buf).await;
    assert_eq!(exit_event(&events)["reason"], "canceled");
    drop(held);
    let (status, _) = send(
        cp.req(
            Method::POST,
            "/api/v1/sandboxes/metered/invoke",
            Some(WRONG_KEY),
        )
        .body(stdin_canary),
    )
    .await;
    assert_eq!(status, 401);

    // Metrics are recorded when a stream ends, which may be a moment after the client saw it.
    let expected = [
        (
            r#"agentbox_invoke_requests_total{template="one",outcome="ok"}"#,
            3.0,
        ),
        (
            r#"agentbox_invoke_requests_total{template="one",outcome="throttled"}"#,
            1.0,
        ),
        (r#"agentbox_invoke_throttled_total{template="one"}"#, 1.0),
        (
            r#"agentbox_configure_requests_total{template="one",outcome="ok"}"#,
            1.0,
        ),
        (
            r#"agentbox_invoke_duration_seconds_count{template="one",outcome="ok"}"#,
            3.0,
        ),
    ];
    let metrics = eventually(Duration::from_secs(5), || async {
        let text = cp.metrics().await;
        expected
            .iter()
            .all(|(series, n)| sample(&text, series) == Some(*n))
            .then_some(text)
    })
    .await;
    let Some(metrics) = metrics else {
        let text = cp.metrics().await;
        let got: Vec<_> = expected
            .iter()
            .map(|(s, want)| (s, want, sample(&text, s)))
            .collect();
        panic!("metrics never reached the expected values: {got:?}\n{text}");
    };
    assert!(
        metrics.contains("# TYPE agentbox_invoke_requests_total counter"),
        "{metrics}"
    );
    assert!(!metrics.contains("metered"), "no sandbox ids as labels");

    // The audit log: who did what to which sandbox, with what outcome; never payloads or keys.
    let audit = env.audit_log();
    let records: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    for r in &records {
        for field in ["time", "actor", "action", "outcome", "status"] {
            assert!(!r[field].is_null(), "{field} missing in {r}");
        }
    }
    let count = |action: &str, outcome: &str, status: u16| {
        records
            .iter()
            .filter(|r| {
                r["action"] == action
                    && r["outcome"] == outcome
                    && r["status"] == status
                    && (action == "authenticate"
                        || (r["actor"] == "admin"
                            && r["sandbox"] == "metered"
                            && r["namespace"] == "default"))
            })
            .count()
    };
    // (create answers 201; the audit records 200 for it: see audit_status_is_the_http_status)
    assert_eq!(
        count("create", "ok", 200) + count("create", "ok", 201),
        1,
        "{audit}"
    );
    assert_eq!(count("configure", "ok", 200), 1, "{audit}");
    assert_eq!(count("invoke", "ok", 200), 3, "{audit}");
    assert_eq!(count("invoke", "throttled", 429), 1, "{audit}");
    assert_eq!(count("invokes.cancel", "ok", 202), 1, "{audit}");
    assert_eq!(count("authenticate", "denied", 401), 1, "{audit}");
    for secret in [
        stdin_canary,
        argv_canary,
        "holding",
        ADMIN_KEY,
        TEAM_A_KEY,
        WRONG_KEY,
        env.record("metered")["token"].as_str().unwrap(),
    ] {
        assert!(
            !audit.contains(secret),
            "{secret:?} is in the audit log:\n{audit}"
        );
    }
    cp.delete("metered").await;
    assert!(env.audit_log().contains(r#""action":"delete""#));
}

#[tokio::test]
async fn api_key_file_reload() {
    let env = Env::new();
    let cp = env.start();
    let new_key = "cpt-new-key-b7c1d93e02f4a5";
    let me = |key: &'static str| send(cp.req(Method::GET, "/api/v1/user/me", Some(key)));

    assert_eq!(me(new_key).await.0, 401);
    assert_eq!(me(TEAM_A_KEY).await.0, 200);

    let mut keys = DEFAULT_KEYS.to_vec();
    keys.push(("b", new_key, &["team-b", "team-c"], false));
    env.write_keys(&keys);
    let (status, body) = me(new_key).await;
    assert_eq!(status, 200, "a new key works without a restart: {body}");
    assert_eq!(body["sub"], "b");
    assert_eq!(body["namespaces"], json!(["team-b", "team-c"]));
    let (status, body) = send(
        cp.req(Method::POST, "/api/v1/sandboxes", Some(new_key))
            .json(&json!({"name": "bee"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["namespace"], "team-b");

    // Remove `a`; `b` stays.
    env.write_keys(&[DEFAULT_KEYS[0], ("b", new_key, &["team-b"], false)]);
    let (status, body) = me(TEAM_A_KEY).await;
    assert_eq!(status, 401, "a removed key stops working: {body}");
    assert_error(&body, "unauthorized");
    let (status, body) = me(new_key).await;
    assert_eq!(
        (status, &body["namespaces"]),
        (200, &json!(["team-b"])),
        "{body}"
    );

    // A broken file keeps the last good keys.
    std::fs::write(&env.keys_file, "{broken").unwrap();
    assert_eq!(me(new_key).await.0, 200);
    assert_eq!(me(TEAM_A_KEY).await.0, 401);

    let (status, _) = send(cp.req(Method::DELETE, "/api/v1/sandboxes/bee", Some(new_key))).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn namespaces_flow() {
    let env = Env::new();
    let cp = env.start_with("namespaces", &[]);
    let created = cp.create("boxed", "default").await;
    assert_eq!(created["status"], "Running", "{created}");
    let state = env.state.display().to_string();
    cp.configure(
        "boxed",
        json!({
            "files": [{"path": "in.txt", "content": "from configure"}],
            "env": {"STATE": state},
            "entrypoint": ["sh", "-c",
                "cat; echo; echo \"pwd=$(pwd)\"; echo \"in=$(cat /workspace/in.txt)\"; \
                 if [ -e \"$STATE/sandboxes/boxed/sandbox.json\" ]; then echo record-visible; \
                 else echo record-hidden; fi; echo writable > /workspace/out.txt"],
        }),
    )
    .await;
    let events = cp.invoke("boxed", b"in\xffput".to_vec()).await;
    let mut want = b"in\xffput\n".to_vec();
    want.extend_from_slice(b"pwd=/workspace\nin=from configure\nrecord-hidden\n");
    assert_eq!(
        rebuild(&events, "stdout"),
        want,
        "{}",
        String::from_utf8_lossy(&rebuild(&events, "stdout"))
    );
    assert_eq!(exit_event(&events)["reason"], "completed");
    assert_eq!(
        std::fs::read_to_string(env.workspace("boxed").join("out.txt")).unwrap(),
        "writable\n",
        "the workspace is the host's directory"
    );
    let (status, _) = send(
        cp.sb(Method::PUT, "boxed", "/files/workspace/up.bin")
            .body(vec![0u8, 1, 2, 255]),
    )
    .await;
    assert_eq!(status, 201);
    let resp = cp
        .sb(Method::GET, "boxed", "/files/workspace/up.bin")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.bytes().await.unwrap().as_ref(), [0u8, 1, 2, 255]);

    let tagged = env.tagged_pids(&[cp.pid()]);
    assert!(
        tagged.iter().any(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.windows(9).any(|w| w == b"\0sandbox\0"))
        }),
        "the sandbox's launcher is found by the test's directory: {tagged:?}"
    );
    assert_eq!(created["isolated"], true, "{created}");
    drop(cp);
    assert_eq!(
        env.sweep(),
        Vec::<i32>::new(),
        "SIGTERM stops the isolated sandbox"
    );
    assert_eq!(env.tagged_pids(&[]), Vec::<i32>::new());
}

#[tokio::test]
async fn isolated_stop_and_delete_end_the_runner() {
    let env = Env::new();
    let cp = env.start_with("namespaces", &[]);
    cp.create("boxed", "default").await;
    assert!(!env.tagged_pids(&[cp.pid()]).is_empty());
    let (status, _) = send(cp.sb(Method::POST, "boxed", "/stop")).await;
    assert_eq!(status, 200);
    assert_eq!(
        env.wait_no_tagged(&[cp.pid()], Duration::from_secs(5)),
        Vec::<i32>::new(),
        "processes left after stop"
    );
    let (status, _) = send(cp.sb(Method::POST, "boxed", "/resume")).await;
    assert_eq!(status, 200);
    cp.delete("boxed").await;
    assert_eq!(
        env.wait_no_tagged(&[cp.pid()], Duration::from_secs(5)),
        Vec::<i32>::new(),
        "processes left after delete"
    );
}

#[tokio::test]
async fn healthz_and_metrics_need_no_credential() {
    let env = Env::new();
    let cp = env.start();
    let (status, body) = send(cp.req(Method::GET, "/healthz", None)).await;
    assert_eq!((status, body), (200, json!({"status": "ok"})));
    let resp = cp.client.get(cp.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let started = Instant::now();
    let (status, body) = send(cp.req(Method::GET, "/api/v1/nothing-here", Some(ADMIN_KEY))).await;
    assert_eq!(status, 404, "{body}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn audit_status_is_the_http_status() {
    let env = Env::new();
    let cp = env.start();
    cp.create("counted", "code").await;
    let audit = env.audit_log();
    let record: Value = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|r| r["action"] == "create")
        .unwrap_or_else(|| panic!("no create record: {audit}"));
    assert_eq!(record["status"], 201, "{record}");
    cp.delete("counted").await;
}

#[tokio::test]
async fn delete_ends_running_invokes() {
    let env = Env::new();
    let cp = env.start();
    cp.sandbox_sh("busy", "sleep 1000 & sleep 1000 & echo busy; wait")
        .await;
    let mut resp = cp.sb(Method::POST, "busy", "/invoke").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut buf = Vec::new();
    read_until(&mut resp, &mut buf, |e| e.event == "log").await;
    assert!(
        env.tagged_pids(&[cp.pid()]).len() >= 3,
        "runner, shell and sleeps run: {:?}",
        env.tagged_pids(&[cp.pid()])
    );

    cp.delete("busy").await;
    // The stream ends (with the runner's last words, or cut off); it does not hang.
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(chunk)) = resp.chunk().await {
            buf.extend_from_slice(&chunk);
        }
    })
    .await;
    assert!(ended.is_ok(), "the invoke stream outlived its sandbox");
    assert_eq!(
        env.wait_no_tagged(&[cp.pid()], Duration::from_secs(5)),
        Vec::<i32>::new(),
        "the invoke's processes outlived the deleted sandbox"
    );
    assert!(!env.sandbox_dir("busy").exists());
}

/// Issue 8: a runner killed mid-invoke gives the client a final `error` event and a clean end
/// of the stream (chunked terminator), never a hang or a reset; a stream that ended with its
/// `exit` passes unchanged.
#[tokio::test]
async fn a_runner_killed_mid_invoke_ends_the_stream_with_an_error_event() {
    let env = Env::new();
    let cp = env.start();
    cp.create("doomed", "default").await;
    // Prints, then waits for its runner (its parent) to go away, so nothing outlives the test.
    cp.configure_sh(
        "doomed",
        r#"echo started; while kill -0 $PPID 2>/dev/null; do sleep 0.05; done"#,
    )
    .await;
    let mut resp = cp
        .sb(Method::POST, "doomed", "/invoke")
        .body("")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut buf = Vec::new();
    let events = read_until(&mut resp, &mut buf, |e| e.event == "log").await;
    assert!(!events.iter().any(|e| e.event == "exit"), "{events:?}");
    let pid = env.record("doomed")["pid"].as_i64().unwrap() as i32;
    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let events = tokio::time::timeout(Duration::from_secs(15), read_to_end(&mut resp, &mut buf))
        .await
        .expect("the stream hung after its runner died");
    println!("stream ended {:?} after the kill", killed.elapsed());
    let last = events.last().unwrap();
    assert_eq!(last.event, "error", "{events:?}");
    assert_eq!(last.data["phase"], "proxy", "{last:?}");
    let message = last.data["message"].as_str().unwrap();
    assert!(message.contains("runner went away"), "{message}");
    assert!(!events.iter().any(|e| e.event == "exit"), "{events:?}");
    // No `id:` on the proxy's event: it must not take an id the runner may use later.
    let text = String::from_utf8(buf.clone()).unwrap();
    let tail = &text[text.rfind("\n\nevent: error").unwrap() + 2..];
    assert!(
        tail.starts_with("event: error\ndata: {") && tail.ends_with("}\n\n"),
        "{tail:?}"
    );
    assert_eq!(events.iter().filter(|e| e.event == "error").count(), 1);
    cp.delete("doomed").await;
}

/// A stream that ends with its `exit` gets nothing appended.
#[tokio::test]
async fn a_completed_stream_gets_no_error_event() {
    let env = Env::new();
    let cp = env.start();
    cp.sandbox_sh("calm", "cat").await;
    let mut resp = cp
        .sb(Method::POST, "calm", "/invoke")
        .body("hi\n")
        .send()
        .await
        .unwrap();
    let mut buf = Vec::new();
    let events = read_to_end(&mut resp, &mut buf).await;
    assert_eq!(events.last().unwrap().event, "exit", "{events:?}");
    assert!(!events.iter().any(|e| e.event == "error"), "{events:?}");
    assert!(buf.ends_with(b"\n\n"));
    // The journal replay of a finished invoke ends the same way.
    let iid = invoke_id(&events);
    let mut resp = cp
        .sb(Method::GET, "calm", &format!("/invokes/{iid}/events"))
        .send()
        .await
        .unwrap();
    let mut again = Vec::new();
    let replay = read_to_end(&mut resp, &mut again).await;
    assert_eq!(again, buf, "{replay:?}");
    cp.delete("calm").await;
}

/// Issue 7 through the proxy: a session, an invoke in it whose agent asks permission, the
/// answer, and the history as a JSON page and as SSE resumed with `Last-Event-ID`.
#[tokio::test]
async fn sessions_and_permissions_through_the_proxy() {
    let env = Env::new();
    let cp = env.start();
    cp.create("chat", "default").await;
    cp.configure(
        "chat",
        json!({
            "files": [{"path": "agent.py",
                "content": include_str!("../../runner/tests/agents/permission_agent.py")}],
            "entrypoint": ["python3", "agent.py"],
        }),
    )
    .await;
    let (code, created) = send(
        cp.sb(Method::POST, "chat", "/sessions")
            .json(&json!({"id": "s1"})),
    )
    .await;
    assert_eq!(code, 201, "{created}");
    assert_eq!(created["id"], "s1", "{created}");
    let (code, list) = send(cp.sb(Method::GET, "chat", "/sessions")).await;
    assert_eq!(code, 200, "{list}");
    assert!(list.to_string().contains("\"s1\""), "{list}");
    // The configured agents pass through too.
    let (code, agents) = send(cp.sb(Method::GET, "chat", "/agents")).await;
    assert_eq!(code, 200, "{agents}");
    assert_eq!(
        agents["items"],
        json!([{"name": "default", "entrypoint": ["python3", "agent.py"], "protocol": "plain", "default": true}])
    );

    // Unknown and malformed sessions are refused before anything runs.
    let (code, body) = send(
        cp.sb(Method::POST, "chat", "/invoke?session=nope")
            .body("x"),
    )
    .await;
    assert_eq!(code, 404, "{body}");
    assert_error(&body, "session_not_found");
    let (code, body) = send(
        cp.sb(Method::POST, "chat", "/invoke?session=.bad")
            .body("x"),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert_error(&body, "invalid_session_id");

    let mut resp = cp
        .sb(Method::POST, "chat", "/invoke?session=s1")
        .body("hello there")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut buf = Vec::new();
    let events = read_until(&mut resp, &mut buf, |e| e.event == "permission").await;
    let ask = events.iter().find(|e| e.event == "permission").unwrap();
    assert_eq!(ask.data["permissionId"], "write-1", "{ask:?}");
    assert_eq!(ask.data["toolKind"], "edit", "{ask:?}");
    let note = env
        .workspace("chat")
        .join(".agentbox/sessions/s1/files/note.txt");
    assert!(!note.exists(), "written before the answer");
    // The session runs one invoke at a time.
    let (code, body) = send(cp.sb(Method::POST, "chat", "/invoke?session=s1").body("x")).await;
    assert_eq!(code, 409, "{body}");
    assert_error(&body, "session_busy");

    let (code, body) = send(
        cp.sb(Method::POST, "chat", "/sessions/s1/permissions/write-1")
            .json(&json!({"reply": "once"})),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["reply"], "once", "{body}");
    assert_eq!(body["invokeId"], invoke_id(&events).as_str(), "{body}");
    let events = read_to_end(&mut resp, &mut buf).await;
    assert_eq!(exit_event(&events)["exitCode"], 0, "{events:?}");
    assert!(stdout_text(&events).contains("1: wrote"), "{events:?}");
    assert_eq!(std::fs::read_to_string(&note).unwrap(), "hello there\n");
    let answered = events
        .iter()
        .find(|e| e.event == "permission_reply")
        .unwrap();
    assert_eq!(
        answered.data,
        json!({"permissionId": "write-1", "reply": "once", "by": "client"})
    );

    // The history as JSON.
    let (code, page) = send(cp.sb(Method::GET, "chat", "/sessions/s1/events?limit=1000")).await;
    assert_eq!(code, 200, "{page}");
    let items = page["items"].as_array().unwrap().clone();
    assert_eq!(page["hasMore"], false, "{page}");
    let indexes: Vec<u64> = items
        .iter()
        .map(|e| e["eventIndex"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, (1..=items.len() as u64).collect::<Vec<_>>());
    let kinds: Vec<&str> = items.iter().map(|e| e["type"].as_str().unwrap()).collect();
    for kind in ["start", "agent", "permission", "permission_reply", "exit"] {
        assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
    }
    assert_eq!(kinds.last(), Some(&"exit"), "{kinds:?}");
    let last = items.len() as u64;

    // The history as SSE, resumed after an event id; it follows (stays open), so read to the
    // last event only.
    let from = 2;
    let mut follow = cp
        .sb(Method::GET, "chat", "/sessions/s1/events")
        .header("accept", "text/event-stream")
        .header("last-event-id", from.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(follow.status(), 200);
    assert_eq!(follow.headers()["content-type"], "text/event-stream");
    let mut fbuf = Vec::new();
    let seen = read_until(&mut follow, &mut fbuf, |e| e.id == last).await;
    assert_eq!(
        seen.iter().map(|e| e.id).collect::<Vec<_>>(),
        (from + 1..=last).collect::<Vec<_>>()
    );
    for (event, item) in seen.iter().zip(&items[from as usize..]) {
        assert_eq!(&event.data, item);
        assert_eq!(event.event, item["type"].as_str().unwrap());
    }
    drop(follow);

    let (code, body) = send(cp.sb(Method::DELETE, "chat", "/sessions/s1")).await;
    assert_eq!(code, 204, "{body}");
    let (code, body) = send(cp.sb(Method::GET, "chat", "/sessions/s1")).await;
    assert_eq!(code, 404, "{body}");
    assert_error(&body, "session_not_found");
    cp.delete("chat").await;
}

#[tokio::test]
async fn a_dead_runner_reads_as_error_and_resume_restarts_it() {
    let env = Env::new();
    let cp = env.start();
    cp.sandbox_sh("fragile", "cat").await;
    let pid = env.record("fragile")["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let status = eventually(Duration::from_secs(5), || async {
        let (_, got) = send(cp.sb(Method::GET, "fragile", "")).await;
        (got["status"] != "Running").then_some(got)
    })
    .await
    .expect("the sandbox still reads as Running after its runner died");
    assert_eq!(status["status"], "Error", "{status}");
    assert!(status["message"].is_string(), "{status}");
    let (code, body) = send(cp.sb(Method::POST, "fragile", "/invoke").body("x")).await;
    assert_eq!(code, 409, "{body}");
    assert_error(&body, "sandbox_not_running");

    let (code, body) = send(cp.sb(Method::POST, "fragile", "/resume")).await;
    assert_eq!((code, &body["status"]), (200, &json!("Running")), "{body}");
    let events = cp.invoke("fragile", "back\n").await;
    assert_eq!(stdout_text(&events), "back\n", "configuration kept");
    cp.delete("fragile").await;
}

/// A runner that refuses the control plane's token answers the caller 502
/// `runner_unauthorized`, not the runner's 401 (the caller's own key was fine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_refusing_the_token_is_a_502_not_a_401() {
    let env = Env::new();
    let cp = env.start();
    cp.sandbox_sh("rotated", "cat").await;
    let path = env.sandbox_dir("rotated").join("sandbox.json");
    let set_token = |token: &str| {
        let mut record = env.record("rotated");
        record["token"] = json!(token);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, record.to_string()).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    };
    let good = env.record("rotated")["token"].as_str().unwrap().to_owned();
    set_token("not-the-runners-token-0123456789");
    let (code, body) = send(cp.sb(Method::POST, "rotated", "/invoke").body("x")).await;
    assert_eq!(code, 502, "{body}");
    assert_error(&body, "runner_unauthorized");
    let (code, body) = send(cp.sb(Method::GET, "rotated", "/invokes")).await;
    assert_eq!(code, 502, "{body}");
    assert_error(&body, "runner_unauthorized");
    set_token(&good);
    let events = cp.invoke("rotated", "again\n").await;
    assert_eq!(stdout_text(&events), "again\n");
    cp.delete("rotated").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_is_served_without_auth_and_names_every_route() {
    let env = Env::new();
    let cp = env.start();
    let resp = cp
        .req(Method::GET, "/openapi.json", None)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let served: Value = resp.json().await.unwrap();
    let committed: Value = serde_json::from_str(include_str!("../openapi.json")).unwrap();
    assert_eq!(served, committed);
    let routes = [
        ("/healthz", "get"),
        ("/metrics", "get"),
        ("/openapi.json", "get"),
        ("/api/v1/user/me", "get"),
        ("/api/v1/templates", "get"),
        ("/api/v1/templates/{name}", "get"),
        ("/api/v1/sandboxes", "get"),
        ("/api/v1/sandboxes", "post"),
        ("/api/v1/sandboxes/{id}", "get"),
        ("/api/v1/sandboxes/{id}", "delete"),
        ("/api/v1/sandboxes/{id}/stop", "post"),
        ("/api/v1/sandboxes/{id}/resume", "post"),
        ("/api/v1/sandboxes/{id}/configure", "post"),
        ("/api/v1/sandboxes/{id}/invoke", "post"),
        ("/api/v1/sandboxes/{id}/invoke/cancel", "post"),
        ("/api/v1/sandboxes/{id}/invokes", "get"),
        ("/api/v1/sandboxes/{id}/invokes/{iid}", "get"),
        ("/api/v1/sandboxes/{id}/invokes/{iid}/events", "get"),
        ("/api/v1/sandboxes/{id}/invokes/{iid}/cancel", "post"),
        ("/api/v1/sandboxes/{id}/exec", "post"),
        ("/api/v1/sandboxes/{id}/files/", "get"),
        ("/api/v1/sandboxes/{id}/files/{path}", "get"),
        ("/api/v1/sandboxes/{id}/files/{path}", "put"),
        ("/api/v1/sandboxes/{id}/files/{path}", "delete"),
        ("/api/v1/sandboxes/{id}/archive", "get"),
    ];
    for (path, method) in routes {
        assert!(
            served["paths"][path][method].is_object(),
            "{method} {path} is not described"
        );
    }
    // Templates show env names, never values.
    let (status, templates) = send(cp.admin(Method::GET, "/api/v1/templates")).await;
    assert_eq!(status, 200);
    for t in templates["templates"].as_array().unwrap() {
        assert!(t["spec"]["env"].is_array(), "{t}");
    }
}
