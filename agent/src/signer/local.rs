//! The signer on one machine: a Unix socket, a directory of roots, a file of node tokens.
//!
//! Each line on the socket is one JSON request and gets one JSON answer: a node CA request
//! (`{"token", "csr"}` → `{"certificate"}` or `{"refused", "reason"}`) or a request for the
//! trust bundle (`{"bundle": true}` → `{"bundle"}`). The tokens file has a line `TOKEN NODE`
//! per node, read at each request; it stands in for the TokenReview of a cluster.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};

use super::{ROOT_FILES, Roots, Signer, Store};
use gammaray_proxy::identity::node_ca::Refusal;

/// How long a request line may be: a CSR and a token fit many times over.
const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Request {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csr: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bundle: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Response {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The roots in `dir`, made there first if it has none (the key files mode 0600).
pub fn load_or_create(dir: &Path, trust_domain: &str) -> anyhow::Result<Store> {
    let store = read_dir(dir)?;
    if !store.is_empty() {
        return Ok(store);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let store = Roots::generate(trust_domain)?;
    write_dir(dir, &store)?;
    tracing::info!(dir = %dir.display(), "made a new mesh root");
    Ok(store)
}

/// The root files of `dir` that exist.
pub fn read_dir(dir: &Path) -> anyhow::Result<Store> {
    let mut store = Store::new();
    for name in ROOT_FILES {
        match std::fs::read_to_string(dir.join(name)) {
            Ok(text) => {
                store.insert(name.to_owned(), text);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.join(name).display())),
        }
    }
    Ok(store)
}

/// Writes `store` to `dir`, each file replaced whole (a rename), and removes what it lacks.
pub fn write_dir(dir: &Path, store: &Store) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    for name in ROOT_FILES {
        let path = dir.join(name);
        match store.get(name) {
            Some(text) => {
                let tmp = dir.join(format!(".{name}.tmp"));
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)
                    .with_context(|| format!("cannot write {}", tmp.display()))?;
                std::io::Write::write_all(&mut file, text.as_bytes())?;
                std::fs::rename(&tmp, &path)?;
            }
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            },
        }
    }
    Ok(())
}

/// The node `token` belongs to, by the tokens file.
fn authenticate(tokens: &Path, token: &str) -> Result<String, Refusal> {
    let text = std::fs::read_to_string(tokens)
        .map_err(|e| Refusal::Signer(format!("cannot read the tokens file {}: {e}", tokens.display())))?;
    text.lines()
        .filter_map(|line| line.split_once(' '))
        .find(|(t, _)| !token.is_empty() && *t == token)
        .map(|(_, node)| node.trim().to_owned())
        .ok_or_else(|| Refusal::Unauthenticated("the token is not one the signer issued to a node".into()))
}

/// What the local signer is given.
#[derive(Debug, Clone)]
pub struct Config {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub tokens: PathBuf,
}

/// Serves node CA requests on the socket until the task is dropped; reloads the roots when
/// their files change (a rotation step).
pub async fn serve(config: Config, signer: Arc<Signer>) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(&config.socket);
    let listener = tokio::net::UnixListener::bind(&config.socket)
        .with_context(|| format!("cannot bind {}", config.socket.display()))?;
    tracing::info!(socket = %config.socket.display(), "signer listening");
    let reload = {
        let (signer, dir) = (signer.clone(), config.dir.clone());
        tokio::spawn(async move {
            let mut last = read_dir(&dir).ok();
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let Ok(now) = read_dir(&dir) else { continue };
                if last.as_ref() == Some(&now) {
                    continue;
                }
                match Roots::load(&now) {
                    Ok(roots) => {
                        if signer.replace(roots) {
                            tracing::info!("the roots changed: the trust bundle is republished");
                        }
                        last = Some(now);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the root files do not load; keeping the roots in force")
                    }
                }
            }
        })
    };
    let _reload = super::AbortOnDrop(reload);
    loop {
        let (stream, _) = listener.accept().await?;
        let (signer, tokens) = (signer.clone(), config.tokens.clone());
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read.take(MAX_LINE as u64)).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let response = answer(&signer, &tokens, &line);
                let mut text = serde_json::to_string(&response).unwrap_or_default();
                text.push('\n');
                if write.write_all(text.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

fn answer(signer: &Signer, tokens: &Path, line: &str) -> Response {
    let refuse = |r: Refusal| Response {
        refused: Some(r.to_string()),
        reason: Some(r.reason().into()),
        ..Default::default()
    };
    let request: Request = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => return refuse(Refusal::Malformed(format!("not a request: {e}"))),
    };
    if request.bundle {
        return Response { bundle: Some(signer.roots().bundle()), ..Default::default() };
    }
    let Some(csr) = request.csr else {
        return refuse(Refusal::Malformed("no csr".into()));
    };
    let node = match authenticate(tokens, request.token.as_deref().unwrap_or_default()) {
        Ok(node) => node,
        Err(refusal) => {
            super::refused(&refusal, "unknown token");
            return refuse(refusal);
        }
    };
    match signer.sign(&csr, &node, &format!("node {node}")) {
        Ok(cert) => Response { certificate: Some(cert), ..Default::default() },
        Err(refusal) => refuse(refusal),
    }
}

/// Asks the signer at `socket` one question.
pub async fn ask(socket: &Path, request: &Request) -> anyhow::Result<Response> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("cannot reach the signer at {}", socket.display()))?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    write.write_all(line.as_bytes()).await?;
    let mut lines = BufReader::new(read.take(MAX_LINE as u64)).lines();
    let answer = lines.next_line().await?.context("the signer closed the connection")?;
    Ok(serde_json::from_str(&answer)?)
}
