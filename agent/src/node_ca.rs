//! The agent's side of node identity: its node CA, asked of the signer at start and renewed at
//! half life or as soon as the signer signs with another root, and the trust bundle, followed.
//! The agent never sees a root's key.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, bail};
use gammaray_proxy::identity::{Authority, CertStore, TrustBundle, node_ca};
use k8s_openapi::{
    ByteString,
    api::{
        certificates::v1::{CertificateSigningRequest, CertificateSigningRequestSpec},
        core::v1::ConfigMap,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{Api, api::PostParams};

use crate::signer::{BUNDLE_CONFIGMAP, BUNDLE_KEY, TOKEN_ANNOTATION, local};

/// How the agent reaches the signer.
#[derive(Clone)]
pub enum Way {
    /// A local signer's socket (`--signer unix:PATH`).
    Local(PathBuf),
    /// The CertificateSigningRequest API; the bundle from the ConfigMap in `namespace`.
    Kube { client: kube::Client, namespace: String },
}

impl std::fmt::Debug for Way {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local(path) => write!(f, "unix:{}", path.display()),
            Self::Kube { namespace, .. } => write!(f, "kubernetes ({namespace})"),
        }
    }
}

/// How long the agent waits for a decision on one request.
const DECISION_TIMEOUT: Duration = Duration::from_secs(30);

pub struct NodeCa {
    pub way: Way,
    /// The token that proves this agent is the one of `node`: a projected service-account
    /// token on a cluster, the node's line of the tokens file for a local signer. Read at each
    /// request, so a rotated token is picked up.
    pub token: PathBuf,
    pub node: String,
    pub trust_domain: String,
}

impl NodeCa {
    /// The trust bundle as the signer publishes it.
    pub async fn bundle(&self) -> anyhow::Result<String> {
        match &self.way {
            Way::Local(socket) => local_bundle(socket).await,
            Way::Kube { client, namespace } => {
                let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
                let map = maps.get_opt(BUNDLE_CONFIGMAP).await.context("cannot read the trust bundle")?;
                map.and_then(|m| m.data).and_then(|mut d| d.remove(BUNDLE_KEY)).with_context(|| {
                    format!("the ConfigMap {namespace}/{BUNDLE_CONFIGMAP} has no {BUNDLE_KEY} (is the signer running?)")
                })
            }
        }
    }

    /// The first trust bundle, waiting up to `wait` for the signer to publish one.
    pub async fn first_bundle(&self, wait: Duration) -> anyhow::Result<TrustBundle> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let err = match self.bundle().await {
                Ok(pem) => return TrustBundle::from_pem(&pem).context("the trust bundle does not parse"),
                Err(e) => e,
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(
                    err.context(format!("no trust bundle from the signer ({:?}) after {wait:?}", self.way))
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Asks the signer for a new node CA.
    pub async fn issue(&self) -> anyhow::Result<Authority> {
        let token = std::fs::read_to_string(&self.token)
            .with_context(|| format!("cannot read the signer token {}", self.token.display()))?;
        let token = token.trim().to_owned();
        let (key, csr) = node_ca::request(&self.trust_domain, &self.node)?;
        let pem = match &self.way {
            Way::Local(socket) => {
                let request = local::Request { token: Some(token), csr: Some(csr), bundle: false };
                let answer = local::ask(socket, &request).await?;
                match (answer.certificate, answer.refused) {
                    (Some(cert), _) => cert,
                    (None, refused) => bail!("the signer refused: {}", refused.unwrap_or_default()),
                }
            }
            Way::Kube { client, .. } => request_by_csr(client, &self.node, &token, &csr).await?,
        };
        Authority::node_ca(&pem, key).context("the signer's certificate is not a node CA for this key")
    }

    /// Follows the published trust bundle into `tx`: a watch of its ConfigMap on a cluster, the
    /// local signer asked every `every`.
    async fn follow_bundle(way: Way, tx: tokio::sync::watch::Sender<Option<String>>, every: Duration) {
        match way {
            Way::Local(socket) => loop {
                match local_bundle(&socket).await {
                    Ok(pem) => {
                        tx.send_if_modified(|held| {
                            let changed = held.as_ref() != Some(&pem);
                            if changed {
                                *held = Some(pem);
                            }
                            changed
                        });
                    }
                    Err(e) => tracing::debug!(error = %e, "cannot reach the signer for the trust bundle"),
                }
                tokio::time::sleep(every).await;
            },
            Way::Kube { client, namespace } => {
                use futures::StreamExt as _;
                use kube::runtime::{WatchStreamExt as _, watcher};
                let maps: Api<ConfigMap> = Api::namespaced(client, &namespace);
                let config = watcher::Config::default().fields(&format!("metadata.name={BUNDLE_CONFIGMAP}"));
                let stream = watcher(maps, config).default_backoff().applied_objects();
                tokio::pin!(stream);
                while let Some(event) = stream.next().await {
                    match event {
                        Ok(map) => {
                            if let Some(pem) = map.data.and_then(|mut d| d.remove(BUNDLE_KEY)) {
                                tx.send_replace(Some(pem));
                            }
                        }
                        Err(e) => tracing::debug!(error = %e, "trust bundle watch interrupted; resuming"),
                    }
                }
            }
        }
    }

    /// Keeps `certs` supplied until the task is dropped: a node CA at once (retried until the
    /// signer answers), renewed at half life or when the bundle's signing root is not the one
    /// that signed it, and the bundle followed as it changes. A node CA that cannot be renewed
    /// is kept until it expires; then handshakes fail, never fall back to plaintext.
    pub async fn run(self, certs: Arc<CertStore>, every: Duration) {
        let (tx, mut bundles) = tokio::sync::watch::channel(None);
        let _follow =
            crate::signer::AbortOnDrop(tokio::spawn(Self::follow_bundle(self.way.clone(), tx, every)));
        let mut backoff = Duration::from_millis(200);
        // Until the follower ends (it does not, short of the task's end).
        let mut following = true;
        loop {
            let published = bundles.borrow_and_update().clone();
            if let Some(pem) = published
                && pem != certs.trust().get().pem()
            {
                match TrustBundle::from_pem(&pem) {
                    Ok(bundle) => {
                        tracing::info!(roots = bundle.len(), "trust bundle updated");
                        certs.trust().set(bundle);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the signer's trust bundle does not parse; keeping the one in force")
                    }
                }
            }
            let now = std::time::SystemTime::now();
            let due = match certs.issuer() {
                None => Some("start"),
                Some(ca) if ca.needs_renewal(now) => Some("half life"),
                Some(ca) if !certs.trust().get().issued_by_active(ca.cert_der()) => Some("new signing root"),
                Some(_) => None,
            };
            if let Some(why) = due {
                match self.issue().await {
                    Ok(ca) => {
                        let not_after = unix_secs(ca.not_after);
                        tracing::info!(node = %self.node, why, not_after, "node CA issued");
                        certs.set_issuer(Arc::new(ca));
                        backoff = Duration::from_millis(200);
                    }
                    Err(e) => {
                        tracing::warn!(node = %self.node, why, error = format!("{e:#}"), "cannot get a node CA; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                }
            }
            // A new bundle is looked at at once; renewal is checked every `every`.
            tokio::select! {
                changed = bundles.changed(), if following => following = changed.is_ok(),
                () = tokio::time::sleep(every) => {}
            }
        }
    }
}

/// The bundle a local signer publishes.
async fn local_bundle(socket: &std::path::Path) -> anyhow::Result<String> {
    let answer = local::ask(socket, &local::Request { bundle: true, ..Default::default() }).await?;
    answer.bundle.context("the signer sent no bundle")
}

fn unix_secs(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Creates a CertificateSigningRequest for the node CA and waits for the signer's decision.
/// The request stays for the cluster's CSR clean-up to remove.
pub async fn request_by_csr(
    client: &kube::Client,
    node: &str,
    token: &str,
    csr: &str,
) -> anyhow::Result<String> {
    let csrs: Api<CertificateSigningRequest> = Api::all(client.clone());
    let tag: String = (0..6).map(|_| fastrand::lowercase()).collect();
    let short: String = node.chars().take(200).collect();
    let name = format!("gammaray-node-ca-{short}-{tag}");
    let object = CertificateSigningRequest {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            annotations: Some([(TOKEN_ANNOTATION.to_owned(), token.to_owned())].into()),
            labels: Some([("gammaray.dev/node".to_owned(), short.clone())].into()),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(csr.as_bytes().to_vec()),
            signer_name: node_ca::SIGNER_NAME.into(),
            usages: Some(vec!["cert sign".into(), "crl sign".into(), "digital signature".into()]),
            ..Default::default()
        },
        status: None,
    };
    csrs.create(&PostParams::default(), &object)
        .await
        .context("cannot create the CertificateSigningRequest")?;
    let deadline = tokio::time::Instant::now() + DECISION_TIMEOUT;
    loop {
        let now = csrs.get(&name).await.context("cannot read the CertificateSigningRequest")?;
        let status = now.status.unwrap_or_default();
        if let Some(cert) = status.certificate {
            return String::from_utf8(cert.0).context("the issued certificate is not PEM");
        }
        if let Some(c) = status
            .conditions
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.type_ == "Denied" || c.type_ == "Failed")
        {
            bail!(
                "the signer {} CSR {name}: {}: {}",
                c.type_.to_lowercase(),
                c.reason.unwrap_or_default(),
                c.message.unwrap_or_default()
            );
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("no decision on CSR {name} after {DECISION_TIMEOUT:?} (is the signer running?)");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
