//! The node proxy's one entry point: [`Proxy::start`] binds its listeners from a
//! [`ProxyConfig`] and serves them on a runtime the caller gives, from the snapshots, the
//! original-destination lookup and the certificates it is handed.

use std::{net::SocketAddr, sync::Arc};

use tokio::{runtime::Handle, sync::watch, task::JoinHandle};
use tracing::error;

pub use crate::capture::Capture;
use crate::{
    ProxyConfig,
    hbone::{Inbound, Mesh},
    identity::CertStore,
    limits::ConnLimits,
    orig_dst::OrigDstLookup,
    outbound::Outbound,
    snapshot::Snapshot,
    stats::OutboundStats,
};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot bind the {listener} listener on {addr}: {source}")]
    Bind { listener: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("a mesh identity (certificates) needs the node's name in the proxy's configuration")]
    NoNodeName,
}

/// What the proxy routes by and speaks as; the agent (or a test) owns their sources.
pub struct Inputs {
    /// The configuration in force; a new snapshot applies from the next connection or request.
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    /// Where redirected connections were going (the kernel's map, or a table in tests).
    pub lookup: Arc<dyn OrigDstLookup>,
    /// The node's workload certificates: with them, traffic between nodes is mutual TLS and the
    /// inbound HBONE listener serves; without, traffic between nodes is plaintext.
    pub certs: Option<Arc<CertStore>>,
}

/// A running proxy; dropping it stops its listeners (connections in flight end with the
/// runtime).
pub struct Proxy {
    runtime: Handle,
    captures: Arc<crate::capture::Captures>,
    outbound_addr: SocketAddr,
    inbound_addr: Option<SocketAddr>,
    stats: Arc<OutboundStats>,
    drain: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Connections still open at the deadline (0: every one finished).
    pub left: usize,
    pub took: std::time::Duration,
}

impl Proxy {
    /// Binds the outbound listener (and the inbound HBONE listener when there are
    /// certificates) and serves them on `runtime`. Binding happens here, before this returns,
    /// so a bind error is the caller's to report and a connection redirected afterwards always
    /// finds the port open.
    pub fn start(config: ProxyConfig, inputs: Inputs, runtime: &Handle) -> Result<Self, ProxyError> {
        // Listeners are registered with the proxy's runtime as they are made.
        let _entered = runtime.enter();
        let config = Arc::new(config);
        let Inputs { snapshot, lookup, certs } = inputs;
        let stats = Arc::new(OutboundStats::default());
        // One count for the whole node: the outbound listener, the inbound one and its tunnels.
        let limits = ConnLimits::new(config.max_connections, config.max_connections_per_source);
        let _ = stats.open.set(limits.clone());
        let (drain, draining) = watch::channel(false);
        let (policies, follow_policies) = crate::authz::follow(snapshot.clone());
        let outbound = listen(&config, config.outbound_addr).map_err(|source| ProxyError::Bind {
            listener: "outbound",
            addr: config.outbound_addr,
            source,
        })?;
        let outbound_addr = outbound.local_addr().unwrap_or(config.outbound_addr);
        let mut tasks = Vec::new();
        let mut inbound_addr = None;
        if let Some(certs) = &certs {
            let node = config.node.clone().ok_or(ProxyError::NoNodeName)?;
            let addr = config.inbound_addr();
            let listener = listen(&config, addr).map_err(|source| ProxyError::Bind {
                listener: "inbound HBONE",
                addr,
                source,
            })?;
            inbound_addr = Some(listener.local_addr().unwrap_or(addr));
            let inbound = Arc::new(Inbound {
                config: config.clone(),
                node,
                snapshot: snapshot.clone(),
                certs: certs.clone(),
                stats: stats.clone(),
                limits: limits.clone(),
                drain: draining.clone(),
                policies: policies.clone(),
            });
            tasks.push(runtime.spawn(log_end("inbound", crate::hbone::serve_inbound(listener, inbound))));
        }
        tasks.push(runtime.spawn(follow_policies));
        let mesh = Arc::new(Mesh::new(config, certs, draining, policies, stats.clone()));
        let captures = Arc::new(crate::capture::Captures {
            mesh: mesh.clone(),
            limits: limits.clone(),
            snapshot: snapshot.clone(),
            stats: stats.clone(),
        });
        let outbound_state = Outbound { mesh, limits, lookup, snapshot, stats: stats.clone() };
        tasks.push(runtime.spawn(log_end("outbound", crate::outbound::serve(outbound, outbound_state))));
        Ok(Self { runtime: runtime.clone(), captures, outbound_addr, inbound_addr, stats, drain, tasks })
    }

    /// Serves a pod's capture listener (a listening socket inside the pod's network namespace
    /// that the kernel hands the pod's inbound connections from outside the mesh; see
    /// [`crate::capture`]) until the returned handle is dropped or the proxy drains. `pod`
    /// names it in the log. Refused once the proxy drains.
    pub fn capture(&self, listener: std::net::TcpListener, pod: String) -> std::io::Result<Capture> {
        if *self.drain.borrow() {
            return Err(std::io::Error::other("the proxy is draining"));
        }
        let _entered = self.runtime.enter();
        self.captures.serve(listener, pod)
    }

    /// Where the outbound listener is bound (the configured address, its port filled in).
    pub fn outbound_addr(&self) -> SocketAddr {
        self.outbound_addr
    }

    /// Where the inbound HBONE listener is bound, when there is one.
    pub fn inbound_addr(&self) -> Option<SocketAddr> {
        self.inbound_addr
    }

    /// Connections open now: on the outbound listener, the inbound one, and tunnels.
    pub fn connections(&self) -> usize {
        self.stats.connections_open()
    }

    /// Drains: the listeners (outbound, inbound, the pods' capture listeners) stop accepting (a connection redirected here from now on is
    /// refused at once), HTTP/2 and HBONE connections get GOAWAY, idle HTTP/1.1 keep-alive
    /// connections close and busy ones close after their response; TCP streams run on. Resolves
    /// when every connection has ended or `deadline` has passed, whichever is first; what is
    /// left then ends with the proxy.
    pub async fn drain(&self, deadline: std::time::Duration) -> Drained {
        let started = std::time::Instant::now();
        self.stats.draining.store(true, std::sync::atomic::Ordering::Relaxed);
        self.drain.send_replace(true);
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let left = self.stats.connections_open();
            if left == 0 || tokio::time::Instant::now() >= until {
                return Drained { left, took: started.elapsed() };
            }
            tokio::time::sleep_until(until.min(tokio::time::Instant::now() + DRAIN_POLL)).await;
        }
    }

    /// The proxy's counters, for the agent's status and metrics.
    pub fn stats(&self) -> &Arc<OutboundStats> {
        &self.stats
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// How often a drain looks whether every connection has ended.
const DRAIN_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// A listener on `addr` with the configured backlog, registered with the runtime entered.
fn listen(config: &ProxyConfig, addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket =
        if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    // An agent taking over the node binds beside this one; the kernel spreads new connections
    // over both until this one drains and closes its listener.
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(config.listen_backlog)
}

/// Serves a listener, logging why it stopped if it ever does.
async fn log_end<E: std::fmt::Display>(listener: &'static str, serving: impl Future<Output = Result<(), E>>) {
    if let Err(err) = serving.await {
        error!(error = %err, listener, "listener stopped");
    }
}
