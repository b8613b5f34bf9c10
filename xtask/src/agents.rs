//! Real agents on the simulated cluster's nodes, for the demo and the conformance runner: each
//! loads the eBPF programs, routes by a manifest directory and carries cross-node traffic over
//! mutual TLS with the given mesh CA.

use std::{
    net::SocketAddrV4,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::bail;
use gammaray_agent::control::{Client, Status};
use gammaray_testkit::{Cluster, Node, process::Process};

pub const TIMEOUT: Duration = Duration::from_secs(10);

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(f)
}

pub struct Agent {
    process: Process,
    pub node: String,
    pub control: Client,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Agent {
    /// Starts the agent of `node` routing by the manifests in `manifests`, with its control
    /// socket and log in the cluster's directory.
    pub fn start(
        bin: &Path,
        cluster: &Cluster,
        node: &Node,
        manifests: &Path,
        ca: &Path,
        rust_log: &str,
    ) -> anyhow::Result<Self> {
        let source = ["--manifests".to_owned(), manifests.display().to_string()];
        Self::start_with(bin, cluster, node, &source, ca, rust_log)
    }

    /// Starts the agent of `node` with `source` arguments (`--manifests DIR`, `--kubeconfig F`).
    pub fn start_with(
        bin: &Path,
        cluster: &Cluster,
        node: &Node,
        source: &[String],
        ca: &Path,
        rust_log: &str,
    ) -> anyhow::Result<Self> {
        let socket = cluster.dir().join(format!("{}.sock", node.name));
        let log = cluster.dir().join(format!("{}.log", node.name));
        let proxy = SocketAddrV4::new(node.ip, 15001);
        let args: Vec<String> = vec![
            "--control".into(),
            socket.display().to_string(),
            "run".into(),
            "--node".into(),
            node.name.clone(),
            "--proxy-addr".into(),
            proxy.to_string(),
            "--ca-cert".into(),
            ca.join("ca.crt").display().to_string(),
            "--ca-key".into(),
            ca.join("ca.key").display().to_string(),
        ];
        let mut args = args;
        args.extend(source.iter().cloned());
        let env = [("RUST_LOG".to_owned(), rust_log.to_owned())];
        let process = node.spawn("agent", bin, &args, &env, Some(&log))?;
        Ok(Self { process, node: node.name.clone(), control: Client::new(&socket), socket, log })
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn status(&self) -> anyhow::Result<Status> {
        Ok(block_on(self.control.status())?)
    }

    /// Waits (up to [`TIMEOUT`]) until the agent's status satisfies `ready`.
    pub fn wait_for(&self, ready: impl Fn(&Status) -> bool) -> anyhow::Result<Status> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match self.status() {
                Ok(st) if ready(&st) => return Ok(st),
                Ok(_) | Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                other => {
                    let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                    bail!(
                        "agent on {} not ready in time ({:?})\n{log}",
                        self.node,
                        other.map(|s| s.config_version)
                    );
                }
            }
        }
    }
}

/// Generates a mesh root CA into `dir` with the agent's own subcommand; returns what it printed.
pub fn generate_ca(bin: &Path, dir: &Path) -> anyhow::Result<String> {
    let out = std::process::Command::new(bin).args(["ca", "generate", "--out"]).arg(dir).output()?;
    if !out.status.success() {
        bail!("cannot generate the CA: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
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
