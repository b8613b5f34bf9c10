//! Match plus backend choice for one Service with 100 HTTPRoutes of 10 rules each (1000 rules),
//! and the translation that builds that table; and the translation of whole clusters of 100,
//! 1 000 and 5 000 Services of 10 endpoints each (a pod with a service account behind each, one
//! HTTPRoute per ten Services), for how its cost grows with the cluster.

use criterion::{Criterion, criterion_group, criterion_main};
use gammaray_agent::{
    store::Store,
    translate::{Options, translate},
};
use gammaray_proxy::route::{Decision, RequestView, decide};
use http::{HeaderMap, HeaderValue, Method};
use std::hint::black_box;

fn world() -> String {
    let mut y = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {clusterIP: 10.96.0.1, ports: [{name: http, port: 80, targetPort: 8080}]}\n",
    );
    for b in ["v1", "v2"] {
        y.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {b}, namespace: shop}}\nspec: {{clusterIP: 10.96.1.{}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n",
            if b == "v1" { 1 } else { 2 }
        ));
        y.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {b}-x, namespace: shop, labels: {{kubernetes.io/service-name: {b}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: [10.244.1.{}]}}, {{addresses: [10.244.2.{}]}}]\n",
            if b == "v1" { 2 } else { 3 },
            if b == "v1" { 2 } else { 3 }
        ));
    }
    for r in 0..100 {
        y.push_str(&format!(
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: route-{r:03}, namespace: shop}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: web, port: 80}}]\n  rules:\n"
        ));
        for j in 0..10 {
            y.push_str(&format!(
                "  - matches: [{{path: {{type: PathPrefix, value: /r{r}/p{j}}}, headers: [{{name: x-tenant, value: t{j}}}]}}]\n    filters: [{{type: RequestHeaderModifier, requestHeaderModifier: {{set: [{{name: x-route, value: r{r}}}]}}}}]\n    backendRefs: [{{name: v1, port: 80, weight: 90}}, {{name: v2, port: 80, weight: 10}}]\n"
            ));
        }
    }
    y
}

fn bench(c: &mut Criterion) {
    let mut store = Store::default();
    let applied = store.apply_yaml(&world());
    assert!(applied.errors.is_empty(), "{:?}", applied.errors);
    c.bench_function("translate 100 routes x 10 rules", |b| {
        b.iter(|| translate(black_box(&store), &Options::default()))
    });
    let t = translate(&store, &Options::default());
    let frontend = t.snapshot.frontend("10.96.0.1:80".parse().expect("addr")).expect("frontend");
    let mut headers = HeaderMap::new();
    headers.insert("x-tenant", HeaderValue::from_static("t7"));
    headers.insert("user-agent", HeaderValue::from_static("bench"));
    let cases =
        [("hit, last route", "/r99/p7/items"), ("hit, first route", "/r0/p7"), ("no match, 404", "/nowhere")];
    let mut random = 0x9e37_79b9_7f4a_7c15u64;
    for (name, path) in cases {
        c.bench_function(&format!("match+pick: {name}"), |b| {
            b.iter(|| {
                random = random.wrapping_mul(6364136223846793005).wrapping_add(1);
                let view = RequestView {
                    method: &Method::GET,
                    scheme: "http",
                    host: Some("web"),
                    path: black_box(path),
                    query: None,
                    headers: &headers,
                };
                match decide(frontend, Some("shop"), &view, random) {
                    Decision::Forward(f) => black_box(f.backend.port),
                    Decision::Respond(r) => black_box(r.status),
                    Decision::Passthrough(b) => black_box(b.port),
                }
            })
        });
    }
}

/// `services` Services in namespace `scale`, each with an EndpointSlice of 10 ready endpoints
/// whose pods exist (service account, node, IP), and an HTTPRoute on every tenth splitting it with
/// the next.
fn cluster(services: usize) -> String {
    let mut y = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: scale}\n");
    for s in 0..services {
        let vip = format!("10.96.{}.{}", s / 250, s % 250 + 1);
        y.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{s}, namespace: scale}}\nspec: {{clusterIP: '{vip}', ports: [{{name: http, port: 80, targetPort: 8080, appProtocol: http}}]}}\n"
        ));
        let mut endpoints = Vec::new();
        for e in 0..10 {
            let n = s * 10 + e;
            let ip = format!("10.{}.{}.{}", 128 + n / 62_500, (n / 250) % 250, n % 250 + 1);
            y.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{n}, namespace: scale, uid: uid-{n}}}\nspec: {{nodeName: node{}, serviceAccountName: sa-{s}, containers: [{{name: app, image: app}}]}}\nstatus: {{phase: Running, podIP: '{ip}', podIPs: [{{ip: '{ip}'}}]}}\n",
                n % 3
            ));
            endpoints.push(format!(
                "{{addresses: ['{ip}'], nodeName: node{}, conditions: {{ready: true}}, targetRef: {{kind: Pod, namespace: scale, name: pod-{n}}}}}",
                n % 3
            ));
        }
        y.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc-{s}-x, namespace: scale, labels: {{kubernetes.io/service-name: svc-{s}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{}]\n",
            endpoints.join(", ")
        ));
        if s % 10 == 0 && s + 1 < services {
            y.push_str(&format!(
                "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: split-{s}, namespace: scale}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: svc-{s}, port: 80}}]\n  rules:\n  - backendRefs: [{{name: svc-{s}, port: 80, weight: 90}}, {{name: svc-{}, port: 80, weight: 10}}]\n",
                s + 1
            ));
        }
    }
    y
}

fn scale(c: &mut Criterion) {
    let mut group = c.benchmark_group("translate a cluster");
    group.sample_size(10);
    for services in [100, 1_000, 5_000] {
        let mut store = Store::default();
        let applied = store.apply_yaml(&cluster(services));
        assert!(applied.errors.is_empty(), "{:?}", applied.errors);
        group.bench_function(format!("{services} Services x 10 endpoints"), |b| {
            b.iter(|| translate(black_box(&store), &Options::default()))
        });
    }
    group.finish();
}

criterion_group!(benches, bench, scale);
criterion_main!(benches);
