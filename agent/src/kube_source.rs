//! The Kubernetes source: one kube-rs watcher and reflector per kind the routing reads
//! (Namespaces, Nodes, Pods, Services, EndpointSlices, HTTPRoutes, GRPCRoutes,
//! ReferenceGrants). Every change, after a short debounce, rebuilds the [`Store`], translates it,
//! and publishes a new snapshot, the route statuses and the objects (for enrolment).
//!
//! The watchers read objects untyped (`DynamicObject`) and the store decodes each one on its
//! own, so one object the agent cannot parse is logged with its kind and name and skipped,
//! instead of failing the whole list. A dropped watch resumes from its last resourceVersion; a
//! 410 Gone makes the watcher list again, and the reflector swaps its contents atomically, so no
//! update is lost either way.
//!
//! All Pods are watched, not only this node's: translation needs every endpoint's service
//! account to know the identity its node must present, and every client pod's namespace for
//! consumer routes. Enrolment picks this node's pods from the same store.

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject},
    runtime::{WatchStreamExt as _, reflector, watcher},
};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::{
    manifests::Published,
    store::Store,
    translate::{Options, translate},
};

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

    fn resource(&self) -> ApiResource {
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

/// How the source behaves.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    pub translate: Options,
    /// Changes closer together than this become one snapshot.
    pub debounce: Duration,
    /// A first snapshot is published once every kind has listed, or after this long with what
    /// has (a kind whose CRD is missing must not keep the mesh from routing the others).
    pub initial_sync_timeout: Duration,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self {
            translate: Options::default(),
            debounce: Duration::from_millis(50),
            initial_sync_timeout: Duration::from_secs(10),
        }
    }
}

struct Watched {
    kind: Kind,
    reader: reflector::Store<DynamicObject>,
    synced: Arc<AtomicBool>,
}

/// Runs the source until the task is dropped.
pub async fn run(client: Client, options: SourceOptions, out: Published) {
    let changed = Arc::new(Notify::new());
    let mut watched = Vec::new();
    let mut tasks = Vec::new();
    for kind in KINDS {
        let resource = kind.resource();
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        let writer = reflector::store::Writer::new(resource);
        let reader = writer.as_reader();
        let synced = Arc::new(AtomicBool::new(false));
        // managedFields can outweigh the object itself, and nothing here reads them.
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .modify(|o: &mut DynamicObject| o.metadata.managed_fields = None)
            .reflect(writer);
        tasks.push(tokio::spawn(drive(*kind, stream, changed.clone(), synced.clone())));
        watched.push(Watched { kind: *kind, reader, synced });
    }
    let _abort = AbortOnDrop(tasks);

    let started = Instant::now();
    let mut version = options.translate.version;
    let mut warned: HashSet<String> = HashSet::new();
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
        let store = build_store(&watched, &mut warned);
        version += 1;
        let t = translate(&store, &Options { version, ..options.translate.clone() });
        info!(
            version,
            frontends = t.snapshot.frontends.len(),
            routes = t.statuses.len(),
            "configuration from the API server applied"
        );
        crate::manifests::log_conditions(&t.statuses);
        out.snapshot.send_replace(Arc::new(t.snapshot));
        out.statuses.send_replace(Arc::new(t.statuses));
        out.objects.send_replace(Arc::new(store));
        published_once = true;
        release_freed_memory();
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

/// Drives one reflector's stream, noting the end of each (re)list and waking the builder.
async fn drive(
    kind: Kind,
    stream: impl futures::Stream<Item = Result<watcher::Event<DynamicObject>, watcher::Error>>,
    changed: Arc<Notify>,
    synced: Arc<AtomicBool>,
) {
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init) => debug!(kind = kind.kind, "listing"),
            Ok(watcher::Event::InitApply(_)) => {}
            Ok(watcher::Event::InitDone) => {
                debug!(kind = kind.kind, "listed");
                synced.store(true, Ordering::Release);
                changed.notify_one();
            }
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => changed.notify_one(),
            Err(err) => warn!(kind = kind.kind, error = %err, "watch failed; retrying with backoff"),
        }
    }
}

/// The store of everything the reflectors hold; objects that do not decode are skipped and
/// logged once per resourceVersion.
fn build_store(watched: &[Watched], warned: &mut HashSet<String>) -> Store {
    let mut store = Store::default();
    for w in watched {
        for object in w.reader.state() {
            let Ok(mut value) = serde_json::to_value(&*object) else { continue };
            value["apiVersion"] = w.kind.api_version().into();
            value["kind"] = w.kind.kind.into();
            if let Err(err) = store.apply_value(0, value) {
                let name = format!(
                    "{} {}/{}@{}",
                    w.kind.kind,
                    object.metadata.namespace.as_deref().unwrap_or(""),
                    object.metadata.name.as_deref().unwrap_or(""),
                    object.metadata.resource_version.as_deref().unwrap_or("")
                );
                if warned.insert(name.clone()) {
                    warn!(object = %name, error = %err, "object skipped: it does not parse");
                }
            }
        }
    }
    store
}

/// Hands memory freed by the rebuild (the previous store and snapshot, decoding's temporaries)
/// back to the kernel: glibc keeps freed heap for reuse, so without this the agent's RSS stays at
/// its high-water mark after each large configuration change.
fn release_freed_memory() {
    // SAFETY: malloc_trim only walks glibc's own heap bookkeeping; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
