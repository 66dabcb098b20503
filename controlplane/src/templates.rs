//! Sandbox templates: a JSON file of them plus the built-ins: `default` (agent mode), `code`,
//! and `langgraph-agent`, the name the seed's quickstart creates its sandbox from (agent mode,
//! otherwise the same as `default`).

use std::collections::BTreeMap;
use std::path::Path;

use agentbox_proto::TemplateInfo;
use serde::{Deserialize, Serialize};

/// One template.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Template {
    /// Name.
    pub name: String,
    /// What it is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// `agent` or `code`.
    #[serde(default = "agent")]
    pub mode: String,
    /// Container image (Docker and Kubernetes backends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Environment of the runner (and so of installs, invokes and execs).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The runner's `--max-concurrent-invokes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_invokes: Option<u32>,
    /// Extra runner flags, e.g. `["--default-timeout", "5m"]`.
    #[serde(default)]
    pub runner_args: Vec<String>,
    /// Resource limits: the container's (Docker), the Pod's (Kubernetes), the sandbox's cgroup
    /// or rlimits (local; see [`LOCAL_DEFAULT_PIDS`] when none is given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    /// Where a local sandbox may connect through its egress proxy: `"all"` (any public
    /// address; the default), `"none"`, or a list of host names (`*.example.com` for
    /// subdomains), addresses and CIDRs. Loopback and link-local addresses never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<serde_json::Value>,
    /// Names the egress proxy resolves to fixed addresses, like `docker run --add-host`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra_hosts: BTreeMap<String, std::net::IpAddr>,
    /// Host paths a local sandbox sees read-only at the same place (besides /usr, /bin, /sbin,
    /// /lib*, /etc).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub read_only_paths: Vec<std::path::PathBuf>,
    /// The lifetime of its sandboxes when a create sets none (a Go duration, e.g. `8h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// The idle timeout of its sandboxes when a create sets none (a Go duration, e.g. `30m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
    /// What the end of a lifetime does: `stop` (the default; the workspace is kept) or
    /// `delete`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_timeout: Option<OnTimeout>,
    /// Sandboxes kept started and ready for creates to claim (every backend; not for a
    /// template with credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_pool: Option<WarmPool>,
    /// Named credentials its sandboxes' agents get (names only; values are in the control
    /// plane's credential store).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub credentials: Vec<agentbox_proto::CredentialRef>,
}

/// A template's warm pool.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WarmPool {
    /// How many pooled sandboxes to keep ready, at most [`MAX_WARM_POOL`].
    pub size: u32,
    /// A pooled sandbox older than this (a Go duration) is replaced by a fresh one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<String>,
}

/// The largest warm pool of one template.
pub const MAX_WARM_POOL: u32 = 64;

/// What the end of a sandbox's lifetime does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnTimeout {
    /// Stop it, keeping its workspace (`stopReason: timeout`).
    #[default]
    Stop,
    /// Delete it and its workspace.
    Delete,
}

/// Processes and threads a local sandbox may have at once when its template sets no
/// `limits.pids` (a fork bomb stops there).
pub const LOCAL_DEFAULT_PIDS: u32 = 1024;

impl Template {
    /// Checks what can be checked without starting a sandbox.
    fn validate(&self) -> Result<(), String> {
        if self.mode != "agent" && self.mode != "code" {
            return Err("mode must be agent or code".into());
        }
        if let Some(limits) = &self.limits {
            limits.validate()?;
        }
        match &self.egress {
            None => {}
            Some(serde_json::Value::String(s)) if s == "none" || s == "all" => {}
            Some(serde_json::Value::Array(list)) if list.iter().all(|v| v.is_string()) => {}
            Some(other) => {
                return Err(format!(
                    "egress must be \"none\", \"all\" or a list of hosts, not {other}"
                ))
            }
        }
        for (field, value) in [
            ("timeout", &self.timeout),
            ("idleTimeout", &self.idle_timeout),
        ] {
            if let Some(text) = value {
                crate::lifecycle::check_duration(field, text)?;
            }
        }
        if let Some(pool) = &self.warm_pool {
            if pool.size > MAX_WARM_POOL {
                return Err(format!("warmPool.size is at most {MAX_WARM_POOL}"));
            }
            if let Some(age) = &pool.max_age {
                crate::lifecycle::check_duration("warmPool.maxAge", age)?;
            }
        }
        for p in &self.read_only_paths {
            if !p.is_absolute() {
                return Err(format!("readOnlyPaths: {} is not absolute", p.display()));
            }
        }
        Ok(())
    }
}

/// A sandbox's resource limits, in Kubernetes quantity notation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    /// CPUs: `"2"`, `"1.5"` or `"500m"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// Memory in bytes: `"536870912"`, `"512Mi"`, `"2Gi"`, `"500M"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// Most processes (and threads) at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u32>,
}

impl Limits {
    /// CPUs in billionths (Docker's `NanoCpus`).
    pub fn nano_cpus(&self) -> Result<Option<i64>, String> {
        let Some(text) = &self.cpu else {
            return Ok(None);
        };
        let bad = || format!("limits.cpu {text:?}: expected e.g. \"2\", \"1.5\" or \"500m\"");
        let nanos = if let Some(milli) = text.strip_suffix('m') {
            milli.parse::<u64>().map_err(|_| bad())? as f64 * 1e6
        } else {
            let cpus: f64 = text.parse().map_err(|_| bad())?;
            if !cpus.is_finite() {
                return Err(bad());
            }
            cpus * 1e9
        };
        if !(1e6..=1e12).contains(&nanos) {
            return Err(bad());
        }
        Ok(Some(nanos as i64))
    }

    /// Memory in bytes.
    pub fn memory_bytes(&self) -> Result<Option<i64>, String> {
        let Some(text) = &self.memory else {
            return Ok(None);
        };
        let bad = || format!("limits.memory {text:?}: expected bytes or e.g. \"512Mi\", \"2Gi\"");
        let units: [(&str, u64); 8] = [
            ("Ki", 1 << 10),
            ("Mi", 1 << 20),
            ("Gi", 1 << 30),
            ("Ti", 1 << 40),
            ("k", 1_000),
            ("M", 1_000_000),
            ("G", 1_000_000_000),
            ("T", 1_000_000_000_000),
        ];
        let (digits, unit) = units
            .iter()
            .find_map(|(suffix, n)| text.strip_suffix(suffix).map(|d| (d, *n)))
            .unwrap_or((text.as_str(), 1));
        let bytes = digits
            .parse::<u64>()
            .ok()
            .and_then(|d| d.checked_mul(unit))
            .filter(|b| *b >= 6 << 20 && *b <= i64::MAX as u64)
            .ok_or_else(|| format!("{} (at least 6Mi)", bad()))?;
        Ok(Some(bytes as i64))
    }

    fn validate(&self) -> Result<(), String> {
        self.nano_cpus()?;
        self.memory_bytes()?;
        if self.pids == Some(0) {
            return Err("limits.pids must be at least 1".into());
        }
        Ok(())
    }
}

fn agent() -> String {
    "agent".into()
}

impl Template {
    /// The wire form.
    /// The wire form. Env values are left out: any caller may list templates, and env is where
    /// people put credentials.
    pub fn info(&self) -> TemplateInfo {
        let mut spec = serde_json::to_value(self).ok();
        if let Some(env) = spec.as_mut().and_then(|s| s.get_mut("env")) {
            *env = serde_json::Value::Array(
                self.env
                    .keys()
                    .map(|k| serde_json::Value::String(k.clone()))
                    .collect(),
            );
        }
        TemplateInfo {
            name: self.name.clone(),
            description: self.description.clone(),
            image: self.image.clone(),
            resource_version: Some("1".into()),
            spec,
        }
    }
}

#[derive(Debug, Deserialize)]
struct TemplatesFile {
    templates: Vec<Template>,
}

/// All templates.
#[derive(Debug, Clone)]
pub struct Templates {
    list: Vec<Template>,
}

impl Templates {
    /// The built-ins, overridden and extended by `file`.
    pub fn load(file: Option<&Path>) -> Result<Self, String> {
        let mut list = vec![
            Template {
                name: "default".into(),
                description: Some("Agent mode: configure once, invoke per call.".into()),
                mode: "agent".into(),
                ..Template::default()
            },
            Template {
                name: "langgraph-agent".into(),
                description: Some(
                    "The seed's quickstart template: agent mode, the same as `default`.".into(),
                ),
                mode: "agent".into(),
                ..Template::default()
            },
            Template {
                name: "code".into(),
                description: Some("Code mode: files and exec.".into()),
                mode: "code".into(),
                ..Template::default()
            },
        ];
        if let Some(path) = file {
            let text = std::fs::read(path).map_err(|e| e.to_string())?;
            let parsed: TemplatesFile =
                serde_json::from_slice(&text).map_err(|e| format!("not a templates file: {e}"))?;
            for t in parsed.templates {
                t.validate()
                    .map_err(|e| format!("template {:?}: {e}", t.name))?;
                list.retain(|old| old.name != t.name);
                list.push(t);
            }
        }
        Ok(Self { list })
    }

    /// Every template.
    pub fn all(&self) -> &[Template] {
        &self.list
    }

    /// One template.
    pub fn get(&self, name: &str) -> Option<&Template> {
        self.list.iter().find(|t| t.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(cpu: &str, memory: &str) -> Limits {
        Limits {
            cpu: Some(cpu.into()),
            memory: Some(memory.into()),
            pids: Some(64),
        }
    }

    #[test]
    fn limits_parse_kubernetes_quantities() {
        let l = limits("500m", "256Mi");
        assert_eq!(l.nano_cpus(), Ok(Some(500_000_000)));
        assert_eq!(l.memory_bytes(), Ok(Some(256 << 20)));
        let l = limits("1.5", "1G");
        assert_eq!(l.nano_cpus(), Ok(Some(1_500_000_000)));
        assert_eq!(l.memory_bytes(), Ok(Some(1_000_000_000)));
        assert_eq!(limits("2", "7340032").memory_bytes(), Ok(Some(7_340_032)));
        assert_eq!(Limits::default().nano_cpus(), Ok(None));
        for (cpu, memory) in [
            ("0", "256Mi"),
            ("-1", "256Mi"),
            ("NaN", "256Mi"),
            ("1x", "256Mi"),
            ("1", "1Ki"),
            ("1", "lots"),
            ("1", "-5Mi"),
            ("1", "99999999999Ti"),
        ] {
            assert!(limits(cpu, memory).validate().is_err(), "{cpu} {memory}");
        }
    }

    #[test]
    fn a_templates_file_with_bad_limits_is_refused() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("t.json");
        std::fs::write(
            &path,
            r#"{"templates": [{"name": "x", "limits": {"cpu": "lots"}}]}"#,
        )
        .expect("written");
        let err = Templates::load(Some(&path)).expect_err("bad cpu");
        assert!(err.contains("limits.cpu"), "{err}");
        std::fs::write(
            &path,
            r#"{"templates": [{"name": "x", "limits": {"cpu": "1", "memory": "512Mi", "pids": 100}}]}"#,
        )
        .expect("written");
        let t = Templates::load(Some(&path)).expect("good limits");
        assert_eq!(
            t.get("x")
                .and_then(|t| t.limits.clone())
                .and_then(|l| l.pids),
            Some(100)
        );
    }
}
