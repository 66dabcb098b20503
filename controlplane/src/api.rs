//! The HTTP edge of the control plane: the seed's REST surface under `/api/v1`, and the
//! per-sandbox routes passed through to the sandbox's runner. Checks run in this order: 401
//! unauthenticated; 404 sandbox unknown or not visible; 400 configure/invoke on a code-mode
//! sandbox; 409 not Running (one stopped for being idle is resumed instead); then the runner
//! answers.

use std::sync::Arc;
use std::time::Instant;

use agentbox_proto::{
    CreateSandboxRequest, CreatedBy, ErrorBody, Health, SandboxList, SandboxStatus, SandboxSummary,
    TemplateInfo, TemplateList, UserInfo,
};
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Deserialize;

use crate::auth::Identity;
use crate::backend::{
    display_name, sandbox_key, valid_name, CreateSpec, Target, DEFAULT_NAMESPACE,
};
use crate::error::{Error, Result};
use crate::governance::PolicyViolationBody;
use crate::metrics::{self, Kind};
use crate::{audit, otel, AppState};

/// Serves the control plane on an already-bound listener until `shutdown` resolves, with the
/// connection cap and timeouts of `--max-connections`, `--header-read-timeout` and
/// `--idle-timeout` (`agentbox_serve`).
pub async fn serve<L: agentbox_serve::Listener>(
    listener: L,
    app: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    let limits = app.cfg.limits;
    // Refused credentials are aggregated per second; write a finished window's count.
    let flusher = {
        let app = Arc::clone(&app);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(audit::DENIED_WINDOW);
            loop {
                tick.tick().await;
                app.audit.flush_denied(false);
            }
        })
    };
    // Idle stops and lifetime ends, and warm pools, for as long as this control plane serves.
    let sweeper = tokio::spawn(crate::lifecycle::run(Arc::clone(&app)));
    let pools = tokio::spawn(crate::lifecycle::run_pools(Arc::clone(&app)));
    let router = router(Arc::clone(&app));
    let served =
        agentbox_serve::serve(listener, router, builder, limits, "control plane", shutdown).await;
    flusher.abort();
    sweeper.abort();
    pools.abort();
    app.audit.flush_denied(true);
    served
}

/// Routes of the control plane.
pub fn router(app: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/api/v1/user/me", get(user_me))
        .route("/api/v1/templates", get(list_templates))
        .route("/api/v1/templates/{name}", get(get_template))
        .route(
            "/api/v1/sandboxes",
            post(create_sandbox).get(list_sandboxes),
        )
        .route(
            "/api/v1/sandboxes/{id}",
            get(get_sandbox).delete(delete_sandbox),
        )
        .route("/api/v1/sandboxes/{id}/stop", post(stop_sandbox))
        .route("/api/v1/sandboxes/{id}/resume", post(resume_sandbox))
        .route(
            "/api/v1/warmpool/status",
            get(crate::lifecycle::warm_pool_status),
        )
        .route(
            "/api/v1/sandboxes/{id}/clone",
            post(crate::lifecycle::clone_sandbox),
        )
        .route(
            "/api/v1/sandboxes/{id}/terminal/ticket",
            post(crate::terminal::mint_ticket),
        )
        .route("/api/v1/sandboxes/{id}/{*rest}", any(to_runner))
        .route("/api/v1/analytics/usage", get(not_implemented))
        .merge(crate::admin_api::routes())
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&app),
            authenticate,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(render_metrics))
        .route("/openapi.json", get(openapi))
        // Authenticated by credentials or a ticket, before the upgrade (crate::terminal).
        .route(
            "/api/v1/sandboxes/{id}/terminal",
            get(crate::terminal::open_terminal),
        )
        .route("/ws/terminal/{id}", get(crate::terminal::open_terminal))
        .merge(api)
        .fallback(|uri: Uri| async move { Error::RouteNotFound(uri.path().to_owned()) })
        .method_not_allowed_fallback(|| async { Error::MethodNotAllowed })
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                Error::Internal("the request handler panicked".into()).into_response()
            },
        ))
        .with_state(app)
}

async fn authenticate(
    State(app): State<Arc<AppState>>,
    mut request: Request,
    next: Next,
) -> Response {
    match app.auth.authenticate(request.headers()).await {
        Ok(identity) => {
            request.extensions_mut().insert(identity);
            next.run(request).await
        }
        Err(e) => {
            // Aggregated: a flood of bad credentials must not grow the audit log per request.
            app.audit.denied(e.status().as_u16());
            e.into_response()
        }
    }
}

/// The current time for records (RFC 3339).
pub(crate) fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// Liveness
#[utoipa::path(get, path = "/healthz", tag = "meta", security(()),
    responses((status = 200, description = "The control plane is up.", body = Health)))]
pub(crate) async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// This document
///
/// The control plane's OpenAPI description (generated from the code; committed as
/// `controlplane/openapi.json`).
#[utoipa::path(get, path = "/openapi.json", tag = "meta", security(()),
    responses((status = 200, description = "The OpenAPI description.", content_type = "application/json", body = Object)))]
pub(crate) async fn openapi() -> Response {
    let mut response = crate::openapi::document().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Prometheus metrics
#[utoipa::path(get, path = "/metrics", tag = "meta", security(()),
    responses((status = 200, description = "Prometheus text format.", content_type = "text/plain", body = String)))]
pub(crate) async fn render_metrics(State(app): State<Arc<AppState>>) -> Response {
    let mut response = app.metrics.render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

/// The caller
#[utoipa::path(get, path = "/api/v1/user/me", tag = "user",
    responses((status = 200, description = "Who the credential names.", body = UserInfo), (status = 401, description = "`unauthorized`: no valid credential.", body = ErrorBody)))]
pub(crate) async fn user_me(Extension(id): Extension<Identity>) -> Json<UserInfo> {
    Json(UserInfo {
        sub: id.sub,
        email: id.email,
        name: id.name,
        groups: id.groups,
        namespaces: id.namespaces,
        is_admin: id.admin,
    })
}

/// Every template
#[utoipa::path(get, path = "/api/v1/templates", tag = "templates",
    responses((status = 200, description = "The templates (env names only, never values).", body = TemplateList), (status = 401, description = "`unauthorized`: no valid credential.", body = ErrorBody)))]
pub(crate) async fn list_templates(State(app): State<Arc<AppState>>) -> Json<TemplateList> {
    Json(TemplateList {
        templates: app.templates.all().iter().map(|t| t.info()).collect(),
    })
}

/// One template
#[utoipa::path(get, path = "/api/v1/templates/{name}", tag = "templates",
    params(("name" = String, Path, description = "The template's name.")),
    responses((status = 200, description = "The template.", body = TemplateInfo), (status = 401, description = "`unauthorized`: no valid credential.", body = ErrorBody),
        (status = 404, description = "`template_not_found`.", body = ErrorBody)))]
pub(crate) async fn get_template(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<TemplateInfo>> {
    app.templates
        .get(&name)
        .map(|t| Json(t.info()))
        .ok_or(Error::TemplateNotFound(name))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    namespace: Option<String>,
    status: Option<String>,
}

/// The sandboxes the caller may see
#[utoipa::path(get, path = "/api/v1/sandboxes", tag = "sandboxes",
    params(("namespace" = Option<String>, Query, description = "Only this namespace."),
        ("status" = Option<String>, Query, description = "Only this status (any case): Creating, Running, Stopped, Error, Deleting.")),
    responses((status = 200, description = "`{\"sandboxes\": [...]}`.", body = SandboxList),
        (status = 400, description = "`invalid_request`: a malformed query.", body = ErrorBody), (status = 401, description = "`unauthorized`: no valid credential.", body = ErrorBody)))]
pub(crate) async fn list_sandboxes(
    State(app): State<Arc<AppState>>,
    Extension(id): Extension<Identity>,
    uri: Uri,
) -> Result<Json<SandboxList>> {
    let q: ListQuery = axum::extract::Query::try_from_uri(&uri)
        .map(|q| q.0)
        .map_err(|e| Error::InvalidRequest(e.body_text()))?;
    let sandboxes = app
        .backend
        .list()
        .await?
        .into_iter()
        .filter(|s| id.can_use(&s.namespace))
        .filter(|s| q.namespace.as_ref().is_none_or(|n| *n == s.namespace))
        .filter(|s| {
            q.status
                .as_ref()
                .is_none_or(|st| st.eq_ignore_ascii_case(s.status.as_str()))
        })
        .map(shown)
        .collect();
    Ok(Json(SandboxList { sandboxes }))
}

/// A sandbox named in a URL, found for the caller.
#[derive(Debug)]
pub(crate) struct Located {
    /// Its backend key ([`sandbox_key`]; a plain name for a record made before names were
    /// per namespace).
    pub key: String,
    /// Its name, as shown (without the namespace).
    pub name: String,
    /// Where its runner is (and its namespace).
    pub target: Target,
}

/// The `?namespace=` of a per-sandbox route's query, if any (a DNS label, so taken as
/// written: an encoded one is no namespace).
pub(crate) fn namespace_param(query: Option<&str>) -> Option<String> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("namespace="))
        .map(str::to_owned)
}

/// `query` without its `namespace` parameter (the runner never sees it).
pub(crate) fn without_namespace(query: Option<&str>) -> Option<String> {
    let query = query?;
    if !query.split('&').any(|p| p.starts_with("namespace=")) {
        return Some(query.to_owned());
    }
    let kept: Vec<&str> = query
        .split('&')
        .filter(|p| !p.starts_with("namespace="))
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

/// Finds the sandbox `raw` (a URL's `{id}`) among those the caller may use. Names are per
/// namespace, so a name may be held in several: `namespace` (`?namespace=`), or the id
/// written `name.namespace`, picks one; otherwise the caller's own namespace (where its
/// creates go; `default` for a caller of every namespace) is looked in first, and a name
/// held there is that sandbox; otherwise the name must be held in exactly one of the
/// caller's other namespaces (several: 409 `ambiguous_name`). Every miss is the same 404 as
/// for a name nobody holds: nothing tells a caller what other namespaces hold. The common
/// path is one key lookup; only a caller of every namespace whose name is not in `default`
/// has the backend list its sandboxes.
pub(crate) async fn locate(
    app: &AppState,
    id: &Identity,
    raw: &str,
    namespace: Option<&str>,
) -> Result<Located> {
    let missing = || Error::SandboxNotFound(raw.to_owned());
    let (name, namespace) = match raw.split_once('.') {
        Some((name, ns)) if namespace.is_none_or(|q| q == ns) => (name, Some(ns)),
        Some(_) => return Err(missing()),
        None => (raw, namespace),
    };
    if !valid_name(name) {
        return Err(missing());
    }
    if let Some(ns) = namespace {
        if !valid_name(ns) || !id.can_use(ns) {
            return Err(missing());
        }
        return in_namespace(app, name, ns).await?.ok_or_else(missing);
    }
    let home = id.default_namespace();
    if id.can_use(&home) {
        if let Some(found) = in_namespace(app, name, &home).await? {
            return Ok(found);
        }
    }
    let mut found = Vec::new();
    match &id.namespaces {
        Some(list) if !id.admin => {
            let mut seen = vec![home.as_str()];
            for ns in list {
                if seen.contains(&ns.as_str()) {
                    continue;
                }
                seen.push(ns);
                if let Some(hit) = in_namespace(app, name, ns).await? {
                    found.push(hit);
                }
            }
        }
        // Every namespace: which ones exist is the backend's to say.
        _ => {
            for s in app.backend.list().await? {
                if s.namespace == home
                    || !id.can_use(&s.namespace)
                    || display_name(&s.name, &s.namespace) != name
                {
                    continue;
                }
                let target = app
                    .backend
                    .resolve(&s.name)
                    .await?
                    .filter(|t| t.namespace == s.namespace);
                if let Some(target) = target {
                    found.push(Located {
                        key: s.name,
                        name: name.to_owned(),
                        target,
                    });
                }
            }
        }
    }
    match found.len() {
        0 => Err(missing()),
        1 => Ok(found.remove(0)),
        _ => {
            let mut namespaces: Vec<String> =
                found.into_iter().map(|f| f.target.namespace).collect();
            namespaces.sort();
            namespaces.dedup();
            Err(Error::AmbiguousName {
                name: name.to_owned(),
                namespaces,
            })
        }
    }
}

/// The sandbox `name` of `namespace`: by its key, else (outside `default`) a record made
/// before names were per namespace, keyed by its plain name.
async fn in_namespace(app: &AppState, name: &str, namespace: &str) -> Result<Option<Located>> {
    let key = sandbox_key(namespace, name);
    let mut keys = vec![key];
    if namespace != DEFAULT_NAMESPACE {
        keys.push(name.to_owned());
    }
    for key in keys {
        if let Some(target) = app
            .backend
            .resolve(&key)
            .await?
            .filter(|t| t.namespace == namespace)
        {
            return Ok(Some(Located {
                key,
                name: name.to_owned(),
                target,
            }));
        }
    }
    Ok(None)
}

/// Whether `name` is held in `namespace` by a record made before names were per namespace
/// (keyed by the plain name outside `default`).
pub(crate) async fn held_by_legacy(app: &AppState, namespace: &str, name: &str) -> Result<bool> {
    if namespace == DEFAULT_NAMESPACE {
        return Ok(false);
    }
    Ok(app
        .backend
        .resolve(name)
        .await?
        .is_some_and(|t| t.namespace == namespace))
}

/// A summary as the API shows it: the name (and id) without the key's namespace.
pub(crate) fn shown(mut summary: SandboxSummary) -> SandboxSummary {
    let name = display_name(&summary.name, &summary.namespace).to_owned();
    if summary.sandbox_id == summary.name {
        summary.sandbox_id.clone_from(&name);
    }
    if let Some(from) = &mut summary.cloned_from {
        *from = display_name(from, &summary.namespace).to_owned();
    }
    summary.name = name;
    summary
}

/// A backend's error about key `key`, as the API shows it: with the name.
pub(crate) fn named(e: Error, key: &str, name: &str) -> Error {
    match e {
        Error::SandboxNotFound(k) if k == key => Error::SandboxNotFound(name.to_owned()),
        Error::AlreadyExists(k) if k == key => Error::AlreadyExists(name.to_owned()),
        Error::NotRunning { name: k, status } if k == key => Error::NotRunning {
            name: name.to_owned(),
            status,
        },
        e => e,
    }
}

/// A sandbox the caller may see (its key and summary), or 404 (never 403: others'
/// sandboxes do not exist for them).
pub(crate) async fn visible(
    app: &AppState,
    id: &Identity,
    raw: &str,
    namespace: Option<&str>,
) -> Result<(Located, SandboxSummary)> {
    let found = locate(app, id, raw, namespace).await?;
    let summary = app
        .backend
        .get(&found.key)
        .await?
        .filter(|s| s.namespace == found.target.namespace)
        .ok_or_else(|| Error::SandboxNotFound(raw.to_owned()))?;
    Ok((found, shown(summary)))
}

/// One sandbox
///
/// Clients poll this until `status` is `Running`.
#[utoipa::path(get, path = "/api/v1/sandboxes/{id}", tag = "sandboxes", params(("id" = String, Path, description = "The sandbox id (its name).")),
    responses((status = 200, description = "The sandbox.", body = SandboxSummary), (status = 401, description = "`unauthorized`: no valid credential.", body = ErrorBody), (status = 404, description = "`sandbox_not_found`: no such sandbox, or in a namespace the caller may not use.", body = ErrorBody)))]
pub(crate) async fn get_sandbox(
    State(app): State<Arc<AppState>>,
    Extension(id): Extension<Identity>,
    Path(name): Path<String>,
    uri: Uri,
) -> Result<Json<SandboxSummary>> {
    let namespace = namespace_param(uri.query());
    Ok(Json(
        visible(&app, &id, &name, namespace.as_deref()).await?.1,
    ))
}

/// Create a sandbox
///
/// `templateRef.kind` may be `ClusterSandboxTemplate` or `SandboxTemplate`; both name agentbox
/// templates. The namespace defaults to the caller's first one, or `default`.
#[utoipa::path(post, path = "/api/v1/sandboxes", tag = "sandboxes",
    request_body(content = CreateSandboxRequest, content_type = "application/json"),
    responses((status = 201, description = "Created.", body = SandboxSummary),
        (status = 400, description = "`invalid_request`: bad JSON, name, namespace or templateRef.kind; a bad credential reference, one not in the namespace's store (local and Docker backends).", body = ErrorBody), (status = 401, description = "`unauthorized`: no valid credential.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the caller may not use the namespace; `policy_violation` (with `violations: [{field, limit, actual}]`): the namespace's governance policy refuses it (idleTimeout, counts, template, image, cpu, memory).", body = PolicyViolationBody),
        (status = 404, description = "`template_not_found`.", body = ErrorBody),
        (status = 409, description = "`already_exists`: the name is taken in the namespace (names are per namespace: one taken only in another namespace creates fine).", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is over 1 MiB.", body = ErrorBody),
        (status = 500, description = "`backend_error`: the sandbox could not be started.", body = ErrorBody)))]
pub(crate) async fn create_sandbox(
    State(app): State<Arc<AppState>>,
    Extension(id): Extension<Identity>,
    body: Body,
) -> Result<Response> {
    let bytes = read_limited(body, 1 << 20)
        .await?
        .ok_or_else(|| Error::PayloadTooLarge("a sandbox request is at most 1 MiB".into()))?;
    let req: CreateSandboxRequest = serde_json::from_slice(&bytes)
        .map_err(|e| Error::InvalidRequest(format!("the body is not a sandbox request: {e}")))?;
    if !valid_name(&req.name) {
        return Err(Error::InvalidRequest(format!(
            "name {:?} must be a DNS label: lowercase letters, digits and '-', at most 63",
            req.name
        )));
    }
    let namespace = req.namespace.unwrap_or_else(|| id.default_namespace());
    if !valid_name(&namespace) {
        return Err(Error::InvalidRequest(format!(
            "namespace {namespace:?} is not a DNS label"
        )));
    }
    if !id.can_use(&namespace) {
        return Err(Error::Forbidden(format!(
            "you may not create sandboxes in {namespace:?}"
        )));
    }
    let template_name = req
        .template_ref
        .as_ref()
        .map_or("default", |t| t.name.as_str());
    if let Some(kind) = req.template_ref.as_ref().and_then(|t| t.kind.as_deref()) {
        if kind != "ClusterSandboxTemplate" && kind != "SandboxTemplate" {
            return Err(Error::InvalidRequest(format!(
                "templateRef.kind {kind:?} must be ClusterSandboxTemplate or SandboxTemplate"
            )));
        }
    }
    let mut template = app
        .templates
        .get(template_name)
        .cloned()
        .ok_or_else(|| Error::TemplateNotFound(template_name.into()))?;
    let (timeout, mut idle_timeout) =
        crate::lifecycle::timeouts(&req.timeout, &req.idle_timeout, &template)?;
    // Credentials: by name, from the template and the request, each existing in the namespace.
    template.credentials.extend(req.credentials.iter().cloned());
    crate::credentials::validate_refs(&template.credentials).map_err(Error::InvalidRequest)?;
    let backend = app.cfg.backend;
    // Kubernetes: references to operator-made Secrets (`credential-<namespace>-<name>`), which
    // the kubelet resolves; the store is for the local and Docker backends.
    if let Some(missing) = template.credentials.iter().find(|r| {
        backend != crate::config::BackendKind::Kubernetes
            && !app.credentials.exists(&namespace, &r.name)
    }) {
        return Err(Error::InvalidRequest(format!(
            "credential {:?} does not exist in namespace {namespace:?}",
            missing.name
        )));
    }
    // Governance: counted under the create lock of every replica sharing the state directory,
    // held until the sandbox exists (or the create failed).
    let policy = app.governance.effective(&namespace)?;
    let _slot = if policy.policy.counts() {
        Some(app.governance.lock_creates().await?)
    } else {
        None
    };
    if policy.source.is_some() {
        let existing = if policy.policy.counts() {
            app.backend.list_for_count(&namespace).await?
        } else {
            Vec::new()
        };
        let mut violations = policy
            .policy
            .check_create(&id, &namespace, &template, &existing);
        match policy
            .policy
            .clamp_idle_timeout(req.idle_timeout.as_deref(), idle_timeout.take())
        {
            Ok(clamped) => idle_timeout = clamped,
            Err(v) => violations.push(v),
        }
        crate::admin_api::audit_decision(
            &app,
            &id,
            Some(&req.name),
            &namespace,
            "create",
            &violations,
        );
        if !violations.is_empty() {
            return Err(Error::PolicyViolation {
                message: format!("creating {:?} in {namespace:?} breaks its policy", req.name),
                violations,
            });
        }
        policy.policy.apply(&mut template);
    }
    // Names are per namespace: the backend knows the sandbox by its key. A record made
    // before that, keyed by its plain name, holds the name in its namespace too.
    let key = sandbox_key(&namespace, &req.name);
    let result = if held_by_legacy(&app, &namespace, &req.name).await? {
        Err(Error::AlreadyExists(req.name.clone()))
    } else {
        app.backend
            .create(CreateSpec {
                name: key.clone(),
                namespace: namespace.clone(),
                template,
                created_by: CreatedBy {
                    email: id.email.clone(),
                    display_name: id.name.clone(),
                },
                timeout,
                idle_timeout,
            })
            .await
            .map(shown)
            .map_err(|e| named(e, &key, &req.name))
    };
    audit_action(
        &app,
        &id,
        Some(&req.name),
        Some(&namespace),
        "create",
        &result,
    );
    Ok((StatusCode::CREATED, Json(result?)).into_response())
}

/// Reads a body of at most `limit` bytes; `None` when it is larger. The rest of a larger body
/// is read (up to 16 MiB, for 2 s) and dropped, so the client receives the 413 instead of a
/// connection reset while it is still sending.
pub(crate) async fn read_limited(body: Body, limit: usize) -> Result<Option<Vec<u8>>> {
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| Error::InvalidRequest(format!("cannot read the body: {e}")))?;
        if bytes.len() + chunk.len() > limit {
            let mut seen = 0usize;
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
                while let Some(Ok(chunk)) = stream.next().await {
                    seen += chunk.len();
                    if seen > 16 << 20 {
                        break;
                    }
                }
            })
            .await;
            return Ok(None);
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(Some(bytes))
}

pub(crate) fn audit_action<T>(
    app: &AppState,
    id: &Identity,
    sandbox: Option<&str>,
    namespace: Option<&str>,
    action: &str,
    result: &Result<T>,
) {
    let (outcome, status) = match result {
        Ok(_) if action == "create" => ("ok", 201),
        Ok(_) if action == "clone" => ("ok", 202),
        Ok(_) => ("ok", 200),
        Err(e) => ("error", e.status().as_u16()),
    };
    app.audit.write(&audit::Record {
        time: now(),
        actor: &id.sub,
        sandbox,
        namespace,
        action,
        outcome,
        status,
        detail: None,
        ..Default::default()
    });
}

/// Delete a sandbox and its workspace
#[utoipa::path(delete, path = "/api/v1/sandboxes/{id}", tag = "sandboxes", params(("id" = String, Path, description = "The sandbox id (its name).")),
    responses((status = 200, description = "The summary, with status `Deleting`.", body = SandboxSummary), (status = 401, description = "`unauthorized`: no valid credential.", body = ErrorBody), (status = 404, description = "`sandbox_not_found`: no such sandbox, or in a namespace the caller may not use.", body = ErrorBody),
        (status = 500, description = "`backend_error`.", body = ErrorBody)))]
pub(crate) async fn delete_sandbox(
    State(app): State<Arc<AppState>>,
    Extension(id): Extension<Identity>,
    Path(name): Path<String>,
    uri: Uri,
) -> Result<Json<SandboxSummary>> {
    let namespace = namespace_param(uri.query());
    let (found, mut summary) = visible(&app, &id, &name, namespace.as_deref()).await?;
    let result = app
        .backend
        .delete(&found.key)
        .await
        .map_err(|e| named(e, &found.key, &found.name));
    audit_action(
        &app,
        &id,
        Some(&found.name),
        Some(&summary.namespace),
        "delete",
        &result,
    );
    result?;
    summary.status = SandboxStatus::Deleting;
    Ok(Json(summary))
}

/// Stop a sandbox; its workspace is kept
#[utoipa::path(post, path = "/api/v1/sandboxes/{id}/stop", tag = "sandboxes", params(("id" = String, Path, description = "The sandbox id (its name).")),
    responses((status = 200, description = "The summary, status `Stopped`.", body = SandboxSummary), (status = 401, description = "`unauthorized`: no valid credential.", body = ErrorBody), (status = 404, description = "`sandbox_not_found`: no such sandbox, or in a namespace the caller may not use.", body = ErrorBody),
        (status = 500, description = "`backend_error`.", body = ErrorBody)))]
pub(crate) async fn stop_sandbox(
    State(app): State<Arc<AppState>>,
    Extension(id): Extension<Identity>,
    Path(name): Path<String>,
    uri: Uri,
) -> Result<Json<SandboxSummary>> {
    let namespace = namespace_param(uri.query());
    let (found, summary) = visible(&app, &id, &name, namespace.as_deref()).await?;
    let result = app
        .backend
        .stop(&found.key)
        .await
        .map_err(|e| named(e, &found.key, &found.name));
    audit_action(
        &app,
        &id,
        Some(&found.name),
        Some(&summary.namespace),
        "stop",
        &result,
    );
    Ok(Json(shown(result?)))
}

/// Start a stopped sandbox again
#[utoipa::path(post, path = "/api/v1/sandboxes/{id}/resume", tag = "sandboxes", params(("id" = String, Path, description = "The sandbox id (its name).")),
    responses((status = 200, description = "The summary, status `Running`.", body = SandboxSummary), (status = 401, description = "`unauthorized`: no valid credential.", body = ErrorBody), (status = 404, description = "`sandbox_not_found`: no such sandbox, or in a namespace the caller may not use.", body = ErrorBody),
        (status = 500, description = "`backend_error`.", body = ErrorBody)))]
pub(crate) async fn resume_sandbox(
    State(app): State<Arc<AppState>>,
    Extension(id): Extension<Identity>,
    Path(name): Path<String>,
    uri: Uri,
) -> Result<Json<SandboxSummary>> {
    let namespace = namespace_param(uri.query());
    let (found, summary) = visible(&app, &id, &name, namespace.as_deref()).await?;
    let result = app
        .backend
        .resume(&found.key)
        .await
        .map_err(|e| named(e, &found.key, &found.name));
    audit_action(
        &app,
        &id,
        Some(&found.name),
        Some(&summary.namespace),
        "resume",
        &result,
    );
    Ok(Json(shown(result?)))
}

/// Maps the rest of a sandbox URL to the runner's path and an audit action name.
fn runner_route(method: &Method, rest: &str) -> Option<(String, &'static str)> {
    let (head, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let action = match (head, tail, method.as_str()) {
        ("configure", "", "POST") => "configure",
        ("invoke", "", "POST") => "invoke",
        ("invoke", "cancel", "POST") => "invoke.cancel",
        ("invokes", "", "GET") => "invokes.list",
        ("invokes", t, "GET") if !t.contains('/') => "invokes.get",
        ("invokes", t, "GET") if t.ends_with("/events") && t.matches('/').count() == 1 => {
            "invokes.events"
        }
        ("invokes", t, "POST") if t.ends_with("/cancel") && t.matches('/').count() == 1 => {
            "invokes.cancel"
        }
        ("exec", "", "POST") => "exec",
        ("files", "", "GET") => "files.list",
        ("files", _, "GET") => "files.get",
        ("files", _, "PUT") => "files.put",
        ("files", _, "DELETE") => "files.delete",
        ("archive", "", "GET") => "archive",
        ("agents", "", "GET") => "agents.list",
        ("sessions", "", "POST") => "sessions.create",
        ("sessions", "", "GET") => "sessions.list",
        ("sessions", t, "GET") if segments(t) == 1 => "sessions.get",
        ("sessions", t, "DELETE") if segments(t) == 1 => "sessions.delete",
        ("sessions", t, "GET") if segments(t) == 2 && t.ends_with("/events") => "sessions.events",
        ("sessions", t, "POST") if is_permission(t) => "sessions.permission",
        ("sessions", t, "PUT") if segments(t) == 2 && t.ends_with("/config") => "sessions.config",
        ("invokes", t, "POST") if is_permission(t) => "invokes.permission",
        ("processes", "", "POST") => "processes.start",
        ("processes", "", "GET") => "processes.list",
        ("processes", t, "GET") if segments(t) == 1 => "processes.get",
        ("processes", t, "DELETE") if segments(t) == 1 => "processes.kill",
        ("processes", t, "GET") if segments(t) == 2 && t.ends_with("/events") => "processes.events",
        ("processes", t, "POST") if segments(t) == 2 => match t.rsplit('/').next() {
            Some("stdin") => "processes.stdin",
            Some("signal") => "processes.signal",
            Some("resize") => "processes.resize",
            Some("wait") => "processes.wait",
            _ => return None,
        },
        _ => return None,
    };
    let path = if head == "files" && tail.is_empty() {
        "/v1/files".to_owned()
    } else {
        format!("/v1/{rest}")
    };
    Some((path, action))
}

/// AgentTier's routes outside a sandbox that agentbox does not serve: 501 `not_implemented`.
async fn not_implemented(method: Method, uri: Uri) -> Error {
    Error::NotImplemented(format!("{method} {}", uri.path()))
}

/// How many non-empty `/`-separated segments `tail` has (0 when any is empty).
fn segments(tail: &str) -> usize {
    let parts: Vec<&str> = tail.split('/').collect();
    if parts.iter().any(|p| p.is_empty()) {
        0
    } else {
        parts.len()
    }
}

/// Whether `tail` is `{id}/permissions/{pid}`.
fn is_permission(tail: &str) -> bool {
    segments(tail) == 3 && tail.split('/').nth(1) == Some("permissions")
}

async fn to_runner(
    State(app): State<Arc<AppState>>,
    Extension(id): Extension<Identity>,
    Path((name, _)): Path<(String, String)>,
    request: Request,
) -> Result<Response> {
    // The raw (still percent-encoded) rest of the path goes to the runner as it came.
    let raw = request.uri().path();
    let prefix = format!("/api/v1/sandboxes/{name}/");
    let rest = raw
        .strip_prefix(&prefix)
        .ok_or_else(|| Error::RouteNotFound(raw.to_owned()))?
        .to_owned();
    // Ports, their tunnels and the preview proxy: the control plane's own handling.
    if let Some(route) = crate::ports::route(request.method(), &rest) {
        return crate::ports::serve(Arc::clone(&app), &id, &name, route, request).await;
    }
    let Some((path, action)) = runner_route(request.method(), &rest) else {
        // A runner route, with another method: 405, as for the control plane's own routes.
        let known = [Method::GET, Method::POST, Method::PUT, Method::DELETE]
            .iter()
            .any(|m| runner_route(m, &rest).is_some());
        return Err(if known {
            Error::MethodNotAllowed
        } else {
            Error::RouteNotFound(raw.to_owned())
        });
    };
    let namespace = namespace_param(request.uri().query());
    let Located {
        key,
        name,
        mut target,
    } = locate(&app, &id, &name, namespace.as_deref()).await?;
    // A sandbox that only slept is woken for the request (one the runner would be asked),
    // never a 409.
    let wrong_mode = matches!(action, "configure" | "invoke") && target.mode == "code";
    if target.status == SandboxStatus::Stopped
        && target.stop_reason == Some(agentbox_proto::StopReason::Idle)
        && !wrong_mode
    {
        target = crate::lifecycle::wake(&app, &key, &name)
            .await
            .map_err(|e| named(e, &key, &name))?;
    }
    if crate::lifecycle::is_use(action) {
        app.backend.touch(&key);
    }
    let kind = match action {
        "configure" => Some(Kind::Configure),
        "invoke" => Some(Kind::Invoke),
        _ => None,
    };
    let checked = if kind.is_some() && target.mode == "code" {
        Err(Error::WrongMode(format!(
            "sandbox {name:?} is in code mode: /configure and /invoke only work on agent-mode \
             sandboxes; use /files and /exec"
        )))
    } else if target.status != SandboxStatus::Running {
        Err(Error::NotRunning {
            name: name.clone(),
            status: target.status.as_str(),
        })
    } else {
        Ok(())
    };
    let started = Instant::now();
    let started_at = std::time::SystemTime::now();
    let mut request = request;
    // Span ids only when spans are exported: otherwise a caller's own `traceparent` passes to
    // the runner untouched, and no ids are drawn per request.
    let span_ids = kind.filter(|_| app.tracer.enabled()).map(|_| {
        let ids = otel::SpanIds::new(
            request
                .headers()
                .get("traceparent")
                .and_then(|v| v.to_str().ok()),
        );
        if let Ok(v) = HeaderValue::from_str(&ids.traceparent()) {
            request.headers_mut().insert("traceparent", v);
        }
        ids
    });
    if matches!(action, "invoke" | "exec") && checked.is_ok() {
        crate::admin_api::govern_concurrency(&app, &id, &name, &target).await?;
    }
    if action == "exec" && checked.is_ok() {
        request =
            crate::admin_api::govern_exec(&app, &id, &name, &target.namespace, request).await?;
    }
    // `?namespace=` picked the sandbox; the runner never sees it.
    let query = without_namespace(request.uri().query());
    let query = if action == "invoke" && checked.is_ok() {
        crate::admin_api::govern_invoke(&app, &id, &name, &target.namespace, query.as_deref())?
    } else {
        query
    };
    let path_and_query = match query {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let result = match checked {
        // Invoke, exec, configure and reattach streams end with an `error` event when the
        // runner goes away; a session's history stream holds history items only.
        Ok(()) => {
            let guard = action != "sessions.events";
            app.proxy
                .forward(&target, &path_and_query, request, guard)
                .await
        }
        Err(e) => Err(e),
    };
    let status = match &result {
        Ok(r) => r.status().as_u16(),
        Err(e) => e.status().as_u16(),
    };
    app.audit.write(&audit::Record {
        time: now(),
        actor: &id.sub,
        sandbox: Some(&name),
        namespace: Some(&target.namespace),
        action,
        outcome: metrics::outcome(status),
        status,
        detail: None,
        ..Default::default()
    });
    let Some(kind) = kind else {
        return result;
    };
    let response = match result {
        Ok(r) => r,
        Err(e) => {
            app.metrics
                .record(kind, &target.template, status, started.elapsed());
            return Err(e);
        }
    };
    // Record when the stream ends (or the client leaves), without touching its bytes.
    let mut guard = Recorder {
        app: Arc::clone(&app),
        sandbox: name.clone(),
        key,
        namespace: target.namespace.clone(),
        actor: id.sub.clone(),
        kind,
        template: target.template,
        status,
        started,
        started_at,
        span_ids,
        stats: StreamStats::default(),
    };
    let (parts, body) = response.into_parts();
    let stream = body.into_data_stream().map(move |chunk| {
        if let Ok(bytes) = &chunk {
            guard.stats.observe(bytes);
        }
        chunk
    });
    Ok(Response::from_parts(parts, Body::from_stream(stream)))
}

struct Recorder {
    app: Arc<AppState>,
    sandbox: String,
    /// The sandbox's backend key.
    key: String,
    namespace: String,
    actor: String,
    kind: Kind,
    template: String,
    status: u16,
    started: Instant,
    started_at: std::time::SystemTime,
    span_ids: Option<otel::SpanIds>,
    stats: StreamStats,
}

/// What the proxy notices of a stream as it passes: its size, and its last bytes, where the
/// `exit` event's code is read when the stream ends (and only if a span wants it). Per chunk
/// that is a reference count (a chunk of [`TAIL_KEEP`] bytes or more) or a copy of a small
/// chunk; the stream's bytes are never scanned.
#[derive(Debug, Default)]
struct StreamStats {
    bytes: u64,
    /// The last chunk, when it alone holds the stream's last [`TAIL_KEEP`] bytes.
    last: Option<Bytes>,
    /// Otherwise the stream's last bytes (at most twice [`TAIL_KEEP`]).
    tail: Vec<u8>,
}

const EXIT_MARKER: &[u8] = b"event: exit\ndata: ";
/// More than an `exit` frame takes, so the stream's last bytes hold all of it.
const TAIL_KEEP: usize = 4096;

impl StreamStats {
    fn observe(&mut self, chunk: &Bytes) {
        self.bytes += chunk.len() as u64;
        if chunk.len() >= TAIL_KEEP {
            self.last = Some(chunk.clone());
            self.tail.clear();
            return;
        }
        if let Some(last) = self.last.take() {
            self.tail.extend_from_slice(&last[last.len() - TAIL_KEEP..]);
        }
        self.tail.extend_from_slice(chunk);
        if self.tail.len() > 2 * TAIL_KEEP {
            let excess = self.tail.len() - TAIL_KEEP;
            self.tail.drain(..excess);
        }
    }

    /// The exit code of the stream's closing `exit` event, if it ended with one.
    fn exit_code(&self) -> Option<i64> {
        self.exit_event()?.get("exitCode")?.as_i64()
    }

    /// The stream's closing `exit` event, or the JSON answer of an invoke asked for with
    /// `Accept: application/json` when all of it was kept (at most 2 × [`TAIL_KEEP`] bytes).
    fn outcome(&self) -> Option<serde_json::Value> {
        if let Some(exit) = self.exit_event() {
            return Some(exit);
        }
        let whole: &[u8] = match &self.last {
            Some(last) if last.len() as u64 == self.bytes => last,
            None if self.tail.len() as u64 == self.bytes => &self.tail,
            _ => return None,
        };
        serde_json::from_slice(whole).ok()
    }

    /// The stream's closing `exit` event, if it ended with one.
    fn exit_event(&self) -> Option<serde_json::Value> {
        let window = match &self.last {
            Some(last) => &last[last.len() - TAIL_KEEP..],
            None => &self.tail[..],
        };
        let start = memchr::memmem::rfind(window, EXIT_MARKER)? + EXIT_MARKER.len();
        let data = &window[start..];
        let end = memchr::memchr(b'\n', data)?;
        serde_json::from_slice::<serde_json::Value>(&data[..end]).ok()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.app.metrics.record(
            self.kind,
            &self.template,
            self.status,
            self.started.elapsed(),
        );
        let (app, sandbox, status) = (Arc::clone(&self.app), self.key.clone(), self.status);
        let action = match self.kind {
            Kind::Invoke => "invoke",
            Kind::Configure => "configure",
        };
        if let (Some(ids), true) = (self.span_ids, self.app.tracer.enabled()) {
            let mut attributes = vec![
                ("agentbox.template", otel::Attr::Str(self.template.clone())),
                ("agentbox.sandbox", otel::Attr::Str(self.sandbox.clone())),
                ("agentbox.actor", otel::Attr::Str(self.actor.clone())),
                (
                    "agentbox.outcome",
                    otel::Attr::Str(metrics::outcome(self.status).to_owned()),
                ),
                (
                    "http.response.status_code",
                    otel::Attr::Int(i64::from(self.status)),
                ),
                (
                    "agentbox.response_bytes",
                    otel::Attr::Int(self.stats.bytes as i64),
                ),
                (
                    "agentbox.duration_ms",
                    otel::Attr::Int(self.started.elapsed().as_millis() as i64),
                ),
            ];
            let exit_code = self.stats.exit_code();
            if let Some(code) = exit_code {
                attributes.push(("agentbox.exit_code", otel::Attr::Int(code)));
            }
            self.app.tracer.finish(otel::Span {
                name: match self.kind {
                    Kind::Invoke => "agentbox.invoke",
                    Kind::Configure => "agentbox.configure",
                },
                ids,
                start: self.started_at,
                end: std::time::SystemTime::now(),
                attributes,
                error: self.status >= 400 || exit_code.is_some_and(|c| c != 0),
            });
        }
        if self.kind == Kind::Invoke && (200..300).contains(&self.status) {
            // The end of an invoke's stream: its id, reason and duration (never its output).
            let exit = self.stats.outcome();
            let field = |k: &str| {
                exit.as_ref()
                    .and_then(|e| e.get(k)?.as_str().map(str::to_owned))
            };
            let invoke_id = field("invokeId");
            // `ended`: no exit seen (the client left first, or a JSON answer too big to keep).
            let reason = field("reason").unwrap_or_else(|| "ended".into());
            self.app.audit.write(&audit::Record {
                time: now(),
                actor: &self.actor,
                sandbox: Some(&self.sandbox),
                namespace: Some(&self.namespace),
                action: "invoke.end",
                outcome: &reason,
                status: self.status,
                invoke_id: invoke_id.as_deref(),
                duration_ms: Some(self.started.elapsed().as_millis() as u64),
                ..Default::default()
            });
        }
        if !self.app.backend.records_outcomes() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                app.backend
                    .record(&sandbox, action, metrics::outcome(status), status)
                    .await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_seen_across_chunk_boundaries() {
        let exit = b"id: 9\nevent: exit\ndata: {\"exitCode\":7,\"reason\":\"completed\"}\n\n";
        // Small streams, and a bulk stream of big chunks before the same end.
        for head in [
            &b"id: 1\nevent: start\ndata: {}\n\n"[..],
            &[b'x'; 3 * TAIL_KEEP + 5][..],
        ] {
            let stream = [head, &exit[..]].concat();
            // Every cut near the end (where the exit frame is), a few far from it.
            let cuts: Vec<usize> = [0, 1, TAIL_KEEP]
                .into_iter()
                .chain(stream.len().saturating_sub(200)..stream.len())
                .filter(|&c| c < stream.len())
                .collect();
            for &cut in &cuts {
                for &cut2 in cuts.iter().filter(|&&c| c >= cut) {
                    let mut stats = StreamStats::default();
                    for piece in [&stream[..cut], &stream[cut..cut2], &stream[cut2..]] {
                        stats.observe(&Bytes::copy_from_slice(piece));
                    }
                    assert_eq!(stats.exit_code(), Some(7), "cuts {cut} {cut2}");
                    assert_eq!(stats.bytes, stream.len() as u64);
                }
            }
            let mut stats = StreamStats::default();
            stats.observe(&Bytes::copy_from_slice(head));
            assert_eq!(stats.exit_code(), None, "no exit event");
        }
    }

    #[test]
    fn runner_routes() {
        let post = Method::POST;
        let get = Method::GET;
        assert_eq!(
            runner_route(&post, "invoke"),
            Some(("/v1/invoke".into(), "invoke"))
        );
        assert_eq!(
            runner_route(&post, "invoke/cancel"),
            Some(("/v1/invoke/cancel".into(), "invoke.cancel"))
        );
        assert_eq!(
            runner_route(&get, "invokes/inv-1/events"),
            Some(("/v1/invokes/inv-1/events".into(), "invokes.events"))
        );
        assert_eq!(
            runner_route(&get, "files/"),
            Some(("/v1/files".into(), "files.list"))
        );
        assert_eq!(
            runner_route(&get, "files/workspace/a%20b.txt"),
            Some(("/v1/files/workspace/a%20b.txt".into(), "files.get"))
        );
        assert_eq!(runner_route(&get, "info"), None);
        assert_eq!(runner_route(&get, "invoke"), None);
        assert_eq!(runner_route(&post, "../v1/info"), None);
        assert_eq!(runner_route(&get, "invokes/a/b/events"), None);
        assert_eq!(runner_route(&post, "invokes/x/y/cancel"), None);
        let delete = Method::DELETE;
        for (method, rest, action) in [
            (&post, "sessions", "sessions.create"),
            (&get, "sessions", "sessions.list"),
            (&get, "sessions/s1", "sessions.get"),
            (&delete, "sessions/s1", "sessions.delete"),
            (&get, "sessions/s1/events", "sessions.events"),
            (&post, "sessions/s1/permissions/p1", "sessions.permission"),
            (&Method::PUT, "sessions/s1/config", "sessions.config"),
            (&post, "invokes/inv-1/permissions/p1", "invokes.permission"),
            (&get, "agents", "agents.list"),
        ] {
            assert_eq!(
                runner_route(method, rest),
                Some((format!("/v1/{rest}"), action)),
                "{method} {rest}"
            );
        }
        for (method, rest) in [
            (&delete, "sessions"),
            (&get, "sessions//events"),
            (&post, "sessions/s1/events"),
            (&post, "sessions/s1/permissions"),
            (&post, "sessions/s1/permissions/p1/x"),
            (&post, "invokes/inv-1/other/p1"),
            (&get, "invokes/inv-1/permissions/p1"),
            (&post, "agents"),
            (&get, "agents/x"),
        ] {
            assert_eq!(runner_route(method, rest), None, "{method} {rest}");
        }
    }
}
