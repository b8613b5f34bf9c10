//! The bench's world: two simulated nodes, backend and client pods, the floor's relays, the
//! fake API server on node1's address, and real agents watching it.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use gammaray_testkit::{Cluster, Pod, apiserver::ApiServer, lanes::Lane, objects, process::Process};

use super::measure::oha;
use crate::agents::{Agent, AgentArgs, Control as _, Signer};

pub(super) const MESH_NS: &str = "bench";
pub(super) const PLAIN_NS: &str = "plain";
pub(super) const WEB_L4: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 1);
pub(super) const WEB_L7: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 2);
pub(super) const WEB_A: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 3);
pub(super) const WEB_B: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 4);
pub(super) const BULK: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 5);
pub(super) const GRPC: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 6);
/// The unary gRPC method the gRPC lanes call (the backend answers any).
pub(super) const GRPC_METHOD: &str = "/bench.Echo/Call";
pub(super) const BULK_PORT: u16 = 5201;
/// Connections a client holds open through the mesh to weigh what an idle one costs.
pub(super) const HELD_CONNECTIONS: usize = 1000;
/// The floor's relays listen on these ports on both nodes: HTTP to the backend, and iperf3.
pub(super) const RELAY_PORT: u16 = 16080;
pub(super) const RELAY_BULK_PORT: u16 = 16201;
/// The rate of the fixed-rate bulk transfers, which measure CPU per byte: below what the mesh
/// reaches at saturation on this project's machines, so both the mesh and the floor carry it in
/// full.
pub(super) const BULK_FIXED_GBITS: f64 = 2.0;
pub(super) const API_SERVER: &str = "10.200.0.1:6443";

/// Durations and repetitions of one mode.
pub(super) struct Plan {
    pub fixed: Duration,
    pub saturate: Duration,
    pub bulk_secs: u32,
    pub runs: usize,
    pub connects: usize,
    pub services: usize,
    pub endpoints_per_service: usize,
    /// Round trips of the wakeup-cost measurement.
    pub ping_pongs: usize,
    /// Connections one pod holds in the flood phase.
    pub flood: usize,
    /// Cluster sizes (Services of 10 endpoints and realistic pods) of the configuration path's
    /// scale measurement, and the changes timed at each.
    pub cluster_sizes: &'static [usize],
    pub cluster_changes: usize,
    /// Sustained endpoint churn (100 changes/s): at how many Services, for how many seconds.
    pub churn: (usize, u64),
}

pub(super) const FULL: Plan = Plan {
    fixed: Duration::from_secs(10),
    saturate: Duration::from_secs(5),
    bulk_secs: 5,
    runs: 3,
    connects: 2000,
    services: 1000,
    endpoints_per_service: 10,
    ping_pongs: 20_000,
    flood: 30_000,
    cluster_sizes: &[1_000, 10_000, 20_000],
    // Many: a change takes tens of microseconds, and the p50 of a few hundred moves with the
    // host's noise by more than the growth being measured.
    cluster_changes: 1_000,
    churn: (10_000, 60),
};

pub(super) const QUICK: Plan = Plan {
    fixed: Duration::from_secs(1),
    saturate: Duration::from_secs(1),
    bulk_secs: 1,
    runs: 1,
    connects: 300,
    services: 1000,
    endpoints_per_service: 10,
    ping_pongs: 5_000,
    flood: 3_000,
    cluster_sizes: &[100, 1_000],
    cluster_changes: 20,
    churn: (1_000, 2),
};

pub(super) struct World {
    pub clients: BTreeMap<&'static str, Arc<Pod>>,
    pub web_a: Arc<Pod>,
    /// Where the floor's first relay listens: node1.
    pub relay: Ipv4Addr,
    /// The request body of the gRPC lanes: one length-prefixed message.
    pub grpc_body: PathBuf,
}

impl World {
    /// The client pod of a timed lane, and what oha is told after its own options: the URL, and for
    /// gRPC the unary call (HTTP/2 prior knowledge, a POST of one message with gRPC's headers).
    pub(super) fn target(&self, path: Lane) -> (&Pod, Vec<String>) {
        let c = |n: &str| self.clients[n].as_ref();
        let (pod, url) = match path {
            Lane::DirectSame => (c("direct-2"), format!("http://{}:8080/", self.web_a.ip)),
            Lane::DirectCross => (c("direct-1"), format!("http://{}:8080/", self.web_a.ip)),
            Lane::L4Same => (c("mesh-2"), format!("http://{WEB_L4}/")),
            Lane::L4Cross => (c("mesh-1"), format!("http://{WEB_L4}/")),
            Lane::L7Same => (c("mesh-2"), format!("http://{WEB_L7}/")),
            Lane::L7Cross => (c("mesh-1"), format!("http://{WEB_L7}/")),
            Lane::FloorCross => (c("direct-1"), format!("http://{}:{RELAY_PORT}/", self.relay)),
            Lane::GrpcDirect => (c("direct-1"), format!("http://{}:8080{GRPC_METHOD}", self.web_a.ip)),
            Lane::GrpcCross => (c("mesh-1"), format!("http://{GRPC}{GRPC_METHOD}")),
            // The lanes table marks which lanes the timed benchmark runs; these it does not.
            other => panic!("{} is not a lane of the timed benchmark", other.name()),
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

pub(super) fn objects(
    cluster: &Cluster,
    web_a: &Pod,
    web_b: &Pod,
    clients: &BTreeMap<&str, Arc<Pod>>,
) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {MESH_NS}, labels: {{gammaray.dev/dataplane-mode: ambient}}}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {PLAIN_NS}}}\n"
    );
    for n in cluster.nodes() {
        y.push_str(&objects::node(&n.name, n.ip));
    }
    // The backends stay out of enrolment: the direct rows must reach them without the mesh, and
    // an enrolled pod has its plaintext from outside the mesh captured by its node's proxy. The
    // mesh rows reach them as workloads of node2 all the same (HBONE, then node2's proxy).
    let out = ("gammaray.dev/dataplane-mode", "none");
    y.push_str(&objects::pod(web_a, &[("app", "web-a"), out]));
    y.push_str(&objects::pod(web_b, &[("app", "web-b"), out]));
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

pub(super) fn web_route(a: u32, b: u32) -> String {
    objects::weighted_route(MESH_NS, "web-split", "web", &[("web-a", a), ("web-b", b)])
}

/// `services` Services with `per` endpoints each (addresses that no traffic is sent to), as
/// one YAML text.
pub(super) fn scale_objects(services: usize, per: usize) -> String {
    let mut y = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: scale}\n");
    for s in 0..services {
        let ip = Ipv4Addr::new(10, 97, (s / 250) as u8, (s % 250) as u8 + 1);
        y.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{s}, namespace: scale}}\nspec: {{clusterIP: '{ip}', clusterIPs: ['{ip}'], ports: [{{name: http, port: 80, targetPort: 8080, appProtocol: http}}]}}\n"
        ));
        y.push_str("---\n");
        y.push_str(&scale_slice(s, per, None));
    }
    y
}

/// The EndpointSlice of [`scale_objects`]' Service `s`, with endpoint `unready` not ready.
pub(super) fn scale_slice(s: usize, per: usize, unready: Option<usize>) -> String {
    let endpoints: Vec<String> = (0..per)
        .map(|e| {
            let n = s * per + e;
            format!(
                "{{addresses: ['10.{}.{}.{}'], nodeName: node2, conditions: {{ready: {}}}}}",
                240 + n / 65_000,
                (n / 250) % 260 % 256,
                n % 250 + 1,
                unready != Some(e)
            )
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc-{s}-1, namespace: scale, labels: {{kubernetes.io/service-name: svc-{s}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{}]\n",
        endpoints.join(", ")
    )
}

/// The agents' log filter: `warn` unless `GAMMARAY_BENCH_LOG` says otherwise. At `warn` there is
/// no access-log line per request, which the deployed default (`info`) writes.
pub(super) fn log_filter() -> String {
    std::env::var("GAMMARAY_BENCH_LOG").unwrap_or_else(|_| "warn".to_owned())
}

/// Everything a run measures through, in drop order: the agents and processes before the
/// cluster whose namespaces they run in.
pub(super) struct Testbed {
    pub agents: Vec<Agent>,
    pub relays: Vec<Process>,
    /// The two HTTP backends, then iperf3's server.
    pub servers: Vec<Process>,
    pub server: ApiServer,
    pub world: World,
    /// The signer the agents get their node CAs from (the flood plays node1 with its root).
    pub signer: Signer,
    /// What the agents were started with (an upgrade starts another with the same).
    pub args: AgentArgs,
    /// Dropped last: its guards remove the nodes' and pods' namespaces and cgroups.
    _cluster: Cluster,
}

/// The binaries a testbed runs.
pub(super) struct Binaries<'a> {
    pub agent: &'a Path,
    pub backend: &'a Path,
    pub relay: &'a Path,
    pub oha: &'a Path,
    pub iperf3: &'a Path,
}

impl Testbed {
    /// Builds the world, starts the agents, and returns once every lane answers and both L7
    /// routes are accepted (so an L7 lane never measures a Service's plain split).
    pub(super) fn start(bins: &Binaries<'_>) -> anyhow::Result<Self> {
        let Binaries { agent: agent_bin, backend: backend_bin, relay: relay_bin, oha: oha_bin, iperf3 } =
            *bins;
        let cluster = Cluster::new(2).context("simulated cluster")?;
        let web_a = cluster.add_pod(2, MESH_NS, "web-a-5f7c9d8b4-x7k2p")?;
        let web_b = cluster.add_pod(2, MESH_NS, "web-b-6d8e7f9c5-m4q9z")?;
        let mut clients = BTreeMap::new();
        for (name, node, ns) in [
            ("mesh-1", 1, MESH_NS),
            ("mesh-2", 2, MESH_NS),
            ("direct-1", 1, PLAIN_NS),
            ("direct-2", 2, PLAIN_NS),
            ("flood-1", 1, MESH_NS),
        ] {
            clients.insert(name, cluster.add_pod(node, ns, &format!("{name}-7d9f8b6c5-b2n8w"))?);
        }
        let mut servers = Vec::new();
        for (pod, name) in [(&web_a, "web-a"), (&web_b, "web-b")] {
            servers.push(pod.spawn(
                backend_bin,
                &["0.0.0.0:8080".into(), "1024".into(), name.into()],
                &[],
                None,
            )?);
        }
        let iperf_log = cluster.dir().join("iperf3-server.log");
        servers.push(web_a.spawn(
            iperf3,
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
                relay_bin,
                &[format!("0.0.0.0:{RELAY_PORT}={http}"), format!("0.0.0.0:{RELAY_BULK_PORT}={bulk}")],
                &[],
                Some(&log),
            )?);
        }

        // The API server on node1's address, where both nodes' agents reach it.
        let api_addr: SocketAddr = API_SERVER.parse().expect("address");
        let server = cluster.node(1).run(|| ApiServer::start_on(api_addr, Duration::from_secs(1)))??;
        let kubeconfig = cluster.dir().join("kubeconfig");
        server.write_kubeconfig(&kubeconfig)?;
        server.apply_yaml(&objects(&cluster, &web_a, &web_b, &clients));
        let signer = Signer::start(agent_bin, &cluster.dir().join("signer"), &[])?;
        let args = AgentArgs {
            signer: Some(signer.access()),
            extra: vec!["--kubeconfig".to_owned(), kubeconfig.display().to_string()],
            rust_log: log_filter(),
            ..AgentArgs::default()
        };
        let mut agents = Vec::new();
        for node in cluster.nodes() {
            let agent = Agent::start(agent_bin, &cluster, node, &args)?;
            // web-l4, web, web-a, web-b, bulk and grpc.
            agent.wait_until(|s| s.frontends >= 6)?;
            agents.push(agent);
        }
        // mesh-1 and flood-1; mesh-2 (the backends are not enrolled).
        agents[0].wait_until(|s| s.enrolled.len() >= 2)?;
        agents[1].wait_until(|s| !s.enrolled.is_empty())?;
        // One message of 16 bytes behind gRPC's prefix (uncompressed, length).
        let grpc_body = cluster.dir().join("grpc-request.bin");
        std::fs::write(&grpc_body, [&[0u8, 0, 0, 0, 16][..], &[b'g'; 16]].concat())?;
        let world =
            World { clients: clients.clone(), web_a: web_a.clone(), relay: cluster.node(1).ip, grpc_body };
        // Warm-up: every path answers (and certificates are issued).
        for path in Lane::timed() {
            let (pod, url) = world.target(path);
            let load = oha(oha_bin, pod, &url, 1, None, Duration::from_millis(300))?;
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
        Ok(Self { agents, relays, servers, server, world, signer, args, _cluster: cluster })
    }

    pub(super) fn cluster(&self) -> &Cluster {
        &self._cluster
    }

    pub(super) fn agent_pids(&self) -> Vec<u32> {
        self.agents.iter().map(Agent::pid).collect()
    }

    pub(super) fn relay_pids(&self) -> Vec<u32> {
        self.relays.iter().map(Process::pid).collect()
    }

    /// The HTTP backends' pids (not iperf3's).
    pub(super) fn backend_pids(&self) -> Vec<u32> {
        self.servers[..2].iter().map(Process::pid).collect()
    }
}
