//! `cargo xtask bench [--quick]`: the mesh's overhead against a direct connection, measured side
//! by side in one run on the simulated cluster.
//!
//! Two nodes; two backend pods on node2 (a release-built HTTP server answering 1 KiB, and
//! iperf3); clients on both nodes, in a namespace labelled for the mesh and in one that is not.
//! Real agents (release builds) watch testkit's fake API server, enrol the labelled pods, and
//! carry cross-node traffic over HBONE with mutual TLS. The paths compared:
//!
//! - direct, same node and cross node: an unenrolled client to the backend's pod IP;
//! - L4 through the mesh: an enrolled client to a Service without an HTTP appProtocol;
//! - L7 through the mesh: an enrolled client to a Service with a weighted HTTPRoute (50/50);
//! - the floor, cross node: an unenrolled client through two plain TCP relays, one on each node
//!   where the proxies run (`testkit/src/bin/bench-relay.rs`: the proxy's runtime and its L4
//!   copy loop, nothing else). They only read and write, so they show what two proxies built
//!   this way cost on this machine before any TLS, HTTP or routing: a target below the floor
//!   cannot be met here by better proxy code, only by fewer processes, wakeups or copies.
//!
//! oha (fixed rate and saturation, HTTP/1.1 keep-alive) and iperf3 are the load generators.
//! Every figure is reported with its ratio to the direct baseline of the same run, in
//! `target/bench/report.md`, with an SVG chart of the latency percentiles. Nothing is asserted:
//! the numbers are reported.
//!
//! The run goes by phases, one module each: [`requests`], [`bulk`], [`connects`], [`scale`] and
//! [`held`] (connections held open), then [`flood`] (one pod against its node) and [`upgrade`]
//! (node1's agent upgraded under load, then killed and restarted), with [`profile`] for `--profile`'s traces; [`world`] builds
//! what they measure through and [`report`] writes the figures with their targets. The lanes are
//! `gammaray_testkit::lanes`'s, the table the instruction counts and the profile's training use
//! too.

mod bulk;
mod connects;
mod flood;
mod held;
mod measure;
mod profile;
mod report;
mod requests;
mod scale;
mod upgrade;
mod world;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use gammaray_testkit::lanes::Lane;

use crate::agents::{Build, require_privileges};
pub use flood::hold_connections;
use measure::{cpu_of, mem_mib, tool};
use world::{Binaries, FULL, Plan, QUICK, Testbed};

/// What every phase measures with.
struct Ctx<'a> {
    plan: &'a Plan,
    oha: &'a Path,
    iperf3: &'a Path,
    /// Clock ticks per second, for /proc's CPU times.
    ticks: f64,
    /// Where the report and the profiles go.
    dir: &'a Path,
    profile: bool,
    bed: &'a Testbed,
    agent_pids: Vec<u32>,
    relay_pids: Vec<u32>,
    backend_pids: Vec<u32>,
}

impl Ctx<'_> {
    /// The processes that carry a lane's requests: the relays for the floor, the agents
    /// otherwise (on the direct paths, what they spend while not involved).
    fn carriers(&self, lane: Lane) -> &[u32] {
        if lane.is_floor() { &self.relay_pids } else { &self.agent_pids }
    }
}

/// With [`Build::Now`], builds and runs release binaries: the figures to read. With
/// [`Build::AlreadyBuilt`] (`cargo xtask test`), runs the debug binaries the test build made: that
/// run only checks that the harness works, and a release build would add minutes to CI for
/// figures nobody reads there.
///
/// `pgo` (with [`Build::Now`]) builds the agent with profile-guided optimisation, as the image
/// ships it ([`crate::pgo`]); without it the agent is a plain release build.
/// The phases of a run, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Phase {
    Requests,
    Bulk,
    Connects,
    Scale,
    Held,
    Flood,
    Upgrade,
}

pub fn run(quick: bool, profile: bool, build: Build, pgo: bool, only: &[Phase]) -> anyhow::Result<()> {
    let runs = |phase: Phase| only.is_empty() || only.contains(&phase);
    require_privileges("the benchmarks")?;
    let plan = if quick { QUICK } else { FULL };
    let oha_bin = tool("oha")?;
    let iperf3 = tool("iperf3")?;
    let target_dir = crate::target_dir()?;
    let target_dir = target_dir.as_path();
    let bin_dir = match build {
        Build::Now => {
            println!("bench: building the backend and the relay in release mode");
            crate::cargo_quiet(&[
                "build",
                "--release",
                "-p",
                "gammaray-testkit",
                "--bin",
                "bench-backend",
                "--bin",
                "bench-relay",
            ])?;
            target_dir.join("release")
        }
        Build::AlreadyBuilt => {
            println!(
                "bench: running the debug binaries built for the tests (figures say nothing about speed)"
            );
            target_dir.join("debug")
        }
    };
    // Another build of the agent can stand in, for comparing two versions on the same machine.
    let (agent_bin, agent_build) = match (std::env::var_os("GAMMARAY_BENCH_AGENT"), build) {
        (Some(path), _) => {
            println!("bench: agent binary from GAMMARAY_BENCH_AGENT: {}", Path::new(&path).display());
            (PathBuf::from(path), "the binary GAMMARAY_BENCH_AGENT names")
        }
        (None, Build::AlreadyBuilt) => (bin_dir.join("gammaray-agent"), "debug build"),
        (None, Build::Now) if pgo => (
            crate::pgo::build(target_dir)?.agent,
            "release build with profile-guided optimisation, as the image ships it",
        ),
        (None, Build::Now) => {
            println!("bench: building the agent in release mode, without profile-guided optimisation");
            crate::cargo_quiet(&crate::pgo::AGENT_RELEASE_BUILD)?;
            (bin_dir.join("gammaray-agent"), "plain release build (--no-pgo)")
        }
    };
    let backend_bin = bin_dir.join("bench-backend");
    let relay_bin = bin_dir.join("bench-relay");
    for bin in [&agent_bin, &backend_bin, &relay_bin] {
        anyhow::ensure!(bin.exists(), "{} is missing: build it first", bin.display());
    }
    let bench_dir = target_dir.join("bench");
    // Phases write their logs here before the report is written: a fresh clone has no such directory.
    std::fs::create_dir_all(&bench_dir)?;
    let ticks: f64 = String::from_utf8_lossy(&Command::new("getconf").arg("CLK_TCK").output()?.stdout)
        .trim()
        .parse()
        .unwrap_or(100.0);

    let bins = Binaries {
        agent: &agent_bin,
        backend: &backend_bin,
        relay: &relay_bin,
        oha: &oha_bin,
        iperf3: &iperf3,
    };
    let bed = Testbed::start(&bins)?;
    let ctx = Ctx {
        plan: &plan,
        oha: &oha_bin,
        iperf3: &iperf3,
        ticks,
        dir: &bench_dir,
        profile,
        bed: &bed,
        agent_pids: bed.agent_pids(),
        relay_pids: bed.relay_pids(),
        backend_pids: bed.backend_pids(),
    };
    let idle_rss: Vec<f64> = bed.agents.iter().map(|a| mem_mib(a.pid(), "VmRSS")).collect();
    // What the agents cost with no traffic (watches, lease renewal, enrolment), so the per-request
    // figures can be read against it.
    let idle_cpu = {
        let (cpu0, t0) = (cpu_of(ctx.agent_pids.iter().copied(), ticks), Instant::now());
        std::thread::sleep(ctx.plan.fixed.max(Duration::from_secs(1)));
        (cpu_of(ctx.agent_pids.iter().copied(), ticks) - cpu0) / t0.elapsed().as_secs_f64()
    };

    let idle = scale::Idle { cpu: idle_cpu, rss: idle_rss };

    let mut rows = Vec::new();
    let mut latency = Default::default();
    if runs(Phase::Requests) {
        latency = requests::run(&ctx, &mut rows)?;
    }
    if runs(Phase::Bulk) {
        bulk::run(&ctx, &mut rows)?;
    }
    if runs(Phase::Connects) {
        connects::run(&ctx, &mut rows)?;
    }
    if runs(Phase::Scale) {
        scale::run(&ctx, &idle, &mut rows)?;
        let example = match build {
            Build::Now => {
                println!("bench: building the agent's scale example in release mode");
                crate::cargo_quiet(&["build", "--release", "-p", "gammaray-agent", "--example", "scale"])?;
                target_dir.join("release/examples/scale")
            }
            Build::AlreadyBuilt => target_dir.join("debug/examples/scale"),
        };
        scale::cluster(&example, &plan, &mut rows)?;
    }
    // Last, so that what the allocator keeps after they close counts in no figure above.
    if runs(Phase::Held) {
        held::run(&ctx, &mut rows)?;
    }
    if runs(Phase::Flood) {
        flood::run(&ctx, &mut rows)?;
    }
    // Last: it replaces node1's agent; the one serving at the end stops before the testbed.
    let _upgraded =
        if runs(Phase::Upgrade) { Some(upgrade::run(&ctx, &agent_bin, &mut rows)?) } else { None };

    let mut report = report::render(&rows, quick, build, &plan, agent_build);
    if !only.is_empty() {
        let names: Vec<String> = only.iter().map(|p| format!("{p:?}").to_lowercase()).collect();
        report =
            report.replacen("\n\n", &format!("\n\nPhases run: {} (`--phases`).\n\n", names.join(", ")), 1);
    }
    std::fs::create_dir_all(&bench_dir)?;
    std::fs::write(bench_dir.join("report.md"), &report)?;
    std::fs::write(bench_dir.join("latency.svg"), report::chart(&latency))?;
    println!("\n{report}");
    println!(
        "bench: wrote {} and {}",
        bench_dir.join("report.md").display(),
        bench_dir.join("latency.svg").display()
    );
    Ok(())
}
