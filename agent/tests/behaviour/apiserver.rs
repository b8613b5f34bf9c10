//! The Kubernetes wiring through a real `kube::Client`, against testkit's fake API server and
//! against a real kube-apiserver with etcd (testkit's control plane, one per test binary where
//! tests do not interfere): the source's watchers feed the snapshot, route status is written by
//! the Lease holder only and passes the CRDs' validation, and dropped watches, 410 Gone, an etcd
//! compaction and a restarted server lose no update. One test body runs against both servers
//! where that is natural; the fake keeps what only it can do cheaply (cut watches at a chosen
//! moment, hold objects a schema would refuse, count writes).

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use gammaray_proxy::snapshot::{RouteTable, Snapshot};
use gammaray_testkit::{apiserver::ApiServer, controlplane::ControlPlane};
use serde_json::Value;
use tokio::sync::watch;

use gammaray_agent::{
    generation::{Generation, Publisher},
    kube_client::{Access, client as agent_client},
    kube_source::{self, SourceOptions},
    status_writer::{self, LeaseConfig},
    translate::Options,
};

const WAIT: Duration = Duration::from_secs(20);

/// What the tests need of an API server: testkit's fake, or a real one.
pub(crate) trait Server: Sync {
    fn apply_yaml(&self, text: &str);
    fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value>;
    fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> bool;
    /// Sets the status of a route of the Gateway API (as another controller would).
    fn set_route_status(&self, kind: &str, namespace: &str, name: &str, status: Value);
    /// A client with an admin's rights, built as the agent builds its own.
    async fn client(&self) -> kube::Client;
}

impl Server for ApiServer {
    fn apply_yaml(&self, text: &str) {
        ApiServer::apply_yaml(self, text);
    }
    fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        ApiServer::get(self, api_version, kind, namespace, name)
    }
    fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> bool {
        ApiServer::delete(self, api_version, kind, namespace, name)
    }
    fn set_route_status(&self, kind: &str, namespace: &str, name: &str, status: Value) {
        let mut route = self.get("gateway.networking.k8s.io/v1", kind, namespace, name).expect("the route");
        route["status"] = status;
        self.apply(route);
    }
    async fn client(&self) -> kube::Client {
        // The fake speaks plain HTTP and asks for no credentials.
        let config = kube::Config::new(self.url().parse().expect("server URL"));
        kube::Client::try_from(config).expect("client")
    }
}

impl Server for ControlPlane {
    fn apply_yaml(&self, text: &str) {
        ControlPlane::apply_yaml(self, text);
    }
    fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        ControlPlane::get(self, api_version, kind, namespace, name)
    }
    fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> bool {
        ControlPlane::delete(self, api_version, kind, namespace, name)
    }
    fn set_route_status(&self, kind: &str, namespace: &str, name: &str, status: Value) {
        let route = serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": kind,
            "metadata": {"name": name, "namespace": namespace}, "status": status,
        });
        let args =
            ["apply", "--server-side", "--field-manager=other-mesh", "--subresource=status", "-f", "-"];
        self.kubectl_with_input(&args, Some(&route.to_string())).expect("set the route's status");
    }
    async fn client(&self) -> kube::Client {
        agent_client(&Access::Kubeconfig(self.kubeconfig().to_owned())).await.expect("a client")
    }
}

/// One test's corner of a shared server: its namespace, and the third octet of its Service
/// addresses (10.96.N.10–12) and pod addresses (10.244.N.2–3).
#[derive(Clone, Copy)]
pub(crate) struct Corner {
    pub(crate) ns: &'static str,
    pub(crate) net: u8,
}

impl Corner {
    pub(crate) fn vip(self) -> String {
        format!("10.96.{}.10", self.net)
    }

    /// Namespace `ns` with Services `backend`, `backend-v1` and `backend-v2`, their pods and
    /// EndpointSlices.
    pub(crate) fn world(self) -> String {
        let Corner { ns, net } = self;
        let (p1, p2) = (format!("10.244.{net}.2"), format!("10.244.{net}.3"));
        let mut y = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{gammaray.dev/dataplane-mode: ambient}}}}\n"
        );
        for (i, (svc, ip, pods)) in [
            ("backend", self.vip(), vec![("backend-v1-a", &p1), ("backend-v2-a", &p2)]),
            ("backend-v1", format!("10.96.{net}.11"), vec![("backend-v1-a", &p1)]),
            ("backend-v2", format!("10.96.{net}.12"), vec![("backend-v2-a", &p2)]),
        ]
        .into_iter()
        .enumerate()
        {
            y.push_str(&format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {svc}, namespace: {ns}}}\nspec: {{clusterIP: '{ip}', clusterIPs: ['{ip}'], ports: [{{name: http, port: 80, targetPort: 8080, appProtocol: http}}]}}\n"
            ));
            let endpoints: Vec<String> = pods
                .iter()
                .map(|(pod, ip)| {
                    format!("{{addresses: ['{ip}'], nodeName: node1, conditions: {{ready: true}}, targetRef: {{kind: Pod, namespace: {ns}, name: {pod}}}}}")
                })
                .collect();
            y.push_str(&format!(
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {svc}-x{i}, namespace: {ns}, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{}]\n",
                endpoints.join(", ")
            ));
        }
        for (pod, ip) in [("backend-v1-a", &p1), ("backend-v2-a", &p2)] {
            y.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {ns}}}\nspec: {{nodeName: node1, containers: [{{name: app, image: app}}]}}\nstatus: {{podIP: '{ip}', podIPs: [{{ip: '{ip}'}}], phase: Running}}\n"
            ));
        }
        y
    }

    pub(crate) fn canary(self, v1: u32, v2: u32) -> String {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: canary, namespace: {}}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: backend, port: 80}}]\n  rules:\n  - backendRefs: [{{name: backend-v1, port: 80, weight: {v1}}}, {{name: backend-v2, port: 80, weight: {v2}}}]\n",
            self.ns
        )
    }

    /// The weights of the first rule of the producer routes on the `backend` frontend.
    pub(crate) fn weights(self, s: &Snapshot) -> Option<Vec<u32>> {
        let frontend = s.frontend(SocketAddr::new(self.vip().parse().expect("ip"), 80))?;
        match frontend.producer.as_deref()? {
            RouteTable::Http(rules) => {
                Some(rules.first()?.action.backends.iter().map(|b| b.weight).collect())
            }
            RouteTable::Grpc(_) => None,
        }
    }

    pub(crate) fn route_yaml(self, name: &str, parent: &str, backend: &str) -> String {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: {}}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: {parent}, port: 80}}]\n  rules:\n  - backendRefs: [{{name: {backend}, port: 80}}]\n",
            self.ns
        )
    }

    pub(crate) fn route(self, server: &impl Server, name: &str) -> Value {
        server.get("gateway.networking.k8s.io/v1", "HTTPRoute", self.ns, name).unwrap_or_default()
    }
}

pub(crate) struct Source {
    snapshot: watch::Receiver<Arc<Snapshot>>,
    generation: watch::Receiver<Arc<Generation>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Source {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(crate) fn start_source_with(client: kube::Client, options: SourceOptions) -> Source {
    let (publisher, sub) = Publisher::new(Options::default());
    let task = tokio::spawn(kube_source::run(client, options, publisher));
    Source { snapshot: sub.snapshot, generation: sub.generation, task }
}

async fn start_source(server: &impl Server) -> Source {
    let options = SourceOptions { debounce: Duration::from_millis(20), ..Default::default() };
    start_source_with(server.client().await, options)
}

pub(crate) async fn wait_for_weights(
    source: &mut Source,
    corner: Corner,
    want: &[u32],
    what: &str,
) -> Duration {
    let (started, deadline) = (Instant::now(), Instant::now() + WAIT);
    loop {
        if corner.weights(&source.snapshot.borrow_and_update()).as_deref() == Some(want) {
            return started.elapsed();
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "{what}: weights {want:?} never reached the snapshot");
        let _ = tokio::time::timeout(left, source.snapshot.changed()).await;
    }
}

/// A route status as another mesh would write it: its own entry, accepting the route on the
/// Service `parent`.
fn other_mesh_status(parent: &str) -> Value {
    serde_json::json!({"parents": [{
        "parentRef": {"group": "", "kind": "Service", "name": parent},
        "controllerName": "example.com/other-mesh",
        "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}],
    }]})
}

/// Waits until `check` passes on the server, polling.
pub(crate) async fn eventually<T>(what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        match check() {
            Ok(v) => return v,
            Err(why) if Instant::now() > deadline => panic!("{what}: {why}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The shared real control plane, or `None` after a loud SKIP (a failure in CI).
fn real(test: &str) -> Option<&'static ControlPlane> {
    gammaray_testkit::controlplane::shared(test)
}

/// Initial list, a weight change and a deletion reach the snapshot.
async fn changes_reach_the_snapshot(server: &impl Server, corner: Corner) -> Source {
    server.apply_yaml(&corner.world());
    server.apply_yaml(&corner.canary(90, 10));
    let mut source = start_source(server).await;
    wait_for_weights(&mut source, corner, &[90, 10], "initial list").await;
    server.apply_yaml(&corner.canary(50, 50));
    wait_for_weights(&mut source, corner, &[50, 50], "a weight change").await;
    server.delete("gateway.networking.k8s.io/v1", "HTTPRoute", corner.ns, "canary");
    let deadline = Instant::now() + WAIT;
    while corner.weights(&source.snapshot.borrow_and_update()).is_some() {
        assert!(Instant::now() < deadline, "a deleted route leaves the snapshot");
        let _ = tokio::time::timeout(WAIT, source.snapshot.changed()).await;
    }
    let pods = source.generation.borrow().objects.pods.keys().filter(|k| *k.namespace == *corner.ns).count();
    assert_eq!(pods, 2, "the objects are published for enrolment");
    source
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_on_the_fake_api_server_reach_the_snapshot_and_a_bad_object_is_skipped() {
    let server = ApiServer::start().expect("fake API server");
    let corner = Corner { ns: "demo", net: 0 };
    // An HTTPRoute the agent cannot decode (rules must be a list), which only the fake stores (a
    // real server's CRD schema refuses it): logged, skipped.
    server.apply_yaml(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: broken, namespace: demo}\nspec: {parentRefs: [{group: '', kind: Service, name: backend-v1}], rules: oops}\n",
    );
    let source = changes_reach_the_snapshot(&server, corner).await;
    assert!(
        source.generation.borrow().statuses.values().all(|s| s.route != "demo/broken"),
        "the broken route is skipped, not half-applied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_on_a_real_api_server_reach_the_snapshot() {
    let Some(server) = real("changes on a real API server") else { return };
    changes_reach_the_snapshot(server, Corner { ns: "changes", net: 1 }).await;
}

/// A change of a route's status alone (another controller's entry here; the status writer's own
/// writes coming back look the same) reaches the published objects without a translation: the
/// version and the snapshot stay. A change of the spec still translates. On the fake only: on the
/// shared real server other tests' objects would start translations of their own meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_status_change_is_published_without_a_new_translation() {
    let server = ApiServer::start().expect("fake API server");
    let corner = Corner { ns: "demo", net: 0 };
    server.apply_yaml(&corner.world());
    server.apply_yaml(&corner.canary(90, 10));
    let mut source = start_source(&server).await;
    wait_for_weights(&mut source, corner, &[90, 10], "initial list").await;
    let before = source.generation.borrow_and_update().clone();
    server.set_route_status("HTTPRoute", corner.ns, "canary", other_mesh_status("backend"));
    let key = gammaray_agent::store::key(corner.ns, "canary");
    let deadline = Instant::now() + WAIT;
    let after = loop {
        let g = source.generation.borrow_and_update().clone();
        let status =
            g.objects.http_routes.get(&key).map(|r| serde_json::to_value(&r.status).unwrap_or_default());
        if status.is_some_and(|s| s.to_string().contains("example.com/other-mesh")) {
            break g;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "the status never reached the published objects");
        let _ = tokio::time::timeout(left, source.generation.changed()).await;
    };
    assert_eq!(after.version, before.version, "no new translation for a status change");
    assert!(Arc::ptr_eq(&after.snapshot, &before.snapshot), "the proxy's snapshot is the same one");
    server.apply_yaml(&corner.canary(50, 50));
    wait_for_weights(&mut source, corner, &[50, 50], "a spec change after it").await;
    assert!(source.generation.borrow().version > before.version, "a spec change translates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watches_410_gone_and_a_restarted_fake_server_lose_no_update() {
    let server = ApiServer::start_with(Duration::from_millis(200)).expect("fake API server");
    let corner = Corner { ns: "demo", net: 0 };
    server.apply_yaml(&corner.world());
    server.apply_yaml(&corner.canary(90, 10));
    let mut source = start_source(&server).await;
    wait_for_weights(&mut source, corner, &[90, 10], "initial list").await;

    // The server ends every watch; the watchers resume from their resourceVersion.
    server.drop_watches();
    server.apply_yaml(&corner.canary(80, 20));
    wait_for_weights(&mut source, corner, &[80, 20], "after dropped watches").await;

    // A write, then the history compacted, while the watchers are cut off: resuming from their
    // resourceVersion gets 410 Gone, and they list again.
    server.stop();
    server.apply_yaml(&corner.canary(70, 30));
    server.compact();
    server.resume();
    wait_for_weights(&mut source, corner, &[70, 30], "after 410 Gone").await;
    assert!(server.expired_watches() > 0, "the watchers were told 410 Gone");

    // The server goes away; a write lands while it is down (another replica, same etcd).
    server.stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.apply_yaml(&corner.canary(60, 40));
    tokio::time::sleep(Duration::from_millis(700)).await;
    server.resume();
    wait_for_weights(&mut source, corner, &[60, 40], "the write made while the server was down").await;
    server.apply_yaml(&corner.canary(55, 45));
    wait_for_weights(&mut source, corner, &[55, 45], "after the restart").await;
}

/// A real kube-apiserver stopped for longer than the watchers' backoff grows in a few failures,
/// etcd compacted meanwhile, and started again with its data: the watchers' resumes get 410 Gone,
/// they list again, the configuration is what it was, and a change made once the server is back
/// reaches the snapshot. This test stops its server, so it has one of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_api_server_restarted_after_a_compaction_loses_no_update() {
    let Some(assets) = gammaray_testkit::controlplane::require_apiserver("restart of a real API server")
    else {
        return;
    };
    let server = ControlPlane::start(&assets).expect("a control plane of this test's own");
    let corner = Corner { ns: "restart", net: 2 };
    server.apply_yaml(&corner.world());
    server.apply_yaml(&corner.canary(90, 10));
    let mut source = start_source(&server).await;
    wait_for_weights(&mut source, corner, &[90, 10], "initial list").await;

    // Changes the watchers see, then a compaction of everything before now: nothing is lost
    // while the watches stay open.
    server.apply_yaml(&corner.canary(80, 20));
    wait_for_weights(&mut source, corner, &[80, 20], "before the compaction").await;
    server.compact().expect("compact etcd");
    server.apply_yaml(&corner.canary(75, 25));
    wait_for_weights(&mut source, corner, &[75, 25], "after the compaction").await;

    // The server goes away for 8 s, etcd is compacted again, and it comes back.
    server.stop_apiserver();
    tokio::time::sleep(Duration::from_secs(8)).await;
    server.compact().expect("compact etcd");
    server.start_apiserver().expect("start kube-apiserver again");
    assert_eq!(
        corner.weights(&source.snapshot.borrow()),
        Some(vec![75, 25]),
        "routing kept while the server was away"
    );
    server.apply_yaml(&corner.canary(60, 40));
    let seen = wait_for_weights(&mut source, corner, &[60, 40], "a change once the server is back").await;
    eprintln!("apiserver: a change made once the server was back reached the snapshot in {seen:?}");
    server.apply_yaml(&corner.canary(55, 45));
    wait_for_weights(&mut source, corner, &[55, 45], "the next change").await;

    // A test that panics holding its control plane leaves nothing behind: no process, no data
    // directory, no listening port.
    drop(source);
    let (pids, dir, url) = (server.pids(), server.dir().to_owned(), server.url().to_owned());
    assert_eq!(pids.len(), 2, "kube-apiserver and etcd: {pids:?}");
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _held = server;
        panic!("a failing test (deliberate: the clean-up on panic is what is checked)");
    }));
    assert!(panicked.is_err());
    for pid in pids {
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "process {pid} is gone");
    }
    assert!(!dir.exists(), "{} is removed", dir.display());
    let port: SocketAddr = url.trim_start_matches("https://").parse().expect("the server's address");
    assert!(
        std::net::TcpStream::connect_timeout(&port, Duration::from_secs(1)).is_err(),
        "nothing listens on {port}"
    );
}

/// The entry with our controller name in the route's status, if any.
pub(crate) fn our_parent(route: &Value) -> Option<Value> {
    route["status"]["parents"]
        .as_array()?
        .iter()
        .find(|p| p["controllerName"] == gammaray_agent::translate::CONTROLLER_NAME)
        .cloned()
}

pub(crate) fn condition(parent: &Value, type_: &str) -> (String, String, i64) {
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

pub(crate) struct Writer {
    pub(crate) leading: Arc<AtomicBool>,
    pub(crate) stop: watch::Sender<bool>,
    /// Status writes the server refused as invalid.
    pub(crate) refused: status_writer::Refused,
    task: tokio::task::JoinHandle<()>,
    _source: Source,
}

/// A source and a status writer with `client`, competing for the Lease `namespace/name`.
pub(crate) fn start_writer_with(client: kube::Client, namespace: &str, name: &str, identity: &str) -> Writer {
    let source = start_source_with(
        client.clone(),
        SourceOptions { debounce: Duration::from_millis(20), ..Default::default() },
    );
    let leading = Arc::new(AtomicBool::new(false));
    let (stop, stop_rx) = watch::channel(false);
    let lease = LeaseConfig {
        namespace: namespace.into(),
        name: name.into(),
        identity: identity.into(),
        duration: Duration::from_secs(2),
    };
    let refused = status_writer::Refused::default();
    let task = tokio::spawn(status_writer::run(
        client,
        lease,
        source.generation.clone(),
        stop_rx,
        leading.clone(),
        refused.clone(),
    ));
    Writer { leading, stop, task, refused, _source: source }
}

async fn start_writer(server: &impl Server, lease: &str, identity: &str) -> Writer {
    server.apply_yaml("apiVersion: v1\nkind: Namespace\nmetadata: {name: gammaray-system}\n");
    start_writer_with(server.client().await, "gammaray-system", lease, identity)
}

/// Routes' status: the right conditions, another controller's entry kept, observedGeneration
/// following the spec, and once settled no more writes (the route's resourceVersion holds still).
async fn status_is_written(server: &impl Server, corner: Corner, lease: &str) {
    server.apply_yaml(&corner.world());
    server.apply_yaml(&corner.route_yaml("valid", "backend-v1", "backend-v1"));
    server.apply_yaml(&corner.route_yaml("missing-backend", "backend-v2", "backend-nope"));
    server.apply_yaml(&corner.route_yaml("bad-parent", "ghost", "backend-v1"));
    // Another mesh's entry on the valid route must survive our writes.
    server.set_route_status("HTTPRoute", corner.ns, "valid", other_mesh_status("backend-v1"));
    let writer = start_writer(server, lease, "node1").await;

    eventually("the valid route's status", || {
        let r = corner.route(server, "valid");
        let ours = our_parent(&r).ok_or("no entry yet")?;
        let generation = r["metadata"]["generation"].as_i64().unwrap_or(0);
        let want = ("True".to_owned(), "Accepted".to_owned(), generation);
        (condition(&ours, "Accepted") == want
            && condition(&ours, "ResolvedRefs") == ("True".into(), "ResolvedRefs".into(), generation))
            .then_some(())
            .ok_or(format!("{ours}"))
    })
    .await;
    let parents = corner.route(server, "valid")["status"]["parents"].as_array().cloned().unwrap_or_default();
    assert!(
        parents.iter().any(|p| p["controllerName"] == "example.com/other-mesh"),
        "the other controller's entry is kept: {parents:?}"
    );
    eventually("the missing backend's status", || {
        let ours = our_parent(&corner.route(server, "missing-backend")).ok_or("no entry yet")?;
        let (s, reason, _) = condition(&ours, "ResolvedRefs");
        (s == "False" && reason == "BackendNotFound").then_some(()).ok_or(format!("{ours}"))
    })
    .await;
    eventually("the bad parentRef's status", || {
        let ours = our_parent(&corner.route(server, "bad-parent")).ok_or("no entry yet")?;
        let (s, reason, _) = condition(&ours, "Accepted");
        (s == "False" && reason == "NoMatchingParent").then_some(()).ok_or(format!("{ours}"))
    })
    .await;

    // A spec change bumps the generation; the status follows it.
    server.apply_yaml(&corner.route_yaml("valid", "backend-v1", "backend-v2"));
    eventually("observedGeneration follows the spec", || {
        let r = corner.route(server, "valid");
        let ours = our_parent(&r).ok_or("no entry")?;
        let generation = r["metadata"]["generation"].as_i64().unwrap_or(0);
        (generation == 2 && condition(&ours, "Accepted").2 == 2).then_some(()).ok_or(format!("{r}"))
    })
    .await;
    // Once settled, the agent's own writes coming back through the watch cause no more writes,
    // over several of the writer's rounds (it renews the 2 s Lease every 0.67 s).
    tokio::time::sleep(Duration::from_millis(800)).await;
    let versions = |server: &dyn Fn(&str) -> Value| -> Vec<Value> {
        ["valid", "missing-backend", "bad-parent"]
            .map(|n| server(n)["metadata"]["resourceVersion"].clone())
            .to_vec()
    };
    let read = |n: &str| corner.route(server, n);
    let settled = versions(&read);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(versions(&read), settled, "no status writes once everything says what it should");
    // A route deleted and made again (a new object, no status) is compared afresh, not taken
    // for the one whose status was already written.
    assert!(server.delete("gateway.networking.k8s.io/v1", "HTTPRoute", corner.ns, "missing-backend"));
    server.apply_yaml(&corner.route_yaml("missing-backend", "backend-v2", "backend-nope"));
    eventually("the remade route's status", || {
        let ours = our_parent(&corner.route(server, "missing-backend")).ok_or("no entry yet")?;
        let (s, reason, _) = condition(&ours, "ResolvedRefs");
        (s == "False" && reason == "BackendNotFound").then_some(()).ok_or(format!("{ours}"))
    })
    .await;
    assert_eq!(writer.refused.count.get(), 0, "no status refused as invalid");
    assert!(writer.leading.load(Ordering::Acquire));
    let _ = writer.stop.send(true);
    let _ = writer.task.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_on_the_fake_is_written_with_the_right_conditions_and_other_entries_kept() {
    let server = ApiServer::start().expect("fake API server");
    status_is_written(&server, Corner { ns: "demo", net: 0 }, "gammaray-route-status").await;
    let status_writes = server.audit().iter().filter(|a| a.path.ends_with("/status")).count();
    assert!(status_writes >= 4, "the fake saw the writes: {status_writes}");
}

/// On a real server the status must also pass the Gateway API CRDs' validation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_on_a_real_server_passes_the_crds_validation_with_the_right_conditions() {
    let Some(server) = real("route status on a real API server") else { return };
    status_is_written(server, Corner { ns: "status", net: 3 }, "status-test-lease").await;
}

/// Two agents compete for the Lease `lease`: exactly one holds it; when it dies without releasing,
/// the other takes over once the Lease expires and writes status; a clean stop releases it at
/// once to an agent waiting. `writers` gives the field managers of every status write so far,
/// where the server keeps that (the fake's audit log): then only the holder wrote.
async fn one_lease_holder_and_takeovers(
    server: &impl Server,
    corner: Corner,
    lease: &str,
    writers: impl Fn() -> Option<Vec<String>>,
) {
    server.apply_yaml(&corner.world());
    server.apply_yaml(&corner.route_yaml("r1", "backend-v1", "backend-v1"));
    let a = start_writer(server, lease, "node-a").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = start_writer(server, lease, "node-b").await;
    eventually("r1's status", || {
        our_parent(&corner.route(server, "r1")).map(|_| ()).ok_or("none yet".to_owned())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (holder, other) = match (a.leading.load(Ordering::Acquire), b.leading.load(Ordering::Acquire)) {
        (true, false) => (a, b),
        (false, true) => (b, a),
        both => panic!("exactly one agent holds the lease, got {both:?}"),
    };
    let first = writers();
    let holder_name = first.as_ref().map(|first| {
        assert!(!first.is_empty());
        assert!(first.iter().all(|w| *w == first[0]), "only the holder wrote status: {first:?}");
        first[0].clone()
    });

    // The holder dies without releasing (a crash): the other takes over once the lease expires.
    holder.task.abort();
    drop(holder);
    let took_over = Instant::now();
    eventually("the other agent takes over", || {
        other.leading.load(Ordering::Acquire).then_some(()).ok_or("not yet".to_owned())
    })
    .await;
    println!("takeover after {:?} (lease 2 s)", took_over.elapsed());
    server.apply_yaml(&corner.route_yaml("r2", "backend-v2", "backend-v2"));
    eventually("the new holder writes r2's status", || {
        our_parent(&corner.route(server, "r2")).map(|_| ()).ok_or("none yet".to_owned())
    })
    .await;
    if let (Some(first), Some(holder_name), Some(all)) = (first, holder_name, writers()) {
        let later: Vec<String> = all.into_iter().skip(first.len()).collect();
        assert!(
            !later.is_empty() && later.iter().all(|w| *w != holder_name),
            "the new holder wrote: {later:?}"
        );
    }

    // A clean stop releases the Lease at once, so a waiting agent need not wait it out.
    let third = start_writer(server, lease, "node-c").await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!third.leading.load(Ordering::Acquire), "the lease is still held");
    let _ = other.stop.send(true);
    let _ = other.task.await;
    let held = server.get("coordination.k8s.io/v1", "Lease", "gammaray-system", lease);
    let holder = held.as_ref().and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_owned));
    assert!(
        holder.as_deref() != Some("node-a") && holder.as_deref() != Some("node-b"),
        "released on a clean stop: {held:?}"
    );
    eventually("the waiting agent takes the released lease", || {
        third.leading.load(Ordering::Acquire).then_some(()).ok_or("not yet".to_owned())
    })
    .await;
    let _ = third.stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_fake_only_the_lease_holder_writes_status_and_another_takes_over() {
    let server = ApiServer::start().expect("fake API server");
    let writers = || {
        let audit = server.audit();
        Some(
            audit
                .iter()
                .filter(|w| w.path.ends_with("/status"))
                .filter_map(|w| w.field_manager.clone())
                .collect(),
        )
    };
    one_lease_holder_and_takeovers(&server, Corner { ns: "demo", net: 0 }, "gammaray-route-status", writers)
        .await;
}

/// A renewal that fails while the Lease is still valid keeps it: an API server away for less than
/// the Lease's duration (2 s here, renewed every 0.67 s) does not hand it over; one away for
/// longer does, and the holder takes it again when the server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_renewal_keeps_the_lease_until_it_expires() {
    let server = ApiServer::start().expect("fake API server");
    let corner = Corner { ns: "demo", net: 0 };
    server.apply_yaml(&corner.world());
    let writer = start_writer(&server, "gammaray-route-status", "node-a").await;
    let leading = || writer.leading.load(Ordering::Acquire);
    eventually("the lease is taken", || leading().then_some(()).ok_or("not yet".to_owned())).await;
    server.stop();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(leading(), "a second without the server: the lease renewed at most 1.67 s ago still holds");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!leading(), "3.5 s without the server: the lease has expired and is let go");
    server.resume();
    eventually("the lease is taken again", || leading().then_some(()).ok_or("not yet".to_owned())).await;
    let _ = writer.stop.send(true);
}

/// The shared server's routes are written by other tests' writers too, so who wrote is checked
/// on the fake only; the Lease's hand-overs are checked here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_real_server_one_agent_holds_the_lease_and_another_takes_over() {
    let Some(server) = real("the status Lease on a real API server") else { return };
    one_lease_holder_and_takeovers(server, Corner { ns: "lease", net: 6 }, "lease-test-lease", || None).await;
}

/// A status the Gateway API CRDs refuse (a condition reason outside their pattern) is counted and
/// not written again while neither the route nor the status changes; nothing of it is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_the_crds_refuse_is_counted_and_not_retried() {
    let Some(server) = real("a refused status on a real API server") else { return };
    let corner = Corner { ns: "refused", net: 5 };
    server.apply_yaml(&corner.world());
    server.apply_yaml(&corner.canary(90, 10));
    let mut source = start_source(server).await;
    wait_for_weights(&mut source, corner, &[90, 10], "initial list").await;
    let current = source.generation.borrow().clone();
    let route = format!("{}/canary", corner.ns);
    let canary: Vec<_> = current.statuses.iter().filter(|(_, s)| s.route == route).collect();
    assert_eq!(canary.len(), 1, "the canary's status");
    let (key, status) = canary[0];
    let mut status = (**status).clone();
    status.parents[0].conditions[0].reason = "Not a valid reason!";
    let bad = Generation {
        version: current.version,
        snapshot: current.snapshot.clone(),
        statuses: std::iter::once((key.clone(), std::sync::Arc::new(status))).collect(),
        objects: current.objects.clone(),
        policy_refusals: current.policy_refusals.clone(),
    };
    let (client, refused) = (server.client().await, status_writer::Refused::default());
    status_writer::write_statuses(&client, &bad, "node1", &refused).await;
    assert_eq!(refused.count.get(), 1, "the 422 is counted");
    status_writer::write_statuses(&client, &bad, "node1", &refused).await;
    assert_eq!(refused.count.get(), 1, "and not retried while nothing changed");
    // (Other tests' status writers share this server and may write the route's valid status.)
    let written = corner.route(server, "canary")["status"].to_string();
    assert!(!written.contains("Not a valid reason!"), "nothing of the refused status was stored: {written}");
}

/// A snapshot in a form where equal contents compare equal (its maps' order depends on their
/// hasher's seed).
fn canonical(s: &Snapshot) -> String {
    use std::collections::BTreeMap;
    let frontends: BTreeMap<_, _> = s.frontends.iter().map(|(k, v)| (*k, format!("{v:?}"))).collect();
    let workloads: BTreeMap<_, _> = s.workloads.iter().map(|(k, v)| (k, format!("{v:?}"))).collect();
    let nodes: BTreeMap<_, _> = s.nodes.iter().collect();
    format!("version {}\n{frontends:#?}\n{workloads:#?}\n{nodes:?}", s.version)
}

/// A burst of 1 000 endpoint changes in about a second is coalesced into few generations, each a
/// whole one (its snapshot and statuses are what a full translation of its own objects gives)
/// and the last carrying the last change: none is lost. On the fake, which takes a write in
/// microseconds, so the burst is as dense as the test says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_endpoint_changes_is_coalesced_into_few_whole_generations() {
    const CHANGES: usize = 1000;
    let server = ApiServer::start().expect("fake API server");
    let corner = Corner { ns: "burst", net: 7 };
    server.apply_yaml(&corner.world());
    server.apply_yaml(&corner.canary(90, 10));
    let options = SourceOptions { debounce: Duration::from_millis(50), ..Default::default() };
    let mut source = start_source_with(server.client().await, options);
    wait_for_weights(&mut source, corner, &[90, 10], "initial list").await;
    let first = source.generation.borrow().version;

    // Every generation the reader is woken for, until the publisher has been quiet for a while.
    let mut rx = source.generation.clone();
    let reader = tokio::spawn(async move {
        let mut seen = Vec::new();
        while tokio::time::timeout(Duration::from_secs(2), rx.changed()).await.is_ok_and(|r| r.is_ok()) {
            seen.push(rx.borrow_and_update().clone());
        }
        seen
    });
    let backend_v1 = SocketAddr::new(format!("10.96.{}.11", corner.net).parse().expect("ip"), 80);
    let started = Instant::now();
    for i in 0..CHANGES {
        // backend-v1's slice gains a second endpoint whose address moves with every change.
        let extra = format!("10.244.{}.{}", corner.net, 10 + i % 200);
        server.apply_yaml(&format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: backend-v1-x1, namespace: {ns}, labels: {{kubernetes.io/service-name: backend-v1}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
             endpoints: [{{addresses: ['10.244.{net}.2'], conditions: {{ready: true}}}}, {{addresses: ['{extra}'], conditions: {{ready: true}}}}]\n",
            ns = corner.ns,
            net = corner.net
        ));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let burst = started.elapsed();
    let seen = reader.await.expect("the reader");
    let last = seen.last().expect("generations after the burst");
    let published = last.version - first;
    let most = burst.as_millis() as u64 / 50 + 3;
    assert!(published <= most, "{published} generations for {CHANGES} changes in {burst:?}: at most {most}");
    for g in &seen {
        let full = gammaray_agent::translate::translate(
            &g.objects,
            &Options { version: g.version, ..Options::default() },
        );
        assert_eq!(canonical(&g.snapshot), canonical(&full.snapshot), "generation {} is whole", g.version);
        let statuses: Vec<_> = g.statuses.values().map(|s| (**s).clone()).collect();
        assert_eq!(statuses, full.statuses, "generation {}'s statuses", g.version);
    }
    let endpoints: Vec<String> = last
        .snapshot
        .frontend(backend_v1)
        .expect("backend-v1's frontend")
        .default_backend
        .endpoints
        .iter()
        .map(|e| e.ip.to_string())
        .collect();
    let want = format!("10.244.{}.{}", corner.net, 10 + (CHANGES - 1) % 200);
    assert!(endpoints.contains(&want), "the last change is in the last generation: {endpoints:?}");
    println!("{CHANGES} changes in {burst:?}: {published} generations published, {} seen", seen.len());
}

/// AuthorizationPolicy through a real API server: the CRD deploy/crds/ holds keeps a policy as
/// written (a misspelt field included), the source watches the kind, and the publisher compiles
/// it: an enforceable one into the snapshot, the misspelt one reported and failing closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_policies_on_the_api_server_reach_the_snapshot() {
    let Some(server) = real("authorization policies") else { return };
    server.apply_yaml("apiVersion: v1\nkind: Namespace\nmetadata: {name: authz}\n");
    server.apply_yaml(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-web, namespace: authz}\n\
         spec: {selector: {matchLabels: {app: web}}, rules: [{from: [{source: {principals: [cluster.local/ns/authz/sa/client]}}]}]}\n",
    );
    server.apply_yaml(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: typo, namespace: authz}\n\
         spec: {action: DENY, rules: [{from: [{source: {principal: [x]}}]}]}\n",
    );
    let typo = server.get("security.istio.io/v1", "AuthorizationPolicy", "authz", "typo").expect("stored");
    assert!(
        typo.pointer("/spec/rules/0/from/0/source/principal").is_some(),
        "the API server kept the misspelt field for the agent to see: {typo}"
    );
    let mut source = start_source(server).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let generation = source.generation.borrow_and_update().clone();
        let names: Vec<String> =
            generation.snapshot.authz.policies().iter().map(|p| p.name.to_string()).collect();
        let refused: Vec<&str> = generation.policy_refusals.iter().map(|r| r.policy.as_str()).collect();
        if names.contains(&"authz/allow-web".to_owned()) && refused.contains(&"authz/typo") {
            let typo = generation.policy_refusals.iter().find(|r| r.policy == "authz/typo").expect("refused");
            assert!(typo.reason.contains("unknown field `principal`"), "{typo:?}");
            break;
        }
        assert!(Instant::now() < deadline, "policies never compiled: {names:?}, refused {refused:?}");
        let _ = tokio::time::timeout(WAIT, source.generation.changed()).await;
    }
}

/// On a cluster without the AuthorizationPolicy kind (no Istio, deploy/crds/ not applied) the
/// source learns it from the 404 and publishes at once, rather than after its sync timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kind_the_cluster_does_not_have_does_not_hold_the_first_configuration() {
    let Some(assets) = gammaray_testkit::controlplane::require_apiserver("a missing CRD") else { return };
    let plane = tokio::task::spawn_blocking(move || ControlPlane::start(&assets))
        .await
        .expect("start")
        .expect("a control plane of this test's own");
    plane
        .kubectl(&["delete", "crd", "authorizationpolicies.security.istio.io", "--wait=true"])
        .expect("delete the CRD");
    // A timeout that would outlast the test: a publish can only come from the kind being known absent.
    let options =
        SourceOptions { debounce: Duration::from_millis(20), initial_sync_timeout: Duration::from_secs(600) };
    let mut source = start_source_with(plane.client().await, options);
    let published = tokio::time::timeout(WAIT, source.generation.wait_for(|g| g.version > 0)).await;
    assert!(published.is_ok(), "no configuration while the AuthorizationPolicy kind is absent");
}
