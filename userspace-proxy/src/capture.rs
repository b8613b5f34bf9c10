//! Inbound capture: connections to a pod of this node that did not come through the mesh (a
//! pod outside it, a host elsewhere, plaintext from another node). The kernel's `sk_lookup`
//! program hands them to a listener the agent opened inside the pod's network namespace; each
//! arrives with the pod's address and port as its local address, and the client's as its peer.
//!
//! Such a peer has no verified identity: a `strict` pod refuses it, a `permissive` one lets it
//! on to its authorization policies as an unauthenticated source with its address. Allowed, the
//! connection is carried to the pod from this node (whose own connections the kernel does not
//! capture), and closed if a later policy change no longer allows it.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering::Relaxed},
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};
use tracing::{Instrument as _, debug, info_span, warn};

use crate::{
    authz::{Authz, Decision, Peer, Target},
    hbone::{Hop, Mesh},
    limits::ConnLimits,
    outbound::Guard,
    snapshot::Snapshot,
    stats::OutboundStats,
};

/// What every capture listener serves from.
pub(crate) struct Captures {
    pub mesh: Arc<Mesh>,
    pub limits: Arc<ConnLimits>,
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    pub stats: Arc<OutboundStats>,
}

/// A pod's capture listener being served; dropping it stops the serving and closes the
/// listener (the kernel then drops the pod's entry in its socket map).
#[derive(Debug)]
pub struct Capture {
    task: JoinHandle<()>,
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Captures {
    /// Serves `listener` on the current runtime until the proxy drains or the handle drops.
    pub(crate) fn serve(
        self: &Arc<Self>,
        listener: std::net::TcpListener,
        pod: String,
    ) -> std::io::Result<Capture> {
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        let captures = self.clone();
        let task = tokio::spawn(accept_loop(listener, captures, pod));
        Ok(Capture { task })
    }
}

async fn accept_loop(listener: TcpListener, captures: Arc<Captures>, pod: String) {
    let own = listener.local_addr().ok();
    let accept_errors = crate::limits::EverySecond::new();
    let mut drain = captures.mesh.drain.clone();
    loop {
        let (stream, peer) =
            match crate::outbound::accept(&listener, &mut drain, &accept_errors, "capture").await {
                Ok(Some(conn)) => conn,
                Ok(None) => return,
                Err(err) => {
                    warn!(%pod, error = %err, "capture listener stopped");
                    return;
                }
            };
        let local = match stream.local_addr() {
            // Dialled at the listener's own address (from inside the pod): not a connection
            // meant for the pod, and never relayed back to the listener itself.
            Ok(local) if Some(local) == own || local.ip().is_loopback() => {
                let _ = stream.set_zero_linger();
                continue;
            }
            Ok(local) => local,
            Err(err) => {
                debug!(error = %err, "captured connection gone before it was read");
                continue;
            }
        };
        let slot = match captures.limits.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(refusal) => {
                // Outside the mesh: the source is no workload to name.
                let source = "unauthenticated".to_owned();
                crate::limits::refused(
                    &captures.stats,
                    &captures.limits,
                    refusal,
                    peer.ip(),
                    "capture",
                    source,
                );
                let _ = stream.set_zero_linger();
                continue;
            }
        };
        let captures = captures.clone();
        let span = info_span!("captured", src = %peer, dst = %local);
        tokio::spawn(
            async move {
                handle(stream, peer, local, &captures).await;
                drop(slot);
            }
            .instrument(span),
        );
    }
}

/// Decides on one captured connection and, allowed, carries it to the pod.
async fn handle(client: TcpStream, peer: SocketAddr, local: SocketAddr, captures: &Captures) {
    let SocketAddr::V4(orig) = local else {
        let _ = client.set_zero_linger();
        return;
    };
    let snapshot = captures.snapshot.borrow().clone();
    let here = captures.mesh.config.node.as_deref();
    let Some(dst) =
        snapshot.workloads.get(&local.ip()).filter(|w| here.is_some() && w.node.as_deref() == here)
    else {
        // The pod is not (or no longer) a workload of this node: its policies are unknown
        // here, so the connection is refused rather than let past them.
        warn!("captured a connection to an address that is no workload of this node; refusing");
        let _ = client.set_zero_linger();
        return;
    };
    let target = Target { namespace: &dst.pod.namespace, labels: &dst.class.labels, port: local.port() };
    let decision = snapshot.authz.check(&Peer { identity: None, ip: Some(peer.ip()) }, &target);
    if let Decision::Deny { .. } = decision {
        let src = format!("unauthenticated {}", peer.ip());
        Authz::record(&captures.stats, &decision, "captured", &src, dst.uri(), local);
        let _ = client.set_zero_linger();
        return;
    }
    captures.stats.captured.fetch_add(1, Relaxed);
    let guard = Guard {
        src: None,
        namespace: dst.pod.namespace.clone(),
        class: dst.class.clone(),
        dst_uri: dst.uri().clone(),
        revoked: "captured_revoked",
    };
    drop(snapshot);
    crate::outbound::relay(
        client,
        orig,
        Hop::Direct(local),
        &captures.mesh,
        &captures.stats,
        Some(guard),
        peer.ip(),
    )
    .await;
}
