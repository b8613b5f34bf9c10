//! Enrolment by the namespace label on an API server.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr},
};

use gammaray_testkit::{
    Cluster, Pod, agent::AgentArgs, assert_eventually, cluster::pod_gateway, echo::EchoServer,
    require_privileged,
};

use super::support::*;

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

    let extra = vec!["--kubeconfig".into(), kubeconfig.display().to_string(), "--signer=none".into()];
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
