//! Mutual TLS between nodes: SPIFFE identities on the wire, opaque streams through the tunnels,
//! refused certificates.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use gammaray_testkit::{
    agent::block_on,
    assert_eventually,
    http::HttpClient,
    require_privileged,
    scenarios::{self, Canary},
};

use super::support::*;

#[test]
fn between_nodes_traffic_is_mutual_tls_with_spiffe_identities() {
    if !require_privileged("mtls") {
        return;
    }
    let mesh = CanaryMesh::start(&Canary::route(50, 50), &[1, 2]);
    let (cluster, canary, node1, node2) = (&mesh.cluster, &mesh.canary, mesh.agent(1), mesh.agent(2));

    const MARKER: &str = "plaintext-marker-7f3a91";
    let (counts, wire) = capture_fabric(cluster, || {
        canary
            .client
            .run(|| {
                let mut client =
                    HttpClient::connect(SocketAddr::from((scenarios::BACKEND_VIP, 80)), "backend", TIMEOUT)
                        .expect("connect");
                let mut counts = std::collections::BTreeMap::<String, usize>::new();
                for i in 0..200 {
                    let reply = client
                        .get("/", &[("x-secret", MARKER)])
                        .unwrap_or_else(|e| panic!("request {i}: {e}"));
                    assert_eq!(reply.status, 200, "{}", reply.body);
                    assert_eq!(reply.fields.get("header:x-secret").map(String::as_str), Some(MARKER));
                    *counts.entry(reply.fields["hostname"].clone()).or_default() += 1;
                }
                counts
            })
            .expect("enter client pod")
    });
    assert!(
        counts.keys().any(|h| canary.backends.iter().any(|(p, _)| &p.name == h && p.node == "node2")),
        "some requests crossed to node2: {counts:?}"
    );
    assert!(wire.len() > 1000, "the capture saw traffic between the nodes ({} bytes)", wire.len());
    assert!(
        !wire.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
        "the request's plaintext crossed the wire between nodes"
    );
    // TLS 1.3 application data records on the wire.
    assert!(wire.windows(3).any(|w| w == [0x17, 0x03, 0x03]), "TLS records between the nodes");

    let st1 = node1.status();
    assert!(st1.outbound.hbone_tunnels > 0, "node1 tunnelled: {:?}", st1.outbound);
    let st2 = node2.status();
    assert!(st2.outbound.inbound_tunnels > 0, "node2 accepted tunnels: {:?}", st2.outbound);
    assert_eventually("node2 logs the client's SPIFFE identity", TIMEOUT, || {
        let log = node2.log_text();
        log.lines()
            .find(|l| {
                l.contains("inbound") && l.contains("src_identity=spiffe://cluster.local/ns/demo/sa/client")
            })
            .map(str::to_owned)
            .ok_or_else(|| format!("no inbound line with the client identity in:\n{log}"))
    });

    // A certificate from another root is refused at the handshake, and counted.
    use gammaray_proxy::identity::{Authority, TrustBundle, client_config, node_ca};
    let rogue = Authority::generate("cluster.local").expect("rogue root");
    let rogue_node1 = node_ca::issue_directly(&rogue, "cluster.local", "node1", Duration::from_secs(600))
        .expect("rogue node CA");
    let cert = rogue_node1
        .issue(&"spiffe://cluster.local/ns/demo/sa/client".parse().expect("identity"))
        .expect("rogue cert");
    let expected: gammaray_proxy::identity::Identity =
        "spiffe://cluster.local/ns/demo/sa/backend-v1".parse().expect("identity");
    let config =
        client_config(std::sync::Arc::new(TrustBundle::of(&rogue)), &cert, expected.clone(), "node2".into())
            .expect("config");
    let node2_addr = SocketAddr::from((cluster.node(2).ip, 15008));
    let refused = cluster
        .node(1)
        .run(|| {
            block_on(async {
                let tcp = tokio::net::TcpStream::connect(node2_addr).await.expect("reach node2");
                let name = rustls::pki_types::ServerName::try_from(expected.server_name()).expect("name");
                tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
                    .connect(name, tcp)
                    .await
                    .is_err()
            })
        })
        .expect("enter node1");
    assert!(refused, "a handshake with a certificate from another CA fails");
    assert_eventually("node2 counts the refused handshake", TIMEOUT, || {
        let n = node2.status().outbound.tls_refused;
        (n > 0).then_some(n).ok_or("no refusal counted".to_owned())
    });
}

/// Opaque TCP to a pod on another node goes through both nodes' tunnel relays: a 3 MiB stream
/// must arrive whole, the client's end (a half-close) must reach the pod while the way back is
/// still open, and the answer must come back whole after it.
#[test]
fn a_tcp_stream_to_a_pod_on_another_node_arrives_whole_and_its_half_close_passes_through() {
    if !require_privileged("tcp through the tunnel") {
        return;
    }
    const PORT: u16 = 9100;
    let mesh = CanaryMesh::start(&Canary::route(50, 50), &[1, 2]);
    let (node1, node2) = (mesh.agent(1), mesh.agent(2));
    let (pod, _) = mesh.canary.backends.iter().find(|(p, _)| p.node == "node2").expect("a backend on node2");
    let listener = pod.run(|| std::net::TcpListener::bind((pod.ip, PORT))).expect("enter pod").expect("bind");
    listener.set_nonblocking(true).expect("non-blocking accept");
    // The pod reads to the client's end, then answers with what it got, reversed.
    let server = std::thread::spawn(move || -> Result<usize, String> {
        let deadline = std::time::Instant::now() + TIMEOUT;
        let mut conn = loop {
            match listener.accept() {
                Ok((conn, _)) => break conn,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => return Err(format!("no connection reached the pod: {e}")),
            }
        };
        conn.set_nonblocking(false).map_err(|e| e.to_string())?;
        conn.set_read_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
        let mut got = Vec::new();
        conn.read_to_end(&mut got).map_err(|e| format!("reading to the client's end: {e}"))?;
        got.reverse();
        conn.write_all(&got).map_err(|e| format!("answering after the client's end: {e}"))?;
        Ok(got.len())
    });
    let data: Vec<u8> = (0..3usize << 20).map(|i| (i % 251) as u8).collect();
    let answer = mesh
        .canary
        .client
        .run(|| -> std::io::Result<Vec<u8>> {
            let mut conn = TcpStream::connect_timeout(&SocketAddr::from((pod.ip, PORT)), TIMEOUT)?;
            conn.set_read_timeout(Some(TIMEOUT))?;
            conn.set_write_timeout(Some(TIMEOUT))?;
            conn.write_all(&data)?;
            conn.shutdown(std::net::Shutdown::Write)?;
            let mut answer = Vec::new();
            conn.read_to_end(&mut answer)?;
            Ok(answer)
        })
        .expect("enter client pod")
        .expect("send, end, and read the answer to its end");
    let at_pod = server.join().expect("pod thread").expect("the pod's side");
    assert_eq!(at_pod, data.len(), "the pod got all the client sent");
    assert_eq!(answer.len(), data.len(), "the client got the whole answer");
    assert!(answer.iter().rev().eq(data.iter()), "the answer is the data reversed, byte for byte");
    // This is the only L4 connection through node1, so its counts are exact: a relay that
    // counted a byte twice, or lost one, shows here.
    assert_eventually("node1 counts the tunnelled bytes both ways, exactly", TIMEOUT, || {
        let o = node1.status().outbound;
        (o.hbone_tunnels > 0 && o.bytes_sent == data.len() as u64 && o.bytes_received == data.len() as u64)
            .then_some(())
            .ok_or(format!("{o:?}"))
    });
    assert!(node2.status().outbound.inbound_tunnels > 0, "node2 accepted the tunnel");
}

#[test]
fn an_expired_certificate_and_a_wrong_identity_are_refused_by_a_real_node() {
    if !require_privileged("refusals") {
        return;
    }
    use gammaray_proxy::identity::{Authority, Identity, TrustBundle, client_config, node_ca};
    let mesh = CanaryMesh::start("", &[2]);
    let (cluster, node2) = (&mesh.cluster, mesh.agent(2));
    let (root_cert, root_key) = mesh.signer.root_pem().expect("the signer's root");
    let root = Authority::from_pem(&root_cert, &root_key).expect("the mesh root");
    // The client's own node's CA, as node1's agent holds it.
    let ca =
        node_ca::issue_directly(&root, "cluster.local", "node1", Duration::from_secs(600)).expect("node CA");
    let client: Identity = "spiffe://cluster.local/ns/demo/sa/client".parse().expect("identity");
    let backend: Identity = "spiffe://cluster.local/ns/demo/sa/backend-v1".parse().expect("identity");
    let node2_addr = SocketAddr::from((cluster.node(2).ip, 15008));
    let attempt = |config: rustls::ClientConfig, sni: &Identity| -> Result<(), String> {
        let name = rustls::pki_types::ServerName::try_from(sni.server_name()).expect("name");
        cluster
            .node(1)
            .run(|| {
                block_on(async {
                    let tcp = tokio::net::TcpStream::connect(node2_addr).await.map_err(|e| e.to_string())?;
                    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
                        .connect(name, tcp)
                        .await
                        .map_err(|e| e.to_string())?;
                    // TLS 1.3 reports a refused client certificate on the first read.
                    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.map_err(|e| e.to_string())?;
                    let mut buf = [0u8; 64];
                    match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => Ok(()),
                        Ok(Ok(_)) => Err("closed".to_owned()),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("no answer".to_owned()),
                    }
                })
            })
            .expect("enter node1")
    };
    let roots = std::sync::Arc::new(TrustBundle::of(&root));
    let config = |cert: &gammaray_proxy::identity::Issued, expected: &Identity| {
        client_config(roots.clone(), cert, expected.clone(), "node2".into()).expect("config")
    };
    let good = ca.issue(&client).expect("cert");
    attempt(config(&good, &backend), &backend).expect("a valid certificate from the mesh CA is accepted");

    let expired = ca
        .issue_at(&client, std::time::SystemTime::now() - Duration::from_secs(300), Duration::from_secs(60))
        .expect("expired cert");
    let err =
        attempt(config(&expired, &backend), &backend).expect_err("an expired client certificate is refused");
    eprintln!("expired: {err}");

    // The node presents backend-v1's certificate; a client expecting backend-v2 refuses it.
    let v2: Identity = "spiffe://cluster.local/ns/demo/sa/backend-v2".parse().expect("identity");
    let err = attempt(config(&good, &v2), &backend).expect_err("a server with the wrong identity is refused");
    assert!(err.contains("IdentityMismatch"), "{err}");
    assert_eventually("node2 counts the refused handshakes", TIMEOUT, || {
        let n = node2.status().outbound.tls_refused;
        (n >= 2).then_some(n).ok_or(format!("{n} refusals counted"))
    });
}
