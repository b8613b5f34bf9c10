//! Command line of `gammaray-agent`.

use std::{net::SocketAddrV4, path::PathBuf};

use clap::{
    CommandFactory as _, Parser, Subcommand,
    builder::{BoolishValueParser, TypedValueParser as _},
};

/// Where the agent pins its eBPF state by default.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/gammaray";

/// The variable that sets `--log-json`.
pub const LOG_JSON_ENV: &str = "GAMMARAY_LOG_JSON";

#[derive(Debug, Parser)]
#[command(name = "gammaray-agent", version, about = "gammaray's per-node mesh agent")]
pub struct Cli {
    /// Log filter when RUST_LOG is unset; add `gammaray::kernel=debug` to see every redirect.
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
    /// Log as JSON lines; the variable takes 1/0, true/false, yes/no or on/off.
    #[arg(long, global = true, env = LOG_JSON_ENV, value_parser = BoolishValueParser::new())]
    pub log_json: bool,
    /// The agent's control socket.
    #[arg(long, global = true, default_value = "/run/gammaray/agent.sock", env = "GAMMARAY_CONTROL")]
    pub control: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// [`LOG_JSON_ENV`] read as `--log-json` reads it, for programs that run the proxy without
    /// the agent's command line (the request-cost harness).
    pub fn log_json_from_env() -> Result<bool, clap::Error> {
        match std::env::var_os(LOG_JSON_ENV) {
            None => Ok(false),
            Some(value) => BoolishValueParser::new().parse_ref(&Self::command(), None, &value),
        }
    }
}

// Parsed once at start: the size of the `run` variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the eBPF programs, run the node proxy and serve until SIGTERM.
    Run {
        /// This node's name.
        #[arg(long, env = "NODE_NAME")]
        node: String,
        /// Address of the node proxy's outbound listener; enrolled pods' connections go here.
        #[arg(long)]
        proxy_addr: SocketAddrV4,
        /// Port of the inbound HBONE listener (mutual TLS from other nodes), on the proxy's
        /// address; every node of the mesh must use the same.
        #[arg(long, default_value_t = gammaray_proxy::DEFAULT_HBONE_PORT)]
        hbone_port: u16,
        /// cgroup2 directory to attach to (default: detected from /proc/self/mountinfo).
        #[arg(long)]
        cgroup_root: Option<PathBuf>,
        /// Kernel BTF, checked before loading.
        #[arg(long, default_value = "/sys/kernel/btf/vmlinux")]
        btf: PathBuf,
        /// Worker threads of the proxy. One (a current-thread runtime) keeps a connection's
        /// tasks on one thread, with no wakeups across threads, and lets a shared HBONE
        /// connection carry the frames of many requests in one write; on the 2-core machines
        /// measured it gave more requests per CPU second and lower latency than two
        /// (`cargo xtask bench`). Raise it on busy nodes.
        #[arg(long, default_value_t = 1)]
        proxy_threads: usize,
        /// Route by the Kubernetes manifests in this directory (re-read on change).
        #[arg(long)]
        manifests: Option<PathBuf>,
        /// Trust domain of the SPIFFE identities.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Where the node's CA comes from, and with it mutual TLS between nodes (HBONE):
        /// `kubernetes` (CertificateSigningRequests to the signer `gammaray.dev/node-ca`; the
        /// default on a cluster), `unix:PATH` (a local signer, `ca serve --local`), or `none`
        /// (traffic between nodes is plaintext; the default off a cluster).
        #[arg(long)]
        signer: Option<String>,
        /// The token that proves to the signer this agent is its node's: the projected
        /// service-account token (audience `gammaray.dev/node-ca`) on a cluster.
        #[arg(long, default_value = "/var/run/secrets/gammaray/node-ca/token")]
        signer_token: PathBuf,
        /// The admin endpoint: /healthz and /readyz for the kubelet, and /config_dump to a
        /// client on the node's loopback only.
        #[arg(long, default_value = "0.0.0.0:15021")]
        admin_addr: std::net::SocketAddr,
        /// The metrics endpoint, /metrics; the same as --admin-addr serves both on one listener.
        #[arg(long, default_value = "0.0.0.0:15020")]
        metrics_addr: std::net::SocketAddr,
        #[command(flatten)]
        kube: KubeArgs,
        /// The host's /proc (pods' network namespaces are found through their processes).
        #[arg(long, default_value = "/proc")]
        proc_root: PathBuf,
        /// Seconds a SIGTERM waits for the proxy's connections to finish (the listeners stop
        /// accepting at once); what is left then is closed. Match the pod's
        /// terminationGracePeriodSeconds.
        #[arg(long, default_value_t = 30)]
        drain_timeout: u64,
        /// Where the eBPF maps and links are pinned (a bpf file system), so that they outlive
        /// the agent: a restarted or upgraded agent adopts them. One directory per node.
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
        /// What an enrolled pod's connection meets while no node proxy is alive (the agent
        /// crashed, was killed, or has not started yet): `closed` refuses it at once, `open`
        /// lets it go directly, unproxied and in plaintext. Default: `closed` with mutual TLS,
        /// `open` without.
        #[arg(long, value_enum)]
        failure_mode: Option<crate::ebpf::FailureMode>,
    },
    /// Remove the pinned eBPF maps and links of a node (run once no agent runs there: the
    /// DaemonSet's removal path). Enrolled pods then connect directly.
    Uninstall {
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
    },
    /// Mesh CA management.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Print the CustomResourceDefinitions of the kinds the agent defines (AuthorizationPolicy),
    /// as `deploy/crds/` holds them: for clusters without Istio's.
    Crds,
    /// Enrol a network namespace (/proc/PID/ns/net or /run/netns/NAME) in a running agent.
    Enrol { netns: PathBuf },
    /// Stop steering a network namespace.
    Unenrol { netns: PathBuf },
    /// Print the running agent's status as JSON.
    Status,
    /// What the agent routes by, as JSON: its status, every Service with its routes, endpoints
    /// and identities, and the route statuses.
    ConfigDump,
    /// Describe how the running agent handles a resource.
    Describe {
        #[command(subcommand)]
        what: DescribeCommand,
    },
}

/// How the agent works with a cluster.
#[derive(Debug, clap::Args)]
pub struct KubeArgs {
    /// Use the API server of this kubeconfig (default: in-cluster when running in a pod;
    /// none otherwise).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Namespace of the status Lease and the CA Secret.
    #[arg(long, env = "POD_NAMESPACE", default_value = "gammaray-system")]
    pub namespace: String,
    /// The Lease whose holder writes route status.
    #[arg(long, default_value = "gammaray-route-status")]
    pub lease_name: String,
    /// Seconds a status Lease lasts without renewal; it is renewed every third of that.
    #[arg(long, default_value_t = 15)]
    pub lease_duration_secs: u64,
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Run the signer: the only holder of the mesh root's key. It issues each node agent its
    /// node CA and publishes the trust bundle. On a cluster (the Deployment) it serves
    /// CertificateSigningRequests of `gammaray.dev/node-ca` and keeps the roots in a Secret;
    /// with --local, a Unix socket and a directory.
    Serve {
        #[command(flatten)]
        at: SignerArgs,
        /// The Unix socket of a local signer (default: DIR/signer.sock).
        #[arg(long, requires = "local")]
        socket: Option<PathBuf>,
        /// A local signer's node tokens, a line `TOKEN NODE` each (default: DIR/tokens).
        #[arg(long, requires = "local")]
        tokens: Option<PathBuf>,
        /// The agents' service account, in --namespace: only its tokens get node CAs.
        #[arg(long, default_value = "gammaray-agent")]
        agent_service_account: String,
        /// Seconds a node CA is valid; agents renew at half of it.
        #[arg(long, default_value_t = 24 * 3600)]
        node_ca_lifetime: u64,
    },
    /// One step of a root rotation, on the signer's roots (the signer picks it up and
    /// republishes the bundle; agents follow). Between steps, wait until every agent reports
    /// the state the step says (`gammaray_trust_bundle_roots`, `gammaray_node_ca_current`).
    Rotate {
        #[arg(long, value_enum)]
        step: crate::signer::RotateStep,
        #[command(flatten)]
        at: SignerArgs,
    },
}

/// Where the signer keeps the roots.
#[derive(Debug, clap::Args)]
pub struct SignerArgs {
    /// A directory of roots (a signer on one machine); without it, the cluster's Secret.
    #[arg(long)]
    pub local: Option<PathBuf>,
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    #[arg(long, env = "POD_NAMESPACE", default_value = "gammaray-system")]
    pub namespace: String,
    /// The Secret holding the roots.
    #[arg(long, default_value = crate::signer::ROOTS_SECRET)]
    pub secret: String,
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
}

#[derive(Debug, Subcommand)]
pub enum DescribeCommand {
    /// A Service: ports, attached routes with rules and weights, endpoints per backend and
    /// node, TLS mode and identities.
    Service {
        name: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
    },
    /// A workload (pod): the authorization policies that apply to it, and the decision for a
    /// connection from `--from` (a SPIFFE identity; without it, an unauthenticated peer) to
    /// `--port`.
    Workload {
        name: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[arg(long)]
        from: Option<String>,
        #[arg(long, default_value_t = 80)]
        port: u16,
    },
}
