//! Node CAs: the intermediates through which a node, and only that node, speaks for its pods.
//!
//! A node asks the signer for one with a certificate signing request ([`request`]) whose only
//! subject alternative name is the node's URI, `spiffe://<trust domain>/gammaray/node/<node>`.
//! The signer reads the request ([`review`]), checks by other means that the requester is the
//! agent of that node, and signs it with the mesh root ([`sign`]): a CA certificate that can
//! sign only leaves (path length 0), short-lived, naming the node. Peers verify a workload's
//! chain as exactly leaf, one node CA, a root of the trust bundle ([`verify_chain`]), and take
//! the node from the node CA.
//!
//! The trust bundle is every root a node trusts, the one the signer signs with first: during a
//! rotation it holds the old root and the new one.

use std::{
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, TrustAnchor, UnixTime};

use super::{Authority, IdentityError, provider};

/// The signer name of node CA requests (the CertificateSigningRequest API's `signerName`).
pub const SIGNER_NAME: &str = "gammaray.dev/node-ca";

/// How long a node CA is valid unless the signer is told otherwise.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

const NODE_PATH: &str = "/gammaray/node/";

/// The URI a node CA names its node by.
pub fn node_uri(trust_domain: &str, node: &str) -> String {
    format!("spiffe://{trust_domain}{NODE_PATH}{node}")
}

/// The (trust domain, node) of a node URI.
fn parse_node_uri(uri: &str) -> Option<(String, String)> {
    let rest = uri.strip_prefix("spiffe://")?;
    let (td, node) = rest.split_once(NODE_PATH)?;
    let valid = |s: &str| {
        !s.is_empty() && s.len() <= 253 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b))
    };
    (valid(td) && valid(node)).then(|| (td.to_owned(), node.to_owned()))
}

/// The (trust domain, node) a node CA certificate names.
pub fn node_of(cert: &CertificateDer<'_>) -> Result<(String, String), IdentityError> {
    let uris = super::san_uris(cert)?;
    match uris.as_slice() {
        [uri] => parse_node_uri(uri).ok_or(IdentityError::NoIdentity),
        _ => Err(IdentityError::NoIdentity),
    }
}

/// A new key and the request for a node CA of `node` with it, as PEM.
pub fn request(trust_domain: &str, node: &str) -> Result<(KeyPair, String), IdentityError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names =
        vec![SanType::URI(rcgen::string::Ia5String::try_from(node_uri(trust_domain, node))?)];
    params.distinguished_name.push(DnType::CommonName, format!("gammaray node CA {node}"));
    params.distinguished_name.push(DnType::OrganizationName, "gammaray");
    let csr = params.serialize_request(&key)?;
    let pem = csr.pem()?;
    Ok((key, pem))
}

/// Why the signer refuses a request, as the CSR's status and the signer's log say it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the request is not a valid certificate signing request: {0}")]
    Malformed(String),
    #[error("the request must name exactly one node URI ({expected}) and nothing else; it names {got:?}")]
    Names { expected: String, got: Vec<String> },
    #[error("the request names {requested:?}, but the requester is the agent of node {authenticated:?}")]
    OtherNode { requested: String, authenticated: String },
    #[error("the requester is not authenticated: {0}")]
    Unauthenticated(String),
    #[error("the requester is not a node agent: {0}")]
    NotAnAgent(String),
    #[error("the signer cannot sign: {0}")]
    Signer(String),
}

impl Refusal {
    /// A short machine reason (the CSR condition's `reason`, a metric label).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "MalformedRequest",
            Self::Names { .. } => "UnexpectedNames",
            Self::OtherNode { .. } => "OtherNode",
            Self::Unauthenticated(_) => "Unauthenticated",
            Self::NotAnAgent(_) => "NotAnAgent",
            Self::Signer(_) => "SignerError",
        }
    }
}

/// A request that parsed, carries a valid signature, and names exactly one node of
/// `trust_domain`: which node it asks for.
pub struct Reviewed {
    pub node: String,
    csr: CertificateSigningRequestParams,
}

/// Reads a node CA request. The name it asks for is the node URI alone: any other name (a DNS
/// name, an address, a second URI) is refused, whatever the requester is.
pub fn review(csr_pem: &str, trust_domain: &str) -> Result<Reviewed, Refusal> {
    let csr =
        CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| Refusal::Malformed(e.to_string()))?;
    let names: Vec<String> = csr
        .params
        .subject_alt_names
        .iter()
        .map(|n| match n {
            SanType::URI(uri) => uri.as_str().to_owned(),
            SanType::DnsName(dns) => format!("DNS:{}", dns.as_str()),
            SanType::IpAddress(ip) => format!("IP:{ip}"),
            SanType::Rfc822Name(mail) => format!("email:{}", mail.as_str()),
            other => format!("{other:?}"),
        })
        .collect();
    let node = match names.as_slice() {
        [uri] => parse_node_uri(uri).filter(|(td, _)| td == trust_domain).map(|(_, node)| node),
        _ => None,
    };
    match node {
        Some(node) => Ok(Reviewed { node, csr }),
        None => Err(Refusal::Names { expected: node_uri(trust_domain, "<node>"), got: names }),
    }
}

/// Signs a reviewed request with `root`: a CA certificate for the request's key that may sign
/// only leaves, names only the node, and is valid for `lifetime` (never beyond the root).
pub fn sign(
    root: &Authority,
    reviewed: &Reviewed,
    trust_domain: &str,
    lifetime: Duration,
) -> Result<String, Refusal> {
    let fail = |e: rcgen::Error| Refusal::Signer(e.to_string());
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
    params.subject_alt_names = vec![SanType::URI(
        rcgen::string::Ia5String::try_from(node_uri(trust_domain, &reviewed.node)).map_err(fail)?,
    )];
    params.distinguished_name.push(DnType::CommonName, format!("gammaray node CA {}", reviewed.node));
    params.distinguished_name.push(DnType::OrganizationName, "gammaray");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    // Backdated a little for peers whose clocks lag.
    let now = SystemTime::now();
    let start = now - Duration::from_secs(60);
    params.not_before = time::OffsetDateTime::from(start);
    params.not_after = time::OffsetDateTime::from((now + lifetime).min(root.not_after));
    let request = CertificateSigningRequestParams { params, public_key: reviewed.csr.public_key.clone() };
    Ok(request.signed_by(&root.issuer).map_err(fail)?.pem())
}

/// The roots a node trusts; the first is the one the signer signs with now.
#[derive(Debug)]
pub struct TrustBundle {
    certs: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
    pem: String,
}

impl TrustBundle {
    /// The bundle of PEM certificates in `text`, in order.
    pub fn from_pem(text: &str) -> Result<Self, IdentityError> {
        let certs: Vec<CertificateDer<'static>> = pem::parse_many(text)
            .map_err(|e| IdentityError::Bundle(e.to_string()))?
            .into_iter()
            .filter(|p| p.tag() == "CERTIFICATE")
            .map(|p| CertificateDer::from(p.into_contents()))
            .collect();
        if certs.is_empty() {
            return Err(IdentityError::Bundle("no certificate in it".into()));
        }
        let anchors = certs
            .iter()
            .map(|c| {
                webpki::anchor_from_trusted_cert(c)
                    .map(|a| a.to_owned())
                    .map_err(|e| IdentityError::Bundle(format!("a root does not parse: {e}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { certs, anchors, pem: text.to_owned() })
    }

    /// A bundle of one root.
    pub fn of(root: &Authority) -> Self {
        Self::from_pem(root.cert_pem()).expect("a root's own certificate parses")
    }

    /// The root the signer signs with now.
    pub fn active(&self) -> &CertificateDer<'static> {
        &self.certs[0]
    }

    pub fn len(&self) -> usize {
        self.certs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }

    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// Whether `cert` was issued by the active root (its issuer is the root's subject; every
    /// root's subject carries a random part).
    pub fn issued_by_active(&self, cert: &CertificateDer<'_>) -> bool {
        let subject = |c: &CertificateDer<'_>, issuer: bool| {
            x509_parser::parse_x509_certificate(c.as_ref()).ok().map(|(_, p)| {
                if issuer { p.issuer().as_raw().to_vec() } else { p.subject().as_raw().to_vec() }
            })
        };
        subject(cert, true).is_some_and(|i| Some(i) == subject(self.active(), false))
    }
}

/// The trust bundle in force, replaced as a rotation goes; a handshake reads it once.
#[derive(Debug)]
pub struct Trust(RwLock<Arc<TrustBundle>>);

impl Trust {
    pub fn new(bundle: TrustBundle) -> Self {
        Self(RwLock::new(Arc::new(bundle)))
    }

    pub fn get(&self) -> Arc<TrustBundle> {
        self.0.read().expect("trust lock").clone()
    }

    pub fn set(&self, bundle: TrustBundle) {
        *self.0.write().expect("trust lock") = Arc::new(bundle);
    }
}

/// Verifies a workload certificate's chain: exactly one intermediate, a node CA of
/// `trust_domain` that a root of `bundle` signed, signed the leaf; valid now, for `usage`.
/// Returns the node the node CA names.
pub fn verify_chain(
    bundle: &TrustBundle,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
    trust_domain: &str,
) -> Result<String, rustls::Error> {
    // One intermediate exactly: then the path can only be leaf, it, root, and the node read
    // from it is the node that signed. With more, a path could pass through one while the
    // certificate read names another.
    let [node_ca] = intermediates else {
        return Err(invalid(NotThroughANodeCa(intermediates.len())));
    };
    let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
    let algs = provider().signature_verification_algorithms;
    let path = cert
        .verify_for_usage(algs.all, &bundle.anchors, intermediates, now, usage, None, None)
        .map_err(pki_error)?;
    if path.intermediate_certificates().count() != 1 {
        return Err(invalid(NotThroughANodeCa(0)));
    }
    let (td, node) = node_of(node_ca).map_err(|_| invalid(NotThroughANodeCa(1)))?;
    if td != trust_domain {
        return Err(invalid(NotThroughANodeCa(1)));
    }
    Ok(node)
}

/// The node whose CA signed a verified peer's chain (as rustls hands it over: leaf first).
pub fn peer_node(chain: &[CertificateDer<'_>]) -> Option<String> {
    node_of(chain.get(1)?).ok().map(|(_, node)| node)
}

/// The error of a chain that passes through another node's CA than expected.
pub fn wrong_node(expected: &str, got: &str) -> rustls::Error {
    invalid(WrongNode { expected: expected.to_owned(), got: got.to_owned() })
}

#[derive(Debug, thiserror::Error)]
#[error("the certificate is not issued through exactly one node CA ({0} intermediates)")]
struct NotThroughANodeCa(usize);

/// A chain through another node's CA: that node may not speak for this workload.
#[derive(Debug, thiserror::Error)]
#[error("the certificate is issued through node {got}'s CA, but the workload runs on node {expected}")]
pub struct WrongNode {
    pub expected: String,
    pub got: String,
}

fn invalid(e: impl std::error::Error + Send + Sync + 'static) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(Arc::new(e))))
}

fn pki_error(e: webpki::Error) -> rustls::Error {
    use rustls::CertificateError as C;
    rustls::Error::InvalidCertificate(match e {
        webpki::Error::BadDer | webpki::Error::BadDerTime => C::BadEncoding,
        webpki::Error::CertExpired { .. } => C::Expired,
        webpki::Error::CertNotValidYet { .. } => C::NotValidYet,
        webpki::Error::UnknownIssuer => C::UnknownIssuer,
        webpki::Error::InvalidSignatureForPublicKey => C::BadSignature,
        other => C::Other(rustls::OtherError(Arc::new(other))),
    })
}

/// A root's node CA for `node`, made here in one step: for tests and tools that play a node
/// (the agent asks the signer instead).
pub fn issue_directly(
    root: &Authority,
    trust_domain: &str,
    node: &str,
    lifetime: Duration,
) -> Result<Authority, IdentityError> {
    let (key, csr) = request(trust_domain, node)?;
    let reviewed = review(&csr, trust_domain).map_err(|e| IdentityError::Bundle(e.to_string()))?;
    let pem =
        sign(root, &reviewed, trust_domain, lifetime).map_err(|e| IdentityError::Bundle(e.to_string()))?;
    Authority::node_ca(&pem, key)
}
