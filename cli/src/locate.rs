//! Where the CLI finds its server and credential, and how it says where they came from when
//! the server refuses them.
//!
//! Order: `--api-url`/`--api-key` (or `AGENTBOX_API_URL`/`AGENTBOX_API_KEY`), then the
//! cli.json `agentbox up` writes: `<state-dir>/cli.json` when `--state-dir` or
//! `AGENTBOX_STATE_DIR` is set, else the first `.agentbox/cli.json` in the current directory or
//! one of its parents. A cli.json may point elsewhere (`{"stateDir": DIR}`, written by
//! `up --state-dir DIR` into the directory it was started from); it is followed once.

use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    /// A command-line flag (`--api-key`).
    Flag(&'static str),
    /// An environment variable.
    Env(&'static str),
    /// A cli.json written by `agentbox up`.
    File(PathBuf),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Flag(flag) => write!(f, "{flag}"),
            Source::Env(var) => write!(f, "the environment variable {var}"),
            Source::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// The name of the file `agentbox up` writes in its state directory.
pub(crate) const CLI_JSON: &str = "cli.json";

/// What `agentbox up` saved.
#[derive(Debug, Clone, Default)]
pub(crate) struct Saved {
    /// The file the values were read from (after following a pointer).
    pub(crate) path: PathBuf,
    pub(crate) api_url: Option<String>,
    pub(crate) api_key: Option<String>,
}

/// Reads a cli.json, following one `{"stateDir": DIR}` pointer. `Ok(None)` when `path` does
/// not exist; an error names the file.
pub(crate) fn read_saved(path: &Path) -> Result<Option<Saved>, String> {
    let value = match read_json(path)? {
        Some(v) => v,
        None => return Ok(None),
    };
    if value.get("apiKey").is_none() {
        if let Some(dir) = value["stateDir"].as_str() {
            let target = Path::new(dir).join(CLI_JSON);
            return match read_json(&target)? {
                Some(v) => Ok(Some(saved_of(&target, &v))),
                None => Err(format!(
                    "{} points to {}, which does not exist: is `agentbox up --state-dir {dir}` running?",
                    path.display(),
                    target.display()
                )),
            };
        }
    }
    Ok(Some(saved_of(path, &value)))
}

fn saved_of(path: &Path, v: &Value) -> Saved {
    Saved {
        path: path.to_owned(),
        api_url: v["apiUrl"].as_str().map(str::to_owned),
        api_key: v["apiKey"].as_str().map(str::to_owned),
    }
}

fn read_json(path: &Path) -> Result<Option<Value>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{} is not valid JSON: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// The cli.json to use: `<state_dir>/cli.json` when a state directory was named, else the
/// first `.agentbox/cli.json` in `cwd` or one of its parents.
pub(crate) fn find_saved(state_dir: Option<&Path>, cwd: &Path) -> Result<Option<Saved>, String> {
    if let Some(dir) = state_dir {
        let dir = if dir.is_absolute() {
            dir.to_owned()
        } else {
            cwd.join(dir)
        };
        return read_saved(&dir.join(CLI_JSON));
    }
    for dir in cwd.ancestors() {
        if let Some(saved) = read_saved(&dir.join(".agentbox").join(CLI_JSON))? {
            return Ok(Some(saved));
        }
    }
    Ok(None)
}

/// The control plane to talk to, and where its URL and key came from.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) url: String,
    pub(crate) key: String,
    pub(crate) key_source: Source,
    /// The cli.json found, whether or not its values were used.
    pub(crate) saved: Option<Saved>,
}

/// Picks the URL and key: each from its flag or variable when given, else from `saved`.
pub(crate) fn target(
    url: Option<(String, Source)>,
    key: Option<(String, Source)>,
    saved: Option<Saved>,
) -> Result<Target, String> {
    let from_file = |field: Option<&String>| {
        saved
            .as_ref()
            .and_then(|s| field.map(|v| (v.clone(), Source::File(s.path.clone()))))
    };
    let url = url.or_else(|| from_file(saved.as_ref().and_then(|s| s.api_url.as_ref())));
    let key = key.or_else(|| from_file(saved.as_ref().and_then(|s| s.api_key.as_ref())));
    let (url, _) = url.ok_or_else(|| {
        "no server: run `agentbox up` in this directory or a parent (it writes \
         .agentbox/cli.json), or pass --api-url and --api-key (or AGENTBOX_API_URL and \
         AGENTBOX_API_KEY)"
            .to_owned()
    })?;
    let (key, key_source) =
        key.ok_or_else(|| format!("no API key for {url}: pass --api-key (or AGENTBOX_API_KEY)"))?;
    Ok(Target {
        url,
        key,
        key_source,
        saved,
    })
}

impl Target {
    /// What to tell a user whose key the server refused (401): where the key came from, and
    /// what to do about it.
    pub(crate) fn refusal_hint(&self) -> String {
        let mut hint = format!("the API key came from {}", self.key_source);
        match (&self.key_source, &self.saved) {
            (Source::File(path), _) => hint.push_str(&format!(
                "; `agentbox up` writes a fresh key there each time it starts, so the server at \
                 {} is not the `up` that wrote {}: start `agentbox up` again, or pass --api-key",
                self.url,
                path.display()
            )),
            (Source::Env(var), Some(saved)) if saved.api_key.is_some() => hint.push_str(&format!(
                ", which overrides {}: `unset {var}` to use the key `agentbox up` saved there",
                saved.path.display()
            )),
            (Source::Env(var), _) => {
                hint.push_str(&format!("; check {var}, or `unset {var}`"));
            }
            (Source::Flag(flag), Some(saved)) if saved.api_key.is_some() => {
                hint.push_str(&format!(
                    ", which overrides {}: drop {flag} to use the key `agentbox up` saved there",
                    saved.path.display()
                ));
            }
            (Source::Flag(flag), _) => hint.push_str(&format!("; check {flag}")),
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_files_are_found_upwards_and_pointers_followed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path();
        let sub = root.join("a/b");
        std::fs::create_dir_all(&sub).expect("mkdir");
        assert!(find_saved(None, &sub).expect("find").is_none());

        std::fs::create_dir_all(root.join(".agentbox")).expect("mkdir");
        std::fs::write(
            root.join(".agentbox/cli.json"),
            r#"{"apiUrl":"http://x:1","apiKey":"k1"}"#,
        )
        .expect("write");
        let found = find_saved(None, &sub).expect("find").expect("found");
        assert_eq!(found.path, root.join(".agentbox/cli.json"));
        assert_eq!(found.api_key.as_deref(), Some("k1"));

        // A pointer to another state directory.
        let other = root.join("state");
        std::fs::create_dir_all(&other).expect("mkdir");
        std::fs::write(
            other.join("cli.json"),
            r#"{"apiUrl":"http://y:2","apiKey":"k2"}"#,
        )
        .expect("write");
        std::fs::write(
            root.join(".agentbox/cli.json"),
            serde_json::json!({"stateDir": other}).to_string(),
        )
        .expect("write");
        let found = find_saved(None, &sub).expect("find").expect("found");
        assert_eq!(found.path, other.join("cli.json"));
        assert_eq!(found.api_url.as_deref(), Some("http://y:2"));

        // A named state directory is used as is, relative to the current directory.
        let found = find_saved(Some(Path::new("state")), root)
            .expect("find")
            .expect("found");
        assert_eq!(found.api_key.as_deref(), Some("k2"));
        assert!(find_saved(Some(Path::new("nowhere")), root)
            .expect("find")
            .is_none());

        // A dangling pointer and a broken file are errors that name the file.
        std::fs::remove_file(other.join("cli.json")).expect("rm");
        let err = find_saved(None, &sub).expect_err("dangling");
        assert!(err.contains("does not exist"), "{err}");
        std::fs::write(root.join(".agentbox/cli.json"), "{").expect("write");
        let err = find_saved(None, &sub).expect_err("broken");
        assert!(err.contains("not valid JSON"), "{err}");
    }

    #[test]
    fn flags_and_variables_win_and_hints_name_the_source() {
        let saved = Saved {
            path: PathBuf::from("/d/.agentbox/cli.json"),
            api_url: Some("http://saved".into()),
            api_key: Some("saved-key".into()),
        };
        let t = target(
            None,
            Some(("env-key".into(), Source::Env("AGENTBOX_API_KEY"))),
            Some(saved.clone()),
        )
        .expect("target");
        assert_eq!(
            (t.url.as_str(), t.key.as_str()),
            ("http://saved", "env-key")
        );
        let hint = t.refusal_hint();
        assert!(
            hint.contains("AGENTBOX_API_KEY")
                && hint.contains("/d/.agentbox/cli.json")
                && hint.contains("unset AGENTBOX_API_KEY"),
            "{hint}"
        );
        let t = target(None, None, Some(saved)).expect("target");
        assert!(t.refusal_hint().contains("start `agentbox up` again"));
        assert!(target(None, None, None)
            .expect_err("nothing")
            .contains("agentbox up"));
    }
}
