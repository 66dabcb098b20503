//! Processes and terminals against the real runner binary: stdin in three writes then closed
//! (output exact), SIGINT to a process that traps it, a whole tree killed, the bad-input rows,
//! a PTY's size and resize, the terminal WebSocket (echo, resize, reconnect replay, exit
//! frame), survival of a client's disconnect and `runner_restarted` after a restart.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{parse_sse, pid_exists, Runner, TOKEN};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

async fn start(r: &Runner, body: Value) -> Value {
    let resp = r.post("/v1/processes").json(&body).send().await.unwrap();
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(status, 201, "{v}");
    v
}

async fn status_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn wait(r: &Runner, id: &str) -> Value {
    let resp = r
        .post(&format!("/v1/processes/{id}/wait?timeout=20s"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

/// The exact bytes of a process's output, from its events (whole lines get their newline).
async fn output(r: &Runner, id: &str) -> (Vec<u8>, Value) {
    let body = r
        .get(&format!("/v1/processes/{id}/events"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let events = parse_sse(&body);
    let mut out = Vec::new();
    for e in &events {
        if e.event == "log" {
            out.extend_from_slice(e.data["data"].as_str().unwrap_or("").as_bytes());
            if e.data["partial"] != true {
                out.push(b'\n');
            }
        }
    }
    let exit = events.last().unwrap().data.clone();
    (out, exit)
}

#[tokio::test]
async fn stdin_in_three_writes_then_closed_gives_the_exact_output() {
    let r = Runner::start(&[]);
    let p = start(&r, json!({"argv": ["cat"], "tag": "t1"})).await;
    let id = p["id"].as_str().unwrap();
    assert_eq!(p["state"], "running");
    assert_eq!(p["tag"], "t1");
    for (i, part) in ["one\n", "two ", "three\n"].iter().enumerate() {
        let close = if i == 2 { "?close=true" } else { "" };
        let resp = r
            .post(&format!("/v1/processes/{id}/stdin{close}"))
            .body(*part)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 204);
    }
    let done = wait(&r, id).await;
    assert_eq!(done["state"], "exited", "{done}");
    assert_eq!(done["exitCode"], 0);
    let (out, exit) = output(&r, id).await;
    assert_eq!(String::from_utf8_lossy(&out), "one\ntwo three\n");
    assert_eq!(exit["reason"], "completed");

    // Input to an exited process: 409; an unknown id: 404.
    let (status, body) = status_of(
        r.post(&format!("/v1/processes/{id}/stdin"))
            .body("x")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("process_exited"))
    );
    for (method, path) in [
        ("GET", "/v1/processes/inv-nope"),
        ("POST", "/v1/processes/inv-nope/stdin"),
        ("POST", "/v1/processes/inv-nope/wait"),
        ("DELETE", "/v1/processes/inv-nope"),
    ] {
        let req = r
            .client
            .request(method.parse().unwrap(), r.url(path))
            .bearer_auth(TOKEN);
        let (status, body) = status_of(req.send().await.unwrap()).await;
        assert_eq!(status, 404, "{method} {path}: {body}");
        assert_eq!(body["error"], "process_not_found");
    }
    // Listed, with its tag and argv.
    let list = r.get_json("/v1/processes").await;
    assert_eq!(list["processes"][0]["id"], id);
    assert_eq!(list["processes"][0]["argv"], json!(["cat"]));
}

#[tokio::test]
async fn bad_input_is_refused() {
    let r = Runner::start(&[]);
    for body in [
        json!({}),
        json!({"argv": []}),
        json!({"argv": ["sh"], "command": "x"}),
        json!({"argv": ["sh"], "pty": {"cols": 0, "rows": 10}}),
        json!({"argv": ["sh"], "env": {"A=B": "x"}}),
    ] {
        let (status, v) =
            status_of(r.post("/v1/processes").json(&body).send().await.unwrap()).await;
        assert_eq!(status, 400, "{body}: {v}");
        assert_eq!(v["error"], "invalid_request", "{v}");
    }
    // Resize of a process without a terminal: 400 not_a_terminal.
    let p = start(&r, json!({"argv": ["sleep", "30"]})).await;
    let id = p["id"].as_str().unwrap();
    let (status, v) = status_of(
        r.post(&format!("/v1/processes/{id}/resize"))
            .json(&json!({"cols": 100, "rows": 40}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, v["error"].as_str()), (400, Some("not_a_terminal")));
    let (status, v) = status_of(
        r.post(&format!("/v1/processes/{id}/signal"))
            .json(&json!({"signal": "SIGNOPE"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("invalid_request"))
    );
    // A terminal route on a process without a terminal (and without a WebSocket): 400.
    let (status, _) = status_of(
        r.get(&format!("/v1/processes/{id}/terminal"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 400);
    // Without the token: 401.
    let resp = r.client.get(r.url("/v1/processes")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let killed = r
        .client
        .delete(r.url(&format!("/v1/processes/{id}")))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(killed.status(), 200);
    let v: Value = killed.json().await.unwrap();
    assert_eq!(v["state"], "exited");
    assert_eq!(v["reason"], "canceled");
    // Killing it again: 409.
    let again = r
        .client
        .delete(r.url(&format!("/v1/processes/{id}")))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);
}

#[tokio::test]
async fn sigint_reaches_a_process_that_traps_it() {
    let r = Runner::start(&[]);
    let script = "trap 'echo caught INT; exit 7' INT; echo ready; while :; do sleep 0.05; done";
    let p = start(&r, json!({"command": script})).await;
    let id = p["id"].as_str().unwrap();
    // Wait for the trap to be set.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (out, _) = partial_output(&r, id).await;
        if out.contains("ready") {
            break;
        }
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resp = r
        .post(&format!("/v1/processes/{id}/signal"))
        .json(&json!({"signal": "INT"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let done = wait(&r, id).await;
    assert_eq!(done["exitCode"], 7, "{done}");
    let (out, _) = output(&r, id).await;
    assert_eq!(String::from_utf8_lossy(&out), "ready\ncaught INT\n");
}

/// The output so far of a running process (events until now, without waiting for exit).
async fn partial_output(r: &Runner, id: &str) -> (String, u64) {
    let s = r.get_json(&format!("/v1/processes/{id}")).await;
    let last = s["lastEventId"].as_u64().unwrap();
    let mut resp = r
        .get(&format!("/v1/processes/{id}/events"))
        .send()
        .await
        .unwrap();
    let mut buf = Vec::new();
    loop {
        let (events, _) = common::parse_sse_prefix(&buf);
        if events.last().is_some_and(|e| e.id >= last) || last == 0 {
            let text: String = events
                .iter()
                .filter(|e| e.event == "log")
                .map(|e| format!("{}\n", e.data["data"].as_str().unwrap_or("")))
                .collect();
            return (text, last);
        }
        match tokio::time::timeout(Duration::from_secs(10), resp.chunk()).await {
            Ok(Ok(Some(c))) => buf.extend_from_slice(&c),
            _ => panic!("no events"),
        }
    }
}

#[tokio::test]
async fn a_kill_takes_the_whole_tree_and_processes_survive_the_client() {
    let r = Runner::start(&[]);
    let pids = r.workspace.join("pids");
    let script = format!(
        "sleep 300 & echo $! > {p}.1; (setsid sleep 301 & echo $! > {p}.2); echo $$ > {p}.0; wait",
        p = pids.display()
    );
    let p = start(&r, json!({"command": script})).await;
    let id = p["id"].as_str().unwrap().to_owned();
    let mut found = Vec::new();
    for i in 0..3 {
        let text = common::wait_for_file(&pids.with_extension(i.to_string())).await;
        found.push(text.parse::<i32>().unwrap());
    }
    // A client that watched the events and went away does not stop it.
    {
        let mut resp = r
            .get(&format!("/v1/processes/{id}/events"))
            .send()
            .await
            .unwrap();
        let _ = tokio::time::timeout(Duration::from_millis(200), resp.chunk()).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = r.get_json(&format!("/v1/processes/{id}")).await;
    assert_eq!(s["state"], "running", "{s}");
    assert!(found.iter().all(|p| pid_exists(*p)));
    let resp = r
        .client
        .delete(r.url(&format!("/v1/processes/{id}")))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while found.iter().any(|p| alive(*p)) {
        assert!(
            Instant::now() < deadline,
            "tree members survived: {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Exists and is not a zombie.
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

#[tokio::test]
async fn a_pty_process_has_its_size_and_gets_resized() {
    let r = Runner::start(&[]);
    let p = start(
        &r,
        json!({"command": "stty size; read x; stty size; test -t 0 && echo tty", "pty": {"cols": 91, "rows": 33}}),
    )
    .await;
    let id = p["id"].as_str().unwrap();
    assert_eq!(p["pty"], json!({"cols": 91, "rows": 33}));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !partial_output(&r, id).await.0.contains("33 91") {
        assert!(Instant::now() < deadline, "no first size");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resp = r
        .post(&format!("/v1/processes/{id}/resize"))
        .json(&json!({"cols": 120, "rows": 40}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let resp = r
        .post(&format!("/v1/processes/{id}/stdin"))
        .body("go\n")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let done = wait(&r, id).await;
    assert_eq!(done["exitCode"], 0, "{done}");
    let (out, _) = output(&r, id).await;
    let text = String::from_utf8_lossy(&out).replace('\r', "");
    assert!(text.contains("33 91\n"), "{text:?}");
    assert!(text.contains("40 120\n"), "{text:?}");
    assert!(text.ends_with("tty\n"), "{text:?}");
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_connect(r: &Runner, path: &str) -> Ws {
    let mut req = format!("ws://{}{}", r.addr, path)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    tokio_tungstenite::connect_async(req).await.unwrap().0
}

/// Reads frames until the output holds `needle`; returns the output and the text frames.
async fn read_until(ws: &mut Ws, out: &mut Vec<u8>, needle: &str) -> Vec<Value> {
    let mut texts = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !String::from_utf8_lossy(out).contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => out.extend_from_slice(&b),
            Ok(Some(Ok(Message::Text(t)))) => texts.push(serde_json::from_str(&t).unwrap()),
            Ok(Some(Ok(_))) => {}
            other => panic!(
                "no {needle:?} in {:?}: {other:?}",
                String::from_utf8_lossy(out)
            ),
        }
    }
    texts
}

#[tokio::test]
async fn a_terminal_websocket_echoes_resizes_replays_and_ends_with_exit() {
    let r = Runner::start(&[]);
    let mut ws = ws_connect(&r, "/v1/terminal?cols=80&rows=24&argv=%5B%22sh%22%5D").await;
    let first = ws.next().await.unwrap().unwrap();
    let attached: Value = serde_json::from_str(first.to_text().unwrap()).unwrap();
    assert_eq!(attached["type"], "attached");
    let id = attached["processId"].as_str().unwrap().to_owned();
    let mut out = Vec::new();
    ws.send(Message::binary(b"echo $((6*7))\n".to_vec()))
        .await
        .unwrap();
    read_until(&mut ws, &mut out, "42").await;
    ws.send(Message::text(r#"{"type":"resize","cols":132,"rows":50}"#))
        .await
        .unwrap();
    ws.send(Message::text(r#"{"type":"input","data":"stty size\n"}"#))
        .await
        .unwrap();
    read_until(&mut ws, &mut out, "50 132").await;
    ws.send(Message::text(r#"{"type":"ping"}"#)).await.unwrap();
    let texts = read_until(&mut ws, &mut out, "50 132").await;
    let _ = texts;
    // Disconnect while a command will print later; reconnect and get what was missed.
    ws.send(Message::binary(
        b"sleep 0.5; echo missed-$((1+2))\n".to_vec(),
    ))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(ws);
    tokio::time::sleep(Duration::from_millis(900)).await;
    let s = r.get_json(&format!("/v1/processes/{id}")).await;
    assert_eq!(
        s["state"], "running",
        "a detached terminal keeps running: {s}"
    );
    let mut ws = ws_connect(&r, &format!("/v1/processes/{id}/terminal")).await;
    let mut again = Vec::new();
    let texts = read_until(&mut ws, &mut again, "missed-3").await;
    assert_eq!(texts[0]["type"], "attached");
    assert!(texts[0]["replayAfter"].as_u64().unwrap() > 0, "{texts:?}");
    assert!(
        !String::from_utf8_lossy(&again).contains("42"),
        "only what was missed is replayed: {:?}",
        String::from_utf8_lossy(&again)
    );
    // Exit: a final JSON frame with the code, then the close.
    ws.send(Message::binary(b"exit 5\n".to_vec()))
        .await
        .unwrap();
    let mut exit = None;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] == "exit" {
                exit = Some(v);
            }
        }
    }
    let exit = exit.expect("an exit frame");
    assert_eq!(exit["exitCode"], 5, "{exit}");
}

#[tokio::test]
async fn a_process_left_running_is_marked_runner_restarted() {
    let tmp = tempfile::tempdir().unwrap();
    let mut r1 = Runner::start_in(tmp.path(), &[]);
    let p = start(
        &r1,
        json!({"argv": ["sleep", "300"], "pty": {"cols": 80, "rows": 24}}),
    )
    .await;
    let id = p["id"].as_str().unwrap().to_owned();
    let pid = p["pid"].as_i64().unwrap() as i32;
    r1.kill9();
    let r2 = Runner::start_in(tmp.path(), &[]);
    let s = r2.get_json(&format!("/v1/processes/{id}")).await;
    assert_eq!(s["state"], "exited", "{s}");
    assert_eq!(s["reason"], "runner_restarted", "{s}");
    assert_eq!(s["pty"], json!({"cols": 80, "rows": 24}));
    assert!(!alive(pid), "the old tree is gone");
    let (status, v) = status_of(
        r2.post(&format!("/v1/processes/{id}/stdin"))
            .body("x")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, v["error"].as_str()), (409, Some("process_exited")));
}
