//! Table-driven tests of translation and the decisions it leads to: precedence, producer and
//! consumer routes, ports, filters and redirects, weights, status, and bad input.

use std::net::SocketAddr;

use gammaray_proxy::{
    route::{Decision, RequestView, decide},
    snapshot::{Frontend, Snapshot},
};
use http::{HeaderMap, HeaderName, HeaderValue, Method};

use super::{Options, RouteStatus, Translation, translate};
use crate::store::Store;

/// Namespace `shop` with Services `web` (10.96.0.1), `v1` (10.96.0.2), `v2` (10.96.0.3), each
/// with ports http 80 → 8080 and grpc 7070, one pod each; `headless` and `external` Services;
/// a client namespace `other`.
const WORLD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.1
  ports: [{name: http, port: 80, targetPort: 8080, appProtocol: http}, {name: grpc, port: 7070, appProtocol: kubernetes.io/h2c}]
---
apiVersion: v1
kind: Service
metadata: {name: v1, namespace: shop}
spec:
  clusterIP: 10.96.0.2
  ports: [{name: http, port: 80, targetPort: 8080}, {name: grpc, port: 7070}]
---
apiVersion: v1
kind: Service
metadata: {name: v2, namespace: shop}
spec:
  clusterIP: 10.96.0.3
  ports: [{name: http, port: 80, targetPort: 8080}, {name: grpc, port: 7070}]
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: shop}
spec: {clusterIP: None, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: external, namespace: shop}
spec: {type: ExternalName, externalName: example.org, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Pod
metadata: {name: v1-abc-1, namespace: shop}
spec: {nodeName: node1, serviceAccountName: v1-sa, containers: [{name: c, image: i}]}
status: {podIP: 10.244.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: v2-abc-1, namespace: shop}
spec: {nodeName: node2, containers: [{name: c, image: i}]}
status: {podIP: 10.244.2.2}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: v1-x, namespace: shop, labels: {kubernetes.io/service-name: v1}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: grpc, port: 7070}]
endpoints: [{addresses: [10.244.1.2], conditions: {ready: true}, targetRef: {kind: Pod, name: v1-abc-1, namespace: shop}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: v2-x, namespace: shop, labels: {kubernetes.io/service-name: v2}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: grpc, port: 7070}]
endpoints:
- {addresses: [10.244.2.2], conditions: {ready: true}, targetRef: {kind: Pod, name: v2-abc-1, namespace: shop}}
- {addresses: [10.244.2.9], conditions: {ready: false}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-x, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: grpc, port: 7070}]
endpoints:
- {addresses: [10.244.1.2], conditions: {ready: true}}
- {addresses: [10.244.2.2], conditions: {ready: true}}
"#;

fn translated(routes: &str) -> Translation {
    let mut store = Store::default();
    for text in [WORLD, routes] {
        let applied = store.apply_yaml(text);
        assert!(applied.errors.is_empty(), "fixtures parse: {:?}", applied.errors);
    }
    translate(&store, &Options::default())
}

fn frontend<'a>(s: &'a Snapshot, addr: &str) -> &'a Frontend {
    s.frontend(addr.parse::<SocketAddr>().expect("addr")).expect("frontend exists")
}

/// Sends a GET and names the outcome: `svc:<service>` for a forward, the status otherwise.
fn route(f: &Frontend, client_ns: &str, method: &Method, target: &str, headers: &[(&str, &str)]) -> String {
    let mut map = HeaderMap::new();
    for (n, v) in headers {
        map.append(
            HeaderName::from_bytes(n.as_bytes()).expect("name"),
            HeaderValue::from_str(v).expect("value"),
        );
    }
    let (path, query) = target.split_once('?').map_or((target, None), |(p, q)| (p, Some(q)));
    let view = RequestView { method, scheme: "http", host: Some("web"), path, query, headers: &map };
    match decide(f, Some(client_ns), &view, 0) {
        Decision::Passthrough(b) => format!("pass:{}", b.service.name),
        Decision::Forward(fw) => format!("svc:{}", fw.backend.service.name),
        Decision::Respond(r) => match r.headers.first() {
            Some((_, loc)) => format!("{} {}", r.status, loc.to_str().expect("ascii")),
            None => r.status.to_string(),
        },
    }
}

fn get(f: &Frontend, client_ns: &str, target: &str, headers: &[(&str, &str)]) -> String {
    route(f, client_ns, &Method::GET, target, headers)
}

fn status_of<'a>(t: &'a Translation, route: &str) -> &'a RouteStatus {
    t.statuses.iter().find(|s| s.route == route).unwrap_or_else(|| panic!("status of {route}"))
}

fn condition(t: &Translation, route: &str, type_: &str) -> (String, String) {
    let c = status_of(t, route).parents[0].condition(type_).unwrap_or_else(|| panic!("{type_} on {route}"));
    (c.status.to_owned(), c.reason.to_owned())
}

fn http_route(name: &str, ns: &str, parent: &str, rules: &str) -> String {
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: {ns}, generation: 3}}\nspec:\n  parentRefs: [{parent}]\n  rules:\n{rules}\n"
    )
}

const WEB: &str = "{group: '', kind: Service, name: web, namespace: shop}";
const WEB80: &str = "{group: '', kind: Service, name: web, namespace: shop, port: 80}";

#[test]
fn precedence_across_rules_and_routes() {
    let rules = r#"
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: v2, port: 80}]
  - matches: [{path: {type: Exact, value: /api/exact}}]
    backendRefs: [{name: web, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api/v2}, headers: [{name: x-canary, value: "yes"}]}]
    backendRefs: [{name: web, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api/v2}}]
    backendRefs: [{name: v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /m}, method: POST}]
    backendRefs: [{name: v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /m}, headers: [{name: a, value: "1"}, {name: b, value: "2"}]}]
    backendRefs: [{name: web, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /q}, queryParams: [{name: x, value: "1"}]}]
    backendRefs: [{name: v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /q}, headers: [{name: h, value: "1"}]}]
    backendRefs: [{name: web, port: 80}]
  - matches: [{path: {type: RegularExpression, value: "/re/[0-9]+"}}]
    backendRefs: [{name: v2, port: 80}]
"#;
    let t = translated(&http_route("main", "shop", WEB80, rules));
    let f = frontend(&t.snapshot, "10.96.0.1:80");
    type Case<'a> = (&'a Method, &'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case<'_>] = &[
        (&Method::GET, "/", &[], "svc:v1"),
        (&Method::GET, "/apix", &[], "svc:v1"),
        (&Method::GET, "/api", &[], "svc:v2"),
        (&Method::GET, "/api/exact", &[], "svc:web"),
        (&Method::GET, "/api/exact/more", &[], "svc:v2"),
        (&Method::GET, "/api/v2/x", &[], "svc:v1"),
        (&Method::GET, "/api/v2/x", &[("x-canary", "yes")], "svc:web"),
        (&Method::GET, "/api/v2/x", &[("X-Canary", "no")], "svc:v1"),
        // A method match outranks header matches at the same path.
        (&Method::POST, "/m", &[("a", "1"), ("b", "2")], "svc:v2"),
        (&Method::GET, "/m", &[("a", "1"), ("b", "2")], "svc:web"),
        (&Method::GET, "/m", &[("a", "1")], "svc:v1"),
        // Header matches outrank query matches.
        (&Method::GET, "/q?x=1", &[("h", "1")], "svc:web"),
        (&Method::GET, "/q?x=1", &[], "svc:v2"),
        (&Method::GET, "/re/42", &[], "svc:v2"),
        (&Method::GET, "/re/4x", &[], "svc:v1"),
    ];
    for (method, target, headers, expected) in cases {
        assert_eq!(&route(f, "shop", method, target, headers), expected, "{method} {target} {headers:?}");
    }
}

#[test]
fn ties_go_to_the_older_route_then_to_the_name() {
    let rule = |svc: &str| {
        format!(
            "  - matches: [{{path: {{type: PathPrefix, value: /}}}}]\n    backendRefs: [{{name: {svc}, port: 80}}]"
        )
    };
    let older = http_route("zzz", "shop", WEB80, &rule("v2"))
        .replace("generation: 3}", "generation: 3, creationTimestamp: '2024-01-01T00:00:00Z'}");
    let newer = http_route("aaa", "shop", WEB80, &rule("v1"))
        .replace("generation: 3}", "generation: 3, creationTimestamp: '2025-01-01T00:00:00Z'}");
    let t = translated(&format!("{older}{newer}"));
    assert_eq!(get(frontend(&t.snapshot, "10.96.0.1:80"), "shop", "/", &[]), "svc:v2", "older route wins");

    let t = translated(&format!(
        "{}{}",
        http_route("bbb", "shop", WEB80, &rule("v2")),
        http_route("aaa", "shop", WEB80, &rule("v1"))
    ));
    assert_eq!(get(frontend(&t.snapshot, "10.96.0.1:80"), "shop", "/", &[]), "svc:v1", "then namespace/name");
}

#[test]
fn producer_and_consumer_routes() {
    let producer = http_route("prod", "shop", WEB, "  - backendRefs: [{name: v1, port: 80}]");
    let consumer =
        http_route("cons", "other", WEB, "  - backendRefs: [{name: v2, namespace: shop, port: 80}]");
    let t = translated(&format!("{producer}{consumer}"));
    let f = frontend(&t.snapshot, "10.96.0.1:80");
    assert_eq!(get(f, "shop", "/", &[]), "svc:v1", "producer route for the producer's namespace");
    assert_eq!(get(f, "third", "/", &[]), "svc:v1", "producer route for any other namespace");
    assert_eq!(get(f, "other", "/", &[]), "svc:v2", "the consumer route replaces it in its namespace");
    // A consumer route alone leaves other namespaces without routes: plain Service traffic.
    let t = translated(&consumer);
    let f = frontend(&t.snapshot, "10.96.0.1:80");
    assert_eq!(get(f, "shop", "/", &[]), "pass:web");
    assert_eq!(get(f, "other", "/", &[]), "svc:v2");
    assert_eq!(condition(&t, "other/cons", "Accepted").0, "True");
}

#[test]
fn ports_and_section_names_bind_only_where_they_say() {
    let rule = "  - backendRefs: [{name: v1, port: 80}]";
    let t = translated(&http_route("p", "shop", WEB80, rule));
    assert_eq!(get(frontend(&t.snapshot, "10.96.0.1:80"), "shop", "/", &[]), "svc:v1");
    assert_eq!(get(frontend(&t.snapshot, "10.96.0.1:7070"), "shop", "/", &[]), "pass:web");
    let t = translated(&http_route(
        "p",
        "shop",
        "{group: '', kind: Service, name: web, sectionName: grpc}",
        rule,
    ));
    assert_eq!(get(frontend(&t.snapshot, "10.96.0.1:80"), "shop", "/", &[]), "pass:web");
    assert_eq!(get(frontend(&t.snapshot, "10.96.0.1:7070"), "shop", "/", &[]), "svc:v1");
    let t = translated(&http_route("p", "shop", WEB, rule));
    assert_eq!(
        get(frontend(&t.snapshot, "10.96.0.1:7070"), "shop", "/", &[]),
        "svc:v1",
        "no port: every port"
    );
    let t = translated(&http_route("p", "shop", "{group: '', kind: Service, name: web, port: 81}", rule));
    assert_eq!(condition(&t, "shop/p", "Accepted"), ("False".into(), "NoMatchingParent".into()));
    let t = translated(&http_route(
        "p",
        "shop",
        "{group: '', kind: Service, name: web, port: 80, sectionName: grpc}",
        rule,
    ));
    assert_eq!(
        condition(&t, "shop/p", "Accepted"),
        ("False".into(), "NoMatchingParent".into()),
        "port and sectionName disagree"
    );
}

#[test]
fn routes_apply_to_the_service_frontend_only_and_no_match_is_404() {
    let t = translated(&http_route(
        "p",
        "shop",
        WEB80,
        "  - matches: [{path: {type: Exact, value: /only}}]\n    backendRefs: [{name: v1, port: 80}]",
    ));
    let f = frontend(&t.snapshot, "10.96.0.1:80");
    assert_eq!(get(f, "shop", "/only", &[]), "svc:v1");
    assert_eq!(get(f, "shop", "/else", &[]), "404");
    assert!(
        t.snapshot.frontend("10.244.1.2:8080".parse().expect("addr")).is_none(),
        "pod IPs are no frontend"
    );
    // Routes attached to web do not apply to v1's own frontend.
    assert_eq!(get(frontend(&t.snapshot, "10.96.0.2:80"), "shop", "/else", &[]), "pass:v1");
    // Without routes, the frontend passes traffic to the Service's ready endpoints.
    let t = translated("");
    let v2 = frontend(&t.snapshot, "10.96.0.3:80");
    assert_eq!(v2.default_backend.endpoints.len(), 1, "the not-ready endpoint is left out");
    assert_eq!(v2.default_backend.endpoints[0].addr(), "10.244.2.2:8080".parse().expect("addr"));
    assert_eq!(
        v2.default_backend.endpoints[0].identity().map(|i| &**i),
        Some("spiffe://cluster.local/ns/shop/sa/default")
    );
    let v1 = frontend(&t.snapshot, "10.96.0.2:80");
    assert_eq!(
        v1.default_backend.endpoints[0].identity().map(|i| &**i),
        Some("spiffe://cluster.local/ns/shop/sa/v1-sa")
    );
    assert_eq!(v1.default_backend.endpoints[0].node().map(|n| &**n), Some("node1"));
}

#[test]
fn redirects_have_exact_locations() {
    let rules = r#"
  - matches: [{path: {type: PathPrefix, value: /host}}]
    filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org}}]
  - matches: [{path: {type: PathPrefix, value: /status}}]
    filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org, statusCode: 301}}]
  - matches: [{path: {type: PathPrefix, value: /port}}]
    filters: [{type: RequestRedirect, requestRedirect: {port: 8083, statusCode: 308}}]
  - matches: [{path: {type: PathPrefix, value: /scheme}}]
    filters: [{type: RequestRedirect, requestRedirect: {scheme: https, statusCode: 307}}]
  - matches: [{path: {type: PathPrefix, value: /prefix}}]
    filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}, statusCode: 303}}]
  - matches: [{path: {type: PathPrefix, value: /full}}]
    filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /one}}}]
"#;
    let t = translated(&http_route("r", "shop", WEB, rules));
    let f80 = frontend(&t.snapshot, "10.96.0.1:80");
    let f7070 = frontend(&t.snapshot, "10.96.0.1:7070");
    let cases = [
        (f80, "/host/x?a=1", "302 http://example.org/host/x?a=1"),
        (f80, "/status", "301 http://example.org/status"),
        (f80, "/port", "308 http://web:8083/port"),
        (f80, "/scheme/s", "307 https://web/scheme/s"),
        (f80, "/prefix/a/b", "303 http://web/new/a/b"),
        (f80, "/prefix", "303 http://web/new"),
        (f80, "/full/x", "302 http://web/one"),
        // Without a scheme or port, the port is the Service port the request was sent to.
        (f7070, "/full/x", "302 http://web:7070/one"),
        (f7070, "/scheme", "307 https://web/scheme"),
    ];
    for (f, target, expected) in cases {
        assert_eq!(get(f, "shop", target, &[]), expected, "{target} on port {}", f.port);
    }
}

#[test]
fn filters_modify_what_the_backend_and_client_see() {
    let rules = r#"
  - matches: [{path: {type: PathPrefix, value: /api}}]
    filters:
    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-Set, value: s}], add: [{name: X-Add, value: a}], remove: [X-Gone]}}
    - {type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: X-Resp, value: r}]}}
    - {type: URLRewrite, urlRewrite: {hostname: internal.web, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: v2, port: 80}, percent: 25}}
    backendRefs:
    - name: v1
      port: 80
      filters: [{type: RequestHeaderModifier, requestHeaderModifier: {add: [{name: X-Backend, value: v1}]}}]
    timeouts: {request: 10s, backendRequest: 2s}
"#;
    let t = translated(&http_route("f", "shop", WEB80, rules));
    let f = frontend(&t.snapshot, "10.96.0.1:80");
    let mut headers = HeaderMap::new();
    headers.insert("x-set", HeaderValue::from_static("old"));
    headers.insert("x-add", HeaderValue::from_static("first"));
    headers.insert("x-gone", HeaderValue::from_static("bye"));
    let view = RequestView {
        method: &Method::GET,
        scheme: "http",
        host: Some("web"),
        path: "/api/users",
        query: None,
        headers: &headers,
    };
    let Decision::Forward(fw) = decide(f, Some("shop"), &view, 0) else { panic!("forwarded") };
    let mut sent = headers.clone();
    fw.apply_request_headers(&mut sent);
    assert_eq!(sent["x-set"], "s");
    assert_eq!(sent["x-add"], "first,a");
    assert!(!sent.contains_key("x-gone"));
    assert_eq!(sent["x-backend"], "v1");
    assert_eq!(sent["host"], "internal.web");
    assert_eq!(fw.rewritten_path("/api/users").as_deref(), Some("/v2/users"));
    let mut resp = HeaderMap::new();
    fw.apply_response_headers(&mut resp);
    assert_eq!(resp["x-resp"], "r");
    let mirrors: Vec<_> = fw.mirrors().collect();
    assert_eq!(mirrors.len(), 1);
    assert_eq!((mirrors[0].numerator, mirrors[0].denominator), (25, 100));
    assert_eq!(fw.timeouts.request, Some(std::time::Duration::from_secs(10)));
    assert_eq!(fw.timeouts.backend_request, Some(std::time::Duration::from_secs(2)));
}

#[test]
fn weights_zero_absent_and_all_zero() {
    let rules = r#"
  - matches: [{path: {type: Exact, value: /zero}}]
    backendRefs: [{name: v1, port: 80, weight: 0}, {name: v2, port: 80}]
  - matches: [{path: {type: Exact, value: /allzero}}]
    backendRefs: [{name: v1, port: 80, weight: 0}, {name: v2, port: 80, weight: 0}]
  - matches: [{path: {type: Exact, value: /none}}]
  - matches: [{path: {type: Exact, value: /missing}}]
    backendRefs: [{name: nope, port: 80}]
  - matches: [{path: {type: Exact, value: /half}}]
    backendRefs: [{name: v1, port: 80}, {name: nope, port: 80}]
"#;
    let t = translated(&http_route("w", "shop", WEB80, rules));
    let f = frontend(&t.snapshot, "10.96.0.1:80");
    for r in 0..20u64 {
        let view_headers = HeaderMap::new();
        let view = |path| RequestView {
            method: &Method::GET,
            scheme: "http",
            host: None,
            path,
            query: None,
            headers: &view_headers,
        };
        let name = |d: Decision<'_>| match d {
            Decision::Forward(fw) => fw.backend.service.name.to_string(),
            Decision::Respond(r) => r.status.to_string(),
            Decision::Passthrough(_) => "pass".into(),
        };
        assert_eq!(name(decide(f, None, &view("/zero"), r)), "v2");
        assert_eq!(name(decide(f, None, &view("/allzero"), r)), "500");
        assert_eq!(name(decide(f, None, &view("/none"), r)), "500");
        assert_eq!(name(decide(f, None, &view("/missing"), r)), "500");
        let half = name(decide(f, None, &view("/half"), r));
        assert!(half == "v1" || half == "500", "{half}");
    }
    assert_eq!(condition(&t, "shop/w", "ResolvedRefs"), ("False".into(), "BackendNotFound".into()));
    assert_eq!(condition(&t, "shop/w", "Accepted"), ("True".into(), "Accepted".into()));
}

#[test]
fn grpc_routes_match_service_method_and_headers_and_win_over_http_routes() {
    let grpc = r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: web, port: 7070}]
  rules:
  - matches: [{method: {service: pkg.Echo, method: Echo}}]
    backendRefs: [{name: v1, port: 7070}]
  - matches: [{method: {service: pkg.Echo}, headers: [{name: x-test-case, value: two}]}]
    backendRefs: [{name: v2, port: 7070}]
  - matches: [{method: {type: RegularExpression, service: "pkg\\..*"}}]
    backendRefs: [{name: web, port: 7070}]
"#;
    let http = http_route(
        "h",
        "shop",
        "{group: '', kind: Service, name: web, port: 7070}",
        "  - backendRefs: [{name: v1, port: 80}]",
    );
    let t = translated(&format!("{grpc}{http}"));
    let f = frontend(&t.snapshot, "10.96.0.1:7070");
    let post = Method::POST;
    assert_eq!(route(f, "shop", &post, "/pkg.Echo/Echo", &[]), "svc:v1");
    assert_eq!(
        route(f, "shop", &post, "/pkg.Echo/Echo", &[("x-test-case", "two")]),
        "svc:v1",
        "service+method outranks"
    );
    assert_eq!(route(f, "shop", &post, "/pkg.Echo/Other", &[("x-test-case", "two")]), "svc:v2");
    assert_eq!(route(f, "shop", &post, "/pkg.Other/X", &[]), "svc:web");
    assert_eq!(route(f, "shop", &post, "/elsewhere.S/X", &[]), "404");
    assert_eq!(condition(&t, "shop/h", "Accepted"), ("False".into(), "Conflicted".into()));
    assert_eq!(condition(&t, "shop/g", "Accepted"), ("True".into(), "Accepted".into()));
}

#[test]
fn bad_input_is_rejected_with_a_reason_and_the_rest_keeps_working() {
    let good = http_route(
        "good",
        "shop",
        WEB80,
        "  - matches: [{path: {type: PathPrefix, value: /good}}]\n    backendRefs: [{name: v1, port: 80}]",
    );
    let cases: &[(&str, String, &str, &str)] = &[
        (
            "regex",
            http_route(
                "bad",
                "shop",
                WEB80,
                "  - matches: [{path: {type: RegularExpression, value: '/(unclosed'}}]\n    backendRefs: [{name: v1, port: 80}]",
            ),
            "Accepted",
            "UnsupportedValue",
        ),
        (
            "filter",
            http_route(
                "bad",
                "shop",
                WEB80,
                "  - filters: [{type: ExtensionRef, extensionRef: {group: x.io, kind: Foo, name: f}}]\n    backendRefs: [{name: v1, port: 80}]",
            ),
            "Accepted",
            "UnsupportedValue",
        ),
        (
            "headless",
            http_route(
                "bad",
                "shop",
                "{group: '', kind: Service, name: headless}",
                "  - backendRefs: [{name: v1, port: 80}]",
            ),
            "Accepted",
            "UnsupportedValue",
        ),
        (
            "external",
            http_route(
                "bad",
                "shop",
                "{group: '', kind: Service, name: external}",
                "  - backendRefs: [{name: v1, port: 80}]",
            ),
            "Accepted",
            "UnsupportedValue",
        ),
        (
            "missing parent",
            http_route(
                "bad",
                "shop",
                "{group: '', kind: Service, name: ghost}",
                "  - backendRefs: [{name: v1, port: 80}]",
            ),
            "Accepted",
            "NoMatchingParent",
        ),
        (
            "kind",
            http_route(
                "bad",
                "shop",
                WEB80,
                "  - matches: [{path: {type: PathPrefix, value: /kind}}]\n    backendRefs: [{group: example.io, kind: Bucket, name: b}]",
            ),
            "ResolvedRefs",
            "InvalidKind",
        ),
        (
            "weight",
            http_route("bad", "shop", WEB80, "  - backendRefs: [{name: v1, port: 80, weight: 1000001}]"),
            "Accepted",
            "UnsupportedValue",
        ),
        (
            "negative weight",
            http_route("bad", "shop", WEB80, "  - backendRefs: [{name: v1, port: 80, weight: -1}]"),
            "Accepted",
            "UnsupportedValue",
        ),
        (
            "redirect status",
            http_route(
                "bad",
                "shop",
                WEB80,
                "  - filters: [{type: RequestRedirect, requestRedirect: {statusCode: 399}}]",
            ),
            "Accepted",
            "UnsupportedValue",
        ),
        (
            "timeouts",
            http_route(
                "bad",
                "shop",
                WEB80,
                "  - backendRefs: [{name: v1, port: 80}]\n    timeouts: {request: 1s, backendRequest: 2s}",
            ),
            "Accepted",
            "UnsupportedValue",
        ),
        (
            "prefix rewrite on exact",
            http_route(
                "bad",
                "shop",
                WEB80,
                "  - matches: [{path: {type: Exact, value: /e}}]\n    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /x}}}]\n    backendRefs: [{name: v1, port: 80}]",
            ),
            "Accepted",
            "UnsupportedValue",
        ),
    ];
    for (what, bad, cond, reason) in cases {
        let t = translated(&format!("{good}{bad}"));
        let (status, got_reason) = condition(&t, "shop/bad", cond);
        assert_eq!((status.as_str(), got_reason.as_str()), ("False", *reason), "{what}");
        assert_eq!(status_of(&t, "shop/bad").parents[0].conditions[0].observed_generation, Some(3), "{what}");
        let f = frontend(&t.snapshot, "10.96.0.1:80");
        assert_eq!(get(f, "shop", "/good", &[]), "svc:v1", "{what}: the good route still routes");
        assert_eq!(condition(&t, "shop/good", "Accepted").0, "True", "{what}");
    }
}

#[test]
fn a_partly_invalid_route_keeps_its_valid_rules() {
    let rules = "  - matches: [{path: {type: PathPrefix, value: /ok}}]\n    backendRefs: [{name: v1, port: 80}]\n  - matches: [{headers: [{name: x, type: RegularExpression, value: '('}]}]\n    backendRefs: [{name: v2, port: 80}]";
    let t = translated(&http_route("mixed", "shop", WEB80, rules));
    assert_eq!(condition(&t, "shop/mixed", "Accepted").0, "True");
    assert_eq!(condition(&t, "shop/mixed", "PartiallyInvalid"), ("True".into(), "UnsupportedValue".into()));
    let f = frontend(&t.snapshot, "10.96.0.1:80");
    assert_eq!(get(f, "shop", "/ok", &[]), "svc:v1");
    assert_eq!(get(f, "shop", "/other", &[("x", "(")]), "404", "the invalid rule is dropped");
}

#[test]
fn routes_to_gateways_are_not_ours() {
    let t = translated(&http_route(
        "gw",
        "shop",
        "{name: some-gateway}",
        "  - backendRefs: [{name: v1, port: 80}]",
    ));
    assert!(t.statuses.is_empty(), "no status for a Gateway parent: {:?}", t.statuses);
    assert_eq!(get(frontend(&t.snapshot, "10.96.0.1:80"), "shop", "/", &[]), "pass:web");
}

#[test]
fn refusal_messages_speak_the_users_terms_on_one_line() {
    let message = |rules: &str| {
        let t = translated(&http_route("bad", "shop", WEB80, rules));
        let c = status_of(&t, "shop/bad").parents[0].condition("Accepted").cloned().expect("Accepted");
        assert_eq!(c.status, "False", "{c:?}");
        c.message
    };
    let regex = message(
        "  - matches: [{headers: [{type: RegularExpression, name: x-user, value: 'a(b'}]}]\n    backendRefs: [{name: v1, port: 80}]",
    );
    assert!(regex.contains("\"a(b\""), "the pattern as written: {regex}");
    assert!(!regex.contains("^(?:"), "not the anchored internal form: {regex}");
    assert!(!regex.contains('\n'), "one line: {regex}");
    let cors = message(
        "  - filters: [{type: CORS, cors: {allowOrigins: ['https://a.example']}}]\n    backendRefs: [{name: v1, port: 80}]",
    );
    assert!(cors.contains("filter type CORS "), "the type as the route spells it: {cors}");
}

/// Shared names are shared, and names nobody holds any more do not pile up under churn.
#[test]
fn shared_names_are_one_copy_and_churn_does_not_grow_them() {
    let mut names = crate::store::Names::default();
    let a = names.get("shop");
    let b = names.get("shop");
    assert!(std::sync::Arc::ptr_eq(&a, &b), "one copy");
    let held: Vec<_> = (0..10).map(|i| names.get(&format!("kept-{i}"))).collect();
    for i in 0..100_000 {
        names.get(&format!("gone-{i}"));
    }
    assert!(names.names.len() < 4096, "swept: {} left", names.names.len());
    for (i, n) in held.iter().enumerate() {
        assert!(
            std::sync::Arc::ptr_eq(n, &names.get(&format!("kept-{i}"))),
            "a held name survives the sweeps"
        );
    }
    assert!(std::sync::Arc::ptr_eq(&a, &names.get("shop")));
}

#[test]
fn pods_of_one_service_account_share_a_principal_and_churn_does_not_grow_them() {
    let mut principals = super::Principals::new("cluster.local");
    let (shop, web): (std::sync::Arc<str>, std::sync::Arc<str>) = ("shop".into(), "web".into());
    let a = principals.get(&shop, Some(&web));
    let b = principals.get(&"shop".into(), Some(&"web".into()));
    assert!(std::sync::Arc::ptr_eq(&a, &b), "one copy per namespace and service account");
    assert_eq!(&*a.uri, "spiffe://cluster.local/ns/shop/sa/web");
    assert_eq!(a.identity.to_string(), *a.uri);
    assert_eq!(&*principals.get(&shop, None).uri, "spiffe://cluster.local/ns/shop/sa/default");
    for i in 0..100_000 {
        principals.get(&shop, Some(&format!("gone-{i}").into()));
    }
    assert!(principals.by_account.len() < 4096, "swept: {} left", principals.by_account.len());
    assert!(std::sync::Arc::ptr_eq(&a, &principals.get(&shop, Some(&web))), "a held one survives the sweeps");
}

#[test]
fn an_endpoint_is_its_workload_unless_its_slice_says_otherwise() {
    let mut store = Store::default();
    let applied = store.apply_yaml(
        "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\n\
         spec: {clusterIP: 10.96.0.9, ports: [{name: tcp, port: 5432}]}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: db-0, namespace: shop}\n\
         spec: {nodeName: node1, serviceAccountName: db}\nstatus: {podIP: 10.244.1.9}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {name: db-1, namespace: shop, labels: {kubernetes.io/service-name: db}}\n\
         addressType: IPv4\nports: [{name: tcp, port: 5432}]\nendpoints:\n\
         - {addresses: [10.244.1.9], nodeName: node1, targetRef: {kind: Pod, name: db-0}}\n\
         - {addresses: [10.244.1.9], nodeName: node2, targetRef: {kind: Pod, name: db-old}}\n\
         - {addresses: [10.244.3.3], nodeName: node3, targetRef: {kind: Pod, name: elsewhere}}\n",
    );
    assert!(applied.errors.is_empty(), "{:?}", applied.errors);
    let t = translate(&store, &Options::default());
    let endpoints = &frontend(&t.snapshot, "10.96.0.9:5432").default_backend.endpoints;
    assert_eq!(endpoints.len(), 2, "one per address");
    let known = &endpoints[0];
    assert!(known.declared.is_none(), "the slice agrees with the workload: nothing more is kept");
    assert_eq!(known.pod().map(|p| p.to_string()).as_deref(), Some("shop/db-0"));
    assert_eq!(known.node().map(|n| &**n), Some("node1"));
    assert_eq!(known.identity().map(|i| &**i), Some("spiffe://cluster.local/ns/shop/sa/db"));
    let unknown = &endpoints[1];
    assert_eq!(unknown.addr(), "10.244.3.3:5432".parse().expect("addr"));
    assert_eq!(unknown.pod().map(|p| p.to_string()).as_deref(), Some("shop/elsewhere"), "the slice's pod");
    assert_eq!(unknown.node().map(|n| &**n), Some("node3"), "the slice's node");
    assert!(unknown.identity().is_none(), "no workload, no identity");
}
