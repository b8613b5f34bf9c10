//! What the agents cost at rest, and at scale: RSS and CPU with no traffic, RSS with many
//! Services and endpoints loaded, and the time from a weight change to the new split a client
//! sees. Then the configuration path alone at cluster scale ([`cluster`]): the agent's store,
//! translation and publisher at 1 000 to 20 000 Services with pods as a kubelet writes them, run
//! by the `scale` example of the agent crate (`agent/examples/scale.rs`), one process per size.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use gammaray_testkit::lanes::Lane;

use super::{
    Ctx,
    measure::{cpu_of, mem_mib, oha, time_to_split},
    report::{Row, Target},
    world::{WEB_L7, scale_objects, scale_slice, web_route},
};
use crate::agents::Control as _;

/// The agents at rest, measured before any load.
pub(super) struct Idle {
    /// Both agents' cores with no traffic (watches, lease renewal, enrolment).
    pub cpu: f64,
    /// Each agent's RSS, in MiB.
    pub rss: Vec<f64>,
}

pub(super) fn run(ctx: &Ctx<'_>, idle: &Idle, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    rows.push(Row::new("both agents' CPU with no traffic".into(), None, idle.cpu, "cores"));
    let peak_rss: Vec<f64> = ctx.bed.agents.iter().map(|a| mem_mib(a.pid(), "VmHWM")).collect();
    for (agent, (rss, peak)) in ctx.bed.agents.iter().zip(idle.rss.iter().zip(&peak_rss)) {
        rows.push(
            Row::new(
                format!("{} agent RSS idle (peak under load {peak:.1} MiB)", agent.node),
                None,
                *rss,
                "MiB",
            )
            .target(Target::AtMost(20.0)),
        );
    }

    // Scale: 1000 Services with 10 endpoints each, then a weight change on `web`.
    let t0 = Instant::now();
    ctx.bed.server.apply_yaml(&scale_objects(ctx.plan.services, ctx.plan.endpoints_per_service));
    for agent in &ctx.bed.agents {
        agent.wait_until(|s| s.frontends >= ctx.plan.services + 6)?;
    }
    let load_time = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    rss_with_services(
        ctx,
        rows,
        &format!(
            "with {} Services and {} endpoints (loaded in {load_time:.2} s)",
            ctx.plan.services,
            ctx.plan.services * ctx.plan.endpoints_per_service
        ),
    );
    let version = ctx.bed.agents[0].status()?.config_version;
    let started = Instant::now();
    ctx.bed.server.apply_yaml(&web_route(100, 0));
    let split = time_to_split(
        &ctx.bed.world.clients["mesh-1"],
        SocketAddr::from((WEB_L7, 80)),
        "web-a",
        20,
        started,
    )?;
    ctx.bed.agents[0].wait_until(|s| s.config_version > version)?;
    rows.push(Row::new(
        format!(
            "weight change → new split seen by a client, with {} endpoints",
            ctx.plan.services * ctx.plan.endpoints_per_service
        ),
        None,
        split * 1000.0,
        "ms",
    ));

    // The rebuild after the change must not leave the agent larger than before it.
    std::thread::sleep(Duration::from_millis(500));
    rss_with_services(ctx, rows, &format!("with {} Services, after the weight change", ctx.plan.services));

    steps(ctx, rows)?;
    churn(ctx, rows)
}

/// What a progressive delivery controller (Flagger) does to a route, 90/10 → 50/50 → 0/100
/// through the API server, while a pod on node1 calls the L7 Service on node2 at 200 req/s:
/// the requests that failed, the time from the 50/50 write to node1 routing by it, and from the
/// 0/100 write to the client seeing only the new version. The route is left as it was found.
fn steps(ctx: &Ctx<'_>, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    const RATE: u32 = 200;
    let agent = &ctx.bed.agents[0];
    let apply = |a: u32, b: u32| -> anyhow::Result<Duration> {
        let version = agent.status()?.config_version;
        let written = Instant::now();
        ctx.bed.server.apply_yaml(&web_route(a, b));
        agent.wait_until(|s| s.config_version > version)?;
        Ok(written.elapsed())
    };
    apply(90, 10)?;
    let (pod, url) = ctx.bed.world.target(Lane::L7Cross);
    let (load, to_half, to_all) = std::thread::scope(|s| -> anyhow::Result<_> {
        let load = s.spawn(|| oha(ctx.oha, pod, &url, 2, Some(RATE), Duration::from_secs(5)));
        std::thread::sleep(Duration::from_secs(1));
        let to_half = apply(50, 50)?;
        std::thread::sleep(Duration::from_secs(1));
        let written = Instant::now();
        ctx.bed.server.apply_yaml(&web_route(0, 100));
        let to_all = time_to_split(pod, SocketAddr::from((WEB_L7, 80)), "web-b", 20, written)?;
        let load = load.join().map_err(|_| anyhow::anyhow!("the load thread panicked"))??;
        Ok((load, to_half, to_all))
    })?;
    rows.push(
        Row::new(
            format!(
                "weight steps 90/10 → 50/50 → 0/100 under {RATE} req/s across nodes: failed requests of {:.0}",
                load.requests
            ),
            None,
            load.errors,
            "requests",
        )
        .target(Target::AtMost(0.0)),
    );
    rows.push(
        Row::new("… 50/50 write → in force on node1".into(), None, to_half.as_secs_f64() * 1000.0, "ms")
            .target(Target::AtMost(1000.0)),
    );
    rows.push(
        Row::new("… 0/100 write → the client sees only the new version".into(), None, to_all * 1000.0, "ms")
            .target(Target::AtMost(1000.0)),
    );
    apply(100, 0)?;
    Ok(())
}

/// Endpoint churn end to end: 100 EndpointSlice changes per second on the loaded Services, through
/// the API server and both agents' watches, while a pod on node1 calls the L7 Service on node2 at
/// 100 req/s; against the same traffic without churn just before. What the churn adds to the
/// agents' CPU, and any request that failed meanwhile.
fn churn(ctx: &Ctx<'_>, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    const RATE: u32 = 100;
    let secs = ctx.plan.churn.1;
    let duration = Duration::from_secs(secs);
    let (pod, url) = ctx.bed.world.target(Lane::L7Cross);
    let run = |churn: bool| -> anyhow::Result<(f64, super::measure::Load, u64, u64)> {
        let version = ctx.bed.agents[0].status()?.config_version;
        let cpu0 = cpu_of(ctx.agent_pids.iter().copied(), ctx.ticks);
        let t0 = Instant::now();
        let (load, changes) = std::thread::scope(|s| {
            let load = s.spawn(|| oha(ctx.oha, pod, &url, 2, Some(RATE), duration));
            let mut changes = 0u64;
            if churn {
                let started = Instant::now();
                while started.elapsed() < duration {
                    let due = started + Duration::from_secs_f64(changes as f64 / 100.0);
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                    let s = (changes as usize * 7919) % ctx.plan.services;
                    let unready = changes
                        .is_multiple_of(2)
                        .then_some(changes as usize % ctx.plan.endpoints_per_service);
                    ctx.bed.server.apply_yaml(&scale_slice(s, ctx.plan.endpoints_per_service, unready));
                    changes += 1;
                }
            }
            (load.join(), changes)
        });
        let load = load.map_err(|_| anyhow::anyhow!("the load thread panicked"))??;
        let cores = (cpu_of(ctx.agent_pids.iter().copied(), ctx.ticks) - cpu0) / t0.elapsed().as_secs_f64();
        let versions = ctx.bed.agents[0].status()?.config_version - version;
        Ok((cores, load, changes, versions))
    };
    let (quiet_cores, quiet, _, _) = run(false)?;
    let (cores, load, changes, versions) = run(true)?;
    rows.push(
        Row::new(
            format!(
                "both agents' CPU under {changes} endpoint changes in {secs} s with {} Services, a pod calling at {RATE} req/s ({versions} configurations on node1; direct: the same traffic without churn)",
                ctx.plan.services
            ),
            Some(quiet_cores),
            cores,
            "cores",
        )
        .target(Target::AddedAtMost(0.2)),
    );
    rows.push(
        Row::new(
            format!("its failed requests of {:.0} during the churn (direct: without churn)", load.requests),
            Some(quiet.errors),
            load.errors,
            "requests",
        )
        .target(Target::AtMost(0.0)),
    );
    Ok(())
}

/// Each agent's RSS `when`, held to the target for a cluster of this size.
fn rss_with_services(ctx: &Ctx<'_>, rows: &mut Vec<Row>, when: &str) {
    for agent in &ctx.bed.agents {
        let figure = format!("{} agent RSS {when}", agent.node);
        rows.push(Row::new(figure, None, mem_mib(agent.pid(), "VmRSS"), "MiB").target(Target::AtMost(40.0)));
    }
}

/// The configuration path at each of the plan's cluster sizes, in a process of its own per size
/// (the RSS figures are then that size's alone): the initial load, RSS, the time and CPU from one
/// endpoint or weight change to the new snapshot on the proxy's channel, and the CPU of a
/// sustained churn. Each size's figures are given with the previous size's as their baseline,
/// so the ratio is the growth from one size to the next.
pub(super) fn cluster(
    example: &std::path::Path,
    plan: &super::world::Plan,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let run = |services: usize, churn_secs: u64| -> anyhow::Result<serde_json::Value> {
        println!("bench: the configuration path with {services} Services (the agent's scale example)");
        let out = std::process::Command::new(example)
            .args([services.to_string(), plan.cluster_changes.to_string(), churn_secs.to_string()])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "{} {services} failed: {}",
            example.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let num = |v: &serde_json::Value, path: &[&str]| -> f64 {
        path.iter().fold(v, |v, k| &v[*k]).as_f64().unwrap_or(f64::NAN)
    };
    let mut previous: Option<serde_json::Value> = None;
    let largest = plan.cluster_sizes.iter().copied().max().unwrap_or(0);
    for &services in plan.cluster_sizes {
        let r = run(services, 0)?;
        let pods = services * 10;
        let base = |path: &[&str]| previous.as_ref().map(|p| num(p, path));
        let growth = |path: &[&str], figure: String, unit| Row::new(figure, base(path), num(&r, path), unit);
        let mut load = Row::new(
            format!("initial load of {services} Services, {pods} pods (decode, store, translate)"),
            base(&["initial_load_ms"]),
            num(&r, &["initial_load_ms"]),
            "ms",
        );
        if services == largest {
            load = load.target(Target::AtMost(10_000.0));
        }
        rows.push(load);
        for (what, key) in [("endpoint change", "endpoint_change"), ("weight change", "weight_change")] {
            let mut row = growth(
                &[key, "p50_ms"],
                format!("{what} → snapshot on the proxy's channel, {services} Services (p50)"),
                "ms",
            )
            .target(Target::AtMost(5.0));
            // Flat: at most twice the previous size's.
            if previous.is_some() {
                row = row.target(Target::RatioAtMost(2.0));
            }
            rows.push(row);
            rows.push(growth(&[key, "p99_ms"], format!("{what}, {services} Services (p99)"), "ms"));
            rows.push(growth(
                &[key, "cpu_p50_ms"],
                format!("{what}: the agent's CPU, {services} Services (p50)"),
                "ms",
            ));
        }
        let mut rss = growth(
            &["rss_after_mib"],
            format!("configuration RSS with {services} Services and {pods} realistic pods"),
            "MiB",
        );
        if services == largest {
            rss = rss.target(Target::AtMost(150.0));
        }
        rows.push(rss);
        previous = Some(r);
    }
    let (services, secs) = plan.churn;
    let r = run(services, secs)?;
    let churn = &r["churn"];
    rows.push(
        Row::new(
            format!(
                "CPU under {} endpoint changes/s for {secs} s at {services} Services ({} snapshots for {} changes)",
                100,
                num(churn, &["snapshots"]),
                num(churn, &["changes"])
            ),
            None,
            num(churn, &["cores"]),
            "cores",
        )
        .target(Target::AtMost(0.1)),
    );
    Ok(())
}
