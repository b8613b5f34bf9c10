//! Everything the node proxy is set up and tuned by, in one struct whose [`Default`] is what it
//! runs with. The agent's flags and the tests map onto it; [`crate::Proxy::start`] takes it.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

/// The port every node's inbound HBONE listener uses unless configured otherwise.
pub const DEFAULT_HBONE_PORT: u16 = 15008;

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// The outbound listener, where the eBPF program sends enrolled pods' connections. Its IP is
    /// the node's; the inbound HBONE listener binds the same IP.
    pub outbound_addr: SocketAddr,
    /// The port of the inbound HBONE listener, on this node and on every peer it dials.
    pub hbone_port: u16,
    /// This node's name: which workloads it speaks for. `None` with no mesh identity.
    pub node: Option<String>,
    pub trust_domain: String,
    /// Accept queue of the listeners. The standard library's 128 overflows when every pod of
    /// a node opens connections at once, and an overflow costs the client a SYN
    /// retransmission (a second).
    pub listen_backlog: u32,
    /// How long an L4 connection waits for its destination to accept.
    pub l4_connect_timeout: Duration,
    /// How long a pooled HTTP connection to a pod, or an HBONE connection to a node, waits to
    /// be established.
    pub upstream_connect_timeout: Duration,
    /// A pooled upstream connection no request has used for this long is closed...
    pub upstream_idle_timeout: Duration,
    /// ...when the pool is next swept, this often.
    pub upstream_sweep_every: Duration,
    /// Connections the proxy holds at once, on all its listeners and tunnels together; past it,
    /// new ones are refused. Each costs one or two descriptors, so the agent sets it below its
    /// descriptor limit, with room kept for its own work (API watches, files, admin).
    pub max_connections: usize,
    /// Connections (and tunnels) one source address may hold at once: one pod, or one peer
    /// node, cannot take every place.
    pub max_connections_per_source: usize,
    /// How long a client may take to send a request's head (a slowloris is closed here). With
    /// HTTP/1 it is also the longest a keep-alive connection may sit idle between requests: the
    /// timer starts as soon as the proxy waits for the next head.
    pub header_read_timeout: Duration,
    /// While the proxy drains, an HTTP/1.1 connection's responses say `connection: close`,
    /// so a client's next request goes to a new connection (the next proxy's) with no race;
    /// one left idle this long is closed then (a client sending just then would have to retry).
    pub drain_idle_grace: Duration,
    /// An HTTP/2 connection from a pod is pinged this often while it is quiet, and closed when
    /// a ping is not answered within [`Self::h2_keepalive_timeout`]: a peer that is gone does
    /// not hold its connection.
    pub h2_keepalive_interval: Duration,
    pub h2_keepalive_timeout: Duration,
    /// How long an inbound HBONE connection may take to finish its TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// Relayed L4 connections are never cut for being idle (long-lived ones are legitimate);
    /// TCP keepalive probes, after this much quiet, find a peer that is gone.
    pub tcp_keepalive: Duration,
    /// Buffer per direction when relaying a TCP connection to a TCP connection: fewer, larger
    /// reads and writes are what bulk transfers need.
    pub copy_buffer: usize,
    /// What a tunnel's relay allocates at a time for reads from its socket, and the largest
    /// read(2) on a TLS connection between nodes while a stream fills its reads.
    pub relay_block: usize,
    /// HTTP/2 between nodes (HBONE).
    pub h2: H2Config,
}

/// HTTP/2 settings of HBONE connections, both ways.
#[derive(Debug, Clone, Copy)]
pub struct H2Config {
    /// Largest frame either side accepts: fewer frames per bulk transfer. It also bounds what one
    /// write to a tunnel queues.
    pub max_frame: u32,
    /// Flow-control window of one tunnel, and of a whole connection: room for bulk transfers
    /// between nodes without waiting on WINDOW_UPDATEs.
    pub stream_window: u32,
    pub connection_window: u32,
    /// Largest header block a peer may send: a CONNECT needs a few hundred bytes.
    pub max_header_list: u32,
    /// Tunnels one HBONE connection may carry at once; a peer that wants more waits for one
    /// to end. Each costs the receiving node a socket to its pod.
    pub max_concurrent_streams: u32,
    /// Requests one HTTP/2 connection from a pod may have in flight at once.
    pub pod_max_concurrent_streams: u32,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            outbound_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 15001)),
            hbone_port: DEFAULT_HBONE_PORT,
            node: None,
            trust_domain: "cluster.local".into(),
            listen_backlog: 4096,
            l4_connect_timeout: Duration::from_secs(10),
            upstream_connect_timeout: Duration::from_secs(5),
            upstream_idle_timeout: Duration::from_secs(90),
            upstream_sweep_every: Duration::from_secs(30),
            max_connections: 16_384,
            max_connections_per_source: 4_096,
            header_read_timeout: Duration::from_secs(30),
            drain_idle_grace: Duration::from_secs(5),
            h2_keepalive_interval: Duration::from_secs(30),
            h2_keepalive_timeout: Duration::from_secs(20),
            tls_handshake_timeout: Duration::from_secs(10),
            tcp_keepalive: Duration::from_secs(60),
            copy_buffer: 64 * 1024,
            relay_block: 64 * 1024,
            h2: H2Config {
                max_frame: 256 * 1024,
                stream_window: 4 << 20,
                connection_window: 16 << 20,
                max_header_list: 16 * 1024,
                max_concurrent_streams: 2048,
                pod_max_concurrent_streams: 1024,
            },
        }
    }
}

impl ProxyConfig {
    /// Where the inbound HBONE listener binds: the outbound listener's IP, the HBONE port.
    pub fn inbound_addr(&self) -> SocketAddr {
        SocketAddr::new(self.outbound_addr.ip(), self.hbone_port)
    }

    /// How much sealed data rustls keeps for the socket before it takes no more (its default
    /// is 64 KiB, one relay block): room for a relay's whole DATA frame (a block and the
    /// frame's head), so the frame leaves in one write(2) rather than its last 9 bytes in a
    /// record and a write of their own.
    pub(crate) fn tls_send_buffer(&self) -> usize {
        2 * self.relay_block
    }

    /// What a tunnel's byte stream needs of the configuration.
    pub(crate) fn relay(&self) -> crate::hbone::Relay {
        crate::hbone::Relay { block: self.relay_block, max_write: self.h2.max_frame as usize }
    }
}
