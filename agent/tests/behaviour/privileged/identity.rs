//! Node-scoped identity on the real data path: a node's CA speaks only for the pods of that
//! node, in both directions; a node CA that expires is renewed, and the mesh root is rotated,
//! under load without one failed request. The root's key is only ever in the signer's process.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use gammaray_agent::node_ca::{NodeCa, Way};
use gammaray_proxy::identity::{Authority, Identity, Trust, TrustBundle, client_config, server_config};
use gammaray_testkit::{
    agent::block_on,
    assert_eventually,
    http::HttpClient,
    require_privileged,
    scenarios::{self, Canary},
};

use super::support::*;

const TD: &str = "cluster.local";

/// What a compromised `node` holds: the node CA the signer issues to that node's agent.
fn node_ca_of(mesh: &CanaryMesh, node: &str) -> Authority {
    let access = mesh.signer.access();
    let ca = NodeCa {
        way: Way::Local(access.socket.clone()),
        token: access.token_for(node).expect("a token"),
        node: node.to_owned(),
        trust_domain: TD.to_owned(),
    };
    block_on(ca.issue()).expect("the signer issues the node its CA")
}

fn bundle(mesh: &CanaryMesh) -> TrustBundle {
    let (cert, _) = mesh.signer.root_pem().expect("the root");
    TrustBundle::from_pem(&cert).expect("the bundle")
}

/// One metric of node `n`'s agent, summed over its label sets that contain `labels`.
fn metric(mesh: &CanaryMesh, n: u8, name: &str, labels: &str) -> f64 {
    let node = mesh.cluster.node(n);
    let text = node
        .run(|| {
            HttpClient::connect(SocketAddr::from((node.ip, 15020)), "node", TIMEOUT)?.get("/metrics", &[])
        })
        .expect("enter the node")
        .expect("metrics")
        .body;
    text.lines()
        .filter(|l| l.starts_with(name) && (l[name.len()..].starts_with([' ', '{'])) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn id(sa: &str) -> Identity {
    format!("spiffe://{TD}/ns/demo/sa/{sa}").parse().expect("identity")
}

/// Opens mTLS to `to`'s HBONE port from node `from` presenting `cert` and expecting `expected`
/// through `to`'s CA; whether the server went on speaking HTTP/2 after the handshake.
fn served(
    mesh: &CanaryMesh,
    from: u8,
    to: u8,
    cert: &gammaray_proxy::identity::Issued,
    expected: &Identity,
) -> Result<(), String> {
    let trust = Arc::new(bundle(mesh));
    let config = client_config(trust, cert, expected.clone(), format!("node{to}").into()).expect("config");
    let addr = SocketAddr::from((mesh.cluster.node(to).ip, 15008));
    let name = rustls::pki_types::ServerName::try_from(expected.server_name()).expect("name");
    mesh.cluster
        .node(from)
        .run(|| {
            block_on(async {
                use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
                let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                    .connect(name, tcp)
                    .await
                    .map_err(|e| e.to_string())?;
                tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
                    .await
                    .map_err(|e| e.to_string())?;
                let mut buf = [0u8; 64];
                match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => Ok(()),
                    Ok(Ok(_)) => Err("closed".to_owned()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("no answer".to_owned()),
                }
            })
        })
        .expect("enter the node")
}

/// Always presents one certificate.
#[derive(Debug)]
struct Fixed(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for Fixed {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[test]
fn a_node_ca_speaks_only_for_its_own_nodes_pods_as_client_and_as_server() {
    if !require_privileged("node-scoped identity") {
        return;
    }
    let mut mesh = CanaryMesh::start(&Canary::route(50, 50), &[1, 2]);
    let client = id("client");
    let backend_v1 = id("backend-v1");

    // As client: the client's identity runs on node1 only. Through node1's CA node1 accepts
    // it; through node2's CA (a compromised node2 speaking for a pod it does not run), refused.
    let own = node_ca_of(&mesh, "node1").issue(&client).expect("cert");
    served(&mesh, 1, 1, &own, &backend_v1).expect("node1's CA speaks for node1's client");
    let impostor = node_ca_of(&mesh, "node2").issue(&client).expect("cert");
    let refused = served(&mesh, 2, 1, &impostor, &backend_v1);
    assert!(refused.is_err(), "node2's CA cannot speak for node1's client: {refused:?}");
    assert_eventually("node1 counts the refusal", TIMEOUT, || {
        let n = metric(&mesh, 1, "gammaray_hbone_refused_total", "reason=\"wrong_node\"");
        (n >= 1.0).then_some(n).ok_or(format!("{n}"))
    });
    assert_eventually("and says why", TIMEOUT, || {
        mesh.agent(1)
            .log_text()
            .lines()
            .find(|l| l.contains("runs no workload of its identity") && l.contains("peer_node=node2"))
            .map(str::to_owned)
            .ok_or("no line".to_owned())
    });

    // As server: node1's proxy dials node2 for a backend-v1 pod there. With node2's agent gone
    // and a server at its address presenting backend-v1 through node1's CA (backend-v1 runs on
    // node1 too, but this endpoint is node2's), node1 refuses it.
    let (pod, _) = mesh
        .canary
        .backends
        .iter()
        .find(|(p, _)| p.node == "node2" && p.name.starts_with("backend-v1"))
        .expect("a backend-v1 pod on node2");
    let dst = SocketAddr::from((pod.ip, scenarios::TARGET_PORT));
    assert!(answered_from(&mesh.canary.client, dst), "answered through node2 while its agent runs");
    let rogue_cert = node_ca_of(&mesh, "node1").issue(&backend_v1).expect("cert");
    let trust = Arc::new(Trust::new(bundle(&mesh)));
    let rogue_config =
        Arc::new(server_config(trust, TD, Arc::new(Fixed(rogue_cert.certified.clone()))).expect("config"));
    mesh.agents.iter_mut().find(|(n, _)| *n == 2).expect("node2's agent").1.kill();
    let stop = Arc::new(AtomicBool::new(false));
    let node2 = mesh.cluster.node(2);
    let listener = node2
        .run(|| std::net::TcpListener::bind((node2.ip, 15008)))
        .expect("enter node2")
        .expect("bind node2's HBONE port");
    listener.set_nonblocking(true).expect("nonblocking");
    let rogue = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let acceptor = tokio_rustls::TlsAcceptor::from(rogue_config);
                let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                let mut accepted = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed)
                    && tokio::time::Instant::now() < deadline
                {
                    if let Ok(Ok((tcp, _))) =
                        tokio::time::timeout(Duration::from_millis(100), listener.accept()).await
                    {
                        accepted += 1;
                        let _ = acceptor.accept(tcp).await;
                    }
                }
                accepted
            })
        })
    };
    assert!(!answered_from(&mesh.canary.client, dst), "node1 does not take node1's CA for node2's pod");
    assert_eventually("node1 counts the refused server", TIMEOUT, || {
        let n = metric(&mesh, 1, "gammaray_hbone_server_refused_total", "reason=\"wrong_node\"");
        (n >= 1.0).then_some(n).ok_or(format!("{n}"))
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(rogue.join().expect("the rogue server") >= 1, "node1 reached the rogue server");
}

/// Renews and rotations are judged by requests: steady load to the Service (L7, about 200 a
/// second) and new connections to a pod on node2 (each its own tunnel).
struct Traffic {
    service: Load,
    direct: Load,
}

impl Traffic {
    fn start(mesh: &CanaryMesh) -> Self {
        let service = SocketAddr::from((scenarios::BACKEND_VIP, 80));
        let (pod, _) = mesh.canary.backends.iter().find(|(p, _)| p.node == "node2").expect("a pod on node2");
        let direct = SocketAddr::from((pod.ip, scenarios::TARGET_PORT));
        Self {
            service: Load::start(&mesh.canary.client, service, "backend", 16, Duration::from_millis(85)),
            direct: Load::start(&mesh.canary.client, direct, "backend", 0, Duration::from_millis(50)),
        }
    }

    /// Stops the load; how many requests were answered, once none failed.
    fn finish_without_failures(self) -> usize {
        let (a, b) = (self.service.finish(), self.direct.finish());
        let answered = a.answers.len() + b.answers.len();
        let failures: Vec<String> = a.failures.into_iter().chain(b.failures).collect();
        assert!(
            failures.is_empty(),
            "{} of {answered} requests failed: {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
        answered
    }
}

#[test]
fn an_expiring_node_ca_is_renewed_under_load_with_no_failed_request() {
    if !require_privileged("node CA renewal") {
        return;
    }
    // Node CAs of 6 s, renewed at 3 s: the first of each node expires mid-test.
    let mesh = CanaryMesh::start_signed(
        &Canary::route(50, 50),
        &[1, 2],
        Default::default(),
        &["--node-ca-lifetime".into(), "6".into()],
    );
    let traffic = Traffic::start(&mesh);
    std::thread::sleep(Duration::from_secs(10));
    let answered = traffic.finish_without_failures();
    assert!(answered > 1000, "the load ran: {answered} answers");
    for n in [1, 2] {
        let renewals = metric(&mesh, n, "gammaray_node_ca_renewals_total", "");
        assert!(renewals >= 3.0, "node{n}'s CA was renewed while the load ran: {renewals}");
    }
    // Each node CA of node1 signed the client's certificate, and the new connections to node2
    // went through a new handshake with each: at least one dial per node CA.
    let node_cas = metric(&mesh, 1, "gammaray_node_ca_renewals_total", "");
    let dials = mesh.agent(1).log_text().matches("HBONE connection established").count();
    assert!(dials as f64 >= node_cas, "node1 dialled with each of its {node_cas} node CAs: {dials} dials");
    let signer = mesh.signer.log_text();
    assert!(signer.matches("node CA issued").count() >= 6, "{signer}");
}

fn rotate(mesh: &CanaryMesh, step: &str) {
    let out = std::process::Command::new(agent_bin())
        .args(["ca", "rotate", "--step", step, "--local"])
        .arg(&mesh.signer.dir)
        .output()
        .expect("run ca rotate");
    assert!(out.status.success(), "ca rotate {step}: {}", String::from_utf8_lossy(&out.stderr));
}

fn wait_all(mesh: &CanaryMesh, what: &str, name: &str, want: f64) {
    for n in [1, 2] {
        assert_eventually(&format!("node{n}: {what}"), TIMEOUT, || {
            let v = metric(mesh, n, name, "");
            (v == want).then_some(()).ok_or(format!("{name} = {v}"))
        });
    }
}

#[test]
fn a_root_rotation_under_load_fails_no_request() {
    if !require_privileged("root rotation") {
        return;
    }
    let mesh = CanaryMesh::start(&Canary::route(50, 50), &[1, 2]);
    let (old_root, old_key) = mesh.signer.root_pem().expect("the root");
    let traffic = Traffic::start(&mesh);
    std::thread::sleep(Duration::from_secs(1));
    rotate(&mesh, "add");
    wait_all(&mesh, "trusts the old and the new root", "gammaray_trust_bundle_roots", 2.0);
    std::thread::sleep(Duration::from_secs(1));
    rotate(&mesh, "use");
    for n in [1, 2] {
        assert_eventually(&format!("node{n} moves to a node CA of the new root"), TIMEOUT, || {
            let renewed = metric(&mesh, n, "gammaray_node_ca_renewals_total", "");
            let current = metric(&mesh, n, "gammaray_node_ca_current", "");
            (renewed >= 2.0 && current == 1.0)
                .then_some(())
                .ok_or(format!("renewals {renewed}, current {current}"))
        });
    }
    std::thread::sleep(Duration::from_secs(1));
    rotate(&mesh, "remove");
    wait_all(&mesh, "trusts the new root only", "gammaray_trust_bundle_roots", 1.0);
    std::thread::sleep(Duration::from_secs(2));
    let answered = traffic.finish_without_failures();
    assert!(answered > 500, "the load ran through the rotation: {answered} answers");
    let (new_root, _) = mesh.signer.root_pem().expect("the root");
    assert_ne!(old_root, new_root, "the root was replaced");
    // The old root's chains are refused now; the new root's are served.
    let old = Authority::from_pem(&old_root, &old_key).expect("the old root");
    let old_node1 =
        gammaray_proxy::identity::node_ca::issue_directly(&old, TD, "node1", Duration::from_secs(600))
            .expect("a node CA of the old root");
    let old_cert = old_node1.issue(&id("client")).expect("cert");
    assert!(served(&mesh, 1, 2, &old_cert, &id("backend-v1")).is_err(), "the old root is no longer trusted");
    let new_cert = node_ca_of(&mesh, "node1").issue(&id("client")).expect("cert");
    served(&mesh, 1, 2, &new_cert, &id("backend-v1")).expect("the new root is");
    let direct = SocketAddr::from((mesh.canary.backends[1].0.ip, scenarios::TARGET_PORT));
    assert!(answered_from(&mesh.canary.client, direct), "traffic flows on the new root");
}

/// An agent that takes over from another (an upgrade) loads the data path only once it has its
/// node CA: with the signer gone, the new agent waits and the old one goes on serving; once a
/// signer is back, the new one takes over, and no request fails.
#[test]
fn an_upgraded_agent_takes_over_only_once_it_has_its_node_ca() {
    if !require_privileged("take-over after the node CA") {
        return;
    }
    let mut mesh = CanaryMesh::start(&Canary::route(50, 50), &[1, 2]);
    let traffic = Traffic::start(&mesh);
    std::thread::sleep(Duration::from_secs(1));
    mesh.signer.kill();
    let dir = mesh.signer.dir.clone();
    let back = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        gammaray_testkit::signer::Signer::start(agent_bin(), &dir, &[]).expect("the signer again")
    });
    let args = gammaray_testkit::agent::AgentArgs {
        manifests: Some(mesh.dir.clone()),
        signer: Some(mesh.signer.access()),
        instance: Some("new".into()),
        ..Default::default()
    };
    // Returns once the new agent's control socket accepts: after the signer is back.
    let mut new = start_agent(&mesh.cluster, 1, args);
    let _signer = back.join().expect("the signer restarts");
    let log = new.log_text();
    let at =
        |what: &str| log.find(what).unwrap_or_else(|| panic!("no {what:?} in the new agent's log:\n{log}"));
    assert!(
        at("node CA issued") < at("eBPF programs attached"),
        "the new agent took over the data path before it had its node CA:\n{log}"
    );
    let old = &mut mesh.agents.iter_mut().find(|(n, _)| *n == 1).expect("node1's agent").1;
    old.terminate();
    assert!(
        old.wait_exit(Duration::from_secs(20)).is_some_and(|s| s.success()),
        "the old agent drains and exits"
    );
    std::thread::sleep(Duration::from_secs(1));
    let answered = traffic.finish_without_failures();
    assert!(answered > 500, "the load ran through the hand-over: {answered} answers");
    new.stop(Duration::from_secs(5));
}
