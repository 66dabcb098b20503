//! The escape suite: a hostile agent in a local sandbox (the embedded default's isolation)
//! tries, for real, everything the threat model says it must not do, and the test counts what
//! got through, which must be nothing. Run as root and, with the control plane started as an
//! unprivileged user (`runuser -u nobody`), again as that user.
//!
//! Network targets are this test's own: a listener on the host's loopback, and a test host in a
//! network namespace the test creates (veth, a private 10.213.N.2 and a link-local
//! 169.254.213.2 address) that serves a tiny Python package index. No packet goes anywhere
//! else: addresses the policy refuses (169.254.169.254 among them) are refused by the egress
//! proxy before it connects.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::escape::{
    self, write_index, TestHost, CLI_SECRET, HOME_SECRET, HOSTILE, HOST_SECRET, VICTIM_SECRET,
};
use common::{exit_event, rebuild, send, Cp, Env};
use reqwest::Method;
use serde_json::{json, Value};

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Starts the control plane as `user` (None: this process's user) with `HOME` and a host
/// secret in its environment.
fn start_cp(env: &Env, templates: &Path, user: Option<&str>) -> Cp {
    let mut args = env.args("namespaces");
    args.extend(["--templates-file".into(), templates.display().to_string()]);
    let home = env.root.join("home");
    let mut cmd = match user {
        None => env.command(&args),
        Some(user) => {
            // The binaries as that user can reach them wherever the build lives (a checkout
            // under a private home directory, say): copies in the test's own directory.
            let bin = env.root.join("bin");
            std::fs::create_dir_all(&bin).unwrap();
            let cp = bin.join("agentbox-controlplane");
            let runner = bin.join("agentbox-runner");
            std::fs::copy(common::cp_bin(), &cp).unwrap();
            std::fs::copy(common::runner_bin(), &runner).unwrap();
            let at = args.iter().position(|a| a == "--runner-bin").unwrap();
            args[at + 1] = runner.display().to_string();
            let mut c = Command::new("runuser");
            c.args(["-u", user, "--"]).arg(&cp).args(&args);
            c.env("AGENTBOX_LOG", "warn")
                .env(common::TAG_VAR, &env.tag)
                .stdin(Stdio::null());
            c
        }
    };
    cmd.env("GITHUB_TOKEN", HOST_SECRET)
        .env("AWS_SECRET_ACCESS_KEY", HOST_SECRET)
        .env("HOME", &home);
    env.spawn_command(cmd)
}

async fn exec(cp: &Cp, name: &str, body: Value) -> Value {
    let what = body["command"]
        .as_str()
        .map_or_else(|| body["argv"].to_string(), str::to_owned);
    let what: String = what.chars().take(80).collect();
    let (status, out) = send(
        cp.sb(Method::POST, name, "/exec")
            .header("accept", "application/json")
            .json(&body),
    )
    .await;
    assert_eq!(status, 200, "exec {what:?} in {name}: {out}");
    out
}

fn token_of(env: &Env, name: &str) -> String {
    env.record(name)["token"].as_str().unwrap().to_owned()
}

async fn escape_suite(user: Option<&str>) {
    let env = Env::new();
    let home = env.root.join("home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join("secret.txt"), HOME_SECRET).unwrap();
    let index = env.root.join("index");
    write_index(&index);
    let host = TestHost::new(&index, u32::from(user.is_some()));
    let templates = env.root.join("templates.json");
    std::fs::write(
        &templates,
        json!({"templates": [
            {"name": "hostile", "mode": "code", "limits": {"pids": 64, "memory": "128Mi"}},
            {"name": "allowlisted", "mode": "agent",
             "egress": ["pypi.test", format!("{}/32", host.private)],
             "extraHosts": {"pypi.test": host.private, "other.test": host.private}},
        ]})
        .to_string(),
    )
    .unwrap();
    if let Some(user) = user {
        // The unprivileged control plane owns its directory, as it would its own.
        let status = Command::new("chown")
            .args(["-R", user])
            .arg(&env.root)
            .status()
            .unwrap();
        assert!(status.success());
    }
    let cp = start_cp(&env, &templates, user);
    // The administrator's CLI file, as `agentbox up` writes it next to the state.
    std::fs::create_dir_all(&env.state).unwrap();
    std::fs::write(
        env.state.join("cli.json"),
        json!({"apiKey": CLI_SECRET}).to_string(),
    )
    .unwrap();
    let host_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let host_port = host_listener.local_addr().unwrap().port();

    let victim = cp.create("victim", "hostile").await;
    assert_eq!(victim["isolated"], true, "{victim}");
    let attacker = cp.create("attacker", "hostile").await;
    assert_eq!(attacker["isolated"], true, "{attacker}");
    let (status, _) = send(
        cp.sb(Method::PUT, "victim", "/files/workspace/secret.txt")
            .body(VICTIM_SECRET),
    )
    .await;
    assert_eq!(status, 201);
    let tokens = [token_of(&env, "attacker"), token_of(&env, "victim")];

    let outside = env.root.join("written-by-sandbox");
    let targets = json!({
        "files": {
            "cli.json": env.state.join("cli.json"),
            "api keys": env.keys_file,
            "own record": env.sandbox_dir("attacker").join("sandbox.json"),
            "own spec": env.sandbox_dir("attacker").join("sandbox.spec.json"),
            "victim workspace": env.workspace("victim").join("secret.txt"),
            "victim record": env.sandbox_dir("victim").join("sandbox.json"),
            "home file": home.join("secret.txt"),
            "shadow": "/etc/shadow",
        },
        "connect": {
            "control plane": ["127.0.0.1", cp.addr.port()],
            "host loopback": ["127.0.0.1", host_port],
            "private test host": [host.private, 8080],
            "link-local test host": [host.link_local, 8080],
        },
        "unix": {
            "victim runner": env.sandbox_dir("victim").join("runner.sock"),
            "own runner": env.sandbox_dir("attacker").join("runner.sock"),
        },
        "proxy": {
            "control plane": ["127.0.0.1", cp.addr.port()],
            "host loopback": ["localhost", host_port],
            "private test host": [host.private, 8080],
            "link-local test host": [host.link_local, 8080],
            "metadata": ["169.254.169.254", 80],
            "mapped loopback": ["::ffff:127.0.0.1", cp.addr.port()],
        },
        "write": {
            "host path": outside,
            "etc": "/etc/escaped",
            "usr": "/usr/escaped",
            "root": "/escaped",
            "run": "/run/escaped",
        },
    });
    let python = "/usr/bin/python3";
    let out = exec(
        &cp,
        "attacker",
        json!({"argv": [python, "-c", HOSTILE], "stdin": targets.to_string(), "timeout": 60}),
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
    let dump = std::fs::read(env.workspace("attacker").join("hostile-dump.txt")).unwrap();
    let dump = String::from_utf8_lossy(&dump);
    let mut leaks = escape::leaks(&report, &dump, &secrets);
    if outside.exists() {
        leaks.push("a file appeared outside the workspace on the host".into());
    }
    assert_eq!(leaks, Vec::<String>::new(), "what got through: {leaks:?}");

    // The own workspace, /tmp and HOME are the sandbox's and writable.
    let out = exec(
        &cp,
        "attacker",
        json!({"command": "id -u; echo $HOME; touch /tmp/t ~/h /workspace/w && echo ok; cat /proc/1/cmdline | tr '\\0' ' '"}),
    )
    .await;
    let stdout = out["stdout"].as_str().unwrap();
    assert!(stdout.starts_with("1000\n/workspace\nok\n"), "{out}");

    // A fork bomb is held by the pids limit, and the runner still answers (in a sandbox of
    // its own: the hostile run above grew the attacker's runner by the output it returned).
    cp.create("bomb", "hostile").await;
    let out = exec(
        &cp,
        "bomb",
        json!({"argv": [python, "-c", "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"], "timeout": 3}),
    )
    .await;
    assert_eq!(out["reason"], "timeout", "{out}");
    let started = Instant::now();
    let out = exec(&cp, "bomb", json!({"command": "echo alive"})).await;
    assert_eq!(out["stdout"], "alive\n", "{out}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // A memory hog is killed (cgroup) or refused its memory (rlimits), and told.
    let enforced = env.record("bomb")["limitsEnforced"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let out = exec(
        &cp,
        "bomb",
        json!({"argv": [python, "-c", "x = bytearray(512 * 1024 * 1024)\nprint('allocated')"], "timeout": 30}),
    )
    .await;
    assert_ne!(out["stdout"], "allocated\n", "{out}");
    if enforced.starts_with("cgroup") {
        assert_eq!(out["reason"], "memory_limit", "{out}");
    } else {
        assert_eq!(enforced, "rlimits");
        assert!(
            out["stderr"].as_str().unwrap().contains("MemoryError"),
            "{out}"
        );
    }

    // Egress by policy: the allowlisted name reaches the test host, another name does not,
    // and the README's install example works against the test's own package index.
    cp.create("pip", "allowlisted").await;
    let out = exec(
        &cp,
        "pip",
        json!({"command": "curl -s -o /dev/null -w '%{http_code}' http://pypi.test:8080/simple/agentbox-probe/; echo; curl -s -o /dev/null -w '%{http_code}' http://other.test:8080/simple/; echo"}),
    )
    .await;
    assert_eq!(out["stdout"], "200\n403\n", "{out}");
    let requirements =
        "--index-url http://pypi.test:8080/simple\n--trusted-host pypi.test\nagentbox-probe\n";
    let (result, _) = cp
        .configure(
            "pip",
            json!({
                "files": [
                    {"path": "requirements.txt", "content": requirements},
                    {"path": "agent.py", "content": "import agentbox_probe, sys\nprint(agentbox_probe.VALUE, sys.stdin.read())\n"},
                ],
                "installCommand": ["sh", "-c", "pip install -r requirements.txt"],
                "entrypoint": ["python3", "agent.py"],
            }),
        )
        .await;
    assert_eq!(result["installExitCode"], 0, "{result}");
    let events = cp.invoke("pip", "hello").await;
    assert_eq!(
        String::from_utf8_lossy(&rebuild(&events, "stdout")),
        "served by the test host hello\n"
    );
    assert_eq!(exit_event(&events)["exitCode"], 0);
    drop(host_listener);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_agent_gets_nothing_out_as_root() {
    if !is_root() {
        // The test hosts are network namespaces, which only root can make.
        eprintln!("not root: skipping the escape suite (CI runs it as root)");
        return;
    }
    escape_suite(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_agent_gets_nothing_out_as_an_unprivileged_user() {
    if !is_root() {
        eprintln!("not root: runuser is unavailable; the other test ran as this user");
        return;
    }
    escape_suite(Some("nobody")).await;
}
