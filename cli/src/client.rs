//! The typed client. [`Client::control_plane`] talks to `/api/v1/sandboxes/{id}/...`,
//! [`Client::runner`] straight to one runner's `/v1/...`; every sandbox method takes the sandbox
//! name, which a runner client ignores.

use std::fmt;

use agentbox_proto::{
    ConfigureRequest, CreateSandboxRequest, ErrorBody, ExecRequest, ForwardedPort, InvokeList,
    InvokeSummary, PortList, PortRequest, SandboxList, SandboxSummary, TemplateList, UserInfo,
};
use serde::de::DeserializeOwned;

use crate::sse::{Event, Parser};

/// What went wrong talking to a server.
#[derive(Debug)]
pub enum ClientError {
    /// The server could not be reached, or the connection broke.
    Transport(String),
    /// The server answered with an error.
    Api {
        /// HTTP status.
        status: u16,
        /// The error code (`sandbox_not_found`, ...).
        code: String,
        /// The server's message.
        message: String,
        /// For a refused credential (401): where it came from and what to do.
        hint: Option<String>,
    },
    /// The server answered something unexpected.
    Protocol(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Transport(m) => write!(f, "cannot reach the server: {m}"),
            ClientError::Api {
                status,
                code,
                message,
                hint,
            } => {
                write!(f, "{message} ({code}, HTTP {status})")?;
                match hint {
                    Some(hint) => write!(f, "; {hint}"),
                    None => Ok(()),
                }
            }
            ClientError::Protocol(m) => write!(f, "unexpected answer: {m}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<reqwest::Error> for ClientError {
    fn from(e: reqwest::Error) -> Self {
        if e.is_decode() {
            ClientError::Protocol(e.to_string())
        } else {
            ClientError::Transport(e.to_string())
        }
    }
}

/// Result alias.
pub type Result<T> = std::result::Result<T, ClientError>;

#[derive(Debug, Clone)]
enum Base {
    ControlPlane { url: String, key: String },
    Runner { url: String, token: String },
}

/// Options of an invoke.
#[derive(Debug, Clone, Default)]
pub struct InvokeOptions {
    /// `?prompt=`.
    pub prompt: Option<String>,
    /// `?timeout=` (Go duration).
    pub timeout: Option<String>,
    /// `?onDisconnect=` (the server's default, as the seed's, is `cancel`).
    pub on_disconnect: Option<String>,
}

/// A client of one control plane or one runner.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Base,
    refusal_hint: Option<String>,
    /// `--namespace`: the namespace of the sandboxes named.
    namespace: Option<String>,
}

/// Percent-encodes a sandbox path for a URL, keeping `/`.
pub fn encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.trim_start_matches('/').bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Percent-encodes a query value.
pub fn encode_query(value: &str) -> String {
    let mut out = String::new();
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Client {
    /// A client of a control plane at `url` (e.g. `http://127.0.0.1:8420`).
    pub fn control_plane(url: &str, key: &str) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: Base::ControlPlane {
                url: url.trim_end_matches('/').to_owned(),
                key: key.to_owned(),
            },
            refusal_hint: None,
            namespace: None,
        }
    }

    /// A client of one runner at `url`.
    pub fn runner(url: &str, token: &str) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: Base::Runner {
                url: url.trim_end_matches('/').to_owned(),
                token: token.to_owned(),
            },
            refusal_hint: None,
            namespace: None,
        }
    }

    /// What a 401 error says besides the server's message (where the credential came from,
    /// what to do).
    pub fn with_refusal_hint(mut self, hint: impl Into<String>) -> Self {
        self.refusal_hint = Some(hint.into());
        self
    }

    /// Whether this client talks to a runner directly.
    pub fn is_runner(&self) -> bool {
        matches!(self.base, Base::Runner { .. })
    }

    /// Names sandboxes of `namespace` (`--namespace`): names are per namespace, and the id
    /// `name.namespace` picks one.
    pub fn with_namespace(mut self, namespace: Option<String>) -> Self {
        self.namespace = namespace;
        self
    }

    /// The id of sandbox `name` in URLs: `name.namespace` with `--namespace`.
    fn id(&self, name: &str) -> String {
        match &self.namespace {
            Some(ns) if !name.contains('.') => format!("{name}.{}", encode_path(ns)),
            _ => name.to_owned(),
        }
    }

    fn url(&self, sandbox: &str, rest: &str) -> String {
        match &self.base {
            Base::ControlPlane { url, .. } => {
                format!("{url}/api/v1/sandboxes/{}/{rest}", self.id(sandbox))
            }
            Base::Runner { url, .. } => format!("{url}/v1/{rest}"),
        }
    }

    fn api(&self, rest: &str) -> Result<String> {
        match &self.base {
            Base::ControlPlane { url, .. } => Ok(format!("{url}/api/v1/{rest}")),
            Base::Runner { .. } => Err(ClientError::Protocol(
                "this command needs a control plane, not a runner (--runner)".into(),
            )),
        }
    }

    fn auth(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.base {
            Base::ControlPlane { key, .. } => rb.header("x-api-key", key),
            Base::Runner { token, .. } => rb.bearer_auth(token),
        }
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let resp = self.auth(rb).send().await?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(self.error_of(resp).await)
    }

    /// The error a non-success answer stands for.
    async fn error_of(&self, resp: reqwest::Response) -> ClientError {
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let hint = (status == 401).then(|| self.refusal_hint.clone()).flatten();
        match serde_json::from_str::<ErrorBody>(&text) {
            Ok(body) => ClientError::Api {
                status,
                code: body.error,
                message: body.message,
                hint,
            },
            Err(_) => ClientError::Api {
                status,
                code: "http_error".into(),
                message: text.chars().take(200).collect(),
                hint,
            },
        }
    }

    async fn json<T: DeserializeOwned>(&self, rb: reqwest::RequestBuilder) -> Result<T> {
        Ok(self.send(rb).await?.json().await?)
    }

    /// A control-plane route answering JSON: `GET`/`PUT`/`DELETE /api/v1/{rest}` (for routes
    /// without a typed method: governance, credentials, audit). `Null` for an empty answer.
    pub async fn api_json(
        &self,
        method: reqwest::Method,
        rest: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value> {
        let mut rb = self.http.request(method, self.api(rest)?);
        if let Some(body) = body {
            rb = rb.json(body);
        }
        let bytes = self.send(rb).await?.bytes().await?;
        if bytes.is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(format!("not JSON: {e}")))
    }

    /// `GET .../ports`: the forwarded ports.
    pub async fn list_ports(&self, sandbox: &str) -> Result<Vec<ForwardedPort>> {
        let list: PortList = self.json(self.http.get(self.url(sandbox, "ports"))).await?;
        Ok(list.ports)
    }

    /// `POST .../ports`: forwards `port` of the sandbox (an already forwarded one is
    /// answered as it is).
    pub async fn forward_port(
        &self,
        sandbox: &str,
        port: u16,
        protocol: &str,
    ) -> Result<ForwardedPort> {
        let body = PortRequest {
            port: i64::from(port),
            protocol: Some(protocol.to_owned()),
        };
        self.json(self.http.post(self.url(sandbox, "ports")).json(&body))
            .await
    }

    /// `GET .../ports/{port}/tunnel` as an HTTP/1.1 upgrade: a byte stream to the sandbox's
    /// port (through the control plane and the runner).
    pub async fn open_tunnel(&self, sandbox: &str, port: u16) -> Result<reqwest::Upgraded> {
        let rb = self
            .http
            .get(self.url(sandbox, &format!("ports/{port}/tunnel")))
            .header("connection", "upgrade")
            .header("upgrade", "agentbox-tcp");
        let resp = self.auth(rb).send().await?;
        if resp.status() == reqwest::StatusCode::SWITCHING_PROTOCOLS {
            return Ok(resp.upgrade().await?);
        }
        if resp.status().is_success() {
            return Err(ClientError::Protocol(format!(
                "the tunnel answered {} instead of 101",
                resp.status()
            )));
        }
        Err(self.error_of(resp).await)
    }

    /// `GET /api/v1/user/me`.
    pub async fn whoami(&self) -> Result<UserInfo> {
        self.json(self.http.get(self.api("user/me")?)).await
    }

    /// `GET /api/v1/templates`.
    pub async fn templates(&self) -> Result<TemplateList> {
        self.json(self.http.get(self.api("templates")?)).await
    }

    /// `POST /api/v1/sandboxes`.
    pub async fn create_sandbox(&self, req: &CreateSandboxRequest) -> Result<SandboxSummary> {
        self.json(self.http.post(self.api("sandboxes")?).json(req))
            .await
    }

    /// `GET /api/v1/sandboxes`.
    pub async fn list_sandboxes(&self) -> Result<Vec<SandboxSummary>> {
        let rest = match &self.namespace {
            Some(ns) => format!("sandboxes?namespace={}", encode_query(ns)),
            None => "sandboxes".to_owned(),
        };
        let list: SandboxList = self.json(self.http.get(self.api(&rest)?)).await?;
        Ok(list.sandboxes)
    }

    /// `GET /api/v1/sandboxes/{name}`.
    pub async fn get_sandbox(&self, name: &str) -> Result<SandboxSummary> {
        self.json(
            self.http
                .get(self.api(&format!("sandboxes/{}", self.id(name)))?),
        )
        .await
    }

    /// `DELETE /api/v1/sandboxes/{name}`.
    pub async fn delete_sandbox(&self, name: &str) -> Result<SandboxSummary> {
        self.json(
            self.http
                .delete(self.api(&format!("sandboxes/{}", self.id(name)))?),
        )
        .await
    }

    /// `POST /api/v1/sandboxes/{name}/stop`.
    pub async fn stop_sandbox(&self, name: &str) -> Result<SandboxSummary> {
        self.json(
            self.http
                .post(self.api(&format!("sandboxes/{}/stop", self.id(name)))?),
        )
        .await
    }

    /// `POST /api/v1/sandboxes/{name}/resume`.
    pub async fn resume_sandbox(&self, name: &str) -> Result<SandboxSummary> {
        self.json(
            self.http
                .post(self.api(&format!("sandboxes/{}/resume", self.id(name)))?),
        )
        .await
    }

    /// Configure, streaming install output (framed live: `?stream=live`) and the result.
    pub async fn configure(&self, sandbox: &str, req: &ConfigureRequest) -> Result<EventStream> {
        let rb = self
            .http
            .post(format!("{}?stream=live", self.url(sandbox, "configure")))
            .header("accept", "text/event-stream")
            .json(req);
        Ok(EventStream::new(self.send(rb).await?))
    }

    /// Invoke, streaming its events, framed live (`?stream=live`: a fragment without a newline
    /// shows up once the output pauses, so prompts and streamed tokens appear as written).
    pub async fn invoke(
        &self,
        sandbox: &str,
        stdin: impl Into<reqwest::Body>,
        options: &InvokeOptions,
    ) -> Result<EventStream> {
        let mut query = vec!["stream=live".to_owned()];
        if let Some(p) = &options.prompt {
            query.push(format!("prompt={}", encode_query(p)));
        }
        if let Some(t) = &options.timeout {
            query.push(format!("timeout={}", encode_query(t)));
        }
        if let Some(d) = &options.on_disconnect {
            query.push(format!("onDisconnect={}", encode_query(d)));
        }
        let url = format!("{}?{}", self.url(sandbox, "invoke"), query.join("&"));
        let rb = self
            .http
            .post(url)
            .header("accept", "text/event-stream")
            .body(stdin);
        Ok(EventStream::new(self.send(rb).await?))
    }

    /// Follows an invoke's events after event `after`.
    pub async fn events(&self, sandbox: &str, invoke: &str, after: u64) -> Result<EventStream> {
        let rb = self
            .http
            .get(self.url(sandbox, &format!("invokes/{invoke}/events")))
            .header("last-event-id", after.to_string());
        Ok(EventStream::new(self.send(rb).await?))
    }

    /// Cancels an invoke (202), or fails with 404 when it is not running.
    pub async fn cancel(&self, sandbox: &str, invoke: &str) -> Result<()> {
        self.send(
            self.http
                .post(self.url(sandbox, &format!("invokes/{invoke}/cancel"))),
        )
        .await?;
        Ok(())
    }

    /// One invoke's summary.
    pub async fn invoke_summary(&self, sandbox: &str, invoke: &str) -> Result<InvokeSummary> {
        self.json(
            self.http
                .get(self.url(sandbox, &format!("invokes/{invoke}"))),
        )
        .await
    }

    /// Recent invokes.
    pub async fn invokes(&self, sandbox: &str) -> Result<InvokeList> {
        self.json(self.http.get(self.url(sandbox, "invokes"))).await
    }

    /// Running and recent processes.
    pub async fn processes(&self, sandbox: &str) -> Result<agentbox_proto::ProcessList> {
        self.json(self.http.get(self.url(sandbox, "processes")))
            .await
    }

    /// Opens the sandbox's terminal WebSocket with `query` (`cols=..&rows=..&argv=..` or
    /// `process=ID`), authenticated by headers.
    pub async fn terminal(
        &self,
        sandbox: &str,
        query: &str,
    ) -> Result<
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
    > {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let url = self.url(sandbox, &format!("terminal?{query}"));
        let url = match &self.base {
            Base::ControlPlane { .. } => url,
            Base::Runner { url: base, .. } => format!("{base}/v1/terminal?{query}"),
        };
        let url = url
            .replacen("https://", "wss://", 1)
            .replacen("http://", "ws://", 1);
        let mut req = url
            .into_client_request()
            .map_err(|e| ClientError::Protocol(format!("bad terminal URL: {e}")))?;
        let (name, value) = match &self.base {
            Base::ControlPlane { key, .. } => ("x-api-key", key.clone()),
            Base::Runner { token, .. } => ("authorization", format!("Bearer {token}")),
        };
        req.headers_mut().insert(
            name,
            value
                .parse()
                .map_err(|_| ClientError::Protocol("the key is not a header value".into()))?,
        );
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, _)) => Ok(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let status = resp.status().as_u16();
                let text = resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                let hint = (status == 401).then(|| self.refusal_hint.clone()).flatten();
                Err(match serde_json::from_str::<ErrorBody>(&text) {
                    Ok(body) => ClientError::Api {
                        status,
                        code: body.error,
                        message: body.message,
                        hint,
                    },
                    Err(_) => ClientError::Api {
                        status,
                        code: "http_error".into(),
                        message: text.chars().take(200).collect(),
                        hint,
                    },
                })
            }
            Err(e) => Err(ClientError::Protocol(format!(
                "cannot open the terminal: {e}"
            ))),
        }
    }

    /// Exec, streaming its events, framed live; it lingers when the connection drops, so the
    /// stream can be resumed.
    pub async fn exec(&self, sandbox: &str, req: &ExecRequest) -> Result<EventStream> {
        let rb = self
            .http
            .post(format!(
                "{}?stream=live&onDisconnect=linger",
                self.url(sandbox, "exec")
            ))
            .header("accept", "text/event-stream")
            .json(req);
        Ok(EventStream::new(self.send(rb).await?))
    }

    /// A directory listing (`{"entries": [...]}`).
    pub async fn list_files(&self, sandbox: &str, path: &str) -> Result<serde_json::Value> {
        let url = format!(
            "{}?path={}",
            self.url(sandbox, "files/"),
            encode_query(path)
        );
        self.json(self.http.get(url)).await
    }

    /// Downloads a file (streaming response).
    pub async fn get_file(&self, sandbox: &str, path: &str) -> Result<reqwest::Response> {
        let url = self.url(sandbox, &format!("files/{}", encode_path(path)));
        self.send(self.http.get(url)).await
    }

    /// Uploads a file.
    pub async fn put_file(
        &self,
        sandbox: &str,
        path: &str,
        body: impl Into<reqwest::Body>,
    ) -> Result<serde_json::Value> {
        let url = self.url(sandbox, &format!("files/{}", encode_path(path)));
        self.json(self.http.put(url).body(body)).await
    }

    /// Deletes a file or (with `recursive`) a directory.
    pub async fn delete_file(&self, sandbox: &str, path: &str, recursive: bool) -> Result<()> {
        let mut url = self.url(sandbox, &format!("files/{}", encode_path(path)));
        if recursive {
            url.push_str("?recursive=true");
        }
        self.send(self.http.delete(url)).await?;
        Ok(())
    }
}

/// The events of a streaming response.
#[derive(Debug)]
pub struct EventStream {
    resp: reqwest::Response,
    parser: Parser,
    done: bool,
}

impl EventStream {
    fn new(resp: reqwest::Response) -> Self {
        Self {
            resp,
            parser: Parser::default(),
            done: false,
        }
    }

    /// The next event; `Ok(None)` when the stream ended.
    pub async fn next(&mut self) -> Result<Option<Event>> {
        loop {
            if let Some(event) = self.parser.next_event() {
                return Ok(Some(event));
            }
            if self.done {
                return Ok(None);
            }
            // A body that breaks off is a transport failure (resumable), whatever reqwest
            // calls it.
            let chunk = self
                .resp
                .chunk()
                .await
                .map_err(|e| ClientError::Transport(e.to_string()))?;
            match chunk {
                Some(chunk) => self.parser.push(&chunk),
                None => self.done = true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_queries_are_encoded() {
        assert_eq!(
            encode_path("/workspace/a b/é.txt"),
            "workspace/a%20b/%C3%A9.txt"
        );
        assert_eq!(encode_query("a b&c=d"), "a%20b%26c%3Dd");
        let c = Client::runner("http://r:1/", "t");
        assert_eq!(c.url("ignored", "invoke"), "http://r:1/v1/invoke");
        let c = Client::control_plane("http://cp:2", "k");
        assert_eq!(
            c.url("demo", "invoke"),
            "http://cp:2/api/v1/sandboxes/demo/invoke"
        );
        let c = c.with_namespace(Some("team-a".into()));
        assert_eq!(
            c.url("demo", "invoke"),
            "http://cp:2/api/v1/sandboxes/demo.team-a/invoke"
        );
    }
}
