//! `cargo xtask conformance [--cases DIR]`: the GAMMA conformance catalogue against the real
//! data path. For each base manifest set, a two-node simulated cluster is built with real agents
//! (eBPF redirect, node proxies, HBONE mTLS between nodes); testkit's controllers turn the
//! Deployments into echo pods and the Services into ClusterIPs and EndpointSlices, and the
//! agents enrol every pod, as the namespaces carry the ambient label. Each case's manifests are
//! then applied in turn (the runner waits until both agents have the new config), and each
//! request is sent from inside its client pod under the upstream harness rules, plus the
//! stricter checks.
//!
//! The agents read the configuration from a manifest directory they re-read, or with
//! `--apiserver real` from a real kube-apiserver and etcd (testkit's control plane, inside node1
//! on its address): `deploy/` is applied there, the agents run with their ServiceAccount's token,
//! the world's Pods are created through the server (their UIDs, which name the pods' cgroups, are
//! the server's), each case's objects replace the last case's, and every route of a case must
//! have its status written, through the Gateway API CRDs' validation, with none refused.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use gammaray_testkit::{
    Cluster,
    catalogue::{self, Case, Outcome, Request},
    controllers::{CreatePod, World},
    controlplane::{Assets, ControlPlane},
    istio_echo,
};
use serde_json::Value;

pub use crate::agents::Source;
use crate::agents::{
    Agent, Control as _, Signer, kubeconfig_agent, manifest_agent, real_api_server, require_privileges,
    write_atomically,
};

/// How long a request may take to become consistent, and how many passes in a row it needs.
const MAX_TIME_TO_CONSISTENCY: Duration = Duration::from_secs(30);
const PASSES_IN_A_ROW: u32 = 3;
const PAUSE_AFTER_FAILURE: Duration = Duration::from_millis(100);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The features gammaray supports; a case needing any other is reported as skipped.
const SUPPORTED_FEATURES: &[&str] = &[
    "Mesh",
    "HTTPRoute",
    "GRPCRoute",
    "MeshClusterIPMatching",
    "MeshConsumerRoute",
    "MeshHTTPRouteRewritePath",
    "MeshHTTPRouteSchemeRedirect",
    "MeshHTTPRouteRedirectPort",
    "MeshHTTPRouteRedirectPath",
    "MeshHTTPRouteBackendRequestHeaderModification",
    "MeshHTTPRouteQueryParamMatching",
    "MeshHTTPRouteNamedRouteRule",
    "HTTPRouteResponseHeaderModification",
    "HTTPRouteParentRefPort",
    "HTTPRoute303RedirectStatusCode",
    "HTTPRoute307RedirectStatusCode",
    "HTTPRoute308RedirectStatusCode",
];

/// The result of one case.
pub struct CaseResult {
    pub name: String,
    pub features: Vec<String>,
    pub level: String,
    pub outcome: Verdict,
    pub time: Duration,
}

pub enum Verdict {
    Passed,
    Failed(Vec<String>),
    Skipped(String),
}

/// Counts of a run.
pub struct Summary {
    pub passed: u64,
    pub failed: u64,
    pub skipped: u64,
}

/// Runs every case in `dir` (its `cases/` and the base files beside it), prints the table and
/// returns the counts. Errors only when the run itself cannot happen.
pub fn run(dir: &Path, build: crate::agents::Build, source: Source) -> anyhow::Result<Summary> {
    require_privileges("the conformance runner")?;
    let assets = match source {
        Source::Manifests => None,
        Source::Real => Some(Assets::find().map_err(|e| anyhow::anyhow!("--apiserver real: {e}"))?),
    };
    let cases = catalogue::load_cases(dir)
        .with_context(|| format!("reading the conformance catalogue in {}", dir.display()))?;
    if cases.is_empty() {
        bail!("no cases in {}", dir.join("cases").display());
    }
    let agent_bin = crate::agents::agent_binary(build)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;

    // Cases sharing a base run in one world, as upstream runs its tests on one cluster.
    let mut by_base: BTreeMap<String, Vec<Case>> = BTreeMap::new();
    for (_, case) in cases {
        by_base.entry(case.base.clone()).or_default().push(case);
    }
    let started = Instant::now();
    let mut results = Vec::new();
    for (base, cases) in &by_base {
        println!("conformance: building the world of {base} for {} cases", cases.len());
        results.extend(
            run_base(dir, cases, &agent_bin, &runtime, assets.as_ref())
                .with_context(|| format!("world of {base}"))?,
        );
    }
    Ok(report(&results, started.elapsed()))
}

fn run_base(
    dir: &Path,
    cases: &[Case],
    agent_bin: &Path,
    runtime: &tokio::runtime::Runtime,
    assets: Option<&Assets>,
) -> anyhow::Result<Vec<CaseResult>> {
    let cluster = Cluster::new(2).context("building the simulated cluster")?;
    let bases = catalogue::base_texts(dir, &cases[0])?;
    let mut assigned = BTreeMap::new();
    for text in &bases {
        assigned.extend(catalogue::cluster_ip_assignments(text));
    }
    // Held to the end of the run: the agents renew their node CAs with it.
    let signer = Signer::start(agent_bin, &cluster.dir().join("signer"), &[])?;
    let ca = signer.access();
    let (mut config, args) = match assets {
        None => {
            let manifests = cluster.dir().join("manifests");
            std::fs::create_dir_all(&manifests)?;
            let args = manifest_agent(&manifests, &ca, "warn");
            (Config::Manifests { dir: manifests }, args)
        }
        Some(assets) => {
            let (plane, kubeconfig) = real_api_server(&cluster, assets, &namespaces_of(&bases)?)?;
            let args = kubeconfig_agent(&kubeconfig, &ca, "warn");
            (Config::Real { plane: Box::new(plane), last: None }, args)
        }
    };
    let world = {
        // With a real API server, each Pod object is created there first: its UID is the pod's.
        let create = |object: &Value| -> gammaray_testkit::Result<String> {
            let Config::Real { plane, .. } = &config else { unreachable!("only with a real API server") };
            crate::agents::create_on(plane, object)
        };
        let create_pod: Option<&CreatePod<'_>> = matches!(config, Config::Real { .. }).then_some(&create);
        World::build(&cluster, &bases, &assigned, runtime.handle(), create_pod).context("the base world")?
    };
    config.load_world(&world.objects)?;
    let mut agents = Vec::new();
    for node in cluster.nodes() {
        let agent = Agent::start(agent_bin, &cluster, node, &args)?;
        agent.wait_until(|s| s.config_version > 0 && s.frontends > 0)?;
        agents.push(agent);
    }
    // The world's namespaces carry the ambient label: each agent enrols its node's pods.
    for agent in &agents {
        let on_node = world.pods.iter().filter(|p| p.pod.node == agent.node).count();
        agent
            .wait_until(|s| s.enrolled.len() >= on_node)
            .with_context(|| format!("{} enrolling its pods", agent.node))?;
    }
    let mut results = Vec::new();
    for case in cases {
        let started = Instant::now();
        let level = case.level();
        let outcome =
            if let Some(missing) = case.features.iter().find(|f| !SUPPORTED_FEATURES.contains(&f.as_str())) {
                Verdict::Skipped(format!("feature {missing} is not supported"))
            } else {
                config.apply_case(case, &agents)?;
                let mut wrong = runtime.block_on(run_case(&world, case));
                wrong.extend(config.statuses_written(case));
                if wrong.is_empty() { Verdict::Passed } else { Verdict::Failed(wrong) }
            };
        results.push(CaseResult {
            name: case.name.clone(),
            features: case.features.clone(),
            level,
            outcome,
            time: started.elapsed(),
        });
    }
    // The cases prove the mesh only if their traffic went through it: the kernel redirected
    // the pods' connections to both node proxies, and cross-node requests rode HBONE.
    let mut unmeshed = Vec::new();
    for agent in &agents {
        let st = agent.status()?;
        if st.kernel.redirected == 0 || st.outbound.requests == 0 {
            unmeshed.push(format!(
                "{}: {} connections redirected, {} requests routed",
                agent.node, st.kernel.redirected, st.outbound.requests
            ));
        }
        println!(
            "conformance: {} redirected {} connections ({} lookup misses), routed {} requests, opened {} HBONE tunnels",
            agent.node,
            st.kernel.redirected,
            st.kernel.lookup_misses,
            st.outbound.requests,
            st.outbound.hbone_tunnels
        );
    }
    if !unmeshed.is_empty() {
        bail!("traffic did not go through the mesh: {}", unmeshed.join("; "));
    }
    if let Config::Real { .. } = config {
        // The API server refused no status the agents wrote (they log each refusal).
        for agent in &agents {
            let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
            if let Some(line) = log.lines().find(|l| l.contains("refused the route's status as invalid")) {
                bail!("{}: the API server refused a route status: {line}", agent.node);
            }
        }
    }
    drop(agents);
    drop(world);
    drop(cluster);
    Ok(results)
}

/// The bases' Namespaces, as one YAML text: the world's Pods are created in them.
fn namespaces_of(bases: &[String]) -> anyhow::Result<String> {
    let mut namespaces = String::new();
    for text in bases {
        for doc in serde_yaml::Deserializer::from_str(text) {
            let Ok(value) = <Value as serde::Deserialize>::deserialize(doc) else { continue };
            if value["kind"] == "Namespace" {
                namespaces.push_str("---\n");
                namespaces.push_str(&serde_yaml::to_string(&value)?);
            }
        }
    }
    Ok(namespaces)
}

/// Where the agents read the configuration from, for one world.
enum Config {
    Manifests {
        dir: PathBuf,
    },
    Real {
        plane: Box<ControlPlane>,
        /// The last case's objects, removed when the next is applied.
        last: Option<String>,
    },
}

impl Config {
    /// The world's objects, where the agents read them.
    fn load_world(&self, objects: &str) -> anyhow::Result<()> {
        match self {
            Config::Manifests { dir } => write_atomically(&dir.join("00-world.yaml"), objects),
            Config::Real { plane, .. } => {
                plane.try_apply_yaml(objects).map_err(|e| anyhow::anyhow!("the world's objects: {e}"))
            }
        }
    }

    /// Puts the case's objects in place of the last case's and waits until both agents route by
    /// them.
    fn apply_case(&mut self, case: &Case, agents: &[Agent]) -> anyhow::Result<()> {
        let versions = || -> anyhow::Result<Vec<u64>> {
            agents.iter().map(|a| Ok(a.status()?.config_version)).collect()
        };
        let wait_past = |before: Vec<u64>| -> anyhow::Result<()> {
            for (agent, before) in agents.iter().zip(before) {
                agent.wait_until(|s| s.config_version > before)?;
            }
            Ok(())
        };
        let mut text = format!("# {}\n", case.name);
        for m in &case.manifests {
            text.push_str("---\n");
            text.push_str(&serde_yaml::to_string(m)?);
        }
        match self {
            Config::Manifests { dir } => {
                let before = versions()?;
                write_atomically(&dir.join("10-case.yaml"), &text)?;
                wait_past(before)
            }
            Config::Real { plane, last } => {
                if let Some(previous) = last.take() {
                    let before = versions()?;
                    plane
                        .delete_yaml(&previous)
                        .map_err(|e| anyhow::anyhow!("removing the last case: {e}"))?;
                    wait_past(before)?;
                }
                if case.manifests.is_empty() {
                    return Ok(());
                }
                let before = versions()?;
                plane.try_apply_yaml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", case.name))?;
                *last = Some(text);
                wait_past(before)
            }
        }
    }

    /// With a real API server: each route of the case has gammaray's status entry (so the status
    /// passed the CRDs' validation). What is missing after 10 s.
    fn statuses_written(&self, case: &Case) -> Vec<String> {
        let Config::Real { plane, .. } = self else { return Vec::new() };
        let mut missing = Vec::new();
        for m in &case.manifests {
            let kind = m["kind"].as_str().unwrap_or_default();
            if !matches!(kind, "HTTPRoute" | "GRPCRoute") {
                continue;
            }
            let (ns, name) = (
                m["metadata"]["namespace"].as_str().unwrap_or("default"),
                m["metadata"]["name"].as_str().unwrap_or_default(),
            );
            let api_version = m["apiVersion"].as_str().unwrap_or("gateway.networking.k8s.io/v1");
            let deadline = Instant::now() + Duration::from_secs(10);
            let ours = || {
                plane.get(api_version, kind, ns, name).is_some_and(|r| {
                    r["status"]["parents"].as_array().into_iter().flatten().any(|p| {
                        p["controllerName"] == gammaray_agent::translate::CONTROLLER_NAME
                            && p["conditions"][0]["observedGeneration"] == r["metadata"]["generation"]
                    })
                })
            };
            while !ours() {
                if Instant::now() > deadline {
                    missing.push(format!("{kind} {ns}/{name}: no status of this generation written in 10 s"));
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        missing
    }
}

/// Every request of the case under the harness rules, then its weight distribution; returns
/// what went wrong.
async fn run_case(world: &World, case: &Case) -> Vec<String> {
    let mut wrong = Vec::new();
    for req in &case.requests {
        if let Err(why) = eventually_consistent(world, req, |out| catalogue::check(req, out)).await {
            wrong.push(format!("request {} ({}): {}", req.id, req.upstream_subtest, why.join("; ")));
        }
    }
    if let Some(d) = &case.distribution {
        let Some(req) = case.requests.iter().find(|r| r.id == d.request) else {
            wrong.push(format!("distribution names request {}, which the case lacks", d.request));
            return wrong;
        };
        // First one answer from any backend, as upstream waits for the route to be live.
        let live = |out: &Outcome| {
            if out.status == 200 { Vec::new() } else { vec![format!("status {}", out.status)] }
        };
        if let Err(why) = eventually_consistent(world, req, live).await {
            wrong.push(format!("distribution: the route never answered 200: {}", why.join("; ")));
            return wrong;
        }
        let mut last = Vec::new();
        for _ in 0..d.attempts.max(1) {
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            for _ in 0..d.batch_size {
                let key = match send(world, req).await {
                    Ok(out) if out.status == 200 => out
                        .backend
                        .as_deref()
                        .map(catalogue::deployment_of)
                        .unwrap_or_else(|| "no hostname".into()),
                    Ok(out) => format!("status {}", out.status),
                    Err(e) => format!("error: {e}"),
                };
                *counts.entry(key).or_default() += 1;
            }
            last = catalogue::check_distribution(d, &counts);
            if last.is_empty() {
                break;
            }
            last.push(format!("counts {counts:?}"));
        }
        if !last.is_empty() {
            wrong.push(format!("distribution after {} attempts: {}", d.attempts.max(1), last.join("; ")));
        }
    }
    wrong
}

/// Sends `req` until `judge` finds nothing wrong [`PASSES_IN_A_ROW`] times in a row, pausing after
/// each failure, for at most [`MAX_TIME_TO_CONSISTENCY`]. Returns the last failure's reasons.
async fn eventually_consistent(
    world: &World,
    req: &Request,
    judge: impl Fn(&Outcome) -> Vec<String>,
) -> Result<(), Vec<String>> {
    let deadline = Instant::now() + MAX_TIME_TO_CONSISTENCY;
    let mut passes = 0;
    loop {
        let wrong = match send(world, req).await {
            Ok(out) => judge(&out),
            Err(e) => vec![e],
        };
        if wrong.is_empty() {
            passes += 1;
            if passes == PASSES_IN_A_ROW {
                return Ok(());
            }
            continue;
        }
        passes = 0;
        if Instant::now() + PAUSE_AFTER_FAILURE > deadline {
            return Err(wrong);
        }
        tokio::time::sleep(PAUSE_AFTER_FAILURE).await;
    }
}

/// One request from inside the client pod, as the echo client sends it: to the destination's
/// address (what DNS would resolve the URL's host to), with the URL's host as Host unless a
/// `Host` header overrides it.
async fn send(world: &World, req: &Request) -> Result<Outcome, String> {
    let client = world.pod_matching(&req.client.namespace, &req.client.pod_selector).ok_or_else(|| {
        format!("no client pod in {} matching {:?}", req.client.namespace, req.client.pod_selector)
    })?;
    let dst_ip: IpAddr = match req.destination.kind.as_str() {
        "service" => {
            let svc = req.destination.service.as_deref().ok_or("service destination without service")?;
            IpAddr::V4(*world.cluster_ips.get(svc).ok_or_else(|| format!("no ClusterIP for {svc}"))?)
        }
        "pod" => {
            let pod = req.destination.pod.as_deref().ok_or("pod destination without pod")?;
            IpAddr::V4(world.pod_of(pod).ok_or_else(|| format!("no pod of {pod}"))?.pod.ip)
        }
        other => return Err(format!("unknown destination kind {other}")),
    };
    let dst = SocketAddr::new(dst_ip, req.destination.port);
    let url = expand_url(world, &req.url)?;
    let (scheme, rest) = url.split_once("://").ok_or_else(|| format!("URL without scheme: {url}"))?;
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let mut host =
        if scheme == "http" { authority.strip_suffix(":80").unwrap_or(authority) } else { authority }
            .to_owned();
    let mut headers = Vec::new();
    for (name, value) in &req.headers {
        if name.eq_ignore_ascii_case("host") {
            host = value.clone();
        } else {
            headers.push((name.clone(), value.clone()));
        }
    }
    let socket = client
        .pod
        .run(tokio::net::TcpSocket::new_v4)
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("socket in {}: {e}", client.pod.name))?;
    let stream = tokio::time::timeout(REQUEST_TIMEOUT, socket.connect(dst))
        .await
        .map_err(|_| format!("connect to {dst} timed out"))?
        .map_err(|e| format!("connect to {dst}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let call = async {
        match req.protocol.as_str() {
            "grpc" => {
                let method = req.grpc_method.as_deref().unwrap_or(istio_echo::ECHO_METHOD);
                istio_echo::grpc_call(stream, &host, method, &headers, "conformance").await
            }
            "http" => {
                let path = req.path.as_deref().unwrap_or("/");
                let method = req.method.as_deref().unwrap_or("GET");
                istio_echo::http_call(stream, &host, method, path, &headers).await
            }
            other => Err(format!("unknown protocol {other}")),
        }
    };
    let reply = tokio::time::timeout(REQUEST_TIMEOUT, call)
        .await
        .map_err(|_| format!("request to {dst} timed out"))??;
    Ok(reply.outcome())
}

/// Replaces `{{podIP ns/workload}}` in a URL with that workload's pod IP.
fn expand_url(world: &World, url: &str) -> Result<String, String> {
    let Some(start) = url.find("{{podIP ") else { return Ok(url.to_owned()) };
    let end = url[start..].find("}}").ok_or_else(|| format!("unterminated placeholder in {url}"))? + start;
    let workload = url[start + "{{podIP ".len()..end].trim();
    let pod = world.pod_of(workload).ok_or_else(|| format!("no pod of {workload}"))?;
    Ok(format!("{}{}{}", &url[..start], pod.pod.ip, &url[end + 2..]))
}

/// Prints the table and the failures' details; returns the counts.
fn report(results: &[CaseResult], elapsed: Duration) -> Summary {
    let mut summary = Summary { passed: 0, failed: 0, skipped: 0 };
    println!();
    println!("{:<44} {:<28} {:<7} {:>7}  features", "test", "level", "result", "time");
    println!("{}", "-".repeat(110));
    for r in results {
        let result = match &r.outcome {
            Verdict::Passed => {
                summary.passed += 1;
                "PASS"
            }
            Verdict::Failed(_) => {
                summary.failed += 1;
                "FAIL"
            }
            Verdict::Skipped(_) => {
                summary.skipped += 1;
                "SKIP"
            }
        };
        println!(
            "{:<44} {:<28} {:<7} {:>6.2}s  {}",
            r.name,
            r.level,
            result,
            r.time.as_secs_f64(),
            r.features.join(", ")
        );
    }
    for r in results {
        match &r.outcome {
            Verdict::Failed(wrong) => {
                println!("\nFAIL {}:", r.name);
                for w in wrong {
                    println!("    {w}");
                }
            }
            Verdict::Skipped(why) => println!("\nSKIP {}: {why}", r.name),
            Verdict::Passed => {}
        }
    }
    println!("\nconformance: {} cases in {:.1} s", results.len(), elapsed.as_secs_f64());
    if summary.skipped > 0 {
        println!("{} skipped", summary.skipped);
    }
    println!("{} passed, {} failed", summary.passed, summary.failed);
    summary
}

/// The catalogue directory: `--cases DIR` if given, else where testkit finds the shared one.
pub fn dir(arg: Option<PathBuf>) -> PathBuf {
    arg.unwrap_or_else(catalogue::default_dir)
}
