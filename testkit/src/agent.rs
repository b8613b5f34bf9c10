//! A real agent process on a simulated node: the one harness the privileged tests, the demo,
//! the conformance runner and the bench start agents with. It knows the agent's command line,
//! where its control socket and log go, and when it is up (its control socket accepts); what is
//! said over the socket is the agent's own client's business.

use std::{
    net::SocketAddrV4,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{Cluster, Node, process::Process};

/// How long an agent may take to come up, or to reach a state a caller waits for.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// The node proxy's outbound port on every simulated node.
pub const PROXY_PORT: u16 = 15001;

/// How an agent is started, beyond its node.
#[derive(Debug, Clone, Default)]
pub struct AgentArgs {
    /// Route by the manifests in this directory (`--manifests`).
    pub manifests: Option<PathBuf>,
    /// The local signer the agent gets its node CA from (`--signer unix:…`, with a token of
    /// its own): with it, traffic between nodes is mutual TLS.
    pub signer: Option<crate::signer::SignerAccess>,
    /// More arguments of `run` (`--kubeconfig FILE`, …).
    pub extra: Vec<String>,
    /// The agent's log filter (`RUST_LOG`); empty leaves the agent's default.
    pub rust_log: String,
    /// `--drain-timeout` in seconds; [`DRAIN_SECS`] when `None`.
    pub drain_secs: Option<u64>,
    /// Names a second agent on the same node (an upgrade's), so that its log is its own; the
    /// rest of its command line is the first's.
    pub instance: Option<String>,
}

/// How long a test agent's shutdown waits for connections: short, so that a test, the demo or
/// the bench ending with connections open does not wait the deployed default.
pub const DRAIN_SECS: u64 = 3;

/// A running agent; dropping it kills the process.
pub struct Agent {
    process: Process,
    pub node: String,
    /// The control socket, for the agent's control client.
    pub socket: PathBuf,
    pub log: PathBuf,
    /// The node proxy's outbound listener.
    pub proxy: SocketAddrV4,
}

impl Agent {
    /// Starts the agent `bin` on `node`, its control socket and log in the cluster's directory,
    /// and waits until its control socket accepts (the agent binds it last).
    pub fn start(bin: &Path, cluster: &Cluster, node: &Node, args: &AgentArgs) -> anyhow::Result<Self> {
        let socket = cluster.dir().join(format!("{}-agent.sock", node.name));
        let log = match &args.instance {
            Some(instance) => cluster.dir().join(format!("{}-agent-{instance}.log", node.name)),
            None => cluster.dir().join(format!("{}-agent.log", node.name)),
        };
        let proxy = SocketAddrV4::new(node.ip, PROXY_PORT);
        let mut argv: Vec<String> = vec![
            "--control".into(),
            socket.display().to_string(),
            "run".into(),
            "--node".into(),
            node.name.clone(),
            "--proxy-addr".into(),
            proxy.to_string(),
            "--bpffs".into(),
            node.bpffs.display().to_string(),
        ];
        if let Some(dir) = &args.manifests {
            argv.extend(["--manifests".into(), dir.display().to_string()]);
        }
        if let Some(signer) = &args.signer {
            let token = signer.token_for(&node.name).context("a signer token")?;
            argv.extend([
                format!("--signer=unix:{}", signer.socket.display()),
                "--signer-token".into(),
                token.display().to_string(),
            ]);
        }
        argv.extend(["--drain-timeout".into(), args.drain_secs.unwrap_or(DRAIN_SECS).to_string()]);
        argv.extend(args.extra.iter().cloned());
        let env: Vec<(String, String)> = if args.rust_log.is_empty() {
            Vec::new()
        } else {
            vec![("RUST_LOG".into(), args.rust_log.clone())]
        };
        // A socket file left by an earlier run would answer nothing and fool the wait below.
        let _ = std::fs::remove_file(&socket);
        let process = node
            .spawn("agent", bin, &argv, &env, Some(&log))
            .with_context(|| format!("start the agent on {}", node.name))?;
        let agent = Self { process, node: node.name.clone(), socket, log, proxy };
        agent.wait_for("the agent's control socket to accept", || {
            std::os::unix::net::UnixStream::connect(&agent.socket).map(drop).map_err(|e| e.to_string())
        })?;
        Ok(agent)
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// SIGTERM, then SIGKILL after `grace`; the exit status, unless it was already stopped.
    pub fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        self.process.stop(grace)
    }

    /// SIGKILL (a crash, an OOM kill): the agent's own clean-up never runs.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Sends SIGTERM and returns at once (the agent drains, then exits).
    pub fn terminate(&self) {
        self.process.terminate();
    }

    /// The exit status, once the process has exited within `timeout`; `None` while it runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.process.wait_exit(timeout)
    }

    /// What the agent has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `check` every 20 ms until it returns `Ok`, for at most [`TIMEOUT`]; the error says
    /// `what`, the last failure and the agent's log.
    pub fn wait_for<T>(&self, what: &str, mut check: impl FnMut() -> Result<T, String>) -> anyhow::Result<T> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match check() {
                Ok(v) => return Ok(v),
                Err(last) if Instant::now() >= deadline => {
                    bail!(
                        "{}: still waiting for {what} after {TIMEOUT:?}: {last}\n{}",
                        self.node,
                        self.log_text()
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// Runs `f` to completion on a runtime of its own, for synchronous callers of async clients.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime").block_on(f)
}
