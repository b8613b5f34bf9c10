//! `cargo xtask demo`: gammaray on a simulated two-node cluster, narrated step by step.
//!
//! Real agents load the eBPF programs and route by Gateway API objects from a manifest
//! directory, or with `--apiserver real` from a real kube-apiserver (testkit's control plane inside
//! node1, `deploy/`'s RBAC, route status written back): a 90/10 canary split of 1000 requests, a
//! live shift to 50/50, header routing, the identities the mesh assigns, and the kernel's own log
//! lines.

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use gammaray_testkit::{
    Cluster, Pod,
    http::HttpClient,
    scenarios::{self, Canary},
};

use gammaray_testkit::controlplane::{Assets, ControlPlane};

use crate::agents::{
    Agent, AgentArgs, Build, ClusterSigner, Control as _, Signer, Source, TIMEOUT, agent_binary, create_on,
    manifest_agent, real_api_server, require_privileges, write_atomically,
};
const REQUESTS: usize = 1000;

fn step(msg: &str) {
    println!("\n\x1b[1m==> {msg}\x1b[0m");
}

/// Where the demo's objects live: the agents' manifest directory, or a real API server.
/// Where the agents' node CAs come from.
enum DemoSigner {
    /// `ca serve --local`: the demo on one machine.
    Local(Signer),
    /// `ca serve` against the real API server, through CertificateSigningRequests.
    Cluster(ClusterSigner),
}

enum Objects {
    Dir(std::path::PathBuf),
    Real(Box<ControlPlane>),
}

impl Objects {
    /// Puts the route `yaml` in place, in place of the route named `replaces` if given.
    fn route(&self, yaml: &str, replaces: Option<&str>) -> anyhow::Result<()> {
        match self {
            Objects::Dir(dir) => write_atomically(&dir.join("route.yaml"), yaml),
            Objects::Real(plane) => {
                if let Some(name) = replaces {
                    plane.delete("gateway.networking.k8s.io/v1", "HTTPRoute", scenarios::NAMESPACE, name);
                }
                plane.try_apply_yaml(yaml).map_err(|e| anyhow::anyhow!("the route: {e}"))
            }
        }
    }

    /// Labels the demo namespace `gammaray.dev/peer-authentication=strict`; `objects` is what
    /// the manifest directory holds.
    fn strict(&self, objects: &str) -> anyhow::Result<()> {
        let (from, to) = (
            "gammaray.dev/dataplane-mode: ambient}",
            "gammaray.dev/dataplane-mode: ambient, gammaray.dev/peer-authentication: strict}",
        );
        match self {
            Objects::Dir(dir) => {
                anyhow::ensure!(objects.contains(from), "the demo namespace's labels are not where expected");
                write_atomically(&dir.join("objects.yaml"), &objects.replace(from, to))
            }
            Objects::Real(plane) => plane
                .try_apply_yaml(&format!(
                    "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {}, labels: {{{}}}\n",
                    scenarios::NAMESPACE,
                    to
                ))
                .map_err(|e| anyhow::anyhow!("the namespace's label: {e}")),
        }
    }

    /// Puts the AuthorizationPolicy `yaml` in place (`Some`), or removes `name` (`None`).
    fn policy(&self, name: &str, yaml: Option<&str>) -> anyhow::Result<()> {
        match (self, yaml) {
            (Objects::Dir(dir), Some(yaml)) => write_atomically(&dir.join("policy.yaml"), yaml),
            (Objects::Dir(dir), None) => Ok(std::fs::remove_file(dir.join("policy.yaml"))?),
            (Objects::Real(plane), Some(yaml)) => {
                plane.try_apply_yaml(yaml).map_err(|e| anyhow::anyhow!("the policy: {e}"))
            }
            (Objects::Real(plane), None) => {
                plane.delete("security.istio.io/v1", "AuthorizationPolicy", scenarios::NAMESPACE, name);
                Ok(())
            }
        }
    }
}

pub fn run(build: Build, source: Source) -> anyhow::Result<()> {
    require_privileges("the demo")?;
    let assets = match source {
        Source::Manifests => None,
        Source::Real => Some(Assets::find().map_err(|e| anyhow::anyhow!("--apiserver real: {e}"))?),
    };
    let started = Instant::now();
    let agent_bin = match build {
        Build::Now => {
            step(
                "building the agent and its eBPF programs (seconds when built; a few minutes the first time)",
            );
            let bin = agent_binary(build)?;
            println!("    built in {:.1} s", started.elapsed().as_secs_f64());
            bin
        }
        Build::AlreadyBuilt => {
            let bin = agent_binary(build)?;
            step(&format!("using the agent built for the tests: {}", bin.display()));
            bin
        }
    };
    let started = Instant::now();

    step("creating a simulated cluster: 2 nodes on a bridge, pods as network namespaces");
    let cluster = Cluster::new(2).context("building the simulated cluster")?;
    // Held to the end: the agents renew their node CAs with it.
    let (objects, agent_args, signer) = match &assets {
        None => {
            step("starting the signer (gammaray-agent ca serve --local): the only process with the root key");
            let signer = Signer::start(&agent_bin, &cluster.dir().join("signer"), &[])?;
            println!(
                "    pid {}, roots in {}; each agent gets a token of its own node and asks for that node's CA",
                signer.pid(),
                signer.dir.display()
            );
            let dir = cluster.dir().join("manifests");
            std::fs::create_dir_all(&dir)?;
            let args = manifest_agent(&dir, &signer.access(), "info,gammaray::kernel=debug");
            (Objects::Dir(dir), args, DemoSigner::Local(signer))
        }
        Some(assets) => {
            step(
                "starting a real kube-apiserver and etcd inside node1 (KUBEBUILDER_ASSETS), applying deploy/",
            );
            let namespace = format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {}, labels: {{gammaray.dev/dataplane-mode: ambient}}}}\n",
                scenarios::NAMESPACE
            );
            let (plane, kubeconfig) = real_api_server(&cluster, assets, &namespace)?;
            println!(
                "    {} ready; the agents use a token of ServiceAccount gammaray-system/gammaray-agent",
                plane.url()
            );
            step(
                "starting the signer as deploy/signer.yaml runs it: its own ServiceAccount, the only one that reads the root",
            );
            let signer = ClusterSigner::start(&agent_bin, &cluster, &plane)?;
            println!(
                "    each agent asks with a CertificateSigningRequest (signer gammaray.dev/node-ca) carrying a token bound to its own Pod;"
            );
            println!(
                "    the signer reviews the token and signs a node's CA only for the agent of that node"
            );
            let args = AgentArgs {
                extra: vec!["--kubeconfig".to_owned(), kubeconfig.display().to_string()],
                rust_log: "info,gammaray::kernel=debug".to_owned(),
                ..AgentArgs::default()
            };
            (Objects::Real(Box::new(plane)), args, DemoSigner::Cluster(signer))
        }
    };
    let args_for = |node: &str| match &signer {
        DemoSigner::Local(_) => agent_args.clone(),
        DemoSigner::Cluster(signer) => signer.agent_args(node, &agent_args),
    };
    let canary = match &objects {
        Objects::Dir(_) => Canary::build(&cluster),
        // Each Pod object is created first: the pod takes the server's UID, by which agents find it.
        Objects::Real(plane) => Canary::build_with(&cluster, Some(&|object| create_on(plane, object))),
    }
    .context("starting the backend pods")?;
    for (pod, _) in &canary.backends {
        println!("    {:<32} {:<12} on {}", pod.name, pod.ip.to_string(), pod.node);
    }
    println!("    {:<32} {:<12} on {}", canary.client.name, canary.client.ip.to_string(), canary.client.node);

    step("writing the cluster's objects and the HTTPRoute (backend-v1 90, backend-v2 10)");
    match &objects {
        Objects::Dir(dir) => std::fs::write(dir.join("objects.yaml"), &canary.objects)?,
        Objects::Real(plane) => {
            plane.try_apply_yaml(&canary.objects).map_err(|e| anyhow::anyhow!("objects: {e}"))?
        }
    }
    objects.route(&Canary::route(90, 10), None)?;
    print!("{}", indent(&Canary::route(90, 10)));

    step("starting one gammaray agent per node (eBPF redirect, node proxy, HBONE mTLS on :15008)");
    let mut agents = Vec::new();
    for node in cluster.nodes() {
        let agent = Agent::start(&agent_bin, &cluster, node, &args_for(&node.name))?;
        let st = agent.wait_until(|s| s.frontends >= 3)?;
        println!(
            "    {}: eBPF links {:?} at {}, proxy on {}, config v{} with {} Service frontends",
            node.name,
            st.attachment.link_ids,
            st.attachment.cgroup.display(),
            st.proxy,
            st.config_version,
            st.frontends
        );
        let issued = agent.wait_for("the node CA from the signer", || {
            let log = agent.log_text();
            log.lines()
                .find(|l| l.contains("node CA issued"))
                .map(|l| l.split("node CA issued").nth(1).unwrap_or_default().trim().to_owned())
                .ok_or_else(|| "not yet".to_owned())
        })?;
        println!("    {}: node CA issued by the signer for this node only ({issued})", node.name);
        agents.push(agent);
    }
    let signer_log = match &signer {
        DemoSigner::Local(signer) => signer.log_text(),
        DemoSigner::Cluster(signer) => std::fs::read_to_string(&signer.log).unwrap_or_default(),
    };
    for line in signer_log.lines().filter(|l| l.contains("node CA issued")) {
        println!("    signer log: {}", line.split_once(" INFO ").map_or(line, |(_, rest)| rest).trim());
    }
    step("enrolment follows the namespace label gammaray.dev/dataplane-mode=ambient");
    let started_enrol = Instant::now();
    let cookie = gammaray_agent::netns::cookie_of(&canary.client.netns_path())?;
    agents[0].wait_until(|s| s.enrolled.contains(&cookie))?;
    for agent in &agents {
        let on_node = canary.backends.iter().filter(|(p, _)| p.node == agent.node).count()
            + usize::from(canary.client.node == agent.node);
        let st = agent.wait_until(|s| s.enrolled.len() >= on_node)?;
        println!(
            "    {}: enrolled {} pods of namespace demo, found by pod UID through /proc and their cgroups",
            agent.node,
            st.enrolled.len()
        );
    }
    println!(
        "    client pod {} enrolled {:.0} ms after the agents started",
        canary.client.name,
        started_enrol.elapsed().as_secs_f64() * 1000.0
    );

    step(&format!(
        "the client sends {REQUESTS} requests to http://backend (ClusterIP {})",
        scenarios::BACKEND_VIP
    ));
    let split = send(&canary.client, REQUESTS, &[])?;
    chart(&split, REQUESTS);

    step("gammaray-agent describe service backend -n demo (against node1's running agent)");
    let described = std::process::Command::new(&agent_bin)
        .args([
            "--control",
            &agents[0].socket.display().to_string(),
            "describe",
            "service",
            "backend",
            "-n",
            "demo",
        ])
        .output()?;
    if !described.status.success() {
        bail!("describe failed: {}", String::from_utf8_lossy(&described.stderr));
    }
    print!("{}", indent(&String::from_utf8_lossy(&described.stdout)));

    step("shifting the weights to 50/50, live (what Flagger does during a rollout)");
    let before = agents[0].status()?.config_version;
    objects.route(&Canary::route(50, 50), None)?;
    let st = agents[0].wait_until(|s| s.config_version > before)?;
    println!("    node1 now routes by config v{}", st.config_version);
    let split = send(&canary.client, REQUESTS, &[])?;
    chart(&split, REQUESTS);

    if let Objects::Real(plane) = &objects {
        step("the route's status, written back by the agent that holds the status Lease");
        let route = plane
            .get("gateway.networking.k8s.io/v1", "HTTPRoute", scenarios::NAMESPACE, "backend-canary")
            .context("the canary HTTPRoute")?;
        for parent in route["status"]["parents"].as_array().into_iter().flatten() {
            for c in parent["conditions"].as_array().into_iter().flatten() {
                println!(
                    "    {} on Service {}: {}={} ({}), generation {}",
                    parent["controllerName"].as_str().unwrap_or("?"),
                    parent["parentRef"]["name"].as_str().unwrap_or("?"),
                    c["type"].as_str().unwrap_or("?"),
                    c["status"].as_str().unwrap_or("?"),
                    c["reason"].as_str().unwrap_or("?"),
                    c["observedGeneration"]
                );
            }
        }
    }

    step("header routing: requests with `x-user: tester` go to v2 with `x-canary: true` added");
    objects.route(&header_route(), Some("backend-canary"))?;
    print!("{}", indent(&header_route()));
    let ask = |user: &str| {
        canary.client.run(|| -> std::io::Result<_> {
            let mut c =
                HttpClient::connect(SocketAddr::from((scenarios::BACKEND_VIP, 80)), "backend", TIMEOUT)?;
            c.get("/reviews/1", &[("x-user", user)])
        })
    };
    // The route is in force when a tester's request is marked (with an API server, the old route's
    // deletion and the new one's creation are two changes, published one after the other).
    let started_wait = Instant::now();
    loop {
        let reply = ask("tester")??;
        if reply.fields.get("header:x-canary").is_some_and(|v| v == "true") {
            break;
        }
        if started_wait.elapsed() > TIMEOUT {
            bail!("the header route was not in force after {TIMEOUT:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for user in ["tester", "someone"] {
        let reply = ask(user)??;
        println!(
            "    x-user: {user:<8} → {} ({}), backend saw x-canary: {}",
            reply.fields.get("message").map_or("?", String::as_str),
            reply.fields.get("hostname").map_or("?", String::as_str),
            reply.fields.get("header:x-canary").map_or("(none)", String::as_str)
        );
    }

    step(
        "authorization at the destination: an AuthorizationPolicy denies the client's identity to v2's pods",
    );
    let policy = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-client-to-v2, namespace: demo}\n\
                  spec:\n  action: DENY\n  selector: {matchLabels: {version: v2}}\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]\n";
    print!("{}", indent(policy));
    objects.policy("no-client-to-v2", Some(policy))?;
    let wait_for = |user: &str, status: u16| -> anyhow::Result<()> {
        let started = Instant::now();
        while ask(user)??.status != status {
            anyhow::ensure!(started.elapsed() < TIMEOUT, "x-user {user} never answered {status}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Ok(())
    };
    wait_for("tester", 403)?;
    for user in ["tester", "someone"] {
        let reply = ask(user)??;
        println!(
            "    x-user: {user:<8} → {} {}",
            reply.status,
            reply.fields.get("message").map_or_else(|| reply.body.trim().to_owned(), Clone::clone)
        );
    }
    objects.policy("no-client-to-v2", None)?;
    wait_for("tester", 200)?;
    println!(
        "    policy removed: x-user tester → 200 again (the node running the chosen v2 pod decided, by the client's SPIFFE identity)"
    );

    step("peer authentication: a pod outside the mesh (namespace outside, on node2) calls a v1 pod directly");
    let outsider = cluster.add_pod(2, "outside", "outsider").context("a pod outside the mesh")?;
    let (v1, _) = canary
        .backends
        .iter()
        .find(|(p, _)| p.node == "node1" && p.name.starts_with("backend-v1"))
        .context("a v1 pod on node1")?;
    let direct = SocketAddr::from((v1.ip, scenarios::TARGET_PORT));
    // The status of a GET of v1's pod, sent from where `run` runs it (a pod, or the node).
    let get = || {
        HttpClient::connect(direct, "backend", TIMEOUT).and_then(|mut c| c.get("/", &[])).map(|r| r.status)
    };
    let plain = |pod: &Pod| -> anyhow::Result<std::io::Result<u16>> { Ok(pod.run(get)?) };
    let probe = || -> anyhow::Result<std::io::Result<u16>> { Ok(cluster.node(1).run(get)?) };
    println!(
        "    permissive (the default): {} → {:?}: node1 captured it in the pod (sk_lookup) and let it on, unauthenticated",
        direct,
        plain(&outsider)?.map_err(|e| e.kind())
    );
    objects.strict(&canary.objects)?;
    println!("    kubectl label namespace demo gammaray.dev/peer-authentication=strict");
    let started_strict = Instant::now();
    let refused = loop {
        match plain(&outsider)? {
            Err(e) => break e,
            Ok(_) if started_strict.elapsed() < TIMEOUT => {
                std::thread::sleep(std::time::Duration::from_millis(50))
            }
            Ok(status) => bail!("strict was not in force after {TIMEOUT:?}: answered {status}"),
        }
    };
    println!("    strict: the pod outside the mesh → {:?} (no mesh identity)", refused.kind());
    println!("    strict: node1's own address (the kubelet's probes) → {:?}", probe()?.map_err(|e| e.kind()));
    let log = std::fs::read_to_string(&agents[0].log)?;
    if let Some(line) = log.lines().rev().find(|l| l.contains("strict_unauthenticated")) {
        println!("    node1: {}", line.split_once(" WARN ").map_or(line, |(_, rest)| rest.trim()));
    }

    step("mutual TLS between the nodes: the identities node2 verified and saw");
    let node2_log = std::fs::read_to_string(&agents[1].log)?;
    let mut pairs = std::collections::BTreeSet::new();
    for line in node2_log.lines().filter(|l| l.contains("inbound mTLS connection")) {
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .unwrap_or("?")
                .to_owned()
        };
        pairs.insert((field("src_identity"), field("dst_identity")));
    }
    for (src, dst) in &pairs {
        println!("    {src} → {dst}");
    }
    let st1 = agents[0].status()?;
    let st2 = agents[1].status()?;
    println!(
        "    node1 opened {} HBONE tunnels (pooled: they carry all its requests to node2's pods); node2 accepted {} and refused {} handshakes",
        st1.outbound.hbone_tunnels, st2.outbound.inbound_tunnels, st2.outbound.tls_refused
    );
    let node1_log = std::fs::read_to_string(&agents[0].log)?;
    if let Some(line) = node1_log
        .lines()
        .find(|l| l.contains("\"request\"") || (l.contains(" request ") && l.contains("mtls=true")))
    {
        println!("    an access log line from node1:\n    {}", line.trim());
    }

    step("the kernel's own log lines, from node1's agent log (aya-log)");
    let log = std::fs::read_to_string(&agents[0].log)?;
    for line in log.lines().filter(|l| l.contains("gammaray::kernel")).take(3) {
        println!("    {line}");
    }
    let st = agents[0].status()?;
    println!(
        "    node1 totals: {} connections redirected, {} lookup misses, {} HTTP requests routed",
        st.kernel.redirected, st.kernel.lookup_misses, st.outbound.requests
    );

    step(
        "upgrading node1's agent under traffic: a second agent adopts the pinned eBPF links and maps, the first drains",
    );
    let before = agents[0].status()?;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (upgraded, (ok, failed), drained) = std::thread::scope(|s| -> anyhow::Result<_> {
        let load = s.spawn(|| steady(&canary.client, &stop));
        std::thread::sleep(Duration::from_millis(300));
        let args = AgentArgs { instance: Some("upgraded".into()), ..args_for(&cluster.node(1).name) };
        let upgraded = Agent::start(&agent_bin, &cluster, cluster.node(1), &args)?;
        upgraded.wait_until(|s| s.frontends >= 3)?;
        let signalled = Instant::now();
        agents[0].terminate();
        let exit = agents[0].wait_exit(Duration::from_secs(30)).context("the old agent exits")?;
        anyhow::ensure!(exit.success(), "the old agent exited with {exit:?}");
        let drained = signalled.elapsed();
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let counts = load.join().map_err(|_| anyhow::anyhow!("the load thread panicked"))??;
        Ok((upgraded, counts, drained))
    })?;
    let st = upgraded.status()?;
    println!(
        "    the new agent {:?} links {:?} (before: {:?}); the old one drained and exited {:.0} ms after SIGTERM",
        st.attachment.adoption,
        st.attachment.link_ids,
        before.attachment.link_ids,
        drained.as_secs_f64() * 1000.0
    );
    println!("    {ok} requests meanwhile, {failed} failed");
    anyhow::ensure!(failed == 0, "{failed} requests failed during the upgrade");
    agents[0] = upgraded;

    step(
        "cleaning up: agents stop (their links stay pinned), the run's bpf file system is unmounted (the links detach), namespaces and cgroups go",
    );
    drop(agents);
    drop(canary);
    drop(objects);
    drop(cluster);
    println!("\ndone in {:.1} s after the build", started.elapsed().as_secs_f64());
    Ok(())
}

fn header_route() -> String {
    "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: backend-header, namespace: demo}\nspec:\n  parentRefs: [{group: '', kind: Service, name: backend, port: 80}]\n  rules:\n  - matches: [{headers: [{name: x-user, value: tester}]}]\n    filters: [{type: RequestHeaderModifier, requestHeaderModifier: {add: [{name: x-canary, value: 'true'}]}}]\n    backendRefs: [{name: backend-v2, port: 80}]\n  - backendRefs: [{name: backend-v1, port: 80}]\n".to_owned()
}

/// Sends `n` GETs on one keep-alive connection from `pod`, with a progress bar; returns the
/// count per answering version.
fn send(pod: &Pod, n: usize, headers: &[(&str, &str)]) -> anyhow::Result<BTreeMap<String, usize>> {
    let started = Instant::now();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let counts = pod.run(|| -> anyhow::Result<BTreeMap<String, usize>> {
        let mut client =
            HttpClient::connect(SocketAddr::from((scenarios::BACKEND_VIP, 80)), "backend", TIMEOUT)?;
        let mut counts = BTreeMap::new();
        for i in 1..=n {
            let reply = client.get("/", headers).with_context(|| format!("request {i}"))?;
            if reply.status != 200 {
                bail!("request {i} got {}: {}", reply.status, reply.body);
            }
            *counts.entry(reply.fields.get("message").cloned().unwrap_or_default()).or_insert(0) += 1;
            if tty && (i % 25 == 0 || i == n) {
                let filled = i * 40 / n;
                print!("\r    [{}{}] {i}/{n}", "#".repeat(filled), " ".repeat(40 - filled));
                let _ = std::io::stdout().flush();
            }
        }
        if tty {
            println!();
        }
        Ok(counts)
    })??;
    println!("    {n} requests in {:.2} s, all 200", started.elapsed().as_secs_f64());
    Ok(counts)
}

/// Requests from `pod` to the Service, one every 5 ms until `stop`, on a kept-alive connection
/// that is replaced when a response says `connection: close`: (answered, failed).
fn steady(pod: &Pod, stop: &std::sync::atomic::AtomicBool) -> anyhow::Result<(usize, usize)> {
    pod.run(|| {
        let (mut ok, mut failed) = (0, 0);
        let mut conn: Option<HttpClient> = None;
        // Bounded: the caller stops it within seconds.
        for _ in 0..20_000 {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            let reply = match conn.as_mut() {
                Some(c) => c.get("/", &[]),
                None => {
                    HttpClient::connect(SocketAddr::from((scenarios::BACKEND_VIP, 80)), "backend", TIMEOUT)
                        .and_then(|mut c| {
                            let r = c.get("/", &[]);
                            conn = Some(c);
                            r
                        })
                }
            };
            match reply {
                Ok(r) if r.status == 200 => {
                    ok += 1;
                    if r.headers.get("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
                        conn = None;
                    }
                }
                _ => {
                    failed += 1;
                    conn = None;
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        (ok, failed)
    })
    .map_err(|e| anyhow::anyhow!("enter the client pod: {e}"))
}

fn chart(counts: &BTreeMap<String, usize>, total: usize) {
    for (message, count) in counts {
        let share = *count as f64 / total as f64;
        let bar = "█".repeat((share * 50.0).round() as usize);
        println!("    {message:<24} {bar:<50} {count:>4} ({:.1}%)", share * 100.0);
    }
}

fn indent(text: &str) -> String {
    text.lines().filter(|l| *l != "---").map(|l| format!("    | {l}\n")).collect()
}
