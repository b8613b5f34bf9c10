//! Real agents on the simulated cluster's nodes, for the demo, the conformance runner and the
//! bench: testkit's harness starts them; here is what xtask asks of them over the control socket.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use gammaray_agent::control::{Client, Status};
pub use gammaray_testkit::agent::{Agent, AgentArgs, TIMEOUT};
pub use gammaray_testkit::signer::{Signer, SignerAccess};
use gammaray_testkit::{
    Cluster,
    agent::block_on,
    controlplane::{Assets, ControlPlane, Site},
};

/// What xtask asks of a running agent, over its control socket.
pub trait Control {
    fn status(&self) -> anyhow::Result<Status>;

    /// Waits (up to [`TIMEOUT`]) until the agent's status satisfies `ready`; returns it.
    fn wait_until(&self, ready: impl Fn(&Status) -> bool) -> anyhow::Result<Status>;
}

impl Control for Agent {
    fn status(&self) -> anyhow::Result<Status> {
        Ok(block_on(Client::new(&self.socket).status())?)
    }

    fn wait_until(&self, ready: impl Fn(&Status) -> bool) -> anyhow::Result<Status> {
        self.wait_for("a status that satisfies the caller", || match self.status() {
            Ok(st) if ready(&st) => Ok(st),
            Ok(st) => Err(format!(
                "config v{}, {} frontends, {} enrolled",
                st.config_version,
                st.frontends,
                st.enrolled.len()
            )),
            Err(err) => Err(err.to_string()),
        })
    }
}

/// Where the agents read the configuration from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Source {
    /// A manifest directory the agents re-read.
    Manifests,
    /// A real kube-apiserver with etcd (`KUBEBUILDER_ASSETS`).
    Real,
}

/// A real control plane inside node1, on its address (where both nodes' agents reach it), with
/// `deploy/` applied and `namespaces` (YAML) created; returns it with a kubeconfig, in the
/// cluster's directory, that authenticates as the agent's ServiceAccount (a TokenRequest token):
/// the agents run with the RBAC a cluster gives them.
pub fn real_api_server(
    cluster: &Cluster,
    assets: &Assets,
    namespaces: &str,
) -> anyhow::Result<(ControlPlane, PathBuf)> {
    let node1 = cluster.node(1);
    let site = Site { netns: Some(node1.netns().path()), address: node1.ip };
    let plane =
        ControlPlane::start_at(assets, site).map_err(|e| anyhow::anyhow!("the control plane: {e}"))?;
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let deploy = deploy.to_str().context("deploy/'s path")?;
    plane
        .kubectl(&["apply", "-k", deploy, "--server-side"])
        .map_err(|e| anyhow::anyhow!("apply deploy/: {e}"))?;
    if !namespaces.trim().is_empty() {
        plane.try_apply_yaml(namespaces).map_err(|e| anyhow::anyhow!("the namespaces: {e}"))?;
    }
    let token =
        plane.token("gammaray-system", "gammaray-agent").map_err(|e| anyhow::anyhow!("a token: {e}"))?;
    let kubeconfig = cluster.dir().join("agent-kubeconfig");
    plane.write_token_kubeconfig(&kubeconfig, &token)?;
    Ok((plane, kubeconfig))
}

/// The signer as a cluster runs it (`deploy/signer.yaml`): `ca serve` on node1 with its own
/// ServiceAccount's token, deciding the agents' CertificateSigningRequests. Each node gets an
/// agent Pod object (the DaemonSet's pod, which the token is bound to) and a token of the agents'
/// ServiceAccount bound to it, for the signer only: what the DaemonSet's projected volume holds.
pub struct ClusterSigner {
    _process: gammaray_testkit::process::Process,
    pub log: PathBuf,
    /// Each node's `run` arguments for it: `--signer=kubernetes --signer-token FILE`.
    pub args: std::collections::BTreeMap<String, Vec<String>>,
}

impl ClusterSigner {
    pub fn start(agent_bin: &Path, cluster: &Cluster, plane: &ControlPlane) -> anyhow::Result<Self> {
        let ns = "gammaray-system";
        let token =
            plane.token(ns, "gammaray-signer").map_err(|e| anyhow::anyhow!("the signer's token: {e}"))?;
        let kubeconfig = cluster.dir().join("signer-kubeconfig");
        plane.write_token_kubeconfig(&kubeconfig, &token)?;
        let log = cluster.dir().join("signer.log");
        let argv: Vec<String> = ["ca", "serve", "--namespace", ns, "--kubeconfig"]
            .map(str::to_owned)
            .into_iter()
            .chain([kubeconfig.display().to_string()])
            .collect();
        let process = cluster.node(1).spawn("signer", agent_bin, &argv, &[], Some(&log))?;
        let mut args = std::collections::BTreeMap::new();
        for node in cluster.nodes() {
            let pod = format!("gammaray-agent-{}", node.name);
            let objects = format!(
                "{}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {ns}}}\nspec: {{nodeName: {}, serviceAccountName: gammaray-agent, containers: [{{name: agent, image: agent}}]}}\n",
                gammaray_testkit::objects::node(&node.name, node.ip),
                node.name
            );
            plane.try_apply_yaml(&objects).map_err(|e| anyhow::anyhow!("{pod}: {e}"))?;
            let token = plane
                .kubectl(&[
                    "create",
                    "token",
                    "gammaray-agent",
                    "-n",
                    ns,
                    "--audience",
                    gammaray_proxy::identity::node_ca::SIGNER_NAME,
                    "--bound-object-kind",
                    "Pod",
                    "--bound-object-name",
                    &pod,
                    "--duration",
                    "1h",
                ])
                .map_err(|e| anyhow::anyhow!("a token bound to {pod}: {e}"))?;
            let file = cluster.dir().join(format!("{}-node-ca.token", node.name));
            std::fs::write(&file, token.trim())?;
            args.insert(
                node.name.clone(),
                vec![
                    "--signer=kubernetes".to_owned(),
                    "--signer-token".to_owned(),
                    file.display().to_string(),
                ],
            );
        }
        Ok(Self { _process: process, log, args })
    }

    /// `base` with the agent of `node` asking this signer.
    pub fn agent_args(&self, node: &str, base: &AgentArgs) -> AgentArgs {
        let mut extra = base.extra.clone();
        extra.extend(self.args.get(node).cloned().unwrap_or_default());
        AgentArgs { signer: None, extra, ..base.clone() }
    }
}

/// An agent watching the API server of `kubeconfig`, with mTLS by a node CA from `signer`.
pub fn kubeconfig_agent(kubeconfig: &Path, signer: &SignerAccess, rust_log: &str) -> AgentArgs {
    AgentArgs {
        signer: Some(signer.clone()),
        extra: vec!["--kubeconfig".to_owned(), kubeconfig.display().to_string()],
        rust_log: rust_log.to_owned(),
        ..AgentArgs::default()
    }
}

/// The UID a real API server gives `object` (a Pod, created there): the hook testkit's worlds take.
pub fn create_on(plane: &ControlPlane, object: &serde_json::Value) -> gammaray_testkit::Result<String> {
    let created = plane.create(object).map_err(gammaray_testkit::Error::Other)?;
    created["metadata"]["uid"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| gammaray_testkit::Error::Other(format!("no uid in {created}")))
}

/// An agent routing by the manifests in `manifests`, with mTLS by a node CA from `signer`.
pub fn manifest_agent(manifests: &Path, signer: &SignerAccess, rust_log: &str) -> AgentArgs {
    AgentArgs {
        manifests: Some(manifests.to_owned()),
        signer: Some(signer.clone()),
        rust_log: rust_log.to_owned(),
        ..AgentArgs::default()
    }
}

/// Writes `text` to `path` through a rename, so a polling reader never sees half a file.
pub fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Fails unless this machine has what `what` needs (root, BTF, cgroup2, iproute2), naming what
/// is missing.
pub fn require_privileges(what: &str) -> anyhow::Result<()> {
    let missing = gammaray_testkit::privileged::missing_privileges();
    if !missing.is_empty() {
        anyhow::bail!("{what} cannot run: {}", missing.join("; "));
    }
    Ok(())
}

/// Whether a task builds its binaries itself (the demo and conformance a debug agent, the bench
/// release binaries) or runs the debug binaries the test build has just made.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Build {
    Now,
    /// `cargo xtask test` has just built every binary of the workspace. Building
    /// `-p gammaray-agent` alone would resolve features differently and rebuild much of the tree.
    AlreadyBuilt,
}

/// The debug build of the agent: built now (with cargo's progress shown, as a first build
/// takes minutes), or checked to be there.
pub fn agent_binary(build: Build) -> anyhow::Result<std::path::PathBuf> {
    if build == Build::Now {
        crate::cargo(&["build", "-p", "gammaray-agent", "--bins"])?;
    }
    let bin = gammaray_testkit::process::cargo_bin("gammaray-agent");
    anyhow::ensure!(bin.exists(), "{} is missing: build it first", bin.display());
    Ok(bin)
}
