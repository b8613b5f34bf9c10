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
use gammaray_testkit::catalogue::{self, Case, Request};
use http::{HeaderMap, HeaderName, HeaderValue, Method};

use super::{Options, translate};
use crate::store::Store;

/// What a request produced, as an echo backend and client would report it.
#[derive(Debug)]
struct Outcome {
    status: u16,
    /// Pod name of the backend that answered.
    backend: Option<String>,
    request_headers: HeaderMap,
    request_path: String,
    response_headers: HeaderMap,
}

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
            let svc =
                store.services.get_mut(&(ns.to_owned(), name.to_owned())).expect("assigned Service exists");
            let spec = svc.spec.get_or_insert_default();
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
    let svc = store.services.get(&(ns.to_owned(), name.to_owned())).expect("destination Service exists");
    svc.spec.as_ref().and_then(|s| s.cluster_ip.as_ref()).and_then(|ip| ip.parse().ok()).expect("ClusterIP")
}

fn pod_ip(snapshot: &Snapshot, workload: &str) -> IpAddr {
    let (ns, prefix) = workload.split_once('/').expect("namespace/workload");
    let mut pods: Vec<_> = snapshot
        .workloads
        .iter()
        .filter(|(_, w)| w.pod.namespace == ns && w.pod.name.starts_with(&format!("{prefix}-")))
        .collect();
    pods.sort_by(|a, b| a.1.pod.name.cmp(&b.1.pod.name));
    *pods.first().unwrap_or_else(|| panic!("a pod of {workload}")).0
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
    let pick = |endpoints: &[Endpoint]| -> Option<String> {
        let e = endpoints.get((random as usize) % endpoints.len().max(1))?;
        e.pod.as_ref().map(|p| p.name.clone())
    };
    let Some(frontend) = snapshot.frontend(dst) else {
        // Not a Service frontend: the mesh passes it to that address untouched.
        let backend = snapshot.workloads.get(&dst.ip()).map(|w| w.pod.name.clone());
        return Outcome {
            status: if backend.is_some() { 200 } else { 503 },
            backend,
            request_headers: headers.clone(),
            request_path: target.clone(),
            response_headers: HeaderMap::new(),
        };
    };
    match decide(frontend, Some(&req.client.namespace), &view, random) {
        Decision::Passthrough(b) => Outcome {
            status: if b.endpoints.is_empty() { 503 } else { 200 },
            backend: pick(&b.endpoints),
            request_headers: headers.clone(),
            request_path: target.clone(),
            response_headers: HeaderMap::new(),
        },
        Decision::Forward(f) => {
            let mut request_headers = headers.clone();
            f.apply_request_headers(&mut request_headers);
            let mut response_headers = HeaderMap::new();
            f.apply_response_headers(&mut response_headers);
            let mut request_path = f.rewritten_path(path).unwrap_or_else(|| path.to_owned());
            if let Some(q) = query {
                request_path = format!("{request_path}?{q}");
            }
            Outcome {
                status: if f.backend.endpoints.is_empty() { 503 } else { 200 },
                backend: pick(&f.backend.endpoints),
                request_headers,
                request_path,
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
                backend: None,
                request_headers: headers,
                request_path: target,
                response_headers,
            }
        }
    }
}

fn joined(headers: &HeaderMap, name: &str) -> Option<String> {
    let values: Vec<&str> =
        headers.get_all(name.to_ascii_lowercase().as_str()).iter().filter_map(|v| v.to_str().ok()).collect();
    (!values.is_empty()).then(|| values.join(","))
}

/// Checks one outcome against the request's expectations; returns what is wrong.
fn check(req: &Request, out: &Outcome) -> Vec<String> {
    let mut wrong = Vec::new();
    let e = &req.expect;
    if !e.status.contains(&out.status) {
        wrong.push(format!("status {} not in {:?}", out.status, e.status));
    }
    if let Some(backend) = &e.backend
        && !out.backend.as_deref().is_some_and(|b| b.starts_with(backend.as_str()))
    {
        wrong.push(format!("backend {:?} does not start with {backend}", out.backend));
    }
    for (name, value) in &e.response_headers {
        let got = joined(&out.response_headers, name);
        if got.as_deref() != Some(value.as_str()) {
            wrong.push(format!("response header {name}: {got:?}, expected {value:?}"));
        }
    }
    for name in &e.absent_response_headers {
        if out.response_headers.contains_key(name.to_ascii_lowercase().as_str()) {
            wrong.push(format!("response header {name} should be absent"));
        }
    }
    if let Some(br) = &e.backend_request {
        for (name, value) in &br.headers {
            let got = joined(&out.request_headers, name);
            if got.as_deref() != Some(value.as_str()) {
                wrong.push(format!("backend saw header {name}: {got:?}, expected {value:?}"));
            }
        }
        for name in &br.absent_headers {
            if out.request_headers.contains_key(name.to_ascii_lowercase().as_str()) {
                wrong.push(format!("backend header {name} should be absent"));
            }
        }
        // Stricter than upstream: the path the backend saw.
        if let Some(path) = &br.path
            && out.status == 200
            && &out.request_path != path
        {
            wrong.push(format!("backend saw path {:?}, expected {path:?}", out.request_path));
        }
    }
    // Stricter than upstream: the redirect's Location.
    if let Some(r) = &e.redirect {
        match joined(&out.response_headers, "location") {
            None => wrong.push("no Location header".into()),
            Some(location) => wrong.extend(check_location(req, r, &location)),
        }
    }
    wrong
}

fn check_location(req: &Request, r: &catalogue::RedirectExpect, location: &str) -> Vec<String> {
    let mut wrong = Vec::new();
    let (scheme, rest) = location.split_once("://").unwrap_or(("", location));
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let path = path.split('?').next().unwrap_or("");
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (authority, None),
    };
    let want_scheme = r.scheme.as_deref().unwrap_or("http");
    if scheme != want_scheme {
        wrong.push(format!("Location scheme {scheme:?}, expected {want_scheme:?}"));
    }
    if let Some(h) = &r.host
        && host != h
    {
        wrong.push(format!("Location host {host:?}, expected {h:?}"));
    }
    let default_port = if want_scheme == "https" { "443" } else { "80" };
    match (&r.port, port) {
        (Some(p), Some(got)) if p != got => wrong.push(format!("Location port {got}, expected {p}")),
        (Some(p), None) if p != default_port => wrong.push(format!("Location has no port, expected {p}")),
        (None, Some(got)) if got != default_port => {
            wrong.push(format!("Location port {got}, expected none or {default_port}"))
        }
        _ => {}
    }
    let want_path = r.path.clone().unwrap_or_else(|| req.path.clone().unwrap_or_else(|| "/".into()));
    if path != want_path {
        wrong.push(format!("Location path {path:?}, expected {want_path:?}"));
    }
    wrong
}

/// `echo-v1-5c7d8f9b6d-abcde` → `echo-v1`.
fn deployment_of(pod: &str) -> String {
    let parts: Vec<&str> = pod.split('-').collect();
    parts[..parts.len().saturating_sub(2)].join("-")
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
                counts.keys().all(|b| d.expected_fractions.contains_key(b))
                    && d.expected_fractions.iter().all(|(b, want)| {
                        let got = *counts.get(b).unwrap_or(&0) as f64 / d.batch_size as f64;
                        (got - want).abs() <= d.tolerance && (*want == 0.0 || got > 0.0)
                    })
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
