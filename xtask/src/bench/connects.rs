//! Connection setup with and without the eBPF redirect, and what one wakeup costs this machine.

use std::{
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use gammaray_testkit::Pod;

use super::{
    Ctx,
    measure::{median, wakeup_cost},
    report::Row,
    world::WEB_L4,
};

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
