//! What a cluster's controllers would make of a set of manifests, on the simulated cluster: each
//! Deployment becomes running pods (named `<deployment>-<template hash>-<suffix>`, spread over
//! the nodes, each serving the echo app on the ports its container args name), each Service gets
//! a ClusterIP and an EndpointSlice of the ready pods its selector picks, and each Node its
//! object. The result is the object set an agent reads, plus the live pods.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
};

use serde::Deserialize as _;
use serde_json::{Value, json};

use crate::{Cluster, Error, Pod, Result, istio_echo, names, objects};

/// The label that puts a namespace's pods in the mesh.
pub const DATAPLANE_LABEL: &str = "gammaray.dev/dataplane-mode";

/// A pod a Deployment made.
pub struct WorldPod {
    pub pod: Arc<Pod>,
    pub deployment: String,
    pub labels: BTreeMap<String, String>,
    /// The ports its echo server listens on.
    pub ports: Vec<u16>,
}

/// The objects and pods of a world built from manifests.
pub struct World {
    pub pods: Vec<WorldPod>,
    /// `namespace/name` → ClusterIP.
    pub cluster_ips: BTreeMap<String, Ipv4Addr>,
    /// Every object, as multi-document YAML: the manifests (Services with their ClusterIPs,
    /// Namespaces labelled for the mesh), the Pods, EndpointSlices and Nodes.
    pub objects: String,
    servers: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for World {
    fn drop(&mut self) {
        for s in &self.servers {
            s.abort();
        }
    }
}

fn str_map(v: Option<&Value>) -> BTreeMap<String, String> {
    v.and_then(Value::as_object)
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned()))).collect())
        .unwrap_or_default()
}

fn meta<'a>(v: &'a Value, field: &str) -> Option<&'a str> {
    v.get("metadata").and_then(|m| m.get(field)).and_then(Value::as_str)
}

/// The ports the echo app serves, from its container args: every `--port` that is not also a
/// `--tls` port (TLS listeners are not served), and every `--grpc`. Without args, the app's
/// defaults: HTTP on 8080 and gRPC on 7070.
pub fn echo_ports(args: &[String]) -> Vec<u16> {
    let mut values: Vec<(String, u16)> = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].trim_start_matches('-');
        let (name, value) = match arg.split_once('=') {
            Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
            None => {
                i += 1;
                (arg.to_owned(), args.get(i).cloned())
            }
        };
        if let Some(port) = value.and_then(|v| v.parse().ok()) {
            values.push((name, port));
        }
        i += 1;
    }
    if values.is_empty() {
        return vec![7070, 8080];
    }
    let tls: Vec<u16> = values.iter().filter(|(n, _)| n == "tls").map(|(_, p)| *p).collect();
    let mut ports: Vec<u16> = values
        .iter()
        .filter(|(n, p)| (n == "port" && !tls.contains(p)) || n == "grpc")
        .map(|(_, p)| *p)
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Creates a Pod object (JSON, without status) and returns its UID.
pub type CreatePod<'a> = dyn Fn(&Value) -> Result<String> + 'a;

impl World {
    /// Builds the world of `manifests` (multi-document YAML texts) on `cluster`. ClusterIPs come
    /// from `assigned` (`namespace/name` → IP) where given, else from 10.96.200.0/24. Echo
    /// servers run on `runtime` until the world is dropped.
    ///
    /// With `create_pod`, each Pod object (without status) is first created through it, and the
    /// UID it returns, a real API server's, is the pod's: Pod specs cannot change once created,
    /// so the object it creates is the one the world's objects hold.
    pub fn build(
        cluster: &Cluster,
        manifests: &[String],
        assigned: &BTreeMap<String, Vec<String>>,
        runtime: &tokio::runtime::Handle,
        create_pod: Option<&CreatePod<'_>>,
    ) -> Result<Self> {
        let mut docs = Vec::new();
        for text in manifests {
            for doc in serde_yaml::Deserializer::from_str(text) {
                let value = Value::deserialize(doc)
                    .map_err(|e| Error::Other(format!("manifests do not parse: {e}")))?;
                if value.is_object() {
                    docs.push(value);
                }
            }
        }
        // Objects a cluster would not hold as such (the catalogue's assignment lists, synthetic
        // pods and slices) are left out: this world makes its own.
        docs.retain(|d| {
            let kind = d.get("kind").and_then(Value::as_str).unwrap_or("");
            let synthetic = d
                .get("metadata")
                .and_then(|m| m.get("annotations"))
                .and_then(|a| a.get("catalogue.gamma/synthetic"))
                .is_some();
            !synthetic && kind != "ServiceClusterIPAssignments"
        });

        let mut world = World {
            pods: Vec::new(),
            cluster_ips: BTreeMap::new(),
            objects: String::new(),
            servers: Vec::new(),
        };
        let nodes = cluster.nodes().len();
        let mut placed = 0usize;
        let mut generated = Vec::new();
        for d in docs.iter().filter(|d| d.get("kind").and_then(Value::as_str) == Some("Deployment")) {
            let (Some(name), Some(ns)) = (meta(d, "name"), meta(d, "namespace")) else {
                return Err(Error::Other("a Deployment without name or namespace".into()));
            };
            let spec = d.get("spec").cloned().unwrap_or_default();
            let replicas = spec.get("replicas").and_then(Value::as_u64).unwrap_or(1);
            let template = spec.get("template").cloned().unwrap_or_default();
            let hash = names::generated(template.to_string().as_bytes(), 0, 10);
            let mut labels = str_map(template.get("metadata").and_then(|m| m.get("labels")));
            labels.insert("pod-template-hash".into(), hash.clone());
            let pod_spec = template.get("spec").cloned().unwrap_or_default();
            let container = pod_spec.get("containers").and_then(|c| c.get(0)).cloned().unwrap_or_default();
            let args: Vec<String> = container
                .get("args")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            let ports = echo_ports(&args);
            for r in 0..replicas {
                let pod_name = format!("{name}-{hash}-{}", names::generated(name.as_bytes(), r + 1, 5));
                let node = (placed % nodes) as u8 + 1;
                placed += 1;
                let sa = pod_spec.get("serviceAccountName").and_then(Value::as_str).unwrap_or("default");
                let mut pod_spec = pod_spec.clone();
                pod_spec["nodeName"] = json!(cluster.node(node).name);
                pod_spec["serviceAccountName"] = json!(sa);
                let mut object = json!({
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {
                        "name": pod_name,
                        "namespace": ns,
                        "labels": labels,
                        "ownerReferences": [{
                            "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{name}-{hash}"),
                            "uid": format!("rs-{name}-{hash}"), "controller": true,
                        }],
                    },
                    "spec": pod_spec,
                });
                let uid = create_pod.map(|create| create(&object)).transpose()?;
                let pod = cluster.add_pod_with_uid(node, ns, &pod_name, uid.as_deref())?;
                let who = Arc::new(istio_echo::EchoIdentity {
                    hostname: pod_name.clone(),
                    namespace: ns.to_owned(),
                    service_version: String::new(),
                });
                for port in &ports {
                    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, *port));
                    let listener = pod
                        .run(|| std::net::TcpListener::bind(addr))?
                        .and_then(|l| l.set_nonblocking(true).map(|()| l))
                        .map_err(|e| Error::Other(format!("{pod_name}: bind {addr}: {e}")))?;
                    let _entered = runtime.enter();
                    let listener = tokio::net::TcpListener::from_std(listener)
                        .map_err(|e| Error::Other(format!("{pod_name}: {e}")))?;
                    world.servers.push(runtime.spawn(istio_echo::serve(listener, who.clone())));
                }
                object["metadata"]["uid"] = json!(pod.uid);
                object["status"] = json!({
                    "phase": "Running",
                    "podIP": pod.ip.to_string(),
                    "podIPs": [{"ip": pod.ip.to_string()}],
                    "conditions": [{"type": "Ready", "status": "True"}],
                });
                generated.push(object);
                world.pods.push(WorldPod {
                    pod,
                    deployment: name.to_owned(),
                    labels: labels.clone(),
                    ports: ports.clone(),
                });
            }
        }

        let mut next_ip = 1u8;
        for d in &mut docs {
            match d.get("kind").and_then(Value::as_str) {
                Some("Namespace") => {
                    d["metadata"]["labels"][DATAPLANE_LABEL] = json!("ambient");
                }
                Some("Service") => {
                    let key = format!(
                        "{}/{}",
                        meta(d, "namespace").unwrap_or("default"),
                        meta(d, "name").unwrap_or("")
                    );
                    let ip = match assigned.get(&key).and_then(|ips| ips.first()) {
                        Some(ip) => {
                            ip.parse().map_err(|e| Error::Other(format!("{key}: ClusterIP {ip}: {e}")))?
                        }
                        None => {
                            next_ip = next_ip
                                .checked_add(1)
                                .ok_or_else(|| Error::Other("out of ClusterIPs".into()))?;
                            Ipv4Addr::new(10, 96, 200, next_ip)
                        }
                    };
                    d["spec"]["clusterIP"] = json!(ip.to_string());
                    d["spec"]["clusterIPs"] = json!([ip.to_string()]);
                    generated.push(endpoint_slice(d, &world.pods));
                    world.cluster_ips.insert(key, ip);
                }
                _ => {}
            }
        }
        for node in cluster.nodes() {
            world.objects.push_str(&objects::node(&node.name, node.ip));
        }
        for d in docs.iter().chain(&generated) {
            world.objects.push_str("---\n");
            world.objects.push_str(
                &serde_yaml::to_string(d).map_err(|e| Error::Other(format!("cannot write YAML: {e}")))?,
            );
        }
        Ok(world)
    }

    /// The first pod (by name) in `namespace` whose labels include all of `selector`.
    pub fn pod_matching(&self, namespace: &str, selector: &BTreeMap<String, String>) -> Option<&WorldPod> {
        let mut matching: Vec<&WorldPod> = self
            .pods
            .iter()
            .filter(|p| {
                p.pod.namespace == namespace && selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
            })
            .collect();
        matching.sort_by(|a, b| a.pod.name.cmp(&b.pod.name));
        matching.first().copied()
    }

    /// The first pod (by name) of Deployment `namespace/deployment`.
    pub fn pod_of(&self, workload: &str) -> Option<&WorldPod> {
        let (ns, deployment) = workload.split_once('/')?;
        let mut matching: Vec<&WorldPod> =
            self.pods.iter().filter(|p| p.pod.namespace == ns && p.deployment == deployment).collect();
        matching.sort_by(|a, b| a.pod.name.cmp(&b.pod.name));
        matching.first().copied()
    }
}

/// The EndpointSlice of `service`: its ports with their target port numbers, and every pod its
/// selector picks that serves them.
fn endpoint_slice(service: &Value, pods: &[WorldPod]) -> Value {
    let ns = meta(service, "namespace").unwrap_or("default");
    let name = meta(service, "name").unwrap_or("");
    let selector = str_map(service.get("spec").and_then(|s| s.get("selector")));
    let picked: Vec<&WorldPod> = pods
        .iter()
        .filter(|p| {
            !selector.is_empty()
                && p.pod.namespace == ns
                && selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
        })
        .collect();
    let ports: Vec<Value> = service
        .get("spec")
        .and_then(|s| s.get("ports"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let port = p.get("port").and_then(Value::as_u64)?;
            // Named target ports would be looked up in the containers; numbers are used as is.
            let target = p.get("targetPort").and_then(Value::as_u64).unwrap_or(port);
            let mut out =
                json!({"port": target, "protocol": p.get("protocol").cloned().unwrap_or(json!("TCP"))});
            if let Some(n) = p.get("name") {
                out["name"] = n.clone();
            }
            if let Some(a) = p.get("appProtocol") {
                out["appProtocol"] = a.clone();
            }
            Some(out)
        })
        .collect();
    let endpoints: Vec<Value> = picked
        .iter()
        .map(|p| {
            json!({
                "addresses": [p.pod.ip.to_string()],
                "nodeName": p.pod.node,
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "targetRef": {"kind": "Pod", "namespace": ns, "name": p.pod.name, "uid": p.pod.uid},
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{name}-{}", names::generated(name.as_bytes(), 99, 5)),
            "namespace": ns,
            "labels": {"kubernetes.io/service-name": name, "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
        },
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": endpoints,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn echo_ports_follow_the_args_and_skip_tls_listeners() {
        let base = args(&[
            "--tcp=9090",
            "--port=8080",
            "--grpc=7070",
            "--port=8443",
            "--tls=8443",
            "--crt=/cert.crt",
            "--key=/cert.key",
        ]);
        assert_eq!(echo_ports(&base), vec![7070, 8080]);
        assert_eq!(echo_ports(&args(&["--port", "9000", "--grpc", "9001"])), vec![9000, 9001]);
        assert_eq!(echo_ports(&[]), vec![7070, 8080], "the image's defaults");
    }

    #[test]
    fn generated_names_have_the_deployment_shape() {
        let hash = names::generated(b"template", 0, 10);
        assert_eq!(hash.len(), 10);
        assert!(hash.bytes().all(|b| crate::names::SAFE.contains(&b)));
        let name = format!("echo-v1-{hash}-{}", names::generated(b"echo-v1", 1, 5));
        assert_eq!(crate::catalogue::deployment_of(&name), "echo-v1");
    }
}
