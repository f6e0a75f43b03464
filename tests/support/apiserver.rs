//! A small Kubernetes API server for controller tests: objects in memory, the
//! HTTP protocol kube-rs speaks (list with resourceVersion, watch streams with
//! ADDED/MODIFIED/DELETED/BOOKMARK and 410 Gone, get, create, replace with
//! conflict checks, merge patch, server-side apply approximated as merge, the
//! status subresource, deletes with ownerReference cascade). It can be stopped
//! and restarted on the same address with its state kept.
//!
//! It refuses what Kubernetes refuses, so tests cannot pass on behaviour a
//! real cluster does not have: an EndpointSlice of more than 1,000
//! endpoints (422), an object over etcd's 1.5 MiB (413), and a write that
//! changes nothing is not written (no new resourceVersion, no watch event).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

type Body = BoxBody<Bytes, Infallible>;

/// (apiVersion, kind, has status subresource) of the resources we serve.
fn resource_info(plural: &str) -> Option<(&'static str, &'static str, bool)> {
    Some(match plural {
        "balancedservices" => ("balanced.dev/v1alpha1", "BalancedService", true),
        "endpointslices" => ("discovery.k8s.io/v1", "EndpointSlice", false),
        "deployments" => ("apps/v1", "Deployment", true),
        "services" => ("v1", "Service", true),
        "serviceaccounts" => ("v1", "ServiceAccount", false),
        "secrets" => ("v1", "Secret", false),
        "roles" => ("rbac.authorization.k8s.io/v1", "Role", false),
        "rolebindings" => ("rbac.authorization.k8s.io/v1", "RoleBinding", false),
        "leases" => ("coordination.k8s.io/v1", "Lease", false),
        "events" => ("events.k8s.io/v1", "Event", false),
        _ => return None,
    })
}

#[derive(Clone, Debug)]
struct WatchEvent {
    rv: u64,
    kind: &'static str,
    plural: String,
    namespace: String,
    object: Value,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// Watches from before this resourceVersion get 410 Gone.
    compacted: u64,
    objects: BTreeMap<(String, String, String), Value>,
    log: Vec<WatchEvent>,
    requests: Vec<String>,
    calls: Vec<(String, String, String)>,
    /// Writes that changed an object (creates, updates, patches, deletes).
    writes: u64,
    /// Writes that changed nothing.
    noop_writes: u64,
    /// Answer every status write with 500 (a test proving status is not read).
    refuse_status: bool,
}

/// Kubernetes' limit on endpoints in one EndpointSlice.
pub const MAX_SLICE_ENDPOINTS: usize = 1000;
/// etcd's request limit, which bounds every object.
pub const MAX_OBJECT_BYTES: usize = 1536 * 1024;

/// The server and handles to poke it.
#[derive(Clone)]
pub struct ApiServer {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<WatchEvent>,
    stop: Arc<Mutex<CancellationToken>>,
    close_watches: Arc<Mutex<CancellationToken>>,
}

impl ApiServer {
    pub async fn start() -> ApiServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (events, _) = broadcast::channel(4096);
        let server = ApiServer {
            addr,
            state: Arc::new(Mutex::new(State::default())),
            events,
            stop: Arc::new(Mutex::new(CancellationToken::new())),
            close_watches: Arc::new(Mutex::new(CancellationToken::new())),
        };
        server.serve(listener);
        server
    }

    /// A kube client for this server.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(format!("http://{}", self.addr).parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    /// Closes the listener and every connection (watches included).
    pub fn stop(&self) {
        self.stop.lock().unwrap().cancel();
    }

    /// Listens again on the same address with the same objects.
    pub async fn restart(&self) {
        *self.stop.lock().unwrap() = CancellationToken::new();
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                // The old listener's port may take a moment to be free again.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        };
        self.serve(listener);
    }

    /// Ends every watch and makes their resourceVersions too old: clients must re-list.
    pub fn expire_watches(&self) {
        {
            let mut s = self.state.lock().unwrap();
            // Every version seen so far is now too old to watch from.
            s.rv += 1;
            s.compacted = s.rv;
        }
        let mut token = self.close_watches.lock().unwrap();
        token.cancel();
        *token = CancellationToken::new();
    }

    /// Every (group, resource[/subresource], verb) requested so far.
    pub fn api_calls(&self) -> Vec<(String, String, String)> {
        self.state.lock().unwrap().calls.clone()
    }

    /// From now on, every write to a status subresource fails with 500.
    pub fn refuse_status_writes(&self) {
        self.state.lock().unwrap().refuse_status = true;
    }

    /// (writes that changed an object, writes that changed nothing) so far.
    pub fn write_counts(&self) -> (u64, u64) {
        let s = self.state.lock().unwrap();
        (s.writes, s.noop_writes)
    }

    /// Every object of `plural` in `namespace` whose labels match `selector` (`k=v,...`).
    pub fn list_selected(&self, plural: &str, namespace: &str, selector: &str) -> Vec<Value> {
        let query = BTreeMap::from([("labelSelector".to_string(), selector.to_string())]);
        self.list(plural, namespace)
            .into_iter()
            .filter(|o| selected(o, &query))
            .collect()
    }

    /// How many requests matched `needle` (method and path).
    pub fn requests_matching(&self, needle: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|r| r.contains(needle))
            .count()
    }

    fn serve(&self, listener: TcpListener) {
        let stop = self.stop.lock().unwrap().clone();
        let server = self.clone();
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = listener.accept() => match a { Ok((s, _)) => s, Err(_) => continue },
                };
                let server = server.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let server = server.clone();
                        async move { Ok::<_, Infallible>(server.handle(req).await) }
                    });
                    let conn =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = conn => {}
                    }
                });
            }
        });
    }

    /// Creates or replaces an object directly (a test acting as kubectl).
    pub fn put(&self, plural: &str, namespace: &str, object: Value) -> Value {
        let name = object["metadata"]["name"].as_str().unwrap().to_string();
        let mut s = self.state.lock().unwrap();
        let exists = s
            .objects
            .contains_key(&(plural.to_string(), namespace.to_string(), name.clone()));
        let status_sub = resource_info(plural).map(|r| r.2).unwrap_or(false);
        let result = if exists {
            write(
                &mut s,
                &self.events,
                plural,
                namespace,
                &name,
                object,
                Write::Replace {
                    status_sub,
                    check_rv: false,
                },
            )
        } else {
            write(&mut s, &self.events, plural, namespace, &name, object, Write::Create)
        };
        result.unwrap()
    }

    /// Puts an EndpointSlice of `service` (as Kubernetes' EndpointSlice
    /// controller would) with one port named `http` and `endpoints` as given.
    pub fn put_service_slice(&self, namespace: &str, name: &str, service: &str, port: u16, endpoints: Vec<Value>) {
        self.put(
            "endpointslices",
            namespace,
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                   "metadata": {"name": name, "namespace": namespace,
                                "labels": {"kubernetes.io/service-name": service}},
                   "addressType": "IPv4",
                   "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
                   "endpoints": endpoints}),
        );
    }

    /// Merges `patch` into the object's status (a test acting as another controller).
    pub fn patch_status(&self, plural: &str, namespace: &str, name: &str, status: Value) {
        let mut s = self.state.lock().unwrap();
        let patch = json!({ "status": status });
        write(&mut s, &self.events, plural, namespace, name, patch, Write::StatusMerge).unwrap();
    }

    pub fn get(&self, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        let s = self.state.lock().unwrap();
        s.objects.get(&(plural.into(), namespace.into(), name.into())).cloned()
    }

    pub fn list(&self, plural: &str, namespace: &str) -> Vec<Value> {
        let s = self.state.lock().unwrap();
        s.objects
            .iter()
            .filter(|((p, ns, _), _)| p == plural && ns == namespace)
            .map(|(_, v)| v.clone())
            .collect()
    }

    pub fn delete(&self, plural: &str, namespace: &str, name: &str) {
        let mut s = self.state.lock().unwrap();
        delete(&mut s, &self.events, plural, namespace, name);
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let query: BTreeMap<String, String> = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), decode(v)))
            .collect();
        self.state.lock().unwrap().requests.push(format!("{method} {path}"));
        let Some(target) = parse_path(&path) else {
            return status_response(StatusCode::NOT_FOUND, "NotFound", &format!("no route {path}"));
        };
        let Some((api_version, kind, status_sub)) = resource_info(&target.plural) else {
            return status_response(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("unknown resource {}", target.plural),
            );
        };
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let body: Value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).unwrap_or(Value::Null)
        };
        let ns = target.namespace.clone().unwrap_or_default();
        let verb = match (&method, &target.name) {
            (&Method::GET, None) if query.get("watch").is_some_and(|w| w == "true" || w == "1") => "watch",
            (&Method::GET, None) => "list",
            (&Method::GET, Some(_)) => "get",
            (&Method::POST, _) => "create",
            (&Method::PUT, _) => "update",
            (&Method::PATCH, _) => "patch",
            (&Method::DELETE, _) => "delete",
            _ => "other",
        };
        let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("").to_string();
        let resource = if target.status {
            format!("{}/status", target.plural)
        } else {
            target.plural.clone()
        };
        self.state
            .lock()
            .unwrap()
            .calls
            .push((group, resource, verb.to_string()));
        // Secrets are granted by name (a Role's resourceNames): Kubernetes
        // authorizes a list or watch of them only with a field selector on
        // one name, and refuses the rest.
        if target.plural == "secrets"
            && matches!(verb, "list" | "watch")
            && !query
                .get("fieldSelector")
                .is_some_and(|f| f.starts_with("metadata.name=") && !f.contains(','))
        {
            return status_response(
                StatusCode::FORBIDDEN,
                "Forbidden",
                "secrets is forbidden: a list or watch must select one Secret by name (metadata.name=...)",
            );
        }
        match (&method, &target.name) {
            (&Method::GET, None) if query.get("watch").is_some_and(|w| w == "true" || w == "1") => {
                self.watch(target, query, api_version, kind)
            }
            (&Method::GET, None) => {
                let s = self.state.lock().unwrap();
                let items: Vec<Value> = s
                    .objects
                    .iter()
                    .filter(|((p, o_ns, _), obj)| {
                        *p == target.plural && (target.namespace.is_none() || *o_ns == ns) && selected(obj, &query)
                    })
                    .map(|(_, v)| v.clone())
                    .collect();
                json_response(
                    StatusCode::OK,
                    &json!({
                        "apiVersion": api_version, "kind": format!("{kind}List"),
                        "metadata": {"resourceVersion": s.rv.to_string()}, "items": items,
                    }),
                )
            }
            (&Method::GET, Some(name)) => match self.get(&target.plural, &ns, name) {
                Some(obj) => json_response(StatusCode::OK, &obj),
                None => not_found(kind, name),
            },
            (&Method::POST, None) => {
                let name = body["metadata"]["name"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| {
                        format!(
                            "{}{}",
                            body["metadata"]["generateName"].as_str().unwrap_or("obj-"),
                            self.state.lock().unwrap().rv + 1
                        )
                    });
                let mut body = body;
                body["metadata"]["name"] = json!(name);
                let mut s = self.state.lock().unwrap();
                respond(write(
                    &mut s,
                    &self.events,
                    &target.plural,
                    &ns,
                    &name,
                    body,
                    Write::Create,
                ))
            }
            (&Method::PUT, Some(name)) => {
                let mut s = self.state.lock().unwrap();
                let mode = if target.status {
                    Write::StatusReplace
                } else {
                    Write::Replace {
                        status_sub,
                        check_rv: true,
                    }
                };
                respond(write(&mut s, &self.events, &target.plural, &ns, name, body, mode))
            }
            (&Method::PATCH, Some(_)) if target.status && self.state.lock().unwrap().refuse_status => status_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "status writes refused by the test",
            ),
            (&Method::PATCH, Some(name)) => {
                let mut s = self.state.lock().unwrap();
                let exists = s
                    .objects
                    .contains_key(&(target.plural.clone(), ns.clone(), name.clone()));
                let mode = if target.status {
                    Write::StatusMerge
                } else if !exists && query.contains_key("fieldManager") && body.get("apiVersion").is_some() {
                    // Server-side apply of a new object creates it.
                    Write::Create
                } else {
                    Write::Merge { status_sub }
                };
                respond(write(&mut s, &self.events, &target.plural, &ns, name, body, mode))
            }
            (&Method::DELETE, Some(name)) => {
                let mut s = self.state.lock().unwrap();
                match delete(&mut s, &self.events, &target.plural, &ns, name) {
                    Some(obj) => json_response(StatusCode::OK, &obj),
                    None => not_found(kind, name),
                }
            }
            _ => status_response(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "unsupported"),
        }
    }

    fn watch(
        &self,
        target: Target,
        query: BTreeMap<String, String>,
        api_version: &'static str,
        kind: &'static str,
    ) -> Response<Body> {
        let since: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        let (tx, rx) = mpsc::channel::<Bytes>(1024);
        let mut live = self.events.subscribe();
        let (backlog, compacted, current) = {
            let s = self.state.lock().unwrap();
            (
                s.log.iter().filter(|e| e.rv > since).cloned().collect::<Vec<_>>(),
                s.compacted,
                s.rv,
            )
        };
        let stop = self.stop.lock().unwrap().clone();
        let close = self.close_watches.lock().unwrap().clone();
        let line = |v: Value| {
            let mut b = serde_json::to_vec(&v).unwrap();
            b.push(b'\n');
            Bytes::from(b)
        };
        let matches = {
            let target = target.clone();
            let query = query.clone();
            move |e: &WatchEvent| {
                e.plural == target.plural
                    && target.namespace.as_ref().is_none_or(|ns| *ns == e.namespace)
                    && selected(&e.object, &query)
            }
        };
        tokio::spawn(async move {
            if since != 0 && since < compacted {
                let gone = json!({"type": "ERROR", "object": {
                    "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired",
                    "message": format!("too old resource version: {since} ({compacted})"), "code": 410}});
                let _ = tx.send(line(gone)).await;
                return;
            }
            let mut last = since;
            for e in backlog.iter().filter(|e| matches(e)) {
                last = e.rv;
                if tx
                    .send(line(json!({"type": e.kind, "object": e.object})))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let bookmark = json!({"type": "BOOKMARK", "object": {"apiVersion": api_version, "kind": kind,
                "metadata": {"resourceVersion": current.max(last).to_string()}}});
            let _ = tx.send(line(bookmark)).await;
            loop {
                let e = tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = close.cancelled() => return,
                    e = live.recv() => match e { Ok(e) => e, Err(_) => return },
                };
                if e.rv > last
                    && matches(&e)
                    && tx
                        .send(line(json!({"type": e.kind, "object": e.object})))
                        .await
                        .is_err()
                {
                    return;
                }
            }
        });
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
        });
        Response::builder()
            .header("content-type", "application/json")
            .body(BodyExt::boxed(StreamBody::new(stream)))
            .unwrap()
    }
}

#[derive(Clone, Debug)]
struct Target {
    plural: String,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn parse_path(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest = match parts.as_slice() {
        ["api", "v1", rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    match rest {
        [plural] => Some(Target {
            plural: plural.to_string(),
            namespace,
            name: None,
            status: false,
        }),
        [plural, name] => Some(Target {
            plural: plural.to_string(),
            namespace,
            name: Some(name.to_string()),
            status: false,
        }),
        [plural, name, "status"] => Some(Target {
            plural: plural.to_string(),
            namespace,
            name: Some(name.to_string()),
            status: true,
        }),
        _ => None,
    }
}

fn decode(v: &str) -> String {
    let mut out = Vec::new();
    let bytes = v.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// labelSelector (`k`, `k=v`, comma-separated) and fieldSelector (`metadata.name=x`).
fn selected(obj: &Value, query: &BTreeMap<String, String>) -> bool {
    let labels = &obj["metadata"]["labels"];
    let label_ok = query.get("labelSelector").is_none_or(|sel| {
        sel.split(',')
            .filter(|s| !s.is_empty())
            .all(|term| match term.split_once('=') {
                Some((k, v)) => labels[k].as_str() == Some(v.trim_start_matches('=')),
                None => labels.get(term).is_some(),
            })
    });
    let field_ok = query.get("fieldSelector").is_none_or(|sel| {
        sel.split(',')
            .filter(|s| !s.is_empty())
            .all(|term| match term.split_once('=') {
                Some(("metadata.name", v)) => obj["metadata"]["name"].as_str() == Some(v),
                Some(("metadata.namespace", v)) => obj["metadata"]["namespace"].as_str() == Some(v),
                _ => true,
            })
    });
    label_ok && field_ok
}

enum Write {
    Create,
    Replace { status_sub: bool, check_rv: bool },
    Merge { status_sub: bool },
    StatusMerge,
    StatusReplace,
}

fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

type WriteResult = Result<Value, (StatusCode, &'static str, String)>;

fn write(
    s: &mut State,
    events: &broadcast::Sender<WatchEvent>,
    plural: &str,
    ns: &str,
    name: &str,
    body: Value,
    mode: Write,
) -> WriteResult {
    let key = (plural.to_string(), ns.to_string(), name.to_string());
    let (api_version, kind, _) = resource_info(plural).unwrap();
    let existing = s.objects.get(&key).cloned();
    let (mut obj, event) = match (mode, existing) {
        (Write::Create, Some(_)) => {
            return Err((
                StatusCode::CONFLICT,
                "AlreadyExists",
                format!("{kind} {name} already exists"),
            ));
        }
        (Write::Create, None) => {
            let mut obj = body;
            obj["apiVersion"] = json!(api_version);
            obj["kind"] = json!(kind);
            obj["metadata"]["name"] = json!(name);
            if !ns.is_empty() {
                obj["metadata"]["namespace"] = json!(ns);
            }
            obj["metadata"]["uid"] = json!(format!("uid-{plural}-{ns}-{name}-{}", s.rv + 1));
            obj["metadata"]["generation"] = json!(1);
            obj["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
            (obj, "ADDED")
        }
        (_, None) => return Err((StatusCode::NOT_FOUND, "NotFound", format!("{kind} {name} not found"))),
        (Write::Replace { status_sub, check_rv }, Some(old)) => {
            if check_rv
                && let Some(rv) = body["metadata"]["resourceVersion"].as_str()
                && Some(rv) != old["metadata"]["resourceVersion"].as_str()
            {
                return Err((
                    StatusCode::CONFLICT,
                    "Conflict",
                    format!("{kind} {name}: the object has been modified"),
                ));
            }
            let mut obj = body;
            for field in ["uid", "creationTimestamp", "generation"] {
                obj["metadata"][field] = old["metadata"][field].clone();
            }
            if status_sub {
                obj["status"] = old["status"].clone();
            }
            bump_generation(&mut obj, &old);
            (obj, "MODIFIED")
        }
        (Write::Merge { status_sub }, Some(old)) => {
            let mut obj = old.clone();
            let mut body = body;
            if status_sub && let Some(o) = body.as_object_mut() {
                o.remove("status");
            }
            merge(&mut obj, &body);
            bump_generation(&mut obj, &old);
            (obj, "MODIFIED")
        }
        (Write::StatusMerge, Some(old)) => {
            let mut obj = old.clone();
            merge(&mut obj["status"], &body["status"]);
            (obj, "MODIFIED")
        }
        (Write::StatusReplace, Some(old)) => {
            let mut obj = old.clone();
            obj["status"] = body["status"].clone();
            (obj, "MODIFIED")
        }
    };
    // Garbage collection: an object whose owners are all gone is removed (a
    // controller may still apply an owned object just after its owner died).
    if let Some(refs) = obj["metadata"]["ownerReferences"].as_array()
        && !refs.is_empty()
        && !refs
            .iter()
            .any(|r| s.objects.values().any(|o| o["metadata"]["uid"] == r["uid"]))
    {
        return Ok(obj);
    }
    if obj.get("status").is_some_and(Value::is_null) {
        obj.as_object_mut().unwrap().remove("status");
    }
    if plural == "endpointslices"
        && let Some(n) = obj["endpoints"].as_array().map(Vec::len)
        && n > MAX_SLICE_ENDPOINTS
    {
        return Err((
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            format!(
                "EndpointSlice.discovery.k8s.io \"{name}\" is invalid: endpoints: Too many: {n}: must have at most {MAX_SLICE_ENDPOINTS} items"
            ),
        ));
    }
    let size = serde_json::to_vec(&obj).map_or(0, |b| b.len());
    if size > MAX_OBJECT_BYTES {
        return Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            format!("etcdserver: request is too large ({size} bytes for {kind} {name})"),
        ));
    }
    // A write that changes nothing: the API server answers with the object
    // as it is, with no new resourceVersion and no watch event.
    if let Some(old) = s.objects.get(&key) {
        let mut same = obj.clone();
        same["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        if same == *old {
            s.noop_writes += 1;
            return Ok(old.clone());
        }
    }
    s.rv += 1;
    s.writes += 1;
    obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
    s.objects.insert(key, obj.clone());
    let e = WatchEvent {
        rv: s.rv,
        kind: event,
        plural: plural.to_string(),
        namespace: ns.to_string(),
        object: obj.clone(),
    };
    s.log.push(e.clone());
    let _ = events.send(e);
    Ok(obj)
}

fn bump_generation(obj: &mut Value, old: &Value) {
    let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
    let changed = obj["spec"] != old["spec"];
    obj["metadata"]["generation"] = json!(if changed { generation + 1 } else { generation });
}

fn delete(s: &mut State, events: &broadcast::Sender<WatchEvent>, plural: &str, ns: &str, name: &str) -> Option<Value> {
    let obj = s
        .objects
        .remove(&(plural.to_string(), ns.to_string(), name.to_string()))?;
    s.rv += 1;
    s.writes += 1;
    let e = WatchEvent {
        rv: s.rv,
        kind: "DELETED",
        plural: plural.to_string(),
        namespace: ns.to_string(),
        object: obj.clone(),
    };
    s.log.push(e.clone());
    let _ = events.send(e);
    // Garbage collection: everything owned by the deleted object goes too.
    let uid = obj["metadata"]["uid"].clone();
    let owned: Vec<(String, String, String)> = s
        .objects
        .iter()
        .filter(|(_, o)| {
            o["metadata"]["ownerReferences"]
                .as_array()
                .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid))
        })
        .map(|(k, _)| k.clone())
        .collect();
    for (p, n, name) in owned {
        delete(s, events, &p, &n, &name);
    }
    Some(obj)
}

fn respond(result: WriteResult) -> Response<Body> {
    match result {
        Ok(obj) => json_response(StatusCode::OK, &obj),
        Err((code, reason, message)) => status_response(code, reason, &message),
    }
}

fn not_found(kind: &str, name: &str) -> Response<Body> {
    status_response(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{kind} \"{name}\" not found"),
    )
}

fn status_response(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "message": message, "code": code.as_u16()}),
    )
}

fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(Full::new(Bytes::from(serde_json::to_vec(v).unwrap()))))
        .unwrap()
}
