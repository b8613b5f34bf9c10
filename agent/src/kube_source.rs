//! The Kubernetes source: one kube-rs watcher per kind the routing reads (Namespaces, Nodes,
//! Pods, Services, EndpointSlices, HTTPRoutes, GRPCRoutes, ReferenceGrants), each keeping its
//! kind's part of one typed [`Store`] up to date. Every change publishes the store as a new
//! [`crate::generation::Generation`]: at once after a quiet spell, and during a burst at most once
//! per debounce interval, each snapshot carrying every change made before it (coalesced, never
//! lost: the watchers and the builder share one store under one lock).
//!
//! The watchers read objects untyped (`DynamicObject`) and each event's object is decoded on its
//! own and then dropped, so one object the agent cannot parse is logged with its kind and name
//! and skipped (an update that does not parse leaves the last good version in place) instead of
//! failing the whole list, and only the typed form is kept. A dropped watch resumes from its last
//! resourceVersion; a 410 Gone makes the watcher list again, and the kind's objects are replaced
//! at once when the list is complete, so no update is lost either way.
//!
//! All Pods are watched, not only this node's: translation needs every endpoint's service
//! account to know the identity its node must present, and every client pod's namespace for
//! consumer routes. Enrolment picks this node's pods from the same store.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject},
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::{generation::Publisher, store::Store};

/// A kind the source watches.
#[derive(Debug, Clone, Copy)]
pub struct Kind {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
}

impl Kind {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn resource(&self) -> ApiResource {
        ApiResource {
            group: self.group.into(),
            version: self.version.into(),
            api_version: self.api_version(),
            kind: self.kind.into(),
            plural: self.plural.into(),
        }
    }
}

pub const KINDS: &[Kind] = &[
    Kind { group: "", version: "v1", kind: "Namespace", plural: "namespaces" },
    Kind { group: "", version: "v1", kind: "Node", plural: "nodes" },
    Kind { group: "", version: "v1", kind: "Pod", plural: "pods" },
    Kind { group: "", version: "v1", kind: "Service", plural: "services" },
    Kind { group: "discovery.k8s.io", version: "v1", kind: "EndpointSlice", plural: "endpointslices" },
    Kind { group: "gateway.networking.k8s.io", version: "v1", kind: "HTTPRoute", plural: "httproutes" },
    Kind { group: "gateway.networking.k8s.io", version: "v1", kind: "GRPCRoute", plural: "grpcroutes" },
    Kind {
        group: "gateway.networking.k8s.io",
        version: "v1",
        kind: "ReferenceGrant",
        plural: "referencegrants",
    },
    Kind {
        group: "security.istio.io",
        version: "v1",
        kind: "AuthorizationPolicy",
        plural: "authorizationpolicies",
    },
];

/// How the first configuration waits for a kind.
fn gating(kind: &Kind) -> Gating {
    match kind.group {
        // Without pods, Services and endpoints the proxy would know no workload and pass
        // everything through in plaintext: never published without them.
        "" | "discovery.k8s.io" => Gating::Required,
        // Policies narrow what may connect: published without them only when the cluster has
        // no such kind (its CRD is not installed), never because the list is slow or refused.
        "security.istio.io" => Gating::UnlessAbsent,
        // Routes: after the sync timeout, the mesh routes what it has (a missing Gateway API
        // CRD must not keep it from routing plain Services).
        _ => Gating::Optional,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gating {
    Required,
    UnlessAbsent,
    Optional,
}

/// The watched kind named `kind` (`HTTPRoute`, …).
pub fn kind(kind: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|k| k.kind == kind)
}

/// How the source behaves.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// While changes keep coming, at most one snapshot per this interval.
    pub debounce: Duration,
    /// A first snapshot is published once every kind has listed or is known to be absent (its
    /// CRD is not installed), or after this long with what has, when what is missing is only
    /// routes: pods, Services, endpoints and authorization policies are always waited for.
    pub initial_sync_timeout: Duration,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self { debounce: Duration::from_millis(50), initial_sync_timeout: Duration::from_secs(10) }
    }
}

struct Watched {
    kind: Kind,
    synced: Arc<AtomicBool>,
    /// The API server has no such kind (404 on its list: the CRD is not installed).
    absent: Arc<AtomicBool>,
}

impl Watched {
    /// Whether the first configuration may be published without this kind's list.
    fn may_go_without(&self) -> bool {
        match gating(&self.kind) {
            Gating::Required => false,
            Gating::UnlessAbsent => self.absent.load(Ordering::Acquire),
            Gating::Optional => true,
        }
    }
}

/// Runs the source until the task is dropped.
pub async fn run(client: Client, options: SourceOptions, mut out: Publisher) {
    let changed = Arc::new(Notify::new());
    let store = Arc::new(Mutex::new(Pending::default()));
    let mut watched = Vec::new();
    let mut tasks = Vec::new();
    for kind in KINDS {
        let resource = kind.resource();
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        let synced = Arc::new(AtomicBool::new(false));
        let absent = Arc::new(AtomicBool::new(false));
        // managedFields can outweigh the object itself, and nothing here reads them.
        let stream = watcher(api, watcher::Config::default())
            .backoff(watch_backoff())
            .modify(|o: &mut DynamicObject| o.metadata.managed_fields = None);
        tasks.push(tokio::spawn(drive(
            *kind,
            stream,
            store.clone(),
            changed.clone(),
            synced.clone(),
            absent.clone(),
        )));
        watched.push(Watched { kind: *kind, synced, absent });
    }
    let _abort = AbortOnDrop(tasks);

    let started = Instant::now();
    let mut published_once = false;
    // When the last snapshot was published: a change after a quiet spell is published at once,
    // and while changes keep coming, at most one snapshot per `debounce` carries all of them.
    let mut last_publish: Option<Instant> = None;
    let mut warned_waiting: Option<Instant> = None;
    loop {
        if published_once {
            changed.notified().await;
        } else {
            let remaining = options.initial_sync_timeout.saturating_sub(started.elapsed());
            let _ = tokio::time::timeout(remaining, changed.notified()).await;
        }
        match last_publish {
            Some(at) => tokio::time::sleep(options.debounce.saturating_sub(at.elapsed())).await,
            // Until the first snapshot, let the lists settle.
            None => tokio::time::sleep(options.debounce).await,
        }
        // A kind the API server does not have (its CRD is not installed) has nothing to wait for.
        let unsynced: Vec<&Watched> = watched
            .iter()
            .filter(|w| !w.synced.load(Ordering::Acquire) && !w.absent.load(Ordering::Acquire))
            .collect();
        if !published_once && !unsynced.is_empty() {
            if started.elapsed() < options.initial_sync_timeout {
                continue;
            }
            let waiting: Vec<&str> =
                unsynced.iter().filter(|w| !w.may_go_without()).map(|w| w.kind.kind).collect();
            if !waiting.is_empty() {
                // Logged once per sync timeout while it lasts.
                if warned_waiting.is_none_or(|at: Instant| at.elapsed() >= options.initial_sync_timeout) {
                    warn!(?waiting, "these kinds have not listed yet; nothing is served until they have");
                    warned_waiting = Some(Instant::now());
                }
                let _ = tokio::time::timeout(options.debounce * 10, changed.notified()).await;
                continue;
            }
            let missing: Vec<&str> = unsynced.iter().map(|w| w.kind.kind).collect();
            warn!(?missing, "not every kind has listed yet; publishing what has");
        }
        // The copy and whether it needs translating are taken together, under the lock the
        // watchers change both under: a refresh never carries a change translation reads.
        let (objects, translate) = {
            let mut pending = store.lock().expect("store lock");
            (pending.store.clone(), std::mem::take(&mut pending.translate))
        };
        if published_once && !translate {
            // Only what no translation reads changed (a route's status, as the status writer
            // wrote it): the objects are published for it, the configuration stays.
            out.refresh(objects);
            continue;
        }
        out.publish(objects, "kubernetes");
        last_publish = Some(Instant::now());
        published_once = true;
        crate::memory::release_freed_memory();
    }
}

struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// The watchers' retry delays: from 100 ms, doubling to [`WATCH_BACKOFF_MAX`], each plus up to as
/// much again of jitter, so never more than a second. The API server being back is then noticed
/// within a second, however long it was away (kube-runtime's default grows to 30 s, so a change
/// made just after an outage could wait that long); the cost is one or two list attempts per kind
/// per second while it is away.
pub fn watch_backoff() -> watcher::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(WATCH_BACKOFF_MAX)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .into()
}

/// The longest delay between two attempts before jitter (which at most doubles it).
pub const WATCH_BACKOFF_MAX: Duration = Duration::from_millis(500);

/// The objects the watchers keep, and whether they changed what translation reads since the
/// builder last took them.
#[derive(Default)]
struct Pending {
    store: Store,
    translate: bool,
}

/// Drives one kind's watch stream into the store, waking the builder on every change.
async fn drive(
    kind: Kind,
    stream: impl futures::Stream<Item = Result<watcher::Event<DynamicObject>, watcher::Error>>,
    store: Arc<Mutex<Pending>>,
    changed: Arc<Notify>,
    synced: Arc<AtomicBool>,
    absent: Arc<AtomicBool>,
) {
    let mut stream = std::pin::pin!(stream);
    // Objects of a (re)list, applied at once when it completes.
    let mut listing: Option<Vec<DynamicObject>> = None;
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init) => {
                debug!(kind = kind.kind, "listing");
                listing = Some(Vec::new());
            }
            Ok(watcher::Event::InitApply(object)) => listing.get_or_insert_default().push(object),
            Ok(watcher::Event::InitDone) => {
                let objects = listing.take().unwrap_or_default();
                debug!(kind = kind.kind, objects = objects.len(), "listed");
                {
                    let mut pending = store.lock().expect("store lock");
                    pending.store.clear_kind(kind.kind);
                    for object in objects {
                        apply(&mut pending.store, kind, object);
                    }
                    pending.translate = true;
                }
                synced.store(true, Ordering::Release);
                changed.notify_one();
            }
            Ok(watcher::Event::Apply(object)) => {
                let mut pending = store.lock().expect("store lock");
                pending.translate |= apply(&mut pending.store, kind, object);
                drop(pending);
                changed.notify_one();
            }
            Ok(watcher::Event::Delete(object)) => {
                let (ns, name) =
                    (object.metadata.namespace.unwrap_or_default(), object.metadata.name.unwrap_or_default());
                let mut pending = store.lock().expect("store lock");
                pending.translate |= pending.store.remove(kind.kind, &ns, &name);
                drop(pending);
                changed.notify_one();
            }
            // The API server's answer for a resource it does not serve is a plain `404 page not
            // found`, no Status object with a reason: the code says it.
            Err(watcher::Error::InitialListFailed(kube::Error::Api(status))) if status.code == 404 => {
                if !absent.swap(true, Ordering::AcqRel) {
                    info!(
                        kind = kind.kind,
                        "the API server has no such kind (its CRD is not installed); none are read until it is"
                    );
                    changed.notify_one();
                }
            }
            Err(err) => warn!(kind = kind.kind, error = %err, "watch failed; retrying with backoff"),
        }
    }
}

/// Decodes one object into the store; one that does not parse is logged and skipped, leaving the
/// last good version of it (if any) in place. Returns whether translation must run again: not
/// when only a route's status (or what every write changes) moved, which is what the status
/// writer's own writes look like when they come back through the watch.
fn apply(store: &mut Store, kind: Kind, object: DynamicObject) -> bool {
    let key = crate::store::key(
        object.metadata.namespace.as_deref().unwrap_or_default(),
        object.metadata.name.as_deref().unwrap_or_default(),
    );
    let before = route_as_translated(store, kind.kind, &key);
    let name = format!(
        "{} {}/{}@{}",
        kind.kind,
        object.metadata.namespace.as_deref().unwrap_or(""),
        object.metadata.name.as_deref().unwrap_or(""),
        object.metadata.resource_version.as_deref().unwrap_or("")
    );
    // The object's fields other than its metadata are already JSON: moved, not serialized again.
    let DynamicObject { metadata, data, .. } = object;
    let mut value = match data {
        serde_json::Value::Object(fields) => serde_json::Value::Object(fields),
        _ => serde_json::Value::Object(Default::default()),
    };
    let Ok(metadata) = serde_json::to_value(&metadata) else { return false };
    value["metadata"] = metadata;
    value["apiVersion"] = kind.api_version().into();
    value["kind"] = kind.kind.into();
    if let Err(err) = store.apply_value(0, value) {
        warn!(object = %name, error = %err, "object skipped: it does not parse");
        return false;
    }
    before.is_none() || before != route_as_translated(store, kind.kind, &key)
}

/// A route as translation reads it: the stored object without its status and the metadata every
/// write changes. `None` for other kinds, and for a route not held.
fn route_as_translated(store: &Store, kind: &str, key: &crate::store::Key) -> Option<serde_json::Value> {
    let mut value = match kind {
        "HTTPRoute" => serde_json::to_value(&**store.http_routes.get(key)?).ok()?,
        "GRPCRoute" => serde_json::to_value(&**store.grpc_routes.get(key)?).ok()?,
        _ => return None,
    };
    let object = value.as_object_mut()?;
    object.remove("status");
    if let Some(meta) = object.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.remove("resourceVersion");
        meta.remove("managedFields");
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watch_backoff_never_waits_more_than_a_second_and_starts_again_when_reset() {
        use kube::runtime::utils::Backoff as _;
        let mut backoff = watch_backoff();
        let delays: Vec<Duration> = (&mut backoff).take(1000).collect();
        assert_eq!(delays.len(), 1000, "it never gives up");
        assert!(delays.iter().all(|d| *d <= 2 * WATCH_BACKOFF_MAX), "{:?}", delays.iter().max());
        assert!(delays[0] < Duration::from_millis(250), "the first retry is quick: {:?}", delays[0]);
        backoff.reset();
        assert!(backoff.next().expect("a delay") < Duration::from_millis(250), "reset starts over");
    }
}
