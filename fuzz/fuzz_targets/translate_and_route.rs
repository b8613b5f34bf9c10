//! Fuzzes translation and routing together: the input's first part is read as route YAML
//! applied over a fixed world, the rest drives requests against every frontend. Nothing may
//! panic, whatever the objects or requests.
#![no_main]

use gammaray_agent::{
    store::Store,
    translate::{Options, translate},
};
use gammaray_proxy::route::{Decision, RequestView, decide, redirect_location};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use libfuzzer_sys::fuzz_target;

const WORLD: &str = include_str!("../seeds/world.yaml");

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|b| *b == 0).unwrap_or(data.len());
    let (yaml, rest) = data.split_at(split);
    let mut store = Store::default();
    store.apply_yaml(WORLD);
    store.apply_yaml(&String::from_utf8_lossy(yaml));
    let t = translate(&store, &Options::default());

    let rest = rest.get(1..).unwrap_or_default();
    let text = String::from_utf8_lossy(rest);
    let mut parts = text.split('\n');
    let target = parts.next().unwrap_or("/");
    let target = if target.starts_with('/') { target.to_owned() } else { format!("/{target}") };
    let (path, query) = target.split_once('?').map_or((target.as_str(), None), |(p, q)| (p, Some(q)));
    let mut headers = HeaderMap::new();
    for line in parts.by_ref().take(8) {
        if let Some((n, v)) = line.split_once(':')
            && let (Ok(n), Ok(v)) = (HeaderName::from_bytes(n.trim().as_bytes()), HeaderValue::from_str(v.trim()))
        {
            headers.append(n, v);
        }
    }
    let methods = [Method::GET, Method::POST, Method::DELETE];
    let random = rest.iter().fold(0u64, |acc, b| acc.rotate_left(5) ^ u64::from(*b));
    for (i, frontend) in t.snapshot.frontends.values().enumerate() {
        let view = RequestView {
            method: &methods[i % methods.len()],
            scheme: "http",
            host: Some("web"),
            path,
            query,
            headers: &headers,
        };
        for ns in [Some("shop"), Some("other"), None] {
            match decide(frontend, ns, &view, random) {
                Decision::Forward(f) => {
                    let mut h = headers.clone();
                    f.apply_request_headers(&mut h);
                    let _ = f.rewritten_path(path);
                    let mut r = HeaderMap::new();
                    f.apply_response_headers(&mut r);
                }
                Decision::Respond(r) => assert!((300..600).contains(&r.status)),
                Decision::Passthrough(_) => {}
            }
        }
        if let Some(gammaray_proxy::snapshot::RouteTable::Http(rules)) = frontend.routes_for(None) {
            for rule in rules {
                for f in &rule.action.filters {
                    if let gammaray_proxy::snapshot::Filter::Redirect(r) = f {
                        let _ = redirect_location(r, frontend.port, Some(path), &view);
                    }
                }
            }
        }
    }
});
