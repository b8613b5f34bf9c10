//! `cargo xtask bench [--quick]`: the mesh's overhead against a direct connection, measured side
//! by side in one run on the simulated cluster.
//!
//! Two nodes; two backend pods on node2 (a release-built HTTP server answering 1 KiB, and
//! iperf3); clients on both nodes, in a namespace labelled for the mesh and in one that is not.
//! Real agents (release builds) watch testkit's fake API server, enrol the labelled pods, and
//! carry cross-node traffic over HBONE with mutual TLS. The paths compared:
//!
//! - direct, same node and cross node: an unenrolled client to the backend's pod IP;
//! - L4 through the mesh: an enrolled client to a Service without an HTTP appProtocol;
//! - L7 through the mesh: an enrolled client to a Service with a weighted HTTPRoute (50/50);
//! - the floor, cross node: an unenrolled client through two plain TCP relays, one on each node
//!   where the proxies run (`testkit/src/bin/bench-relay.rs`: the proxy's runtime and its L4
//!   copy loop, nothing else). They only read and write, so they show what two proxies built
//!   this way cost on this machine before any TLS, HTTP or routing: a target below the floor
//!   cannot be met here by better proxy code, only by fewer processes, wakeups or copies.
//!
//! oha (fixed rate and saturation, HTTP/1.1 keep-alive) and iperf3 are the load generators.
//! Every figure is reported with its ratio to the direct baseline of the same run, in
//! `target/bench/report.md`, with an SVG chart of the latency percentiles. Nothing is asserted:
//! the numbers are reported.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use gammaray_testkit::{Cluster, Pod, apiserver::ApiServer, objects};
use serde_json::Value;

use crate::agents::{Agent, AgentArgs, Build, Control as _, generate_ca, require_privileges};

const MESH_NS: &str = "bench";
const PLAIN_NS: &str = "plain";
const WEB_L4: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 1);
const WEB_L7: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 2);
const WEB_A: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 3);
const WEB_B: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 4);
const BULK: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 5);
const GRPC: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 6);
/// The unary gRPC method the gRPC lanes call (the backend answers any).
const GRPC_METHOD: &str = "/bench.Echo/Call";
const BULK_PORT: u16 = 5201;
/// Connections a client holds open through the mesh to weigh what an idle one costs.
const HELD_CONNECTIONS: usize = 1000;
/// The floor's relays listen on these ports on both nodes: HTTP to the backend, and iperf3.
const RELAY_PORT: u16 = 16080;
const RELAY_BULK_PORT: u16 = 16201;
/// The rate of the fixed-rate bulk transfers, which measure CPU per byte: below what the mesh
/// reaches at saturation on this project's machines, so both the mesh and the floor carry it in
/// full.
const BULK_FIXED_GBITS: f64 = 2.0;
const API_SERVER: &str = "10.200.0.1:6443";

/// Durations and repetitions of one mode.
struct Plan {
    fixed: Duration,
    saturate: Duration,
    bulk_secs: u32,
    runs: usize,
    connects: usize,
    services: usize,
    endpoints_per_service: usize,
    /// Round trips of the wakeup-cost measurement.
    ping_pongs: usize,
}

const FULL: Plan = Plan {
    fixed: Duration::from_secs(10),
    saturate: Duration::from_secs(5),
    bulk_secs: 5,
    runs: 3,
    connects: 2000,
    services: 1000,
    endpoints_per_service: 10,
    ping_pongs: 20_000,
};

const QUICK: Plan = Plan {
    fixed: Duration::from_secs(1),
    saturate: Duration::from_secs(1),
    bulk_secs: 1,
    runs: 1,
    connects: 300,
    services: 1000,
    endpoints_per_service: 10,
    ping_pongs: 5_000,
};

/// Where a load generator runs and what it targets.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Lane {
    DirectSame,
    L4Same,
    L7Same,
    DirectCross,
    L4Cross,
    L7Cross,
    FloorCross,
    DirectGrpcCross,
    GrpcCross,
}

impl Lane {
    const ALL: [Lane; 9] = [
        Lane::DirectSame,
        Lane::L4Same,
        Lane::L7Same,
        Lane::DirectCross,
        Lane::L4Cross,
        Lane::L7Cross,
        Lane::FloorCross,
        Lane::DirectGrpcCross,
        Lane::GrpcCross,
    ];

    fn label(self) -> &'static str {
        match self {
            Lane::DirectSame => "direct, same node",
            Lane::L4Same => "mesh L4, same node",
            Lane::L7Same => "mesh L7 (HTTPRoute 50/50), same node",
            Lane::DirectCross => "direct, cross node",
            Lane::L4Cross => "mesh L4, cross node (mTLS)",
            Lane::L7Cross => "mesh L7 (HTTPRoute 50/50), cross node (mTLS)",
            Lane::FloorCross => "floor: two plain TCP relays, cross node (no TLS, no HTTP)",
            Lane::DirectGrpcCross => "direct gRPC (h2c), cross node",
            Lane::GrpcCross => "mesh gRPC (GRPCRoute 50/50), cross node (mTLS)",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Lane::DirectSame => "direct same",
            Lane::L4Same => "L4 same",
            Lane::L7Same => "L7 same",
            Lane::DirectCross => "direct cross",
            Lane::L4Cross => "L4 cross mTLS",
            Lane::L7Cross => "L7 cross mTLS",
            Lane::FloorCross => "floor cross",
            Lane::DirectGrpcCross => "direct gRPC",
            Lane::GrpcCross => "gRPC cross mTLS",
        }
    }

    /// The direct path this one is compared with.
    fn baseline(self) -> Lane {
        match self {
            Lane::DirectSame | Lane::L4Same | Lane::L7Same => Lane::DirectSame,
            Lane::DirectGrpcCross | Lane::GrpcCross => Lane::DirectGrpcCross,
            _ => Lane::DirectCross,
        }
    }

    /// Unary gRPC calls over HTTP/2 rather than HTTP/1.1 requests.
    fn is_grpc(self) -> bool {
        self.baseline() == Lane::DirectGrpcCross
    }

    /// Through the agents' proxies.
    fn is_mesh(self) -> bool {
        !self.is_direct() && !self.is_floor()
    }

    fn is_direct(self) -> bool {
        self == self.baseline()
    }

    /// Through the floor's relays rather than the agents.
    fn is_floor(self) -> bool {
        self == Lane::FloorCross
    }

    /// Whose CPU and context switches the lane's rows give.
    fn carriers_label(self) -> &'static str {
        if self.is_floor() { "both relays'" } else { "both proxies'" }
    }
}

struct World {
    clients: BTreeMap<&'static str, Arc<Pod>>,
    web_a: Arc<Pod>,
    /// Where the floor's first relay listens: node1.
    relay: Ipv4Addr,
    /// The request body of the gRPC lanes: one length-prefixed message.
    grpc_body: PathBuf,
}

impl World {
    /// The client pod of a path, and what oha is told after its own options: the URL, and for
    /// gRPC the unary call (HTTP/2 prior knowledge, a POST of one message with gRPC's headers).
    fn target(&self, path: Lane) -> (&Pod, Vec<String>) {
        let c = |n: &str| self.clients[n].as_ref();
        let (pod, url) = match path {
            Lane::DirectSame => (c("direct-2"), format!("http://{}:8080/", self.web_a.ip)),
            Lane::DirectCross => (c("direct-1"), format!("http://{}:8080/", self.web_a.ip)),
            Lane::L4Same => (c("mesh-2"), format!("http://{WEB_L4}/")),
            Lane::L4Cross => (c("mesh-1"), format!("http://{WEB_L4}/")),
            Lane::L7Same => (c("mesh-2"), format!("http://{WEB_L7}/")),
            Lane::L7Cross => (c("mesh-1"), format!("http://{WEB_L7}/")),
            Lane::FloorCross => (c("direct-1"), format!("http://{}:{RELAY_PORT}/", self.relay)),
            Lane::DirectGrpcCross => (c("direct-1"), format!("http://{}:8080{GRPC_METHOD}", self.web_a.ip)),
            Lane::GrpcCross => (c("mesh-1"), format!("http://{GRPC}{GRPC_METHOD}")),
        };
        let mut args = Vec::new();
        if path.is_grpc() {
            args.extend(
                ["--http2", "-m", "POST", "-H", "content-type: application/grpc", "-H", "te: trailers"]
                    .map(String::from),
            );
            args.extend(["-D".to_owned(), self.grpc_body.display().to_string()]);
        }
        args.push(url);
        (pod, args)
    }
}

/// One oha run's figures.
#[derive(Debug, Clone, Copy, Default)]
struct Load {
    rps: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    requests: f64,
    errors: f64,
}

/// CPU seconds (user + system) of these processes so far.
fn cpu_of(pids: impl IntoIterator<Item = u32>, ticks: f64) -> f64 {
    pids.into_iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            let rest = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / ticks)
        })
        .sum()
}

/// Context switches (voluntary and not) of every thread of these processes so far: the wakeups
/// a request costs besides its own work.
fn switches_of(pids: &[u32]) -> f64 {
    let mut switches = 0.0;
    for pid in pids {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten();
        for task in tasks {
            let status = task.path().join("status");
            switches += ["voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"]
                .iter()
                .filter_map(|field| status_field(&status, field))
                .sum::<f64>();
        }
    }
    switches
}

/// The number in a field of a /proc status file (`Name:   value [unit]`).
fn status_field(path: &Path, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(path).ok()?;
    let value = status.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
    value.split_whitespace().next()?.parse().ok()
}

/// A field of /proc/PID/status in MiB (VmRSS, VmHWM).
fn mem_mib(pid: u32, field: &str) -> f64 {
    status_field(Path::new(&format!("/proc/{pid}/status")), field).map_or(0.0, |kb| kb / 1024.0)
}

fn tool(name: &str) -> anyhow::Result<PathBuf> {
    let out = Command::new("sh").arg("-c").arg(format!("command -v {name}")).output()?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if path.is_empty() {
        bail!("{name} is not installed: run `bash scripts/setup.sh`");
    }
    Ok(PathBuf::from(path))
}

/// Runs `program args` in `pod`'s network namespace and returns its stdout.
fn in_pod(pod: &Pod, program: &Path, args: &[String]) -> anyhow::Result<String> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", pod.netns_path().display()))
        .arg("--")
        .arg(program)
        .args(args)
        .output()
        .with_context(|| format!("running {}", program.display()))?;
    if !out.status.success() {
        bail!("{} {} failed: {}", program.display(), args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn oha(
    oha: &Path,
    pod: &Pod,
    target: &[String],
    conns: u32,
    rate: Option<u32>,
    duration: Duration,
) -> anyhow::Result<Load> {
    let mut args: Vec<String> = vec![
        "--no-tui".into(),
        "--output-format".into(),
        "json".into(),
        "-c".into(),
        conns.to_string(),
        "-z".into(),
        format!("{}ms", duration.as_millis()),
    ];
    if let Some(q) = rate {
        args.extend(["-q".into(), q.to_string(), "--latency-correction".into()]);
    }
    args.extend(target.iter().cloned());
    let out = in_pod(pod, oha, &args)?;
    let v: Value = serde_json::from_str(&out).with_context(|| format!("oha output: {out}"))?;
    let ms = |k: &str| v["latencyPercentiles"][k].as_f64().unwrap_or(f64::NAN) * 1000.0;
    let total: f64 =
        v["statusCodeDistribution"].as_object().map_or(0.0, |m| m.values().filter_map(Value::as_f64).sum());
    let ok = v["statusCodeDistribution"]["200"].as_f64().unwrap_or(0.0);
    // Requests cut off by the end of the run are not failures.
    let errors: f64 = v["errorDistribution"].as_object().map_or(0.0, |m| {
        m.iter().filter(|(k, _)| !k.contains("deadline")).filter_map(|(_, v)| v.as_f64()).sum()
    });
    Ok(Load {
        rps: v["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
        p50_ms: ms("p50"),
        p90_ms: ms("p90"),
        p99_ms: ms("p99"),
        requests: total,
        errors: errors + (total - ok),
    })
}

fn iperf(iperf3: &Path, pod: &Pod, dst: SocketAddr, secs: u32) -> anyhow::Result<f64> {
    Ok(iperf_at(iperf3, pod, dst, secs, None)?.0)
}

/// One iperf3 stream from `pod` to `dst`, as fast as it goes or at most `gbits` Gbit/s; returns
/// the received rate in Gbit/s and the bytes received.
fn iperf_at(
    iperf3: &Path,
    pod: &Pod,
    dst: SocketAddr,
    secs: u32,
    gbits: Option<f64>,
) -> anyhow::Result<(f64, f64)> {
    let mut args: Vec<String> =
        ["-c", &dst.ip().to_string(), "-p", &dst.port().to_string(), "-t", &secs.to_string(), "-J"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    if let Some(gbits) = gbits {
        args.extend(["-b".to_owned(), format!("{}M", (gbits * 1000.0) as u64)]);
    }
    let out = in_pod(pod, iperf3, &args)?;
    let v: Value = serde_json::from_str(&out).context("iperf3 output")?;
    let received = &v["end"]["sum_received"];
    let bytes = received["bytes"].as_f64().unwrap_or(0.0);
    anyhow::ensure!(bytes > 0.0, "iperf3 from {} to {dst} received nothing: {out}", pod.name);
    Ok((received["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9, bytes))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// One row of the report.
struct Row {
    figure: String,
    baseline: Option<f64>,
    value: f64,
    unit: &'static str,
    target: &'static str,
    /// The ratio to the baseline in each round, where the figure and its baseline were measured
    /// in turn: the report gives their range next to the ratio of the medians.
    ratios: Vec<f64>,
}

impl Row {
    /// A figure measured once, or whose baseline was not measured in turn with it.
    fn new(
        figure: String,
        baseline: Option<f64>,
        value: f64,
        unit: &'static str,
        target: &'static str,
    ) -> Row {
        Row { figure, baseline, value, unit, target, ratios: Vec::new() }
    }

    /// A figure and its baseline measured once per round: medians, and the ratio of each round.
    fn of_rounds(
        figure: String,
        baseline: &[f64],
        value: &[f64],
        unit: &'static str,
        target: &'static str,
    ) -> Row {
        Row {
            figure,
            baseline: Some(median(baseline.to_vec())),
            value: median(value.to_vec()),
            unit,
            target,
            ratios: baseline.iter().zip(value).map(|(b, v)| v / b).collect(),
        }
    }
}

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

fn objects(cluster: &Cluster, web_a: &Pod, web_b: &Pod, clients: &BTreeMap<&str, Arc<Pod>>) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {MESH_NS}, labels: {{gammaray.dev/dataplane-mode: ambient}}}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {PLAIN_NS}}}\n"
    );
    for n in cluster.nodes() {
        y.push_str(&objects::node(&n.name, n.ip));
    }
    y.push_str(&objects::pod(web_a, &[("app", "web-a")]));
    y.push_str(&objects::pod(web_b, &[("app", "web-b")]));
    for (name, pod) in clients {
        y.push_str(&objects::pod(pod, &[("app", name)]));
    }
    y.push_str(&objects::service(MESH_NS, "web-l4", WEB_L4, 80, 8080, None, &[web_a]));
    y.push_str(&objects::service(MESH_NS, "web", WEB_L7, 80, 8080, Some("http"), &[web_a, web_b]));
    y.push_str(&objects::service(MESH_NS, "web-a", WEB_A, 80, 8080, Some("http"), &[web_a]));
    y.push_str(&objects::service(MESH_NS, "web-b", WEB_B, 80, 8080, Some("http"), &[web_b]));
    y.push_str(&objects::service(MESH_NS, "bulk", BULK, BULK_PORT, BULK_PORT, None, &[web_a]));
    y.push_str(&web_route(50, 50));
    y.push_str(&objects::service(
        MESH_NS,
        "grpc",
        GRPC,
        80,
        8080,
        Some("kubernetes.io/h2c"),
        &[web_a, web_b],
    ));
    y.push_str(&objects::weighted_grpc_route(MESH_NS, "grpc-split", "grpc", &[("web-a", 50), ("web-b", 50)]));
    y
}

fn web_route(a: u32, b: u32) -> String {
    objects::weighted_route(MESH_NS, "web-split", "web", &[("web-a", a), ("web-b", b)])
}

/// `services` Services with `per` endpoints each (addresses that no traffic is sent to), as
/// one YAML text.
fn scale_objects(services: usize, per: usize) -> String {
    let mut y = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: scale}\n");
    for s in 0..services {
        let ip = Ipv4Addr::new(10, 97, (s / 250) as u8, (s % 250) as u8 + 1);
        y.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{s}, namespace: scale}}\nspec: {{clusterIP: '{ip}', clusterIPs: ['{ip}'], ports: [{{name: http, port: 80, targetPort: 8080, appProtocol: http}}]}}\n"
        ));
        let endpoints: Vec<String> = (0..per)
            .map(|e| {
                let n = s * per + e;
                format!(
                    "{{addresses: ['10.{}.{}.{}'], nodeName: node2, conditions: {{ready: true}}}}",
                    240 + n / 65_000,
                    (n / 250) % 260 % 256,
                    n % 250 + 1
                )
            })
            .collect();
        y.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc-{s}-1, namespace: scale, labels: {{kubernetes.io/service-name: svc-{s}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{}]\n",
            endpoints.join(", ")
        ));
    }
    y
}

/// Which backend answered a GET on a keep-alive connection (the `x-backend` header).
fn which_backend(conn: &mut BufReader<TcpStream>) -> anyhow::Result<String> {
    conn.get_mut().write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")?;
    let mut backend = String::new();
    let mut length = 0usize;
    let mut line = String::new();
    loop {
        line.clear();
        if conn.read_line(&mut line)? == 0 {
            bail!("connection closed");
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            match k.to_ascii_lowercase().as_str() {
                "x-backend" => backend = v.trim().to_owned(),
                "content-length" => length = v.trim().parse().unwrap_or(0),
                _ => {}
            }
        }
    }
    let mut body = vec![0; length];
    conn.read_exact(&mut body)?;
    Ok(backend)
}

/// Seconds until `n` consecutive answers come from `want`, asking from `pod` to `dst`.
fn time_to_split(pod: &Pod, dst: SocketAddr, want: &str, n: usize, started: Instant) -> anyhow::Result<f64> {
    pod.run(|| -> anyhow::Result<f64> {
        let mut conn = BufReader::new(TcpStream::connect_timeout(&dst, Duration::from_secs(5))?);
        conn.get_ref().set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut streak = 0;
        let mut first = None;
        while started.elapsed() < Duration::from_secs(60) {
            if which_backend(&mut conn)? == want {
                first.get_or_insert(started.elapsed());
                streak += 1;
                if streak == n {
                    return Ok(first.expect("set").as_secs_f64());
                }
            } else {
                streak = 0;
                first = None;
            }
        }
        bail!("the split never moved to {want}")
    })?
}

/// perf attached to the agents while a load runs, writing to `out`; stopped with SIGINT, as
/// perf expects, so that it finishes its output.
struct PerfRun {
    child: std::process::Child,
    out: PathBuf,
}

impl PerfRun {
    fn start(out: PathBuf, args: &[&str], pids: &[u32]) -> anyhow::Result<Self> {
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

    fn stop(mut self) -> anyhow::Result<PathBuf> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        self.child.wait()?;
        Ok(self.out)
    }
}

/// `perf trace -s` on the agents: system calls by kind, for the note of what a request costs.
struct SyscallTrace(PerfRun);

impl SyscallTrace {
    fn start(dir: &Path, name: &str, pids: &[u32]) -> anyhow::Result<Self> {
        let out = dir.join(format!("syscalls-{name}.txt"));
        Ok(Self(PerfRun::start(out, &["trace", "-s", "--no-syscalls"], pids)?))
    }

    /// Stops tracing; the summary gets a first line with the number of requests it covers.
    fn finish(self, requests: f64) -> anyhow::Result<PathBuf> {
        self.finish_with(&format!("requests: {requests}"))
    }

    /// Stops tracing; the summary gets `first` as its first line (what the trace covered).
    fn finish_with(self, first: &str) -> anyhow::Result<PathBuf> {
        let out = self.0.stop()?;
        let summary = std::fs::read_to_string(&out).unwrap_or_default();
        std::fs::write(&out, format!("{first}\n{summary}"))?;
        Ok(out)
    }
}

/// `perf record` on the agents while a load runs, reported as text next to the report.
struct Profile(PerfRun);

impl Profile {
    fn start(dir: &Path, name: &str, pids: &[u32]) -> anyhow::Result<Self> {
        let data = dir.join(format!("perf-{name}.data"));
        Ok(Self(PerfRun::start(data, &["record", "-F", "999", "-g", "-q"], pids)?))
    }

    /// Stops recording and writes the flat profile as text; returns its path.
    fn finish(self) -> anyhow::Result<PathBuf> {
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

/// The agents' log filter: `warn` unless `GAMMARAY_BENCH_LOG` says otherwise. At `warn` there is
/// no access-log line per request, which the deployed default (`info`) writes.
fn log_filter() -> String {
    std::env::var("GAMMARAY_BENCH_LOG").unwrap_or_else(|_| "warn".to_owned())
}

/// With [`Build::Now`], builds and runs release binaries: the figures to read. With
/// [`Build::AlreadyBuilt`] (`cargo xtask test`), runs the debug binaries the test build made: that
/// run only checks that the harness works, and a release build would add minutes to CI for
/// figures nobody reads there.
///
/// `pgo` (with [`Build::Now`]) builds the agent with profile-guided optimisation, as the image
/// ships it ([`crate::pgo`]); without it the agent is a plain release build.
pub fn run(quick: bool, profile: bool, build: Build, pgo: bool) -> anyhow::Result<()> {
    require_privileges("the benchmarks")?;
    let plan = if quick { QUICK } else { FULL };
    let oha_bin = tool("oha")?;
    let iperf3 = tool("iperf3")?;
    let target_dir = crate::target_dir()?;
    let target_dir = target_dir.as_path();
    let bin_dir = match build {
        Build::Now => {
            println!("bench: building the backend and the relay in release mode");
            crate::cargo_quiet(&[
                "build",
                "--release",
                "-p",
                "gammaray-testkit",
                "--bin",
                "bench-backend",
                "--bin",
                "bench-relay",
            ])?;
            target_dir.join("release")
        }
        Build::AlreadyBuilt => {
            println!(
                "bench: running the debug binaries built for the tests (figures say nothing about speed)"
            );
            target_dir.join("debug")
        }
    };
    // Another build of the agent can stand in, for comparing two versions on the same machine.
    let (agent_bin, agent_build) = match (std::env::var_os("GAMMARAY_BENCH_AGENT"), build) {
        (Some(path), _) => {
            println!("bench: agent binary from GAMMARAY_BENCH_AGENT: {}", Path::new(&path).display());
            (PathBuf::from(path), "the binary GAMMARAY_BENCH_AGENT names")
        }
        (None, Build::AlreadyBuilt) => (bin_dir.join("gammaray-agent"), "debug build"),
        (None, Build::Now) if pgo => (
            crate::pgo::build(target_dir)?.agent,
            "release build with profile-guided optimisation, as the image ships it",
        ),
        (None, Build::Now) => {
            println!("bench: building the agent in release mode, without profile-guided optimisation");
            crate::cargo_quiet(&crate::pgo::AGENT_RELEASE_BUILD)?;
            (bin_dir.join("gammaray-agent"), "plain release build (--no-pgo)")
        }
    };
    let backend_bin = bin_dir.join("bench-backend");
    let relay_bin = bin_dir.join("bench-relay");
    for bin in [&agent_bin, &backend_bin, &relay_bin] {
        anyhow::ensure!(bin.exists(), "{} is missing: build it first", bin.display());
    }
    let bench_dir = target_dir.join("bench");
    let ticks: f64 = String::from_utf8_lossy(&Command::new("getconf").arg("CLK_TCK").output()?.stdout)
        .trim()
        .parse()
        .unwrap_or(100.0);

    let cluster = Cluster::new(2).context("simulated cluster")?;
    let web_a = cluster.add_pod(2, MESH_NS, "web-a-5f7c9d8b4-x7k2p")?;
    let web_b = cluster.add_pod(2, MESH_NS, "web-b-6d8e7f9c5-m4q9z")?;
    let mut clients = BTreeMap::new();
    for (name, node, ns) in
        [("mesh-1", 1, MESH_NS), ("mesh-2", 2, MESH_NS), ("direct-1", 1, PLAIN_NS), ("direct-2", 2, PLAIN_NS)]
    {
        clients.insert(name, cluster.add_pod(node, ns, &format!("{name}-7d9f8b6c5-b2n8w"))?);
    }
    let mut servers = Vec::new();
    for (pod, name) in [(&web_a, "web-a"), (&web_b, "web-b")] {
        servers.push(pod.spawn(
            &backend_bin,
            &["0.0.0.0:8080".into(), "1024".into(), name.into()],
            &[],
            None,
        )?);
    }
    let iperf_log = cluster.dir().join("iperf3-server.log");
    servers.push(web_a.spawn(
        &iperf3,
        &["-s".into(), "-p".into(), BULK_PORT.to_string()],
        &[],
        Some(&iperf_log),
    )?);
    // The floor: node1's relay to node2's, node2's to the backend pod (HTTP and iperf3).
    let node2_ip = cluster.node(2).ip;
    let mut relays = Vec::new();
    for (node, http, bulk) in [
        (1, SocketAddr::from((node2_ip, RELAY_PORT)), SocketAddr::from((node2_ip, RELAY_BULK_PORT))),
        (2, SocketAddr::from((web_a.ip, 8080)), SocketAddr::from((web_a.ip, BULK_PORT))),
    ] {
        let log = cluster.dir().join(format!("relay-node{node}.log"));
        relays.push(cluster.node(node).spawn(
            "bench-relay",
            &relay_bin,
            &[format!("0.0.0.0:{RELAY_PORT}={http}"), format!("0.0.0.0:{RELAY_BULK_PORT}={bulk}")],
            &[],
            Some(&log),
        )?);
    }
    let relay_pids: Vec<u32> = relays.iter().map(|r| r.pid()).collect();

    // The API server on node1's address, where both nodes' agents reach it.
    let api_addr: SocketAddr = API_SERVER.parse().expect("address");
    let server = cluster.node(1).run(|| ApiServer::start_on(api_addr, Duration::from_secs(1)))??;
    let kubeconfig = cluster.dir().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig)?;
    server.apply_yaml(&objects(&cluster, &web_a, &web_b, &clients));
    let ca = cluster.dir().join("ca");
    generate_ca(&agent_bin, &ca)?;
    let args = AgentArgs {
        ca: Some(ca.clone()),
        extra: vec!["--kubeconfig".to_owned(), kubeconfig.display().to_string()],
        rust_log: log_filter(),
        ..AgentArgs::default()
    };
    let mut agents = Vec::new();
    for node in cluster.nodes() {
        let agent = Agent::start(&agent_bin, &cluster, node, &args)?;
        // web-l4, web, web-a, web-b, bulk and grpc.
        agent.wait_until(|s| s.frontends >= 6)?;
        agents.push(agent);
    }
    agents[0].wait_until(|s| !s.enrolled.is_empty())?;
    agents[1].wait_until(|s| s.enrolled.len() >= 3)?;
    // One message of 16 bytes behind gRPC's prefix (uncompressed, length).
    let grpc_body = cluster.dir().join("grpc-request.bin");
    std::fs::write(&grpc_body, [&[0u8, 0, 0, 0, 16][..], &[b'g'; 16]].concat())?;
    let world =
        World { clients: clients.clone(), web_a: web_a.clone(), relay: cluster.node(1).ip, grpc_body };
    // Warm-up: every path answers (and certificates are issued).
    for path in Lane::ALL {
        let (pod, url) = world.target(path);
        let load = oha(&oha_bin, pod, &url, 1, None, Duration::from_millis(300))?;
        if load.requests == 0.0 || load.errors > 0.0 {
            bail!("{}: warm-up failed ({load:?})", path.label());
        }
    }
    // The L7 lanes measure their routes, not a Service's plain split: both must be accepted.
    for (kind, name) in [("HTTPRoute", "web-split"), ("GRPCRoute", "grpc-split")] {
        let accepted = || {
            let Some(route) = server.get("gateway.networking.k8s.io/v1", kind, MESH_NS, name) else {
                return false;
            };
            let parents = route["status"]["parents"].as_array().into_iter().flatten();
            parents
                .flat_map(|p| p["conditions"].as_array().into_iter().flatten())
                .any(|c| c["type"] == "Accepted" && c["status"] == "True")
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !accepted() {
            if Instant::now() > deadline {
                bail!("{kind} {name} was not accepted in 10 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let idle_rss: Vec<f64> = agents.iter().map(|a| mem_mib(a.pid(), "VmRSS")).collect();
    let agent_pids: Vec<u32> = agents.iter().map(Agent::pid).collect();
    // What the agents cost with no traffic (watches, lease renewal, enrolment), so the per-request
    // figures can be read against it.
    let idle_cpu = {
        let (cpu0, t0) = (cpu_of(agent_pids.iter().copied(), ticks), Instant::now());
        std::thread::sleep(plan.fixed.max(Duration::from_secs(1)));
        (cpu_of(agent_pids.iter().copied(), ticks) - cpu0) / t0.elapsed().as_secs_f64()
    };

    let mut rows = Vec::new();
    // The HTTP backends' CPU, measured as the agents' is (cores at the fixed rate, ms per 1000
    // requests at saturation): a process that wakes, reads and writes once per request, the
    // unit a proxy's cost is read against (a proxy does that twice per request, once each way).
    let backend_pids: Vec<u32> = servers[..2].iter().map(|s| s.pid()).collect();
    let backend_cpu_now = || cpu_of(backend_pids.iter().copied(), ticks);
    // The processes that carry a lane's requests: the relays for the floor, the agents otherwise
    // (on the direct paths, what they spend while not involved).
    let carriers_of = |path: Lane| if path.is_floor() { &relay_pids } else { &agent_pids };
    // Rounds, each of which measures every lane in turn: a slow spell of the host's (minutes
    // long on this machine) then falls on a lane and its direct baseline alike, not on the three
    // runs of one lane, and each round gives a ratio of its own.
    let mut samples: BTreeMap<Lane, Samples> = BTreeMap::new();
    for _ in 0..plan.runs {
        for path in Lane::ALL {
            let (pod, url) = world.target(path);
            let carriers = carriers_of(path);
            let cpu_now = || cpu_of(carriers.iter().copied(), ticks);
            let s = samples.entry(path).or_default();
            let cpu0 = cpu_now();
            let b0 = backend_cpu_now();
            let w0 = switches_of(carriers);
            let t0 = Instant::now();
            let l = oha(&oha_bin, pod, &url, 16, Some(1000), plan.fixed)?;
            let (cpu, wall) = (cpu_now() - cpu0, t0.elapsed().as_secs_f64());
            s.backend_fixed.push((backend_cpu_now() - b0) / wall);
            s.switches.push((switches_of(carriers) - w0) / l.requests.max(1.0));
            s.p50.push(l.p50_ms);
            s.p90.push(l.p90_ms);
            s.p99.push(l.p99_ms);
            s.cpu_fixed.push(cpu / wall);
            let l = oha(&oha_bin, pod, &url, 1, None, plan.saturate)?;
            s.max1.push(l.rps);
            // Per carrier, so the run also says which node's proxy the lane leans on.
            let each_now = || carriers.iter().map(|&p| cpu_of([p], ticks)).collect::<Vec<f64>>();
            let each0 = each_now();
            let b0 = backend_cpu_now();
            let t0 = Instant::now();
            let l = oha(&oha_bin, pod, &url, 16, None, plan.saturate)?;
            let each: Vec<f64> = each_now().iter().zip(&each0).map(|(c, c0)| c - c0).collect();
            let cpu: f64 = each.iter().sum();
            let (wall, backend) = (t0.elapsed().as_secs_f64(), backend_cpu_now() - b0);
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
            let carriers = carriers_of(path).len();
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
    if profile {
        for path in Lane::ALL.into_iter().filter(|p| !p.is_direct()) {
            // On runs of their own: perf slows the processes, and the figures above must not
            // carry it. At the fixed rate every request is a wakeup of an idle process, at
            // saturation wakeups are shared: the two profiles differ.
            let (pod, url) = world.target(path);
            let carriers = carriers_of(path);
            let name = format!("{path:?}").to_lowercase();
            let trace = SyscallTrace::start(&bench_dir, &name, carriers)?;
            let l = oha(&oha_bin, pod, &url, 16, Some(1000), plan.fixed)?;
            let out = trace.finish(l.requests)?;
            println!("bench: system calls of {} at 1000 req/s: {}", path.label(), out.display());
            let trace = SyscallTrace::start(&bench_dir, &format!("{name}-saturation"), carriers)?;
            let l = oha(&oha_bin, pod, &url, 16, None, plan.saturate)?;
            let out = trace.finish(l.requests)?;
            println!("bench: system calls of {} at saturation: {}", path.label(), out.display());
            let perf = Profile::start(&bench_dir, &format!("{name}-fixed"), carriers)?;
            oha(&oha_bin, pod, &url, 16, Some(1000), plan.fixed)?;
            println!("bench: profile of {} at 1000 req/s: {}", path.label(), perf.finish()?.display());
            let perf = Profile::start(&bench_dir, &name, carriers)?;
            oha(&oha_bin, pod, &url, 16, None, plan.saturate)?;
            println!("bench: profile of {} at saturation: {}", path.label(), perf.finish()?.display());
        }
    }
    let latency: BTreeMap<Lane, (f64, f64, f64)> = samples
        .iter()
        .map(|(&path, s)| (path, (median(s.p50.clone()), median(s.p90.clone()), median(s.p99.clone()))))
        .collect();

    for path in Lane::ALL.into_iter().filter(|p| !p.is_direct()) {
        let (b, m) = (&samples[&path.baseline()], &samples[&path]);
        let p90_target = if path == Lane::L7Cross { "≤ 1.5× and ≤ +0.15 ms" } else { "" };
        for (name, bv, mv, target) in
            [("p50", &b.p50, &m.p50, ""), ("p90", &b.p90, &m.p90, p90_target), ("p99", &b.p99, &m.p99, "")]
        {
            let figure = format!("{}: {name} latency at 1000 req/s, 16 conns", path.label());
            rows.push(Row::of_rounds(figure, bv, mv, "ms", target));
        }
        rows.push(Row::of_rounds(
            format!("{}: max req/s, 1 conn", path.label()),
            &b.max1,
            &m.max1,
            "req/s",
            "",
        ));
        let target = if path.is_mesh() && path.baseline() == Lane::DirectCross { "≥ 0.5×" } else { "" };
        let figure = format!("{}: max req/s, 16 conns", path.label());
        rows.push(Row::of_rounds(figure, &b.max16, &m.max16, "req/s", target));
        // What the lane's carriers (proxies or relays) spent.
        let carriers = |what: &str| format!("{}: {} {what}", path.label(), path.carriers_label());
        // The baselines of the CPU rows are the backend's on the direct path: a process that
        // wakes, reads and writes once per request. Each proxy does that twice per request.
        let figure =
            carriers("CPU at 1000 req/s (direct: the backend's, one wakeup, read and write per request)");
        let target = if path == Lane::L7Cross { "≤ 0.1" } else { "" };
        rows.push(Row::of_rounds(figure, &b.backend_fixed, &m.cpu_fixed, "cores", target));
        let figure = carriers("context switches per request at 1000 req/s");
        rows.push(Row::new(figure, None, median(m.switches.clone()), "", ""));
        let figure = carriers("CPU per 1000 requests at saturation (direct: the backend's)");
        let target = if path == Lane::L7Cross { "≤ 30" } else { "" };
        rows.push(Row::of_rounds(figure, &b.backend_saturated, &m.cpu_saturated, "ms", target));
    }

    // Bulk TCP, one stream, through L4 (cross node: HBONE with mTLS), and through the floor.
    let pod_bulk = SocketAddr::from((web_a.ip, BULK_PORT));
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
        let (cpu0, switches0) = (cpu_of(pids.iter().copied(), ticks), switches_of(pids));
        let (rate, bytes) = iperf_at(&iperf3, pod, dst, plan.bulk_secs, gbits)?;
        let gb = bytes / 1e9;
        let cpu = (cpu_of(pids.iter().copied(), ticks) - cpu0) * 1000.0 / gb;
        anyhow::Ok((rate, cpu, (switches_of(pids) - switches0) / gb))
    };
    let paced = |pids: &[u32], pod: &Pod, dst: SocketAddr| -> anyhow::Result<f64> {
        Ok(carried(pids, pod, dst, Some(BULK_FIXED_GBITS))?.1)
    };
    // Medians of the runs, as for the requests, with the paths taking turns within each run so
    // that a slow spell of the host's does not fall on one path only.
    let mut bulk: [Vec<f64>; 11] = Default::default();
    for _ in 0..plan.runs {
        let (mesh, mesh_gb, mesh_sw) = carried(&agent_pids, &clients["mesh-1"], mesh_bulk, None)?;
        let (floor, floor_gb, floor_sw) = carried(&relay_pids, &clients["direct-1"], floor_bulk, None)?;
        let figures = [
            iperf(&iperf3, &clients["direct-1"], pod_bulk, plan.bulk_secs)?,
            mesh,
            floor,
            iperf(&iperf3, &clients["direct-2"], pod_bulk, plan.bulk_secs)?,
            iperf(&iperf3, &clients["mesh-2"], mesh_bulk, plan.bulk_secs)?,
            paced(&agent_pids, &clients["mesh-1"], mesh_bulk)?,
            paced(&relay_pids, &clients["direct-1"], floor_bulk)?,
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
    if profile {
        // Transfers of their own, as for the lanes above: the system calls that carrying a
        // stream's bytes takes (their count per GB says how large each read and write is), then
        // where the CPU goes.
        let trace = SyscallTrace::start(&bench_dir, "bulk-cross", &agent_pids)?;
        let (_, bytes) = iperf_at(&iperf3, &clients["mesh-1"], mesh_bulk, plan.bulk_secs, None)?;
        let out = trace.finish_with(&format!("bytes: {bytes}"))?;
        println!("bench: system calls of bulk TCP cross node: {}", out.display());
        let perf = Profile::start(&bench_dir, "bulk-cross", &agent_pids)?;
        iperf(&iperf3, &clients["mesh-1"], mesh_bulk, plan.bulk_secs)?;
        println!("bench: profile of bulk TCP cross node: {}", perf.finish()?.display());
    }
    println!(
        "bench: bulk TCP {:.2} → {:.2} Gbit/s cross node (floor {:.2}), {:.2} → {:.2} same node",
        m(&direct_cross),
        m(&mesh_cross),
        m(&floor_cross),
        m(&direct_same),
        m(&mesh_same)
    );
    for (figure, baseline, value, target) in [
        ("bulk TCP, 1 stream, cross node (mTLS)", &direct_cross, &mesh_cross, "≥ 0.7×"),
        (
            "bulk TCP, 1 stream, cross node, floor: two plain TCP relays (no TLS)",
            &direct_cross,
            &floor_cross,
            "",
        ),
        ("bulk TCP, 1 stream, same node", &direct_same, &mesh_same, ""),
    ] {
        rows.push(Row::of_rounds(figure.into(), baseline, value, "Gbit/s", target));
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
            rows.push(Row::new(format!("{carriers} {what}"), None, m(values), unit, ""));
        }
    }

    // Connection setup: an unenrolled pod straight to the backend, an enrolled one through the
    // eBPF redirect and the proxy (L4 Service).
    // Connection setup, sequentially: the median connect time as a rate (a rare SYN
    // retransmission, a whole second, would otherwise swamp the mean), and how many took over
    // 200 ms.
    let connects = |pod: &Pod, dst: SocketAddr| -> anyhow::Result<(f64, usize)> {
        pod.run(|| -> anyhow::Result<(f64, usize)> {
            let mut times = Vec::with_capacity(plan.connects);
            for _ in 0..plan.connects {
                let c0 = Instant::now();
                let s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
                times.push(c0.elapsed().as_secs_f64());
                drop(s);
            }
            let slow = times.iter().filter(|t| **t > 0.2).count();
            Ok((1.0 / median(times), slow))
        })?
    };
    let (plain, plain_slow) = connects(&clients["direct-2"], SocketAddr::from((web_a.ip, 8080)))?;
    let (enrolled, enrolled_slow) = connects(&clients["mesh-2"], SocketAddr::from((WEB_L4, 80)))?;
    rows.push(Row::new(
        format!(
            "connects/s from a pod, same node, 1 / median of {} sequential connects (enrolled: eBPF redirect to the proxy; over 200 ms: {plain_slow} direct, {enrolled_slow} enrolled)",
            plan.connects
        ),
        Some(plain),
        enrolled,
        "conn/s",
        "",
    ));

    // What one hop costs this machine before any proxy work: each process a request passes
    // through is a wakeup, and between CPUs of a virtual machine a wakeup is an interrupt
    // through the hypervisor.
    match wakeup_cost(plan.ping_pongs) {
        Ok((same, across)) => rows.push(Row::new(
            format!(
                "machine: one thread waking another, same CPU → across CPUs (socket ping-pong, {} round trips; context for the per-hop figures)",
                plan.ping_pongs
            ),
            Some(same),
            across,
            "µs",
            "",
        )),
        Err(err) => println!("bench: wakeup cost not measured: {err:#}"),
    }

    rows.push(Row::new("both agents' CPU with no traffic".into(), None, idle_cpu, "cores", ""));
    let peak_rss: Vec<f64> = agents.iter().map(|a| mem_mib(a.pid(), "VmHWM")).collect();
    for (agent, (idle, peak)) in agents.iter().zip(idle_rss.iter().zip(&peak_rss)) {
        rows.push(Row::new(
            format!("{} agent RSS idle (peak under load {peak:.1} MiB)", agent.node),
            None,
            *idle,
            "MiB",
            "≤ 20",
        ));
    }

    // Scale: 1000 Services with 10 endpoints each, then a weight change on `web`.
    let t0 = Instant::now();
    server.apply_yaml(&scale_objects(plan.services, plan.endpoints_per_service));
    for agent in &agents {
        agent.wait_until(|s| s.frontends >= plan.services + 6)?;
    }
    let load_time = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    for agent in &agents {
        rows.push(Row::new(
            format!(
                "{} agent RSS with {} Services and {} endpoints (loaded in {:.2} s)",
                agent.node,
                plan.services,
                plan.services * plan.endpoints_per_service,
                load_time
            ),
            None,
            mem_mib(agent.pid(), "VmRSS"),
            "MiB",
            "≤ 40",
        ));
    }
    let version = agents[0].status()?.config_version;
    let started = Instant::now();
    server.apply_yaml(&web_route(100, 0));
    let split = time_to_split(&clients["mesh-1"], SocketAddr::from((WEB_L7, 80)), "web-a", 20, started)?;
    agents[0].wait_until(|s| s.config_version > version)?;
    rows.push(Row::new(
        format!(
            "weight change → new split seen by a client, with {} endpoints",
            plan.services * plan.endpoints_per_service
        ),
        None,
        split * 1000.0,
        "ms",
        "",
    ));

    // The rebuild after the change must not leave the agent larger than before it.
    std::thread::sleep(Duration::from_millis(500));
    for agent in &agents {
        rows.push(Row::new(
            format!("{} agent RSS with {} Services, after the weight change", agent.node, plan.services),
            None,
            mem_mib(agent.pid(), "VmRSS"),
            "MiB",
            "≤ 40",
        ));
    }

    // Connections held open: what each costs the agents in memory while it is idle, after one
    // request and its answer (so each direction has been read and written once). Last, so that
    // what the allocator keeps after they close does not count in the figures above.
    for (lane, vip) in [(Lane::L4Cross, WEB_L4), (Lane::L7Cross, WEB_L7)] {
        let dst = SocketAddr::from((vip, 80));
        let before: Vec<f64> = agents.iter().map(|a| mem_mib(a.pid(), "VmRSS")).collect();
        let held = clients["mesh-1"].run(|| -> anyhow::Result<Vec<BufReader<TcpStream>>> {
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
        for (agent, before) in agents.iter().zip(&before) {
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
                "",
            ));
        }
        drop(held);
        std::thread::sleep(Duration::from_millis(500));
    }

    let report = render(&rows, quick, build, &plan, agent_build);
    let dir = bench_dir;
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("report.md"), &report)?;
    std::fs::write(dir.join("latency.svg"), chart(&latency))?;
    println!("\n{report}");
    println!("bench: wrote {} and {}", dir.join("report.md").display(), dir.join("latency.svg").display());
    drop(agents);
    drop(relays);
    drop(servers);
    drop(server);
    drop(cluster);
    Ok(())
}

/// Microseconds from one thread writing a byte to another thread returning from its blocking
/// read, half a round trip over a Unix socket pair: with both threads pinned to CPU 0, and with
/// them pinned to CPUs 0 and 1. Reads time out after a second, so a lost wakeup cannot hang
/// the run.
fn wakeup_cost(round_trips: usize) -> anyhow::Result<(f64, f64)> {
    use std::os::unix::net::UnixStream;

    use nix::{sched::CpuSet, unistd::Pid};

    fn pin(cpu: usize) -> anyhow::Result<()> {
        let mut set = CpuSet::new();
        set.set(cpu)?;
        nix::sched::sched_setaffinity(Pid::from_raw(0), &set).with_context(|| format!("pin to CPU {cpu}"))
    }
    fn ping_pong(round_trips: usize, cpus: (usize, usize)) -> anyhow::Result<f64> {
        let (mut a, mut b) = UnixStream::pair()?;
        for s in [&a, &b] {
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
        }
        let echo = std::thread::spawn(move || -> anyhow::Result<()> {
            pin(cpus.1)?;
            let mut byte = [0u8; 1];
            for _ in 0..round_trips {
                b.read_exact(&mut byte)?;
                b.write_all(&byte)?;
            }
            Ok(())
        });
        // Measured on a thread of its own, so pinning it leaves the caller's CPUs alone.
        let measured = std::thread::spawn(move || -> anyhow::Result<f64> {
            pin(cpus.0)?;
            let mut byte = [0u8; 1];
            let started = Instant::now();
            for _ in 0..round_trips {
                a.write_all(&byte)?;
                a.read_exact(&mut byte)?;
            }
            Ok(started.elapsed().as_secs_f64() * 1e6 / round_trips as f64 / 2.0)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("ping-pong thread panicked"))??;
        echo.join().map_err(|_| anyhow::anyhow!("echo thread panicked"))??;
        Ok(measured)
    }
    if std::thread::available_parallelism()?.get() < 2 {
        bail!("one CPU only");
    }
    Ok((ping_pong(round_trips, (0, 0))?, ping_pong(round_trips, (0, 1))?))
}

fn render(rows: &[Row], quick: bool, build: Build, plan: &Plan, agent_build: &str) -> String {
    let mut s = String::from("# gammaray benchmarks\n\n");
    if build == Build::AlreadyBuilt {
        s.push_str(
            "**Debug build**: this run checked that the harness works (`cargo xtask test`). Its \
             figures say nothing about the mesh's speed; `cargo xtask bench` measures release builds.\n\n",
        );
    }
    s.push_str(&format!(
        "Mode: {}. oha at a fixed 1000 req/s over 16 connections for {} s, at saturation for {} s, \
         1 KiB responses, HTTP/1.1 keep-alive (the gRPC lanes: unary calls over HTTP/2); iperf3 for {} s; medians of {} round(s), each of \
         which measures every path in turn. Ratios are to the direct path of the same run (same \
         node or cross node): the ratio of the medians, and in brackets the range of the rounds' \
         own ratios. Two cores run everything: \
         load generator, backend and both proxies. The floor rows send the cross-node requests \
         through two plain TCP relays in the proxies' places (the proxy's runtime and copy loop, \
         no TLS, no HTTP): what two proxies cost on this machine before any work of their own. The agents log at \
         `{}`{}.\n\n",
        if quick { "quick (keeps the harness working; numbers are noisy)" } else { "full" },
        plan.fixed.as_secs_f64(),
        plan.saturate.as_secs_f64(),
        plan.bulk_secs,
        plan.runs,
        log_filter(),
        if log_filter().contains("info") {
            ""
        } else {
            " (no access-log line per request; the deployed default, `info`, writes one)"
        }
    ));
    s.push_str(&format!("Agent: {agent_build}.\n\n"));
    s.push_str("| figure | direct | measured | ratio | target |\n| --- | ---: | ---: | ---: | --- |\n");
    for r in rows {
        let (base, ratio) = match r.baseline {
            Some(b) => {
                let mut ratio = format!("{:.2}×", r.value / b);
                if r.ratios.len() > 1 {
                    let lo = r.ratios.iter().copied().fold(f64::INFINITY, f64::min);
                    let hi = r.ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    ratio.push_str(&format!(" ({lo:.2}–{hi:.2})"));
                }
                (format!("{} {}", fmt(b), r.unit), ratio)
            }
            None => ("".into(), "".into()),
        };
        s.push_str(&format!(
            "| {} | {base} | {} {} | {ratio} | {} |\n",
            r.figure,
            fmt(r.value),
            r.unit,
            r.target
        ));
    }
    s.push_str("\n![latency percentiles](latency.svg)\n");
    s
}

fn fmt(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Grouped bars of p50/p90/p99 per path, as SVG.
fn chart(latency: &BTreeMap<Lane, (f64, f64, f64)>) -> String {
    let max = latency.values().map(|l| l.2).fold(0.0f64, f64::max).max(0.001);
    let (h, left, bottom) = (320.0, 60.0, 60.0);
    // Room for each path's label under its bars.
    let w = (left + 20.0 + 95.0 * latency.len() as f64).max(760.0);
    let plot_h = h - bottom - 20.0;
    let group = (w - left - 20.0) / latency.len() as f64;
    let bar = group / 4.0;
    let colors = ["#4c78a8", "#f58518", "#e45756"];
    let mut s = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='11'>\n<rect width='100%' height='100%' fill='white'/>\n<text x='{left}' y='14' font-size='13'>latency at 1000 req/s, 16 connections (ms): p50, p90, p99</text>\n"
    );
    for i in 0..=4 {
        let v = max * i as f64 / 4.0;
        let y = h - bottom - plot_h * i as f64 / 4.0;
        s.push_str(&format!(
            "<line x1='{left}' x2='{}' y1='{y:.1}' y2='{y:.1}' stroke='#ddd'/><text x='{}' y='{:.1}' text-anchor='end'>{v:.2}</text>\n",
            w - 20.0,
            left - 4.0,
            y + 4.0
        ));
    }
    for (g, (path, l)) in latency.iter().enumerate() {
        let x0 = left + g as f64 * group + bar / 2.0;
        for (i, v) in [l.0, l.1, l.2].into_iter().enumerate() {
            let bh = if v.is_finite() { plot_h * v / max } else { 0.0 };
            s.push_str(&format!(
                "<rect x='{:.1}' y='{:.1}' width='{:.1}' height='{bh:.1}' fill='{}'/>\n",
                x0 + i as f64 * bar,
                h - bottom - bh,
                bar * 0.9,
                colors[i]
            ));
        }
        s.push_str(&format!(
            "<text x='{:.1}' y='{:.1}' text-anchor='middle'>{}</text>\n",
            x0 + bar * 1.5,
            h - bottom + 16.0,
            path.short()
        ));
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::{FULL, Lane, Row, render};

    #[test]
    fn a_row_of_rounds_gives_the_ratio_of_the_medians_and_the_range_of_the_rounds_ratios() {
        // Round 2 is slow on both sides: its own ratio is ordinary, the medians' ratio too.
        let row = Row::of_rounds("x".into(), &[10.0, 40.0, 12.0], &[5.0, 18.0, 7.0], "req/s", "");
        assert_eq!((row.baseline, row.value), (Some(12.0), 7.0));
        let md = render(&[row], false, crate::agents::Build::Now, &FULL, "a build");
        assert!(md.contains("| x | 12.00 req/s | 7.00 req/s | 0.58× (0.45–0.58) |  |"), "{md}");
        // One round: no range.
        let one = Row::of_rounds("y".into(), &[10.0], &[5.0], "ms", "");
        let md = render(&[one], true, crate::agents::Build::Now, &FULL, "a build");
        assert!(md.contains("| y | 10.00 ms | 5.00 ms | 0.50× |  |"), "{md}");
    }

    #[test]
    fn each_lane_is_measured_against_the_direct_path_of_its_own_kind() {
        use Lane::*;
        let want = [
            (DirectSame, DirectSame),
            (L4Same, DirectSame),
            (L7Same, DirectSame),
            (DirectCross, DirectCross),
            (L4Cross, DirectCross),
            (L7Cross, DirectCross),
            (FloorCross, DirectCross),
            (DirectGrpcCross, DirectGrpcCross),
            (GrpcCross, DirectGrpcCross),
        ];
        assert_eq!(want.map(|(lane, _)| lane), Lane::ALL, "every lane, once");
        for (lane, baseline) in want {
            assert_eq!(lane.baseline(), baseline, "{lane:?}");
        }
        let mesh: Vec<Lane> = Lane::ALL.into_iter().filter(|l| l.is_mesh()).collect();
        assert_eq!(mesh, [L4Same, L7Same, L4Cross, L7Cross, GrpcCross]);
    }
}
