//! Workload identity and the mesh's certificates.
//!
//! A workload's identity is `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`. No
//! node holds the mesh root's key: a signer issues each node a short-lived intermediate, its
//! node CA ([`node_ca`]), which names the node. With it the node signs short-lived (at most
//! 24 h) certificates whose only subject alternative name is the workload's URI, only for
//! workloads on that node, renewed at half life. A peer accepts a workload certificate only when
//! it chains through the CA of the node the workload runs on, so a node speaks for its own pods
//! alone. TLS is 1.3 only. A client checks that the server presents exactly the identity
//! expected for the endpoint it chose, through that endpoint's node; a server checks the
//! client's chain and records its identity and node.

use std::{
    collections::HashMap,
    fmt,
    str::FromStr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime},
    sign::CertifiedKey,
};

pub mod node_ca;
pub use node_ca::{Trust, TrustBundle};

/// How long an issued workload certificate is valid.
pub const CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{0:?} is not a SPIFFE workload identity (spiffe://<trust domain>/ns/<ns>/sa/<sa>)")]
    Parse(String),
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("the peer certificate cannot be parsed: {0}")]
    PeerCert(String),
    #[error("the peer certificate carries no SPIFFE identity")]
    NoIdentity,
    #[error("client verifier: {0}")]
    Verifier(String),
    #[error("this node has no node CA yet (it asks the signer for one at start)")]
    NoNodeCa,
    #[error("the node CA has expired")]
    Expired,
    #[error("the trust bundle: {0}")]
    Bundle(String),
}

/// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
///
/// Shared strings: the data path clones identities per request (a hop names both ends), and a
/// clone must not allocate.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: Arc<str>,
    pub namespace: Arc<str>,
    pub service_account: Arc<str>,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Part by part: one `write!` of four pieces costs several times as much, once per
        // access-log line.
        for part in ["spiffe://", &self.trust_domain, "/ns/", &self.namespace, "/sa/", &self.service_account]
        {
            f.write_str(part)?;
        }
        Ok(())
    }
}

impl FromStr for Identity {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || IdentityError::Parse(s.to_owned());
        let rest = s.strip_prefix("spiffe://").ok_or_else(err)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if !td.is_empty() && !ns.is_empty() && !sa.is_empty() => Ok(Self {
                trust_domain: (*td).into(),
                namespace: (*ns).into(),
                service_account: (*sa).into(),
            }),
            _ => Err(err()),
        }
    }
}

impl Identity {
    /// The TLS server name a client sends to ask a node for this identity's certificate:
    /// `<sa>.<ns>.id.gammaray` (Kubernetes names are DNS labels, so this is a valid name).
    pub fn server_name(&self) -> String {
        format!("{}.{}.id.gammaray", self.service_account, self.namespace)
    }

    /// The identity a server name asks for, in `trust_domain`.
    pub fn from_server_name(name: &str, trust_domain: &str) -> Option<Self> {
        let rest = name.strip_suffix(".id.gammaray")?;
        let (sa, ns) = rest.split_once('.')?;
        (!sa.is_empty() && !ns.is_empty() && !ns.contains('.')).then(|| Self {
            trust_domain: trust_domain.into(),
            namespace: ns.into(),
            service_account: sa.into(),
        })
    }
}

/// A certificate authority with its key: the mesh root (only the signer holds one), or a node
/// CA, the intermediate a node signs its workloads' certificates with.
pub struct Authority {
    cert: CertificateDer<'static>,
    cert_pem: String,
    key: KeyPair,
    issuer: Issuer<'static, KeyPair>,
    /// What a leaf it issues is sent with: itself for a node CA, nothing for a root.
    tail: Vec<CertificateDer<'static>>,
    /// The node a node CA names; `None` for a root.
    node: Option<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authority").field("node", &self.node).field("not_after", &self.not_after).finish()
    }
}

impl Authority {
    /// A new self-signed root. Its name carries a random part, so that two roots of one trust
    /// domain (an old and a new one during a rotation) never share a subject.
    pub fn generate(trust_domain: &str) -> Result<Self, IdentityError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        let tag: String = (0..8).map(|_| fastrand::alphanumeric()).collect();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("gammaray mesh root ({trust_domain}) {tag}"));
        params.distinguished_name.push(DnType::OrganizationName, "gammaray");
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key)?;
        Self::from_pem(&cert.pem(), &key.serialize_pem())
    }

    /// Loads a root from PEM (the signer's `ca.crt` and `ca.key`).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, IdentityError> {
        Self::new(cert_pem, KeyPair::from_pem(key_pem)?, false)
    }

    /// A node CA: the certificate the signer issued for `key` (see [`node_ca`]).
    pub fn node_ca(cert_pem: &str, key: KeyPair) -> Result<Self, IdentityError> {
        Self::new(cert_pem, key, true)
    }

    fn new(cert_pem: &str, key: KeyPair, intermediate: bool) -> Result<Self, IdentityError> {
        let issuer = Issuer::from_ca_cert_pem(cert_pem, KeyPair::from_pem(&key.serialize_pem())?)?;
        let der = pem_to_der(cert_pem)?;
        let (not_before, not_after) = validity(&der)?;
        let node = if intermediate { Some(node_ca::node_of(&der)?.1) } else { None };
        let tail = if intermediate { vec![der.clone()] } else { Vec::new() };
        Ok(Self { cert: der, cert_pem: cert_pem.to_owned(), key, issuer, tail, node, not_before, not_after })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The node a node CA names.
    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    /// Renewal of a node CA is due at half its life.
    pub fn needs_renewal(&self, now: SystemTime) -> bool {
        let half = self.not_after.duration_since(self.not_before).unwrap_or_default() / 2;
        now >= self.not_before + half
    }

    /// Issues a certificate for `identity`, valid from `not_before` for `lifetime`, and never
    /// beyond this authority's own end.
    pub fn issue_at(
        &self,
        identity: &Identity,
        not_before: SystemTime,
        lifetime: Duration,
    ) -> Result<Issued, IdentityError> {
        let not_after = (not_before + lifetime).min(self.not_after);
        if not_after <= not_before {
            return Err(IdentityError::Expired);
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let uri = rcgen::string::Ia5String::try_from(identity.to_string())?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.distinguished_name.push(DnType::OrganizationName, "gammaray");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = time::OffsetDateTime::from(not_before);
        params.not_after = time::OffsetDateTime::from(not_after);
        let cert = params.signed_by(&key, &self.issuer)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.tail.iter().cloned());
        let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = provider().key_provider.load_private_key(private)?;
        Ok(Issued {
            identity: identity.clone(),
            certified: Arc::new(CertifiedKey::new(chain, signing)),
            not_before,
            not_after,
        })
    }

    pub fn issue(&self, identity: &Identity) -> Result<Issued, IdentityError> {
        // Backdated a little, so a peer whose clock lags a few seconds accepts it at once.
        self.issue_at(identity, SystemTime::now() - Duration::from_secs(60), CERT_LIFETIME)
    }
}

/// When a certificate starts and ends.
fn validity(cert: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), IdentityError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| IdentityError::PeerCert(e.to_string()))?;
    let at = |t: x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
    };
    Ok((at(parsed.validity().not_before), at(parsed.validity().not_after)))
}

fn pem_to_der(pem_text: &str) -> Result<CertificateDer<'static>, IdentityError> {
    let p = pem::parse(pem_text).map_err(|e| IdentityError::PeerCert(e.to_string()))?;
    Ok(CertificateDer::from(p.into_contents()))
}

/// A workload certificate with its key, ready for rustls.
#[derive(Clone)]
pub struct Issued {
    pub identity: Identity,
    pub certified: Arc<CertifiedKey>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("identity", &self.identity.to_string())
            .field("not_after", &self.not_after)
            .finish()
    }
}

impl Issued {
    /// Renewal is due at half the certificate's life.
    pub fn needs_renewal(&self, now: SystemTime) -> bool {
        let half = self.not_after.duration_since(self.not_before).unwrap_or_default() / 2;
        now >= self.not_before + half
    }
}

/// The certificates a node holds for the workloads on it, issued by its node CA on first use
/// and renewed at half life, or at once when the node CA is replaced. Renewal swaps the
/// certificate for new handshakes; connections already made keep theirs, so none is dropped.
/// Until the node has a node CA nothing is issued, and handshakes fail: nothing goes plaintext.
pub struct CertStore {
    trust: Arc<Trust>,
    issuer: std::sync::RwLock<Option<Arc<Authority>>>,
    issuer_changes: std::sync::atomic::AtomicU64,
    certs: Mutex<HashMap<Identity, (Arc<Authority>, Issued)>>,
}

impl CertStore {
    /// A store that trusts `trust` and issues nothing until [`CertStore::set_issuer`].
    pub fn new(trust: Arc<Trust>) -> Self {
        Self {
            trust,
            issuer: Default::default(),
            issuer_changes: Default::default(),
            certs: Mutex::new(HashMap::new()),
        }
    }

    /// A store issuing with `issuer` at once (tests and tools).
    pub fn with_issuer(trust: Arc<Trust>, issuer: Arc<Authority>) -> Self {
        let store = Self::new(trust);
        store.set_issuer(issuer);
        store
    }

    /// The roots this node trusts.
    pub fn trust(&self) -> &Arc<Trust> {
        &self.trust
    }

    /// Replaces the node CA: certificates are issued by the new one from now on.
    pub fn set_issuer(&self, issuer: Arc<Authority>) {
        *self.issuer.write().expect("issuer lock") = Some(issuer);
        self.issuer_changes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// How many node CAs this store has been given.
    pub fn issuer_changes(&self) -> u64 {
        self.issuer_changes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The node CA in use.
    pub fn issuer(&self) -> Option<Arc<Authority>> {
        self.issuer.read().expect("issuer lock").clone()
    }

    /// The current certificate for `identity`, issuing or renewing it if needed.
    pub fn get(&self, identity: &Identity) -> Result<Issued, IdentityError> {
        self.get_at(identity, SystemTime::now())
    }

    pub fn get_at(&self, identity: &Identity, now: SystemTime) -> Result<Issued, IdentityError> {
        let issuer = self.issuer().ok_or(IdentityError::NoNodeCa)?;
        let mut certs = self.certs.lock().expect("cert store lock");
        if let Some((by, c)) = certs.get(identity)
            && Arc::ptr_eq(by, &issuer)
            && !c.needs_renewal(now)
        {
            return Ok(c.clone());
        }
        let issued = issuer.issue_at(identity, now - Duration::from_secs(60), CERT_LIFETIME)?;
        tracing::info!(identity = %identity, not_after = ?issued.not_after, "workload certificate issued");
        certs.insert(identity.clone(), (issuer, issued.clone()));
        Ok(issued)
    }

    /// The earliest expiry among held certificates, for metrics.
    pub fn earliest_expiry(&self) -> Option<SystemTime> {
        self.certs.lock().expect("cert store lock").values().map(|(_, c)| c.not_after).min()
    }
}

/// The crypto provider used for every TLS config: ring, TLS 1.3 cipher suites only, AES-128-GCM
/// first. Both ends of a tunnel are gammaray, so the client's first choice is what they use: 128-bit
/// AES is TLS 1.3's mandatory suite and the strength of the P-256 keys that the certificates
/// carry, and it runs 10 AES rounds a block against AES-256's 14, which every byte a tunnel
/// carries pays for. AES-256-GCM and ChaCha20-Poly1305 stay on offer for a peer that insists.
/// Made once: every HBONE dial asks for it twice (its config and its server check).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: std::sync::LazyLock<Arc<CryptoProvider>> = std::sync::LazyLock::new(|| {
        use rustls::crypto::ring::cipher_suite;
        Arc::new(CryptoProvider {
            cipher_suites: vec![
                cipher_suite::TLS13_AES_128_GCM_SHA256,
                cipher_suite::TLS13_AES_256_GCM_SHA384,
                cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
            ],
            ..rustls::crypto::ring::default_provider()
        })
    });
    PROVIDER.clone()
}

/// The URIs among a certificate's subject alternative names.
fn san_uris(cert: &CertificateDer<'_>) -> Result<Vec<String>, IdentityError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| IdentityError::PeerCert(e.to_string()))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| IdentityError::PeerCert(e.to_string()))?
        .ok_or(IdentityError::NoIdentity)?;
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .collect())
}

/// The SPIFFE identity in a certificate's URI subject alternative name.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<Identity, IdentityError> {
    san_uris(cert)?
        .iter()
        .find_map(|uri| uri.starts_with("spiffe://").then(|| uri.parse().ok()).flatten())
        .ok_or(IdentityError::NoIdentity)
}

/// Verifies a server's chain against the trust bundle, that it passes through the CA of the
/// node the client chose, and that it names exactly `expected`.
#[derive(Debug)]
pub struct ExpectIdentity {
    bundle: Arc<TrustBundle>,
    expected: Identity,
    node: Arc<str>,
    algs: WebPkiSupportedAlgorithms,
}

impl ExpectIdentity {
    pub fn new(bundle: Arc<TrustBundle>, expected: Identity, node: Arc<str>) -> Self {
        Self { bundle, expected, node, algs: provider().signature_verification_algorithms }
    }
}

impl ServerCertVerifier for ExpectIdentity {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let node = node_ca::verify_chain(
            &self.bundle,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            &self.expected.trust_domain,
        )?;
        if *node != *self.node {
            return Err(node_ca::wrong_node(&self.node, &node));
        }
        let got = identity_of(end_entity).map_err(|e| rustls::Error::General(e.to_string()))?;
        if got != self.expected {
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(
                rustls::OtherError(Arc::new(IdentityMismatch {
                    expected: self.expected.to_string(),
                    got: got.to_string(),
                })),
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Verifies a client's chain against the trust bundle in force at each handshake, and that it
/// passes through exactly one node CA; which pods that node may speak for is checked once the
/// connection says which it carries ([`node_ca::peer_node`]).
#[derive(Debug)]
pub struct MeshClientVerifier {
    trust: Arc<Trust>,
    trust_domain: Arc<str>,
    algs: WebPkiSupportedAlgorithms,
}

impl rustls::server::danger::ClientCertVerifier for MeshClientVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        // Every client is a node of this mesh and has one certificate to present.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        node_ca::verify_chain(
            &self.trust.get(),
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
            &self.trust_domain,
        )?;
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("server identity {got} is not the expected {expected}")]
pub struct IdentityMismatch {
    pub expected: String,
    pub got: String,
}

/// A TLS 1.3 client config presenting `client` and expecting the server to be `expected`,
/// speaking through the CA of `node`.
pub fn client_config(
    bundle: Arc<TrustBundle>,
    client: &Issued,
    expected: Identity,
    node: Arc<str>,
) -> Result<rustls::ClientConfig, IdentityError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ExpectIdentity::new(bundle, expected, node)))
        .with_client_cert_resolver(Arc::new(PresentCert(client.certified.clone())));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Always presents one workload certificate as the client certificate.
#[derive(Debug)]
struct PresentCert(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for PresentCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A TLS 1.3 server config requiring a client certificate that chains to `trust` (as it is at
/// each handshake) through one node CA of `trust_domain`, with server certificates chosen per
/// handshake by `resolver`.
pub fn server_config(
    trust: Arc<Trust>,
    trust_domain: &str,
    resolver: Arc<dyn rustls::server::ResolvesServerCert>,
) -> Result<rustls::ServerConfig, IdentityError> {
    let verifier = MeshClientVerifier {
        trust,
        trust_domain: trust_domain.into(),
        algs: provider().signature_verification_algorithms,
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Chooses the server certificate by the identity the client names in SNI, for identities this
/// node may serve (`allowed`: a workload with that identity runs here).
pub struct SniResolver {
    pub store: Arc<CertStore>,
    pub trust_domain: String,
    pub allowed: Box<dyn Fn(&Identity) -> bool + Send + Sync>,
}

impl fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SniResolver").field("trust_domain", &self.trust_domain).finish()
    }
}

impl rustls::server::ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let identity = Identity::from_server_name(hello.server_name()?, &self.trust_domain)?;
        if !(self.allowed)(&identity) {
            tracing::warn!(%identity, "refusing a handshake for an identity that has no workload on this node");
            return None;
        }
        match self.store.get(&identity) {
            Ok(c) => Some(c.certified),
            Err(err) => {
                tracing::warn!(%identity, error = %err, "cannot issue a certificate");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests;
