//! One pod cannot take down its node: while a pod floods its node's proxy with idle
//! connections past its share, another pod on the same node keeps being served, the node's
//! configuration keeps updating, and the flood is refused and counted.

use std::{
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use gammaray_testkit::{
    http::HttpClient,
    require_privileged,
    scenarios::{self, Canary},
};

use super::support::*;

/// More than one source may hold on a machine whose descriptor limit is 20 000 (the agent's
/// share for one source is then 2 187), and no more than a test process may open itself.
const FLOOD: usize = 3_000;
/// The other pod's requests, one every 10 ms, a new connection every 10.
const REQUESTS: usize = 500;

#[test]
fn a_flood_of_idle_connections_from_one_pod_leaves_the_node_serving_the_others() {
    if !require_privileged("hostile: connection flood") {
        return;
    }
    let mesh = CanaryMesh::start(&Canary::route(90, 10), &[1, 2]);
    let (canary, node1) = (&mesh.canary, mesh.agent(1));
    let flood = mesh.cluster.add_pod(1, "demo", "flood-6f8d9c7b5-q2w3e").expect("flood pod");
    node1.enrol(&flood);
    let service = SocketAddr::from((scenarios::BACKEND_VIP, 80));

    // The flood: connections opened as fast as the pod can, then held idle.
    let started = Instant::now();
    let held = flood
        .run(|| {
            let mut held = Vec::with_capacity(FLOOD);
            let deadline = Instant::now() + Duration::from_secs(60);
            while held.len() < FLOOD && Instant::now() < deadline {
                if let Ok(c) = TcpStream::connect_timeout(&service, Duration::from_secs(2)) {
                    held.push(c);
                }
            }
            held
        })
        .expect("enter the flood pod");
    eprintln!("hostile: the flood opened {} connections in {:?}", held.len(), started.elapsed());
    assert_eq!(held.len(), FLOOD, "every connect went through the kernel's handshake");

    // Meanwhile, a weight change reaches the proxy, and another pod is served.
    let before = node1.status().config_version;
    let changed = Instant::now();
    write_manifest(&mesh.dir.join("route.yaml"), &Canary::route(50, 50));
    let applied = node1.wait_for("the weight change", || {
        let v = node1.status().config_version;
        (v > before).then_some(()).ok_or(format!("still version {v}"))
    });
    assert!(applied.is_ok(), "the configuration keeps updating under the flood: {applied:?}");
    eprintln!("hostile: the weight change was in force {:?} after it was written", changed.elapsed());
    let (failures, mut latencies) = canary
        .client
        .run(|| {
            let (mut failures, mut latencies) = (Vec::new(), Vec::with_capacity(REQUESTS));
            let mut client = None;
            for i in 0..REQUESTS {
                let sent = Instant::now();
                if i % 10 == 0 {
                    client =
                        HttpClient::connect(service, "backend", TIMEOUT).map_err(|e| failures.push(e)).ok();
                }
                match client.as_mut().map(|c| c.get("/", &[])) {
                    Some(Ok(reply)) if reply.status == 200 => latencies.push(sent.elapsed()),
                    Some(Ok(reply)) => {
                        failures.push(std::io::Error::other(format!("status {}", reply.status)))
                    }
                    Some(Err(e)) => failures.push(e),
                    None => {}
                }
                std::thread::sleep(Duration::from_millis(10).saturating_sub(sent.elapsed()));
            }
            (failures, latencies)
        })
        .expect("enter the client pod");
    assert!(
        failures.is_empty(),
        "{} of {REQUESTS} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    eprintln!(
        "hostile: {REQUESTS} requests at 100 req/s during the flood, p99 {p99:?} (reported, not asserted)"
    );

    // The flood was refused past its share, and counted (its pod has no Pod object in this
    // world, so its source is `unknown`).
    let metrics = mesh
        .cluster
        .node(1)
        .run(|| {
            HttpClient::connect(SocketAddr::from((mesh.cluster.node(1).ip, 15020)), "m", TIMEOUT)?
                .get("/metrics", &[])
        })
        .expect("enter node1")
        .expect("metrics");
    let refused = metrics
        .body
        .lines()
        .find(|l| {
            l.starts_with("gammaray_connections_limited_total{") && l.contains("reason=\"source_limit\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok());
    assert!(refused.is_some_and(|n| n > 0), "the flood was refused past its share:\n{}", metrics.body);
    drop(held);
}

/// The timeouts that close slow and idle HTTP connections never cut a legitimate long-lived L4
/// connection: one quiet for `GAMMARAY_L4_IDLE_SECS` (75 s by default, past the relays' TCP
/// keepalive of 60 s; run once by hand with 600) still carries bytes both ways, across nodes
/// through HBONE.
#[test]
fn an_idle_l4_connection_across_nodes_still_works_after_the_quiet() {
    if !require_privileged("hostile: an idle L4 connection") {
        return;
    }
    const PORT: u16 = 9200;
    let idle = Duration::from_secs(
        std::env::var("GAMMARAY_L4_IDLE_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(75),
    );
    let mesh = CanaryMesh::start(&Canary::route(50, 50), &[1, 2]);
    let (mut conn, _dst, _echo) = open_stream(&mesh, PORT);
    echo_line(&mut conn, "before the quiet");
    eprintln!("hostile: an L4 connection through node1 and node2 stays quiet for {idle:?}");
    std::thread::sleep(idle);
    echo_line(&mut conn, "after the quiet");
}
