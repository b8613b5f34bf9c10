//! The one translation: stores of Kubernetes objects in, an immutable [`Snapshot`] and the
//! status of every route out. Pure: no I/O, no clock, no randomness, so that every source
//! (API server, manifest files, tests) gets the same answer for the same objects.
//!
//! GAMMA semantics implemented here: routes bind to a Service through `parentRefs`
//! (group `""` or `core`, kind `Service`, optional port and sectionName); routes in the
//! Service's namespace are producer routes for every client, routes elsewhere are consumer
//! routes for clients of their own namespace and replace the producer routes for them; only
//! one route kind applies per Service port (GRPCRoute over HTTPRoute); rules are sorted by the
//! spec's precedence; invalid rules are dropped with a status, invalid backends answer 500.

mod incremental;
mod rules;

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use gammaray_proxy::{
    route::Place,
    snapshot::{
        AppProtocol, Backend, Declared, Endpoint, Frontend, GrpcRuleMatch, HttpRuleMatch, ObjectRef,
        Principal, RouteKind, RouteTable, Snapshot, Workload,
    },
};
use serde::Serialize;

use crate::store::{KeyRef, ServiceInfo, ServicePortInfo, Store};
pub use incremental::{Incremental, RouteKey, Statuses};
pub use rules::{CompiledRoute, CompiledRule};

/// The controller name gammaray writes into route status.
pub const CONTROLLER_NAME: &str = "gammaray.dev/mesh";

#[derive(Debug, Clone)]
pub struct Options {
    pub trust_domain: String,
    /// The version stamped on the snapshot.
    pub version: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self { trust_domain: "cluster.local".into(), version: 0 }
    }
}

#[derive(Debug)]
pub struct Translation {
    pub snapshot: Snapshot,
    /// One entry per route that has at least one Service parentRef.
    pub statuses: Vec<RouteStatus>,
}

/// What gammaray says about one route, to be written to `status.parents`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteStatus {
    #[serde(serialize_with = "serialize_kind")]
    pub kind: RouteKind,
    pub route: String,
    pub generation: Option<i64>,
    pub parents: Vec<ParentStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentStatus {
    /// The parentRef as the route wrote it, with the namespace filled in.
    #[serde(flatten)]
    pub parent_ref: ParentRef,
    pub controller_name: &'static str,
    pub conditions: Vec<RouteCondition>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteCondition {
    #[serde(rename = "type")]
    pub type_: &'static str,
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
    pub observed_generation: Option<i64>,
}

impl ParentStatus {
    pub fn condition(&self, type_: &str) -> Option<&RouteCondition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

fn serialize_kind<S: serde::Serializer>(kind: &RouteKind, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&kind.to_string())
}

/// Which routes apply to whom on one frontend.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Group {
    Producer,
    Consumer(String),
}

/// A route's rules attached to one Service port.
struct Attachment<'a> {
    route: &'a CompiledRoute,
}

pub fn translate(store: &Store, opts: &Options) -> Translation {
    let workloads = workloads(store, &opts.trust_domain);
    let mut backends = BackendResolver { store, workloads: &workloads, cache: HashMap::new() };

    let mut routes: Vec<CompiledRoute> =
        store.http_routes.values().map(|r| rules::compile_http(r, &mut backends)).collect();
    routes.extend(store.grpc_routes.values().map(|r| rules::compile_grpc(r, &mut backends)));

    // (service, port) → group → attached routes.
    let mut attached: BTreeMap<(ObjectRef, u16), BTreeMap<Group, Vec<Attachment<'_>>>> = BTreeMap::new();
    let mut statuses = Vec::new();
    // (route index, parent index) → ports where the route lost a kind conflict / attached.
    let mut bound: Vec<Vec<Vec<u16>>> = Vec::new();
    for route in &routes {
        let mut per_parent = Vec::new();
        for parent in &route.parents {
            let ports = match bind(store, route, parent) {
                Ok(ports) => ports,
                Err(_) => {
                    per_parent.push(Vec::new());
                    continue;
                }
            };
            if route.has_valid_rules() {
                let service = ObjectRef::new(&parent.namespace, &parent.name);
                let group = if *route.id.namespace == *parent.namespace {
                    Group::Producer
                } else {
                    Group::Consumer(route.id.namespace.to_string())
                };
                for &port in &ports {
                    attached
                        .entry((service.clone(), port))
                        .or_default()
                        .entry(group.clone())
                        .or_default()
                        .push(Attachment { route });
                }
            }
            per_parent.push(ports);
        }
        bound.push(per_parent);
    }

    // Kind conflicts: on one Service port and group, GRPCRoute wins over HTTPRoute.
    let mut conflicted: HashMap<(ObjectRef, RouteKind, ObjectRef, u16), ()> = HashMap::new();
    for ((service, port), groups) in &attached {
        for attachments in groups.values() {
            if attachments.iter().any(|a| a.route.kind == RouteKind::Grpc) {
                for a in attachments.iter().filter(|a| a.route.kind == RouteKind::Http) {
                    conflicted.insert((a.route.id.clone(), a.route.kind, service.clone(), *port), ());
                }
            }
        }
    }

    for (route, per_parent) in routes.iter().zip(&bound) {
        if route.parents.is_empty() {
            continue;
        }
        let parents = route
            .parents
            .iter()
            .zip(per_parent)
            .map(|(parent, ports)| {
                let service = ObjectRef::new(&parent.namespace, &parent.name);
                let lost: Vec<u16> = ports
                    .iter()
                    .copied()
                    .filter(|p| conflicted.contains_key(&(route.id.clone(), route.kind, service.clone(), *p)))
                    .collect();
                parent_status(store, route, parent, ports, &lost)
            })
            .collect();
        statuses.push(RouteStatus {
            kind: route.kind,
            route: route.id.to_string(),
            generation: route.generation,
            parents,
        });
    }

    let mut frontends = gammaray_proxy::snapshot::SharedMap::default();
    for ((ns, name), svc) in &store.services {
        let service = ObjectRef::new(ns, name);
        let backend = |port| backends.resolve(&service, port).ok();
        let tables = |port| {
            let mut producer = None;
            let mut consumers = BTreeMap::new();
            if let Some(groups) = attached.get(&(service.clone(), port)) {
                for (group, attachments) in groups {
                    let table = Arc::new(route_table(attachments));
                    match group {
                        Group::Producer => producer = Some(table),
                        Group::Consumer(ns) => {
                            consumers.insert(ns.clone(), table);
                        }
                    }
                }
            }
            (producer, consumers)
        };
        for (addr, frontend) in frontends_of(&service, svc, backend, tables) {
            frontends.insert(addr, frontend);
        }
    }

    Translation {
        snapshot: Snapshot {
            version: opts.version,
            frontends,
            workloads: workloads.into_iter().collect(),
            nodes: node_addresses(store),
            authz: Default::default(),
        },
        statuses,
    }
}

/// A frontend's route tables: the producers' and each consumer namespace's.
type Tables = (Option<Arc<RouteTable>>, BTreeMap<String, Arc<RouteTable>>);

/// The frontends of one Service, one per port and ClusterIP, in order (a later one for the same
/// address replaces an earlier one). `backend` resolves the default backend of a port, `tables`
/// gives the route tables attached to it.
fn frontends_of(
    service: &ObjectRef,
    svc: &ServiceInfo,
    mut backend: impl FnMut(u16) -> Option<Arc<Backend>>,
    tables: impl Fn(u16) -> Tables,
) -> Vec<(SocketAddr, Arc<Frontend>)> {
    let mut out = Vec::new();
    let Some(spec) = &svc.spec else { return out };
    if !has_frontend(svc) {
        return out;
    }
    let ips: Vec<IpAddr> = spec
        .cluster_ips
        .clone()
        .unwrap_or_else(|| spec.cluster_ip.clone().into_iter().collect())
        .iter()
        .filter_map(|ip| ip.parse().ok())
        .collect();
    for sp in spec.ports.iter().flatten() {
        let Ok(port) = u16::try_from(sp.port) else {
            continue;
        };
        let default_backend = backend(port).unwrap_or_else(|| {
            Arc::new(Backend {
                service: service.clone(),
                port,
                protocol: app_protocol(sp),
                endpoints: Vec::new(),
            })
        });
        let (producer, consumers) = tables(port);
        let frontend = Arc::new(Frontend {
            service: service.clone(),
            port,
            port_name: sp.name.clone(),
            protocol: app_protocol(sp),
            default_backend,
            producer,
            consumers,
        });
        for ip in &ips {
            out.push((SocketAddr::new(*ip, port), frontend.clone()));
        }
    }
    out
}

/// The rules of the routes attached to one frontend for one group, in precedence order.
fn route_table(attachments: &[Attachment<'_>]) -> RouteTable {
    let grpc = attachments.iter().any(|a| a.route.kind == RouteKind::Grpc);
    let mut chosen: Vec<&CompiledRoute> = attachments
        .iter()
        .map(|a| a.route)
        .filter(|r| r.kind == if grpc { RouteKind::Grpc } else { RouteKind::Http })
        .collect();
    // Ties go to the oldest route, then to namespace/name in alphabetical order.
    chosen.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.id.cmp(&b.id)));
    chosen.dedup_by(|a, b| a.id == b.id && a.kind == b.kind);
    if grpc {
        RouteTable::grpc(placed(
            &chosen,
            |rule| &rule.grpc_matches,
            |id, matcher, action| GrpcRuleMatch { id, matcher, action },
        ))
    } else {
        RouteTable::http(placed(
            &chosen,
            |rule| &rule.http_matches,
            |id, matcher, action| HttpRuleMatch { id, matcher, action },
        ))
    }
}

/// Every match of every valid rule of `routes` (already in creation/name order), with its
/// place for precedence's ties; [`RouteTable`]'s constructors sort them.
fn placed<M: Clone, E>(
    routes: &[&CompiledRoute],
    matches: impl Fn(&CompiledRule) -> &Vec<M>,
    entry: impl Fn(Arc<gammaray_proxy::snapshot::RouteId>, M, Arc<gammaray_proxy::snapshot::RuleAction>) -> E,
) -> Vec<(Place, E)> {
    let mut entries = Vec::new();
    for (order, route) in routes.iter().enumerate() {
        for rule in route.rules.iter().filter(|r| r.problem.is_none()) {
            for (i, m) in matches(rule).iter().enumerate() {
                let place = Place { route: order, rule: rule.index, matched: i };
                entries.push((place, entry(rule.id.clone(), m.clone(), rule.action.clone())));
            }
        }
    }
    entries
}

/// A route's Service parentRef, with defaults applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    pub group: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub port: Option<i32>,
    pub section_name: Option<String>,
}

/// Why a parentRef does not bind.
#[derive(Debug)]
struct NotBound {
    reason: &'static str,
    message: String,
}

/// The Service ports a parentRef binds to.
fn bind(store: &Store, route: &CompiledRoute, parent: &ParentRef) -> Result<Vec<u16>, NotBound> {
    let Some(svc) = store.services.get(&crate::store::KeyRef(&parent.namespace, &parent.name)) else {
        return Err(NotBound {
            reason: "NoMatchingParent",
            message: format!("Service {}/{} does not exist", parent.namespace, parent.name),
        });
    };
    let spec = svc.spec.clone().unwrap_or_default();
    if spec.type_.as_deref() == Some("ExternalName") {
        return Err(NotBound {
            reason: "UnsupportedValue",
            message: "an ExternalName Service cannot be a route parent".into(),
        });
    }
    if !has_frontend(svc) {
        return Err(NotBound {
            reason: "UnsupportedValue",
            message: "a headless Service (clusterIP None) cannot be a route parent".into(),
        });
    }
    let _ = route;
    let ports: Vec<u16> = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| parent.port.is_none_or(|want| p.port == want))
        .filter(|p| parent.section_name.as_ref().is_none_or(|want| p.name.as_deref() == Some(want.as_str())))
        .filter_map(|p| u16::try_from(p.port).ok())
        .collect();
    if ports.is_empty() {
        return Err(NotBound {
            reason: "NoMatchingParent",
            message: format!(
                "Service {}/{} has no port matching port {:?} and sectionName {:?}",
                parent.namespace, parent.name, parent.port, parent.section_name
            ),
        });
    }
    Ok(ports)
}

fn has_frontend(svc: &ServiceInfo) -> bool {
    let Some(spec) = &svc.spec else { return false };
    spec.type_.as_deref() != Some("ExternalName")
        && spec.cluster_ip.as_deref().is_some_and(|ip| ip != "None" && !ip.is_empty())
}

fn parent_status(
    store: &Store,
    route: &CompiledRoute,
    parent: &ParentRef,
    ports: &[u16],
    lost: &[u16],
) -> ParentStatus {
    let cond = |type_, ok: bool, reason, message: String| RouteCondition {
        type_,
        status: if ok { "True" } else { "False" },
        reason,
        message,
        observed_generation: route.generation,
    };
    let mut conditions = Vec::new();
    let valid_rules = route.rules.iter().filter(|r| r.problem.is_none()).count();
    let invalid: Vec<String> = route
        .rules
        .iter()
        .filter_map(|r| r.problem.as_ref().map(|p| format!("rule {}: {}", r.index, p.message)))
        .collect();
    let accepted = match bind(store, route, parent) {
        Err(nb) => cond("Accepted", false, nb.reason, nb.message),
        Ok(_) if valid_rules == 0 => {
            cond("Accepted", false, "UnsupportedValue", format!("no valid rule: {}", invalid.join("; ")))
        }
        Ok(_) if !lost.is_empty() && lost.len() == ports.len() => cond(
            "Accepted",
            false,
            "Conflicted",
            format!("a GRPCRoute is attached to the same Service port(s) {lost:?} and takes precedence"),
        ),
        Ok(_) if !lost.is_empty() => cond(
            "Accepted",
            true,
            "Accepted",
            format!(
                "applied on ports {:?}; port(s) {lost:?} are taken by a GRPCRoute",
                ports.iter().filter(|p| !lost.contains(p)).collect::<Vec<_>>()
            ),
        ),
        Ok(_) => cond("Accepted", true, "Accepted", format!("applied to Service port(s) {ports:?}")),
    };
    conditions.push(accepted);
    conditions.push(match &route.unresolved {
        Some(problem) => cond("ResolvedRefs", false, problem.reason, problem.message.clone()),
        None => cond("ResolvedRefs", true, "ResolvedRefs", "all references resolved".into()),
    });
    if !invalid.is_empty() && valid_rules > 0 {
        conditions.push(RouteCondition {
            type_: "PartiallyInvalid",
            status: "True",
            reason: "UnsupportedValue",
            message: format!("dropped {}", invalid.join("; ")),
            observed_generation: route.generation,
        });
    }
    ParentStatus { parent_ref: parent.clone(), controller_name: CONTROLLER_NAME, conditions }
}

fn app_protocol(port: &ServicePortInfo) -> AppProtocol {
    match port.app_protocol.as_deref() {
        Some("http") => AppProtocol::Http,
        Some("kubernetes.io/h2c" | "grpc" | "h2c") => AppProtocol::H2c,
        _ => AppProtocol::Opaque,
    }
}

/// Each node's InternalIP (else its first address).
fn node_addresses(store: &Store) -> gammaray_proxy::snapshot::FastMap<String, IpAddr> {
    store
        .nodes
        .iter()
        .filter_map(|(name, node)| {
            let addrs = node.status.as_ref()?.addresses.as_ref()?;
            let ip = addrs
                .iter()
                .find(|a| a.type_ == "InternalIP")
                .or_else(|| addrs.first())
                .and_then(|a| a.address.parse().ok())?;
            Some((name.clone(), ip))
        })
        .collect()
}

/// Meshed pods by IP, with their SPIFFE identity. A pod on the host's network is no workload:
/// its IP is its node's, and the mesh must never speak for, or tunnel to, a node's own
/// addresses. Two pods claiming one address: the last by namespace and name wins.
fn workloads(store: &Store, trust_domain: &str) -> HashMap<IpAddr, Arc<Workload>> {
    let mut principals = Principals::new(trust_domain);
    let mut out = HashMap::new();
    for (key, pod) in &store.pods {
        let Some(workload) = workload_of(key, pod, &mut principals) else { continue };
        let workload = Arc::new(workload);
        for ip in pod_ips(pod) {
            out.insert(ip, workload.clone());
        }
    }
    out
}

/// The workload a pod is, if it is one. Its names and node are the store's (shared), its
/// principal shared with every other pod of its service account.
fn workload_of(
    key: &crate::store::PodKey,
    pod: &crate::store::PodInfo,
    principals: &mut Principals,
) -> Option<Workload> {
    if pod.host_network {
        return None;
    }
    Some(Workload {
        pod: key.clone(),
        node: pod.node.clone(),
        principal: principals.get(&key.namespace, pod.class.service_account.as_ref()),
        class: pod.class.clone(),
    })
}

/// One [`Principal`] per namespace and service account, shared by their pods' workloads. Those
/// no workload holds any more are dropped when the table has doubled since it was last swept.
pub struct Principals {
    trust_domain: Arc<str>,
    /// A pod without `serviceAccountName` runs as `default`.
    default_account: Arc<str>,
    by_account: HashMap<(Arc<str>, Arc<str>), Arc<Principal>>,
    swept_at: usize,
}

impl Principals {
    pub fn new(trust_domain: &str) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            default_account: "default".into(),
            by_account: HashMap::new(),
            swept_at: 0,
        }
    }

    fn get(&mut self, namespace: &Arc<str>, service_account: Option<&Arc<str>>) -> Arc<Principal> {
        let key = (namespace.clone(), service_account.unwrap_or(&self.default_account).clone());
        if let Some(shared) = self.by_account.get(&key) {
            return shared.clone();
        }
        if self.by_account.len() >= 2 * self.swept_at.max(1024) {
            self.by_account.retain(|_, p| Arc::strong_count(p) > 1);
            self.swept_at = self.by_account.len();
        }
        let identity = gammaray_proxy::identity::Identity {
            trust_domain: self.trust_domain.clone(),
            namespace: key.0.clone(),
            service_account: key.1.clone(),
        };
        let principal = Arc::new(Principal { uri: identity.to_string().into(), identity });
        self.by_account.insert(key, principal.clone());
        principal
    }
}

fn pod_ips(pod: &crate::store::PodInfo) -> impl Iterator<Item = IpAddr> + '_ {
    pod.ips.iter().copied()
}

/// Why a backendRef does not resolve.
#[derive(Debug, Clone)]
pub struct Unresolved {
    pub reason: &'static str,
    pub message: String,
}

/// Where a rule's backendRefs are resolved: the full translation's [`BackendResolver`], or the
/// incremental translator's cache of every Service's backends.
pub trait Resolve {
    fn resolve(&mut self, service: &ObjectRef, port: u16) -> Result<Arc<Backend>, Unresolved>;
}

/// Resolves Service backends to endpoints, sharing one [`Backend`] per Service port.
pub struct BackendResolver<'a> {
    store: &'a Store,
    workloads: &'a HashMap<IpAddr, Arc<Workload>>,
    cache: HashMap<(ObjectRef, u16), Arc<Backend>>,
}

impl Resolve for BackendResolver<'_> {
    fn resolve(&mut self, service: &ObjectRef, port: u16) -> Result<Arc<Backend>, Unresolved> {
        if let Some(b) = self.cache.get(&(service.clone(), port)) {
            return Ok(b.clone());
        }
        let workloads = self.workloads;
        let backend = Arc::new(resolve_backend(self.store, service, port, &|ip| workloads.get(ip))?);
        self.cache.insert((service.clone(), port), backend.clone());
        Ok(backend)
    }
}

fn no_service(service: &ObjectRef) -> Unresolved {
    Unresolved { reason: "BackendNotFound", message: format!("Service {service} does not exist") }
}

fn no_port(service: &ObjectRef, port: u16) -> Unresolved {
    Unresolved { reason: "BackendNotFound", message: format!("Service {service} has no port {port}") }
}

/// The endpoints of `service`'s port `port` (its first port of that number), from the Service's
/// EndpointSlices, each with the workload its address belongs to.
fn resolve_backend<'w>(
    store: &Store,
    service: &ObjectRef,
    port: u16,
    workload_of: &dyn Fn(&IpAddr) -> Option<&'w Arc<Workload>>,
) -> Result<Backend, Unresolved> {
    let Some(svc) = store.services.get(&KeyRef(&service.namespace, &service.name)) else {
        return Err(no_service(service));
    };
    let Some(sp) = svc.spec.iter().flat_map(|s| s.ports.iter().flatten()).find(|p| p.port == i32::from(port))
    else {
        return Err(no_port(service, port));
    };
    let mut endpoints = Vec::new();
    for (_, slice) in store.slices_of(&service.namespace, &service.name) {
        if *slice.address_type != *"IPv4" && *slice.address_type != *"IPv6" {
            continue;
        }
        let Some(target) = slice
            .ports
            .iter()
            .find(|p| {
                p.name == sp.name || (p.name.as_deref().unwrap_or("") == sp.name.as_deref().unwrap_or(""))
            })
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for ep in &slice.endpoints {
            if ep.ready == Some(false) {
                continue;
            }
            for &addr in &ep.addresses {
                let workload = workload_of(&addr);
                let pod = match (&ep.pod, workload) {
                    (Some(pod), Some(w)) if w.pod == *pod => Some(w.pod.clone()),
                    (Some(pod), _) => Some(pod.clone()),
                    (None, w) => w.map(|w| w.pod.clone()),
                };
                let node = match (&ep.node_name, workload) {
                    (Some(n), Some(w)) if w.node.as_deref() == Some(&**n) => w.node.clone(),
                    (Some(n), _) => Some(n.clone()),
                    (None, w) => w.and_then(|w| w.node.clone()),
                };
                let agrees = workload.is_some_and(|w| pod.as_ref() == Some(&w.pod) && node == w.node);
                endpoints.push(Endpoint {
                    ip: addr,
                    port: target,
                    workload: workload.cloned(),
                    declared: (!agrees).then(|| Arc::new(Declared { pod, node })),
                });
            }
        }
    }
    endpoints.sort_by_key(Endpoint::addr);
    endpoints.dedup_by_key(|e| e.addr());
    // Kept for as long as the Service is unchanged: no spare capacity.
    endpoints.shrink_to_fit();
    Ok(Backend { service: service.clone(), port, protocol: app_protocol(sp), endpoints })
}

#[cfg(test)]
mod catalogue_tests;
#[cfg(test)]
mod incremental_tests;
#[cfg(test)]
mod tests;
