//! The Docker backend's lifecycle on the real engine: idle stop and resume on demand,
//! lifetimes, clone, warm pools. The real `agentbox-controlplane` with `--backend docker`,
//! real containers from the images `scripts/images.sh` builds, HTTP to their runners.
//!
//! Like tests/docker.rs: fails without an engine or the images, skipped with
//! `AGENTBOX_SKIP_DOCKER_TESTS=1`; every test has its own scope and network and removes every
//! container, volume and network labelled with it at the end.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{assert_error, eventually, exit_event, rebuild, send, Cp, Env};
use reqwest::Method;
use serde_json::{json, Value};

const PYTHON_AGENT: &str = "agentbox/python-agent:latest";

use common::docker::quiet as docker_quiet;

fn docker_ready() -> bool {
    common::docker::ready(&[PYTHON_AGENT])
}

/// One test's scope; on drop everything labelled with it goes.
struct Scope {
    env: Env,
    scope: String,
    network: String,
}

impl Scope {
    fn new(templates: Value) -> Scope {
        let env = Env::new();
        let scope = common::docker::scope_name(&env, "l");
        let network = format!("agentbox-test-{scope}");
        std::fs::write(
            env.root.join("templates.json"),
            json!({ "templates": templates }).to_string(),
        )
        .unwrap();
        Scope {
            env,
            scope,
            network,
        }
    }

    fn start(&self) -> Cp {
        let templates = self.env.root.join("templates.json").display().to_string();
        self.env.start_with(
            "none",
            &[
                "--backend",
                "docker",
                "--docker-scope",
                &self.scope,
                "--docker-network",
                &self.network,
                "--docker-image",
                PYTHON_AGENT,
                "--templates-file",
                &templates,
                "--lifecycle-interval",
                "100ms",
            ],
        )
    }

    fn object(&self, sandbox: &str) -> String {
        format!("agentbox-{}-{sandbox}", self.scope)
    }

    /// Names of this scope's containers (all states).
    fn containers(&self) -> Vec<String> {
        let filter = format!("label=agentbox.dev/scope={}", self.scope);
        let out = docker_quiet(&["ps", "-a", "--format", "{{.Names}}", "--filter", &filter]);
        out.lines().map(str::to_owned).collect()
    }

    fn volumes(&self) -> Vec<String> {
        let filter = format!("label=agentbox.dev/scope={}", self.scope);
        let out = docker_quiet(&["volume", "ls", "-q", "--filter", &filter]);
        out.lines().map(str::to_owned).collect()
    }

    fn container_id(&self, object: &str) -> String {
        docker_quiet(&["inspect", "--format", "{{.Id}}", object])
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        common::docker::remove_scope(&self.scope, &self.network);
    }
}

async fn create(cp: &Cp, body: Value) -> Value {
    let (status, got) = send(cp.admin(Method::POST, "/api/v1/sandboxes").json(&body)).await;
    assert_eq!(status, 201, "create {body}: {got}");
    got
}

async fn get(cp: &Cp, name: &str) -> Value {
    send(cp.sb(Method::GET, name, "")).await.1
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

async fn get_file(cp: &Cp, name: &str, path: &str) -> (u16, String) {
    let resp = cp
        .sb(Method::GET, name, &format!("/files/{path}"))
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

async fn invoke(cp: &Cp, name: &str, stdin: &str) -> (i64, String) {
    let events = cp.invoke(name, stdin.to_owned()).await;
    let exit = exit_event(&events);
    (
        exit["exitCode"].as_i64().unwrap_or(-1),
        String::from_utf8(rebuild(&events, "stdout")).unwrap(),
    )
}

async fn exec(cp: &Cp, name: &str, script: &str) -> (u16, Value) {
    send(
        cp.sb(Method::POST, name, "/exec")
            .json(&json!({"argv": ["sh", "-c", script]})),
    )
    .await
}

async fn wait_for(cp: &Cp, name: &str, field: &str, value: &str, within: Duration) -> Value {
    match eventually(within, || async {
        let got = get(cp, name).await;
        (got[field] == value).then_some(got)
    })
    .await
    {
        Some(got) => got,
        None => panic!(
            "{name}: {field} never became {value}: {}",
            get(cp, name).await
        ),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_idle_stop_resumes_on_demand_and_lifetimes_end() {
    if !docker_ready() {
        return;
    }
    let scope = Scope::new(json!([
        {"name": "py", "image": PYTHON_AGENT},
        {"name": "brief", "image": PYTHON_AGENT, "timeout": "3s", "onTimeout": "delete"},
    ]));
    let cp = scope.start();
    let created = create(
        &cp,
        json!({"name": "sleepy", "templateRef": {"name": "py"}, "idleTimeout": "2s"}),
    )
    .await;
    assert_eq!(created["idleTimeout"], "2s", "{created}");
    cp.configure_sh(
        "sleepy",
        r#"read x; cat /workspace/note; echo " $x on $(cat /tmp/layer)""#,
    )
    .await;
    put_file(&cp, "sleepy", "workspace/note", "kept").await;
    // The container's own layer (not the workspace) survives an idle stop too.
    let (status, out) = exec(&cp, "sleepy", "echo same-container > /tmp/layer").await;
    assert_eq!((status, &out["exitCode"]), (200, &json!(0)), "{out}");
    assert_eq!(
        invoke(&cp, "sleepy", "one\n").await,
        (0, "kept one on same-container\n".into())
    );
    let id = scope.container_id(&scope.object("sleepy"));

    // Unused for 2 s: stopped, workspace kept, the reason shown; the container sleeps.
    let quiet = Instant::now();
    let stopped = wait_for(&cp, "sleepy", "status", "Stopped", Duration::from_secs(20)).await;
    assert!(quiet.elapsed() >= Duration::from_millis(1900));
    assert_eq!(stopped["stopReason"], "idle", "{stopped}");
    let asleep = format!("{}.idle", scope.object("sleepy"));
    assert_eq!(
        docker_quiet(&["inspect", "--format", "{{.State.Status}}", &asleep]),
        "exited"
    );
    let (_, list) = send(cp.admin(Method::GET, "/api/v1/sandboxes?status=stopped")).await;
    assert_eq!(list["sandboxes"][0]["stopReason"], "idle", "{list}");

    // The next invoke is served, not refused: same workspace and container, exact output.
    let woke = Instant::now();
    assert_eq!(
        invoke(&cp, "sleepy", "two\n").await,
        (0, "kept two on same-container\n".into())
    );
    eprintln!("docker resume on demand + invoke: {:?}", woke.elapsed());
    let got = get(&cp, "sleepy").await;
    assert_eq!(got["status"], "Running", "{got}");
    assert!(got.get("stopReason").is_none(), "{got}");
    assert_eq!(scope.container_id(&scope.object("sleepy")), id);

    // Several requests at once wake it once; a file request is served too.
    wait_for(&cp, "sleepy", "status", "Stopped", Duration::from_secs(20)).await;
    let reads = (0..5).map(|_| get_file(&cp, "sleepy", "workspace/note"));
    for (status, body) in futures_util::future::join_all(reads).await {
        assert_eq!((status, body.as_str()), (200, "kept"));
    }
    assert_eq!(scope.container_id(&scope.object("sleepy")), id);

    // A user's stop: 409 afterwards, `stopReason: user`, the container gone.
    let (status, got) = send(cp.sb(Method::POST, "sleepy", "/stop")).await;
    assert_eq!((status, &got["stopReason"]), (200, &json!("user")), "{got}");
    let (status, got) = send(cp.sb(Method::POST, "sleepy", "/invoke").body("x\n")).await;
    assert_eq!(status, 409, "{got}");
    assert_error(&got, "sandbox_not_running");
    assert!(
        !scope.containers().iter().any(|c| c.contains("-sleepy")),
        "{:?}",
        scope.containers()
    );

    // Lifetime end, default: stopped (`timeout`), not woken by a request; a resume starts
    // a new lifetime.
    let started = Instant::now();
    let short = create(
        &cp,
        json!({"name": "short", "templateRef": {"name": "py"}, "timeout": "2s"}),
    )
    .await;
    assert!(short["expiresAt"].is_string(), "{short}");
    let ended = wait_for(&cp, "short", "status", "Stopped", Duration::from_secs(20)).await;
    assert!(started.elapsed() >= Duration::from_millis(1900));
    assert_eq!(ended["stopReason"], "timeout", "{ended}");
    let (status, got) = send(cp.sb(Method::GET, "short", "/files/")).await;
    assert_eq!(status, 409, "{got}");
    let (status, got) = send(cp.sb(Method::POST, "short", "/resume")).await;
    assert_eq!((status, &got["status"]), (200, &json!("Running")), "{got}");
    assert!(
        got["expiresAt"].as_str() > ended["expiresAt"].as_str().or(Some("")),
        "{got}"
    );

    // A lifetime that ends while the sandbox sleeps: it sleeps on, for `timeout`.
    create(
        &cp,
        json!({"name": "nap", "templateRef": {"name": "py"}, "timeout": "5s", "idleTimeout": "1s"}),
    )
    .await;
    let asleep = wait_for(&cp, "nap", "status", "Stopped", Duration::from_secs(20)).await;
    assert_eq!(asleep["stopReason"], "idle", "{asleep}");
    wait_for(&cp, "nap", "stopReason", "timeout", Duration::from_secs(20)).await;
    let (status, got) = send(cp.sb(Method::GET, "nap", "/files/")).await;
    assert_eq!(status, 409, "{got}");

    // A template that says delete: gone, volume and all.
    create(
        &cp,
        json!({"name": "gone", "templateRef": {"name": "brief"}}),
    )
    .await;
    let deleted = eventually(Duration::from_secs(20), || async {
        (send(cp.sb(Method::GET, "gone", "")).await.0 == 404).then_some(())
    })
    .await;
    assert!(deleted.is_some(), "never deleted");
    assert!(!scope.volumes().contains(&scope.object("gone")));
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_clone_is_equal_then_diverges() {
    if !docker_ready() {
        return;
    }
    let scope = Scope::new(json!([{"name": "py", "image": PYTHON_AGENT}]));
    let cp = scope.start();
    create(
        &cp,
        json!({"name": "src", "templateRef": {"name": "py"}, "timeout": "1h"}),
    )
    .await;
    let configuration = json!({
        "installCommand": ["sh", "-c", "echo installed >> /workspace/installs.log"],
        "entrypoint": ["sh", "-c", "cat /workspace/note"],
    });
    let (first, _) = cp.configure("src", configuration.clone()).await;
    assert_eq!(first["installExitCode"], 0, "{first}");
    put_file(&cp, "src", "workspace/note", "one").await;
    put_file(&cp, "src", "workspace/deep/a/b/c.txt", "nested").await;
    assert_eq!(invoke(&cp, "src", "").await, (0, "one".into()));

    let (status, clone) = send(
        cp.sb(Method::POST, "src", "/clone")
            .json(&json!({"name": "dst"})),
    )
    .await;
    assert_eq!(status, 202, "{clone}");
    assert_eq!(clone["name"], "dst");
    assert_eq!(clone["status"], "Running");
    assert_eq!(clone["clonedFrom"], "src");
    assert_eq!(clone["timeout"], "1h");
    assert_eq!(clone["namespace"], "default");

    // Equal: files, owners and configuration (no configure needed; the same one skips the
    // install).
    assert_eq!(invoke(&cp, "dst", "").await, (0, "one".into()));
    assert_eq!(
        get_file(&cp, "dst", "workspace/deep/a/b/c.txt").await,
        (200, "nested".into())
    );
    let (_, owners) = exec(&cp, "dst", "stat -c %u /workspace/deep/a/b/c.txt").await;
    let (_, src_owners) = exec(&cp, "src", "stat -c %u /workspace/deep/a/b/c.txt").await;
    assert_eq!(owners["stdout"], src_owners["stdout"], "{owners}");
    let (again, _) = cp.configure("dst", configuration).await;
    assert_eq!(again["skipped"], true, "{again}");
    assert_eq!(
        get_file(&cp, "dst", "workspace/installs.log").await,
        (200, "installed\n".into())
    );
    // Its own volume, and no helper left.
    assert!(scope.volumes().contains(&scope.object("dst")));
    assert!(
        !scope
            .containers()
            .iter()
            .any(|c| c.contains("clone-source")),
        "{:?}",
        scope.containers()
    );

    // Then they diverge.
    put_file(&cp, "dst", "workspace/note", "two").await;
    assert_eq!(invoke(&cp, "dst", "").await, (0, "two".into()));
    assert_eq!(invoke(&cp, "src", "").await, (0, "one".into()));

    // A stopped source clones too; errors as documented.
    send(cp.sb(Method::POST, "src", "/stop")).await;
    let (status, auto) = send(cp.sb(Method::POST, "src", "/clone")).await;
    assert_eq!(status, 202, "{auto}");
    assert_eq!(
        invoke(&cp, auto["name"].as_str().unwrap(), "").await,
        (0, "one".into())
    );
    let (status, got) = send(
        cp.sb(Method::POST, "src", "/clone")
            .json(&json!({"name": "dst"})),
    )
    .await;
    assert_eq!(status, 409, "{got}");
    assert_error(&got, "already_exists");
    let (status, got) = send(cp.sb(Method::POST, "nope", "/clone").json(&json!({}))).await;
    assert_eq!(status, 404, "{got}");
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_warm_pool_claims_refills_and_hands_nothing_out_twice() {
    if !docker_ready() {
        return;
    }
    const SIZE: usize = 3;
    const CREATES: usize = 8;
    let scope = Scope::new(json!([
        {"name": "pooled", "image": PYTHON_AGENT, "warmPool": {"size": SIZE}},
    ]));
    let cp = scope.start();
    let pool = |cp: &Cp| {
        let req = cp.admin(Method::GET, "/api/v1/warmpool/status");
        async move { send(req).await.1 }
    };
    let full = eventually(Duration::from_secs(60), || async {
        let got = pool(&cp).await;
        (got["pools"][0]["ready"] == SIZE).then_some(got)
    })
    .await;
    assert!(full.is_some(), "the pool never filled: {}", pool(&cp).await);
    let pooled: HashSet<String> = scope
        .containers()
        .into_iter()
        .filter(|c| c.contains(".pool-"))
        .collect();
    assert_eq!(pooled.len(), SIZE, "{pooled:?}");
    // Invisible: not listed.
    let (_, list) = send(cp.admin(Method::GET, "/api/v1/sandboxes")).await;
    assert_eq!(list["sandboxes"], json!([]), "{list}");
    let ids: HashSet<String> = pooled.iter().map(|c| scope.container_id(c)).collect();

    // Concurrent creates: SIZE claim, the rest start cold; none is handed out twice.
    let started = Instant::now();
    let creates = (0..CREATES).map(|i| {
        let req = cp
            .admin(Method::POST, "/api/v1/sandboxes")
            .json(&json!({"name": format!("w{i}"), "templateRef": {"name": "pooled"}}));
        async move { send(req).await }
    });
    let results = futures_util::future::join_all(creates).await;
    eprintln!("{CREATES} concurrent creates: {:?}", started.elapsed());
    let mut claimed = HashSet::new();
    let mut hits = 0;
    for (i, (status, got)) in results.iter().enumerate() {
        assert_eq!(*status, 201, "{got}");
        let id = scope.container_id(&scope.object(&format!("w{i}")));
        assert!(
            claimed.insert(id.clone()),
            "handed out twice: {id:?} {results:?} {:?}",
            scope.containers()
        );
        if got["fromWarmPool"] == true {
            hits += 1;
        } else {
            assert_eq!(got["fromWarmPool"], false, "{got}");
        }
    }
    // Every pooled one was claimed (a create that found them all taken may claim one the
    // refill started meanwhile), and no cold one is a pooled one.
    assert!(ids.is_subset(&claimed), "{ids:?} {claimed:?}");
    assert!(hits >= SIZE, "hits {hits}");
    let status = pool(&cp).await;
    assert_eq!(status["pools"][0]["hits"], hits, "{status}");
    assert_eq!(status["pools"][0]["misses"], CREATES - hits, "{status}");

    // Each is its own sandbox, running, in its namespace; a claimed one keeps no data of an
    // earlier tenant (the pool's workspace is fresh) and works.
    for i in 0..CREATES {
        let name = format!("w{i}");
        let got = get(&cp, &name).await;
        assert_eq!(
            (got["status"].as_str(), got["namespace"].as_str()),
            (Some("Running"), Some("default")),
            "{got}"
        );
        let (status, out) = exec(
            &cp,
            &name,
            "ls -A /workspace | grep -v '^.agentbox$' | wc -l",
        )
        .await;
        assert_eq!(
            (status, out["stdout"].as_str()),
            (200, Some("0\n")),
            "{out}"
        );
        put_file(&cp, &name, "workspace/mine", &name).await;
        assert_eq!(
            get_file(&cp, &name, "workspace/mine").await,
            (200, name.clone())
        );
    }
    let (_, list) = send(cp.admin(Method::GET, "/api/v1/sandboxes")).await;
    assert_eq!(
        list["sandboxes"].as_array().unwrap().len(),
        CREATES,
        "{list}"
    );

    // Back to size, with new ones.
    let refilled = eventually(Duration::from_secs(60), || async {
        let got = pool(&cp).await;
        (got["pools"][0]["ready"] == SIZE).then_some(got)
    })
    .await;
    assert!(refilled.is_some(), "{}", pool(&cp).await);
    let now_pooled: Vec<String> = scope
        .containers()
        .into_iter()
        .filter(|c| c.contains(".pool-"))
        .collect();
    assert_eq!(now_pooled.len(), SIZE, "{now_pooled:?}");
    assert!(now_pooled
        .iter()
        .all(|c| !ids.contains(&scope.container_id(c))));

    // Deleting a claimed sandbox removes its container and both its volumes: nothing leaks.
    for i in 0..CREATES {
        let (status, _) = send(cp.sb(Method::DELETE, &format!("w{i}"), "")).await;
        assert!(status == 200 || status == 204, "{status}");
    }
    let containers = scope.containers();
    assert_eq!(containers.len(), SIZE, "{containers:?}");
    let volumes = scope.volumes();
    assert_eq!(volumes.len(), SIZE, "{volumes:?}");
    assert!(volumes.iter().all(|v| v.contains(".pool-")), "{volumes:?}");
}
