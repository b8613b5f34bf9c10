//! The typed stores every configuration source fills (Kubernetes watchers, manifest files,
//! test fixtures) and the one translation reads. Objects are the upstream types.

use std::sync::Arc;

use gammaray_proxy::snapshot::ObjectRef;
use gateway_api::{
    grpcroutes::GrpcRoute as GRPCRoute, httproutes::HttpRoute as HTTPRoute, referencegrants::ReferenceGrant,
};
use imbl::OrdMap;
use k8s_openapi::api::core::v1::{Namespace, Node};
use serde::de::DeserializeOwned;
use smallvec::SmallVec;

/// `namespace/name` key; cluster-scoped objects use an empty namespace. The names are shared:
/// namespaces are one copy each ([`Names`]), and translation holds the same strings in the
/// references it derives ([`gammaray_proxy::snapshot::ObjectRef::shared`]).
pub type Key = (Arc<str>, Arc<str>);

/// The key of `namespace/name`, with names not already shared.
pub fn key(namespace: &str, name: &str) -> Key {
    (namespace.into(), name.into())
}

/// A pod's namespace and name: one allocation, shared by the store's key, the pod's workload
/// and every endpoint that names it.
pub type PodKey = Arc<ObjectRef>;

impl equivalent::Equivalent<PodKey> for KeyRef<'_> {
    fn equivalent(&self, key: &PodKey) -> bool {
        *self == KeyRef(&key.namespace, &key.name)
    }
}

impl equivalent::Comparable<PodKey> for KeyRef<'_> {
    fn compare(&self, key: &PodKey) -> std::cmp::Ordering {
        self.cmp(&KeyRef(&key.namespace, &key.name))
    }
}

/// The names of one Service's EndpointSlices, in order: most Services have one, held inline.
type SliceNames = SmallVec<[Arc<str>; 1]>;

/// `namespace/name` to look a [`Key`] up with, without making one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyRef<'a>(pub &'a str, pub &'a str);

impl equivalent::Equivalent<Key> for KeyRef<'_> {
    fn equivalent(&self, key: &Key) -> bool {
        *self == KeyRef(&key.0, &key.1)
    }
}

impl equivalent::Comparable<Key> for KeyRef<'_> {
    fn compare(&self, key: &Key) -> std::cmp::Ordering {
        self.cmp(&KeyRef(&key.0, &key.1))
    }
}

/// Objects are shared (`Arc`) and the maps are persistent ([`OrdMap`]): publishing the store to
/// its readers is an O(1) clone that later changes copy only the paths they touch, so the agent
/// holds one copy of the cluster's objects, and two versions of the store can be compared in
/// time proportional to what differs between them ([`OrdMap::diff`]), which is how translation
/// finds what a change touched.
#[derive(Debug, Default, Clone)]
pub struct Store {
    pub namespaces: OrdMap<String, Arc<Namespace>>,
    pub nodes: OrdMap<String, Arc<Node>>,
    /// What the mesh reads of each Service ([`ServiceInfo`]).
    pub services: OrdMap<Key, Arc<ServiceInfo>>,
    /// Written through [`Store::apply_value`], [`Store::remove`] and [`Store::clear_kind`] only,
    /// which keep [`Store::slices_of`]'s index.
    endpoint_slices: OrdMap<Key, Arc<SliceInfo>>,
    /// The EndpointSlices of each Service (`kubernetes.io/service-name`): (namespace, Service) →
    /// slice names. Translation looks a Service's endpoints up here instead of scanning every
    /// slice of the cluster for each Service port.
    slices_by_service: OrdMap<Key, SliceNames>,
    /// What the mesh reads of each Pod ([`PodInfo`]), not the whole object.
    pub pods: OrdMap<PodKey, Arc<PodInfo>>,
    pub http_routes: OrdMap<Key, Arc<HTTPRoute>>,
    pub grpc_routes: OrdMap<Key, Arc<GRPCRoute>>,
    pub reference_grants: OrdMap<Key, Arc<ReferenceGrant>>,
    /// `AuthorizationPolicy` objects as written: they are read when compiled (by the
    /// publisher), so one that does not decode is still there to fail closed.
    pub authorization_policies: OrdMap<Key, Arc<serde_json::Value>>,
    /// The names pods and endpoints repeat (nodes, service accounts, phases), one copy each;
    /// shared by every clone of the store.
    names: Arc<std::sync::Mutex<Names>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("document {index}: not valid YAML: {source}")]
    Yaml { index: usize, source: serde_yaml::Error },
    #[error("document {index} ({kind} {name}): {source}")]
    Decode { index: usize, kind: String, name: String, source: serde_json::Error },
    #[error("document {index}: {reason}")]
    Invalid { index: usize, reason: String },
}

/// What applying a multi-document text did.
#[derive(Debug, Default)]
pub struct Applied {
    pub objects: usize,
    /// Documents of kinds the mesh does not read (Deployments, ConfigMaps, …): `kind name`.
    pub ignored: Vec<String>,
    /// Documents that could not be read; the rest were applied.
    pub errors: Vec<StoreError>,
}

impl Store {
    /// Applies every document of a multi-document YAML text. A document that cannot be read
    /// is reported in [`Applied::errors`] and skipped; the others still apply.
    pub fn apply_yaml(&mut self, text: &str) -> Applied {
        let mut applied = Applied::default();
        // Documents are split at their `---` markers first: after a syntax error a YAML stream
        // cannot be resumed, but the next marker still starts a document of its own.
        for (index, doc) in split_documents(text).into_iter().enumerate() {
            let value: serde_json::Value = match serde_yaml::from_str(doc) {
                Ok(v) => v,
                Err(source) => {
                    applied.errors.push(StoreError::Yaml { index, source });
                    continue;
                }
            };
            if value.is_null() {
                continue;
            }
            match self.apply_value(index, value) {
                Ok(Some(ignored)) => applied.ignored.push(ignored),
                Ok(None) => applied.objects += 1,
                Err(err) => applied.errors.push(err),
            }
        }
        applied
    }

    /// Applies one object given as JSON. Returns `Some("kind name")` for kinds the mesh does
    /// not read.
    pub fn apply_value(
        &mut self,
        index: usize,
        value: serde_json::Value,
    ) -> Result<Option<String>, StoreError> {
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("").to_owned();
        let api_version = value.get("apiVersion").and_then(|k| k.as_str()).unwrap_or("").to_owned();
        let meta = value.get("metadata");
        let name = meta.and_then(|m| m.get("name")).and_then(|n| n.as_str()).unwrap_or("").to_owned();
        let namespace =
            meta.and_then(|m| m.get("namespace")).and_then(|n| n.as_str()).unwrap_or("default").to_owned();
        let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
        let read = matches!(
            (group, kind.as_str()),
            ("", "Namespace" | "Node" | "Service" | "Pod")
                | ("discovery.k8s.io", "EndpointSlice")
                | ("gateway.networking.k8s.io", "HTTPRoute" | "GRPCRoute" | "ReferenceGrant")
                | ("security.istio.io", "AuthorizationPolicy")
        );
        if kind.is_empty() {
            return Err(StoreError::Invalid { index, reason: "object without kind".into() });
        }
        if !read {
            return Ok(Some(format!("{kind} {namespace}/{name}")));
        }
        if name.is_empty() {
            return Err(StoreError::Invalid { index, reason: format!("{kind} without metadata.name") });
        }
        let key: Key = (self.names.lock().expect("names lock").get(&namespace), name.as_str().into());
        fn decode<T: DeserializeOwned>(
            index: usize,
            kind: &str,
            name: &str,
            v: serde_json::Value,
        ) -> Result<Arc<T>, StoreError> {
            serde_json::from_value(v).map(Arc::new).map_err(|source| StoreError::Decode {
                index,
                kind: kind.to_owned(),
                name: name.to_owned(),
                source,
            })
        }
        match (group, kind.as_str()) {
            ("", "Namespace") => {
                self.namespaces.insert(name.clone(), decode(index, &kind, &name, value)?);
            }
            ("", "Node") => {
                self.nodes.insert(name.clone(), decode(index, &kind, &name, value)?);
            }
            ("", "Service") => {
                let service =
                    ServiceInfo::decode(value, &mut self.names.lock().expect("names lock")).map_err(
                        |source| StoreError::Decode { index, kind: kind.clone(), name: name.clone(), source },
                    )?;
                self.services.insert(key, Arc::new(service));
            }
            ("", "Pod") => {
                let pod = PodInfo::decode(value, &mut self.names.lock().expect("names lock")).map_err(
                    |source| StoreError::Decode { index, kind: kind.clone(), name: name.clone(), source },
                )?;
                let key = match self.pods.get_key_value(&KeyRef(&key.0, &key.1)) {
                    Some((held, _)) => held.clone(),
                    None => Arc::new(ObjectRef::shared(key.0, key.1)),
                };
                self.pods.insert(key, Arc::new(pod));
            }
            ("discovery.k8s.io", "EndpointSlice") => {
                let slice =
                    SliceInfo::decode(value, &key.0, &mut self.names.lock().expect("names lock"), self)
                        .map_err(|source| StoreError::Decode {
                            index,
                            kind: kind.clone(),
                            name: name.clone(),
                            source,
                        })?;
                let slice = Arc::new(slice);
                self.remove_slice(KeyRef(&key.0, &key.1));
                if let Some(service) = service_of(&slice) {
                    let names = self.slices_by_service.entry((key.0.clone(), service.into())).or_default();
                    if let Err(at) = names.binary_search(&key.1) {
                        names.insert(at, key.1.clone());
                    }
                }
                self.endpoint_slices.insert(key, slice);
            }
            ("gateway.networking.k8s.io", "HTTPRoute") => {
                self.http_routes.insert(key, decode(index, &kind, &name, value)?);
            }
            ("gateway.networking.k8s.io", "GRPCRoute") => {
                self.grpc_routes.insert(key, decode(index, &kind, &name, value)?);
            }
            ("gateway.networking.k8s.io", "ReferenceGrant") => {
                self.reference_grants.insert(key, decode(index, &kind, &name, value)?);
            }
            ("security.istio.io", "AuthorizationPolicy") => {
                self.authorization_policies.insert(key, Arc::new(value));
            }
            _ => return Ok(Some(format!("{kind} {namespace}/{name}"))),
        }
        Ok(None)
    }
}

impl Store {
    /// Forgets every object of `kind` (a watcher that listed again replaces them all).
    pub fn clear_kind(&mut self, kind: &str) {
        match kind {
            "Namespace" => self.namespaces.clear(),
            "Node" => self.nodes.clear(),
            "Service" => self.services.clear(),
            "Pod" => self.pods.clear(),
            "EndpointSlice" => {
                self.endpoint_slices.clear();
                self.slices_by_service.clear();
            }
            "HTTPRoute" => self.http_routes.clear(),
            "GRPCRoute" => self.grpc_routes.clear(),
            "ReferenceGrant" => self.reference_grants.clear(),
            "AuthorizationPolicy" => self.authorization_policies.clear(),
            _ => {}
        }
    }

    /// Removes one object; cluster-scoped kinds ignore `namespace`. Returns whether it was held.
    pub fn remove(&mut self, kind: &str, namespace: &str, name: &str) -> bool {
        let key = KeyRef(namespace, name);
        match kind {
            "Namespace" => self.namespaces.remove(name).is_some(),
            "Node" => self.nodes.remove(name).is_some(),
            "Service" => self.services.remove(&key).is_some(),
            "Pod" => self.pods.remove(&key).is_some(),
            "EndpointSlice" => self.remove_slice(key),
            "HTTPRoute" => self.http_routes.remove(&key).is_some(),
            "GRPCRoute" => self.grpc_routes.remove(&key).is_some(),
            "ReferenceGrant" => self.reference_grants.remove(&key).is_some(),
            "AuthorizationPolicy" => self.authorization_policies.remove(&key).is_some(),
            _ => false,
        }
    }

    /// The EndpointSlices of the Service `namespace/service`, by their name.
    pub fn slices_of<'a>(
        &'a self,
        namespace: &str,
        service: &str,
    ) -> impl Iterator<Item = (&'a str, &'a Arc<SliceInfo>)> {
        let found = self.slices_by_service.get_key_value(&KeyRef(namespace, service));
        found.into_iter().flat_map(move |((namespace, _), names)| {
            names
                .iter()
                .filter_map(move |name| Some((&**name, self.endpoint_slices.get(&KeyRef(namespace, name))?)))
        })
    }

    /// Every EndpointSlice, by namespace and name.
    pub fn endpoint_slices(&self) -> &OrdMap<Key, Arc<SliceInfo>> {
        &self.endpoint_slices
    }

    /// Removes one EndpointSlice and its place in the index; whether it was held.
    fn remove_slice(&mut self, key: KeyRef<'_>) -> bool {
        let Some(old) = self.endpoint_slices.remove(&key) else { return false };
        if let Some(service) = service_of(&old) {
            let index_key = KeyRef(key.0, service);
            if let Some(names) = self.slices_by_service.get_mut(&index_key) {
                names.retain(|n| **n != *key.1);
                if names.is_empty() {
                    self.slices_by_service.remove(&index_key);
                }
            }
        }
        true
    }
}

/// One shared copy of each name that many objects repeat (namespaces, service accounts, nodes,
/// SPIFFE URIs): an allocation per distinct name, not per pod. Names no workload holds any more
/// are dropped when the table has doubled since it was last swept, so churn cannot grow it
/// without bound.
#[derive(Debug, Default)]
pub struct Names {
    pub(crate) names: std::collections::HashSet<Arc<str>>,
    swept_at: usize,
    classes: std::collections::HashSet<Arc<PodClass>>,
    classes_swept_at: usize,
}

impl Names {
    pub fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(shared) = self.names.get(name) {
            return shared.clone();
        }
        if self.names.len() >= 2 * self.swept_at.max(1024) {
            self.names.retain(|n| Arc::strong_count(n) > 1);
            self.swept_at = self.names.len();
        }
        let shared: Arc<str> = name.into();
        self.names.insert(shared.clone());
        shared
    }

    /// The shared [`PodClass`] of a pod with this service account and these labels.
    pub fn class(
        &mut self,
        service_account: Option<&str>,
        labels: Option<&std::collections::BTreeMap<String, String>>,
    ) -> Arc<PodClass> {
        let class = PodClass {
            service_account: service_account.map(|s| self.get(s)),
            labels: gammaray_proxy::authz::LabelSet::new(
                labels.into_iter().flatten().map(|(k, v)| (k.as_str(), v.as_str())),
            ),
        };
        if let Some(shared) = self.classes.get(&class) {
            return shared.clone();
        }
        if self.classes.len() >= 2 * self.classes_swept_at.max(1024) {
            self.classes.retain(|c| Arc::strong_count(c) > 1);
            self.classes_swept_at = self.classes.len();
        }
        let shared = Arc::new(class);
        self.classes.insert(shared.clone());
        shared
    }
}

/// One entry of `OrdMap::diff` between two versions of a map, as (key, before, after): `None`
/// before for an entry added, `None` after for one removed.
pub fn changed<'a, K, V>(
    item: imbl::ordmap::DiffItem<'a, 'a, K, V>,
) -> (&'a K, Option<&'a V>, Option<&'a V>) {
    use imbl::ordmap::DiffItem;
    match item {
        DiffItem::Add(k, v) => (k, None, Some(v)),
        DiffItem::Update { old: (k, old), new: (_, new) } => (k, Some(old), Some(new)),
        DiffItem::Remove(k, v) => (k, Some(v), None),
    }
}

/// Splits a YAML stream at document markers: a line that is `---` or starts with `--- `.
/// Block scalars are indented, so a marker at the start of a line always starts a document.
pub fn split_documents(text: &str) -> Vec<&str> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\n', '\r']);
        if bare == "---" || bare == "..." {
            docs.push(&text[start..offset]);
            start = offset + line.len();
        } else if bare.starts_with("--- ") {
            // Content may follow the marker on its line: it belongs to the new document.
            docs.push(&text[start..offset]);
            start = offset + 3;
        }
        offset += line.len();
    }
    docs.push(&text[start..]);
    docs.into_iter().filter(|d| !d.trim().is_empty()).collect()
}

/// What the mesh reads of a Pod: enrolment (node, UID, host network, phase, the pod's own opt-out
/// label) and translation (IPs, node, service account). The rest of the object a kubelet writes
/// (containers, env, volumes, probes, conditions, container statuses, owner references, managed
/// fields) is dropped on arrival: kept whole, a realistic Pod costs the store about 19 KiB, on
/// every node. A cluster holds hundreds of thousands of these, so each is one allocation: the
/// UID parsed, the addresses inline (one or two), the phase and the label reduced to what the
/// mesh asks of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: Option<Uid>,
    /// Shared with every pod that has the same.
    pub node: Option<Arc<str>>,
    /// Service account and labels, one copy for every pod that has the same (a controller's).
    pub class: Arc<PodClass>,
    /// `status.podIPs`, or `status.podIP` when the list is absent; one that is no IP address is
    /// dropped.
    pub ips: PodIps,
    pub host_network: bool,
    /// `status.phase` is `Succeeded` or `Failed`: the pod's containers have ended for good.
    pub finished: bool,
    /// The pod's own `gammaray.dev/dataplane-mode` label is `none`: it stays out of the mesh
    /// whatever its namespace says.
    pub opted_out: bool,
}

/// A pod's service account and labels, shared by the pods alike ([`Names::class`]).
pub use gammaray_proxy::authz::Class as PodClass;

/// A pod's addresses: one (or two, dual-stack) per pod. 24 bytes, where a `SmallVec` of one
/// takes 32: the pod's record then fits a smaller allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodIps {
    One(std::net::IpAddr),
    Many(Box<[std::net::IpAddr]>),
}

impl Default for PodIps {
    fn default() -> Self {
        Self::Many(Box::default())
    }
}

impl PodIps {
    pub fn as_slice(&self) -> &[std::net::IpAddr] {
        match self {
            Self::One(ip) => std::slice::from_ref(ip),
            Self::Many(ips) => ips,
        }
    }

    pub fn iter(&self) -> std::slice::Iter<'_, std::net::IpAddr> {
        self.as_slice().iter()
    }
}

impl FromIterator<std::net::IpAddr> for PodIps {
    fn from_iter<I: IntoIterator<Item = std::net::IpAddr>>(items: I) -> Self {
        let ips: SmallVec<[std::net::IpAddr; 2]> = items.into_iter().collect();
        match ips.as_slice() {
            [one] => Self::One(*one),
            many => Self::Many(many.into()),
        }
    }
}

/// A pod's `metadata.uid`: 16 bytes for the UUID the API server assigns, the text otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uid {
    Uuid([u8; 16]),
    Other(Box<str>),
}

impl Uid {
    pub fn parse(text: &str) -> Self {
        Self::uuid(text).map_or_else(|| Self::Other(text.into()), Self::Uuid)
    }

    /// The bytes of a UUID in its canonical form (lowercase, 8-4-4-4-12), which is how the API
    /// server writes UIDs; any other text is kept as it is, so that it reads back unchanged.
    fn uuid(text: &str) -> Option<[u8; 16]> {
        let b = text.as_bytes();
        if b.len() != 36 || [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
            return None;
        }
        let mut out = [0u8; 16];
        let mut digits = b.iter().filter(|c| **c != b'-');
        for byte in &mut out {
            let mut value = 0u8;
            for _ in 0..2 {
                let c = *digits.next()?;
                let d = match c {
                    b'0'..=b'9' => c - b'0',
                    b'a'..=b'f' => c - b'a' + 10,
                    _ => return None,
                };
                value = value << 4 | d;
            }
            *byte = value;
        }
        Some(out)
    }
}

impl std::fmt::Display for Uid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Other(text) => f.write_str(text),
            Self::Uuid(b) => {
                for (i, byte) in b.iter().enumerate() {
                    if matches!(i, 4 | 6 | 8 | 10) {
                        f.write_str("-")?;
                    }
                    write!(f, "{byte:02x}")?;
                }
                Ok(())
            }
        }
    }
}

/// The parts of a Pod that [`PodInfo`] is made of, decoded straight from the object: what else a
/// kubelet writes (containers, volumes, conditions, …) is skipped by the decoder, never built.
/// Decoding the whole `Pod` type first took most of an agent's initial load of a large cluster.
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct PodFields {
    metadata: PodMetaFields,
    spec: Option<PodSpecFields>,
    status: Option<PodStatusFields>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct PodMetaFields {
    uid: Option<String>,
    labels: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct PodSpecFields {
    node_name: Option<String>,
    service_account_name: Option<String>,
    host_network: Option<bool>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct PodStatusFields {
    phase: Option<String>,
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pod_ips: Option<Vec<PodIpField>>,
}

#[derive(serde::Deserialize)]
struct PodIpField {
    ip: String,
}

impl PodInfo {
    /// What the mesh reads of the Pod object `value`.
    pub fn decode(value: serde_json::Value, names: &mut Names) -> Result<Self, serde_json::Error> {
        let PodFields { metadata, spec, status } = serde_json::from_value(value)?;
        let (spec, status) = (spec.unwrap_or_default(), status.unwrap_or_default());
        let ips = match status.pod_ips {
            Some(ips) => ips.iter().filter_map(|i| i.ip.parse().ok()).collect(),
            None => status.pod_ip.iter().filter_map(|ip| ip.parse().ok()).collect(),
        };
        Ok(Self {
            uid: metadata.uid.as_deref().map(Uid::parse),
            node: spec.node_name.map(|n| names.get(&n)),
            class: names.class(spec.service_account_name.as_deref(), metadata.labels.as_ref()),
            ips,
            host_network: spec.host_network.unwrap_or(false),
            finished: matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")),
            opted_out: metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.get(crate::enrolment::DATAPLANE_LABEL).is_some_and(|v| v == "none")),
        })
    }
}

/// What the mesh reads of a Service: its type, ClusterIPs and ports (name, number, appProtocol),
/// in the shape of the Service's own `spec`. Decoded straight from the object, like [`PodInfo`]:
/// kept whole, a Service took about 2.6 KiB of the store (metadata, every `Option` of its spec,
/// status), on every node.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default)]
pub struct ServiceInfo {
    pub spec: Option<ServiceSpecInfo>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default)]
pub struct ServiceSpecInfo {
    #[serde(rename = "type", deserialize_with = "shared_name")]
    pub type_: Option<Arc<str>>,
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs")]
    pub cluster_ips: Option<Vec<String>>,
    pub ports: Option<Vec<ServicePortInfo>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePortInfo {
    #[serde(default, deserialize_with = "shared_name")]
    pub name: Option<Arc<str>>,
    /// Required, as the API has it: a port without a number is refused with its Service.
    pub port: i32,
    #[serde(default, deserialize_with = "shared_name")]
    pub app_protocol: Option<Arc<str>>,
}

impl ServiceInfo {
    /// What the mesh reads of the Service `value`, its repeated names (type, port names and
    /// protocols) shared.
    pub fn decode(value: serde_json::Value, names: &mut Names) -> Result<Self, serde_json::Error> {
        let mut service: Self = serde_json::from_value(value)?;
        if let Some(spec) = &mut service.spec {
            share(&mut spec.type_, names);
            for port in spec.ports.iter_mut().flatten() {
                share(&mut port.name, names);
                share(&mut port.app_protocol, names);
            }
        }
        Ok(service)
    }
}

/// Replaces a name by its shared copy.
fn share(name: &mut Option<Arc<str>>, names: &mut Names) {
    if let Some(n) = name {
        *n = names.get(n);
    }
}

/// The Service an EndpointSlice belongs to: its `kubernetes.io/service-name` label.
pub fn service_of(slice: &SliceInfo) -> Option<&str> {
    slice.service.as_deref()
}

/// What the mesh reads of an EndpointSlice: its Service, address type, ports, and per endpoint
/// its addresses, readiness, node and Pod. Decoded straight from the object, like [`PodInfo`]:
/// kept whole, an endpoint took about 0.75 KiB of the store (hints, zone, serving and terminating
/// conditions, the targetRef's uid and resourceVersion, every field's `Option`), on every node.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct SliceInfo {
    /// Shared with the store's key for the Service when it holds the Service.
    #[serde(rename = "metadata", deserialize_with = "service_label")]
    pub service: Option<Arc<str>>,
    /// Shared with every slice of the same type.
    #[serde(deserialize_with = "shared_text")]
    pub address_type: Arc<str>,
    #[serde(deserialize_with = "null_as_empty")]
    pub ports: Vec<SlicePort>,
    #[serde(deserialize_with = "null_as_empty")]
    pub endpoints: Vec<SliceEndpoint>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default)]
pub struct SlicePort {
    #[serde(deserialize_with = "shared_name")]
    pub name: Option<Arc<str>>,
    pub port: Option<i32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct SliceEndpoint {
    /// Parsed on arrival; one that is no IP address (an FQDN slice's) is dropped. Endpoints
    /// have one (the API allows more): it is held inline.
    #[serde(deserialize_with = "ip_addresses")]
    pub addresses: SmallVec<[std::net::IpAddr; 1]>,
    #[serde(rename = "conditions", deserialize_with = "ready_condition")]
    pub ready: Option<bool>,
    /// Shared with every endpoint on the same node.
    #[serde(deserialize_with = "shared_name")]
    pub node_name: Option<Arc<str>>,
    /// A `targetRef` of kind Pod (its namespace defaults to the slice's): the store's own key
    /// for the pod when it holds the pod already.
    #[serde(rename = "targetRef", deserialize_with = "target_pod")]
    pub pod: Option<PodKey>,
}

impl SliceInfo {
    /// What the mesh reads of the EndpointSlice `value`, which lives in `namespace`: the names
    /// it repeats shared, its Service's and its pods' with `store`'s keys where it holds them.
    pub fn decode(
        value: serde_json::Value,
        namespace: &str,
        names: &mut Names,
        store: &Store,
    ) -> Result<Self, serde_json::Error> {
        let mut slice: Self = serde_json::from_value(value)?;
        let pods = &store.pods;
        slice.address_type = names.get(&slice.address_type);
        if let Some(service) = &mut slice.service
            && let Some(((_, held), _)) = store.services.get_key_value(&KeyRef(namespace, service))
        {
            *service = held.clone();
        }
        for port in &mut slice.ports {
            share(&mut port.name, names);
        }
        for ep in &mut slice.endpoints {
            share(&mut ep.node_name, names);
            if let Some(pod) = &mut ep.pod {
                // Read with an empty namespace when the targetRef gives none.
                let ns = Some(&*pod.namespace).filter(|ns| !ns.is_empty()).unwrap_or(namespace);
                *pod = match pods.get_key_value(&KeyRef(ns, &pod.name)) {
                    Some((held, _)) => held.clone(),
                    None => Arc::new(ObjectRef::shared(names.get(ns), pod.name.clone())),
                };
            }
        }
        Ok(slice)
    }
}

/// A text, to be replaced by its shared copy.
fn shared_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Arc<str>, D::Error> {
    use serde::Deserialize as _;
    Ok(String::deserialize(d)?.into())
}

/// A name, to be replaced by its shared copy.
fn shared_name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Arc<str>>, D::Error> {
    use serde::Deserialize as _;
    Ok(Option::<String>::deserialize(d)?.map(Arc::from))
}

fn ip_addresses<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SmallVec<[std::net::IpAddr; 1]>, D::Error> {
    use serde::Deserialize as _;
    let addresses = Option::<Vec<String>>::deserialize(d)?.unwrap_or_default();
    Ok(addresses.iter().filter_map(|a| a.parse().ok()).collect())
}

fn null_as_empty<'de, D: serde::Deserializer<'de>, T: serde::Deserialize<'de>>(
    d: D,
) -> Result<Vec<T>, D::Error> {
    use serde::Deserialize as _;
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

/// `metadata.labels["kubernetes.io/service-name"]`.
fn service_label<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Arc<str>>, D::Error> {
    use serde::Deserialize as _;
    #[derive(serde::Deserialize, Default)]
    #[serde(default)]
    struct Meta {
        labels: Option<std::collections::BTreeMap<String, String>>,
    }
    let meta = Option::<Meta>::deserialize(d)?.unwrap_or_default();
    Ok(meta.labels.and_then(|mut l| l.remove("kubernetes.io/service-name")).map(Arc::from))
}

/// `conditions.ready`.
fn ready_condition<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    use serde::Deserialize as _;
    #[derive(serde::Deserialize, Default)]
    #[serde(default)]
    struct Conditions {
        ready: Option<bool>,
    }
    Ok(Option::<Conditions>::deserialize(d)?.and_then(|c| c.ready))
}

/// A `targetRef` naming a Pod: its namespace (empty if not given) and name.
fn target_pod<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<PodKey>, D::Error> {
    use serde::Deserialize as _;
    #[derive(serde::Deserialize, Default)]
    #[serde(default)]
    struct Target {
        kind: Option<String>,
        namespace: Option<String>,
        name: Option<String>,
    }
    let Some(t) = Option::<Target>::deserialize(d)? else { return Ok(None) };
    Ok(match (t.kind.as_deref(), t.name) {
        (Some("Pod"), Some(name)) => {
            Some(Arc::new(ObjectRef::new(t.namespace.as_deref().unwrap_or_default(), name)))
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_document_is_reported_and_the_others_apply() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\nkind: [unclosed\n  nested: {\n--- # next\napiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n";
        let mut store = Store::default();
        let applied = store.apply_yaml(text);
        assert_eq!(applied.objects, 2);
        assert_eq!(applied.errors.len(), 1, "{:?}", applied.errors);
        assert_eq!(applied.ignored, vec!["Deployment default/d".to_owned()]);
        assert!(store.namespaces.contains_key("a") && store.namespaces.contains_key("b"));
    }

    #[test]
    fn a_document_of_a_known_kind_that_does_not_decode_names_itself() {
        let mut store = Store::default();
        let applied = store.apply_yaml(
            "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: n}\nspec: {ports: 7}\n",
        );
        assert_eq!(applied.objects, 0);
        let err = applied.errors[0].to_string();
        assert!(err.contains("Service s"), "{err}");
    }

    #[test]
    fn a_services_slices_follow_their_label_through_updates_removals_and_relists() {
        let slice = |name: &str, service: &str| {
            format!(
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: n, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nendpoints: []\n"
            )
        };
        let names = |store: &Store, service: &str| -> Vec<String> {
            store.slices_of("n", service).map(|(name, _)| name.to_owned()).collect()
        };
        let mut store = Store::default();
        store.apply_yaml(&[slice("a-1", "a"), slice("a-2", "a"), slice("b-1", "b")].concat());
        assert_eq!(names(&store, "a"), ["a-1", "a-2"]);
        assert_eq!(names(&store, "b"), ["b-1"]);
        assert!(store.slices_of("other", "a").next().is_none(), "by namespace too");
        // A slice moved to another Service (its label changed) leaves the first.
        store.apply_yaml(&slice("a-2", "b"));
        assert_eq!(names(&store, "a"), ["a-1"]);
        assert_eq!(names(&store, "b"), ["a-2", "b-1"]);
        assert!(store.remove("EndpointSlice", "n", "a-1"));
        assert!(names(&store, "a").is_empty());
        assert!(!store.remove("EndpointSlice", "n", "a-1"), "removed once");
        store.clear_kind("EndpointSlice");
        assert!(names(&store, "b").is_empty(), "a relist starts from nothing");
    }

    /// Pods of one controller (same service account, same labels) share one class: the labels
    /// policies select by cost a pointer per pod.
    #[test]
    fn pods_alike_share_their_service_account_and_labels() {
        let mut store = Store::default();
        let pod = |name: &str, version: &str| {
            format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: n, labels: {{app: web, version: {version}}}}}\n\
                 spec: {{serviceAccountName: web}}\n"
            )
        };
        store.apply_yaml(&[pod("a", "v1"), pod("b", "v1"), pod("c", "v2")].concat());
        let class = |name: &str| store.pods[&KeyRef("n", name)].class.clone();
        assert!(Arc::ptr_eq(&class("a"), &class("b")), "one copy for pods alike");
        assert!(!Arc::ptr_eq(&class("a"), &class("c")));
        assert_eq!(class("c").labels.get("version"), Some("v2"));
    }

    #[test]
    fn a_pod_is_kept_as_what_the_mesh_reads_of_it() {
        let mut store = Store::default();
        store.apply_yaml(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: n, uid: u-a, labels: {app: a, gammaray.dev/dataplane-mode: none}}\n\
             spec: {nodeName: node1, serviceAccountName: sa-a, containers: [{name: c, image: i, env: [{name: X, value: y}]}]}\n\
             status: {phase: Running, podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.1}, {ip: 'fd00::1'}]}\n\
             ---\napiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: n}\n\
             spec: {hostNetwork: true, containers: [{name: c, image: i}]}\nstatus: {podIP: 10.200.0.1}\n",
        );
        let a = &store.pods[&KeyRef("n", "a")];
        assert_eq!(
            **a,
            PodInfo {
                uid: Some(Uid::Other("u-a".into())),
                node: Some("node1".into()),
                class: Arc::new(PodClass {
                    service_account: Some("sa-a".into()),
                    labels: gammaray_proxy::authz::LabelSet::new([
                        ("app", "a"),
                        ("gammaray.dev/dataplane-mode", "none")
                    ]),
                }),
                ips: ["10.0.0.1", "fd00::1"].iter().map(|ip| ip.parse().expect("ip")).collect(),
                host_network: false,
                finished: false,
                opted_out: true,
            }
        );
        let b = &store.pods[&KeyRef("n", "b")];
        assert!(b.host_network);
        assert_eq!(
            *b.ips.as_slice(),
            ["10.200.0.1".parse::<std::net::IpAddr>().expect("ip")],
            "podIP when podIPs is absent"
        );
    }

    #[test]
    fn an_endpoint_shares_its_pods_name_with_the_store() {
        let mut store = Store::default();
        store.apply_yaml(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: web-a, namespace: n}\nstatus: {podIP: 10.0.0.1}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: n, labels: {kubernetes.io/service-name: web}}\n\
             addressType: IPv4\nendpoints:\n\
             - {addresses: [10.0.0.1], targetRef: {kind: Pod, namespace: n, name: web-a}}\n\
             - {addresses: [10.0.0.2], targetRef: {kind: Pod, namespace: other, name: web-b}}\n",
        );
        let (key, _) = store.pods.get_key_value(&KeyRef("n", "web-a")).expect("the pod");
        let slice = &store.endpoint_slices()[&KeyRef("n", "web-1")];
        let pod = slice.endpoints[0].pod.as_ref().expect("its pod");
        assert!(Arc::ptr_eq(pod, key), "one copy of the pod's key");
        let pod = slice.endpoints[1].pod.as_ref().expect("its pod");
        assert_eq!(**pod, ObjectRef::new("other", "web-b"), "a pod not held yet has its own");
    }

    #[test]
    fn a_pods_record_stays_small() {
        // Every node holds one per pod of the cluster: with its `Arc` counts it must stay within
        // glibc's 112-byte chunk (a request of at most 104 bytes).
        assert!(std::mem::size_of::<PodInfo>() <= 88, "{} bytes", std::mem::size_of::<PodInfo>());
        let one: PodIps = ["10.0.0.1".parse().expect("ip")].into_iter().collect();
        assert!(matches!(one, PodIps::One(_)), "one address is held inline");
        let two: PodIps = ["10.0.0.1", "fd00::1"].iter().map(|ip| ip.parse().expect("ip")).collect();
        assert_eq!(two.as_slice().len(), 2);
        assert!(PodIps::default().as_slice().is_empty());
    }

    #[test]
    fn uids_read_back_as_written() {
        let uuid = "0f8b2c1e-9a4d-4e7f-b3c2-5d6e7f8a9b0c";
        assert!(matches!(Uid::parse(uuid), Uid::Uuid(_)), "an API server's UID is 16 bytes");
        for text in
            [uuid, "0F8B2C1E-9A4D-4E7F-B3C2-5D6E7F8A9B0C", "u-a", "0f8b2c1e-9a4d-4e7f-b3c2-5d6e7f8a9b0", ""]
        {
            assert_eq!(Uid::parse(text).to_string(), text);
        }
        assert!(matches!(Uid::parse("0f8b2c1e-9a4d-4e7f-b3c2-5d6e7f8a9b0g"), Uid::Other(_)));
    }

    #[test]
    fn a_slice_is_kept_as_what_the_mesh_reads_of_it() {
        let mut store = Store::default();
        let applied = store.apply_yaml(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: n, uid: u, labels: {kubernetes.io/service-name: web, other: x}}\n\
             addressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}]\n\
             endpoints:\n\
             - {addresses: [10.0.0.1], conditions: {ready: true, serving: true}, nodeName: node1, zone: z, targetRef: {kind: Pod, namespace: n, name: web-a, uid: p}}\n\
             - {addresses: [10.0.0.2], conditions: {ready: false}, targetRef: {kind: Node, name: node1}}\n\
             - {addresses: [10.0.0.3]}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: bare, namespace: n}\naddressType: IPv6\nports: null\nendpoints: null\n",
        );
        assert!(applied.errors.is_empty(), "{:?}", applied.errors);
        let (name, web) = store.slices_of("n", "web").next().expect("web's slice");
        assert_eq!(name, "web-1");
        assert_eq!(
            **web,
            SliceInfo {
                service: Some("web".into()),
                address_type: "IPv4".into(),
                ports: vec![SlicePort { name: Some("http".into()), port: Some(8080) }],
                endpoints: vec![
                    SliceEndpoint {
                        addresses: smallvec::smallvec!["10.0.0.1".parse().expect("ip")],
                        ready: Some(true),
                        node_name: Some("node1".into()),
                        pod: Some(Arc::new(ObjectRef::new("n", "web-a"))),
                    },
                    SliceEndpoint {
                        addresses: smallvec::smallvec!["10.0.0.2".parse().expect("ip")],
                        ready: Some(false),
                        ..Default::default()
                    },
                    SliceEndpoint {
                        addresses: smallvec::smallvec!["10.0.0.3".parse().expect("ip")],
                        ..Default::default()
                    },
                ],
            }
        );
        let bare = &store.endpoint_slices()[&key("n", "bare")];
        assert_eq!(
            **bare,
            SliceInfo { address_type: "IPv6".into(), ..Default::default() },
            "no label, nulls"
        );
    }

    #[test]
    fn a_service_is_kept_as_what_the_mesh_reads_of_it() {
        let mut store = Store::default();
        let applied = store.apply_yaml(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: n, labels: {app: web}, annotations: {note: long}}\n\
             spec: {type: ClusterIP, clusterIP: 10.96.0.1, clusterIPs: [10.96.0.1], selector: {app: web}, sessionAffinity: None,\n\
             ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP, appProtocol: http}, {port: 81}]}\n\
             status: {loadBalancer: {}}\n\
             ---\napiVersion: v1\nkind: Service\nmetadata: {name: portless, namespace: n}\nspec: {ports: [{name: http}]}\n",
        );
        assert_eq!(applied.objects, 1);
        assert!(
            applied.errors[0].to_string().contains("Service portless"),
            "a port needs its number: {:?}",
            applied.errors
        );
        let web = &store.services[&key("n", "web")];
        assert_eq!(
            **web,
            ServiceInfo {
                spec: Some(ServiceSpecInfo {
                    type_: Some("ClusterIP".into()),
                    cluster_ip: Some("10.96.0.1".into()),
                    cluster_ips: Some(vec!["10.96.0.1".into()]),
                    ports: Some(vec![
                        ServicePortInfo {
                            name: Some("http".into()),
                            port: 80,
                            app_protocol: Some("http".into())
                        },
                        ServicePortInfo { name: None, port: 81, app_protocol: None },
                    ]),
                }),
            }
        );
    }

    #[test]
    fn markers_split_documents() {
        assert_eq!(
            split_documents("a: 1\n---\nb: 2\n--- \nc: 3\n...\n"),
            vec!["a: 1\n", "b: 2\n", " \nc: 3\n"]
        );
        assert_eq!(split_documents("---\na: 1\n"), vec!["a: 1\n"]);
        assert_eq!(split_documents("a: |\n  ---\n  x\n"), vec!["a: |\n  ---\n  x\n"]);
    }
}
