//! The GAMMA conformance catalogue (`schema: gamma-catalogue/v1`): cases read from a directory
//! that holds `cases/*.yaml` with their base manifests beside them. The project reads it from
//! `../shared/conformance` (or `GAMMARAY_CONFORMANCE_DIR`); it is never copied in.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct Case {
    pub schema: String,
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub features: Vec<String>,
    #[serde(default)]
    pub profiles: BTreeMap<String, String>,
    pub base: String,
    #[serde(default)]
    pub manifests: Vec<serde_json::Value>,
    #[serde(default)]
    pub requests: Vec<Request>,
    pub distribution: Option<Distribution>,
    #[serde(default)]
    pub upstream: Upstream,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Upstream {
    #[serde(default)]
    pub provisional: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Request {
    pub id: u32,
    #[serde(default)]
    pub upstream_subtest: String,
    pub client: Client,
    pub protocol: String,
    pub url: String,
    pub grpc_method: Option<String>,
    pub destination: Destination,
    pub path: Option<String>,
    pub method: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub expect: Expect,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Client {
    pub namespace: String,
    #[serde(default)]
    pub pod_selector: BTreeMap<String, String>,
    pub workload: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Destination {
    pub kind: String,
    /// `namespace/name` of the Service, for `kind: service`.
    pub service: Option<String>,
    /// `namespace/workload` of the pod, for `kind: pod`.
    pub pod: Option<String>,
    pub port: u16,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Expect {
    #[serde(default = "ok_status")]
    pub status: Vec<u16>,
    pub backend: Option<String>,
    pub backend_namespace: Option<String>,
    #[serde(default)]
    pub response_headers: BTreeMap<String, String>,
    #[serde(default)]
    pub absent_response_headers: Vec<String>,
    pub backend_request: Option<BackendRequest>,
    pub redirect: Option<RedirectExpect>,
}

impl Default for Expect {
    fn default() -> Self {
        Self {
            status: ok_status(),
            backend: None,
            backend_namespace: None,
            response_headers: BTreeMap::new(),
            absent_response_headers: Vec::new(),
            backend_request: None,
            redirect: None,
        }
    }
}

fn ok_status() -> Vec<u16> {
    vec![200]
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct BackendRequest {
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub absent_headers: Vec<String>,
    pub path: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RedirectExpect {
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: Option<String>,
    pub path: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Distribution {
    pub request: u32,
    pub batch_size: usize,
    pub expected_fractions: BTreeMap<String, f64>,
    pub tolerance: f64,
    #[serde(default = "one")]
    pub attempts: u32,
}

fn one() -> u32 {
    1
}

/// Where the catalogue lives: `GAMMARAY_CONFORMANCE_DIR`, else the first `shared/conformance`
/// found going up from the working directory (the checkout sits beside `shared/`).
pub fn default_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("GAMMARAY_CONFORMANCE_DIR") {
        return PathBuf::from(dir);
    }
    let start = std::env::current_dir().unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    start
        .ancestors()
        .map(|a| a.join("shared/conformance"))
        .find(|p| p.join("cases").is_dir())
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance"))
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogueError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Parse { path: PathBuf, source: serde_yaml::Error },
    #[error("{path}: unsupported schema {schema:?}")]
    Schema { path: PathBuf, schema: String },
}

/// Every case in `dir/cases`, sorted by file name.
pub fn load_cases(dir: &Path) -> Result<Vec<(PathBuf, Case)>, CatalogueError> {
    let cases_dir = dir.join("cases");
    let entries = std::fs::read_dir(&cases_dir)
        .map_err(|source| CatalogueError::Read { path: cases_dir.clone(), source })?;
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path)
                .map_err(|source| CatalogueError::Read { path: path.clone(), source })?;
            let case: Case = serde_yaml::from_str(&text)
                .map_err(|source| CatalogueError::Parse { path: path.clone(), source })?;
            if case.schema != "gamma-catalogue/v1" {
                return Err(CatalogueError::Schema { path, schema: case.schema });
            }
            Ok((path, case))
        })
        .collect()
}

/// A case's base manifests: its `base` file, and `base-synthetic.yaml` if the directory has one
/// (the cluster-made objects: Pods, EndpointSlices, ClusterIPs).
pub fn base_texts(dir: &Path, case: &Case) -> Result<Vec<String>, CatalogueError> {
    let mut texts = Vec::new();
    for name in [case.base.as_str(), "base-synthetic.yaml"] {
        let path = dir.join(name);
        if name == "base-synthetic.yaml" && !path.exists() {
            continue;
        }
        texts.push(std::fs::read_to_string(&path).map_err(|source| CatalogueError::Read { path, source })?);
    }
    Ok(texts)
}

/// ClusterIP assignments from a `ServiceClusterIPAssignments` document: `namespace/name` → IPs.
pub fn cluster_ip_assignments(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let Ok(value) = serde_json::Value::deserialize(doc) else {
            continue;
        };
        if value.get("kind").and_then(|k| k.as_str()) != Some("ServiceClusterIPAssignments") {
            continue;
        }
        for item in value.get("items").and_then(|i| i.as_array()).into_iter().flatten() {
            let Some(service) = item.get("service").and_then(|s| s.as_str()) else {
                continue;
            };
            let ips = item
                .get("spec.clusterIPs")
                .and_then(|i| i.as_array())
                .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            out.insert(service.to_owned(), ips);
        }
    }
    out
}

impl Case {
    /// The level the suite would report it under, e.g. "HTTP core, GRPC core", or "—" when
    /// its features put it under no profile; "provisional" is appended for provisional tests.
    pub fn level(&self) -> String {
        let mut parts: Vec<String> = self
            .profiles
            .iter()
            .map(|(profile, level)| format!("{} {level}", profile.strip_prefix("MESH-").unwrap_or(profile)))
            .collect();
        if parts.is_empty() {
            parts.push("—".into());
        }
        let mut level = parts.join(", ");
        if self.upstream.provisional {
            level.push_str(" (provisional)");
        }
        level
    }
}

/// What one request produced, as the echo client and the echo backend report it.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// HTTP status; gRPC OK is 200.
    pub status: u16,
    /// The pod name of the backend that answered (`Hostname=`).
    pub backend: Option<String>,
    /// The namespace of the backend that answered.
    pub backend_namespace: Option<String>,
    /// The request headers the backend saw.
    pub request_headers: http::HeaderMap,
    /// The request-target the backend saw (path and query), when the protocol reports it.
    pub request_path: Option<String>,
    pub response_headers: http::HeaderMap,
}

/// All values of header `name` (case-insensitive), joined with "," as the upstream harness does.
pub fn joined(headers: &http::HeaderMap, name: &str) -> Option<String> {
    let values: Vec<&str> =
        headers.get_all(name.to_ascii_lowercase().as_str()).iter().filter_map(|v| v.to_str().ok()).collect();
    (!values.is_empty()).then(|| values.join(","))
}

/// Checks an outcome against the request's expectations, returning what is wrong (empty when it
/// passes). Besides what upstream's mesh harness checks (status, backend prefix, headers seen by
/// the backend, response headers), it also enforces what upstream declares but leaves unchecked:
/// the path the backend saw, the redirect's Location and the backend's namespace.
pub fn check(req: &Request, out: &Outcome) -> Vec<String> {
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
    if let Some(ns) = &e.backend_namespace
        && out.status == 200
        && out.backend_namespace.as_deref() != Some(ns.as_str())
    {
        wrong.push(format!("backend namespace {:?}, expected {ns}", out.backend_namespace));
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
        if let (Some(path), Some(seen)) = (&br.path, &out.request_path)
            && out.status == 200
            && seen != path
        {
            wrong.push(format!("backend saw path {seen:?}, expected {path:?}"));
        }
    }
    if let Some(r) = &e.redirect {
        match joined(&out.response_headers, "location") {
            None => wrong.push("no Location header".into()),
            Some(location) => wrong.extend(check_location(req, r, &location)),
        }
    }
    wrong
}

/// Checks a redirect's Location, defaulting unset fields the way the upstream gateway harness
/// does: scheme = the request's, path = the request's, port = none or the scheme's default.
fn check_location(req: &Request, r: &RedirectExpect, location: &str) -> Vec<String> {
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

/// The Deployment a pod belongs to, as the weight tests derive it: the pod name minus its last
/// two `-` segments (`echo-v1-5c7d8f9b6d-abcde` → `echo-v1`).
pub fn deployment_of(pod: &str) -> String {
    let parts: Vec<&str> = pod.split('-').collect();
    parts[..parts.len().saturating_sub(2)].join("-")
}

/// Judges one batch of a weight test: `counts` maps the backend (a Deployment name, or some
/// label for a failed request) to how many of the batch it answered. Returns what is wrong.
pub fn check_distribution(d: &Distribution, counts: &BTreeMap<String, usize>) -> Vec<String> {
    let mut wrong = Vec::new();
    for (backend, n) in counts {
        if !d.expected_fractions.contains_key(backend) {
            wrong.push(format!("{n} answers from unexpected {backend}"));
        }
    }
    for (backend, want) in &d.expected_fractions {
        let n = *counts.get(backend).unwrap_or(&0);
        let got = n as f64 / d.batch_size as f64;
        if (got - want).abs() > d.tolerance {
            wrong.push(format!("{backend}: {got:.3} of the batch, expected {want} ± {}", d.tolerance));
        }
        if *want > 0.0 && n == 0 {
            wrong.push(format!("{backend} has weight but was never seen"));
        }
        if *want == 0.0 && n > 0 {
            wrong.push(format!("{backend} has no weight but answered {n}"));
        }
    }
    wrong
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(expect: &str) -> Request {
        serde_yaml::from_str(&format!(
            "id: 0\nclient: {{namespace: ns, workload: echo-v1}}\nprotocol: http\nurl: http://echo/a\npath: /a\ndestination: {{kind: service, service: ns/echo, port: 80}}\nexpect: {expect}\n"
        ))
        .expect("request parses")
    }

    fn outcome(status: u16, backend: &str) -> Outcome {
        Outcome {
            status,
            backend: Some(backend.into()),
            backend_namespace: Some("ns".into()),
            request_path: Some("/a".into()),
            ..Outcome::default()
        }
    }

    #[test]
    fn a_matching_outcome_passes_and_each_kind_of_mismatch_is_named() {
        let req = request(
            "{status: [200], backend: echo-v2, backend_namespace: ns, response_headers: {X-Set: 'on'}, backend_request: {headers: {X-Add: 'a,b'}, absent_headers: [X-Gone], path: /a}}",
        );
        let mut ok = outcome(200, "echo-v2-5c7d8f9b6d-abcde");
        ok.response_headers.insert("x-set", "on".parse().expect("value"));
        ok.request_headers.append("x-add", "a".parse().expect("value"));
        ok.request_headers.append("x-add", "b".parse().expect("value"));
        assert_eq!(check(&req, &ok), Vec::<String>::new());

        let mut bad = ok.clone();
        bad.status = 404;
        bad.backend = Some("echo-v1-5c7d8f9b6d-abcde".into());
        bad.backend_namespace = Some("other".into());
        bad.response_headers.clear();
        bad.request_headers.insert("x-gone", "1".parse().expect("value"));
        bad.request_path = Some("/b".into());
        bad.request_headers.insert("x-add", "a".parse().expect("value"));
        let wrong = check(&req, &bad);
        for needle in ["status 404", "does not start with echo-v2", "response header X-Set", "X-Gone"] {
            assert!(wrong.iter().any(|w| w.contains(needle)), "{needle} missing from {wrong:?}");
        }
        bad.status = 200;
        let wrong = check(&req, &bad);
        for needle in ["namespace", "path \"/b\"", "X-Add"] {
            assert!(wrong.iter().any(|w| w.contains(needle)), "{needle} missing from {wrong:?}");
        }
    }

    #[test]
    fn redirect_locations_are_checked_with_upstream_defaults() {
        let req = request("{status: [302], redirect: {host: example.org}}");
        let mut out = outcome(302, "");
        out.response_headers.insert("location", "http://example.org/a".parse().expect("value"));
        assert!(check(&req, &out).is_empty());
        out.response_headers.insert("location", "http://example.org:80/a".parse().expect("value"));
        assert!(check(&req, &out).is_empty(), ":80 is the http default");
        out.response_headers.insert("location", "https://example.org:8443/b".parse().expect("value"));
        let wrong = check(&req, &out);
        assert_eq!(wrong.len(), 3, "scheme, port and path are all wrong: {wrong:?}");
        out.response_headers.clear();
        assert_eq!(check(&req, &out), vec!["no Location header".to_owned()]);
    }

    #[test]
    fn distributions_need_every_weighted_backend_within_tolerance() {
        let d: Distribution = serde_yaml::from_str(
            "{request: 0, batch_size: 100, expected_fractions: {echo-v1: 0.7, echo-v2: 0.3, echo-v3: 0.0}, tolerance: 0.05}",
        )
        .expect("distribution parses");
        let counts = |v1, v2, other: &[(&str, usize)]| {
            let mut c: BTreeMap<String, usize> =
                BTreeMap::from([("echo-v1".into(), v1), ("echo-v2".into(), v2)]);
            c.extend(other.iter().map(|(k, n)| (k.to_string(), *n)));
            c
        };
        assert!(check_distribution(&d, &counts(72, 28, &[])).is_empty());
        assert!(!check_distribution(&d, &counts(80, 20, &[])).is_empty(), "outside tolerance");
        assert!(!check_distribution(&d, &counts(70, 28, &[("status 500", 2)])).is_empty(), "failures");
        assert!(!check_distribution(&d, &counts(70, 29, &[("echo-v3", 1)])).is_empty(), "weight 0 seen");
        assert_eq!(deployment_of("echo-v1-5c7d8f9b6d-abcde"), "echo-v1");
    }

    #[test]
    fn levels_follow_the_profiles() {
        let mut case: Case = serde_yaml::from_str(
            "{schema: gamma-catalogue/v1, name: T, base: base.yaml, profiles: {MESH-HTTP: core, MESH-GRPC: core}}",
        )
        .expect("case parses");
        assert_eq!(case.level(), "GRPC core, HTTP core");
        case.profiles.clear();
        case.upstream.provisional = true;
        assert_eq!(case.level(), "— (provisional)");
    }
}
