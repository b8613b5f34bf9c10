//! An echo server and client in the format of the echo app the upstream GAMMA conformance tests
//! use (text `Field=value` lines), over HTTP/1.1, h2c and gRPC (`/proto.EchoTestService/Echo`),
//! so the catalogue's cases can run unchanged against pods of the simulated cluster.

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::{Buf as _, Bytes};
use http::{HeaderMap, HeaderValue, Request, Response, header};
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

/// The gRPC method the echo app serves.
pub const ECHO_METHOD: &str = "/proto.EchoTestService/Echo";

/// Who an echo server says it is.
#[derive(Debug, Clone, Default)]
pub struct EchoIdentity {
    /// The pod name (`Hostname=`).
    pub hostname: String,
    pub namespace: String,
    pub service_version: String,
}

/// Serves HTTP/1.1, h2c and gRPC on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, who: Arc<EchoIdentity>) {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    loop {
        let Ok((stream, peer)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        let who = who.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let who = who.clone();
                async move { Ok::<_, Infallible>(answer(req, &who, port, peer).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

type EchoBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

async fn answer(
    req: Request<Incoming>,
    who: &EchoIdentity,
    port: u16,
    peer: SocketAddr,
) -> Response<EchoBody> {
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let mut headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .filter(|(n, _)| !(grpc && n.as_str().ends_with("-bin")))
        .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    headers.sort();
    let mut lines = Vec::new();
    let mut field = |k: &str, v: &str| lines.push(format!("{k}={v}"));
    if grpc {
        let uri = req.uri().clone();
        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let message = decode_message(&body).unwrap_or_default();
        field("Host", &host);
        for (k, v) in &headers {
            field("RequestHeader", &format!("{k}:{v}"));
        }
        field("StatusCode", "200");
        field("ServiceVersion", &who.service_version);
        field("ServicePort", &port.to_string());
        if !who.namespace.is_empty() {
            field("Namespace", &who.namespace);
        }
        field("IP", &peer.ip().to_string());
        field("Proto", "GRPC");
        field("Echo", &message);
        field("Hostname", &who.hostname);
        if uri.path() != ECHO_METHOD {
            return grpc_response(Bytes::new(), "12", "unknown method");
        }
        return grpc_response(encode_message(&lines.join("\n")), "0", "");
    }
    field("ServiceVersion", &who.service_version);
    field("ServicePort", &port.to_string());
    field("Host", &host);
    field("URL", &req.uri().path_and_query().map_or("/".to_owned(), |p| p.to_string()));
    if !who.namespace.is_empty() {
        field("Namespace", &who.namespace);
    }
    field("Method", req.method().as_str());
    field("Proto", &format!("{:?}", req.version()));
    field("IP", &peer.ip().to_string());
    for (k, v) in &headers {
        field("RequestHeader", &format!("{k}:{v}"));
    }
    field("Hostname", &who.hostname);
    let mut resp = Response::new(Full::new(Bytes::from(lines.join("\n") + "\n")).boxed_unsync());
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

/// A gRPC reply: one length-prefixed message, then `grpc-status` in the trailers.
fn grpc_response(message: Bytes, status: &'static str, text: &'static str) -> Response<EchoBody> {
    let mut framed = Vec::with_capacity(message.len() + 5);
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static(status));
    if !text.is_empty() {
        trailers.insert("grpc-message", HeaderValue::from_static(text));
    }
    let body = WithTrailers { data: Some(Bytes::from(framed)), trailers: Some(trailers) };
    let mut resp = Response::new(body.boxed_unsync());
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    resp
}

/// A body of one data frame followed by trailers.
struct WithTrailers {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for WithTrailers {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }
}

/// `EchoRequest`/`EchoResponse` have one field: `string message = 1`.
fn encode_message(text: &str) -> Bytes {
    let mut out = vec![0x0a];
    let mut len = text.len();
    while len >= 0x80 {
        out.push((len as u8 & 0x7f) | 0x80);
        len >>= 7;
    }
    out.push(len as u8);
    out.extend_from_slice(text.as_bytes());
    Bytes::from(out)
}

fn read_varint(buf: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.first()?;
        buf.advance(1);
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// Field 1 of a length-prefixed gRPC message, skipping any other field.
fn decode_message(framed: &[u8]) -> Option<String> {
    let mut buf = framed.get(5..)?;
    while !buf.is_empty() {
        let key = read_varint(&mut buf)?;
        match key & 7 {
            0 => {
                read_varint(&mut buf)?;
            }
            2 => {
                let len = read_varint(&mut buf)? as usize;
                let bytes = buf.get(..len)?;
                if key >> 3 == 1 {
                    return String::from_utf8(bytes.to_vec()).ok();
                }
                buf.advance(len);
            }
            _ => return None,
        }
    }
    Some(String::new())
}

/// What a client learns from one echo exchange.
#[derive(Debug, Clone, Default)]
pub struct EchoReply {
    /// The HTTP status; for gRPC, 200 when `grpc-status` is 0.
    pub status: u16,
    pub response_headers: Vec<(String, String)>,
    /// `Field=value` lines of the body, in order.
    pub fields: Vec<(String, String)>,
}

impl EchoReply {
    /// The first value of `field`, as the upstream harness reads it.
    pub fn field(&self, field: &str) -> Option<&str> {
        self.fields.iter().find(|(k, _)| k == field).map(|(_, v)| v.as_str())
    }

    /// Every value the backend saw for request header `name` (case-insensitive), joined by ",".
    pub fn request_header(&self, name: &str) -> Option<String> {
        let values: Vec<&str> = self
            .fields
            .iter()
            .filter(|(k, _)| k == "RequestHeader")
            .filter_map(|(_, v)| v.split_once(':'))
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
            .collect();
        (!values.is_empty()).then(|| values.join(","))
    }

    /// The outcome the conformance checks judge: status, backend pod and namespace, the request
    /// headers and target the backend saw, and the response headers.
    pub fn outcome(&self) -> crate::catalogue::Outcome {
        let mut request_headers = HeaderMap::new();
        for (_, line) in self.fields.iter().filter(|(k, _)| k == "RequestHeader") {
            let Some((name, value)) = line.split_once(':') else { continue };
            if let (Ok(n), Ok(v)) =
                (http::HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value))
            {
                request_headers.append(n, v);
            }
        }
        let mut response_headers = HeaderMap::new();
        for (name, value) in &self.response_headers {
            if let (Ok(n), Ok(v)) =
                (http::HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value))
            {
                response_headers.append(n, v);
            }
        }
        crate::catalogue::Outcome {
            status: self.status,
            backend: self.field("Hostname").map(str::to_owned),
            backend_namespace: self.field("Namespace").map(str::to_owned),
            request_headers,
            request_path: self.field("URL").map(str::to_owned),
            response_headers,
        }
    }

    fn parse_fields(text: &str) -> Vec<(String, String)> {
        text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
    }
}

/// One HTTP/1.1 request on `stream` (already connected, in whichever namespace).
pub async fn http_call(
    stream: TcpStream,
    host: &str,
    method: &str,
    path: &str,
    headers: &[(String, String)],
) -> Result<EchoReply, String> {
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = Request::builder().method(method).uri(path).header(header::HOST, host);
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let req = req.body(http_body_util::Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let response_headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(EchoReply {
        status,
        response_headers,
        fields: EchoReply::parse_fields(&String::from_utf8_lossy(&body)),
    })
}

/// One unary gRPC call of `method` on `stream` over h2c, with `metadata`.
pub async fn grpc_call(
    stream: TcpStream,
    authority: &str,
    method: &str,
    metadata: &[(String, String)],
    message: &str,
) -> Result<EchoReply, String> {
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let payload = encode_message(message);
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    framed.extend_from_slice(&payload);
    let mut req = Request::builder()
        .method("POST")
        .uri(format!("http://{authority}{method}"))
        .header(header::CONTENT_TYPE, "application/grpc")
        .header("te", "trailers");
    for (k, v) in metadata {
        req = req.header(k.to_ascii_lowercase().as_str(), v.as_str());
    }
    let req = req.body(Full::new(Bytes::from(framed))).map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let http_status = resp.status().as_u16();
    let response_headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let collected = resp.into_body().collect().await.map_err(|e| e.to_string())?;
    let grpc_status = collected
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = collected.to_bytes();
    let status = match (http_status, grpc_status.as_deref()) {
        (200, Some("0")) => 200,
        (200, _) => 500,
        (other, _) => other,
    };
    let text = decode_message(&body).unwrap_or_default();
    Ok(EchoReply { status, response_headers, fields: EchoReply::parse_fields(&text) })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    async fn start(hostname: &str) -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let who = Arc::new(EchoIdentity {
            hostname: hostname.into(),
            namespace: "ns".into(),
            service_version: String::new(),
        });
        tokio::spawn(serve(listener, who));
        addr
    }

    #[tokio::test]
    async fn http_replies_in_the_echo_format() {
        let addr = start("echo-v1-5c7d8f9b6d-abcde").await;
        let stream = TcpStream::connect(addr).await.expect("connect");
        let headers = vec![("X-Header-Add".to_owned(), "a".to_owned())];
        let reply = http_call(stream, "echo", "GET", "/path?x=1", &headers).await.expect("call");
        assert_eq!(reply.status, 200);
        assert_eq!(reply.field("Hostname"), Some("echo-v1-5c7d8f9b6d-abcde"));
        assert_eq!(reply.field("URL"), Some("/path?x=1"));
        assert_eq!(reply.field("Host"), Some("echo"));
        assert_eq!(reply.field("Method"), Some("GET"));
        assert_eq!(reply.field("Proto"), Some("HTTP/1.1"));
        assert_eq!(reply.field("ServicePort"), Some(addr.port().to_string().as_str()));
        assert_eq!(reply.request_header("x-header-add").as_deref(), Some("a"));
        assert_eq!(reply.field("Namespace"), Some("ns"));
        let outcome = reply.outcome();
        assert_eq!(outcome.backend.as_deref(), Some("echo-v1-5c7d8f9b6d-abcde"));
        assert_eq!(outcome.backend_namespace.as_deref(), Some("ns"));
        assert_eq!(outcome.request_path.as_deref(), Some("/path?x=1"));
        assert_eq!(crate::catalogue::joined(&outcome.request_headers, "X-Header-Add").as_deref(), Some("a"));
    }

    #[tokio::test]
    async fn grpc_echo_carries_metadata_and_status() {
        let addr = start("echo-v2-6b8f9c7d5f-fghij").await;
        let stream = TcpStream::connect(addr).await.expect("connect");
        let md =
            vec![("x-test-case".to_owned(), "set".to_owned()), ("blob-bin".to_owned(), "AAA".to_owned())];
        let reply = grpc_call(stream, "echo:7070", ECHO_METHOD, &md, "hello").await.expect("call");
        assert_eq!(reply.status, 200);
        assert_eq!(reply.field("Proto"), Some("GRPC"));
        assert_eq!(reply.field("Echo"), Some("hello"));
        assert_eq!(reply.field("Host"), Some("echo:7070"));
        assert_eq!(reply.field("Hostname"), Some("echo-v2-6b8f9c7d5f-fghij"));
        assert_eq!(reply.request_header("x-test-case").as_deref(), Some("set"));
        assert_eq!(reply.request_header("blob-bin"), None, "-bin metadata is not echoed");

        let stream = TcpStream::connect(addr).await.expect("connect");
        let reply = grpc_call(stream, "echo:7070", "/other.Service/Nope", &[], "x").await.expect("call");
        assert_eq!(reply.status, 500, "a non-zero grpc-status is a failure");
    }

    #[test]
    fn protobuf_strings_round_trip_including_long_ones() {
        for text in ["", "hello", &"x".repeat(300)] {
            let message = encode_message(text);
            let mut framed = vec![0u8, 0, 0, 0, message.len() as u8];
            framed.extend_from_slice(&message);
            assert_eq!(decode_message(&framed).as_deref(), Some(text));
        }
    }
}
