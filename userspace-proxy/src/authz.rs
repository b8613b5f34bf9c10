//! Authorization at the destination: which peers may open connections to a workload of this
//! node, by the policies the agent compiled from `AuthorizationPolicy` objects (Istio's
//! `security.istio.io/v1`, its L4 form).
//!
//! Semantics, as ambient meshes evaluate them at the destination: a policy applies to a
//! workload when it is in the mesh's root namespace with no selector (every workload), in the
//! workload's namespace with no selector, or has a selector whose labels the workload carries
//! (from its own namespace, or from the root namespace for any namespace). Then: any matching
//! DENY denies; with no ALLOW policy the connection is allowed; otherwise one ALLOW must match;
//! an ALLOW with no rules matches nothing (so it denies everything else). A policy the proxy
//! cannot enforce exactly (L7 fields) denies every connection to its targets, never silently
//! less. An attribute the proxy does not know for a connection (the source address of a
//! pooled tunnel) makes a rule that reads it match for DENY and not for ALLOW.
//!
//! Before any policy, a workload's peer authentication ([`PeerAuthentication`]): `strict`
//! refuses every peer without a verified identity (plaintext from outside the mesh);
//! `permissive` lets it on to the policies, unauthenticated.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use crate::identity::Identity;

/// What the pods of one controller have alike: the service account they run as (their
/// identity) and their labels (which policies select by). One shared copy per distinct pair, and
/// the labels one allocation: every node holds a pod's class, so its cost is per controller, a
/// pointer per pod.
#[derive(Debug, Default, Clone, PartialEq, Eq, Hash)]
pub struct Class {
    pub service_account: Option<Arc<str>>,
    pub labels: LabelSet,
}

/// Labels, sorted by key, as one string: `key\0value\0` for each (neither may hold a NUL).
#[derive(Debug, Default, Clone, PartialEq, Eq, Hash)]
pub struct LabelSet(Box<str>);

impl LabelSet {
    /// From pairs sorted by key (a `BTreeMap`'s order); a pair holding a NUL is left out.
    pub fn new<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut text = String::new();
        for (k, v) in pairs.into_iter().filter(|(k, v)| !k.contains('\0') && !v.contains('\0')) {
            text.push_str(k);
            text.push('\0');
            text.push_str(v);
            text.push('\0');
        }
        Self(text.into_boxed_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        let mut parts = self.0.split('\0');
        std::iter::from_fn(move || Some((parts.next().filter(|k| !k.is_empty())?, parts.next()?)))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }
}

/// The label that sets a workload's peer authentication: on a namespace for its pods, on a pod
/// to override its namespace's.
pub const PEER_AUTHENTICATION_LABEL: &str = "gammaray.dev/peer-authentication";

/// The name denials for peer authentication are counted and logged under.
pub const STRICT_POLICY: &str = "peer-authentication/strict";

/// Whether a workload accepts peers without a verified mesh identity.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerAuthentication {
    /// Plaintext from outside the mesh is let on to the policies, unauthenticated.
    #[default]
    Permissive,
    /// Only peers with a verified identity: mesh traffic.
    Strict,
}

impl PeerAuthentication {
    /// A label's value. One that is neither `strict` nor `permissive` reads as strict (never
    /// weaker than meant) and is an error for the caller to report.
    pub fn parse(value: &str) -> Result<Self, Self> {
        match value {
            "strict" => Ok(Self::Strict),
            "permissive" => Ok(Self::Permissive),
            _ => Err(Self::Strict),
        }
    }

    /// The mode a label says (an unknown value: strict), or `otherwise` with no label: a
    /// pod's own label over its namespace's, a namespace's over the default.
    pub fn of_label(value: Option<&str>, otherwise: Self) -> Self {
        value.map_or(otherwise, |value| Self::parse(value).unwrap_or_else(|strict| strict))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Strict => "strict",
            Self::Permissive => "permissive",
        }
    }
}

/// The compiled policies of the mesh.
#[derive(Debug, Default)]
pub struct Authz {
    /// The mesh's root namespace: its policies without a selector apply to every workload.
    pub root: Arc<str>,
    policies: Vec<Arc<Policy>>,
    /// Indexes into `policies` by namespace.
    by_namespace: HashMap<Arc<str>, Vec<usize>>,
    /// Namespaces whose workloads are `strict` unless their own label says otherwise.
    strict_namespaces: HashSet<Arc<str>>,
}

/// What a policy does when one of its rules matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

/// One compiled `AuthorizationPolicy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// `namespace/name`, as metrics and logs name it.
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    /// `spec.selector.matchLabels`; `None` for every workload of the namespace (of the mesh, in
    /// the root namespace).
    pub selector: Option<Vec<(String, String)>>,
    pub action: Action,
    pub rules: Vec<Rule>,
    /// Why the proxy cannot enforce the policy as written (L7 fields): it then denies every
    /// connection to its targets.
    pub unenforceable: Option<String>,
}

/// `rules[]`: every part given must match; an empty list matches anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    /// `from[].source`: one must match.
    pub from: Vec<Source>,
    /// `to[].operation`: one must match.
    pub to: Vec<Operation>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Source {
    pub principals: Vec<Pattern>,
    pub not_principals: Vec<Pattern>,
    /// `namespace/name` of service accounts, exact.
    pub service_accounts: Vec<(String, String)>,
    pub not_service_accounts: Vec<(String, String)>,
    pub namespaces: Vec<Pattern>,
    pub not_namespaces: Vec<Pattern>,
    pub ip_blocks: Vec<IpBlock>,
    pub not_ip_blocks: Vec<IpBlock>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Operation {
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
}

/// A string match as Istio writes them: exact, `prefix*`, `*suffix`, or `*` (anything present).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Any,
}

impl Pattern {
    pub fn parse(s: &str) -> Self {
        if s == "*" {
            Self::Any
        } else if let Some(prefix) = s.strip_suffix('*') {
            Self::Prefix(prefix.to_owned())
        } else if let Some(suffix) = s.strip_prefix('*') {
            Self::Suffix(suffix.to_owned())
        } else {
            Self::Exact(s.to_owned())
        }
    }

    pub fn matches(&self, s: &str) -> bool {
        match self {
            Self::Exact(e) => s == e,
            Self::Prefix(p) => s.starts_with(p.as_str()),
            Self::Suffix(x) => s.ends_with(x.as_str()),
            Self::Any => true,
        }
    }
}

/// An address range: `10.0.0.0/8`, or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpBlock {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpBlock {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| format!("{s:?} is not an address or a CIDR block"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: bad prefix length"))?,
            None => max,
        };
        Ok(Self { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Who opens a connection, as far as the destination's node knows.
#[derive(Debug, Clone, Copy)]
pub struct Peer<'a> {
    /// The verified identity: the client certificate of an HBONE tunnel, or the source pod's
    /// for a connection from this node. `None`: unauthenticated.
    pub identity: Option<&'a Identity>,
    /// The source address, when known.
    pub ip: Option<IpAddr>,
}

/// The workload a connection is for.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub namespace: &'a str,
    pub labels: &'a LabelSet,
    pub port: u16,
}

/// The outcome of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny {
        /// The policy that decided (`namespace/name`).
        policy: Arc<str>,
        reason: DenyReason,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// A DENY policy's rule matched.
    DenyMatched,
    /// ALLOW policies apply and none matched.
    NoAllowMatched,
    /// The policy has fields the proxy does not enforce.
    Unenforceable,
    /// The workload's peer authentication is `strict` and the peer has no verified identity.
    Unauthenticated,
}

impl DenyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DenyMatched => "deny_policy",
            Self::NoAllowMatched => "no_allow_policy_matched",
            Self::Unenforceable => "unenforceable_policy",
            Self::Unauthenticated => "strict_unauthenticated",
        }
    }
}

impl Authz {
    /// Checks a connection from `client` (a pod of this node, or anything else on it) to the
    /// workload `dst` of this node on `port`: the source's identity is its workload's.
    pub fn check_local(
        &self,
        snapshot_workloads: &crate::snapshot::AddrMap<Arc<crate::snapshot::Workload>>,
        client: IpAddr,
        dst: &crate::snapshot::Workload,
        port: u16,
    ) -> Decision {
        let src = snapshot_workloads.get(&client);
        let peer = Peer { identity: src.map(|w| w.identity()), ip: Some(client) };
        self.check(&peer, &Target { namespace: &dst.pod.namespace, labels: &dst.class.labels, port })
    }

    /// Counts and logs a denial.
    pub fn record(
        stats: &crate::stats::OutboundStats,
        decision: &Decision,
        path: &'static str,
        src: &dyn std::fmt::Display,
        dst: &dyn std::fmt::Display,
        target: std::net::SocketAddr,
    ) {
        if let Decision::Deny { policy, reason } = decision {
            let labels =
                crate::stats::DeniedLabels { policy: policy.to_string(), reason: reason.as_str(), path };
            stats.authz_denied.get_or_create(&labels).inc();
            tracing::warn!(%policy, reason = reason.as_str(), src_identity = %src, dst_identity = %dst, %target, path, "denied by authorization policy");
        }
    }
}

/// The policies in force, changing only when they do (not with every snapshot): what open
/// connections watch to learn that they may be no longer allowed.
pub type Policies = tokio::sync::watch::Receiver<Arc<Authz>>;

/// Follows the snapshots and sends their policies when they change. Runs until the snapshots
/// end.
pub(crate) fn follow(
    mut snapshots: tokio::sync::watch::Receiver<Arc<crate::snapshot::Snapshot>>,
) -> (Policies, impl std::future::Future<Output = ()>) {
    let (tx, rx) = tokio::sync::watch::channel(snapshots.borrow().authz.clone());
    let task = async move {
        while snapshots.changed().await.is_ok() {
            let authz = snapshots.borrow_and_update().authz.clone();
            tx.send_if_modified(|current| {
                let changed = !Arc::ptr_eq(current, &authz);
                if changed {
                    *current = authz;
                }
                changed
            });
        }
    };
    (rx, task)
}

/// Resolves with the denial once a change of the policies denies what `check` asks; never
/// while they allow it.
pub(crate) async fn revoked(mut policies: Policies, check: impl Fn(&Authz) -> Decision) -> Decision {
    loop {
        if policies.changed().await.is_err() {
            return std::future::pending().await;
        }
        let decision = check(&policies.borrow_and_update());
        if decision != Decision::Allow {
            return decision;
        }
    }
}

/// Whether the rule parts that read an attribute the proxy does not know match: yes for DENY
/// (never weaker), no for ALLOW.
fn unknown(action: Action) -> bool {
    action == Action::Deny
}

/// A peer as rules read it: its principal written out once per check, not once per rule.
struct Seen<'a> {
    principal: Option<String>,
    namespace: Option<&'a str>,
    service_account: Option<&'a str>,
    ip: Option<IpAddr>,
}

impl<'a> Seen<'a> {
    fn of(peer: &Peer<'a>) -> Self {
        Self {
            principal: peer.identity.map(principal_of),
            namespace: peer.identity.map(|i| &*i.namespace),
            service_account: peer.identity.map(|i| &*i.service_account),
            ip: peer.ip,
        }
    }
}

impl Source {
    fn matches(&self, peer: &Seen<'_>, action: Action) -> bool {
        let any = |patterns: &[Pattern], value: Option<&str>| {
            value.is_some_and(|v| patterns.iter().any(|p| p.matches(v)))
        };
        let principal = peer.principal.as_deref();
        if !self.principals.is_empty() && !any(&self.principals, principal) {
            return false;
        }
        if any(&self.not_principals, principal) {
            return false;
        }
        let account = |accounts: &[(String, String)]| {
            peer.namespace
                .zip(peer.service_account)
                .is_some_and(|(ns, sa)| accounts.iter().any(|(n, a)| n == ns && a == sa))
        };
        if !self.service_accounts.is_empty() && !account(&self.service_accounts) {
            return false;
        }
        if account(&self.not_service_accounts) {
            return false;
        }
        if !self.namespaces.is_empty() && !any(&self.namespaces, peer.namespace) {
            return false;
        }
        if any(&self.not_namespaces, peer.namespace) {
            return false;
        }
        let blocks = |blocks: &[IpBlock]| peer.ip.map(|ip| blocks.iter().any(|b| b.contains(ip)));
        if !self.ip_blocks.is_empty() && !blocks(&self.ip_blocks).unwrap_or(unknown(action)) {
            return false;
        }
        if !self.not_ip_blocks.is_empty() && blocks(&self.not_ip_blocks).unwrap_or(!unknown(action)) {
            return false;
        }
        true
    }
}

/// A principal as Istio writes it: the SPIFFE URI without its scheme.
fn principal_of(identity: &Identity) -> String {
    format!("{}/ns/{}/sa/{}", identity.trust_domain, identity.namespace, identity.service_account)
}

impl Operation {
    fn matches(&self, target: &Target<'_>) -> bool {
        (self.ports.is_empty() || self.ports.contains(&target.port)) && !self.not_ports.contains(&target.port)
    }
}

impl Rule {
    fn matches(&self, peer: &Seen<'_>, target: &Target<'_>, action: Action) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(peer, action)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(target)))
    }
}

impl Policy {
    fn selects(&self, target: &Target<'_>) -> bool {
        self.selector
            .as_ref()
            .is_none_or(|wanted| wanted.iter().all(|(k, v)| target.labels.get(k) == Some(v.as_str())))
    }

    fn matches(&self, peer: &Seen<'_>, target: &Target<'_>) -> bool {
        self.rules.iter().any(|r| r.matches(peer, target, self.action))
    }
}

impl Authz {
    pub fn new(root: impl Into<Arc<str>>, policies: Vec<Policy>) -> Self {
        let mut by_namespace: HashMap<Arc<str>, Vec<usize>> = HashMap::new();
        let policies: Vec<Arc<Policy>> = policies.into_iter().map(Arc::new).collect();
        for (i, p) in policies.iter().enumerate() {
            by_namespace.entry(p.namespace.clone()).or_default().push(i);
        }
        Self { root: root.into(), policies, by_namespace, strict_namespaces: HashSet::new() }
    }

    /// The same policies, with the workloads of `namespaces` `strict` by default.
    pub fn with_strict_namespaces(mut self, namespaces: impl IntoIterator<Item = Arc<str>>) -> Self {
        self.strict_namespaces = namespaces.into_iter().collect();
        self
    }

    /// The namespaces whose workloads are `strict` by default, sorted.
    pub fn strict_namespaces(&self) -> Vec<&str> {
        let mut out: Vec<&str> = self.strict_namespaces.iter().map(|n| &**n).collect();
        out.sort_unstable();
        out
    }

    /// A workload's peer authentication: its own label, else its namespace's.
    pub fn peer_authentication(&self, target: &Target<'_>) -> PeerAuthentication {
        let namespace = if self.strict_namespaces.contains(target.namespace) {
            PeerAuthentication::Strict
        } else {
            PeerAuthentication::Permissive
        };
        PeerAuthentication::of_label(target.labels.get(PEER_AUTHENTICATION_LABEL), namespace)
    }

    pub fn policies(&self) -> &[Arc<Policy>] {
        &self.policies
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The policies that apply to `target`, in the root namespace's then the target
    /// namespace's order.
    pub fn applicable<'a>(&'a self, target: &'a Target<'_>) -> impl Iterator<Item = &'a Arc<Policy>> + 'a {
        let root = self.by_namespace.get(&self.root).into_iter().flatten();
        let own = (*self.root != *target.namespace)
            .then(|| self.by_namespace.get(target.namespace))
            .flatten()
            .into_iter()
            .flatten();
        root.chain(own).map(|i| &self.policies[*i]).filter(|p| p.selects(target))
    }

    /// Whether `peer` may open a connection to `target`.
    pub fn check(&self, peer: &Peer<'_>, target: &Target<'_>) -> Decision {
        if peer.identity.is_none() && self.peer_authentication(target) == PeerAuthentication::Strict {
            return Decision::Deny { policy: STRICT_POLICY.into(), reason: DenyReason::Unauthenticated };
        }
        if self.policies.is_empty() {
            return Decision::Allow;
        }
        let peer = &Seen::of(peer);
        let mut first_allow: Option<&Arc<Policy>> = None;
        let mut allowed = false;
        for policy in self.applicable(target) {
            if policy.unenforceable.is_some() {
                return Decision::Deny { policy: policy.name.clone(), reason: DenyReason::Unenforceable };
            }
            match policy.action {
                Action::Deny if policy.matches(peer, target) => {
                    return Decision::Deny { policy: policy.name.clone(), reason: DenyReason::DenyMatched };
                }
                Action::Deny => {}
                Action::Allow => {
                    first_allow.get_or_insert(policy);
                    if !allowed && policy.matches(peer, target) {
                        allowed = true;
                    }
                }
            }
        }
        match first_allow {
            Some(policy) if !allowed => {
                Decision::Deny { policy: policy.name.clone(), reason: DenyReason::NoAllowMatched }
            }
            _ => Decision::Allow,
        }
    }
}

#[cfg(test)]
mod tests;
