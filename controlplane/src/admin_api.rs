//! The platform team's routes: governance policies (`/api/v1/governance/...`), and the
//! governance checks the sandbox routes call. Administrators change policies; a
//! namespace-scoped caller reads only its own namespaces' policies.

use std::sync::Arc;

use agentbox_proto::ErrorBody;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::Uri;
use axum::routing::get;
use axum::{Extension, Json, Router};

use crate::api::now;
use crate::audit::{AuditPage, Filter};
use crate::auth::Identity;
use crate::backend::valid_name;
use crate::credentials::{CredentialList, PutCredentialRequest};
use crate::error::{Error, Result};
use crate::governance::{EffectivePolicy, Policy, PolicySet, Violation, DEFAULT_NAMESPACE};
use crate::{audit, AppState};

/// The routes (authenticated by the caller's layer).
pub(crate) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route(
            "/api/v1/governance/policies",
            get(list_policies).put(replace_policies),
        )
        .route(
            "/api/v1/governance/policies/{namespace}",
            get(get_policy).put(put_policy).delete(delete_policy),
        )
        .route("/api/v1/governance/effective", get(effective_policy))
        .route("/api/v1/audit/events", get(audit_events))
        .route("/api/v1/credentials", get(list_credentials))
        .route(
            "/api/v1/credentials/{name}",
            axum::routing::put(put_credential).delete(delete_credential),
        )
}

/// Records a governance decision on `action` (`allowed`, or `denied` with the broken fields).
pub(crate) fn audit_decision(
    app: &AppState,
    id: &Identity,
    sandbox: Option<&str>,
    namespace: &str,
    action: &str,
    violations: &[Violation],
) {
    let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
    let detail = fields.join(",");
    let (outcome, status) = if violations.is_empty() {
        ("allowed", 200)
    } else {
        ("denied", 403)
    };
    app.audit.write(&audit::Record {
        time: now(),
        actor: &id.sub,
        sandbox,
        namespace: Some(namespace),
        action: &format!("governance.{action}"),
        outcome,
        status,
        detail: (!detail.is_empty()).then_some(detail.as_str()),
        ..Default::default()
    });
}

/// The query an invoke goes to the runner with: `?timeout=` clamped to the namespace's
/// `maxTimeout` (set to it when absent).
pub(crate) fn govern_invoke(
    app: &AppState,
    id: &Identity,
    sandbox: &str,
    namespace: &str,
    query: Option<&str>,
) -> Result<Option<String>> {
    let effective = app.governance.effective(namespace)?;
    if effective.source.is_none() {
        return Ok(query.map(str::to_owned));
    }
    let pairs: Vec<&str> = query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .collect();
    let requested = pairs.iter().find_map(|p| p.strip_prefix("timeout="));
    let clamped = effective.policy.clamp_timeout(requested);
    let (outcome, detail) = match &clamped {
        Some(_) => ("clamped", Some("maxTimeout")),
        None => ("allowed", None),
    };
    app.audit.write(&audit::Record {
        time: now(),
        actor: &id.sub,
        sandbox: Some(sandbox),
        namespace: Some(namespace),
        action: "governance.invoke",
        outcome,
        status: 200,
        detail,
        ..Default::default()
    });
    let Some(timeout) = clamped else {
        return Ok(query.map(str::to_owned));
    };
    let mut out: Vec<String> = pairs
        .into_iter()
        .filter(|p| !p.starts_with("timeout="))
        .map(str::to_owned)
        .collect();
    out.push(format!("timeout={timeout}"));
    Ok(Some(out.join("&")))
}

/// `maxConcurrentInvokesPerSandbox` for a sandbox started before the policy (whose runner's
/// own cap is higher): the runner's count of running invokes (`GET /v1/info`, one request,
/// only when the namespace's policy sets the field) is checked against the policy, and an
/// invoke that would pass it is refused (403 `policy_violation`). A sandbox created or
/// resumed under the policy has the cap in its runner, which refuses exactly (429); this
/// check is exact but for invokes racing between it and their start.
pub(crate) async fn govern_concurrency(
    app: &AppState,
    id: &Identity,
    sandbox: &str,
    target: &crate::backend::Target,
) -> Result<()> {
    let effective = app.governance.effective(&target.namespace)?;
    let Some(cap) = effective.policy.max_concurrent_invokes_per_sandbox else {
        return Ok(());
    };
    use http_body_util::BodyExt;
    let request = axum::http::Request::get("/v1/info")
        .body(Body::empty())
        .map_err(|e| Error::Internal(e.to_string()))?;
    let response = app
        .proxy
        .forward(target, "/v1/info", request, false)
        .await?;
    if !response.status().is_success() {
        return Err(Error::RunnerUnreachable(format!(
            "GET /v1/info answered {}",
            response.status()
        )));
    }
    let body = http_body_util::Limited::new(response.into_body(), 64 << 10)
        .collect()
        .await
        .map_err(|e| Error::RunnerUnreachable(e.to_string()))?
        .to_bytes();
    let info: agentbox_proto::Info = serde_json::from_slice(&body)
        .map_err(|e| Error::RunnerUnreachable(format!("a bad /v1/info: {e}")))?;
    if info.limits.max_concurrent_invokes <= u64::from(cap) || info.inflight < u64::from(cap) {
        return Ok(());
    }
    let violations = vec![Violation {
        field: "maxConcurrentInvokesPerSandbox".into(),
        limit: cap.into(),
        actual: (info.inflight + 1).into(),
    }];
    audit_decision(
        app,
        id,
        Some(sandbox),
        &target.namespace,
        "invoke",
        &violations,
    );
    Err(Error::PolicyViolation {
        message: format!(
            "sandbox {sandbox:?} runs {} invokes; its namespace's policy allows {cap} at once",
            info.inflight
        ),
        violations,
    })
}

/// An exec's body with its `timeout` clamped to the namespace's `maxTimeout` (set to it when
/// absent). The body is read (at most 1 MiB) only when such a policy applies.
pub(crate) async fn govern_exec(
    app: &AppState,
    id: &Identity,
    sandbox: &str,
    namespace: &str,
    request: axum::extract::Request,
) -> Result<axum::extract::Request> {
    let effective = app.governance.effective(namespace)?;
    let Some(max_text) = effective.policy.max_timeout.clone() else {
        return Ok(request);
    };
    let max = crate::governance::parse_go_duration(&max_text)
        .map_err(|e| Error::Internal(format!("maxTimeout: {e}")))?;
    let (mut parts, body) = request.into_parts();
    let bytes = crate::api::read_limited(body, 1 << 20)
        .await?
        .ok_or_else(|| Error::PayloadTooLarge("an exec request is at most 1 MiB".into()))?;
    let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        // Not JSON: the runner refuses it as it is.
        return Ok(axum::extract::Request::from_parts(parts, Body::from(bytes)));
    };
    // None: no timeout; Some(None): one the runner will refuse as malformed.
    let requested = match value.get("timeout") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Number(n)) => Some(
            n.as_f64()
                .and_then(|s| std::time::Duration::try_from_secs_f64(s).ok()),
        ),
        Some(serde_json::Value::String(s)) => Some(crate::governance::parse_go_duration(s).ok()),
        Some(_) => Some(None),
    };
    let over = match requested {
        None => true,
        Some(Some(d)) => d > max,
        Some(None) => false,
    };
    let outcome = if over { "clamped" } else { "allowed" };
    app.audit.write(&audit::Record {
        time: now(),
        actor: &id.sub,
        sandbox: Some(sandbox),
        namespace: Some(namespace),
        action: "governance.exec",
        outcome,
        status: 200,
        detail: over.then_some("maxTimeout"),
        ..Default::default()
    });
    if over {
        if let Some(object) = value.as_object_mut() {
            object.insert("timeout".into(), serde_json::json!(max.as_secs_f64()));
        }
    }
    let bytes = serde_json::to_vec(&value).map_err(|e| Error::Internal(e.to_string()))?;
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    parts.headers.remove(axum::http::header::TRANSFER_ENCODING);
    Ok(axum::extract::Request::from_parts(parts, Body::from(bytes)))
}

fn require_admin(id: &Identity) -> Result<()> {
    if id.admin {
        Ok(())
    } else {
        Err(Error::Forbidden(
            "only administrators may change governance policies".into(),
        ))
    }
}

fn check_namespace(namespace: &str) -> Result<()> {
    if namespace == DEFAULT_NAMESPACE || valid_name(namespace) {
        Ok(())
    } else {
        Err(Error::InvalidRequest(format!(
            "namespace {namespace:?} must be a DNS label or \"*\""
        )))
    }
}

async fn read_json<T: serde::de::DeserializeOwned>(body: Body, what: &str) -> Result<T> {
    let bytes = crate::api::read_limited(body, 1 << 20)
        .await?
        .ok_or_else(|| Error::PayloadTooLarge(format!("{what} is at most 1 MiB")))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::InvalidRequest(format!("the body is not {what}: {e}")))
}

/// Every policy
///
/// Administrators see every namespace's; others only those of their namespaces (and `*`).
#[utoipa::path(get, path = "/api/v1/governance/policies", tag = "governance",
    responses((status = 200, description = "`{\"policies\": {namespace: policy}}`; `*` applies to namespaces without their own.", body = PolicySet),
        (status = 401, description = "`unauthorized`.", body = ErrorBody)))]
pub(crate) async fn list_policies(
    State(app): State<Arc<AppState>>,
    Extension(id): Extension<Identity>,
) -> Result<Json<PolicySet>> {
    let mut set = app.governance.all()?;
    set.policies
        .retain(|ns, _| ns == DEFAULT_NAMESPACE || id.can_use(ns));
    Ok(Json(set))
}

/// Replace every policy (administrators)
#[utoipa::path(put, path = "/api/v1/governance/policies", tag = "governance",
    request_body(content = PolicySet, content_type = "application/json"),
    responses((status = 200, description = "The stored policies.", body = PolicySet),
        (status = 400, description = "`invalid_request`: not a policy set, an unknown field, a bad value.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`: not an administrator.", body = ErrorBody)))]
pub(crate) async fn replace_policies(
    State(app): State<Arc<AppState>>,
    Extension(id): Extension<Identity>,
    body: Body,
) -> Result<Json<PolicySet>> {
    let result = async {
        require_admin(&id)?;
        let set: PolicySet = read_json(body, "a policy set").await?;
        for (ns, p) in &set.policies {
            check_namespace(ns)?;
            p.validate()
                .map_err(|e| Error::InvalidRequest(format!("{ns}: {e}")))?;
        }
        app.governance
            .update(move |current| {
                current.clone_from(&set);
                Ok(())
            })
            .await
    }
    .await;
    audit_change(&app, &id, None, "governance.policies.put", &result);
    Ok(Json(result?))
}

fn audit_change<T>(
    app: &AppState,
    id: &Identity,
    namespace: Option<&str>,
    action: &str,
    result: &Result<T>,
) {
    let (outcome, status) = match result {
        Ok(_) => ("ok", 200),
        Err(e) if e.status().as_u16() == 403 => ("denied", 403),
        Err(e) => ("error", e.status().as_u16()),
    };
    app.audit.write(&audit::Record {
        time: now(),
        actor: &id.sub,
        sandbox: None,
        namespace,
        action,
        outcome,
        status,
        detail: None,
        ..Default::default()
    });
}

/// One namespace's policy
#[utoipa::path(get, path = "/api/v1/governance/policies/{namespace}", tag = "governance",
    params(("namespace" = String, Path, description = "A namespace, or `*`.")),
    responses((status = 200, description = "The policy.", body = Policy),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`not_found`: no policy for it, or a namespace the caller may not use.", body = ErrorBody)))]
pub(crate) async fn get_policy(
    State(app): State<Arc<AppState>>,
    Extension(id): Extension<Identity>,
    Path(namespace): Path<String>,
) -> Result<Json<Policy>> {
    let not_found = || Error::RouteNotFound(format!("a policy for namespace {namespace:?}"));
    if namespace != DEFAULT_NAMESPACE && !id.can_use(&namespace) {
        return Err(not_found());
    }
    app.governance
        .all()?
        .policies
        .remove(&namespace)
        .map(Json)
        .ok_or_else(not_found)
}

/// Set one namespace's policy (administrators)
#[utoipa::path(put, path = "/api/v1/governance/policies/{namespace}", tag = "governance",
    params(("namespace" = String, Path, description = "A namespace, or `*` for every namespace without its own.")),
    request_body(content = Policy, content_type = "application/json"),
    responses((status = 200, description = "The stored policy.", body = Policy),
        (status = 400, description = "`invalid_request`: a bad namespace, an unknown field, a bad value.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`: not an administrator.", body = ErrorBody)))]
pub(crate) async fn put_policy(
    State(app): State<Arc<AppState>>,
    Extension(id): Extension<Identity>,
    Path(namespace): Path<String>,
    body: Body,
) -> Result<Json<Policy>> {
    let ns = namespace.clone();
    let result = async {
        require_admin(&id)?;
        check_namespace(&namespace)?;
        let policy: Policy = read_json(body, "a policy").await?;
        policy.validate().map_err(Error::InvalidRequest)?;
        let stored = policy.clone();
        app.governance
            .update(move |set| {
                set.policies.insert(ns.clone(), stored.clone());
                Ok(())
            })
            .await?;
        Ok(policy)
    }
    .await;
    audit_change(
        &app,
        &id,
        Some(&namespace),
        "governance.policy.put",
        &result,
    );
    Ok(Json(result?))
}

/// Remove one namespace's policy (administrators)
#[utoipa::path(delete, path = "/api/v1/governance/policies/{namespace}", tag = "governance",
    params(("namespace" = String, Path, description = "A namespace, or `*`.")),
    responses((status = 204, description = "Removed."),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`: not an administrator.", body = ErrorBody),
        (status = 404, description = "`not_found`: no policy for it.", body = ErrorBody)))]
pub(crate) async fn delete_policy(
    State(app): State<Arc<AppState>>,
    Extension(id): Extension<Identity>,
    Path(namespace): Path<String>,
) -> Result<axum::http::StatusCode> {
    let ns = namespace.clone();
    let result = async {
        require_admin(&id)?;
        app.governance
            .update(move |set| match set.policies.remove(&ns) {
                Some(_) => Ok(()),
                None => Err(Error::RouteNotFound(format!(
                    "a policy for namespace {ns:?}"
                ))),
            })
            .await
    }
    .await;
    audit_change(
        &app,
        &id,
        Some(&namespace),
        "governance.policy.delete",
        &result,
    );
    result?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// The caller's effective policy
#[utoipa::path(get, path = "/api/v1/governance/effective", tag = "governance",
    params(("namespace" = Option<String>, Query, description = "Default: the caller's first namespace, or `default`.")),
    responses((status = 200, description = "The policy that applies there, and where it comes from.", body = EffectivePolicy),
        (status = 400, description = "`invalid_request`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`: a namespace the caller may not use.", body = ErrorBody)))]
pub(crate) async fn effective_policy(
    State(app): State<Arc<AppState>>,
    Extension(id): Extension<Identity>,
    uri: Uri,
) -> Result<Json<EffectivePolicy>> {
    let namespace = requested_namespace(&id, &uri)?;
    Ok(Json(app.governance.effective(&namespace)?))
}

/// A time in a query: RFC 3339, or a Go duration meaning that long ago (`1h`).
fn parse_time(field: &str, text: &str) -> Result<std::time::SystemTime> {
    if let Ok(t) = humantime::parse_rfc3339_weak(text) {
        return Ok(t);
    }
    crate::governance::parse_go_duration(text)
        .ok()
        .and_then(|d| std::time::SystemTime::now().checked_sub(d))
        .ok_or_else(|| {
            Error::InvalidRequest(format!(
                "{field} {text:?} must be an RFC 3339 time or a duration such as \"1h\""
            ))
        })
}

/// The audit trail
///
/// Newest first, from this control plane's audit log (`--audit-log`, shared by replicas that
/// share the state directory). Administrators see every record; others only records of
/// their namespaces. Records hold no argv, stdin, bodies or secrets.
#[utoipa::path(get, path = "/api/v1/audit/events", tag = "audit",
    params(("sandbox" = Option<String>, Query, description = "Only this sandbox."),
        ("actor" = Option<String>, Query, description = "Only this caller (an API key's name, a token's subject)."),
        ("action" = Option<String>, Query, description = "Only this action; a trailing `*` matches any rest (`governance.*`)."),
        ("outcome" = Option<String>, Query, description = "Only this outcome: `ok`, `error`, `denied`, `allowed`, `clamped`, ..."),
        ("since" = Option<String>, Query, description = "At or after: RFC 3339, or a duration meaning that long ago (`1h`)."),
        ("until" = Option<String>, Query, description = "Before: RFC 3339, or a duration ago."),
        ("limit" = Option<u32>, Query, description = "At most this many (1 to 1000, default 100)."),
        ("cursor" = Option<String>, Query, description = "`nextCursor` of the previous page.")),
    responses((status = 200, description = "A page; `nextCursor` when older records may follow (one request reads at most 32 MiB of the log, so a page can be short and still have one).", body = AuditPage),
        (status = 400, description = "`invalid_request`: a bad time, limit or cursor.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`audit_unavailable`: the audit log goes to stderr (`--audit-log -`).", body = ErrorBody)))]
pub(crate) async fn audit_events(
    State(app): State<Arc<AppState>>,
    Extension(id): Extension<Identity>,
    uri: Uri,
) -> Result<Json<AuditPage>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Q {
        sandbox: Option<String>,
        actor: Option<String>,
        action: Option<String>,
        outcome: Option<String>,
        since: Option<String>,
        until: Option<String>,
        limit: Option<usize>,
        cursor: Option<String>,
    }
    let q: Q = axum::extract::Query::try_from_uri(&uri)
        .map(|q| q.0)
        .map_err(|e| Error::InvalidRequest(e.body_text()))?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(Error::InvalidRequest(format!(
            "limit {limit} must be from 1 to 1000"
        )));
    }
    let filter = Filter {
        sandbox: q.sandbox,
        actor: q.actor,
        action: q.action,
        outcome: q.outcome,
        since: q
            .since
            .as_deref()
            .map(|t| parse_time("since", t))
            .transpose()?,
        until: q
            .until
            .as_deref()
            .map(|t| parse_time("until", t))
            .transpose()?,
        namespaces: if id.admin {
            None
        } else {
            // `*`: any namespace (still not the records without one).
            Some(id.namespaces.clone().unwrap_or_else(|| vec!["*".into()]))
        },
    };
    let path = app.cfg.audit_log.clone().ok_or_else(|| {
        Error::AuditUnavailable(
            "the audit log goes to stderr (--audit-log -): there is nothing to query here".into(),
        )
    })?;
    let cursor = q.cursor;
    let page =
        tokio::task::spawn_blocking(move || audit::query(&path, &filter, cursor.as_deref(), limit))
            .await
            .map_err(|e| Error::Internal(format!("a blocking task failed: {e}")))?;
    match page {
        Ok(page) => Ok(Json(page)),
        Err(Ok(message)) => Err(Error::InvalidRequest(message)),
        Err(Err(e)) => Err(e.into()),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NamespaceQuery {
    namespace: Option<String>,
}

/// The namespace a credential or effective-policy request names: `?namespace=`, else the
/// caller's first; one the caller may use.
fn requested_namespace(id: &Identity, uri: &Uri) -> Result<String> {
    let q: NamespaceQuery = axum::extract::Query::try_from_uri(uri)
        .map(|q| q.0)
        .map_err(|e| Error::InvalidRequest(e.body_text()))?;
    let namespace = q.namespace.unwrap_or_else(|| id.default_namespace());
    if !valid_name(&namespace) {
        return Err(Error::InvalidRequest(format!(
            "namespace {namespace:?} is not a DNS label"
        )));
    }
    if !id.can_use(&namespace) {
        return Err(Error::Forbidden(format!(
            "you may not use namespace {namespace:?}"
        )));
    }
    Ok(namespace)
}

fn audit_credential<T>(
    app: &AppState,
    id: &Identity,
    namespace: Option<&str>,
    action: &str,
    name: &str,
    result: &Result<T>,
) {
    let (outcome, status) = match result {
        Ok(_) => ("ok", 200),
        Err(e) if e.status().as_u16() == 403 => ("denied", 403),
        Err(e) => ("error", e.status().as_u16()),
    };
    app.audit.write(&audit::Record {
        time: now(),
        actor: &id.sub,
        sandbox: None,
        namespace,
        action,
        outcome,
        status,
        detail: Some(name),
        ..Default::default()
    });
}

/// Credential names
///
/// Names, namespaces and times only: no read API returns a value.
#[utoipa::path(get, path = "/api/v1/credentials", tag = "credentials",
    params(("namespace" = Option<String>, Query, description = "Only this namespace (default: every namespace the caller may use).")),
    responses((status = 200, description = "The credentials' names.", body = CredentialList),
        (status = 400, description = "`invalid_request`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`: a namespace the caller may not use.", body = ErrorBody)))]
pub(crate) async fn list_credentials(
    State(app): State<Arc<AppState>>,
    Extension(id): Extension<Identity>,
    uri: Uri,
) -> Result<Json<CredentialList>> {
    let only = if uri.query().is_some_and(|q| q.contains("namespace=")) {
        Some(requested_namespace(&id, &uri)?)
    } else {
        None
    };
    let credentials = app
        .credentials
        .list(|ns| id.can_use(ns) && only.as_deref().is_none_or(|o| o == ns))?;
    Ok(Json(CredentialList { credentials }))
}

/// Set a credential
///
/// Administrators, or callers of the namespace. The value is never returned, logged or
/// audited; sandboxes referencing it get the new value at their next start (create, resume).
#[utoipa::path(put, path = "/api/v1/credentials/{name}", tag = "credentials",
    params(("name" = String, Path, description = "A DNS label."),
        ("namespace" = Option<String>, Query, description = "Default: the caller's first namespace, or `default`.")),
    request_body(content = PutCredentialRequest, content_type = "application/json"),
    responses((status = 204, description = "Stored; sandboxes referencing it (local, Docker) see the new value at their next invoke."),
        (status = 400, description = "`invalid_request`: a bad name, body or value (text of at most 64 KiB; at most 256 per namespace).", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`: a namespace the caller may not use.", body = ErrorBody)))]
pub(crate) async fn put_credential(
    State(app): State<Arc<AppState>>,
    Extension(id): Extension<Identity>,
    Path(name): Path<String>,
    uri: Uri,
    body: Body,
) -> Result<axum::http::StatusCode> {
    let namespace = match requested_namespace(&id, &uri) {
        Ok(ns) => ns,
        Err(e) => {
            let refused: Result<()> = Err(e);
            audit_credential(&app, &id, None, "credentials.put", &name, &refused);
            return refused.map(|()| axum::http::StatusCode::NO_CONTENT);
        }
    };
    let result = async {
        let bytes = crate::api::read_limited(body, 128 << 10)
            .await?
            .ok_or_else(|| Error::PayloadTooLarge("a credential is at most 64 KiB".into()))?;
        // The error never quotes the body: it may be the secret.
        let req: PutCredentialRequest = serde_json::from_slice(&bytes).map_err(|_| {
            Error::InvalidRequest("the body must be {\"value\": \"<text>\"}".into())
        })?;
        app.credentials.put(&namespace, &name, req.value).await
    }
    .await;
    audit_credential(
        &app,
        &id,
        Some(&namespace),
        "credentials.put",
        &name,
        &result,
    );
    result?;
    reach_sandboxes(&app, &namespace, &name).await;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// Delete a credential
#[utoipa::path(delete, path = "/api/v1/credentials/{name}", tag = "credentials",
    params(("name" = String, Path, description = "The name."),
        ("namespace" = Option<String>, Query, description = "Default: the caller's first namespace, or `default`.")),
    responses((status = 204, description = "Deleted; running sandboxes referencing it (local, Docker) no longer see it from their next invoke, and fail to start until it exists again."),
        (status = 400, description = "`invalid_request`: a bad name or namespace.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`: a namespace the caller may not use.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such credential.", body = ErrorBody)))]
pub(crate) async fn delete_credential(
    State(app): State<Arc<AppState>>,
    Extension(id): Extension<Identity>,
    Path(name): Path<String>,
    uri: Uri,
) -> Result<axum::http::StatusCode> {
    let result = match requested_namespace(&id, &uri) {
        Err(e) => Err(e),
        Ok(ns) => match app.credentials.delete(&ns, &name).await {
            Ok(true) => Ok(ns),
            Ok(false) => Err(Error::RouteNotFound(format!("credential {name:?}"))),
            Err(e) => Err(e),
        },
    };
    let ns = result.as_ref().ok().cloned();
    audit_credential(
        &app,
        &id,
        ns.as_deref(),
        "credentials.delete",
        &name,
        &result,
    );
    let ns = result?;
    reach_sandboxes(&app, &ns, &name).await;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// A rotation (or deletion) reaches the sandboxes that reference the credential by their next
/// invoke ([`crate::backend::Backend::credentials_changed`]). The store changed either way: a
/// sandbox that could not be reached is logged (by name only) and gets the value at its next
/// start.
async fn reach_sandboxes(app: &AppState, namespace: &str, name: &str) {
    if let Err(e) = app.backend.credentials_changed(namespace, name).await {
        tracing::warn!(namespace, credential = name, "rotation not delivered: {e}");
    }
}
