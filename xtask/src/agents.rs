//! Real agents on the simulated cluster's nodes, for the demo, the conformance runner and the
//! bench: testkit's harness starts them; here is what xtask asks of them over the control socket.

use std::path::Path;

use gammaray_agent::control::{Client, Status};
use gammaray_testkit::agent::block_on;
pub use gammaray_testkit::agent::{Agent, AgentArgs, TIMEOUT, generate_ca};

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

/// An agent routing by the manifests in `manifests`, with mTLS by the CA in `ca`.
pub fn manifest_agent(manifests: &Path, ca: &Path, rust_log: &str) -> AgentArgs {
    AgentArgs {
        manifests: Some(manifests.to_owned()),
        ca: Some(ca.to_owned()),
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
