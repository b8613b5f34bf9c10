//! The agent as a process: a missing privilege is named, its flags and variables parse,
//! SIGTERM drains its connections, and nothing is left behind when it stops.

use std::{
    io::Read as _,
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use gammaray_testkit::{Cluster, agent::AgentArgs, http::HttpClient, require_privileged, scenarios::Canary};

use super::support::*;

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
        // The kernel side outlives the agent until `uninstall` removes it.
        let live =
            || -> Vec<u32> { aya::programs::loaded_links().filter_map(Result::ok).map(|l| l.id()).collect() };
        assert!(links.iter().all(|id| live().contains(id)), "the pinned links outlive the agent");
        let pins = cluster.node(1).bpffs.clone();
        let out = std::process::Command::new(agent_bin())
            .args(["uninstall", "--bpffs"])
            .arg(&pins)
            .output()
            .expect("run uninstall");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
        let maps = gammaray_common::MAPS.len();
        assert!(stdout.contains(&format!("removed 2 link(s) and {maps} map(s)")), "{stdout}");
        assert!(!pins.exists(), "the pin directory is gone");
        assert!(links.iter().all(|id| !live().contains(id)), "uninstall detached the links");
        (cluster.run_name().to_owned(), links)
    };
    let left = gammaray_testkit::sweep::leftovers(&run);
    assert!(left.is_empty(), "left behind: {left:?}");
    let live: Vec<u32> = aya::programs::loaded_links().filter_map(Result::ok).map(|l| l.id()).collect();
    for id in links {
        assert!(!live.contains(&id), "BPF link {id} still attached");
    }
}

/// A mesh whose agents drain for `drain_secs`, and an L4 stream from the client pod on node1 to
/// a pod on node2 (through node1's proxy and HBONE) open and echoing, with the stream's
/// destination and its echo server; `None` (after a SKIP line) without the privileges.
fn mesh_with_a_stream(
    what: &str,
    drain_secs: u64,
    port: u16,
) -> Option<(CanaryMesh, TcpStream, SocketAddr, gammaray_testkit::echo::EchoServer)> {
    if !require_privileged(what) {
        return None;
    }
    let args = AgentArgs { drain_secs: Some(drain_secs), ..AgentArgs::default() };
    let mesh = CanaryMesh::start_with(&Canary::route(50, 50), &[1, 2], args);
    let (mut conn, dst, echo) = open_stream(&mesh, port);
    echo_line(&mut conn, "before the signal");
    Some((mesh, conn, dst, echo))
}

fn node1(mesh: &mut CanaryMesh) -> &mut gammaray_testkit::agent::Agent {
    &mut mesh.agents.iter_mut().find(|(n, _)| *n == 1).expect("node1's agent").1
}

/// SIGTERM drains: the proxy stops accepting at once (a new connection from an enrolled pod is
/// refused, never sent around the proxy), an idle HTTP keep-alive connection is closed, a stream
/// open through it keeps flowing, and the agent exits as soon as that stream ends, well before
/// its deadline.
#[test]
fn sigterm_lets_open_connections_finish_and_refuses_new_ones() {
    let Some((mut mesh, mut conn, dst, _echo)) = mesh_with_a_stream("lifecycle: drain", 60, 9301) else {
        return;
    };
    let service = SocketAddr::from((gammaray_testkit::scenarios::BACKEND_VIP, 80));
    let mut http = mesh
        .canary
        .client
        .run(|| HttpClient::connect(service, "backend", TIMEOUT))
        .expect("enter client pod")
        .expect("an HTTP connection to the Service");
    assert_eq!(http.get("/", &[]).expect("a request before the signal").status, 200);
    let agent = node1(&mut mesh);
    agent.terminate();
    agent
        .wait_for("the drain to start", || {
            let log = agent.log_text();
            log.contains("draining: the proxy accepts no more connections")
                .then_some(())
                .ok_or_else(|| "not yet".to_owned())
        })
        .expect("draining");
    echo_line(&mut conn, "while draining");
    // The idle keep-alive connection is closed by the drain (a request just before it may
    // still be answered).
    let deadline = Instant::now() + TIMEOUT;
    while http.get("/", &[]).is_ok() {
        assert!(Instant::now() < deadline, "the idle HTTP connection is still served after the drain began");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The node says so: not ready, draining, with the stream (at least) still open.
    let node = mesh.cluster.node(1);
    let get = |port: u16, path: &str| {
        node.run(|| HttpClient::connect(SocketAddr::from((node.ip, port)), "node", TIMEOUT)?.get(path, &[]))
            .expect("enter node1")
            .unwrap_or_else(|e| panic!("{path}: {e}"))
    };
    // The health port is closed (an agent taking over would answer the kubelet there); the
    // metrics say why.
    assert!(
        node.run(|| HttpClient::connect(SocketAddr::from((node.ip, 15021)), "node", TIMEOUT))
            .expect("enter node")
            .is_err(),
        "the health listener closed when the drain began"
    );
    let metrics = get(15020, "/metrics").body;
    assert!(metrics.lines().any(|l| l == "gammaray_proxy_draining 1"), "{metrics}");
    let open: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("gammaray_proxy_connections_open "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(open >= 1, "the stream is counted: {open}");
    let started = Instant::now();
    let refused =
        mesh.canary.client.run(|| TcpStream::connect_timeout(&dst, TIMEOUT)).expect("enter client pod");
    assert!(refused.is_err(), "a new connection is refused while draining, not sent around the proxy");
    assert!(started.elapsed() < Duration::from_secs(2), "refused at once: {:?}", started.elapsed());
    let agent = node1(&mut mesh);
    assert!(agent.wait_exit(Duration::from_millis(500)).is_none(), "the agent waits for the open stream");
    drop(conn);
    let status = agent.wait_exit(TIMEOUT).expect("the agent exits once the stream has ended");
    assert!(status.success(), "{status:?}\n{}", agent.log_text());
    assert!(agent.log_text().contains("drained: every connection finished"), "{}", agent.log_text());
}

/// A drain that cannot finish by its deadline closes what is left and says how many.
#[test]
fn a_drain_past_its_deadline_closes_what_is_left_and_says_how_many() {
    let Some((mut mesh, mut conn, _dst, _echo)) = mesh_with_a_stream("lifecycle: drain deadline", 1, 9302)
    else {
        return;
    };
    let agent = node1(&mut mesh);
    let started = Instant::now();
    agent.terminate();
    let status = agent.wait_exit(TIMEOUT).expect("the agent exits at its deadline");
    assert!(status.success(), "{status:?}\n{}", agent.log_text());
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "it waited for the deadline: {:?}",
        started.elapsed()
    );
    let log = agent.log_text();
    let line = log.lines().find(|l| l.contains("drain deadline passed")).unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("left=1"), "the open stream is counted: {line}");
    conn.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut buf = [0u8; 1];
    assert!(matches!(conn.read(&mut buf), Ok(0) | Err(_)), "the stream left is closed");
}
