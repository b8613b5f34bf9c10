//! `cargo xtask demo`: gammaray on a simulated two-node cluster, narrated step by step.
//!
//! What it shows today: real agents load the eBPF programs; an enrolled pod's connections to a
//! Service-like address are steered into its node's proxy, which recovers the original
//! destination and carries the connection there, across nodes; an unenrolled pod goes
//! direct; the kernel's own log lines come out of the agent's log.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use gammaray_agent::control::{Client, Status};
use gammaray_testkit::{Cluster, echo, process::Process};

const SERVICE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const TIMEOUT: Duration = Duration::from_secs(10);
const REQUESTS: usize = 20;

fn step(msg: &str) {
    println!("\n\x1b[1m==> {msg}\x1b[0m");
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

struct Agent {
    _process: Process,
    control: Client,
    log: PathBuf,
}

impl Agent {
    fn status(&self) -> anyhow::Result<Status> {
        Ok(block_on(self.control.status())?)
    }
}

pub fn run() -> anyhow::Result<()> {
    if !nix_is_root() {
        bail!("the demo needs root: it creates network namespaces and loads eBPF programs");
    }
    let started = Instant::now();
    step("building the agent (and its eBPF programs)");
    crate::cargo(&["build", "--quiet", "-p", "gammaray-agent", "--bins"])?;
    let agent_bin = gammaray_testkit::process::cargo_bin("gammaray-agent");

    step("creating a simulated cluster: 2 nodes on a bridge, pods as network namespaces");
    let cluster = Cluster::new(2).context("building the simulated cluster")?;
    for node in cluster.nodes() {
        println!("    {} at {}", node.name, node.ip);
    }

    step("starting one gammaray agent per node");
    let mut agents = Vec::new();
    for node in cluster.nodes() {
        let socket = cluster.dir().join(format!("{}.sock", node.name));
        let log = cluster.dir().join(format!("{}.log", node.name));
        let proxy = SocketAddrV4::new(node.ip, 15001);
        let args: Vec<String> = vec![
            "--control".into(),
            socket.display().to_string(),
            "run".into(),
            "--node".into(),
            node.name.clone(),
            "--proxy-addr".into(),
            proxy.to_string(),
        ];
        let env = [(
            "RUST_LOG".to_owned(),
            "info,gammaray::kernel=debug".to_owned(),
        )];
        let process = node.spawn("agent", &agent_bin, &args, &env, Some(&log))?;
        let agent = Agent {
            _process: process,
            control: Client::new(&socket),
            log,
        };
        wait_ready(&agent)?;
        let st = agent.status()?;
        println!(
            "    {}: eBPF attached at {} (links {:?}), proxy listening on {}",
            node.name,
            st.attachment.cgroup.display(),
            st.attachment.link_ids,
            st.proxy
        );
        agents.push(agent);
    }

    step(&format!(
        "backend pod on node2 serves the Service address {SERVICE_VIP}:80"
    ));
    let backend = cluster.add_pod(2, "demo", "backend-v1-7d4b9c-x2x7q")?;
    cluster.add_pod_address(&backend, SERVICE_VIP)?;
    let listener = backend.run(|| std::net::TcpListener::bind((SERVICE_VIP, 80)))??;
    let _server = echo::EchoServer::start(listener, &backend.name)?;
    println!("    {} ({}) on {}", backend.name, backend.ip, backend.node);

    step("client pods on node1: `client` is enrolled in the mesh, `outsider` is not");
    let client = cluster.add_pod(1, "demo", "client")?;
    let outsider = cluster.add_pod(1, "legacy", "outsider")?;
    let enrolled = block_on(agents[0].control.enrol(&client.netns_path()))?;
    println!(
        "    enrolled {} (netns cookie {})",
        client.name, enrolled.cookie
    );

    let dst = SocketAddr::from((SERVICE_VIP, 80));
    step(&format!("client connects to {dst} {REQUESTS} times"));
    for i in 0..REQUESTS {
        let g = client.run(|| echo::call(dst, TIMEOUT))??;
        if i == 0 {
            println!(
                "    backend {} answered on {} and saw the peer {}",
                g.hostname, g.local, g.peer
            );
            println!(
                "    (the peer is node1's address: the connection went through node1's proxy)"
            );
        }
        if g.local != dst {
            bail!("original destination lost: backend answered on {}", g.local);
        }
    }
    let st = agents[0].status()?;
    println!(
        "    node1: kernel redirected {}, lookup misses {}; proxy accepted {}, lookup misses {}",
        st.kernel.redirected,
        st.kernel.lookup_misses,
        st.outbound.accepted,
        st.outbound.lookup_misses
    );

    step("the unenrolled pod connects to the backend directly");
    let backend_direct = SocketAddr::from((SERVICE_VIP, 80));
    let g = outsider.run(|| echo::call(backend_direct, TIMEOUT))??;
    println!(
        "    backend saw the peer {} (the outsider's own address {})",
        g.peer, outsider.ip
    );
    println!(
        "    node1 redirects still {}",
        agents[0].status()?.kernel.redirected
    );

    step("the kernel's own log lines, from node1's agent log (aya-log)");
    let log = std::fs::read_to_string(&agents[0].log)?;
    for line in log
        .lines()
        .filter(|l| l.contains("gammaray::kernel"))
        .take(5)
    {
        println!("    {line}");
    }

    step("cleaning up: agents stop, links detach, namespaces and cgroups go");
    drop(agents);
    drop(cluster);
    println!("\ndone in {:.1} s", started.elapsed().as_secs_f64());
    println!(
        "next on the roadmap: GAMMA routing (canary 90/10), HBONE mTLS between nodes, Kubernetes sources"
    );
    Ok(())
}

fn wait_ready(agent: &Agent) -> anyhow::Result<()> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match agent.status() {
            Ok(_) => return Ok(()),
            Err(err) if Instant::now() > deadline => {
                let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
                bail!("agent did not become ready: {err}\n{log}");
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|v| v.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}
