//! The node's HTTP surfaces. The admin endpoint (`--admin-addr`) serves `/healthz` (the process
//! serves) and `/readyz` (eBPF attached, the mesh CA loaded when mTLS is on, the first
//! configuration applied when a source is configured) for the kubelet, and `/config_dump` (what
//! the agent routes by, as JSON: its status, every Service frontend with its routes, endpoints
//! and identities, and the route statuses) only to a client on the node's loopback; the control
//! socket serves it too. The metrics endpoint (`--metrics-addr`, the same listener when the
//! addresses agree) serves `/metrics` in the Prometheus text format (prometheus-client). Each
//! connection must send its request's head within [`HEADER_READ_TIMEOUT`].

use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tokio::net::TcpListener;

use crate::control::State;

/// What readiness needs beyond the shared state.
pub struct Readiness {
    /// A configuration source is configured, so a first snapshot must arrive.
    pub expects_config: bool,
    pub certs: Option<Arc<gammaray_proxy::identity::CertStore>>,
}

/// Which of the node's surfaces a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Surfaces {
    /// `/healthz`, `/readyz`, and `/config_dump` to a peer on the node's loopback.
    pub health: bool,
    /// `/metrics`.
    pub metrics: bool,
}

/// How long a client of these endpoints may take to send its request's head, or sit idle.
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `surfaces` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, state: Arc<State>, readiness: Arc<Readiness>, surfaces: Surfaces) {
    let registry = Arc::new(registry(&state, &readiness));
    tracing::info!(addr = ?listener.local_addr().ok(), component = "admin", ?surfaces, "listener ready");
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(err) => {
                // Out of descriptors, most likely: wait rather than spin.
                tracing::debug!(error = %err, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let (state, registry, readiness) = (state.clone(), registry.clone(), readiness.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let response = handle(&req, peer, surfaces, &state, &registry, &readiness);
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn registry(state: &Arc<State>, readiness: &Readiness) -> Registry {
    let mut registry = Registry::with_prefix("gammaray");
    registry.register(
        "requests",
        "HTTP requests by source workload, destination service, backend and response code",
        state.outbound.requests_by.clone(),
    );
    registry.register(
        "hbone_refused",
        "Tunnels and connections the inbound HBONE listener refused, by reason",
        state.outbound.hbone_refused.clone(),
    );
    registry.register(
        "hbone_server_refused",
        "HBONE connections this node dialled whose server certificate it refused, by reason",
        state.outbound.hbone_server_refused.clone(),
    );
    registry.register(
        "connections_limited",
        "Connections and tunnels refused at a limit, by listener, reason and source",
        state.outbound.limited.clone(),
    );
    registry.register(
        "authz_denied",
        "Connections, tunnels and requests an authorization policy denied, by policy, reason and where",
        state.outbound.authz_denied.clone(),
    );
    registry.register(
        "local_responses",
        "HTTP requests the proxy answered itself, by reason",
        state.outbound.local_responses.clone(),
    );
    registry.register(
        "status_writes_refused",
        "Route status writes the API server refused as invalid (422)",
        state.status_refused.count.clone(),
    );
    registry.register_collector(Box::new(Scrape { state: state.clone(), certs: readiness.certs.clone() }));
    registry
}

fn handle(
    req: &Request<Incoming>,
    peer: SocketAddr,
    surfaces: Surfaces,
    state: &State,
    registry: &Registry,
    readiness: &Readiness,
) -> Response<Full<Bytes>> {
    let reply = |code: StatusCode, content_type: &'static str, body: String| {
        Response::builder()
            .status(code)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts are valid")
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") if surfaces.health => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        (&Method::GET, "/readyz") if surfaces.health => match not_ready(state, readiness) {
            None => reply(StatusCode::OK, "text/plain", "ready\n".into()),
            Some(why) => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("not ready: {why}\n")),
        },
        // The whole mesh's configuration is the node's business, not a pod's: only a client on
        // the node's loopback reads it here (the control socket serves it too).
        (&Method::GET, "/config_dump") if surfaces.health && !peer.ip().is_loopback() => reply(
            StatusCode::FORBIDDEN,
            "text/plain",
            "the configuration is served on the node only: `gammaray-agent config-dump`\n".into(),
        ),
        (&Method::GET, "/config_dump") if surfaces.health => match config_dump(state) {
            Ok(dump) => reply(StatusCode::OK, "application/json", dump),
            Err(err) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("{err}\n")),
        },
        (&Method::GET, "/metrics") if surfaces.metrics => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, registry) {
                Ok(()) => {
                    reply(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", text)
                }
                Err(err) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("{err}\n")),
            }
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// The agent's configuration as JSON: status, each Service (described as `gammaray-agent
/// describe` shows it) and the route statuses.
pub fn config_dump(state: &State) -> Result<String, String> {
    let status = crate::control::status(state).map_err(|e| e.to_string())?;
    let generation = state.generation.borrow().clone();
    let (snapshot, statuses) = (&generation.snapshot, generation.status_list());
    let services: std::collections::BTreeSet<(Arc<str>, Arc<str>)> =
        snapshot.frontends.values().map(|f| (f.service.namespace.clone(), f.service.name.clone())).collect();
    let described: serde_json::Map<String, serde_json::Value> = services
        .iter()
        .map(|(ns, name)| {
            let text =
                crate::describe::describe(snapshot, &statuses, ns, name, state.mtls).unwrap_or_default();
            (format!("{ns}/{name}"), serde_json::Value::String(text))
        })
        .collect();
    let policies: Vec<serde_json::Value> = snapshot
        .authz
        .policies()
        .iter()
        .map(|p| {
            serde_json::json!({
                "policy": &*p.name,
                "action": format!("{:?}", p.action).to_uppercase(),
                "selector": p.selector.as_ref().map(|s| s.iter().cloned().collect::<std::collections::BTreeMap<_, _>>()),
                "rules": p.rules.len(),
                "deniesItsTargets": p.unenforceable,
            })
        })
        .collect();
    let dump = serde_json::json!({
        "status": status,
        "services": described,
        "routeStatuses": statuses,
        "authorizationPolicies": {
            "rootNamespace": &*snapshot.authz.root,
            "compiled": policies,
            "notEnforcedAsWritten": &*generation.policy_refusals,
        },
        "peerAuthentication": {
            "label": gammaray_proxy::authz::PEER_AUTHENTICATION_LABEL,
            "strictNamespaces": snapshot.authz.strict_namespaces(),
        },
    });
    serde_json::to_string_pretty(&dump).map_err(|e| e.to_string())
}

/// Why the agent is not ready, if it is not.
fn not_ready(state: &State, readiness: &Readiness) -> Option<&'static str> {
    if state.outbound.draining.load(std::sync::atomic::Ordering::Relaxed) {
        return Some("draining");
    }
    if state.datapath.attachment().link_ids.len() < 2 {
        return Some("eBPF programs not attached");
    }
    if readiness.expects_config && state.generation.borrow().version == 0 {
        return Some("no configuration applied yet");
    }
    if state.mtls && readiness.certs.as_ref().is_none_or(|c| c.issuer().is_none()) {
        return Some("no node CA from the signer yet");
    }
    None
}

/// Reads the kernel's and the proxy's counters at each scrape.
struct Scrape {
    state: Arc<State>,
    certs: Option<Arc<gammaray_proxy::identity::CertStore>>,
}

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scrape")
    }
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(value);
    c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Ok(k) = self.state.datapath.counters() {
            counter(
                &mut encoder,
                "redirects",
                "Connections the kernel redirected to the node proxy",
                k.redirected,
            )?;
            counter(
                &mut encoder,
                "redirects_skipped",
                "Enrolled connects left alone (loopback, the proxy, not TCP)",
                k.skipped,
            )?;
            counter(
                &mut encoder,
                "kernel_lookup_misses",
                "Established redirected sockets without a recorded destination",
                k.lookup_misses,
            )?;
            counter(&mut encoder, "kernel_errors", "Map updates that failed in the kernel", k.errors)?;
            // Pinned counters: they include what happened while no agent ran.
            counter(
                &mut encoder,
                "kernel_refused_no_proxy",
                "Enrolled connects refused while no node proxy was alive (failure mode closed)",
                k.refused_no_proxy,
            )?;
            counter(
                &mut encoder,
                "kernel_passed_no_proxy",
                "Enrolled connects sent directly while no node proxy was alive (failure mode open)",
                k.passed_no_proxy,
            )?;
            counter(
                &mut encoder,
                "kernel_inbound_captured",
                "Inbound connections to enrolled pods, not from their node, handed to the node proxy",
                k.captured,
            )?;
            counter(
                &mut encoder,
                "kernel_inbound_refused_no_proxy",
                "Inbound connections to enrolled pods refused while no node proxy listened in the pod",
                k.inbound_refused_no_proxy,
            )?;
            counter(
                &mut encoder,
                "kernel_inbound_passed_no_proxy",
                "Inbound connections to permissive pods let through while no node proxy listened (failure mode open)",
                k.inbound_passed_no_proxy,
            )?;
        }
        let o = self.state.outbound.snapshot();
        counter(
            &mut encoder,
            "tcp_connections",
            "Connections accepted by the outbound listener",
            o.accepted,
        )?;
        counter(
            &mut encoder,
            "proxy_lookup_misses",
            "Accepted connections whose original destination was unknown",
            o.lookup_misses,
        )?;
        counter(&mut encoder, "tcp_sent_bytes", "Bytes carried from clients to destinations", o.bytes_sent)?;
        counter(
            &mut encoder,
            "tcp_received_bytes",
            "Bytes carried from destinations to clients",
            o.bytes_received,
        )?;
        counter(
            &mut encoder,
            "upstream_errors",
            "Connections or requests whose upstream failed",
            o.upstream_errors,
        )?;
        counter(
            &mut encoder,
            "hbone_tunnels",
            "HBONE tunnels opened to other nodes: one per L4 connection, and the pooled ones HTTP requests share",
            o.hbone_tunnels,
        )?;
        counter(
            &mut encoder,
            "hbone_inbound_tunnels",
            "mTLS streams forwarded to a pod of this node",
            o.inbound_tunnels,
        )?;
        counter(
            &mut encoder,
            "inbound_captured_connections",
            "Captured connections from outside the mesh forwarded to a pod of this node",
            o.captured,
        )?;
        counter(&mut encoder, "tls_refused", "Inbound TLS handshakes refused", o.tls_refused)?;
        let g = ConstGauge::new(self.state.outbound.connections_open() as i64);
        g.encode(encoder.encode_descriptor(
            "proxy_connections_open",
            "Connections the proxy holds now: outbound, inbound and tunnels",
            None,
            g.metric_type(),
        )?)?;
        let g = ConstGauge::new(i64::from(
            self.state.outbound.draining.load(std::sync::atomic::Ordering::Relaxed),
        ));
        g.encode(encoder.encode_descriptor(
            "proxy_draining",
            "1 while the proxy drains (it accepts no new connection), else 0",
            None,
            g.metric_type(),
        )?)?;
        let g = ConstGauge::new(self.state.generation.borrow().version as i64);
        g.encode(encoder.encode_descriptor(
            "config_version",
            "Version of the configuration in force",
            None,
            g.metric_type(),
        )?)?;
        if let Some(expiry) = self.certs.as_ref().and_then(|c| c.earliest_expiry()) {
            let secs = expiry.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
            let g = ConstGauge::new(secs);
            g.encode(encoder.encode_descriptor(
                "certificate_expiry_timestamp_seconds",
                "Earliest expiry of the workload certificates this node holds",
                None,
                g.metric_type(),
            )?)?;
        }
        if let Some(certs) = &self.certs {
            let bundle = certs.trust().get();
            let g = ConstGauge::new(bundle.len() as i64);
            g.encode(encoder.encode_descriptor(
                "trust_bundle_roots",
                "Roots this node trusts (two during a root rotation)",
                None,
                g.metric_type(),
            )?)?;
            counter(
                &mut encoder,
                "node_ca_renewals",
                "Node CAs this agent was issued",
                certs.issuer_changes(),
            )?;
            if let Some(ca) = certs.issuer() {
                let secs =
                    ca.not_after.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
                let g = ConstGauge::new(secs);
                g.encode(encoder.encode_descriptor(
                    "node_ca_expiry_timestamp_seconds",
                    "When this node's CA expires (it is renewed at half its life)",
                    None,
                    g.metric_type(),
                )?)?;
                let g = ConstGauge::new(i64::from(bundle.issued_by_active(ca.cert_der())));
                g.encode(encoder.encode_descriptor(
                    "node_ca_current",
                    "1 when this node's CA is signed by the root the signer signs with now",
                    None,
                    g.metric_type(),
                )?)?;
            }
        }
        Ok(())
    }
}

/// The default admin address: every address of the node, port 15021.
pub fn default_addr() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 15021))
}
