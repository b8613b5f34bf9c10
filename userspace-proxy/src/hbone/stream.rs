//! One HBONE stream (an HTTP/2 CONNECT stream) as a byte stream that tokio's I/O traits can
//! read and write.
//!
//! Writes go straight into the stream's send half, within the flow-control window the peer
//! has granted; reads hand out the DATA frames as they arrive and return their window to the
//! peer. Both halves live in the task that uses the stream, so a write costs one copy into a
//! frame and no hand-off to another task.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf as _, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most one write queues: a bigger write is taken in part, as a short write, so one call
/// never reserves more than one of the tunnel's largest frames.
const MAX_WRITE: usize = super::MAX_FRAME as usize;

pub struct TunnelStream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// The rest of the last DATA frame, not yet read.
    pending: Bytes,
}

impl TunnelStream {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self { send, recv, pending: Bytes::new() }
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
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(chunk)) => {
                    // The window goes back to the peer as soon as the frame is ours: at most
                    // one frame waits here.
                    let _ = self.recv.flow_control().release_capacity(chunk.len());
                    self.pending = chunk;
                }
                // A stream the peer reset with NO_ERROR after sending its last byte reads as
                // the end.
                Some(Err(err)) if err.reason() == Some(h2::Reason::NO_ERROR) => return Poll::Ready(Ok(())),
                Some(Err(err)) => return Poll::Ready(Err(io_error(err))),
                None => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let want = buf.len().min(MAX_WRITE);
        self.send.reserve_capacity(want);
        // `poll_capacity` reports increases only; what is already granted is `capacity`.
        while self.send.capacity() == 0 {
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(err)) => return Poll::Ready(Err(io_error(err))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
        let n = self.send.capacity().min(want);
        self.send.send_data(Bytes::copy_from_slice(&buf[..n]), false).map_err(io_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection's task writes queued frames out as soon as it runs.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // END_STREAM on an empty DATA frame, and no more capacity asked for.
        self.send.reserve_capacity(0);
        match self.send.send_data(Bytes::new(), true) {
            Ok(()) => Poll::Ready(Ok(())),
            // A stream already closed (a user error to h2, with no reason) or reset has nothing
            // more to end.
            Err(err) if err.is_reset() || (!err.is_io() && err.reason().is_none()) => Poll::Ready(Ok(())),
            Err(err) => Poll::Ready(Err(io_error(err))),
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
            TunnelStream::new(send, req.into_body())
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
        (TunnelStream::new(send, response.into_body()), server.await.expect("server side"))
    }

    fn pattern(len: usize, modulus: usize) -> Vec<u8> {
        (0..len).map(|i| (i % modulus) as u8).collect()
    }

    /// Writes `data`, ends the stream, and reads the other side to its end.
    async fn exchange(stream: TunnelStream, data: Vec<u8>) -> Vec<u8> {
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

    #[tokio::test]
    async fn bulk_both_ways_past_the_window_arrives_whole_and_ends_cleanly() {
        let (client, server) = pair().await;
        let (up, down) = (pattern(3 << 20, 251), pattern(2 << 20, 241));
        // Bounded: a window never returned would stall the transfer, not end it.
        let (at_server, at_client) = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            tokio::join!(exchange(server, down.clone()), exchange(client, up.clone()))
        })
        .await
        .expect("the transfer stalled: flow-control windows are not coming back");
        assert!(at_server == up, "the server got {} of {} bytes, or others", at_server.len(), up.len());
        assert!(at_client == down, "the client got {} of {} bytes, or others", at_client.len(), down.len());
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
