//! Route status, written by one agent at a time: the holder of a coordination.k8s.io Lease.
//!
//! Every agent translates the same objects, so every agent knows every route's status; only the
//! Lease holder writes it, which keeps N agents from racing N-fold on each route. The holder
//! renews every third of the lease duration; another agent takes over when the renewals stop
//! for a whole duration, or at once when the holder releases the Lease on a clean shutdown.
//!
//! A write replaces `status.parents` through the status subresource with the route's
//! resourceVersion (a conflict is retried when the watch brings the newer object), keeping every
//! entry of other controllers as it is and replacing only entries with controllerName
//! `gammaray.dev/mesh`. A condition's lastTransitionTime changes only when its status changes.
//! Nothing is written when the route already says what it should, so the agent's own writes,
//! coming back through the watch, settle at once.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use gammaray_proxy::snapshot::RouteKind;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{DynamicObject, PostParams},
};
use prometheus_client::metrics::counter::Counter;
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::{
    generation::Generation,
    store::Store,
    translate::{CONTROLLER_NAME, ParentStatus, RouteKey, RouteStatus},
};

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// Who this agent is in the Lease (its node name).
    pub identity: String,
    pub duration: Duration,
}

/// Runs until `shutdown` turns true, then releases the Lease if held. `leading` tells whether
/// this agent holds it.
pub async fn run(
    client: Client,
    lease: LeaseConfig,
    mut generation: watch::Receiver<Arc<Generation>>,
    mut shutdown: watch::Receiver<bool>,
    leading: Arc<AtomicBool>,
    refused: Refused,
) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), &lease.namespace);
    let renew = lease.duration / 3;
    let mut tick = tokio::time::interval(renew.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // When this agent last renewed the Lease: a failed renewal loses it only once it has expired.
    let mut renewed: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let held = match try_hold(&leases, &lease).await {
                    Ok(held) => {
                        renewed = held.then(std::time::Instant::now);
                        held
                    }
                    Err(err) => {
                        let valid = renewed.is_some_and(|at| at.elapsed() < lease.duration);
                        warn!(error = %err, lease = %lease.name, still_held = valid, "cannot read or renew the status lease");
                        valid
                    }
                };
                if held != leading.swap(held, Ordering::AcqRel) {
                    if held {
                        info!(lease = %lease.name, identity = %lease.identity, "holding the status lease: this agent writes route status");
                    } else {
                        info!(lease = %lease.name, "lost the status lease");
                    }
                }
            }
            changed = generation.changed() => if changed.is_err() { return },
            _ = shutdown.changed() => {
                if leading.swap(false, Ordering::AcqRel) {
                    match release(&leases, &lease).await {
                        Ok(()) => info!(lease = %lease.name, "released the status lease"),
                        Err(err) => warn!(error = %err, "cannot release the status lease; it expires on its own"),
                    }
                }
                return;
            }
        }
        if leading.load(Ordering::Acquire) {
            let current = generation.borrow_and_update().clone();
            write_statuses(&client, &current, &lease.identity, &refused).await;
        }
    }
}

fn now_micro() -> MicroTime {
    MicroTime(Timestamp::now())
}

/// Acquires, renews or observes the Lease; returns whether this agent holds it now.
async fn try_hold(leases: &Api<Lease>, cfg: &LeaseConfig) -> kube::Result<bool> {
    let pp = PostParams { field_manager: Some(field_manager(&cfg.identity)), ..Default::default() };
    let duration_s = cfg.duration.as_secs().max(1) as i32;
    let Some(mut current) = leases.get_opt(&cfg.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta { name: Some(cfg.name.clone()), ..Default::default() },
            spec: Some(LeaseSpec {
                holder_identity: Some(cfg.identity.clone()),
                lease_duration_seconds: Some(duration_s),
                acquire_time: Some(now_micro()),
                renew_time: Some(now_micro()),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match leases.create(&pp, &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = current.spec.get_or_insert_default();
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let mine = holder.as_deref() == Some(cfg.identity.as_str());
    let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
        (Some(MicroTime(renewed)), Some(d)) => {
            Timestamp::now().duration_since(*renewed).as_secs_f64() > f64::from(d)
        }
        _ => true,
    };
    if !mine && holder.is_some() && !expired {
        return Ok(false);
    }
    if !mine {
        spec.holder_identity = Some(cfg.identity.clone());
        spec.acquire_time = Some(now_micro());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.renew_time = Some(now_micro());
    spec.lease_duration_seconds = Some(duration_s);
    match leases.replace(&cfg.name, &pp, &current).await {
        Ok(_) => Ok(true),
        // Someone else renewed or took it in between: not ours this round.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

async fn release(leases: &Api<Lease>, cfg: &LeaseConfig) -> kube::Result<()> {
    let Some(mut current) = leases.get_opt(&cfg.name).await? else { return Ok(()) };
    let spec = current.spec.get_or_insert_default();
    if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    let pp = PostParams { field_manager: Some(field_manager(&cfg.identity)), ..Default::default() };
    leases.replace(&cfg.name, &pp, &current).await.map(|_| ())
}

fn field_manager(identity: &str) -> String {
    format!("gammaray-agent-{identity}")
}

/// The route as the store holds it (JSON), if it does.
fn current_route(store: &Store, kind: &str, namespace: &str, name: &str) -> Option<Value> {
    let key = crate::store::KeyRef(namespace, name);
    match kind {
        "GRPCRoute" => store.grpc_routes.get(&key).and_then(|r| serde_json::to_value(&**r).ok()),
        _ => store.http_routes.get(&key).and_then(|r| serde_json::to_value(&**r).ok()),
    }
}

/// The parents' entries without their timestamps, which differ on every attempt.
fn desired_only(parents: &[Value]) -> Value {
    let mut parents = json!(parents);
    for p in parents.as_array_mut().into_iter().flatten() {
        for c in p["conditions"].as_array_mut().into_iter().flatten() {
            if let Some(c) = c.as_object_mut() {
                c.remove("lastTransitionTime");
            }
        }
    }
    parents
}

/// The `parentRef` of a status entry, as the route wrote it (namespace filled in).
fn parent_ref(p: &ParentStatus) -> Value {
    let r = &p.parent_ref;
    let mut parent_ref = json!({"group": r.group, "kind": r.kind, "namespace": r.namespace, "name": r.name});
    if let Some(port) = r.port {
        parent_ref["port"] = json!(port);
    }
    if let Some(section) = &r.section_name {
        parent_ref["sectionName"] = json!(section);
    }
    parent_ref
}

/// The `status.parents` entry gammaray writes for one parent, keeping each condition's
/// transition time from `previous` (our earlier entry for the same parent) while its status is
/// unchanged.
fn parent_entry(p: &ParentStatus, parent_ref: Value, now: &str, previous: Option<&Value>) -> Value {
    let conditions: Vec<Value> = p
        .conditions
        .iter()
        .map(|c| {
            let since = previous
                .and_then(|prev| prev["conditions"].as_array())
                .and_then(|cs| cs.iter().find(|pc| pc["type"] == c.type_ && pc["status"] == c.status))
                .and_then(|pc| pc["lastTransitionTime"].as_str())
                .unwrap_or(now);
            let mut cond = json!({
                "type": c.type_, "status": c.status, "reason": c.reason, "message": c.message,
                "lastTransitionTime": since,
            });
            if let Some(g) = c.observed_generation {
                cond["observedGeneration"] = json!(g);
            }
            cond
        })
        .collect();
    json!({"parentRef": parent_ref, "controllerName": p.controller_name, "conditions": conditions})
}

fn same_parent_ref(a: &Value, b: &Value) -> bool {
    let norm = |v: &Value| {
        let mut v = v.clone();
        if v["group"].is_null() {
            v["group"] = json!("gateway.networking.k8s.io");
        }
        if v["kind"].is_null() {
            v["kind"] = json!("Gateway");
        }
        v
    };
    norm(a) == norm(b)
}

/// The route's `status.parents` with gammaray's entries replaced by `status`'s; `None` when
/// nothing would change.
pub fn merged_parents(current: &Value, status: &RouteStatus, now: &str) -> Option<Vec<Value>> {
    let existing: Vec<Value> = current["status"]["parents"].as_array().cloned().unwrap_or_default();
    let (ours, others): (Vec<Value>, Vec<Value>) =
        existing.into_iter().partition(|p| p["controllerName"] == CONTROLLER_NAME);
    let desired: Vec<Value> = status
        .parents
        .iter()
        .map(|p| {
            let parent_ref = parent_ref(p);
            let previous = ours.iter().find(|o| same_parent_ref(&o["parentRef"], &parent_ref));
            parent_entry(p, parent_ref, now, previous)
        })
        .collect();
    let strip = |v: &[Value]| -> Vec<Value> {
        v.iter()
            .map(|p| {
                let mut p = p.clone();
                if let Some(cs) = p["conditions"].as_array_mut() {
                    for c in cs {
                        if let Some(o) = c.as_object_mut() {
                            o.remove("lastTransitionTime");
                        }
                    }
                }
                p
            })
            .collect()
    };
    if strip(&ours) == strip(&desired) {
        return None;
    }
    Some(others.into_iter().chain(desired).collect())
}

/// Status writes the API server refused as invalid (422: the CRD's schema or its CEL rules say
/// no): counted, logged with the server's message, and not tried again until the route or the
/// status to write changes.
#[derive(Clone, Default)]
pub struct Refused {
    pub count: Counter,
    /// Per route, the `status.parents` last refused.
    last: Arc<Mutex<BTreeMap<String, Value>>>,
    /// Per route, the status and the route object last found to agree (or written): while
    /// neither has changed (the same shared values, held here so their addresses stay theirs),
    /// the route is not serialized and compared again. A change to one route then costs one
    /// comparison, not one per route of the cluster. A route that is gone is forgotten.
    settled: Arc<Mutex<BTreeMap<RouteKey, Settled>>>,
}

/// A route's status and the route object it was found on.
type Settled = (Arc<RouteStatus>, RouteObject);

/// A route object as the store holds it.
#[derive(Clone)]
enum RouteObject {
    Http(Arc<gateway_api::httproutes::HttpRoute>),
    Grpc(Arc<gateway_api::grpcroutes::GrpcRoute>),
}

impl RouteObject {
    fn of(store: &Store, kind: RouteKind, namespace: &str, name: &str) -> Option<Self> {
        let key = crate::store::KeyRef(namespace, name);
        match kind {
            RouteKind::Http => store.http_routes.get(&key).cloned().map(Self::Http),
            RouteKind::Grpc => store.grpc_routes.get(&key).cloned().map(Self::Grpc),
        }
    }

    fn same(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Http(a), Self::Http(b)) => Arc::ptr_eq(a, b),
            (Self::Grpc(a), Self::Grpc(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// Writes each route's status of `generation` that differs from what the route says, onto the
/// generation's own objects: a status is never paired with objects of another version.
pub async fn write_statuses(client: &Client, generation: &Generation, identity: &str, refused: &Refused) {
    let (desired, store) = (&generation.statuses, &generation.objects);
    let now = Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let pp = PostParams { field_manager: Some(field_manager(identity)), ..Default::default() };
    // Forget the routes that are gone: what is held for them would keep their objects alive.
    refused.settled.lock().expect("settled lock").retain(|key, _| desired.contains_key(key));
    for (key, status) in desired.iter() {
        let kind = status.kind.to_string();
        let Some((namespace, name)) = status.route.split_once('/') else { continue };
        let Some(object) = RouteObject::of(store, status.kind, namespace, name) else { continue };
        let settle = || {
            refused
                .settled
                .lock()
                .expect("settled lock")
                .insert(key.clone(), (status.clone(), object.clone()));
        };
        if refused
            .settled
            .lock()
            .expect("settled lock")
            .get(key)
            .is_some_and(|(s, o)| Arc::ptr_eq(s, status) && o.same(&object))
        {
            continue;
        }
        let Some(mut route) = current_route(store, &kind, namespace, name) else { continue };
        let Some(parents) = merged_parents(&route, status, &now) else {
            settle();
            continue;
        };
        let Some(watched) = crate::kube_source::kind(&kind) else { continue };
        route["status"]["parents"] = json!(parents);
        let attempt =
            json!({"generation": route["metadata"]["generation"], "parents": desired_only(&parents)});
        if refused.last.lock().expect("refused lock").get(&status.route) == Some(&attempt) {
            continue;
        }
        route["apiVersion"] = json!(watched.api_version());
        route["kind"] = json!(kind);
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &watched.resource());
        let object: DynamicObject = match serde_json::from_value(route) {
            Ok(o) => o,
            Err(err) => {
                warn!(route = %status.route, error = %err, "cannot encode the route for its status");
                continue;
            }
        };
        match api.replace_status(name, &pp, &object).await {
            Ok(_) => {
                settle();
                debug!(route = %status.route, %kind, "route status written")
            }
            Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {
                debug!(route = %status.route, code = s.code, "route changed under the status write; the watch brings it back")
            }
            Err(kube::Error::Api(s)) if s.code == 422 => {
                refused.count.inc();
                warn!(route = %status.route, %kind, message = %s.message, "the API server refused the route's status as invalid; not retried until the route or its status changes");
                refused.last.lock().expect("refused lock").insert(status.route.clone(), attempt);
            }
            Err(err) => warn!(route = %status.route, error = %err, "cannot write route status"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gammaray_proxy::snapshot::RouteKind;

    use crate::translate::{ParentRef, RouteCondition};

    fn status(accepted: &'static str) -> RouteStatus {
        RouteStatus {
            kind: RouteKind::Http,
            route: "demo/r".into(),
            generation: Some(2),
            parents: vec![ParentStatus {
                parent_ref: ParentRef {
                    group: String::new(),
                    kind: "Service".into(),
                    namespace: "demo".into(),
                    name: "web".into(),
                    port: Some(80),
                    section_name: None,
                },
                controller_name: CONTROLLER_NAME,
                conditions: vec![RouteCondition {
                    type_: "Accepted",
                    status: accepted,
                    reason: if accepted == "True" { "Accepted" } else { "NoMatchingParent" },
                    message: String::new(),
                    observed_generation: Some(2),
                }],
            }],
        }
    }

    #[test]
    fn other_controllers_entries_are_kept_and_ours_replaced() {
        let other = json!({"parentRef": {"group": "", "kind": "Service", "name": "web"}, "controllerName": "example.com/other", "conditions": []});
        let route = json!({"status": {"parents": [other.clone()]}});
        let parents = merged_parents(&route, &status("True"), "2026-01-01T00:00:00Z").expect("a change");
        assert_eq!(parents.len(), 2);
        assert_eq!(parents[0], other, "the other controller's entry is untouched");
        assert_eq!(parents[1]["controllerName"], CONTROLLER_NAME);
        assert_eq!(parents[1]["conditions"][0]["observedGeneration"], 2);

        let written = json!({"status": {"parents": parents}});
        assert!(
            merged_parents(&written, &status("True"), "2026-02-02T00:00:00Z").is_none(),
            "an unchanged status is not written again, whatever the time"
        );
        let flipped = merged_parents(&written, &status("False"), "2026-02-02T00:00:00Z").expect("a change");
        assert_eq!(flipped.len(), 2);
        assert_eq!(flipped[1]["conditions"][0]["lastTransitionTime"], "2026-02-02T00:00:00Z");
        assert_eq!(flipped[1]["conditions"][0]["reason"], "NoMatchingParent");
    }
}
