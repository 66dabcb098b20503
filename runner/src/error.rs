//! The runner's one error type. Only this module knows HTTP status codes: domain code returns
//! [`Error`], and the edge turns it into `{"error": "<code>", "message": "..."}`.

use agentbox_proto::ErrorBody;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

/// Everything a runner request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No or wrong bearer token (401 `unauthorized`).
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// No such route (404 `not_found`).
    #[error("no route for {0}")]
    RouteNotFound(String),
    /// The route exists but not for this method (405 `method_not_allowed`).
    #[error("method not allowed")]
    MethodNotAllowed,
    /// No such invoke, or it has already finished where a running one is needed (404 `invoke_not_found`).
    #[error("{0}")]
    InvokeNotFound(String),
    /// The body or query is malformed (400 `invalid_request`).
    #[error("{0}")]
    InvalidRequest(String),
    /// A path leaves the workspace, holds a NUL byte, or is otherwise unusable (400 `invalid_path`).
    #[error("{0}")]
    InvalidPath(String),
    /// `?timeout=` is not a Go duration (400 `invalid_timeout`).
    #[error("{0}")]
    InvalidTimeout(String),
    /// configure/invoke on a code-mode runner (400 `wrong_mode`).
    #[error("{0}")]
    WrongMode(String),
    /// A size or count limit was exceeded (413 `payload_too_large`).
    #[error("{0}")]
    PayloadTooLarge(String),
    /// Invoke before a successful configure (424 `not_configured`).
    #[error("no entrypoint is configured: POST /v1/configure first")]
    NotConfigured,
    /// The configured ACP agent could not be started or initialized (424 `agent_failed`): the
    /// configuration, not the request, is at fault.
    #[error("{0}")]
    AgentFailed(String),
    /// Over the concurrency cap (429 `concurrency_exceeded`, `Retry-After: 5`).
    #[error("{inflight} invokes are running, the limit is {limit}; retry later")]
    ConcurrencyExceeded {
        /// The cap.
        limit: u64,
        /// Running invokes.
        inflight: u64,
    },
    /// No such file or directory in the workspace (404 `file_not_found`).
    #[error("{0} does not exist")]
    FileNotFound(String),
    /// A directory was expected (400 `not_a_directory`).
    #[error("{0} is not a directory")]
    NotADirectory(String),
    /// A file was expected (400 `is_a_directory`).
    #[error("{0} is a directory; list it with GET /v1/files?path=")]
    IsADirectory(String),
    /// Deleting a non-empty directory without `?recursive=true` (409 `directory_not_empty`).
    #[error("{0} is not empty; pass ?recursive=true to delete it with its content")]
    DirectoryNotEmpty(String),
    /// The `Range` header asks for bytes past the end (416 `range_not_satisfiable`).
    #[error("the requested range is not inside the file ({0} bytes)")]
    RangeNotSatisfiable(u64),
    /// The install command could not be started (422 `install_failed`).
    #[error("{0}")]
    InstallFailed(String),
    /// No such session (404 `session_not_found`).
    #[error("{0}")]
    SessionNotFound(String),
    /// A session id that is not `[A-Za-z0-9._-]{{1,128}}` (400 `invalid_session_id`).
    #[error("{0}")]
    InvalidSessionId(String),
    /// Creating a session whose id is taken (409 `session_exists`).
    #[error("{0}")]
    SessionExists(String),
    /// The session already runs an invoke (409 `session_busy`).
    #[error("{0}")]
    SessionBusy(String),
    /// No such pending permission request (404 `permission_not_found`).
    #[error("{0}")]
    PermissionNotFound(String),
    /// The permission request was already answered (409 `permission_answered`).
    #[error("{0}")]
    PermissionAnswered(String),
    /// A port outside 1–65535 (400 `invalid_port`).
    #[error("{0}")]
    InvalidPort(String),
    /// A port that is not forwarded (404 `port_not_forwarded`).
    #[error("{0}")]
    PortNotForwarded(String),
    /// Nothing listens on a forwarded port (502 `port_unreachable`).
    #[error("{0}")]
    PortUnreachable(String),
    /// Forwarding a port past the cap (409 `too_many_ports`).
    #[error("{0}")]
    TooManyPorts(String),
    /// Opening a tunnel past the cap (503 `too_many_tunnels`).
    #[error("{0}")]
    TooManyTunnels(String),
    /// No such process (404 `process_not_found`).
    #[error("{0}")]
    ProcessNotFound(String),
    /// The process has exited, or its stdin is closed (409 `process_exited`).
    #[error("{0}")]
    ProcessExited(String),
    /// Resize of a process without a pseudo-terminal (400 `not_a_terminal`).
    #[error("{0}")]
    NotATerminal(String),
    /// An I/O failure on the runner's side (500 `internal`).
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// The HTTP status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::Unauthorized => StatusCode::UNAUTHORIZED,
            Error::SessionNotFound(_) | Error::PermissionNotFound(_) => StatusCode::NOT_FOUND,
            Error::InvalidSessionId(_) => StatusCode::BAD_REQUEST,
            Error::SessionExists(_) | Error::SessionBusy(_) | Error::PermissionAnswered(_) => {
                StatusCode::CONFLICT
            }
            Error::RouteNotFound(_) | Error::InvokeNotFound(_) | Error::FileNotFound(_) => {
                StatusCode::NOT_FOUND
            }
            Error::NotADirectory(_) | Error::IsADirectory(_) => StatusCode::BAD_REQUEST,
            Error::DirectoryNotEmpty(_) | Error::ProcessExited(_) => StatusCode::CONFLICT,
            Error::ProcessNotFound(_) => StatusCode::NOT_FOUND,
            Error::NotATerminal(_) => StatusCode::BAD_REQUEST,
            Error::RangeNotSatisfiable(_) => StatusCode::RANGE_NOT_SATISFIABLE,
            Error::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Error::InvalidRequest(_)
            | Error::InvalidPath(_)
            | Error::InvalidTimeout(_)
            | Error::WrongMode(_) => StatusCode::BAD_REQUEST,
            Error::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::NotConfigured | Error::AgentFailed(_) => StatusCode::FAILED_DEPENDENCY,
            Error::ConcurrencyExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::InstallFailed(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Error::InvalidPort(_) => StatusCode::BAD_REQUEST,
            Error::PortNotForwarded(_) => StatusCode::NOT_FOUND,
            Error::PortUnreachable(_) => StatusCode::BAD_GATEWAY,
            Error::TooManyPorts(_) => StatusCode::CONFLICT,
            Error::TooManyTunnels(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code for this error.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Unauthorized => "unauthorized",
            Error::RouteNotFound(_) => "not_found",
            Error::MethodNotAllowed => "method_not_allowed",
            Error::InvokeNotFound(_) => "invoke_not_found",
            Error::ProcessNotFound(_) => "process_not_found",
            Error::ProcessExited(_) => "process_exited",
            Error::NotATerminal(_) => "not_a_terminal",
            Error::InvalidRequest(_) => "invalid_request",
            Error::InvalidPath(_) => "invalid_path",
            Error::InvalidTimeout(_) => "invalid_timeout",
            Error::WrongMode(_) => "wrong_mode",
            Error::PayloadTooLarge(_) => "payload_too_large",
            Error::NotConfigured => "not_configured",
            Error::AgentFailed(_) => "agent_failed",
            Error::ConcurrencyExceeded { .. } => "concurrency_exceeded",
            Error::InstallFailed(_) => "install_failed",
            Error::FileNotFound(_) => "file_not_found",
            Error::NotADirectory(_) => "not_a_directory",
            Error::IsADirectory(_) => "is_a_directory",
            Error::DirectoryNotEmpty(_) => "directory_not_empty",
            Error::RangeNotSatisfiable(_) => "range_not_satisfiable",
            Error::SessionNotFound(_) => "session_not_found",
            Error::InvalidSessionId(_) => "invalid_session_id",
            Error::SessionExists(_) => "session_exists",
            Error::SessionBusy(_) => "session_busy",
            Error::PermissionNotFound(_) => "permission_not_found",
            Error::PermissionAnswered(_) => "permission_answered",
            Error::InvalidPort(_) => "invalid_port",
            Error::PortNotForwarded(_) => "port_not_forwarded",
            Error::PortUnreachable(_) => "port_unreachable",
            Error::TooManyPorts(_) => "too_many_ports",
            Error::TooManyTunnels(_) => "too_many_tunnels",
            Error::Internal(_) => "internal",
        }
    }

    /// The JSON body for this error.
    pub fn body(&self) -> ErrorBody {
        let (limit, inflight) = match self {
            Error::ConcurrencyExceeded { limit, inflight } => (Some(*limit), Some(*inflight)),
            _ => (None, None),
        };
        ErrorBody {
            error: self.code().to_owned(),
            message: self.to_string(),
            limit,
            inflight,
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Internal(e.to_string())
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        if let Error::Internal(message) = &self {
            tracing::error!(%message, "internal error");
        }
        let mut response = (self.status(), Json(self.body())).into_response();
        match self {
            Error::ConcurrencyExceeded { .. } => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            Error::Unauthorized => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Error::RangeNotSatisfiable(len) => {
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                    response.headers_mut().insert(header::CONTENT_RANGE, v);
                }
            }
            _ => {}
        }
        response
    }
}

/// Result alias for runner operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_a_status_and_code() {
        let cases = [
            (Error::Unauthorized, 401, "unauthorized"),
            (Error::RouteNotFound("/x".into()), 404, "not_found"),
            (Error::InvokeNotFound("x".into()), 404, "invoke_not_found"),
            (Error::MethodNotAllowed, 405, "method_not_allowed"),
            (Error::InvalidPath("p".into()), 400, "invalid_path"),
            (Error::WrongMode("m".into()), 400, "wrong_mode"),
            (Error::PayloadTooLarge("p".into()), 413, "payload_too_large"),
            (Error::NotConfigured, 424, "not_configured"),
            (Error::AgentFailed("a".into()), 424, "agent_failed"),
            (
                Error::ConcurrencyExceeded {
                    limit: 2,
                    inflight: 2,
                },
                429,
                "concurrency_exceeded",
            ),
            (Error::FileNotFound("f".into()), 404, "file_not_found"),
            (
                Error::DirectoryNotEmpty("d".into()),
                409,
                "directory_not_empty",
            ),
            (Error::RangeNotSatisfiable(3), 416, "range_not_satisfiable"),
            (Error::Internal("x".into()), 500, "internal"),
            (Error::SessionNotFound("s".into()), 404, "session_not_found"),
            (
                Error::InvalidSessionId("s".into()),
                400,
                "invalid_session_id",
            ),
            (Error::SessionExists("s".into()), 409, "session_exists"),
            (Error::SessionBusy("s".into()), 409, "session_busy"),
            (
                Error::PermissionNotFound("p".into()),
                404,
                "permission_not_found",
            ),
            (
                Error::PermissionAnswered("p".into()),
                409,
                "permission_answered",
            ),
        ];
        for (err, status, code) in cases {
            assert_eq!(err.status().as_u16(), status, "{err:?}");
            assert_eq!(err.code(), code);
        }
    }

    #[test]
    fn concurrency_body_carries_limit_and_inflight() {
        let body = Error::ConcurrencyExceeded {
            limit: 3,
            inflight: 3,
        }
        .body();
        let json = serde_json::to_value(&body).expect("encode");
        assert_eq!(json["error"], "concurrency_exceeded");
        assert_eq!(json["limit"], 3);
        assert_eq!(json["inflight"], 3);
    }
}
