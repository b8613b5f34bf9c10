//! Removal of what crashed runs left behind: network namespaces and cgroups named
//! `gammaray-<pid>-…` whose creating process is gone, and their bpf file systems.

use crate::{cgroup, names, netns::ip};

/// The directories whose entries a run names after itself: network namespaces, cgroups and bpf
/// file systems, each with the label `leftovers` gives it and how `sweep` removes one.
type Place = (std::path::PathBuf, &'static str, fn(&std::path::Path, &str) -> bool);

fn places() -> Vec<Place> {
    let mut places: Vec<Place> =
        vec![("/run/netns".into(), "", |_, name| ip(&["netns", "del", name]).is_ok())];
    if let Ok(root) = cgroup::cgroup2_root() {
        places.push((root, "cgroup ", |path, _| cgroup::remove_tree(path).is_ok()));
    }
    places.push((crate::bpffs::ROOT.into(), "bpffs ", |path, _| crate::bpffs::unmount(path).is_ok()));
    places
}

/// The names of the entries of `dir`.
fn names_in(dir: &std::path::Path) -> Vec<(std::path::PathBuf, String)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries.flatten().map(|e| (e.path(), e.file_name().to_string_lossy().into_owned())).collect()
}

/// Removes leftovers of dead runs; returns how many namespaces, cgroups and bpf file systems it
/// removed (and the control planes').
pub fn sweep() -> usize {
    let mut removed = 0;
    for (dir, _, remove) in places() {
        for (path, name) in names_in(&dir) {
            if is_orphan(&name) && remove(&path, &name) {
                removed += 1;
            }
        }
    }
    removed + crate::controlplane::sweep()
}

fn is_orphan(name: &str) -> bool {
    names::owner_pid(name).is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
}

/// Testkit namespaces, cgroups and bpf file systems that exist now whose name starts with
/// `prefix`.
pub fn leftovers(prefix: &str) -> Vec<String> {
    places()
        .into_iter()
        .flat_map(|(dir, label, _)| {
            names_in(&dir)
                .into_iter()
                .filter(|(_, n)| n.starts_with(prefix))
                .map(move |(_, n)| format!("{label}{n}"))
        })
        .collect()
}
