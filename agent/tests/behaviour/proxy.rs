//! The node proxy's data path on 127.0.0.1: the real outbound listener, real HTTP/1.1 and h2c
//! backends, snapshots made by the real translation. The original destination comes from an
//! in-memory table instead of the kernel (the privileged tests cover that part).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use gammaray_proxy::{Inputs, ProxyConfig, orig_dst::StaticTable, snapshot::Snapshot, stats::OutboundStats};
use http::{Request, StatusCode};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpSocket},
    sync::watch,
};

use gammaray_agent::{
    store::Store,
    translate::{Options, translate},
};

/// The Service address clients dial; it is only a key in the snapshot.
const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 1), 80);

/// An HTTP backend (HTTP/1.1 and h2c) answering with what it saw, one `key=value` per line.
async fn backend(name: &'static str) -> SocketAddr {
    counting_backend(name).await.0
}

/// [`backend`], also counting the requests it answered.
async fn counting_backend(name: &'static str) -> (SocketAddr, Arc<std::sync::atomic::AtomicU64>) {
    let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind backend");
    let addr = listener.local_addr().expect("backend addr");
    let counter = served.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let counter = counter.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    async move {
                        let mut body =
                            format!("backend={name}\npath={}\nversion={:?}\n", req.uri(), req.version());
                        for (k, v) in req.headers() {
                            body.push_str(&format!("h:{k}={}\n", v.to_str().unwrap_or("?")));
                        }
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, served)
}

fn service(name: &str, ip: &str, app_protocol: &str, endpoints: &[SocketAddr]) -> String {
    let port = endpoints.first().map_or(1, |e| e.port());
    let mut y = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\nspec: {{clusterIP: {ip}, ports: [{{name: http, port: 80, targetPort: {port}{app_protocol}}}]}}\n"
    );
    // One slice per endpoint: each backend listens on its own port.
    for (i, e) in endpoints.iter().enumerate() {
        y.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-{i}, namespace: demo, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: http, port: {}}}]\nendpoints: [{{addresses: ['{}']}}]\n",
            e.port(),
            e.ip()
        ));
    }
    y
}

/// A plaintext node proxy on 127.0.0.1, started through its front door.
struct Proxy {
    addr: SocketAddr,
    table: Arc<StaticTable>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    stats: Arc<OutboundStats>,
    _running: gammaray_proxy::Proxy,
}

impl Proxy {
    async fn start(yaml: &str) -> Self {
        Self::start_with(yaml, ProxyConfig::default()).await
    }

    /// [`Proxy::start`] with `config`, its outbound listener on 127.0.0.1.
    async fn start_with(yaml: &str, config: ProxyConfig) -> Self {
        let table = Arc::new(StaticTable::default());
        let (tx, rx) = watch::channel(Arc::new(snapshot_of(yaml)));
        let config = ProxyConfig { outbound_addr: (Ipv4Addr::LOCALHOST, 0).into(), ..config };
        let inputs = Inputs { snapshot: rx, lookup: table.clone(), certs: None };
        let running = gammaray_proxy::Proxy::start(config, inputs, &tokio::runtime::Handle::current())
            .expect("the proxy starts");
        Self {
            addr: running.outbound_addr(),
            table,
            snapshot: tx,
            stats: running.stats().clone(),
            _running: running,
        }
    }

    /// Opens a connection "to" `dst` through the proxy, as the eBPF redirect would.
    async fn connect(&self, dst: SocketAddrV4) -> tokio::net::TcpStream {
        dial(self.addr, &self.table, dst).await
    }

    async fn http1(&self, dst: SocketAddrV4) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
        let stream = self.connect(dst).await;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("h1 handshake");
        tokio::spawn(conn);
        sender
    }
}

/// Opens a connection "to" `dst` through the proxy at `proxy`, recording the destination in
/// `table` as the eBPF redirect would.
async fn dial(proxy: SocketAddr, table: &StaticTable, dst: SocketAddrV4) -> tokio::net::TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind((Ipv4Addr::LOCALHOST, 0).into()).expect("bind client");
    let SocketAddr::V4(local) = socket.local_addr().expect("client addr") else { unreachable!() };
    table.insert(local, dst);
    socket.connect(proxy).await.expect("connect to proxy")
}

/// A port that was bound and released: connections to it are refused.
fn refused_port() -> SocketAddr {
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    l.local_addr().expect("addr")
}

fn snapshot_of(yaml: &str) -> Snapshot {
    let mut store = Store::default();
    let applied = store.apply_yaml(yaml);
    assert!(applied.errors.is_empty(), "{:?}", applied.errors);
    translate(&store, &Options::default()).snapshot
}

async fn get(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, BTreeMap<String, String>, http::HeaderMap) {
    let mut req = Request::get(path).header("host", "backend");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    sender.ready().await.expect("connection ready");
    let resp = sender.send_request(req.body(Empty::new()).expect("request")).await.expect("response");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let fields = String::from_utf8_lossy(&body)
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect();
    (status, fields, headers)
}

fn canary_route(v1: u32, v2: u32) -> String {
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: canary, namespace: demo}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: backend, port: 80}}]\n  rules:\n  - backendRefs: [{{name: backend-v1, port: 80, weight: {v1}}}, {{name: backend-v2, port: 80, weight: {v2}}}]\n"
    )
}

async fn canary_world() -> String {
    let v1 = [backend("v1-a").await, backend("v1-b").await, backend("v1-c").await];
    let v2 = [backend("v2-a").await, backend("v2-b").await];
    let all: Vec<SocketAddr> = v1.iter().chain(&v2).copied().collect();
    format!(
        "{}{}{}",
        service("backend", "10.96.0.1", ", appProtocol: http", &all),
        service("backend-v1", "10.96.0.2", "", &v1),
        service("backend-v2", "10.96.0.3", "", &v2)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_90_10_canary_splits_1000_requests_on_one_connection() {
    let world = canary_world().await;
    let proxy = Proxy::start(&format!("{world}{}", canary_route(90, 10))).await;
    let mut sender = proxy.http1(VIP).await;
    let mut counts = BTreeMap::<String, u32>::new();
    for _ in 0..1000 {
        let (status, fields, _) = get(&mut sender, "/", &[]).await;
        assert_eq!(status, StatusCode::OK);
        let version = fields["backend"].split('-').next().expect("v1 or v2").to_owned();
        *counts.entry(version).or_default() += 1;
    }
    let v2 = f64::from(counts.get("v2").copied().unwrap_or(0)) / 1000.0;
    assert!((v2 - 0.10).abs() <= 0.03, "v2 got {v2}: {counts:?}");
    assert_eq!(proxy.stats.snapshot().requests, 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weight_change_takes_effect_without_failing_a_request() {
    let world = canary_world().await;
    let proxy = Proxy::start(&format!("{world}{}", canary_route(100, 0))).await;
    let mut sender = proxy.http1(VIP).await;
    for _ in 0..50 {
        let (status, fields, _) = get(&mut sender, "/", &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert!(fields["backend"].starts_with("v1"), "all to v1 before the change");
    }
    proxy.snapshot.send_replace(Arc::new(snapshot_of(&format!("{world}{}", canary_route(0, 100)))));
    for _ in 0..50 {
        let (status, fields, _) = get(&mut sender, "/", &[]).await;
        assert_eq!(status, StatusCode::OK, "no request fails across the change");
        assert!(
            fields["backend"].starts_with("v2"),
            "the next request on the same connection follows the new weights"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_metrics_follow_a_new_snapshot_on_an_open_connection() {
    // Two configs for the same address, the second one naming another Service and backend.
    // Both snapshots carry the same version, as any embedder's may: the proxy must still see
    // that the config changed.
    let (a, b) = (backend("a").await, backend("b").await);
    let before = service("backend", "10.96.0.1", ", appProtocol: http", &[a]);
    let after = service("renamed", "10.96.0.1", ", appProtocol: http", &[b]);
    let proxy = Proxy::start(&before).await;
    let mut sender = proxy.http1(VIP).await;
    let count = |service: &str| {
        let labels = gammaray_proxy::stats::RequestLabels {
            source_workload: "unknown".into(),
            destination_service: format!("demo/{service}:80"),
            backend: format!("demo/{service}:80"),
            response_code: 200,
        };
        proxy.stats.requests_by.get_or_create(&labels).get()
    };
    for _ in 0..5 {
        let (status, fields, _) = get(&mut sender, "/", &[]).await;
        assert_eq!((status, fields["backend"].as_str()), (StatusCode::OK, "a"));
    }
    let next = snapshot_of(&after);
    assert_eq!(next.version, proxy.snapshot.borrow().version, "same version on purpose");
    proxy.snapshot.send_replace(Arc::new(next));
    for _ in 0..7 {
        let (status, fields, _) = get(&mut sender, "/", &[]).await;
        assert_eq!((status, fields["backend"].as_str()), (StatusCode::OK, "b"));
    }
    assert_eq!((count("backend"), count("renamed")), (5, 7), "each request counted under its own config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_routing_adds_a_header_only_on_matched_requests() {
    let v1 = backend("reviews-v1").await;
    let v2 = backend("reviews-v2").await;
    let yaml = format!(
        "{}{}{}---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: reviews, namespace: demo}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: backend, port: 80}}]\n  rules:\n  - matches: [{{headers: [{{name: x-user, value: tester}}]}}]\n    filters: [{{type: RequestHeaderModifier, requestHeaderModifier: {{add: [{{name: x-canary, value: 'true'}}]}}}}, {{type: ResponseHeaderModifier, responseHeaderModifier: {{set: [{{name: x-served-by, value: v2}}]}}}}]\n    backendRefs: [{{name: reviews-v2, port: 80}}]\n  - backendRefs: [{{name: reviews-v1, port: 80}}]\n",
        service("backend", "10.96.0.1", "", &[v1]),
        service("reviews-v1", "10.96.0.2", "", &[v1]),
        service("reviews-v2", "10.96.0.3", "", &[v2]),
    );
    let proxy = Proxy::start(&yaml).await;
    let mut sender = proxy.http1(VIP).await;
    let (status, fields, headers) = get(&mut sender, "/reviews/1", &[("x-user", "tester")]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(fields["backend"], "reviews-v2");
    assert_eq!(fields.get("h:x-canary").map(String::as_str), Some("true"));
    assert_eq!(fields["path"], "/reviews/1");
    assert_eq!(fields["h:host"], "backend", "the client's Host is kept");
    assert_eq!(headers["x-served-by"], "v2");
    let (_, fields, headers) = get(&mut sender, "/reviews/1", &[("x-user", "someone")]).await;
    assert_eq!(fields["backend"], "reviews-v1");
    assert!(!fields.contains_key("h:x-canary"));
    assert!(!headers.contains_key("x-served-by"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_become_status_codes_and_the_proxy_keeps_serving() {
    let v1 = backend("v1").await;
    let closed = refused_port();
    let yaml = format!(
        "{}{}{}---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: demo}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: backend, port: 80}}]\n  rules:\n  - matches: [{{path: {{type: PathPrefix, value: /ok}}}}]\n    backendRefs: [{{name: good, port: 80}}]\n  - matches: [{{path: {{type: PathPrefix, value: /refused}}}}]\n    backendRefs: [{{name: refused, port: 80}}]\n  - matches: [{{path: {{type: PathPrefix, value: /missing}}}}]\n    backendRefs: [{{name: nowhere, port: 80}}]\n  - matches: [{{path: {{type: PathPrefix, value: /empty}}}}]\n    backendRefs: [{{name: backend, port: 80}}]\n  - matches: [{{path: {{type: PathPrefix, value: /moved}}}}]\n    filters: [{{type: RequestRedirect, requestRedirect: {{hostname: example.org, statusCode: 301}}}}]\n",
        service("backend", "10.96.0.1", "", &[]),
        service("good", "10.96.0.2", "", &[v1]),
        service("refused", "10.96.0.3", "", &[closed]),
    );
    let proxy = Proxy::start(&yaml).await;
    let mut sender = proxy.http1(VIP).await;
    let cases = [
        ("/ok", StatusCode::OK),
        ("/elsewhere", StatusCode::NOT_FOUND),
        ("/missing", StatusCode::INTERNAL_SERVER_ERROR),
        ("/empty", StatusCode::SERVICE_UNAVAILABLE),
        ("/refused", StatusCode::BAD_GATEWAY),
        ("/moved/x", StatusCode::MOVED_PERMANENTLY),
        ("/ok", StatusCode::OK),
    ];
    for (path, expected) in cases {
        let (status, _, headers) = get(&mut sender, path, &[]).await;
        assert_eq!(status, expected, "{path}");
        if expected == StatusCode::MOVED_PERMANENTLY {
            assert_eq!(headers["location"], "http://example.org/moved/x");
        }
    }

    // Malformed HTTP: a 400 and that connection closes; the proxy serves the next one.
    let mut raw = proxy.connect(VIP).await;
    raw.write_all(b"NOT HTTP AT ALL\r\n\r\n").await.expect("write garbage");
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut reply))
        .await
        .expect("the proxy closes the connection")
        .expect("read");
    assert!(
        String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    let mut again = proxy.http1(VIP).await;
    assert_eq!(get(&mut again, "/ok", &[]).await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_requests_reach_an_h2c_backend() {
    let b = backend("grpc-v1").await;
    let yaml = service("backend", "10.96.0.1", ", appProtocol: kubernetes.io/h2c", &[b]);
    let proxy = Proxy::start(&yaml).await;
    let stream = proxy.connect(VIP).await;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    for _ in 0..3 {
        let req = Request::post("http://backend/proto.EchoTestService/Echo")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let resp = sender.send_request(req).await.expect("h2 response");
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert!(body.contains("backend=grpc-v1"), "{body}");
        assert!(body.contains("version=HTTP/2.0"), "the backend spoke HTTP/2: {body}");
        assert!(body.contains("h:te=trailers"), "te: trailers reaches a gRPC backend: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_ports_are_balanced_at_l4_and_other_addresses_pass_through() {
    let echo = |name: &'static str| async move {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let _ = s.write_all(name.as_bytes()).await;
                });
            }
        });
        addr
    };
    let a = echo("tcp-a").await;
    let b = echo("tcp-b").await;
    let proxy = Proxy::start(&service("backend", "10.96.0.1", "", &[a, b])).await;
    let mut seen = BTreeMap::<String, u32>::new();
    for _ in 0..40 {
        let mut s = proxy.connect(VIP).await;
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.expect("read");
        *seen.entry(buf).or_default() += 1;
    }
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        vec!["tcp-a".to_owned(), "tcp-b".to_owned()],
        "{seen:?}"
    );
    // Not a frontend: carried to the address itself.
    let SocketAddr::V4(direct) = a else { unreachable!() };
    let mut s = proxy.connect(direct).await;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.expect("read");
    assert_eq!(buf, "tcp-a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_gets_a_copy_of_bodiless_requests() {
    let (main, main_count) = counting_backend("main").await;
    let (shadow, shadow_count) = counting_backend("shadow").await;
    let yaml = format!(
        "{}{}{}---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: m, namespace: demo}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: backend, port: 80}}]\n  rules:\n  - filters: [{{type: RequestMirror, requestMirror: {{backendRef: {{name: shadow, port: 80}}}}}}]\n    backendRefs: [{{name: main, port: 80}}]\n",
        service("backend", "10.96.0.1", "", &[main]),
        service("main", "10.96.0.2", "", &[main]),
        service("shadow", "10.96.0.3", "", &[shadow]),
    );
    let proxy = Proxy::start(&yaml).await;
    let mut sender = proxy.http1(VIP).await;
    for _ in 0..10 {
        let (status, fields, _) = get(&mut sender, "/", &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(fields["backend"], "main", "the client gets the primary's answer");
    }
    let stream = proxy.connect(VIP).await;
    let (mut post, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("h1");
    tokio::spawn(conn);
    let req = Request::post("/upload")
        .header("host", "backend")
        .body(Full::new(Bytes::from_static(b"payload")))
        .expect("req");
    assert_eq!(post.send_request(req).await.expect("post").status(), StatusCode::OK);

    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while shadow_count.load(std::sync::atomic::Ordering::Relaxed) < 10 && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(shadow_count.load(std::sync::atomic::Ordering::Relaxed), 10, "every GET was mirrored");
    assert_eq!(main_count.load(std::sync::atomic::Ordering::Relaxed), 11);
    let counts = proxy.stats.snapshot();
    assert_eq!((counts.mirrored, counts.mirror_skipped), (10, 1), "the POST with a body was not mirrored");
}

/// A gRPC backend over h2c: every unary call is answered with its own request message and
/// `grpc-status: 0` in the trailers.
async fn grpc_backend() -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind gRPC backend");
    let addr = listener.local_addr().expect("backend addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let message = req.into_body().collect().await?.to_bytes();
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                    let frames = [
                        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(message)),
                        Ok(hyper::body::Frame::trailers(trailers)),
                    ];
                    let mut resp =
                        hyper::Response::new(http_body_util::StreamBody::new(futures::stream::iter(frames)));
                    resp.headers_mut()
                        .insert("content-type", http::HeaderValue::from_static("application/grpc"));
                    Ok::<_, hyper::Error>(resp)
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// A tonic codec that sends and receives raw message bytes, so the test needs no protobuf.
#[derive(Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        bytes::BufMut::put(dst, item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(bytes::Buf::copy_to_bytes(src, bytes::Buf::remaining(src))))
    }
}

/// Local answers reach a real gRPC client (tonic) as gRPC statuses: the code gRPC's HTTP
/// mapping gives for the HTTP status the proxy would have sent, and the reason as the message;
/// each is counted by its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_clients_get_grpc_statuses_for_local_answers() {
    let good = grpc_backend().await;
    let closed = refused_port();
    let h2c = ", appProtocol: kubernetes.io/h2c";
    let rule = |method: &str, backend: &str| {
        format!(
            "  - matches: [{{method: {{service: demo.Echo, method: {method}}}}}]\n    backendRefs: [{{name: {backend}, port: 80}}]\n"
        )
    };
    let yaml = format!(
        "{}{}{}---\napiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: g, namespace: demo}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: backend, port: 80}}]\n  rules:\n{}{}{}{}",
        service("backend", "10.96.0.1", h2c, &[]),
        service("good", "10.96.0.2", h2c, &[good]),
        service("refused", "10.96.0.3", h2c, &[closed]),
        rule("Ok", "good"),
        rule("Empty", "backend"),
        rule("Refused", "refused"),
        rule("Missing", "nowhere"),
    );
    let proxy = Proxy::start(&yaml).await;
    let (addr, table) = (proxy.addr, proxy.table.clone());
    let channel = tonic::transport::Endpoint::from_static("http://backend.demo:80")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let table = table.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(dial(addr, &table, VIP).await)) }
        }))
        .await
        .expect("a gRPC channel through the proxy");
    let mut grpc = tonic::client::Grpc::new(channel);
    let mut call = async |path: &'static str| {
        grpc.ready().await.expect("the channel is ready");
        let request = tonic::Request::new(Bytes::from_static(b"ping"));
        grpc.unary(request, http::uri::PathAndQuery::from_static(path), RawCodec).await
    };

    let answer = call("/demo.Echo/Ok").await.expect("a routed call succeeds");
    assert_eq!(answer.into_inner(), Bytes::from_static(b"ping"));
    for (path, code, message, reason) in [
        ("/demo.Other/Call", tonic::Code::Unimplemented, "no route rule matches the request", "no_route"),
        (
            "/demo.Echo/Empty",
            tonic::Code::Unavailable,
            "no ready endpoint for demo/backend:80",
            "no_endpoint",
        ),
        ("/demo.Echo/Refused", tonic::Code::Unavailable, "could not be reached", "upstream_failed"),
        ("/demo.Echo/Missing", tonic::Code::Unknown, "backendRef does not resolve", "invalid_backend"),
    ] {
        let status = call(path).await.expect_err("a local answer is a gRPC error");
        assert_eq!(status.code(), code, "{path}: {status:?}");
        assert!(status.message().contains(message), "{path}: {:?}", status.message());
        let counted =
            proxy.stats.local_responses.get_or_create(&gammaray_proxy::stats::LocalLabels { reason }).get();
        assert_eq!(counted, 1, "{path} counted once as {reason}");
    }
    let answer = call("/demo.Echo/Ok").await.expect("the connection still serves");
    assert_eq!(answer.into_inner(), Bytes::from_static(b"ping"));
}

/// Sends `request` as raw bytes on a new connection through the proxy and reads the whole
/// answer (the request asks the proxy to close).
async fn raw_exchange(proxy: &Proxy, request: &[u8]) -> String {
    let mut raw = proxy.connect(VIP).await;
    raw.write_all(request).await.expect("write the request");
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut reply))
        .await
        .expect("the proxy answers and closes")
        .expect("read");
    String::from_utf8_lossy(&reply).into_owned()
}

/// HTTP at the edge: a request with two Host headers is refused; one with none (HTTP/1.0)
/// reaches the backend as HTTP/1.1 with the Service's name; an HTTP/2 client reaches a Service
/// whose port says HTTP/1.1 in HTTP/1.1; a failed upstream's answer names no pod address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_refuses_ambiguous_hosts_fills_missing_ones_and_speaks_the_backends_protocol() {
    let v1 = backend("v1").await;
    let closed = refused_port();
    let yaml = format!(
        "{}{}",
        service("backend", "10.96.0.1", ", appProtocol: http", &[v1]),
        service("refused", "10.96.0.3", ", appProtocol: http", &[closed]),
    );
    let proxy = Proxy::start(&yaml).await;

    let reply = raw_exchange(
        &proxy,
        b"GET / HTTP/1.1\r\nHost: backend\r\nHost: elsewhere\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 400"), "two Hosts: {reply}");
    assert!(!reply.contains("backend=v1"), "never forwarded: {reply}");

    let reply = raw_exchange(&proxy, b"GET /old HTTP/1.0\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.0 200") || reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("version=HTTP/1.1"), "upstream as HTTP/1.1: {reply}");
    assert!(reply.contains("h:host=backend.demo.svc"), "the Service's name as Host: {reply}");

    let stream = proxy.connect(VIP).await;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let req = Request::get("http://backend/h2").body(Empty::<Bytes>::new()).expect("request");
    let resp = sender.send_request(req).await.expect("h2 response");
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("version=HTTP/1.1"), "the Service says HTTP/1.1: {body}");
    assert!(body.contains("path=/h2"), "origin form upstream: {body}");
    assert!(body.contains("h:host=backend"), "the authority becomes the Host: {body}");

    let refused = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 3), 80);
    let mut sender = proxy.http1(refused).await;
    let (status, _, _) = get(&mut sender, "/", &[]).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let mut sender = proxy.http1(refused).await;
    let req = Request::get("/").header("host", "refused").body(Empty::<Bytes>::new()).expect("request");
    let resp = sender.send_request(req).await.expect("response");
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(!body.contains(&closed.to_string()) && !body.contains("127.0.0.1"), "no pod address: {body}");
}

/// Waits (at most `limit`) for the proxy to close `stream`; returns how long that took, or
/// `None` if it stayed open.
async fn closed_within(stream: &mut tokio::net::TcpStream, limit: Duration) -> Option<Duration> {
    let started = std::time::Instant::now();
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// A client that sends its request's head a byte at a time (slowloris) is closed at the header
/// timeout, and so is a keep-alive connection left idle after a request; a request that is
/// sent in time is answered on the same kind of connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_heads_and_idle_keep_alives_are_closed_at_the_header_timeout() {
    let v1 = backend("v1").await;
    let yaml = service("backend", "10.96.0.1", ", appProtocol: http", &[v1]);
    let timeout = Duration::from_millis(500);
    let proxy =
        Proxy::start_with(&yaml, ProxyConfig { header_read_timeout: timeout, ..ProxyConfig::default() })
            .await;

    let mut slow = proxy.connect(VIP).await;
    let dripping = tokio::spawn(async move {
        for b in b"GET / HTTP/1.1\r\nHost: backend\r\nX-Slow: ".iter().chain(b"a".repeat(100).iter()) {
            if slow.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        closed_within(&mut slow, Duration::from_secs(5)).await
    });
    let closed = dripping.await.expect("the slow client ran");
    assert!(closed.is_some(), "a slowloris is closed");

    let mut idle = proxy.connect(VIP).await;
    idle.write_all(b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n").await.expect("a request");
    let mut head = [0u8; 12];
    idle.read_exact(&mut head).await.expect("an answer");
    assert_eq!(&head, b"HTTP/1.1 200");
    let after = closed_within(&mut idle, Duration::from_secs(5)).await;
    assert!(
        after.is_some_and(|d| d >= timeout / 2),
        "an idle keep-alive is closed at the timeout: {after:?}"
    );
}

/// A connection to the inbound HBONE listener that never finishes its TLS handshake is closed at
/// the handshake timeout and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_handshake_that_never_ends_is_cut_at_its_timeout() {
    let node = Ipv4Addr::new(127, fastrand::u8(100..=250), 20, 2);
    let authority = Arc::new(gammaray_proxy::identity::Authority::generate("cluster.local").expect("CA"));
    let (_tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    let config = ProxyConfig {
        outbound_addr: (node, 0).into(),
        node: Some("node-b".into()),
        tls_handshake_timeout: Duration::from_millis(300),
        ..ProxyConfig::default()
    };
    let inputs = Inputs {
        snapshot: rx,
        lookup: Arc::new(StaticTable::default()),
        certs: Some(Arc::new(gammaray_proxy::identity::CertStore::new(Arc::new(
            gammaray_proxy::identity::Trust::new(gammaray_proxy::identity::TrustBundle::of(&authority)),
        )))),
    };
    let proxy =
        gammaray_proxy::Proxy::start(config, inputs, &tokio::runtime::Handle::current()).expect("proxy");
    let hbone = proxy.inbound_addr().expect("an inbound listener");
    let mut silent = tokio::net::TcpStream::connect(hbone).await.expect("connect");
    let closed = closed_within(&mut silent, Duration::from_secs(5)).await;
    assert!(closed.is_some(), "a silent client is cut off");
    let counted = proxy
        .stats()
        .hbone_refused
        .get_or_create(&gammaray_proxy::stats::RefusalLabels { reason: "handshake_timeout" });
    assert_eq!(counted.get(), 1);
}

/// Opens a connection through the proxy from `source`, as a pod with that address would; a
/// connection the proxy resets at once may fail already here.
async fn dial_from(
    proxy: &Proxy,
    source: Ipv4Addr,
    dst: SocketAddrV4,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind((source, 0).into()).expect("bind client");
    let SocketAddr::V4(local) = socket.local_addr().expect("client addr") else { unreachable!() };
    proxy.table.insert(local, dst);
    socket.connect(proxy.addr).await
}

/// Sends one request on `stream` and says whether a 200 came back.
async fn answered(stream: &mut std::io::Result<tokio::net::TcpStream>) -> bool {
    let Ok(stream) = stream else { return false };
    if stream.write_all(b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n").await.is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut head)).await,
        Ok(Ok(_)) if &head == b"HTTP/1.1 200"
    )
}

/// One source holds at most its share of connections and the proxy its total: past them a
/// connection is reset at once and counted, other sources keep being served, and a place
/// comes back when a connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_past_its_share_is_refused_while_others_are_served() {
    let v1 = backend("v1").await;
    let yaml = service("backend", "10.96.0.1", ", appProtocol: http", &[v1]);
    let config = ProxyConfig { max_connections: 5, max_connections_per_source: 3, ..ProxyConfig::default() };
    let proxy = Proxy::start_with(&yaml, config).await;
    let b = fastrand::u8(100..=250);
    let (greedy, other) = (Ipv4Addr::new(127, b, 30, 1), Ipv4Addr::new(127, b, 30, 2));

    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = dial_from(&proxy, greedy, VIP).await;
        assert!(answered(&mut c).await, "within its share");
        held.push(c);
    }
    let mut over = dial_from(&proxy, greedy, VIP).await;
    assert!(!answered(&mut over).await, "a fourth from the same source is refused");
    let limited = |reason| {
        let labels =
            gammaray_proxy::stats::LimitLabels { listener: "outbound", reason, source: "unknown".to_owned() };
        proxy.stats.limited.get_or_create(&labels).get()
    };
    assert_eq!(limited("source_limit"), 1);

    let mut others = Vec::new();
    for _ in 0..2 {
        let mut c = dial_from(&proxy, other, VIP).await;
        assert!(answered(&mut c).await, "another source is served");
        others.push(c);
    }
    let mut sixth = dial_from(&proxy, other, VIP).await;
    assert!(!answered(&mut sixth).await, "five in all");
    assert_eq!(limited("node_limit"), 1);

    drop(held.pop());
    let mut again = None;
    for _ in 0..50 {
        let mut c = dial_from(&proxy, greedy, VIP).await;
        if answered(&mut c).await {
            again = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(again.is_some(), "a closed connection's place comes back");
}

/// An L4 connection is never cut for being idle: quiet for longer than every timeout the
/// proxy has, it still carries bytes both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_l4_connection_is_not_cut() {
    let echo = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind echo");
    let echo_addr = echo.local_addr().expect("echo addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    // No appProtocol and no routes: the Service is balanced at L4.
    let yaml = service("opaque", "10.96.0.1", "", &[echo_addr]);
    let short = Duration::from_millis(200);
    let config = ProxyConfig {
        header_read_timeout: short,
        h2_keepalive_interval: short,
        h2_keepalive_timeout: short,
        tls_handshake_timeout: short,
        ..ProxyConfig::default()
    };
    let proxy = Proxy::start_with(&yaml, config).await;
    let mut conn = proxy.connect(VIP).await;
    for round in 0..2 {
        conn.write_all(b"ping").await.expect("write");
        let mut back = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut back))
            .await
            .unwrap_or_else(|_| panic!("round {round}: no echo"))
            .expect("read");
        assert_eq!(&back, b"ping", "round {round}");
        // Quiet for ten times every timeout above.
        tokio::time::sleep(short * 10).await;
    }
}
