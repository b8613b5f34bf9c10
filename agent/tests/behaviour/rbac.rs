//! `deploy/` on a real API server: applied with `kubectl apply -k --server-side` (after a
//! server-side dry run), the agent's Kubernetes wiring runs with a token minted for its
//! ServiceAccount (TokenRequest), not as admin. It lists and watches every kind, holds its Lease
//! and writes route status without one refusal; what it must not do, reading the mesh root
//! among it, the API server refuses.

use std::{path::Path, time::Duration};

use k8s_openapi::api::core::v1::{Secret, Service};
use kube::{Api, api::PostParams};

use gammaray_agent::{
    cli::{Cli, Command},
    kube_client::{Access, client as agent_client},
    kube_source::SourceOptions,
};

use super::apiserver::{
    Corner, condition, eventually, our_parent, start_source_with, start_writer_with, wait_for_weights,
};
use clap::Parser as _;

/// Whether `result` is the API server's 403.
fn forbidden<T: std::fmt::Debug>(result: kube::Result<T>) -> bool {
    matches!(result, Err(kube::Error::Api(ref s)) if s.code == 403)
}

/// `kubectl apply -k deploy/ --server-side`, after a server-side dry run.
pub(crate) fn apply_deploy(server: &gammaray_testkit::controlplane::ControlPlane) {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let deploy = deploy.to_str().expect("a UTF-8 path");
    // A server-side dry run checks namespaced objects against their namespace, which must exist.
    server
        .kubectl(&["apply", "--server-side", "-f", &format!("{deploy}/namespace.yaml")])
        .unwrap_or_else(|e| panic!("apply deploy/namespace.yaml: {e}"));
    server
        .kubectl(&["apply", "-k", deploy, "--server-side", "--dry-run=server"])
        .unwrap_or_else(|e| panic!("deploy/ refused by a server-side dry run: {e}"));
    server
        .kubectl(&["apply", "-k", deploy, "--server-side"])
        .unwrap_or_else(|e| panic!("apply deploy/: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deployed_rbac_is_enough_for_the_agent_and_no_more() {
    let Some(server) = gammaray_testkit::controlplane::shared("deploy/'s RBAC on a real API server") else {
        return;
    };
    apply_deploy(server);

    // The names the DaemonSet's agent uses: its defaults.
    let Command::Run { kube, .. } =
        Cli::try_parse_from(["gammaray-agent", "run", "--node", "node1", "--proxy-addr", "10.0.0.1:15001"])
            .expect("the agent's command line")
            .command
    else {
        unreachable!("`run` parses as the run command")
    };
    let (ns, lease) = (kube.namespace, kube.lease_name);
    let token = server.token(&ns, "gammaray-agent").expect("a token for the agent's ServiceAccount");
    let kubeconfig =
        std::env::temp_dir().join(format!("{}-agent-kubeconfig", gammaray_testkit::names::unique_run()));
    server.write_token_kubeconfig(&kubeconfig, &token).expect("the agent's kubeconfig");
    let client = agent_client(&Access::Kubeconfig(kubeconfig.clone())).await.expect("the agent's client");
    let _ = std::fs::remove_file(&kubeconfig);

    // What the agent does, as the agent.
    let corner = Corner { ns: "rbac", net: 4 };
    server.apply_yaml(&corner.world());
    server.apply_yaml(&corner.canary(90, 10));
    // The first snapshot waits for every kind to list (up to a minute): it comes only if no list
    // or watch is refused.
    let mut source = start_source_with(
        client.clone(),
        SourceOptions { initial_sync_timeout: Duration::from_secs(60), ..Default::default() },
    );
    wait_for_weights(&mut source, corner, &[90, 10], "every kind listed with the agent's token").await;
    let writer = start_writer_with(client.clone(), &ns, &lease, "node1");
    eventually("the agent holds its Lease", || {
        writer.leading.load(std::sync::atomic::Ordering::Acquire).then_some(()).ok_or("not yet".to_owned())
    })
    .await;
    eventually("the agent writes route status", || {
        let ours = our_parent(&corner.route(server, "canary")).ok_or("no entry yet")?;
        (condition(&ours, "Accepted").0 == "True").then_some(()).ok_or(format!("{ours}"))
    })
    .await;

    // What it must not do.
    server.apply_yaml(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: other-secret, namespace: {ns}}}\nstringData: {{k: v}}\n"
    ));
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    assert!(forbidden(secrets.get("other-secret").await), "reading another Secret is refused");
    // Refused whether or not the signer has made it yet: authorization comes first.
    assert!(
        forbidden(secrets.get(gammaray_agent::signer::ROOTS_SECRET).await),
        "reading the mesh root is refused: only the signer may"
    );
    assert!(forbidden(secrets.list(&Default::default()).await), "listing Secrets is refused");
    let services: Api<Service> = Api::namespaced(client.clone(), corner.ns);
    let service: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "sneaky"},
        "spec": {"ports": [{"port": 80}]}
    }))
    .expect("a Service");
    assert!(
        forbidden(services.create(&PostParams::default(), &service).await),
        "writing a Service is refused"
    );
    let listed = services.list(&Default::default()).await.expect("listing Services is allowed");
    let mut backend = listed
        .items
        .into_iter()
        .find(|s| s.metadata.name.as_deref() == Some("backend"))
        .expect("the backend Service");
    backend.metadata.labels.get_or_insert_default().insert("sneaky".into(), "yes".into());
    assert!(
        forbidden(services.replace("backend", &PostParams::default(), &backend).await),
        "changing one too"
    );
    // Nor may it change a route's spec, only its status; nor hold what it does not use.
    for (verb, resource, subresource) in [
        ("update", "httproutes.gateway.networking.k8s.io", ""),
        ("delete", "pods", ""),
        ("create", "pods", "exec"),
        ("get", "secrets", ""),
        ("update", "leases.coordination.k8s.io", ""),
        // It watches, and writes status without reading it.
        ("get", "pods", ""),
        ("get", "httproutes.gateway.networking.k8s.io", ""),
        ("get", "httproutes.gateway.networking.k8s.io", "status"),
    ] {
        let as_agent = format!("--as=system:serviceaccount:{ns}:gammaray-agent");
        let mut args = vec!["auth", "can-i", verb, resource, "-n", corner.ns, as_agent.as_str()];
        let subresource_arg = format!("--subresource={subresource}");
        if !subresource.is_empty() {
            args.push(&subresource_arg);
        }
        let answer = server.kubectl(&args).unwrap_or_else(|e| e);
        assert_eq!(answer.trim(), "no", "the agent may not {verb} {resource} {subresource}");
    }
    // And the one write it needs, it has.
    let as_agent = format!("--as=system:serviceaccount:{ns}:gammaray-agent");
    let answer = server
        .kubectl(&[
            "auth",
            "can-i",
            "update",
            "httproutes.gateway.networking.k8s.io",
            "--subresource=status",
            "-n",
            corner.ns,
            &as_agent,
        ])
        .unwrap_or_else(|e| e);
    assert_eq!(answer.trim(), "yes", "the agent may update route status");
    assert_eq!(writer.refused.count.get(), 0, "no status refused as invalid");
    let _ = writer.stop.send(true);
}
