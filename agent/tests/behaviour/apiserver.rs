//! The Kubernetes wiring against testkit's fake API server, through a real `kube::Client`: the
//! source's watchers feed the snapshot, route status is written by the Lease holder only, and
//! dropped watches, 410 Gone and a restarted server lose no update.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use gammaray_proxy::snapshot::{RouteTable, Snapshot};
use gammaray_testkit::apiserver::ApiServer;
use serde_json::Value;
use tokio::sync::watch;

use gammaray_agent::{
    generation::{Generation, Publisher},
    kube_source::{self, SourceOptions},
    status_writer::{self, LeaseConfig},
    translate::Options,
};

const WAIT: Duration = Duration::from_secs(20);
const VIP: &str = "10.96.0.10";

fn client(server: &ApiServer) -> kube::Client {
    let config = kube::Config::new(server.url().parse().expect("server URL"));
    kube::Client::try_from(config).expect("client")
}

/// Namespace `demo` with Services `backend`, `backend-v1` and `backend-v2`, their pods and
/// EndpointSlices.
fn world() -> String {
    let mut y = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {gammaray.dev/dataplane-mode: ambient}}\n",
    );
    for (i, (svc, ip, pods)) in [
        ("backend", VIP, vec![("backend-v1-a", "10.244.1.2"), ("backend-v2-a", "10.244.1.3")]),
        ("backend-v1", "10.96.0.11", vec![("backend-v1-a", "10.244.1.2")]),
        ("backend-v2", "10.96.0.12", vec![("backend-v2-a", "10.244.1.3")]),
    ]
    .into_iter()
    .enumerate()
    {
        y.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {svc}, namespace: demo}}\nspec: {{clusterIP: {ip}, clusterIPs: [{ip}], ports: [{{name: http, port: 80, targetPort: 8080, appProtocol: http}}]}}\n"
        ));
        let endpoints: Vec<String> = pods
            .iter()
            .map(|(pod, ip)| {
                format!("{{addresses: ['{ip}'], nodeName: node1, conditions: {{ready: true}}, targetRef: {{kind: Pod, namespace: demo, name: {pod}}}}}")
            })
            .collect();
        y.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {svc}-x{i}, namespace: demo, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{}]\n",
            endpoints.join(", ")
        ));
    }
    for (pod, ip) in [("backend-v1-a", "10.244.1.2"), ("backend-v2-a", "10.244.1.3")] {
        y.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: demo, uid: uid-{pod}}}\nspec: {{nodeName: node1, containers: [{{name: app, image: app}}]}}\nstatus: {{podIP: '{ip}', phase: Running}}\n"
        ));
    }
    y
}

fn canary(v1: u32, v2: u32) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: canary, namespace: demo}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: backend, port: 80}}]\n  rules:\n  - backendRefs: [{{name: backend-v1, port: 80, weight: {v1}}}, {{name: backend-v2, port: 80, weight: {v2}}}]\n"
    )
}

/// The weights of the first rule of the producer routes on the `backend` frontend.
fn weights(s: &Snapshot) -> Option<Vec<u32>> {
    let frontend = s.frontend(SocketAddr::new(VIP.parse().expect("ip"), 80))?;
    match frontend.producer.as_deref()? {
        RouteTable::Http(rules) => Some(rules.first()?.action.backends.iter().map(|b| b.weight).collect()),
        RouteTable::Grpc(_) => None,
    }
}

struct Source {
    snapshot: watch::Receiver<Arc<Snapshot>>,
    generation: watch::Receiver<Arc<Generation>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Source {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn start_source(server: &ApiServer) -> Source {
    let (publisher, sub) = Publisher::new(Options::default());
    let options = SourceOptions { debounce: Duration::from_millis(20), ..Default::default() };
    let task = tokio::spawn(kube_source::run(client(server), options, publisher));
    Source { snapshot: sub.snapshot, generation: sub.generation, task }
}

async fn wait_for_weights(source: &mut Source, want: &[u32], what: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        if weights(&source.snapshot.borrow_and_update()).as_deref() == Some(want) {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "{what}: weights {want:?} never reached the snapshot");
        let _ = tokio::time::timeout(left, source.snapshot.changed()).await;
    }
}

/// Waits until `check` passes on the server, polling.
async fn eventually<T>(what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        match check() {
            Ok(v) => return v,
            Err(why) if Instant::now() > deadline => panic!("{what}: {why}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_on_the_api_server_reach_the_snapshot_and_a_bad_object_is_skipped() {
    let server = ApiServer::start().expect("fake API server");
    server.apply_yaml(&world());
    server.apply_yaml(&canary(90, 10));
    // An HTTPRoute the agent cannot decode (rules must be a list): logged, skipped.
    server.apply_yaml(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: broken, namespace: demo}\nspec: {parentRefs: [{group: '', kind: Service, name: backend-v1}], rules: oops}\n",
    );
    let mut source = start_source(&server);
    wait_for_weights(&mut source, &[90, 10], "initial list").await;
    assert!(
        source.generation.borrow().statuses.iter().all(|s| s.route != "demo/broken"),
        "the broken route is skipped, not half-applied"
    );
    server.apply_yaml(&canary(50, 50));
    wait_for_weights(&mut source, &[50, 50], "a weight change").await;
    server.delete("gateway.networking.k8s.io/v1", "HTTPRoute", "demo", "canary");
    let deadline = Instant::now() + WAIT;
    while weights(&source.snapshot.borrow_and_update()).is_some() {
        assert!(Instant::now() < deadline, "a deleted route leaves the snapshot");
        let _ = tokio::time::timeout(WAIT, source.snapshot.changed()).await;
    }
    assert!(source.generation.borrow().objects.pods.len() == 2, "the objects are published for enrolment");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watches_410_gone_and_a_restarted_server_lose_no_update() {
    let server = ApiServer::start_with(Duration::from_millis(200)).expect("fake API server");
    server.apply_yaml(&world());
    server.apply_yaml(&canary(90, 10));
    let mut source = start_source(&server);
    wait_for_weights(&mut source, &[90, 10], "initial list").await;

    // The server ends every watch; the watchers resume from their resourceVersion.
    server.drop_watches();
    server.apply_yaml(&canary(80, 20));
    wait_for_weights(&mut source, &[80, 20], "after dropped watches").await;

    // A write, then the history compacted, while the watchers are cut off: resuming from their
    // resourceVersion gets 410 Gone, and they list again.
    server.stop();
    server.apply_yaml(&canary(70, 30));
    server.compact();
    server.resume();
    wait_for_weights(&mut source, &[70, 30], "after 410 Gone").await;
    assert!(server.expired_watches() > 0, "the watchers were told 410 Gone");

    // The server goes away; a write lands while it is down (another replica, same etcd).
    server.stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.apply_yaml(&canary(60, 40));
    tokio::time::sleep(Duration::from_millis(700)).await;
    server.resume();
    wait_for_weights(&mut source, &[60, 40], "the write made while the server was down").await;
    server.apply_yaml(&canary(55, 45));
    wait_for_weights(&mut source, &[55, 45], "after the restart").await;
}

/// The entry with our controller name in the route's status, if any.
fn our_parent(route: &Value) -> Option<Value> {
    route["status"]["parents"]
        .as_array()?
        .iter()
        .find(|p| p["controllerName"] == gammaray_agent::translate::CONTROLLER_NAME)
        .cloned()
}

fn condition(parent: &Value, type_: &str) -> (String, String, i64) {
    let c = parent["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .cloned()
        .unwrap_or_default();
    (
        c["status"].as_str().unwrap_or("").to_owned(),
        c["reason"].as_str().unwrap_or("").to_owned(),
        c["observedGeneration"].as_i64().unwrap_or(-1),
    )
}

struct Writer {
    leading: Arc<AtomicBool>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    _source: Source,
}

fn start_writer(server: &ApiServer, identity: &str) -> Writer {
    let source = start_source(server);
    let leading = Arc::new(AtomicBool::new(false));
    let (stop, stop_rx) = watch::channel(false);
    let lease = LeaseConfig {
        namespace: "gammaray-system".into(),
        name: "gammaray-route-status".into(),
        identity: identity.into(),
        duration: Duration::from_secs(2),
    };
    let task = tokio::spawn(status_writer::run(
        client(server),
        lease,
        source.generation.clone(),
        stop_rx,
        leading.clone(),
    ));
    Writer { leading, stop, task, _source: source }
}

fn route_yaml(name: &str, parent: &str, backend: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: {parent}, port: 80}}]\n  rules:\n  - backendRefs: [{{name: {backend}, port: 80}}]\n"
    )
}

fn route(server: &ApiServer, name: &str) -> Value {
    server.get("gateway.networking.k8s.io/v1", "HTTPRoute", "demo", name).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_written_with_the_right_conditions_and_other_controllers_entries_kept() {
    let server = ApiServer::start().expect("fake API server");
    server.apply_yaml(&world());
    server.apply_yaml(&route_yaml("valid", "backend-v1", "backend-v1"));
    server.apply_yaml(&route_yaml("missing-backend", "backend-v2", "backend-nope"));
    server.apply_yaml(&route_yaml("bad-parent", "ghost", "backend-v1"));
    // Another mesh's entry on the valid route must survive our writes.
    let mut valid = route(&server, "valid");
    valid["status"] = serde_json::json!({"parents": [{"parentRef": {"group": "", "kind": "Service", "name": "backend-v1"}, "controllerName": "example.com/other-mesh", "conditions": []}]});
    server.apply(valid);
    let writer = start_writer(&server, "node1");

    eventually("the valid route's status", || {
        let r = route(&server, "valid");
        let ours = our_parent(&r).ok_or("no entry yet")?;
        let generation = r["metadata"]["generation"].as_i64().unwrap_or(0);
        let want = ("True".to_owned(), "Accepted".to_owned(), generation);
        (condition(&ours, "Accepted") == want
            && condition(&ours, "ResolvedRefs") == ("True".into(), "ResolvedRefs".into(), generation))
            .then_some(())
            .ok_or(format!("{ours}"))
    })
    .await;
    let parents = route(&server, "valid")["status"]["parents"].as_array().cloned().unwrap_or_default();
    assert!(
        parents.iter().any(|p| p["controllerName"] == "example.com/other-mesh"),
        "the other controller's entry is kept: {parents:?}"
    );
    eventually("the missing backend's status", || {
        let ours = our_parent(&route(&server, "missing-backend")).ok_or("no entry yet")?;
        let (s, reason, _) = condition(&ours, "ResolvedRefs");
        (s == "False" && reason == "BackendNotFound").then_some(()).ok_or(format!("{ours}"))
    })
    .await;
    eventually("the bad parentRef's status", || {
        let ours = our_parent(&route(&server, "bad-parent")).ok_or("no entry yet")?;
        let (s, reason, _) = condition(&ours, "Accepted");
        (s == "False" && reason == "NoMatchingParent").then_some(()).ok_or(format!("{ours}"))
    })
    .await;

    // A spec change bumps the generation; the status follows it.
    server.apply_yaml(&route_yaml("valid", "backend-v1", "backend-v2"));
    eventually("observedGeneration follows the spec", || {
        let r = route(&server, "valid");
        let ours = our_parent(&r).ok_or("no entry")?;
        let generation = r["metadata"]["generation"].as_i64().unwrap_or(0);
        (generation == 2 && condition(&ours, "Accepted").2 == 2).then_some(()).ok_or(format!("{r}"))
    })
    .await;
    // Once settled, the agent's own writes coming back through the watch cause no more writes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let writes = |server: &ApiServer| server.audit().iter().filter(|a| a.path.ends_with("/status")).count();
    let settled = writes(&server);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(writes(&server), settled, "no status writes once everything says what it should");
    assert!(writer.leading.load(Ordering::Acquire));
    let _ = writer.stop.send(true);
    let _ = writer.task.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_writes_status_and_another_agent_takes_over_when_it_stops() {
    let server = ApiServer::start().expect("fake API server");
    server.apply_yaml(&world());
    server.apply_yaml(&route_yaml("r1", "backend-v1", "backend-v1"));
    let a = start_writer(&server, "node-a");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = start_writer(&server, "node-b");
    eventually("r1's status", || our_parent(&route(&server, "r1")).map(|_| ()).ok_or("none yet".to_owned()))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (holder, other) = match (a.leading.load(Ordering::Acquire), b.leading.load(Ordering::Acquire)) {
        (true, false) => (a, b),
        (false, true) => (b, a),
        both => panic!("exactly one agent holds the lease, got {both:?}"),
    };
    let status_writers = |server: &ApiServer| -> Vec<String> {
        server
            .audit()
            .iter()
            .filter(|w| w.path.ends_with("/status"))
            .filter_map(|w| w.field_manager.clone())
            .collect()
    };
    let first = status_writers(&server);
    assert!(!first.is_empty());
    let holder_name = first[0].clone();
    assert!(first.iter().all(|w| *w == holder_name), "only the holder wrote status: {first:?}");

    // The holder dies without releasing (a crash): the other takes over once the lease expires.
    holder.task.abort();
    drop(holder);
    let took_over = Instant::now();
    eventually("the other agent takes over", || {
        other.leading.load(Ordering::Acquire).then_some(()).ok_or("not yet".to_owned())
    })
    .await;
    println!("takeover after {:?} (lease 2 s)", took_over.elapsed());
    server.apply_yaml(&route_yaml("r2", "backend-v2", "backend-v2"));
    eventually("the new holder writes r2's status", || {
        our_parent(&route(&server, "r2")).map(|_| ()).ok_or("none yet".to_owned())
    })
    .await;
    let later: Vec<String> = status_writers(&server).into_iter().skip(first.len()).collect();
    assert!(!later.is_empty() && later.iter().all(|w| *w != holder_name), "the new holder wrote: {later:?}");

    // A clean stop releases the Lease at once, so a waiting agent need not wait it out.
    let third = start_writer(&server, "node-c");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!third.leading.load(Ordering::Acquire), "the lease is still held");
    let _ = other.stop.send(true);
    let _ = other.task.await;
    let lease = server.get("coordination.k8s.io/v1", "Lease", "gammaray-system", "gammaray-route-status");
    let holder = lease.as_ref().and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_owned));
    assert!(
        holder.as_deref() != Some("node-a") && holder.as_deref() != Some("node-b"),
        "released on a clean stop: {lease:?}"
    );
    eventually("the waiting agent takes the released lease", || {
        third.leading.load(Ordering::Acquire).then_some(()).ok_or("not yet".to_owned())
    })
    .await;
    let _ = third.stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_secret_is_created_once_and_read_back_as_a_usable_ca() {
    let server = ApiServer::start().expect("fake API server");
    let client = client(&server);
    let (ns, name) = ("gammaray-system", "gammaray-ca");
    assert!(
        gammaray_agent::kube_client::bootstrap_ca(&client, ns, name, "cluster.local")
            .await
            .expect("bootstrap")
    );
    let first = server.get("v1", "Secret", ns, name).expect("the Secret exists");
    assert!(
        !gammaray_agent::kube_client::bootstrap_ca(&client, ns, name, "cluster.local")
            .await
            .expect("bootstrap again"),
        "a second bootstrap leaves the existing CA alone"
    );
    assert_eq!(server.get("v1", "Secret", ns, name).expect("still there"), first, "unchanged");
    let (cert, key) = gammaray_agent::kube_client::read_ca(&client, ns, name, Duration::from_secs(1))
        .await
        .expect("read back");
    gammaray_proxy::identity::Authority::from_pem(&cert, &key).expect("a usable CA");
    let missing = gammaray_agent::kube_client::read_ca(&client, ns, "nope", Duration::from_millis(100)).await;
    assert!(
        missing.expect_err("no such Secret").to_string().contains("ca bootstrap"),
        "the error says what to do"
    );
}
