//! The files API's domain: listings, byte ranges, streamed atomic uploads, deletes and streamed
//! archives. Every entry arrives here already opened by [`crate::jail::Jail`], and everything
//! below it is reached with `*at` calls and `O_NOFOLLOW` from that descriptor, never by name
//! from the root, so a symlink swapped in meanwhile cannot lead outside.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};
use rustix::io::Errno;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::jail::{temp_name, Jail, Parent};

pub use agentbox_proto::{FileEntry as Entry, FileListing as Listing, WrittenFile as Written};

/// Directory levels an archive or a recursive delete descends (each holds a descriptor).
pub const MAX_DEPTH: usize = 256;

/// `ls -l` style mode string of a raw `st_mode`.
pub fn mode_string(mode: u32) -> String {
    let kind = match FileType::from_raw_mode(mode) {
        FileType::Directory => 'd',
        FileType::Symlink => 'l',
        _ => '-',
    };
    let mut s = String::with_capacity(10);
    s.push(kind);
    for (shift, chars) in [
        (6, ['r', 'w', 'x']),
        (3, ['r', 'w', 'x']),
        (0, ['r', 'w', 'x']),
    ] {
        for (i, c) in chars.iter().enumerate() {
            let bit = 1 << (shift + 2 - i);
            s.push(if mode & bit != 0 { *c } else { '-' });
        }
    }
    s
}

fn entry(rel: &Path, name: &OsStr, st: &Stat) -> Entry {
    let ft = FileType::from_raw_mode(st.st_mode);
    let kind = match ft {
        FileType::Symlink => "symlink",
        FileType::Directory => "dir",
        _ => "file",
    };
    Entry {
        name: name.to_string_lossy().into_owned(),
        path: Jail::shown(rel),
        kind: kind.into(),
        is_dir: ft == FileType::Directory,
        size: st.st_size as u64,
        mode: mode_string(st.st_mode),
        mode_bits: st.st_mode & 0o7777,
        modified_at: st.st_mtime.max(0) as u64,
    }
}

fn errno(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

/// The names in an open directory (`.` and `..` left out), sorted.
fn names(dir: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    let mut out = Vec::new();
    for item in rustix::fs::Dir::read_from(dir).map_err(errno)? {
        let item = item.map_err(errno)?;
        let name = OsStr::from_bytes(item.file_name().to_bytes());
        if name != "." && name != ".." {
            out.push(name.to_owned());
        }
    }
    out.sort();
    Ok(out)
}

/// Lists the directory `dir` (at `rel`); reserved directories (the state directory) are left
/// out.
pub fn list(jail: &Jail, dir: &OwnedFd, rel: &Path) -> Result<Listing> {
    let mut entries = Vec::new();
    for name in names(dir.as_fd())? {
        let Ok(st) = rustix::fs::statat(dir, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW) else {
            continue;
        };
        if jail.is_reserved(st.st_dev, st.st_ino) {
            continue;
        }
        entries.push(entry(&rel.join(&name), &name, &st));
    }
    Ok(Listing { entries })
}

/// A byte range `[start, end)` of a file of `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// Parses a `Range` header against a file length. `Ok(None)`: serve the whole file (no header,
/// a header that is not a single well-formed byte range — RFC 9110 says to ignore those — or
/// several ranges, which may be answered in full). `Err(())`: 416, the range starts past the end.
#[allow(clippy::result_unit_err)]
pub fn parse_range(header: Option<&str>, len: u64) -> std::result::Result<Option<ByteRange>, ()> {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        let Ok(n) = b.parse::<u64>() else {
            return Ok(None);
        };
        if n == 0 {
            return Err(());
        }
        ByteRange {
            start: len.saturating_sub(n),
            end: len,
        }
    } else {
        let Ok(start) = a.parse::<u64>() else {
            return Ok(None);
        };
        let end = if b.is_empty() {
            len
        } else {
            let Ok(last) = b.parse::<u64>() else {
                return Ok(None);
            };
            if last < start {
                return Ok(None);
            }
            last.saturating_add(1).min(len)
        };
        ByteRange { start, end }
    };
    if range.start >= len {
        return Err(());
    }
    Ok(Some(range))
}

/// Streams `body` into the entry `target` atomically: a temporary file in the same directory
/// (opened by descriptor), fsync, rename. Past `limit` bytes, or on any failure, the temporary
/// file is removed and the previous file is left as it was.
pub async fn write_stream(
    target: Parent,
    mut body: impl futures_util::Stream<Item = std::result::Result<Bytes, axum::Error>> + Unpin,
    limit: u64,
) -> Result<Written> {
    use futures_util::StreamExt;
    let shown = Jail::shown(&target.rel);
    let Parent { dir, name, rel } = target;
    // The entry itself, not what a symlink there points to: a PUT replaces a link.
    let existing = rustix::fs::statat(&dir, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW).ok();
    let mode = match existing.map(|st| (FileType::from_raw_mode(st.st_mode), st.st_mode)) {
        Some((FileType::Directory, _)) => return Err(Error::IsADirectory(shown)),
        Some((FileType::RegularFile, mode)) => mode & 0o7777,
        _ => 0o644,
    };
    let tmp = temp_name(&name, "upload");
    let fd = rustix::fs::openat(
        &dir,
        tmp.as_os_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| Error::Internal(format!("{shown}: {}", errno(e))))?;
    let result = async {
        let mut file = tokio::fs::File::from_std(File::from(fd));
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        while let Some(chunk) = body.next().await {
            let chunk = chunk
                .map_err(|e| Error::InvalidRequest(format!("the upload was interrupted: {e}")))?;
            size += chunk.len() as u64;
            if size > limit {
                drain(&mut body).await;
                return Err(Error::PayloadTooLarge(format!(
                    "uploads are limited to {limit} bytes"
                )));
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await?;
        }
        file.flush().await?;
        let file = file.into_std().await;
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            rustix::fs::fchmod(&file, Mode::from_raw_mode(mode)).map_err(errno)?;
            file.sync_all()
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
        rustix::fs::renameat(&dir, tmp.as_os_str(), &dir, name.as_os_str())
            .map_err(|e| Error::Internal(format!("{shown}: {}", errno(e))))?;
        Ok(Written {
            path: Jail::shown(&rel),
            size,
            sha256: hex::encode(hasher.finalize()),
        })
    }
    .await;
    if result.is_err() {
        let _ = rustix::fs::unlinkat(&dir, tmp.as_os_str(), AtFlags::empty());
    }
    result
}

/// Reads and discards what is left of a refused request body (bounded in bytes and time), so
/// that the error response reaches the client: closing a socket with unread data makes the
/// kernel reset the connection, and the client may then never see the answer.
pub async fn drain(
    body: &mut (impl futures_util::Stream<Item = std::result::Result<Bytes, axum::Error>> + Unpin),
) {
    use futures_util::StreamExt;
    const MAX_BYTES: u64 = 16 << 20;
    let mut seen = 0u64;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
        while let Some(Ok(chunk)) = body.next().await {
            seen += chunk.len() as u64;
            if seen > MAX_BYTES {
                break;
            }
        }
    })
    .await;
}

/// Deletes the entry `target`: a file, a symlink (not its target) or, with `recursive`, a
/// directory with its content (descended by descriptor, never following a symlink).
pub fn delete(target: &Parent, recursive: bool) -> Result<()> {
    let shown = Jail::shown(&target.rel);
    let fail = |e: Errno| match e {
        Errno::NOENT => Error::FileNotFound(shown.clone()),
        Errno::NOTEMPTY => Error::DirectoryNotEmpty(shown.clone()),
        e => Error::Internal(format!("{shown}: {}", errno(e))),
    };
    let (dir, name) = (target.dir.as_fd(), target.name.as_os_str());
    let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(fail)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return rustix::fs::unlinkat(dir, name, AtFlags::empty()).map_err(fail);
    }
    if recursive {
        let fd = open_dir_at(dir, name).map_err(fail)?;
        empty_dir(fd).map_err(|e| Error::Internal(format!("{shown}: {e}")))?;
    }
    rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR).map_err(fail)
}

fn open_dir_at(dir: BorrowedFd<'_>, name: &OsStr) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Removes everything inside the open directory `top`, depth first, one descriptor per level.
fn empty_dir(top: OwnedFd) -> io::Result<()> {
    // Each frame: a directory and the name it has in the frame below (None for `top`).
    let mut stack: Vec<(OwnedFd, Option<OsString>)> = vec![(top, None)];
    while let Some((fd, _)) = stack.last() {
        let mut descend = None;
        for name in names(fd.as_fd())? {
            match rustix::fs::unlinkat(fd, name.as_os_str(), AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(Errno::ISDIR | Errno::PERM) => {
                    descend = Some((open_dir_at(fd.as_fd(), &name).map_err(errno)?, name));
                    break;
                }
                Err(e) => return Err(errno(e)),
            }
        }
        match descend {
            Some((child, name)) if stack.len() < MAX_DEPTH => stack.push((child, Some(name))),
            Some(_) => return Err(io::Error::other("the directory tree is too deep")),
            None => {
                let (done, name) = stack.pop().expect("a frame");
                drop(done);
                if let (Some(name), Some((parent, _))) = (name, stack.last()) {
                    match rustix::fs::unlinkat(parent, name.as_os_str(), AtFlags::REMOVEDIR) {
                        Ok(()) | Err(Errno::NOENT) => {}
                        Err(e) => return Err(errno(e)),
                    }
                }
            }
        }
    }
    Ok(())
}

/// Entries a start-up sweep for temporary files looks at, at most.
pub const MAX_SWEEP: usize = 200_000;

/// Removes, in the background, the temporary files (`.NAME.agentbox-*`) a runner that died
/// left in the workspace (uploads and configure writes in progress): the workspace is walked by
/// descriptor, symlinks not followed, the state directory skipped, at most [`MAX_SWEEP`]
/// entries and [`MAX_DEPTH`] levels.
pub fn sweep_temp_files(jail: &Jail) {
    let Ok(root) = jail.root_fd().try_clone_to_owned() else {
        return;
    };
    // Only what is older than this start: uploads already running beside the sweep have
    // temporary files of their own.
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| (d.as_secs() as i64, i64::from(d.subsec_nanos())))
        .unwrap_or((i64::MAX, 0));
    let hidden = jail.reserved_ids();
    let spawned = std::thread::Builder::new()
        .name("temp-sweep".into())
        .spawn(move || {
            let (mut seen, mut removed) = (0usize, 0usize);
            let Ok(top) = rustix::fs::openat(
                &root,
                ".",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            ) else {
                return;
            };
            // One frame per level: the directory and its names still to look at.
            let mut stack = vec![(top, Vec::<OsString>::new(), false)];
            loop {
                let depth = stack.len();
                let Some((dir, pending, listed)) = stack.last_mut() else {
                    break;
                };
                if !*listed {
                    *pending = names(dir.as_fd()).unwrap_or_default();
                    pending.reverse();
                    *listed = true;
                }
                let Some(name) = pending.pop() else {
                    stack.pop();
                    continue;
                };
                seen += 1;
                if seen > MAX_SWEEP {
                    tracing::warn!(
                        removed,
                        "temporary file sweep stopped at {MAX_SWEEP} entries"
                    );
                    return;
                }
                let Ok(st) = rustix::fs::statat(&*dir, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)
                else {
                    continue;
                };
                let ft = FileType::from_raw_mode(st.st_mode);
                let older = (st.st_mtime, st.st_mtime_nsec as i64) < started;
                if ft == FileType::RegularFile && crate::jail::is_temp_name(&name) && older {
                    if rustix::fs::unlinkat(&*dir, name.as_os_str(), AtFlags::empty()).is_ok() {
                        removed += 1;
                    }
                } else if ft == FileType::Directory
                    && !hidden.contains(&(st.st_dev, st.st_ino))
                    && depth < MAX_DEPTH
                {
                    if let Ok(child) = open_dir_at(dir.as_fd(), &name) {
                        stack.push((child, Vec::new(), false));
                    }
                }
            }
            if removed > 0 {
                tracing::info!(removed, "removed temporary files a previous runner left");
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the temporary file sweep");
    }
}

pub use agentbox_proto::ArchiveFormat as Format;

/// A `Write` that hands fixed-size chunks to an async receiver; `write` blocks (on the archive
/// thread) while the client is slow, so memory stays bounded.
struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
}

const CHUNK: usize = 64 << 10;

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "client went away"))
    }
}

/// Starts writing an archive of the open directory `dir` on a blocking thread; the receiver
/// yields its bytes. Nothing is built in memory or on disk first. Reserved directories (the
/// state directory) are skipped.
pub fn archive(
    dir: OwnedFd,
    hidden: Vec<(u64, u64)>,
    format: Format,
) -> mpsc::Receiver<io::Result<Bytes>> {
    let (tx, rx) = mpsc::channel(4);
    let err_tx = tx.clone();
    tokio::task::spawn_blocking(move || {
        let writer = ChannelWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
        };
        let result = match format {
            Format::Zip => write_zip(dir, &hidden, writer),
            Format::Tar => write_tar(dir, &hidden, writer),
        };
        if let Err(e) = result {
            if e.kind() != io::ErrorKind::BrokenPipe {
                tracing::warn!(error = %e, "archive failed");
                let _ = err_tx.blocking_send(Err(e));
            }
        }
    });
    rx
}

/// One entry met by [`walk`], opened (a file, a directory) or read (a symlink's target).
enum Node {
    Dir,
    File(File),
    Link(OsString),
}

/// Visits every entry under `dir` (not following symlinks), parents before children, sorted
/// by path: each directory is opened `O_NOFOLLOW` from its parent's descriptor, each file read
/// from a descriptor opened the same way; FIFOs, sockets and devices are skipped.
fn walk(
    dir: OwnedFd,
    hidden: &[(u64, u64)],
    mut visit: impl FnMut(&Path, &Stat, Node) -> io::Result<()>,
) -> io::Result<()> {
    struct Frame {
        fd: OwnedFd,
        prefix: PathBuf,
        /// Names still to visit, in reverse order (the next is popped).
        pending: Vec<OsString>,
    }
    let frame = |fd: OwnedFd, prefix: PathBuf| -> io::Result<Frame> {
        let mut pending = names(fd.as_fd())?;
        pending.reverse();
        Ok(Frame {
            fd,
            prefix,
            pending,
        })
    };
    let mut stack = vec![frame(dir, PathBuf::new())?];
    while let Some(top) = stack.last_mut() {
        let Some(name) = top.pending.pop() else {
            stack.pop();
            continue;
        };
        let rel = top.prefix.join(&name);
        let at = top.fd.as_fd();
        let Ok(st) = rustix::fs::statat(at, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW) else {
            continue;
        };
        if hidden.contains(&(st.st_dev, st.st_ino)) {
            continue;
        }
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => {
                let Ok(fd) = open_dir_at(at, &name) else {
                    continue;
                };
                let st = rustix::fs::fstat(&fd).map_err(errno)?;
                visit(&rel, &st, Node::Dir)?;
                if stack.len() >= MAX_DEPTH {
                    return Err(io::Error::other("the directory tree is too deep"));
                }
                stack.push(frame(fd, rel)?);
            }
            FileType::RegularFile => {
                let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
                let Ok(fd) = rustix::fs::openat(at, name.as_os_str(), flags, Mode::empty()) else {
                    continue;
                };
                let st = rustix::fs::fstat(&fd).map_err(errno)?;
                if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile {
                    visit(&rel, &st, Node::File(File::from(fd)))?;
                }
            }
            FileType::Symlink => {
                let Ok(target) = rustix::fs::readlinkat(at, name.as_os_str(), Vec::new()) else {
                    continue;
                };
                let target = OsStr::from_bytes(target.as_bytes()).to_owned();
                visit(&rel, &st, Node::Link(target))?;
            }
            _ => {}
        }
    }
    Ok(())
}

fn write_zip(dir: OwnedFd, hidden: &[(u64, u64)], writer: ChannelWriter) -> io::Result<()> {
    use zip::write::SimpleFileOptions;
    let mut zip = zip::ZipWriter::new_stream(writer);
    walk(dir, hidden, |rel, st, node| {
        let name = rel.to_string_lossy().into_owned();
        let size = st.st_size as u64;
        let mut options = SimpleFileOptions::default()
            .unix_permissions(st.st_mode & 0o7777)
            .large_file(size >= 0xffff_0000);
        if let Some(t) = zip_time(st.st_mtime) {
            options = options.last_modified_time(t);
        }
        match node {
            Node::Dir => zip
                .add_directory(format!("{name}/"), options)
                .map_err(io::Error::other),
            Node::Link(target) => zip
                .add_symlink(name, target.to_string_lossy(), options)
                .map_err(io::Error::other),
            Node::File(mut file) => {
                zip.start_file(
                    name,
                    options.compression_method(zip::CompressionMethod::Deflated),
                )
                .map_err(io::Error::other)?;
                io::copy(&mut file, &mut zip).map(drop)
            }
        }
    })?;
    let mut inner = zip.finish().map_err(io::Error::other)?.into_inner();
    inner.flush()
}

/// A zip timestamp (UTC) for Unix seconds; `None` outside zip's 1980–2107 range.
fn zip_time(secs: i64) -> Option<zip::DateTime> {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    zip::DateTime::from_date_and_time(
        u16::try_from(year).ok()?,
        month as u8,
        day as u8,
        (rem / 3600) as u8,
        (rem % 3600 / 60) as u8,
        (rem % 60) as u8,
    )
    .ok()
}

fn write_tar(dir: OwnedFd, hidden: &[(u64, u64)], writer: ChannelWriter) -> io::Result<()> {
    let mut tar = tar::Builder::new(writer);
    walk(dir, hidden, |rel, st, node| {
        let mut header = tar::Header::new_gnu();
        header.set_mode(st.st_mode & 0o7777);
        header.set_uid(u64::from(st.st_uid));
        header.set_gid(u64::from(st.st_gid));
        header.set_mtime(st.st_mtime.max(0) as u64);
        match node {
            Node::Dir => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                tar.append_data(&mut header, rel, io::empty())
            }
            Node::Link(target) => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                tar.append_link(&mut header, rel, Path::new(&target))
            }
            Node::File(file) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(st.st_size as u64);
                // Exactly the size announced, even if the file changes while it is read.
                let mut body =
                    io::Read::chain(io::Read::take(file, st.st_size as u64), io::repeat(0));
                tar.append_data(
                    &mut header,
                    rel,
                    io::Read::take(&mut body, st.st_size as u64),
                )
            }
        }
    })?;
    let mut inner = tar.into_inner()?;
    inner.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let r = |h: &str| parse_range(Some(h), 100);
        assert_eq!(r("bytes=0-9"), Ok(Some(ByteRange { start: 0, end: 10 })));
        assert_eq!(
            r("bytes=90-"),
            Ok(Some(ByteRange {
                start: 90,
                end: 100
            }))
        );
        assert_eq!(
            r("bytes=-5"),
            Ok(Some(ByteRange {
                start: 95,
                end: 100
            }))
        );
        assert_eq!(
            r("bytes=95-500"),
            Ok(Some(ByteRange {
                start: 95,
                end: 100
            }))
        );
        assert_eq!(r("bytes=-500"), Ok(Some(ByteRange { start: 0, end: 100 })));
        assert_eq!(r("bytes=0-1,5-6"), Ok(None));
        assert_eq!(r("items=0-1"), Ok(None));
        assert_eq!(parse_range(None, 100), Ok(None));
        for ignored in ["bytes=5-2", "bytes=x-1", "bytes=7", "bytes=1-y"] {
            assert_eq!(r(ignored), Ok(None), "{ignored}");
        }
        // The largest last byte does not overflow.
        assert_eq!(
            r("bytes=2-18446744073709551615"),
            Ok(Some(ByteRange { start: 2, end: 100 }))
        );
        for unsatisfiable in ["bytes=100-", "bytes=-0", "bytes=500-600"] {
            assert_eq!(r(unsatisfiable), Err(()), "{unsatisfiable}");
        }
    }

    #[test]
    fn zip_times_are_civil_dates() {
        let t = zip_time(1_795_365_438).expect("in range");
        assert_eq!(
            (
                t.year(),
                t.month(),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            ),
            (2026, 11, 22, 16, 37, 18)
        );
        assert!(zip_time(0).is_none(), "1970 is before zip's epoch");
    }

    #[test]
    fn mode_strings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").expect("write");
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        assert_eq!(
            mode_string(std::fs::metadata(&f).expect("meta").mode()),
            "-rw-r-----"
        );
        assert!(mode_string(std::fs::metadata(dir.path()).expect("meta").mode()).starts_with('d'));
    }
}
