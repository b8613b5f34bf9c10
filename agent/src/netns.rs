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
    #[error("cannot listen inside network namespace {path}: {source}")]
    Listen { path: PathBuf, source: std::io::Error },
}

/// Returns the netns cookie of the namespace at `path`.
///
/// A cookie can only be read from a socket inside the namespace, so this creates one there
/// ([`in_netns`]).
pub fn cookie_of(path: &Path) -> Result<u64, NetnsError> {
    in_netns(path, |path| {
        let cookie = |source| NetnsError::Cookie { path: path.to_owned(), source };
        let socket = std::net::UdpSocket::bind("127.0.0.1:0")
            .or_else(|_| std::net::UdpSocket::bind("0.0.0.0:0"))
            .map_err(cookie)?;
        socket_netns_cookie(&socket).map_err(cookie)
    })
}

/// Runs `f` on a short-lived thread that enters the network namespace at `path`; the caller's
/// thread never moves. A socket `f` makes stays in that namespace.
fn in_netns<T: Send>(
    path: &Path,
    f: impl FnOnce(&Path) -> Result<T, NetnsError> + Send,
) -> Result<T, NetnsError> {
    let file =
        std::fs::File::open(path).map_err(|source| NetnsError::Open { path: path.to_owned(), source })?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
                    .map_err(|source| NetnsError::Enter { path: path.to_owned(), source })?;
                f(path)
            })
            .join()
            .expect("a thread in a network namespace does not panic")
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

/// A TCP listener inside the network namespace at `path`, bound to an ephemeral port on its
/// loopback address: the node proxy's inbound capture socket for a pod. The kernel's
/// `sk_lookup` program hands it connections meant for the pod's address, whatever address it
/// is bound to, so it takes no port the pod's own programs might want to listen on.
///
/// Made in the namespace ([`in_netns`]); the socket stays in it.
pub fn listener_in(path: &Path, backlog: i32) -> Result<std::net::TcpListener, NetnsError> {
    in_netns(path, |path| {
        let listen = || -> std::io::Result<std::net::TcpListener> {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            // The pod's loopback may not be up yet; the address need not be.
            socket.set_freebind_v4(true)?;
            socket.set_nonblocking(true)?;
            socket.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
            socket.listen(backlog)?;
            Ok(socket.into())
        };
        listen().map_err(|source| NetnsError::Listen { path: path.to_owned(), source })
    })
}

/// The address this network namespace's connections to `dst` come from: what the kernel's
/// route to it chooses, as for the kubelet's probes. A UDP socket's connect() sends nothing.
pub fn source_toward(dst: std::net::Ipv4Addr) -> std::io::Result<std::net::Ipv4Addr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    socket.connect((dst, 9))?;
    match socket.local_addr()?.ip() {
        std::net::IpAddr::V4(ip) => Ok(ip),
        std::net::IpAddr::V6(ip) => Err(std::io::Error::other(format!("an IPv6 source {ip} toward {dst}"))),
    }
}
