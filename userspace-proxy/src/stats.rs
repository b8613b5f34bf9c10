//! Counters the proxy keeps for the agent's status and metrics endpoints.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Labels of the per-request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct RequestLabels {
    /// `namespace/serviceaccount` of the client, or `unknown`.
    pub source_workload: String,
    /// The Service frontend the client addressed, `namespace/name:port`.
    pub destination_service: String,
    /// The backend Service the request went to, `namespace/name:port`, or `-` when answered
    /// locally.
    pub backend: String,
    pub response_code: u16,
}

/// Labels of the counter of requests the proxy answered itself.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct LocalLabels {
    /// The classification's outcome ([`crate::local::Class::outcome`]).
    pub reason: &'static str,
}

/// Labels of the counter of CONNECTs and connections the inbound HBONE listener refused.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct RefusalLabels {
    /// `foreign_trust_domain`, `node_address`, `not_a_workload`, `not_here`, `bad_target`,
    /// `handshake_timeout`.
    pub reason: &'static str,
}

/// Labels of the counter of connections and requests an authorization policy denied.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct DeniedLabels {
    /// `namespace/name` of the policy that decided.
    pub policy: String,
    /// `deny_policy`, `no_allow_policy_matched`, `unenforceable_policy`.
    pub reason: &'static str,
    /// Where it was decided: `inbound` (an HBONE tunnel from another node) or `local` (a
    /// connection or request from a pod of this node to one of this node).
    pub path: &'static str,
}

/// Labels of the counter of connections refused at a limit.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct LimitLabels {
    /// `outbound` or `hbone`.
    pub listener: &'static str,
    /// `node_limit` or `source_limit`.
    pub reason: &'static str,
    /// The source workload (`namespace/serviceaccount`), the peer's identity for a tunnel, or
    /// `unknown`.
    pub source: String,
}

#[derive(Debug, Default)]
pub struct OutboundStats {
    /// Connections and tunnels refused at a limit, by listener, reason and source.
    pub limited:
        prometheus_client::metrics::family::Family<LimitLabels, prometheus_client::metrics::counter::Counter>,
    /// Tunnels and connections the inbound HBONE listener refused, by reason.
    pub hbone_refused: prometheus_client::metrics::family::Family<
        RefusalLabels,
        prometheus_client::metrics::counter::Counter,
    >,
    /// HBONE connections this node dialled whose server certificate it refused, by reason:
    /// `wrong_node` (not through the CA of the destination's node), `untrusted` (another root,
    /// expired, malformed) or `identity` (not the destination's identity).
    pub hbone_server_refused: prometheus_client::metrics::family::Family<
        RefusalLabels,
        prometheus_client::metrics::counter::Counter,
    >,
    /// Connections, tunnels and requests an authorization policy denied.
    pub authz_denied: prometheus_client::metrics::family::Family<
        DeniedLabels,
        prometheus_client::metrics::counter::Counter,
    >,
    /// Requests the proxy answered itself, by reason.
    pub local_responses:
        prometheus_client::metrics::family::Family<LocalLabels, prometheus_client::metrics::counter::Counter>,
    /// Requests by source workload, destination service, backend and response code.
    pub requests_by: prometheus_client::metrics::family::Family<
        RequestLabels,
        prometheus_client::metrics::counter::Counter,
    >,
    /// Connections accepted on the outbound listener.
    pub accepted: AtomicU64,
    /// Accepted connections whose original destination was not found: closed at once.
    pub lookup_misses: AtomicU64,
    /// Connections or requests whose upstream could not be reached.
    pub upstream_errors: AtomicU64,
    /// Connections to a Service frontend with no ready endpoint.
    pub no_endpoint: AtomicU64,
    /// HTTP requests handled.
    pub requests: AtomicU64,
    /// HBONE tunnels (streams) opened to other nodes: one per L4 connection, and the pooled ones
    /// that HTTP requests share.
    pub hbone_tunnels: AtomicU64,
    /// Inbound HBONE streams forwarded to a local pod.
    pub inbound_tunnels: AtomicU64,
    /// Captured inbound connections (from outside the mesh) forwarded to a local pod.
    pub captured: AtomicU64,
    /// Inbound TLS handshakes refused (unknown CA, expired, no such identity here).
    pub tls_refused: AtomicU64,
    /// Requests copied to a RequestMirror backend.
    pub mirrored: AtomicU64,
    /// Requests a mirror filter applied to but that had a body, so were not copied.
    pub mirror_skipped: AtomicU64,
    /// Bytes carried from clients to destinations, and back.
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    /// The proxy drains: its listeners accept no more ([`crate::Proxy::drain`]).
    pub draining: std::sync::atomic::AtomicBool,
    /// Connections the proxy holds now: outbound, inbound and tunnels.
    pub(crate) open: std::sync::OnceLock<std::sync::Arc<crate::limits::ConnLimits>>,
}

impl OutboundStats {
    /// Connections the proxy holds now: outbound, inbound and tunnels.
    pub fn connections_open(&self) -> usize {
        self.open.get().map_or(0, |limits| limits.held())
    }
}

/// A point-in-time copy of [`OutboundStats`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboundCounts {
    pub accepted: u64,
    pub lookup_misses: u64,
    pub upstream_errors: u64,
    pub no_endpoint: u64,
    pub requests: u64,
    pub hbone_tunnels: u64,
    pub inbound_tunnels: u64,
    #[serde(default)]
    pub captured: u64,
    pub tls_refused: u64,
    pub mirrored: u64,
    pub mirror_skipped: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

impl OutboundStats {
    pub fn snapshot(&self) -> OutboundCounts {
        OutboundCounts {
            accepted: self.accepted.load(Relaxed),
            lookup_misses: self.lookup_misses.load(Relaxed),
            upstream_errors: self.upstream_errors.load(Relaxed),
            no_endpoint: self.no_endpoint.load(Relaxed),
            requests: self.requests.load(Relaxed),
            hbone_tunnels: self.hbone_tunnels.load(Relaxed),
            inbound_tunnels: self.inbound_tunnels.load(Relaxed),
            captured: self.captured.load(Relaxed),
            tls_refused: self.tls_refused.load(Relaxed),
            mirrored: self.mirrored.load(Relaxed),
            mirror_skipped: self.mirror_skipped.load(Relaxed),
            bytes_sent: self.bytes_sent.load(Relaxed),
            bytes_received: self.bytes_received.load(Relaxed),
        }
    }
}
