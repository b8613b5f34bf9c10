//! Every manifest in `deploy/`, read with the upstream Kubernetes and Gateway API types: a field
//! the types do not know fails the test (it would be dropped silently by the API server's
//! decoder or mean a typo). The DaemonSet's arguments must parse as the agent's own command line,
//! and the RBAC must grant what the agent does.

use std::path::{Path, PathBuf};

use clap::Parser as _;
use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment},
    core::v1::{Namespace, Service, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding},
};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::Value;

use gammaray_agent::cli::{Cli, Command};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("deploy/ readable").flatten() {
        let path = entry.path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

/// Paths of fields in `original` that `decoded` lost or changed.
fn lost_fields(original: &Value, decoded: &Value, path: &str, out: &mut Vec<String>) {
    match (original, decoded) {
        (Value::Object(o), Value::Object(d)) => {
            for (k, v) in o {
                match d.get(k) {
                    Some(dv) => lost_fields(v, dv, &format!("{path}.{k}"), out),
                    None if v.is_null() => {}
                    None => out.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(o), Value::Array(d)) if o.len() == d.len() => {
            for (i, (ov, dv)) in o.iter().zip(d).enumerate() {
                lost_fields(ov, dv, &format!("{path}[{i}]"), out);
            }
        }
        (o, d) if o == d => {}
        // Numbers written as strings and back (ports, quantities) compare by text.
        (o, d) if o.to_string().trim_matches('"') == d.to_string().trim_matches('"') => {}
        _ => out.push(format!("{path} (was {original}, decoded as {decoded})")),
    }
}

fn strict<T: DeserializeOwned + serde::Serialize>(value: &Value, what: &str) -> Result<T, String> {
    let typed: T = serde_json::from_value(value.clone()).map_err(|e| format!("{what}: {e}"))?;
    let back = serde_json::to_value(&typed).map_err(|e| format!("{what}: {e}"))?;
    let mut lost = Vec::new();
    lost_fields(value, &back, "", &mut lost);
    if lost.is_empty() { Ok(typed) } else { Err(format!("{what}: unknown or mistyped fields {lost:?}")) }
}

struct Manifests {
    daemonsets: Vec<DaemonSet>,
    cluster_roles: Vec<ClusterRole>,
    roles: Vec<Role>,
    count: usize,
}

fn read_all() -> Manifests {
    let mut files = Vec::new();
    yaml_files(&deploy_dir(), &mut files);
    files.sort();
    let mut m = Manifests { daemonsets: Vec::new(), cluster_roles: Vec::new(), roles: Vec::new(), count: 0 };
    let mut errors = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("readable");
        for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let value = Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            if value.is_null() {
                continue;
            }
            let what = format!("{} document {i}", file.display());
            let kind = value["kind"].as_str().unwrap_or("");
            let result: Result<(), String> = match (value["apiVersion"].as_str().unwrap_or(""), kind) {
                ("v1", "Namespace") => strict::<Namespace>(&value, &what).map(drop),
                ("v1", "ServiceAccount") => strict::<ServiceAccount>(&value, &what).map(drop),
                ("v1", "Service") => strict::<Service>(&value, &what).map(drop),
                ("apps/v1", "Deployment") => strict::<Deployment>(&value, &what).map(drop),
                ("apps/v1", "DaemonSet") => strict::<DaemonSet>(&value, &what).map(|d| m.daemonsets.push(d)),
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                    strict::<ClusterRole>(&value, &what).map(|r| m.cluster_roles.push(r))
                }
                ("rbac.authorization.k8s.io/v1", "Role") => {
                    strict::<Role>(&value, &what).map(|r| m.roles.push(r))
                }
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    strict::<ClusterRoleBinding>(&value, &what).map(drop)
                }
                ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
                    strict::<RoleBinding>(&value, &what).map(drop)
                }
                ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => strict::<
                    k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
                >(&value, &what)
                .map(drop),
                ("gateway.networking.k8s.io/v1", "HTTPRoute") => {
                    strict::<gateway_api::httproutes::HttpRoute>(&value, &what).map(drop)
                }
                ("gateway.networking.k8s.io/v1", "GRPCRoute") => {
                    strict::<gateway_api::grpcroutes::GrpcRoute>(&value, &what).map(drop)
                }
                ("kustomize.config.k8s.io/v1beta1", "Kustomization") => {
                    let dir = file.parent().expect("dir");
                    value["resources"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .find(|r| !dir.join(r).exists())
                        .map_or(Ok(()), |r| Err(format!("{what}: resource {r} does not exist")))
                }
                (api, kind) => Err(format!("{what}: no upstream type checked for {api} {kind}")),
            };
            match result {
                Ok(()) => m.count += 1,
                Err(e) => errors.push(e),
            }
        }
    }
    assert!(errors.is_empty(), "deploy/ manifests:\n{}", errors.join("\n"));
    m
}

#[test]
fn every_deploy_manifest_parses_with_the_upstream_types() {
    let m = read_all();
    assert!(m.count >= 15, "only {} manifests read", m.count);
    assert_eq!(m.daemonsets.len(), 1);
}

#[test]
fn lost_fields_are_reported() {
    let original =
        serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x", "lables": {}}});
    let err = strict::<Namespace>(&original, "typo").expect_err("a typo'd field fails");
    assert!(err.contains(".metadata.lables"), "{err}");
}

/// `$(VAR)` references replaced by sample values, as the kubelet expands them.
fn expand(arg: &str) -> String {
    arg.replace("$(NODE_NAME)", "node1")
        .replace("$(NODE_IP)", "10.0.0.1")
        .replace("$(POD_NAMESPACE)", "gammaray-system")
}

#[test]
fn the_daemonset_runs_the_agent_with_valid_arguments_and_only_the_capabilities_it_needs() {
    let m = read_all();
    let ds = &m.daemonsets[0];
    let pod = ds.spec.as_ref().and_then(|s| s.template.spec.as_ref()).expect("pod spec");
    assert_eq!(pod.host_network, Some(true), "the proxy listens on the node");
    assert_eq!(pod.host_pid, Some(true), "pods' namespaces are found through the host's /proc");
    assert!(pod.tolerations.as_ref().is_some_and(|t| !t.is_empty()));
    for init in pod.init_containers.iter().flatten() {
        let args: Vec<String> = std::iter::once("gammaray-agent".to_owned())
            .chain(init.args.iter().flatten().map(|a| expand(a)))
            .collect();
        Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("init container {}: {e}", init.name));
    }
    let agent = &pod.containers[0];
    let args: Vec<String> = std::iter::once("gammaray-agent".to_owned())
        .chain(agent.args.iter().flatten().map(|a| expand(a)))
        .collect();
    let cli = Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("agent args {args:?}: {e}"));
    let Command::Run { node, proxy_addr, admin_addr, metrics_addr, cgroup_root, .. } = cli.command else {
        panic!("the agent container runs `run`")
    };
    assert_eq!(node, "node1");
    assert_eq!(proxy_addr.port(), 15001);
    assert_eq!(admin_addr.port(), 15021);
    assert_eq!(metrics_addr.port(), 15020);
    // Hosts mount cgroup2 in different places (/sys/fs/cgroup, /sys/fs/cgroup/unified): the
    // agent detects it, and a fixed path would stop it starting on some.
    assert_eq!(cgroup_root, None, "the DaemonSet lets the agent find the cgroup2 mount");

    let caps = agent.security_context.as_ref().and_then(|s| s.capabilities.as_ref()).expect("capabilities");
    let mut added: Vec<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    added.sort();
    assert_eq!(added, ["BPF", "NET_ADMIN", "SYS_ADMIN"], "what the agent's preflight checks, nothing more");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    assert_ne!(agent.security_context.as_ref().and_then(|s| s.privileged), Some(true));
    let probe_path = |p: Option<&k8s_openapi::api::core::v1::Probe>| {
        p.and_then(|p| p.http_get.as_ref()).and_then(|h| h.path.clone()).unwrap_or_default()
    };
    assert_eq!(probe_path(agent.readiness_probe.as_ref()), "/readyz");
    assert_eq!(probe_path(agent.liveness_probe.as_ref()), "/healthz");
    assert!(
        agent.resources.as_ref().and_then(|r| r.requests.as_ref()).is_some_and(|r| r.contains_key("memory"))
    );
    let mounts: Vec<&str> = agent.volume_mounts.iter().flatten().map(|v| v.mount_path.as_str()).collect();
    assert!(mounts.contains(&"/sys/fs/cgroup") && mounts.contains(&"/sys/fs/bpf"), "{mounts:?}");
}

fn grants(rules: &[PolicyRule], group: &str, resource: &str, verb: &str, name: Option<&str>) -> bool {
    rules.iter().any(|r| {
        r.api_groups.iter().flatten().any(|g| g == group)
            && r.resources.iter().flatten().any(|x| x == resource)
            && r.verbs.iter().any(|v| v == verb)
            && match (&r.resource_names, name) {
                (None, _) => true,
                (Some(names), Some(n)) => names.iter().any(|x| x == n),
                (Some(_), None) => false,
            }
    })
}

/// The rules of the roles named `name`: (cluster-wide, in its namespace).
fn rules_of(m: &Manifests, name: &str) -> (Vec<PolicyRule>, Vec<PolicyRule>) {
    let named = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        meta.name.as_deref() == Some(name)
    };
    (
        m.cluster_roles
            .iter()
            .filter(|r| named(&r.metadata))
            .flat_map(|r| r.rules.clone().unwrap_or_default())
            .collect(),
        m.roles
            .iter()
            .filter(|r| named(&r.metadata))
            .flat_map(|r| r.rules.clone().unwrap_or_default())
            .collect(),
    )
}

#[test]
fn the_rbac_grants_what_the_agent_does_and_writes_only_route_status() {
    let m = read_all();
    let (cluster, ns) = rules_of(&m, "gammaray-agent");
    for k in gammaray_agent::kube_source::KINDS {
        for verb in ["list", "watch"] {
            assert!(grants(&cluster, k.group, k.plural, verb, None), "{verb} {}", k.plural);
        }
    }
    for status in ["httproutes/status", "grpcroutes/status"] {
        assert!(grants(&cluster, "gateway.networking.k8s.io", status, "update", None), "update {status}");
    }
    assert!(grants(&cluster, "certificates.k8s.io", "certificatesigningrequests", "create", None));
    let writes = ["create", "update", "patch", "delete", "deletecollection", "*"];
    for r in &cluster {
        if r.verbs.iter().any(|v| writes.contains(&v.as_str())) {
            let csr_create = r.resources.iter().flatten().all(|x| x == "certificatesigningrequests")
                && r.verbs.iter().all(|v| v == "create" || v == "get");
            assert!(
                csr_create || r.resources.iter().flatten().all(|x| x.ends_with("/status")),
                "cluster-wide writes only on status, and requests for a node CA: {r:?}"
            );
        }
    }
    let Command::Run { kube, .. } =
        Cli::try_parse_from(["gammaray-agent", "run", "--node", "n", "--proxy-addr", "10.0.0.1:15001"])
            .expect("cli")
            .command
    else {
        unreachable!()
    };
    for verb in ["get", "update"] {
        assert!(
            grants(&ns, "coordination.k8s.io", "leases", verb, Some(&kube.lease_name)),
            "{verb} the lease"
        );
    }
    assert!(grants(&ns, "coordination.k8s.io", "leases", "create", None));
    use gammaray_agent::signer::{BUNDLE_CONFIGMAP, ROOTS_SECRET};
    assert!(!grants(&ns, "", "secrets", "get", Some(ROOTS_SECRET)), "no agent reads the mesh root");
    assert!(!grants(&ns, "", "secrets", "get", Some("some-other-secret")), "nor any other Secret");
    assert!(!grants(&cluster, "", "secrets", "get", Some(ROOTS_SECRET)), "anywhere");
    assert!(grants(&ns, "", "configmaps", "get", Some(BUNDLE_CONFIGMAP)), "it reads the trust bundle");

    // The signer alone reads the root, approves and signs for its own signer name only.
    let (signer_cluster, signer_ns) = rules_of(&m, "gammaray-signer");
    assert!(grants(&signer_ns, "", "secrets", "get", Some(ROOTS_SECRET)));
    assert!(!grants(&signer_ns, "", "secrets", "get", Some("some-other-secret")));
    for verb in ["approve", "sign"] {
        assert!(grants(
            &signer_cluster,
            "certificates.k8s.io",
            "signers",
            verb,
            Some("gammaray.dev/node-ca")
        ));
        assert!(!grants(
            &signer_cluster,
            "certificates.k8s.io",
            "signers",
            verb,
            Some("kubernetes.io/kube-apiserver-client")
        ));
    }
    assert!(grants(&signer_cluster, "authentication.k8s.io", "tokenreviews", "create", None));
}
