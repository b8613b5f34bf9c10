use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::SeqCst},
    },
    task::{Wake, Waker},
};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;

/// The block the tests read in: the proxy's default.
const BLOCK: usize = 64 * 1024;

/// A socket that serves a script: `Some(bytes)` is data that has arrived (read as far as the
/// reader asks, the rest stays for the next read), `None` is one read that finds nothing and
/// waits. After the script, end of stream. Records what each read asked for.
#[derive(Default)]
struct Script {
    steps: VecDeque<Option<Vec<u8>>>,
    asked: Vec<usize>,
    waker: Option<Waker>,
}

impl Script {
    fn new(steps: impl IntoIterator<Item = Option<Vec<u8>>>) -> Self {
        Self { steps: steps.into_iter().collect(), ..Self::default() }
    }
}

impl AsyncRead for Script {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.asked.push(buf.remaining());
        match this.steps.pop_front() {
            None => Poll::Ready(Ok(())),
            Some(None) => {
                this.waker = Some(cx.waker().clone());
                Poll::Pending
            }
            Some(Some(mut data)) => {
                let n = buf.remaining().min(data.len());
                buf.put_slice(&data[..n]);
                if n < data.len() {
                    this.steps.push_front(Some(data.split_off(n)));
                }
                Poll::Ready(Ok(()))
            }
        }
    }
}

/// Counts its wakeups.
#[derive(Default)]
struct Wakes(AtomicUsize);

impl Wake for Wakes {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, SeqCst);
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add((i >> 8) as u8)).collect()
}

/// One read of at most `max` bytes, as rustls makes them: `None` if it has to wait.
fn read(ra: &mut ReadAhead<Script>, cx: &mut Context<'_>, max: usize) -> Option<Vec<u8>> {
    let mut mem = vec![0; max];
    let mut buf = ReadBuf::new(&mut mem);
    match Pin::new(ra).poll_read(cx, &mut buf) {
        Poll::Ready(Ok(())) => Some(buf.filled().to_vec()),
        Poll::Ready(Err(err)) => panic!("read failed: {err}"),
        Poll::Pending => None,
    }
}

#[test]
fn a_bulk_transfer_read_in_small_pieces_takes_one_socket_read_per_block() {
    let data = pattern(5 * BLOCK / 2);
    let mut ra = ReadAhead::new(Script::new([Some(data.clone())]), BLOCK);
    let mut cx = Context::from_waker(Waker::noop());
    let mut got = Vec::new();
    let mut reads = 0;
    loop {
        let piece = read(&mut ra, &mut cx, 4096).expect("the data has arrived");
        reads += 1;
        if piece.is_empty() {
            break;
        }
        got.extend(piece);
    }
    assert_eq!(got, data, "every byte, in order");
    assert_eq!(reads, data.len() / 4096 + 1);
    // The first read, which the socket filled; then three blocks and the end, where the
    // reader asked 41 times.
    assert_eq!(ra.io.asked, [4096, BLOCK, BLOCK, BLOCK, BLOCK]);
}

#[test]
fn small_messages_go_straight_to_the_reader_and_never_allocate_a_block() {
    let messages: Vec<Vec<u8>> = (1..=20).map(|i| pattern(100 * i)).collect();
    let steps = messages.iter().flat_map(|m| [Some(m.clone()), None]);
    let mut ra = ReadAhead::new(Script::new(steps), BLOCK);
    let mut cx = Context::from_waker(Waker::noop());
    for message in &messages {
        assert_eq!(read(&mut ra, &mut cx, 4096).as_ref(), Some(message));
        assert_eq!(ra.ahead.capacity(), 0, "no block for a message that does not fill a read");
        assert_eq!(read(&mut ra, &mut cx, 4096), None, "then waits");
    }
    assert!(ra.io.asked.iter().all(|&n| n == 4096), "every read made into the reader's memory");
}

#[test]
fn the_reader_waits_only_when_nothing_is_held_and_an_idle_connection_keeps_no_buffer() {
    let data = pattern(13 * 1024);
    let (first, second) = data.split_at(10 * 1024);
    let mut ra = ReadAhead::new(Script::new([Some(first.to_vec()), None, Some(second.to_vec())]), BLOCK);
    let wakes = Arc::new(Wakes::default());
    let waker = Waker::from(wakes.clone());
    let mut cx = Context::from_waker(&waker);

    let sizes: Vec<usize> = (0..3).map(|_| read(&mut ra, &mut cx, 4096).expect("held").len()).collect();
    assert_eq!(sizes, [4096, 4096, 2048], "a full read, then what one block brought, in pieces");
    assert_eq!(ra.io.asked, [4096, BLOCK]);

    assert_eq!(read(&mut ra, &mut cx, 4096), None, "waits once everything is handed out");
    assert!(ra.io.waker.is_some(), "waits on the socket, whose readiness wakes it");
    assert_eq!(ra.ahead.capacity(), 0, "the buffer is given back while the connection waits");
    assert!(!ra.streaming, "and the next read goes straight to the reader");

    ra.io.waker.take().expect("registered").wake();
    assert_eq!(wakes.0.load(SeqCst), 1);
    let mut rest = read(&mut ra, &mut cx, 4096).expect("arrived");
    assert_eq!(rest.len(), 3 * 1024);
    assert_eq!(ra.io.asked[3], 4096, "straight into the reader's memory");
    assert_eq!(read(&mut ra, &mut cx, 4096), Some(vec![]), "then the end of the stream");
    let mut got = first.to_vec();
    got.append(&mut rest);
    assert_eq!(got, data);
}

#[test]
fn a_read_as_large_as_a_block_goes_straight_to_the_caller() {
    let data = pattern(BLOCK + 100);
    let mut ra = ReadAhead::new(Script::new([Some(data.clone())]), BLOCK);
    let mut cx = Context::from_waker(Waker::noop());
    let piece = read(&mut ra, &mut cx, 2 * BLOCK).expect("arrived");
    assert_eq!(piece, data);
    assert_eq!(ra.io.asked, [2 * BLOCK], "one read, into the caller's memory");
    assert_eq!(ra.ahead.capacity(), 0, "nothing went through the buffer");
}

#[test]
fn an_empty_read_asks_the_socket_nothing() {
    let mut ra = ReadAhead::new(Script::new([Some(pattern(10))]), BLOCK);
    let mut cx = Context::from_waker(Waker::noop());
    assert_eq!(read(&mut ra, &mut cx, 0), Some(vec![]));
    assert!(ra.io.asked.is_empty());
    assert_eq!(read(&mut ra, &mut cx, 4096), Some(pattern(10)));
}

#[tokio::test]
async fn writes_and_the_end_of_writing_pass_through() {
    // A socket on loopback, which writes vectored (TLS hands it a batch of records at once).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let near = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
    let (mut far, _) = listener.accept().await.unwrap();
    let mut ra = ReadAhead::new(near, BLOCK);
    assert!(ra.is_write_vectored(), "the socket's vectored writes are offered to TLS");
    let data = pattern(200 * 1024);
    let (head, tail) = data.split_at(1000);
    ra.write_all(head).await.unwrap();
    let n = ra.write_vectored(&[IoSlice::new(&tail[..10]), IoSlice::new(&tail[10..4000])]).await.unwrap();
    assert_eq!(n, 4000, "both slices in one call, as one writev");
    ra.write_all(&tail[n..]).await.unwrap();
    ra.flush().await.unwrap();
    ra.shutdown().await.unwrap();
    let mut got = Vec::new();
    far.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, data);

    // And the other way, through the buffer, up to the peer's end.
    far.write_all(&data).await.unwrap();
    drop(far);
    let mut back = Vec::new();
    ra.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, data);
}
