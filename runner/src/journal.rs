//! The per-invoke event log: a sequence-numbered journal on disk, an in-memory tail of recent
//! bytes, and a watch channel that wakes subscribers.
//!
//! Every event is encoded once as SSE wire bytes ([`crate::sse`]) and appended under one lock,
//! which also assigns its sequence number, writes it to the journal file and publishes the new
//! end offset. A subscriber is nothing but a byte offset into that one ordered log: it reads
//! from the tail while it keeps up and from the file when it falls behind, so replay and live
//! following are the same code path and no event can be skipped or repeated between them.
//! Writers never wait for readers.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use agentbox_proto::Stream;
use bytes::Bytes;
use serde::Serialize;
use tokio::sync::watch;

use crate::sse;

/// How much recent output is kept in memory for subscribers that keep up.
const TAIL_MAX_BYTES: usize = 2 << 20;
/// After close, the tail shrinks to this much.
const TAIL_CLOSED_BYTES: usize = 64 << 10;
/// Distance between entries of the sparse sequence → offset index.
const INDEX_STRIDE: u64 = 16 << 10;
/// Largest single read from the journal file.
const READ_CHUNK: u64 = 1 << 20;
/// How far ahead of the write position a recycled journal's old bytes are zeroed.
const ZERO_AHEAD: u64 = 1 << 20;

/// The name and JSON data of the last event of a journal.
pub type LastEvent = (String, String);

/// What has been published so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes in the log.
    pub end: u64,
    /// Sequence number of the last event (0 when empty).
    pub last_seq: u64,
    /// No event will follow.
    pub closed: bool,
}

/// One invoke's (or install's, or session's) event log.
#[derive(Debug)]
pub struct EventLog {
    inner: Mutex<Inner>,
    progress: watch::Sender<Progress>,
    /// Set once the journal file is open ([`EventLog::open_file`]): the file the writer
    /// writes (one descriptor for both; it closes with the last holder).
    reader: OnceLock<Arc<File>>,
    path: PathBuf,
    cap: u64,
    mirror: OnceLock<Mirror>,
}

/// Called with the wire bytes of every batch, under the log's lock, before subscribers are
/// woken: what a mirror copies elsewhere is there before anyone can see it here.
pub struct Mirror(pub MirrorFn);

/// The function of a [`Mirror`].
pub type MirrorFn = Box<dyn Fn(&[u8]) + Send + Sync>;

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Mirror")
    }
}

/// The journal file being written.
///
/// A recycled file (a pruned invoke's journal, see `Invokes::retire`) is overwritten in place
/// rather than truncated first: its pages are still in the page cache, and writing into them
/// costs a fraction of allocating new ones (measured 7.8 against 1.4 GB/s on ext4 here). The
/// old bytes past the write position are never served (readers stop at the published end),
/// and a NUL barrier is kept right after the last write so that recovery after a crash
/// ([`EventLog::open_existing`] stops at the first NUL; SSE text never holds one) cannot take
/// them for events: before bytes go past the zeroed stretch, the next [`ZERO_AHEAD`] bytes are
/// zeroed first. The old tail is cut off when the log closes.
#[derive(Debug)]
struct JournalFile {
    file: Arc<File>,
    /// Where the old bytes of a recycled file end (0 for a new file).
    stale_end: u64,
    /// Bytes from the write position up to here are NUL (or past `stale_end`).
    zeroed_to: u64,
}

impl JournalFile {
    fn new(file: Arc<File>, stale_end: u64) -> Self {
        // A recycled file starts with a NUL (written when it was retired).
        Self {
            file,
            stale_end,
            zeroed_to: stale_end.min(1),
        }
    }

    fn write_at(&mut self, buf: &[u8], at: u64) -> io::Result<()> {
        let end = at + buf.len() as u64;
        // Zeroed must be every old byte this write covers (so that a write cut short by a
        // kill leaves NULs, not old bytes, after it) and the byte after it.
        let need = if end < self.stale_end {
            end + 1
        } else {
            self.stale_end
        };
        if self.zeroed_to < need {
            let to = (end + ZERO_AHEAD).min(self.stale_end);
            write_zeros(&self.file, self.zeroed_to, to)?;
            self.zeroed_to = to;
        }
        self.file.write_all_at(buf, at)
    }
}

/// Writes NUL bytes over `from..to` of `file`.
fn write_zeros(file: &File, mut from: u64, to: u64) -> io::Result<()> {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    while from < to {
        let n = (to - from).min(ZEROS.len() as u64) as usize;
        file.write_all_at(&ZEROS[..n], from)?;
        from += n as u64;
    }
    Ok(())
}

/// The old bytes a recycled journal still holds past its end once closed (see
/// [`EventLog::close_keeping_tail`]).
#[derive(Debug)]
pub struct StaleTail {
    file: Arc<File>,
    end: u64,
    stale_end: u64,
    path: PathBuf,
}

impl StaleTail {
    /// How many old bytes there are to cut.
    pub fn bytes(&self) -> u64 {
        self.stale_end.saturating_sub(self.end)
    }

    /// Cuts them off (freeing many pages takes a while: done outside the log's lock).
    pub fn cut(self) {
        if let Err(e) = self.file.set_len(self.end) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot cut a recycled journal's old bytes");
        }
    }
}

/// Where [`EventLog::open_file`] gets the journal file.
#[derive(Debug)]
pub enum Journal {
    /// A new file at the log's path (which must not exist).
    New,
    /// The file at the log's path, a pruned invoke's journal barred by a NUL over its first
    /// byte (see `Invokes::retire`); already open for reading and writing when given.
    Recycled(Option<File>),
}

#[derive(Debug)]
struct Inner {
    /// Closed (None) once the log is: a finished invoke holds no write descriptor.
    writer: Option<JournalFile>,
    next_seq: u64,
    end: u64,
    index: Vec<(u64, u64)>,
    last_indexed: Option<u64>,
    tail: VecDeque<(u64, Bytes)>,
    tail_bytes: usize,
    stored: u64,
    dropped: u64,
    closed: bool,
    write_failed: bool,
    /// Size of the last batch, to allocate the next one once.
    last_batch: usize,
}

/// Events being appended together, under the log's lock.
pub struct Batch<'a> {
    inner: &'a mut Inner,
    buf: &'a mut Vec<u8>,
    cap: u64,
}

impl Batch<'_> {
    /// The sequence number the next event will get.
    pub fn next_seq(&self) -> u64 {
        self.inner.next_seq
    }

    /// Appends an event with a JSON payload; returns its sequence number. Its bytes count
    /// towards the cap (so `log` events stop earlier) but it is never dropped.
    pub fn event<T: Serialize>(&mut self, name: &str, data: &T) -> u64 {
        let seq = self.inner.next_seq;
        self.inner.next_seq += 1;
        let before = self.buf.len();
        sse::push_frame(self.buf, seq, name, data);
        self.inner.stored += (self.buf.len() - before) as u64;
        seq
    }

    /// Appends a `log` event, unless its frame would take the journal past the cap (which
    /// counts journal bytes, as stored on disk, not output bytes: a one-byte line is a frame of
    /// about 60): then the output bytes are counted in [`EventLog::dropped_bytes`] instead.
    pub fn log(&mut self, stream: Stream, bytes: &[u8], partial: bool) {
        let len = bytes.len() as u64 + u64::from(!partial);
        // Once the cap is hit everything after is dropped, so what is stored is a prefix.
        if self.inner.dropped > 0 || self.inner.stored + len > self.cap {
            self.inner.dropped += len;
            return;
        }
        let seq = self.inner.next_seq;
        let before = self.buf.len();
        sse::push_log_frame(self.buf, seq, stream, bytes, partial);
        let framed = (self.buf.len() - before) as u64;
        if self.inner.stored + framed > self.cap {
            self.buf.truncate(before);
            self.inner.dropped += len;
            return;
        }
        self.inner.next_seq += 1;
        self.inner.stored += framed;
    }
}

impl EventLog {
    /// Creates an empty log journaled at `path` (which must not exist), storing at most `cap`
    /// bytes of output.
    pub fn create(path: &Path, cap: u64) -> io::Result<Arc<Self>> {
        let log = Self::deferred(path, cap);
        log.open_file(Journal::New)?;
        Ok(log)
    }

    /// An empty log whose journal file is created later, by [`EventLog::open_file`], which
    /// must come before the first append: an invoke creates it on its pump thread while the
    /// process starts, not on the spawn's critical path.
    pub fn deferred(path: &Path, cap: u64) -> Arc<Self> {
        Self::from_parts(None, None, path, cap, 1, 0, Vec::new())
    }

    /// Opens the journal file of a [`EventLog::deferred`] log (see [`EventLog::create`]): a
    /// new file, or a recycled one at the log's path whose old bytes are overwritten as the
    /// log grows.
    pub fn open_file(&self, journal: Journal) -> io::Result<()> {
        let (file, stale_end) = match journal {
            Journal::New => {
                let file = OpenOptions::new()
                    .create_new(true)
                    .read(true)
                    .write(true)
                    .open(&self.path)?;
                (file, 0)
            }
            Journal::Recycled(open) => {
                let file = match open {
                    Some(file) => file,
                    None => OpenOptions::new().read(true).write(true).open(&self.path)?,
                };
                let len = file.metadata()?.len();
                (file, len)
            }
        };
        // One descriptor, for writing and for readers that fall behind the tail.
        let file = Arc::new(file);
        let mut inner = self.lock();
        debug_assert_eq!(inner.end, 0, "open_file after an append");
        inner.writer = Some(JournalFile::new(Arc::clone(&file), stale_end));
        let _ = self.reader.set(file);
        Ok(())
    }

    fn reader(&self) -> io::Result<&Arc<File>> {
        self.reader
            .get()
            .ok_or_else(|| io::Error::other("the journal file is not open yet"))
    }

    /// Opens an existing journal (after a restart), repairing a torn last frame: the events
    /// end at the last complete frame before the first NUL byte (the barrier in front of a
    /// recycled file's old bytes) or the end of the file, and the rest is cut off. The log is
    /// open for appending; call [`EventLog::close`] when nothing more will be added.
    /// Also returns the last event's name and data.
    pub fn open_existing(path: &Path) -> io::Result<(Arc<Self>, Option<LastEvent>)> {
        let mut file = OpenOptions::new().read(true).write(true).open(path)?;
        let len = file.metadata()?.len();
        let mut index = Vec::new();
        let mut last_seq = 0;
        let mut last_event = None;
        let mut offset: u64 = 0;
        let mut last_indexed: Option<u64> = None;
        let mut pending: Vec<u8> = Vec::new();
        let mut chunk = vec![0u8; 1 << 20];
        let mut barrier = false;
        while !barrier {
            let mut n = file.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            if let Some(nul) = memchr::memchr(0, &chunk[..n]) {
                (n, barrier) = (nul, true);
            }
            pending.extend_from_slice(&chunk[..n]);
            let mut pos = 0;
            while let Some(end) = memchr::memmem::find(&pending[pos..], b"\n\n") {
                let frame = &pending[pos..pos + end + 2];
                let (frames, _) = sse::parse_frames(frame);
                if let Some(f) = frames.first() {
                    if last_indexed.is_none_or(|at| offset - at >= INDEX_STRIDE) {
                        index.push((f.id, offset));
                        last_indexed = Some(offset);
                    }
                    last_seq = f.id;
                    last_event = Some((f.event.to_owned(), f.data.to_owned()));
                }
                offset += frame.len() as u64;
                pos += end + 2;
            }
            pending.drain(..pos);
        }
        if offset != len {
            file.set_len(offset)?;
        }
        let file = Arc::new(file);
        let log = Self::from_parts(
            Some(JournalFile::new(Arc::clone(&file), 0)),
            Some(file),
            path,
            u64::MAX,
            last_seq + 1,
            offset,
            index,
        );
        if let Ok(mut inner) = log.inner.lock() {
            inner.last_indexed = last_indexed;
        }
        Ok((log, last_event))
    }

    fn from_parts(
        writer: Option<JournalFile>,
        reader: Option<Arc<File>>,
        path: &Path,
        cap: u64,
        next_seq: u64,
        end: u64,
        index: Vec<(u64, u64)>,
    ) -> Arc<Self> {
        let (progress, _) = watch::channel(Progress {
            end,
            last_seq: next_seq - 1,
            closed: false,
        });
        Arc::new(Self {
            inner: Mutex::new(Inner {
                writer,
                next_seq,
                end,
                index,
                last_indexed: None,
                tail: VecDeque::new(),
                tail_bytes: 0,
                stored: 0,
                dropped: 0,
                closed: false,
                write_failed: false,
                last_batch: 0,
            }),
            progress,
            reader: reader.map_or_else(OnceLock::new, OnceLock::from),
            path: path.to_owned(),
            cap,
            mirror: OnceLock::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock would be a bug in this module; the data it guards
        // stays consistent (every field is updated after the write), so keep serving.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The journal file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Installs the mirror (once; later calls are ignored).
    pub fn set_mirror(&self, mirror: Mirror) {
        let _ = self.mirror.set(mirror);
    }

    /// Appends the events `f` adds, as one write, and wakes subscribers.
    /// Appends to a closed log are ignored.
    pub fn append<R>(&self, f: impl FnOnce(&mut Batch<'_>) -> R) -> Option<R> {
        let mut inner = self.lock();
        if inner.closed {
            return None;
        }
        let mut buf = Vec::with_capacity(inner.last_batch.max(256));
        let first_seq = inner.next_seq;
        let result = f(&mut Batch {
            inner: &mut inner,
            buf: &mut buf,
            cap: self.cap,
        });
        if buf.is_empty() {
            return Some(result);
        }
        let offset = inner.end;
        let written = match inner.writer.as_mut() {
            Some(writer) => writer.write_at(&buf, offset),
            None => Err(io::Error::other("the journal is closed")),
        };
        if let Err(e) = written {
            if !inner.write_failed {
                tracing::error!(path = %self.path.display(), error = %e, "journal write failed; later replays will miss events");
            }
            inner.write_failed = true;
        }
        if inner
            .last_indexed
            .is_none_or(|at| offset - at >= INDEX_STRIDE)
        {
            inner.index.push((first_seq, offset));
            inner.last_indexed = Some(offset);
        }
        if let Some(mirror) = self.mirror.get() {
            (mirror.0)(&buf);
        }
        let len = buf.len();
        inner.last_batch = len.min(1 << 20) + len / 8;
        inner.end += len as u64;
        inner.tail.push_back((offset, Bytes::from(buf)));
        inner.tail_bytes += len;
        trim_tail(&mut inner, TAIL_MAX_BYTES);
        self.publish(&inner);
        Some(result)
    }

    /// Marks the log complete: subscribers end after the last event.
    ///
    /// The journal is not fsynced: it survives the runner being killed (the page cache holds
    /// it), and an fdatasync per invoke cost a measurable share of an invoke; a power cut may
    /// lose the tail of recent journals, which recovery then reads as far as they go.
    pub fn close(&self) {
        if let Some(tail) = self.close_keeping_tail() {
            tail.cut();
        }
    }

    /// Closes the log as [`EventLog::close`] does, but leaves a recycled file's old bytes past
    /// the end for the caller to cut with [`StaleTail::cut`] (after the client has been
    /// answered, say). Until then they lie behind the NUL barrier, never read.
    pub fn close_keeping_tail(&self) -> Option<StaleTail> {
        let (writer, end) = {
            let mut inner = self.lock();
            inner.closed = true;
            trim_tail(&mut inner, TAIL_CLOSED_BYTES);
            self.publish(&inner);
            // Closes the write descriptor: a finished invoke keeps none open.
            (inner.writer.take(), inner.end)
        };
        writer
            .filter(|w| w.stale_end > end)
            .map(|writer| StaleTail {
                stale_end: writer.stale_end,
                file: writer.file,
                end,
                path: self.path.clone(),
            })
    }

    fn publish(&self, inner: &Inner) {
        self.progress.send_replace(Progress {
            end: inner.end,
            last_seq: inner.next_seq - 1,
            closed: inner.closed,
        });
    }

    /// What has been published.
    pub fn progress(&self) -> Progress {
        *self.progress.borrow()
    }

    /// Output bytes counted but not stored because of the cap.
    pub fn dropped_bytes(&self) -> u64 {
        self.lock().dropped
    }

    /// Follows the log from the event after `after` (0: from the start). May read the journal
    /// file to find the position, so call it off the async runtime when `after > 0`.
    pub fn subscribe(self: &Arc<Self>, after: u64) -> io::Result<Subscription> {
        let offset = if after == 0 {
            0
        } else {
            self.offset_after(after)?
        };
        Ok(Subscription {
            log: Arc::clone(self),
            offset,
            rx: self.progress.subscribe(),
        })
    }

    fn offset_after(&self, after: u64) -> io::Result<u64> {
        let (start, stop) = {
            let inner = self.lock();
            if after >= inner.next_seq - 1 {
                return Ok(inner.end);
            }
            let i = inner
                .index
                .partition_point(|(seq, _)| *seq <= after + 1)
                .saturating_sub(1);
            let start = inner.index.get(i).map_or(0, |(_, off)| *off);
            let stop = inner.index.get(i + 1).map_or(inner.end, |(_, off)| *off);
            (start, stop)
        };
        let mut buf = vec![0u8; (stop - start) as usize];
        self.reader()?.read_exact_at(&mut buf, start)?;
        let mut pos = 0;
        while let Some(end) = memchr::memmem::find(&buf[pos..], b"\n\n") {
            let (frames, _) = sse::parse_frames(&buf[pos..pos + end + 2]);
            if frames.first().is_some_and(|f| f.id > after) {
                break;
            }
            pos += end + 2;
        }
        Ok(start + pos as u64)
    }

    fn slice_from_tail(&self, offset: u64, end: u64) -> Option<Bytes> {
        let inner = self.lock();
        let (first, _) = inner.tail.front()?;
        if offset < *first {
            return None;
        }
        let i = inner
            .tail
            .partition_point(|(off, _)| *off <= offset)
            .checked_sub(1)?;
        let (chunk_off, bytes) = &inner.tail[i];
        let from = (offset - chunk_off) as usize;
        let to = bytes.len().min((end - chunk_off) as usize);
        (from < to).then(|| bytes.slice(from..to))
    }
}

fn trim_tail(inner: &mut Inner, max: usize) {
    while inner.tail_bytes > max && inner.tail.len() > 1 {
        if let Some((_, b)) = inner.tail.pop_front() {
            inner.tail_bytes -= b.len();
        }
    }
}

/// A reader of an [`EventLog`]: yields the wire bytes of every event after its start point, in
/// order, then ends once the log is closed.
#[derive(Debug)]
pub struct Subscription {
    log: Arc<EventLog>,
    offset: u64,
    rx: watch::Receiver<Progress>,
}

impl Subscription {
    /// The byte offset of the next read.
    pub fn position(&self) -> u64 {
        self.offset
    }

    /// Waits until the log is closed, at most `window`; whether it is.
    pub async fn closed_within(&self, window: std::time::Duration) -> bool {
        let mut rx = self.rx.clone();
        let closed = async move { rx.wait_for(|p| p.closed).await.is_ok() };
        tokio::time::timeout(window, closed).await.unwrap_or(false)
    }

    /// The next bytes, waiting for new events; `None` once the log is closed and all was read.
    pub async fn next(&mut self) -> Option<io::Result<Bytes>> {
        loop {
            let progress = *self.rx.borrow_and_update();
            if self.offset < progress.end {
                return Some(self.read(progress.end).await);
            }
            if progress.closed {
                return None;
            }
            if self.rx.changed().await.is_err() {
                return None;
            }
        }
    }

    async fn read(&mut self, end: u64) -> io::Result<Bytes> {
        if let Some(bytes) = self.log.slice_from_tail(self.offset, end) {
            self.offset += bytes.len() as u64;
            return Ok(bytes);
        }
        let len = (end - self.offset).min(READ_CHUNK) as usize;
        let offset = self.offset;
        let file = Arc::clone(self.log.reader()?);
        let bytes = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len];
            file.read_exact_at(&mut buf, offset).map(|()| buf)
        })
        .await
        .map_err(io::Error::other)??;
        self.offset += len as u64;
        Ok(Bytes::from(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    async fn collect(mut sub: Subscription) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(chunk) = sub.next().await {
            out.extend_from_slice(&chunk.expect("read"));
        }
        out
    }

    fn ids(bytes: &[u8]) -> Vec<u64> {
        sse::parse_frames(bytes).0.iter().map(|f| f.id).collect()
    }

    #[tokio::test]
    async fn replay_from_any_point_has_no_gap_and_no_duplicate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = EventLog::create(&dir.path().join("j"), u64::MAX).expect("create");
        let line = vec![b'x'; 3000];
        for _ in 0..200 {
            log.append(|b| {
                b.log(Stream::Stdout, &line, false);
                b.log(Stream::Stderr, b"e", true);
            });
        }
        log.close();
        for after in [0u64, 1, 2, 7, 150, 399, 400, 401] {
            let got = ids(&collect(log.subscribe(after).expect("subscribe")).await);
            let want: Vec<u64> = (after + 1..=400).collect();
            assert_eq!(got, want, "after {after}");
        }
    }

    #[tokio::test]
    async fn live_subscriber_sees_appends_made_after_it_started() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = EventLog::create(&dir.path().join("j"), u64::MAX).expect("create");
        log.append(|b| b.event("start", &1));
        let sub = log.subscribe(0).expect("subscribe");
        let reader = tokio::spawn(collect(sub));
        for _ in 0..1000 {
            log.append(|b| b.log(Stream::Stdout, b"hello", false));
            tokio::task::yield_now().await;
        }
        log.append(|b| b.event("exit", &0));
        log.close();
        let got = ids(&reader.await.expect("join"));
        assert_eq!(got, (1..=1002).collect::<Vec<_>>());
    }

    /// The cap counts journal bytes (whole frames), not output bytes.
    #[tokio::test]
    async fn cap_counts_instead_of_storing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("j");
        // One `log` frame of "12345" is about 60 bytes: room for one, not two.
        let log = EventLog::create(&path, 100).expect("create");
        log.append(|b| {
            b.log(Stream::Stdout, b"12345", false);
            b.log(Stream::Stdout, b"67890", false);
            b.log(Stream::Stdout, b"abc", true);
        });
        assert_eq!(log.dropped_bytes(), 9);
        log.close();
        assert_eq!(ids(&collect(log.subscribe(0).expect("sub")).await), vec![1]);
        let on_disk = std::fs::metadata(&path).expect("journal").len();
        assert!(on_disk <= 100, "{on_disk} bytes on disk");
    }

    /// A directory and the path of a journal to retire and recycle.
    fn recycling_path() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("journal");
        (dir, path)
    }

    /// Retires a journal as `Invokes::retire` does: a NUL over its first byte, in place;
    /// returns it open, as a warm spare is.
    fn retire(journal: &Path) -> File {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(journal)
            .expect("open");
        f.write_all_at(&[0], 0).expect("barrier");
        f
    }

    #[tokio::test]
    async fn a_recycled_journal_never_shows_its_old_bytes() {
        let (dir, path) = recycling_path();
        // The worst case: the old journal holds exactly the bytes the new one will write, only
        // more of them (the same program run twice).
        let line = vec![b'y'; 99];
        let write = |log: &EventLog, n: usize| {
            for _ in 0..n {
                log.append(|b| b.log(Stream::Stdout, &line, false));
            }
        };
        let log = EventLog::create(&path, u64::MAX).expect("create");
        write(&log, 30_000);
        log.close();
        let old_len = std::fs::metadata(&path).expect("stat").len();
        drop(retire(&path));
        // Nothing can be recovered from a retired journal.
        let (log, last) = EventLog::open_existing(&path).expect("reopen the spare");
        assert_eq!((log.progress().last_seq, last), (0, None));
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), 0);
        // Again, for the recycling below.
        std::fs::remove_file(&path).expect("remove");
        let log = EventLog::create(&path, u64::MAX).expect("create");
        write(&log, 30_000);
        log.close();
        let spare = retire(&path);

        let log = EventLog::deferred(&path, u64::MAX);
        log.open_file(Journal::Recycled(Some(spare)))
            .expect("recycle");
        for n in [1usize, 10, 5_000, 3_000] {
            write(&log, n);
            let end = log.progress().end;
            let bytes = std::fs::read(&path).expect("read");
            assert_eq!(bytes.len() as u64, old_len, "overwritten in place");
            assert_eq!(bytes[end as usize], 0, "a NUL right after the events");
            // A runner killed now: recovery finds exactly the events written.
            let copy = dir.path().join("crashed");
            std::fs::write(&copy, &bytes).expect("copy");
            let (recovered, _) = EventLog::open_existing(&copy).expect("recover");
            assert_eq!(recovered.progress().end, end);
            assert_eq!(recovered.progress().last_seq, log.progress().last_seq);
            assert_eq!(std::fs::metadata(&copy).expect("stat").len(), end);
        }
        log.append(|b| b.event("exit", &0));
        log.close();
        let bytes = std::fs::read(&path).expect("read");
        assert_eq!(bytes.len() as u64, log.progress().end, "old bytes cut off");
        assert_eq!(ids(&bytes), (1..=8012).collect::<Vec<_>>());
        assert_eq!(
            ids(&collect(log.subscribe(8000).expect("sub")).await),
            (8001..=8012).collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn a_recycled_journal_grows_past_its_old_size() {
        let (_dir, path) = recycling_path();
        let log = EventLog::create(&path, u64::MAX).expect("create");
        log.append(|b| b.log(Stream::Stdout, b"short", false));
        log.close();
        drop(retire(&path));
        // A cold spare: opened by its path.
        let log = EventLog::deferred(&path, u64::MAX);
        log.open_file(Journal::Recycled(None)).expect("recycle");
        for _ in 0..1000 {
            log.append(|b| b.log(Stream::Stdout, &[b'z'; 500], false));
        }
        log.close();
        let bytes = std::fs::read(&path).expect("read");
        assert_eq!(bytes.len() as u64, log.progress().end);
        assert_eq!(ids(&bytes), (1..=1000).collect::<Vec<_>>());
        assert!(!bytes.contains(&0));
    }

    #[tokio::test]
    async fn reopen_repairs_a_torn_frame_and_continues_numbering() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("j");
        {
            let log = EventLog::create(&path, u64::MAX).expect("create");
            for _ in 0..5000 {
                log.append(|b| b.log(Stream::Stdout, b"some output line", false));
            }
        }
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(b"id: 5001\nevent: log\ndata: {\"str")
            .expect("torn");
        drop(f);
        let (log, last) = EventLog::open_existing(&path).expect("reopen");
        assert_eq!(last.map(|(event, _)| event).as_deref(), Some("log"));
        assert_eq!(log.progress().last_seq, 5000);
        log.append(|b| b.event("exit", &0));
        log.close();
        let got = ids(&collect(log.subscribe(4990).expect("sub")).await);
        assert_eq!(got, (4991..=5001).collect::<Vec<_>>());
        let all = ids(&collect(log.subscribe(0).expect("sub")).await);
        assert_eq!(all.len(), 5001);
    }
}
