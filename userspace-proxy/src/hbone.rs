//! HBONE: connections between nodes carried as HTTP/2 CONNECT streams inside mutual TLS 1.3.
//!
//! Outbound, one TLS connection per (source identity, destination identity, destination node)
//! carries many streams; the client presents the source workload's certificate and accepts
//! only the destination workload's identity. Inbound (port 15008 by default), the node presents the
//! certificate of the identity the client asks for in SNI, verifies the client's chain,
//! checks that the CONNECT target is a pod on this node with that identity, and forwards.
//!
//! HTTP/2 here is the `h2` crate itself rather than hyper's wrapper of it: a tunnel is a raw
//! byte stream, and with the stream's halves in hand ([`TunnelStream`]) a write goes into its
//! frame in the task that makes it, instead of through a channel to a task of its own.
//!
//! Between h2 and TLS, a cork ([`crate::cork`]) gathers what one poll of the connection sends into
//! one TLS record and one write(2), however many streams it serves. Between TLS and the socket,
//! [`crate::readahead`] reads in blocks (the relay block) where rustls asks for 4 KiB at a time.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::{client::SendRequest, server::SendResponse};
use http::{Method, Request, Response, StatusCode};
use rustls::pki_types::ServerName;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::{
    ProxyConfig,
    identity::{CertStore, Identity, SniResolver, client_config, identity_of, server_config},
    readahead::ReadAhead,
    snapshot::Snapshot,
    stats::OutboundStats,
};

mod stream;
pub(crate) use stream::Relay;
pub use stream::TunnelStream;

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("cannot reach node {node}: {source}")]
    Connect { node: SocketAddr, source: std::io::Error },
    #[error("TLS with node {node} failed: {source}")]
    Tls { node: SocketAddr, source: std::io::Error },
    #[error("identity: {0}")]
    Identity(#[from] crate::identity::IdentityError),
    #[error("HTTP/2 with node {node}: {source}")]
    H2 { node: SocketAddr, source: h2::Error },
    #[error("node {node} refused the tunnel to {target}: {status}")]
    Refused { node: SocketAddr, target: SocketAddr, status: StatusCode },
    #[error("timed out reaching node {node}")]
    Timeout { node: SocketAddr },
}

type Key = (Identity, Identity, SocketAddr);

/// How this node reaches the mesh: its configuration (its name among it), and HBONE when it
/// has certificates.
pub(crate) struct Mesh {
    pub config: Arc<ProxyConfig>,
    pub hbone: Option<Arc<Pool>>,
    /// Turns true when the proxy drains ([`crate::Proxy::drain`]).
    pub drain: Drain,
    /// The policies in force: connections to this node's workloads end when they deny them.
    pub policies: crate::authz::Policies,
}

impl Mesh {
    pub fn new(
        config: Arc<ProxyConfig>,
        certs: Option<Arc<CertStore>>,
        drain: Drain,
        policies: crate::authz::Policies,
        stats: Arc<OutboundStats>,
    ) -> Self {
        let hbone = certs.map(|certs| Arc::new(Pool::new(certs, config.clone(), stats)));
        Self { config, hbone, drain, policies }
    }
}

/// Whether the proxy drains: listeners stop accepting, connections finish what they carry.
pub(crate) type Drain = watch::Receiver<bool>;

/// Resolves once the proxy drains.
pub(crate) async fn drained(drain: &mut Drain) {
    // An error means the proxy is gone: draining, as far as anyone here is concerned.
    let _ = drain.wait_for(|d| *d).await;
}

/// The way to one destination.
#[derive(Debug, PartialEq, Eq)]
pub enum Hop {
    /// Same node, not meshed, or no HBONE: a plain TCP connection.
    Direct(SocketAddr),
    /// A pod on another node: a tunnel through that node (`node`, its HBONE address, and
    /// `node_name`, whose node CA the destination's certificate must chain through).
    Tunnel { src: Identity, dst: Identity, node: SocketAddr, node_name: Arc<str>, target: SocketAddr },
    /// A meshed destination on another node, but the client has no identity: refused.
    Refuse(&'static str),
    /// A workload of this node whose authorization policies deny the client.
    Deny { policy: Arc<str>, reason: crate::authz::DenyReason },
}

impl Mesh {
    /// Where a connection from `client` to `target` goes.
    pub fn hop(&self, snapshot: &Snapshot, client: std::net::IpAddr, target: SocketAddr) -> Hop {
        let Some(dst) = snapshot.workloads.get(&target.ip()) else {
            return Hop::Direct(target);
        };
        let here = self.config.node.as_deref();
        if here.is_some() && dst.node.as_deref() == here {
            // A workload of this node: its policies are this node's to enforce.
            return match snapshot.authz.check_local(&snapshot.workloads, client, dst, target.port()) {
                crate::authz::Decision::Deny { policy, reason } => Hop::Deny { policy, reason },
                crate::authz::Decision::Allow => Hop::Direct(target),
            };
        }
        let (Some(node), Some(_)) = (&self.config.node, &self.hbone) else {
            return Hop::Direct(target);
        };
        let Some(dst_node) = &dst.node else {
            return Hop::Direct(target);
        };
        let Some(node_ip) = snapshot.nodes.get(&**dst_node) else {
            return Hop::Refuse("the destination's node has no known address");
        };
        let Some(src) = snapshot.workloads.get(&client) else {
            return Hop::Refuse("the client is not a known workload, so it has no identity");
        };
        if src.node.as_deref() != Some(node.as_str()) {
            // A node speaks only for the workloads it runs.
            return Hop::Refuse("the client is not a workload of this node");
        }
        Hop::Tunnel {
            src: src.identity().clone(),
            dst: dst.identity().clone(),
            node: SocketAddr::new(*node_ip, self.config.hbone_port),
            // The snapshot's own name, shared: a hop is made per request.
            node_name: dst_node.clone(),
            target,
        }
    }
}

impl Hop {
    /// Counts and logs a [`Hop::Deny`] (`path="local"`), naming each end by its identity when
    /// it is a workload, else by its address. Nothing for another hop.
    pub(crate) fn record_denial(
        &self,
        stats: &crate::stats::OutboundStats,
        snapshot: &Snapshot,
        client: SocketAddr,
        target: SocketAddr,
    ) {
        let Hop::Deny { policy, reason } = self else { return };
        let name = |addr: SocketAddr| {
            snapshot.workloads.get(&addr.ip()).map_or_else(|| addr.to_string(), |w| w.uri().to_string())
        };
        let decision = crate::authz::Decision::Deny { policy: policy.clone(), reason: *reason };
        crate::authz::Authz::record(stats, &decision, "local", &name(client), &name(target), target);
    }
}

/// `for=…` of a `forwarded` header (RFC 7239: an IPv6 address quoted and bracketed).
fn forwarded_for(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => format!("for={v4}"),
        std::net::IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
    }
}

/// The client address a CONNECT's `forwarded` header names, if it is one workload of the
/// snapshot with the identity the peer's certificate proved, on the node whose CA signed it:
/// a node speaks only for its own pods, so an address that is not one of the peer's is not
/// believed (rules on it then fail closed).
fn forwarded_client(
    headers: &http::HeaderMap,
    snapshot: &Snapshot,
    peer: &Identity,
    peer_node: &str,
) -> Option<std::net::IpAddr> {
    let value = headers.get(http::header::FORWARDED)?.to_str().ok()?;
    let ip: std::net::IpAddr = value
        .split(';')
        .find_map(|part| part.trim().strip_prefix("for="))?
        .trim_matches('"')
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()?;
    let workload = snapshot.workloads.get(&ip)?;
    (*workload.identity() == *peer && workload.node.as_deref() == Some(peer_node)).then_some(ip)
}

/// Where identities run, as a handshake asks it: made from a snapshot at the first handshake
/// after each change of it, not by a pass over every workload of the cluster per handshake.
struct Placements {
    node: String,
    made: Mutex<Option<(Arc<Snapshot>, Arc<Placement>)>>,
}

#[derive(Default)]
struct Placement {
    /// Identities with a workload on this node.
    here: std::collections::HashSet<Identity>,
    /// (node, identity) of every workload.
    placed: std::collections::HashSet<(Arc<str>, Identity)>,
}

impl Placement {
    fn runs(&self, node: &Arc<str>, identity: &Identity) -> bool {
        self.placed.contains(&(node.clone(), identity.clone()))
    }
}

impl Placements {
    fn new(node: String) -> Self {
        Self { node, made: Mutex::new(None) }
    }

    fn of(&self, snapshot: &Arc<Snapshot>) -> Arc<Placement> {
        let mut made = self.made.lock().expect("placements lock");
        if let Some((from, placement)) = &*made
            && Arc::ptr_eq(from, snapshot)
        {
            return placement.clone();
        }
        let mut placement = Placement::default();
        for w in snapshot.workloads.values() {
            let Some(node) = &w.node else { continue };
            if **node == *self.node {
                placement.here.insert(w.identity().clone());
            }
            placement.placed.insert((node.clone(), w.identity().clone()));
        }
        let placement = Arc::new(placement);
        *made = Some((snapshot.clone(), placement.clone()));
        placement
    }
}

/// Outbound HBONE connections, pooled.
pub(crate) struct Pool {
    certs: Arc<CertStore>,
    config: Arc<ProxyConfig>,
    stats: Arc<OutboundStats>,
    conns: Mutex<HashMap<Key, PooledConn>>,
}

/// One HTTP/2 connection to a node, whether its task has ended, and the certificate it was
/// made with: once that is renewed (at half life, or with a new node CA), new tunnels go on a
/// new connection and the old one ends with its last stream.
#[derive(Clone)]
struct PooledConn {
    sender: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
    cert: Arc<rustls::sign::CertifiedKey>,
}

impl Pool {
    pub fn new(certs: Arc<CertStore>, config: Arc<ProxyConfig>, stats: Arc<OutboundStats>) -> Self {
        Self { certs, config, stats, conns: Mutex::new(HashMap::new()) }
    }

    /// Counts and logs a server certificate this node refused.
    fn server_refused(&self, node: SocketAddr, dst: &Identity, err: &std::io::Error) {
        let Some(tls) = err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) else { return };
        let rustls::Error::InvalidCertificate(cert) = tls else { return };
        let reason = match cert {
            rustls::CertificateError::Other(other) if other.0.is::<crate::identity::node_ca::WrongNode>() => {
                "wrong_node"
            }
            rustls::CertificateError::Other(other) if other.0.is::<crate::identity::IdentityMismatch>() => {
                "identity"
            }
            _ => "untrusted",
        };
        self.stats.hbone_server_refused.get_or_create(&crate::stats::RefusalLabels { reason }).inc();
        warn!(%node, dst_identity = %dst, reason, error = %tls, "refused the server's certificate");
    }

    /// Opens a tunnel to `target` (a pod on the node at `node`) as `src`, expecting the
    /// destination to be `dst`. `client`, the address of the one pod connection the tunnel
    /// carries, goes along in a `forwarded` header (RFC 7239) for the destination's policies;
    /// `None` for a tunnel that pooled connections share. The destination's certificate must
    /// chain through the CA of `node_name`.
    #[allow(clippy::too_many_arguments)]
    pub async fn connect(
        &self,
        src: &Identity,
        dst: &Identity,
        node: SocketAddr,
        node_name: &Arc<str>,
        target: SocketAddr,
        client: Option<std::net::IpAddr>,
    ) -> Result<TunnelStream, HboneError> {
        let key = (src.clone(), dst.clone(), node);
        let cert = self.certs.get(src)?;
        let pooled = self
            .conns
            .lock()
            .expect("pool lock")
            .get(&key)
            .filter(|c| !c.closed.load(Relaxed) && Arc::ptr_eq(&c.cert, &cert.certified))
            .map(|c| c.sender.clone());
        let sender = match pooled {
            Some(s) => s,
            None => {
                let conn = tokio::time::timeout(
                    self.config.upstream_connect_timeout,
                    self.dial(&cert, dst, node, node_name),
                )
                .await
                .map_err(|_| HboneError::Timeout { node })??;
                let sender = conn.sender.clone();
                self.conns.lock().expect("pool lock").insert(key, conn);
                sender
            }
        };
        // Waits while the node's limit of concurrent streams is reached.
        let mut sender = sender.ready().await.map_err(|source| HboneError::H2 { node, source })?;
        let mut req = Request::builder().method(Method::CONNECT).uri(target.to_string());
        if let Some(ip) = client {
            req = req.header(http::header::FORWARDED, forwarded_for(ip));
        }
        let req = req.body(()).expect("CONNECT request parts are valid");
        let (response, send) =
            sender.send_request(req, false).map_err(|source| HboneError::H2 { node, source })?;
        let resp = response.await.map_err(|source| HboneError::H2 { node, source })?;
        if resp.status() != StatusCode::OK {
            return Err(HboneError::Refused { node, target, status: resp.status() });
        }
        Ok(TunnelStream::new(send, resp.into_body(), self.config.relay()))
    }

    async fn dial(
        &self,
        cert: &crate::identity::Issued,
        dst: &Identity,
        node: SocketAddr,
        node_name: &Arc<str>,
    ) -> Result<PooledConn, HboneError> {
        let src = &cert.identity;
        let config = client_config(self.certs.trust().get(), cert, dst.clone(), node_name.clone())?;
        let tcp = TcpStream::connect(node).await.map_err(|source| HboneError::Connect { node, source })?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(dst.server_name()).map_err(|e| HboneError::Tls {
            node,
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
        })?;
        let mut tls = TlsConnector::from(Arc::new(config))
            .connect(name, ReadAhead::new(tcp, self.config.relay_block))
            .await
            .map_err(|source| {
                self.server_refused(node, dst, &source);
                HboneError::Tls { node, source }
            })?;
        tls.get_mut().1.set_buffer_limit(Some(self.config.tls_send_buffer()));
        let (tls, cork) = crate::cork::corked(tls);
        let h2c = &self.config.h2;
        let (sender, conn) = h2::client::Builder::new()
            .initial_window_size(h2c.stream_window)
            .initial_connection_window_size(h2c.connection_window)
            .max_frame_size(h2c.max_frame)
            .max_header_list_size(h2c.max_header_list)
            .enable_push(false)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|source| HboneError::H2 { node, source })?;
        let closed = Arc::new(AtomicBool::new(false));
        let ended = closed.clone();
        tokio::spawn(async move {
            if let Err(err) = cork.drive(conn).await {
                debug!(%node, error = %err, "HBONE connection ended");
            }
            ended.store(true, Relaxed);
        });
        info!(%node, src = %src, dst = %dst, "HBONE connection established");
        Ok(PooledConn { sender, closed, cert: cert.certified.clone() })
    }
}

/// What the inbound listener needs to decide.
pub(crate) struct Inbound {
    /// This node (its name) and how its connections are tuned.
    pub config: Arc<ProxyConfig>,
    pub node: String,
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    pub certs: Arc<CertStore>,
    pub stats: Arc<OutboundStats>,
    /// The node's connection limits, which tunnels count against too.
    pub limits: Arc<crate::limits::ConnLimits>,
    pub drain: Drain,
    pub policies: crate::authz::Policies,
}

impl Inbound {
    /// Counts a refusal by its reason.
    fn refused(&self, reason: &'static str) {
        self.stats.hbone_refused.get_or_create(&crate::stats::RefusalLabels { reason }).inc();
    }

    /// Counts and (rate-limited) logs a connection or tunnel refused at a limit.
    fn limited(&self, refusal: crate::limits::Refusal, peer: std::net::IpAddr, source: String) {
        crate::limits::refused(&self.stats, &self.limits, refusal, peer, "hbone", source);
    }
}

/// Serves the inbound HBONE listener until the task is dropped.
pub(crate) async fn serve_inbound(listener: TcpListener, inbound: Arc<Inbound>) -> Result<(), HboneError> {
    let placement = Arc::new(Placements::new(inbound.node.clone()));
    let (snapshot, placed) = (inbound.snapshot.clone(), placement.clone());
    let resolver = SniResolver {
        store: inbound.certs.clone(),
        trust_domain: inbound.config.trust_domain.clone(),
        // Only identities with a workload on this node get a certificate here.
        allowed: Box::new(move |id| {
            // Cloned out, so the snapshot channel is not held while a new placement is made.
            let current = snapshot.borrow().clone();
            placed.of(&current).here.contains(id)
        }),
    };
    let config =
        server_config(inbound.certs.trust().clone(), &inbound.config.trust_domain, Arc::new(resolver))?;
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let addr = listener.local_addr().ok();
    info!(addr = ?addr, component = "inbound", "listener ready");
    let accept_errors = crate::limits::EverySecond::new();
    let mut drain = inbound.drain.clone();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = drained(&mut drain) => {
                info!(addr = ?addr, component = "inbound", "draining: the listener stops accepting");
                return Ok(());
            }
        };
        let (tcp, peer) = match accepted {
            Ok(c) => c,
            Err(err) => {
                if accept_errors.should_log() {
                    warn!(error = %err, "inbound accept failed; continuing (logged at most once a second)");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let slot = match inbound.limits.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(refusal) => {
                inbound.limited(refusal, peer.ip(), "unknown".to_owned());
                let _ = tcp.set_zero_linger();
                continue;
            }
        };
        // Small HTTP/2 frames must not wait for delayed ACKs (Nagle).
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let inbound = inbound.clone();
        let placement = placement.clone();
        tokio::spawn(
            async move {
                // The connection's place, held until it ends.
                let _slot = slot;
                let handshake = acceptor.accept(ReadAhead::new(tcp, inbound.config.relay_block));
                let mut tls = match tokio::time::timeout(inbound.config.tls_handshake_timeout, handshake).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(err)) => {
                        inbound.stats.tls_refused.fetch_add(1, Relaxed);
                        warn!(error = %err, "inbound TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        inbound.refused("handshake_timeout");
                        debug!("inbound TLS handshake not finished in time; closing");
                        return;
                    }
                };
                let conn = tls.get_ref().1;
                let (Some(peer_id), Some(peer_node), Some(local_id)) = (
                    conn.peer_certificates().and_then(|c| c.first()).and_then(|c| identity_of(c).ok()),
                    conn.peer_certificates().and_then(crate::identity::node_ca::peer_node),
                    conn.server_name()
                        .and_then(|n| Identity::from_server_name(n, &inbound.config.trust_domain)),
                ) else {
                    warn!("inbound connection without a peer identity or server name; closing");
                    return;
                };
                // One mesh CA could sign identities of other trust domains; only ours speak here.
                if *peer_id.trust_domain != *inbound.config.trust_domain {
                    inbound.refused("foreign_trust_domain");
                    warn!(src_identity = %peer_id, trust_domain = %inbound.config.trust_domain, "inbound client of another trust domain; closing");
                    return;
                }
                // A node speaks only for its own pods: the peer's identity must have a workload on
                // the node whose CA signed it.
                let peer_node: Arc<str> = peer_node.into();
                let snapshot = inbound.snapshot.borrow().clone();
                if !placement.of(&snapshot).runs(&peer_node, &peer_id) {
                    inbound.refused("wrong_node");
                    warn!(src_identity = %peer_id, %peer_node, "inbound client's certificate is issued through a node that runs no workload of its identity; closing");
                    return;
                }
                drop(snapshot);
                info!(src_identity = %peer_id, %peer_node, dst_identity = %local_id, "inbound mTLS connection");
                tls.get_mut().1.set_buffer_limit(Some(inbound.config.tls_send_buffer()));
                let (tls, cork) = crate::cork::corked(tls);
                let h2c = &inbound.config.h2;
                let mut conn = match h2::server::Builder::new()
                    .max_concurrent_streams(h2c.max_concurrent_streams)
                    .initial_window_size(h2c.stream_window)
                    .initial_connection_window_size(h2c.connection_window)
                    .max_frame_size(h2c.max_frame)
                    .max_header_list_size(h2c.max_header_list)
                    .handshake::<_, Bytes>(tls)
                    .await
                {
                    Ok(conn) => conn,
                    Err(err) => {
                        debug!(error = %err, "inbound HTTP/2 handshake failed");
                        return;
                    }
                };
                // Accepting drives the connection; each CONNECT stream is served by its own task.
                // Draining sends GOAWAY: the peer opens no more streams here, those open finish.
                let mut drain = inbound.drain.clone();
                let mut shutting = false;
                cork.drive(async {
                    loop {
                        let accepted = tokio::select! {
                            accepted = conn.accept() => accepted,
                            () = drained(&mut drain), if !shutting => {
                                shutting = true;
                                conn.graceful_shutdown();
                                continue;
                            }
                        };
                        let Some(accepted) = accepted else { break };
                        match accepted {
                            Ok((req, respond)) => {
                                tunnel(req, respond, &inbound, peer.ip(), (&peer_id, &peer_node), &local_id)
                            }
                            Err(err) => {
                                debug!(error = %err, "inbound HBONE connection ended");
                                return;
                            }
                        }
                    }
                })
                .await
            }
            .instrument(info_span!("inbound", %peer)),
        );
    }
}

/// Answers a stream that is not opened as a tunnel, and ends it.
fn reply(mut respond: SendResponse<Bytes>, status: StatusCode) {
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    if let Err(err) = respond.send_response(resp, true) {
        debug!(error = %err, "stream gone before its refusal was sent");
    }
}

/// Accepts one CONNECT stream: the target must be a pod on this node with the identity the
/// client asked for; then the stream is joined to a TCP connection to it.
fn tunnel(
    req: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    inbound: &Inbound,
    peer_ip: std::net::IpAddr,
    (peer, peer_node): (&Identity, &Arc<str>),
    local: &Identity,
) {
    if req.method() != Method::CONNECT {
        return reply(respond, StatusCode::METHOD_NOT_ALLOWED);
    }
    let snapshot = inbound.snapshot.borrow().clone();
    let authority = req.uri().authority().map(|a| a.as_str());
    let (target, workload) = match snapshot.tunnel_target(authority, &inbound.node, local) {
        Ok(found) => found,
        Err(refusal) => {
            inbound.refused(refusal.reason());
            warn!(target = ?authority, src_identity = %peer, dst_identity = %local, reason = refusal.reason(), "CONNECT refused");
            return reply(respond, refusal.status());
        }
    };
    // The destination's policies, with the identity the peer's certificate proves, and the
    // client's address when the peer vouches for one of its own pods (rules on an unknown one
    // fail closed).
    let client_ip = forwarded_client(req.headers(), &snapshot, peer, peer_node);
    let decision = snapshot.authz.check(
        &crate::authz::Peer { identity: Some(peer), ip: client_ip },
        &crate::authz::Target {
            namespace: &workload.pod.namespace,
            labels: &workload.class.labels,
            port: target.port(),
        },
    );
    if decision != crate::authz::Decision::Allow {
        crate::authz::Authz::record(&inbound.stats, &decision, "inbound", peer, local, target);
        return reply(respond, StatusCode::FORBIDDEN);
    }
    // Each tunnel costs this node a socket to the pod: it counts against the node's limits, as
    // the peer node's own connections do.
    let slot = match inbound.limits.admit(peer_ip) {
        Ok(slot) => slot,
        Err(refusal) => {
            inbound.limited(refusal, peer_ip, peer.to_string());
            return reply(respond, StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let stats = inbound.stats.clone();
    let relay = inbound.config.relay();
    let keepalive = inbound.config.tcp_keepalive;
    let pod = workload.pod.clone();
    let (namespace, class) = (workload.pod.namespace.clone(), workload.class.clone());
    let policies = inbound.policies.clone();
    let (peer, local) = (peer.clone(), local.clone());
    let recv = req.into_body();
    tokio::spawn(async move {
        let _slot = slot;
        let started = Instant::now();
        // The pod is reached before the tunnel is confirmed, so a client learns of a pod that
        // refuses from the status, not from a stream reset after a 200.
        let mut upstream = match TcpStream::connect(target).await {
            Ok(s) => s,
            Err(err) => {
                stats.upstream_errors.fetch_add(1, Relaxed);
                warn!(%target, error = %err, "cannot reach the pod");
                return reply(respond, StatusCode::BAD_GATEWAY);
            }
        };
        let _ = upstream.set_nodelay(true);
        crate::outbound::keep_alive(&upstream, keepalive);
        let send = match respond.send_response(Response::new(()), false) {
            Ok(send) => send,
            Err(err) => {
                debug!(error = %err, "CONNECT stream closed before it was confirmed");
                return;
            }
        };
        stats.inbound_tunnels.fetch_add(1, Relaxed);
        // A policy change that no longer allows the tunnel ends it (the pod's side is reset).
        let check = |authz: &crate::authz::Authz| {
            authz.check(
                &crate::authz::Peer { identity: Some(&peer), ip: client_ip },
                &crate::authz::Target { namespace: &namespace, labels: &class.labels, port: target.port() },
            )
        };
        let result = tokio::select! {
            result = TunnelStream::new(send, recv, relay).relay(&mut upstream) => result,
            decision = crate::authz::revoked(policies, check) => {
                crate::authz::Authz::record(&stats, &decision, "inbound_revoked", &peer, &local, target);
                let _ = socket2::SockRef::from(&upstream).set_linger(Some(Duration::ZERO));
                return;
            }
        };
        // Sent to the pod, received from it.
        let (received, sent) = result.unwrap_or((0, 0));
        info!(
            src_identity = %peer,
            dst_identity = %local,
            dst = %target,
            %pod,
            sent,
            received,
            duration_ms = started.elapsed().as_millis() as u64,
            "inbound tunnel closed"
        );
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `forwarded` header names the client only when it is a pod with the peer's identity, on
    /// the node whose CA signed the peer's certificate.
    #[test]
    fn a_forwarded_client_is_believed_only_for_the_peers_own_pods() {
        let mut snapshot = Snapshot::default();
        let id =
            |sa: &str| -> Identity { format!("spiffe://cluster.local/ns/demo/sa/{sa}").parse().unwrap() };
        let workload = |sa: &str| {
            let identity = id(sa);
            Arc::new(crate::snapshot::Workload {
                pod: Arc::new(crate::snapshot::ObjectRef::new("demo", sa)),
                node: Some("node1".into()),
                principal: Arc::new(crate::snapshot::Principal {
                    uri: identity.to_string().into(),
                    identity,
                }),
                class: Arc::default(),
            })
        };
        let mut workloads = snapshot.workloads.clone();
        workloads.insert("10.244.1.5".parse().unwrap(), workload("client"));
        workloads.insert("fd00::5".parse().unwrap(), workload("client"));
        workloads.insert("10.244.1.6".parse().unwrap(), workload("other"));
        snapshot.workloads = workloads;
        let mut headers = http::HeaderMap::new();
        let mut named_by = |ip: &str, node: &str| {
            headers.insert(http::header::FORWARDED, forwarded_for(ip.parse().unwrap()).parse().unwrap());
            forwarded_client(&headers, &snapshot, &id("client"), node)
        };
        assert_eq!(named_by("10.244.1.5", "node2"), None, "node2's CA does not speak for node1's pod");
        let mut named = |ip: &str| named_by(ip, "node1");
        assert_eq!(named("10.244.1.5"), Some("10.244.1.5".parse().unwrap()));
        assert_eq!(named("fd00::5"), Some("fd00::5".parse().unwrap()), "IPv6, quoted and bracketed");
        assert_eq!(named("10.244.1.6"), None, "another identity's pod");
        assert_eq!(named("10.9.9.9"), None, "no pod");
    }
}
