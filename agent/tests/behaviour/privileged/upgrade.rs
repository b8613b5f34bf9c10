//! Restarts and upgrades of a node's agent on the real data path: the kernel side outlives the
//! agent (its links stay attached at every moment), a killed agent leaves its pods to the
//! failure mode, a restarted one adopts the pins, and a second agent takes over from the first
//! under load with no failed request.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use gammaray_agent::ebpf::Adoption;
use gammaray_testkit::{
    agent::{Agent, AgentArgs},
    echo::Greeting,
    http::HttpClient,
    require_privileged,
    scenarios::{self, Canary},
};

use super::support::*;

/// The agents' liveness window (the kernel holds a proxy for dead after a second without a
/// heartbeat), with room for a busy host.
const LIVENESS: Duration = Duration::from_secs(1);

const MARKER: &str = "gammaray-unproxied-marker-51c2";

/// Connects to `dst` and reads the echo server's greeting.
fn try_greet(dst: SocketAddr) -> std::io::Result<Greeting> {
    let mut conn = TcpStream::connect_timeout(&dst, TIMEOUT)?;
    conn.set_read_timeout(Some(TIMEOUT))?;
    conn.write_all(format!("{MARKER}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line)?;
    Greeting::parse(line.trim()).ok_or_else(|| std::io::Error::other(format!("not a greeting: {line:?}")))
}

/// The arguments node1's agent was started with by [`CanaryMesh::start_with`].
fn mesh_args(mesh: &CanaryMesh, args: AgentArgs) -> AgentArgs {
    AgentArgs { manifests: Some(mesh.dir.clone()), signer: Some(mesh.signer.access()), ..args }
}

/// Replaces node1's agent in the mesh (so it stops before the cluster goes).
fn replace_node1(mesh: &mut CanaryMesh, agent: Agent) -> Agent {
    let slot = mesh.agents.iter_mut().find(|(n, _)| *n == 1).expect("node1's agent");
    std::mem::replace(&mut slot.1, agent)
}

fn node1(mesh: &mut CanaryMesh) -> &mut Agent {
    &mut mesh.agents.iter_mut().find(|(n, _)| *n == 1).expect("node1's agent").1
}

/// Polls `try_greet(dst)` from the client pod until it answers, for at most `within`; every
/// failure before must be quick (a refusal, never a timeout). The time to the answer and the
/// greeting; panics with the failures otherwise.
fn first_answer(mesh: &CanaryMesh, dst: SocketAddr, within: Duration) -> (Duration, Greeting) {
    let started = Instant::now();
    let mut failures = Vec::new();
    while started.elapsed() < within {
        let t = Instant::now();
        match mesh.canary.client.run(|| try_greet(dst)).expect("enter the client pod") {
            Ok(g) => return (started.elapsed(), g),
            Err(e) => {
                // A refusal, not a dropped SYN (whose first retransmission alone takes a second).
                assert!(t.elapsed() < Duration::from_millis(900), "a connect hung {:?}: {e}", t.elapsed());
                failures.push(e.kind());
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("no answer from {dst} within {within:?}: {failures:?}");
}

/// SIGKILL of node1's agent in the default failure mode with mutual TLS (`closed`): its links
/// stay attached, an enrolled pod's connections fail at once (refused by the kernel once the
/// proxy's heartbeat is stale) and nothing of theirs crosses the wire; a restarted agent adopts
/// the same links and the pinned enrolment, and serves again.
#[test]
fn a_killed_agent_leaves_pods_refused_and_a_restart_adopts_its_pins() {
    if !require_privileged("upgrade: SIGKILL, failure mode closed") {
        return;
    }
    let mut mesh = CanaryMesh::start(&Canary::route(50, 50), &[1, 2]);
    let (_stream, dst, _echo) = open_stream(&mesh, 9321);
    let before = mesh.agent(1).status();
    assert_eq!(before.attachment.adoption, Adoption::Fresh, "the first agent found nothing pinned");
    let watch = LinkWatch::start(before.attachment.link_ids.clone());

    let killed = Instant::now();
    node1(&mut mesh).kill();
    let (attempts, wire) = capture_fabric(&mesh.cluster, || {
        mesh.canary
            .client
            .run(|| {
                // Inside the liveness window and past it.
                (0..30)
                    .map(|_| {
                        let t = Instant::now();
                        let r = try_greet(dst).map_err(|e| e.kind());
                        std::thread::sleep(Duration::from_millis(50));
                        (t.elapsed(), r)
                    })
                    .collect::<Vec<_>>()
            })
            .expect("enter the client pod")
    });
    for (took, r) in &attempts {
        assert!(r.is_err(), "a connection reached {dst} with no proxy alive: {attempts:?}");
        assert!(*took < Duration::from_millis(900), "refused at once, not after a timeout: {attempts:?}");
    }
    assert!(
        attempts.iter().any(|(_, r)| *r == Err(std::io::ErrorKind::PermissionDenied)),
        "the kernel refused the connect (EPERM) once the proxy was known dead: {attempts:?}"
    );
    assert!(
        !wire.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
        "an enrolled pod's bytes left the node"
    );

    // Nothing leaves in plaintext while the new agent starts either: it serves (and beats) only
    // once it routes by the configuration.
    // The client polls from before the start, so it meets the new agent from its first moment.
    let ((restarted, (gap, greeting)), wire) = capture_fabric(&mesh.cluster, || {
        std::thread::scope(|scope| {
            let poll = scope.spawn(|| first_answer(&mesh, dst, TIMEOUT));
            let restarted = start_agent(&mesh.cluster, 1, mesh_args(&mesh, AgentArgs::default()));
            (restarted, poll.join().expect("the polling thread"))
        })
    });
    assert!(
        !wire.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
        "plaintext while the agent restarted"
    );
    let gap_from_kill = killed.elapsed();
    assert_eq!(greeting.hostname.split('-').next(), Some("backend"), "{greeting:?}");
    let after = restarted.status();
    assert_eq!(after.attachment.adoption, Adoption::Adopted, "{:?}", after.attachment);
    assert_eq!(after.attachment.link_ids, before.attachment.link_ids, "the same links, adopted");
    assert_ne!(after.attachment.program_ids, before.attachment.program_ids, "the new agent loaded its own");
    assert_eq!(
        programs_of_links(&after.attachment.link_ids),
        after.attachment.program_ids,
        "the adopted links run the new agent's programs"
    );
    for cookie in &before.enrolled {
        assert!(after.enrolled.contains(cookie), "enrolment survived the restart: {after:?}");
    }
    assert!(after.kernel.refused_no_proxy >= 1, "the pinned counters say what happened meanwhile: {after:?}");
    let (looks, missing) = watch.finish();
    assert!(looks > 100, "the links were watched ({looks} looks)");
    assert_eq!(missing, 0, "the links were attached at every moment ({missing} of {looks} looks missed one)");
    eprintln!(
        "restart: served again {gap:?} after the new agent's start, {gap_from_kill:?} after the SIGKILL"
    );
    drop(replace_node1(&mut mesh, restarted));
}

/// With `--failure-mode open`, a killed agent's pods connect directly once its heartbeat is
/// stale (within the liveness window; refused at once before), and the kernel counts them.
#[test]
fn in_open_mode_a_killed_agent_lets_pods_connect_directly() {
    if !require_privileged("upgrade: SIGKILL, failure mode open") {
        return;
    }
    let open = AgentArgs { extra: vec!["--failure-mode".into(), "open".into()], ..AgentArgs::default() };
    let mut mesh = CanaryMesh::start_with(&Canary::route(50, 50), &[1, 2], open.clone());
    let (_stream, dst, _echo) = open_stream(&mesh, 9322);
    let captured = mesh.agent(2).status().kernel.captured;
    node1(&mut mesh).kill();
    let (took, greeting) = first_answer(&mesh, dst, LIVENESS * 3);
    // Direct, not through node1's proxy: node2 captures it as plaintext from outside the mesh
    // (its pods are permissive) and delivers it from its own address.
    assert_eq!(
        greeting.peer.ip(),
        std::net::IpAddr::V4(gammaray_testkit::cluster::pod_gateway(2)),
        "delivered by node2"
    );
    let node2 = mesh.agent(2).status();
    assert!(node2.kernel.captured > captured, "node2's kernel captured it: {:?}", node2.kernel);
    assert!(took <= LIVENESS * 2, "direct once the liveness window has passed: {took:?}");
    let restarted = start_agent(&mesh.cluster, 1, mesh_args(&mesh, open));
    let st = restarted.status();
    assert_eq!(st.attachment.adoption, Adoption::Adopted);
    assert!(st.kernel.passed_no_proxy >= 1, "counted: {:?}", st.kernel);
    eprintln!("open mode: direct connections {took:?} after the SIGKILL");
    drop(replace_node1(&mut mesh, restarted));
}

/// An upgrade as the DaemonSet's surge makes it: a second agent starts on node1 with the same
/// flags, then the first gets SIGTERM and drains. Under steady L7 load from node1's client to
/// backends on both nodes (16 kept-alive connections and one new connection per request) no
/// request fails (a kept-alive connection of the old agent's is told `connection: close` on
/// its next response, and the client's next request opens a new one), an L4 stream open
/// throughout arrives whole, and the links stay attached.
#[test]
fn a_second_agent_takes_over_under_load_with_no_failed_request() {
    if !require_privileged("upgrade: hand-over under load") {
        return;
    }
    let mut mesh = CanaryMesh::start_with(
        &Canary::route(90, 10),
        &[1, 2],
        AgentArgs { drain_secs: Some(20), ..Default::default() },
    );
    let (mut stream, _dst, _echo) = open_stream(&mesh, 9323);
    let links = mesh.agent(1).status().attachment.link_ids;
    let watch = LinkWatch::start(links.clone());
    let service = SocketAddr::from((scenarios::BACKEND_VIP, 80));
    // 17 workers, one request each per 85 ms: about 200 requests a second.
    let load = Load::start(&mesh.canary.client, service, "backend", 16, Duration::from_millis(85));
    std::thread::sleep(Duration::from_secs(1));
    echo_line(&mut stream, "before the upgrade");

    let args = AgentArgs { drain_secs: Some(20), instance: Some("new".into()), ..Default::default() };
    let new = start_agent(&mesh.cluster, 1, mesh_args(&mesh, args));
    new.wait_for("the new agent to be ready", || {
        let st = gammaray_agent::control::Client::new(&new.socket);
        let st = gammaray_testkit::agent::block_on(st.status()).map_err(|e| e.to_string())?;
        (st.frontends >= 3).then_some(st).ok_or_else(|| "no routes yet".to_owned())
    })
    .expect("the new agent routes");
    std::thread::sleep(Duration::from_millis(500));
    let (agents, cluster) = (&mut mesh.agents, &mesh.cluster);
    let old = &mut agents.iter_mut().find(|(n, _)| *n == 1).expect("node1's agent").1;
    let signalled = Instant::now();
    old.terminate();
    old.wait_for("the drain to start", || {
        old.log_text()
            .contains("draining: the proxy accepts no more connections")
            .then_some(())
            .ok_or_else(|| "not yet".to_owned())
    })
    .expect("draining");
    // The kubelet's probes of the node's health port now reach the new agent only.
    let node = cluster.node(1);
    for _ in 0..20 {
        let ready = node
            .run(|| {
                HttpClient::connect(SocketAddr::from((node.ip, 15021)), "node", TIMEOUT)?.get("/readyz", &[])
            })
            .expect("enter node1")
            .expect("the health port answers");
        assert_eq!((ready.status, ready.body.trim()), (200, "ready"), "a probe reached the draining agent");
    }
    echo_line(&mut stream, "while the old agent drains");
    std::thread::sleep(Duration::from_millis(300));
    echo_line(&mut stream, "the last line");
    drop(stream);
    let exit = old.wait_exit(Duration::from_secs(25)).expect("the old agent exits");
    let handover = signalled.elapsed();
    assert!(exit.success(), "{exit:?}\n{}", old.log_text());
    std::thread::sleep(Duration::from_secs(1));
    let tally = load.finish();
    let (looks, missing) = watch.finish();

    assert!(
        tally.failures.is_empty(),
        "{} of {} requests failed: {:?}",
        tally.failures.len(),
        tally.answers.len(),
        tally.failures
    );
    assert!(tally.answers.len() > 400, "the load ran: {} answers", tally.answers.len());
    let after = tally.answers.iter().filter(|(sent, _)| *sent > signalled + handover).count();
    assert!(after > 100, "the new agent served the load after the hand-over: {after}");
    assert_eq!(missing, 0, "links attached at every moment ({missing} of {looks} looks missed one)");
    let st = gammaray_testkit::agent::block_on(gammaray_agent::control::Client::new(&new.socket).status())
        .expect("the new agent's status");
    assert_eq!(st.attachment.adoption, Adoption::Adopted);
    assert_eq!(st.attachment.link_ids, links, "the same links");
    assert_eq!(programs_of_links(&links), st.attachment.program_ids, "running the new agent's programs");
    let log = old.log_text();
    assert!(log.contains("drained: every connection finished"), "{log}");
    eprintln!(
        "hand-over: {} requests answered, 0 failed; the old agent exited {handover:?} after SIGTERM",
        tally.answers.len()
    );
    drop(replace_node1(&mut mesh, new));
}

/// An agent for another node refuses the pins of node1 and says why; node1 keeps working.
#[test]
fn an_agent_of_another_node_refuses_the_pins() {
    if !require_privileged("upgrade: pins of another node") {
        return;
    }
    let mesh = CanaryMesh::start(&Canary::route(50, 50), &[1, 2]);
    let node = mesh.cluster.node(1);
    let out = std::process::Command::new(agent_bin())
        .args(["--control", &mesh.cluster.dir().join("other.sock").display().to_string(), "run"])
        .args(["--node", "node9", "--proxy-addr", "127.0.0.1:1"])
        .arg("--bpffs")
        .arg(&node.bpffs)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run a second agent");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("belongs to node node1, not node9: refusing to adopt it"), "{stderr}");
    let st = mesh.agent(1).status();
    assert_eq!(st.attachment.link_ids.len(), 2, "node1's agent is untouched");
    let split = canary_split(&mesh.canary.client, 10);
    assert_eq!(split.values().sum::<usize>(), 10, "node1 still routes: {split:?}");
}

/// Maps pinned by an agent of another ABI version are never opened: the new agent makes its
/// own, moves the links to its programs once its enrolment pass has filled them, and removes
/// the old maps' pins.
#[test]
fn maps_of_another_abi_version_are_replaced() {
    if !require_privileged("upgrade: another ABI") {
        return;
    }
    let mut mesh = CanaryMesh::start(&Canary::route(50, 50), &[1, 2]);
    let before = mesh.agent(1).status();
    let exit = node1(&mut mesh).stop(TIMEOUT).expect("node1's agent stops");
    assert!(exit.success());
    // What an agent of an older ABI would have left: its maps under their version's name.
    let pins = mesh.cluster.node(1).bpffs.clone();
    let ours = pins.join(format!("abi-{}", gammaray_common::ABI_VERSION));
    let older = pins.join("abi-1");
    std::fs::rename(&ours, &older).expect("rename the maps' directory");
    let restarted = start_agent(&mesh.cluster, 1, mesh_args(&mesh, AgentArgs::default()));
    restarted
        .wait_for("the older maps to go", || {
            (!older.exists()).then_some(()).ok_or_else(|| "still there".to_owned())
        })
        .expect("older maps removed");
    let st = restarted.status();
    assert_eq!(st.attachment.adoption, Adoption::Replaced, "{:?}", st.attachment);
    assert_eq!(st.attachment.link_ids, before.attachment.link_ids, "the same links");
    assert_eq!(
        programs_of_links(&st.attachment.link_ids),
        st.attachment.program_ids,
        "moved to the new agent's programs once its enrolment pass ran"
    );
    let (_stream, _dst, _echo) = open_stream(&mesh, 9324);
    drop(replace_node1(&mut mesh, restarted));
}

/// The pods' inbound links, pinned on `node`: their names and link ids.
fn inbound_links(mesh: &CanaryMesh, node: u8) -> Vec<(String, u32)> {
    let pins = mesh.cluster.node(node).bpffs.clone();
    let mut links: Vec<(String, u32)> = std::fs::read_dir(&pins)
        .expect("the pin directory")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("link-inbound-"))
        .map(|n| {
            let link = aya::programs::links::PinnedLink::from_pin(pins.join(&n)).expect("a pinned link");
            let id = aya::programs::links::FdLink::from(link).info().expect("link info").id();
            (n, id)
        })
        .collect();
    links.sort();
    links
}

/// The pods' inbound links outlive the agent too: with none, plaintext from outside the mesh
/// to an enrolled pod is refused (failure mode closed); a restarted agent adopts the same
/// links and captures again; and a namespace that left the mesh while no agent ran is let go
/// at the next start: its pods' enrolment and inbound links are swept.
#[test]
fn inbound_capture_outlives_the_agent_and_a_restart_sweeps_what_left() {
    if !require_privileged("upgrade: inbound capture across restarts") {
        return;
    }
    let mut mesh = CanaryMesh::start(&Canary::route(50, 50), &[1, 2]);
    let stranger = mesh.cluster.add_pod(2, "outside", "stranger").expect("a pod outside the mesh");
    let (pod, _) = mesh.canary.backends.iter().find(|(p, _)| p.node == "node1").expect("a backend on node1");
    let dst = SocketAddr::from((pod.ip, scenarios::TARGET_PORT));
    assert!(answered_from(&stranger, dst), "permissive: captured and answered");
    let links = inbound_links(&mesh, 1);
    assert!(links.len() >= 2, "a link per enrolled pod on node1 (the client, a backend): {links:?}");

    let exit = node1(&mut mesh).stop(TIMEOUT).expect("node1's agent stops");
    assert!(exit.success());
    assert!(!answered_from(&stranger, dst), "no agent: refused by the kernel (failure mode closed)");
    assert_eq!(inbound_links(&mesh, 1), links, "the links stay pinned");

    let restarted = start_agent(&mesh.cluster, 1, mesh_args(&mesh, AgentArgs::default()));
    restarted
        .wait_for("plaintext to be captured again", || {
            answered_from(&stranger, dst).then_some(()).ok_or_else(|| "refused".to_owned())
        })
        .expect("captured again");
    assert_eq!(inbound_links(&mesh, 1), links, "the same links, adopted");
    assert!(restarted.status().kernel.inbound_refused_no_proxy >= 1, "the pinned counter saw the refusal");
    drop(replace_node1(&mut mesh, restarted));

    // The namespace leaves the mesh while no agent runs.
    let exit = node1(&mut mesh).stop(TIMEOUT).expect("node1's agent stops");
    assert!(exit.success());
    let left = mesh.canary.objects.replace("labels: {gammaray.dev/dataplane-mode: ambient}", "labels: {}");
    assert_ne!(left, mesh.canary.objects, "the namespace's label is where the test expects it");
    write_manifest(&mesh.dir.join("objects.yaml"), &left);
    let restarted = start_agent(&mesh.cluster, 1, mesh_args(&mesh, AgentArgs::default()));
    restarted
        .wait_for("the enrolments and links left behind to be swept", || {
            let (links, enrolled) = (inbound_links(&mesh, 1), restarted.status().enrolled);
            (links.is_empty() && enrolled.is_empty()).then_some(()).ok_or(format!("{links:?}, {enrolled:?}"))
        })
        .expect("swept");
    let captured = restarted.status().kernel.captured;
    assert!(answered_from(&stranger, dst), "out of the mesh: reached directly");
    assert_eq!(restarted.status().kernel.captured, captured, "not captured");
    assert!(restarted.log_text().contains("removed what earlier agents left for pods no longer enrolled"));
    drop(replace_node1(&mut mesh, restarted));
}
