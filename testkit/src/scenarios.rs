//! Ready-made worlds on the simulated cluster, shared by privileged tests and the demo.

use std::{net::Ipv4Addr, sync::Arc};

use crate::{Cluster, Pod, Result, controllers::CreatePod, http::HttpBackend, names, objects};

/// The canary: backend-v1 (3 pods) and backend-v2 (2 pods) spread over nodes 1 and 2, each
/// answering "hello from backend vN" on port 8080; Services `backend` (both versions),
/// `backend-v1` and `backend-v2`; a client pod on node 1. All in namespace `demo`.
pub struct Canary {
    pub client: Arc<Pod>,
    pub backends: Vec<(Arc<Pod>, HttpBackend)>,
    /// Pods, Services and EndpointSlices, as a cluster would hold them (no route).
    pub objects: String,
}

pub const NAMESPACE: &str = "demo";
pub const BACKEND_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const BACKEND_V1_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
pub const BACKEND_V2_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
pub const TARGET_PORT: u16 = 8080;

/// A pod name in the Deployment shape: `<deployment>-<template hash>-<suffix>`.
pub fn pod_name(deployment: &str, index: usize) -> String {
    let seed = deployment.as_bytes();
    format!("{deployment}-{}-{}", names::generated(seed, 0, 10), names::generated(seed, index as u64 + 1, 5))
}

impl Canary {
    pub fn build(cluster: &Cluster) -> Result<Self> {
        Self::build_with(cluster, None)
    }

    /// [`Canary::build`]; with `create_pod`, each Pod object is created through it first and the
    /// pod takes the UID it returns (a real API server's, as [`crate::controllers::World::build`]
    /// does). The Namespace must exist there already.
    pub fn build_with(cluster: &Cluster, create_pod: Option<&CreatePod<'_>>) -> Result<Self> {
        let add_pod = |node: u8, name: &str, labels: &[(&str, &str)]| -> Result<Arc<Pod>> {
            let uid = match create_pod {
                Some(create) => {
                    let node_name = &cluster.node(node).name;
                    Some(create(&objects::pod_to_create(NAMESPACE, name, node_name, labels))?)
                }
                None => None,
            };
            cluster.add_pod_with_uid(node, NAMESPACE, name, uid.as_deref())
        };
        let mut backends = Vec::new();
        let mut objects = format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {NAMESPACE}, labels: {{gammaray.dev/dataplane-mode: ambient}}}}\n"
        );
        for n in cluster.nodes() {
            objects.push_str(&objects::node(&n.name, n.ip));
        }
        let layout: [(&str, &str, u8); 5] = [
            ("backend-v1", "v1", 1),
            ("backend-v1", "v1", 2),
            ("backend-v1", "v1", 1),
            ("backend-v2", "v2", 2),
            ("backend-v2", "v2", 1),
        ];
        for (i, (deployment, version, node)) in layout.iter().enumerate() {
            let name = pod_name(deployment, i);
            let labels = [("app", "backend"), ("version", *version)];
            let pod = add_pod(*node, &name, &labels)?;
            let listener = pod
                .run(|| std::net::TcpListener::bind((pod.ip, TARGET_PORT)))?
                .map_err(|e| crate::Error::Other(format!("bind {name}: {e}")))?;
            let server = HttpBackend::start(listener, &name, &format!("hello from backend {version}"))
                .map_err(|e| crate::Error::Other(format!("serve {name}: {e}")))?;
            objects.push_str(&objects::pod(&pod, &labels));
            backends.push((pod, server));
        }
        let client = add_pod(1, &pod_name("client", 0), &[("app", "client")])?;
        objects.push_str(&objects::pod(&client, &[("app", "client")]));
        let select = |prefix: &str| -> Vec<&Pod> {
            backends.iter().map(|(p, _)| p.as_ref()).filter(|p| p.name.starts_with(prefix)).collect()
        };
        for (name, vip, prefix) in [
            ("backend", BACKEND_VIP, "backend-v"),
            ("backend-v1", BACKEND_V1_VIP, "backend-v1"),
            ("backend-v2", BACKEND_V2_VIP, "backend-v2"),
        ] {
            objects.push_str(&objects::service(
                NAMESPACE,
                name,
                vip,
                80,
                TARGET_PORT,
                Some("http"),
                &select(prefix),
            ));
        }
        Ok(Self { client, backends, objects })
    }

    /// The canary HTTPRoute on `backend` with these weights for v1 and v2.
    pub fn route(v1: u32, v2: u32) -> String {
        objects::weighted_route(
            NAMESPACE,
            "backend-canary",
            "backend",
            &[("backend-v1", v1), ("backend-v2", v2)],
        )
    }
}
