//! `gammaray-agent describe service NAME -n NAMESPACE`: what the running agent does with a
//! Service, rendered from its current snapshot: ports and protocols, the routes attached for
//! producers and each consumer namespace with their rules and weights, the endpoints behind
//! every backend with their nodes and identities, and how traffic between nodes is protected.

use std::{collections::BTreeSet, fmt::Write as _};

use gammaray_proxy::snapshot::{
    AppProtocol, Backend, BackendTarget, Filter, Frontend, HttpMatch, PathMatch, RouteTable, Snapshot,
    ValueMatch,
};

use crate::translate::RouteStatus;

/// Renders the description, or `None` when the snapshot has no such Service frontend.
pub fn describe(
    snapshot: &Snapshot,
    statuses: &[&RouteStatus],
    namespace: &str,
    name: &str,
    mtls: bool,
) -> Option<String> {
    let mut frontends: Vec<(&std::net::SocketAddr, &Frontend)> = snapshot
        .frontends
        .iter()
        .filter(|(_, f)| *f.service.namespace == *namespace && *f.service.name == *name)
        .map(|(a, f)| (a, f.as_ref()))
        .collect();
    if frontends.is_empty() {
        return None;
    }
    frontends.sort_by_key(|(a, f)| (f.port, **a));
    let mut out = String::new();
    let ips: BTreeSet<String> = frontends.iter().map(|(a, _)| a.ip().to_string()).collect();
    let _ = writeln!(out, "Service: {name}.{namespace}");
    let _ = writeln!(out, "   ClusterIP: {}", ips.into_iter().collect::<Vec<_>>().join(", "));
    let _ = writeln!(
        out,
        "   Between nodes: {}",
        if mtls {
            "mutual TLS 1.3 (HBONE, HTTP/2 CONNECT on :15008), SPIFFE identities"
        } else {
            "PLAINTEXT (agent has no mesh CA)"
        }
    );
    let mut backends: Vec<&Backend> = Vec::new();
    let mut seen_ports = BTreeSet::new();
    for (_, f) in &frontends {
        if !seen_ports.insert(f.port) {
            continue;
        }
        let _ = writeln!(
            out,
            "   Port {}/{} → {} endpoints{}",
            f.port_name.as_deref().unwrap_or("-"),
            f.port,
            f.default_backend.endpoints.len(),
            match f.protocol {
                AppProtocol::Http => ", HTTP",
                AppProtocol::H2c => ", HTTP/2 (h2c)",
                AppProtocol::Opaque if f.is_http() => ", HTTP (routes attached)",
                AppProtocol::Opaque => ", TCP (L4 balancing)",
            }
        );
        backends.push(&f.default_backend);
        let groups = f
            .producer
            .iter()
            .map(|t| ("producer routes, for clients in every namespace".to_owned(), t))
            .chain(
                f.consumers
                    .iter()
                    .map(|(ns, t)| (format!("consumer routes, for clients in namespace {ns}"), t)),
            );
        let mut any = false;
        for (title, table) in groups {
            any = true;
            let _ = writeln!(out, "      {title}:");
            render_table(&mut out, table, &mut backends);
        }
        if !any {
            let _ = writeln!(out, "      no routes: balanced across the Service's endpoints");
        }
    }
    let attached: Vec<&RouteStatus> = statuses
        .iter()
        .copied()
        .filter(|s| {
            s.parents.iter().any(|p| p.parent_ref.namespace == namespace && p.parent_ref.name == name)
        })
        .collect();
    if !attached.is_empty() {
        let _ = writeln!(out, "   Route status:");
        for s in attached {
            for p in
                s.parents.iter().filter(|p| p.parent_ref.namespace == namespace && p.parent_ref.name == name)
            {
                let conds: Vec<String> =
                    p.conditions.iter().map(|c| format!("{}={} ({})", c.type_, c.status, c.reason)).collect();
                let _ = writeln!(out, "      {} {}: {}", s.kind, s.route, conds.join(", "));
            }
        }
    }
    let _ = writeln!(out, "Endpoints:");
    let mut shown = BTreeSet::new();
    for b in backends {
        if !shown.insert((b.service.clone(), b.port)) {
            continue;
        }
        let _ = writeln!(out, "   {}:{}", b.service, b.port);
        if b.endpoints.is_empty() {
            let _ = writeln!(out, "      (no ready endpoint)");
        }
        for e in &b.endpoints {
            let _ = writeln!(
                out,
                "      {:<21} node {:<8} {:<40} {}",
                e.addr().to_string(),
                e.node().map_or("?", |n| &**n),
                e.pod().map_or("-".to_owned(), |p| p.to_string()),
                e.identity().map_or("(no identity)", |i| &**i)
            );
        }
    }
    Some(out)
}

fn render_table<'a>(out: &mut String, table: &'a RouteTable, backends: &mut Vec<&'a Backend>) {
    match table {
        RouteTable::Http(rules) => {
            for r in rules {
                let _ = writeln!(
                    out,
                    "         {} {} rule {}{}: {}",
                    r.id.kind,
                    r.id.route,
                    r.id.rule,
                    r.id.rule_name.as_deref().map(|n| format!(" ({n})")).unwrap_or_default(),
                    http_match(&r.matcher)
                );
                render_action(out, &r.action, backends);
            }
        }
        RouteTable::Grpc(rules) => {
            for r in rules {
                let m = &r.matcher;
                let _ = writeln!(
                    out,
                    "         {} {} rule {}: service {} method {}{}",
                    r.id.kind,
                    r.id.route,
                    r.id.rule,
                    m.service.as_ref().map_or("*".to_owned(), value),
                    m.method.as_ref().map_or("*".to_owned(), value),
                    if m.headers.is_empty() {
                        String::new()
                    } else {
                        format!(", {} header match(es)", m.headers.len())
                    }
                );
                render_action(out, &r.action, backends);
            }
        }
    }
}

fn render_action<'a>(
    out: &mut String,
    action: &'a gammaray_proxy::snapshot::RuleAction,
    backends: &mut Vec<&'a Backend>,
) {
    for f in &action.filters {
        let _ = writeln!(out, "            filter: {}", filter(f));
    }
    let total: u64 = action.backends.iter().map(|b| u64::from(b.weight)).sum();
    for b in &action.backends {
        let share = if total == 0 { 0.0 } else { f64::from(b.weight) * 100.0 / total as f64 };
        match &b.target {
            BackendTarget::Service(svc) => {
                backends.push(svc);
                let _ = writeln!(
                    out,
                    "            → {}:{} weight {} ({share:.0}%), {} endpoints",
                    svc.service,
                    svc.port,
                    b.weight,
                    svc.endpoints.len()
                );
            }
            BackendTarget::Invalid { reason } => {
                let _ = writeln!(
                    out,
                    "            → INVALID weight {} ({share:.0}%, answers 500): {reason}",
                    b.weight
                );
            }
        }
    }
    if action.backends.is_empty() && !action.filters.iter().any(|f| matches!(f, Filter::Redirect(_))) {
        let _ = writeln!(out, "            → no backend (answers 500)");
    }
    if let Some(t) = action.timeouts.request {
        let _ = writeln!(out, "            timeout: request {t:?}");
    }
}

fn value(v: &ValueMatch) -> String {
    match v {
        ValueMatch::Exact(s) => s.clone(),
        ValueMatch::Regex(r) => format!("~{}", r.as_str()),
    }
}

fn http_match(m: &HttpMatch) -> String {
    let mut parts = vec![match &m.path {
        PathMatch::Exact(p) => format!("path = {p}"),
        PathMatch::Prefix(p) => format!("path prefix {p}"),
        PathMatch::Regex(r) => format!("path ~ {}", r.as_str()),
    }];
    if let Some(method) = &m.method {
        parts.push(format!("method {method}"));
    }
    parts.extend(m.headers.iter().map(|h| format!("header {}: {}", h.name, value(&h.value))));
    parts.extend(m.query.iter().map(|q| format!("query {}={}", q.name, value(&q.value))));
    parts.join(", ")
}

fn filter(f: &Filter) -> String {
    match f {
        Filter::RequestHeaders(m) | Filter::ResponseHeaders(m) => {
            let kind =
                if matches!(f, Filter::RequestHeaders(_)) { "request headers" } else { "response headers" };
            let mut ops = Vec::new();
            ops.extend(m.set.iter().map(|(n, v)| format!("set {n}: {}", v.to_str().unwrap_or("?"))));
            ops.extend(m.add.iter().map(|(n, v)| format!("add {n}: {}", v.to_str().unwrap_or("?"))));
            ops.extend(m.remove.iter().map(|n| format!("remove {n}")));
            format!("{kind}: {}", ops.join(", "))
        }
        Filter::Redirect(r) => format!(
            "redirect {}{}{}{}",
            r.status,
            r.scheme.as_ref().map(|s| format!(" scheme {s}")).unwrap_or_default(),
            r.hostname.as_ref().map(|h| format!(" host {h}")).unwrap_or_default(),
            r.port.map(|p| format!(" port {p}")).unwrap_or_default()
        ),
        Filter::Rewrite(r) => {
            format!("rewrite{}", r.hostname.as_ref().map(|h| format!(" host {h}")).unwrap_or_default())
        }
        Filter::Mirror(m) => format!("mirror {}/{} of requests", m.numerator, m.denominator),
    }
}

/// How the node's authorization policies treat the workload `namespace/name` (a pod): the
/// policies that apply to it and, for a connection from `from` (a SPIFFE identity, or `None`
/// for an unauthenticated peer) to `port`, the decision; `None` when no such workload is known.
pub fn describe_workload(
    snapshot: &Snapshot,
    namespace: &str,
    name: &str,
    from: Option<&gammaray_proxy::identity::Identity>,
    port: u16,
) -> Option<String> {
    use std::fmt::Write as _;

    use gammaray_proxy::authz::{Decision, Peer, Target};
    let workload = snapshot
        .workloads
        .iter()
        .map(|(_, w)| w)
        .find(|w| *w.pod.namespace == *namespace && *w.pod.name == *name)?;
    let labels: Vec<String> = workload.class.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Workload {namespace}/{name}\n  node: {}\n  identity: {}\n  labels: {}",
        workload.node.as_deref().unwrap_or("-"),
        workload.uri(),
        if labels.is_empty() { "-".to_owned() } else { labels.join(", ") }
    );
    let target = Target { namespace, labels: &workload.class.labels, port };
    let mode = snapshot.authz.peer_authentication(&target);
    let _ = writeln!(
        out,
        "  peer authentication: {}{}",
        mode.as_str(),
        match mode {
            gammaray_proxy::authz::PeerAuthentication::Strict =>
                " (peers without a mesh identity are refused)",
            gammaray_proxy::authz::PeerAuthentication::Permissive => {
                " (peers from outside the mesh are captured and checked as unauthenticated)"
            }
        }
    );
    let applicable: Vec<_> = snapshot.authz.applicable(&target).collect();
    let _ = writeln!(out, "Authorization policies that apply (root namespace {}):", snapshot.authz.root);
    if applicable.is_empty() {
        let _ = writeln!(out, "  none: every peer may connect");
    }
    for p in &applicable {
        let selector = p.selector.as_ref().map_or_else(
            || "every workload of its namespace".to_owned(),
            |s| s.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", "),
        );
        let _ = writeln!(out, "  {}: {:?}, {} rule(s), selects {selector}", p.name, p.action, p.rules.len());
        if let Some(why) = &p.unenforceable {
            let _ = writeln!(out, "    denies every connection to its targets: {why}");
        }
    }
    let who = from.map_or_else(|| "an unauthenticated peer".to_owned(), |i| i.to_string());
    let decision = snapshot.authz.check(&Peer { identity: from, ip: None }, &target);
    let _ = match decision {
        Decision::Allow => writeln!(out, "From {who} to port {port}: ALLOW"),
        Decision::Deny { policy, reason } => {
            writeln!(out, "From {who} to port {port}: DENY by {policy} ({})", reason.as_str())
        }
    };
    Some(out)
}

#[cfg(test)]
mod tests {
    use crate::{
        store::Store,
        translate::{Options, translate},
    };

    #[test]
    fn describes_ports_routes_weights_endpoints_and_identities() {
        let mut store = Store::default();
        let applied = store.apply_yaml(
            "apiVersion: v1\nkind: Service\nmetadata: {name: backend, namespace: demo}\nspec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080, appProtocol: http}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: backend-v1, namespace: demo}\nspec: {clusterIP: 10.96.0.11, ports: [{name: http, port: 80, targetPort: 8080}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: backend-v1-abc-x, namespace: demo}\nspec: {nodeName: node2, serviceAccountName: backend-v1, containers: [{name: c, image: i}]}\nstatus: {podIP: 10.244.2.2}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: v1, namespace: demo, labels: {kubernetes.io/service-name: backend-v1}}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.244.2.2], targetRef: {kind: Pod, name: backend-v1-abc-x, namespace: demo}}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: canary, namespace: demo}\nspec:\n  parentRefs: [{group: '', kind: Service, name: backend, port: 80}]\n  rules:\n  - backendRefs: [{name: backend-v1, port: 80, weight: 90}, {name: backend-v2, port: 80, weight: 10}]\n",
        );
        assert!(applied.errors.is_empty(), "{:?}", applied.errors);
        let t = translate(&store, &Options::default());
        let text =
            super::describe(&t.snapshot, &t.statuses.iter().collect::<Vec<_>>(), "demo", "backend", true)
                .expect("a description");
        for needle in [
            "Service: backend.demo",
            "ClusterIP: 10.96.0.10",
            "mutual TLS 1.3",
            "Port http/80",
            "producer routes",
            "HTTPRoute demo/canary rule 0: path prefix /",
            "→ demo/backend-v1:80 weight 90 (90%), 1 endpoints",
            "→ INVALID weight 10 (10%, answers 500)",
            "Accepted=True",
            "ResolvedRefs=False (BackendNotFound)",
            "node node2",
            "10.244.2.2:8080",
            "spiffe://cluster.local/ns/demo/sa/backend-v1",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        assert!(
            super::describe(&t.snapshot, &t.statuses.iter().collect::<Vec<_>>(), "demo", "nope", true)
                .is_none()
        );
    }
}
