//! One pod against its node. While a pod on node1 holds [`Plan::flood`] idle connections to a
//! Service through node1's proxy, and a mesh peer opens HBONE streams into node2 without end,
//! another pod's stream of 100 req/s through both nodes and a weight change made meanwhile are
//! measured against the same on the quiet mesh just before.
//!
//! The flood's connections are held by child processes in the flooding pod (`cargo xtask
//! hold-connections`, [`hold_connections`]): more than one process may hold under this machine's
//! descriptor limit. The HBONE streams come from an unenrolled pod on node1 presenting a
//! certificate of the mesh's CA, as a compromised workload or node could: CONNECTs to the
//! backend pod on node2, each held open once admitted, new ones sent as soon as an answer comes.
//!
//! [`Plan::flood`]: super::world::Plan::flood

use std::{
    net::{SocketAddr, TcpStream},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use gammaray_proxy::identity::{Authority, Identity, TrustBundle, client_config, node_ca};
use gammaray_testkit::{cluster::node_ip, lanes::Lane, process::Process};

use super::{
    Ctx,
    measure::{mem_mib, oha, time_to_split},
    report::{Row, Target},
    world::{WEB_L7, web_route},
};

/// The stream another pod keeps up while its node is flooded.
const RATE: u32 = 100;
/// Connections one holding process opens: under the descriptor limit of this machine (20 000).
const PER_HOLDER: usize = 15_000;
/// Concurrent TLS connections of the HBONE flood, each sending CONNECTs one after another.
const HBONE_CONNECTIONS: usize = 8;

/// What the other pod saw.
struct Seen {
    p99_ms: f64,
    failed: f64,
    requests: f64,
    /// From writing a weight change to a client seeing only the new split.
    split_ms: f64,
}

/// The other pod (mesh-1, node1) calls the L7 Service (backends on node2) at [`RATE`] for the
/// plan's fixed-rate time; a second in, the route's weights move to `weights` and a client waits
/// for `want` to answer alone.
fn other_pod(ctx: &Ctx<'_>, weights: (u32, u32), want: &str) -> anyhow::Result<Seen> {
    let (pod, url) = ctx.bed.world.target(Lane::L7Cross);
    let duration = ctx.plan.fixed.max(Duration::from_secs(3));
    std::thread::scope(|s| {
        let load = s.spawn(|| oha(ctx.oha, pod, &url, 2, Some(RATE), duration));
        std::thread::sleep(Duration::from_secs(1));
        let started = Instant::now();
        ctx.bed.server.apply_yaml(&web_route(weights.0, weights.1));
        let split = time_to_split(pod, SocketAddr::from((WEB_L7, 80)), want, 20, started);
        let load = load.join().map_err(|_| anyhow::anyhow!("the load thread panicked"))??;
        Ok(Seen {
            p99_ms: load.p99_ms,
            failed: load.errors,
            requests: load.requests,
            split_ms: split? * 1000.0,
        })
    })
}

pub(super) fn run(ctx: &Ctx<'_>, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let before: Vec<f64> = ctx.bed.agents.iter().map(|a| mem_mib(a.pid(), "VmRSS")).collect();
    let quiet = other_pod(ctx, (0, 100), "web-b")?;
    let mut flood = Flood::start(ctx)?;
    let during = other_pod(ctx, (100, 0), "web-a");
    let streams = flood.stop();
    let (during, streams) = (during?, streams?);
    let what = format!(
        "while a pod on node1 holds {} connections and a peer sends node2 {} HBONE CONNECTs ({} admitted and held, {} refused)",
        flood.held, streams.sent, streams.admitted, streams.refused
    );
    rows.push(
        Row::new(
            format!("another pod's p99 at {RATE} req/s, cross node, {what} (direct: the quiet mesh)"),
            Some(quiet.p99_ms),
            during.p99_ms,
            "ms",
        )
        .target(Target::AtMost(10.0)),
    );
    rows.push(
        Row::new(
            format!(
                "its failed requests of {:.0} during the flood (direct: the quiet mesh)",
                during.requests
            ),
            Some(quiet.failed),
            during.failed,
            "requests",
        )
        .target(Target::AtMost(0.0)),
    );
    rows.push(
        Row::new(
            "weight change → new split seen by a client, during the flood (direct: the quiet mesh)".into(),
            Some(quiet.split_ms),
            during.split_ms,
            "ms",
        )
        .target(Target::RatioAtMost(2.0)),
    );
    drop(flood);
    std::thread::sleep(super::held::MEMORY_SETTLES);
    for (agent, before) in ctx.bed.agents.iter().zip(&before) {
        rows.push(
            Row::new(
                format!("{} agent RSS once the flood has ended (direct: before it)", agent.node),
                Some(*before),
                mem_mib(agent.pid(), "VmRSS"),
                "MiB",
            )
            .target(Target::AddedAtMost(10.0)),
        );
    }
    Ok(())
}

/// The flood while it runs: the holding processes, and the HBONE flood's thread.
struct Flood {
    held: usize,
    _holders: Vec<Process>,
    stop: Arc<AtomicBool>,
    streams: Option<std::thread::JoinHandle<anyhow::Result<Streams>>>,
}

/// What the HBONE flood sent, and how it was answered.
#[derive(Default, Debug)]
struct Streams {
    sent: u64,
    admitted: u64,
    refused: u64,
}

impl Flood {
    fn start(ctx: &Ctx<'_>) -> anyhow::Result<Self> {
        let pod = &ctx.bed.world.clients["flood-1"];
        // One source address to one proxy port: the pod's ephemeral ports must outnumber the flood.
        pod.run(|| std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65535"))?
            .context("widening the flooding pod's port range")?;
        // This very binary, through /proc: still there if a build has replaced the file since.
        let exe = std::path::PathBuf::from(format!("/proc/{}/exe", std::process::id()));
        let mut holders = Vec::new();
        let mut left = ctx.plan.flood;
        while left > 0 {
            let count = left.min(PER_HOLDER);
            left -= count;
            let log = ctx.dir.join(format!("flood-holder-{}.log", holders.len()));
            let _ = std::fs::remove_file(&log);
            let args = ["hold-connections", "--to", &format!("{WEB_L7}:80"), "--count", &count.to_string()]
                .map(String::from);
            holders.push((pod.spawn(&exe, &args, &[], Some(&log))?, log));
        }
        let mut held = 0;
        for (_, log) in &holders {
            held += wait_for_held(log, Duration::from_secs(120))?;
        }
        println!("bench: flood: a pod on node1 holds {held} connections through its node's proxy");
        let stop = Arc::new(AtomicBool::new(false));
        let streams = {
            let (attacker, stop) = (ctx.bed.world.clients["direct-1"].clone(), stop.clone());
            let ca = ctx.bed.signer.root_pem()?;
            let target = SocketAddr::from((ctx.bed.world.web_a.ip, 8080));
            std::thread::spawn(move || {
                attacker.run(|| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?
                        .block_on(hbone_flood(&ca, target, &stop))
                })?
            })
        };
        Ok(Self {
            held,
            _holders: holders.into_iter().map(|(p, _)| p).collect(),
            stop,
            streams: Some(streams),
        })
    }

    /// Ends the HBONE flood (the connections stay held until the flood is dropped).
    fn stop(&mut self) -> anyhow::Result<Streams> {
        self.stop.store(true, Relaxed);
        let streams = self.streams.take().context("stopped twice")?;
        let streams = streams.join().map_err(|_| anyhow::anyhow!("the HBONE flood panicked"))??;
        anyhow::ensure!(streams.admitted > 0, "the HBONE flood got no stream through: {streams:?}");
        Ok(streams)
    }
}

impl Drop for Flood {
    /// A phase that fails half way still ends the HBONE flood (its holders stop with them).
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(streams) = self.streams.take() {
            let _ = streams.join();
        }
    }
}

/// Reads a holder's log until it says how many connections it holds.
fn wait_for_held(log: &Path, within: Duration) -> anyhow::Result<usize> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(text) = std::fs::read_to_string(log) {
            if let Some(n) = text.lines().find_map(|l| l.strip_prefix("held ")) {
                return n.trim().parse().context("holder's count");
            }
            if text.contains("Error") {
                bail!("the flood's holder failed: {text}");
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("the flood's holder said nothing in {within:?} ({})", log.display())
}

/// `cargo xtask hold-connections`: opens `count` connections to `to`, says how many it holds,
/// and holds them until it is stopped (or 15 minutes pass).
pub fn hold_connections(to: SocketAddr, count: usize) -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    let mut held = Vec::with_capacity(count);
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut failed = 0usize;
    while held.len() < count && Instant::now() < deadline && failed < count {
        match TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
            Ok(c) => held.push(c),
            Err(_) => failed += 1,
        }
    }
    println!("held {}", held.len());
    let until = Instant::now() + Duration::from_secs(15 * 60);
    while Instant::now() < until {
        std::thread::sleep(Duration::from_secs(1));
    }
    drop(held);
    Ok(())
}

/// CONNECTs to `target` on node2 from [`HBONE_CONNECTIONS`] mTLS connections, each sending its
/// next as soon as its last is answered, until `stop`; admitted streams are held open.
/// The flood plays node1 itself: a node CA of node1 from the signer's root, and the identity
/// of the attacking pod, which runs there.
async fn hbone_flood(
    (root_cert, root_key): &(String, String),
    target: SocketAddr,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<Streams> {
    let root = Authority::from_pem(root_cert, root_key)?;
    let node1 = node_ca::issue_directly(&root, "cluster.local", "node1", Duration::from_secs(3600))?;
    let client: Identity = "spiffe://cluster.local/ns/plain/sa/direct-1".parse()?;
    let server: Identity = "spiffe://cluster.local/ns/bench/sa/web-a".parse()?;
    let issued = node1.issue(&client)?;
    let config =
        Arc::new(client_config(Arc::new(TrustBundle::of(&root)), &issued, server.clone(), "node2".into())?);
    let counts = Arc::new(Counts::default());
    let mut connections = tokio::task::JoinSet::new();
    for _ in 0..HBONE_CONNECTIONS {
        let (config, server, counts, stop) = (config.clone(), server.clone(), counts.clone(), stop.clone());
        connections.spawn(async move { flood_one(config, &server, target, &counts, &stop).await });
    }
    while let Some(done) = connections.join_next().await {
        done?.context("an HBONE flood connection")?;
    }
    Ok(Streams {
        sent: counts.sent.load(Relaxed),
        admitted: counts.admitted.load(Relaxed),
        refused: counts.refused.load(Relaxed),
    })
}

#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    admitted: AtomicU64,
    refused: AtomicU64,
}

/// One connection of the HBONE flood.
async fn flood_one(
    config: Arc<rustls::ClientConfig>,
    server: &Identity,
    target: SocketAddr,
    counts: &Counts,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let name = rustls::pki_types::ServerName::try_from(server.server_name())?;
    let tcp = tokio::net::TcpStream::connect((node_ip(2), 15008)).await?;
    let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
    let (sender, conn) = h2::client::handshake(tls).await?;
    let conn = tokio::spawn(conn);
    let mut held = Vec::new();
    // Bounded in time by the phase, which stops the flood, and by an hour at most.
    let deadline = Instant::now() + Duration::from_secs(3600);
    while !stop.load(Relaxed) && Instant::now() < deadline {
        let Ok(ready) = tokio::time::timeout(Duration::from_millis(200), sender.clone().ready()).await else {
            // The server's stream limit is reached on this connection.
            continue;
        };
        let mut sender = ready?;
        let req = http::Request::builder().method(http::Method::CONNECT).uri(target.to_string()).body(())?;
        let (response, send) = sender.send_request(req, false)?;
        counts.sent.fetch_add(1, Relaxed);
        match tokio::time::timeout(Duration::from_secs(5), response).await {
            Ok(Ok(r)) if r.status() == http::StatusCode::OK => {
                counts.admitted.fetch_add(1, Relaxed);
                held.push((send, r.into_body()));
            }
            _ => {
                counts.refused.fetch_add(1, Relaxed);
            }
        }
    }
    drop(held);
    conn.abort();
    Ok(())
}
