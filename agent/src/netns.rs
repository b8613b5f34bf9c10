//! Network namespaces as the agent sees them: a path (`/proc/PID/ns/net`,
//! `/run/netns/NAME`) and the kernel's cookie for it, which is what the eBPF program gates on.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
};

use nix::sched::{CloneFlags, setns};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("cannot enter network namespace {path}: {source} (entering one needs CAP_SYS_ADMIN)")]
    Enter { path: PathBuf, source: nix::Error },
    #[error(
        "cannot read the cookie of network namespace {path}: {source} (SO_NETNS_COOKIE needs Linux 5.14)"
    )]
    Cookie { path: PathBuf, source: std::io::Error },
}

/// Returns the netns cookie of the namespace at `path`.
///
/// A cookie can only be read from a socket inside the namespace, so this creates one on a
/// short-lived thread that enters the namespace; the caller's thread never moves.
pub fn cookie_of(path: &Path) -> Result<u64, NetnsError> {
    let file =
        std::fs::File::open(path).map_err(|source| NetnsError::Open { path: path.to_owned(), source })?;
    let path = path.to_owned();
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
                    .map_err(|source| NetnsError::Enter { path: path.clone(), source })?;
                let socket = std::net::UdpSocket::bind("127.0.0.1:0")
                    .or_else(|_| std::net::UdpSocket::bind("0.0.0.0:0"))
                    .map_err(|source| NetnsError::Cookie { path: path.clone(), source })?;
                socket_netns_cookie(&socket).map_err(|source| NetnsError::Cookie { path, source })
            })
            .join()
            .expect("netns cookie thread does not panic")
    })
}

/// The netns cookie of the namespace this process runs in.
pub fn own_cookie() -> Result<u64, NetnsError> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")
        .map_err(|source| NetnsError::Cookie { path: PathBuf::from("/proc/self/ns/net"), source })?;
    socket_netns_cookie(&socket)
        .map_err(|source| NetnsError::Cookie { path: PathBuf::from("/proc/self/ns/net"), source })
}

fn socket_netns_cookie(socket: &std::net::UdpSocket) -> std::io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the fd is a live socket owned by `socket`; `cookie` and `len` are valid for
    // writes of the size passed, which is what SO_NETNS_COOKIE writes.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc == 0 { Ok(cookie) } else { Err(std::io::Error::last_os_error()) }
}
