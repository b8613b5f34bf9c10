use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Instant,
};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

use super::{Upstreams, Via, reap_idle};
use crate::stats::OutboundStats;

/// The idle timeout the tests sweep with.
const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(90);

const BODY: usize = 1024;
/// A response too big for the connection to take in before it is read: it stays busy until then.
const BIG: usize = 8 << 20;

/// A server on 127.0.0.1 that serves each connection with `serve` in a task of its own and
/// counts the connections it accepted.
async fn counting_server<F, Fut>(serve: F) -> (SocketAddr, Arc<AtomicU64>)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind backend");
    let addr = listener.local_addr().expect("backend addr");
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Relaxed);
            tokio::spawn(serve(stream));
        }
    });
    (addr, accepted)
}

/// An HTTP/1.1 and h2c backend answering 1 KiB, or [`BIG`] bytes on `/big`; counts the
/// connections it accepted.
async fn backend() -> (SocketAddr, Arc<AtomicU64>) {
    counting_server(|stream| async move {
        let service = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
            let len = if req.uri().path() == "/big" { BIG } else { BODY };
            let body = Full::new(Bytes::from(vec![b'x'; len]));
            Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
        });
        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(stream), service)
            .await;
    })
    .await
}

fn pool() -> Upstreams<Empty<Bytes>> {
    Upstreams::new(None, Arc::new(OutboundStats::default()), &crate::ProxyConfig::default())
}

fn get() -> Request<Empty<Bytes>> {
    Request::get("/").header("host", "backend").body(Empty::new()).expect("request")
}

fn get_big() -> Request<Empty<Bytes>> {
    Request::get("/big").header("host", "backend").body(Empty::new()).expect("request")
}

async fn read_body(response: http::Response<hyper::body::Incoming>) -> usize {
    assert_eq!(response.status(), StatusCode::OK);
    response.into_body().collect().await.expect("body").to_bytes().len()
}

#[tokio::test]
async fn an_http1_connection_is_reused_once_its_response_is_read_and_never_shared_before() {
    let (addr, accepted) = backend().await;
    let pool = pool();
    for _ in 0..5 {
        let response = pool.send(addr, &Via::Direct, false, get()).await.expect("response");
        assert_eq!(read_body(response).await, BODY);
    }
    assert_eq!(accepted.load(Relaxed), 1, "sequential requests share one connection");

    // A response still coming in keeps its connection busy: the next request gets its own.
    let unread = pool.send(addr, &Via::Direct, false, get_big()).await.expect("first response");
    let second = pool.send(addr, &Via::Direct, false, get()).await.expect("second response");
    assert_eq!(accepted.load(Relaxed), 2, "a busy connection is not given a second request");
    assert_eq!(read_body(second).await, BODY);
    assert_eq!(read_body(unread).await, BIG);
    for _ in 0..5 {
        let response = pool.send(addr, &Via::Direct, false, get()).await.expect("response");
        assert_eq!(read_body(response).await, BODY);
    }
    assert_eq!(accepted.load(Relaxed), 2, "both connections went back to the pool");
}

#[tokio::test]
async fn http2_requests_share_one_connection_at_once() {
    let (addr, accepted) = backend().await;
    let pool = pool();
    let (a, b) =
        tokio::join!(pool.send(addr, &Via::Direct, true, get()), pool.send(addr, &Via::Direct, true, get()));
    let (a, b) = (a.expect("first response"), b.expect("second response"));
    // The second request may race the first one's connect; after that, one connection serves.
    for _ in 0..5 {
        let response = pool.send(addr, &Via::Direct, true, get()).await.expect("response");
        assert_eq!(read_body(response).await, BODY);
    }
    assert_eq!((read_body(a).await, read_body(b).await), (BODY, BODY));
    assert!(accepted.load(Relaxed) <= 2, "h2 multiplexes: {} connections", accepted.load(Relaxed));
    let before = accepted.load(Relaxed);
    let (c, d) =
        tokio::join!(pool.send(addr, &Via::Direct, true, get()), pool.send(addr, &Via::Direct, true, get()));
    assert_eq!((read_body(c.expect("c")).await, read_body(d.expect("d")).await), (BODY, BODY));
    assert_eq!(accepted.load(Relaxed), before, "concurrent requests on the pooled connection");
}

/// A backend that answers one request per connection and then closes it without saying so
/// (no `Connection: close`), as a server whose keep-alive timeout just ran out does.
async fn one_shot_backend() -> (SocketAddr, Arc<AtomicU64>) {
    counting_server(|mut stream| async move {
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
    })
    .await
}

#[tokio::test]
async fn a_connection_the_server_closed_costs_no_request() {
    let (addr, accepted) = one_shot_backend().await;
    let pool = pool();
    for i in 0..20 {
        let response = pool.send(addr, &Via::Direct, false, get()).await;
        let response = response.unwrap_or_else(|err| panic!("request {i} failed: {err}"));
        assert_eq!(read_body(response).await, 2);
    }
    assert_eq!(accepted.load(Relaxed), 20, "a closed connection is never used for a new request");
}

#[tokio::test]
async fn connections_are_kept_apart_by_protocol_and_by_how_they_reach_the_pod() {
    let (addr, accepted) = backend().await;
    let pool = pool();
    let response = pool.send(addr, &Via::Direct, false, get()).await.expect("response");
    assert_eq!(read_body(response).await, BODY);
    let tunnel = Via::Tunnel {
        src: "spiffe://cluster.local/ns/demo/sa/client".parse().expect("identity"),
        dst: "spiffe://cluster.local/ns/demo/sa/backend".parse().expect("identity"),
        node: SocketAddr::from((Ipv4Addr::LOCALHOST, 15008)),
        node_name: "node2".into(),
    };
    assert!(
        pool.checkout(addr, &tunnel, false).is_none(),
        "a plain connection never carries a tunnel's requests"
    );
    assert!(pool.checkout(addr, &Via::Direct, true).is_none(), "an HTTP/1 connection is not an h2 one");
    let other = SocketAddr::from((Ipv4Addr::LOCALHOST, addr.port().wrapping_add(1)));
    assert!(pool.checkout(other, &Via::Direct, false).is_none(), "nor one to another pod");
    assert!(pool.checkout(addr, &Via::Direct, false).is_some(), "the same path finds it");
    assert_eq!(accepted.load(Relaxed), 1);
}

#[tokio::test]
async fn idle_connections_are_dropped_after_the_idle_timeout_and_busy_ones_are_not() {
    let (addr, _) = backend().await;
    let pool = pool();
    let response = pool.send(addr, &Via::Direct, false, get()).await.expect("response");
    assert_eq!(read_body(response).await, BODY);
    let count = |pool: &Upstreams<Empty<Bytes>>| {
        pool.conns.lock().expect("lock").values().map(Vec::len).sum::<usize>()
    };
    // Ready again once the connection's task has taken in the end of the response.
    for _ in 0..100 {
        if pool.conns.lock().expect("lock").values().flatten().all(|c| c.sender.is_ready()) {
            break;
        }
        tokio::task::yield_now().await;
    }
    reap_idle(&pool.conns, Instant::now(), IDLE_TIMEOUT);
    assert_eq!(count(&pool), 1, "a connection used just now stays");
    reap_idle(&pool.conns, Instant::now() + IDLE_TIMEOUT, IDLE_TIMEOUT);
    assert_eq!(count(&pool), 0, "an idle one goes");

    let unread = pool.send(addr, &Via::Direct, false, get_big()).await.expect("response");
    reap_idle(&pool.conns, Instant::now() + 2 * IDLE_TIMEOUT, IDLE_TIMEOUT);
    assert_eq!(count(&pool), 1, "a connection whose response is still coming in is busy, not idle");
    assert_eq!(read_body(unread).await, BIG);
}

/// A backend on a thread of its own. It answers the first request of its first connection and
/// keeps that connection open until told (by a message on the channel) to close it; then it
/// answers one request on each new connection, until a second message or 10 s. Returns how many
/// requests it answered. The test decides when the pooled connection dies.
fn closing_backend() -> (SocketAddr, std::sync::mpsc::Sender<()>, std::thread::JoinHandle<u64>) {
    use std::io::{Read as _, Write as _};
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind backend");
    listener.set_nonblocking(true).expect("accepts bounded in time");
    let addr = listener.local_addr().expect("backend addr");
    let (tell, told) = std::sync::mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        let mut served = 0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            let mut stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(_) if served > 0 && told.try_recv().is_ok() => break,
                Err(_) => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    continue;
                }
            };
            stream.set_nonblocking(false).expect("blocking stream");
            stream.set_read_timeout(Some(std::time::Duration::from_secs(5))).expect("read timeout");
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            if !request.windows(4).any(|w| w == b"\r\n\r\n") {
                continue;
            }
            stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").expect("answer");
            served += 1;
            if served == 1 {
                let _ = told.recv_timeout(std::time::Duration::from_secs(10));
            }
        }
        served
    });
    (addr, tell, server)
}

/// Sends a first request; has the backend close that connection while no task of this runtime
/// runs, so the pool still holds it as ready; then sends `second`, which goes to that
/// connection. Returns the second request's body length or error, and how many requests the
/// backend answered.
async fn second_request_on_a_dead_connection(second: Request<Empty<Bytes>>) -> (Result<usize, String>, u64) {
    let (addr, tell, server) = closing_backend();
    let pool = pool();
    let first = pool.send(addr, &Via::Direct, false, get()).await.expect("first response");
    assert_eq!(read_body(first).await, 2);
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    tell.send(()).expect("tell the backend to close");
    std::thread::sleep(std::time::Duration::from_millis(100));
    let outcome = match pool.send(addr, &Via::Direct, false, second).await {
        Ok(response) => Ok(read_body(response).await),
        Err(err) => Err(err.to_string()),
    };
    let _ = tell.send(());
    (outcome, server.join().expect("backend thread"))
}

#[tokio::test]
async fn an_idempotent_request_written_to_a_connection_that_died_unnoticed_is_sent_again() {
    let (outcome, answered) = second_request_on_a_dead_connection(get()).await;
    assert_eq!(outcome, Ok(2), "the GET is not lost");
    assert_eq!(answered, 2, "it was answered on a new connection");
}

#[tokio::test]
async fn a_post_written_to_a_connection_that_died_unnoticed_is_not_sent_again() {
    let post = Request::post("/").header("host", "backend").body(Empty::new()).expect("request");
    let (outcome, answered) = second_request_on_a_dead_connection(post).await;
    assert!(outcome.is_err(), "a POST may have been acted on: {outcome:?}");
    assert_eq!(answered, 1, "and it is not sent again");
}
