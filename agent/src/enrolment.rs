//! Label-driven enrolment: the pods on this node whose namespace carries
//! `gammaray.dev/dataplane-mode=ambient` are enrolled, unless the pod itself says
//! `gammaray.dev/dataplane-mode=none` or runs on the host network.
//!
//! A pod's network namespace is found from its UID through /proc: every process's cgroup path
//! names its pod (`…/kubepods/<qos>/pod<uid>/<container>` with the kubelet's cgroupfs driver,
//! `…/kubepods-<qos>-pod<uid with _>.slice/…` with the systemd driver), and
//! `/proc/<pid>/ns/net` is then the pod's namespace. This needs only a host PID namespace and
//! works with any container runtime, where asking the runtime (CRI) would tie the agent to its
//! socket and API. A process still on the host's network namespace (one being set up) is
//! passed over until it has moved.
//!
//! Enrolment is one insert into the eBPF map and only changes how new connections are made:
//! existing connections are never touched, whether a pod joins or leaves.
//!
//! An enrolled pod's inbound side is captured too (see `gammaray_proxy::capture`): the agent
//! opens a listener inside the pod's network namespace, serves it from the node proxy, and
//! points the pod's addresses at it in the kernel's maps, with the `sk_lookup` link attached to
//! the namespace. The pod's peer authentication (`strict` or `permissive`, from its label or
//! its namespace's) goes with it, for the kernel to know when no proxy listens.

use std::{
    collections::{BTreeMap, HashMap},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    control::State,
    generation::Generation,
    store::{PodInfo, PodKey, Store},
};

/// The label on a namespace (enrol its pods) or a pod (`none`: leave it out).
pub const DATAPLANE_LABEL: &str = "gammaray.dev/dataplane-mode";
pub const AMBIENT: &str = "ambient";

/// A pod this node should steer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub namespace: String,
    pub name: String,
    /// Its IPv4 addresses (inbound capture is IPv4).
    pub ips: Vec<std::net::Ipv4Addr>,
    /// Its peer authentication is `strict`.
    pub strict: bool,
}

/// A pod's peer authentication is `strict`: its own label's, else its namespace's (as the
/// proxy decides it); a value that is neither `strict` nor `permissive` reads as strict.
fn strict(pod: &PodInfo, namespace: Option<&k8s_openapi::api::core::v1::Namespace>) -> bool {
    use gammaray_proxy::authz::{PEER_AUTHENTICATION_LABEL, PeerAuthentication};
    let label = namespace
        .and_then(|n| n.metadata.labels.as_ref())
        .and_then(|l| l.get(PEER_AUTHENTICATION_LABEL))
        .map(String::as_str);
    let namespace = PeerAuthentication::of_label(label, PeerAuthentication::Permissive);
    PeerAuthentication::of_label(pod.class.labels.get(PEER_AUTHENTICATION_LABEL), namespace)
        == PeerAuthentication::Strict
}

/// The pods of `node` that belong in the mesh, by UID.
pub fn wanted(store: &Store, node: &str) -> BTreeMap<String, Wanted> {
    store.pods.iter().filter_map(|(key, pod)| wanted_pod(store, node, key, pod)).collect()
}

/// One pod, by UID, if `node` should steer it.
fn wanted_pod(store: &Store, node: &str, key: &PodKey, pod: &PodInfo) -> Option<(String, Wanted)> {
    let namespace = store.namespaces.get(&*key.namespace);
    let ambient = namespace
        .and_then(|n| n.metadata.labels.as_ref())
        .and_then(|l| l.get(DATAPLANE_LABEL))
        .is_some_and(|v| v == AMBIENT);
    let wanted =
        pod.node.as_deref() == Some(node) && !pod.host_network && !pod.finished && !pod.opted_out && ambient;
    wanted
        .then(|| {
            Some((
                pod.uid.as_ref()?.to_string(),
                Wanted {
                    namespace: key.namespace.to_string(),
                    name: key.name.to_string(),
                    ips: pod
                        .ips
                        .iter()
                        .filter_map(|ip| match ip {
                            std::net::IpAddr::V4(v4) => Some(*v4),
                            std::net::IpAddr::V6(_) => None,
                        })
                        .collect(),
                    strict: strict(pod, namespace.map(|n| &**n)),
                },
            ))
        })
        .flatten()
}

/// [`wanted`], kept from one store to the next by the pods that changed: the store's persistent
/// maps tell them apart in time proportional to the change, so a pod starting elsewhere in a
/// cluster of 200 000 does not cost a pass over all of them. A change to the namespaces (whose
/// label enrols all their pods) recomputes the whole set.
pub struct Tracker {
    node: String,
    last: Option<Store>,
    want: BTreeMap<String, Wanted>,
}

impl Tracker {
    pub fn new(node: String) -> Self {
        Self { node, last: None, want: BTreeMap::new() }
    }

    pub fn update(&mut self, store: &Store) -> &BTreeMap<String, Wanted> {
        match &self.last {
            Some(last) if last.namespaces.diff(&store.namespaces).next().is_none() => {
                for item in last.pods.diff(&store.pods) {
                    let (key, old, new) = crate::store::changed(item);
                    if let Some(uid) = old.and_then(|p| p.uid.as_ref()).map(|u| u.to_string())
                        && self
                            .want
                            .get(&uid)
                            .is_some_and(|w| *w.namespace == *key.namespace && *w.name == *key.name)
                    {
                        self.want.remove(&uid);
                    }
                    if let Some((uid, w)) = new.and_then(|p| wanted_pod(store, &self.node, key, p)) {
                        self.want.insert(uid, w);
                    }
                }
            }
            _ => self.want = wanted(store, &self.node),
        }
        self.last = Some(store.clone());
        &self.want
    }
}

/// The pod UID a cgroup path names, for both kubelet cgroup drivers.
pub fn pod_uid_of_cgroup(path: &str) -> Option<String> {
    for segment in path.split('/') {
        if let Some(uid) = segment.strip_prefix("pod")
            && uid.len() >= 32
        {
            return Some(uid.to_owned());
        }
        if let Some(slice) = segment.strip_suffix(".slice")
            && let Some((_, uid)) = slice.rsplit_once("-pod")
            && uid.len() >= 32
        {
            return Some(uid.replace('_', "-"));
        }
    }
    None
}

/// For every pod UID with a process on this host: one of its processes' network namespace
/// paths, skipping processes still on `host_netns` (inode numbers).
pub fn scan_proc(proc_root: &Path, host_netns: &[u64]) -> HashMap<String, PathBuf> {
    let mut found = HashMap::new();
    let Ok(entries) = std::fs::read_dir(proc_root) else { return found };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else { continue };
        let dir = proc_root.join(pid);
        let Ok(cgroups) = std::fs::read_to_string(dir.join("cgroup")) else { continue };
        let Some(uid) = cgroups.lines().find_map(|l| pod_uid_of_cgroup(l.rsplit(':').next().unwrap_or("")))
        else {
            continue;
        };
        if found.contains_key(&uid) {
            continue;
        }
        let netns = dir.join("ns/net");
        match std::fs::metadata(&netns) {
            Ok(meta) if !host_netns.contains(&meta.ino()) => {
                found.insert(uid, netns);
            }
            _ => {}
        }
    }
    found
}

/// One pod the controller enrolled.
struct EnrolledPod {
    cookie: u64,
    /// `namespace/name`, for the log.
    pod: String,
    netns: PathBuf,
    capture: Option<Captured>,
}

/// A pod's inbound capture as set up.
struct Captured {
    ips: Vec<std::net::Ipv4Addr>,
    strict: bool,
    node_addr: std::net::Ipv4Addr,
    /// The listener, for the kernel's socket map; the proxy serves its twin.
    listener: std::os::fd::OwnedFd,
    _serving: gammaray_proxy::Capture,
}

/// What the controller enrolled, by pod UID.
type Enrolled = HashMap<String, EnrolledPod>;

/// How often the pods' addresses are pointed at this agent's capture listeners again: an agent
/// that took part in a hand-over and has exited takes its sockets' entries with it.
const RECAPTURE_EVERY: Duration = Duration::from_secs(2);

/// Keeps enrolment in step with the objects until the task is dropped: on every change, and
/// every `retry` while a wanted pod has no process to be found yet (or no address).
pub async fn run(
    node: String,
    state: Arc<State>,
    proxy: Arc<gammaray_proxy::Proxy>,
    mut generation: watch::Receiver<Arc<Generation>>,
    proc_root: PathBuf,
    retry: Duration,
) {
    let host_netns: Vec<u64> = ["self", "1"]
        .iter()
        .filter_map(|p| std::fs::metadata(proc_root.join(p).join("ns/net")).ok().map(|m| m.ino()))
        .collect();
    let mut enrolled = Enrolled::new();
    let mut tracker = Tracker::new(node);
    let mut first = true;
    // What earlier agents left in the kernel, swept once this agent's first complete pass shows
    // which of it is still wanted.
    let mut inherited = Some(state.datapath.inherited());
    let mut recapture = tokio::time::interval(RECAPTURE_EVERY);
    recapture.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let current = generation.borrow_and_update().clone();
        let want = tracker.update(&current.objects);
        let ctx = Ctx { state: &state, proxy: &proxy, proc_root: &proc_root, host_netns: &host_netns };
        let pending = reconcile(&ctx, want, &mut enrolled).await;
        if std::mem::take(&mut first) {
            // Links still running an older ABI's programs move once this agent's maps hold
            // what the first pass enrolled: never a moment when an enrolled pod is unsteered.
            if let Err(err) = state.datapath.complete_swap() {
                warn!(error = %err, "cannot move the pinned links to this agent's programs");
            }
        }
        if !pending && let Some(inherited) = inherited.take() {
            sweep(&state, &inherited, &enrolled);
        }
        loop {
            tokio::select! {
                changed = generation.changed() => {
                    if changed.is_err() { return }
                    break;
                }
                () = tokio::time::sleep(retry), if pending => break,
                _ = recapture.tick() => recapture_all(&state, &enrolled),
            }
        }
    }
}

/// Removes what earlier agents left for pods this agent does not enrol (pods that left the
/// mesh or ended while no agent ran): their enrolment, inbound links and inbound entries.
/// Only what was there when this agent started: what an agent handing over adds meanwhile is
/// that agent's.
fn sweep(state: &State, inherited: &crate::ebpf::Inherited, enrolled: &Enrolled) {
    let cookies: std::collections::HashSet<u64> = enrolled.values().map(|e| e.cookie).collect();
    let ips: std::collections::HashSet<std::net::Ipv4Addr> =
        enrolled.values().filter_map(|e| e.capture.as_ref()).flat_map(|c| c.ips.iter().copied()).collect();
    let removed = state.datapath.sweep(inherited, &cookies, &ips);
    if removed.any() {
        info!(
            enrolments = removed.enrolments,
            inbound_links = removed.links,
            inbound_addresses = removed.addresses,
            "removed what earlier agents left for pods no longer enrolled"
        );
    }
}

fn recapture_all(state: &State, enrolled: &Enrolled) {
    use std::os::fd::AsFd as _;
    for e in enrolled.values() {
        if let Some(c) = &e.capture
            && let Err(err) = state.datapath.recapture(&c.ips, c.listener.as_fd())
        {
            warn!(pod = %e.pod, error = %err, "cannot point the pod's addresses at its capture listener");
        }
    }
}

/// What a pass works with.
struct Ctx<'a> {
    state: &'a State,
    proxy: &'a Arc<gammaray_proxy::Proxy>,
    proc_root: &'a Path,
    host_netns: &'a [u64],
}

/// One pass; returns whether some wanted pod could not be enrolled (or captured) yet.
async fn reconcile(ctx: &Ctx<'_>, want: &BTreeMap<String, Wanted>, enrolled: &mut Enrolled) -> bool {
    let state = ctx.state;
    let gone: Vec<String> = enrolled.keys().filter(|uid| !want.contains_key(*uid)).cloned().collect();
    for uid in gone {
        let e = enrolled.remove(&uid).expect("present");
        let pod = &e.pod;
        match state.datapath.unenrol(e.cookie) {
            Ok(_) => info!(%pod, %uid, cookie = e.cookie, "pod unenrolled"),
            Err(err) => warn!(%pod, %uid, error = %err, "cannot unenrol pod"),
        }
        let ips = e.capture.as_ref().map(|c| c.ips.clone()).unwrap_or_default();
        if let Err(err) = state.datapath.release(e.cookie, &ips) {
            warn!(%pod, %uid, error = %err, "cannot stop capturing the pod's inbound connections");
        }
    }
    let mut pending = false;
    let missing: Vec<(&String, &Wanted)> =
        want.iter().filter(|(uid, _)| !enrolled.contains_key(*uid)).collect();
    if !missing.is_empty() {
        let root = ctx.proc_root.to_owned();
        let hosts = ctx.host_netns.to_vec();
        let found = tokio::task::spawn_blocking(move || scan_proc(&root, &hosts)).await.unwrap_or_default();
        for (uid, w) in missing {
            let pod = format!("{}/{}", w.namespace, w.name);
            let Some(netns) = found.get(uid) else {
                pending = true;
                continue;
            };
            let path = netns.clone();
            let cookie = match tokio::task::spawn_blocking(move || crate::netns::cookie_of(&path)).await {
                Ok(Ok(c)) => c,
                Ok(Err(err)) => {
                    warn!(%pod, %uid, error = %err, "cannot read the pod's network namespace");
                    pending = true;
                    continue;
                }
                Err(_) => continue,
            };
            match state.datapath.enrol(cookie) {
                Ok(()) => {
                    info!(%pod, %uid, netns = %netns.display(), cookie, "pod enrolled");
                    enrolled.insert(
                        uid.clone(),
                        EnrolledPod { cookie, pod, netns: netns.clone(), capture: None },
                    );
                }
                Err(err) => {
                    warn!(%pod, %uid, error = %err, "cannot enrol pod");
                    pending = true;
                }
            }
        }
    }
    // Inbound capture, for pods new or whose addresses or peer authentication changed.
    for (uid, w) in want {
        let Some(e) = enrolled.get_mut(uid) else { continue };
        if e.capture.as_ref().is_some_and(|c| c.ips == w.ips && c.strict == w.strict) {
            continue;
        }
        if w.ips.is_empty() {
            // No address yet: nothing to capture until the pod has one.
            pending = true;
            continue;
        }
        match capture(ctx, e, w).await {
            Ok(()) => {}
            Err(err) => {
                warn!(pod = %e.pod, %uid, error = %err, "cannot capture the pod's inbound connections; retrying");
                pending = true;
            }
        }
    }
    pending
}

/// Sets up, or updates, one pod's inbound capture.
async fn capture(ctx: &Ctx<'_>, e: &mut EnrolledPod, w: &Wanted) -> anyhow::Result<()> {
    use std::os::fd::AsFd as _;
    if let Some(c) = &mut e.capture {
        // The same listener: the entries change.
        let old: Vec<_> = c.ips.iter().copied().filter(|ip| !w.ips.contains(ip)).collect();
        let pod = crate::ebpf::Capture {
            netns_cookie: e.cookie,
            netns: &e.netns,
            ips: &w.ips,
            node_addr: c.node_addr,
            strict: w.strict,
        };
        ctx.state.datapath.capture(&pod, c.listener.as_fd())?;
        ctx.state.datapath.release_addresses(&old)?;
        (c.ips, c.strict) = (w.ips.clone(), w.strict);
        info!(pod = %e.pod, ips = ?w.ips, strict = w.strict, "pod's inbound capture updated");
        return Ok(());
    }
    let (netns, first) = (e.netns.clone(), w.ips[0]);
    let (listener, node_addr) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let node_addr = crate::netns::source_toward(first)?;
        Ok((crate::netns::listener_in(&netns, 1024)?, node_addr))
    })
    .await??;
    let twin: std::os::fd::OwnedFd = listener.try_clone()?.into();
    let pod = crate::ebpf::Capture {
        netns_cookie: e.cookie,
        netns: &e.netns,
        ips: &w.ips,
        node_addr,
        strict: w.strict,
    };
    let serving = ctx.proxy.capture(listener, e.pod.clone())?;
    ctx.state.datapath.capture(&pod, twin.as_fd())?;
    info!(pod = %e.pod, ips = ?w.ips, %node_addr, strict = w.strict, "pod's inbound connections captured");
    e.capture =
        Some(Captured { ips: w.ips.clone(), strict: w.strict, node_addr, listener: twin, _serving: serving });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0000abcd-0001-4001-8001-000000000102";

    #[test]
    fn pod_uids_come_from_either_cgroup_driver() {
        assert_eq!(
            pod_uid_of_cgroup(&format!("/run-1/node1/kubepods/besteffort/pod{UID}/0123abcd")).as_deref(),
            Some(UID)
        );
        let systemd = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-0123.scope",
            UID.replace('-', "_")
        );
        assert_eq!(pod_uid_of_cgroup(&systemd).as_deref(), Some(UID));
        assert_eq!(pod_uid_of_cgroup("/system.slice/sshd.service"), None);
        assert_eq!(pod_uid_of_cgroup("/user.slice/podman.scope"), None);
    }

    #[test]
    fn only_this_nodes_pods_in_ambient_namespaces_are_wanted() {
        let mut store = Store::default();
        let applied = store.apply_yaml(
            r#"
apiVersion: v1
kind: Namespace
metadata: {name: mesh, labels: {gammaray.dev/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: mesh, uid: u-a}
spec: {nodeName: node1, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: opted-out, namespace: mesh, uid: u-b, labels: {gammaray.dev/dataplane-mode: none}}
spec: {nodeName: node1, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: host, namespace: mesh, uid: u-c}
spec: {nodeName: node1, hostNetwork: true, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: elsewhere, namespace: mesh, uid: u-d}
spec: {nodeName: node2, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: done, namespace: mesh, uid: u-e}
spec: {nodeName: node1, containers: [{name: c}]}
status: {phase: Succeeded}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: plain, uid: u-f}
spec: {nodeName: node1, containers: [{name: c}]}
"#,
        );
        assert!(applied.errors.is_empty(), "{:?}", applied.errors);
        let want = wanted(&store, "node1");
        assert_eq!(want.keys().collect::<Vec<_>>(), vec!["u-a"]);

        // The tracker agrees after every change: pods arriving, moving, opting out, finishing,
        // leaving, and a namespace's label coming and going.
        let mut tracker = Tracker::new("node1".into());
        assert_eq!(tracker.update(&store), &want);
        for change in [
            "apiVersion: v1\nkind: Pod\nmetadata: {name: c, namespace: mesh, uid: u-g}\nspec: {nodeName: node1}\n",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: elsewhere, namespace: mesh, uid: u-d}\nspec: {nodeName: node1}\n",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: mesh, uid: u-a, labels: {gammaray.dev/dataplane-mode: none}}\nspec: {nodeName: node1}\n",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: c, namespace: mesh, uid: u-g}\nspec: {nodeName: node1}\nstatus: {phase: Failed}\n",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: plain, labels: {gammaray.dev/dataplane-mode: ambient}}\n",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: mesh}\n",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: mesh, labels: {gammaray.dev/dataplane-mode: ambient}}\n",
        ] {
            assert!(store.apply_yaml(change).errors.is_empty(), "{change}");
            assert_eq!(tracker.update(&store), &wanted(&store, "node1"), "after {change}");
        }
        assert!(store.remove("Pod", "mesh", "elsewhere"));
        assert_eq!(tracker.update(&store), &wanted(&store, "node1"), "after a removal");
        assert_eq!(
            tracker.update(&store).keys().collect::<Vec<_>>(),
            vec!["u-f"],
            "only plain's pod is left"
        );
    }

    #[test]
    fn a_proc_scan_finds_pod_processes_and_skips_those_on_the_host_network() {
        let root = std::env::temp_dir().join(format!("gammaray-proc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let real_netns = std::fs::metadata("/proc/self/ns/net").expect("own netns").ino();
        for (pid, cgroup) in
            [("10", format!("0::/kubepods/besteffort/pod{UID}/c1")), ("11", "0::/system.slice/x".into())]
        {
            let dir = root.join(pid);
            std::fs::create_dir_all(dir.join("ns")).expect("dir");
            std::fs::write(dir.join("cgroup"), cgroup).expect("cgroup");
            std::os::unix::fs::symlink("/proc/self/ns/net", dir.join("ns/net")).expect("link");
        }
        let found = scan_proc(&root, &[]);
        assert_eq!(found.get(UID), Some(&root.join("10/ns/net")));
        assert_eq!(found.len(), 1);
        assert!(scan_proc(&root, &[real_netns]).is_empty(), "a process on the host netns is passed over");
        std::fs::remove_dir_all(&root).expect("clean up");
    }
}
