//! Incremental translation: the same answer as [`super::translate`], at the cost of what changed.
//!
//! [`Incremental`] keeps the store it last translated and what it derived from it: every pod's
//! workload by address, every Service's backends, every route compiled with the Services it
//! read, which routes are attached to which Service port, every frontend and every route status.
//! Given the next store, it asks the persistent maps what differs ([`imbl::OrdMap::diff`], which
//! skips the subtrees both versions share) and follows the dependencies from there:
//!
//! - a Pod → the workloads of its addresses → the Services whose EndpointSlices list them;
//! - an EndpointSlice → its Service (before and after, since its label may move);
//! - a Service → its backends, frontends and the routes that name it (as parent or backend);
//! - a Service's backends → the routes that resolve them (recompiled) → the frontends those
//!   routes are attached to, and the statuses of every route attached there (kind conflicts);
//! - a route → itself, the frontends it was or is attached to, and their routes' statuses.
//!
//! The snapshot's maps and the statuses are persistent too: a new snapshot shares every frontend,
//! workload and status the change did not touch with the one before. The first call, from an
//! empty store, is the initial load, through the same code. `translate` stays the reference:
//! the property test in `tests` checks after every step of random change sequences that both
//! give the same snapshot and statuses.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use gammaray_proxy::snapshot::{
    AddrMap, Backend, FastMap, Frontend, ObjectRef, RouteKind, SharedMap, Snapshot, Workload,
};
use imbl::OrdMap;
use smallvec::SmallVec;

use super::{
    Attachment, CompiledRoute, Group, Options, Principals, Resolve, RouteStatus, Tables, Unresolved, bind,
    frontends_of, no_port, no_service, node_addresses, parent_status, pod_ips, resolve_backend, route_table,
    rules, workload_of,
};
use crate::store::{Key, KeyRef, Store, changed, service_of};

/// A route: its kind, then namespace and name (HTTPRoutes sort before GRPCRoutes, as the full
/// translation lists their statuses).
pub type RouteKey = (RouteKind, Key);

/// Every route's status, by route: persistent, so a new generation shares the unchanged ones.
pub type Statuses = OrdMap<RouteKey, Arc<RouteStatus>>;

/// One Service's backends, one per port number (the first port of that number, as resolving a
/// backendRef finds it), in port order. Most Services have one port: it is held inline.
#[derive(Default)]
struct ServiceBackends(SmallVec<[(u16, Arc<Backend>); 1]>);

impl ServiceBackends {
    fn get(&self, port: &u16) -> Option<&Arc<Backend>> {
        self.0.binary_search_by_key(port, |(p, _)| *p).ok().map(|at| &self.0[at].1)
    }

    /// Adds the backend of `port` unless that port has one already.
    fn add(&mut self, port: u16, backend: impl FnOnce() -> Option<Backend>) {
        if let Err(at) = self.0.binary_search_by_key(&port, |(p, _)| *p)
            && let Some(b) = backend()
        {
            self.0.insert(at, (port, Arc::new(b)));
        }
    }

    fn same(&self, other: &Self) -> bool {
        self.0.len() == other.0.len()
            && self.0.iter().zip(&other.0).all(|((pa, a), (pb, b))| pa == pb && same_backend(a, b))
    }
}

/// A sorted set that holds its first `N` entries inline: the translator keeps one per Service
/// and per Service port, and most hold one route, where a `BTreeSet` allocates a node of eleven.
#[derive(Debug, Clone)]
struct SmallSet<T, const N: usize>(SmallVec<[T; N]>);

impl<T, const N: usize> Default for SmallSet<T, N> {
    fn default() -> Self {
        Self(SmallVec::new())
    }
}

impl<T: Ord, const N: usize> SmallSet<T, N> {
    fn insert(&mut self, value: T) {
        if let Err(at) = self.0.binary_search(&value) {
            self.0.insert(at, value);
        }
    }

    fn remove(&mut self, value: &T) {
        if let Ok(at) = self.0.binary_search(value) {
            self.0.remove(at);
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn iter(&self) -> std::slice::Iter<'_, T> {
        self.0.iter()
    }
}

impl<'a, T, const N: usize> IntoIterator for &'a SmallSet<T, N> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// A sorted map that holds its first entry inline (see [`SmallSet`]).
#[derive(Debug)]
struct SmallMap<K, V>(SmallVec<[(K, V); 1]>);

impl<K, V> Default for SmallMap<K, V> {
    fn default() -> Self {
        Self(SmallVec::new())
    }
}

impl<K: Ord, V: Default> SmallMap<K, V> {
    fn at(&self, key: &K) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.cmp(key))
    }

    fn get(&self, key: &K) -> Option<&V> {
        self.at(key).ok().map(|at| &self.0[at].1)
    }

    fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.at(key).ok().map(|at| &mut self.0[at].1)
    }

    /// The value of `key`, made if absent.
    fn entry(&mut self, key: K) -> &mut V {
        let at = match self.at(&key) {
            Ok(at) => at,
            Err(at) => {
                self.0.insert(at, (key, V::default()));
                at
            }
        };
        &mut self.0[at].1
    }

    fn remove(&mut self, key: &K) {
        if let Ok(at) = self.at(key) {
            self.0.remove(at);
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    fn values(&self) -> impl Iterator<Item = &V> {
        self.0.iter().map(|(_, v)| v)
    }
}

/// The routes of one Service port in one group.
type RouteKeys = SmallSet<RouteKey, 1>;

/// What the translator keeps of one Service, in one entry: a cluster has tens of thousands.
#[derive(Default)]
struct ServiceState {
    /// Absent while the Service does not exist.
    backends: Option<ServiceBackends>,
    /// Where its frontends are.
    addrs: SmallVec<[SocketAddr; 1]>,
}

/// The Services whose EndpointSlices list one address: almost always one, held inline.
type Users = SmallVec<[Arc<ObjectRef>; 1]>;

/// A map by IP address with the addresses kept as their bits (see [`AddrMap`]).
struct AddrTable<V> {
    v4: HashMap<u32, V>,
    v6: HashMap<u128, V>,
}

impl<V> Default for AddrTable<V> {
    fn default() -> Self {
        Self { v4: HashMap::new(), v6: HashMap::new() }
    }
}

impl<V: Default> AddrTable<V> {
    fn get(&self, ip: &IpAddr) -> Option<&V> {
        match ip {
            IpAddr::V4(a) => self.v4.get(&a.to_bits()),
            IpAddr::V6(a) => self.v6.get(&a.to_bits()),
        }
    }

    fn get_mut(&mut self, ip: &IpAddr) -> Option<&mut V> {
        match ip {
            IpAddr::V4(a) => self.v4.get_mut(&a.to_bits()),
            IpAddr::V6(a) => self.v6.get_mut(&a.to_bits()),
        }
    }

    fn get_or_default(&mut self, ip: IpAddr) -> &mut V {
        match ip {
            IpAddr::V4(a) => self.v4.entry(a.to_bits()).or_default(),
            IpAddr::V6(a) => self.v6.entry(a.to_bits()).or_default(),
        }
    }

    fn remove(&mut self, ip: &IpAddr) -> Option<V> {
        match ip {
            IpAddr::V4(a) => self.v4.remove(&a.to_bits()),
            IpAddr::V6(a) => self.v6.remove(&a.to_bits()),
        }
    }
}

/// What the incremental translation keeps of one route.
struct RouteEntry {
    compiled: Arc<CompiledRoute>,
    /// The Services it read: its parents and the backends it resolved (or failed to).
    uses: SmallSet<ObjectRef, 2>,
    /// Where it is attached: Service port and group.
    attachments: Vec<(ObjectRef, u16, Group)>,
}

/// The translator that keeps its derived state between stores. See the module's documentation.
pub struct Incremental {
    /// What the workloads of one service account share.
    principals: Principals,
    /// The store last translated.
    prev: Store,
    workloads: AddrMap<Arc<Workload>>,
    /// The addresses two or more pods claim, with every claimant (as the workload it would be
    /// there) in namespace and name order; the last is the address's workload, as in the full
    /// translation. An address with one claimant has it in `workloads` only.
    contested: HashMap<IpAddr, Vec<Arc<Workload>>>,
    /// What is kept of each Service (see [`ServiceState`]).
    services: HashMap<Arc<ObjectRef>, ServiceState>,
    /// The Services whose EndpointSlices list each address (the slices of the store last
    /// translated): a workload changing there changes their backends.
    ip_users: AddrTable<Users>,
    routes: BTreeMap<RouteKey, RouteEntry>,
    /// The routes that read each Service.
    users: HashMap<ObjectRef, RouteKeys>,
    /// The routes attached to each Service port, by group.
    attached: HashMap<(ObjectRef, u16), SmallMap<Group, RouteKeys>>,
    frontends: SharedMap<SocketAddr, Arc<Frontend>>,
    /// The addresses two or more Services put a frontend at, with every claimant's frontend in
    /// namespace and name order; the last is the address's frontend. An address with one
    /// claimant has it in `frontends` only.
    frontend_claims: HashMap<SocketAddr, Vec<Arc<Frontend>>>,
    statuses: Statuses,
    nodes: FastMap<String, IpAddr>,
}

/// What one step produced.
pub struct Step {
    pub snapshot: Snapshot,
    pub statuses: Statuses,
    /// How much was recomputed, for logs and the bench.
    pub work: Work,
}

/// Counts of what a step recomputed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Work {
    pub workloads: usize,
    pub services: usize,
    pub routes: usize,
    pub frontends: usize,
    pub statuses: usize,
}

impl Incremental {
    pub fn new(options: Options) -> Self {
        Self {
            principals: Principals::new(&options.trust_domain),
            prev: Store::default(),
            workloads: AddrMap::default(),
            contested: HashMap::new(),
            services: HashMap::new(),
            ip_users: AddrTable::default(),
            routes: BTreeMap::new(),
            users: HashMap::new(),
            attached: HashMap::new(),
            frontends: SharedMap::default(),
            frontend_claims: HashMap::new(),
            statuses: Statuses::new(),
            nodes: FastMap::default(),
        }
    }

    /// Translates `store` as version `version`, recomputing only what differs from the store of
    /// the previous call.
    pub fn apply(&mut self, store: &Store, version: u64) -> Step {
        let prev = std::mem::replace(&mut self.prev, store.clone());
        let mut work = Work::default();

        if prev.nodes.diff(&store.nodes).next().is_some() {
            self.nodes = node_addresses(store);
        }

        // Pods → the workloads of their addresses; what each touched address had before.
        let mut touched: BTreeMap<IpAddr, Option<Arc<Workload>>> = BTreeMap::new();
        for item in prev.pods.diff(&store.pods) {
            let (key, old, new) = changed(item);
            if let Some(old) = old {
                for ip in pod_ips(old) {
                    touched.entry(ip).or_insert_with(|| self.workloads.get(&ip).cloned());
                    unclaim(&mut self.workloads, &mut self.contested, ip, key, workload_owner);
                }
            }
            if let Some(new) = new
                && let Some(workload) = workload_of(key, new, &mut self.principals)
            {
                let workload = Arc::new(workload);
                for ip in pod_ips(new) {
                    touched.entry(ip).or_insert_with(|| self.workloads.get(&ip).cloned());
                    claim(&mut self.workloads, &mut self.contested, ip, workload.clone(), workload_owner);
                }
            }
        }
        let mut dirty_services = BTreeSet::new();
        for (ip, before) in touched {
            if self.workloads.get(&ip).map(|w| &**w) == before.as_deref() {
                continue;
            }
            work.workloads += 1;
            dirty_services.extend(self.ip_users.get(&ip).into_iter().flatten().map(|s| (**s).clone()));
        }

        // Services and EndpointSlices → the Services whose backends may have changed.
        let mut changed_services = BTreeSet::new();
        for item in prev.services.diff(&store.services) {
            let (key, _, _) = changed(item);
            changed_services.insert(ObjectRef::shared(key.0.clone(), key.1.clone()));
        }
        dirty_services.extend(changed_services.iter().cloned());
        for item in prev.endpoint_slices().diff(store.endpoint_slices()) {
            let (key, old, new) = changed(item);
            for slice in old.into_iter().chain(new) {
                if let Some(service) = service_of(slice) {
                    dirty_services.insert(service_ref(&prev, store, &key.0, service));
                }
            }
        }
        // Every Service whose object changed re-binds its routes, and every Service whose
        // backends changed recompiles the routes resolving them.
        let mut reread = changed_services;
        for service in &dirty_services {
            work.services += 1;
            if self.refresh_backends(&prev, store, service) {
                reread.insert(service.clone());
            }
        }

        // Routes: those that changed, and those that read a Service that did.
        let mut dirty_routes: BTreeSet<RouteKey> = BTreeSet::new();
        for item in prev.http_routes.diff(&store.http_routes) {
            dirty_routes.insert((RouteKind::Http, changed(item).0.clone()));
        }
        for item in prev.grpc_routes.diff(&store.grpc_routes) {
            dirty_routes.insert((RouteKind::Grpc, changed(item).0.clone()));
        }
        for service in &reread {
            dirty_routes.extend(self.users.get(service).into_iter().flatten().cloned());
        }
        let mut dirty_ports: BTreeSet<(ObjectRef, u16)> = BTreeSet::new();
        for key in &dirty_routes {
            work.routes += 1;
            self.recompile(store, key, &mut dirty_ports);
        }

        // Statuses: the routes recompiled, and every route attached where attachments changed
        // (a GRPCRoute arriving or leaving changes an HTTPRoute's conflict).
        let mut dirty_statuses = dirty_routes;
        for port in &dirty_ports {
            for routes in self.attached.get(port).into_iter().flat_map(|g| g.values()) {
                dirty_statuses.extend(routes.iter().cloned());
            }
        }
        for key in &dirty_statuses {
            work.statuses += 1;
            self.refresh_status(store, key);
        }

        // Frontends: the Services that changed, whose backends changed, or whose ports' routes did.
        let mut dirty_frontends = reread;
        dirty_frontends.extend(dirty_ports.into_iter().map(|(service, _)| service));
        for service in &dirty_frontends {
            work.frontends += 1;
            self.refresh_frontends(store, service);
        }

        Step {
            snapshot: Snapshot {
                version,
                frontends: self.frontends.clone(),
                workloads: self.workloads.clone(),
                nodes: self.nodes.clone(),
                // Policies are compiled apart, by the publisher.
                authz: Default::default(),
            },
            statuses: self.statuses.clone(),
            work,
        }
    }

    /// Recomputes one Service's backends, and the index of the addresses its slices list;
    /// whether its backends changed.
    fn refresh_backends(&mut self, prev: &Store, store: &Store, service: &ObjectRef) -> bool {
        // The index holds what `prev`'s slices list (every Service whose slices changed since is
        // refreshed here): the difference is what to move.
        let listed = |s: &Store| -> Vec<IpAddr> {
            let mut ips: Vec<IpAddr> = s
                .slices_of(&service.namespace, &service.name)
                .flat_map(|(_, slice)| slice.endpoints.iter().flat_map(|ep| ep.addresses.iter().copied()))
                .collect();
            ips.sort_unstable();
            ips.dedup();
            ips
        };
        let (before, now) = (listed(prev), listed(store));
        if before != now {
            for ip in before.iter().filter(|ip| now.binary_search(ip).is_err()) {
                if let Some(users) = self.ip_users.get_mut(ip) {
                    users.retain(|s| **s != *service);
                    if users.is_empty() {
                        self.ip_users.remove(ip);
                    }
                }
            }
            let handle = self.handle(service);
            for ip in now.iter().filter(|ip| before.binary_search(ip).is_err()) {
                self.ip_users.get_or_default(*ip).push(handle.clone());
            }
        }

        let now = store.services.get(&KeyRef(&service.namespace, &service.name)).map(|svc| {
            let workloads = &self.workloads;
            let mut backends = ServiceBackends::default();
            for sp in svc.spec.iter().flat_map(|s| s.ports.iter().flatten()) {
                let Ok(port) = u16::try_from(sp.port) else { continue };
                backends.add(port, || resolve_backend(store, service, port, &|ip| workloads.get(ip)).ok());
            }
            backends
        });
        let before = self.services.get(service).and_then(|s| s.backends.as_ref());
        let same = match (&now, before) {
            (None, None) => true,
            (Some(a), Some(b)) => a.same(b),
            _ => false,
        };
        if same {
            return false;
        }
        match now {
            Some(b) => self.state(service).backends = Some(b),
            None => {
                if let Some(state) = self.services.get_mut(service) {
                    state.backends = None;
                }
                self.tidy(service);
            }
        }
        true
    }

    /// The shared reference to `service` the address index holds.
    fn handle(&mut self, service: &ObjectRef) -> Arc<ObjectRef> {
        match self.services.get_key_value(service) {
            Some((handle, _)) => handle.clone(),
            None => Arc::new(service.clone()),
        }
    }

    /// The entry of `service`, made if absent.
    fn state(&mut self, service: &ObjectRef) -> &mut ServiceState {
        let handle = self.handle(service);
        self.services.entry(handle).or_default()
    }

    /// Forgets the entry of a Service that has neither backends nor frontends.
    fn tidy(&mut self, service: &ObjectRef) {
        if self.services.get(service).is_some_and(|s| s.backends.is_none() && s.addrs.is_empty()) {
            self.services.remove(service);
        }
    }

    /// Drops a route's compiled form and attachments, and compiles it again from `store` if it is
    /// still there; every Service port it was or is attached to goes into `dirty_ports`.
    fn recompile(&mut self, store: &Store, key: &RouteKey, dirty_ports: &mut BTreeSet<(ObjectRef, u16)>) {
        if let Some(old) = self.routes.remove(key) {
            for service in &old.uses {
                if let Some(users) = self.users.get_mut(service) {
                    users.remove(key);
                    if users.is_empty() {
                        self.users.remove(service);
                    }
                }
            }
            for (service, port, group) in old.attachments {
                let at = (service, port);
                if let Some(groups) = self.attached.get_mut(&at) {
                    if let Some(routes) = groups.get_mut(&group) {
                        routes.remove(key);
                        if routes.is_empty() {
                            groups.remove(&group);
                        }
                    }
                    if groups.is_empty() {
                        self.attached.remove(&at);
                    }
                }
                dirty_ports.insert(at);
            }
        }
        let mut resolver = Cached { services: &self.services, read: BTreeSet::new() };
        let compiled = match key.0 {
            RouteKind::Http => store.http_routes.get(&key.1).map(|r| rules::compile_http(r, &mut resolver)),
            RouteKind::Grpc => store.grpc_routes.get(&key.1).map(|r| rules::compile_grpc(r, &mut resolver)),
        };
        let mut uses = SmallSet(resolver.read.into_iter().collect());
        let Some(compiled) = compiled else { return };
        let mut attachments = Vec::new();
        for parent in &compiled.parents {
            let service = ObjectRef::new(&parent.namespace, &parent.name);
            uses.insert(service.clone());
            let Ok(ports) = bind(store, &compiled, parent) else { continue };
            if !compiled.has_valid_rules() {
                continue;
            }
            let group = group_of(&compiled, &service);
            for port in ports {
                attachments.push((service.clone(), port, group.clone()));
            }
        }
        for service in &uses {
            self.users.entry(service.clone()).or_default().insert(key.clone());
        }
        for (service, port, group) in &attachments {
            let at = (service.clone(), *port);
            self.attached.entry(at.clone()).or_default().entry(group.clone()).insert(key.clone());
            dirty_ports.insert(at);
        }
        self.routes.insert(key.clone(), RouteEntry { compiled: Arc::new(compiled), uses, attachments });
    }

    /// Recomputes one route's status (or drops it, for a route gone or without Service parents).
    fn refresh_status(&mut self, store: &Store, key: &RouteKey) {
        let Some(entry) = self.routes.get(key).filter(|e| !e.compiled.parents.is_empty()) else {
            self.statuses.remove(key);
            return;
        };
        let route = &entry.compiled;
        let parents = route
            .parents
            .iter()
            .map(|parent| {
                let service = ObjectRef::new(&parent.namespace, &parent.name);
                let ports = bind(store, route, parent).unwrap_or_default();
                // An attached HTTPRoute loses the ports where a GRPCRoute of its group is
                // attached too.
                let group = group_of(route, &service);
                let lost: Vec<u16> = ports
                    .iter()
                    .copied()
                    .filter(|port| {
                        route.kind == RouteKind::Http
                            && route.has_valid_rules()
                            && self
                                .attached
                                .get(&(service.clone(), *port))
                                .and_then(|groups| groups.get(&group))
                                .is_some_and(|routes| routes.iter().any(|(kind, _)| *kind == RouteKind::Grpc))
                    })
                    .collect();
                parent_status(store, route, parent, &ports, &lost)
            })
            .collect();
        let status = RouteStatus {
            kind: route.kind,
            route: route.id.to_string(),
            generation: route.generation,
            parents,
        };
        if self.statuses.get(key).map(|s| &**s) != Some(&status) {
            self.statuses.insert(key.clone(), Arc::new(status));
        }
    }

    /// Recomputes one Service's frontends and puts them (or, for a Service gone, its absence)
    /// into the snapshot's map.
    fn refresh_frontends(&mut self, store: &Store, service: &ObjectRef) {
        let old = self.services.get_mut(service).map(|s| std::mem::take(&mut s.addrs));
        for addr in old.unwrap_or_default() {
            unclaim(&mut self.frontends, &mut self.frontend_claims, addr, service, frontend_owner);
        }
        if let Some(svc) = store.services.get(&KeyRef(&service.namespace, &service.name)) {
            let backends = self.services.get(service).and_then(|s| s.backends.as_ref());
            let (routes, attached) = (&self.routes, &self.attached);
            let tables = |port| tables(routes, attached, service, port);
            let made =
                frontends_of(service, svc, |port| backends.and_then(|b| b.get(&port)).cloned(), tables);
            let mut addrs = SmallVec::new();
            for (addr, frontend) in made {
                claim(&mut self.frontends, &mut self.frontend_claims, addr, frontend, frontend_owner);
                addrs.push(addr);
            }
            if !addrs.is_empty() {
                self.state(service).addrs = addrs;
            }
        }
        self.tidy(service);
    }
}

/// A snapshot map whose keys several owners may claim (pods an address, Services a frontend
/// address): the last claimant in owner order holds the key, as in the full translation.
trait Claimable<K, V> {
    fn held(&self, key: &K) -> Option<&V>;
    fn hold(&mut self, key: K, value: V);
    fn release(&mut self, key: &K);
}

impl<V: Clone> Claimable<IpAddr, V> for AddrMap<V> {
    fn held(&self, key: &IpAddr) -> Option<&V> {
        self.get(key)
    }
    fn hold(&mut self, key: IpAddr, value: V) {
        self.insert(key, value);
    }
    fn release(&mut self, key: &IpAddr) {
        self.remove(key);
    }
}

impl<V: Clone> Claimable<SocketAddr, V> for SharedMap<SocketAddr, V> {
    fn held(&self, key: &SocketAddr) -> Option<&V> {
        self.get(key)
    }
    fn hold(&mut self, key: SocketAddr, value: V) {
        self.insert(key, value);
    }
    fn release(&mut self, key: &SocketAddr) {
        self.remove(key);
    }
}

fn workload_owner(w: &Arc<Workload>) -> &ObjectRef {
    &w.pod
}

fn frontend_owner(f: &Arc<Frontend>) -> &ObjectRef {
    &f.service
}

/// `value` claims `key` in `map`. `contested` keeps every claimant of the keys two or more claim,
/// in owner order (a key with one claimant is in `map` only); a claimant whose owner claimed
/// the key already replaces that claim.
fn claim<K: Copy + Eq + std::hash::Hash, V: Clone>(
    map: &mut impl Claimable<K, V>,
    contested: &mut HashMap<K, Vec<V>>,
    key: K,
    value: V,
    owner: fn(&V) -> &ObjectRef,
) {
    if let Some(claims) = contested.get_mut(&key) {
        match claims.binary_search_by(|c| owner(c).cmp(owner(&value))) {
            Ok(at) => claims[at] = value,
            Err(at) => claims.insert(at, value),
        }
        map.hold(key, claims.last().expect("two or more").clone());
        return;
    }
    match map.held(&key) {
        Some(current) if owner(current) != owner(&value) => {
            let mut claims = vec![current.clone(), value];
            claims.sort_by(|a, b| owner(a).cmp(owner(b)));
            map.hold(key, claims[1].clone());
            contested.insert(key, claims);
        }
        _ => map.hold(key, value),
    }
}

/// The claim of `gone` on `key` ends (see [`claim`]).
fn unclaim<K: Copy + Eq + std::hash::Hash, V: Clone>(
    map: &mut impl Claimable<K, V>,
    contested: &mut HashMap<K, Vec<V>>,
    key: K,
    gone: &ObjectRef,
    owner: fn(&V) -> &ObjectRef,
) {
    if let Some(claims) = contested.get_mut(&key) {
        claims.retain(|c| owner(c) != gone);
        let last = claims.last().cloned();
        if claims.len() < 2 {
            contested.remove(&key);
        }
        match last {
            Some(v) => map.hold(key, v),
            None => map.release(&key),
        }
    } else if map.held(&key).is_some_and(|c| owner(c) == gone) {
        map.release(&key);
    }
}

/// A reference to the Service `namespace/name` holding the store's names for it when either
/// store has the Service.
fn service_ref(prev: &Store, store: &Store, namespace: &Arc<str>, name: &str) -> ObjectRef {
    let held = store.services.get_key_value(&KeyRef(namespace, name));
    match held.or_else(|| prev.services.get_key_value(&KeyRef(namespace, name))) {
        Some(((ns, name), _)) => ObjectRef::shared(ns.clone(), name.clone()),
        None => ObjectRef::shared(namespace.clone(), name.into()),
    }
}

/// The route tables attached to one Service port.
fn tables(
    routes: &BTreeMap<RouteKey, RouteEntry>,
    attached: &HashMap<(ObjectRef, u16), SmallMap<Group, RouteKeys>>,
    service: &ObjectRef,
    port: u16,
) -> Tables {
    let mut producer = None;
    let mut consumers = BTreeMap::new();
    for (group, keys) in attached.get(&(service.clone(), port)).into_iter().flat_map(SmallMap::iter) {
        let attachments: Vec<Attachment<'_>> =
            keys.iter().filter_map(|k| routes.get(k)).map(|e| Attachment { route: &e.compiled }).collect();
        let table = Arc::new(route_table(&attachments));
        match group {
            Group::Producer => producer = Some(table),
            Group::Consumer(ns) => {
                consumers.insert(ns.clone(), table);
            }
        }
    }
    (producer, consumers)
}

/// Producer when the route lives in the Service's namespace, else a consumer of its own.
fn group_of(route: &CompiledRoute, service: &ObjectRef) -> Group {
    if route.id.namespace == service.namespace {
        Group::Producer
    } else {
        Group::Consumer(route.id.namespace.to_string())
    }
}

/// Backends compared by what the proxy reads of them.
fn same_backend(a: &Backend, b: &Backend) -> bool {
    a.service == b.service && a.port == b.port && a.protocol == b.protocol && a.endpoints == b.endpoints
}

/// Resolves backendRefs from the cache of every Service's backends, noting each Service read.
struct Cached<'a> {
    services: &'a HashMap<Arc<ObjectRef>, ServiceState>,
    read: BTreeSet<ObjectRef>,
}

impl Resolve for Cached<'_> {
    fn resolve(&mut self, service: &ObjectRef, port: u16) -> Result<Arc<Backend>, Unresolved> {
        self.read.insert(service.clone());
        let backends = self
            .services
            .get(service)
            .and_then(|s| s.backends.as_ref())
            .ok_or_else(|| no_service(service))?;
        backends.get(&port).cloned().ok_or_else(|| no_port(service, port))
    }
}
