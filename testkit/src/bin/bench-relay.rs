//! The benchmarks' floor: a plain TCP relay that runs on each node in place of the agent's
//! proxy. Two of them, one per node, show what passing a request through two user-space
//! processes built like the proxy costs on the machine before any work of the proxy's own: the
//! same runtime (tokio on one thread, epoll) and the same relay as the proxy's L4 path (tokio's
//! bidirectional copy, 64 KiB buffers), with no TLS, no HTTP, no routing and no eBPF lookup.
//!
//! Usage: `bench-relay LISTEN=TARGET...`, socket addresses: each LISTEN accepts connections and
//! joins each to a new connection to its TARGET.

use std::{net::SocketAddr, time::Duration};

use tokio::net::{TcpListener, TcpStream};

/// The proxy's relay buffer (`userspace-proxy/src/outbound.rs`).
const BUF: usize = 64 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

fn main() -> std::io::Result<()> {
    let usage = || std::io::Error::other("usage: bench-relay LISTEN=TARGET... (socket addresses)");
    let mut routes = Vec::new();
    for arg in std::env::args().skip(1) {
        let (listen, target) = arg.split_once('=').ok_or_else(usage)?;
        let listen: SocketAddr = listen.parse().map_err(|_| usage())?;
        let target: SocketAddr = target.parse().map_err(|_| usage())?;
        routes.push((listen, target));
    }
    if routes.is_empty() {
        return Err(usage());
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let mut accepting = tokio::task::JoinSet::new();
        for (listen, target) in routes {
            let listener = TcpListener::bind(listen).await?;
            accepting.spawn(accept(listener, target));
        }
        // The first accept loop to fail ends the relay with its error.
        match accepting.join_next().await {
            Some(Ok(result)) => result,
            Some(Err(err)) => Err(std::io::Error::other(err)),
            None => Ok(()),
        }
    })
}

/// Accepts until the listener fails; each connection is a task of its own.
async fn accept(listener: TcpListener, target: SocketAddr) -> std::io::Result<()> {
    loop {
        let (client, _) = listener.accept().await?;
        tokio::spawn(async move {
            if let Err(err) = relay(client, target).await {
                eprintln!("bench-relay: to {target}: {err}");
            }
        });
    }
}

async fn relay(mut client: TcpStream, target: SocketAddr) -> std::io::Result<()> {
    let mut upstream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    client.set_nodelay(true)?;
    upstream.set_nodelay(true)?;
    tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, BUF, BUF).await?;
    Ok(())
}
