//! One published generation of the mesh's configuration: the objects a source read, the
//! snapshot the proxy routes by and the route statuses, translated together and published as one
//! value, so no reader can pair the statuses of one version with the objects of another.
//!
//! Every configuration source (the manifest directory, the Kubernetes API) fills a [`Store`] and
//! hands it to [`Publisher::publish`], the one place that translates, logs and publishes.
//! Readers that need several parts (the status writer, enrolment, `describe`, the admin
//! endpoint) watch the generation; the proxy, which needs only the snapshot, watches a channel
//! of its own that the same call feeds after the generation.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use gammaray_proxy::snapshot::Snapshot;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    store::Store,
    translate::{Incremental, Options, RouteKey, RouteStatus, Statuses},
};

/// The configuration in force, as one value.
#[derive(Debug, Default)]
pub struct Generation {
    /// Counts up from the publisher's first version; 0 is the empty configuration before any
    /// source has published.
    pub version: u64,
    pub snapshot: Arc<Snapshot>,
    /// Every route's status, by route (HTTPRoutes, then GRPCRoutes, by namespace and name).
    pub statuses: Statuses,
    /// The objects translated, for what reads them directly (enrolment, status writing).
    pub objects: Store,
    /// Authorization policies not enforced as written, and why.
    pub policy_refusals: Arc<Vec<crate::authz::Refusal>>,
}

impl Generation {
    /// The route statuses in order.
    pub fn status_list(&self) -> Vec<&RouteStatus> {
        self.statuses.values().map(|s| &**s).collect()
    }

    /// The routes whose parents do not all accept them.
    pub fn rejected(&self) -> usize {
        self.statuses
            .values()
            .filter(|s| s.parents.iter().any(|p| p.condition("Accepted").is_some_and(|c| c.status != "True")))
            .count()
    }
}

/// The receiving ends of a [`Publisher`].
#[derive(Clone)]
pub struct Subscription {
    pub generation: watch::Receiver<Arc<Generation>>,
    /// The latest generation's snapshot, for the proxy.
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
}

/// Translates stores into generations and publishes them; the one writer. Translation is
/// incremental ([`Incremental`]): each store is compared with the one before, and only what
/// the difference touches is recomputed.
pub struct Publisher {
    options: Options,
    translator: Incremental,
    generation: watch::Sender<Arc<Generation>>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    /// The conditions last logged, so each is logged when it changes, not on every snapshot.
    logged: Conditions,
    /// The policies last compiled, and what they compiled to: compiled again only when they
    /// change.
    policies: Compiled,
}

impl Publisher {
    /// A publisher whose first generation is `options.version + 1`; until it publishes, readers
    /// see the empty generation (every destination passes through).
    pub fn new(options: Options) -> (Self, Subscription) {
        let (generation, generation_rx) = watch::channel(Arc::new(Generation::default()));
        let (snapshot, snapshot_rx) = watch::channel(Arc::new(Snapshot::default()));
        (
            Self {
                translator: Incremental::new(options.clone()),
                options,
                generation,
                snapshot,
                logged: Conditions::new(),
                policies: Default::default(),
            },
            Subscription { generation: generation_rx, snapshot: snapshot_rx },
        )
    }

    /// Translates `objects` as the next version, logs what changed and publishes it. `source`
    /// names where the objects came from, for the log.
    pub fn publish(&mut self, objects: Store, source: &str) -> Arc<Generation> {
        self.options.version += 1;
        let started = Instant::now();
        let mut step = self.translator.apply(&objects, self.options.version);
        if !objects.authorization_policies.ptr_eq(&self.policies.policies)
            || !objects.namespaces.ptr_eq(&self.policies.namespaces)
        {
            let (authz, refusals) = crate::authz::compile_store(&objects);
            log_changed_refusals(&self.policies.refusals, &refusals);
            info!(
                policies = authz.policies().len(),
                strict_namespaces = ?authz.strict_namespaces(),
                refused = refusals.len(),
                "authorization policies compiled"
            );
            self.policies = Compiled {
                policies: objects.authorization_policies.clone(),
                namespaces: objects.namespaces.clone(),
                authz: Arc::new(authz),
                refusals: Arc::new(refusals),
            };
        }
        step.snapshot.authz = self.policies.authz.clone();
        let before = self.generation.borrow().statuses.clone();
        let generation = Arc::new(Generation {
            version: self.options.version,
            snapshot: Arc::new(step.snapshot),
            statuses: step.statuses,
            objects,
            policy_refusals: self.policies.refusals.clone(),
        });
        log_changed_conditions(&before, &generation.statuses, &mut self.logged);
        info!(
            source,
            version = generation.version,
            frontends = generation.snapshot.frontends.len(),
            routes = generation.statuses.len(),
            rejected = generation.rejected(),
            recomputed_services = step.work.services,
            recomputed_routes = step.work.routes,
            translate_us = started.elapsed().as_micros() as u64,
            "configuration applied"
        );
        self.generation.send_replace(generation.clone());
        self.snapshot.send_replace(generation.snapshot.clone());
        generation
    }

    /// Publishes `objects` with the configuration in force, untranslated: for changes that no
    /// translation reads (a route's `status`, which the status writer compares against). The
    /// version, snapshot and statuses stay; the proxy's channel is not touched.
    pub fn refresh(&mut self, objects: Store) -> Arc<Generation> {
        let current = self.generation.borrow().clone();
        let generation = Arc::new(Generation {
            version: current.version,
            snapshot: current.snapshot.clone(),
            statuses: current.statuses.clone(),
            objects,
            policy_refusals: current.policy_refusals.clone(),
        });
        self.generation.send_replace(generation.clone());
        generation
    }

    /// A receiver of the generations, for readers started after the publisher.
    pub fn subscribe(&self) -> Subscription {
        Subscription { generation: self.generation.subscribe(), snapshot: self.snapshot.subscribe() }
    }
}

/// The policies as last compiled, and what from: compiled again only when the store's
/// policies or namespaces (whose labels set peer authentication) are other maps.
#[derive(Default)]
struct Compiled {
    policies: imbl::OrdMap<crate::store::Key, Arc<serde_json::Value>>,
    namespaces: imbl::OrdMap<String, Arc<k8s_openapi::api::core::v1::Namespace>>,
    authz: Arc<gammaray_proxy::authz::Authz>,
    refusals: Arc<Vec<crate::authz::Refusal>>,
}

/// Logs each policy refusal that is new or changed, and each that no longer holds.
fn log_changed_refusals(before: &[crate::authz::Refusal], now: &[crate::authz::Refusal]) {
    for r in now.iter().filter(|r| !before.contains(r)) {
        warn!(policy = %r.policy, reason = %r.reason, effect = r.effect, "authorization policy not enforced as written");
    }
    for r in before.iter().filter(|b| !now.iter().any(|n| n.policy == b.policy)) {
        info!(policy = %r.policy, "authorization policy: the refusal no longer holds (fixed, or the policy is gone)");
    }
}

/// Route conditions that are not plainly true, by route, then parent and condition type: their
/// status, reason and message.
type Conditions = BTreeMap<RouteKey, BTreeMap<(String, String), (String, String, String)>>;

/// Logs each route condition that is not plainly true and was not so before (new, or with
/// another reason or message), and each that was and now is, for the routes whose status
/// differs between `before` and `now` (the persistent maps find them without visiting the
/// rest); keeps `logged` up to date.
fn log_changed_conditions(before: &Statuses, now: &Statuses, logged: &mut Conditions) {
    for item in before.diff(now) {
        let (key, _, status) = crate::store::changed(item);
        let was = logged.remove(key).unwrap_or_default();
        let mut is = BTreeMap::new();
        if let Some(s) = status {
            for p in &s.parents {
                for c in p.conditions.iter().filter(|c| c.status != "True" || c.type_ == "PartiallyInvalid") {
                    let at = (p.parent_ref.name.clone(), c.type_.to_string());
                    let value = (c.status.to_string(), c.reason.to_string(), c.message.clone());
                    if was.get(&at) != Some(&value) {
                        warn!(route = %s.route, kind = %s.kind, parent = %p.parent_ref.name, condition = c.type_, reason = c.reason, message = %c.message, "route status");
                    }
                    is.insert(at, value);
                }
            }
        }
        let (kind, route) = (key.0, format!("{}/{}", key.1.0, key.1.1));
        for (parent, condition) in was.keys().filter(|k| !is.contains_key(*k)) {
            info!(%route, %kind, %parent, condition, "route status: the condition no longer holds (fixed, or the route is gone)");
        }
        if !is.is_empty() {
            logged.insert(key.clone(), is);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, time::Duration};

    use super::*;

    /// A Service and [`ROUTES`] HTTPRoutes attached to it, named for version `i`: large enough
    /// that publishing takes a while, as it does for a real cluster's configuration.
    fn objects(i: usize) -> Store {
        let mut store = Store::default();
        let mut yaml = String::from(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\nspec: {clusterIP: 10.96.0.1, ports: [{name: http, port: 80}]}\n",
        );
        for k in 0..ROUTES {
            yaml.push_str(&format!(
                "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: route-{i}-{k}, namespace: demo}}\n\
                 spec: {{parentRefs: [{{group: '', kind: Service, name: web, port: 80}}], rules: [{{backendRefs: [{{name: web, port: 80}}]}}]}}\n"
            ));
        }
        let applied = store.apply_yaml(&yaml);
        assert!(applied.errors.is_empty(), "fixture parses: {:?}", applied.errors);
        store
    }

    fn routes_in_objects(g: &Generation) -> BTreeSet<String> {
        g.objects.http_routes.keys().map(|(ns, name)| format!("{ns}/{name}")).collect()
    }

    fn routes_in_statuses(g: &Generation) -> BTreeSet<String> {
        g.statuses.values().map(|s| s.route.clone()).collect()
    }

    const ROUTES: usize = 300;

    /// A reader on another thread, woken by every publication while the publisher runs flat out,
    /// always finds the statuses, the snapshot and the objects of one version together. With
    /// three channels sent one after another (the earlier design), a reader woken by the first
    /// read the second before it was sent: in a probe of that design with generations of this
    /// size, most wake-ups paired one version's statuses with the other's objects.
    #[test]
    fn readers_never_see_parts_of_two_versions() {
        const VERSIONS: usize = 100;
        let rt =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
        rt.block_on(async {
            let (mut publisher, sub) = Publisher::new(Options::default());
            let mut rx = sub.generation.clone();
            let reader = tokio::spawn(async move {
                let mut seen = 0;
                while tokio::time::timeout(Duration::from_secs(10), rx.changed())
                    .await
                    .is_ok_and(|r| r.is_ok())
                {
                    let g = rx.borrow_and_update().clone();
                    assert_eq!(g.snapshot.version, g.version, "the snapshot is the generation's");
                    assert_eq!(routes_in_statuses(&g), routes_in_objects(&g), "version {}", g.version);
                    seen += 1;
                    if g.version == VERSIONS as u64 {
                        break;
                    }
                }
                seen
            });
            for i in 1..=VERSIONS {
                let g = publisher.publish(objects(i), "test");
                assert_eq!(g.version, i as u64);
                assert_eq!(sub.snapshot.borrow().version, g.version, "the proxy's channel follows");
                tokio::task::yield_now().await;
            }
            let seen = reader.await.expect("the reader's checks held");
            assert!(seen > 0, "the reader saw generations");
            assert_eq!(sub.generation.borrow().version, VERSIONS as u64);
        });
    }

    /// A route condition that is not plainly true is logged when it appears, not again on every
    /// snapshot while it holds, and once more when it no longer holds.
    #[test]
    fn a_route_condition_is_logged_when_it_changes_not_on_every_snapshot() {
        let captured = crate::logging::capture::Captured::default();
        let subscriber = tracing_subscriber::fmt().with_writer(captured.clone()).with_ansi(false).finish();
        let world = |backend: &str| {
            let mut store = Store::default();
            let applied = store.apply_yaml(&format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: demo}}\nspec: {{clusterIP: 10.96.0.1, ports: [{{name: http, port: 80}}]}}\n\
                 ---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: demo}}\n\
                 spec: {{parentRefs: [{{group: '', kind: Service, name: web, port: 80}}], rules: [{{backendRefs: [{{name: {backend}, port: 80}}]}}]}}\n"
            ));
            assert!(applied.errors.is_empty(), "{:?}", applied.errors);
            store
        };
        tracing::subscriber::with_default(subscriber, || {
            let (mut publisher, _readers) = Publisher::new(Options::default());
            for _ in 0..3 {
                publisher.publish(world("missing"), "test");
            }
            publisher.publish(world("web"), "test");
        });
        let lines = captured.lines();
        let logged = |what: &str| lines.iter().filter(|l| l.contains(what)).count();
        assert_eq!(logged("route status route=demo/r"), 1, "once for three snapshots: {lines:#?}");
        assert_eq!(logged("no longer holds"), 1, "and once when fixed: {lines:#?}");
    }
}
