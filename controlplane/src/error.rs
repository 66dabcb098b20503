//! The control plane's one error type; only this module knows HTTP status codes.

use agentbox_proto::ErrorBody;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

/// Everything a control-plane request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No credential, or one that is not valid (401 `unauthorized`).
    #[error("{0}")]
    Unauthorized(String),
    /// The caller may not do this (403 `forbidden`).
    #[error("{0}")]
    Forbidden(String),
    /// No such route (404 `not_found`).
    #[error("no route for {0}")]
    RouteNotFound(String),
    /// An AgentTier route agentbox does not serve (yet) (501 `not_implemented`).
    #[error("{0} is an AgentTier route that agentbox does not serve (see the README's compatibility table)")]
    NotImplemented(String),
    /// Method not allowed (405 `method_not_allowed`).
    #[error("method not allowed")]
    MethodNotAllowed,
    /// No such sandbox, or not visible to the caller (404 `sandbox_not_found`).
    #[error("sandbox {0:?} not found")]
    SandboxNotFound(String),
    /// No such template (404 `template_not_found`).
    #[error("template {0:?} not found")]
    TemplateNotFound(String),
    /// Malformed request (400 `invalid_request`).
    #[error("{0}")]
    InvalidRequest(String),
    /// A port outside 1–65535 (400 `invalid_port`).
    #[error("{0}")]
    InvalidPort(String),
    /// The request body is too large (413 `payload_too_large`).
    #[error("{0}")]
    PayloadTooLarge(String),
    /// configure/invoke on a code-mode sandbox (400 `wrong_mode`).
    #[error("{0}")]
    WrongMode(String),
    /// The sandbox is not Running (409 `sandbox_not_running`).
    #[error("sandbox {name:?} is {status}, not Running")]
    NotRunning {
        /// The sandbox.
        name: String,
        /// Its phase.
        status: &'static str,
    },
    /// The name is taken (409 `already_exists`).
    #[error("sandbox {0:?} already exists")]
    AlreadyExists(String),
    /// A name held in several of the caller's namespaces, none picked (409 `ambiguous_name`).
    #[error(
        "sandbox {name:?} is in namespaces {}: add ?namespace= (or write the id {name}.<namespace>) to pick one",
        namespaces.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ")
    )]
    AmbiguousName {
        /// The name.
        name: String,
        /// The caller's namespaces that hold it.
        namespaces: Vec<String>,
    },
    /// The source sandbox's state does not allow a clone, e.g. a Kubernetes workspace that
    /// is an `emptyDir` (409 `not_cloneable`).
    #[error("{0}")]
    NotCloneable(String),
    /// The runner cannot be reached (502 `runner_unreachable`).
    #[error("the sandbox's runner cannot be reached: {0}")]
    RunnerUnreachable(String),
    /// The runner refused the sandbox's runner token (502 `runner_unauthorized`): the
    /// control plane's record and the runner disagree, which the caller cannot fix.
    #[error(
        "the sandbox's runner refused the control plane's credentials (its runner token changed?)"
    )]
    RunnerUnauthorized,
    /// The sandbox's port connections held by this control plane are at their cap (503
    /// `too_many_tunnels`).
    #[error("{0}")]
    TooManyTunnels(String),
    /// Connecting to the runner timed out (504 `runner_timeout`).
    #[error("connecting to the sandbox's runner timed out")]
    RunnerTimeout,
    /// The backend failed (500 `backend_error`).
    #[error("{0}")]
    Backend(String),
    /// The request breaks a governance policy (403 `policy_violation`, with `violations`).
    #[error("{message}")]
    PolicyViolation {
        /// What was refused.
        message: String,
        /// Every broken limit.
        violations: Vec<crate::governance::Violation>,
    },
    /// The audit log is not a file this control plane can read (404 `audit_unavailable`).
    #[error("{0}")]
    AuditUnavailable(String),
    /// Anything else (500 `internal`).
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::Forbidden(_) | Error::PolicyViolation { .. } => StatusCode::FORBIDDEN,
            Error::RouteNotFound(_)
            | Error::SandboxNotFound(_)
            | Error::TemplateNotFound(_)
            | Error::AuditUnavailable(_) => StatusCode::NOT_FOUND,
            Error::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Error::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            Error::InvalidRequest(_) | Error::WrongMode(_) | Error::InvalidPort(_) => {
                StatusCode::BAD_REQUEST
            }
            Error::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::NotRunning { .. }
            | Error::AlreadyExists(_)
            | Error::AmbiguousName { .. }
            | Error::NotCloneable(_) => StatusCode::CONFLICT,
            Error::RunnerUnreachable(_) | Error::RunnerUnauthorized => StatusCode::BAD_GATEWAY,
            Error::RunnerTimeout => StatusCode::GATEWAY_TIMEOUT,
            Error::TooManyTunnels(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Backend(_) | Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable code.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Unauthorized(_) => "unauthorized",
            Error::Forbidden(_) => "forbidden",
            Error::PolicyViolation { .. } => "policy_violation",
            Error::RouteNotFound(_) => "not_found",
            Error::MethodNotAllowed => "method_not_allowed",
            Error::NotImplemented(_) => "not_implemented",
            Error::SandboxNotFound(_) => "sandbox_not_found",
            Error::TemplateNotFound(_) => "template_not_found",
            Error::InvalidRequest(_) => "invalid_request",
            Error::InvalidPort(_) => "invalid_port",
            Error::WrongMode(_) => "wrong_mode",
            Error::PayloadTooLarge(_) => "payload_too_large",
            Error::NotRunning { .. } => "sandbox_not_running",
            Error::AlreadyExists(_) => "already_exists",
            Error::AmbiguousName { .. } => "ambiguous_name",
            Error::NotCloneable(_) => "not_cloneable",
            Error::RunnerUnreachable(_) => "runner_unreachable",
            Error::RunnerUnauthorized => "runner_unauthorized",
            Error::RunnerTimeout => "runner_timeout",
            Error::TooManyTunnels(_) => "too_many_tunnels",
            Error::Backend(_) => "backend_error",
            Error::AuditUnavailable(_) => "audit_unavailable",
            Error::Internal(_) => "internal",
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
        if matches!(self, Error::Internal(_) | Error::Backend(_)) {
            tracing::error!(error = %self, "request failed");
        }
        if let Error::PolicyViolation {
            message,
            violations,
        } = self
        {
            let body = crate::governance::PolicyViolationBody {
                error: "policy_violation".into(),
                message,
                violations,
            };
            return (StatusCode::FORBIDDEN, Json(body)).into_response();
        }
        let body = ErrorBody {
            error: self.code().to_owned(),
            message: self.to_string(),
            limit: None,
            inflight: None,
        };
        let mut response = (self.status(), Json(body)).into_response();
        if let Error::Unauthorized(_) = self {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_codes() {
        let cases = [
            (Error::Unauthorized("x".into()), 401, "unauthorized"),
            (Error::SandboxNotFound("s".into()), 404, "sandbox_not_found"),
            (Error::WrongMode("m".into()), 400, "wrong_mode"),
            (
                Error::NotRunning {
                    name: "s".into(),
                    status: "Stopped",
                },
                409,
                "sandbox_not_running",
            ),
            (
                Error::RunnerUnreachable("x".into()),
                502,
                "runner_unreachable",
            ),
            (Error::RunnerUnauthorized, 502, "runner_unauthorized"),
            (Error::RunnerTimeout, 504, "runner_timeout"),
            (Error::NotImplemented("x".into()), 501, "not_implemented"),
            (
                Error::AmbiguousName {
                    name: "s".into(),
                    namespaces: vec!["a".into(), "b".into()],
                },
                409,
                "ambiguous_name",
            ),
            (Error::NotCloneable("x".into()), 409, "not_cloneable"),
        ];
        for (e, status, code) in cases {
            assert_eq!(e.status().as_u16(), status);
            assert_eq!(e.code(), code);
        }
    }
}
