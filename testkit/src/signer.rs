//! A local signer (`gammaray-agent ca serve --local`): the one process of a simulated cluster
//! that holds the mesh root's key, as the signer Deployment does on a real one. Agents reach it
//! over its Unix socket with a token per node ([`SignerAccess::token_for`]).

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// A running local signer; dropping it kills the process.
pub struct Signer {
    child: Child,
    /// The signer's directory: its roots, socket, tokens and log.
    pub dir: PathBuf,
    pub log: PathBuf,
    access: SignerAccess,
}

/// What an agent needs to reach a signer.
#[derive(Debug, Clone)]
pub struct SignerAccess {
    pub socket: PathBuf,
    pub tokens: PathBuf,
}

impl Signer {
    /// Starts the signer `bin` on `dir` (made if missing), with `extra` arguments of
    /// `ca serve` (`--node-ca-lifetime`, …), and waits until its socket accepts.
    pub fn start(bin: &Path, dir: &Path, extra: &[String]) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let socket = dir.join("signer.sock");
        let tokens = dir.join("tokens");
        let log = dir.join("signer.log");
        let _ = std::fs::remove_file(&socket);
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        let child = Command::new(bin)
            .args(["ca", "serve", "--local"])
            .arg(dir)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("start the signer {}", bin.display()))?;
        let mut signer = Self { child, dir: dir.to_owned(), log, access: SignerAccess { socket, tokens } };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&signer.access.socket).is_err() {
            if let Some(status) = signer.child.try_wait()? {
                bail!("the signer exited ({status}):\n{}", signer.log_text());
            }
            if Instant::now() >= deadline {
                bail!("the signer's socket does not accept after 10 s:\n{}", signer.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(signer)
    }

    pub fn access(&self) -> SignerAccess {
        self.access.clone()
    }

    /// The signing root's certificate and key, as the signer keeps them (for tests that play
    /// a compromised node).
    pub fn root_pem(&self) -> anyhow::Result<(String, String)> {
        let read = |f: &str| std::fs::read_to_string(self.dir.join(f)).with_context(|| format!("read {f}"));
        Ok((read("ca.crt")?, read("ca.key")?))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: the signer is gone until another is started on the same directory (which
    /// keeps the roots and the tokens).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Signer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.access.socket);
    }
}

impl SignerAccess {
    /// A new token for `node`, registered with the signer; the file an agent reads it from.
    pub fn token_for(&self, node: &str) -> anyhow::Result<PathBuf> {
        let token: String = (0..32).map(|_| fastrand::alphanumeric()).collect();
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&self.tokens)?;
        writeln!(file, "{token} {node}")?;
        let dir = self.tokens.parent().unwrap_or(Path::new("."));
        let path = dir.join(format!("{node}-{}.token", &token[..8]));
        std::fs::write(&path, &token)?;
        Ok(path)
    }
}
