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

#[test]
fn issued_certificates_carry_the_identity_and_renew_at_half_life() {
    let ca = Arc::new(Authority::generate("cluster.local").expect("CA"));
    let store = CertStore::new(ca.clone());
    let now = SystemTime::now();
    let first = store.get_at(&id("demo", "web"), now).expect("issue");
    assert_eq!(identity_of(&first.certified.cert[0]).expect("identity"), id("demo", "web"));
    let same = store.get_at(&id("demo", "web"), now + Duration::from_secs(11 * 3600)).expect("cached");
    assert_eq!(same.not_before, first.not_before, "still the first certificate before half life");
    let renewed = store.get_at(&id("demo", "web"), now + Duration::from_secs(13 * 3600)).expect("renewed");
    assert!(renewed.not_before > first.not_before, "renewed after half life");
    // The CA round-trips through PEM, as it does through the Secret.
    let again = Authority::from_pem(ca.cert_pem(), &ca.key_pem()).expect("reload CA");
    assert_eq!(again.cert_der(), ca.cert_der());
}

/// Runs one handshake between a server holding `server_cert` (trusting `server_roots`) and a
/// client presenting `client_cert` (trusting `client_roots`, expecting `expected`). Returns the
/// client identity the server saw and the cipher suite the client negotiated, or the error of
/// whichever side failed.
async fn handshake(
    server_roots: &Authority,
    server_cert: Issued,
    client_roots: &Authority,
    client_cert: &Issued,
    expected: Identity,
) -> Result<(Identity, rustls::CipherSuite), String> {
    #[derive(Debug)]
    struct Fixed(Arc<CertifiedKey>);
    impl rustls::server::ResolvesServerCert for Fixed {
        fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
            Some(self.0.clone())
        }
    }
    let server =
        server_config(Arc::new(server_roots.roots()), Arc::new(Fixed(server_cert.certified.clone())))
            .expect("server config");
    let client =
        client_config(Arc::new(client_roots.roots()), client_cert, expected.clone()).expect("client config");
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let server_side = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut tls = acceptor.accept(tcp).await.map_err(|e| format!("server: {e}"))?;
        let peer =
            tls.get_ref().1.peer_certificates().and_then(|c| c.first().cloned()).ok_or("no client cert")?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| format!("server read: {e}"))?;
        tls.write_all(&buf).await.map_err(|e| format!("server write: {e}"))?;
        identity_of(&peer).map_err(|e| e.to_string())
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
    Ok((server_result?, suite))
}

#[tokio::test]
async fn mutual_tls_with_spiffe_identities() {
    let ca = Authority::generate("cluster.local").expect("CA");
    let client = ca.issue(&id("demo", "client")).expect("client cert");
    let server = ca.issue(&id("demo", "backend")).expect("server cert");
    let (seen, suite) = handshake(&ca, server, &ca, &client, id("demo", "backend")).await.expect("handshake");
    assert_eq!(seen, id("demo", "client"), "the server records the client's identity");
    // Both ends offer the provider's suites in its order; the first is the one tunnels pay for
    // per byte, so a change of order shows here.
    assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
}

#[tokio::test]
async fn another_ca_an_expired_certificate_and_a_wrong_identity_are_refused() {
    let ca = Authority::generate("cluster.local").expect("CA");
    let rogue = Authority::generate("cluster.local").expect("rogue CA");
    let client = ca.issue(&id("demo", "client")).expect("client");
    let server = ca.issue(&id("demo", "backend")).expect("server");

    let err = handshake(
        &ca,
        rogue.issue(&id("demo", "backend")).expect("rogue server"),
        &ca,
        &client,
        id("demo", "backend"),
    )
    .await
    .expect_err("a server certificate from another CA");
    assert!(
        err.contains("UnknownIssuer")
            || err.contains("unknown issuer")
            || err.contains("invalid peer certificate"),
        "{err}"
    );

    let err = handshake(
        &ca,
        server.clone(),
        &ca,
        &rogue.issue(&id("demo", "client")).expect("rogue client"),
        id("demo", "backend"),
    )
    .await
    .expect_err("a client certificate from another CA");
    assert!(!err.is_empty());

    let expired = ca
        .issue_at(
            &id("demo", "backend"),
            SystemTime::now() - Duration::from_secs(3 * 24 * 3600),
            Duration::from_secs(3600),
        )
        .expect("expired cert");
    let err = handshake(&ca, expired, &ca, &client, id("demo", "backend"))
        .await
        .expect_err("an expired server certificate");
    assert!(err.to_lowercase().contains("expired"), "{err}");

    let err = handshake(&ca, server, &ca, &client, id("demo", "someone-else"))
        .await
        .expect_err("identity mismatch");
    assert!(err.contains("IdentityMismatch") && err.contains("someone-else"), "{err}");
}
