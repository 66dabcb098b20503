//! A tiny stand-in for the Kubernetes API server (the one mock the Kubernetes tests use):
//! namespaced core/v1 objects, coordination.k8s.io/v1 Leases and snapshot.storage.k8s.io/v1
//! VolumeSnapshots kept as JSON, served over HTTP exactly the way kube's client and watcher
//! call it: list (with `resourceVersion` in the list metadata; metadata only when asked for a
//! `PartialObjectMetadataList`), watch (`?watch=true&resourceVersion=N`, a stream of JSON lines
//! `{"type", "object"}` starting after N, ending after `timeoutSeconds`), get, create (POST),
//! delete, merge patch and replace (PUT), with equality label selectors and `Status` errors. As
//! the API server, a `metadata.resourceVersion` in a patch or a replace, and
//! `preconditions.resourceVersion` in a delete's options, is a precondition: a stale one is
//! answered 409 Conflict, checked and written under one lock. It has no garbage collector:
//! owner references are kept, not followed.
//! Tests change objects directly (as a kubelet or a user would) and read every request made.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::broadcast;

/// One request the fixture received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Req {
    pub method: String,
    pub path: String,
    pub query: String,
}

impl Req {
    pub fn is_watch(&self) -> bool {
        self.query.split('&').any(|p| p == "watch=true")
    }
}

/// One change, as a watch reports it.
#[derive(Debug, Clone)]
struct Change {
    /// When it happened (a lagging endpoint's watches deliver it `watch_delay` later).
    at: std::time::Instant,
    rv: u64,
    resource: String,
    namespace: String,
    kind: &'static str,
    object: Value,
}

#[derive(Debug, Default)]
struct Store {
    rv: u64,
    /// (resource, namespace, name) → object.
    objects: BTreeMap<(String, String, String), Value>,
    history: Vec<Change>,
    requests: Vec<Req>,
}

#[derive(Clone)]
struct Shared {
    store: Arc<Mutex<Store>>,
    changes: broadcast::Sender<Change>,
    /// How late this endpoint's watches deliver live changes (zero but on a lagging one).
    watch_delay: Duration,
}

/// The fake API server; it stops when dropped.
pub struct Fixture {
    pub addr: SocketAddr,
    shared: Shared,
    task: tokio::task::JoinHandle<()>,
    /// Lagging endpoints' servers.
    more: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.task.abort();
        for task in self.more.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

/// `kind` and `apiVersion` of a resource (the path segment).
fn kind_of(resource: &str) -> Option<&'static str> {
    Some(match resource {
        "pods" => "Pod",
        "secrets" => "Secret",
        "configmaps" => "ConfigMap",
        "persistentvolumeclaims" => "PersistentVolumeClaim",
        "events" => "Event",
        "leases" => "Lease",
        "volumesnapshots" => "VolumeSnapshot",
        _ => return None,
    })
}

/// The `apiVersion` of a resource's objects.
fn api_version_of(resource: &str) -> &'static str {
    match resource {
        "leases" => "coordination.k8s.io/v1",
        "volumesnapshots" => "snapshot.storage.k8s.io/v1",
        _ => "v1",
    }
}

fn status(code: u16, reason: &str, message: String) -> Response {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    (StatusCode::from_u16(code).unwrap(), Json(body)).into_response()
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

fn uid() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).unwrap();
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Whether `object`'s labels satisfy an equality selector `k=v,k2=v2`.
fn selected(object: &Value, selector: Option<&str>) -> bool {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    selector.split(',').all(|term| {
        let (key, value) = term
            .split_once("==")
            .or_else(|| term.split_once('='))
            .expect("only equality selectors");
        object["metadata"]["labels"][key].as_str() == Some(value)
    })
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            let map = target.as_object_mut().unwrap();
            for (key, value) in fields {
                if value.is_null() {
                    map.remove(key);
                } else {
                    merge(map.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        other => *target = other.clone(),
    }
}

impl Store {
    /// Stores `object` (its kind, apiVersion, namespace, resourceVersion and, when new, uid and
    /// creationTimestamp filled in) and records the change.
    fn put(&mut self, resource: &str, namespace: &str, mut object: Value) -> (Change, bool) {
        let name = object["metadata"]["name"].as_str().unwrap().to_owned();
        let key = (resource.to_owned(), namespace.to_owned(), name);
        self.rv += 1;
        object["kind"] = json!(kind_of(resource).unwrap());
        object["apiVersion"] = json!(api_version_of(resource));
        let meta = &mut object["metadata"];
        meta["namespace"] = json!(namespace);
        meta["resourceVersion"] = json!(self.rv.to_string());
        let old = self.objects.get(&key);
        let created = old.is_none();
        if meta.get("uid").is_none_or(Value::is_null) {
            meta["uid"] = old.map_or_else(|| json!(uid()), |o| o["metadata"]["uid"].clone());
        }
        if meta.get("creationTimestamp").is_none_or(Value::is_null) {
            meta["creationTimestamp"] = old.map_or_else(
                || json!(now_rfc3339()),
                |o| o["metadata"]["creationTimestamp"].clone(),
            );
        }
        self.objects.insert(key, object.clone());
        let change = Change {
            at: std::time::Instant::now(),
            rv: self.rv,
            resource: resource.to_owned(),
            namespace: namespace.to_owned(),
            kind: if created { "ADDED" } else { "MODIFIED" },
            object,
        };
        self.history.push(change.clone());
        (change, created)
    }

    fn remove(&mut self, resource: &str, namespace: &str, name: &str) -> Option<Change> {
        let key = (resource.to_owned(), namespace.to_owned(), name.to_owned());
        let mut object = self.objects.remove(&key)?;
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let change = Change {
            at: std::time::Instant::now(),
            rv: self.rv,
            resource: resource.to_owned(),
            namespace: namespace.to_owned(),
            kind: "DELETED",
            object,
        };
        self.history.push(change.clone());
        Some(change)
    }
}

impl Shared {
    fn put(&self, resource: &str, namespace: &str, object: Value) -> (Value, bool) {
        let mut store = self.store.lock().unwrap();
        let (change, created) = store.put(resource, namespace, object);
        let object = change.object.clone();
        let _ = self.changes.send(change);
        (object, created)
    }

    fn remove(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        let mut store = self.store.lock().unwrap();
        let change = store.remove(resource, namespace, name)?;
        let object = change.object.clone();
        let _ = self.changes.send(change);
        Some(object)
    }
}

async fn log_requests(State(shared): State<Shared>, request: Request, next: Next) -> Response {
    shared.store.lock().unwrap().requests.push(Req {
        method: request.method().to_string(),
        path: request.uri().path().to_owned(),
        query: request.uri().query().unwrap_or_default().to_owned(),
    });
    next.run(request).await
}

async fn collection(
    State(shared): State<Shared>,
    Path((namespace, resource)): Path<(String, String)>,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
    method: Method,
    body: Bytes,
) -> Response {
    if api_version_of(&resource) != "v1" {
        return status(
            404,
            "NotFound",
            format!("{resource} is not in the core group"),
        );
    }
    collection_of(shared, namespace, resource, &query, &headers, method, body)
}

/// A collection of a named API group (`/apis/{group}/{version}/...`).
async fn group_collection(
    State(shared): State<Shared>,
    Path((group, version, namespace, resource)): Path<(String, String, String, String)>,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
    method: Method,
    body: Bytes,
) -> Response {
    if api_version_of(&resource) != format!("{group}/{version}") {
        return status(
            404,
            "NotFound",
            format!("no {resource} in {group}/{version}"),
        );
    }
    collection_of(shared, namespace, resource, &query, &headers, method, body)
}

fn collection_of(
    shared: Shared,
    namespace: String,
    resource: String,
    query: &BTreeMap<String, String>,
    headers: &HeaderMap,
    method: Method,
    body: Bytes,
) -> Response {
    let Some(kind) = kind_of(&resource) else {
        return status(
            404,
            "NotFound",
            format!("the server could not find {resource}"),
        );
    };
    let selector = query.get("labelSelector").map(String::as_str);
    if method == Method::POST {
        let object: Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return status(400, "BadRequest", e.to_string()),
        };
        let Some(name) = object["metadata"]["name"].as_str() else {
            return status(422, "Invalid", "metadata.name is required".into());
        };
        let exists = shared.store.lock().unwrap().objects.contains_key(&(
            resource.clone(),
            namespace.clone(),
            name.to_owned(),
        ));
        if exists {
            return status(
                409,
                "AlreadyExists",
                format!("{resource} \"{name}\" already exists"),
            );
        }
        let mut object = object;
        if resource == "pods" && object.get("status").is_none_or(Value::is_null) {
            object["status"] = json!({"phase": "Pending"});
        }
        let (object, _) = shared.put(&resource, &namespace, object);
        return (StatusCode::CREATED, Json(object)).into_response();
    }
    if query.get("watch").map(String::as_str) == Some("true") {
        return watch(shared, resource, namespace, query);
    }
    let store = shared.store.lock().unwrap();
    let items: Vec<Value> = store
        .objects
        .iter()
        .filter(|((r, ns, _), o)| *r == resource && *ns == namespace && selected(o, selector))
        .map(|(_, o)| o.clone())
        .collect();
    let metadata_only = headers
        .get("accept")
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("as=PartialObjectMetadataList"));
    if metadata_only {
        let items: Vec<Value> = items
            .into_iter()
            .map(|o| {
                json!({
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": o["metadata"],
                })
            })
            .collect();
        return Json(json!({
            "kind": "PartialObjectMetadataList",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": store.rv.to_string()},
            "items": items,
        }))
        .into_response();
    }
    Json(json!({
        "kind": format!("{kind}List"),
        "apiVersion": api_version_of(&resource),
        "metadata": {"resourceVersion": store.rv.to_string()},
        "items": items,
    }))
    .into_response()
}

/// A watch: the changes after `resourceVersion` (every object as ADDED when it is absent or
/// 0), then live changes, until `timeoutSeconds`.
fn watch(
    shared: Shared,
    resource: String,
    namespace: String,
    query: &BTreeMap<String, String>,
) -> Response {
    let selector = query.get("labelSelector").cloned();
    let since: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = Duration::from_secs(
        query
            .get("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(300),
    );
    let relevant = {
        let (resource, namespace, selector) =
            (resource.clone(), namespace.clone(), selector.clone());
        move |c: &Change| {
            c.resource == resource
                && c.namespace == namespace
                && selected(&c.object, selector.as_deref())
        }
    };
    let (backlog, rx, last) = {
        let store = shared.store.lock().unwrap();
        let backlog: Vec<Change> = if since == 0 {
            store
                .objects
                .iter()
                .map(|((r, ns, _), o)| Change {
                    at: std::time::Instant::now(),
                    rv: store.rv,
                    resource: r.clone(),
                    namespace: ns.clone(),
                    kind: "ADDED",
                    object: o.clone(),
                })
                .filter(&relevant)
                .collect()
        } else {
            store
                .history
                .iter()
                .filter(|c| c.rv > since)
                .filter(|c| relevant(c))
                .cloned()
                .collect()
        };
        (backlog, shared.changes.subscribe(), store.rv)
    };
    let line = |c: &Change| -> Result<Bytes, Infallible> {
        let mut text = json!({"type": c.kind, "object": c.object}).to_string();
        text.push('\n');
        Ok(Bytes::from(text))
    };
    // A lagging watcher's stream ends; it watches again from its last resourceVersion.
    let delay = shared.watch_delay;
    let live = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.ok().map(|change| (change, rx))
    })
    .filter(move |c| std::future::ready(c.rv > last && relevant(c)))
    .then(move |c| async move {
        tokio::time::sleep_until((c.at + delay).into()).await;
        c
    });
    let stream = futures_util::stream::iter(backlog)
        .chain(live)
        .map(move |c| line(&c))
        .take_until(tokio::time::sleep(timeout));
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}

async fn item(
    State(shared): State<Shared>,
    Path((namespace, resource, name)): Path<(String, String, String)>,
    method: Method,
    body: Bytes,
) -> Response {
    if api_version_of(&resource) != "v1" {
        return status(
            404,
            "NotFound",
            format!("{resource} is not in the core group"),
        );
    }
    item_of(shared, namespace, resource, name, method, body)
}

/// An object of a named API group (`/apis/{group}/{version}/...`).
async fn group_item(
    State(shared): State<Shared>,
    Path((group, version, namespace, resource, name)): Path<(
        String,
        String,
        String,
        String,
        String,
    )>,
    method: Method,
    body: Bytes,
) -> Response {
    if api_version_of(&resource) != format!("{group}/{version}") {
        return status(
            404,
            "NotFound",
            format!("no {resource} in {group}/{version}"),
        );
    }
    item_of(shared, namespace, resource, name, method, body)
}

fn item_of(
    shared: Shared,
    namespace: String,
    resource: String,
    name: String,
    method: Method,
    body: Bytes,
) -> Response {
    if kind_of(&resource).is_none() {
        return status(
            404,
            "NotFound",
            format!("the server could not find {resource}"),
        );
    }
    let key = (resource.clone(), namespace.clone(), name.clone());
    let not_found = || status(404, "NotFound", format!("{resource} \"{name}\" not found"));
    match method {
        Method::GET => match shared.store.lock().unwrap().objects.get(&key) {
            Some(o) => Json(o.clone()).into_response(),
            None => not_found(),
        },
        Method::DELETE => {
            // DeleteOptions' `preconditions.resourceVersion`: 409 when the object changed.
            let want = serde_json::from_slice::<Value>(&body).ok().and_then(|o| {
                o["preconditions"]["resourceVersion"]
                    .as_str()
                    .map(str::to_owned)
            });
            let mut store = shared.store.lock().unwrap();
            if let (Some(want), Some(object)) = (&want, store.objects.get(&key)) {
                if object["metadata"]["resourceVersion"].as_str() != Some(want.as_str()) {
                    return status(
                        409,
                        "Conflict",
                        format!("precondition failed: resourceVersion {want} is stale"),
                    );
                }
            }
            match store.remove(&resource, &namespace, &name) {
                Some(change) => {
                    let object = change.object.clone();
                    let _ = shared.changes.send(change);
                    Json(object).into_response()
                }
                None => not_found(),
            }
        }
        Method::PATCH => {
            let patch: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return status(400, "BadRequest", e.to_string()),
            };
            // Read, check and write under one lock: a `metadata.resourceVersion` in the patch is
            // a precondition (409 Conflict when the object changed since), as the API server's.
            let mut store = shared.store.lock().unwrap();
            let Some(mut object) = store.objects.get(&key).cloned() else {
                return not_found();
            };
            if let Some(want) = patch["metadata"]["resourceVersion"].as_str() {
                if object["metadata"]["resourceVersion"].as_str() != Some(want) {
                    return status(
                        409,
                        "Conflict",
                        format!("the object has been modified; resourceVersion {want} is stale"),
                    );
                }
            }
            merge(&mut object, &patch);
            let (change, _) = store.put(&resource, &namespace, object);
            let object = change.object.clone();
            let _ = shared.changes.send(change);
            drop(store);
            Json(object).into_response()
        }
        Method::PUT => {
            let mut object: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return status(400, "BadRequest", e.to_string()),
            };
            if object["metadata"]["name"].as_str() != Some(name.as_str()) {
                return status(400, "BadRequest", "metadata.name does not match".into());
            }
            let mut store = shared.store.lock().unwrap();
            let Some(old) = store.objects.get(&key) else {
                return not_found();
            };
            if let Some(want) = object["metadata"]["resourceVersion"].as_str() {
                if old["metadata"]["resourceVersion"].as_str() != Some(want) {
                    return status(
                        409,
                        "Conflict",
                        format!("the object has been modified; resourceVersion {want} is stale"),
                    );
                }
            }
            object["metadata"]["uid"] = old["metadata"]["uid"].clone();
            object["metadata"]["creationTimestamp"] = old["metadata"]["creationTimestamp"].clone();
            let (change, _) = store.put(&resource, &namespace, object);
            let object = change.object.clone();
            let _ = shared.changes.send(change);
            drop(store);
            Json(object).into_response()
        }
        _ => status(405, "MethodNotAllowed", format!("{method} not allowed")),
    }
}

/// Serves the API on 127.0.0.1 (a free port).
async fn serve(shared: Shared) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let app = Router::new()
        .route(
            "/api/v1/namespaces/{ns}/{resource}",
            get(collection).post(collection),
        )
        .route(
            "/api/v1/namespaces/{ns}/{resource}/{name}",
            get(item).delete(item).patch(item).put(item),
        )
        .route(
            "/apis/{group}/{version}/namespaces/{ns}/{resource}",
            get(group_collection).post(group_collection),
        )
        .route(
            "/apis/{group}/{version}/namespaces/{ns}/{resource}/{name}",
            get(group_item)
                .delete(group_item)
                .patch(group_item)
                .put(group_item),
        )
        .fallback(|request: Request| async move {
            status(
                404,
                "NotFound",
                format!("no route for {}", request.uri().path()),
            )
        })
        .layer(middleware::from_fn_with_state(shared.clone(), log_requests))
        .with_state(shared);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (addr, task)
}

impl Fixture {
    /// Serves on 127.0.0.1 (a free port).
    pub async fn start() -> Fixture {
        let (changes, _) = broadcast::channel(4096);
        let shared = Shared {
            store: Arc::new(Mutex::new(Store::default())),
            changes,
            watch_delay: Duration::ZERO,
        };
        let (addr, task) = serve(shared.clone()).await;
        Fixture {
            addr,
            shared,
            task,
            more: Mutex::new(Vec::new()),
        }
    }

    /// Another endpoint of the same API server whose watches deliver every live change
    /// `delay` late (as a watch cache lagging behind etcd): a client's caches there lag every
    /// write by that much; its reads and writes do not.
    pub async fn lagging(&self, delay: Duration) -> SocketAddr {
        let shared = Shared {
            watch_delay: delay,
            ..self.shared.clone()
        };
        let (addr, task) = serve(shared).await;
        self.more.lock().unwrap().push(task);
        addr
    }

    /// A kubeconfig pointing at this fixture, with no credentials.
    pub fn kubeconfig(&self, namespace: &str) -> String {
        Self::kubeconfig_at(self.addr, namespace)
    }

    /// A kubeconfig pointing at `addr` (this fixture's, or a lagging endpoint's).
    pub fn kubeconfig_at(addr: SocketAddr, namespace: &str) -> String {
        json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fixture", "cluster": {"server": format!("http://{addr}")}}],
            "users": [{"name": "anonymous", "user": {}}],
            "contexts": [{"name": "fixture", "context": {
                "cluster": "fixture", "user": "anonymous", "namespace": namespace,
            }}],
            "current-context": "fixture",
        })
        .to_string()
    }

    /// Creates or replaces an object (as a user or a kubelet would); watches see it.
    pub fn put(&self, resource: &str, namespace: &str, object: impl serde::Serialize) -> Value {
        self.shared
            .put(resource, namespace, serde_json::to_value(object).unwrap())
            .0
    }

    /// Changes an object in place; watches see a MODIFIED event.
    pub fn update(&self, resource: &str, namespace: &str, name: &str, f: impl FnOnce(&mut Value)) {
        let mut object = self.get(resource, namespace, name).expect("no such object");
        f(&mut object);
        self.shared.put(resource, namespace, object);
    }

    /// Deletes an object; watches see a DELETED event.
    pub fn remove(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        self.shared.remove(resource, namespace, name)
    }

    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        self.shared
            .store
            .lock()
            .unwrap()
            .objects
            .get(&(resource.to_owned(), namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    pub fn list(&self, resource: &str, namespace: &str) -> Vec<Value> {
        self.shared
            .store
            .lock()
            .unwrap()
            .objects
            .iter()
            .filter(|((r, ns, _), _)| r == resource && ns == namespace)
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Req> {
        self.shared.store.lock().unwrap().requests.clone()
    }
}
