//! A small HTTP/1.1 backend and client for the simulated cluster, on std threads and sockets
//! so they run in whichever namespace their sockets were made in.
//!
//! The backend answers every request with `200` and a body of `key=value` lines: `hostname`,
//! `message` (e.g. "hello from backend v1"), `method`, `path`, `peer`, then `header:<name>=<value>`
//! for each request header.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

/// A running HTTP backend; stops on drop.
pub struct HttpBackend {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    fd: i32,
    thread: Option<JoinHandle<()>>,
}

impl HttpBackend {
    pub fn start(listener: TcpListener, hostname: &str, message: &str) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd as _;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let fd = listener.as_raw_fd();
        let (hostname, message) = (hostname.to_owned(), message.to_owned());
        let (stop2, served2) = (stop.clone(), served.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (hostname, message, served) = (hostname.clone(), message.clone(), served2.clone());
                std::thread::spawn(move || serve(conn, &hostname, &message, &served));
            }
        });
        Ok(Self { addr, stop, served, fd, thread: Some(thread) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests answered so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Shutting a listening socket down wakes a blocked accept() on Linux.
        let _ = nix::sys::socket::shutdown(self.fd, nix::sys::socket::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One parsed request or response head.
struct Head {
    first: String,
    headers: Vec<(String, String)>,
}

fn read_head(reader: &mut BufReader<TcpStream>) -> std::io::Result<Option<Head>> {
    let mut first = String::new();
    if reader.read_line(&mut first)? == 0 {
        return Ok(None);
    }
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "head cut short"));
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
        if headers.len() > 200 {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "too many headers"));
        }
    }
    Ok(Some(Head { first: first.trim_end().to_owned(), headers }))
}

fn content_length(headers: &[(String, String)]) -> usize {
    headers.iter().find(|(k, _)| k == "content-length").and_then(|(_, v)| v.parse().ok()).unwrap_or(0)
}

fn serve(conn: TcpStream, hostname: &str, message: &str, served: &AtomicU64) {
    let peer = conn.peer_addr().map(|p| p.to_string()).unwrap_or_default();
    let Ok(writer) = conn.try_clone() else { return };
    let mut writer = writer;
    let mut reader = BufReader::new(conn);
    while let Ok(Some(head)) = read_head(&mut reader) {
        let mut body = vec![0u8; content_length(&head.headers).min(1 << 20)];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let mut parts = head.first.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let mut text =
            format!("hostname={hostname}\nmessage={message}\nmethod={method}\npath={path}\npeer={peer}\n");
        for (k, v) in &head.headers {
            text.push_str(&format!("header:{k}={v}\n"));
        }
        let close = head.headers.iter().any(|(k, v)| k == "connection" && v.eq_ignore_ascii_case("close"));
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n{text}",
            text.len(),
            if close { "connection: close\r\n" } else { "" }
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
        served.fetch_add(1, Ordering::Relaxed);
        if close {
            return;
        }
    }
}

/// A response as the client saw it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    /// The backend's `key=value` body lines (empty for other bodies).
    pub fields: BTreeMap<String, String>,
    pub body: String,
}

/// A keep-alive HTTP/1.1 client connection.
pub struct HttpClient {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
    host: String,
}

impl HttpClient {
    /// Connects (from the calling thread's namespace) to `addr`, sending `host` as Host.
    pub fn connect(addr: SocketAddr, host: &str, timeout: Duration) -> std::io::Result<Self> {
        let conn = TcpStream::connect_timeout(&addr, timeout)?;
        conn.set_read_timeout(Some(timeout))?;
        conn.set_nodelay(true)?;
        Ok(Self { writer: conn.try_clone()?, reader: BufReader::new(conn), host: host.to_owned() })
    }

    pub fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> std::io::Result<Reply> {
        let mut req = format!("GET {path} HTTP/1.1\r\nhost: {}\r\n", self.host);
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        self.writer.write_all(req.as_bytes())?;
        let head = read_head(&mut self.reader)?
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"))?;
        let status = head.first.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let mut body = vec![0u8; content_length(&head.headers)];
        self.reader.read_exact(&mut body)?;
        let body = String::from_utf8_lossy(&body).into_owned();
        let fields = body
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Ok(Reply { status, headers: head.headers.into_iter().collect(), fields, body })
    }
}
