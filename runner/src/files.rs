//! The files API's domain: listings, byte ranges, streamed atomic uploads, deletes and streamed
//! archives. Every path arrives here already resolved by [`crate::jail::Jail`].

use std::fs::{File, Metadata};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::fsutil::random_hex;
use crate::jail::WORKSPACE_ALIAS;

pub use agentbox_proto::{FileEntry as Entry, FileListing as Listing, WrittenFile as Written};

/// The sandbox path (`/workspace/...`) of a real path inside the workspace.
pub fn sandbox_path(root: &Path, real: &Path) -> String {
    match real.strip_prefix(root) {
        Ok(rel) if rel.as_os_str().is_empty() => WORKSPACE_ALIAS.to_owned(),
        Ok(rel) => format!("{WORKSPACE_ALIAS}/{}", rel.display()),
        Err(_) => real.display().to_string(),
    }
}

/// `ls -l` style mode string.
pub fn mode_string(meta: &Metadata) -> String {
    let ft = meta.file_type();
    let kind = if ft.is_dir() {
        'd'
    } else if ft.is_symlink() {
        'l'
    } else {
        '-'
    };
    let bits = meta.permissions().mode();
    let mut s = String::with_capacity(10);
    s.push(kind);
    for (shift, chars) in [
        (6, ['r', 'w', 'x']),
        (3, ['r', 'w', 'x']),
        (0, ['r', 'w', 'x']),
    ] {
        for (i, c) in chars.iter().enumerate() {
            let bit = 1 << (shift + 2 - i);
            s.push(if bits & bit != 0 { *c } else { '-' });
        }
    }
    s
}

fn entry(root: &Path, path: &Path, meta: &Metadata) -> Entry {
    let ft = meta.file_type();
    let kind = if ft.is_symlink() {
        "symlink"
    } else if ft.is_dir() {
        "dir"
    } else {
        "file"
    };
    Entry {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        path: sandbox_path(root, path),
        kind: kind.into(),
        is_dir: ft.is_dir(),
        size: meta.len(),
        mode: mode_string(meta),
        mode_bits: meta.permissions().mode() & 0o7777,
        modified_at: meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs()),
    }
}

/// Lists a directory; `hidden` names (the state directory) are left out.
pub fn list(root: &Path, dir: &Path, hidden: &Path) -> Result<Listing> {
    let meta = std::fs::metadata(dir).map_err(|e| not_found_or(e, dir, root))?;
    if !meta.is_dir() {
        return Err(Error::NotADirectory(sandbox_path(root, dir)));
    }
    let mut entries = Vec::new();
    for item in std::fs::read_dir(dir)? {
        let item = item?;
        let path = item.path();
        if path == hidden {
            continue;
        }
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            entries.push(entry(root, &path, &meta));
        }
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Listing { entries })
}

fn not_found_or(e: io::Error, path: &Path, root: &Path) -> Error {
    if e.kind() == io::ErrorKind::NotFound {
        Error::FileNotFound(sandbox_path(root, path))
    } else {
        Error::Internal(format!("{}: {e}", sandbox_path(root, path)))
    }
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
            (last + 1).min(len)
        };
        ByteRange { start, end }
    };
    if range.start >= len {
        return Err(());
    }
    Ok(Some(range))
}

/// Streams `body` into `target` atomically: a temporary file next to it, fsync, rename. Past
/// `limit` bytes the temporary file is removed and the previous file is left as it was.
pub async fn write_stream(
    root: &Path,
    target: &Path,
    mut body: impl futures_util::Stream<Item = std::result::Result<Bytes, axum::Error>> + Unpin,
    limit: u64,
) -> Result<Written> {
    use futures_util::StreamExt;
    // The entry itself, not what a symlink there points to: a PUT replaces a link.
    let existing = std::fs::symlink_metadata(target).ok();
    if existing.as_ref().is_some_and(|m| m.is_dir()) {
        return Err(Error::IsADirectory(sandbox_path(root, target)));
    }
    let mode = existing
        .as_ref()
        .filter(|m| m.is_file())
        .map_or(0o644, |m| m.permissions().mode() & 0o7777);
    let parent = target
        .parent()
        .ok_or_else(|| Error::InvalidPath("no parent directory".into()))?;
    tokio::fs::create_dir_all(parent).await?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.agentbox-upload-{}", random_hex(6)));
    let result = async {
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .await?;
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
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .await?;
        file.sync_all().await?;
        drop(file);
        tokio::fs::rename(&tmp, target).await?;
        Ok(Written {
            path: sandbox_path(root, target),
            size,
            sha256: hex::encode(hasher.finalize()),
        })
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
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

/// Deletes a file, a symlink (not its target) or, with `recursive`, a directory.
pub fn delete(root: &Path, target: &Path, recursive: bool) -> Result<()> {
    if target == root {
        return Err(Error::InvalidPath(
            "the workspace itself cannot be deleted".into(),
        ));
    }
    let meta = std::fs::symlink_metadata(target).map_err(|e| not_found_or(e, target, root))?;
    if meta.is_dir() {
        if recursive {
            std::fs::remove_dir_all(target)?;
        } else {
            std::fs::remove_dir(target).map_err(|e| {
                if e.raw_os_error() == Some(nix::libc::ENOTEMPTY) {
                    Error::DirectoryNotEmpty(sandbox_path(root, target))
                } else {
                    Error::from(e)
                }
            })?;
        }
    } else {
        std::fs::remove_file(target)?;
    }
    Ok(())
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

/// Starts writing an archive of `dir` on a blocking thread; the receiver yields its bytes.
/// Nothing is built in memory or on disk first. `hidden` (the state directory) is skipped.
pub fn archive(dir: PathBuf, hidden: PathBuf, format: Format) -> mpsc::Receiver<io::Result<Bytes>> {
    let (tx, rx) = mpsc::channel(4);
    let err_tx = tx.clone();
    tokio::task::spawn_blocking(move || {
        let writer = ChannelWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
        };
        let result = match format {
            Format::Zip => write_zip(&dir, &hidden, writer),
            Format::Tar => write_tar(&dir, &hidden, writer),
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

/// Every entry under `dir` (not following symlinks), parents before children, sorted.
fn walk(dir: &Path, hidden: &Path) -> io::Result<Vec<(PathBuf, Metadata)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut children: Vec<PathBuf> = std::fs::read_dir(&d)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p != hidden)
            .collect();
        children.sort();
        for path in children.into_iter().rev() {
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                stack.push(path.clone());
            }
            out.push((path, meta));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn write_zip(dir: &Path, hidden: &Path, writer: ChannelWriter) -> io::Result<()> {
    use zip::write::SimpleFileOptions;
    let mut zip = zip::ZipWriter::new_stream(writer);
    for (path, meta) in walk(dir, hidden)? {
        let Ok(rel) = path.strip_prefix(dir) else {
            continue;
        };
        let name = rel.to_string_lossy().into_owned();
        let mut options = SimpleFileOptions::default()
            .unix_permissions(meta.mode() & 0o7777)
            .large_file(meta.len() >= 0xffff_0000);
        if let Some(t) = zip_time(meta.mtime()) {
            options = options.last_modified_time(t);
        }
        if meta.is_dir() {
            zip.add_directory(format!("{name}/"), options)
                .map_err(io::Error::other)?;
        } else if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&path)?;
            zip.add_symlink(name, target.to_string_lossy(), options)
                .map_err(io::Error::other)?;
        } else if meta.is_file() {
            zip.start_file(
                name,
                options.compression_method(zip::CompressionMethod::Deflated),
            )
            .map_err(io::Error::other)?;
            io::copy(&mut File::open(&path)?, &mut zip)?;
        }
    }
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

fn write_tar(dir: &Path, hidden: &Path, writer: ChannelWriter) -> io::Result<()> {
    let mut tar = tar::Builder::new(writer);
    tar.follow_symlinks(false);
    for (path, meta) in walk(dir, hidden)? {
        let ft = meta.file_type();
        // Like the zip: files, directories and symlinks; FIFOs, sockets and devices are skipped.
        if !(ft.is_file() || ft.is_dir() || ft.is_symlink()) {
            continue;
        }
        if let Ok(rel) = path.strip_prefix(dir) {
            tar.append_path_with_name(&path, rel)?;
        }
    }
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
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        assert_eq!(
            mode_string(&std::fs::metadata(&f).expect("meta")),
            "-rw-r-----"
        );
        assert!(mode_string(&std::fs::metadata(dir.path()).expect("meta")).starts_with('d'));
    }
}
