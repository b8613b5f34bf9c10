//! Connection setup with and without the eBPF redirect, and what one wakeup costs this machine.

use std::{
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use gammaray_testkit::Pod;

use super::{
    Ctx,
    measure::{median, wakeup_cost},
    report::{Row, Target},
    world::{MESH_NS, WEB_L4},
};
use crate::agents::Control as _;

pub(super) fn run(ctx: &Ctx<'_>, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let world = &ctx.bed.world;
    // Connection setup: an unenrolled pod straight to the backend, an enrolled one through the
    // eBPF redirect and the proxy (L4 Service).
    // Connection setup, sequentially: the median connect time as a rate (a rare SYN
    // retransmission, a whole second, would otherwise swamp the mean), and how many took over
    // 200 ms.
    let connects = |pod: &Pod, dst: SocketAddr| -> anyhow::Result<(f64, usize)> {
        pod.run(|| -> anyhow::Result<(f64, usize)> {
            let mut times = Vec::with_capacity(ctx.plan.connects);
            for _ in 0..ctx.plan.connects {
                let c0 = Instant::now();
                let s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
                times.push(c0.elapsed().as_secs_f64());
                drop(s);
            }
            let slow = times.iter().filter(|t| **t > 0.2).count();
            Ok((1.0 / median(times), slow))
        })?
    };
    let (plain, plain_slow) = connects(&world.clients["direct-2"], SocketAddr::from((world.web_a.ip, 8080)))?;
    let (enrolled, enrolled_slow) = connects(&world.clients["mesh-2"], SocketAddr::from((WEB_L4, 80)))?;
    rows.push(Row::new(
        format!(
            "connects/s from a pod, same node, 1 / median of {} sequential connects (enrolled: eBPF redirect to the proxy; over 200 ms: {plain_slow} direct, {enrolled_slow} enrolled)",
            ctx.plan.connects
        ),
        Some(plain),
        enrolled,
        "conn/s",
    ));

    policies(ctx, rows)?;

    // What one hop costs this machine before any proxy work: each process a request passes
    // through is a wakeup, and between CPUs of a virtual machine a wakeup is an interrupt
    // through the hypervisor.
    match wakeup_cost(ctx.plan.ping_pongs) {
        Ok((same, across)) => rows.push(Row::new(
            format!(
                "machine: one thread waking another, same CPU → across CPUs (socket ping-pong, {} round trips; context for the per-hop figures)",
                ctx.plan.ping_pongs
            ),
            Some(same),
            across,
            "µs",
        )),
        Err(err) => println!("bench: wakeup cost not measured: {err:#}"),
    }

    Ok(())
}

/// How many AuthorizationPolicies the policy rows load.
const POLICIES: usize = 100;
/// How many times the rounds alternate (a round without policies, then one with them).
const ALTERNATIONS: usize = 4;

/// The cost of authorization at the destination: a pod on node1 connects to the L4 Service
/// (its backend on node2, so node2 checks each tunnel) and reads one answer, with no policy and
/// with [`POLICIES`] loaded, every one of them applying to the backend (half DENY rules that do
/// not match, half ALLOW rules of which the last matches: every check reads them all). Rounds
/// alternate, so a slow spell of the host falls on both; figures are medians of the rounds'
/// own, with the range of each pair's ratio. The run's own noise is a row too: the rounds
/// without policies, slowest p90 against fastest.
fn policies(ctx: &Ctx<'_>, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let pod = &ctx.bed.world.clients["mesh-1"];
    let dst = SocketAddr::from((WEB_L4, 80));
    let per_round = (ctx.plan.connects / (2 * ALTERNATIONS)).max(25);
    let node2 = &ctx.bed.agents[1];
    let set = |loaded: bool| -> anyhow::Result<()> {
        let version = node2.status()?.config_version;
        for i in 0..POLICIES {
            let name = format!("bench-policy-{i}");
            if loaded {
                let (action, source) = match i {
                    i if i < POLICIES / 2 => {
                        ("DENY", format!("principals: [cluster.local/ns/other-{i}/sa/x]"))
                    }
                    i if i + 1 < POLICIES => {
                        ("ALLOW", format!("principals: [cluster.local/ns/other-{i}/sa/x]"))
                    }
                    _ => ("ALLOW", format!("namespaces: [{MESH_NS}]")),
                };
                ctx.bed.server.apply_yaml(&format!(
                    "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {MESH_NS}}}\n\
                     spec: {{action: {action}, rules: [{{from: [{{source: {{{source}}}}}], to: [{{operation: {{ports: ['8080', '80']}}}}]}}]}}\n"
                ));
            } else {
                ctx.bed.server.delete("security.istio.io/v1", "AuthorizationPolicy", MESH_NS, &name);
            }
        }
        let want = if loaded { POLICIES } else { 0 };
        node2.wait_until(|s| s.config_version > version)?;
        // Published in one or more steps; wait for the last.
        let deadline = Instant::now() + Duration::from_secs(10);
        while compiled_policies(node2)? != want {
            anyhow::ensure!(Instant::now() < deadline, "node2 never compiled {want} policies");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    };
    let round = || -> anyhow::Result<Vec<f64>> {
        pod.run(|| -> anyhow::Result<Vec<f64>> {
            use std::io::{Read as _, Write as _};
            let mut times = Vec::with_capacity(per_round);
            let mut buf = vec![0u8; 4096];
            for _ in 0..per_round {
                let t = Instant::now();
                let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                s.write_all(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")?;
                let mut got = 0;
                loop {
                    match s.read(&mut buf)? {
                        0 => break,
                        n => got += n,
                    }
                }
                anyhow::ensure!(got > 0, "no answer through the L4 Service");
                times.push(t.elapsed().as_secs_f64());
            }
            Ok(times)
        })?
    };
    // Per round: connects per second (1 / the median time) and the p90 in ms.
    let figures = |mut times: Vec<f64>| {
        times.sort_by(f64::total_cmp);
        let p90 = times[(times.len() * 9 / 10).min(times.len() - 1)] * 1000.0;
        (1.0 / median(times), p90)
    };
    let (mut none, mut loaded) = (Vec::new(), Vec::new());
    for _ in 0..ALTERNATIONS {
        none.push(figures(round()?));
        set(true)?;
        loaded.push(figures(round()?));
        set(false)?;
    }
    let rate = |v: &[(f64, f64)]| v.iter().map(|f| f.0).collect::<Vec<_>>();
    let p90 = |v: &[(f64, f64)]| v.iter().map(|f| f.1).collect::<Vec<_>>();
    let n = per_round * ALTERNATIONS;
    rows.push(
        Row::of_rounds(
            format!(
                "cross-node L4 connect + one answer, 1 / median of {per_round} per round, {ALTERNATIONS} rounds each ({n} in all), with {POLICIES} AuthorizationPolicies applying to the backend (direct: none; rounds alternate)"
            ),
            &rate(&none),
            &rate(&loaded),
            "conn/s",
        )
        .target(Target::RatioAtLeast(0.9)),
    );
    rows.push(
        Row::of_rounds(
            "… its p90, median of the rounds' (direct: none)".to_string(),
            &p90(&none),
            &p90(&loaded),
            "ms",
        )
        .target(Target::RatioAtMost(1.1)),
    );
    let quiet = p90(&none);
    let (fastest, slowest) = quiet.iter().fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
    rows.push(Row::new(
        "… the run's noise: p90 of the rounds without policies, slowest (value) against fastest (direct)"
            .to_string(),
        Some(fastest),
        slowest,
        "ms",
    ));
    Ok(())
}

/// How many policies node2's agent has compiled, from its configuration dump.
fn compiled_policies(agent: &crate::agents::Agent) -> anyhow::Result<usize> {
    let dump =
        gammaray_testkit::agent::block_on(gammaray_agent::control::Client::new(&agent.socket).config_dump())?;
    let dump: serde_json::Value = serde_json::from_str(&dump)?;
    Ok(dump["authorizationPolicies"]["compiled"].as_array().map_or(0, Vec::len))
}
