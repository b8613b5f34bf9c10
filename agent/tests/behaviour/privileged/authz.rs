//! Authorization at the destination on the real data path: `AuthorizationPolicy` objects in the
//! agents' manifest directory, checked from the client pod on node1 against a backend pod on
//! node1 (the same node: node1's proxy enforces) and one on node2 (across nodes: node2
//! enforces, with the identity of node1's client certificate), over L4 (the pod's address) and
//! L7 (the Service, 403).

use std::net::SocketAddr;

use gammaray_testkit::{
    assert_eventually,
    http::HttpClient,
    require_privileged,
    scenarios::{self, Canary},
};

use super::support::*;

/// A backend pod on `node`, by version.
fn backend_on(mesh: &CanaryMesh, node: &str, version: &str) -> SocketAddr {
    let (pod, _) = mesh
        .canary
        .backends
        .iter()
        .find(|(p, _)| p.node == node && p.name.starts_with(&format!("backend-{version}")))
        .expect("a backend there");
    SocketAddr::from((pod.ip, scenarios::TARGET_PORT))
}

/// Whether the client pod's request to `dst` (L4, the pod's address) is answered.
fn answered(mesh: &CanaryMesh, dst: SocketAddr) -> bool {
    answered_from(&mesh.canary.client, dst)
}

/// Writes the policies and waits until both agents route by them.
fn apply_policies(mesh: &CanaryMesh, yaml: &str) {
    apply_manifest(mesh, "policies.yaml", yaml);
}

/// Writes the manifest `file` and waits until both agents route by it.
fn apply_manifest(mesh: &CanaryMesh, file: &str, yaml: &str) {
    let versions: Vec<u64> = mesh.agents.iter().map(|(_, a)| a.status().config_version).collect();
    write_manifest(&mesh.dir.join(file), yaml);
    for ((n, agent), before) in mesh.agents.iter().zip(versions) {
        assert_eventually(&format!("node{n} applies {file}"), TIMEOUT, || {
            let v = agent.status().config_version;
            (v > before).then_some(()).ok_or(format!("still version {v}"))
        });
    }
}

fn policy(name: &str, namespace: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n"
    )
}

/// Each case: the policies, then whether v1 on node1 (same node) and v1 on node2 (across
/// nodes) answer the client, and whether v2 on node2 does.
#[test]
fn policies_are_enforced_at_the_destination_on_both_paths() {
    if !require_privileged("authz: policies on both paths") {
        return;
    }
    let mesh = CanaryMesh::start(&Canary::route(50, 50), &[1, 2]);
    let (same, cross, cross_v2) = (
        backend_on(&mesh, "node1", "v1"),
        backend_on(&mesh, "node2", "v1"),
        backend_on(&mesh, "node2", "v2"),
    );
    assert!(
        answered(&mesh, same) && answered(&mesh, cross) && answered(&mesh, cross_v2),
        "no policy: all answer"
    );
    let client = "cluster.local/ns/demo/sa/client";
    let cases: Vec<(&str, String, [bool; 3])> = vec![
        (
            "ALLOW by the client's service account",
            policy(
                "allow-client",
                "demo",
                &format!(
                    "{{selector: {{matchLabels: {{app: backend}}}}, rules: [{{from: [{{source: {{principals: [{client}]}}}}]}}]}}"
                ),
            ),
            [true, true, true],
        ),
        (
            "ALLOW by another service account only",
            policy(
                "allow-other",
                "demo",
                "{selector: {matchLabels: {app: backend}}, rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/nobody]}}]}]}",
            ),
            [false, false, false],
        ),
        (
            "DENY by namespace",
            policy("deny-demo", "demo", "{action: DENY, rules: [{from: [{source: {namespaces: [demo]}}]}]}"),
            [false, false, false],
        ),
        (
            "DENY wins over ALLOW, for the workloads it selects (v2)",
            policy("allow-all", "demo", "{rules: [{}]}")
                + &policy(
                    "deny-v2",
                    "demo",
                    &format!(
                        "{{action: DENY, selector: {{matchLabels: {{version: v2}}}}, rules: [{{from: [{{source: {{principals: [{client}]}}}}]}}]}}"
                    ),
                ),
            [true, true, false],
        ),
        (
            "ALLOW by serviceAccounts (namespace/name)",
            policy("allow-sa", "demo", "{rules: [{from: [{source: {serviceAccounts: [demo/client]}}]}]}"),
            [true, true, true],
        ),
        (
            "an ALLOW with no rules denies all",
            policy("nothing", "demo", "{action: ALLOW}"),
            [false, false, false],
        ),
        (
            "ALLOW by the client's address (ipBlocks; across nodes the tunnel names it)",
            policy(
                "allow-ip",
                "demo",
                &format!(
                    "{{rules: [{{from: [{{source: {{ipBlocks: ['{}/32']}}}}]}}]}}",
                    mesh.canary.client.ip
                ),
            ),
            [true, true, true],
        ),
        (
            "ALLOW by another address only",
            policy("allow-other-ip", "demo", "{rules: [{from: [{source: {ipBlocks: ['10.9.9.0/24']}}]}]}"),
            [false, false, false],
        ),
        (
            "a port-scoped DENY on another port",
            policy("deny-9999", "demo", "{action: DENY, rules: [{to: [{operation: {ports: ['9999']}}]}]}"),
            [true, true, true],
        ),
        (
            "a port-scoped DENY on the backends' port",
            policy("deny-8080", "demo", "{action: DENY, rules: [{to: [{operation: {ports: ['8080']}}]}]}"),
            [false, false, false],
        ),
        (
            "a root-namespace DENY applies mesh-wide",
            policy(
                "mesh-deny-client",
                "gammaray-system",
                &format!("{{action: DENY, rules: [{{from: [{{source: {{principals: [{client}]}}}}]}}]}}"),
            ),
            [false, false, false],
        ),
        (
            "an L7-only DENY denies its targets rather than nothing",
            policy(
                "no-admin",
                "demo",
                "{action: DENY, selector: {matchLabels: {version: v2}}, rules: [{to: [{operation: {paths: [/admin]}}]}]}",
            ),
            [true, true, false],
        ),
    ];
    for (what, yaml, want) in cases {
        apply_policies(&mesh, &yaml);
        let got = [answered(&mesh, same), answered(&mesh, cross), answered(&mesh, cross_v2)];
        assert_eq!(got, want, "{what}: [v1 same node, v1 across nodes, v2 across nodes] answered");
    }
    // Over L7: the Service answers 403 from a denied backend, whichever node it is on.
    apply_policies(
        &mesh,
        &policy("deny-demo", "demo", "{action: DENY, rules: [{from: [{source: {namespaces: [demo]}}]}]}"),
    );
    let statuses = mesh
        .canary
        .client
        .run(|| {
            let mut c =
                HttpClient::connect(SocketAddr::from((scenarios::BACKEND_VIP, 80)), "backend", TIMEOUT)?;
            (0..10).map(|_| c.get("/", &[]).map(|r| r.status)).collect::<std::io::Result<Vec<u16>>>()
        })
        .expect("enter the client pod")
        .expect("answers");
    assert!(statuses.iter().all(|s| *s == 403), "{statuses:?}");
    // `describe workload` on the destination's node says which policy applies and decides.
    let (pod, _) = mesh.canary.backends.iter().find(|(p, _)| p.node == "node2").expect("a backend on node2");
    let describe = |from: &str| {
        gammaray_testkit::agent::block_on(mesh.agent(2).control().describe_workload(
            "demo",
            &pod.name,
            Some(from),
            8080,
        ))
        .expect("describe workload")
    };
    let text = describe("spiffe://cluster.local/ns/demo/sa/client");
    assert!(
        text.contains("demo/deny-demo: Deny, 1 rule(s), selects every workload of its namespace"),
        "{text}"
    );
    assert!(text.contains("to port 8080: DENY by demo/deny-demo (deny_policy)"), "{text}");
    let text = describe("spiffe://cluster.local/ns/elsewhere/sa/x");
    assert!(text.contains("to port 8080: ALLOW"), "{text}");
    // Counted by policy, reason and where it was decided, on both nodes.
    for (n, path) in [(1, "local"), (2, "inbound")] {
        let metrics = node_metrics(&mesh, n);
        assert!(
            metrics.lines().any(|l| l.starts_with("gammaray_authz_denied_total{")
                && l.contains("policy=\"demo/deny-demo\"")
                && l.contains("reason=\"deny_policy\"")
                && l.contains(&format!("path=\"{path}\""))),
            "node{n}: {metrics}"
        );
    }
}

/// A malformed policy is reported (log and `/config_dump`), fails closed for its namespace, and
/// the others keep applying.
#[test]
fn a_malformed_policy_is_reported_and_fails_closed() {
    if !require_privileged("authz: malformed policy") {
        return;
    }
    let mesh = CanaryMesh::start(&Canary::route(50, 50), &[1, 2]);
    let cross = backend_on(&mesh, "node2", "v1");
    apply_policies(
        &mesh,
        &policy("typo", "demo", "{action: DENY, rules: [{from: [{source: {principal: [x]}}]}]}"),
    );
    assert!(!answered(&mesh, cross), "a policy that does not read denies its namespace's workloads");
    let log = mesh.agent(2).log_text();
    assert!(
        log.contains("authorization policy not enforced as written")
            && log.contains("unknown field `principal`"),
        "{log}"
    );
    let dump = gammaray_testkit::agent::block_on(mesh.agent(2).control().config_dump()).expect("config dump");
    assert!(dump.contains("demo/typo") && dump.contains("unknown field"), "{dump}");
    apply_policies(&mesh, "");
    assert!(answered(&mesh, cross), "fixed: answered again");
}

fn node_metrics(mesh: &CanaryMesh, n: u8) -> String {
    let node = mesh.cluster.node(n);
    node.run(|| {
        HttpClient::connect(SocketAddr::from((node.ip, 15020)), "node", TIMEOUT)?.get("/metrics", &[])
    })
    .expect("enter the node")
    .expect("metrics")
    .body
}

/// [`stream_to`], echoing.
fn echoing(
    mesh: &CanaryMesh,
    from: &gammaray_testkit::Pod,
    node: &str,
    port: u16,
) -> (std::net::TcpStream, gammaray_testkit::echo::EchoServer) {
    let (mut conn, _, echo) = stream_to(mesh, from, node, port);
    echo_line(&mut conn, "before the change");
    (conn, echo)
}

/// A policy change that no longer allows an open connection ends it within a second, on the
/// same node (node1's proxy) and across nodes (node2's end of the tunnel); one it still allows
/// carries on.
#[test]
fn a_policy_change_closes_the_connections_it_no_longer_allows() {
    if !require_privileged("authz: revocation") {
        return;
    }
    let mesh = CanaryMesh::start(&Canary::route(50, 50), &[1, 2]);
    let client = &mesh.canary.client;
    let (mut same, _e1) = echoing(&mesh, client, "node1", 9401);
    let (mut cross, _e2) = echoing(&mesh, client, "node2", 9402);
    let (mut other_port, _e3) = echoing(&mesh, client, "node2", 9403);
    apply_policies(
        &mesh,
        &policy(
            "deny-940x",
            "demo",
            "{action: DENY, rules: [{to: [{operation: {ports: ['9401', '9402']}}]}]}",
        ),
    );
    for (what, conn) in [("same node", &mut same), ("across nodes", &mut cross)] {
        assert!(
            closed_within_a_second(conn),
            "{what}: the denied connection is still open a second after the policy"
        );
    }
    echo_line(&mut other_port, "a port the policy leaves alone");
    for (n, path) in [(1, "local_revoked"), (2, "inbound_revoked")] {
        let metrics = node_metrics(&mesh, n);
        assert!(metrics.contains(&format!("path=\"{path}\"")), "node{n} counted it: {metrics}");
    }
}

/// Whether a probe from `node`'s own address (as the kubelet's) to `dst` is answered.
fn probed(mesh: &CanaryMesh, n: u8, dst: SocketAddr) -> bool {
    mesh.cluster
        .node(n)
        .run(|| HttpClient::connect(dst, "backend", TIMEOUT).and_then(|mut c| c.get("/", &[])))
        .expect("enter the node")
        .is_ok_and(|r| r.status == 200)
}

/// Whether a stream that echoed before is closed (reset or ended) within a second.
fn closed_within_a_second(conn: &mut std::net::TcpStream) -> bool {
    use std::io::Read as _;
    conn.set_read_timeout(Some(std::time::Duration::from_secs(1))).expect("timeout");
    let mut buf = [0u8; 16];
    match conn.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::TimedOut,
    }
}

fn metric(metrics: &str, name: &str) -> u64 {
    metrics.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0)
}

/// Inbound capture on the real data path: pods outside the mesh (one on each node) reach the
/// enrolled backends directly. Permissive (the default), they are answered through the node
/// proxy as unauthenticated sources, which policies then see as such; strict (the namespace's
/// label), they are refused while mesh traffic and probes from the node's address pass, an open
/// plaintext connection is closed by the switch, and with the agent gone they stay refused.
#[test]
fn inbound_capture_enforces_peer_authentication() {
    if !require_privileged("authz: inbound capture and peer authentication") {
        return;
    }
    let mut mesh = CanaryMesh::start(&Canary::route(50, 50), &[1, 2]);
    let (same, cross) = (backend_on(&mesh, "node1", "v1"), backend_on(&mesh, "node2", "v1"));
    let outside1 = mesh.cluster.add_pod(1, "outside", "stranger-1").expect("a pod outside the mesh");
    let outside2 = mesh.cluster.add_pod(2, "outside", "stranger-2").expect("a pod outside the mesh");
    let strangers = [(&outside1, "node1"), (&outside2, "node2")];
    let captured_before = metric(&node_metrics(&mesh, 1), "gammaray_inbound_captured_connections_total");

    // Permissive: answered, through the proxy.
    for (pod, node) in strangers {
        for dst in [same, cross] {
            assert!(answered_from(pod, dst), "permissive: the pod outside the mesh on {node} reaches {dst}");
        }
    }
    let metrics = node_metrics(&mesh, 1);
    assert!(
        metric(&metrics, "gammaray_inbound_captured_connections_total") >= captured_before + 2,
        "node1's proxy carried the captured connections: {metrics}"
    );
    assert!(metric(&metrics, "gammaray_kernel_inbound_captured_total") >= 2, "{metrics}");
    for (n, dst) in [(1, same), (2, cross)] {
        assert!(probed(&mesh, n, dst), "node{n}'s own address reaches its pod");
        assert!(answered(&mesh, dst), "the mesh client reaches {dst}");
    }

    // Unauthenticated, as policies see it: ALLOW by namespace lets the mesh client in only.
    apply_policies(
        &mesh,
        &policy("allow-demo", "demo", "{rules: [{from: [{source: {namespaces: [demo]}}]}]}"),
    );
    assert!(answered(&mesh, same) && answered(&mesh, cross), "the mesh client is allowed");
    for (pod, node) in strangers {
        assert!(!answered_from(pod, same), "an unauthenticated source from {node} matches no namespace");
    }
    assert!(probed(&mesh, 1, same), "probes are not captured, so no policy applies to them");
    apply_policies(&mesh, "");

    // An open plaintext connection, then strict.
    let (mut open, _echo) = echoing(&mesh, &outside2, "node1", 9501);
    let strict = mesh.canary.objects.replace(
        "gammaray.dev/dataplane-mode: ambient}",
        "gammaray.dev/dataplane-mode: ambient, gammaray.dev/peer-authentication: strict}",
    );
    assert_ne!(strict, mesh.canary.objects, "the namespace's labels are where the test expects them");
    apply_manifest(&mesh, "objects.yaml", &strict);
    assert!(closed_within_a_second(&mut open), "strict closes the open plaintext connection");
    for (pod, node) in strangers {
        for dst in [same, cross] {
            assert!(
                !answered_from(pod, dst),
                "strict: the pod outside the mesh on {node} is refused by {dst}"
            );
        }
    }
    let (own, _) = mesh
        .canary
        .backends
        .iter()
        .find(|(p, _)| std::net::IpAddr::V4(p.ip) == same.ip())
        .expect("the same-node backend");
    assert!(answered_from(own, same), "strict: the pod reaches itself at its own address");
    for (n, dst) in [(1, same), (2, cross)] {
        assert!(probed(&mesh, n, dst), "strict: node{n}'s own address still reaches its pod");
        assert!(answered(&mesh, dst), "strict: the mesh client still reaches {dst}");
    }
    let metrics = node_metrics(&mesh, 1);
    for path in ["captured", "captured_revoked"] {
        assert!(
            metrics.lines().any(|l| l.starts_with("gammaray_authz_denied_total{")
                && l.contains("reason=\"strict_unauthenticated\"")
                && l.contains(&format!("path=\"{path}\""))),
            "counted on {path}: {metrics}"
        );
    }
    let text = gammaray_testkit::agent::block_on(mesh.agent(1).control().describe_workload(
        "demo",
        &own.name,
        None,
        scenarios::TARGET_PORT,
    ))
    .expect("describe workload");
    assert!(text.contains("peer authentication: strict"), "{text}");
    assert!(text.contains("DENY by peer-authentication/strict (strict_unauthenticated)"), "{text}");
    let dump = gammaray_testkit::agent::block_on(mesh.agent(1).control().config_dump()).expect("config dump");
    let dump: serde_json::Value = serde_json::from_str(&dump).expect("JSON");
    assert_eq!(dump["peerAuthentication"]["strictNamespaces"], serde_json::json!(["demo"]), "{dump}");

    // No agent on node1: its pods stay closed to plaintext (the kernel refuses), and open to
    // the node's own address.
    let (_, mut agent) = mesh.agents.remove(0);
    let exit = agent.stop(TIMEOUT).expect("node1's agent stops");
    assert!(exit.success(), "{exit:?}");
    assert!(!answered_from(&outside2, same), "no agent: still refused");
    assert!(probed(&mesh, 1, same), "no agent: the node's probes pass");
}
