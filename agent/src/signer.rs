//! `gammaray-agent ca serve`: the signer, the one process that reads the mesh root's key.
//!
//! It issues each node agent a node CA ([`gammaray_proxy::identity::node_ca`]) after checking
//! that the request comes from the agent of the node it names, and publishes the trust bundle
//! (every root the mesh trusts, the signing one first). Two ways in, one decision ([`Signer`]):
//!
//! - On a cluster ([`kube`]), through the CertificateSigningRequest API with the signer name
//!   `gammaray.dev/node-ca`. The agent puts its projected service-account token (audience
//!   `gammaray.dev/node-ca`, bound to its pod) on the request; the signer checks it with a
//!   TokenReview, checks that the request's creator is that same account, reads the pod the
//!   token is bound to, and takes the node from the pod's `spec.nodeName`. It approves and signs,
//!   or denies with the reason, on the CSR's status. The roots live in a Secret only the signer
//!   may read; the bundle goes to a ConfigMap the agents read.
//! - On one machine ([`local`]: the demo, the tests), over a Unix socket, with a token per node
//!   from a file standing in for the TokenReview. The roots live in the signer's directory.
//!
//! The roots are a small set of named PEM values, files or Secret keys alike ([`Roots`]), and a
//! rotation is three edits of it ([`rotate`]): `add` a next root (trusted, not yet signing),
//! `use` it (it signs; the old one stays trusted, its key is dropped), `remove` the old one.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::{Context as _, bail};
use gammaray_proxy::identity::{
    Authority,
    node_ca::{self, Refusal},
};

pub mod kube;
pub mod local;

/// The annotation on a CertificateSigningRequest that carries the agent's token.
pub const TOKEN_ANNOTATION: &str = "gammaray.dev/node-token";
/// The ConfigMap holding the trust bundle, and its key.
pub const BUNDLE_CONFIGMAP: &str = "gammaray-trust-bundle";
pub const BUNDLE_KEY: &str = "roots.pem";
/// The Secret holding the roots.
pub const ROOTS_SECRET: &str = "gammaray-ca";

const ACTIVE_CERT: &str = "ca.crt";
const ACTIVE_KEY: &str = "ca.key";
const NEXT_CERT: &str = "next.crt";
const NEXT_KEY: &str = "next.key";
const PREVIOUS: &str = "previous.crt";

/// Every name [`Roots`] are kept under.
pub const ROOT_FILES: [&str; 5] = [ACTIVE_CERT, ACTIVE_KEY, NEXT_CERT, NEXT_KEY, PREVIOUS];

/// The roots as named PEM values (files of a directory, keys of a Secret).
pub type Store = BTreeMap<String, String>;

/// The mesh's roots: the one that signs, a next one during a rotation, and old ones still
/// trusted (certificates only; their keys are gone).
pub struct Roots {
    pub active: Authority,
    pub next: Option<String>,
    pub previous: Option<String>,
}

impl Roots {
    pub fn load(store: &Store) -> anyhow::Result<Self> {
        let get = |k: &str| store.get(k).with_context(|| format!("the roots have no {k}"));
        let active = Authority::from_pem(get(ACTIVE_CERT)?, get(ACTIVE_KEY)?).context("the signing root")?;
        Ok(Self { active, next: store.get(NEXT_CERT).cloned(), previous: store.get(PREVIOUS).cloned() })
    }

    /// A store with one new root.
    pub fn generate(trust_domain: &str) -> anyhow::Result<Store> {
        let root = Authority::generate(trust_domain)?;
        Ok(Store::from([(ACTIVE_CERT.into(), root.cert_pem().into()), (ACTIVE_KEY.into(), root.key_pem())]))
    }

    /// The trust bundle: the signing root first, then the next, then the previous ones.
    pub fn bundle(&self) -> String {
        let mut pem = String::from(self.active.cert_pem());
        for more in [&self.next, &self.previous].into_iter().flatten() {
            if !pem.ends_with('\n') {
                pem.push('\n');
            }
            pem.push_str(more);
        }
        pem
    }
}

/// A step of a root rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RotateStep {
    /// Make a next root: every node trusts it, nothing is signed with it yet.
    Add,
    /// Sign with the next root; the old one stays trusted and its key is deleted.
    Use,
    /// Stop trusting the old root.
    Remove,
}

/// Applies `step` to `store`; says what it did.
pub fn rotate(store: &mut Store, step: RotateStep, trust_domain: &str) -> anyhow::Result<String> {
    match step {
        RotateStep::Add => {
            if store.contains_key(NEXT_CERT) {
                bail!("a next root exists already: `use` it, then `remove` the old one");
            }
            if store.contains_key(PREVIOUS) {
                bail!("an old root is still trusted: `remove` it before adding another");
            }
            let next = Authority::generate(trust_domain)?;
            store.insert(NEXT_CERT.into(), next.cert_pem().into());
            store.insert(NEXT_KEY.into(), next.key_pem());
            Ok("added a next root: every node trusts it now; wait until all report it, then `use` it".into())
        }
        RotateStep::Use => {
            let (Some(cert), Some(key)) = (store.remove(NEXT_CERT), store.remove(NEXT_KEY)) else {
                bail!("there is no next root: `add` one first");
            };
            let old = store.insert(ACTIVE_CERT.into(), cert).context("the roots have no signing root")?;
            store.insert(ACTIVE_KEY.into(), key);
            store.insert(PREVIOUS.into(), old);
            Ok("the next root signs now; nodes move to it; once all have, `remove` the old one".into())
        }
        RotateStep::Remove => {
            if store.contains_key(NEXT_CERT) {
                bail!("a next root is not in use yet: `use` it first");
            }
            if store.remove(PREVIOUS).is_none() {
                bail!("no old root is trusted: nothing to remove");
            }
            Ok("the old root is no longer trusted".into())
        }
    }
}

/// The decision both ways in share: a request from the agent of `node` (as its way in proved)
/// is signed with the signing root when it asks for exactly that node's CA.
pub struct Signer {
    pub trust_domain: String,
    pub lifetime: Duration,
    roots: RwLock<Arc<Roots>>,
}

impl Signer {
    pub fn new(trust_domain: String, lifetime: Duration, roots: Roots) -> Self {
        Self { trust_domain, lifetime, roots: RwLock::new(Arc::new(roots)) }
    }

    pub fn roots(&self) -> Arc<Roots> {
        self.roots.read().expect("roots lock").clone()
    }

    /// Takes new roots (a rotation step); returns whether the bundle changed.
    pub fn replace(&self, roots: Roots) -> bool {
        let changed = self.roots().bundle() != roots.bundle();
        *self.roots.write().expect("roots lock") = Arc::new(roots);
        changed
    }

    /// Signs `csr_pem` for the agent of `node`, or says why not. `requester` names the
    /// requester in the log.
    pub fn sign(&self, csr_pem: &str, node: &str, requester: &str) -> Result<String, Refusal> {
        let result = node_ca::review(csr_pem, &self.trust_domain).and_then(|reviewed| {
            if reviewed.node != node {
                return Err(Refusal::OtherNode { requested: reviewed.node, authenticated: node.to_owned() });
            }
            node_ca::sign(&self.roots().active, &reviewed, &self.trust_domain, self.lifetime)
        });
        match &result {
            Ok(_) => {
                tracing::info!(%node, %requester, lifetime_secs = self.lifetime.as_secs(), "node CA issued")
            }
            Err(refusal) => refused(refusal, requester),
        }
        result
    }
}

/// `ca serve`: runs the signer until `shutdown` completes.
pub async fn serve(
    at: &crate::cli::SignerArgs,
    socket: Option<std::path::PathBuf>,
    tokens: Option<std::path::PathBuf>,
    agent_service_account: String,
    lifetime: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let td = at.trust_domain.clone();
    match &at.local {
        Some(dir) => {
            let store = local::load_or_create(dir, &td)?;
            let signer = Arc::new(Signer::new(td, lifetime, Roots::load(&store)?));
            let config = local::Config {
                dir: dir.clone(),
                socket: socket.unwrap_or_else(|| dir.join("signer.sock")),
                tokens: tokens.unwrap_or_else(|| dir.join("tokens")),
            };
            tokio::select! {
                result = local::serve(config, signer) => result,
                () = shutdown => Ok(()),
            }
        }
        None => {
            let (client, config) = cluster(at, agent_service_account).await?;
            let store = kube::load_or_create(&client, &config, &td).await?;
            let signer = Arc::new(Signer::new(td, lifetime, Roots::load(&store)?));
            tracing::info!(namespace = %config.namespace, secret = %config.secret, "signer serving CertificateSigningRequests of {}", node_ca::SIGNER_NAME);
            tokio::select! {
                result = kube::serve(client, config, signer) => result,
                () = shutdown => Ok(()),
            }
        }
    }
}

/// `ca rotate`: one step, on the roots where the signer keeps them.
pub async fn rotate_at(at: &crate::cli::SignerArgs, step: RotateStep) -> anyhow::Result<String> {
    match &at.local {
        Some(dir) => {
            let mut store = local::read_dir(dir)?;
            if store.is_empty() {
                bail!("no roots in {}", dir.display());
            }
            let said = rotate(&mut store, step, &at.trust_domain)?;
            local::write_dir(dir, &store)?;
            Ok(said)
        }
        None => {
            let (client, config) = cluster(at, String::new()).await?;
            kube::rotate(&client, &config, step, &at.trust_domain).await
        }
    }
}

async fn cluster(
    at: &crate::cli::SignerArgs,
    agent_service_account: String,
) -> anyhow::Result<(::kube::Client, kube::Config)> {
    let access = crate::kube_client::Access::detect(at.kubeconfig.clone())
        .context("no cluster: give --local DIR, --kubeconfig, or run in a pod")?;
    let client = crate::kube_client::client(&access).await?;
    let config =
        kube::Config { namespace: at.namespace.clone(), secret: at.secret.clone(), agent_service_account };
    Ok((client, config))
}

/// Ends a task when dropped.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Logs a refused request with its reason.
pub fn refused(refusal: &Refusal, requester: &str) {
    tracing::warn!(reason = refusal.reason(), %requester, "node CA request refused: {refusal}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle_len(roots: &Roots) -> usize {
        gammaray_proxy::identity::TrustBundle::from_pem(&roots.bundle()).unwrap().len()
    }

    #[test]
    fn a_rotation_adds_uses_and_removes_a_root_and_refuses_steps_out_of_order() {
        let mut store = Roots::generate("cluster.local").unwrap();
        let first = Roots::load(&store).unwrap();
        assert_eq!(bundle_len(&first), 1);
        assert!(rotate(&mut store, RotateStep::Use, "cluster.local").is_err(), "nothing to use");
        assert!(rotate(&mut store, RotateStep::Remove, "cluster.local").is_err(), "nothing to remove");
        rotate(&mut store, RotateStep::Add, "cluster.local").unwrap();
        assert!(rotate(&mut store, RotateStep::Add, "cluster.local").is_err(), "one rotation at a time");
        let added = Roots::load(&store).unwrap();
        assert_eq!(added.active.cert_pem(), first.active.cert_pem(), "the old root still signs");
        assert_eq!(bundle_len(&added), 2);
        rotate(&mut store, RotateStep::Use, "cluster.local").unwrap();
        let used = Roots::load(&store).unwrap();
        assert_ne!(used.active.cert_pem(), first.active.cert_pem(), "the new root signs");
        assert!(used.bundle().ends_with(first.active.cert_pem()), "the old one is still trusted");
        assert!(!store.values().any(|v| v == &first.active.key_pem()), "the old key is gone");
        rotate(&mut store, RotateStep::Remove, "cluster.local").unwrap();
        let removed = Roots::load(&store).unwrap();
        assert_eq!(bundle_len(&removed), 1);
    }

    #[test]
    fn the_signer_signs_only_the_requesters_own_node() {
        let signer = Signer::new(
            "cluster.local".into(),
            Duration::from_secs(60),
            Roots::load(&Roots::generate("cluster.local").unwrap()).unwrap(),
        );
        let (_, csr) = node_ca::request("cluster.local", "node1").unwrap();
        assert!(signer.sign(&csr, "node1", "test").is_ok());
        let err = signer.sign(&csr, "node2", "test").unwrap_err();
        assert_eq!(err.reason(), "OtherNode", "{err}");
    }
}
