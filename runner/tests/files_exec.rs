//! The files API, exec and code mode, end to end against the real binary: streamed uploads and
//! downloads, byte ranges, atomic replacement, archives read back by the real `unzip` and `tar`,
//! the path jail on every route, deletes, exec (JSON and SSE, timeout, cancel, reattach, bad
//! bodies), code mode and the upload size cap.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{exit_event, parse_sse, pid_exists, read_until, rebuild, Event, Runner, TOKEN};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

use agentbox_testkit::Rng;

fn seeded(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    Rng::new(seed).fill(&mut out);
    out
}

fn sha_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// sha256 of a file on disk, read in 1 MiB pieces.
fn sha_file(path: &Path) -> String {
    let mut file = std::fs::File::open(path).unwrap();
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 1 << 20];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    hex::encode(hasher.finalize())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn error_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body)
}

fn put_req(r: &Runner, path: &str) -> reqwest::RequestBuilder {
    r.client
        .put(r.url(&format!("/v1/files/{path}")))
        .bearer_auth(TOKEN)
}

fn delete_req(r: &Runner, path: &str) -> reqwest::RequestBuilder {
    r.client
        .delete(r.url(&format!("/v1/files/{path}")))
        .bearer_auth(TOKEN)
}

/// `PUT /v1/files/{path}` → (status, JSON body).
async fn put(r: &Runner, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
    error_of(put_req(r, path).body(body).send().await.unwrap()).await
}

/// `GET /v1/files/{path}` → (status, bytes).
async fn read(r: &Runner, path: &str) -> (u16, Vec<u8>) {
    let resp = r.get(&format!("/v1/files/{path}")).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.bytes().await.unwrap().to_vec())
}

/// `GET /v1/files?path=` → (status, JSON body).
async fn list(r: &Runner, path: &str) -> (u16, Value) {
    let resp = r
        .get(&format!("/v1/files?path={}", encode(path)))
        .send()
        .await
        .unwrap();
    error_of(resp).await
}

/// Percent-encodes every byte but ASCII letters, digits, `-`, `_` and `~` (dots and slashes
/// included, so `..` travels as `%2E%2E`).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Percent-encodes only what cannot appear raw in a query value.
fn encode_min(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_graphic() && !b"%&#+".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A response read off a raw socket.
struct Raw {
    status: u16,
    body: Vec<u8>,
}

/// Sends one HTTP/1.1 request with `target` exactly as given: reqwest (like every WHATWG URL
/// parser) folds `..` and `%2e%2e` segments away before sending, so hostile paths go raw.
async fn raw(r: &Runner, method: &str, target: &str, body: &[u8]) -> Raw {
    let mut s = tokio::net::TcpStream::connect(r.addr).await.unwrap();
    let head = format!(
        "{method} {target} HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {TOKEN}\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n",
        r.addr,
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out))
        .await
        .unwrap_or_else(|_| panic!("{method} {target}: no complete response"))
        .unwrap();
    let split = find(&out, b"\r\n\r\n")
        .unwrap_or_else(|| panic!("{method} {target}: bad response {out:?}"));
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut body = out[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Raw { status, body }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = find(b, b"\r\n") {
        let line = String::from_utf8_lossy(&b[..eol]);
        let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16).unwrap_or(0);
        b = &b[eol + 2..];
        if size == 0 {
            break;
        }
        let take = size.min(b.len());
        out.extend_from_slice(&b[..take]);
        b = &b[(size + 2).min(b.len())..];
    }
    out
}

/// Everything under `dir` (not following symlinks) as `relative path → description`, the
/// description holding a file's size and sha256, a symlink's target, or `dir`. Top-level names
/// in `skip` are left out.
fn snapshot(dir: &Path, skip: &[&str]) -> BTreeMap<String, String> {
    fn walk(base: &Path, dir: &Path, skip: &[&str], out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path
                .strip_prefix(base)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if dir == base && skip.contains(&rel.as_str()) {
                continue;
            }
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let desc = if meta.file_type().is_symlink() {
                format!("link -> {}", std::fs::read_link(&path).unwrap().display())
            } else if meta.is_dir() {
                walk(base, &path, skip, out);
                "dir".to_owned()
            } else {
                format!("file {} {}", meta.len(), sha_file(&path))
            };
            out.insert(rel, desc);
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, skip, &mut out);
    out
}

/// Upload temporaries (`.NAME.agentbox-upload-XXXX`) left in `dir`.
fn upload_temps(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') && n.contains("agentbox-upload"))
        .collect()
}

/// `POST /v1/exec` with `Accept: application/json` → (status, JSON body).
async fn exec_json(r: &Runner, body: Value) -> (u16, Value) {
    let resp = r
        .post("/v1/exec")
        .header("accept", "application/json")
        .json(&body)
        .send()
        .await
        .unwrap();
    error_of(resp).await
}

/// `POST /v1/exec` as SSE, read to its end.
async fn exec_sse(r: &Runner, body: Value) -> Vec<Event> {
    let resp = r
        .post("/v1/exec")
        .header("accept", "text/event-stream")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{body}");
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let bytes = tokio::time::timeout(Duration::from_secs(60), resp.bytes())
        .await
        .expect("exec stream did not end")
        .unwrap();
    parse_sse(&bytes)
}

fn assert_ids(events: &[Event], first: u64, what: &str) {
    let got: Vec<u64> = events.iter().map(|e| e.id).collect();
    let want: Vec<u64> = (first..first + events.len() as u64).collect();
    assert_eq!(got, want, "{what}: ids are not consecutive from {first}");
}

fn invoke_id_of(events: &[Event]) -> String {
    let start = events.first().expect("no events");
    assert_eq!(start.event, "start", "{events:?}");
    start.data["invokeId"].as_str().unwrap().to_owned()
}

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

async fn download(r: &Runner, path_and_query: &str, to: &Path) -> reqwest::header::HeaderMap {
    let mut resp = r.get(path_and_query).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{path_and_query}");
    let headers = resp.headers().clone();
    let mut file = std::fs::File::create(to).unwrap();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        file.write_all(&chunk).unwrap();
    }
    headers
}

// ---------------------------------------------------------------------------------------------
// 1. A 200 MB round trip, streamed both ways
// ---------------------------------------------------------------------------------------------

/// `sha256sum` (coreutils) fed through a pipe: the debug build's sha2 would take most of this
/// test's time on 200 MiB.
struct Sha256Sum(std::process::Child);

impl Sha256Sum {
    fn new() -> Sha256Sum {
        Sha256Sum(
            Command::new("sha256sum")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("this test needs sha256sum"),
        )
    }

    fn update(&mut self, data: &[u8]) {
        self.0.stdin.as_mut().unwrap().write_all(data).unwrap();
    }

    fn finish(mut self) -> String {
        drop(self.0.stdin.take());
        let out = self.0.wait_with_output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()[..64].to_owned()
    }
}

fn sha256sum_file(path: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(path));
    String::from_utf8(out).unwrap()[..64].to_owned()
}

/// Deterministic, never-repeating bulk data at memcpy speed: 4 KiB pieces copied from a random
/// pool at xorshift offsets, each stamped with its index, so that any lost, doubled or
/// reordered piece changes the hash.
struct Bulk {
    rng: Rng,
    pool: Vec<u8>,
    piece: u64,
}

impl Bulk {
    const PIECE: usize = 4096;

    fn new(seed: u64) -> Bulk {
        Bulk {
            rng: Rng::new(seed),
            pool: seeded(seed ^ 0x5a5a, (1 << 20) + Self::PIECE),
            piece: 0,
        }
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for out in buf.chunks_mut(Self::PIECE) {
            let off = (self.rng.next() % (1 << 20)) as usize;
            out.copy_from_slice(&self.pool[off..off + out.len()]);
            let stamp = self.piece.to_le_bytes();
            let n = out.len().min(8);
            out[..n].copy_from_slice(&stamp[..n]);
            self.piece += 1;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_of_200_mb_streamed() {
    const MIB: usize = 1 << 20;
    const SIZE: u64 = 200 << 20;
    let r = Runner::start(&[]);
    let started = Instant::now();

    // The source lives outside the workspace and is never held in memory whole.
    let src = r.dir.join("big.src");
    {
        let mut out = std::fs::File::create(&src).unwrap();
        let mut bulk = Bulk::new(0xb16_f11e);
        let mut buf = vec![0; MIB];
        for _ in 0..SIZE / MIB as u64 {
            bulk.fill(&mut buf);
            out.write_all(&buf).unwrap();
        }
    }
    let want = sha256sum_file(&src);
    eprintln!("generated 200 MiB in {:?}", started.elapsed());

    // Streamed from the file, with its length declared.
    let file = tokio::fs::File::open(&src).await.unwrap();
    let body =
        reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(file, 256 << 10));
    let resp = put_req(&r, "workspace/big/nested/data.bin")
        .header("content-length", SIZE.to_string())
        .body(body)
        .send()
        .await
        .unwrap();
    let (status, answer) = error_of(resp).await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(
        answer,
        json!({"path": "/workspace/big/nested/data.bin", "size": SIZE, "sha256": want})
    );
    eprintln!("uploaded after {:?}", started.elapsed());

    // On disk: parents created, full size, same bytes, no temporary left behind.
    let on_disk = r.workspace.join("big/nested/data.bin");
    assert_eq!(std::fs::metadata(&on_disk).unwrap().len(), SIZE);
    assert_eq!(sha256sum_file(&on_disk), want, "the stored file differs");
    assert!(upload_temps(on_disk.parent().unwrap()).is_empty());

    // Streamed back, hashed chunk by chunk.
    let mut resp = r
        .get("/v1/files/workspace/big/nested/data.bin")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-length"], SIZE.to_string().as_str());
    assert_eq!(resp.headers()["content-type"], "application/octet-stream");
    let mut hasher = Sha256Sum::new();
    let mut got: u64 = 0;
    while let Some(chunk) = resp.chunk().await.unwrap() {
        got += chunk.len() as u64;
        hasher.update(&chunk);
    }
    assert_eq!(got, SIZE, "the download was cut short");
    assert_eq!(hasher.finish(), want, "the download differs");
    eprintln!("downloaded after {:?}", started.elapsed());

    // The real absolute path names the same file; a suffix range reads its tail.
    let mut tail = vec![0; 16];
    {
        let mut f = std::fs::File::open(&src).unwrap();
        std::io::Seek::seek(&mut f, std::io::SeekFrom::End(-16)).unwrap();
        f.read_exact(&mut tail).unwrap();
    }
    let resp = r
        .get(&format!("/v1/files{}", on_disk.display()))
        .header("range", "bytes=-16")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 206);
    assert_eq!(
        resp.headers()["content-range"],
        format!("bytes {}-{}/{SIZE}", SIZE - 16, SIZE - 1).as_str()
    );
    assert_eq!(resp.bytes().await.unwrap().as_ref(), tail.as_slice());

    let (status, listing) = list(&r, "/workspace/big/nested").await;
    assert_eq!(status, 200, "{listing}");
    let entries = listing["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{listing}");
    assert_eq!(entries[0]["name"], "data.bin");
    assert_eq!(entries[0]["size"], SIZE);
    assert_eq!(entries[0]["type"], "file");
    eprintln!("round trip done in {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// 2. Byte ranges
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn byte_ranges_and_416() {
    let r = Runner::start(&[]);
    // 3 MiB: ranges cross the server's 256 KiB read chunks.
    let data = seeded(7, 3 << 20);
    let len = data.len() as u64;
    let (status, body) = put(&r, "workspace/r.bin", data.clone()).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["sha256"], sha_hex(&data));

    let cases: &[(&str, u64, u64)] = &[
        ("bytes=0-0", 0, 0),
        ("bytes=10-19", 10, 19),
        ("bytes=262140-1048580", 262_140, 1_048_580),
        ("bytes=3145000-", 3_145_000, len - 1),
        ("bytes=0-", 0, len - 1),
        ("bytes=-7", len - 7, len - 1),
        ("bytes=-1", len - 1, len - 1),
        ("bytes=3145720-99999999", 3_145_720, len - 1),
        ("bytes=-99999999", 0, len - 1),
        (" bytes=5-5 ", 5, 5),
    ];
    for &(header, first, last) in cases {
        let resp = r
            .get("/v1/files/workspace/r.bin")
            .header("range", header)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 206, "{header}");
        let h = resp.headers().clone();
        assert_eq!(
            h["content-range"],
            format!("bytes {first}-{last}/{len}").as_str(),
            "{header}"
        );
        assert_eq!(
            h["content-length"],
            (last - first + 1).to_string().as_str(),
            "{header}"
        );
        assert_eq!(h["accept-ranges"], "bytes");
        let got = resp.bytes().await.unwrap();
        assert!(
            got.as_ref() == &data[first as usize..=last as usize],
            "{header}: wrong bytes ({} received)",
            got.len()
        );
    }

    // No range, a multi-range (RFC 9110 lets a server answer it in full) and a foreign unit: 200.
    for header in [None, Some("bytes=0-1,5-6"), Some("items=0-5")] {
        let mut req = r.get("/v1/files/workspace/r.bin");
        if let Some(h) = header {
            req = req.header("range", h);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200, "{header:?}");
        assert!(resp.headers().get("content-range").is_none(), "{header:?}");
        assert_eq!(resp.headers()["accept-ranges"], "bytes");
        assert!(resp.bytes().await.unwrap() == data, "{header:?}");
    }

    // Unsatisfiable: 416 with `Content-Range: bytes */LEN` and the JSON error.
    for header in ["bytes=3145728-", "bytes=99999999-100000000", "bytes=-0"] {
        let resp = r
            .get("/v1/files/workspace/r.bin")
            .header("range", header)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 416, "{header}");
        assert_eq!(
            resp.headers()["content-range"],
            format!("bytes */{len}").as_str()
        );
        let (_, body) = error_of(resp).await;
        assert_eq!(body["error"], "range_not_satisfiable", "{header}: {body}");
    }

    // An empty file: every range is unsatisfiable, a plain read is empty.
    let (status, body) = put(&r, "workspace/empty", Vec::<u8>::new()).await;
    assert_eq!(status, 201);
    assert_eq!(body["size"], 0);
    assert_eq!(body["sha256"], sha_hex(b""));
    let resp = r
        .get("/v1/files/workspace/empty")
        .header("range", "bytes=0-")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 416);
    assert_eq!(resp.headers()["content-range"], "bytes */0");
    assert_eq!(read(&r, "workspace/empty").await, (200, Vec::new()));

    // Directories and missing files.
    std::fs::create_dir(r.workspace.join("d")).unwrap();
    let resp = r.get("/v1/files/workspace/d").send().await.unwrap();
    let (status, body) = error_of(resp).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("is_a_directory"))
    );
    let resp = r.get("/v1/files/workspace/missing").send().await.unwrap();
    let (status, body) = error_of(resp).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("file_not_found"))
    );
    assert_eq!(body["message"], "/workspace/missing does not exist");
}

// ---------------------------------------------------------------------------------------------
// 3. Atomic replacement under concurrent readers
// ---------------------------------------------------------------------------------------------

const ATOMIC_SIZE: usize = 20 << 20;

/// Reads the file to the end and checks it is entirely one letter and complete; returns the
/// letter. `pause` runs after the first chunk (to let writers replace the file mid-read).
async fn read_uniform<F: std::future::Future<Output = ()>>(
    r: &Runner,
    pattern_a: &[u8],
    pattern_b: &[u8],
    pause: impl FnOnce() -> F,
) -> u8 {
    let mut resp = r
        .get("/v1/files/workspace/atomic.bin")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-length"],
        ATOMIC_SIZE.to_string().as_str()
    );
    let mut letter = None;
    let mut got = 0usize;
    let mut pause = Some(pause);
    while let Some(chunk) = resp.chunk().await.unwrap() {
        let l = *letter.get_or_insert(chunk[0]);
        let pattern = match l {
            b'a' => pattern_a,
            b'b' => pattern_b,
            other => panic!("byte {other} in the file"),
        };
        for piece in chunk.chunks(pattern.len()) {
            assert!(
                piece == &pattern[..piece.len()],
                "a read mixed old and new content near offset {got}"
            );
            got += piece.len();
        }
        if let Some(p) = pause.take() {
            p().await;
        }
    }
    assert_eq!(got, ATOMIC_SIZE, "a read was cut short");
    letter.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_is_atomic_under_concurrent_readers() {
    let r = Arc::new(Runner::start(&[]));
    let all_a = Bytes::from(vec![b'a'; ATOMIC_SIZE]);
    let all_b = Bytes::from(vec![b'b'; ATOMIC_SIZE]);
    let pattern_a: Arc<[u8]> = vec![b'a'; 1 << 20].into();
    let pattern_b: Arc<[u8]> = vec![b'b'; 1 << 20].into();
    let (status, body) = put(&r, "workspace/atomic.bin", all_a.clone()).await;
    assert_eq!(status, 201, "{body}");

    let writes = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    const ROUNDS: usize = 10;

    // Two readers in a loop, and one slow reader that waits mid-file for two replacements.
    let mut readers = Vec::new();
    for _ in 0..2 {
        let (r, done, pa, pb) = (
            Arc::clone(&r),
            Arc::clone(&done),
            Arc::clone(&pattern_a),
            Arc::clone(&pattern_b),
        );
        readers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while !done.load(Ordering::SeqCst) || seen.is_empty() {
                seen.push(read_uniform(&r, &pa, &pb, || async {}).await);
            }
            seen
        }));
    }
    let slow = {
        let (r, writes, pa, pb) = (
            Arc::clone(&r),
            Arc::clone(&writes),
            Arc::clone(&pattern_a),
            Arc::clone(&pattern_b),
        );
        tokio::spawn(async move {
            let before = writes.load(Ordering::SeqCst);
            let letter = read_uniform(&r, &pa, &pb, || async {
                let deadline = Instant::now() + Duration::from_secs(60);
                while writes.load(Ordering::SeqCst) < before + 2 {
                    assert!(Instant::now() < deadline, "the writer stalled");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await;
            (before, letter)
        })
    };

    for round in 0..ROUNDS {
        let body = if round % 2 == 0 { &all_b } else { &all_a };
        let (status, answer) = put(&r, "workspace/atomic.bin", body.clone()).await;
        assert_eq!(status, 201, "round {round}: {answer}");
        assert_eq!(answer["size"], ATOMIC_SIZE);
        writes.fetch_add(1, Ordering::SeqCst);
    }
    done.store(true, Ordering::SeqCst);

    let (before, letter) = slow.await.unwrap();
    // What it read is the content that was in place when it opened the file.
    let expected = if before % 2 == 0 {
        [b'a', b'b']
    } else {
        [b'b', b'a']
    };
    assert!(
        expected.contains(&letter),
        "slow reader saw {}",
        letter as char
    );
    let mut total = 0;
    let mut letters = BTreeSet::new();
    for reader in readers {
        let seen = reader.await.unwrap();
        total += seen.len();
        letters.extend(seen);
    }
    eprintln!(
        "{total} concurrent reads saw {:?}",
        letters.iter().map(|&l| l as char).collect::<Vec<_>>()
    );
    assert!(total >= 2, "the readers did not run");

    // The last write ('a', as ROUNDS is even) is in place, whole, with no temporaries left.
    let on_disk = std::fs::read(r.workspace.join("atomic.bin")).unwrap();
    assert_eq!(on_disk.len(), ATOMIC_SIZE);
    assert!(on_disk.iter().all(|&b| b == b'a'));
    assert!(upload_temps(&r.workspace).is_empty());
}

// ---------------------------------------------------------------------------------------------
// 4. Archives, read back by the real unzip and tar
// ---------------------------------------------------------------------------------------------

fn make_tree(ws: &Path) -> Vec<u8> {
    let blob = seeded(42, 300_000);
    std::fs::write(ws.join("top.txt"), b"hello\n").unwrap();
    std::fs::write(ws.join(".hidden"), b"dot file\n").unwrap();
    std::fs::write(
        ws.join(".agentbox-not-state"),
        b"only the state dir is hidden\n",
    )
    .unwrap();
    std::fs::create_dir_all(ws.join("src/deep/nested")).unwrap();
    std::fs::create_dir_all(ws.join("src/.agentbox")).unwrap();
    std::fs::write(ws.join("src/main.rs"), b"fn main() {}\n").unwrap();
    std::fs::write(ws.join("src/deep/nested/file.txt"), b"deep\n").unwrap();
    // Past ustar's 100-byte name field.
    std::fs::write(ws.join(format!("src/deep/nested/{LONG}.txt")), b"long\n").unwrap();
    std::fs::write(
        ws.join("src/.agentbox/keep.txt"),
        b"a nested .agentbox is data\n",
    )
    .unwrap();
    std::fs::create_dir_all(ws.join("bin")).unwrap();
    std::fs::write(ws.join("bin/blob.bin"), &blob).unwrap();
    std::fs::create_dir_all(ws.join("empty")).unwrap();
    std::fs::write(ws.join("exec.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(ws.join("exec.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("src/main.rs", ws.join("link")).unwrap();
    blob
}

const LONG: &str =
    "a-file-name-long-enough-that-its-path-does-not-fit-the-100-byte-ustar-name-field-\
                    and-needs-an-extension-header";

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.replace("LONG", LONG)).collect()
}

fn lines(bytes: &[u8]) -> BTreeSet<String> {
    String::from_utf8_lossy(bytes)
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.trim_end_matches('/').to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archives_read_back_by_unzip_and_tar() {
    for tool in ["unzip", "tar"] {
        assert!(
            Command::new("which")
                .arg(tool)
                .output()
                .unwrap()
                .status
                .success(),
            "this test needs `{tool}`"
        );
    }
    let r = Runner::start(&[]);
    // An exec first, so the state directory holds an invoke journal.
    let (status, body) = exec_json(&r, json!({"command": "echo state"})).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        r.workspace
            .join(".agentbox/invokes")
            .read_dir()
            .unwrap()
            .count()
            > 0
    );
    let blob = make_tree(&r.workspace);
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();

    let all = set(&[
        ".agentbox-not-state",
        ".hidden",
        "bin",
        "bin/blob.bin",
        "empty",
        "exec.sh",
        "link",
        "src",
        "src/.agentbox",
        "src/.agentbox/keep.txt",
        "src/deep",
        "src/deep/nested",
        "src/deep/nested/file.txt",
        "src/deep/nested/LONG.txt",
        "src/main.rs",
        "top.txt",
    ]);
    let want_ws = snapshot(&r.workspace, &[".agentbox"]);

    // zip of the workspace (the default format and path).
    let zip = t.join("ws.zip");
    let h = download(&r, "/v1/archive", &zip).await;
    assert_eq!(h["content-type"], "application/zip");
    let names = run(Command::new("unzip").arg("-Z1").arg(&zip));
    let raw_names = String::from_utf8_lossy(&names).into_owned();
    assert!(raw_names.lines().any(|l| l == "empty/"), "{raw_names}");
    assert_eq!(lines(&names), all, "zip entries");
    let listing = String::from_utf8(run(Command::new("unzip").arg("-l").arg(&zip))).unwrap();
    assert!(!listing.contains(" .agentbox/"), "{listing}");
    assert!(listing.contains("16 files"), "{listing}");
    let tested = run(Command::new("unzip").arg("-tq").arg(&zip));
    assert!(
        String::from_utf8_lossy(&tested).contains("No errors detected"),
        "{}",
        String::from_utf8_lossy(&tested)
    );
    assert!(
        run(Command::new("unzip")
            .arg("-p")
            .arg(&zip)
            .arg("bin/blob.bin"))
            == blob,
        "unzip -p gives other bytes"
    );
    assert_eq!(
        run(Command::new("unzip")
            .arg("-p")
            .arg(&zip)
            .arg("src/deep/nested/file.txt")),
        b"deep\n"
    );
    let out = t.join("unzipped");
    run(Command::new("unzip")
        .arg("-q")
        .arg(&zip)
        .arg("-d")
        .arg(&out));
    assert_eq!(snapshot(&out, &[]), want_ws, "unzipped tree differs");
    assert_eq!(
        std::fs::read_link(out.join("link")).unwrap(),
        Path::new("src/main.rs")
    );
    assert!(
        std::fs::metadata(out.join("exec.sh"))
            .unwrap()
            .permissions()
            .mode()
            & 0o111
            != 0,
        "the executable bit was lost"
    );

    // tar of the workspace.
    let tar = t.join("ws.tar");
    let h = download(&r, "/v1/archive?path=/workspace&format=tar", &tar).await;
    assert_eq!(h["content-type"], "application/x-tar");
    assert_eq!(
        lines(&run(Command::new("tar").arg("-tf").arg(&tar))),
        all,
        "tar entries"
    );
    let verbose = String::from_utf8(run(Command::new("tar").arg("-tvf").arg(&tar))).unwrap();
    let kinds: BTreeMap<String, char> = verbose
        .lines()
        .map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            (
                fields[5].trim_end_matches('/').to_owned(),
                l.chars().next().unwrap(),
            )
        })
        .collect();
    assert_eq!(kinds["link"], 'l', "{verbose}");
    assert_eq!(kinds["empty"], 'd', "{verbose}");
    assert_eq!(kinds["src/deep"], 'd', "{verbose}");
    assert_eq!(kinds["bin/blob.bin"], '-', "{verbose}");
    assert!(verbose.contains("-rwxr-xr-x"), "{verbose}");
    assert!(verbose.contains("link -> src/main.rs"), "{verbose}");
    assert!(
        run(Command::new("tar")
            .arg("-xOf")
            .arg(&tar)
            .arg("bin/blob.bin"))
            == blob,
        "tar -xO gives other bytes"
    );
    let out = t.join("untarred");
    std::fs::create_dir(&out).unwrap();
    run(Command::new("tar").arg("-xf").arg(&tar).arg("-C").arg(&out));
    assert_eq!(snapshot(&out, &[]), want_ws, "untarred tree differs");

    // A subdirectory: entries are relative to it, in both formats and path spellings.
    let want_src = snapshot(&r.workspace.join("src"), &[]);
    let sub = set(&[
        ".agentbox",
        ".agentbox/keep.txt",
        "deep",
        "deep/nested",
        "deep/nested/file.txt",
        "deep/nested/LONG.txt",
        "main.rs",
    ]);
    let src_tar = t.join("src.tar");
    let h = download(&r, "/v1/archive?path=src&format=tar", &src_tar).await;
    assert!(
        h["content-disposition"]
            .to_str()
            .unwrap()
            .contains("src.tar"),
        "{h:?}"
    );
    assert_eq!(
        lines(&run(Command::new("tar").arg("-tf").arg(&src_tar))),
        sub
    );
    let src_zip = t.join("src.zip");
    download(
        &r,
        "/v1/archive?path=%2Fworkspace%2Fsrc&format=zip",
        &src_zip,
    )
    .await;
    assert_eq!(
        lines(&run(Command::new("unzip").arg("-Z1").arg(&src_zip))),
        sub
    );
    let out = t.join("src-unzipped");
    run(Command::new("unzip")
        .arg("-q")
        .arg(&src_zip)
        .arg("-d")
        .arg(&out));
    assert_eq!(snapshot(&out, &[]), want_src);
    // The real absolute path works too.
    let real = t.join("real.tar");
    download(
        &r,
        &format!(
            "/v1/archive?format=tar&path={}",
            encode(&format!("{}/src", r.workspace.display()))
        ),
        &real,
    )
    .await;
    assert_eq!(lines(&run(Command::new("tar").arg("-tf").arg(&real))), sub);

    // Not a directory, missing, a bad format.
    for (query, status, code) in [
        ("path=top.txt", 400, "not_a_directory"),
        ("path=link", 400, "not_a_directory"),
        ("path=top.txt&format=tar", 400, "not_a_directory"),
        ("path=missing", 404, "file_not_found"),
        ("format=rar", 400, "invalid_request"),
    ] {
        let resp = r.get(&format!("/v1/archive?{query}")).send().await.unwrap();
        let (got, body) = error_of(resp).await;
        assert_eq!(
            (got, body["error"].as_str()),
            (status, Some(code)),
            "{query}: {body}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Hostile paths on every route
// ---------------------------------------------------------------------------------------------

const SECRET: &str = "TOP-SECRET-OUTSIDE";
const SIBLING: &str = "SIBLING-SECRET";

fn leaks(bytes: &[u8]) -> Option<&'static str> {
    [SECRET, SIBLING, "root:x:0:0", "victim-content"]
        .into_iter()
        .find(|m| find(bytes, m.as_bytes()).is_some())
}

fn assert_invalid_path(what: &str, status: u16, body: &[u8]) {
    let json: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    assert_eq!(
        (status, json["error"].as_str()),
        (400, Some("invalid_path")),
        "{what}: {}",
        String::from_utf8_lossy(&body[..body.len().min(400)])
    );
    if let Some(m) = leaks(body) {
        panic!("{what}: the answer holds outside content {m:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_paths_are_refused_on_every_route() {
    let r = Runner::start(&[]);
    // A valid configure first, so that `.agentbox/config.json` exists to be attacked.
    r.configure_sh("true").await;
    assert!(r.workspace.join(".agentbox/config.json").is_file());

    let outside_tmp = tempfile::tempdir().unwrap();
    let out = std::fs::canonicalize(outside_tmp.path()).unwrap();
    std::fs::write(out.join("secret.txt"), format!("{SECRET}\n")).unwrap();
    std::fs::create_dir(out.join("victimdir")).unwrap();
    std::fs::write(out.join("victimdir/v.txt"), b"victim-content\n").unwrap();
    // `r.dir` is the workspace's parent: what `..` would reach.
    std::fs::write(r.dir.join("x"), format!("{SIBLING}\n")).unwrap();
    std::fs::write(r.dir.join("victim"), b"victim-content\n").unwrap();
    let ws = &r.workspace;
    std::os::unix::fs::symlink(&out, ws.join("link")).unwrap();
    std::os::unix::fs::symlink(out.join("secret.txt"), ws.join("flink")).unwrap();
    std::fs::write(ws.join("file.txt"), b"inside\n").unwrap();
    std::fs::create_dir(ws.join("a")).unwrap();

    // A name that exists nowhere: write probes never aim at real system files, so that a
    // broken jail fails this test without damaging the machine.
    let probe = format!("agentbox-jail-probe-{}", std::process::id());
    let probe_spots: Vec<PathBuf> = ["/", "/etc", "/tmp"]
        .iter()
        .map(|d| Path::new(d).join(&probe))
        .chain([
            r.dir.join(&probe),
            out.join(&probe),
            out.join("victimdir").join(&probe),
        ])
        .collect();
    for p in &probe_spots {
        assert!(!p.exists(), "{} exists before the test", p.display());
    }
    let before_ws = snapshot(ws, &[".agentbox"]);
    let before_dir = snapshot(&r.dir, &["ws"]);
    let before_out = snapshot(&out, &[]);
    let before_config = std::fs::read(ws.join(".agentbox/config.json")).unwrap();

    let wsp = ws.display().to_string();
    let o = out.display().to_string();

    // Paths as JSON bodies and query values carry them (decoded).
    let decoded: Vec<String> = [
        "../x",
        "..",
        "./../x",
        "a/../../x",
        "a/../b",
        "/etc/passwd",
        "/etc",
        "/",
        "/workspacex/a",
        "/workspace/../x",
        "/workspace/a/../../x",
        "link",
        "link/secret.txt",
        "link/victimdir",
        "flink",
        ".agentbox",
        "./.agentbox",
        ".agentbox/config.json",
        ".agentbox/invokes",
        "/workspace/.agentbox/config.json",
        "a\0b",
        "\0",
        "file.txt/x",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain([
        format!("{o}/secret.txt"),
        o.clone(),
        format!("{wsp}/../x"),
        format!("{wsp}/link/secret.txt"),
        format!("{wsp}/.agentbox/config.json"),
    ])
    .collect();

    for p in &decoded {
        // Listing and archives, with the value fully encoded (`..` as `%2E%2E`) and raw.
        let mut queries = vec![encode(p)];
        if !p.contains('\0') {
            queries.push(encode_min(p));
        }
        for q in &queries {
            for target in [
                format!("/v1/files?path={q}"),
                format!("/v1/files/?path={q}"),
                format!("/v1/archive?path={q}"),
                format!("/v1/archive?format=tar&path={q}"),
            ] {
                let resp = raw(&r, "GET", &target, b"").await;
                assert_invalid_path(&format!("GET {target}"), resp.status, &resp.body);
            }
        }
        // exec's cwd: the command would write into whatever directory it got.
        let (status, body) = exec_json(
            &r,
            json!({"command": "echo PWNED > pwned.txt; cat secret.txt x", "cwd": p}),
        )
        .await;
        assert_invalid_path(
            &format!("exec cwd {p:?}"),
            status,
            body.to_string().as_bytes(),
        );
        // configure's files.
        let (status, body) = r
            .configure_json(json!({
                "files": [{"path": p, "content": "PWNED"}],
                "entrypoint": ["true"],
            }))
            .await;
        assert_invalid_path(
            &format!("configure file {p:?}"),
            status,
            body.to_string().as_bytes(),
        );
    }

    // URL paths name the sandbox path without its leading slash, so workspace-relative names
    // start with `workspace/`. These go raw: `..` and `%2e%2e` segments are sent as written.
    // Every one reaches its handler (`{*path}` matches raw `..`, `%2e%2e`, `%00` and `//`
    // alike), so no case needs a 404 allowance: all must be 400 `invalid_path`.
    let o_ns = o.trim_start_matches('/');
    let ws_ns = wsp.trim_start_matches('/');
    let reads: Vec<String> = [
        "../x",
        "..%2fx",
        "%2e%2e/x",
        "%2E%2E%2Fx",
        "workspace/../x",
        "workspace/./../x",
        "workspace/%2e%2e/x",
        "workspace/%2e%2e%2fx",
        "workspace/.%2e/x",
        "workspace/a/../../x",
        "workspace/a/%2e%2e/%2e%2e/x",
        "etc/passwd",
        "/etc/passwd",
        "etc",
        "x",
        "workspacex/a",
        "workspace/link/secret.txt",
        "workspace/link",
        "workspace/link/victimdir/v.txt",
        "workspace/flink",
        "workspace/.agentbox/config.json",
        "workspace/.agentbox",
        "workspace/%2eagentbox/config.json",
        "workspace/a%00b",
        "%00",
        "workspace/%00/x",
        "workspace/file.txt/x",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain([
        format!("{o_ns}/secret.txt"),
        format!("{ws_ns}/../x"),
        format!("{ws_ns}/%2e%2e/x"),
        format!("{ws_ns}/link/secret.txt"),
    ])
    .collect();
    for p in &reads {
        let target = format!("/v1/files/{p}");
        let resp = raw(&r, "GET", &target, b"").await;
        assert_invalid_path(&format!("GET {target}"), resp.status, &resp.body);
    }

    let writes: Vec<String> = [
        "../PROBE",
        "%2e%2e/PROBE",
        "workspace/../PROBE",
        "workspace/%2e%2e/PROBE",
        "workspace/%2e%2e%2fPROBE",
        "workspace/a/../../PROBE",
        "etc/PROBE",
        "/etc/PROBE",
        "tmp/PROBE",
        "PROBE",
        "workspacex/PROBE",
        "workspace/link/PROBE",
        "workspace/link/secret.txt",
        "workspace/link/victimdir/PROBE",
        "workspace/link/victimdir/v.txt",
        "workspace/.agentbox",
        "workspace/.agentbox/config.json",
        "workspace/.agentbox/PROBE",
        "workspace/a%00b",
        "workspace/%00",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain([
        format!("{o_ns}/PROBE"),
        format!("{o_ns}/secret.txt"),
        format!("{ws_ns}/../PROBE"),
        format!("{ws_ns}/link/PROBE"),
    ])
    .map(|s| s.replace("PROBE", &probe))
    .collect();
    for p in &writes {
        let target = format!("/v1/files/{p}");
        let resp = raw(&r, "PUT", &target, b"PWNED").await;
        assert_invalid_path(&format!("PUT {target}"), resp.status, &resp.body);
    }

    // Delete targets exist outside, so a broken jail would visibly remove them.
    let deletes: Vec<String> = [
        "../PROBE",
        "workspace/../victim",
        "workspace/%2e%2e/victim",
        "workspace/a/../../victim",
        "workspace/%2e%2e%2fvictim",
        "etc/PROBE",
        "workspace/link/victimdir",
        "workspace/link/secret.txt",
        "workspace/.agentbox",
        "workspace/.agentbox/config.json",
        "workspace/.agentbox/invokes",
        "workspace/a%00b",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain([
        format!("{o_ns}/victimdir"),
        format!("{o_ns}/secret.txt"),
        format!("{ws_ns}/../victim"),
        format!("{ws_ns}/link/victimdir"),
    ])
    .map(|s| s.replace("PROBE", &probe))
    .collect();
    for p in &deletes {
        for q in ["", "?recursive=true"] {
            let target = format!("/v1/files/{p}{q}");
            let resp = raw(&r, "DELETE", &target, b"").await;
            assert_invalid_path(&format!("DELETE {target}"), resp.status, &resp.body);
        }
    }

    // Nothing changed anywhere, nothing was created, no command ran.
    for p in &probe_spots {
        assert!(!p.exists(), "{} was created", p.display());
    }
    assert_eq!(
        snapshot(ws, &[".agentbox"]),
        before_ws,
        "the workspace changed"
    );
    assert_eq!(
        snapshot(&r.dir, &["ws"]),
        before_dir,
        "the workspace's parent changed"
    );
    assert_eq!(
        snapshot(&out, &[]),
        before_out,
        "the outside directory changed"
    );
    assert_eq!(
        std::fs::read(ws.join(".agentbox/config.json")).unwrap(),
        before_config,
        "the state directory was written"
    );
    let invokes: Value = r
        .get("/v1/invokes")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(invokes["invokes"], json!([]), "an exec ran: {invokes}");

    // An archive of the workspace stores the symlinks, never what they point to.
    let resp = raw(&r, "GET", "/v1/archive?format=tar", b"").await;
    assert_eq!(resp.status, 200);
    assert!(
        leaks(&resp.body).is_none(),
        "the archive followed a symlink out"
    );
    assert!(find(&resp.body, b"inside\n").is_some());

    // PUT over symlinks that point outside replaces the link (or fails), never the target.
    let (status, body) = put(&r, "workspace/flink", "replaced").await;
    assert_eq!(status, 201, "{body}");
    let meta = std::fs::symlink_metadata(ws.join("flink")).unwrap();
    assert!(meta.is_file(), "flink is still a symlink");
    assert_eq!(std::fs::read(ws.join("flink")).unwrap(), b"replaced");
    std::os::unix::fs::symlink(out.join("made-through-link"), ws.join("dangle")).unwrap();
    let (status, body) = put(&r, "workspace/dangle", "replaced").await;
    assert!(status == 201 || status == 400, "{status} {body}");
    let (status, body) = put(&r, "workspace/link", "replaced").await;
    assert!(status == 201 || status == 400, "{status} {body}");
    assert_eq!(
        snapshot(&out, &[]),
        before_out,
        "a write went through a symlink"
    );
    assert!(!out.join("made-through-link").exists());
}

/// `PUT`/`DELETE` of `workspace/FILE/x`, where FILE is a regular file, must be a client error.
#[tokio::test]
async fn file_used_as_a_directory_is_a_client_error() {
    let r = Runner::start(&[]);
    std::fs::write(r.workspace.join("file.txt"), b"inside\n").unwrap();
    let resp = put_req(&r, "workspace/file.txt/x")
        .body("data")
        .send()
        .await
        .unwrap();
    let (status, body) = error_of(resp).await;
    assert_eq!(status, 400, "PUT: {body}");
    let resp = delete_req(&r, "workspace/file.txt/x").send().await.unwrap();
    let (status, body) = error_of(resp).await;
    assert!(status == 400 || status == 404, "DELETE: {status} {body}");
    assert_eq!(
        std::fs::read(r.workspace.join("file.txt")).unwrap(),
        b"inside\n"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Listing and delete
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn listing_shows_entries_and_hides_the_state_dir() {
    let r = Runner::start(&[]);
    let ws = &r.workspace;
    std::fs::write(ws.join("file.txt"), b"12345").unwrap();
    std::fs::set_permissions(ws.join("file.txt"), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::fs::create_dir_all(ws.join("sub/inner")).unwrap();
    std::fs::write(ws.join("sub/inner/x"), b"x").unwrap();
    std::fs::write(ws.join(".dot"), b"").unwrap();
    std::os::unix::fs::symlink("file.txt", ws.join("lnk")).unwrap();
    assert!(ws.join(".agentbox").is_dir());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();

    for url in [
        "/v1/files",
        "/v1/files/",
        "/v1/files?path=/workspace",
        "/v1/files?path=.",
    ] {
        let resp = r.get(url).send().await.unwrap();
        let (status, body) = error_of(resp).await;
        assert_eq!(status, 200, "{url}: {body}");
        let entries = body["entries"].as_array().unwrap();
        let names: Vec<&str> = entries
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, [".dot", "file.txt", "lnk", "sub"], "{url}");
        let file = &entries[1];
        assert_eq!(file["path"], "/workspace/file.txt");
        assert_eq!(file["type"], "file");
        assert_eq!(file["isDir"], false);
        assert_eq!(file["size"], 5);
        assert_eq!(file["mode"], "-rw-r-----");
        assert_eq!(file["modeBits"], 0o640);
        let mtime = file["modifiedAt"].as_u64().unwrap();
        assert!(mtime + 60 >= now && mtime <= now + 60, "{file}");
        assert_eq!(entries[2]["type"], "symlink");
        assert_eq!(entries[2]["isDir"], false);
        assert!(entries[2]["mode"].as_str().unwrap().starts_with('l'));
        assert_eq!(entries[3]["type"], "dir");
        assert_eq!(entries[3]["isDir"], true);
        assert_eq!(entries[3]["path"], "/workspace/sub");
        assert!(entries[3]["mode"].as_str().unwrap().starts_with('d'));
    }
    let real = format!("{}/sub/inner", ws.display());
    for p in ["sub/inner", "/workspace/sub/inner", real.as_str()] {
        let (status, body) = list(&r, p).await;
        assert_eq!(status, 200, "{p}: {body}");
        assert_eq!(
            body["entries"][0]["path"], "/workspace/sub/inner/x",
            "{p}: {body}"
        );
    }
    let (status, body) = list(&r, "file.txt").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("not_a_directory"))
    );
    let (status, body) = list(&r, "missing").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("file_not_found"))
    );
}

#[tokio::test]
async fn delete_files_links_and_directories() {
    let r = Runner::start(&[]);
    let ws = &r.workspace;
    let outside_tmp = tempfile::tempdir().unwrap();
    let out = outside_tmp.path();
    std::fs::write(out.join("keep.txt"), b"outside").unwrap();

    async fn del(r: &Runner, path: &str) -> (u16, Value) {
        let resp = delete_req(r, path).send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    // A file.
    assert_eq!(put(&r, "workspace/f.txt", "data").await.0, 201);
    assert_eq!(
        del(&r, "workspace/f.txt").await,
        (204, Value::String(String::new()))
    );
    assert!(!ws.join("f.txt").exists());
    let (status, body) = del(&r, "workspace/f.txt").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("file_not_found"))
    );
    assert_eq!(read(&r, "workspace/f.txt").await.0, 404);

    // Symlinks: the link goes, the target stays (inside, outside, to a directory).
    std::fs::write(ws.join("target.txt"), b"target").unwrap();
    std::os::unix::fs::symlink("target.txt", ws.join("lnk")).unwrap();
    std::os::unix::fs::symlink(out, ws.join("olink")).unwrap();
    std::fs::create_dir_all(ws.join("keep/sub")).unwrap();
    std::fs::write(ws.join("keep/sub/k"), b"k").unwrap();
    std::os::unix::fs::symlink("keep", ws.join("dlink")).unwrap();
    assert_eq!(del(&r, "workspace/lnk").await.0, 204);
    assert_eq!(del(&r, "workspace/olink?recursive=true").await.0, 204);
    assert_eq!(del(&r, "workspace/dlink?recursive=true").await.0, 204);
    for gone in ["lnk", "olink", "dlink"] {
        assert!(std::fs::symlink_metadata(ws.join(gone)).is_err(), "{gone}");
    }
    assert_eq!(std::fs::read(ws.join("target.txt")).unwrap(), b"target");
    assert_eq!(std::fs::read(out.join("keep.txt")).unwrap(), b"outside");
    assert_eq!(std::fs::read(ws.join("keep/sub/k")).unwrap(), b"k");

    // Directories: non-empty needs ?recursive=true; empty ones go without it.
    for q in ["", "?recursive=false"] {
        let (status, body) = del(&r, &format!("workspace/keep{q}")).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (409, Some("directory_not_empty")),
            "{q}: {body}"
        );
        assert!(ws.join("keep/sub/k").is_file());
    }
    assert_eq!(del(&r, "workspace/keep?recursive=true").await.0, 204);
    assert!(!ws.join("keep").exists());
    std::fs::create_dir(ws.join("empty")).unwrap();
    assert_eq!(del(&r, "workspace/empty").await.0, 204);
    assert!(!ws.join("empty").exists());
    let (status, body) = del(&r, "workspace/nothing/here").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("file_not_found"))
    );
    let (status, body) = del(&r, "workspace/x?recursive=maybe").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );

    // The workspace itself, however it is spelled.
    let real = ws.display().to_string();
    for p in [
        "workspace",
        "workspace/",
        "workspace/.",
        "workspace?recursive=true",
        real.trim_start_matches('/'),
    ] {
        let (status, body) = del(&r, p).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_path")),
            "{p}: {body}"
        );
    }
    assert!(ws.join("target.txt").is_file(), "the workspace was emptied");
    // PUT onto a directory is refused too.
    std::fs::create_dir(ws.join("dir")).unwrap();
    let (status, body) = put(&r, "workspace/dir", "x").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("is_a_directory"))
    );
    let (status, body) = put(&r, "workspace", "x").await;
    assert_eq!(status, 400, "{body}");
    assert!(ws.join("dir").is_dir());
}

// ---------------------------------------------------------------------------------------------
// 7. exec
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_argv_command_stdin_env_cwd_and_exit_codes() {
    let r = Runner::start(&[]);
    let ws = r.workspace.display().to_string();
    std::fs::create_dir_all(r.workspace.join("sub/dir")).unwrap();
    std::fs::write(r.workspace.join("hello.txt"), b"hello file\n").unwrap();
    std::os::unix::fs::symlink("sub", r.workspace.join("sublink")).unwrap();

    // argv, JSON answer, both streams, exit code passthrough.
    let (status, body) = exec_json(
        &r,
        json!({"argv": ["sh", "-c", "echo out; echo err >&2; printf tail; exit 3"]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["stdout"], "out\ntail");
    assert_eq!(body["stderr"], "err\n");
    assert_eq!(body["exitCode"], 3);
    assert_eq!(body["reason"], "completed");
    assert!(body["invokeId"].as_str().unwrap().starts_with("inv-"));
    assert!(body["durationMs"].is_u64(), "{body}");
    for code in [0, 1, 255] {
        let (_, body) = exec_json(&r, json!({"command": format!("exit {code}")})).await;
        assert_eq!(body["exitCode"], code, "{body}");
    }

    // `/workspace/...` arguments name the real workspace.
    let (_, body) = exec_json(&r, json!({"argv": ["cat", "/workspace/hello.txt"]})).await;
    assert_eq!(body["stdout"], "hello file\n", "{body}");

    // stdin, given and not given (then closed: `cat` must not hang).
    let input = "line 1\nline 2\n\u{e9}t\u{e9} \u{2713} no newline";
    let (_, body) = exec_json(&r, json!({"argv": ["cat"], "stdin": input})).await;
    assert_eq!(body["stdout"], input);
    let (_, body) = exec_json(&r, json!({"argv": ["cat"], "timeout": 10})).await;
    assert_eq!(
        (body["stdout"].as_str(), body["reason"].as_str()),
        (Some(""), Some("completed")),
        "{body}"
    );

    // env, added to the runner's own (AGENTBOX_INVOKE_ID included).
    let (_, body) = exec_json(
        &r,
        json!({"command": "printf '%s|%s|%s' \"$FOO\" \"$EMPTY\" \"$AGENTBOX_INVOKE_ID\"",
               "env": {"FOO": "bar baz=1", "EMPTY": ""}}),
    )
    .await;
    assert_eq!(
        body["stdout"],
        format!("bar baz=1||{}", body["invokeId"].as_str().unwrap()),
        "{body}"
    );

    // cwd: default, relative, `/workspace/...`, real absolute, through a symlink inside.
    let real_sub = format!("{ws}/sub/dir");
    for (cwd, want) in [
        (None, ws.clone()),
        (Some("."), ws.clone()),
        (Some("sub/dir"), format!("{ws}/sub/dir")),
        (Some("./sub/dir/"), format!("{ws}/sub/dir")),
        (Some("/workspace/sub"), format!("{ws}/sub")),
        (Some("/workspace"), ws.clone()),
        (Some(real_sub.as_str()), format!("{ws}/sub/dir")),
        (Some("sublink/dir"), format!("{ws}/sub/dir")),
    ] {
        let mut req = json!({"command": "pwd -P"});
        if let Some(c) = cwd {
            req["cwd"] = json!(c);
        }
        let (status, body) = exec_json(&r, req).await;
        assert_eq!(status, 200, "{cwd:?}: {body}");
        assert_eq!(body["stdout"], format!("{want}\n"), "{cwd:?}");
    }

    // SSE: start, logs, exit, ids from 1.
    let events = exec_sse(
        &r,
        json!({"command": "echo one; echo two >&2; cat; exit 42", "stdin": "three"}),
    )
    .await;
    assert_ids(&events, 1, "exec stream");
    let id = invoke_id_of(&events);
    assert_eq!(rebuild(&events, "stdout"), b"one\nthree");
    assert_eq!(rebuild(&events, "stderr"), b"two\n");
    let exit = exit_event(&events);
    assert_eq!(exit["exitCode"], 42);
    assert_eq!(exit["reason"], "completed");
    assert_eq!(exit["invokeId"], id.as_str());

    // A command that cannot start: an exit, not a hang or a 500.
    let (status, body) = exec_json(&r, json!({"argv": ["/nonexistent/cmd"]})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["exitCode"], 127, "{body}");
    // Journaled like any run, so a replay has it: start, the spawn's error, exit.
    let journal = r
        .journal_of(body["invokeId"].as_str().unwrap())
        .expect("the journal of the exec");
    let journal = String::from_utf8(std::fs::read(&journal).unwrap()).unwrap();
    for want in ["event: start\n", "\"phase\":\"spawn\"", "event: exit\n"] {
        assert!(journal.contains(want), "{want} not in {journal}");
    }

    // Every run is listed, as an exec.
    let list: Value = r.get_json("/v1/invokes").await;
    let runs = list["invokes"].as_array().unwrap();
    assert!(runs.len() >= 10, "{list}");
    assert!(runs.iter().all(|i| i["kind"] == "exec"), "{list}");
    let one: Value = r
        .get(&format!("/v1/invokes/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["kind"], "exec");
    assert_eq!(one["exitCode"], 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_timeouts() {
    let r = Runner::start(&[]);
    for timeout in [json!(0.5), json!("700ms")] {
        let started = Instant::now();
        let (status, body) =
            exec_json(&r, json!({"command": "sleep 30", "timeout": timeout})).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["reason"], "timeout", "{timeout}: {body}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{timeout}: took {:?}",
            started.elapsed()
        );
        assert!(body["durationMs"].as_u64().unwrap() >= 400, "{body}");
    }
    let events = exec_sse(&r, json!({"argv": ["sleep", "30"], "timeout": 0.3})).await;
    assert_eq!(exit_event(&events)["reason"], "timeout");
    for timeout in [json!("5x"), json!(0), json!(-1), json!("")] {
        let (status, body) = exec_json(&r, json!({"command": "true", "timeout": timeout})).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_timeout")),
            "{timeout}: {body}"
        );
    }
    let (status, body) = exec_json(&r, json!({"command": "true", "timeout": true})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request")),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_cancel_and_reattach() {
    let r = Runner::start(&[]);
    let pid_file = r.dir.join("pid");

    // Cancel: the stream ends with `exit {reason: canceled}` and the process is gone.
    let mut resp = r
        .post("/v1/exec")
        .header("accept", "text/event-stream")
        .json(&json!({"command": format!(
            "echo $$ > {}; echo started; exec sleep 1000", pid_file.display())}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut buf = Vec::new();
    let events = read_until(&mut resp, &mut buf, |e| e.event == "log").await;
    let id = invoke_id_of(&events);
    let pid: i32 = common::wait_for_file(&pid_file).await.parse().unwrap();
    assert!(pid_exists(pid));
    let resp_cancel = r
        .post(&format!("/v1/invokes/{id}/cancel"))
        .send()
        .await
        .unwrap();
    let (status, body) = error_of(resp_cancel).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body, json!({"invokeId": id, "status": "canceling"}));
    let events = read_until(&mut resp, &mut buf, |e| e.event == "exit").await;
    assert_ids(&events, 1, "canceled exec");
    assert_eq!(exit_event(&events)["reason"], "canceled");
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_exists(pid) {
        assert!(
            Instant::now() < deadline,
            "the canceled process is still there"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resp = r
        .post(&format!("/v1/invokes/{id}/cancel"))
        .send()
        .await
        .unwrap();
    let (status, body) = error_of(resp).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("invoke_not_found"))
    );

    // Reattach mid-run with Last-Event-ID (`linger`: the default `cancel` would stop it).
    let mut resp = r
        .post("/v1/exec?onDisconnect=linger")
        .header("accept", "text/event-stream")
        .json(&json!({"command":
            "echo one; echo two; while [ ! -e release ]; do sleep 0.02; done; echo three"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut buf = Vec::new();
    let events = read_until(&mut resp, &mut buf, |e| {
        e.event == "log" && e.data["data"] == "two"
    })
    .await;
    let id = invoke_id_of(&events);
    let one = events
        .iter()
        .find(|e| e.event == "log" && e.data["data"] == "one")
        .unwrap()
        .id;
    drop(resp);
    let mut again = r
        .get(&format!("/v1/invokes/{id}/events"))
        .header("last-event-id", one.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    let mut buf = Vec::new();
    let first = read_until(&mut again, &mut buf, |e| e.event == "log").await;
    assert_eq!(first[0].id, one + 1, "{first:?}");
    assert_eq!(first[0].data["data"], "two");
    std::fs::write(r.workspace.join("release"), b"").unwrap();
    let events = read_until(&mut again, &mut buf, |e| e.event == "exit").await;
    assert_ids(&events, one + 1, "reattached exec");
    assert_eq!(rebuild(&events, "stdout"), b"two\nthree\n");
    assert_eq!(exit_event(&events)["reason"], "completed");
    assert_eq!(exit_event(&events)["exitCode"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_bad_bodies_are_400() {
    let r = Runner::start(&[]);
    std::fs::write(r.workspace.join("hello.txt"), b"hi").unwrap();
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"argv": ["echo"], "command": "echo"}),
            "invalid_request",
        ),
        (json!({}), "invalid_request"),
        (json!({"argv": []}), "invalid_request"),
        (json!({"argv": [""]}), "invalid_request"),
        (json!({"argv": "echo hi"}), "invalid_request"),
        (json!({"command": 5}), "invalid_request"),
        (json!({"argv": ["echo", "a\u{0}b"]}), "invalid_request"),
        (
            json!({"command": "true", "env": {"A=B": "x"}}),
            "invalid_request",
        ),
        (
            json!({"command": "true", "env": {"": "x"}}),
            "invalid_request",
        ),
        (
            json!({"command": "true", "env": {"A": 1}}),
            "invalid_request",
        ),
        (json!({"command": "true", "cwd": "../x"}), "invalid_path"),
        (
            json!({"command": "true", "cwd": "/workspace/../x"}),
            "invalid_path",
        ),
        (json!({"command": "true", "cwd": "/etc"}), "invalid_path"),
        (
            json!({"command": "true", "cwd": ".agentbox"}),
            "invalid_path",
        ),
        (json!({"command": "true", "cwd": "a\u{0}b"}), "invalid_path"),
        (
            json!({"command": "true", "cwd": "hello.txt"}),
            "not_a_directory",
        ),
    ];
    for (body, code) in &cases {
        for accept in ["application/json", "text/event-stream"] {
            let resp = r
                .post("/v1/exec")
                .header("accept", accept)
                .json(body)
                .send()
                .await
                .unwrap();
            let (status, answer) = error_of(resp).await;
            assert_eq!(
                (status, answer["error"].as_str()),
                (400, Some(*code)),
                "{body} ({accept}): {answer}"
            );
        }
    }
    for raw_body in ["not json", "", "[1,2]"] {
        let resp = r
            .post("/v1/exec")
            .header("content-type", "application/json")
            .body(raw_body)
            .send()
            .await
            .unwrap();
        let (status, answer) = error_of(resp).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (400, Some("invalid_request")),
            "{raw_body:?}: {answer}"
        );
    }
    let resp = r
        .post("/v1/exec?onDisconnect=bogus")
        .json(&json!({"command": "true"}))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(resp).await.0, 400);
    // A missing cwd is a client error too.
    let (status, body) = exec_json(&r, json!({"command": "true", "cwd": "nope"})).await;
    assert!(status == 400 || status == 404, "{status} {body}");
    assert!(!r.workspace.join("nope").exists());
    // None of these started anything.
    let list: Value = r.get_json("/v1/invokes").await;
    assert_eq!(list["invokes"], json!([]), "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_counts_toward_the_concurrency_cap() {
    let r = Runner::start(&["--max-concurrent-invokes", "1"]);
    let mut resp = r
        .post("/v1/exec")
        .header("accept", "text/event-stream")
        .json(&json!({"command": "echo up; exec sleep 1000"}))
        .send()
        .await
        .unwrap();
    let mut buf = Vec::new();
    let events = read_until(&mut resp, &mut buf, |e| e.event == "log").await;
    let id = invoke_id_of(&events);
    let (status, body) = exec_json(&r, json!({"command": "true"})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("concurrency_exceeded")),
        "{body}"
    );
    assert_eq!(body["limit"], 1);
    let resp_cancel = r
        .post(&format!("/v1/invokes/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp_cancel.status(), 202);
    read_until(&mut resp, &mut buf, |e| e.event == "exit").await;
    let (status, body) = exec_json(&r, json!({"command": "echo again"})).await;
    assert_eq!(
        (status, body["stdout"].as_str()),
        (200, Some("again\n")),
        "{body}"
    );
}

// ---------------------------------------------------------------------------------------------
// 8. Code mode
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_mode_refuses_configure_and_invoke_but_serves_files_and_exec() {
    let r = Runner::start(&["--mode", "code"]);
    let info: Value = r
        .get("/v1/info")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["mode"], "code");

    for (path, body, accept) in [
        (
            "/v1/configure",
            json!({"entrypoint": ["true"]}).to_string(),
            "application/json",
        ),
        (
            "/v1/configure",
            json!({"entrypoint": ["true"]}).to_string(),
            "text/event-stream",
        ),
        ("/v1/configure", "not json".to_owned(), "application/json"),
        ("/v1/invoke", String::new(), "text/event-stream"),
        (
            "/v1/invoke?prompt=hi",
            "input".to_owned(),
            "application/json",
        ),
    ] {
        let resp = r
            .post(path)
            .header("accept", accept)
            .body(body)
            .send()
            .await
            .unwrap();
        let (status, answer) = error_of(resp).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (400, Some("wrong_mode")),
            "{path}: {answer}"
        );
        let message = answer["message"].as_str().unwrap();
        assert!(
            message.contains("/v1/exec") && message.contains("/v1/files"),
            "{message}"
        );
    }
    assert!(!r.workspace.join(".agentbox/config.json").exists());

    // Files work.
    let (status, body) = put(&r, "workspace/code/app.py", "print('hi')\n").await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        read(&r, "workspace/code/app.py").await,
        (200, b"print('hi')\n".to_vec())
    );
    let (status, listing) = list(&r, "code").await;
    assert_eq!(status, 200);
    assert_eq!(listing["entries"][0]["name"], "app.py");
    let resp = r
        .get("/v1/archive?path=code&format=tar")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(find(&resp.bytes().await.unwrap(), b"print('hi')").is_some());

    // exec works, and sees the uploaded file.
    let (status, body) = exec_json(&r, json!({"argv": ["cat", "/workspace/code/app.py"]})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["stdout"], "print('hi')\n");
    let events = exec_sse(&r, json!({"command": "cat app.py", "cwd": "code"})).await;
    assert_eq!(rebuild(&events, "stdout"), b"print('hi')\n");
    let (status, body) = exec_json(&r, json!({"command": "echo made > code/out.txt"})).await;
    assert_eq!((status, body["exitCode"].as_i64()), (200, Some(0)));
    assert_eq!(
        read(&r, "workspace/code/out.txt").await,
        (200, b"made\n".to_vec())
    );
    let resp = delete_req(&r, "workspace/code?recursive=true")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert!(!r.workspace.join("code").exists());

    let list: Value = r.get_json("/v1/invokes").await;
    let runs = list["invokes"].as_array().unwrap();
    assert_eq!(runs.len(), 3, "{list}");
    assert!(runs.iter().all(|i| i["kind"] == "exec"), "{list}");
}

// ---------------------------------------------------------------------------------------------
// 9. The upload size cap
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_over_the_cap_are_413_and_change_nothing() {
    let r = Runner::start(&["--max-upload-bytes", "1K"]);
    let dir = r.workspace.join("up");
    let old = b"the old content".to_vec();
    assert_eq!(put(&r, "workspace/up/keep.bin", old.clone()).await.0, 201);
    let big = seeded(9, 2048);

    let check = |what: &str| {
        assert_eq!(
            std::fs::read(dir.join("keep.bin")).unwrap(),
            old,
            "{what}: the old file changed"
        );
        assert!(!dir.join("new.bin").exists(), "{what}: a new file appeared");
        let temps = upload_temps(&dir);
        assert!(temps.is_empty(), "{what}: temporaries left: {temps:?}");
    };

    for path in ["workspace/up/keep.bin", "workspace/up/new.bin"] {
        // With Content-Length: refused up front.
        let (status, body) = put(&r, path, big.clone()).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (413, Some("payload_too_large")),
            "{path}: {body}"
        );
        check(path);
        // Chunked, length unknown: refused once the stream passes the cap.
        let chunks: Vec<Result<Bytes, std::io::Error>> = big
            .chunks(256)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let resp = put_req(&r, path)
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                chunks,
            )))
            .send()
            .await
            .unwrap();
        let (status, body) = error_of(resp).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (413, Some("payload_too_large")),
            "{path} chunked: {body}"
        );
        check(&format!("{path} chunked"));
    }

    // Exactly at the cap is fine, one byte over is not.
    let (status, body) = put(&r, "workspace/up/keep.bin", big[..1024].to_vec()).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["size"], 1024);
    assert_eq!(std::fs::read(dir.join("keep.bin")).unwrap(), &big[..1024]);
    let (status, _) = put(&r, "workspace/up/keep.bin", big[..1025].to_vec()).await;
    assert_eq!(status, 413);
    assert_eq!(std::fs::read(dir.join("keep.bin")).unwrap(), &big[..1024]);
    assert!(upload_temps(&dir).is_empty());
}

/// A client that goes away mid-upload leaves neither a partial file nor a temporary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_upload_leaves_nothing_behind() {
    let r = Runner::start(&[]);
    assert_eq!(put(&r, "workspace/keep.bin", "old").await.0, 201);
    for name in ["keep.bin", "new.bin"] {
        let mut s = tokio::net::TcpStream::connect(r.addr).await.unwrap();
        let head = format!(
            "PUT /v1/files/workspace/{name} HTTP/1.1\r\nhost: {}\r\n\
             authorization: Bearer {TOKEN}\r\ncontent-length: {}\r\n\r\n",
            r.addr,
            10 << 20
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(&vec![b'z'; 1 << 20]).await.unwrap();
        // Wait until the runner is writing its temporary, then vanish.
        let deadline = Instant::now() + Duration::from_secs(10);
        while upload_temps(&r.workspace).is_empty() {
            assert!(Instant::now() < deadline, "no temporary file ever appeared");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(s);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let temps = upload_temps(&r.workspace);
            if temps.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: temporaries left after the client went away: {temps:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(std::fs::read(r.workspace.join("keep.bin")).unwrap(), b"old");
        assert!(!r.workspace.join("new.bin").exists());
    }
}

// ---------------------------------------------------------------------------------------------
// Special files in the workspace (FIFOs, sockets: made by programs in the sandbox)
// ---------------------------------------------------------------------------------------------

fn mkfifo(path: &Path) {
    assert!(Command::new("mkfifo").arg(path).status().unwrap().success());
}

/// Reading a FIFO must not hang the request (and, through the blocking thread stuck in
/// `open`, the runner's shutdown).
#[tokio::test]
async fn reading_a_fifo_is_refused_promptly() {
    let r = Runner::start(&[]);
    mkfifo(&r.workspace.join("fifo"));
    let got = tokio::time::timeout(Duration::from_secs(5), read(&r, "workspace/fifo"))
        .await
        .expect("GET of a FIFO hangs");
    assert!((400..500).contains(&got.0), "{got:?}");
}

/// An archive of a tree holding a FIFO is complete (the FIFO stored as such, or skipped as the
/// zip writer does), not cut off mid-stream.
#[tokio::test]
async fn tar_archive_of_a_tree_with_a_fifo_is_complete() {
    let r = Runner::start(&[]);
    std::fs::write(r.workspace.join("a.txt"), b"a\n").unwrap();
    mkfifo(&r.workspace.join("fifo"));
    std::fs::write(r.workspace.join("z.txt"), b"z\n").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let tar = tmp.path().join("ws.tar");
    let mut resp = r.get("/v1/archive?format=tar").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.expect("the archive stream broke off") {
        body.extend_from_slice(&chunk);
    }
    std::fs::write(&tar, &body).unwrap();
    let names = lines(&run(Command::new("tar").arg("-tf").arg(&tar)));
    assert!(
        names.contains("a.txt") && names.contains("z.txt"),
        "{names:?}"
    );
}
