//! The inbound HBONE listener on loopback, through the proxy's front door: a CONNECT reaches only
//! a mesh pod of this node, never the node's own addresses or a pod on the host's network, and a
//! client of another trust domain is turned away, even with a certificate of the mesh's CA, as
//! is a client whose certificate comes through the CA of a node its identity does not run on.
//! Each refusal is counted by its reason.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use gammaray_agent::{
    store::Store,
    translate::{Options, translate},
};
use gammaray_proxy::{
    Inputs, Proxy, ProxyConfig,
    identity::{Authority, CertStore, Identity, Trust, TrustBundle, client_config, node_ca},
    orig_dst::StaticTable,
    stats::RefusalLabels,
};
use tokio::{io::AsyncWriteExt as _, net::TcpListener};

const TRUST_DOMAIN: &str = "cluster.local";

/// The mesh root, and node CAs of it as the signer would issue them.
struct Pki {
    root: Authority,
}

impl Pki {
    fn new() -> Self {
        Self { root: Authority::generate(TRUST_DOMAIN).expect("a mesh root") }
    }

    fn node(&self, node: &str) -> Authority {
        node_ca::issue_directly(&self.root, TRUST_DOMAIN, node, Duration::from_secs(3600)).expect("a node CA")
    }

    fn bundle(&self) -> TrustBundle {
        TrustBundle::of(&self.root)
    }
}

/// Node B and what runs there, on addresses of their own inside 127.0.0.0/8, and the client's
/// pod on node A.
struct World {
    node: Ipv4Addr,
    pod: Ipv4Addr,
    host_pod: Ipv4Addr,
    client: Ipv4Addr,
}

impl World {
    fn new() -> Self {
        let b = fastrand::u8(100..=250);
        Self {
            node: Ipv4Addr::new(127, b, 10, 2),
            pod: Ipv4Addr::new(127, b, 12, 1),
            host_pod: Ipv4Addr::new(127, b, 10, 9),
            client: Ipv4Addr::new(127, b, 11, 1),
        }
    }

    fn objects(&self) -> String {
        let Self { node, pod, host_pod, client } = self;
        format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: node-b}}\nstatus: {{addresses: [{{type: InternalIP, address: '{node}'}}]}}\n\
             ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: client, namespace: demo, uid: uid-client}}\n\
             spec: {{nodeName: node-a, serviceAccountName: client, containers: [{{name: app, image: app}}]}}\n\
             status: {{phase: Running, podIP: '{client}', podIPs: [{{ip: '{client}'}}]}}\n\
             ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: demo, uid: uid-web}}\n\
             spec: {{nodeName: node-b, serviceAccountName: web, containers: [{{name: app, image: app}}]}}\n\
             status: {{phase: Running, podIP: '{pod}', podIPs: [{{ip: '{pod}'}}]}}\n\
             ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: node-agent, namespace: demo, uid: uid-host}}\n\
             spec: {{nodeName: node-b, hostNetwork: true, serviceAccountName: web, containers: [{{name: app, image: app}}]}}\n\
             status: {{phase: Running, podIP: '{host_pod}', podIPs: [{{ip: '{host_pod}'}}]}}\n"
        )
    }
}

/// Opens an mTLS connection to node B at `node` as `client`, its certificate issued through the
/// CA of node `via`, expecting the server to be `server`, and sends a CONNECT to `target`; the
/// answer's status, or why there was none.
async fn connect(
    (pki, via): (&Pki, &str),
    node: SocketAddr,
    client: &Identity,
    server: &Identity,
    target: SocketAddr,
) -> Result<u16, String> {
    let issued = pki.node(via).issue(client).map_err(|e| e.to_string())?;
    let config = client_config(Arc::new(pki.bundle()), &issued, server.clone(), "node-b".into())
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from(server.server_name()).map_err(|e| e.to_string())?;
    let tcp = tokio::net::TcpStream::connect(node).await.map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (sender, conn) = h2::client::handshake(tls).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut sender = sender.ready().await.map_err(|e| e.to_string())?;
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(target.to_string())
        .body(())
        .expect("request");
    let (response, _send) = sender.send_request(req, false).map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .map_err(|_| "no answer in 5 s".to_owned())?
        .map_err(|e| e.to_string())?;
    Ok(response.status().as_u16())
}

/// Node B's proxy, and the snapshot it routes by.
struct NodeB {
    proxy: Proxy,
    snapshot: tokio::sync::watch::Sender<Arc<gammaray_proxy::snapshot::Snapshot>>,
}

/// Node B's world on loopback: the pod listening, and node B's proxy started with `config`
/// (its addresses, node and trust domain filled in) and its node CA from `pki`.
async fn node_b(world: &World, pki: &Pki, config: ProxyConfig) -> NodeB {
    let mut store = Store::default();
    let applied = store.apply_yaml(&world.objects());
    assert!(applied.errors.is_empty(), "{:?}", applied.errors);
    let snapshot = translate(&store, &Options { trust_domain: TRUST_DOMAIN.into(), version: 1 }).snapshot;
    let (publish, snapshot) = tokio::sync::watch::channel(Arc::new(snapshot));
    let pod = TcpListener::bind((world.pod, 8080)).await.expect("bind the pod");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = pod.accept().await {
            let _ = s.write_all(b"pod").await;
            // Held open until the client ends, as a real pod's connection would be.
            let mut sink = [0u8; 64];
            while matches!(tokio::io::AsyncReadExt::read(&mut s, &mut sink).await, Ok(n) if n > 0) {}
        }
    });
    let config = ProxyConfig {
        outbound_addr: SocketAddr::new(IpAddr::V4(world.node), 0),
        node: Some("node-b".into()),
        trust_domain: TRUST_DOMAIN.into(),
        ..config
    };
    let inputs = Inputs {
        snapshot,
        lookup: Arc::new(StaticTable::default()),
        certs: Some(Arc::new(CertStore::with_issuer(
            Arc::new(Trust::new(pki.bundle())),
            Arc::new(pki.node("node-b")),
        ))),
    };
    let proxy = Proxy::start(config, inputs, &tokio::runtime::Handle::current()).expect("node B's proxy");
    NodeB { proxy, snapshot: publish }
}

/// A peer that opens tunnels without end on one connection gets its share and then 503s,
/// counted against its identity; the node keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_opening_tunnels_without_end_is_refused_past_its_share() {
    let world = World::new();
    let pki = Pki::new();
    let node =
        node_b(&world, &pki, ProxyConfig { max_connections_per_source: 4, ..ProxyConfig::default() }).await;
    let proxy = &node.proxy;
    let hbone = proxy.inbound_addr().expect("an inbound listener");
    let client: Identity = "spiffe://cluster.local/ns/demo/sa/client".parse().expect("identity");
    let web: Identity = "spiffe://cluster.local/ns/demo/sa/web".parse().expect("identity");
    let issued = pki.node("node-a").issue(&client).expect("a certificate");
    let config =
        client_config(Arc::new(pki.bundle()), &issued, web.clone(), "node-b".into()).expect("client config");
    let name = rustls::pki_types::ServerName::try_from(web.server_name()).expect("server name");
    let tcp = tokio::net::TcpStream::connect(hbone).await.expect("connect");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.expect("mTLS");
    let (sender, conn) = h2::client::handshake(tls).await.expect("h2");
    tokio::spawn(conn);
    let pod = SocketAddr::new(IpAddr::V4(world.pod), 8080);
    let mut statuses = Vec::new();
    let mut open = Vec::new();
    for _ in 0..6 {
        let mut sender = sender.clone().ready().await.expect("ready");
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(pod.to_string())
            .body(())
            .expect("req");
        let (response, send) = sender.send_request(req, false).expect("CONNECT");
        let response =
            tokio::time::timeout(Duration::from_secs(5), response).await.expect("an answer").expect("h2");
        statuses.push(response.status().as_u16());
        open.push((send, response));
    }
    // The connection holds one place of the peer's four: three tunnels, then refusals.
    assert_eq!(statuses, [200, 200, 200, 503, 503, 503], "one peer's share");
    let labels = gammaray_proxy::stats::LimitLabels {
        listener: "hbone",
        reason: "source_limit",
        source: client.to_string(),
    };
    assert_eq!(proxy.stats().limited.get_or_create(&labels).get(), 3, "counted against the peer's identity");
    drop(open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hbone_reaches_only_mesh_pods_of_its_node_and_only_for_its_trust_domain() {
    let world = World::new();
    let pki = Pki::new();
    let ca = (&pki, "node-a");
    let node = node_b(&world, &pki, ProxyConfig::default()).await;
    let proxy = &node.proxy;
    assert!(
        !node.snapshot.borrow().workloads.contains_key(&IpAddr::V4(world.host_pod)),
        "a host-network pod is no workload"
    );
    // A port on the node's own address, as an agent's or a kubelet's would be.
    let node_port =
        TcpListener::bind((world.node, 0)).await.expect("bind on the node").local_addr().expect("addr");
    let hbone = proxy.inbound_addr().expect("an inbound listener with certificates");
    let refused = |reason| proxy.stats().hbone_refused.get_or_create(&RefusalLabels { reason }).get();

    let client: Identity = "spiffe://cluster.local/ns/demo/sa/client".parse().expect("identity");
    let web: Identity = "spiffe://cluster.local/ns/demo/sa/web".parse().expect("identity");
    let pod = SocketAddr::new(IpAddr::V4(world.pod), 8080);
    assert_eq!(connect(ca, hbone, &client, &web, pod).await, Ok(200), "a mesh pod of this node");

    let to_node = connect(ca, hbone, &client, &web, node_port).await;
    assert_eq!(to_node, Ok(403), "the node's own address");
    assert_eq!(refused("node_address"), 1);
    let to_admin = connect(ca, hbone, &client, &web, SocketAddr::new(IpAddr::V4(world.node), 15021)).await;
    assert_eq!(to_admin, Ok(403), "the node's admin port");
    assert_eq!(refused("node_address"), 2);

    let host_pod = SocketAddr::new(IpAddr::V4(world.host_pod), 8080);
    assert_eq!(connect(ca, hbone, &client, &web, host_pod).await, Ok(404), "a pod on the host's network");
    assert_eq!(refused("not_a_workload"), 1);

    let evil: Identity = "spiffe://evil.example/ns/demo/sa/client".parse().expect("identity");
    let foreign = connect(ca, hbone, &evil, &web, pod).await;
    assert!(foreign.is_err(), "another trust domain is turned away: {foreign:?}");
    assert_eq!(refused("foreign_trust_domain"), 1);

    // The client runs on node A: node C's CA (a node that may be compromised) cannot speak for
    // it, nor can node B's own.
    for via in ["node-c", "node-b"] {
        let impostor = connect((&pki, via), hbone, &client, &web, pod).await;
        assert!(impostor.is_err(), "a certificate through {via}'s CA is turned away: {impostor:?}");
    }
    assert_eq!(refused("wrong_node"), 2, "each counted");

    assert_eq!(connect(ca, hbone, &client, &web, pod).await, Ok(200), "the listener still serves");
}
