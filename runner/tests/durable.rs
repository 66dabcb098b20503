//! Durable invokes, end to end against the real binary: journaled events with ids, reattach
//! (`Last-Event-ID` / `?after=`), several watchers, slow readers, the journal cap, disconnect
//! policies, restart recovery and retention.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;
use common::{
    exit_event, parse_sse, parse_sse_prefix, read_until, rebuild, wait_for_file, Event, Runner,
    TOKEN,
};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

use agentbox_testkit::Rng;

/// Kills a process this test started (through the runner) if it is still alive at the end, so
/// that a failing assertion leaves nothing behind.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if alive(self.0) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Whether `pid` is a live process (not gone, not a zombie). A process orphaned by a killed
/// runner is reparented to init, which may reap it lazily: a zombie is dead.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().next())
                .unwrap_or("");
            state != "Z" && state != "X"
        }
        Err(_) => false,
    }
}

fn ids(events: &[Event]) -> Vec<u64> {
    events.iter().map(|e| e.id).collect()
}

fn assert_ids(events: &[Event], first: u64, what: &str) {
    let want: Vec<u64> = (first..first + events.len() as u64).collect();
    assert_eq!(
        ids(events),
        want,
        "{what}: ids are not consecutive from {first}"
    );
}

/// `GET /v1/invokes/{id}` → (status, body).
async fn summary(r: &Runner, id: &str) -> (u16, Value) {
    let resp = r.get(&format!("/v1/invokes/{id}")).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

/// Polls `GET /v1/invokes/{id}` until the invoke has exited; returns its summary.
async fn wait_exited(r: &Runner, id: &str, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let (status, body) = summary(r, id).await;
        assert_eq!(status, 200, "{body}");
        if body["state"] == "exited" {
            return body;
        }
        assert_eq!(body["state"], "running", "{body}");
        assert!(
            Instant::now() < deadline,
            "invoke {id} still running after {limit:?}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every event of an invoke, replayed from the start, to its end.
async fn replay(r: &Runner, id: &str, last_event_id: Option<u64>) -> Vec<Event> {
    let mut req = r.get(&format!("/v1/invokes/{id}/events"));
    if let Some(after) = last_event_id {
        req = req.header("last-event-id", after.to_string());
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "text/event-stream",
        "events are served as SSE"
    );
    let body = tokio::time::timeout(Duration::from_secs(60), resp.bytes())
        .await
        .expect("the events stream of a finished invoke must end")
        .unwrap();
    parse_sse(&body)
}

async fn error_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap();
    (status, body)
}

fn invoke_id_of(events: &[Event]) -> String {
    let start = events.first().expect("no events");
    assert_eq!(start.event, "start", "{events:?}");
    start.data["invokeId"].as_str().unwrap().to_owned()
}

fn invokes_dir(r: &Runner) -> std::path::PathBuf {
    r.invokes_dir()
}

/// The journal of invoke `id`, which must be there.
fn journal_of(r: &Runner, id: &str) -> std::path::PathBuf {
    r.journal_of(id)
        .unwrap_or_else(|| panic!("no journal holds invoke {id}"))
}

// ---------------------------------------------------------------------------------------------
// 1. Reattach at random points
// ---------------------------------------------------------------------------------------------

/// Deterministic output exercising the framing: empty lines, JSON-hostile characters, control
/// bytes, multibyte text, invalid UTF-8, lines longer than the 64 KiB fragment limit (ASCII and
/// multibyte), and a final line without a newline.
fn mixed_output(seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    for i in 0..1500u32 {
        match i {
            300 => out.extend_from_slice(&[b'L'; 70_000]),
            700 => out.extend_from_slice(&vec![b'M'; 150_000]),
            1100 => out.extend("é".repeat(40_000).as_bytes()),
            _ => match rng.below(12) {
                0 => {}
                1 => {
                    out.extend_from_slice(b"quote \" back \\ tab \t cr \r nul \0 esc \x1b del \x7f")
                }
                2 => out.extend_from_slice("héllo wörld ✓ 日本語 🦀".as_bytes()),
                3 => {
                    out.extend_from_slice(b"bin ");
                    for _ in 0..rng.below(40) + 1 {
                        let b = (rng.next() & 0xff) as u8;
                        out.push(if b == b'\n' { 0xff } else { b });
                    }
                    out.push(0xfe);
                }
                _ => {
                    out.extend_from_slice(format!("line {i} ").as_bytes());
                    for _ in 0..rng.below(120) {
                        out.push(b'a' + rng.below(26) as u8);
                    }
                }
            },
        }
        out.push(b'\n');
    }
    out.extend_from_slice("the end, without a newline ✓".as_bytes());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reattach_100_trials() {
    let started = Instant::now();
    let r = Runner::start(&[]);
    let data = mixed_output(0x5eed);
    // The output comes in four parts (cut mid-line) with pauses in between, so that many drops
    // and reattaches happen while the process is still running, and (`?stream=live`) the
    // pauses flush pending fragments as `partial` events.
    let quarter = data.len() / 4;
    let files: Vec<Value> = (0..4)
        .map(|i| {
            let end = if i == 3 {
                data.len()
            } else {
                (i + 1) * quarter
            };
            json!({
                "path": format!("p{i}"),
                "contentBase64": base64::engine::general_purpose::STANDARD
                    .encode(&data[i * quarter..end]),
            })
        })
        .collect();
    let (status, body) = r
        .configure_json(json!({
            "files": files,
            "entrypoint": ["sh", "-c",
                "cat p0; sleep 0.03; cat p1; sleep 0.03; cat p2; sleep 0.03; cat p3"],
        }))
        .await;
    assert_eq!(status, 200, "{body}");

    // A baseline run read in full: the stream itself is exact, and its length bounds the
    // random drop points.
    let resp = r
        .post("/v1/invoke?onDisconnect=continue&stream=live")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let full = resp.bytes().await.unwrap();
    let events = parse_sse(&full);
    assert_ids(&events, 1, "baseline");
    assert_eq!(rebuild(&events, "stdout"), data, "baseline stdout");
    assert_eq!(exit_event(&events)["reason"], "completed");
    let mut known: HashSet<String> = HashSet::from([invoke_id_of(&events)]);
    let stream_len = full.len();

    let mut drops_mid_frame = 0;
    let mut drops_before_any_event = 0;
    let mut drops_after_exit = 0;
    let mut reattached_while_running = 0;
    for trial in 0..100u64 {
        let mut rng = Rng::new(trial + 1);
        // Half the drops land early (around the start event), half anywhere.
        let target = if rng.below(2) == 0 {
            rng.below(2048)
        } else {
            rng.below(stream_len + 1)
        };
        let mut resp = r
            .post("/v1/invoke?onDisconnect=continue&stream=live")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "trial {trial}");
        let mut buf = Vec::new();
        while buf.len() < target {
            match tokio::time::timeout(Duration::from_secs(30), resp.chunk())
                .await
                .expect("stalled stream")
                .unwrap()
            {
                Some(chunk) => buf.extend_from_slice(&chunk),
                None => break,
            }
        }
        // Drop the connection; bytes past `target` count as never received.
        drop(resp);
        let cut = target.min(buf.len());
        let (before, used) = parse_sse_prefix(&buf[..cut]);
        if used < cut {
            drops_mid_frame += 1;
        }
        let last_complete = before.last().map_or(0, |e| e.id);

        // The invoke id: from the start event when it arrived, else the newest invoke.
        let (status, list) = {
            let resp = r.get("/v1/invokes").send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        };
        assert_eq!(status, 200);
        let id = list["invokes"][0]["invokeId"].as_str().unwrap().to_owned();
        if list["invokes"][0]["state"] == "running" {
            reattached_while_running += 1;
        }
        assert!(
            known.insert(id.clone()),
            "trial {trial}: newest invoke {id} is not new"
        );
        if before.is_empty() {
            drops_before_any_event += 1;
        } else {
            assert_eq!(invoke_id_of(&before), id, "trial {trial}");
        }
        if before.last().is_some_and(|e| e.event == "exit") {
            drops_after_exit += 1;
        }

        // Reattach after the last complete event: mostly by header, sometimes by query.
        let req = if rng.below(4) == 0 {
            r.get(&format!("/v1/invokes/{id}/events?after={last_complete}"))
        } else {
            r.get(&format!("/v1/invokes/{id}/events"))
                .header("last-event-id", last_complete.to_string())
        };
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200, "trial {trial}");
        let rest = tokio::time::timeout(Duration::from_secs(30), resp.bytes())
            .await
            .expect("reattached stream never ended")
            .unwrap();
        let after = parse_sse(&rest);

        assert_ids(&before, 1, &format!("trial {trial} before the drop"));
        assert_ids(
            &after,
            last_complete + 1,
            &format!("trial {trial} after reattaching at {last_complete}"),
        );
        let all: Vec<Event> = before.iter().chain(after.iter()).cloned().collect();
        assert_eq!(all[0].event, "start", "trial {trial}");
        let exit = exit_event(&all);
        assert_eq!(exit["reason"], "completed", "trial {trial}: {exit}");
        assert_eq!(exit["exitCode"], 0, "trial {trial}: {exit}");
        assert_eq!(
            all.iter().filter(|e| e.event == "exit").count(),
            1,
            "trial {trial}"
        );
        let stdout = rebuild(&all, "stdout");
        assert!(
            stdout == data,
            "trial {trial} (drop at byte {target}, reattach after {last_complete}): stdout \
             differs ({} bytes rebuilt, {} expected)",
            stdout.len(),
            data.len()
        );
        assert!(rebuild(&all, "stderr").is_empty(), "trial {trial}");

        let (status, s) = summary(&r, &id).await;
        assert_eq!(status, 200);
        assert_eq!(s["state"], "exited", "trial {trial}: {s}");
        assert_eq!(
            s["lastEventId"],
            all.last().unwrap().id,
            "trial {trial}: {s}"
        );
    }
    // The random points did cover the interesting cases.
    assert!(
        drops_mid_frame > 10,
        "only {drops_mid_frame} drops mid-frame"
    );
    assert!(drops_before_any_event > 0, "no drop before the first event");
    assert!(
        reattached_while_running > 10,
        "only {reattached_while_running} reattaches to a running invoke"
    );
    eprintln!(
        "reattach_100_trials: {drops_mid_frame} mid-frame, {drops_before_any_event} before any \
         event, {drops_after_exit} after exit, {reattached_while_running} reattached while \
         running; {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Several watchers
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_watchers_see_the_same_events() {
    let r = Runner::start(&[]);
    let release = r.dir.join("release");
    r.configure_sh(&format!(
        "while [ ! -e {} ]; do sleep 0.01; done; seq 1 20000; echo oops >&2",
        release.display()
    ))
    .await;
    let mut invoke = r
        .post("/v1/invoke?onDisconnect=continue")
        .send()
        .await
        .unwrap();
    assert_eq!(invoke.status(), 200);
    let mut invoke_buf = Vec::new();
    let events = read_until(&mut invoke, &mut invoke_buf, |e| e.event == "start").await;
    let id = invoke_id_of(&events);

    // While it waits: listed as running, no exit fields yet.
    let list: Value = r.get_json("/v1/invokes").await;
    let entry = &list["invokes"][0];
    assert_eq!(entry["invokeId"], id.as_str(), "{list}");
    assert_eq!(entry["state"], "running", "{list}");
    assert_eq!(entry["lastEventId"], 1, "{list}");
    assert!(entry["startedAt"].as_u64().unwrap() > 0, "{list}");
    for field in ["exitCode", "reason", "durationMs"] {
        assert!(
            entry.get(field).is_none(),
            "{field} on a running invoke: {list}"
        );
    }

    // Three watchers attach and see `start`; then the output is released, live.
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(3);
    let mut watchers = Vec::new();
    for _ in 0..3 {
        let client = r.client.clone();
        let url = r.url(&format!("/v1/invokes/{id}/events"));
        let ready = ready_tx.clone();
        watchers.push(tokio::spawn(async move {
            let mut resp = client.get(url).bearer_auth(TOKEN).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            let mut buf = Vec::new();
            read_until(&mut resp, &mut buf, |e| e.event == "start").await;
            ready.send(()).await.unwrap();
            while let Some(chunk) = tokio::time::timeout(Duration::from_secs(30), resp.chunk())
                .await
                .expect("stalled watcher")
                .unwrap()
            {
                buf.extend_from_slice(&chunk);
            }
            buf
        }));
    }
    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(20), ready_rx.recv())
            .await
            .expect("a watcher never saw start")
            .unwrap();
    }
    let (status, s) = summary(&r, &id).await;
    assert_eq!(status, 200);
    assert_eq!(
        s["state"], "running",
        "output must not have started yet: {s}"
    );
    std::fs::write(&release, b"go").unwrap();

    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(30), invoke.chunk())
        .await
        .expect("stalled invoke stream")
        .unwrap()
    {
        invoke_buf.extend_from_slice(&chunk);
    }
    let mut bodies = Vec::new();
    for w in watchers {
        bodies.push(w.await.unwrap());
    }
    for (i, body) in bodies.iter().enumerate() {
        assert!(
            *body == invoke_buf,
            "watcher {i} got {} bytes, the invoking client {}",
            body.len(),
            invoke_buf.len()
        );
    }
    let events = parse_sse(&invoke_buf);
    assert_ids(&events, 1, "watched stream");
    let want: String = (1..=20000).map(|n| format!("{n}\n")).collect();
    assert_eq!(rebuild(&events, "stdout"), want.as_bytes());
    assert_eq!(rebuild(&events, "stderr"), b"oops\n");
    assert_eq!(exit_event(&events)["reason"], "completed");
    // A late reader replays the very same bytes.
    let resp = r
        .get(&format!("/v1/invokes/{id}/events"))
        .send()
        .await
        .unwrap();
    assert!(
        resp.bytes().await.unwrap() == invoke_buf,
        "late replay differs"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Slow readers and the journal cap
// ---------------------------------------------------------------------------------------------

/// 100 MB of 'a' folded at 100 columns: 1,000,000 lines, the last without a newline.
const BIG_SCRIPT: &str = "head -c 100000000 /dev/zero | tr '\\0' a | fold -w 100";
const BIG_LINES: usize = 1_000_000;
const BIG_TOTAL: usize = BIG_LINES * 100 + BIG_LINES - 1;

fn big_expected() -> Vec<u8> {
    let mut v = Vec::with_capacity(BIG_TOTAL);
    let line = [b'a'; 100];
    for i in 0..BIG_LINES {
        v.extend_from_slice(&line);
        if i + 1 < BIG_LINES {
            v.push(b'\n');
        }
    }
    assert_eq!(v.len(), BIG_TOTAL);
    v
}

/// Decodes `Transfer-Encoding: chunked` incrementally.
#[derive(Default)]
struct Dechunker {
    buf: Vec<u8>,
    remaining: usize,
    state: ChunkState,
}

#[derive(Default, PartialEq, Eq, Debug)]
enum ChunkState {
    #[default]
    Size,
    Data,
    Crlf,
    Done,
}

impl Dechunker {
    fn feed(&mut self, data: &[u8], out: &mut StreamCheck<'_>) {
        self.buf.extend_from_slice(data);
        let mut pos = 0;
        loop {
            match self.state {
                ChunkState::Size => {
                    let Some(i) = memchr::memmem::find(&self.buf[pos..], b"\r\n") else {
                        break;
                    };
                    let line = std::str::from_utf8(&self.buf[pos..pos + i]).unwrap();
                    let hex = line.split(';').next().unwrap().trim();
                    let n = usize::from_str_radix(hex, 16)
                        .unwrap_or_else(|_| panic!("bad chunk size line {line:?}"));
                    pos += i + 2;
                    if n == 0 {
                        self.state = ChunkState::Done;
                    } else {
                        self.remaining = n;
                        self.state = ChunkState::Data;
                    }
                }
                ChunkState::Data => {
                    let take = self.remaining.min(self.buf.len() - pos);
                    if take == 0 {
                        break;
                    }
                    out.feed(&self.buf[pos..pos + take]);
                    pos += take;
                    self.remaining -= take;
                    if self.remaining == 0 {
                        self.state = ChunkState::Crlf;
                    }
                }
                ChunkState::Crlf => {
                    if self.buf.len() - pos < 2 {
                        break;
                    }
                    assert_eq!(&self.buf[pos..pos + 2], b"\r\n", "bad chunk end");
                    pos += 2;
                    self.state = ChunkState::Size;
                }
                ChunkState::Done => break,
            }
        }
        self.buf.drain(..pos);
    }
}

/// Checks an SSE stream incrementally against the expected stdout, without keeping it: ids
/// consecutive from 1, stdout a prefix of (or all of) `expected`, non-log events kept.
struct StreamCheck<'a> {
    pending: Vec<u8>,
    expected: &'a [u8],
    stdout_len: usize,
    next_id: u64,
    other: Vec<Event>,
    last_event: String,
}

impl<'a> StreamCheck<'a> {
    fn new(expected: &'a [u8]) -> Self {
        Self {
            pending: Vec::new(),
            expected,
            stdout_len: 0,
            next_id: 1,
            other: Vec::new(),
            last_event: String::new(),
        }
    }

    fn feed(&mut self, data: &[u8]) {
        self.pending.extend_from_slice(data);
        let pending = std::mem::take(&mut self.pending);
        let mut pos = 0;
        while let Some(end) = memchr::memmem::find(&pending[pos..], b"\n\n") {
            self.frame(&pending[pos..pos + end]);
            pos += end + 2;
        }
        self.pending = pending[pos..].to_vec();
    }

    fn frame(&mut self, raw: &[u8]) {
        let text = std::str::from_utf8(raw).unwrap();
        if text.starts_with(':') {
            return;
        }
        let (mut id, mut name, mut data) = (None, "", "");
        for line in text.split('\n') {
            if let Some(v) = line.strip_prefix("id: ") {
                id = Some(v.parse::<u64>().unwrap());
            } else if let Some(v) = line.strip_prefix("event: ") {
                name = v;
            } else if let Some(v) = line.strip_prefix("data: ") {
                data = v;
            }
        }
        assert_eq!(id, Some(self.next_id), "ids must be consecutive: {text:?}");
        self.next_id += 1;
        assert_ne!(self.last_event, "exit", "an event after exit: {text:?}");
        self.last_event = name.to_owned();
        if name != "log" {
            self.other.push(Event {
                id: id.unwrap(),
                event: name.to_owned(),
                data: serde_json::from_str(data).unwrap(),
            });
            return;
        }
        // Fast path for the common shape; anything else goes through JSON.
        const PRE: &str = r#"{"stream":"stdout","data":""#;
        let fast = data.strip_prefix(PRE).and_then(|rest| {
            if let Some(body) = rest.strip_suffix(r#""}"#) {
                Some((body, false))
            } else {
                rest.strip_suffix(r#"","partial":true}"#).map(|b| (b, true))
            }
        });
        let bytes = match fast {
            Some((body, partial)) if !body.contains('\\') && !body.contains('"') => {
                let mut b = body.as_bytes().to_vec();
                if !partial {
                    b.push(b'\n');
                }
                b
            }
            _ => {
                let ev = Event {
                    id: id.unwrap(),
                    event: "log".into(),
                    data: serde_json::from_str(data).unwrap(),
                };
                assert_eq!(ev.data["stream"], "stdout", "{text:?}");
                rebuild(&[ev], "stdout")
            }
        };
        let at = self.stdout_len;
        assert!(
            at + bytes.len() <= self.expected.len(),
            "stdout longer than the output at byte {at}"
        );
        assert!(
            self.expected[at..at + bytes.len()] == bytes[..],
            "stdout differs from the output within bytes {at}..{}",
            at + bytes.len()
        );
        self.stdout_len += bytes.len();
    }
}

/// Sends `POST /v1/invoke?onDisconnect=continue` on a raw socket with a small receive buffer.
async fn raw_invoke(r: &Runner) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 << 10).unwrap();
    let mut stream = socket.connect(r.addr).await.unwrap();
    let request = format!(
        "POST /v1/invoke?onDisconnect=continue HTTP/1.1\r\nHost: {}\r\n\
         Authorization: Bearer {TOKEN}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        r.addr
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

/// Runs BIG_SCRIPT with a client reading ~1 KB/s until the invoke has exited, then reads the
/// rest at full speed and checks every byte.
async fn slow_reader_case(cap: u64) {
    let r = Runner::start(&["--journal-max-bytes", &cap.to_string()]);
    r.configure_sh(BIG_SCRIPT).await;
    let expected = big_expected();
    let mut stream = raw_invoke(&r).await;

    // Slow phase: 256 bytes every 250 ms, polling the invoke's state meanwhile.
    let began = Instant::now();
    let mut raw: Vec<u8> = Vec::new();
    let mut slow_read = 0usize;
    let mut id: Option<String> = None;
    let exited = loop {
        assert!(
            began.elapsed() < Duration::from_secs(120),
            "the invoke did not finish while the client was slow (read {slow_read} bytes)"
        );
        let mut small = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut small))
            .await
            .expect("nothing to read")
            .unwrap();
        assert!(n > 0, "the server closed the slow stream early");
        raw.extend_from_slice(&small[..n]);
        slow_read += n;
        if id.is_none() {
            const KEY: &[u8] = b"\"invokeId\":\"";
            if let Some(at) = memchr::memmem::find(&raw, KEY) {
                let rest = &raw[at + KEY.len()..];
                if let Some(end) = rest.iter().position(|b| *b == b'"') {
                    id = Some(String::from_utf8(rest[..end].to_vec()).unwrap());
                }
            }
        }
        if let Some(id) = &id {
            let (status, s) = summary(&r, id).await;
            assert_eq!(status, 200, "{s}");
            if s["state"] == "exited" {
                break s;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let slow_for = began.elapsed();
    let id = id.unwrap();
    assert_eq!(exited["reason"], "completed", "{exited}");
    assert_eq!(exited["exitCode"], 0, "{exited}");
    assert!(
        slow_read < 64 << 10,
        "the process only finished after the client read {slow_read} bytes"
    );

    // Full speed: the rest of the same response.
    let head_end = memchr::memmem::find(&raw, b"\r\n\r\n").expect("no response head yet") + 4;
    let head = String::from_utf8(raw[..head_end].to_vec()).unwrap();
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    let mut dechunker = Dechunker::default();
    let mut check = StreamCheck::new(&expected);
    dechunker.feed(&raw[head_end..], &mut check);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf))
            .await
            .expect("stalled")
            .unwrap();
        if n == 0 {
            break;
        }
        dechunker.feed(&buf[..n], &mut check);
    }
    assert_eq!(
        dechunker.state,
        ChunkState::Done,
        "the response ended early"
    );
    assert!(check.pending.is_empty(), "torn frame at the end");
    assert_eq!(check.last_event, "exit");
    let last_id = check.next_id - 1;
    let s = summary(&r, &id).await.1;
    assert_eq!(s["lastEventId"], last_id, "{s}");

    let names: Vec<&str> = check.other.iter().map(|e| e.event.as_str()).collect();
    let exit = &check.other.last().unwrap().data;
    assert_eq!(exit["reason"], "completed", "{exit}");
    assert_eq!(exit["exitCode"], 0, "{exit}");
    let stored = check.stdout_len;
    if cap as usize >= BIG_TOTAL {
        assert_eq!(names, ["start", "exit"]);
        assert_eq!(stored, BIG_TOTAL, "rebuilt stdout size");
    } else {
        assert_eq!(names, ["start", "truncated", "exit"]);
        let truncated = &check.other[1];
        assert_eq!(
            truncated.id,
            last_id - 1,
            "truncated comes right before exit"
        );
        assert_eq!(
            truncated.data["droppedBytes"],
            (BIG_TOTAL - stored) as u64,
            "droppedBytes = total - stored ({stored} stored)"
        );
        // The cap counts journal bytes (frames), so the output stored is less than the cap,
        // and the journal on disk is the cap plus the last few frames (`truncated`, `exit`).
        assert!(
            (stored as u64) < cap && stored as u64 * 2 > cap,
            "stored {stored} bytes of output with a cap of {cap}"
        );
        let on_disk = std::fs::metadata(r.journal_of(&id).unwrap()).unwrap().len();
        assert!(
            on_disk <= cap + 1024,
            "{on_disk} journal bytes with a cap of {cap}"
        );
        // Replaying the journal gives the same truncated stream.
        let events = replay(&r, &id, None).await;
        assert_eq!(events.len() as u64, last_id);
        assert_eq!(rebuild(&events, "stdout").len(), stored);
        assert_eq!(events[events.len() - 2].event, "truncated");
        assert_eq!(events[events.len() - 2].data, truncated.data);
    }
    eprintln!(
        "slow reader (cap {cap}): exited after {slow_for:?} with {slow_read} bytes read slowly; \
         {stored} bytes stored, {last_id} events; total {:?}",
        began.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_does_not_slow_the_process() {
    slow_reader_case(200 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_with_journal_cap_sees_truncated_before_exit() {
    slow_reader_case(1 << 20).await;
}

// ---------------------------------------------------------------------------------------------
// 4. Disconnect policies
// ---------------------------------------------------------------------------------------------

/// `cancel` (the default, as the seed's): the invoke is canceled as soon as its only client
/// goes away. The runner lingers 60 s, so a cancel that waited like `linger` would miss the
/// deadline. The first invoke asks for no policy, the second asks for `cancel`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_policy_cancel_is_the_default() {
    let r = Runner::start(&["--linger", "60s"]);
    let pid_file = r.dir.join("pid");
    r.configure_sh(&format!(
        "echo $$ > {}; exec sleep 1000",
        pid_file.display()
    ))
    .await;
    let mut resp = r.post("/v1/invoke").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut buf = Vec::new();
    let events = read_until(&mut resp, &mut buf, |e| e.event == "start").await;
    let id = invoke_id_of(&events);
    let pid: i32 = wait_for_file(&pid_file).await.parse().unwrap();
    let _guard = KillOnDrop(pid);
    assert!(alive(pid));
    assert_eq!(summary(&r, &id).await.1["state"], "running");

    drop(resp);
    let s = wait_exited(&r, &id, Duration::from_secs(10)).await;
    assert_eq!(s["reason"], "canceled", "{s}");
    assert_eq!(s["exitCode"], 128 + 15, "SIGTERM ends sleep: {s}");
    assert!(
        !common::pid_exists(pid),
        "the process outlived its canceled invoke"
    );
    let events = replay(&r, &id, None).await;
    assert_ids(&events, 1, "canceled invoke");
    assert_eq!(events[0].event, "start");
    assert_eq!(exit_event(&events)["reason"], "canceled");

    // With a second client watching, the invoke goes on until that one leaves too.
    std::fs::remove_file(&pid_file).unwrap();
    let mut resp = r
        .post("/v1/invoke?onDisconnect=cancel")
        .send()
        .await
        .unwrap();
    let mut buf = Vec::new();
    let events = read_until(&mut resp, &mut buf, |e| e.event == "start").await;
    let id = invoke_id_of(&events);
    let pid: i32 = wait_for_file(&pid_file).await.parse().unwrap();
    let _guard = KillOnDrop(pid);
    let mut watch = r
        .get(&format!("/v1/invokes/{id}/events"))
        .send()
        .await
        .unwrap();
    let mut wbuf = Vec::new();
    read_until(&mut watch, &mut wbuf, |e| e.event == "start").await;
    drop(resp);
    // It must *not* stop while the watcher stays: give a wrong cancel time to happen.
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        let s = summary(&r, &id).await.1;
        assert_eq!(
            s["state"], "running",
            "canceled while a client was attached: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(watch);
    let s = wait_exited(&r, &id, Duration::from_secs(10)).await;
    assert_eq!(s["reason"], "canceled", "{s}");
    assert!(
        !common::pid_exists(pid),
        "the process outlived its canceled invoke"
    );
}

/// `continue`: the invoke runs to completion with nobody watching, even past the linger period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_policy_continue() {
    let r = Runner::start(&["--linger", "1s"]);
    let release = r.dir.join("release");
    r.configure_sh(&format!(
        "while [ ! -e {} ]; do sleep 0.02; done; echo done",
        release.display()
    ))
    .await;
    let mut resp = r
        .post("/v1/invoke?onDisconnect=continue")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut buf = Vec::new();
    let events = read_until(&mut resp, &mut buf, |e| e.event == "start").await;
    let id = invoke_id_of(&events);
    drop(resp);

    // Nothing to await here: it must *not* stop. Watch it for twice the linger period.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        let (status, s) = summary(&r, &id).await;
        assert_eq!(status, 200);
        assert_eq!(
            s["state"], "running",
            "a detached `continue` invoke stopped: {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::fs::write(&release, b"go").unwrap();
    let s = wait_exited(&r, &id, Duration::from_secs(20)).await;
    assert_eq!(s["reason"], "completed", "{s}");
    assert_eq!(s["exitCode"], 0, "{s}");
    let events = replay(&r, &id, None).await;
    assert_ids(&events, 1, "continued invoke");
    assert_eq!(rebuild(&events, "stdout"), b"done\n");
    assert_eq!(exit_event(&events)["reason"], "completed");
}

/// `linger`: a reattached client keeps the invoke alive past the linger period; after the
/// last client leaves it is canceled once the linger period has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_policy_linger() {
    let r = Runner::start(&["--linger", "1s"]);
    let pid_file = r.dir.join("pid");
    r.configure_sh(&format!(
        "echo hello; echo $$ > {}; exec sleep 1000",
        pid_file.display()
    ))
    .await;
    let mut resp = r
        .post("/v1/invoke?onDisconnect=linger")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut buf = Vec::new();
    let events = read_until(&mut resp, &mut buf, |e| e.event == "log").await;
    let id = invoke_id_of(&events);
    let pid: i32 = wait_for_file(&pid_file).await.parse().unwrap();
    let _guard = KillOnDrop(pid);

    drop(resp);
    let detached = Instant::now();
    let mut watch = r
        .get(&format!("/v1/invokes/{id}/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(watch.status(), 200);
    let mut wbuf = Vec::new();
    let replayed = read_until(&mut watch, &mut wbuf, |e| e.event == "log").await;
    assert!(
        detached.elapsed() < Duration::from_millis(800),
        "reattaching took {:?}; the test needs it within the 1s linger period",
        detached.elapsed()
    );
    assert_eq!(rebuild(&replayed, "stdout"), b"hello\n");

    // Hold the reattached stream for twice the linger period.
    let held = Instant::now();
    while held.elapsed() < Duration::from_secs(2) {
        let (status, s) = summary(&r, &id).await;
        assert_eq!(status, 200);
        assert_eq!(
            s["state"], "running",
            "canceled while a client was attached: {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(summary(&r, &id).await.1["state"], "running");
    assert!(alive(pid));

    // Leave, come back 200 ms later, leave again 600 ms after that: the timer of the first
    // departure (due ~200 ms after the second) must not cancel; the second one's does, a full
    // linger period after it. Nothing marks the server noticing a departure, so the first
    // absence lasts 200 ms to make sure it is seen as one (a closed connection is noticed at
    // once).
    drop(watch);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut watch = r
        .get(&format!("/v1/invokes/{id}/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(watch.status(), 200);
    let mut wbuf = Vec::new();
    read_until(&mut watch, &mut wbuf, |e| e.event == "log").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(summary(&r, &id).await.1["state"], "running");
    drop(watch);
    let detached = Instant::now();
    let s = wait_exited(&r, &id, Duration::from_secs(15)).await;
    let waited = detached.elapsed();
    assert_eq!(s["reason"], "canceled", "{s}");
    assert!(
        waited >= Duration::from_millis(950),
        "canceled {waited:?} after the last client left; the linger period is 1s"
    );
    assert!(
        s["durationMs"].as_u64().unwrap() >= 3700,
        "ran {}ms: held 2s + 0.2s + 0.6s + linger 1s",
        s["durationMs"]
    );
    assert!(
        !common::pid_exists(pid),
        "the process outlived its canceled invoke"
    );
    let events = replay(&r, &id, None).await;
    assert_ids(&events, 1, "lingered invoke");
    assert_eq!(exit_event(&events)["reason"], "canceled");
}

// ---------------------------------------------------------------------------------------------
// 5. Runner restart
// ---------------------------------------------------------------------------------------------

/// Starts `script` (as configured on `r`) with `onDisconnect=continue`, waits for its first log
/// line and for the pid it writes to `pid_file`; returns (invoke id, pid, open response).
async fn start_sleeper(r: &Runner, pid_file: &Path) -> (String, i32, reqwest::Response) {
    let mut resp = r
        .post("/v1/invoke?onDisconnect=continue")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut buf = Vec::new();
    let events = read_until(&mut resp, &mut buf, |e| e.event == "log").await;
    let id = invoke_id_of(&events);
    let pid: i32 = wait_for_file(pid_file).await.parse().unwrap();
    (id, pid, resp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_restart_marks_runner_restarted() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pid_file = dir.join("pid");
    let fast = dir.join("fast");
    let entrypoint = json!([
        "sh",
        "-c",
        format!(
            "if [ -e {} ]; then echo fast; exit 0; fi; echo hello; echo $$ > {}; exec sleep 1000",
            fast.display(),
            pid_file.display()
        )
    ]);
    let mut r1 = Runner::start_in(dir, &[]);
    let (status, cfg) = r1
        .configure_json(json!({
            "files": [{"path": "app.txt", "content": "v1"}],
            "installCommand": ["sh", "-c", "echo installing"],
            "entrypoint": entrypoint,
        }))
        .await;
    assert_eq!(status, 200, "{cfg}");
    let hash = cfg["installCommandHash"].as_str().unwrap().to_owned();

    let (id, pid, resp) = start_sleeper(&r1, &pid_file).await;
    let _guard = KillOnDrop(pid);
    r1.kill9();
    drop(resp);
    assert!(
        alive(pid),
        "kill -9 of the runner alone does not end the child"
    );

    let r2 = Runner::start_in(dir, &[]);
    assert!(
        !alive(pid),
        "the orphan of the killed runner survived the restart"
    );

    let (status, s) = summary(&r2, &id).await;
    assert_eq!(status, 200, "{s}");
    assert_eq!(s["state"], "exited", "{s}");
    assert_eq!(s["reason"], "runner_restarted", "{s}");
    assert_eq!(s["exitCode"], -1, "{s}");
    assert_eq!(s["lastEventId"], 3, "{s}");

    let events = replay(&r2, &id, None).await;
    assert_ids(&events, 1, "restarted invoke");
    let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names, ["start", "log", "exit"]);
    assert_eq!(rebuild(&events, "stdout"), b"hello\n");
    let exit = exit_event(&events);
    assert_eq!(exit["reason"], "runner_restarted", "{exit}");
    assert_eq!(exit["exitCode"], -1, "{exit}");
    assert_eq!(exit["invokeId"], id.as_str(), "{exit}");
    // Reattaching into the recovered journal works too.
    let tail = replay(&r2, &id, Some(2)).await;
    assert_eq!(ids(&tail), [3]);
    assert_eq!(tail[0].event, "exit");

    // The configuration survived.
    let info: Value = r2
        .get("/v1/info")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["configured"], true, "{info}");
    assert_eq!(info["installCommandHash"], hash.as_str(), "{info}");
    assert_eq!(info["entrypoint"], entrypoint, "{info}");
    assert_eq!(info["inflight"], 0, "{info}");

    // And a new invoke works.
    std::fs::write(&fast, b"").unwrap();
    let events = r2.invoke_sse("", "").await;
    assert_ids(&events, 1, "invoke after restart");
    assert_eq!(rebuild(&events, "stdout"), b"fast\n");
    let exit = exit_event(&events);
    assert_eq!(exit["reason"], "completed", "{exit}");
    assert_eq!(exit["exitCode"], 0, "{exit}");
    let new_id = invoke_id_of(&events);
    assert_eq!(listed(&r2).await, [new_id, id], "newest first");
}

/// Restarts a runner in `dir` after a `kill -9` that left invoke `id` running with one `log`
/// event journaled: its process `pid` is gone and the invoke reads `start`, `log`, `exit`
/// (`runner_restarted`, id 3). Returns the runner and the events.
async fn restart_recovering_one_line(
    dir: &Path,
    id: &str,
    pid: i32,
    what: &str,
) -> (Runner, Vec<Event>) {
    let r2 = Runner::start_in(dir, &[]);
    assert!(!alive(pid));
    let events = replay(&r2, id, None).await;
    assert_ids(&events, 1, what);
    let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names, ["start", "log", "exit"]);
    assert_eq!(exit_event(&events)["reason"], "runner_restarted");
    assert_eq!(summary(&r2, id).await.1["lastEventId"], 3);
    (r2, events)
}

/// A runner killed while an invoke writes into a recycled journal (the file of a pruned
/// invoke, overwritten in place): after the restart the invoke has exactly its own events,
/// none of the old bytes still in the file behind them (the old journal is bigger than the
/// stretch zeroed ahead of the writes, so old frames follow the zeros).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_restart_reads_a_recycled_journal_only_as_far_as_it_was_written() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pid_file = dir.join("pid");
    let bulk = dir.join("bulk");
    let mut r1 = Runner::start_in(dir, &["--retain-invokes", "1"]);
    r1.configure_sh(&format!(
        "if [ -e {} ]; then seq 1 40000 | sed 's/^/old line /'; exit 0; fi; \
         echo hello; echo $$ > {}; exec sleep 1000",
        bulk.display(),
        pid_file.display()
    ))
    .await;
    std::fs::write(&bulk, b"").unwrap();
    for _ in 0..2 {
        let events = r1.invoke_sse("", "").await;
        assert_eq!(exit_event(&events)["exitCode"], 0);
    }
    std::fs::remove_file(&bulk).unwrap();
    let (id, pid, resp) = start_sleeper(&r1, &pid_file).await;
    let _guard = KillOnDrop(pid);
    let journal = journal_of(&r1, &id);
    let on_disk = std::fs::read(&journal).unwrap();
    let written = memchr::memchr(0, &on_disk).expect("a NUL after the events");
    assert!(
        on_disk.len() > 2_000_000 && written < 1_000,
        "not a recycled journal: {} bytes on disk, {written} written",
        on_disk.len()
    );
    r1.kill9();
    drop(resp);

    let (_r2, events) = restart_recovering_one_line(dir, &id, pid, "recycled journal").await;
    assert_eq!(rebuild(&events, "stdout"), b"hello\n");
    let repaired = std::fs::read(&journal).unwrap();
    assert!(!repaired.contains(&0), "old bytes left in the journal");
}

/// A runner killed in the middle of a journal write leaves a torn frame; recovery cuts it and
/// numbers the `exit` right after the last complete event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_restart_repairs_a_torn_journal_tail() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pid_file = dir.join("pid");
    let mut r1 = Runner::start_in(dir, &[]);
    r1.configure_sh(&format!(
        "echo hello; echo $$ > {}; exec sleep 1000",
        pid_file.display()
    ))
    .await;
    let (id, pid, resp) = start_sleeper(&r1, &pid_file).await;
    let _guard = KillOnDrop(pid);
    let journal = journal_of(&r1, &id);
    r1.kill9();
    drop(resp);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&journal)
        .unwrap();
    std::io::Write::write_all(&mut f, b"id: 3\nevent: log\ndata: {\"stream\":\"std").unwrap();
    drop(f);

    restart_recovering_one_line(dir, &id, pid, "repaired journal").await;
}

/// The runner records a running invoke's pid and start time right after the spawn, so after a
/// restart the tree is found by its root as well as by its environment marker: a root process
/// that replaced its environment (and so lost the marker) is killed too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_restart_kills_an_orphan_that_cleared_its_environment() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pid_file = dir.join("pid");
    let mut r1 = Runner::start_in(dir, &[]);
    r1.configure_sh(&format!(
        "echo hello; echo $$ > {}; s=$(command -v sleep); exec env -i \"$s\" 1000",
        pid_file.display()
    ))
    .await;
    let (id, pid, resp) = start_sleeper(&r1, &pid_file).await;
    let _guard = KillOnDrop(pid);
    r1.kill9();
    drop(resp);
    assert!(alive(pid));

    let r2 = Runner::start_in(dir, &[]);
    let s = summary(&r2, &id).await.1;
    assert_eq!(s["reason"], "runner_restarted", "{s}");
    assert!(
        !alive(pid),
        "pid {pid}, the root of invoke {id}, survived the restart"
    );
}

/// A runner killed after journaling `exit` but before appending the final summary line must
/// not append a second `exit`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_restart_keeps_an_exit_already_journaled() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut r1 = Runner::start_in(dir, &[]);
    r1.configure_sh("echo ok").await;
    let events = r1.invoke_sse("", "").await;
    let id = invoke_id_of(&events);
    let meta_path = journal_of(&r1, &id).with_extension("json");
    // The summary (<name>.json) gets its last line (JSON lines, the last one counts) right
    // after the stream ends.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut meta: Value = loop {
        let text = std::fs::read_to_string(&meta_path).unwrap();
        let last = text.lines().last().unwrap_or("null");
        let meta: Value = serde_json::from_str(last).unwrap();
        if meta["state"] == "exited" {
            break meta;
        }
        assert!(
            Instant::now() < deadline,
            "the summary never says exited: {meta}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    r1.kill9();
    // Put the summary back the way start() wrote it: the crash came before finish() saved it.
    meta["state"] = json!("running");
    for field in ["exitCode", "reason", "durationMs"] {
        meta[field] = Value::Null;
    }
    std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();

    let r2 = Runner::start_in(dir, &[]);
    let replayed = replay(&r2, &id, None).await;
    assert_eq!(
        replayed.iter().filter(|e| e.event == "exit").count(),
        1,
        "two exit events: {replayed:?}"
    );
    assert_eq!(exit_event(&replayed)["reason"], "completed");
    let s = summary(&r2, &id).await.1;
    assert_eq!(s["reason"], "completed", "{s}");
    assert_eq!(s["exitCode"], 0, "{s}");
}

// ---------------------------------------------------------------------------------------------
// 6. Retention
// ---------------------------------------------------------------------------------------------

/// Runs `n` invokes one after the other; returns their ids, oldest first.
async fn run_sequentially(r: &Runner, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        let events = r.invoke_sse("?onDisconnect=continue", "").await;
        assert_eq!(exit_event(&events)["reason"], "completed");
        out.push(invoke_id_of(&events));
    }
    out
}

/// Polls the list until it has at most `n` entries (pruning follows the exit event); returns
/// the listed ids, newest first.
async fn listed_once_pruned(r: &Runner, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ids = listed(r).await;
        if ids.len() <= n {
            return ids;
        }
        assert!(Instant::now() < deadline, "never pruned to {n}: {ids:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The ids `GET /v1/invokes` lists, newest first.
async fn listed(r: &Runner) -> Vec<String> {
    let list: Value = r.get_json("/v1/invokes").await;
    list["invokes"]
        .as_array()
        .unwrap_or_else(|| panic!("no list of invokes: {list}"))
        .iter()
        .map(|i| i["invokeId"].as_str().unwrap().to_owned())
        .collect()
}

async fn assert_pruned(r: &Runner, id: &str) {
    // Its files are gone, or kept for reuse (under the name they were created with) with
    // nothing of it readable: the summary emptied, the journal barred by a NUL first byte.
    assert_eq!(
        r.journal_of(id),
        None,
        "pruned invoke {id} kept a readable journal"
    );
    assert_eq!(
        r.summary_file_of(id),
        None,
        "pruned invoke {id} kept its summary"
    );
    // Files come in pairs.
    let names: std::collections::BTreeSet<std::path::PathBuf> = std::fs::read_dir(invokes_dir(r))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    for path in &names {
        let other = match path.extension().and_then(|e| e.to_str()) {
            Some("events") => path.with_extension("json"),
            Some("json") => path.with_extension("events"),
            _ => continue,
        };
        assert!(names.contains(&other), "{} has no pair", path.display());
    }
    let (status, body) = error_of(r.get(&format!("/v1/invokes/{id}")).send().await.unwrap()).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"], "invoke_not_found", "{body}");
    let (status, body) = error_of(
        r.get(&format!("/v1/invokes/{id}/events"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"], "invoke_not_found", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_prunes_oldest() {
    let r = Runner::start(&["--retain-invokes", "3"]);
    r.configure_sh("echo run").await;
    let ids = run_sequentially(&r, 5).await;
    let listed = listed_once_pruned(&r, 3).await;
    let newest: Vec<String> = ids[2..].iter().rev().cloned().collect();
    assert_eq!(listed, newest, "the 3 newest, newest first");
    for id in &ids[..2] {
        assert_pruned(&r, id).await;
    }
    for id in &ids[2..] {
        assert!(journal_of(&r, id).is_file());
        let events = replay(&r, id, None).await;
        assert_eq!(rebuild(&events, "stdout"), b"run\n");
        let s = summary(&r, id).await.1;
        assert_eq!(s["lastEventId"], 3, "{s}");
    }
}

/// When the journal cannot be created the process is stopped at once and the stream says
/// why, between `start` and `exit` (reason `error`); the runner goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invoke_without_a_journal_is_stopped_and_says_why() {
    let r = Runner::start(&[]);
    r.configure_sh("sleep 30").await;
    std::fs::remove_dir_all(invokes_dir(&r)).unwrap();
    let events = r.invoke_sse("", "").await;
    let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names.first(), Some(&"start"), "{names:?}");
    assert_eq!(events[1].event, "error", "{names:?}");
    assert_eq!(events[1].data["phase"], "journal", "{:?}", events[1]);
    let exit = exit_event(&events);
    assert_eq!(exit["reason"], "error", "{exit}");
    // Killed, not left to sleep out its 30 s.
    assert!(exit["durationMs"].as_u64().unwrap() < 10_000, "{exit}");
    let health = r.get("/healthz").send().await.unwrap();
    assert_eq!(health.status(), 200);
}

/// A quick invoke that recycles a big journal (more old bytes than the runtime thread cuts
/// itself) still leaves a journal holding its own events only: the old tail is cut off the
/// runtime thread, shortly after `exit`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quick_invoke_in_a_big_recycled_journal_cuts_its_old_tail() {
    let r = Runner::start(&["--retain-invokes", "1"]);
    let big = r.dir.join("big");
    r.configure_sh(&format!(
        "if [ -e {} ]; then head -c 6000000 /dev/zero | tr '\\0' x | fold -w 100; fi; echo small",
        big.display()
    ))
    .await;
    std::fs::write(&big, b"").unwrap();
    let first = run_sequentially(&r, 1).await.remove(0);
    let first_len = std::fs::metadata(journal_of(&r, &first)).unwrap().len();
    assert!(
        first_len > 8_000_000,
        "journal of {first}: {first_len} bytes"
    );
    std::fs::remove_file(&big).unwrap();
    // The second prunes the first (its files become the spare), the third takes them.
    let ids = run_sequentially(&r, 2).await;
    let journal = journal_of(&r, &ids[1]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let len = std::fs::metadata(&journal).unwrap().len();
        if len < 1_000 {
            break;
        }
        assert!(Instant::now() < deadline, "old tail never cut: {len} bytes");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let bytes = std::fs::read(&journal).unwrap();
    assert!(bytes.starts_with(b"id: 1\nevent: start\n"));
    assert!(!bytes.contains(&0), "a NUL left in the journal");
    let events = replay(&r, &ids[1], None).await;
    assert_eq!(rebuild(&events, "stdout"), b"small\n");
}

/// Pruned journals and summaries are emptied and reused by later invokes (no new inode per
/// invoke), and a reused file holds nothing of its earlier invoke.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruned_files_are_reused_clean() {
    let r = Runner::start(&["--retain-invokes", "1"]);
    r.configure_sh("echo \"$AGENTBOX_INVOKE_ID\"; seq 1 50")
        .await;
    // A second name for the first journal: deleting the journal leaves this file as it was,
    // reusing it empties it and fills it with a later invoke's events.
    let observer = r.workspace.parent().unwrap().join("observer");
    let mut first = None;
    for _ in 0..10 {
        let events = r.invoke_sse("?onDisconnect=continue", "").await;
        let id = invoke_id_of(&events);
        let journal = journal_of(&r, &id);
        if first.is_none() {
            std::fs::hard_link(&journal, &observer).unwrap();
            first = Some(id.clone());
        }
        let want: String = std::iter::once(id.clone())
            .chain((1..=50).map(|n| n.to_string()))
            .map(|line| line + "\n")
            .collect();
        assert!(
            std::fs::read(&journal)
                .unwrap()
                .starts_with(b"id: 1\nevent: start\n"),
            "journal of {id} does not start with its own first event"
        );
        assert_eq!(
            rebuild(&replay(&r, &id, None).await, "stdout"),
            want.as_bytes()
        );
        let summary = std::fs::read_to_string(journal.with_extension("json")).unwrap();
        for line in summary.lines() {
            let line: Value = serde_json::from_str(line).unwrap();
            assert_eq!(
                line["invokeId"],
                id.as_str(),
                "a stale summary line: {summary}"
            );
        }
    }
    let first = first.unwrap();
    let reused = String::from_utf8_lossy(&std::fs::read(&observer).unwrap()).into_owned();
    assert!(
        !reused.contains(&first),
        "the journal of pruned invoke {first} was deleted, not reused: {reused:.200}"
    );
}

/// Starting an invoke on a recycled pair changes no entry of `invokes/`, so the runner sets
/// the directory's modification time itself: the control plane reads `lastActivityAt` there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invoke_on_a_recycled_pair_marks_activity() {
    let r = Runner::start(&["--retain-invokes", "1"]);
    r.configure_sh("echo hi").await;
    let ids = run_sequentially(&r, 2).await;
    assert_eq!(listed_once_pruned(&r, 1).await, [ids[1].clone()]);
    let dir = invokes_dir(&r);
    let touched = std::process::Command::new("touch")
        .args(["-d", "2020-01-01T00:00:00Z"])
        .arg(&dir)
        .status()
        .unwrap();
    assert!(touched.success());
    let before = std::time::SystemTime::now();
    let id = run_sequentially(&r, 1).await.remove(0);
    assert_eq!(
        journal_of(&r, &id),
        dir.join(format!("{}.events", ids[0])),
        "not a recycled pair"
    );
    let modified = std::fs::metadata(&dir).unwrap().modified().unwrap();
    // File times come from the kernel's coarse clock, which may trail by a tick.
    assert!(
        modified + Duration::from_millis(50) >= before,
        "invokes/ modified at {modified:?}, the invoke started at {before:?}"
    );
}

/// A pruned invoke's files wait under its name for a new invoke to take them; a runner killed
/// before that deletes them when it starts, and lists only what it kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_runner_deletes_pruned_files_left_for_reuse() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut r1 = Runner::start_in(dir, &["--retain-invokes", "1"]);
    r1.configure_sh("seq 1 100").await;
    let ids = run_sequentially(&r1, 3).await;
    assert_eq!(listed_once_pruned(&r1, 1).await, [ids[2].clone()]);
    // The second invoke found no spare (the first was still kept when it started), so its
    // pair carries its name; the third took the first's pair.
    let spare = invokes_dir(&r1).join(&ids[1]);
    let deadline = Instant::now() + Duration::from_secs(10);
    // A spare's summary is barred by a NUL first byte.
    while std::fs::read(spare.with_extension("json")).map_or(1, |b| b.first().copied().unwrap_or(1))
        != 0
    {
        assert!(
            Instant::now() < deadline,
            "{} was not kept for reuse",
            ids[1]
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_pruned(&r1, &ids[1]).await;
    r1.kill9();

    let r2 = Runner::start_in(dir, &[]);
    for ext in ["events", "json"] {
        assert!(
            !spare.with_extension(ext).exists(),
            "the spare {ext} file of {} outlived the restart",
            ids[1]
        );
    }
    assert_eq!(listed(&r2).await, [ids[2].clone()]);
    let events = replay(&r2, &ids[2], None).await;
    assert_eq!(rebuild(&events, "stdout").len(), 292, "seq 1 100");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_bytes_prunes_oldest() {
    // Each journal holds 1000 lines of 100 bytes, framed: about 155 KB.
    let r = Runner::start(&["--retain-bytes", "400KB"]);
    r.configure_sh("head -c 100000 /dev/zero | tr '\\0' x | fold -w 100; echo")
        .await;
    let ids = run_sequentially(&r, 4).await;
    let listed = listed_once_pruned(&r, 2).await;
    let newest: Vec<String> = ids[2..].iter().rev().cloned().collect();
    assert_eq!(listed, newest, "the 2 newest fit in 400KB, newest first");
    let kept: u64 = ids[2..]
        .iter()
        .map(|id| std::fs::metadata(journal_of(&r, id)).unwrap().len())
        .sum();
    assert!(kept <= 400_000, "kept {kept} journal bytes");
    for id in &ids[..2] {
        assert_pruned(&r, id).await;
    }
    // Pruned journals kept for reuse count too.
    let on_disk: u64 = std::fs::read_dir(invokes_dir(&r))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".events"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!(on_disk <= 400_000, "{on_disk} bytes of journals on disk");
}

// ---------------------------------------------------------------------------------------------
// 7. Errors
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_unknown_invoke_404() {
    let r = Runner::start(&[]);
    let list: Value = r.get_json("/v1/invokes").await;
    assert_eq!(list, json!({"invokes": []}));
    for path in [
        "/v1/invokes/inv-000000000000-0000000000000000/events",
        "/v1/invokes/inv-000000000000-0000000000000000",
        "/v1/invokes/nope/events",
    ] {
        let (status, body) = error_of(r.get(path).send().await.unwrap()).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(body["error"], "invoke_not_found", "{path}: {body}");
    }
    // Unauthenticated readers get nothing.
    let resp = r
        .client
        .get(r.url("/v1/invokes/nope/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_last_event_id_is_400() {
    let r = Runner::start(&[]);
    r.configure_sh("echo hi").await;
    let events = r.invoke_sse("", "").await;
    let id = invoke_id_of(&events);
    let url = format!("/v1/invokes/{id}/events");
    for bad in ["abc", "-1", "1.5", ""] {
        let resp = r
            .get(&url)
            .header("last-event-id", bad)
            .send()
            .await
            .unwrap();
        let (status, body) = error_of(resp).await;
        assert_eq!(status, 400, "Last-Event-ID {bad:?}: {body}");
        assert_eq!(body["error"], "invalid_request", "{body}");
    }
    let (status, body) = error_of(r.get(&format!("{url}?after=abc")).send().await.unwrap()).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "invalid_request", "{body}");

    // Valid edges: past the end is an empty stream that ends; the header wins over ?after=.
    let last = events.last().unwrap().id;
    assert!(replay(&r, &id, Some(last)).await.is_empty());
    assert!(replay(&r, &id, Some(last + 100)).await.is_empty());
    let resp = r
        .get(&format!("{url}?after=0"))
        .header("last-event-id", (last - 1).to_string())
        .send()
        .await
        .unwrap();
    let tail = parse_sse(&resp.bytes().await.unwrap());
    assert_eq!(ids(&tail), [last]);
    let resp = r.get(&format!("{url}?after=1")).send().await.unwrap();
    let tail = parse_sse(&resp.bytes().await.unwrap());
    assert_ids(&tail, 2, "?after=1");
    assert_eq!(tail.len() as u64, last - 1);
}

/// The summary next to a journal is only a cache: a runner killed while it was torn or before
/// it was written recovers the invoke from the journal alone, named by the journal's `start`
/// (here a recycled pair, whose file names are an older invoke's id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_restart_rebuilds_a_torn_summary_from_the_journal() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pid_file = dir.join("pid");
    let mut r1 = Runner::start_in(dir, &["--retain-invokes", "1"]);
    r1.configure_sh("echo quick").await;
    // The second prunes the first, whose pair the sleeper below then takes.
    let quick = run_sequentially(&r1, 2).await;
    assert_eq!(listed_once_pruned(&r1, 1).await, [quick[1].clone()]);
    r1.configure_sh(&format!(
        "echo hello; echo $$ > {}; exec sleep 1000",
        pid_file.display()
    ))
    .await;
    let (id, pid, resp) = start_sleeper(&r1, &pid_file).await;
    let _guard = KillOnDrop(pid);
    let journal = journal_of(&r1, &id);
    assert_eq!(
        journal,
        invokes_dir(&r1).join(format!("{}.events", quick[0])),
        "not a recycled pair"
    );
    r1.kill9();
    drop(resp);
    std::fs::write(journal.with_extension("json"), b"{\"invokeId\":").unwrap();

    let r2 = Runner::start_in(dir, &[]);
    let (status, s) = summary(&r2, &id).await;
    assert_eq!(status, 200, "{s}");
    assert_eq!(s["state"], "exited", "{s}");
    assert_eq!(s["reason"], "runner_restarted", "{s}");
    let events = replay(&r2, &id, None).await;
    assert_eq!(rebuild(&events, "stdout"), b"hello\n");
    assert_eq!(events.last().unwrap().event, "exit");
    assert_eq!(events.last().unwrap().data["reason"], "runner_restarted");
    let ids: Vec<u64> = events.iter().map(|e| e.id).collect();
    assert_eq!(ids, (1..=ids.len() as u64).collect::<Vec<_>>());
}
