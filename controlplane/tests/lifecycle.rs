//! Sandboxes only while they are used: `idleTimeout` stops an unused sandbox and the next
//! request resumes it transparently; `timeout` ends a lifetime (stop or delete); clone copies a
//! sandbox's workspace and configuration. The real control plane and runners over HTTP.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{assert_error, eventually, exit_event, rebuild, send, Cp, Env};
use reqwest::Method;
use serde_json::{json, Value};

/// Sweeps often, so that a 2 s idle timeout shows within a fraction of a second.
const FAST: &[&str] = &["--lifecycle-interval", "100ms"];

async fn create(cp: &Cp, body: Value) -> Value {
    let (status, got) = send(cp.admin(Method::POST, "/api/v1/sandboxes").json(&body)).await;
    assert_eq!(status, 201, "create {body}: {got}");
    got
}

async fn get(cp: &Cp, name: &str) -> (u16, Value) {
    send(cp.sb(Method::GET, name, "")).await
}

async fn put_file(cp: &Cp, name: &str, path: &str, content: &str) {
    let resp = cp
        .sb(Method::PUT, name, &format!("/files/{path}"))
        .body(content.to_owned())
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{:?}", resp.text().await);
}

async fn get_file(cp: &Cp, name: &str, path: &str) -> String {
    let resp = cp
        .sb(Method::GET, name, &format!("/files/{path}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    resp.text().await.unwrap()
}

/// Invokes and answers (exit code, stdout).
async fn invoke(cp: &Cp, name: &str, stdin: &str) -> (i64, String) {
    let events = cp.invoke(name, stdin.to_owned()).await;
    let exit = exit_event(&events);
    (
        exit["exitCode"].as_i64().unwrap(),
        String::from_utf8(rebuild(&events, "stdout")).unwrap(),
    )
}

/// Waits until the sandbox reads as `status` (and returns it).
async fn wait_status(cp: &Cp, name: &str, status: &str, within: Duration) -> Value {
    match eventually(within, || async {
        let (_, got) = get(cp, name).await;
        (got["status"] == status).then_some(got)
    })
    .await
    {
        Some(got) => got,
        None => panic!("{name} never became {status}: {:?}", get(cp, name).await),
    }
}

/// What `sh -c script` prints in a terminal opened through the control plane, once it exits.
async fn terminal_output(cp: &Cp, name: &str, script: &str) -> String {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let argv = serde_json::to_string(&json!(["sh", "-c", script])).unwrap();
    let url = format!(
        "ws://{}/api/v1/sandboxes/{name}/terminal?argv={}",
        cp.addr,
        argv.bytes()
            .map(|b| if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            })
            .collect::<String>()
    );
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("x-api-key", common::ADMIN_KEY.parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .unwrap_or_else(|e| panic!("terminal of {name}: {e}"));
    let mut out = Vec::new();
    let read = async {
        while let Some(Ok(m)) = ws.next().await {
            match m {
                Message::Binary(b) => out.extend_from_slice(&b),
                Message::Text(t) if t.contains("\"exit\"") => break,
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the terminal's command did not end");
    String::from_utf8_lossy(&out).trim().to_owned()
}

#[tokio::test]
async fn an_idle_sandbox_stops_and_the_next_invoke_resumes_it() {
    let env = Env::new();
    let cp = env.start_with("none", FAST);
    let created = create(&cp, json!({"name": "sleepy", "idleTimeout": "2s"})).await;
    assert_eq!(created["idleTimeout"], "2s", "{created}");
    assert!(created.get("stopReason").is_none(), "{created}");
    cp.configure_sh(
        "sleepy",
        r#"read x; if [ "$x" = nap ]; then sleep 3; fi; cat "$HOME/note"; echo " $x""#,
    )
    .await;
    put_file(&cp, "sleepy", "workspace/note", "kept").await;
    assert_eq!(
        invoke(&cp, "sleepy", "one\n").await,
        (0, "kept one\n".into())
    );

    // An invoke that runs longer than the idle timeout is use: it finishes.
    let (code, out) = invoke(&cp, "sleepy", "nap\n").await;
    assert_eq!((code, out.as_str()), (0, "kept nap\n"));
    let (_, got) = get(&cp, "sleepy").await;
    assert_eq!(
        got["status"], "Running",
        "stopped while an invoke ran: {got}"
    );

    // Unused for 2 s: stopped, workspace kept, the reason shown.
    let quiet = Instant::now();
    let pid = env.record("sleepy")["pid"].as_i64().unwrap() as i32;
    let stopped = wait_status(&cp, "sleepy", "Stopped", Duration::from_secs(15)).await;
    let after = quiet.elapsed();
    assert!(
        after >= Duration::from_millis(1900),
        "stopped after {after:?}"
    );
    assert_eq!(stopped["stopReason"], "idle", "{stopped}");
    assert!(
        eventually(Duration::from_secs(5), || async {
            (!common::alive(pid)).then_some(())
        })
        .await
        .is_some(),
        "the runner still runs"
    );
    assert!(env.workspace("sleepy").join("note").is_file());
    let (_, list) = send(cp.admin(Method::GET, "/api/v1/sandboxes?status=stopped")).await;
    assert_eq!(list["sandboxes"][0]["stopReason"], "idle", "{list}");

    // The next invoke is served, not refused: same workspace, exact output.
    let woke = Instant::now();
    assert_eq!(
        invoke(&cp, "sleepy", "two\n").await,
        (0, "kept two\n".into())
    );
    eprintln!("resume on demand + invoke: {:?}", woke.elapsed());
    let (_, got) = get(&cp, "sleepy").await;
    assert_eq!(got["status"], "Running", "{got}");
    assert!(got.get("stopReason").is_none(), "{got}");
    assert_ne!(env.record("sleepy")["pid"].as_i64().unwrap() as i32, pid);

    // A file request wakes it too.
    wait_status(&cp, "sleepy", "Stopped", Duration::from_secs(15)).await;
    assert_eq!(get_file(&cp, "sleepy", "workspace/note").await, "kept");

    // And a terminal: the WebSocket opens on the woken sandbox (never a 409).
    wait_status(&cp, "sleepy", "Stopped", Duration::from_secs(15)).await;
    assert_eq!(
        terminal_output(&cp, "sleepy", "cat \"$HOME/note\"").await,
        "kept"
    );
    let (_, got) = get(&cp, "sleepy").await;
    assert_eq!(got["status"], "Running", "{got}");

    // A sandbox a user stopped stays stopped: 409, and `stopReason: user`.
    let (status, got) = send(cp.sb(Method::POST, "sleepy", "/stop")).await;
    assert_eq!((status, &got["stopReason"]), (200, &json!("user")), "{got}");
    let (status, got) = send(cp.sb(Method::POST, "sleepy", "/invoke").body("x\n")).await;
    assert_eq!(status, 409, "{got}");
    assert_error(&got, "sandbox_not_running");

    // Without an idle timeout nothing stops.
    create(&cp, json!({"name": "awake"})).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_, got) = get(&cp, "awake").await;
    assert_eq!(got["status"], "Running", "{got}");
}

#[tokio::test]
async fn a_lifetime_ends_with_a_stop_or_a_delete() {
    let env = Env::new();
    let templates = env.root.join("templates.json");
    std::fs::write(
        &templates,
        json!({"templates": [
            {"name": "brief", "timeout": "2s", "onTimeout": "delete"},
            {"name": "lazy", "idleTimeout": "1h"},
        ]})
        .to_string(),
    )
    .unwrap();
    let mut args: Vec<&str> = FAST.to_vec();
    let path = templates.display().to_string();
    args.extend(["--templates-file", &path]);
    let cp = env.start_with("none", &args);

    // Bad durations are refused before anything starts.
    for (field, value) in [
        ("timeout", "5"),
        ("timeout", "-1s"),
        ("idleTimeout", "500ms"),
        ("idleTimeout", "soon"),
    ] {
        let (status, got) = send(
            cp.admin(Method::POST, "/api/v1/sandboxes")
                .json(&json!({"name": "bad", field: value})),
        )
        .await;
        assert_eq!(status, 400, "{field} {value}: {got}");
        assert_error(&got, "invalid_request");
    }
    assert_eq!(get(&cp, "bad").await.0, 404);

    // The template's default and the request's own value.
    let lazy = create(
        &cp,
        json!({"name": "lazy", "templateRef": {"name": "lazy"}}),
    )
    .await;
    assert_eq!(lazy["idleTimeout"], "1h", "{lazy}");
    let lazy = create(
        &cp,
        json!({"name": "lazy2", "templateRef": {"name": "lazy"}, "idleTimeout": "90s"}),
    )
    .await;
    assert_eq!(lazy["idleTimeout"], "90s", "{lazy}");

    // Lifetime end, default: stopped, workspace kept, not resumed by a request.
    let started = Instant::now();
    let short = create(&cp, json!({"name": "short", "timeout": "2s"})).await;
    assert!(short["expiresAt"].is_string(), "{short}");
    let stopped = wait_status(&cp, "short", "Stopped", Duration::from_secs(15)).await;
    assert!(started.elapsed() >= Duration::from_millis(1900));
    assert_eq!(stopped["stopReason"], "timeout", "{stopped}");
    assert!(env.workspace("short").is_dir());
    let (status, got) = send(cp.sb(Method::GET, "short", "/files/")).await;
    assert_eq!(status, 409, "{got}");
    // An explicit resume starts a new lifetime.
    let (status, got) = send(cp.sb(Method::POST, "short", "/resume")).await;
    assert_eq!((status, &got["status"]), (200, &json!("Running")), "{got}");
    assert!(got.get("stopReason").is_none(), "{got}");
    wait_status(&cp, "short", "Stopped", Duration::from_secs(15)).await;

    // A lifetime also ends while the sandbox sleeps: then a request no longer wakes it.
    create(
        &cp,
        json!({"name": "nap", "timeout": "5s", "idleTimeout": "1s"}),
    )
    .await;
    let asleep = wait_status(&cp, "nap", "Stopped", Duration::from_secs(15)).await;
    assert_eq!(asleep["stopReason"], "idle", "{asleep}");
    let ended = eventually(Duration::from_secs(15), || async {
        let (_, got) = get(&cp, "nap").await;
        (got["stopReason"] == "timeout").then_some(got)
    })
    .await;
    assert!(ended.is_some(), "{:?}", get(&cp, "nap").await);
    let (status, got) = send(cp.sb(Method::GET, "nap", "/files/")).await;
    assert_eq!(status, 409, "{got}");

    // Lifetime end of a template that says delete: gone.
    create(
        &cp,
        json!({"name": "gone", "templateRef": {"name": "brief"}}),
    )
    .await;
    let deleted = eventually(Duration::from_secs(15), || async {
        (get(&cp, "gone").await.0 == 404).then_some(())
    })
    .await;
    assert!(deleted.is_some(), "never deleted");
    assert!(!env.sandbox_dir("gone").exists());
    assert!(
        env.audit_log().contains("\"expire\""),
        "{}",
        env.audit_log()
    );
}

#[tokio::test]
async fn a_clone_has_the_workspace_and_configuration_then_diverges() {
    let env = Env::new();
    let cp = env.start_with("namespaces", &[]);
    create(&cp, json!({"name": "src", "timeout": "1h"})).await;
    let configuration = json!({
        "installCommand": ["sh", "-c", "echo installed >> /workspace/installs.log"],
        "entrypoint": ["sh", "-c", "cat /workspace/note"],
    });
    let (first, _) = cp.configure("src", configuration.clone()).await;
    put_file(&cp, "src", "workspace/note", "one").await;
    put_file(&cp, "src", "workspace/deep/a/b/c.txt", "nested").await;
    assert_eq!(invoke(&cp, "src", "").await, (0, "one".into()));
    let (_, src_invokes) = send(cp.sb(Method::GET, "src", "/invokes")).await;
    let src_invoke = src_invokes["invokes"][0]["invokeId"].clone();
    assert!(src_invoke.is_string(), "{src_invokes}");

    // Links stay links (never followed out of the workspace); FIFOs are left out.
    let (status, out) = send(
        cp.sb(Method::POST, "src", "/exec")
            .json(&json!({"argv": ["sh", "-c", "ln -s /etc/passwd link && mkfifo fifo"]})),
    )
    .await;
    assert_eq!((status, out["exitCode"].clone()), (200, json!(0)), "{out}");
    let (status, clone) = send(
        cp.sb(Method::POST, "src", "/clone")
            .json(&json!({"name": "dst"})),
    )
    .await;
    assert_eq!(status, 202, "{clone}");
    assert_eq!(clone["name"], "dst");
    assert_eq!(clone["sandboxId"], "dst");
    assert_eq!(clone["namespace"], "default");
    assert_eq!(clone["status"], "Running");
    assert_eq!(clone["clonedFrom"], "src");
    assert_eq!(clone["timeout"], "1h");
    assert!(clone["isolated"].as_bool().unwrap(), "{clone}");

    // Equal: the files and the configuration (an invoke works without a configure; the same
    // configure skips the install).
    assert_eq!(invoke(&cp, "dst", "").await, (0, "one".into()));
    assert_eq!(
        get_file(&cp, "dst", "workspace/deep/a/b/c.txt").await,
        "nested"
    );
    let (again, _) = cp.configure("dst", configuration).await;
    assert_eq!(again["skipped"], true, "{again}");
    assert_eq!(again["installCommandHash"], first["installCommandHash"]);
    assert_eq!(
        get_file(&cp, "dst", "workspace/installs.log").await,
        "installed\n"
    );
    let dst_ws = env.workspace("dst");
    assert_eq!(
        std::fs::read_link(dst_ws.join("link")).unwrap(),
        std::path::Path::new("/etc/passwd")
    );
    assert!(!dst_ws.join("fifo").exists());
    // Not the source's invokes.
    let (_, dst_invokes) = send(cp.sb(Method::GET, "dst", "/invokes")).await;
    assert!(
        dst_invokes["invokes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["invokeId"] != src_invoke),
        "{dst_invokes}"
    );
    // Its own uid, owning its files.
    let (src_uid, dst_uid) = (
        env.record("src")["hostUid"].clone(),
        env.record("dst")["hostUid"].clone(),
    );
    if src_uid.is_u64() {
        assert_ne!(src_uid, dst_uid);
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(env.workspace("dst").join("deep/a/b/c.txt")).unwrap();
        assert_eq!(Some(u64::from(meta.uid())), dst_uid.as_u64());
    }

    // Then they diverge.
    put_file(&cp, "dst", "workspace/note", "two").await;
    assert_eq!(invoke(&cp, "dst", "").await, (0, "two".into()));
    assert_eq!(invoke(&cp, "src", "").await, (0, "one".into()));

    // A stopped source clones too; a name is made up when none is given.
    send(cp.sb(Method::POST, "src", "/stop")).await;
    let (status, auto) = send(cp.sb(Method::POST, "src", "/clone")).await;
    assert_eq!(status, 202, "{auto}");
    let auto_name = auto["name"].as_str().unwrap().to_owned();
    assert!(auto_name.starts_with("src-clone-"), "{auto}");
    assert_eq!(invoke(&cp, &auto_name, "").await, (0, "one".into()));

    // Errors.
    let (status, got) = send(
        cp.sb(Method::POST, "src", "/clone")
            .json(&json!({"name": "dst"})),
    )
    .await;
    assert_eq!(status, 409, "{got}");
    assert_error(&got, "already_exists");
    let (status, got) = send(cp.sb(Method::POST, "nope", "/clone").json(&json!({}))).await;
    assert_eq!(status, 404, "{got}");
    assert_error(&got, "sandbox_not_found");
    let (status, got) = send(
        cp.sb(Method::POST, "src", "/clone")
            .json(&json!({"name": "Bad_Name"})),
    )
    .await;
    assert_eq!(status, 400, "{got}");
    assert_error(&got, "invalid_request");
    let (status, got) = send(cp.sb(Method::POST, "src", "/clone").body("{nope")).await;
    assert_eq!(status, 400, "{got}");
    // Not visible to a caller of another namespace.
    let (status, got) = send(
        cp.req(
            Method::POST,
            "/api/v1/sandboxes/src/clone",
            Some(common::TEAM_A_KEY),
        )
        .json(&json!({"name": "theirs"})),
    )
    .await;
    assert_eq!(status, 404, "{got}");
    assert!(!env.sandbox_dir("theirs").exists());
}

/// Many requests wake one sleeping sandbox at once, on two replicas: one runner starts, all are
/// served; a delete racing them leaves no runner behind.
#[tokio::test]
async fn concurrent_wakers_start_one_runner_and_a_racing_delete_leaks_none() {
    let env = Env::new();
    let cp = env.start_with("none", FAST);
    let other = env.start_with("none", FAST);
    for name in ["crowd", "doomed"] {
        create(&cp, json!({"name": name, "idleTimeout": "1s"})).await;
    }
    for name in ["crowd", "doomed"] {
        wait_status(&cp, name, "Stopped", Duration::from_secs(15)).await;
    }
    let exec = |cp: &Cp, name: &str| {
        cp.sb(Method::POST, name, "/exec")
            .json(&json!({"argv": ["sh", "-c", "echo $PPID"]}))
    };
    let wakers: Vec<_> = (0..16)
        .map(|i| send(exec(if i % 2 == 0 { &cp } else { &other }, "crowd")))
        .collect();
    let answers = futures_util::future::join_all(wakers).await;
    for (status, body) in &answers {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(body["exitCode"], 0, "{body}");
    }
    // Every exec ran under the one runner the record names.
    let runner = env.record("crowd")["pid"].as_i64().unwrap();
    let parents: std::collections::BTreeSet<String> = answers
        .iter()
        .map(|(_, b)| b["stdout"].as_str().unwrap().trim().to_owned())
        .collect();
    assert_eq!(
        parents.len(),
        1,
        "execs ran under several runners: {parents:?}"
    );
    assert_eq!(parents.first().unwrap(), &runner.to_string());

    let mut racers: Vec<_> = (0..8).map(|_| send(exec(&other, "doomed"))).collect();
    racers.push(send(cp.sb(Method::DELETE, "doomed", "")));
    for (status, body) in futures_util::future::join_all(racers).await {
        // Served, or gone; a request already on its way to the runner the delete stops may
        // see it go (502), or find it stopped by the delete before it is gone (409); never a
        // 500.
        assert!([200, 404, 409, 502].contains(&status), "{status} {body}");
    }
    assert_eq!(get(&cp, "doomed").await.0, 404);
    assert!(!env.sandbox_dir("doomed").exists());
    // The delete ran while (or before) they woke it: no runner of it survives.
    cp.delete("crowd").await;
    let left = env.wait_no_tagged(&[cp.pid(), other.pid()], Duration::from_secs(15));
    assert!(left.is_empty(), "processes left: {left:?}");
}

async fn pool_status(cp: &Cp) -> Value {
    let (status, got) = send(cp.admin(Method::GET, "/api/v1/warmpool/status")).await;
    assert_eq!(status, 200, "{got}");
    got["pools"][0].clone()
}

async fn wait_pool_ready(cp: &Cp, ready: u64) -> Value {
    match eventually(Duration::from_secs(60), || async {
        let pool = pool_status(cp).await;
        (pool["ready"] == ready).then_some(pool)
    })
    .await
    {
        Some(pool) => pool,
        None => panic!(
            "the pool never had {ready} ready: {}",
            pool_status(cp).await
        ),
    }
}

/// The runner pids of the pooled (unclaimed) sandboxes, from their records.
fn pool_pids(env: &Env) -> Vec<i32> {
    let mut out: Vec<i32> = std::fs::read_dir(env.state.join("sandboxes"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".pool-"))
        .filter(|e| !e.path().join("claimed").exists())
        .filter_map(|e| {
            let record: Value =
                serde_json::from_slice(&std::fs::read(e.path().join("sandbox.json")).ok()?).ok()?;
            record["pid"].as_i64().map(|p| p as i32)
        })
        .collect();
    out.sort_unstable();
    out
}

#[tokio::test]
async fn a_warm_pool_serves_creates_and_refills_and_hands_nothing_out_twice() {
    let env = Env::new();
    let templates = env.root.join("templates.json");
    std::fs::write(
        &templates,
        json!({"templates": [{"name": "warm", "warmPool": {"size": 4}}]}).to_string(),
    )
    .unwrap();
    let path = templates.display().to_string();
    let cp = env.start_with("none", &["--templates-file", &path]);
    let pool = wait_pool_ready(&cp, 4).await;
    assert_eq!(
        (pool["template"].clone(), pool["size"].clone()),
        (json!("warm"), json!(4))
    );
    // Invisible.
    let (_, list) = send(cp.admin(Method::GET, "/api/v1/sandboxes")).await;
    assert_eq!(list["sandboxes"], json!([]), "{list}");

    // A claim: running at once, with the request's name and namespace.
    let first = create(
        &cp,
        json!({"name": "first", "namespace": "team-a", "templateRef": {"name": "warm"}}),
    )
    .await;
    assert_eq!(first["fromWarmPool"], true, "{first}");
    assert_eq!(first["status"], "Running");
    assert_eq!(first["namespace"], "team-a");
    put_file(&cp, "first", "workspace/secret", "tenant one").await;
    let (status, got) = send(
        cp.sb(Method::POST, "first", "/exec")
            .json(&json!({"argv": ["cat", "secret"]})),
    )
    .await;
    assert_eq!(
        (status, got["stdout"].clone()),
        (200, json!("tenant one")),
        "{got}"
    );
    cp.delete("first").await;

    // 50 creates at once: every one served, no pooled sandbox handed out twice.
    wait_pool_ready(&cp, 4).await;
    let creates: Vec<_> = (0..50)
        .map(|i| {
            send(
                cp.admin(Method::POST, "/api/v1/sandboxes")
                    .json(&json!({"name": format!("c{i}"), "templateRef": {"name": "warm"}})),
            )
        })
        .collect();
    let answers = futures_util::future::join_all(creates).await;
    let mut warm = 0;
    for (status, body) in &answers {
        assert_eq!(*status, 201, "{body}");
        warm += usize::from(body["fromWarmPool"] == true);
        assert!(body["fromWarmPool"].is_boolean(), "{body}");
    }
    assert!(warm >= 4, "only {warm} of 50 from the pool");
    let mut pids: Vec<i64> = (0..50)
        .map(|i| env.record(&format!("c{i}"))["pid"].as_i64().unwrap())
        .collect();
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), 50, "a runner serves two sandboxes");
    // None carries an earlier tenant's data; each is its own.
    for i in [0usize, 17, 49] {
        let name = format!("c{i}");
        let (status, got) = send(
            cp.sb(Method::POST, &name, "/exec")
                .json(&json!({"argv": ["ls", "-A"]})),
        )
        .await;
        assert_eq!(status, 200, "{got}");
        assert!(!got["stdout"].as_str().unwrap().contains("secret"), "{got}");
    }
    let (_, list) = send(cp.admin(Method::GET, "/api/v1/sandboxes")).await;
    assert_eq!(list["sandboxes"].as_array().unwrap().len(), 50, "{list}");
    let pool = wait_pool_ready(&cp, 4).await;
    assert_eq!(
        pool["hits"].as_u64().unwrap() + pool["misses"].as_u64().unwrap(),
        51,
        "{pool}"
    );
    assert_eq!(pool["hits"].as_u64().unwrap() as usize, warm + 1, "{pool}");

    // Deleted, nothing of them is left but the pool's own runners.
    for i in 0..50 {
        cp.delete(&format!("c{i}")).await;
    }
    let pooled = pool_pids(&env);
    assert_eq!(pooled.len(), 4, "{pooled:?}");
    let mut except = pooled.clone();
    except.push(cp.pid());
    let left = env.wait_no_tagged(&except, Duration::from_secs(15));
    assert!(left.is_empty(), "processes left: {left:?}");
    let dirs: Vec<String> = std::fs::read_dir(env.state.join("sandboxes"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with(".pool"))
        .collect();
    assert!(dirs.is_empty(), "{dirs:?}");

    // A control plane whose templates no longer ask for the pool empties it.
    drop(cp);
    std::fs::write(
        &templates,
        json!({"templates": [{"name": "warm"}]}).to_string(),
    )
    .unwrap();
    let cp = env.start_with("none", &["--templates-file", &path]);
    let emptied = eventually(Duration::from_secs(15), || async {
        pooled.iter().all(|p| !common::alive(*p)).then_some(())
    })
    .await;
    assert!(emptied.is_some(), "pooled runners left: {pooled:?}");
    assert!(pool_pids(&env).is_empty());
    let (_, status) = send(cp.admin(Method::GET, "/api/v1/warmpool/status")).await;
    assert_eq!(status["pools"], json!([]), "{status}");
}

/// Under the default isolation: a claimed sandbox works, stops, resumes and is deleted with
/// its pooled directory.
#[tokio::test]
async fn an_isolated_pooled_sandbox_lives_like_any_other() {
    let env = Env::new();
    let templates = env.root.join("templates.json");
    std::fs::write(
        &templates,
        json!({"templates": [{"name": "warm", "warmPool": {"size": 1, "maxAge": "1h"}}]})
            .to_string(),
    )
    .unwrap();
    let path = templates.display().to_string();
    let cp = env.start_with("namespaces", &["--templates-file", &path]);
    wait_pool_ready(&cp, 1).await;
    let got = create(&cp, json!({"name": "iso", "templateRef": {"name": "warm"}})).await;
    assert_eq!(got["fromWarmPool"], true, "{got}");
    assert!(got["isolated"].as_bool().unwrap(), "{got}");
    put_file(&cp, "iso", "workspace/note", "mine").await;
    let exec = || {
        cp.sb(Method::POST, "iso", "/exec")
            .json(&json!({"argv": ["cat", "note"]}))
    };
    let (status, out) = send(exec()).await;
    assert_eq!(
        (status, out["stdout"].clone()),
        (200, json!("mine")),
        "{out}"
    );
    let (status, _) = send(cp.sb(Method::POST, "iso", "/stop")).await;
    assert_eq!(status, 200);
    let (status, got) = send(cp.sb(Method::POST, "iso", "/resume")).await;
    assert_eq!((status, &got["status"]), (200, &json!("Running")), "{got}");
    let (status, out) = send(exec()).await;
    assert_eq!(
        (status, out["stdout"].clone()),
        (200, json!("mine")),
        "{out}"
    );
    wait_pool_ready(&cp, 1).await;
    let real = std::fs::canonicalize(env.sandbox_dir("iso")).unwrap();
    cp.delete("iso").await;
    assert!(!real.exists(), "{real:?} is left");
    assert!(std::fs::symlink_metadata(env.sandbox_dir("iso")).is_err());
}
