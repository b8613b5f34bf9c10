//! The immutable routing state the proxy reads: one [`Snapshot`] per configuration change,
//! published by the agent on a `tokio::sync::watch` channel and read once per connection or
//! request. Everything here is already validated and defaulted: the data path never parses.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use http::{HeaderName, HeaderValue, Method};
use regex::Regex;

/// A map the data path reads per connection or request. Its keys (addresses) come from the API
/// server, not from traffic, so a fast hasher with a per-process seed is enough, and cheaper per
/// lookup than SipHash.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A map that is cheap to copy with a few entries changed: [`SHARDS`] [`FastMap`]s, each behind
/// an `Arc`, an entry's shard chosen by a hash of its key. A clone copies the shard pointers; a
/// write copies the one shard it lands in, if another clone still holds it. The agent makes a new
/// snapshot for every configuration change: with 200 000 workloads, a change then copies a few
/// hundred entries, not the map. A persistent hash trie (imbl's) would share more, but took 233
/// bytes per entry where this takes what a `FastMap` does (43 for an address and a pointer), and
/// a lookup here is two hashes and one map probe.
pub struct SharedMap<K, V> {
    shards: Vec<Arc<FastMap<K, V>>>,
    len: usize,
}

/// The shards of a [`SharedMap`].
pub const SHARDS: usize = 256;

/// Picks a key's shard: a fixed seed, so every clone agrees.
const SHARD_HASH: foldhash::fast::FixedState = foldhash::fast::FixedState::with_seed(0x6a09_e667_f3bc_c909);

impl<K, V> Default for SharedMap<K, V> {
    fn default() -> Self {
        Self { shards: (0..SHARDS).map(|_| Arc::new(FastMap::default())).collect(), len: 0 }
    }
}

impl<K, V> Clone for SharedMap<K, V> {
    fn clone(&self) -> Self {
        Self { shards: self.shards.clone(), len: self.len }
    }
}

impl<K: std::hash::Hash + Eq, V> SharedMap<K, V> {
    fn shard<Q: std::hash::Hash + ?Sized>(key: &Q) -> usize {
        use std::hash::BuildHasher as _;
        (SHARD_HASH.hash_one(key) >> 56) as usize % SHARDS
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.shards[Self::shard(key)].get(key)
    }

    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.get(key).is_some()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.shards.iter().flat_map(|s| s.iter())
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.shards.iter().flat_map(|s| s.values())
    }
}

impl<K: std::hash::Hash + Eq + Clone, V: Clone> SharedMap<K, V> {
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let shard = Arc::make_mut(&mut self.shards[Self::shard(&key)]);
        let old = shard.insert(key, value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        let at = Self::shard(key);
        // Copy the shard only when it holds the key.
        self.shards[at].get(key)?;
        let old = Arc::make_mut(&mut self.shards[at]).remove(key);
        if old.is_some() {
            self.len -= 1;
        }
        old
    }
}

impl<K: std::hash::Hash + Eq + Clone, V: Clone> FromIterator<(K, V)> for SharedMap<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(items: I) -> Self {
        let mut map = Self::default();
        for (k, v) in items {
            map.insert(k, v);
        }
        map
    }
}

impl<K: std::hash::Hash + Eq, V> std::ops::Index<&K> for SharedMap<K, V> {
    type Output = V;
    fn index(&self, key: &K) -> &V {
        self.get(key).expect("no entry for the key")
    }
}

impl<K: std::fmt::Debug, V: std::fmt::Debug> std::fmt::Debug for SharedMap<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.shards.iter().flat_map(|s| s.iter())).finish()
    }
}

/// A [`SharedMap`] by IP address, with the addresses kept as their bits: an `IpAddr` takes 17
/// bytes, padded to 24 beside a pointer, where an IPv4 address takes 4. A cluster's every pod
/// has an entry in one, on every node.
pub struct AddrMap<V> {
    v4: SharedMap<u32, V>,
    v6: SharedMap<u128, V>,
}

impl<V> Default for AddrMap<V> {
    fn default() -> Self {
        Self { v4: SharedMap::default(), v6: SharedMap::default() }
    }
}

impl<V> Clone for AddrMap<V> {
    fn clone(&self) -> Self {
        Self { v4: self.v4.clone(), v6: self.v6.clone() }
    }
}

impl<V> AddrMap<V> {
    pub fn get(&self, ip: &IpAddr) -> Option<&V> {
        match ip {
            IpAddr::V4(a) => self.v4.get(&a.to_bits()),
            IpAddr::V6(a) => self.v6.get(&a.to_bits()),
        }
    }

    pub fn contains_key(&self, ip: &IpAddr) -> bool {
        self.get(ip).is_some()
    }

    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = (IpAddr, &V)> {
        let v4 = self.v4.iter().map(|(a, v)| (IpAddr::from(std::net::Ipv4Addr::from_bits(*a)), v));
        v4.chain(self.v6.iter().map(|(a, v)| (IpAddr::from(std::net::Ipv6Addr::from_bits(*a)), v)))
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.v4.values().chain(self.v6.values())
    }
}

impl<V: Clone> AddrMap<V> {
    pub fn insert(&mut self, ip: IpAddr, value: V) -> Option<V> {
        match ip {
            IpAddr::V4(a) => self.v4.insert(a.to_bits(), value),
            IpAddr::V6(a) => self.v6.insert(a.to_bits(), value),
        }
    }

    pub fn remove(&mut self, ip: &IpAddr) -> Option<V> {
        match ip {
            IpAddr::V4(a) => self.v4.remove(&a.to_bits()),
            IpAddr::V6(a) => self.v6.remove(&a.to_bits()),
        }
    }
}

impl<V: Clone> FromIterator<(IpAddr, V)> for AddrMap<V> {
    fn from_iter<I: IntoIterator<Item = (IpAddr, V)>>(items: I) -> Self {
        let mut map = Self::default();
        for (k, v) in items {
            map.insert(k, v);
        }
        map
    }
}

impl<V: std::fmt::Debug> std::fmt::Debug for AddrMap<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// The whole routing state of a node at one point in time.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Increases with every new snapshot.
    pub version: u64,
    /// Service frontends by ClusterIP and port. Routes apply only to traffic addressed here,
    /// never to traffic sent straight to a pod.
    pub frontends: SharedMap<SocketAddr, Arc<Frontend>>,
    /// Meshed workloads by pod IP: who a client is, and where a pod runs.
    pub workloads: AddrMap<Arc<Workload>>,
    /// Node addresses by node name: where another node's HBONE listener is.
    pub nodes: FastMap<String, IpAddr>,
    /// Who may connect to the workloads of this node.
    pub authz: Arc<crate::authz::Authz>,
}

impl Snapshot {
    pub fn frontend(&self, addr: SocketAddr) -> Option<&Arc<Frontend>> {
        self.frontends.get(&addr)
    }

    /// Where an inbound HBONE CONNECT to `authority` may go on node `node`, for a client that
    /// asked for the identity `local`: a mesh pod of this node with that identity, never a
    /// node's own address; or why not.
    pub fn tunnel_target(
        &self,
        authority: Option<&str>,
        node: &str,
        local: &crate::identity::Identity,
    ) -> Result<(SocketAddr, &Workload), TunnelRefusal> {
        let target: SocketAddr = authority.and_then(|a| a.parse().ok()).ok_or(TunnelRefusal::BadTarget)?;
        // A node's own addresses (its agent, kubelet, anything on the host's network) are never
        // a tunnel's end, whatever a pod object claims.
        if self.nodes.values().any(|ip| *ip == target.ip()) {
            return Err(TunnelRefusal::NodeAddress);
        }
        let workload = self.workloads.get(&target.ip()).ok_or(TunnelRefusal::NotAWorkload)?;
        if workload.node.as_deref() != Some(node) || *workload.identity() != *local {
            return Err(TunnelRefusal::NotHere);
        }
        Ok((target, workload))
    }
}

/// Why an inbound tunnel is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelRefusal {
    /// The CONNECT's authority is no `ip:port`.
    BadTarget,
    /// One of the nodes' own addresses.
    NodeAddress,
    /// No mesh pod has the address.
    NotAWorkload,
    /// A pod of another node, or of another identity than the one the client asked for.
    NotHere,
}

impl TunnelRefusal {
    /// The metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Self::BadTarget => "bad_target",
            Self::NodeAddress => "node_address",
            Self::NotAWorkload => "not_a_workload",
            Self::NotHere => "not_here",
        }
    }

    /// The CONNECT's answer.
    pub fn status(self) -> http::StatusCode {
        match self {
            Self::BadTarget => http::StatusCode::BAD_REQUEST,
            Self::NodeAddress | Self::NotHere => http::StatusCode::FORBIDDEN,
            Self::NotAWorkload => http::StatusCode::NOT_FOUND,
        }
    }
}

/// A namespace/name pair. The names are shared: a pod's reference in its workload, its
/// endpoints and the agent's store is one copy of each string, however many hold it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ObjectRef {
    pub fn new(namespace: impl AsRef<str>, name: impl AsRef<str>) -> Self {
        Self { namespace: namespace.as_ref().into(), name: name.as_ref().into() }
    }

    /// A reference holding names already shared elsewhere.
    pub fn shared(namespace: Arc<str>, name: Arc<str>) -> Self {
        Self { namespace, name }
    }
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A pod the mesh knows about. A cluster has hundreds of thousands, and every node holds them
/// all: what pods of one service account share is one [`Principal`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Shared with the pod's endpoints.
    pub pod: Arc<ObjectRef>,
    pub node: Option<Arc<str>>,
    pub principal: Arc<Principal>,
    /// The pod's service account and labels (which authorization policies select by), shared
    /// with the store's record of the pod.
    pub class: Arc<crate::authz::Class>,
}

/// Who the pods of one service account are.
#[derive(Debug, PartialEq, Eq)]
pub struct Principal {
    /// Parsed once, when the snapshot is made: the data path reads it per request.
    pub identity: crate::identity::Identity,
    /// The identity as a SPIFFE URI, made once and shared by every endpoint of its pods.
    pub uri: Arc<str>,
}

impl Workload {
    pub fn identity(&self) -> &crate::identity::Identity {
        &self.principal.identity
    }

    pub fn uri(&self) -> &Arc<str> {
        &self.principal.uri
    }

    /// `namespace/serviceaccount`, as metrics name a source workload.
    pub fn label(&self) -> String {
        format!("{}/{}", self.pod.namespace, self.identity().service_account)
    }
}

/// What a Service port speaks, from its `appProtocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppProtocol {
    /// HTTP/1.1 (or HTTP/2 with prior knowledge, detected per connection).
    Http,
    /// HTTP/2 over cleartext (`kubernetes.io/h2c`), which gRPC uses.
    H2c,
    /// Anything else: carried as bytes.
    Opaque,
}

/// One port of a Service's ClusterIP.
#[derive(Debug)]
pub struct Frontend {
    pub service: ObjectRef,
    pub port: u16,
    pub port_name: Option<Arc<str>>,
    pub protocol: AppProtocol,
    /// Where traffic goes when no route applies: the Service's own endpoints for this port.
    pub default_backend: Arc<Backend>,
    /// Routes in the Service's own namespace: they apply to clients of every namespace...
    pub producer: Option<Arc<RouteTable>>,
    /// ...except clients in a namespace with consumer routes for this Service, for whom those
    /// replace the producer routes.
    pub consumers: BTreeMap<String, Arc<RouteTable>>,
}

impl Frontend {
    /// The routes that apply to a client in `client_namespace`, or `None` when no route is
    /// attached for it (traffic flows as without a mesh).
    pub fn routes_for(&self, client_namespace: Option<&str>) -> Option<&RouteTable> {
        client_namespace.and_then(|ns| self.consumers.get(ns)).or(self.producer.as_ref()).map(Arc::as_ref)
    }

    /// Whether requests to this frontend must be parsed as HTTP.
    pub fn is_http(&self) -> bool {
        self.protocol != AppProtocol::Opaque || self.producer.is_some() || !self.consumers.is_empty()
    }
}

/// A Service port with the endpoints behind it.
#[derive(Debug)]
pub struct Backend {
    pub service: ObjectRef,
    /// The Service port the backendRef named.
    pub port: u16,
    pub protocol: AppProtocol,
    pub endpoints: Vec<Endpoint>,
}

/// One ready endpoint of a backend. Every pod behind a Service is one, on every node: 40 bytes,
/// its pod, node and identity those of the workload at its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Pod IP; the target port is `port`.
    pub ip: IpAddr,
    pub port: u16,
    /// The workload at the address, when the mesh knows one.
    pub workload: Option<Arc<Workload>>,
    /// What the EndpointSlice says of the endpoint where that differs from the workload (or
    /// there is none): its pod and node.
    pub declared: Option<Arc<Declared>>,
}

/// An endpoint's pod and node as its EndpointSlice names them.
#[derive(Debug, PartialEq, Eq)]
pub struct Declared {
    pub pod: Option<Arc<ObjectRef>>,
    pub node: Option<Arc<str>>,
}

impl Endpoint {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }

    pub fn pod(&self) -> Option<&Arc<ObjectRef>> {
        match &self.declared {
            Some(d) => d.pod.as_ref(),
            None => self.workload.as_ref().map(|w| &w.pod),
        }
    }

    pub fn node(&self) -> Option<&Arc<str>> {
        match &self.declared {
            Some(d) => d.node.as_ref(),
            None => self.workload.as_ref().and_then(|w| w.node.as_ref()),
        }
    }

    /// The SPIFFE identity the endpoint's proxy must present: its workload's.
    pub fn identity(&self) -> Option<&Arc<str>> {
        self.workload.as_ref().map(|w| w.uri())
    }
}

/// The routes of one route group (producer, or one namespace's consumers) for one frontend.
/// Only one kind applies per Service port: GRPCRoute wins over HTTPRoute. Built only by
/// [`RouteTable::http`] and [`RouteTable::grpc`] ([`crate::route`]), which sort by precedence.
#[derive(Debug)]
pub enum RouteTable {
    Http(Ranked<HttpRuleMatch>),
    Grpc(Ranked<GrpcRuleMatch>),
}

/// Rule matches in precedence order: the first entry that matches wins. Only the route
/// module's constructors make one, so a table can never arrive unsorted.
#[derive(Debug)]
pub struct Ranked<R>(pub(crate) Vec<R>);

impl<'a, R> IntoIterator for &'a Ranked<R> {
    type Item = &'a R;
    type IntoIter = std::slice::Iter<'a, R>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl<R> std::ops::Deref for Ranked<R> {
    type Target = [R];

    fn deref(&self) -> &[R] {
        &self.0
    }
}

/// Which route a rule came from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteId {
    pub kind: RouteKind,
    pub route: ObjectRef,
    pub rule: usize,
    pub rule_name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteKind {
    Http,
    Grpc,
}

impl std::fmt::Display for RouteKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RouteKind::Http => "HTTPRoute",
            RouteKind::Grpc => "GRPCRoute",
        })
    }
}

/// One `matches[]` entry of an HTTPRoute rule, with the rule's action.
#[derive(Debug)]
pub struct HttpRuleMatch {
    pub id: Arc<RouteId>,
    pub matcher: HttpMatch,
    pub action: Arc<RuleAction>,
}

/// One `matches[]` entry of a GRPCRoute rule (or the catch-all of a rule without matches).
#[derive(Debug)]
pub struct GrpcRuleMatch {
    pub id: Arc<RouteId>,
    pub matcher: GrpcMatch,
    pub action: Arc<RuleAction>,
}

/// Conditions ANDed together.
#[derive(Debug, Clone)]
pub struct HttpMatch {
    pub path: PathMatch,
    pub method: Option<Method>,
    pub headers: Vec<HeaderMatch>,
    pub query: Vec<QueryMatch>,
}

#[derive(Debug, Clone)]
pub enum PathMatch {
    Exact(String),
    /// Whole path segments: `/v2` matches `/v2`, `/v2/`, `/v2/x`, not `/v2x`.
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug, Clone)]
pub enum ValueMatch {
    Exact(String),
    /// Anchored: the whole value must match.
    Regex(Regex),
}

#[derive(Debug, Clone)]
pub struct HeaderMatch {
    pub name: HeaderName,
    pub value: ValueMatch,
}

#[derive(Debug, Clone)]
pub struct QueryMatch {
    pub name: String,
    pub value: ValueMatch,
}

/// gRPC method match on `/<service>/<method>`, plus metadata.
#[derive(Debug, Clone, Default)]
pub struct GrpcMatch {
    pub service: Option<ValueMatch>,
    pub method: Option<ValueMatch>,
    pub headers: Vec<HeaderMatch>,
}

/// What a rule does with a matched request.
#[derive(Debug, Default)]
pub struct RuleAction {
    pub filters: Vec<Filter>,
    pub backends: Vec<WeightedBackend>,
    pub timeouts: Timeouts,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timeouts {
    /// From the proxy receiving the request to sending the whole response.
    pub request: Option<Duration>,
    /// One attempt to the backend.
    pub backend_request: Option<Duration>,
}

#[derive(Debug)]
pub struct WeightedBackend {
    pub weight: u32,
    pub target: BackendTarget,
    /// backendRef-level filters, applied after the rule's.
    pub filters: Vec<Filter>,
}

#[derive(Debug, Clone)]
pub enum BackendTarget {
    Service(Arc<Backend>),
    /// A backendRef that does not resolve: its share of requests gets a 500.
    Invalid {
        reason: String,
    },
}

#[derive(Debug, Clone)]
pub enum Filter {
    /// Shared, so that a request's plan holds the rule's modifier rather than a copy of it.
    RequestHeaders(Arc<HeaderModifier>),
    ResponseHeaders(Arc<HeaderModifier>),
    Redirect(Redirect),
    Rewrite(Rewrite),
    Mirror(Mirror),
}

#[derive(Debug, Clone, Default)]
pub struct HeaderModifier {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

#[derive(Debug, Clone)]
pub enum PathModifier {
    Full(String),
    /// Replaces the part of the path matched by the rule's PathPrefix.
    Prefix(String),
}

#[derive(Debug, Clone)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    pub status: u16,
}

#[derive(Debug, Clone, Default)]
pub struct Rewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

#[derive(Debug, Clone)]
pub struct Mirror {
    pub target: BackendTarget,
    /// Fraction of requests mirrored: numerator / denominator.
    pub numerator: u32,
    pub denominator: u32,
}

#[cfg(test)]
mod tests {
    use super::SharedMap;

    /// A clone shares every shard until one is written; a write copies that shard only, and
    /// neither map sees the other's writes.
    #[test]
    fn a_shared_map_copies_only_the_shard_it_writes() {
        let mut a: SharedMap<u32, u32> = (0..10_000).map(|i| (i, i)).collect();
        assert_eq!(a.len(), 10_000);
        let mut b = a.clone();
        b.insert(7, 70_000);
        assert_eq!(b.remove(&8), Some(8));
        assert_eq!(b.remove(&8), None, "removed once");
        b.insert(20_000, 1);
        assert_eq!((a.get(&7), a.get(&8), a.get(&20_000)), (Some(&7), Some(&8), None));
        assert_eq!((b.get(&7), b.get(&8), b[&20_000]), (Some(&70_000), None, 1));
        assert_eq!((a.len(), b.len()), (10_000, 10_000));
        let shared = a.shards.iter().zip(&b.shards).filter(|(x, y)| std::sync::Arc::ptr_eq(x, y)).count();
        assert!(shared >= super::SHARDS - 3, "at most the three shards written were copied: {shared} shared");
        a.insert(1, 2);
        assert_eq!(b.get(&1), Some(&1));
        assert_eq!(a.iter().count(), 10_000);
        assert_eq!(b.values().copied().filter(|v| *v == 70_000).count(), 1);
    }
}
