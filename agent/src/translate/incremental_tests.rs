//! The incremental translation against the full one: random sequences of object changes over a
//! small world where everything collides (Services sharing addresses, pods sharing IPs, slices
//! moving between Services, HTTPRoutes and GRPCRoutes on one port, routes in and out of the
//! Services' namespace), both translations compared after every step.

use std::collections::BTreeMap;

use gammaray_proxy::snapshot::Snapshot;
use proptest::prelude::*;

use super::{Incremental, Options, translate};
use crate::store::Store;

const NAMESPACES: [&str; 2] = ["a", "b"];

/// One change: which kind (0..7), which object of it, three small parameters, and whether it
/// is a deletion.
type Op = (u8, u8, u8, u8, u8, bool);

/// The object `op` writes, as YAML, or the object it deletes as (kind, namespace, name).
fn object(op: &Op) -> Result<String, (&'static str, String, String)> {
    let &(kind, which, p, q, r, delete) = op;
    let ns = NAMESPACES[usize::from(which) % 2];
    let n = which % 4;
    let svc = |x: u8| format!("s{}", x % 4);
    let ip = |x: u8| format!("10.0.0.{}", x % 6);
    let (kind_name, name, yaml) = match kind % 7 {
        0 => {
            let cluster_ip = match p % 5 {
                0 => "None".to_owned(),
                1 => "''".to_owned(),
                x => format!("10.96.0.{x}"),
            };
            let type_ = if q % 7 == 0 { "ExternalName" } else { "ClusterIP" };
            let ports = match r % 4 {
                0 => "[{name: http, port: 80, appProtocol: http}]",
                1 => {
                    "[{name: http, port: 80, appProtocol: http}, {name: grpc, port: 81, appProtocol: kubernetes.io/h2c}]"
                }
                2 => "[{name: http, port: 80}, {name: other, port: 80}]",
                _ => "[]",
            };
            let name = svc(n);
            (
                "Service",
                name.clone(),
                format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{type: {type_}, clusterIP: {cluster_ip}, ports: {ports}}}\n"
                ),
            )
        }
        1 => {
            let name = format!("e{n}");
            let label = if q % 5 == 4 {
                String::new()
            } else {
                format!("labels: {{kubernetes.io/service-name: {}}}, ", svc(q))
            };
            let ready = if r % 3 == 0 { "false" } else { "true" };
            let family = if r % 11 == 10 { "FQDN" } else { "IPv4" };
            (
                "EndpointSlice",
                name.clone(),
                format!(
                    "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: {ns}, {label}}}\naddressType: {family}\n\
                     ports: [{{name: http, port: 8080}}, {{name: grpc, port: 9090}}]\n\
                     endpoints: [{{addresses: ['{}'], conditions: {{ready: {ready}}}, targetRef: {{kind: Pod, name: p{}}}}}, {{addresses: ['{}'], nodeName: n{}}}]\n",
                    ip(p),
                    p % 4,
                    ip(p / 3),
                    r % 2
                ),
            )
        }
        2 => {
            let name = format!("p{n}");
            let host = q % 6 == 5;
            (
                "Pod",
                name.clone(),
                format!(
                    "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{nodeName: n{}, serviceAccountName: sa{}, hostNetwork: {host}, containers: []}}\nstatus: {{podIP: '{}'}}\n",
                    r % 2,
                    q % 3,
                    ip(p)
                ),
            )
        }
        3 | 4 => {
            let (api, k) =
                if kind % 7 == 3 { ("HTTPRoute", "HTTPRoute") } else { ("GRPCRoute", "GRPCRoute") };
            let name = format!("r{n}");
            let parent_ns = NAMESPACES[usize::from(q / 4) % 2];
            let port = match q % 3 {
                0 => String::new(),
                1 => ", port: 80".to_owned(),
                _ => ", port: 81".to_owned(),
            };
            let second = if r % 4 == 3 {
                format!(", {{name: {}, port: 80, weight: 2}}", svc(r / 4))
            } else {
                String::new()
            };
            let bad = if r % 5 == 4 && api == "HTTPRoute" {
                ", {matches: [{path: {type: RegularExpression, value: '('}}]}"
            } else {
                ""
            };
            let backend_port = if p % 6 == 5 { 99 } else { 80 + u16::from(p % 2) };
            (
                k,
                name.clone(),
                format!(
                    "apiVersion: gateway.networking.k8s.io/v1\nkind: {api}\nmetadata: {{name: {name}, namespace: {ns}, generation: {}, creationTimestamp: '2026-01-0{}T00:00:00Z'}}\n\
                     spec: {{parentRefs: [{{group: '', kind: Service, name: {}, namespace: {parent_ns}{port}}}], rules: [{{backendRefs: [{{name: {}, port: {backend_port}}}{second}]}}{bad}]}}\n",
                    r % 3 + 1,
                    p % 3 + 1,
                    svc(q),
                    svc(p),
                ),
            )
        }
        5 => {
            let name = format!("n{}", n % 2);
            (
                "Node",
                name.clone(),
                format!(
                    "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\nstatus: {{addresses: [{{type: InternalIP, address: '10.200.0.{}'}}]}}\n",
                    p % 3
                ),
            )
        }
        _ => {
            let name = format!("ns{}", n % 2);
            (
                "Namespace",
                name.clone(),
                format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n"),
            )
        }
    };
    if delete { Err((kind_name, ns.to_owned(), name)) } else { Ok(yaml) }
}

/// A snapshot in a form where equal contents compare equal (the maps' own order depends on
/// their hasher's seed).
fn canonical(s: &Snapshot) -> String {
    let frontends: BTreeMap<_, _> = s.frontends.iter().map(|(k, v)| (*k, format!("{v:?}"))).collect();
    let workloads: BTreeMap<_, _> = s.workloads.iter().map(|(k, v)| (k, format!("{v:?}"))).collect();
    let nodes: BTreeMap<_, _> = s.nodes.iter().collect();
    format!("version {}\n{frontends:#?}\n{workloads:#?}\n{nodes:?}", s.version)
}

fn check(ops: &[Op]) -> Result<(), TestCaseError> {
    let opts = Options::default();
    let mut store = Store::default();
    let mut incremental = Incremental::new(opts.clone());
    for (step, op) in ops.iter().enumerate() {
        match object(op) {
            Ok(yaml) => {
                let applied = store.apply_yaml(&yaml);
                prop_assert!(applied.errors.is_empty(), "{yaml}: {:?}", applied.errors);
            }
            Err((kind, ns, name)) => {
                store.remove(kind, &ns, &name);
            }
        }
        let version = step as u64 + 1;
        let full = translate(&store, &Options { version, ..opts.clone() });
        let step_out = incremental.apply(&store, version);
        prop_assert_eq!(
            canonical(&step_out.snapshot),
            canonical(&full.snapshot),
            "snapshot after step {}",
            step
        );
        let statuses: Vec<_> = step_out.statuses.values().map(|s| (**s).clone()).collect();
        prop_assert_eq!(statuses, full.statuses, "statuses after step {}", step);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn incremental_translation_equals_the_full_one_after_every_change(
        ops in proptest::collection::vec(any::<Op>(), 1..60)
    ) {
        check(&ops)?;
    }
}

/// A world built in one step, then taken apart one object at a time: the initial load and the
/// removals walk the same code as single changes.
#[test]
fn a_world_built_at_once_then_removed_piece_by_piece() {
    let mut ops = Vec::new();
    for kind in 0..7u8 {
        for which in 0..8u8 {
            ops.push((kind, which, which, which / 2, which + kind, false));
        }
    }
    let mut store = Store::default();
    for op in &ops {
        if let Ok(yaml) = object(op) {
            store.apply_yaml(&yaml);
        }
    }
    let mut incremental = Incremental::new(Options::default());
    let first = incremental.apply(&store, 1);
    let full = translate(&store, &Options { version: 1, ..Options::default() });
    assert_eq!(canonical(&first.snapshot), canonical(&full.snapshot));
    assert!(!full.snapshot.frontends.is_empty() && !full.statuses.is_empty(), "the world routes something");
    for (i, op) in ops.iter().enumerate() {
        let (kind, ns, name) = object(&(op.0, op.1, op.2, op.3, op.4, true)).expect_err("a deletion");
        store.remove(kind, &ns, &name);
        let version = i as u64 + 2;
        let step = incremental.apply(&store, version);
        let full = translate(&store, &Options { version, ..Options::default() });
        assert_eq!(canonical(&step.snapshot), canonical(&full.snapshot), "after removing {kind} {ns}/{name}");
        let statuses: Vec<_> = step.statuses.values().map(|s| (**s).clone()).collect();
        assert_eq!(statuses, full.statuses, "after removing {kind} {ns}/{name}");
    }
}

/// A change costs what it touches: one endpoint moving in a world of many Services recomputes
/// one Service, its frontends and the routes that read it, not the world.
#[test]
fn one_endpoint_change_recomputes_one_service() {
    let mut yaml = String::new();
    for i in 0..200 {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: a}}\nspec: {{clusterIP: 10.96.{}.{}, ports: [{{name: http, port: 80, appProtocol: http}}]}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-1, namespace: a, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\n\
             ports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: ['10.1.{}.{}']}}]\n\
             ---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r{i}, namespace: a}}\n\
             spec: {{parentRefs: [{{group: '', kind: Service, name: s{i}, port: 80}}], rules: [{{backendRefs: [{{name: s{i}, port: 80}}]}}]}}\n",
            i / 250,
            i % 250 + 1,
            i / 250,
            i % 250 + 1
        ));
    }
    let mut store = Store::default();
    assert!(store.apply_yaml(&yaml).errors.is_empty());
    let mut incremental = Incremental::new(Options::default());
    let first = incremental.apply(&store, 1);
    assert_eq!(first.work.services, 200);
    store.apply_yaml(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s7-1, namespace: a, labels: {kubernetes.io/service-name: s7}}\naddressType: IPv4\n\
         ports: [{name: http, port: 8080}]\nendpoints: [{addresses: ['10.1.0.8']}, {addresses: ['10.2.0.1']}]\n",
    );
    let before = first.snapshot;
    let step = incremental.apply(&store, 2);
    assert_eq!(
        step.work,
        super::incremental::Work { workloads: 0, services: 1, routes: 1, frontends: 1, statuses: 1 },
        "one Service, its route, its frontend, its status"
    );
    let full = translate(&store, &Options { version: 2, ..Options::default() });
    assert_eq!(canonical(&step.snapshot), canonical(&full.snapshot));
    // Every other frontend is shared with the snapshot before, not copied.
    let addr = |i: u32| std::net::SocketAddr::from(([10, 96, 0, i as u8 + 1], 80));
    assert!(std::sync::Arc::ptr_eq(&before.frontends[&addr(3)], &step.snapshot.frontends[&addr(3)]));
    assert!(!std::sync::Arc::ptr_eq(&before.frontends[&addr(7)], &step.snapshot.frontends[&addr(7)]));
}
