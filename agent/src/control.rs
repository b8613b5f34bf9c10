//! The agent's control socket: a Unix socket speaking HTTP/1.1 with JSON bodies, for the CLI
//! (`gammaray-agent enrol …`) and tests. A Unix socket, not TCP, so it is reachable from any
//! network namespace and guarded by file permissions.
//!
//! - `POST /enrol` `{"netns": PATH}` → `{"cookie": N}`
//! - `POST /unenrol` `{"netns": PATH}` → `{"cookie": N, "wasEnrolled": bool}`
//! - `GET /status` → [`Status`]
//! - `GET /describe?namespace=NS&name=NAME` → a text description of a Service
//! - `GET /routes` → the status of every route, as translation computed it
//! - `GET /config_dump` → what the agent routes by, as the admin endpoint's `/config_dump`
//!   gives it to the node's loopback

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};

use crate::{
    ebpf::{Attachment, Datapath, KernelCounters},
    netns,
};
use gammaray_proxy::stats::{OutboundCounts, OutboundStats};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot bind the control socket {path}: {source}")]
    Bind { path: PathBuf, source: std::io::Error },
    #[error("cannot reach the agent's control socket {path}: {source} (is the agent running?)")]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("control request failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("the agent refused: {status}: {body}")]
    Refused { status: StatusCode, body: String },
    #[error("bad control response: {0}")]
    Decode(#[from] serde_json::Error),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetnsRequest {
    pub netns: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrolResponse {
    pub cookie: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub was_enrolled: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub node: String,
    pub proxy: std::net::SocketAddrV4,
    pub attachment: Attachment,
    pub enrolled: Vec<u64>,
    pub kernel: KernelCounters,
    pub outbound: OutboundCounts,
    /// Version of the snapshot the proxy routes by (0: none published yet).
    pub config_version: u64,
    pub frontends: usize,
}

/// What the control socket serves from.
pub struct State {
    pub node: String,
    pub proxy: std::net::SocketAddrV4,
    /// The configuration in force.
    pub generation: tokio::sync::watch::Receiver<Arc<crate::generation::Generation>>,
    /// Whether traffic between nodes is carried over mutual TLS.
    pub mtls: bool,
    pub datapath: Datapath,
    pub outbound: Arc<OutboundStats>,
    /// Route status writes the API server refused as invalid.
    pub status_refused: crate::status_writer::Refused,
}

/// Binds the control socket at `path`, replacing a socket file there: one left by an agent
/// that crashed, or the one of the agent this one takes over from (which keeps serving the
/// connections it has). Returns the listener and the file's inode, by which the agent knows at
/// exit whether the file is still its own.
pub fn bind(path: &Path) -> Result<(UnixListener, u64), ControlError> {
    use std::os::unix::fs::MetadataExt as _;
    let _ = std::fs::remove_file(path);
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let err = |source| ControlError::Bind { path: path.to_owned(), source };
    let listener = UnixListener::bind(path).map_err(err)?;
    let inode = std::fs::metadata(path).map_err(err)?.ino();
    Ok((listener, inode))
}

/// Serves the control socket until the task is dropped.
pub async fn serve(listener: UnixListener, state: Arc<State>) -> Result<(), ControlError> {
    let path =
        listener.local_addr().ok().and_then(|a| a.as_pathname().map(Path::to_owned)).unwrap_or_default();
    tracing::info!(path = %path.display(), component = "control", "listener ready");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(err) => {
                tracing::warn!(error = %err, "control accept failed");
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, state.clone()));
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %err, "control connection ended");
            }
        });
    }
}

/// The value of `key` in a query string (`a=1&b=2`), as written.
fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|p| p.strip_prefix(key)?.strip_prefix('=')).map(str::to_owned)
}

async fn handle(req: Request<Incoming>, state: Arc<State>) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let route = (req.method().clone(), req.uri().path().to_owned());
    let route_query = req.uri().query().map(str::to_owned);
    let body = req.into_body().collect().await?.to_bytes();
    Ok(match (route.0, route.1.as_str()) {
        (Method::GET, "/describe") => {
            let query = route_query.unwrap_or_default();
            let param = |k: &str| query_param(&query, k).unwrap_or_default();
            let (ns, name) = (param("namespace"), param("name"));
            let generation = state.generation.borrow().clone();
            match crate::describe::describe(
                &generation.snapshot,
                &generation.status_list(),
                &ns,
                &name,
                state.mtls,
            ) {
                Some(text) => self::text(StatusCode::OK, text),
                None => self::text(
                    StatusCode::NOT_FOUND,
                    format!("no Service {ns}/{name} with a ClusterIP in the mesh's configuration"),
                ),
            }
        }
        (Method::GET, "/describe/workload") => {
            let query = route_query.unwrap_or_default();
            let param = |k: &str| query_param(&query, k);
            let (ns, name) = (param("namespace").unwrap_or_default(), param("name").unwrap_or_default());
            let port = param("port").and_then(|p| p.parse().ok()).unwrap_or(80);
            let from = match param("from").filter(|f| !f.is_empty()) {
                Some(f) => match f.parse::<gammaray_proxy::identity::Identity>() {
                    Ok(id) => Some(id),
                    Err(err) => return Ok(text(StatusCode::BAD_REQUEST, format!("--from: {err}"))),
                },
                None => None,
            };
            let generation = state.generation.borrow().clone();
            match crate::describe::describe_workload(&generation.snapshot, &ns, &name, from.as_ref(), port) {
                Some(text) => self::text(StatusCode::OK, text),
                None => self::text(
                    StatusCode::NOT_FOUND,
                    format!("no workload {ns}/{name} in the mesh's configuration"),
                ),
            }
        }
        (Method::GET, "/routes") => {
            let generation = state.generation.borrow().clone();
            json(StatusCode::OK, &generation.status_list())
        }
        (Method::GET, "/config_dump") => match crate::admin::config_dump(&state) {
            Ok(dump) => self::text(StatusCode::OK, dump),
            Err(err) => text(StatusCode::INTERNAL_SERVER_ERROR, err),
        },
        (Method::GET, "/status") => match status(&state) {
            Ok(s) => json(StatusCode::OK, &s),
            Err(err) => text(StatusCode::INTERNAL_SERVER_ERROR, err),
        },
        (Method::POST, op @ ("/enrol" | "/unenrol")) => {
            let req: NetnsRequest = match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(err) => {
                    return Ok(text(StatusCode::BAD_REQUEST, format!("bad request: {err}")));
                }
            };
            let enrol = op == "/enrol";
            let netns = req.netns.clone();
            // Entering a namespace blocks a thread briefly; keep it off the runtime's workers.
            let result = tokio::task::spawn_blocking(move || {
                let cookie = netns::cookie_of(&netns).map_err(|e| e.to_string())?;
                if enrol {
                    state.datapath.enrol(cookie).map_err(|e| e.to_string())?;
                    tracing::info!(netns = %netns.display(), cookie, "enrolled");
                    Ok(EnrolResponse { cookie, was_enrolled: None })
                } else {
                    let was = state.datapath.unenrol(cookie).map_err(|e| e.to_string())?;
                    tracing::info!(netns = %netns.display(), cookie, was_enrolled = was, "unenrolled");
                    Ok(EnrolResponse { cookie, was_enrolled: Some(was) })
                }
            })
            .await
            .unwrap_or_else(|e| Err(format!("enrolment task failed: {e}")));
            match result {
                Ok(r) => json(StatusCode::OK, &r),
                Err(err) => text(StatusCode::UNPROCESSABLE_ENTITY, err),
            }
        }
        (_, path) => text(StatusCode::NOT_FOUND, format!("no such control endpoint: {path}")),
    })
}

pub fn status(state: &State) -> Result<Status, crate::ebpf::EbpfError> {
    let generation = state.generation.borrow().clone();
    Ok(Status {
        node: state.node.clone(),
        proxy: state.proxy,
        attachment: state.datapath.attachment().clone(),
        enrolled: state.datapath.enrolled(),
        kernel: state.datapath.counters()?,
        outbound: state.outbound.snapshot(),
        config_version: generation.version,
        frontends: generation.snapshot.frontends.len(),
    })
}

fn json<T: Serialize>(code: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).expect("control responses serialise");
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

fn text(code: StatusCode, msg: impl ToString) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(msg.to_string())))
        .expect("static response parts are valid")
}

/// A client of the control socket.
#[derive(Debug, Clone)]
pub struct Client {
    path: PathBuf,
}

impl Client {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    async fn call(&self, method: Method, uri: &str, body: Vec<u8>) -> Result<Bytes, ControlError> {
        let stream = UnixStream::connect(&self.path)
            .await
            .map_err(|source| ControlError::Connect { path: self.path.clone(), source })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "gammaray-agent")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("static request parts are valid");
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        if status.is_success() {
            Ok(body)
        } else {
            Err(ControlError::Refused { status, body: String::from_utf8_lossy(&body).into_owned() })
        }
    }

    pub async fn enrol(&self, netns: &Path) -> Result<EnrolResponse, ControlError> {
        let body = serde_json::to_vec(&NetnsRequest { netns: netns.to_owned() })?;
        Ok(serde_json::from_slice(&self.call(Method::POST, "/enrol", body).await?)?)
    }

    pub async fn unenrol(&self, netns: &Path) -> Result<EnrolResponse, ControlError> {
        let body = serde_json::to_vec(&NetnsRequest { netns: netns.to_owned() })?;
        Ok(serde_json::from_slice(&self.call(Method::POST, "/unenrol", body).await?)?)
    }

    /// The text description of Service `namespace/name`.
    pub async fn describe(&self, namespace: &str, name: &str) -> Result<String, ControlError> {
        let body = self
            .call(Method::GET, &format!("/describe?namespace={namespace}&name={name}"), Vec::new())
            .await?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// How the authorization policies treat the workload (pod) `namespace/name`, and a
    /// connection from `from` (a SPIFFE URI; none: unauthenticated) to `port`.
    pub async fn describe_workload(
        &self,
        namespace: &str,
        name: &str,
        from: Option<&str>,
        port: u16,
    ) -> Result<String, ControlError> {
        let from = from.unwrap_or("");
        let path = format!("/describe/workload?namespace={namespace}&name={name}&from={from}&port={port}");
        let body = self.call(Method::GET, &path, Vec::new()).await?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// The agent's configuration as JSON.
    pub async fn config_dump(&self) -> Result<String, ControlError> {
        let body = self.call(Method::GET, "/config_dump", Vec::new()).await?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    pub async fn status(&self) -> Result<Status, ControlError> {
        Ok(serde_json::from_slice(&self.call(Method::GET, "/status", Vec::new()).await?)?)
    }
}
