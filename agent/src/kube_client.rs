//! Reaching the Kubernetes API: a kubeconfig file (tests, running off-cluster) or the pod's own
//! service account (the DaemonSet), and the mesh CA kept in a Secret.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use anyhow::Context as _;
use k8s_openapi::{ByteString, api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::{
    Api, Client, Config,
    api::PostParams,
    config::{KubeConfigOptions, Kubeconfig},
};

/// How the agent reaches the API server.
#[derive(Debug, Clone)]
pub enum Access {
    Kubeconfig(PathBuf),
    /// The service account mounted into the pod, and KUBERNETES_SERVICE_HOST/PORT.
    InCluster,
}

impl Access {
    /// `--kubeconfig` if given, else in-cluster when running in a pod, else none: the agent then
    /// runs without a cluster (manifest directory or nothing).
    pub fn detect(kubeconfig: Option<PathBuf>) -> Option<Self> {
        match kubeconfig {
            Some(path) => Some(Self::Kubeconfig(path)),
            None if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() => Some(Self::InCluster),
            None => None,
        }
    }
}

pub async fn client(access: &Access) -> anyhow::Result<Client> {
    let config = match access {
        Access::Kubeconfig(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {} is not usable", path.display()))?
        }
        Access::InCluster => Config::incluster().context("cannot read the in-cluster configuration")?,
    };
    Client::try_from(config).context("cannot build the Kubernetes client")
}

/// The key names of the CA Secret.
pub const CA_CERT_KEY: &str = "ca.crt";
pub const CA_KEY_KEY: &str = "ca.key";

/// Creates the CA Secret `namespace/name` with a new root CA unless it exists; returns whether
/// it created it. Safe to run from every node at once: one create wins, the others see it.
pub async fn bootstrap_ca(
    client: &Client,
    namespace: &str,
    name: &str,
    trust_domain: &str,
) -> anyhow::Result<bool> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    if secrets.get_opt(name).await.context("cannot read the CA Secret")?.is_some() {
        return Ok(false);
    }
    let ca = gammaray_proxy::identity::Authority::generate(trust_domain)?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([("app.kubernetes.io/part-of".to_owned(), "gammaray".to_owned())])),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            (CA_CERT_KEY.to_owned(), ByteString(ca.cert_pem().as_bytes().to_vec())),
            (CA_KEY_KEY.to_owned(), ByteString(ca.key_pem().into_bytes())),
        ])),
        ..Default::default()
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e).context("cannot create the CA Secret"),
    }
}

/// Reads the CA (certificate and key PEM) from its Secret, waiting up to `wait` for it to
/// appear (the bootstrap may still be running on another node).
pub async fn read_ca(
    client: &Client,
    namespace: &str,
    name: &str,
    wait: Duration,
) -> anyhow::Result<(String, String)> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Some(secret) = secrets.get_opt(name).await.context("cannot read the CA Secret")? {
            let data = secret.data.unwrap_or_default();
            let field = |k: &str| {
                data.get(k)
                    .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                    .with_context(|| format!("the CA Secret {namespace}/{name} has no {k}"))
            };
            return Ok((field(CA_CERT_KEY)?, field(CA_KEY_KEY)?));
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "the CA Secret {namespace}/{name} does not exist; create it with `gammaray-agent ca bootstrap`"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
