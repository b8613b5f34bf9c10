//! A read-ahead buffer between a TLS connection between nodes and its socket.
//!
//! rustls asks its transport for at most 4 KiB per read, whatever the socket holds: a TLS
//! record of 16 KiB took four or five read(2) calls, so a bulk transfer cost a system call per
//! 4 KiB on the receiving node (and one more, answered EAGAIN, each time the socket ran dry).
//! [`ReadAhead`] reads up to a block (the proxy's relay block) per read(2) and hands rustls its 4 KiB from
//! memory. The copy this adds is cheap next to the system calls it saves.
//!
//! Only a stream that fills rustls's reads goes through the buffer. A read that the socket
//! cannot fill (a request's few hundred bytes) goes straight into rustls's memory, as it did
//! without this; a read that it fills says more is waiting, and the reads after it take
//! blocks, until one finds the socket empty. The buffer is allocated for such a spell and
//! given back at its end, so a connection that carries requests never holds or allocates one
//! (a block allocated and freed per request costs more than the copy saves).
//!
//! Nothing is held back while the reader waits: `Pending` is returned only when the buffer is
//! empty and the socket has nothing, with the socket's waker registered. Writes pass through.

use std::{
    io::{self, IoSlice},
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `io` with reads made in blocks of up to `block` bytes while a stream fills them.
pub(crate) struct ReadAhead<T> {
    io: T,
    /// Largest read(2) on the socket (64 KiB: four full TLS records).
    block: usize,
    /// Read from `io`, not yet handed to the reader.
    ahead: BytesMut,
    /// The last read from `io` filled what it was given: read in blocks until `io` runs dry.
    streaming: bool,
}

impl<T> ReadAhead<T> {
    pub(crate) fn new(io: T, block: usize) -> Self {
        Self { io, block, ahead: BytesMut::new(), streaming: false }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if this.ahead.is_empty() {
            if !this.streaming || buf.remaining() >= this.block {
                // Small messages, or a read as large as a block: no reason to copy.
                let (before, wanted) = (buf.filled().len(), buf.remaining());
                ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
                this.streaming = buf.filled().len() - before == wanted;
                return Poll::Ready(Ok(()));
            }
            // Takes the whole allocation back when the last block was all handed out.
            this.ahead.reserve(this.block);
            let read = tokio_util::io::poll_read_buf(Pin::new(&mut this.io), cx, &mut this.ahead);
            if read.is_pending() {
                // The spell is over.
                this.ahead = BytesMut::new();
                this.streaming = false;
            }
            if ready!(read)? == 0 {
                return Poll::Ready(Ok(()));
            }
        }
        let n = buf.remaining().min(this.ahead.len());
        buf.put_slice(&this.ahead[..n]);
        this.ahead.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
