//! `--profile`: perf traces and recordings of the carriers (the agents, or the floor's relays),
//! on runs of their own after the measured ones, since perf slows what it watches.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::Context as _;
use gammaray_testkit::{Pod, lanes::Lane};

use super::{
    Ctx,
    measure::{iperf, iperf_at, oha},
};

/// perf attached to the agents while a load runs, writing to `out`; stopped with SIGINT, as
/// perf expects, so that it finishes its output.
pub(super) struct PerfRun {
    child: std::process::Child,
    out: PathBuf,
}

impl PerfRun {
    pub(super) fn start(out: PathBuf, args: &[&str], pids: &[u32]) -> anyhow::Result<Self> {
        if let Some(dir) = out.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
        let child = Command::new("perf")
            .args(args)
            .arg("-o")
            .arg(&out)
            .args(["-p", &pids.join(",")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("perf (Debian's linux-perf) is needed for --profile")?;
        std::thread::sleep(Duration::from_millis(300));
        Ok(Self { child, out })
    }

    pub(super) fn stop(mut self) -> anyhow::Result<PathBuf> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        self.child.wait()?;
        Ok(self.out)
    }
}

/// `perf trace -s` on the agents: system calls by kind, for the note of what a request costs.
pub(super) struct SyscallTrace(PerfRun);

impl SyscallTrace {
    pub(super) fn start(dir: &Path, name: &str, pids: &[u32]) -> anyhow::Result<Self> {
        let out = dir.join(format!("syscalls-{name}.txt"));
        Ok(Self(PerfRun::start(out, &["trace", "-s", "--no-syscalls"], pids)?))
    }

    /// Stops tracing; the summary gets a first line with the number of requests it covers.
    pub(super) fn finish(self, requests: f64) -> anyhow::Result<PathBuf> {
        self.finish_with(&format!("requests: {requests}"))
    }

    /// Stops tracing; the summary gets `first` as its first line (what the trace covered).
    pub(super) fn finish_with(self, first: &str) -> anyhow::Result<PathBuf> {
        let out = self.0.stop()?;
        let summary = std::fs::read_to_string(&out).unwrap_or_default();
        std::fs::write(&out, format!("{first}\n{summary}"))?;
        Ok(out)
    }
}

/// `perf record` on the agents while a load runs, reported as text next to the report.
pub(super) struct Profile(PerfRun);

impl Profile {
    pub(super) fn start(dir: &Path, name: &str, pids: &[u32]) -> anyhow::Result<Self> {
        let data = dir.join(format!("perf-{name}.data"));
        Ok(Self(PerfRun::start(data, &["record", "-F", "999", "-g", "-q"], pids)?))
    }

    /// Stops recording and writes the flat profile as text; returns its path.
    pub(super) fn finish(self) -> anyhow::Result<PathBuf> {
        let data = self.0.stop()?;
        let text = data.with_extension("txt");
        let out = Command::new("perf")
            .args(["report", "--stdio", "--no-children", "--percent-limit", "0.7", "-g", "none", "-i"])
            .arg(&data)
            .output()?;
        std::fs::write(&text, &out.stdout)?;
        Ok(text)
    }
}

/// Each lane but the direct ones, traced for system calls and recorded at the fixed rate and at
/// saturation.
pub(super) fn lanes(ctx: &Ctx<'_>) -> anyhow::Result<()> {
    for path in Lane::timed().filter(|p| !p.is_direct()) {
        // On runs of their own: perf slows the processes, and the figures above must not
        // carry it. At the fixed rate every request is a wakeup of an idle process, at
        // saturation wakeups are shared: the two profiles differ.
        let (pod, url) = ctx.bed.world.target(path);
        let carriers = ctx.carriers(path);
        let name = format!("{path:?}").to_lowercase();
        let trace = SyscallTrace::start(ctx.dir, &name, carriers)?;
        let l = oha(ctx.oha, pod, &url, 16, Some(1000), ctx.plan.fixed)?;
        let out = trace.finish(l.requests)?;
        println!("bench: system calls of {} at 1000 req/s: {}", path.label(), out.display());
        let trace = SyscallTrace::start(ctx.dir, &format!("{name}-saturation"), carriers)?;
        let l = oha(ctx.oha, pod, &url, 16, None, ctx.plan.saturate)?;
        let out = trace.finish(l.requests)?;
        println!("bench: system calls of {} at saturation: {}", path.label(), out.display());
        let perf = Profile::start(ctx.dir, &format!("{name}-fixed"), carriers)?;
        oha(ctx.oha, pod, &url, 16, Some(1000), ctx.plan.fixed)?;
        println!("bench: profile of {} at 1000 req/s: {}", path.label(), perf.finish()?.display());
        let perf = Profile::start(ctx.dir, &name, carriers)?;
        oha(ctx.oha, pod, &url, 16, None, ctx.plan.saturate)?;
        println!("bench: profile of {} at saturation: {}", path.label(), perf.finish()?.display());
    }
    Ok(())
}

/// One bulk transfer from `client` to `dst` across nodes, traced and recorded.
pub(super) fn bulk(ctx: &Ctx<'_>, client: &Pod, dst: SocketAddr) -> anyhow::Result<()> {
    // Transfers of their own, as for the lanes above: the system calls that carrying a
    // stream's bytes takes (their count per GB says how large each read and write is), then
    // where the CPU goes.
    let trace = SyscallTrace::start(ctx.dir, "bulk-cross", &ctx.agent_pids)?;
    let (_, bytes) = iperf_at(ctx.iperf3, client, dst, ctx.plan.bulk_secs, None)?;
    let out = trace.finish_with(&format!("bytes: {bytes}"))?;
    println!("bench: system calls of bulk TCP cross node: {}", out.display());
    let perf = Profile::start(ctx.dir, "bulk-cross", &ctx.agent_pids)?;
    iperf(ctx.iperf3, client, dst, ctx.plan.bulk_secs)?;
    println!("bench: profile of bulk TCP cross node: {}", perf.finish()?.display());
    Ok(())
}
