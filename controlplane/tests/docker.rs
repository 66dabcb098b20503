//! End-to-end tests of the Docker backend on the real engine: the real `agentbox-controlplane`
//! binary with `--backend docker`, real containers from the images `scripts/images.sh` builds,
//! real HTTP to their runners at container IPs.
//!
//! Needs a Docker engine and the images (`scripts/images.sh`; `scripts/test.sh` runs it). When
//! either is missing every test here FAILS, so CI cannot pass without them; set
//! `AGENTBOX_SKIP_DOCKER_TESTS=1` to skip them on a machine without Docker (they then print
//! that they skipped).
//!
//! Every test uses its own scope (`--docker-scope`), network and image tags, so tests run in
//! parallel and the end of each removes every container, volume, network and image it made.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::escape::{
    self, write_index, TestHost, CLI_SECRET, HOME_SECRET, HOSTILE, HOST_SECRET, VICTIM_SECRET,
};
use common::{
    assert_error, exit_event, invoke_id, read_to_end, read_until, rebuild, send, Cp, Env,
};
use reqwest::Method;
use serde_json::{json, Value};

const PYTHON_AGENT: &str = "agentbox/python-agent:latest";
const LANGGRAPH_AGENT: &str = "agentbox/langgraph-agent:latest";
const RUNNER_IMAGE: &str = "agentbox/runner:latest";
const DEBIAN: &str = "agentbox-base/debian:bookworm";
const BUSYBOX: &str = "agentbox-base/busybox:latest";

/// The default image: `AGENTBOX_TEST_PYTHON_AGENT` (an image built from this tree under
/// another tag, on a machine whose `latest` is someone else's), else [`PYTHON_AGENT`].
fn agent_image() -> String {
    std::env::var("AGENTBOX_TEST_PYTHON_AGENT").unwrap_or_else(|_| PYTHON_AGENT.into())
}

/// `docker ARGS`, asserting success; its stdout, trimmed.
fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run docker {args:?}: {e}"));
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

use common::docker::quiet as docker_quiet;

/// Whether the suite runs: false only with `AGENTBOX_SKIP_DOCKER_TESTS=1`; otherwise the engine
/// and every image must be there.
fn docker_ready() -> bool {
    common::docker::ready(&[PYTHON_AGENT, LANGGRAPH_AGENT, RUNNER_IMAGE, DEBIAN, BUSYBOX])
}

/// One test's scope: its control planes, network, and on drop the removal of everything
/// labelled with its scope.
struct Scope {
    env: Env,
    scope: String,
    network: String,
    images: Vec<String>,
}

impl Scope {
    fn new(templates: Value) -> Scope {
        let env = Env::new();
        // `cpt-XXXXXX` → a DNS label, unique per test run.
        let scope = common::docker::scope_name(&env, "t");
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
            images: Vec::new(),
        }
    }

    /// A control plane with the default isolation: containers with no network but loopback.
    fn start(&self) -> Cp {
        self.start_with_timeout("30s")
    }

    /// A control plane with `--isolation none`: containers on the ICC-less bridge network.
    fn start_bridge(&self) -> Cp {
        self.env.spawn(&self.args("none", "30s"))
    }

    /// A control plane whose runners must answer `/healthz` within `start_timeout`.
    fn start_with_timeout(&self, start_timeout: &str) -> Cp {
        self.env.spawn(&self.args("namespaces", start_timeout))
    }

    fn set_templates(&self, templates: Value) {
        std::fs::write(
            self.env.root.join("templates.json"),
            json!({ "templates": templates }).to_string(),
        )
        .unwrap();
    }

    fn args(&self, isolation: &str, start_timeout: &str) -> Vec<String> {
        let templates = self.env.root.join("templates.json").display().to_string();
        let mut args = self.env.args(isolation);
        args.extend(
            [
                "--backend",
                "docker",
                "--docker-scope",
                &self.scope,
                "--docker-network",
                &self.network,
                "--docker-image",
                &agent_image(),
                "--templates-file",
                &templates,
                "--runner-start-timeout",
                start_timeout,
            ]
            .map(str::to_owned),
        );
        args
    }

    fn container(&self, sandbox: &str) -> String {
        format!("agentbox-{}-{sandbox}", self.scope)
    }

    fn inspect(&self, object: &str, format: &str) -> String {
        docker(&["inspect", "--format", format, object])
    }

    fn ip(&self, sandbox: &str) -> String {
        self.inspect(
            &self.container(sandbox),
            &format!(
                "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
                self.network
            ),
        )
    }

    /// Builds `dockerfile` (no context) as a tag of this scope; removed on drop.
    fn build(&mut self, name: &str, dockerfile: &str) -> String {
        let tag = format!("agentbox-test/{name}:{}", self.scope);
        let mut child = Command::new("docker")
            .args(["build", "-q", "-t", &tag, "-"])
            .env("DOCKER_BUILDKIT", "0")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(dockerfile.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "docker build {tag}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.images.push(tag.clone());
        tag
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        common::docker::remove_scope(&self.scope, &self.network);
        for image in &self.images {
            docker_quiet(&["rmi", "-f", image]);
        }
    }
}

/// A Python agent that prints stdin back, prefixed.
fn echo_agent() -> Value {
    json!({
        "files": [{"path": "/workspace/agent.py",
                   "content": "import sys\nprint('agent got', sys.stdin.read(), flush=True)\n"}],
        "installCommand": ["sh", "-c", "echo installing; echo installed > /workspace/installed.txt"],
        "entrypoint": ["python3", "/workspace/agent.py"],
    })
}

fn stdout(events: &[common::Event]) -> String {
    String::from_utf8(rebuild(events, "stdout")).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn lifecycle_keeps_the_workspace_and_applies_limits() {
    if !docker_ready() {
        return;
    }
    let scope = Scope::new(json!([{
        "name": "limited", "mode": "agent", "image": PYTHON_AGENT,
        "env": {"GREETING": "hi"},
        "limits": {"cpu": "500m", "memory": "256Mi", "pids": 128}
    }, {"name": "missing", "image": "agentbox-test/missing:none"}]));
    // The bridge network (`--isolation none`): its ICC-less network and the image's own
    // HEALTHCHECK are checked here; the default isolation in the escape suite below.
    let cp = scope.start_bridge();
    let started = Instant::now();
    let created = cp.create("life", "limited").await;
    eprintln!("create took {:?}", started.elapsed());
    assert_eq!(created["status"], "Running", "{created}");
    assert_eq!(created["templateRef"], "limited");

    // The container: the template's image, limits, an ICC-less network, a named volume.
    let container = scope.container("life");
    assert_eq!(
        scope.inspect(
            &container,
            "{{.Config.Image}} {{.HostConfig.NanoCpus}} {{.HostConfig.Memory}} {{.HostConfig.PidsLimit}}"
        ),
        format!("{PYTHON_AGENT} 500000000 268435456 128")
    );
    assert_eq!(
        scope.inspect(
            &container,
            "{{.HostConfig.CapDrop}} {{.HostConfig.SecurityOpt}}"
        ),
        "[ALL] [no-new-privileges]"
    );
    assert_eq!(
        scope.inspect(
            &scope.network,
            "{{index .Options \"com.docker.network.bridge.enable_icc\"}}"
        ),
        "false"
    );
    assert_eq!(
        scope.inspect(
            &container,
            "{{range .Mounts}}{{.Type}} {{.Name}} {{.Destination}}{{end}}"
        ),
        format!("volume {container} /workspace")
    );

    // Configure: files and an install command; invoke.
    let (result, events) = cp.configure("life", echo_agent()).await;
    assert_eq!(result["installExitCode"], 0, "{result}");
    assert!(
        events.iter().any(|e| e.data["data"] == "installing"),
        "{events:?}"
    );
    let events = cp.invoke("life", "hello docker").await;
    assert_eq!(stdout(&events), "agent got hello docker\n", "{events:?}");
    assert_eq!(exit_event(&events)["exitCode"], 0);
    // The template's env reaches the runner's processes.
    let (_, events) = cp
        .configure(
            "life",
            json!({"entrypoint": ["sh", "-c", "echo $GREETING from $(id -u)"]}),
        )
        .await;
    assert_eq!(events.last().unwrap().event, "result");
    let events = cp.invoke("life", "").await;
    assert_eq!(stdout(&events), "hi from 1000\n", "{events:?}");

    // The image's HEALTHCHECK (Python's urllib against /healthz, no curl) passes.
    let healthy = common::eventually(Duration::from_secs(40), || async {
        (scope.inspect(&container, "{{.State.Health.Status}}") == "healthy").then_some(())
    })
    .await;
    assert!(
        healthy.is_some(),
        "python-agent's HEALTHCHECK: {}",
        scope.inspect(&container, "{{json .State.Health}}")
    );

    // Stop: the container goes, the volume stays; the API says Stopped and refuses invokes.
    let (status, stopped) = send(cp.sb(Method::POST, "life", "/stop")).await;
    assert_eq!(
        (status, &stopped["status"]),
        (200, &json!("Stopped")),
        "{stopped}"
    );
    assert_eq!(
        docker_quiet(&["ps", "-aq", "--filter", &format!("name=^{container}$")]),
        ""
    );
    assert_eq!(
        docker(&[
            "volume",
            "ls",
            "-q",
            "--filter",
            &format!("name=^{container}$")
        ]),
        container
    );
    let (status, body) = send(cp.sb(Method::POST, "life", "/invoke").body("x")).await;
    assert_eq!(status, 409, "{body}");
    assert_error(&body, "sandbox_not_running");

    // Resume: the workspace (files, the install's output, the configuration) is still there.
    let (status, resumed) = send(cp.sb(Method::POST, "life", "/resume")).await;
    assert_eq!(
        (status, &resumed["status"]),
        (200, &json!("Running")),
        "{resumed}"
    );
    let text = cp
        .sb(Method::GET, "life", "/files/workspace/installed.txt")
        .send()
        .await
        .unwrap();
    assert_eq!(text.status(), 200);
    assert_eq!(text.text().await.unwrap(), "installed\n");
    let events = cp.invoke("life", "").await;
    assert_eq!(stdout(&events), "hi from 1000\n", "{events:?}");

    // A template whose image does not exist: a clear error, nothing left behind.
    let (status, body) = send(cp.admin(Method::POST, "/api/v1/sandboxes").json(&json!({
        "name": "noimage", "templateRef": {"name": "missing", "kind": "ClusterSandboxTemplate"},
    })))
    .await;
    assert_eq!(status, 500, "{body}");
    assert_error(&body, "backend_error");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("agentbox-test/missing"),
        "{body}"
    );
    let (status, _) = send(cp.sb(Method::GET, "noimage", "")).await;
    assert_eq!(status, 404);
    let (status, body) = send(cp.admin(Method::POST, "/api/v1/sandboxes").json(&json!({
        "name": "life", "templateRef": {"name": "limited", "kind": "ClusterSandboxTemplate"},
    })))
    .await;
    assert_eq!(status, 409, "{body}");
    assert_error(&body, "already_exists");

    // Delete: container and volume gone, the name is free.
    cp.delete("life").await;
    assert_eq!(
        docker_quiet(&[
            "volume",
            "ls",
            "-q",
            "--filter",
            &format!("name=^{container}$")
        ]),
        ""
    );
    let (status, body) = send(cp.sb(Method::GET, "life", "")).await;
    assert_eq!(status, 404, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sandbox_cannot_reach_another_sandboxs_runner() {
    if !docker_ready() {
        return;
    }
    let scope = Scope::new(json!([]));
    // On the bridge network (`--isolation none`): inter-container traffic is off. With the
    // default isolation a container has no network at all (the escape suite).
    let cp = scope.start_bridge();
    cp.create("target", "default").await;
    cp.create("prober", "default").await;
    let target_ip = scope.ip("target");
    assert!(!target_ip.is_empty());

    // From inside `prober`: its own runner answers, the other one is unreachable.
    let probe = "import socket, sys\n\
        for host in sys.stdin.read().split():\n\
        \x20   s = socket.socket(); s.settimeout(3)\n\
        \x20   try:\n\
        \x20       s.connect((host, 8421)); print(host, 'reached')\n\
        \x20   except OSError as e:\n\
        \x20       print(host, 'blocked', type(e).__name__)\n";
    cp.configure(
        "prober",
        json!({"files": [{"path": "/workspace/probe.py", "content": probe}],
               "entrypoint": ["python3", "/workspace/probe.py"]}),
    )
    .await;
    let events = cp.invoke("prober", format!("127.0.0.1 {target_ip}")).await;
    let out = stdout(&events);
    assert!(out.starts_with("127.0.0.1 reached\n"), "{out}");
    assert!(
        out.contains(&format!("{target_ip} blocked")),
        "the second sandbox reached the first one's runner: {out}"
    );
    // The control plane (on the host) reaches both.
    let (status, _) = send(cp.sb(Method::GET, "target", "/files/")).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_container_killed_mid_invoke_ends_the_stream() {
    if !docker_ready() {
        return;
    }
    let scope = Scope::new(json!([]));
    let cp = scope.start();
    cp.create("doomed", "default").await;
    cp.configure_sh("doomed", "echo started; exec sleep 600")
        .await;
    let mut resp = cp
        .sb(Method::POST, "doomed", "/invoke")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut buf = Vec::new();
    read_until(&mut resp, &mut buf, |e| e.data["data"] == "started").await;

    docker(&["kill", &scope.container("doomed")]);
    let killed = Instant::now();
    // The stream ends cleanly with the proxy's `error` event, bounded: never a hang, never
    // a reset.
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
                Ok(None) => return "end",
                Err(_) => return "error",
            }
        }
    })
    .await
    .expect("the stream did not end within 20s of the container's death");
    eprintln!(
        "stream ended ({ended}) {:?} after the kill",
        killed.elapsed()
    );
    let text = String::from_utf8_lossy(&buf);
    assert!(
        !text.contains("event: exit"),
        "no exit was invented for a killed invoke: {text}"
    );
    assert_eq!(ended, "end", "the body was cut off, not ended: {text}");
    let events = common::parse_sse(&buf);
    let last = events.last().unwrap();
    assert_eq!((last.id, last.event.as_str()), (0, "error"), "{text}");
    assert_eq!(last.data["phase"], "proxy", "{text}");
    assert!(
        last.data["message"]
            .as_str()
            .unwrap()
            .contains("runner went away"),
        "{text}"
    );

    // The sandbox says what happened; new requests get a clear error, at once.
    let (status, got) = send(cp.sb(Method::GET, "doomed", "")).await;
    assert_eq!((status, &got["status"]), (200, &json!("Error")), "{got}");
    assert!(
        got["message"]
            .as_str()
            .unwrap()
            .contains("exited (code 137)"),
        "{got}"
    );
    let (status, body) = send(cp.sb(Method::POST, "doomed", "/invoke").body("x")).await;
    assert_eq!(status, 409, "{body}");
    assert_error(&body, "sandbox_not_running");

    // The CLI on a killed invoke: a non-zero exit and a message, within the bound.
    let (status, resumed) = send(cp.sb(Method::POST, "doomed", "/resume")).await;
    assert_eq!(
        (status, &resumed["status"]),
        (200, &json!("Running")),
        "{resumed}"
    );
    let cli = common::runner_bin().with_file_name("agentbox");
    let child = Command::new(&cli)
        .args([
            "--api-url",
            &cp.url(""),
            "invoke",
            "doomed",
            "--prompt",
            "x",
        ])
        .env("AGENTBOX_API_KEY", common::ADMIN_KEY)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let cli_pid = child.id() as i32;
    let waited = tokio::task::spawn_blocking(move || child.wait_with_output());
    // The invoke is under way once the runner lists it.
    let running = common::eventually(Duration::from_secs(20), || async {
        let (_, list) = send(cp.sb(Method::GET, "doomed", "/invokes")).await;
        list.to_string().contains("running").then_some(())
    })
    .await;
    assert!(running.is_some(), "the CLI's invoke never started");
    docker(&["kill", &scope.container("doomed")]);
    let out = match tokio::time::timeout(Duration::from_secs(30), waited).await {
        Ok(out) => out.unwrap().unwrap(),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(cli_pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("the CLI hung after the container died");
        }
    };
    let out = (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(!out.0.success(), "the CLI exited 0: {}", out.1);
    assert!(!out.1.trim().is_empty(), "the CLI said nothing");
    eprintln!("cli: {:?} {}", out.0, out.1.trim());
}

/// The control plane keeps a running sandbox's runner address between requests; a change made
/// behind its back (as by another replica or an operator's `docker stop`) reaches it through the
/// engine's events, well before the cache's 30 s bound: the next requests see the sandbox as it
/// is, with no inspect of this replica in between to help.
#[tokio::test(flavor = "multi_thread")]
async fn a_change_behind_the_control_planes_back_is_seen_at_once() {
    if !docker_ready() {
        return;
    }
    let scope = Scope::new(json!([]));
    let cp = scope.start();
    cp.create("kept", "default").await;
    // Two execs: the first reads the engine and keeps the address, the second uses it.
    for _ in 0..2 {
        let got = exec(&cp, "kept", json!({"command": "echo here"})).await;
        assert_eq!(got["stdout"], "here\n", "{got}");
    }
    docker(&["stop", "-t", "0", &scope.container("kept")]);
    let stopped = Instant::now();
    let mut unreachable = 0;
    let seen = loop {
        let (status, body) = send(
            cp.sb(Method::POST, "kept", "/exec")
                .header("accept", "application/json")
                .json(&json!({"command": "echo here"})),
        )
        .await;
        match status {
            409 => break body,
            502 => unreachable += 1,
            other => panic!("exec after the stop: {other} {body}"),
        }
        // The event travels engine → control plane in milliseconds; a kept address would
        // answer 502 (the runner is gone) for up to 30 s.
        assert!(
            stopped.elapsed() < Duration::from_millis(1500) && unreachable <= 5,
            "the stop was not seen: {unreachable} answers of 502 from a kept address in {:?}",
            stopped.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_error(&seen, "sandbox_not_running");
    eprintln!(
        "stop seen after {:?} ({unreachable} answers of 502 meanwhile)",
        stopped.elapsed()
    );
    // Started again behind its back: served again (the event drops the stopped entry).
    docker(&["start", &scope.container("kept")]);
    let served = common::eventually(Duration::from_secs(30), || async {
        let (status, got) = send(
            cp.sb(Method::POST, "kept", "/exec")
                .header("accept", "application/json")
                .json(&json!({"command": "echo back"})),
        )
        .await;
        (status == 200 && got["stdout"] == "back\n").then_some(())
    })
    .await;
    assert!(served.is_some(), "the restarted container was never served");
}

/// A create waiting for a slow runner delays no other create; two creates of one name race to
/// exactly one 201 and one 409.
#[tokio::test(flavor = "multi_thread")]
async fn creates_do_not_wait_for_each_other() {
    if !docker_ready() {
        return;
    }
    // `deaf`'s runner listens on the container's loopback only: /healthz never answers from
    // outside, so its create waits out the whole start timeout, then fails.
    let scope = Scope::new(json!([{
        "name": "deaf", "mode": "agent", "runnerArgs": ["--listen", "127.0.0.1:8421"],
    }]));
    let cp = std::sync::Arc::new(scope.start_with_timeout("12s"));
    let slow = tokio::spawn({
        let cp = std::sync::Arc::clone(&cp);
        async move {
            send(cp.admin(Method::POST, "/api/v1/sandboxes").json(&json!({
                "name": "slow", "templateRef": {"name": "deaf", "kind": "ClusterSandboxTemplate"},
            })))
            .await
        }
    });
    // The slow create is under way once its sandbox exists.
    let seen = common::eventually(Duration::from_secs(10), || async {
        let (status, _) = send(cp.sb(Method::GET, "slow", "")).await;
        (status == 200).then_some(())
    })
    .await;
    assert!(seen.is_some(), "the slow create never started");
    let began = Instant::now();
    cp.create("quick", "default").await;
    eprintln!("quick create took {:?}", began.elapsed());
    assert!(
        !slow.is_finished(),
        "the quick create waited for the slow one ({:?})",
        began.elapsed()
    );
    let (a, b) = tokio::join!(
        send(cp.admin(Method::POST, "/api/v1/sandboxes").json(&json!({
            "name": "twin", "templateRef": {"name": "default", "kind": "ClusterSandboxTemplate"},
        }))),
        send(cp.admin(Method::POST, "/api/v1/sandboxes").json(&json!({
            "name": "twin", "templateRef": {"name": "default", "kind": "ClusterSandboxTemplate"},
        }))),
    );
    let mut codes = [a.0, b.0];
    codes.sort_unstable();
    assert_eq!(codes, [201, 409], "{a:?} {b:?}");
    let conflict = if a.0 == 409 { &a.1 } else { &b.1 };
    assert_error(conflict, "already_exists");
    let (status, twin) = send(cp.sb(Method::GET, "twin", "")).await;
    assert_eq!(
        (status, &twin["status"]),
        (200, &json!("Running")),
        "{twin}"
    );

    let (status, body) = tokio::time::timeout(Duration::from_secs(30), slow)
        .await
        .expect("the slow create did not end")
        .unwrap();
    assert_eq!(status, 500, "{body}");
    assert_error(&body, "backend_error");
    let (status, _) = send(cp.sb(Method::GET, "slow", "")).await;
    assert_eq!(status, 404, "a failed create leaves nothing behind");
    cp.delete("quick").await;
    cp.delete("twin").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_control_plane_finds_its_sandboxes() {
    if !docker_ready() {
        return;
    }
    let scope = Scope::new(json!([]));
    let mut first = scope.start();
    first.create("kept", "default").await;
    first.configure("kept", echo_agent()).await;
    let events = first.invoke("kept", "one").await;
    assert_eq!(stdout(&events), "agent got one\n");
    first.kill9();

    // A new process, nothing but the engine's labels to go on.
    let second = scope.start();
    let (status, list) = send(second.admin(Method::GET, "/api/v1/sandboxes")).await;
    assert_eq!(status, 200, "{list}");
    let found: Vec<&Value> = list["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"] == "kept")
        .collect();
    assert_eq!(found.len(), 1, "{list}");
    assert_eq!(found[0]["status"], "Running", "{list}");
    let events = second.invoke("kept", "two").await;
    assert_eq!(stdout(&events), "agent got two\n", "{events:?}");
    // Another scope on the same engine sees none of it.
    let other = Scope::new(json!([]));
    let stranger = other.start();
    let (_, list) = send(stranger.admin(Method::GET, "/api/v1/sandboxes")).await;
    assert_eq!(list["sandboxes"], json!([]), "{list}");
    let (status, _) = send(stranger.sb(Method::GET, "kept", "")).await;
    assert_eq!(status, 404);
}

/// Configure, invoke (output and exit code) and cancel against a sandbox of `template`.
async fn drop_in_smoke(cp: &Cp, name: &str, template: &str, configure: Value, expect: &str) {
    cp.create(name, template).await;
    let (result, _) = cp.configure(name, configure).await;
    assert_eq!(result["installExitCode"], 0, "{name}: {result}");
    let events = cp.invoke(name, "drop in").await;
    assert_eq!(stdout(&events), expect, "{name}: {events:?}");
    assert_eq!(exit_event(&events)["exitCode"], 0, "{name}");

    // Cancel a long invoke: the whole tree stops, the exit says so.
    cp.configure_sh(name, "echo ready; sleep 600").await;
    let mut resp = cp.sb(Method::POST, name, "/invoke").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut buf = Vec::new();
    let events = read_until(&mut resp, &mut buf, |e| e.data["data"] == "ready").await;
    let iid = invoke_id(&events);
    let (status, body) = send(cp.sb(Method::POST, name, &format!("/invokes/{iid}/cancel"))).await;
    assert_eq!(status, 202, "{name}: {body}");
    let events = read_to_end(&mut resp, &mut buf).await;
    assert_eq!(
        exit_event(&events)["reason"],
        "canceled",
        "{name}: {events:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_runner_drops_into_three_unlike_images() {
    if !docker_ready() {
        return;
    }
    let mut scope = Scope::new(json!([]));
    // 1. An empty image plus Debian's static busybox: no libc, no package manager.
    let busybox = scope.build(
        "busybox",
        &format!(
            "FROM {RUNNER_IMAGE} AS runner\nFROM {BUSYBOX}\n\
             COPY --from=runner /agentbox-runner /usr/local/bin/agentbox-runner\n\
             ENTRYPOINT [\"/usr/local/bin/agentbox-runner\"]\n"
        ),
    );
    // 2. Debian (glibc, dash, coreutils), as root.
    let debian = scope.build(
        "debian",
        &format!(
            "FROM {RUNNER_IMAGE} AS runner\nFROM {DEBIAN}\n\
             COPY --from=runner /agentbox-runner /usr/local/bin/agentbox-runner\n\
             ENTRYPOINT [\"/usr/local/bin/agentbox-runner\"]\n"
        ),
    );
    // 3. An application image: LangGraph in a virtualenv, a non-root user, /workspace a
    //    volume owned by that user; the runner is one layer among many (langgraph-agent).
    std::fs::write(
        scope.env.root.join("templates.json"),
        json!({"templates": [
            {"name": "busybox", "image": busybox},
            {"name": "debian", "image": debian},
            {"name": "langgraph", "image": LANGGRAPH_AGENT},
        ]})
        .to_string(),
    )
    .unwrap();
    let cp = scope.start();
    let shell_agent = |what: &str| {
        json!({
            "installCommand": ["sh", "-c", format!("echo {what} > /workspace/base.txt")],
            "entrypoint": ["sh", "-c", "read line; echo \"$(cat /workspace/base.txt): $line\""],
        })
    };
    drop_in_smoke(
        &cp,
        "bb",
        "busybox",
        shell_agent("busybox"),
        "busybox: drop in\n",
    )
    .await;
    drop_in_smoke(
        &cp,
        "deb",
        "debian",
        shell_agent("debian"),
        "debian: drop in\n",
    )
    .await;
    drop_in_smoke(
        &cp,
        "lg",
        "langgraph",
        json!({"entrypoint": ["python3", "/opt/agent/agent.py"]}),
        "[plan] {'words': ['drop', 'in']}\n[answer] {'answer': '2 word(s): in drop'}\n2 word(s): in drop\n",
    )
    .await;
}

/// `exec` in a sandbox, JSON answer, status 200.
async fn exec(cp: &Cp, name: &str, body: Value) -> Value {
    let (status, out) = send(
        cp.sb(Method::POST, name, "/exec")
            .header("accept", "application/json")
            .json(&body),
    )
    .await;
    assert_eq!(status, 200, "exec in {name}: {out}");
    out
}

/// A host path of a sandbox's workspace volume.
fn volume_dir(scope: &Scope, sandbox: &str) -> std::path::PathBuf {
    scope
        .inspect(
            &scope.container(sandbox),
            "{{range .Mounts}}{{if eq .Destination \"/workspace\"}}{{.Source}}{{end}}{{end}}",
        )
        .into()
}

/// The escape suite (tests/isolation.rs runs the same hostile agent in local sandboxes) in
/// containers of the default isolation: what got through must be nothing. Network targets are
/// this test's own: listeners on the host's loopback and on all its addresses (reached, if at
/// all, through Docker's bridge gateway), and a test host in a network namespace it creates
/// (a private 10.213.N.2 and a link-local 169.254.213.2 address) serving a package index,
/// which the allowlisted template lets through by name and another name does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_agent_gets_nothing_out_of_a_container() {
    if !docker_ready() {
        return;
    }
    assert!(
        rustix::process::geteuid().is_root(),
        "the escape suite's test hosts are network namespaces: run the docker suite as root"
    );
    let scope = Scope::new(json!([]));
    let env = &scope.env;
    let index = env.root.join("index");
    write_index(&index);
    let host = TestHost::new(&index, 0);
    let image = agent_image();
    scope.set_templates(json!([
        {"name": "hostile", "mode": "code", "image": image,
         "limits": {"pids": 64, "memory": "128Mi"}},
        {"name": "allowlisted", "mode": "code", "image": image,
         "egress": ["pypi.test", format!("{}/32", host.private)],
         "extraHosts": {"pypi.test": host.private, "other.test": host.private}},
    ]));
    let home = env.root.join("home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join("secret.txt"), HOME_SECRET).unwrap();
    let mut cmd = env.command(&scope.args("namespaces", "30s"));
    cmd.env("GITHUB_TOKEN", HOST_SECRET)
        .env("AWS_SECRET_ACCESS_KEY", HOST_SECRET)
        .env("HOME", &home);
    let cp = env.spawn_command(cmd);
    std::fs::write(
        env.state.join("cli.json"),
        json!({"apiKey": CLI_SECRET}).to_string(),
    )
    .unwrap();
    let loopback = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let anywhere = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    // The host's address on Docker's default bridge (docker0), where containers on a bridge
    // network reach the host's ports.
    let docker0 = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "dev", "docker0"])
        .output()
        .unwrap();
    let docker0 = String::from_utf8_lossy(&docker0.stdout);
    let gateway = docker0
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .unwrap_or_default()
        .to_owned();
    assert!(
        gateway.parse::<std::net::Ipv4Addr>().is_ok(),
        "docker0: {docker0}"
    );

    let victim = cp.create("victim", "hostile").await;
    assert_eq!(victim["isolated"], true, "{victim}");
    let attacker = cp.create("attacker", "hostile").await;
    assert_eq!(attacker["isolated"], true, "{attacker}");
    assert_eq!(
        scope.inspect(&scope.container("attacker"), "{{.HostConfig.NetworkMode}}"),
        "none"
    );
    let (status, _) = send(
        cp.sb(Method::PUT, "victim", "/files/workspace/secret.txt")
            .body(VICTIM_SECRET),
    )
    .await;
    assert_eq!(status, 201);
    let token = |sandbox: &str| {
        docker(&[
            "volume",
            "inspect",
            "--format",
            "{{index .Labels \"agentbox.dev/token\"}}",
            &scope.container(sandbox),
        ])
    };
    let tokens = [token("attacker"), token("victim")];
    assert!(tokens.iter().all(|t| t.len() >= 32), "{tokens:?}");
    let run_dir = |sandbox: &str| {
        let digest = common::sha256_hex(&scope.container(sandbox));
        env.state.join("docker").join(&digest[..16])
    };
    let victim_runner = run_dir("victim").join("runner.sock");
    assert!(victim_runner.exists(), "{}", victim_runner.display());

    let outside = env.root.join("written-by-sandbox");
    let (cp_port, loopback_port, anywhere_port) = (
        cp.addr.port(),
        loopback.local_addr().unwrap().port(),
        anywhere.local_addr().unwrap().port(),
    );
    let targets = json!({
        "files": {
            "cli.json": env.state.join("cli.json"),
            "api keys": env.keys_file,
            "victim workspace": volume_dir(&scope, "victim").join("secret.txt"),
            "victim workspace in the container's view": "/workspace/../victim/secret.txt",
            "home file": home.join("secret.txt"),
            "shadow": "/etc/shadow",
        },
        "connect": {
            "control plane": ["127.0.0.1", cp_port],
            "host loopback": ["127.0.0.1", loopback_port],
            "host through the bridge gateway": [gateway, anywhere_port],
            "control plane through the bridge gateway": [gateway, cp_port],
            "private test host": [host.private, 8080],
            "link-local test host": [host.link_local, 8080],
        },
        "unix": {
            "victim runner": victim_runner,
            "docker engine": "/var/run/docker.sock",
        },
        "proxy": {
            "control plane": ["127.0.0.1", cp_port],
            "host loopback": ["localhost", loopback_port],
            "host through the bridge gateway": [gateway, anywhere_port],
            "private test host": [host.private, 8080],
            "link-local test host": [host.link_local, 8080],
            "metadata": ["169.254.169.254", 80],
            "mapped loopback": ["::ffff:127.0.0.1", cp_port],
        },
        "write": {
            "host path": outside,
            "etc": "/etc/escaped",
            "usr": "/usr/escaped",
            "root": "/escaped",
        },
    });
    let out = exec(
        &cp,
        "attacker",
        json!({"argv": ["python3", "-c", HOSTILE], "stdin": targets.to_string(), "timeout": 60}),
    )
    .await;
    assert_eq!(out["exitCode"], 0, "{out}");
    let report: Value = serde_json::from_str(out["stdout"].as_str().unwrap()).unwrap();
    let secrets = [
        HOST_SECRET,
        CLI_SECRET,
        HOME_SECRET,
        VICTIM_SECRET,
        &tokens[0],
        &tokens[1],
    ];
    let dump = std::fs::read(volume_dir(&scope, "attacker").join("hostile-dump.txt")).unwrap();
    assert!(dump.len() > 1000, "the hostile agent dumped too little");
    let mut leaks = escape::leaks(&report, &String::from_utf8_lossy(&dump), &secrets);
    if outside.exists() {
        leaks.push("a file appeared outside the workspace on the host".into());
    }
    assert_eq!(leaks, Vec::<String>::new(), "what got through: {leaks:?}");
    // Its own runner's socket is there (the counting above tried the victim's path).
    let out = exec(
        &cp,
        "attacker",
        json!({"command": "python3 -c \"import socket; s = socket.socket(socket.AF_UNIX); s.connect('/run/agentbox/runner.sock'); s.sendall(b'GET /healthz HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n'); print(s.recv(12).decode())\""}),
    )
    .await;
    assert_eq!(out["stdout"], "HTTP/1.1 200\n", "{out}");

    // A fork bomb is held by the pids limit, and the runner still answers.
    cp.create("bomb", "hostile").await;
    let out = exec(
        &cp,
        "bomb",
        json!({"argv": ["python3", "-c", "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"], "timeout": 3}),
    )
    .await;
    assert_eq!(out["reason"], "timeout", "{out}");
    let started = Instant::now();
    let out = exec(&cp, "bomb", json!({"command": "echo alive"})).await;
    assert_eq!(out["stdout"], "alive\n", "{out}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // A memory hog is killed by the container's memory limit, and told.
    let out = exec(
        &cp,
        "bomb",
        json!({"argv": ["python3", "-c", "x = bytearray(512 * 1024 * 1024)\nprint('allocated')"], "timeout": 30}),
    )
    .await;
    assert_ne!(out["stdout"], "allocated\n", "{out}");
    assert_eq!(out["reason"], "memory_limit", "{out}");
    let out = exec(&cp, "bomb", json!({"command": "echo alive"})).await;
    assert_eq!(out["stdout"], "alive\n", "{out}");

    // Egress by policy: the allowlisted name reaches the test's package index (a wheel comes
    // through and imports), another name for the same address is refused.
    cp.create("pip", "allowlisted").await;
    let fetch = r#"
import sys, urllib.request, urllib.error
def get(url):
    try:
        return urllib.request.urlopen(url, timeout=10)
    except urllib.error.HTTPError as e:
        return e
print(get("http://pypi.test:8080/simple/agentbox-probe/").status)
print(get("http://other.test:8080/simple/agentbox-probe/").status)
with open("/tmp/probe.whl", "wb") as f:
    f.write(get("http://pypi.test:8080/files/agentbox_probe-1.0-py3-none-any.whl").read())
sys.path.insert(0, "/tmp/probe.whl")
import agentbox_probe
print(agentbox_probe.VALUE)
"#;
    let out = exec(
        &cp,
        "pip",
        json!({"argv": ["python3", "-c", fetch], "timeout": 30}),
    )
    .await;
    assert_eq!(
        out["stdout"], "200\n403\nserved by the test host\n",
        "{out}"
    );
    drop((loopback, anywhere));
}

/// An image of `agentbox-base/python` with *this build's* runner (so the test exercises the
/// runner of the same commit, not whatever `scripts/images.sh` built last), user 1000.
fn image_with_this_runner(tag: &str) {
    let ctx = tempfile::Builder::new()
        .prefix("cpt-ctx-")
        .tempdir()
        .unwrap();
    std::fs::copy(common::runner_bin(), ctx.path().join("agentbox-runner")).unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!(
            "FROM {}\nCOPY agentbox-runner /usr/local/bin/agentbox-runner\n\
             RUN useradd --uid 1000 --user-group agent && mkdir -p /workspace \
             && chown agent:agent /workspace\nUSER 1000:1000\nWORKDIR /workspace\n\
             ENTRYPOINT [\"/usr/local/bin/agentbox-runner\"]\n",
            "agentbox-base/python:bookworm"
        ),
    )
    .unwrap();
    let out = Command::new("docker")
        .args(["build", "-q", "-t", tag])
        .arg(ctx.path())
        .env("DOCKER_BUILDKIT", "0")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "docker build {tag}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Credentials reach a container as env and as a read-only file at the named path, rotate at
/// the next invoke without a restart, and are in nothing `docker inspect` shows.
#[tokio::test(flavor = "multi_thread")]
async fn credentials_reach_the_container_rotate_and_stay_out_of_inspect() {
    if !docker_ready() {
        return;
    }
    const KEY: &str = "sk-docker-5e1d9c3b7a2f4e6d8c0b";
    const FILE: &str = "gcp-docker-8a3f6c1e9d2b7f40";
    const ROTATED: &str = "sk-docker-rotated-2b9e7d4c1a6f";
    let tag = format!(
        "agentbox-test/creds-runner:{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    image_with_this_runner(&tag);
    let mut scope = Scope::new(json!([{"name": "creds", "mode": "agent", "image": tag}]));
    scope.images.push(tag.clone());
    let cp = scope.start();
    for (name, value) in [("openai", KEY), ("gcp", FILE)] {
        let (status, body) = send(
            cp.admin(Method::PUT, &format!("/api/v1/credentials/{name}"))
                .json(&json!({ "value": value })),
        )
        .await;
        assert_eq!(status, 204, "{body}");
    }
    let (status, body) = send(cp.admin(Method::POST, "/api/v1/sandboxes").json(&json!({
        "name": "c1", "templateRef": {"name": "creds"},
        "credentials": [{"name": "openai", "env": "OPENAI_API_KEY"},
                        {"name": "gcp", "file": "/run/credentials/gcp.json"}]
    })))
    .await;
    assert_eq!(status, 201, "{body}");
    cp.configure_sh(
        "c1",
        r#"printf %s "$OPENAI_API_KEY" | sha256sum | cut -d' ' -f1
sha256sum < /run/credentials/gcp.json | cut -d' ' -f1
if printf x >> /run/credentials/gcp.json 2>/dev/null; then echo writable; else echo read-only; fi"#,
    )
    .await;
    let sha = common::sha256_hex;
    let lines = |events: &[common::Event]| -> Vec<String> {
        stdout(events).lines().map(str::to_owned).collect()
    };
    let out = lines(&cp.invoke("c1", "").await);
    assert_eq!(out, [sha(KEY), sha(FILE), "read-only".to_owned()]);
    // Nothing `docker inspect` shows holds a value: env, labels, command, mounts.
    let container = scope.container("c1");
    let inspected = docker(&["inspect", &container]);
    let volume = docker(&["volume", "inspect", &container]);
    for secret in [KEY, FILE] {
        assert!(!inspected.contains(secret), "{secret} in docker inspect");
        assert!(!volume.contains(secret), "{secret} in the volume's labels");
    }
    assert!(inspected.contains(":/run/credentials:ro"), "{inspected}");
    // Rotation: the next invoke, no restart.
    let (status, _) = send(
        cp.admin(Method::PUT, "/api/v1/credentials/openai")
            .json(&json!({ "value": ROTATED })),
    )
    .await;
    assert_eq!(status, 204);
    let out = lines(&cp.invoke("c1", "").await);
    assert_eq!(out[..2], [sha(ROTATED), sha(FILE)]);
    // Delete removes the host directory.
    let dir = scope
        .env
        .state
        .join("docker-credentials")
        .join(&scope.scope)
        .join("c1");
    assert!(dir.join(".env.json").is_file());
    cp.delete("c1").await;
    assert!(!dir.exists());
}

const TEAM_B_KEY: &str = "cpt-team-b-key-1c0ffee5deadbeef";

/// An exec (JSON answer) in `name` with `key`; its stdout.
async fn exec_as(cp: &Cp, key: &str, name: &str, command: &str) -> String {
    let (status, out) = send(
        cp.req(
            Method::POST,
            &format!("/api/v1/sandboxes/{name}/exec"),
            Some(key),
        )
        .header("accept", "application/json")
        .json(&json!({ "command": command })),
    )
    .await;
    assert_eq!(status, 200, "exec in {name}: {out}");
    out["stdout"].as_str().unwrap().to_owned()
}

/// Names are per namespace on the Docker backend too: `team-a/foo` and `team-b/foo` are two
/// containers with two volumes, each named `foo` inside (hostname, `AGENTBOX_SANDBOX`).
#[tokio::test(flavor = "multi_thread")]
async fn one_name_in_two_namespaces_is_two_sandboxes() {
    if !docker_ready() {
        return;
    }
    let scope = Scope::new(json!([]));
    scope.env.write_keys(&[
        ("admin", common::ADMIN_KEY, &[], true),
        ("a", common::TEAM_A_KEY, &["team-a"], false),
        ("b", TEAM_B_KEY, &["team-b"], false),
    ]);
    let cp = scope.start();
    for (key, ns) in [(common::TEAM_A_KEY, "team-a"), (TEAM_B_KEY, "team-b")] {
        let (status, body) = send(
            cp.req(Method::POST, "/api/v1/sandboxes", Some(key))
                .json(&json!({"name": "foo", "namespace": ns, "templateRef": {"name": "default"}})),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(
            (&body["name"], &body["namespace"]),
            (&json!("foo"), &json!(ns))
        );
        // The engine's objects carry the key; the sandbox itself is `foo`.
        let container = scope.container(&format!("foo.{ns}"));
        assert_eq!(scope.inspect(&container, "{{.Config.Hostname}}"), "foo");
    }
    let (status, body) = send(
        cp.req(
            Method::PUT,
            "/api/v1/sandboxes/foo/files/workspace/mark",
            Some(common::TEAM_A_KEY),
        )
        .body("from-a"),
    )
    .await;
    assert!(status < 300, "{status} {body}");
    let script = "echo $AGENTBOX_SANDBOX $(cat /etc/hostname) $(cat /workspace/mark 2>/dev/null || echo none)";
    assert_eq!(
        exec_as(&cp, common::TEAM_A_KEY, "foo", script).await,
        "foo foo from-a\n"
    );
    assert_eq!(
        exec_as(&cp, TEAM_B_KEY, "foo", script).await,
        "foo foo none\n"
    );
    // The administrator picks; B's delete leaves A's.
    let (status, body) = send(cp.sb(Method::GET, "foo", "")).await;
    assert_eq!(status, 409, "{body}");
    assert_error(&body, "ambiguous_name");
    let (status, body) =
        send(cp.req(Method::DELETE, "/api/v1/sandboxes/foo", Some(TEAM_B_KEY))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        exec_as(&cp, common::TEAM_A_KEY, "foo", script).await,
        "foo foo from-a\n"
    );
    // A namespace named like a stop reason would take a stopped container's name.
    let (status, body) = send(
        cp.admin(Method::POST, "/api/v1/sandboxes")
            .json(&json!({"name": "foo", "namespace": "idle", "templateRef": {"name": "default"}})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    cp.delete("foo.team-a").await;
}

/// A server in a container reached through the preview proxy, in both networks: without one
/// (the default: the runner listens on a unix socket in a host directory and hands the port's
/// connection over, `SCM_RIGHTS` across the container's boundary, so a download goes on with
/// the runner stopped) and on the bridge (`--isolation none`: the runner is reached by TCP and
/// carries the bytes in a tunnel, so the same download stalls). Every byte arrives, in order.
#[tokio::test(flavor = "multi_thread")]
async fn preview_reaches_a_server_in_a_container_with_and_without_a_network() {
    if !docker_ready() {
        return;
    }
    let scope = Scope::new(json!([]));
    let pattern: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    for name in ["nonet", "bridged"] {
        let cp = if name == "nonet" {
            scope.start()
        } else {
            scope.start_bridge()
        };
        cp.create(name, "default").await;
        // A directory no other process has on its command line (the runner is found by it).
        let site = format!("/workspace/site-{name}-{}", std::process::id());
        let made = exec(
            &cp,
            name,
            json!({"command": format!("mkdir -p {site} && truncate -s 64M {site}/zeros && python3 -c \"open('{site}/f', 'wb').write(bytes(i * 7 % 251 for i in range(1 << 20)))\"")}),
        )
        .await;
        assert_eq!(made["exitCode"], 0, "{made}");
        let (status, body) = send(cp.sb(Method::POST, name, "/processes").json(&json!({
            "argv": ["python3", "-m", "http.server", "8002", "--bind", "127.0.0.1",
                     "--directory", site]
        })))
        .await;
        assert_eq!(status, 201, "{body}");
        let (status, body) = send(
            cp.sb(Method::POST, name, "/ports")
                .json(&json!({"port": 8002})),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        let got = common::eventually(Duration::from_secs(30), || async {
            let resp = cp
                .sb(Method::GET, name, "/preview/8002/f")
                .send()
                .await
                .ok()?;
            if resp.status() != 200 {
                return None;
            }
            resp.bytes().await.ok()
        })
        .await
        .unwrap_or_else(|| panic!("{name}: the server was never reached"));
        assert!(
            got[..] == pattern[..],
            "{name}: {} bytes, not the file",
            got.len()
        );
        common::download_with_the_runner_stopped(
            &cp,
            name,
            8002,
            "zeros",
            &site,
            64 << 20,
            name == "nonet",
        )
        .await;
        cp.delete(name).await;
    }
}
