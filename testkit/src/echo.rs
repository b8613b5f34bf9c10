//! A TCP "who am I" echo server: on each connection it first writes one line,
//! `hostname=<h> local=<ip:port> peer=<ip:port>`, then echoes what it reads. Tests read the line
//! to see which backend answered, which address the connection arrived on and where it came from.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

/// A running echo server; stops on drop.
pub struct EchoServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    fd: i32,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    /// Serves on `listener` (created in whichever namespace it should live in).
    pub fn start(listener: TcpListener, hostname: &str) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let fd = listener.as_raw_fd();
        let hostname = hostname.to_owned();
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let hostname = hostname.clone();
                std::thread::spawn(move || serve(conn, &hostname));
            }
        });
        Ok(Self { addr, stop, fd, thread: Some(thread) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

fn serve(mut conn: TcpStream, hostname: &str) {
    let (Ok(local), Ok(peer)) = (conn.local_addr(), conn.peer_addr()) else {
        return;
    };
    if writeln!(conn, "hostname={hostname} local={local} peer={peer}").is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    while let Ok(n) = conn.read(&mut buf) {
        if n == 0 || conn.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Shutting a listening socket down wakes a blocked accept() on Linux; the listener is
        // owned by the accept thread and stays open until that thread is joined below.
        let _ = nix::sys::socket::shutdown(self.fd, nix::sys::socket::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the echo server said about a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    pub hostname: String,
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

impl Greeting {
    pub fn parse(line: &str) -> Option<Self> {
        let mut hostname = None;
        let mut local = None;
        let mut peer = None;
        for part in line.split_whitespace() {
            match part.split_once('=')? {
                ("hostname", v) => hostname = Some(v.to_owned()),
                ("local", v) => local = v.parse().ok(),
                ("peer", v) => peer = v.parse().ok(),
                _ => {}
            }
        }
        Some(Self { hostname: hostname?, local: local?, peer: peer? })
    }
}

/// Connects to `addr` (from the calling thread's namespace), reads the greeting, checks that a
/// payload comes back intact and returns the greeting.
pub fn call(addr: SocketAddr, timeout: Duration) -> std::io::Result<Greeting> {
    let conn = TcpStream::connect_timeout(&addr, timeout)?;
    conn.set_read_timeout(Some(timeout))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let greeting = Greeting::parse(line.trim()).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad greeting {line:?}"))
    })?;
    let mut conn = conn;
    conn.write_all(b"gammaray\n")?;
    let mut echoed = String::new();
    reader.read_line(&mut echoed)?;
    if echoed != "gammaray\n" {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad echo {echoed:?}")));
    }
    Ok(greeting)
}
