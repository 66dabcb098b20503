//! Sandboxes only while they are used: `idleTimeout` (stop an unused sandbox, keeping its
//! workspace; the next request resumes it) and `timeout` (a sandbox's lifetime: stop or delete
//! it at the end). Stateless like the rest of the control plane: [`sweep`] reads the backend's
//! records every `--lifecycle-interval`, in every replica, and the backend's stops are
//! idempotent; [`wake`] resumes a sandbox stopped for being idle on the request's path.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use agentbox_proto::{
    CloneSandboxRequest, CreatedBy, ErrorBody, InvokeList, InvokeState, SandboxStatus,
    SandboxSummary, StopReason, WarmPoolStatus,
};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use http_body_util::BodyExt;

use crate::api::{audit_action, held_by_legacy, named, read_limited, shown, visible};
use crate::auth::Identity;
use crate::backend::{display_name, sandbox_key, valid_name, Target};
use crate::error::{Error, Result};
use crate::templates::Template;
use crate::{audit, AppState};

/// The shortest `timeout` or `idleTimeout` accepted.
pub const MIN_TIMEOUT: Duration = Duration::from_secs(1);

/// The shortest interval between two sweeps (a zero `--lifecycle-interval` would spin).
const MIN_INTERVAL: Duration = Duration::from_millis(50);

/// Most bytes of a runner's invoke list read while deciding whether a sandbox is busy.
const INVOKE_LIST_LIMIT: usize = 1 << 20;

/// Parses a Go duration (`90s`, `5m`, `1h30m`, `1.5h`, `250ms`): one or more
/// `<decimal><unit>` pairs, units `ns us µs ms s m h`, positive, at most 100 years. The same
/// grammar as the runner's `?timeout=` (runner/src/duration.rs).
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let s = text.trim();
    let s = s.strip_prefix('+').unwrap_or(s);
    if s.is_empty() || s.starts_with('-') {
        return Err(format!(
            "duration {text:?} must be positive, e.g. \"30m\" or \"1h30m\""
        ));
    }
    let mut rest = s;
    let mut nanos: f64 = 0.0;
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..n]
            .parse()
            .map_err(|_| format!("duration {text:?}: expected a number at {rest:?}"))?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..u] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            "" => return Err(format!("duration {text:?} needs a unit, e.g. \"30s\"")),
            other => return Err(format!("duration {text:?}: unknown unit {other:?}")),
        };
        rest = &rest[u..];
        nanos += number * scale;
    }
    if !nanos.is_finite() || nanos > 100.0 * 365.0 * 86400e9 {
        return Err(format!("duration {text:?} is too large"));
    }
    if nanos < 1.0 {
        return Err(format!("duration {text:?} must be positive"));
    }
    Ok(Duration::from_nanos(nanos as u64))
}

/// Checks a `timeout` or `idleTimeout` (`field` names it in the message).
pub fn check_duration(field: &str, text: &str) -> std::result::Result<Duration, String> {
    let d = parse_duration(text).map_err(|e| format!("{field}: {e}"))?;
    if d < MIN_TIMEOUT {
        return Err(format!("{field} {text:?} is shorter than 1s"));
    }
    Ok(d)
}

/// A create's `timeout` and `idleTimeout`: the request's, else the template's; checked.
pub fn timeouts(
    timeout: &Option<String>,
    idle_timeout: &Option<String>,
    template: &Template,
) -> Result<(Option<String>, Option<String>)> {
    let pick = |field: &str, asked: &Option<String>, default: &Option<String>| {
        let text = asked.as_ref().or(default.as_ref());
        if let Some(text) = text {
            check_duration(field, text).map_err(Error::InvalidRequest)?;
        }
        Ok::<_, Error>(text.map(|t| t.trim().to_owned()))
    };
    Ok((
        pick("timeout", timeout, &template.timeout)?,
        pick("idleTimeout", idle_timeout, &template.idle_timeout)?,
    ))
}

/// Whether a proxied request (by its audit action) counts as use of the sandbox: anything
/// but reading the lists and summaries of invokes and sessions.
pub fn is_use(action: &str) -> bool {
    !matches!(
        action,
        "invokes.list"
            | "invokes.get"
            | "sessions.list"
            | "sessions.get"
            | "processes.list"
            | "processes.get"
    )
}

/// Clone a sandbox
///
/// A new sandbox with a copy of the source's workspace (reflinked where the filesystem can)
/// and runner configuration (a configure with the same install hash skips the install), the
/// same template, namespace and timeouts. The source may be running or stopped. Local and
/// Docker backends (Docker: the volume copied through the engine's tar stream); Kubernetes:
/// a VolumeSnapshot of the source's workspace claim and a new claim from it (untested
/// against a real CSI driver), `409 not_cloneable` when the workspace is an `emptyDir`.
#[utoipa::path(post, path = "/api/v1/sandboxes/{id}/clone", tag = "sandboxes",
    params(("id" = String, Path, description = "The source sandbox's id (its name).")),
    request_body(content = CloneSandboxRequest, content_type = "application/json"),
    responses((status = 202, description = "The new sandbox (`clonedFrom` names the source); `Running` on the local backend, `Creating` on Kubernetes (its claim is restored from the snapshot when the Pod is scheduled).", body = SandboxSummary),
        (status = 400, description = "`invalid_request`: bad JSON or name.", body = ErrorBody), (status = 401, description = "`unauthorized`: no valid credential.", body = ErrorBody),
        (status = 403, description = "`policy_violation` (with `violations: [{field, limit, actual}]`): the source namespace's governance policy refuses another sandbox (a clone is counted and checked as a create).", body = crate::governance::PolicyViolationBody),
        (status = 404, description = "`sandbox_not_found`: no such source, or in a namespace the caller may not use.", body = ErrorBody),
        (status = 409, description = "`already_exists`: the name is taken in the source's namespace (where the copy is made); `not_cloneable` (Kubernetes): the source's workspace is an `emptyDir` (its template has no `pvc.json`), or the cluster serves no VolumeSnapshots.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is over 64 KiB.", body = ErrorBody),
        (status = 500, description = "`backend_error`: the copy or the start failed, or the backend cannot clone.", body = ErrorBody)))]
pub(crate) async fn clone_sandbox(
    State(app): State<Arc<AppState>>,
    Extension(id): Extension<Identity>,
    Path(source): Path<String>,
    uri: axum::http::Uri,
    body: Body,
) -> Result<Response> {
    let bytes = read_limited(body, 64 << 10)
        .await?
        .ok_or_else(|| Error::PayloadTooLarge("a clone request is at most 64 KiB".into()))?;
    let req: CloneSandboxRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
        CloneSandboxRequest::default()
    } else {
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::InvalidRequest(format!("the body is not a clone request: {e}")))?
    };
    let namespace = crate::api::namespace_param(uri.query());
    let (found, summary) = visible(&app, &id, &source, namespace.as_deref()).await?;
    let source = found.name;
    let name = match req.name {
        Some(name) => name,
        None => {
            let secs = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            let base: String = source.chars().take(63 - 17).collect();
            format!("{}-clone-{secs}", base.trim_end_matches('-'))
        }
    };
    if !valid_name(&name) {
        return Err(Error::InvalidRequest(format!(
            "name {name:?} must be a DNS label: lowercase letters, digits and '-', at most 63"
        )));
    }
    let created_by = CreatedBy {
        email: id.email.clone(),
        display_name: id.name.clone(),
    };
    // A clone is a create in the source's namespace: its policy's counts, template and image
    // are checked as a create's, under the same create lock.
    let policy = app.governance.effective(&summary.namespace)?;
    let _slot = if policy.policy.counts() {
        Some(app.governance.lock_creates().await?)
    } else {
        None
    };
    if policy.source.is_some() {
        let template_name = summary.template_ref.as_deref().unwrap_or("default");
        let template = app
            .templates
            .get(template_name)
            .cloned()
            .unwrap_or_else(|| Template {
                name: template_name.to_owned(),
                mode: summary.mode.clone(),
                ..Default::default()
            });
        let existing = if policy.policy.counts() {
            app.backend.list_for_count(&summary.namespace).await?
        } else {
            Vec::new()
        };
        let violations = policy
            .policy
            .check_create(&id, &summary.namespace, &template, &existing);
        crate::admin_api::audit_decision(
            &app,
            &id,
            Some(&name),
            &summary.namespace,
            "clone",
            &violations,
        );
        if !violations.is_empty() {
            return Err(Error::PolicyViolation {
                message: format!(
                    "cloning {source:?} as {name:?} in {:?} breaks its policy",
                    summary.namespace
                ),
                violations,
            });
        }
    }
    // The copy is in the source's namespace, where its name is taken or not.
    let key = sandbox_key(&summary.namespace, &name);
    let result = if held_by_legacy(&app, &summary.namespace, &name).await? {
        Err(Error::AlreadyExists(name.clone()))
    } else {
        app.backend
            .clone_sandbox(&found.key, &key, created_by)
            .await
            .map(shown)
            .map_err(|e| named(e, &key, &name))
    };
    audit_action(
        &app,
        &id,
        Some(&name),
        Some(&summary.namespace),
        "clone",
        &result,
    );
    Ok((StatusCode::ACCEPTED, Json(result?)).into_response())
}

fn parse_time(text: Option<&str>) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(text?).ok()
}

/// Sweeps every `--lifecycle-interval` until the process ends.
pub async fn run(app: Arc<AppState>) {
    if !app.backend.keeps_lifecycle() {
        return;
    }
    let mut tick = tokio::time::interval(app.cfg.lifecycle_interval.max(MIN_INTERVAL));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = sweep(&app).await {
            tracing::warn!(error = %e, "lifecycle sweep failed");
        }
    }
}

/// Keeps the warm pools full: a look every 250 ms (a directory listing when nothing is to
/// do; on Kubernetes a look at the caches, and each template's ConfigMap read at most every
/// 10 s since it may ask for a pool); after a failed start, the next try waits 5 s.
pub async fn run_pools(app: Arc<AppState>) {
    // Kubernetes: a template's ConfigMap may ask for a pool too (`warmPool`), at any time.
    let kubernetes = app.cfg.backend == crate::config::BackendKind::Kubernetes;
    if !kubernetes
        && !app
            .templates
            .all()
            .iter()
            .any(|t| t.warm_pool.as_ref().is_some_and(|p| p.size > 0))
    {
        // No pools: once, to stop those an earlier templates file asked for.
        if let Err(e) = app.backend.refill_pools(app.templates.all()).await {
            tracing::warn!(error = %e, "cannot empty the warm pools");
        }
        return;
    }
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Err(e) = app.backend.refill_pools(app.templates.all()).await {
            tracing::warn!(error = %e, "cannot refill a warm pool");
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    }
}

/// Warm pools
///
/// Each template's warm pool: its size, how many pooled sandboxes are ready now, and this
/// control plane's claims since it started (`hits`) and creates that found none ready
/// (`misses`). Pooled sandboxes are never listed among the sandboxes.
#[utoipa::path(get, path = "/api/v1/warmpool/status", tag = "sandboxes",
    responses((status = 200, description = "The warm pools.", body = WarmPoolStatus), (status = 401, description = "`unauthorized`: no valid credential.", body = ErrorBody)))]
pub(crate) async fn warm_pool_status(State(app): State<Arc<AppState>>) -> Json<WarmPoolStatus> {
    Json(WarmPoolStatus {
        pools: app.backend.warm_pools(app.templates.all()),
    })
}

/// One look at every sandbox: those past their lifetime end, those idle past their
/// `idleTimeout` (and running no invoke) stop.
pub async fn sweep(app: &AppState) -> Result<()> {
    let now = SystemTime::now();
    for s in app.backend.list().await? {
        let asleep = s.stop_reason == Some(StopReason::Idle);
        if s.status != SandboxStatus::Running && !asleep {
            continue;
        }
        if parse_time(s.expires_at.as_deref()).is_some_and(|end| end <= now) {
            let result = app.backend.expire(&s.name).await;
            record(app, &s, "expire", &result);
            continue;
        }
        if s.status != SandboxStatus::Running {
            continue;
        }
        let Some(idle) = s
            .idle_timeout
            .as_deref()
            .and_then(|t| parse_duration(t).ok())
        else {
            continue;
        };
        let Some(last) =
            parse_time(s.last_activity_at.as_deref()).or(parse_time(s.created_at.as_deref()))
        else {
            continue;
        };
        if now.duration_since(last).unwrap_or_default() < idle {
            continue;
        }
        // A long invoke (an agent's turn, a build) is use, however quiet its caller, and the
        // idle time runs from its end.
        match last_use(app, &s.name).await {
            Ok(Use::Now) => {
                app.backend.touch(&s.name);
                continue;
            }
            Ok(Use::Ended(end)) if now.duration_since(end).unwrap_or_default() < idle => continue,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(sandbox = %s.name, error = %e, "cannot tell whether an idle sandbox is busy; left running");
                continue;
            }
        }
        let since = now.checked_sub(idle).unwrap_or(last);
        let result = app.backend.stop_for(&s.name, StopReason::Idle, since).await;
        if matches!(result, Ok(Some(_)) | Err(_)) {
            record(app, &s, "stop.idle", &result);
        }
    }
    Ok(())
}

fn record<T>(app: &AppState, s: &SandboxSummary, action: &str, result: &Result<T>) {
    if matches!(result, Err(Error::SandboxNotFound(_))) {
        return; // deleted meanwhile
    }
    match result {
        Ok(_) => tracing::info!(sandbox = %s.name, action, "lifecycle"),
        Err(e) => tracing::warn!(sandbox = %s.name, action, error = %e, "lifecycle action failed"),
    }
    let (outcome, status) = match result {
        Ok(_) => ("ok", 200),
        Err(e) => ("error", e.status().as_u16()),
    };
    app.audit.write(&audit::Record {
        time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        actor: "agentbox",
        sandbox: Some(display_name(&s.name, &s.namespace)),
        namespace: Some(&s.namespace),
        action,
        outcome,
        status,
        ..Default::default()
    });
}

/// What a runner's invokes say about its use.
enum Use {
    /// An invoke (or exec) runs.
    Now,
    /// The last one ended then.
    Ended(SystemTime),
    /// None on record.
    Never,
}

/// Whether the sandbox's runner has an invoke (or exec) running, else when its last one
/// ended, from its `GET /v1/invokes`.
async fn last_use(app: &AppState, name: &str) -> Result<Use> {
    let Some(target) = app.backend.resolve(name).await? else {
        return Ok(Use::Never);
    };
    if target.status != SandboxStatus::Running {
        return Ok(Use::Never);
    }
    let request = axum::http::Request::get("/v1/invokes")
        .body(Body::empty())
        .map_err(|e| Error::Internal(e.to_string()))?;
    let response = app
        .proxy
        .forward(&target, "/v1/invokes", request, false)
        .await?;
    if !response.status().is_success() {
        return Err(Error::RunnerUnreachable(format!(
            "GET /v1/invokes answered {}",
            response.status()
        )));
    }
    let body = http_body_util::Limited::new(response.into_body(), INVOKE_LIST_LIMIT)
        .collect()
        .await
        .map_err(|e| Error::RunnerUnreachable(e.to_string()))?
        .to_bytes();
    let list: InvokeList = serde_json::from_slice(&body)
        .map_err(|e| Error::RunnerUnreachable(format!("a bad invoke list: {e}")))?;
    if list.invokes.iter().any(|i| i.state == InvokeState::Running) {
        return Ok(Use::Now);
    }
    Ok(list
        .invokes
        .iter()
        .map(|i| i.started_at + i.duration_ms.unwrap_or(0))
        .max()
        .map_or(Use::Never, |ms| {
            Use::Ended(SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
        }))
}

/// `target` if it is running; a sandbox stopped for idleness is woken first (bounded, see
/// [`wake`]); any other phase is 409 `sandbox_not_running`. Notes the use.
/// The ports routes and the terminal use it (the runner routes wake in `api`).
pub(crate) async fn running(
    app: &AppState,
    key: &str,
    name: &str,
    target: Target,
) -> Result<Target> {
    let target = if target.status == SandboxStatus::Stopped
        && target.stop_reason == Some(agentbox_proto::StopReason::Idle)
    {
        wake(app, key, name)
            .await
            .map_err(|e| crate::api::named(e, key, name))?
    } else {
        target
    };
    if target.status != SandboxStatus::Running {
        return Err(Error::NotRunning {
            name: name.to_owned(),
            status: target.status.as_str(),
        });
    }
    app.backend.touch(key);
    Ok(target)
}

/// Resumes the sandbox keyed `name` (shown as `shown`), stopped for being idle, and answers
/// its new target: the request that found it asleep waits (at most the runner start timeout
/// and 5 s) and is then served.
pub async fn wake(app: &AppState, name: &str, shown: &str) -> Result<Target> {
    // A lifetime that ended while the sandbox slept ends now (a stop answers 409, a delete 404).
    let expired = app.backend.get(name).await?.is_some_and(|s| {
        parse_time(s.expires_at.as_deref()).is_some_and(|end| end <= SystemTime::now())
    });
    if expired {
        app.backend.expire(name).await?;
        return app
            .backend
            .resolve(name)
            .await?
            .ok_or_else(|| Error::SandboxNotFound(name.into()));
    }
    let bound = app.cfg.runner_start_timeout + Duration::from_secs(5);
    tokio::time::timeout(bound, app.backend.resume(name))
        .await
        .map_err(|_| {
            Error::Backend(format!(
                "sandbox {shown:?} was idle and did not resume within {}s",
                bound.as_secs()
            ))
        })??;
    tracing::info!(sandbox = %name, "resumed on demand");
    app.backend
        .resolve(name)
        .await?
        .ok_or_else(|| Error::SandboxNotFound(name.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        for bad in ["", "-1s", "5", "5x", "s", "1e400h", "0s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert!(check_duration("idleTimeout", "500ms").is_err());
        assert_eq!(check_duration("timeout", "2s"), Ok(Duration::from_secs(2)));
    }
}
