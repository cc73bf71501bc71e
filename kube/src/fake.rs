//! A stand-in Kubernetes API server for tests: no kube-apiserver can be
//! had on the machines causeway is built on, so the agent's kube-rs shell
//! is tested against this instead. It speaks the real API's JSON over a
//! `tower` service that a kube [`Client`] is built on: list with a
//! `resourceVersion`, watch as a stream of `ADDED`/`MODIFIED`/`DELETED`
//! events (and `BOOKMARK`s when asked), `410 Gone` for a resource version
//! older than the kept history ([`FakeApi::compact`]), get, create (`uid`,
//! `generation`, `creationTimestamp` filled in), replace with optimistic
//! concurrency (`409 Conflict` on a stale `resourceVersion`), merge and
//! apply patches of objects and of their `/status`, delete, and label
//! selectors `k=v`.
//! It does not validate objects against schemas, and it keeps everything
//! in memory.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use kube::Client;
use serde_json::{json, Value};
use tokio::sync::broadcast;

/// One object's place: collection path (e.g. `api/v1/services`), namespace,
/// name.
type Key = (String, String, String);

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    /// Every change: (resource version, collection, event type, object).
    log: Vec<(u64, String, &'static str, Value)>,
    /// Changes older than this are forgotten: watches from before get 410.
    compacted: u64,
    /// Requests that fail with 500 before being served.
    failures: u32,
    /// ClusterIPs handed out.
    next_ip: u32,
}

/// What the fake API server has served so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Served {
    /// List requests answered.
    pub lists: u32,
    /// Watches opened.
    pub watches: u32,
    /// Watches refused with 410 Gone.
    pub gone: u32,
    /// Requests failed on purpose ([`FakeApi::fail_next`]).
    pub failed: u32,
}

/// The fake API server. Clone it freely: clones share the store.
#[derive(Clone)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    pub(crate) events: broadcast::Sender<(u64, String, &'static str, Value)>,
    /// Bumped to end every open watch (clients then resume or re-list).
    epoch: Arc<tokio::sync::watch::Sender<u64>>,
    /// What was served so far.
    served: Arc<tokio::sync::watch::Sender<Served>>,
}

impl Default for FakeApi {
    fn default() -> Self {
        Self::new()
    }
}

/// A request path, parsed.
struct Target {
    /// `api/v1/services` or `apis/<group>/<version>/<plural>`.
    collection: String,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn parse_path(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, rest) = match *parts.first()? {
        "api" => (parts.get(..2)?.join("/"), &parts[2..]),
        "apis" => (parts.get(..3)?.join("/"), &parts[3..]),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        rest => (None, rest),
    };
    let (plural, name, status) = match rest {
        [plural] => (plural, None, false),
        [plural, name] => (plural, Some(name.to_string()), false),
        [plural, name, "status"] => (plural, Some(name.to_string()), true),
        _ => return None,
    };
    Some(Target {
        collection: format!("{prefix}/{plural}"),
        namespace,
        name,
        status,
    })
}

fn query(uri: &http::Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), urlish_decode(v)))
        .collect()
}

fn urlish_decode(v: &str) -> String {
    let mut out = String::new();
    let b = v.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(c) = u8::from_str_radix(&v[i + 1..i + 3], 16) {
                out.push(c as char);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { ' ' } else { b[i] as char });
        i += 1;
    }
    out
}

/// Whether `obj`'s labels match a selector of `k=v` terms.
fn selected(obj: &Value, selector: Option<&String>) -> bool {
    let Some(sel) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    sel.split(',').all(|term| match term.split_once('=') {
        Some((k, v)) => obj["metadata"]["labels"][k.trim_end_matches('=')] == json!(v),
        None => !obj["metadata"]["labels"][term].is_null(),
    })
}

fn merge(into: &mut Value, patch: &Value) {
    match (into, patch) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                if v.is_null() {
                    a.remove(k);
                } else {
                    merge(a.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (into, patch) => *into = patch.clone(),
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn respond(code: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("a valid response")
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    respond(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

impl FakeApi {
    /// An empty API server.
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(4096);
        Self {
            state: Arc::new(Mutex::new(State::default())),
            events,
            epoch: Arc::new(tokio::sync::watch::channel(0).0),
            served: Arc::new(tokio::sync::watch::channel(Served::default()).0),
        }
    }

    /// A kube client talking to this server (default namespace `default`).
    pub fn client(&self) -> Client {
        let api = self.clone();
        let svc = tower::service_fn(move |req: Request<kube::client::Body>| {
            let api = api.clone();
            async move { Ok::<_, Infallible>(api.handle(req).await) }
        });
        Client::new(svc, "default")
    }

    /// Serves the API over plain HTTP/1.1 on `listener` (loopback, for
    /// test processes: a gateway or agent pointed at it by
    /// [`FakeApi::kubeconfig`]) until the task is dropped.
    pub fn serve(&self, listener: tokio::net::TcpListener) -> tokio::task::JoinHandle<()> {
        let api = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let api = api.clone();
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let api = api.clone();
                            async move {
                                let (parts, body) = req.into_parts();
                                let bytes = body
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let req =
                                    Request::from_parts(parts, kube::client::Body::from(bytes));
                                Ok::<_, Infallible>(api.handle(req).await)
                            }
                        });
                    let io = hyper_util::rt::TokioIo::new(tcp);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                });
            }
        })
    }

    /// A kubeconfig for a client of [`FakeApi::serve`] at `addr`.
    pub fn kubeconfig(addr: std::net::SocketAddr) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n"
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores `obj` (its `apiVersion`, `kind`, `metadata.name` and, when
    /// namespaced, `metadata.namespace` set) in `collection` as a client's
    /// create or replace would; returns it as stored.
    pub fn put(&self, collection: &str, obj: Value) -> Value {
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        self.store(collection, &ns, &name, obj)
    }

    /// Deletes an object as a client would (watchers see `DELETED`).
    pub fn remove(&self, collection: &str, ns: &str, name: &str) -> Option<Value> {
        let mut st = self.lock();
        let obj = st
            .objects
            .remove(&(collection.into(), ns.into(), name.into()))?;
        st.rv += 1;
        let rv = st.rv;
        st.log.push((rv, collection.into(), "DELETED", obj.clone()));
        drop(st);
        let _ = self
            .events
            .send((rv, collection.into(), "DELETED", obj.clone()));
        Some(obj)
    }

    /// The stored object, if any.
    pub fn get(&self, collection: &str, ns: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&(collection.into(), ns.into(), name.into()))
            .cloned()
    }

    /// Every stored object of `collection`.
    pub fn list(&self, collection: &str) -> Vec<Value> {
        self.lock()
            .objects
            .iter()
            .filter(|((c, _, _), _)| c == collection)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Forgets the change history: a watch resuming from any resource
    /// version seen so far gets `410 Gone` and must list again.
    pub fn compact(&self) {
        let mut st = self.lock();
        st.compacted = st.rv;
        st.log.clear();
    }

    /// Ends every open watch, as an API server restart or a load balancer
    /// timeout would: clients resume from their last resource version (or
    /// list again after [`Self::compact`]).
    pub fn end_watches(&self) {
        self.epoch.send_modify(|e| *e += 1);
    }

    /// What was served so far.
    pub fn served(&self) -> Served {
        *self.served.borrow()
    }

    /// Waits (up to `within`) until what was served satisfies `f`; what was
    /// served then, or the last count on timeout.
    pub async fn served_where(
        &self,
        within: std::time::Duration,
        f: impl Fn(&Served) -> bool,
    ) -> Result<Served, Served> {
        let mut rx = self.served.subscribe();
        let found = match tokio::time::timeout(within, rx.wait_for(|s| f(s))).await {
            Ok(Ok(s)) => Some(*s),
            _ => None,
        };
        found.ok_or_else(|| self.served())
    }

    /// The next `n` requests fail with 500 Internal Server Error.
    pub fn fail_next(&self, n: u32) {
        self.lock().failures = n;
    }

    fn store(&self, collection: &str, ns: &str, name: &str, mut obj: Value) -> Value {
        let mut st = self.lock();
        let key = (collection.to_string(), ns.to_string(), name.to_string());
        let old = st.objects.get(&key).cloned();
        if let Some(o) = &old {
            // A write that changes nothing is a no-op, as on a real API
            // server: no new resource version, no event.
            let strip = |v: &Value| {
                let mut v = v.clone();
                if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
                    for k in ["resourceVersion", "uid", "generation", "creationTimestamp"] {
                        m.remove(k);
                    }
                }
                v
            };
            if strip(o) == strip(&obj) {
                return o.clone();
            }
        }
        if collection == "api/v1/services" && old.is_none() {
            // The API server allocates a ClusterIP to a new ClusterIP Service.
            let spec = &mut obj["spec"];
            let clusterip = spec["type"].as_str().unwrap_or("ClusterIP") != "ExternalName";
            if clusterip && spec["clusterIP"].is_null() {
                st.next_ip += 1;
                let ip = format!("10.96.{}.{}", st.next_ip / 250, 1 + st.next_ip % 250);
                spec["clusterIP"] = json!(ip);
                spec["clusterIPs"] = json!([ip]);
            }
        } else if let (Some(o), true) = (&old, collection == "api/v1/services") {
            // A Service keeps its ClusterIP across updates.
            if obj["spec"]["clusterIP"].is_null() {
                obj["spec"]["clusterIP"] = o["spec"]["clusterIP"].clone();
                obj["spec"]["clusterIPs"] = o["spec"]["clusterIPs"].clone();
            }
        }
        st.rv += 1;
        let rv = st.rv;
        let meta = &mut obj["metadata"];
        meta["resourceVersion"] = json!(rv.to_string());
        match &old {
            None => {
                meta["uid"] = json!(format!("uid-{rv}"));
                meta["generation"] = json!(1);
                meta["creationTimestamp"] = json!(format!(
                    "2026-01-01T00:{:02}:{:02}Z",
                    (rv / 60) % 60,
                    rv % 60
                ));
            }
            Some(o) => {
                for k in ["uid", "creationTimestamp"] {
                    meta[k] = o["metadata"][k].clone();
                }
                let gen = o["metadata"]["generation"].as_i64().unwrap_or(1);
                let spec_changed = o.get("spec") != obj.get("spec");
                obj["metadata"]["generation"] = json!(if spec_changed { gen + 1 } else { gen });
            }
        }
        let kind = if old.is_some() { "MODIFIED" } else { "ADDED" };
        st.objects.insert(key, obj.clone());
        st.log.push((rv, collection.to_string(), kind, obj.clone()));
        drop(st);
        let _ = self
            .events
            .send((rv, collection.to_string(), kind, obj.clone()));
        obj
    }

    async fn handle(&self, req: Request<kube::client::Body>) -> Response<Body> {
        {
            let mut st = self.lock();
            if st.failures > 0 {
                st.failures -= 1;
                self.served.send_modify(|s| s.failed += 1);
                return status(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    "injected failure",
                );
            }
        }
        let Some(t) = parse_path(req.uri().path()) else {
            return status(StatusCode::NOT_FOUND, "NotFound", "no such path");
        };
        let q = query(req.uri());
        let method = req.method().clone();
        let content_type = req
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return status(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body"),
        };
        let ns = t.namespace.clone().unwrap_or_default();
        match (method, &t.name) {
            (Method::GET, None)
                if matches!(q.get("watch").map(String::as_str), Some("true" | "1")) =>
            {
                self.watch(&t, &q)
            }
            (Method::GET, None) => self.list_response(&t, &q),
            (Method::GET, Some(name)) => match self.get(&t.collection, &ns, name) {
                Some(o) => respond(StatusCode::OK, &o),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{name} not found"),
                ),
            },
            (Method::POST, None) => {
                let Ok(obj) = serde_json::from_slice::<Value>(&body) else {
                    return status(StatusCode::BAD_REQUEST, "BadRequest", "not JSON");
                };
                let name = obj["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                if self.get(&t.collection, &ns, &name).is_some() {
                    return status(
                        StatusCode::CONFLICT,
                        "AlreadyExists",
                        &format!("{name} already exists"),
                    );
                }
                let mut obj = obj;
                obj["metadata"]["namespace"] = json!(ns);
                respond(
                    StatusCode::CREATED,
                    &self.store(&t.collection, &ns, &name, obj),
                )
            }
            (Method::PUT, Some(name)) => {
                let Ok(mut obj) = serde_json::from_slice::<Value>(&body) else {
                    return status(StatusCode::BAD_REQUEST, "BadRequest", "not JSON");
                };
                // Optimistic concurrency: a replace naming an older
                // resourceVersion than the stored one is refused.
                let current = self.get(&t.collection, &ns, name);
                let sent = obj["metadata"]["resourceVersion"]
                    .as_str()
                    .map(str::to_string);
                if let (Some(cur), Some(sent)) = (&current, sent) {
                    if cur["metadata"]["resourceVersion"] != json!(sent) {
                        return status(
                            StatusCode::CONFLICT,
                            "Conflict",
                            &format!("{name} was modified; read it again"),
                        );
                    }
                }
                obj["metadata"]["namespace"] = json!(ns);
                respond(StatusCode::OK, &self.store(&t.collection, &ns, name, obj))
            }
            (Method::PATCH, Some(name)) => {
                let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
                    return status(StatusCode::BAD_REQUEST, "BadRequest", "not JSON");
                };
                let apply = content_type.starts_with("application/apply-patch");
                let current = self.get(&t.collection, &ns, name);
                let mut obj = match current {
                    Some(o) => o,
                    None if apply && !t.status => {
                        json!({"metadata": {"name": name, "namespace": ns}})
                    }
                    None => {
                        return status(
                            StatusCode::NOT_FOUND,
                            "NotFound",
                            &format!("{name} not found"),
                        )
                    }
                };
                if t.status {
                    // The status subresource changes the status only.
                    let mut s = obj.get("status").cloned().unwrap_or(json!({}));
                    merge(&mut s, patch.get("status").unwrap_or(&Value::Null));
                    obj["status"] = s;
                } else {
                    let mut p = patch;
                    if let Some(m) = p.get_mut("metadata").and_then(Value::as_object_mut) {
                        m.remove("resourceVersion");
                    }
                    merge(&mut obj, &p);
                }
                respond(StatusCode::OK, &self.store(&t.collection, &ns, name, obj))
            }
            (Method::DELETE, Some(name)) => match self.remove(&t.collection, &ns, name) {
                Some(o) => respond(StatusCode::OK, &o),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{name} not found"),
                ),
            },
            _ => status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "not supported here",
            ),
        }
    }

    fn in_scope(t: &Target, obj: &Value) -> bool {
        t.namespace
            .as_deref()
            .is_none_or(|ns| obj["metadata"]["namespace"] == json!(ns))
    }

    fn list_response(&self, t: &Target, q: &BTreeMap<String, String>) -> Response<Body> {
        self.served.send_modify(|s| s.lists += 1);
        let st = self.lock();
        let items: Vec<Value> = st
            .objects
            .iter()
            .filter(|((c, _, _), v)| *c == t.collection && Self::in_scope(t, v))
            .filter(|(_, v)| selected(v, q.get("labelSelector")))
            .map(|(_, v)| v.clone())
            .collect();
        respond(
            StatusCode::OK,
            &json!({"kind": "List", "apiVersion": "v1",
                    "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
        )
    }

    fn watch(&self, t: &Target, q: &BTreeMap<String, String>) -> Response<Body> {
        let from: u64 = q
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let bookmarks = q.get("allowWatchBookmarks").map(String::as_str) == Some("true");
        let (backlog, rv_now, live) = {
            let st = self.lock();
            self.served.send_modify(|s| s.watches += 1);
            if from < st.compacted {
                self.served.send_modify(|s| s.gone += 1);
                let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
                    "status": "Failure", "reason": "Expired", "code": 410,
                    "message": format!("too old resource version: {from} ({})", st.compacted)}});
                let line = Bytes::from(format!("{gone}\n"));
                return Response::builder()
                    .status(StatusCode::OK)
                    .body(Full::new(line).boxed())
                    .expect("a valid response");
            }
            let backlog: Vec<(u64, String, &'static str, Value)> =
                st.log.iter().filter(|e| e.0 > from).cloned().collect();
            (backlog, st.rv, self.events.subscribe())
        };
        let collection = t.collection.clone();
        let scope_ns = t.namespace.clone();
        let selector = q.get("labelSelector").cloned();
        let wanted = move |c: &str, obj: &Value| {
            c == collection
                && scope_ns
                    .as_deref()
                    .is_none_or(|ns| obj["metadata"]["namespace"] == json!(ns))
                && selected(obj, selector.as_ref())
        };
        let wanted2 = wanted.clone();
        let line = |kind: &str, obj: &Value| {
            Bytes::from(format!("{}\n", json!({"type": kind, "object": obj})))
        };
        let mut first: Vec<Bytes> = backlog
            .iter()
            .filter(|(_, c, _, o)| wanted(c, o))
            .map(|(_, _, k, o)| line(k, o))
            .collect();
        if bookmarks {
            first.push(line(
                "BOOKMARK",
                &json!({"metadata": {"resourceVersion": rv_now.to_string()}}),
            ));
        }
        let live = tokio_stream_from(live).filter_map(move |(rv, c, k, o)| {
            let keep = rv > rv_now && wanted2(&c, &o);
            async move { keep.then(|| line(k, &o)) }
        });
        let mut epoch = self.epoch.subscribe();
        let ended = async move {
            let _ = epoch.changed().await;
        };
        let stream = futures::stream::iter(first)
            .chain(live)
            .take_until(ended)
            .map(|b| Ok::<_, Infallible>(hyper::body::Frame::data(b)));
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(BodyExt::boxed(StreamBody::new(stream)))
            .expect("a valid response")
    }
}

/// A broadcast receiver as a stream (lagging receivers skip ahead: a test
/// server has no backpressure to offer).
fn tokio_stream_from<T: Clone + Send + 'static>(
    rx: broadcast::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send {
    futures::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(v) => return Some((v, rx)),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
}
