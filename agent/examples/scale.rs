//! The agent's configuration path at cluster scale, for the bench's scale phase: objects decoded
//! into the store as the Kubernetes source decodes them (`Store::apply_value`), translated and
//! published by the agent's own `Publisher` onto the channel the proxy reads.
//!
//! The cluster: SERVICES Services of 10 endpoints each in 50 namespaces, a Pod behind every
//! endpoint shaped as a kubelet leaves it (a container with ports, env, resources, two probes and
//! a projected token volume; conditions and a container status; an owner reference, labels and
//! annotations), one EndpointSlice per Service, one HTTPRoute with a 90/10 split per ten Services,
//! 20 Nodes.
//!
//! Measured, printed as one JSON line: the initial load (decode, store, first translation), RSS
//! before and after it, and for CHANGES endpoint changes (one endpoint turning unready) and
//! CHANGES weight changes: the time from the change reaching the store to the new snapshot on the
//! proxy's channel, and this thread's CPU for it. With CHURN_SECS > 0, a sustained churn of 100
//! endpoint changes per second for that long, coalesced as the Kubernetes source coalesces them
//! (at most one snapshot per 50 ms while changes keep coming): the process's CPU in cores and the
//! snapshots published.
//!
//! Usage: `scale SERVICES [CHANGES [CHURN_SECS]]`.

use std::{
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use gammaray_agent::{generation::Publisher, store::Store, translate::Options};
use serde_json::{Value, json};

const ENDPOINTS: usize = 10;
const NAMESPACES: usize = 50;
const NODES: usize = 20;
const DEBOUNCE: Duration = Duration::from_millis(50);
const CHURN_PER_SEC: u64 = 100;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = || anyhow::anyhow!("usage: scale SERVICES [CHANGES [CHURN_SECS]]");
    let services: usize = args.first().ok_or_else(usage)?.parse()?;
    let changes: usize = args.get(1).map_or(Ok(50), |a| a.parse())?;
    let churn_secs: u64 = args.get(2).map_or(Ok(0), |a| a.parse())?;
    anyhow::ensure!((10..=50_000).contains(&services), "between 10 and 50 000 Services");

    trim();
    let rss_before = rss_bytes();
    let (mut publisher, subscription) = Publisher::new(Options::default());
    let mut store = Store::default();
    let mut decode = Duration::ZERO;
    for value in cluster(services) {
        let t = Instant::now();
        store.apply_value(0, value).map_err(|e| anyhow::anyhow!("{e}"))?;
        decode += t.elapsed();
    }
    let heap_store = heap_in_use();
    let t = Instant::now();
    let first = publisher.publish(store.clone(), "scale");
    let first_translation = t.elapsed();
    anyhow::ensure!(first.snapshot.frontends.len() == services, "every Service has its frontend");
    anyhow::ensure!(first.rejected() == 0, "every route is accepted");
    trim();
    let rss_after = rss_bytes();
    let heap_after = heap_in_use();

    // One endpoint turning unready, then ready again, in Services spread over the cluster.
    let mut endpoint = Vec::new();
    for k in 0..changes {
        let s = (k * 7919) % services;
        let unready = if k % 2 == 0 { Some(k % ENDPOINTS) } else { None };
        endpoint.push(change(&mut store, &mut publisher, &subscription, slice(s, unready))?);
    }
    // A weight moved on one route.
    let routes = services / 10;
    let mut weight = Vec::new();
    for k in 0..changes {
        let r = (k * 7919) % routes;
        weight.push(change(
            &mut store,
            &mut publisher,
            &subscription,
            route(r * 10, 90 - (k % 80) as i64, services),
        )?);
    }

    let churn = if churn_secs > 0 { Some(churn(store, publisher, services, churn_secs)?) } else { None };

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let summary = |xs: &[(Duration, Duration)]| {
        let mut wall: Vec<f64> = xs.iter().map(|x| ms(x.0)).collect();
        let mut cpu: Vec<f64> = xs.iter().map(|x| ms(x.1)).collect();
        wall.sort_by(f64::total_cmp);
        cpu.sort_by(f64::total_cmp);
        let at =
            |v: &[f64], q: f64| v.get(((v.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0.0);
        json!({"p50_ms": at(&wall, 0.5), "p99_ms": at(&wall, 0.99), "cpu_p50_ms": at(&cpu, 0.5), "cpu_p99_ms": at(&cpu, 0.99)})
    };
    let out = json!({
        "services": services,
        "pods": services * ENDPOINTS,
        "initial_load_ms": ms(decode + first_translation),
        "initial_decode_ms": ms(decode),
        "initial_translation_ms": ms(first_translation),
        "rss_before_mib": rss_before as f64 / 1048576.0,
        "rss_after_mib": rss_after as f64 / 1048576.0,
        "heap_store_mib": heap_store as f64 / 1048576.0,
        "heap_after_mib": heap_after as f64 / 1048576.0,
        "endpoint_change": summary(&endpoint),
        "weight_change": summary(&weight),
        "churn": churn,
    });
    println!("{out}");
    Ok(())
}

/// Applies one object and publishes: the wall time until the proxy's channel has the new
/// snapshot, and this thread's CPU for it.
fn change(
    store: &mut Store,
    publisher: &mut Publisher,
    subscription: &gammaray_agent::generation::Subscription,
    object: Value,
) -> anyhow::Result<(Duration, Duration)> {
    let (wall, cpu) = (Instant::now(), thread_cpu());
    store.apply_value(0, object).map_err(|e| anyhow::anyhow!("{e}"))?;
    let generation = publisher.publish(store.clone(), "scale");
    anyhow::ensure!(
        subscription.snapshot.borrow().version == generation.version,
        "the proxy's channel has it"
    );
    Ok((wall.elapsed(), thread_cpu() - cpu))
}

/// 100 endpoint changes per second from one thread (as the watchers apply them), snapshots
/// published from another at most once per [`DEBOUNCE`] while changes keep coming.
fn churn(store: Store, mut publisher: Publisher, services: usize, secs: u64) -> anyhow::Result<Value> {
    struct Shared {
        store: Store,
        dirty: bool,
        done: bool,
    }
    let shared = Arc::new((Mutex::new(Shared { store, dirty: false, done: false }), Condvar::new()));
    let cpu_before = process_cpu();
    let started = Instant::now();
    let writer = {
        let shared = shared.clone();
        std::thread::spawn(move || -> anyhow::Result<u64> {
            let total = secs * CHURN_PER_SEC;
            for k in 0..total {
                let due = started + Duration::from_secs_f64(k as f64 / CHURN_PER_SEC as f64);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                let s = (k as usize * 104_729) % services;
                let object = slice(s, if k % 2 == 0 { Some(k as usize % ENDPOINTS) } else { None });
                let (lock, wake) = &*shared;
                let mut g = lock.lock().expect("lock");
                g.store.apply_value(0, object).map_err(|e| anyhow::anyhow!("{e}"))?;
                g.dirty = true;
                wake.notify_one();
            }
            let (lock, wake) = &*shared;
            lock.lock().expect("lock").done = true;
            wake.notify_one();
            Ok(total)
        })
    };
    let mut published = 0u64;
    let mut last = Instant::now() - DEBOUNCE;
    loop {
        let (lock, wake) = &*shared;
        let mut g = lock.lock().expect("lock");
        while !g.dirty && !g.done {
            g = wake.wait(g).expect("wait");
        }
        if !g.dirty && g.done {
            break;
        }
        drop(g);
        std::thread::sleep(DEBOUNCE.saturating_sub(last.elapsed()));
        let objects = {
            let mut g = lock.lock().expect("lock");
            g.dirty = false;
            g.store.clone()
        };
        publisher.publish(objects, "scale");
        published += 1;
        last = Instant::now();
    }
    let changes = writer.join().map_err(|_| anyhow::anyhow!("the writer panicked"))??;
    let wall = started.elapsed();
    let cpu = process_cpu() - cpu_before;
    Ok(json!({
        "secs": wall.as_secs_f64(),
        "changes": changes,
        "snapshots": published,
        "cores": cpu.as_secs_f64() / wall.as_secs_f64(),
    }))
}

/// Every object of the cluster, one at a time (the whole list at 20 000 Services would take
/// more memory than the store does).
fn cluster(services: usize) -> impl Iterator<Item = Value> {
    let namespaces = (0..NAMESPACES).map(|n| {
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": format!("app-{n}"), "labels": {"gammaray.dev/dataplane-mode": "ambient"}}})
    });
    let nodes = (0..NODES).map(|n| {
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": format!("node-{n}")},
               "status": {"addresses": [{"type": "InternalIP", "address": format!("10.200.0.{}", n + 1)}]}})
    });
    let per_service = (0..services).flat_map(move |s| {
        let mut objects: Vec<Value> = (0..ENDPOINTS).map(|e| pod(s * ENDPOINTS + e, s)).collect();
        objects.push(service(s));
        objects.push(slice(s, None));
        if s % 10 == 0 {
            objects.push(route(s, 90, services));
        }
        objects
    });
    namespaces.chain(nodes).chain(per_service)
}

fn namespace_of(s: usize) -> String {
    format!("app-{}", s % NAMESPACES)
}

fn pod_ip(n: usize) -> String {
    format!("10.{}.{}.{}", 128 + n / 62_500, (n / 250) % 250, n % 250 + 1)
}

fn service(s: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{s}"), "namespace": namespace_of(s), "uid": format!("svc-uid-{s}"),
                     "labels": {"app": format!("svc-{s}")}},
        "spec": {"clusterIP": format!("10.96.{}.{}", s / 250, s % 250 + 1), "type": "ClusterIP",
                 "selector": {"app": format!("svc-{s}")},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "appProtocol": "http"}]}})
}

/// Service `s`'s EndpointSlice; `unready` names an endpoint that is not ready.
fn slice(s: usize, unready: Option<usize>) -> Value {
    let endpoints: Vec<Value> = (0..ENDPOINTS)
        .map(|e| {
            let n = s * ENDPOINTS + e;
            let ready = unready != Some(e);
            json!({"addresses": [pod_ip(n)], "nodeName": format!("node-{}", n % NODES),
                   "conditions": {"ready": ready, "serving": ready, "terminating": false},
                   "targetRef": {"kind": "Pod", "namespace": namespace_of(s), "name": pod_name(s, n),
                                 "uid": uid(n)}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{s}-abcde"), "namespace": namespace_of(s),
                     "labels": {"kubernetes.io/service-name": format!("svc-{s}"),
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints})
}

/// The 90/10 (or `weight`/100-`weight`) split of Service `s` between itself and the next.
fn route(s: usize, weight: i64, services: usize) -> Value {
    let next = (s + 1) % services;
    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": format!("split-{s}"), "namespace": namespace_of(s), "generation": 1,
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": format!("svc-{s}"), "port": 80}],
                 "rules": [{"backendRefs": [
                     {"name": format!("svc-{s}"), "port": 80, "weight": weight},
                     {"name": format!("svc-{next}"), "namespace": namespace_of(next), "port": 80, "weight": 100 - weight}]}]}})
}

/// A pod name as a Deployment's ReplicaSet makes them: the Deployment, the template hash, five
/// random characters.
fn pod_name(s: usize, n: usize) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let suffix: String =
        (0..5).map(|i| ALPHABET[(n / ALPHABET.len().pow(i)) % ALPHABET.len()] as char).collect();
    format!("svc-{s}-5d8f7c9b6-{suffix}")
}

/// A UID as the API server assigns them (a random UUID; here one per pod number).
fn uid(n: usize) -> String {
    let x = (n as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c834) ^ 0x0123_4567_89ab_cdef;
    let h = format!("{x:032x}");
    format!("{}-{}-4{}-8{}-{}", &h[..8], &h[8..12], &h[13..16], &h[17..20], &h[20..])
}

/// A Pod as a kubelet leaves it running.
fn pod(n: usize, s: usize) -> Value {
    let ns = namespace_of(s);
    let name = pod_name(s, n);
    let env: Vec<Value> =
        (0..10).map(|i| json!({"name": format!("SETTING_{i}"), "value": format!("value-{i}-{n}")})).collect();
    let probe = json!({"httpGet": {"path": "/healthz", "port": 8080, "scheme": "HTTP"},
                       "initialDelaySeconds": 5, "periodSeconds": 10, "timeoutSeconds": 1,
                       "successThreshold": 1, "failureThreshold": 3});
    let condition = |t: &str| {
        json!({"type": t, "status": "True", "lastProbeTime": null,
                                     "lastTransitionTime": "2026-01-01T00:00:10Z"})
    };
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid(n),
            "resourceVersion": format!("{}", 1000 + n), "creationTimestamp": "2026-01-01T00:00:00Z",
            "generateName": format!("svc-{s}-"),
            "labels": {"app": format!("svc-{s}"), "pod-template-hash": "5d8f7c9b6"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("svc-{s}-5d8f7c9b6"),
                                 "uid": format!("rs-uid-{s}"), "controller": true, "blockOwnerDeletion": true}]},
        "spec": {
            "nodeName": format!("node-{}", n % NODES), "serviceAccountName": format!("sa-{s}"),
            "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
            "schedulerName": "default-scheduler", "enableServiceLinks": true, "preemptionPolicy": "PreemptLowerPriority",
            "priority": 0, "securityContext": {},
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}],
            "containers": [{
                "name": "app", "image": format!("registry.example/app-{s}:1.2.3"), "imagePullPolicy": "IfNotPresent",
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                "env": env,
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
                "livenessProbe": probe, "readinessProbe": probe,
                "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
                "volumeMounts": [{"name": "kube-api-access-x7k2p", "readOnly": true,
                                  "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}]}],
            "volumes": [{"name": "kube-api-access-x7k2p", "projected": {"defaultMode": 420, "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}]}}]},
        "status": {
            "phase": "Running", "qosClass": "Burstable", "hostIP": format!("10.200.0.{}", n % NODES + 1),
            "hostIPs": [{"ip": format!("10.200.0.{}", n % NODES + 1)}],
            "podIP": pod_ip(n), "podIPs": [{"ip": pod_ip(n)}], "startTime": "2026-01-01T00:00:01Z",
            "conditions": [condition("PodReadyToStartContainers"), condition("Initialized"), condition("Ready"),
                           condition("ContainersReady"), condition("PodScheduled")],
            "containerStatuses": [{"name": "app", "ready": true, "started": true, "restartCount": 0,
                "image": format!("registry.example/app-{s}:1.2.3"),
                "imageID": format!("registry.example/app-{s}@sha256:{:064x}", n),
                "containerID": format!("containerd://{:064x}", n * 7 + 1),
                "state": {"running": {"startedAt": "2026-01-01T00:00:05Z"}}}]}})
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}

/// The heap in use (glibc's count, every arena): what the store alone holds, then with the
/// translator's state and the snapshot.
fn heap_in_use() -> u64 {
    // SAFETY: mallinfo2 only reads glibc's heap bookkeeping.
    let info = unsafe { libc::mallinfo2() };
    (info.uordblks + info.hblkhd) as u64
}

fn trim() {
    // SAFETY: malloc_trim only returns free memory to the kernel.
    unsafe { libc::malloc_trim(0) };
}

fn cpu_clock(clock: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid out-pointer for the call.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn thread_cpu() -> Duration {
    cpu_clock(libc::CLOCK_THREAD_CPUTIME_ID)
}

fn process_cpu() -> Duration {
    cpu_clock(libc::CLOCK_PROCESS_CPUTIME_ID)
}
