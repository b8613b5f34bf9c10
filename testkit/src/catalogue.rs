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
