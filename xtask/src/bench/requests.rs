//! The requests phase: every timed lane in turn, once per round, with oha at a fixed 1000 req/s
//! over 16 connections and at saturation over 1 and 16; latency, request rates, and what the
//! lane's carriers (the proxies, or the floor's relays) and the backends spent.

use std::{collections::BTreeMap, time::Instant};

use gammaray_testkit::lanes::Lane;

use super::{
    Ctx,
    measure::{cpu_of, median, oha, switches_of},
    report::{Row, Target},
};

/// One lane's figures, one entry per round.
#[derive(Default)]
struct Samples {
    p50: Vec<f64>,
    p90: Vec<f64>,
    p99: Vec<f64>,
    max1: Vec<f64>,
    max16: Vec<f64>,
    /// The carriers' cores at the fixed rate.
    cpu_fixed: Vec<f64>,
    /// The carriers' ms of CPU per 1000 requests at saturation.
    cpu_saturated: Vec<f64>,
    /// The carriers' context switches per request at the fixed rate.
    switches: Vec<f64>,
    /// The backends' cores at the fixed rate, and their ms per 1000 requests at saturation.
    backend_fixed: Vec<f64>,
    backend_saturated: Vec<f64>,
    /// Cores at saturation of each carrier, then of the backends.
    cores: Vec<Vec<f64>>,
}

/// Whose CPU and context switches a lane's rows give.
fn carriers_label(lane: Lane) -> &'static str {
    if lane.is_floor() { "both relays'" } else { "both proxies'" }
}

/// The HTTP backends' CPU seconds so far: measured as the carriers' are, it is the unit a
/// proxy's cost is read against (a process that wakes, reads and writes once per request; a
/// proxy does that twice per request, once each way).
fn backend_cpu(ctx: &Ctx<'_>) -> f64 {
    cpu_of(ctx.backend_pids.iter().copied(), ctx.ticks)
}

/// Measures every timed lane; returns each lane's latency percentiles (p50, p90, p99) for the
/// chart.
pub(super) fn run(ctx: &Ctx<'_>, rows: &mut Vec<Row>) -> anyhow::Result<BTreeMap<Lane, (f64, f64, f64)>> {
    // Rounds, each of which measures every lane in turn: a slow spell of the host's (minutes
    // long on this machine) then falls on a lane and its direct baseline alike, not on the three
    // runs of one lane, and each round gives a ratio of its own.
    let mut samples: BTreeMap<Lane, Samples> = BTreeMap::new();
    for _ in 0..ctx.plan.runs {
        for path in Lane::timed() {
            let (pod, url) = ctx.bed.world.target(path);
            let carriers = ctx.carriers(path);
            let cpu_now = || cpu_of(carriers.iter().copied(), ctx.ticks);
            let s = samples.entry(path).or_default();
            let cpu0 = cpu_now();
            let b0 = backend_cpu(ctx);
            let w0 = switches_of(carriers);
            let t0 = Instant::now();
            let l = oha(ctx.oha, pod, &url, 16, Some(1000), ctx.plan.fixed)?;
            let (cpu, wall) = (cpu_now() - cpu0, t0.elapsed().as_secs_f64());
            s.backend_fixed.push((backend_cpu(ctx) - b0) / wall);
            s.switches.push((switches_of(carriers) - w0) / l.requests.max(1.0));
            s.p50.push(l.p50_ms);
            s.p90.push(l.p90_ms);
            s.p99.push(l.p99_ms);
            s.cpu_fixed.push(cpu / wall);
            let l = oha(ctx.oha, pod, &url, 1, None, ctx.plan.saturate)?;
            s.max1.push(l.rps);
            // Per carrier, so the run also says which node's proxy the lane leans on.
            let each_now = || carriers.iter().map(|&p| cpu_of([p], ctx.ticks)).collect::<Vec<f64>>();
            let each0 = each_now();
            let b0 = backend_cpu(ctx);
            let t0 = Instant::now();
            let l = oha(ctx.oha, pod, &url, 16, None, ctx.plan.saturate)?;
            let each: Vec<f64> = each_now().iter().zip(&each0).map(|(c, c0)| c - c0).collect();
            let cpu: f64 = each.iter().sum();
            let (wall, backend) = (t0.elapsed().as_secs_f64(), backend_cpu(ctx) - b0);
            s.cores.push(each.iter().map(|c| c / wall).chain([backend / wall]).collect());
            s.backend_saturated.push(backend / l.requests.max(1.0) * 1e6);
            s.max16.push(l.rps);
            s.cpu_saturated.push(cpu * 1000.0 / l.requests.max(1.0) * 1000.0);
            if l.errors > 0.0 {
                println!("bench: {}: {} errors at saturation", path.label(), l.errors);
            }
        }
    }
    for (&path, s) in &samples {
        println!(
            "bench: {:<48} p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  max {:.0} req/s (1 conn), {:.0} req/s (16)",
            path.label(),
            median(s.p50.clone()),
            median(s.p90.clone()),
            median(s.p99.clone()),
            median(s.max1.clone()),
            median(s.max16.clone())
        );
        if !path.is_direct() {
            let carriers = ctx.carriers(path).len();
            let cores = |i: usize| median(s.cores.iter().map(|e| e[i]).collect());
            let each: Vec<String> = (0..carriers).map(|i| format!("node{} {:.2}", i + 1, cores(i))).collect();
            println!(
                "bench: {:<48} cores at saturation: {}; backends {:.2}",
                "",
                each.join(", "),
                cores(carriers)
            );
        }
    }
    if ctx.profile {
        super::profile::lanes(ctx)?;
    }
    let latency: BTreeMap<Lane, (f64, f64, f64)> = samples
        .iter()
        .map(|(&path, s)| (path, (median(s.p50.clone()), median(s.p90.clone()), median(s.p99.clone()))))
        .collect();

    for path in Lane::timed().filter(|p| !p.is_direct()) {
        let (b, m) = (&samples[&path.baseline()], &samples[&path]);
        for (name, bv, mv) in [("p50", &b.p50, &m.p50), ("p90", &b.p90, &m.p90), ("p99", &b.p99, &m.p99)] {
            let figure = format!("{}: {name} latency at 1000 req/s, 16 conns", path.label());
            let row = Row::of_rounds(figure, bv, mv, "ms");
            rows.push(match (path, name) {
                (Lane::L7Cross, "p90") => {
                    row.target(Target::RatioAtMost(1.5)).target(Target::AddedAtMost(0.15))
                }
                _ => row,
            });
        }
        rows.push(Row::of_rounds(format!("{}: max req/s, 1 conn", path.label()), &b.max1, &m.max1, "req/s"));
        let figure = format!("{}: max req/s, 16 conns", path.label());
        let row = Row::of_rounds(figure, &b.max16, &m.max16, "req/s");
        rows.push(if path.is_mesh() && path.baseline() == Lane::DirectCross {
            row.target(Target::RatioAtLeast(0.5))
        } else {
            row
        });
        // What the lane's carriers (proxies or relays) spent.
        let carriers = |what: &str| format!("{}: {} {what}", path.label(), carriers_label(path));
        // The baselines of the CPU rows are the backend's on the direct path: a process that
        // wakes, reads and writes once per request. Each proxy does that twice per request.
        let figure =
            carriers("CPU at 1000 req/s (direct: the backend's, one wakeup, read and write per request)");
        let row = Row::of_rounds(figure, &b.backend_fixed, &m.cpu_fixed, "cores");
        rows.push(if path == Lane::L7Cross { row.target(Target::AtMost(0.1)) } else { row });
        let figure = carriers("context switches per request at 1000 req/s");
        rows.push(Row::new(figure, None, median(m.switches.clone()), ""));
        let figure = carriers("CPU per 1000 requests at saturation (direct: the backend's)");
        let row = Row::of_rounds(figure, &b.backend_saturated, &m.cpu_saturated, "ms");
        rows.push(if path == Lane::L7Cross { row.target(Target::AtMost(30.0)) } else { row });
    }

    Ok(latency)
}
