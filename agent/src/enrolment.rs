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
}

/// The pods of `node` that belong in the mesh, by UID.
pub fn wanted(store: &Store, node: &str) -> BTreeMap<String, Wanted> {
    store.pods.iter().filter_map(|(key, pod)| wanted_pod(store, node, key, pod)).collect()
}

/// One pod, by UID, if `node` should steer it.
fn wanted_pod(store: &Store, node: &str, key: &PodKey, pod: &PodInfo) -> Option<(String, Wanted)> {
    let ambient = store
        .namespaces
        .get(&*key.namespace)
        .and_then(|n| n.metadata.labels.as_ref())
        .and_then(|l| l.get(DATAPLANE_LABEL))
        .is_some_and(|v| v == AMBIENT);
    let wanted =
        pod.node.as_deref() == Some(node) && !pod.host_network && !pod.finished && !pod.opted_out && ambient;
    wanted
        .then(|| {
            Some((
                pod.uid.as_ref()?.to_string(),
                Wanted { namespace: key.namespace.to_string(), name: key.name.to_string() },
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

/// What the controller enrolled: UID → (netns cookie, namespace/name).
type Enrolled = HashMap<String, (u64, String)>;

/// Keeps enrolment in step with the objects until the task is dropped: on every change, and
/// every `retry` while a wanted pod has no process to be found yet.
pub async fn run(
    node: String,
    state: Arc<State>,
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
    loop {
        let current = generation.borrow_and_update().clone();
        let want = tracker.update(&current.objects);
        let pending = reconcile(&state, want, &mut enrolled, &proc_root, &host_netns).await;
        if std::mem::take(&mut first) {
            // Links still running an older ABI's programs move once this agent's maps hold
            // what the first pass enrolled: never a moment when an enrolled pod is unsteered.
            if let Err(err) = state.datapath.complete_swap() {
                warn!(error = %err, "cannot move the pinned links to this agent's programs");
            }
        }
        if pending {
            tokio::select! {
                changed = generation.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(retry) => {}
            }
        } else if generation.changed().await.is_err() {
            return;
        }
    }
}

/// One pass; returns whether some wanted pod could not be enrolled yet.
async fn reconcile(
    state: &State,
    want: &BTreeMap<String, Wanted>,
    enrolled: &mut Enrolled,
    proc_root: &Path,
    host_netns: &[u64],
) -> bool {
    let gone: Vec<String> = enrolled.keys().filter(|uid| !want.contains_key(*uid)).cloned().collect();
    for uid in gone {
        let (cookie, pod) = enrolled.remove(&uid).expect("present");
        match state.datapath.unenrol(cookie) {
            Ok(_) => info!(%pod, %uid, cookie, "pod unenrolled"),
            Err(err) => warn!(%pod, %uid, error = %err, "cannot unenrol pod"),
        }
    }
    let missing: Vec<(&String, &Wanted)> =
        want.iter().filter(|(uid, _)| !enrolled.contains_key(*uid)).collect();
    if missing.is_empty() {
        return false;
    }
    let root = proc_root.to_owned();
    let hosts = host_netns.to_vec();
    let found = tokio::task::spawn_blocking(move || scan_proc(&root, &hosts)).await.unwrap_or_default();
    let mut pending = false;
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
                enrolled.insert(uid.clone(), (cookie, pod));
            }
            Err(err) => {
                warn!(%pod, %uid, error = %err, "cannot enrol pod");
                pending = true;
            }
        }
    }
    pending
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
