//! Terminals and processes through the control plane, in a namespaced local sandbox: a Python
//! REPL driven over the terminal WebSocket (`1+1` → `2`, a resize read back from `stty size`),
//! a disconnect and a reconnect that replays what was missed, the exit frame; tickets (single
//! use, bound to their sandbox, forged ones refused) and 401 before the upgrade without
//! credentials; the processes routes passed through, with no argv or stdin in the audit log.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{send, Env, ADMIN_KEY};
use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(url: &str, key: Option<&str>) -> Result<Ws, u16> {
    let mut req = url.into_client_request().unwrap();
    if let Some(key) = key {
        req.headers_mut().insert("x-api-key", key.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(WsError::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("{e}"),
    }
}

/// Reads until the output holds `needle`; returns the text frames seen.
async fn read_until(ws: &mut Ws, out: &mut Vec<u8>, needle: &str) -> Vec<Value> {
    let mut texts = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
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

async fn ticket(cp: &common::Cp, name: &str) -> String {
    let (status, body) = send(cp.sb(Method::POST, name, "/terminal/ticket")).await;
    assert_eq!(status, 200, "{body}");
    body["ticket"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_python_repl_over_the_terminal_websocket_through_the_control_plane() {
    let env = Env::new();
    let cp = env.start_with("namespaces", &[]);
    cp.create("term", "default").await;
    let ws_base = format!("ws://{}", cp.addr);
    let argv = "%5B%22python3%22%2C%22-q%22%2C%22-i%22%5D"; // ["python3","-q","-i"]

    // No credentials, a forged or foreign ticket: 401 before the upgrade.
    let url = format!("{ws_base}/api/v1/sandboxes/term/terminal?argv={argv}");
    assert_eq!(connect(&url, None).await.err(), Some(401));
    assert_eq!(connect(&url, Some("wrong-key")).await.err(), Some(401));
    let forged = format!("{url}&ticket=eyJzIjoidGVybSJ9.AAAA");
    assert_eq!(connect(&forged, None).await.err(), Some(401));
    cp.create("other", "default").await;
    let foreign = ticket(&cp, "other").await;
    let wrong_box = format!("{url}&ticket={foreign}");
    assert_eq!(connect(&wrong_box, None).await.err(), Some(401));

    // A ticket, as a browser would use it.
    let t = ticket(&cp, "term").await;
    let with_ticket = format!("{ws_base}/ws/terminal/term?argv={argv}&cols=80&rows=24&ticket={t}");
    let mut ws = connect(&with_ticket, None).await.unwrap();
    // Used once: refused the second time.
    assert_eq!(connect(&with_ticket, None).await.err(), Some(401));

    let mut out = Vec::new();
    let texts = read_until(&mut ws, &mut out, ">>> ").await;
    assert_eq!(texts[0]["type"], "attached", "{texts:?}");
    let id = texts[0]["processId"].as_str().unwrap().to_owned();
    ws.send(Message::binary(b"1+1\r".to_vec())).await.unwrap();
    read_until(&mut ws, &mut out, "\r\n2\r\n>>> ").await;

    ws.send(Message::text(r#"{"type":"resize","cols":123,"rows":45}"#))
        .await
        .unwrap();
    ws.send(Message::binary(
        b"import subprocess; subprocess.run(['stty', 'size'])\r".to_vec(),
    ))
    .await
    .unwrap();
    read_until(&mut ws, &mut out, "45 123").await;

    // Go away while output is on its way; it is replayed on the reconnect.
    ws.send(Message::binary(
        b"import time; time.sleep(0.5); print('missed', 6*7)\r".to_vec(),
    ))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(ws);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (status, s) = send(cp.sb(Method::GET, "term", &format!("/processes/{id}"))).await;
    assert_eq!((status, s["state"].as_str()), (200, Some("running")), "{s}");
    let url = format!("{ws_base}/api/v1/sandboxes/term/terminal?process={id}");
    let mut ws = connect(&url, Some(ADMIN_KEY)).await.unwrap();
    let mut again = Vec::new();
    read_until(&mut ws, &mut again, "missed 42").await;
    assert!(
        !String::from_utf8_lossy(&again).contains("45 123"),
        "only what was missed: {:?}",
        String::from_utf8_lossy(&again)
    );

    // Exit: the code in a final JSON frame.
    ws.send(Message::binary(b"exit(3)\r".to_vec()))
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
    assert_eq!(exit.expect("exit frame")["exitCode"], 3);
}

#[tokio::test]
async fn processes_pass_through_and_stay_out_of_the_audit_log() {
    let env = Env::new();
    let cp = env.start();
    cp.create("procs", "default").await;
    let secret_arg = "argv-must-not-be-audited-1234";
    let (status, p) = send(cp.sb(Method::POST, "procs", "/processes").json(&json!({
        "argv": ["sh", "-c", "cat; echo done", secret_arg],
    })))
    .await;
    assert_eq!(status, 201, "{p}");
    let id = p["id"].as_str().unwrap();
    let (status, _) = send(
        cp.sb(
            Method::POST,
            "procs",
            &format!("/processes/{id}/stdin?close=true"),
        )
        .body("stdin-must-not-be-audited\n"),
    )
    .await;
    assert_eq!(status, 204);
    let (status, done) = send(cp.sb(Method::POST, "procs", &format!("/processes/{id}/wait"))).await;
    assert_eq!(
        (status, done["exitCode"].as_i64()),
        (200, Some(0)),
        "{done}"
    );
    let events = cp
        .sb(Method::GET, "procs", &format!("/processes/{id}/events"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(events.contains("stdin-must-not-be-audited"), "{events}");
    assert!(events.contains("\"done\""), "{events}");
    let (status, list) = send(cp.sb(Method::GET, "procs", "/processes")).await;
    assert_eq!(status, 200);
    assert_eq!(list["processes"][0]["id"], id);
    let (status, e) = send(cp.sb(Method::GET, "procs", "/processes/inv-nope")).await;
    assert_eq!(
        (status, e["error"].as_str()),
        (404, Some("process_not_found"))
    );
    let (status, e) = send(
        cp.sb(Method::POST, "procs", &format!("/processes/{id}/stdin"))
            .body("x"),
    )
    .await;
    assert_eq!((status, e["error"].as_str()), (409, Some("process_exited")));
    let audit = env.audit_log();
    assert!(audit.contains("processes.start"), "{audit}");
    assert!(audit.contains("processes.stdin"), "{audit}");
    assert!(!audit.contains(secret_arg) && !audit.contains("stdin-must-not-be-audited"));
}
