use std::{
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::*;

fn id(ns: &str, sa: &str) -> Identity {
    Identity { trust_domain: "cluster.local".into(), namespace: ns.into(), service_account: sa.into() }
}

#[test]
fn identities_parse_print_and_travel_in_sni() {
    let i: Identity = "spiffe://cluster.local/ns/demo/sa/backend-v1".parse().expect("parses");
    assert_eq!(i, id("demo", "backend-v1"));
    assert_eq!(i.to_string(), "spiffe://cluster.local/ns/demo/sa/backend-v1");
    assert_eq!(Identity::from_server_name(&i.server_name(), "cluster.local"), Some(i));
    for bad in ["spiffe://td/ns/a", "https://td/ns/a/sa/b", "spiffe:///ns/a/sa/b", "spiffe://td/ns//sa/b"] {
        assert!(bad.parse::<Identity>().is_err(), "{bad}");
    }
    assert_eq!(Identity::from_server_name("a.b.c.id.gammaray", "td"), None);
    assert_eq!(Identity::from_server_name("example.org", "td"), None);
}

const TD: &str = "cluster.local";

/// A root and node CAs of it.
struct Pki {
    root: Arc<Authority>,
}

impl Pki {
    fn new() -> Self {
        Self { root: Arc::new(Authority::generate(TD).expect("root")) }
    }

    fn node(&self, node: &str) -> Arc<Authority> {
        Arc::new(node_ca::issue_directly(&self.root, TD, node, Duration::from_secs(3600)).expect("node CA"))
    }

    fn bundle(&self) -> TrustBundle {
        TrustBundle::of(&self.root)
    }
}

#[test]
fn issued_certificates_carry_the_identity_and_renew_at_half_life_or_with_a_new_node_ca() {
    let pki = Pki::new();
    let store = CertStore::new(Arc::new(Trust::new(pki.bundle())));
    assert!(
        matches!(store.get(&id("demo", "web")), Err(IdentityError::NoNodeCa)),
        "nothing before a node CA"
    );
    // A node CA of a day, so that a workload certificate's own lifetime decides.
    let node =
        Arc::new(node_ca::issue_directly(&pki.root, TD, "node1", Duration::from_secs(24 * 3600)).unwrap());
    store.set_issuer(node.clone());
    let now = SystemTime::now();
    let first = store.get_at(&id("demo", "web"), now).expect("issue");
    assert_eq!(identity_of(&first.certified.cert[0]).expect("identity"), id("demo", "web"));
    assert_eq!(first.certified.cert.len(), 2, "the leaf travels with its node CA");
    assert_eq!(node_ca::peer_node(&first.certified.cert).as_deref(), Some("node1"));
    assert!(first.not_after <= node.not_after, "a leaf never outlives its node CA");
    let same = store.get_at(&id("demo", "web"), now + Duration::from_secs(3600)).expect("cached");
    assert_eq!(same.not_before, first.not_before, "still the first certificate before half life");
    let renewed = store.get_at(&id("demo", "web"), now + Duration::from_secs(13 * 3600)).expect("renewed");
    assert!(renewed.not_before > first.not_before, "renewed after half life");
    // A new node CA: the next certificate is its, at once.
    let next =
        Arc::new(node_ca::issue_directly(&pki.root, TD, "node1", Duration::from_secs(24 * 3600)).unwrap());
    store.set_issuer(next.clone());
    let moved = store.get_at(&id("demo", "web"), now + Duration::from_secs(13 * 3600)).expect("moved");
    assert_eq!(moved.certified.cert[1], *next.cert_der(), "issued by the new node CA");
    // The root round-trips through PEM, as it does through the signer's files.
    let again = Authority::from_pem(pki.root.cert_pem(), &pki.root.key_pem()).expect("reload CA");
    assert_eq!(again.cert_der(), pki.root.cert_der());
}

#[test]
fn an_expired_node_ca_issues_nothing() {
    let pki = Pki::new();
    let node = pki.node("node1");
    let after = node.not_after + Duration::from_secs(1);
    assert!(matches!(node.issue_at(&id("demo", "web"), after, CERT_LIFETIME), Err(IdentityError::Expired)));
}

#[test]
fn the_signer_reads_a_node_ca_request_and_refuses_other_names() {
    let pki = Pki::new();
    let (_, csr) = node_ca::request(TD, "node1").expect("request");
    let reviewed = node_ca::review(&csr, TD).expect("a clean request");
    assert_eq!(reviewed.node, "node1");
    let signed = node_ca::sign(&pki.root, &reviewed, TD, Duration::from_secs(60)).expect("signed");
    let der = super::pem_to_der(&signed).expect("PEM");
    assert_eq!(node_ca::node_of(&der).expect("names its node"), (TD.to_owned(), "node1".to_owned()));
    let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref()).expect("parses");
    let bc = parsed.basic_constraints().expect("ok").expect("present").value;
    assert!(bc.ca && bc.path_len_constraint == Some(0), "a CA that signs only leaves: {bc:?}");

    // Another trust domain's node, extra names, and no names at all.
    let (_, foreign) = node_ca::request("evil.example", "node1").expect("request");
    let err = node_ca::review(&foreign, TD).err().expect("another trust domain");
    assert_eq!(err.reason(), "UnexpectedNames");
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec!["api.example.com".to_owned()]).expect("params");
    params
        .subject_alt_names
        .push(SanType::URI(rcgen::string::Ia5String::try_from(node_ca::node_uri(TD, "node1")).expect("uri")));
    let extra = params.serialize_request(&key).expect("csr").pem().expect("pem");
    let err = node_ca::review(&extra, TD).err().expect("extra names");
    assert!(matches!(&err, node_ca::Refusal::Names { got, .. } if got.len() == 2), "{err}");
    assert!(err.to_string().contains("DNS:api.example.com"), "{err}");
    let bare =
        CertificateParams::new(Vec::<String>::new()).unwrap().serialize_request(&key).unwrap().pem().unwrap();
    assert_eq!(node_ca::review(&bare, TD).err().expect("no name").reason(), "UnexpectedNames");
    // Garbage, and a request whose signature does not match its content.
    assert_eq!(node_ca::review("hello", TD).err().expect("garbage").reason(), "MalformedRequest");
    let mut tampered = pem::parse(&csr).expect("pem");
    let body = tampered.contents().to_vec();
    let mut body = body;
    let n = body.len();
    body[n - 5] ^= 0x55;
    tampered = pem::Pem::new("CERTIFICATE REQUEST", body);
    assert_eq!(
        node_ca::review(&pem::encode(&tampered), TD).err().expect("bad signature").reason(),
        "MalformedRequest"
    );
}

/// Runs one handshake between a server holding `server_cert` (trusting `server_trust`) and a
/// client presenting `client_cert` (trusting `client_trust`, expecting `expected` through the
/// CA of `node`). Returns the client identity and node the server saw and the cipher suite the
/// client negotiated, or the error of whichever side failed.
async fn handshake(
    server_trust: &TrustBundle,
    server_cert: Issued,
    client_trust: &TrustBundle,
    client_cert: &Issued,
    (expected, node): (Identity, &str),
) -> Result<(Identity, String, rustls::CipherSuite), String> {
    #[derive(Debug)]
    struct Fixed(Arc<CertifiedKey>);
    impl rustls::server::ResolvesServerCert for Fixed {
        fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
            Some(self.0.clone())
        }
    }
    let copy = |b: &TrustBundle| TrustBundle::from_pem(b.pem()).expect("bundle");
    let server = server_config(
        Arc::new(Trust::new(copy(server_trust))),
        TD,
        Arc::new(Fixed(server_cert.certified.clone())),
    )
    .expect("server config");
    let client = client_config(Arc::new(copy(client_trust)), client_cert, expected.clone(), node.into())
        .expect("client config");
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let server_side = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut tls = acceptor.accept(tcp).await.map_err(|e| format!("server: {e}"))?;
        let chain = tls.get_ref().1.peer_certificates().ok_or("no client cert")?.to_vec();
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| format!("server read: {e}"))?;
        tls.write_all(&buf).await.map_err(|e| format!("server write: {e}"))?;
        let node = node_ca::peer_node(&chain).ok_or("no node CA")?;
        identity_of(&chain[0]).map(|id| (id, node)).map_err(|e| e.to_string())
    });
    let connector = TlsConnector::from(Arc::new(client));
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from(expected.server_name()).expect("server name");
    let client_result = async {
        let mut tls = connector.connect(name, tcp).await.map_err(|e| format!("client: {e}"))?;
        tls.write_all(b"ping").await.map_err(|e| format!("client write: {e}"))?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| format!("client read: {e}"))?;
        tls.get_ref()
            .1
            .negotiated_cipher_suite()
            .map(|s| s.suite())
            .ok_or_else(|| "no cipher suite".to_owned())
    }
    .await;
    let server_result = server_side.await.expect("server task");
    let suite = client_result?;
    let (id, node) = server_result?;
    Ok((id, node, suite))
}

#[tokio::test]
async fn mutual_tls_with_spiffe_identities_through_node_cas() {
    let pki = Pki::new();
    let client = pki.node("node1").issue(&id("demo", "client")).expect("client cert");
    let server = pki.node("node2").issue(&id("demo", "backend")).expect("server cert");
    let (seen, node, suite) =
        handshake(&pki.bundle(), server, &pki.bundle(), &client, (id("demo", "backend"), "node2"))
            .await
            .expect("handshake");
    assert_eq!(seen, id("demo", "client"), "the server records the client's identity");
    assert_eq!(node, "node1", "and the node that vouches for it");
    // Both ends offer the provider's suites in its order; the first is the one tunnels pay for
    // per byte, so a change of order shows here.
    assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
}

#[tokio::test]
async fn another_root_an_expired_certificate_and_a_wrong_identity_are_refused() {
    let (pki, rogue) = (Pki::new(), Pki::new());
    let client = pki.node("node1").issue(&id("demo", "client")).expect("client");
    let node2 = pki.node("node2");
    let server = node2.issue(&id("demo", "backend")).expect("server");
    let backend = || (id("demo", "backend"), "node2");

    let rogue_server = rogue.node("node2").issue(&id("demo", "backend")).expect("rogue server");
    let err = handshake(&pki.bundle(), rogue_server, &pki.bundle(), &client, backend())
        .await
        .expect_err("a server certificate from another root");
    assert!(err.contains("UnknownIssuer") || err.contains("unknown issuer"), "{err}");

    let rogue_client = rogue.node("node1").issue(&id("demo", "client")).expect("rogue client");
    let err = handshake(&pki.bundle(), server.clone(), &pki.bundle(), &rogue_client, backend())
        .await
        .expect_err("a client certificate from another root");
    assert!(!err.is_empty());

    let expired = node2
        .issue_at(
            &id("demo", "backend"),
            SystemTime::now() - Duration::from_secs(1800),
            Duration::from_secs(60),
        )
        .expect("expired cert");
    let err = handshake(&pki.bundle(), expired, &pki.bundle(), &client, backend())
        .await
        .expect_err("an expired server certificate");
    assert!(err.to_lowercase().contains("expired"), "{err}");

    let err = handshake(&pki.bundle(), server, &pki.bundle(), &client, (id("demo", "someone-else"), "node2"))
        .await
        .expect_err("identity mismatch");
    assert!(err.contains("IdentityMismatch") && err.contains("someone-else"), "{err}");
}

/// A node CA speaks only for its own node's pods, and a leaf must come through exactly one.
#[tokio::test]
async fn a_chain_through_another_nodes_ca_or_through_none_is_refused() {
    let pki = Pki::new();
    let client = pki.node("node1").issue(&id("demo", "client")).expect("client");
    // node1's CA signs the identity of a pod that runs on node2.
    let impostor = pki.node("node1").issue(&id("demo", "backend")).expect("impostor");
    let err = handshake(&pki.bundle(), impostor, &pki.bundle(), &client, (id("demo", "backend"), "node2"))
        .await
        .expect_err("a server through another node's CA");
    assert!(err.contains("WrongNode") && err.contains(r#"got: "node1""#), "{err}");

    // A leaf signed by the root itself: no node vouches for it.
    let server = pki.node("node2").issue(&id("demo", "backend")).expect("server");
    let direct = pki.root.issue(&id("demo", "client")).expect("root-signed");
    let err =
        handshake(&pki.bundle(), server.clone(), &pki.bundle(), &direct, (id("demo", "backend"), "node2"))
            .await
            .expect_err("a client certificate with no node CA");
    assert!(!err.is_empty());
    let err = handshake(
        &pki.bundle(),
        pki.root.issue(&id("demo", "backend")).expect("root-signed"),
        &pki.bundle(),
        &client,
        (id("demo", "backend"), "node2"),
    )
    .await
    .expect_err("a server certificate with no node CA");
    assert!(err.contains("NotThroughANodeCa"), "{err}");

    // A node CA cannot make another CA (path length 0): a chain of two intermediates fails.
    let bundle = pki.bundle();
    let node1 = pki.node("node1");
    let leaf = node1.issue(&id("demo", "client")).expect("leaf");
    let chain =
        [leaf.certified.cert[0].clone(), node1.cert_der().clone(), pki.node("node2").cert_der().clone()];
    let verified = node_ca::verify_chain(
        &bundle,
        &chain[0],
        &chain[1..],
        rustls::pki_types::UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        TD,
    );
    assert!(verified.is_err(), "a second intermediate is refused: {verified:?}");
}

/// A rotation: a bundle of the old and the new root accepts chains of either, and once the old
/// root is removed its chains are refused.
#[tokio::test]
async fn a_bundle_of_two_roots_accepts_both_and_the_old_one_goes() {
    let (old, new) = (Pki::new(), Pki::new());
    let both =
        TrustBundle::from_pem(&format!("{}{}", new.root.cert_pem(), old.root.cert_pem())).expect("bundle");
    assert_eq!(both.len(), 2);
    let old_client = old.node("node1").issue(&id("demo", "client")).expect("client");
    let new_server = new.node("node2").issue(&id("demo", "backend")).expect("server");
    assert!(both.issued_by_active(new.node("node2").cert_der()), "the new root signs now");
    assert!(!both.issued_by_active(old.node("node2").cert_der()));
    let backend = || (id("demo", "backend"), "node2");
    handshake(&both, new_server.clone(), &both, &old_client, backend())
        .await
        .expect("old client, new server");
    let new_client = new.node("node1").issue(&id("demo", "client")).expect("client");
    let old_server = old.node("node2").issue(&id("demo", "backend")).expect("server");
    handshake(&both, old_server.clone(), &both, &new_client, backend())
        .await
        .expect("new client, old server");
    handshake(&new.bundle(), new_server, &new.bundle(), &new_client, backend()).await.expect("new only");
    handshake(&new.bundle(), old_server, &new.bundle(), &new_client, backend())
        .await
        .expect_err("the old root is gone");
    assert!(TrustBundle::from_pem("no certificates here").is_err());
}
