//! The outbound listener: where the eBPF program sends enrolled pods' connections.
//!
//! Each connection's original destination decides its path: a Service frontend whose port
//! speaks HTTP or has routes attached is proxied request by request ([`crate::http`]); any
//! other frontend is balanced at L4 across the Service's ready endpoints; an address that is
//! no frontend (a pod IP, anything outside the mesh) is carried there untouched.

use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::{Arc, atomic::Ordering::Relaxed},
    time::{Duration, Instant},
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::{
    hbone::{Hop, Mesh},
    http::{ConnContext, pick_endpoint},
    orig_dst::OrigDstLookup,
    snapshot::Snapshot,
    stats::OutboundStats,
};

/// Relays bytes both ways until both sides are done, with `buf` bytes of buffer per direction;
/// returns (a → b, b → a) byte counts. The one place TCP connections are copied to TCP
/// connections; a tunnel is joined to a socket by [`crate::hbone::TunnelStream::relay`], which
/// saves a copy on each side.
async fn copy_both_ways<A, B>(a: &mut A, b: &mut B, buf: usize) -> std::io::Result<(u64, u64)>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, buf, buf).await
}

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("cannot accept on the outbound listener {addr}: {source}")]
    Accept { addr: SocketAddr, source: std::io::Error },
}

/// What the outbound listener serves from.
pub(crate) struct Outbound {
    pub mesh: Arc<Mesh>,
    pub limits: Arc<crate::limits::ConnLimits>,
    pub lookup: Arc<dyn OrigDstLookup>,
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    pub stats: Arc<OutboundStats>,
}

/// Serves the outbound listener until the task is dropped.
pub(crate) async fn serve(listener: TcpListener, outbound: Outbound) -> Result<(), OutboundError> {
    let Outbound { mesh, limits, lookup, snapshot, stats } = outbound;
    let upstreams = crate::upstream::Upstreams::new(mesh.hbone.clone(), stats.clone(), &mesh.config);
    let mirrors = crate::upstream::Upstreams::new(mesh.hbone.clone(), stats.clone(), &mesh.config);
    let addr = listener
        .local_addr()
        .map_err(|source| OutboundError::Accept { addr: SocketAddr::from(([0, 0, 0, 0], 0)), source })?;
    info!(%addr, component = "outbound", "listener ready");
    let accept_errors = crate::limits::EverySecond::new();
    let mut drain = mesh.drain.clone();
    loop {
        let (stream, peer) = match accept(&listener, &mut drain, &accept_errors, "outbound").await {
            Ok(Some(conn)) => conn,
            Ok(None) => {
                info!(%addr, component = "outbound", "draining: the listener stops accepting");
                return Ok(());
            }
            Err(source) => return Err(OutboundError::Accept { addr, source }),
        };
        stats.accepted.fetch_add(1, Relaxed);
        let slot = match limits.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(refusal) => {
                refuse(stream, peer, refusal, &limits, &lookup, &snapshot, &stats);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = Conn {
            mesh: mesh.clone(),
            lookup: lookup.clone(),
            snapshot: snapshot.clone(),
            upstreams: upstreams.clone(),
            mirrors: mirrors.clone(),
            stats: stats.clone(),
        };
        let span = info_span!("outbound", src = %peer);
        tokio::spawn(
            async move {
                handle(stream, peer, conn).await;
                drop(slot);
            }
            .instrument(span),
        );
    }
}

/// Refuses a connection at a limit: a reset, so the client learns at once; the kernel's record
/// of where it was going is taken, as for any connection; counted and (rate-limited) logged.
fn refuse(
    stream: TcpStream,
    peer: SocketAddr,
    refusal: crate::limits::Refusal,
    limits: &crate::limits::ConnLimits,
    lookup: &Arc<dyn OrigDstLookup>,
    snapshot: &watch::Receiver<Arc<Snapshot>>,
    stats: &OutboundStats,
) {
    if let SocketAddr::V4(v4) = peer {
        let _ = lookup.take(v4);
    }
    let source =
        snapshot.borrow().workloads.get(&peer.ip()).map_or_else(|| "unknown".to_owned(), |w| w.label());
    crate::limits::refused(stats, limits, refusal, peer.ip(), "outbound", source);
    let _ = stream.set_zero_linger();
}

/// The next connection on `listener`, riding out the failures of single connections (the peer
/// reset before accept, descriptor limits: logged at most once a second through `errors`, after
/// a short back-off so an exhaustion does not spin); `None` once the proxy drains; an error
/// that ends the listener.
pub(crate) async fn accept(
    listener: &TcpListener,
    drain: &mut crate::hbone::Drain,
    errors: &crate::limits::EverySecond,
    component: &'static str,
) -> std::io::Result<Option<(TcpStream, SocketAddr)>> {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = crate::hbone::drained(drain) => return Ok(None),
        };
        match accepted {
            Ok(conn) => return Ok(Some(conn)),
            Err(err) if is_transient(&err) => {
                if errors.should_log() {
                    warn!(component, error = %err, "accept failed; continuing (logged at most once a second)");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(err) => return Err(err),
        }
    }
}

fn is_transient(err: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(err.kind(), ConnectionAborted | ConnectionReset | Interrupted | WouldBlock)
        || err.raw_os_error() == Some(24) // EMFILE
        || err.raw_os_error() == Some(23) // ENFILE
}

/// What a connection's task needs from its listener.
struct Conn {
    mesh: Arc<Mesh>,
    lookup: Arc<dyn OrigDstLookup>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    upstreams: crate::upstream::Upstreams,
    mirrors: crate::upstream::Upstreams<http_body_util::Empty<bytes::Bytes>>,
    stats: Arc<OutboundStats>,
}

async fn handle(client: TcpStream, peer: SocketAddr, conn: Conn) {
    let Conn { mesh, lookup, snapshot, upstreams, mirrors, stats } = conn;
    let SocketAddr::V4(peer) = peer else {
        stats.lookup_misses.fetch_add(1, Relaxed);
        warn!("IPv6 client on the outbound listener; closing");
        return;
    };
    let orig: SocketAddrV4 = match lookup.take(peer) {
        Ok(Some(orig)) => orig,
        Ok(None) => {
            stats.lookup_misses.fetch_add(1, Relaxed);
            warn!("no original destination recorded; closing");
            return;
        }
        Err(err) => {
            stats.lookup_misses.fetch_add(1, Relaxed);
            warn!(error = %err, "original destination lookup failed; closing");
            return;
        }
    };
    let target = {
        let snap = snapshot.borrow().clone();
        match snap.frontend(SocketAddr::V4(orig)) {
            Some(frontend) if frontend.is_http() => None,
            Some(frontend) => match pick_endpoint(&frontend.default_backend.endpoints, fastrand::u64(..)) {
                Some(endpoint) => Some(endpoint.addr()),
                None => {
                    stats.no_endpoint.fetch_add(1, Relaxed);
                    warn!(dst = %orig, service = %frontend.service, "no ready endpoint; closing");
                    return;
                }
            },
            None => Some(SocketAddr::V4(orig)),
        }
    };
    let Some(target) = target else {
        let ctx = ConnContext {
            mesh,
            client: SocketAddr::V4(peer),
            orig_dst: SocketAddr::V4(orig),
            snapshot,
            upstreams,
            mirrors,
            stats,
            counters: Default::default(),
        };
        crate::http::serve_connection(client, Arc::new(ctx)).await;
        return;
    };
    let snap = snapshot.borrow().clone();
    let hop = mesh.hop(&snap, std::net::IpAddr::V4(*peer.ip()), target);
    hop.record_denial(&stats, &snap, SocketAddr::V4(peer), target);
    let client_ip = std::net::IpAddr::V4(*peer.ip());
    let guard = Guard::of(&snap, &mesh, client_ip, target);
    // The connection may last: it keeps what its guard needs, not the whole snapshot.
    drop(snap);
    relay(client, orig, hop, &mesh, &stats, guard, client_ip).await;
}

/// What a relay to a workload of this node keeps to re-check its policies when they change:
/// the source's principal (if it is a workload), the destination's namespace, class and URI.
pub(crate) struct Guard {
    /// `None`: the source is unauthenticated.
    pub src: Option<Arc<crate::snapshot::Principal>>,
    pub namespace: Arc<str>,
    pub class: Arc<crate::authz::Class>,
    pub dst_uri: Arc<str>,
    /// The `path` label a revocation is counted with.
    pub revoked: &'static str,
}

impl Guard {
    fn of(snap: &Snapshot, mesh: &Mesh, client: std::net::IpAddr, target: SocketAddr) -> Option<Self> {
        let (Some(node), Some(dst)) = (&mesh.config.node, snap.workloads.get(&target.ip())) else {
            return None;
        };
        (dst.node.as_deref() == Some(node.as_str())).then(|| Self {
            src: snap.workloads.get(&client).map(|w| w.principal.clone()),
            namespace: dst.pod.namespace.clone(),
            class: dst.class.clone(),
            dst_uri: dst.uri().clone(),
            revoked: "local_revoked",
        })
    }
}

/// Turns on TCP keepalive probes after `idle` of quiet: a relayed connection is never cut for
/// being idle, but one whose peer is gone is found and closed.
pub(crate) fn keep_alive(stream: &TcpStream, idle: Duration) {
    let params = socket2::TcpKeepalive::new().with_time(idle).with_interval(idle / 4);
    if let Err(err) = socket2::SockRef::from(stream).set_tcp_keepalive(&params) {
        debug!(error = %err, "cannot turn on TCP keepalive");
    }
}

/// Carries a connection's bytes along `hop` and back.
pub(crate) async fn relay(
    mut client: TcpStream,
    orig: SocketAddrV4,
    hop: Hop,
    mesh: &Mesh,
    stats: &OutboundStats,
    guard: Option<Guard>,
    client_ip: std::net::IpAddr,
) {
    let started = Instant::now();
    keep_alive(&client, mesh.config.tcp_keepalive);
    let target = match hop {
        Hop::Direct(t) => t,
        Hop::Refuse(why) => {
            stats.upstream_errors.fetch_add(1, Relaxed);
            warn!(dst = %orig, why, "refusing to leave the node without mTLS");
            return;
        }
        Hop::Deny { .. } => {
            // Counted and logged where the hop was decided; the client's connection is reset.
            let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
            return;
        }
        Hop::Tunnel { src, dst, node, node_name, target } => {
            let pool = mesh.hbone.as_ref().expect("a tunnel hop implies HBONE");
            match pool.connect(&src, &dst, node, &node_name, target, Some(client_ip)).await {
                Ok(tunnel) => {
                    stats.hbone_tunnels.fetch_add(1, Relaxed);
                    let _ = client.set_nodelay(true);
                    let (sent, received) = tunnel.relay(&mut client).await.unwrap_or((0, 0));
                    stats.bytes_sent.fetch_add(sent, Relaxed);
                    stats.bytes_received.fetch_add(received, Relaxed);
                    info!(dst = %orig, %target, via = %node, src_identity = %src, dst_identity = %dst, sent, received,
                        duration_ms = started.elapsed().as_millis() as u64, "connection closed");
                }
                Err(err) => {
                    stats.upstream_errors.fetch_add(1, Relaxed);
                    warn!(dst = %orig, %target, error = %err, "cannot open an HBONE tunnel");
                    if let crate::hbone::HboneError::Refused { status: http::StatusCode::FORBIDDEN, .. } = err
                    {
                        // Denied by the destination's policies: reset, as a local denial is.
                        let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
                    }
                }
            }
            return;
        }
    };
    let upstream =
        match tokio::time::timeout(mesh.config.l4_connect_timeout, TcpStream::connect(target)).await {
            Ok(Ok(s)) => s,
            Ok(Err(err)) => {
                stats.upstream_errors.fetch_add(1, Relaxed);
                warn!(dst = %orig, error = %err, "cannot connect to original destination");
                return;
            }
            Err(_) => {
                stats.upstream_errors.fetch_add(1, Relaxed);
                warn!(dst = %orig, "timed out connecting to original destination");
                return;
            }
        };
    let _ = upstream.set_nodelay(true);
    keep_alive(&upstream, mesh.config.tcp_keepalive);
    let _ = client.set_nodelay(true);
    let mut upstream = upstream;
    // To a workload of this node under its policies: a change that no longer allows the
    // connection ends it, both sides reset.
    let copied = match guard {
        None => copy_both_ways(&mut client, &mut upstream, mesh.config.copy_buffer).await,
        Some(Guard { src, namespace, class, dst_uri, revoked }) => {
            let check = |authz: &crate::authz::Authz| {
                authz.check(
                    &crate::authz::Peer { identity: src.as_ref().map(|p| &p.identity), ip: Some(client_ip) },
                    &crate::authz::Target {
                        namespace: &namespace,
                        labels: &class.labels,
                        port: target.port(),
                    },
                )
            };
            tokio::select! {
                copied = copy_both_ways(&mut client, &mut upstream, mesh.config.copy_buffer) => copied,
                decision = crate::authz::revoked(mesh.policies.clone(), check) => {
                    let src = src.as_ref().map_or_else(|| client_ip.to_string(), |p| p.uri.to_string());
                    crate::authz::Authz::record(stats, &decision, revoked, &src, &dst_uri, target);
                    let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
                    let _ = socket2::SockRef::from(&upstream).set_linger(Some(Duration::ZERO));
                    return;
                }
            }
        }
    };
    match copied {
        Ok((sent, received)) => {
            stats.bytes_sent.fetch_add(sent, Relaxed);
            stats.bytes_received.fetch_add(received, Relaxed);
            info!(
                dst = %orig,
                %target,
                sent,
                received,
                duration_ms = started.elapsed().as_millis() as u64,
                "connection closed"
            );
        }
        Err(err) => debug!(dst = %orig, error = %err, "connection ended with an error"),
    }
}

#[cfg(test)]
mod tests;
