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
    agent::{Agent, AgentArgs, block_on, generate_ca},
    assert_eventually,
    echo::{self, EchoServer, Greeting},
    http::HttpClient,
    scenarios::{self, Canary},
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
/// world's objects plus `route`), mTLS between nodes, the client enrolled when node 1 has an
/// agent. Fields drop in order: agents, backends, then the cluster.
pub struct CanaryMesh {
    pub agents: Vec<(u8, Agent)>,
    pub canary: Canary,
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub cluster: Cluster,
}

impl CanaryMesh {
    pub fn start(route: &str, nodes: &[u8]) -> Self {
        Self::start_with(route, nodes, AgentArgs::default())
    }

    /// [`CanaryMesh::start`] with agents started with `args` (manifests and CA filled in).
    pub fn start_with(route: &str, nodes: &[u8], args: AgentArgs) -> Self {
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
                let args = AgentArgs { manifests: Some(dir.clone()), ca: Some(ca.clone()), ..args.clone() };
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

    pub fn agent(&self, node: u8) -> &Agent {
        &self.agents.iter().find(|(n, _)| *n == node).expect("an agent on that node").1
    }
}

/// An L4 stream from the client pod on node1 to a backend pod on node2 (through node1's proxy
/// and HBONE), to an echo server on `port` there: the stream, its destination and the server.
pub fn open_stream(mesh: &CanaryMesh, port: u16) -> (TcpStream, SocketAddr, EchoServer) {
    let (pod, _) = mesh.canary.backends.iter().find(|(p, _)| p.node == "node2").expect("a backend on node2");
    let listener = pod.run(|| std::net::TcpListener::bind((pod.ip, port))).expect("enter pod").expect("bind");
    let echo = EchoServer::start(listener, &pod.name).expect("an echo server");
    let dst = SocketAddr::from((pod.ip, port));
    let (greeting, conn) = mesh.canary.client.run(|| open_and_greet(dst)).expect("enter client pod");
    assert_eq!(greeting.hostname, pod.name, "reached the pod on node2");
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
