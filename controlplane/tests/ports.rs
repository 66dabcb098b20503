//! Forwarded ports end to end, under the local backend's namespace isolation (the default of
//! `agentbox up`): `python3 -m http.server` in a sandbox read through the preview proxy with a
//! real HTTP client, a stdlib WebSocket echo server reached through it with a real WebSocket
//! client, the bad-input rows, and `agentbox port-forward` tunnelling raw TCP. The servers
//! listen inside the sandbox's own network namespace, so nothing here touches the host's ports
//! but the control plane's and the port-forward's own ephemeral ones.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_error, send, Cp, Env, ADMIN_KEY};
use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};

/// A WebSocket echo server on the Python standard library (asyncio, RFC 6455 by hand). Its
/// first message says which path it was asked for and whether any credential reached it.
const WS_SERVER: &str = r#"
import asyncio, base64, hashlib, struct
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
async def frame(w, op, data):
    n = len(data)
    head = bytes([0x80 | op]) + (bytes([n]) if n < 126 else (b"\x7e" + struct.pack(">H", n) if n < 65536 else b"\x7f" + struct.pack(">Q", n)))
    w.write(head + data)
    await w.drain()
async def handle(r, w):
    head = (await r.readuntil(b"\r\n\r\n")).decode()
    lines = head.split("\r\n")
    path = lines[0].split(" ")[1]
    hdrs = {l.split(":", 1)[0].strip().lower(): l.split(":", 1)[1].strip() for l in lines[1:] if ":" in l}
    creds = [h for h in ("authorization", "x-api-key", "cookie") if h in hdrs]
    acc = base64.b64encode(hashlib.sha1(hdrs["sec-websocket-key"].encode() + GUID).digest())
    w.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " + acc + b"\r\n\r\n")
    await frame(w, 1, ("path:%s creds:%s" % (path, ",".join(creds) or "none")).encode())
    while True:
        b0, b1 = await r.readexactly(2)
        op, n = b0 & 15, b1 & 127
        if n == 126: n = struct.unpack(">H", await r.readexactly(2))[0]
        elif n == 127: n = struct.unpack(">Q", await r.readexactly(8))[0]
        mask = await r.readexactly(4) if b1 & 128 else b"\0\0\0\0"
        raw = await r.readexactly(n)
        data = bytes(c ^ mask[i % 4] for i, c in enumerate(raw))
        if op == 8:
            await frame(w, 8, b"")
            w.close()
            return
        await frame(w, op, (b"echo:" if op == 1 else b"") + data)
async def main():
    s = await asyncio.start_server(handle, "127.0.0.1", 8765)
    await s.serve_forever()
asyncio.run(main())
"#;

/// A plain TCP echo server (not HTTP): what `agentbox port-forward` must carry too.
const TCP_ECHO: &str = r#"
import socketserver
class H(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            d = self.request.recv(65536)
            if not d:
                return
            self.request.sendall(d)
socketserver.ThreadingTCPServer(("127.0.0.1", 7000), H).serve_forever()
"#;

async fn put_file(cp: &Cp, name: &str, path: &str, bytes: Vec<u8>) {
    let (status, body) = send(
        cp.sb(Method::PUT, name, &format!("/files/workspace/{path}"))
            .body(bytes),
    )
    .await;
    assert!(
        status == 200 || status == 201,
        "put {path}: {status} {body}"
    );
}

/// Starts `command` in the sandbox in a session of its own, so it outlives the exec.
/// Starts `command` as a long-lived process of the sandbox (the processes API: it outlives the
/// request, unlike anything an exec leaves behind, which the exec's end takes with it).
async fn start_server(cp: &Cp, name: &str, command: &str) {
    let (status, body) = send(
        cp.sb(Method::POST, name, "/processes")
            .json(&json!({ "command": command })),
    )
    .await;
    assert_eq!(status, 201, "start {command:?}: {body}");
}

/// GETs `path` until the sandbox's server answers (not 502 `port_unreachable`).
async fn get_when_up(cp: &Cp, path: &str) -> reqwest::Response {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let resp = cp.admin(Method::GET, path).send().await.unwrap();
        if resp.status() != 502 || Instant::now() > deadline {
            return resp;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn forward(cp: &Cp, name: &str, port: u16) -> (u16, Value) {
    send(
        cp.sb(Method::POST, name, "/ports")
            .json(&json!({"port": port, "protocol": "http"})),
    )
    .await
}

#[tokio::test]
async fn preview_serves_http_and_websockets_from_an_isolated_sandbox() {
    let env = Env::new();
    let cp = env.start_with("namespaces", &[]);
    cp.create("web", "code").await;

    // A 3 MiB file of varied bytes, served by python3 -m http.server.
    let data: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    put_file(&cp, "web", "site/data.bin", data.clone()).await;
    start_server(
        &cp,
        "web",
        "python3 -m http.server 8000 --bind 127.0.0.1 --directory /workspace/site",
    )
    .await;

    // Not forwarded yet: 404, whatever listens.
    let (status, body) = send(cp.sb(Method::GET, "web", "/preview/8000/data.bin")).await;
    assert_eq!(status, 404, "{body}");
    assert_error(&body, "port_not_forwarded");

    let (status, port) = forward(&cp, "web", 8000).await;
    assert_eq!(status, 201, "{port}");
    let base = format!("http://{}/api/v1/sandboxes/web/preview/8000/", cp.addr);
    assert_eq!(
        port,
        json!({"port": 8000, "protocol": "http", "previewUrl": base,
               "internalUrl": "http://127.0.0.1:8000"})
    );
    let (status, again) = forward(&cp, "web", 8000).await;
    assert_eq!((status, &again), (200, &port));

    let resp = get_when_up(&cp, "/api/v1/sandboxes/web/preview/8000/data.bin").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-length"],
        data.len().to_string().as_str()
    );
    let got = resp.bytes().await.unwrap();
    assert!(got[..] == data[..], "{} bytes differ", got.len());
    // A directory listing, the query passed on, the root redirected to its slash.
    let resp = cp
        .sb(Method::GET, "web", "/preview/8000/?a=b")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.unwrap().contains("data.bin"));
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = no_redirects
        .get(cp.url("/api/v1/sandboxes/web/preview/8000"))
        .header("x-api-key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 308);
    assert_eq!(
        resp.headers()["location"],
        "/api/v1/sandboxes/web/preview/8000/"
    );
    // Authenticated like every route.
    let (status, _) = send(cp.req(
        Method::GET,
        "/api/v1/sandboxes/web/preview/8000/data.bin",
        None,
    ))
    .await;
    assert_eq!(status, 401);
    let (status, _) = send(cp.req(
        Method::GET,
        "/api/v1/sandboxes/web/preview/8000/data.bin",
        Some("wrong"),
    ))
    .await;
    assert_eq!(status, 401);

    // Bad ports: 400 before anything reaches the runner.
    for bad in ["0", "65536", "99999", "-1", "http", "80a"] {
        let (status, body) = send(cp.sb(Method::GET, "web", &format!("/preview/{bad}/"))).await;
        assert_eq!(status, 400, "preview {bad}: {body}");
        assert_error(&body, "invalid_port");
        let (status, body) = send(cp.sb(Method::DELETE, "web", &format!("/ports/{bad}"))).await;
        assert_eq!(status, 400, "delete {bad}: {body}");
        assert_error(&body, "invalid_port");
    }
    for bad in [0, 65_536, -5, 1i64 << 40] {
        let (status, body) = send(
            cp.sb(Method::POST, "web", "/ports")
                .json(&json!({"port": bad})),
        )
        .await;
        assert_eq!(status, 400, "forward {bad}: {body}");
        assert_error(&body, "invalid_port");
    }
    let (status, body) = send(
        cp.sb(Method::POST, "web", "/ports")
            .json(&json!({"port": "x"})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_error(&body, "invalid_request");
    let (status, body) = send(
        cp.sb(Method::POST, "web", "/ports")
            .json(&json!({"port": 1, "protocol": "udp"})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    // Forwarded, but nothing listens: 502 from the runner, passed on.
    forward(&cp, "web", 8001).await;
    let (status, body) = send(cp.sb(Method::GET, "web", "/preview/8001/")).await;
    assert_eq!(status, 502, "{body}");
    assert_error(&body, "port_unreachable");
    // Another sandbox's ports are not reachable through this one's name, nor an unknown one.
    let (status, body) = send(cp.sb(Method::GET, "nope", "/preview/8000/")).await;
    assert_eq!(status, 404, "{body}");
    assert_error(&body, "sandbox_not_found");

    // A WebSocket through the preview proxy: the path arrives rewritten, no credential does.
    put_file(&cp, "web", "ws.py", WS_SERVER.as_bytes().to_vec()).await;
    start_server(&cp, "web", "python3 /workspace/ws.py").await;
    let (status, _) = forward(&cp, "web", 8765).await;
    assert_eq!(status, 201);
    let mut request = format!("ws://{}/api/v1/sandboxes/web/preview/8765/ws?x=1", cp.addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("x-api-key", ADMIN_KEY.parse().unwrap());
    request
        .headers_mut()
        .insert("authorization", "Bearer caller-secret".parse().unwrap());
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut ws = loop {
        let tcp = tokio::net::TcpStream::connect(cp.addr).await.unwrap();
        match tokio_tungstenite::client_async(request.clone(), tcp).await {
            Ok((ws, response)) => {
                assert_eq!(response.status(), 101);
                break ws;
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("no WebSocket through the preview: {e}"),
        }
    };
    let first = ws.next().await.unwrap().unwrap();
    assert_eq!(first, Message::text("path:/ws?x=1 creds:none"));
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("echo:hello")
    );
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(big));
    ws.close(None).await.unwrap();
    // Without a credential, refused before any upgrade.
    let mut anonymous = format!("ws://{}/api/v1/sandboxes/web/preview/8765/", cp.addr)
        .into_client_request()
        .unwrap();
    anonymous.headers_mut().remove("x-api-key");
    let tcp = tokio::net::TcpStream::connect(cp.addr).await.unwrap();
    match tokio_tungstenite::client_async(anonymous, tcp).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401)
        }
        other => panic!(
            "an anonymous WebSocket was not refused: {:?}",
            other.map(|r| r.1)
        ),
    }

    // The table, then removal: the port is no longer reachable.
    let (status, list) = send(cp.sb(Method::GET, "web", "/ports")).await;
    assert_eq!(status, 200);
    let listed: Vec<u64> = list["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["port"].as_u64().unwrap())
        .collect();
    assert_eq!(listed, [8000, 8001, 8765], "{list}");
    let (status, _) = send(cp.sb(Method::DELETE, "web", "/ports/8000")).await;
    assert_eq!(status, 204);
    let (status, body) = send(cp.sb(Method::DELETE, "web", "/ports/8000")).await;
    assert_eq!(status, 404, "{body}");
    assert_error(&body, "port_not_forwarded");
    let (status, body) = send(cp.sb(Method::GET, "web", "/preview/8000/data.bin")).await;
    assert_eq!(status, 404, "{body}");
    let audit = env.audit_log();
    assert!(
        audit.contains("\"ports.forward\"") && audit.contains("\"ports.remove\""),
        "{audit}"
    );
    cp.delete("web").await;
}

#[tokio::test]
async fn port_forward_tunnels_raw_tcp_through_the_control_plane() {
    let env = Env::new();
    let cp = env.start_with("namespaces", &[]);
    cp.create("tcp", "code").await;
    put_file(&cp, "tcp", "echo.py", TCP_ECHO.as_bytes().to_vec()).await;
    start_server(&cp, "tcp", "python3 /workspace/echo.py").await;

    let cli = common::runner_bin().with_file_name("agentbox");
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Command::new(&cli)
        .args(["port-forward", "tcp", ":7000"])
        .env("AGENTBOX_API_URL", format!("http://{}", cp.addr))
        .env("AGENTBOX_API_KEY", ADMIN_KEY)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut child = KillOnDrop(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let local: std::net::SocketAddr = line
        .strip_prefix("Forwarding from ")
        .and_then(|l| l.split(" -> ").next())
        .unwrap_or_else(|| panic!("{line:?}"))
        .parse()
        .unwrap();
    assert!(local.ip().is_loopback() && local.port() != 0, "{line}");
    // It forwarded the port itself.
    let (_, list) = send(cp.sb(Method::GET, "tcp", "/ports")).await;
    assert_eq!(list["ports"][0]["port"], 7000, "{list}");

    // Two connections at once, each its own tunnel, every byte back in order.
    let deadline = Instant::now() + Duration::from_secs(15);
    let round_trip = |tag: u8| async move {
        let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8 ^ tag).collect();
        let mut s = tokio::net::TcpStream::connect(local).await.unwrap();
        let (mut r, mut w) = s.split();
        // Before the server is up, the tunnel fails and the connection is closed: no panic.
        let send = async {
            let _ = w.write_all(&payload).await;
            let _ = w.shutdown().await;
        };
        let mut got = Vec::new();
        let recv = r.read_to_end(&mut got);
        let (_, n) = tokio::join!(send, recv);
        (n.unwrap_or(0), got == payload)
    };
    let (a, b) = loop {
        let (a, b) = tokio::join!(round_trip(1), round_trip(2));
        if (a.1 && b.1) || Instant::now() > deadline {
            break (a, b);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(a.1 && b.1, "echoed {} and {} bytes", a.0, b.0);

    // Ctrl-C stops it: the listener goes away.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.0.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(tokio::net::TcpStream::connect(local).await.is_err());
    cp.delete("tcp").await;
}

/// Where the control plane shares the host with the runner and reaches it on a unix socket
/// (an isolated sandbox), the runner hands the port's connection itself to the control plane
/// (`SCM_RIGHTS`), and a preview's bytes never pass through the runner: a download goes on to
/// its end with the runner stopped (`SIGSTOP`). An unisolated sandbox's runner listens on TCP
/// and carries the bytes in a tunnel: there, the same download stalls until the runner
/// continues (which shows that the test can tell the two apart).
#[tokio::test]
async fn preview_bytes_skip_a_runner_on_the_same_host() {
    const SIZE: usize = 64 << 20;
    for isolation in ["namespaces", "none"] {
        let env = Env::new();
        let cp = env.start_with(isolation, &[]);
        cp.create("big", "code").await;
        // A directory of a name no other process has on its command line.
        let dir = format!("skip-{}-{isolation}", std::process::id());
        let (status, body) =
            send(cp.sb(Method::POST, "big", "/exec").json(
                &json!({"command": format!("mkdir -p {dir} && truncate -s {SIZE} {dir}/big")}),
            ))
            .await;
        assert_eq!((status, &body["exitCode"]), (200, &json!(0)), "{body}");
        let (status, body) = send(cp.sb(Method::POST, "big", "/processes").json(&json!({
            "argv": ["python3", "-m", "http.server", "8001", "--bind", "127.0.0.1",
                     "--directory", dir]
        })))
        .await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(forward(&cp, "big", 8001).await.0, 201);
        let resp = get_when_up(&cp, "/api/v1/sandboxes/big/preview/8001/").await;
        assert_eq!(resp.status(), 200, "{isolation}");

        let handed_over = isolation == "namespaces";
        common::download_with_the_runner_stopped(&cp, "big", 8001, "big", &dir, SIZE, handed_over)
            .await;
        cp.delete("big").await;
    }
}
