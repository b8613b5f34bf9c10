//! The Kubernetes objects a cluster's controllers would make for the simulated pods: Pods with
//! their IPs and nodes, Services with ClusterIPs, and the EndpointSlices that follow the pods.
//! Agents read them from a manifest directory.

use std::net::Ipv4Addr;

use crate::cluster::Pod;

/// A Node object with its InternalIP.
pub fn node(name: &str, ip: Ipv4Addr) -> String {
    format!(
        "---\napiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\nstatus: {{addresses: [{{type: InternalIP, address: '{ip}'}}, {{type: Hostname, address: {name}}}]}}\n"
    )
}

/// A Pod object for a simulated pod (running, ready).
pub fn pod(p: &Pod, labels: &[(&str, &str)]) -> String {
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {}, uid: {}, labels: {{{}}}}}\nspec: {{nodeName: {}, serviceAccountName: {}, containers: [{{name: app, image: app}}]}}\nstatus: {{phase: Running, podIP: {}, podIPs: [{{ip: {}}}], conditions: [{{type: Ready, status: 'True'}}]}}\n",
        p.name,
        p.namespace,
        p.uid,
        labels.join(", "),
        p.node,
        service_account(p),
        p.ip,
        p.ip
    )
}

/// The service account a simulated pod runs as: its name up to the pod-template hash.
pub fn service_account(p: &Pod) -> String {
    service_account_of(&p.name)
}

/// [`service_account`] of a pod named `name`.
pub fn service_account_of(name: &str) -> String {
    let parts: Vec<&str> = name.split('-').collect();
    if parts.len() > 2 { parts[..parts.len() - 2].join("-") } else { name.to_owned() }
}

/// The Pod object [`pod`] writes, before the pod exists: no UID and no status, as it is created
/// on a real API server (whose UID the pod then takes).
pub fn pod_to_create(namespace: &str, name: &str, node: &str, labels: &[(&str, &str)]) -> serde_json::Value {
    let labels: serde_json::Map<String, serde_json::Value> =
        labels.iter().map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v))).collect();
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "nodeName": node,
            "serviceAccountName": service_account_of(name),
            "containers": [{"name": "app", "image": "app"}],
        },
    })
}

/// A ClusterIP Service with one port, and its EndpointSlice listing `pods` on `target_port`.
pub fn service(
    namespace: &str,
    name: &str,
    cluster_ip: Ipv4Addr,
    port: u16,
    target_port: u16,
    app_protocol: Option<&str>,
    pods: &[&Pod],
) -> String {
    let proto = app_protocol.map(|p| format!(", appProtocol: {p}")).unwrap_or_default();
    let mut y = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {{type: ClusterIP, clusterIP: {cluster_ip}, clusterIPs: [{cluster_ip}], ports: [{{name: http, port: {port}, targetPort: {target_port}{proto}}}]}}\n"
    );
    let endpoints: Vec<String> = pods
        .iter()
        .map(|p| {
            format!(
                "{{addresses: ['{}'], nodeName: {}, conditions: {{ready: true, serving: true, terminating: false}}, targetRef: {{kind: Pod, namespace: {}, name: {}}}}}",
                p.ip, p.node, p.namespace, p.name
            )
        })
        .collect();
    y.push_str(&format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-gr, namespace: {namespace}, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: http, port: {target_port}{proto}}}]\nendpoints: [{}]\n",
        endpoints.join(", ")
    ));
    y
}

/// An HTTPRoute on Service `parent` (port 80) splitting between weighted backends (port 80).
pub fn weighted_route(namespace: &str, name: &str, parent: &str, backends: &[(&str, u32)]) -> String {
    weighted("HTTPRoute", namespace, name, parent, backends)
}

/// A GRPCRoute on Service `parent` (port 80) splitting every call between weighted backends
/// (port 80).
pub fn weighted_grpc_route(namespace: &str, name: &str, parent: &str, backends: &[(&str, u32)]) -> String {
    weighted("GRPCRoute", namespace, name, parent, backends)
}

fn weighted(kind: &str, namespace: &str, name: &str, parent: &str, backends: &[(&str, u32)]) -> String {
    let refs: Vec<String> =
        backends.iter().map(|(b, w)| format!("{{name: {b}, port: 80, weight: {w}}}")).collect();
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: {kind}\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: {parent}, port: 80}}]\n  rules:\n  - backendRefs: [{}]\n",
        refs.join(", ")
    )
}
