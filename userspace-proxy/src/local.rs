//! Requests the proxy answers itself, classified in one place.
//!
//! Every refusal or failure on the request path is a [`LocalError`]. Its [`Class`] gives the
//! HTTP status, the access log's outcome and the metric label; [`respond`] turns it into the
//! response the client gets: a one-line text body for HTTP clients, and for gRPC clients
//! (`content-type: application/grpc…`) a trailers-only gRPC response whose `grpc-status` is the
//! one gRPC's HTTP-to-gRPC mapping gives for the HTTP status (404 → UNIMPLEMENTED, 502, 503 and
//! 504 → UNAVAILABLE, …) and whose `grpc-message` says why.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full};

use crate::{http::Body, route::LocalReason, upstream::UpstreamError};

/// Why the proxy answered a request itself instead of a backend.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("the destination is no longer a Service frontend")]
    NotAFrontend,
    #[error("more than one Host header")]
    DuplicateHost,
    /// Routing refused the request (no rule matched, the rule's backend is unusable).
    #[error(transparent)]
    Route(LocalReason),
    #[error("no ready endpoint for {backend}")]
    NoEndpoint { backend: String },
    #[error("cannot forward this request target: {0}")]
    BadTarget(#[source] http::Error),
    #[error("request timeout")]
    RequestTimeout,
    #[error("backend request timeout")]
    BackendTimeout,
    #[error("refusing to leave the node without mTLS: {0}")]
    MtlsRequired(&'static str),
    #[error("denied by the authorization policy {policy}")]
    Denied { policy: std::sync::Arc<str> },
    #[error("upstream {endpoint} failed: {source}")]
    Upstream { endpoint: SocketAddr, source: UpstreamError },
}

/// What a local answer is, for everything that reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Class {
    pub status: StatusCode,
    /// The access log's `outcome` and the `reason` label of `gammaray_local_responses`.
    pub outcome: &'static str,
}

impl LocalError {
    pub fn class(&self) -> Class {
        let (status, outcome) = match self {
            Self::NotAFrontend => (StatusCode::BAD_GATEWAY, "not_a_frontend"),
            Self::DuplicateHost => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::Route(reason) => (
                StatusCode::from_u16(reason.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                match reason {
                    LocalReason::NoRuleMatched => "no_route",
                    LocalReason::Redirect => "redirect",
                    LocalReason::NoBackendRefs
                    | LocalReason::AllWeightsZero
                    | LocalReason::Unresolved(_)
                    | LocalReason::BadRedirectLocation => "invalid_backend",
                },
            ),
            Self::NoEndpoint { .. } => (StatusCode::SERVICE_UNAVAILABLE, "no_endpoint"),
            Self::BadTarget(_) => (StatusCode::BAD_REQUEST, "bad_target"),
            Self::RequestTimeout => (StatusCode::GATEWAY_TIMEOUT, "request_timeout"),
            Self::BackendTimeout => (StatusCode::GATEWAY_TIMEOUT, "backend_timeout"),
            Self::MtlsRequired(_) => (StatusCode::BAD_GATEWAY, "mtls_required"),
            Self::Denied { .. } => (StatusCode::FORBIDDEN, "denied"),
            // The destination's node refused the tunnel for its policies.
            Self::Upstream {
                source:
                    UpstreamError::Tunnel(crate::hbone::HboneError::Refused {
                        status: StatusCode::FORBIDDEN, ..
                    }),
                ..
            } => (StatusCode::FORBIDDEN, "denied"),
            Self::Upstream { .. } => (StatusCode::BAD_GATEWAY, "upstream_failed"),
        };
        Class { status, outcome }
    }

    /// What the client is told: the reason, without the addresses of pods or nodes behind the
    /// Service (the access log's `error` field keeps them).
    pub fn public_message(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Self::Upstream { .. } if self.class().status == StatusCode::FORBIDDEN => {
                "denied by an authorization policy".into()
            }
            Self::Upstream { .. } => "the backend could not be reached or did not answer".into(),
            other => other.to_string().into(),
        }
    }
}

/// gRPC status codes the mapping uses (grpc's `doc/statuscodes.md`).
pub mod grpc {
    pub const UNKNOWN: u16 = 2;
    pub const PERMISSION_DENIED: u16 = 7;
    pub const UNIMPLEMENTED: u16 = 12;
    pub const INTERNAL: u16 = 13;
    pub const UNAVAILABLE: u16 = 14;
    pub const UNAUTHENTICATED: u16 = 16;
}

/// The gRPC status a gRPC client infers from an HTTP status (grpc's
/// `doc/http-grpc-status-mapping.md`).
pub fn grpc_status_of(status: StatusCode) -> u16 {
    match status.as_u16() {
        400 => grpc::INTERNAL,
        401 => grpc::UNAUTHENTICATED,
        403 => grpc::PERMISSION_DENIED,
        404 => grpc::UNIMPLEMENTED,
        429 | 502 | 503 | 504 => grpc::UNAVAILABLE,
        _ => grpc::UNKNOWN,
    }
}

/// Whether the request is a gRPC call, by its content type.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The response to a request answered locally with `status` and `reason` (a one-line
/// explanation), in the client's protocol.
pub fn respond(status: StatusCode, reason: &str, grpc: bool) -> Response<Body> {
    if grpc {
        return grpc_trailers_only(grpc_status_of(status), reason);
    }
    let mut resp =
        Response::new(Full::new(Bytes::from(format!("{reason}\n"))).map_err(|never| match never {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp.headers_mut().insert(LOCAL, HeaderValue::from_static("1"));
    resp
}

/// The header that marks a response the proxy made itself.
const LOCAL: &str = "x-gammaray-local";

/// A gRPC response with no messages: HTTP 200 and the status in the one HEADERS frame, which
/// ends the stream ("Trailers-Only" in gRPC over HTTP/2).
fn grpc_trailers_only(code: u16, message: &str) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::new()).map_err(|never| match never {}).boxed());
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert("grpc-status", HeaderValue::from(code));
    if let Ok(message) = HeaderValue::from_str(&percent_encode(message)) {
        headers.insert("grpc-message", message);
    }
    headers.insert(LOCAL, HeaderValue::from_static("1"));
    resp
}

/// `grpc-message` is percent-encoded: every byte outside printable ASCII, and `%` itself.
fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_statuses_map_to_grpc_statuses_as_grpc_clients_infer_them() {
        for (http, code) in [
            (400, grpc::INTERNAL),
            (401, grpc::UNAUTHENTICATED),
            (403, grpc::PERMISSION_DENIED),
            (404, grpc::UNIMPLEMENTED),
            (429, grpc::UNAVAILABLE),
            (500, grpc::UNKNOWN),
            (502, grpc::UNAVAILABLE),
            (503, grpc::UNAVAILABLE),
            (504, grpc::UNAVAILABLE),
            (302, grpc::UNKNOWN),
        ] {
            assert_eq!(grpc_status_of(StatusCode::from_u16(http).expect("status")), code, "HTTP {http}");
        }
    }

    #[test]
    fn every_local_error_has_one_class() {
        let endpoint: SocketAddr = "10.0.0.1:80".parse().expect("addr");
        for (err, status, outcome) in [
            (LocalError::NotAFrontend, 502, "not_a_frontend"),
            (LocalError::DuplicateHost, 400, "bad_request"),
            (LocalError::Route(LocalReason::NoRuleMatched), 404, "no_route"),
            (LocalError::Route(LocalReason::Unresolved("x".into())), 500, "invalid_backend"),
            (LocalError::NoEndpoint { backend: "demo/web:80".into() }, 503, "no_endpoint"),
            (LocalError::RequestTimeout, 504, "request_timeout"),
            (LocalError::BackendTimeout, 504, "backend_timeout"),
            (LocalError::MtlsRequired("why"), 502, "mtls_required"),
            (
                LocalError::Upstream { endpoint, source: UpstreamError::ConnectTimeout },
                502,
                "upstream_failed",
            ),
        ] {
            assert_eq!(
                err.class(),
                Class { status: StatusCode::from_u16(status).expect("status"), outcome },
                "{err}"
            );
        }
    }

    #[test]
    fn clients_are_not_told_the_addresses_behind_a_service() {
        let endpoint: SocketAddr = "10.244.2.7:8080".parse().expect("addr");
        let err = LocalError::Upstream { endpoint, source: UpstreamError::ConnectTimeout };
        assert!(err.to_string().contains("10.244.2.7"), "the log keeps the detail: {err}");
        assert!(!err.public_message().contains("10.244"), "{}", err.public_message());
        let route = LocalError::Route(LocalReason::NoRuleMatched);
        assert_eq!(route.public_message(), route.to_string(), "other reasons are told as they are");
    }

    #[test]
    fn grpc_clients_get_a_trailers_only_status() {
        let resp = respond(StatusCode::NOT_FOUND, "no route rule matches 100% of it", true);
        assert_eq!(resp.status(), StatusCode::OK, "gRPC carries its status in grpc-status");
        assert_eq!(resp.headers()["content-type"], "application/grpc");
        assert_eq!(resp.headers()["grpc-status"], "12");
        assert_eq!(resp.headers()["grpc-message"], "no route rule matches 100%25 of it");
        assert!(hyper::body::Body::is_end_stream(resp.body()), "no body: the headers end the stream");
        let plain = respond(StatusCode::NOT_FOUND, "no route", false);
        assert_eq!(plain.status(), StatusCode::NOT_FOUND);
        assert_eq!(plain.headers()["content-type"], "text/plain");
    }

    #[test]
    fn only_grpc_content_types_are_grpc() {
        let mut h = HeaderMap::new();
        assert!(!is_grpc(&h));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc+proto"));
        assert!(is_grpc(&h));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        assert!(!is_grpc(&h));
    }
}
