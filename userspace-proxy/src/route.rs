//! Route matching and the per-request decision: pure, synchronous code over a snapshot's
//! [`Frontend`], with no I/O, so it can be tested by tables and fuzzed.
//!
//! Precedence lives here too: a [`RouteTable`] is built only by [`RouteTable::http`] and
//! [`RouteTable::grpc`], which sort its rule matches by GAMMA's precedence, so matching is a
//! first-match scan; the decision then applies the rule: a redirect becomes a response, a
//! forward picks a backend by weight with the caller's random number.

use std::{cmp::Reverse, sync::Arc};

use http::{HeaderMap, HeaderName, HeaderValue, Method, header};

use crate::snapshot::{
    Backend, BackendTarget, Filter, Frontend, GrpcMatch, GrpcRuleMatch, HeaderMatch, HeaderModifier,
    HttpMatch, HttpRuleMatch, Mirror, PathMatch, PathModifier, Ranked, Redirect, RouteId, RouteTable,
    RuleAction, Timeouts, ValueMatch, WeightedBackend,
};

/// The parts of a request that routing looks at.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub method: &'a Method,
    /// `http` or `https`, as the client sent it.
    pub scheme: &'a str,
    /// Host or `:authority`, without a port.
    pub host: Option<&'a str>,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

/// What to do with one request.
#[derive(Debug)]
pub enum Decision<'a> {
    /// No route is attached for this client: forward to the Service's endpoints unchanged.
    Passthrough(&'a Arc<Backend>),
    /// A rule matched and picked a backend.
    Forward(Forward<'a>),
    /// Answer locally (404 no rule matched, 500 unusable backend, 3xx redirect).
    Respond(LocalResponse<'a>),
}

#[derive(Debug)]
pub struct Forward<'a> {
    pub route: &'a RouteId,
    pub backend: &'a Arc<Backend>,
    /// Rule-level filters, then the chosen backendRef's.
    pub filters: Vec<&'a Filter>,
    /// The PathPrefix that matched, for ReplacePrefixMatch rewrites.
    pub matched_prefix: Option<&'a str>,
    pub timeouts: Timeouts,
}

#[derive(Debug)]
pub struct LocalResponse<'a> {
    pub status: u16,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub reason: LocalReason,
    pub route: Option<&'a RouteId>,
}

/// Why routing answers a request itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocalReason {
    /// A RequestRedirect filter: not an error.
    #[error("redirect")]
    Redirect,
    #[error("no route rule matches the request")]
    NoRuleMatched,
    #[error("the matched rule has no backendRefs")]
    NoBackendRefs,
    #[error("every backendRef of the matched rule has weight 0")]
    AllWeightsZero,
    #[error("backendRef does not resolve: {0}")]
    Unresolved(String),
    #[error("redirect Location is not a valid header value")]
    BadRedirectLocation,
}

impl LocalReason {
    /// The HTTP status of a refusal (a redirect's status is its filter's).
    pub fn status(&self) -> u16 {
        match self {
            Self::NoRuleMatched => 404,
            Self::Redirect => 302,
            Self::NoBackendRefs | Self::AllWeightsZero | Self::Unresolved(_) | Self::BadRedirectLocation => {
                500
            }
        }
    }
}

/// Where a rule match stands among its group's routes, for the ties that specificity leaves:
/// the route's place after ordering the routes oldest first and then by namespace/name (the
/// translation knows their creation times), the rule's index in the route, the match's index
/// in the rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Place {
    pub route: usize,
    pub rule: usize,
    pub matched: usize,
}

impl RouteTable {
    /// An HTTPRoute table, sorted by [`HttpKey`].
    pub fn http(entries: impl IntoIterator<Item = (Place, HttpRuleMatch)>) -> Self {
        Self::Http(ranked(entries, |m: &HttpRuleMatch, place| HttpKey::new(&m.matcher, place)))
    }

    /// A GRPCRoute table, sorted by [`GrpcKey`].
    pub fn grpc(entries: impl IntoIterator<Item = (Place, GrpcRuleMatch)>) -> Self {
        Self::Grpc(ranked(entries, |m: &GrpcRuleMatch, place| GrpcKey::new(&m.matcher, place)))
    }
}

fn ranked<R, K: Ord>(
    entries: impl IntoIterator<Item = (Place, R)>,
    key: impl Fn(&R, Place) -> K,
) -> Ranked<R> {
    let mut keyed: Vec<(K, R)> = entries.into_iter().map(|(place, r)| (key(&r, place), r)).collect();
    keyed.sort_by(|a, b| a.0.cmp(&b.0));
    Ranked(keyed.into_iter().map(|(_, r)| r).collect())
}

/// HTTP precedence, smallest first: Exact path; then the longer path value (a PathPrefix
/// before a RegularExpression of the same length); a method match; more header matches;
/// more query matches; then the match's [`Place`].
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct HttpKey {
    exact: Reverse<bool>,
    path_len: Reverse<usize>,
    prefix: Reverse<bool>,
    method: Reverse<bool>,
    headers: Reverse<usize>,
    query: Reverse<usize>,
    place: Place,
}

impl HttpKey {
    fn new(m: &HttpMatch, place: Place) -> Self {
        let (exact, len, prefix) = match &m.path {
            PathMatch::Exact(p) => (true, p.len(), false),
            PathMatch::Prefix(p) => (false, p.len(), true),
            PathMatch::Regex(r) => (false, pattern_len(r), false),
        };
        Self {
            exact: Reverse(exact),
            path_len: Reverse(len),
            prefix: Reverse(prefix),
            method: Reverse(m.method.is_some()),
            headers: Reverse(m.headers.len()),
            query: Reverse(m.query.len()),
            place,
        }
    }
}

/// gRPC precedence: more characters in the service match, then in the method match, then
/// more header matches; then the match's [`Place`].
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct GrpcKey {
    service: Reverse<usize>,
    method: Reverse<usize>,
    headers: Reverse<usize>,
    place: Place,
}

impl GrpcKey {
    fn new(m: &GrpcMatch, place: Place) -> Self {
        let chars = |v: &Option<ValueMatch>| match v {
            Some(ValueMatch::Exact(s)) => s.len(),
            Some(ValueMatch::Regex(r)) => pattern_len(r),
            None => 0,
        };
        Self {
            service: Reverse(chars(&m.service)),
            method: Reverse(chars(&m.method)),
            headers: Reverse(m.headers.len()),
            place,
        }
    }
}

/// The length of the user's pattern in a compiled regex, without the `^(?:` … `)$` anchors
/// the translation wraps it in.
fn pattern_len(r: &regex::Regex) -> usize {
    r.as_str().len().saturating_sub(6)
}

/// Decides what happens to a request sent to `frontend` by a client in `client_namespace`.
/// `random` is a uniformly random number; it picks the weighted backend.
pub fn decide<'a>(
    frontend: &'a Frontend,
    client_namespace: Option<&str>,
    req: &RequestView<'_>,
    random: u64,
) -> Decision<'a> {
    let Some(table) = frontend.routes_for(client_namespace) else {
        return Decision::Passthrough(&frontend.default_backend);
    };
    let (id, action, matched_prefix) = match table {
        RouteTable::Http(rules) => match match_http(rules, req) {
            Some(rule) => (&*rule.id, &*rule.action, prefix_of(&rule.matcher.path)),
            None => return not_found(),
        },
        RouteTable::Grpc(rules) => match match_grpc(rules, req) {
            Some(rule) => (&*rule.id, &*rule.action, None),
            None => return not_found(),
        },
    };
    apply_rule(frontend, id, action, matched_prefix, req, random)
}

fn not_found<'a>() -> Decision<'a> {
    refuse(None, LocalReason::NoRuleMatched)
}

fn prefix_of(path: &PathMatch) -> Option<&str> {
    match path {
        PathMatch::Prefix(p) => Some(p),
        _ => None,
    }
}

fn apply_rule<'a>(
    frontend: &'a Frontend,
    id: &'a RouteId,
    action: &'a RuleAction,
    matched_prefix: Option<&'a str>,
    req: &RequestView<'_>,
    random: u64,
) -> Decision<'a> {
    if let Some(redirect) = action.filters.iter().find_map(|f| match f {
        Filter::Redirect(r) => Some(r),
        _ => None,
    }) {
        let location = redirect_location(redirect, frontend.port, matched_prefix, req);
        let mut headers = Vec::new();
        match HeaderValue::try_from(location) {
            Ok(v) => headers.push((header::LOCATION, v)),
            Err(_) => return refuse(Some(id), LocalReason::BadRedirectLocation),
        }
        return Decision::Respond(LocalResponse {
            status: redirect.status,
            headers,
            reason: LocalReason::Redirect,
            route: Some(id),
        });
    }
    if action.backends.is_empty() {
        return refuse(Some(id), LocalReason::NoBackendRefs);
    }
    let Some(chosen) = pick_weighted(&action.backends, random) else {
        return refuse(Some(id), LocalReason::AllWeightsZero);
    };
    let backend = match &chosen.target {
        BackendTarget::Service(b) => b,
        BackendTarget::Invalid { reason } => {
            return refuse(Some(id), LocalReason::Unresolved(reason.clone()));
        }
    };
    Decision::Forward(Forward {
        route: id,
        backend,
        filters: action.filters.iter().chain(&chosen.filters).collect(),
        matched_prefix,
        timeouts: action.timeouts,
    })
}

fn refuse<'a>(route: Option<&'a RouteId>, reason: LocalReason) -> Decision<'a> {
    Decision::Respond(LocalResponse { status: reason.status(), headers: Vec::new(), reason, route })
}

/// Picks a backend with probability weight / sum of weights. `None` when every weight is 0.
pub fn pick_weighted(backends: &[WeightedBackend], random: u64) -> Option<&WeightedBackend> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut x = random % total;
    for b in backends {
        let w = u64::from(b.weight);
        if x < w {
            return Some(b);
        }
        x -= w;
    }
    None
}

/// The first rule (tables are sorted by precedence) whose match accepts the request.
pub fn match_http<'a>(rules: &'a [HttpRuleMatch], req: &RequestView<'_>) -> Option<&'a HttpRuleMatch> {
    rules.iter().find(|r| http_matches(&r.matcher, req))
}

pub fn http_matches(m: &HttpMatch, req: &RequestView<'_>) -> bool {
    path_matches(&m.path, req.path)
        && m.method.as_ref().is_none_or(|method| method == req.method)
        && m.headers.iter().all(|h| header_matches(h, req.headers))
        && m.query
            .iter()
            .all(|q| query_value(req.query, &q.name).is_some_and(|v| value_matches(&q.value, &v)))
}

pub fn path_matches(m: &PathMatch, path: &str) -> bool {
    match m {
        PathMatch::Exact(p) => path == p,
        PathMatch::Prefix(p) => {
            let p = p.trim_end_matches('/');
            p.is_empty() || path == p || (path.starts_with(p) && path.as_bytes().get(p.len()) == Some(&b'/'))
        }
        PathMatch::Regex(re) => re.is_match(path),
    }
}

fn header_matches(m: &HeaderMatch, headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(&m.name).iter();
    let Some(first) = values.next() else { return false };
    let Some(second) = values.next() else {
        // The common case, one line: no allocation.
        return first.to_str().is_ok_and(|v| value_matches(&m.value, v));
    };
    // Several lines of one header compare as their values joined with ",".
    let joined = [first, second]
        .into_iter()
        .chain(values)
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    value_matches(&m.value, &joined)
}

fn value_matches(m: &ValueMatch, value: &str) -> bool {
    match m {
        ValueMatch::Exact(v) => v == value,
        ValueMatch::Regex(re) => re.is_match(value),
    }
}

/// The first value of query parameter `name` (names are case-sensitive).
fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| v.to_owned())
    })
}

/// The first gRPC rule whose match accepts the request, whose path is `/<service>/<method>`.
pub fn match_grpc<'a>(rules: &'a [GrpcRuleMatch], req: &RequestView<'_>) -> Option<&'a GrpcRuleMatch> {
    let (service, method) = grpc_path(req.path);
    rules.iter().find(|r| grpc_matches(&r.matcher, service, method, req.headers))
}

fn grpc_path(path: &str) -> (&str, &str) {
    let rest = path.strip_prefix('/').unwrap_or(path);
    rest.split_once('/').unwrap_or((rest, ""))
}

fn grpc_matches(m: &GrpcMatch, service: &str, method: &str, headers: &HeaderMap) -> bool {
    m.service.as_ref().is_none_or(|s| value_matches(s, service))
        && m.method.as_ref().is_none_or(|s| value_matches(s, method))
        && m.headers.iter().all(|h| header_matches(h, headers))
}

/// The Location of a redirect. An unset scheme keeps the request's; an unset port is the
/// scheme's well-known port when the filter sets a scheme, else the Service port (the mesh's
/// "listener"); the default port of the scheme is left out.
pub fn redirect_location(
    r: &Redirect,
    service_port: u16,
    matched_prefix: Option<&str>,
    req: &RequestView<'_>,
) -> String {
    let scheme = r.scheme.as_deref().unwrap_or(req.scheme);
    let host = r.hostname.as_deref().or(req.host).unwrap_or("");
    let port = match (r.port, &r.scheme) {
        (Some(p), _) => p,
        (None, Some(s)) => well_known_port(s),
        (None, None) => service_port,
    };
    let path = match &r.path {
        Some(m) => modified_path(m, matched_prefix, req.path),
        None => req.path.to_owned(),
    };
    let mut location = format!("{scheme}://{host}");
    if port != well_known_port(scheme) {
        location.push_str(&format!(":{port}"));
    }
    location.push_str(&path);
    if let Some(q) = req.query {
        location.push('?');
        location.push_str(q);
    }
    location
}

fn well_known_port(scheme: &str) -> u16 {
    if scheme.eq_ignore_ascii_case("https") { 443 } else { 80 }
}

/// Applies a path modifier. ReplacePrefixMatch replaces the matched prefix (whole segments);
/// replacing with `/` strips it.
pub fn modified_path(m: &PathModifier, matched_prefix: Option<&str>, path: &str) -> String {
    match m {
        PathModifier::Full(p) => p.clone(),
        PathModifier::Prefix(replacement) => {
            let prefix = matched_prefix.unwrap_or("/").trim_end_matches('/');
            // What follows the prefix: empty, or starting with "/" (prefixes match whole segments).
            let rest = path.get(prefix.len()..).unwrap_or("");
            let out = format!("{}{rest}", replacement.trim_end_matches('/'));
            if out.is_empty() { "/".into() } else { out }
        }
    }
}

impl<'a> Forward<'a> {
    /// Header modifiers to apply to the request, in order.
    pub fn request_header_modifiers(&self) -> impl Iterator<Item = &'a Arc<HeaderModifier>> + '_ {
        self.filters.iter().filter_map(|f| match f {
            Filter::RequestHeaders(m) => Some(m),
            _ => None,
        })
    }

    /// Header modifiers to apply to the response, in order.
    pub fn response_header_modifiers(&self) -> impl Iterator<Item = &'a Arc<HeaderModifier>> + '_ {
        self.filters.iter().filter_map(|f| match f {
            Filter::ResponseHeaders(m) => Some(m),
            _ => None,
        })
    }

    pub fn mirrors(&self) -> impl Iterator<Item = &'a Mirror> + '_ {
        self.filters.iter().filter_map(|f| match f {
            Filter::Mirror(m) => Some(m),
            _ => None,
        })
    }

    /// The Host to send upstream, if a URLRewrite changes it.
    pub fn rewritten_host(&self) -> Option<&'a str> {
        self.filters.iter().rev().find_map(|f| match f {
            Filter::Rewrite(r) => r.hostname.as_deref(),
            _ => None,
        })
    }

    /// The path to send upstream (the last URLRewrite with a path wins).
    pub fn rewritten_path(&self, path: &str) -> Option<String> {
        self.filters.iter().rev().find_map(|f| match f {
            Filter::Rewrite(r) => r.path.as_ref().map(|m| modified_path(m, self.matched_prefix, path)),
            _ => None,
        })
    }

    /// Applies every request header modifier and a Host rewrite to `headers`.
    pub fn apply_request_headers(&self, headers: &mut HeaderMap) {
        for m in self.request_header_modifiers() {
            apply_header_modifier(m, headers);
        }
        if let Some(host) = self.rewritten_host()
            && let Ok(v) = HeaderValue::from_str(host)
        {
            headers.insert(header::HOST, v);
        }
    }

    pub fn apply_response_headers(&self, headers: &mut HeaderMap) {
        for m in self.response_header_modifiers() {
            apply_header_modifier(m, headers);
        }
    }
}

/// `set` replaces every value; `add` appends to the existing value, comma-separated; `remove`
/// drops the header.
pub fn apply_header_modifier(m: &HeaderModifier, headers: &mut HeaderMap) {
    for (name, value) in &m.set {
        headers.insert(name.clone(), value.clone());
    }
    for (name, value) in &m.add {
        let existing: Vec<&[u8]> = headers.get_all(name).iter().map(HeaderValue::as_bytes).collect();
        if existing.is_empty() {
            headers.insert(name.clone(), value.clone());
            continue;
        }
        let mut joined = existing.join(&b","[..]);
        joined.push(b',');
        joined.extend_from_slice(value.as_bytes());
        if let Ok(v) = HeaderValue::from_bytes(&joined) {
            headers.insert(name.clone(), v);
        }
    }
    for name in &m.remove {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests;
