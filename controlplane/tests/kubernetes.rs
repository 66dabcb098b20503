//! The Kubernetes backend against real Kubernetes JSON (k8s-openapi types) served by a small
//! in-test API server (`k8s_fixture`), with the real `agentbox-controlplane` binary pointed at
//! it through a kubeconfig, and a real `agentbox-runner` standing in for a sandbox pod's
//! container (its pod's IP is 127.0.0.1 and its `runner` port the runner's port).
#![allow(clippy::unwrap_used)]

mod k8s_fixture;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use k8s_fixture::Fixture;
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Pod, PodCondition, PodSpec, PodStatus, Secret,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use reqwest::Method;
use serde_json::{json, Value};
use sha2::Digest;

const NS: &str = "agentbox";
const ADMIN_KEY: &str = "k8s-test-admin-key-4b1d9e77c0a2";
const TOKEN: &str = "k8s-test-runner-token-0f9e8d7c6b5a4938";
const RUNNER_IMAGE: &str = "registry.example.invalid/agentbox-runner:test";

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

/// A command with no `AGENTBOX_*` or `KUBE*` variables from the caller.
fn clean_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("AGENTBOX_") || key.starts_with("KUBE") {
            cmd.env_remove(&*key);
        }
    }
    cmd.stdin(Stdio::null()).stderr(Stdio::inherit());
    cmd
}

/// Starts `cmd` and reads its `listening on ADDR` line (without blocking the runtime, which
/// serves the fixture the control plane syncs with before it prints that line).
async fn spawn_listening(mut cmd: Command) -> (Proc, SocketAddr) {
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let proc = Proc(child);
    let line = tokio::task::spawn_blocking(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        // Keep the pipe open (and drained) for the life of the process.
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        line
    })
    .await
    .unwrap();
    let addr = line
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("did not start: first line {line:?}"))
        .trim()
        .parse()
        .unwrap();
    (proc, addr)
}

/// A real runner, as a sandbox pod's container would run it.
async fn start_runner(dir: &Path) -> (Proc, SocketAddr) {
    let workspace = dir.join("workspace");
    std::fs::create_dir_all(&workspace).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let mut cmd = clean_command(bin_dir().join("agentbox-runner"));
    cmd.args(["--listen", "127.0.0.1:0", "--workspace"])
        .arg(&workspace)
        .arg("--token-file")
        .arg(&token_file)
        .env("AGENTBOX_LOG", "warn");
    spawn_listening(cmd).await
}

/// The control plane with `--backend kubernetes`, its kubeconfig pointing at `fixture`.
struct Cp {
    _proc: Proc,
    addr: SocketAddr,
    client: reqwest::Client,
}

/// The control-plane command with `--backend kubernetes`, its kubeconfig `kubeconfig`.
fn cp_command(kubeconfig: &str, dir: &Path, extra: &[&str]) -> Command {
    let kubeconfig_file = dir.join("kubeconfig");
    std::fs::write(&kubeconfig_file, kubeconfig).unwrap();
    let keys = dir.join("keys.json");
    let digest = hex::encode(sha2::Sha256::digest(ADMIN_KEY.as_bytes()));
    std::fs::write(
        &keys,
        json!({"keys": [{"name": "admin", "sha256": digest, "admin": true}]}).to_string(),
    )
    .unwrap();
    let mut cmd = clean_command(env!("CARGO_BIN_EXE_agentbox-controlplane"));
    cmd.args(["--listen", "127.0.0.1:0", "--backend", "kubernetes"])
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--api-keys-file")
        .arg(&keys)
        .args(["--kube-namespace", NS])
        .args(extra)
        .env("KUBECONFIG", &kubeconfig_file)
        .env("HOME", dir)
        .env("AGENTBOX_LOG", "warn");
    cmd
}

/// Writes `templates` (a JSON array) as `dir/templates.json`; its path, for `--templates-file`.
fn write_templates(dir: &Path, templates: Value) -> String {
    let path = dir.join("templates.json");
    std::fs::write(&path, json!({ "templates": templates }).to_string()).unwrap();
    path.display().to_string()
}

async fn start_cp(fixture: &Fixture, dir: &Path, extra: &[&str]) -> Cp {
    start_cp_with(&fixture.kubeconfig(NS), dir, extra).await
}

/// The control plane with kubeconfig `kubeconfig` (e.g. a lagging endpoint's).
async fn start_cp_with(kubeconfig: &str, dir: &Path, extra: &[&str]) -> Cp {
    let mut cmd = cp_command(kubeconfig, dir, extra);
    cmd.args(["--kube-sync-timeout", "20s"]);
    let (proc, addr) = spawn_listening(cmd).await;
    Cp {
        _proc: proc,
        addr,
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap(),
    }
}

impl Cp {
    fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, format!("http://{}{path}", self.addr))
            .header("x-api-key", ADMIN_KEY)
    }

    fn sb(&self, method: Method, name: &str, rest: &str) -> reqwest::RequestBuilder {
        self.req(method, &format!("/api/v1/sandboxes/{name}{rest}"))
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> (u16, Value) {
        let resp = rb.send().await.unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, body)
    }

    async fn get(&self, name: &str) -> (u16, Value) {
        self.send(self.sb(Method::GET, name, "")).await
    }

    async fn list(&self) -> Vec<Value> {
        let (status, body) = self.send(self.req(Method::GET, "/api/v1/sandboxes")).await;
        assert_eq!(status, 200, "{body}");
        body["sandboxes"].as_array().unwrap().clone()
    }

    /// Polls `GET /api/v1/sandboxes/{name}` until its status is `want` (bounded).
    async fn wait_status(&self, name: &str, want: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (code, body) = self.get(name).await;
            if code == 200 && body["status"] == want {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "{name} never became {want}: {code} {body}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A streaming POST; returns the status and the whole body.
    async fn post_stream(&self, name: &str, rest: &str, body: reqwest::Body) -> (u16, Vec<u8>) {
        let resp = self
            .sb(Method::POST, name, rest)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.bytes().await.unwrap().to_vec())
    }
}

/// One SSE event: (event, data).
fn parse_sse(bytes: &[u8]) -> Vec<(String, Value)> {
    let text = std::str::from_utf8(bytes).unwrap();
    text.split("\n\n")
        .filter(|frame| !frame.is_empty() && !frame.starts_with(':'))
        .map(|frame| {
            let mut event = String::new();
            let mut data = Value::Null;
            for line in frame.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    event = v.to_owned();
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(v).unwrap();
                }
            }
            (event, data)
        })
        .collect()
}

/// The exact bytes of stdout rebuilt from `log` events.
fn stdout_of(events: &[(String, Value)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (_, data) in events
        .iter()
        .filter(|(e, d)| e == "log" && d["stream"] == "stdout")
    {
        match data["dataBase64"].as_str() {
            None => out.extend_from_slice(data["data"].as_str().unwrap().as_bytes()),
            Some(b64) => out.extend(
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .unwrap(),
            ),
        }
        if data["partial"] != Value::Bool(true) {
            out.push(b'\n');
        }
    }
    out
}

fn labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/managed-by".into(), "agentbox".into()),
        ("agentbox.dev/sandbox".into(), name.into()),
    ])
}

/// A sandbox's Secret as the backend writes it (created a while ago).
fn sandbox_secret(name: &str, stopped: bool) -> Secret {
    let mut annotations = BTreeMap::from([
        ("agentbox.dev/namespace".to_owned(), "default".to_owned()),
        ("agentbox.dev/template".to_owned(), "default".to_owned()),
        ("agentbox.dev/mode".to_owned(), "agent".to_owned()),
        (
            "agentbox.dev/created-at".to_owned(),
            "2026-01-02T03:04:05Z".to_owned(),
        ),
        (
            "agentbox.dev/created-by".to_owned(),
            r#"{"email":"ops@example.invalid"}"#.to_owned(),
        ),
    ]);
    if stopped {
        annotations.insert("agentbox.dev/stopped".into(), "2026-01-02T04:00:00Z".into());
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(format!("sandbox-{name}")),
            namespace: Some(NS.into()),
            labels: Some(labels(name)),
            annotations: Some(annotations),
            creation_timestamp: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-01-02T03:04:05Z".parse().unwrap(),
            )),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            "token".to_owned(),
            ByteString(TOKEN.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    }
}

/// A sandbox's Pod as the kubelet reports it: `phase`, Ready or not, IP 127.0.0.1, the runner
/// on `port`.
fn sandbox_pod(name: &str, port: u16, phase: &str, ready: bool) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("sandbox-{name}")),
            namespace: Some(NS.into()),
            labels: Some(labels(name)),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "runner".into(),
                image: Some(RUNNER_IMAGE.into()),
                ports: Some(vec![ContainerPort {
                    name: Some("runner".into()),
                    container_port: i32::from(port),
                    ..ContainerPort::default()
                }]),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some(phase.into()),
            pod_ip: Some("127.0.0.1".into()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..PodCondition::default()
            }]),
            ..PodStatus::default()
        }),
    }
}

/// A fixture, a real runner behind sandbox `name`'s Running and Ready pod, a control plane
/// that sees it Running.
struct Running {
    fixture: Fixture,
    cp: Cp,
    _runner: Proc,
    _tmp: tempfile::TempDir,
}

async fn running(name: &str) -> Running {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = Fixture::start().await;
    let (runner, runner_addr) = start_runner(tmp.path()).await;
    fixture.put("secrets", NS, sandbox_secret(name, false));
    fixture.put(
        "pods",
        NS,
        sandbox_pod(name, runner_addr.port(), "Running", true),
    );
    let cp = start_cp(&fixture, tmp.path(), &[]).await;
    cp.wait_status(name, "Running").await;
    Running {
        fixture,
        cp,
        _runner: runner,
        _tmp: tmp,
    }
}

async fn configure(cp: &Cp, name: &str, script: &str) {
    let body = json!({"entrypoint": ["sh", "-c", script]}).to_string();
    let (status, bytes) = cp.post_stream(name, "/configure", body.into()).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
    let events = parse_sse(&bytes);
    assert_eq!(
        events.last().map(|e| e.0.as_str()),
        Some("result"),
        "{events:?}"
    );
}

async fn invoke(cp: &Cp, name: &str, stdin: &str) -> Vec<u8> {
    let (status, bytes) = cp
        .post_stream(name, "/invoke", stdin.to_owned().into())
        .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
    let events = parse_sse(&bytes);
    let exit = events.last().unwrap();
    assert_eq!(exit.0, "exit", "{events:?}");
    assert_eq!(exit.1["exitCode"], 0, "{events:?}");
    stdout_of(&events)
}

/// 1. A pod that appears (a watch ADDED event) makes its sandbox routable: listed Running,
///    configure and invoke go end to end to the runner at the pod's IP and `runner` port with
///    the Secret's token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_appears_then_routable() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = Fixture::start().await;
    let (_runner, runner_addr) = start_runner(tmp.path()).await;
    // Known before the control plane starts (the initial list): one stopped sandbox and one
    // whose pod does not exist yet.
    fixture.put("secrets", NS, sandbox_secret("parked", true));
    fixture.put("secrets", NS, sandbox_secret("alpha", false));
    let cp = start_cp(&fixture, tmp.path(), &[]).await;
    let listed = cp.list().await;
    let status_of = |list: &[Value], name: &str| {
        list.iter()
            .find(|s| s["name"] == name)
            .map(|s| s["status"].clone())
    };
    assert_eq!(status_of(&listed, "parked"), Some(json!("Stopped")));
    assert_eq!(
        status_of(&listed, "alpha"),
        Some(json!("Error")),
        "{listed:?}"
    );
    let (code, body) = cp.post_stream("alpha", "/invoke", "x".into()).await;
    assert_eq!(code, 409, "{}", String::from_utf8_lossy(&body));

    // The pod appears, Running and Ready.
    fixture.put(
        "pods",
        NS,
        sandbox_pod("alpha", runner_addr.port(), "Running", true),
    );
    let summary = cp.wait_status("alpha", "Running").await;
    assert_eq!(summary["podName"], "sandbox-alpha");
    assert_eq!(summary["namespace"], "default");
    assert_eq!(summary["createdAt"], "2026-01-02T03:04:05Z");
    assert_eq!(summary["createdBy"]["email"], "ops@example.invalid");
    let listed = cp.list().await;
    assert_eq!(status_of(&listed, "alpha"), Some(json!("Running")));
    assert_eq!(listed.len(), 2);

    configure(
        &cp,
        "alpha",
        r#"printf 'hello, %s!\n' "$(cat)"; printf 'no newline'"#,
    )
    .await;
    let out = invoke(&cp, "alpha", "kubernetes").await;
    assert_eq!(out, b"hello, kubernetes!\nno newline");
}

/// 2. A pod deleted behind the control plane's back: the sandbox is no longer routable; once
///    its Secret is gone too, it does not exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_deleted_then_gone() {
    let r = running("beta").await;
    r.fixture.remove("pods", NS, "sandbox-beta").unwrap();
    let summary = r.cp.wait_status("beta", "Error").await;
    assert!(
        summary["message"].as_str().unwrap().contains("gone"),
        "{summary}"
    );
    let (code, body) = r.cp.post_stream("beta", "/invoke", "x".into()).await;
    assert_eq!(code, 409, "{}", String::from_utf8_lossy(&body));

    r.fixture.remove("secrets", NS, "sandbox-beta").unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while r.cp.get("beta").await.0 != 404 {
        assert!(Instant::now() < deadline, "beta is still there");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, body) = r.cp.post_stream("beta", "/invoke", "x".into()).await;
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (code, body["error"].as_str()),
        (404, Some("sandbox_not_found"))
    );
    assert!(r.cp.list().await.is_empty());
}

/// 3. Not Ready, Pending or Failed: 409 `sandbox_not_running`, with the phase the pod implies;
///    Ready again: routable again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_is_not_running() {
    let r = running("gamma").await;
    let port = {
        let pod = r.fixture.get("pods", NS, "sandbox-gamma").unwrap();
        pod["spec"]["containers"][0]["ports"][0]["containerPort"]
            .as_u64()
            .unwrap() as u16
    };
    for (phase, ready, want) in [
        ("Running", false, "Creating"),
        ("Pending", false, "Creating"),
        ("Failed", false, "Error"),
    ] {
        r.fixture
            .put("pods", NS, sandbox_pod("gamma", port, phase, ready));
        r.cp.wait_status("gamma", want).await;
        for rest in ["/invoke", "/configure"] {
            let (code, body) = r.cp.post_stream("gamma", rest, "{}".into()).await;
            let body: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(code, 409, "{phase} {rest}: {body}");
            assert_eq!(body["error"], "sandbox_not_running", "{body}");
            assert!(body["message"].as_str().unwrap().contains(want), "{body}");
        }
    }
    r.fixture
        .put("pods", NS, sandbox_pod("gamma", port, "Running", true));
    r.cp.wait_status("gamma", "Running").await;
    configure(&r.cp, "gamma", "cat").await;
    assert_eq!(invoke(&r.cp, "gamma", "again").await, b"again");
}

fn env_of(container: &Value) -> BTreeMap<String, Value> {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_owned(), e.clone()))
        .collect()
}

fn secret_bytes(secret: &Value, key: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(secret["data"][key].as_str().unwrap())
        .unwrap()
}

/// 4. Lifecycle through the API: create writes a Secret and a Pod (labels, token by
///    secretKeyRef, image, port); stop deletes the Pod and annotates the Secret; resume
///    recreates the Pod; delete removes everything. With a template ConfigMap, its pod and
///    volume claim are used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_through_the_api() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = Fixture::start().await;
    let templates = write_templates(
        tmp.path(),
        json!([{
            "name": "big", "mode": "code", "env": {"FOO": "bar"},
            "maxConcurrentInvokes": 3, "runnerArgs": ["--default-timeout", "5m"],
        }]),
    );
    fixture.put(
        "configmaps",
        NS,
        json!({
            "metadata": {"name": "agentbox-template-big"},
            "data": {
                "pod.json": json!({
                    "metadata": {"labels": {"team": "blue"}},
                    "spec": {
                        "containers": [{
                            "name": "runner",
                            "image": "registry.example.invalid/big:2",
                            "ports": [{"name": "runner", "containerPort": 9000}],
                            "resources": {"limits": {"memory": "4Gi"}},
                        }],
                        "nodeSelector": {"pool": "sandboxes"},
                    },
                }).to_string(),
                "pvc.json": json!({
                    "accessModes": ["ReadWriteOnce"],
                    "resources": {"requests": {"storage": "5Gi"}},
                }).to_string(),
            },
        }),
    );
    let cp = start_cp(
        &fixture,
        tmp.path(),
        &[
            "--kube-runner-image",
            RUNNER_IMAGE,
            "--templates-file",
            &templates,
        ],
    )
    .await;

    // The built-in pod.
    let (code, body) = cp
        .send(
            cp.req(Method::POST, "/api/v1/sandboxes")
                .json(&json!({"name": "delta", "namespace": "default"})),
        )
        .await;
    assert_eq!(code, 201, "{body}");
    assert_eq!(body["status"], "Creating");
    assert_eq!(body["namespace"], "default");
    let secret = fixture.get("secrets", NS, "sandbox-delta").unwrap();
    assert_eq!(
        secret["metadata"]["labels"]["agentbox.dev/sandbox"],
        "delta"
    );
    assert_eq!(
        secret["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "agentbox"
    );
    let ann = &secret["metadata"]["annotations"];
    assert_eq!(ann["agentbox.dev/namespace"], "default");
    assert_eq!(ann["agentbox.dev/template"], "default");
    assert_eq!(ann["agentbox.dev/mode"], "agent");
    assert!(ann["agentbox.dev/created-at"].is_string());
    let token = secret_bytes(&secret, "token");
    assert_eq!(token.len(), 64, "32 random bytes, hex");
    let pod = fixture.get("pods", NS, "sandbox-delta").unwrap();
    assert_eq!(pod["metadata"]["labels"]["agentbox.dev/sandbox"], "delta");
    assert_eq!(
        pod["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "agentbox"
    );
    let owner = &pod["metadata"]["ownerReferences"][0];
    assert_eq!(
        (&owner["kind"], &owner["name"], &owner["uid"]),
        (
            &json!("Secret"),
            &json!("sandbox-delta"),
            &secret["metadata"]["uid"]
        )
    );
    assert_eq!(pod["spec"]["automountServiceAccountToken"], false);
    let c = &pod["spec"]["containers"][0];
    assert_eq!(c["name"], "runner");
    assert_eq!(c["image"], RUNNER_IMAGE);
    assert_eq!(
        c["ports"][0],
        json!({"name": "runner", "containerPort": 8421, "protocol": "TCP"})
    );
    let env = env_of(c);
    assert_eq!(
        env["AGENTBOX_RUNNER_TOKEN"],
        json!({"name": "AGENTBOX_RUNNER_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": "sandbox-delta", "key": "token", "optional": false}}})
    );
    assert_eq!(env["AGENTBOX_MODE"]["value"], "agent");
    assert_eq!(env["AGENTBOX_SANDBOX"]["value"], "delta");
    assert!(
        !pod.to_string()
            .contains(std::str::from_utf8(&token).unwrap()),
        "the token is never in the pod"
    );
    assert_eq!(
        c["volumeMounts"][0],
        json!({"name": "workspace", "mountPath": "/workspace"})
    );
    assert_eq!(
        pod["spec"]["volumes"][0],
        json!({"name": "workspace", "emptyDir": {}})
    );
    assert!(fixture.list("persistentvolumeclaims", NS).is_empty());

    // Taken.
    let (code, body) = cp
        .send(
            cp.req(Method::POST, "/api/v1/sandboxes")
                .json(&json!({"name": "delta"})),
        )
        .await;
    assert_eq!(
        (code, body["error"].as_str()),
        (409, Some("already_exists"))
    );

    // Stop: the pod goes, the Secret says stopped.
    let (code, body) = cp.send(cp.sb(Method::POST, "delta", "/stop")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["status"], "Stopped");
    assert!(fixture.get("pods", NS, "sandbox-delta").is_none());
    let secret = fixture.get("secrets", NS, "sandbox-delta").unwrap();
    assert!(secret["metadata"]["annotations"]["agentbox.dev/stopped"].is_string());
    let (code, body) = cp.post_stream("delta", "/invoke", "x".into()).await;
    assert_eq!(code, 409, "{}", String::from_utf8_lossy(&body));

    // Resume: the same pod again, the same token.
    let (code, body) = cp.send(cp.sb(Method::POST, "delta", "/resume")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["status"], "Creating");
    let again = fixture.get("pods", NS, "sandbox-delta").unwrap();
    assert_ne!(again["metadata"]["uid"], pod["metadata"]["uid"]);
    assert_eq!(again["spec"], pod["spec"]);
    let secret = fixture.get("secrets", NS, "sandbox-delta").unwrap();
    assert!(secret["metadata"]["annotations"]
        .get("agentbox.dev/stopped")
        .is_none());
    assert_eq!(secret_bytes(&secret, "token"), token);

    // Delete: all gone.
    let (code, body) = cp.send(cp.sb(Method::DELETE, "delta", "")).await;
    assert_eq!(code, 200, "{body}");
    assert!(fixture.get("pods", NS, "sandbox-delta").is_none());
    assert!(fixture.get("secrets", NS, "sandbox-delta").is_none());
    assert_eq!(cp.get("delta").await.0, 404);

    // A template with a ConfigMap: its pod, our additions, its volume claim.
    let (code, body) = cp
        .send(cp.req(Method::POST, "/api/v1/sandboxes").json(
            &json!({"name": "epsilon", "templateRef": {"name": "big", "kind": "ClusterSandboxTemplate"}}),
        ))
        .await;
    assert_eq!(code, 201, "{body}");
    assert_eq!(body["mode"], "code");
    assert_eq!(body["pvcName"], "sandbox-epsilon-workspace");
    let pvc = fixture
        .get("persistentvolumeclaims", NS, "sandbox-epsilon-workspace")
        .unwrap();
    assert_eq!(pvc["spec"]["resources"]["requests"]["storage"], "5Gi");
    assert_eq!(pvc["metadata"]["labels"]["agentbox.dev/sandbox"], "epsilon");
    assert_eq!(
        pvc["metadata"]["ownerReferences"][0]["name"],
        "sandbox-epsilon"
    );
    let pod = fixture.get("pods", NS, "sandbox-epsilon").unwrap();
    assert_eq!(pod["metadata"]["labels"]["team"], "blue");
    assert_eq!(pod["spec"]["nodeSelector"]["pool"], "sandboxes");
    let c = &pod["spec"]["containers"][0];
    assert_eq!(c["image"], "registry.example.invalid/big:2");
    assert_eq!(c["resources"]["limits"]["memory"], "4Gi");
    assert_eq!(c["args"], json!(["--default-timeout", "5m"]));
    let env = env_of(c);
    assert_eq!(env["AGENTBOX_MODE"]["value"], "code");
    assert_eq!(env["FOO"]["value"], "bar");
    assert_eq!(env["AGENTBOX_MAX_CONCURRENT_INVOKES"]["value"], "3");
    assert_eq!(env["AGENTBOX_LISTEN"]["value"], "0.0.0.0:9000");
    assert_eq!(
        env["AGENTBOX_RUNNER_TOKEN"]["valueFrom"]["secretKeyRef"]["name"],
        "sandbox-epsilon"
    );
    assert_eq!(
        pod["spec"]["volumes"][0],
        json!({"name": "workspace", "persistentVolumeClaim": {"claimName": "sandbox-epsilon-workspace"}})
    );
    // Stop keeps the claim; delete removes it.
    let (code, _) = cp.send(cp.sb(Method::POST, "epsilon", "/stop")).await;
    assert_eq!(code, 200);
    assert!(fixture
        .get("persistentvolumeclaims", NS, "sandbox-epsilon-workspace")
        .is_some());
    let (code, _) = cp.send(cp.sb(Method::DELETE, "epsilon", "")).await;
    assert_eq!(code, 200);
    assert!(fixture.list("persistentvolumeclaims", NS).is_empty());
    assert!(fixture.list("pods", NS).is_empty());
    assert!(fixture.list("secrets", NS).is_empty());
    assert!(cp.list().await.is_empty());
}

/// Waits (bounded) until the fixture holds `n` Events.
async fn events(fixture: &Fixture, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let events = fixture.list("events", NS);
        if events.len() >= n {
            return events;
        }
        assert!(Instant::now() < deadline, "only {events:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// 5. Configure and invoke outcomes become Events on the Pod; never with stdin or argv.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_are_events() {
    let r = running("zeta").await;
    // Before any configure the runner answers 424: a Warning.
    let (code, _) = r.cp.post_stream("zeta", "/invoke", "early".into()).await;
    assert_eq!(code, 424);
    configure(&r.cp, "zeta", "cat; echo secret-argv-marker >/dev/null").await;
    assert_eq!(invoke(&r.cp, "zeta", "stdin-marker").await, b"stdin-marker");
    let events = events(&r.fixture, 3).await;
    let pod_uid = r.fixture.get("pods", NS, "sandbox-zeta").unwrap()["metadata"]["uid"].clone();
    let mut seen: Vec<(String, String, String)> = events
        .iter()
        .map(|e| {
            assert_eq!(e["involvedObject"]["kind"], "Pod", "{e}");
            assert_eq!(e["involvedObject"]["name"], "sandbox-zeta", "{e}");
            assert_eq!(e["involvedObject"]["uid"], pod_uid, "{e}");
            assert_eq!(e["source"]["component"], "agentbox-controlplane");
            let text = e.to_string();
            assert!(!text.contains("marker"), "argv or stdin leaked: {text}");
            (
                e["reason"].as_str().unwrap().to_owned(),
                e["type"].as_str().unwrap().to_owned(),
                e["message"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            (
                "Configured".to_owned(),
                "Normal".to_owned(),
                "configure ok (HTTP 200)".to_owned()
            ),
            (
                "Invoked".to_owned(),
                "Normal".to_owned(),
                "invoke ok (HTTP 200)".to_owned()
            ),
            (
                "Invoked".to_owned(),
                "Warning".to_owned(),
                "invoke not_configured (HTTP 424)".to_owned()
            ),
        ]
    );
}

/// 6. The request path makes no API call: during 20 invokes the fixture sees nothing but the
///    Events recorded after them (the watches stay open; no list, get or new watch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_path_makes_no_api_call() {
    let r = running("eta").await;
    configure(&r.cp, "eta", "cat").await;
    events(&r.fixture, 1).await;
    let before = r.fixture.requests();
    let watches = before.iter().filter(|q| q.is_watch()).count();
    assert_eq!(watches, 2, "one watch of Pods, one of Secrets: {before:?}");
    for i in 0..20 {
        let input = format!("call {i}");
        assert_eq!(invoke(&r.cp, "eta", &input).await, input.into_bytes());
    }
    events(&r.fixture, 21).await;
    // Background reads are not on the request path: the governance ConfigMap (every 2 s) and
    // the templates' ConfigMaps (for a `warmPool`, at most every 10 s).
    let during: Vec<_> = r
        .fixture
        .requests()
        .split_off(before.len())
        .into_iter()
        .filter(|q| !(q.method == "GET" && q.path.contains("/configmaps/")))
        .collect();
    assert_eq!(during.len(), 20, "{during:?}");
    for q in &during {
        assert_eq!(
            (q.method.as_str(), q.path.as_str()),
            ("POST", "/api/v1/namespaces/agentbox/events"),
            "{during:?}"
        );
    }
}

/// 7. A cluster that does not answer: the control plane never serves; it gives up after
///    `--kube-sync-timeout` and says why.
#[tokio::test]
async fn unreachable_cluster_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let kubeconfig = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": format!("http://{closed}")}}],
        "users": [{"name": "u", "user": {}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "c",
    });
    let started = Instant::now();
    let out = cp_command(
        &kubeconfig.to_string(),
        tmp.path(),
        &["--kube-sync-timeout", "1s"],
    )
    .stderr(Stdio::piped())
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty(), "it must not listen");
    assert!(
        stderr.contains("cannot list and watch Pods and Secrets"),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
}

/// Credentials on Kubernetes are references to operator-made Secrets: the Pod the control plane
/// posts names `credential-<namespace>-<name>` and holds no value.
#[tokio::test]
async fn credentials_become_secret_references() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = Fixture::start().await;
    let cp = start_cp(&fixture, tmp.path(), &["--kube-runner-image", RUNNER_IMAGE]).await;
    let (code, body) = cp
        .send(cp.req(Method::POST, "/api/v1/sandboxes").json(&json!({
        "name": "eps", "namespace": "team-a",
        "credentials": [
            {"name": "openai", "env": "OPENAI_API_KEY"},
            {"name": "gcp", "file": "/run/credentials/gcp.json"},
        ]})))
        .await;
    assert_eq!(code, 201, "{body}");
    let pod = fixture.get("pods", NS, "sandbox-eps.team-a").unwrap();
    let container = &pod["spec"]["containers"][0];
    let env = env_of(container);
    assert_eq!(
        env["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"],
        json!({"name": "credential-team-a-openai", "key": "value", "optional": false})
    );
    assert!(env["OPENAI_API_KEY"].get("value").is_none());
    let volume = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "credential-gcp")
        .unwrap();
    assert_eq!(volume["secret"]["secretName"], "credential-team-a-gcp");
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "credential-gcp")
        .unwrap();
    assert_eq!(mount["mountPath"], "/run/credentials/gcp.json");
    assert_eq!(mount["readOnly"], true);
}

/// Policies live in one ConfigMap every replica reads: a policy set through one replica applies
/// in the other (within its refresh), and replicas writing at once lose no update (the read
/// `resourceVersion` is the patch's precondition; a conflict is read again and retried).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_are_one_configmap_shared_by_replicas() {
    let tmp1 = tempfile::tempdir().unwrap();
    let tmp2 = tempfile::tempdir().unwrap();
    let fixture = Fixture::start().await;
    let cp1 = start_cp(
        &fixture,
        tmp1.path(),
        &["--kube-runner-image", RUNNER_IMAGE],
    )
    .await;
    let cp2 = start_cp(
        &fixture,
        tmp2.path(),
        &["--kube-runner-image", RUNNER_IMAGE],
    )
    .await;
    let (code, body) = cp1
        .send(
            cp1.req(Method::PUT, "/api/v1/governance/policies/team-a")
                .json(&json!({"maxSandboxesTotal": 0})),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let cm = fixture
        .get("configmaps", NS, "agentbox-governance")
        .unwrap();
    let stored: Value =
        serde_json::from_str(cm["data"]["policies.json"].as_str().unwrap()).unwrap();
    assert_eq!(stored["policies"]["team-a"]["maxSandboxesTotal"], 0);
    // The other replica applies it within its refresh (2 s): its create is refused.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (code, body) = cp2
            .send(cp2.req(Method::POST, "/api/v1/sandboxes").json(&json!({
                "name": "refused", "namespace": "team-a"})))
            .await;
        if code == 403 {
            assert_eq!(body["error"], "policy_violation", "{body}");
            assert_eq!(
                body["violations"][0]["field"], "maxSandboxesTotal",
                "{body}"
            );
            break;
        }
        assert_eq!(code, 201, "{body}");
        let (code, _) = cp2.send(cp2.sb(Method::DELETE, "refused", "")).await;
        assert_eq!(code, 200);
        assert!(Instant::now() < deadline, "replica 2 never read the policy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Both replicas write at once, 10 namespaces each: every one is kept.
    let writes = (0..20).map(|i| {
        let cp = if i % 2 == 0 { &cp1 } else { &cp2 };
        cp.send(
            cp.req(Method::PUT, &format!("/api/v1/governance/policies/ns-{i}"))
                .json(&json!({"maxSandboxesTotal": i})),
        )
    });
    for (code, body) in futures_util::future::join_all(writes).await {
        assert_eq!(code, 200, "{body}");
    }
    let cm = fixture
        .get("configmaps", NS, "agentbox-governance")
        .unwrap();
    let stored: Value =
        serde_json::from_str(cm["data"]["policies.json"].as_str().unwrap()).unwrap();
    for i in 0..20 {
        assert_eq!(
            stored["policies"][format!("ns-{i}")]["maxSandboxesTotal"],
            i,
            "{stored}"
        );
    }
    assert_eq!(stored["policies"]["team-a"]["maxSandboxesTotal"], 0);
    // Every write was a precondition patch (or the first create).
    let patches = fixture
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path.ends_with("/configmaps/agentbox-governance"))
        .count();
    assert!(patches >= 20, "{patches}");
}

/// Ports on Kubernetes: no Service is made; the control plane reaches a forwarded port through
/// the pod's runner, by pod IP, as every request. The runner here stands in for the pod's
/// container, so its 127.0.0.1 is the pod's: the test's own listener there is the "server in
/// the pod".
#[tokio::test]
async fn ports_reach_the_pod_through_its_runner() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let r = running("web").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 4096];
        let mut head = Vec::new();
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\nfrom-k8")
            .await
            .unwrap();
        String::from_utf8_lossy(&head).into_owned()
    });
    let (status, body) =
        r.cp.send(
            r.cp.sb(Method::POST, "web", "/ports")
                .json(&json!({ "port": port })),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = r.cp.send(r.cp.sb(Method::GET, "web", "/preview/1/")).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"], "port_not_forwarded", "{body}");
    let resp =
        r.cp.sb(Method::GET, "web", &format!("/preview/{port}/hello?q=1"))
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "from-k8");
    let head = server.await.unwrap().to_ascii_lowercase();
    assert!(head.starts_with("get /hello?q=1 http/1.1\r\n"), "{head}");
    assert!(
        !head.contains("authorization") && !head.contains("x-api-key"),
        "{head}"
    );
}

/// Names are per namespace: one name in two namespaces is two Secrets and two Pods, named and
/// labelled by their keys (`same.team-a`), each `same` inside; a name and namespace too long
/// for a label value (63) together are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_name_in_two_namespaces_is_two_sandboxes() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = Fixture::start().await;
    let cp = start_cp(&fixture, tmp.path(), &["--kube-runner-image", RUNNER_IMAGE]).await;
    for ns in ["team-a", "team-b"] {
        let (code, body) = cp
            .send(
                cp.req(Method::POST, "/api/v1/sandboxes")
                    .json(&json!({"name": "same", "namespace": ns})),
            )
            .await;
        assert_eq!(code, 201, "{body}");
        assert_eq!(
            (&body["name"], &body["namespace"]),
            (&json!("same"), &json!(ns))
        );
        let key = format!("same.{ns}");
        let pod = fixture.get("pods", NS, &format!("sandbox-{key}")).unwrap();
        assert_eq!(pod["metadata"]["labels"]["agentbox.dev/sandbox"], key);
        let env = env_of(&pod["spec"]["containers"][0]);
        assert_eq!(env["AGENTBOX_SANDBOX"]["value"], "same");
    }
    // The administrator sees both (once its cache has them) and must pick.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (code, body) = cp.get("same").await;
        if code == 409 {
            assert_eq!(body["error"], "ambiguous_name", "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "never ambiguous: {code} {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, body) = cp
        .send(cp.sb(Method::GET, "same", "?namespace=team-b"))
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["namespace"], "team-b");
    let (code, body) = cp
        .send(
            cp.req(Method::POST, "/api/v1/sandboxes")
                .json(&json!({"name": "a".repeat(40), "namespace": "b".repeat(30)})),
        )
        .await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("Kubernetes labels"),
        "{body}"
    );
    let (code, body) = cp.send(cp.sb(Method::DELETE, "same.team-b", "")).await;
    assert_eq!(code, 200, "{body}");
    assert!(fixture.get("pods", NS, "sandbox-same.team-b").is_none());
    assert!(fixture.get("secrets", NS, "sandbox-same.team-a").is_some());
}

/// The template ConfigMap giving template `name` a workspace claim of `size` (of `class`).
fn put_pvc_template(fixture: &Fixture, name: &str, size: &str, class: Option<&str>) {
    let mut pvc = json!({
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": size}},
    });
    if let Some(class) = class {
        pvc["storageClassName"] = json!(class);
    }
    fixture.put(
        "configmaps",
        NS,
        json!({
            "metadata": {"name": format!("agentbox-template-{name}")},
            "data": {"pvc.json": pvc.to_string()},
        }),
    );
}

/// The create lock, once released (bounded: the release follows the response).
async fn released_lease(fixture: &Fixture) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let lease = fixture.get("leases", NS, "agentbox-create-lock").unwrap();
        if lease["spec"]["holderIdentity"].is_null() {
            return lease;
        }
        assert!(Instant::now() < deadline, "never released: {lease}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sets the policy of `namespace` through `cps[0]` and waits until every replica applies it.
async fn set_policy(cps: &[&Cp], namespace: &str, policy: Value) {
    let (code, body) = cps[0]
        .send(
            cps[0]
                .req(
                    Method::PUT,
                    &format!("/api/v1/governance/policies/{namespace}"),
                )
                .json(&policy),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let probe = if namespace == "*" {
        "any-ns"
    } else {
        namespace
    };
    for cp in cps {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (code, body) = cp
                .send(cp.req(
                    Method::GET,
                    &format!("/api/v1/governance/effective?namespace={probe}"),
                ))
                .await;
            assert_eq!(code, 200, "{body}");
            if body["policy"] == policy {
                break;
            }
            assert!(Instant::now() < deadline, "a replica never read {policy}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Issue 23: counts are exact across replicas. Two control planes (two processes, each its own
/// state directory, as two pods) race a create each for the last slot of a namespace
/// (`maxSandboxesTotal: 1`), once per namespace, as many times as fit in 20 s: exactly one
/// wins every time (201), the other is refused (403 `policy_violation`), and the fixture holds
/// exactly one record per namespace. Without the Lease (or with counts from the caches, which
/// lag the other replica's create) both would win.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_racing_for_the_last_slot_exactly_one_wins() {
    let tmp1 = tempfile::tempdir().unwrap();
    let tmp2 = tempfile::tempdir().unwrap();
    let fixture = Fixture::start().await;
    let args = ["--kube-runner-image", RUNNER_IMAGE];
    let cp1 = start_cp(&fixture, tmp1.path(), &args).await;
    let cp2 = start_cp(&fixture, tmp2.path(), &args).await;
    set_policy(&[&cp1, &cp2], "*", json!({"maxSandboxesTotal": 1})).await;
    // As many trials as fit in 20 s (about 340 on a 2-core machine), or exactly
    // K8S_RACE_TRIALS of them (`K8S_RACE_TRIALS=1000` passes too, in about a minute).
    let wanted: Option<usize> = std::env::var("K8S_RACE_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok());
    let budget = Duration::from_secs(20);
    let started = Instant::now();
    let mut trials = 0usize;
    while wanted.map_or(started.elapsed() < budget && trials < 1000, |n| trials < n) {
        let ns = format!("race-{trials}");
        let create = |cp: &Cp, name: String| {
            cp.req(Method::POST, "/api/v1/sandboxes")
                .json(&json!({"name": name, "namespace": ns}))
        };
        let (a, b) = tokio::join!(
            cp1.send(create(&cp1, format!("a-{trials}"))),
            cp2.send(create(&cp2, format!("b-{trials}")))
        );
        let mut codes = [a.0, b.0];
        codes.sort_unstable();
        assert_eq!(codes, [201, 403], "trial {trials}: {a:?} {b:?}");
        let refused = if a.0 == 403 { &a.1 } else { &b.1 };
        assert_eq!(refused["error"], "policy_violation", "{refused}");
        assert_eq!(refused["violations"][0]["field"], "maxSandboxesTotal");
        trials += 1;
    }
    eprintln!(
        "{trials} races for the last slot in {:.1}s: exactly one winner each",
        started.elapsed().as_secs_f64()
    );
    assert!(
        trials >= wanted.unwrap_or(100),
        "only {trials} trials ran in {budget:?}"
    );
    let mut per_ns: BTreeMap<String, usize> = BTreeMap::new();
    for secret in fixture.list("secrets", NS) {
        if let Some(ns) = secret["metadata"]["labels"]["agentbox.dev/namespace"].as_str() {
            *per_ns.entry(ns.to_owned()).or_default() += 1;
        }
    }
    assert_eq!(per_ns.len(), trials);
    assert!(per_ns.values().all(|&n| n == 1), "{per_ns:?}");
    // The lock is free at the end, and was taken for every create.
    let lease = released_lease(&fixture).await;
    assert!(lease["spec"]["leaseTransitions"].as_u64().unwrap() >= 2 * trials as u64 - 1);
}

/// Counts under the create lock are read from the API server, not from the replica's caches:
/// with the second replica's watches 400 ms late (its caches lag every write by that much),
/// its create for the slot the first replica took a moment ago is still refused. Counting from
/// the caches, it would be created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_do_not_trust_a_lagging_cache() {
    let tmp1 = tempfile::tempdir().unwrap();
    let tmp2 = tempfile::tempdir().unwrap();
    let fixture = Fixture::start().await;
    let lagging = fixture.lagging(Duration::from_millis(400)).await;
    let args = ["--kube-runner-image", RUNNER_IMAGE];
    let cp1 = start_cp(&fixture, tmp1.path(), &args).await;
    let cp2 = start_cp_with(&Fixture::kubeconfig_at(lagging, NS), tmp2.path(), &args).await;
    set_policy(&[&cp1, &cp2], "*", json!({"maxSandboxesTotal": 1})).await;
    for i in 0..5 {
        let ns = format!("lag-{i}");
        let (code, body) = cp1
            .send(
                cp1.req(Method::POST, "/api/v1/sandboxes")
                    .json(&json!({"name": format!("first-{i}"), "namespace": ns})),
            )
            .await;
        assert_eq!(code, 201, "{body}");
        // The lagging replica does not list it yet...
        let (code, _) = cp2.get(&format!("first-{i}")).await;
        assert_eq!(code, 404, "the second replica's cache is not lagging");
        // ...and still counts it.
        let (code, body) = cp2
            .send(
                cp2.req(Method::POST, "/api/v1/sandboxes")
                    .json(&json!({"name": format!("second-{i}"), "namespace": ns})),
            )
            .await;
        assert_eq!(code, 403, "{body}");
        assert_eq!(body["violations"][0]["field"], "maxSandboxesTotal");
    }
}

/// A create lock left by a replica that died is taken over once its lease expires (observed
/// unchanged for its `leaseDurationSeconds`), not before; a live holder's is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_holders_create_lock_is_taken_over_after_its_lease() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = Fixture::start().await;
    let cp = start_cp(&fixture, tmp.path(), &["--kube-runner-image", RUNNER_IMAGE]).await;
    set_policy(&[&cp], "team-a", json!({"maxSandboxesTotal": 5})).await;
    fixture.put(
        "leases",
        NS,
        json!({
            "metadata": {"name": "agentbox-create-lock"},
            "spec": {
                "holderIdentity": "dead-replica",
                "leaseDurationSeconds": 3,
                "acquireTime": "2026-01-02T03:04:05.000000Z",
                "renewTime": "2026-01-02T03:04:05.000000Z",
                "leaseTransitions": 7,
            },
        }),
    );
    let started = Instant::now();
    let (code, body) = cp
        .send(
            cp.req(Method::POST, "/api/v1/sandboxes")
                .json(&json!({"name": "after-takeover", "namespace": "team-a"})),
        )
        .await;
    let waited = started.elapsed();
    assert_eq!(code, 201, "{body}");
    assert!(
        waited >= Duration::from_millis(2900),
        "took a live-looking lock: {waited:?}"
    );
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    let lease = released_lease(&fixture).await;
    assert_eq!(lease["spec"]["leaseTransitions"], 8, "{lease}");
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 15, "{lease}");
    // Taken by a preconditioned patch, released by another.
    let patches = fixture
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path.ends_with("/leases/agentbox-create-lock"))
        .count();
    assert!(patches >= 2, "{patches}");
    // A holder that keeps renewing is never taken over: the lease changes every second.
    fixture.update("leases", NS, "agentbox-create-lock", |l| {
        l["spec"]["holderIdentity"] = json!("live-replica");
        l["spec"]["leaseDurationSeconds"] = json!(2);
    });
    let renewing = async {
        for i in 0..6 {
            tokio::time::sleep(Duration::from_millis(700)).await;
            fixture.update("leases", NS, "agentbox-create-lock", |l| {
                l["spec"]["renewTime"] = json!(format!("2026-01-02T03:04:{i:02}.000000Z"));
            });
        }
        fixture.update("leases", NS, "agentbox-create-lock", |l| {
            l["spec"]["holderIdentity"] = Value::Null;
        });
    };
    let started = Instant::now();
    let ((code, body), ()) = tokio::join!(
        cp.send(
            cp.req(Method::POST, "/api/v1/sandboxes")
                .json(&json!({"name": "after-release", "namespace": "team-a"})),
        ),
        renewing
    );
    assert_eq!(code, 201, "{body}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(4000),
        "took a renewed lock: {waited:?}"
    );
    // Creates that count nothing take no lock.
    set_policy(&[&cp], "team-b", json!({"allowedTemplates": ["*"]})).await;
    fixture.update("leases", NS, "agentbox-create-lock", |l| {
        l["spec"]["holderIdentity"] = json!("live-replica");
        l["spec"]["leaseDurationSeconds"] = json!(3600);
    });
    let (code, body) = cp
        .send(
            cp.req(Method::POST, "/api/v1/sandboxes")
                .json(&json!({"name": "uncounted", "namespace": "team-b"})),
        )
        .await;
    assert_eq!(code, 201, "{body}");
}

/// Plays the kubelet for sandboxes `names`: whenever one's Pod is in the fixture and not
/// Running, makes it Running and Ready on 127.0.0.1 with its runner on `port`. The one runner
/// stands in for every pod, so each record's token becomes its token. Never returns.
async fn kubelet(fixture: &Fixture, names: &[&str], port: u16) {
    let token = base64::engine::general_purpose::STANDARD.encode(TOKEN);
    loop {
        for name in names {
            let object = format!("sandbox-{name}");
            let stale = fixture
                .get("secrets", NS, &object)
                .is_some_and(|s| s["data"]["token"] != token.as_str());
            if stale {
                fixture.update("secrets", NS, &object, |s| {
                    s["data"]["token"] = json!(token);
                });
            }
            let pending = fixture
                .get("pods", NS, &object)
                .is_some_and(|p| p["status"]["phase"] != "Running");
            if pending {
                fixture.update("pods", NS, &object, |p| {
                    p["spec"]["containers"][0]["ports"] =
                        json!([{"name": "runner", "containerPort": port}]);
                    p["status"] = json!({
                        "phase": "Running", "podIP": "127.0.0.1",
                        "conditions": [{"type": "Ready", "status": "True"}],
                    });
                });
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `GET` until `name` is Stopped for `reason` (bounded).
async fn wait_stopped(cp: &Cp, name: &str, reason: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (code, body) = cp.get(name).await;
        if code == 200 && body["status"] == "Stopped" {
            assert_eq!(body["stopReason"], reason, "{body}");
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never stopped: {code} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Issue 24 on Kubernetes: a sandbox unused for its `idleTimeout` (the template's default) is
/// stopped by the sweep (its Pod deleted, its record and claim kept, `stopReason: idle`), and the
/// next invoke resumes it (a new Pod) and is served with the exact output, never a 409; uses
/// are written on the record (`last-activity`) at most twice per quarter of the idle timeout. A
/// `timeout` stops a sandbox for good (`stopReason: timeout`, no resume on demand), or deletes it
/// when its template says `onTimeout: delete`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_stop_resume_on_demand_and_lifetimes() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = Fixture::start().await;
    let (_runner, runner_addr) = start_runner(tmp.path()).await;
    let templates = write_templates(
        tmp.path(),
        json!([
            {"name": "sleepy", "mode": "agent", "idleTimeout": "2s"},
            {"name": "ttl", "mode": "agent", "timeout": "3s"},
            {"name": "ttl-delete", "mode": "agent", "timeout": "3s", "onTimeout": "delete"},
        ]),
    );
    put_pvc_template(&fixture, "sleepy", "1Gi", None);
    let cp = start_cp(
        &fixture,
        tmp.path(),
        &[
            "--kube-runner-image",
            RUNNER_IMAGE,
            "--templates-file",
            &templates,
            "--lifecycle-interval",
            "200ms",
        ],
    )
    .await;
    let body = async {
        // Bad durations are refused before anything is made.
        let (code, body) = cp
            .send(
                cp.req(Method::POST, "/api/v1/sandboxes")
                    .json(&json!({"name": "bad", "idleTimeout": "soon"})),
            )
            .await;
        assert_eq!(
            (code, body["error"].as_str()),
            (400, Some("invalid_request")),
            "{body}"
        );
        assert!(fixture.get("secrets", NS, "sandbox-bad").is_none());
        for (name, template) in [
            ("napper", "sleepy"),
            ("short", "ttl"),
            ("gone", "ttl-delete"),
        ] {
            let (code, body) = cp
                .send(
                    cp.req(Method::POST, "/api/v1/sandboxes")
                        .json(&json!({"name": name, "templateRef": {"name": template}})),
                )
                .await;
            assert_eq!(code, 201, "{body}");
        }
        let secret = fixture.get("secrets", NS, "sandbox-napper").unwrap();
        let ann = &secret["metadata"]["annotations"];
        assert_eq!(ann["agentbox.dev/idle-timeout"], "2s");
        assert!(ann["agentbox.dev/started-at"].is_string());
        let short = cp.wait_status("short", "Running").await;
        assert_eq!(short["timeout"], "3s");
        assert!(short["expiresAt"].is_string(), "{short}");
        cp.wait_status("napper", "Running").await;
        configure(&cp, "napper", "cat").await;
        let writes = || {
            fixture
                .requests()
                .iter()
                .filter(|r| r.method == "PATCH" && r.path.ends_with("/secrets/sandbox-napper"))
                .count()
        };
        // Past the configure's write: the burst's first request writes again.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let before = writes();
        let burst = Instant::now();
        for i in 0..10 {
            assert_eq!(
                invoke(&cp, "napper", &format!("n{i}")).await,
                format!("n{i}").as_bytes()
            );
        }
        let burst = burst.elapsed();
        let last_use = Instant::now();
        tokio::time::sleep(Duration::from_millis(200)).await; // written in the background
        let written = writes() - before;
        // Two writes per 500 ms (2s / 4) at most, not one per request.
        let most = 2 + 2 * usize::try_from(burst.as_millis() / 500).unwrap();
        assert!(
            (1..=most).contains(&written),
            "{written} writes in {burst:?}"
        );
        let ann = &fixture.get("secrets", NS, "sandbox-napper").unwrap()["metadata"]["annotations"];
        assert!(ann["agentbox.dev/last-activity"].is_string(), "{ann}");

        // Idle: stopped by the sweep, the record and claim kept, the Pod gone.
        let pod = fixture.get("pods", NS, "sandbox-napper").unwrap();
        let stopped = wait_stopped(&cp, "napper", "idle").await;
        assert!(
            last_use.elapsed() >= Duration::from_millis(1900),
            "{:?}",
            last_use.elapsed()
        );
        assert_eq!(stopped["idleTimeout"], "2s");
        assert!(fixture.get("pods", NS, "sandbox-napper").is_none());
        let ann = fixture.get("secrets", NS, "sandbox-napper").unwrap()["metadata"]["annotations"]
            .clone();
        assert_eq!(ann["agentbox.dev/stop-reason"], "idle");
        assert!(ann["agentbox.dev/stopped"].is_string());
        assert!(fixture
            .get("persistentvolumeclaims", NS, "sandbox-napper-workspace")
            .is_some());

        // Resumed on demand by the next invoke, which is served: a new Pod, the same spec.
        assert_eq!(invoke(&cp, "napper", "again").await, b"again");
        let again = fixture.get("pods", NS, "sandbox-napper").unwrap();
        assert_ne!(again["metadata"]["uid"], pod["metadata"]["uid"]);
        assert_eq!(
            again["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
            "sandbox-napper-workspace"
        );
        let (code, body) = cp.get("napper").await;
        assert_eq!(code, 200);
        assert_eq!(body["status"], "Running", "{body}");
        assert!(body.get("stopReason").is_none_or(Value::is_null), "{body}");
        let ann = fixture.get("secrets", NS, "sandbox-napper").unwrap()["metadata"]["annotations"]
            .clone();
        assert!(ann.get("agentbox.dev/stopped").is_none(), "{ann}");
        assert!(ann.get("agentbox.dev/stop-reason").is_none(), "{ann}");

        // Lifetimes: stopped for good (a request is refused, not a resume), or deleted.
        wait_stopped(&cp, "short", "timeout").await;
        assert!(fixture.get("pods", NS, "sandbox-short").is_none());
        let (code, bytes) = cp.post_stream("short", "/invoke", "x".into()).await;
        assert_eq!(code, 409, "{}", String::from_utf8_lossy(&bytes));
        assert!(fixture.get("pods", NS, "sandbox-short").is_none());
        let deadline = Instant::now() + Duration::from_secs(10);
        while cp.get("gone").await.0 != 404 {
            assert!(Instant::now() < deadline, "gone was never deleted");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(fixture.get("secrets", NS, "sandbox-gone").is_none());
        // A user's stop says so, and is not resumed on demand either.
        let (code, body) = cp.send(cp.sb(Method::POST, "napper", "/stop")).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["stopReason"], "user", "{body}");
        let (code, _) = cp.post_stream("napper", "/invoke", "x".into()).await;
        assert_eq!(code, 409);
    };
    tokio::select! {
        () = body => {}
        () = kubelet(&fixture, &["napper", "short", "gone"], runner_addr.port()) => unreachable!(),
    }
}

/// Plays the kubelet for every Pod in the fixture (see [`kubelet`]). Never returns.
async fn kubelet_all(fixture: &Fixture, port: u16) {
    let token = base64::engine::general_purpose::STANDARD.encode(TOKEN);
    loop {
        for secret in fixture.list("secrets", NS) {
            if secret["data"]["token"].is_string() && secret["data"]["token"] != token.as_str() {
                let name = secret["metadata"]["name"].as_str().unwrap().to_owned();
                fixture.update("secrets", NS, &name, |s| s["data"]["token"] = json!(token));
            }
        }
        for pod in fixture.list("pods", NS) {
            if pod["status"]["phase"] != "Running" {
                let name = pod["metadata"]["name"].as_str().unwrap().to_owned();
                fixture.update("pods", NS, &name, |p| {
                    p["spec"]["containers"][0]["ports"] =
                        json!([{"name": "runner", "containerPort": port}]);
                    p["status"] = json!({
                        "phase": "Running", "podIP": "127.0.0.1",
                        "conditions": [{"type": "Ready", "status": "True"}],
                    });
                });
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits (bounded) until template `pooled` has exactly `n` pooled Pods in the fixture, all
/// Running, every replica reports `n` ready, and that holds for half a second.
async fn wait_pool(fixture: &Fixture, cps: &[&Cp], n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut stable = 0;
    loop {
        let pods: Vec<Value> = fixture
            .list("pods", NS)
            .into_iter()
            .filter(|p| p["metadata"]["labels"]["agentbox.dev/pool"] == "pooled")
            .collect();
        let mut ok = pods.len() == n && pods.iter().all(|p| p["status"]["phase"] == "Running");
        for cp in cps {
            let (code, body) = cp
                .send(cp.req(Method::GET, "/api/v1/warmpool/status"))
                .await;
            assert_eq!(code, 200, "{body}");
            ok &= body["pools"][0]["ready"] == n;
        }
        stable = if ok { stable + 1 } else { 0 };
        if stable >= 5 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the pool never settled at {n}: {} pods",
            pods.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Issue 24's warm pools on Kubernetes: pooled Pods (labelled `agentbox.dev/pool=<template>`,
/// each with a Secret of its own token) are kept at the template's size by both replicas,
/// listed nowhere and counted in no quota; 20 creates at once through two replicas claim them
/// by relabelling with a `resourceVersion` precondition: no Pod is handed to two sandboxes,
/// every create succeeds (cold when none is ready), the pool is refilled to its size, and a
/// claimed sandbox serves at once and is deleted with its pooled objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_pool_claims_across_replicas_never_share_a_pod() {
    let tmp1 = tempfile::tempdir().unwrap();
    let tmp2 = tempfile::tempdir().unwrap();
    let fixture = Fixture::start().await;
    let (_runner, runner_addr) = start_runner(tmp1.path()).await;
    let templates = write_templates(
        tmp1.path(),
        json!([{"name": "pooled", "mode": "agent", "warmPool": {"size": 3}}]),
    );
    let args = [
        "--kube-runner-image",
        RUNNER_IMAGE,
        "--templates-file",
        &templates,
    ];
    let cp1 = start_cp(&fixture, tmp1.path(), &args).await;
    let cp2 = start_cp(&fixture, tmp2.path(), &args).await;
    let body = async {
        wait_pool(&fixture, &[&cp1, &cp2], 3).await;
        assert!(
            cp1.list().await.is_empty(),
            "pooled sandboxes are not listed"
        );
        let pooled = fixture.get(
            "pods",
            NS,
            fixture.list("pods", NS)[0]["metadata"]["name"]
                .as_str()
                .unwrap(),
        );
        let pooled = pooled.unwrap();
        assert!(pooled["metadata"]["labels"]
            .get("agentbox.dev/sandbox")
            .is_none());
        assert_eq!(
            pooled["metadata"]["ownerReferences"][0]["kind"], "Secret",
            "{pooled}"
        );

        // Quotas count no pooled sandbox: the namespace's one slot is free, and taken once.
        set_policy(&[&cp1], "team-p", json!({"maxSandboxesTotal": 1})).await;
        let (code, body) = cp1
            .send(cp1.req(Method::POST, "/api/v1/sandboxes").json(
                &json!({"name": "quota", "namespace": "team-p", "templateRef": {"name": "pooled"}}),
            ))
            .await;
        assert_eq!(code, 201, "{body}");
        assert_eq!(body["fromWarmPool"], true, "{body}");
        let (code, body) = cp1
            .send(cp1.req(Method::POST, "/api/v1/sandboxes").json(
                &json!({"name": "quota2", "namespace": "team-p", "templateRef": {"name": "pooled"}}),
            ))
            .await;
        assert_eq!(code, 403, "{body}");
        wait_pool(&fixture, &[&cp1, &cp2], 3).await;

        // 20 creates at once, half through each replica.
        let creates = (0..20).map(|i| {
            let cp = if i % 2 == 0 { &cp1 } else { &cp2 };
            cp.send(
                cp.req(Method::POST, "/api/v1/sandboxes")
                    .json(&json!({"name": format!("w{i}"), "templateRef": {"name": "pooled"}})),
            )
        });
        let results = futures_util::future::join_all(creates).await;
        let mut hits = 0;
        for (code, body) in &results {
            assert_eq!(*code, 201, "{body}");
            if body["fromWarmPool"] == true {
                hits += 1;
            } else {
                assert_eq!(body["fromWarmPool"], false, "{body}");
            }
        }
        assert!(hits >= 3, "only {hits} claims with 3 ready");
        // No Pod serves two sandboxes: each record names its own, labelled for it alone.
        let mut pods = std::collections::BTreeSet::new();
        for i in 0..20 {
            let name = format!("w{i}");
            let secret = fixture
                .get("secrets", NS, &format!("sandbox-{name}"))
                .unwrap();
            let pod = secret["metadata"]["annotations"]["agentbox.dev/pod"]
                .as_str()
                .map_or_else(|| format!("sandbox-{name}"), str::to_owned);
            let object = fixture.get("pods", NS, &pod).unwrap();
            assert_eq!(
                object["metadata"]["labels"]["agentbox.dev/sandbox"],
                name.as_str()
            );
            assert!(object["metadata"]["labels"]
                .get("agentbox.dev/pool")
                .is_none());
            assert!(pods.insert(pod.clone()), "{pod} handed out twice");
        }
        assert_eq!(
            pods.iter().filter(|p| p.starts_with("pool-")).count(),
            hits,
            "{pods:?}"
        );
        // Back to size, and the claims counted.
        wait_pool(&fixture, &[&cp1, &cp2], 3).await;
        let mut claimed = 0;
        for cp in [&cp1, &cp2] {
            let (_, status) = cp
                .send(cp.req(Method::GET, "/api/v1/warmpool/status"))
                .await;
            let pool = &status["pools"][0];
            assert_eq!(
                (pool["template"].as_str(), pool["size"].as_u64()),
                (Some("pooled"), Some(3))
            );
            claimed += pool["hits"].as_u64().unwrap();
        }
        assert_eq!(claimed, hits as u64 + 1, "the 20 and the quota one");
        assert_eq!(cp2.list().await.len(), 21);

        // A claimed sandbox serves at once, through the pooled Pod, with the pool's token.
        let (i, _) = results
            .iter()
            .enumerate()
            .find(|(_, (_, b))| b["fromWarmPool"] == true)
            .unwrap();
        let name = format!("w{i}");
        cp1.wait_status(&name, "Running").await;
        configure(&cp1, &name, "cat").await;
        assert_eq!(invoke(&cp2, &name, "warm").await, b"warm");
        // Deleted with its pooled Pod and that Pod's Secret.
        let pod = fixture
            .get("secrets", NS, &format!("sandbox-{name}"))
            .unwrap()["metadata"]["annotations"]["agentbox.dev/pod"]
            .as_str()
            .unwrap()
            .to_owned();
        let (code, _) = cp1.send(cp1.sb(Method::DELETE, &name, "")).await;
        assert_eq!(code, 200);
        assert!(fixture.get("pods", NS, &pod).is_none());
        assert!(fixture.get("secrets", NS, &pod).is_none());
        assert!(fixture
            .get("secrets", NS, &format!("sandbox-{name}"))
            .is_none());
        // Another one, stopped and resumed: its own Pod from then on, from its record.
        let (i, _) = results
            .iter()
            .enumerate()
            .filter(|(j, _)| format!("w{j}") != name)
            .find(|(_, (_, b))| b["fromWarmPool"] == true)
            .unwrap();
        let name = format!("w{i}");
        let secret = fixture
            .get("secrets", NS, &format!("sandbox-{name}"))
            .unwrap();
        let pod = secret["metadata"]["annotations"]["agentbox.dev/pod"]
            .as_str()
            .unwrap()
            .to_owned();
        let (code, body) = cp2.send(cp2.sb(Method::POST, &name, "/stop")).await;
        assert_eq!(code, 200, "{body}");
        assert!(fixture.get("pods", NS, &pod).is_none());
        assert!(
            fixture.get("secrets", NS, &pod).is_none(),
            "its pooled Secret goes too"
        );
        let (code, body) = cp2.send(cp2.sb(Method::POST, &name, "/resume")).await;
        assert_eq!(code, 200, "{body}");
        let own = fixture.get("pods", NS, &format!("sandbox-{name}")).unwrap();
        assert_eq!(
            own["metadata"]["labels"]["agentbox.dev/sandbox"],
            name.as_str()
        );
        cp1.wait_status(&name, "Running").await;
    };
    tokio::select! {
        () = body => {}
        () = kubelet_all(&fixture, runner_addr.port()) => unreachable!(),
    }
}

/// Issue 24's clone on Kubernetes: a VolumeSnapshot (snapshot.storage.k8s.io/v1) of the
/// source's workspace claim, a new claim restored from it (`dataSource`), the source's Pod made
/// the clone's (its own name, token Secret, claim), the same template, namespace and timeouts.
/// What the fixture checks is the objects a real API server would get; no CSI driver copies
/// data here. A source whose workspace is an `emptyDir` answers 409 `not_cloneable` and leaves
/// nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_is_a_volume_snapshot_and_a_claim_from_it() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = Fixture::start().await;
    let (_runner, runner_addr) = start_runner(tmp.path()).await;
    let templates = write_templates(
        tmp.path(),
        json!([{"name": "persist", "mode": "agent", "idleTimeout": "1h"}]),
    );
    put_pvc_template(&fixture, "persist", "2Gi", Some("csi-snapshots"));
    let cp = start_cp(
        &fixture,
        tmp.path(),
        &[
            "--kube-runner-image",
            RUNNER_IMAGE,
            "--templates-file",
            &templates,
        ],
    )
    .await;
    let body = async {
        for (name, template) in [("src", "persist"), ("plain", "default")] {
            let (code, body) = cp
                .send(cp.req(Method::POST, "/api/v1/sandboxes").json(
                    &json!({"name": name, "namespace": "team-c", "templateRef": {"name": template}}),
                ))
                .await;
            assert_eq!(code, 201, "{body}");
        }
        cp.wait_status("src", "Running").await;
        configure(&cp, "src", "cat").await;

        let (code, body) = cp
            .send(
                cp.sb(Method::POST, "src", "/clone")
                    .json(&json!({"name": "copy"})),
            )
            .await;
        assert_eq!(code, 202, "{body}");
        assert_eq!(body["name"], "copy");
        assert_eq!(body["namespace"], "team-c");
        assert_eq!(body["clonedFrom"], "src");
        assert_eq!(body["templateRef"], "persist");
        assert_eq!(body["idleTimeout"], "1h");
        assert_eq!(body["pvcName"], "sandbox-copy.team-c-workspace");
        let snapshot = fixture
            .get("volumesnapshots", NS, "sandbox-copy.team-c-snapshot")
            .unwrap();
        assert_eq!(snapshot["apiVersion"], "snapshot.storage.k8s.io/v1");
        assert_eq!(
            snapshot["spec"]["source"]["persistentVolumeClaimName"],
            "sandbox-src.team-c-workspace"
        );
        let secret = fixture.get("secrets", NS, "sandbox-copy.team-c").unwrap();
        assert_eq!(
            snapshot["metadata"]["ownerReferences"][0]["uid"],
            secret["metadata"]["uid"]
        );
        let pvc = fixture
            .get(
                "persistentvolumeclaims",
                NS,
                "sandbox-copy.team-c-workspace",
            )
            .unwrap();
        assert_eq!(
            pvc["spec"]["dataSource"],
            json!({"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot",
                   "name": "sandbox-copy.team-c-snapshot"})
        );
        assert_eq!(pvc["spec"]["storageClassName"], "csi-snapshots");
        assert_eq!(pvc["spec"]["resources"]["requests"]["storage"], "2Gi");
        let source = fixture.get("pods", NS, "sandbox-src.team-c").unwrap();
        let pod = fixture.get("pods", NS, "sandbox-copy.team-c").unwrap();
        assert_eq!(
            pod["metadata"]["labels"]["agentbox.dev/sandbox"],
            "copy.team-c"
        );
        assert_eq!(
            pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
            "sandbox-copy.team-c-workspace"
        );
        let env = env_of(&pod["spec"]["containers"][0]);
        assert_eq!(env["AGENTBOX_SANDBOX"]["value"], "copy");
        assert_eq!(
            env["AGENTBOX_RUNNER_TOKEN"]["valueFrom"]["secretKeyRef"]["name"],
            "sandbox-copy.team-c"
        );
        assert_eq!(
            pod["spec"]["containers"][0]["image"],
            source["spec"]["containers"][0]["image"]
        );
        let ann = &secret["metadata"]["annotations"];
        // The record names the source by its key (the API shows its name).
        assert_eq!(ann["agentbox.dev/cloned-from"], "src.team-c");
        assert_eq!(ann["agentbox.dev/namespace"], "team-c");
        // Its own Pod, stored for its resumes (the kubelet here gives every Secret the one
        // runner's token, so tokens are not compared).
        assert!(secret["data"]["pod.json"].is_string());
        // It starts like any sandbox (here the one runner stands in for the restored workspace).
        cp.wait_status("copy", "Running").await;
        assert_eq!(invoke(&cp, "copy", "cloned").await, b"cloned");

        // An emptyDir workspace cannot be snapshotted: a clear 409, nothing made.
        let (code, body) = cp
            .send(
                cp.sb(Method::POST, "plain", "/clone")
                    .json(&json!({"name": "copy2"})),
            )
            .await;
        assert_eq!(code, 409, "{body}");
        assert_eq!(body["error"], "not_cloneable", "{body}");
        assert!(
            body["message"].as_str().unwrap().contains("emptyDir"),
            "{body}"
        );
        assert!(fixture.get("secrets", NS, "sandbox-copy2.team-c").is_none());
        assert_eq!(fixture.list("volumesnapshots", NS).len(), 1);
        // Taken name, unknown source.
        let (code, body) = cp
            .send(
                cp.sb(Method::POST, "src", "/clone")
                    .json(&json!({"name": "plain"})),
            )
            .await;
        assert_eq!(
            (code, body["error"].as_str()),
            (409, Some("already_exists")),
            "{body}"
        );
        let (code, body) = cp
            .send(
                cp.sb(Method::POST, "nope", "/clone")
                    .json(&json!({"name": "x"})),
            )
            .await;
        assert_eq!(
            (code, body["error"].as_str()),
            (404, Some("sandbox_not_found")),
            "{body}"
        );

        // Deleting the clone removes its snapshot and claim; the source's stays.
        let (code, _) = cp.send(cp.sb(Method::DELETE, "copy", "")).await;
        assert_eq!(code, 200);
        assert!(fixture.list("volumesnapshots", NS).is_empty());
        assert!(fixture
            .get(
                "persistentvolumeclaims",
                NS,
                "sandbox-copy.team-c-workspace"
            )
            .is_none());
        assert!(fixture
            .get("persistentvolumeclaims", NS, "sandbox-src.team-c-workspace")
            .is_some());
    };
    tokio::select! {
        () = body => {}
        () = kubelet_all(&fixture, runner_addr.port()) => unreachable!(),
    }
}

/// Uses reach every replica: requests served by one replica (file writes, which the runner's
/// invoke list does not show) keep another replica's sweep from stopping the sandbox, through
/// the record's `last-activity`; once they stop, that sweep stops it after `idleTimeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uses_served_by_one_replica_keep_the_sandbox_awake_in_another() {
    let tmp1 = tempfile::tempdir().unwrap();
    let tmp2 = tempfile::tempdir().unwrap();
    let fixture = Fixture::start().await;
    let (_runner, runner_addr) = start_runner(tmp1.path()).await;
    let image = ["--kube-runner-image", RUNNER_IMAGE];
    let sweeper = start_cp(
        &fixture,
        tmp1.path(),
        &[image[0], image[1], "--lifecycle-interval", "200ms"],
    )
    .await;
    let server = start_cp(
        &fixture,
        tmp2.path(),
        &[image[0], image[1], "--lifecycle-interval", "1h"],
    )
    .await;
    let body = async {
        let (code, body) = server
            .send(
                server
                    .req(Method::POST, "/api/v1/sandboxes")
                    .json(&json!({"name": "shared", "idleTimeout": "2s"})),
            )
            .await;
        assert_eq!(code, 201, "{body}");
        sweeper.wait_status("shared", "Running").await;
        server.wait_status("shared", "Running").await;
        let started = Instant::now();
        let mut last_use = Instant::now();
        while started.elapsed() < Duration::from_millis(4500) {
            let resp = server
                .sb(Method::PUT, "shared", "/files/workspace/note.txt")
                .body("kept awake")
                .send()
                .await
                .unwrap();
            assert!(resp.status().is_success(), "{}", resp.status());
            last_use = Instant::now();
            let (code, body) = sweeper.get("shared").await;
            assert_eq!(code, 200);
            assert_eq!(body["status"], "Running", "stopped while used: {body}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let stopped = wait_stopped(&sweeper, "shared", "idle").await;
        assert!(
            last_use.elapsed() >= Duration::from_millis(1900),
            "{:?}",
            last_use.elapsed()
        );
        assert!(stopped["lastActivityAt"].is_string(), "{stopped}");
    };
    tokio::select! {
        () = body => {}
        () = kubelet(&fixture, &["shared"], runner_addr.port()) => unreachable!(),
    }
}

/// Kubernetes takes a template's warm pool from its ConfigMap too (key `warmPool`, winning over
/// the templates file): the pool is kept, reported and claimed; a bad one is refused on create
/// with the ConfigMap named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_pool_from_the_template_configmap() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = Fixture::start().await;
    let (_runner, runner_addr) = start_runner(tmp.path()).await;
    fixture.put(
        "configmaps",
        NS,
        json!({
            "metadata": {"name": "agentbox-template-default"},
            "data": {"warmPool": json!({"size": 2}).to_string()},
        }),
    );
    let cp = start_cp(&fixture, tmp.path(), &["--kube-runner-image", RUNNER_IMAGE]).await;
    let body = async {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (code, status) = cp
                .send(cp.req(Method::GET, "/api/v1/warmpool/status"))
                .await;
            assert_eq!(code, 200, "{status}");
            let pool = status["pools"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["template"] == "default")
                .cloned();
            if pool
                .as_ref()
                .is_some_and(|p| p["size"] == 2 && p["ready"] == 2)
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no pool from the ConfigMap: {status}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let pooled = fixture
            .list("pods", NS)
            .iter()
            .filter(|p| p["metadata"]["labels"]["agentbox.dev/pool"] == "default")
            .count();
        assert_eq!(pooled, 2);
        let (code, body) = cp
            .send(
                cp.req(Method::POST, "/api/v1/sandboxes")
                    .json(&json!({"name": "from-cm"})),
            )
            .await;
        assert_eq!(code, 201, "{body}");
        assert_eq!(body["fromWarmPool"], true, "{body}");
        // A bad warmPool: creates of the template say which ConfigMap and key.
        fixture.update("configmaps", NS, "agentbox-template-default", |cm| {
            cm["data"]["warmPool"] = json!(json!({"size": 1000}).to_string());
        });
        let (code, body) = cp
            .send(
                cp.req(Method::POST, "/api/v1/sandboxes")
                    .json(&json!({"name": "bad-pool"})),
            )
            .await;
        assert_eq!(code, 500, "{body}");
        assert_eq!(body["error"], "backend_error");
        let message = body["message"].as_str().unwrap();
        assert!(
            message.contains("agentbox-template-default") && message.contains("warmPool"),
            "{message}"
        );
    };
    tokio::select! {
        () = body => {}
        () = kubelet_all(&fixture, runner_addr.port()) => unreachable!(),
    }
}

/// A template with a workspace claim (`pvc.json`) is pooled with a claim per pooled Pod
/// (`pool-<hex>-workspace`); the claim is handed to the sandbox that claims the Pod (its labels
/// and owner), outlives the Pod's first stop, is mounted again by the resumed `sandbox-<name>`
/// Pod, and goes with the sandbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_pool_with_a_workspace_claim() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = Fixture::start().await;
    let (_runner, runner_addr) = start_runner(tmp.path()).await;
    let templates = write_templates(
        tmp.path(),
        json!([{"name": "disk", "mode": "agent", "warmPool": {"size": 1}}]),
    );
    put_pvc_template(&fixture, "disk", "3Gi", None);
    let cp = start_cp(
        &fixture,
        tmp.path(),
        &[
            "--kube-runner-image",
            RUNNER_IMAGE,
            "--templates-file",
            &templates,
        ],
    )
    .await;
    let pooled_claims = || -> Vec<Value> {
        fixture
            .list("persistentvolumeclaims", NS)
            .into_iter()
            .filter(|c| c["metadata"]["labels"]["agentbox.dev/pool"] == "disk")
            .collect()
    };
    let body = async {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, status) = cp
                .send(cp.req(Method::GET, "/api/v1/warmpool/status"))
                .await;
            if status["pools"][0]["ready"] == 1 && pooled_claims().len() == 1 {
                break;
            }
            assert!(Instant::now() < deadline, "no pooled claim: {status}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let claim = pooled_claims()[0].clone();
        let claim_name = claim["metadata"]["name"].as_str().unwrap().to_owned();
        assert_eq!(claim["spec"]["resources"]["requests"]["storage"], "3Gi");
        let pod_name = claim_name.strip_suffix("-workspace").unwrap().to_owned();
        let pod = fixture.get("pods", NS, &pod_name).unwrap();
        assert_eq!(
            pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
            claim_name.as_str()
        );

        let (code, body) = cp
            .send(cp.req(Method::POST, "/api/v1/sandboxes").json(
                &json!({"name": "d1", "namespace": "team-d", "templateRef": {"name": "disk"}}),
            ))
            .await;
        assert_eq!(code, 201, "{body}");
        assert_eq!(body["fromWarmPool"], true, "{body}");
        assert_eq!(body["pvcName"], claim_name.as_str());
        let record = fixture.get("secrets", NS, "sandbox-d1.team-d").unwrap();
        let handed = fixture
            .get("persistentvolumeclaims", NS, &claim_name)
            .unwrap();
        assert_eq!(
            handed["metadata"]["labels"]["agentbox.dev/sandbox"],
            "d1.team-d"
        );
        assert_eq!(
            handed["metadata"]["labels"]["agentbox.dev/namespace"],
            "team-d"
        );
        assert!(handed["metadata"]["labels"]
            .get("agentbox.dev/pool")
            .is_none());
        assert_eq!(
            handed["metadata"]["ownerReferences"][0]["uid"],
            record["metadata"]["uid"]
        );
        // Stopped: the pooled Pod and Secret go, the claim stays; resumed: its own Pod on it.
        let (code, body) = cp.send(cp.sb(Method::POST, "d1", "/stop")).await;
        assert_eq!(code, 200, "{body}");
        assert!(fixture.get("pods", NS, &pod_name).is_none());
        assert!(fixture.get("secrets", NS, &pod_name).is_none());
        assert!(fixture
            .get("persistentvolumeclaims", NS, &claim_name)
            .is_some());
        let (code, body) = cp.send(cp.sb(Method::POST, "d1", "/resume")).await;
        assert_eq!(code, 200, "{body}");
        let own = fixture.get("pods", NS, "sandbox-d1.team-d").unwrap();
        assert_eq!(
            own["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
            claim_name.as_str()
        );
        cp.wait_status("d1", "Running").await;
        // The pool made another claim for its next Pod.
        let deadline = Instant::now() + Duration::from_secs(20);
        while pooled_claims().len() != 1 {
            assert!(Instant::now() < deadline, "the pool was not refilled");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_ne!(pooled_claims()[0]["metadata"]["name"], claim_name.as_str());
        let (code, _) = cp.send(cp.sb(Method::DELETE, "d1", "")).await;
        assert_eq!(code, 200);
        assert!(fixture
            .get("persistentvolumeclaims", NS, &claim_name)
            .is_none());
    };
    tokio::select! {
        () = body => {}
        () = kubelet_all(&fixture, runner_addr.port()) => unreachable!(),
    }
}
