//! Connections held open: what each costs the agents in memory while it is idle, through the
//! cross-node L4 and L7 paths.

use std::{
    io::BufReader,
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::bail;
use gammaray_testkit::lanes::Lane;

use super::{
    Ctx,
    measure::{mem_mib, which_backend},
    report::{Row, Target},
    world::{HELD_CONNECTIONS, WEB_L4, WEB_L7},
};

pub(super) fn run(ctx: &Ctx<'_>, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    // Before the connections: the configuration of the scale phase loaded, no traffic.
    let before_all: Vec<f64> = ctx.bed.agents.iter().map(|a| mem_mib(a.pid(), "VmRSS")).collect();
    // Connections held open: what each costs the agents in memory while it is idle, after one
    // request and its answer (so each direction has been read and written once). Last, so that
    // what the allocator keeps after they close does not count in the figures above.
    for (lane, vip) in [(Lane::L4Cross, WEB_L4), (Lane::L7Cross, WEB_L7)] {
        let dst = SocketAddr::from((vip, 80));
        let before: Vec<f64> = ctx.bed.agents.iter().map(|a| mem_mib(a.pid(), "VmRSS")).collect();
        let held =
            ctx.bed.world.clients["mesh-1"].run(|| -> anyhow::Result<Vec<BufReader<TcpStream>>> {
                let mut held = Vec::with_capacity(HELD_CONNECTIONS);
                let deadline = Instant::now() + Duration::from_secs(60);
                for _ in 0..HELD_CONNECTIONS {
                    if Instant::now() > deadline {
                        bail!("{}: {} connections opened in 60 s", lane.label(), held.len());
                    }
                    let mut conn = BufReader::new(TcpStream::connect_timeout(&dst, Duration::from_secs(5))?);
                    conn.get_ref().set_read_timeout(Some(Duration::from_secs(5)))?;
                    which_backend(&mut conn)?;
                    held.push(conn);
                }
                Ok(held)
            })??;
        std::thread::sleep(Duration::from_millis(500));
        for (agent, before) in ctx.bed.agents.iter().zip(&before) {
            let per_connection = (mem_mib(agent.pid(), "VmRSS") - before) * 1024.0 / held.len() as f64;
            rows.push(Row::new(
                format!(
                    "{} agent RSS per open connection, {}: {} held idle after one request each",
                    agent.node,
                    lane.label(),
                    held.len()
                ),
                None,
                per_connection,
                "KiB",
            ));
        }
        drop(held);
        std::thread::sleep(Duration::from_millis(500));
    }
    // What the connections took must come back: the agents hand freed heap back a few seconds
    // after a burst ends.
    std::thread::sleep(MEMORY_SETTLES);
    for (agent, before) in ctx.bed.agents.iter().zip(&before_all) {
        rows.push(
            Row::new(
                format!(
                    "{} agent RSS once the held connections have closed (direct: before them, the same configuration, no traffic)",
                    agent.node
                ),
                Some(*before),
                mem_mib(agent.pid(), "VmRSS"),
                "MiB",
            )
            .target(Target::AddedAtMost(10.0)),
        );
    }
    Ok(())
}

/// Longer than the agents' look at their memory (every 5 s), so a trim has happened.
pub(super) const MEMORY_SETTLES: Duration = Duration::from_secs(6);
