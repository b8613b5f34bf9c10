//! The proxy's pooled HTTP connections to pods: plain TCP to pods of this node, HBONE streams
//! to pods of other nodes. Kept per pod address and, for tunnels, per pair of identities, so a
//! connection never carries one workload's requests under another's identity.
//!
//! Written on hyper's connection API rather than hyper-util's pooled client, whose pooling was a
//! large share of the proxy's whole work on a same-node HTTP request (`cargo xtask bench
//! --instructions` counts it): it hashes the scheme and
//! authority byte by byte for each checkout and checkin, and spawns a task per HTTP/1 request to
//! put the connection back when the response ends. Here an HTTP/1 connection goes back into its
//! list as soon as the request is handed to it, and a checkout takes only one that hyper reports
//! ready, which it is again once the last response has been read to its end.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, Method, Uri, Version};
use http_body_util::{Either, Empty};
use hyper::{
    Request, Response,
    body::Incoming,
    client::conn::{TrySendError, http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tracing::debug;

use crate::{ProxyConfig, hbone, identity::Identity, snapshot::FastMap, stats::OutboundStats};

/// How a connection reaches its pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// A TCP connection from this node.
    Direct,
    /// An HBONE stream through `node`, speaking as `src` to a pod that must prove it is `dst`.
    Tunnel { src: Identity, dst: Identity, node: SocketAddr, node_name: std::sync::Arc<str> },
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("timed out connecting")]
    ConnectTimeout,
    #[error("{0}")]
    Tunnel(#[from] hbone::HboneError),
    #[error("this node has no HBONE identity to open a tunnel with")]
    NoHbone,
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

enum Sender<B> {
    Http1(http1::SendRequest<B>),
    /// HTTP/2 multiplexes: the pooled handle stays in the pool and each request uses a clone.
    Http2(http2::SendRequest<B>),
}

impl<B> Sender<B> {
    fn is_closed(&self) -> bool {
        match self {
            Sender::Http1(s) => s.is_closed(),
            Sender::Http2(s) => s.is_closed(),
        }
    }

    /// Free for a request now: HTTP/1 once the previous response has been read to its end.
    fn is_ready(&self) -> bool {
        match self {
            Sender::Http1(s) => s.is_ready(),
            Sender::Http2(s) => s.is_ready(),
        }
    }
}

struct Conn<B> {
    via: Via,
    sender: Sender<B>,
    /// When a request last used it.
    used: Instant,
}

type Conns<B> = Mutex<FastMap<SocketAddr, Vec<Conn<B>>>>;

/// The body of a request the proxy forwards: the client's, or none, for a replay.
pub type RequestBody = Either<Incoming, Empty<Bytes>>;

/// A request body type that has an empty value, to replay a request that had no body.
pub trait Replay {
    fn empty() -> Self;
}

impl Replay for RequestBody {
    fn empty() -> Self {
        Either::Right(Empty::new())
    }
}

impl Replay for Empty<Bytes> {
    fn empty() -> Self {
        Empty::new()
    }
}

/// What is needed to send a request without a body again.
struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Head {
    /// The head of an idempotent request without a body (RFC 9110, section 9.2.2): one that may
    /// be sent again when its connection closed before any response came.
    fn of_replayable<B: hyper::body::Body>(req: &Request<B>) -> Option<Self> {
        let idempotent = matches!(
            *req.method(),
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
        );
        (idempotent && req.body().is_end_stream()).then(|| Self {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
        })
    }

    fn into_request<B: Replay>(self) -> Request<B> {
        let mut req = Request::new(B::empty());
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers;
        req
    }
}

/// The pooled connections of one proxy, for request bodies of type `B`; clones share them.
pub(crate) struct Upstreams<B = RequestBody> {
    conns: Arc<Conns<B>>,
    hbone: Option<Arc<hbone::Pool>>,
    stats: Arc<OutboundStats>,
    connect_timeout: Duration,
}

impl<B> Clone for Upstreams<B> {
    fn clone(&self) -> Self {
        Self {
            conns: self.conns.clone(),
            hbone: self.hbone.clone(),
            stats: self.stats.clone(),
            connect_timeout: self.connect_timeout,
        }
    }
}

impl<B> Upstreams<B>
where
    B: hyper::body::Body + Replay + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Must be called on the runtime that serves the requests: a task of it closes idle
    /// connections, and ends when the last clone is dropped.
    pub fn new(hbone: Option<Arc<hbone::Pool>>, stats: Arc<OutboundStats>, config: &ProxyConfig) -> Self {
        let conns = Arc::new(Conns::<B>::default());
        tokio::spawn(reap(Arc::downgrade(&conns), config.upstream_sweep_every, config.upstream_idle_timeout));
        Self { conns, hbone, stats, connect_timeout: config.upstream_connect_timeout }
    }

    /// Sends `req` to the pod at `target` along `via` and returns its response. `h2` picks
    /// HTTP/2 with prior knowledge; otherwise HTTP/1.1, whose request target must be in origin
    /// form.
    ///
    /// A pooled connection can die unnoticed: a backend closes an idle keep-alive connection
    /// just as a request is handed to it. That costs one retry, on a new connection, never the
    /// request, when hyper hands the request back unsent, and also when it was written but the
    /// connection closed before the response was complete, if the request is idempotent and has
    /// no body (RFC 9112, section 9.3.1); a request with a body or a POST may have been acted on
    /// and is not sent again. A request is tried twice at most.
    pub async fn send(
        &self,
        target: SocketAddr,
        via: &Via,
        h2: bool,
        mut req: Request<B>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut may_reuse = true;
        loop {
            let pooled = if may_reuse { self.checkout(target, via, h2) } else { None };
            let (sender, reused) = match pooled {
                Some(sender) => (sender, true),
                // Boxed: connecting is rare, and its state (TLS and HTTP handshakes) would
                // otherwise make every request's future kilobytes larger, which each caller up
                // the chain copies when it creates and awaits it.
                None => (Box::pin(self.connect(target, via, h2)).await?, false),
            };
            // Only a reused connection can have died unnoticed: a copy is kept only for it.
            let head = if reused { Head::of_replayable(&req) } else { None };
            let sent = match sender {
                Sender::Http1(mut s) => {
                    // Back in the pool at once: hyper reports it ready again when this
                    // response has been read to its end.
                    let response = s.try_send_request(req);
                    self.checkin(target, via, Sender::Http1(s));
                    response.await
                }
                Sender::Http2(mut s) => s.try_send_request(req).await,
            };
            match sent {
                Ok(response) => return Ok(response),
                Err(err) => {
                    req = retry_or_fail(err, reused, head)?;
                    may_reuse = false;
                }
            }
        }
    }

    /// A ready connection to `target` along `via`, if there is one; closed ones are dropped on
    /// the way. An HTTP/1 connection leaves the pool until [`Self::checkin`].
    fn checkout(&self, target: SocketAddr, via: &Via, h2: bool) -> Option<Sender<B>> {
        let mut conns = self.conns.lock().expect("upstream pool lock");
        let list = conns.get_mut(&target)?;
        list.retain(|c| !c.sender.is_closed());
        let index = list.iter().position(|c| {
            matches!(c.sender, Sender::Http2(_)) == h2 && c.sender.is_ready() && c.via == *via
        })?;
        let conn = &mut list[index];
        match &conn.sender {
            Sender::Http2(s) => {
                let s = s.clone();
                conn.used = Instant::now();
                Some(Sender::Http2(s))
            }
            Sender::Http1(_) => Some(list.swap_remove(index).sender),
        }
    }

    fn checkin(&self, target: SocketAddr, via: &Via, sender: Sender<B>) {
        let conn = Conn { via: via.clone(), sender, used: Instant::now() };
        self.conns.lock().expect("upstream pool lock").entry(target).or_default().push(conn);
    }

    /// A new connection to `target`; an HTTP/2 one is pooled at once, as other requests can
    /// share it while this one runs.
    async fn connect(&self, target: SocketAddr, via: &Via, h2: bool) -> Result<Sender<B>, UpstreamError> {
        let sender = match via {
            Via::Direct => {
                let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(target))
                    .await
                    .map_err(|_| UpstreamError::ConnectTimeout)?
                    .map_err(UpstreamError::Connect)?;
                let _ = tcp.set_nodelay(true);
                handshake(TokioIo::new(tcp), h2).await?
            }
            Via::Tunnel { src, dst, node, node_name } => {
                let pool = self.hbone.as_ref().ok_or(UpstreamError::NoHbone)?;
                // Pooled: the tunnel carries requests of many clients, so it names none.
                let tunnel = pool.connect(src, dst, *node, node_name, target, None).await?;
                self.stats.hbone_tunnels.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                handshake(TokioIo::new(tunnel), h2).await?
            }
        };
        if let Sender::Http2(s) = &sender {
            self.checkin(target, via, Sender::Http2(s.clone()));
        }
        Ok(sender)
    }
}

/// The request to try again after a send on a reused connection failed: the one hyper handed
/// back unsent, or, when the connection closed or was reset before the response was complete,
/// one made again from `head` (kept only for idempotent requests without a body). Any other
/// failure is final.
fn retry_or_fail<B: Replay>(
    mut err: TrySendError<Request<B>>,
    reused: bool,
    head: Option<Head>,
) -> Result<Request<B>, UpstreamError> {
    if !reused {
        return Err(UpstreamError::Http(err.into_error()));
    }
    if let Some(req) = err.take_message() {
        debug!(error = %err.error(), "pooled connection closed before use; retrying on a new one");
        return Ok(req);
    }
    match head {
        Some(head) if closed_early(err.error()) => {
            debug!(error = %err.error(), "pooled connection closed before a response; sending again on a new one");
            Ok(head.into_request())
        }
        _ => Err(UpstreamError::Http(err.into_error())),
    }
}

/// Whether a send failed because the connection closed or was reset before the response was
/// complete, rather than for a reason of the request's own.
fn closed_early(err: &hyper::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    err.is_incomplete_message()
        || std::error::Error::source(err)
            .and_then(|source| source.downcast_ref::<std::io::Error>())
            .is_some_and(|io| {
                matches!(io.kind(), ConnectionReset | BrokenPipe | ConnectionAborted | UnexpectedEof)
            })
}

/// HTTP over `io`, its connection driven by a task of its own.
async fn handshake<T, B>(io: T, h2: bool) -> Result<Sender<B>, hyper::Error>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if h2 {
        let (sender, conn) = http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(drive(conn, "HTTP/2"));
        Ok(Sender::Http2(sender))
    } else {
        let (sender, conn) = http1::handshake(io).await?;
        tokio::spawn(drive(conn, "HTTP/1"));
        Ok(Sender::Http1(sender))
    }
}

/// Runs one upstream connection until it ends.
async fn drive(conn: impl Future<Output = Result<(), hyper::Error>>, protocol: &'static str) {
    if let Err(err) = conn.await {
        debug!(error = %err, protocol, "upstream connection ended with an error");
    }
}

/// Every `every`, until the pool is gone, closes the connections [`reap_idle`] finds.
async fn reap<B>(conns: Weak<Conns<B>>, every: Duration, idle: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(conns) = conns.upgrade() else { return };
        reap_idle(&conns, Instant::now(), idle);
    }
}

/// Drops closed connections, and those no request has used for `idle` at `now`. Only ready
/// ones: an HTTP/1 connection still reading a long response is busy, not idle.
fn reap_idle<B>(conns: &Conns<B>, now: Instant, idle: Duration) {
    let mut conns = conns.lock().expect("upstream pool lock");
    conns.retain(|_, list| {
        list.retain(|c| {
            !c.sender.is_closed() && !(c.sender.is_ready() && now.duration_since(c.used) >= idle)
        });
        !list.is_empty()
    });
}

#[cfg(test)]
mod tests;
