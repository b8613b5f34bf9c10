//! A fake Kubernetes API server for tests: the list/watch protocol as the real one speaks it, on
//! loopback, over HTTP/1.1, for a real `kube::Client`.
//!
//! - Objects live per resource (core and named groups), with a cluster-wide resourceVersion that
//!   every write bumps; creates fill in uid, creationTimestamp and generation; a spec change bumps
//!   generation; a PUT carrying a stale resourceVersion gets 409 Conflict.
//! - List answers with the list's resourceVersion; label selectors (`=`, `==`, `!=`, exists,
//!   `!`, `in`, `notin`) and field selectors (any dotted field, `=`/`!=`) filter lists and watches.
//! - Watch replays the history after the given resourceVersion (or the current objects as ADDED
//!   when none is given), then streams ADDED/MODIFIED/DELETED; BOOKMARK events follow when asked
//!   for; `timeoutSeconds` ends the stream; a resourceVersion older than the retained history
//!   gets an ERROR event with a 410 Gone status, as after etcd compaction.
//! - The `status` subresource (GET, PUT, merge PATCH) changes status only; object PUT and PATCH
//!   leave status alone for kinds that have the subresource.
//! - Test controls: [`ApiServer::compact`], [`ApiServer::drop_watches`], [`ApiServer::stop`] and
//!   [`ApiServer::resume`] (connections cut, port closed meanwhile, data kept as etcd would), and
//!   an audit log of writes.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

/// A resource the server knows.
#[derive(Debug)]
struct Resource {
    group: &'static str,
    versions: &'static [&'static str],
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    /// Whether it has a status subresource (status is then written only through it).
    status: bool,
}

static RESOURCES: &[Resource] = &[
    Resource {
        group: "",
        versions: &["v1"],
        plural: "namespaces",
        kind: "Namespace",
        namespaced: false,
        status: true,
    },
    Resource { group: "", versions: &["v1"], plural: "nodes", kind: "Node", namespaced: false, status: true },
    Resource { group: "", versions: &["v1"], plural: "pods", kind: "Pod", namespaced: true, status: true },
    Resource {
        group: "",
        versions: &["v1"],
        plural: "services",
        kind: "Service",
        namespaced: true,
        status: true,
    },
    Resource {
        group: "",
        versions: &["v1"],
        plural: "secrets",
        kind: "Secret",
        namespaced: true,
        status: false,
    },
    Resource {
        group: "",
        versions: &["v1"],
        plural: "configmaps",
        kind: "ConfigMap",
        namespaced: true,
        status: false,
    },
    Resource {
        group: "discovery.k8s.io",
        versions: &["v1"],
        plural: "endpointslices",
        kind: "EndpointSlice",
        namespaced: true,
        status: false,
    },
    Resource {
        group: "coordination.k8s.io",
        versions: &["v1"],
        plural: "leases",
        kind: "Lease",
        namespaced: true,
        status: false,
    },
    Resource {
        group: "gateway.networking.k8s.io",
        versions: &["v1"],
        plural: "httproutes",
        kind: "HTTPRoute",
        namespaced: true,
        status: true,
    },
    Resource {
        group: "gateway.networking.k8s.io",
        versions: &["v1"],
        plural: "grpcroutes",
        kind: "GRPCRoute",
        namespaced: true,
        status: true,
    },
    Resource {
        group: "gateway.networking.k8s.io",
        versions: &["v1", "v1beta1"],
        plural: "referencegrants",
        kind: "ReferenceGrant",
        namespaced: true,
        status: false,
    },
    Resource {
        group: "security.istio.io",
        versions: &["v1"],
        plural: "authorizationpolicies",
        kind: "AuthorizationPolicy",
        namespaced: true,
        status: false,
    },
];

fn resource_by_kind(api_version: &str, kind: &str) -> Option<&'static Resource> {
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    RESOURCES.iter().find(|r| r.group == group && r.kind == kind && r.versions.contains(&version))
}

fn api_version(r: &Resource) -> String {
    if r.group.is_empty() { r.versions[0].to_owned() } else { format!("{}/{}", r.group, r.versions[0]) }
}

/// One write, as the audit log keeps it.
#[derive(Debug, Clone)]
pub struct Audit {
    pub method: String,
    pub path: String,
    /// The `fieldManager` the client gave, if any.
    pub field_manager: Option<String>,
    pub status: u16,
}

struct Event {
    rv: u64,
    resource: &'static Resource,
    type_: &'static str,
    object: Value,
}

struct Watcher {
    resource: &'static Resource,
    namespace: Option<String>,
    labels: Selector,
    fields: Selector,
    bookmarks: bool,
    deadline: Instant,
    tx: mpsc::UnboundedSender<Bytes>,
}

/// One resource's objects by (namespace, name); cluster-scoped ones have an empty namespace.
type Objects = BTreeMap<(String, String), Value>;

#[derive(Default)]
struct State {
    rv: u64,
    /// By (group, plural), then (namespace, name).
    objects: BTreeMap<(&'static str, &'static str), Objects>,
    history: Vec<Event>,
    /// Watches from a resourceVersion below this get 410 Gone.
    oldest_resumable: u64,
    watchers: Vec<Watcher>,
    audit: Vec<Audit>,
    next_uid: u64,
    /// Watches answered with 410 Gone.
    expired: u64,
}

struct Inner {
    state: Mutex<State>,
    bookmark_interval: Duration,
    /// Bumped to cut every connection (restart).
    epoch: watch::Sender<u64>,
}

/// The fake API server; stops when dropped.
pub struct ApiServer {
    inner: Arc<Inner>,
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
    accept: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl ApiServer {
    /// Starts on an ephemeral loopback port.
    pub fn start() -> std::io::Result<Self> {
        Self::start_with(Duration::from_millis(500))
    }

    /// Starts with BOOKMARK events every `bookmark_interval` on watches that ask for them.
    pub fn start_with(bookmark_interval: Duration) -> std::io::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), bookmark_interval)
    }

    /// Starts on `addr` (in the network namespace of the calling thread).
    pub fn start_on(addr: SocketAddr, bookmark_interval: Duration) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fake-apiserver")
            .enable_all()
            .build()?;
        let (epoch, _) = watch::channel(0);
        let inner = Arc::new(Inner { state: Mutex::new(State::default()), bookmark_interval, epoch });
        let listener = listen(&runtime, addr)?;
        let addr = listener.local_addr()?;
        let accept = runtime.spawn(accept_loop(listener, inner.clone()));
        runtime.spawn(ticker(inner.clone()));
        Ok(Self { inner, addr, runtime: Some(runtime), accept: Mutex::new(Some(accept)) })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig for this server at `path`.
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: '{}'}}\nusers:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\ncurrent-context: fake\n",
                self.url()
            ),
        )
    }

    /// Creates or replaces each object of a multi-document YAML text (as `kubectl apply` would,
    /// status included). Panics on YAML that does not parse or on an unknown kind.
    pub fn apply_yaml(&self, text: &str) {
        use serde::Deserialize as _;
        for doc in serde_yaml::Deserializer::from_str(text) {
            let value = Value::deserialize(doc).expect("YAML document");
            if value.is_object() {
                self.apply(value);
            }
        }
    }

    /// Creates or replaces one object; returns it as stored.
    pub fn apply(&self, mut object: Value) -> Value {
        let api_version = object["apiVersion"].as_str().unwrap_or("").to_owned();
        let kind = object["kind"].as_str().unwrap_or("").to_owned();
        let r = resource_by_kind(&api_version, &kind)
            .unwrap_or_else(|| panic!("unknown kind {api_version} {kind}"));
        if r.namespaced && object["metadata"]["namespace"].is_null() {
            object["metadata"]["namespace"] = json!("default");
        }
        if let Some(m) = object["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
        let mut st = self.inner.state.lock().expect("state");
        let key = object_key(r, &object);
        let exists = st.objects.get(&(r.group, r.plural)).is_some_and(|o| o.contains_key(&key));
        if exists {
            st.update(r, object, Update::All).expect("apply replaces")
        } else {
            st.create(r, object).expect("apply creates")
        }
    }

    /// Deletes an object; returns whether it existed.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> bool {
        let r = resource_by_kind(api_version, kind).unwrap_or_else(|| panic!("unknown kind {kind}"));
        let mut st = self.inner.state.lock().expect("state");
        st.delete(r, &(if r.namespaced { namespace.to_owned() } else { String::new() }, name.to_owned()))
            .is_some()
    }

    /// The stored object, if any.
    pub fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let r = resource_by_kind(api_version, kind)?;
        let st = self.inner.state.lock().expect("state");
        let ns = if r.namespaced { namespace.to_owned() } else { String::new() };
        st.objects.get(&(r.group, r.plural))?.get(&(ns, name.to_owned())).cloned()
    }

    /// Forgets the event history, as etcd compaction does: watches resuming from an older
    /// resourceVersion get 410 Gone and must list again.
    pub fn compact(&self) {
        let mut st = self.inner.state.lock().expect("state");
        st.history.clear();
        st.oldest_resumable = st.rv;
    }

    /// Ends every open watch stream (the connection stays), as a server does on its own timeout.
    pub fn drop_watches(&self) {
        self.inner.state.lock().expect("state").watchers.clear();
    }

    /// Stops answering: every connection is cut and the port refuses connections. The data
    /// stays (test controls still change it, as another API server over the same etcd would);
    /// [`ApiServer::resume`] serves again on the same port.
    pub fn stop(&self) {
        if let Some(accept) = self.accept.lock().expect("accept").take() {
            accept.abort();
        }
        self.inner.state.lock().expect("state").watchers.clear();
        self.inner.epoch.send_modify(|e| *e += 1);
    }

    /// Serves again on the same port after [`ApiServer::stop`].
    pub fn resume(&self) {
        let runtime = self.runtime.as_ref().expect("runtime");
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match listen(runtime, self.addr) {
                Ok(l) => break l,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => panic!("cannot rebind {}: {e}", self.addr),
            }
        };
        *self.accept.lock().expect("accept") = Some(runtime.spawn(accept_loop(listener, self.inner.clone())));
    }

    /// Every write so far.
    pub fn audit(&self) -> Vec<Audit> {
        self.inner.state.lock().expect("state").audit.clone()
    }

    /// How many watches were answered with 410 Gone.
    pub fn expired_watches(&self) -> u64 {
        self.inner.state.lock().expect("state").expired
    }
}

/// A listener on `addr` (address reuse on, so a restart can take the same port back at once),
/// registered with `runtime`. Works from inside another runtime too.
fn listen(runtime: &tokio::runtime::Runtime, addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let _entered = runtime.enter();
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn object_key(r: &Resource, object: &Value) -> (String, String) {
    let ns = if r.namespaced {
        object["metadata"]["namespace"].as_str().unwrap_or("default").to_owned()
    } else {
        String::new()
    };
    (ns, object["metadata"]["name"].as_str().unwrap_or("").to_owned())
}

enum Update {
    /// Everything, status included (the test controls, as the cluster's own controllers do).
    All,
    /// The object without its status (for kinds with a status subresource).
    Whole,
    /// Only the status.
    Status,
}

#[derive(Debug)]
struct ApiError {
    code: StatusCode,
    reason: &'static str,
    message: String,
}

fn err(code: StatusCode, reason: &'static str, message: impl Into<String>) -> ApiError {
    ApiError { code, reason, message: message.into() }
}

fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

impl State {
    /// RFC 3339 with second precision, as the API server writes timestamps.
    fn now() -> String {
        jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
    }

    fn record(&mut self, r: &'static Resource, type_: &'static str, object: &Value) {
        let rv = self.rv;
        self.history.push(Event { rv, resource: r, type_, object: object.clone() });
        let line = event_line(type_, object);
        self.watchers.retain(|w| {
            if !std::ptr::eq(w.resource, r) || !w.matches(object) {
                return true;
            }
            w.tx.send(line.clone()).is_ok()
        });
    }

    fn create(&mut self, r: &'static Resource, mut object: Value) -> Result<Value, ApiError> {
        let key = object_key(r, &object);
        if key.1.is_empty() {
            return Err(err(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", "metadata.name: Required value"));
        }
        let objects = self.objects.entry((r.group, r.plural)).or_default();
        if objects.contains_key(&key) {
            return Err(err(
                StatusCode::CONFLICT,
                "AlreadyExists",
                format!("{} \"{}\" already exists", r.plural, key.1),
            ));
        }
        self.rv += 1;
        self.next_uid += 1;
        let meta = &mut object["metadata"];
        if meta["uid"].is_null() {
            meta["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", self.next_uid));
        }
        meta["creationTimestamp"] = json!(Self::now());
        meta["generation"] = json!(1);
        meta["resourceVersion"] = json!(self.rv.to_string());
        object["apiVersion"] = json!(api_version(r));
        object["kind"] = json!(r.kind);
        self.objects.entry((r.group, r.plural)).or_default().insert(key, object.clone());
        self.record(r, "ADDED", &object);
        Ok(object)
    }

    fn update(&mut self, r: &'static Resource, incoming: Value, what: Update) -> Result<Value, ApiError> {
        let key = object_key(r, &incoming);
        let Some(current) = self.objects.get(&(r.group, r.plural)).and_then(|o| o.get(&key)).cloned() else {
            return Err(err(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{} \"{}\" not found", r.plural, key.1),
            ));
        };
        if let Some(rv) = incoming["metadata"]["resourceVersion"].as_str()
            && Some(rv) != current["metadata"]["resourceVersion"].as_str()
        {
            return Err(err(
                StatusCode::CONFLICT,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{}\": the object has been modified; please apply your changes to the latest version and try again",
                    r.plural, key.1
                ),
            ));
        }
        let mut next = match what {
            Update::Status => {
                let mut next = current.clone();
                next["status"] = incoming.get("status").cloned().unwrap_or(Value::Null);
                next
            }
            Update::All | Update::Whole => {
                let all = matches!(what, Update::All);
                let mut next = incoming;
                if r.status && !all {
                    next["status"] = current.get("status").cloned().unwrap_or(Value::Null);
                }
                for field in ["uid", "creationTimestamp", "generation"] {
                    next["metadata"][field] = current["metadata"][field].clone();
                }
                next
            }
        };
        if let Some(o) = next.as_object_mut()
            && o.get("status").is_some_and(Value::is_null)
        {
            o.remove("status");
        }
        next["apiVersion"] = json!(api_version(r));
        next["kind"] = json!(r.kind);
        let spec_of = |v: &Value| {
            let mut v = v.clone();
            if let Some(o) = v.as_object_mut() {
                o.remove("metadata");
                o.remove("status");
            }
            v
        };
        let mut cmp = next.clone();
        cmp["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
        if cmp == current {
            return Ok(current);
        }
        if spec_of(&next) != spec_of(&current) {
            let generation = current["metadata"]["generation"].as_i64().unwrap_or(1);
            next["metadata"]["generation"] = json!(generation + 1);
        }
        self.rv += 1;
        next["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.objects.entry((r.group, r.plural)).or_default().insert(key, next.clone());
        self.record(r, "MODIFIED", &next);
        Ok(next)
    }

    fn delete(&mut self, r: &'static Resource, key: &(String, String)) -> Option<Value> {
        let mut object = self.objects.get_mut(&(r.group, r.plural))?.remove(key)?;
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.record(r, "DELETED", &object);
        Some(object)
    }
}

fn event_line(type_: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": type_, "object": object})).expect("event JSON");
    line.push(b'\n');
    Bytes::from(line)
}

/// A label or field selector: terms that must all hold.
#[derive(Debug, Clone, Default)]
struct Selector(Vec<Term>);

#[derive(Debug, Clone)]
enum Term {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

impl Selector {
    fn parse(text: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        // Split on commas outside parentheses.
        let mut depth = 0;
        let mut start = 0;
        let mut parts = Vec::new();
        for (i, c) in text.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(&text[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        parts.push(&text[start..]);
        for part in parts.into_iter().map(str::trim).filter(|p| !p.is_empty()) {
            let term = if let Some((k, v)) = part.split_once("!=") {
                Term::Ne(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once("==") {
                Term::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once('=') {
                Term::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, rest)) = part.split_once(" notin ") {
                Term::NotIn(k.trim().into(), set(rest)?)
            } else if let Some((k, rest)) = part.split_once(" in ") {
                Term::In(k.trim().into(), set(rest)?)
            } else if let Some(k) = part.strip_prefix('!') {
                Term::NotExists(k.trim().into())
            } else {
                Term::Exists(part.into())
            };
            terms.push(term);
        }
        Ok(Self(terms))
    }

    /// Whether `lookup` (key → value) satisfies every term.
    fn matches(&self, lookup: impl Fn(&str) -> Option<String>) -> bool {
        self.0.iter().all(|t| match t {
            Term::Eq(k, v) => lookup(k).as_deref() == Some(v.as_str()),
            Term::Ne(k, v) => lookup(k).as_deref() != Some(v.as_str()),
            Term::Exists(k) => lookup(k).is_some(),
            Term::NotExists(k) => lookup(k).is_none(),
            Term::In(k, vs) => lookup(k).is_some_and(|v| vs.contains(&v)),
            Term::NotIn(k, vs) => !lookup(k).is_some_and(|v| vs.contains(&v)),
        })
    }
}

fn set(text: &str) -> Result<Vec<String>, String> {
    let inner = text
        .trim()
        .strip_prefix('(')
        .and_then(|t| t.strip_suffix(')'))
        .ok_or_else(|| format!("bad set {text}"))?;
    Ok(inner.split(',').map(|s| s.trim().to_owned()).collect())
}

fn label_of(object: &Value, key: &str) -> Option<String> {
    object["metadata"]["labels"].get(key).and_then(Value::as_str).map(str::to_owned)
}

fn field_of(object: &Value, path: &str) -> Option<String> {
    let mut v = object;
    for part in path.split('.') {
        v = v.get(part)?;
    }
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

fn object_matches(object: &Value, namespace: Option<&str>, labels: &Selector, fields: &Selector) -> bool {
    namespace.is_none_or(|ns| object["metadata"]["namespace"].as_str() == Some(ns))
        && labels.matches(|k| label_of(object, k))
        && fields.matches(|k| field_of(object, k))
}

impl Watcher {
    fn matches(&self, object: &Value) -> bool {
        object_matches(object, self.namespace.as_deref(), &self.labels, &self.fields)
    }
}

/// Sends bookmarks and ends watches past their timeout.
async fn ticker(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(inner.bookmark_interval);
    loop {
        tick.tick().await;
        let mut st = inner.state.lock().expect("state");
        let now = Instant::now();
        let rv = st.rv.to_string();
        st.watchers.retain(|w| {
            if now >= w.deadline {
                return false;
            }
            if !w.bookmarks {
                return true;
            }
            let bookmark = json!({
                "kind": w.resource.kind, "apiVersion": api_version(w.resource),
                "metadata": {"resourceVersion": rv, "annotations": {"k8s.io/initial-events-end": "true"}},
            });
            w.tx.send(event_line("BOOKMARK", &bookmark)).is_ok()
        });
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, inner: Arc<Inner>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let inner = inner.clone();
        let mut epoch = inner.epoch.subscribe();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let inner = inner.clone();
                async move { Ok::<_, Infallible>(handle(&inner, req).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = epoch.changed() => {}
            }
        });
    }
}

type ApiBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

fn json_response(code: StatusCode, value: &Value) -> Response<ApiBody> {
    let mut resp = Response::new(Full::new(Bytes::from(value.to_string())).boxed_unsync());
    *resp.status_mut() = code;
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    resp
}

fn error_response(e: ApiError) -> Response<ApiBody> {
    json_response(e.code, &status_object(e.code.as_u16(), e.reason, &e.message))
}

/// A watch stream's body: event lines as they come, until the sender is dropped.
struct WatchBody(mpsc::UnboundedReceiver<Bytes>);

impl Body for WatchBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

struct Target {
    resource: &'static Resource,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let find = |plural: &str| {
        RESOURCES.iter().find(|r| r.group == group && r.plural == plural && r.versions.contains(&version))
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, plural, tail @ ..] if find(plural).is_some_and(|r| r.namespaced) => {
            (Some((*ns).to_owned()), [&[*plural][..], tail].concat())
        }
        other => (None, other.to_vec()),
    };
    let resource = find(rest.first()?)?;
    match rest.as_slice() {
        [_] => Some(Target { resource, namespace, name: None, status: false }),
        [_, name] => Some(Target { resource, namespace, name: Some((*name).to_owned()), status: false }),
        [_, name, "status"] if resource.status => {
            Some(Target { resource, namespace, name: Some((*name).to_owned()), status: true })
        }
        _ => None,
    }
}

fn query_map(query: Option<&str>) -> BTreeMap<String, String> {
    query
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (!k.is_empty()).then(|| (percent_decode(k), percent_decode(v)))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(b) => {
                    out.push(b);
                    i += 3;
                    continue;
                }
                Err(_) => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(inner: &Arc<Inner>, req: Request<Incoming>) -> Response<ApiBody> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = query_map(req.uri().query());
    let content_type =
        req.headers().get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let Some(target) = parse_path(&path) else {
        return error_response(err(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        ));
    };
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error_response(err(StatusCode::BAD_REQUEST, "BadRequest", e.to_string())),
    };
    let write = method != Method::GET;
    let resp = match (&method, &target.name) {
        (&Method::GET, None) if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) => {
            watch(inner, &target, &query)
        }
        (&Method::GET, None) => list(inner, &target, &query),
        (&Method::GET, Some(name)) => {
            let st = inner.state.lock().expect("state");
            let key = (target.namespace.clone().unwrap_or_default(), name.clone());
            match st.objects.get(&(target.resource.group, target.resource.plural)).and_then(|o| o.get(&key)) {
                Some(o) => json_response(StatusCode::OK, o),
                None => error_response(err(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("{} \"{name}\" not found", target.resource.plural),
                )),
            }
        }
        _ => match serde_json::from_slice::<Value>(&body)
            .or_else(|e| if body.is_empty() { Ok(Value::Null) } else { Err(e) })
        {
            Err(e) => {
                error_response(err(StatusCode::BAD_REQUEST, "BadRequest", format!("body is not JSON: {e}")))
            }
            Ok(value) => match mutate(inner, &method, &target, value, &content_type) {
                Ok((code, v)) => json_response(code, &v),
                Err(e) => error_response(e),
            },
        },
    };
    if write {
        let mut st = inner.state.lock().expect("state");
        st.audit.push(Audit {
            method: method.to_string(),
            path,
            field_manager: query.get("fieldManager").cloned(),
            status: resp.status().as_u16(),
        });
    }
    resp
}

fn selectors(query: &BTreeMap<String, String>) -> Result<(Selector, Selector), ApiError> {
    let labels = Selector::parse(query.get("labelSelector").map_or("", String::as_str))
        .map_err(|e| err(StatusCode::BAD_REQUEST, "BadRequest", e))?;
    let fields = Selector::parse(query.get("fieldSelector").map_or("", String::as_str))
        .map_err(|e| err(StatusCode::BAD_REQUEST, "BadRequest", e))?;
    Ok((labels, fields))
}

fn list(inner: &Inner, target: &Target, query: &BTreeMap<String, String>) -> Response<ApiBody> {
    let (labels, fields) = match selectors(query) {
        Ok(s) => s,
        Err(e) => return error_response(e),
    };
    let st = inner.state.lock().expect("state");
    let r = target.resource;
    let items: Vec<Value> = st
        .objects
        .get(&(r.group, r.plural))
        .into_iter()
        .flat_map(|o| o.values())
        .filter(|o| object_matches(o, target.namespace.as_deref(), &labels, &fields))
        .cloned()
        .collect();
    json_response(
        StatusCode::OK,
        &json!({
            "kind": format!("{}List", r.kind), "apiVersion": api_version(r),
            "metadata": {"resourceVersion": st.rv.to_string()},
            "items": items,
        }),
    )
}

fn watch(inner: &Inner, target: &Target, query: &BTreeMap<String, String>) -> Response<ApiBody> {
    let (labels, fields) = match selectors(query) {
        Ok(s) => s,
        Err(e) => return error_response(e),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let timeout = query.get("timeoutSeconds").and_then(|t| t.parse().ok()).unwrap_or(1800u64);
    let watcher = Watcher {
        resource: target.resource,
        namespace: target.namespace.clone(),
        labels,
        fields,
        bookmarks: query.get("allowWatchBookmarks").is_some_and(|v| v == "true"),
        deadline: Instant::now() + Duration::from_secs(timeout),
        tx,
    };
    let mut st = inner.state.lock().expect("state");
    let from = query.get("resourceVersion").filter(|v| !v.is_empty() && *v != "0");
    match from.map(|v| v.parse::<u64>()) {
        None => {
            for o in st
                .objects
                .get(&(target.resource.group, target.resource.plural))
                .into_iter()
                .flat_map(|o| o.values())
            {
                if watcher.matches(o) {
                    let _ = watcher.tx.send(event_line("ADDED", o));
                }
            }
            // Registered under the same lock as the replay, so no write falls in between.
            st.watchers.push(watcher);
        }
        Some(Err(_)) => {
            return error_response(err(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "resourceVersion is not a number",
            ));
        }
        Some(Ok(rv)) if rv < st.oldest_resumable => {
            let gone = status_object(
                410,
                "Expired",
                &format!("too old resource version: {rv} ({})", st.oldest_resumable),
            );
            let _ = watcher.tx.send(event_line("ERROR", &gone));
            drop(watcher);
            st.expired += 1;
        }
        Some(Ok(rv)) => {
            for e in st.history.iter().filter(|e| e.rv > rv && std::ptr::eq(e.resource, target.resource)) {
                if watcher.matches(&e.object) {
                    let _ = watcher.tx.send(event_line(e.type_, &e.object));
                }
            }
            st.watchers.push(watcher);
        }
    }
    let mut resp = Response::new(WatchBody(rx).boxed_unsync());
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    resp
}

fn mutate(
    inner: &Inner,
    method: &Method,
    target: &Target,
    body: Value,
    content_type: &str,
) -> Result<(StatusCode, Value), ApiError> {
    let r = target.resource;
    let mut st = inner.state.lock().expect("state");
    let key = (target.namespace.clone().unwrap_or_default(), target.name.clone().unwrap_or_default());
    let check_identity = |v: &mut Value| -> Result<(), ApiError> {
        if r.namespaced {
            match v["metadata"]["namespace"].as_str() {
                None => v["metadata"]["namespace"] = json!(key.0),
                Some(ns) if ns != key.0 => {
                    return Err(err(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        "the namespace of the object does not match the namespace on the request",
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    };
    match (method, &target.name) {
        (&Method::POST, None) => {
            let mut v = body;
            if r.namespaced && target.namespace.is_none() {
                return Err(err(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "MethodNotAllowed",
                    "create needs a namespace",
                ));
            }
            check_identity(&mut v)?;
            Ok((StatusCode::CREATED, st.create(r, v)?))
        }
        (&Method::PUT, Some(name)) => {
            let mut v = body;
            check_identity(&mut v)?;
            if v["metadata"]["name"].as_str() != Some(name.as_str()) {
                return Err(err(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "the name of the object does not match the name on the URL",
                ));
            }
            let what = if target.status { Update::Status } else { Update::Whole };
            Ok((StatusCode::OK, st.update(r, v, what)?))
        }
        (&Method::PATCH, Some(name)) => {
            if !content_type.starts_with("application/merge-patch+json")
                && !content_type.starts_with("application/strategic-merge-patch+json")
            {
                return Err(err(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    format!("patch type {content_type} is not supported here"),
                ));
            }
            let Some(current) = st.objects.get(&(r.group, r.plural)).and_then(|o| o.get(&key)).cloned()
            else {
                return Err(err(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("{} \"{name}\" not found", r.plural),
                ));
            };
            let mut next = current;
            merge_patch(&mut next, &body);
            let what = if target.status { Update::Status } else { Update::Whole };
            Ok((StatusCode::OK, st.update(r, next, what)?))
        }
        (&Method::DELETE, Some(name)) => match st.delete(r, &key) {
            Some(v) => Ok((StatusCode::OK, v)),
            None => Err(err(StatusCode::NOT_FOUND, "NotFound", format!("{} \"{name}\" not found", r.plural))),
        },
        _ => Err(err(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{method} is not supported on {}", r.plural),
        )),
    }
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().expect("object");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_resources_namespaces_objects_and_status() {
        let t = parse_path("/api/v1/namespaces").expect("namespaces");
        assert_eq!((t.resource.kind, t.namespace, t.name), ("Namespace", None, None));
        let t = parse_path("/api/v1/namespaces/demo").expect("one namespace");
        assert_eq!((t.resource.kind, t.name.as_deref()), ("Namespace", Some("demo")));
        let t = parse_path("/api/v1/namespaces/demo/pods").expect("pods in demo");
        assert_eq!((t.resource.kind, t.namespace.as_deref(), t.name), ("Pod", Some("demo"), None));
        let t = parse_path("/apis/gateway.networking.k8s.io/v1/namespaces/demo/httproutes/r/status")
            .expect("status");
        assert!(t.status);
        assert_eq!(t.name.as_deref(), Some("r"));
        assert!(parse_path("/apis/gateway.networking.k8s.io/v1beta1/referencegrants").is_some());
        assert!(parse_path("/apis/unknown.io/v1/things").is_none());
        assert!(parse_path("/api/v1/namespaces/demo/secrets/s/status").is_none(), "secrets have no status");
    }

    #[test]
    fn selectors_cover_the_operators() {
        let o =
            json!({"metadata": {"labels": {"app": "echo", "version": "v1"}}, "spec": {"nodeName": "node1"}});
        let m = |s: &str| Selector::parse(s).expect("parses").matches(|k| label_of(&o, k));
        assert!(m("app=echo,version==v1"));
        assert!(m("app, !missing, version in (v1, v2), version notin (v3)"));
        assert!(!m("app!=echo"));
        assert!(!m("version in (v2)"));
        let f = Selector::parse("spec.nodeName=node1").expect("parses");
        assert!(f.matches(|k| field_of(&o, k)));
        assert_eq!(percent_decode("spec.nodeName%3Dnode1"), "spec.nodeName=node1");
    }

    #[test]
    fn merge_patch_follows_rfc7386() {
        let mut v = json!({"a": {"b": 1, "c": 2}, "d": [1]});
        merge_patch(&mut v, &json!({"a": {"b": null, "e": 3}, "d": [2]}));
        assert_eq!(v, json!({"a": {"c": 2, "e": 3}, "d": [2]}));
        // Timestamps are RFC 3339 in UTC, to the second, and now.
        let stamp: jiff::Timestamp = State::now().parse().expect("RFC 3339");
        assert!(jiff::Timestamp::now().duration_since(stamp).as_secs().abs() < 60);
    }
}
