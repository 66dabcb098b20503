//! The one path jail of the runner: every path a caller names (configure files, the files API,
//! archives and exec's cwd) is resolved here, and must end inside the workspace.
//!
//! Rules: no NUL bytes; no `..` components at all; absolute paths must start with the workspace
//! (or with `/workspace`, which always names the workspace, so clients written for the
//! `/workspace` layout work against any runner); every existing component that is a symlink is
//! followed and must stay inside; the runner's state directory is off limits.
//!
//! **Resolution is done on descriptors, never by checking a name and then opening it.** The jail
//! holds the workspace open; a path is opened relative to that descriptor with `openat2` and
//! `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS`, so the kernel refuses any
//! escape in the same system call that opens. A path with a symlink in it (or a kernel without
//! `openat2`, or a seccomp profile that hides it) takes the walk: one `openat(O_NOFOLLOW)` per
//! component from the directory descriptor reached so far, a symlink read with `readlinkat`
//! and its target resolved by the jail's own rules (an absolute target must name the
//! workspace, `..` may not climb above it). So a process in the sandbox that swaps a directory
//! for a symlink (`renameat2(RENAME_EXCHANGE)`) while the runner works gets either the directory
//! or a refusal, never the outside. Operations on an entry itself (write, replace, delete) go
//! through its parent's descriptor (`Parent`) with `*at` calls on the final name.
//! Symlinks are resolved by the jail rather than by the kernel so that the real path, which the
//! state-directory rule and error messages need, is always known.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use crate::error::{Error, Result};

/// The name clients use for the workspace, whatever its real location.
pub const WORKSPACE_ALIAS: &str = "/workspace";

/// Symlinks followed in one resolution before giving up (the kernel's own limit).
const MAX_SYMLINKS: usize = 40;

/// Resolves caller-supplied paths to descriptors inside the workspace.
#[derive(Debug)]
pub struct Jail {
    root: PathBuf,
    root_fd: OwnedFd,
    /// Reserved subtrees, relative to the root (those inside the workspace).
    reserved: Vec<PathBuf>,
    /// (device, inode) of the reserved directories, to leave them out of listings.
    reserved_ids: Vec<(u64, u64)>,
    /// Cleared when `openat2` turned out to be missing, so the walk is taken directly.
    openat2: AtomicBool,
}

/// An opened entry inside the workspace.
#[derive(Debug)]
pub struct Found {
    /// The entry, opened with the flags asked for.
    pub fd: OwnedFd,
    /// Its real path relative to the workspace (symlinks resolved).
    pub rel: PathBuf,
}

/// The opened parent directory of an entry, and the entry's own name in it.
#[derive(Debug)]
pub struct Parent {
    /// The parent directory (`O_PATH`), inside the workspace.
    pub dir: OwnedFd,
    /// The entry's name in `dir` (never `.`, `..` or empty).
    pub name: OsString,
    /// The entry's real path relative to the workspace.
    pub rel: PathBuf,
}

enum Walked {
    Found(Found),
    /// A component does not exist: `dir` is the last directory reached (at `rel`), `rest` the
    /// components from the missing one on.
    Missing {
        rel: Vec<OsString>,
        rest: Vec<OsString>,
    },
}

fn errno_io(e: Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.raw_os_error())
}

impl Jail {
    /// A jail rooted at `root` (canonical), with `reserved` subtrees (canonical) refused. Opens
    /// the root, which stays open for the runner's life.
    pub fn new(root: PathBuf, reserved: Vec<PathBuf>) -> std::io::Result<Self> {
        let root_fd = rustix::fs::open(
            &root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno_io)?;
        let reserved_ids = reserved
            .iter()
            .filter_map(|r| std::fs::metadata(r).ok())
            .map(|m| {
                use std::os::unix::fs::MetadataExt;
                (m.dev(), m.ino())
            })
            .collect();
        let reserved = reserved
            .iter()
            .filter_map(|r| r.strip_prefix(&root).ok().map(Path::to_path_buf))
            .collect();
        Ok(Self {
            root,
            root_fd,
            reserved,
            reserved_ids,
            openat2: AtomicBool::new(true),
        })
    }

    /// The workspace root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The workspace root, opened (`O_PATH`).
    pub fn root_fd(&self) -> BorrowedFd<'_> {
        self.root_fd.as_fd()
    }

    /// Whether (device, inode) is a reserved directory (left out of listings and archives).
    pub fn is_reserved(&self, dev: u64, ino: u64) -> bool {
        self.reserved_ids.contains(&(dev, ino))
    }

    /// (device, inode) of the reserved directories.
    pub fn reserved_ids(&self) -> Vec<(u64, u64)> {
        self.reserved_ids.clone()
    }

    /// The sandbox path (`/workspace/...`) of a path relative to the workspace. Messages show
    /// this, never the host's real workspace path.
    pub fn shown(rel: &Path) -> String {
        if rel.as_os_str().is_empty() {
            WORKSPACE_ALIAS.to_owned()
        } else {
            format!("{WORKSPACE_ALIAS}/{}", rel.display())
        }
    }

    /// Opens `user` (following symlinks that stay inside) with `flags` (`O_CLOEXEC` is added).
    /// A missing entry is `file_not_found`.
    pub fn open(&self, user: &str, flags: OFlags) -> Result<Found> {
        let rel = self.relative(user)?;
        self.check_reserved(&rel)?;
        let flags = flags | OFlags::CLOEXEC;
        if self.openat2.load(Ordering::Relaxed) {
            let path: &Path = if rel.as_os_str().is_empty() {
                Path::new(".")
            } else {
                &rel
            };
            match rustix::fs::openat2(
                &self.root_fd,
                path,
                flags | OFlags::NOFOLLOW,
                Mode::empty(),
                ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_SYMLINKS,
            ) {
                Ok(fd) if !flags.contains(OFlags::PATH) || !is_symlink(&fd) => {
                    return Ok(Found { fd, rel })
                }
                Ok(_) => {}
                Err(Errno::NOSYS | Errno::PERM) => self.openat2.store(false, Ordering::Relaxed),
                // A symlink on the way (ELOOP), or any other answer: the walk knows why.
                Err(_) => {}
            }
        }
        match self.walk(&rel, components(&rel), flags, false)? {
            Walked::Found(found) => Ok(found),
            Walked::Missing { .. } => Err(Error::FileNotFound(Self::shown(&rel))),
        }
    }

    /// Opens the parent directory of `user`, creating missing directories when `create`, and
    /// keeps the last component as given: operations on the entry itself (replace a file by
    /// rename, delete a symlink) act on the name in that directory, never on what a final
    /// symlink points to. The workspace itself has no parent here (`invalid_path`).
    pub fn parent(&self, user: &str, create: bool) -> Result<Parent> {
        let rel = self.relative(user)?;
        let Some(name) = rel.file_name().map(OsStr::to_owned) else {
            return Err(Error::InvalidPath(format!(
                "{} names the workspace itself, not an entry in it",
                WORKSPACE_ALIAS
            )));
        };
        let parent_rel = rel.parent().map(Path::to_path_buf).unwrap_or_default();
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let walked = self.walk(&rel, components(&parent_rel), flags, create)?;
        let Walked::Found(dir) = walked else {
            return Err(Error::FileNotFound(Self::shown(&parent_rel)));
        };
        let entry = dir.rel.join(&name);
        self.check_reserved(&entry)?;
        Ok(Parent {
            dir: dir.fd,
            name,
            rel: entry,
        })
    }

    /// Resolves `user` to a real path inside the workspace, for what must be handed on by name
    /// (a child's working directory). The path need not exist.
    pub fn resolve(&self, user: &str) -> Result<PathBuf> {
        let rel = self.relative(user)?;
        self.check_reserved(&rel)?;
        let flags = OFlags::PATH | OFlags::CLOEXEC;
        Ok(match self.walk(&rel, components(&rel), flags, false)? {
            Walked::Found(found) => self.root.join(found.rel),
            Walked::Missing { rel, rest } => {
                let mut real = self.root.clone();
                real.extend(rel.iter().chain(rest.iter()));
                real
            }
        })
    }

    fn check_reserved(&self, rel: &Path) -> Result<()> {
        if self.reserved.iter().any(|r| rel.starts_with(r)) {
            return Err(Error::InvalidPath(format!(
                "{} is inside the runner's state directory",
                Self::shown(rel)
            )));
        }
        Ok(())
    }

    /// The walk: one component at a time from the root descriptor, `O_NOFOLLOW` each, symlinks
    /// read and resolved here. `user_rel` is only for messages. The final component is opened
    /// with `flags`; with `create`, missing directories are made on the way (then every
    /// component is a directory).
    fn walk(
        &self,
        user_rel: &Path,
        comps: Vec<OsString>,
        flags: OFlags,
        create: bool,
    ) -> Result<Walked> {
        let shown = Self::shown(user_rel);
        let io = |e: Errno| Error::Internal(format!("{shown}: {}", errno_io(e)));
        let escape = || {
            Error::InvalidPath(format!(
                "{shown} goes through a symlink that leaves the workspace"
            ))
        };
        let mut pending: VecDeque<OsString> = comps.into();
        let mut dirs: Vec<OwnedFd> = Vec::new();
        let mut names: Vec<OsString> = Vec::new();
        let mut hops = 0usize;
        loop {
            let cur = dirs.last().map_or(self.root_fd.as_fd(), AsFd::as_fd);
            let Some(c) = pending.pop_front() else {
                // Ends on a directory reached through a symlink, or on the root.
                let fd = rustix::fs::openat(cur, ".", flags, Mode::empty()).map_err(io)?;
                return Ok(Walked::Found(Found {
                    fd,
                    rel: names.iter().collect(),
                }));
            };
            if c == ".." {
                if dirs.pop().is_none() {
                    return Err(escape());
                }
                names.pop();
                continue;
            }
            if c.is_empty() || c == "." {
                continue;
            }
            let last = pending.is_empty();
            let here: PathBuf = names.iter().chain(std::iter::once(&c)).collect();
            self.check_reserved(&here)?;
            let want = if last {
                flags | OFlags::NOFOLLOW
            } else {
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
            };
            let opened = rustix::fs::openat(cur, c.as_os_str(), want, Mode::empty());
            let symlink_error = match opened {
                Ok(fd) if !(last && flags.contains(OFlags::PATH) && is_symlink(&fd)) => {
                    names.push(c);
                    if last {
                        return Ok(Walked::Found(Found {
                            fd,
                            rel: names.iter().collect(),
                        }));
                    }
                    dirs.push(fd);
                    continue;
                }
                Ok(_) => Errno::LOOP,
                Err(Errno::NOENT) if create => {
                    match rustix::fs::mkdirat(cur, c.as_os_str(), Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(io(e)),
                    }
                    hops += 1;
                    if hops > MAX_SYMLINKS {
                        return Err(io(Errno::LOOP));
                    }
                    pending.push_front(c);
                    continue;
                }
                Err(Errno::NOENT) => {
                    let mut rest = vec![c];
                    rest.extend(pending);
                    return Ok(Walked::Missing { rel: names, rest });
                }
                Err(e @ (Errno::LOOP | Errno::NOTDIR)) => e,
                Err(e) => return Err(io(e)),
            };
            // Not opened as asked: a symlink (follow it by the jail's rules), or not a directory.
            let target = match rustix::fs::readlinkat(cur, c.as_os_str(), Vec::new()) {
                Ok(t) => OsString::from_vec(t.into_bytes()),
                Err(Errno::INVAL) if symlink_error == Errno::NOTDIR && !last => {
                    return Err(Error::InvalidPath(format!(
                        "{shown}: {} is not a directory",
                        Self::shown(&here)
                    )))
                }
                Err(Errno::INVAL) if symlink_error == Errno::NOTDIR => {
                    return Err(Error::NotADirectory(Self::shown(&here)))
                }
                // Swapped between the two calls, or gone: resolve that name again.
                Err(Errno::INVAL | Errno::NOENT) => {
                    hops += 1;
                    if hops > MAX_SYMLINKS {
                        return Err(io(Errno::LOOP));
                    }
                    pending.push_front(c);
                    continue;
                }
                Err(e) => return Err(io(e)),
            };
            hops += 1;
            if hops > MAX_SYMLINKS {
                return Err(Error::InvalidPath(format!(
                    "{shown} goes through too many symlinks"
                )));
            }
            if target.is_empty() {
                return Err(Error::InvalidPath(format!(
                    "{shown} goes through a symlink that points nowhere"
                )));
            }
            let target = PathBuf::from(target);
            let inside = if target.is_absolute() {
                let rest = target
                    .strip_prefix(&self.root)
                    .or_else(|_| target.strip_prefix(WORKSPACE_ALIAS))
                    .map_err(|_| escape())?;
                dirs.clear();
                names.clear();
                rest.to_path_buf()
            } else {
                target
            };
            for part in inside.components().rev() {
                match part {
                    Component::Normal(p) => pending.push_front(p.to_owned()),
                    Component::ParentDir => pending.push_front("..".into()),
                    Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
                }
            }
        }
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

fn components(rel: &Path) -> Vec<OsString> {
    rel.components()
        .filter_map(|c| match c {
            Component::Normal(p) => Some(p.to_owned()),
            _ => None,
        })
        .collect()
}

fn is_symlink(fd: &OwnedFd) -> bool {
    rustix::fs::fstat(fd).is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink)
}

/// A name for a temporary file next to `name` (`.NAME.agentbox-KIND-RANDOM`); the runner
/// removes such files it finds at start.
pub fn temp_name(name: &OsStr, kind: &str) -> OsString {
    let mut tmp = OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".agentbox-{kind}-{}", crate::fsutil::random_hex(6)));
    tmp
}

/// Whether `name` is one of the runner's temporary files ([`temp_name`], or the older
/// `.NAME.agentbox-RANDOM` of [`crate::fsutil::write_replace`]).
pub fn is_temp_name(name: &OsStr) -> bool {
    let b = name.as_bytes();
    b.first() == Some(&b'.') && memchr::memmem::find(b, b".agentbox-").is_some_and(|i| i > 1)
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
        let jail = Jail::new(root.clone(), vec![root.join(".agentbox")]).expect("jail");
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
        let out = jail.parent("out", false).expect("out");
        assert_eq!((out.rel, out.name), (PathBuf::from("out"), "out".into()));
        assert_eq!(
            jail.parent("in/x", false).expect("in/x").rel,
            PathBuf::from("dir/x")
        );
        for bad in [
            "out/x",
            "../x",
            ".agentbox",
            "/etc/passwd",
            "file/x",
            "/workspace",
        ] {
            assert!(jail.parent(bad, false).is_err(), "{bad}");
        }
        assert!(matches!(
            jail.parent("new/deep/x", false),
            Err(Error::FileNotFound(_))
        ));
        let made = jail.parent("new/deep/x", true).expect("created");
        assert_eq!(made.rel, PathBuf::from("new/deep/x"));
        assert!(jail.root().join("new/deep").is_dir());
    }

    #[test]
    fn opens_follow_inside_links_and_refuse_the_rest() {
        let (_ws, outside, jail) = jail();
        std::fs::write(jail.root().join("dir/f"), b"in").expect("write");
        std::fs::write(outside.path().join("f"), b"out").expect("write");
        std::os::unix::fs::symlink("../dir/f", jail.root().join("dir/rel")).expect("symlink");
        for (path, want) in [("dir/f", "dir/f"), ("in/f", "dir/f"), ("in/rel", "dir/f")] {
            let found = jail.open(path, OFlags::RDONLY).expect(path);
            assert_eq!(found.rel, PathBuf::from(want), "{path}");
            let text = std::fs::read_to_string(format!("/proc/self/fd/{}", {
                use std::os::fd::AsRawFd;
                found.fd.as_raw_fd()
            }))
            .expect("read");
            assert_eq!(text, "in");
        }
        for bad in ["out/f", "passwd", "file/x", ".agentbox"] {
            assert!(
                matches!(jail.open(bad, OFlags::RDONLY), Err(Error::InvalidPath(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            jail.open("nope", OFlags::RDONLY),
            Err(Error::FileNotFound(_))
        ));
        assert!(matches!(
            jail.open("file", OFlags::RDONLY | OFlags::DIRECTORY),
            Err(Error::NotADirectory(_))
        ));
        // The walk alone (as without openat2) gives the same answers.
        jail.openat2.store(false, Ordering::Relaxed);
        assert_eq!(
            jail.open("dir/f", OFlags::RDONLY).expect("walk").rel,
            PathBuf::from("dir/f")
        );
        assert!(jail.open("out/f", OFlags::RDONLY).is_err());
        // Messages name sandbox paths, never the host's workspace.
        let host = jail.root().display().to_string();
        for bad in [".agentbox/x", "out/f", "file/x", "nope"] {
            let message = jail.open(bad, OFlags::RDONLY).expect_err(bad).to_string();
            assert!(!message.contains(&host), "{message}");
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
            ("dangling/x", root.join("missing/x")),
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
