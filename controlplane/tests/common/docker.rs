//! What the Docker suites (tests/docker.rs, tests/docker_lifecycle.rs) share: the `docker`
//! command, the skip switch, and a test's scope (the `--docker-scope` and network of its
//! control planes) with the removal of everything labelled with it.

use std::process::{Command, Stdio};

use super::Env;

/// `docker ARGS`, ignoring failures; its stdout, trimmed.
pub fn quiet(args: &[&str]) -> String {
    Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Whether a Docker suite runs: false only with `AGENTBOX_SKIP_DOCKER_TESTS=1`. Otherwise the
/// engine and every one of `images` must be there, or the test fails here.
pub fn ready(images: &[&str]) -> bool {
    if std::env::var("AGENTBOX_SKIP_DOCKER_TESTS").is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED: AGENTBOX_SKIP_DOCKER_TESTS=1");
        return false;
    }
    let engine = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output();
    assert!(
        engine.as_ref().is_ok_and(|o| o.status.success()),
        "no Docker engine ({engine:?}); the docker suites need one (set \
         AGENTBOX_SKIP_DOCKER_TESTS=1 to skip them on this machine)"
    );
    for image in images {
        let found = Command::new("docker")
            .args(["image", "inspect", image])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            found,
            "image {image} is missing: run scripts/images.sh (or set AGENTBOX_SKIP_DOCKER_TESTS=1)"
        );
    }
    true
}

/// A scope for `env`'s test, unique per run: `prefix` and the test's tag as a DNS label.
pub fn scope_name(env: &Env, prefix: &str) -> String {
    format!(
        "{prefix}{}",
        env.tag
            .trim_start_matches("cpt-")
            .to_ascii_lowercase()
            .replace(|c: char| !c.is_ascii_alphanumeric(), "")
    )
}

/// Removes every container and volume labelled with `scope`, and `network`.
pub fn remove_scope(scope: &str, network: &str) {
    let filter = format!("label=agentbox.dev/scope={scope}");
    for id in quiet(&["ps", "-aq", "--filter", &filter]).split_whitespace() {
        quiet(&["rm", "-f", "-v", id]);
    }
    for v in quiet(&["volume", "ls", "-q", "--filter", &filter]).split_whitespace() {
        quiet(&["volume", "rm", "-f", v]);
    }
    quiet(&["network", "rm", network]);
}
