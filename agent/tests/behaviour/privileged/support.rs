//! What the privileged tests share: starting real agents with testkit's harness, talking to
//! them over their control socket, backends, the canary world.

use std::{
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use gammaray_agent::control::{Client, Status};
use gammaray_testkit::{
    Cluster, Pod,
    agent::{Agent, AgentArgs, block_on},
    assert_eventually,
    echo::{self, EchoServer, Greeting},
    http::HttpClient,
    scenarios::{self, Canary},
    signer::Signer,
};

pub const TIMEOUT: Duration = Duration::from_secs(10);
pub const SERVICE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// The agent binary cargo built for these tests.
pub fn agent_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_gammaray-agent"))
}

/// Starts a real agent on `node` with testkit's harness, logging the kernel's lines and the
/// proxy's HTTP decisions.
pub fn start_agent(cluster: &Cluster, node: u8, args: AgentArgs) -> Agent {
    let args =
        AgentArgs { rust_log: "info,gammaray::kernel=debug,gammaray_proxy::http=debug".into(), ..args };
    Agent::start(agent_bin(), cluster, cluster.node(node), &args).expect("the agent starts")
}

/// What the tests ask of a running agent over its control socket.
pub trait Control {
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
pub fn backend(cluster: &Cluster, node: u8, name: &str) -> (Arc<Pod>, Vec<EchoServer>) {
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

/// Whether `pod`'s GET of `dst` (HTTP on a pod's address) is answered 200.
pub fn answered_from(pod: &Pod, dst: SocketAddr) -> bool {
    pod.run(|| HttpClient::connect(dst, "backend", TIMEOUT).and_then(|mut c| c.get("/", &[])))
        .expect("enter the pod")
        .is_ok_and(|r| r.status == 200)
}

pub fn call_from(pod: &Pod, dst: SocketAddr) -> Greeting {
    pod.run(|| echo::call(dst, TIMEOUT)).expect("enter pod").expect("call through the mesh")
}

/// Opens a connection and reads the greeting, keeping the connection open.
pub fn open_and_greet(dst: SocketAddr) -> (Greeting, TcpStream) {
    let conn = TcpStream::connect_timeout(&dst, TIMEOUT).expect("connect");
    conn.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut line = String::new();
    BufReader::new(conn.try_clone().expect("clone")).read_line(&mut line).expect("greeting");
    (Greeting::parse(line.trim()).expect("parse greeting"), conn)
}

/// Writes `text` to `path` atomically, as a config management tool would.
pub fn write_manifest(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write manifest");
    std::fs::rename(&tmp, path).expect("replace manifest");
}

/// Sends `n` GETs on one keep-alive connection from `pod` to the canary Service and counts
/// the versions that answered; every request must succeed.
pub fn canary_split(pod: &Pod, n: usize) -> std::collections::BTreeMap<String, usize> {
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

/// The canary world on two nodes, agents on `nodes` routing by a manifest directory (the
/// world's objects plus `route`), mTLS between nodes by node CAs from a local signer, the
/// client enrolled when node 1 has an agent. Fields drop in order: agents, backends, the
/// signer, then the cluster.
pub struct CanaryMesh {
    pub agents: Vec<(u8, Agent)>,
    pub canary: Canary,
    pub dir: PathBuf,
    pub signer: Signer,
    pub cluster: Cluster,
}

impl CanaryMesh {
    pub fn start(route: &str, nodes: &[u8]) -> Self {
        Self::start_with(route, nodes, AgentArgs::default())
    }

    /// [`CanaryMesh::start`] with agents started with `args` (manifests and signer filled in).
    pub fn start_with(route: &str, nodes: &[u8], args: AgentArgs) -> Self {
        Self::start_signed(route, nodes, args, &[])
    }

    /// [`CanaryMesh::start_with`], the signer started with `signer_args` of `ca serve`.
    pub fn start_signed(route: &str, nodes: &[u8], args: AgentArgs, signer_args: &[String]) -> Self {
        let cluster = Cluster::new(2).expect("cluster");
        let canary = Canary::build(&cluster).expect("canary world");
        let dir = cluster.dir().join("manifests");
        std::fs::create_dir_all(&dir).expect("manifest dir");
        let signer =
            Signer::start(agent_bin(), &cluster.dir().join("signer"), signer_args).expect("a signer");
        std::fs::write(dir.join("objects.yaml"), &canary.objects).expect("objects");
        write_manifest(&dir.join("route.yaml"), route);
        let agents: Vec<(u8, Agent)> = nodes
            .iter()
            .map(|&n| {
                let args =
                    AgentArgs { manifests: Some(dir.clone()), signer: Some(signer.access()), ..args.clone() };
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
        Self { agents, canary, dir, signer, cluster }
    }

    pub fn agent(&self, node: u8) -> &Agent {
        &self.agents.iter().find(|(n, _)| *n == node).expect("an agent on that node").1
    }
}

/// An L4 stream from the client pod on node1 to a backend pod on node2 (through node1's proxy
/// and HBONE), to an echo server on `port` there: the stream, its destination and the server.
pub fn open_stream(mesh: &CanaryMesh, port: u16) -> (TcpStream, SocketAddr, EchoServer) {
    stream_to(mesh, &mesh.canary.client, "node2", port)
}

/// A stream from `from` to an echo server on `port` of a backend pod on `node`, greeted: the
/// stream, its destination and the server.
pub fn stream_to(
    mesh: &CanaryMesh,
    from: &Pod,
    node: &str,
    port: u16,
) -> (TcpStream, SocketAddr, EchoServer) {
    let (pod, _) = mesh.canary.backends.iter().find(|(p, _)| p.node == node).expect("a backend on that node");
    let listener = pod.run(|| std::net::TcpListener::bind((pod.ip, port))).expect("enter pod").expect("bind");
    let echo = EchoServer::start(listener, &pod.name).expect("an echo server");
    let dst = SocketAddr::from((pod.ip, port));
    let (greeting, conn) = from.run(|| open_and_greet(dst)).expect("enter the pod");
    assert_eq!(greeting.hostname, pod.name, "reached the pod on {node}");
    (conn, dst, echo)
}

/// Sends `what` and a newline on an echoed stream and checks it comes back.
pub fn echo_line(conn: &mut TcpStream, what: &str) {
    use std::io::{Read as _, Write as _};
    conn.write_all(format!("{what}\n").as_bytes()).expect("write");
    let mut back = vec![0u8; what.len() + 1];
    conn.read_exact(&mut back).unwrap_or_else(|e| panic!("{what}: no echo: {e}"));
    assert_eq!(back, format!("{what}\n").as_bytes(), "{what}");
}

/// Captures every frame crossing the fabric bridge namespace while `f` runs.
pub fn capture_fabric<T>(cluster: &Cluster, f: impl FnOnce() -> T) -> (T, Vec<u8>) {
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

/// What a [`Load`] saw.
#[derive(Debug, Default)]
pub struct Tally {
    /// When each answered request was sent, and the backend's message.
    pub answers: Vec<(std::time::Instant, String)>,
    pub failures: Vec<String>,
}

/// Steady HTTP load from a pod to a Service: `keepalive` workers each on a kept-alive
/// connection, and one opening a new connection for every request; every worker sends one
/// request per `every`. A response saying `connection: close` ends its connection; any error
/// is a failure (no request is sent twice).
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    workers: Vec<std::thread::JoinHandle<Tally>>,
}

impl Load {
    pub fn start(pod: &Arc<Pod>, service: SocketAddr, host: &str, keepalive: usize, every: Duration) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let workers = (0..=keepalive)
            .map(|w| {
                let (pod, stop, host) = (pod.clone(), stop.clone(), host.to_owned());
                let fresh_each_time = w == keepalive;
                std::thread::spawn(move || {
                    pod.run(|| load_worker(service, &host, fresh_each_time, every, &stop))
                        .expect("enter the pod")
                })
            })
            .collect();
        Self { stop, workers }
    }

    /// Stops the workers and sums what they saw.
    pub fn finish(self) -> Tally {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut all = Tally::default();
        for w in self.workers {
            let t = w.join().expect("a load worker");
            all.answers.extend(t.answers);
            all.failures.extend(t.failures);
        }
        all.answers.sort_by_key(|(sent, _)| *sent);
        all
    }
}

fn load_worker(
    service: SocketAddr,
    host: &str,
    fresh_each_time: bool,
    every: Duration,
    stop: &std::sync::atomic::AtomicBool,
) -> Tally {
    let mut tally = Tally::default();
    let mut conn: Option<HttpClient> = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    // Bounded in count and time; the caller stops it within seconds.
    for i in 0..100_000 {
        if stop.load(std::sync::atomic::Ordering::Relaxed) || std::time::Instant::now() > deadline {
            break;
        }
        let sent = std::time::Instant::now();
        let reply = match conn.as_mut() {
            Some(c) => c.get("/", &[]),
            None => HttpClient::connect(service, host, TIMEOUT).and_then(|mut c| {
                let r = c.get("/", &[]);
                conn = Some(c);
                r
            }),
        };
        match reply {
            Ok(r) if r.status == 200 => {
                if fresh_each_time
                    || r.headers.get("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"))
                {
                    conn = None;
                }
                tally.answers.push((sent, r.fields.get("message").cloned().unwrap_or_default()));
            }
            Ok(r) => {
                tally.failures.push(format!("request {i}: status {}: {}", r.status, r.body));
                conn = None;
            }
            Err(e) => {
                tally.failures.push(format!("request {i}: {e}"));
                conn = None;
            }
        }
        std::thread::sleep(every.saturating_sub(sent.elapsed()));
    }
    tally
}

/// Watches the kernel's links with these ids on a thread of its own, every millisecond or so,
/// until dropped: how many looks found one missing.
pub struct LinkWatch {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<(usize, usize)>>,
}

impl LinkWatch {
    pub fn start(ids: Vec<u32>) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let (mut looks, mut missing) = (0, 0);
                let deadline = std::time::Instant::now() + Duration::from_secs(120);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && std::time::Instant::now() < deadline
                {
                    let live: Vec<u32> =
                        aya::programs::loaded_links().filter_map(Result::ok).map(|l| l.id()).collect();
                    looks += 1;
                    if !ids.iter().all(|id| live.contains(id)) {
                        missing += 1;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                (looks, missing)
            }
        });
        Self { stop, thread: Some(thread) }
    }

    /// Stops watching: (looks, looks that found a link missing).
    pub fn finish(mut self) -> (usize, usize) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().expect("watching").join().expect("the link watcher")
    }
}

/// The programs the kernel's links `ids` run now, in the same order (0 for a link not found):
/// what an adopting agent's `BPF_LINK_UPDATE` must have changed.
pub fn programs_of_links(ids: &[u32]) -> Vec<u32> {
    let live: Vec<(u32, u32)> =
        aya::programs::loaded_links().filter_map(Result::ok).map(|l| (l.id(), l.program_id())).collect();
    ids.iter().map(|id| live.iter().find(|(l, _)| l == id).map_or(0, |(_, p)| *p)).collect()
}
