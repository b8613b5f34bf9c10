//! HTTP proxying by the snapshot: HTTP/1.1 and h2c (gRPC) from the client, each request routed
//! by [`crate::route::decide`], its filters applied, and forwarded to one endpoint of the
//! chosen backend over pooled connections.
//!
//! Failures become responses, never a dropped proxy: each is a [`LocalError`], classified once
//! ([`crate::local`]): no rule matched → 404, unusable backend → 500, no ready endpoint → 503,
//! upstream refused or reset → 502, timeout → 504, answered in the client's protocol (gRPC
//! clients get a `grpc-status`). Malformed HTTP gets hyper's 400 and that connection closes.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Weak, atomic::Ordering::Relaxed},
    time::Instant,
};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version, header,
    uri::PathAndQuery,
};
use http_body_util::{BodyExt as _, Empty, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{net::TcpStream, sync::watch};
use tracing::{debug, info, warn};

use crate::{
    local::{LocalError, is_grpc, respond},
    logfmt::{Addr, OrDash},
    route::{Decision, Forward, LocalReason, RequestView, decide},
    snapshot::{AppProtocol, Backend, Endpoint, Snapshot},
    stats::OutboundStats,
};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// Headers that describe one hop and are not forwarded, besides those that the Connection header
/// names. Names, not strings: a `&str` would be parsed into a name on every request.
static HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

/// What one client connection carries with it.
pub(crate) struct ConnContext {
    pub mesh: Arc<crate::hbone::Mesh>,
    pub client: SocketAddr,
    pub orig_dst: SocketAddr,
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    pub upstreams: crate::upstream::Upstreams,
    /// Connections for mirrored copies, which have no body.
    pub mirrors: crate::upstream::Upstreams<Empty<Bytes>>,
    pub stats: Arc<OutboundStats>,
    pub counters: std::sync::Mutex<ConnCounters>,
}

/// Serves one client connection as HTTP/1.1 or HTTP/2 (prior knowledge) until it closes.
pub(crate) async fn serve_connection(stream: TcpStream, ctx: Arc<ConnContext>) {
    let ctx_config = ctx.mesh.config.clone();
    let mut drain = ctx.mesh.drain.clone();
    let service = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        async move {
            let h1 = req.version() <= hyper::Version::HTTP_11;
            let mut response = handle(req, &ctx).await;
            // Draining: the client's next request goes to a new connection (the proxy that
            // takes over), told so with this response instead of by a close it could race.
            if h1 && *ctx.mesh.drain.borrow() {
                response.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(response)
        }
    });
    let config = ctx_config.clone();
    if speaks_h2(&stream).await {
        // Many calls may share the connection: what one poll answers leaves in one write.
        let (io, cork) = crate::cork::corked(stream);
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(config.h2_keepalive_interval)
            .keep_alive_timeout(config.h2_keepalive_timeout)
            .max_concurrent_streams(config.h2.pod_max_concurrent_streams)
            .serve_connection(TokioIo::new(io), service);
        // Draining sends GOAWAY: the client opens no more streams here, those open finish.
        let served = cork.drive(async move {
            tokio::pin!(conn);
            tokio::select! {
                done = conn.as_mut() => return done,
                () = crate::hbone::drained(&mut drain) => conn.as_mut().graceful_shutdown(),
            }
            conn.await
        });
        if let Err(err) = served.await {
            debug!(error = %err, "http/2 connection ended with an error");
        }
        return;
    }
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(config.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(config.h2_keepalive_interval)
        .keep_alive_timeout(config.h2_keepalive_timeout)
        .max_concurrent_streams(config.h2.pod_max_concurrent_streams);
    // Draining: an HTTP/1.1 connection's next response says `connection: close` (above); one
    // still open after the grace (idle) is closed, a busy one after its response. (HTTP/2 seen
    // by its preface above gets GOAWAY at once.)
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let served = tokio::select! {
        done = conn.as_mut() => done,
        () = crate::hbone::drained(&mut drain) => {
            tokio::select! {
                done = conn.as_mut() => done,
                () = tokio::time::sleep(config.drain_idle_grace) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
    };
    if let Err(err) = served {
        debug!(error = %err, "http connection ended with an error");
    }
}

/// Whether the client opened with HTTP/2's connection preface (prior knowledge, as gRPC over
/// h2c does). The method `PRI` is reserved for it (RFC 9113, section 3.4), so the first four
/// bytes decide; a first segment shorter than that is left to hyper's own detection.
async fn speaks_h2(stream: &TcpStream) -> bool {
    let mut head = [0u8; 4];
    matches!(stream.peek(&mut head).await, Ok(4)) && &head == b"PRI "
}

async fn handle(req: Request<Incoming>, ctx: &ConnContext) -> Response<Body> {
    let started = Instant::now();
    let method =
        tracing::enabled!(tracing::Level::INFO).then(|| (req.method().clone(), req.uri().path().to_owned()));
    let grpc = is_grpc(req.headers());
    let (answer, upstream) = route_request(req, ctx).await;
    let upstream = upstream.as_ref();
    // The one place a local answer is classified: its status, outcome and counters follow.
    let (response, status, outcome, error) = match answer {
        Ok(response) => {
            let status = response.status();
            (response, status, "-", None)
        }
        Err(err) => {
            let class = err.class();
            ctx.stats
                .local_responses
                .get_or_create(&crate::stats::LocalLabels { reason: class.outcome })
                .inc();
            if let LocalError::Upstream { endpoint, source } = &err {
                ctx.stats.upstream_errors.fetch_add(1, Relaxed);
                warn!(endpoint = %endpoint, error = %source, "upstream request failed");
            }
            (respond(class.status, &err.public_message(), grpc), class.status, class.outcome, Some(err))
        }
    };
    let status = status.as_u16();
    ctx.stats.requests.fetch_add(1, Relaxed);
    ctx.request_counter(upstream.map(|u| &u.backend), status).inc();
    if let Some((method, path)) = method {
        // The access log: values are formatted into the line, never into strings of their own.
        let snapshot = ctx.snapshot.borrow().clone();
        let src_identity = snapshot.workloads.get(&ctx.client.ip()).map(|w| w.identity());
        let endpoint = upstream.and_then(|u| u.backend.endpoints.get(u.endpoint));
        info!(
            src = %Addr(ctx.client),
            src_identity = %OrDash(src_identity),
            dst = %Addr(ctx.orig_dst),
            service = %OrDash(upstream.map(|u| BackendLabel(&u.backend))),
            backend = %OrDash(endpoint.map(|e| Addr(e.addr()))),
            dst_identity = %OrDash(endpoint.and_then(|e| e.identity().map(|i| &**i))),
            mtls = upstream.is_some_and(|u| u.tunnelled),
            %method,
            path,
            status,
            outcome,
            error = %OrDash(error.as_ref()),
            bytes = response.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).unwrap_or("-"),
            duration_ms = started.elapsed().as_millis() as u64,
            "request"
        );
    }
    response
}

/// What answered a request: a response to pass on (a backend's, or a redirect), or the reason
/// the proxy answers itself; and which upstream was chosen, when one was.
type Answer = (Result<Response<Body>, LocalError>, Option<UpstreamInfo>);

/// `namespace/name:port` of a backend, as metrics and logs name it.
fn backend_label(backend: &Backend) -> String {
    BackendLabel(backend).to_string()
}

struct BackendLabel<'a>(&'a Backend);

impl std::fmt::Display for BackendLabel<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.0.service, self.0.port)
    }
}

/// The per-request counters one connection has used, and the labels that depend only on the
/// client and the address it dialled, worked out once per snapshot instead of once per request.
///
/// Snapshots and backends are recognised by identity, through `Weak`s: a `Weak` keeps its
/// allocation's address from being reused (so a new snapshot can never pass for a cached one,
/// whatever its version says) without keeping the snapshot's contents alive on an idle
/// connection.
#[derive(Default)]
pub(crate) struct ConnCounters {
    snapshot: Weak<Snapshot>,
    source: String,
    destination: String,
    /// By backend (`None`: answered locally) and response code.
    used: Vec<(Option<Weak<Backend>>, u16, prometheus_client::metrics::counter::Counter)>,
}

/// A connection uses a handful of (backend, code) pairs; past this many, look each one up.
const COUNTERS_PER_CONNECTION: usize = 16;

impl ConnContext {
    /// The counter of requests from this connection's client to `backend` answered `status`.
    fn request_counter(
        &self,
        backend: Option<&Arc<Backend>>,
        status: u16,
    ) -> prometheus_client::metrics::counter::Counter {
        let snapshot = self.snapshot.borrow().clone();
        let mut cache = self.counters.lock().expect("counters lock");
        if !std::ptr::eq(cache.snapshot.as_ptr(), Arc::as_ptr(&snapshot)) {
            let client = snapshot.workloads.get(&self.client.ip());
            cache.source = client.map_or_else(|| "unknown".to_owned(), |w| w.label());
            cache.destination = snapshot
                .frontend(self.orig_dst)
                .map_or_else(|| self.orig_dst.to_string(), |f| format!("{}:{}", f.service, f.port));
            cache.used.clear();
            cache.snapshot = Arc::downgrade(&snapshot);
        }
        let same_backend = |cached: &Option<Weak<Backend>>| match (cached, backend) {
            (Some(c), Some(b)) => std::ptr::eq(c.as_ptr(), Arc::as_ptr(b)),
            (None, None) => true,
            _ => false,
        };
        if let Some((_, _, counter)) = cache.used.iter().find(|(b, s, _)| *s == status && same_backend(b)) {
            return counter.clone();
        }
        let counter = self
            .stats
            .requests_by
            .get_or_create(&crate::stats::RequestLabels {
                source_workload: cache.source.clone(),
                destination_service: cache.destination.clone(),
                backend: backend.map_or_else(|| "-".to_owned(), |b| backend_label(b)),
                response_code: status,
            })
            .clone();
        if cache.used.len() < COUNTERS_PER_CONNECTION {
            cache.used.push((backend.map(Arc::downgrade), status, counter.clone()));
        }
        counter
    }
}

/// Answers a request, and says which upstream did when one did.
async fn route_request(req: Request<Incoming>, ctx: &ConnContext) -> Answer {
    // One clone of the Arc per request; never held across an await as a borrow.
    let snapshot = ctx.snapshot.borrow().clone();
    let Some(frontend) = snapshot.frontend(ctx.orig_dst) else {
        return (Err(LocalError::NotAFrontend), None);
    };
    // RFC 9112, 3.2: a request with more than one Host is refused, never guessed at.
    if req.headers().get_all(header::HOST).iter().nth(1).is_some() {
        return (Err(LocalError::DuplicateHost), None);
    }
    let client_ns = snapshot.workloads.get(&ctx.client.ip()).map(|w| w.pod.namespace.clone());
    let host = request_host(&req);
    let random = fastrand::u64(..);
    let (decision_backend, forward) = {
        let view = RequestView {
            method: req.method(),
            scheme: "http",
            host: host.as_deref(),
            path: req.uri().path(),
            query: req.uri().query(),
            headers: req.headers(),
        };
        match decide(frontend, client_ns.as_deref(), &view, random) {
            Decision::Passthrough(backend) => (backend.clone(), None),
            Decision::Forward(f) => (f.backend.clone(), Some(Plan::from(&f, req.uri().path()))),
            Decision::Respond(r) if r.reason == LocalReason::Redirect => {
                let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::FOUND);
                let mut resp = respond(status, "redirect", false);
                for (name, value) in r.headers {
                    resp.headers_mut().insert(name, value);
                }
                return (Ok(resp), None);
            }
            Decision::Respond(r) => return (Err(LocalError::Route(r.reason)), None),
        }
    };
    let timeouts = forward.as_ref().map(|p| p.timeouts).unwrap_or_default();
    // HTTP/1.0 may leave the Host out, but the request goes upstream as HTTP/1.1, which needs
    // one: the Service's own name stands in.
    let host = host.or_else(|| Some(service_host(&frontend.service)));
    let call = forward_to(req, host, &decision_backend, forward, ctx, random);
    match timeouts.request {
        Some(limit) => match tokio::time::timeout(limit, call).await {
            Ok(answer) => answer,
            Err(_) => (Err(LocalError::RequestTimeout), None),
        },
        None => call.await,
    }
}

/// The parts of a forward decision that outlive the borrow of the request (and of the
/// snapshot): the rule's header modifiers are shared with it, not copied.
struct Plan {
    request_headers: Vec<Arc<crate::snapshot::HeaderModifier>>,
    response_headers: Vec<Arc<crate::snapshot::HeaderModifier>>,
    host: Option<String>,
    path: Option<String>,
    timeouts: crate::snapshot::Timeouts,
    mirrors: Vec<crate::snapshot::Mirror>,
}

impl Plan {
    fn from(f: &Forward<'_>, path: &str) -> Self {
        Self {
            request_headers: f.request_header_modifiers().cloned().collect(),
            response_headers: f.response_header_modifiers().cloned().collect(),
            host: f.rewritten_host().map(str::to_owned),
            path: f.rewritten_path(path),
            timeouts: f.timeouts,
            mirrors: f.mirrors().cloned().collect(),
        }
    }
}

/// Sends the request to an endpoint of `backend`; `host` is the one the client asked for,
/// without its port.
async fn forward_to(
    mut req: Request<Incoming>,
    host: Option<String>,
    backend: &Arc<Backend>,
    plan: Option<Plan>,
    ctx: &ConnContext,
    random: u64,
) -> Answer {
    let Some(endpoint_index) = pick_endpoint_index(backend.endpoints.len(), random) else {
        return (Err(LocalError::NoEndpoint { backend: backend_label(backend) }), None);
    };
    let endpoint = &backend.endpoints[endpoint_index];
    // The backend's protocol decides, not the client's: an h2c client may call an HTTP/1.1
    // Service and the other way round. Only a port that declares none follows the client.
    let h2 = match backend.protocol {
        AppProtocol::H2c => true,
        AppProtocol::Http => false,
        AppProtocol::Opaque => req.version() == Version::HTTP_2,
    };
    let uri = match upstream_uri(&req, plan.as_ref().and_then(|p| p.path.as_deref()), endpoint.addr(), h2) {
        Ok(uri) => uri,
        Err(err) => return (Err(LocalError::BadTarget(err)), None),
    };
    *req.uri_mut() = uri;
    strip_hop_by_hop(req.headers_mut());
    if let Some(p) = &plan {
        for m in &p.request_headers {
            crate::route::apply_header_modifier(m, req.headers_mut());
        }
    }
    // Keep the Host the client asked for unless a rewrite changes it; a header that already
    // says so is left as it is.
    let host = plan.as_ref().and_then(|p| p.host.clone()).or(host);
    if let Some(host) = host
        && req.headers().get(header::HOST).map(HeaderValue::as_bytes) != Some(host.as_bytes())
        && let Ok(value) = HeaderValue::from_str(&host)
    {
        req.headers_mut().insert(header::HOST, value);
    }
    *req.version_mut() = if h2 { Version::HTTP_2 } else { Version::HTTP_11 };
    if let Some(p) = &plan {
        for m in &p.mirrors {
            mirror(&req, m, ctx, random);
        }
    }
    let hop = ctx.mesh.hop(&ctx.snapshot.borrow().clone(), ctx.client.ip(), endpoint.addr());
    debug!(endpoint = %endpoint.addr(), ?hop, "upstream hop");
    let info = UpstreamInfo {
        backend: backend.clone(),
        endpoint: endpoint_index,
        tunnelled: matches!(hop, crate::hbone::Hop::Tunnel { .. }),
    };
    if matches!(hop, crate::hbone::Hop::Deny { .. }) {
        hop.record_denial(&ctx.stats, &ctx.snapshot.borrow(), ctx.client, endpoint.addr());
    }
    let answer = match upstream_of(hop) {
        Ok((target, via)) => forward_along(req, target, &via, h2, plan.as_ref(), ctx).await,
        Err(err) => Err(err),
    };
    (answer, Some(info))
}

/// Sends the request to `target` over the proxy's pooled connections (plain TCP to pods of this
/// node, HBONE streams to pods of other nodes) and applies the plan's response filters.
async fn forward_along(
    req: Request<Incoming>,
    target: SocketAddr,
    via: &crate::upstream::Via,
    h2: bool,
    plan: Option<&Plan>,
    ctx: &ConnContext,
) -> Result<Response<Body>, LocalError> {
    let sent = ctx.upstreams.send(target, via, h2, req.map(http_body_util::Either::Left));
    let resp = match plan.and_then(|p| p.timeouts.backend_request) {
        Some(limit) => tokio::time::timeout(limit, sent).await.map_err(|_| LocalError::BackendTimeout)?,
        None => sent.await,
    }
    .map_err(|source| LocalError::Upstream { endpoint: target, source })?;
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(p) = plan {
        for m in &p.response_headers {
            crate::route::apply_header_modifier(m, &mut parts.headers);
        }
    }
    Ok(Response::from_parts(parts, body.boxed()))
}

/// The request target to send upstream: origin form (`/path?query`) for HTTP/1.1, absolute
/// form for HTTP/2, whose `:authority` it gives. Without a path rewrite the client's path and
/// query are passed on as they are, not rebuilt.
fn upstream_uri(
    req: &Request<Incoming>,
    rewritten_path: Option<&str>,
    endpoint: SocketAddr,
    h2: bool,
) -> Result<Uri, http::Error> {
    let path_and_query = match rewritten_path {
        Some(path) => PathAndQuery::try_from(match req.uri().query() {
            Some(q) => format!("{path}?{q}"),
            None => path.to_owned(),
        })?,
        None => req.uri().path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/")),
    };
    if h2 {
        Uri::builder().scheme("http").authority(endpoint.to_string()).path_and_query(path_and_query).build()
    } else {
        Ok(Uri::from(path_and_query))
    }
}

/// The pod a hop ends at and how the pool reaches it, or why it may not be reached.
fn upstream_of(hop: crate::hbone::Hop) -> Result<(SocketAddr, crate::upstream::Via), LocalError> {
    use crate::{hbone::Hop, upstream::Via};
    match hop {
        Hop::Direct(target) => Ok((target, Via::Direct)),
        Hop::Refuse(why) => Err(LocalError::MtlsRequired(why)),
        Hop::Deny { policy, .. } => Err(LocalError::Denied { policy }),
        Hop::Tunnel { src, dst, node, node_name, target } => {
            Ok((target, Via::Tunnel { src, dst, node, node_name }))
        }
    }
}

/// Sends a copy of a bodiless request to the mirror's backend, for its share of requests, and
/// forgets the answer. A request with a body is not mirrored (that would mean buffering it):
/// it is counted and logged at debug.
fn mirror(req: &Request<Incoming>, m: &crate::snapshot::Mirror, ctx: &ConnContext, random: u64) {
    use crate::snapshot::BackendTarget;
    // The low bits picked the backend and the high bits the endpoint; mix for the fraction.
    let roll = random.rotate_left(17).wrapping_mul(0x9e37_79b9_7f4a_7c15) % u64::from(m.denominator.max(1));
    if roll >= u64::from(m.numerator) {
        return;
    }
    let has_body = req.headers().contains_key(header::TRANSFER_ENCODING)
        || req.headers().get(header::CONTENT_LENGTH).is_some_and(|v| v.as_bytes() != b"0");
    if has_body {
        ctx.stats.mirror_skipped.fetch_add(1, Relaxed);
        debug!("request with a body not mirrored");
        return;
    }
    let BackendTarget::Service(backend) = &m.target else { return };
    let Some(endpoint) = pick_endpoint(&backend.endpoints, random.rotate_left(29)) else { return };
    let mut copy = Request::new(Empty::<Bytes>::new());
    *copy.method_mut() = req.method().clone();
    *copy.headers_mut() = req.headers().clone();
    *copy.uri_mut() = req.uri().path_and_query().cloned().map_or_else(|| Uri::from_static("/"), Uri::from);
    let hop = ctx.mesh.hop(&ctx.snapshot.borrow().clone(), ctx.client.ip(), endpoint.addr());
    let (target, via) = match upstream_of(hop) {
        Ok(upstream) => upstream,
        Err(why) => {
            debug!(target = %endpoint.addr(), %why, "mirror not sent");
            return;
        }
    };
    let (mirrors, stats) = (ctx.mirrors.clone(), ctx.stats.clone());
    tokio::spawn(async move {
        let result = async {
            let response = mirrors.send(target, &via, false, copy).await?;
            let status = response.status();
            // Read to its end, frame by frame, so that the connection goes back to the pool.
            let mut body = response.into_body();
            while let Some(frame) = body.frame().await {
                frame?;
            }
            Ok::<_, crate::upstream::UpstreamError>(status)
        };
        match result.await {
            Ok(status) => {
                stats.mirrored.fetch_add(1, Relaxed);
                debug!(%target, %status, "mirrored");
            }
            Err(err) => debug!(%target, error = %err, "mirror failed"),
        }
    });
}

/// What the forwarder chose, for the metrics and the access log.
#[derive(Debug)]
struct UpstreamInfo {
    backend: Arc<Backend>,
    /// Index of the chosen endpoint in `backend.endpoints`.
    endpoint: usize,
    tunnelled: bool,
}

/// An endpoint chosen uniformly at random.
pub fn pick_endpoint(endpoints: &[Endpoint], random: u64) -> Option<&Endpoint> {
    endpoints.get(pick_endpoint_index(endpoints.len(), random)?)
}

/// The index of an endpoint among `len`, chosen uniformly at random.
fn pick_endpoint_index(len: usize, random: u64) -> Option<usize> {
    // The high bits: the low ones already picked the weighted backend.
    (len > 0).then(|| ((random >> 32) % len as u64) as usize)
}

/// The name a Service answers to in the cluster, for a request that named no host.
fn service_host(service: &crate::snapshot::ObjectRef) -> String {
    format!("{}.{}.svc", service.name, service.namespace)
}

/// The host the client asked for, from the Host header or else the request target, without
/// its port.
fn request_host(req: &Request<Incoming>) -> Option<String> {
    let raw = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))?;
    Some(strip_port(raw).to_owned())
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split(']').next().map_or(host, |h| h.trim_start_matches('['));
    }
    host.rsplit_once(':').filter(|(_, p)| p.chars().all(|c| c.is_ascii_digit())).map_or(host, |(h, _)| h)
}

/// Removes the headers of this hop: the fixed set, and any the Connection header names
/// (RFC 9110, section 7.6.1), so a header meant for the proxy never reaches the next hop.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over their names instead of a lookup per name.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_not_forwarded() {
        let mut headers = http::HeaderMap::new();
        for (name, value) in [
            ("connection", "close, X-Hop"),
            ("connection", "x-other-hop"),
            ("x-hop", "1"),
            ("x-other-hop", "2"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("transfer-encoding", "chunked"),
            ("x-end-to-end", "3"),
            ("te", "trailers"),
        ] {
            headers.append(name, value.parse().expect("value"));
        }
        super::strip_hop_by_hop(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["te", "x-end-to-end"], "only end-to-end headers stay");
        assert_eq!(headers["x-end-to-end"], "3");
    }

    #[test]
    fn hosts_lose_their_ports() {
        assert_eq!(super::strip_port("echo:80"), "echo");
        assert_eq!(super::strip_port("echo"), "echo");
        assert_eq!(super::strip_port("[::1]:80"), "::1");
        assert_eq!(super::strip_port("10.96.0.1:8080"), "10.96.0.1");
    }
}
