//! What the agents cost at rest, and at scale: RSS and CPU with no traffic, RSS with many
//! Services and endpoints loaded, and the time from a weight change to the new split a client
//! sees.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use super::{
    Ctx,
    measure::{mem_mib, time_to_split},
    report::{Row, Target},
    world::{WEB_L7, scale_objects, web_route},
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
    Ok(())
}

/// Each agent's RSS `when`, held to the target for a cluster of this size.
fn rss_with_services(ctx: &Ctx<'_>, rows: &mut Vec<Row>, when: &str) {
    for agent in &ctx.bed.agents {
        let figure = format!("{} agent RSS {when}", agent.node);
        rows.push(Row::new(figure, None, mem_mib(agent.pid(), "VmRSS"), "MiB").target(Target::AtMost(40.0)));
    }
}
