//! Privileged end-to-end tests: real network namespaces as nodes and pods, the real eBPF
//! programs loaded into this kernel by a real agent process. They need root; with
//! GAMMARAY_REQUIRE_PRIVILEGED=1 (CI) they fail instead of skipping.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use gammaray_agent::control::{Client, Status};
use gammaray_testkit::{
    Cluster, Pod,
    agent::{Agent, AgentArgs, block_on, generate_ca},
    assert_eventually,
    cluster::pod_gateway,
    echo::{self, EchoServer, Greeting},
    http::HttpClient,
    require_privileged,
    scenarios::{self, Canary},
};

const TIMEOUT: Duration = Duration::from_secs(10);
const SERVICE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// The agent binary cargo built for these tests.
fn agent_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_gammaray-agent"))
}

/// Starts a real agent on `node` with testkit's harness, logging the kernel's lines and the
/// proxy's HTTP decisions.
fn start_agent(cluster: &Cluster, node: u8, args: AgentArgs) -> Agent {
    let args =
        AgentArgs { rust_log: "info,gammaray::kernel=debug,gammaray_proxy::http=debug".into(), ..args };
    Agent::start(agent_bin(), cluster, cluster.node(node), &args).expect("the agent starts")
}

/// What the tests ask of a running agent over its control socket.
trait Control {
    fn control(&self) -> Client;
    fn status(&self) -> Status;
    fn enrol(&self, pod: &Pod);
    fn unenrol(&self, pod: &Pod);
}

impl Control for Agent {
    fn control(&self) -> Client {
        Client::new(&self.socket)
    }

    fn status(&self) -> Status {
        block_on(self.control().status()).expect("agent status")
    }

    fn enrol(&self, pod: &Pod) {
        block_on(self.control().enrol(&pod.netns_path())).expect("enrol pod");
    }

    fn unenrol(&self, pod: &Pod) {
        let r = block_on(self.control().unenrol(&pod.netns_path())).expect("unenrol pod");
        assert_eq!(r.was_enrolled, Some(true), "pod was enrolled");
    }
}

/// A backend pod answering on `SERVICE_VIP:80` and on its own IP at port 8080.
fn backend(cluster: &Cluster, node: u8, name: &str) -> (Arc<Pod>, Vec<EchoServer>) {
    let pod = cluster.add_pod(node, "demo", name).expect("backend pod");
    cluster.add_pod_address(&pod, SERVICE_VIP).expect("service address on backend");
    let servers = [SocketAddr::from((SERVICE_VIP, 80)), SocketAddr::from((pod.ip, 8080))]
        .into_iter()
        .map(|addr| {
            let listener = pod.run(|| std::net::TcpListener::bind(addr)).expect("enter pod").expect("bind");
            EchoServer::start(listener, name).expect("echo server")
        })
        .collect();
    (pod, servers)
}

fn call_from(pod: &Pod, dst: SocketAddr) -> Greeting {
    pod.run(|| echo::call(dst, TIMEOUT)).expect("enter pod").expect("call through the mesh")
}

/// Opens a connection and reads the greeting, keeping the connection open.
fn open_and_greet(dst: SocketAddr) -> (Greeting, TcpStream) {
    let conn = TcpStream::connect_timeout(&dst, TIMEOUT).expect("connect");
    conn.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut line = String::new();
    BufReader::new(conn.try_clone().expect("clone")).read_line(&mut line).expect("greeting");
    (Greeting::parse(line.trim()).expect("parse greeting"), conn)
}

#[test]
fn an_enrolled_pod_lands_on_the_proxy_which_recovers_the_exact_original_destination() {
    if !require_privileged("redirect") {
        return;
    }
    let cluster = Cluster::new(1).expect("cluster");
    let agent = start_agent(&cluster, 1, AgentArgs::default());
    let (_backend, _servers) = backend(&cluster, 1, "backend-v1");
    let client = cluster.add_pod(1, "demo", "client").expect("client pod");
    agent.enrol(&client);

    let dst = SocketAddr::from((SERVICE_VIP, 80));
    let greeting = call_from(&client, dst);
    assert_eq!(greeting.hostname, "backend-v1");
    assert_eq!(greeting.local, dst, "the proxy connected to the exact original destination");
    assert_eq!(
        greeting.peer.ip(),
        IpAddr::V4(pod_gateway(1)),
        "the backend saw the node proxy, not the client, so the connection went through it"
    );
    let status = agent.status();
    assert_eq!(status.proxy, agent.proxy);
    assert_eq!(status.kernel.redirected, 1);
    assert_eq!(status.kernel.lookup_misses, 0);
    assert_eq!(status.outbound.accepted, 1);
    assert_eq!(status.outbound.lookup_misses, 0);
}

#[test]
fn two_hundred_concurrent_connections_from_two_pods_all_find_their_destination() {
    if !require_privileged("concurrent") {
        return;
    }
    let cluster = Cluster::new(1).expect("cluster");
    let agent = start_agent(&cluster, 1, AgentArgs::default());
    // Two backends with ten ports each: twenty distinct original destinations.
    let mut servers = Vec::new();
    let mut destinations = Vec::new();
    for name in ["backend-a", "backend-b"] {
        let pod = cluster.add_pod(1, "demo", name).expect("backend pod");
        for port in 9000..9010 {
            let addr = SocketAddr::from((pod.ip, port));
            let listener = pod.run(|| std::net::TcpListener::bind(addr)).expect("enter").expect("bind");
            servers.push(EchoServer::start(listener, name).expect("echo"));
            destinations.push(addr);
        }
    }
    let clients: Vec<_> =
        ["client-a", "client-b"].iter().map(|n| cluster.add_pod(1, "demo", n).expect("client pod")).collect();
    for c in &clients {
        agent.enrol(c);
    }

    let all_open = std::sync::Barrier::new(clients.len());
    std::thread::scope(|scope| {
        for client in &clients {
            let destinations = destinations.clone();
            let all_open = &all_open;
            scope.spawn(move || {
                client
                    .run(|| {
                        // Open 100 connections at once (threads spawned here start in the pod's
                        // namespace), check each greeting, and hold them all open until the
                        // other pod has its 100 open too.
                        let conns: Vec<_> = std::thread::scope(|s| {
                            let handles: Vec<_> = (0..100)
                                .map(|i| {
                                    let dst = destinations[i % destinations.len()];
                                    s.spawn(move || (dst, open_and_greet(dst)))
                                })
                                .collect();
                            handles.into_iter().map(|h| h.join().expect("connection thread")).collect()
                        });
                        for (dst, (greeting, _)) in &conns {
                            assert_eq!(greeting.local, *dst, "original destination preserved");
                        }
                        all_open.wait();
                        drop(conns);
                    })
                    .expect("enter client pod");
            });
        }
    });

    let status = agent.status();
    assert_eq!(status.kernel.redirected, 200);
    assert_eq!(status.kernel.lookup_misses, 0, "kernel lookup misses");
    assert_eq!(status.kernel.errors, 0);
    assert_eq!(status.outbound.accepted, 200);
    assert_eq!(status.outbound.lookup_misses, 0, "proxy lookup misses");
}

#[test]
fn unenrolled_pods_node_processes_and_the_proxys_own_connections_are_not_redirected() {
    if !require_privileged("not-redirected") {
        return;
    }
    let cluster = Cluster::new(1).expect("cluster");
    let agent = start_agent(&cluster, 1, AgentArgs::default());
    let (backend, _servers) = backend(&cluster, 1, "backend-v1");
    let outsider = cluster.add_pod(1, "other", "unenrolled").expect("unenrolled pod");
    let member = cluster.add_pod(1, "demo", "enrolled").expect("enrolled pod");
    agent.enrol(&member);
    let dst = SocketAddr::from((backend.ip, 8080));

    let direct = call_from(&outsider, dst);
    assert_eq!(direct.peer.ip(), IpAddr::V4(outsider.ip), "unenrolled pod connects directly");

    let node = cluster.node(1);
    let from_node = node.run(|| echo::call(dst, TIMEOUT)).expect("enter node").expect("node call");
    assert_eq!(from_node.peer.ip(), IpAddr::V4(pod_gateway(1)), "node process connects directly");
    assert_eq!(agent.status().kernel.redirected, 0, "nothing redirected so far");

    let meshed = call_from(&member, dst);
    assert_eq!(meshed.local, dst);
    let status = agent.status();
    // Had the proxy's own connection to the backend been redirected too, it would have looped
    // back into the proxy and counted twice.
    assert_eq!(status.kernel.redirected, 1, "only the enrolled pod's connection");
    assert_eq!(status.outbound.accepted, 1);
    assert_eq!(status.outbound.upstream_errors, 0);
}

#[test]
fn enrolling_and_unenrolling_a_running_pod_moves_its_next_connection() {
    if !require_privileged("enrol-unenrol") {
        return;
    }
    let cluster = Cluster::new(1).expect("cluster");
    let agent = start_agent(&cluster, 1, AgentArgs::default());
    let (backend, _servers) = backend(&cluster, 1, "backend-v1");
    let pod = cluster.add_pod(1, "demo", "client").expect("client pod");
    let dst = SocketAddr::from((backend.ip, 8080));

    assert_eq!(call_from(&pod, dst).peer.ip(), IpAddr::V4(pod.ip), "direct before enrolment");
    agent.enrol(&pod);
    assert_eq!(call_from(&pod, dst).peer.ip(), IpAddr::V4(pod_gateway(1)), "via the proxy once enrolled");

    // A connection opened while enrolled survives unenrolment.
    let (_, mut open) = pod.run(|| open_and_greet(dst)).expect("enter pod");
    agent.unenrol(&pod);
    assert_eq!(call_from(&pod, dst).peer.ip(), IpAddr::V4(pod.ip), "direct again after unenrolment");
    open.write_all(b"still here\n").expect("write on the old connection");
    let mut buf = [0u8; 11];
    open.read_exact(&mut buf).expect("the old connection still echoes");
    assert_eq!(&buf, b"still here\n");
    assert_eq!(agent.status().kernel.redirected, 2);
}

#[test]
fn the_kernel_programs_log_lines_appear_in_the_agent_log() {
    if !require_privileged("aya-log") {
        return;
    }
    let cluster = Cluster::new(1).expect("cluster");
    let agent = start_agent(&cluster, 1, AgentArgs::default());
    let (_backend, _servers) = backend(&cluster, 1, "backend-v1");
    let client = cluster.add_pod(1, "demo", "client").expect("client pod");
    agent.enrol(&client);
    call_from(&client, SocketAddr::from((SERVICE_VIP, 80)));
    let expected = format!("dst={SERVICE_VIP}:80 proxy={}", agent.proxy);
    assert_eventually("the redirect's kernel log line reaches the agent log", TIMEOUT, || {
        let log = agent.log_text();
        log.lines()
            .find(|l| l.contains("gammaray::kernel") && l.contains("redirect pid=") && l.contains(&expected))
            .map(str::to_owned)
            .ok_or_else(|| format!("no line with {expected:?} in:\n{log}"))
    });
}

#[test]
fn a_missing_privilege_is_named() {
    if !require_privileged("missing-privilege") {
        return;
    }
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"])
        .arg(env!("CARGO_BIN_EXE_gammaray-agent"))
        .args(["--control", "/tmp/gammaray-never.sock", "run", "--node", "n", "--proxy-addr", "127.0.0.1:1"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run agent without privileges");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("missing privilege: CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN"), "{stderr}");
}

/// `GAMMARAY_LOG_JSON` takes the words its documentation gives (`1` among them) and names
/// anything else as an error. Needs no privilege: `status` parses the command line, then fails
/// on a control socket that does not exist.
#[test]
fn the_log_json_variable_takes_the_usual_boolean_words() {
    let status = |value: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gammaray-agent"))
            .args(["--control", "/tmp/gammaray-never.sock", "status"])
            .env("GAMMARAY_LOG_JSON", value)
            .output()
            .expect("run the agent's status command");
        assert!(!out.status.success(), "{value}: there is no agent to ask");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    for value in ["1", "true", "yes", "on", "0", "false", "no", "off"] {
        let stderr = status(value);
        assert!(stderr.contains("cannot reach the agent's control socket"), "{value}: {stderr}");
    }
    let stderr = status("maybe");
    assert!(stderr.contains("invalid value 'maybe' for '--log-json'"), "{stderr}");
}

#[test]
fn nothing_is_left_behind() {
    if !require_privileged("clean-up") {
        return;
    }
    let (run, links) = {
        let cluster = Cluster::new(2).expect("cluster");
        let mut agent = start_agent(&cluster, 1, AgentArgs::default());
        let (_backend, _servers) = backend(&cluster, 2, "backend-v1");
        let client = cluster.add_pod(1, "demo", "client").expect("client pod");
        agent.enrol(&client);
        let greeting = call_from(&client, SocketAddr::from((SERVICE_VIP, 80)));
        assert_eq!(greeting.hostname, "backend-v1", "reached the backend on the other node");
        let links = agent.status().attachment.link_ids;
        assert_eq!(links.len(), 2, "connect4 and sockops links");
        let exit = agent.stop(TIMEOUT).expect("agent exit status");
        assert!(exit.success(), "agent exits cleanly on SIGTERM: {exit:?}\n{}", agent.log_text());
        (cluster.run_name().to_owned(), links)
    };
    let left = gammaray_testkit::sweep::leftovers(&run);
    assert!(left.is_empty(), "left behind: {left:?}");
    let live: Vec<u32> = aya::programs::loaded_links().filter_map(Result::ok).map(|l| l.id()).collect();
    for id in links {
        assert!(!live.contains(&id), "BPF link {id} still attached");
    }
}

/// Writes `text` to `path` atomically, as a config management tool would.
fn write_manifest(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write manifest");
    std::fs::rename(&tmp, path).expect("replace manifest");
}

/// Sends `n` GETs on one keep-alive connection from `pod` to the canary Service and counts
/// the versions that answered; every request must succeed.
fn canary_split(pod: &Pod, n: usize) -> std::collections::BTreeMap<String, usize> {
    pod.run(|| {
        let mut client =
            HttpClient::connect(SocketAddr::from((scenarios::BACKEND_VIP, 80)), "backend", TIMEOUT)
                .expect("connect to the backend Service");
        let mut counts = std::collections::BTreeMap::new();
        for i in 0..n {
            let reply = client.get("/", &[]).unwrap_or_else(|e| panic!("request {i}: {e}"));
            assert_eq!(reply.status, 200, "request {i}: {}", reply.body);
            *counts.entry(reply.fields["message"].clone()).or_insert(0) += 1;
        }
        counts
    })
    .expect("enter client pod")
}

#[test]
fn a_90_10_canary_through_real_agents_splits_and_follows_a_weight_change() {
    if !require_privileged("canary") {
        return;
    }
    let mesh = CanaryMesh::start(&Canary::route(90, 10), &[1, 2]);
    let (canary, dir, agent, agent2) = (&mesh.canary, &mesh.dir, mesh.agent(1), mesh.agent(2));

    let counts = canary_split(&canary.client, 1000);
    let v2 = counts.get("hello from backend v2").copied().unwrap_or(0);
    assert!((70..=130).contains(&v2), "10% ± 3 to v2, got {counts:?}");
    // Every backend pod, on both nodes, took part.
    for (pod, server) in &canary.backends {
        assert!(server.served() > 0 || pod.name.starts_with("backend-v2"), "{} served nothing", pod.name);
    }
    let status = agent.status();
    assert_eq!(status.kernel.redirected, 1, "one keep-alive connection, redirected once");
    assert_eq!(status.outbound.requests, 1000);
    assert!(status.outbound.hbone_tunnels > 0, "requests to node2's pods went through HBONE");
    // The admin endpoint: health, readiness, and the metrics of what just happened.
    let admin = SocketAddr::from((mesh.cluster.node(1).ip, 15021));
    let (health, ready, metrics, dump) = mesh
        .cluster
        .node(1)
        .run(|| {
            let mut c = HttpClient::connect(admin, "admin", TIMEOUT).expect("admin endpoint");
            (
                c.get("/healthz", &[]).expect("healthz"),
                c.get("/readyz", &[]).expect("readyz"),
                c.get("/metrics", &[]).expect("metrics"),
                c.get("/config_dump", &[]).expect("config_dump"),
            )
        })
        .expect("enter node1");
    let dump: serde_json::Value = serde_json::from_str(&dump.body).expect("config_dump is JSON");
    assert!(dump["services"]["demo/backend"].as_str().is_some_and(|d| d.contains("backend-v2")), "{dump}");
    assert!(dump["routeStatuses"].as_array().is_some_and(|r| !r.is_empty()), "{dump}");
    assert_eq!(dump["status"]["node"], "node1");
    assert_eq!((health.status, ready.status), (200, 200), "{}", ready.body);
    for needle in [
        "gammaray_redirects_total 1",
        "gammaray_hbone_tunnels_total ",
        "gammaray_certificate_expiry_timestamp_seconds ",
        "gammaray_requests_total{source_workload=\"demo/client\",destination_service=\"demo/backend:80\",backend=\"demo/backend-v2:80\",response_code=\"200\"}",
    ] {
        assert!(metrics.body.contains(needle), "missing {needle} in:\n{}", metrics.body);
    }
    assert!(agent2.status().outbound.inbound_tunnels > 0);

    // Shift to 50/50 while requests flow: none fails, and the new split takes over.
    let before = status.config_version;
    let control = agent.control();
    let shifter = std::thread::spawn({
        let path = dir.join("route.yaml");
        move || {
            std::thread::sleep(Duration::from_millis(200));
            write_manifest(&path, &Canary::route(50, 50));
            // How long until the proxy routes by the new weights (measured, not asserted).
            let written = std::time::Instant::now();
            while block_on(control.status()).map(|s| s.config_version).unwrap_or(0) <= before
                && written.elapsed() < Duration::from_secs(10)
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            eprintln!("weight change in force {:?} after the manifest was written", written.elapsed());
        }
    });
    let during = canary_split(&canary.client, 600);
    shifter.join().expect("shifter");
    assert_eq!(during.values().sum::<usize>(), 600, "no request failed across the change");
    assert_eventually("the new weights are applied", TIMEOUT, || {
        let v = agent.status().config_version;
        (v > before).then_some(v).ok_or(format!("still version {v}"))
    });
    let after = canary_split(&canary.client, 1000);
    let v2 = after.get("hello from backend v2").copied().unwrap_or(0);
    assert!((430..=570).contains(&v2), "50% ± 7 to v2 after the change, got {after:?}");
}

/// The canary world on two nodes, agents on `nodes` routing by a manifest directory (the
/// world's objects plus `route`), mTLS between nodes, the client enrolled when node 1 has an
/// agent. Fields drop in order: agents, backends, then the cluster.
struct CanaryMesh {
    agents: Vec<(u8, Agent)>,
    canary: Canary,
    dir: PathBuf,
    ca: PathBuf,
    cluster: Cluster,
}

impl CanaryMesh {
    fn start(route: &str, nodes: &[u8]) -> Self {
        let cluster = Cluster::new(2).expect("cluster");
        let canary = Canary::build(&cluster).expect("canary world");
        let dir = cluster.dir().join("manifests");
        let ca = cluster.dir().join("ca");
        std::fs::create_dir_all(&dir).expect("manifest dir");
        generate_ca(agent_bin(), &ca).expect("a mesh CA");
        std::fs::write(dir.join("objects.yaml"), &canary.objects).expect("objects");
        write_manifest(&dir.join("route.yaml"), route);
        let agents: Vec<(u8, Agent)> = nodes
            .iter()
            .map(|&n| {
                let args =
                    AgentArgs { manifests: Some(dir.clone()), ca: Some(ca.clone()), ..AgentArgs::default() };
                (n, start_agent(&cluster, n, args))
            })
            .collect();
        for (n, agent) in &agents {
            assert_eventually(&format!("node{n} routes by the manifests"), TIMEOUT, || {
                let st = agent.status();
                (st.frontends >= 3).then_some(()).ok_or(format!("{st:?}"))
            });
            if *n == 1 {
                agent.enrol(&canary.client);
            }
        }
        Self { agents, canary, dir, ca, cluster }
    }

    fn agent(&self, node: u8) -> &Agent {
        &self.agents.iter().find(|(n, _)| *n == node).expect("an agent on that node").1
    }
}

/// Captures every frame crossing the fabric bridge namespace while `f` runs.
fn capture_fabric<T>(cluster: &Cluster, f: impl FnOnce() -> T) -> (T, Vec<u8>) {
    use nix::sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType, socket};
    let fabric = gammaray_testkit::netns::Netns::existing(&format!("{}-fabric", cluster.run_name()));
    let sock = fabric
        .run(|| socket(AddressFamily::Packet, SockType::Raw, SockFlag::SOCK_NONBLOCK, SockProtocol::EthAll))
        .expect("enter fabric")
        .expect("packet socket (needs CAP_NET_RAW)");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = std::thread::spawn({
        let stop = stop.clone();
        move || {
            let mut captured = Vec::new();
            let mut buf = vec![0u8; 65536];
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while std::time::Instant::now() < deadline {
                match nix::unistd::read(&sock, &mut buf) {
                    Ok(n) => captured.extend_from_slice(&buf[..n]),
                    Err(nix::errno::Errno::EAGAIN) => {
                        if stop.load(std::sync::atomic::Ordering::Relaxed) {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(e) => panic!("capture: {e}"),
                }
            }
            captured
        }
    });
    let result = f();
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    (result, reader.join().expect("capture thread"))
}

#[test]
fn between_nodes_traffic_is_mutual_tls_with_spiffe_identities() {
    if !require_privileged("mtls") {
        return;
    }
    let mesh = CanaryMesh::start(&Canary::route(50, 50), &[1, 2]);
    let (cluster, canary, node1, node2) = (&mesh.cluster, &mesh.canary, mesh.agent(1), mesh.agent(2));

    const MARKER: &str = "plaintext-marker-7f3a91";
    let (counts, wire) = capture_fabric(cluster, || {
        canary
            .client
            .run(|| {
                let mut client =
                    HttpClient::connect(SocketAddr::from((scenarios::BACKEND_VIP, 80)), "backend", TIMEOUT)
                        .expect("connect");
                let mut counts = std::collections::BTreeMap::<String, usize>::new();
                for i in 0..200 {
                    let reply = client
                        .get("/", &[("x-secret", MARKER)])
                        .unwrap_or_else(|e| panic!("request {i}: {e}"));
                    assert_eq!(reply.status, 200, "{}", reply.body);
                    assert_eq!(reply.fields.get("header:x-secret").map(String::as_str), Some(MARKER));
                    *counts.entry(reply.fields["hostname"].clone()).or_default() += 1;
                }
                counts
            })
            .expect("enter client pod")
    });
    assert!(
        counts.keys().any(|h| canary.backends.iter().any(|(p, _)| &p.name == h && p.node == "node2")),
        "some requests crossed to node2: {counts:?}"
    );
    assert!(wire.len() > 1000, "the capture saw traffic between the nodes ({} bytes)", wire.len());
    assert!(
        !wire.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
        "the request's plaintext crossed the wire between nodes"
    );
    // TLS 1.3 application data records on the wire.
    assert!(wire.windows(3).any(|w| w == [0x17, 0x03, 0x03]), "TLS records between the nodes");

    let st1 = node1.status();
    assert!(st1.outbound.hbone_tunnels > 0, "node1 tunnelled: {:?}", st1.outbound);
    let st2 = node2.status();
    assert!(st2.outbound.inbound_tunnels > 0, "node2 accepted tunnels: {:?}", st2.outbound);
    assert_eventually("node2 logs the client's SPIFFE identity", TIMEOUT, || {
        let log = node2.log_text();
        log.lines()
            .find(|l| {
                l.contains("inbound") && l.contains("src_identity=spiffe://cluster.local/ns/demo/sa/client")
            })
            .map(str::to_owned)
            .ok_or_else(|| format!("no inbound line with the client identity in:\n{log}"))
    });

    // A certificate from another CA is refused at the handshake, and counted.
    let rogue = gammaray_proxy::identity::Authority::generate("cluster.local").expect("rogue CA");
    let cert = rogue
        .issue(&"spiffe://cluster.local/ns/demo/sa/client".parse().expect("identity"))
        .expect("rogue cert");
    let expected: gammaray_proxy::identity::Identity =
        "spiffe://cluster.local/ns/demo/sa/backend-v1".parse().expect("identity");
    let config =
        gammaray_proxy::identity::client_config(std::sync::Arc::new(rogue.roots()), &cert, expected.clone())
            .expect("config");
    let node2_addr = SocketAddr::from((cluster.node(2).ip, 15008));
    let refused = cluster
        .node(1)
        .run(|| {
            block_on(async {
                let tcp = tokio::net::TcpStream::connect(node2_addr).await.expect("reach node2");
                let name = rustls::pki_types::ServerName::try_from(expected.server_name()).expect("name");
                tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
                    .connect(name, tcp)
                    .await
                    .is_err()
            })
        })
        .expect("enter node1");
    assert!(refused, "a handshake with a certificate from another CA fails");
    assert_eventually("node2 counts the refused handshake", TIMEOUT, || {
        let n = node2.status().outbound.tls_refused;
        (n > 0).then_some(n).ok_or("no refusal counted".to_owned())
    });
}

/// Opaque TCP to a pod on another node goes through both nodes' tunnel relays: a 3 MiB stream
/// must arrive whole, the client's end (a half-close) must reach the pod while the way back is
/// still open, and the answer must come back whole after it.
#[test]
fn a_tcp_stream_to_a_pod_on_another_node_arrives_whole_and_its_half_close_passes_through() {
    if !require_privileged("tcp through the tunnel") {
        return;
    }
    const PORT: u16 = 9100;
    let mesh = CanaryMesh::start(&Canary::route(50, 50), &[1, 2]);
    let (node1, node2) = (mesh.agent(1), mesh.agent(2));
    let (pod, _) = mesh.canary.backends.iter().find(|(p, _)| p.node == "node2").expect("a backend on node2");
    let listener = pod.run(|| std::net::TcpListener::bind((pod.ip, PORT))).expect("enter pod").expect("bind");
    listener.set_nonblocking(true).expect("non-blocking accept");
    // The pod reads to the client's end, then answers with what it got, reversed.
    let server = std::thread::spawn(move || -> Result<usize, String> {
        let deadline = std::time::Instant::now() + TIMEOUT;
        let mut conn = loop {
            match listener.accept() {
                Ok((conn, _)) => break conn,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => return Err(format!("no connection reached the pod: {e}")),
            }
        };
        conn.set_nonblocking(false).map_err(|e| e.to_string())?;
        conn.set_read_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
        let mut got = Vec::new();
        conn.read_to_end(&mut got).map_err(|e| format!("reading to the client's end: {e}"))?;
        got.reverse();
        conn.write_all(&got).map_err(|e| format!("answering after the client's end: {e}"))?;
        Ok(got.len())
    });
    let data: Vec<u8> = (0..3usize << 20).map(|i| (i % 251) as u8).collect();
    let answer = mesh
        .canary
        .client
        .run(|| -> std::io::Result<Vec<u8>> {
            let mut conn = TcpStream::connect_timeout(&SocketAddr::from((pod.ip, PORT)), TIMEOUT)?;
            conn.set_read_timeout(Some(TIMEOUT))?;
            conn.set_write_timeout(Some(TIMEOUT))?;
            conn.write_all(&data)?;
            conn.shutdown(std::net::Shutdown::Write)?;
            let mut answer = Vec::new();
            conn.read_to_end(&mut answer)?;
            Ok(answer)
        })
        .expect("enter client pod")
        .expect("send, end, and read the answer to its end");
    let at_pod = server.join().expect("pod thread").expect("the pod's side");
    assert_eq!(at_pod, data.len(), "the pod got all the client sent");
    assert_eq!(answer.len(), data.len(), "the client got the whole answer");
    assert!(answer.iter().rev().eq(data.iter()), "the answer is the data reversed, byte for byte");
    // This is the only L4 connection through node1, so its counts are exact: a relay that
    // counted a byte twice, or lost one, shows here.
    assert_eventually("node1 counts the tunnelled bytes both ways, exactly", TIMEOUT, || {
        let o = node1.status().outbound;
        (o.hbone_tunnels > 0 && o.bytes_sent == data.len() as u64 && o.bytes_received == data.len() as u64)
            .then_some(())
            .ok_or(format!("{o:?}"))
    });
    assert!(node2.status().outbound.inbound_tunnels > 0, "node2 accepted the tunnel");
}

#[test]
fn header_routing_adds_a_header_only_on_matched_requests() {
    if !require_privileged("header-routing") {
        return;
    }
    let route = "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: reviews, namespace: demo}\nspec:\n  parentRefs: [{group: '', kind: Service, name: backend, port: 80}]\n  rules:\n  - matches: [{headers: [{name: x-user, value: tester}]}]\n    filters: [{type: RequestHeaderModifier, requestHeaderModifier: {add: [{name: x-canary, value: 'true'}]}}]\n    backendRefs: [{name: backend-v2, port: 80}]\n  - backendRefs: [{name: backend-v1, port: 80}]\n";
    let mesh = CanaryMesh::start(route, &[1, 2]);
    let canary = &mesh.canary;
    canary
        .client
        .run(|| {
            let mut c =
                HttpClient::connect(SocketAddr::from((scenarios::BACKEND_VIP, 80)), "backend", TIMEOUT)
                    .expect("connect");
            for i in 0..40 {
                let tester = i % 2 == 0;
                let headers: &[(&str, &str)] =
                    if tester { &[("x-user", "tester")] } else { &[("x-user", "someone")] };
                let reply = c.get("/reviews/1", headers).expect("request");
                assert_eq!(reply.status, 200, "{}", reply.body);
                if tester {
                    assert_eq!(reply.fields["message"], "hello from backend v2");
                    assert_eq!(reply.fields.get("header:x-canary").map(String::as_str), Some("true"));
                } else {
                    assert_eq!(reply.fields["message"], "hello from backend v1");
                    assert!(!reply.fields.contains_key("header:x-canary"), "no header on unmatched requests");
                }
            }
        })
        .expect("enter client pod");
}

#[test]
fn an_expired_certificate_and_a_wrong_identity_are_refused_by_a_real_node() {
    if !require_privileged("refusals") {
        return;
    }
    use gammaray_proxy::identity::{Authority, Identity, client_config};
    let mesh = CanaryMesh::start("", &[2]);
    let (cluster, ca_dir, node2) = (&mesh.cluster, &mesh.ca, mesh.agent(2));
    let read = |f: &str| std::fs::read_to_string(ca_dir.join(f)).expect("CA file");
    let ca = Authority::from_pem(&read("ca.crt"), &read("ca.key")).expect("the mesh CA");
    let client: Identity = "spiffe://cluster.local/ns/demo/sa/client".parse().expect("identity");
    let backend: Identity = "spiffe://cluster.local/ns/demo/sa/backend-v1".parse().expect("identity");
    let node2_addr = SocketAddr::from((cluster.node(2).ip, 15008));
    let attempt = |config: rustls::ClientConfig, sni: &Identity| -> Result<(), String> {
        let name = rustls::pki_types::ServerName::try_from(sni.server_name()).expect("name");
        cluster
            .node(1)
            .run(|| {
                block_on(async {
                    let tcp = tokio::net::TcpStream::connect(node2_addr).await.map_err(|e| e.to_string())?;
                    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
                        .connect(name, tcp)
                        .await
                        .map_err(|e| e.to_string())?;
                    // TLS 1.3 reports a refused client certificate on the first read.
                    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.map_err(|e| e.to_string())?;
                    let mut buf = [0u8; 64];
                    match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => Ok(()),
                        Ok(Ok(_)) => Err("closed".to_owned()),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("no answer".to_owned()),
                    }
                })
            })
            .expect("enter node1")
    };
    let roots = std::sync::Arc::new(ca.roots());
    let good = ca.issue(&client).expect("cert");
    attempt(client_config(roots.clone(), &good, backend.clone()).expect("config"), &backend)
        .expect("a valid certificate from the mesh CA is accepted");

    let expired = ca
        .issue_at(
            &client,
            std::time::SystemTime::now() - Duration::from_secs(3 * 86400),
            Duration::from_secs(3600),
        )
        .expect("expired cert");
    let err = attempt(client_config(roots.clone(), &expired, backend.clone()).expect("config"), &backend)
        .expect_err("an expired client certificate is refused");
    eprintln!("expired: {err}");

    // The node presents backend-v1's certificate; a client expecting backend-v2 refuses it.
    let v2: Identity = "spiffe://cluster.local/ns/demo/sa/backend-v2".parse().expect("identity");
    let err = attempt(client_config(roots, &good, v2).expect("config"), &backend)
        .expect_err("a server with the wrong identity is refused");
    assert!(err.contains("IdentityMismatch"), "{err}");
    assert_eventually("node2 counts the refused handshakes", TIMEOUT, || {
        let n = node2.status().outbound.tls_refused;
        (n >= 2).then_some(n).ok_or(format!("{n} refusals counted"))
    });
}

/// The Namespace `shop`, labelled for the mesh or not.
fn shop_namespace(ambient: bool) -> String {
    let labels = if ambient { "{gammaray.dev/dataplane-mode: ambient}" } else { "{}" };
    format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {labels}}}\n")
}

#[test]
fn labelling_a_namespace_on_the_api_server_enrols_its_pods_and_removing_it_unenrols_them() {
    if !require_privileged("label enrolment") {
        return;
    }
    use gammaray_testkit::{apiserver::ApiServer, objects};
    let cluster = Cluster::new(1).expect("cluster");
    // The API server listens on the node's loopback, where the agent (host network) reaches it.
    let server = cluster.node(1).run(ApiServer::start).expect("enter node").expect("fake API server");
    let kubeconfig = cluster.dir().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let client = cluster.add_pod(1, "shop", "client-7d9f8b6c5d-x7k2p").expect("client pod");
    let backend = cluster.add_pod(1, "shop", "backend-5c7d8f9b6d-m4q9z").expect("backend pod");
    let listener = backend
        .run(|| std::net::TcpListener::bind((backend.ip, 8080)))
        .expect("enter backend")
        .expect("bind");
    let _server_echo = EchoServer::start(listener, "backend").expect("echo");
    server.apply_yaml(&shop_namespace(false));
    server.apply_yaml(&objects::node("node1", cluster.node(1).ip));
    server.apply_yaml(&objects::pod(&client, &[("app", "client")]));
    server.apply_yaml(&objects::pod(&backend, &[("app", "backend")]));
    // A pod in a namespace that is never labelled: once the enroller has acted on the label, it
    // must still be left out (a negative check made after positive evidence the enroller ran).
    let bystander = cluster.add_pod(1, "plain", "bystander-6b8f9c7d5f-r5t1c").expect("bystander pod");
    server.apply_yaml("apiVersion: v1\nkind: Namespace\nmetadata: {name: plain}\n");
    server.apply_yaml(&objects::pod(&bystander, &[("app", "bystander")]));

    let extra =
        vec!["--kubeconfig".into(), kubeconfig.display().to_string(), "--ca-secret".into(), String::new()];
    let agent = start_agent(&cluster, 1, AgentArgs { extra, ..AgentArgs::default() });
    assert_eventually("the agent applies the cluster's objects", TIMEOUT, || {
        let st = agent.status();
        (st.config_version > 0).then_some(()).ok_or(format!("config v{}", st.config_version))
    });
    assert!(agent.status().enrolled.is_empty(), "nothing enrolled while the namespace is not labelled");
    let dst = SocketAddr::from((backend.ip, 8080));
    assert_eq!(call_from(&client, dst).peer.ip(), IpAddr::V4(client.ip), "not steered before the label");

    let cookie = |pod: &Pod| gammaray_agent::netns::cookie_of(&pod.netns_path()).expect("netns cookie");
    let (client_cookie, backend_cookie) = (cookie(&client), cookie(&backend));
    let labelled = std::time::Instant::now();
    server.apply_yaml(&shop_namespace(true));
    assert_eventually("labelling the namespace enrols both pods", TIMEOUT, || {
        let enrolled = agent.status().enrolled;
        (enrolled.contains(&client_cookie) && enrolled.contains(&backend_cookie))
            .then_some(())
            .ok_or(format!("enrolled {enrolled:?}"))
    });
    println!("enrolled {:?} after the label was added", labelled.elapsed());
    assert!(
        !agent.status().enrolled.contains(&cookie(&bystander)),
        "a pod of an unlabelled namespace is not enrolled"
    );
    let greeting = call_from(&client, dst);
    assert_eq!(greeting.peer.ip(), IpAddr::V4(pod_gateway(1)), "the new connection went through the proxy");
    // A connection made while enrolled.
    let (open, mut conn) = client.run(|| open_and_greet(dst)).expect("enter client");
    assert_eq!(open.peer.ip(), IpAddr::V4(pod_gateway(1)));

    // The pod's own label opts it out.
    server.apply_yaml(&objects::pod(&client, &[("app", "client"), ("gammaray.dev/dataplane-mode", "none")]));
    assert_eventually("the opted-out pod leaves", TIMEOUT, || {
        let enrolled = agent.status().enrolled;
        (!enrolled.contains(&client_cookie) && enrolled.contains(&backend_cookie))
            .then_some(())
            .ok_or(format!("enrolled {enrolled:?}"))
    });
    server.apply_yaml(&objects::pod(&client, &[("app", "client")]));

    let unlabelled = std::time::Instant::now();
    server.apply_yaml(&shop_namespace(false));
    assert_eventually("removing the label unenrols both pods", TIMEOUT, || {
        let enrolled = agent.status().enrolled;
        enrolled.is_empty().then_some(()).ok_or(format!("enrolled {enrolled:?}"))
    });
    println!("unenrolled {:?} after the label was removed", unlabelled.elapsed());
    assert_eq!(call_from(&client, dst).peer.ip(), IpAddr::V4(client.ip), "direct again");
    // The connection made while enrolled still works: enrolment never touches open connections.
    conn.write_all(b"still here\n").expect("write on the old connection");
    let mut echoed = String::new();
    BufReader::new(&mut conn).read_line(&mut echoed).expect("read on the old connection");
    assert_eq!(echoed, "still here\n");

    // A deleted pod is unenrolled too (its namespace labelled again first).
    server.apply_yaml(&shop_namespace(true));
    assert_eventually("enrolled again", TIMEOUT, || {
        (agent.status().enrolled.len() == 2).then_some(()).ok_or("not yet".to_owned())
    });
    server.delete("v1", "Pod", "shop", &backend.name);
    assert_eventually("a deleted pod is unenrolled", TIMEOUT, || {
        let enrolled = agent.status().enrolled;
        (enrolled == vec![client_cookie]).then_some(()).ok_or(format!("enrolled {enrolled:?}"))
    });
}
