//! The benchmarks' backend: an HTTP/1.1 and h2c server that answers every request with the same
//! 1 KiB body, built in release mode and run inside a pod, so the direct baseline is not slowed
//! by a debug build. Usage: `bench-backend ADDR [BODY_BYTES [NAME]]`; NAME is sent back in an
//! `x-backend` header. A request whose content type is `application/grpc` gets a unary gRPC
//! answer: its message read whole, then one message of BODY_BYTES and `grpc-status: 0` in the
//! trailers.

use std::{convert::Infallible, future::Ready, net::SocketAddr};

use bytes::{BufMut as _, Bytes, BytesMut};
use http::HeaderMap;
use http_body_util::{BodyExt as _, Either, Full, combinators::WithTrailers};
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args
        .next()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| std::io::Error::other("usage: bench-backend ADDR [BODY_BYTES]"))?;
    let size: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1024);
    let body = Bytes::from(vec![b'x'; size]);
    let grpc_message = grpc_message(&body);
    let name = http::HeaderValue::from_str(&args.next().unwrap_or_default())
        .map_err(|e| std::io::Error::other(format!("NAME: {e}")))?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let (body, grpc_message, name) = (body.clone(), grpc_message.clone(), name.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let (body, grpc_message, name) = (body.clone(), grpc_message.clone(), name.clone());
                    async move {
                        let mut resp = if is_grpc(&req) {
                            grpc_answer(req, grpc_message).await
                        } else {
                            Response::new(Either::Left(Full::new(body)))
                        };
                        resp.headers_mut().insert("x-backend", name);
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

type GrpcBody = WithTrailers<Full<Bytes>, Ready<Option<Result<HeaderMap, Infallible>>>>;

fn is_grpc(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// `payload` as one gRPC message: uncompressed, behind its length. Made once; every answer
/// shares it.
fn grpc_message(payload: &Bytes) -> Bytes {
    let mut message = BytesMut::with_capacity(5 + payload.len());
    message.put_u8(0);
    message.put_u32(payload.len() as u32);
    message.put_slice(payload);
    message.freeze()
}

/// Reads the call's message, then answers with `message` and a status of OK in the trailers,
/// as a unary gRPC method does.
async fn grpc_answer(req: Request<Incoming>, message: Bytes) -> Response<Either<Full<Bytes>, GrpcBody>> {
    let status = match req.into_body().collect().await {
        Ok(_) => "0",
        // INTERNAL: the call's message did not arrive whole.
        Err(_) => "13",
    };
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static(status));
    let body = Full::new(message).with_trailers(std::future::ready(Some(Ok(trailers))));
    let mut resp = Response::new(Either::Right(body));
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    resp
}
