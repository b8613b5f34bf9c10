//! The outbound listener: where the eBPF program sends enrolled pods' connections.
//!
//! Today it carries each connection to its original destination at L4; routing by the
//! snapshot builds on this.

use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::{Arc, atomic::Ordering::Relaxed},
    time::{Duration, Instant},
};

use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::{orig_dst::OrigDstLookup, stats::OutboundStats};

/// How long to wait for the original destination to accept before giving up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("cannot accept on the outbound listener {addr}: {source}")]
    Accept {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Serves the outbound listener until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    lookup: Arc<dyn OrigDstLookup>,
    stats: Arc<OutboundStats>,
) -> Result<(), OutboundError> {
    let addr = listener
        .local_addr()
        .map_err(|source| OutboundError::Accept {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
    info!(%addr, component = "outbound", "listener ready");
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            // Per-connection failures (the peer reset before accept, fd limits) must not stop
            // the listener; back off briefly so an fd exhaustion does not spin.
            Err(err) if is_transient(&err) => {
                warn!(%addr, error = %err, "accept failed; continuing");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            Err(source) => return Err(OutboundError::Accept { addr, source }),
        };
        stats.accepted.fetch_add(1, Relaxed);
        let lookup = lookup.clone();
        let stats = stats.clone();
        let span = info_span!("outbound", src = %peer);
        tokio::spawn(handle(stream, peer, lookup, stats).instrument(span));
    }
}

fn is_transient(err: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(err.kind(), ConnectionAborted | ConnectionReset | Interrupted | WouldBlock)
        || err.raw_os_error() == Some(24) // EMFILE
        || err.raw_os_error() == Some(23) // ENFILE
}

async fn handle(
    mut client: TcpStream,
    peer: SocketAddr,
    lookup: Arc<dyn OrigDstLookup>,
    stats: Arc<OutboundStats>,
) {
    let started = Instant::now();
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
    let upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(orig)).await {
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
    let _ = client.set_nodelay(true);
    let mut upstream = upstream;
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((sent, received)) => {
            stats.bytes_sent.fetch_add(sent, Relaxed);
            stats.bytes_received.fetch_add(received, Relaxed);
            info!(
                dst = %orig,
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
