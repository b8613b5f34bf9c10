//! Fuzzes what the proxy reads from a peer before any I/O of its own: an HTTP/1 request head
//! (parsed with httparse, as hyper parses it) through the Host checks and the routing decision,
//! and an HBONE CONNECT's authority through the inbound listener's choice of target. The input
//! is the head, a 0 byte, then the authority. Nothing may panic.
#![no_main]

use std::sync::OnceLock;

use gammaray_agent::{
    store::Store,
    translate::{Options, translate},
};
use gammaray_proxy::{
    identity::Identity,
    route::{Decision, RequestView, decide},
    snapshot::Snapshot,
};
use http::{HeaderMap, HeaderName, HeaderValue, Method, header};
use libfuzzer_sys::fuzz_target;

const WORLD: &str = include_str!("../seeds/world.yaml");
/// A node address and a host-network pod, so the CONNECT checks have both to refuse.
const NODES: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: node1}\nstatus: {addresses: [{type: InternalIP, address: '10.200.0.1'}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: agent, namespace: kube-system}\nspec: {nodeName: node1, hostNetwork: true, containers: [{name: c, image: i}]}\nstatus: {podIP: 10.200.0.1}\n";

fn snapshot() -> &'static Snapshot {
    static SNAPSHOT: OnceLock<Snapshot> = OnceLock::new();
    SNAPSHOT.get_or_init(|| {
        let mut store = Store::default();
        store.apply_yaml(WORLD);
        store.apply_yaml(NODES);
        translate(&store, &Options::default()).snapshot
    })
}

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|b| *b == 0).unwrap_or(data.len());
    let (head, rest) = data.split_at(split);
    let snapshot = snapshot();

    let mut raw = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut raw);
    if let Ok(httparse::Status::Complete(_)) = req.parse(head) {
        let method = req.method.and_then(|m| Method::from_bytes(m.as_bytes()).ok()).unwrap_or(Method::GET);
        let target = req.path.unwrap_or("/");
        let (path, query) = target.split_once('?').map_or((target, None), |(p, q)| (p, Some(q)));
        let mut headers = HeaderMap::new();
        for h in req.headers.iter() {
            if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(h.name.as_bytes()), HeaderValue::from_bytes(h.value)) {
                headers.append(n, v);
            }
        }
        // The proxy refuses two Hosts; with one, routing sees it without its port.
        if headers.get_all(header::HOST).iter().nth(1).is_none() {
            let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(|h| {
                h.rsplit_once(':').filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit())).map_or(h, |(h, _)| h)
            });
            let view = RequestView { method: &method, scheme: "http", host, path, query, headers: &headers };
            for frontend in snapshot.frontends.values() {
                for ns in [Some("shop"), None] {
                    if let Decision::Respond(r) = decide(frontend, ns, &view, 0x9e37_79b9) {
                        assert!((300..600).contains(&r.status));
                    }
                }
            }
        }
    }

    let authority = String::from_utf8_lossy(rest.get(1..).unwrap_or_default());
    let authority = http::uri::Authority::try_from(authority.as_ref()).ok();
    let local: Identity = "spiffe://cluster.local/ns/shop/sa/default".parse().expect("identity");
    if let Ok((target, _)) = snapshot.tunnel_target(authority.as_ref().map(|a| a.as_str()), "node1", &local) {
        assert!(!snapshot.nodes.values().any(|ip| *ip == target.ip()), "never a node's own address");
    }
});
