//! One write(2) (and over TLS, one record) for everything an HTTP/2 connection sends in one
//! poll: HBONE connections between nodes, and HTTP/2 (gRPC) connections with pods.
//!
//! h2 writes a DATA frame's payload of 256 bytes or more as a chain (frame head, then the
//! payload from the caller's memory) and flushes before it buffers the next frame. Over TLS,
//! every flush is a record sealed and a system call; so a node answering many streams at once
//! wrote one record and made one write(2) per response, however many responses were ready in
//! the same turn of the connection's task. Each write to a socket also carries the kernel's
//! receive path for the peer, the largest single cost of a request through two proxies.
//!
//! [`corked`] splits a connection's I/O in two. h2 gets [`Corked`], which copies frames below
//! [`PASS_THROUGH`] into a buffer and, while [`Cork::drive`] polls the connection, treats h2's
//! flushes as "done for now" rather than "write now". The driver then writes the buffer once,
//! after each poll of the connection, when h2 has encoded everything that poll made ready. A
//! flush asked for outside the driver's poll (the handshake, or a connection that something
//! else polls, as hyper's HTTP/2 client does from a task of its own) writes at once.
//! Nothing waits longer than that poll: a lone response goes out at the end of the poll that
//! encoded it, as before. Large writes (bulk transfers) go to TLS as they come, after what is
//! buffered, without the copy.
//!
//! The same holds without TLS, on HTTP/2 connections with pods (hyper drives h2 the same way):
//! a unary gRPC answer (headers, a DATA frame, trailers) left in two writes, and a connection
//! carrying many calls wrote each answer on its own. HTTP/1.1 gains nothing from it (hyper
//! writes a response's head and body in one writev already) and is not corked.

use std::{
    future::Future,
    io::{self, IoSlice},
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Writes of at least this many bytes are not copied: they follow what is buffered straight to
/// the I/O. TLS seals up to 16 KiB per record, so a batch below this is one record.
pub(crate) const PASS_THROUGH: usize = 16 * 1024;

/// Splits `io` into the half h2 reads and writes and the half that flushes it.
pub(crate) fn corked<T>(io: T) -> (Corked<T>, Cork<T>) {
    let shared = Arc::new(Mutex::new(Shared {
        io,
        buf: Vec::with_capacity(PASS_THROUGH),
        in_poll: false,
        dirty: false,
        failed: None,
    }));
    (Corked(shared.clone()), Cork(shared))
}

struct Shared<T> {
    io: T,
    /// Bytes accepted from h2, not yet given to `io`.
    buf: Vec<u8>,
    /// The driver is polling the connection and flushes when that poll ends, so h2's own
    /// flushes may wait for it.
    in_poll: bool,
    /// Written since `io` was last flushed.
    dirty: bool,
    /// A write or flush the driver made failed: the connection is broken, and h2 learns it
    /// from its next read or write.
    failed: Option<(io::ErrorKind, String)>,
}

fn lock<T>(shared: &Mutex<Shared<T>>) -> MutexGuard<'_, Shared<T>> {
    // A panic while holding it leaves nothing half-done that a later caller could misread:
    // the buffer holds whole writes, and `io` is as consistent as after any failed write.
    shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<T: AsyncWrite + Unpin> Shared<T> {
    fn check(&self) -> io::Result<()> {
        match &self.failed {
            None => Ok(()),
            Some((kind, msg)) => Err(io::Error::new(*kind, msg.clone())),
        }
    }

    /// Gives everything buffered to `io`.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut at = 0;
        let result = loop {
            if at == self.buf.len() {
                break Poll::Ready(Ok(()));
            }
            match Pin::new(&mut self.io).poll_write(cx, &self.buf[at..]) {
                Poll::Ready(Ok(0)) => break Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => at += n,
                Poll::Ready(Err(err)) => break Poll::Ready(Err(err)),
                Poll::Pending => break Poll::Pending,
            }
        };
        self.buf.drain(..at);
        if at > 0 {
            self.dirty = true;
        }
        result
    }

    /// Gives everything buffered to `io` and flushes it.
    fn poll_flush_all(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        if self.dirty {
            ready!(Pin::new(&mut self.io).poll_flush(cx))?;
            self.dirty = false;
        }
        Poll::Ready(Ok(()))
    }

    fn poll_write_slices(&mut self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        self.check()?;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if self.buf.len() + total > PASS_THROUGH {
            ready!(self.poll_drain(cx))?;
        }
        if total >= PASS_THROUGH {
            self.dirty = true;
            return Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            self.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(total))
    }
}

/// The half of a corked connection that h2 reads from and writes to.
pub(crate) struct Corked<T>(Arc<Mutex<Shared<T>>>);

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Corked<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let mut shared = lock(&self.0);
        shared.check()?;
        Pin::new(&mut shared.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Corked<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        lock(&self.0).poll_write_slices(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        lock(&self.0).poll_write_slices(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut shared = lock(&self.0);
        shared.check()?;
        if shared.in_poll {
            // The driver writes it all when this poll of the connection ends.
            return Poll::Ready(Ok(()));
        }
        shared.poll_flush_all(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut shared = lock(&self.0);
        shared.check()?;
        ready!(shared.poll_flush_all(cx))?;
        Pin::new(&mut shared.io).poll_shutdown(cx)
    }
}

/// The half of a corked connection that writes out what h2 left in the buffer.
pub(crate) struct Cork<T>(Arc<Mutex<Shared<T>>>);

impl<T: AsyncWrite + Unpin> Cork<T> {
    /// Runs `connection` (a future that polls the h2 connection given the [`Corked`] half),
    /// writing out and flushing what it buffered after each of its polls. A connection that
    /// ends normally has shut its I/O down, which writes out what is left; one that ends on an
    /// error gets one more attempt, and no wait.
    pub(crate) async fn drive<F: Future>(self, connection: F) -> F::Output {
        let mut connection = std::pin::pin!(connection);
        std::future::poll_fn(|cx| {
            lock(&self.0).in_poll = true;
            let out = connection.as_mut().poll(cx);
            let mut shared = lock(&self.0);
            shared.in_poll = false;
            if shared.failed.is_none()
                && let Poll::Ready(Err(err)) = shared.poll_flush_all(cx)
            {
                shared.failed = Some((err.kind(), err.to_string()));
                // h2 hears of it at its next read or write, in the next poll.
                cx.waker().wake_by_ref();
            }
            out
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An I/O that records each write it is given and accepts at most `room` bytes until
    /// `room` is raised; a full one wakes the writer when room is made.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        flushes: usize,
        room: usize,
        waker: Option<std::task::Waker>,
        fail: bool,
    }

    #[derive(Clone, Default)]
    struct Io(Arc<Mutex<Recorder>>);

    impl Io {
        fn with_room(room: usize) -> Self {
            let io = Io::default();
            io.0.lock().unwrap().room = room;
            io
        }
        fn writes(&self) -> Vec<Vec<u8>> {
            self.0.lock().unwrap().writes.clone()
        }
        fn received(&self) -> Vec<u8> {
            self.writes().concat()
        }
        fn make_room(&self, room: usize) {
            let mut r = self.0.lock().unwrap();
            r.room = room;
            if let Some(w) = r.waker.take() {
                w.wake();
            }
        }
    }

    impl AsyncRead for Io {
        fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Io {
        fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            let mut r = self.0.lock().unwrap();
            if r.fail {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "peer gone")));
            }
            let n = buf.len().min(r.room);
            if n == 0 {
                r.waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            r.room -= n;
            r.writes.push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.0.lock().unwrap().flushes += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Bounds a test's wait: a cork that loses a wakeup fails the test instead of hanging it.
    async fn bounded<F: Future>(wait: F) -> F::Output {
        tokio::time::timeout(std::time::Duration::from_secs(10), wait).await.expect("the cork stalled")
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    /// Writes `frames` as h2 does with a chained DATA frame: each as head and payload in one
    /// vectored write, each followed by a flush.
    fn write_frames(corked: &mut Corked<Io>, cx: &mut Context<'_>, frames: &[Vec<u8>]) {
        for frame in frames {
            let (head, payload) = frame.split_at(9.min(frame.len()));
            let mut left = frame.len();
            while left > 0 {
                let done = frame.len() - left;
                let slices = if done < head.len() {
                    vec![IoSlice::new(&head[done..]), IoSlice::new(payload)]
                } else {
                    vec![IoSlice::new(&payload[done - head.len()..])]
                };
                match Pin::new(&mut *corked).poll_write_vectored(cx, &slices) {
                    Poll::Ready(Ok(n)) => left -= n,
                    other => panic!("write did not complete: {other:?}"),
                }
            }
            assert!(matches!(Pin::new(&mut *corked).poll_flush(cx), Poll::Ready(Ok(()))));
        }
    }

    #[tokio::test]
    async fn frames_made_in_one_poll_go_out_as_one_write_after_it() {
        let io = Io::with_room(usize::MAX);
        let (mut corked, cork) = corked(io.clone());
        let frames: Vec<Vec<u8>> = (0..5).map(|i| pattern(1100 + i, i as u8)).collect();
        let want = frames.concat();
        let seen_inside = Arc::new(Mutex::new(None));
        let seen = seen_inside.clone();
        let probe = io.clone();
        let mut polled = false;
        bounded(cork.drive(std::future::poll_fn(move |cx| {
            if !polled {
                polled = true;
                write_frames(&mut corked, cx, &frames);
                // h2's flushes waited: nothing has reached the I/O inside the poll.
                *seen.lock().unwrap() = Some(probe.writes().len());
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(())
        })))
        .await;
        assert_eq!(*seen_inside.lock().unwrap(), Some(0));
        assert_eq!(io.writes().len(), 1, "one write for the five frames");
        assert_eq!(io.received(), want);
        assert_eq!(io.0.lock().unwrap().flushes, 1);
    }

    #[tokio::test]
    async fn a_connection_not_yet_driven_flushes_when_asked() {
        // The handshake runs before the driver: its flushes must reach the I/O.
        let io = Io::with_room(usize::MAX);
        let (mut corked, _cork) = corked(io.clone());
        std::future::poll_fn(|cx| {
            write_frames(&mut corked, cx, &[pattern(24, 1), pattern(40, 2)]);
            Poll::Ready(())
        })
        .await;
        assert_eq!(io.writes(), vec![pattern(24, 1), pattern(40, 2)]);
        assert_eq!(io.0.lock().unwrap().flushes, 2);
    }

    #[tokio::test]
    async fn a_flush_from_outside_the_drivers_poll_writes_at_once() {
        // hyper's HTTP/2 client polls h2 from a task of its own: a flush there must not wait
        // for a driver that nothing wakes.
        let io = Io::with_room(usize::MAX);
        let (mut corked, cork) = corked(io.clone());
        let driver = tokio::spawn(cork.drive(std::future::pending::<()>()));
        tokio::task::yield_now().await;
        {
            use tokio::io::AsyncWriteExt as _;
            corked.write_all(&pattern(700, 7)).await.unwrap();
            corked.flush().await.unwrap();
        }
        // The driver has not run since: the flush itself wrote.
        assert_eq!(io.writes(), vec![pattern(700, 7)]);
        driver.abort();
    }

    #[tokio::test]
    async fn large_writes_pass_through_after_what_is_buffered() {
        let io = Io::with_room(usize::MAX);
        let (mut corked, cork) = corked(io.clone());
        let small = pattern(300, 3);
        let big = pattern(PASS_THROUGH * 4, 4);
        let tail = pattern(500, 5);
        let frames = vec![small.clone(), big.clone(), tail.clone()];
        let mut polled = false;
        bounded(cork.drive(std::future::poll_fn(move |cx| {
            if polled {
                return Poll::Ready(());
            }
            polled = true;
            write_frames(&mut corked, cx, &frames);
            cx.waker().wake_by_ref();
            Poll::Pending
        })))
        .await;
        let writes = io.writes();
        // The small frame first, on its own; the big one as it came (its head and the start of
        // its payload in the first of the vectored slices the test I/O takes); the tail last.
        assert_eq!(writes.first(), Some(&small));
        assert_eq!(writes.last(), Some(&tail));
        assert_eq!(io.received(), [small, big, tail].concat());
    }

    #[tokio::test]
    async fn a_full_socket_holds_writes_back_and_everything_arrives_in_order() {
        let io = Io::with_room(1000);
        let (corked, cork) = corked(io.clone());
        let data: Vec<Vec<u8>> = (0..40).map(|i| pattern(900 + i * 7, i as u8)).collect();
        let want = data.concat();
        let writer = tokio::spawn(cork.drive(async move {
            use tokio::io::AsyncWriteExt as _;
            let mut corked = corked;
            for d in &data {
                corked.write_all(d).await.unwrap();
                corked.flush().await.unwrap();
            }
            // As h2 ends a connection: shutting down writes out what is left.
            corked.shutdown().await.unwrap();
            corked
        }));
        // Room is made bit by bit, as a slow peer would read.
        for _ in 0..1000 {
            if io.received().len() >= want.len() {
                break;
            }
            tokio::task::yield_now().await;
            io.make_room(4096);
        }
        let corked = bounded(writer).await.unwrap();
        assert_eq!(io.received(), want);
        // Held back, the writes were gathered: fewer writes to the I/O than flushes asked for.
        assert!(io.writes().len() < 40, "{} writes", io.writes().len());
        drop(corked);
    }

    #[tokio::test]
    async fn a_failed_write_reaches_the_connection_at_its_next_read_and_write() {
        let io = Io::with_room(usize::MAX);
        io.0.lock().unwrap().fail = true;
        let (mut corked, cork) = corked(io.clone());
        let mut step = 0;
        let (read, write) = bounded(cork.drive(std::future::poll_fn(move |cx| {
            step += 1;
            if step == 1 {
                write_frames(&mut corked, cx, &[pattern(600, 6)]);
                return Poll::Pending;
            }
            // Woken by the driver after its write failed.
            let mut space = [0u8; 16];
            let mut buf = ReadBuf::new(&mut space);
            let read = Pin::new(&mut corked).poll_read(cx, &mut buf);
            let write = Pin::new(&mut corked).poll_write(cx, b"more");
            Poll::Ready((read, write))
        })))
        .await;
        for result in [read.map(|r| r.map(|()| 0)), write] {
            match result {
                Poll::Ready(Err(err)) => assert_eq!(err.kind(), io::ErrorKind::BrokenPipe),
                other => panic!("expected the write's error, got {other:?}"),
            }
        }
    }
}
