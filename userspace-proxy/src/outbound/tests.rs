use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use crate::{Inputs, Proxy, ProxyConfig, orig_dst::StaticTable, snapshot::Snapshot};

/// A plaintext proxy on 127.0.0.1 with an empty snapshot, looking destinations up in `table`.
fn start(table: &Arc<StaticTable>) -> (tokio::sync::watch::Sender<Arc<Snapshot>>, Proxy) {
    let (tx, snapshot) = tokio::sync::watch::channel(Arc::new(Snapshot::default()));
    let config = ProxyConfig { outbound_addr: (Ipv4Addr::LOCALHOST, 0).into(), ..ProxyConfig::default() };
    let inputs = Inputs { snapshot, lookup: table.clone(), certs: None };
    let proxy = Proxy::start(config, inputs, &tokio::runtime::Handle::current()).expect("the proxy starts");
    (tx, proxy)
}

async fn echo_once(listener: TcpListener) {
    let (mut s, _) = listener.accept().await.expect("echo accepts");
    let mut buf = vec![0u8; 1024];
    let n = s.read(&mut buf).await.expect("echo reads");
    s.write_all(&buf[..n]).await.expect("echo writes");
}

fn v4(addr: SocketAddr) -> SocketAddrV4 {
    match addr {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => panic!("test listeners are IPv4"),
    }
}

#[tokio::test]
async fn carries_a_connection_to_its_recorded_destination() {
    let backend = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind backend");
    let backend_addr = v4(backend.local_addr().expect("backend addr"));
    tokio::spawn(echo_once(backend));

    let table = Arc::new(StaticTable::default());
    let (_tx, proxy) = start(&table);
    let (proxy_addr, stats) = (proxy.outbound_addr(), proxy.stats().clone());

    let client = tokio::net::TcpSocket::new_v4().expect("socket");
    client.bind((Ipv4Addr::LOCALHOST, 0).into()).expect("bind client");
    let client_addr = v4(client.local_addr().expect("client addr"));
    table.insert(client_addr, backend_addr);
    let mut client: TcpStream = client.connect(proxy_addr).await.expect("connect to proxy");
    client.write_all(b"ping").await.expect("write");
    let mut reply = [0u8; 4];
    client.read_exact(&mut reply).await.expect("reply through the proxy");
    assert_eq!(&reply, b"ping");
    drop(client);

    let counts = stats.snapshot();
    assert_eq!(counts.accepted, 1);
    assert_eq!(counts.lookup_misses, 0);
}

#[tokio::test]
async fn closes_a_connection_with_no_recorded_destination_and_keeps_serving() {
    let table = Arc::new(StaticTable::default());
    let (_tx, proxy) = start(&table);
    let (proxy_addr, stats) = (proxy.outbound_addr(), proxy.stats().clone());

    for _ in 0..3 {
        let mut client = TcpStream::connect(proxy_addr).await.expect("connect to proxy");
        let mut buf = [0u8; 1];
        let n = client.read(&mut buf).await.unwrap_or(0);
        assert_eq!(n, 0, "the proxy closes an unknown connection without data");
    }
    assert_eq!(stats.snapshot().lookup_misses, 3);
}
