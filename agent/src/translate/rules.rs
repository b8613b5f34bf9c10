//! Compiling one route's rules: the API server's defaults applied, matches, filters and
//! backendRefs validated and turned into the snapshot's types. A rule that cannot be honoured
//! is kept with its problem (and dropped from the tables); an unresolvable backendRef stays in
//! the rule as a 500 share.

use std::{sync::Arc, time::Duration};

use gammaray_proxy::snapshot::{
    BackendTarget, Filter, GrpcMatch, HeaderMatch, HeaderModifier, HttpMatch, Mirror, ObjectRef, PathMatch,
    PathModifier, QueryMatch, Redirect, Rewrite, RouteId, RouteKind, RuleAction, Timeouts, ValueMatch,
    WeightedBackend,
};
use gateway_api::{
    grpcroutes::{GrpcRoute, GrpcRouteRulesMatches, GrpcRouteRulesMatchesMethodType},
    httproutes::{
        HttpRoute, HttpRouteParentRefs, HttpRouteRulesBackendRefs, HttpRouteRulesFilters,
        HttpRouteRulesFiltersRequestHeaderModifier, HttpRouteRulesFiltersRequestRedirectPathType,
        HttpRouteRulesFiltersRequestRedirectScheme, HttpRouteRulesFiltersType,
        HttpRouteRulesFiltersUrlRewritePathType, HttpRouteRulesMatches, HttpRouteRulesMatchesHeadersType,
        HttpRouteRulesMatchesMethod, HttpRouteRulesMatchesPathType, HttpRouteRulesMatchesQueryParamsType,
        HttpRouteRulesTimeouts,
    },
};
use http::{HeaderName, HeaderValue, Method};
use regex::Regex;

use super::{ParentRef, Resolve, Unresolved};

/// The largest weight the API allows.
const MAX_WEIGHT: i32 = 1_000_000;

#[derive(Debug)]
pub struct CompiledRoute {
    pub kind: RouteKind,
    pub id: ObjectRef,
    pub generation: Option<i64>,
    /// creationTimestamp in RFC 3339 (sorts in time order); `None` sorts last.
    pub created: CreatedAt,
    /// Service parentRefs only: refs to Gateways belong to other controllers.
    pub parents: Vec<ParentRef>,
    pub rules: Vec<CompiledRule>,
    /// The first backendRef that did not resolve, for ResolvedRefs.
    pub unresolved: Option<Unresolved>,
}

impl CompiledRoute {
    pub fn has_valid_rules(&self) -> bool {
        self.rules.iter().any(|r| r.problem.is_none())
    }
}

/// Creation time for precedence: older first, unknown last.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum CreatedAt {
    At(String),
    Unknown,
}

#[derive(Debug)]
pub struct CompiledRule {
    pub index: usize,
    pub id: Arc<RouteId>,
    pub http_matches: Vec<HttpMatch>,
    pub grpc_matches: Vec<GrpcMatch>,
    pub action: Arc<RuleAction>,
    /// Why the rule is dropped, if it is.
    pub problem: Option<Unresolved>,
}

fn problem(message: impl Into<String>) -> Unresolved {
    Unresolved { reason: "UnsupportedValue", message: message.into() }
}

fn meta(
    route_meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> (ObjectRef, Option<i64>, CreatedAt) {
    let id = ObjectRef::new(
        route_meta.namespace.clone().unwrap_or_else(|| "default".into()),
        route_meta.name.clone().unwrap_or_default(),
    );
    let created =
        route_meta.creation_timestamp.as_ref().map_or(CreatedAt::Unknown, |t| CreatedAt::At(t.0.to_string()));
    (id, route_meta.generation, created)
}

/// parentRefs that name a Service, with defaults: group and kind default to Gateway, so a
/// Service parent must say `group: ""` (or `core`) and `kind: Service`.
fn service_parents(route_ns: &str, refs: &[HttpRouteParentRefs]) -> Vec<ParentRef> {
    refs.iter()
        .filter_map(|p| {
            let group = p.group.as_deref().unwrap_or("gateway.networking.k8s.io");
            let kind = p.kind.as_deref().unwrap_or("Gateway");
            ((group.is_empty() || group == "core") && kind == "Service").then(|| ParentRef {
                group: group.to_owned(),
                kind: kind.to_owned(),
                namespace: p.namespace.clone().unwrap_or_else(|| route_ns.to_owned()),
                name: p.name.clone(),
                port: p.port,
                section_name: p.section_name.clone(),
            })
        })
        .collect()
}

pub fn compile_http(route: &HttpRoute, backends: &mut dyn Resolve) -> CompiledRoute {
    let parents = route.spec.parent_refs.clone().unwrap_or_default();
    // The API server defaults `rules` to one rule matching every path.
    let rules =
        route.spec.rules.clone().filter(|r| !r.is_empty()).unwrap_or_else(|| vec![Default::default()]);
    compile_route(
        RouteKind::Http,
        &route.metadata,
        &parents,
        &rules,
        backends,
        |ns, rule, backends, unresolved| {
            let (matches, action) = compile_http_rule(
                ns,
                rule.matches.as_deref(),
                rule.filters.as_deref().unwrap_or_default(),
                rule.backend_refs.as_deref().unwrap_or_default(),
                rule.timeouts.as_ref(),
                backends,
                unresolved,
            )?;
            Ok((rule.name.clone(), matches, Vec::new(), action))
        },
    )
}

pub fn compile_grpc(route: &GrpcRoute, backends: &mut dyn Resolve) -> CompiledRoute {
    // GRPCRoute parentRefs, filters and backendRefs have the HTTPRoute shape: one compiler.
    let parents = reshape(route.spec.parent_refs.as_deref().unwrap_or_default()).unwrap_or_default();
    let rules =
        route.spec.rules.clone().filter(|r| !r.is_empty()).unwrap_or_else(|| vec![Default::default()]);
    compile_route(
        RouteKind::Grpc,
        &route.metadata,
        &parents,
        &rules,
        backends,
        |ns, rule, backends, unresolved| {
            let filters: Vec<HttpRouteRulesFilters> = reshape(rule.filters.as_deref().unwrap_or_default())?;
            let refs: Vec<HttpRouteRulesBackendRefs> =
                reshape(rule.backend_refs.as_deref().unwrap_or_default())?;
            let matches = grpc_matches(rule.matches.as_deref())?;
            let (_, action) = compile_http_rule(ns, None, &filters, &refs, None, backends, unresolved)?;
            Ok((rule.name.clone(), Vec::new(), matches, action))
        },
    )
}

type RuleResult = Result<(Option<String>, Vec<HttpMatch>, Vec<GrpcMatch>, RuleAction), Unresolved>;

fn compile_route<R>(
    kind: RouteKind,
    metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    parent_refs: &[HttpRouteParentRefs],
    rules: &[R],
    backends: &mut dyn Resolve,
    mut compile: impl FnMut(&str, &R, &mut dyn Resolve, &mut Option<Unresolved>) -> RuleResult,
) -> CompiledRoute {
    let (id, generation, created) = meta(metadata);
    let parents = service_parents(&id.namespace, parent_refs);
    let mut unresolved = None;
    let rules = rules
        .iter()
        .enumerate()
        .map(|(index, rule)| {
            let result = compile(&id.namespace, rule, backends, &mut unresolved);
            let rule_id = |rule_name| Arc::new(RouteId { kind, route: id.clone(), rule: index, rule_name });
            match result {
                Ok((name, http_matches, grpc_matches, action)) => CompiledRule {
                    index,
                    id: rule_id(name),
                    http_matches,
                    grpc_matches,
                    action: Arc::new(action),
                    problem: None,
                },
                Err(problem) => CompiledRule {
                    index,
                    id: rule_id(None),
                    http_matches: Vec::new(),
                    grpc_matches: Vec::new(),
                    action: Arc::default(),
                    problem: Some(problem),
                },
            }
        })
        .collect();
    CompiledRoute { kind, id, generation, created, parents, rules, unresolved }
}

/// Converts between the generated types that share one JSON shape (GRPCRoute and backendRef
/// filters have the HTTPRoute rule filter's shape).
fn reshape<A: serde::Serialize, B: serde::de::DeserializeOwned>(items: &[A]) -> Result<Vec<B>, Unresolved> {
    items
        .iter()
        .map(|i| {
            serde_json::to_value(i)
                .and_then(serde_json::from_value)
                .map_err(|e| problem(format!("unsupported filter or backendRef: {e}")))
        })
        .collect()
}

fn grpc_matches(matches: Option<&[GrpcRouteRulesMatches]>) -> Result<Vec<GrpcMatch>, Unresolved> {
    let Some(matches) = matches.filter(|m| !m.is_empty()) else {
        // A rule without matches matches every request.
        return Ok(vec![GrpcMatch::default()]);
    };
    matches
        .iter()
        .map(|m| {
            let (service, method) = match &m.method {
                Some(mm) => {
                    let regex = matches!(mm.r#type, Some(GrpcRouteRulesMatchesMethodType::RegularExpression));
                    let value = |v: &Option<String>| -> Result<Option<ValueMatch>, Unresolved> {
                        v.as_ref().map(|v| value_match(v, regex)).transpose()
                    };
                    if mm.service.is_none() && mm.method.is_none() {
                        return Err(problem("a gRPC method match needs a service or a method"));
                    }
                    (value(&mm.service)?, value(&mm.method)?)
                }
                None => (None, None),
            };
            let headers = m
                .headers
                .iter()
                .flatten()
                .map(|h| {
                    header_match(
                        &h.name,
                        &h.value,
                        h.r#type.as_ref().is_some_and(|t| format!("{t:?}") == "RegularExpression"),
                    )
                })
                .collect::<Result<_, _>>()?;
            Ok(GrpcMatch { service, method, headers })
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn compile_http_rule(
    route_ns: &str,
    matches: Option<&[HttpRouteRulesMatches]>,
    filters: &[HttpRouteRulesFilters],
    refs: &[HttpRouteRulesBackendRefs],
    timeouts: Option<&HttpRouteRulesTimeouts>,
    backends: &mut dyn Resolve,
    unresolved: &mut Option<Unresolved>,
) -> Result<(Vec<HttpMatch>, RuleAction), Unresolved> {
    let http_matches = http_matches(matches)?;
    let all_prefix = http_matches.iter().all(|m| matches!(m.path, PathMatch::Prefix(_)));
    let filters = compile_filters(route_ns, filters, all_prefix, backends, unresolved)?;
    if filters.iter().any(|f| matches!(f, Filter::Redirect(_)))
        && filters.iter().any(|f| matches!(f, Filter::Rewrite(_)))
    {
        return Err(problem("RequestRedirect and URLRewrite cannot be used together"));
    }
    let mut weighted = Vec::new();
    for r in refs {
        let weight = r.weight.unwrap_or(1);
        if !(0..=MAX_WEIGHT).contains(&weight) {
            return Err(problem(format!(
                "backendRef {} has weight {weight}, outside 0..={MAX_WEIGHT}",
                r.name
            )));
        }
        let backend_filters: Vec<HttpRouteRulesFilters> = reshape(r.filters.as_deref().unwrap_or_default())?;
        let backend_filters = compile_filters(route_ns, &backend_filters, all_prefix, backends, unresolved)?;
        if backend_filters.iter().any(|f| matches!(f, Filter::Redirect(_))) {
            return Err(problem("RequestRedirect is not allowed on a backendRef"));
        }
        let target = resolve_ref(
            route_ns,
            r.group.as_deref(),
            r.kind.as_deref(),
            r.namespace.as_deref(),
            &r.name,
            r.port,
            backends,
            unresolved,
        );
        weighted.push(WeightedBackend { weight: weight as u32, target, filters: backend_filters });
    }
    let timeouts = compile_timeouts(timeouts)?;
    Ok((http_matches, RuleAction { filters, backends: weighted, timeouts }))
}

#[allow(clippy::too_many_arguments)]
fn resolve_ref(
    route_ns: &str,
    group: Option<&str>,
    kind: Option<&str>,
    namespace: Option<&str>,
    name: &str,
    port: Option<i32>,
    backends: &mut dyn Resolve,
    unresolved: &mut Option<Unresolved>,
) -> BackendTarget {
    let mut fail = |reason: &'static str, message: String| {
        unresolved.get_or_insert(Unresolved { reason, message: message.clone() });
        BackendTarget::Invalid { reason: message }
    };
    let group = group.unwrap_or("");
    let kind = kind.unwrap_or("Service");
    if !(group.is_empty() || group == "core") || kind != "Service" {
        return fail(
            "InvalidKind",
            format!("backendRef {name}: {group}/{kind} is not a supported kind (only Service)"),
        );
    }
    let service = ObjectRef::new(namespace.unwrap_or(route_ns), name);
    let Some(port) = port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p > 0) else {
        return fail("BackendNotFound", format!("backendRef {service}: a Service backendRef needs a port"));
    };
    // Mesh routes may send to Services of other namespaces without a ReferenceGrant: the
    // client could reach them directly, so the route widens nothing.
    match backends.resolve(&service, port) {
        Ok(b) => BackendTarget::Service(b),
        Err(u) => fail(u.reason, u.message),
    }
}

fn http_matches(matches: Option<&[HttpRouteRulesMatches]>) -> Result<Vec<HttpMatch>, Unresolved> {
    let default = [HttpRouteRulesMatches::default()];
    let matches = matches.filter(|m| !m.is_empty()).unwrap_or(&default);
    matches
        .iter()
        .map(|m| {
            // Every match's path defaults to PathPrefix "/", even when only headers are given.
            let (kind, value) = m.path.as_ref().map_or((None, None), |p| (p.r#type.clone(), p.value.clone()));
            let value = value.unwrap_or_else(|| "/".into());
            let path = match kind.unwrap_or(HttpRouteRulesMatchesPathType::PathPrefix) {
                HttpRouteRulesMatchesPathType::Exact => {
                    check_path(&value)?;
                    PathMatch::Exact(value)
                }
                HttpRouteRulesMatchesPathType::PathPrefix => {
                    check_path(&value)?;
                    PathMatch::Prefix(value)
                }
                HttpRouteRulesMatchesPathType::RegularExpression => PathMatch::Regex(anchored(&value)?),
            };
            let method = m.method.as_ref().map(method_of);
            let headers = m
                .headers
                .iter()
                .flatten()
                .map(|h| {
                    header_match(
                        &h.name,
                        &h.value,
                        matches!(h.r#type, Some(HttpRouteRulesMatchesHeadersType::RegularExpression)),
                    )
                })
                .collect::<Result<_, _>>()?;
            let query = m
                .query_params
                .iter()
                .flatten()
                .map(|q| {
                    let regex =
                        matches!(q.r#type, Some(HttpRouteRulesMatchesQueryParamsType::RegularExpression));
                    Ok(QueryMatch { name: q.name.clone(), value: value_match(&q.value, regex)? })
                })
                .collect::<Result<_, Unresolved>>()?;
            Ok(HttpMatch { path, method, headers, query })
        })
        .collect()
}

fn check_path(value: &str) -> Result<(), Unresolved> {
    if value.starts_with('/') && !value.contains("//") && !value.contains(['?', '#']) {
        Ok(())
    } else {
        Err(problem(format!("path {value:?} must start with '/' and hold no '//', '?' or '#'")))
    }
}

fn anchored(pattern: &str) -> Result<Regex, Unresolved> {
    let build = |p: &str| regex::RegexBuilder::new(p).size_limit(1 << 20).build();
    build(&format!("^(?:{pattern})$")).map_err(|anchored_error| {
        // The error in the user's own terms: the pattern as written, not the anchored form, and
        // one line (regex's message repeats the pattern over several, with a caret).
        let e = build(pattern).err().unwrap_or(anchored_error).to_string();
        let why = e
            .lines()
            .find_map(|l| l.trim_start().strip_prefix("error:"))
            .map_or_else(|| e.split_whitespace().collect::<Vec<_>>().join(" "), |l| l.trim().to_owned());
        problem(format!("invalid regular expression {pattern:?}: {why}"))
    })
}

fn value_match(value: &str, regex: bool) -> Result<ValueMatch, Unresolved> {
    Ok(if regex { ValueMatch::Regex(anchored(value)?) } else { ValueMatch::Exact(value.to_owned()) })
}

fn header_match(name: &str, value: &str, regex: bool) -> Result<HeaderMatch, Unresolved> {
    let name = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
        .map_err(|_| problem(format!("invalid header name {name:?}")))?;
    Ok(HeaderMatch { name, value: value_match(value, regex)? })
}

fn method_of(m: &HttpRouteRulesMatchesMethod) -> Method {
    use HttpRouteRulesMatchesMethod as M;
    match m {
        M::Get => Method::GET,
        M::Head => Method::HEAD,
        M::Post => Method::POST,
        M::Put => Method::PUT,
        M::Delete => Method::DELETE,
        M::Connect => Method::CONNECT,
        M::Options => Method::OPTIONS,
        M::Trace => Method::TRACE,
        M::Patch => Method::PATCH,
    }
}

fn compile_filters(
    route_ns: &str,
    filters: &[HttpRouteRulesFilters],
    all_prefix: bool,
    backends: &mut dyn Resolve,
    unresolved: &mut Option<Unresolved>,
) -> Result<Vec<Filter>, Unresolved> {
    let missing = |t: &str| problem(format!("filter {t} has no {t} configuration"));
    filters
        .iter()
        .map(|f| {
            Ok(match f.r#type {
                HttpRouteRulesFiltersType::RequestHeaderModifier => {
                    Filter::RequestHeaders(Arc::new(header_modifier(
                        f.request_header_modifier.as_ref().ok_or_else(|| missing("RequestHeaderModifier"))?,
                    )?))
                }
                HttpRouteRulesFiltersType::ResponseHeaderModifier => {
                    let m = f
                        .response_header_modifier
                        .as_ref()
                        .ok_or_else(|| missing("ResponseHeaderModifier"))?;
                    let m: HttpRouteRulesFiltersRequestHeaderModifier =
                        reshape(std::slice::from_ref(m))?.remove(0);
                    Filter::ResponseHeaders(Arc::new(header_modifier(&m)?))
                }
                HttpRouteRulesFiltersType::RequestRedirect => {
                    let r = f.request_redirect.as_ref().ok_or_else(|| missing("RequestRedirect"))?;
                    let status = match r.status_code.unwrap_or(302) {
                        s @ (301 | 302 | 303 | 307 | 308) => s as u16,
                        s => {
                            return Err(problem(format!(
                                "redirect status {s} is not one of 301, 302, 303, 307, 308"
                            )));
                        }
                    };
                    let port = r
                        .port
                        .map(|p| {
                            u16::try_from(p)
                                .ok()
                                .filter(|p| *p > 0)
                                .ok_or_else(|| problem(format!("redirect port {p} is out of range")))
                        })
                        .transpose()?;
                    let path = r
                        .path
                        .as_ref()
                        .map(|p| {
                            let prefix = matches!(
                                p.r#type,
                                HttpRouteRulesFiltersRequestRedirectPathType::ReplacePrefixMatch
                            );
                            path_modifier(prefix, &p.replace_full_path, &p.replace_prefix_match, all_prefix)
                        })
                        .transpose()?;
                    Filter::Redirect(Redirect {
                        scheme: r.scheme.as_ref().map(|s| match s {
                            HttpRouteRulesFiltersRequestRedirectScheme::Http => "http".into(),
                            HttpRouteRulesFiltersRequestRedirectScheme::Https => "https".into(),
                        }),
                        hostname: r.hostname.clone(),
                        path,
                        port,
                        status,
                    })
                }
                HttpRouteRulesFiltersType::UrlRewrite => {
                    let r = f.url_rewrite.as_ref().ok_or_else(|| missing("URLRewrite"))?;
                    let path = r
                        .path
                        .as_ref()
                        .map(|p| {
                            let prefix = matches!(
                                p.r#type,
                                HttpRouteRulesFiltersUrlRewritePathType::ReplacePrefixMatch
                            );
                            path_modifier(prefix, &p.replace_full_path, &p.replace_prefix_match, all_prefix)
                        })
                        .transpose()?;
                    if let Some(h) = &r.hostname {
                        HeaderValue::from_str(h)
                            .map_err(|_| problem(format!("invalid rewrite hostname {h:?}")))?;
                    }
                    Filter::Rewrite(Rewrite { hostname: r.hostname.clone(), path })
                }
                HttpRouteRulesFiltersType::RequestMirror => {
                    let m = f.request_mirror.as_ref().ok_or_else(|| missing("RequestMirror"))?;
                    let b = &m.backend_ref;
                    let target = resolve_ref(
                        route_ns,
                        b.group.as_deref(),
                        b.kind.as_deref(),
                        b.namespace.as_deref(),
                        &b.name,
                        b.port,
                        backends,
                        unresolved,
                    );
                    let (numerator, denominator) = match (&m.fraction, m.percent) {
                        (Some(f), _) => (f.numerator, f.denominator.unwrap_or(100)),
                        (None, Some(p)) => (p, 100),
                        (None, None) => (100, 100),
                    };
                    if numerator < 0 || denominator <= 0 || numerator > denominator {
                        return Err(problem(format!(
                            "mirror fraction {numerator}/{denominator} is not within 0..=1"
                        )));
                    }
                    Filter::Mirror(Mirror {
                        target,
                        numerator: numerator as u32,
                        denominator: denominator as u32,
                    })
                }
                HttpRouteRulesFiltersType::ExtensionRef | HttpRouteRulesFiltersType::Cors => {
                    // The type as the route spells it (`CORS`), not as the Rust type names it.
                    let name = serde_json::to_value(&f.r#type)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_else(|| format!("{:?}", f.r#type));
                    return Err(problem(format!("filter type {name} is not supported by gammaray")));
                }
            })
        })
        .collect()
}

/// A path modifier of either type; `prefix` says which of the two values applies.
fn path_modifier(
    prefix: bool,
    full: &Option<String>,
    replace_prefix: &Option<String>,
    all_prefix: bool,
) -> Result<PathModifier, Unresolved> {
    let value = if prefix { replace_prefix } else { full };
    let value = value.as_deref().ok_or_else(|| problem("a path modifier needs a value for its type"))?;
    check_path(value)?;
    if prefix {
        if !all_prefix {
            return Err(problem("ReplacePrefixMatch needs every match of the rule to be a PathPrefix"));
        }
        Ok(PathModifier::Prefix(value.to_owned()))
    } else {
        Ok(PathModifier::Full(value.to_owned()))
    }
}

fn header_modifier(m: &HttpRouteRulesFiltersRequestHeaderModifier) -> Result<HeaderModifier, Unresolved> {
    let pair = |name: &str, value: &str| -> Result<(HeaderName, HeaderValue), Unresolved> {
        Ok((
            HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
                .map_err(|_| problem(format!("invalid header name {name:?}")))?,
            HeaderValue::from_str(value).map_err(|_| problem(format!("invalid value for header {name}")))?,
        ))
    };
    Ok(HeaderModifier {
        set: m.set.iter().flatten().map(|h| pair(&h.name, &h.value)).collect::<Result<_, _>>()?,
        add: m.add.iter().flatten().map(|h| pair(&h.name, &h.value)).collect::<Result<_, _>>()?,
        remove: m
            .remove
            .iter()
            .flatten()
            .map(|n| {
                HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes())
                    .map_err(|_| problem(format!("invalid header name {n:?}")))
            })
            .collect::<Result<_, _>>()?,
    })
}

fn compile_timeouts(t: Option<&HttpRouteRulesTimeouts>) -> Result<Timeouts, Unresolved> {
    let Some(t) = t else {
        return Ok(Timeouts::default());
    };
    let parse = |v: &Option<String>| -> Result<Option<Duration>, Unresolved> {
        v.as_ref()
            .map(|s| {
                s.parse::<gateway_api::Duration>()
                    .map_err(|e| problem(format!("invalid timeout {s:?}: {e}")))
                    .map(|d| Duration::from_nanos(d.as_nanos() as u64))
            })
            .transpose()
            // A zero timeout disables the timeout.
            .map(|d| d.filter(|d| !d.is_zero()))
    };
    let request = parse(&t.request)?;
    let backend_request = parse(&t.backend_request)?;
    if let (Some(r), Some(b)) = (request, backend_request)
        && b > r
    {
        return Err(problem(format!("backendRequest timeout {b:?} exceeds the request timeout {r:?}")));
    }
    Ok(Timeouts { request, backend_request })
}
