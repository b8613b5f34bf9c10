//! The signer on a real API server, as `deploy/` installs it: it runs with its own
//! ServiceAccount's token, makes the root Secret and publishes the trust bundle, and decides the
//! agents' CertificateSigningRequests. Only the agent of the node a request names gets a node
//! CA; a request for another node, a forged or stale token, a request with more names than the
//! node's, or a request replayed by another account is denied, with the reason in the CSR's
//! status and in the signer's log. The agents' own token may not read the root.

use std::time::Duration;

use gammaray_agent::{
    kube_client::{Access, client as kube_client},
    node_ca::{NodeCa, Way, request_by_csr},
    signer::ROOTS_SECRET,
};
use gammaray_proxy::identity::{Authority, TrustBundle, node_ca};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;

const NS: &str = "gammaray-system";

/// Kills the signer process when the test ends, however it ends.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_signer_issues_a_node_ca_only_to_that_nodes_agent_and_says_why_not() {
    let Some(server) = gammaray_testkit::controlplane::shared("the signer on a real API server") else {
        return;
    };
    super::rbac::apply_deploy(server);
    let run = gammaray_testkit::names::unique_run();
    let kubeconfig_of = |account: &str| {
        let token = server.token(NS, account).expect("a token");
        let path = std::env::temp_dir().join(format!("{run}-{account}-kubeconfig"));
        server.write_token_kubeconfig(&path, &token).expect("a kubeconfig");
        path
    };

    // The signer, as its Deployment runs it: its own ServiceAccount only.
    let signer_kubeconfig = kubeconfig_of("gammaray-signer");
    let log = std::env::temp_dir().join(format!("{run}-signer.log"));
    let out = std::fs::File::create(&log).expect("log");
    let _signer = Running(
        std::process::Command::new(env!("CARGO_BIN_EXE_gammaray-agent"))
            .args(["ca", "serve", "--namespace", NS, "--kubeconfig"])
            .arg(&signer_kubeconfig)
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("start the signer"),
    );
    let signer_log = || std::fs::read_to_string(&log).unwrap_or_default();

    // The agents: a Pod of the agents' ServiceAccount on each node, and tokens bound to them
    // for the signer (what the DaemonSet's projected volume holds).
    let node = |n: u8| format!("{run}-node{n}");
    let pod = |n: u8| format!("gammaray-agent-{run}-{n}");
    for n in [1, 2, 3] {
        server.apply_yaml(&format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {}}}\n", node(n)));
        server.apply_yaml(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {NS}}}\nspec: {{nodeName: {}, serviceAccountName: gammaray-agent, containers: [{{name: agent, image: agent}}]}}\n",
            pod(n),
            node(n)
        ));
    }
    let token_of = |n: u8| {
        server
            .kubectl(&[
                "create",
                "token",
                "gammaray-agent",
                "-n",
                NS,
                "--audience",
                node_ca::SIGNER_NAME,
                "--bound-object-kind",
                "Pod",
                "--bound-object-name",
                &pod(n),
                "--duration",
                "10m",
            ])
            .expect("a pod-bound token")
            .trim()
            .to_owned()
    };
    let agent_kubeconfig = kubeconfig_of("gammaray-agent");
    let agent = kube_client(&Access::Kubeconfig(agent_kubeconfig.clone())).await.expect("the agent's client");
    let admin =
        kube_client(&Access::Kubeconfig(server.kubeconfig().to_owned())).await.expect("an admin client");

    // The bundle, as an agent reads it (its RBAC allows that ConfigMap).
    let token_file = std::env::temp_dir().join(format!("{run}-node1.token"));
    std::fs::write(&token_file, token_of(1)).expect("token file");
    let node1 = NodeCa {
        way: Way::Kube { client: agent.clone(), namespace: NS.into() },
        token: token_file.clone(),
        node: node(1),
        trust_domain: "cluster.local".into(),
    };
    let bundle = node1
        .first_bundle(Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", signer_log()));
    assert_eq!(bundle.len(), 1, "one root");

    // node1's agent gets node1's CA, signed by the bundle's root.
    let ca = node1.issue().await.unwrap_or_else(|e| panic!("{e:#}\n{}", signer_log()));
    assert_eq!(ca.node(), Some(node(1).as_str()));
    assert!(bundle.issued_by_active(ca.cert_der()), "signed by the published root");

    // What is refused, and why.
    let denied = |result: anyhow::Result<String>, reason: &str, what: &str| {
        let err = format!("{:#}", result.err().unwrap_or_else(|| panic!("{what}: issued")));
        assert!(err.contains("denied") && err.contains(reason), "{what}: {err}");
    };
    let (_, for_node2) = node_ca::request("cluster.local", &node(2)).expect("csr");
    denied(
        request_by_csr(&agent, &node(1), &token_of(1), &for_node2).await,
        "OtherNode",
        "another node's CA",
    );
    let (_, for_node1) = node_ca::request("cluster.local", &node(1)).expect("csr");
    let forged = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImZvcmdlZCJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6Z2FtbWFyYXktc3lzdGVtOmdhbW1hcmF5LWFnZW50In0.c2lnbmF0dXJl";
    denied(request_by_csr(&agent, &node(1), forged, &for_node1).await, "Unauthenticated", "a forged token");
    // A token whose pod is gone (the agent was replaced) no longer authenticates.
    let stale = token_of(3);
    server
        .kubectl(&["delete", "pod", "-n", NS, &pod(3), "--grace-period=0", "--force"])
        .expect("delete the pod");
    let (_, for_node3) = node_ca::request("cluster.local", &node(3)).expect("csr");
    denied(request_by_csr(&agent, &node(3), &stale, &for_node3).await, "Unauthenticated", "a stale token");
    // More names than the node's.
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params =
        rcgen::CertificateParams::new(vec!["kubernetes.default.svc".to_owned()]).expect("params");
    params
        .subject_alt_names
        .push(rcgen::SanType::URI(node_ca::node_uri("cluster.local", &node(1)).try_into().expect("uri")));
    let extra = params.serialize_request(&key).expect("csr").pem().expect("pem");
    denied(request_by_csr(&agent, &node(1), &token_of(1), &extra).await, "UnexpectedNames", "extra names");
    // node1's token, presented by another account: a replay.
    denied(
        request_by_csr(&admin, &node(1), &token_of(1), &for_node1).await,
        "NotAnAgent",
        "a replayed token",
    );

    let logged = signer_log();
    assert_eq!(logged.matches("node CA request refused").count(), 5, "each refusal logged once:\n{logged}");
    for reason in ["OtherNode", "Unauthenticated", "UnexpectedNames", "NotAnAgent"] {
        assert!(
            logged.contains(reason) && logged.contains("node CA request refused"),
            "{reason} in the signer's log:\n{logged}"
        );
    }
    assert_eq!(logged.matches("node CA issued").count(), 1, "one request granted, signed once:\n{logged}");

    // The root: the signer made it; the agents' token may not read it.
    let secrets: Api<Secret> = Api::namespaced(agent.clone(), NS);
    assert!(
        matches!(secrets.get(ROOTS_SECRET).await, Err(kube::Error::Api(ref s)) if s.code == 403),
        "the agents may not read the mesh root"
    );
    let root = Api::<Secret>::namespaced(admin.clone(), NS).get(ROOTS_SECRET).await.expect("the root Secret");
    let data = root.data.unwrap_or_default();
    let text = |k: &str| String::from_utf8(data.get(k).expect(k).0.clone()).expect("PEM");
    let root = Authority::from_pem(&text("ca.crt"), &text("ca.key")).expect("a usable root");
    assert_eq!(TrustBundle::of(&root).pem(), bundle.pem(), "the bundle is the Secret's root");
    for path in [agent_kubeconfig, signer_kubeconfig, token_file, log] {
        let _ = std::fs::remove_file(path);
    }
}
