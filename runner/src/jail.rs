//! The one path jail of the runner: every path a caller names (configure files, and later the
//! files API, archives and exec's cwd) is resolved here, and must end inside the workspace.
//!
//! Rules: no NUL bytes; no `..` components at all; absolute paths must start with the workspace
//! (or with `/workspace`, which always names the workspace, so clients written for the
//! `/workspace` layout work against any runner); every existing component that is a symlink is
//! followed and must stay inside; the runner's state directory is off limits.
//!
//! What this does not stop: a process inside the sandbox swapping a directory for a symlink
//! between the check and the write. Such a process already has the runner's rights, so the jail
//! protects against callers of the API, not against the sandbox's own code.

use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// The name clients use for the workspace, whatever its real location.
pub const WORKSPACE_ALIAS: &str = "/workspace";

/// Resolves caller-supplied paths to real paths inside the workspace.
#[derive(Debug, Clone)]
pub struct Jail {
    root: PathBuf,
    reserved: Vec<PathBuf>,
}

impl Jail {
    /// A jail rooted at `root` (canonical), with `reserved` subtrees (canonical) refused.
    pub fn new(root: PathBuf, reserved: Vec<PathBuf>) -> Self {
        Self { root, reserved }
    }

    /// The workspace root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Resolves `user` to a real path inside the workspace. The path need not exist; the
    /// workspace root itself is returned for `""`-equivalent inputs such as `.` or `/workspace`.
    pub fn resolve(&self, user: &str) -> Result<PathBuf> {
        let rel = self.relative(user)?;
        let mut real = self.root.clone();
        let mut components = rel.components().peekable();
        while let Some(component) = components.next() {
            real.push(component);
            match std::fs::symlink_metadata(&real) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    let target = std::fs::canonicalize(&real).map_err(|_| {
                        Error::InvalidPath(format!(
                            "{user:?} goes through a symlink that points nowhere"
                        ))
                    })?;
                    if !target.starts_with(&self.root) {
                        return Err(Error::InvalidPath(format!(
                            "{user:?} goes through a symlink that leaves the workspace"
                        )));
                    }
                    real = target;
                }
                Ok(meta) if !meta.is_dir() && components.peek().is_some() => {
                    return Err(Error::InvalidPath(format!(
                        "{user:?}: {} is not a directory",
                        component.as_os_str().to_string_lossy()
                    )));
                }
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    for rest in components.by_ref() {
                        real.push(rest);
                    }
                }
                Err(e) => {
                    return Err(Error::InvalidPath(format!(
                        "{user:?} cannot be checked: {e}"
                    )))
                }
            }
        }
        if let Some(reserved) = self.reserved.iter().find(|r| real.starts_with(r)) {
            return Err(Error::InvalidPath(format!(
                "{user:?} is inside the runner's state directory {}",
                reserved.display()
            )));
        }
        Ok(real)
    }

    /// Resolves the parent directory of `user` and keeps its last component as given, for
    /// operations on the entry itself (delete a symlink, replace a file by rename), never on
    /// what a final symlink points to.
    pub fn resolve_entry(&self, user: &str) -> Result<PathBuf> {
        let rel = self.relative(user)?;
        let Some(name) = rel.file_name().map(|n| n.to_owned()) else {
            return Ok(self.root.clone());
        };
        let parent = rel.parent().map(|p| p.to_string_lossy().into_owned());
        let real_parent = match parent.as_deref() {
            None | Some("") => self.root.clone(),
            Some(p) => self.resolve(p)?,
        };
        if std::fs::metadata(&real_parent).is_ok_and(|m| !m.is_dir()) {
            return Err(Error::InvalidPath(format!(
                "{user:?}: its parent is not a directory"
            )));
        }
        let real = real_parent.join(name);
        if let Some(reserved) = self.reserved.iter().find(|r| real.starts_with(r)) {
            return Err(Error::InvalidPath(format!(
                "{user:?} is inside the runner's state directory {}",
                reserved.display()
            )));
        }
        Ok(real)
    }

    /// Rewrites arguments that name a path under `/workspace` to the real workspace, when the
    /// workspace lives elsewhere, so entrypoints written for the `/workspace` layout (such as
    /// `["python", "/workspace/agent.py"]`) run unchanged on any runner.
    pub fn map_argv(&self, argv: &[String]) -> Vec<String> {
        if self.root == Path::new(WORKSPACE_ALIAS) {
            return argv.to_vec();
        }
        argv.iter()
            .map(|arg| match arg.strip_prefix(WORKSPACE_ALIAS) {
                Some(rest) if rest.is_empty() || rest.starts_with('/') => {
                    format!("{}{rest}", self.root.display())
                }
                _ => arg.clone(),
            })
            .collect()
    }

    /// Resolves `user` to a path that names a file (not the workspace root itself).
    pub fn resolve_file(&self, user: &str) -> Result<PathBuf> {
        let real = self.resolve(user)?;
        if real == self.root {
            return Err(Error::InvalidPath(format!(
                "{user:?} names the workspace itself, not a file in it"
            )));
        }
        Ok(real)
    }

    /// The lexical part of the rules: the path relative to the workspace, with `.` removed.
    pub fn relative(&self, user: &str) -> Result<PathBuf> {
        if user.contains('\0') {
            return Err(Error::InvalidPath("path contains a NUL byte".into()));
        }
        if user.is_empty() {
            return Err(Error::InvalidPath("path is empty".into()));
        }
        let path = Path::new(user);
        let inside = if path.is_absolute() {
            if let Ok(rest) = path.strip_prefix(&self.root) {
                rest
            } else if let Ok(rest) = path.strip_prefix(WORKSPACE_ALIAS) {
                rest
            } else {
                return Err(Error::InvalidPath(format!(
                    "{user:?} is outside the workspace"
                )));
            }
        } else {
            path
        };
        let mut rel = PathBuf::new();
        for component in inside.components() {
            match component {
                Component::Normal(part) => rel.push(part),
                Component::CurDir => {}
                Component::ParentDir => {
                    return Err(Error::InvalidPath(format!(
                        "{user:?}: `..` is not allowed in paths"
                    )))
                }
                Component::RootDir | Component::Prefix(_) => {
                    return Err(Error::InvalidPath(format!(
                        "{user:?} is outside the workspace"
                    )))
                }
            }
        }
        Ok(rel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jail() -> (tempfile::TempDir, tempfile::TempDir, Jail) {
        let ws = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        let root = std::fs::canonicalize(ws.path()).expect("canonical");
        std::fs::create_dir_all(root.join(".agentbox")).expect("mkdir");
        std::fs::create_dir_all(root.join("dir")).expect("mkdir");
        std::fs::write(root.join("file"), b"x").expect("write");
        std::os::unix::fs::symlink(outside.path(), root.join("out")).expect("symlink");
        std::os::unix::fs::symlink("/etc/passwd", root.join("passwd")).expect("symlink");
        std::os::unix::fs::symlink(root.join("dir"), root.join("in")).expect("symlink");
        std::os::unix::fs::symlink(root.join("missing"), root.join("dangling")).expect("symlink");
        let jail = Jail::new(root.clone(), vec![root.join(".agentbox")]);
        (ws, outside, jail)
    }

    /// Hostile paths: each must be refused with `invalid_path`.
    const HOSTILE: &[&str] = &[
        "",
        "../x",
        "a/../../x",
        "a/../b",
        "..",
        "./../x",
        "/etc/passwd",
        "/etc",
        "/",
        "/workspacex/a",
        "/workspace/../etc/passwd",
        "a\0b",
        "out/x",
        "out",
        "passwd",
        "dangling",
        "dangling/x",
        "file/x",
        ".agentbox/config.json",
        "/workspace/.agentbox/x",
        "in/../../x",
        "dir/../..",
    ];

    #[test]
    fn hostile_paths_are_refused() {
        let (_ws, _outside, jail) = jail();
        for path in HOSTILE {
            match jail.resolve(path) {
                Err(Error::InvalidPath(_)) => {}
                other => panic!("{path:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn entries_keep_their_last_component() {
        let (_ws, _outside, jail) = jail();
        let root = jail.root().to_path_buf();
        assert_eq!(jail.resolve_entry("out").expect("out"), root.join("out"));
        assert_eq!(
            jail.resolve_entry("in/x").expect("in/x"),
            root.join("dir/x")
        );
        for bad in ["out/x", "../x", ".agentbox", "/etc/passwd", "file/x"] {
            assert!(jail.resolve_entry(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn good_paths_resolve_inside() {
        let (_ws, _outside, jail) = jail();
        let root = jail.root().to_path_buf();
        let cases = [
            ("a.txt", root.join("a.txt")),
            ("./a.txt", root.join("a.txt")),
            ("dir/new/deep.txt", root.join("dir/new/deep.txt")),
            ("/workspace/agent.py", root.join("agent.py")),
            ("/workspace", root.clone()),
            ("in/x", root.join("dir/x")),
            ("file", root.join("file")),
        ];
        for (user, want) in cases {
            assert_eq!(jail.resolve(user).expect(user), want, "{user}");
        }
        assert_eq!(
            jail.map_argv(&[
                "python".into(),
                "/workspace/a.py".into(),
                "/workspacex".into()
            ]),
            vec![
                "python".to_string(),
                format!("{}/a.py", root.display()),
                "/workspacex".to_string()
            ]
        );
        let absolute = format!("{}/b.txt", root.display());
        assert_eq!(jail.resolve(&absolute).expect("abs"), root.join("b.txt"));
        assert!(jail.resolve_file("/workspace").is_err());
        assert!(jail.resolve_file(".").is_err());
    }

    /// A small deterministic fuzz: random strings built from dangerous pieces never resolve
    /// outside the workspace or into the state directory.
    #[test]
    fn random_paths_never_escape() {
        let (_ws, _outside, jail) = jail();
        let pieces = [
            "..",
            ".",
            "/",
            "a",
            "out",
            "in",
            "dir",
            "passwd",
            ".agentbox",
            "/workspace",
            "\0",
            "//",
            "dangling",
            "file",
            "é",
            "%2e%2e",
        ];
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            let mut path = String::new();
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let n = 1 + (state % 6) as usize;
            for i in 0..n {
                let pick = ((state >> (i * 8)) % pieces.len() as u64) as usize;
                if i > 0 && (state >> (i + 40)) & 1 == 1 {
                    path.push('/');
                }
                path.push_str(pieces[pick]);
            }
            if let Ok(real) = jail.resolve(&path) {
                assert!(real.starts_with(jail.root()), "{path:?} -> {real:?}");
                assert!(!real.starts_with(jail.root().join(".agentbox")), "{path:?}");
                let canonical_parent = real
                    .ancestors()
                    .find_map(|a| std::fs::canonicalize(a).ok())
                    .expect("some ancestor exists");
                assert!(canonical_parent.starts_with(jail.root()), "{path:?}");
            }
        }
    }
}
