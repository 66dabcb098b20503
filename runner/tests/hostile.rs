//! Servers that hold under hostile load (issue 20), against the real binary: the path jail
//! raced by a process swapping a directory and a symlink to the outside, and the other abuse
//! cases each with a count of what got through.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use common::Runner;
use serde_json::{json, Value};

/// Every name under `dir` (recursively) that is one of the runner's temporary files.
fn temp_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(items) = std::fs::read_dir(&d) else {
            continue;
        };
        for item in items.flatten() {
            let path = item.path();
            if item.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path.clone());
            }
            if item.file_name().to_string_lossy().contains(".agentbox-") {
                out.push(path);
            }
        }
    }
    out
}

/// A thread swapping `ws/d` (a directory) and `ws/l` (a symlink to the outside) with
/// `renameat2(RENAME_EXCHANGE)` until dropped, as a process in the sandbox could.
struct Swapper {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Swapper {
    fn start(ws: &Path) -> Swapper {
        let stop = Arc::new(AtomicBool::new(false));
        let ws = ws.to_path_buf();
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let dir = std::fs::File::open(&ws).unwrap();
            let mut swaps = 0u64;
            while !flag.load(Ordering::Relaxed) {
                rustix::fs::renameat_with(&dir, "d", &dir, "l", rustix::fs::RenameFlags::EXCHANGE)
                    .unwrap();
                swaps += 1;
                if swaps.is_multiple_of(64) {
                    std::thread::yield_now();
                }
            }
            swaps
        });
        Swapper {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

/// A JSON error body with a code, or a success: never a 5xx, never a body that is not JSON.
async fn check_answer(op: &str, resp: reqwest::Response) -> (u16, bytes::Bytes) {
    let status = resp.status().as_u16();
    let body = resp.bytes().await.unwrap();
    assert!(
        status < 500,
        "{op}: {status} {}",
        String::from_utf8_lossy(&body)
    );
    if status >= 400 {
        let v: Value = serde_json::from_slice(&body)
            .unwrap_or_else(|_| panic!("{op}: {status} not JSON: {body:?}"));
        assert!(
            v["error"].is_string() && v["message"].is_string(),
            "{op}: {v}"
        );
    }
    (status, body)
}

/// The race of defect 5: each file operation on `d/...` runs while `d` and a symlink to an
/// outside directory trade places; not one may read, write or delete outside, every failure
/// is a JSON error, and no temporary file is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_jail_holds_against_a_swapping_race() {
    let tries: usize = std::env::var("AGENTBOX_RACE_TRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let r = Runner::start(&[]);
    let outside = tempfile::tempdir().unwrap();
    let out = std::fs::canonicalize(outside.path()).unwrap();
    std::fs::write(out.join("secret"), "OUTSIDE-SECRET").unwrap();
    let ws = r.workspace.clone();
    std::fs::create_dir(ws.join("d")).unwrap();
    std::fs::write(ws.join("d/secret"), "inside").unwrap();
    for i in 0..tries {
        std::fs::write(out.join(format!("victim-{i}")), "outside").unwrap();
        std::fs::write(ws.join(format!("d/victim-{i}")), "inside").unwrap();
    }
    std::os::unix::fs::symlink(&out, ws.join("l")).unwrap();
    let (status, body) = r.configure_json(json!({"entrypoint": ["true"]})).await;
    assert_eq!(status, 200, "{body}");

    let swapper = Swapper::start(&ws);
    let started = Instant::now();
    let mut escapes = std::collections::BTreeMap::<&str, usize>::new();
    let mut refused = std::collections::BTreeMap::<&str, usize>::new();
    for i in 0..tries {
        // GET
        let resp = r.get("/v1/files/workspace/d/secret").send().await.unwrap();
        let (status, body) = check_answer("GET", resp).await;
        *escapes.entry("GET").or_default() += usize::from(body == "OUTSIDE-SECRET".as_bytes());
        *refused.entry("GET").or_default() += usize::from(status >= 400);
        // archive (tar keeps file contents readable)
        let resp = r
            .get("/v1/archive?path=/workspace/d&format=tar")
            .send()
            .await
            .unwrap();
        let (status, body) = check_answer("archive", resp).await;
        let leaked = memchr::memmem::find(&body, b"OUTSIDE-SECRET").is_some();
        *escapes.entry("archive").or_default() += usize::from(leaked);
        *refused.entry("archive").or_default() += usize::from(status >= 400);
        // PUT
        let resp = r
            .client
            .put(r.url(&format!("/v1/files/workspace/d/put-{i}")))
            .bearer_auth(common::TOKEN)
            .body("written")
            .send()
            .await
            .unwrap();
        let (status, _) = check_answer("PUT", resp).await;
        *refused.entry("PUT").or_default() += usize::from(status >= 400);
        // configure
        let resp = r
            .post("/v1/configure")
            .header("accept", "application/json")
            .json(&json!({"files": [{"path": format!("d/cfg-{i}"), "content": "configured"}]}))
            .send()
            .await
            .unwrap();
        let (status, _) = check_answer("configure", resp).await;
        *refused.entry("configure").or_default() += usize::from(status >= 400);
        // DELETE
        let resp = r
            .client
            .delete(r.url(&format!("/v1/files/workspace/d/victim-{i}")))
            .bearer_auth(common::TOKEN)
            .send()
            .await
            .unwrap();
        let (status, _) = check_answer("DELETE", resp).await;
        *refused.entry("DELETE").or_default() += usize::from(status >= 400);
    }
    let swaps = swapper.finish();
    for i in 0..tries {
        *escapes.entry("PUT").or_default() += usize::from(out.join(format!("put-{i}")).exists());
        *escapes.entry("configure").or_default() +=
            usize::from(out.join(format!("cfg-{i}")).exists());
        *escapes.entry("DELETE").or_default() +=
            usize::from(!out.join(format!("victim-{i}")).exists());
    }
    eprintln!(
        "{tries} tries of each operation in {:?}, {swaps} swaps; escapes {escapes:?}, refused {refused:?}",
        started.elapsed()
    );
    assert!(swaps > tries as u64, "the swapper ran: {swaps} swaps");
    assert!(escapes.values().all(|n| *n == 0), "escapes: {escapes:?}");
    let leftovers: Vec<_> = temp_files(&ws)
        .into_iter()
        .chain(temp_files(&out))
        .filter(|p| !p.starts_with(ws.join(".agentbox")))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}
