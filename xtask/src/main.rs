//! Project tasks: `cargo xtask demo | test | conformance | bench | release | lint`.

mod agents;
mod bench;
mod conformance;
mod demo;
mod instructions;
mod pgo;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "gammaray's project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Run the demo on a simulated cluster (needs root).
    Demo {
        /// Where the agents read the configuration: a manifest directory, or a real kube-apiserver
        /// and etcd (`real`, from `KUBEBUILDER_ASSETS`).
        #[arg(long, value_enum, default_value = "manifests")]
        apiserver: agents::Source,
    },
    /// Run every test and print "N passed, N failed".
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the GAMMA conformance catalogue on the real data path (needs root).
    Conformance {
        /// A catalogue directory: `cases/*.yaml` with their base manifests beside it (default:
        /// the shared catalogue, `GAMMARAY_CONFORMANCE_DIR` or `shared/conformance` above here).
        #[arg(long)]
        cases: Option<std::path::PathBuf>,
        /// Where the agents read the configuration: a manifest directory, or a real kube-apiserver
        /// and etcd (`real`, from `KUBEBUILDER_ASSETS`).
        #[arg(long, value_enum, default_value = "manifests")]
        apiserver: agents::Source,
    },
    /// Measure the mesh against a direct connection; writes target/bench/report.md (needs root).
    Bench {
        /// A short run that keeps the harness working (CI); the numbers are noisy.
        #[arg(long)]
        quick: bool,
        /// Trace the agents' system calls and record them with perf, at the fixed rate and at
        /// saturation, and during bulk TCP; summaries and flat profiles go next to the report.
        #[arg(long)]
        profile: bool,
        /// Instead of the timed runs: count the user-space instructions per request with
        /// callgrind, in one process on loopback (no root needed); writes
        /// target/bench/instructions.md.
        #[arg(long, conflicts_with_all = ["quick", "profile"])]
        instructions: bool,
        /// Build the agent as a plain release build, without profile-guided optimisation:
        /// two release builds and a training run quicker, and not what the image ships.
        #[arg(long)]
        no_pgo: bool,
        /// Only these phases (comma-separated): for comparing two agents where a phase needs what
        /// only one has (the flood needs the connection limits).
        #[arg(long, value_enum, value_delimiter = ',', conflicts_with = "instructions")]
        phases: Vec<bench::Phase>,
    },
    /// Build the agent's release binary with profile-guided optimisation, as the image does;
    /// prints its path.
    Release,
    /// rustfmt check and clippy with warnings denied.
    Lint,
    /// The benchmark's flood (run inside a pod by the bench): opens `count` connections to `to`,
    /// prints how many it holds, and holds them, idle, until it is stopped or 15 minutes pass.
    #[command(hide = true)]
    HoldConnections {
        #[arg(long)]
        to: std::net::SocketAddr,
        #[arg(long)]
        count: usize,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Demo { apiserver } => demo::run(agents::Build::Now, apiserver),
        Task::Test { args } => test::run(&args),
        Task::Conformance { cases, apiserver } => {
            let summary = conformance::run(&conformance::dir(cases), agents::Build::Now, apiserver)?;
            anyhow::ensure!(summary.failed == 0, "{} conformance cases failed", summary.failed);
            Ok(())
        }
        Task::Bench { instructions: true, no_pgo, .. } => instructions::run(!no_pgo),
        Task::Bench { quick, profile, no_pgo, phases, .. } => {
            bench::run(quick, profile, agents::Build::Now, !no_pgo, &phases)
        }
        Task::Release => {
            let built = pgo::build(&target_dir()?)?;
            println!("{}", built.agent.display());
            Ok(())
        }
        Task::Lint => test::lint(),
        Task::HoldConnections { to, count } => bench::hold_connections(to, count),
    }
}

/// The workspace's target directory: the one xtask itself was built into.
pub fn target_dir() -> anyhow::Result<std::path::PathBuf> {
    let debug_bin = gammaray_testkit::process::cargo_bin("gammaray-agent");
    Ok(debug_bin
        .parent()
        .and_then(std::path::Path::parent)
        .ok_or_else(|| anyhow::anyhow!("no target dir"))?
        .to_owned())
}

/// A cargo command as a plain shell would run it.
///
/// `cargo xtask` is `cargo run`, which gives xtask the package's variables (`CARGO_MANIFEST_DIR`,
/// `CARGO_PKG_*`, ...). Passed on to a nested cargo, they reach build scripts that watch them
/// (ring's watches `CARGO_MANIFEST_DIR`), which then rerun, and everything above them rebuilds:
/// ring, rustls, kube and gateway-api, after `cargo xtask` itself had just built them.
pub fn cargo_command() -> std::process::Command {
    let mut cmd = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_MANIFEST_")
            || ["CARGO_CRATE_NAME", "CARGO_BIN_NAME", "CARGO_PRIMARY_PACKAGE"].contains(&name)
        {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// Runs cargo with `args`, failing with the command line if it fails.
pub fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let status = cargo_command().args(args).status()?;
    anyhow::ensure!(status.success(), "`cargo {}` failed: {status}", args.join(" "));
    Ok(())
}

/// Runs cargo with `args`, showing its output only if it fails (the eBPF build's trampolined
/// compiler lines are noise when all goes well).
pub fn cargo_quiet(args: &[&str]) -> anyhow::Result<()> {
    cargo_quiet_with(args, &[])
}

/// [`cargo_quiet`] with `env` set for cargo and what it runs.
pub fn cargo_quiet_with(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> anyhow::Result<()> {
    let out = cargo_command().args(args).envs(env.iter().copied()).output()?;
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        anyhow::bail!("`cargo {}` failed: {}", args.join(" "), out.status);
    }
    Ok(())
}
