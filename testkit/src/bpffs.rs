//! A bpf file system of the run's own, where its agents pin their maps and links: one
//! directory per node. Unmounting it removes every pin, so the links detach once the agents
//! holding them are gone, whatever state a test left.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Where runs mount their bpf file systems.
pub const ROOT: &str = "/run/gammaray-bpffs";

/// A mounted bpf file system, unmounted and removed on drop.
#[derive(Debug)]
pub struct Bpffs {
    path: PathBuf,
}

impl Bpffs {
    /// Mounts a new bpf file system at [`ROOT`]/`run`.
    pub fn mount(run: &str) -> Result<Self> {
        let path = Path::new(ROOT).join(run);
        std::fs::create_dir_all(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
        nix::mount::mount(Some("bpf"), &path, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
            .map_err(|e| {
                Error::Other(format!("cannot mount a bpf file system at {}: {e}", path.display()))
            })?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pin directory of node `node`.
    pub fn node(&self, node: &str) -> PathBuf {
        self.path.join(node)
    }
}

/// Unmounts `path` (lazily: a process still opening a pin does not keep the mount) and removes
/// the mount point.
pub fn unmount(path: &Path) -> Result<()> {
    match nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) => {}
        Err(e) => return Err(Error::Other(format!("cannot unmount {}: {e}", path.display()))),
    }
    std::fs::remove_dir(path).map_err(|source| Error::Io { path: path.to_owned(), source })
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        if let Err(err) = unmount(&self.path) {
            eprintln!("testkit: {err}");
        }
    }
}
