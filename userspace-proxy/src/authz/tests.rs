use super::*;

fn id(ns: &str, sa: &str) -> Identity {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}").parse().expect("identity")
}

fn policy(ns: &str, name: &str, action: Action, rules: Vec<Rule>) -> Policy {
    Policy {
        name: format!("{ns}/{name}").into(),
        namespace: ns.into(),
        selector: None,
        action,
        rules,
        unenforceable: None,
    }
}

fn from(source: Source) -> Rule {
    Rule { from: vec![source], to: vec![] }
}

fn principals(p: &[&str]) -> Source {
    Source { principals: p.iter().map(|s| Pattern::parse(s)).collect(), ..Source::default() }
}

fn namespaces(n: &[&str]) -> Source {
    Source { namespaces: n.iter().map(|s| Pattern::parse(s)).collect(), ..Source::default() }
}

static NO_LABELS: std::sync::LazyLock<LabelSet> = std::sync::LazyLock::new(LabelSet::default);

fn target(ns: &'static str, port: u16) -> Target<'static> {
    Target { namespace: ns, labels: &NO_LABELS, port }
}

fn check(authz: &Authz, peer: Option<&Identity>, target: Target<'_>) -> Decision {
    authz.check(&Peer { identity: peer, ip: Some("10.244.1.5".parse().unwrap()) }, &target)
}

fn denied_by(d: &Decision) -> Option<(&str, DenyReason)> {
    match d {
        Decision::Allow => None,
        Decision::Deny { policy, reason } => Some((policy, *reason)),
    }
}

#[test]
fn no_policy_allows_everything() {
    let authz = Authz::new("gammaray-system", vec![]);
    assert_eq!(check(&authz, None, target("demo", 80)), Decision::Allow);
}

#[test]
fn an_allow_by_service_account_admits_it_and_denies_the_rest() {
    let authz = Authz::new(
        "gammaray-system",
        vec![policy(
            "demo",
            "allow-client",
            Action::Allow,
            vec![from(principals(&["cluster.local/ns/demo/sa/client"]))],
        )],
    );
    assert_eq!(check(&authz, Some(&id("demo", "client")), target("demo", 80)), Decision::Allow);
    let other = check(&authz, Some(&id("demo", "other")), target("demo", 80));
    assert_eq!(denied_by(&other), Some(("demo/allow-client", DenyReason::NoAllowMatched)));
    assert!(matches!(check(&authz, None, target("demo", 80)), Decision::Deny { .. }), "unauthenticated");
    assert_eq!(
        check(&authz, Some(&id("x", "y")), target("elsewhere", 80)),
        Decision::Allow,
        "other namespaces untouched"
    );
}

#[test]
fn a_deny_wins_over_an_allow() {
    let authz = Authz::new(
        "gammaray-system",
        vec![
            policy("demo", "allow-all-demo", Action::Allow, vec![from(namespaces(&["demo"]))]),
            policy("demo", "deny-client", Action::Deny, vec![from(principals(&["*/sa/client"]))]),
        ],
    );
    let d = check(&authz, Some(&id("demo", "client")), target("demo", 80));
    assert_eq!(denied_by(&d), Some(("demo/deny-client", DenyReason::DenyMatched)));
    assert_eq!(check(&authz, Some(&id("demo", "other")), target("demo", 80)), Decision::Allow);
}

#[test]
fn a_deny_by_namespace_and_its_not_form() {
    let authz = Authz::new(
        "gammaray-system",
        vec![policy(
            "demo",
            "deny-others",
            Action::Deny,
            vec![from(Source { not_namespaces: vec![Pattern::parse("demo")], ..Source::default() })],
        )],
    );
    assert!(matches!(check(&authz, Some(&id("intruder", "x")), target("demo", 80)), Decision::Deny { .. }));
    assert_eq!(check(&authz, Some(&id("demo", "x")), target("demo", 80)), Decision::Allow);
    // An unauthenticated peer has no namespace: it is not in `demo`, so the DENY matches.
    assert!(matches!(check(&authz, None, target("demo", 80)), Decision::Deny { .. }));
}

#[test]
fn an_allow_with_no_rules_denies_everything_and_an_empty_rule_allows_everything() {
    let deny_all = Authz::new("gammaray-system", vec![policy("demo", "deny-all", Action::Allow, vec![])]);
    assert!(matches!(
        check(&deny_all, Some(&id("demo", "client")), target("demo", 80)),
        Decision::Deny { .. }
    ));
    let allow_all = Authz::new(
        "gammaray-system",
        vec![policy("demo", "allow-all", Action::Allow, vec![Rule::default()])],
    );
    assert_eq!(check(&allow_all, None, target("demo", 80)), Decision::Allow);
    let deny_nothing = Authz::new("gammaray-system", vec![policy("demo", "d", Action::Deny, vec![])]);
    assert_eq!(
        check(&deny_nothing, None, target("demo", 80)),
        Decision::Allow,
        "a DENY with no rules matches nothing"
    );
}

#[test]
fn a_port_scoped_rule_applies_to_its_ports_only() {
    let rule = Rule { from: vec![], to: vec![Operation { ports: vec![9000], not_ports: vec![] }] };
    let authz = Authz::new("gammaray-system", vec![policy("demo", "deny-9000", Action::Deny, vec![rule])]);
    assert!(matches!(check(&authz, None, target("demo", 9000)), Decision::Deny { .. }));
    assert_eq!(check(&authz, None, target("demo", 80)), Decision::Allow);
}

#[test]
fn the_root_namespace_applies_mesh_wide() {
    let authz = Authz::new(
        "gammaray-system",
        vec![policy("gammaray-system", "mesh-deny", Action::Deny, vec![from(namespaces(&["bad"]))])],
    );
    for ns in ["demo", "other", "gammaray-system"] {
        let d = check(&authz, Some(&id("bad", "x")), target(ns, 80));
        assert_eq!(denied_by(&d), Some(("gammaray-system/mesh-deny", DenyReason::DenyMatched)), "{ns}");
    }
}

#[test]
fn a_selector_applies_to_the_workloads_carrying_its_labels() {
    let mut p = policy("demo", "deny-to-v2", Action::Deny, vec![Rule::default()]);
    p.selector = Some(vec![("version".into(), "v2".into())]);
    let authz = Authz::new("gammaray-system", vec![p]);
    let v2 = LabelSet::new([("app", "backend"), ("version", "v2")]);
    let v1 = LabelSet::new([("app", "backend"), ("version", "v1")]);
    let at = |labels: &LabelSet| {
        authz.check(&Peer { identity: None, ip: None }, &Target { namespace: "demo", labels, port: 80 })
    };
    assert!(matches!(at(&v2), Decision::Deny { .. }));
    assert_eq!(at(&v1), Decision::Allow);
}

#[test]
fn a_label_set_reads_back_what_it_was_made_of() {
    let set = LabelSet::new([("app", "web"), ("tier", ""), ("version", "v1")]);
    assert_eq!(set.iter().collect::<Vec<_>>(), [("app", "web"), ("tier", ""), ("version", "v1")]);
    assert_eq!(set.get("tier"), Some(""));
    assert_eq!(set.get("nope"), None);
    assert_eq!(LabelSet::default().iter().count(), 0);
}

#[test]
fn an_unenforceable_policy_denies_its_targets() {
    let mut p = policy("demo", "l7-deny", Action::Deny, vec![Rule::default()]);
    p.unenforceable = Some("rules[0].to[0].operation.paths: L7 fields are not enforced".into());
    let authz = Authz::new("gammaray-system", vec![p]);
    let d = check(&authz, Some(&id("demo", "client")), target("demo", 80));
    assert_eq!(denied_by(&d), Some(("demo/l7-deny", DenyReason::Unenforceable)));
}

#[test]
fn ip_blocks_match_the_source_and_an_unknown_source_fails_closed() {
    let block = |s: &str| IpBlock::parse(s).expect("block");
    assert!(block("10.244.0.0/16").contains("10.244.1.5".parse().unwrap()));
    assert!(!block("10.244.0.0/16").contains("10.245.1.5".parse().unwrap()));
    assert!(block("10.244.1.5").contains("10.244.1.5".parse().unwrap()));
    assert!(block("0.0.0.0/0").contains("1.2.3.4".parse().unwrap()));
    assert!(block("fd00::/8").contains("fd12::1".parse().unwrap()));
    assert!(IpBlock::parse("10.0.0.0/33").is_err() && IpBlock::parse("nope").is_err());

    let src = Source { ip_blocks: vec![block("10.244.1.0/24")], ..Source::default() };
    let allow =
        Authz::new("gammaray-system", vec![policy("demo", "a", Action::Allow, vec![from(src.clone())])]);
    let deny = Authz::new("gammaray-system", vec![policy("demo", "d", Action::Deny, vec![from(src)])]);
    let at = |authz: &Authz, ip: Option<&str>| {
        authz.check(&Peer { identity: None, ip: ip.map(|i| i.parse().unwrap()) }, &target("demo", 80))
    };
    assert_eq!(at(&allow, Some("10.244.1.9")), Decision::Allow);
    assert!(matches!(at(&allow, Some("10.244.2.9")), Decision::Deny { .. }));
    assert!(matches!(at(&allow, None), Decision::Deny { .. }), "unknown source: ALLOW does not match");
    assert!(matches!(at(&deny, Some("10.244.1.9")), Decision::Deny { .. }));
    assert_eq!(at(&deny, Some("10.244.2.9")), Decision::Allow);
    assert!(matches!(at(&deny, None), Decision::Deny { .. }), "unknown source: DENY matches");
}

#[test]
fn patterns_follow_istios_wildcards() {
    assert!(Pattern::parse("*").matches("anything"));
    assert!(Pattern::parse("cluster.local/ns/demo/*").matches("cluster.local/ns/demo/sa/x"));
    assert!(Pattern::parse("*/sa/client").matches("cluster.local/ns/demo/sa/client"));
    assert!(!Pattern::parse("demo").matches("demo2"));
}

#[test]
fn service_accounts_match_namespace_and_name_exactly() {
    let src = Source { service_accounts: vec![("demo".into(), "client".into())], ..Source::default() };
    let allow = Authz::new("gammaray-system", vec![policy("demo", "a", Action::Allow, vec![from(src)])]);
    assert_eq!(check(&allow, Some(&id("demo", "client")), target("demo", 80)), Decision::Allow);
    assert!(matches!(check(&allow, Some(&id("other", "client")), target("demo", 80)), Decision::Deny { .. }));
    assert!(matches!(check(&allow, None, target("demo", 80)), Decision::Deny { .. }), "unauthenticated");
    let not = Source { not_service_accounts: vec![("demo".into(), "client".into())], ..Source::default() };
    let deny = Authz::new("gammaray-system", vec![policy("demo", "d", Action::Deny, vec![from(not)])]);
    assert_eq!(check(&deny, Some(&id("demo", "client")), target("demo", 80)), Decision::Allow);
    assert!(matches!(check(&deny, Some(&id("demo", "other")), target("demo", 80)), Decision::Deny { .. }));
}

#[test]
fn strict_peer_authentication_refuses_only_the_unauthenticated() {
    let strict = (PEER_AUTHENTICATION_LABEL, "strict");
    let permissive = (PEER_AUTHENTICATION_LABEL, "permissive");
    let authz = Authz::new("gammaray-system", vec![]).with_strict_namespaces(["locked".into()]);
    let client = id("demo", "client");
    let unauthenticated = Some((STRICT_POLICY, DenyReason::Unauthenticated));
    // By namespace: the unauthenticated peer is refused, a verified one goes on to the policies.
    assert_eq!(denied_by(&check(&authz, None, target("locked", 80))), unauthenticated);
    assert_eq!(check(&authz, Some(&client), target("locked", 80)), Decision::Allow);
    assert_eq!(check(&authz, None, target("demo", 80)), Decision::Allow, "permissive by default");
    // A pod's own label overrides its namespace's, both ways; a value that is neither reads as
    // strict.
    for (labels, ns, want) in [
        (vec![permissive], "locked", None),
        (vec![strict], "demo", unauthenticated),
        (vec![(PEER_AUTHENTICATION_LABEL, "STRICT")], "demo", unauthenticated),
        (vec![(PEER_AUTHENTICATION_LABEL, "")], "demo", unauthenticated),
    ] {
        let labels = LabelSet::new(labels.clone());
        let t = Target { namespace: ns, labels: &labels, port: 80 };
        assert_eq!(denied_by(&check(&authz, None, t)), want, "{labels:?} in {ns}");
        assert_eq!(check(&authz, Some(&client), t), Decision::Allow, "{labels:?}: a verified peer");
    }
    assert_eq!(PeerAuthentication::parse("strict"), Ok(PeerAuthentication::Strict));
    assert_eq!(PeerAuthentication::parse("permissive"), Ok(PeerAuthentication::Permissive));
    assert_eq!(PeerAuthentication::parse("Permissive"), Err(PeerAuthentication::Strict));
}

#[test]
fn a_permissive_workload_applies_its_policies_to_the_unauthenticated() {
    // ALLOW by namespace: an unauthenticated peer has none, so it is denied; by address, it is
    // admitted.
    let authz = Authz::new(
        "gammaray-system",
        vec![policy("demo", "ns", Action::Allow, vec![from(namespaces(&["demo"]))])],
    );
    assert_eq!(
        denied_by(&check(&authz, None, target("demo", 80))),
        Some(("demo/ns", DenyReason::NoAllowMatched))
    );
    let by_ip =
        Source { ip_blocks: vec![IpBlock::parse("10.244.1.0/24").expect("block")], ..Source::default() };
    let authz = Authz::new("gammaray-system", vec![policy("demo", "ip", Action::Allow, vec![from(by_ip)])]);
    assert_eq!(check(&authz, None, target("demo", 80)), Decision::Allow);
}
