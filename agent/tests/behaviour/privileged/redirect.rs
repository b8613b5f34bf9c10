//! The eBPF redirect on the real data path: enrolled pods land on the proxy, which recovers
//! each original destination; what is not enrolled is left alone; the kernel's log lines.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr},
};

use gammaray_testkit::{
    Cluster,
    agent::AgentArgs,
    assert_eventually,
    cluster::pod_gateway,
    echo::{self, EchoServer},
    require_privileged,
};

use super::support::*;

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
