//! The Kubernetes source: one kube-rs watcher per kind the routing reads (Namespaces, Nodes,
//! Pods, Services, EndpointSlices, HTTPRoutes, GRPCRoutes, ReferenceGrants), each keeping its
//! kind's part of one typed [`Store`] up to date. Every change, after a short debounce,
//! publishes the store as a new [`crate::generation::Generation`].
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
use tracing::{debug, warn};

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
];

/// The watched kind named `kind` (`HTTPRoute`, …).
pub fn kind(kind: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|k| k.kind == kind)
}

/// How the source behaves.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// Changes closer together than this become one snapshot.
    pub debounce: Duration,
    /// A first snapshot is published once every kind has listed, or after this long with what
    /// has (a kind whose CRD is missing must not keep the mesh from routing the others).
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
}

/// Runs the source until the task is dropped.
pub async fn run(client: Client, options: SourceOptions, mut out: Publisher) {
    let changed = Arc::new(Notify::new());
    let store = Arc::new(Mutex::new(Store::default()));
    let mut watched = Vec::new();
    let mut tasks = Vec::new();
    for kind in KINDS {
        let resource = kind.resource();
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        let synced = Arc::new(AtomicBool::new(false));
        // managedFields can outweigh the object itself, and nothing here reads them.
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .modify(|o: &mut DynamicObject| o.metadata.managed_fields = None);
        tasks.push(tokio::spawn(drive(*kind, stream, store.clone(), changed.clone(), synced.clone())));
        watched.push(Watched { kind: *kind, synced });
    }
    let _abort = AbortOnDrop(tasks);

    let started = Instant::now();
    let mut published_once = false;
    loop {
        if published_once {
            changed.notified().await;
        } else {
            let remaining = options.initial_sync_timeout.saturating_sub(started.elapsed());
            let _ = tokio::time::timeout(remaining, changed.notified()).await;
        }
        // Let a burst of events settle into one snapshot.
        tokio::time::sleep(options.debounce).await;
        let all_synced = watched.iter().all(|w| w.synced.load(Ordering::Acquire));
        if !published_once && !all_synced {
            if started.elapsed() < options.initial_sync_timeout {
                continue;
            }
            let missing: Vec<&str> =
                watched.iter().filter(|w| !w.synced.load(Ordering::Acquire)).map(|w| w.kind.kind).collect();
            warn!(?missing, "not every kind has listed yet; publishing what has");
        }
        let store = store.lock().expect("store lock").clone();
        out.publish(store, "kubernetes");
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

/// Drives one kind's watch stream into the store, waking the builder on every change.
async fn drive(
    kind: Kind,
    stream: impl futures::Stream<Item = Result<watcher::Event<DynamicObject>, watcher::Error>>,
    store: Arc<Mutex<Store>>,
    changed: Arc<Notify>,
    synced: Arc<AtomicBool>,
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
                    let mut store = store.lock().expect("store lock");
                    store.clear_kind(kind.kind);
                    for object in objects {
                        apply(&mut store, kind, object);
                    }
                }
                synced.store(true, Ordering::Release);
                changed.notify_one();
            }
            Ok(watcher::Event::Apply(object)) => {
                apply(&mut store.lock().expect("store lock"), kind, object);
                changed.notify_one();
            }
            Ok(watcher::Event::Delete(object)) => {
                let (ns, name) =
                    (object.metadata.namespace.unwrap_or_default(), object.metadata.name.unwrap_or_default());
                store.lock().expect("store lock").remove(kind.kind, &ns, &name);
                changed.notify_one();
            }
            Err(err) => warn!(kind = kind.kind, error = %err, "watch failed; retrying with backoff"),
        }
    }
}

/// Decodes one object into the store; one that does not parse is logged and skipped, leaving the
/// last good version of it (if any) in place.
fn apply(store: &mut Store, kind: Kind, object: DynamicObject) {
    let name = format!(
        "{} {}/{}@{}",
        kind.kind,
        object.metadata.namespace.as_deref().unwrap_or(""),
        object.metadata.name.as_deref().unwrap_or(""),
        object.metadata.resource_version.as_deref().unwrap_or("")
    );
    let Ok(mut value) = serde_json::to_value(&object) else { return };
    drop(object);
    value["apiVersion"] = kind.api_version().into();
    value["kind"] = kind.kind.into();
    if let Err(err) = store.apply_value(0, value) {
        warn!(object = %name, error = %err, "object skipped: it does not parse");
    }
}
