//! Small filesystem helpers: atomic writes, ids and clocks.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::BorrowedFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsync, the
/// permission bits, rename over the target, fsync of the directory. Readers see the old
/// content or the new, never a mix, and a crash leaves one of the two.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    write_replace(path, bytes, mode, true)
}

/// Like [`write_atomic`] without the fsyncs: still never half-written, and it survives the
/// runner being killed (the page cache keeps it), not a power cut. For files rewritten soon.
pub fn write_replace(path: &Path, bytes: &[u8], mode: u32, durable: bool) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other("path has no parent"))?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other("path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.agentbox-{}",
        name.to_string_lossy(),
        random_hex(6)
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        if durable {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        if durable {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// [`write_atomic`] for the entry `name` of the open directory `dir`: the temporary file, the
/// rename and the directory's fsync all go through the descriptor, never by path.
pub fn write_atomic_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    content: &mut dyn io::Read,
    mode: u32,
) -> io::Result<()> {
    use rustix::fs::{AtFlags, Mode, OFlags};
    let errno = |e: rustix::io::Errno| io::Error::from_raw_os_error(e.raw_os_error());
    let tmp = crate::jail::temp_name(name, "write");
    let fd = rustix::fs::openat(
        dir,
        tmp.as_os_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(errno)?;
    let result = (|| {
        let mut f = File::from(fd);
        io::copy(content, &mut f)?;
        rustix::fs::fchmod(&f, Mode::from_raw_mode(mode)).map_err(errno)?;
        f.sync_all()?;
        rustix::fs::renameat(dir, tmp.as_os_str(), dir, name).map_err(errno)?;
        rustix::fs::fsync(dir)
            .or_else(|e| {
                // An O_PATH descriptor cannot be fsynced; open the directory itself for that.
                if e == rustix::io::Errno::BADF {
                    let d = rustix::fs::openat(
                        dir,
                        ".",
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                        Mode::empty(),
                    )?;
                    rustix::fs::fsync(d)
                } else {
                    Err(e)
                }
            })
            .map_err(errno)
    })();
    if result.is_err() {
        let _ = rustix::fs::unlinkat(dir, tmp.as_os_str(), AtFlags::empty());
    }
    result
}

/// `n` random bytes as lowercase hex.
pub fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    if getrandom::fill(&mut buf).is_err() {
        // The kernel's random source is unavailable; fall back to the clock, which is only
        // used to keep names apart, never as a secret.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (nanos >> ((i % 16) * 8)) as u8;
        }
    }
    hex::encode(buf)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The current time in RFC 3339 (UTC, milliseconds).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_sets_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        write_atomic(&path, b"one", 0o644).expect("write");
        write_atomic(&path, b"two", 0o755).expect("write");
        assert_eq!(std::fs::read(&path).expect("read"), b"two");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o7777, 0o755);
        let leftovers = std::fs::read_dir(dir.path()).expect("ls").count();
        assert_eq!(leftovers, 1, "no temporary files left behind");
    }

    #[test]
    fn random_hex_has_the_asked_length() {
        assert_eq!(random_hex(8).len(), 16);
        assert_ne!(random_hex(8), random_hex(8));
    }
}
