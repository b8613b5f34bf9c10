//! GAMMA routing through real agents: a canary split and its live weight change, header
//! routing.

use std::{net::SocketAddr, time::Duration};

use gammaray_testkit::{
    agent::block_on,
    assert_eventually,
    http::HttpClient,
    require_privileged,
    scenarios::{self, Canary},
};

use super::support::*;

#[test]
fn a_90_10_canary_through_real_agents_splits_and_follows_a_weight_change() {
    if !require_privileged("canary") {
        return;
    }
    let mesh = CanaryMesh::start(&Canary::route(90, 10), &[1, 2]);
    let (canary, dir, agent, agent2) = (&mesh.canary, &mesh.dir, mesh.agent(1), mesh.agent(2));

    let counts = canary_split(&canary.client, 1000);
    let v2 = counts.get("hello from backend v2").copied().unwrap_or(0);
    assert!((70..=130).contains(&v2), "10% ± 3 to v2, got {counts:?}");
    // Every backend pod, on both nodes, took part.
    for (pod, server) in &canary.backends {
        assert!(server.served() > 0 || pod.name.starts_with("backend-v2"), "{} served nothing", pod.name);
    }
    let status = agent.status();
    assert_eq!(status.kernel.redirected, 1, "one keep-alive connection, redirected once");
    assert_eq!(status.outbound.requests, 1000);
    assert!(status.outbound.hbone_tunnels > 0, "requests to node2's pods went through HBONE");
    // The node's surfaces: health and readiness on the admin endpoint, the metrics of what just
    // happened on their own, and the configuration on the control socket only.
    let node1 = mesh.cluster.node(1).ip;
    let (admin, metrics_at) = (SocketAddr::from((node1, 15021)), SocketAddr::from((node1, 15020)));
    let (health, ready, metrics, dump_on_admin) = mesh
        .cluster
        .node(1)
        .run(|| {
            let mut c = HttpClient::connect(admin, "admin", TIMEOUT).expect("admin endpoint");
            let mut m = HttpClient::connect(metrics_at, "metrics", TIMEOUT).expect("metrics endpoint");
            (
                c.get("/healthz", &[]).expect("healthz"),
                c.get("/readyz", &[]).expect("readyz"),
                m.get("/metrics", &[]).expect("metrics"),
                c.get("/config_dump", &[]).expect("config_dump"),
            )
        })
        .expect("enter node1");
    assert_eq!(dump_on_admin.status, 403, "the node's address is not its loopback: {}", dump_on_admin.body);
    let from_pod = canary
        .client
        .run(|| HttpClient::connect(admin, "admin", TIMEOUT).and_then(|mut c| c.get("/config_dump", &[])))
        .expect("enter the client pod")
        .expect("the admin endpoint answers a pod");
    assert_eq!(from_pod.status, 403, "a pod cannot read the mesh's configuration: {}", from_pod.body);
    let dump = block_on(agent.control().config_dump()).expect("config_dump on the control socket");
    let dump: serde_json::Value = serde_json::from_str(&dump).expect("config_dump is JSON");
    assert!(dump["services"]["demo/backend"].as_str().is_some_and(|d| d.contains("backend-v2")), "{dump}");
    assert!(dump["routeStatuses"].as_array().is_some_and(|r| !r.is_empty()), "{dump}");
    assert_eq!(dump["status"]["node"], "node1");
    assert_eq!((health.status, ready.status), (200, 200), "{}", ready.body);
    // Whole names, at the start of a line: a doubled prefix must not pass as a suffix.
    for needle in [
        "\ngammaray_redirects_total 1\n",
        "\ngammaray_hbone_tunnels_total ",
        "\ngammaray_certificate_expiry_timestamp_seconds ",
        "\ngammaray_requests_total{source_workload=\"demo/client\",destination_service=\"demo/backend:80\",backend=\"demo/backend-v2:80\",response_code=\"200\"}",
    ] {
        assert!(metrics.body.contains(needle), "missing {needle:?} in:\n{}", metrics.body);
    }
    assert!(!metrics.body.contains("gammaray_gammaray_"), "one prefix per name:\n{}", metrics.body);
    assert!(agent2.status().outbound.inbound_tunnels > 0);

    // Shift to 50/50 while requests flow: none fails, and the new split takes over.
    let before = status.config_version;
    let control = agent.control();
    let shifter = std::thread::spawn({
        let path = dir.join("route.yaml");
        move || {
            std::thread::sleep(Duration::from_millis(200));
            write_manifest(&path, &Canary::route(50, 50));
            // How long until the proxy routes by the new weights (measured, not asserted).
            let written = std::time::Instant::now();
            while block_on(control.status()).map(|s| s.config_version).unwrap_or(0) <= before
                && written.elapsed() < Duration::from_secs(10)
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            eprintln!("weight change in force {:?} after the manifest was written", written.elapsed());
        }
    });
    let during = canary_split(&canary.client, 600);
    shifter.join().expect("shifter");
    assert_eq!(during.values().sum::<usize>(), 600, "no request failed across the change");
    assert_eventually("the new weights are applied", TIMEOUT, || {
        let v = agent.status().config_version;
        (v > before).then_some(v).ok_or(format!("still version {v}"))
    });
    let after = canary_split(&canary.client, 1000);
    let v2 = after.get("hello from backend v2").copied().unwrap_or(0);
    assert!((430..=570).contains(&v2), "50% ± 7 to v2 after the change, got {after:?}");
}

#[test]
fn header_routing_adds_a_header_only_on_matched_requests() {
    if !require_privileged("header-routing") {
        return;
    }
    let route = "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: reviews, namespace: demo}\nspec:\n  parentRefs: [{group: '', kind: Service, name: backend, port: 80}]\n  rules:\n  - matches: [{headers: [{name: x-user, value: tester}]}]\n    filters: [{type: RequestHeaderModifier, requestHeaderModifier: {add: [{name: x-canary, value: 'true'}]}}]\n    backendRefs: [{name: backend-v2, port: 80}]\n  - backendRefs: [{name: backend-v1, port: 80}]\n";
    let mesh = CanaryMesh::start(route, &[1, 2]);
    let canary = &mesh.canary;
    canary
        .client
        .run(|| {
            let mut c =
                HttpClient::connect(SocketAddr::from((scenarios::BACKEND_VIP, 80)), "backend", TIMEOUT)
                    .expect("connect");
            for i in 0..40 {
                let tester = i % 2 == 0;
                let headers: &[(&str, &str)] =
                    if tester { &[("x-user", "tester")] } else { &[("x-user", "someone")] };
                let reply = c.get("/reviews/1", headers).expect("request");
                assert_eq!(reply.status, 200, "{}", reply.body);
                if tester {
                    assert_eq!(reply.fields["message"], "hello from backend v2");
                    assert_eq!(reply.fields.get("header:x-canary").map(String::as_str), Some("true"));
                } else {
                    assert_eq!(reply.fields["message"], "hello from backend v1");
                    assert!(!reply.fields.contains_key("header:x-canary"), "no header on unmatched requests");
                }
            }
        })
        .expect("enter client pod");
}

/// What a progressive delivery controller (Flagger) does to a route: 90/10 → 50/50 → 0/100,
/// each step written while a client calls steadily, across nodes, on keep-alive connections and
/// on new ones. No request fails; after each step is in force the split is the step's. How long
/// each step took to reach the client is printed (the bench measures it; not asserted here).
#[test]
fn progressive_weight_steps_under_load_fail_no_request() {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicBool, Ordering::Relaxed},
        },
        time::Instant,
    };
    if !require_privileged("canary steps") {
        return;
    }
    let mesh = CanaryMesh::start(&Canary::route(90, 10), &[1, 2]);
    let (canary, dir, agent) = (&mesh.canary, &mesh.dir, mesh.agent(1));
    let stop = Arc::new(AtomicBool::new(false));
    let load = std::thread::spawn({
        let (client, stop) = (canary.client.clone(), stop.clone());
        move || {
            client
                .run(|| {
                    let service = SocketAddr::from((scenarios::BACKEND_VIP, 80));
                    let (mut answers, mut failures) = (Vec::new(), Vec::new());
                    let mut conn = None;
                    // Bounded: the main thread stops it within seconds; the cap is a backstop.
                    for i in 0..20_000 {
                        if stop.load(Relaxed) {
                            break;
                        }
                        // Every fourth request on a new connection, the rest kept alive.
                        if i % 4 == 0 {
                            conn = None;
                        }
                        let sent = Instant::now();
                        let reply = match conn.as_mut() {
                            Some(c) => HttpClient::get(c, "/", &[]),
                            None => HttpClient::connect(service, "backend", TIMEOUT).and_then(|mut c| {
                                let r = c.get("/", &[]);
                                conn = Some(c);
                                r
                            }),
                        };
                        match reply {
                            Ok(r) if r.status == 200 => answers.push((sent, r.fields["message"].clone())),
                            Ok(r) => failures.push(format!("request {i}: status {}: {}", r.status, r.body)),
                            Err(e) => {
                                failures.push(format!("request {i}: {e}"));
                                conn = None;
                            }
                        }
                        std::thread::sleep(Duration::from_millis(4));
                    }
                    (answers, failures)
                })
                .expect("enter the client pod")
        }
    });
    let mut steps = Vec::new();
    for (v1, v2) in [(50, 50), (0, 100)] {
        std::thread::sleep(Duration::from_millis(800));
        let before = agent.status().config_version;
        write_manifest(&dir.join("route.yaml"), &Canary::route(v1, v2));
        let written = Instant::now();
        assert_eventually("the step is in force", TIMEOUT, || {
            let v = agent.status().config_version;
            (v > before).then_some(()).ok_or(format!("still version {v}"))
        });
        steps.push((v2, written, Instant::now()));
    }
    std::thread::sleep(Duration::from_millis(1200));
    stop.store(true, Relaxed);
    let (answers, failures) = load.join().expect("the load thread");
    assert!(failures.is_empty(), "{} of {} requests failed: {failures:?}", failures.len(), answers.len());
    let is_v2 = |m: &str| m == "hello from backend v2";
    for (k, &(v2, written, in_force)) in steps.iter().enumerate() {
        // Requests sent once the step is in force, until the next step is written.
        let until = steps.get(k + 1).map(|s| s.1);
        let window: Vec<_> = answers
            .iter()
            .filter(|(sent, _)| {
                *sent > in_force + Duration::from_millis(50) && until.is_none_or(|u| *sent < u)
            })
            .collect();
        assert!(window.len() >= 100, "step to {v2}% v2: {} requests in its window", window.len());
        let share = window.iter().filter(|(_, m)| is_v2(m)).count() * 100 / window.len();
        match v2 {
            100 => assert_eq!(share, 100, "after 0/100 every answer is v2"),
            _ => assert!((35..=65).contains(&share), "50/50: {share}% to v2 of {}", window.len()),
        }
        let last_old = answers
            .iter()
            .filter(|(sent, m)| *sent > written && v2 == 100 && !is_v2(m))
            .map(|(sent, _)| sent.duration_since(written))
            .max();
        eprintln!(
            "canary steps: to {v2}% v2 in force {:?} after the write; last v1 answer {:?} after it",
            in_force.duration_since(written),
            last_old
        );
    }
    eprintln!("canary steps: {} requests, none failed", answers.len());
}
