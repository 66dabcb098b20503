//! OpenTelemetry: with `--otlp-endpoint`, invokes and configures become `agentbox.invoke` /
//! `agentbox.configure` spans posted as OTLP/HTTP JSON to a collector (a real HTTP server in this
//! test), with bounded attributes, the caller's `traceparent` as parent, and no payloads.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::routing::post;
use axum::{Json, Router};
use common::Env;
use reqwest::Method;
use serde_json::{json, Value};

type Received = Arc<Mutex<Vec<Value>>>;

async fn collector() -> (String, Received) {
    let received: Received = Arc::default();
    let store = Arc::clone(&received);
    let app = Router::new().route(
        "/v1/traces",
        post(move |Json(body): Json<Value>| {
            let store = Arc::clone(&store);
            async move {
                store.lock().unwrap().push(body);
                Json(json!({}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), received)
}

fn spans(received: &Received) -> Vec<Value> {
    received
        .lock()
        .unwrap()
        .iter()
        .flat_map(|body| {
            body["resourceSpans"][0]["scopeSpans"][0]["spans"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect()
}

fn attr<'a>(span: &'a Value, key: &str) -> &'a Value {
    span["attributes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["key"] == key)
        .map_or(&Value::Null, |a| &a["value"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invokes_and_configures_become_spans() {
    let (endpoint, received) = collector().await;
    let env = Env::new();
    let cp = env.start_with("none", &["--otlp-endpoint", &endpoint]);
    cp.create("traced", "default").await;
    cp.configure_sh("traced", "cat >/dev/null; echo done; exit 3")
        .await;
    let resp = cp
        .sb(Method::POST, "traced", "/invoke")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .body("secret-stdin-payload")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.bytes().await.unwrap();
    assert!(String::from_utf8_lossy(&body).contains("\"exitCode\":3"));

    let deadline = Instant::now() + Duration::from_secs(15);
    let invoke = loop {
        if let Some(s) = spans(&received)
            .into_iter()
            .find(|s| s["name"] == "agentbox.invoke")
        {
            break s;
        }
        assert!(Instant::now() < deadline, "no invoke span arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(invoke["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(invoke["parentSpanId"], "00f067aa0ba902b7");
    assert_eq!(invoke["kind"], 2);
    assert_eq!(attr(&invoke, "agentbox.template")["stringValue"], "default");
    assert_eq!(attr(&invoke, "agentbox.sandbox")["stringValue"], "traced");
    assert_eq!(attr(&invoke, "agentbox.outcome")["stringValue"], "ok");
    assert_eq!(attr(&invoke, "agentbox.exit_code")["intValue"], "3");
    assert_eq!(
        attr(&invoke, "http.response.status_code")["intValue"],
        "200"
    );
    assert_eq!(
        attr(&invoke, "agentbox.response_bytes")["intValue"],
        body.len().to_string()
    );
    assert_eq!(
        invoke["status"]["code"], 2,
        "a non-zero exit is an error span"
    );
    let start: u128 = invoke["startTimeUnixNano"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let end: u128 = invoke["endTimeUnixNano"].as_str().unwrap().parse().unwrap();
    assert!(end > start);

    let all = spans(&received);
    assert!(all.iter().any(|s| s["name"] == "agentbox.configure"));
    let text = serde_json::to_string(&*received.lock().unwrap()).unwrap();
    assert!(
        !text.contains("secret-stdin-payload"),
        "a payload leaked into a span"
    );
    assert!(
        !text.contains(common::ADMIN_KEY),
        "a key leaked into a span"
    );
    cp.delete("traced").await;
}
