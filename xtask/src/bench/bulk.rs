//! The bulk phase: one TCP stream through L4, same node and cross node (HBONE with mTLS) and
//! through the floor's relays, as fast as it goes and at a fixed rate, with what each GB costs
//! its carriers in CPU and context switches.

use std::net::SocketAddr;

use gammaray_testkit::Pod;

use super::{
    Ctx,
    measure::{cpu_of, iperf, iperf_at, median, switches_of},
    report::{Row, Target},
    world::{BULK, BULK_FIXED_GBITS, BULK_PORT, RELAY_BULK_PORT},
};

pub(super) fn run(ctx: &Ctx<'_>, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let world = &ctx.bed.world;
    // Bulk TCP, one stream, through L4 (cross node: HBONE with mTLS), and through the floor.
    let pod_bulk = SocketAddr::from((world.web_a.ip, BULK_PORT));
    let mesh_bulk = SocketAddr::from((BULK, BULK_PORT));
    let floor_bulk = SocketAddr::from((world.relay, RELAY_BULK_PORT));
    // What carrying a byte costs (ms of the carriers' CPU per GB) with the rate it went at.
    // Paced at a rate both paths reach: saturation throughput says how fast, not at what cost,
    // as the proxies share the two cores with iperf3's own ends. On this host the figure moves
    // between runs by as much as throughput does (up to a quarter), so it is read against the
    // floor's of the same run. At full speed (`gbits` None) the rate is what the four processes
    // on two cores reach, and the cost says how much of that the carriers took (the larger reads
    // and writes of a saturated stream cost less per byte than a paced one's).
    // With the cost, the carriers' context switches per GB: how often they sleep and are woken,
    // which the kernel charges on top of the copies.
    let carried = |pids: &[u32], pod: &Pod, dst: SocketAddr, gbits: Option<f64>| {
        let (cpu0, switches0) = (cpu_of(pids.iter().copied(), ctx.ticks), switches_of(pids));
        let (rate, bytes) = iperf_at(ctx.iperf3, pod, dst, ctx.plan.bulk_secs, gbits)?;
        let gb = bytes / 1e9;
        let cpu = (cpu_of(pids.iter().copied(), ctx.ticks) - cpu0) * 1000.0 / gb;
        anyhow::Ok((rate, cpu, (switches_of(pids) - switches0) / gb))
    };
    let paced = |pids: &[u32], pod: &Pod, dst: SocketAddr| -> anyhow::Result<f64> {
        Ok(carried(pids, pod, dst, Some(BULK_FIXED_GBITS))?.1)
    };
    // Medians of the runs, as for the requests, with the paths taking turns within each run so
    // that a slow spell of the host's does not fall on one path only.
    let mut bulk: [Vec<f64>; 11] = Default::default();
    for _ in 0..ctx.plan.runs {
        let (mesh, mesh_gb, mesh_sw) = carried(&ctx.agent_pids, &world.clients["mesh-1"], mesh_bulk, None)?;
        let (floor, floor_gb, floor_sw) =
            carried(&ctx.relay_pids, &world.clients["direct-1"], floor_bulk, None)?;
        let figures = [
            iperf(ctx.iperf3, &world.clients["direct-1"], pod_bulk, ctx.plan.bulk_secs)?,
            mesh,
            floor,
            iperf(ctx.iperf3, &world.clients["direct-2"], pod_bulk, ctx.plan.bulk_secs)?,
            iperf(ctx.iperf3, &world.clients["mesh-2"], mesh_bulk, ctx.plan.bulk_secs)?,
            paced(&ctx.agent_pids, &world.clients["mesh-1"], mesh_bulk)?,
            paced(&ctx.relay_pids, &world.clients["direct-1"], floor_bulk)?,
            mesh_gb,
            floor_gb,
            mesh_sw,
            floor_sw,
        ];
        for (all, figure) in bulk.iter_mut().zip(figures) {
            all.push(figure);
        }
    }
    let [
        direct_cross,
        mesh_cross,
        floor_cross,
        direct_same,
        mesh_same,
        mesh_per_gb,
        floor_per_gb,
        mesh_per_gb_saturated,
        floor_per_gb_saturated,
        mesh_switches_per_gb,
        floor_switches_per_gb,
    ] = bulk;
    let m = |v: &Vec<f64>| median(v.clone());
    if ctx.profile {
        super::profile::bulk(ctx, &world.clients["mesh-1"], mesh_bulk)?;
    }
    println!(
        "bench: bulk TCP {:.2} → {:.2} Gbit/s cross node (floor {:.2}), {:.2} → {:.2} same node",
        m(&direct_cross),
        m(&mesh_cross),
        m(&floor_cross),
        m(&direct_same),
        m(&mesh_same)
    );
    rows.push(
        Row::of_rounds("bulk TCP, 1 stream, cross node (mTLS)".into(), &direct_cross, &mesh_cross, "Gbit/s")
            .target(Target::RatioAtLeast(0.7)),
    );
    for (figure, baseline, value) in [
        ("bulk TCP, 1 stream, cross node, floor: two plain TCP relays (no TLS)", &direct_cross, &floor_cross),
        ("bulk TCP, 1 stream, same node", &direct_same, &mesh_same),
    ] {
        rows.push(Row::of_rounds(figure.into(), baseline, value, "Gbit/s"));
    }

    println!(
        "bench: bulk TCP cross node at up to {BULK_FIXED_GBITS} Gbit/s: {:.0} ms of both proxies' CPU per GB (floor {:.0})",
        m(&mesh_per_gb),
        m(&floor_per_gb)
    );
    for (what, mesh, floor, unit) in [
        (
            format!("CPU per GB carried, at up to {BULK_FIXED_GBITS} Gbit/s"),
            &mesh_per_gb,
            &floor_per_gb,
            "ms",
        ),
        ("CPU per GB carried, at full speed".into(), &mesh_per_gb_saturated, &floor_per_gb_saturated, "ms"),
        (
            "context switches per GB carried, at full speed".into(),
            &mesh_switches_per_gb,
            &floor_switches_per_gb,
            "",
        ),
    ] {
        for (carriers, values) in [
            ("bulk TCP, 1 stream, cross node (mTLS): both proxies'", mesh),
            ("bulk TCP, 1 stream, cross node, floor: both relays'", floor),
        ] {
            rows.push(Row::new(format!("{carriers} {what}"), None, m(values), unit));
        }
    }

    Ok(())
}
