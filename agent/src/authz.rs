//! `AuthorizationPolicy` (`security.istio.io/v1`, its L4 form, the policy ambient users already
//! have): the type, whose CustomResourceDefinition kube's derive writes, and its compilation into
//! the proxy's [`gammaray_proxy::authz::Authz`].
//!
//! Nothing a policy says is silently dropped. A policy the node proxy cannot enforce exactly (L7
//! fields, an external authorizer, fields of another API version, a value that does not parse)
//! is compiled to deny every connection to its targets and reported, with its reason, in the log
//! and in `/config_dump`; the other policies keep applying.

use std::{collections::BTreeMap, sync::Arc};

use gammaray_proxy::authz::{Action, Authz, IpBlock, Operation, Pattern, Policy, Rule, Source};
use kube::CustomResource;
use serde::{Deserialize, Serialize};

/// The namespace whose policies without a selector apply to every workload of the mesh.
pub const ROOT_NAMESPACE: &str = "gammaray-system";

#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[kube(group = "security.istio.io", version = "v1", kind = "AuthorizationPolicy", namespaced)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// The workloads the policy applies to, by their labels; none: every workload of the
    /// namespace (of the mesh, in the root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// `ALLOW` (the default) or `DENY`. `CUSTOM` (an external authorizer) is not enforced and
    /// denies its targets; `AUDIT` changes no decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<RuleSpec>>,
    /// Policies attached to waypoints and gateways: not enforced by the node proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_refs: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<serde_json::Value>,
}

/// The API server keeps a policy's `spec` as written (no schema prunes what it does not know):
/// the agent decodes it, refuses unknown fields and reports them. A schema would have the
/// server drop a misspelt field silently, and a rule without it may match more than written.
impl schemars::JsonSchema for AuthorizationPolicySpec {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "AuthorizationPolicySpec".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": true,
            "description": "Istio's AuthorizationPolicy spec, as written: gammaray's agent validates it and reports what it does not enforce."
        })
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<FromSpec>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<ToSpec>>,
    /// Conditions on request attributes: L7, not enforced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<Vec<serde_json::Value>>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FromSpec {
    pub source: SourceSpec,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ToSpec {
    pub operation: OperationSpec,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
    /// L7 (JWT issuers and subjects; the client address a request header names): not enforced.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_remote_ip_blocks: Vec<String>,
    /// `namespace/name` of service accounts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OperationSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<String>,
    /// L7: not enforced by the node proxy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
}

/// The CustomResourceDefinitions of the kinds the agent defines, as YAML (`deploy/crds/`).
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt as _;
    let crd = AuthorizationPolicy::crd();
    Ok(format!(
        "# Generated by `gammaray-agent crds` from the agent's own type; a test keeps it so.\n\
         # Apply it only on a cluster without Istio's CRDs (which define the same kind).\n{}",
        serde_yaml::to_string(&crd)?
    ))
}

/// A policy the node proxy enforces otherwise than as written (it denies its targets), or
/// ignores (`AUDIT`): which, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Refusal {
    /// `namespace/name`.
    pub policy: String,
    pub reason: String,
    /// What the node proxy does instead: `denies its targets`, or `ignored`.
    pub effect: &'static str,
}

/// What the store's policies and namespaces compile to: the policies, with the namespaces
/// their labels make `strict`, and every refusal (policies and labels).
pub fn compile_store(store: &crate::store::Store) -> (Authz, Vec<Refusal>) {
    let (authz, mut refusals) = compile(
        ROOT_NAMESPACE,
        store.authorization_policies.iter().map(|((ns, name), o)| (&**ns, &**name, &**o)),
    );
    let (strict, label_refusals) = strict_namespaces(store.namespaces.iter().map(|(name, ns)| {
        let label = ns
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(gammaray_proxy::authz::PEER_AUTHENTICATION_LABEL))
            .map(String::as_str);
        (name.as_str(), label)
    }));
    refusals.extend(label_refusals);
    (authz.with_strict_namespaces(strict), refusals)
}

/// The namespaces whose workloads are `strict` by their label
/// ([`gammaray_proxy::authz::PEER_AUTHENTICATION_LABEL`]), with a refusal for each label that is
/// neither `strict` nor `permissive` (such a namespace is strict: never weaker than meant).
fn strict_namespaces<'a>(
    namespaces: impl Iterator<Item = (&'a str, Option<&'a str>)>,
) -> (Vec<Arc<str>>, Vec<Refusal>) {
    use gammaray_proxy::authz::{PEER_AUTHENTICATION_LABEL, PeerAuthentication};
    let mut strict = Vec::new();
    let mut refusals = Vec::new();
    for (namespace, value) in namespaces {
        let Some(value) = value else { continue };
        match PeerAuthentication::parse(value) {
            Ok(PeerAuthentication::Permissive) => {}
            Ok(PeerAuthentication::Strict) => strict.push(namespace.into()),
            Err(_) => {
                refusals.push(Refusal {
                    policy: format!("namespace {namespace}: label {PEER_AUTHENTICATION_LABEL}={value}"),
                    reason: "neither strict nor permissive".into(),
                    effect: "treated as strict",
                });
                strict.push(namespace.into());
            }
        }
    }
    (strict, refusals)
}

/// Compiles the policies of the store (namespace, name → the object as written).
pub fn compile<'a>(
    root: &str,
    policies: impl IntoIterator<Item = (&'a str, &'a str, &'a serde_json::Value)>,
) -> (Authz, Vec<Refusal>) {
    let mut compiled = Vec::new();
    let mut refusals = Vec::new();
    for (namespace, name, object) in policies {
        let full = format!("{namespace}/{name}");
        match compile_one(namespace, &full, object) {
            Ok(Some(policy)) => {
                if let Some(reason) = &policy.unenforceable {
                    refusals.push(Refusal {
                        policy: full,
                        reason: reason.clone(),
                        effect: "denies its targets",
                    });
                }
                compiled.push(policy);
            }
            Ok(None) => refusals.push(Refusal {
                policy: full,
                reason: "action AUDIT changes no decision".into(),
                effect: "ignored",
            }),
            Err(reason) => {
                // What cannot be read is still enforced, closed: every workload the policy may
                // be meant for (its selector if that much reads, else its namespace) is denied.
                let selector = object
                    .pointer("/spec/selector/matchLabels")
                    .and_then(|m| serde_json::from_value::<BTreeMap<String, String>>(m.clone()).ok())
                    .map(|m| m.into_iter().collect());
                refusals.push(Refusal {
                    policy: full.clone(),
                    reason: reason.clone(),
                    effect: "denies its targets",
                });
                compiled.push(Policy {
                    name: full.into(),
                    namespace: namespace.into(),
                    selector,
                    action: Action::Deny,
                    rules: vec![],
                    unenforceable: Some(reason),
                });
            }
        }
    }
    (Authz::new(root, compiled), refusals)
}

/// One policy: `Ok(None)` for one that changes no decision (`AUDIT`); `Err` for one that does
/// not read.
fn compile_one(namespace: &str, name: &str, object: &serde_json::Value) -> Result<Option<Policy>, String> {
    let spec = object.get("spec").cloned().unwrap_or_else(|| serde_json::json!({}));
    let spec: AuthorizationPolicySpec = serde_json::from_value(spec).map_err(|e| format!("spec: {e}"))?;
    let mut unenforceable = Vec::new();
    let action = match spec.action.as_deref().unwrap_or("ALLOW") {
        "ALLOW" => Action::Allow,
        "DENY" => Action::Deny,
        "AUDIT" => return Ok(None),
        "CUSTOM" => {
            unenforceable.push("action CUSTOM (an external authorizer) is not enforced".to_owned());
            Action::Deny
        }
        other => return Err(format!("action {other:?}: not ALLOW, DENY, AUDIT or CUSTOM")),
    };
    if spec.target_ref.is_some() || spec.target_refs.is_some() {
        unenforceable
            .push("targetRef(s): policies attached to waypoints or gateways are not enforced here".into());
    }
    if spec.provider.is_some() && action != Action::Deny {
        unenforceable.push("provider: external authorizers are not enforced".into());
    }
    let mut rules = Vec::new();
    for (r, rule) in spec.rules.iter().flatten().enumerate() {
        let at = |field: &str| format!("rules[{r}].{field}");
        if rule.when.as_ref().is_some_and(|w| !w.is_empty()) {
            unenforceable
                .push(format!("{}: conditions on request attributes (L7) are not enforced", at("when")));
        }
        let mut from = Vec::new();
        for (f, source) in rule.from.iter().flatten().enumerate() {
            let s = &source.source;
            let at = |field: &str| at(&format!("from[{f}].source.{field}"));
            for (field, values) in [
                ("requestPrincipals", &s.request_principals),
                ("notRequestPrincipals", &s.not_request_principals),
                ("remoteIpBlocks", &s.remote_ip_blocks),
                ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
            ] {
                if !values.is_empty() {
                    unenforceable.push(format!("{}: L7 (request) attributes are not enforced", at(field)));
                }
            }
            let accounts = |field: &str, values: &[String]| -> Result<Vec<(String, String)>, String> {
                values
                    .iter()
                    .map(|v| match v.split_once('/') {
                        Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {
                            Ok((ns.to_owned(), sa.to_owned()))
                        }
                        _ => Err(format!("{}: {v:?} is not namespace/name", at(field))),
                    })
                    .collect()
            };
            let blocks = |field: &str, values: &[String]| -> Result<Vec<IpBlock>, String> {
                values.iter().map(|v| IpBlock::parse(v).map_err(|e| format!("{}: {e}", at(field)))).collect()
            };
            from.push(Source {
                principals: s.principals.iter().map(|p| Pattern::parse(p)).collect(),
                not_principals: s.not_principals.iter().map(|p| Pattern::parse(p)).collect(),
                service_accounts: accounts("serviceAccounts", &s.service_accounts)?,
                not_service_accounts: accounts("notServiceAccounts", &s.not_service_accounts)?,
                namespaces: s.namespaces.iter().map(|p| Pattern::parse(p)).collect(),
                not_namespaces: s.not_namespaces.iter().map(|p| Pattern::parse(p)).collect(),
                ip_blocks: blocks("ipBlocks", &s.ip_blocks)?,
                not_ip_blocks: blocks("notIpBlocks", &s.not_ip_blocks)?,
            });
        }
        let mut to = Vec::new();
        for (t, op) in rule.to.iter().flatten().enumerate() {
            let o = &op.operation;
            let at = |field: &str| at(&format!("to[{t}].operation.{field}"));
            for (field, values) in [
                ("hosts", &o.hosts),
                ("notHosts", &o.not_hosts),
                ("methods", &o.methods),
                ("notMethods", &o.not_methods),
                ("paths", &o.paths),
                ("notPaths", &o.not_paths),
            ] {
                if !values.is_empty() {
                    unenforceable
                        .push(format!("{}: L7 fields are not enforced by the node proxy", at(field)));
                }
            }
            let ports = |field: &str, values: &[String]| -> Result<Vec<u16>, String> {
                values
                    .iter()
                    .map(|v| {
                        v.parse::<u16>()
                            .ok()
                            .filter(|p| *p > 0)
                            .ok_or_else(|| format!("{}: {v:?} is not a port", at(field)))
                    })
                    .collect()
            };
            to.push(Operation {
                ports: ports("ports", &o.ports)?,
                not_ports: ports("notPorts", &o.not_ports)?,
            });
        }
        rules.push(Rule { from, to });
    }
    Ok(Some(Policy {
        name: Arc::from(name),
        namespace: namespace.into(),
        selector: spec.selector.map(|s| s.match_labels.into_iter().collect()),
        action,
        rules,
        unenforceable: (!unenforceable.is_empty()).then(|| unenforceable.join("; ")),
    }))
}

#[cfg(test)]
mod tests {
    use gammaray_proxy::authz::{Decision, DenyReason, Peer, Target};

    use super::*;

    fn compiled(yaml: &str) -> (Authz, Vec<Refusal>) {
        let objects: Vec<serde_json::Value> =
            yaml.split("\n---\n").map(|d| serde_yaml::from_str(d).expect("yaml")).collect();
        let named: Vec<(String, String, serde_json::Value)> = objects
            .into_iter()
            .map(|o| {
                (
                    o["metadata"]["namespace"].as_str().unwrap().to_owned(),
                    o["metadata"]["name"].as_str().unwrap().to_owned(),
                    o,
                )
            })
            .collect();
        compile(ROOT_NAMESPACE, named.iter().map(|(ns, n, o)| (ns.as_str(), n.as_str(), o)))
    }

    fn decide(authz: &Authz, from: &str, namespace: &str, port: u16) -> Decision {
        let id: gammaray_proxy::identity::Identity = from.parse().expect("identity");
        authz.check(
            &Peer { identity: Some(&id), ip: None },
            &Target { namespace, labels: &Default::default(), port },
        )
    }

    #[test]
    fn an_istio_policy_compiles_as_written() {
        let (authz, refusals) = compiled(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-client, namespace: demo}\n\
             spec:\n  action: ALLOW\n  rules:\n  - from:\n    - source: {principals: [cluster.local/ns/demo/sa/client]}\n    to:\n    - operation: {ports: ['8080']}\n",
        );
        assert!(refusals.is_empty(), "{refusals:?}");
        assert_eq!(decide(&authz, "spiffe://cluster.local/ns/demo/sa/client", "demo", 8080), Decision::Allow);
        assert!(matches!(
            decide(&authz, "spiffe://cluster.local/ns/demo/sa/client", "demo", 9090),
            Decision::Deny { .. }
        ));
        assert!(matches!(
            decide(&authz, "spiffe://cluster.local/ns/demo/sa/other", "demo", 8080),
            Decision::Deny { .. }
        ));
    }

    #[test]
    fn service_accounts_compile_and_a_malformed_one_fails_closed() {
        let (authz, refusals) = compiled(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: by-sa, namespace: demo}\n\
             spec: {rules: [{from: [{source: {serviceAccounts: [demo/client]}}]}]}\n\
             ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: bad-sa, namespace: other}\n\
             spec: {rules: [{from: [{source: {serviceAccounts: [client]}}]}]}\n",
        );
        assert_eq!(refusals.len(), 1, "{refusals:?}");
        assert!(refusals[0].reason.contains("\"client\" is not namespace/name"), "{refusals:?}");
        assert_eq!(decide(&authz, "spiffe://cluster.local/ns/demo/sa/client", "demo", 80), Decision::Allow);
        assert!(matches!(
            decide(&authz, "spiffe://cluster.local/ns/demo/sa/x", "demo", 80),
            Decision::Deny { .. }
        ));
        assert!(matches!(
            decide(&authz, "spiffe://cluster.local/ns/other/sa/client", "other", 80),
            Decision::Deny { .. }
        ));
    }

    #[test]
    fn l7_fields_deny_the_targets_and_are_reported() {
        let (authz, refusals) = compiled(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin, namespace: demo}\n\
             spec:\n  action: DENY\n  rules:\n  - to:\n    - operation: {paths: [/admin]}\n",
        );
        assert_eq!(refusals.len(), 1);
        assert!(
            refusals[0].reason.contains("rules[0].to[0].operation.paths: L7 fields are not enforced"),
            "{refusals:?}"
        );
        let d = decide(&authz, "spiffe://cluster.local/ns/demo/sa/client", "demo", 80);
        assert!(matches!(d, Decision::Deny { reason: DenyReason::Unenforceable, .. }), "{d:?}");
    }

    #[test]
    fn a_malformed_policy_is_reported_and_fails_closed_and_the_others_apply() {
        let (authz, refusals) = compiled(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: typo, namespace: demo}\n\
             spec: {action: DENY, rules: [{from: [{source: {principal: [x]}}]}]}\n\
             ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: bad-port, namespace: other}\n\
             spec: {rules: [{to: [{operation: {ports: [http]}}]}]}\n\
             ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: fine, namespace: third}\n\
             spec: {action: DENY, rules: [{from: [{source: {namespaces: [bad]}}]}]}\n",
        );
        let reasons: Vec<&str> = refusals.iter().map(|r| r.reason.as_str()).collect();
        assert_eq!(refusals.len(), 2, "{refusals:?}");
        assert!(reasons[0].contains("unknown field `principal`"), "an unknown field is named: {reasons:?}");
        assert!(reasons[1].contains("\"http\" is not a port"), "{reasons:?}");
        assert!(matches!(
            decide(&authz, "spiffe://cluster.local/ns/x/sa/y", "demo", 80),
            Decision::Deny { .. }
        ));
        assert!(matches!(
            decide(&authz, "spiffe://cluster.local/ns/bad/sa/y", "third", 80),
            Decision::Deny { .. }
        ));
        assert_eq!(decide(&authz, "spiffe://cluster.local/ns/good/sa/y", "third", 80), Decision::Allow);
    }

    #[test]
    fn audit_changes_nothing_and_custom_fails_closed() {
        let (authz, refusals) = compiled(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: audit, namespace: demo}\nspec: {action: AUDIT, rules: [{}]}\n\
             ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ext, namespace: other}\nspec: {action: CUSTOM, provider: {name: opa}, rules: [{}]}\n",
        );
        assert_eq!(refusals.iter().map(|r| r.effect).collect::<Vec<_>>(), ["ignored", "denies its targets"]);
        assert_eq!(decide(&authz, "spiffe://cluster.local/ns/x/sa/y", "demo", 80), Decision::Allow);
        assert!(matches!(
            decide(&authz, "spiffe://cluster.local/ns/x/sa/y", "other", 80),
            Decision::Deny { .. }
        ));
    }

    #[test]
    fn deploy_holds_the_crd_the_agent_defines() {
        let file =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds/authorizationpolicy.yaml");
        let held = std::fs::read_to_string(&file).unwrap_or_default();
        assert!(
            held == crds_yaml().expect("yaml"),
            "{} differs from the type: `cargo run -p gammaray-agent -- crds > deploy/crds/authorizationpolicy.yaml`",
            file.display()
        );
    }

    #[test]
    fn the_crd_is_namespaced_in_the_istio_group() {
        use kube::CustomResourceExt as _;
        let crd = AuthorizationPolicy::crd();
        assert_eq!(crd.metadata.name.as_deref(), Some("authorizationpolicies.security.istio.io"));
        assert_eq!(crd.spec.scope, "Namespaced");
    }

    #[test]
    fn namespace_labels_make_workloads_strict_and_an_unknown_value_is_strict_and_reported() {
        let (strict, refusals) = strict_namespaces(
            [
                ("locked", Some("strict")),
                ("open", Some("permissive")),
                ("plain", None),
                ("typo", Some("stric")),
            ]
            .into_iter(),
        );
        let names: Vec<&str> = strict.iter().map(|n| &**n).collect();
        assert_eq!(names, ["locked", "typo"]);
        assert_eq!(refusals.len(), 1, "{refusals:?}");
        assert!(refusals[0].policy.contains("typo") && refusals[0].policy.contains("stric"), "{refusals:?}");
        assert_eq!(refusals[0].effect, "treated as strict");
    }
}
