//! What one request costs the node proxy, in a form that can be counted exactly: two nodes'
//! proxies, a client and a backend in one process on loopback, on one current-thread runtime
//! (the proxy's default). Node A's outbound listener takes the client's connection (the
//! original destination comes from an in-memory table, as the eBPF program would record it),
//! and for a pod on node B it carries the request over HBONE (mutual TLS, HTTP/2) to node B's
//! inbound listener, which hands it to the backend.
//!
//! `cargo xtask bench --instructions` runs this under callgrind twice per lane with different
//! request counts: the difference in instructions over the difference in requests is the
//! user-space instructions per request, free of the noise that timed runs have on a shared
//! host. Kernel work (system calls, the TCP stack) is not in that count; the timed benchmark
//! covers it.
//!
//! Usage: `request_cost LANE REQUESTS`, LANE the name of a lane that `gammaray_testkit::lanes`
//! marks `counted`, or `all` to run each such lane once (a check that the harness works). Every response is checked, or the run fails: status 200 and a body of 1 KiB
//! (64 KiB on the `-64k` lanes); for gRPC, one message of 1 KiB and `grpc-status: 0` in the
//! trailers. The backend answers a POST only once it has read the whole 16 KiB body, and the
//! filtered lane's request only if the route's rewrite and header filters reached it (the
//! client checks the response header the route adds). RUST_LOG sets the log filter (`warn` by
//! default) and `GAMMARAY_LOG_JSON=1` logs JSON lines, as they do for the agent.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use bytes::Bytes;
use gammaray_agent::{
    store::Store,
    translate::{Options, translate},
};
use gammaray_proxy::{
    Inputs, Proxy, ProxyConfig,
    identity::{Authority, CertStore, Trust, TrustBundle, node_ca},
    orig_dst::StaticTable,
};
use gammaray_testkit::lanes::Lane;
use http_body_util::{BodyExt as _, Either, Empty, Full, StreamBody};
use hyper::{
    Method, Request, Response,
    body::{Frame, Incoming},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpSocket};

const TRUST_DOMAIN: &str = "cluster.local";
const BODY_LEN: usize = 1024;
/// The response body of the `-64k` lanes: past one TLS record and one HTTP/2 frame, so a body
/// streams through the proxies in pieces.
const LARGE_BODY_LEN: usize = 64 * 1024;
/// The path the backend answers with [`LARGE_BODY_LEN`] bytes.
const LARGE_PATH: &str = "/64k";
/// The path the `-post` lanes send a body of [`UPLOAD_LEN`] bytes to: several TLS records and
/// HTTP/2 frames, so a request body streams through the proxies in pieces.
const UPLOAD_PATH: &str = "/upload";
const UPLOAD_LEN: usize = 16 * 1024;
/// The filtered lane's path, which its route rewrites from [`FILTERED_PREFIX`] to
/// [`REWRITTEN_PREFIX`] on the way to the backend.
const FILTERED_PATH: &str = "/api/items";
const FILTERED_PREFIX: &str = "/api";
const REWRITTEN_PREFIX: &str = "/v1";
/// The gRPC method the gRPC lanes call, and the message each call sends.
const GRPC_PATH: &str = "/bench.Echo/Call";
const GRPC_REQUEST_LEN: usize = 128;
/// A gRPC message's prefix: the compression flag and the length.
const GRPC_PREFIX_LEN: usize = 5;
/// Requests before the counted ones: connections, pools and TLS sessions are set up by then.
const WARM_UP: u64 = 50;
/// Bounds every request, so a broken path fails the run instead of hanging it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What each request of an HTTP/1.1 lane asks for: the method, the path, the length of the
/// request's body, and the body length the answer must have.
fn ask(lane: Lane) -> (Method, &'static str, usize, usize) {
    match lane {
        Lane::Direct64k | Lane::L7Cross64k => (Method::GET, LARGE_PATH, 0, LARGE_BODY_LEN),
        Lane::DirectPost | Lane::L7CrossPost => (Method::POST, UPLOAD_PATH, UPLOAD_LEN, BODY_LEN),
        Lane::L7CrossFilters => (Method::GET, FILTERED_PATH, 0, BODY_LEN),
        _ => (Method::GET, "/", 0, BODY_LEN),
    }
}

/// Every counted lane's name, for the usage line: `direct-same|l7-same|…|all`.
fn names() -> String {
    let mut names: Vec<&str> = Lane::counted().map(Lane::name).collect();
    names.push("all");
    names.join("|")
}

/// The addresses of one run, all inside 127.0.0.0/8. The second octet is chosen per run, so
/// that two runs on one host do not collide on node B's fixed HBONE port.
struct World {
    node_a: Ipv4Addr,
    node_b: Ipv4Addr,
    client: Ipv4Addr,
    web_b1: Ipv4Addr,
    web_b2: Ipv4Addr,
    web_a: Ipv4Addr,
}

const BACKEND_PORT: u16 = 8080;
/// The backend's HTTP/2 (h2c) port, for the gRPC lanes; HTTP/1.1 stays alone on its own port,
/// so its lanes count the same work as before these were added.
const BACKEND_H2_PORT: u16 = 8081;
const WEB_L4: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
const WEB_L7: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 11), 80);
const WEB_SAME: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 14), 80);
const GRPC: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 15), 80);
const WEB_FILTERED: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 18), 80);

impl World {
    fn new() -> Self {
        let b = fastrand::u8(100..=250);
        Self {
            node_a: Ipv4Addr::new(127, b, 0, 1),
            node_b: Ipv4Addr::new(127, b, 0, 2),
            client: Ipv4Addr::new(127, b, 1, 1),
            web_b1: Ipv4Addr::new(127, b, 2, 1),
            web_b2: Ipv4Addr::new(127, b, 2, 2),
            web_a: Ipv4Addr::new(127, b, 3, 1),
        }
    }

    /// The cluster's objects, as the agent would read them.
    fn objects(&self) -> String {
        let mut y = String::from(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: bench, labels: {gammaray.dev/dataplane-mode: ambient}}\n",
        );
        for (name, ip) in [("node-a", self.node_a), ("node-b", self.node_b)] {
            y.push_str(&format!(
                "---\napiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\nstatus: {{addresses: [{{type: InternalIP, address: '{ip}'}}]}}\n"
            ));
        }
        for (name, node, ip) in [
            ("client", "node-a", self.client),
            ("web-b1", "node-b", self.web_b1),
            ("web-b2", "node-b", self.web_b2),
            ("web-a", "node-a", self.web_a),
        ] {
            y.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: bench, uid: uid-{name}}}\nspec: {{nodeName: {node}, serviceAccountName: {name}, containers: [{{name: app, image: app}}]}}\nstatus: {{phase: Running, podIP: '{ip}', podIPs: [{{ip: '{ip}'}}]}}\n"
            ));
        }
        const HTTP: &str = ", appProtocol: http";
        const H2C: &str = ", appProtocol: kubernetes.io/h2c";
        let b1 = ("web-b1", "node-b", self.web_b1);
        let b2 = ("web-b2", "node-b", self.web_b2);
        let a = ("web-a", "node-a", self.web_a);
        for (name, vip, proto, port, pods) in [
            ("web-l4", *WEB_L4.ip(), "", BACKEND_PORT, vec![b1]),
            ("web", *WEB_L7.ip(), HTTP, BACKEND_PORT, vec![b1, b2]),
            ("web-v1", Ipv4Addr::new(10, 96, 0, 12), HTTP, BACKEND_PORT, vec![b1]),
            ("web-v2", Ipv4Addr::new(10, 96, 0, 13), HTTP, BACKEND_PORT, vec![b2]),
            ("web-same", *WEB_SAME.ip(), HTTP, BACKEND_PORT, vec![a]),
            ("web-filtered", *WEB_FILTERED.ip(), HTTP, BACKEND_PORT, vec![b1, b2]),
            ("grpc", *GRPC.ip(), H2C, BACKEND_H2_PORT, vec![b1, b2]),
            ("grpc-v1", Ipv4Addr::new(10, 96, 0, 16), H2C, BACKEND_H2_PORT, vec![b1]),
            ("grpc-v2", Ipv4Addr::new(10, 96, 0, 17), H2C, BACKEND_H2_PORT, vec![b2]),
        ] {
            y.push_str(&format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bench}}\nspec: {{clusterIP: '{vip}', ports: [{{name: http, port: 80, targetPort: {port}{proto}}}]}}\n"
            ));
            let endpoints: Vec<String> = pods
                .iter()
                .map(|(pod, node, ip)| {
                    format!(
                        "{{addresses: ['{ip}'], nodeName: {node}, conditions: {{ready: true}}, targetRef: {{kind: Pod, namespace: bench, name: {pod}}}}}"
                    )
                })
                .collect();
            y.push_str(&format!(
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: bench, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: http, port: {port}}}]\nendpoints: [{}]\n",
                endpoints.join(", ")
            ));
        }
        y.push_str(
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web-split, namespace: bench}\nspec:\n  parentRefs: [{group: '', kind: Service, name: web, port: 80}]\n  rules:\n  - backendRefs: [{name: web-v1, port: 80, weight: 50}, {name: web-v2, port: 80, weight: 50}]\n",
        );
        y.push_str(&format!(
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: web-filtered, namespace: bench}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: web-filtered, port: 80}}]\n  rules:\n  - matches: [{{path: {{type: PathPrefix, value: {FILTERED_PREFIX}}}, headers: [{{name: x-env, value: bench}}]}}]\n    filters:\n    - {{type: URLRewrite, urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: {REWRITTEN_PREFIX}}}}}}}\n    - {{type: RequestHeaderModifier, requestHeaderModifier: {{set: [{{name: x-route, value: filtered}}], add: [{{name: x-hop, value: node-a}}], remove: [x-strip]}}}}\n    - {{type: ResponseHeaderModifier, responseHeaderModifier: {{add: [{{name: x-served-by, value: gammaray}}]}}}}\n    backendRefs: [{{name: web-v1, port: 80, weight: 50}}, {{name: web-v2, port: 80, weight: 50}}]\n",
        ));
        y.push_str(
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: grpc-split, namespace: bench}\nspec:\n  parentRefs: [{group: '', kind: Service, name: grpc, port: 80}]\n  rules:\n  - matches: [{method: {service: bench.Echo, method: Call}}]\n    backendRefs: [{name: grpc-v1, port: 80, weight: 50}, {name: grpc-v2, port: 80, weight: 50}]\n",
        );
        y
    }
}

/// The backend of a pod: HTTP/1.1 on [`BACKEND_PORT`], answering [`LARGE_PATH`] with 64 KiB and
/// every other path with 1 KiB, and gRPC over h2c on [`BACKEND_H2_PORT`]. A POST to
/// [`UPLOAD_PATH`] is answered once its whole body has arrived, and a path under
/// [`REWRITTEN_PREFIX`] only with the filtered route's request headers; otherwise, and for a
/// path still under [`FILTERED_PREFIX`], 400.
async fn backend(ip: Ipv4Addr) -> anyhow::Result<()> {
    let listener = TcpListener::bind((ip, BACKEND_PORT)).await.with_context(|| format!("bind {ip}"))?;
    let small = Bytes::from(vec![b'x'; BODY_LEN]);
    let large = Bytes::from(vec![b'x'; LARGE_BODY_LEN]);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let (small, large) = (small.clone(), large.clone());
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (small, large) = (small.clone(), large.clone());
                async move {
                    let path = req.uri().path();
                    let answer = if path == LARGE_PATH {
                        Some(large)
                    } else if path == UPLOAD_PATH {
                        let len = req.into_body().collect().await?.to_bytes().len();
                        (len == UPLOAD_LEN).then_some(small)
                    } else if path.starts_with(REWRITTEN_PREFIX) {
                        let h = req.headers();
                        let filtered = h.get("x-route").is_some_and(|v| v == "filtered")
                            && h.get("x-hop").is_some_and(|v| v == "node-a")
                            && !h.contains_key("x-strip");
                        filtered.then_some(small)
                    } else if path.starts_with(FILTERED_PREFIX) {
                        // The route's rewrite did not happen.
                        None
                    } else {
                        Some(small)
                    };
                    Ok::<_, hyper::Error>(match answer {
                        Some(body) => Response::new(Full::new(body)),
                        None => {
                            let mut response = Response::new(Full::new(Bytes::new()));
                            *response.status_mut() = hyper::StatusCode::BAD_REQUEST;
                            response
                        }
                    })
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    let listener = TcpListener::bind((ip, BACKEND_H2_PORT)).await.with_context(|| format!("bind {ip}"))?;
    let message = grpc_message(BODY_LEN);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let message = message.clone();
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let message = message.clone();
                async move { grpc_answer(req, message).await }
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    Ok(())
}

/// One gRPC message of `len` bytes: the uncompressed flag, the length, the payload.
fn grpc_message(len: usize) -> Bytes {
    let mut message = Vec::with_capacity(GRPC_PREFIX_LEN + len);
    message.push(0);
    message.extend_from_slice(&u32::try_from(len).expect("a small message").to_be_bytes());
    message.resize(GRPC_PREFIX_LEN + len, b'x');
    message.into()
}

type GrpcBody = StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, hyper::Error>>>>;

/// A unary call's answer: reads the request message, then sends `message` and `grpc-status: 0`
/// in the trailers, as a gRPC server does; a request of the wrong method or shape gets
/// `grpc-status: 12` (unimplemented) or `3` (invalid argument), which the client fails on.
async fn grpc_answer(req: Request<Incoming>, message: Bytes) -> Result<Response<GrpcBody>, hyper::Error> {
    let path_ok = req.uri().path() == GRPC_PATH;
    let body = req.into_body().collect().await?.to_bytes();
    let status = match (path_ok, body.len() == GRPC_PREFIX_LEN + GRPC_REQUEST_LEN) {
        (false, _) => "12",
        (true, false) => "3",
        (true, true) => "0",
    };
    let mut trailers = hyper::HeaderMap::new();
    trailers.insert("grpc-status", hyper::header::HeaderValue::from_static(status));
    let frames = vec![Ok(Frame::data(message)), Ok(Frame::trailers(trailers))];
    let mut response = Response::new(StreamBody::new(futures::stream::iter(frames)));
    response
        .headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/grpc"));
    Ok(response)
}

/// The two nodes' proxies, serving on `world`'s addresses.
struct Proxies {
    /// Node A's outbound listener, where the eBPF program would send the client.
    outbound: SocketAddr,
    /// The original destinations of the client's connections.
    table: Arc<StaticTable>,
    /// Kept so that the proxies' snapshot stays published.
    _snapshot: tokio::sync::watch::Sender<Arc<gammaray_proxy::snapshot::Snapshot>>,
    /// The two nodes' proxies, serving while this is alive.
    _running: [Proxy; 2],
}

async fn proxies(world: &World) -> anyhow::Result<Proxies> {
    let mut store = Store::default();
    let applied = store.apply_yaml(&world.objects());
    ensure!(applied.errors.is_empty(), "objects: {:?}", applied.errors);
    let translation = translate(&store, &Options { trust_domain: TRUST_DOMAIN.into(), version: 1 });
    // Every route must be in force: a rejected one would leave its Service to plain balancing,
    // and its lane would count the wrong path while every answer still checked out.
    ensure!(translation.statuses.len() == 3, "routes: {:?}", translation.statuses);
    for route in &translation.statuses {
        for parent in &route.parents {
            for type_ in ["Accepted", "ResolvedRefs"] {
                let condition = parent.condition(type_);
                ensure!(
                    condition.is_some_and(|c| c.status == "True"),
                    "route {}: {type_} is {condition:?}",
                    route.route
                );
            }
        }
    }
    let snapshot = translation.snapshot;
    let (publish, snapshot) = tokio::sync::watch::channel(Arc::new(snapshot));
    let authority = Arc::new(Authority::generate(TRUST_DOMAIN)?);
    let runtime = tokio::runtime::Handle::current();
    let node = |name: &str, ip: Ipv4Addr, lookup: Arc<StaticTable>| {
        let config = ProxyConfig {
            outbound_addr: SocketAddr::new(IpAddr::V4(ip), 0),
            node: Some(name.into()),
            trust_domain: TRUST_DOMAIN.into(),
            ..ProxyConfig::default()
        };
        let inputs = Inputs {
            snapshot: snapshot.clone(),
            lookup,
            certs: Some(Arc::new(CertStore::with_issuer(
                Arc::new(Trust::new(TrustBundle::of(&authority))),
                Arc::new(node_ca::issue_directly(&authority, TRUST_DOMAIN, name, Duration::from_secs(3600))?),
            ))),
        };
        Proxy::start(config, inputs, &runtime).with_context(|| format!("start {name}'s proxy on {ip}"))
    };
    // Node B serves the inbound HBONE listener; node A's outbound listener takes the client.
    let node_b = node("node-b", world.node_b, Arc::new(StaticTable::default()))?;
    let table = Arc::new(StaticTable::default());
    let node_a = node("node-a", world.node_a, table.clone())?;
    Ok(Proxies { outbound: node_a.outbound_addr(), table, _snapshot: publish, _running: [node_a, node_b] })
}

/// Sends `requests` requests on one keep-alive connection (GETs, or unary gRPC calls on the
/// gRPC lanes) and checks every answer.
async fn client(world: &World, lane: Lane, proxies: &Proxies, requests: u64) -> anyhow::Result<()> {
    let (proxy, table) = (proxies.outbound, &proxies.table);
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(world.client), 0))?;
    let SocketAddr::V4(local) = socket.local_addr()? else { bail!("the client socket is IPv4") };
    let (dial, host) = match lane {
        Lane::DirectCross | Lane::Direct64k | Lane::DirectPost => {
            (SocketAddr::new(IpAddr::V4(world.web_b1), BACKEND_PORT), "web-b1")
        }
        Lane::DirectSame => (SocketAddr::new(IpAddr::V4(world.web_a), BACKEND_PORT), "web-a"),
        Lane::GrpcDirect => (SocketAddr::new(IpAddr::V4(world.web_b1), BACKEND_H2_PORT), "web-b1"),
        Lane::L4Cross => {
            table.insert(local, WEB_L4);
            (proxy, "web-l4")
        }
        Lane::L7Cross | Lane::L7Cross64k | Lane::L7CrossPost => {
            table.insert(local, WEB_L7);
            (proxy, "web")
        }
        Lane::L7CrossFilters => {
            table.insert(local, WEB_FILTERED);
            (proxy, "web-filtered")
        }
        Lane::GrpcCross => {
            table.insert(local, GRPC);
            (proxy, "grpc")
        }
        Lane::L7Same => {
            table.insert(local, WEB_SAME);
            (proxy, "web-same")
        }
        Lane::L4Same | Lane::FloorCross => bail!("{} is not a lane of this harness", lane.name()),
    };
    let stream = socket.connect(dial).await.with_context(|| format!("connect to {dial}"))?;
    stream.set_nodelay(true)?;
    if lane.is_grpc() {
        grpc_calls(stream, lane, host, requests).await
    } else {
        http1_requests(stream, lane, host, requests).await
    }
}

/// HTTP/1.1 requests as the lane asks them: GETs, or POSTs with a body.
async fn http1_requests(
    stream: tokio::net::TcpStream,
    lane: Lane,
    host: &str,
    requests: u64,
) -> anyhow::Result<()> {
    let (method, path, upload_len, want) = ask(lane);
    let upload = Bytes::from(vec![b'u'; upload_len]);
    let filtered = matches!(lane, Lane::L7CrossFilters);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    for i in 0..requests {
        let mut request = Request::builder().method(method.clone()).uri(path).header("host", host);
        if filtered {
            request = request.header("x-env", "bench").header("x-strip", "1");
        }
        // A GET without a body, as before these lanes came; a POST with its length.
        let request = request.body(if upload_len == 0 {
            Either::Left(Empty::<Bytes>::new())
        } else {
            Either::Right(Full::new(upload.clone()))
        })?;
        let answer = async {
            sender.ready().await?;
            let response = sender.send_request(request).await?;
            let status = response.status();
            let marked = response.headers().get("x-served-by").is_some_and(|v| v == "gammaray");
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, marked, body.len()))
        };
        let (status, marked, len) = tokio::time::timeout(REQUEST_TIMEOUT, answer)
            .await
            .with_context(|| format!("{lane:?}: request {i} timed out"))??;
        ensure!(status == 200 && len == want, "{lane:?}: request {i} got {status} with {len} bytes");
        ensure!(marked == filtered, "{lane:?}: request {i}: the route's response header is wrong");
    }
    Ok(())
}

/// Unary gRPC calls over h2c, one stream after the other on one connection.
async fn grpc_calls(
    stream: tokio::net::TcpStream,
    lane: Lane,
    host: &str,
    requests: u64,
) -> anyhow::Result<()> {
    let uri = format!("http://{host}{GRPC_PATH}");
    let message = grpc_message(GRPC_REQUEST_LEN);
    // The answer must arrive byte for byte, prefix included, not just at the right length.
    let expected = grpc_message(BODY_LEN);
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    for i in 0..requests {
        let request = Request::post(uri.as_str())
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(message.clone()))?;
        let answer = async {
            sender.ready().await?;
            let response = sender.send_request(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?;
            let grpc_status = body.trailers().and_then(|t| t.get("grpc-status")).cloned();
            anyhow::Ok((status, grpc_status, body.to_bytes()))
        };
        let (status, grpc_status, body) = tokio::time::timeout(REQUEST_TIMEOUT, answer)
            .await
            .with_context(|| format!("{lane:?}: call {i} timed out"))??;
        ensure!(
            status == 200 && grpc_status.as_ref().is_some_and(|s| s == "0") && body == expected,
            "{lane:?}: call {i} got {status}, grpc-status {grpc_status:?}, with {} bytes",
            body.len()
        );
    }
    Ok(())
}

async fn run(lanes: &[Lane], requests: u64) -> anyhow::Result<()> {
    let world = World::new();
    for ip in [world.web_b1, world.web_b2, world.web_a] {
        backend(ip).await?;
    }
    let proxies = proxies(&world).await?;
    for &lane in lanes {
        client(&world, lane, &proxies, WARM_UP).await?;
        let started = Instant::now();
        client(&world, lane, &proxies, requests).await?;
        let per_request = started.elapsed().as_secs_f64() * 1e6 / requests.max(1) as f64;
        println!("request_cost: {}: {requests} requests, {per_request:.1} µs each (wall clock)", lane.name());
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [lane, requests] = args.as_slice() else {
        bail!("usage: request_cost {} REQUESTS", names());
    };
    let lanes: Vec<Lane> = match lane.as_str() {
        "all" => Lane::counted().collect(),
        one => match Lane::parse(one) {
            Some(lane) if lane.spec().counted => vec![lane],
            _ => bail!("unknown lane {one:?}: {}", names()),
        },
    };
    let requests: u64 = requests.parse().context("REQUESTS is a count")?;
    ensure!(requests <= 1_000_000, "at most a million requests per run");
    // As the benchmark runs the agent: warnings only, so no access log line per request,
    // unless RUST_LOG says otherwise; JSON lines with GAMMARAY_LOG_JSON, as the agent's flag.
    let json = gammaray_agent::cli::Cli::log_json_from_env()?;
    gammaray_agent::logging::init("warn", json);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_park(gammaray_agent::logging::flush_on_park)
        .build()?;
    let result = rt.block_on(run(&lanes, requests));
    gammaray_agent::logging::flush_thread();
    result
}
