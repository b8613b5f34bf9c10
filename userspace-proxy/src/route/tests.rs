use http::{HeaderMap, HeaderName, HeaderValue, Method};

use super::*;
use crate::snapshot::{Redirect, ValueMatch};

fn view<'a>(path: &'a str, query: Option<&'a str>, headers: &'a HeaderMap) -> RequestView<'a> {
    RequestView { method: &Method::GET, scheme: "http", host: Some("echo"), path, query, headers }
}

#[test]
fn path_prefix_matches_whole_segments() {
    let cases = [
        ("/", "/", true),
        ("/", "/anything/at/all", true),
        ("/v2", "/v2", true),
        ("/v2", "/v2/", true),
        ("/v2", "/v2/example", true),
        ("/v2", "/v2example", false),
        ("/v2", "/foo/v2/example", false),
        ("/v2/", "/v2", true),
        ("/v2/", "/v2/x", true),
        ("/v2/", "/v2x", false),
    ];
    for (prefix, path, expected) in cases {
        assert_eq!(
            path_matches(&PathMatch::Prefix(prefix.into()), path),
            expected,
            "PathPrefix {prefix} against {path}"
        );
    }
    assert!(path_matches(&PathMatch::Exact("/v1".into()), "/v1"));
    assert!(!path_matches(&PathMatch::Exact("/v1".into()), "/v1/"));
    let re = regex::Regex::new("^/v[0-9]+/users$").expect("regex");
    assert!(path_matches(&PathMatch::Regex(re.clone()), "/v12/users"));
    assert!(!path_matches(&PathMatch::Regex(re), "/v12/users/1"));
}

#[test]
fn header_and_query_matches_are_anded_and_header_names_case_insensitive() {
    let mut headers = HeaderMap::new();
    headers.insert("version", HeaderValue::from_static("two"));
    headers.append("x-multi", HeaderValue::from_static("a"));
    headers.append("x-multi", HeaderValue::from_static("b"));
    let m = HttpMatch {
        path: PathMatch::Prefix("/".into()),
        method: None,
        headers: vec![
            HeaderMatch { name: HeaderName::from_static("version"), value: ValueMatch::Exact("two".into()) },
            HeaderMatch { name: HeaderName::from_static("x-multi"), value: ValueMatch::Exact("a,b".into()) },
        ],
        query: vec![QueryMatchFixture::exact("animal", "whale")],
    };
    assert!(http_matches(&m, &view("/", Some("animal=whale&color=blue"), &headers)));
    assert!(!http_matches(&m, &view("/", Some("animal=dolphin"), &headers)), "query value differs");
    assert!(!http_matches(&m, &view("/", None, &headers)), "query missing");
    let mut one = headers.clone();
    one.remove("version");
    assert!(!http_matches(&m, &view("/", Some("animal=whale"), &one)), "header missing");
    let post = RequestView { method: &Method::POST, ..view("/", Some("animal=whale"), &headers) };
    let with_method = HttpMatch { method: Some(Method::GET), ..m.clone() };
    assert!(!http_matches(&with_method, &post));
}

struct QueryMatchFixture;
impl QueryMatchFixture {
    fn exact(name: &str, value: &str) -> crate::snapshot::QueryMatch {
        crate::snapshot::QueryMatch { name: name.into(), value: ValueMatch::Exact(value.into()) }
    }
}

#[test]
fn redirect_locations() {
    let headers = HeaderMap::new();
    let req = view("/prefix/one", Some("a=b"), &headers);
    let redirect =
        |scheme: Option<&str>, host: Option<&str>, port: Option<u16>, path: Option<PathModifier>| Redirect {
            scheme: scheme.map(str::to_owned),
            hostname: host.map(str::to_owned),
            path,
            port,
            status: 302,
        };
    let cases = [
        (redirect(None, Some("example.org"), None, None), 80, "http://example.org/prefix/one?a=b"),
        (redirect(None, None, Some(8083), None), 80, "http://echo:8083/prefix/one?a=b"),
        (redirect(Some("https"), None, None, None), 80, "https://echo/prefix/one?a=b"),
        (redirect(Some("https"), None, Some(8443), None), 80, "https://echo:8443/prefix/one?a=b"),
        (redirect(Some("http"), None, None, None), 8080, "http://echo/prefix/one?a=b"),
        (redirect(None, None, None, None), 8080, "http://echo:8080/prefix/one?a=b"),
        (redirect(None, None, Some(80), None), 8080, "http://echo/prefix/one?a=b"),
        (redirect(None, None, None, Some(PathModifier::Full("/full".into()))), 80, "http://echo/full?a=b"),
        (
            redirect(None, None, None, Some(PathModifier::Prefix("/replacement".into()))),
            80,
            "http://echo/replacement/one?a=b",
        ),
    ];
    for (r, port, expected) in cases {
        assert_eq!(redirect_location(&r, port, Some("/prefix"), &req), expected, "{r:?}");
    }
}

#[test]
fn replace_prefix_match_follows_the_spec_table() {
    let cases = [
        ("/foo", "/foo/bar", "/xyz", "/xyz/bar"),
        ("/foo", "/foo/bar", "/xyz/", "/xyz/bar"),
        ("/foo/", "/foo/bar", "/xyz", "/xyz/bar"),
        ("/foo/", "/foo/bar", "/xyz/", "/xyz/bar"),
        ("/foo", "/foo", "/xyz", "/xyz"),
        ("/foo", "/foo/", "/xyz", "/xyz/"),
        ("/foo", "/foo", "/", "/"),
        ("/foo", "/foo/", "/", "/"),
        ("/foo", "/foo/bar", "/", "/bar"),
        ("/", "/bar", "/xyz", "/xyz/bar"),
    ];
    for (prefix, path, replacement, expected) in cases {
        assert_eq!(
            modified_path(&PathModifier::Prefix(replacement.into()), Some(prefix), path),
            expected,
            "prefix {prefix}, path {path}, replacement {replacement}"
        );
    }
    assert_eq!(modified_path(&PathModifier::Full("/one".into()), Some("/x"), "/x/y"), "/one");
}

#[test]
fn header_modifier_sets_adds_and_removes() {
    let mut headers = HeaderMap::new();
    headers.insert("x-header-set", HeaderValue::from_static("some-other-value"));
    headers.insert("x-header-add", HeaderValue::from_static("header-val"));
    headers.insert("x-header-remove", HeaderValue::from_static("gone"));
    let m = HeaderModifier {
        set: vec![(
            HeaderName::from_static("x-header-set"),
            HeaderValue::from_static("set-overwrites-values"),
        )],
        add: vec![
            (HeaderName::from_static("x-header-add"), HeaderValue::from_static("add-appends-values")),
            (HeaderName::from_static("x-new"), HeaderValue::from_static("fresh")),
        ],
        remove: vec![HeaderName::from_static("x-header-remove")],
    };
    apply_header_modifier(&m, &mut headers);
    assert_eq!(headers["x-header-set"], "set-overwrites-values");
    assert_eq!(headers["x-header-add"], "header-val,add-appends-values");
    assert_eq!(headers["x-new"], "fresh");
    assert!(!headers.contains_key("x-header-remove"));
}

fn weighted(weights: &[u32]) -> Vec<WeightedBackend> {
    weights
        .iter()
        .map(|&weight| WeightedBackend {
            weight,
            target: BackendTarget::Invalid { reason: format!("w{weight}") },
            filters: Vec::new(),
        })
        .collect()
}

#[test]
fn weighted_selection_over_100_000_draws_is_within_half_a_point() {
    for weights in [vec![90, 10], vec![70, 30], vec![50, 50], vec![1, 2, 3, 4], vec![1, 0, 1]] {
        let backends = weighted(&weights);
        let total: u32 = weights.iter().sum();
        let mut counts = vec![0u32; weights.len()];
        let mut rng = fastrand::Rng::with_seed(0x6a6d_6d61);
        const DRAWS: u32 = 100_000;
        for _ in 0..DRAWS {
            let chosen = pick_weighted(&backends, rng.u64(..)).expect("some weight is non-zero");
            let index = backends.iter().position(|b| std::ptr::eq(b, chosen)).expect("from the list");
            counts[index] += 1;
        }
        for (i, (&w, &c)) in weights.iter().zip(&counts).enumerate() {
            let expected = f64::from(w) / f64::from(total);
            let observed = f64::from(c) / f64::from(DRAWS);
            assert!(
                (observed - expected).abs() <= 0.005,
                "weights {weights:?}: backend {i} got {observed:.4}, expected {expected:.4}"
            );
            if w == 0 {
                assert_eq!(c, 0, "weight 0 gets nothing");
            }
        }
    }
}

#[test]
fn all_zero_weights_pick_nothing() {
    assert!(pick_weighted(&weighted(&[0, 0]), 12345).is_none());
    assert!(pick_weighted(&weighted(&[]), 12345).is_none());
}

#[test]
fn grpc_paths_split_into_service_and_method() {
    assert_eq!(grpc_path("/proto.EchoTestService/Echo"), ("proto.EchoTestService", "Echo"));
    assert_eq!(grpc_path("/only"), ("only", ""));
    assert_eq!(grpc_path(""), ("", ""));
}

/// A table is sorted by its constructor whatever order the entries come in: specificity first,
/// then the place (route age and name order, rule, match) for ties.
#[test]
fn route_tables_sort_their_entries_by_precedence() {
    let rule = |name: &str, path: PathMatch, method: Option<Method>| HttpRuleMatch {
        id: Arc::new(RouteId {
            kind: crate::snapshot::RouteKind::Http,
            route: crate::snapshot::ObjectRef::new("demo", name),
            rule: 0,
            rule_name: None,
        }),
        matcher: HttpMatch { path, method, headers: Vec::new(), query: Vec::new() },
        action: Arc::new(RuleAction {
            filters: Vec::new(),
            backends: Vec::new(),
            timeouts: Timeouts::default(),
        }),
    };
    let place = |route, matched| Place { route, rule: 0, matched };
    let entries = vec![
        (place(0, 0), rule("catch-all", PathMatch::Prefix("/".into()), None)),
        (place(1, 0), rule("younger-twin", PathMatch::Prefix("/api".into()), None)),
        (place(0, 1), rule("older-twin", PathMatch::Prefix("/api".into()), None)),
        (place(2, 0), rule("with-method", PathMatch::Prefix("/api".into()), Some(Method::GET))),
        (place(3, 0), rule("exact", PathMatch::Exact("/a".into()), None)),
    ];
    let RouteTable::Http(rules) = RouteTable::http(entries) else { panic!("an HTTP table") };
    let order: Vec<&str> = rules.iter().map(|r| &*r.id.route.name).collect();
    assert_eq!(order, ["exact", "with-method", "older-twin", "younger-twin", "catch-all"]);
}
