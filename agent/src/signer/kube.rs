//! The signer on a cluster: CertificateSigningRequests of signer `gammaray.dev/node-ca`, the
//! roots in a Secret, the trust bundle in a ConfigMap.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::{
    ByteString,
    api::{
        authentication::v1::{TokenReview, TokenReviewSpec},
        certificates::v1::{CertificateSigningRequest, CertificateSigningRequestCondition},
        core::v1::{ConfigMap, Pod, Secret},
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt as _, watcher},
};

use super::{BUNDLE_CONFIGMAP, BUNDLE_KEY, Roots, Signer, Store, TOKEN_ANNOTATION};
use gammaray_proxy::identity::node_ca::{Refusal, SIGNER_NAME};

/// Who may ask, and where the signer keeps its state.
#[derive(Debug, Clone)]
pub struct Config {
    /// The namespace of the roots Secret, the bundle ConfigMap and the agents' pods.
    pub namespace: String,
    pub secret: String,
    /// The agents' service account (in `namespace`).
    pub agent_service_account: String,
}

/// How many decided requests the signer remembers before it forgets them all (a request
/// decided already is recognised by its status then).
const RECORDED_LIMIT: usize = 10_000;

const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// The roots from the Secret, made first if there is none (the first signer to create it wins).
pub async fn load_or_create(client: &Client, config: &Config, trust_domain: &str) -> anyhow::Result<Store> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &config.namespace);
    if let Some(store) = read_secret(&secrets, &config.secret).await? {
        return Ok(store);
    }
    let store = Roots::generate(trust_domain)?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(config.secret.clone()),
            namespace: Some(config.namespace.clone()),
            labels: Some(BTreeMap::from([("app.kubernetes.io/name".into(), "gammaray".into())])),
            ..Default::default()
        },
        data: Some(to_data(&store)),
        ..Default::default()
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(secret = %config.secret, "made a new mesh root");
            Ok(store)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => read_secret(&secrets, &config.secret)
            .await?
            .context("the roots Secret vanished after it was made"),
        Err(e) => Err(e).context("cannot create the roots Secret"),
    }
}

fn to_data(store: &Store) -> BTreeMap<String, ByteString> {
    store.iter().map(|(k, v)| (k.clone(), ByteString(v.clone().into_bytes()))).collect()
}

async fn read_secret(secrets: &Api<Secret>, name: &str) -> anyhow::Result<Option<Store>> {
    let Some(secret) = secrets.get_opt(name).await.context("cannot read the roots Secret")? else {
        return Ok(None);
    };
    let data = secret.data.unwrap_or_default();
    Ok(Some(data.into_iter().map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned())).collect()))
}

/// Applies a rotation step to the roots Secret (an update, so a concurrent change fails
/// rather than being overwritten).
pub async fn rotate(
    client: &Client,
    config: &Config,
    step: super::RotateStep,
    trust_domain: &str,
) -> anyhow::Result<String> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &config.namespace);
    let mut secret = secrets.get(&config.secret).await.context("cannot read the roots Secret")?;
    let mut store: Store = secret
        .data
        .take()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
        .collect();
    let said = super::rotate(&mut store, step, trust_domain)?;
    secret.data = Some(to_data(&store));
    secrets
        .replace(&config.secret, &PostParams::default(), &secret)
        .await
        .context("cannot update the roots Secret")?;
    Ok(said)
}

/// Publishes the trust bundle to its ConfigMap.
async fn publish(client: &Client, namespace: &str, bundle: &str) -> anyhow::Result<()> {
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let map = ConfigMap {
        metadata: ObjectMeta { name: Some(BUNDLE_CONFIGMAP.into()), ..Default::default() },
        data: Some(BTreeMap::from([(BUNDLE_KEY.into(), bundle.to_owned())])),
        ..Default::default()
    };
    maps.patch(BUNDLE_CONFIGMAP, &PatchParams::apply("gammaray-signer").force(), &Patch::Apply(&map))
        .await
        .context("cannot publish the trust bundle")?;
    Ok(())
}

/// Serves until the task is dropped: keeps the bundle published as the Secret changes, and
/// decides every pending node CA request.
pub async fn serve(client: Client, config: Config, signer: Arc<Signer>) -> anyhow::Result<()> {
    publish(&client, &config.namespace, &signer.roots().bundle()).await?;
    tracing::info!(namespace = %config.namespace, "trust bundle published");
    let reload = {
        let (client, config, signer) = (client.clone(), config.clone(), signer.clone());
        tokio::spawn(async move {
            let secrets: Api<Secret> = Api::namespaced(client.clone(), &config.namespace);
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let store = match read_secret(&secrets, &config.secret).await {
                    Ok(Some(store)) => store,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot read the roots Secret; retrying");
                        continue;
                    }
                };
                match Roots::load(&store) {
                    Ok(roots) => {
                        let bundle = roots.bundle();
                        if signer.replace(roots) {
                            match publish(&client, &config.namespace, &bundle).await {
                                Ok(()) => tracing::info!("the roots changed: trust bundle republished"),
                                Err(e) => tracing::warn!(error = %e, "cannot republish the trust bundle"),
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the roots Secret does not load; keeping the roots in force")
                    }
                }
            }
        })
    };
    let _reload = super::AbortOnDrop(reload);
    let csrs: Api<CertificateSigningRequest> = Api::all(client.clone());
    let watch =
        watcher(csrs.clone(), watcher::Config::default().fields(&format!("spec.signerName={SIGNER_NAME}")))
            .default_backoff()
            .applied_objects();
    tokio::pin!(watch);
    let mut recorded = std::collections::HashSet::new();
    while let Some(event) = watch.next().await {
        let csr = match event {
            Ok(csr) => csr,
            Err(e) => {
                tracing::debug!(error = %e, "CSR watch interrupted; resuming");
                continue;
            }
        };
        let name = csr.metadata.name.clone().unwrap_or_default();
        // The approval's own change comes back before the certificate is on the status: what
        // this signer decided is not decided again. A request approved but left unsigned by an
        // earlier signer is decided afresh.
        if decided(&csr) || !recorded.insert(name.clone()) {
            continue;
        }
        if recorded.len() > RECORDED_LIMIT {
            recorded.clear();
            recorded.insert(name.clone());
        }
        let decision = decide(&client, &config, &signer, &csr).await;
        if let Err(e) = record(&csrs, &name, decision).await {
            tracing::warn!(csr = %name, error = %e, "cannot record the decision on the CSR");
            recorded.remove(&name);
        }
    }
    Ok(())
}

/// Whether a request was decided already (approved with a certificate, denied, or failed).
fn decided(csr: &CertificateSigningRequest) -> bool {
    let status = csr.status.as_ref();
    status.is_some_and(|s| s.certificate.is_some())
        || status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Denied" || c.type_ == "Failed"))
}

/// Checks who asks, then signs: the token is the agent's, bound to a pod of the agent's
/// account, the request was created by that account, and the pod runs on the node asked for.
/// Every refusal is logged once: here when it is about the requester, by [`Signer::sign`] when
/// it is about the request.
async fn decide(
    client: &Client,
    config: &Config,
    signer: &Signer,
    csr: &CertificateSigningRequest,
) -> Result<String, Refusal> {
    let requester = format!("CSR {}", csr.metadata.name.as_deref().unwrap_or_default());
    match authenticate(client, config, csr).await {
        Ok((node, pod)) => {
            // Not PEM is the request's fault, which the review says.
            let request = String::from_utf8_lossy(&csr.spec.request.0);
            signer.sign(&request, &node, &format!("{requester} from pod {pod}"))
        }
        Err(refusal) => {
            super::refused(&refusal, &requester);
            Err(refusal)
        }
    }
}

/// The node of the agent that made `csr`, and its pod, or why it is not one.
async fn authenticate(
    client: &Client,
    config: &Config,
    csr: &CertificateSigningRequest,
) -> Result<(String, String), Refusal> {
    let token =
        csr.metadata.annotations.as_ref().and_then(|a| a.get(TOKEN_ANNOTATION)).ok_or_else(|| {
            Refusal::Unauthenticated(format!("no token in the {TOKEN_ANNOTATION} annotation"))
        })?;
    let review = TokenReview {
        spec: TokenReviewSpec { token: Some(token.clone()), audiences: Some(vec![SIGNER_NAME.into()]) },
        ..Default::default()
    };
    let reviewed = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| Refusal::Signer(format!("TokenReview failed: {e}")))?;
    let status = reviewed.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        let why = status.error.unwrap_or_else(|| "not authenticated".into());
        return Err(Refusal::Unauthenticated(format!("the token is not valid: {why}")));
    }
    let user = status.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let agent = format!("system:serviceaccount:{}:{}", config.namespace, config.agent_service_account);
    if username != agent {
        return Err(Refusal::NotAnAgent(format!("the token is {username}'s, not {agent}'s")));
    }
    if csr.spec.username.as_deref() != Some(username.as_str()) {
        return Err(Refusal::NotAnAgent(format!(
            "the request was created by {}, not by the token's account",
            csr.spec.username.as_deref().unwrap_or("nobody")
        )));
    }
    let extra = user.extra.unwrap_or_default();
    let one = |k: &str| extra.get(k).and_then(|v| v.first().cloned());
    let (Some(pod_name), Some(pod_uid)) = (one(POD_NAME), one(POD_UID)) else {
        return Err(Refusal::Unauthenticated("the token is not bound to a pod".into()));
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), &config.namespace);
    let pod = pods
        .get_opt(&pod_name)
        .await
        .map_err(|e| Refusal::Signer(format!("cannot read pod {pod_name}: {e}")))?
        .ok_or_else(|| Refusal::Unauthenticated(format!("the token's pod {pod_name} no longer exists")))?;
    if pod.metadata.uid.as_deref() != Some(pod_uid.as_str()) {
        return Err(Refusal::Unauthenticated(format!("the token's pod {pod_name} was replaced")));
    }
    let node = pod
        .spec
        .and_then(|s| s.node_name)
        .ok_or_else(|| Refusal::NotAnAgent(format!("pod {pod_name} is not scheduled to a node")))?;
    Ok((node, pod_name))
}

/// Approves and signs, or denies with the reason.
async fn record(
    csrs: &Api<CertificateSigningRequest>,
    name: &str,
    decision: Result<String, Refusal>,
) -> anyhow::Result<()> {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let condition = |type_: &str, reason: &str, message: String| CertificateSigningRequestCondition {
        type_: type_.into(),
        status: "True".into(),
        reason: Some(reason.into()),
        message: Some(message),
        last_update_time: Some(now.clone()),
        last_transition_time: Some(now.clone()),
    };
    let (conditions, certificate) = match decision {
        Ok(cert) => (
            condition(
                "Approved",
                "NodeAgent",
                "the request comes from the agent of the node it names".into(),
            ),
            Some(cert),
        ),
        Err(refusal) => (condition("Denied", refusal.reason(), refusal.to_string()), None),
    };
    let approval = serde_json::json!({ "status": { "conditions": [conditions] } });
    csrs.patch_approval(name, &PatchParams::default(), &Patch::Merge(&approval)).await?;
    if let Some(cert) = certificate {
        let status = serde_json::json!({ "status": { "certificate": ByteString(cert.into_bytes()) } });
        csrs.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await?;
    }
    Ok(())
}
