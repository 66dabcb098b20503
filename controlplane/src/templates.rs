//! Sandbox templates: a JSON file of them plus the built-in `default` (agent mode) and `code`.

use std::collections::BTreeMap;
use std::path::Path;

use agentbox_proto::TemplateInfo;
use serde::{Deserialize, Serialize};

/// One template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
                image: None,
                env: BTreeMap::new(),
                max_concurrent_invokes: None,
                runner_args: Vec::new(),
            },
            Template {
                name: "code".into(),
                description: Some("Code mode: files and exec.".into()),
                mode: "code".into(),
                image: None,
                env: BTreeMap::new(),
                max_concurrent_invokes: None,
                runner_args: Vec::new(),
            },
        ];
        if let Some(path) = file {
            let text = std::fs::read(path).map_err(|e| e.to_string())?;
            let parsed: TemplatesFile =
                serde_json::from_slice(&text).map_err(|e| format!("not a templates file: {e}"))?;
            for t in parsed.templates {
                if t.mode != "agent" && t.mode != "code" {
                    return Err(format!("template {:?}: mode must be agent or code", t.name));
                }
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
