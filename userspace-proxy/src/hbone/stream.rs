//! One HBONE stream (an HTTP/2 CONNECT stream) as a byte stream that tokio's I/O traits can
//! read and write.
//!
//! Writes go straight into the stream's send half, within the flow-control window the peer
//! has granted; reads hand out the DATA frames as they arrive and return their window to the
//! peer. Both halves live in the task that uses the stream, so a write costs one copy into a
//! frame and no hand-off to another task. A tunnel that only joins a TCP connection (L4, and
//! the inbound side's leg to the pod) uses [`TunnelStream::relay`] instead, which skips the
//! copies that the traits' caller-owned buffers imply.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf as _, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

/// Below this much room left in the block, the relay takes a new block before it reads.
const RELAY_MIN_READ: usize = 4 * 1024;

/// How a tunnel moves bytes ([`crate::ProxyConfig`]'s relay block and HTTP/2 frame size).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Relay {
    /// What [`TunnelStream::relay`] allocates at a time for reads from the socket: as much as a
    /// bulk transfer reads in one call. Small messages share one such block, each read taking
    /// the next part of it.
    pub block: usize,
    /// The most one write queues: a bigger write is taken in part, as a short write, so one
    /// call never reserves more than one of the tunnel's largest frames.
    pub max_write: usize,
}

pub struct TunnelStream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// The rest of the last DATA frame, not yet read.
    pending: Bytes,
    relay: Relay,
}

impl TunnelStream {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream, relay: Relay) -> Self {
        Self { send, recv, pending: Bytes::new(), relay }
    }
}

/// An HTTP/2 error as I/O: the connection's own I/O errors pass through; a stream the peer
/// ended (NO_ERROR) or cancelled is a broken pipe, any other reason a reset.
fn io_error(err: h2::Error) -> io::Error {
    if err.is_io() {
        return err.into_io().unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"));
    }
    let kind = match err.reason() {
        Some(h2::Reason::NO_ERROR | h2::Reason::CANCEL) => io::ErrorKind::BrokenPipe,
        _ => io::ErrorKind::ConnectionReset,
    };
    io::Error::new(kind, err)
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(poll_frame(&mut self.recv, cx))? {
                Some(chunk) => self.pending = chunk,
                None => return Poll::Ready(Ok(())),
            }
        }
    }
}

/// The next DATA frame's payload, or `None` at the stream's end. The window goes back to the
/// peer as soon as the frame is ours: at most one frame waits on this side.
fn poll_frame(recv: &mut RecvStream, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
    Poll::Ready(match ready!(recv.poll_data(cx)) {
        Some(Ok(chunk)) => {
            let _ = recv.flow_control().release_capacity(chunk.len());
            Ok(Some(chunk))
        }
        // A stream the peer reset with NO_ERROR after sending its last byte reads as the end.
        Some(Err(err)) if err.reason() == Some(h2::Reason::NO_ERROR) => Ok(None),
        Some(Err(err)) => Err(io_error(err)),
        None => Ok(None),
    })
}

/// Waits for window to send up to `want` bytes (at most one of the tunnel's largest frames);
/// returns how many may be sent now.
fn poll_send_capacity(
    send: &mut SendStream<Bytes>,
    cx: &mut Context<'_>,
    want: usize,
    max_write: usize,
) -> Poll<io::Result<usize>> {
    let want = want.min(max_write);
    send.reserve_capacity(want);
    // `poll_capacity` reports increases only; what is already granted is `capacity`.
    while send.capacity() == 0 {
        match ready!(send.poll_capacity(cx)) {
            Some(Ok(_)) => {}
            Some(Err(err)) => return Poll::Ready(Err(io_error(err))),
            None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }
    Poll::Ready(Ok(send.capacity().min(want)))
}

impl AsyncWrite for TunnelStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let max_write = self.relay.max_write;
        let n = ready!(poll_send_capacity(&mut self.send, cx, buf.len(), max_write))?;
        self.send.send_data(Bytes::copy_from_slice(&buf[..n]), false).map_err(io_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection's task writes queued frames out as soon as it runs.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(end_stream(&mut self.send))
    }
}

/// END_STREAM on an empty DATA frame, and no more capacity asked for.
fn end_stream(send: &mut SendStream<Bytes>) -> io::Result<()> {
    send.reserve_capacity(0);
    match send.send_data(Bytes::new(), true) {
        Ok(()) => Ok(()),
        // A stream already closed (a user error to h2, with no reason) or reset has nothing more
        // to end.
        Err(err) if err.is_reset() || (!err.is_io() && err.reason().is_none()) => Ok(()),
        Err(err) => Err(io_error(err)),
    }
}

impl TunnelStream {
    /// Joins the tunnel to a TCP connection and carries bytes both ways until both directions
    /// have ended; returns the bytes carried from the socket into the tunnel and from the
    /// tunnel to the socket. An end of one direction (EOF on the socket, END_STREAM on the
    /// tunnel) is passed on as the same end on the other side, and the other direction goes on.
    ///
    /// A copy through the [`AsyncRead`] and [`AsyncWrite`] traits costs each byte one more copy
    /// on each side: from the socket into a buffer and from there into a frame, and from a
    /// received frame into a buffer and from there to the socket. Here the socket is read
    /// straight into memory that becomes the DATA frame, and a received frame is written to the
    /// socket from the memory h2 received it in.
    pub async fn relay(self, tcp: &mut TcpStream) -> io::Result<(u64, u64)> {
        let Self { mut send, mut recv, pending, relay } = self;
        let mut up = Upward { block: BytesMut::new(), queued: Bytes::new(), done: false, bytes: 0, relay };
        let mut down = Downward { out: pending, ended: false, done: false, bytes: 0 };
        std::future::poll_fn(|cx| {
            if !up.done
                && let Poll::Ready(result) = up.poll(cx, tcp, &mut send)
            {
                result?;
                up.done = true;
            }
            if !down.done
                && let Poll::Ready(result) = down.poll(cx, tcp, &mut recv)
            {
                result?;
                down.done = true;
            }
            if up.done && down.done { Poll::Ready(Ok((up.bytes, down.bytes))) } else { Poll::Pending }
        })
        .await
    }
}

/// The relay's socket-to-tunnel direction.
struct Upward {
    /// Memory the next read goes into; what a read fills is split off as a frame's payload.
    block: BytesMut,
    /// Read from the socket, not yet given to h2 for want of flow-control window.
    queued: Bytes,
    done: bool,
    bytes: u64,
    relay: Relay,
}

impl Upward {
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        tcp: &mut TcpStream,
        send: &mut SendStream<Bytes>,
    ) -> Poll<io::Result<()>> {
        loop {
            while !self.queued.is_empty() {
                let n = ready!(poll_send_capacity(send, cx, self.queued.len(), self.relay.max_write))?;
                send.send_data(self.queued.split_to(n), false).map_err(io_error)?;
                self.bytes += n as u64;
            }
            if self.block.capacity() - self.block.len() < RELAY_MIN_READ {
                // Takes the old block back if h2 has written and dropped every frame cut from
                // it; otherwise allocates a new one.
                self.block.reserve(self.relay.block);
            }
            // Through `AsyncRead`, not `try_read_buf`: a read that leaves room in the block has
            // drained the socket, and tokio then waits for the next event rather than calling
            // recv(2) once more only to be told EAGAIN (one system call per message saved).
            match ready!(tokio_util::io::poll_read_buf(Pin::new(&mut *tcp), cx, &mut self.block))? {
                0 => return Poll::Ready(end_stream(send)),
                _ => self.queued = self.block.split().freeze(),
            }
        }
    }
}

/// The relay's tunnel-to-socket direction.
struct Downward {
    /// The rest of the last DATA frame, not yet written to the socket.
    out: Bytes,
    /// The tunnel has ended; what is left is to end the socket's sending side.
    ended: bool,
    done: bool,
    bytes: u64,
}

impl Downward {
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        tcp: &mut TcpStream,
        recv: &mut RecvStream,
    ) -> Poll<io::Result<()>> {
        loop {
            while !self.out.is_empty() {
                let n = ready!(Pin::new(&mut *tcp).poll_write(cx, &self.out))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.out.advance(n);
                self.bytes += n as u64;
            }
            if self.ended {
                return Pin::new(&mut *tcp).poll_shutdown(cx);
            }
            match ready!(poll_frame(recv, cx))? {
                Some(chunk) => self.out = chunk,
                None => self.ended = true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// Both ends of one CONNECT stream, over an in-memory HTTP/2 connection whose windows are
    /// HTTP/2's smallest default (64 KiB), so transfers larger than that wait on flow control.
    async fn pair() -> (TunnelStream, TunnelStream) {
        let (a, b) = tokio::io::duplex(16 * 1024);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(b).await.expect("server handshake");
            let (req, mut respond) = conn.accept().await.expect("a stream").expect("accepted");
            let send = respond.send_response(http::Response::new(()), false).expect("200");
            // Accepting is what drives the connection.
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            TunnelStream::new(send, req.into_body(), relay())
        });
        let (sender, conn) = h2::client::handshake(a).await.expect("client handshake");
        tokio::spawn(conn);
        let mut sender = sender.ready().await.expect("ready");
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("10.0.0.1:80")
            .body(())
            .expect("request");
        let (response, send) = sender.send_request(req, false).expect("CONNECT sent");
        let response = response.await.expect("response");
        assert_eq!(response.status(), http::StatusCode::OK);
        (TunnelStream::new(send, response.into_body(), relay()), server.await.expect("server side"))
    }

    fn relay() -> Relay {
        crate::ProxyConfig::default().relay()
    }

    fn pattern(len: usize, modulus: usize) -> Vec<u8> {
        (0..len).map(|i| (i % modulus) as u8).collect()
    }

    /// The two ends of a TCP connection on loopback.
    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind on loopback");
        let addr = listener.local_addr().expect("bound address");
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.expect("connect on loopback"), b.expect("accept on loopback").0)
    }

    /// Writes `data`, ends the stream, and reads the other side to its end.
    async fn exchange<S: AsyncRead + AsyncWrite>(stream: S, data: Vec<u8>) -> Vec<u8> {
        let (mut r, mut w) = tokio::io::split(stream);
        let write = async {
            w.write_all(&data).await.expect("write");
            w.shutdown().await.expect("shutdown");
        };
        let read = async {
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.expect("read to the end");
            got
        };
        tokio::join!(write, read).1
    }

    /// 3 MiB from the client's end and 2 MiB back from the far end at once, each side ending
    /// its stream after writing; both must arrive whole. Returns the sizes sent (up, down).
    async fn bulk_both_ways<A, B>(client: A, far: B) -> (usize, usize)
    where
        A: AsyncRead + AsyncWrite,
        B: AsyncRead + AsyncWrite,
    {
        let (up, down) = (pattern(3 << 20, 251), pattern(2 << 20, 241));
        // Bounded: a window never returned would stall the transfer, not end it.
        let (at_far, at_client) = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            tokio::join!(exchange(far, down.clone()), exchange(client, up.clone()))
        })
        .await
        .expect("the transfer stalled: flow-control windows are not coming back");
        assert!(at_far == up, "the far end got {} of {} bytes, or others", at_far.len(), up.len());
        assert!(at_client == down, "the client got {} of {} bytes, or others", at_client.len(), down.len());
        (up.len(), down.len())
    }

    #[tokio::test]
    async fn bulk_both_ways_past_the_window_arrives_whole_and_ends_cleanly() {
        let (client, server) = pair().await;
        bulk_both_ways(client, server).await;
    }

    #[tokio::test]
    async fn relay_carries_bulk_both_ways_and_counts_it() {
        let (client, server) = pair().await;
        let (pod, mut joined) = tcp_pair().await;
        let relay = tokio::spawn(async move { server.relay(&mut joined).await });
        let (up, down) = bulk_both_ways(client, pod).await;
        let counts = relay.await.expect("relay task").expect("the relay ends without an error");
        assert_eq!(counts, (down as u64, up as u64), "(socket to tunnel, tunnel to socket)");
    }

    #[tokio::test]
    async fn relay_keeps_small_messages_whole_and_in_order_across_its_blocks() {
        let (mut client, server) = pair().await;
        let (mut pod, mut joined) = tcp_pair().await;
        let relay = tokio::spawn(async move { server.relay(&mut joined).await });
        // Requests and answers of varied sizes, one at a time as keep-alive HTTP goes: each
        // read by the relay takes the next part of its block, and 300 of them use up several.
        let pod_side = async move {
            let mut got = Vec::new();
            for i in 0..300usize {
                let mut request = vec![0u8; 100 + i * 7];
                pod.read_exact(&mut request).await.expect("a whole request at the pod");
                got.push(request);
                pod.write_all(&pattern(1024 + i, 253 - i % 7)).await.expect("answer");
            }
            pod.shutdown().await.expect("pod ends");
            let mut rest = Vec::new();
            pod.read_to_end(&mut rest).await.expect("the client's end reaches the pod");
            assert!(rest.is_empty(), "{} bytes more than the requests", rest.len());
            got
        };
        let client_side = async move {
            let mut got = Vec::new();
            for i in 0..300usize {
                client.write_all(&pattern(100 + i * 7, 250 - i % 5)).await.expect("request");
                let mut answer = vec![0u8; 1024 + i];
                client.read_exact(&mut answer).await.expect("a whole answer at the client");
                got.push(answer);
            }
            client.shutdown().await.expect("client ends");
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).await.expect("the pod's end reaches the client");
            assert!(rest.is_empty(), "{} bytes more than the answers", rest.len());
            got
        };
        let (at_pod, at_client) = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            tokio::join!(pod_side, client_side)
        })
        .await
        .expect("the exchange stalled");
        for (i, (request, answer)) in at_pod.iter().zip(&at_client).enumerate() {
            assert!(*request == pattern(100 + i * 7, 250 - i % 5), "request {i} arrived changed");
            assert!(*answer == pattern(1024 + i, 253 - i % 7), "answer {i} arrived changed");
        }
        let counts = relay.await.expect("relay task").expect("the relay ends without an error");
        let up: usize = (0..300).map(|i| 100 + i * 7).sum();
        let down: usize = (0..300).map(|i| 1024 + i).sum();
        assert_eq!(counts, (down as u64, up as u64), "(socket to tunnel, tunnel to socket)");
    }

    #[tokio::test]
    async fn relay_passes_an_end_on_and_keeps_the_other_direction_open() {
        let (client, server) = pair().await;
        let (mut pod, mut joined) = tcp_pair().await;
        let relay = tokio::spawn(async move { server.relay(&mut joined).await });
        let (mut from_tunnel, mut to_tunnel) = tokio::io::split(client);
        // The client says all it has to say and ends its side first: the pod must read that as
        // EOF while the relay still runs, waiting on the pod's side.
        to_tunnel.write_all(b"hello, and that is all").await.expect("client writes");
        to_tunnel.shutdown().await.expect("client ends its side");
        let mut at_pod = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(30), pod.read_to_end(&mut at_pod))
            .await
            .expect("the client's end must reach the pod")
            .expect("the pod reads to the end");
        assert_eq!(at_pod, b"hello, and that is all");
        // The other direction still carries bytes, and its end reaches the client as the
        // stream's end, not a reset.
        pod.write_all(b"heard you").await.expect("pod writes after the client's end");
        pod.shutdown().await.expect("pod ends");
        let mut got = Vec::new();
        from_tunnel.read_to_end(&mut got).await.expect("the client reads the pod's end as the end");
        assert_eq!(got, b"heard you");
        let counts = relay.await.expect("relay task").expect("the relay ends without an error");
        assert_eq!(counts, (9, 22));
    }

    #[tokio::test]
    async fn relay_ends_with_an_error_when_the_peer_resets_the_tunnel() {
        let (mut client, server) = pair().await;
        let (_pod, mut joined) = tcp_pair().await;
        let relay = tokio::spawn(async move { server.relay(&mut joined).await });
        client.send.send_reset(h2::Reason::INTERNAL_ERROR);
        let result = tokio::time::timeout(std::time::Duration::from_secs(30), relay)
            .await
            .expect("a reset must end the relay")
            .expect("relay task");
        let err = result.expect_err("a reset is not a clean end");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    }

    #[tokio::test]
    async fn writes_stop_at_the_window_the_peer_granted() {
        let (mut client, _server) = pair().await;
        // Nobody reads at the server and the connection's task cannot run between these polls,
        // so no window comes back: writes must go Pending once the 64 KiB window is used, not
        // keep buffering.
        let chunk = [7u8; 16 * 1024];
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut accepted = 0usize;
        for _ in 0..1000 {
            match Pin::new(&mut client).poll_write(&mut cx, &chunk) {
                Poll::Ready(Ok(n)) => accepted += n,
                Poll::Ready(Err(err)) => panic!("write failed: {err}"),
                Poll::Pending => break,
            }
        }
        assert!(accepted > 0, "no write was taken at all");
        assert!(accepted <= 65_535, "{accepted} bytes taken past a 65 535-byte window");
    }

    #[tokio::test]
    async fn a_reset_stream_reads_as_an_error_not_as_the_end() {
        let (mut client, mut server) = pair().await;
        server.send.send_data(Bytes::from_static(b"partial"), false).expect("data");
        server.send.send_reset(h2::Reason::INTERNAL_ERROR);
        let mut got = Vec::new();
        let err = client.read_to_end(&mut got).await.expect_err("a reset is not an end of stream");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        // The write side learns of the reset too.
        let err = client.write_all(b"more").await.expect_err("writing to a reset stream");
        assert!(matches!(err.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe), "{err}");
    }
}
