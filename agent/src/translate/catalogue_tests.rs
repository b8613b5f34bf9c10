//! Every request of every case of the GAMMA conformance catalogue, as a routing decision: the
//! case's objects go through [`translate`], the request through [`decide`], and the outcome
//! (status, backend, headers the backend would see, response headers, Location, rewritten
//! path) is checked, including what upstream declares but does not enforce.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use gammaray_proxy::{
    route::{Decision, RequestView, decide},
    snapshot::{Endpoint, Snapshot},
};
use gammaray_testkit::catalogue::{self, Case, Outcome, Request, check, check_distribution, deployment_of};
use http::{HeaderMap, HeaderName, HeaderValue, Method};

use super::{Options, translate};
use crate::store::Store;

fn world(dir: &Path, case: &Case) -> Store {
    let mut store = Store::default();
    let bases = catalogue::base_texts(dir, case).expect("base manifests readable");
    for text in &bases {
        let applied = store.apply_yaml(text);
        assert!(applied.errors.is_empty(), "{}: base manifests: {:?}", case.name, applied.errors);
    }
    for text in &bases {
        for (service, ips) in catalogue::cluster_ip_assignments(text) {
            let (ns, name) = service.split_once('/').expect("namespace/name");
            let svc = store.services.get_mut(&crate::store::key(ns, name)).expect("assigned Service exists");
            let spec = std::sync::Arc::make_mut(svc).spec.get_or_insert_default();
            spec.cluster_ip = ips.first().cloned();
            spec.cluster_ips = Some(ips);
        }
    }
    for (i, m) in case.manifests.iter().enumerate() {
        store.apply_value(i, m.clone()).unwrap_or_else(|e| panic!("{}: manifest {i}: {e}", case.name));
    }
    store
}

fn cluster_ip(store: &Store, service: &str) -> IpAddr {
    let (ns, name) = service.split_once('/').expect("namespace/name");
    let svc = store.services.get(&crate::store::key(ns, name)).expect("destination Service exists");
    svc.spec.as_ref().and_then(|s| s.cluster_ip.as_ref()).and_then(|ip| ip.parse().ok()).expect("ClusterIP")
}

fn pod_ip(snapshot: &Snapshot, workload: &str) -> IpAddr {
    let (ns, prefix) = workload.split_once('/').expect("namespace/workload");
    let mut pods: Vec<_> = snapshot
        .workloads
        .iter()
        .filter(|(_, w)| *w.pod.namespace == *ns && w.pod.name.starts_with(&format!("{prefix}-")))
        .collect();
    pods.sort_by(|a, b| a.1.pod.name.cmp(&b.1.pod.name));
    pods.first().unwrap_or_else(|| panic!("a pod of {workload}")).0
}

fn send(store: &Store, snapshot: &Snapshot, req: &Request, random: u64) -> Outcome {
    let (scheme, rest) = req.url.split_once("://").expect("URL with scheme");
    let authority = rest.split('/').next().unwrap_or("");
    let url_host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    let mut headers = HeaderMap::new();
    let mut host = url_host.to_owned();
    for (name, value) in &req.headers {
        if name.eq_ignore_ascii_case("host") {
            host = value.clone();
            continue;
        }
        headers.append(
            HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).expect("header name"),
            HeaderValue::from_str(value).expect("header value"),
        );
    }
    let grpc = req.protocol == "grpc";
    let target = if grpc {
        req.grpc_method.clone().expect("grpc method")
    } else {
        req.path.clone().unwrap_or_else(|| "/".into())
    };
    let (path, query) = target.split_once('?').map_or((target.as_str(), None), |(p, q)| (p, Some(q)));
    let method =
        if grpc { Method::POST } else { req.method.as_deref().unwrap_or("GET").parse().expect("method") };
    let view = RequestView {
        method: &method,
        scheme: if scheme == "grpc" { "http" } else { scheme },
        host: Some(&host),
        path,
        query,
        headers: &headers,
    };
    let dst = match req.destination.kind.as_str() {
        "service" => SocketAddr::new(
            cluster_ip(store, req.destination.service.as_deref().expect("service")),
            req.destination.port,
        ),
        "pod" => SocketAddr::new(
            pod_ip(snapshot, req.destination.pod.as_deref().expect("pod")),
            req.destination.port,
        ),
        other => panic!("unknown destination kind {other}"),
    };
    let pick = |endpoints: &[Endpoint]| -> (Option<String>, Option<String>) {
        let pod = endpoints.get((random as usize) % endpoints.len().max(1)).and_then(|e| e.pod());
        (pod.map(|p| p.name.to_string()), pod.map(|p| p.namespace.to_string()))
    };
    let Some(frontend) = snapshot.frontend(dst) else {
        // Not a Service frontend: the mesh passes it to that address untouched.
        let pod = snapshot.workloads.get(&dst.ip()).map(|w| &w.pod);
        return Outcome {
            status: if pod.is_some() { 200 } else { 503 },
            backend: pod.map(|p| p.name.to_string()),
            backend_namespace: pod.map(|p| p.namespace.to_string()),
            request_headers: headers.clone(),
            request_path: Some(target.clone()),
            response_headers: HeaderMap::new(),
        };
    };
    match decide(frontend, Some(&req.client.namespace), &view, random) {
        Decision::Passthrough(b) => {
            let (backend, backend_namespace) = pick(&b.endpoints);
            Outcome {
                status: if b.endpoints.is_empty() { 503 } else { 200 },
                backend,
                backend_namespace,
                request_headers: headers.clone(),
                request_path: Some(target.clone()),
                response_headers: HeaderMap::new(),
            }
        }
        Decision::Forward(f) => {
            let mut request_headers = headers.clone();
            f.apply_request_headers(&mut request_headers);
            let mut response_headers = HeaderMap::new();
            f.apply_response_headers(&mut response_headers);
            let mut request_path = f.rewritten_path(path).unwrap_or_else(|| path.to_owned());
            if let Some(q) = query {
                request_path = format!("{request_path}?{q}");
            }
            let (backend, backend_namespace) = pick(&f.backend.endpoints);
            Outcome {
                status: if f.backend.endpoints.is_empty() { 503 } else { 200 },
                backend,
                backend_namespace,
                request_headers,
                request_path: Some(request_path),
                response_headers,
            }
        }
        Decision::Respond(r) => {
            let mut response_headers = HeaderMap::new();
            for (n, v) in r.headers {
                response_headers.insert(n, v);
            }
            Outcome {
                status: r.status,
                request_headers: headers,
                request_path: Some(target),
                response_headers,
                ..Outcome::default()
            }
        }
    }
}

#[test]
fn every_catalogue_request_routes_as_expected() {
    let dir = catalogue::default_dir();
    let cases = catalogue::load_cases(&dir)
        .unwrap_or_else(|e| panic!("the conformance catalogue must be readable at {} ({e})", dir.display()));
    assert!(cases.len() >= 23, "expected the 23 catalogue cases in {}, found {}", dir.display(), cases.len());
    let mut failures = Vec::new();
    let mut checked = 0;
    for (path, case) in &cases {
        let store = world(&dir, case);
        let t = translate(&store, &Options::default());
        let mut rng = fastrand::Rng::with_seed(7);
        for req in &case.requests {
            let out = send(&store, &t.snapshot, req, rng.u64(..));
            checked += 1;
            for w in check(req, &out) {
                failures.push(format!("{} request {} ({}): {w}", case.name, req.id, req.upstream_subtest));
            }
        }
        if let Some(d) = &case.distribution {
            let req = case.requests.iter().find(|r| r.id == d.request).expect("distribution request exists");
            let passed = (0..d.attempts).any(|_| {
                let mut counts: BTreeMap<String, usize> = BTreeMap::new();
                for _ in 0..d.batch_size {
                    let out = send(&store, &t.snapshot, req, rng.u64(..));
                    let backend = out
                        .backend
                        .as_deref()
                        .map(deployment_of)
                        .unwrap_or_else(|| format!("status {}", out.status));
                    *counts.entry(backend).or_default() += 1;
                }
                check_distribution(d, &counts).is_empty()
            });
            if !passed {
                failures.push(format!(
                    "{}: distribution outside ±{} of {:?}",
                    case.name, d.tolerance, d.expected_fractions
                ));
            }
        }
        let _ = path;
    }
    assert!(failures.is_empty(), "{} of {checked} requests failed:\n{}", failures.len(), failures.join("\n"));
    assert!(checked >= 85, "only {checked} requests checked");
}

#[test]
fn catalogue_routes_get_accepted_status_with_our_controller_name() {
    let dir = catalogue::default_dir();
    for (_, case) in catalogue::load_cases(&dir).expect("catalogue") {
        let store = world(&dir, &case);
        let t = translate(&store, &Options::default());
        for status in &t.statuses {
            for parent in &status.parents {
                assert_eq!(parent.controller_name, "gammaray.dev/mesh");
                let accepted = parent.condition("Accepted").expect("Accepted condition");
                assert_eq!(accepted.status, "True", "{}: {} {:?}", case.name, status.route, accepted);
                let resolved = parent.condition("ResolvedRefs").expect("ResolvedRefs condition");
                // MeshGRPCRouteWeight names the nonexistent echo-v3 (weight 0).
                if case.name == "MeshGRPCRouteWeight" {
                    assert_eq!(resolved.reason, "BackendNotFound");
                } else {
                    assert_eq!(resolved.status, "True", "{}: {} {:?}", case.name, status.route, resolved);
                }
            }
        }
    }
}
