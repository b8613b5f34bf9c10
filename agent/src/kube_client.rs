//! Reaching the Kubernetes API: a kubeconfig file (tests, running off-cluster) or the pod's own
//! service account (the DaemonSet).

use std::path::PathBuf;

use anyhow::Context as _;
use kube::{
    Client, Config,
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
