//! Upgrades and crashes of node1's agent while a pod on node1 calls the L7 Service on node2: a
//! second agent started beside the first, which then drains (the DaemonSet's surge), under
//! 200 req/s on 16 kept-alive connections; then SIGKILL of the agent serving and a restart, with
//! the time until the pod is served again. Runs last: it replaces node1's agent.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use gammaray_testkit::{http::HttpClient, lanes::Lane};

use super::{
    Ctx,
    measure::oha,
    report::{Row, Target},
    world::WEB_L7,
};
use crate::agents::{Agent, AgentArgs, Control as _};

/// Runs the phase; returns the agent now serving node1 (to be stopped with the testbed).
pub(super) fn run(ctx: &Ctx<'_>, agent_bin: &std::path::Path, rows: &mut Vec<Row>) -> anyhow::Result<Agent> {
    const RATE: u32 = 200;
    let bed = ctx.bed;
    let node1 = bed.cluster().node(1);
    let args = |instance: &str| AgentArgs { instance: Some(instance.to_owned()), ..bed.args.clone() };
    let ready = |agent: &Agent| agent.wait_until(|s| s.frontends >= 6 && s.enrolled.len() >= 2);
    let (pod, url) = bed.world.target(Lane::L7Cross);

    // The hand-over, under load.
    let (load, start_to_ready, drain) = std::thread::scope(|s| -> anyhow::Result<_> {
        let load = s.spawn(|| oha(ctx.oha, pod, &url, 16, Some(RATE), Duration::from_secs(6)));
        std::thread::sleep(Duration::from_millis(1500));
        let started = Instant::now();
        let new = Agent::start(agent_bin, bed.cluster(), node1, &args("upgraded"))?;
        ready(&new)?;
        let start_to_ready = started.elapsed();
        std::thread::sleep(Duration::from_millis(500));
        let old = &bed.agents[0];
        let signalled = Instant::now();
        old.terminate();
        let deadline = Instant::now() + Duration::from_secs(40);
        while std::path::Path::new(&format!("/proc/{}", old.pid())).exists()
            && std::fs::read_to_string(format!("/proc/{}/stat", old.pid()))
                .is_ok_and(|s| !s.split_whitespace().nth(2).is_some_and(|state| state == "Z"))
        {
            anyhow::ensure!(Instant::now() < deadline, "the old agent did not exit");
            std::thread::sleep(Duration::from_millis(5));
        }
        let drain = signalled.elapsed();
        let load = load.join().map_err(|_| anyhow::anyhow!("the load thread panicked"))??;
        Ok((load, (new, start_to_ready), drain))
    })?;
    let (new, start_to_ready) = start_to_ready;
    rows.push(
        Row::new(
            format!(
                "upgrade (a second agent on node1, then SIGTERM to the first) under {RATE} req/s on 16 kept-alive connections across nodes: failed requests of {:.0}",
                load.requests
            ),
            None,
            load.errors,
            "requests",
        )
        .target(Target::AtMost(0.0)),
    );
    rows.push(Row::new(
        "… new agent started → ready (pins adopted, routes loaded)".into(),
        None,
        start_to_ready.as_secs_f64() * 1000.0,
        "ms",
    ));
    rows.push(Row::new(
        "… hand-over: SIGTERM → the old agent drained and exited".into(),
        None,
        drain.as_secs_f64() * 1000.0,
        "ms",
    ));

    // SIGKILL, then a restart: until the restarted agent serves, node1's pods are refused at once
    // (failure mode closed, with mTLS).
    let mut killed_agent = new;
    let refused_before = killed_agent.status()?.kernel.refused_no_proxy;
    let killed = Instant::now();
    killed_agent.kill();
    let restarted = Agent::start(agent_bin, bed.cluster(), node1, &args("restarted"))?;
    let service = SocketAddr::from((WEB_L7, 80));
    let mut tries = 0u32;
    let gap = pod.run(|| -> anyhow::Result<Duration> {
        while killed.elapsed() < Duration::from_secs(30) {
            tries += 1;
            let served = HttpClient::connect(service, "web", Duration::from_secs(2))
                .and_then(|mut c| c.get("/", &[]))
                .is_ok_and(|r| r.status == 200);
            if served {
                return Ok(killed.elapsed());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        anyhow::bail!("node1's pod was not served within 30 s of the SIGKILL")
    })??;
    let refused = restarted.status()?.kernel.refused_no_proxy.saturating_sub(refused_before);
    rows.push(Row::new(
        format!(
            "restart gap: SIGKILL of node1's agent → its pod served again by a restarted one ({tries} tries, {refused} refused by the kernel meanwhile)"
        ),
        None,
        gap.as_secs_f64() * 1000.0,
        "ms",
    ));
    Ok(restarted)
}
